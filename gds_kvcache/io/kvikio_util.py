"""KvikIO helpers of the KvikIO engine: errors, settings, device pointers, and host I/O for staged pieces."""

from __future__ import annotations

import errno
import os

from ..errors import IOEngineError
from ..units import PAGE
from .staging import FileIO

__all__ = ["DevicePtr", "KvikIOHostIO", "configure_kvikio", "kvikio_exception", "kvikio_monitor",
           "o_direct_opens"]


# strerror text -> errno, longest first: KvikIO reports a failed pwrite as a RuntimeError
# whose message ends in the strerror text ("... POSIX error on pwrite: No space left on device").
_ERRNO_BY_TEXT = sorted(((os.strerror(c), c) for c in errno.errorcode
                         if c and not os.strerror(c).startswith("Unknown error")),
                        key=lambda t: -len(t[0]))


def kvikio_exception(e: BaseException, what: str) -> BaseException:
    """The exception a caller sees for a failed KvikIO/cuFile call: never a bare ``RuntimeError``.

    The errno named by the message's strerror text is kept (``IOEngineError`` is
    an ``OSError``), so a full disk reads as ENOSPC/EDQUOT from either engine.
    An end-of-file is a short read (the pool file is truncated).
    """
    if isinstance(e, IOEngineError):
        return e
    if isinstance(e, OSError) and e.errno:
        return IOEngineError(e.errno, f"{what}: {e.strerror}")
    msg = str(e).strip()
    if msg.endswith("EOF") or "end of file" in msg.lower():
        return IOEngineError(f"short read: {what} runs past the end of the pool file ({msg})")
    tail = msg.rsplit(": ", 1)[-1]
    for text, code in _ERRNO_BY_TEXT:
        if tail == text or text in msg:
            return IOEngineError(code, f"{what}: {text} ({msg})")
    return IOEngineError(f"{what}: {type(e).__name__}: {msg}")


def configure_kvikio(threads: int, task_size: int, direct_io: bool) -> None:
    """Set KvikIO's process-wide thread pool, task size, direct-I/O flags and GDS threshold.

    Notes
    -----
    KvikIO's defaults (1 thread) leave most NVMe bandwidth unused. The pool is
    process-wide, so the last engine configured wins; the values are only
    written when they differ, since resizing the pool restarts it. The GDS
    threshold drops to one page: KvikIO runs device I/O below the threshold
    synchronously in the calling thread, which would serialise a batch of
    small spans.
    """
    import kvikio.defaults

    want = {"num_threads": threads, "task_size": task_size, "gds_threshold": PAGE,
            "auto_direct_io_read": direct_io, "auto_direct_io_write": direct_io}
    changed = {k: v for k, v in want.items() if kvikio.defaults.get(k) != v}
    if changed:
        kvikio.defaults.set(changed)


class DevicePtr:
    """The least KvikIO needs to address device bytes: a ``__cuda_array_interface__`` and nothing else.

    Cheaper per span than slicing a tensor and building its interface.
    """

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 3}


def o_direct_opens(path: str) -> bool:
    """Whether ``path`` opens with O_DIRECT: where not, KvikIO runs the file in compat mode."""
    # O_RDONLY: O_DIRECT support is the file system's, whatever the access mode, and the probe must
    # not open a read-only engine's files (another process's pool) for writing.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return True


def kvikio_monitor():
    """A KvikIO statistics monitor (per-backend byte counters), where this KvikIO has one."""
    import kvikio

    cls = getattr(kvikio, "SummaryMonitor", None)
    return cls() if cls is not None else None


class KvikIOHostIO(FileIO):
    """Staged pieces through KvikIO's host-memory ``pread``/``pwrite``: each a future on KvikIO's thread pool.

    One Python thread keeps many pieces in flight this way (``staging``'s
    async mode) while KvikIO's C++ threads do the syscalls without the GIL.

    Parameters
    ----------
    files, paths
        The engine's ``kvikio.CuFile`` handles and their paths (for messages).
    task
        KvikIO task size (a piece is never larger, so one piece is one task).
    direct
        Per file: whether KvikIO takes O_DIRECT for aligned host I/O.
    """

    __slots__ = ("_files", "_paths", "_task", "_direct")

    def __init__(self, files, paths, task: int, direct):
        self._files, self._paths, self._task, self._direct = files, paths, task, direct

    def start(self, write, piece, view):
        f = self._files[piece[2]]
        try:
            fut = (f.pwrite if write else f.pread)(view, piece[4], piece[3], self._task)
        except Exception as e:  # noqa: BLE001 - one piece's failure is its span's result
            fut = e
        return write, piece, fut

    def done(self, handle) -> bool:
        fut = handle[2]
        return isinstance(fut, BaseException) or fut.done()

    def finish(self, handle) -> bool:
        write, piece, fut = handle
        _, _, fi, off, n = piece
        what = f"{'pwrite' if write else 'pread'} of {n} bytes at {off} of {self._paths[fi]}"
        if isinstance(fut, BaseException):
            raise kvikio_exception(fut, what)
        try:
            got = fut.get()
        except Exception as e:  # noqa: BLE001
            raise kvikio_exception(e, what) from e
        if got != n:
            raise IOEngineError(f"{what} moved {got} bytes")
        return self._direct[fi] and (off | n) % PAGE == 0
