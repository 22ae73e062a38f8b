"""The hot tier ("Hot"): an LRU of slab-resident chunks in front of the disk."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Optional

from ..key import CacheEngineKey
from ..memory.obj import MemoryObj
from .abstract_backend import StorageBackendInterface
from .lookup_server import LookupServerInterface

__all__ = ["LocalCPUBackend"]


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class LocalCPUBackend(StorageBackendInterface):
    """LRU of ``MemoryObj`` chunks held in slab memory, bounded in bytes.

    The name follows LMCache; the slab may be GPU memory. The tier holds one
    reference on each chunk. Eviction only takes chunks nobody else holds
    (reference count 1), so a chunk being written to disk or read by a user
    is never freed under them.
    """

    def __init__(self, capacity_bytes: int, dst_device: str = "cuda",
                 lookup_server: Optional[LookupServerInterface] = None):
        super().__init__(dst_device)
        self.capacity = capacity_bytes
        self.used = 0
        self._lock = threading.Lock()
        self._objs: OrderedDict[CacheEngineKey, MemoryObj] = OrderedDict()
        self._lookup = lookup_server

    def contains(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._objs

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        return False

    def submit_put_task(self, key: CacheEngineKey, obj: MemoryObj) -> Optional[Future]:
        return _done(None) if self.insert(key, obj) else None

    def insert(self, key: CacheEngineKey, obj: MemoryObj) -> bool:
        """Keep ``obj`` under ``key`` (taking a reference); False if already there or too big."""
        if obj.phys_size > self.capacity:
            return False
        with self._lock:
            if key in self._objs:
                return False
            obj.ref_count_up()
            self._objs[key] = obj
            self.used += obj.phys_size
            victims = self._evict_locked(0)
        self._release(victims)
        if self._lookup is not None:
            self._lookup.insert(key)
        return True

    def submit_prefetch_task(self, key: CacheEngineKey) -> Optional[Future]:
        obj = self.get_blocking(key)
        return None if obj is None else _done(obj)

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        with self._lock:
            obj = self._objs.get(key)
            if obj is None:
                return None
            self._objs.move_to_end(key)
            obj.ref_count_up()
        return obj

    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            obj = self._objs.pop(key, None)
            if obj is not None:
                self.used -= obj.phys_size
        if obj is None:
            return False
        self._release([(key, obj)])
        return True

    def _evict_locked(self, need: int) -> list:
        """Pop LRU chunks nobody else holds until ``need`` more bytes fit the budget."""
        victims = []
        if self.used + need <= self.capacity:
            return victims
        for key in list(self._objs):
            obj = self._objs[key]
            if obj.get_ref_count() != 1:
                continue
            del self._objs[key]
            self.used -= obj.phys_size
            victims.append((key, obj))
            if self.used + need <= self.capacity:
                break
        return victims

    def _release(self, victims: list) -> None:
        for key, obj in victims:
            obj.ref_count_down()
            if self._lookup is not None:
                self._lookup.remove(key)

    def evict_unused(self, nbytes: int) -> int:
        """Free up to ``nbytes`` of slab by dropping LRU chunks nobody else holds; bytes freed."""
        freed = 0
        victims = []
        with self._lock:
            for key in list(self._objs):
                if freed >= nbytes:
                    break
                obj = self._objs[key]
                if obj.get_ref_count() != 1:
                    continue
                del self._objs[key]
                self.used -= obj.phys_size
                freed += obj.phys_size
                victims.append((key, obj))
        self._release(victims)
        return freed

    def __len__(self) -> int:
        return len(self._objs)

    def close(self) -> None:
        with self._lock:
            victims = list(self._objs.items())
            self._objs.clear()
            self.used = 0
        self._release(victims)
