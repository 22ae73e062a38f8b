"""The mapped path: pool files on tmpfs mapped once, spans moved by memcpy (host slab) or DMA (CUDA slab)."""

import errno
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import gds_kvcache.io.select as sel
from gds_kvcache.config import CacheEngineConfig
from gds_kvcache.errors import ClosedError, IOEngineError
from gds_kvcache.io.base import Span
from gds_kvcache.io.mapped_engine import MappedEngine
from gds_kvcache.io.posix_engine import PosixEngine
from gds_kvcache.io.select import choose_engine, open_engine, pool_ram_needed, ram_backed_fs
from gds_kvcache.memory import SlabMemoryAllocator
from gds_kvcache.memory.buffers import SlabBuffer
from gds_kvcache.units import KiB, MiB, PAGE

from .conftest import mounted_tmpfs
from .helpers import random_tensor, run_threads

ROOT = Path(__file__).resolve().parents[1]
STRIPE = 1 * MiB


@pytest.fixture
def disk_dir(tmp_path):
    if ram_backed_fs(str(tmp_path)) is not None:
        pytest.skip(f"{tmp_path} is RAM-backed here; the test needs a disk file system")
    return str(tmp_path)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "tiny", "1m") as mnt:
        yield str(mnt)


def pool(directory, stripes=3, stripe=STRIPE):
    """Sparse stripe files, as PoolDirectory leaves them."""
    paths = []
    for i in range(stripes):
        p = os.path.join(directory, f"kvcache.pool.{i}")
        with open(p, "wb") as f:
            f.truncate(stripe)
        paths.append(p)
    return paths


def slab(nbytes, kind="host"):
    b = SlabBuffer(nbytes, kind)
    b.tensor.copy_(random_tensor((b.nbytes,), torch.uint8))
    return b


def file_bytes(paths, off, n, stripe=STRIPE):
    i, local = divmod(off, stripe)
    with open(paths[i], "rb") as f:
        f.seek(local)
        return f.read(n)


def config(engine, **kw):
    return CacheEngineConfig(io_engine=engine, io_threads=4, io_task_size=64 * KiB, **kw)


# A batch over three stripes: a span at each stripe's start and end, spans of
# several task-size pieces, single pages, 64 small spans for the thread bins.
SPANS = ([Span(0, 0, 256 * KiB), Span(256 * KiB, STRIPE - 128 * KiB, 128 * KiB),
          Span(384 * KiB, STRIPE, STRIPE), Span(1408 * KiB, 2 * STRIPE + 4 * KiB, PAGE)]
         + [Span(1412 * KiB + j * 8 * KiB, 2 * STRIPE + 64 * KiB + j * 12 * KiB, 8 * KiB) for j in range(64)])
SPAN_BYTES = 1412 * KiB + 64 * 8 * KiB


# -- selection -------------------------------------------------------------------------
def test_auto_maps_a_pool_on_dev_shm(shm_dir):
    paths = pool(shm_dir)
    assert ram_backed_fs(shm_dir) == "tmpfs"
    name, why = choose_engine("auto", shm_dir, pool_ram_needed(paths, STRIPE))
    assert name == "mapped" and "tmpfs" in why
    with open_engine(paths, config("auto"), "host", STRIPE) as eng:
        assert isinstance(eng, MappedEngine) and eng.punch_ok is False
        rep = eng.report()
        assert rep.engine == rep.path == "mapped" and rep.registered is None
        assert "path=mapped" in rep.line() and "host copies" in rep.line()


def test_auto_on_a_disk_file_system_reads_and_writes(disk_dir):
    paths = pool(disk_dir)
    assert ram_backed_fs(disk_dir) is None
    with open_engine(paths, config("auto"), "host", STRIPE) as eng:
        assert not isinstance(eng, MappedEngine) and eng.punch_ok is True
        assert eng.report().path != "mapped"


def test_mapped_forced_on_a_disk_file_system_raises(disk_dir):
    paths = pool(disk_dir)
    with pytest.raises(IOEngineError, match="io_engine='mapped'.*not on a RAM-backed"):
        choose_engine("mapped", disk_dir, pool_ram_needed(paths, STRIPE))
    with pytest.raises(IOEngineError, match="io_engine='mapped'"):
        open_engine(paths, config("mapped"), "host", STRIPE)
    for p in paths:  # nothing reserved or mapped on the way
        assert os.stat(p).st_blocks == 0


