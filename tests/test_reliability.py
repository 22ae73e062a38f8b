"""Fault injection: crashes, corruption, a full file system, races, bad input and a soak.

Every read is compared byte for byte; each test records what it injected and
what it found (see RELIABILITY.md).
"""

import errno
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from gds_kvcache import (CacheEngineConfig, CacheEngineKey, KeyFormatError,
                         LocalDiskBackend, ShapeMismatchError, SlabMemoryAllocator, StorageManager)
from gds_kvcache.units import GB, MiB

from .conftest import mounted_tmpfs
from .helpers import run_threads
from .never_wrong_helpers import (check_config_input, check_key_string, check_load_shape, check_metadata_junk,
                                  config_dicts, key_strings, load_requests)
from .reliability_common import chunk_data, key_id, record, rkey, settle_put

ROOT = Path(__file__).resolve().parents[1]


def backend(d, cap_mib=64, engine="posix", slab_mib=64, **kw):
    cfg = CacheEngineConfig(local_disk=str(d), max_local_disk_size=cap_mib * MiB / GB, io_engine=engine,
                            io_threads=4, io_task_size=64 * 1024, **kw)
    alloc = SlabMemoryAllocator(slab_mib * MiB, "host")
    return LocalDiskBackend(cfg, None, alloc), alloc


def put(be, alloc, i, wait=True):
    data = chunk_data(i)
    o = alloc.allocate(data.shape, data.dtype)
    if o is None:
        return None
    o.tensor.copy_(data)
    f = be.submit_put_task(rkey(i), o)
    o.ref_count_down()
    if wait and f is not None:
        f.result(60)
    return f


def check_all(be):
    """(chunks checked, wrong bytes) over every chunk the backend reports."""
    checked = wrong = 0
    for k in be.keys():
        g = be.get_blocking(k)
        if g is None:
            continue  # dropped as unreadable: a miss, never wrong bytes
        ref = chunk_data(key_id(k))
        checked += 1
        if g.tensor.shape != ref.shape:
            wrong += g.nbytes
        else:
            wrong += int((g.tensor != ref).sum())
        g.ref_count_down()
    return checked, wrong


# -- crash -------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["posix", "kvikio"])
def test_sigkill_at_random_moments(tmp_path, engine):
    from .conftest import require_kvikio

    if engine == "kvikio":
        require_kvikio()
    trials = 50 if engine == "posix" else 5
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cap = 48
    total_checked = total_wrong = total_lost = 0
    for trial in range(trials):
        d = tmp_path / f"t{trial}"
        child = subprocess.Popen([sys.executable, "-m", "tests.crash_child", str(d), str(trial * 1000), str(cap),
                                  engine], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.0, 0.6))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
        # Only whole lines count: the kill may cut the last one.
        committed = {int(m) for m in re.findall(r"^commit (\d+) ok\n", out, re.M)}
        be, alloc = backend(d, cap, engine)
        present = {key_id(k) for k in be.keys()}
        checked, wrong = check_all(be)
        lost = len(committed - present)
        # Leftovers of interrupted writes were given back at start-up.
        pool_blocks = sum(os.stat(p).st_blocks * 512 for p in be.pool_paths)
        assert pool_blocks <= be.used_bytes + 64 * 1024 * len(be.pool_paths), "interrupted writes left blocks behind"
        assert be.disk_usage() <= cap * MiB
        be.memcheck()
        be.close()
        assert wrong == 0 and lost == 0, (trial, wrong, committed - present)
        total_checked += checked
        total_wrong += wrong
        total_lost += lost
    record(f"crash: SIGKILL mid-put ({engine} engine)", "SIGKILL of a process storing chunks, at a random "
           "moment 0-0.6 s into its run; then a fresh backend on the directory", trials, total_checked,
           total_wrong, total_lost)


