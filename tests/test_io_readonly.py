"""Read-only I/O engines (shared mode's reads of other writers' pool files): nothing opened for writing,
writes refused, a read past a shrunk file an error of that span, never the mapped engine."""

import errno
import os

import numpy as np
import pytest
import torch

from gds_kvcache.config import CacheEngineConfig
from gds_kvcache.errors import IOEngineError
from gds_kvcache.io import KvikIOEngine, PosixEngine, Span, kvikio_error
from gds_kvcache.io.mapped_engine import MappedEngine
from gds_kvcache.io.select import open_engine
from gds_kvcache.memory.buffers import SlabBuffer
from gds_kvcache.units import KiB, PAGE

from .conftest import require_kvikio

ENGINE_CLS = {"posix": PosixEngine, "kvikio": KvikIOEngine}
KINDS = ["host", pytest.param("cuda", marks=pytest.mark.gpu)]
STRIPE = 256 * KiB
FILES = 3
TASK = 64 * KiB  # smaller than some spans, so they split into pieces on several threads


def write_pool(directory, rnd, files=FILES, stripe=STRIPE) -> tuple[list[str], list[bytes]]:
    """Stripe files of random bytes written with plain ``os.pwrite``, then made read-only (0o444)."""
    paths, contents = [], []
    for i in range(files):
        p = os.path.join(str(directory), f"kvcache.pool.{i}")
        data = rnd.integers(0, 256, stripe, dtype=np.uint8).tobytes()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            assert os.pwrite(fd, data, 0) == stripe
        finally:
            os.close(fd)
        os.chmod(p, 0o444)
        paths.append(p)
        contents.append(data)
    return paths, contents


def file_bytes(contents, span: Span, stripe=STRIPE) -> bytes:
    fi, local = divmod(span.file_offset, stripe)
    return contents[fi][local:local + span.nbytes]


def slab(nbytes, kind, rnd) -> SlabBuffer:
    """A slab of random bytes, so a read that moved nothing cannot match the file by luck."""
    b = SlabBuffer(nbytes, kind)
    b.tensor.copy_(torch.from_numpy(rnd.integers(0, 256, b.nbytes, dtype=np.uint8)).to(b.tensor.device))
    return b


def slab_bytes(buf: SlabBuffer, off: int, n: int) -> bytes:
    return buf.tensor[off:off + n].cpu().numpy().tobytes()


def open_fd_flags(paths) -> dict[int, int]:
    """{fd: open flags} of every descriptor this process holds on one of ``paths`` (KvikIO's C++ ones too)."""
    want = {os.path.realpath(p) for p in paths}
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            with open(f"/proc/self/fdinfo/{name}") as f:
                info = f.read()
        except OSError:  # closed between listdir and here (the listdir's own fd, another thread's)
            continue
        if target in want:
            flags = next(line.split()[1] for line in info.splitlines() if line.startswith("flags:"))
            out[int(name)] = int(flags, 8)
    return out


@pytest.fixture
def recorded_opens(monkeypatch):
    """Flags of every ``os.open`` the library makes while the test runs (probes that close at once too)."""
    seen: list[tuple[str, int]] = []
    real = os.open

    def spy(path, flags, *a, **kw):
        seen.append((os.fspath(path), flags))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    return seen


def assert_only_read_opens(paths, recorded):
    """Tests may run as root, where 0o444 stops no write: check the flags themselves."""
    fds = open_fd_flags(paths)
    assert fds, "the engine holds no descriptor on its files"
    for fd, flags in fds.items():
        assert flags & os.O_ACCMODE == os.O_RDONLY, f"fd {fd} open with flags {flags:o}"
        assert not flags & (os.O_CREAT | os.O_TRUNC)
    mine = {os.path.realpath(p) for p in paths}
    for path, flags in recorded:
        if os.path.realpath(path) in mine:
            assert flags & os.O_ACCMODE == os.O_RDONLY, f"os.open({path}, {flags:o})"
            assert not flags & (os.O_CREAT | os.O_TRUNC)


