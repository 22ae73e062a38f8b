"""Does a get wait for kernels on the CUDA default stream? (GPU only.)

On the cuFile path KvikIO synchronises the CUDA default stream before each
read or write, so a serving engine that queues its model kernels there makes
every get wait for them. This probe reads ``--mib`` MiB from a pool file into
a CUDA slab through each engine (posix, kvikio) three ways: with the GPU idle,
right after queueing a ``--sleep-ms`` kernel on the default stream, and right
after queueing it on a side (non-default) stream. A read that waits for the
kernel takes about ``sleep`` longer than the idle read, and the kernel is
already finished when it returns.

Prints a table and writes ``default_stream_probe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from gds_kvcache.bench.common import header, print_table, write_json
from gds_kvcache.io import KvikIOEngine, PosixEngine, Span, kvikio_error
from gds_kvcache.io.page_cache import drop_page_cache
from gds_kvcache.memory.buffers import SlabBuffer
from gds_kvcache.units import MiB


def cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep``, measured."""
    n = 20_000_000
    torch.cuda._sleep(n)  # warm up
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(n)
    b.record()
    b.synchronize()
    return n / a.elapsed_time(b)


def timed_read(eng, spans, paths, queue_sleep=None) -> tuple[float, bool]:
    """(seconds for read_spans, whether the queued kernel had finished when the read returned)."""
    drop_page_cache(paths)
    torch.cuda.synchronize()
    done = None
    if queue_sleep is not None:
        done = queue_sleep()
    t = time.perf_counter()
    errs = eng.read_spans(spans)
    dt = time.perf_counter() - t
    finished = done.query() if done is not None else True
    torch.cuda.synchronize()
    assert errs == [None] * len(spans), errs
    return dt, finished


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory for the pool file (default: the temp directory)")
    ap.add_argument("--mib", type=int, default=256, help="MiB read per trial")
    ap.add_argument("--sleep-ms", type=float, default=200.0, help="length of the queued kernel")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--task-mib", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="trials per row (the median is shown)")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("default_stream_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    nbytes = a.mib * MiB
    workdir = tempfile.mkdtemp(prefix="default-stream-probe-", dir=a.dir)
    path = os.path.join(workdir, "pool")
    with open(path, "wb") as f:
        f.write(np.random.default_rng().integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    spans = [Span(off, off, min(64 * MiB, nbytes - off)) for off in range(0, nbytes, 64 * MiB)]
    cycles = int(cycles_per_ms() * a.sleep_ms)
    side = torch.cuda.Stream()

    def on_default():
        torch.cuda._sleep(cycles)  # the main thread's current stream is the default stream
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def on_side():
        with torch.cuda.stream(side):
            torch.cuda._sleep(cycles)
            ev = torch.cuda.Event()
            ev.record(side)
        return ev

    slab = SlabBuffer(nbytes, "cuda")
    engines = [("posix", PosixEngine)] + ([("kvikio", KvikIOEngine)] if kvikio_error() is None else [])
    rows = []
    try:
        for name, cls in engines:
            with cls([path], a.threads, a.task_mib * MiB, True, "cuda") as eng:
                eng.attach(slab)
                timed_read(eng, spans, [path])  # warm-up: threads, staging buffers, probe reads
                ref = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=MiB)).cuda()
                assert torch.equal(slab.tensor[:MiB], ref), "read back wrong bytes"
                idle = statistics.median(timed_read(eng, spans, [path])[0] for _ in range(a.repeat))
                for where, queue in (("idle", None), ("default stream", on_default), ("side stream", on_side)):
                    trials = [timed_read(eng, spans, [path], queue) for _ in range(a.repeat)]
                    dt = statistics.median(t for t, _ in trials)
                    rows.append({"engine": name, "path": eng.report().path, "kernel on": where,
                                 "read ms": dt * 1e3, "idle ms": idle * 1e3, "extra ms": (dt - idle) * 1e3,
                                 "kernel ms": 0.0 if queue is None else a.sleep_ms,
                                 "kernel done at return": queue is not None and all(f for _, f in trials),
                                 "GB/s": nbytes / dt / 1e9})
    finally:
        slab.close()
        os.unlink(path)
        os.rmdir(workdir)
    cols = ["engine", "path", "kernel on", "read ms", "idle ms", "extra ms", "kernel ms", "kernel done at return",
            "GB/s"]
    print_table(rows, cols, f"read of {a.mib} MiB into a CUDA slab while a {a.sleep_ms:g} ms kernel is queued")
    write_json(os.path.join(a.out, "default_stream_probe.json"),
               {**header(), "mib": a.mib, "sleep_ms": a.sleep_ms, "threads": a.threads, "task_mib": a.task_mib,
                "kvikio_compat_mode_env": os.environ.get("KVIKIO_COMPAT_MODE", "(unset: AUTO)"), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
