"""Scale figures of shared mode: lookups against Redis, index rebuild, aggregate read GB/s against baselines.

``python -m gds_kvcache.shared.bench [--dir /dev/shm] [--chunks 100000] [--read-chunks 256]
[--chunk-mib 1] [--readers 1,2,4] [--memory host|cuda] [--engine auto] [--json out.json]``
starts its own loopback ``redis-server``, prints tables and writes JSON. ``main``'s Notes say
what each figure measures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import tempfile
import time

from .bench_readers import (HEADROOM, PHASE_TIMEOUT, disk_for, fill_chunks, local_process, open_backend,
                            reader_process)

__all__ = ["main"]

#: Bytes of a rebuild chunk (a small chunk: the figure is entries per second).
_SMALL = 4096


def _run(ctx, target, arg_list, phases: int) -> list[tuple]:
    """Start one process per args, release them together ``phases`` times; their reports."""
    import threading
    q = ctx.Queue()
    barrier = ctx.Barrier(len(arg_list) + 1)
    ps = [ctx.Process(target=target, args=(a, q, barrier)) for a in arg_list]
    for p in ps:
        p.start()
    got: list[tuple] = []

    def fail(why):
        # Drain before killing: a child's report is still in its queue's feeder thread.
        errs = [g[2] for g in got if g[0] == "error"]
        while True:
            try:
                g = q.get(timeout=5)
            except queue.Empty:
                break
            if g[0] == "error":
                errs.append(g[2])
        for p in ps:
            if p.is_alive():
                p.kill()
        raise RuntimeError(f"{why}\n" + ("\n".join(errs) or "(no child reported an error)"))

    try:
        for _ in range(phases):
            try:
                barrier.wait(PHASE_TIMEOUT)
            except threading.BrokenBarrierError:
                fail("a reader process failed before a phase")
            deadline = time.monotonic() + PHASE_TIMEOUT
            want = len(got) + len(arg_list)
            while len(got) < want:
                try:
                    g = q.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    fail("a reader process did not finish its phase in time")
                got.append(g)
                if g[0] == "error":
                    fail("a reader process failed")
        for p in ps:
            p.join(PHASE_TIMEOUT)
        while True:        # late reports (the local baseline's engine name)
            try:
                got.append(q.get(timeout=0.5))
            except queue.Empty:
                break
    finally:
        for p in ps:
            if p.is_alive():
                p.kill()
                p.join()
    return got


def _aggregate(rows: list[tuple], phase: str) -> float:
    rows = [r for r in rows if r[0] == phase]
    span = max(r[4] for r in rows) - min(r[3] for r in rows)
    return sum(r[2] for r in rows) / span / 1e9


def _plan(idx, writer: str, keys: list[str], root: str) -> tuple[list[str], list]:
    """Pool file paths of ``writer`` and, per key, the ``(file, offset in file, offset into the chunk,
    bytes)`` pieces its published entry covers: exactly the bytes a shared read of it reads."""
    from ..storage.pool_file import POOL_NAME, pieces
    lay = idx.layout(writer)
    stripes, unit = int(lay["stripes"]), int(lay["unit"])
    paths = [os.path.join(root, lay["dir"], f"{POOL_NAME}.{f}") for f in range(stripes)]
    token = idx.new_token("bench-plan")
    pubs, leased = idx.acquire(token, keys)
    try:
        missing = [k for k, p in zip(keys, pubs) if p is None]
        if missing:
            raise RuntimeError(f"{len(missing)} chunk(s) not published, first {missing[0]}")
        return paths, [pieces(p.offset, p.nbytes, stripes, unit) for p in pubs]
    finally:
        idx.release(token, leased)


def _list_of_readers(text: str) -> list[int]:
    from ..cli import int_range
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
    return [int_range(1, 64)(p) for p in parts]


def main(argv=None) -> int:
    """Run the benchmark; 0 on success.

    Notes
    -----
    * Rebuild: one writer stores ``--chunks`` 4 KiB chunks; Redis is emptied and
      the writer re-publishes them all (``rebuild_s``).
    * Lookups: a prompt of 1, 64 or 512 chunks in one Redis round trip
      (``batched_contains``), 300 times each; and 512 chunks one call each.
    * Aggregate read: one writer stores ``--read-chunks`` chunks of
      ``--chunk-mib`` MiB; for each count in ``--readers``, that many reader
      processes (other writer ids) start together and each reads every chunk
      through ``batched_get_blocking``, ``--batch`` chunks a call, into its own
      ``--memory`` slab: GB/s is all bytes over first start to last end. The
      same processes then read the same byte ranges of the writer's pool files
      with plain single-threaded ``os.preadv`` into host memory (pinned, then
      copied to the GPU, for ``cuda``): the baseline, and ``ratio`` is shared
      over baseline. Lastly one process stores and reads its own chunks through
      ``LocalDiskBackend`` (local mode, no Redis), with the same chunk size and
      batch.

    Run on the file system the fleet will share (``/dev/shm`` measures the
    software path, not a disk). ``--engine`` is ``io_engine`` for every backend
    opened (the writer's puts, the readers' reads, local mode). The whole run
    needs about ``2 * read-chunks * chunk-mib`` MiB free in ``--dir``.
    """
    from ..cli import existing_dir, int_range, writable_file
    ap = argparse.ArgumentParser(prog="python -m gds_kvcache.shared.bench",
                                 description="Shared-mode scale figures: lookups, rebuild, aggregate reads.")
    shm = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK)
    ap.add_argument("--dir", type=existing_dir, default="/dev/shm" if shm else None,
                    help="where the shared directory goes (default /dev/shm)")
    ap.add_argument("--chunks", type=int_range(1024, 10**7), default=100_000,
                    help="4 KiB chunks for the rebuild figure")
    ap.add_argument("--read-chunks", type=int_range(1, 10**6), default=256, help="chunks the readers read")
    ap.add_argument("--chunk-mib", type=int_range(1, 1024), default=1, help="MiB per read chunk (1 or 16 typical)")
    ap.add_argument("--batch", type=int_range(1, 4096), default=16, help="chunks per batched get")
    ap.add_argument("--readers", type=_list_of_readers, default=[1, 2, 4], help="reader process counts (default 1,2,4)")
    ap.add_argument("--memory", choices=["host", "cuda"], default=None,
                    help="slab memory of writer and readers (default cuda where torch sees a GPU, else host)")
    ap.add_argument("--engine", choices=["auto", "mapped", "kvikio", "posix"], default="auto",
                    help="config io_engine for every backend (default auto)")
    ap.add_argument("--json", type=writable_file, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    import torch

    from ..bench.common import header, print_table, write_json
    from ..key import CacheEngineKey
    from .local_redis import LocalRedis
    from .redis_index import RedisIndex

    memory = a.memory or ("cuda" if torch.cuda.is_available() else "host")
    if memory == "cuda" and not torch.cuda.is_available():
        ap.error("--memory cuda but torch sees no CUDA device")
    base = a.dir or tempfile.gettempdir()
    nbytes = a.chunk_mib << 20
    need = 2 * disk_for(a.read_chunks, nbytes) + disk_for(a.chunks, _SMALL)
    st = os.statvfs(base)
    if st.f_bavail * st.f_frsize < need:
        ap.error(f"--dir {base} has {st.f_bavail * st.f_frsize >> 20} MiB free; this run needs about "
                 f"{need >> 20} MiB (fewer --read-chunks or --chunks, or another --dir)")
    root = tempfile.mkdtemp(prefix="gds-kvcache-shared-bench.", dir=base)
    out: dict = {**header(), "dir": base, "cpus": os.cpu_count(), "memory": memory, "engine": a.engine,
                 "chunk_mib": a.chunk_mib, "batch": a.batch, "read_chunks": a.read_chunks}
    rows: list[dict] = []
    srv = LocalRedis()
    idx = None
    try:
        idx = RedisIndex(srv.url, "b")
        # -- rebuild: one writer with N small chunks re-publishes them all --------------------
        keys = [CacheEngineKey("vllm", "bench", 1, 0, i) for i in range(a.chunks)]
        w, alloc = open_backend(root, srv.url, "b", "w0", disk_for(a.chunks, _SMALL), 64 << 20, memory, a.engine)
        t = time.perf_counter()
        fill_chunks(w.batched_put, alloc, keys, _SMALL, 256)
        out["fill_s"] = time.perf_counter() - t
        w.stop_housekeeping()     # no housekeeping re-publish racing the timed one
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
        alloc.close()
        shutil.rmtree(os.path.join(root, "writers", "w0"), ignore_errors=True)
        idx.client.flushdb()
        # -- aggregate read GB/s: N reader processes read another writer's chunks -------------------
        rkeys = [CacheEngineKey("vllm", "read", 1, 0, i).to_string() for i in range(a.read_chunks)]
        fill = max(1, min(256, (256 << 20) // nbytes))
        w, alloc = open_backend(root, srv.url, "r", "w1", disk_for(a.read_chunks, nbytes), fill * nbytes + HEADROOM,
                         memory, a.engine)
        t = time.perf_counter()
        fill_chunks(w.batched_put, alloc, [CacheEngineKey.from_string(k) for k in rkeys], nbytes, fill)
        out["read_fill_GBps"] = a.read_chunks * nbytes / (time.perf_counter() - t) / 1e9
        out["writer_engine"] = w.local.io_report().engine
        w.close()
        alloc.close()
        ridx = RedisIndex(srv.url, "r")
        paths, plan = _plan(ridx, "w1", rkeys, root)
        ridx.close()
        ctx = mp.get_context("spawn")      # CUDA cannot survive a fork
        for nr in a.readers:
            got = _run(ctx, reader_process, [{"root": root, "url": srv.url, "ns": "r", "rid": f"rd{nr}-{i}",
                                              "keys": rkeys, "batch": a.batch, "nbytes": nbytes, "memory": memory,
                                              "engine": a.engine, "paths": paths, "plan": plan} for i in range(nr)], 2)
            shared, plain = _aggregate(got, "shared"), _aggregate(got, "preadv")
            out[f"read_{nr}_readers_GBps"] = shared
            out[f"baseline_preadv_{nr}_readers_GBps"] = plain
            out[f"read_{nr}_ratio"] = shared / plain
            rows.append({"readers": nr, "shared GB/s": shared, "plain preadv GB/s": plain, "ratio": shared / plain})
        # -- local mode: one process, its own chunks ------------------------------------------------
        shutil.rmtree(os.path.join(root, "writers", "w1"), ignore_errors=True)
        got = _run(ctx, local_process, [{"path": os.path.join(root, "local"), "n": a.read_chunks, "nbytes": nbytes,
                                         "batch": a.batch, "memory": memory, "engine": a.engine}], 1)
        out["local_1_process_GBps"] = _aggregate(got, "local")
        out["local_engine"] = next((g[2] for g in got if g[0] == "engine"), "")
        out["read"] = rows
    finally:
        if idx is not None:
            idx.close()
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    for k, v in out.items():
        if k != "read":
            print(f"{k:34s} {v:.1f}" if isinstance(v, float) else f"{k:34s} {v}")
    print_table(rows, ["readers", "shared GB/s", "plain preadv GB/s", "ratio"],
                title=f"\naggregate read, {a.chunk_mib} MiB chunks, batch {a.batch}, {memory} slabs, "
                      f"writer engine {out.get('writer_engine')}")
    print(f"local mode, 1 process reading its own chunks ({out.get('local_engine')}): "
          f"{out.get('local_1_process_GBps', 0.0):.2f} GB/s")
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
