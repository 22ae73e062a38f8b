"""Shared mode against a real redis-server on loopback: Redis index, one writer, reader processes."""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineKey, ConfigError, LocalDiskBackend, SlabMemoryAllocator
from gds_kvcache.errors import GdsKvCacheError, StorageFullError
from gds_kvcache.units import GB, MiB

redis = pytest.importorskip("redis", reason="the 'redis' client package is not installed (pip install redis)")

from gds_kvcache.shared import LocalRedis, Published, RedisIndex, SharedDiskBackend, find_redis_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def key(i, ws=1, rank=0, model="m"):
    return CacheEngineKey("vllm", model, ws, rank, i)


def chunk_bytes(k: CacheEngineKey, n: int = 4096) -> torch.Tensor:
    """The content of chunk ``k``: random, but the same for the same key in every process."""
    g = torch.Generator().manual_seed(hash_key(k))
    return torch.randint(0, 256, (n * 4,), dtype=torch.uint8, generator=g).view(torch.float32)


def hash_key(k: CacheEngineKey) -> int:
    import zlib
    return zlib.crc32(k.to_string().encode()) + 1


@pytest.fixture(scope="module")
def server():
    url = os.environ.get("GDS_KVCACHE_REDIS_URL")
    if url:       # scripts/ci-redis.sh started one; every test has its own namespace in it
        yield FakeServer(url)
        return
    if find_redis_server() is None:
        pytest.skip("no redis-server binary: install Debian's redis-server (scripts/ci-redis.sh does) "
                    "or set GDS_KVCACHE_REDIS_SERVER")
    r = LocalRedis()
    yield r
    r.stop()


def make_cfg(path, url, disk_mib=8):
    return CacheEngineConfig(local_disk=str(path), max_local_disk_size=disk_mib * MiB / GB, io_engine="posix",
                             io_threads=2, io_task_size=256 * 1024, lookup_server_url=url)


@pytest.fixture
def ns():
    return "t" + uuid.uuid4().hex[:10]


def open_backend(tmp_path, server, ns, wid, disk_mib=8, slab_mib=16, **kw):
    alloc = SlabMemoryAllocator(slab_mib * MiB, "host")
    return SharedDiskBackend(make_cfg(tmp_path / "shared", server.url, disk_mib), None, alloc, writer_id=wid,
                             namespace=ns, **kw), alloc


def put(b, alloc, keys):
    objs = []
    for k in keys:
        o = alloc.allocate((4096,), torch.float32)
        o.tensor.copy_(chunk_bytes(k))
        objs.append(o)
    res = b.batched_put(keys, objs)
    for o in objs:
        o.ref_count_down()
    return res


def check(objs, keys):
    """Per key: True (right bytes), None (miss); wrong bytes fail the test."""
    out = []
    for o, k in zip(objs, keys):
        if o is None:
            out.append(None)
            continue
        assert torch.equal(o.tensor.view(torch.uint8), chunk_bytes(k).view(torch.uint8)), f"wrong bytes for {k}"
        o.ref_count_down()
        out.append(True)
    return out


class HeldReads:
    """Hold a backend's remote reads right after they took their leases, until ``release()``.

    Set as ``backend.remote._hold_s`` (the test knob: seconds a read sleeps while it holds
    its leases). The read's ``time.sleep(_hold_s)`` converts it with ``__index__`` (or
    ``__float__``), and that is where it waits: a test then knows a read holds its leases
    (``wait_holding``) instead of sleeping and hoping it does, and the read goes on only when
    the test is done with the extents it leases. ``on_hold`` runs in the held read first.
    Give the reader a lease longer than the hold (``lease_ttl``), or the read ends a miss.
    """

    def __init__(self, on_hold=None, timeout: float = 120.0):
        import threading

        self.count = 0
        self._on_hold = on_hold
        self._timeout = timeout
        self._lock = threading.Lock()
        self._go = threading.Event()

    def __bool__(self) -> bool:
        return True

    def __index__(self) -> int:
        with self._lock:
            self.count += 1
        if self._on_hold is not None:
            self._on_hold()
        assert self._go.wait(self._timeout), "a held read was never released"
        return 0

    def __float__(self) -> float:
        return float(self.__index__())

    def wait_holding(self, n: int = 1, timeout: float = 60.0) -> None:
        """Return once ``n`` reads hold their leases."""
        deadline = time.monotonic() + timeout
        while self.count < n:
            assert time.monotonic() < deadline, f"only {self.count} of {n} reads took leases in {timeout} s"
            time.sleep(0.005)

    def release(self) -> None:
        self._go.set()


# -- config ------------------------------------------------------------------------------------
def test_config_lookup_server_url_default_alias_and_validation(monkeypatch):
    assert CacheEngineConfig().lookup_server_url is None
    assert CacheEngineConfig.from_dict({"lookup_url": "redis://h:6379/0"}).lookup_server_url == "redis://h:6379/0"
    env = {"LMCACHE_LOOKUP_URL": " redis://h:1 "}
    assert CacheEngineConfig.from_env(env).lookup_server_url == "redis://h:1"
    assert CacheEngineConfig.from_env({"GDS_KVCACHE_LOOKUP_SERVER_URL": "none"}).lookup_server_url is None
    for bad in ("h:6379", "http://h", 5, "redis://"):
        with pytest.raises(ConfigError) as ei:
            CacheEngineConfig(lookup_server_url=bad)
        assert ei.value.field == "lookup_server_url"
    with pytest.raises(ConfigError):
        CacheEngineConfig.from_dict({"lookup_url": "redis://a:1", "lookup_server_url": "redis://b:1"})


