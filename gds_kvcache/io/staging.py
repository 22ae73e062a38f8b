"""Staged transfers: GPU memory moved through host bounce buffers, the copy of one piece overlapping the I/O of another.

A *lane* is one worker's staging: ``depth`` host slots and an in-order
asynchronous copy engine between them and the slab (``cuda_lane.CudaLane``
is a CUDA stream and an event per slot). ``run_lane`` drives one lane over a
queue of pieces with a ``FileIO``: synchronous (the POSIX engine:
``pwritev``/``preadv`` in the worker thread, so depth 2 overlaps one copy
with one syscall) or asynchronous (KvikIO's host futures: one thread keeps
``depth - 1`` file operations in flight on KvikIO's pool). A put copies
piece k+1 off the GPU while piece k is written; a get reads piece k+1 while
piece k is copied to the GPU.

Invariants
----------
* A slot is refilled only after the copy into or out of it completed and
  its file I/O finished: a slot never holds two pieces' bytes at once.
* A put writes a piece only after its device-to-host copy completed; a get
  starts a piece's host-to-device copy only after its read returned all of
  its bytes. A span's error is the first one any of its pieces met.
* A failed or refused copy fails every span the lane touched in the call
  (after a CUDA error their bytes are unknown); a lane that cannot start
  fails every piece it takes off the queue. No piece is dropped silently.
* One rule for every engine on when a batch waits for the CUDA legacy
  default stream: a put does (``begin(..., after_default_stream=True)``:
  its copies start after the work queued there, so they read what producer
  kernels on that stream wrote, as KvikIO's own device path does); a get
  does not (waiting would queue layer-wise loads behind the model's
  kernels). So the caller must not hand a get slab bytes that queued work
  still reads, and must synchronise producers on other streams before a
  put.
* ``run_lane`` returns, or raises, only with nothing in flight: every file
  operation finished, every copy waited for. That holds for a
  ``BaseException`` too (``KeyboardInterrupt`` on the thread running a
  KvikIO batch): the lane drains, fails its spans, then re-raises it, so a
  lane given back never has a late read landing in a slot of the next batch.
  (A signal landing between two bytecodes of the pipeline's own bookkeeping
  can still lose a handle: the guarantee covers what the lane, the file I/O
  and their waits raise.)
* The lanes are shared through ``lane_pool.LanePool``: a batch holds a share
  of the pool it took its lane from until it gave the lane back.
"""

from __future__ import annotations

import abc
import logging
from collections import deque
from typing import Callable, Iterator, Optional

from ..errors import IOEngineError

__all__ = ["FileIO", "Lane", "SyncFileIO", "run_lane", "wait_out"]

log = logging.getLogger(__name__)

#: One piece of a batch: (span index, slab offset, file index, offset in the file, bytes).
Piece = tuple


class Lane(abc.ABC):
    """One worker's staging: ``depth`` host slots (``views``) and in-order async copies to and from the slab."""

    depth: int
    views: list  # memoryview per slot, each at least one piece long

    @abc.abstractmethod
    def begin(self, buffer, after_default_stream: bool) -> None:
        """Start a batch on the calling thread against ``buffer`` (the slab); pair with ``end``.

        With ``after_default_stream`` the batch's copies start only after the
        work queued on the legacy default stream so far (see the module's rule).
        """

    @abc.abstractmethod
    def end(self) -> None:
        """Wait for every copy and undo ``begin``; raises ``IOEngineError`` for a copy that failed."""

    @abc.abstractmethod
    def to_host(self, slot: int, mem_offset: int, nbytes: int) -> None:
        """Start copying slab bytes [mem_offset, +nbytes) into slot ``slot``."""

    @abc.abstractmethod
    def to_device(self, slot: int, mem_offset: int, nbytes: int) -> None:
        """Start copying the first ``nbytes`` of slot ``slot`` to slab bytes [mem_offset, +nbytes)."""

    @abc.abstractmethod
    def ready(self, slot: int) -> bool:
        """Whether the last copy started on ``slot`` is complete (never blocks)."""

    @abc.abstractmethod
    def wait(self, slot: int) -> None:
        """Block until the last copy started on ``slot`` is complete; ``IOEngineError`` if it failed."""

    def close(self) -> None:
        """Release what the lane holds (its slots belong to its pool)."""


