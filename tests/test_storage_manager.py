import threading
from collections import OrderedDict

import pytest
import torch

from gds_kvcache import (CacheEngineConfig, CacheEngineKey, CreateStorageBackends, LocalCPUBackend,
                         LocalDiskBackend, LookupServerInterface, SlabMemoryAllocator, StorageManager)
from gds_kvcache.units import GB, MiB

from .helpers import random_tensor, run_threads, same_bytes


def key(i):
    return CacheEngineKey("vllm", "m", 1, 0, i)


class RecordingLookup(LookupServerInterface):
    def __init__(self):
        self.keys = set()

    def insert(self, key):
        self.keys.add(key)

    def remove(self, key):
        self.keys.discard(key)

    def lookup(self, key):
        return key in self.keys


def cfg(tmp_path, **kw):
    base = dict(local_disk=str(tmp_path / "d"), max_local_disk_size=64 * MiB / GB, max_local_cpu_size=8 * MiB / GB,
                slab_size=16 * MiB / GB, memory_device="host", io_threads=4, io_task_size=256 * 1024)
    base.update(kw)
    return CacheEngineConfig(**base)


def fill(sm, shape=(MiB // 2,), dtype=torch.uint8):
    o = sm.allocate(shape, dtype)
    o.tensor.copy_(random_tensor(shape, dtype))
    return o, o.tensor.clone()


def test_create_backends_order_and_types(tmp_path):
    alloc = SlabMemoryAllocator(MiB, "host")
    bs = CreateStorageBackends(cfg(tmp_path), None, None, alloc, "cpu", None)
    assert isinstance(bs, OrderedDict) and list(bs) == ["Hot", "LocalDiskBackend"]
    assert isinstance(bs["Hot"], LocalCPUBackend) and isinstance(bs["LocalDiskBackend"], LocalDiskBackend)
    for b in bs.values():
        b.close()
    assert list(CreateStorageBackends(cfg(tmp_path, local_cpu=False), None, None, alloc)) == ["LocalDiskBackend"]


def test_put_get_hot_then_disk(tmp_path, engine_name):
    lk = RecordingLookup()
    with StorageManager(cfg(tmp_path, io_engine=engine_name), lookup_server=lk) as sm:
        refs = {}
        futs = []
        for i in range(40):  # 20 MiB through an 8 MiB hot tier and a 16 MiB slab
            o, refs[i] = fill(sm)
            futs.append(sm.put(key(i), o))
        for f in futs:
            f.result()
        assert sm.contains(key(39), ["Hot"]) and not sm.contains(key(0), ["Hot"])
        assert sm.contains(key(0), ["LocalDiskBackend"]) and sm.contains(key(0))
        assert not sm.contains(key(0), ["Hot"])
        assert sm.put(key(5), fill(sm)[0]) is None  # dedup: stored already
        for i in (0, 39, 7):
            g = sm.get(key(i))
            assert same_bytes(g.tensor, refs[i])
            g.ref_count_down()
        assert sm.contains(key(0), ["Hot"])  # the disk hit filled the hot tier
        assert sm.get(key(1000)) is None
        assert lk.lookup(key(3))
        sm.memcheck()
    assert sm.allocator.used == 0


def test_allocate_evicts_unused_hot_entries_only(tmp_path):
    with StorageManager(cfg(tmp_path, max_local_cpu_size=16 * MiB / GB)) as sm:
        o, ref = fill(sm, (4 * MiB,))
        sm.put(key(1), o).result()
        pinned = sm.get(key(1))  # a user holds it: must survive
        for i in range(2, 8):
            o2, _ = fill(sm, (4 * MiB,))
            sm.put(key(i), o2).result()
        assert same_bytes(pinned.tensor, ref)
        assert sm.allocate((17 * MiB,), torch.uint8) is None
        mine = []
        while (o := sm.allocate((4 * MiB,), torch.uint8, eviction=False)) is not None:
            mine.append(o)
        hot_before = len(sm.hot)
        assert hot_before >= 2  # the pinned chunk and at least one unused one
        o = sm.allocate((4 * MiB,), torch.uint8, eviction=True)
        assert o is not None and len(sm.hot) < hot_before
        assert sm.contains(key(1), ["Hot"]) and same_bytes(pinned.tensor, ref)
        for x in mine + [o]:
            x.ref_count_down()
        pinned.ref_count_down()


def test_prefetch_moves_into_hot(tmp_path):
    with StorageManager(cfg(tmp_path)) as sm:
        o, ref = fill(sm)
        sm.put(key(1), o).result()
        sm.hot.remove(key(1))
        assert not sm.contains(key(1), ["Hot"])
        sm.prefetch(key(1))
        sm.prefetch(key(99))  # absent: nothing happens
        g = sm.get(key(1))
        assert same_bytes(g.tensor, ref) and sm.contains(key(1), ["Hot"])
        g.ref_count_down()


def test_close_drains_pending_writes(tmp_path):
    sm = StorageManager(cfg(tmp_path, local_cpu=False))
    refs = {}
    for i in range(12):
        o, refs[i] = fill(sm)
        sm.put(key(i), o)
    sm.close()
    with StorageManager(cfg(tmp_path, local_cpu=False)) as sm2:
        for i, ref in refs.items():
            g = sm2.get(key(i))
            assert same_bytes(g.tensor, ref)
            g.ref_count_down()


def test_many_threads_share_a_manager(tmp_path):
    with StorageManager(cfg(tmp_path, slab_size=32 * MiB / GB)) as sm:
        errors = []
        refs = {}
        lock = threading.Lock()

        def worker(t):
            for j in range(20):
                i = t * 1000 + j
                o = None
                while o is None:
                    o = sm.allocate((1000 + t, 37), torch.float32)
                o.tensor.copy_(random_tensor(o.shape, torch.float32))
                with lock:
                    refs[i] = o.tensor.clone()
                f = sm.put(key(i), o)
                if f is not None:
                    f.result()
                for back in (i, t * 1000 + j // 3):
                    g = sm.get(key(back))
                    if g is None or not same_bytes(g.tensor, refs[back]):
                        errors.append(back)
                    if g is not None:
                        g.ref_count_down()

        ts = run_threads(worker, 6, 180)
        assert not any(t.is_alive() for t in ts), "deadlock"
        assert errors == []
        sm.memcheck()


def test_no_disk_tier(tmp_path):
    with StorageManager(cfg(tmp_path, local_disk=None)) as sm:
        assert sm.io_report() is None and sm.disk is None
        o, ref = fill(sm)
        assert sm.put(key(1), o) is None
        g = sm.get(key(1))
        assert same_bytes(g.tensor, ref)
        g.ref_count_down()


def test_io_report_names_the_path(tmp_path):
    with StorageManager(cfg(tmp_path, io_engine="posix")) as sm:
        r = sm.io_report()
        assert (r.engine, r.path) == ("posix", "posix") and "path=posix" in r.line()


@pytest.mark.parametrize("bad", [dict(io_engine="kvikio")])
def test_kvikio_requested_without_driver(tmp_path, monkeypatch, bad):
    import gds_kvcache.io.select as sel
    from gds_kvcache import IOEngineError

    monkeypatch.setattr(sel, "kvikio_error", lambda: "libcuda.so.1 not loadable (test)")
    with pytest.raises(IOEngineError, match="libcuda"):
        StorageManager(cfg(tmp_path, **bad))
    # The directory lock was released: a correct manager can open it.
    StorageManager(cfg(tmp_path, io_engine="posix")).close()
