"""``bench``: put/get GB/s through the library against the paths users could take instead.

For each chunk size, the same random bytes go through:

* ``library``: ``StorageManager`` + ``LocalDiskBackend`` (GPU slab on a GPU
  node, host slab elsewhere), once per I/O engine; ``library-kvikio`` stages
  a GPU slab through the library's pipelined pinned lanes where KvikIO runs
  in compat mode, ``library-kvikio-device`` through KvikIO's own bounce
  buffers (``kvikio_staging="kvikio"``): both ways, in one run;
* ``raw O_DIRECT``: plain parallel ``pwritev``/``preadv`` of host memory with no
  library logic (the ceiling of the disk and this thread count);
* ``pinned-pwrite`` / ``pinned-pipelined``: ``raw`` with the chunks in GPU
  memory, each thread copying through pinned buffers: copy then I/O, or the
  copy of one piece overlapping the I/O of the last (the ceiling of a staged
  path next to ``raw``);
* ``torch.save/load``: one file per chunk;
* ``pinned bounce``: copy to a pinned buffer and ``write``, ``readinto`` and
  copy back, one file per chunk (how LMCache's LocalDiskBackend moves bytes);
* ``kvikio defaults``: ``kvikio.CuFile`` per chunk with KvikIO's default
  settings (1 thread, 4 MiB tasks).

Cold reads drop the page cache of the files involved first (tmpfs has none
to drop: its "disk" is memory); hot reads repeat the read without dropping.
Every read is compared byte for byte with what was written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any, Callable

import torch

from ..cli import ArgumentParser, creatable_dir, existing_dir, int_range
from ..config import CacheEngineConfig
from ..io.driver import fs_type, kvikio_error
from ..io.page_cache import drop_page_cache
from ..io.select import ram_backed_fs
from ..key import CacheEngineKey
from ..storage.storage_manager import StorageManager
from ..units import GB, KiB, MiB
from .baselines import path_bounce, path_kvikio_default, path_raw, path_staged, path_torch
from .case import Case, timed
from .common import header, print_table, write_json
from .progress import Progress

__all__ = ["run", "main"]

ALL_PATHS = ("library-mapped", "library-kvikio", "library-kvikio-device", "library-posix", "raw", "pinned-pwrite",
             "pinned-pipelined", "torch", "bounce", "kvikio-default")
#: library path -> (io_engine, kvikio_staging)
LIBRARY_PATHS = {"library-mapped": ("mapped", "pipelined"), "library-kvikio": ("kvikio", "pipelined"),
                 "library-kvikio-device": ("kvikio", "kvikio"), "library-posix": ("posix", "pipelined")}


def path_library(c: Case, path: str, hot: bool, memory: str) -> dict:
    """The library through its batch API: ``batch`` chunks per call, every batch in flight at once."""
    engine, staging = LIBRARY_PATHS[path]
    d = c.dir(path)
    total = c.n * c.size
    # A cache larger than one run's data, as in service.
    cfg = CacheEngineConfig(local_disk=d, max_local_disk_size=(2 * total + 64 * MiB) / GB, local_cpu=False,
                            slab_size=(2 * total + 64 * MiB) / GB, memory_device=memory, io_engine=engine,
                            io_threads=c.threads, io_task_size=c.task, pool_files=c.files,
                            preallocate=c.preallocate, kvikio_staging=staging)
    keys = [CacheEngineKey("bench", "m", 1, 0, i + 1) for i in range(c.n)]
    batches = [slice(i, i + c.batch) for i in range(0, c.n, c.batch)]
    out = {}
    with StorageManager(cfg) as sm:
        out["io"] = sm.io_report().line()
        objs = sm.batched_allocate([(c.size,)] * c.n, torch.uint8)
        assert len(objs) == c.n, "bench slab too small"
        for o, p in zip(objs, c.parts):
            o.tensor.copy_(p)
        for o in objs:
            o.ref_count_up()  # the bench keeps its own, so puts can be repeated

        def put():
            futs = []
            for b in batches:
                futs.extend(sm.batched_submit_put_task(keys[b], objs[b]))
            for f in futs:
                f.result()

        before = dict(sm.disk.stats)
        out["put"] = timed(put, c.dev)
        got = []

        def get():
            futs = [sm.disk.batched_submit_prefetch_task(keys[b]) for b in batches]
            for f in futs:
                got.extend(f.result())

        drop_page_cache(sm.disk.pool_paths)
        out["get"] = timed(get, c.dev)
        st = sm.disk.stats
        out["calls"] = {k: (st[k] - before.get(k, 0)) / (2 * c.n) for k in ("write_calls", "read_calls",
                                                                             "checksum_calls", "spans")}
        out["ok"] = all(g is not None and c.same(i, g.tensor) for i, g in enumerate(got))
        for g in got:
            if g is not None:
                g.ref_count_down()
        if hot:
            got.clear()
            out["hot"] = timed(get, c.dev)
            out["ok"] &= all(g is not None and c.same(i, g.tensor) for i, g in enumerate(got))
            for g in got:
                if g is not None:
                    g.ref_count_down()
        for o in objs:
            o.ref_count_down()
    return out


def h2d_ceiling(dev, nbytes: int) -> dict:
    """Pinned host <-> GPU copy rates, the ceiling a get/put through host memory can reach."""
    if dev.type != "cuda":
        return {}
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    g = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    h2d = min(timed(lambda: g.copy_(h, non_blocking=True), dev) for _ in range(3))
    d2h = min(timed(lambda: h.copy_(g, non_blocking=True), dev) for _ in range(3))
    return {"h2d_gbps": nbytes / h2d / 1e9, "d2h_gbps": nbytes / d2h / 1e9}


def run(directory: str | None, sizes, total: int, paths=ALL_PATHS, threads: int = 16, task: int = 4 * MiB,
        hot: bool = True, memory: str = "auto", files: int = 8, preallocate: bool = True, batch: int = 64) -> dict:
    dev = torch.device("cuda" if (memory in ("auto", "cuda") and torch.cuda.is_available()) else "cpu")
    memory = "cuda" if dev.type == "cuda" else "host"
    root = tempfile.mkdtemp(prefix="gds_kvcache-bench-", dir=directory)
    gen = torch.Generator(device=dev).manual_seed(0)
    src = torch.randint(0, 256, (total,), dtype=torch.uint8, device=dev, generator=gen)
    rows = []
    meta = {**header(), "directory": root, "fs_type": fs_type(root), "total_bytes": total, "threads": threads,
            "task_size": task, "memory": memory, "pool_files": files, "preallocate": preallocate, "batch": batch,
            **h2d_ceiling(dev, min(total, GB))}
    steps = [(s, p) for s in sizes for p in paths]
    try:
        with Progress(len(steps), "bench") as bar:
            for size in sizes:
                c = Case(root, src[: total // size * size], size, threads, task, files, preallocate, batch)
                for p in paths:
                    if p.startswith("library-"):
                        if p.startswith("library-kvikio") and kvikio_error() is not None:
                            r = {"skipped": kvikio_error()}
                        elif p == "library-mapped" and ram_backed_fs(root) is None:
                            r = {"skipped": f"{fs_type(root)} is not RAM-backed"}
                        else:
                            r = path_library(c, p, hot, memory)
                    elif p == "raw":
                        r = path_raw(c, hot)
                    elif p in ("pinned-pwrite", "pinned-pipelined"):
                        r = path_staged(c, p == "pinned-pipelined")
                    elif p == "torch":
                        r = path_torch(c)
                    elif p == "bounce":
                        r = path_bounce(c)
                    else:
                        r = path_kvikio_default(c)
                    nbytes = c.n * c.size
                    row = {"size": _size(size), "size_bytes": size, "path": p}
                    if "skipped" in r:
                        row["note"] = "skipped: " + r["skipped"]
                    else:
                        row.update({"put GB/s": nbytes / r["put"] / 1e9, "get GB/s": nbytes / r["get"] / 1e9,
                                    "verified": r["ok"], "note": r.get("io", "")})
                        if "calls" in r:
                            calls = r["calls"]
                            row["calls/chunk"] = (f"{calls['write_calls'] + calls['read_calls']:.3f} io, "
                                                  f"{calls['checksum_calls']:.3f} csum")
                        if "hot" in r:
                            row["get hot GB/s"] = nbytes / r["hot"] / 1e9
                    rows.append(row)
                    shutil.rmtree(c.dir(p), ignore_errors=True)
                    bar.update()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _ratios(rows)
    return {**meta, "rows": rows}


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def _ratios(rows) -> None:
    by = {(r["size_bytes"], r["path"]): r for r in rows}
    for r in rows:
        if not r["path"].startswith(("library", "pinned-")) or "put GB/s" not in r:
            continue
        bases = (("raw", "vs raw"),) if r["path"].startswith("pinned-") else (
            ("raw", "vs raw"), ("pinned-pipelined", "vs pipelined"), ("bounce", "vs bounce"), ("torch", "vs torch"))
        for base, col in bases:
            b = by.get((r["size_bytes"], base))
            if b and "put GB/s" in b:
                r[col] = f"{r['put GB/s'] / b['put GB/s']:.2f}/{r['get GB/s'] / b['get GB/s']:.2f}"


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install 'gds_kvcache[bench]')")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, col in zip(axes, ("put GB/s", "get GB/s")):
        for p in sorted({r["path"] for r in result["rows"]}):
            pts = [(r["size_bytes"], r[col]) for r in result["rows"] if r["path"] == p and col in r]
            if pts:
                ax.plot([x / MiB for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size (MiB)")
        ax.set_ylabel(col)
        ax.set_title(f"{col.split()[0]} - {result['device']}, {result['fs_type']}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return True


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    for suf, mul in (("KIB", KiB), ("K", KiB), ("MIB", MiB), ("M", MiB), ("GIB", GB), ("G", GB)):
        if s.endswith(suf):
            return int(float(s[: -len(suf)]) * mul)
    return int(s)


def _human(n: int) -> str:
    for unit, m in (("TiB", 1 << 40), ("GiB", GB), ("MiB", MiB), ("KiB", KiB)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} bytes"


def _size_arg(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type``: a byte size like ``256K``, ``4M``, ``1G`` in ``lo..hi``, a 4 KiB multiple."""
    def parse(text: str) -> int:
        try:
            n = _parse_size(text)
        except (ValueError, OverflowError):
            n = None
        if n is None or not lo <= n <= hi or n % (4 * KiB):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a size in {_human(lo)}..{_human(hi)} that is a multiple of 4 KiB "
                "(e.g. 256K, 4M, 1G)")
        return n

    return parse


