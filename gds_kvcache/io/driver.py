"""Can KvikIO run here? Probes that never hang and never open the cuFile driver."""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

__all__ = ["cuda_driver_error", "kvikio_error", "kvikio_path"]


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
    """``gds`` when KvikIO will DMA through cuFile, ``kvikio-compat`` otherwise.

    Reads KvikIO's resolved compat mode; never sets it (setting OFF without
    nvidia-fs hangs or fails).
    """
    import kvikio.defaults

    return "kvikio-compat" if kvikio.defaults.is_compat_mode_preferred() else "gds"
