"""The index side alone: no GPU, no I/O engine (what a scheduler process would run)."""

import pytest

from gds_kvcache import CacheEngineKey
from gds_kvcache.errors import StorageFullError
from gds_kvcache.storage.disk_index import DiskEntry, DiskIndex
from gds_kvcache.storage.pool_file import PoolDirectory, index_reserve
from gds_kvcache.units import MiB, PAGE


def key(i):
    return CacheEngineKey("vllm", "m", 1, 0, i + 1)


def entry(k, off, n):
    return DiskEntry(k, off, n, n, (n,), "uint8", "KV_2LTD", 0x1234)


def open_index(path, cap=8 * MiB):
    pool = PoolDirectory(str(path), cap, 1)
    idx = DiskIndex(pool, index_reserve(cap))
    idx.recover()
    return pool, idx


def put(idx, k, n):
    res = idx.reserve([k], [n])
    assert res.keys == [k], res.errors
    idx.commit([entry(k, res.offsets[0], n)], [])
    return res.offsets[0]


def test_a_put_fragmentation_forbids_evicts_nothing_and_says_why(tmp_path):
    pool, idx = open_index(tmp_path)
    q = idx.capacity // 4 // PAGE * PAGE
    offs = [put(idx, key(i), q) for i in range(4)]
    second = sorted(range(4), key=lambda i: offs[i])[1]
    idx.remove(key(second))
    idx.free(offs[second])
    pending = idx.reserve([key(9)], [PAGE])  # a put in flight, now splitting the free space
    assert pending.offsets == [offs[second]]
    res = idx.reserve([key(10)], [3 * q])  # fits the total, never one hole while key 9 is in flight
    assert res.keys == [] and isinstance(res.errors[key(10)], StorageFullError)
    assert "in flight" in str(res.errors[key(10)])
    assert idx.stats["evictions"] == 0 and len(idx) == 3, "evicted chunks for a put that could not fit"
    idx.abort([key(9)])
    res = idx.reserve([key(10)], [3 * q])  # now eviction can make room: it does
    assert res.keys == [key(10)] and idx.stats["evictions"] >= 2
    idx.memcheck()
    idx.close()
    pool.release()


def test_a_put_larger_than_the_pool_is_refused_at_once(tmp_path):
    pool, idx = open_index(tmp_path)
    put(idx, key(0), MiB)
    res = idx.reserve([key(1)], [idx.capacity + PAGE])
    assert "can never fit" in str(res.errors[key(1)]) and idx.contains(key(0))
    idx.close()
    pool.release()


def test_the_index_runs_alone_and_survives_reopen(tmp_path):
    pool, idx = open_index(tmp_path)
    offs = {i: put(idx, key(i), (i + 1) * PAGE) for i in range(20)}
    was, extent = idx.remove(key(3))
    assert was and extent == (offs[3], 4 * PAGE)
    idx.free(extent[0])
    assert idx.prefix_length([key(0), key(1), key(3), key(4)]) == 2
    idx.close()
    pool.release()
    pool, idx = open_index(tmp_path)
    assert sorted(k.chunk_hash for k in idx.keys()) == sorted(key(i).chunk_hash for i in range(20) if i != 3)
    assert all(idx.entry(key(i)).offset == offs[i] for i in range(20) if i != 3)
    idx.memcheck()
    idx.close()
    pool.release()


def test_closed_index_refuses_calls(tmp_path):
    from gds_kvcache.errors import ClosedError

    pool, idx = open_index(tmp_path)
    idx.close()
    with pytest.raises(ClosedError):
        idx.reserve([key(0)], [PAGE])
    with pytest.raises(ClosedError):
        idx.begin_read([key(0)])
    pool.release()
