"""Checksums hashed piece by piece by the I/O threads: bit-identical to checksum_host, whatever the pieces."""

import numpy as np
import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.io import PosixEngine, Span
from gds_kvcache.kernels import checksum_host
from gds_kvcache.kernels.checksum_pieces import checksum_finish, word_sum
from gds_kvcache.storage.piece_sums import PieceSums, words_of
from gds_kvcache.units import GB, KiB, MiB, PAGE

from .helpers import random_tensor, same_bytes


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4095, 4096, 100_003, MiB + 5])
def test_word_sums_in_any_pieces_and_order_equal_checksum_host(rng, n):
    b = rng.integers(0, 256, n, dtype=np.uint8)
    nw = n // 8
    words = b[: nw * 8].view(np.uint64)
    cuts = sorted({0, nw, *(int(x) for x in rng.integers(0, nw + 1, 6))})
    parts = [word_sum(words[a:c], a) for a, c in zip(cuts, cuts[1:])]
    rng.shuffle(parts)
    assert checksum_finish(sum(parts), b) == checksum_host(b)
    # One wrong word in one piece changes the result.
    if nw:
        bad = words.copy()
        bad[int(rng.integers(0, nw))] ^= np.uint64(1) << np.uint64(int(rng.integers(0, 64)))
        assert checksum_finish(sum(word_sum(bad[a:c], a) for a, c in zip(cuts, cuts[1:])), b) != checksum_host(b)


def _objs(alloc, sizes):
    return [alloc.allocate((n,), torch.uint8) for n in sizes]


