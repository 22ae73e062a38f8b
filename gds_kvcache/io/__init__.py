"""I/O engines: one interface, a KvikIO/cuFile implementation and a POSIX one."""

from .base import IOEngine, IOPathReport
from .driver import cuda_driver_error, kvikio_error, kvikio_path
from .kvikio_engine import KvikIOEngine, configure_kvikio
from .posix_engine import PosixEngine, probe_direct_io
from .select import choose_engine, open_engine

__all__ = [
    "IOEngine",
    "IOPathReport",
    "KvikIOEngine",
    "PosixEngine",
    "choose_engine",
    "configure_kvikio",
    "cuda_driver_error",
    "kvikio_error",
    "kvikio_path",
    "open_engine",
    "probe_direct_io",
]
