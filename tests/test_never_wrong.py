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
import re
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineMetadata, GdsKvCacheError, StorageManager
from gds_kvcache.engine import CacheEngine
from gds_kvcache.errors import ClosedError
from gds_kvcache.units import KiB, MiB

from .conftest import ON_CI, mounted_tmpfs
from .kernel_cases import make_cache, ref_rows, zeros_like_cache
from .never_wrong_helpers import (LOCKED, OPENED, ROOT, RecordingLookup, bounded, dir_footprint, gb, key,
                                  manager_config, open_backend, open_in_subprocess, put_bytes,
                                  random_bytes, read_exact, wait_put, warnings_from_library)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def outcomes(got: dict) -> dict:
    """``{"hit": n, "miss": m, "wrong": w}`` (zero counts left out) of a ``{key: read_exact(...)}`` map."""
    return {r: n for r in ("hit", "miss", "wrong") if (n := sum(v == r for v in got.values()))}


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
    lookup = RecordingLookup(gate=gate, gate_ops={("insert", held)})  # parks the only I/O thread on the first put
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

        def queue_behind():
            sm.prefetch(key(0))
            for i in (2, 3, 4):
                o = sm.allocate((c,), torch.uint8, eviction=False)
                if o is None:  # an implementation may hold the prefetch's slab room already
                    continue
                want[key(i)] = random_bytes(c, gen)
                o.tensor.copy_(want[key(i)])
                futures.append(sm.put(key(i), o))

        # On another thread: a library that makes callers wait for the parked lookup call would
        # otherwise hold this thread until the gate times out. That wait is test_3's business.
        queuer = threading.Thread(target=queue_behind, daemon=True)
        queuer.start()
        queuer.join(5)
        gate.set()
        queuer.join(20)
        assert not queuer.is_alive(), "prefetch or put hung"
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
    L, nb, bs, h, d_ = 4, 64, 16, 4, 32
    chunk = 32
    cb = 2 * L * chunk * h * d_ * 2  # 64 KiB per chunk
    cfg = CacheEngineConfig(chunk_size=chunk, local_disk=str(tmp_path / "kv"), max_local_disk_size=gb(16 * MiB),
                            max_local_cpu_size=gb(6 * cb), slab_size=gb(6 * cb), memory_device="host",
                            io_engine="posix")
    md = CacheEngineMetadata("org/model", 1, 0, "vllm", torch.bfloat16, (L, 2, chunk, h, d_))
    src = make_cache("vllm", L, nb, bs, h, d_, torch.bfloat16)
    nslots = nb * bs
    stored: list = []  # (tokens, slots) of stored sequences, newest last
    lock = threading.Lock()
    errors: list = []
    stats = {"retrieved": 0, "tokens": 0, "stores": 0}
    stop = time.monotonic() + 5
    eng = CacheEngine(cfg, md, "vllm")

    def running():
        # 5 s, and on until a store and a retrieve of a stored sequence happened: on a loaded
        # machine the first store may take the whole 5 s, and a run that retrieved nothing
        # would prove nothing. A stall still shows: the join below waits 30 s past the 5 s.
        return time.monotonic() < stop or not (stats["stores"] and stats["retrieved"])

    def storer(_):
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        try:
            while running() and not errors:
                # A new sequence every time, so puts keep flowing; 16-30 chunks, so one retrieve
                # queues more prefetches than the slab (6 chunks) and the I/O pool (16 threads)
                # hold; random first tokens, so no two sequences share a chunk key.
                n = int(torch.randint(16 * chunk, 30 * chunk + 1, (1,), generator=g))
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
            while running() and not errors:
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
    deadline = stop + 30  # generous: the run is 5 s, a store or retrieve takes milliseconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stalled = [t for t in threads if t.is_alive()]
    try:
        assert not stalled, (f"stalled: {len(stalled)} of 3 threads still running 30 s after the 5 s run "
                             f"(or no store and retrieve in all that time: {stats})")
        assert errors == []
        assert stats["stores"] > 0 and stats["retrieved"] > 0
    finally:
        if not stalled:
            bounded(eng.close, 60, "close")