def o_direct_works(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


# A batch over every stripe file: stripe starts and ends, multi-piece spans, single pages.
SPANS = [Span(0, 0, 128 * KiB), Span(128 * KiB, STRIPE - 4 * KiB, PAGE),
         Span(132 * KiB, STRIPE + 36 * KiB, 200 * KiB), Span(332 * KiB, 2 * STRIPE + 8 * KiB, 16 * KiB),
         Span(348 * KiB, 2 * STRIPE + STRIPE - 64 * KiB, 64 * KiB)]
SLAB = 448 * KiB


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direct", [True, False])
def test_reads_byte_exact_with_every_file_open_read_only(tmp_path, engine_name, kind, direct, rng,
                                                         recorded_opens):
    paths, contents = write_pool(tmp_path, rng)
    recorded_opens.clear()  # the test's own writes
    buf = slab(SLAB, kind, rng)
    with ENGINE_CLS[engine_name](paths, 4, TASK, direct, kind, STRIPE, read_only=True) as eng:
        assert eng.read_only and not eng.punch_ok
        assert_only_read_opens(paths, recorded_opens)
        if direct and o_direct_works(paths[0]):
            # O_DIRECT as a read-write engine would have it, on read-only descriptors.
            assert any(f & os.O_DIRECT for f in open_fd_flags(paths).values())
            assert eng.report().direct_io
        eng.attach(buf)
        assert eng.read_spans(SPANS) == [None] * len(SPANS)
        for s in SPANS:
            assert slab_bytes(buf, s.mem_offset, s.nbytes) == file_bytes(contents, s)
        rep = eng.report()
        assert rep.engine == engine_name and rep.files == FILES and len(rep.file_paths) == FILES
        assert sum(rep.bytes_by_path.values()) == sum(s.nbytes for s in SPANS)
        assert rep.line()
    buf.close()


def test_reads_what_a_read_write_engine_wrote(tmp_path, engine_name, rng):
    paths, _ = write_pool(tmp_path, rng)
    for p in paths:
        os.chmod(p, 0o644)
    src, dst = slab(SLAB, "host", rng), slab(SLAB, "host", rng)
    with ENGINE_CLS[engine_name](paths, 4, TASK, True, "host", STRIPE) as writer:
        writer.attach(src)
        assert writer.write_spans(SPANS) == [None] * len(SPANS)
    for p in paths:
        os.chmod(p, 0o444)
    with ENGINE_CLS[engine_name](paths, 4, TASK, True, "host", STRIPE, read_only=True) as reader:
        reader.attach(dst)
        assert reader.read_spans(SPANS) == [None] * len(SPANS)
    for s in SPANS:
        assert slab_bytes(dst, s.mem_offset, s.nbytes) == slab_bytes(src, s.mem_offset, s.nbytes)


@pytest.mark.parametrize("kind", KINDS)
def test_writes_are_refused(tmp_path, engine_name, kind, rng):
    paths, contents = write_pool(tmp_path, rng)
    buf = slab(SLAB, kind, rng)
    with ENGINE_CLS[engine_name](paths, 2, TASK, False, kind, STRIPE, read_only=True) as eng:
        eng.attach(buf)
        with pytest.raises(IOEngineError, match="read-only") as ei:
            eng.write_spans(SPANS)
        assert ei.value.errno == errno.EBADF
        # Reads still work after a refused write.
        assert eng.read_spans(SPANS[:1]) == [None]
    for p, data in zip(paths, contents):
        with open(p, "rb") as f:
            assert f.read() == data
    buf.close()


def test_one_object_writes_are_refused(tmp_path, engine_name, rng):
    from gds_kvcache.memory import SlabMemoryAllocator

    paths, contents = write_pool(tmp_path, rng)
    a = SlabMemoryAllocator(SLAB, "host")
    o = a.allocate((PAGE,), torch.uint8)
    o.tensor.copy_(torch.from_numpy(rng.integers(0, 256, PAGE, dtype=np.uint8)))
    with ENGINE_CLS[engine_name](paths, 2, TASK, False, "host", STRIPE, read_only=True) as eng:
        with pytest.raises(IOEngineError, match="read-only"):
            eng.write(o, 0, PAGE)
        with pytest.raises(IOEngineError, match="read-only"):
            eng.submit_write(o, 0, PAGE).result()
    with open(paths[0], "rb") as f:
        assert f.read() == contents[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direct", [True, False])
def test_reads_past_a_shrunk_file_are_per_span_errors(tmp_path, engine_name, kind, direct, rng):
    """A writer restarting with a smaller budget shrinks its files under the reader: short reads, no hang."""
    paths, contents = write_pool(tmp_path, rng)
    buf = slab(SLAB, kind, rng)
    with ENGINE_CLS[engine_name](paths, 4, TASK, direct, kind, STRIPE, read_only=True) as eng:
        eng.attach(buf)
        os.chmod(paths[1], 0o644)
        os.truncate(paths[1], 64 * KiB + 100)  # not a page multiple: the O_DIRECT read comes back short
        spans = [Span(0, 0, 16 * KiB),                          # file 0: whole
                 Span(16 * KiB, STRIPE + 128 * KiB, 16 * KiB),  # file 1: all of it past the end
                 Span(32 * KiB, STRIPE + 48 * KiB, 32 * KiB),   # file 1: runs over the end
                 Span(64 * KiB, STRIPE + 128 * KiB, 128 * KiB),  # file 1: past the end, several pieces
                 Span(192 * KiB, STRIPE, 32 * KiB),             # file 1: still inside
                 Span(224 * KiB, 2 * STRIPE + PAGE, 16 * KiB)]  # file 2: whole
        errs = eng.read_spans(spans)
        for i in (1, 2, 3):
            assert isinstance(errs[i], IOEngineError), (i, errs[i])
            if kind == "host":  # cuFile reports a short count instead, which the engine words differently
                assert "short read" in str(errs[i])
        for i in (0, 4, 5):
            assert errs[i] is None, (i, errs[i])
            assert slab_bytes(buf, spans[i].mem_offset, spans[i].nbytes) == file_bytes(contents, spans[i])
        # The one-object path raises the same error.
        with pytest.raises(IOEngineError):
            eng.read(_Obj(buf, 16 * KiB), STRIPE + 128 * KiB, 16 * KiB)
    buf.close()


class _Obj:
    """The two things ``IOEngine._one_span`` reads off a MemoryObj, over an existing slab."""

    def __init__(self, buf, offset):
        self.slab = buf
        self.offset = offset
        self.phys_size = 1 << 30


def test_open_and_read_leave_the_files_untouched(tmp_path, engine_name, rng):
    paths, contents = write_pool(tmp_path, rng)
    before = [os.stat(p) for p in paths]
    buf = slab(SLAB, "host", rng)
    with ENGINE_CLS[engine_name](paths, 4, TASK, True, "host", STRIPE, read_only=True) as eng:
        eng.attach(buf)
        assert eng.read_spans(SPANS) == [None] * len(SPANS)
        with pytest.raises(IOEngineError):
            eng.write_spans(SPANS)
    after = [os.stat(p) for p in paths]
    for b, a, p, data in zip(before, after, paths, contents):
        assert (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_blocks, a.st_mode) == \
               (b.st_size, b.st_mtime_ns, b.st_ctime_ns, b.st_blocks, b.st_mode), p
        with open(p, "rb") as f:
            assert f.read() == data


def test_kvikio_path_prediction_opens_read_only(tmp_path, monkeypatch, rng, recorded_opens):
    """Outside compat mode the engine probes each file for O_DIRECT to predict its path: read-only too."""
    require_kvikio()
    import kvikio.defaults

    import gds_kvcache.io.kvikio_engine as ke

    # The engine believes KvikIO left compat mode; KvikIO itself still runs compat, so nothing hangs.
    monkeypatch.setattr(kvikio.defaults, "is_compat_mode_preferred", lambda: False)
    monkeypatch.setattr(ke, "nvidia_fs_loaded", lambda: False)
    paths, _ = write_pool(tmp_path, rng)
    recorded_opens.clear()  # the test's own writes
    with KvikIOEngine(paths, 2, TASK, True, "cuda", STRIPE, read_only=True) as eng:
        assert_only_read_opens(paths, recorded_opens)
        rep = eng.report()
    assert any(os.path.realpath(p) in {os.path.realpath(q) for q in paths} for p, _ in recorded_opens), \
        "the O_DIRECT probe did not run: this test checks nothing"
    assert rep.files == FILES and rep.line()


# -- selection -------------------------------------------------------------------------
def config(engine):
    return CacheEngineConfig(io_engine=engine, io_threads=4, io_task_size=TASK)


@pytest.mark.parametrize("requested", ["auto", "mapped"])
def test_open_engine_read_only_never_maps(shm_dir, requested, rng, recorded_opens):
    paths, contents = write_pool(shm_dir, rng)
    # Read-write, auto maps this pool: read-only must not.
    with open_engine(paths, config("auto"), "host", STRIPE) as rw:
        assert isinstance(rw, MappedEngine)
    before = [os.stat(p) for p in paths]  # after the mapped engine, which reserves the pages
    recorded_opens.clear()  # the test's own writes and the read-write engine's opens
    buf = slab(SLAB, "host", rng)
    with open_engine(paths, config(requested), "host", STRIPE, read_only=True) as eng:
        assert not isinstance(eng, MappedEngine)
        assert eng.name == ("kvikio" if kvikio_error() is None else "posix")
        assert eng.read_only and not eng.punch_ok
        assert_only_read_opens(paths, recorded_opens)
        eng.attach(buf)
        assert eng.read_spans(SPANS) == [None] * len(SPANS)
        for s in SPANS:
            assert slab_bytes(buf, s.mem_offset, s.nbytes) == file_bytes(contents, s)
    after = [os.stat(p) for p in paths]
    assert [(a.st_size, a.st_mtime_ns, a.st_blocks) for a in after] == \
           [(b.st_size, b.st_mtime_ns, b.st_blocks) for b in before]


@pytest.mark.parametrize("requested", ["posix", "kvikio"])
def test_open_engine_read_only_as_asked(shm_dir, requested, rng, recorded_opens):
    if requested == "kvikio":
        require_kvikio()
    paths, _ = write_pool(shm_dir, rng)
    recorded_opens.clear()  # the test's own writes
    with open_engine(paths, config(requested), "host", STRIPE, read_only=True) as eng:
        assert type(eng) is ENGINE_CLS[requested]
        assert eng.read_only and not eng.punch_ok
        assert_only_read_opens(paths, recorded_opens)
        eng.attach(slab(SLAB, "host", rng))
        with pytest.raises(IOEngineError, match="read-only"):
            eng.write_spans(SPANS[:1])


def test_read_write_engines_unchanged(tmp_path, engine_name, rng):
    """The default stays read-write: it writes, and may punch."""
    paths, _ = write_pool(tmp_path, rng)
    for p in paths:
        os.chmod(p, 0o644)
    with ENGINE_CLS[engine_name](paths, 2, TASK, False, "host", STRIPE) as eng:
        assert not eng.read_only and eng.punch_ok
        assert all(f & os.O_ACCMODE == os.O_RDWR for f in open_fd_flags(paths).values())
        eng.attach(slab(SLAB, "host", rng))
        assert eng.write_spans(SPANS) == [None] * len(SPANS)
