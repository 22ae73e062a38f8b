"""The baselines of ``bench``: the paths users could take instead of the library.

Each takes a ``Case`` and returns its put/get seconds and whether the bytes
read back are the bytes written: plain parallel ``pwritev``/``preadv``
(O_DIRECT where allowed), the same with GPU memory staged through pinned
buffers (``pinned-pwrite``: copy, then I/O; ``pinned-pipelined``: the copy of
one piece overlapping the I/O of the last), ``torch.save``/``torch.load``
per chunk, a pinned bounce buffer with ``write``/``readinto``, and
``kvikio.CuFile`` with KvikIO's defaults.
"""

from __future__ import annotations

import contextlib
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

__all__ = ["path_raw", "path_staged", "path_torch", "path_bounce", "path_kvikio_default"]


def _files(c: Case, name: str):
    """``c.files`` preallocated files, O_DIRECT where allowed, and the task-sized pieces of every chunk.

    Returns (paths, fds, io note, pieces): chunk i goes round-robin to file
    ``i % files``; a piece is (fd, file offset, offset in the chunks, bytes).
    """
    k = max(1, min(c.files, c.n))
    per_file = -(-c.n // k) * c.size
    paths = [os.path.join(c.dir(name), f"{name}.{i}") for i in range(k)]
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
    pieces = []
    for i in range(c.n):
        fd, base = fds[i % k], (i // k) * c.size
        for o in range(0, c.size, c.task):
            pieces.append((fd, base + o, i * c.size + o, min(c.task, c.size - o)))
    return paths, fds, ("O_DIRECT" if direct else f"buffered ({reason})") + f", {k} files", pieces


def path_raw(c: Case, hot: bool) -> dict:
    """Chunks round-robin over ``c.files`` files, task-sized pieces in parallel, O_DIRECT where allowed."""
    total = c.n * c.size
    src = SlabBuffer(total, "host")
    src.tensor.copy_(c.src.cpu())
    dst = SlabBuffer(total, "host")
    paths, fds, note, pieces = _files(c, "raw")
    sa, da = memoryview(src.host_array()), memoryview(dst.host_array())
    pool = ThreadPoolExecutor(c.threads)

    def io(op, mv):
        list(pool.map(lambda p: op(p[0], [mv[p[2]:p[2] + p[3]]], p[1]), pieces))

    try:
        out = {"put": timed(lambda: io(os.pwritev, sa), torch.device("cpu")), "io": note}
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


class _Stage:
    """One thread's staging for ``path_staged``: pinned buffers, a stream and an event per buffer."""

    def __init__(self, c: Case, depth: int):
        cuda = c.dev.type == "cuda"
        self.buf = SlabBuffer(depth * c.task, "pinned" if cuda else "host")
        self.t = [self.buf.tensor[b * c.task:(b + 1) * c.task] for b in range(depth)]
        mv = memoryview(self.buf.host_array())
        self.v = [mv[b * c.task:(b + 1) * c.task] for b in range(depth)]
        self.stream = torch.cuda.Stream(c.dev) if cuda else None
        self.ev = [torch.cuda.Event() if cuda else None for _ in range(depth)]

    def ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def record(self, b: int) -> None:
        if self.stream is not None:
            self.ev[b].record(self.stream)

    def wait(self, b: int) -> None:
        if self.stream is not None:
            self.ev[b].synchronize()


def _put_plain(st: _Stage, flat, queue) -> None:
    for fd, fo, mo, n in queue:
        st.t[0][:n].copy_(flat[mo:mo + n], non_blocking=True)
        st.record(0)
        st.wait(0)
        os.pwritev(fd, [st.v[0][:n]], fo)


def _get_plain(st: _Stage, flat, queue) -> None:
    for fd, fo, mo, n in queue:
        os.preadv(fd, [st.v[0][:n]], fo)
        flat[mo:mo + n].copy_(st.t[0][:n], non_blocking=True)
        st.record(0)
        st.wait(0)


def _put_pipelined(st: _Stage, flat, queue) -> None:
    prev, k = None, 0
    for fd, fo, mo, n in queue:
        b = k & 1
        k += 1
        st.t[b][:n].copy_(flat[mo:mo + n], non_blocking=True)
        st.record(b)
        if prev is not None:  # written while the copy just started runs
            pb, pfd, pfo, pn = prev
            st.wait(pb)
            os.pwritev(pfd, [st.v[pb][:pn]], pfo)
        prev = (b, fd, fo, n)
    if prev is not None:
        pb, pfd, pfo, pn = prev
        st.wait(pb)
        os.pwritev(pfd, [st.v[pb][:pn]], pfo)


def _get_pipelined(st: _Stage, flat, queue) -> None:
    k = 0
    for fd, fo, mo, n in queue:
        b = k & 1
        k += 1
        st.wait(b)  # the copy out of buffer b two pieces ago; the last one's runs during this read
        os.preadv(fd, [st.v[b][:n]], fo)
        flat[mo:mo + n].copy_(st.t[b][:n], non_blocking=True)
        st.record(b)
    st.wait(0)
    st.wait(1)


def path_staged(c: Case, pipelined: bool) -> dict:
    """``raw``'s files and pieces with the chunks in ``c.dev`` memory, each thread staging through pinned buffers.

    ``pipelined=False`` (``pinned-pwrite``): per piece, copy to one pinned
    buffer, wait, ``pwritev`` (``preadv``, copy, wait for gets).
    ``pipelined=True`` (``pinned-pipelined``): two buffers per thread, the copy
    of piece k+1 running while piece k is written (piece k+1 read while piece
    k is copied). The ceiling a staged engine can reach on this disk. The
    buffers are pinned before the clock starts; on a host-memory run the
    copies are plain synchronous memcpy.
    """
    name = "pinned-pipelined" if pipelined else "pinned-pwrite"
    paths, fds, note, pieces = _files(c, name)
    stages = [_Stage(c, 2 if pipelined else 1) for _ in range(c.threads)]
    flat = c.src
    back = torch.empty_like(flat)
    put, get = (_put_pipelined, _get_pipelined) if pipelined else (_put_plain, _get_plain)
    pool = ThreadPoolExecutor(c.threads)

    def run(fn, target):
        queue = iter(pieces)  # drained by every thread together, as raw's pool.map does

        def work(st):
            with st.ctx():
                fn(st, target, queue)

        list(pool.map(work, stages))

    try:
        out = {"put": timed(lambda: run(put, flat), c.dev), "io": note}
        drop_page_cache(paths)
        out["get"] = timed(lambda: run(get, back), c.dev)
        out["ok"] = bool(torch.equal(back, flat))
    finally:
        pool.shutdown()
        for fd in fds:
            os.close(fd)
        for st in stages:
            st.buf.close()
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
