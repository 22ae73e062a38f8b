"""``DiskCatalog``: the disk tier's questions that move no chunk bytes.

Which keys an open cache directory stores, where each chunk lies (its entry,
pool file and offset, the directory's layout), how much room there is and
which I/O path the transfers take. The base of ``LocalDiskBackend``, which
adds the puts, gets and lifetime. Invariant: nothing here takes more than the
index lock, writes anything, or waits on I/O in flight; every answer is the
index's or the directory's state at the moment of the call.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..io import IOPathReport
from ..key import CacheEngineKey
from .abstract_backend import StorageBackendInterface
from .checks import check_keys
from .disk_index import DiskEntry, DiskIndex
from .pool_file import PoolLayout
from .pool_open import OpenPool

__all__ = ["DiskCatalog"]


class DiskCatalog(StorageBackendInterface):
    """Lookups over ``opened``'s index and directory (``storage.pool_open``)."""

    def __init__(self, dst_device: str, opened: OpenPool):
        super().__init__(dst_device)
        self._dir = opened.dir
        self.index: DiskIndex = opened.index
        self._engine = opened.engine

    # -- what is stored ----------------------------------------------------------
    def contains(self, key: CacheEngineKey) -> bool:
        return self.index.contains(key)

    def batched_contains(self, keys: Sequence[CacheEngineKey]) -> int:
        """How many of ``keys``, from the first, are stored (the hit prefix)."""
        return self.index.prefix_length(keys)

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        return self.index.in_flight(key)

    def batched_exists(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Per key, whether it is stored (not only the hit prefix)."""
        check_keys(keys)
        return [self.index.contains(k) for k in keys]

    def keys(self) -> list[CacheEngineKey]:
        return self.index.keys()

    def entry(self, key: CacheEngineKey) -> Optional[DiskEntry]:
        return self.index.entry(key)

    def entry_size(self, key: CacheEngineKey) -> int:
        """Slab bytes a read of ``key`` takes (0 if it is not stored)."""
        e = self.index.entry(key)
        return 0 if e is None else e.phys_size

    # -- where it lies ------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._dir.path

    @property
    def pool_paths(self) -> list[str]:
        return list(self._dir.pool_paths)

    @property
    def layout(self) -> PoolLayout:
        """This directory's pool layout (what readers of its files in other processes need)."""
        return self._dir.layout

    def locate(self, offset: int) -> tuple[str, int]:
        """(pool file, offset in it) of a chunk's logical offset (``entry(key).offset``)."""
        return self._dir.locate(offset)

    # -- room and I/O path ---------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self.index.used

    @property
    def capacity_bytes(self) -> int:
        return self.index.capacity

    def disk_usage(self) -> int:
        return self._dir.disk_usage()

    def io_report(self) -> IOPathReport:
        return self._engine.report()

    def memcheck(self) -> bool:
        return self.index.memcheck()
