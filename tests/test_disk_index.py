"""The index side alone: no GPU, no I/O engine (what a scheduler process would run)."""

import pytest

from gds_kvcache import CacheEngineKey
from gds_kvcache.errors import StorageFullError
from gds_kvcache.storage.disk_index import DiskEntry, DiskIndex
from gds_kvcache.storage.eviction import DeferredFree
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


# -- DeferredFree: the owner (shared mode) evicts and frees, after telling Redis --------------------------
def open_owned(path, cap=8 * MiB):
    pool = PoolDirectory(str(path), cap, 1)
    strategy = DeferredFree()
    idx = DiskIndex(pool, index_reserve(cap), eviction=strategy)
    strategy.attach(idx, lambda off, size: None)
    idx.recover()
    idx.strategy = strategy      # the tests reach it through the index they hold
    return pool, idx


def test_deferred_free_index_never_evicts_or_reuses_by_itself(tmp_path):
    pool, idx = open_owned(tmp_path)
    q = idx.capacity // 4 // PAGE * PAGE
    offs = [put(idx, key(i), q) for i in range(4)]
    res = idx.reserve([key(9)], [q])              # full: refused, nothing evicted
    assert res.keys == [] and isinstance(res.errors[key(9)], StorageFullError)
    assert idx.stats["evictions"] == 0 and len(idx) == 4
    # remove: gone at once, but its extent is retired, not free, until the owner frees it
    assert idx.remove(key(0)) == (True, None)
    assert not idx.contains(key(0)) and idx.used == 4 * q
    assert idx.reserve([key(9)], [q]).keys == []
    retired = idx.strategy.drain()
    assert [(e.key, e.offset) for e in retired] == [(key(0), offs[0])] and idx.strategy.drain() == []
    idx.free(retired[0].offset)
    assert idx.reserve([key(9)], [q]).offsets == [offs[0]]
    idx.abort([key(9)])
    idx.memcheck()
    idx.close()
    pool.release()


def test_deferred_free_a_read_chunk_retires_when_its_last_reader_ends(tmp_path):
    pool, idx = open_owned(tmp_path)
    put(idx, key(0), MiB)
    put(idx, key(1), MiB)
    [e0] = idx.begin_read([key(0)])
    assert idx.eviction_candidates(2 * MiB) == [idx.entry(key(1))]      # a read chunk is no candidate
    assert idx.evict([e0]) == []                                         # nor evicted
    idx.remove(key(0))
    assert idx.strategy.drain() == []                                     # still read here
    idx.end_read([e0])
    assert [e.key for e in idx.strategy.drain()] == [key(0)]
    # a chunk found bad by its reader is retired too, never freed behind the owner's back
    [e1] = idx.begin_read([key(1)])
    idx.end_read([e1], bad=[e1])
    assert [e.key for e in idx.strategy.drain()] == [key(1)] and idx.used == 2 * MiB
    idx.close()
    pool.release()


def test_owner_evicts_lru_with_one_delete_append_and_requeues(tmp_path):
    pool, idx = open_owned(tmp_path)
    for i in range(6):
        put(idx, key(i), MiB)
    idx.begin_read([key(0)])      # most recently used now, and pinned
    cands = idx.eviction_candidates(2 * MiB + 1)
    assert [e.key for e in cands] == [key(1), key(2), key(3)]
    assert [e.key for e in idx.eviction_candidates(0, count=2)] == [key(1), key(2)]
    before = idx._log.records
    gone = idx.evict(cands)
    assert [e.key for e in gone] == [key(1), key(2), key(3)] and idx.stats["evictions"] == 3
    assert idx._log.records == before + 3
    assert idx.evict(cands) == []                                         # idempotent
    ret = idx.strategy.drain()
    idx.strategy.requeue(ret[1:])                                          # the owner could not retract these
    assert [e.key for e in idx.strategy.drain()] == [key(2), key(3)]
    idx.close()
    pool.release()
    # The deletes are durable: a reopen has neither the chunks nor their space allocated.
    pool, idx = open_owned(tmp_path)
    assert sorted(k.chunk_hash for k in idx.keys()) == sorted(key(i).chunk_hash for i in (0, 4, 5))
    assert idx.used == 3 * MiB
    idx.close()
    pool.release()


def test_over_reserve_says_how_many_chunks_the_index_must_shed(tmp_path):
    from gds_kvcache.storage.index_log import IndexLog
    pool, idx = open_owned(tmp_path, cap=4 * MiB)
    half = (idx._reserve - 2 * PAGE) // 2
    room = max(n for n in range(0, 20000, 1) if IndexLog.size_of(n) + IndexLog.size_of(1) <= half)
    assert idx.over_reserve(room) == 0 and idx.over_reserve(room + 1) == 0     # empty: nothing to shed
    for i in range(3):
        put(idx, key(i), PAGE)
    assert idx.over_reserve(room - 3) == 0
    assert idx.over_reserve(room - 2) == 1 and idx.over_reserve(room) == 3
    idx.close()
    pool.release()
