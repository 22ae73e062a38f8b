"""Ours against LMCache's ``LocalDiskBackend`` (O_DIRECT) on the same disk, in interleaved rounds.

Each round runs three contestants, in an order rotated from round to round, on
every ``--sizes`` case (default 64 x 16 MiB and 256 x 1 MiB, host memory):

* ``ours``: ``gds_kvcache.LocalDiskBackend`` over a host ``SlabMemoryAllocator``
  (defaults: ``io_engine`` auto, ``io_threads`` 16, checksums verified);
* ``lmcache``: LMCache's ``LocalDiskBackend`` built as LMCache builds it
  (``CreateStorageBackends`` with ``local_disk``, ``max_local_disk_size``,
  ``extra_config={"use_odirect": True}``, its ``LocalCPUBackend`` allocator and
  an event loop on its own thread), skipped, saying so, where ``lmcache`` is not
  importable;
* ``raw``: plain O_DIRECT ``pwritev``/``preadv`` of the same bytes with no
  library logic: ``raw`` splits them into 4 MiB pieces over ``--raw-threads``
  threads (the disk's rate), ``raw1`` moves one chunk per syscall, one chunk
  after another (what a one-by-one caller could get from one call).

Phases, each timed on its own: ``put1`` (``submit_put_task`` per chunk, then
wait for all), ``putB`` (one ``batched_submit_put_task`` of a second set of
keys), ``get1`` (``get_blocking`` per chunk of the first set) and ``getB`` (one
``batched_get_blocking`` of the second set). The page cache is dropped before
each get phase (``POSIX_FADV_DONTNEED`` of every file of the contestant, or with
``--drop all`` the whole cache, as root), so gets are cold. Every chunk read back
is compared byte for byte with what was written; a mismatch or a miss fails the
run. Prints GB/s per round and medians with their spread, the ratios ours /
LMCache and ours / raw, and writes JSON.

Usage: ``python scripts/bench_lmcache.py --dir /root/lmbench --rounds 3 --out bench-out``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.bench.common import header, print_table
from gds_kvcache.io.driver import fs_type
from gds_kvcache.io.select import ram_backed_fs
from gds_kvcache.units import GB, MiB

PHASES = ("put1", "putB", "get1", "getB")
PIECE = 4 * MiB


def lmcache_error() -> str | None:
    """Why LMCache's disk backend cannot run here, or None."""
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
    try:
        import lmcache  # noqa: F401
        from lmcache.v1.storage_backend import CreateStorageBackends  # noqa: F401
    except Exception as e:  # ImportError, or a missing dependency of its import chain
        return f"lmcache not importable ({type(e).__name__}: {e})"
    return None


DROP = {"mode": "files"}


def drop_caches(files) -> str:
    """Make the next reads come from the disk: fsync and ``POSIX_FADV_DONTNEED`` every file of the
    contestant (``--drop files``), or the whole page cache (``--drop all``, root only)."""
    if DROP["mode"] == "all":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def files_under(d: str) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]


def shape_of(size: int) -> tuple:
    """A KV chunk [2, layers, T tokens, 1024] of bf16 holding ``size`` bytes: 32 layers where
    ``size`` is whole tokens of them (128 KiB each), else 1 layer (4 KiB a token: smoke runs)."""
    for layers in (32, 1):
        tokens, rest = divmod(size, 2 * layers * 1024 * 2)
        if tokens >= 1 and rest == 0:
            return (2, layers, tokens, 1024)
    raise SystemExit(f"--sizes: {size} bytes is not a multiple of 4 KiB")


class Case:
    def __init__(self, size: int, n: int, seed: int):
        self.size, self.n = size, n
        self.shape = shape_of(size)
        g = torch.Generator().manual_seed(seed)
        # Two sets of keys: one put and read one by one, one batched.
        self.data = [torch.randint(0, 256, (n, size), dtype=torch.uint8, generator=g) for _ in range(2)]

    @property
    def nbytes(self) -> int:
        return self.n * self.size


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _verify(objs, ref: torch.Tensor, who: str, tensor_of) -> None:
    bad = [i for i, o in enumerate(objs) if o is None or not torch.equal(_bytes(tensor_of(o)), ref[i])]
    if bad:
        raise SystemExit(f"{who}: {len(bad)} chunk(s) missing or wrong (first: {bad[0]})")


# -- contestants: each returns {phase: seconds, ...} -------------------------------------------------

