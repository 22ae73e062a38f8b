"""The process side of the shared-mode bench: opening and filling backends, and the reader processes.

``open_backend`` opens a ``SharedDiskBackend`` on a slab of its own (the
parent's writers and every reader process) and ``fill_chunks`` stores random
chunks through a ``batched_put``. ``reader_process`` (shared reads, then the
plain ``os.preadv`` baseline of the same bytes) and ``local_process`` (the
``LocalDiskBackend`` baseline) are the targets ``bench.main`` starts with
``multiprocessing``'s spawn context, so they stay module-level functions:
each warms up, waits at the barrier, times a phase and puts its report on
the queue (an ``error`` report and a barrier abort on failure).
"""

from __future__ import annotations

import os
import time
import traceback

__all__ = ["PHASE_TIMEOUT", "HEADROOM", "open_backend", "disk_for", "fill_chunks", "reader_process",
           "local_process"]

#: Seconds a reader process may take to start (spawn, CUDA context, kernel load) or to finish a phase.
PHASE_TIMEOUT = 600
#: Slab bytes beyond one batch (allocator rounding, a warm-up batch still being released).
HEADROOM = 32 << 20


def _cfg(path, url, disk_bytes, engine):
    from ..config import CacheEngineConfig
    from ..units import GB
    return CacheEngineConfig(local_disk=path, max_local_disk_size=disk_bytes / GB, io_engine=engine, io_threads=4,
                             lookup_server_url=url, pool_files=4)


def open_backend(path, url, ns, wid, disk_bytes, slab_bytes, memory, engine):
    from ..memory import SlabMemoryAllocator
    from .shared_backend import SharedDiskBackend
    alloc = SlabMemoryAllocator(slab_bytes, memory)
    try:
        b = SharedDiskBackend(_cfg(path, url, disk_bytes, engine), None, alloc,
                              "cpu" if memory == "host" else "cuda", writer_id=wid, namespace=ns, tick=0.5)
    except BaseException:
        alloc.close()
        raise
    return b, alloc


