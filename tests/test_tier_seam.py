"""The one tier seam: interface defaults, the tier factory, the manager over tiers it is handed,
the one layout reader, the one verified read, and the shared index half used alone."""

import ast
import os
import pathlib
import sys
import uuid
from concurrent.futures import Future

import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineKey, LocalDiskBackend, SlabMemoryAllocator, StorageManager
from gds_kvcache.errors import ConfigError, StorageUnavailableError
from gds_kvcache.storage import (CreateStorageBackends, DiskEntry, DiskTransfer, LocalCPUBackend, PoolLayout,
                                 StorageBackendInterface, disk_tier_kind, register_disk_tier)
from gds_kvcache.storage.pool_file import LayoutError, PoolDirectory
from gds_kvcache.units import GB, MiB

ROOT = pathlib.Path(__file__).resolve().parents[1] / "gds_kvcache"


def key(i, ws=1, rank=0):
    return CacheEngineKey("vllm", "m", ws, rank, 1000 + i)


def cfg(path, **kw):
    return CacheEngineConfig(local_disk=str(path), max_local_disk_size=32 * MiB / GB, io_engine="posix",
                             io_threads=2, local_cpu=False, **kw)


# -- the interface: a tier implementing only LMCache's single-key calls gets the rest -------------
class DictTier(StorageBackendInterface):
    def __init__(self):
        super().__init__("cpu")
        self.d = {}

    def contains(self, key):
        return key in self.d

    def exists_in_put_tasks(self, key):
        return False

    def submit_put_task(self, key, obj):
        if key in self.d:
            return None
        obj.ref_count_up()
        self.d[key] = obj
        f = Future()
        f.set_result(obj.nbytes)
        return f

    def submit_prefetch_task(self, key):
        if key not in self.d:
            return None
        f = Future()
        f.set_result(self.get_blocking(key))
        return f

    def get_blocking(self, key):
        o = self.d.get(key)
        if o is not None:
            o.ref_count_up()
        return o

    def remove(self, key):
        o = self.d.pop(key, None)
        if o is not None:
            o.ref_count_down()
        return o is not None

    def close(self):
        for k in list(self.d):
            self.remove(k)


def test_single_key_tier_gets_the_batch_api_and_plain_capabilities():
    alloc = SlabMemoryAllocator(4 * MiB, "host")
    t = DictTier()
    objs = [alloc.allocate((1024,), torch.float32) for _ in range(3)]
    for i, o in enumerate(objs):
        o.tensor.fill_(i)
    futs = t.batched_submit_put_task([key(0), key(1), key(2)], objs)
    assert [f.result() for f in futs] == [4096] * 3
    assert t.batched_contains([key(0), key(1), key(5), key(2)]) == 2
    assert t.batched_exists([key(5), key(2)]) == [False, True]
    got = t.batched_get_blocking([key(2), key(7)])
    assert got[1] is None and torch.equal(got[0].tensor, torch.full((1024,), 2.0))
    got[0].ref_count_down()
    assert t.batched_submit_prefetch_task([key(8)]) is None
    pre = t.batched_submit_prefetch_task([key(1), key(8)]).result()
    assert pre[1] is None and torch.equal(pre[0].tensor, torch.full((1024,), 1.0))
    pre[0].ref_count_down()
    assert not t.lookup_for_all_ranks() and not t.put_skips_stored() and t.entry_size(key(0)) == 0
    assert t.wait_for_put_progress(0.01) is False and t.io_report() is None and t.stats == {}
    t.close()
    for o in objs:
        o.ref_count_down()
    assert alloc.memcheck() and alloc.used == 0
    alloc.close()


