"""Contract tests of the vLLM plug-in's manager and worker against vLLM's real classes.

Needs vLLM (``pip install -e '.[vllm]'``; CI: ``scripts/ci-vllm.sh``); skipped without it.
The GPU path is ``test_worker_gpu_roundtrip`` here (with vLLM) and ``test_vllm_worker_direct.py`` (without).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

# vLLM's own import chain (torch.compile, jit) warns on this torch; those warnings are not ours.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm.v1.kv_offload.base")

    from vllm.v1.kv_offload.base import (CanonicalKVCaches, CanonicalKVCacheRef, CanonicalKVCacheTensor,  
                                         GPULoadStoreSpec, LookupResult, OffloadingManager, OffloadingWorker,
                                         ReqContext, make_offload_key)
    from vllm.v1.kv_offload.config import (OffloadingCacheConfig, OffloadingConfig, OffloadingGroupConfig,  
                                           OffloadingModelConfig, OffloadingParallelConfig)
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory  

    from gds_kvcache.errors import ConfigError  
    from gds_kvcache.integrations.vllm import GdsKvCacheSpec  
from gds_kvcache.storage.pool_file import POOL_NAME, pieces  


LAYERS, BLOCKS, PAGE_BYTES = 3, 64, 2048


def offload_config(root, bpc=1, disk_gb=0.05, world_size=1, rank=0, events=True, **extra):
    ex = {"spec_name": "GdsKvCacheSpec", "spec_module_path": "gds_kvcache.integrations.vllm",
          "local_disk": str(root), "max_local_disk_size": disk_gb, "pool_files": 2, "io_engine": "posix",
          "io_threads": 2, "slab_size": 0.01, "memory_device": "host"}
    ex.update(extra)
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(16, tuple(f"layer.{i}" for i in range(LAYERS)), 0),),
        worker_kv_bytes_per_block=LAYERS * PAGE_BYTES, enable_kv_cache_events=events, extra_config=ex,
        engine_id="e0", model=OffloadingModelConfig("tiny/llama", "bfloat16"),
        cache=OffloadingCacheConfig(16, bpc),
        parallel=OffloadingParallelConfig(rank, world_size, world_size, 1, 1, 1, 0, 1, None, False))


def kv_caches(seed, device="cpu"):
    """vLLM canonical caches: one (num_blocks, page) int8 tensor per layer, random bytes."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randint(-128, 128, (BLOCKS, PAGE_BYTES), dtype=torch.int8, generator=g).to(device)
          for _ in range(LAYERS)]
    return ts, CanonicalKVCaches([CanonicalKVCacheTensor(t, PAGE_BYTES) for t in ts],
                                 [[CanonicalKVCacheRef(i, PAGE_BYTES) for i in range(LAYERS)]])


def okeys(n, salt=0):
    return [make_offload_key(bytes([salt]) + i.to_bytes(31, "big"), 0) for i in range(n)]


def ctx(name="r"):
    return ReqContext(name)


def gpu_spec(block_ids, start=0):
    return GPULoadStoreSpec(list(block_ids), group_sizes=[len(block_ids)], block_indices=[start])


def run(worker, job, fn, *args):
    assert fn(job, *args)
    worker.wait({job})
    res = worker.get_finished()
    assert [r.job_id for r in res] == [job]
    return res[0]


class Side:
    """One scheduler (spec+manager) and one worker (another spec object, as in another process)."""

    def __init__(self, root, seed=1, **kw):
        self.cfg = offload_config(root, **kw)
        self.spec = OffloadingSpecFactory.create_spec(self.cfg)
        self.manager = self.spec.get_manager()
        self.tensors, caches = kv_caches(seed)
        self.worker = GdsKvCacheSpec(self.cfg).get_worker(caches)
        self.worker.reports_failed_blocks = True
        self.job = 0

    def store(self, keys, blocks, start=0):
        out = self.manager.prepare_store(keys, ctx())
        assert out is not None
        self.job += 1
        sel = [b for k, b in zip(keys, _group(blocks, len(keys))) if k in out.keys_to_store]
        flat = [x for b in sel for x in b]
        r = run(self.worker, self.job, self.worker.submit_store, gpu_spec(flat, start), out.store_spec)
        assert r.success
        self.manager.complete_store(out.keys_to_store, ctx())
        return out

    def load(self, keys, blocks, start=0):
        spec = self.manager.prepare_load(keys, ctx())
        self.job += 1
        r = run(self.worker, self.job, self.worker.submit_load, spec, gpu_spec(blocks, start))
        self.manager.complete_load(keys, ctx())
        return r

    def close(self):
        self.worker.shutdown()
        self.manager.shutdown()


