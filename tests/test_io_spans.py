"""The batched span interface of the I/O engines: round trips, per-span errors, reports, slab lifetime."""

import errno
import gc
import os
import random
import threading
import weakref

import numpy as np
import pytest
import torch

from gds_kvcache.errors import ClosedError, IOEngineError
from gds_kvcache.io import KvikIOEngine, PosixEngine, Span, kvikio_exception
from gds_kvcache.memory import SlabMemoryAllocator
from gds_kvcache.memory.buffers import SlabBuffer
from gds_kvcache.units import KiB, MiB, PAGE

from .conftest import mounted_tmpfs, require_kvikio

ENGINE_CLS = {"posix": PosixEngine, "kvikio": KvikIOEngine}
KINDS = ["host", pytest.param("pinned", marks=pytest.mark.gpu), pytest.param("cuda", marks=pytest.mark.gpu)]
STRIPE = 2 * MiB


def pool(tmp_path, files=4, stripe=STRIPE, name="pool"):
    paths = []
    for i in range(files):
        p = tmp_path / f"{name}.{i}"
        with open(p, "wb") as f:
            f.truncate(stripe)
        paths.append(str(p))
    return paths


def fill_random(buf: SlabBuffer, rnd: np.random.Generator) -> None:
    data = torch.from_numpy(rnd.integers(0, 256, buf.nbytes, dtype=np.uint8))
    buf.tensor.copy_(data.to(buf.tensor.device))


def host_bytes(buf: SlabBuffer, off: int, n: int) -> bytes:
    return buf.tensor[off:off + n].cpu().numpy().tobytes()


def random_spans(rnd: random.Random, count: int, mem_base: int, files=4, stripe=STRIPE, max_pages=40):
    """``count`` spans at distinct, non-overlapping file extents, packed in memory from ``mem_base``."""
    spans, mem = [], mem_base
    per_file = [0] * files
    for k in range(count):
        fi = k % files
        n = rnd.randint(1, max_pages) * PAGE
        gap = rnd.randint(0, 3) * PAGE
        if per_file[fi] + gap + n > stripe:
            n = PAGE
            gap = 0
        start = per_file[fi] + gap
        assert start + n <= stripe
        spans.append(Span(mem, fi * stripe + start, n))
        per_file[fi] = start + n
        mem += n + rnd.randint(0, 2) * PAGE
    return spans, mem


def open_engine(name, paths, threads=4, task=64 * KiB, direct=True, memory="host"):
    if name == "kvikio":
        require_kvikio()
    return ENGINE_CLS[name](paths, threads, task, direct, memory, STRIPE)


@pytest.fixture
def rnd():
    seed = int.from_bytes(os.urandom(4), "little")
    return random.Random(seed), np.random.default_rng(seed)


# -- round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_random_spans_round_trip(tmp_path, engine_name, kind, rnd):
    r, g = rnd
    paths = pool(tmp_path)
    src = SlabBuffer(8 * MiB, kind)
    dst = SlabBuffer(8 * MiB, kind)
    fill_random(src, g)
    fill_random(dst, g)
    # Spans up to 160 KiB with 64 KiB tasks: most are split into pieces run on several threads.
    spans, end = random_spans(r, 24, 0)
    assert end <= src.nbytes
    with open_engine(engine_name, paths, memory=kind) as eng:
        eng.attach(src)
        assert eng.write_spans(spans) == [None] * len(spans)
        eng.attach(dst)
        # Read back into different slab offsets, in another order.
        back = [Span(s.mem_offset + 2 * MiB, s.file_offset, s.nbytes) for s in reversed(spans)]
        assert eng.read_spans(back) == [None] * len(back)
        moved = sum(eng.report().bytes_by_path.values())
    assert moved == 2 * sum(s.nbytes for s in spans)
    for s in spans:
        want = host_bytes(src, s.mem_offset, s.nbytes)
        assert host_bytes(dst, s.mem_offset + 2 * MiB, s.nbytes) == want
        fi, local = divmod(s.file_offset, STRIPE)
        with open(paths[fi], "rb") as f:
            f.seek(local)
            assert f.read(s.nbytes) == want
    src.close()
    dst.close()


