"""``LiveEntries``: a disk index's live chunks: rows, use order, the objects callers hold, victims.

One place for every per-chunk structure of ``DiskIndex``, so that adding or
dropping a chunk changes them all together:

* the rows (``entry_table``: arrays, found by key) and their use order
  (``lru_clock``);
* the pool allocator's view: a live chunk's extent is allocated but not
  recorded there one by one (``ExtentAllocator.untrack``); it is recorded
  again when the chunk is dropped, until its owner frees it;
* the ``DiskEntry`` objects: made for a row only when asked, kept while
  read (``readers`` > 0: the row is *pinned*) and for the ``RECENT`` rows
  last asked about or put, so a chunk put and read again, or read again and
  again, is not made anew each time, and a caller that holds one of those
  sees every reader count and ``is`` compares it with what the index hands
  out later (an object of a row asked about longer ago may be made again:
  it is then still current, by its seq, but not ``is`` the new one);
* the eviction order: the least recently used rows nobody reads (never a
  pinned one).

Not thread-safe: ``DiskIndex`` holds its lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Optional

import numpy as np

from ..key import CacheEngineKey
from ..memory.extents import ExtentAllocator
from .entry import DiskEntry
from .entry_table import EntryTable
from .index_columns import EntryColumns
from .lru_clock import LruClock

__all__ = ["LiveEntries", "RECENT"]

#: Objects kept for the rows last asked about or put (about 400 bytes each).
RECENT = 4096


class LiveEntries:
    """The live chunks of one index over ``space``, the pool's allocator (see the module notes)."""

    def __init__(self, space: ExtentAllocator, table: Optional[EntryTable] = None):
        self.space = space
        self.table = table if table is not None else EntryTable()
        self.lru = LruClock()
        self.lru.reset(len(self.table))        # a loaded table's rows are in put order
        self.pinned: dict[int, DiskEntry] = {}                                    # row -> its object while read
        self._recent: OrderedDict[CacheEngineKey, DiskEntry] = OrderedDict()      # the last RECENT asked about

    def __len__(self) -> int:
        return len(self.table)

    # -- objects --------------------------------------------------------------------------------
    def find(self, key: CacheEngineKey) -> int:
        """The row of ``key``, or -1."""
        e = self._recent.get(key)
        return e.row if e is not None else self.table.find(key)

    def lookup(self, key: CacheEngineKey) -> tuple[int, Optional[DiskEntry]]:
        """The row of ``key`` (-1 if none) and its object where one is at hand."""
        e = self._recent.get(key)
        return (e.row, e) if e is not None else (self.table.find(key), None)

    def get(self, row: int, key: Optional[CacheEngineKey] = None) -> DiskEntry:
        """The object of a live row, made if no caller holds one (``key``: an equal key to reuse)."""
        e = self.pinned.get(row)
        if e is None:
            e = self._recent.get(key if key is not None else self.table.key(row))
            if e is None:
                e = self.table.entry(row, key)
                e.row = row
                self._keep(e)
        return e

    def _keep(self, e: DiskEntry) -> None:
        r = self._recent
        r[e.key] = e
        if len(r) > RECENT:
            r.popitem(last=False)

    def pin(self, row: int, key: CacheEngineKey, e: Optional[DiskEntry] = None) -> DiskEntry:
        """One more reader of a live row (now its most recent use); its object (``e``, if at hand)."""
        if e is None:
            e = self.get(row, key)
        e.readers += 1
        self.pinned[row] = e
        self.lru.touch(row)
        return e

    def row_of(self, e: DiskEntry) -> int:
        """The row ``e`` is the entry of, or -1 if it is not current (dropped, or its key put again)."""
        r = e.row
        if r >= 0 and (self.pinned.get(r) is e or self._recent.get(e.key) is e):
            return r
        row = self.table.find(e.key)
        if row < 0 or self.table.seq_of(row) != e.seq:
            return -1
        held = self.pinned.get(row)
        return row if held is None or held is e else -1

    def unpin(self, e: DiskEntry) -> None:
        """``e`` (its readers just dropped to 0) is read no more."""
        r = e.row
        if r < 0 or self.pinned.get(r) is not e:
            r = self.row_of(e)
        if r >= 0 and self.pinned.get(r) is e:
            del self.pinned[r]

    # -- adding and dropping ------------------------------------------------------------------------
    def add(self, e: DiskEntry) -> None:
        """A committed put (its key not stored; its extent allocated and recorded in ``space``); ``e``
        becomes the row's object."""
        row = self.table.insert_entry(e)     # validated by the log's append
        self.space.untrack(e.offset)
        self.lru.touch(row)
        e.row = row
        self._keep(e)

    def drop(self, row: int, given: Optional[DiskEntry] = None) -> DiskEntry:
        """Forget a live row; its object (the one read now, else ``given``, else a recent one, else
        one made now), whose extent is recorded in ``space`` again (allocated until its owner frees it)."""
        pinned = self.pinned.pop(row, None)
        key = pinned.key if pinned is not None else given.key if given is not None else self.table.key(row)
        recent = self._recent.pop(key, None)
        e = pinned if pinned is not None else given if given is not None else recent
        if e is None:
            e = self.table.entry(row, key)
        for x in (pinned, given, recent, e):
            if x is not None:
                x.row = -1
        self.table.remove(row)
        self.lru.forget(row)
        self.space.track(e.offset, e.phys_size)
        return e

    # -- eviction order ------------------------------------------------------------------------------
    def unread_rows(self) -> Iterator[int]:
        """Every row nobody reads, least recently used first (lazily: rows dropped meanwhile are skipped)."""
        pinned = self.pinned
        return (r for r in self.lru.walk() if r not in pinned)

    def oldest_unread(self) -> int:
        """The least recently used row nobody reads, or -1."""
        return next(self.unread_rows(), -1)

    def unread_holding(self, nbytes: int, count: int = 0) -> list[DiskEntry]:
        """Entries nobody reads, oldest first, until they hold ``nbytes`` and number at least
        ``count`` (fewer if there are no more)."""
        out: list[DiskEntry] = []
        got = 0
        for r in self.unread_rows():
            if got >= nbytes and len(out) >= count:
                break
            out.append(self.get(r))
            got += out[-1].phys_size
        return out

    def largest_hole_without_unread(self) -> int:
        """The largest free run ``space`` would have if every chunk nobody reads were evicted.

        What stays is what ``space`` records (puts in flight, extents dropped but
        not yet free, holes) and the extents of rows being read.
        """
        stay = self.space.extents()
        stay.update(self.table.extent(r) for r in self.pinned)
        best, pos = 0, 0
        for o, n in sorted(stay.items()):
            best = max(best, o - pos)
            pos = max(pos, o + n)
        return max(best, self.space.capacity - pos)

    # -- in bulk ----------------------------------------------------------------------------------------
    def keys(self) -> list[CacheEngineKey]:
        """Every live key, least recently used first (made now)."""
        return self.table.keys(self.lru.order(self.table.live_rows()))

    def columns(self) -> EntryColumns:
        """The live entries as columns, in put order (what a snapshot writes)."""
        return self.table.columns(self.table.live_rows())

    def check(self) -> bool:
        """Assert the invariants (module notes) together with ``space``'s; O(rows)."""
        rows = self.table.live_rows()
        offs, sizes = self.table.extents(rows)
        self.space.memcheck(untracked=zip(offs.tolist(), sizes.tolist()))
        self.table.check()
        assert np.array_equal(np.sort(np.flatnonzero(self.lru.stamps[:self.table.top] != 0xFFFFFFFF)), rows), \
            "use order and rows differ"
        for k, e in self._recent.items():
            assert e.row >= 0 and self.table.find(e.key) == e.row and k == e.key, f"recent entry {e.key} is not its row's"
        for row, e in self.pinned.items():
            assert e.readers > 0 and e.row == row, f"pinned entry {e.key} has no reader or another row"
            assert self.table.extent(row) == (e.offset, e.phys_size), f"pinned entry {e.key} is not its row's"
        return True
