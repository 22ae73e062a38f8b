import asyncio
import logging
import os
import threading

import pytest
import torch

from gds_kvcache import (CacheEngineConfig, CacheEngineKey, LocalDiskBackend,
                         ShapeMismatchError, SlabMemoryAllocator, StorageFullError, StorageUnavailableError)
from gds_kvcache.memory import MemoryFormat
from gds_kvcache.storage.index_codec import SLOT
from gds_kvcache.units import GB, MiB, PAGE

from .helpers import random_tensor, run_threads, same_bytes

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int8]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


def key(i, model="m"):
    return CacheEngineKey("vllm", model, 1, 0, i)


def make(tmp_path, engine="posix", disk_mib=64, slab_mib=64, **kw):
    cfg = CacheEngineConfig(local_disk=str(tmp_path / "disk"), max_local_disk_size=disk_mib * MiB / GB,
                            io_engine=engine, io_threads=4, io_task_size=256 * 1024, **kw)
    alloc = SlabMemoryAllocator(slab_mib * MiB, "host")
    return LocalDiskBackend(cfg, None, alloc), alloc


def put_obj(alloc, shape, dtype):
    o = alloc.allocate(shape, dtype, MemoryFormat.KV_2LTD)
    o.tensor.copy_(random_tensor(shape, dtype))
    return o


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_dtypes_unaligned_sizes(tmp_path, engine_name, dtype):
    be, alloc = make(tmp_path, engine_name)
    shapes = [(2, 3, 17, 129), (1, 1, 1, 1), (2, 5, 33, 100)]  # none a 4 KiB multiple
    refs = []
    for i, shape in enumerate(shapes):
        o = put_obj(alloc, shape, dtype)
        assert (o.nbytes % PAGE) != 0
        refs.append(o.tensor.clone())
        fut = be.submit_put_task(key(i), o)
        assert fut.result() == o.phys_size
        o.ref_count_down()
    for i, ref in enumerate(refs):
        got = be.get_blocking(key(i))
        assert got is not None and same_bytes(got.tensor, ref) and got.fmt == MemoryFormat.KV_2LTD
        got.ref_count_down()
    be.memcheck()
    be.close()
    alloc.memcheck()
    assert alloc.used == 0


def test_restart_recovers_every_chunk(tmp_path, engine_name):
    be, alloc = make(tmp_path, engine_name)
    refs = {}
    for i in range(20):
        o = put_obj(alloc, (2, 2, 31, 64), torch.bfloat16)
        refs[i] = o.tensor.clone()
        be.submit_put_task(key(i), o)
        o.ref_count_down()
    be.remove(key(3))
    be.close()
    be2, alloc2 = make(tmp_path, engine_name)
    assert sorted(int(k.chunk_hash, 16) for k in be2.keys()) == sorted(set(range(20)) - {3})
    for i, ref in refs.items():
        got = be2.get_blocking(key(i))
        if i == 3:
            assert got is None
            continue
        assert same_bytes(got.tensor, ref)
        got.ref_count_down()
    be2.close()


def test_eviction_at_capacity_is_lru_and_bounded(tmp_path):
    be, alloc = make(tmp_path, disk_mib=4)
    cap = be.capacity_bytes
    n = cap // MiB + 6
    for i in range(n):
        o = put_obj(alloc, (MiB,), torch.uint8)
        be.submit_put_task(key(i), o).result()
        o.ref_count_down()
        if i >= 1:  # keep chunk 0 hot: chunk 1 becomes the LRU one
            be.get_blocking(key(0)).ref_count_down()
        assert be.used_bytes <= cap
    assert be.contains(key(n - 1)) and be.contains(key(0)) and not be.contains(key(1))
    assert be.stats["evictions"] >= 6
    assert be.disk_usage() <= 4 * MiB
    be.memcheck()
    be.close()


def test_dedup_and_put_tasks(tmp_path):
    be, alloc = make(tmp_path)
    o = put_obj(alloc, (3 * MiB,), torch.uint8)
    f1 = be.submit_put_task(key(1), o)
    again = be.submit_put_task(key(1), o)
    assert again is None
    f1.result()
    assert not be.exists_in_put_tasks(key(1)) and be.contains(key(1))
    assert be.submit_put_task(key(1), o) is None
    o.ref_count_down()
    assert be.stats["puts"] == 1
    be.close()


