"""The engines' staged path (a CUDA slab's) on CPU: real files, lanes whose copies complete late.

``lane_factory`` gives a host slab the lanes a CUDA slab would get, made of
``DeferredLane`` (see ``staging_fakes``): each engine's whole staged path
runs (lane pool, workers, KvikIO host futures or ``pwritev``), byte for
byte, with the faults a disk can have and ``close()`` racing transfers.
The same path with real CUDA lanes is ``test_gpu_staging_*`` in
``test_io_spans`` (``gpu`` marker).
"""

import errno
import os
import random
import threading

import numpy as np
import pytest

from gds_kvcache.errors import ClosedError, IOEngineError
from gds_kvcache.io import KvikIOEngine, PosixEngine, Span
from gds_kvcache.memory.buffers import SlabBuffer
from gds_kvcache.units import KiB, MiB, PAGE

from .conftest import require_kvikio
from .staging_fakes import Log, deferred_factory
from .test_io_spans import STRIPE, fill_random, host_bytes, pool, random_spans

ENGINES = {"posix": PosixEngine, "kvikio": KvikIOEngine}


@pytest.fixture
def rnd():
    seed = int.from_bytes(os.urandom(4), "little")
    return random.Random(seed), np.random.default_rng(seed)


def staged(name, paths, factory, threads=4, task=64 * KiB, direct=True, staging="pipelined"):
    cls = ENGINES[name]
    if name == "kvikio":
        require_kvikio()
        eng = cls(paths, threads, task, direct, "host", STRIPE, staging=staging)
        if "kvikio-compat" not in eng.report().file_paths:
            eng.close()
            pytest.skip("KvikIO is not in compat mode here: host memory is not staged")
    else:
        eng = cls(paths, threads, task, direct, "host", STRIPE)
    eng.lane_factory = factory
    return eng


@pytest.mark.parametrize("name", ["posix", "kvikio"])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("threads", [1, 4])
def test_staged_round_trip_byte_exact(tmp_path, name, direct, threads, rnd):
    r, g = rnd
    paths = pool(tmp_path)
    src, dst = SlabBuffer(8 * MiB, "host"), SlabBuffer(8 * MiB, "host")
    fill_random(src, g)
    fill_random(dst, g)
    spans, _ = random_spans(r, 40, 0, max_pages=60)  # many spans, most several 64 KiB pieces long
    log = Log()
    factory = deferred_factory(log, r.randint(0, 1 << 30))
    with staged(name, paths, factory, threads, direct=direct) as eng:
        eng.attach(src)
        assert eng.write_spans(spans) == [None] * len(spans)
        eng.attach(dst)
        assert eng.read_spans(spans) == [None] * len(spans)
        rep = eng.report()
    for s in spans:
        assert host_bytes(dst, s.mem_offset, s.nbytes) == host_bytes(src, s.mem_offset, s.nbytes)
    assert log.violations == []
    assert rep.staging.startswith("pipelined") and sum(rep.bytes_by_path.values()) == 2 * sum(s.nbytes for s in spans)
    assert factory.lanes and all(lane.begun == lane.ended for lane in factory.lanes)


@pytest.mark.parametrize("name", ["posix", "kvikio"])
def test_staged_odd_sizes(tmp_path, name, rnd):
    # Spans that are no page multiple, one byte to several tasks long: buffered where O_DIRECT cannot go.
    r, g = rnd
    paths = pool(tmp_path, files=2)
    src, dst = SlabBuffer(4 * MiB, "host"), SlabBuffer(4 * MiB, "host")
    fill_random(src, g)
    spans, mem, per_file = [], 0, [0, 0]
    for k in range(30):
        n = r.choice([1, PAGE - 1, PAGE + 1, 64 * KiB + 3, r.randint(1, 200 * KiB)])
        fi = k % 2
        if per_file[fi] + n > STRIPE:
            break
        spans.append(Span(mem, fi * STRIPE + per_file[fi], n))
        per_file[fi] += n + r.randint(0, 5)
        mem += n + r.randint(0, 5)
    log = Log()
    with staged(name, paths, deferred_factory(log)) as eng:
        eng.attach(src)
        assert eng.write_spans(spans) == [None] * len(spans)
        eng.attach(dst)
        assert eng.read_spans(spans) == [None] * len(spans)
    for s in spans:
        assert host_bytes(dst, s.mem_offset, s.nbytes) == host_bytes(src, s.mem_offset, s.nbytes)
    assert log.violations == []


