"""``io.attachment``: an engine's slab, lanes and registration live as long as the last batch on them."""

import threading

import pytest

from gds_kvcache.errors import ClosedError, IOEngineError
from gds_kvcache.io.attachment import AttachPoint, Attachment
from gds_kvcache.io.lane_pool import LanePool
from gds_kvcache.memory.buffers import BounceBuffers, SlabBuffer
from gds_kvcache.units import KiB

from .staging_fakes import Log, StrictLane


def _pool():
    bufs = BounceBuffers(2, 64 * KiB, "host")
    lane = StrictLane(bufs, 0, 2, Log())
    return LanePool([lane], owned=[bufs]), lane, bufs


def test_old_attachment_goes_with_its_last_batch():
    point = AttachPoint("test")
    pool_a, lane_a, bufs_a = _pool()
    cleaned = []
    a = Attachment(SlabBuffer(64 * KiB, "host"), dev_base=4096, lanes=pool_a, cleanup=lambda: cleaned.append("a"))
    point.swap(a)
    batch = point.hold()  # a batch starts on a
    assert batch is a
    pool_b, _, _ = _pool()
    point.swap(Attachment(SlabBuffer(64 * KiB, "host"), lanes=pool_b))  # attach to another slab meanwhile
    assert point.current is not a
    # The batch still has a's lanes, slots and slab: nothing of a is gone.
    assert cleaned == [] and not lane_a.closed and bufs_a.views
    lane = batch.lanes.acquire()
    batch.lanes.release(lane)
    batch.release()  # the last batch on a ends: a goes, once
    assert cleaned == ["a"] and lane_a.closed and bufs_a.views == []
    assert not a.hold()
    point.close()
    assert pool_b._closed


def test_attach_point_refuses_after_close_and_before_attach():
    point = AttachPoint("test")
    with pytest.raises(IOEngineError, match="no slab attached"):
        point.hold()
    point.close()
    pool, lane, _ = _pool()
    cleaned = []
    with pytest.raises(ClosedError):
        point.swap(Attachment(SlabBuffer(64 * KiB, "host"), lanes=pool, cleanup=lambda: cleaned.append(1)))
    assert cleaned == [1] and lane.closed  # what an attach made after close is let go at once
    with pytest.raises(ClosedError):
        point.hold()


def test_concurrent_batches_and_attaches_free_each_attachment_once():
    point = AttachPoint("test")
    freed, made = [], []
    lock = threading.Lock()

    def new(k):
        pool, lane, _ = _pool()
        att = Attachment(SlabBuffer(4 * KiB, "host"), lanes=pool, cleanup=lambda: freed.append(k))
        with lock:
            made.append((att, lane))
        return att

    point.swap(new(0))
    errors = []

    def batches():
        for _ in range(300):
            att = point.hold()
            try:
                lane = att.lanes.acquire()  # never a closed lane: the attachment is held
                if lane.closed:
                    errors.append("closed lane handed to a batch")
                att.lanes.release(lane)
            finally:
                att.release()

    ts = [threading.Thread(target=batches) for _ in range(3)]
    for t in ts:
        t.start()
    for k in range(1, 60):
        point.swap(new(k))
    for t in ts:
        t.join()
    point.close()
    assert errors == [] and sorted(freed) == list(range(60))
    assert all(lane.closed for _, lane in made)