def test_shared_backend_needs_url(tmp_path):
    cfg = CacheEngineConfig(local_disk=str(tmp_path), max_local_disk_size=8 * MiB / GB, io_engine="posix")
    with pytest.raises(ConfigError):
        SharedDiskBackend(cfg, None, SlabMemoryAllocator(MiB, "host"))


def test_local_mode_needs_no_redis(tmp_path):
    # A config with no lookup_server_url is the old local backend: no Redis, no writers/ subdirectory.
    cfg = CacheEngineConfig(local_disk=str(tmp_path / "d"), max_local_disk_size=8 * MiB / GB, io_engine="posix")
    alloc = SlabMemoryAllocator(4 * MiB, "host")
    b = LocalDiskBackend(cfg, None, alloc)
    try:
        o = alloc.allocate((4096,), torch.float32)
        o.tensor.copy_(chunk_bytes(key(1)))
        b.insert_key(key(1), o)
        o.ref_count_down()
        assert check([b.get_blocking(key(1))], [key(1)]) == [True]
    finally:
        b.close()
    assert not os.path.exists(tmp_path / "d" / "writers")


# -- one writer, one reader ----------------------------------------------------------------------
def test_publish_after_durable_entries_match_the_writers_index(tmp_path, server, ns):
    w, alloc = open_backend(tmp_path, server, ns, "w0")
    try:
        keys = [key(i) for i in range(20)]
        assert put(w, alloc, keys) == [16384] * 20
        assert w.batched_contains(keys) == 20
        r = RedisIndex(server.url, ns)
        pubs, leased = r.acquire("t:1", [k.to_string() for k in keys])
        for k, p in zip(keys, pubs):
            e = w.local.entry(k)
            assert (p.writer, p.generation, p.offset, p.nbytes, p.checksum) == ("w0", str(e.seq), e.offset,
                                                                                e.nbytes, e.checksum)
            assert p.shape == (4096,) and p.dtype == w.local.entry(k).dtype
        r.release("t:1", leased)
        r.close()
        assert w.remove(keys[3]) and w.batched_contains(keys) == 3
        assert w.remove(keys[3]) is False     # idempotent
    finally:
        w.close()


READER = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from tests.test_shared_backend import open_backend, key, check, FakeServer
import pathlib
b, alloc = open_backend(pathlib.Path({tmp!r}), FakeServer({url!r}), {ns!r}, {wid!r})
keys = [key(i) for i in range({n})]
print(json.dumps({{"prefix": b.batched_contains(keys), "got": check(b.batched_get_blocking(keys), keys),
                  "stats": b.stats}}))
