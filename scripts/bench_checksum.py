"""Batched chunk checksums (``checksum_batch``) against a loop of ``checksum`` per span.

Per-batch host time (the call returns once every result is on the host, so
this is what a caller waits) and GB/s of span bytes, for 64 x 64 KiB,
64 x 1 MiB, 8 x 16 MiB and a mixed batch (1 x 32 MiB + 64 x 64 KiB: work
balance). On a GPU the slab is CUDA memory, else host memory. Prints a
table and writes ``bench_checksum[_TAG].json`` under ``--out``.

``--parallel`` (CPU) also times a ``parallel=True`` (prange over spans)
variant of the batch kernel, from 1 and from 4 calling threads, to check
the single-threaded choice on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gds_kvcache.bench.common import header, print_table, write_json
from gds_kvcache.kernels import checksum, checksum_batch, checksum_host

KiB, MiB = 1 << 10, 1 << 20
CASES = [("64 x 64 KiB", [64 * KiB] * 64), ("64 x 1 MiB", [MiB] * 64), ("8 x 16 MiB", [16 * MiB] * 8),
         ("32 MiB + 64 x 64 KiB", [32 * MiB] + [64 * KiB] * 64)]


def _time(fn, reps: int) -> float:
    fn()  # warm (compile, scratch buffers)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _spans(sizes):
    spans, off = [], 0
    for n in sizes:
        spans.append((off, n))
        off += -(-n // 4096) * 4096  # slab extents are 4 KiB aligned
    return spans, off


def run(device: torch.device, reps: int, scale: int = 1) -> list:
    rows = []
    for name, sizes in CASES:
        sizes = [max(1, n // scale) for n in sizes]
        spans, total = _spans(sizes)
        buf = torch.randint(0, 256, (total,), dtype=torch.uint8).to(device)
        nbytes = sum(sizes)
        host = buf.cpu().numpy()
        exact = checksum_batch(buf, spans) == [checksum_host(host[o:o + n]) for o, n in spans]
        views = [buf[o:o + n] for o, n in spans]
        t_batch = _time(lambda: checksum_batch(buf, spans), reps)
        t_loop = _time(lambda: [checksum(v) for v in views], reps)
        rows.append({"batch": name, "spans": len(spans), "MiB": nbytes / MiB, "batch ms": t_batch * 1e3,
                     "batch GB/s": nbytes / t_batch / 1e9, "loop ms": t_loop * 1e3,
                     "loop GB/s": nbytes / t_loop / 1e9, "speed-up": t_loop / t_batch, "exact": exact})
    return rows


def run_parallel_choice(reps: int, scale: int = 1) -> list:
    """Single-threaded batch kernel (the library's) against a prange one, from 1 and 4 caller threads."""
    from numba import njit, prange

    from gds_kvcache.kernels import checksum_cpu as mod

    @njit(nogil=True, parallel=True)
    def batch_prange(words, b, offs, lens, woffs, out):
        for s in prange(offs.shape[0]):
            off, n, w0 = offs[s], lens[s], woffs[s]
            out[s] = mod.checksum_words(words[w0:w0 + n // 8], b[off:off + n], n)

    rows = []
    for name, sizes in CASES[:3]:
        sizes = [max(1, n // scale) for n in sizes]
        spans, total = _spans(sizes)
        bufs = [np.random.default_rng(i).integers(0, 256, total, dtype=np.uint8) for i in range(4)]
        offs = np.array([o for o, _ in spans], dtype=np.int64)
        lens = np.array([n for _, n in spans], dtype=np.int64)
        for kind, kern in (("single", mod.checksum_batch_words), ("prange", batch_prange)):
            def one(b, kern=kern):
                out = np.empty(len(spans), dtype=np.uint64)
                kern(b.view(np.uint64), b, offs, lens, offs // 8, out)  # numpy buffers are 8-byte aligned
                return out
            assert one(bufs[0]).tolist() == checksum_batch(bufs[0], spans)
            with ThreadPoolExecutor(4) as pool:
                for threads in (1, 4):
                    t = _time(lambda: list(pool.map(one, bufs[:threads])), reps)
                    rows.append({"batch": name, "kernel": kind, "threads": threads,
                                 "GB/s": threads * sum(sizes) / t / 1e9})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per row (median)")
    ap.add_argument("--smoke", action="store_true", help="spans 64x smaller, 2 repetitions")
    ap.add_argument("--parallel", action="store_true", help="also time a prange batch kernel (CPU)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps, scale = (2, 64) if a.smoke else (a.reps, 1)
    rows = run(dev, reps, scale)
    r = dict(header(), slab=str(dev), rows=rows)
    print_table(rows, ["batch", "spans", "MiB", "batch ms", "batch GB/s", "loop ms", "loop GB/s", "speed-up",
                       "exact"], f"checksum_batch on {r['device']} ({dev} slab), median of {reps}")
    if a.parallel:
        r["parallel_choice"] = run_parallel_choice(reps, scale)
        print_table(r["parallel_choice"], ["batch", "kernel", "threads", "GB/s"],
                    "\nCPU batch kernel: single-threaded against prange")
    write_json(os.path.join(a.out, f"bench_checksum{'_' + a.tag if a.tag else ''}.json"), r)
    return 0 if all(x["exact"] for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
