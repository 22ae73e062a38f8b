"""Restart cost of the disk tier at scale: reopen seconds and resident bytes per chunk, e.g. 1M and 10M chunks.

For each ``--chunks`` count this writes a cache directory of N 4 KiB chunks and reopens it in fresh
processes (children of this script):

* ``backend``: ``LocalDiskBackend`` on the directory (index load, recovery, free-space rebuild, I/O
  engine, hole punching of the free space);
* ``scheduler``: what ``DiskOffloadingManager.__init__`` (the vLLM scheduler) does per shard:
  ``PoolDirectory`` and ``DiskIndex.recover``, with its lookup events as that tree's manager sets them
  (``--sched-events``).

The index is written by the library's own encoder from columns (``IndexLog.snapshot`` of an
``EntryColumns``): the same bytes a snapshot of N ``DiskEntry`` objects gives
(``tests/test_index_log.py::test_snapshot_of_columns_is_the_snapshot_of_objects``), without making
N objects. The pool files stay sparse: only the index is read at start-up. Each child first opens
and closes an empty directory, so imports and compiled kernels are not counted, then reports wall and
CPU seconds of the open, the growth of its resident set (``/proc/self/statm``) per chunk after the
open and at its peak (``ru_maxrss``). ``--ops`` adds one child per tree that times operations on the
reopened index (lookups that hit and miss, a pinned read, a put's reserve and commit, evictions); it
changes the index, so the files are restored after it.

``--baseline PATH`` runs the same children on another source tree (``PYTHONPATH=PATH``; e.g.
``git archive <commit> | tar -x -C PATH``), alternating with this one. Prints a table and writes
``bench_reopen.json``.

Usage: ``python scripts/bench_reopen.py --chunks 1000000,10000000 --dir /dev/shm --out bench-out``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CHUNK = 4096
PREFIX = ("vllm", "meta-llama/Llama-3.1-8B", 1, 0)
SHAPE = (2, 32, 2, 16)           # bfloat16: 4096 bytes
SEED = 7
INDEX_FILES = ("kvcache.index.snap", "kvcache.index.log")


def _config(d: str, budget_gb: float):
    from gds_kvcache import CacheEngineConfig
    from gds_kvcache.units import GB, MiB
    return CacheEngineConfig(local_disk=d, max_local_disk_size=budget_gb, io_engine="posix", memory_device="host",
                             slab_size=MiB / GB)


def _hashes(n: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, 256, (n, 16), dtype=np.uint8)


def write_directory(d: str, n: int, budget_gb: float) -> float:
    """A cache directory of ``n`` chunks at offsets 0, 4 KiB, ... (index only); seconds to write the index."""
    import logging

    from gds_kvcache import LocalDiskBackend, SlabMemoryAllocator
    from gds_kvcache.storage.index_codec import Tables
    from gds_kvcache.storage.index_columns import EntryColumns
    from gds_kvcache.storage.index_decode import Ops
    from gds_kvcache.storage.index_log import IndexLog
    from gds_kvcache.units import MiB

    logging.disable(logging.WARNING)   # a sparse pool larger than the free space is expected here
    LocalDiskBackend(_config(d, budget_gb), None, SlabMemoryAllocator(MiB, "host")).close()
    logging.disable(logging.NOTSET)
    tables = Tables()
    ops = Ops(0)
    ops.is_put = np.ones(n, bool)
    ops.prefix = np.full(n, tables.prefix(PREFIX), np.int64)
    ops.layout = np.full(n, tables.layout((SHAPE, "bfloat16", "KV_2LTD")), np.int64)
    ops.ndig = np.full(n, 32, np.uint8)
    ops.lo = _hashes(n)
    ops.offset = np.arange(n, dtype=np.uint64) * np.uint64(CHUNK)
    ops.phys = np.full(n, CHUNK, np.uint64)
    ops.seq = np.arange(1, n + 1, dtype=np.uint64)
    ops.csum = np.random.default_rng(SEED + 1).integers(0, 2**63, n).astype(np.uint64)
    t = time.perf_counter()
    lg = IndexLog(d)
    lg.load_columns()
    lg.snapshot(EntryColumns(ops, tables))
    lg.close()
    return time.perf_counter() - t


# -- the child: one reopen ---------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open(mode: str, d: str, budget_gb: float, events: bool):
    """Open ``d`` as ``mode`` does; returns (index, thing to keep alive)."""
    if mode == "backend":
        from gds_kvcache import LocalDiskBackend, SlabMemoryAllocator
        from gds_kvcache.units import MiB
        be = LocalDiskBackend(_config(d, budget_gb), None, SlabMemoryAllocator(MiB, "host"))
        return be.index, be
    from gds_kvcache.storage.disk_index import DiskIndex
    from gds_kvcache.storage.pool_file import PoolDirectory, index_reserve
    from gds_kvcache.units import GB
    cap = int(budget_gb * GB)
    pool = PoolDirectory(d, cap, 8)
    idx = DiskIndex(pool, index_reserve(cap), events=events)
    idx.recover()
    if events:
        idx.drain_events()       # the manager drops the recovered chunks' events
    else:
        idx.track_events(True)   # the manager tracks from here on
    return idx, pool


def _per_call(fn, items) -> float:
    """CPU microseconds per call (CPU time: the machine may be shared)."""
    t = time.process_time()
    for x in items:
        fn(x)
    return (time.process_time() - t) / max(1, len(items)) * 1e6


def _ops(idx, n: int) -> dict:
    """CPU microseconds per call of the index's hot operations on the reopened directory (keys
    made anew, equal to the stored ones: a caller's keys, not the index's own objects)."""
    from gds_kvcache import CacheEngineKey
    from gds_kvcache.storage.entry import DiskEntry

    rng = np.random.default_rng(3)
    pick = rng.choice(n, min(n, 20000), replace=False)
    hashes = _hashes(n)[pick]
    hits = [CacheEngineKey(*PREFIX, bytes(h).hex()) for h in hashes]
    misses = [CacheEngineKey(*PREFIX, bytes(h).hex()) for h in rng.integers(0, 256, (len(hits), 16), np.uint8)]
    out = {"contains hit us": _per_call(idx.contains, hits), "contains miss us": _per_call(idx.contains, misses),
           "entry us": _per_call(idx.entry, hits[:5000])}

    def read(k):
        idx.end_read(idx.begin_read([k]))
    out["pinned read us"] = _per_call(read, hits[:5000])
    batch = [hits[i:i + 64] for i in range(0, 5000, 64)]
    out["pinned read, batches of 64, us/chunk"] = _per_call(lambda ks: idx.end_read(idx.begin_read(ks)), batch) / 64

    def put(k):
        res = idx.reserve([k], [CHUNK])
        idx.commit([DiskEntry(k, res.offsets[0], CHUNK, CHUNK, SHAPE, "bfloat16", "KV_2LTD", 1)], [])
    out["put (reserve + commit) us"] = _per_call(put, misses[:5000])
    t = time.process_time()
    first = idx.evict_one()
    out["first eviction ms"] = (time.process_time() - t) * 1e3
    idx.free(first[1])

    def evict(_):
        v = idx.evict_one()
        idx.free(v[1])
    out["eviction us"] = _per_call(evict, range(5000))
    return out


def child(mode: str, d: str, n: int, budget_gb: float, events: bool, ops: bool) -> None:
    import logging
    logging.disable(logging.WARNING)
    warm = tempfile.mkdtemp(prefix="reopen-warm-", dir=os.path.dirname(d))
    try:
        idx, keep = _open(mode, warm, 1.0, events)
        idx.close()
        if mode == "backend":
            keep.close()
        else:
            keep.release()
    finally:
        shutil.rmtree(warm, ignore_errors=True)
    del idx, keep
    r0 = _rss()
    w, c = time.perf_counter(), time.process_time()
    idx, keep = _open(mode, d, budget_gb, events)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    r1 = _rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"chunks": len(idx), "open s": wall, "open cpu s": cpu, "rss B/chunk": (r1 - r0) / n,
           "peak B/chunk": (peak - r0) / n}
    if ops:
        res.update(_ops(idx, n))
    print("RESULT " + json.dumps(res), flush=True)
    os._exit(0)   # no close: a clean reopen must leave the files as they are (no compaction)


# -- the parent ----------------------------------------------------------------------------------------------
def _run_child(tree: str, mode: str, d: str, n: int, budget_gb: float, events: bool, ops: bool) -> dict:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--child-dir", d, "--chunks", str(n),
           "--budget-gb", str(budget_gb), "--sched-events", "on" if events else "off"] + (["--ops"] if ops else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {mode} on {tree or 'this tree'} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="1000000", help="comma-separated chunk counts (default 1000000)")
    ap.add_argument("--dir", default="/dev/shm", help="where the directories go (default /dev/shm)")
    ap.add_argument("--budget-gb", type=float, default=300.0,
                    help="disk budget: its index reserve must hold the index twice (default 300: 10M chunks)")
    ap.add_argument("--reps", type=int, default=2, help="reopens per tree and mode (default 2)")
    ap.add_argument("--modes", default="backend,scheduler")
    ap.add_argument("--baseline", default="", help="another source tree to run the same children on")
    ap.add_argument("--baseline-sched-events", choices=("on", "off"), default="on",
                    help="the baseline manager's events at open (on: it drained them after recover)")
    ap.add_argument("--sched-events", choices=("on", "off"), default="off", help="this tree's manager's events at open")
    ap.add_argument("--ops", action="store_true", help="also time operations on the reopened index")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--child", choices=("backend", "scheduler"), help=argparse.SUPPRESS)
    ap.add_argument("--child-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.child_dir, int(a.chunks), a.budget_gb, a.sched_events == "on", a.ops)
        return 0
    from gds_kvcache.bench.common import header, print_table, write_json

    counts = [int(float(c)) for c in a.chunks.split(",")]
    trees = [("this", "", a.sched_events == "on")]
    if a.baseline:
        trees.insert(0, ("baseline", os.path.abspath(a.baseline), a.baseline_sched_events == "on"))
    modes = a.modes.split(",")
    rows = []
    for n in counts:
        d = tempfile.mkdtemp(prefix="gds_kvcache-reopen-", dir=a.dir)
        saved = d + ".index"
        try:
            write_s = write_directory(d, n, a.budget_gb)
            os.makedirs(saved)
            for f in INDEX_FILES:
                shutil.copy(os.path.join(d, f), saved)
            index_mb = sum(os.path.getsize(os.path.join(d, f)) for f in INDEX_FILES) / 2**20
            print(f"{n} chunks: index of {index_mb:.0f} MiB written in {write_s:.1f} s", flush=True)
            for rep in range(a.reps):
                for mode in modes:
                    for name, tree, events in trees:
                        r = _run_child(tree, mode, d, n, a.budget_gb, events, False)
                        rows.append({"chunks": n, "tree": name, "mode": mode, "rep": rep + 1, **r})
                        print(f"  {name:8} {mode:9} rep {rep + 1}: {r['open s']:.2f} s "
                              f"(cpu {r['open cpu s']:.2f}), {r['rss B/chunk']:.0f} B/chunk", flush=True)
            if a.ops:
                for name, tree, events in trees:
                    r = _run_child(tree, "scheduler", d, n, a.budget_gb, events, True)
                    rows.append({"chunks": n, "tree": name, "mode": "scheduler+ops", "rep": 1, **r})
                    for f in INDEX_FILES:
                        shutil.copy(os.path.join(saved, f), d)
        finally:
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(saved, ignore_errors=True)
    cols = ["chunks", "tree", "mode", "rep", "open s", "open cpu s", "rss B/chunk", "peak B/chunk"]
    print_table(rows, cols, "reopen of a directory of 4 KiB chunks (fresh process each)")
    op_rows = [r for r in rows if r["mode"] == "scheduler+ops"]
    if op_rows:
        op_cols = ["chunks", "tree"] + [k for k in op_rows[0] if k.endswith("us") or k.endswith("ms")
                                        or k.endswith("us/chunk")]
        print_table(op_rows, op_cols, "operations on the reopened index (scheduler view; CPU time a call)")
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "bench_reopen.json"),
               {**header(), "chunk_bytes": CHUNK, "budget_gb": a.budget_gb, "baseline": a.baseline, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
