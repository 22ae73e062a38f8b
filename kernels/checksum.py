"""Chunk checksum: an order-independent 64-bit hash, on CPU and on GPU.

``sum_i mix(word_i, i) + mix(nbytes, n_words)`` modulo 2**64, where ``word_i``
is the i-th little-endian 8-byte word (the tail zero-padded) and ``mix`` is a
bijection of the word for a fixed index. A changed word therefore always
changes its term, so any single corrupted word, and any truncation, changes
the sum. The sum is order-independent, so GPU blocks and CPU threads reduce
in any order and still agree bit for bit.

It runs at memory speed on the GPU (no host round trip of the data: only the
8-byte result comes back) and at several GB/s per core on the CPU (one core per call, GIL released;
the Numba kernels are ``checksum_cpu``, imported on first use).

``checksum_batch`` hashes many spans of one buffer (a slab) with one kernel
launch and one sync on the GPU, or one compiled call on the CPU, instead of
one of each per chunk.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

__all__ = ["checksum_host", "checksum_cuda", "checksum", "checksum_batch", "warmup_cuda"]

_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_S = np.uint64(31)

_CPU = None  # kernels.checksum_cpu once imported


def _cpu():
    """``kernels.checksum_cpu``, the module: Numba is imported at the first CPU checksum, not with
    the package (see that module's docstring for why)."""
    global _CPU
    if _CPU is None:
        from . import checksum_cpu

        _CPU = checksum_cpu
    return _CPU


def checksum_host(buf) -> int:
    """Checksum of a host buffer (anything ``np.frombuffer`` or a uint8 NumPy array takes)."""
    b = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    b = b.reshape(-1).view(np.uint8)
    n = b.shape[0]
    words = b[: n // 8 * 8].view(np.uint64) if b.ctypes.data % 8 == 0 else \
        np.ascontiguousarray(b[: n // 8 * 8]).view(np.uint64)
    return int(_cpu().checksum_words(words, b, n))


_K1_S = int(_K1) - (1 << 64)  # the same constants as signed int64, for torch
_K2_S = int(_K2) - (1 << 64)
_arange_cache: dict = {}
_local = threading.local()


def _side_stream(device):
    """This thread's own non-blocking stream: work on the legacy default stream would
    wait for, and make wait, every I/O copy of every other thread."""
    import torch

    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    s = streams.get(device)
    if s is None:
        s = streams[device] = torch.cuda.Stream(device)
    return s


def _mix_int(w: int, i: int) -> int:
    m = (1 << 64) - 1
    h = ((w ^ (i * int(_K1))) * int(_K2)) & m
    return h ^ (h >> 31)


def _arange(n: int, device):
    a = _arange_cache.get(device)
    if a is None or a.numel() < n:
        import torch

        a = torch.arange(max(n, 1 << 20), dtype=torch.int64, device=device)
        if a.is_cuda:
            torch.cuda.synchronize(device)  # made on one thread's stream, read on all of them
        _arange_cache[device] = a
    return a[:n]


def _gpu_module():
    """``kernels.checksum_cuda``, the module (imported on first GPU use: it loads numba.cuda)."""
    import importlib
    import sys

    name = f"{__package__}.checksum_cuda"
    mod = sys.modules.get(name)
    if mod is None:
        mod = importlib.import_module(name)
        # A first import binds the submodule on the package, over the function
        # checksum_cuda the package exports; put the function back.
        setattr(sys.modules[__package__], "checksum_cuda", checksum_cuda)
    return mod


_NUMBA_GPU = None  # None: decide on first use (kernel with the prepared launch, else torch ops)


def _use_numba_gpu() -> bool:
    global _NUMBA_GPU
    if _NUMBA_GPU is None:
        try:
            _NUMBA_GPU = _gpu_module().available()
        except Exception as exc:  # no usable numba-cuda: the torch version computes the same value
            import logging

            logging.getLogger(__name__).info("GPU checksum uses torch ops (%s)", exc)
            _NUMBA_GPU = False
    return _NUMBA_GPU


def checksum_cuda(t, ordered: bool = True) -> int:
    """Checksum of a contiguous CUDA ``uint8`` tensor, computed on its device.

    One Numba kernel (``checksum_cuda.checksum_words_cuda``) through the
    prepared launch where numba-cuda allows it, else torch element-wise ops
    in int64 (two's-complement wrap-around gives the same bits as the uint64
    arithmetic of the host version). Either way only 8 or 16 bytes come back:
    the data never leaves the GPU. Runs on this thread's own stream.
    """
    import torch

    if t.is_cuda:
        stream = _side_stream(t.device)
        if ordered:
            # The caller's stream may still be writing t (a pack kernel): order after it.
            # The disk tier passes ordered=False: it has synchronised the producer already,
            # and waiting on an I/O thread's legacy default stream would wait for every
            # other thread's copies too.
            stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            if t.data_ptr() % 8 == 0 and _use_numba_gpu():
                return _checksum_numba(t, stream)
            return _checksum_torch(t)
    return _checksum_torch(t)


def _checksum_numba(t, stream) -> int:
    word_sum = _gpu_module().word_sum
    t = t.reshape(-1)
    n = t.numel()
    nw = n // 8
    total = word_sum(t.data_ptr(), nw, t.device, stream) if nw else 0
    if n > nw * 8:
        total += _mix_int(int.from_bytes(bytes(t[nw * 8:].cpu().tolist()), "little"), nw)
        nw += 1
    total += _mix_int(n, nw + 0x5157)
    return total & ((1 << 64) - 1)


def _checksum_torch(t) -> int:
    import torch

    t = t.reshape(-1)
    n = t.numel()
    full = n // 8 * 8
    nw = full // 8
    if nw:
        w = t[:full].view(torch.int64) if t.data_ptr() % 8 == 0 else t[:full].clone().view(torch.int64)
        h = torch.bitwise_xor(w, _arange(nw, t.device) * _K1_S)
        h.mul_(_K2_S)
        h.bitwise_xor_(torch.bitwise_and(h >> 31, (1 << 33) - 1))  # logical shift of the uint64 bits
        body = h.sum()
    else:
        body = torch.zeros((), dtype=torch.int64, device=t.device)
    tail = t[full:].to(torch.int64)
    tail_word = (tail << (8 * torch.arange(n - full, device=t.device))).sum() if n > full else body * 0
    total, tw = torch.stack([body, tail_word]).tolist()
    total &= (1 << 64) - 1
    if n > full:
        total += _mix_int(tw & ((1 << 64) - 1), nw)
        nw += 1
    total += _mix_int(n, nw + 0x5157)
    return total & ((1 << 64) - 1)


def warmup_cuda(device) -> None:
    """Compile (or load from Numba's cache) the GPU checksum kernel now, not on the first put."""
    import torch

    checksum_cuda(torch.ones(16, dtype=torch.uint8, device=device))


def checksum(t, ordered: bool = True) -> int:
    """Checksum of a contiguous torch tensor's bytes, on whatever device it lives.

    ``ordered=False`` skips waiting for the current CUDA stream: only for
    callers that know the bytes are complete.
    """
    import torch

    t = t.reshape(-1).view(torch.uint8)
    if t.is_cuda:
        return checksum_cuda(t, ordered)
    return checksum_host(t.numpy())


# ---------------------------------------------------------------------------
# Many spans of one buffer at once.


def _span_arrays(spans, size: int):
    """``(offs, lens)`` as int64 arrays, checked against a buffer of ``size`` bytes."""
    from gds_kvcache.errors import ShapeMismatchError

    a = np.asarray(spans, dtype=np.int64) if len(spans) else np.zeros((0, 2), np.int64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ShapeMismatchError(f"checksum spans must be (offset, nbytes) pairs, got an array of shape {a.shape}")
    offs, lens = np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(a[:, 1])
    bad = (offs < 0) | (lens <= 0) | (offs > size - lens)
    if bad.any():
        i = int(np.argmax(bad))
        raise ShapeMismatchError(
            f"checksum span {i} (offset {int(offs[i])}, length {int(lens[i])}) is not inside the "
            f"{size}-byte buffer; each span needs offset >= 0, length > 0 and offset + length <= {size}")
    return offs, lens


def _checksum_batch_host(b: np.ndarray, offs, lens) -> list:
    addr = b.ctypes.data
    s0 = -addr % 8  # first 8-byte aligned byte of b
    nwords = max(b.shape[0] - s0, 0) // 8
    words = b[s0:s0 + nwords * 8].view(np.uint64)
    aligned = (addr + offs) % 8 == 0
    woffs = np.where(aligned, (offs - s0) // 8, -1)
    out = np.empty(offs.shape[0], dtype=np.uint64)
    _cpu().checksum_batch_words(words, b, offs, lens, woffs, out)
    return out.tolist()


def checksum_batch(buf, spans: Sequence[tuple[int, int]], ordered: bool = True) -> list[int]:
    """Checksums of ``buf[off:off + n]`` for each ``(off, n)``; each equals ``checksum_host`` of its slice.

    Parameters
    ----------
    buf
        A contiguous 1-D ``uint8`` torch tensor (a slab: CUDA, pinned or host
        memory) or NumPy array.
    spans
        ``(offset, nbytes)`` pairs with ``nbytes > 0`` inside ``buf``; they may
        overlap and come in any order.
    ordered
        CUDA only: wait for the current stream first (as ``checksum``). Pass
        False only where the bytes are known to be complete.

    Returns
    -------
    list of int
        One unsigned 64-bit checksum per span, in the order given.

    Notes
    -----
    On the GPU the whole batch is one kernel launch on this thread's side
    stream, one upload of descriptors (32 bytes a span) and one download of
    the results: the ~100 us fixed cost of a ``checksum`` call is paid once
    per batch, not once per chunk. Spans whose address is not 8-byte aligned
    (slab chunks are 4 KiB aligned, so only odd callers) are hashed one by
    one with torch ops after the batch. On the CPU it is one GIL-free,
    single-threaded compiled call: run batches from several threads to use
    several cores.
    """
    import torch

    from gds_kvcache.errors import ShapeMismatchError

    if isinstance(buf, np.ndarray):
        b = buf
    else:
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1 \
                or not buf.is_contiguous():
            what = f"{tuple(buf.shape)} {buf.dtype}" if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise ShapeMismatchError(f"checksum_batch needs a contiguous 1-D uint8 buffer, got {what}")
        if buf.is_cuda:
            offs, lens = _span_arrays(spans, buf.numel())
            return _checksum_batch_cuda(buf, offs, lens, ordered)
        b = buf.numpy()
    if b.dtype != np.uint8 or b.ndim != 1 or not b.flags.c_contiguous:
        raise ShapeMismatchError(f"checksum_batch needs a contiguous 1-D uint8 buffer, got {b.shape} {b.dtype}")
    offs, lens = _span_arrays(spans, b.shape[0])
    return _checksum_batch_host(b, offs, lens)


def _checksum_batch_cuda(buf, offs, lens, ordered: bool) -> list:
    import torch

    if offs.shape[0] == 0:
        return []
    stream = _side_stream(buf.device)
    if ordered:
        stream.wait_stream(torch.cuda.current_stream(buf.device))
    with torch.cuda.stream(stream):
        if not _use_numba_gpu():
            # Without the prepared launch a Numba launch costs more than torch ops (see checksum_cuda).
            return [_checksum_torch(buf[o:o + n]) for o, n in zip(offs.tolist(), lens.tolist())]
        batch_sums = _gpu_module().batch_sums
        ptr = buf.data_ptr()
        aligned = (ptr + offs) % 8 == 0
        out = [0] * offs.shape[0]
        idx = np.flatnonzero(aligned)
        if idx.shape[0]:
            for i, v in zip(idx.tolist(), batch_sums(buf, offs[idx], lens[idx], stream)):
                out[i] = v
        for i in np.flatnonzero(~aligned).tolist():
            o, n = int(offs[i]), int(lens[i])
            out[i] = _checksum_torch(buf[o:o + n])
        return out
