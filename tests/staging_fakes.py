"""Test doubles for ``gds_kvcache.io.staging``: a lane whose copies complete late, and late file I/O.

``DeferredLane`` stands in for a CUDA lane over a host slab. A copy it starts
does nothing until someone waits for it (``wait``, a ``ready`` that says yes,
``end``), and then copies what the source holds *at that moment*; a
device-to-host copy first poisons its slot. So a pipeline that writes a slot
before its copy completed writes poison, and one that refills a slot whose
host-to-device copy is still pending delivers another piece's bytes: both
show up as wrong bytes. Starting a copy on a slot whose last copy was never
waited for is recorded as a violation. Every step goes into a shared log, so
tests can check the order (copy of piece k+1 started before the write of
piece k).

``StrictLane`` (what ``deferred_factory`` makes) is stricter about the
host-to-device direction: a real DMA may read its source slot at any moment
between issue and completion, so it takes the slot's bytes at issue and
records a violation if the slot changes while the copy is pending (a
pipeline that starts the copy before the read filled the slot).

Both record as violations what a CUDA lane must never see: a call of a
batch (``begin``, copies, ``ready``, ``wait``, ``end``) on another thread
than its ``begin`` (``cuCtxPushCurrent`` is per thread), any call after
``close`` (the pool freed the slots), a ``begin`` inside a batch, and a
copy, ``ready`` or ``wait`` outside one.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gds_kvcache.errors import IOEngineError
from gds_kvcache.io.lane_pool import LanePool
from gds_kvcache.io.staging import FileIO, Lane
from gds_kvcache.memory.buffers import BounceBuffers

POISON = 0xEE


class Log:
    """Events from every lane and I/O object of a test, in order, thread-safe."""

    def __init__(self):
        self.events = []
        self.violations = []
        self._lock = threading.Lock()

    def add(self, *ev):
        with self._lock:
            self.events.append((threading.get_ident(),) + ev)


class DeferredLane(Lane):
    """A lane over a host slab whose copies happen only when waited for (see the module docstring).

    ``fail_copy`` (a set of copy numbers, counted per lane from 0): that copy's
    start raises ``IOEngineError``; ``fail_wait``: waiting for it raises. Each
    number fails once, on the first lane that gets there (lanes of one factory
    share the sets).
    """

    def __init__(self, bufs: BounceBuffers, first: int, depth: int, log: Log, seed: int = 0,
                 fail_copy=(), fail_wait=(), on_copy=None):
        self.depth = depth
        self.views = bufs.views[first:first + depth]
        self._arrs = [np.frombuffer(v, dtype=np.uint8) for v in self.views]
        self.log = log
        self._rnd = random.Random(seed)
        self._pending = {}
        self._slab = None
        self._n = 0
        self.fail_copy = fail_copy if isinstance(fail_copy, set) else set(fail_copy)
        self.fail_wait = fail_wait if isinstance(fail_wait, set) else set(fail_wait)
        self.begun = 0
        self.ended = 0
        self.closed = False
        self.afters = []  # per begin: whether the batch was ordered after the default stream
        self.on_copy = on_copy  # called as on_copy(lane, kind, k) before copy k starts
        self._thread = None

    def _check(self, what: str) -> None:
        if self.closed:
            self.log.violations.append(f"{what} on a closed lane")
        if what != "begin" and self._thread is None:
            self.log.violations.append(f"{what} outside a batch")
        elif what != "begin" and self._thread != threading.get_ident():
            self.log.violations.append(f"{what} on another thread than the batch's begin")

    def begin(self, buffer, after_default_stream: bool) -> None:
        self._check("begin")
        if self._thread is not None:
            self.log.violations.append("begin twice without end")
        self._thread = threading.get_ident()
        self._slab = buffer.host_array()
        self.begun += 1
        self.afters.append(after_default_stream)
        self.log.add("begin", id(self))

    def end(self) -> None:
        self._check("end")
        try:
            for slot in list(self._pending):
                self._complete(slot)
        finally:
            self._slab = None
            self._thread = None
            self.ended += 1
            self.log.add("end", id(self))

    def close(self) -> None:
        if self._thread is not None:
            self.log.violations.append("lane closed inside a batch")
        self.closed = True

    def _start(self, kind, slot, mem, n):
        self._check(kind)
        k = self._n
        if self.on_copy is not None:
            self.on_copy(self, kind, k)
        self._n += 1
        if slot in self._pending:
            self.log.violations.append(f"{kind} on slot {slot} while copy {self._pending[slot][3]} is pending")
        if k in self.fail_copy:
            self.fail_copy.discard(k)
            raise IOEngineError(f"injected failure starting copy {k}")
        if kind == "to_host":
            self._arrs[slot][:n] = POISON
        self._pending[slot] = (kind, mem, n, k)
        self.log.add(kind, id(self), slot, mem, n)

    def to_host(self, slot, mem_offset, nbytes) -> None:
        self._start("to_host", slot, mem_offset, nbytes)

    def to_device(self, slot, mem_offset, nbytes) -> None:
        self._start("to_device", slot, mem_offset, nbytes)

    def _complete(self, slot) -> None:
        kind, mem, n, k = self._pending.pop(slot)
        if kind == "to_host":
            self._arrs[slot][:n] = self._slab[mem:mem + n]
        else:
            self._slab[mem:mem + n] = self._arrs[slot][:n]
        self.log.add("copied", id(self), slot, mem, n)
        if k in self.fail_wait:
            self.fail_wait.discard(k)
            raise IOEngineError(f"injected failure of copy {k}")

    def ready(self, slot) -> bool:
        self._check("ready")
        if slot not in self._pending:
            return True
        if self._rnd.random() < 0.5:
            return False
        self._complete(slot)
        return True

    def wait(self, slot) -> None:
        self._check("wait")
        if slot in self._pending:
            self._complete(slot)


class StrictLane(DeferredLane):
    """A ``DeferredLane`` whose host-to-device copies take the slot's bytes at issue (see the module docstring)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._snap = {}

    def to_device(self, slot, mem_offset, nbytes) -> None:
        super().to_device(slot, mem_offset, nbytes)
        self._snap[slot] = self._arrs[slot][:nbytes].copy()

    def _complete(self, slot) -> None:
        kind, _, n, k = self._pending[slot]
        if kind == "to_device":
            snap = self._snap.pop(slot)
            if not np.array_equal(snap, self._arrs[slot][:n]):
                self.log.violations.append(f"slot {slot} changed while its host-to-device copy {k} was pending")
            self._arrs[slot][:n] = snap  # the bytes a DMA issued then could have taken
        super()._complete(slot)


