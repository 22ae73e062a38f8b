"""Prefix hashes of token chunks, identical across processes, machines and restarts."""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import ShapeMismatchError

__all__ = ["chunk_bounds", "geometry_seed", "prefix_hashes", "token_ids"]

_SEED = b"gds_kvcache/prefix-hash/v1"
_INT64_MAX = np.iinfo(np.int64).max


def token_ids(tokens) -> np.ndarray:
    """``tokens`` as a 1-D little-endian int64 host array, or ``ShapeMismatchError`` saying why not.

    Accepted: a 1-D integer tensor (any device holding data), a 1-D integer
    NumPy array, or a flat list/tuple of ints. Rejected: other ranks, bool,
    float and complex values, ids outside ``0 .. 2**63 - 1``, and tensors on
    the ``meta`` device (a shape without values).

    Notes
    -----
    Negative ids are refused: no tokenizer makes them, and where they appear
    they are padding or placeholders whose KV is not a function of the prefix,
    so caching it under a prefix hash would serve the wrong KV later. A float
    id would be truncated and a 2-D batch flattened into one sequence, both
    silently, hence the strict types. A CUDA tensor costs one device-to-host
    copy; hashing runs on the host.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype in (torch.bool, torch.complex64, torch.complex128) or tokens.dtype.is_floating_point:
            raise ShapeMismatchError(f"tokens must hold integer token ids; got a {tokens.dtype} tensor "
                                     "(allowed: a 1-D integer tensor, integer NumPy array or list of ints)")
        if tokens.dim() != 1:
            raise ShapeMismatchError(f"tokens must be 1-D (one sequence); got a tensor of shape "
                                     f"{tuple(tokens.shape)}")
        if tokens.is_meta:
            # A meta tensor has a shape and a dtype but no values to hash (torch's copy would
            # raise NotImplementedError, not the library's error).
            raise ShapeMismatchError(f"tokens must hold data (the token ids); got a tensor of shape "
                                     f"{tuple(tokens.shape)} on the meta device, which has none")
        arr = tokens.detach().to("cpu").numpy()
    elif isinstance(tokens, (np.ndarray, list, tuple)):
        if isinstance(tokens, (list, tuple)) and len(tokens) == 0:
            arr = np.zeros(0, dtype=np.int64)  # np.asarray([]) would say float64
        else:
            try:
                arr = np.asarray(tokens)
            except (ValueError, OverflowError) as e:  # ragged nesting, or an int past 64 bits
                raise ShapeMismatchError(f"tokens must be a flat sequence of ints: {e}") from None
        if arr.dtype.kind not in "iu":
            raise ShapeMismatchError(f"tokens must hold integer token ids; got values of type {arr.dtype} "
                                     "(allowed: a 1-D integer tensor, integer NumPy array or list of ints)")
        if arr.ndim != 1:
            raise ShapeMismatchError(f"tokens must be 1-D (one sequence); got shape {arr.shape}")
    else:
        raise ShapeMismatchError(f"tokens must be a 1-D integer tensor, integer NumPy array or list of ints; "
                                 f"got {type(tokens).__name__}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _INT64_MAX:
            bad = lo if lo < 0 else hi
            raise ShapeMismatchError(f"token id {bad} is out of range; ids must be in 0..{_INT64_MAX} "
                                     "(negative ids are padding, not tokens)")
    return np.ascontiguousarray(arr, dtype="<i8")


def geometry_seed(layout: str, dtype, kv_shape: Sequence[int]) -> bytes:
    """The chunk geometry as bytes to seed ``prefix_hashes`` with.

    ``kv_shape`` is ``(num_layers, kv, chunk_size, num_kv_heads, head_size)``;
    ``dtype`` a ``torch.dtype`` (or anything with a stable ``str``).

    Notes
    -----
    Two caches whose chunks have the same byte shape but a different head
    split (H=2, D=16 against H=1, D=32), dtype or layout then get different
    keys: a clean miss instead of KV read back as the wrong heads, and both can
    live in one directory. The text uses no Python ``hash()`` or addresses, so
    it is the same in every process and on every machine.
    """
    L, kv, chunk, heads, head_size = (int(x) for x in kv_shape)
    name = str(dtype)
    name = name[len("torch."):] if name.startswith("torch.") else name
    return (f"layout={layout};dtype={name};num_layers={L};kv={kv};heads={heads};head_size={head_size};"
            f"chunk_size={chunk}").encode()


def chunk_bounds(num_tokens: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each chunk; the last may be partial."""
    for s in range(0, num_tokens, chunk_size):
        yield s, min(s + chunk_size, num_tokens)


def prefix_hashes(tokens, chunk_size: int, seed: bytes = b"") -> list[str]:
    """One hex hash per chunk, chained: chunk i's hash covers tokens ``[0, end_i)``.

    BLAKE2b-128 over the previous hash and the chunk's tokens as little-endian
    int64, so the value never depends on Python's ``hash()`` seed, the token
    container or the machine's byte order. ``tokens`` are checked by
    ``token_ids``.

    Parameters
    ----------
    seed
        Folded into the start of the chain (``geometry_seed`` gives the one
        ``CacheEngine`` uses); empty for the plain chain.

    Notes
    -----
    Changing the scheme or the seed changes every key, which turns every
    stored chunk into a miss: the golden values in the tests guard that.
    """
    arr = token_ids(tokens)
    out = []
    # NUL never occurs in _SEED, so a seeded chain can never start where the
    # plain one does.
    prev = hashlib.blake2b(_SEED + (b"\0" + seed if seed else b""), digest_size=16).digest()
    for s, e in chunk_bounds(arr.shape[0], chunk_size):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(arr[s:e].tobytes())
        prev = h.digest()
        out.append(prev.hex())
    return out