# -- corruption --------------------------------------------------------------------
def test_random_corruption_is_never_served(tmp_path, caplog):
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    trials = 30
    checked_total = wrong_total = lost_total = 0
    for trial in range(trials):
        d = tmp_path / f"c{trial}"
        be, alloc = backend(d)
        ids = list(range(trial * 100, trial * 100 + 12))
        for i in ids:
            put(be, alloc, i)
        entries = {i: be.entry(rkey(i)) for i in ids}
        damaged = set()
        kind = rnd.choice(["flip", "flip_many", "truncate", "unlink_pool", "unlink_index", "garbage_index"])
        if kind.startswith("flip"):
            for _ in range(1 if kind == "flip" else 20):
                i = rnd.choice(ids)
                e = entries[i]
                path, local = be.locate(e.offset)
                pos = local + rnd.randrange(e.nbytes)
                with open(path, "r+b") as f:
                    f.seek(pos)
                    b = f.read(1)
                    f.seek(pos)
                    f.write(bytes([b[0] ^ (1 << rnd.randrange(8))]))
                damaged.add(i)
        be.close()
        if kind == "truncate":
            p = rnd.choice(sorted(d.glob("kvcache.pool.*")))
            os.truncate(p, rnd.randrange(os.path.getsize(p)))
        elif kind == "unlink_pool":
            os.unlink(rnd.choice(sorted(d.glob("kvcache.pool.*"))))
        elif kind == "unlink_index":
            for p in d.glob("kvcache.index*"):
                os.unlink(p)
        elif kind == "garbage_index":
            with open(d / rnd.choice(["kvcache.index.snap", "kvcache.index.log"]), "ab") as f:
                f.write(os.urandom(rnd.randrange(1, 3000)))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            be, alloc = backend(d)
            checked, wrong = check_all(be)
            be.memcheck()
            present = {key_id(k) for k in be.keys()}
            be.close()
        if kind.startswith("flip"):
            assert not (damaged & present), "a damaged chunk is still listed after its read"
            assert any("dropping chunk" in r.message for r in caplog.records)
            lost = len(set(ids) - damaged - present)
        elif kind == "garbage_index":
            lost = len(set(ids) - present)  # trailing garbage must not cost any chunk
        else:
            lost = 0  # the damaged file held chunks that are really gone: misses are right
        assert wrong == 0 and lost == 0, (kind, wrong, lost)
        checked_total += checked
        wrong_total += wrong
        lost_total += lost
    record("corruption behind the library's back", "bit flips in chunk bytes (1 or 20), truncated pool file, "
           "deleted pool file, deleted index, garbage appended to the index", trials, checked_total, wrong_total,
           lost_total)


# -- full file system ------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "6m") as mnt:
        yield mnt


