"""Scale figures of shared mode: lookups against Redis, index rebuild, aggregate read GB/s.

``python -m gds_kvcache.shared.bench [--dir /dev/shm/x] [--chunks 100000] [--json out.json]``
starts its own loopback ``redis-server``, prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time

__all__ = ["main"]


def _cfg(path, url, disk_gb):
    from ..config import CacheEngineConfig
    return CacheEngineConfig(local_disk=path, max_local_disk_size=disk_gb, io_engine="posix", io_threads=4,
                             lookup_server_url=url, pool_files=4)


def _open(path, url, ns, wid, disk_gb, slab_mib):
    from ..memory import SlabMemoryAllocator
    from .shared_backend import SharedDiskBackend
    alloc = SlabMemoryAllocator(slab_mib << 20, "host")
    return SharedDiskBackend(_cfg(path, url, disk_gb), None, alloc, writer_id=wid, namespace=ns, tick=0.5), alloc


def _fill(b, alloc, keys, numel):
    import torch
    batch = 256
    for i in range(0, len(keys), batch):
        ks = keys[i:i + batch]
        objs = []
        for _ in ks:
            o = alloc.allocate((numel,), torch.float32)
            o.tensor.copy_(torch.rand(numel))
            objs.append(o)
        res = b.batched_put(ks, objs)
        assert all(isinstance(r, int) for r in res), res[:3]
        for o in objs:
            o.ref_count_down()


def _reader(args, q, go):
    path, url, ns, rid, keys, batch, slab_mib = args
    from ..key import CacheEngineKey
    b, _ = _open(path, url, ns, rid, 0.01, slab_mib)
    ks = [CacheEngineKey.from_string(k) for k in keys]
    for o in b.batched_get_blocking(ks[:batch]):   # warm-up: checksum kernel compile, file opens
        if o is not None:
            o.ref_count_down()
    q.put("ready")
    go.wait()    # all readers start together: the figure is an aggregate, not a sum of solos
    nbytes = 0
    t0 = time.perf_counter()
    for i in range(0, len(ks), batch):
        for o in b.batched_get_blocking(ks[i:i + batch]):
            if o is None:
                raise RuntimeError(f"reader {rid}: a miss ({ {k: v for k, v in b.stats.items() if v} })")
            nbytes += o.nbytes
            o.ref_count_down()
    dt = time.perf_counter() - t0
    b.close()
    q.put((nbytes, t0, t0 + dt))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--chunks", type=int, default=100_000, help="chunks for the rebuild figure")
    ap.add_argument("--read-chunks", type=int, default=256, help="1 MiB chunks read by the readers")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from ..key import CacheEngineKey
    from .local_redis import LocalRedis
    from .redis_index import RedisIndex

    root = tempfile.mkdtemp(prefix="gds-kvcache-shared-bench.", dir=a.dir)
    out: dict = {"dir": a.dir, "cpus": os.cpu_count()}
    srv = LocalRedis()
    try:
        # -- rebuild: one writer with N small chunks re-publishes them all --------------------
        keys = [CacheEngineKey("vllm", "bench", 1, 0, i) for i in range(a.chunks)]
        disk_gb = (a.chunks * 4096 * 1.1 + (64 << 20)) / (1 << 30)
        w, alloc = _open(root, srv.url, "b", "w0", disk_gb, 64)
        t = time.perf_counter()
        _fill(w, alloc, keys, 1024)
        out["fill_s"] = time.perf_counter() - t
        idx = RedisIndex(srv.url, "b")
        w._stop.set()     # no housekeeping re-publish racing the timed one
        w._thread.join()
        idx.client.flushdb()
        t = time.perf_counter()
        n = w.republish()
        out["rebuild_chunks"] = n
        out["rebuild_s"] = time.perf_counter() - t
        # -- lookups: a prompt of P chunks, one round trip --------------------------------------
        for p in (1, 64, 512):
            lat = []
            for j in range(300):
                s = (j * 97) % (a.chunks - p)
                t = time.perf_counter()
                assert w.batched_contains(keys[s:s + p]) == p
                lat.append(time.perf_counter() - t)
            lat.sort()
            out[f"lookup_{p}_p50_us"] = statistics.median(lat) * 1e6
            out[f"lookup_{p}_p99_us"] = lat[int(len(lat) * 0.99) - 1] * 1e6
            out[f"lookup_{p}_chunks_per_s"] = p / statistics.mean(lat)
        t = time.perf_counter()
        for k in keys[:512]:
            w.contains(k)
        out["lookup_512_one_by_one_us"] = (time.perf_counter() - t) * 1e6
        w.close()
        shutil.rmtree(os.path.join(root, "writers", "w0"), ignore_errors=True)
        idx.client.flushdb()
        # -- aggregate read GB/s: 1, 2, 4 reader processes read another writer's chunks ------------
        rkeys = [CacheEngineKey("vllm", "read", 1, 0, i) for i in range(a.read_chunks)]
        w, alloc = _open(root, srv.url, "r", "w1", (a.read_chunks + 64) / 1024, 512)
        _fill(w, alloc, rkeys, 256 * 1024)
        w.close()
        ctx = mp.get_context("spawn")
        for nr in (1, 2, 4):
            q, go = ctx.Queue(), ctx.Event()
            ps = [ctx.Process(target=_reader, args=((root, srv.url, "r", f"rd{nr}-{i}",
                                                     [k.to_string() for k in rkeys], 16, 64), q, go))
                  for i in range(nr)]
            for p in ps:
                p.start()
            got = [q.get(timeout=120) for _ in range(nr)]
            go.set()
            got += [q.get(timeout=120) for _ in range(nr)]
            for p in ps:
                p.join()
            res = [g for g in got if g != "ready"]
            total = sum(r[0] for r in res)
            span = max(r[2] for r in res) - min(r[1] for r in res)
            out[f"read_{nr}_readers_GBps"] = total / span / 1e9
        idx.close()
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    for k, v in out.items():
        print(f"{k:32s} {v:.1f}" if isinstance(v, float) else f"{k:32s} {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
