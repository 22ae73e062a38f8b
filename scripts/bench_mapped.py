"""Puts and gets through the mapped engine (a pool on tmpfs), against pinned copies and POSIX on the same files.

For each chunk size: the pool (``--total-mib``, striped over ``--stripes``
files in ``--dir``) is opened by the mapped engine (which reserves and
touches every page, so no timed transfer meets fresh memory), then whole
passes over the pool are timed in batches of ``--batch`` chunks, one span
per chunk: puts (slab -> pool), gets (pool -> slab, verified byte-exact).
In the same run: the copy rate between the slab and pinned host memory in
the same chunk sizes (the DMA ceiling) and the POSIX engine on the same
files. ``get, 4 KiB spans`` shows the host cost of one span.

Targets (CUDA slab, from issue 10): 16 MiB gets >= 40 GB/s and >= 0.75x
pinned host-to-device; puts >= 30 GB/s; 1 MiB >= 0.5x the 16 MiB rate.

    python scripts/bench_mapped.py --dir /dev/shm/x --chunk-mib 16 1 --total-mib 4096 --out DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

from gds_kvcache.bench.common import header, print_table, write_json
from gds_kvcache.io.base import Span
from gds_kvcache.io.mapped_engine import MappedEngine
from gds_kvcache.io.posix_engine import PosixEngine
from gds_kvcache.io.select import ram_backed_fs
from gds_kvcache.memory.buffers import SlabBuffer
from gds_kvcache.units import MiB, PAGE

TARGET_GET, TARGET_PUT, TARGET_GET_VS_PINNED, TARGET_SMALL_VS_LARGE = 40.0, 30.0, 0.75, 0.5


def sync(kind: str) -> None:
    if kind == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, kind: str) -> float:
    """Median seconds of ``fn`` after one untimed call."""
    fn()
    sync(kind)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(kind)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def make_pool(directory: str, total: int, stripes: int) -> tuple[list[str], int]:
    os.makedirs(directory, exist_ok=True)
    stripe = total // stripes // PAGE * PAGE
    paths = []
    for i in range(stripes):
        p = os.path.join(directory, f"kvcache.pool.{i}")
        with open(p, "wb") as f:
            f.truncate(stripe)
        paths.append(p)
    return paths, stripe


def batches(chunk: int, stripe: int, stripes: int, batch: int, mem_base: int) -> list[list[Span]]:
    """Every chunk slot of the pool once, round-robin over stripes, ``batch`` spans a call."""
    per_stripe = stripe // chunk
    offs = [(c % stripes) * stripe + (c // stripes) * chunk for c in range(per_stripe * stripes)]
    return [[Span(mem_base + j * chunk, off, chunk) for j, off in enumerate(offs[b:b + batch])]
            for b in range(0, len(offs), batch)]


def run_engine(eng, buf: SlabBuffer, plan_put, plan_get, reps: int, kind: str, region: int) -> dict:
    """(put s, get s, verified) for whole passes over the pool."""
    def put():
        for spans in plan_put:
            errs = eng.write_spans(spans)
            assert not any(errs), errs

    def get():
        for spans in plan_get:
            errs = eng.read_spans(spans)
            assert not any(errs), errs

    eng.attach(buf)
    t_put = timed(put, reps, kind)
    t_get = timed(get, reps, kind)
    # Untimed: every chunk slot must hold the bytes its put came from.
    ok = True
    for spans in plan_get:
        n = sum(s.nbytes for s in spans)
        buf.tensor[region:region + n].fill_(0)
        ok &= not any(eng.read_spans(spans)) and bool(torch.equal(buf.tensor[:n], buf.tensor[region:region + n]))
    return {"put_s": t_put, "get_s": t_get, "verified": ok}


def overhead(eng, buf: SlabBuffer, nspans: int, reps: int, kind: str) -> float:
    """Seconds per span of a batch of 4 KiB gets: the host cost of one span."""
    spans = [Span(j * PAGE, j * PAGE, PAGE) for j in range(nspans)]
    return timed(lambda: eng.read_spans(spans), reps, kind) / nspans


def copy_rate(buf: SlabBuffer, chunk: int, batch: int, reps: int, kind: str) -> tuple[float, float]:
    """GB/s (to slab, from slab) between the slab and pinned (or plain) host memory, chunk by chunk."""
    n = chunk * batch
    if kind == "cuda":
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        host.copy_(buf.tensor[:n].cpu())
        dev = buf.tensor[n:2 * n]
        stream = torch.cuda.Stream()

        def move(to_slab: bool):
            with torch.cuda.stream(stream):
                for j in range(batch):
                    a, b = dev[j * chunk:(j + 1) * chunk], host[j * chunk:(j + 1) * chunk]
                    (a.copy_(b, non_blocking=True) if to_slab else b.copy_(a, non_blocking=True))
            stream.synchronize()
    else:
        host = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
        dev = buf.host_array()[n:2 * n]

        def move(to_slab: bool):
            for j in range(batch):
                a, b = dev[j * chunk:(j + 1) * chunk], host[j * chunk:(j + 1) * chunk]
                np.copyto(a, b) if to_slab else np.copyto(b, a)
    return (n / timed(lambda: move(True), reps, kind) / 1e9, n / timed(lambda: move(False), reps, kind) / 1e9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="pool directory on a RAM-backed file system (created, then removed)")
    ap.add_argument("--chunk-mib", type=float, nargs="+", default=[16.0, 1.0], help="chunk sizes (MiB)")
    ap.add_argument("--total-mib", type=int, default=4096, help="pool size (MiB)")
    ap.add_argument("--batch", type=int, default=64, help="chunks (spans) per write_spans/read_spans call")
    ap.add_argument("--stripes", type=int, default=8, help="pool files")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--task-mib", type=float, default=16.0, help="bytes per piece of a span (MiB)")
    ap.add_argument("--streams", type=int, default=2, help="CUDA streams per calling thread")
    ap.add_argument("--reps", type=int, default=3, help="timed passes over the pool (median)")
    ap.add_argument("--memory", default="auto", choices=["auto", "cuda", "pinned", "host"], help="slab kind")
    ap.add_argument("--skip-posix", action="store_true", help="no POSIX engine rows")
    ap.add_argument("--keep", action="store_true", help="keep the pool files")
    ap.add_argument("--out", default=".", help="directory for bench_mapped.json")
    a = ap.parse_args(argv)
    kind = ("cuda" if torch.cuda.is_available() else "host") if a.memory == "auto" else a.memory
    parent = os.path.dirname(os.path.abspath(a.dir))
    fs = ram_backed_fs(parent)
    if fs is None:
        print(f"warning: {parent} is not RAM-backed; the mapped path is meant for tmpfs", file=sys.stderr)
    task = int(a.task_mib * MiB) // PAGE * PAGE
    rows, reports = [], {}
    try:
        for cm in a.chunk_mib:
            chunk = int(cm * MiB) // PAGE * PAGE
            batch = max(1, min(a.batch, a.total_mib * MiB // chunk // 2))
            region = chunk * batch
            paths, stripe = make_pool(a.dir, a.total_mib * MiB, a.stripes)
            if stripe < chunk:
                raise SystemExit(f"--total-mib {a.total_mib} over {a.stripes} stripes is smaller than one chunk")
            total = (stripe // chunk) * a.stripes * chunk
            buf = SlabBuffer(2 * region, kind)
            buf.tensor[:region].copy_(torch.randint(0, 256, (region,), dtype=torch.uint8))
            plan_put = batches(chunk, stripe, a.stripes, batch, 0)
            plan_get = batches(chunk, stripe, a.stripes, batch, region)
            label = f"{cm:g} MiB"
            t0 = time.perf_counter()
            eng = MappedEngine(paths, a.threads, task, False, kind, stripe, streams=a.streams)
            open_s = time.perf_counter() - t0
            try:
                r = run_engine(eng, buf, plan_put, plan_get, a.reps, kind, region)
                per_span = overhead(eng, buf, min(batch, 64), a.reps, kind)
                reports[label] = eng.report().line()
            finally:
                eng.close()
            rows.append({"chunk": label, "case": "mapped put", "GB/s": total / r["put_s"] / 1e9,
                         "open_s": open_s})
            rows.append({"chunk": label, "case": "mapped get", "GB/s": total / r["get_s"] / 1e9,
                         "verified": r["verified"]})
            rows.append({"chunk": label, "case": "mapped get, 4 KiB spans", "us/span": per_span * 1e6})
            to_slab, from_slab = copy_rate(buf, chunk, batch, a.reps, kind)
            ref = "pinned" if kind == "cuda" else "memcpy"
            rows.append({"chunk": label, "case": f"{ref} to slab", "GB/s": to_slab})
            rows.append({"chunk": label, "case": f"{ref} from slab", "GB/s": from_slab})
            if not a.skip_posix:
                buf.tensor[:region].copy_(torch.randint(0, 256, (region,), dtype=torch.uint8))
                with PosixEngine(paths, a.threads, task, True, kind, stripe) as pe:
                    p = run_engine(pe, buf, plan_put, plan_get, a.reps, kind, region)
                    reports[f"{label} posix"] = pe.report().line()
                rows.append({"chunk": label, "case": "posix put", "GB/s": total / p["put_s"] / 1e9})
                rows.append({"chunk": label, "case": "posix get", "GB/s": total / p["get_s"] / 1e9,
                             "verified": p["verified"]})
            buf.close()
            del buf
            if not a.keep:
                shutil.rmtree(a.dir, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)
    if kind == "cuda":
        _targets(rows)
    print_table(rows, ["chunk", "case", "GB/s", "us/span", "open_s", "verified", "target", "met"],
                title=f"mapped engine, {kind} slab, pool {a.total_mib} MiB on {fs or 'a disk file system'} "
                      f"in {a.stripes} files, {a.batch} chunks a call")
    for k, v in reports.items():
        print(f"  {k}: {v}")
    write_json(os.path.join(a.out, "bench_mapped.json"),
               {**header(), "args": vars(a), "slab": kind, "file_system": fs, "reports": reports, "rows": rows})
    return 0 if all(row.get("verified", True) for row in rows) else 1


def _targets(rows: list[dict]) -> None:
    """Mark the issue's targets on the rows they apply to."""
    def rate(chunk, case):
        return next((r["GB/s"] for r in rows if r["chunk"] == chunk and r["case"] == case), None)

    pinned = rate("16 MiB", "pinned to slab")
    for r in rows:
        if r["chunk"] == "16 MiB" and r["case"] == "mapped get":
            want = max(TARGET_GET, TARGET_GET_VS_PINNED * pinned) if pinned else TARGET_GET
            r["target"], r["met"] = round(want, 1), r["GB/s"] >= want
        elif r["chunk"] == "16 MiB" and r["case"] == "mapped put":
            r["target"], r["met"] = TARGET_PUT, r["GB/s"] >= TARGET_PUT
        elif r["chunk"] == "1 MiB" and r["case"] in ("mapped get", "mapped put"):
            big = rate("16 MiB", r["case"])
            if big:
                r["target"], r["met"] = round(TARGET_SMALL_VS_LARGE * big, 1), r["GB/s"] >= TARGET_SMALL_VS_LARGE * big


if __name__ == "__main__":
    sys.exit(main())