def test_full_file_system_mid_put(small_fs):
    # The pool (14 MiB) is larger than the file system (6 MiB): writes hit ENOSPC.
    be, alloc = backend(small_fs / "kv", cap_mib=16)
    n = 0
    while be.stats["evictions"] == 0 and n < 400:  # ~85 KiB chunks: well past 6 MiB
        f = put(be, alloc, n, wait=False)
        try:
            f.result(60)
        except OSError as e:
            assert e.errno in (errno.ENOSPC, errno.EDQUOT)
        n += 1
    assert be.stats["evictions"] > 0, "eviction never made room"
    for i in range(n, n + 20):  # keeps going at the full file system
        put(be, alloc, i)
    checked, wrong = check_all(be)
    assert wrong == 0 and checked == len(be.keys()) > 0
    # A second, empty cache on the same file system, then the rest of the file
    # system taken from outside: it has nothing to evict, so its put must fail.
    be2, alloc2 = backend(small_fs / "kv2", cap_mib=16)
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(os.urandom(64 * 1024))
                f.flush()
        except OSError:
            pass
    f = put(be2, alloc2, 5000, wait=False)
    with pytest.raises(OSError) as exc:
        f.result(60)
    assert exc.value.errno in (errno.ENOSPC, errno.EDQUOT)
    assert not be2.contains(rkey(5000)) and be2.used_bytes == 0
    checked2, wrong2 = check_all(be)  # the first cache still serves every chunk it lists
    assert wrong2 == 0 and checked2 == len(be.keys()) > 0
    os.unlink(filler)
    for k in be.keys()[: len(be.keys()) // 2]:
        be.remove(k)  # gives its blocks back to the file system
    put(be2, alloc2, 5001)  # room again: serving continues
    assert be2.contains(rkey(5001))
    for b, a in ((be, alloc), (be2, alloc2)):
        b.memcheck()
        b.close()
        assert a.used == 0
    record("full file system mid-put", "6 MiB tmpfs under a 16 MiB pool: ENOSPC met by evicting LRU chunks "
           "and punching their blocks; then the file system filled from outside: a put with nothing to "
           "evict fails with ENOSPC in its future, earlier chunks stay readable", n + 22, checked + checked2,
           wrong + wrong2, 0)


# -- races ---------------------------------------------------------------------------
def test_threads_race_on_overlapping_keys_under_tight_capacity(tmp_path):
    be, alloc = backend(tmp_path / "r", cap_mib=3, slab_mib=48)
    stop = time.monotonic() + 20
    errors, wrong = [], [0]
    checked = [0]

    def worker(seed):
        rnd = random.Random(seed)
        try:
            while time.monotonic() < stop:
                i = rnd.randrange(40)
                op = rnd.random()
                if op < 0.35:
                    f = put(be, alloc, i, wait=False)
                    settle_put(f)
                elif op < 0.7:
                    g = be.get_blocking(rkey(i))
                    if g is not None:
                        wrong[0] += int((g.tensor != chunk_data(i)).sum()) if g.tensor.shape == chunk_data(
                            i).shape else g.nbytes
                        checked[0] += 1
                        g.ref_count_down()
                elif op < 0.85:
                    f = be.submit_prefetch_task(rkey(i))
                    if f is not None:
                        g = f.result(30)
                        if g is not None:
                            wrong[0] += int((g.tensor != chunk_data(i)).sum())
                            checked[0] += 1
                            g.ref_count_down()
                elif op < 0.95:
                    be.remove(rkey(i))
                else:  # force eviction with a chunk of half the pool
                    big = alloc.allocate((be.capacity_bytes // 2,), torch.uint8)
                    if big is not None:
                        big.tensor.fill_(7)
                        f = be.submit_put_task(CacheEngineKey("rel", "big", 1, 0, rnd.randrange(10**6)), big)
                        big.ref_count_down()
                        settle_put(f)
        except FutureTimeout:
            errors.append("deadlock: a future did not complete in 30 s")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    ts = run_threads(worker, 8)
    assert not any(t.is_alive() for t in ts), "deadlock: a worker never finished"
    assert errors == [] and wrong[0] == 0
    be.wait_for_puts(30)
    be.memcheck()
    be.close()
    alloc.memcheck()
    assert alloc.used == 0 and alloc.live_objects() == 0, "reference count leak"
    record("races: put/get/prefetch/remove/evict from 8 threads", "8 threads, 20 s, 40 overlapping keys, "
           "3 MiB pool (constant eviction), half-pool chunks forcing eviction", 8, checked[0], wrong[0], 0)


def test_manager_races_with_hot_tier(tmp_path):
    cfg = CacheEngineConfig(local_disk=str(tmp_path / "m"), max_local_disk_size=4 * MiB / GB,
                            max_local_cpu_size=1 * MiB / GB, slab_size=16 * MiB / GB, memory_device="host",
                            io_engine="posix", io_threads=4)
    sm = StorageManager(cfg)
    stop = time.monotonic() + 10
    errors, wrong, checked = [], [0], [0]

    def worker(seed):
        rnd = random.Random(seed)
        try:
            while time.monotonic() < stop:
                i = rnd.randrange(30)
                r = rnd.random()
                if r < 0.4:
                    data = chunk_data(i)
                    o = sm.allocate(data.shape, data.dtype)
                    if o is None:
                        continue
                    o.tensor.copy_(data)
                    f = sm.put(rkey(i), o)
                    settle_put(f)
                elif r < 0.85:
                    g = sm.get(rkey(i))
                    if g is not None:
                        wrong[0] += int((g.tensor != chunk_data(i)).sum())
                        checked[0] += 1
                        g.ref_count_down()
                elif r < 0.95:
                    sm.prefetch(rkey(i))
                else:
                    sm.remove(rkey(i))
        except Exception as e:  # pragma: no cover
            errors.append(repr(e))

    ts = run_threads(worker, 6)
    assert not any(t.is_alive() for t in ts) and errors == [] and wrong[0] == 0
    sm.memcheck()
    sm.close()
    assert sm.allocator.used == 0, "reference count leak"
    record("races through StorageManager (hot tier + disk)", "6 threads, 10 s, 30 keys, 1 MiB hot tier, "
           "4 MiB disk", 6, checked[0], wrong[0], 0)


# -- two processes ---------------------------------------------------------------------
def test_second_process_is_refused_and_first_keeps_serving(tmp_path):
    be, alloc = backend(tmp_path / "shared")
    for i in range(5):
        put(be, alloc, i)
    code = ("import sys; from gds_kvcache import *; from gds_kvcache.units import GB, MiB\n"
            f"cfg = CacheEngineConfig(local_disk={str(tmp_path / 'shared')!r}, max_local_disk_size=64*MiB/GB, "
            "io_engine='posix')\n"
            "try:\n    LocalDiskBackend(cfg, None, SlabMemoryAllocator(MiB, 'host'))\n"
            "except DirectoryLockedError:\n    sys.exit(0)\nsys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0
    checked, wrong = check_all(be)
    assert checked == 5 and wrong == 0
    be.close()
    record("two processes on one directory", "a second process opens the same directory while the first "
           "serves: refused with DirectoryLockedError", 1, checked, wrong, 0)


# -- bad input -------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(config_dicts())
def test_any_config_is_valid_or_a_config_error(values):
    # Fails on any other exception, on a ConfigError that names no field, and on a valid config
    # that altered a value or does not round-trip; config_dicts() makes valid configs common.
    assert check_config_input(values) in ("valid", "ConfigError")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_key_string_parses_or_is_a_key_error(s):
    try:
        k = CacheEngineKey.from_string(s)
    except KeyFormatError:
        return
    assert k.to_string() == s


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    d = tmp_path_factory.mktemp("badinput")
    be, alloc = backend(d)
    o = alloc.allocate((6, 10, 30), torch.float16)
    o.tensor.copy_(torch.randn(6, 10, 30, dtype=torch.float16))
    ref = o.tensor.clone()
    be.insert_key(rkey(1), o)
    o.ref_count_down()
    yield be, ref
    be.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(0, 2000), min_size=0, max_size=4),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.uint8]))