def _group(blocks, n):
    per = len(blocks) // n
    return [blocks[i * per:(i + 1) * per] for i in range(n)]


def rows(tensors, blocks):
    return torch.stack([t[list(blocks)] for t in tensors])


def test_spec_loads_through_vllm_factory_and_is_vllm_types(tmp_path):
    cfg = offload_config(tmp_path)
    spec = OffloadingSpecFactory.create_spec(cfg)
    assert isinstance(spec, GdsKvCacheSpec)
    m = spec.get_manager()
    assert isinstance(m, OffloadingManager) and spec.get_manager() is m
    _, caches = kv_caches(0)
    w = GdsKvCacheSpec(cfg).get_worker(caches)
    assert isinstance(w, OffloadingWorker)
    w.shutdown()
    m.shutdown()


def test_missing_settings_name_the_field(tmp_path):
    cfg = offload_config(tmp_path)
    for drop in ("local_disk", "max_local_disk_size"):
        ex = dict(cfg.extra_config)
        del ex[drop]
        with pytest.raises(ConfigError, match=drop):
            GdsKvCacheSpec(OffloadingConfig(**{**cfg.__dict__, "extra_config": ex}))


def test_store_then_load_is_byte_exact_in_another_cache(tmp_path):
    a = Side(tmp_path, seed=1)
    keys = okeys(6)
    src = [3, 9, 10, 11, 40, 63]
    assert all(a.manager.lookup(k, ctx()) == LookupResult.MISS for k in keys)
    out = a.store(keys, src)
    assert out.keys_to_store == keys and out.evicted_keys == []
    assert all(a.manager.lookup(k, ctx()) == LookupResult.HIT for k in keys)
    want = rows(a.tensors, src).clone()
    # A second worker with other (random) bytes loads them into other blocks.
    b_tensors, caches = kv_caches(2)
    wb = GdsKvCacheSpec(a.cfg).get_worker(caches)
    dst = [0, 1, 2, 20, 21, 50]
    spec = a.manager.prepare_load(keys, ctx())
    r = run(wb, 1, wb.submit_load, spec, gpu_spec(dst))
    a.manager.complete_load(keys, ctx())
    assert r.success and r.transfer_size == 6 * LAYERS * PAGE_BYTES
    assert torch.equal(rows(b_tensors, dst), want)
    untouched = [i for i in range(BLOCKS) if i not in dst]
    _, fresh = kv_caches(2)
    assert torch.equal(rows(b_tensors, untouched), rows([t.tensor for t in fresh.tensors], untouched))
    wb.shutdown()
    a.close()


def test_lookup_results_miss_pending_hit(tmp_path):
    a = Side(tmp_path)
    keys = okeys(2)
    out = a.manager.prepare_store(keys, ctx())
    # Written but not yet complete: vLLM must wait, not load.
    assert [a.manager.lookup(k, ctx()) for k in keys] == [LookupResult.HIT_PENDING] * 2
    assert a.manager.prepare_store(keys, ctx()).keys_to_store == []   # already in flight
    r = run(a.worker, 1, a.worker.submit_store, gpu_spec([5, 6]), out.store_spec)
    assert r.success
    a.manager.complete_store(keys, ctx())
    assert [a.manager.lookup(k, ctx()) for k in keys] == [LookupResult.HIT] * 2
    assert a.manager.lookup(okeys(1, salt=9)[0], ctx()) == LookupResult.MISS
    events = list(a.manager.take_events())
    assert [(e.keys, e.removed) for e in events] == [(keys, False)]
    a.close()


