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
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from .errors import ConfigError
from .units import GB, KiB, MiB, PAGE

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

IO_ENGINES = ("auto", "kvikio", "posix", "mapped")
MEMORY_DEVICES = ("auto", "cuda", "pinned", "host")
_ENV_PREFIXES = ("GDS_KVCACHE_", "LMCACHE_")

#: LMCache's default ``max_local_cpu_size`` (GB); also the default slab size.
DEFAULT_CPU_SIZE_GB = 5.0
#: Share of physical memory a default host or pinned slab may take.
HOST_SLAB_SHARE = 1 / 8
#: Share of the free memory of the GPU a default cuda slab may take.
CUDA_SLAB_SHARE = 1 / 4
# Smallest default slab, whatever the machine: below this a few chunks of a
# real model no longer fit and every put would wait on eviction.
_MIN_DEFAULT_SLAB = 64 * MiB


class _MachineDefault(float):
    """LMCache's default ``max_local_cpu_size``, marked as not chosen by the user.

    A float, so code that reads the field as LMCache's number keeps working;
    the type lets the config tell "left at 5.0" from "set to 5.0".
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return float.__repr__(self)

    def __reduce__(self):
        return (_MachineDefault, (float(self),))


def physical_memory() -> int:
    """Bytes of memory this process can use: physical RAM, or less under a cgroup limit."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # In a container the cgroup limit, not the host's RAM, is what an
    # allocation runs into; "max" or a huge v1 value means no limit.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
        break
    return total


def _slab_device(memory_device: str) -> tuple[str, str]:
    """Where a slab of ``memory_device`` lives for sizing: ``cuda`` or host memory, and why."""
    import torch

    gpu = torch.cuda.is_available()
    if memory_device == "auto":
        return ("cuda", "a CUDA GPU is visible") if gpu else ("host", "no CUDA GPU visible")
    if memory_device == "cuda" and not gpu:
        # Building the slab will refuse this; size as host meanwhile so that
        # describing the config still works.
        return "host", "no CUDA GPU visible"
    return memory_device, "set"


