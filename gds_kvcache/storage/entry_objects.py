"""``EntryObjects``: the ``DiskEntry`` objects of a disk index's rows that callers hold.

The index keeps its entries as rows of arrays (``entry_table``); an object is
made for a row only when a caller asks for it, and kept while the caller
holds it: strongly while it is read (``readers`` > 0: a *pinned* row), weakly
otherwise. Invariants: a row has at most one object at a time, so a caller
that holds an entry sees the reader counts of every other caller and
``is`` compares it with what the index hands out later; a pinned row's object
has ``readers`` > 0; ``drop`` unlinks a row's object before the row is
reused. Not thread-safe (the index lock).
"""

from __future__ import annotations

import weakref
from typing import Optional

from ..key import CacheEngineKey
from .entry import DiskEntry
from .entry_table import EntryTable

__all__ = ["EntryObjects"]


class EntryObjects:
    """Objects of ``table``'s rows (see the module notes)."""

    def __init__(self, table: EntryTable):
        self.table = table
        self.pinned: dict[int, DiskEntry] = {}                    # row -> its object while read
        self._held: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # row -> its object

    def get(self, row: int, key: Optional[CacheEngineKey] = None) -> DiskEntry:
        """The object of a live row, made if no caller holds one (``key``: an equal key to reuse)."""
        e = self.pinned.get(row)
        if e is None:
            e = self._held.get(row)
            if e is None:
                e = self._held[row] = self.table.entry(row, key)
        return e

    def pin(self, row: int, key: CacheEngineKey) -> DiskEntry:
        """One more reader of a live row; its object."""
        e = self.get(row, key)
        e.readers += 1
        self.pinned[row] = e
        return e

    def row_of(self, e: DiskEntry) -> int:
        """The row ``e`` is the entry of, or -1 if it is not current (dropped, or its key put again)."""
        row = self.table.find(e.key)
        if row < 0 or self.table.seq_of(row) != e.seq:
            return -1
        held = self.pinned.get(row)
        return row if held is None or held is e else -1

    def unpin(self, e: DiskEntry) -> None:
        """``e`` (current, its readers just dropped to 0) is read no more."""
        row = self.row_of(e)
        if row >= 0 and self.pinned.get(row) is e:
            del self.pinned[row]

    def drop(self, row: int, given: Optional[DiskEntry] = None) -> DiskEntry:
        """Unlink the object of a row about to be removed; that object (``given``, or made now)."""
        e = self.pinned.pop(row, None)
        held = self._held.pop(row, None)
        if e is None:
            e = given if given is not None else held
        if e is None:
            e = self.table.entry(row)
        return e

    def check(self) -> bool:
        for row, e in self.pinned.items():
            assert e.readers > 0, f"pinned entry {e.key} has no reader"
            assert self.table.extent(row) == (e.offset, e.phys_size), f"pinned entry {e.key} is not its row's"
        return True
