"""gds_kvcache: LLM KV-cache chunks between GPU memory and NVMe with GPUDirect Storage.

The disk tier moves chunk bytes with KvikIO (cuFile DMA on GDS nodes, KvikIO
compat mode elsewhere) or with POSIX pread/pwrite where no CUDA driver
exists; ``StorageManager.io_report()`` says which path runs.
"""

from .config import CacheEngineConfig, CacheEngineMetadata, LMCacheEngineConfig, LMCacheEngineMetadata
from .errors import (ConfigError, CorruptChunkError, DirectoryLockedError, GdsKvCacheError, IOEngineError,
                     KeyFormatError, ShapeMismatchError, StorageFullError, StorageUnavailableError)
from .io import IOPathReport
from .key import CacheEngineKey
from .memory import MemoryAllocatorInterface, MemoryFormat, MemoryObj, SlabMemoryAllocator
from .engine import CacheEngine, StoreResult
from .storage import (CreateStorageBackends, LocalCPUBackend, LocalDiskBackend, LookupServerInterface,
                      StorageBackendInterface, StorageManager)
from . import tiers  # noqa: F401  (registers the shared disk tier with the tier factory)

__version__ = "0.1.0"

__all__ = [
    "CacheEngine",
    "CacheEngineConfig",
    "CacheEngineKey",
    "CacheEngineMetadata",
    "ConfigError",
    "CorruptChunkError",
    "CreateStorageBackends",
    "DirectoryLockedError",
    "GdsKvCacheError",
    "IOEngineError",
    "IOPathReport",
    "KeyFormatError",
    "LMCacheEngineConfig",
    "LMCacheEngineMetadata",
    "LocalCPUBackend",
    "LocalDiskBackend",
    "LookupServerInterface",
    "MemoryAllocatorInterface",
    "MemoryFormat",
    "MemoryObj",
    "ShapeMismatchError",
    "SlabMemoryAllocator",
    "StorageBackendInterface",
    "StorageFullError",
    "StorageManager",
    "StorageUnavailableError",
    "StoreResult",
    "__version__",
]
