"""Opening a cache directory for the disk tier, all or nothing.

``open_pool`` locks the directory, recovers its index, opens the I/O engine
over the pool files and gives interrupted writes' blocks back. Invariants: on
any failure every step already done is undone (engine and index closed) and
the directory lock is released before the original error propagates; the
eviction strategy is attached to the index before recovery; holes are punched
only once the engine says punching is safe, and only by a strategy that
evicts inline (a deferring owner reuses the free extents later instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from ..config import CacheEngineConfig
from ..io import IOEngine, open_engine
from ..memory.allocator import MemoryAllocatorInterface
from .disk_index import DiskIndex
from .eviction import EvictionStrategy
from .holes import HolePuncher
from .pool_file import PoolDirectory, index_reserve

__all__ = ["OpenPool", "open_pool"]

log = logging.getLogger(__name__)


@dataclass
class OpenPool:
    """What an open cache directory consists of."""

    dir: PoolDirectory
    index: DiskIndex
    engine: IOEngine        # attached to the allocator's slab
    holes: HolePuncher


def open_pool(config: CacheEngineConfig, allocator: MemoryAllocatorInterface, eviction: EvictionStrategy,
              events: bool) -> OpenPool:
    """Open ``config.local_disk`` over ``allocator``'s slab; ``events``: keep lookup-server events."""
    pool = PoolDirectory(config.local_disk, config.disk_bytes, config.pool_files, config.preallocate)
    holes = HolePuncher(pool)
    index: Optional[DiskIndex] = None
    engine: Optional[IOEngine] = None
    try:
        index = DiskIndex(pool, index_reserve(config.disk_bytes), events=events, eviction=eviction)
        eviction.attach(index, holes.punch)
        free = index.recover()
        engine = open_engine(pool.pool_paths, config, allocator.kind, pool.stripe_bytes)
        engine.attach(allocator.buffer)
        holes.enabled = not config.preallocate and engine.punch_ok
        if eviction.evicts_inline:
            # A deferring owner frees only once other processes' leases on an extent ended,
            # which it cannot know yet: it reuses (and overwrites) the free extents later.
            holes.punch_free(free)
    except BaseException:
        _abort_open(pool, index, engine)
        raise
    return OpenPool(pool, index, engine, holes)


def _abort_open(pool: PoolDirectory, index: Optional[DiskIndex], engine: Optional[IOEngine]) -> None:
    try:
        if engine is not None:
            engine.close()
        if index is not None:
            index.close()
    except Exception as e:  # the original error is the one to report
        log.warning("cleanup after a failed open of %s: %s", pool.path, e)
    finally:
        pool.release()
