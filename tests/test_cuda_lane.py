"""``CudaLane``'s own logic on the CPU, on a fake driver (``fake_cuda_driver``): streams, events, contexts.

The fake runs each stream in order and only when waited for, poisons a
device-to-host copy's bytes until it ran and takes a host-to-device copy's
source at issue, so what is checked here is what a GPU would show as wrong
bytes: a slot's event recorded before its copy, ``end`` leaving copies
queued, a put that does not wait for the default stream's work, a call on a
thread without the lane's context. The ``test_fake_driver_*`` tests keep the
fake honest: a lane broken in each of those ways must fail.
"""

import os
import random
import threading

import numpy as np
import pytest

from gds_kvcache.errors import IOEngineError
from gds_kvcache.io import cuda_lane
from gds_kvcache.io.cuda_lane import CudaLane
from gds_kvcache.io.lane_pool import LanePool
from gds_kvcache.io.staging import run_lane
from gds_kvcache.memory.buffers import BounceBuffers, SlabBuffer
from gds_kvcache.units import KiB, PAGE

from .fake_cuda_driver import LEGACY, FakeDriver
from .staging_fakes import DeferredIO, Log

SLOT = 64 * KiB


@pytest.fixture
def seed():
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def driver(monkeypatch, seed):
    drv = FakeDriver(seed)
    monkeypatch.setattr(cuda_lane._Api, "_inst", drv)
    return drv


def lane_pool(driver, count, depth, cls=CudaLane):
    bufs = BounceBuffers(count * depth, SLOT, "host")
    driver.add_region(bufs.base, bufs.nbytes)
    made = [cls(bufs, k * depth, depth, 0) for k in range(count)]
    return LanePool(made, owned=[bufs]), made


def slab(driver, nbytes, g):
    buf = SlabBuffer(nbytes, "host")
    buf.host_array()[:] = g.integers(0, 256, buf.nbytes, dtype=np.uint8)
    driver.add_region(buf.tensor.data_ptr(), buf.nbytes)
    return buf