def deferred_factory(log: Log, seed: int = 0, lane_cls=StrictLane, **fail):
    """A ``lane_factory`` making ``StrictLane`` pools for host slabs (what a CUDA slab would get).

    ``factory.lanes`` are the lanes made, ``factory.pools`` the pools.
    """
    made, pools = [], []

    def factory(buffer, lanes, depth, slot_bytes):
        bufs = BounceBuffers(lanes * depth, slot_bytes, "host")
        ls = [lane_cls(bufs, k * depth, depth, log, seed + k, **fail) for k in range(lanes)]
        made.extend(ls)
        pool = LanePool(ls, owned=[bufs], describe=f"{lanes} deferred lane(s) x {depth}")
        pools.append(pool)
        return pool

    factory.lanes, factory.pools = made, pools
    return factory


class DeferredIO(FileIO):
    """File I/O on one host array (the "file") that runs at ``finish`` or when ``done`` says yes.

    ``mode='sync'`` runs at ``start`` instead. ``fail`` maps a file offset to
    an exception raised by the piece at that offset; ``short`` is a set of file
    offsets whose operation moves half the bytes and reports it. ``in_flight``
    counts the operations started and not yet run (their bytes still to land).
    """

    def __init__(self, file: np.ndarray, log: Log, mode: str = "deferred", seed: int = 0, fail=None, short=()):
        self.file, self.log, self.mode = file, log, mode
        self._rnd = random.Random(seed)
        self.fail = dict(fail or {})
        self.short = set(short)
        self._pool = ThreadPoolExecutor(4) if mode == "threads" else None
        self._lock = threading.Lock()
        self.in_flight = 0

    def _run(self, write, piece, view):
        off, n = piece[3], piece[4]
        if off in self.fail:
            raise self.fail[off]
        m = n // 2 if off in self.short else n
        arr = np.frombuffer(view, dtype=np.uint8)
        if write:
            self.file[off:off + m] = arr[:m]
        else:
            arr[:m] = self.file[off:off + m]
        if m != n:
            raise IOEngineError(f"short {'write' if write else 'read'}: {m} of {n} bytes at {off}")
        self.log.add("io_done", piece[0], off, n)
        return True

    def start(self, write, piece, view):
        self.log.add("io_start", piece[0], piece[3], piece[4], write)
        h = {"args": (write, piece, view), "out": None, "fut": None}
        with self._lock:
            self.in_flight += 1
        if self.mode == "sync":
            self._settle(h)
        elif self.mode == "threads":
            h["fut"] = self._pool.submit(self._run, *h["args"])
        return h

    def _settle(self, h) -> None:
        if h["out"] is None:
            try:
                h["out"] = (self._run(*h["args"]), None) if h["fut"] is None else (h["fut"].result(), None)
            except Exception as e:  # noqa: BLE001
                h["out"] = (False, e)
            with self._lock:
                self.in_flight -= 1

    def done(self, h) -> bool:
        if h["out"] is not None:
            return True
        if self.mode == "threads":
            return h["fut"].done()
        if self._rnd.random() < 0.5:
            return False
        self._settle(h)
        return True

    def finish(self, h) -> bool:
        self._settle(h)
        direct, err = h["out"]
        if err is not None:
            raise err
        return direct

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