def test_failed_store_is_never_a_hit(tmp_path):
    a = Side(tmp_path)
    keys = okeys(2)
    out = a.manager.prepare_store(keys, ctx())
    # The worker never reported (crashed, or vLLM says it failed): nothing is recorded.
    a.manager.complete_store(keys, ctx(), success=False)
    assert [a.manager.lookup(k, ctx()) for k in keys] == [LookupResult.MISS] * 2
    assert a.manager.stats["store_failures"] == 2
    assert out.keys_to_store == keys
    a.close()


def test_partial_load_of_multi_block_chunks(tmp_path):
    # 4 blocks per chunk; the request already has the first 6 blocks, so the load starts inside chunk 1.
    a = Side(tmp_path, bpc=4)
    keys = okeys(3)
    src = list(range(10, 22))
    a.store(keys, src)
    want = rows(a.tensors, src[6:]).clone()
    dst = [30, 31, 32, 33, 34, 35]
    before = rows(a.tensors, [29, 36]).clone()
    r = a.load(keys[1:], dst, start=6)
    assert r.success
    assert torch.equal(rows(a.tensors, dst), want)
    assert torch.equal(rows(a.tensors, [29, 36]), before)
    a.close()


def test_preemption_flush_waits_for_the_store(tmp_path):
    # vLLM flushes a preempted request's stores with wait(jobs_to_flush) before reusing its blocks.
    a = Side(tmp_path)
    keys = okeys(8)
    out = a.manager.prepare_store(keys, ctx())
    assert a.worker.submit_store(7, gpu_spec(list(range(8))), out.store_spec)
    a.worker.wait({7})
    # The blocks may now be overwritten: the chunks hold the bytes from before.
    want = rows(a.tensors, range(8)).clone()
    for t in a.tensors:
        t[:8] = torch.randint(-128, 128, t[:8].shape, dtype=torch.int8)
    assert [r.job_id for r in a.worker.get_finished()] == [7]
    a.manager.complete_store(keys, ctx())
    assert a.load(keys, list(range(20, 28))).success
    assert torch.equal(rows(a.tensors, range(20, 28)), want)
    a.close()


def test_store_racing_an_eviction_never_takes_a_pinned_chunk(tmp_path):
    # A budget of a few chunks: storing more evicts LRU chunks, but not one pinned by a load.
    a = Side(tmp_path, disk_gb=0.0004)
    cap = a.manager._indexes[0].capacity // -(-LAYERS * PAGE_BYTES // 4096 * 4096)
    assert 4 <= cap < 40
    first = okeys(1, salt=1)
    a.store(first, [1])
    want = rows(a.tensors, [1]).clone()
    spec = a.manager.prepare_load(first, ctx("reader"))            # pinned from here ...
    others = okeys(cap + 4, salt=2)
    evicted = []
    for i in range(0, len(others), 2):
        out = a.store(others[i:i + 2], [2 + (i % 20), 3 + (i % 20)])
        evicted += out.evicted_keys
    assert first[0] not in evicted and evicted
    assert a.manager.lookup(first[0], ctx()) == LookupResult.HIT
    for t in a.tensors:
        t[50] = 0
    a.job += 1
    r = run(a.worker, a.job, a.worker.submit_load, spec, gpu_spec([50]))
    a.manager.complete_load(first, ctx("reader"))                  # ... to here
    assert r.success and torch.equal(rows(a.tensors, [50]), want)
    assert a.manager._indexes[0].memcheck()
    # Unpinned, it is evictable again.
    for i in range(cap + 2):
        a.store(okeys(1, salt=3 + i), [60])
    assert a.manager.lookup(first[0], ctx()) == LookupResult.MISS
    removed = [k for e in a.manager.take_events() if e.removed for k in e.keys]
    assert first[0] in removed
    a.close()


