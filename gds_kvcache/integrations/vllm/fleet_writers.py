"""``FleetWriters``: one vLLM instance's writer directories in a shared directory, kept in step with Redis.

Fleet mode's scheduler writes each tensor-parallel shard into a writer
directory of its own, ``<local_disk>/writers/<base>.r<s>``: an ordinary
gds_kvcache directory, with the shared mode's machinery around its index,
unchanged (``gds_kvcache.shared``): ``Publisher`` lists its chunks in Redis,
``RetractThenFree`` retracts a chunk from Redis before its extent is reused
and waits out other instances' leases, ``Housekeeper`` re-publishes after a
Redis restart and adopts dead writers, and put claims keep two instances
from storing one chunk. The scheduler holds every index (no GPU, no I/O
engine); workers write the bytes where it says.

Invariants: a chunk is published only after its index record is down
(``publish`` is called after the commit); its extent is reused only after
its retraction and the last lease on it; ``<base>`` is locked for the run
(every shard directory's lock is held), and is the first free
``<hostname>-<n>`` unless ``writer_id`` names it, so a restarted instance
gets its directories and chunks back. While Redis is unreachable stores stay
local (published once it answers) and nothing is evicted.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ...config import CacheEngineConfig
from ...errors import ConfigError, DirectoryLockedError
from ...key import CacheEngineKey
from ...shared.adoption import adopt_dead_writers
from ...shared.eviction import RetractThenFree
from ...shared.housekeeping import Housekeeper
from ...shared.identity import cache_id, writer_ids
from ...shared.publisher import LEASE_MARGIN, WRITERS_DIR, Publisher
from ...shared.redis_index import RedisIndex, redis_errors
from ...shared.settings import COUNTERS
from ...shared.shared_index import SharedIndex
from ...storage.disk_index import DiskIndex
from ...storage.pool_file import PoolDirectory, index_reserve

__all__ = ["FleetWriters", "ShardDir"]

log = logging.getLogger(__name__)

#: Seconds between warnings that stores are kept here only (Redis unreachable).
_WARN_EVERY = 60.0


class ShardDir:
    """One shard's writer directory as the shared machinery sees a writer's own tier."""

    def __init__(self, pool: PoolDirectory, index: DiskIndex):
        self.pool = pool
        self.index = index

    @property
    def layout(self):
        return self.pool.layout

    def remove(self, key: CacheEngineKey) -> bool:
        """Forget ``key`` (its extent is retired: freed once retracted and unleased)."""
        was, _ = self.index.remove(key)
        return was


def _no_punch(offset: int, size: int) -> None:
    """Extents are not punched from the scheduler: a worker's mapped engine may pin their pages."""


