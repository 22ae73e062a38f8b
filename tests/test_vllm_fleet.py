"""Fleet mode of the vLLM plug-in: several instances (managers + workers) on one directory and one real Redis.

Contract tests against vLLM's real classes (``scripts/ci-vllm.sh``); skipped without vLLM or
redis-server. Each "instance" is a scheduler-side manager and its worker(s), as vLLM builds them
in other processes; instance B reads what instance A stored.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm.v1.kv_offload.base")
    pytest.importorskip("redis")
    from vllm.v1.kv_offload.base import LookupResult, ScheduleEndContext
    from vllm.v1.kv_offload.config import OffloadingConfig, OffloadingParallelConfig
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    from gds_kvcache.errors import ConfigError
    from gds_kvcache.integrations.vllm import GdsKvCacheSpec
    from gds_kvcache.integrations.vllm.fleet_manager import FleetOffloadingManager
    from gds_kvcache.integrations.vllm.settings import library_config
    from gds_kvcache.shared import LocalRedis, find_redis_server
    from gds_kvcache.storage.pool_file import LAYOUT_NAME, POOL_NAME, pieces

from tests.test_vllm_offload import LAYERS, PAGE_BYTES, ctx, gpu_spec, kv_caches, offload_config, okeys, rows, run


@pytest.fixture
def redis_srv():
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (install Debian's redis-server or set GDS_KVCACHE_REDIS_SERVER)")
    srv = LocalRedis()
    yield srv
    srv.stop()


def fleet_config(root, url, wid, world_size=1, rank=0, replicated=False, disk_gb=0.05, redis_timeout=10.0,
                 **extra):
    # A Redis call of a loaded CI machine may take long: only the stall test times out on purpose.
    cfg = offload_config(root, disk_gb=disk_gb, world_size=world_size, rank=rank, lookup_url=url, writer_id=wid,
                         lease_ttl=5, shared_tick=0.05, redis_socket_timeout=redis_timeout, redis_backoff=0.5,
                         **extra)
    if replicated:
        cfg = OffloadingConfig(**{**cfg.__dict__, "replicated_layout": True})
    return cfg


class Instance:
    """One vLLM instance of a fleet: its scheduler's manager and one worker per rank."""

    def __init__(self, root, url, wid, seed=1, world_size=1, replicated=False, **extra):
        self.cfgs = [fleet_config(root, url, wid, world_size, r, replicated, **extra) for r in range(world_size)]
        self.manager = OffloadingSpecFactory.create_spec(self.cfgs[0]).get_manager()
        assert isinstance(self.manager, FleetOffloadingManager)
        self.tensors, self.workers = [], []
        for r, cfg in enumerate(self.cfgs):
            ts, caches = kv_caches(seed + 100 * r)
            w = GdsKvCacheSpec(cfg).get_worker(caches)
            w.reports_failed_blocks = True
            self.tensors.append(ts)
            self.workers.append(w)
        self.job = 0

    def step(self):
        self.manager.on_schedule_end(ScheduleEndContext((), ()))

    def lookup(self, keys, req="r"):
        """vLLM's scan: every key once (a RETRY goes on to the next), then again after the step."""
        first = [self.manager.lookup(k, ctx(req)) for k in keys]
        self.step()
        return first, [self.manager.lookup(k, ctx(req)) for k in keys]

    def store(self, keys, blocks):
        out = self.manager.prepare_store(keys, ctx())
        assert out is not None
        self.job += 1
        per = len(blocks) // len(keys)
        sel = [blocks[i * per:(i + 1) * per] for i, k in enumerate(keys) if k in out.keys_to_store]
        flat = [b for s in sel for b in s]
        for w in self.workers:
            assert run(w, self.job, w.submit_store, gpu_spec(flat), out.store_spec).success
        self.manager.complete_store(out.keys_to_store, ctx())
        return out

    def load(self, keys, blocks, req="r", spec_hook=None):
        spec = self.manager.prepare_load(keys, ctx(req))
        if spec_hook is not None:
            spec_hook(spec)
        self.job += 1
        res = [run(w, self.job, w.submit_load, spec, gpu_spec(blocks)) for w in self.workers]
        self.manager.complete_load(keys, ctx(req))
        return res

    def failed(self):
        return [w.take_failed_blocks() for w in self.workers]

    def stats(self):
        self.manager._write_stats()
        with open(self.manager.stats_path) as f:
            return json.load(f)

    def close(self):
        for w in self.workers:
            w.shutdown()
        self.manager.shutdown()


