"""Where a put or get spends its time: each stage of the disk path timed alone, per chunk.

Stages: GPU checksum, the engine write/read alone, and the whole backend
put/get, for small and large chunks on one directory. ``--checksum numba,torch``
repeats every row with each GPU checksum implementation (A/B in one run).
Prints a JSON line per row and writes JSON (``--out``). Developer tool behind
the numbers in BENCHMARKS.md.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.kernels.checksum import checksum

checksum_mod = sys.modules["gds_kvcache.kernels.checksum"]  # the package's `checksum` is the function
from gds_kvcache.units import GB, KiB, MiB


def per_op(fn, n):
    ts = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--engines", default="kvikio,posix")
    ap.add_argument("--checksum", default="auto", help="GPU checksum: auto, or a list of numba,torch")
    ap.add_argument("--sizes", default="256K,16M", help="chunk sizes, K or M suffix")
    a = ap.parse_args()
    sizes = [int(x[:-1]) * (KiB if x[-1] in "kK" else MiB) for x in a.sizes.split(",")]
    impls = ["auto"] if a.checksum == "auto" else a.checksum.split(",")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if dev == "cuda" else "host"
    rows = []
    for size, engine, impl in [(s, e, i) for s in sizes for e in a.engines.split(",") for i in impls]:
        n = max(8, min(256, (512 * MiB) // size))
        checksum_mod._NUMBA_GPU = None if impl == "auto" else impl == "numba"
        d = tempfile.mkdtemp(dir=a.dir)
        cfg = CacheEngineConfig(local_disk=d, max_local_disk_size=(3 * n * size + 64 * MiB) / GB,
                                io_engine=engine, io_threads=16, memory_device=kind, preallocate=True)
        alloc = SlabMemoryAllocator(3 * n * size + 64 * MiB, kind)
        be = LocalDiskBackend(cfg, None, alloc)
        objs = []
        for i in range(n):
            o = alloc.allocate((size,), torch.uint8)
            o.tensor.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8, device=dev))
            objs.append(o)
        eng = be._engine
        r = {"size": size, "engine": engine, "checksum": impl, "n": n}
        r["checksum_us"] = per_op(lambda i: checksum(objs[i].byte_array), n)
        offs = [be._space.allocate(size) for _ in range(n)]  # scratch extents, outside any chunk
        r["engine_write_us"] = per_op(lambda i: eng.write(objs[i], offs[i], size), n)
        r["engine_read_us"] = per_op(lambda i: eng.read(objs[i], offs[i], size), n)
        keys = [CacheEngineKey("p", "m", 1, 0, i + 1) for i in range(n)]
        r["put_serial_us"] = per_op(lambda i: be.submit_put_task(keys[i], objs[i]).result(), n)

        def get(i):
            g = be.get_blocking(keys[i])
            g.ref_count_down()

        r["get_serial_us"] = per_op(get, n)
        # Many in flight at once, as the benchmark and prefetch do.
        keys2 = [CacheEngineKey("p", "m", 1, 0, 10_000 + i) for i in range(n)]
        t = time.perf_counter()
        for f in [be.submit_put_task(k, o) for k, o in zip(keys2, objs)]:
            f.result()
        r["put_parallel_GBps"] = n * size / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        got = [f.result() for f in [be.submit_prefetch_task(k) for k in keys2]]
        r["get_parallel_GBps"] = n * size / (time.perf_counter() - t) / 1e9
        for g in got:
            g.ref_count_down()
        # Raw engine, many in flight, no checksum or index.
        pool = ThreadPoolExecutor(16)
        t = time.perf_counter()
        list(pool.map(lambda i: eng.write(objs[i], offs[i], size), range(n)))
        r["engine_parallel_write_GBps"] = n * size / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        list(pool.map(lambda i: eng.read(objs[i], offs[i], size), range(n)))
        r["engine_parallel_read_GBps"] = n * size / (time.perf_counter() - t) / 1e9
        pool.shutdown()
        for off in offs:
            be._space.free_extent(off)
        for o in objs:
            o.ref_count_down()
        be.close()
        shutil.rmtree(d, ignore_errors=True)
        rows.append(r)
        print(json.dumps(r), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "profile_ops.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