def run_ours(d: str, c: Case, io_engine: str) -> dict:
    total = c.nbytes
    cfg = CacheEngineConfig(local_disk=d, max_local_disk_size=(2.5 * total + 256 * MiB) / GB, memory_device="host",
                            io_engine=io_engine)
    alloc = SlabMemoryAllocator(total + 64 * MiB, "host")
    backend = LocalDiskBackend(cfg, None, alloc)
    keys = [[CacheEngineKey("vllm", "bench", 1, 0, (s << 32) + i + 1) for i in range(c.n)] for s in range(2)]
    out = {"engine": backend.io_report().line()}
    try:
        for s, phase in enumerate(("put1", "putB")):
            objs = [alloc.allocate(c.shape, torch.bfloat16) for _ in range(c.n)]
            for o, row in zip(objs, c.data[s]):
                _bytes(o.tensor).copy_(row)

            def put():
                if phase == "put1":
                    futs = [backend.submit_put_task(k, o) for k, o in zip(keys[s], objs)]
                else:
                    futs = backend.batched_submit_put_task(keys[s], objs)
                for f in futs:
                    f.result()
            out[phase] = _timed(put)
            for o in objs:
                o.ref_count_down()
        for s, phase in enumerate(("get1", "getB")):
            out["drop"] = drop_caches(files_under(d))
            got: list = []
            lat: list = []

            def get():
                if phase == "get1":
                    for k in keys[s]:
                        t = time.perf_counter()
                        got.append(backend.get_blocking(k))
                        lat.append(time.perf_counter() - t)
                else:
                    got.extend(backend.batched_get_blocking(keys[s]))
            out[phase] = _timed(get)
            if lat:
                out["get1_p50_ms"] = statistics.median(lat) * 1e3
            _verify(got, c.data[s], f"ours {phase}", lambda o: o.tensor)
            for o in got:
                o.ref_count_down()
    finally:
        backend.close()
        alloc.close()
    return out


def run_lmcache(d: str, c: Case, threads: int | None) -> dict:
    from lmcache.utils import CacheEngineKey as LKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend import CreateStorageBackends

    total = c.nbytes
    extra = {"use_odirect": True}
    if threads is not None:
        extra["disk_io_threads"] = threads
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=c.shape[2], local_cpu=False,
                                            max_local_cpu_size=(total + 64 * MiB) / GB, local_disk=d,
                                            max_local_disk_size=(2.5 * total + 256 * MiB) / GB, extra_config=extra)
    meta = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                           kv_dtype=torch.bfloat16, kv_shape=(32, 2, c.shape[2], 8, 128))
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    backends = CreateStorageBackends(cfg, meta, loop)
    cpu, disk = backends["LocalCPUBackend"], backends["LocalDiskBackend"]
    keys = [[LKey("bench", 1, 0, (s << 32) + i + 1, torch.bfloat16) for i in range(c.n)] for s in range(2)]
    out = {"engine": f"LMCache LocalDiskBackend, use_odirect={disk.use_odirect}, "
                     f"{disk.disk_worker.executor.max_workers} disk threads"}
    try:
        for s, phase in enumerate(("put1", "putB")):
            objs = [cpu.allocate(torch.Size(c.shape), torch.bfloat16, MemoryFormat.KV_2LTD) for _ in range(c.n)]
            for o, row in zip(objs, c.data[s]):
                _bytes(o.tensor).copy_(row)
            done = threading.Semaphore(0)

            def put():
                if phase == "put1":
                    for k, o in zip(keys[s], objs):
                        disk.submit_put_task(k, o, on_complete_callback=lambda _k: done.release())
                else:
                    disk.batched_submit_put_task(keys[s], objs, on_complete_callback=lambda _k: done.release())
                for _ in range(c.n):
                    if not done.acquire(timeout=600):
                        raise SystemExit(f"lmcache {phase}: a put never completed")
            out[phase] = _timed(put)
            for o in objs:
                o.ref_count_down()
            missing = [k for k in keys[s] if not disk.contains(k)]
            if missing:
                raise SystemExit(f"lmcache {phase}: {len(missing)} key(s) not stored")
        for s, phase in enumerate(("get1", "getB")):
            out["drop"] = drop_caches(files_under(d))
            got: list = []
            lat: list = []

            def get():
                if phase == "get1":
                    for k in keys[s]:
                        t = time.perf_counter()
                        got.append(disk.get_blocking(k))
                        lat.append(time.perf_counter() - t)
                else:
                    got.extend(disk.batched_get_blocking(keys[s]))
            out[phase] = _timed(get)
            if lat:
                out["get1_p50_ms"] = statistics.median(lat) * 1e3
            _verify(got, c.data[s], f"lmcache {phase}", lambda o: o.tensor)
            for o in got:
                o.ref_count_down()
    finally:
        disk.close()
        cpu.close()
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
    return out


