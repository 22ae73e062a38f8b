"""The I/O engine interface: batches of spans between one slab and the pool files."""

from __future__ import annotations

import abc
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import ClosedError, IOEngineError
from ..memory.obj import MemoryObj
from ..units import MiB

if TYPE_CHECKING:  # pragma: no cover
    from ..memory.buffers import SlabBuffer

__all__ = ["IOEngine", "IOPathReport", "InFlight", "PATHS", "Span", "check_span"]

# Every value ``IOPathReport.path`` and the keys of ``bytes_by_path`` can take.
PATHS = {
    "gds": "cuFile DMA between the file and GPU memory (nvidia-fs loaded, supported file system)",
    "cufile-compat": "through cuFile, which runs its own POSIX compat mode (no nvidia-fs, or a file "
                     "system GDS does not support)",
    "kvikio-compat": "KvikIO's POSIX path: pread/pwrite; GPU memory staged through pinned bounce buffers "
                     "(this library's, copies overlapping the I/O, or KvikIO's own: see IOPathReport.staging)",
    "kvikio-posix": "KvikIO's POSIX path straight into host memory (host memory never takes cuFile)",
    "posix": "this library's pread/pwrite thread pool (GPU memory staged through pinned buffers)",
    "mapped": "memory-mapped pool files (RAM-backed directories)",
}


@dataclass(frozen=True)
class Span:
    """One contiguous transfer: slab bytes [mem_offset, +nbytes) <-> pool bytes [file_offset, +nbytes).

    Attributes
    ----------
    mem_offset
        Byte offset into the slab buffer (``SlabBuffer.tensor``), 4 KiB-aligned.
    file_offset
        Logical pool offset: stripe file ``file_offset // stripe_bytes``, at
        ``file_offset % stripe_bytes`` in it.
    nbytes
        > 0, a 4 KiB multiple; a span never crosses a stripe boundary.
    """

    mem_offset: int
    file_offset: int
    nbytes: int


def check_span(s: Span, slab_bytes: int, stripe: int, files: int) -> Optional[IOEngineError]:
    """None if ``s`` fits the slab and one stripe file, else the error for that span."""
    if s.nbytes <= 0 or s.mem_offset < 0 or s.mem_offset + s.nbytes > slab_bytes:
        return IOEngineError(f"span {s} does not fit the {slab_bytes}-byte slab")
    if s.file_offset < 0 or s.file_offset // stripe != (s.file_offset + s.nbytes - 1) // stripe:
        return IOEngineError(f"span {s} crosses a file boundary (stripe {stripe})")
    if s.file_offset // stripe >= files:
        return IOEngineError(f"span {s} is past the last of {files} pool files")
    return None


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


