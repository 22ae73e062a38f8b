"""Pack/unpack of paged KV on the CPU: ``@njit(parallel=True)``, one row per iteration.

Same arguments as ``paged_cuda.move_rows_cuda`` (all in copy words), so the
two targets are driven by one argument tuple.
"""

from __future__ import annotations

from numba import njit, prange

__all__ = ["move_rows_cpu"]


@njit(parallel=True, cache=True)
def move_rows_cpu(paged, layer_off, slots, chunk, stride_kv, nl, nt, row, bs, sblk, stok, nslots, nrows,
                  to_chunk):
    """Pack (``to_chunk``: paged rows -> chunk) or unpack (chunk -> paged rows)."""
    for r in prange(nrows):
        s = slots[r % nt]
        if s < 0 or s >= nslots:
            continue
        b = s // bs
        kl = r // nt
        k = kl // nl
        p = layer_off[kl - k * nl] + k * stride_kv + b * sblk + (s - b * bs) * stok
        d = r * row
        if to_chunk:
            chunk[d:d + row] = paged[p:p + row]
        else:
            paged[p:p + row] = chunk[d:d + row]
