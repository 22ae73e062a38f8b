"""The load/store specs of fleet mode: where each chunk lies when several vLLM instances share a directory.

In fleet mode a shard's chunks may lie in any instance's writer directory,
so a load spec names, per shard and chunk, the pool it is read from
(``sources`` -> ``pools``), and a store spec names the directory each shard
writes (this instance's own writer directory). The scheduler resolved every
pool from Redis before the job: workers never talk to Redis.

Invariant: a chunk read from a pool that is not this instance's own is
trusted only if its checksum matched before ``deadline`` (wall-clock
seconds), the end of the Redis leases the scheduler took for it; after it,
its writer may be reusing the extent, and the chunk is recomputed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .specs import DiskLoadSpec, DiskStoreSpec

__all__ = ["FleetLoadSpec", "FleetStoreSpec", "PoolRef"]


class PoolRef(NamedTuple):
    """A writer directory's pool as a load reads it (``PoolLayout`` fields; ``own``: this instance's)."""

    path: str
    stripes: int
    stripe_bytes: int
    unit: int
    boot: str
    own: bool


class FleetStoreSpec(DiskStoreSpec):
    """A ``DiskStoreSpec`` whose shard ``s`` writes into ``dirs[s]`` (this instance's writer directory)."""

    def __init__(self, token: str, extents: list, dirs: list[str], groups: Optional[list] = None):
        super().__init__(token, extents, groups)
        self.dirs = dirs


class FleetLoadSpec(DiskLoadSpec):
    """A ``DiskLoadSpec`` whose chunk ``i`` of shard ``s`` is read from ``pools[sources[s][i]]``.

    ``deadline`` (``time.time()`` seconds, None: no chunk of another
    instance) ends the trust in chunks of other instances' pools.
    """

    def __init__(self, token: str, chunks: list, sources: list[list[Optional[int]]], pools: list[PoolRef],
                 deadline: Optional[float], groups: Optional[list] = None):
        super().__init__(token, chunks, groups)
        self.sources = sources
        self.pools = pools
        self.deadline = deadline
