"""POSIX engine: ``os.preadv``/``os.pwritev`` pieces on a thread pool, O_DIRECT where allowed.

Runs everywhere, with no CUDA driver. GPU memory is staged through pinned
lanes (``staging``): each I/O thread takes a lane of two slots, so its disk
I/O of one piece overlaps the copy of the next to or from the GPU. The
lanes' pinned memory is allocated once, at ``attach``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from ..errors import ClosedError, IOEngineError
from ..memory.buffers import SlabBuffer
from ..units import PAGE
from .attachment import AttachPoint, Attachment
from .base import IOEngine, InFlight, IOPathReport, Span, check_span
from .cuda_lane import cuda_lane_pool
from .lane_pool import LanePool
from .staging import SyncFileIO, run_lane, wait_out

__all__ = ["PosixEngine", "probe_direct_io"]

log = logging.getLogger(__name__)


def probe_direct_io(path: str, read_only: bool = False) -> tuple[int | None, str]:
    """Open ``path`` with O_DIRECT and read one aligned page; return (fd, reason).

    Some file systems refuse O_DIRECT at open, others only at the first I/O,
    so both are tried. The file must be at least one page long. With
    ``read_only`` the descriptor is ``O_RDONLY``, else ``O_RDWR``.
    """
    if not hasattr(os, "O_DIRECT"):
        return None, "O_DIRECT not defined on this platform"
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_DIRECT)
    except OSError as e:
        return None, f"O_DIRECT open refused: {e.strerror}"
    probe = SlabBuffer(PAGE, "host")
    try:
        os.preadv(fd, [memoryview(probe.host_array())], 0)
    except OSError as e:
        os.close(fd)
        return None, f"O_DIRECT read refused: {e.strerror}"
    finally:
        probe.close()
    return fd, "ok"


class PosixEngine(IOEngine):
    """Parallel pread/pwrite over one or more files (stripes of one pool).

    Parameters
    ----------
    paths
        Existing files, each at least one page long; a path or a list.
    threads
        Worker threads (the calling thread works too).
    task_size
        Bytes per piece; spans larger than this are split and the pieces run
        on all threads at once.
    direct_io
        Try O_DIRECT for aligned pieces.
    memory
        The slab kind, for the report before ``attach``.
    stripe_bytes
        Bytes per file: logical offset ``o`` is byte ``o % stripe_bytes`` of
        file ``o // stripe_bytes``. None for a single file.
    read_only
        Open every file ``O_RDONLY`` (O_DIRECT too, where it applies) and
        refuse ``write_spans`` with an ``IOEngineError`` (EBADF); ``punch_ok``
        is then False.

    Notes
    -----
    Use ``read_only`` for files another process owns (shared mode): nothing
    here can then change them, and a file that shrinks under the reader
    gives short reads, each an ``IOEngineError`` of its span.

    A batch costs one hand-off per worker thread, not per span: the pieces of
    all spans go into one queue that ``min(threads, pieces)`` workers drain,
    the caller being one of them, so a batch of one small span never leaves
    the calling thread. For a GPU slab each worker takes one of ``threads``
    staging lanes (two pinned slots, a stream) for the batch, so a transfer
    runs at about the slower of disk and PCIe, not their sum; concurrent
    batches share the lanes. ``close()`` waits for the calls in progress.
    A staged put waits for the work queued on the CUDA default stream, a
    get does not (``staging``'s rule, the KvikIO engine's too).

    A batch runs on the slab and lanes attached when it started
    (``attachment``): ``attach`` to another slab meanwhile returns at once,
    and the old lanes go when the last batch on them ends.
    """

    name = "posix"
    #: Makes the staging lanes at ``attach``: ``(buffer, lanes, depth, slot_bytes)`` ->
    #: a ``LanePool``, or None where the slab needs no staging (host memory).
    lane_factory = staticmethod(cuda_lane_pool)
    piece_hooks = True

    def __init__(self, paths, threads: int, task_size: int, direct_io: bool, memory: str = "host",
                 stripe_bytes: int | None = None, read_only: bool = False):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._paths = [os.fspath(p) for p in paths]
        self._stripe = stripe_bytes or (1 << 62)
        self.read_only = read_only
        # Another process owns read-only files: punching holes in them would destroy its chunks.
        self.punch_ok = not read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        self._fds = []
        try:
            for p in self._paths:
                self._fds.append(os.open(p, flags))
        except OSError:
            for fd in self._fds:
                os.close(fd)
            raise
        self._dfds: list[Optional[int]] = [None] * len(self._paths)
        self._file_io = ["buffered (disabled in config)"] * len(self._paths)
        refused = []
        if direct_io:
            for i, p in enumerate(self._paths):
                self._dfds[i], why = probe_direct_io(p, read_only)
                if self._dfds[i] is None:
                    log.warning("O_DIRECT unavailable for %s (%s); buffered I/O for this file", p, why)
                    refused.append(why)
                self._file_io[i] = "O_DIRECT for aligned pieces" if self._dfds[i] is not None else f"buffered ({why})"
        self._direct = any(fd is not None for fd in self._dfds)
        self._reason = "disabled in config" if not direct_io else (
            refused[0] if refused else "ok")
        self._task = task_size
        self._threads = threads
        self._memory = memory
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="gds-kvcache-posix")
        self._attached = AttachPoint("posix")
        # Slots are page-aligned: a piece goes O_DIRECT when its offset and length are.
        self._io = SyncFileIO(lambda w, fi, off, view: self._move(w, fi, off, view, (off | len(view)) % PAGE == 0))
        self._lock = threading.Lock()
        self._moved = {"posix/O_DIRECT": 0, "posix/buffered": 0}
        self._calls = InFlight("posix")
        self._closed = False

    # -- setup ------------------------------------------------------------------------
    def attach(self, buffer: SlabBuffer) -> None:
        if self._closed:
            raise ClosedError("the posix I/O engine is closed")
        if buffer is self._buffer:
            return
        lanes = self.lane_factory(buffer, self._threads, 2, self._task)
        # Batches on the old slab keep it and its lanes until they end (see ``attachment``).
        self._attached.swap(Attachment(buffer, lanes=lanes))
        self._buffer = buffer
        self._memory = buffer.kind

    # -- one piece -------------------------------------------------------------------
    def _move(self, write: bool, fi: int, off: int, view: memoryview, aligned: bool) -> bool:
        """The whole of ``view`` to/from file ``fi`` at ``off``; whether O_DIRECT carried it."""
        dfd = self._dfds[fi]
        direct = aligned and dfd is not None
        fd = dfd if direct else self._fds[fi]
        op = os.pwritev if write else os.preadv
        n = len(view)
        try:
            done = op(fd, [view], off)
            while done < n:
                # A short transfer leaves an unaligned remainder: finish it buffered.
                got = op(self._fds[fi], [view[done:]], off + done)
                if got == 0:
                    what = "write wrote nothing" if write else "short read: the pool file ends"
                    raise IOEngineError(f"{what} at byte {off + done} of {self._paths[fi]}")
                done += got
        except IOEngineError:
            raise
        except OSError as e:
            raise IOEngineError(e.errno, f"{'pwrite' if write else 'pread'} of {n} bytes at {off} of "
                                         f"{self._paths[fi]}: {e.strerror}") from e
        return direct

    # -- workers: each drains the shared piece queue ----------------------------------
    def _host_worker(self, write: bool, buffer: SlabBuffer, pieces, errs: list, hook=None) -> list[int]:
        mv = memoryview(buffer.host_array())
        moved = [0, 0]  # O_DIRECT, buffered
        for i, mo, fi, off, n in pieces:
            if errs[i] is not None:
                continue
            if write and hook is not None:
                hook(mo, n)
            try:
                direct = self._move(write, fi, off, mv[mo:mo + n], (mo | off | n) % PAGE == 0)
            except IOEngineError as e:
                errs[i] = e
                continue
            if not write and hook is not None:
                hook(mo, n)
            moved[0 if direct else 1] += n
        return moved

    def _staged_worker(self, write: bool, buffer: SlabBuffer, pieces, errs: list, lanes: LanePool) -> list[int]:
        lane = lanes.acquire()  # blocks while other batches hold every lane
        try:
            return run_lane(lane, write, buffer, pieces, self._io, errs)
        finally:
            lanes.release(lane)

    # -- batches ---------------------------------------------------------------------
    def _transfer(self, write: bool, spans: Sequence[Span], hook=None) -> list[Optional[BaseException]]:
        with self._calls:
            att = self._attached.hold()
            try:
                return self._batch(write, spans, att.buffer, att.lanes, hook)
            finally:
                att.release()

    def _batch(self, write: bool, spans: Sequence[Span], buffer: SlabBuffer, lanes: Optional[LanePool],
               hook=None) -> list[Optional[BaseException]]:
        errs: list[Optional[BaseException]] = [None] * len(spans)
        pieces = []
        task, stripe, nfiles, size = self._task, self._stripe, len(self._fds), buffer.nbytes
        for i, s in enumerate(spans):
            err = check_span(s, size, stripe, nfiles)
            if err is not None:
                errs[i] = err
                continue
            fi, local = divmod(s.file_offset, stripe)
            if s.nbytes <= task:
                pieces.append((i, s.mem_offset, fi, local, s.nbytes))
                continue
            for lo in range(0, s.nbytes, task):
                pieces.append((i, s.mem_offset + lo, fi, local + lo, min(task, s.nbytes - lo)))
        if not pieces:
            return errs
        # A GPU slab is checksummed on the GPU, one launch a batch: the hook is for host slabs.
        worker = (functools.partial(self._staged_worker, lanes=lanes) if lanes is not None
                  else functools.partial(self._host_worker, hook=hook))
        # One queue shared by all workers (list_iterator.__next__ is atomic under the GIL).
        queue = iter(pieces)
        helpers = [self._pool.submit(worker, write, buffer, queue, errs)
                   for _ in range(min(self._threads, len(pieces)) - 1)]
        try:
            results = [worker(write, buffer, queue, errs)]
        finally:
            # Never return while a helper may still touch the slab or a lane, even when interrupted.
            wait_out(helpers, lambda f: f.result(), lambda f: f.done())
        results += [f.result() for f in helpers]
        with self._lock:
            self._moved["posix/O_DIRECT"] += sum(r[0] for r in results)
            self._moved["posix/buffered"] += sum(r[1] for r in results)
        return errs

    def read_spans(self, spans: Sequence[Span], hook=None) -> list[Optional[BaseException]]:
        return self._transfer(False, spans, hook)

    def write_spans(self, spans: Sequence[Span], hook=None) -> list[Optional[BaseException]]:
        if self.read_only and not self._closed:
            raise IOEngineError(errno.EBADF, f"the posix I/O engine over {self._paths[0]} is read-only: "
                                             f"it was opened with read_only=True and never writes")
        return self._transfer(True, spans, hook)

    def report(self) -> IOPathReport:
        with self._lock:
            moved = dict(self._moved)
        att = self._attached.current
        lanes = att.lanes if att is not None else None
        return IOPathReport("posix", "posix", self._direct, self._reason, self._threads, self._task, self._memory,
                            len(self._fds), file_paths=("posix",) * len(self._fds),
                            file_reasons=tuple(self._file_io), bytes_by_path=moved,
                            staging=f"pipelined: {lanes.describe}" if lanes is not None else "")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_submitter()
        self._calls.close()  # transfers in progress end before their files and lanes go
        self._pool.shutdown(wait=True)
        self._attached.close()
        for fd in self._fds + [fd for fd in self._dfds if fd is not None]:
            os.close(fd)
        self._buffer = None
