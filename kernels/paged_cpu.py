"""Pack/unpack of paged KV on the CPU: ``@njit(parallel=True)``, one row per iteration.

Arguments are in copy words: ``paged`` spans every layer from the lowest
layer address, ``layer_off[l]`` is a layer's start in it, ``tok_off[t]`` the
offset of token ``t``'s row inside a layer (-1 for a skipped slot), and
``chunk`` is the chunk ``[K, L, T, row]``.
"""

from __future__ import annotations

from numba import njit, prange

__all__ = ["move_rows_cpu"]


@njit(parallel=True, cache=True)
def move_rows_cpu(paged, layer_off, stride_kv, tok_off, chunk, kv, nl, nt, row, to_chunk):
    """Pack (``to_chunk``: paged rows -> chunk) or unpack (chunk -> paged rows)."""
    for r in prange(kv * nl * nt):
        t = r % nt
        off = tok_off[t]
        if off < 0:
            continue
        kl = r // nt
        k = kl // nl
        s = layer_off[kl - k * nl] + k * stride_kv + off
        d = r * row
        if to_chunk:
            chunk[d:d + row] = paged[s:s + row]
        else:
            paged[s:s + row] = chunk[d:d + row]
