"""The load/store specs the scheduler side hands the workers (pickled across processes).

They subclass vLLM's ``LoadStoreSpec`` where vLLM is installed; without it
(a GPU test machine driving the worker directly) a plain base stands in, so
the worker's data path can run without vLLM.
"""

from __future__ import annotations

from typing import Optional

try:
    from vllm.v1.kv_offload.base import LoadStoreSpec
except ImportError:  # vLLM absent: only the worker's data path is used
    class LoadStoreSpec:  # type: ignore[no-redef]
        """Stand-in for vLLM's marker base class."""

__all__ = ["DiskStoreSpec", "DiskLoadSpec"]


class DiskStoreSpec(LoadStoreSpec):
    """Where a store job writes: per shard, ``(key, offset, phys_size)`` of each chunk in
    ``keys_to_store`` order. ``token`` names the job's result file (see ``channel``)."""

    def __init__(self, token: str, extents: list[list[tuple[str, int, int]]]):
        self.token = token
        self.extents = extents

    def __repr__(self) -> str:
        return f"DiskStoreSpec({self.token}, {len(self.extents[0]) if self.extents else 0} chunk(s))"


class DiskLoadSpec(LoadStoreSpec):
    """What a load job reads: per shard, per chunk ``(key, offset, nbytes, phys_size, shape, checksum)``,
    or None for a chunk the index no longer has (the worker fails its blocks)."""

    def __init__(self, token: str, chunks: list[list[Optional[tuple]]]):
        self.token = token
        self.chunks = chunks

    def __repr__(self) -> str:
        return f"DiskLoadSpec({self.token}, {len(self.chunks[0]) if self.chunks else 0} chunk(s))"