def pieces_for(r, count):
    """Pieces of random page-multiple sizes up to a slot, packed in the slab and the file; span = index // 3."""
    pieces, mem, off = [], 0, 0
    for k in range(count):
        n = r.randint(1, SLOT // PAGE) * PAGE
        pieces.append((k // 3, mem, 0, off, n))
        mem += n + r.randint(0, 2) * PAGE
        off += n + r.randint(0, 1) * PAGE
    return pieces, mem, off


def run_workers(pool, workers, write, buf, pieces, io, errs):
    queue = iter(pieces)

    def work():
        lane = pool.acquire()
        try:
            run_lane(lane, write, buf, queue, io, errs)
        finally:
            pool.release(lane)

    ts = [threading.Thread(target=work) for _ in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def assert_clean(driver):
    """Nothing queued, every context popped."""
    assert driver.violations == []
    assert driver.pending() == 0
    assert all(d == 0 for d in driver.ctx_depth.values())


def round_trip(driver, seed, workers, depth, mode, cls=CudaLane):
    """Put then get ``cls`` lanes' worth of pieces; (put errors, get errors, file ok, slab ok)."""
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = pieces_for(r, 36)
    src, dst = slab(driver, mem, g), slab(driver, mem, g)
    file = np.zeros(off, dtype=np.uint8)
    io = DeferredIO(file, Log(), mode, seed)
    pool, made = lane_pool(driver, workers, depth, cls)
    put_errs, get_errs = [None] * 12, [None] * 12
    run_workers(pool, workers, True, src, pieces, io, put_errs)
    file_ok = all(np.array_equal(file[o:o + n], src.host_array()[m:m + n]) for _, m, _, o, n in pieces)
    run_workers(pool, workers, False, dst, pieces, io, get_errs)
    slab_ok = all(np.array_equal(dst.host_array()[m:m + n], file[o:o + n]) for _, m, _, o, n in pieces)
    io.close()
    return pool, put_errs, get_errs, file_ok, slab_ok


@pytest.mark.parametrize("mode", ["sync", "threads"])
@pytest.mark.parametrize("depth", [2, 4])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("progress", [0.0, 0.5])
def test_cuda_lane_round_trip_byte_exact(driver, seed, mode, depth, workers, progress):
    driver.progress = progress  # 0: copies complete only when waited for; 0.5: queries see some done early
    pool, put_errs, get_errs, file_ok, slab_ok = round_trip(driver, seed, workers, depth, mode)
    assert put_errs == [None] * 12 and get_errs == [None] * 12 and file_ok and slab_ok
    assert_clean(driver)
    pool.close()
    # Every stream and event destroyed, every primary-context retain released.
    assert set(driver.streams) == {LEGACY} and driver.events == {}
    assert driver.retained == driver.released == workers


def test_put_waits_for_the_default_stream_and_get_does_not(driver, seed):
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = pieces_for(r, 9)
    buf = slab(driver, mem, g)
    produced = g.integers(0, 256, buf.nbytes, dtype=np.uint8)
    # A producer kernel queued on the default stream, not run yet: the put must write what it writes.
    driver.launch(LEGACY, lambda: buf.host_array().__setitem__(slice(None), produced))
    file = np.zeros(off, dtype=np.uint8)
    io = DeferredIO(file, Log(), "sync", seed)
    pool, _ = lane_pool(driver, 1, 2)
    errs = [None] * 3
    run_workers(pool, 1, True, buf, pieces, io, errs)
    assert errs == [None] * 3
    for _, m, _, o, n in pieces:
        assert np.array_equal(file[o:o + n], produced[m:m + n])
    # A get does not wait: work queued on the default stream stays queued through it.
    ran = []
    driver.launch(LEGACY, lambda: ran.append(1))
    buf.host_array()[:] = 0
    run_workers(pool, 1, False, buf, pieces, io, errs)
    assert errs == [None] * 3 and ran == [] and driver.pending(LEGACY) == 1
    for _, m, _, o, n in pieces:
        assert np.array_equal(buf.host_array()[m:m + n], file[o:o + n])
    assert driver.violations == []
    pool.close()


@pytest.mark.parametrize("write", [True, False])
@pytest.mark.parametrize("where", ["fail_issue", "fail_event"])
def test_failed_copy_leaves_nothing_queued(driver, seed, write, where):
    # A copy that fails (at issue, or when waited for) with others still queued: the spans fail, and the
    # lane's end synchronises the stream, so no copy outlives the batch.
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = pieces_for(r, 12)
    buf = slab(driver, mem, g)
    file = g.integers(0, 256, off, dtype=np.uint8)
    io = DeferredIO(file, Log(), "sync", seed)
    getattr(driver, where).add(2)
    pool, made = lane_pool(driver, 1, 4)
    errs = [None] * 4
    run_workers(pool, 1, write, buf, pieces, io, errs)
    assert all(isinstance(e, IOEngineError) for e in errs)
    assert_clean(driver)
    # The lane goes on: the next batch through it is byte-exact.
    errs = [None] * 4
    run_workers(pool, 1, False, buf, pieces, io, errs)
    assert errs == [None] * 4
    for _, m, _, o, n in pieces:
        assert np.array_equal(buf.host_array()[m:m + n], file[o:o + n])
    assert_clean(driver)
    pool.close()


def test_copy_on_a_thread_without_the_lane_context_fails(driver):
    # cuCtxPushCurrent is per thread: the fake refuses a copy on a thread where begin did not run.
    pool, (lane,) = lane_pool(driver, 1, 2)
    buf = slab(driver, PAGE, np.random.default_rng(0))
    lane.begin(buf, False)
    out = []

    def copy():
        try:
            lane.to_host(0, 0, PAGE)
        except IOEngineError as e:
            out.append(e)

    t = threading.Thread(target=copy)
    t.start()
    t.join()
    lane.end()
    assert len(out) == 1 and "CUDA error 201" in str(out[0])
    assert driver.violations == ["cuMemcpyDtoHAsync without a current context on this thread"]
    pool.close()


# -- the fake must fail lanes that are wrong on a GPU ------------------------------------------


class _EventFirst(CudaLane):
    """Records the slot's event before starting its copy: the event completes before the copy."""

    def to_host(self, slot, mem_offset, nbytes):
        api = self._api
        api.check(api.record(self._events[slot], self._stream), "cuEventRecord")
        api.check(api.dtoh(self._addr[slot], self._slab + mem_offset, nbytes, self._stream), "cuMemcpyDtoHAsync")

    def to_device(self, slot, mem_offset, nbytes):
        api = self._api
        api.check(api.record(self._events[slot], self._stream), "cuEventRecord")
        api.check(api.htod(self._slab + mem_offset, self._addr[slot], nbytes, self._stream), "cuMemcpyHtoDAsync")


class _NoSync(CudaLane):
    """Ends a batch without synchronising its stream."""

    def end(self):
        self._pop()


def test_fake_driver_fails_a_lane_recording_events_before_copies(driver, seed):
    pool, put_errs, get_errs, file_ok, slab_ok = round_trip(driver, seed, 1, 2, "sync", _EventFirst)
    # The put writes its slots before their copies ran (poison); the get reads into a slot whose queued
    # copy still has to take it.
    assert put_errs == [None] * 12 and not file_ok
    assert any("changed while its host-to-device copy was queued" in v for v in driver.violations)
    pool.close()


def test_fake_driver_fails_a_lane_whose_end_does_not_synchronise(driver, seed):
    r, g = random.Random(seed), np.random.default_rng(seed)
    pieces, mem, off = pieces_for(r, 12)
    buf = slab(driver, mem, g)
    io = DeferredIO(g.integers(0, 256, off, dtype=np.uint8), Log(), "sync", seed)
    driver.fail_issue.add(2)  # copies 0 and 1 are queued when copy 2 fails: only end can wait for them
    pool, (lane,) = lane_pool(driver, 1, 4, _NoSync)
    run_workers(pool, 1, False, buf, pieces, io, [None] * 4)
    assert driver.pending(lane._stream) > 0  # copies 0 and 1 and their events, still queued after the batch
    lane._push()
    driver.stream_sync(lane._stream)  # let the queued copies run before the memory goes
    lane._pop()
    pool.close()
