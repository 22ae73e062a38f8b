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
