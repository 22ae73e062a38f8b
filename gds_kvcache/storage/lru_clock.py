"""``LruClock``: least-recently-used order of the disk index's rows, with no object per row.

Each row carries a 32-bit stamp, the value of a clock that ticks at every
use (a put's commit, a read); the LRU row is the live row with the smallest
stamp. Rather than keep rows ordered, the clock keeps a short *candidate
list*: the K smallest stamps (K = 1/32 of the rows, at least 1024) with the
rows that held them, sorted, made by one ``argpartition`` over all stamps
when the list runs out. A candidate whose row has a different stamp now
(used again, dropped, or reused) is stale and skipped; every row off the
list has a larger stamp than the list's last, and a use stamps a row
larger still, so the first fresh candidate is the LRU row. Finding the
oldest is amortized O(1): O(rows) once per K candidates used up.

Invariants: stamps of live rows are distinct and below the clock; a free
row's stamp is ``FREE``; when the clock would reach ``limit`` the live
stamps are renumbered 0..n-1 in the same order. The list covers the oldest
rows unless a walk rebuilt it past some of them (``_partial``), and then the
next walk starts from a full rebuild. Not thread-safe (the index lock).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["LruClock", "FREE"]

#: The stamp of a row with no entry.
FREE = 0xFFFFFFFF


class LruClock:
    """Use order of rows 0..n (see the module notes); ``limit``: the clock's ceiling (tests lower it)."""

    def __init__(self, limit: int = FREE):
        assert 2 <= limit <= FREE
        self.limit = limit
        self.clock = 0
        self._grow(1024)
        self._drop_candidates()

    def _grow(self, cap: int, keep: bool = True) -> None:
        old = getattr(self, "stamps", None)
        st = np.full(cap, FREE, np.uint32)
        if old is not None and keep:
            st[:old.shape[0]] = old
        self.stamps = st
        self._S = memoryview(st)

    def _drop_candidates(self) -> None:
        self._cand = memoryview(np.zeros(0, np.int64))       # rows
        self._cand_st = memoryview(np.zeros(0, np.uint32))   # their stamps when listed
        self._head = 0            # candidates before it are stale
        self._partial = False     # the list leaves out some oldest rows (a walk rebuilt it)

    # -- changes ----------------------------------------------------------------------------------
    def reset(self, n: int) -> None:
        """Rows 0..n-1 live, used in that order (a load gives rows in put order); no other row."""
        if n >= self.limit:
            raise OverflowError(f"{n} rows need more stamps than the clock's limit {self.limit}")
        self._grow(n + 1024, keep=False)        # grows by half when touched past it
        self.stamps[:n] = np.arange(n, dtype=np.uint32)
        self.clock = n
        self._drop_candidates()

    def touch(self, row: int) -> None:
        """``row`` was used now (or is new)."""
        if row >= self.stamps.shape[0]:
            self._grow(max(row + 1, self.stamps.shape[0] + (self.stamps.shape[0] >> 1)))
        if self.clock >= self.limit:
            self._renumber()
        self._S[row] = self.clock
        self.clock += 1

    def forget(self, row: int) -> None:
        """``row`` holds no entry any more."""
        self._S[row] = FREE

    def _renumber(self) -> None:
        st = self.stamps
        rows = np.flatnonzero(st != FREE)
        order = rows[np.argsort(st[rows], kind="stable")]
        if order.shape[0] >= self.limit:
            raise OverflowError(f"{order.shape[0]} rows need more stamps than the clock's limit {self.limit}")
        st[order] = np.arange(order.shape[0], dtype=np.uint32)
        self.clock = order.shape[0]
        self._drop_candidates()

    # -- order --------------------------------------------------------------------------------------
    def walk(self) -> Iterator[int]:
        """Live rows, least recently used first. Rows dropped while it runs are skipped; the
        caller uses (``touch``) no row before it is done with the walk."""
        if self._partial:
            self._rebuild(-1)
        i, last = self._head, -1
        S = self._S
        while True:
            if i >= len(self._cand):
                if not self._rebuild(last):
                    return
                self._partial = last >= 0
                i = 0
            r, st = self._cand[i], self._cand_st[i]
            if S[r] != st:            # stale
                if i == self._head:
                    self._head += 1
                i += 1
                continue
            last = st
            yield r
            i += 1

    def _rebuild(self, after: int) -> bool:
        """Candidates: the smallest stamps above ``after`` (-1: all), sorted; False if none."""
        st = self.stamps
        k = max(1024, st.shape[0] >> 5)
        if after < 0:
            # One partial sort over every stamp (free rows' are the largest): no masks, no gathers.
            rows = np.argpartition(st, k - 1)[:k] if st.shape[0] > k else np.arange(st.shape[0])
            rows = rows[st[rows] != FREE]
        else:
            rows = np.flatnonzero((st != FREE) & (st > after))
            if rows.shape[0] > k:
                rows = rows[np.argpartition(st[rows], k - 1)[:k]]
        rows = rows[np.argsort(st[rows], kind="stable")]
        self._cand, self._cand_st = memoryview(rows.astype(np.int64)), memoryview(st[rows])
        self._head = 0
        self._partial = False
        return bool(len(self._cand))

    def order(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` sorted least recently used first."""
        return rows[np.argsort(self.stamps[rows], kind="stable")]