def test_any_load_shape_is_exact_or_a_shape_error(stored, shape, dtype):
    be, ref = stored
    try:
        g = be.load_bytes_from_disk(rkey(1).to_string(), dtype, tuple(shape))
    except ShapeMismatchError:
        return
    assert g is not None and dtype == ref.dtype and torch.equal(g.tensor.reshape(-1).view(torch.uint8),
                                                                ref.reshape(-1).view(torch.uint8))
    g.ref_count_down()
    assert be.contains(rkey(1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5),
       where=st.sampled_from(["append", "prepend_line", "layout"]))
def test_any_metadata_bytes_never_crash_or_lose_intact_chunks(tmp_path_factory, junk, where):
    d = tmp_path_factory.mktemp("meta")
    be, alloc = backend(d)
    for i in range(4):
        put(be, alloc, i)
    be.close()
    snap, log_ = d / "kvcache.index.snap", d / "kvcache.index.log"
    if where == "append":
        with open(log_, "ab") as f:
            for j in junk:
                f.write(j)
    elif where == "prepend_line":
        # Whole junk records (slots) right after the snapshot's header.
        from gds_kvcache.storage.index_codec import SLOT

        data = snap.read_bytes()
        blob = b"".join(junk)
        blob += bytes(-len(blob) % SLOT)
        snap.write_bytes(data[:SLOT] + blob + data[SLOT:])
    else:
        (d / "kvcache.layout").write_bytes(junk[0])  # unreadable: the layout is read off the pool files
    be, alloc = backend(d)
    checked, wrong = check_all(be)
    assert wrong == 0
    assert {key_id(k) for k in be.keys()} == {0, 1, 2, 3}, "junk in the index cost a stored chunk"
    be.close()