def run_raw(d: str, c: Case, threads: int) -> dict:
    """``raw``: 4 MiB pieces over ``threads`` threads; ``raw1``: one syscall per chunk, in order."""
    os.makedirs(d, exist_ok=True)
    total = c.nbytes
    from gds_kvcache.memory.buffers import SlabBuffer  # page-aligned host memory, as O_DIRECT needs

    bufs = [SlabBuffer(total, "host") for _ in range(2)]
    out: dict = {"engine": f"O_DIRECT pwritev/preadv, {PIECE // MiB} MiB pieces on {threads} threads; "
                           f"raw1: one call per chunk"}
    pool = ThreadPoolExecutor(threads)
    fds = []
    try:
        for s in range(2):
            bufs[s].tensor.copy_(c.data[s].reshape(-1))
        names = [os.path.join(d, f"raw.{s}") for s in range(2)]
        for p in names:
            fds.append(os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644))
        mvs = [memoryview(b.host_array()) for b in bufs]

        def parallel(op, s):
            pieces = range(0, total, PIECE)
            list(pool.map(lambda o: op(fds[s], [mvs[s][o:o + PIECE]], o), pieces))

        def serial(op, s):
            for i in range(c.n):
                o = i * c.size
                if op(fds[s], [mvs[s][o:o + c.size]], o) != c.size:
                    raise SystemExit("raw: short transfer")

        out["put1"] = _timed(lambda: serial(os.pwritev, 0))
        out["putB"] = _timed(lambda: parallel(os.pwritev, 1))
        out["drop"] = drop_caches(names)
        bufs[0].tensor.zero_()
        out["get1"] = _timed(lambda: serial(os.preadv, 0))
        out["drop"] = drop_caches(names)
        bufs[1].tensor.zero_()
        out["getB"] = _timed(lambda: parallel(os.preadv, 1))
        for s in range(2):
            if not torch.equal(bufs[s].tensor, c.data[s].reshape(-1)):
                raise SystemExit("raw: bytes read back differ")
    finally:
        pool.shutdown()
        for fd in fds:
            os.close(fd)
        for b in bufs:
            b.close()
    # raw1 is the serial form of every phase, raw the parallel one: report both per phase.
    return {"raw": {"engine": out["engine"], "put1": out["putB"], "putB": out["putB"], "get1": out["getB"],
                    "getB": out["getB"]},
            "raw1": {"engine": out["engine"], "put1": out["put1"], "putB": out["put1"], "get1": out["get1"],
                     "getB": out["get1"]}}


# -- rounds and report ------------------------------------------------------------------------------