def test_spans_on_every_stripe_edge(tmp_path, engine_name, rnd):
    _, g = rnd
    paths = pool(tmp_path)
    buf = SlabBuffer(4 * MiB, "host")
    fill_random(buf, g)
    # First and last page of every stripe file, and a span ending exactly at a stripe's end.
    spans = []
    for i in range(4):
        spans.append(Span(i * 3 * PAGE, i * STRIPE, PAGE))
        spans.append(Span(i * 3 * PAGE + PAGE, (i + 1) * STRIPE - 2 * PAGE, 2 * PAGE))
    with open_engine(engine_name, paths, threads=3) as eng:
        eng.attach(buf)
        assert eng.write_spans(spans) == [None] * len(spans)
    for s in spans:
        fi, local = divmod(s.file_offset, STRIPE)
        with open(paths[fi], "rb") as f:
            f.seek(local)
            assert f.read(s.nbytes) == host_bytes(buf, s.mem_offset, s.nbytes)
        assert os.path.getsize(paths[fi]) == STRIPE
    buf.close()


def test_bad_spans_fail_alone(tmp_path, engine_name, rnd):
    _, g = rnd
    paths = pool(tmp_path, files=2)
    buf = SlabBuffer(MiB, "host")
    fill_random(buf, g)
    good = Span(0, PAGE, 4 * PAGE)
    crossing = Span(8 * PAGE, STRIPE - PAGE, 2 * PAGE)
    past_slab = Span(MiB - PAGE, 0, 2 * PAGE)
    past_files = Span(0, 2 * STRIPE, PAGE)
    with open_engine(engine_name, paths) as eng:
        eng.attach(buf)
        errs = eng.write_spans([crossing, good, past_slab, past_files])
    assert errs[1] is None
    assert all(isinstance(e, IOEngineError) for e in (errs[0], errs[2], errs[3]))
    assert "crosses a file boundary" in str(errs[0])
    with open(paths[0], "rb") as f:
        f.seek(PAGE)
        assert f.read(4 * PAGE) == host_bytes(buf, 0, 4 * PAGE)
    buf.close()


# -- per-span errors ----------------------------------------------------------------------
def test_truncated_file_fails_only_its_spans(tmp_path, engine_name, rnd):
    _, g = rnd
    paths = pool(tmp_path, files=2)
    buf = SlabBuffer(2 * MiB, "host")
    fill_random(buf, g)
    spans = [Span(0, 64 * KiB, 128 * KiB), Span(256 * KiB, STRIPE + 64 * KiB, 128 * KiB),
             Span(512 * KiB, 512 * KiB, 64 * KiB)]
    with open_engine(engine_name, paths) as eng:
        eng.attach(buf)
        assert eng.write_spans(spans) == [None] * 3
        want = [host_bytes(buf, s.mem_offset, s.nbytes) for s in spans]
        os.truncate(paths[1], 100 * KiB)  # cuts the second span short
        back = [Span(s.mem_offset + MiB, s.file_offset, s.nbytes) for s in spans]
        errs = eng.read_spans(back)
        assert errs[0] is None and errs[2] is None
        assert isinstance(errs[1], IOEngineError) and not type(errs[1]) is RuntimeError
        assert "short read" in str(errs[1])
        for k in (0, 2):
            assert host_bytes(buf, back[k].mem_offset, back[k].nbytes) == want[k]
        # The one-object API raises the same library error (KvikIO's RuntimeError never leaks).
        a = SlabMemoryAllocator(MiB, "host")
        with ENGINE_CLS[engine_name](paths, 2, 64 * KiB, False, "host", STRIPE) as eng2:
            o = a.allocate((128 * KiB,), torch.uint8)
            with pytest.raises(IOEngineError, match="short read"):
                eng2.read(o, STRIPE + 64 * KiB, 128 * KiB)
    buf.close()


@pytest.fixture
def tiny_fs(tmp_path):
    with mounted_tmpfs(tmp_path / "tiny", "1m") as mnt:
        yield mnt


