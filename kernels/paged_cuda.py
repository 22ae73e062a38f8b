"""Pack/unpack of paged KV on the GPU: ``@cuda.jit``, every layer in one launch.

Work is the flat list of rows ``r = (kv * L + layer) * T + token``; each warp
(a ``blockDim.x``-wide group of lanes) copies one row, and the grid has a
block per ``blockDim.y`` rows (see ``launch_grid``), so the hardware keeps
refilling multiprocessors as blocks finish. A persistent grid sized to the
resident block count was measured slower on an H200 (0.87 of a device copy
against 0.96, ``scripts/kernel_sweep.py``): each warp then copies its rows
one after another and only one row's loads are in flight per warp. A row's
start comes from its slot (``slot // block_size`` and the remainder, once
per row, not per word), and each lane issues eight loads before its eight
stores, to keep enough bytes in flight for HBM. Past ``MAX_GRID`` blocks,
warps loop over rows ``w, w + W, ...``.
"""

from __future__ import annotations

from numba import cuda

from . import _numba_compat  # noqa: F401  (before the first compile)

__all__ = ["MAX_GRID", "move_rows_cuda", "copy_rows", "launch_block", "launch_grid"]

MAX_GRID = 1 << 20


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


@cuda.jit(device=True, inline=True)
def row_offset(slots, r, nrows, nt, bs, sblk, stok, nslots):
    """Offset (in words, inside its layer) of row ``r``'s token, or -1 to skip it."""
    if r >= nrows:
        return -1
    s = slots[r % nt]
    if s < 0 or s >= nslots:
        return -1
    b = s // bs
    return b * sblk + (s - b * bs) * stok


@cuda.jit(cache=True)
def move_rows_cuda(paged, layer_off, slots, chunk, stride_kv, nl, nt, row, bs, sblk, stok, nslots, nrows,
                   to_chunk):
    """Pack (``to_chunk``: paged rows -> chunk) or unpack (chunk -> paged rows).

    Words throughout: ``paged`` spans all layers from the lowest layer address,
    ``layer_off[l]`` is layer ``l``'s start in it, ``stride_kv``/``sblk``/``stok``
    the K-to-V, block and token strides, ``row`` a row's length, ``nrows`` is
    ``kv * nl * nt``. Slots outside ``[0, nslots)`` are skipped.
    """
    bx = cuda.blockDim.x
    tx = cuda.threadIdx.x
    step = cuda.gridDim.x * cuda.blockDim.y
    r = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    off = row_offset(slots, r, nrows, nt, bs, sblk, stok, nslots)
    while r < nrows:
        nxt = r + step
        off_next = row_offset(slots, nxt, nrows, nt, bs, sblk, stok, nslots)
        if off >= 0:
            kl = r // nt
            k = kl // nl
            p = layer_off[kl - k * nl] + k * stride_kv + off
            if to_chunk:
                copy_rows(paged, p, chunk, r * row, row, tx, bx)
            else:
                copy_rows(chunk, r * row, paged, p, row, tx, bx)
        r = nxt
        off = off_next


def launch_block(row_words: int) -> tuple[int, int]:
    """Threads per block as (x, y): a warp per row (fewer lanes for rows under
    256 words, so no lane idles), 256 threads in all."""
    tx = min(32, max(4, 1 << max(0, (-(-row_words // 8) - 1).bit_length())))
    return tx, 256 // tx


def launch_grid(nrows: int, block: tuple[int, int], max_grid: int | None = None) -> int:
    """Blocks: one per ``block[1]`` rows, at most ``max_grid`` (default ``MAX_GRID``)."""
    return max(1, min(-(-nrows // block[1]), MAX_GRID if max_grid is None else max_grid))
