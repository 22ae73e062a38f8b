"""The main job: store and read back a few hundred MB of KV chunks, verify every byte, report GB/s."""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import torch

from .cli import ArgumentParser, creatable_dir, int_range, writable_file
from .config import IO_ENGINES, MEMORY_DEVICES, CacheEngineConfig
from .io.page_cache import drop_page_cache
from .key import CacheEngineKey
from .memory.format import MemoryFormat
from .storage.storage_manager import StorageManager
from .units import GB, MiB

__all__ = ["run_demo", "main"]

#: Largest --chunk-mib: one chunk is already a GiB of KV (and 8 tokens per MiB
#: keeps chunk_size far inside its limit).
MAX_CHUNK_MIB = 1024


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_demo(directory: str | None = None, total_mib: int = 384, chunk_mib: int = 8, io_engine: str = "auto",
             memory_device: str = "auto", seed: int = 0) -> dict:
    """Put ``total_mib`` of random KV chunks, restart, read them back from disk, compare bytes.

    Returns a dict of what ran and the measured GB/s.
    """
    own_dir = directory is None
    directory = directory or tempfile.mkdtemp(prefix="gds_kvcache-demo-")
    n = max(1, total_mib // chunk_mib)
    # A Llama-3-8B-like chunk: [2, 32 layers, T tokens, 8 heads * 128] bf16.
    tokens = chunk_mib * MiB // (2 * 32 * 1024 * 2)
    shape = (2, 32, tokens, 1024)
    chunk_bytes = 2 * 32 * tokens * 1024 * 2
    slab_gb = (2 * n * chunk_bytes + 64 * MiB) / GB
    cfg = CacheEngineConfig(chunk_size=tokens, local_disk=directory, max_local_disk_size=(n * chunk_bytes * 1.2 +
                            64 * MiB) / GB, max_local_cpu_size=slab_gb, slab_size=slab_gb, io_engine=io_engine,
                            memory_device=memory_device)
    keys = [CacheEngineKey("demo", "llama-3-8b-like", 1, 0, i + 1) for i in range(n)]
    result: dict = {"directory": directory, "chunks": n, "chunk_bytes": chunk_bytes}
    try:
        sm = StorageManager(cfg)
        dev = sm.allocator.device
        result["memory"] = str(dev)
        result["io"] = sm.io_report().line()
        result["io_path"] = sm.io_report().path
        gen = torch.Generator(device=dev).manual_seed(seed)
        expected = []
        objs = []
        for _ in range(n):
            obj = sm.allocate(shape, torch.bfloat16, fmt=MemoryFormat.KV_2LTD)
            assert obj is not None, "slab sized for the demo"
            raw = obj.tensor.view(torch.int16)
            raw.copy_(torch.randint(-32768, 32767, shape, dtype=torch.int16, device=dev, generator=gen))
            expected.append(obj.tensor.clone())
            objs.append(obj)
        _sync(dev)
        t0 = time.perf_counter()
        futures = [sm.put(k, o) for k, o in zip(keys, objs)]
        for f in futures:
            f.result()
        put_s = time.perf_counter() - t0
        pool_files = sm.disk.pool_paths
        sm.close()

        # A new manager on the same directory: the disk index is recovered and
        # the hot tier starts empty, so every get reads the disk.
        drop_page_cache(pool_files)
        sm = StorageManager(cfg)
        found = sum(sm.contains(k, ["LocalDiskBackend"]) for k in keys)
        _sync(dev)
        t0 = time.perf_counter()
        for k in keys:
            sm.prefetch(k)
        got = [sm.get(k) for k in keys]
        _sync(dev)
        get_s = time.perf_counter() - t0
        wrong = 0
        for obj, ref in zip(got, expected):
            if obj is None or not torch.equal(obj.tensor.view(torch.int16), ref.view(torch.int16)):
                wrong += 1
            if obj is not None:
                obj.ref_count_down()
        sm.memcheck()
        sm.close()
        total = n * chunk_bytes
        result.update(recovered=found, wrong_chunks=wrong, put_gbps=total / put_s / 1e9,
                      get_gbps=total / get_s / 1e9, total_bytes=total)
        return result
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="gds-kvcache demo", description=__doc__)
    ap.add_argument("--dir", type=creatable_dir, default=None,
                    help="cache directory, created if missing (default: a new temporary directory)")
    ap.add_argument("--total-mib", type=int_range(1), default=384, help="MiB of chunks to store (default 384)")
    ap.add_argument("--chunk-mib", type=int_range(1, MAX_CHUNK_MIB), default=8, help="MiB per chunk (default 8)")
    ap.add_argument("--io-engine", default="auto", choices=IO_ENGINES)
    ap.add_argument("--memory", default="auto", choices=MEMORY_DEVICES)
    ap.add_argument("--json", type=writable_file, default=None, help="also write the result here")
    a = ap.parse_args(argv)
    if a.total_mib < a.chunk_mib:
        ap.error(f"--total-mib ({a.total_mib}) must be at least --chunk-mib ({a.chunk_mib})")
    r = run_demo(a.dir, a.total_mib, a.chunk_mib, a.io_engine, a.memory)
    print(f"gds_kvcache demo: {r['chunks']} chunks x {r['chunk_bytes'] / MiB:.1f} MiB = "
          f"{r['total_bytes'] / MiB:.0f} MiB through StorageManager (slab on {r['memory']})")
    print(f"  I/O path : {r['io']}")
    print(f"  put      : {r['put_gbps']:.2f} GB/s (until every chunk is on disk and indexed)")
    print(f"  get      : {r['get_gbps']:.2f} GB/s (after a restart, page cache dropped, from disk)")
    print(f"  verified : {r['recovered']}/{r['chunks']} chunks recovered after restart, "
          f"{r['wrong_chunks']} wrong (every byte compared)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0 if r["wrong_chunks"] == 0 and r["recovered"] == r["chunks"] else 1
