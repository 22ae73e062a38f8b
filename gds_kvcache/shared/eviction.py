"""``RetractThenFree``: shared mode's eviction strategy (retire -> retract from Redis -> free).

Other processes read this writer's extents under Redis leases, so the
writer's index never frees an extent by itself (``DeferredFree``). Every
extent it drops is retracted from Redis in the same Lua script that reads
its leases, and is reused only once the last lease ended (``quarantine``).
Eviction skips chunks others are reading (retract-if-unleased in one
script): their extents are free at once, since no lease can start on an
entry that is gone. While Redis is unreachable, or for one lease period
after it restarted (its leases were lost), no extent is reused.

A dropped chunk whose retraction fails (Redis unreachable) is still listed
for other processes: its extent is tombstoned (``storage.tombstone``) while
it is retired, so what a remove or a newer put replaced is a miss for every
reader from then on, never the old bytes; readers count such misses apart
from corruption.
"""

from __future__ import annotations

import logging
import threading
import time

from ..storage.eviction import DeferredFree
from ..storage.tombstone import write_tombstone
from .publisher import LEASE_MARGIN, Publisher

__all__ = ["RetractThenFree", "DiskEvictionError"]

log = logging.getLogger(__name__)


class DiskEvictionError(Exception):
    """An eviction's index record could not be written (the file system said why): not a Redis error."""

    def __init__(self, cause: OSError):
        super().__init__(str(cause))
        self.cause = cause


