"""Which chunks a disk index may evict: LRU order, never one being read.

Functions over the index's rows (``entry_table``), their use order
(``lru_clock``) and the rows read now (``pinned``: row -> entry). Invariants:
nothing here ever names a pinned row (a chunk being read is never evicted
under its reader), every list keeps LRU order, and nothing is changed: the
caller holds the index lock and drops what these name.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from ..memory.extents import ExtentAllocator
from .entry import DiskEntry
from .entry_table import EntryTable
from .lru_clock import LruClock

__all__ = ["oldest_unread", "unread_rows", "unread_holding", "largest_hole_without_unread"]


def unread_rows(lru: LruClock, pinned: Mapping[int, DiskEntry]) -> Iterator[int]:
    """Every row nobody reads, oldest first (lazily: rows dropped meanwhile are skipped)."""
    return (r for r in lru.walk() if r not in pinned)


def oldest_unread(lru: LruClock, pinned: Mapping[int, DiskEntry]) -> int:
    """The least recently used row nobody reads, or -1."""
    return next(unread_rows(lru, pinned), -1)


def unread_holding(table: EntryTable, lru: LruClock, pinned: Mapping[int, DiskEntry], nbytes: int,
                   count: int = 0) -> list[int]:
    """Rows nobody reads, oldest first, until they hold ``nbytes`` and number at least
    ``count`` (fewer if there are no more)."""
    out: list[int] = []
    got = 0
    for r in unread_rows(lru, pinned):
        if got >= nbytes and len(out) >= count:
            break
        out.append(r)
        got += table.extent(r)[1]
    return out


def largest_hole_without_unread(space: ExtentAllocator, table: EntryTable, pinned: Mapping[int, DiskEntry]) -> int:
    """The largest free run ``space`` would have if every chunk nobody reads were evicted.

    What stays is what ``space`` tracks (puts in flight, extents dropped but not
    yet free, holes) and the extents of rows being read: never the live rows.
    """
    stay = space.extents()
    stay.update(table.extent(r) for r in pinned)
    best, pos = 0, 0
    for o, n in sorted(stay.items()):
        best = max(best, o - pos)
        pos = max(pos, o + n)
    return max(best, space.capacity - pos)