class FleetWriters:
    """This instance's writer directories (one per shard) and the shared-mode machinery around them.

    Parameters
    ----------
    shared_dir
        ``local_disk``: the directory every instance of the fleet shares.
    shards
        Shard directories (world size, or 1 where ranks hold identical bytes).
    config
        ``max_local_disk_size`` (each shard's budget), ``pool_files`` and the
        shared mode's settings (``lookup_server_url``, ``writer_id``,
        ``lease_ttl``, ``claim_ttl``, ``shared_tick``, ``redis_*``).
    """

    def __init__(self, shared_dir: str, shards: int, config: CacheEngineConfig):
        self.shared_dir = os.path.abspath(shared_dir)
        self.lease_ttl = config.lease_ttl
        self.namespace = f"gdskv:{cache_id(self.shared_dir)}"
        self.redis = RedisIndex(config.lookup_server_url, self.namespace, config.lease_ttl, config.claim_ttl,
                                config.redis_socket_timeout, config.redis_backoff)
        self._errors = redis_errors()
        self.stats = [dict.fromkeys(COUNTERS, 0) for _ in range(shards)]
        self.dirs: list[PoolDirectory] = []
        self.indexes: list[DiskIndex] = []
        self.evictions: list[RetractThenFree] = []
        self.pubs: list[Publisher] = []
        self.housekeepers: list[Housekeeper] = []
        self._bg = ThreadPoolExecutor(1, thread_name_prefix="gds-kvcache-fleet")
        self._warned_at = -_WARN_EVERY
        self.local_only = 0
        try:
            self.base = self._lock(shards, config)
            self.writers = [f"{self.base}.r{s}" for s in range(shards)]
            self.boot = uuid.uuid4().hex[:12]
            self.index = SharedIndex(self.redis, self.shared_dir, self.base)
            for s, d in enumerate(self.dirs):
                ev = RetractThenFree(config.lease_ttl, self.stats[s], self._errors)
                idx = DiskIndex(d, index_reserve(config.disk_bytes), eviction=ev)
                ev.attach(idx, _no_punch)
                self.evictions.append(ev)
                self.indexes.append(idx)
                idx.recover()
                idx.drain_events()  # recovered chunks are not news to this vLLM instance
                pub = Publisher(self.redis, self.writers[s], self.boot, ShardDir(d, idx), self.stats[s])
                ev.bind(pub)
                self.pubs.append(pub)
            self._register(config.lookup_server_url)
            self.housekeepers = [Housekeeper(self.redis, pub, ev, self.shared_dir, config.shared_tick, st,
                                             self._errors)
                                 for pub, ev, st in zip(self.pubs, self.evictions, self.stats)]
        except BaseException:
            self.close()
            raise

    # -- start ------------------------------------------------------------------------------
    def _lock(self, shards: int, config: CacheEngineConfig) -> str:
        """Lock every shard directory of the first free base id; the id."""
        base_dir = os.path.join(self.shared_dir, WRITERS_DIR)
        for base in writer_ids(config.writer_id):
            try:
                for s in range(shards):
                    self.dirs.append(PoolDirectory(os.path.join(base_dir, f"{base}.r{s}"), config.disk_bytes,
                                                   config.pool_files))
                return base
            except DirectoryLockedError:
                for d in self.dirs:
                    d.release()
                self.dirs = []
                if config.writer_id is not None:
                    raise DirectoryLockedError(f"writer_id {base!r}: its directories under {base_dir!r} are in "
                                               "use by another vLLM instance; give each instance its own "
                                               "writer_id") from None
        raise DirectoryLockedError(f"no free writer directory under {base_dir!r}")

    def _register(self, url: str) -> None:
        from redis import exceptions as rex
        try:
            for pub in self.pubs:
                pub.register()
            self.stats[0]["adopted"] += adopt_dead_writers(self.shared_dir, self.writers[0], self.redis)
        except (rex.AuthenticationError, rex.AuthorizationError, rex.ResponseError) as e:
            raise ConfigError("kv_connector_extra_config.lookup_url", url, f"a Redis this process may use ({e})") \
                from None
        except self._errors as e:
            self.stats[0]["redis_errors"] += 1
            log.warning("Redis %s unreachable at start (%s): writers %s.r* store locally until it answers",
                        url, e, self.base)

    # -- stores -------------------------------------------------------------------------------
    def claim(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Per chunk (its shard-0 key), whether this instance stores it: no other instance published or
        claimed it (one round trip). Without Redis, every chunk (kept here, published later)."""
        if not keys:
            return []
        if not self.pubs[0].registered:
            self._local_only(len(keys), "not registered with Redis yet")
            return [True] * len(keys)
        try:
            mine = self.index.claim(self.writers[0], keys)
        except self._errors as e:
            self.stats[0]["redis_errors"] += 1
            self._local_only(len(keys), f"claim failed: {e}")
            return [True] * len(keys)
        self.stats[0]["claims_lost"] += mine.count(False)
        return mine

    def make_room(self, nbytes: int, adding: int, force: bool = False) -> None:
        """Before reserving ``nbytes`` for ``adding`` chunks in every shard: evict unleased LRU chunks
        (retracted from Redis first) where the pool is short (``force``: that many bytes anyway)."""
        for ev in self.evictions:
            ev.make_room(nbytes, adding, force)

    def published(self, keys: Sequence[Sequence[CacheEngineKey]], claimed: Sequence[CacheEngineKey]) -> None:
        """Right after a store's commit: publish ``keys[s]`` (those the index recorded) of each shard
        (one round trip per shard), and give back the claims of ``claimed`` not recorded. On the
        caller's thread, so that a housekeeping audit never finds a recorded chunk unlisted for
        longer than that; a Redis that does not answer is gated (``redis_backoff``)."""
        self._publish([list(k) for k in keys], list(claimed))

    def _publish(self, keys: list[list[CacheEngineKey]], claimed: list[CacheEngineKey]) -> None:
        for s, pub in enumerate(self.pubs):
            if s >= len(keys) or not keys[s]:
                continue
            try:
                pub.publish_current(keys[s])
            except self._errors as e:
                pub.dirty = True            # recorded here: published by the next housekeeping pass
                self.stats[s]["redis_errors"] += 1
                log.debug("publish failed (%s): re-published when Redis answers", e)
            except Exception:   # noqa: BLE001 - the chunks are stored; never lose them to a publish
                pub.dirty = True
                log.exception("publishing %d chunk(s) failed", len(keys[s]))
        idx = self.indexes[0]
        lost = [k for k in claimed if idx.entry(k) is None]
        if lost and self.pubs[0].registered:
            try:
                self.index.unclaim(self.writers[0], lost)
            except self._errors as e:      # claims expire on their own (claim_ttl)
                self.stats[0]["redis_errors"] += 1
                log.debug("unclaim failed: %s", e)

    def unclaim(self, keys: Sequence[CacheEngineKey]) -> None:
        """Give back claims on chunks this instance will not store (off the scheduler's path)."""
        if keys and self.pubs and self.pubs[0].registered:
            self._bg.submit(self._publish, [], list(keys))

    def retire_now(self) -> None:
        """Retract what the indexes dropped (``reset_cache``), off the scheduler's path."""
        self._bg.submit(self._process_retired)

    def _process_retired(self) -> None:
        for s, ev in enumerate(self.evictions):
            try:
                ev.process_retired()
            except self._errors as e:   # stays retired (tombstoned): retracted by housekeeping
                self.stats[s]["redis_errors"] += 1
                log.debug("retraction failed: %s", e)

    def _local_only(self, n: int, why: str) -> None:
        """Count stores kept here without Redis; warn at most once a minute."""
        self.local_only += n
        self.stats[0]["local_only_puts"] += n
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning("writers %s.r*: Redis unreachable (%s): stores kept here, published once it answers",
                        self.base, why)

    def counters(self) -> dict:
        """The shared machinery's counters, summed over the shards."""
        out = dict.fromkeys(COUNTERS, 0)
        for st in self.stats:
            for k, v in st.items():
                out[k] = out.get(k, 0) + v
        out["redis_timeouts"] = self.redis.timeouts
        return out

    # -- end ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop housekeeping, finish queued publishes, retract what was dropped and wait out
        readers' leases on it (at most ``lease_ttl``); the indexes stay open (the caller closes them)."""
        for hk in self.housekeepers:
            hk.stop()
        self.housekeepers = []
        for pub in self.pubs:
            pub.closing = True
        self._bg.shutdown(wait=True)
        self._process_retired()
        last = max((ev.quarantine_ends() for ev in self.evictions), default=0.0)
        if last > time.monotonic():
            time.sleep(min(last - time.monotonic(), self.lease_ttl + LEASE_MARGIN))
        for ev in self.evictions:
            ev.release_quarantine(all_due=True)

    def close(self) -> None:
        """``stop``, then close the indexes, release the directories and the Redis client (idempotent)."""
        try:
            self.stop()
        finally:
            for idx in self.indexes:
                try:
                    idx.close()
                except Exception as e:  # noqa: BLE001 - the locks must go
                    log.warning("closing the disk index: %s", e)
            for d in self.dirs:
                d.release()
            self.indexes, self.dirs = [], []
            self.redis.close()

    def own_dir(self, shard: int) -> str:
        return self.dirs[shard].path

    def layout(self, shard: int):
        return self.dirs[shard].layout
