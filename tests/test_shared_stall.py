"""A stalled Redis (SIGSTOP) costs one socket timeout per back-off period, not one per call."""

import os
import signal
import time

import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineKey, SlabMemoryAllocator
from gds_kvcache.units import GB, MiB

redis = pytest.importorskip("redis", reason="the 'redis' client package is not installed (pip install redis)")

from gds_kvcache.shared import LocalRedis, SharedDiskBackend, find_redis_server  # noqa: E402


def key(i):
    return CacheEngineKey("vllm", "stall", 1, 0, 500 + i)


@pytest.fixture
def paused_redis():
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (scripts/ci-redis.sh installs one)")
    r = LocalRedis()
    yield r
    os.kill(r.proc.pid, signal.SIGCONT)
    r.stop()


def test_a_stalled_redis_is_waited_for_once_per_backoff(tmp_path, paused_redis):
    timeout, backoff = 0.5, 30.0
    cfg = CacheEngineConfig(local_disk=str(tmp_path), max_local_disk_size=16 * MiB / GB, io_engine="posix",
                            io_threads=2, lookup_server_url=paused_redis.url, redis_socket_timeout=timeout,
                            redis_backoff=backoff, writer_id="w0")
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    b = SharedDiskBackend(cfg, None, alloc)
    try:
        o = alloc.allocate((1024,), torch.float32)
        o.tensor.copy_(torch.randn(1024))
        assert b.batched_put([key(0)], [o]) == [4096]
        want = o.tensor.clone()
        o.ref_count_down()
        os.kill(paused_redis.proc.pid, signal.SIGSTOP)
        spent = []
        for i in range(6):       # lookups, gets, puts and removes of a serving engine
            t0 = time.monotonic()
            assert b.batched_contains([key(0)]) == 0                  # a miss, never a crash
            got = b.batched_get_blocking([key(0)])[0]                 # this writer's own chunk: still served
            assert got is not None and torch.equal(got.tensor, want)
            got.ref_count_down()
            p = alloc.allocate((1024,), torch.float32)
            p.tensor.zero_()
            b.batched_put([key(10 + i)], [p])
            p.ref_count_down()
            b.remove(key(10 + i))
            spent.append(time.monotonic() - t0)
        # All calls together waited for Redis at most a couple of socket timeouts (the first call
        # that met the stall, and a put or remove already past the gate when it tripped), never
        # one per call: 6 rounds of 4 calls would be 24 timeouts.
        assert sum(spent) < 4 * timeout + 4.0, spent
        assert b.stats["redis_timeouts"] == 1
        os.kill(paused_redis.proc.pid, signal.SIGCONT)
        t0 = time.monotonic()
        b.close()
        assert time.monotonic() - t0 < 2 * timeout + 2.0
    finally:
        os.kill(paused_redis.proc.pid, signal.SIGCONT)
        b.close()
        alloc.close()


def test_a_remove_redis_did_not_hear_of_wins_over_the_entry_it_still_lists(tmp_path, paused_redis):
    timeout = 0.5
    cfg = lambda wid: CacheEngineConfig(local_disk=str(tmp_path), max_local_disk_size=16 * MiB / GB,  # noqa: E731
                                        io_engine="posix", io_threads=2, lookup_server_url=paused_redis.url,
                                        redis_socket_timeout=timeout, redis_backoff=0.5, writer_id=wid)
    walloc, ralloc = SlabMemoryAllocator(8 * MiB, "host"), SlabMemoryAllocator(8 * MiB, "host")
    w = SharedDiskBackend(cfg("w0"), None, walloc)
    r = SharedDiskBackend(cfg("r0"), None, ralloc)
    try:
        o = walloc.allocate((1024,), torch.float32)
        o.tensor.copy_(torch.randn(1024))
        assert w.batched_put([key(0)], [o]) == [4096]
        o.ref_count_down()
        got = r.batched_get_blocking([key(0)])[0]
        assert got is not None
        got.ref_count_down()
        real = w.redis.retract

        def cut_off(*a, **kw):         # this writer cannot reach Redis; the reader still can
            raise redis.ConnectionError("partitioned")
        w.redis.retract = cut_off
        assert w.remove(key(0)) is True
        # Until the retraction lands, Redis still lists version 1; reading it must not give it back.
        assert r.batched_get_blocking([key(0)]) == [None]
        assert w.stats["removed_unretracted"] == 1
        w.redis.retract = real
        deadline = time.monotonic() + 10          # housekeeping retracts it once Redis answers
        while r.batched_contains([key(0)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.batched_contains([key(0)]) == 0
    finally:
        os.kill(paused_redis.proc.pid, signal.SIGCONT)
        r.close()
        w.close()
        walloc.close()
        ralloc.close()


def test_a_writer_that_never_reached_redis_stores_locally_and_publishes_later(tmp_path):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (scripts/ci-redis.sh installs one)")
    from gds_kvcache.shared.local_redis import _free_port
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cfg = lambda wid: CacheEngineConfig(local_disk=str(tmp_path), max_local_disk_size=16 * MiB / GB,  # noqa: E731
                                        io_engine="posix", io_threads=2, lookup_server_url=url,
                                        redis_socket_timeout=0.5, redis_backoff=0.5, writer_id=wid,
                                        shared_tick=0.1)
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    w = SharedDiskBackend(cfg("w0"), None, alloc)       # nothing listens there yet
    srv = None
    try:
        objs = [alloc.allocate((1024,), torch.float32) for _ in range(4)]
        for o in objs:
            o.tensor.copy_(torch.randn(1024))
        res = w.batched_put([key(i) for i in range(4)], objs)
        assert res == [4096] * 4 and all(w.local.index.contains(key(i)) for i in range(4))
        assert w.stats["local_only_puts"] == 4
        for o in objs:
            o.ref_count_down()
        srv = LocalRedis(port=port)
        ralloc = SlabMemoryAllocator(8 * MiB, "host")
        r = SharedDiskBackend(cfg("r0"), None, ralloc)
        deadline = time.monotonic() + 30
        while r.batched_contains([key(i) for i in range(4)]) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.batched_contains([key(i) for i in range(4)]) == 4
        r.close()
        ralloc.close()
    finally:
        w.close()
        alloc.close()
        if srv is not None:
            srv.stop()