b.close()
"""


class FakeServer:
    def __init__(self, url):
        self.url = url


def run_reader(tmp_path, server, ns, wid, n):
    code = READER.format(root=ROOT, tmp=str(tmp_path), url=server.url, ns=ns, wid=wid, n=n)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "error"})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_reader_process_reads_writer_files_byte_exact(tmp_path, server, ns):
    w, alloc = open_backend(tmp_path, server, ns, "w0")
    try:
        keys = [key(i) for i in range(30)]
        put(w, alloc, keys)
        out = run_reader(tmp_path, server, ns, "r1", 30)
        assert out["prefix"] == 30 and out["got"] == [True] * 30
        assert out["stats"]["remote_hits"] == 30 and out["stats"]["puts"] == 0
        # the reader wrote nothing into the writer's directory, only its own (empty) one
        assert sorted(os.listdir(tmp_path / "shared" / "writers")) == ["r1", "w0"]
    finally:
        w.close()
    # after the writer closed, its files stay readable and its entries published
    out = run_reader(tmp_path, server, ns, "r1", 30)
    assert out["got"] == [True] * 30


def test_restarted_writer_republishes_and_purges_stale_entries(tmp_path, server, ns):
    w, alloc = open_backend(tmp_path, server, ns, "w0")
    keys = [key(i) for i in range(10)]
    put(w, alloc, keys)
    w.close()
    r = RedisIndex(server.url, ns)
    # An entry the writer's log does not have (say, removed here before a crash, never retracted).
    r.publish("w0", [Published(key(99).to_string(), "w0", "12345", 0, 16384, 16384, (4096,), "float32",
                               "KV_2LTD", 1)])
    assert r.count() == 11
    w, alloc = open_backend(tmp_path, server, ns, "w0")
    try:
        assert r.count() == 10 and w.batched_contains(keys) == 10 and w.batched_contains([key(99)]) == 0
    finally:
        w.close()
        r.close()


def test_redis_restart_rebuilt_from_index_logs(tmp_path, ns):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary")
    with LocalRedis() as srv:
        w, alloc = open_backend(tmp_path, srv, ns, "w0", tick=0.05)
        rd, ralloc = open_backend(tmp_path, srv, ns, "r1", tick=0.05)
        try:
            keys = [key(i) for i in range(50)]
            put(w, alloc, keys)
            srv.restart()       # empty: the writer notices within a tick and re-publishes
            deadline = time.monotonic() + 30
            while rd.batched_contains(keys) < 50 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rd.batched_contains(keys) == 50
            assert check(rd.batched_get_blocking(keys), keys) == [True] * 50
            # rebuild on request: wipe the entries, ask, and they come back
            RedisIndex(srv.url, ns).client.flushdb()
            r = RedisIndex(srv.url, ns)
            r.set_epoch()
            w.pub.epoch = r.epoch()          # the same server: only the request brings them back
            rd.pub.epoch = r.epoch()
            r.request_rebuild()
            deadline = time.monotonic() + 30
            while rd.batched_contains(keys) < 50 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rd.batched_contains(keys) == 50
            r.close()
        finally:
            w.close()
            rd.close()


def test_redis_down_lookups_miss_puts_stay_local(tmp_path, ns):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary")
    srv = LocalRedis()
    w, alloc = open_backend(tmp_path, srv, ns, "w0", tick=0.05)
    try:
        srv.kill()
        keys = [key(i) for i in range(5)]
        assert put(w, alloc, keys) == [16384] * 5     # stored here, published later
        assert w.batched_contains(keys) == 0
        assert check(w.batched_get_blocking(keys), keys) == [True] * 5
        used = w.local.index.used
        assert w.remove(keys[0]) is True              # gone here at once...
        assert w.local.index.used == used             # ...but its extent waits for Redis to hear of it
        assert put(w, alloc, [keys[0]]) == [16384]    # stored again elsewhere, not over those bytes
        assert w.local.index.used == used + 16384
        assert w.stats["redis_errors"] > 0 and w.stats["lookup_errors"] == 0   # no warning per put
        srv.start()
        deadline = time.monotonic() + 30
        while (w.batched_contains(keys) < 5 or w.local.index.used > used) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.batched_contains(keys) == 5
        # Retracted, then held one lease period more (an empty Redis forgot its leases), then reused.
        assert w.local.index.used == used
        assert check(w.batched_get_blocking(keys), keys) == [True] * 5
    finally:
        w.close()
        srv.stop()


# -- duplicates, leases, generations -----------------------------------------------------------------
def test_claim_nx_two_writers_write_a_key_once(tmp_path, server, ns):
    a, aa = open_backend(tmp_path, server, ns, "a")
    b, ba = open_backend(tmp_path, server, ns, "b")
    try:
        r = RedisIndex(server.url, ns)
        assert r.claim("a", [key(1).to_string()]) == [True]       # a's put is in flight
        assert put(b, ba, [key(1), key(2)]) == [None, 16384]       # b skips key 1
        assert put(a, aa, [key(1)]) == [16384]
        assert put(a, aa, [key(2)]) == [None]                      # published by b: skipped
        assert b.local.entry(key(1)) is None and a.local.entry(key(2)) is None
        assert b.stats["claims_lost"] == 1
        assert check(b.batched_get_blocking([key(1)]), [key(1)]) == [True]
        r.close()
    finally:
        a.close()
        b.close()


def test_leased_extent_is_not_reused_until_the_lease_ends(tmp_path, server, ns):
    # A reader leases a chunk; the writer removes it and fills its pool many times over. While the
    # lease lasts the extent keeps its bytes. Only what the lease guarantees is asserted: a check
    # that may fall after the lease ended (a stalled, loaded machine) is skipped, never failed.
    lease = 3.0
    w, alloc = open_backend(tmp_path, server, ns, "w0", disk_mib=1, lease_ttl=2.0, tick=0.05)
    try:
        keys = [key(i) for i in range(8)]
        put(w, alloc, keys)
        e = w.local.entry(keys[0])
        path, off = w.local.locate(e.offset)
        with open(path, "rb") as f:
            f.seek(off)
            before = f.read(e.nbytes)
        r = RedisIndex(server.url, ns, lease_ttl=lease)
        t0 = time.monotonic()                  # the lease ends no sooner than t0 + lease
        _, leased = r.acquire("reader:1", [keys[0].to_string()])
        assert w.remove(keys[0])
        if time.monotonic() < t0 + lease:
            assert w.stats["leased_evictions"] == 1    # retracted while leased: quarantined, not freed
        assert r.acquire("reader:2", [keys[0].to_string()]) == ([None], [])     # retracted: new readers miss
        # 240 chunks of 16 KiB through a 1 MiB pool: eviction is forced by construction.
        checks = 0
        for rnd in range(4):
            put(w, alloc, [key(1000 + 100 * rnd + i) for i in range(60)])
            if time.monotonic() < t0 + lease:   # every put so far ran under the lease
                with open(path, "rb") as f:
                    f.seek(off)
                    assert f.read(e.nbytes) == before, f"leased extent overwritten in round {rnd}"
                checks += 1
        print(f"leased extent intact at {checks} of 4 checks made under the lease")
        assert w.stats["shared_evictions"] > 0
        r.release("reader:1", leased)
        deadline = time.monotonic() + 30       # freed by housekeeping once the lease time is over
        while w.eviction.quarantine_ends() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not w.eviction.quarantine_ends() and w.memcheck()
        r.close()
    finally:
        w.close()


def test_expired_lease_is_a_miss_not_bytes(tmp_path, server, ns):
    w, alloc = open_backend(tmp_path, server, ns, "w0")
    rd, _ = open_backend(tmp_path, server, ns, "r1", lease_ttl=0.2)
    # Reads again with a lease no loaded machine outlives (a 0.2 s one could expire again).
    rd2, _ = open_backend(tmp_path, server, ns, "r2", lease_ttl=60.0)
    try:
        put(w, alloc, [key(1)])
        rd.remote._hold_s = 0.4          # a reader stalled past its lease: late by construction
        assert rd.batched_get_blocking([key(1)]) == [None]
        assert rd.stats["lease_expired"] == 1
        # The late read cost nothing: the chunk is still there and readable.
        assert check(rd2.batched_get_blocking([key(1)]), [key(1)]) == [True]
    finally:
        w.close()
        rd.close()
        rd2.close()


def test_new_generation_and_corrupt_bytes_are_misses(tmp_path, server, ns):
    w, alloc = open_backend(tmp_path, server, ns, "w0")
    rd, _ = open_backend(tmp_path, server, ns, "r1")
    try:
        put(w, alloc, [key(1), key(2)])
        g1 = w.local.entry(key(1)).seq
        w.remove(key(1))
        put(w, alloc, [key(1)])
        assert w.local.entry(key(1)).seq != g1
        r = RedisIndex(server.url, ns)
        # A removal event of the old generation must not retract the new one.
        assert r.retract("w0", r.epoch(), [(key(1).to_string(), str(g1))]) == (True, [0])
        assert w.batched_contains([key(1)]) == 1
        # Corrupt key 2's bytes in the writer's file: the checksum turns the read into a miss.
        e = w.local.entry(key(2))
        path, off = w.local.locate(e.offset)
        with open(path, "r+b") as f:
            f.seek(off + 100)
            b = f.read(1)
            f.seek(off + 100)
            f.write(bytes([b[0] ^ 0xFF]))
        assert rd.batched_get_blocking([key(2)]) == [None]
        assert rd.stats["remote_corrupt"] == 1
        assert check(rd.batched_get_blocking([key(1)]), [key(1)]) == [True]
        r.close()
    finally:
        w.close()
        rd.close()


def test_tp_lookup_counts_a_chunk_only_when_every_rank_has_it(tmp_path, server, ns):
    ranks = [open_backend(tmp_path, server, ns, f"rank{r}") for r in range(4)]
    try:
        chunks = list(range(6))
        for r, (b, alloc) in enumerate(ranks):
            put(b, alloc, [key(c, 4, r) for c in chunks if not (r == 3 and c == 4)])
        for r, (b, _) in enumerate(ranks):
            assert b.batched_contains([key(c, 4, r) for c in chunks]) == 4
        b3, a3 = ranks[3]
        put(b3, a3, [key(4, 4, 3)])
        assert all(b.batched_contains([key(c, 4, r) for c in chunks]) == 6 for r, (b, _) in enumerate(ranks))
    finally:
        for b, _ in ranks:
            b.close()


# -- shared mode through the config: StorageManager and CacheEngine -----------------------------------
def engine_setup(tmp_path, url, device="cpu", engine="posix", **kw):
    from gds_kvcache import CacheEngineMetadata
    L, h, d, chunk = 3, 2, 16, 32
    cfg = CacheEngineConfig(chunk_size=chunk, local_disk=str(tmp_path / "shared"), max_local_disk_size=16 * MiB / GB,
                            max_local_cpu_size=2 * MiB / GB, slab_size=8 * MiB / GB, io_engine=engine,
                            memory_device="cuda" if device == "cuda" else "host", io_threads=2,
                            lookup_server_url=url, **kw)
    md = CacheEngineMetadata("org/model", 1, 0, "vllm", torch.bfloat16, (L, 2, chunk, h, d))
    return cfg, md


@pytest.mark.parametrize("device,engine", [("cpu", "posix"), ("cpu", "kvikio"),
                                           pytest.param("cuda", "kvikio", marks=pytest.mark.gpu),
                                           pytest.param("cuda", "posix", marks=pytest.mark.gpu)])
def test_cache_engine_shared_mode_one_field(tmp_path, server, device, engine):
    # Two engines (two writers) given the same directory and URL: what one stores, the other finds
    # with one lookup and retrieves byte-exact from the first one's files.
    from gds_kvcache.engine import CacheEngine
    from gds_kvcache.storage import StorageManager

    from .kernel_cases import make_cache, ref_rows, zeros_like_cache
    from .helpers import same_bytes

    # A KvikIO case skips where KvikIO cannot run (conftest's _kvikio_cases decides for every test).
    cfg, md = engine_setup(tmp_path, server.url, device, engine)
    kv = make_cache("vllm", 3, 40, 8, 2, 16, torch.bfloat16, device)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 50000, (150,), generator=gen)
    slots = torch.randperm(320, generator=gen)[:150].to(device)
    with CacheEngine(cfg, md, "vllm") as a, CacheEngine(cfg, md, "vllm") as b:
        assert isinstance(a.storage.disk, SharedDiskBackend) and isinstance(b.storage.disk, SharedDiskBackend)
        assert a.storage.disk.writer != b.storage.disk.writer
        assert a.storage.disk.namespace == b.storage.disk.namespace     # from the directory's cache-id
        assert b.lookup(tokens) == 0
        r = a.store(tokens, kv, slots)
        for f in r.futures:
            f.result()                    # resolved only once published: visible everywhere now
        assert int(r) == 150
        assert b.lookup(tokens) == 150
        assert int(b.store(tokens, kv, slots)) == 0           # stored by a: b skips it
        kv2 = zeros_like_cache("vllm", kv)
        slots2 = torch.randperm(320, generator=gen)[:150].to(device)
        b.prefetch(tokens)
        assert b.retrieve(tokens, kv2, slots2) == 150
        assert same_bytes(ref_rows("vllm", kv2, slots2), ref_rows("vllm", kv, slots))
        st = b.storage.disk.stats
        assert st["remote_hits"] >= 5 and st["remote_corrupt"] == 0 and st["puts"] == 0
        assert str(b.storage.allocator.device).startswith(device)
        assert all(type(tr.engine).__name__.lower().startswith(engine) and tr.engine.read_only
                   for _, tr in b.storage.disk.remote._readers.values())
        assert a.storage.disk.stats["puts"] == 5
        # A remove by the writer that owns the chunks is seen by the other at once.
        keys = [k for k, _, _ in a._keys(tokens.tolist())]
        assert a.storage.remove(keys[2]) is True
        b.storage.hot.evict_unused(1 << 40)    # b's hot copies stay valid (a key names its bytes)
        assert b.lookup(tokens) == 64
        a.storage.memcheck()
        b.storage.memcheck()
    # Local mode on its own directory is untouched: no writers/ subdirectory, no cache-id.
    local = cfg.replace(lookup_server_url=None, local_disk=str(tmp_path / "local"))
    with StorageManager(local) as sm:
        assert type(sm.disk).__name__ == "LocalDiskBackend"
    assert sorted(os.listdir(tmp_path / "shared")) == ["cache-id", "cache-id.origin", "writers"]
    assert "writers" not in os.listdir(tmp_path / "local")


NO_LIBCUDA = r"""
import ctypes

