"""``LocalDiskBackend``: KV chunks in one preallocated pool file, indexed by a crash-safe log.

Layout: ``kvcache.pool.<i>`` (sparse files, together ``max_local_disk_size``
minus the index reserve) hold chunks at 4 KiB-aligned extents handed out by
the same extent allocator as the memory slab; ``kvcache.index`` records each
chunk's extent, shape, dtype and checksum once its bytes are fully written.
The pool files are opened once per backend, so no per-chunk open, create or
cuFile registration sits on the put/get path, and consecutive chunks go to
different files so writes proceed in parallel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from ..config import CacheEngineConfig
from ..errors import CorruptChunkError, GdsKvCacheError, KeyFormatError, ShapeMismatchError, StorageFullError
from ..io import IOEngine, IOPathReport, open_engine
from ..kernels.checksum import checksum, checksum_host, warmup_cuda
from ..key import CacheEngineKey
from ..memory.allocator import MemoryAllocatorInterface
from ..memory.format import MemoryFormat, dtype_to_str, str_to_dtype
from ..memory.obj import MemoryObj
from ..units import PAGE
from .abstract_backend import StorageBackendInterface
from .disk_index import DiskEntry, IndexLog
from .lookup_server import LookupServerInterface
from .pool_file import PoolDirectory, index_reserve, punch_hole
from .striped_space import StripedSpace

__all__ = ["LocalDiskBackend"]

log = logging.getLogger(__name__)


def _is_no_space(exc: BaseException) -> bool:
    # KvikIO reports POSIX errors as RuntimeError with the strerror text.
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


class LocalDiskBackend(StorageBackendInterface):
    """The disk tier.

    Parameters
    ----------
    config
        ``local_disk`` and ``max_local_disk_size`` must be set.
    loop
        An asyncio loop; ``async_load_bytes_from_disk`` runs its read in this
        backend's executor from whatever loop awaits it. Puts and prefetches
        do not hop through the loop (one fewer thread switch per chunk), so
        None is accepted.
    memory_allocator
        Where chunks read back are allocated.
    dst_device
        Kept for API compatibility; chunks land where the allocator's slab is.
    lookup_server
        Told of every key stored and dropped; None for none.

    Notes
    -----
    A chunk is visible (``contains``) only once its bytes are on disk and its
    index record is appended. A chunk being read is never evicted or freed
    under the reader: its extent is released when the last reader finishes.
    A new backend on the same directory finds every chunk written before.
    Only one process may open a directory at a time.
    """

    def __init__(self, config: CacheEngineConfig, loop: Optional[asyncio.AbstractEventLoop],
                 memory_allocator: MemoryAllocatorInterface, dst_device: str = "cuda",
                 lookup_server: Optional[LookupServerInterface] = None):
        super().__init__(dst_device)
        if config.local_disk is None:
            raise GdsKvCacheError("LocalDiskBackend needs config.local_disk")
        self.config = config
        self.loop = loop
        self.memory_allocator = memory_allocator
        self.lookup_server = lookup_server
        self.verify = config.verify_checksums
        self._dir = PoolDirectory(config.local_disk, config.disk_bytes, config.pool_files, config.preallocate)
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheEngineKey, DiskEntry] = OrderedDict()
        self._put_tasks: dict[CacheEngineKey, Future] = {}
        self._cancelled: set[CacheEngineKey] = set()
        self._space = StripedSpace(self._dir.stripes, self._dir.stripe_bytes)
        self._index = IndexLog(self._dir.index_path)
        self._reserve = index_reserve(config.disk_bytes)
        self.stats = {"puts": 0, "gets": 0, "hits": 0, "evictions": 0, "corrupt": 0, "put_errors": 0}
        try:
            self._recover()
            memory = getattr(memory_allocator, "kind", str(memory_allocator.device))
            self._engine: IOEngine = open_engine(self._dir.pool_paths, config, memory, self._dir.stripe_bytes)
        except BaseException:
            self._index.close()
            self._dir.release()
            raise
        self._executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="gds-kvcache-disk")
        self._closed = False
        # Compile (or load from Numba's cache) the checksum kernel now rather
        # than inside the first put's timing.
        if memory_allocator.device.type == "cuda":
            warmup_cuda(memory_allocator.device)
        else:
            checksum_host(b"warm")

    # -- start-up ------------------------------------------------------------
    def _recover(self) -> None:
        entries, bad = self._index.replay()
        kept = self._resolve_extents(entries)
        bad += len(entries) - len(kept)
        self._space.rebuild({e.offset: e.phys_size for e in kept})
        kept.sort(key=lambda e: e.seq)
        for e in kept:
            self._entries[e.key] = e
            if self.lookup_server is not None:
                self.lookup_server.insert(e.key)
        self._index.rewrite(kept)
        # Free pool space may hold bytes of writes a crash interrupted: give
        # the blocks back so disk usage tracks live chunks (unless the pool is
        # preallocated on purpose).
        if self.config.preallocate:
            return self._log_recovered(kept, bad)
        fds = [os.open(p, os.O_RDWR) for p in self._dir.pool_paths]
        try:
            for start, size in self._space.free_extents().items():
                i, local = divmod(start, self._dir.stripe_bytes)
                punch_hole(fds[i], local, size)
        finally:
            for fd in fds:
                os.close(fd)
        self._log_recovered(kept, bad)

    def _resolve_extents(self, entries: list[DiskEntry]) -> list[DiskEntry]:
        """Entries whose extents fit the pool and overlap no other, in one sweep by offset.

        Where two claim overlapping bytes only the newer (higher seq) can own them:
        the older one's delete record was lost or altered.
        """
        stripe = self._dir.stripe_bytes
        kept: list[DiskEntry] = []
        for e in sorted(entries, key=lambda e: e.offset):
            i, local = divmod(e.offset, stripe)
            if e.offset % PAGE or i >= self._dir.stripes or local + e.phys_size > stripe:
                log.warning("dropping index entry %s: extent [%d, +%d) is outside the pool",
                            e.key.to_string(), e.offset, e.phys_size)
                continue
            if kept and kept[-1].offset + kept[-1].phys_size > e.offset:
                loser = kept[-1] if kept[-1].seq < e.seq else e
                log.warning("dropping index entry %s: its extent overlaps a newer chunk's", loser.key.to_string())
                if loser is e:
                    continue
                kept.pop()
            kept.append(e)
        return kept

    def _log_recovered(self, kept: list, bad: int) -> None:
        if bad:
            log.warning("index of %s: %d unusable record(s) skipped", self._dir.path, bad)
        log.info("disk tier %s: %d chunk(s) recovered, %d of %d pool bytes used",
                 self._dir.path, len(kept), self._space.used, self._space.capacity)

    # -- helpers -------------------------------------------------------------
    def _reserve_space_locked(self, nbytes: int) -> Optional[int]:
        while True:
            off = self._space.allocate(nbytes)
            if off is not None:
                return off
            victim = next((k for k, e in self._entries.items() if e.readers == 0), None)
            if victim is None:
                return None
            self._drop_locked(victim, "evicted")
            self.stats["evictions"] += 1

    def _drop_locked(self, key: CacheEngineKey, why: str, punch: bool = False) -> Optional[DiskEntry]:
        e = self._entries.pop(key, None)
        if e is None:
            return None
        # The delete record goes out before the extent can be reused, so a
        # crash can never resurrect this key over another chunk's bytes.
        self._index.append_del(key)
        if e.readers > 0:
            e.doomed = True
        else:
            if punch and not self.config.preallocate:  # before the extent can be handed out again
                path, local = self._dir.locate(e.offset)
                fd = os.open(path, os.O_RDWR)
                try:
                    punch_hole(fd, local, e.phys_size)
                finally:
                    os.close(fd)
            self._space.free_extent(e.offset)
        if self.lookup_server is not None:
            self.lookup_server.remove(key)
        log.debug("disk tier: %s %s", why, key.to_string())
        return e

    def _maybe_compact_locked(self) -> None:
        # Only dead records are worth a rewrite: compacting on size alone would
        # rewrite (and fsync) the whole live index on every put once the live
        # index outgrows the threshold. Amortised: each rewrite follows at least
        # max(1024, live/4) dead records.
        live = len(self._entries)
        dead = self._index.records - live
        over = self._index.bytes > self._reserve // 2
        if dead > max(1024, live) or (over and dead > max(1024, live // 4)):
            self._index.rewrite(self._entries.values())

    @staticmethod
    def _producer_done(obj: MemoryObj):
        """An event the I/O thread waits on: bytes written by kernels queued on the caller's
        stream (a pack) must land before they are copied out. None for host memory."""
        if obj.device.type != "cuda":
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(obj.device))
        return ev

    # -- puts ----------------------------------------------------------------
    def contains(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._entries

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._put_tasks

    def submit_put_task(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Optional[Future]:
        """Write ``memory_obj`` under ``key`` in the background.

        Returns
        -------
        Future or None
            None if ``key`` is stored or being stored. Otherwise a future whose
            result is the bytes written, or whose exception says why the put
            failed (``StorageFullError`` when nothing can be evicted, an
            ``OSError`` such as ENOSPC from the file system). A failed put
            leaves every earlier chunk in place.
        """
        if self._closed:
            raise GdsKvCacheError("backend is closed")
        fut: Future = Future()
        with self._lock:
            if key in self._entries or key in self._put_tasks:
                return None
            off = self._reserve_space_locked(memory_obj.phys_size)
            if off is None:
                fut.set_exception(StorageFullError(
                    f"no room for {memory_obj.phys_size} bytes in {self._space.capacity}-byte pool "
                    "(every chunk is being read)"))
                return fut
            memory_obj.ref_count_up()
            self._put_tasks[key] = fut
        self._executor.submit(self._do_put, key, memory_obj, off, fut, self._producer_done(memory_obj))
        return fut

    def _do_put(self, key: CacheEngineKey, obj: MemoryObj, off: int, fut: Future, ready) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            csum = checksum(obj.byte_array, ordered=False)  # ready: the producer's work is done
            self._write_making_room(obj, off)
            e = DiskEntry(key, off, obj.nbytes, obj.phys_size, tuple(obj.shape), dtype_to_str(obj.dtype),
                          obj.fmt.name, csum)
            with self._lock:
                del self._put_tasks[key]
                if key in self._cancelled:
                    self._cancelled.discard(key)
                    self._space.free_extent(off)
                else:
                    e.seq = self._index.next_seq()
                    self._index.append_put(e)
                    self._entries[key] = e
                    self.stats["puts"] += 1
                    self._maybe_compact_locked()
            if self.lookup_server is not None and not fut.cancelled():
                self.lookup_server.insert(key)
            fut.set_result(obj.phys_size)
        except BaseException as exc:  # the future carries it; the process keeps serving
            with self._lock:
                self._put_tasks.pop(key, None)
                self._cancelled.discard(key)
                self._space.free_extent(off)
                self.stats["put_errors"] += 1
            log.warning("put of %s failed: %s", key.to_string(), exc)
            fut.set_exception(exc)
        finally:
            obj.ref_count_down()

    def _write_making_room(self, obj: MemoryObj, off: int) -> None:
        """Write; when the file system is full, evict LRU chunks (giving their blocks back)
        and retry, until the write fits or nothing is left to evict."""
        while True:
            try:
                self._engine.write(obj, off, obj.phys_size)
                return
            except (OSError, RuntimeError) as exc:
                if not _is_no_space(exc):
                    raise
                with self._lock:
                    victim = next((k for k, e in self._entries.items() if e.readers == 0), None)
                    if victim is None:
                        raise
                    self._drop_locked(victim, "evicted: file system full", punch=True)
                    self.stats["evictions"] += 1
                log.warning("file system of %s full: evicted %s to make room", self._dir.path,
                            victim.to_string())

    def insert_key(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        """Store ``memory_obj`` under ``key`` and return once it is on disk and indexed."""
        fut = self.submit_put_task(key, memory_obj)
        if fut is not None:
            fut.result()

    def async_save_bytes_to_disk(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        """Start storing ``memory_obj``; completion shows in ``contains`` (fire and forget)."""
        self.submit_put_task(key, memory_obj)

    # -- gets ----------------------------------------------------------------
    def _read_entry(self, key: CacheEngineKey, want_dtype: Optional[torch.dtype] = None,
                    want_shape=None) -> Optional[MemoryObj]:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return None
            self.stats["gets"] += 1
            e.readers += 1
            self._entries.move_to_end(key)
        obj = None
        try:
            dtype = str_to_dtype(e.dtype)
            shape = torch.Size(e.shape)
            if want_dtype is not None and want_dtype != dtype:
                raise ShapeMismatchError(f"chunk {key.to_string()} holds {e.dtype}, not {dtype_to_str(want_dtype)}")
            if want_shape is not None:
                want_shape = torch.Size(want_shape)
                if math.prod(want_shape) != math.prod(shape):
                    raise ShapeMismatchError(
                        f"chunk {key.to_string()} holds shape {tuple(shape)} ({e.nbytes} bytes); "
                        f"cannot load it as {tuple(want_shape)}")
                shape = want_shape
            obj = self.memory_allocator.allocate(shape, dtype, MemoryFormat[e.fmt])
            if obj is None:
                log.debug("no slab room to read %s", key.to_string())
                return None
            if obj.phys_size != e.phys_size:
                raise CorruptChunkError(f"index size {e.phys_size} != {obj.phys_size} for {tuple(shape)}")
            self._engine.read(obj, e.offset, e.phys_size)
            # The engine returns only once the bytes have landed: no stream to wait for.
            if self.verify and checksum(obj.byte_array, ordered=False) != e.checksum:
                raise CorruptChunkError(f"checksum mismatch for chunk {key.to_string()}")
            with self._lock:
                self.stats["hits"] += 1
            return obj
        except ShapeMismatchError:
            if obj is not None:
                obj.ref_count_down()
            raise
        except (OSError, CorruptChunkError, KeyError, ValueError) as exc:
            # Altered, truncated or unreadable bytes: a miss, never wrong data.
            log.warning("dropping chunk %s from %s: %s", key.to_string(), self._dir.path, exc)
            if obj is not None:
                obj.ref_count_down()
            with self._lock:
                self.stats["corrupt"] += 1
                if self._entries.get(key) is e:
                    self._drop_locked(key, "corrupt")
            return None
        finally:
            with self._lock:
                e.readers -= 1
                if e.doomed and e.readers == 0:
                    self._space.free_extent(e.offset)

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """Read ``key``; the object (one reference, the caller's) or None if absent or unreadable."""
        return self._read_entry(key)

    def submit_prefetch_task(self, key: CacheEngineKey) -> Optional[Future]:
        """Start reading ``key``; None if absent, else a future of ``MemoryObj | None``."""
        if not self.contains(key):
            return None
        return self._executor.submit(self._read_entry, key)

    def _key_from_path(self, path: str) -> CacheEngineKey:
        name = os.path.basename(str(path))
        try:
            return CacheEngineKey.from_string(name)
        except KeyFormatError as e:
            raise KeyFormatError(f"{path!r} names no chunk of this backend: {e}") from None

    def load_bytes_from_disk(self, path: str, dtype: torch.dtype, shape) -> Optional[MemoryObj]:
        """Load the chunk named ``path`` (its key string) as ``shape``/``dtype``.

        Raises ``ShapeMismatchError`` if they do not match the stored bytes.
        """
        return self._read_entry(self._key_from_path(path), dtype, shape)

    def load_disk(self, path: str, backend: str = "bytes", dtype: Optional[torch.dtype] = None,
                  shape=None) -> Optional[MemoryObj]:
        """Load the chunk named ``path``; ``backend`` must be ``bytes`` (the only on-disk format)."""
        if backend != "bytes":
            raise GdsKvCacheError(f"load_disk backend {backend!r} not supported; use 'bytes'")
        return self._read_entry(self._key_from_path(path), dtype, shape)

    async def async_load_bytes_from_disk(self, path: str, dtype: torch.dtype, shape) -> Optional[MemoryObj]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.load_bytes_from_disk, path, dtype, shape)

    # -- management ----------------------------------------------------------
    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            if key in self._put_tasks:
                self._cancelled.add(key)
                return True
            # An explicit remove gives the blocks back to the file system too.
            return self._drop_locked(key, "removed", punch=True) is not None

    def keys(self) -> list[CacheEngineKey]:
        with self._lock:
            return list(self._entries)

    def entry(self, key: CacheEngineKey) -> Optional[DiskEntry]:
        with self._lock:
            return self._entries.get(key)

    @property
    def path(self) -> str:
        return self._dir.path

    @property
    def pool_paths(self) -> list[str]:
        return list(self._dir.pool_paths)

    def locate(self, offset: int) -> tuple[str, int]:
        """(pool file, offset in it) of a chunk's logical offset (``entry(key).offset``)."""
        return self._dir.locate(offset)

    @property
    def used_bytes(self) -> int:
        return self._space.used

    @property
    def capacity_bytes(self) -> int:
        return self._space.capacity

    def disk_usage(self) -> int:
        return self._dir.disk_usage()

    def io_report(self) -> IOPathReport:
        return self._engine.report()

    def wait_for_puts(self, timeout: Optional[float] = None) -> None:
        with self._lock:
            pending = list(self._put_tasks.values())
        for f in pending:
            try:
                f.result(timeout)
            except Exception:
                pass  # already logged; the future's owner sees it

    def wait_for_oldest_put(self, timeout: Optional[float] = None) -> bool:
        """Wait for the oldest in-flight put; False if none was in flight."""
        with self._lock:
            fut = next(iter(self._put_tasks.values()), None)
        if fut is None:
            return False
        try:
            fut.result(timeout)
        except Exception:
            pass  # already logged; the future's owner sees it
        return True

    def memcheck(self) -> bool:
        with self._lock:
            self._space.memcheck()
            ext = self._space.extents()
            live = {e.offset: e for e in self._entries.values()}
            for off, e in live.items():
                assert ext.get(off) == e.phys_size, f"entry {e.key} extent not allocated"
                assert e.readers >= 0, f"negative reader count on {e.key}"
        return True

    def close(self) -> None:
        if self._closed:
            return
        self.wait_for_puts()
        self._closed = True
        self._executor.shutdown(wait=True)
        self._engine.close()
        with self._lock:
            self._index.rewrite(self._entries.values())
            self._index.close()
        self._dir.release()