def test_manager_runs_on_tiers_it_is_handed(tmp_path):
    """StorageManager receives its tiers: a tier of the caller's own works through the seam."""
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    tier = DictTier()
    with StorageManager(CacheEngineConfig(local_cpu=False), allocator=alloc,
                        backends={"LocalDiskBackend": tier}) as sm:
        o = sm.allocate((1024,), torch.float32)
        o.tensor.copy_(torch.arange(1024.0))
        sm.put(key(1), o)
        assert sm.contains(key(1)) and sm.batched_contains([key(1), key(2)]) == 1
        got = sm.get(key(1))
        assert torch.equal(got.tensor, torch.arange(1024.0))
        got.ref_count_down()
    assert tier.d == {}          # the manager closed the tier it was handed
    alloc.close()


def test_factory_picks_the_tier_kind_and_registered_builders(tmp_path):
    assert disk_tier_kind(CacheEngineConfig()) is None
    assert disk_tier_kind(cfg(tmp_path)) == "local"
    assert disk_tier_kind(cfg(tmp_path, lookup_server_url="redis://127.0.0.1:1/0")) == "shared"
    alloc = SlabMemoryAllocator(4 * MiB, "host")
    tiers = CreateStorageBackends(cfg(tmp_path / "a"), None, None, alloc, "cpu")
    assert list(tiers) == ["LocalDiskBackend"] and isinstance(tiers["LocalDiskBackend"], LocalDiskBackend)
    tiers["LocalDiskBackend"].close()
    hot = CreateStorageBackends(CacheEngineConfig(local_cpu=True, max_local_cpu_size=0.001), None, None, alloc, "cpu")
    assert list(hot) == ["Hot"] and isinstance(hot["Hot"], LocalCPUBackend)
    # A registered kind is what the factory builds; an unknown kind is a ConfigError, not a crash.
    from gds_kvcache.storage import tier_factory
    saved = dict(tier_factory._BUILDERS)
    try:
        made = []
        register_disk_tier("shared", lambda c, loop, a, dev, ls: made.append(c) or DictTier())
        t = CreateStorageBackends(cfg(tmp_path / "b", lookup_server_url="redis://127.0.0.1:1/0"), None, None,
                                  alloc, "cpu")
        assert isinstance(t["LocalDiskBackend"], DictTier) and len(made) == 1
        del tier_factory._BUILDERS["shared"]
        with pytest.raises(ConfigError):
            CreateStorageBackends(cfg(tmp_path / "c", lookup_server_url="redis://127.0.0.1:1/0"), None, None,
                                  alloc, "cpu")
    finally:
        tier_factory._BUILDERS.clear()
        tier_factory._BUILDERS.update(saved)
    alloc.close()


# -- the one layout reader -------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {"stripes": "abc", "stripe_bytes": 4096, "unit": 4096},
    {"stripes": "0", "stripe_bytes": 4096, "unit": 4096},
    {"stripes": 2, "stripe_bytes": 4096, "unit": "0"},
    {"stripes": 2, "stripe_bytes": 4097, "unit": 4096},
    {"stripes": 2, "unit": 4096},
    {"stripes": True, "stripe_bytes": 4096, "unit": 4096},
    "not a mapping",
])
def test_pool_layout_refuses_unusable_fields(fields):
    with pytest.raises(LayoutError):
        PoolLayout.from_fields("/x", fields)


def test_pool_layout_reads_what_a_directory_writes(tmp_path):
    d = PoolDirectory(str(tmp_path), 64 * MiB, 4)
    lay = PoolLayout.read(str(tmp_path))
    assert lay == d.layout and lay.pool_paths == d.pool_paths
    assert PoolLayout.from_fields(lay.path, {k: str(v) for k, v in lay.fields().items()}) == lay
    d.release()
    with pytest.raises(StorageUnavailableError):
        PoolLayout.read(str(tmp_path / "none"))


