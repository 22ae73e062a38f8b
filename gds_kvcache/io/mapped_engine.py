"""Mapped engine: pool files on a RAM-backed file system, mapped once, moved by memcpy or one DMA.

On tmpfs (``/dev/shm``), ramfs, hugetlbfs or a DAX mount the file's pages
are memory, so reading them with ``pread`` is a CPU copy that caps every
read-based path near the CPU's copy rate. This engine maps each pool file
``MAP_SHARED`` once at open and, for a CUDA slab, registers the mapping
with ``cudaHostRegister``: a put or get is then one DMA between the slab and
the mapping, with no CPU copy at all. One file's mapping and its CUDA
registration are ``mapped_file.MappedFile``; this module is the span copy
engine over them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..errors import ClosedError, IOEngineError
from ..units import PAGE
from .base import IOEngine, IOPathReport, Span, check_span
from .mapped_file import MappedFile

if TYPE_CHECKING:  # pragma: no cover
    from ..memory.buffers import SlabBuffer

__all__ = ["MappedEngine"]

log = logging.getLogger(__name__)

#: Host copies gain nothing past a few threads: memory bandwidth is shared.
MAX_HOST_COPY_THREADS = 8


class MappedEngine(IOEngine):
    """Pool files on a RAM-backed file system, mapped once; transfers are memcpy or DMA.

    Parameters
    ----------
    paths
        Existing pool files (a path or a list), the stripes of one pool.
    threads
        Upper bound of the host-copy thread pool (capped at
        ``MAX_HOST_COPY_THREADS``); CUDA transfers need no threads.
    task_size
        Bytes per piece: a span is split into pieces of at most this size,
        spread over the host threads or the CUDA streams.
    direct_io
        Ignored: a mapping does no file I/O.
    memory
        The slab kind (``cuda``, ``pinned``, ``host``): ``cuda`` registers
        every mapping with CUDA at open rather than at ``attach``.
    stripe_bytes
        Bytes per file: logical offset ``o`` is byte ``o % stripe_bytes`` of
        file ``o // stripe_bytes``. None maps a single file at its size.
    streams
        CUDA streams per calling thread that a batch is spread over.

    Notes
    -----
    Memory: the pool takes RAM equal to its full size from open on, since
    every stripe is ``posix_fallocate``'d completely (a store into a hole of
    a full tmpfs would be SIGBUS, not an error). The pages are charged to
    the cgroup of the process that allocated them and stay allocated after
    it exits, until the files are deleted: that is what makes a ``/dev/shm``
    directory a host tier shared across processes and restarts. A registered
    mapping is also pinned (never swapped) while the engine is open. Budget
    the pool well under ``MemAvailable``; ``io_engine='auto'`` only picks
    this engine when it fits with a margin.

    Open cost: about 0.1 s per GiB to populate the mappings, plus 0.1-0.2 s
    per GiB for ``cudaHostRegister`` with a CUDA slab. Time puts only after
    open: open touches every page once, so no transfer meets memory the
    system has never handed out (fresh pages cost the GPU path ~20x).

    Durability: tmpfs is RAM, so there is no ``msync``; bytes are in the file
    as soon as a transfer returns and survive a crash of this process (not a
    reboot). Pages written by an earlier process (a restart) are seen
    through the mapping. ``punch_ok`` is False: punching a hole under a
    registered mapping would leave the pinned pages detached from the file.
    For the same reason never truncate a pool file while an engine has it
    open: a span past a file's current end is refused (``IOEngineError``)
    when its batch starts, but a truncation during a batch is SIGBUS for
    host copies.

    On a DAX file system CUDA may refuse the registration (no long-term pins
    of fsdax pages); the engine then fails at open and ``auto`` falls back to
    a read-based engine. hugetlbfs needs stripe sizes that are multiples of
    the huge page size.
    """

    name = "mapped"
    punch_ok = False

    def __init__(self, paths, threads: int, task_size: int, direct_io: bool = False, memory: str = "host",
                 stripe_bytes: Optional[int] = None, streams: int = 2):
        paths = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
        if not paths:
            raise IOEngineError("the mapped engine needs at least one pool file")
        if task_size <= 0 or task_size % PAGE:
            raise IOEngineError(f"task_size {task_size} is not a positive multiple of {PAGE}")
        self._stripe = stripe_bytes or (1 << 62)
        self._task = task_size
        self._threads = max(1, min(threads, MAX_HOST_COPY_THREADS))
        self._nstreams = max(1, streams)
        self._memory = memory
        self._maps: list[MappedFile] = []
        self._registered = False
        self._pool: Optional[ThreadPoolExecutor] = None
        self._local = threading.local()
        self._cond = threading.Condition()
        self._reg_lock = threading.Lock()
        self._inflight = 0
        self._moved = 0
        self._closed = False
        t0 = time.perf_counter()
        try:
            for p in paths:
                self._maps.append(MappedFile(p, stripe_bytes))
            if str(memory).startswith("cuda"):
                import torch

                self._register(torch.device(memory))
        except BaseException:
            for m in self._maps:
                m.close()
            self._maps = []
            self._closed = True
            raise
        log.info("mapped %d file(s), %d bytes, in %.2f s: %s", len(self._maps),
                 sum(m.length for m in self._maps), time.perf_counter() - t0, self.report().line())

    # -- set-up --------------------------------------------------------------
    def _register(self, device) -> None:
        t0 = time.perf_counter()
        with self._reg_lock:  # racing first calls would register twice (an error)
            if self._registered:
                return
            for m in self._maps:
                m.register(device)
            self._registered = True
        log.info("registered %d bytes of mappings with CUDA in %.2f s",
                 sum(m.length for m in self._maps), time.perf_counter() - t0)

    def attach(self, buffer: "SlabBuffer") -> None:
        """Take the slab every span refers to; a CUDA slab gets the mappings registered (once)."""
        self._enter()
        try:
            if buffer.kind == "cuda" and not self._registered:
                self._register(buffer.device)
            self._buffer = buffer
        finally:
            self._exit()

    @property
    def registered(self) -> bool:
        """True once the mappings are pinned for CUDA DMA."""
        return self._registered

    # -- call bookkeeping: close waits for transfers that use the mappings ----
    def _enter(self) -> None:
        with self._cond:
            if self._closed:
                raise ClosedError("the mapped I/O engine is closed")
            self._inflight += 1

    def _exit(self) -> None:
        with self._cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._cond.notify_all()

    # -- the batched interface -------------------------------------------------
    def read_spans(self, spans: Sequence[Span]) -> list[Optional[BaseException]]:
        """Copy each span from its pool file into the slab; one entry per span (None = done)."""
        return self._spans(False, spans)

    def write_spans(self, spans: Sequence[Span]) -> list[Optional[BaseException]]:
        """Copy each span from the slab into its pool file; one entry per span (None = done)."""
        return self._spans(True, spans)

    def _spans(self, write: bool, spans: Sequence[Span]) -> list[Optional[BaseException]]:
        self._enter()
        try:
            slab = self._buffer
            if slab is None:
                raise IOEngineError("read_spans/write_spans called before attach(slab)")
            errors, pieces = self._plan(write, slab, spans)
            if pieces:
                (self._cuda if slab.kind == "cuda" else self._host)(write, slab, pieces, errors)
                moved = sum(s.nbytes for s, e in zip(spans, errors) if e is None)
                with self._cond:
                    self._moved += moved
            return errors
        finally:
            self._exit()

    def _plan(self, write: bool, slab: "SlabBuffer", spans: Sequence[Span]):
        """(errors, pieces): a checked span becomes (span index, file, file offset, slab offset, bytes) pieces."""
        errors: list[Optional[BaseException]] = [None] * len(spans)
        sizes: dict[int, int] = {}
        pieces = []
        for k, s in enumerate(spans):
            err = check_span(s, slab.nbytes, self._stripe, len(self._maps))
            if err is None:
                i, local = divmod(s.file_offset, self._stripe)
                m = self._maps[i]
                if local + s.nbytes > m.length:
                    err = IOEngineError(f"span {s} lies past the {m.length} bytes mapped of {m.path}")
                else:
                    if i not in sizes:
                        sizes[i] = m.size_now()
                    if local + s.nbytes > sizes[i]:
                        # Touching the mapping past the file's end would be SIGBUS.
                        err = IOEngineError(f"{'write' if write else 'short read'}: {m.path} is {sizes[i]} "
                                            f"bytes long, span {s} needs more (pool file truncated)")
            if err is not None:
                errors[k] = err
                continue
            for lo in range(0, s.nbytes, self._task):
                pieces.append((k, i, local + lo, s.mem_offset + lo, min(self._task, s.nbytes - lo)))
        return errors, pieces

    @staticmethod
    def _fail(errors: list, k: int, write: bool, e: BaseException) -> None:
        if errors[k] is None:
            errors[k] = IOEngineError(f"{'write' if write else 'read'} of span {k}: {type(e).__name__}: {e}")

    # -- host slab: memcpy on a few threads ------------------------------------
    def _host_bin(self, write: bool, slab_arr: np.ndarray, pieces, errors) -> None:
        for k, i, local, mem, n in pieces:
            try:
                file_view = self._maps[i].array[local:local + n]
                slab_view = slab_arr[mem:mem + n]
                # NumPy drops the GIL for the copy, so bins run in parallel.
                if write:
                    np.copyto(file_view, slab_view)
                else:
                    np.copyto(slab_view, file_view)
            except Exception as e:  # one bad piece fails its span, not the batch
                self._fail(errors, k, write, e)

    def _host(self, write: bool, slab: "SlabBuffer", pieces, errors) -> None:
        arr = slab.host_array()
        total = sum(p[4] for p in pieces)
        nbins = min(self._threads, len(pieces), -(-total // self._task))
        if nbins <= 1:
            self._host_bin(write, arr, pieces, errors)
            return
        # Contiguous runs of pieces of about equal bytes: one hand-off per
        # thread per batch, not one per piece.
        bins, cur, acc = [], [], 0
        for p in pieces:
            cur.append(p)
            acc += p[4]
            if len(bins) < nbins - 1 and acc * nbins >= total * (len(bins) + 1):
                bins.append(cur)
                cur = []
        bins.append(cur)
        if self._pool is None:
            with self._cond:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._threads - 1, thread_name_prefix="gds-kvcache-mapped")
        futs = [self._pool.submit(self._host_bin, write, arr, b, errors) for b in bins[1:] if b]
        try:
            self._host_bin(write, arr, bins[0], errors)
        finally:
            wait(futs)  # never return while a thread may still touch the slab

    # -- CUDA slab: DMA on the engine's streams --------------------------------
    def _streams(self, device):
        import torch

        per_dev = getattr(self._local, "streams", None)
        if per_dev is None:
            per_dev = self._local.streams = {}
        s = per_dev.get(device.index)
        if s is None:
            s = per_dev[device.index] = [torch.cuda.Stream(device) for _ in range(self._nstreams)]
        return s

    def _cuda(self, write: bool, slab: "SlabBuffer", pieces, errors) -> None:
        import torch

        streams = self._streams(slab.device)
        use = streams[:min(len(streams), len(pieces))]
        # The caller synchronised its producer; waiting on its current stream
        # as well costs one event per stream and covers a caller that did not.
        current = torch.cuda.current_stream(slab.device)
        per = -(-len(pieces) // len(use))
        groups = [pieces[j * per:(j + 1) * per] for j in range(len(use))]
        slab_t = slab.tensor
        for s, group in zip(use, groups):
            if not group:
                continue
            s.wait_stream(current)
            with torch.cuda.stream(s):
                for k, i, local, mem, n in group:
                    try:
                        file_view = self._maps[i].tensor[local:local + n]
                        slab_view = slab_t[mem:mem + n]
                        # One side pinned (registered), the other on the GPU:
                        # one cudaMemcpyAsync, done by the copy engine (DMA).
                        if write:
                            file_view.copy_(slab_view, non_blocking=True)
                        else:
                            slab_view.copy_(file_view, non_blocking=True)
                    except Exception as e:
                        self._fail(errors, k, write, e)
        for s, group in zip(use, groups):
            if not group:
                continue
            try:
                s.synchronize()
            except Exception as e:
                for k, *_ in group:
                    self._fail(errors, k, write, e)

    # -- report and close ------------------------------------------------------
    def report(self) -> IOPathReport:
        """Path ``mapped``; ``registered`` says whether the mappings are pinned for CUDA DMA (None: host slab)."""
        if self._registered:
            how = "memory-mapped, registered for CUDA DMA"
            registration = "pool mappings registered with cudaHostRegister: transfers are DMA"
        else:
            how = "memory-mapped, host copies"
            registration = "host slab: NumPy copies, no registration needed"
        n = len(self._maps)
        return IOPathReport(
            engine="mapped", path="mapped", direct_io=False, direct_io_reason=how,
            threads=self._threads, task_size=self._task, memory=self._memory, files=n,
            file_paths=("mapped",) * n, file_reasons=("RAM-backed file, mapped MAP_SHARED",) * n,
            bytes_by_path={"mapped/buffered": self._moved}, registered=True if self._registered else None,
            registration=registration)

    def close(self) -> None:
        """Wait for transfers in flight, then unregister and unmap every file."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._inflight:
                self._cond.wait()
        self._close_submitter()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for m in self._maps:
            m.close()
        self._maps = []
        self._registered = False
        self._buffer = None