def corrupt(root, shard, entry):
    with open(os.path.join(root, f"rank{shard}", "kvcache.layout")) as fh:
        lay = json.load(fh)
    f, local, _, _ = pieces(entry.offset, 1, lay["stripes"], lay["unit"])[0]
    path = os.path.join(root, f"rank{shard}", f"{POOL_NAME}.{f}")
    with open(path, "r+b") as fh:
        fh.seek(local + 17)
        b = fh.read(1)
        fh.seek(local + 17)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_chunk_fails_its_blocks_and_is_dropped(tmp_path):
    a = Side(tmp_path)
    keys = okeys(3)
    a.store(keys, [1, 2, 3])
    want = rows(a.tensors, [1]).clone()
    e = a.manager._indexes[0].entry(a.spec.key_maker(keys[1], 0))
    corrupt(str(tmp_path), 0, e)
    r = a.load(keys, [20, 21, 22])
    assert r.success                                     # the job completes ...
    assert a.worker.take_failed_blocks() == {21}         # ... with the corrupt chunk's block failed
    assert a.worker.take_failed_blocks() == set()
    assert torch.equal(rows(a.tensors, [20]), want)
    assert a.manager.lookup(keys[1], ctx()) == LookupResult.MISS   # dropped: never promised again
    assert a.manager.lookup(keys[2], ctx()) == LookupResult.HIT
    assert a.manager.stats["load_failures"] == 1
    a.close()


def test_without_failed_block_reporting_a_bad_load_is_a_failed_job(tmp_path):
    a = Side(tmp_path)
    a.worker.reports_failed_blocks = False               # vLLM's plain OffloadingConnector
    keys = okeys(1)
    a.store(keys, [1])
    corrupt(str(tmp_path), 0, a.manager._indexes[0].entry(a.spec.key_maker(keys[0], 0)))
    assert not a.load(keys, [5]).success
    a.close()


def test_chunk_evicted_between_lookup_and_load_fails_its_blocks(tmp_path):
    a = Side(tmp_path)
    keys = okeys(2)
    a.store(keys, [1, 2])
    assert a.manager.lookup(keys[0], ctx()) == LookupResult.HIT
    a.manager.reset_cache()
    r = a.load(keys, [7, 8])
    assert r.success and a.worker.take_failed_blocks() == {7, 8}
    a.close()


def test_restart_keeps_chunks(tmp_path):
    a = Side(tmp_path)
    keys = okeys(4)
    a.store(keys, [4, 5, 6, 7])
    want = rows(a.tensors, [4, 5, 6, 7]).clone()
    a.close()
    b = Side(tmp_path, seed=9)
    assert [b.manager.lookup(k, ctx()) for k in keys] == [LookupResult.HIT] * 4
    assert b.load(keys, [30, 31, 32, 33]).success
    assert torch.equal(rows(b.tensors, [30, 31, 32, 33]), want)
    b.close()


def test_tensor_parallel_ranks_write_their_own_shard(tmp_path):
    cfgs = [offload_config(tmp_path, world_size=2, rank=r) for r in range(2)]
    manager = GdsKvCacheSpec(cfgs[0]).get_manager()
    workers, tensors = [], []
    for r, cfg in enumerate(cfgs):
        ts, caches = kv_caches(10 + r)
        tensors.append(ts)
        workers.append(GdsKvCacheSpec(cfg).get_worker(caches))
    keys = okeys(2)
    out = manager.prepare_store(keys, ctx())
    for w in workers:
        assert run(w, 1, w.submit_store, gpu_spec([3, 4]), out.store_spec).success
    manager.complete_store(keys, ctx())
    assert sorted(os.listdir(tmp_path)) == ["jobs", "rank0", "rank1", "vllm-stats.json"]
    spec = manager.prepare_load(keys, ctx())
    for w in workers:
        assert run(w, 2, w.submit_load, spec, gpu_spec([40, 41])).success
    manager.complete_load(keys, ctx())
    for ts in tensors:
        assert torch.equal(rows(ts, [40, 41]), rows(ts, [3, 4]))
    for w in workers:
        w.shutdown()
    manager.shutdown()


