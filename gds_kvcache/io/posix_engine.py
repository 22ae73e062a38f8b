"""POSIX engine: ``os.preadv``/``os.pwritev`` from a thread pool, O_DIRECT where allowed.

Runs everywhere, with no CUDA driver. GPU memory is staged through
per-thread pinned buffers, one task at a time, so copies to and from the
GPU overlap with file I/O of other tasks.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

from ..errors import IOEngineError
from ..memory.buffers import SlabBuffer
from ..memory.obj import MemoryObj
from ..units import PAGE
from .base import IOEngine, IOPathReport, gather

__all__ = ["PosixEngine", "probe_direct_io"]

log = logging.getLogger(__name__)


def probe_direct_io(path: str) -> tuple[int | None, str]:
    """Open ``path`` with O_DIRECT and read one aligned page; return (fd, reason).

    Some file systems (tmpfs) refuse O_DIRECT at open, others only at the
    first I/O, so both are tried. The file must be at least one page long.
    """
    if not hasattr(os, "O_DIRECT"):
        return None, "O_DIRECT not defined on this platform"
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        return None, f"O_DIRECT open refused: {e.strerror}"
    probe = SlabBuffer(PAGE, "host")
    try:
        os.preadv(fd, [memoryview(probe.host_array())], 0)
    except OSError as e:
        os.close(fd)
        return None, f"O_DIRECT read refused: {e.strerror}"
    return fd, "ok"


class PosixEngine(IOEngine):
    """Parallel pread/pwrite over one or more files (stripes of one pool).

    Parameters
    ----------
    paths
        Existing files, each at least one page long; a path or a list.
    stripe_bytes
        Bytes per file: logical offset ``o`` is byte ``o % stripe_bytes`` of
        file ``o // stripe_bytes``. None for a single file.
    threads
        Worker threads.
    task_size
        Bytes per task; large operations are split into tasks run in parallel.
    direct_io
        Try O_DIRECT for aligned tasks.
    """

    name = "posix"

    def __init__(self, paths, threads: int, task_size: int, direct_io: bool, memory: str = "host",
                 stripe_bytes: int | None = None):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._stripe = stripe_bytes or (1 << 62)
        self._fds = [os.open(p, os.O_RDWR) for p in paths]
        self._dfds: list = []
        reason = "disabled in config"
        if direct_io:
            for p in paths:
                dfd, reason = probe_direct_io(p)
                if dfd is None:
                    log.warning("O_DIRECT unavailable for %s (%s); using buffered I/O", p, reason)
                    for fd in self._dfds:
                        os.close(fd)
                    self._dfds = []
                    break
                self._dfds.append(dfd)
        self._direct = bool(self._dfds)
        self._reason = "ok" if self._direct else reason
        self._task = task_size
        self._threads = threads
        self._memory = memory
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="gds-kvcache-posix")
        self._local = threading.local()
        self._closed = False

    # -- per-thread GPU staging -----------------------------------------------
    def _staging(self):
        st = getattr(self._local, "staging", None)
        if st is None:
            import torch

            st = (SlabBuffer(self._task, "pinned"), torch.cuda.Stream())
            self._local.staging = st
        return st

    def _fd_for(self, addr: int, off: int, n: int) -> tuple[int, int]:
        """(descriptor, offset in that file) for logical ``off``."""
        i, local = divmod(off, self._stripe)
        if self._direct and addr % PAGE == 0 and off % PAGE == 0 and n % PAGE == 0:
            return self._dfds[i], local
        return self._fds[i], local

    @staticmethod
    def _full(op, fd: int, mv: memoryview, off: int, what: str) -> int:
        done = 0
        while done < len(mv):
            n = op(fd, [mv[done:]], off + done)
            if n <= 0:
                raise IOEngineError(f"{what} at offset {off + done}: {'end of file' if n == 0 else n}")
            done += n
        return done

    def _host_task(self, write: bool, obj: MemoryObj, lo: int, n: int, file_off: int) -> int:
        arr = obj._alloc.buffer.host_array()
        start = obj.offset + lo
        mv = memoryview(arr[start:start + n])
        fd, local = self._fd_for(arr.ctypes.data + start, file_off, n)
        return self._full(os.pwritev if write else os.preadv, fd, mv, local, "pwrite" if write else "pread")

    def _cuda_task(self, write: bool, obj: MemoryObj, lo: int, n: int, file_off: int) -> int:
        import torch

        buf, stream = self._staging()
        host = buf.tensor[:n]
        gpu = obj.raw_data[lo:lo + n]
        mv = memoryview(buf.host_array()[:n])
        fd, local = self._fd_for(buf.tensor.data_ptr(), file_off, n)
        with torch.cuda.stream(stream):
            if write:
                host.copy_(gpu, non_blocking=True)
                stream.synchronize()
                return self._full(os.pwritev, fd, mv, local, "pwrite")
            self._full(os.preadv, fd, mv, local, "pread")
            gpu.copy_(host, non_blocking=True)
            stream.synchronize()
        return n

    def _submit(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int) -> Future:
        if self._closed:
            raise IOEngineError("engine is closed")
        self._check(obj, nbytes, file_offset, self._stripe)
        task = self._cuda_task if obj.device.type == "cuda" else self._host_task
        parts = [self._pool.submit(task, write, obj, lo, min(self._task, nbytes - lo), file_offset + lo)
                 for lo in range(0, nbytes, self._task)]
        return gather(parts, nbytes, "write" if write else "read")

    def _blocking(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int) -> int:
        # The first task runs in the caller's thread, the rest in the pool: a
        # chunk of one task needs no hand-off at all.
        if self._closed:
            raise IOEngineError("engine is closed")
        self._check(obj, nbytes, file_offset, self._stripe)
        task = self._cuda_task if obj.device.type == "cuda" else self._host_task
        rest = [self._pool.submit(task, write, obj, lo, min(self._task, nbytes - lo), file_offset + lo)
                for lo in range(self._task, nbytes, self._task)]
        try:
            done = task(write, obj, 0, min(self._task, nbytes), file_offset)
        finally:
            # Never return (or raise) while a pool task may still touch obj.
            wait(rest)
        done += sum(f.result() for f in rest)
        if done != nbytes:
            raise IOEngineError(f"{'write' if write else 'read'}: moved {done} of {nbytes} bytes")
        return done

    def report(self) -> IOPathReport:
        return IOPathReport("posix", "posix", self._direct, self._reason, self._threads, self._task, self._memory,
                            len(self._fds))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        for fd in self._fds + self._dfds:
            os.close(fd)
