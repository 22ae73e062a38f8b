"""``LocalDiskBackend``: LMCache's disk-tier API over the disk index and the transfer side.

A thin facade: ``DiskIndex`` decides which chunk lives where (and owns
recovery, eviction and the index files); ``DiskTransfer`` moves a batch of
chunks in few large transfers through an ``IOEngine`` and checksums them in
one launch. This module adds what joins them: batching and the put and get
thread pools, outside the index lock. Its helpers each hold one idea:
``disk_catalog`` (the base class: lookups that move no bytes), ``pool_open``
(opening a directory, all or nothing), ``call_gate`` (lifetime: ``close``
drains every call in flight), ``holes`` (hole punching), ``lookup_events``
(the lookup server) and ``checks`` (argument checks).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from ..config import CacheEngineConfig
from ..errors import GdsKvCacheError
from ..kernels.checksum import checksum_host, warmup_cuda
from ..key import CacheEngineKey
from ..memory.allocator import MemoryAllocatorInterface
from ..memory.format import check_dtype, check_shape, dtype_to_str
from ..memory.obj import MemoryObj
from .call_gate import CallGate
from .checks import check_chunks, check_keys, key_from_path
from .disk_catalog import DiskCatalog
from .disk_index import DiskEntry
from .eviction import EvictionStrategy, FreeAtOnce
from .lookup_events import LookupEvents
from .lookup_server import LookupServerInterface
from .pool_open import open_pool
from .transfer import DiskTransfer

__all__ = ["LocalDiskBackend", "check_keys"]   # check_keys: re-exported from ``checks``

log = logging.getLogger(__name__)


class LocalDiskBackend(DiskCatalog):
    """The disk tier (its lookups that move no bytes: ``DiskCatalog``).

    Parameters
    ----------
    config
        ``local_disk`` and ``max_local_disk_size`` must be set.
    loop
        An asyncio loop; ``async_load_bytes_from_disk`` runs its read in this
        backend's read pool from whatever loop awaits it. None is accepted.
    memory_allocator
        The slab allocator: chunks read back are allocated from it, and chunks
        put must live in its slab. It is never asked to wait: a read that
        finds no room is a miss.
    dst_device
        Kept for API compatibility; chunks land where the allocator's slab is.
    lookup_server
        Told of every key stored and dropped, outside every lock; its errors
        are logged and counted (``stats["lookup_errors"]``) and never change
        what this backend stores.
    eviction
        When dropped extents are reused and who makes room
        (``storage.eviction``). None: ``FreeAtOnce``, the backend evicts LRU
        chunks on its own when the pool or the file system is full. Shared
        mode hands a ``DeferredFree`` strategy that retracts a chunk from
        Redis and waits out readers' leases before its extent is reused.

    Notes
    -----
    A chunk is visible (``contains``) only once its bytes are on disk and its
    index record is appended. A chunk being read is never evicted or freed
    under the reader. Puts and reads run on separate thread pools, so a read
    never queues behind a write or the reverse. ``close()`` refuses new calls
    (``ClosedError``), waits for those in flight, and always releases the
    directory. Only one process may open a directory at a time.
    """

    def __init__(self, config: CacheEngineConfig, loop: Optional[asyncio.AbstractEventLoop],
                 memory_allocator: MemoryAllocatorInterface, dst_device: str = "cuda",
                 lookup_server: Optional[LookupServerInterface] = None,
                 eviction: Optional[EvictionStrategy] = None):
        if config.local_disk is None:
            raise GdsKvCacheError("LocalDiskBackend needs config.local_disk")
        self.config = config
        self.loop = loop
        self.memory_allocator = memory_allocator
        self.eviction = eviction if eviction is not None else FreeAtOnce()
        self.verify = config.verify_checksums
        self._buffer = memory_allocator.buffer
        opened = open_pool(config, memory_allocator, self.eviction, events=lookup_server is not None)
        super().__init__(dst_device, opened)
        self._holes = opened.holes
        self._transfer = DiskTransfer(self._engine, self._dir)
        # Separate pools: a read waiting for slab room can never hold up the
        # write that would free it, and the reverse.
        self._writer = ThreadPoolExecutor(config.io_threads, thread_name_prefix="gds-kvcache-put")
        self._reader = ThreadPoolExecutor(config.io_threads, thread_name_prefix="gds-kvcache-get")
        self._gate = CallGate(f"disk backend on {self._dir.path}")
        self._events = LookupEvents(self.index, lookup_server)
        self._stats = {"puts": 0, "gets": 0, "hits": 0, "corrupt": 0, "put_errors": 0}
        self._events.deliver()
        # Compile (or load from Numba's cache) the checksum kernel now rather
        # than inside the first put's timing.
        if memory_allocator.device.type == "cuda":
            warmup_cuda(memory_allocator.device)
        else:
            checksum_host(b"warm")

    # -- the lookup server and counters ------------------------------------------
    @property
    def lookup_server(self) -> Optional[LookupServerInterface]:
        return self._events.server

    @lookup_server.setter
    def lookup_server(self, server: Optional[LookupServerInterface]) -> None:
        """Attach (or detach) a lookup server after construction; it hears of changes from then on."""
        self._events.attach(server)

    @property
    def stats(self) -> dict:
        out = dict(self._stats)
        out["lookup_errors"] = self._events.errors
        out.update(self.index.stats)
        out.update(self._transfer.stats)
        return out

    # -- puts ------------------------------------------------------------------
    def check_objs(self, objs: Sequence[MemoryObj]) -> None:
        """Raise unless every object can be stored here (live, non-empty, in this backend's slab)."""
        check_chunks(objs, self._buffer)

    def batched_submit_put_task(self, keys: Sequence[CacheEngineKey],
                                objs: Sequence[MemoryObj]) -> list[Optional[Future]]:
        """Write ``objs`` under ``keys`` in the background, as one batch.

        Returns
        -------
        list of Future or None
            Per key: None if it is stored or being stored (or repeats an
            earlier key of the batch); else a future whose result is the bytes
            written, or whose exception says why that put failed
            (``StorageFullError``, an ``OSError`` such as ENOSPC). A failed put
            leaves every other chunk in place.

        Notes
        -----
        The batch's chunks get adjacent extents where free space allows, are
        written in one transfer per run, checksummed in one launch and
        recorded with one index append. The backend holds its own reference
        on each object until its write is done.
        """
        keys, objs = list(keys), list(objs)
        if len(keys) != len(objs):
            raise GdsKvCacheError(f"{len(keys)} keys but {len(objs)} objects")
        check_keys(keys)
        self.check_objs(objs)
        self._gate.enter()
        try:
            self.eviction.make_room(sum(o.phys_size for o in objs), len(objs))
            res = self.index.reserve(keys, [o.phys_size for o in objs])
            futs: dict[CacheEngineKey, Future] = {}
            for k, exc in res.errors.items():
                f: Future = Future()
                f.set_exception(exc)
                futs[k] = f
                self._stats["put_errors"] += 1
            if res.keys:
                by_key = dict(zip(keys, objs))
                batch = [by_key[k] for k in res.keys]
                for o in batch:
                    o.ref_count_up()
                mine = [Future() for _ in res.keys]
                futs.update(zip(res.keys, mine))
                ready = self._producer_done(batch[0])
                self._gate.put_started()
                self._writer.submit(self._write_batch, res.keys, batch, res.offsets, mine, ready)
        finally:
            self._gate.exit()
        self._events.deliver()
        out: list[Optional[Future]] = []
        for k in keys:
            out.append(futs.pop(k, None))  # a repeated key gets None the second time
        return out

    def submit_put_task(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Optional[Future]:
        """``batched_submit_put_task`` for one chunk."""
        return self.batched_submit_put_task([key], [memory_obj])[0]

    @staticmethod
    def _producer_done(obj: MemoryObj):
        """An event the put thread waits on: bytes written by kernels queued on the caller's
        stream (a pack) must land before they are copied out. None for host memory."""
        if obj.device.type != "cuda":
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(obj.device))
        return ev

    def _write_batch(self, keys, objs, offsets, futs, ready) -> None:
        results: list = [None] * len(keys)
        try:
            if ready is not None:
                ready.synchronize()
            csums, errs = self._transfer.write_checksummed(objs, offsets, keys, on_full=self._on_full)
            done, failed = [], []
            for i, (k, o, off, err) in enumerate(zip(keys, objs, offsets, errs)):
                if err is None:
                    done.append(DiskEntry(k, off, o.nbytes, o.phys_size, tuple(o.shape), dtype_to_str(o.dtype),
                                          o.fmt.name, csums[i]))
                    results[i] = o.phys_size
                else:
                    failed.append(k)
                    results[i] = err
            self.index.commit(done, failed)
        except BaseException as exc:  # every future carries it; the process keeps serving
            self.index.abort(keys)
            results = [exc] * len(keys)
        finally:
            for o in objs:
                o.ref_count_down()
            self._gate.put_finished()
        n_ok = 0
        for k, f, r in zip(keys, futs, results):
            if isinstance(r, BaseException):
                log.warning("put of %s failed: %s", k.to_string(), r)
                f.set_exception(r)
            else:
                n_ok += 1
                f.set_result(r)
        self._stats["puts"] += n_ok
        self._stats["put_errors"] += len(keys) - n_ok
        try:
            self._events.deliver()
        finally:
            self._gate.exit()

    def _on_full(self) -> bool:
        """The file system is full: the strategy makes room (True) or cannot (False)."""
        if not self.eviction.on_full():
            return False
        log.warning("file system of %s full: evicted a chunk to make room", self._dir.path)
        return True

    def insert_key(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        """Store ``memory_obj`` under ``key`` and return once it is on disk and indexed."""
        fut = self.submit_put_task(key, memory_obj)
        if fut is not None:
            fut.result()

    def async_save_bytes_to_disk(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        """Start storing ``memory_obj``; completion shows in ``contains`` (fire and forget)."""
        self.submit_put_task(key, memory_obj)

    # -- gets ---------------------------------------------------------------------
    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Read ``keys`` as one batch; per key the object (one reference, the caller's) or None.

        None means absent, unreadable or corrupt (dropped, with a warning), or
        no slab room right now. Chunks stored together are read in one
        transfer per run and verified in one checksum launch.
        """
        keys = list(keys)
        check_keys(keys)
        self._gate.enter()
        try:
            return self._read(keys)
        finally:
            self._gate.exit()
            self._events.deliver()

    def _read(self, keys, want=None) -> list[Optional[MemoryObj]]:
        entries = self.index.begin_read(keys)
        out: list[Optional[MemoryObj]] = [None] * len(keys)
        pinned = [e for e in entries if e is not None]
        bad: list[DiskEntry] = []
        try:
            self._stats["gets"] += len(keys)
            hits = [i for i, e in enumerate(entries) if e is not None]
            got = self._transfer.read_verified(self.memory_allocator, pinned, self.verify, want)
            for j, why in got.bad:
                log.warning("dropping chunk %s from %s: %s", pinned[j].key.to_string(), self._dir.path, why)
                bad.append(pinned[j])
            for i, o in zip(hits, got.objs):
                out[i] = o
            self._stats["hits"] += got.hits
            self._stats["corrupt"] += len(bad)
            return out
        finally:
            self.index.end_read(pinned, bad)

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """Read ``key``; the object (one reference, the caller's) or None if absent or unreadable."""
        return self.batched_get_blocking([key])[0]

    def batched_submit_prefetch_task(self, keys: Sequence[CacheEngineKey]) -> Optional[Future]:
        """Start reading ``keys`` as one batch; None if none is stored, else a future of
        ``batched_get_blocking``'s list."""
        keys = list(keys)
        check_keys(keys)
        if not any(self.index.contains(k) for k in keys):
            return None
        return self._submit_read(keys, None)

    def submit_prefetch_task(self, key: CacheEngineKey) -> Optional[Future]:
        """Start reading ``key``; None if absent, else a future of ``MemoryObj | None``."""
        check_keys([key])
        if not self.index.contains(key):
            return None
        return self._submit_read([key], 0)

    def _submit_read(self, keys, single: Optional[int]) -> Future:
        def job():
            try:
                objs = self._read(keys)
            finally:
                self._events.deliver()
            return objs if single is None else objs[single]
        return self._gate.submit(self._reader, job)

    def _load(self, key, dtype, shape) -> Optional[MemoryObj]:
        if dtype is not None:
            check_dtype(dtype)
        if shape is not None:
            shape = check_shape(shape)
        self._gate.enter()
        try:
            return self._read([key], (dtype, shape))[0]
        finally:
            self._gate.exit()
            self._events.deliver()

    def load_bytes_from_disk(self, path: str, dtype: torch.dtype, shape) -> Optional[MemoryObj]:
        """Load the chunk named ``path`` (its key string) as ``shape``/``dtype``.

        Raises ``ShapeMismatchError`` if they do not match the stored bytes.
        """
        return self._load(key_from_path(path), dtype, shape)

    def load_disk(self, path: str, backend: str = "bytes", dtype: Optional[torch.dtype] = None,
                  shape=None) -> Optional[MemoryObj]:
        """Load the chunk named ``path``; ``backend`` must be ``bytes`` (the only on-disk format)."""
        if backend != "bytes":
            raise GdsKvCacheError(f"load_disk backend {backend!r} not supported; use 'bytes'")
        return self._load(key_from_path(path), dtype, shape)

    async def async_load_bytes_from_disk(self, path: str, dtype: torch.dtype, shape) -> Optional[MemoryObj]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self.load_bytes_from_disk, path, dtype, shape)

    # -- removal and lifetime ----------------------------------------------------------
    def remove(self, key: CacheEngineKey) -> bool:
        """Drop ``key`` (and give its blocks back to the file system); True if it was there."""
        check_keys([key])
        self._gate.enter()
        try:
            was, extent = self.index.remove(key)
            if extent is not None:
                self._holes.punch(*extent)  # before the extent can be handed out again
                self.index.free(extent[0])
            return was
        finally:
            self._gate.exit()
            self._events.deliver()

    def wait_for_puts(self, timeout: Optional[float] = None) -> bool:
        """Wait until no put is in flight; False if ``timeout`` passed first."""
        return self._gate.wait_for_puts(timeout)

    def wait_for_put_progress(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until some put in flight finishes; False if none was in flight
        or none finished in time. The storage manager's back-pressure for stores."""
        return self._gate.wait_for_put_progress(timeout)

    def close(self) -> None:
        """Refuse new calls, finish those in flight (puts included), snapshot the index and
        release the directory, which is released even if a step before fails."""
        if not self._gate.close():
            return
        try:
            self._writer.shutdown(wait=True)
            self._reader.shutdown(wait=True)
            try:
                self._engine.close()
            finally:
                self.index.close()
        finally:
            self._dir.release()