# -- 2: a key that is not a CacheEngineKey is refused at once ---------------------------------------
def _refused(call, what):
    """True when ``call`` raised a library error at once, or returned a future that failed with one."""
    try:
        fut = bounded(call, 10, what)
    except GdsKvCacheError:
        return True
    if fut is None:
        return False
    try:
        fut.result(10)
    except GdsKvCacheError:
        return True
    except Exception as e:
        raise AssertionError(f"{what}: failed with {e!r}, not the library's own error") from e
    return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["vllm@m@1@0@ab", None, 17, ("vllm", "m", 1, 0, 1)], ids=repr)
def test_2_backend_refuses_a_non_key(tmp_path, gen, bad):
    be, alloc = open_backend(tmp_path / "kv", slab_mib=2)
    try:
        o = alloc.allocate((64 * KiB,), torch.uint8)
        o.tensor.copy_(random_bytes(64 * KiB, gen))
        try:
            assert _refused(lambda: be.submit_put_task(bad, o), "submit_put_task"), "a non-key put was accepted"
        finally:
            o.ref_count_down()
        o = alloc.allocate((64 * KiB,), torch.uint8)
        o.tensor.copy_(random_bytes(64 * KiB, gen))
        try:
            with pytest.raises(GdsKvCacheError):
                bounded(lambda: be.insert_key(bad, o), 10, "insert_key")
        finally:
            o.ref_count_down()
        assert be.keys() == []
        assert alloc.used == 0, "the refused put kept a reference to the slab object"
        data = random_bytes(64 * KiB, gen)  # the backend still serves
        wait_put(put_bytes(be, alloc, key(1), data))
        assert read_exact(be, key(1), data) == "hit"
    finally:
        bounded(be.close, 30, "close")
    be, alloc = open_backend(tmp_path / "kv", slab_mib=2)
    assert be.keys() == [key(1)]
    be.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [None, "vllm@m@1@0@ab"], ids=repr)
def test_2_manager_put_of_a_non_key_stores_nothing_and_frees_the_slab(tmp_path, gen, bad):
    slab = 1 * MiB
    sm = StorageManager(manager_config(tmp_path / "kv", slab_bytes=slab))
    try:
        o = sm.allocate((256 * KiB,), torch.uint8)
        o.tensor.copy_(random_bytes(256 * KiB, gen))
        try:
            bounded(lambda: sm.put(bad, o), 10, "put")
        except GdsKvCacheError:
            pass
        del o  # put takes over the caller's reference, as documented, whether it stores or refuses
        # Nothing may keep the refused object: the whole slab is free again, without eviction.
        full = sm.allocate((slab,), torch.uint8, eviction=False)
        assert full is not None, ("the refused put's slab object is still held (put takes over the caller's "
                                  "reference even when it refuses the key)")
        full.ref_count_down()
    finally:
        bounded(sm.close, 30, "close")
    be, _ = open_backend(tmp_path / "kv", slab_mib=2)
    assert be.keys() == [], "a put with a non-key stored something"
    be.close()


# -- 3: the lookup server never changes local state, and is called outside the backend's lock ------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("verify", [True, False], ids=["checksums", "no-checksums"])
def test_3_failing_lookup_server_changes_nothing_locally(tmp_path, gen, engine_name, verify):
    lookup = RecordingLookup(fail_insert=True)
    be, alloc = open_backend(tmp_path / "kv", engine_name, disk_mib=4, lookup_server=lookup, verify_checksums=verify)
    want, put_errors = {}, []
    try:
        for i in range(6):  # a later put would land on an extent freed by mistake
            want[key(i)] = random_bytes(192 * KiB + 4096 * i, gen)
            try:
                wait_put(put_bytes(be, alloc, key(i), want[key(i)]))
            except Exception as e:  # collected: the reads below show what the failure cost
                put_errors.append(repr(e))
        reads = {k: read_exact(be, k, v) for k, v in want.items()}
        assert outcomes(reads) == {"hit": len(want)}, "a chunk whose lookup insert failed was lost or overwritten"
        assert put_errors == [], "the lookup server's failure failed the local put"
        assert set(be.keys()) == set(want)
    finally:
        bounded(be.close, 30, "close")
    be, alloc = open_backend(tmp_path / "kv", engine_name, disk_mib=4, verify_checksums=verify)
    try:
        assert outcomes({k: read_exact(be, k, v) for k, v in want.items()}) == {"hit": len(want)}
    finally:
        be.close()