def test_dax_mounts_count_as_ram_backed(shm_dir, disk_dir, monkeypatch):
    assert sel._mount_of(shm_dir)[0] == "tmpfs"  # mountinfo parsed for the real mount
    fs, opts = sel._mount_of(disk_dir)
    assert fs != "tmpfs" and {"rw", "ro"} & opts
    monkeypatch.setattr(sel, "_mount_of", lambda d: (fs, opts | {"dax=always"}))
    assert ram_backed_fs(disk_dir) == f"{fs} (DAX)"
    monkeypatch.setattr(sel, "_mount_of", lambda d: (fs, opts | {"dax=never"}))
    assert ram_backed_fs(disk_dir) is None


def test_kvikio_and_posix_never_map(shm_dir):
    paths = pool(shm_dir)
    assert choose_engine("posix", shm_dir, 0)[0] == "posix"
    with open_engine(paths, config("posix"), "host", STRIPE) as eng:
        assert isinstance(eng, PosixEngine)


def test_auto_does_not_map_a_pool_that_does_not_fit_in_memory(shm_dir, monkeypatch, caplog):
    paths = pool(shm_dir)
    need = pool_ram_needed(paths, STRIPE)
    assert need == 3 * STRIPE
    gib = 1 << 30
    monkeypatch.setattr(sel, "_meminfo", lambda: {"MemTotal": 64 * gib, "MemAvailable": need + gib})
    with caplog.at_level(logging.WARNING, logger="gds_kvcache.io.select"):
        name, _ = choose_engine("auto", shm_dir, need)
    assert name != "mapped"
    assert "margin" in caplog.text and "MemAvailable" in caplog.text
    # Forced: within the margin is a warning, past MemAvailable an error.
    assert choose_engine("mapped", shm_dir, need)[0] == "mapped"
    monkeypatch.setattr(sel, "_meminfo", lambda: {"MemTotal": 64 * gib, "MemAvailable": need - PAGE})
    with pytest.raises(IOEngineError, match="io_engine='mapped'.*MemAvailable"):
        choose_engine("mapped", shm_dir, need)


def test_a_pool_already_in_ram_needs_no_more(shm_dir):
    paths = pool(shm_dir)
    MappedEngine(paths, 2, 64 * KiB, False, "host", STRIPE).close()  # fallocates every stripe
    assert pool_ram_needed(paths, STRIPE) == 0


# -- transfers -------------------------------------------------------------------------
def test_span_round_trip_across_stripes(shm_dir):
    paths = pool(shm_dir)
    buf = slab(2 * SPAN_BYTES)
    with MappedEngine(paths, 4, 64 * KiB, True, "host", STRIPE) as eng:
        eng.attach(buf)
        assert eng.write_spans(SPANS) == [None] * len(SPANS)
        back = [Span(s.mem_offset + SPAN_BYTES, s.file_offset, s.nbytes) for s in SPANS]
        assert eng.read_spans(back) == [None] * len(SPANS)
        assert eng.report().bytes_by_path["mapped/buffered"] == 2 * SPAN_BYTES
    t = buf.tensor
    assert torch.equal(t[:SPAN_BYTES], t[SPAN_BYTES:])
    for s in SPANS:  # the same bytes at the same offsets of the same files
        assert file_bytes(paths, s.file_offset, s.nbytes) == t[s.mem_offset:s.mem_offset + s.nbytes].numpy().tobytes()


def test_a_bad_span_fails_alone(shm_dir):
    paths = pool(shm_dir)
    buf = slab(2 * MiB)
    spans = [Span(0, 0, 64 * KiB),
             Span(64 * KiB, STRIPE - PAGE, 2 * PAGE),   # crosses a stripe
             Span(2 * MiB - PAGE, 0, 2 * PAGE),         # past the slab
             Span(128 * KiB, 3 * STRIPE, PAGE),         # past the last file
             Span(192 * KiB, STRIPE, 64 * KiB)]
    with MappedEngine(paths, 4, 64 * KiB, False, "host", STRIPE) as eng:
        eng.attach(buf)
        errs = eng.write_spans(spans)
        assert errs[0] is None and errs[4] is None
        assert all(isinstance(e, IOEngineError) for e in errs[1:4])
    assert file_bytes(paths, STRIPE, 64 * KiB) == buf.tensor[192 * KiB:256 * KiB].numpy().tobytes()
    assert file_bytes(paths, STRIPE - PAGE, PAGE) == bytes(PAGE)  # the crossing span wrote nothing