def test_prefetch_and_absent_keys(tmp_path):
    be, alloc = make(tmp_path)
    assert be.submit_prefetch_task(key(9)) is None
    assert be.get_blocking(key(9)) is None
    o = put_obj(alloc, (100, 7), torch.float32)
    ref = o.tensor.clone()
    be.submit_put_task(key(1), o).result()
    o.ref_count_down()
    fut = be.submit_prefetch_task(key(1))
    got = fut.result()
    assert same_bytes(got.tensor, ref)
    got.ref_count_down()
    be.close()


def test_load_bytes_checks_shape_and_dtype(tmp_path):
    be, alloc = make(tmp_path)
    o = put_obj(alloc, (4, 8, 16), torch.float16)
    ref = o.tensor.clone()
    be.insert_key(key(5), o)
    o.ref_count_down()
    name = key(5).to_string()
    got = be.load_bytes_from_disk(name, torch.float16, (32, 16))
    assert same_bytes(got.tensor, ref.reshape(32, 16))
    got.ref_count_down()
    with pytest.raises(ShapeMismatchError):
        be.load_bytes_from_disk(name, torch.float16, (4, 8, 17))
    with pytest.raises(ShapeMismatchError):
        be.load_disk(os.path.join(be.path, name), "bytes", torch.bfloat16, (4, 8, 16))
    assert be.load_disk(key(6).to_string(), "bytes", torch.float16, (1,)) is None

    async def go():
        return await be.async_load_bytes_from_disk(name, torch.float16, (4, 8, 16))

    got = asyncio.run(go())
    assert same_bytes(got.tensor, ref)
    got.ref_count_down()
    alloc.memcheck()
    be.close()


def test_async_save_fire_and_forget(tmp_path):
    be, alloc = make(tmp_path)
    o = put_obj(alloc, (PAGE * 3,), torch.uint8)
    be.async_save_bytes_to_disk(key(2), o)
    o.ref_count_down()
    be.wait_for_puts(10)
    assert be.contains(key(2))
    be.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero_pool", "delete_index_line", "garble_index"])
def test_damage_behind_our_back_is_a_miss_with_warning(tmp_path, caplog, damage):
    be, alloc = make(tmp_path)
    refs = {}
    for i in range(4):
        o = put_obj(alloc, (2, 2, 40, 77), torch.bfloat16)
        refs[i] = o.tensor.clone()
        be.submit_put_task(key(i), o).result()
        o.ref_count_down()
    e1 = be.entry(key(1))
    pool, local = be.locate(e1.offset)
    be.close()
    index_files = [tmp_path / "disk" / "kvcache.index.snap", tmp_path / "disk" / "kvcache.index.log"]
    if damage == "flip":
        with open(pool, "r+b") as f:
            f.seek(local + 1000)
            b = f.read(1)
            f.seek(local + 1000)
            f.write(bytes([b[0] ^ 0x10]))
    elif damage == "truncate":
        os.truncate(pool, local + 100)
    elif damage == "zero_pool":
        with open(pool, "r+b") as f:
            f.seek(local)
            f.write(bytes(e1.phys_size))
    else:
        # Put records are fixed-size slots tagged b"P", in put order (snapshot, then log):
        # key(1)'s is the second.
        puts = [(f, i) for f in index_files if f.exists()
                for i in range(SLOT, f.stat().st_size, SLOT) if f.read_bytes()[i] == ord("P")]
        index, at = puts[1]
        data = bytearray(index.read_bytes())
        if damage == "delete_index_line":
            del data[at:at + SLOT]
        else:
            data[at + 20] ^= 0x01
        index.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    be2, alloc2 = make(tmp_path)
    got = be2.get_blocking(key(1))
    assert got is None
    assert not be2.contains(key(1))
    if damage in ("flip", "zero_pool"):
        assert any("dropping chunk" in r.message for r in caplog.records)
    for i in (0, 2, 3):
        if damage == "truncate" and be2.entry(key(i)) is None:
            continue
        g = be2.get_blocking(key(i))
        if damage == "truncate" and g is None:
            continue  # lies past the cut: a miss, never wrong bytes
        assert g is not None and same_bytes(g.tensor, refs[i])
        g.ref_count_down()
    be2.memcheck()
    be2.close()


