"""``SharedDiskBackend``: many processes, one cache directory, one Redis index.

Each process is a *writer* with its own subdirectory ``<dir>/writers/<id>/``,
a plain ``LocalDiskBackend`` (its own lock, index log, pool files and
eviction within its own budget). Redis (``RedisIndex``) lists every writer's
chunks; any process reads any writer's pool files read-only at the published
extent and checks the published checksum. The ordering rules that keep a
reader from ever seeing another chunk's bytes:

* publish after durable: a chunk is published only after its bytes are
  written and its index record appended (the disk index's insert event);
* retract before reuse: this backend evicts, not the disk index; it deletes
  the Redis entries first, in the same Lua script that reads their leases,
  and an extent a reader still leases stays pinned until the lease ends;
* a reader leases the entry in the same script that reads it, and counts a
  read as a miss when its lease ran out before the bytes were checked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from ..config import CacheEngineConfig
from ..errors import ConfigError, DirectoryLockedError, GdsKvCacheError, StorageFullError
from ..kernels.checksum import checksum_batch
from ..key import CacheEngineKey
from ..memory.format import MemoryFormat, str_to_dtype
from ..memory.obj import MemoryObj
from ..storage.disk_index import DiskEntry, DiskIndex
from ..storage.local_disk_backend import LocalDiskBackend, check_keys
from ..storage.lookup_server import LookupServerInterface
from ..storage.pool_file import POOL_NAME, pieces
from .redis_index import Published, RedisIndex

__all__ = ["SharedDiskBackend", "WRITERS_DIR"]

log = logging.getLogger(__name__)

WRITERS_DIR = "writers"
_WRITER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Extra seconds an owner waits past a lease's end (clock granularity, scheduling).
_LEASE_MARGIN = 0.05


def _redis_errors() -> tuple:
    import redis
    return (redis.RedisError, OSError)


class _OwnEvictionIndex(DiskIndex):
    """A disk index that never evicts on its own: in shared mode the backend evicts, so the
    Redis entry is retracted (and its leases checked) before the extent can be reused."""

    def _allocate_evicting_locked(self, nbytes: int) -> Optional[int]:
        return self._space.allocate(nbytes)


class _Publisher(LookupServerInterface):
    """The disk tier's insert/remove events, passed to Redis under the backend's publish lock."""

    def __init__(self, backend: "SharedDiskBackend"):
        self.b = backend

    def insert(self, key: CacheEngineKey) -> None:
        b = self.b
        with b._pub_lock:
            e = b.local.index.entry(key)
            if e is None:      # removed since: its remove event follows
                return
            try:
                dups = b.redis.publish(b.writer, [b._published(e)])
            except b._errors:
                b._dirty = True     # the next housekeeping pass re-publishes everything
                raise
            b._stats["published"] += 1
            b._drop_duplicates(dups)

    def remove(self, key: CacheEngineKey) -> None:
        b = self.b
        with b._pub_lock:
            e = b.local.index.entry(key)
            try:
                b.redis.retract_stale(b.writer, key.to_string(), str(e.seq) if e is not None else "")
            except b._errors:
                b._dirty = True     # re-publish after a purge, which drops the stale entry
                raise

    def lookup(self, key: CacheEngineKey) -> bool:
        return self.b.batched_contains([key]) == 1


class SharedDiskBackend:
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
        Prefix of every Redis key (several caches may share one server).
    lease_ttl
        Seconds a reader's lease keeps an extent from reuse; a read must finish
        within it.
    claim_ttl
        Seconds a put claim keeps other writers off a key.
    tick
        Seconds between housekeeping passes (lease releases, Redis restart and
        rebuild-request checks).

    Notes
    -----
    Lookups (``batched_contains``) are one Redis round trip for a whole prompt
    and answer for every tensor-parallel rank at once: a chunk counts only when
    every rank's shard is published. While Redis is unreachable lookups miss,
    puts still go to this writer's files (published when Redis is back), and
    nothing is evicted. After Redis restarts empty, every writer re-publishes
    its chunks within one ``tick`` plus the publish time (about 1 s per 100k
    chunks on loopback). Run Redis without persistence.
    """

    def __init__(self, config: CacheEngineConfig, loop, memory_allocator, dst_device: str = "cuda",
                 writer_id: Optional[str] = None, namespace: str = "gdskv", lease_ttl: float = 5.0,
                 claim_ttl: float = 30.0, tick: float = 0.2):
        url = getattr(config, "lookup_server_url", None)
        if not url:
            raise ConfigError("lookup_server_url", url, "a redis:// URL for shared mode")
        if config.local_disk is None:
            raise ConfigError("local_disk", None, "the shared directory (every process gives the same path)")
        if writer_id is not None and not (isinstance(writer_id, str) and _WRITER_ID.fullmatch(writer_id)):
            raise ConfigError("writer_id", writer_id, "1-64 letters, digits, '.', '_' or '-'")
        self.config = config
        self.shared_dir = os.path.abspath(config.local_disk)
        self.lease_ttl = lease_ttl
        self.tick = tick
        self.memory_allocator = memory_allocator
        self.redis = RedisIndex(url, namespace, lease_ttl, claim_ttl)
        self._errors = _redis_errors()
        self.writer, self.local = self._open_local(config, loop, memory_allocator, dst_device, writer_id)
        self.local.index.__class__ = _OwnEvictionIndex   # no state of its own: only eviction changes
        self.boot = uuid.uuid4().hex[:12]
        self._pub_lock = threading.RLock()
        self._quarantine: list[tuple[float, DiskEntry]] = []   # (monotonic release time, pinned entry)
        self._q_lock = threading.Lock()
        self._readers: dict[str, tuple] = {}    # writer -> (boot, layout, [fd per pool file])
        self._r_lock = threading.Lock()
        self._retired_fds: list[int] = []
        self._stats = {"published": 0, "duplicates": 0, "republishes": 0, "remote_hits": 0, "remote_misses": 0,
                       "lease_expired": 0, "remote_corrupt": 0, "claims_lost": 0, "redis_errors": 0,
                       "leased_evictions": 0, "shared_evictions": 0}
        self.last_republish: Optional[float] = None
        self._epoch: Optional[str] = None
        self._rebuild_seen = 0
        self._dirty = False
        self._no_evict_until = 0.0
        self._hold_s = 0.0          # tests: seconds a remote read sleeps while holding its leases
        self._prefetch = ThreadPoolExecutor(2, thread_name_prefix="gds-kvcache-shared-get")
        try:
            self.republish(purge=True)
        except self._errors as e:
            self._stats["redis_errors"] += 1
            log.warning("Redis %s unreachable at start (%s): chunks are published once it answers",
                        self.redis.url, e)
        self.local.lookup_server = _Publisher(self)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._housekeeping, name="gds-kvcache-shared", daemon=True)
        self._thread.start()

    def _open_local(self, config, loop, alloc, dst_device, writer_id) -> tuple[str, LocalDiskBackend]:
        base = os.path.join(self.shared_dir, WRITERS_DIR)
        ids = [writer_id] if writer_id is not None else [
            f"{re.sub(r'[^A-Za-z0-9._-]', '_', socket.gethostname())[:48]}-{n}" for n in range(1024)]
        for wid in ids:
            cfg = config.replace(local_disk=os.path.join(base, wid))
            try:
                return wid, LocalDiskBackend(cfg, loop, alloc, dst_device, lookup_server=None)
            except DirectoryLockedError:
                if writer_id is not None:
                    raise
        raise DirectoryLockedError(f"no free writer directory under {base!r}")

    # -- publishing --------------------------------------------------------------------
    def _published(self, e: DiskEntry) -> Published:
        return Published(e.key.to_string(), self.writer, str(e.seq), e.offset, e.nbytes, e.phys_size,
                         tuple(e.shape), e.dtype, e.fmt, e.checksum)

    def republish(self, purge: bool = False, batch: int = 2000) -> int:
        """Register this writer and publish every chunk of its index (one round trip per ``batch``).

        ``purge`` first drops what this writer published before (at start:
        its log is the truth). Returns the chunks published.
        """
        idx = self.local.index
        d = self.local._dir
        with self._pub_lock:
            epoch = self.redis.set_epoch()
            self._rebuild_seen = self.redis.rebuild_requests()
            self.redis.register(self.writer, {"dir": os.path.join(WRITERS_DIR, self.writer), "stripes": d.stripes,
                                              "stripe_bytes": d.stripe_bytes, "unit": d.unit, "boot": self.boot})
            if purge:
                self.redis.purge(self.writer)
            keys = idx.keys()
            n = 0
            for i in range(0, len(keys), batch):
                es = [e for e in (idx.entry(k) for k in keys[i:i + batch]) if e is not None]
                dups = self.redis.publish(self.writer, [self._published(e) for e in es])
                self._drop_duplicates(dups)
                n += len(es)
            self._epoch = epoch
            self._stats["republishes"] += 1
            self.last_republish = time.monotonic()
        log.info("writer %s: %d chunk(s) published to %s", self.writer, n, self.redis.url)
        return n

    def request_rebuild(self) -> None:
        """Ask every writer (this one included) to re-publish its chunks within a tick."""
        self.redis.request_rebuild()

    def _housekeeping(self) -> None:
        while not self._stop.wait(self.tick):
            self._release_quarantine()
            try:
                epoch = self.redis.epoch()
                restarted = epoch is None or epoch != self._epoch
                if restarted or self._dirty or self.redis.rebuild_requests() != self._rebuild_seen:
                    if restarted:
                        self._no_evict_until = time.monotonic() + self.lease_ttl + _LEASE_MARGIN
                        log.warning("Redis %s restarted or was emptied: re-publishing writer %s",
                                    self.redis.url, self.writer)
                    dirty, self._dirty = self._dirty, False
                    try:
                        self.republish(purge=dirty and not restarted)
                    except BaseException:
                        self._dirty = self._dirty or dirty
                        raise
            except self._errors as e:
                self._stats["redis_errors"] += 1
                log.debug("housekeeping: Redis unreachable: %s", e)
            except Exception:   # never let the thread die: a missed pass is retried next tick
                log.exception("shared-mode housekeeping failed")

    # -- eviction -------------------------------------------------------------------------
    def _release_quarantine(self) -> None:
        now = time.monotonic()
        with self._q_lock:
            due = [e for t, e in self._quarantine if t <= now]
            self._quarantine = [(t, e) for t, e in self._quarantine if t > now]
        if due:
            self.local.index.end_read(due)

    def _retract_and_remove(self, entries: Sequence[DiskEntry]) -> int:
        """Retract ``entries`` from Redis, then drop them here; leased extents stay pinned until their
        leases end. Caller holds ``_pub_lock``. Returns bytes freed now."""
        idx = self.local.index
        left = self.redis.retract(self.writer, [(e.key.to_string(), str(e.seq)) for e in entries])
        freed = 0
        for e, ms in zip(entries, left):
            if ms > 0:
                pinned = idx.begin_read([e.key])[0]
                if pinned is not e:          # replaced meanwhile: leave the new one alone
                    if pinned is not None:
                        idx.end_read([pinned])
                    continue
                with self._q_lock:
                    self._quarantine.append((time.monotonic() + ms / 1000 + _LEASE_MARGIN, e))
                self._stats["leased_evictions"] += 1
            else:
                freed += e.phys_size
            self.local.remove(e.key)
        return freed

    def _make_room(self, need: int) -> None:
        """Evict this writer's LRU chunks nobody reads until ``need`` bytes are free."""
        idx = self.local.index
        self._release_quarantine()
        if idx.capacity - idx.used >= need:
            return
        if time.monotonic() < self._no_evict_until:
            return
        with self._pub_lock:
            if self.redis.epoch() != self._epoch:
                # A restarted Redis forgot every lease: wait out the longest one before any reuse.
                self._no_evict_until = time.monotonic() + self.lease_ttl + _LEASE_MARGIN
                self._dirty = True
                return
            free = idx.capacity - idx.used
            victims = []
            for k in idx.keys():
                if free >= need:
                    break
                e = idx.entry(k)
                if e is None or e.readers > 0:
                    continue
                victims.append(e)
                free += e.phys_size
            if victims:
                self._retract_and_remove(victims)
                self._stats["shared_evictions"] += len(victims)

    # -- puts ---------------------------------------------------------------------------------
    def batched_submit_put_task(self, keys: Sequence[CacheEngineKey],
                                objs: Sequence[MemoryObj]) -> list[Optional[Future]]:
        """Store ``objs`` under ``keys`` in this writer's files; published once durable.

        Per key, None where the key is stored here, published by any writer,
        or claimed by another writer's put in flight (that writer stores it).
        """
        keys, objs = list(keys), list(objs)
        if len(keys) != len(objs):
            raise GdsKvCacheError(f"{len(keys)} keys but {len(objs)} objects")
        check_keys(keys)
        idx = self.local.index
        try:
            mine = self.redis.claim(self.writer, [k.to_string() for k in keys])
        except self._errors as e:
            self._stats["redis_errors"] += 1
            log.debug("claim failed (%s): storing locally", e)
            mine = [True] * len(keys)
        self._stats["claims_lost"] += mine.count(False)
        sel = [i for i in range(len(keys)) if mine[i] and not idx.contains(keys[i])]
        out: list[Optional[Future]] = [None] * len(keys)
        if not sel:
            return out
        futs = self._submit(keys, objs, sel, 1)
        # Refused at reservation (room fragmented or pinned): evict more and try once again.
        again = [i for i in sel if futs[i] is not None and futs[i].done()
                 and isinstance(futs[i].exception(), StorageFullError)]
        if again:
            futs.update(self._submit(keys, objs, again, 2))
        for i in sel:
            out[i] = futs[i]
        return out

    def _submit(self, keys, objs, sel: list[int], factor: int) -> dict:
        try:
            self._make_room(factor * sum(objs[i].phys_size for i in sel))
        except self._errors as e:     # no eviction without Redis: a reader may hold a lease
            self._stats["redis_errors"] += 1
            log.debug("no eviction while Redis is unreachable: %s", e)
        futs = self.local.batched_submit_put_task([keys[i] for i in sel], [objs[i] for i in sel])
        return dict(zip(sel, futs))

    def batched_put(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> list:
        """Store and wait until published: per key, bytes written, None (skipped) or the exception.

        The async form publishes from the put thread just after its futures
        resolve; this one publishes the batch itself (one round trip), so a
        lookup anywhere sees the chunks once it returns.
        """
        keys = list(keys)
        out = []
        for f in self.batched_submit_put_task(keys, objs):
            if f is None:
                out.append(None)
                continue
            try:
                out.append(f.result())
            except Exception as e:
                out.append(e)
        done = [k for k, r in zip(keys, out) if isinstance(r, int)]
        if done:
            try:
                self._publish_current(done)
            except self._errors as e:
                self._dirty = True
                self._stats["redis_errors"] += 1
                log.debug("publish failed (%s): re-published when Redis answers", e)
        return out

    def _publish_current(self, keys: Sequence[CacheEngineKey]) -> None:
        """Publish the current entries of ``keys`` (idempotent with the insert events)."""
        with self._pub_lock:
            es = [e for e in (self.local.index.entry(k) for k in keys) if e is not None]
            dups = self.redis.publish(self.writer, [self._published(e) for e in es])
            self._stats["published"] += len(es)
            self._drop_duplicates(dups)

    def _drop_duplicates(self, dups: Sequence[str]) -> None:
        """Drop this writer's copies of keys another writer published first (both stored them
        while Redis was down or restarting). Unpublished here, so no remote reader holds them;
        kept, they would stay unlisted when the other writer evicts its copy."""
        for k in dups:
            self._stats["duplicates"] += 1
            try:
                self.local.remove(CacheEngineKey.from_string(k))
            except GdsKvCacheError as e:     # closing: the next start re-publishes or drops it
                log.debug("keeping duplicate %s: %s", k, e)

    # -- lookups ---------------------------------------------------------------------------------
    @staticmethod
    def shards(key: CacheEngineKey) -> list[str]:
        """The key of every tensor-parallel rank's shard of ``key``'s chunk."""
        if key.world_size <= 1:
            return [key.to_string()]
        return [dataclasses.replace(key, worker_id=r).to_string() for r in range(key.world_size)]

    def batched_contains(self, keys: Sequence[CacheEngineKey]) -> int:
        """Hit prefix of ``keys`` over all writers and all ranks, in one Redis round trip (0 if
        Redis is unreachable: a miss, never a promise another rank cannot keep)."""
        keys = list(keys)
        check_keys(keys)
        try:
            return self.redis.prefix([self.shards(k) for k in keys])
        except self._errors as e:
            self._stats["redis_errors"] += 1
            log.debug("lookup failed: %s", e)
            return 0

    def contains(self, key: CacheEngineKey) -> bool:
        return self.batched_contains([key]) == 1

    # -- gets ---------------------------------------------------------------------------------------
    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Per key the chunk (one reference, the caller's) or None: this writer's chunks from its
        own files, others' from theirs under a lease, each checked against its checksum."""
        keys = list(keys)
        check_keys(keys)
        out: list[Optional[MemoryObj]] = [None] * len(keys)
        idx = self.local.index
        here = [i for i, k in enumerate(keys) if idx.contains(k)]
        if here:
            for i, o in zip(here, self.local.batched_get_blocking([keys[i] for i in here])):
                out[i] = o
        local = set(here)
        rest = [i for i in range(len(keys)) if i not in local]
        if rest:
            self._read_remote(keys, rest, out)
        return out

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return self.batched_get_blocking([key])[0]

    def batched_submit_prefetch_task(self, keys: Sequence[CacheEngineKey]) -> Future:
        keys = list(keys)
        check_keys(keys)
        return self._prefetch.submit(self.batched_get_blocking, keys)

    def _read_remote(self, keys, which: list[int], out: list) -> None:
        token = self.redis.new_token(self.writer)
        t0 = time.monotonic()
        try:
            pubs = self.redis.acquire(token, [keys[i].to_string() for i in which])
        except self._errors as e:
            self._stats["redis_errors"] += 1
            log.debug("remote read: Redis unreachable: %s", e)
            return
        held = [p for p in pubs if p is not None]
        got: list[tuple[int, Published, MemoryObj]] = []
        try:
            if self._hold_s and held:
                time.sleep(self._hold_s)
            for i, p in zip(which, pubs):
                if p is None or p.writer == self.writer:   # ours but gone here: retracted meanwhile
                    continue
                try:
                    dtype, shape, fmt = str_to_dtype(p.dtype), torch.Size(p.shape), MemoryFormat[p.fmt]
                except (GdsKvCacheError, KeyError) as exc:
                    log.warning("ignoring entry %s of writer %s: %s", p.key, p.writer, exc)
                    continue
                obj = self.memory_allocator.allocate(shape, dtype, fmt)
                if obj is None:
                    break    # no slab room now: the rest are misses
                if obj.nbytes != p.nbytes or not self._pread(p, obj):
                    obj.ref_count_down()
                    continue
                got.append((i, p, obj))
            if got:
                buf = got[0][2]._alloc.buffer.tensor
                sums = checksum_batch(buf, [(o.offset, o.nbytes) for _, _, o in got], ordered=False)
                late = time.monotonic() > t0 + self.lease_ttl
                for (i, p, o), s in zip(got, sums):
                    if late:
                        self._stats["lease_expired"] += 1
                    elif s != p.checksum:
                        self._stats["remote_corrupt"] += 1
                        log.warning("chunk %s of writer %s failed its checksum: a miss", p.key, p.writer)
                    else:
                        out[i] = o
                        continue
                    o.ref_count_down()
                got = []
            n_hit = sum(1 for i in which if out[i] is not None)
            self._stats["remote_hits"] += n_hit
            self._stats["remote_misses"] += len(which) - n_hit
        finally:
            for _, _, o in got:
                o.ref_count_down()
            try:
                self.redis.release(token, held)
            except self._errors as e:    # the leases expire on their own
                self._stats["redis_errors"] += 1
                log.debug("lease release failed: %s", e)

    def _files_of(self, writer: str, boot: str) -> Optional[tuple[dict, list]]:
        with self._r_lock:
            have = self._readers.get(writer)
            if have is not None and have[0] == boot:
                return have[1], have[2]   # (boot, layout, fds)
        lay = self.redis.layout(writer)
        if not lay:
            return None
        path = os.path.join(self.shared_dir, lay["dir"])
        fds = []
        try:
            for f in range(int(lay["stripes"])):
                fds.append(os.open(os.path.join(path, f"{POOL_NAME}.{f}"), os.O_RDONLY))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            log.warning("cannot open writer %s's pool files: %s", writer, e)
            return None
        with self._r_lock:
            old = self._readers.pop(writer, None)
            self._readers[writer] = (lay.get("boot", ""), lay, fds)
            if old is not None:
                # Closed only at close(): a read in flight may still use them, and a closed
                # number reused by another open would read the wrong file.
                self._retired_fds += old[2]
        return lay, fds

    def _pread(self, p: Published, obj: MemoryObj) -> bool:
        files = self._files_of(p.writer, p.boot)
        if files is None:
            return False
        lay, fds = files
        host = obj.device.type == "cpu"
        dst = obj.raw_data.numpy() if host else bytearray(p.nbytes)
        mv = memoryview(dst).cast("B")
        try:
            for f, local, delta, n in pieces(p.offset, p.nbytes, int(lay["stripes"]), int(lay["unit"])):
                if os.preadv(fds[f], [mv[delta:delta + n]], local) != n:
                    return False
        except (OSError, IndexError) as e:
            log.warning("reading chunk %s of writer %s: %s", p.key, p.writer, e)
            return False
        if not host:
            obj.byte_array.copy_(torch.frombuffer(dst, dtype=torch.uint8))
            torch.cuda.current_stream(obj.device).synchronize()
        return True

    # -- management ---------------------------------------------------------------------------------
    def remove(self, key: CacheEngineKey) -> bool:
        """Drop this writer's chunk ``key`` (retracted from Redis first); False if it is not
        stored here (another writer's chunk is only ever removed by that writer) or Redis is
        unreachable (removing then could pull bytes from under a reader's lease)."""
        check_keys([key])
        e = self.local.index.entry(key)
        if e is None:
            return False
        with self._pub_lock:
            if self.local.index.entry(key) is not e:
                return False
            try:
                self._retract_and_remove([e])
            except self._errors as exc:
                self._stats["redis_errors"] += 1
                log.warning("not removing %s: Redis unreachable (%s)", key.to_string(), exc)
                return False
        return True

    def keys(self) -> list[CacheEngineKey]:
        """This writer's chunks."""
        return self.local.keys()

    @property
    def stats(self) -> dict:
        out = self.local.stats
        out.update(self._stats)
        return out

    def wait_for_puts(self, timeout: Optional[float] = None) -> bool:
        return self.local.wait_for_puts(timeout)

    def memcheck(self) -> bool:
        return self.local.memcheck()

    def close(self) -> None:
        """Stop housekeeping, close this writer's backend (its chunks stay published and readable:
        the files remain) and the Redis client."""
        self._stop.set()
        self._thread.join()
        self._prefetch.shutdown(wait=True)
        with self._q_lock:
            pinned, self._quarantine = [e for _, e in self._quarantine], []
        if pinned:
            self.local.index.end_read(pinned)
        try:
            self.local.close()
        finally:
            with self._r_lock:
                for fd in [fd for _, _, fds in self._readers.values() for fd in fds] + self._retired_fds:
                    os.close(fd)
                self._readers.clear()
                self._retired_fds.clear()
            self.redis.close()

    def __enter__(self) -> "SharedDiskBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