def test_piece_sums_cover_objects_across_piece_edges(rng):
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    try:
        objs = _objs(alloc, [MiB + 3, 5, 3 * MiB, 4096, 777_777])
        buf = alloc.buffer.host_array()
        buf[:] = rng.integers(0, 256, buf.shape[0], dtype=np.uint8)
        want = [checksum_host(buf[o.offset:o.offset + o.nbytes]) for o in objs]
        ps = PieceSums(buf, words_of(buf), objs)
        end = max(o.offset + o.phys_size for o in objs)
        edges = sorted({0, end, *(int(x) * 8 for x in rng.integers(0, end // 8, 9))})
        pieces = list(zip(edges, edges[1:]))
        rng.shuffle(pieces)          # threads finish pieces in any order
        for lo, hi in pieces:
            ps(lo, hi - lo)
        assert ps.complete == len(objs)
        assert ps.result() == want
        assert ps.result([3, 0]) == [want[3], want[0]]
    finally:
        alloc.close()


def test_a_missing_or_repeated_piece_falls_back_to_a_full_checksum(rng):
    alloc = SlabMemoryAllocator(4 * MiB, "host")
    try:
        objs = _objs(alloc, [MiB, MiB])
        buf = alloc.buffer.host_array()
        buf[:] = rng.integers(0, 256, buf.shape[0], dtype=np.uint8)
        want = [checksum_host(buf[o.offset:o.offset + o.nbytes]) for o in objs]
        ps = PieceSums(buf, words_of(buf), objs)
        a, b = objs
        ps(a.offset, MiB // 2)                 # the second half of a never comes
        ps(b.offset, MiB)
        ps(b.offset, 64 * KiB)                 # a piece of b twice
        assert ps.complete == 0
        assert ps.result() == want
    finally:
        alloc.close()


def test_posix_engine_calls_the_hook_once_per_piece_after_reads_and_before_writes(tmp_path, rng):
    paths = []
    for i in range(2):
        p = tmp_path / f"pool.{i}"
        with open(p, "wb") as f:
            f.truncate(2 * MiB)
        paths.append(str(p))
    alloc = SlabMemoryAllocator(4 * MiB, "host")
    eng = PosixEngine(paths, 4, 64 * KiB, True, "host", 2 * MiB)
    try:
        buf = alloc.buffer.host_array()
        buf[:] = rng.integers(0, 256, buf.shape[0], dtype=np.uint8)
        eng.attach(alloc.buffer)
        spans = [Span(0, 0, 300 * KiB), Span(512 * KiB, 2 * MiB + PAGE, 5 * PAGE)]
        seen = []

        def on_write(mo, n):
            # Before the write: the file does not hold these bytes yet.
            seen.append(("w", mo, n))

        assert eng.write_spans(spans, hook=on_write) == [None, None]
        got = []

        def on_read(mo, n):
            # After the read: the slab holds the file's bytes for this piece.
            fi, local = (0, mo) if mo < 512 * KiB else (1, PAGE + mo - 512 * KiB)
            with open(paths[fi], "rb") as f:
                f.seek(local)
                assert f.read(n) == bytes(buf[mo:mo + n])
            got.append(("r", mo, n))

        buf[:] = 0
        assert eng.read_spans(spans, hook=on_read) == [None, None]
        covered = sorted((mo, n) for _, mo, n in got)
        assert covered == sorted((mo, n) for _, mo, n in seen)
        assert sum(n for _, n in covered) == 300 * KiB + 5 * PAGE
        assert len(covered) == 5 + 1        # 300 KiB in 64 KiB tasks, and one small span
    finally:
        eng.close()
        alloc.close()


def _put_random(be, alloc, n: int, shape: tuple):
    """``n`` random bf16 chunks of ``shape`` stored through ``be`` in one batch: (keys, their data)."""
    keys = [CacheEngineKey("vllm", "m", 1, 0, i + 1) for i in range(n)]
    data = [random_tensor(shape, torch.bfloat16) for _ in keys]
    objs = []
    for d in data:
        o = alloc.allocate(d.shape, d.dtype)
        o.tensor.copy_(d)
        objs.append(o)
    for f in be.batched_submit_put_task(keys, objs):
        f.result()
    for o in objs:
        o.ref_count_down()
    return keys, data


def test_backend_reads_detect_a_flipped_bit_with_piece_checksums(tmp_path, monkeypatch):
    import gds_kvcache.storage.transfer as transfer

    def no_batch_checksum(*a, **k):
        raise AssertionError("a host slab on the posix engine is hashed piece by piece")

    monkeypatch.setattr(transfer, "checksum_batch", no_batch_checksum)
    cfg = CacheEngineConfig(local_disk=str(tmp_path / "d"), max_local_disk_size=64 * MiB / GB, io_engine="posix",
                            io_threads=4, io_task_size=64 * KiB, memory_device="host")
    alloc = SlabMemoryAllocator(16 * MiB, "host")
    be = LocalDiskBackend(cfg, None, alloc)
    try:
        keys, data = _put_random(be, alloc, 3, (2, 4, 64, 1024))   # 1 MiB chunks
        assert be.stats["checksum_calls"] == 1
        got = be.batched_get_blocking(keys)
        assert all(same_bytes(g.tensor, d) for g, d in zip(got, data))
        for g in got:
            g.ref_count_down()
        # Flip one bit of chunk 1 on disk, in its third 64 KiB piece.
        path, local = be.locate(be.entry(keys[1]).offset + 150_000)
        with open(path, "r+b") as fh:
            fh.seek(local)
            v = fh.read(1)[0]
            fh.seek(local)
            fh.write(bytes([v ^ 0x10]))
        got = be.batched_get_blocking(keys)
        assert got[1] is None and be.stats["corrupt"] == 1
        assert same_bytes(got[0].tensor, data[0]) and same_bytes(got[2].tensor, data[2])
        for g in (got[0], got[2]):
            g.ref_count_down()
    finally:
        be.close()
        alloc.close()


def test_small_chunks_take_one_checksum_launch_a_batch(tmp_path, monkeypatch):
    # Below PIECE_SUM_MIN_BYTES a chunk's own hashing costs more than its share of one launch.
    import gds_kvcache.storage.piece_sums as piece_sums

    def no_pieces(*a, **k):
        raise AssertionError("64 KiB chunks are hashed in one launch a batch, not piece by piece")

    monkeypatch.setattr(piece_sums.PieceSums, "__call__", no_pieces)
    cfg = CacheEngineConfig(local_disk=str(tmp_path / "d"), max_local_disk_size=64 * MiB / GB, io_engine="posix",
                            io_threads=4, io_task_size=64 * KiB, memory_device="host")
    alloc = SlabMemoryAllocator(16 * MiB, "host")
    be = LocalDiskBackend(cfg, None, alloc)
    try:
        keys, data = _put_random(be, alloc, 8, (2, 16, 1024))      # 64 KiB chunks
        got = be.batched_get_blocking(keys)
        assert all(g is not None and same_bytes(g.tensor, d) for g, d in zip(got, data))
        assert be.stats["checksum_calls"] == 2          # one launch for the put batch, one for the get batch
        for g in got:
            g.ref_count_down()
    finally:
        be.close()
        alloc.close()
