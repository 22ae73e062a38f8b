"""``info``: what runs here, and why. Like NVIDIA's gdscheck, for this library.

Reports the GPU and driver, KvikIO and libcufile versions, whether GPUDirect
Storage can run and if not why (no nvidia-fs, no /run/udev, the file
system, O_DIRECT refused), and which engine and path a cache in the given
directory would use. It never opens the cuFile driver and never sets
KvikIO's compat mode, so it cannot hang on a machine without nvidia-fs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile

from ..config import CacheEngineConfig
from ..io.driver import cuda_driver_error, kvikio_error
from ..io.posix_engine import probe_direct_io
from ..io.select import choose_engine
from .storage import _fs_type

__all__ = ["collect", "main"]


def _driver_version():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"{v.value // 1000}.{v.value % 1000 // 10}"
    except OSError:
        pass
    return None


def _gpu():
    try:
        import torch

        if torch.cuda.is_available():
            return [f"{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    except Exception as e:  # noqa: BLE001 - report, never fail
        return [f"torch.cuda error: {e}"]
    return []


def _kvikio():
    err = kvikio_error()
    out = {"usable": err is None, "why_not": err}
    try:
        import kvikio
        import kvikio.defaults

        out["version"] = kvikio.__version__
        mode = kvikio.defaults.get("compat_mode")
        out["compat_mode_setting"] = {0: "OFF", 1: "ON", 2: "AUTO"}.get(int(mode), str(mode))
        out["env_KVIKIO_COMPAT_MODE"] = os.environ.get("KVIKIO_COMPAT_MODE", "(unset: AUTO)")
        out["threads_default"] = kvikio.defaults.get("num_threads")
        out["task_size_default"] = kvikio.defaults.get("task_size")
        if err is None:
            out["compat_mode_preferred"] = bool(kvikio.defaults.is_compat_mode_preferred())
        try:
            import kvikio.cufile_driver as cd

            v = getattr(cd, "libcufile_version", None)
            out["libcufile_version"] = v() if callable(v) else None
        except Exception as e:  # noqa: BLE001
            out["libcufile_version"] = f"unknown ({e})"
    except ImportError as e:
        out["version"] = None
        out["import_error"] = str(e)
    return out


def _gds_blockers(directory: str) -> list[str]:
    why = []
    if not os.path.exists("/sys/module/nvidia_fs") and not os.path.exists("/proc/driver/nvidia-fs"):
        why.append("nvidia-fs kernel module not loaded (/sys/module/nvidia_fs missing)")
    if not os.path.isdir("/run/udev"):
        why.append("/run/udev missing (cuFile cannot identify block devices)")
    fs = _fs_type(directory)
    if fs not in ("ext4", "xfs", "lustre", "beegfs", "wekafs", "gpfs", "nfs", "nfs4"):
        why.append(f"file system {fs!r} is not one GDS supports (ext4/xfs on NVMe, or a parallel FS)")
    if cuda_driver_error():
        why.append(cuda_driver_error())
    return why


def _kernel_launch() -> str:
    """How pack/unpack kernels launch on a GPU here (see ``kernels.launch``)."""
    try:
        from ..kernels.launch import prepared_launch_available

        fast = prepared_launch_available()
    except Exception as e:  # a broken numba-cuda install should not stop the report
        return f"unknown ({type(e).__name__}: {e})"
    return "prepared (raw arguments to cuda.core)" if fast else "numba-launch (Numba's per-call launch)"


def collect(directory: str | None = None, config: CacheEngineConfig | None = None) -> dict:
    config = config or CacheEngineConfig()
    directory = os.path.abspath(directory or tempfile.gettempdir())
    probe_dir = tempfile.mkdtemp(prefix=".gds_kvcache-info-", dir=directory)
    try:
        p = os.path.join(probe_dir, "probe")
        with open(p, "wb") as f:
            f.truncate(1 << 16)
        fd, reason = probe_direct_io(p)
        if fd is not None:
            os.close(fd)
    finally:
        for name in os.listdir(probe_dir):
            os.unlink(os.path.join(probe_dir, name))
        os.rmdir(probe_dir)
    kv = _kvikio()
    engine, why = choose_engine(config.io_engine) if config.io_engine != "kvikio" or kv["usable"] else (
        "none", f"io_engine='kvikio' but {kv['why_not']}")
    blockers = _gds_blockers(directory)
    if engine == "kvikio":
        path = "gds" if not kv.get("compat_mode_preferred", True) else "kvikio-compat"
    else:
        path = engine
    return {
        "directory": directory, "file_system": _fs_type(directory),
        "o_direct": "yes" if fd is not None else f"no ({reason})",
        "gpus": _gpu(), "cuda_driver": _driver_version() or cuda_driver_error(),
        "kvikio": kv, "gds_available": not blockers and path == "gds", "gds_blockers": blockers,
        "engine": engine, "engine_reason": why, "io_path": path,
        "io_threads": config.io_threads, "io_task_size": config.io_task_size, "direct_io": config.direct_io,
        "pool_files": config.pool_files, "kernel_launch": _kernel_launch(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gds-kvcache info", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="the cache directory to check (default: the temp directory)")
    ap.add_argument("--config", default=None, help="a YAML config file (default: the defaults + GDS_KVCACHE_* env)")
    ap.add_argument("--json", default=None, help="also write the report here")
    a = ap.parse_args(argv)
    cfg = CacheEngineConfig.from_file(a.config) if a.config else CacheEngineConfig.from_env()
    r = collect(a.dir, cfg)
    kv = r["kvikio"]
    lines = [
        ("directory", f"{r['directory']} ({r['file_system']}), O_DIRECT: {r['o_direct']}"),
        ("GPUs", ", ".join(r["gpus"]) or "none visible"),
        ("CUDA driver", r["cuda_driver"] or "?"),
        ("KvikIO", f"{kv.get('version')} (usable: {kv['usable']}"
                   + (f"; {kv['why_not']}" if kv["why_not"] else "") + ")"),
        ("libcufile", str(kv.get("libcufile_version"))),
        ("compat mode", f"setting {kv.get('compat_mode_setting')}, env {kv.get('env_KVIKIO_COMPAT_MODE')}, "
                        f"preferred: {kv.get('compat_mode_preferred')}"),
        ("GDS available", "yes" if r["gds_available"] else "no"),
    ]
    lines += [("  because", b) for b in r["gds_blockers"]]
    lines += [
        ("engine", f"{r['engine']} ({r['engine_reason']})"),
        ("I/O path", r["io_path"]),
        ("kernel launch", r["kernel_launch"] + ("" if r["gpus"] else "; no GPU: host kernels")),
        ("settings", f"io_threads={r['io_threads']} io_task_size={r['io_task_size'] >> 10} KiB "
                     f"direct_io={r['direct_io']} pool_files={r['pool_files']}"),
    ]
    w = max(len(k) for k, _ in lines)
    print("gds_kvcache info")
    for k, v in lines:
        print(f"  {k.ljust(w)}  {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
