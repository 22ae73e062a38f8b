"""``Publisher``: one writer's chunks listed in Redis (register, publish, re-publish).

Invariants: a chunk is published only once its bytes and its index record
are down (the caller publishes after the put's commit); a writer's run (boot)
is registered before anything of that run is published, and before it
measures the leases of its last run, so no lease can start on an entry of
the last run afterwards. Everything Redis holds about this writer can be
rebuilt from its index (``republish``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional, Sequence

from ..errors import ClosedError, GdsKvCacheError
from ..key import CacheEngineKey
from ..storage import LocalDiskBackend
from .redis_index import Published, RedisIndex

__all__ = ["Publisher", "WRITERS_DIR"]

log = logging.getLogger(__name__)

WRITERS_DIR = "writers"
#: Extra seconds an owner waits past a lease's end (clock granularity, scheduling).
LEASE_MARGIN = 0.05


class Publisher:
    """Keeps Redis's view of one writer's chunks in step with its index.

    Parameters
    ----------
    redis
        The shared index.
    writer, boot
        This writer's id and run.
    local
        This writer's own disk tier (its index is the truth).
    stats
        The shared backend's counters (``published``, ``duplicates``, ``republishes``), updated in place.
    """

    def __init__(self, redis: RedisIndex, writer: str, boot: str, local: LocalDiskBackend, stats: dict):
        self.redis = redis
        self.writer = writer
        self.boot = boot
        self.local = local
        self._stats = stats
        self.lock = threading.RLock()     # held across a publish or retract and the state it reads
        self.registered = False
        self.epoch: Optional[str] = None
        self.rebuild_seen = 0
        self.dirty = False                # something here may be unpublished: re-publish on the next pass
        self.last_republish: Optional[float] = None
        self.closing = False
        self._audit_keys: list = []
        self._audit_pos = 0

    def entry(self, e) -> Published:
        """The Redis record of this writer's index entry ``e``."""
        return Published.of_entry(e, self.writer, self.boot)

    def _layout_fields(self) -> dict:
        return dict(self.local.layout.fields(), dir=os.path.join(WRITERS_DIR, self.writer), boot=self.boot)

    def register(self) -> None:
        """First contact with Redis in this run: wait out leases on the last run's extents, drop
        what it published (this writer's log is the truth now), then publish every chunk."""
        self.redis.register(self.writer, self._layout_fields())
        wait_ms = self.redis.lease_left_ms(self.writer)
        if wait_ms > 0:
            # A reader of this writer's last run may still read an extent now free here.
            log.info("writer %s: waiting %.1f s for readers' leases of its last run", self.writer, wait_ms / 1000)
            time.sleep(wait_ms / 1000 + LEASE_MARGIN)
        self.republish(purge=True)

    def republish(self, purge: bool = False, batch: int = 2000) -> int:
        """Register this writer and publish every chunk of its index (one round trip per ``batch``).

        ``purge`` first drops what this writer published before (at start:
        its log is the truth). Returns the chunks published.
        """
        if self.closing:
            raise ClosedError(f"writer {self.writer} is closed")
        idx = self.local.index
        with self.lock:
            epoch = self.redis.set_epoch()
            self.rebuild_seen = self.redis.rebuild_requests()
            self.redis.register(self.writer, self._layout_fields())
            if purge:
                self.redis.purge(self.writer)
            keys = idx.keys()
            n = 0
            for i in range(0, len(keys), batch):
                es = [e for e in (idx.entry(k) for k in keys[i:i + batch]) if e is not None]
                self.drop_duplicates(self.redis.publish(self.writer, [self.entry(e) for e in es]))
                n += len(es)
            self.epoch = epoch
            self.registered = True
            self._stats["republishes"] += 1
            self.last_republish = time.monotonic()
        log.info("writer %s: %d chunk(s) published to %s", self.writer, n, self.redis.url)
        return n

    def audit(self, batch: int = 512) -> int:
        """Check the next ``batch`` of this writer's chunks are still listed in Redis (one round trip)
        and publish those that are not (entries lost while the epoch key survived: a maxmemory
        eviction, a hand-made delete). The whole index is covered every ``len / batch`` passes.
        Returns the chunks published again."""
        if self._audit_pos >= len(self._audit_keys):
            self._audit_keys, self._audit_pos = self.local.index.keys(), 0
        keys = self._audit_keys[self._audit_pos:self._audit_pos + batch]
        self._audit_pos += batch
        if not keys:
            return 0
        there = self.redis.exists([[k.to_string()] for k in keys])
        lost = [k for k, t in zip(keys, there) if not t and self.local.index.entry(k) is not None]
        if lost:
            log.warning("writer %s: %d chunk(s) no longer listed in Redis: published again", self.writer, len(lost))
            self.publish_current(lost)
            self._stats["audit_republished"] += len(lost)
        return len(lost)

    def publish_current(self, keys: Sequence[CacheEngineKey]) -> None:
        """Publish the current entries of ``keys`` (idempotent)."""
        with self.lock:
            es = [e for e in (self.local.index.entry(k) for k in keys) if e is not None]
            dups = self.redis.publish(self.writer, [self.entry(e) for e in es])
            self._stats["published"] += len(es)
            self.drop_duplicates(dups)

    def drop_duplicates(self, dups: Sequence[str]) -> None:
        """Drop this writer's copies of keys another writer published first (both stored them
        while Redis was down or restarting). Unpublished here, so no remote reader holds them;
        kept, they would stay unlisted when the other writer evicts its copy."""
        for k in dups:
            self._stats["duplicates"] += 1
            try:
                self.local.remove(CacheEngineKey.from_string(k))
            except GdsKvCacheError as e:     # closing: the next start re-publishes or drops it
                log.debug("keeping duplicate %s: %s", k, e)
