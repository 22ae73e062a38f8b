"""``StorageManager``: the hot tier in front of the disk tier, over one slab allocator.

It routes stores, lookups and loads across the tiers and keeps the hot tier
filled from disk reads and prefetches. Invariant: ``remove`` wins over a
read racing it (a chunk read before the remove is never cached after it).
Slab room (the store side waits, the read side never does) is
``back_pressure``'s.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import List, Optional, Sequence

import torch

from ..config import CacheEngineConfig, CacheEngineMetadata
from ..errors import ClosedError, GdsKvCacheError
from ..io import IOPathReport
from ..key import CacheEngineKey
from ..memory.allocator import MemoryAllocatorInterface, SlabMemoryAllocator
from ..memory.buffers import resolve_memory_device
from ..memory.format import MemoryFormat, check_dtype, check_shape
from ..memory.obj import MemoryObj
from .abstract_backend import StorageBackendInterface
from .back_pressure import allocate_waiting, room_for_reads, wait_for_read_room
from .checks import check_keys
from .hot_backend import LocalCPUBackend
from .lookup_server import LookupServerInterface
from .tier_factory import CreateStorageBackends

__all__ = ["StorageManager", "CreateStorageBackends"]

log = logging.getLogger(__name__)


class StorageManager:
    """Stores, finds and loads chunks across the tiers.

    Parameters
    ----------
    config, metadata
        What to build. ``metadata`` may be None for byte-level use.
    allocator
        The slab allocator; None builds one from ``config`` (``slab_size`` on
        ``memory_device``).
    lookup_server
        Told of stored and dropped keys; None for none.
    backends
        The tiers to manage (``Hot`` then ``LocalDiskBackend``, any
        ``StorageBackendInterface``), built by the caller over ``allocator``;
        None builds them from ``config`` (``CreateStorageBackends``). The
        manager closes them at ``close``.

    Notes
    -----
    ``allocate`` gives the caller one reference; ``put`` takes it over (each
    tier keeps its own). ``get`` returns an object with one reference for the
    caller, who calls ``ref_count_down()`` when done with it.

    Back-pressure lives here, not in the allocator: ``allocate`` (the store
    side) first drops hot-tier chunks nobody holds, then waits for disk writes
    in flight to finish, at most ``store_wait_s`` seconds in all, and returns
    None after that. Reads never wait for room: a chunk that finds none is a
    miss. ``remove`` wins over a prefetch or get racing it: a chunk read
    before the remove is never put back into the hot tier after it.
    """

    #: Longest a store waits for slab room held by disk writes in flight.
    store_wait_s: float = 30.0

    def __init__(self, config: CacheEngineConfig, metadata: Optional[CacheEngineMetadata] = None,
                 allocator: Optional[MemoryAllocatorInterface] = None,
                 lookup_server: Optional[LookupServerInterface] = None,
                 backends: "Optional[OrderedDict[str, StorageBackendInterface]]" = None):
        self.config = config
        self.metadata = metadata
        self._own_allocator: Optional[SlabMemoryAllocator] = None
        if allocator is None:
            kind = resolve_memory_device(config.memory_device)
            allocator = SlabMemoryAllocator(config.slab_bytes, kind, config.cuda_device)
            self._own_allocator = allocator
        self.allocator = allocator
        try:
            if backends is None:
                # No event loop: the disk tier's puts and prefetches run on its own
                # pools, and its coroutine API uses whatever loop awaits it.
                backends = CreateStorageBackends(config, metadata, None, allocator, str(allocator.device),
                                                 lookup_server)
            self.storage_backends: OrderedDict[str, StorageBackendInterface] = OrderedDict(backends)
        except BaseException:
            if self._own_allocator is not None:
                self._own_allocator.close()
            raise
        self.hot: Optional[LocalCPUBackend] = self.storage_backends.get("Hot")  # type: ignore[assignment]
        # The disk tier, local or shared: used only through StorageBackendInterface.
        self.disk: Optional[StorageBackendInterface] = self.storage_backends.get("LocalDiskBackend")
        self._lock = threading.Lock()
        self._prefetching: dict[CacheEngineKey, Future] = {}
        self._removes = 0        # bumped by every remove: a read that saw another value is not cached
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("storage manager is closed")

    # -- allocation (the store side's back-pressure) --------------------------
    def allocate(self, shape, dtype: torch.dtype, eviction: bool = True,
                 fmt: MemoryFormat = MemoryFormat.KV_2LTD) -> Optional[MemoryObj]:
        """A new slab object (one reference, the caller's), or None if no room even after eviction."""
        objs = self.batched_allocate([shape], dtype, eviction=eviction, fmt=fmt)
        return objs[0] if objs else None

    def batched_allocate(self, shapes: Sequence, dtype: torch.dtype, eviction: bool = True,
                         fmt: MemoryFormat = MemoryFormat.KV_2LTD) -> list[MemoryObj]:
        """Slab objects for ``shapes``, adjacent where possible (one transfer for the batch).

        Returns a prefix of the objects asked for: all of them, or as many as
        fit once hot-tier chunks were dropped and disk writes waited for (at
        most ``store_wait_s``); an empty list when none fits.
        """
        self._check_open()
        check_dtype(dtype)
        shapes = [check_shape(s) for s in shapes]
        if not shapes:
            return []
        return allocate_waiting(self.allocator, self.hot, self.disk, shapes, dtype, fmt, eviction,
                                self.store_wait_s)

    # -- puts ------------------------------------------------------------------
    def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Optional[Future]:
        """Store without blocking; consumes the caller's reference.

        Skips keys already stored or in flight. Returns the disk put's future
        (None when skipped or without a disk tier).
        """
        return self.batched_submit_put_task([key], [memory_obj])[0]

    def batched_submit_put_task(self, keys: Sequence[CacheEngineKey],
                                objs: Sequence[MemoryObj]) -> list[Optional[Future]]:
        """Store ``objs`` under ``keys`` as one batch; consumes the caller's references.

        Returns per key the disk put's future, or None when the key was
        skipped (stored or in flight already) or there is no disk tier.
        """
        keys, objs = list(keys), list(objs)
        try:
            self._check_open()
            if len(keys) != len(objs):
                raise GdsKvCacheError(f"{len(keys)} keys but {len(objs)} objects")
            check_keys(keys)
            for o in objs:
                if not isinstance(o, MemoryObj) or not o.valid:
                    raise GdsKvCacheError(f"a chunk must be a live MemoryObj, got {o!r}")
            if self.disk is not None and self.disk.put_skips_stored():
                # The disk tier's own put skips what is stored anywhere (shared mode's claim),
                # so only the hot tier is asked here: one Redis round trip less per store.
                stored = [self.hot is not None and self.hot.contains(k) for k in keys]
            else:
                stored = self.batched_exists(keys)
            new = [i for i, (k, there) in enumerate(zip(keys, stored))
                   if not there and not (self.disk is not None and self.disk.exists_in_put_tasks(k))]
            out: list[Optional[Future]] = [None] * len(keys)
            if self.hot is not None:
                for i in new:
                    self.hot.insert(keys[i], objs[i])
            if self.disk is not None and new:
                futs = self.disk.batched_submit_put_task([keys[i] for i in new], [objs[i] for i in new])
                for i, f in zip(new, futs):
                    out[i] = f
            return out
        finally:
            for o in objs:
                if isinstance(o, MemoryObj) and o.valid:
                    o.ref_count_down()

    # -- gets --------------------------------------------------------------------
    def get(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """Blocking: the hot tier, then the disk (filling the hot tier); None on a miss."""
        return self.batched_get_blocking([key])[0]

    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Per key the chunk (one reference, the caller's) or None; disk reads go as one batch."""
        self._check_open()
        keys = list(keys)
        check_keys(keys)
        out: list[Optional[MemoryObj]] = [None] * len(keys)
        rest = []
        for i, k in enumerate(keys):
            obj = self.hot.get_blocking(k) if self.hot is not None else None
            if obj is not None:
                out[i] = obj
            else:
                rest.append(i)
        if rest:
            with self._lock:
                pending = [self._prefetching.get(keys[i]) for i in rest]
            if any(p is not None for p in pending):
                for p in pending:
                    if p is not None:
                        try:
                            p.result()
                        except Exception:
                            pass  # the disk read below decides
                still = []
                for i in rest:
                    obj = self.hot.get_blocking(keys[i]) if self.hot is not None else None
                    if obj is not None:
                        out[i] = obj
                    else:
                        still.append(i)
                rest = still
        if rest and self.disk is not None:
            want = [keys[i] for i in rest]
            room_for_reads(self.allocator, self.hot, self.disk, want)
            with self._lock:
                epoch = self._removes
            objs = self.disk.batched_get_blocking(want)
            self._cache(want, objs, epoch)
            for i, obj in zip(rest, objs):
                out[i] = obj
        return out

    def wait_for_read_room(self, keys: Sequence[CacheEngineKey], timeout: float) -> None:
        """For a reader that would rather wait than miss: drop unheld hot-tier chunks, or wait at most
        ``timeout`` seconds for room to come back, before it reads ``keys`` again (``back_pressure``)."""
        self._check_open()
        wait_for_read_room(self.allocator, self.hot, self.disk, list(keys), timeout)

    def _cache(self, keys, objs, epoch: int) -> None:
        """Keep chunks read from disk in the hot tier, unless a remove ran since the read began."""
        if self.hot is None:
            return
        with self._lock:
            if self._removes != epoch:
                return
            for k, o in zip(keys, objs):
                if o is not None:
                    self.hot.insert(k, o)

    def prefetch(self, key: CacheEngineKey) -> None:
        """Start moving ``key`` from disk into the hot tier; returns at once."""
        self.batched_submit_prefetch_task([key])

    def batched_submit_prefetch_task(self, keys: Sequence[CacheEngineKey]) -> Optional[Future]:
        """Start moving ``keys`` from disk into the hot tier as one batch; returns at once.

        Returns the disk read's future (its result is the list of chunks read,
        already handed to the hot tier), or None when there is nothing to read.
        """
        self._check_open()
        keys = list(keys)
        check_keys(keys)
        if self.disk is None or self.hot is None:
            return None
        with self._lock:
            want = [k for k in dict.fromkeys(keys) if k not in self._prefetching and not self.hot.contains(k)]
        if want:
            want = [k for k, there in zip(want, self.disk.batched_exists(want)) if there]  # outside the lock
        with self._lock:
            want = [k for k in want if k not in self._prefetching]
            if not want:
                return None
            room_for_reads(self.allocator, self.hot, self.disk, want)
            epoch = self._removes
            fut = self.disk.batched_submit_prefetch_task(want)
            if fut is None:
                return None
            for k in want:
                self._prefetching[k] = fut

        def landed(f: Future) -> None:
            objs = None if f.cancelled() or f.exception() else f.result()
            try:
                if objs is not None:
                    self._cache(want, objs, epoch)
            finally:
                for o in objs or ():
                    if o is not None:
                        o.ref_count_down()
                with self._lock:
                    for k in want:
                        if self._prefetching.get(k) is f:
                            del self._prefetching[k]

        fut.add_done_callback(landed)
        return fut

    def _ranks_answered_by_disk(self, keys: Sequence[CacheEngineKey]) -> bool:
        """In shared mode a tensor-parallel chunk counts only when every rank's shard is
        published, which only the disk tier (Redis) knows: this rank's hot copy proves nothing."""
        return (self.disk is not None and self.disk.lookup_for_all_ranks()
                and any(k.world_size > 1 for k in keys))

    def contains(self, key: CacheEngineKey, search_range: Optional[List[str]] = None) -> bool:
        """Whether ``key`` is stored in the named tiers (``Hot``, ``LocalDiskBackend``; None for all).

        In shared mode a key of a tensor-parallel model counts only when every rank's shard
        is published (asked of the disk tier whatever ``search_range`` says about ``Hot``).
        """
        if self._ranks_answered_by_disk([key]):
            return self.disk.contains(key)
        for name, backend in self.storage_backends.items():
            if search_range is not None and name not in search_range:
                continue
            if backend.contains(key):
                return True
        return False

    def batched_contains(self, keys: Sequence[CacheEngineKey]) -> int:
        """How many of ``keys``, from the first, are stored in some tier (the hit prefix).

        The disk tier is asked once per gap in the hot tier's hits (in shared
        mode one Redis round trip each), never once per key.
        """
        keys = list(keys)
        check_keys(keys)
        if self._ranks_answered_by_disk(keys):
            return self.disk.batched_contains(keys)
        hot = [self.hot is not None and self.hot.contains(k) for k in keys]
        n = 0
        while n < len(keys):
            if hot[n]:
                n += 1
                continue
            if self.disk is None:
                break
            n += self.disk.batched_contains(keys[n:])
            if n == len(keys) or not hot[n]:
                break      # keys[n] is in no tier (the disk said so just now)
            n += 1
        return n

    def batched_exists(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Per key, whether some tier stores it (the disk tier asked once for all)."""
        keys = list(keys)
        check_keys(keys)
        out = [self.hot is not None and self.hot.contains(k) for k in keys]
        rest = [i for i, x in enumerate(out) if not x]
        if rest and self.disk is not None:
            for i, x in zip(rest, self.disk.batched_exists([keys[i] for i in rest])):
                out[i] = x
        return out

    def remove(self, key: CacheEngineKey) -> bool:
        """Drop ``key`` from every tier; True if some tier had it."""
        self._check_open()
        check_keys([key])
        # Bumped before and after: a read that began anywhere in between
        # sees a changed count when it lands and is not cached.
        with self._lock:
            self._removes += 1
        try:
            found = [b.remove(key) for b in self.storage_backends.values()]
        finally:
            with self._lock:
                self._removes += 1
        return any(found)

    def io_report(self) -> Optional[IOPathReport]:
        return None if self.disk is None else self.disk.io_report()

    def memcheck(self) -> bool:
        self.allocator.memcheck()
        if self.disk is not None:
            self.disk.memcheck()
        return True

    def close(self) -> None:
        """Drain pending writes and prefetches, then release every tier and the slab."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._lock:
                pending = list(self._prefetching.values())
            for f in pending:
                try:
                    f.result()
                except Exception:
                    pass
            errors = []
            for backend in reversed(self.storage_backends.values()):
                try:
                    backend.close()
                except Exception as e:  # close the others; report the first
                    errors.append(e)
            if errors:
                raise errors[0]
        finally:
            if self._own_allocator is not None:
                self._own_allocator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
