"""``CreateStorageBackends``: the tiers a config asks for, built through a registry of disk tiers.

The storage layer knows the local disk tier; other disk tiers (the shared
tier of ``gds_kvcache.shared``) register a builder under a kind name from the
layer above (``gds_kvcache.tiers``), so ``storage`` never imports them and a
new tier (another serving engine's, compression at rest) plugs in without a
change here. ``disk_tier_kind`` is the one place that maps a config to a kind.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Callable, Optional

from ..config import CacheEngineConfig, CacheEngineMetadata
from ..errors import ConfigError
from ..memory.allocator import MemoryAllocatorInterface
from .abstract_backend import StorageBackendInterface
from .hot_backend import LocalCPUBackend
from .local_disk_backend import LocalDiskBackend
from .lookup_server import LookupServerInterface

__all__ = ["CreateStorageBackends", "DiskTierBuilder", "disk_tier_kind", "register_disk_tier"]

#: ``builder(config, loop, allocator, dst_device, lookup_server) -> StorageBackendInterface``
DiskTierBuilder = Callable[[CacheEngineConfig, Optional[asyncio.AbstractEventLoop], MemoryAllocatorInterface, str,
                            Optional[LookupServerInterface]], StorageBackendInterface]


def _local(config, loop, allocator, dst_device, lookup_server) -> StorageBackendInterface:
    return LocalDiskBackend(config, loop, allocator, dst_device, lookup_server)


_BUILDERS: dict[str, DiskTierBuilder] = {"local": _local}


def register_disk_tier(kind: str, builder: DiskTierBuilder) -> None:
    """Make ``builder`` build the disk tier of configs whose ``disk_tier_kind`` is ``kind``."""
    _BUILDERS[kind] = builder


def disk_tier_kind(config: CacheEngineConfig) -> Optional[str]:
    """``shared`` with a lookup server URL, ``local`` with a directory only, None without a disk tier."""
    if config.lookup_server_url:
        return "shared"
    return "local" if config.local_disk is not None else None


def CreateStorageBackends(config: CacheEngineConfig, metadata: Optional[CacheEngineMetadata],
                          loop: Optional[asyncio.AbstractEventLoop], memory_allocator: MemoryAllocatorInterface,
                          dst_device: str = "cuda",
                          lookup_server: Optional[LookupServerInterface] = None
                          ) -> "OrderedDict[str, StorageBackendInterface]":
    """The backends ``config`` asks for, in lookup order: ``Hot`` then ``LocalDiskBackend``.

    With ``config.lookup_server_url`` set, the disk tier (still named
    ``LocalDiskBackend``) is the shared tier (``gds_kvcache.shared``): this
    process writes its own subdirectory of ``local_disk`` and reads every
    other process's, found through Redis. Redis replaces ``lookup_server``.
    """
    kind = disk_tier_kind(config)
    if kind == "shared" and config.local_disk is None:
        raise ConfigError("local_disk", None, "the shared directory when lookup_server_url is set "
                          "(every process gives the same path)")
    if kind == "shared" and lookup_server is not None:
        raise ConfigError("lookup_server", type(lookup_server).__name__,
                          "None when lookup_server_url is set (Redis is the lookup server)")
    backends: OrderedDict[str, StorageBackendInterface] = OrderedDict()
    if config.local_cpu:
        # With a disk tier the lookup server tracks the disk (the durable copy);
        # hot-tier evictions would otherwise report keys gone that are still stored.
        hot_lookup = lookup_server if config.local_disk is None else None
        backends["Hot"] = LocalCPUBackend(config.hot_bytes, dst_device, hot_lookup)
    if kind is not None:
        builder = _BUILDERS.get(kind)
        if builder is None:
            raise ConfigError("lookup_server_url", config.lookup_server_url,
                              f"a disk tier this installation has ({', '.join(sorted(_BUILDERS))}); "
                              "import gds_kvcache (which registers the shared tier) first")
        try:
            backends["LocalDiskBackend"] = builder(config, loop, memory_allocator, dst_device, lookup_server)
        except BaseException:
            for b in backends.values():
                b.close()
            raise
    return backends