@dataclass(frozen=True)
class IOPathReport:
    """Which path moved (or will move) the bytes, so users can tell a GDS run from a fallback.

    Attributes
    ----------
    engine
        ``kvikio``, ``posix`` or ``mapped``.
    path
        One of ``PATHS``: what this engine's transfers take with the memory
        attached (``mixed`` when the files differ; see ``file_paths``).
    direct_io, direct_io_reason
        Whether the bytes of ``path`` go with O_DIRECT, and why (not). cuFile
        always opens files with O_DIRECT, whatever ``direct_io`` says.
    threads, task_size, memory, files
        The engine's settings.
    file_paths
        The path per pool file (index = file number), where known.
    file_reasons
        Why each file takes its path.
    bytes_by_path
        Bytes this engine moved since it opened, keyed ``"<path>/<O_DIRECT|buffered>"``.
    registered, registration
        Whether the CUDA slab is registered with cuFile (None: not applicable),
        and why (not).
    kvikio_backends
        KvikIO's own byte counters per backend (``GDS``, ``POSIX``) since the
        engine opened: process-wide, so other KvikIO users count too.
    staging
        How GPU memory reaches the file where no DMA can (empty: nothing is
        staged): this library's pipelined lanes, or KvikIO's bounce buffers.

    Notes
    -----
    ``path`` before any I/O is a prediction from what KvikIO, cuFile and the
    file system say; ``bytes_by_path`` is what the engine then did. Trust the
    counters when they disagree.
    """

    engine: str
    path: str
    direct_io: bool
    direct_io_reason: str
    threads: int
    task_size: int
    memory: str
    files: int = 1
    file_paths: tuple = ()
    file_reasons: tuple = ()
    bytes_by_path: dict = field(default_factory=dict, hash=False)
    registered: Optional[bool] = None
    registration: str = ""
    kvikio_backends: dict = field(default_factory=dict, hash=False)
    staging: str = ""

    def line(self) -> str:
        d = "O_DIRECT" if self.direct_io else f"buffered ({self.direct_io_reason})"
        out = (f"engine={self.engine} path={self.path} io={d} threads={self.threads} "
               f"task={self.task_size >> 10} KiB files={self.files} memory={self.memory}")
        if self.registered is not None:
            out += " slab=registered" if self.registered else f" slab=unregistered ({self.registration})"
        if self.staging:
            out += f" staging={self.staging}"
        odd = [f"file {i}: {p} ({r})" for i, (p, r) in enumerate(zip(self.file_paths, self.file_reasons))
               if p != self.path]
        if odd and self.path != "mixed":
            out += " | " + "; ".join(odd)
        elif self.path == "mixed":
            out += " | " + "; ".join(f"file {i}: {p}" for i, p in enumerate(self.file_paths))
        moved = {k: v for k, v in self.bytes_by_path.items() if v}
        if moved:
            out += " | moved " + ", ".join(f"{k} {_size(v)}" for k, v in sorted(moved.items()))
        return out


class InFlight:
    """The calls in progress on one engine, so ``close()`` waits for them.

    A transfer that outlived ``close()`` would write through a closed
    descriptor, whose number the process may already have given to another
    file, or copy through freed bounce buffers: ``with calls:`` around every
    transfer, and ``calls.close()`` first thing in ``close()``.
    """

    def __init__(self, name: str):
        self._name = name
        self._cv = threading.Condition()
        self._n = 0
        self.closed = False

    def __enter__(self) -> None:
        with self._cv:
            if self.closed:
                raise ClosedError(f"the {self._name} I/O engine is closed")
            self._n += 1

    def __exit__(self, *exc) -> None:
        with self._cv:
            self._n -= 1
            if self._n == 0:
                self._cv.notify_all()

    def close(self) -> bool:
        """Refuse new calls and wait for those in progress; False if already closed."""
        with self._cv:
            if self.closed:
                return False
            self.closed = True
            while self._n:
                self._cv.wait()
            return True


