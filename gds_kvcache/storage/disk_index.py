"""``DiskIndex``: which chunk lives where in the pool, in LRU order; recovery and compaction.

The index side of the disk tier. It owns the in-memory map of keys to pool
extents, the pool's free space, the puts in flight, the reader counts that
keep an extent alive while it is read, eviction order, and the on-disk log
(``IndexLog``, which alone owns the file format). It moves no chunk bytes and
needs no GPU and no I/O engine, so a scheduler process can run it alone.

The live chunks are ``live_entries``: rows of NumPy arrays (44 bytes a
chunk plus its hash slot) in use order (a 4-byte stamp), not recorded one by
one in the pool's allocator, with a ``DiskEntry`` made only for a chunk a
caller asks about: a reopen of millions of chunks makes no object per chunk
and keeps under 64 bytes a chunk (``scripts/bench_reopen.py``).

Every method takes the index lock only for in-memory updates and, where a
record must be down before the state changes, one ``write`` of the records of
a whole batch (no fsync). Chunk I/O, hole punching and lookup-server calls
happen outside it, in the disk backend. Which logged chunks survive a reopen
is decided in ``recovery``, which extent a put gets in ``reservations``, the
index files' share of the disk budget is ``log_reserve``'s arithmetic and the
lookup-server queue is ``index_events``: helpers the index calls with its own
state, taking no lock of their own.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable, Optional, Sequence

from ..errors import ClosedError
from ..key import CacheEngineKey
from ..memory.extents import ExtentAllocator
from .entry import DiskEntry
from .eviction import EvictionStrategy, FreeAtOnce
from .index_events import IndexEvents
from .index_log import IndexLog
from .live_entries import LiveEntries
from .log_reserve import LogReserve
from .pool_file import PoolDirectory
from .recovery import recover_entries, restore
from .reservations import Reservation, Reservations

__all__ = ["DiskIndex", "Reservation", "DiskEntry"]

log = logging.getLogger(__name__)


class DiskIndex:
    """Keys -> pool extents for one cache directory.

    Parameters
    ----------
    pool
        The locked directory and its file layout.
    reserve
        Bytes of the disk budget the index files may take (the pool has the rest).
    events
        Keep the ordered inserts/removals for ``drain_events`` (a lookup server).
    eviction
        When a dropped extent may be reused (``storage.eviction``): None is
        ``FreeAtOnce`` (the index evicts LRU chunks itself to make room and
        frees what it drops); a ``DeferredFree`` strategy never lets it evict
        by itself and keeps every extent it drops (``remove``, ``evict``, a
        bad chunk, the last reader of a removed chunk) until its owner frees
        it (shared mode retracts the chunk from Redis and waits out readers'
        leases first).

    Notes
    -----
    Visibility: a key is visible (``contains``) only after its put record is
    appended, which happens after its bytes are written. Removal: the delete
    record is appended before the extent can be reused, so a crash can never
    resurrect a key over another chunk's bytes. An extent being read is freed
    only when its last reader is done.
    """

    def __init__(self, pool: PoolDirectory, reserve: int, events: bool = True,
                 eviction: Optional[EvictionStrategy] = None):
        self._pool = pool
        self._reserve = reserve
        self._log = IndexLog(pool.path)
        self._files = LogReserve(self._log, reserve)        # the log's share of the disk budget
        self._space = ExtentAllocator(pool.capacity)
        self._holes = pool.holes()       # allocated for good: no file backs them
        self._live = LiveEntries(self._space)              # the chunks stored (their extents untracked)
        self._lock = threading.Lock()
        self._events = IndexEvents(events)                 # for the lookup server
        self._freed_after_compaction: list[int] = []
        self._eviction = eviction if eviction is not None else FreeAtOnce()
        self._puts = Reservations(self._space, lambda: self._live, sum(self._holes.values()),
                                  self._evict_row_locked if self._eviction.evicts_inline else None)
        self._closed = False
        self.stats = {"evictions": 0, "index_evictions": 0, "compactions": 0, "dropped_at_open": 0}

    # -- start-up --------------------------------------------------------
    def recover(self) -> list[tuple[int, int]]:
        """Load the log, keep the entries that fit the pool, snapshot them.

        Returns the free pool extents ``[(offset, size)]`` so the caller can
        give interrupted writes' blocks back to the file system.

        Raises
        ------
        IndexFormatError
            The index is of a newer or foreign format (left untouched).
        """
        got = recover_entries(self._log, self._pool, self._space.capacity)
        dropped, rewrite, migrate = got.dropped, got.rewrite, not self._pool.checksums_keyed
        # Written before checksums were bound to their keys: bound now, once, in memory; the
        # snapshot below makes it durable and the layout file then says so. (A crash between
        # the two re-binds at the next open: every chunk a miss, never wrong bytes.)
        self._live = LiveEntries(self._space, restore(got, self._space, self._holes, bind_checksums=migrate))
        n = len(self._live)
        if n and self._events.on:
            self._events.add_inserts(self._live.table.key_batch(self._live.table.live_rows()))
        if rewrite or migrate:
            self._files.snapshot(self._live.columns())
            if migrate:
                self._pool.mark_checksums_keyed()
                log.info("index of %s: %d checksum(s) bound to their keys", self._pool.path, n)
        else:
            # A clean reopen: the log just continues (a snapshot of millions
            # of entries would double the restart time for nothing).
            self._files.preallocate()
        self.stats["dropped_at_open"] = dropped
        if dropped:
            log.warning("index of %s: %d unusable or out-of-pool record(s) dropped", self._pool.path, dropped)
        log.info("disk tier %s: %d chunk(s) recovered, %d of %d pool bytes used",
                 self._pool.path, n, self._space.used, self._space.capacity)
        return sorted(self._space.free_extents().items())  # holes are allocated: never listed

    # -- lookups -----------------------------------------------------------
    def contains(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return self._live.find(key) >= 0

    def prefix_length(self, keys: Sequence[CacheEngineKey]) -> int:
        """How many of ``keys``, from the first, are stored."""
        with self._lock:
            n = 0
            for k in keys:
                if self._live.find(k) < 0:
                    break
                n += 1
            return n

    def in_flight(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._puts.pending

    def entry(self, key: CacheEngineKey) -> Optional[DiskEntry]:
        with self._lock:
            row, e = self._live.lookup(key)
            return e if e is not None or row < 0 else self._live.get(row, key)

    def keys(self) -> list[CacheEngineKey]:
        """Every stored key, least recently used first (made now: one object a key)."""
        with self._lock:
            return self._live.keys()

    def __len__(self) -> int:
        return len(self._live)

    @property
    def used(self) -> int:
        return self._space.used - sum(self._holes.values())

    @property
    def capacity(self) -> int:
        return self._space.capacity - sum(self._holes.values())

    @property
    def index_bytes(self) -> int:
        return self._log.bytes

    # -- puts --------------------------------------------------------------
    def reserve(self, keys: Sequence[CacheEngineKey], sizes: Sequence[int]) -> Reservation:
        """Pool extents for the keys not yet stored or in flight (others are left out); LRU chunks
        nobody reads are evicted to make room where that can work (``reservations``)."""
        with self._lock:
            if self._closed:
                raise ClosedError("disk index is closed")
            return self._puts.reserve(keys, sizes)

    def _evict_row_locked(self, row: int) -> None:
        self._drop_locked(row, free=True)
        self.stats["evictions"] += 1

    def commit(self, done: Sequence[DiskEntry], failed: Sequence[CacheEngineKey]) -> list[CacheEngineKey]:
        """Make written chunks visible (one index append for all); free failed ones' extents.

        Returns the keys made visible (a key removed while in flight is not).
        If the append fails, nothing changes and the caller calls ``abort``.
        """
        with self._lock:
            for k in failed:
                self._puts.release(k)
            visible = [e for e in done if self._puts.take(e)]
            if visible:
                self._make_index_room_locked(len(visible))
                self._log.append(puts=visible)
                for e in visible:
                    self._puts.committed(e.key)
                    self._live.add(e)
                    self._events.add("insert", e.key)
            return [e.key for e in visible]

    def abort(self, keys: Iterable[CacheEngineKey]) -> None:
        """Give back the extents of puts that will not be committed."""
        with self._lock:
            for k in keys:
                self._puts.release(k)

    def _make_index_room_locked(self, adding: int) -> None:
        """Keep index files within their reserve: compact when dead records pile up, and evict
        LRU chunks when even the live index would not fit (many tiny chunks)."""
        if self._files.has_room(adding):
            return
        live = len(self._live)
        # A strategy that does not evict inline evicts ahead of the put (``over_reserve``).
        while live and self._eviction.evicts_inline and not self._files.fits(live + adding):
            victim = self._live.oldest_unread()
            if victim < 0:
                break
            # No delete record: the snapshot below leaves it out, and the
            # extent is reused only after that snapshot is down.
            e = self._drop_locked(victim, free=False, record=False)
            self._freed_after_compaction.append(e.offset)
            live -= 1
            self.stats["index_evictions"] += 1
        self._compact_locked()

    def _compact_locked(self) -> None:
        # Rare (after about as many dead records as live ones) and bounded by
        # the reserve; it runs under the lock so no append can slip between
        # the snapshot and the new log.
        self._files.snapshot(self._live.columns())
        self.stats["compactions"] += 1
        for off in self._freed_after_compaction:
            self._space.free_extent(off)
        self._freed_after_compaction.clear()

    # -- gets ---------------------------------------------------------------
    def begin_read(self, keys: Sequence[CacheEngineKey]) -> list[Optional[DiskEntry]]:
        """The entries of ``keys`` (None where absent), each pinned by one reader and marked recently used."""
        out: list[Optional[DiskEntry]] = []
        with self._lock:
            if self._closed:
                raise ClosedError("disk index is closed")
            for k in keys:
                row, e = self._live.lookup(k)
                out.append(None if row < 0 else self._live.pin(row, k, e))
        return out

    def end_read(self, entries: Iterable[DiskEntry], bad: Iterable[DiskEntry] = ()) -> None:
        """Unpin ``entries``; drop those in ``bad`` (unreadable or corrupt) if still current."""
        bad = list(bad)
        with self._lock:
            for e in bad:
                row = self._live.row_of(e)
                if row >= 0:
                    self._drop_locked(row, free=True, given=e)
            for e in entries:
                e.readers -= 1
                assert e.readers >= 0, f"negative reader count on {e.key}"
                if e.readers == 0:
                    if e.doomed:
                        self._release_locked(e)
                    else:
                        self._live.unpin(e)

    # -- removal -------------------------------------------------------------
    def _drop_locked(self, row: int, free: bool, record: bool = True, given: Optional[DiskEntry] = None) -> DiskEntry:
        """Forget a live row: delete record first (unless the caller writes it), then (unless read
        now, or ``free`` is False) release its extent. Returns its entry (``given`` where that is it)."""
        if record:
            self._log.append(dels=[self._live.table.key(row) if given is None else given.key])
        e = self._live.drop(row, given)
        self._events.add("remove", e.key)
        if e.readers > 0:
            e.doomed = True
        elif free:
            self._release_locked(e)
        return e

    def _release_locked(self, e: DiskEntry) -> None:
        """An extent no local reader uses any more: free now, or as the strategy says."""
        if self._eviction.retire(e):
            self._space.free_extent(e.offset)

    def remove(self, key: CacheEngineKey) -> tuple[bool, Optional[tuple[int, int]]]:
        """Forget ``key``. Returns (was there, extent to punch then ``free`` or None).

        The extent to punch is not reusable until ``free(offset)``, so the
        caller can give its blocks back to the file system outside the lock.
        """
        with self._lock:
            if self._puts.cancel(key):
                return True, None
            deferred = not self._eviction.evicts_inline
            row = self._live.find(key)
            if row < 0:
                return False, None
            e = self._drop_locked(row, free=deferred)
            if e.doomed or deferred:
                return True, None
            return True, (e.offset, e.phys_size)

    def evict_one(self) -> Optional[tuple[CacheEngineKey, int, int]]:
        """Drop the LRU chunk nobody reads (the file system is full); (key, offset, size) to punch then ``free``."""
        assert self._eviction.evicts_inline, "a deferring strategy evicts itself (eviction_candidates, evict)"
        with self._lock:
            victim = self._live.oldest_unread()
            if victim < 0:
                return None
            e = self._drop_locked(victim, free=False)
            self.stats["evictions"] += 1
            return e.key, e.offset, e.phys_size

    def free(self, offset: int) -> None:
        with self._lock:
            self._space.free_extent(offset)

    # -- eviction by a strategy that does not evict inline (DeferredFree) -----------
    def eviction_candidates(self, nbytes: int, count: int = 0) -> list[DiskEntry]:
        """LRU chunks nobody reads here, oldest first, until they hold ``nbytes`` and number at
        least ``count`` (fewer if the pool has no more). Nothing is dropped: see ``evict``."""
        with self._lock:
            return self._live.unread_holding(nbytes, count)

    def evict(self, entries: Sequence[DiskEntry]) -> list[DiskEntry]:
        """Drop those of ``entries`` that are still current and unread, with one delete append.

        Returns the entries dropped (retired or freed, as the strategy says)."""
        with self._lock:
            if self._closed:
                raise ClosedError("disk index is closed")
            rows: dict[int, DiskEntry] = {}
            for e in entries:
                row = self._live.row_of(e)
                if row >= 0 and e.readers == 0 and row not in self._live.pinned:
                    rows.setdefault(row, e)
            if rows:
                self._log.append(dels=[e.key for e in rows.values()])
            for row, e in rows.items():
                self._drop_locked(row, free=True, record=False, given=e)
            self.stats["evictions"] += len(rows)
            return list(rows.values())

    def over_reserve(self, adding: int) -> int:
        """How many chunks must go so that the index, with ``adding`` more, fits its reserve
        (what the index evicts by itself when its strategy evicts inline)."""
        with self._lock:
            live = len(self._live)
        return self._files.excess(live, adding)

    # -- lookup-server events -------------------------------------------------
    def track_events(self, on: bool) -> None:
        """Start (or stop) keeping inserts/removals for ``drain_events``."""
        with self._lock:
            self._events.track(on)

    def has_events(self) -> bool:
        return bool(self._events)

    def drain_events(self) -> list[tuple[str, CacheEngineKey]]:
        """Inserts and removals since the last call, in order (for the lookup server)."""
        return self._events.drain()     # the queue's pops are atomic; keys are made outside the lock

    # -- shutdown --------------------------------------------------------------
    def memcheck(self) -> bool:
        with self._lock:
            return self._live.check() and self._puts.check()

    def close(self) -> None:
        """Close the log (idempotent), compacting it first if it holds dead records."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._log.records != len(self._live):
                    self._files.compact_at_close(self._live.columns(), self._pool.path)
            finally:
                self._log.close()