def wait_for(cond, what, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def published(srv, ns_part="gdskv:"):
    import redis
    c = redis.Redis.from_url(srv.url)
    try:
        return [k.decode() for k in c.scan_iter(f"{ns_part}*:e:*")]
    finally:
        c.close()


def claims(srv):
    import redis
    c = redis.Redis.from_url(srv.url)
    try:
        return len(list(c.scan_iter("gdskv:*:c:*")))
    finally:
        c.close()


def leases(srv):
    import redis
    c = redis.Redis.from_url(srv.url)
    try:
        return sum(c.zcard(k) for k in c.scan_iter("gdskv:*:l:*"))
    finally:
        c.close()


def test_instance_b_loads_what_instance_a_stored(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a", seed=1)
    keys = okeys(6)
    src = [3, 9, 10, 11, 40, 63]
    assert a.store(keys, src).keys_to_store == keys
    want = rows(a.tensors[0], src).clone()
    wait_for(lambda: len(published(redis_srv)) == 6, "A's 6 chunks published")
    b = Instance(tmp_path, redis_srv.url, "b", seed=2)
    first, then = b.lookup(keys)
    assert first == [LookupResult.RETRY] * 6 and then == [LookupResult.HIT] * 6
    assert leases(redis_srv) == 6                              # promised: leased until the load ends
    dst = [0, 1, 2, 20, 21, 50]
    untouched = [i for i in range(64) if i not in dst]
    before = rows(b.tensors[0], untouched).clone()
    (r,) = b.load(keys, dst)
    assert r.success and b.failed() == [set()]
    assert torch.equal(rows(b.tensors[0], dst), want)
    assert torch.equal(rows(b.tensors[0], untouched), before)
    wait_for(lambda: leases(redis_srv) == 0, "B's leases released after its load")
    st = b.stats()
    assert st["remote_chunks_loaded"] == 6 and st["remote_load_failures"] == 0 and st["chunks"] == 0
    # B stores nothing A holds: its claims lose.
    assert b.manager.prepare_store(keys, ctx()).keys_to_store == []
    assert sorted(os.listdir(tmp_path / "writers")) == ["a.r0", "b.r0"]
    b.close()
    a.close()


def test_a_store_in_flight_is_not_stored_twice(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a")
    b = Instance(tmp_path, redis_srv.url, "b")
    keys = okeys(4)
    out_a = a.manager.prepare_store(keys, ctx())            # claimed by A, bytes not written yet
    assert out_a.keys_to_store == keys
    assert b.manager.prepare_store(keys, ctx()).keys_to_store == []
    more = okeys(2, salt=5)
    assert b.store(more, [7, 8]).keys_to_store == more      # chunks no one holds: B's
    a.manager.complete_store(keys, ctx(), success=False)    # A's store failed: its claims go
    wait_for(lambda: claims(redis_srv) == 0, "A's claims given back")
    assert b.store(keys, [1, 2, 3, 4]).keys_to_store == keys
    b.close()
    a.close()


def test_corrupt_chunk_of_another_instance_is_recomputed(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a")
    keys = okeys(3)
    a.store(keys, [1, 2, 3])
    want = rows(a.tensors[0], [1, 3]).clone()
    wait_for(lambda: len(published(redis_srv)) == 3, "A's chunks published")
    e = a.manager._indexes[0].entry(a.manager._ck(keys[1]))
    d = tmp_path / "writers" / "a.r0"
    lay = json.loads((d / LAYOUT_NAME).read_text())
    f, local, _, _ = pieces(e.offset, 1, lay["stripes"], lay["unit"])[0]
    with open(d / f"{POOL_NAME}.{f}", "r+b") as fh:
        fh.seek(local + 17)
        byte = fh.read(1)
        fh.seek(local + 17)
        fh.write(bytes([byte[0] ^ 0xFF]))
    b = Instance(tmp_path, redis_srv.url, "b", seed=7)
    assert b.lookup(keys)[1] == [LookupResult.HIT] * 3
    before = rows(b.tensors[0], [21]).clone()
    (r,) = b.load(keys, [20, 21, 22])
    assert r.success and b.failed() == [{21}]               # the corrupt chunk's block is recomputed
    assert torch.equal(rows(b.tensors[0], [21]), before)    # and nothing was written into it
    assert torch.equal(rows(b.tensors[0], [20, 22]), want)
    st = b.stats()
    assert st["remote_chunks_loaded"] == 2 and st["remote_load_failures"] == 1
    assert a.manager._indexes[0].entry(a.manager._ck(keys[1])) is not None   # only A drops A's chunks
    b.close()
    a.close()


def test_load_past_the_leases_is_recomputed(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a")
    keys = okeys(2)
    a.store(keys, [1, 2])
    wait_for(lambda: len(published(redis_srv)) == 2, "A's chunks published")
    b = Instance(tmp_path, redis_srv.url, "b", seed=3)
    assert b.lookup(keys)[1] == [LookupResult.HIT] * 2
    before = rows(b.tensors[0], [30, 31]).clone()

    def late(spec):
        assert spec.deadline is not None and spec.deadline > time.time()
        spec.deadline = time.time() - 0.001      # the worker gets it after the leases ended

    (r,) = b.load(keys, [30, 31], spec_hook=late)
    assert r.success and b.failed() == [{30, 31}]
    assert torch.equal(rows(b.tensors[0], [30, 31]), before)
    b.close()
    a.close()


def test_leased_chunk_is_not_evicted_by_its_writer(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a", disk_gb=0.0004)
    cap = a.manager._indexes[0].capacity // -(-LAYERS * PAGE_BYTES // 4096 * 4096)
    assert 4 <= cap < 40
    first = okeys(1, salt=1)
    a.store(first, [1])
    want = rows(a.tensors[0], [1]).clone()
    wait_for(lambda: len(published(redis_srv)) == 1, "A's chunk published")
    b = Instance(tmp_path, redis_srv.url, "b", seed=4)
    assert b.lookup(first)[1] == [LookupResult.HIT]         # leased from here ...
    for i in range(cap + 4):
        a.store(okeys(1, salt=10 + i), [2 + i % 20])        # A evicts its LRU chunks, but not a leased one
    assert a.manager._indexes[0].entry(a.manager._ck(first[0])) is not None
    assert a.stats()["leased_skips"] >= 1
    (r,) = b.load(first, [50])                              # ... to the end of the load
    assert r.success and b.failed() == [set()]
    assert torch.equal(rows(b.tensors[0], [50]), want)
    b.close()
    a.close()


def test_tensor_parallel_chunk_counts_only_with_every_rank_published(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a", world_size=2)
    keys = okeys(2)
    a.store(keys, [3, 4])
    wait_for(lambda: len(published(redis_srv)) == 4, "2 chunks x 2 ranks published")
    # Rank 1's writer drops its shard of the second chunk (retracted from Redis); rank 0's stays listed.
    gone = a.manager._ck(keys[1], 1)
    assert a.manager._indexes[1].remove(gone)[0]
    wait_for(lambda: len(published(redis_srv)) == 3, "the dropped shard retracted")
    assert not any(k.endswith(gone.to_string()) for k in published(redis_srv))
    b = Instance(tmp_path, redis_srv.url, "b", seed=5, world_size=2)
    first, then = b.lookup(keys)
    assert then == [LookupResult.HIT, LookupResult.MISS]
    res = b.load(keys[:1], [40])
    assert all(r.success for r in res) and b.failed() == [set(), set()]
    for rank in range(2):
        assert torch.equal(rows(b.tensors[rank], [40]), rows(a.tensors[rank], [3]))
    b.close()
    a.close()


def test_mla_one_writer_every_rank_reads(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a", world_size=2, replicated=True)
    assert len(a.manager._indexes) == 1
    keys = okeys(2)
    out = a.manager.prepare_store(keys, ctx())
    a.job += 1
    assert run(a.workers[0], 1, a.workers[0].submit_store, gpu_spec([5, 6]), out.store_spec).success
    a.manager.complete_store(keys, ctx())
    wait_for(lambda: len(published(redis_srv)) == 2, "one shard per chunk published")
    b = Instance(tmp_path, redis_srv.url, "b", world_size=2, replicated=True, seed=6)
    assert b.lookup(keys)[1] == [LookupResult.HIT] * 2
    res = b.load(keys, [30, 31])
    assert all(r.success for r in res) and b.failed() == [set(), set()]
    for rank in range(2):                                   # every rank gets rank 0's bytes
        assert torch.equal(rows(b.tensors[rank], [30, 31]), rows(a.tensors[0], [5, 6]))
    b.close()
    a.close()


def test_redis_down_is_local_only_then_published(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a")
    keys = okeys(2)
    a.store(keys, [1, 2])
    wait_for(lambda: len(published(redis_srv)) == 2, "A's chunks published")
    b = Instance(tmp_path, redis_srv.url, "b", seed=8)
    redis_srv.kill()
    first, then = b.lookup(keys)                            # a miss, never an error
    assert then == [LookupResult.MISS] * 2
    mine = okeys(2, salt=3)
    assert b.store(mine, [5, 6]).keys_to_store == mine      # stored here without Redis ...
    assert b.lookup(mine, req="r2")[0] == [LookupResult.HIT] * 2
    assert b.stats()["local_only_puts"] == 2
    redis_srv.start()                                       # ... an empty Redis: both re-publish
    wait_for(lambda: len(published(redis_srv)) == 4, "both writers' chunks published again")
    c = Instance(tmp_path, redis_srv.url, "c", seed=9)
    assert c.lookup(keys + mine)[1] == [LookupResult.HIT] * 4
    res = c.load(keys + mine, [20, 21, 22, 23])
    assert res[0].success and c.failed() == [set()]
    assert torch.equal(rows(c.tensors[0], [20, 21]), rows(a.tensors[0], [1, 2]))
    assert torch.equal(rows(c.tensors[0], [22, 23]), rows(b.tensors[0], [5, 6]))
    for x in (c, b, a):
        x.close()


def test_reset_cache_retracts_only_this_instances_chunks(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, "a")
    b = Instance(tmp_path, redis_srv.url, "b", seed=2)
    ka, kb = okeys(2, salt=1), okeys(2, salt=2)
    a.store(ka, [1, 2])
    b.store(kb, [3, 4])
    wait_for(lambda: len(published(redis_srv)) == 4, "both instances' chunks published")
    a.manager.reset_cache()
    wait_for(lambda: len(published(redis_srv)) == 2, "A's chunks retracted")
    assert a.stats()["chunks"] == 0
    assert b.lookup(ka + kb, req="r3")[1] == [LookupResult.MISS] * 2 + [LookupResult.HIT] * 2
    assert a.lookup(kb, req="r4")[1] == [LookupResult.HIT] * 2
    b.close()
    a.close()


def test_restarted_instance_gets_its_writer_back(tmp_path, redis_srv):
    a = Instance(tmp_path, redis_srv.url, None)
    base = a.manager.writers.base
    a.store(okeys(1), [1])
    a.close()
    a2 = Instance(tmp_path, redis_srv.url, None)
    b = Instance(tmp_path, redis_srv.url, None)
    assert a2.manager.writers.base == base and b.manager.writers.base != base
    assert a2.lookup(okeys(1))[0] == [LookupResult.HIT]      # its own chunk, from its own index
    assert os.path.basename(a2.manager.stats_path) == f"vllm-stats.{base}.json"
    b.close()
    a2.close()


def test_settings_accept_lookup_url_or_lookup_server_url(tmp_path):
    base = {"local_disk": str(tmp_path), "max_local_disk_size": 1}
    assert library_config(base).lookup_server_url is None
    for name in ("lookup_url", "lookup_server_url"):
        cfg = library_config({**base, name: "redis://127.0.0.1:1/0", "writer_id": "n1", "lease_ttl": 3})
        assert cfg.lookup_server_url == "redis://127.0.0.1:1/0" and cfg.writer_id == "n1" and cfg.lease_ttl == 3
    with pytest.raises(ConfigError, match="lookup_url"):
        library_config({**base, "lookup_url": "redis://a:1/0", "lookup_server_url": "redis://b:1/0"})
    with pytest.raises(ConfigError, match="lookup_server_url"):
        library_config({**base, "lookup_url": "http://not-redis"})
    with pytest.raises(ConfigError, match="writer_id"):
        library_config({**base, "lookup_url": "redis://a:1/0", "writer_id": "../x"})


def test_expedited_load_as_vllm_033_submits_it(tmp_path, redis_srv):
    # vLLM 0.33 submits loads it waits for within the step with ``expedited=True``.
    a = Instance(tmp_path, redis_srv.url, "a")
    keys = okeys(2)
    a.store(keys, [1, 2])
    wait_for(lambda: len(published(redis_srv)) == 2, "A's chunks published")
    b = Instance(tmp_path, redis_srv.url, "b", seed=3)
    assert b.lookup(keys)[1] == [LookupResult.HIT] * 2
    spec = b.manager.prepare_load(keys, ctx())
    w = b.workers[0]
    assert w.submit_load(1, spec, gpu_spec([40, 41]), expedited=True)
    w.wait({1})
    (r,) = w.get_finished()
    b.manager.complete_load(keys, ctx())
    assert r.success and b.failed() == [set()]
    assert torch.equal(rows(b.tensors[0], [40, 41]), rows(a.tensors[0], [1, 2]))
    b.close()
    a.close()


def test_stalled_redis_is_local_only_then_published(tmp_path, redis_srv):
    import signal
    a = Instance(tmp_path, redis_srv.url, "a")
    keys = okeys(2)
    a.store(keys, [1, 2])
    wait_for(lambda: len(published(redis_srv)) == 2, "A's chunks published")
    b = Instance(tmp_path, redis_srv.url, "b", seed=8, redis_timeout=1.0)
    os.kill(redis_srv.proc.pid, signal.SIGSTOP)              # Redis stalls: calls time out
    try:
        assert b.lookup(keys)[1] == [LookupResult.MISS] * 2  # answered (a miss), never hung on
        mine = okeys(2, salt=3)
        assert b.store(mine, [5, 6]).keys_to_store == mine   # stored here, published later
        assert b.lookup(mine, req="r2")[0] == [LookupResult.HIT] * 2
        st = b.stats()
        assert st["redis_timeouts"] >= 1 and st["local_only_puts"] == 2
    finally:
        os.kill(redis_srv.proc.pid, signal.SIGCONT)
    wait_for(lambda: len(published(redis_srv)) == 4, "B's chunks published once Redis answers")
    assert a.lookup(mine, req="r3")[1] == [LookupResult.HIT] * 2
    b.close()
    a.close()