_CDLL = ctypes.CDLL


class _NoLibcuda(_CDLL):
    def __init__(self, name, *a, **kw):
        if name is not None and "libcuda.so" in str(name):
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        super().__init__(name, *a, **kw)


ctypes.CDLL = _NoLibcuda
"""

#: Every module with a KvikIO-parametrized case (grep for "kvikio" in tests/).
KVIKIO_MODULES = ["tests/test_shared_backend.py", "tests/test_engine.py", "tests/test_disk_backend.py",
                  "tests/test_io_engines.py", "tests/test_io_readonly.py", "tests/test_io_spans.py",
                  "tests/test_never_wrong.py", "tests/test_reliability.py", "tests/test_gpu.py"]


def test_kvikio_cases_skip_naming_the_loader_error_without_libcuda(tmp_path, server):
    # A plain `pytest` in a venv, where libcuda.so.1 cannot be loaded (no scripts/run-tests.sh to
    # put a fetched one on LD_LIBRARY_PATH): every KvikIO case must skip with the loader's
    # error, never fail (the shared-mode one used to: it only asked whether kvikio imports).
    # The child's ctypes cannot load libcuda.so.1 even where a driver is installed. (It leaves out
    # this test: "loader_error" is in its name.)
    import xml.etree.ElementTree as ET

    (tmp_path / "no_libcuda.py").write_text(NO_LIBCUDA)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "CI")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
    env["GDS_KVCACHE_REDIS_URL"] = server.url
    junit = tmp_path / "junit.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no_libcuda",
                        "-k", "kvikio and not loader_error", f"--junitxml={junit}", *KVIKIO_MODULES], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=450)
    assert junit.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    cases = {}
    for tc in ET.parse(junit).iter("testcase"):
        name = tc.get("name")
        if "[" in name and "kvikio" in name[name.index("["):]:   # parametrized with "kvikio"
            outcome = [c for c in tc if c.tag in ("skipped", "failure", "error")]
            cases[f"{tc.get('classname')}::{name}"] = (outcome[0].tag, outcome[0].get("message", "")) \
                if outcome else ("passed", "")
    assert len(cases) >= 20, (sorted(cases), p.stdout[-3000:])
    assert "tests.test_shared_backend::test_cache_engine_shared_mode_one_field[cpu-kvikio]" in cases
    bad = {c: o for c, o in cases.items()
           if not (o[0] == "skipped" and (o[1].startswith("KvikIO needs libcuda.so.1: libcuda.so.1: cannot open")
                                          or o[1].startswith("needs a CUDA GPU")))}
    assert bad == {}, bad


def test_storage_manager_lookup_is_one_round_trip(tmp_path, server, monkeypatch):
    from gds_kvcache.storage import StorageManager

    cfg, _ = engine_setup(tmp_path, server.url)
    with StorageManager(cfg) as sm:
        keys = [key(i) for i in range(64)]
        objs = sm.batched_allocate([(4096,)] * 64, torch.float32)
        for o, k in zip(objs, keys):
            o.tensor.copy_(chunk_bytes(k))
        for f in sm.batched_submit_put_task(keys, objs):
            f.result()
        calls = []
        real = sm.disk.redis.prefix
        monkeypatch.setattr(sm.disk.redis, "prefix", lambda chunks: calls.append(len(chunks)) or real(chunks))
        sm.hot.evict_unused(1 << 40)
        assert sm.batched_contains(keys + [key(999)]) == 64
        assert calls == [65]


def test_storage_manager_shared_mode_refuses_a_second_lookup_server(tmp_path, server):
    from gds_kvcache.storage import LookupServerInterface, StorageManager

    class Dummy(LookupServerInterface):
        def insert(self, key): pass
        def remove(self, key): pass
        def lookup(self, key): return False

    cfg, _ = engine_setup(tmp_path, server.url)
    with pytest.raises(ConfigError, match="lookup_server"):
        StorageManager(cfg, lookup_server=Dummy())
    with pytest.raises(ConfigError, match="local_disk"):
        StorageManager(cfg.replace(local_disk=None))


def test_full_file_system_evicts_through_redis_never_under_a_reader(tmp_path, server):
    # The writer's budget is larger than its file system: ENOSPC mid-put evicts LRU chunks, each
    # retracted from Redis before its blocks are punched and reused; the reader on the same
    # directory only ever gets a chunk's own bytes or a miss.
    from .conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "tiny", "3m") as mnt:
        cfg = CacheEngineConfig(local_disk=str(mnt), max_local_disk_size=16 * MiB / GB, io_engine="posix",
                                io_threads=2, lookup_server_url=server.url, pool_files=1)
        w = SharedDiskBackend(cfg, None, walloc := SlabMemoryAllocator(8 * MiB, "host"), writer_id="w", tick=0.05)
        r = SharedDiskBackend(cfg.replace(max_local_disk_size=1 * MiB / GB), None,
                              SlabMemoryAllocator(8 * MiB, "host"), writer_id="r", tick=0.05)
        try:
            keys = [key(i) for i in range(300)]          # 300 x 16 KiB: 4.7 MiB, past what is left
            results = []
            for i in range(0, len(keys), 8):
                results += put(w, walloc, keys[i:i + 8])
                check(r.batched_get_blocking(keys[max(0, i - 16):i + 8]), keys[max(0, i - 16):i + 8])
            assert all(x == 16384 for x in results), results
            assert w.stats["shared_evictions"] > 0 and w.stats["retracted"] >= w.stats["shared_evictions"]
            listed = [k for k, p in zip(keys, w.redis.acquire("t:x", [k.to_string() for k in keys])[0])
                      if p is not None]
            assert set(listed) == set(w.keys())           # evicted chunks are retracted, none left listed
            assert check(r.batched_get_blocking(listed), listed) == [True] * len(listed)
            assert r.stats["remote_corrupt"] == 0
            w.memcheck()
        finally:
            r.close()
            w.close()


def test_close_waits_for_remote_reads_in_flight_then_refuses_calls(tmp_path, server, ns):
    import threading

    from gds_kvcache.errors import ClosedError

    w, walloc = open_backend(tmp_path, server, ns, "w")
    r, _ = open_backend(tmp_path, server, ns, "r", lease_ttl=60.0)     # no loaded machine outlives it
    hold = HeldReads()
    closer = None
    try:
        keys = [key(i) for i in range(8)]
        assert put(w, walloc, keys) == [16384] * 8
        r.remote._hold_s = hold                      # each read stops holding its leases (and engines)
        got = []
        t = threading.Thread(target=lambda: got.append(check(r.batched_get_blocking(keys), keys)))
        t.start()
        fut = r.batched_submit_prefetch_task(keys)
        hold.wait_holding(2)                         # both reads are in flight now, not merely started
        closer = threading.Thread(target=r.close)
        closer.start()
        deadline = time.monotonic() + 60             # close has begun once new calls are refused...
        while True:
            try:
                r.batched_contains(keys)
            except ClosedError:
                break
            assert time.monotonic() < deadline, "close never started refusing calls"
            time.sleep(0.005)
        assert closer.is_alive()                     # ...and must wait for both reads, held until now
        hold.release()
        closer.join(60)
        t.join(60)
        assert not closer.is_alive() and not t.is_alive()
        assert got == [[True] * 8] and check(fut.result(), keys) == [True] * 8
        o = walloc.allocate((4096,), torch.float32)
        for call in (lambda: r.batched_get_blocking(keys), lambda: r.batched_contains(keys),
                     lambda: r.batched_submit_prefetch_task(keys), lambda: r.remove(keys[0]),
                     lambda: r.batched_put(keys[:1], [o])):
            with pytest.raises(ClosedError):
                call()
        o.ref_count_down()
        r.close()                             # idempotent
    finally:
        hold.release()
        if closer is not None:
            closer.join(60)
        w.close()
        r.close()


# -- regressions from the adversarial review -------------------------------------------------------------
def test_tp_lookup_never_counts_this_ranks_hot_copy_alone(tmp_path, server):
    # Rank 0 stored its shards (they sit in its hot tier too); rank 1 stored nothing: both say 0.
    from gds_kvcache.storage import StorageManager

    cfg, _ = engine_setup(tmp_path, server.url)
    with StorageManager(cfg) as r0, StorageManager(cfg) as r1:
        k0 = [key(i, ws=2, rank=0) for i in range(4)]
        objs = r0.batched_allocate([(4096,)] * 4, torch.float32)
        for o, k in zip(objs, k0):
            o.tensor.copy_(chunk_bytes(k))
        for f in r0.batched_submit_put_task(k0, objs):
            f.result()
        assert all(r0.hot.contains(k) for k in k0)
        assert r0.batched_contains(k0) == 0 and not r0.contains(k0[0])
        assert r1.batched_contains([key(i, ws=2, rank=1) for i in range(4)]) == 0
        k1 = [key(i, ws=2, rank=1) for i in range(2)]
        objs = r1.batched_allocate([(4096,)] * 2, torch.float32)
        for o, k in zip(objs, k1):
            o.tensor.copy_(chunk_bytes(k))
        for f in r1.batched_submit_put_task(k1, objs):
            f.result()
        assert r0.batched_contains(k0) == 2 and r1.batched_contains([key(i, ws=2, rank=1) for i in range(4)]) == 2
        # Mixed world sizes in one lookup are answered, not an assertion error.
        assert r0.disk.batched_exists([k0[0], key(9)]) == [True, False]


def test_a_failed_or_skipped_put_gives_its_claim_back(tmp_path, server, ns):
    a, aa = open_backend(tmp_path, server, ns, "a", disk_mib=1)
    b, ba = open_backend(tmp_path, server, ns, "b")
    try:
        big = aa.allocate((a.capacity_bytes // 4 + 1024,), torch.float32)     # can never fit a's pool
        big.tensor.copy_(torch.rand(big.tensor.numel()))
        [f] = a.batched_submit_put_task([key(1)], [big])
        with pytest.raises(StorageFullError):
            f.result()
        big.ref_count_down()
        assert a.redis.client.exists(f"{ns}:c:{key(1).to_string()}") == 0
        with pytest.raises(GdsKvCacheError):
            a.batched_submit_put_task([key(2)], ["not a chunk"])
        assert a.redis.client.exists(f"{ns}:c:{key(2).to_string()}") == 0
        assert put(b, ba, [key(1), key(2)]) == [16384, 16384]        # b may store both at once
        assert b.stats["claims_lost"] == 0
    finally:
        a.close()
        b.close()


def test_a_malformed_entry_or_unreadable_layout_is_a_miss_and_its_lease_ends(tmp_path, server, ns):
    import redis as redis_pkg

    w, walloc = open_backend(tmp_path, server, ns, "w")
    r, _ = open_backend(tmp_path, server, ns, "r")
    try:
        keys = [key(i) for i in range(3)]
        assert put(w, walloc, keys) == [16384] * 3
        w.redis.client.hset(f"{ns}:e:{keys[0].to_string()}", "o", "zz")       # garbage offset
        w.redis.client.hset(f"{ns}:e:{keys[1].to_string()}", "sh", "4,x")     # garbage shape
        assert check(r.batched_get_blocking(keys), keys) == [None, None, True]
        assert check(r.batched_submit_prefetch_task(keys).result(), keys) == [None, None, True]
        r.remote.drain()                                     # the releases queued before have run
        e = w.local.entry(keys[0])
        assert w.redis.client.zcard(f"{ns}:l:w:{e.seq}") == 0

        def broken(*a):
            raise redis_pkg.TimeoutError("injected")
        r.remote._readers.clear()
        r.redis.layout = broken
        assert r.batched_get_blocking([keys[2]]) == [None]
        assert r.stats["redis_errors"] >= 1
    finally:
        w.close()
        r.close()


def test_eviction_skips_chunks_other_processes_are_reading(tmp_path, server, ns):
    import threading

    w, walloc = open_backend(tmp_path, server, ns, "w", disk_mib=1)
    r, _ = open_backend(tmp_path, server, ns, "r", lease_ttl=60.0)     # no loaded machine outlives it
    hold = HeldReads()
    try:
        n = w.capacity_bytes // 16384
        old = [key(i) for i in range(n)]
        for i in range(0, n, 8):
            assert all(x == 16384 for x in put(w, walloc, old[i:i + 8]))
        r.remote._hold_s = hold
        got = []
        t = threading.Thread(target=lambda: got.append(check(r.batched_get_blocking(old[:8]), old[:8])))
        t.start()
        hold.wait_holding()                                # r leases the 8 LRU chunks, until released
        assert all(x == 16384 for x in put(w, walloc, [key(1000 + i) for i in range(8)]))
        left = [k for k in old if w.entry(k) is not None]
        assert len(left) == n - 8 and all(w.entry(k) is not None for k in old[:8])   # the read ones stay
        assert w.stats["leased_skips"] >= 8 and w.stats["leased_evictions"] == 0
        hold.release()
        t.join(60)
        assert got == [[True] * 8]                         # and the reader got their bytes
    finally:
        hold.release()
        w.close()
        r.close()


def test_redis_restart_during_a_retract_keeps_the_extent_for_a_lease_period(tmp_path, ns):
    # Redis restarts (empty: every lease forgotten) while a reader holds a lease on a chunk the
    # writer removes: the writer must not reuse that extent for one lease period. Only what that
    # guarantees is asserted: if a stall pushed the put past the period, reuse is allowed.
    import threading

    if find_redis_server() is None:
        pytest.skip("no redis-server binary")
    lease = 2.0
    srv = LocalRedis()
    w, walloc = open_backend(tmp_path, srv, ns, "w", lease_ttl=lease)
    r, _ = open_backend(tmp_path, srv, ns, "r", lease_ttl=lease)
    hold = HeldReads()
    try:
        k0, k1 = key(0), key(1)
        put(w, walloc, [k0])
        off0 = w.entry(k0).offset
        check(r.batched_get_blocking([k0]), [k0])
        r.remote._hold_s = hold
        res = {}
        t = threading.Thread(target=lambda: res.setdefault("o", r.batched_get_blocking([k0])))
        t.start()
        hold.wait_holding()                    # r holds its lease on k0 from here on
        real = w.redis.retract

        def retract(*a, **kw):                 # the server restarts (empty) just before this call
            srv.restart()
            w.redis.retract = real
            return real(*a, **kw)
        w.redis.retract = retract
        t0 = time.monotonic()                  # the restart is seen after this: no reuse before t0 + lease
        assert w.remove(k0)
        put(w, walloc, [k1])
        in_period = time.monotonic() < t0 + lease
        if in_period:
            assert w.entry(k1) is None or w.entry(k1).offset != off0    # not over the leased bytes
        hold.release()
        t.join(60)
        assert check(res["o"], [k0]) in ([True], [None])               # never wrong bytes
        if in_period:
            assert r.stats["remote_corrupt"] == 0                       # k0's bytes were never touched
    finally:
        hold.release()
        r.close()
        w.close()
        srv.stop()


def test_bad_urls_and_cache_ids_are_the_librarys_errors(tmp_path, server):
    from gds_kvcache.errors import StorageUnavailableError
    from gds_kvcache.storage import StorageManager

    for url in ("redis://127.0.0.1:99999/0", "redis://h:abc/0", "redis://h:1?db=abc", "redis://h/x", "unix://"):
        with pytest.raises(ConfigError) as ei:
            CacheEngineConfig(lookup_server_url=url)
        assert ei.value.field == "lookup_server_url"
    cfg, _ = engine_setup(tmp_path, server.url.rsplit("/", 1)[0] + "/99999")    # no such database
    with pytest.raises(ConfigError, match="lookup_server_url"):
        StorageManager(cfg)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cache-id").mkdir()
    with pytest.raises(StorageUnavailableError, match="cache-id"):
        StorageManager(engine_setup(tmp_path, server.url)[0].replace(local_disk=str(tmp_path / "a")))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cache-id").write_text("")
    with pytest.raises(ConfigError, match="delete that file"):
        StorageManager(engine_setup(tmp_path, server.url)[0].replace(local_disk=str(tmp_path / "b")))
    (tmp_path / "c").write_text("a file")
    with pytest.raises(StorageUnavailableError):
        StorageManager(engine_setup(tmp_path, server.url)[0].replace(local_disk=str(tmp_path / "c")))


def test_republish_and_rebuild_requests_refused_after_close(tmp_path, server, ns):
    from gds_kvcache.errors import ClosedError

    w, _ = open_backend(tmp_path, server, ns, "w")
    w.close()
    with pytest.raises(ClosedError):
        w.republish()
    with pytest.raises(ClosedError):
        w.request_rebuild()


WRITER = r"""
import sys
sys.path.insert(0, {root!r})
import pathlib
from tests.test_shared_backend import open_backend, key, put, FakeServer
b, alloc = open_backend(pathlib.Path({tmp!r}), FakeServer({url!r}), {ns!r}, "w", lease_ttl=6.0)
print("ready", flush=True)
for line in sys.stdin:
    op, n = line.split()
    ks = [key(i) for i in range(int(n))]
    if op == "put":
        print(sum(isinstance(r, int) for r in put(b, alloc, ks)), flush=True)
    else:
        print(sum(b.remove(k) for k in ks), flush=True)
