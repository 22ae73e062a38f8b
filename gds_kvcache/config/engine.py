"""``CacheEngineConfig``: the validated settings of a cache engine's storage tiers.

Every value is checked when the object is built; loading from a mapping, a
YAML file or the environment is in ``loading``, the machine-sized defaults in
``machine``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..errors import ConfigError
from ..units import GB, KiB, MiB, PAGE
from .loading import config_from_dict, config_from_env, config_from_file
from .machine import DEFAULT_CPU_SIZE_GB, _fit_default, _MachineDefault, _slab_device
from .values import _parse_bool, _parse_number, _parse_seconds, _parse_writer_id, _valid_redis_url

__all__ = ["CacheEngineConfig", "IO_ENGINES", "KVIKIO_STAGINGS", "MEMORY_DEVICES"]

IO_ENGINES = ("auto", "kvikio", "posix", "mapped")
MEMORY_DEVICES = ("auto", "cuda", "pinned", "host")
KVIKIO_STAGINGS = ("pipelined", "kvikio")


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
        Hot-tier budget in GB (> 0). Also the slab size when ``slab_size`` is
        None. Left at its default it is LMCache's 5 GB bounded by this
        machine: at most 1/8 of physical memory (a cgroup limit counts) for a
        host or pinned slab, at most 1/4 of the GPU's free memory for a cuda
        slab, and at least 64 MiB; ``describe_defaults()`` shows the result. Set
        it (even to 5) and it is taken as given.
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
        Slab size in GB; None means ``max_local_cpu_size`` (machine-bounded
        when that is left at its default).
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
    lookup_server_url
        None (local mode, the default) or the Redis server of shared mode,
        ``redis://host:port[/db]``, ``rediss://...`` or ``unix:///path``
        (LMCache's name ``lookup_url`` is accepted by ``from_dict``,
        ``from_file`` and ``from_env``). ``local_disk`` is then the directory
        every process shares (``gds_kvcache.shared.SharedDiskBackend``).
    writer_id
        Shared mode: this process's subdirectory of ``local_disk``
        (``writers/<writer_id>``), 1-64 letters, digits, ``.``, ``_`` or ``-``
        (not ``.`` or ``..``). None (the default) takes the first free
        ``<hostname>-<n>``, so a restarted process gets its old directory and
        chunks back. Every process needs its own: set it per process.
    lease_ttl
        Shared mode: seconds a reader's lease keeps an extent from reuse
        (0 < x < 3600, default 5); a read must finish within it.
    claim_ttl
        Shared mode: seconds a put claim keeps other writers off a key
        (0 < x < 3600, default 30).
    shared_tick
        Shared mode: seconds between housekeeping passes (retractions, lease
        ends, Redis restart and rebuild-request checks; 0 < x < 3600, default
        0.2).
    redis_socket_timeout
        Shared mode: seconds a Redis call (and connecting) may take before it
        fails (0 < x <= 600, default 2).
    redis_backoff
        Shared mode: seconds Redis is treated as down after a timeout before it
        is probed again (0 < x <= 3600, default 5).
    kvikio_staging
        How the KvikIO engine moves a CUDA slab to and from files on KvikIO's
        POSIX compat path (no GDS): ``pipelined`` (default) through this
        library's pinned buffers, allocated once, the GPU copy of one piece
        overlapping KvikIO's file I/O of others; ``kvikio`` hands device
        memory to KvikIO, which copies each task to its own pinned buffer and
        then writes it, one after the other. Files where cuFile runs (GDS)
        take device memory directly either way.
    use_layerwise
        Store each chunk as one object per layer (LMCache's name), so that
        ``CacheEngine.retrieve_layer`` reads, verifies and unpacks one layer
        while the model computes the one before (see ``gds_kvcache.layerwise``).
        Chunks stored whole still load; an engine without it ignores
        per-layer objects. Default False: one object per chunk.

    Notes
    -----
    On a GDS node keep ``memory_device='cuda'`` and ``direct_io=True`` so reads
    DMA straight into the registered slab. ``io_threads`` of 8-32 saturates a
    typical NVMe array; a single thread (KvikIO's default) leaves most of the
    bandwidth unused.

    The slab is allocated (and, on host, zero-filled) when a ``StorageManager``
    is built, so its size is paid in start-up time and resident memory: set
    ``slab_size`` explicitly on a dedicated node rather than relying on the
    machine-bounded default. Environment values (``from_env``) are
    whitespace-stripped for every field.
    """

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = _MachineDefault(DEFAULT_CPU_SIZE_GB)
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
    lookup_server_url: Optional[str] = None
    extra: dict = field(default_factory=dict)
    # Shared mode (only read when lookup_server_url is set). Declared after
    # ``extra`` so that positional arguments keep their meaning.
    writer_id: Optional[str] = None
    lease_ttl: float = 5.0
    claim_ttl: float = 30.0
    shared_tick: float = 0.2
    redis_socket_timeout: float = 2.0
    redis_backoff: float = 5.0
    kvikio_staging: str = "pipelined"
    use_layerwise: bool = False

    def __post_init__(self) -> None:
        self.chunk_size = _parse_number("chunk_size", self.chunk_size, int)
        if not 1 <= self.chunk_size <= 1 << 20:
            raise ConfigError("chunk_size", self.chunk_size, "an integer in 1..1048576")
        self.local_cpu = _parse_bool("local_cpu", self.local_cpu)
        if not isinstance(self.max_local_cpu_size, _MachineDefault):
            self.max_local_cpu_size = _parse_number("max_local_cpu_size", self.max_local_cpu_size, float)
            if not 0 < self.max_local_cpu_size <= 1 << 20:
                raise ConfigError("max_local_cpu_size", self.max_local_cpu_size, "GB > 0")
        if self.local_disk is not None:
            allowed = "a directory path (PATH or file://PATH) or None"
            if not isinstance(self.local_disk, (str, os.PathLike)):
                raise ConfigError("local_disk", self.local_disk, allowed)
            path = os.fspath(self.local_disk)
            if not isinstance(path, str):
                raise ConfigError("local_disk", self.local_disk, allowed)
            if path.startswith("file://"):
                path = path[len("file://"):]
            # "file://" alone would otherwise become "" and then the current
            # directory; a NUL byte fails later in every os call.
            if not path.strip() or "\x00" in path:
                raise ConfigError("local_disk", self.local_disk, allowed)
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
        if self.lookup_server_url is not None:
            if not (isinstance(self.lookup_server_url, str) and _valid_redis_url(self.lookup_server_url.strip())):
                raise ConfigError("lookup_server_url", self.lookup_server_url,
                                  "None (local mode) or redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... or "
                                  "unix:///PATH (PORT 1..65535, DB a decimal number)")
            self.lookup_server_url = self.lookup_server_url.strip()
        if not isinstance(self.extra, dict):
            raise ConfigError("extra", self.extra, "a mapping")
        self.writer_id = _parse_writer_id("writer_id", self.writer_id)
        self.lease_ttl = _parse_seconds("lease_ttl", self.lease_ttl, 3600, limit_allowed=False)
        self.claim_ttl = _parse_seconds("claim_ttl", self.claim_ttl, 3600, limit_allowed=False)
        self.shared_tick = _parse_seconds("shared_tick", self.shared_tick, 3600, limit_allowed=False)
        self.redis_socket_timeout = _parse_seconds("redis_socket_timeout", self.redis_socket_timeout, 600,
                                                   limit_allowed=True)
        self.redis_backoff = _parse_seconds("redis_backoff", self.redis_backoff, 3600, limit_allowed=True)
        if isinstance(self.kvikio_staging, str):
            self.kvikio_staging = self.kvikio_staging.strip()
        if self.kvikio_staging not in KVIKIO_STAGINGS:
            raise ConfigError("kvikio_staging", self.kvikio_staging, " | ".join(KVIKIO_STAGINGS))
        self.use_layerwise = _parse_bool("use_layerwise", self.use_layerwise)

    # -- derived sizes -------------------------------------------------
    @property
    def cpu_size_is_default(self) -> bool:
        """True when ``max_local_cpu_size`` was left at its default (and is sized for the machine)."""
        return isinstance(self.max_local_cpu_size, _MachineDefault)

    @property
    def cpu_bytes(self) -> int:
        """``max_local_cpu_size`` in bytes, after fitting a default to this machine."""
        if not self.cpu_size_is_default:
            return int(self.max_local_cpu_size * GB)
        return self._machine_default()[0]

    @property
    def slab_bytes(self) -> int:
        nbytes = int(self.slab_size * GB) if self.slab_size is not None else self.cpu_bytes
        return max(PAGE, nbytes // PAGE * PAGE)

    @property
    def hot_bytes(self) -> int:
        return self.cpu_bytes if self.local_cpu else 0

    def _machine_default(self) -> tuple[int, str]:
        # Worked out once per config: the free GPU memory drops as soon as the
        # slab is allocated, and the hot-tier budget read after that must
        # still match the slab.
        cached = self.__dict__.get("_machine_default_cache")
        if cached is None:
            cached = self.__dict__["_machine_default_cache"] = _fit_default(self.memory_device, self.cuda_device)
        return cached

    def describe_defaults(self) -> dict[str, str]:
        """What the machine-dependent defaults resolve to here, one English line per field.

        Notes
        -----
        Meant for ``gds-kvcache info``. On a GPU machine this queries the
        free memory of ``cuda_device`` (creating a CUDA context there) when
        the slab would live on the GPU.
        """
        out = {}
        device, why_device = _slab_device(self.memory_device)
        if self.memory_device == "auto":
            out["memory_device"] = f"auto -> {device} ({why_device})"
        if self.cpu_size_is_default:
            nbytes, why = self._machine_default()
            out["max_local_cpu_size"] = f"LMCache's {DEFAULT_CPU_SIZE_GB:g} GB -> {nbytes / GB:.2f} GB here ({why})"
        else:
            out["max_local_cpu_size"] = f"{self.max_local_cpu_size:g} GB (set)"
        if self.slab_size is None:
            out["slab_size"] = (f"None -> {self.slab_bytes / GB:.2f} GB on {device} "
                                "(= max_local_cpu_size)")
        else:
            out["slab_size"] = f"{self.slab_size:g} GB on {device} (set)"
        return out

    @property
    def disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GB)

    # -- loading -------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CacheEngineConfig":
        """Build from ``field: value`` pairs (LMCache's ``lookup_url`` is accepted for ``lookup_server_url``).

        An unknown key raises ``ConfigError`` naming it and listing the fields.
        """
        return config_from_dict(cls, values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CacheEngineConfig":
        """Load a YAML file of ``field: value`` pairs.

        A file that is missing, unreadable, not valid YAML or not a mapping
        raises ``ConfigFileError`` (a ``ConfigError`` with the field
        ``config file``) naming the file and, for a syntax error, the line
        and column.
        """
        return config_from_file(cls, path)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "CacheEngineConfig":
        """Build from ``GDS_KVCACHE_<FIELD>`` (or ``LMCACHE_<FIELD>``) variables.

        Values are stripped of surrounding whitespace; ``none`` or an empty
        value means None for ``local_disk``, ``slab_size``,
        ``lookup_server_url`` and ``writer_id``. ``*_LOOKUP_URL`` (LMCache's
        name) sets ``lookup_server_url`` when ``*_LOOKUP_SERVER_URL`` is not
        set. A bad value raises ``ConfigError`` naming the field and the
        variable.
        """
        return config_from_env(cls, environ)

    def replace(self, **changes: Any) -> "CacheEngineConfig":
        return dataclasses.replace(self, **changes)
