"""Which chunks a disk index may evict: LRU order, never one being read.

Pure functions over the index's ``OrderedDict`` of entries, oldest first
(``begin_read`` moves a chunk it reads to the end). Invariants: nothing here
ever names an entry with readers (a chunk being read is never evicted under
its reader), every list keeps LRU order, and nothing is changed: the caller
holds the index lock and drops what these name.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from ..key import CacheEngineKey
from ..memory.extents import ExtentAllocator
from .entry import DiskEntry

__all__ = ["oldest_unread", "unread_keys", "unread_holding", "still_unread", "largest_hole_without_unread"]


def oldest_unread(entries: Mapping[CacheEngineKey, DiskEntry]) -> Optional[CacheEngineKey]:
    """The least recently used key nobody reads, or None."""
    return next((k for k, e in entries.items() if e.readers == 0), None)


def unread_keys(entries: Mapping[CacheEngineKey, DiskEntry]) -> list[CacheEngineKey]:
    """Every key nobody reads, oldest first."""
    return [k for k, e in entries.items() if e.readers == 0]


def unread_holding(entries: Mapping[CacheEngineKey, DiskEntry], nbytes: int, count: int = 0) -> list[DiskEntry]:
    """Entries nobody reads, oldest first, until they hold ``nbytes`` and number at least
    ``count`` (fewer if there are no more)."""
    out: list[DiskEntry] = []
    got = 0
    for e in entries.values():
        if got >= nbytes and len(out) >= count:
            break
        if e.readers == 0:
            out.append(e)
            got += e.phys_size
    return out


def still_unread(picked: Sequence[DiskEntry], entries: Mapping[CacheEngineKey, DiskEntry]) -> list[DiskEntry]:
    """Those of ``picked`` still current in ``entries`` and still unread."""
    return [e for e in picked if entries.get(e.key) is e and e.readers == 0]


def largest_hole_without_unread(entries: Mapping[CacheEngineKey, DiskEntry], space: ExtentAllocator) -> int:
    """The largest free run ``space`` would have if every chunk nobody reads were evicted."""
    evictable = {e.offset for e in entries.values() if e.readers == 0}
    best, pos = 0, 0
    for o, n in sorted(space.extents().items()):
        if o in evictable:
            continue
        best = max(best, o - pos)
        pos = o + n
    return max(best, space.capacity - pos)
