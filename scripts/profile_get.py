"""Where one cold ``get_blocking`` spends its time: ours (``LocalDiskBackend`` and ``StorageManager``) and LMCache's.

Puts ``--n`` chunks of each ``--sizes`` into each contestant (host slab; LMCache's
``LocalDiskBackend`` with O_DIRECT, built as ``bench_lmcache.py`` builds it),
then, in ``--reps`` interleaved passes, drops the files from the page cache and
reads every chunk back one by one, timing each call and its stages:

* ours: ``index.begin_read``, slab ``allocate``, the engine's ``read_spans``
  (the piece checksums run inside it, on the I/O threads: ``hash`` sums their
  time over all threads), ``finish`` (the checksums' last terms and the compare),
  ``index.end_read``; ``rest`` is the call minus those (argument checks, the
  call gate, the transfer plan, the lookup events);
* ``ours-sm``: the same through ``StorageManager.get`` (no hot tier: every get
  reads the disk);
* LMCache: its allocator's ``allocate`` and ``read_file`` (open, ``readinto``,
  close); ``rest`` is its locks, dict and cache policy.

Every chunk read is compared with what was written. Prints p50 and mean per
stage in microseconds and writes ``profile_get.json``.

Usage: ``python scripts/profile_get.py --dir /root/lmbench --sizes 16M:32,1M:128 --reps 3``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import threading
import time

import torch
from bench_lmcache import Case, _bytes, drop_caches, files_under, lmcache_error, parse_sizes

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator, StorageManager
from gds_kvcache.bench.common import header, print_table
from gds_kvcache.storage.piece_sums import PieceSums
from gds_kvcache.units import GB, MiB


class Timers:
    """Wraps callables so each call's seconds are added to the current get's stage totals."""

    def __init__(self):
        self.cur: dict = {}
        self.lock = threading.Lock()

    def wrap(self, obj, name: str, stage: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with self.lock:
                    self.cur[stage] = self.cur.get(stage, 0.0) + time.perf_counter() - t
        setattr(obj, name, timed)


def ours(d: str, c: Case, through_sm: bool, timers: Timers):
    total = c.nbytes
    cfg = CacheEngineConfig(local_disk=d, max_local_disk_size=(1.5 * total + 256 * MiB) / GB, memory_device="host",
                            local_cpu=False, slab_size=(total + 64 * MiB) / GB)
    if through_sm:
        sm = StorageManager(cfg)
        alloc, be, get, close = sm.allocator, sm.disk, sm.get, sm.close
    else:
        alloc = SlabMemoryAllocator(total + 64 * MiB, "host")
        be = LocalDiskBackend(cfg, None, alloc)
        get = be.get_blocking

        def close():
            be.close()
            alloc.close()
    keys = [CacheEngineKey("vllm", "bench", 1, 0, i + 1) for i in range(c.n)]
    objs = [alloc.allocate(c.shape, torch.bfloat16) for _ in range(c.n)]
    for o, row in zip(objs, c.data[0]):
        _bytes(o.tensor).copy_(row)
    for f in be.batched_submit_put_task(keys, objs):
        f.result()
    for o in objs:
        o.ref_count_down()
    # Stage timers: the profile's own instruments, on this process's objects only.
    timers.wrap(be.index, "begin_read", "begin_read")
    timers.wrap(be.index, "end_read", "end_read")
    timers.wrap(alloc, "batched_allocate", "allocate")
    engine = be._engine
    timers.wrap(engine, "read_spans", "read_spans")
    return get, keys, close, d


def lmcache(d: str, c: Case, timers: Timers):
    from lmcache.utils import CacheEngineKey as LKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend import CreateStorageBackends

    total = c.nbytes
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=c.shape[2], local_cpu=False,
                                            max_local_cpu_size=(total + 64 * MiB) / GB, local_disk=d,
                                            max_local_disk_size=(1.5 * total + 256 * MiB) / GB,
                                            extra_config={"use_odirect": True})
    meta = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                           kv_dtype=torch.bfloat16, kv_shape=(c.shape[1], 2, c.shape[2], 8, 128))
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    backends = CreateStorageBackends(cfg, meta, loop)
    cpu, disk = backends["LocalCPUBackend"], backends["LocalDiskBackend"]
    keys = [LKey("bench", 1, 0, i + 1, torch.bfloat16) for i in range(c.n)]
    objs = [cpu.allocate(torch.Size(c.shape), torch.bfloat16, MemoryFormat.KV_2LTD) for _ in range(c.n)]
    for o, row in zip(objs, c.data[0]):
        _bytes(o.tensor).copy_(row)
    done = threading.Semaphore(0)
    disk.batched_submit_put_task(keys, objs, on_complete_callback=lambda _k: done.release())
    for _ in range(c.n):
        done.acquire()
    for o in objs:
        o.ref_count_down()
    timers.wrap(cpu, "allocate", "allocate")
    timers.wrap(disk, "read_file", "read_file")

    def close():
        disk.close()
        cpu.close()
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
    return disk.get_blocking, keys, close, d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="work directory on the disk under test")
    ap.add_argument("--sizes", default="16M:32,1M:128")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-lmcache", action="store_true")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    why = "--no-lmcache given" if a.no_lmcache else lmcache_error()
    if why:
        print(f"LMCache skipped: {why}")
    hash_time = {"s": 0.0, "finish": 0.0}
    hash_lock = threading.Lock()
    call = PieceSums.__call__

    def hashed(self, mo, n):     # summed over the I/O threads: it overlaps the reads
        t = time.perf_counter()
        try:
            return call(self, mo, n)
        finally:
            with hash_lock:
                hash_time["s"] += time.perf_counter() - t
    PieceSums.__call__ = hashed
    finish = PieceSums.result

    def finished(self, which=None):
        t = time.perf_counter()
        try:
            return finish(self, which)
        finally:
            hash_time["finish"] += time.perf_counter() - t
    PieceSums.result = finished
    result = {**header(), "dir": a.dir, "load_before": os.getloadavg(), "cases": []}
    rows = []
    for ci, c in enumerate(Case(size, n, seed=i) for i, (size, n) in enumerate(parse_sizes(a.sizes))):
        timers = {}
        runs = {}
        for name in ["ours", "ours-sm"] + ([] if why else ["lmcache"]):
            t = timers[name] = Timers()
            d = os.path.join(a.dir, f"profile-{name}")
            shutil.rmtree(d, ignore_errors=True)
            runs[name] = lmcache(d, c, t) if name == "lmcache" else ours(d, c, name == "ours-sm", t)
        stages: dict = {name: {} for name in runs}
        for r in range(a.reps):
            order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
            for name in order:
                get, keys, _, d = runs[name]
                t = timers[name]
                drop_caches(files_under(d))
                got = []
                for k in keys:
                    t.cur = {}
                    hash_time["s"] = hash_time["finish"] = 0.0
                    t0 = time.perf_counter()
                    o = get(k)
                    total = time.perf_counter() - t0
                    got.append(o)
                    cur = dict(t.cur)
                    if name != "lmcache":
                        cur["hash"] = hash_time["s"]
                        cur["finish"] = hash_time["finish"]
                    inside = sum(v for s, v in cur.items() if s != "hash")
                    cur["rest"] = total - inside
                    cur["total"] = total
                    for s, v in cur.items():
                        stages[name].setdefault(s, []).append(v)
                bad = [i for i, o in enumerate(got) if o is None or not torch.equal(_bytes(o.tensor), c.data[0][i])]
                if bad:
                    raise SystemExit(f"{name}: {len(bad)} chunk(s) missing or wrong")
                for o in got:
                    o.ref_count_down()
        label = f"{c.size // 1024}K x {c.n}"
        case = {"case": label, "stages_us": {}}
        for name, st in stages.items():
            case["stages_us"][name] = {s: {"p50": statistics.median(v) * 1e6, "mean": statistics.mean(v) * 1e6}
                                       for s, v in st.items()}
            for s, v in case["stages_us"][name].items():
                rows.append({"case": label, "who": name, "stage": s, "p50 us": f"{v['p50']:.0f}",
                             "mean us": f"{v['mean']:.0f}"})
        result["cases"].append(case)
        for _, _, close, d in runs.values():
            close()
            shutil.rmtree(d, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    print_table(rows, ["case", "who", "stage", "p50 us", "mean us"],
                f"one cold get_blocking, by stage (load {result['load_before'][0]:.2f} -> "
                f"{result['load_after'][0]:.2f}); hash runs inside read_spans, on the I/O threads")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "profile_get.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