@pytest.mark.parametrize("name", ["posix", "kvikio"])
def test_staged_truncated_file_fails_only_its_spans(tmp_path, name, rnd):
    _, g = rnd
    paths = pool(tmp_path, files=2)
    buf = SlabBuffer(2 * MiB, "host")
    fill_random(buf, g)
    spans = [Span(0, 64 * KiB, 128 * KiB), Span(256 * KiB, STRIPE + 64 * KiB, 256 * KiB),
             Span(640 * KiB, 512 * KiB, 64 * KiB)]
    with staged(name, paths, deferred_factory(Log())) as eng:
        eng.attach(buf)
        assert eng.write_spans(spans) == [None] * 3
        want = [host_bytes(buf, s.mem_offset, s.nbytes) for s in spans]
        os.truncate(paths[1], 100 * KiB)  # cuts the second span short, in its first piece
        back = [Span(s.mem_offset + MiB, s.file_offset, s.nbytes) for s in spans]
        before = host_bytes(buf, back[1].mem_offset, back[1].nbytes)
        errs = eng.read_spans(back)
    assert errs[0] is None and errs[2] is None
    assert isinstance(errs[1], IOEngineError) and "short read" in str(errs[1])
    for k in (0, 2):
        assert host_bytes(buf, back[k].mem_offset, back[k].nbytes) == want[k]
    # The short piece never reached the slab; the later, whole piece did (the span is failed either way).
    got = host_bytes(buf, back[1].mem_offset, back[1].nbytes)
    assert got[:64 * KiB] == before[:64 * KiB]


@pytest.fixture
def tiny_fs(tmp_path):
    from .conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "tiny", "1m") as mnt:
        yield mnt