def disk_for(n: int, nbytes: int) -> int:
    # Pool for every chunk with room to spare (the index's reserve, 4 KiB rounding): no eviction.
    return int(n * (-(-nbytes // 4096) * 4096) * 1.1) + (64 << 20)


def _local_put(b):
    """``batched_put`` for a ``LocalDiskBackend``: submit, then wait for every write."""
    def put(ks, objs):
        return [f.result() if f is not None else None for f in b.batched_submit_put_task(ks, objs)]
    return put


def fill_chunks(put, alloc, keys, nbytes, batch):
    """Store ``keys`` (random chunks of ``nbytes``) ``batch`` at a time through ``put(keys, objs)``
    (a ``batched_put``); every put must succeed."""
    import torch
    for i in range(0, len(keys), batch):
        ks = keys[i:i + batch]
        # One random source per batch, made where the slab is: filling is not what is measured.
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=alloc.device)
        objs = []
        try:
            for _ in ks:
                o = alloc.allocate((nbytes // 4,), torch.float32)
                if o is None:
                    raise RuntimeError(f"slab of {alloc.capacity} bytes too small for {len(ks)} chunks of {nbytes}")
                objs.append(o)
                o.byte_array.copy_(src)
            res = put(ks, objs)
            bad = [r for r in res if not isinstance(r, int)]
            if bad:
                raise RuntimeError(f"{len(bad)} of {len(ks)} puts failed, first: {bad[0]!r}")
        finally:
            for o in objs:
                o.ref_count_down()


class _Plain:
    """Plain ``os.preadv`` of given byte ranges of pool files into host memory (pinned and then copied
    to the GPU for ``memory='cuda'``): the baseline, with no Redis, lease, checksum or engine."""

    def __init__(self, paths, plan, batch, memory):
        import torch
        self.fds = [os.open(p, os.O_RDONLY) for p in paths]
        self.plan, self.batch = plan, batch
        self.size = max(sum(p[3] for p in pcs) for pcs in plan)
        n = batch * self.size
        self.cuda = memory == "cuda"
        self.host = torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)
        self.dev = torch.empty(n, dtype=torch.uint8, device="cuda") if self.cuda else None
        self.mv = memoryview(self.host.numpy()).cast("B")

    def read(self, lo: int) -> int:
        """Read chunks ``lo .. lo + batch`` (each into its own slot); bytes read."""
        got = 0
        for j, pcs in enumerate(self.plan[lo:lo + self.batch]):
            base = j * self.size
            for f, local, delta, n in pcs:
                if os.preadv(self.fds[f], [self.mv[base + delta:base + delta + n]], local) != n:
                    raise RuntimeError(f"short read of pool file {f} at {local}")
            size = sum(p[3] for p in pcs)
            if self.cuda:
                self.dev[base:base + size].copy_(self.host[base:base + size], non_blocking=True)
            got += size
        if self.cuda:
            import torch
            torch.cuda.current_stream().synchronize()   # the batch is on the GPU before the next reuses the slots
        return got

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def reader_process(args, q, barrier):
    """One reader process: the shared read, then the plain-preadv baseline of the same bytes; each phase
    starts when every reader (and the parent) is at the barrier."""
    rid = args["rid"]
    try:
        from ..key import CacheEngineKey
        b, _ = open_backend(args["root"], args["url"], args["ns"], rid, 8 << 20,
                     args["batch"] * args["nbytes"] + HEADROOM, args["memory"], args["engine"])
        ks = [CacheEngineKey.from_string(k) for k in args["keys"]]
        batch = args["batch"]

        def shared(lo):
            n = 0
            for o in b.batched_get_blocking(ks[lo:lo + batch]):
                if o is None:
                    raise RuntimeError(f"reader {rid}: a miss ({ {k: v for k, v in b.stats.items() if v} })")
                n += o.nbytes
                o.ref_count_down()
            return n

        plain = _Plain(args["paths"], args["plan"], batch, args["memory"])
        # The baseline must read the very bytes a shared read returns: compare the first chunk.
        o = b.batched_get_blocking(ks[:1])[0]
        if o is None:
            raise RuntimeError(f"reader {rid}: a miss on the first chunk")
        n = plain.read(0)
        same = o.byte_array.cpu().numpy().tobytes() == plain.mv[:o.nbytes].tobytes() and n >= o.nbytes
        o.ref_count_down()
        if not same:
            raise RuntimeError(f"reader {rid}: the plain preadv read other bytes than the shared read")
        for phase, fn in (("shared", shared), ("preadv", plain.read)):
            fn(0)    # warm-up: kernel load, file opens, first-touch of buffers
            barrier.wait(PHASE_TIMEOUT)
            nbytes = 0
            t0 = time.perf_counter()
            for lo in range(0, len(ks), batch):
                nbytes += fn(lo)
            q.put((phase, rid, nbytes, t0, time.perf_counter()))
        plain.close()
        b.close()
    except BaseException:
        q.put(("error", rid, traceback.format_exc()))    # before the abort wakes the parent
        barrier.abort()


def local_process(args, q, barrier):
    """The local-mode baseline: one process reading its own chunks through ``LocalDiskBackend``."""
    try:
        from ..config import CacheEngineConfig
        from ..key import CacheEngineKey
        from ..memory import SlabMemoryAllocator
        from ..storage.local_disk_backend import LocalDiskBackend
        from ..units import GB
        n, nbytes, batch = args["n"], args["nbytes"], args["batch"]
        cfg = CacheEngineConfig(local_disk=args["path"], max_local_disk_size=disk_for(n, nbytes) / GB,
                                io_engine=args["engine"], io_threads=4, pool_files=4)
        fill = max(1, min(256, (256 << 20) // nbytes))
        alloc = SlabMemoryAllocator(max(batch, fill) * nbytes + HEADROOM, args["memory"])
        b = LocalDiskBackend(cfg, None, alloc, "cpu" if args["memory"] == "host" else "cuda")
        ks = [CacheEngineKey("vllm", "local", 1, 0, i) for i in range(n)]
        fill_chunks(_local_put(b), alloc, ks, nbytes, fill)

        def read(lo):
            got = 0
            for o in b.batched_get_blocking(ks[lo:lo + batch]):
                if o is None:
                    raise RuntimeError("local baseline: a miss")
                got += o.nbytes
                o.ref_count_down()
            return got

        read(0)
        barrier.wait(PHASE_TIMEOUT)
        total = 0
        t0 = time.perf_counter()
        for lo in range(0, n, batch):
            total += read(lo)
        q.put(("local", "local", total, t0, time.perf_counter()))
        engine = b.io_report().engine
        b.close()
        alloc.close()
        q.put(("engine", "local", engine, 0.0, 0.0))
    except BaseException:
        q.put(("error", "local", traceback.format_exc()))
        barrier.abort()
