"""Fleet mode's worker data path driven directly, without vLLM or Redis: two processes, one directory.

Instance A's worker (another process) stores chunks into its writer directory; instance B's worker
reads them read-only through a ``FleetLoadSpec`` naming A's pool, with the scheduler's lease
deadline. The CUDA case (CUDA KV tensors, a CUDA slab, KvikIO/GDS where the file system allows) is
the GPU machine's test of this path; the CPU case runs everywhere. The scheduler side (Redis
lookups, leases) is ``test_vllm_fleet.py``'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gds_kvcache.config import CacheEngineConfig
from gds_kvcache.integrations.vllm.channel import take_result
from gds_kvcache.integrations.vllm.fleet_specs import FleetLoadSpec, FleetStoreSpec, PoolRef
from gds_kvcache.integrations.vllm.specs import entry_from_stored, entry_to_wire
from gds_kvcache.integrations.vllm.worker import DiskOffloadingWorker
from gds_kvcache.key import CacheEngineKey
from gds_kvcache.storage.disk_index import DiskIndex
from gds_kvcache.storage.pool_file import POOL_NAME, PoolDirectory, index_reserve, pieces

LAYERS, BLOCKS, PAGE_BYTES, BPC, N = 4, 48, 4096, 2, 4
BUDGET = 64 << 20


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


def config(root, device):
    return CacheEngineConfig(local_cpu=False, local_disk=str(root), max_local_disk_size=BUDGET / 2**30,
                             slab_size=0.01, memory_device="cuda" if device == "cuda" else "host",
                             io_engine="auto" if device == "cuda" else "posix", io_threads=2,
                             lookup_server_url="redis://127.0.0.1:1/0")   # fleet mode: no Redis is reached


def finish(w, job):
    w.wait({job})
    (r,) = w.get_finished()
    assert r.job_id == job
    return r


def digest(d: str, stripes: int) -> str:
    import hashlib
    h = hashlib.sha256()
    for i in range(stripes):
        with open(os.path.join(d, f"{POOL_NAME}.{i}"), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def writer_process(device: str, root: str, out: str) -> None:
    """Instance A: its worker stores N chunks into ``writers/a.r0`` (the scheduler's part done here:
    reserve, commit); writes the chunks' descriptors and the source rows to ``out``."""
    wdir = os.path.join(root, "writers", "a.r0")
    pool = PoolDirectory(wdir, BUDGET, 2)
    index = DiskIndex(pool, index_reserve(BUDGET))
    index.recover()
    ts, caches = canonical(device, 1)
    w = DiskOffloadingWorker(caches, root, 0, 0, BPC, config(root, device), LAYERS * PAGE_BYTES)
    keys = [CacheEngineKey("vllm", "m", 1, 0, format(i + 1, "x")) for i in range(N)]
    res = index.reserve(keys, [BPC * LAYERS * PAGE_BYTES] * N)
    extents = [(k.to_string(), o, n) for k, o, n in zip(res.keys, res.offsets, res.sizes)]
    src = list(range(3, 3 + BPC * N))
    assert w.submit_store(1, gpu_spec(src), FleetStoreSpec("a+s1", [extents], [wdir]))
    assert finish(w, 1).success
    written = take_result(root, "a+s1", 0)["chunks"]
    done = [entry_from_stored(k, o, n, written[k.to_string()]) for k, o, n in zip(res.keys, res.offsets, res.sizes)]
    index.commit(done, [])
    rows = torch.stack([t[src] for t in ts]).cpu()
    torch.save(rows, out + ".pt")
    with open(out, "w") as f:
        json.dump({"wire": [entry_to_wire(e) for e in done], "layout": pool.layout.fields(), "dir": wdir}, f)
    w.shutdown()
    index.close()
    pool.release()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_worker_reads_another_process_pool_read_only(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = str(tmp_path / "a.json")
    p = subprocess.run([sys.executable, __file__, device, str(tmp_path), out], capture_output=True, text=True,
                       timeout=600, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-4000:]
    with open(out) as f:
        a = json.load(f)
    want = torch.load(out + ".pt")
    lay = a["layout"]
    ref = PoolRef(a["dir"], lay["stripes"], lay["stripe_bytes"], lay["unit"], "boot1", False)
    wire = [tuple(x) for x in a["wire"]]
    ts, caches = canonical(device, 2)
    w = DiskOffloadingWorker(caches, str(tmp_path), 0, 0, BPC, config(tmp_path, device), LAYERS * PAGE_BYTES)
    w.reports_failed_blocks = True
    dst = list(range(20, 20 + BPC * N))
    before_load = digest(a["dir"], lay["stripes"])
    spec = FleetLoadSpec("b+l1", [wire], [[0] * N], [tuple(ref)], time.time() + 30)
    assert w.submit_load(2, spec, gpu_spec(dst))
    r = finish(w, 2)
    assert r.success and w.take_failed_blocks() == set()
    assert torch.equal(torch.stack([t[dst] for t in ts]).cpu(), want)
    res = take_result(str(tmp_path), "b+l1", 0)
    assert (res["bad"], res["failed"]) == ([], [])
    assert digest(a["dir"], lay["stripes"]) == before_load          # B never wrote A's files

    # Past the leases' end nothing read is trusted: every block fails, none is written.
    dst2 = list(range(30, 30 + BPC * N))
    before = torch.stack([t[dst2] for t in ts]).clone()
    late = FleetLoadSpec("b+l2", [wire], [[0] * N], [tuple(ref)], time.time() - 0.01)
    assert w.submit_load(3, late, gpu_spec(dst2)) and finish(w, 3).success
    assert w.take_failed_blocks() == set(dst2)
    assert torch.equal(torch.stack([t[dst2] for t in ts]), before)
    assert take_result(str(tmp_path), "b+l2", 0)["bad"] == []        # not A's chunks' fault

    # A corrupt chunk of A's fails its blocks and is reported bad; the rest lands.
    f_idx, local, _, _ = pieces(wire[1][1], 1, lay["stripes"], lay["unit"])[0]
    with open(os.path.join(a["dir"], f"{POOL_NAME}.{f_idx}"), "r+b") as f:
        f.seek(local + 9)
        byte = f.read(1)
        f.seek(local + 9)
        f.write(bytes([byte[0] ^ 0x5A]))
    dst3 = list(range(38, 38 + BPC * N))
    before = torch.stack([t[dst3] for t in ts]).clone()
    spec3 = FleetLoadSpec("b+l3", [wire], [[0] * N], [tuple(ref)], time.time() + 30)
    assert w.submit_load(4, spec3, gpu_spec(dst3)) and finish(w, 4).success
    assert w.take_failed_blocks() == set(dst3[BPC:2 * BPC])
    got = torch.stack([t[dst3] for t in ts])
    assert torch.equal(got[:, BPC:2 * BPC], before[:, BPC:2 * BPC])
    keep = [i for i in range(BPC * N) if not BPC <= i < 2 * BPC]
    assert torch.equal(got[:, keep].cpu(), want[:, keep])
    assert take_result(str(tmp_path), "b+l3", 0)["bad"] == [wire[1][0]]
    w.shutdown()


if __name__ == "__main__":
    writer_process(*sys.argv[1:4])