@pytest.mark.parametrize("name", ["posix", "kvikio"])
def test_staged_full_disk_is_enospc(tiny_fs, name, rnd):
    _, g = rnd
    paths = pool(tiny_fs, files=2)  # 4 MiB of sparse files on a 1 MiB file system
    buf = SlabBuffer(4 * MiB, "host")
    fill_random(buf, g)
    spans = [Span(i * 512 * KiB, (i % 2) * STRIPE + (i // 2) * 512 * KiB, 512 * KiB) for i in range(8)]
    with staged(name, paths, deferred_factory(Log()), direct=False) as eng:
        eng.attach(buf)
        errs = eng.write_spans(spans)
        back = [Span(s.mem_offset, s.file_offset, s.nbytes) for s in spans]
        ok = [s for s, e in zip(back, errs) if e is None]
        want = {s.mem_offset: host_bytes(buf, s.mem_offset, s.nbytes) for s in ok}
        buf.tensor.zero_()
        assert eng.read_spans(ok) == [None] * len(ok)
    assert any(e is not None for e in errs)
    assert all(e.errno in (errno.ENOSPC, errno.EDQUOT) for e in errs if e is not None)
    for s in ok:  # every span reported written reads back exactly
        assert host_bytes(buf, s.mem_offset, s.nbytes) == want[s.mem_offset]


@pytest.mark.parametrize("how", ["raises", "wrote-nothing", "short"])
def test_posix_staged_pwrite_faults(tmp_path, monkeypatch, how, rnd):
    r, g = rnd
    paths = pool(tmp_path)
    src, dst = SlabBuffer(8 * MiB, "host"), SlabBuffer(8 * MiB, "host")
    fill_random(src, g)
    spans, _ = random_spans(r, 24, 0, max_pages=48)
    victim = r.choice([s for s in spans if s.nbytes > 64 * KiB])
    fi, local = divmod(victim.file_offset, STRIPE)
    bad_off = local + 64 * KiB  # the span's second piece
    real = os.pwritev
    bad_fds = set()

    def pwritev(fd, bufs, off):
        if off == bad_off and fd in bad_fds:
            if how == "raises":
                raise OSError(errno.EIO, "Input/output error")
            if how == "wrote-nothing":
                return 0
            return real(fd, [memoryview(bufs[0])[:PAGE]], off)  # short: the engine must finish the rest
        return real(fd, bufs, off)

    with staged("posix", paths, deferred_factory(Log())) as eng:
        bad_fds.update({eng._fds[fi], eng._dfds[fi]})
        monkeypatch.setattr(os, "pwritev", pwritev)
        eng.attach(src)
        errs = eng.write_spans(spans)
        monkeypatch.setattr(os, "pwritev", real)
        ok = [s for s, e in zip(spans, errs) if e is None]
        eng.attach(dst)
        assert eng.read_spans(ok) == [None] * len(ok)
    for s, e in zip(spans, errs):
        if s is victim and how != "short":
            assert isinstance(e, IOEngineError)
        else:
            assert e is None
    for s in ok:
        assert host_bytes(dst, s.mem_offset, s.nbytes) == host_bytes(src, s.mem_offset, s.nbytes)


@pytest.mark.parametrize("name", ["posix", "kvikio"])
def test_staged_copy_failure_fails_spans_and_the_engine_goes_on(tmp_path, name, rnd):
    r, g = rnd
    paths = pool(tmp_path)
    src = SlabBuffer(8 * MiB, "host")
    fill_random(src, g)
    spans, _ = random_spans(r, 20, 0, max_pages=40)
    factory = deferred_factory(Log(), fail_wait={3})  # copy 3 of the first lane to get there fails, once
    with staged(name, paths, factory, threads=2) as eng:
        eng.attach(src)
        errs = eng.write_spans(spans)
        assert any(e is not None for e in errs) and all(isinstance(e, IOEngineError) for e in errs if e)
        again = eng.write_spans(spans)  # the lanes go on working
        assert again == [None] * len(spans)


@pytest.mark.parametrize("name", ["posix", "kvikio"])
def test_close_races_transfers(tmp_path, name, rnd):
    # Threads put and get their own regions in a loop while close() runs: every call either completes,
    # byte-exact, or raises ClosedError; close() returns only after the calls in progress ended.
    r, g = rnd
    paths = pool(tmp_path)
    nthreads = 4
    src = SlabBuffer(8 * MiB, "host")
    fill_random(src, g)
    want = host_bytes(src, 0, 8 * MiB)
    factory = deferred_factory(Log())
    eng = staged(name, paths, factory, threads=3)
    eng.attach(src)
    region = 8 * MiB // nthreads
    started = threading.Barrier(nthreads + 1)
    outcomes = [[] for _ in range(nthreads)]

    def client(k):
        spans = [Span(k * region + j * 128 * KiB, (j % 4) * STRIPE + k * 256 * KiB + (j // 4) * 128 * KiB, 128 * KiB)
                 for j in range(8)]
        started.wait()
        while True:
            try:
                assert eng.write_spans(spans) == [None] * 8
                assert eng.read_spans(spans) == [None] * 8
            except ClosedError:
                outcomes[k].append("closed")
                return
            outcomes[k].append("ok")

    ts = [threading.Thread(target=client, args=(k,)) for k in range(nthreads)]
    for t in ts:
        t.start()
    started.wait()
    while not all(outcomes):
        threading.Event().wait(0.001)
    eng.close()
    assert all(lane.begun == lane.ended for lane in factory.lanes)  # nothing in flight once close returned
    for t in ts:
        t.join()
    assert all(o[-1] == "closed" and o.count("closed") == 1 for o in outcomes)
    # Each client read back into the very bytes it wrote from: one wrong byte read would show here.
    assert host_bytes(src, 0, 8 * MiB) == want
    with pytest.raises(ClosedError):
        eng.read_spans([Span(0, 0, PAGE)])


def test_kvikio_staging_kvikio_stages_nothing(tmp_path, rnd):
    _, g = rnd
    made = []
    eng = staged("kvikio", pool(tmp_path), lambda *a: made.append(a), staging="kvikio")
    with eng:
        buf = SlabBuffer(MiB, "host")
        fill_random(buf, g)
        eng.attach(buf)
        assert eng.write_spans([Span(0, 0, MiB)]) == [None]
        assert made == [] and eng.report().staging == ""
    with pytest.raises(IOEngineError, match="staging"):
        KvikIOEngine(pool(tmp_path, name="other"), 2, 64 * KiB, True, "host", STRIPE, staging="bounce")


class _WatchedFuture:
    def __init__(self, fut):
        self._fut, self.waited = fut, False

    def get(self):
        try:
            return self._fut.get()
        finally:
            self.waited = True

    def done(self):
        return self._fut.done()


class _WatchedFile:
    """A ``kvikio.CuFile`` whose futures say whether anyone waited for them."""

    def __init__(self, f, futs):
        self._f, self._futs = f, futs

    def _track(self, fut):
        self._futs.append(_WatchedFuture(fut))
        return self._futs[-1]

    def pwrite(self, *a):
        return self._track(self._f.pwrite(*a))

    def pread(self, *a):
        return self._track(self._f.pread(*a))

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.parametrize("write", [True, False])
def test_kvikio_interrupted_batch_waits_for_its_unstaged_futures(tmp_path, write, rnd):
    # KeyboardInterrupt in the staged part of a KvikIO batch: the spans already handed to KvikIO's pool
    # (files on another path) are waited for before the interrupt leaves the batch, never abandoned
    # while they still move slab bytes.
    _, g = rnd
    buf = SlabBuffer(2 * MiB, "host")
    fill_random(buf, g)

    def interrupt(lane, kind, k):
        if k == 0:
            raise KeyboardInterrupt

    factory = deferred_factory(Log(), on_copy=interrupt)
    futs = []
    with staged("kvikio", pool(tmp_path, files=2), factory) as eng:
        eng.attach(buf)
        eng._file_paths[1] = "kvikio-posix"  # file 1 is not staged: its spans go to KvikIO's pool at once
        real = eng._files[1]
        eng._files[1] = _WatchedFile(real, futs)
        spans = [Span(k * 128 * KiB, (k % 2) * STRIPE + (k // 2) * 128 * KiB, 128 * KiB) for k in range(12)]
        try:
            with pytest.raises(KeyboardInterrupt):
                (eng.write_spans if write else eng.read_spans)(spans)
        finally:
            eng._files[1] = real
        assert len(futs) == 6 and all(f.waited for f in futs)
        for lane in factory.lanes:
            lane.on_copy = None
        assert eng.write_spans(spans) == [None] * len(spans)  # the engine goes on


def _blocking_copy(inside: threading.Event, go: threading.Event):
    """An ``on_copy`` hook: the first lane to start its second copy stops there until ``go``."""
    lock = threading.Lock()

    def on_copy(lane, kind, k):
        with lock:
            first = k == 1 and not inside.is_set()
            if first:
                inside.set()
        if first:
            go.wait()

    return on_copy


@pytest.mark.parametrize("name", ["posix", "kvikio"])
@pytest.mark.parametrize("write", [True, False])
def test_attach_during_a_batch_leaves_it_its_lanes_and_slab(tmp_path, name, write, rnd):
    # attach() to another slab while a batch is mid-copy: the batch keeps the lanes, slots and slab it
    # started with (attach must not close them under it), and its end frees the old lanes.
    r, g = rnd
    paths = pool(tmp_path)
    a, b = SlabBuffer(4 * MiB, "host"), SlabBuffer(4 * MiB, "host")
    fill_random(a, g)
    fill_random(b, g)
    spans = [Span(k * 256 * KiB, (k % 4) * STRIPE + (k // 4) * 256 * KiB, 256 * KiB) for k in range(12)]
    log = Log()
    inside, go = threading.Event(), threading.Event()
    factory = deferred_factory(log, r.randint(0, 1 << 30))
    eng = staged(name, paths, factory, threads=2)
    with eng:
        eng.attach(a)
        if not write:  # the file holds b's bytes; the read must land in a, the slab it started with
            eng.attach(b)
            assert eng.write_spans(spans) == [None] * len(spans)
            eng.attach(a)
        b_before = host_bytes(b, 0, b.nbytes)
        old = factory.pools[-1]
        for lane in factory.lanes:
            lane.on_copy = _blocking_copy(inside, go)
        out = []
        t = threading.Thread(target=lambda: out.append((eng.write_spans if write else eng.read_spans)(spans)))
        t.start()
        try:
            inside.wait()
            eng.attach(b)  # returns at once: the batch holds its share of the old lanes
            closed_under_the_batch = [lane.closed for lane in old._all]
        finally:
            go.set()
            t.join()
        assert not any(closed_under_the_batch)
        assert out == [[None] * len(spans)] and log.violations == []
        assert all(lane.closed for lane in old._all)  # the batch's end freed the old lanes
        assert host_bytes(b, 0, b.nbytes) == b_before
        for lane in factory.lanes:
            lane.on_copy = None
        back = SlabBuffer(4 * MiB, "host")
        eng.attach(back)
        assert eng.read_spans(spans) == [None] * len(spans)
    for s in spans:
        assert host_bytes(back, s.mem_offset, s.nbytes) == host_bytes(a, s.mem_offset, s.nbytes)


@pytest.mark.parametrize("name", ["posix", "kvikio"])
def test_staged_writes_wait_for_the_default_stream_and_reads_do_not(tmp_path, name, rnd):
    # One rule for both engines: a put orders after the work queued on the legacy default stream (the
    # producer's kernels), a get does not (it would queue layer-wise loads behind the model).
    r, g = rnd
    buf = SlabBuffer(2 * MiB, "host")
    fill_random(buf, g)
    factory = deferred_factory(Log())
    spans = [Span(k * 256 * KiB, k * 256 * KiB, 256 * KiB) for k in range(8)]
    with staged(name, pool(tmp_path), factory) as eng:
        eng.attach(buf)
        for write in (True, False, True):
            for lane in factory.lanes:
                lane.afters.clear()
            assert (eng.write_spans if write else eng.read_spans)(spans) == [None] * len(spans)
            flags = [f for lane in factory.lanes for f in lane.afters]
            assert flags and all(f is write for f in flags), (write, flags)
