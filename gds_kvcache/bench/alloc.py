"""``bench-alloc``: allocate+free pairs per second of the slab allocator (target >= 200,000/s)."""

from __future__ import annotations

import os
import random
import time

import torch

from ..cli import ArgumentParser, creatable_dir, int_range
from ..memory import ExtentAllocator, SlabMemoryAllocator
from ..units import MiB
from .common import header, print_table, write_json

__all__ = ["run", "main"]


def run(pairs: int = 200_000, slab_mib: int = 1024) -> dict:
    rows = []
    ext = ExtentAllocator(slab_mib * MiB)
    t = time.perf_counter()
    for _ in range(pairs):
        ext.free_extent(ext.allocate(65536))
    rows.append({"case": "extents only, same size", "pairs/s": pairs / (time.perf_counter() - t)})

    slab = SlabMemoryAllocator(slab_mib * MiB, "host")
    shape = (2, 32, 16, 1024)
    t = time.perf_counter()
    for _ in range(pairs):
        slab.allocate(shape, torch.bfloat16).ref_count_down()
    rows.append({"case": "MemoryObj, same size", "pairs/s": pairs / (time.perf_counter() - t)})

    # A fragmented slab: up to 2,000 live objects of mixed sizes (a quarter of the
    # slab at most), random frees.
    r = random.Random(0)
    nlive = min(2000, slab_mib * MiB // (4 * 160 * 1024))
    live = [slab.allocate((r.randint(1, 4) * 64 * 1024,), torch.uint8) for _ in range(nlive)]
    sizes = [(r.randint(1, 16) * 16 * 1024,) for _ in range(1024)]
    t = time.perf_counter()
    for i in range(pairs):
        o = slab.allocate(sizes[i & 1023], torch.uint8)
        j = r.randrange(len(live))
        live[j].ref_count_down()
        live[j] = o
    rows.append({"case": f"MemoryObj, mixed sizes, {nlive} live", "pairs/s": pairs / (time.perf_counter() - t)})
    slab.memcheck()
    for o in live:
        o.ref_count_down()
    slab.memcheck()
    for row in rows:
        row["target"] = 200_000
        row["met"] = row["pairs/s"] >= 200_000
    return {**header(), "pairs": pairs, "rows": rows}


def main(argv=None) -> int:
    ap = ArgumentParser(prog="gds-kvcache bench-alloc", description=__doc__)
    ap.add_argument("--pairs", type=int_range(1, 10**9), default=200_000,
                    help="allocate+free pairs per case (default 200000)")
    ap.add_argument("--smoke", action="store_true", help="2000 pairs on a 64 MiB slab (for CI)")
    ap.add_argument("--out", type=creatable_dir, default="bench-out")
    a = ap.parse_args(argv)
    r = run(2_000 if a.smoke else a.pairs, 64 if a.smoke else 1024)
    print_table(r["rows"], ["case", "pairs/s", "target", "met"], f"bench-alloc on {r['device']} (one thread)")
    write_json(os.path.join(a.out, "bench_alloc.json"), r)
    return 0