def test_threads_share_an_engine(shm_dir):
    paths = pool(shm_dir, stripes=4)
    buf = slab(8 * MiB)
    with MappedEngine(paths, 4, 64 * KiB, False, "host", STRIPE) as eng:
        eng.attach(buf)

        def worker(i):
            for _ in range(20):
                spans = [Span(i * MiB + j * 128 * KiB, i * STRIPE + j * 128 * KiB, 128 * KiB) for j in range(8)]
                assert eng.write_spans(spans) == [None] * 8
                back = [Span(4 * MiB + s.mem_offset, s.file_offset, s.nbytes) for s in spans]
                assert eng.read_spans(back) == [None] * 8

        assert not any(t.is_alive() for t in run_threads(worker, 4))
    assert torch.equal(buf.tensor[:4 * MiB], buf.tensor[4 * MiB:])


def test_per_object_methods(shm_dir):
    paths = pool(shm_dir)
    a = SlabMemoryAllocator(4 * MiB, "host")
    src = a.allocate((300 * KiB + 5,), torch.uint8)
    src.tensor.copy_(random_tensor(src.shape, torch.uint8))
    dst = a.allocate((300 * KiB + 5,), torch.uint8)
    dst.tensor.copy_(random_tensor(dst.shape, torch.uint8))
    with MappedEngine(paths, 4, 64 * KiB, False, "host", STRIPE) as eng:
        assert eng.write(src, STRIPE + PAGE, src.phys_size) == src.phys_size
        assert eng.submit_read(dst, STRIPE + PAGE, dst.phys_size).result() == dst.phys_size
        assert torch.equal(src.tensor, dst.tensor)
        assert eng.submit_write(dst, 0, dst.phys_size).result() == dst.phys_size
        with pytest.raises(IOEngineError):
            eng.read(dst, STRIPE - PAGE, dst.phys_size)  # crosses a stripe
    assert file_bytes(paths, 0, dst.nbytes) == src.tensor.numpy().tobytes()


# -- the same files for every engine, across restarts ----------------------------------
def test_restart_and_posix_engine_see_the_same_bytes(shm_dir):
    paths = pool(shm_dir)
    buf = slab(4 * SPAN_BYTES)
    t = buf.tensor
    with MappedEngine(paths, 4, 64 * KiB, False, "host", STRIPE) as eng:
        eng.attach(buf)
        assert eng.write_spans(SPANS) == [None] * len(SPANS)
    with MappedEngine(paths, 4, 64 * KiB, False, "host", STRIPE) as eng:  # a restart
        eng.attach(buf)
        assert eng.read_spans([Span(s.mem_offset + SPAN_BYTES, s.file_offset, s.nbytes) for s in SPANS]) \
            == [None] * len(SPANS)
    with PosixEngine(paths, 4, 64 * KiB, True, "host", STRIPE) as pe:
        pe.attach(buf)
        assert pe.read_spans([Span(s.mem_offset + 2 * SPAN_BYTES, s.file_offset, s.nbytes) for s in SPANS]) \
            == [None] * len(SPANS)
        # and the other way: POSIX writes, the mapping reads
        t[:SPAN_BYTES].copy_(random_tensor((SPAN_BYTES,), torch.uint8))
        assert pe.write_spans(SPANS) == [None] * len(SPANS)
    with MappedEngine(paths, 4, 64 * KiB, False, "host", STRIPE) as eng:
        eng.attach(buf)
        assert eng.read_spans([Span(s.mem_offset + 3 * SPAN_BYTES, s.file_offset, s.nbytes) for s in SPANS]) \
            == [None] * len(SPANS)
    assert torch.equal(t[SPAN_BYTES:2 * SPAN_BYTES], t[2 * SPAN_BYTES:3 * SPAN_BYTES])
    assert torch.equal(t[:SPAN_BYTES], t[3 * SPAN_BYTES:])
    assert not torch.equal(t[:SPAN_BYTES], t[SPAN_BYTES:2 * SPAN_BYTES])


CRASHING_WRITER = """
import os, sys, torch
from gds_kvcache.io.base import Span
from gds_kvcache.io.mapped_engine import MappedEngine
from gds_kvcache.memory.buffers import SlabBuffer
paths, stripe = sys.argv[1].split(","), int(sys.argv[2])
b = SlabBuffer(stripe, "host")
g = torch.Generator().manual_seed(7)
b.tensor.copy_(torch.randint(0, 256, (stripe,), dtype=torch.uint8, generator=g))
eng = MappedEngine(paths, 2, 65536, False, "host", stripe)
eng.attach(b)
assert eng.write_spans([Span(0, stripe, stripe)]) == [None]
os._exit(0)  # no close, no unmap: a crash right after the write
"""


