"""Pack/unpack of paged KV on the GPU: ``@cuda.jit``, all layers in one launch.

A block copies whole rows (one row = one token's K or V for one layer);
threads stride over the row's words so loads and stores are coalesced, and
each thread keeps two words in flight. Per-layer base addresses arrive as an
offsets array from one base pointer, so a launch covers every layer.
"""

from __future__ import annotations

from numba import cuda

__all__ = ["pack_rows_cuda", "unpack_rows_cuda"]


@cuda.jit
def pack_rows_cuda(src, layer_off, stride_kv, stride_blk, stride_tok, block_size, slots, dst, kv, nl, nt, row):
    nrows = kv * nl * nt
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    r = cuda.blockIdx.x
    while r < nrows:
        t = r % nt
        slot = slots[t]
        if slot >= 0:
            kl = r // nt
            l = kl % nl
            k = kl // nl
            blk = slot // block_size
            s = layer_off[l] + k * stride_kv + blk * stride_blk + (slot - blk * block_size) * stride_tok
            d = r * row
            i = tid
            while i + bd < row:
                a = src[s + i]
                b = src[s + i + bd]
                dst[d + i] = a
                dst[d + i + bd] = b
                i += 2 * bd
            if i < row:
                dst[d + i] = src[s + i]
        r += cuda.gridDim.x


@cuda.jit
def unpack_rows_cuda(src, layer_off, stride_kv, stride_blk, stride_tok, block_size, slots, dst, kv, nl, nt, row):
    nrows = kv * nl * nt
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    r = cuda.blockIdx.x
    while r < nrows:
        t = r % nt
        slot = slots[t]
        if slot >= 0:
            kl = r // nt
            l = kl % nl
            k = kl // nl
            blk = slot // block_size
            s = layer_off[l] + k * stride_kv + blk * stride_blk + (slot - blk * block_size) * stride_tok
            d = r * row
            i = tid
            while i + bd < row:
                a = dst[d + i]
                b = dst[d + i + bd]
                src[s + i] = a
                src[s + i + bd] = b
                i += 2 * bd
            if i < row:
                src[s + i] = dst[d + i]
        r += cuda.gridDim.x
