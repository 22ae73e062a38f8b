"""``Housekeeper``: a shared-mode writer's background pass, once a ``tick``.

One Redis round trip (``RedisIndex.status``) tells it whether Redis restarted
or was emptied (the epoch), came back with an older state (the writer's
counter went back), or was asked to rebuild; then it re-publishes this
writer (purging what Redis may list wrongly), adopts writers that are down,
audits a slice of what Redis lists, retracts what the index dropped and frees
extents whose leases ended. Invariant: after a restart or an older state no
extent is reused for one lease period (``leases_lost``), since the leases
Redis held are gone. The thread never dies of an error: a missed pass is
retried on the next tick.
"""

from __future__ import annotations

import logging
import threading

from ..errors import ClosedError
from .adoption import adopt_dead_writers
from .eviction import RetractThenFree
from .publisher import Publisher
from .redis_index import RedisIndex

__all__ = ["Housekeeper"]

log = logging.getLogger(__name__)


class Housekeeper:
    """The background thread of one writer (see the module docstring); ``stop`` ends it."""

    def __init__(self, redis: RedisIndex, pub: Publisher, eviction: RetractThenFree, shared_dir: str,
                 tick: float, stats: dict, errors: tuple):
        self.redis = redis
        self.pub = pub
        self.eviction = eviction
        self.shared_dir = shared_dir
        self.tick = tick
        self._stats = stats
        self._errors = errors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gds-kvcache-shared", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread (idempotent); returns once it is gone."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        pub = self.pub
        while not self._stop.wait(self.tick):
            try:
                if not pub.registered:
                    pub.register()
                st = self.redis.status(pub.writer)
                restarted = st.epoch is None or st.epoch != pub.epoch
                if st.went_back and not restarted:
                    # An older state (a snapshot, a lagging replica): it may list entries retracted
                    # since and lacks leases taken since; like a restart, but its entries are purged.
                    self.eviction.leases_lost()
                    self._stats["state_went_back"] += 1
                    pub.dirty = True
                    log.warning("Redis %s came back with an older state of writer %s: re-publishing",
                                self.redis.url, pub.writer)
                if restarted or pub.dirty or st.rebuild != pub.rebuild_seen:
                    adopt = restarted or st.rebuild != pub.rebuild_seen
                    if restarted:
                        self.eviction.leases_lost()
                        log.warning("Redis %s restarted or was emptied: re-publishing writer %s",
                                    self.redis.url, pub.writer)
                    dirty, pub.dirty = pub.dirty, False
                    try:
                        pub.republish(purge=dirty and not restarted)
                        if st.went_back:
                            self.redis.resync(pub.writer)
                    except BaseException:
                        pub.dirty = pub.dirty or dirty
                        raise
                    if adopt:
                        self._stats["adopted"] += adopt_dead_writers(self.shared_dir, pub.writer, self.redis)
                else:
                    pub.audit()
                self.eviction.process_retired()
            except self._errors as e:
                self._stats["redis_errors"] += 1
                log.debug("housekeeping: Redis unreachable: %s", e)
            except ClosedError:
                return
            except Exception:   # never let the thread die: a missed pass is retried next tick
                log.exception("shared-mode housekeeping failed")
            self.eviction.release_quarantine()