@pytest.mark.timeout(90)
def test_3_lookup_server_is_called_outside_the_backend_lock(tmp_path, gen):
    stored = {key(i): random_bytes(128 * KiB, gen) for i in range(4)}
    d = tmp_path / "kv"
    be, alloc = open_backend(d, disk_mib=4)
    for k, v in stored.items():
        wait_put(put_bytes(be, alloc, k, v))
    be.close()
    gate = threading.Event()
    # The put of key 10 and the remove of key 0 block in the lookup server.
    lookup = RecordingLookup(gate=gate, gate_ops={("insert", key(10)), ("remove", key(0))})
    be, alloc = open_backend(d, disk_mib=4, lookup_server=lookup)
    try:
        for what, start in (("insert", lambda: put_bytes(be, alloc, key(10), random_bytes(128 * KiB, gen))),
                            ("remove", lambda: be.remove(key(0)))):
            lookup.entered.clear()
            worker = threading.Thread(target=start, daemon=True)
            worker.start()
            assert lookup.entered.wait(20), f"lookup {what} never called"
            # While the lookup server sits in {what}, other callers are served.
            for k in (key(1), key(2)):
                assert bounded(lambda: be.contains(k), 10, f"contains during a slow lookup {what}")
                assert bounded(lambda: read_exact(be, k, stored[k]), 10, f"get during a slow lookup {what}") == "hit"
            assert bounded(lambda: be.contains(key(99)), 10, f"contains during a slow lookup {what}") is False
            gate.set()
            worker.join(20)
            assert not worker.is_alive(), f"{what} did not finish once the lookup server returned"
            gate.clear()
    finally:
        gate.set()
        bounded(be.close, 30, "close")


