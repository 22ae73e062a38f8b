"""Pack/unpack of paged KV on the GPU: ``@cuda.jit``, all layers in one launch.

Grid: ``y`` = (kv, layer) pair, ``x`` = groups of tokens; block: ``x``
threads stride over a row's words, ``y`` picks a token. Row offsets inside a
layer come precomputed per token (``tok_off``, -1 for a skipped slot), so
the loop does no integer division, and each thread issues four loads before
its four stores to keep enough bytes in flight.
"""

from __future__ import annotations

from numba import cuda

from . import _numba_compat  # noqa: F401  (before the first compile)

__all__ = ["pack_rows_cuda", "unpack_rows_cuda"]


@cuda.jit(cache=True)
def pack_rows_cuda(src, layer_off, stride_kv, tok_off, dst, kv, nl, nt, row):
    kl = cuda.blockIdx.y
    k = kl // nl
    base = layer_off[kl - k * nl] + k * stride_kv
    bx = cuda.blockDim.x
    t = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    step = cuda.gridDim.x * cuda.blockDim.y
    while t < nt:
        off = tok_off[t]
        if off >= 0:
            s = base + off
            d = (kl * nt + t) * row
            i = cuda.threadIdx.x
            while i + 3 * bx < row:
                a = src[s + i]
                b = src[s + i + bx]
                c = src[s + i + 2 * bx]
                e = src[s + i + 3 * bx]
                dst[d + i] = a
                dst[d + i + bx] = b
                dst[d + i + 2 * bx] = c
                dst[d + i + 3 * bx] = e
                i += 4 * bx
            while i < row:
                dst[d + i] = src[s + i]
                i += bx
        t += step


@cuda.jit(cache=True)
def unpack_rows_cuda(src, layer_off, stride_kv, tok_off, dst, kv, nl, nt, row):
    kl = cuda.blockIdx.y
    k = kl // nl
    base = layer_off[kl - k * nl] + k * stride_kv
    bx = cuda.blockDim.x
    t = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    step = cuda.gridDim.x * cuda.blockDim.y
    while t < nt:
        off = tok_off[t]
        if off >= 0:
            s = base + off
            d = (kl * nt + t) * row
            i = cuda.threadIdx.x
            while i + 3 * bx < row:
                a = dst[d + i]
                b = dst[d + i + bx]
                c = dst[d + i + 2 * bx]
                e = dst[d + i + 3 * bx]
                src[s + i] = a
                src[s + i + bx] = b
                src[s + i + 2 * bx] = c
                src[s + i + 3 * bx] = e
                i += 4 * bx
            while i < row:
                src[s + i] = dst[d + i]
                i += bx
        t += step
