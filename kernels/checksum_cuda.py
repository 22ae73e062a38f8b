"""The chunk checksum's word sum as one ``@cuda.jit`` kernel (see ``checksum`` for the hash).

Each thread sums ``mix(word_i, i)`` over a grid-stride loop, a block folds its
threads' sums in shared memory, and one atomic add per block lands in a
single uint64: one pass over the bytes and one launch. It is launched through
``launch.PreparedKernel``; through Numba's per-call dispatcher the launch
alone cost about 300 us from Python (and serialised I/O threads), which is
why the torch-ops version in ``checksum`` exists and remains the fallback.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import cuda

from . import _numba_compat  # noqa: F401  (before the first compile)
from .checksum import _K1, _K2, _S
from .launch import DeviceSpan, prepared

__all__ = ["checksum_words_cuda", "word_sum"]

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
