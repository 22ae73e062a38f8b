"""``info``: what runs here, and why. Like NVIDIA's gdscheck, for this library.

Reports the GPU and driver, KvikIO and libcufile versions, whether GPUDirect
Storage can run and if not why (no nvidia-fs, no /run/udev, the file
system, O_DIRECT refused), which engine and path a cache in the given
directory would use, the directory's file system and free space (warning
when the disk budget does not fit), and the machine-sized defaults. It
never opens the cuFile driver where nvidia-fs is missing and never sets
KvikIO's compat mode, so it cannot hang on a machine without nvidia-fs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile

from ..cli import ArgumentParser, existing_dir, writable_file
from ..config import CacheEngineConfig
from ..io.driver import (GDS_FILE_SYSTEMS, cuda_driver_error, cufile_driver_state, fs_type, kvikio_error,
                         nvidia_fs_loaded)
from ..io.posix_engine import probe_direct_io
from ..io.select import choose_engine
from ..units import GB

__all__ = ["collect", "main", "predict_path"]


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
        out["statistics"] = getattr(kvikio, "SummaryMonitor", None) is not None
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


def _gds_blockers(directory: str, fs: str) -> list[str]:
    why = []
    if not nvidia_fs_loaded():
        why.append("nvidia-fs kernel module not loaded (/sys/module/nvidia_fs missing)")
    if not os.path.isdir("/run/udev"):
        why.append("/run/udev missing (cuFile cannot identify block devices)")
    if fs not in GDS_FILE_SYSTEMS:
        why.append(f"file system {fs!r} is not one GDS supports (ext4/xfs on NVMe, or a parallel FS)")
    if cuda_driver_error():
        why.append(cuda_driver_error())
    return why


def predict_path(engine: str, memory: str, kv: dict, fs: str, o_direct: bool) -> tuple[str, str]:
    """(path, why) the given engine would take for a slab of ``memory`` in a directory on ``fs``.

    The same rules as ``KvikIOEngine.report()``, before any file is opened.
    """
    if engine == "mapped":
        return engine, "pool files memory-mapped on a RAM-backed file system"
    if engine != "kvikio":
        return engine, "this library's pread/pwrite thread pool"
    if kv.get("compat_mode_preferred", True):
        return "kvikio-compat", "KvikIO compat mode"
    if memory != "cuda":
        return "kvikio-posix", "host memory never takes cuFile"
    if not o_direct:
        return "kvikio-compat", "O_DIRECT refused here: KvikIO falls back to compat mode per file"
    if not nvidia_fs_loaded():
        return "cufile-compat", "nvidia-fs not loaded: cuFile runs its own POSIX compat mode"
    if fs not in GDS_FILE_SYSTEMS:
        return "cufile-compat", f"{fs} is not a GDS file system: cuFile runs its own compat mode"
    state = cufile_driver_state()
    if state["is_gds_available"] is False:
        return "cufile-compat", state["why"]
    return "gds", "cuFile DMA"


def _memory_kind(config: CacheEngineConfig, gpus: list) -> str:
    if config.memory_device != "auto":
        return config.memory_device
    return "cuda" if gpus and not gpus[0].startswith("torch.cuda error") else "host"


def _defaults(config: CacheEngineConfig) -> dict:
    """What the config's machine-sized defaults resolve to, where the config can say."""
    describe = getattr(config, "describe_defaults", None)
    if callable(describe):
        try:
            got = describe()
            return dict(got) if isinstance(got, dict) else {"defaults": str(got)}
        except Exception as e:  # noqa: BLE001 - report, never fail
            return {"defaults": f"unknown ({type(e).__name__}: {e})"}
    nbytes = getattr(config, "slab_bytes", None)
    return {"slab_size": f"{nbytes / GB:.2f} GB"} if isinstance(nbytes, int) else {}


