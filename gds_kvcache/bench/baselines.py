"""The baselines of ``bench``: the paths users could take instead of the library.

Each takes a ``Case`` and returns its put/get seconds and whether the bytes
read back are the bytes written: plain parallel ``pwritev``/``preadv``
(O_DIRECT where allowed), ``torch.save``/``torch.load`` per chunk, a pinned
bounce buffer with ``write``/``readinto``, and ``kvikio.CuFile`` with
KvikIO's defaults.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..io.driver import kvikio_error
from ..io.page_cache import drop_page_cache
from ..io.posix_engine import probe_direct_io
from ..memory.buffers import SlabBuffer
from ..units import MiB
from .case import Case, timed

__all__ = ["path_raw", "path_torch", "path_bounce", "path_kvikio_default"]


def path_raw(c: Case, hot: bool) -> dict:
    """Chunks round-robin over ``c.files`` files, task-sized pieces in parallel, O_DIRECT where allowed."""
    total = c.n * c.size
    src = SlabBuffer(total, "host")
    src.tensor.copy_(torch.cat(c.parts).cpu() if c.dev.type == "cuda" else torch.cat(c.parts))
    dst = SlabBuffer(total, "host")
    k = max(1, min(c.files, c.n))
    per_file = -(-c.n // k) * c.size
    paths = [os.path.join(c.dir("raw"), f"raw.{i}") for i in range(k)]
    fds = []
    direct, reason = True, "ok"
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(per_file)
            if c.preallocate:
                os.posix_fallocate(f.fileno(), 0, per_file)
        fd, why = probe_direct_io(p)
        if fd is None:
            direct, reason = False, why
            fd = os.open(p, os.O_RDWR)
        fds.append(fd)
    sa, da = memoryview(src.host_array()), memoryview(dst.host_array())
    pieces = []
    for i in range(c.n):
        fd, base = fds[i % k], (i // k) * c.size
        for o in range(0, c.size, c.task):
            pieces.append((fd, base + o, i * c.size + o, min(c.task, c.size - o)))
    pool = ThreadPoolExecutor(c.threads)

    def io(op, mv):
        list(pool.map(lambda p: op(p[0], [mv[p[2]:p[2] + p[3]]], p[1]), pieces))

    try:
        out = {"put": timed(lambda: io(os.pwritev, sa), torch.device("cpu")),
               "io": ("O_DIRECT" if direct else f"buffered ({reason})") + f", {k} files"}
        drop_page_cache(paths)
        out["get"] = timed(lambda: io(os.preadv, da), torch.device("cpu"))
        out["ok"] = bool(np.array_equal(src.host_array(), dst.host_array()))
        if hot:
            out["hot"] = timed(lambda: io(os.preadv, da), torch.device("cpu"))
    finally:
        pool.shutdown()
        for fd in fds:
            os.close(fd)
    return out


def path_torch(c: Case) -> dict:
    d = c.dir("torch")
    files = [os.path.join(d, f"{i}.pt") for i in range(c.n)]
    owned = [p.clone() for p in c.parts]  # save() of a view would write the whole storage
    out = {"put": timed(lambda: [torch.save(t, f) for t, f in zip(owned, files)], c.dev)}
    drop_page_cache(files)
    got = []
    out["get"] = timed(lambda: got.extend(torch.load(f, map_location=c.dev, weights_only=True) for f in files), c.dev)
    out["ok"] = all(c.same(i, g) for i, g in enumerate(got))
    return out


def path_bounce(c: Case) -> dict:
    d = c.dir("bounce")
    files = [os.path.join(d, f"{i}.bin") for i in range(c.n)]
    staging = SlabBuffer(c.size, "pinned" if c.dev.type == "cuda" else "host")
    st, sa = staging.tensor, staging.host_array()

    def put():
        for p, f in zip(c.parts, files):
            st.copy_(p)
            with open(f, "wb") as fh:
                fh.write(sa)

    outs = [torch.empty(c.size, dtype=torch.uint8, device=c.dev) for _ in range(c.n)]

    def get():
        for o, f in zip(outs, files):
            with open(f, "rb") as fh:
                fh.readinto(sa)
            o.copy_(st)

    out = {"put": timed(put, c.dev)}
    drop_page_cache(files)
    out["get"] = timed(get, c.dev)
    out["ok"] = all(c.same(i, o) for i, o in enumerate(outs))
    return out


def path_kvikio_default(c: Case) -> dict:
    err = kvikio_error()
    if err is not None:
        return {"skipped": err}
    import kvikio
    import kvikio.defaults

    d = c.dir("kvikio")
    files = [os.path.join(d, f"{i}.bin") for i in range(c.n)]
    outs = [torch.empty(c.size, dtype=torch.uint8, device=c.dev) for _ in range(c.n)]

    def buf(t):
        return t if t.is_cuda else t.numpy()

    def put():
        for p, f in zip(c.parts, files):
            with kvikio.CuFile(f, "w") as fh:
                fh.write(buf(p))

    def get():
        for o, f in zip(outs, files):
            with kvikio.CuFile(f, "r") as fh:
                fh.read(buf(o))

    with kvikio.defaults.set({"num_threads": 1, "task_size": 4 * MiB}):
        out = {"put": timed(put, c.dev)}
        drop_page_cache(files)
        out["get"] = timed(get, c.dev)
    out["ok"] = all(c.same(i, o) for i, o in enumerate(outs))
    return out
