"""Pack/unpack of paged KV on the GPU: ``@cuda.jit``, all layers in one launch.

Grid: ``y`` = (kv, layer) pair, ``x`` = a few blocks per pair that loop over
tokens (a persistent grid sized to the GPU, so no block is launched for a
handful of bytes). Block: ``x`` threads stride over a row's words, ``y``
picks the token. Per-token row offsets come precomputed (``tok_off``, -1 for
a skipped slot) so the loop does no integer division; the next token's
offset is loaded before the current row is copied, and each thread issues
eight loads before its eight stores, to keep enough bytes in flight for HBM.
"""

from __future__ import annotations

from numba import cuda

from . import _numba_compat  # noqa: F401  (before the first compile)

__all__ = ["move_rows_cuda", "copy_rows"]


@cuda.jit(device=True, inline=True)
def copy_rows(src, s, dst, d, row, i, bx):
    """Copy words ``[i, row)`` with stride ``bx`` from ``src[s:]`` to ``dst[d:]``, eight in flight."""
    while i + 7 * bx < row:
        a0 = src[s + i]
        a1 = src[s + i + bx]
        a2 = src[s + i + 2 * bx]
        a3 = src[s + i + 3 * bx]
        a4 = src[s + i + 4 * bx]
        a5 = src[s + i + 5 * bx]
        a6 = src[s + i + 6 * bx]
        a7 = src[s + i + 7 * bx]
        dst[d + i] = a0
        dst[d + i + bx] = a1
        dst[d + i + 2 * bx] = a2
        dst[d + i + 3 * bx] = a3
        dst[d + i + 4 * bx] = a4
        dst[d + i + 5 * bx] = a5
        dst[d + i + 6 * bx] = a6
        dst[d + i + 7 * bx] = a7
        i += 8 * bx
    while i < row:
        dst[d + i] = src[s + i]
        i += bx


@cuda.jit(cache=True)
def move_rows_cuda(paged, layer_off, stride_kv, tok_off, chunk, kv, nl, nt, row, to_chunk):
    """Pack (``to_chunk``: paged rows -> chunk) or unpack (chunk -> paged rows)."""
    kl = cuda.blockIdx.y
    k = kl // nl
    base = layer_off[kl - k * nl] + k * stride_kv
    bx = cuda.blockDim.x
    tx = cuda.threadIdx.x
    step = cuda.gridDim.x * cuda.blockDim.y
    t = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    off = tok_off[t] if t < nt else -1
    while t < nt:
        nxt = t + step
        off_next = tok_off[nxt] if nxt < nt else -1
        if off >= 0:
            if to_chunk:
                copy_rows(paged, base + off, chunk, (kl * nt + t) * row, row, tx, bx)
            else:
                copy_rows(chunk, (kl * nt + t) * row, paged, base + off, row, tx, bx)
        t = nxt
        off = off_next
