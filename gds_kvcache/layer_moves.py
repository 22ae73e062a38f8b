"""One layer of many chunk objects between the slab and a paged cache, through the public kernels.

A chunk object holds ``[K, Lo, T, row]``: ``Lo`` is every layer for a whole
chunk, 1 for a per-layer object. Moving layer ``l`` with one kernel call per
object would cost one launch per chunk and layer (4096 for a 32k-token
Llama-3-8B prompt, 30-60 us of host time each). Instead, objects that hold
consecutive chunks of one token count and lie back to back in the slab form a
*run*, and a run moves with one ``pack``/``unpack`` call per K/V half:

* the paged side is the half's ``[num_blocks, block_size, row]`` geometry
  (``kernels.layer_half``), which the kernels take as the ``mla`` layout (one
  kv, one layer; slot numbering is the cache's own), made once per cache and
  layer, so no call re-describes the cache or builds a device tensor;
* the chunk side is the run's bytes as ``[1, 1, rows, row]``;
* the slot mapping has one entry per row of the run: the token's slot on the
  rows of (half ``k``, layer ``lo``) and -1 on every other row. The kernels skip
  a negative slot before touching either side, so the other rows (the other
  half, the other layers, the alignment tail of each object) are never read
  or written.

Invariant: a call moves exactly the rows of layer ``layer`` of the chunks
given, at the slots given, and nothing else; work is queued on the current
CUDA stream (GPU) or done on return (host), as for ``pack``/``unpack``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch

from .kernels import PagedGeometry, geometry, layer_half, pack, unpack
from .memory.obj import MemoryObj

__all__ = ["layer_halves", "move_layer", "runs"]


@lru_cache(maxsize=4096)
def layer_halves(geom: PagedGeometry, layer: int) -> tuple[PagedGeometry, ...]:
    """Layer ``layer``'s K and V (one for ``mla``) of the cache ``geom`` as ``[num_blocks, block_size, row]``
    geometries, made once per cache and layer (no ``describe``, no tensor, no device copy)."""
    return tuple(layer_half(geom, layer, k) for k in range(geom.kv))


def runs(objs: Sequence[MemoryObj], chunks: Sequence[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run: objects of consecutive ``chunks`` indexes, one shape, each
    starting where the previous one's extent ends, extents a whole number of rows."""
    out: list[tuple[int, int]] = []
    for j, o in enumerate(objs):
        if out:
            first, n = out[-1]
            p = objs[j - 1]
            row_bytes = p.shape[-1] * p.dtype.itemsize
            if (chunks[j] == chunks[j - 1] + 1 and o.shape == p.shape and o.dtype == p.dtype
                    and o.phys_size == p.phys_size and o.phys_size % row_bytes == 0
                    and o.offset == p.offset + p.phys_size and o.slab is p.slab):
                out[-1] = (first, n + 1)
                continue
        out.append((j, 1))
    return out


def _run_view(objs: Sequence[MemoryObj], first: int, n: int) -> tuple[torch.Tensor, int]:
    """The run's bytes as ``[1, 1, rows, row]`` and the rows from one object's start to the next."""
    o = objs[first]
    row = o.shape[-1]
    if n == 1:
        rows = o.tensor.numel() // row
        return o.tensor.view(1, 1, rows, row), rows
    per = o.phys_size // (row * o.dtype.itemsize)
    raw = o.slab.tensor[o.offset:o.offset + n * o.phys_size]
    return raw.view(o.dtype).view(1, 1, n * per, row), per


def move_layer(objs: Sequence[MemoryObj], chunks: Sequence[int], starts: Sequence[int], slots: torch.Tensor,
               kv_caches, layout: str, layer: int, lo: int, to_chunk: bool, backend: str = "auto",
               geom: Optional[PagedGeometry] = None) -> int:
    """Pack (``to_chunk``) or unpack layer ``layer`` of the cache against layer ``lo`` of ``objs``.

    Parameters
    ----------
    objs
        Chunk objects ``[K, Lo, T, row]`` in chunk order (``chunks`` ascending).
    chunks, starts
        Per object, its chunk's index in the prompt and its first token.
    slots
        Int64 slots of the prompt's tokens on the cache's device (-1: skip the token).
    backend
        As for ``pack``: ``auto``, or ``cuda`` on host tensors for Numba's simulator.
    geom
        ``kv_caches``' geometry (``kernels.geometry``) when the caller has it.

    Returns the number of kernel calls made (two per run for K and V, one for MLA).
    """
    halves = layer_halves(geometry(layout, kv_caches) if geom is None else geom, layer)
    calls = 0
    for first, n in runs(objs, chunks):
        o = objs[first]
        kv, Lo, T, _ = o.shape
        view, per = _run_view(objs, first, n)
        body = kv * Lo * T
        s0 = starts[first]
        for k, half in enumerate(halves):
            sm = torch.full((view.shape[2],), -1, dtype=torch.int64, device=slots.device)
            sm.view(n, per)[:, :body].view(n, kv, Lo, T)[:, k, lo] = slots[s0:s0 + n * T].view(n, T)
            if to_chunk:
                pack(None, "mla", sm, view, backend=backend, check=False, geom=half)
            else:
                unpack(view, None, "mla", sm, backend=backend, check=False, geom=half)
            calls += 1
    return calls