class RetractThenFree(DeferredFree):
    """Eviction for one writer of a shared directory.

    Parameters
    ----------
    lease_ttl
        Seconds a reader's lease lasts (how long an extent may stay leased).
    stats
        The shared backend's counters, updated in place.
    errors
        The exception types of an unreachable Redis.

    Notes
    -----
    ``bind`` hands it the publisher once the writer's backend is open (the
    strategy is made first, since the backend's index needs it).
    """

    def __init__(self, lease_ttl: float, stats: dict, errors: tuple):
        super().__init__()
        self.lease_ttl = lease_ttl
        self._stats = stats
        self._errors = errors
        self.pub: "Publisher | None" = None
        self._quarantine: list[tuple[float, object]] = []   # (monotonic release time, retired entry)
        self._q_lock = threading.Lock()
        self._retire_lock = threading.Lock()
        self._no_reuse_until = 0.0
        self._tombstoned: set[int] = set()    # offsets of retired extents tombstoned (reset when freed)
        self.layout = None                     # this writer's PoolLayout, set with ``bind``

    def bind(self, publisher: Publisher) -> None:
        self.pub = publisher
        self.layout = publisher.local.layout

    def leases_lost(self) -> None:
        """Redis restarted: every lease it held is gone, so no extent is reused for one lease period."""
        self._no_reuse_until = max(self._no_reuse_until, time.monotonic() + self.lease_ttl + LEASE_MARGIN)

    # -- retired extents ------------------------------------------------------------------
    def process_retired(self) -> None:
        """Retract the extents the index dropped (one round trip) and free those no reader
        leases; leased ones wait in quarantine. If Redis does not answer they stay retired."""
        pub = self.pub
        if pub is None:
            return
        with self._retire_lock:
            es = self.drain()
            if not es:
                return
            try:
                with pub.lock:
                    same, left = pub.redis.retract(pub.writer, pub.epoch,
                                                   [(e.key.to_string(), str(e.seq)) for e in es])
                if not same:
                    self.leases_lost()          # restarted: its leases are forgotten, not over
                    pub.dirty = True
            except BaseException:
                self._tombstone(es)
                self.requeue(es)
                raise
        self._stats["retracted"] += len(es)
        now = time.monotonic()
        free_now = []
        with self._q_lock:
            for e, ms in zip(es, left):
                until = max(self._no_reuse_until, now + ms / 1000 + LEASE_MARGIN if ms > 0 else 0.0)
                if until > now:
                    self._quarantine.append((until, e))
                    self._stats["leased_evictions"] += 1
                else:
                    free_now.append(e)
        for e in free_now:
            self.release(e)

    def _tombstone(self, es) -> None:
        """Make retired extents whose retraction failed unreadable as their chunks (under the
        retire lock: none of them can be freed and reused meanwhile)."""
        for e in es:
            if e.offset in self._tombstoned:
                continue
            try:
                write_tombstone(self.layout, e.offset)
            except OSError as exc:     # the checksum still guards it; the old version may be served
                log.warning("cannot tombstone the extent of dropped chunk %s: %s", e.key.to_string(), exc)
                continue
            self._tombstoned.add(e.offset)
            self._stats["tombstoned"] += 1

    def release(self, entry, punch=True) -> None:
        self._tombstoned.discard(entry.offset)
        super().release(entry, punch)

    def release_quarantine(self, all_due: bool = False) -> None:
        now = time.monotonic()
        with self._q_lock:
            due = [e for t, e in self._quarantine if all_due or t <= now]
            self._quarantine = [(t, e) for t, e in self._quarantine if not (all_due or t <= now)]
        for e in due:
            self.release(e)

    def quarantine_ends(self) -> float:
        """Monotonic time the last quarantined extent may be reused (0 if none)."""
        with self._q_lock:
            return max((t for t, _ in self._quarantine), default=0.0)

    def finish(self, writer: str) -> None:
        """At close: retract what was dropped, wait out the leases on it (at most one lease
        period), then free every quarantined extent (the index is closed next)."""
        try:
            self.process_retired()
        except self._errors as e:
            self._stats["redis_errors"] += 1
            log.warning("closing writer %s: Redis unreachable (%s); its next start waits out leases", writer, e)
        last = self.quarantine_ends()
        if last > time.monotonic():
            time.sleep(min(last - time.monotonic(), self.lease_ttl + LEASE_MARGIN))
        self.release_quarantine(all_due=True)

    # -- eviction -----------------------------------------------------------------------------
    def evict(self, need: int, count: int = 0) -> int:
        """Evict this writer's LRU chunks that no one reads, here or (by lease) elsewhere, until
        ``need`` bytes and ``count`` chunks went; returns how many went.

        Each round retracts its victims from Redis in one script that skips
        leased ones (a chunk others are reading is warm: it stays), then drops
        them here; their extents are free at once.
        """
        pub, idx = self.pub, self.index
        if pub is None or time.monotonic() < self._no_reuse_until:
            return 0
        skip: dict[int, object] = {}      # id -> a leased victim, left in place
        went = freed = 0
        for _ in range(8):
            victims = [e for e in idx.eviction_candidates(need - freed + sum(e.phys_size for e in skip.values()),
                                                          count - went + len(skip))
                       if id(e) not in skip]
            if not victims:
                break
            with pub.lock:
                same, left = pub.redis.retract(pub.writer, pub.epoch,
                                               [(e.key.to_string(), str(e.seq)) for e in victims], unleased=True)
                if not same:
                    self.leases_lost()
                    pub.dirty = True
                    break
                out = [e for e, ms in zip(victims, left) if ms == 0]
                skip.update((id(e), e) for e, ms in zip(victims, left) if ms > 0)
                try:
                    gone = idx.evict(out)
                except OSError as exc:
                    # The delete records could not be written (a full file system): nothing was
                    # dropped here, so what was retracted is published again and the put fails
                    # with the disk's error rather than a Redis one.
                    try:
                        pub.publish_current([e.key for e in out if idx.entry(e.key) is not None])
                    except self._errors:
                        pub.dirty = True          # the next housekeeping pass publishes them
                    raise DiskEvictionError(exc) from exc
                # Retracted but read here meanwhile (or replaced): publish it again.
                gone_ids = {id(e) for e in gone}
                back = [e.key for e in out if id(e) not in gone_ids and idx.entry(e.key) is not None]
                if back:
                    pub.publish_current(back)
            self._stats["shared_evictions"] += len(gone)
            self._stats["retracted"] += len(out)
            self._stats["leased_skips"] += len(victims) - len(out)
            went += len(gone)
            freed += sum(e.phys_size for e in gone)
            for e in self.take(gone):
                self.release(e)
            if freed >= need and went >= count:
                break
        return went

    def make_room(self, nbytes: int, adding: int, force: bool = False) -> None:
        """Free ``nbytes`` pool bytes and index room for ``adding`` chunks, evicting as needed
        (``force``: evict ``nbytes`` of unleased LRU chunks even if that many are free, in
        pieces); never raises (a put that still finds no room fails with the reason)."""
        idx = self.index
        try:
            self.release_quarantine()
            self.process_retired()
            short = nbytes if force else nbytes - (idx.capacity - idx.used)
            over = idx.over_reserve(adding)
            if short > 0 or over > 0:
                self.evict(max(0, short), over)
        except DiskEvictionError as e:   # the put meets the same disk and says so
            self._stats["evict_errors"] += 1
            log.warning("cannot evict: %s", e)
        except self._errors as e:     # no reuse without Redis: a reader may hold a lease
            self._stats["redis_errors"] += 1
            log.debug("no eviction while Redis is unreachable: %s", e)

    def on_full(self) -> bool:
        """The file system is full (ENOSPC): evict one more chunk; False when none is left."""
        try:
            return self.evict(1, 1) > 0
        except DiskEvictionError as e:
            self._stats["evict_errors"] += 1
            log.warning("cannot evict: %s", e)
            return False
        except self._errors as e:
            self._stats["redis_errors"] += 1
            log.debug("no eviction while Redis is unreachable: %s", e)
            return False