# -- the one verified read -------------------------------------------------------------------------------
def test_verified_read_misses_bad_descriptors_alone(tmp_path):
    """A descriptor with a wrong checksum, an inconsistent shape, a huge shape, an extent outside
    the pool or an unknown dtype is a miss of its own; healthy chunks of the batch still hit."""
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    be = LocalDiskBackend(cfg(tmp_path), None, alloc, "cpu")
    keys = [key(i) for i in range(6)]
    objs = [alloc.allocate((1024,), torch.float32) for _ in keys]
    for i, o in enumerate(objs):
        o.tensor.copy_(torch.randn(1024, generator=torch.Generator().manual_seed(i)))
    want = [o.tensor.clone() for o in objs]
    for f in be.batched_submit_put_task(keys, objs):
        f.result()
    for o in objs:
        o.ref_count_down()
    es = [be.entry(k) for k in keys]
    import dataclasses
    bad = [dataclasses.replace(es[0], checksum=es[0].checksum ^ 1),
           dataclasses.replace(es[1], shape=(7,)),
           dataclasses.replace(es[2], shape=(1 << 40,)),
           dataclasses.replace(es[3], offset=1 << 40),
           dataclasses.replace(es[4], dtype="nonsense")]
    tr = DiskTransfer(be._engine, be.layout)
    res = tr.read_verified(alloc, bad + [es[5]])
    assert sorted(i for i, _ in res.bad) == [0, 1, 2, 3, 4]
    assert res.objs[:5] == [None] * 5 and torch.equal(res.objs[5].tensor, want[5])
    res.objs[5].ref_count_down()
    # a well-formed entry copied to another key (an index or Redis entry pointing at another
    # chunk's bytes) is a miss: every checksum is bound to its key
    moved = tr.read_verified(alloc, [dataclasses.replace(es[1], key=key(99))])
    assert moved.objs == [None] and [i for i, _ in moved.bad] == [0]
    healthy = tr.read_verified(alloc, es)
    assert healthy.bad == [] and all(torch.equal(o.tensor, w) for o, w in zip(healthy.objs, want))
    for o in healthy.objs:
        o.ref_count_down()
    be.close()
    assert alloc.used == 0
    alloc.close()


# -- the house: layers ----------------------------------------------------------------------------------------
def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                out.append(".".join(base + ([node.module] if node.module else [])))
            else:
                out.append(node.module or "")
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_storage_and_memory_never_import_a_layer_above():
    above = ("gds_kvcache.shared", "gds_kvcache.integrations", "gds_kvcache.tiers", "gds_kvcache.engine")
    for layer in ("storage", "memory", "io"):
        for f in (ROOT / layer).glob("*.py"):
            for m in _imports(f):
                assert not m.startswith(above), f"{f.relative_to(ROOT)} imports {m}"


def test_shared_uses_no_private_member_of_another_object():
    """``shared`` builds on ``storage`` and ``memory`` through their public API only: no attribute
    ``x._name`` of anything but ``self``/``cls`` (``MemoryObj._alloc.buffer`` and the like)."""
    for f in (ROOT / "shared").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"), \
                    f"{f.name}:{node.lineno} reaches into .{node.attr}"


# -- the shared index half, alone: no GPU, no slab, no I/O engine ----------------------------------------
redis = pytest.importorskip("redis", reason="the 'redis' client package is not installed (pip install redis)")


@pytest.fixture(scope="module")
def redis_url():
    url = os.environ.get("GDS_KVCACHE_REDIS_URL")
    if url:
        yield url
        return
    from gds_kvcache.shared import LocalRedis, find_redis_server
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (scripts/ci-redis.sh installs one)")
    r = LocalRedis()
    yield r.url
    r.stop()