"""


def test_a_writer_killed_and_restarted_keeps_bytes_readers_lease(tmp_path, server, ns):
    # The writer removes chunks a reader is reading (their extents wait for the leases), dies
    # (SIGKILL) and restarts on its directory at once: the restart must not punch or reuse them.
    # The read is held (not slept) until the new run has registered, so it reads while that run
    # exists; what must hold is asserted: never wrong bytes, and every chunk's own bytes if the
    # read ended within its lease (a machine too loaded for that makes the misses legal).
    import signal
    import threading

    lease = 10.0                        # > a loaded machine's start of the new writer process
    code = WRITER.format(root=ROOT, tmp=str(tmp_path), url=server.url, ns=ns)

    def spawn():
        return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)

    def ready(p):
        assert p.stdout.readline().strip() == "ready"
        return p

    def cmd(p, line):
        p.stdin.write(line + "\n")
        p.stdin.flush()
        return int(p.stdout.readline())

    def kill(p):
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdin.close()
        p.stdout.close()

    w = ready(spawn())
    r, _ = open_backend(tmp_path, server, ns, "r", lease_ttl=lease)
    hold = HeldReads()
    try:
        keys = [key(i) for i in range(10)]
        assert cmd(w, "put 10") == 10
        # The reader has the writer's files open already (else, once the restarted writer has
        # registered its new run, it would not even open the old one's files: misses, not a test).
        assert check(r.batched_get_blocking(keys), keys) == [True] * 10
        boot = r.redis.layout("w").get("boot")
        r.remote._hold_s = hold                # the next read stops holding its leases
        res = {}
        t0 = time.monotonic()                  # the read's leases end no sooner than t0 + lease
        t = threading.Thread(target=lambda: res.setdefault("o", r.batched_get_blocking(keys)))
        t.start()
        hold.wait_holding()
        assert cmd(w, "remove 10") == 10
        kill(w)
        w = spawn()                            # back while the reader still holds its leases
        # Read once the new run registered (it waits out the leases before reusing anything), or
        # 2 s before the leases end at the latest.
        while r.redis.layout("w").get("boot") == boot and time.monotonic() < t0 + lease - 2:
            time.sleep(0.02)
        hold.release()
        t.join(60)
        in_lease = time.monotonic() < t0 + lease
        got = check(res["o"], keys)            # right bytes or misses, never wrong bytes
        if in_lease:
            assert got == [True] * 10 and r.stats["remote_corrupt"] == 0
        ready(w)
    finally:
        hold.release()
        kill(w)
        r.close()


def test_entries_of_a_writers_earlier_run_are_never_leased(tmp_path, server, ns):
    # A restarting writer registers its new run first; from then on no reader can lease (and so
    # read) an entry of the last run, whose extent the new run may reuse once old leases end.
    w, walloc = open_backend(tmp_path, server, ns, "w")
    try:
        put(w, walloc, [key(0), key(1)])
        r = RedisIndex(server.url, ns)
        pubs, leased = r.acquire("t:1", [key(0).to_string()])
        assert pubs[0] is not None and r.lease_left_ms("w") > 0
        r.release("t:1", leased)
        assert r.lease_left_ms("w") == 0                          # exact, not a full lease_ttl
        r.register("w", {**r.layout("w"), "boot": "a-new-run"})   # what a restarted w does first
        assert r.acquire("t:2", [key(0).to_string(), key(1).to_string()]) == ([None, None], [])
        assert r.lease_left_ms("w") == 0
        r.close()
    finally:
        w.close()


def test_an_eviction_that_cannot_write_its_records_republishes_and_blames_the_disk(tmp_path, server, ns):
    import errno

    w, walloc = open_backend(tmp_path, server, ns, "w", disk_mib=1)
    try:
        n = w.capacity_bytes // 16384
        old = [key(i) for i in range(n)]
        for i in range(0, n, 8):
            put(w, walloc, old[i:i + 8])
        real = w.local.index.evict

        def full(entries):
            raise OSError(errno.ENOSPC, "No space left on device")
        w.local.index.evict = full
        res = put(w, walloc, [key(1000 + i) for i in range(8)])
        assert all(isinstance(x, StorageFullError) for x in res)
        assert w.batched_exists(old) == [True] * n                # retracted, then published again
        assert w.stats["evict_errors"] >= 1 and w.stats["redis_errors"] == 0
        w.local.index.evict = real
        before = w.stats["put_errors"]
        assert all(x == 16384 for x in put(w, walloc, [key(2000 + i) for i in range(8)]))
        assert w.stats["put_errors"] == before                    # no error counted for a put that worked
    finally:
        w.close()
