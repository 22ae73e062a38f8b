import logging
import os

import torch
from hypothesis import given, settings, strategies as st

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.storage.pool_file import UNIT, pieces, pool_layout
from gds_kvcache.units import GB, MiB, PAGE

from .helpers import random_tensor, same_bytes


@settings(max_examples=300, deadline=None)
@given(files=st.integers(1, 9), unit_pages=st.integers(1, 8), units_per_file=st.integers(1, 6), data=st.data())
def test_pieces_cover_the_range_and_never_collide(files, unit_pages, units_per_file, data):
    unit = unit_pages * PAGE
    cap = files * units_per_file * unit
    off = data.draw(st.integers(0, cap - 1))
    n = data.draw(st.integers(1, cap - off))
    ps = pieces(off, n, files, units_per_file * unit, unit)
    pos = 0
    for f, local, delta, size in ps:
        assert delta == pos and size > 0 and 0 <= f < files
        assert 0 <= local and local + size <= units_per_file * unit
        assert local // unit == (local + size - 1) // unit, "a piece crosses a unit"
        pos += size
    assert pos == n
    # The whole pool maps one-to-one onto the files' bytes.
    seen = set()
    for f, local, _, size in pieces(0, cap, files, units_per_file * unit, unit):
        assert size == unit and (f, local) not in seen
        seen.add((f, local))


def test_layout():
    assert pool_layout(8 * MiB, 8)[0] == 1
    files, size, unit = pool_layout(64 * MiB, 8)
    assert files == 8 and unit == UNIT and size == UNIT  # every budget of 8+ units uses every file
    files, size, unit = pool_layout(10 * GB, 8)
    assert files == 8 and size % unit == 0 and files * size <= 10 * GB
    files, size, unit = pool_layout(MiB, 8)
    assert files == 1 and size == unit and size % PAGE == 0


def cfg(d, cap_mib, files=8):
    return CacheEngineConfig(local_disk=str(d), max_local_disk_size=cap_mib * MiB / GB, io_engine="posix",
                             io_threads=4, pool_files=files)


def test_chunks_interleave_over_files_and_survive_restart(tmp_path, engine_name):
    c = cfg(tmp_path, 300, files=4).replace(io_engine=engine_name)
    alloc = SlabMemoryAllocator(64 * MiB, "host")
    be = LocalDiskBackend(c, None, alloc)
    assert len(be.pool_paths) == 4
    refs = {}
    for i in range(3):
        o = alloc.allocate((16 * MiB + 123,), torch.uint8)  # spans 5 units: every file
        o.tensor.copy_(random_tensor(o.shape, torch.uint8))
        refs[i] = o.tensor.clone()
        be.submit_put_task(CacheEngineKey("s", "m", 1, 0, i + 1), o).result()
        o.ref_count_down()
    used = [os.stat(p).st_blocks * 512 for p in be.pool_paths]
    assert all(u >= UNIT for u in used), f"every file should hold part of the chunks: {used}"
    be.close()
    be = LocalDiskBackend(c, None, alloc)
    for i, ref in refs.items():
        g = be.get_blocking(CacheEngineKey("s", "m", 1, 0, i + 1))
        assert same_bytes(g.tensor, ref)
        g.ref_count_down()
    be.close()


def _store(be, alloc, n, size):
    refs = {}
    for i in range(n):
        o = alloc.allocate((size,), torch.uint8)
        o.tensor.copy_(random_tensor(o.shape, torch.uint8))
        refs[i] = o.tensor.clone()
        be.submit_put_task(CacheEngineKey("s", "m", 1, 0, i + 1), o).result()
        o.ref_count_down()
    return refs


def test_changed_budget_keeps_the_chunks_that_fit(tmp_path, caplog):
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)
    refs = _store(be, alloc, 40, MiB)
    ends = {i: be.entry(CacheEngineKey("s", "m", 1, 0, i + 1)).offset + MiB for i in refs}
    be.close()
    with caplog.at_level(logging.WARNING):
        be = LocalDiskBackend(cfg(tmp_path, 60), None, alloc)  # smaller: some chunks lie past the new pool
    assert any("layout" in r.message for r in caplog.records)
    assert len(be.pool_paths) == 8
    kept = 0
    for i, ref in refs.items():
        g = be.get_blocking(CacheEngineKey("s", "m", 1, 0, i + 1))
        assert (g is not None) == (ends[i] <= be.capacity_bytes), f"chunk {i} ending at {ends[i]}"
        if g is not None:
            kept += 1
            assert same_bytes(g.tensor, ref)
            g.ref_count_down()
    assert 0 < kept < len(refs)
    be.close()
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)  # and larger again: the kept ones are still there
    assert len(be.keys()) == kept
    be.close()


def test_a_budget_too_small_for_the_directory_files_is_refused_naming_both(tmp_path):
    from gds_kvcache.errors import LayoutChangedError
    import pytest

    alloc = SlabMemoryAllocator(8 * MiB, "host")
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)
    _store(be, alloc, 2, MiB)
    be.close()
    with pytest.raises(LayoutChangedError, match="8 pool files.*max_local_disk_size"):
        LocalDiskBackend(cfg(tmp_path, 20), None, alloc)
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)  # untouched by the refusal
    assert len(be.keys()) == 2
    be.close()


def test_other_pool_files_keeps_the_directory_layout(tmp_path, caplog):
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)
    refs = _store(be, alloc, 6, MiB)
    be.close()
    with caplog.at_level(logging.WARNING):
        be = LocalDiskBackend(cfg(tmp_path, 300, files=2), None, alloc)
    assert any("pool_files=2" in r.message for r in caplog.records)
    assert len(be.pool_paths) == 8
    for i, ref in refs.items():
        g = be.get_blocking(CacheEngineKey("s", "m", 1, 0, i + 1))
        assert g is not None and same_bytes(g.tensor, ref)
        g.ref_count_down()
    be.close()


def test_deleted_layout_file_is_inferred_from_the_pool_files(tmp_path):
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)
    refs = _store(be, alloc, 6, MiB)
    be.close()
    os.unlink(tmp_path / "kvcache.layout")
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)
    for i, ref in refs.items():
        g = be.get_blocking(CacheEngineKey("s", "m", 1, 0, i + 1))
        assert g is not None and same_bytes(g.tensor, ref)
        g.ref_count_down()
    be.close()


def test_preallocate_reserves_the_pool(tmp_path):
    be = LocalDiskBackend(cfg(tmp_path, 8).replace(preallocate=True), None, SlabMemoryAllocator(MiB, "host"))
    used = sum(os.stat(p).st_blocks * 512 for p in be.pool_paths)
    assert used >= be.capacity_bytes
    be.close()
