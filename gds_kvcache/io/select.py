"""Pick the I/O engine for a pool: mapped on a RAM-backed file system, else KvikIO where the CUDA driver loads, else POSIX."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Optional

from ..config import CacheEngineConfig
from ..errors import IOEngineError
from ..units import GB
from .base import IOEngine
from .driver import kvikio_error
from .kvikio_engine import KvikIOEngine
from .mapped_engine import MappedEngine
from .posix_engine import PosixEngine

__all__ = ["open_engine", "choose_engine", "ram_backed_fs", "pool_ram_needed", "mapped_unfit"]

log = logging.getLogger(__name__)

#: statfs ``f_type`` of file systems whose pages are RAM.
RAM_FS_MAGIC = {0x01021994: "tmpfs", 0x858458F6: "ramfs", 0x958458F6: "hugetlbfs"}
#: RAM kept free beyond the pool: at least this much ...
RAM_MARGIN_MIN = 1 * GB
#: ... or this share of MemTotal, whichever is larger.
RAM_MARGIN_SHARE = 0.10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _fs_magic(path: str) -> Optional[int]:
    # os.statvfs has no f_type. f_type is the first field of struct statfs
    # (a long on 64-bit Linux); 256 bytes covers the struct on every arch.
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _mount_of(path: str) -> Optional[tuple[str, set]]:
    """(file system type, mount and super options) of the mount holding ``path``, from mountinfo."""
    try:
        st = os.stat(path)
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for line in lines:
        left, _, right = line.partition(" - ")
        mine, theirs = left.split(), right.split()
        if len(mine) >= 6 and mine[2] == dev and theirs:
            opts = set(mine[5].split(",")) | (set(theirs[2].split(",")) if len(theirs) > 2 else set())
            return theirs[0], opts
    return None


def ram_backed_fs(directory: str) -> Optional[str]:
    """The name of ``directory``'s file system if its pages are memory (tmpfs, ramfs, hugetlbfs, DAX), else None."""
    name = RAM_FS_MAGIC.get(_fs_magic(directory))
    if name is not None:
        return name
    mount = _mount_of(directory)
    if mount is not None and ({"dax", "dax=always"} & mount[1]):
        return f"{mount[0]} (DAX)"
    return None


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                parts = v.split()
                if parts:
                    out[k] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def pool_ram_needed(paths, stripe_bytes: Optional[int]) -> int:
    """Bytes of RAM mapping ``paths`` would newly take: each file's mapped size less the blocks it already holds.

    Notes
    -----
    A restart on a ``/dev/shm`` pool finds its pages already allocated (and
    already missing from ``MemAvailable``), so only the holes count.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    need = 0
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            need += stripe_bytes or 0
            continue
        need += max(0, (stripe_bytes or st.st_size) - st.st_blocks * 512)
    return need


def _fit(directory: str, pool_bytes: int) -> tuple[Optional[str], Optional[str]]:
    """(reason the mapped path cannot run, reason it is unwise) for ``pool_bytes`` more RAM in ``directory``."""
    fs = ram_backed_fs(directory)
    if fs is None:
        return f"{directory} is not on a RAM-backed file system (tmpfs, ramfs, hugetlbfs or DAX)", None
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize
    if pool_bytes > free:
        return f"the pool needs {pool_bytes} more bytes but {fs} at {directory} has {free} free", None
    mem = _meminfo()
    avail, total = mem.get("MemAvailable"), mem.get("MemTotal", 0)
    if avail is None:
        return None, None
    if pool_bytes > avail:
        return f"the pool needs {pool_bytes} more bytes of RAM but MemAvailable is {avail}", None
    margin = max(RAM_MARGIN_MIN, int(total * RAM_MARGIN_SHARE))
    if pool_bytes > avail - margin:
        return None, (f"the pool needs {pool_bytes} more bytes of RAM, leaving less than the {margin}-byte "
                      f"margin of MemAvailable ({avail})")
    return None, None


def mapped_unfit(directory: str, pool_bytes: int = 0) -> Optional[str]:
    """Why ``io_engine='auto'`` would not map a pool needing ``pool_bytes`` more RAM in ``directory``; None if it would."""
    hard, soft = _fit(directory, pool_bytes)
    return hard or soft


def choose_engine(requested: str, directory: Optional[str] = None, pool_bytes: int = 0) -> tuple[str, str]:
    """(engine name, why) for ``io_engine`` = auto | mapped | kvikio | posix.

    Parameters
    ----------
    requested
        ``config.io_engine``.
    directory
        The pool's directory. Without it ``auto`` never picks ``mapped``
        and ``mapped`` is taken on trust.
    pool_bytes
        RAM the pool would newly take if mapped (``pool_ram_needed``).

    Notes
    -----
    ``auto`` maps the pool when the directory's file system is RAM-backed and
    the pool fits in ``MemAvailable`` with a margin (``RAM_MARGIN_MIN`` or
    ``RAM_MARGIN_SHARE`` of RAM); when the file system is RAM-backed but the
    pool does not fit, the log says why.
    """
    if requested == "posix":
        return "posix", "requested in config"
    if requested == "mapped":
        if directory is not None:
            hard, soft = _fit(directory, pool_bytes)
            if hard is not None:
                raise IOEngineError(f"io_engine='mapped' but {hard}")
            if soft is not None:
                log.warning("io_engine='mapped': %s", soft)
        return "mapped", "requested in config"
    err = kvikio_error()
    if requested == "kvikio":
        if err is not None:
            raise IOEngineError(f"io_engine='kvikio' but KvikIO cannot run here: {err}")
        return "kvikio", "requested in config"
    if directory is not None:
        fs = ram_backed_fs(directory)
        if fs is not None:
            why_not = mapped_unfit(directory, pool_bytes)
            if why_not is None:
                return "mapped", f"auto: {directory} is on {fs} and the pool fits in memory"
            log.warning("not mapping the pool in %s (%s): %s; using a read-based engine", directory, fs, why_not)
    if err is not None:
        return "posix", f"KvikIO unavailable: {err}"
    return "kvikio", "auto: KvikIO and the CUDA driver are available"


def _engine_error(e: OSError, msg: str) -> IOEngineError:
    return IOEngineError(e.errno, msg) if e.errno else IOEngineError(msg)


def open_engine(paths, config: CacheEngineConfig, memory: str, stripe_bytes: int | None = None,
                read_only: bool = False) -> IOEngine:
    """The engine ``config.io_engine`` asks for, over ``paths`` (one file or the stripes of a pool).

    Parameters
    ----------
    paths, config, memory, stripe_bytes
        The pool files, the settings (``io_engine``, ``io_threads``,
        ``io_task_size``, ``direct_io``), the slab kind and bytes per file.
    read_only
        Open the files ``O_RDONLY`` and refuse writes (``IOEngine.read_only``):
        for pool files another process owns. Never the ``mapped`` engine:
        ``auto`` and ``mapped`` then take KvikIO where it can run, else POSIX.

    Notes
    -----
    Under ``auto`` a pool that cannot be mapped after all (ENOSPC while
    reserving its pages, a refused registration) falls back to a read-based
    engine with a warning; under ``mapped`` that is an ``IOEngineError``.

    Read-only engines never map because the owner may shrink its files (a
    restart with a smaller budget): touching a mapped page past the new end is
    SIGBUS, which kills the reader, where ``pread`` just comes back short and
    fails that one span.
    """
    plist = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    directory = os.path.dirname(os.path.abspath(os.fspath(plist[0])))
    if read_only:
        requested = "auto" if config.io_engine == "mapped" else config.io_engine
        # No directory: choose_engine then never maps, and picks KvikIO where it can run.
        name, why = choose_engine(requested)
        if config.io_engine in ("auto", "mapped"):
            why = f"read-only, never mapped ({why})"
        log.info("read-only I/O engine %s over %s (%s)", name, directory, why)
        if name == "kvikio":
            return KvikIOEngine(paths, config.io_threads, config.io_task_size, config.direct_io, memory,
                                stripe_bytes, read_only=True, staging=config.kvikio_staging)
        return PosixEngine(paths, config.io_threads, config.io_task_size, config.direct_io, memory, stripe_bytes,
                           read_only=True)
    name, why = choose_engine(config.io_engine, directory, pool_ram_needed(plist, stripe_bytes))
    if name == "mapped":
        try:
            eng = MappedEngine(plist, config.io_threads, config.io_task_size, config.direct_io, memory, stripe_bytes)
        except IOEngineError as e:
            detail = e.strerror if e.errno else str(e)
            if config.io_engine == "mapped":
                raise _engine_error(e, f"io_engine='mapped' but the pool in {directory} cannot be mapped: "
                                       f"{detail}") from None
            log.warning("cannot map the pool in %s (%s); falling back to a read-based engine", directory, detail)
            name, why = choose_engine("auto")
            why = f"{why} (mapping failed: {detail})"
        else:
            log.info("I/O engine mapped (%s)", why)
            return eng
    log.info("I/O engine %s (%s)", name, why)
    if name == "kvikio":
        return KvikIOEngine(paths, config.io_threads, config.io_task_size, config.direct_io, memory, stripe_bytes,
                            staging=config.kvikio_staging)
    return PosixEngine(paths, config.io_threads, config.io_task_size, config.direct_io, memory, stripe_bytes)