class FileIO(abc.ABC):
    """One engine's file operations on host memory: ``start`` one piece, then ``done``/``finish`` it."""

    @abc.abstractmethod
    def start(self, write: bool, piece: Piece, view: memoryview):
        """Start moving ``view`` (the piece's bytes) to or from the file; returns a handle."""

    @abc.abstractmethod
    def done(self, handle) -> bool:
        """Whether ``finish(handle)`` would return without blocking."""

    @abc.abstractmethod
    def finish(self, handle) -> bool:
        """Wait for the operation; whether O_DIRECT carried it. Raises the piece's error."""


class SyncFileIO(FileIO):
    """A ``move(write, file_index, offset, view) -> direct`` callable run inside ``start``."""

    __slots__ = ("_move",)

    def __init__(self, move: Callable[[bool, int, int, memoryview], bool]):
        self._move = move

    def start(self, write, piece, view):
        try:
            return self._move(write, piece[2], piece[3], view), None
        except Exception as e:  # noqa: BLE001 - one piece's failure is its span's result
            return False, e

    def done(self, handle) -> bool:
        return True

    def finish(self, handle) -> bool:
        direct, err = handle
        if err is not None:
            raise err
        return direct


def wait_out(items, wait: Callable, done: Callable) -> None:
    """``wait(item)`` for every item until it returns or raises an ``Exception``, whatever else interrupts it.

    For the clean-up of a batch: a ``BaseException`` (``KeyboardInterrupt``)
    raised while waiting for an operation still running does not abandon it;
    it is waited for again (``done(item)`` says whether it is over), then the
    next. The first such interruption is raised once every item is over; an
    item's own ``Exception`` is its result, for the caller to have read before
    (it is not raised here).
    """
    interrupted: Optional[BaseException] = None
    for it in items:
        while True:
            try:
                wait(it)
                break
            except Exception:  # noqa: BLE001 - the item's result, read by the caller where it matters
                break
            except BaseException as e:  # noqa: BLE001 - re-raised below, once nothing runs
                interrupted = interrupted or e
                try:
                    if done(it):
                        break
                except Exception:  # noqa: BLE001 - an operation that cannot say is taken as over
                    break
    if interrupted is not None:
        raise interrupted


class _Pipeline:
    """One lane over a piece queue: slot bookkeeping for a put or a get (see the module's invariants)."""

    def __init__(self, lane: Lane, io: FileIO, errs: list):
        self.lane, self.io, self.errs = lane, io, errs
        self.free = deque(range(lane.depth))
        self.copying: deque = deque()  # put: (slot, piece) copied off the GPU; get: (slot, piece, direct)
        self.io_q: deque = deque()     # (slot, piece, handle): file operations started
        self.touched: set[int] = set()
        self.moved = [0, 0]            # bytes: O_DIRECT, buffered

    def _fail(self, i: int, e: BaseException) -> None:
        if self.errs[i] is None:
            self.errs[i] = e

    # -- put: copy to a slot, then write the slot ----------------------------------
    def put(self, pieces: Iterator[Piece]) -> None:
        lane, io, errs = self.lane, self.io, self.errs
        for p in pieces:
            if errs[p[0]] is not None:
                continue
            self.touched.add(p[0])
            while not self.free:
                if self.copying:
                    self._write_next()
                else:
                    self._retire_write()
            slot = self.free.popleft()
            lane.to_host(slot, p[1], p[4])
            self.copying.append((slot, p))
            if len(self.copying) > 1:
                self._write_next()  # the previous piece's write runs while this copy does
            while self.io_q and io.done(self.io_q[0][2]):
                self._retire_write()
        while self.copying:
            self._write_next()
        while self.io_q:
            self._retire_write()

    def _write_next(self) -> None:
        slot, p = self.copying.popleft()
        self.lane.wait(slot)
        if self.errs[p[0]] is not None:
            self.free.append(slot)
            return
        self.io_q.append((slot, p, self.io.start(True, p, self.lane.views[slot][:p[4]])))

    def _retire_write(self) -> None:
        slot, p, h = self.io_q[0]  # stays queued while finish may be interrupted: abort then waits for it
        try:
            direct = self.io.finish(h)
        except Exception as e:  # noqa: BLE001
            self._fail(p[0], e)
        else:
            self.moved[0 if direct else 1] += p[4]
        self.io_q.popleft()
        self.free.append(slot)

    # -- get: read into a slot, then copy the slot to the GPU ----------------------
    def get(self, pieces: Iterator[Piece]) -> None:
        lane, io, errs = self.lane, self.io, self.errs
        for p in pieces:
            if errs[p[0]] is not None:
                continue
            self.touched.add(p[0])
            while not self.free:
                if self.copying and (not self.io_q or lane.ready(self.copying[0][0])):
                    self._retire_copy()
                else:
                    self._read_done()
            slot = self.free.popleft()
            self.io_q.append((slot, p, io.start(False, p, lane.views[slot][:p[4]])))
            while self.io_q and io.done(self.io_q[0][2]):
                self._read_done()
        while self.io_q:
            self._read_done()
        while self.copying:
            self._retire_copy()

    def _read_done(self) -> None:
        slot, p, h = self.io_q[0]  # stays queued while finish may be interrupted: abort then waits for it
        try:
            direct = self.io.finish(h)
        except Exception as e:  # noqa: BLE001
            self.io_q.popleft()
            self._fail(p[0], e)
            self.free.append(slot)
            return
        self.io_q.popleft()
        if self.errs[p[0]] is not None:
            self.free.append(slot)
            return
        self.lane.to_device(slot, p[1], p[4])
        self.copying.append((slot, p, direct))

    def _retire_copy(self) -> None:
        slot, p, direct = self.copying.popleft()
        self.lane.wait(slot)
        self.free.append(slot)
        self.moved[0 if direct else 1] += p[4]

    # -- failure ----------------------------------------------------------------------
    def abort(self, e: BaseException) -> None:
        """After a copy failed or the batch was interrupted: wait for every file operation in flight (the
        copies are waited for by ``lane.end``), then fail every span this lane touched."""
        handles = [h for _, _, h in self.io_q]
        self.io_q.clear()
        self.copying.clear()
        err = e if isinstance(e, IOEngineError) else IOEngineError(f"GPU staging failed: {type(e).__name__}: {e}")
        for i in self.touched:
            self._fail(i, err)
        wait_out(handles, self.io.finish, self.io.done)


