"""Eviction around leased extents (issue 17, 8): with other processes leasing a third of the pool,
puts still find room where unleased chunks can go, and a refusal names the real pool size."""

import pytest
import torch

from gds_kvcache.errors import StorageFullError

redis = pytest.importorskip("redis", reason="the 'redis' client package is not installed (pip install redis)")

from gds_kvcache.shared.redis_index import RedisIndex  # noqa: E402
from gds_kvcache.shared.shared_index import SharedIndex  # noqa: E402
from tests.test_shared_backend import key, ns, open_backend, server  # noqa: E402,F401


def put_sized(b, alloc, keys, n_floats):
    objs = []
    for k in keys:
        n = n_floats(k) if callable(n_floats) else n_floats
        o = alloc.allocate((n,), torch.float32)
        o.tensor.fill_(float(int(k.chunk_hash, 16) % 1000))
        objs.append(o)
    res = b.batched_put(keys, objs)
    for o in objs:
        o.ref_count_down()
    return res


def test_puts_evict_around_leased_chunks_instead_of_failing(tmp_path, server, ns):
    w, alloc = open_backend(tmp_path, server, ns, "w0", disk_mib=4, slab_mib=16, lease_ttl=60.0)
    reader = SharedIndex(RedisIndex(server.url, ns, lease_ttl=60.0), str(tmp_path / "shared"), "r0")
    try:
        cap = w.capacity_bytes
        size = 16 * 1024                           # 64 KiB chunks of float32
        n = cap // (size * 4)
        first = [key(i) for i in range(n)]
        for i in range(0, n, 8):
            put_sized(w, alloc, first[i:i + 8], size)
        stored = [k for k in first if w.local.index.contains(k)]
        pins = reader.pin(stored[::3])             # a third of the pool, leased by another process
        assert sum(p is not None for p in pins.pins) == len(stored[::3])
        results = []
        sizes = lambda k: 1024 * (4 + int(k.chunk_hash, 16) * 7919 % 29)   # noqa: E731 - 16-128 KiB
        for r in range(6):                          # six pools' worth of new chunks of mixed sizes
            batch = [key(10_000 + r * n + i) for i in range(n)]
            for i in range(0, n, 8):
                results += put_sized(w, alloc, batch[i:i + 8], sizes)
        failed = [x for x in results if isinstance(x, BaseException)]
        assert failed == [], failed[:3]
        assert all(w.local.index.contains(k) for k in stored[::3])   # the leased chunks stayed
        assert w.used_bytes <= cap and w.memcheck()
        reader.unpin(pins)
    finally:
        reader.redis.close()
        w.close()


def test_a_refusal_names_the_pool_the_budget_gives(tmp_path, server, ns):
    w, alloc = open_backend(tmp_path, server, ns, "w0", disk_mib=2, slab_mib=16)
    try:
        cap = w.capacity_bytes
        big = [key(1)]
        res = put_sized(w, alloc, big, (cap + 4096) // 4)   # a chunk bigger than the pool
        assert isinstance(res[0], StorageFullError) and f"{cap}-byte pool" in str(res[0])
        assert "4194304-byte pool" not in str(res[0]) or cap == 4194304
    finally:
        w.close()
