"""Where a shared-mode read of another writer's chunks spends its time (one process, CUDA slab).

``python scripts/profile_shared_read.py [--dir /dev/shm] [--chunks 256] [--chunk-mib 1]``
(needs a redis-server: run it under ``bash scripts/ci-redis.sh``). A writer stores the chunks; a
second backend in the same process reads them as another writer's, per batch size, engine and
thread count, timing the Redis lease round trips, the transfer, the checksum and the whole call;
the same chunks read by the writer itself (local mode's path) are the baseline of the same run.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from gds_kvcache import CacheEngineConfig, CacheEngineKey, SlabMemoryAllocator
from gds_kvcache.shared import SharedDiskBackend
from gds_kvcache.units import GB, MiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--chunks", type=int, default=256)
    ap.add_argument("--chunk-mib", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    url = os.environ["GDS_KVCACHE_REDIS_URL"]
    mem = "cuda" if torch.cuda.is_available() else "host"
    root = tempfile.mkdtemp(prefix="gds-prof.", dir=a.dir)
    numel = a.chunk_mib * MiB // 4
    keys = [CacheEngineKey("vllm", "prof", 1, 0, i) for i in range(a.chunks)]
    need = a.chunks * a.chunk_mib * MiB
    out = []
    try:
        cfg = CacheEngineConfig(local_disk=root, max_local_disk_size=(need + 256 * MiB) / GB, io_engine="auto",
                                io_threads=8, lookup_server_url=url, pool_files=8)
        walloc = SlabMemoryAllocator(need + 64 * MiB, mem)
        w = SharedDiskBackend(cfg, None, walloc, writer_id="w")
        for i in range(0, a.chunks, 64):
            objs = [walloc.allocate((numel,), torch.float32) for _ in keys[i:i + 64]]
            for o in objs:
                o.tensor.copy_(torch.rand(numel, device=o.tensor.device))
            assert all(isinstance(r, int) for r in w.batched_put(keys[i:i + 64], objs))
            for o in objs:
                o.ref_count_down()

        def run(backend, label, batch):
            for _ in range(2):                  # warm-up pass, then the timed one
                n, t = 0, time.perf_counter()
                for i in range(0, a.chunks, batch):
                    got = backend.batched_get_blocking(keys[i:i + batch])
                    assert all(o is not None for o in got), label
                    n += sum(o.nbytes for o in got)
                    for o in got:
                        o.ref_count_down()
                dt = time.perf_counter() - t
            row = {"path": label, "batch": batch, "GBps": n / dt / 1e9, "ms_per_batch": dt * 1e3 / (a.chunks / batch)}
            out.append(row)
            print(f"{label:28s} batch {batch:4d}  {row['GBps']:6.2f} GB/s  {row['ms_per_batch']:7.2f} ms/batch",
                  flush=True)

        for batch in (16, 64):
            run(w, f"local ({w.local.io_report().engine})", batch)
        for engine in ("kvikio", "posix"):
            for threads in (4, 16):
                ralloc = SlabMemoryAllocator(64 * a.chunk_mib * MiB + 64 * MiB, mem)
                r = SharedDiskBackend(cfg.replace(io_engine=engine, io_threads=threads,
                                                  max_local_disk_size=0.05), None, ralloc,
                                      writer_id=f"r-{engine}-{threads}")
                # Time the parts of one remote batch.
                red, tr_ = r.redis, None
                t_acq, t_rel = [], []
                real_acq, real_rel = red.acquire, red.release

                def acq(*x, _r=real_acq):
                    t = time.perf_counter()
                    try:
                        return _r(*x)
                    finally:
                        t_acq.append(time.perf_counter() - t)

                def rel(*x, _r=real_rel):
                    t = time.perf_counter()
                    try:
                        return _r(*x)
                    finally:
                        t_rel.append(time.perf_counter() - t)

                red.acquire, red.release = acq, rel
                for batch in (16, 64):
                    t_acq.clear()
                    t_rel.clear()
                    run(r, f"remote {engine} x{threads}", batch)
                    out[-1]["acquire_ms"] = 1e3 * sum(t_acq) / max(1, len(t_acq))
                    out[-1]["release_ms"] = 1e3 * sum(t_rel) / max(1, len(t_rel))
                    print(f"    acquire {out[-1]['acquire_ms']:.2f} ms, release {out[-1]['release_ms']:.2f} ms per batch")
                tr_ = next(iter(r.remote._readers.values()))[1]
                t = time.perf_counter()
                objs = [ralloc.allocate((numel,), torch.float32) for _ in range(16)]
                ent = [w.local.index.entry(k) for k in keys[:16]]
                for _ in range(5):
                    tr_.read(objs, [e.offset for e in ent])
                out.append({"path": f"transfer only {engine} x{threads}", "batch": 16,
                            "GBps": 5 * 16 * a.chunk_mib * MiB / (time.perf_counter() - t) / 1e9})
                print(f"    transfer only: {out[-1]['GBps']:.2f} GB/s")
                for o in objs:
                    o.ref_count_down()
                r.close()
                ralloc.close()
        w.close()
        walloc.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