def run_lane(lane: Lane, write: bool, buffer, pieces: Iterator[Piece], io: FileIO, errs: list) -> list[int]:
    """Move pieces off the shared ``pieces`` queue through ``lane`` until it is empty; bytes [O_DIRECT, buffered].

    Every piece taken off the queue ends with its bytes moved or its span's
    entry in ``errs`` set; ``errs`` is shared with the other lanes of the
    batch. A lane that fails (to start, or a copy) fails what it touched and
    then every piece left in the queue: after a CUDA error the other lanes
    cannot do better, and a piece nobody moves must never pass for moved.
    A ``BaseException`` does the same, once nothing is in flight, and is then
    re-raised.
    """
    try:
        lane.begin(buffer, after_default_stream=write)  # the rule in the module docstring
    except Exception as e:  # noqa: BLE001 - a lane that cannot start fails what it takes, never drops it
        log.error("GPU staging lane failed to start: %s", e)
        _fail_rest(pieces, errs, e)
        return [0, 0]
    pipe = _Pipeline(lane, io, errs)
    try:
        (pipe.put if write else pipe.get)(pieces)
    except BaseException as e:  # noqa: BLE001 - a failed copy fails its spans, never the call
        if isinstance(e, Exception):
            log.error("GPU staging copy failed; failing %d span(s) and the rest of the batch: %s",
                      len(pipe.touched), e)
        try:
            pipe.abort(e)
        finally:
            try:
                _end(lane, pipe)
            finally:
                _fail_rest(pieces, errs, e)
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt and the like are the caller's, once nothing is in flight
        return pipe.moved
    failed = _end(lane, pipe)
    if failed is not None:
        _fail_rest(pieces, errs, failed)
    return pipe.moved


def _end(lane: Lane, pipe: _Pipeline) -> Optional[BaseException]:
    """``lane.end()``; its error fails the lane's spans (and is returned), nothing is left in flight."""
    try:
        lane.end()
    except Exception as e:  # noqa: BLE001
        log.error("GPU staging lane failed at the end of a batch: %s", e)
        pipe.abort(e)
        return e
    return None


def _fail_rest(pieces: Iterator[Piece], errs: list, e: BaseException) -> None:
    err = e if isinstance(e, IOEngineError) else IOEngineError(f"GPU staging failed: {e}")
    for p in pieces:
        if errs[p[0]] is None:
            errs[p[0]] = err
