"""Can KvikIO run here, and would cuFile really DMA? Probes that never hang and never open the cuFile driver."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Optional

__all__ = [
    "GDS_FILE_SYSTEMS",
    "cuda_driver_error",
    "cufile_driver_state",
    "fs_type",
    "kvikio_error",
    "kvikio_path",
    "nvidia_fs_loaded",
]

log = logging.getLogger(__name__)

# File systems cuFile DMAs to and from; on any other it runs its own POSIX compat mode (or refuses).
GDS_FILE_SYSTEMS = ("ext4", "xfs", "lustre", "beegfs", "wekafs", "gpfs", "nfs", "nfs4")


@functools.lru_cache(maxsize=None)
def cuda_driver_error() -> Optional[str]:
    """None if ``libcuda.so.1`` loads, else why not.

    KvikIO loads the driver library for every read or write, even of host
    memory in compat mode, so without it the KvikIO engine cannot run.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"libcuda.so.1 not loadable ({e})"
    return None


@functools.lru_cache(maxsize=None)
def kvikio_error() -> Optional[str]:
    """None if the KvikIO engine can run here, else the reason."""
    try:
        import kvikio  # noqa: F401
        import kvikio.defaults  # noqa: F401
    except ImportError as e:
        return f"kvikio is not installed ({e}); pip install 'gds_kvcache[cu13]'"
    return cuda_driver_error()


def kvikio_path() -> str:
    """``gds`` when KvikIO will hand device I/O to cuFile, ``kvikio-compat`` otherwise (process-wide).

    Reads KvikIO's resolved compat mode; never sets it (setting OFF without
    nvidia-fs hangs or fails). This is only KvikIO's process-wide choice:
    a file can still fall back on its own, cuFile can run its own compat
    mode, and host memory never takes the cuFile path. ``KvikIOEngine.report()``
    says what really runs per file.
    """
    import kvikio.defaults

    return "kvikio-compat" if kvikio.defaults.is_compat_mode_preferred() else "gds"


def nvidia_fs_loaded() -> bool:
    """Whether the nvidia-fs kernel module is loaded (without it cuFile never DMAs)."""
    return os.path.exists("/sys/module/nvidia_fs") or os.path.exists("/proc/driver/nvidia-fs")


def fs_type(path: str) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts), or ``?``."""
    target = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def cufile_driver_state() -> dict:
    """What cuFile's driver says about itself, read only where that cannot hang.

    Returns ``{"nvidia_fs": bool, "is_gds_available": bool | None,
    "allow_compat_mode": bool | None, "why": str}``. The driver properties
    are read only when nvidia-fs is loaded and KvikIO is not in compat mode
    (then KvikIO opens the driver itself on the first file anyway); reading
    them elsewhere would open the driver, which hangs on machines without
    nvidia-fs. ``None`` means not read.
    """
    out = {"nvidia_fs": nvidia_fs_loaded(), "is_gds_available": None, "allow_compat_mode": None, "why": ""}
    if not out["nvidia_fs"]:
        out["why"] = "nvidia-fs not loaded: cuFile cannot DMA (it runs its own POSIX compat mode, or refuses)"
        return out
    if kvikio_error() is not None:
        out["why"] = "KvikIO cannot run here"
        return out
    import kvikio.defaults

    if kvikio.defaults.is_compat_mode_preferred():
        out["why"] = "KvikIO is in compat mode: cuFile is never called"
        return out
    try:
        import kvikio.cufile_driver as cd

        out["is_gds_available"] = bool(cd.get("is_gds_available"))
        out["allow_compat_mode"] = bool(cd.get("allow_compat_mode"))
    except Exception as e:  # noqa: BLE001 - a report, never a failure
        out["why"] = f"cuFile driver properties unreadable ({type(e).__name__}: {e})"
        return out
    out["why"] = "nvidia-fs loaded, cuFile reports GDS available" if out["is_gds_available"] else (
        "cuFile reports GDS unavailable (nvfs version 0): it runs its own POSIX compat mode")
    return out