# -- 5: remove wins over a prefetch in flight -------------------------------------------------------
@pytest.mark.timeout(120)
def test_5_prefetch_racing_remove_never_brings_the_old_bytes_back(tmp_path, gen):
    c = 128 * KiB
    # A hot tier of one chunk: each round's key is pushed out of it by a filler put, so the
    # prefetch really reads the disk.
    sm = StorageManager(manager_config(tmp_path / "kv", disk_mib=16, slab_bytes=16 * c, hot_bytes=c, io_threads=4))
    stale = []
    try:
        for r in range(150):
            k, filler = key(2 * r), key(2 * r + 1)
            old, new = random_bytes(c, gen), random_bytes(c, gen)
            wait_put(put_bytes(sm, None, k, old))
            wait_put(put_bytes(sm, None, filler, random_bytes(c, gen)))
            go = threading.Barrier(2)

            def prefetch():
                go.wait(10)
                sm.prefetch(k)

            def remove():
                go.wait(10)
                time.sleep(random.random() * 0.002)  # land anywhere in the prefetch's read
                sm.remove(k)

            ts = [threading.Thread(target=f, daemon=True) for f in (prefetch, remove)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(20)
            assert not any(t.is_alive() for t in ts), "prefetch or remove hung"
            after_remove = bounded(lambda: read_exact(sm, k, old), 20, "get after remove")
            if after_remove != "miss":
                stale.append((r, "get after remove", after_remove))
            wait_put(put_bytes(sm, None, k, new))
            after_put = bounded(lambda: read_exact(sm, k, new), 20, "get after the new put")
            if after_put not in ("hit", "miss"):
                stale.append((r, "get after a put of new bytes", after_put))
            sm.remove(filler)
    finally:
        bounded(sm.close, 30, "close")
    assert stale == [], f"{len(stale)} of 150 rounds served removed bytes: {stale[:5]}"


# -- 8: a put that can never fit evicts nothing and says why ----------------------------------------
@pytest.mark.timeout(60)
def test_8_put_larger_than_the_pool_evicts_nothing_and_names_the_size(tmp_path, gen):
    be, alloc = open_backend(tmp_path / "kv", disk_mib=4, slab_mib=10)
    want = {key(i): random_bytes(256 * KiB, gen) for i in range(6)}
    try:
        for k, v in want.items():
            wait_put(put_bytes(be, alloc, k, v))
        big = 5 * MiB  # more than the whole 4 MiB budget
        o = alloc.allocate((big,), torch.uint8)
        o.tensor.copy_(random_bytes(big, gen))
        err = None
        try:
            fut = be.submit_put_task(key(100), o)
            wait_put(fut)
        except GdsKvCacheError as e:
            err = e
        finally:
            o.ref_count_down()
        assert err is not None, "a put larger than the pool was accepted"
        msg = str(err)
        assert "being read" not in msg, f"misleading reason: {msg}"
        numbers = {int(n) for n in re.findall(r"\d+", msg.replace(",", "").replace("_", ""))}
        assert numbers & {big, o.phys_size} or any(w in msg.lower() for w in ("capacity", "larger", "too large",
                                                                                 "exceeds", "budget")), msg
        assert not be.contains(key(100))
        # Nothing was evicted for a put that could never fit.
        assert outcomes({k: read_exact(be, k, v) for k, v in want.items()}) == {"hit": len(want)}
    finally:
        bounded(be.close, 30, "close")


# -- 9: close while reading drops nothing; calls after close raise ClosedError ----------------------
@pytest.mark.timeout(120)
def test_9_close_while_readers_run_keeps_every_chunk(tmp_path, gen, engine_name):
    d = tmp_path / "kv"
    n = 200
    want = {key(i): random_bytes(32 * KiB + 512 * (i % 7), gen) for i in range(n)}
    be, alloc = open_backend(d, engine_name, disk_mib=16, slab_mib=4)
    for k, v in want.items():
        wait_put(put_bytes(be, alloc, k, v))
    reads = [0]
    errors, wrong = [], []
    keys = list(want)

    def reader(seed):
        rnd = random.Random(seed)
        while True:
            k = rnd.choice(keys)
            try:
                r = read_exact(be, k, want[k])
            except ClosedError:
                return
            except Exception as e:  # anything but ClosedError is a defect
                errors.append(repr(e))
                return
            if r == "wrong":
                wrong.append(k)
            reads[0] += 1

    ts = [threading.Thread(target=reader, args=(s,), daemon=True) for s in range(4)]
    for t in ts:
        t.start()
    t0 = time.monotonic()
    while reads[0] < 400 and time.monotonic() - t0 < 20:
        time.sleep(0.001)
    bounded(be.close, 30, "close while reading")
    for t in ts:
        t.join(20)
    hung = sum(t.is_alive() for t in ts)
    be, alloc = open_backend(d, engine_name, disk_mib=16, slab_mib=4)
    try:
        lost = len(set(want) - set(be.keys()))
        bad = {k: r for k, v in want.items() if (r := read_exact(be, k, v)) != "hit"}
    finally:
        be.close()
    assert (lost, len(bad)) == (0, 0), f"{lost} of {n} intact chunks gone after close-while-reading and reopen"
    assert hung == 0, "a reader hung across close"
    assert errors == [] and wrong == [], "readers must see ClosedError (or a miss), nothing else"


def _after_close(name, call, allowed=lambda v: True):
    """None if ``call`` raised ClosedError or returned an allowed value, else what went wrong."""
    try:
        v = bounded(call, 10, name)
    except ClosedError:
        return None
    except BaseException as e:
        return f"{name}: {type(e).__name__}: {e}"
    if hasattr(v, "result"):  # a future: it must fail with ClosedError, not hang or succeed
        try:
            v.result(10)
        except ClosedError:
            return None
        except BaseException as e:
            return f"{name}: future failed with {type(e).__name__}: {e}"
        return f"{name}: future succeeded after close"
    return None if allowed(v) else f"{name}: returned {v!r}"


@pytest.mark.timeout(60)
def test_9_backend_calls_after_close_raise_closed_error(tmp_path, gen):
    be, alloc = open_backend(tmp_path / "kv", disk_mib=4)
    wait_put(put_bytes(be, alloc, key(1), random_bytes(64 * KiB, gen)))
    be.close()
    o = alloc.allocate((64 * KiB,), torch.uint8)
    o.tensor.copy_(random_bytes(64 * KiB, gen))
    problems = [
        _after_close("submit_put_task", lambda: be.submit_put_task(key(2), o), lambda v: v is None),
        _after_close("insert_key", lambda: be.insert_key(key(2), o), lambda v: False),
        _after_close("get_blocking", lambda: be.get_blocking(key(1)), lambda v: v is None),
        _after_close("submit_prefetch_task", lambda: be.submit_prefetch_task(key(1)), lambda v: v is None),
        _after_close("contains", lambda: be.contains(key(1)), lambda v: isinstance(v, bool)),
        _after_close("remove", lambda: be.remove(key(1)), lambda v: isinstance(v, bool)),
        _after_close("keys", lambda: be.keys(), lambda v: isinstance(v, list)),
        _after_close("io_report", lambda: be.io_report()),
        _after_close("close again", lambda: be.close(), lambda v: v is None),
    ]
    o.ref_count_down()
    assert [p for p in problems if p] == []
    be, alloc = open_backend(tmp_path / "kv", disk_mib=4)
    assert be.keys() == [key(1)], "a call after close changed the directory"
    be.close()


@pytest.mark.timeout(60)
def test_9_manager_calls_after_close_raise_closed_error(tmp_path, gen):
    sm = StorageManager(manager_config(tmp_path / "kv", disk_mib=4, slab_bytes=1 * MiB))
    wait_put(put_bytes(sm, None, key(1), random_bytes(64 * KiB, gen)))
    o = sm.allocate((64 * KiB,), torch.uint8)
    sm.close()
    problems = [
        _after_close("allocate", lambda: sm.allocate((64 * KiB,), torch.uint8), lambda v: v is None),
        _after_close("put", lambda: sm.put(key(2), o), lambda v: v is None),
        _after_close("get", lambda: sm.get(key(1)), lambda v: v is None),
        _after_close("prefetch", lambda: sm.prefetch(key(1)), lambda v: v is None),
        _after_close("contains", lambda: sm.contains(key(1)), lambda v: isinstance(v, bool)),
        _after_close("remove", lambda: sm.remove(key(1)), lambda v: isinstance(v, bool)),
        _after_close("io_report", lambda: sm.io_report()),
        _after_close("close again", lambda: sm.close(), lambda v: v is None),
    ]
    assert [p for p in problems if p] == []
    be, _ = open_backend(tmp_path / "kv", disk_mib=4)
    assert be.keys() == [key(1)], "a call after close changed the directory"
    be.close()


# -- 10: the directory lock cannot be deleted out from under its holder -----------------------------
@pytest.mark.timeout(120)
def test_10_deleting_the_lock_file_does_not_let_a_second_process_in(tmp_path, gen):
    d = tmp_path / "kv"
    disk_gb = gb(4 * MiB)
    be, alloc = open_backend(d, disk_mib=4)
    try:
        wait_put(put_bytes(be, alloc, key(1), random_bytes(64 * KiB, gen)))
        removed = [p for p in d.iterdir() if "lock" in p.name.lower() and p.is_file()]
        for p in removed:
            p.unlink()
        r = open_in_subprocess(d, disk_gb)
        assert r.returncode == LOCKED, (f"with the lock file(s) {[p.name for p in removed]} deleted, a second "
                                        f"process opened the directory (exit {r.returncode}): {r.stderr[-2000:]}")
    finally:
        be.close()
    r = open_in_subprocess(d, disk_gb)  # once the holder is gone, the directory opens again
    assert r.returncode == OPENED and r.stdout.split() == ["1"], (r.returncode, r.stdout, r.stderr[-2000:])


# -- 11: a budget or layout change keeps the chunks that still fit ----------------------------------
def _store(d, gen, disk_mib, n, size=128 * KiB):
    want = {key(i): random_bytes(size, gen) for i in range(n)}
    be, alloc = open_backend(d, disk_mib=disk_mib, slab_mib=2)
    for k, v in want.items():
        wait_put(put_bytes(be, alloc, k, v))
    be.close()
    return want


def _reads(d, want, disk_mib):
    be, alloc = open_backend(d, disk_mib=disk_mib, slab_mib=2)
    try:
        return {k: read_exact(be, k, v) for k, v in want.items()}
    finally:
        be.close()


@pytest.mark.timeout(60)
def test_11_larger_budget_keeps_every_chunk(tmp_path, gen):
    want = _store(tmp_path / "kv", gen, 4, 16)
    assert outcomes(_reads(tmp_path / "kv", want, 8)) == {"hit": len(want)}, "a larger budget lost chunks"


@pytest.mark.timeout(60)
def test_11_smaller_budget_keeps_the_chunks_that_fit(tmp_path, gen, caplog):
    want = _store(tmp_path / "kv", gen, 8, 40)  # 5 MiB of chunks in an 8 MiB budget
    with caplog.at_level(logging.WARNING):
        got = _reads(tmp_path / "kv", want, 4)  # a pool under 4 MiB: some cannot stay
    assert "wrong" not in got.values()
    kept = sum(r == "hit" for r in got.values())
    assert kept > 0, "a smaller budget dropped every chunk, including those that still fit"
    if kept < len(want):
        assert warnings_from_library(caplog.records), "chunks were dropped without a warning"
    # Writing continues under the new budget.
    be, alloc = open_backend(tmp_path / "kv", disk_mib=4, slab_mib=2)
    try:
        v = random_bytes(128 * KiB, gen)
        wait_put(put_bytes(be, alloc, key(999), v))
        assert read_exact(be, key(999), v) == "hit"
    finally:
        be.close()


@pytest.mark.timeout(60)
def test_11_deleting_only_the_layout_file_keeps_every_chunk(tmp_path, gen):
    want = _store(tmp_path / "kv", gen, 4, 16)
    layout = [p for p in (tmp_path / "kv").iterdir() if "layout" in p.name]
    assert layout, "no layout file found"
    for p in layout:
        p.unlink()
    assert outcomes(_reads(tmp_path / "kv", want, 4)) == {"hit": len(want)}, "a lost layout file lost chunks"


@pytest.mark.timeout(180)
def test_11_demo_on_an_existing_cache_keeps_its_chunks(tmp_path, gen):
    d = tmp_path / "kv"
    want = _store(d, gen, 8, 16)  # another budget than the demo's
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "gds_kvcache", "demo", "--dir", str(d), "--total-mib", "2",
                        "--chunk-mib", "1", "--io-engine", "posix", "--memory", "host"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert outcomes(_reads(d, want, 8)) == {"hit": len(want)}, "the demo dropped chunks of the cache it was given"


# -- 12: a zero-length chunk is refused at put or round-trips --------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape,dtype", [((0,), torch.uint8), ((2, 0, 8), torch.float16)], ids=["0", "2x0x8"])
def test_12_zero_length_chunk_is_refused_or_survives_restart(tmp_path, shape, dtype):
    d = tmp_path / "kv"
    be, alloc = open_backend(d, disk_mib=4, slab_mib=1)
    try:
        o = alloc.allocate(shape, dtype)
        try:
            refused = _refused(lambda: be.submit_put_task(key(7), o), "submit_put_task of an empty chunk")
        finally:
            o.ref_count_down()
        stored = be.contains(key(7))
        assert stored != refused, f"refused={refused} but contains={stored}"
    finally:
        bounded(be.close, 30, "close")
    be, alloc = open_backend(d, disk_mib=4, slab_mib=1)
    try:
        if refused:
            assert not be.contains(key(7))
            return
        assert be.contains(key(7)), "an empty chunk accepted at put was dropped at restart"
        g = be.get_blocking(key(7))
        assert g is not None and tuple(g.shape) == shape and g.dtype == dtype
        g.ref_count_down()
    finally:
        be.close()


# -- 13: a failing close still releases the directory ------------------------------------------------
def _chattr(flag: str, path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.timeout(120)
def test_13_close_on_an_unwritable_directory_releases_the_lock(tmp_path, gen):
    # The immutable flag stops even root from creating, renaming or deleting entries in the
    # directory: whatever close must write there fails, as on a file system remounted read-only.
    d = tmp_path / "kv"
    disk_gb = gb(4 * MiB)
    be, alloc = open_backend(d, disk_mib=4)
    want = {key(i): random_bytes(96 * KiB, gen) for i in range(3)}
    for k, v in want.items():
        wait_put(put_bytes(be, alloc, k, v))
    if not _chattr("+i", d):
        be.close()
        if ON_CI:
            pytest.fail("chattr +i is not available")
        pytest.skip("chattr +i is not available here")
    try:
        try:
            bounded(be.close, 30, "close on an unwritable directory")
        except (GdsKvCacheError, OSError):
            pass  # reporting the failure is fine; keeping the directory locked is not
    finally:
        _chattr("-i", d)
    r = open_in_subprocess(d, disk_gb)
    assert r.returncode == OPENED, f"after a failing close the directory stays locked (exit {r.returncode})"
    be, alloc = open_backend(d, disk_mib=4)
    try:
        assert outcomes({k: read_exact(be, k, v) for k, v in want.items()}) == {"hit": len(want)}
    finally:
        be.close()


# -- 14: a truncated pool is a miss with every engine -------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("verify", [True, False], ids=["checksums", "no-checksums"])
def test_14_truncated_pool_files_are_misses_and_puts_go_on(tmp_path, gen, engine_name, verify):
    d = tmp_path / "kv"
    be, alloc = open_backend(d, engine_name, disk_mib=8, verify_checksums=verify)
    try:
        want = {key(i): random_bytes(128 * KiB + 4096 * i, gen) for i in range(8)}
        for k, v in want.items():
            wait_put(put_bytes(be, alloc, k, v))
        pools = [p for p in d.iterdir() if p.name.startswith("kvcache.pool")]
        assert pools, "no pool file found"
        for p in pools:
            os.truncate(p, 0)  # behind the open backend's back
        got = {}
        for k, v in want.items():
            try:
                got[k] = bounded(lambda: read_exact(be, k, v), 20, "get from a truncated pool")
            except Exception as e:
                got[k] = f"raised {type(e).__name__}: {e}"
        assert set(got.values()) == {"miss"}, f"gets from a truncated pool: {sorted(set(got.values()))}"
        fresh = {key(100 + i): random_bytes(96 * KiB, gen) for i in range(4)}
        for k, v in fresh.items():
            wait_put(put_bytes(be, alloc, k, v))
        assert outcomes({k: read_exact(be, k, v) for k, v in fresh.items()}) == {"hit": len(fresh)}
    finally:
        bounded(be.close, 30, "close")


# -- 15: close releases the slab, without the garbage collector -----------------------------------
def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cycles(tmp_path, gen, device, measure, n=6, slab=256 * MiB, engine="posix"):
    """Open, use and close a StorageManager ``n`` times with the garbage collector off.

    Returns (``measure()`` after each close while the closed manager is still referenced,
    whether each manager was gone right after ``del``).
    """
    after_close, freed = [], []
    cfg = manager_config(tmp_path / "kv", engine, disk_mib=8, slab_bytes=slab, hot_bytes=4 * MiB, io_threads=2)
    cfg = cfg.replace(memory_device=device)
    gc.collect()
    gc.disable()
    try:
        for cycle in range(n):
            sm = StorageManager(cfg)
            for i in range(4):
                v = random_bytes(256 * KiB, gen)
                wait_put(put_bytes(sm, None, key(100 * cycle + i), v))
                assert read_exact(sm, key(100 * cycle + i), v) == "hit"
            sm.close()
            after_close.append(measure())
            ref = weakref.ref(sm)
            del sm
            freed.append(ref() is None)
    finally:
        gc.enable()
        gc.collect()
    return after_close, freed


@pytest.mark.timeout(120)
def test_15_closed_managers_release_their_host_slab(tmp_path, gen):
    slab = 256 * MiB
    base = _resident()
    after_close, freed = _cycles(tmp_path, gen, "host", _resident, slab=slab)
    growth = [(r - base) / MiB for r in after_close]
    assert growth[-1] <= 1.25 * slab / MiB, f"resident memory after each close grew by {growth} MiB"
    assert all(freed), f"a StorageManager outlived `del` (a reference cycle): {freed}"


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_15_closed_managers_release_their_cuda_slab(tmp_path, gen, engine_name):
    slab = 256 * MiB
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()

    def measure():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    after_close, freed = _cycles(tmp_path, gen, "cuda", measure, slab=slab, engine=engine_name)
    # A few small device buffers (kernel scratch) may stay; a slab may not.
    held = [(a - base) / MiB for a in after_close]
    assert max(held) < slab / 4 / MiB, f"GPU memory held after each close: {held} MiB (slab {slab / MiB:.0f} MiB)"
    assert all(freed), f"a StorageManager outlived `del` (a reference cycle): {freed}"


# -- 16: the disk budget is a hard limit, index included ---------------------------------------------
@pytest.mark.timeout(120)
def test_16_budget_holds_data_and_index_under_put_remove_churn(tmp_path, gen):
    d = tmp_path / "kv"
    budget = 8 * MiB
    model = "m" * 200  # long keys make long index records
    be, alloc = open_backend(d, disk_mib=8, slab_mib=4)
    over = []
    live: list = []
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    try:
        data = random_bytes(8 * KiB, gen)
        for op in range(6000):
            # 70% puts: the pool fills within ~1400 ops, then puts evict while removes punch holes.
            if live and rnd.random() < 0.3:
                be.remove(live.pop(rnd.randrange(len(live))))
            else:
                k = key(op, model)
                try:
                    wait_put(put_bytes(be, alloc, k, data))
                except GdsKvCacheError:
                    pass  # refused (full): allowed; exceeding the budget is not
                live.append(k)
            if op % 50 == 0:
                allocated, charged = dir_footprint(d)
                if max(allocated, charged) > budget:
                    over.append((op, allocated - budget, charged - budget))
        allocated, charged = dir_footprint(d)
        if max(allocated, charged) > budget:
            over.append(("end", allocated - budget, charged - budget))
    finally:
        bounded(be.close, 30, "close")
    assert over == [], f"over the {budget} byte budget at {len(over)} checks (op, bytes over, bytes over " \
                       f"counting metadata at its apparent size): {over[:5]}"


# -- 17: a budget larger than the file system's free space is warned about ---------------------------
@pytest.mark.timeout(60)
def test_17_budget_beyond_free_space_is_warned(tmp_path, caplog):
    with mounted_tmpfs(tmp_path / "small", "4m") as mnt:
        with caplog.at_level(logging.WARNING, logger="gds_kvcache"):
            be, _ = open_backend(mnt / "fits", disk_mib=2, slab_mib=1)
            be.close()
        assert warnings_from_library(caplog.records) == [], "warned although the budget fits"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gds_kvcache"):
            be, _ = open_backend(mnt / "too_big", disk_mib=64, slab_mib=1)
            be.close()
        warned = warnings_from_library(caplog.records)
        assert warned, "a 64 MiB budget on a 4 MiB file system opened without a warning"