def test_directory_opens_with_cache_engine_storage(tmp_path):
    """The shard directory is the library's own format: StorageManager reads the chunks vLLM wrote."""
    from gds_kvcache.config import CacheEngineConfig
    from gds_kvcache.storage.storage_manager import StorageManager

    a = Side(tmp_path)
    keys = okeys(2)
    a.store(keys, [8, 9])
    want = rows(a.tensors, [8]).clone()
    cks = [a.spec.key_maker(k, 0) for k in keys]
    a.close()
    cfg = CacheEngineConfig(local_cpu=False, local_disk=str(tmp_path / "rank0"), max_local_disk_size=0.05,
                            pool_files=2, io_engine="posix", slab_size=0.01, memory_device="host")
    with StorageManager(cfg) as sm:
        assert sm.batched_contains(cks) == 2
        obj = sm.batched_get_blocking(cks[:1])[0]
        assert obj is not None and tuple(obj.shape) == (1, LAYERS, 1, PAGE_BYTES)
        assert torch.equal(obj.tensor[0, :, 0], want[:, 0])
        obj.ref_count_down()


@pytest.mark.gpu
def test_worker_gpu_roundtrip(tmp_path):
    """The worker's GPU path: CUDA canonical KV tensors, a CUDA slab (GDS where the file system allows)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = offload_config(tmp_path, memory_device="cuda", io_engine="auto")
    manager = GdsKvCacheSpec(cfg).get_manager()
    ts, caches = kv_caches(3, device="cuda")
    w = GdsKvCacheSpec(cfg).get_worker(caches)
    w.reports_failed_blocks = True
    keys = okeys(8)
    out = manager.prepare_store(keys, ctx())
    assert run(w, 1, w.submit_store, gpu_spec(list(range(8))), out.store_spec).success
    manager.complete_store(keys, ctx())
    spec = manager.prepare_load(keys, ctx())
    assert run(w, 2, w.submit_load, spec, gpu_spec(list(range(30, 38)))).success
    manager.complete_load(keys, ctx())
    assert w.take_failed_blocks() == set()
    assert torch.equal(rows(ts, range(30, 38)), rows(ts, range(8)))
    w.shutdown()
    manager.shutdown()


def test_two_requests_loading_one_chunk_see_a_corrupt_chunk_dropped_at_once(tmp_path):
    # vLLM's complete_load names keys, not the job: two jobs on the same key cannot be told apart.
    a = Side(tmp_path)
    shared = okeys(1)
    a.store(shared, [1])
    idx = a.manager._indexes[0]
    ck = a.spec.key_maker(shared[0], 0)
    s1 = a.manager.prepare_load(shared, ctx("r1"))
    s2 = a.manager.prepare_load(shared, ctx("r2"))
    assert idx.entry(ck).readers == 2
    corrupt(str(tmp_path), 0, idx.entry(ck))
    r2 = run(a.worker, 2, a.worker.submit_load, s2, gpu_spec([10]))
    a.manager.complete_load(shared, ctx("r2"))            # the later job finishes first
    assert r2.success and a.worker.take_failed_blocks() == {10}
    assert a.manager.lookup(shared[0], ctx()) == LookupResult.MISS   # dropped now, not at r1's end
    r1 = run(a.worker, 1, a.worker.submit_load, s1, gpu_spec([20]))
    a.manager.complete_load(shared, ctx("r1"))
    assert r1.success and a.worker.take_failed_blocks() == {20}
    assert idx.memcheck() and a.manager.stats["load_failures"] == 1
    assert os.listdir(tmp_path / "jobs") == []
    a.close()


def test_results_of_an_earlier_process_are_cleared_at_start(tmp_path):
    a = Side(tmp_path)
    out = a.manager.prepare_store(okeys(1), ctx())
    assert run(a.worker, 1, a.worker.submit_store, gpu_spec([1]), out.store_spec).success
    a.close()                                   # the engine stopped before complete_store
    assert os.listdir(tmp_path / "jobs")
    b = Side(tmp_path)
    assert os.listdir(tmp_path / "jobs") == []
    assert b.manager.lookup(okeys(1)[0], ctx()) == LookupResult.MISS   # never recorded
    b.close()


def _stats_values(stats):
    """``{(metric, labels): value}`` of an ``OffloadingConnectorStats`` (histograms: their sample count)."""
    out = {}
    for name, per_label in stats.data["data"].items():
        for labels, v in per_label.items():
            out[(name, labels)] = len(v) if isinstance(v, list) else v
    return out


def test_get_stats_reports_each_change_once_per_group(tmp_path):
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats

    a = Side(tmp_path)
    # Two KV cache groups over the same tensors (vLLM's hybrid layout).
    a.worker.shutdown()
    refs = [CanonicalKVCacheRef(i, PAGE_BYTES) for i in range(LAYERS)]
    a.worker = GdsKvCacheSpec(a.cfg).get_worker(CanonicalKVCaches(
        [CanonicalKVCacheTensor(t, PAGE_BYTES) for t in a.tensors], [refs, list(refs)]))
    st = a.manager.get_stats()
    assert isinstance(st, OffloadingConnectorStats)   # never None, even with nothing new
    assert _stats_values(st) == {("gds_kvcache:disk_chunks", ()): 0}
    assert a.manager.get_stats().is_empty()
    g0 = okeys(3)
    g1 = [make_offload_key(bytes([7]) + i.to_bytes(31, "big"), 1) for i in range(2)]
    a.manager.set_groups([(0, 16), (1, 16)])
    for k in g0 + g1:
        a.manager.lookup(k, ctx())
    out = a.manager.prepare_store(g0 + g1, ctx())
    assert out.store_spec.groups == [0, 0, 0, 1, 1]
    src = GPULoadStoreSpec([3, 4, 5, 8, 9], group_sizes=[3, 2], block_indices=[0, 0])
    assert run(a.worker, 1, a.worker.submit_store, src, out.store_spec).success
    a.manager.complete_store(out.keys_to_store, ctx())
    for k in g0 + g1:
        assert a.manager.lookup(k, ctx()) == LookupResult.HIT
    spec = a.manager.prepare_load(g1, ctx())
    assert spec.groups == [1, 1]
    dst = GPULoadStoreSpec([20, 21], group_sizes=[0, 2], block_indices=[0, 0])
    assert run(a.worker, 2, a.worker.submit_load, spec, dst).success
    a.manager.complete_load(g1, ctx())
    assert torch.equal(rows(a.tensors, [20, 21]), rows(a.tensors, [8, 9]))
    v = _stats_values(a.manager.get_stats())
    chunk = LAYERS * PAGE_BYTES
    assert v[("gds_kvcache:lookups", ())] == 10
    assert v[("gds_kvcache:hit_chunks", ("0",))] == 3 and v[("gds_kvcache:hit_chunks", ("1",))] == 2
    assert v[("gds_kvcache:hit_tokens", ("1",))] == 32
    assert v[("gds_kvcache:stored_chunks", ("0",))] == 3 and v[("gds_kvcache:stored_chunks", ("1",))] == 2
    assert v[("gds_kvcache:stored_bytes", ("0",))] == 3 * chunk
    assert v[("gds_kvcache:loaded_chunks", ("1",))] == 2 and ("gds_kvcache:loaded_chunks", ("0",)) not in v
    assert v[("gds_kvcache:loaded_bytes", ("1",))] == 2 * chunk
    assert v[("gds_kvcache:load_seconds", ())] == 1 and v[("gds_kvcache:store_seconds", ())] == 1
    assert v[("gds_kvcache:disk_chunks", ())] == 5
    assert a.manager.get_stats().is_empty()          # reported once
    with open(tmp_path / "vllm-stats.json") as f:
        saved = json.load(f)
    assert saved["groups"]["1"]["chunks_loaded"] == 2 and saved["chunks_loaded"] == 2
    a.close()


def test_spec_declares_the_metrics_it_reports(tmp_path):
    from gds_kvcache.integrations.vllm import metrics

    defs = GdsKvCacheSpec.build_metric_definitions({})
    names = ({n for n, _ in metrics.COUNTERS.values()} | {n for n, _ in metrics.GROUP_COUNTERS.values()}
             | {n for n, _ in metrics.HISTOGRAMS.values()} | {metrics.DISK_CHUNKS[0]})
    assert set(defs) == names
    assert all(defs[n].labelnames == ("group",) for n, _ in metrics.GROUP_COUNTERS.values())
