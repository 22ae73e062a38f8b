"""KvikIO engine: ``kvikio.CuFile`` handles opened once, GDS where it really runs, compat mode otherwise.

Where a CUDA slab meets a file on KvikIO's compat path (no GDS), the bytes
are staged through this library's pinned lanes by default (``staging``): the
copy of one piece overlaps KvikIO's host ``pwrite``/``pread`` of others. The
alternative, ``staging="kvikio"``, hands device pointers to KvikIO, whose
compat path copies each task to its own pinned buffer and then does its I/O,
one after the other. Files where cuFile runs get device memory directly.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Optional, Sequence

from ..errors import ClosedError, IOEngineError
from ..memory.buffers import SlabBuffer
from ..units import PAGE
from .attachment import AttachPoint, Attachment
from .base import IOEngine, InFlight, IOPathReport, Span, check_span
from .cuda_lane import cuda_lane_pool
from .driver import GDS_FILE_SYSTEMS, cufile_driver_state, fs_type, kvikio_error, nvidia_fs_loaded
from .kvikio_util import (DevicePtr, KvikIOHostIO, configure_kvikio, kvikio_exception, kvikio_monitor,
                          o_direct_opens)
from .lane_pool import LanePool
from .staging import run_lane, wait_out

__all__ = ["KvikIOEngine", "STAGINGS", "configure_kvikio", "kvikio_exception", "o_direct_opens"]

log = logging.getLogger(__name__)

#: ``staging`` values: how a CUDA slab reaches a file on KvikIO's compat path.
STAGINGS = ("pipelined", "kvikio")
#: Lanes of a pipelined KvikIO engine: each is driven by one calling thread, keeping up to
#: ``threads`` pieces in flight on KvikIO's pool, so two keep the pool busy between batches.
KVIKIO_LANES = 2
class KvikIOEngine(IOEngine):
    """Batches of spans through ``kvikio.CuFile`` handles (one per stripe file) opened once.

    Parameters are those of ``PosixEngine``; ``read_only`` opens every file
    with ``CuFile(path, "r")`` (``O_RDONLY``; KvikIO adds its O_DIRECT
    descriptor as it would read-write) and refuses ``write_spans`` with an
    ``IOEngineError`` (EBADF). ``staging`` (one of ``STAGINGS``) says how a
    CUDA slab reaches files on the compat path: ``pipelined`` through
    ``KVIKIO_LANES`` lanes of ``threads`` pinned slots each, allocated at
    ``attach``, or ``kvikio`` through KvikIO's own bounce buffers.

    Notes
    -----
    Which path a span takes depends on three things, and ``report()`` says
    which ran, per file and in bytes moved:

    * host or pinned slab: always KvikIO's POSIX path (``kvikio-posix``; or
      ``kvikio-compat`` when KvikIO is in compat mode);
    * CUDA slab, KvikIO in compat mode, or a file KvikIO could not open with
      O_DIRECT or whose cuFile handle was refused: ``kvikio-compat`` (bounce
      buffers: ours, pipelined, or KvikIO's; ``report().staging`` says);
    * otherwise cuFile: ``gds`` with nvidia-fs loaded on a supported file
      system, else ``cufile-compat`` (cuFile's own POSIX fallback).

    The CUDA slab is registered with cuFile on ``attach`` only when a file
    takes the ``gds`` path; a refusal leaves it working unregistered. A batch
    runs on the slab, device address and lanes attached when it started
    (``attachment``): ``attach`` to another slab meanwhile returns at once,
    and the old slab is deregistered, and its lanes let go, when the last
    batch on it ends (so both slabs are registered for that long). On the
    cuFile path (and with ``staging="kvikio"``) KvikIO waits for the CUDA
    default stream before each read or write: keep model kernels off the
    default stream (see ``scripts/default_stream_probe.py``). The pipelined
    lanes wait for it on puts only (``staging``'s rule, the POSIX engine's
    too).
    """

    name = "kvikio"
    #: Makes the staging lanes at ``attach`` (see ``PosixEngine.lane_factory``).
    lane_factory = staticmethod(cuda_lane_pool)

    def __init__(self, paths, threads: int, task_size: int, direct_io: bool, memory: str = "host",
                 stripe_bytes: int | None = None, read_only: bool = False, staging: str = "pipelined"):
        if staging not in STAGINGS:
            raise IOEngineError(f"staging={staging!r}: allowed {' | '.join(STAGINGS)}")
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
        self._monitor = kvikio_monitor()
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
        self._registration = "no CUDA slab attached"
        self._staging = staging
        self._attached = AttachPoint("kvikio")
        self._host_io = KvikIOHostIO(self._files, self._paths, task_size,
                                     [direct_io and d for d in self._odirect])
        self._calls = InFlight("kvikio")
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
                    self._files[i].pread(DevicePtr(ptr, size), size, 0, size).get()
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
        # The new slab's lanes come before the old ones are let go: an engine re-attached on one device
        # keeps its pinned memory. Batches on the old slab keep it, its lanes and its cuFile registration
        # until they end (see ``attachment``).
        self._attached.swap(self._prepare(buffer))
        self._buffer = buffer
        self._memory = buffer.kind

    def _prepare(self, buffer: SlabBuffer) -> Attachment:
        """Everything a batch on ``buffer`` needs, made before any batch can see it."""
        if buffer.kind != "cuda":
            lanes = self._stage_if_compat(buffer)
            self._registration = ""
            return Attachment(buffer, host_mv=memoryview(buffer.host_array()), lanes=lanes)
        base = buffer.tensor.data_ptr()
        self._probe(buffer)
        lanes = self._stage_if_compat(buffer)
        registered_here = False
        try:
            if "gds" in self._file_paths:
                already = buffer.registered
                registered_here = buffer.register_gds() and not already
                self._registration = buffer.registration
            else:
                why = "; ".join(sorted(set(self._file_reasons)))
                self._registration = f"not needed: no file takes the GDS path ({why})"
        except BaseException:
            if lanes is not None:
                lanes.close()
            raise
        # Deregistered when the last batch on it ended, never under one (only what this engine registered).
        return Attachment(buffer, dev_base=base, lanes=lanes,
                          cleanup=buffer.deregister_gds if registered_here else None)

    def _stage_if_compat(self, buffer: SlabBuffer) -> Optional[LanePool]:
        # Puts through the lanes wait for the default stream, gets do not: staging's rule, both engines'.
        if self._staging == "pipelined" and "kvikio-compat" in self._file_paths:
            return self.lane_factory(buffer, KVIKIO_LANES, max(2, self._threads), self._task)
        return None

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
        with self._calls:
            att = self._attached.hold()
            try:
                return self._batch(write, spans, att)
            finally:
                att.release()

    def _batch(self, write: bool, spans: Sequence[Span], att: Attachment) -> list[Optional[BaseException]]:
        n = len(spans)
        errs: list[Optional[BaseException]] = [None] * n
        futs: list = [None] * n
        staged: list = []  # pieces for a staging lane: (span, slab offset, file, offset in file, bytes)
        try:
            self._start_unstaged(write, spans, errs, futs, staged, att)
            moved = self._stage(write, staged, errs, att.buffer, att.lanes) if staged else {}
            self._finish_unstaged(write, spans, errs, futs, moved, att.buffer.kind == "cuda")
        finally:
            # Whatever interrupted the batch (KeyboardInterrupt), no KvikIO task may still move slab bytes.
            wait_out([f for f in futs if f is not None], lambda f: f.get(), lambda f: f.done())
        if moved:
            with self._lock:
                for k, v in moved.items():
                    self._moved[k] = self._moved.get(k, 0) + v
        return errs

    def _start_unstaged(self, write, spans, errs, futs, staged, att: Attachment) -> None:
        """Start every span that is not staged on KvikIO's pool (``futs``); queue the others in ``staged``."""
        buffer, lanes, base, mv = att.buffer, att.lanes, att.dev_base, att.host_mv
        cuda = buffer.kind == "cuda"
        stripe, nfiles, size, task = self._stripe, len(self._files), buffer.nbytes, self._task
        op = "pwrite" if write else "pread"
        for i, s in enumerate(spans):
            err = check_span(s, size, stripe, nfiles)
            if err is not None:
                errs[i] = err
                continue
            fi, local = divmod(s.file_offset, stripe)
            if lanes is not None and self._file_paths[fi] == "kvikio-compat":
                staged.extend((i, s.mem_offset + lo, fi, local + lo, min(task, s.nbytes - lo))
                              for lo in range(0, s.nbytes, task))
                continue
            f = self._files[fi]
            target = DevicePtr(base + s.mem_offset, s.nbytes) if cuda else mv[s.mem_offset:s.mem_offset + s.nbytes]
            try:
                futs[i] = (f.pwrite if write else f.pread)(target, s.nbytes, local, task)
            except Exception as e:  # noqa: BLE001 - one span's failure is that span's result
                errs[i] = kvikio_exception(e, f"{op} of {s.nbytes} bytes at {local} of {self._paths[fi]}")

    def _stage(self, write, staged, errs, buffer, lanes) -> dict:
        """The staged pieces through one lane, on this thread, while KvikIO's pool runs the others."""
        lane = lanes.acquire()  # blocks while other batches hold every lane
        try:
            direct, buffered = run_lane(lane, write, buffer, iter(staged), self._host_io, errs)
        finally:
            lanes.release(lane)
        return {"kvikio-compat/O_DIRECT": direct, "kvikio-compat/buffered": buffered}

    def _finish_unstaged(self, write, spans, errs, futs, moved, cuda) -> None:
        """Wait for each started span in turn (``futs[i]`` cleared once it is over) and count its bytes."""
        op = "pwrite" if write else "pread"
        for i, fut in enumerate(futs):
            if fut is None:
                continue
            s = spans[i]
            fi, local = divmod(s.file_offset, self._stripe)
            try:
                got = fut.get()
            except Exception as e:  # noqa: BLE001
                futs[i] = None
                errs[i] = kvikio_exception(e, f"{op} of {s.nbytes} bytes at {local} of {self._paths[fi]}")
                continue
            futs[i] = None
            if got != s.nbytes:
                errs[i] = IOEngineError(f"{op} moved {got} of {s.nbytes} bytes at {local} of {self._paths[fi]}")
                continue
            key = self._path_key(cuda, s.nbytes, fi)
            moved[key] = moved.get(key, 0) + got

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
        att = self._attached.current
        lanes = att.lanes if att is not None else None
        if lanes is not None:
            staging = f"pipelined: {lanes.describe}, file I/O on KvikIO's threads"
        elif self._memory == "cuda" and "kvikio-compat" in fpaths:
            staging = "kvikio: KvikIO's own bounce buffer per task, copy then I/O"
        else:
            staging = ""
        return IOPathReport("kvikio", path, direct, reason, self._threads, self._task, self._memory, nfiles,
                            file_paths=fpaths, file_reasons=freasons, bytes_by_path=moved,
                            registered=registered, registration=registration, kvikio_backends=backends,
                            staging=staging)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_submitter()
        self._calls.close()  # transfers in progress end before their files and lanes go
        # The lanes go, and the slab is deregistered before anyone can free it (what this engine registered).
        self._attached.close()
        for f in self._files:
            f.close()
        if self._monitor is not None:
            self._monitor.stop()
        self._buffer = None