def _list_arg(item: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        return [item(p) for p in parts]

    return parse


def _path_arg(text: str) -> str:
    text = text.strip()
    if text not in ALL_PATHS:
        raise argparse.ArgumentTypeError(f"unknown path {text!r} (valid: {', '.join(ALL_PATHS)})")
    return text


def main(argv=None) -> int:
    ap = ArgumentParser(prog="gds-kvcache bench", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=existing_dir, default=None,
                    help="an existing directory where the files go (default: the system temp directory)")
    ap.add_argument("--sizes", type=_list_arg(_size_arg(4 * KiB, 4 * GB)), default="256K,1M,4M,16M,64M",
                    help="chunk sizes, comma-separated (default 256K,1M,4M,16M,64M)")
    ap.add_argument("--total", type=_size_arg(4 * KiB, 1 << 40), default="1G",
                    help="bytes per chunk size, at least the largest size (default 1G)")
    ap.add_argument("--paths", type=_list_arg(_path_arg), default=",".join(ALL_PATHS))
    ap.add_argument("--threads", type=int_range(1, 256), default=16)
    ap.add_argument("--task", type=_size_arg(64 * KiB, GB), default="4M", help="bytes per I/O task (default 4M)")
    ap.add_argument("--memory", default="auto", choices=["auto", "cuda", "host"])
    ap.add_argument("--no-hot", action="store_true")
    ap.add_argument("--batch", type=int_range(1, 1 << 16), default=64,
                    help="chunks per library batch call (default 64)")
    ap.add_argument("--pool-files", type=int_range(1, 64), default=8,
                    help="files the library pool and the raw path spread over")
    ap.add_argument("--no-preallocate", action="store_true",
                    help="leave pool files sparse (measures first-write block allocation too)")
    ap.add_argument("--smoke", action="store_true", help="1 MiB chunks, 8 MiB in all (for CI)")
    ap.add_argument("--out", type=creatable_dir, default="bench-out")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    a = ap.parse_args(argv)
    sizes = [MiB] if a.smoke else a.sizes
    total = 8 * MiB if a.smoke else a.total
    if total < max(sizes):
        ap.error(f"--total ({_human(total)}) must be at least the largest of --sizes ({_human(max(sizes))})")
    r = run(a.dir, sizes, total, tuple(a.paths), a.threads, a.task, not a.no_hot, a.memory,
            a.pool_files, not a.no_preallocate, a.batch)
    extra = f", pinned H2D {r['h2d_gbps']:.1f} / D2H {r['d2h_gbps']:.1f} GB/s" if "h2d_gbps" in r else ""
    print_table(r["rows"], ["size", "path", "put GB/s", "get GB/s", "get hot GB/s", "verified", "vs raw",
                            "vs pipelined", "vs bounce", "vs torch", "calls/chunk", "note"],
                f"bench on {r['device']}: {r['fs_type']} at {r['directory']}, {r['total_bytes'] // MiB} MiB per size, "
                f"{r['threads']} threads, {r['pool_files']} files, preallocated={r['preallocate']}, "
                f"slab in {r['memory']} memory{extra}\n"
                "(vs columns: put/get ratios of the library row to that path)")
    tag = f"_{a.tag}" if a.tag else ""
    write_json(os.path.join(a.out, f"bench_storage{tag}.json"), r)
    plot(r, os.path.join(a.out, f"bench_storage{tag}.png"))
    return 0 if all(x.get("verified", True) for x in r["rows"]) else 1