def test_full_disk_is_enospc_from_either_engine(tiny_fs, engine_name, rnd):
    _, g = rnd
    paths = pool(tiny_fs, files=2)  # 4 MiB of sparse files on a 1 MiB file system
    buf = SlabBuffer(4 * MiB, "host")
    fill_random(buf, g)
    spans = [Span(i * 512 * KiB, (i % 2) * STRIPE + (i // 2) * 512 * KiB, 512 * KiB) for i in range(8)]
    with open_engine(engine_name, paths, direct=False) as eng:
        eng.attach(buf)
        errs = eng.write_spans(spans)
    failed = [e for e in errs if e is not None]
    assert failed, "8 x 512 KiB cannot fit in a 1 MiB file system"
    for e in failed:
        assert isinstance(e, OSError) and isinstance(e, IOEngineError)
        assert e.errno in (errno.ENOSPC, errno.EDQUOT), repr(e)
    buf.close()


def test_kvikio_errors_keep_their_errno():
    e = kvikio_exception(RuntimeError("KvikIO failure at: x.hpp:90: POSIX error on pwrite: No space left on device"),
                         "pwrite")
    assert isinstance(e, IOEngineError) and e.errno == errno.ENOSPC
    e = kvikio_exception(RuntimeError("KvikIO failure at: x.hpp:90: POSIX error on pwrite: Disk quota exceeded"), "w")
    assert e.errno == errno.EDQUOT
    e = kvikio_exception(RuntimeError("KvikIO failure at: posix_io.hpp:173: POSIX error on pread: EOF"), "pread")
    assert isinstance(e, IOEngineError) and e.errno is None and "short read" in str(e)
    e = kvikio_exception(RuntimeError("cuFile error: internal"), "pread")
    assert type(e) is IOEngineError and "cuFile error" in str(e)


def test_closed_engine_raises_closed_error(tmp_path, engine_name):
    buf = SlabBuffer(MiB, "host")
    eng = open_engine(engine_name, pool(tmp_path, files=1))
    eng.attach(buf)
    eng.close()
    eng.close()  # idempotent
    for call in (eng.read_spans, eng.write_spans):
        with pytest.raises(ClosedError):
            call([Span(0, 0, PAGE)])
    with pytest.raises(ClosedError):
        eng.attach(buf)
    buf.close()


# -- what the report says ----------------------------------------------------------------
def test_report_counts_bytes_per_path(tmp_path, engine_name, rnd):
    _, g = rnd
    buf = SlabBuffer(2 * MiB, "host")
    fill_random(buf, g)
    with open_engine(engine_name, pool(tmp_path), direct=False) as eng:
        eng.attach(buf)
        eng.write_spans([Span(0, 0, MiB), Span(MiB, STRIPE, 256 * KiB)])
        rep = eng.report()
    assert sum(rep.bytes_by_path.values()) == MiB + 256 * KiB
    assert len(rep.file_paths) == rep.files == 4
    assert not rep.direct_io and rep.direct_io_reason == "disabled in config"
    if engine_name == "posix":
        assert rep.bytes_by_path == {"posix/O_DIRECT": 0, "posix/buffered": MiB + 256 * KiB}
    else:
        # Host memory never takes cuFile; CI runs KvikIO in compat mode.
        assert rep.path in ("kvikio-compat", "kvikio-posix") and rep.registered is None
        assert set(rep.bytes_by_path) == {f"{rep.path}/buffered"}
        assert rep.kvikio_backends.get("POSIX", 0) >= MiB + 256 * KiB
        assert rep.kvikio_backends.get("GDS", 0) == 0
    assert "moved" in rep.line() and f"path={rep.path}" in rep.line()
    buf.close()


def cached_pages(path: str) -> int:
    """Pages of ``path`` in the page cache (mincore over a shared mapping)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value)
        vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


@pytest.mark.parametrize("direct", [True, False])
def test_report_o_direct_matches_the_page_cache(tmp_path, engine_name, direct, rnd):
    from gds_kvcache.io import fs_type
    from gds_kvcache.io.page_cache import drop_page_cache

    if fs_type(str(tmp_path)) in ("tmpfs", "ramfs"):
        pytest.skip("on a RAM file system the page cache is the data")
    _, g = rnd
    paths = pool(tmp_path, files=1)
    buf = SlabBuffer(MiB, "host")
    fill_random(buf, g)
    drop_page_cache(paths)
    with open_engine(engine_name, paths, direct=direct) as eng:
        eng.attach(buf)
        assert eng.write_spans([Span(0, 0, MiB)]) == [None]
        rep = eng.report()
    moved = {k.rsplit("/", 1)[1]: v for k, v in rep.bytes_by_path.items() if v}
    # What the report says went around the page cache did, and what it says went through it did.
    if moved == {"O_DIRECT": MiB}:
        assert rep.direct_io and cached_pages(paths[0]) == 0
    else:
        assert moved == {"buffered": MiB} and not rep.direct_io
        assert cached_pages(paths[0]) == MiB // PAGE
    if not direct:
        assert moved == {"buffered": MiB}
    buf.close()


@pytest.fixture
def kvikio_not_compat(monkeypatch):
    """Make the engine believe KvikIO left compat mode (KvikIO itself still runs compat: nothing hangs)."""
    require_kvikio()
    import kvikio.defaults

    import gds_kvcache.io.kvikio_engine as ke

    monkeypatch.setattr(kvikio.defaults, "is_compat_mode_preferred", lambda: False)
    return ke


def test_report_says_cufile_compat_without_nvidia_fs(tmp_path, kvikio_not_compat, monkeypatch):
    monkeypatch.setattr(kvikio_not_compat, "nvidia_fs_loaded", lambda: False)
    paths = pool(tmp_path, files=2)
    with KvikIOEngine(paths, 2, 64 * KiB, False, "cuda", STRIPE) as eng:
        rep = eng.report()
    # KvikIO would hand device I/O to cuFile, but cuFile only DMAs with nvidia-fs.
    assert rep.path == "cufile-compat" and rep.file_paths == ("cufile-compat",) * 2
    assert "nvidia-fs" in rep.file_reasons[0]
    # cuFile always opens O_DIRECT, whatever direct_io says.
    assert rep.direct_io and "cuFile" in rep.direct_io_reason


def test_report_host_memory_never_says_gds(tmp_path, kvikio_not_compat, monkeypatch, rnd):
    _, g = rnd
    monkeypatch.setattr(kvikio_not_compat, "nvidia_fs_loaded", lambda: True)
    monkeypatch.setattr(kvikio_not_compat, "fs_type", lambda p: "xfs")
    monkeypatch.setattr(kvikio_not_compat, "cufile_driver_state", lambda: {"is_gds_available": True, "why": ""})
    buf = SlabBuffer(MiB, "host")
    fill_random(buf, g)
    with KvikIOEngine(pool(tmp_path, files=1), 2, 64 * KiB, True, "host", STRIPE) as eng:
        eng.attach(buf)
        assert eng.write_spans([Span(0, 0, 64 * KiB)]) == [None]
        rep = eng.report()
    assert rep.path == "kvikio-posix" and rep.registered is None
    assert set(k for k, v in rep.bytes_by_path.items() if v) <= {"kvikio-posix/O_DIRECT", "kvikio-posix/buffered"}
    buf.close()


def test_report_names_a_file_that_fell_back(tmp_path, kvikio_not_compat, monkeypatch):
    monkeypatch.setattr(kvikio_not_compat, "nvidia_fs_loaded", lambda: True)
    monkeypatch.setattr(kvikio_not_compat, "fs_type", lambda p: "xfs")
    monkeypatch.setattr(kvikio_not_compat, "cufile_driver_state", lambda: {"is_gds_available": True, "why": ""})
    paths = pool(tmp_path, files=3)
    # File 1 refuses O_DIRECT: KvikIO runs that file in compat mode on its own.
    monkeypatch.setattr(kvikio_not_compat, "o_direct_opens", lambda p: p != paths[1])
    with KvikIOEngine(paths, 2, 64 * KiB, True, "cuda", STRIPE) as eng:
        rep = eng.report()
    assert rep.path == "mixed"
    assert rep.file_paths == ("gds", "kvikio-compat", "gds")
    assert "O_DIRECT open refused" in rep.file_reasons[1]
    assert "file 1: kvikio-compat" in rep.line()


# -- slab lifetime -------------------------------------------------------------------------
def test_close_frees_host_slab_without_gc(tmp_path, engine_name, rnd):
    _, g = rnd
    gc.disable()
    try:
        buf = SlabBuffer(4 * MiB, "host")
        fill_random(buf, g)
        raw = weakref.ref(buf._raw)
        arr = weakref.ref(buf.host_array())
        with open_engine(engine_name, pool(tmp_path, files=1)) as eng:
            eng.attach(buf)
            assert eng.write_spans([Span(0, 0, MiB)]) == [None]
        buf.close()
        buf.close()  # idempotent
        assert raw() is None and arr() is None, "the slab memory outlived close()"
        with pytest.raises(ClosedError):
            buf.tensor
        with pytest.raises(ClosedError):
            buf.register_gds()
    finally:
        gc.enable()


# -- GPU -------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_slab_is_its_own_allocation_and_close_frees_it():
    gc.disable()
    try:
        torch.cuda.synchronize()
        free0, _ = torch.cuda.mem_get_info()
        alloc0 = torch.cuda.memory_allocated()
        buf = SlabBuffer(1 << 30, "cuda")
        assert buf.tensor.is_cuda and buf.tensor.data_ptr() % PAGE == 0
        # Not a block of PyTorch's caching allocator.
        assert torch.cuda.memory_allocated() == alloc0
        free1, _ = torch.cuda.mem_get_info()
        assert free0 - free1 >= (1 << 30) - (64 << 20)
        buf.tensor[:16].fill_(7)
        buf.close()
        buf.close()
        free2, _ = torch.cuda.mem_get_info()
        assert free2 >= free0 - (64 << 20), "close() did not give the GPU memory back"
    finally:
        gc.enable()


@pytest.fixture
def fake_registration(monkeypatch):
    """Count cuFile (de)registrations, with the current CUDA device at each call."""
    require_kvikio()
    import kvikio

    calls = {"register": [], "deregister": []}
    monkeypatch.setattr(kvikio, "memory_register", lambda buf: calls["register"].append(torch.cuda.current_device()))
    monkeypatch.setattr(kvikio, "memory_deregister",
                        lambda buf: calls["deregister"].append(torch.cuda.current_device()))
    return calls


def force_gds_prediction(monkeypatch):
    import gds_kvcache.io.kvikio_engine as ke

    monkeypatch.setattr(ke.KvikIOEngine, "_predict",
                        lambda self: (["gds"] * len(self._files), ["forced by the test"] * len(self._files)))
    monkeypatch.setattr(ke.KvikIOEngine, "_probe", lambda self, buffer: None)


@pytest.mark.gpu
def test_registration_refused_runs_unregistered(tmp_path, monkeypatch):
    require_kvikio()
    import kvikio

    def refuse(buf):
        raise RuntimeError("cuFile error: max_device_pinned_mem_size_kb exceeded")

    monkeypatch.setattr(kvikio, "memory_register", refuse)
    force_gds_prediction(monkeypatch)
    buf = SlabBuffer(8 * MiB, "cuda")
    data = torch.randint(0, 256, (MiB,), dtype=torch.uint8, device="cuda")
    buf.tensor[:MiB].copy_(data)
    torch.cuda.synchronize()
    with KvikIOEngine(pool(tmp_path, files=1), 4, 256 * KiB, True, "cuda", STRIPE) as eng:
        eng.attach(buf)
        rep = eng.report()
        assert rep.registered is False and "refused" in rep.registration and "unregistered" in rep.line()
        assert eng.write_spans([Span(0, 0, MiB)]) == [None]
        assert eng.read_spans([Span(2 * MiB, 0, MiB)]) == [None]
    assert torch.equal(buf.tensor[2 * MiB:3 * MiB], data)
    buf.close()


@pytest.mark.gpu
def test_registered_once_deregistered_once(tmp_path, monkeypatch, fake_registration):
    force_gds_prediction(monkeypatch)
    buf = SlabBuffer(4 * MiB, "cuda")
    eng = KvikIOEngine(pool(tmp_path, files=1), 2, 256 * KiB, True, "cuda", STRIPE)
    eng.attach(buf)
    eng.attach(buf)
    assert buf.registered and eng.report().registered
    assert len(fake_registration["register"]) == 1
    eng.close()
    assert not buf.registered and len(fake_registration["deregister"]) == 1
    buf.close()
    assert len(fake_registration["deregister"]) == 1


@pytest.mark.gpu
def test_compat_mode_never_registers(tmp_path, fake_registration):
    import kvikio.defaults

    if not kvikio.defaults.is_compat_mode_preferred():
        pytest.skip("KvikIO is not in compat mode here")
    buf = SlabBuffer(4 * MiB, "cuda")
    with KvikIOEngine(pool(tmp_path, files=1), 2, 256 * KiB, True, "cuda", STRIPE) as eng:
        eng.attach(buf)
        rep = eng.report()
    assert fake_registration["register"] == [] and rep.registered is False
    assert rep.path == "kvikio-compat" and "not needed" in rep.registration
    buf.close()


@pytest.mark.gpu
def test_handle_refused_by_cufile_is_reported(tmp_path, kvikio_not_compat, monkeypatch):
    # The engine expects cuFile, KvikIO really runs compat: the probe read must show the fallback.
    monkeypatch.setattr(kvikio_not_compat, "nvidia_fs_loaded", lambda: True)
    monkeypatch.setattr(kvikio_not_compat, "fs_type", lambda p: "xfs")
    monkeypatch.setattr(kvikio_not_compat, "cufile_driver_state", lambda: {"is_gds_available": True, "why": ""})
    import kvikio

    monkeypatch.setattr(kvikio, "memory_register", lambda buf: None)
    monkeypatch.setattr(kvikio, "memory_deregister", lambda buf: None)
    if getattr(kvikio, "SummaryMonitor", None) is None:
        pytest.skip("this KvikIO keeps no statistics")
    buf = SlabBuffer(4 * MiB, "cuda")
    with KvikIOEngine(pool(tmp_path, files=2), 2, 256 * KiB, True, "cuda", STRIPE) as eng:
        assert eng.report().file_paths == ("gds", "gds")
        eng.attach(buf)
        rep = eng.report()
    assert rep.file_paths == ("kvikio-compat", "kvikio-compat")
    assert "refused the file handle" in rep.file_reasons[0]
    buf.close()


def _staged_engine(name, paths, threads, task, staging="pipelined"):
    if name == "posix":
        return PosixEngine(paths, threads, task, True, "cuda", STRIPE)
    require_kvikio()
    return KvikIOEngine(paths, threads, task, True, "cuda", STRIPE, staging=staging)


@pytest.mark.gpu
@pytest.mark.parametrize("name,staging", [("posix", "pipelined"), ("kvikio", "pipelined"), ("kvikio", "kvikio")])
@pytest.mark.parametrize("threads", [1, 4])
def test_gpu_staging_pipeline_round_trip(tmp_path, name, staging, threads, rnd):
    # Many pieces per lane: every slot is reused, reads and writes overlap copies; two callers share the lanes.
    r, g = rnd
    paths = pool(tmp_path)
    src, dst = SlabBuffer(8 * MiB, "cuda"), SlabBuffer(8 * MiB, "cuda")
    fill_random(src, g)
    fill_random(dst, g)
    torch.cuda.synchronize()
    spans, _ = random_spans(r, 40, 0, max_pages=60)
    halves = [spans[0::2], spans[1::2]]
    with _staged_engine(name, paths, threads, 16 * KiB, staging) as eng:
        eng.attach(src)
        rep = eng.report()
        out = [None, None]
        ts = [threading.Thread(target=lambda k=k: out.__setitem__(k, eng.write_spans(halves[k]))) for k in (0, 1)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert out == [[None] * len(h) for h in halves]
        eng.attach(dst)
        assert eng.read_spans(spans) == [None] * len(spans)
    for s in spans:
        assert host_bytes(dst, s.mem_offset, s.nbytes) == host_bytes(src, s.mem_offset, s.nbytes)
    if "kvikio-compat" in rep.file_paths or name == "posix":
        assert rep.staging.startswith("pipelined" if staging == "pipelined" else "kvikio")
    src.close()
    dst.close()


@pytest.mark.gpu
def test_gpu_engines_share_one_lane_pool(tmp_path, rnd):
    # Shared mode opens a read-only engine per writer: their bounce buffers are pinned once per process.
    _, g = rnd
    buf = SlabBuffer(4 * MiB, "cuda")
    fill_random(buf, g)
    torch.cuda.synchronize()
    want = host_bytes(buf, 0, MiB)
    a = PosixEngine(pool(tmp_path, name="a"), 4, 256 * KiB, True, "cuda", STRIPE)
    b = PosixEngine(pool(tmp_path, name="b"), 4, 256 * KiB, True, "cuda", STRIPE)
    a.attach(buf)
    b.attach(buf)
    shared = a._attached.current.lanes
    assert shared is b._attached.current.lanes and shared is not None
    assert a.write_spans([Span(0, 0, MiB)]) == [None]
    a.close()  # b's share keeps the lanes
    assert b.write_spans([Span(0, 0, MiB)]) == [None]
    assert b.read_spans([Span(2 * MiB, 0, MiB)]) == [None]
    assert host_bytes(buf, 2 * MiB, MiB) == want
    b.close()
    c = PosixEngine(pool(tmp_path, name="c"), 4, 256 * KiB, True, "cuda", STRIPE)
    c.attach(buf)
    assert c._attached.current.lanes is not shared  # the last user closed the old pool: a new one is made
    c.close()
    buf.close()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["posix", "kvikio"])
def test_gpu_staged_put_waits_for_the_default_stream(tmp_path, name):
    # A put through the pipelined lanes orders after the default stream (staging's rule, both engines):
    # it writes what the kernels queued there wrote, as KvikIO's own compat path does.
    buf = SlabBuffer(64 * MiB, "cuda")
    paths = pool(tmp_path, files=1, stripe=64 * MiB)
    with _staged_engine(name, paths, 4, MiB) as eng:
        eng.attach(buf)
        if not eng.report().staging.startswith("pipelined"):
            pytest.skip("no file takes KvikIO's compat path here")
        for value in (3, 11):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the fill, both on the default stream
            buf.tensor.fill_(value)  # queued, not waited for
            assert eng.write_spans([Span(0, 0, 64 * MiB)]) == [None]
            with open(paths[0], "rb") as f:
                assert f.read() == bytes([value]) * (64 * MiB)
    buf.close()


@pytest.mark.gpu
def test_cuda_device_1(tmp_path, monkeypatch, fake_registration, rnd):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _, g = rnd
    force_gds_prediction(monkeypatch)
    buf = SlabBuffer(4 * MiB, "cuda", cuda_device=1)
    assert buf.tensor.device == torch.device("cuda", 1)
    fill_random(buf, g)
    torch.cuda.synchronize(1)
    want = host_bytes(buf, 0, MiB)
    for name in ("kvikio", "posix"):
        with ENGINE_CLS[name](pool(tmp_path, files=1, name=name), 2, 256 * KiB, True, "cuda", STRIPE) as eng:
            eng.attach(buf)
            assert eng.write_spans([Span(0, 0, MiB)]) == [None]
            assert eng.read_spans([Span(2 * MiB, 0, MiB)]) == [None]
        assert host_bytes(buf, 2 * MiB, MiB) == want
        buf.tensor[2 * MiB:3 * MiB].fill_(0)
    # Registered in device 1's context, deregistered there too.
    assert fake_registration["register"] == [1] and fake_registration["deregister"] == [1]
    buf.close()
