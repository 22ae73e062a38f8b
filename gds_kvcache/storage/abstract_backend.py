"""``StorageBackendInterface``: LMCache's storage-backend contract, plus ``close()``."""

from __future__ import annotations

import abc
from concurrent.futures import Future
from typing import Optional

from ..key import CacheEngineKey
from ..memory.obj import MemoryObj

__all__ = ["StorageBackendInterface"]


class StorageBackendInterface(abc.ABC):
    """A tier that stores ``MemoryObj`` chunks by key."""

    def __init__(self, dst_device: str = "cuda"):
        self.dst_device = dst_device

    @abc.abstractmethod
    def contains(self, key: CacheEngineKey) -> bool:
        """Whether ``key`` is stored (fully written) in this backend."""

    @abc.abstractmethod
    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        """Whether a put of ``key`` is in flight."""

    @abc.abstractmethod
    def submit_put_task(self, key: CacheEngineKey, obj: MemoryObj) -> Optional[Future]:
        """Start storing ``obj``; a future for the put, or None if ``key`` is stored or in flight.

        The backend takes its own reference on ``obj`` for as long as it needs it.
        """

    @abc.abstractmethod
    def submit_prefetch_task(self, key: CacheEngineKey) -> Optional[Future]:
        """Start loading ``key``; a future of ``MemoryObj | None``, or None if ``key`` is absent."""

    @abc.abstractmethod
    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """The chunk (one reference owned by the caller), or None if absent."""

    @abc.abstractmethod
    def remove(self, key: CacheEngineKey) -> bool:
        """Drop ``key``; True if it was there."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish pending writes and release every resource."""
