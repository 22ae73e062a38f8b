"""``StorageManager``: the hot tier in front of the disk tier, over one slab allocator."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import List, Optional

import torch

from ..config import CacheEngineConfig, CacheEngineMetadata
from ..io import IOPathReport
from ..key import CacheEngineKey
from ..memory.allocator import MemoryAllocatorInterface, SlabMemoryAllocator
from ..memory.buffers import resolve_memory_device
from ..memory.format import MemoryFormat
from ..memory.obj import MemoryObj
from .abstract_backend import StorageBackendInterface
from .hot_backend import LocalCPUBackend
from .local_disk_backend import LocalDiskBackend
from .lookup_server import LookupServerInterface

__all__ = ["StorageManager", "CreateStorageBackends", "EvictingAllocator"]

log = logging.getLogger(__name__)


class EvictingAllocator(MemoryAllocatorInterface):
    """An allocator that, when full, drops unused hot-tier chunks and tries again.

    When nothing in the hot tier can go because every chunk is still being
    written to disk, it waits for the oldest disk write (backpressure) rather
    than failing a store only because the disk is slower than the GPU.
    """

    def __init__(self, inner: MemoryAllocatorInterface, wait_s: float = 60.0):
        self.inner = inner
        self.hot: Optional[LocalCPUBackend] = None
        self.disk: Optional[LocalDiskBackend] = None
        self.wait_s = wait_s

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def kind(self) -> str:
        return getattr(self.inner, "kind", str(self.inner.device))

    def allocate(self, shape, dtype, fmt=MemoryFormat.KV_2LTD, eviction: bool = True):
        obj = self.inner.allocate(shape, dtype, fmt)
        need = max(1, torch.Size(shape).numel() * dtype.itemsize)
        if obj is not None or not eviction or need > getattr(self.inner, "capacity", need):
            return obj
        while obj is None:
            freed = self.hot.evict_unused(need) if self.hot is not None else 0
            if freed == 0 and not (self.disk is not None and self.disk.wait_for_oldest_put(self.wait_s)):
                return None
            obj = self.inner.allocate(shape, dtype, fmt)
        return obj

    def free(self, obj: MemoryObj) -> None:
        self.inner.free(obj)

    def memcheck(self) -> bool:
        return self.inner.memcheck()


def CreateStorageBackends(config: CacheEngineConfig, metadata: Optional[CacheEngineMetadata],
                          loop: Optional[asyncio.AbstractEventLoop], memory_allocator: MemoryAllocatorInterface,
                          dst_device: str = "cuda",
                          lookup_server: Optional[LookupServerInterface] = None
                          ) -> "OrderedDict[str, StorageBackendInterface]":
    """The backends ``config`` asks for, in lookup order: ``Hot`` then ``LocalDiskBackend``."""
    backends: OrderedDict[str, StorageBackendInterface] = OrderedDict()
    if config.local_cpu:
        # With a disk tier the lookup server tracks the disk (the durable copy);
        # hot-tier evictions would otherwise report keys gone that are still stored.
        hot_lookup = lookup_server if config.local_disk is None else None
        backends["Hot"] = LocalCPUBackend(config.hot_bytes, dst_device, hot_lookup)
    if config.local_disk is not None:
        backends["LocalDiskBackend"] = LocalDiskBackend(config, loop, memory_allocator, dst_device, lookup_server)
    return backends


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

    Notes
    -----
    ``allocate`` gives the caller one reference; ``put`` takes it over (each
    tier keeps its own). ``get`` returns an object with one reference for the
    caller, who calls ``ref_count_down()`` when done with it.
    """

    def __init__(self, config: CacheEngineConfig, metadata: Optional[CacheEngineMetadata] = None,
                 allocator: Optional[MemoryAllocatorInterface] = None,
                 lookup_server: Optional[LookupServerInterface] = None):
        self.config = config
        self.metadata = metadata
        if allocator is None:
            kind = resolve_memory_device(config.memory_device)
            allocator = SlabMemoryAllocator(config.slab_bytes, kind, config.cuda_device)
            self._own_allocator = allocator
        else:
            self._own_allocator = None
        self.allocator = EvictingAllocator(allocator)
        # No event loop: the disk tier's puts and prefetches run on its own
        # executor, and its coroutine API uses whatever loop awaits it.
        self.storage_backends = CreateStorageBackends(config, metadata, None, self.allocator,
                                                      str(allocator.device), lookup_server)
        self.hot: Optional[LocalCPUBackend] = self.storage_backends.get("Hot")  # type: ignore[assignment]
        self.disk: Optional[LocalDiskBackend] = self.storage_backends.get("LocalDiskBackend")  # type: ignore
        self.allocator.hot = self.hot
        self.allocator.disk = self.disk
        self._lock = threading.Lock()
        self._prefetching: dict[CacheEngineKey, Future] = {}
        self._closed = False

    def allocate(self, shape, dtype: torch.dtype, eviction: bool = True,
                 fmt: MemoryFormat = MemoryFormat.KV_2LTD) -> Optional[MemoryObj]:
        """A new slab object (one reference, the caller's), or None if no room even after eviction."""
        return self.allocator.allocate(shape, dtype, fmt, eviction=eviction)

    def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Optional[Future]:
        """Store without blocking; consumes the caller's reference.

        Skips keys already stored or in flight. Returns the disk put's future
        (None when skipped or without a disk tier).
        """
        try:
            if self.contains(key) or (self.disk is not None and self.disk.exists_in_put_tasks(key)):
                return None
            if self.hot is not None:
                self.hot.insert(key, memory_obj)
            if self.disk is not None:
                return self.disk.submit_put_task(key, memory_obj)
            return None
        finally:
            memory_obj.ref_count_down()

    def get(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """Blocking: the hot tier, then the disk (filling the hot tier); None on a miss."""
        if self.hot is not None:
            obj = self.hot.get_blocking(key)
            if obj is not None:
                return obj
        with self._lock:
            pending = self._prefetching.get(key)
        if pending is not None:
            pending.result()
            if self.hot is not None:
                obj = self.hot.get_blocking(key)
                if obj is not None:
                    return obj
        if self.disk is None:
            return None
        obj = self.disk.get_blocking(key)
        if obj is not None and self.hot is not None:
            self.hot.insert(key, obj)
        return obj

    def prefetch(self, key: CacheEngineKey) -> None:
        """Start moving ``key`` from disk into the hot tier; returns at once."""
        if self.disk is None or self.hot is None or self.hot.contains(key):
            return
        with self._lock:
            if key in self._prefetching:
                return
            fut = self.disk.submit_prefetch_task(key)
            if fut is None:
                return
            self._prefetching[key] = fut

        def landed(f: Future) -> None:
            obj = None if f.cancelled() or f.exception() else f.result()
            if obj is not None:
                self.hot.insert(key, obj)
                obj.ref_count_down()
            with self._lock:
                self._prefetching.pop(key, None)

        fut.add_done_callback(landed)

    def contains(self, key: CacheEngineKey, search_range: Optional[List[str]] = None) -> bool:
        """Whether ``key`` is stored in the named tiers (``Hot``, ``LocalDiskBackend``; None for all)."""
        for name, backend in self.storage_backends.items():
            if search_range is not None and name not in search_range:
                continue
            if backend.contains(key):
                return True
        return False

    def remove(self, key: CacheEngineKey) -> bool:
        return any([b.remove(key) for b in self.storage_backends.values()])

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
        with self._lock:
            pending = list(self._prefetching.values())
        for f in pending:
            try:
                f.result()
            except Exception:
                pass
        for backend in reversed(self.storage_backends.values()):
            backend.close()
        if self._own_allocator is not None:
            self._own_allocator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
