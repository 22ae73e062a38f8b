"""Pack/unpack of paged KV on the CPU: ``@njit(parallel=True)``, one row per iteration.

Arguments are in copy words: ``src`` spans every layer from the lowest layer
address, ``layer_off[l]`` is a layer's start in it, ``tok_off[t]`` the
offset of token ``t``'s row inside a layer (-1 for a skipped slot), and
``dst`` is the chunk ``[K, L, T, row]``.
"""

from __future__ import annotations

from numba import njit, prange

__all__ = ["pack_rows_cpu", "unpack_rows_cpu"]


@njit(parallel=True, cache=True)
def pack_rows_cpu(src, layer_off, stride_kv, tok_off, dst, kv, nl, nt, row):
    for r in prange(kv * nl * nt):
        t = r % nt
        off = tok_off[t]
        if off < 0:
            continue
        kl = r // nt
        k = kl // nl
        s = layer_off[kl - k * nl] + k * stride_kv + off
        d = r * row
        dst[d:d + row] = src[s:s + row]


@njit(parallel=True, cache=True)
def unpack_rows_cpu(src, layer_off, stride_kv, tok_off, dst, kv, nl, nt, row):
    for r in prange(kv * nl * nt):
        t = r % nt
        off = tok_off[t]
        if off < 0:
            continue
        kl = r // nt
        k = kl // nl
        s = layer_off[kl - k * nl] + k * stride_kv + off
        d = r * row
        src[s:s + row] = dst[d:d + row]
