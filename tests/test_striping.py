import logging

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.storage.pool_file import pool_layout
from gds_kvcache.storage.striped_space import StripedSpace
from gds_kvcache.units import GB, MiB, PAGE

from .helpers import random_tensor, same_bytes


class StripedMachine(RuleBasedStateMachine):
    @initialize(stripes=st.integers(1, 5), pages=st.integers(1, 64))
    def setup(self, stripes, pages):
        self.s = StripedSpace(stripes, pages * PAGE)
        self.live = {}

    @rule(n=st.integers(1, 70 * PAGE))
    def allocate(self, n):
        off = self.s.allocate(n)
        if off is None:
            assert self.s.largest_free() < n
            return
        size = self.s.allocated_size(off)
        assert off // self.s.stripe_bytes == (off + size - 1) // self.s.stripe_bytes, "extent crosses a stripe"
        self.live[off] = size

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 10**6))
    def free(self, i):
        off = sorted(self.live)[i % len(self.live)]
        assert self.s.free_extent(off) == self.live.pop(off)

    @invariant()
    def ok(self):
        if hasattr(self, "s"):
            self.s.memcheck()
            assert self.s.used == sum(self.live.values()) and self.s.extents() == self.live


TestStriped = StripedMachine.TestCase
TestStriped.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


def test_layout():
    assert pool_layout(64 * MiB, 8)[0] == 1
    assert pool_layout(300 * MiB, 8)[0] == 4  # stripes of at least 64 MiB
    assert pool_layout(1900 * MiB, 8)[0] == 8
    stripes, size = pool_layout(10 * GB, 8)
    assert stripes == 8 and size % PAGE == 0 and stripes * size <= 10 * GB


def cfg(d, cap_mib, files=8):
    return CacheEngineConfig(local_disk=str(d), max_local_disk_size=cap_mib * MiB / GB, io_engine="posix",
                             io_threads=4, pool_files=files)


def test_chunks_spread_over_files_and_survive_restart(tmp_path, engine_name):
    c = cfg(tmp_path, 4300, files=4).replace(io_engine=engine_name)  # sparse: 4 stripes of ~1 GiB
    alloc = SlabMemoryAllocator(64 * MiB, "host")
    be = LocalDiskBackend(c, None, alloc)
    assert len(be.pool_paths) == 4
    refs = {}
    for i in range(12):
        o = alloc.allocate((3 * MiB + 123,), torch.uint8)
        o.tensor.copy_(random_tensor(o.shape, torch.uint8))
        refs[i] = o.tensor.clone()
        be.submit_put_task(CacheEngineKey("s", "m", 1, 0, i + 1), o).result()
        o.ref_count_down()
    files = {be.locate(be.entry(CacheEngineKey("s", "m", 1, 0, i + 1)).offset)[0] for i in range(12)}
    assert len(files) == 4, "consecutive chunks should go to different files"
    be.close()
    be = LocalDiskBackend(c, None, alloc)
    for i, ref in refs.items():
        g = be.get_blocking(CacheEngineKey("s", "m", 1, 0, i + 1))
        assert same_bytes(g.tensor, ref)
        g.ref_count_down()
    be.close()


def test_changed_layout_keeps_the_chunks_that_fit(tmp_path, caplog):
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    be = LocalDiskBackend(cfg(tmp_path, 4300), None, alloc)
    refs = {}
    for i in range(8):  # one per stripe file (round robin)
        o = alloc.allocate((MiB,), torch.uint8)
        o.tensor.copy_(random_tensor(o.shape, torch.uint8))
        refs[i] = o.tensor.clone()
        be.submit_put_task(CacheEngineKey("s", "m", 1, 0, i + 1), o).result()
        o.ref_count_down()
    files = {i: be.locate(be.entry(CacheEngineKey("s", "m", 1, 0, i + 1)).offset)[0] for i in range(8)}
    be.close()
    with caplog.at_level(logging.WARNING):
        be = LocalDiskBackend(cfg(tmp_path, 4300, files=2), None, alloc)
    assert any("layout" in r.message for r in caplog.records)
    assert len(be.pool_paths) == 2
    assert sorted(p.name for p in tmp_path.glob("kvcache.pool.*")) == ["kvcache.pool.0", "kvcache.pool.1"]
    for i, ref in refs.items():
        g = be.get_blocking(CacheEngineKey("s", "m", 1, 0, i + 1))
        kept = files[i].endswith((".pool.0", ".pool.1"))
        assert (g is not None) == kept, f"chunk {i} in {files[i]}"
        if g is not None:
            assert same_bytes(g.tensor, ref)
            g.ref_count_down()
    be.close()


def test_preallocate_reserves_the_pool(tmp_path):
    import os

    be = LocalDiskBackend(cfg(tmp_path, 8).replace(preallocate=True), None, SlabMemoryAllocator(MiB, "host"))
    used = sum(os.stat(p).st_blocks * 512 for p in be.pool_paths)
    assert used >= be.capacity_bytes
    be.close()
