"""Regression tests for the storage defects of issue 9: the cache must never hang, serve wrong
bytes, or lose intact chunks.

Black-box: only the public API (``StorageManager``, ``LocalDiskBackend``, ``CacheEngine``,
``LookupServerInterface``) and the files on disk are used, so the tests hold across rewrites
of the disk tier. Anything that could hang runs under a bound (``bounded``, future timeouts,
thread joins), so a hang is a failure, not a stuck suite. Test names carry the issue's item
number.
"""

import gc
import logging
import os
import random
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch

from gds_kvcache import (CacheEngineConfig, CacheEngineMetadata, GdsKvCacheError, KeyFormatError,
                         StorageManager)
from gds_kvcache.engine import CacheEngine
from gds_kvcache.errors import ClosedError, DirectoryLockedError
from gds_kvcache.units import KiB, MiB

from .conftest import ON_CI
from .kernel_cases import make_cache, ref_rows, zeros_like_cache
from .never_wrong_helpers import (LOCKED, OPENED, ROOT, Hang, RecordingLookup, bounded, dir_footprint, disk_config,
                                  gb, key, manager_config, mount_tmpfs, open_backend, open_in_subprocess, put_bytes,
                                  random_bytes, read_exact, unmount, wait_put, warnings_from_library)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


# -- 1: reads and writes never wait on each other's queue ------------------------------------------
@pytest.mark.timeout(120)
def test_1_prefetch_under_slab_pressure_never_deadlocks_puts(tmp_path, gen):
    # One I/O thread, a 4-chunk slab: the caller holds one chunk, a prefetch is queued, then three
    # puts fill the slab behind it. The prefetch cannot get slab room until a put behind it runs:
    # it must miss (or run elsewhere), never wait for them.
    c = 256 * KiB
    d = tmp_path / "kv"
    cfg = manager_config(d, slab_bytes=4 * c, io_threads=1)
    old = random_bytes(c, gen)
    with StorageManager(cfg) as sm:
        wait_put(put_bytes(sm, None, key(0), old))
    held = key(1)
    gate = threading.Event()
    lookup = RecordingLookup(gate=gate, gate_keys={held})  # parks the only I/O thread on the first put
    sm = StorageManager(cfg, lookup_server=lookup)
    a = None
    futures, want = [], {}
    try:
        a = sm.allocate((c,), torch.uint8)
        want[held] = random_bytes(c, gen)
        a.tensor.copy_(want[held])
        a.ref_count_up()  # the caller keeps this chunk: it stays in the slab after its put
        futures.append(sm.put(held, a))
        lookup.entered.wait(10)
        sm.prefetch(key(0))
        for i in (2, 3, 4):
            o = sm.allocate((c,), torch.uint8, eviction=False)
            if o is None:  # an implementation may hold the prefetch's slab room already
                continue
            want[key(i)] = random_bytes(c, gen)
            o.tensor.copy_(want[key(i)])
            futures.append(sm.put(key(i), o))
        gate.set()
        for f in futures:
            wait_put(f, 20)  # Hang/TimeoutError here is the deadlock
        a.ref_count_down()
        a = None
        # A read that found no slab room is a miss, not a lost chunk.
        assert bounded(lambda: read_exact(sm, key(0), old), 20, "get after the prefetch") == "hit"
        for k, v in want.items():
            assert bounded(lambda: read_exact(sm, k, v), 20, "get") == "hit"
    finally:
        gate.set()
        if a is not None:
            a.ref_count_down()  # lets a stuck allocation loop finish, so the process can exit
        bounded(sm.close, 90, "close")


@pytest.mark.timeout(120)
def test_1_cache_engine_store_and_retrieve_threads_never_stall(tmp_path):
    # 2 retrieve threads + 1 store thread on a 6-chunk slab at the default 16 I/O threads: the
    # reproduction stalled within seconds every time. Every retrieved token is exact or a miss.
    L, nb, bs, h, d_ = int(os.environ.get("PL", 4)), 64, 16, int(os.environ.get("PH", 4)), 32
    chunk = 32
    cb = 2 * L * chunk * h * d_ * 2
    cfg = CacheEngineConfig(chunk_size=chunk, local_disk=str(tmp_path / "kv"), max_local_disk_size=gb(int(os.environ.get("PD", 16)) * MiB),
                            max_local_cpu_size=gb(6 * cb), slab_size=gb(6 * cb), memory_device="host",
                            io_engine=os.environ.get("PE", "posix"))
    md = CacheEngineMetadata("org/model", 1, 0, "vllm", torch.bfloat16, (L, 2, chunk, h, d_))
    src = make_cache("vllm", L, nb, bs, h, d_, torch.bfloat16)
    nslots = nb * bs
    stored: list = []  # (tokens, slots) of stored sequences, newest last
    lock = threading.Lock()
    errors: list = []
    stats = {"retrieved": 0, "tokens": 0, "stores": 0}
    stop = time.monotonic() + 5
    eng = CacheEngine(cfg, md, "vllm")

    def storer(_):
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        try:
            while time.monotonic() < stop:
                # A new sequence every time (6-10 chunks, more than the slab holds), so puts keep
                # flowing; random first tokens, so no two sequences share a chunk key.
                n = int(torch.randint(int(os.environ.get("PA", 6)) * chunk, int(os.environ.get("PB", 10)) * chunk + 1, (1,), generator=g))
                tokens = torch.randint(0, 50000, (n,), generator=g)
                slots = torch.randperm(nslots, generator=g)[:n]
                r = eng.store(tokens, src, slots)
                for f in r.futures:
                    try:
                        f.result(30)
                    except GdsKvCacheError:
                        pass  # a refused put (no room) is legal; a put that never ends is not
                with lock:
                    stored.append((tokens, slots))
                    del stored[:-16]
                    stats["stores"] += 1
        except BaseException as e:  # reported below
            errors.append(f"store: {e!r}")

    def retriever(seed):
        rnd = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        dst = zeros_like_cache("vllm", src)
        try:
            while time.monotonic() < stop:
                with lock:
                    seq = rnd.choice(stored) if stored else None
                if seq is None:
                    time.sleep(0.01)
                    continue
                tokens, slots = seq
                dslots = torch.randperm(nslots, generator=g)[:len(tokens)]
                n = eng.retrieve(tokens, dst, dslots)
                if n and not torch.equal(ref_rows("vllm", dst, dslots[:n]).view(torch.uint8),
                                         ref_rows("vllm", src, slots[:n]).view(torch.uint8)):
                    errors.append(f"retrieve: wrong bytes in the first {n} of {len(tokens)} tokens")
                with lock:
                    stats["retrieved"] += 1
                    stats["tokens"] += n
        except BaseException as e:  # reported below
            errors.append(f"retrieve: {e!r}")

    threads = [threading.Thread(target=storer, args=(0,), daemon=True)]
    threads += [threading.Thread(target=retriever, args=(s,), daemon=True) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stalled = [t for t in threads if t.is_alive()]
    try:
        assert not stalled, f"stalled: {len(stalled)} of 3 threads still running 55 s after the 5 s run ({stats})"
        assert errors == []
        print(stats)
        assert stats["stores"] > 0 and stats["retrieved"] > 0
    finally:
        if not stalled:
            bounded(eng.close, 60, "close")
