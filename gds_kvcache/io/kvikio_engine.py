"""KvikIO engine: ``kvikio.CuFile`` on one handle, GDS where available, compat mode otherwise."""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import IOEngineError
from ..memory.obj import MemoryObj
from .base import IOEngine, IOPathReport
from .driver import kvikio_error, kvikio_path

__all__ = ["KvikIOEngine", "configure_kvikio"]

log = logging.getLogger(__name__)


def configure_kvikio(threads: int, task_size: int, direct_io: bool) -> None:
    """Set KvikIO's process-wide thread pool, task size and direct-I/O flags.

    Notes
    -----
    KvikIO's defaults (1 thread) leave most NVMe bandwidth unused. The pool is
    process-wide, so the last engine configured wins; the values are only
    written when they differ, since resizing the pool restarts it.
    """
    import kvikio.defaults

    want = {"num_threads": threads, "task_size": task_size,
            "auto_direct_io_read": direct_io, "auto_direct_io_write": direct_io}
    changed = {k: v for k, v in want.items() if kvikio.defaults.get(k) != v}
    if changed:
        kvikio.defaults.set(changed)


class KvikIOEngine(IOEngine):
    """Parallel reads/writes through one ``kvikio.CuFile`` opened once.

    Notes
    -----
    On a GDS node with a registered CUDA slab, 4 KiB-aligned operations DMA
    between NVMe and GPU memory with no host copy. Without nvidia-fs KvikIO
    runs in compat mode: POSIX I/O through its own pinned bounce buffers.
    ``report().path`` says which.
    """

    name = "kvikio"

    def __init__(self, paths, threads: int, task_size: int, direct_io: bool, memory: str = "host",
                 stripe_bytes: int | None = None):
        err = kvikio_error()
        if err is not None:
            raise IOEngineError(f"KvikIO engine cannot run here: {err}")
        import kvikio

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        configure_kvikio(threads, task_size, direct_io)
        self._files = [kvikio.CuFile(p, "r+") for p in paths]
        self._stripe = stripe_bytes or (1 << 62)
        self._task = task_size
        self._threads = threads
        self._memory = memory
        self._direct = direct_io and all(f.is_direct_io_supported() for f in self._files)
        self._reason = "ok" if self._direct else (
            "disabled in config" if not direct_io else "file system refuses O_DIRECT")
        self._path = kvikio_path()
        # KvikIO's IOFuture blocks in get(); these threads only wait on it.
        self._waiters = ThreadPoolExecutor(max(8, 2 * threads), thread_name_prefix="gds-kvcache-kvikio")
        self._closed = False
        log.info("KvikIO engine on %s: %s", paths[0], self.report().line())

    @staticmethod
    def _buffer(obj: MemoryObj):
        if obj.device.type == "cuda":
            return obj.raw_data
        arr = obj._alloc.buffer.host_array()
        return arr[obj.offset:obj.offset + obj.phys_size]

    @staticmethod
    def _wait(fut, nbytes: int, what: str) -> int:
        n = fut.get()
        if n != nbytes:
            raise IOEngineError(f"{what}: moved {n} of {nbytes} bytes")
        return n

    def _start(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int):
        if self._closed:
            raise IOEngineError("engine is closed")
        self._check(obj, nbytes, file_offset, self._stripe)
        i, local = divmod(file_offset, self._stripe)
        f = self._files[i]
        return (f.pwrite if write else f.pread)(self._buffer(obj), nbytes, local, self._task)

    def _submit(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int) -> Future:
        fut = self._start(write, obj, file_offset, nbytes)
        return self._waiters.submit(self._wait, fut, nbytes, "pwrite" if write else "pread")

    def _blocking(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int) -> int:
        # Waits in the caller's thread: no hand-off to a waiter thread per chunk.
        return self._wait(self._start(write, obj, file_offset, nbytes), nbytes, "pwrite" if write else "pread")

    def report(self) -> IOPathReport:
        return IOPathReport("kvikio", self._path, self._direct, self._reason, self._threads, self._task,
                            self._memory, len(self._files))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._waiters.shutdown(wait=True)
        for f in self._files:
            f.close()
