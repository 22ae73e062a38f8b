"""``DiskIndex``: which chunk lives where in the pool, in LRU order; recovery and compaction.

The index side of the disk tier. It owns the in-memory map of keys to pool
extents, the pool's free space, the puts in flight, the reader counts that
keep an extent alive while it is read, eviction order, and the on-disk log
(``IndexLog``, which alone owns the file format). It moves no chunk bytes and
needs no GPU and no I/O engine, so a scheduler process can run it alone.

Entries live as rows of NumPy arrays (``entry_table``, 44 bytes a chunk plus
its hash slot), in use order by a 4-byte stamp (``lru_clock``); the pool's
allocator does not record them one by one (``ExtentAllocator.untrack``). A
``DiskEntry`` is made only for a chunk a caller asks about and kept while it
is held (``entry_objects``): a reopen of millions of chunks makes no object
per chunk, and its memory is about 60 bytes a chunk.

Every method takes the index lock only for in-memory updates and, where a
record must be down before the state changes, one ``write`` of the records of
a whole batch (no fsync). Chunk I/O, hole punching and lookup-server calls
happen outside it, in the disk backend. Which logged chunks survive a reopen
is decided in ``recovery``, which chunk may be evicted in ``victims``, and
the index files' share of the disk budget is ``log_reserve``'s arithmetic:
helpers the index calls with its own state, taking no lock of their own.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import ClosedError, StorageFullError
from ..key import CacheEngineKey
from ..memory.extents import ExtentAllocator
from .entry import DiskEntry, key_hash
from .entry_objects import EntryObjects
from .entry_table import EntryTable
from .eviction import EvictionStrategy, FreeAtOnce
from .index_codec import BUILD_BLOCK
from .index_columns import EntryColumns
from .index_log import IndexLog
from .key_codes import KeyCodes
from .log_reserve import LogReserve
from .lru_clock import LruClock
from .pool_file import PoolDirectory
from .recovery import recover_entries, trim_heap
from .victims import largest_hole_without_unread, oldest_unread, unread_holding, unread_rows

__all__ = ["DiskIndex", "Reservation", "DiskEntry"]

log = logging.getLogger(__name__)


@dataclass
class Reservation:
    """Pool extents handed to one batch of puts, before their bytes are written."""

    keys: list
    offsets: list
    sizes: list
    errors: dict = field(default_factory=dict)   # key -> exception for keys refused outright


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
        self._table = EntryTable()                         # the live entries (their extents untracked)
        self._lru = LruClock()                             # their use order
        self._objs = EntryObjects(self._table)             # the objects callers hold; rows being read
        self._pending: dict[CacheEngineKey, int] = {}      # key -> extent of a put in flight
        self._cancelled: set[CacheEngineKey] = set()       # removed while their put was in flight
        self._lock = threading.Lock()
        self._events: deque = deque()                      # ("insert" | "remove", key) for the lookup server
        self._track = events
        self._freed_after_compaction: list[int] = []
        self._eviction = eviction if eviction is not None else FreeAtOnce()
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
        self._table = EntryTable(KeyCodes(got.tables))
        self._table.load(got.ops, got.live, got.packed)
        self._space.rebuild_untracked(got.starts, got.sizes, dict(self._holes))
        dropped, rewrite = got.dropped, got.rewrite
        del got        # the files' bytes and the load's columns: only the table's are kept
        trim_heap()
        self._objs = EntryObjects(self._table)
        n = len(self._table)
        self._lru.reset(n)
        migrate = not self._pool.checksums_keyed
        if migrate:
            # Written before checksums were bound to their keys: bind them now, once, in memory;
            # the snapshot below makes it durable and the layout file then says so. (A crash
            # between the two re-binds at the next open: every chunk a miss, never wrong bytes.)
            for s in range(0, n, BUILD_BLOCK):
                rows = np.arange(s, min(n, s + BUILD_BLOCK))
                names = (k.to_string().encode() for k in self._table.keys(rows))
                self._table.csum[rows] ^= np.fromiter(map(key_hash, names), np.uint64, count=rows.shape[0])
        if self._track and n:
            self._events.append(("inserts", self._table.key_batch(np.arange(n))))
        if rewrite or migrate:
            self._files.snapshot(self._columns())
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

    def _columns(self) -> EntryColumns:
        return self._table.columns(self._table.live_rows())

    # -- lookups -----------------------------------------------------------
    def contains(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return self._table.find(key) >= 0

    def prefix_length(self, keys: Sequence[CacheEngineKey]) -> int:
        """How many of ``keys``, from the first, are stored."""
        with self._lock:
            n = 0
            for k in keys:
                if self._table.find(k) < 0:
                    break
                n += 1
            return n

    def in_flight(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._pending

    def entry(self, key: CacheEngineKey) -> Optional[DiskEntry]:
        with self._lock:
            row = self._table.find(key)
            return None if row < 0 else self._objs.get(row, key)

    def keys(self) -> list[CacheEngineKey]:
        """Every stored key, least recently used first (made now: one object a key)."""
        with self._lock:
            return self._table.keys(self._lru.order(self._table.live_rows()))

    def __len__(self) -> int:
        return len(self._table)

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
        """Pool extents for the keys not yet stored or in flight (others are left out).

        The batch gets adjacent extents where one free region holds it (one
        transfer, interleaved over every pool file); otherwise each chunk its
        own. LRU chunks nobody reads are evicted to make room, but only once
        it is known that room can be made: a chunk that could never fit
        evicts nothing and is refused with the reason.
        """
        res = Reservation([], [], [])
        with self._lock:
            if self._closed:
                raise ClosedError("disk index is closed")
            want: list[tuple[CacheEngineKey, int]] = []
            seen = set()
            for k, n in zip(keys, sizes):
                if k in self._pending or k in seen or self._table.find(k) >= 0:
                    continue
                seen.add(k)
                why = self._never_fits_locked(n)
                if why is not None:
                    res.errors[k] = StorageFullError(why)
                    continue
                want.append((k, n))
            offs = self._space.allocate_run([n for _, n in want]) if len(want) > 1 else None
            if offs is not None:
                for (k, n), off in zip(want, offs):
                    res.keys.append(k)
                    res.offsets.append(off)
                    res.sizes.append(n)
            else:
                for k, n in want:
                    off = self._allocate_evicting_locked(n)
                    if off is None:
                        res.errors[k] = StorageFullError(
                            f"no room for a {n}-byte chunk in the {self.capacity}-byte pool "
                            f"({self.capacity - self.used} bytes free, the largest free run "
                            f"{self._space.largest_free()} bytes): the rest is held by puts in flight "
                            "and chunks being read" + ("" if self._eviction.evicts_inline else
                                                       " or leased by other processes"))
                        continue
                    res.keys.append(k)
                    res.offsets.append(off)
                    res.sizes.append(n)
            for k, off in zip(res.keys, res.offsets):
                self._pending[k] = off
        return res

    def _never_fits_locked(self, nbytes: int) -> Optional[str]:
        if nbytes > self.capacity:
            return (f"a {nbytes}-byte chunk can never fit the {self.capacity}-byte pool "
                    "(max_local_disk_size less the index reserve)")
        return None

    def _allocate_evicting_locked(self, nbytes: int) -> Optional[int]:
        off = self._space.allocate(nbytes)
        if off is not None or not self._eviction.evicts_inline:
            return off
        # Evict only if that can work: the pool must have a hole of nbytes
        # once every chunk nobody reads is gone (in-flight puts and chunks
        # being read stay where they are).
        if largest_hole_without_unread(self._space, self._table, self._objs.pinned) < nbytes:
            return None
        for victim in unread_rows(self._lru, self._objs.pinned):
            self._drop_locked(victim, free=True)
            self.stats["evictions"] += 1
            off = self._space.allocate(nbytes)
            if off is not None:
                return off
        return None

    def commit(self, done: Sequence[DiskEntry], failed: Sequence[CacheEngineKey]) -> list[CacheEngineKey]:
        """Make written chunks visible (one index append for all); free failed ones' extents.

        Returns the keys made visible (a key removed while in flight is not).
        If the append fails, nothing changes and the caller calls ``abort``.
        """
        with self._lock:
            for k in failed:
                self._release_pending_locked(k)
            visible = []
            for e in done:
                assert self._pending.get(e.key) == e.offset, f"commit of {e.key} without its reservation"
                if e.key in self._cancelled:
                    self._release_pending_locked(e.key)
                else:
                    visible.append(e)
            if visible:
                self._make_index_room_locked(len(visible))
                self._log.append(puts=visible)
                for e in visible:
                    del self._pending[e.key]
                    self._space.untrack(e.offset)
                    self._insert_locked(e)
                    if self._track:
                        self._events.append(("insert", e.key))
            return [e.key for e in visible]

    def _insert_locked(self, e: DiskEntry) -> None:
        codes = self._table.codes
        kind = codes.kind_of(e.key, (tuple(e.shape), e.dtype, e.fmt))    # validated by the append
        row = self._table.insert(codes.probe(e.key), kind, e.offset, e.phys_size, e.checksum, e.seq)
        self._lru.touch(row)

    def abort(self, keys: Iterable[CacheEngineKey]) -> None:
        """Give back the extents of puts that will not be committed."""
        with self._lock:
            for k in keys:
                self._release_pending_locked(k)

    def _release_pending_locked(self, key: CacheEngineKey) -> None:
        off = self._pending.pop(key, None)
        self._cancelled.discard(key)
        if off is not None:
            self._space.free_extent(off)

    def _make_index_room_locked(self, adding: int) -> None:
        """Keep index files within their reserve: compact when dead records pile up, and evict
        LRU chunks when even the live index would not fit (many tiny chunks)."""
        if self._files.has_room(adding):
            return
        live = len(self._table)
        # A strategy that does not evict inline evicts ahead of the put (``over_reserve``).
        while live and self._eviction.evicts_inline and not self._files.fits(live + adding):
            victim = oldest_unread(self._lru, self._objs.pinned)
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
        self._files.snapshot(self._columns())
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
                row = self._table.find(k)
                if row < 0:
                    out.append(None)
                    continue
                out.append(self._objs.pin(row, k))
                self._lru.touch(row)
        return out

    def end_read(self, entries: Iterable[DiskEntry], bad: Iterable[DiskEntry] = ()) -> None:
        """Unpin ``entries``; drop those in ``bad`` (unreadable or corrupt) if still current."""
        bad = list(bad)
        with self._lock:
            for e in bad:
                row = self._objs.row_of(e)
                if row >= 0:
                    self._drop_locked(row, free=True, given=e)
            for e in entries:
                e.readers -= 1
                assert e.readers >= 0, f"negative reader count on {e.key}"
                if e.readers == 0:
                    if e.doomed:
                        self._release_locked(e)
                    else:
                        self._objs.unpin(e)

    # -- removal -------------------------------------------------------------
    def _drop_locked(self, row: int, free: bool, record: bool = True, given: Optional[DiskEntry] = None) -> DiskEntry:
        """Forget a live row: delete record first (unless the caller writes it), then (unless read
        now, or ``free`` is False) release its extent. Returns its entry (``given`` where that is it)."""
        if record:
            self._log.append(dels=[self._table.key(row) if given is None else given.key])
        e = self._objs.drop(row, given)
        self._table.remove(row)
        self._lru.forget(row)
        self._space.track(e.offset, e.phys_size)     # allocated until released
        if self._track:
            self._events.append(("remove", e.key))
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
            if key in self._pending:
                self._cancelled.add(key)
                return True, None
            deferred = not self._eviction.evicts_inline
            row = self._table.find(key)
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
            victim = oldest_unread(self._lru, self._objs.pinned)
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
            return [self._objs.get(r) for r in unread_holding(self._table, self._lru, self._objs.pinned, nbytes,
                                                                count)]

    def evict(self, entries: Sequence[DiskEntry]) -> list[DiskEntry]:
        """Drop those of ``entries`` that are still current and unread, with one delete append.

        Returns the entries dropped (retired or freed, as the strategy says)."""
        with self._lock:
            if self._closed:
                raise ClosedError("disk index is closed")
            rows: dict[int, DiskEntry] = {}
            for e in entries:
                row = self._objs.row_of(e)
                if row >= 0 and e.readers == 0 and row not in self._objs.pinned:
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
            live = len(self._table)
        return self._files.excess(live, adding)

    # -- lookup-server events -------------------------------------------------
    def track_events(self, on: bool) -> None:
        """Start (or stop) keeping inserts/removals for ``drain_events``."""
        with self._lock:
            self._track = on
            if not on:
                self._events.clear()

    def has_events(self) -> bool:
        return bool(self._events)

    def drain_events(self) -> list[tuple[str, CacheEngineKey]]:
        """Inserts and removals since the last call, in order (for the lookup server)."""
        out = []
        while True:
            try:
                ev = self._events.popleft()
            except IndexError:
                return out
            if ev[0] == "inserts":     # the chunks recovered at open, keys made only now
                out.extend(("insert", k) for k in ev[1]())
            else:
                out.append(ev)

    # -- shutdown --------------------------------------------------------------
    def memcheck(self) -> bool:
        with self._lock:
            offs, sizes = self._table.extents(self._table.live_rows())
            self._space.memcheck(untracked=zip(offs.tolist(), sizes.tolist()))
            self._table.check()
            self._objs.check()
            ext = self._space.extents()
            for k, off in self._pending.items():
                assert off in ext, f"pending put {k} extent not allocated"
        return True

    def close(self) -> None:
        """Close the log (idempotent), compacting it first if it holds dead records."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._log.records != len(self._table):
                    self._files.compact_at_close(self._columns(), self._pool.path)
            finally:
                self._log.close()
