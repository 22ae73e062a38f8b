"""``SharedDiskBackend``: many processes, one cache directory, one Redis index.

Each process is a *writer* with its own subdirectory ``<dir>/writers/<id>/``,
a plain ``LocalDiskBackend`` (its own lock, index log, pool files and
eviction within its own budget). Redis (``RedisIndex``) lists every writer's
chunks; any process reads any writer's pool files read-only at the published
extent and checks the published checksum. The ordering rules that keep a
reader from ever seeing another chunk's bytes:

* publish after durable: a chunk is published only after its bytes are
  written and its index record appended, and its put's future resolves only
  after that (so a lookup anywhere sees it once the future is done);
* retract before reuse: the writer's disk index never frees an extent by
  itself (its eviction strategy is ``RetractThenFree``); every extent it
  drops (eviction, removal, a bad chunk, ENOSPC) is retired, its Redis entry
  deleted in the same Lua script that reads its leases, and it is reused
  only once the last lease ends;
* a reader leases the entry in the same script that reads it, and counts a
  read as a miss when its lease ran out before the bytes were checked, or
  when the entry was published by an earlier run of its writer.
"""

from __future__ import annotations

import logging
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

from ..config import CacheEngineConfig
from ..errors import ClosedError, ConfigError, DirectoryLockedError, GdsKvCacheError
from ..io import IOPathReport
from ..key import CacheEngineKey
from ..memory.obj import MemoryObj
from ..storage import LocalDiskBackend, StorageBackendInterface, check_keys
from ..storage.call_gate import CallGate
from ..storage.disk_index import DiskEntry
from .adoption import adopt_dead_writers
from .eviction import RetractThenFree
from .housekeeping import Housekeeper
from .identity import cache_id, writer_ids
from .publisher import WRITERS_DIR, Publisher
from .put_path import PutPath
from .redis_index import RedisIndex, redis_errors
from .remote_reader import RemoteReader
from .settings import COUNTERS, SharedSettings, redis_config_errors
from .shared_index import SharedIndex

__all__ = ["SharedDiskBackend", "WRITERS_DIR", "cache_id"]

log = logging.getLogger(__name__)

