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
