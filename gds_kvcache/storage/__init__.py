"""Storage tiers: the tier interface, the hot tier, the local disk tier, their factory and manager.

Layers, bottom up: ``entry`` (the chunk descriptor) and ``index_codec`` /
``index_encode`` / ``index_decode`` / ``index_columns`` / ``index_legacy`` /
``index_log`` (the index format and its files); ``pool_layout`` and
``pool_file`` (the pool's layout and its locked directory); ``disk_index``
with ``key_codes``, ``entry_table``, ``lru_clock`` and ``live_entries`` (the
chunks as arrays), ``recovery``, ``reservations``, ``log_reserve`` and
``index_events`` (which chunk lives where; no GPU, no I/O engine); ``transfer`` (the verified read and checksummed write; no index);
``eviction`` (when an extent is reused); ``local_disk_backend`` with
``pool_open``, ``call_gate``, ``holes``, ``tombstone``, ``lookup_events``, ``disk_catalog``
and ``checks`` (index + transfer behind the tier interface,
``abstract_backend``); ``hot_backend``; ``tier_factory``, ``back_pressure``
and ``storage_manager``. Nothing here imports ``shared``.
"""

from .abstract_backend import StorageBackendInterface
from .disk_index import DiskEntry, DiskIndex
from .eviction import DeferredFree, EvictionStrategy, FreeAtOnce
from .hot_backend import LocalCPUBackend
from .local_disk_backend import LocalDiskBackend, check_keys
from .lookup_server import LookupServerInterface
from .pool_file import PoolLayout
from .storage_manager import StorageManager
from .tier_factory import CreateStorageBackends, disk_tier_kind, register_disk_tier
from .transfer import DiskTransfer, VerifiedRead

__all__ = [
    "CreateStorageBackends",
    "DeferredFree",
    "DiskEntry",
    "DiskIndex",
    "DiskTransfer",
    "EvictionStrategy",
    "FreeAtOnce",
    "LocalCPUBackend",
    "LocalDiskBackend",
    "LookupServerInterface",
    "PoolLayout",
    "StorageBackendInterface",
    "StorageManager",
    "VerifiedRead",
    "check_keys",
    "disk_tier_kind",
    "register_disk_tier",
]