def test_bad_input_summary(tmp_path_factory):
    """Every bad-input property again, counted: the RELIABILITY.md row holds what this run asserted."""
    from collections import Counter

    runs = {"config": 300, "key": 500, "load": 200, "junk": 40}
    seen = {name: Counter() for name in runs}
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))

    @settings(max_examples=runs["config"], deadline=None, database=None)
    @given(config_dicts())
    def configs(values):
        seen["config"][check_config_input(values)] += 1

    @settings(max_examples=runs["key"], deadline=None, database=None)
    @given(key_strings())
    def key_text(s):
        seen["key"][check_key_string(s)] += 1

    be, alloc = backend(tmp_path_factory.mktemp("summary_load"))
    o = alloc.allocate((6, 10, 30), torch.float16)
    o.tensor.view(torch.int16).copy_(torch.randint(-32768, 32767, (6, 10, 30), dtype=torch.int16, generator=gen))
    ref = o.tensor.clone()
    be.insert_key(rkey(1), o)
    o.ref_count_down()

    @settings(max_examples=runs["load"], deadline=None, database=None)
    @given(load_requests(ref.numel()))
    def loads(request):
        shape, dtype = request
        seen["load"][check_load_shape(be, rkey(1), ref, shape, dtype)] += 1

    @settings(max_examples=runs["junk"], deadline=None, database=None)
    @given(junk=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5),
           where=st.sampled_from(["index", "layout"]))
    def metadata(junk, where):
        checked, wrong, lost = check_metadata_junk(tmp_path_factory.mktemp("summary_junk"), junk, where, gen)
        seen["junk"][where] += 1
        seen["junk"]["checked"] += checked
        seen["junk"]["wrong"] += wrong
        seen["junk"]["lost"] += lost

    try:
        configs()
        key_text()
        loads()
    finally:
        be.close()
    metadata()
    trials = {name: sum(v for k, v in seen[name].items() if k not in ("checked", "wrong", "lost")) for name in runs}
    for name, want in runs.items():
        assert trials[name] >= want, f"{name}: only {trials[name]} of {want} examples ran"
    # Each property reached both of its outcomes, so neither side went unchecked.
    for name, sides in (("config", ("valid", "ConfigError")), ("key", ("parsed", "KeyFormatError")),
                        ("load", ("exact", "ShapeMismatchError")), ("junk", ("index", "layout"))):
        assert all(seen[name][side] > 0 for side in sides), (name, dict(seen[name]))
    junk = seen["junk"]
    assert junk["wrong"] == 0 and junk["lost"] == 0, dict(junk)
    assert junk["checked"] == 4 * trials["junk"], dict(junk)
    cfg, keys, loaded = seen["config"], seen["key"], seen["load"]
    record("bad input (hypothesis)",
           f"random config values ({trials['config']}: {cfg['valid']} valid, {cfg['ConfigError']} ConfigError), "
           f"key strings ({trials['key']}: {keys['parsed']} parsed, {keys['KeyFormatError']} KeyFormatError), "
           f"load shapes/dtypes ({trials['load']}: {loaded['exact']} exact, {loaded['ShapeMismatchError']} "
           f"ShapeMismatchError), junk bytes appended to the index files ({junk['index']}) or replacing the "
           f"layout file ({junk['layout']}); no other exception",
           sum(trials.values()), junk["checked"] + loaded["exact"], junk["wrong"], junk["lost"])


# -- soak -------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_soak_cycles_the_cache_with_flat_memory(tmp_path):
    cap = 4
    cfg = CacheEngineConfig(local_disk=str(tmp_path / "soak"), max_local_disk_size=cap * MiB / GB,
                            max_local_cpu_size=1 * MiB / GB, slab_size=8 * MiB / GB, memory_device="host",
                            io_engine="posix", io_threads=4)
    sm = StorageManager(cfg)
    pool = sm.disk.capacity_bytes
    written = checked = wrong = 0
    i = 0
    rss_mark = None
    rnd = random.Random(5)
    while written < 25 * pool:
        data = chunk_data(i)
        o = sm.allocate(data.shape, data.dtype)
        o.tensor.copy_(data)
        f = sm.put(rkey(i), o)
        if f is not None:
            f.result(30)
            written += data.numel()
        for j in (i, rnd.randrange(max(0, i - 30), i + 1)):
            g = sm.get(rkey(j))
            if g is not None:
                wrong += int((g.tensor != chunk_data(j)).sum())
                checked += 1
                g.ref_count_down()
        if rss_mark is None and written > 3 * pool:
            rss_mark = _rss()
        i += 1
    growth = _rss() - rss_mark
    assert sm.disk.disk_usage() <= cap * MiB
    index_bytes = sum(p.stat().st_size for p in (tmp_path / "soak").glob("kvcache.index*"))
    assert index_bytes < 256 * 1024, "index log never compacted"
    sm.memcheck()
    sm.close()
    assert sm.allocator.used == 0
    assert wrong == 0
    assert growth < 16 * MiB, f"host memory grew by {growth / MiB:.1f} MiB over the soak"
    record("soak", f"mixed put/get, {written / MiB:.0f} MiB through a {pool / MiB:.1f} MiB pool "
           f"({written / pool:.0f} cycles); RSS growth after warm-up {growth / MiB:.1f} MiB", 1, checked, wrong, 0)
