"""Validated configuration and model metadata.

``CacheEngineConfig`` keeps LMCache's field names where they exist
(``chunk_size``, ``local_cpu``, ``max_local_cpu_size``, ``local_disk``,
``max_local_disk_size``; sizes in GB = 2**30 bytes) and adds the I/O knobs of
this library. It loads from a YAML file or from environment variables, and
every value is checked when the object is built.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from .errors import ConfigError
from .units import GB, KiB, MiB, PAGE

__all__ = [
    "CacheEngineConfig",
    "CacheEngineMetadata",
    "LMCacheEngineConfig",
    "LMCacheEngineMetadata",
    "IO_ENGINES",
    "MEMORY_DEVICES",
]

IO_ENGINES = ("auto", "kvikio", "posix", "mapped")
MEMORY_DEVICES = ("auto", "cuda", "pinned", "host")
_ENV_PREFIXES = ("GDS_KVCACHE_", "LMCACHE_")


def _parse_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, v, "a boolean (true/false, 1/0, yes/no, on/off)")


def _parse_number(name: str, v: Any, kind: type) -> Any:
    if isinstance(v, bool):
        raise ConfigError(name, v, f"a {kind.__name__}")
    if isinstance(v, str):
        try:
            v = kind(v.strip()) if kind is int else float(v.strip())
        except ValueError:
            raise ConfigError(name, v, f"a {kind.__name__}") from None
    if kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ConfigError(name, v, f"a {kind.__name__}")
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(name, v, f"a finite {kind.__name__}")
    return kind(v)


@dataclass
class CacheEngineConfig:
    """Everything that shapes a cache engine's storage tiers.

    Parameters
    ----------
    chunk_size
        Tokens per KV chunk (1 .. 1_048_576).
    local_cpu
        Keep a hot tier in slab memory in front of the disk.
    max_local_cpu_size
        Hot-tier budget in GB (> 0). Also the default slab size.
    local_disk
        Directory for the disk tier, or None for no disk tier. ``file://``
        prefixes (LMCache style) are accepted.
    max_local_disk_size
        Disk budget in GB (> 0 when ``local_disk`` is set). Bytes on disk,
        data and index together, never exceed it.
    io_engine
        ``auto`` (the mapped path on a RAM-backed file system, else KvikIO
        where the CUDA driver loads, else POSIX), ``mapped``, ``kvikio`` or
        ``posix``.
    io_threads
        I/O threads (1 .. 256). Also KvikIO's thread pool size.
    io_task_size
        Bytes per parallel I/O task (4 KiB multiple, 64 KiB .. 1 GiB).
    direct_io
        Use O_DIRECT where buffers, offsets and sizes are 4 KiB-aligned and the
        file system allows it.
    memory_device
        Where the slab lives: ``auto`` (CUDA if a GPU is visible, else host),
        ``cuda``, ``pinned`` or ``host``.
    slab_size
        Slab size in GB; None means ``max_local_cpu_size``.
    cuda_device
        CUDA device index for a ``cuda`` slab.
    verify_checksums
        Check every chunk read from disk against its stored checksum.
    pool_files
        Files the disk pool is striped over (1 .. 64); writes to different
        files run in parallel where a file system locks a file per writer.
    preallocate
        Reserve the whole pool on disk up front (``posix_fallocate``): no
        ENOSPC mid-put and no block allocation on the write path, at the cost
        of taking ``max_local_disk_size`` at once.

    Notes
    -----
    On a GDS node keep ``memory_device='cuda'`` and ``direct_io=True`` so reads
    DMA straight into the registered slab. ``io_threads`` of 8-32 saturates a
    typical NVMe array; a single thread (KvikIO's default) leaves most of the
    bandwidth unused.
    """

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_disk: Optional[str] = None
    max_local_disk_size: float = 0.0
    io_engine: str = "auto"
    io_threads: int = 16
    io_task_size: int = 4 * MiB
    direct_io: bool = True
    memory_device: str = "auto"
    slab_size: Optional[float] = None
    cuda_device: int = 0
    verify_checksums: bool = True
    pool_files: int = 8
    preallocate: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.chunk_size = _parse_number("chunk_size", self.chunk_size, int)
        if not 1 <= self.chunk_size <= 1 << 20:
            raise ConfigError("chunk_size", self.chunk_size, "an integer in 1..1048576")
        self.local_cpu = _parse_bool("local_cpu", self.local_cpu)
        self.max_local_cpu_size = _parse_number("max_local_cpu_size", self.max_local_cpu_size, float)
        if not 0 < self.max_local_cpu_size <= 1 << 20:
            raise ConfigError("max_local_cpu_size", self.max_local_cpu_size, "GB > 0")
        if self.local_disk is not None:
            if not isinstance(self.local_disk, (str, os.PathLike)) or not str(self.local_disk).strip():
                raise ConfigError("local_disk", self.local_disk, "a directory path or None")
            path = str(self.local_disk)
            if path.startswith("file://"):
                path = path[len("file://"):]
            self.local_disk = path
        self.max_local_disk_size = _parse_number("max_local_disk_size", self.max_local_disk_size, float)
        if self.max_local_disk_size < 0 or (self.local_disk is not None and self.max_local_disk_size <= 0):
            raise ConfigError("max_local_disk_size", self.max_local_disk_size,
                              "GB > 0 when local_disk is set (>= 0 otherwise)")
        if self.local_disk is not None and self.max_local_disk_size * GB < 64 * PAGE:
            raise ConfigError("max_local_disk_size", self.max_local_disk_size, "at least 256 KiB (0.000244 GB)")
        if self.io_engine not in IO_ENGINES:
            raise ConfigError("io_engine", self.io_engine, " | ".join(IO_ENGINES))
        self.io_threads = _parse_number("io_threads", self.io_threads, int)
        if not 1 <= self.io_threads <= 256:
            raise ConfigError("io_threads", self.io_threads, "an integer in 1..256")
        self.io_task_size = _parse_number("io_task_size", self.io_task_size, int)
        if not (64 * KiB <= self.io_task_size <= GB and self.io_task_size % PAGE == 0):
            raise ConfigError("io_task_size", self.io_task_size, "a multiple of 4096 in 65536..1073741824")
        self.direct_io = _parse_bool("direct_io", self.direct_io)
        if self.memory_device not in MEMORY_DEVICES:
            raise ConfigError("memory_device", self.memory_device, " | ".join(MEMORY_DEVICES))
        if self.slab_size is not None:
            self.slab_size = _parse_number("slab_size", self.slab_size, float)
            if not 0 < self.slab_size <= 1 << 20:
                raise ConfigError("slab_size", self.slab_size, "GB > 0 or None")
        self.cuda_device = _parse_number("cuda_device", self.cuda_device, int)
        if self.cuda_device < 0:
            raise ConfigError("cuda_device", self.cuda_device, "an integer >= 0")
        self.verify_checksums = _parse_bool("verify_checksums", self.verify_checksums)
        self.pool_files = _parse_number("pool_files", self.pool_files, int)
        if not 1 <= self.pool_files <= 64:
            raise ConfigError("pool_files", self.pool_files, "an integer in 1..64")
        self.preallocate = _parse_bool("preallocate", self.preallocate)
        if not isinstance(self.extra, dict):
            raise ConfigError("extra", self.extra, "a mapping")

    # -- derived sizes -------------------------------------------------
    @property
    def slab_bytes(self) -> int:
        gb = self.slab_size if self.slab_size is not None else self.max_local_cpu_size
        return max(PAGE, int(gb * GB) // PAGE * PAGE)

    @property
    def hot_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB) if self.local_cpu else 0

    @property
    def disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GB)

    # -- loading -------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CacheEngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown[0], values[unknown[0]], "one of " + ", ".join(sorted(known)))
        return cls(**dict(values))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CacheEngineConfig":
        """Load a YAML file of ``field: value`` pairs."""
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError("<file>", str(path), "a YAML mapping of field: value")
        return cls.from_dict(data)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "CacheEngineConfig":
        """Build from ``GDS_KVCACHE_<FIELD>`` (or ``LMCACHE_<FIELD>``) variables."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            for prefix in _ENV_PREFIXES:
                raw = environ.get(prefix + f.name.upper())
                if raw is not None:
                    values[f.name] = None if raw.strip().lower() in ("none", "") and f.name in (
                        "local_disk", "slab_size") else raw
                    break
        return cls(**values)

    def replace(self, **changes: Any) -> "CacheEngineConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CacheEngineMetadata:
    """Who produced the KV: model, parallel rank, chunk format, dtype and shape.

    ``kv_shape`` is LMCache's ``(num_layers, 2, chunk_size, num_kv_heads,
    head_size)``; for MLA models the 2 is a 1.
    """

    model_name: str
    world_size: int
    worker_id: int
    fmt: str
    kv_dtype: Any
    kv_shape: tuple

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError("model_name", self.model_name, "a non-empty string")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ConfigError("world_size", self.world_size, "an integer >= 1")
        if not isinstance(self.worker_id, int) or not 0 <= self.worker_id < self.world_size:
            raise ConfigError("worker_id", self.worker_id, f"an integer in 0..{self.world_size - 1}")
        if not isinstance(self.fmt, str) or not self.fmt:
            raise ConfigError("fmt", self.fmt, "a non-empty string such as 'vllm'")
        shape = tuple(self.kv_shape)
        if len(shape) != 5 or any(not isinstance(d, int) or d < 1 for d in shape) or shape[1] not in (1, 2):
            raise ConfigError("kv_shape", self.kv_shape,
                              "(num_layers, 2 or 1, chunk_size, num_kv_heads, head_size), all >= 1")
        object.__setattr__(self, "kv_shape", shape)


LMCacheEngineConfig = CacheEngineConfig
LMCacheEngineMetadata = CacheEngineMetadata
