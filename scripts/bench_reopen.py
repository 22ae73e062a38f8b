"""Restart cost of the disk tier at scale: a directory of ``--chunks`` chunks, reopened by ``LocalDiskBackend``.

Writes the index of N 64 KiB chunks directly (``IndexLog.snapshot``; the pool files stay sparse, since
only the index is read at start-up), then times opening a ``LocalDiskBackend`` on the directory twice
(load, recovery, free-space rebuild) and closing it. Prints a table and writes ``bench_reopen.json``.

Usage: ``python scripts/bench_reopen.py --chunks 1000000 --out bench-out``
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.bench.common import header, print_table, write_json
from gds_kvcache.storage.entry import DiskEntry
from gds_kvcache.storage.index_log import IndexLog
from gds_kvcache.units import GB, MiB

CHUNK = 64 * 1024


def run(chunks: int, workdir: str, reps: int = 2) -> dict:
    d = os.path.join(workdir, "reopen")
    cfg = CacheEngineConfig(local_disk=d, max_local_disk_size=chunks * CHUNK * 1.15 / GB, io_engine="posix",
                            memory_device="host", slab_size=MiB / GB)
    logging.disable(logging.WARNING)  # the sparse pool may exceed the free space: that warning is expected
    try:
        LocalDiskBackend(cfg, None, SlabMemoryAllocator(MiB, "host")).close()
        hashes = np.random.default_rng(0).integers(0, 2**63, chunks)
        log = IndexLog(d)
        log.load()
        t = time.perf_counter()
        log.snapshot(DiskEntry(CacheEngineKey("vllm", "meta-llama/Llama-3.1-8B", 1, 0, format(int(h), "032x")),
                               i * CHUNK, CHUNK, CHUNK, (2, 32, 2, 256), "bfloat16", "KV_2LTD", int(h))
                     for i, h in enumerate(hashes))
        log.close()
        write_s = time.perf_counter() - t
        gc.collect()
        rows = []
        for rep in range(reps):
            t = time.perf_counter()
            be = LocalDiskBackend(cfg, None, SlabMemoryAllocator(MiB, "host"))
            open_s = time.perf_counter() - t
            live = len(be.keys())
            t = time.perf_counter()
            be.close()
            rows.append({"reopen": rep + 1, "chunks": live, "open s": open_s, "us/chunk": open_s / chunks * 1e6,
                         "close s": time.perf_counter() - t})
            del be
            gc.collect()
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(d, ignore_errors=True)
    return {**header(), "chunks": chunks, "index write s": write_s, "index bytes per chunk": 56, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="where the directory goes (default: the temp directory)")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    if a.chunks < 1:
        ap.error("--chunks must be at least 1")
    work = tempfile.mkdtemp(prefix="gds_kvcache-reopen-", dir=a.dir)
    try:
        r = run(a.chunks, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(r["rows"], ["reopen", "chunks", "open s", "us/chunk", "close s"],
                f"reopen of {a.chunks} chunks (index written in {r['index write s']:.2f} s)")
    write_json(os.path.join(a.out, "bench_reopen.json"), r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