def collect(directory: str | None = None, config: CacheEngineConfig | None = None,
            disk_gb: float | None = None) -> dict:
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
    fs = fs_type(directory)
    vfs = os.statvfs(directory)
    free, total = vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize
    budget_gb = disk_gb if disk_gb is not None else (config.max_local_disk_size or None)
    budget = int(budget_gb * GB) if budget_gb else None
    warnings = []
    if budget is not None and budget > free:
        warnings.append(f"the disk budget ({budget / GB:.2f} GB) exceeds the free space of {directory} "
                        f"({free / GB:.2f} GB): puts will meet ENOSPC and evict early")
    kv = _kvikio()
    gpus = _gpu()
    if config.io_engine == "kvikio" and not kv["usable"]:
        engine, why = "none", f"io_engine='kvikio' but {kv['why_not']}"
    else:
        try:
            engine, why = choose_engine(config.io_engine, directory)
        except TypeError:  # an older choose_engine without the directory argument
            engine, why = choose_engine(config.io_engine)
        except Exception as e:  # noqa: BLE001 - e.g. io_engine='mapped' on a disk: say so, do not fail
            engine, why = "none", str(e)
    memory = _memory_kind(config, gpus)
    path, path_why = predict_path(engine, memory, kv, fs, fd is not None)
    blockers = _gds_blockers(directory, fs)
    return {
        "directory": directory, "file_system": fs, "free_bytes": free, "total_bytes": total,
        "disk_budget_bytes": budget, "warnings": warnings,
        "o_direct": "yes" if fd is not None else f"no ({reason})",
        "gpus": gpus, "cuda_driver": _driver_version() or cuda_driver_error(),
        "kvikio": kv, "gds_available": not blockers and path == "gds", "gds_blockers": blockers,
        "engine": engine, "engine_reason": why, "memory": memory, "io_path": path, "io_path_reason": path_why,
        "io_threads": config.io_threads, "io_task_size": config.io_task_size, "direct_io": config.direct_io,
        "pool_files": config.pool_files, "defaults": _defaults(config), "kernel_launch": _kernel_launch(),
    }


def _kernel_launch() -> str:
    """How pack/unpack kernels launch on a GPU here (see ``kernels.launch``)."""
    try:
        from ..kernels.launch import prepared_launch_available

        fast = prepared_launch_available()
    except Exception as e:  # a broken numba-cuda install should not stop the report
        return f"unknown ({type(e).__name__}: {e})"
    return "prepared (raw arguments to cuda.core)" if fast else "numba-launch (Numba's per-call launch)"


def _positive_gb(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GB") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be a positive number of GB")
    return v


def main(argv=None) -> int:
    ap = ArgumentParser(prog="gds-kvcache info", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=existing_dir, default=None,
                    help="the cache directory to check (default: the temp directory)")
    ap.add_argument("--config", default=None, help="a YAML config file (default: the defaults + GDS_KVCACHE_* env)")
    ap.add_argument("--disk-gb", type=_positive_gb, default=None,
                    help="disk budget to check against the free space (default: the config's max_local_disk_size)")
    ap.add_argument("--json", type=writable_file, default=None, help="also write the report here")
    a = ap.parse_args(argv)
    cfg = CacheEngineConfig.from_file(a.config) if a.config else CacheEngineConfig.from_env()
    r = collect(a.dir, cfg, a.disk_gb)
    kv = r["kvikio"]
    budget = r["disk_budget_bytes"]
    lines = [
        ("directory", f"{r['directory']} ({r['file_system']}), O_DIRECT: {r['o_direct']}"),
        ("free space", f"{r['free_bytes'] / GB:.2f} GB of {r['total_bytes'] / GB:.2f} GB"
                       + (f"; disk budget {budget / GB:.2f} GB" if budget else "")),
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
        ("I/O path", f"{r['io_path']} for a {r['memory']} slab ({r['io_path_reason']})"),
        ("kernel launch", r["kernel_launch"] + ("" if r["gpus"] else "; no GPU: host kernels")),
        ("settings", f"io_threads={r['io_threads']} io_task_size={r['io_task_size'] >> 10} KiB "
                     f"direct_io={r['direct_io']} pool_files={r['pool_files']}"),
    ]
    lines += [(f"default {k}", v) for k, v in r["defaults"].items()]
    lines += [("WARNING", w) for w in r["warnings"]]
    w = max(len(k) for k, _ in lines)
    print("gds_kvcache info")
    for k, v in lines:
        print(f"  {k.ljust(w)}  {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
