"""Pick the I/O engine for a file: KvikIO where the CUDA driver loads, POSIX otherwise."""

from __future__ import annotations

import logging

from ..config import CacheEngineConfig
from ..errors import IOEngineError
from .base import IOEngine
from .driver import kvikio_error
from .kvikio_engine import KvikIOEngine
from .posix_engine import PosixEngine

__all__ = ["open_engine", "choose_engine"]

log = logging.getLogger(__name__)


def choose_engine(requested: str) -> tuple[str, str]:
    """(engine name, why) for ``io_engine`` = auto | kvikio | posix."""
    if requested == "posix":
        return "posix", "requested in config"
    err = kvikio_error()
    if requested == "kvikio":
        if err is not None:
            raise IOEngineError(f"io_engine='kvikio' but KvikIO cannot run here: {err}")
        return "kvikio", "requested in config"
    if err is not None:
        return "posix", f"KvikIO unavailable: {err}"
    return "kvikio", "auto: KvikIO and the CUDA driver are available"


def open_engine(paths, config: CacheEngineConfig, memory: str, stripe_bytes: int | None = None) -> IOEngine:
    """The engine ``config.io_engine`` asks for, over ``paths`` (one file or the stripes of a pool)."""
    name, why = choose_engine(config.io_engine)
    cls = KvikIOEngine if name == "kvikio" else PosixEngine
    log.info("I/O engine %s (%s)", name, why)
    return cls(paths, config.io_threads, config.io_task_size, config.direct_io, memory, stripe_bytes)