class IOEngine(abc.ABC):
    """Moves batches of spans between one slab and the pool files (one file or the stripes of a pool).

    The disk tier calls ``attach(buffer)`` once with the slab every span
    refers to, then ``read_spans``/``write_spans``. Each returns one entry
    per span: None, or the exception that span met (an ``OSError`` carrying
    ``errno`` ENOSPC/EDQUOT when the disk is full, an ``IOEngineError`` for a
    short read). A call never raises for one span's I/O failure; it raises
    ``ClosedError`` after ``close()``.

    Notes
    -----
    For a CUDA slab, the bytes of a read are in GPU memory and visible to
    every stream when the call returns; a write reads the slab after the call
    starts, so synchronise the producer first. Where an engine stages GPU
    memory through its own lanes (POSIX; KvikIO's compat path, pipelined) a
    write also waits for the work queued on the legacy default stream and a
    read does not (``staging``'s rule); KvikIO's own device path waits for
    the default stream on both. The per-object methods
    (``read``/``write``/``submit_*``) are one-span batches, kept for tests and
    tools; they attach the object's slab on first use.
    """

    name = "?"
    punch_ok: bool = True  # False where the disk tier must never punch holes in pool files
    read_only: bool = False  # True: files opened O_RDONLY, write_spans refused (shared mode's remote reads)
    #: True where ``read_spans``/``write_spans`` take ``hook``, called as ``hook(mem_offset, nbytes)``
    #: for each piece of a host slab, on the thread that moves it: after the piece is read, before
    #: it is written (so a checksum of the piece overlaps the other pieces' I/O).
    piece_hooks: bool = False
    _buffer: "Optional[SlabBuffer]" = None
    _submitter: Optional[ThreadPoolExecutor] = None
    _submit_lock = threading.Lock()

    @abc.abstractmethod
    def attach(self, buffer: "SlabBuffer") -> None:
        """Use ``buffer`` as the slab all spans refer to (once, before any I/O)."""

    @abc.abstractmethod
    def read_spans(self, spans: Sequence[Span]) -> list[Optional[BaseException]]:
        """Read every span into the attached slab; block until all are done; one result per span."""

    @abc.abstractmethod
    def write_spans(self, spans: Sequence[Span]) -> list[Optional[BaseException]]:
        """Write every span from the attached slab; block until all are done; one result per span."""

    @abc.abstractmethod
    def report(self) -> IOPathReport:
        """What path this engine runs on, and what it moved."""

    @abc.abstractmethod
    def close(self) -> None:
        """Take no new calls; release files, registrations and staging memory."""

    @property
    def attached(self) -> "Optional[SlabBuffer]":
        return self._buffer

    # -- one-object transfers, as one-span batches ------------------------------------
    def _one_span(self, obj: MemoryObj, file_offset: int, nbytes: int) -> Span:
        buf = obj.slab
        if self._buffer is None:
            self.attach(buf)
        elif self._buffer is not buf:
            raise IOEngineError(f"{obj!r} is not in the slab this {self.name} engine is attached to")
        if nbytes <= 0 or nbytes > obj.phys_size:
            raise IOEngineError(f"cannot move {nbytes} bytes through {obj!r}")
        return Span(obj.offset, file_offset, nbytes)

    def _one(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int) -> int:
        span = self._one_span(obj, file_offset, nbytes)
        err = (self.write_spans if write else self.read_spans)([span])[0]
        if err is not None:
            raise err
        return nbytes

    def read(self, obj: MemoryObj, file_offset: int, nbytes: int) -> int:
        """Read and return once the bytes are in ``obj`` (GPU copies included)."""
        return self._one(False, obj, file_offset, nbytes)

    def write(self, obj: MemoryObj, file_offset: int, nbytes: int) -> int:
        """Write and return once the bytes are in the file."""
        return self._one(True, obj, file_offset, nbytes)

    def _submit(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int) -> Future:
        if getattr(self, "_closed", False):
            raise ClosedError(f"the {self.name} I/O engine is closed")
        self._one_span(obj, file_offset, nbytes)  # argument errors raise here, not in the future
        with self._submit_lock:
            if self._submitter is None:
                # Not the engine's own pool: a batch running there waits on that pool's workers.
                self._submitter = ThreadPoolExecutor(4, thread_name_prefix=f"gds-kvcache-{self.name}-submit")
            pool = self._submitter
        return pool.submit(self._one, write, obj, file_offset, nbytes)

    def submit_read(self, obj: MemoryObj, file_offset: int, nbytes: int) -> Future:
        """Start reading ``nbytes`` at ``file_offset`` into ``obj``; the future gives the count."""
        return self._submit(False, obj, file_offset, nbytes)

    def submit_write(self, obj: MemoryObj, file_offset: int, nbytes: int) -> Future:
        """Start writing ``nbytes`` of ``obj`` at ``file_offset``; the future gives the count."""
        return self._submit(True, obj, file_offset, nbytes)

    def _close_submitter(self) -> None:
        with self._submit_lock:
            pool, self._submitter = self._submitter, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