class SharedDiskBackend(StorageBackendInterface):
    """The disk tier shared by several processes through one directory and one Redis.

    Parameters
    ----------
    config
        ``local_disk`` is the shared directory, ``max_local_disk_size`` this
        writer's budget, ``lookup_server_url`` the Redis server.
    loop, memory_allocator, dst_device
        As for ``LocalDiskBackend``.
    writer_id
        This process's subdirectory name (letters, digits, ``._-``). None
        takes the first free ``<hostname>-<n>``, so a restarted process gets its
        old directory (and chunks) back.
    namespace
        Prefix of every Redis key. None: ``gdskv:<cache id>``, where the id is
        kept in the shared directory (``cache-id``), so every process of one
        cache agrees on it and two caches can share one Redis server.
    lease_ttl
        Seconds a reader's lease keeps an extent from reuse; a read must finish
        within it (or it counts as a miss).
    claim_ttl
        Seconds a put claim keeps other writers off a key.
    tick
        Seconds between housekeeping passes (retractions, lease ends, Redis
        restart and rebuild-request checks).

    Notes
    -----
    Lookups (``batched_contains``) are one Redis round trip for a whole prompt
    and answer for every tensor-parallel rank at once: a chunk counts only when
    every rank's shard is published. Reads of other writers' chunks run
    through the same I/O engines as local reads, opened read-only (KvikIO or
    POSIX, never a mapping another process could shrink).

    While Redis is unreachable lookups and other writers' chunks miss, puts
    still go to this writer's files (published when Redis is back), and no
    extent is reused: an eviction is retracted from Redis before its space
    is. A writer that starts while Redis is unreachable stores locally too
    (``local_only_puts``, warned once a minute) and evicts nothing until it
    has registered, since Redis may still list its previous run's chunks.
    After Redis restarts empty, every writer re-publishes its chunks within
    one ``tick`` plus the publish time (about 1 s per 100k chunks on loopback)
    and reuses no extent for one ``lease_ttl``, since the leases were lost;
    the chunks of writers that are down are re-published by a live process
    from their index logs (``shared.adoption``).
    Run Redis without persistence.
    """

    def __init__(self, config: CacheEngineConfig, loop, memory_allocator, dst_device: str = "cuda",
                 writer_id: Optional[str] = None, namespace: Optional[str] = None,
                 lease_ttl: Optional[float] = None, claim_ttl: Optional[float] = None,
                 tick: Optional[float] = None):
        super().__init__(dst_device)
        st = SharedSettings.resolve(config, writer_id, lease_ttl, claim_ttl, tick)
        url, writer_id, lease_ttl, tick = st.url, st.writer_id, st.lease_ttl, st.tick
        self.config = config
        self.shared_dir = st.shared_dir
        self.namespace = namespace if namespace is not None else f"gdskv:{cache_id(self.shared_dir)}"
        self.lease_ttl = lease_ttl
        self.tick = tick
        self.memory_allocator = memory_allocator
        self.redis = RedisIndex(url, self.namespace, lease_ttl, st.claim_ttl, config.redis_socket_timeout,
                                config.redis_backoff)
        self._errors = redis_errors()
        self._stats = dict.fromkeys(COUNTERS, 0)
        self.eviction = RetractThenFree(lease_ttl, self._stats, self._errors)
        self._gate = CallGate(f"shared disk backend on {self.shared_dir}")
        try:
            self.writer, self.local = self._open_local(config, loop, memory_allocator, dst_device, writer_id)
        except BaseException:
            self.redis.close()
            raise
        self.boot = uuid.uuid4().hex[:12]
        self.pub = Publisher(self.redis, self.writer, self.boot, self.local, self._stats)
        self.index = SharedIndex(self.redis, self.shared_dir, self.writer)
        self.eviction.bind(self.pub)
        self.puts = PutPath(self.index, self.local, self.pub, self.eviction, self._stats, self._errors)
        self._prefetch = ThreadPoolExecutor(max(2, config.io_threads), thread_name_prefix="gds-kvcache-shared-get")
        self.remote = RemoteReader(self.index, config, memory_allocator, lease_ttl, self.writer, self._stats)
        try:
            try:
                self.pub.register()
                self._stats["adopted"] += adopt_dead_writers(self.shared_dir, self.writer, self.redis)
            except redis_config_errors() as e:
                raise ConfigError("lookup_server_url", url, f"a Redis this process may use ({e})") from None
            except self._errors as e:
                self._stats["redis_errors"] += 1
                log.warning("Redis %s unreachable at start (%s): writer %s stores locally until it answers",
                            self.redis.url, e, self.writer)
        except BaseException:
            self._prefetch.shutdown()
            self.remote.close()
            self.local.close()
            self.redis.close()
            raise
        self.housekeeper = Housekeeper(self.redis, self.pub, self.eviction, self.shared_dir, self.tick, self._stats,
                                       self._errors)

    # -- capabilities (StorageBackendInterface) ------------------------------------------------
    def lookup_for_all_ranks(self) -> bool:
        """Lookups answer for every tensor-parallel rank (Redis lists every rank's shard)."""
        return True

    def put_skips_stored(self) -> bool:
        """A put skips keys published by any writer (its claim does), so callers need not ask first."""
        return True

    # -- lifetime ----------------------------------------------------------------------------
    def _open_local(self, config, loop, alloc, dst_device, writer_id) -> tuple[str, LocalDiskBackend]:
        base = os.path.join(self.shared_dir, WRITERS_DIR)
        for wid in writer_ids(writer_id):
            cfg = config.replace(local_disk=os.path.join(base, wid))
            try:
                return wid, LocalDiskBackend(cfg, loop, alloc, dst_device, lookup_server=None,
                                             eviction=self.eviction)
            except DirectoryLockedError:
                if writer_id is not None:
                    raise
        raise DirectoryLockedError(f"no free writer directory under {base!r}")

    # -- publishing --------------------------------------------------------------------
    @property
    def last_republish(self) -> Optional[float]:
        return self.pub.last_republish

    def republish(self, purge: bool = False, batch: int = 2000) -> int:
        """Register this writer and publish every chunk of its index (one round trip per ``batch``).

        ``purge`` first drops what this writer published before (at start:
        its log is the truth). Returns the chunks published.
        """
        if self._gate.closing:
            raise ClosedError(f"shared disk backend on {self.shared_dir} is closed")
        return self.pub.republish(purge, batch)

    def stop_housekeeping(self) -> None:
        """Stop the background pass (re-publishing, retractions) until close (benchmarks timing
        ``republish`` alone; a backend without it no longer follows Redis restarts)."""
        self.housekeeper.stop()

    def request_rebuild(self) -> None:
        """Ask every writer (this one included) to re-publish its chunks within a tick."""
        if self._gate.closing:
            raise ClosedError(f"shared disk backend on {self.shared_dir} is closed")
        self.redis.request_rebuild()

    # -- puts ---------------------------------------------------------------------------------
    def batched_submit_put_task(self, keys: Sequence[CacheEngineKey],
                                objs: Sequence[MemoryObj]) -> list[Optional[Future]]:
        """Store ``objs`` under ``keys`` in this writer's files; published once durable.

        Per key, None where the key is stored here, published by any writer,
        claimed by another writer's put in flight (that writer stores it), or
        this writer has not reached Redis yet since it started.
        """
        keys, objs = list(keys), list(objs)
        if len(keys) != len(objs):
            raise GdsKvCacheError(f"{len(keys)} keys but {len(objs)} objects")
        check_keys(keys)
        self._gate.enter()
        try:
            self.local.check_objs(objs)       # before any claim: a refused call leaves none behind
            return self.puts.put(keys, objs)
        finally:
            self._gate.exit()

    def submit_put_task(self, key: CacheEngineKey, obj: MemoryObj) -> Optional[Future]:
        return self.batched_submit_put_task([key], [obj])[0]

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        return self.local.exists_in_put_tasks(key)

    def wait_for_put_progress(self, timeout: float) -> bool:
        return self.local.wait_for_put_progress(timeout)

    def wait_for_puts(self, timeout: Optional[float] = None) -> bool:
        return self.local.wait_for_puts(timeout)

    # -- lookups ---------------------------------------------------------------------------------
    shards = staticmethod(SharedIndex.shards)

    def batched_contains(self, keys: Sequence[CacheEngineKey]) -> int:
        """Hit prefix of ``keys`` over all writers and all ranks, in one Redis round trip (0 if
        Redis is unreachable: a miss, never a promise another rank cannot keep)."""
        return self._lookup(self.index.prefix, keys, lambda n: 0)

    def batched_exists(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Per key, whether every rank's shard of it is published (one round trip)."""
        return self._lookup(self.index.exists, keys, lambda n: [False] * n)

    def _lookup(self, ask, keys, missed):
        keys = list(keys)
        check_keys(keys)
        if not keys:
            return missed(0)
        self._gate.enter()
        try:
            return ask(keys)
        except self._errors as e:
            self._stats["redis_errors"] += 1
            log.debug("lookup failed: %s", e)
            return missed(len(keys))
        finally:
            self._gate.exit()

    def contains(self, key: CacheEngineKey) -> bool:
        return self.batched_contains([key]) == 1

    def entry(self, key: CacheEngineKey) -> Optional[DiskEntry]:
        """This writer's entry of ``key`` (None for other writers' chunks)."""
        return self.local.entry(key)

    def entry_size(self, key: CacheEngineKey) -> int:
        """Slab bytes a read of this writer's ``key`` takes (0 for other writers' chunks: their
        size is known only once leased)."""
        return self.local.entry_size(key)

    # -- gets ---------------------------------------------------------------------------------------
    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Per key the chunk (one reference, the caller's) or None: this writer's chunks from its
        own files, others' from theirs under a lease, each checked against its checksum."""
        keys = list(keys)
        check_keys(keys)
        self._gate.enter()
        try:
            return self._get(keys)
        finally:
            self._gate.exit()

    def _get(self, keys: list) -> list[Optional[MemoryObj]]:
        out: list[Optional[MemoryObj]] = [None] * len(keys)
        idx = self.local.index
        here = [i for i, k in enumerate(keys) if idx.contains(k)]
        if here:
            for i, o in zip(here, self.local.batched_get_blocking([keys[i] for i in here])):
                out[i] = o
        rest = [i for i in range(len(keys)) if out[i] is None]
        if rest:
            self.remote.read(keys, rest, out)
        return out

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return self.batched_get_blocking([key])[0]

    def batched_submit_prefetch_task(self, keys: Sequence[CacheEngineKey]) -> Future:
        """Start ``batched_get_blocking(keys)`` in the background; a future of its list."""
        keys = list(keys)
        check_keys(keys)
        return self._submit_read(keys, None)

    def submit_prefetch_task(self, key: CacheEngineKey) -> Optional[Future]:
        check_keys([key])
        if not self.contains(key):
            return None
        return self._submit_read([key], 0)

    def _submit_read(self, keys: list, single: Optional[int]) -> Future:
        def job():
            objs = self._get(keys)
            return objs if single is None else objs[single]
        return self._gate.submit(self._prefetch, job)

    # -- management ---------------------------------------------------------------------------------
    def remove(self, key: CacheEngineKey) -> bool:
        """Drop this writer's chunk ``key``; False if it is not stored here (another writer's chunk
        is only ever removed by that writer). Its Redis entry is retracted before its extent is
        reused (at once, or once Redis answers)."""
        check_keys([key])
        self._gate.enter()
        try:
            e = self.local.entry(key)
            was = self.local.remove(key)
        finally:
            self._gate.exit()
        if was:
            try:
                self.eviction.process_retired()
            except self._errors as exc:
                self._stats["redis_errors"] += 1
                if e is not None:
                    # Redis still lists the chunk for other processes: the strategy tombstoned its
                    # extent (a read of that entry is a miss, never the removed version), which stays
                    # retired (not reused) until the retraction goes through.
                    self._stats["removed_unretracted"] += 1
                log.warning("removed %s here; Redis unreachable (%s): retracted when it answers",
                            key.to_string(), exc)
        return was

    def keys(self) -> list[CacheEngineKey]:
        """This writer's chunks."""
        self._gate.enter()      # after close() a ClosedError, as every other call
        try:
            return self.local.keys()
        finally:
            self._gate.exit()

    @property
    def path(self) -> str:
        return self.local.path

    @property
    def pool_paths(self) -> list[str]:
        return self.local.pool_paths

    @property
    def used_bytes(self) -> int:
        return self.local.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.local.capacity_bytes

    def io_report(self) -> IOPathReport:
        return self.local.io_report()

    @property
    def stats(self) -> dict:
        out = self.local.stats
        out.update(self._stats)
        out["put_errors"] -= self._stats["put_retries"]     # a refusal that was retried is not an error
        out["redis_timeouts"] = self.redis.timeouts
        return out

    def memcheck(self) -> bool:
        return self.local.memcheck()

    def close(self) -> None:
        """Stop housekeeping, retract what was evicted, wait out readers' leases on it (at most
        ``lease_ttl``), then close this writer's backend (its chunks stay published and readable:
        the files remain) and the Redis client."""
        if not self._gate.close():
            return
        self.pub.closing = True
        self.housekeeper.stop()
        self._prefetch.shutdown(wait=True)
        self.remote.drain()
        try:
            self.eviction.finish(self.writer)
        finally:
            try:
                self.local.close()
            finally:
                self.remote.close()
                self.redis.close()

    def __enter__(self) -> "SharedDiskBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
