"""Pack/unpack of paged KV on the CPU: ``@njit(parallel=True)``, one row per iteration."""

from __future__ import annotations


from numba import njit, prange

__all__ = ["pack_rows_cpu", "unpack_rows_cpu"]


@njit(parallel=True, cache=True)
def pack_rows_cpu(src, layer_off, stride_kv, stride_blk, stride_tok, block_size, slots, dst, kv, nl, nt, row):
    """``dst[(k*L + l)*T + t]`` row <- paged row of slot ``slots[t]``; all offsets in words."""
    for r in prange(kv * nl * nt):
        t = r % nt
        slot = slots[t]
        if slot < 0:
            continue
        kl = r // nt
        l = kl % nl
        k = kl // nl
        blk = slot // block_size
        s = layer_off[l] + k * stride_kv + blk * stride_blk + (slot - blk * block_size) * stride_tok
        d = r * row
        dst[d:d + row] = src[s:s + row]


@njit(parallel=True, cache=True)
def unpack_rows_cpu(src, layer_off, stride_kv, stride_blk, stride_tok, block_size, slots, dst, kv, nl, nt, row):
    """Paged row of slot ``slots[t]`` <- ``dst[(k*L + l)*T + t]`` row (``src`` is the paged side)."""
    for r in prange(kv * nl * nt):
        t = r % nt
        slot = slots[t]
        if slot < 0:
            continue
        kl = r // nt
        l = kl % nl
        k = kl // nl
        blk = slot // block_size
        s = layer_off[l] + k * stride_kv + blk * stride_blk + (slot - blk * block_size) * stride_tok
        d = r * row
        src[s:s + row] = dst[d:d + row]


