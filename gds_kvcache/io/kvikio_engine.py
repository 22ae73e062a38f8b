"""KvikIO engine: ``kvikio.CuFile`` handles opened once, GDS where it really runs, compat mode otherwise."""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Optional, Sequence

from ..errors import ClosedError, IOEngineError
from ..memory.buffers import SlabBuffer
from ..units import PAGE
from .base import IOEngine, IOPathReport, Span, check_span
from .driver import GDS_FILE_SYSTEMS, cufile_driver_state, fs_type, kvikio_error, nvidia_fs_loaded

__all__ = ["KvikIOEngine", "configure_kvikio", "kvikio_exception", "o_direct_opens"]

log = logging.getLogger(__name__)

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


class _DevicePtr:
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


def _monitor():
    """A KvikIO statistics monitor (per-backend byte counters), where this KvikIO has one."""
    import kvikio

    cls = getattr(kvikio, "SummaryMonitor", None)
    return cls() if cls is not None else None


class KvikIOEngine(IOEngine):
    """Batches of spans through ``kvikio.CuFile`` handles (one per stripe file) opened once.

    Parameters are those of ``PosixEngine``; ``read_only`` opens every file
    with ``CuFile(path, "r")`` (``O_RDONLY``; KvikIO adds its O_DIRECT
    descriptor as it would read-write) and refuses ``write_spans`` with an
    ``IOEngineError`` (EBADF).

    Notes
    -----
    Which path a span takes depends on three things, and ``report()`` says
    which ran, per file and in bytes moved:

    * host or pinned slab: always KvikIO's POSIX path (``kvikio-posix``; or
      ``kvikio-compat`` when KvikIO is in compat mode);
    * CUDA slab, KvikIO in compat mode, or a file KvikIO could not open with
      O_DIRECT or whose cuFile handle was refused: ``kvikio-compat`` (bounce
      buffers);
    * otherwise cuFile: ``gds`` with nvidia-fs loaded on a supported file
      system, else ``cufile-compat`` (cuFile's own POSIX fallback).

    The CUDA slab is registered with cuFile on ``attach`` only when a file
    takes the ``gds`` path; a refusal leaves it working unregistered. On the
    cuFile path KvikIO waits for the CUDA default stream before each read or
    write: keep model kernels off the default stream (see
    ``scripts/default_stream_probe.py``).
    """

    name = "kvikio"

    def __init__(self, paths, threads: int, task_size: int, direct_io: bool, memory: str = "host",
                 stripe_bytes: int | None = None, read_only: bool = False):
        err = kvikio_error()
        if err is not None:
            raise IOEngineError(f"KvikIO engine cannot run here: {err}")
        import kvikio
        import kvikio.defaults

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._paths = [os.fspath(p) for p in paths]
        self.read_only = read_only
        # Another process owns read-only files: punching holes in them would destroy its chunks.
        self.punch_ok = not read_only
        configure_kvikio(threads, task_size, direct_io)
        self._compat = bool(kvikio.defaults.is_compat_mode_preferred())
        self._threshold = int(kvikio.defaults.get("gds_threshold"))
        self._monitor = _monitor()
        self._files = []
        try:
            for p in self._paths:
                self._files.append(kvikio.CuFile(p, "r" if read_only else "r+"))
        except RuntimeError as e:
            for f in self._files:
                f.close()
            raise kvikio_exception(e, f"opening {p} with KvikIO") from e
        self._stripe = stripe_bytes or (1 << 62)
        self._task = task_size
        self._threads = threads
        self._memory = memory
        self._direct_cfg = direct_io
        # KvikIO holds an O_DIRECT descriptor per file (used for aligned POSIX I/O when auto direct I/O is on).
        self._odirect = [bool(f.is_direct_io_supported()) for f in self._files]
        self._file_paths, self._file_reasons = self._predict()
        self._host_path = "kvikio-compat" if self._compat else "kvikio-posix"
        self._moved: dict[str, int] = {}
        self._lock = threading.Lock()
        self._registered_here = False
        self._registration = "no CUDA slab attached"
        self._dev_base = 0
        self._host_mv: Optional[memoryview] = None
        self._closed = False
        log.info("KvikIO engine on %s: %s", self._paths[0], self.report().line())

    # -- which path each file takes ---------------------------------------------------
    def _predict(self) -> tuple[list[str], list[str]]:
        n = len(self._files)
        if self._compat:
            why = "KvikIO compat mode (KVIKIO_COMPAT_MODE=ON, or AUTO without a usable libcufile or /run/udev)"
            return ["kvikio-compat"] * n, [why] * n
        paths, reasons, driver = [], [], None
        for p in self._paths:
            fs = fs_type(p)
            if not o_direct_opens(p):
                paths.append("kvikio-compat")
                reasons.append(f"O_DIRECT open refused on {fs}: KvikIO fell back to compat mode for this file")
            elif not nvidia_fs_loaded():
                paths.append("cufile-compat")
                reasons.append("nvidia-fs not loaded: cuFile runs its own POSIX compat mode")
            elif fs not in GDS_FILE_SYSTEMS:
                paths.append("cufile-compat")
                reasons.append(f"file system {fs} is not one GDS supports: cuFile runs its own compat mode")
            else:
                driver = driver or cufile_driver_state()
                if driver["is_gds_available"] is False:
                    paths.append("cufile-compat")
                    reasons.append(driver["why"])
                else:
                    paths.append("gds")
                    reasons.append(f"cuFile DMA (nvidia-fs loaded, {fs})")
        return paths, reasons

    def _probe(self, buffer: SlabBuffer) -> None:
        """Find files whose cuFile handle was refused: KvikIO then runs them in compat mode, silently.

        One small read per cuFile file into scratch GPU memory, counted by
        KvikIO's statistics: a read its POSIX backend took means the file fell
        back. The counters are process-wide, so another thread's cuFile I/O at
        this very moment could hide a fallback (never invent one).
        """
        todo = [i for i, p in enumerate(self._file_paths) if p in ("gds", "cufile-compat")]
        if not todo:
            return
        if self._monitor is None:
            for i in todo:
                self._file_reasons[i] += " (unverified: this KvikIO keeps no statistics)"
            return
        import torch

        size = max(PAGE, -(-self._threshold // PAGE) * PAGE)
        with torch.cuda.device(buffer.cuda_device):
            scratch = torch.empty(size + PAGE, dtype=torch.uint8, device=buffer.device)
            ptr = scratch.data_ptr() + (-scratch.data_ptr()) % PAGE
            for i in todo:
                before = self._monitor.get()
                try:
                    self._files[i].pread(_DevicePtr(ptr, size), size, 0, size).get()
                except Exception:  # noqa: BLE001 - a short file still shows which backend took the read
                    pass
                took = self._monitor.get().since(before).by_backend
                if took.get("GDS", {}).get("num_ops", 0) == 0 and took.get("POSIX", {}).get("num_ops", 0) > 0:
                    self._file_paths[i] = "kvikio-compat"
                    self._file_reasons[i] = "cuFile refused the file handle: KvikIO fell back to compat mode"
                    log.warning("KvikIO runs %s in compat mode: cuFile refused its handle", self._paths[i])
            del scratch

    # -- setup ------------------------------------------------------------------------
    def attach(self, buffer: SlabBuffer) -> None:
        if self._closed:
            raise ClosedError("the kvikio I/O engine is closed")
        if buffer is self._buffer:
            return
        self._release_registration()
        self._buffer = buffer
        self._memory = buffer.kind
        if buffer.kind != "cuda":
            self._host_mv = memoryview(buffer.host_array())
            self._registration = ""
            return
        self._dev_base = buffer.tensor.data_ptr()
        self._probe(buffer)
        if "gds" in self._file_paths:
            already = buffer.registered
            ok = buffer.register_gds()
            self._registered_here = ok and not already
            self._registration = buffer.registration
        else:
            why = "; ".join(sorted(set(self._file_reasons)))
            self._registration = f"not needed: no file takes the GDS path ({why})"

    def _release_registration(self) -> None:
        if self._registered_here and self._buffer is not None:
            self._buffer.deregister_gds()
        self._registered_here = False

    # -- batches ---------------------------------------------------------------------
    def _path_key(self, cuda: bool, nbytes: int, fi: int) -> str:
        if not cuda:
            path = self._host_path
        elif nbytes < self._threshold:
            path = "kvikio-compat"  # KvikIO's synchronous POSIX shortcut for small device I/O
        else:
            path = self._file_paths[fi]
        return f"{path}/{'O_DIRECT' if self._direct_for(path, fi) else 'buffered'}"

    def _direct_for(self, path: str, fi: int) -> bool:
        if path in ("gds", "cufile-compat"):
            return True  # cuFile opens every file with O_DIRECT, whatever direct_io says
        return self._direct_cfg and self._odirect[fi]

    def _transfer(self, write: bool, spans: Sequence[Span]) -> list[Optional[BaseException]]:
        if self._closed:
            raise ClosedError("the kvikio I/O engine is closed")
        buffer = self._buffer
        if buffer is None:
            raise IOEngineError("no slab attached: call attach(buffer) before read_spans/write_spans")
        n = len(spans)
        errs: list[Optional[BaseException]] = [None] * n
        futs: list = [None] * n
        cuda = buffer.kind == "cuda"
        base, mv = self._dev_base, self._host_mv
        stripe, nfiles, size, task = self._stripe, len(self._files), buffer.nbytes, self._task
        op = "pwrite" if write else "pread"
        # Start every span, then wait: all are in flight on KvikIO's pool together.
        for i, s in enumerate(spans):
            err = check_span(s, size, stripe, nfiles)
            if err is not None:
                errs[i] = err
                continue
            fi, local = divmod(s.file_offset, stripe)
            f = self._files[fi]
            target = _DevicePtr(base + s.mem_offset, s.nbytes) if cuda else mv[s.mem_offset:s.mem_offset + s.nbytes]
            try:
                futs[i] = (f.pwrite if write else f.pread)(target, s.nbytes, local, task)
            except Exception as e:  # noqa: BLE001 - one span's failure is that span's result
                errs[i] = kvikio_exception(e, f"{op} of {s.nbytes} bytes at {local} of {self._paths[fi]}")
        moved: dict[str, int] = {}
        for i, fut in enumerate(futs):
            if fut is None:
                continue
            s = spans[i]
            fi, local = divmod(s.file_offset, stripe)
            try:
                got = fut.get()
            except Exception as e:  # noqa: BLE001
                errs[i] = kvikio_exception(e, f"{op} of {s.nbytes} bytes at {local} of {self._paths[fi]}")
                continue
            if got != s.nbytes:
                errs[i] = IOEngineError(f"{op} moved {got} of {s.nbytes} bytes at {local} of {self._paths[fi]}")
                continue
            key = self._path_key(cuda, s.nbytes, fi)
            moved[key] = moved.get(key, 0) + got
        if moved:
            with self._lock:
                for k, v in moved.items():
                    self._moved[k] = self._moved.get(k, 0) + v
        return errs

    def read_spans(self, spans: Sequence[Span]) -> list[Optional[BaseException]]:
        return self._transfer(False, spans)

    def write_spans(self, spans: Sequence[Span]) -> list[Optional[BaseException]]:
        if self.read_only and not self._closed:
            raise IOEngineError(errno.EBADF, f"the kvikio I/O engine over {self._paths[0]} is read-only: "
                                             f"it was opened with read_only=True and never writes")
        return self._transfer(True, spans)

    # -- report ----------------------------------------------------------------------
    def report(self) -> IOPathReport:
        nfiles = len(self._files)
        if self._memory == "cuda":
            fpaths, freasons = tuple(self._file_paths), tuple(self._file_reasons)
            registered = self._buffer.registered if self._buffer is not None else False
            registration = self._registration
        else:
            why = ("KvikIO compat mode" if self._compat
                   else "host memory never takes cuFile: KvikIO's POSIX path")
            fpaths, freasons = (self._host_path,) * nfiles, (why,) * nfiles
            registered, registration = None, ""
        path = fpaths[0] if len(set(fpaths)) == 1 else "mixed"
        main = fpaths[0] if path == "mixed" else path
        if main in ("gds", "cufile-compat"):
            direct = True
            reason = "cuFile opens files with O_DIRECT" + ("" if self._direct_cfg else " (direct_io=False ignored)")
        else:
            direct = self._direct_cfg and all(self._odirect)
            reason = ("disabled in config" if not self._direct_cfg else
                      "ok" if direct else "file system refuses O_DIRECT")
        with self._lock:
            moved = dict(self._moved)
        backends = {}
        if self._monitor is not None and not self._closed:
            try:
                backends = {k: v["bytes_transferred"] for k, v in self._monitor.get().by_backend.items()
                            if k in ("GDS", "POSIX")}
            except Exception:  # noqa: BLE001 - statistics are a report, never a failure
                backends = {}
        return IOPathReport("kvikio", path, direct, reason, self._threads, self._task, self._memory, nfiles,
                            file_paths=fpaths, file_reasons=freasons, bytes_by_path=moved,
                            registered=registered, registration=registration, kvikio_backends=backends)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_submitter()
        # Deregister before anyone can free the slab: once, and only what this engine registered.
        self._release_registration()
        for f in self._files:
            f.close()
        if self._monitor is not None:
            self._monitor.stop()
        self._buffer = None
        self._host_mv = None