def test_shared_index_alone_looks_up_claims_and_pins(redis_url, tmp_path):
    from gds_kvcache.shared.redis_index import Published, RedisIndex
    from gds_kvcache.shared.shared_index import SharedIndex
    ns = "seam" + uuid.uuid4().hex[:8]
    r = RedisIndex(redis_url, ns, lease_ttl=5.0)
    idx = SharedIndex(r, str(tmp_path), "sched")
    r.register("w1", {"dir": "writers/w1", "stripes": 2, "stripe_bytes": 8 * MiB, "unit": 4 * MiB, "boot": "b1"})
    es = [DiskEntry(key(i, ws=2, rank=rk), (2 * i + rk) * 4096, 4096, 4096, (1024,), "float32", "KV_2LTD", 7, 3)
          for i in range(3) for rk in range(2) if not (i == 2 and rk == 1)]
    r.publish("w1", [Published.of_entry(e, "w1", "b1") for e in es])
    # lookups count a chunk only once every rank's shard is published
    assert idx.prefix([key(0, 2), key(1, 2), key(2, 2)]) == 2
    assert idx.exists([key(2, 2), key(1, 2)]) == [False, True]
    # reservations: one writer's claim keeps others off the key until given back
    assert idx.claim("w2", [key(5)]) == [True] and idx.claim("w3", [key(5)]) == [False]
    idx.unclaim("w2", [key(5)])
    assert idx.claim("w3", [key(5)]) == [True]
    # pins: descriptors equal to what the writer published, leased until unpinned
    pins = idx.pin([key(1, 2, 1), key(9)])
    assert pins.pins[1] is None and pins.pins[0].writer == "w1" and not pins.pins[0].stale
    assert pins.pins[0].entry == es[3]
    assert r.lease_left_ms("w1") > 0
    idx.unpin(pins)
    assert r.lease_left_ms("w1") == 0
    lay = idx.layout("w1", "b1")
    assert lay == PoolLayout(os.path.join(str(tmp_path), "writers/w1"), 2, 8 * MiB, 4 * MiB)
    assert idx.layout("w1", "other-run") is None
    # garbled layouts are misses, never exceptions
    for bad in ({"stripes": "abc"}, {"stripes": "0"}, {"unit": "0"}, {"dir": ""}, {"dir": "../../etc"}):
        r.client.hset(f"{ns}:w:w1", mapping=bad)
        assert idx.layout("w1", "b1") is None
        r.register("w1", {"dir": "writers/w1", "stripes": 2, "stripe_bytes": 8 * MiB, "unit": 4 * MiB, "boot": "b1"})
    r.client.hdel(f"{ns}:w:w1", "dir")
    assert idx.layout("w1", "b1") is None
    assert "torch.cuda" not in sys.modules or not torch.cuda.is_initialized()
    r.close()


# -- checksums bound to keys, and the migration of directories written before -------------------------
def test_directory_of_an_earlier_version_is_migrated_once(tmp_path):
    import dataclasses
    from gds_kvcache.kernels.checksum import checksum_host
    from gds_kvcache.storage.index_log import IndexLog
    from gds_kvcache.storage.pool_file import KEYED_NAME
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    be = LocalDiskBackend(cfg(tmp_path), None, alloc, "cpu")
    keys = [key(i) for i in range(5)]
    want = []
    for k in keys:
        o = alloc.allocate((2048,), torch.float32)
        o.tensor.copy_(torch.randn(2048))
        want.append(o.tensor.clone())
        be.submit_put_task(k, o).result()
        o.ref_count_down()
    be.close()
    # Rewrite the index as an earlier version wrote it: raw checksums of the bytes, no marker.
    lg = IndexLog(str(tmp_path))
    entries, _ = lg.load()
    raw = [dataclasses.replace(e, checksum=checksum_host(w.numpy().tobytes()))
           for e, w in zip(sorted(entries, key=lambda e: keys.index(e.key)), want)]
    lg.snapshot(raw)
    lg.close()
    os.unlink(tmp_path / KEYED_NAME)
    for _ in range(2):           # the first open migrates; the second must not bind them again
        be = LocalDiskBackend(cfg(tmp_path), None, alloc, "cpu")
        got = be.batched_get_blocking(keys)
        assert all(o is not None and torch.equal(o.tensor, w) for o, w in zip(got, want))
        for o in got:
            o.ref_count_down()
        assert (tmp_path / KEYED_NAME).exists() and be.stats["corrupt"] == 0
        be.close()
    alloc.close()