def _fit_default(memory_device: str, cuda_device: int) -> tuple[int, str]:
    """The default ``max_local_cpu_size`` in bytes on this machine, and the reason in words."""
    device, _ = _slab_device(memory_device)
    want = int(DEFAULT_CPU_SIZE_GB * GB)
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(cuda_device)
        share, bound = f"1/{round(1 / CUDA_SLAB_SHARE)}", int(free * CUDA_SLAB_SHARE)
        base = f"{free / GB:.1f} GB free on cuda:{cuda_device}"
    else:
        phys = physical_memory()
        share, bound = f"1/{round(1 / HOST_SLAB_SHARE)}", int(phys * HOST_SLAB_SHARE)
        base = f"{phys / GB:.1f} GB physical memory, {device} slab"
    if bound >= want:
        return want, f"fits in {share} of the {base}"
    return max(_MIN_DEFAULT_SLAB, bound // PAGE * PAGE), f"bounded to {share} of the {base}"


class ConfigFileError(ConfigError):
    """A config file is missing, unreadable, not YAML or not a mapping; ``field`` is ``"config file"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__("config file", os.fspath(path), problem)
        # ConfigError's "field = value is invalid" reads oddly for a file.
        self.args = (f"config file {os.fspath(path)!r} {problem}",)


def _kind_name(kind: type) -> str:
    return "an integer" if kind is int else "a number"


def _parse_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, v, "a boolean (true/false, 1/0, yes/no, on/off)")


def _parse_number(name: str, v: Any, kind: type) -> Any:
    what = _kind_name(kind)
    if isinstance(v, bool):
        raise ConfigError(name, v, what)
    if isinstance(v, str):
        try:
            v = kind(v.strip()) if kind is int else float(v.strip())
        except ValueError:
            raise ConfigError(name, v, what) from None
    if kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ConfigError(name, v, what)
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(name, v, "a finite number")
    return kind(v)


def _valid_redis_url(url: str) -> bool:
    """Whether ``url`` is a Redis URL the client can use: a scheme, a host, a port in range and a
    numeric database, or a unix socket path; no query (an option the client might reject later)."""
    from urllib.parse import urlsplit

    if re.search(r"\s", url):
        return False
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return False
    if u.query or u.fragment:
        return False
    if u.scheme == "unix":
        return not u.netloc and len(u.path) > 1
    if u.scheme not in ("redis", "rediss") or not u.hostname:
        return False
    if port is not None and not 1 <= port <= 65535:
        return False
    return u.path in ("", "/") or re.fullmatch(r"/\d{1,9}", u.path) is not None


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
        values = _lookup_alias(values, "lookup_url", "lookup_server_url")
        known = {f.name for f in fields(cls)}
        # str() as the sort key: YAML keys may be ints or None, which do not
        # sort against strings.
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ConfigError(str(unknown[0]), values[unknown[0]], "one of " + ", ".join(sorted(known)))
        return cls(**dict(values))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CacheEngineConfig":
        """Load a YAML file of ``field: value`` pairs.

        A file that is missing, unreadable, not valid YAML or not a mapping
        raises ``ConfigFileError`` (a ``ConfigError`` with the field
        ``config file``) naming the file and, for a syntax error, the line
        and column.
        """
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ConfigFileError(path, f"cannot be read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigFileError(path, "is not UTF-8 text") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigFileError(path, f"is not valid YAML: syntax error{where}: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigFileError(path, f"holds a YAML {type(data).__name__}, not a mapping of field: value pairs")
        return cls.from_dict(data)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "CacheEngineConfig":
        """Build from ``GDS_KVCACHE_<FIELD>`` (or ``LMCACHE_<FIELD>``) variables.

        Values are stripped of surrounding whitespace; ``none`` or an empty
        value means None for ``local_disk`` and ``slab_size``. A bad value
        raises ``ConfigError`` naming the field and the variable.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        source: dict[str, str] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            for prefix in _ENV_PREFIXES:
                raw = environ.get(prefix + f.name.upper())
                if raw is not None:
                    raw = raw.strip()
                    values[f.name] = None if raw.lower() in ("none", "") and f.name in (
                        "local_disk", "slab_size", "lookup_server_url") else raw
                    source[f.name] = prefix + f.name.upper()
                    break
            if f.name == "lookup_server_url" and f.name not in values:
                for prefix in _ENV_PREFIXES:   # LMCache's name for it
                    raw = environ.get(prefix + "LOOKUP_URL")
                    if raw is not None:
                        values[f.name] = None if raw.strip().lower() in ("none", "") else raw.strip()
                        source[f.name] = prefix + "LOOKUP_URL"
                        break
        try:
            return cls(**values)
        except ConfigError as e:
            if e.field not in source:
                raise
            raise ConfigError(e.field, e.value, f"{e.allowed} (set by environment variable {source[e.field]})") \
                from None

    def replace(self, **changes: Any) -> "CacheEngineConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CacheEngineMetadata:
    """Who produced the KV: model, parallel rank, chunk format, dtype and shape.

    ``kv_shape`` is LMCache's ``(num_layers, 2, chunk_size, num_kv_heads,
    head_size)``; for MLA models the 2 is a 1. ``kv_dtype`` is a
    ``torch.dtype``. Every field is checked when the object is built, with a
    ``ConfigError`` naming the field.

    Notes
    -----
    ``model_name`` and ``fmt`` become part of every cache key and file name,
    so they must be valid Unicode text: a string holding a lone surrogate
    (what ``os.fsdecode`` makes of undecodable bytes) is refused here rather
    than when the first chunk is stored.
    """

    model_name: str
    world_size: int
    worker_id: int
    fmt: str
    kv_dtype: Any
    kv_shape: tuple

    def __post_init__(self) -> None:
        import torch

        for name, example in (("model_name", "such as 'meta-llama/Llama-3.1-8B'"), ("fmt", "such as 'vllm'")):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ConfigError(name, v, f"a non-empty string {example}")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(name, v, "valid Unicode text (this one holds a lone surrogate)") from None
        if not _is_int(self.world_size) or self.world_size < 1:
            raise ConfigError("world_size", self.world_size, "an integer >= 1")
        if not _is_int(self.worker_id) or not 0 <= self.worker_id < self.world_size:
            raise ConfigError("worker_id", self.worker_id, f"an integer in 0..{self.world_size - 1}")
        if not isinstance(self.kv_dtype, torch.dtype):
            raise ConfigError("kv_dtype", self.kv_dtype, "a torch.dtype such as torch.bfloat16")
        allowed = "(num_layers, 2 or 1, chunk_size, num_kv_heads, head_size), all integers >= 1"
        try:
            shape = tuple(self.kv_shape)
        except TypeError:
            raise ConfigError("kv_shape", self.kv_shape, allowed) from None
        if len(shape) != 5 or any(not _is_int(d) or d < 1 for d in shape) or shape[1] not in (1, 2):
            raise ConfigError("kv_shape", self.kv_shape, allowed)
        object.__setattr__(self, "world_size", int(self.world_size))
        object.__setattr__(self, "worker_id", int(self.worker_id))
        object.__setattr__(self, "kv_shape", tuple(int(d) for d in shape))


def _lookup_alias(values: Mapping[str, Any], alias: str, name: str) -> Mapping[str, Any]:
    """``values`` with LMCache's field name ``alias`` renamed to ours (both given: a ConfigError)."""
    if alias not in values:
        return values
    if name in values and values[name] != values[alias]:
        raise ConfigError(alias, values[alias], f"the same value as {name} ({values[name]!r}), or only one of them")
    out = {k: v for k, v in values.items() if k != alias}
    out[name] = values[alias]
    return out


def _is_int(v: Any) -> bool:
    # bool is an int subclass; True as a world size is a bug, not a 1.
    return isinstance(v, int) and not isinstance(v, bool)


LMCacheEngineConfig = CacheEngineConfig
LMCacheEngineMetadata = CacheEngineMetadata
