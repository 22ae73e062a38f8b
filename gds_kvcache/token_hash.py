"""Prefix hashes of token chunks, identical across processes, machines and restarts."""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch

__all__ = ["chunk_bounds", "prefix_hashes"]

_SEED = b"gds_kvcache/prefix-hash/v1"


def _as_int64(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().to("cpu", torch.int64).numpy()
    return np.ascontiguousarray(np.asarray(tokens, dtype="<i8").reshape(-1))


def chunk_bounds(num_tokens: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each chunk; the last may be partial."""
    for s in range(0, num_tokens, chunk_size):
        yield s, min(s + chunk_size, num_tokens)


def prefix_hashes(tokens, chunk_size: int) -> list[str]:
    """One hex hash per chunk, chained: chunk i's hash covers tokens ``[0, end_i)``.

    BLAKE2b-128 over the previous hash and the chunk's tokens as little-endian
    int64, so the value never depends on Python's ``hash()`` seed, the token
    container or the machine's byte order.
    """
    arr = _as_int64(tokens)
    out = []
    prev = hashlib.blake2b(_SEED, digest_size=16).digest()
    for s, e in chunk_bounds(arr.shape[0], chunk_size):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(arr[s:e].tobytes())
        prev = h.digest()
        out.append(prev.hex())
    return out
