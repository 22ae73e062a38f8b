"""The staging pipeline (``gds_kvcache.io.staging``) on CPU: lanes whose copies complete late, byte-exact.

The GPU parts (stream, events, async copies) are replaced by ``StrictLane``
(see ``staging_fakes``), so what is checked here is the scheduling: that no
slot is written out before its copy completed, none is refilled while a copy
still reads it, copies overlap file I/O in the promised order, a batch runs
on one thread, and every failure fails its span and nothing else. CUDA
lanes on a fake driver are ``test_cuda_lane``.
"""

import os
import random
import threading

import numpy as np
import pytest

from gds_kvcache.errors import ClosedError, IOEngineError
from gds_kvcache.io import staging
from gds_kvcache.io.lane_pool import LanePool
from gds_kvcache.io.staging import SyncFileIO, run_lane
from gds_kvcache.memory.buffers import BounceBuffers, SlabBuffer
from gds_kvcache.units import KiB, PAGE

from .staging_fakes import POISON, DeferredIO, DeferredLane, Log, StrictLane

SLOT = 64 * KiB


@pytest.fixture
def seed():
    return int.from_bytes(os.urandom(4), "little")


def make_pieces(r: random.Random, count: int, odd: bool):
    """``count`` pieces of random size (at most one slot) at distinct slab and file offsets; span = piece index
    // 3, so spans have several pieces."""
    pieces, mem, off = [], 0, 0
    for k in range(count):
        n = r.randint(1, SLOT) if odd else r.randint(1, SLOT // PAGE) * PAGE
        pieces.append((k // 3, mem, 0, off, n))
        mem += n + (r.randint(0, 3) * PAGE if not odd else r.randint(0, 5000))
        off += n + r.randint(0, 2) * PAGE
    return pieces, mem, off


def lanes(count, depth, log, seed, kind="host", **fail):
    bufs = BounceBuffers(count * depth, SLOT, kind)
    made = [StrictLane(bufs, k * depth, depth, log, seed + k, **fail) for k in range(count)]
    return LanePool(made, owned=[bufs]), made


def run_workers(pool: LanePool, workers: int, write, slab, pieces, io, errs):
    queue = iter(pieces)
    out = []

    def work():
        lane = pool.acquire()
        try:
            out.append(run_lane(lane, write, slab, queue, io, errs))
        finally:
            pool.release(lane)

    ts = [threading.Thread(target=work) for _ in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


@pytest.mark.parametrize("mode", ["sync", "deferred", "threads"])
@pytest.mark.parametrize("depth", [2, 3, 5])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("odd", [False, True])
def test_round_trip_byte_exact(mode, depth, workers, odd, seed):
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = make_pieces(r, 60, odd)
    src, dst = SlabBuffer(mem, "host"), SlabBuffer(mem, "host")
    src.host_array()[:] = g.integers(0, 256, src.nbytes, dtype=np.uint8)
    dst.host_array()[:] = g.integers(0, 256, dst.nbytes, dtype=np.uint8)
    file = np.zeros(off, dtype=np.uint8)
    log = Log()
    io = DeferredIO(file, log, mode, seed)
    pool, made = lanes(workers, depth, log, seed)
    errs = [None] * (len(pieces) // 3 + 1)
    moved = run_workers(pool, workers, True, src, pieces, io, errs)
    assert errs == [None] * len(errs) and sum(m[0] for m in moved) == sum(p[4] for p in pieces)
    for _, m, _, o, n in pieces:
        assert np.array_equal(file[o:o + n], src.host_array()[m:m + n])
    run_workers(pool, workers, False, dst, pieces, io, errs)
    assert errs == [None] * len(errs)
    for _, m, _, _, n in pieces:
        assert np.array_equal(dst.host_array()[m:m + n], src.host_array()[m:m + n])
    assert log.violations == [] and io.in_flight == 0
    assert all(lane.begun == lane.ended for lane in made)
    io.close()
    pool.close()


def _lane_events(log, kinds):
    return [e[1:] for e in log.events if e[1] in kinds]


def test_put_copies_the_next_piece_before_writing_this_one(seed):
    # One lane, synchronous writes (the POSIX engine): D2H of piece k+1 is started before pwrite of piece k.
    r = random.Random(seed)
    pieces, mem, off = make_pieces(r, 12, False)
    pieces = [(k, *p[1:]) for k, p in enumerate(pieces)]
    slab = SlabBuffer(mem, "host")
    log = Log()
    io = DeferredIO(np.zeros(off, dtype=np.uint8), log, "sync")
    pool, _ = lanes(1, 2, log, seed)
    errs = [None] * len(pieces)
    run_workers(pool, 1, True, slab, pieces, io, errs)
    ev = _lane_events(log, {"to_host", "io_start"})
    copy_at = {e[3]: i for i, e in enumerate(ev) if e[0] == "to_host"}   # slab offset -> position
    write_at = {e[2]: i for i, e in enumerate(ev) if e[0] == "io_start"}  # file offset -> position
    for k in range(len(pieces) - 1):
        assert copy_at[pieces[k + 1][1]] < write_at[pieces[k][3]], f"piece {k + 1} copied after piece {k} was written"
    pool.close()


def test_get_reads_the_next_piece_before_its_copy_completes(seed):
    # One lane, synchronous reads: pread of piece k+1 starts while the H2D copy of piece k is still pending.
    r = random.Random(seed)
    pieces, mem, off = make_pieces(r, 12, False)
    pieces = [(k, *p[1:]) for k, p in enumerate(pieces)]
    slab = SlabBuffer(mem, "host")
    log = Log()
    io = DeferredIO(np.zeros(off, dtype=np.uint8), log, "sync")
    pool, made = lanes(1, 2, log, seed)
    made[0].ready = lambda slot: slot not in made[0]._pending  # never completes a copy early
    run_workers(pool, 1, False, slab, pieces, io, [None] * len(pieces))
    ev = _lane_events(log, {"to_device", "copied", "io_start"})
    for k in range(len(pieces) - 1):
        m = pieces[k][1]
        copied = next(i for i, e in enumerate(ev) if e[0] == "copied" and e[3] == m)
        read_next = next(i for i, e in enumerate(ev) if e[0] == "io_start" and e[2] == pieces[k + 1][3])
        assert read_next < copied, f"piece {k + 1} read only after piece {k}'s copy completed"
    assert log.violations == []
    pool.close()


@pytest.mark.parametrize("mode", ["sync", "deferred", "threads"])
@pytest.mark.parametrize("what", ["error", "short"])
def test_failed_write_fails_its_span_only(mode, what, seed):
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = make_pieces(r, 45, False)
    src = SlabBuffer(mem, "host")
    src.host_array()[:] = g.integers(0, 256, src.nbytes, dtype=np.uint8)
    file = np.zeros(off, dtype=np.uint8)
    bad = r.sample(range(len(pieces)), 4)
    log = Log()
    enospc = IOEngineError(28, "No space left on device")
    io = DeferredIO(file, log, mode, seed, fail={pieces[b][3]: enospc for b in bad} if what == "error" else None,
                    short={pieces[b][3] for b in bad} if what == "short" else ())
    pool, _ = lanes(2, 3, log, seed)
    errs = [None] * 15
    run_workers(pool, 2, True, src, pieces, io, errs)
    bad_spans = {pieces[b][0] for b in bad}
    for s in range(15):
        if s in bad_spans:
            assert isinstance(errs[s], IOEngineError)
        else:
            assert errs[s] is None
    for i, m, _, o, n in pieces:
        if i not in bad_spans:
            assert np.array_equal(file[o:o + n], src.host_array()[m:m + n])
    assert log.violations == []
    pool.close()


@pytest.mark.parametrize("mode", ["sync", "deferred"])
def test_failed_read_never_reaches_the_slab(mode, seed):
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = make_pieces(r, 30, False)
    file = g.integers(0, 256, off, dtype=np.uint8)
    dst = SlabBuffer(mem, "host")
    dst.host_array()[:] = 7
    bad = set(r.sample(range(len(pieces)), 3))
    log = Log()
    io = DeferredIO(file, log, mode, seed, short={pieces[b][3] for b in bad})
    pool, _ = lanes(1, 2, log, seed)
    errs = [None] * 10
    run_workers(pool, 1, False, dst, pieces, io, errs)
    bad_spans = {pieces[b][0] for b in bad}
    assert {s for s in range(10) if errs[s] is not None} == bad_spans
    for k, (i, m, _, o, n) in enumerate(pieces):
        if k in bad:  # a short read copies nothing to the slab, not even the half it got
            assert (dst.host_array()[m:m + n] == 7).all()
        elif i not in bad_spans:
            assert np.array_equal(dst.host_array()[m:m + n], file[o:o + n])
    pool.close()


@pytest.mark.parametrize("write", [True, False])
@pytest.mark.parametrize("where", ["fail_copy", "fail_wait"])
def test_failed_copy_fails_every_span_the_lane_touched(write, where, seed):
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = make_pieces(r, 30, False)
    slab = SlabBuffer(mem, "host")
    slab.host_array()[:] = g.integers(0, 256, slab.nbytes, dtype=np.uint8)
    file = np.zeros(off, dtype=np.uint8)
    log = Log()
    io = DeferredIO(file, log, "deferred", seed)
    k = r.randint(0, 20)
    pool, made = lanes(1, 3, log, seed, **{where: {k}})
    errs = [None] * 10
    run_workers(pool, 1, write, slab, pieces, io, errs)
    failed = {s for s in range(10) if errs[s] is not None}
    assert failed and all(isinstance(errs[s], IOEngineError) for s in failed)
    # The copy that failed belongs to a failed span, and every span not failed moved exactly.
    for i, m, _, o, n in pieces:
        if i not in failed and write:
            assert np.array_equal(file[o:o + n], slab.host_array()[m:m + n])
    assert not (file == POISON).all()
    assert made[0].begun == made[0].ended == 1
    pool.close()


def test_lane_that_cannot_start_fails_what_it_takes(seed):
    r = random.Random(seed)
    pieces, mem, off = make_pieces(r, 9, False)
    log = Log()
    pool, made = lanes(1, 2, log, seed)

    def refuse(buffer, *after):
        raise IOEngineError("no context")

    made[0].begin = refuse
    errs = [None] * 3
    moved = run_workers(pool, 1, True, SlabBuffer(mem, "host"), pieces, DeferredIO(np.zeros(off, np.uint8), log),
                        errs)
    assert moved == [[0, 0]] and all(isinstance(e, IOEngineError) for e in errs)
    pool.close()


def test_sync_file_io_keeps_the_error_of_its_piece():
    def move(write, fi, off, view):
        if off == 4096:
            raise IOEngineError(5, "EIO")
        return off % 8192 == 0

    io = SyncFileIO(move)
    v = memoryview(bytearray(10))
    assert io.finish(io.start(True, (0, 0, 0, 0, 10), v)) is True
    h = io.start(True, (1, 0, 0, 4096, 10), v)
    assert io.done(h)
    with pytest.raises(IOEngineError, match="EIO"):
        io.finish(h)


def test_lane_pool_blocks_until_a_lane_is_free_and_refuses_after_close():
    log = Log()
    pool, made = lanes(2, 2, log, 0)
    a, b = pool.acquire(), pool.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire()))
    t.start()
    t.join(0.05)
    assert t.is_alive() and got == []  # both lanes held: the third caller waits
    pool.release(a)
    t.join()
    assert got == [a]
    pool.release(b)
    pool.release(a)
    pool.close()
    with pytest.raises(ClosedError):
        pool.acquire()


def test_lane_pool_hands_a_released_lane_to_the_longest_waiter():
    pool, made = lanes(1, 2, Log(), 0)
    held = pool.acquire()
    order = []
    ts = []
    for k in range(3):
        def take(k=k):
            lane = pool.acquire()
            order.append(k)
            pool.release(lane)

        t = threading.Thread(target=take)
        ts.append(t)
        t.start()
        while len(pool._waiters) < k + 1:  # wait until thread k queues, so the queue order is known
            threading.Event().wait(0.001)
    pool.release(held)
    # The releasing thread asks again at once: it must queue behind the three waiters.
    again = pool.acquire()
    assert order == [0, 1, 2] and again is held
    for t in ts:
        t.join()
    pool.release(again)
    pool.close()


def test_shared_lane_pool_closes_with_its_last_user():
    closed = []
    bufs = BounceBuffers(2, SLOT, "host")
    made = [DeferredLane(bufs, 0, 2, Log())]
    pool = LanePool(made, owned=[bufs], on_close=closed.append)
    assert pool.share()
    pool.close()  # one of two users gone: the lanes stay
    lane = pool.acquire()
    assert lane is made[0] and bufs.views and closed == []
    pool.release(lane)
    pool.close()
    assert closed == [pool] and bufs.views == []
    assert not pool.share()  # a closed pool takes no new user: the factory makes a new one
    with pytest.raises(ClosedError):
        pool.acquire()


def test_cuda_lane_entry_points_exist_in_the_driver():
    # Binding needs no GPU, only libcuda.so.1 (scripts/run-tests.sh fetches one): a misspelt name fails here.
    import ctypes

    from gds_kvcache.io.cuda_lane import _Api

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        pytest.skip(f"no libcuda.so.1: {e}")
    api = _Api("libcuda.so.1")
    assert api.dtoh.argtypes and api.event_sync.restype is ctypes.c_int
    with pytest.raises(IOEngineError, match="CUDA error 600"):
        api.check(600, "probe")


def _h2d_before_read(self):
    """A plausible regression of ``_Pipeline._read_done``: the copy started before the read is known complete."""
    slot, p, h = self.io_q.popleft()
    self.lane.to_device(slot, p[1], p[4])
    self.copying.append((slot, p, True))
    self.io.finish(h)


def test_strict_lane_sees_a_copy_started_before_its_read(monkeypatch, seed):
    # DeferredLane copies a slot only when waited for, so it passes this pipeline byte-exactly; a DMA
    # may read the slot at issue, so on a GPU it moves stale bytes. The fake the tests use must fail it.
    r = random.Random(seed)
    pieces, mem, off = make_pieces(r, 12, False)
    file = np.random.default_rng(seed).integers(0, 256, off, dtype=np.uint8)
    monkeypatch.setattr(staging._Pipeline, "_read_done", _h2d_before_read)
    log = Log()
    io = DeferredIO(file, log, "deferred", seed)
    io.done = lambda h: h["out"] is not None  # a read lands only when finished
    pool, made = lanes(1, 2, log, seed)
    run_workers(pool, 1, False, SlabBuffer(mem, "host"), pieces, io, [None] * 4)
    assert any("changed while its host-to-device copy" in v for v in log.violations)
    pool.close()


def test_fake_lane_sees_a_batch_that_changes_threads():
    # cuCtxPushCurrent is per thread: a CUDA lane's copies must run on the thread that began the batch.
    log = Log()
    pool, made = lanes(1, 2, log, 0)
    lane = made[0]
    slab = SlabBuffer(SLOT, "host")
    lane.begin(slab, False)
    t = threading.Thread(target=lambda: (lane.to_host(0, 0, PAGE), lane.wait(0)))
    t.start()
    t.join()
    lane.end()
    assert log.violations == ["to_host on another thread than the batch's begin",
                              "wait on another thread than the batch's begin"]
    pool.close()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, GeneratorExit, SystemExit])
@pytest.mark.parametrize("write", [True, False])
def test_base_exception_waits_for_the_file_io_in_flight(exc, write, seed):
    # Ctrl-C in the middle of a batch (KvikIO batches run the lane on the caller's thread): run_lane
    # raises it only once no file operation can still land in a slot, so the lane is safe to reuse.
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = make_pieces(r, 30, False)
    file = g.integers(0, 256, off, dtype=np.uint8)
    slab = SlabBuffer(mem, "host")
    slab.host_array()[:] = g.integers(0, 256, slab.nbytes, dtype=np.uint8)
    log = Log()
    io = DeferredIO(file.copy(), log, "deferred", seed)
    io.done = lambda h: h["out"] is not None  # in flight until finished
    # A put is stopped at its 4th copy (2 writes in flight), a get at its first (3 reads in flight).
    at = 3 if write else 0

    def interrupt(lane, kind, k):
        if k == at:
            raise exc()

    bufs = BounceBuffers(4, SLOT, "host")
    lane = StrictLane(bufs, 0, 4, log, seed, on_copy=interrupt)
    pool = LanePool([lane], owned=[bufs])
    errs = [None] * 10
    with pytest.raises(exc):
        run_workers_raising(pool, write, slab, pieces, io, errs)
    assert io.in_flight == 0 and lane.begun == lane.ended == 1 and log.violations == []
    assert all(isinstance(e, IOEngineError) for e in errs)  # nothing passes for moved
    # The lane goes on: the next batch through it is byte-exact.
    lane.on_copy = None
    errs = [None] * 10
    run_workers(pool, 1, False, slab, pieces, io, errs)
    assert errs == [None] * 10 and log.violations == []
    for _, m, _, o, n in pieces:
        assert np.array_equal(slab.host_array()[m:m + n], io.file[o:o + n])
    pool.close()


def run_workers_raising(pool, write, slab, pieces, io, errs):
    """One worker on the calling thread, as a KvikIO batch runs: what it raises comes out here."""
    lane = pool.acquire()
    try:
        return run_lane(lane, write, slab, iter(pieces), io, errs)
    finally:
        pool.release(lane)


def test_lane_handed_over_as_the_pool_closes_is_refused():
    # A waiter handed a lane, woken only after the last user closed the pool, must not get a closed lane.
    pool, made = lanes(1, 2, Log(), 0)
    held = pool.acquire()
    got = []

    def take():
        try:
            got.append(pool.acquire())
        except ClosedError as e:
            got.append(e)

    t = threading.Thread(target=take)
    t.start()
    while not pool._waiters:
        threading.Event().wait(0.001)
    waiter = pool._waiters[0]
    blocked_on, waiter.event = waiter.event, threading.Event()  # release's wake-up does not reach it yet
    pool.release(held)
    assert waiter.lane is held
    pool.close()
    blocked_on.set()  # it runs only now, after the close
    t.join()
    assert len(got) == 1 and isinstance(got[0], ClosedError)


class _MisalignedPinned:
    """Stands in for ``cuMemHostAlloc``, which promises only 256-byte alignment: gives page + 256."""

    made = []

    def __init__(self, nbytes: int, device: int):
        import ctypes

        self._raw = ctypes.create_string_buffer(nbytes + 2 * PAGE)
        addr = ctypes.addressof(self._raw)
        self.ptr = addr + (-addr) % PAGE + 256
        self.nbytes = nbytes
        self.freed = []
        _MisalignedPinned.made.append(self)

    def free(self) -> None:
        self.freed.append(self.ptr)


def test_pinned_slots_are_page_aligned_whatever_the_allocation(monkeypatch):
    # O_DIRECT needs 4 KiB-aligned buffers; the slots are carved from one pinned allocation that the driver
    # may align to 256 bytes only.
    from gds_kvcache.memory import buffers

    monkeypatch.setattr(buffers, "_PinnedHostMemory", _MisalignedPinned)
    _MisalignedPinned.made.clear()
    bufs = BounceBuffers(3, SLOT + 100, "pinned")
    (mem,) = _MisalignedPinned.made
    assert bufs.size == SLOT + PAGE and bufs.base % PAGE == 0
    for i in range(3):
        a = bufs.addr(i)
        assert a % PAGE == 0 and mem.ptr <= a and a + bufs.size <= mem.ptr + mem.nbytes
        assert len(bufs.views[i]) == bufs.size
        bufs.views[i][:] = bytes([i + 1]) * bufs.size  # every slot byte is inside the allocation
    bufs.close()
    assert mem.freed == [mem.ptr]  # freed at the pointer the driver gave, not the rounded one
