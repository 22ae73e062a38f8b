"""The GPU half of ``checksum``: a grid-stride sum with a shared-memory block reduction."""

from numba import cuda, uint64

from . import _numba_compat  # noqa: F401  (before the first compile)

__all__ = ["THREADS", "checksum_kernel"]

THREADS = 256


@cuda.jit(device=True, inline=True)
def _mix(w, i):
    h = (w ^ (i * uint64(0x9E3779B97F4A7C15))) * uint64(0xBF58476D1CE4E5B9)
    return h ^ (h >> uint64(31))


@cuda.jit(cache=True)
def checksum_kernel(words, nw, tail, ntail, nbytes, out):
    """Add ``sum mix(word_i, i)`` (+ tail and length terms, block 0) into ``out[0]``."""
    sm = cuda.shared.array(THREADS, dtype=uint64)
    tid = cuda.threadIdx.x
    s = uint64(0)
    i = cuda.blockIdx.x * THREADS + tid
    stride = cuda.gridDim.x * THREADS
    while i < nw:
        s += _mix(words[i], uint64(i))
        i += stride
    if cuda.blockIdx.x == 0 and tid == 0:
        n = nw
        if ntail > 0:
            w = uint64(0)
            for j in range(ntail):
                w |= uint64(tail[j]) << uint64(8 * j)
            s += _mix(w, uint64(nw))
            n += 1
        s += _mix(uint64(nbytes), uint64(n) + uint64(0x5157))
    sm[tid] = s
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            sm[tid] += sm[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        cuda.atomic.add(out, 0, sm[0])
