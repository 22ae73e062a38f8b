import logging
import os

import torch
from hypothesis import given, settings, strategies as st

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.storage.pool_file import UNIT, pieces, pool_layout
from gds_kvcache.units import GB, MiB, PAGE

from .helpers import random_tensor, same_bytes


@settings(max_examples=300, deadline=None)
@given(files=st.integers(1, 9), unit_pages=st.integers(1, 8), rows=st.integers(1, 6), data=st.data())
def test_pieces_cover_the_range_and_never_collide(files, unit_pages, rows, data):
    unit = unit_pages * PAGE
    cap = files * rows * unit
    off = data.draw(st.integers(0, cap - 1))
    n = data.draw(st.integers(1, cap - off))
    pos = 0
    for f, local, delta, k in pieces(off, n, files, unit):
        assert delta == pos and k > 0 and 0 <= f < files
        assert 0 <= local and local // unit == (local + k - 1) // unit < rows
        pos += k
    assert pos == n
    # The whole pool maps one-to-one onto the files' bytes.
    covered = {f: 0 for f in range(files)}
    for f, local, _, k in sorted(pieces(0, cap, files, unit), key=lambda p: (p[0], p[1])):
        assert local == covered[f], "gap or overlap in a file"
        covered[f] += k
    assert all(v == rows * unit for v in covered.values())


def test_layout():
    from gds_kvcache.storage.pool_file import index_reserve

    for cap in (MiB, 8 * MiB, 48 * MiB, 300 * MiB, 2 * GB, 10 * GB, 200 * GB):
        files, size, unit = pool_layout(cap, 8)
        pool = cap - index_reserve(cap)
        assert files == min(8, max(1, pool // UNIT)), "every pool of 8 units or more uses every file"
        assert unit == UNIT and size % PAGE == 0 and (files == 1 or size >= UNIT)
        assert pool - 8 * PAGE <= files * size <= pool, "rounding lost space"


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


def test_changed_budget_keeps_every_chunk_still_inside_the_files(tmp_path, caplog):
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)
    refs = _store(be, alloc, 200, MiB)
    offs = {i: be.entry(CacheEngineKey("s", "m", 1, 0, i + 1)).offset for i in refs}
    be.close()
    be = LocalDiskBackend(cfg(tmp_path, 600), None, alloc)  # larger: nothing moves, nothing is lost
    assert len(be.keys()) == len(refs)
    be.close()
    with caplog.at_level(logging.WARNING):
        be = LocalDiskBackend(cfg(tmp_path, 150), None, alloc)  # smaller: chunks past the files' new end go
    assert any("layout" in r.message for r in caplog.records)
    size = os.path.getsize(be.pool_paths[0])
    kept = 0
    for i, ref in refs.items():
        inside = all(local + k <= size for _, local, _, k in pieces(offs[i], MiB, 8, UNIT))
        g = be.get_blocking(CacheEngineKey("s", "m", 1, 0, i + 1))
        assert (g is not None) == inside, f"chunk {i} at {offs[i]}"
        if g is not None:
            kept += 1
            assert same_bytes(g.tensor, ref)
            g.ref_count_down()
    assert 0 < kept < len(refs), kept
    be.memcheck()
    be.close()
    be = LocalDiskBackend(cfg(tmp_path, 300), None, alloc)  # and larger again: the kept ones are still there
    assert len(be.keys()) == kept
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
