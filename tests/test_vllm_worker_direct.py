"""The plug-in's worker driven directly, without vLLM: KV tensors in vLLM's canonical shapes.

The GPU machine has no vLLM, so this is where the worker's GPU path (CUDA KV
tensors, a CUDA slab, KvikIO/GDS) is tested; the CPU case runs everywhere. vLLM's
data containers are stood in by plain objects with the same attributes (the
contract tests in ``test_vllm_offload.py`` use vLLM's real classes).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gds_kvcache.config import CacheEngineConfig
from gds_kvcache.integrations.vllm.channel import take_result
from gds_kvcache.integrations.vllm.specs import DiskLoadSpec, DiskStoreSpec, entry_to_wire
from gds_kvcache.integrations.vllm.worker import DiskOffloadingWorker
from gds_kvcache.key import CacheEngineKey
from gds_kvcache.storage.disk_index import DiskEntry, DiskIndex
from gds_kvcache.storage.pool_file import PoolDirectory, index_reserve

LAYERS, BLOCKS, PAGE_BYTES = 4, 48, 4096


def canonical(device, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randint(-128, 128, (BLOCKS, PAGE_BYTES), dtype=torch.int8, generator=g).to(device)
          for _ in range(LAYERS)]
    caches = SimpleNamespace(tensors=[SimpleNamespace(tensor=t, page_size_bytes=PAGE_BYTES) for t in ts],
                             group_data_refs=[[SimpleNamespace(tensor_idx=i, page_size_bytes=PAGE_BYTES)
                                               for i in range(LAYERS)]])
    return ts, caches


def gpu_spec(ids, start=0):
    return SimpleNamespace(block_ids=np.array(ids, dtype=np.int32), group_sizes=[len(ids)], block_indices=[start])


def finish(w, job):
    w.wait({job})
    (r,) = w.get_finished()
    assert r.job_id == job
    return r


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_worker_roundtrip_and_corrupt_chunk(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    budget = 64 << 20
    pool = PoolDirectory(str(tmp_path / "rank0"), budget, 2)
    index = DiskIndex(pool, index_reserve(budget))
    index.recover()
    cfg = CacheEngineConfig(local_cpu=False, local_disk=str(tmp_path), max_local_disk_size=budget / 2**30,
                            slab_size=0.01, memory_device="cuda" if device == "cuda" else "host",
                            io_engine="auto" if device == "cuda" else "posix", io_threads=2)
    ts, caches = canonical(device, 1)
    w = DiskOffloadingWorker(caches, str(tmp_path), 0, 0, 2, cfg, LAYERS * PAGE_BYTES)
    w.reports_failed_blocks = True
    keys = [CacheEngineKey("vllm", "m", 1, 0, format(i + 1, "x")) for i in range(4)]
    chunk = 2 * LAYERS * PAGE_BYTES
    res = index.reserve(keys, [chunk] * 4)
    spec = DiskStoreSpec("s1", [[(k.to_string(), o, n) for k, o, n in zip(res.keys, res.offsets, res.sizes)]])
    src = [3, 4, 10, 11, 20, 21, 30, 31]
    assert w.submit_store(1, gpu_spec(src), spec)
    assert finish(w, 1).success
    written = take_result(str(tmp_path), "s1", 0)["chunks"]
    done = [DiskEntry(k, o, written[k.to_string()]["nbytes"], n, tuple(written[k.to_string()]["shape"]), "int8",
                      "KV_MLA_FMT", written[k.to_string()]["checksum"]) for k, o, n in zip(res.keys, res.offsets,
                                                                                            res.sizes)]
    index.commit(done, [])
    want = torch.stack([t[src] for t in ts]).clone()
    # Load chunks 1..3 starting inside chunk 0's successor at block index 3 (a partial first chunk).
    entries = index.begin_read(keys)
    entries[2].checksum ^= 1   # the index says another checksum: chunk 2 must fail, never land
    load = DiskLoadSpec("l1", [[entry_to_wire(e) for e in entries]])
    dst = [40, 41, 42, 43, 44, 45, 46]       # blocks 1..7 of the 8 stored
    before = torch.stack([t[dst] for t in ts]).clone()
    assert w.submit_load(2, load, gpu_spec(dst, start=1))
    r = finish(w, 2)
    index.end_read(entries)
    assert r.success and w.take_failed_blocks() == {43, 44}
    got = torch.stack([t[dst] for t in ts])
    keep = [0, 1, 2, 5, 6]                   # dst positions of blocks 1,2,3 and 6,7
    assert torch.equal(got[:, keep], want[:, [1, 2, 3, 6, 7]])
    assert torch.equal(got[:, [3, 4]], before[:, [3, 4]])   # the failed chunk wrote nothing
    assert take_result(str(tmp_path), "l1", 0)["bad"] == [keys[2].to_string()]
    assert os.listdir(tmp_path / "jobs") == []
    w.shutdown()
    index.close()
    pool.release()


def _cfg(tmp_path, device, budget):
    return CacheEngineConfig(local_cpu=False, local_disk=str(tmp_path), max_local_disk_size=budget / 2**30,
                             slab_size=0.01, memory_device="cuda" if device == "cuda" else "host",
                             io_engine="auto" if device == "cuda" else "posix", io_threads=2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_worker_opens_an_existing_pool_at_start_and_reopens_it_after_a_resize(tmp_path, device):
    """A restart finds the pool: the worker opens it at start-up (the first load then pays nothing
    for it). If the scheduler then resizes the pool (another ``max_local_disk_size``), the worker
    reopens it at its next job: an extent past the old end is written where the new layout says."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    small, big = 16 << 20, 64 << 20
    pool = PoolDirectory(str(tmp_path / "rank0"), small, 2)
    pool.release()   # a directory an earlier run left
    cfg = _cfg(tmp_path, device, big)
    ts, caches = canonical(device, 3)
    w = DiskOffloadingWorker(caches, str(tmp_path), 0, 0, 1, cfg, LAYERS * PAGE_BYTES)
    assert w.open_pools == [0]
    old_end = pool.capacity
    # The scheduler starts after the worker (vLLM's order) with the bigger budget: files resized in place.
    pool = PoolDirectory(str(tmp_path / "rank0"), big, 2)
    index = DiskIndex(pool, index_reserve(big))
    index.recover()
    chunk = LAYERS * PAGE_BYTES
    key = CacheEngineKey("vllm", "m", 1, 0, "ab")
    offset = old_end + 3 * 4096 * 64   # past the old pool's end
    assert pool.fits(offset, chunk)
    assert w.submit_store(1, gpu_spec([7]), DiskStoreSpec("s1", [[(key.to_string(), offset, chunk)]]))
    assert finish(w, 1).success
    written = take_result(str(tmp_path), "s1", 0)["chunks"][key.to_string()]
    entry = DiskEntry(key, offset, written["nbytes"], chunk, tuple(written["shape"]), "int8", "KV_MLA_FMT",
                      written["checksum"])
    w.shutdown()
    # A fresh worker (the new layout from the start) reads it back byte for byte.
    ts2, caches2 = canonical(device, 4)
    w2 = DiskOffloadingWorker(caches2, str(tmp_path), 0, 0, 1, cfg, LAYERS * PAGE_BYTES)
    w2.reports_failed_blocks = True
    assert w2.submit_load(2, DiskLoadSpec("l1", [[entry_to_wire(entry)]]), gpu_spec([9]))
    assert finish(w2, 2).success and w2.take_failed_blocks() == set()
    assert all(torch.equal(a[9], b[7]) for a, b in zip(ts2, ts))
    w2.shutdown()
    index.close()
    pool.release()



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_worker_stores_and_loads_each_kv_cache_group_apart(tmp_path, device):
    """Two groups over shared tensors (vLLM's hybrid layout): a chunk holds one group's blocks, the
    spec says which; a chunk whose first blocks vLLM left out (a sliding window's edge) is not stored."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    budget = 64 << 20
    pool = PoolDirectory(str(tmp_path / "rank0"), budget, 2)
    index = DiskIndex(pool, index_reserve(budget))
    index.recover()
    cfg = _cfg(tmp_path, device, budget)
    g = torch.Generator().manual_seed(5)
    ts = [torch.randint(-128, 128, (BLOCKS, PAGE_BYTES), dtype=torch.int8, generator=g).to(device) for _ in range(2)]
    small = PAGE_BYTES // 2   # group 1 uses the first half of each page (an unpadded state, say)
    caches = SimpleNamespace(tensors=[SimpleNamespace(tensor=t, page_size_bytes=PAGE_BYTES) for t in ts],
                             group_data_refs=[[SimpleNamespace(tensor_idx=i, page_size_bytes=PAGE_BYTES)
                                               for i in range(2)],
                                              [SimpleNamespace(tensor_idx=i, page_size_bytes=small)
                                               for i in range(2)]])
    w = DiskOffloadingWorker(caches, str(tmp_path), 0, 0, 2, cfg, 2 * PAGE_BYTES)
    w.reports_failed_blocks = True
    keys = [CacheEngineKey("vllm", "m", 1, 0, format(i + 1, "x")) for i in range(4)]
    res = index.reserve(keys, [2 * 2 * PAGE_BYTES] * 4)
    ext = [(k.to_string(), o, n) for k, o, n in zip(res.keys, res.offsets, res.sizes)]
    # Group 0: chunks 0, 1 from blocks 2..5 (block index 0 on). Group 1: chunk 2 (left out: its first
    # block was null, so the group starts at block index 3) and chunk 3 (blocks 10, 11).
    src = SimpleNamespace(block_ids=np.array([2, 3, 4, 5, 20, 10, 11], dtype=np.int32), group_sizes=[4, 3],
                          block_indices=[0, 3])
    assert w.submit_store(1, src, DiskStoreSpec("s1", [ext], groups=[0, 0, 1, 1]))
    assert finish(w, 1).success
    written = take_result(str(tmp_path), "s1", 0)["chunks"]
    assert sorted(written) == sorted(k.to_string() for k in (keys[0], keys[1], keys[3]))
    assert written[keys[3].to_string()]["shape"] == [1, 2, 2, small]
    entries = [DiskEntry(k, o, written[k.to_string()]["nbytes"], n, tuple(written[k.to_string()]["shape"]), "int8",
                         "KV_MLA_FMT", written[k.to_string()]["checksum"])
               for k, o, n in zip(res.keys, res.offsets, res.sizes) if k.to_string() in written]
    want = [t.clone() for t in ts]
    for t in ts:
        t[30:40] = 0
    dst = SimpleNamespace(block_ids=np.array([30, 31, 32, 33, 34, 35], dtype=np.int32), group_sizes=[4, 2],
                          block_indices=[0, 2])
    load = DiskLoadSpec("l1", [[entry_to_wire(e) for e in entries]], groups=[0, 0, 1])
    assert w.submit_load(2, load, dst)
    r = finish(w, 2)
    assert r.success and w.take_failed_blocks() == set()
    for t, t0 in zip(ts, want):
        assert torch.equal(t[30:34], t0[[2, 3, 4, 5]])                    # group 0: whole pages
        assert torch.equal(t[34:36, :small], t0[[10, 11], :small])        # group 1: its bytes only
        assert torch.equal(t[34:36, small:], torch.zeros_like(t[34:36, small:]))
    w.shutdown()
    index.close()
    pool.release()