def test_bytes_outlive_a_crashed_writer_process(shm_dir):
    paths = pool(shm_dir)
    r = subprocess.run([sys.executable, "-c", CRASHING_WRITER, ",".join(paths), str(STRIPE)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    g = torch.Generator().manual_seed(7)
    want = torch.randint(0, 256, (STRIPE,), dtype=torch.uint8, generator=g)
    buf = slab(STRIPE)
    with MappedEngine(paths, 2, 64 * KiB, False, "host", STRIPE) as eng:
        eng.attach(buf)
        assert eng.read_spans([Span(0, STRIPE, STRIPE)]) == [None]
    assert torch.equal(buf.tensor, want)


# -- failures that must not be SIGBUS --------------------------------------------------
def test_truncated_pool_file_is_a_short_read_not_sigbus(shm_dir):
    paths = pool(shm_dir)
    buf = slab(MiB)
    with MappedEngine(paths, 2, 64 * KiB, False, "host", STRIPE) as eng:
        eng.attach(buf)
        assert eng.write_spans([Span(0, 0, 64 * KiB), Span(64 * KiB, STRIPE, 64 * KiB)]) == [None, None]
        os.truncate(paths[0], 32 * KiB)  # behind the engine's back
        errs = eng.read_spans([Span(512 * KiB, 0, 64 * KiB), Span(576 * KiB, STRIPE, 64 * KiB)])
        assert isinstance(errs[0], IOEngineError) and "truncated" in str(errs[0]) and errs[1] is None
        assert isinstance(eng.write_spans([Span(0, 0, 64 * KiB)])[0], IOEngineError)
    assert torch.equal(buf.tensor[576 * KiB:640 * KiB], buf.tensor[64 * KiB:128 * KiB])


def test_no_room_on_tmpfs_at_open_is_an_error_not_sigbus(tiny_tmpfs, monkeypatch, caplog):
    paths = pool(tiny_tmpfs, stripes=2, stripe=4 * MiB)  # 8 MiB sparse files on a 1 MiB tmpfs
    before = os.statvfs(tiny_tmpfs).f_bfree
    with pytest.raises(IOEngineError) as exc:
        MappedEngine(paths, 2, 64 * KiB, False, "host", 4 * MiB)
    assert exc.value.errno == errno.ENOSPC and "cannot reserve" in str(exc.value)
    assert os.statvfs(tiny_tmpfs).f_bfree == before  # nothing left reserved
    # The selector sees the file system is too small and says so.
    with caplog.at_level(logging.WARNING, logger="gds_kvcache.io.select"):
        with open_engine(paths, config("auto"), "host", 4 * MiB) as eng:
            assert not isinstance(eng, MappedEngine)
    assert "free" in caplog.text
    with pytest.raises(IOEngineError, match="io_engine='mapped'"):
        open_engine(paths, config("mapped"), "host", 4 * MiB)
    # A pool that passes the checks and still meets ENOSPC while reserving:
    # auto falls back with a warning, a forced 'mapped' raises with the errno.
    monkeypatch.setattr(sel, "_fit", lambda d, n: (None, None))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gds_kvcache.io.select"):
        with open_engine(paths, config("auto"), "host", 4 * MiB) as eng:
            assert not isinstance(eng, MappedEngine)
    assert "cannot map the pool" in caplog.text and "falling back" in caplog.text
    with pytest.raises(IOEngineError, match="io_engine='mapped'.*cannot be mapped") as exc:
        open_engine(paths, config("mapped"), "host", 4 * MiB)
    assert exc.value.errno == errno.ENOSPC


def _mapped_files():
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def test_close_unmaps_and_refuses_further_calls(shm_dir):
    paths = pool(shm_dir)
    buf = slab(MiB)
    a = SlabMemoryAllocator(MiB, "host")
    o = a.allocate((PAGE,), torch.uint8)
    eng = MappedEngine(paths, 2, 64 * KiB, False, "host", STRIPE)
    eng.attach(buf)
    assert set(paths) <= _mapped_files()
    eng.close()
    assert not set(paths) & _mapped_files()
    for call in (lambda: eng.read_spans([Span(0, 0, PAGE)]), lambda: eng.write_spans([Span(0, 0, PAGE)]),
                 lambda: eng.attach(buf), lambda: eng.read(o, 0, PAGE), lambda: eng.submit_write(o, 0, PAGE)):
        with pytest.raises(ClosedError):
            call()
    eng.close()  # twice is fine


# -- the benchmark script ----------------------------------------------------------------
def test_bench_mapped_smoke(shm_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_mapped.py"), "--dir",
                        os.path.join(shm_dir, "x"), "--chunk-mib", "1", "--total-mib", "8", "--batch", "4",
                        "--reps", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads((tmp_path / "bench_mapped.json").read_text())
    cases = {row["case"] for row in out["rows"]}
    assert {"mapped put", "mapped get", "posix put", "posix get"} <= cases
    assert all(row["verified"] for row in out["rows"] if "verified" in row)
    assert not os.path.exists(os.path.join(shm_dir, "x"))  # its pool is removed


# -- CUDA slab -----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("register_at", ["open", "attach"])
def test_cuda_slab_round_trip_by_dma(shm_dir, register_at):
    paths = pool(shm_dir)
    buf = slab(2 * SPAN_BYTES, "cuda")
    want = buf.tensor[:SPAN_BYTES].cpu()
    memory = "cuda" if register_at == "open" else "host"
    with MappedEngine(paths, 4, 64 * KiB, False, memory, STRIPE) as eng:
        assert eng.registered is (register_at == "open")
        eng.attach(buf)
        assert eng.registered and eng.report().registered is True
        assert "registered for CUDA DMA" in eng.report().line()
        # CUDA sees every mapping as pinned memory: copies are DMA, not staged.
        assert all(m.tensor.is_pinned() for m in eng._maps)
        assert eng.write_spans(SPANS) == [None] * len(SPANS)
        back = [Span(s.mem_offset + SPAN_BYTES, s.file_offset, s.nbytes) for s in SPANS]
        assert eng.read_spans(back) == [None] * len(SPANS)
        # Bytes of a read are visible to any stream on return.
        other = torch.cuda.Stream()
        with torch.cuda.stream(other):
            got = buf.tensor[SPAN_BYTES:].to("cpu")
        other.synchronize()
    assert torch.equal(got, want)
    for s in SPANS:
        assert file_bytes(paths, s.file_offset, s.nbytes) == want[s.mem_offset:s.mem_offset + s.nbytes].numpy().tobytes()


@pytest.mark.gpu
def test_cuda_writes_read_by_posix_and_by_host_mapping(shm_dir):
    paths = pool(shm_dir)
    gpu = slab(SPAN_BYTES, "cuda")
    host = SlabBuffer(2 * SPAN_BYTES, "host")
    with MappedEngine(paths, 4, 64 * KiB, False, "cuda", STRIPE) as eng:
        eng.attach(gpu)
        assert eng.write_spans(SPANS) == [None] * len(SPANS)
    with PosixEngine(paths, 4, 64 * KiB, False, "host", STRIPE) as pe:
        pe.attach(host)
        assert pe.read_spans(SPANS) == [None] * len(SPANS)
    with MappedEngine(paths, 4, 64 * KiB, False, "host", STRIPE) as eng:
        eng.attach(host)
        assert eng.read_spans([Span(s.mem_offset + SPAN_BYTES, s.file_offset, s.nbytes) for s in SPANS]) \
            == [None] * len(SPANS)
    want = gpu.tensor.cpu()
    assert torch.equal(host.tensor[:SPAN_BYTES], want) and torch.equal(host.tensor[SPAN_BYTES:], want)
    assert np.array_equal(host.host_array()[:SPAN_BYTES], want.numpy())


@pytest.mark.gpu
def test_cuda_copies_are_pinned_dma(shm_dir):
    """CUPTI names each copy by its host memory kind: pinned (DMA), never pageable (staged)."""
    paths = pool(shm_dir)
    buf = slab(2 * SPAN_BYTES, "cuda")
    with MappedEngine(paths, 4, 64 * KiB, False, "cuda", STRIPE) as eng:
        eng.attach(buf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the profiler's own notices are not under test
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                assert eng.write_spans(SPANS) == [None] * len(SPANS)
                assert eng.read_spans(SPANS) == [None] * len(SPANS)
            names = [e.name for e in prof.events() if e.name.startswith("Memcpy")]
    if not names:
        pytest.skip("the profiler recorded no copies here (no CUPTI?)")
    assert any("Pinned -> Device" in n for n in names) and any("Device -> Pinned" in n for n in names), names
    assert not any("Pageable" in n for n in names), names
