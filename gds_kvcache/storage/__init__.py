"""Storage tiers: the backend interface, the hot tier, the disk tier and their manager."""

from .abstract_backend import StorageBackendInterface
from .disk_index import DiskEntry, DiskIndex
from .hot_backend import LocalCPUBackend
from .local_disk_backend import LocalDiskBackend
from .lookup_server import LookupServerInterface
from .storage_manager import CreateStorageBackends, StorageManager

__all__ = [
    "CreateStorageBackends",
    "DiskEntry",
    "DiskIndex",
    "LocalCPUBackend",
    "LocalDiskBackend",
    "LookupServerInterface",
    "StorageBackendInterface",
    "StorageManager",
]
