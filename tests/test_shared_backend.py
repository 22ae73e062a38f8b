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
        pubs = r.acquire("t:1", [k.to_string() for k in keys])
        for k, p in zip(keys, pubs):
            e = w.local.entry(k)
            assert (p.writer, p.generation, p.offset, p.nbytes, p.checksum) == ("w0", str(e.seq), e.offset,
                                                                                e.nbytes, e.checksum)
            assert p.shape == (4096,) and p.dtype == w.local.entry(k).dtype
        r.release("t:1", pubs)
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
            w._epoch = r.epoch()          # the same server: only the request brings them back
            rd._epoch = r.epoch()
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
        assert w.remove(keys[0]) is False             # never remove under a possible lease
        srv.start()
        deadline = time.monotonic() + 30
        while w.batched_contains(keys) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.batched_contains(keys) == 5
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
    w, alloc = open_backend(tmp_path, server, ns, "w0", disk_mib=1, lease_ttl=2.0, tick=0.05)
    try:
        keys = [key(i) for i in range(8)]
        put(w, alloc, keys)
        e = w.local.entry(keys[0])
        path, off = w.local.locate(e.offset)
        with open(path, "rb") as f:
            f.seek(off)
            before = f.read(e.nbytes)
        r = RedisIndex(server.url, ns, lease_ttl=2.0)
        leased = r.acquire("reader:1", [keys[0].to_string()])
        assert w.remove(keys[0])
        assert w.stats["leased_evictions"] == 1
        assert r.acquire("reader:2", [keys[0].to_string()]) == [None]     # retracted: new readers miss
        # Fill the pool many times over: the leased extent must keep its bytes.
        for rnd in range(4):
            put(w, alloc, [key(1000 + 100 * rnd + i) for i in range(60)])
            with open(path, "rb") as f:
                f.seek(off)
                assert f.read(e.nbytes) == before
        assert w.stats["shared_evictions"] > 0
        r.release("reader:1", leased)
        deadline = time.monotonic() + 30       # freed by housekeeping once the lease time is over
        while w._quarantine and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not w._quarantine and w.memcheck()
        r.close()
    finally:
        w.close()


def test_expired_lease_is_a_miss_not_bytes(tmp_path, server, ns):
    w, alloc = open_backend(tmp_path, server, ns, "w0")
    rd, _ = open_backend(tmp_path, server, ns, "r1", lease_ttl=0.2)
    try:
        put(w, alloc, [key(1)])
        rd._hold_s = 0.4          # a reader stalled past its lease
        assert rd.batched_get_blocking([key(1)]) == [None]
        assert rd.stats["lease_expired"] == 1
        rd._hold_s = 0.0
        assert check(rd.batched_get_blocking([key(1)]), [key(1)]) == [True]
    finally:
        w.close()
        rd.close()


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
        assert r.retract("w0", [(key(1).to_string(), str(g1))]) == [0]
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