def test_reader_keeps_chunk_alive_during_eviction(tmp_path):
    be, alloc = make(tmp_path, disk_mib=3)
    o = put_obj(alloc, (MiB,), torch.uint8)
    ref = o.tensor.clone()
    be.submit_put_task(key(0), o).result()
    o.ref_count_down()
    e, = be.index.begin_read([key(0)])  # a read in progress
    for i in range(1, 8):
        o = put_obj(alloc, (MiB,), torch.uint8)
        f = be.submit_put_task(key(i), o)
        try:
            f.result()
        except StorageFullError:
            pass
        o.ref_count_down()
    assert be.contains(key(0)), "a chunk being read was evicted"
    be.index.end_read([e])
    got = be.get_blocking(key(0))
    assert same_bytes(got.tensor, ref)
    got.ref_count_down()
    be.memcheck()
    be.close()


def test_bad_directories(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(os.urandom(10))
    with pytest.raises(StorageUnavailableError, match="not a directory|cannot be created"):
        make_dir(f)
    with pytest.raises(StorageUnavailableError, match="cannot be created"):
        make_dir(f / "sub")


def test_unwritable_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        pytest.skip("root can write a read-only directory")
    with pytest.raises(StorageUnavailableError, match="not writable"):
        make_dir(ro)


def make_dir(path):
    cfg = CacheEngineConfig(local_disk=str(path), max_local_disk_size=0.01, io_engine="posix")
    return LocalDiskBackend(cfg, None, SlabMemoryAllocator(MiB, "host"))


def test_second_process_on_directory_is_refused(tmp_path):
    import subprocess
    import sys

    be, alloc = make(tmp_path)
    code = ("import sys; from gds_kvcache import *; from gds_kvcache.units import GB, MiB\n"
            f"cfg = CacheEngineConfig(local_disk={str(tmp_path / 'disk')!r}, max_local_disk_size=64*MiB/GB, "
            "io_engine='posix')\n"
            "try:\n    LocalDiskBackend(cfg, None, SlabMemoryAllocator(MiB, 'host'))\n"
            "except DirectoryLockedError as e:\n    print('REFUSED', e); sys.exit(0)\nsys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "REFUSED" in r.stdout and "its own directory" in r.stdout
    be.close()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3  # free again once closed


def test_threads_put_and_get_at_once(tmp_path):
    be, alloc = make(tmp_path, disk_mib=256, slab_mib=128)
    errors = []
    refs = {}
    lock = threading.Lock()

    def worker(t):
        try:
            for j in range(15):
                i = t * 100 + j
                o = put_obj(alloc, (2, 2, 50, 33 + t), torch.bfloat16)
                with lock:
                    refs[i] = o.tensor.clone()
                be.submit_put_task(key(i), o).result()
                o.ref_count_down()
                for back in (i, t * 100 + j // 2):
                    g = be.get_blocking(key(back))
                    if g is None or not same_bytes(g.tensor, refs[back]):
                        errors.append(("wrong", back))
                    if g is not None:
                        g.ref_count_down()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    run_threads(worker, 6)
    assert not errors
    be.memcheck()
    be.close()
    alloc.memcheck()
    assert alloc.used == 0


def test_recovery_gives_overlapping_extents_to_the_newer_chunk(tmp_path):
    """A lost delete record leaves two index entries on one extent: only the newer may own it."""
    from gds_kvcache.storage.entry import DiskEntry
    from gds_kvcache.storage.index_log import IndexLog

    be, alloc = make(tmp_path)
    o = put_obj(alloc, (3, PAGE), torch.uint8)
    ref = o.tensor.clone()
    be.insert_key(key(1), o)
    o.ref_count_down()
    e = be.entry(key(1))
    be.close()
    # Forge a newer entry for key 2 claiming the same bytes (key 1's delete record lost), with
    # its checksum bound to key 2 as a put of those bytes under key 2 would have recorded it.
    from gds_kvcache.kernels.checksum import checksum_host
    from gds_kvcache.storage.entry import keyed_checksum
    csum = keyed_checksum(checksum_host(ref.numpy().tobytes()), key(2))
    log_ = IndexLog(str(tmp_path / "disk"))
    log_.load()
    log_.append(puts=[DiskEntry(key(2), e.offset, e.nbytes, e.phys_size, e.shape, e.dtype, e.fmt, csum)])
    log_.close()
    be, alloc = make(tmp_path)
    assert be.contains(key(2)) and not be.contains(key(1))
    g = be.get_blocking(key(2))
    assert same_bytes(g.tensor, ref)
    g.ref_count_down()
    be.memcheck()
    be.close()
