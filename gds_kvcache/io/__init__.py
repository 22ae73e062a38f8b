"""I/O engines: one batched span interface; KvikIO/cuFile, POSIX and mapped-memory implementations."""

from .base import PATHS, IOEngine, IOPathReport, Span, check_span
from .driver import (GDS_FILE_SYSTEMS, cuda_driver_error, cufile_driver_state, fs_type, kvikio_error,
                     kvikio_path, nvidia_fs_loaded)
from .kvikio_engine import KvikIOEngine, configure_kvikio, kvikio_exception
from .posix_engine import PosixEngine, probe_direct_io
from .select import choose_engine, open_engine

__all__ = [
    "GDS_FILE_SYSTEMS",
    "IOEngine",
    "IOPathReport",
    "KvikIOEngine",
    "PATHS",
    "PosixEngine",
    "Span",
    "check_span",
    "choose_engine",
    "configure_kvikio",
    "cuda_driver_error",
    "cufile_driver_state",
    "fs_type",
    "kvikio_error",
    "kvikio_exception",
    "kvikio_path",
    "nvidia_fs_loaded",
    "open_engine",
    "probe_direct_io",
]
