"""Which bytes of vLLM's paged KV cache make a chunk, per KV cache group.

vLLM hands the worker canonical KV caches: unique int8 tensors
``[num_blocks, page]`` and, per offloaded KV cache group, one reference per
layer to them (vLLM's hybrid allocator lays the groups over one block pool,
so layers of different groups share tensors, and a block id belongs to one
group at a time). A chunk holds ``blocks_per_chunk`` consecutive blocks of
one group: per distinct tensor the group uses, each block's page (its
unpadded bytes), packed as the rows of an MLA-style ``[1, L, T, page]``
chunk. Groups may differ in page size (attention against Mamba state);
within a group every page has one size.

A transfer spec (``GPULoadStoreSpec``) lists per group the GPU block ids of
logically consecutive blocks starting at ``block_indices[g]``; vLLM leaves
out null blocks (sliding-window blocks that left the window, blocks a
Mamba group keeps no state for), so a group's list starts where its first
real block is. The load/store specs name each chunk's group in the same
order (``DiskLoadSpec.groups``/``DiskStoreSpec.groups``: the index of the
group among the offloaded ones, as in ``group_sizes``).

Invariant: ``chunk_blocks`` maps a block to exactly one chunk of its own
group, at its position inside that chunk; blocks past the chunks named are
dropped, never given to another group's chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ...errors import ShapeMismatchError

__all__ = ["GroupLayout", "group_layouts", "chunk_blocks"]


@dataclass
class GroupLayout:
    """The views of one KV cache group: ``views[i]`` is ``[num_blocks, 1, page]`` int8 (one per
    distinct tensor the group uses, in reference order)."""

    views: list[torch.Tensor]

    @property
    def page(self) -> int:
        return self.views[0].shape[-1]

    @property
    def block_bytes(self) -> int:
        """Bytes one block of this group adds to a chunk."""
        return len(self.views) * self.page

    def chunk_shape(self, nblocks: int) -> tuple:
        return (1, len(self.views), nblocks, self.page)


def group_layouts(kv_caches) -> list[GroupLayout]:
    """One ``GroupLayout`` per group of vLLM's canonical KV caches (``CanonicalKVCaches``).

    Raises ``ShapeMismatchError`` for a group the pack kernel cannot take as
    one paged cache (tensors of different page sizes, strides or devices).
    """
    out = []
    for g, refs in enumerate(kv_caches.group_data_refs):
        seen, views = set(), []
        for ref in refs:
            if ref.tensor_idx in seen:
                continue  # layers aliasing one tensor move once
            seen.add(ref.tensor_idx)
            t = kv_caches.tensors[ref.tensor_idx].tensor
            views.append(t[:, :ref.page_size_bytes].unsqueeze(1))
        if not views:
            raise ShapeMismatchError(f"KV cache group {g} has no tensors")
        v0 = views[0]
        for v in views:
            if v.shape != v0.shape or v.stride() != v0.stride() or v.device != v0.device:
                raise ShapeMismatchError(f"KV tensors of group {g} differ in page size or stride "
                                         f"({tuple(v.shape)} vs {tuple(v0.shape)}); gds_kvcache needs one "
                                         "uniform paged cache per group")
        out.append(GroupLayout(views))
    if not out:
        raise ShapeMismatchError("vLLM registered no KV cache group")
    devices = {layout.views[0].device for layout in out}
    if len(devices) != 1:
        raise ShapeMismatchError(f"KV cache groups on several devices ({sorted(map(str, devices))})")
    return out


def chunk_blocks(spec, chunk_groups: Optional[Sequence[int]], nchunks: int,
                 blocks_per_chunk: int) -> list[list[tuple[int, int]]]:
    """Per chunk of a job, ``(sub-block index, GPU block id)`` of its blocks in ``spec``.

    ``chunk_groups[j]`` is chunk ``j``'s group (None: every chunk in group 0,
    a spec of a one-group model). Group ``g``'s blocks are
    ``spec.block_ids`` from ``sum(group_sizes[:g])`` on, logically
    consecutive from block index ``block_indices[g]``; its chunks are the
    ones named for ``g``, in order, the first holding that block index.
    """
    groups = list(chunk_groups) if chunk_groups is not None else [0] * nchunks
    if len(groups) != nchunks:
        raise ShapeMismatchError(f"{nchunks} chunk(s) but {len(groups)} group entries in the spec")
    ids = [int(b) for b in spec.block_ids]
    sizes = list(spec.group_sizes) if spec.group_sizes is not None else [len(ids)]
    starts = [int(x) for x in spec.block_indices] if spec.block_indices is not None else [0] * len(sizes)
    if sum(sizes) != len(ids) or len(starts) != len(sizes):
        raise ShapeMismatchError(f"GPU spec has {len(ids)} block(s) for group sizes {sizes} and "
                                 f"{len(starts)} start(s)")
    by_group: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        if not 0 <= g < len(sizes):
            raise ShapeMismatchError(f"chunk {j} names group {g}; the GPU spec has {len(sizes)} group(s)")
        by_group.setdefault(g, []).append(j)
    out: list[list[tuple[int, int]]] = [[] for _ in range(nchunks)]
    off = 0
    for g, size in enumerate(sizes):
        mine = by_group.get(g, [])
        first = starts[g] // blocks_per_chunk
        for i, b in enumerate(ids[off:off + size]):
            j, sub = divmod(starts[g] + i, blocks_per_chunk)
            j -= first
            if j < len(mine):
                out[mine[j]].append((sub, b))
        off += size
    return out