def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``16M:64,1M:256`` -> [(16 MiB, 64), (1 MiB, 256)]."""
    out = []
    for part in text.split(","):
        size, _, n = part.partition(":")
        unit = {"K": 1024, "M": MiB}[size[-1].upper()]
        out.append((int(size[:-1]) * unit, int(n)))
    return out


def run_one(who: str, d: str, c: Case, a) -> dict:
    """One contestant on case ``c`` in a fresh directory ``d`` (removed afterwards)."""
    shutil.rmtree(d, ignore_errors=True)
    gc.collect()
    try:
        if who == "ours":
            return {"ours": run_ours(d, c, a.io_engine)}
        if who == "lmcache":
            return {"lmcache": run_lmcache(d, c, a.lmcache_threads)}
        return run_raw(d, c, a.raw_threads)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="work directory on the disk under test (not tmpfs)")
    ap.add_argument("--sizes", default="16M:64,1M:256", help="size:count pairs (default 16M:64,1M:256)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-engine", default="auto", help="ours: io_engine (default auto)")
    ap.add_argument("--lmcache-threads", type=int, default=None,
                    help="LMCache disk_io_threads (default: LMCache's own default, 4)")
    ap.add_argument("--raw-threads", type=int, default=16)
    ap.add_argument("--no-lmcache", action="store_true", help="run ours and raw only")
    ap.add_argument("--allow-ram", action="store_true", help="allow a RAM-backed --dir (tmpfs): no disk then")
    ap.add_argument("--drop", choices=("files", "all"), default="files",
                    help="before each get phase drop the contestant's files from the page cache (files), or "
                         "the whole page cache (all: root only; other processes' reads go cold too)")
    ap.add_argument("--out", default="bench-out", help="directory for bench_lmcache.json")
    a = ap.parse_args(argv)
    DROP["mode"] = a.drop
    os.makedirs(a.dir, exist_ok=True)
    ram = ram_backed_fs(a.dir)
    if ram and not a.allow_ram:
        ap.error(f"--dir {a.dir} is on {ram}: this compares disks; pick a directory on one (or --allow-ram)")
    why = "--no-lmcache given" if a.no_lmcache else lmcache_error()
    names = ["ours", "raw"] + ([] if why else ["lmcache"])
    if why:
        print(f"LMCache skipped: {why}; running ours and raw only")
    cases = [Case(size, n, seed=i) for i, (size, n) in enumerate(parse_sizes(a.sizes))]
    import gds_kvcache

    result = {**header(), "dir": a.dir, "fs": fs_type(a.dir), "ours_src": os.path.dirname(gds_kvcache.__file__),
              "lmcache_skipped": why, "rounds": []}
    if not why:
        import lmcache

        result["lmcache"] = getattr(lmcache, "__version__", "?")
    print(f"dir {a.dir} on {result['fs']}; ours from {result['ours_src']}; contestants: {', '.join(names)}; "
          f"load {os.getloadavg()}")
    # One untimed pass of each at a small size: first-use costs (imports, JIT caches, thread pools)
    # stay out of round 0.
    for who in names:
        run_one(who, os.path.join(a.dir, f"warmup-{who}"), Case(MiB, 4, seed=99), a)
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        rnd = {"round": r, "order": order, "load_before": os.getloadavg(), "cases": []}
        for c in cases:
            rows = {}
            for who in order:
                rows.update(run_one(who, os.path.join(a.dir, f"{who}-{c.size}"), c, a))
            gbps = {w: {p: c.nbytes / rows[w][p] / 1e9 for p in PHASES} for w in rows}
            rnd["cases"].append({"size": c.size, "n": c.n, "seconds": rows, "gbps": gbps})
        rnd["load_after"] = os.getloadavg()
        result["rounds"].append(rnd)
        report_round(rnd, names)
    result["summary"] = summary(result["rounds"], cases, names)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "bench_lmcache.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {path}")
    return 0


def _ratios(g: dict, names) -> dict:
    """ours / LMCache, and each library against the disk's rate (``raw``) and, one by one, against
    ``raw1`` (one syscall per chunk: what a caller holding one chunk in flight can get)."""
    out = {}
    for p in PHASES:
        for who in ("ours", "lmcache") if "lmcache" in names else ("ours",):
            short = "lmc" if who == "lmcache" else who
            if who == "ours" and "lmcache" in names:
                out[f"ours/lmc {p}"] = g["ours"][p] / g["lmcache"][p]
            out[f"{short}/raw {p}"] = g[who][p] / g["raw"][p]
            if p.endswith("1"):
                out[f"{short}/raw1 {p}"] = g[who][p] / g["raw1"][p]
    return out


def report_round(rnd: dict, names) -> None:
    rows = []
    for cs in rnd["cases"]:
        for who, g in cs["gbps"].items():
            rows.append({"size": f"{cs['size'] // 1024}K x {cs['n']}", "who": who,
                         **{p: f"{g[p]:.2f}" for p in PHASES},
                         "get1 p50 ms": f"{cs['seconds'][who].get('get1_p50_ms', float('nan')):.2f}"})
    print_table(rows, ["size", "who", *PHASES, "get1 p50 ms"],
                f"round {rnd['round']} (order {', '.join(rnd['order'])}; load {rnd['load_before'][0]:.2f} -> "
                f"{rnd['load_after'][0]:.2f}): GB/s")


def summary(rounds: list, cases, names) -> dict:
    out = {}
    rows = []
    for ci, c in enumerate(cases):
        per = {}
        for rnd in rounds:
            g = rnd["cases"][ci]["gbps"]
            for who, ph in g.items():
                for p, v in ph.items():
                    per.setdefault(f"{who} {p}", []).append(v)
            for k, v in _ratios(g, names).items():
                per.setdefault(k, []).append(v)
        label = f"{c.size // 1024}K x {c.n}"
        out[label] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
                      for k, v in per.items()}
        for k, v in per.items():
            rows.append({"case": label, "what": k, "median": f"{statistics.median(v):.2f}",
                         "spread": f"{min(v):.2f}-{max(v):.2f}"})
    print_table(rows, ["case", "what", "median", "spread"], f"medians over {len(rounds)} round(s) (GB/s, ratios)")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
