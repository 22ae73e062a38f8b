"""The chunk checksum's word sum as one ``@cuda.jit`` kernel (see ``checksum`` for the hash).

Each thread sums ``mix(word_i, i)`` over a grid-stride loop, a block folds its
threads' sums in shared memory, and one atomic add per block lands in a
single uint64: one pass over the bytes and one launch. It is launched through
``launch.PreparedKernel``; through Numba's per-call dispatcher the launch
alone cost about 300 us from Python (and serialised I/O threads), which is
why the torch-ops version in ``checksum`` exists and remains the fallback.

``checksum_batch_cuda`` does the same for many spans of one buffer in one
launch: each span is cut into tiles of equal word count, blocks take tiles
(grid-stride), and each tile adds its partial sum to its span's slot, so a
32 MiB span next to many 64 KiB ones still spreads over every SM.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import cuda

from . import _numba_compat  # noqa: F401  (before the first compile)
from .checksum import _K1, _K2, _S
from .launch import DeviceSpan, prepared

__all__ = ["checksum_words_cuda", "checksum_batch_cuda", "word_sum", "batch_descriptors", "batch_sums"]

_THREADS = 256


@cuda.jit(device=True, inline=True)
def _mix_dev(w, i):
    h = (w ^ (i * _K1)) * _K2
    return h ^ (h >> _S)


@cuda.jit(cache=True)
def checksum_words_cuda(words, nw, out):
    """``out[0] += sum(mix(words[i], i) for i < nw)`` modulo 2**64; blocks of 256 threads."""
    part = cuda.shared.array(256, np.uint64)
    tid = cuda.threadIdx.x
    i = cuda.blockIdx.x * cuda.blockDim.x + tid
    step = cuda.gridDim.x * cuda.blockDim.x
    acc = np.uint64(0)
    while i < nw:
        acc += _mix_dev(words[i], np.uint64(i))
        i += step
    part[tid] = acc
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            part[tid] += part[tid + s]
        cuda.syncthreads()
        s //= 2
    if tid == 0:
        cuda.atomic.add(out, 0, part[0])


_local = threading.local()


def _example():
    span = DeviceSpan(0, 1, np.uint64)
    return (span, 0, span)


def word_sum(ptr: int, nw: int, device, stream) -> int:
    """Sum of ``mix(word_i, i)`` over ``nw`` 8-byte words at device address ``ptr`` (8-byte aligned),
    computed on ``stream`` (a torch stream, current on this thread); waits for the 8-byte result."""
    import torch

    outs = getattr(_local, "outs", None)
    if outs is None:
        outs = _local.outs = {}
    out = outs.get(device)
    if out is None:
        out = outs[device] = torch.empty(1, dtype=torch.int64, device=device)
    out.zero_()
    grid = max(1, min(-(-nw // (_THREADS * 8)), 1024))
    kern = prepared(checksum_words_cuda, out.device, _example)
    kern((grid, 1, 1), (_THREADS, 1, 1), stream.cuda_stream, ((ptr, nw), nw, (out.data_ptr(), 1)))
    return int(out.item()) & ((1 << 64) - 1)


def available() -> bool:
    """Whether this kernel takes the prepared launch (else the torch-ops checksum is faster)."""
    from .launch import prepared_launch_available

    return prepared_launch_available()


# --- many spans, one launch -------------------------------------------------

_MIN_TILE = 2048  # words (16 KiB): 8 per thread, so the block's reduction is amortised
_TARGET_TILES = 1024  # about as many blocks as word_sum uses for one large span
_MAX_GRID = 4096


@cuda.jit(cache=True)
def checksum_batch_cuda(words, data, desc, nspans, tile, out):
    """``out[s] += checksum(span s)`` for every span, one launch; blocks of 256 threads.

    ``desc`` holds ``tile_start[nspans + 1] | woff[nspans] | nbytes[nspans]``:
    span ``s`` is ``nbytes[s]`` bytes from word ``woff[s]`` of ``words`` (byte
    ``8 * woff[s]`` of ``data``, the same memory) and owns tiles
    ``tile_start[s] <= t < tile_start[s + 1]`` of ``tile`` words each. The
    tile that starts a span also adds its tail word and length term, so
    ``out`` ends with the full checksum.
    """
    part = cuda.shared.array(256, np.uint64)
    tid = cuda.threadIdx.x
    ntiles = desc[nspans]
    t = cuda.blockIdx.x
    while t < ntiles:
        # The span owning tile t: the last s with tile_start[s] <= t (same for the whole block).
        lo = 0
        hi = nspans - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if desc[mid] <= t:
                lo = mid
            else:
                hi = mid - 1
        s = lo
        w0 = desc[nspans + 1 + s]
        n = desc[2 * nspans + 1 + s]
        nw = n // 8
        k = t - desc[s]
        start = k * tile
        end = min(start + tile, nw)
        i = start + tid
        acc = np.uint64(0)
        while i < end:
            acc += _mix_dev(words[w0 + i], np.uint64(i))
            i += cuda.blockDim.x
        if k == 0 and tid == 0:
            m = nw
            if nw * 8 < n:
                b0 = 8 * (w0 + nw)
                tw = np.uint64(0)
                for j in range(n - nw * 8):
                    tw |= np.uint64(data[b0 + j]) << np.uint64(8 * j)
                acc += _mix_dev(tw, np.uint64(nw))
                m = nw + 1
            acc += _mix_dev(np.uint64(n), np.uint64(m) + np.uint64(0x5157))
        part[tid] = acc
        cuda.syncthreads()
        r = cuda.blockDim.x // 2
        while r > 0:
            if tid < r:
                part[tid] += part[tid + r]
            cuda.syncthreads()
            r //= 2
        if tid == 0:
            cuda.atomic.add(out, s, part[0])
        cuda.syncthreads()  # part[] is rewritten by the next tile
        t += cuda.gridDim.x


def batch_descriptors(woffs: np.ndarray, lens: np.ndarray):
    """``(desc, tile, ntiles)`` for ``checksum_batch_cuda``: the int64 descriptor array followed by
    ``len(lens)`` zeroed result slots, the tile size in words and the tile count."""
    nspans = lens.shape[0]
    nws = lens // 8
    total = int(nws.sum())
    # Tiles sized by the whole batch: about _TARGET_TILES of them, so big spans
    # get many blocks and small ones at least one, whatever the mix.
    per = -(-total // _TARGET_TILES)
    tile = max(_MIN_TILE, -(-per // _THREADS) * _THREADS)
    tiles = np.maximum(-(-nws // tile), 1)
    desc = np.empty(4 * nspans + 1, dtype=np.int64)
    desc[0] = 0
    np.cumsum(tiles, out=desc[1:nspans + 1])
    desc[nspans + 1:2 * nspans + 1] = woffs
    desc[2 * nspans + 1:3 * nspans + 1] = lens
    desc[3 * nspans + 1:] = 0
    return desc, tile, int(desc[nspans])


def _batch_example():
    return (DeviceSpan(0, 1, np.uint64), DeviceSpan(0, 1, np.uint8), DeviceSpan(0, 1, np.int64), 0, 0,
            DeviceSpan(0, 1, np.uint64))


def _batch_scratch(device, n: int):
    """This thread's ``(device int64, pinned host int64)`` buffers of at least ``n`` elements. Reuse is
    safe: every batch waits for its own results before returning."""
    import torch

    bufs = getattr(_local, "batch", None)
    if bufs is None:
        bufs = _local.batch = {}
    cur = bufs.get(device)
    if cur is None or cur[0].numel() < n:
        size = max(n, 1024, 2 * cur[0].numel() if cur is not None else 0)
        cur = bufs[device] = (torch.empty(size, dtype=torch.int64, device=device),
                              torch.empty(size, dtype=torch.int64, pin_memory=True))
    return cur


def batch_sums(buf, offs: np.ndarray, lens: np.ndarray, stream) -> list:
    """Checksums of the 8-byte aligned spans ``(offs, lens)`` of the CUDA uint8 tensor ``buf``:
    one H2D copy of descriptors, one launch and one D2H copy on ``stream`` (current on this thread)."""
    ptr = buf.data_ptr()
    base = ptr - ptr % 8
    woffs = (ptr - base + offs) // 8
    desc, tile, ntiles = batch_descriptors(woffs, lens)
    nspans = lens.shape[0]
    dev_buf, host_buf = _batch_scratch(buf.device, desc.shape[0])
    m = desc.shape[0]
    host = host_buf[:m]
    host.numpy()[:] = desc
    dev = dev_buf[:m]
    dev.copy_(host, non_blocking=True)
    nbytes = ptr - base + buf.numel()
    kern = prepared(checksum_batch_cuda, buf.device, _batch_example)
    dptr = dev.data_ptr()
    kern((min(ntiles, _MAX_GRID), 1, 1), (_THREADS, 1, 1), stream.cuda_stream,
         ((base, nbytes // 8), (base, nbytes), (dptr, 3 * nspans + 1), nspans, tile,
          (dptr + 8 * (3 * nspans + 1), nspans)))
    res = host[3 * nspans + 1:]
    res.copy_(dev[3 * nspans + 1:], non_blocking=True)
    stream.synchronize()
    return res.numpy().view(np.uint64).tolist()
