"""Validated configuration and model metadata.

``CacheEngineConfig`` keeps LMCache's field names where they exist
(``chunk_size``, ``local_cpu``, ``max_local_cpu_size``, ``local_disk``,
``max_local_disk_size``; sizes in GB = 2**30 bytes) and adds the I/O knobs of
this library. It loads from a YAML file or from environment variables, and
every value is checked when the object is built.

Sizes left at their defaults are fitted to the machine: the default slab is
LMCache's 5 GB bounded by a share of physical memory (host and pinned slabs)
or of free GPU memory (cuda slabs), so an untuned config never pins or
zero-fills most of a small machine. ``describe_defaults()`` says what they
resolve to here.

Modules: ``engine`` (``CacheEngineConfig`` and its checks), ``values`` (checks
of single values), ``loading`` (mappings, YAML files, the environment),
``machine`` (machine-sized defaults), ``metadata`` (``CacheEngineMetadata``).
"""

from .engine import IO_ENGINES, MEMORY_DEVICES, CacheEngineConfig
from .loading import ConfigFileError
from .machine import CUDA_SLAB_SHARE, DEFAULT_CPU_SIZE_GB, HOST_SLAB_SHARE, _MachineDefault, physical_memory
from .metadata import CacheEngineMetadata

__all__ = [
    "CUDA_SLAB_SHARE",
    "CacheEngineConfig",
    "CacheEngineMetadata",
    "ConfigFileError",
    "DEFAULT_CPU_SIZE_GB",
    "HOST_SLAB_SHARE",
    "LMCacheEngineConfig",
    "LMCacheEngineMetadata",
    "IO_ENGINES",
    "MEMORY_DEVICES",
    "physical_memory",
]

# _MachineDefault stays importable here: pickles made before the split name it as gds_kvcache.config._MachineDefault.
LMCacheEngineConfig = CacheEngineConfig
LMCacheEngineMetadata = CacheEngineMetadata
