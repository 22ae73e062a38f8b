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


# Hole punching made the old bytes unreadable in a sparse pool only: a preallocated pool (no
# punching) and the mapped engine (a punch would detach its pinned pages) served the removed
# version until the retraction landed. The tombstone covers all three.
POOLS = {"posix-sparse": dict(io_engine="posix"), "posix-preallocated": dict(io_engine="posix", preallocate=True),
         "mapped": dict(io_engine="mapped")}


@pytest.fixture(params=sorted(POOLS))
def pool_kind(request, tmp_path):
    kw = dict(POOLS[request.param])
    if kw["io_engine"] == "mapped":
        kw["root"] = request.getfixturevalue("shm_dir")
    else:
        kw["root"] = str(tmp_path)
    return kw


def _cut_off(*a, **kw):           # this writer cannot reach Redis; the reader still can
    raise redis.ConnectionError("partitioned")


def _two_processes(pool_kind, url):
    kw = dict(pool_kind)
    root = kw.pop("root")
    cfg = lambda wid: CacheEngineConfig(local_disk=root, max_local_disk_size=16 * MiB / GB,  # noqa: E731
                                        io_threads=2, lookup_server_url=url, redis_socket_timeout=0.5,
                                        redis_backoff=0.5, writer_id=wid, shared_tick=0.05, **kw)
    walloc, ralloc = SlabMemoryAllocator(8 * MiB, "host"), SlabMemoryAllocator(8 * MiB, "host")
    return SharedDiskBackend(cfg("w0"), None, walloc), walloc, SharedDiskBackend(cfg("r0"), None, ralloc), ralloc


def _put(b, alloc, k, data):
    o = alloc.allocate((1024,), torch.float32)
    o.tensor.copy_(data)
    try:
        return b.batched_put([k], [o])
    finally:
        o.ref_count_down()


def test_a_remove_redis_did_not_hear_of_wins_over_the_entry_it_still_lists(pool_kind, paused_redis):
    w, walloc, r, ralloc = _two_processes(pool_kind, paused_redis.url)
    try:
        assert _put(w, walloc, key(0), torch.randn(1024)) == [4096]
        got = r.batched_get_blocking([key(0)])[0]
        assert got is not None
        got.ref_count_down()
        real = w.redis.retract
        w.redis.retract = _cut_off
        assert w.remove(key(0)) is True
        # Until the retraction lands, Redis still lists version 1; reading it must not give it back,
        # and the reader knows why it missed (a dropped chunk, not a corrupt one).
        assert r.redis.exists([[key(0).to_string()]]) == [True]
        assert r.batched_get_blocking([key(0)]) == [None]
        assert w.stats["removed_unretracted"] == 1 and w.stats["tombstoned"] == 1
        assert r.stats["remote_removed"] == 1 and r.stats["remote_corrupt"] == 0
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


def test_a_remove_and_newer_put_redis_did_not_hear_of_win_over_the_version_it_still_lists(pool_kind, paused_redis):
    # The chaos campaign's case: remove() returns and version 2's put resolves while the writer
    # cannot reach Redis, which still lists version 1. No reader may get version 1 from then on.
    w, walloc, r, ralloc = _two_processes(pool_kind, paused_redis.url)
    v1, v2 = torch.randn(1024), torch.randn(1024)
    try:
        assert _put(w, walloc, key(1), v1) == [4096]
        got = r.batched_get_blocking([key(1)])[0]
        assert got is not None and torch.equal(got.tensor, v1)
        got.ref_count_down()
        cut = ("retract", "publish", "claim")
        real = {m: getattr(w.redis, m) for m in cut}
        for m in cut:
            setattr(w.redis, m, _cut_off)
        assert w.remove(key(1)) is True
        assert _put(w, walloc, key(1), v2) == [4096]          # stored here only, for now
        assert w.stats["local_only_puts"] >= 1
        got = r.batched_get_blocking([key(1)])[0]
        assert got is None or torch.equal(got.tensor, v2), "version 1 served after remove() and version 2's put"
        if got is not None:
            got.ref_count_down()
        assert r.stats["remote_corrupt"] == 0
        for m in cut:
            setattr(w.redis, m, real[m])
        deadline = time.monotonic() + 10          # version 2 is published once Redis answers
        while time.monotonic() < deadline:
            got = r.batched_get_blocking([key(1)])[0]
            if got is not None:
                break
            time.sleep(0.05)
        assert got is not None and torch.equal(got.tensor, v2)
        got.ref_count_down()
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
