"""``DiskIndex`` against a reference model: random puts, reads, removals, evictions and reopens.

The model is what the index promised before its entries moved into arrays:
an ordered dict in LRU order (a read moves a chunk to the end, a reopen
orders by put), pins that keep a chunk from eviction, evictions that take
the oldest unpinned chunks and nothing else, and a reopen (clean, or after
a crash: the process gone without closing) that finds exactly the chunks
recorded, each with its extent and checksum. A small index reserve makes
the index evict by itself and compact (its own LRU path).
"""

import shutil
import tempfile
from collections import OrderedDict

import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gds_kvcache.key import CacheEngineKey
from gds_kvcache.storage.disk_index import DiskEntry, DiskIndex
from gds_kvcache.storage.index_encode import encode_snapshot
from gds_kvcache.storage.pool_file import PoolDirectory, index_reserve
from gds_kvcache.units import MiB, PAGE

CAP = MiB
#: Room in the index files for about 20 chunks: the index then evicts and compacts by itself.
SMALL_RESERVE = 25 * 1024


def make_key(i: int) -> CacheEngineKey:
    forms = [format(i * 0x9E3779B97F4A7C15 % (1 << 128), "032x"), format(i + 1, "x"),
             "000" + format(i, "04x"), format(i * 0xBF58476D1CE4E5B9 ** 3, "x").zfill(40)[-60:]]
    return CacheEngineKey("vllm", ["m", "org/m é"][i % 2], 1, i % 3, forms[i % 4])


KEYS = [make_key(i) for i in range(40)]


class IndexMachine(RuleBasedStateMachine):
    @initialize(small=st.booleans())
    def setup(self, small):
        self.dir = tempfile.mkdtemp(prefix="index-model-")
        self.reserve = SMALL_RESERVE if small else index_reserve(CAP)
        self._open()
        self.ref: OrderedDict[CacheEngineKey, tuple] = OrderedDict()   # key -> (offset, size, checksum, seq)
        self.pins: dict[CacheEngineKey, int] = {}
        self.reads: list[tuple[CacheEngineKey, DiskEntry]] = []

    def _open(self):
        self.pool = PoolDirectory(self.dir, CAP, 1)
        self.idx = DiskIndex(self.pool, self.reserve)
        self.idx.recover()

    def teardown(self):
        if hasattr(self, "idx"):
            self.idx.close()
            self.pool.release()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _unpinned(self) -> list:
        return [k for k in self.ref if not self.pins.get(k)]

    def _settle_evictions(self, oldest: list) -> None:
        """Chunks gone without a removal must be the oldest unpinned ones, in order."""
        gone = [k for k in self.ref if not self.idx.contains(k)]
        assert gone == oldest[:len(gone)], (gone, oldest)
        for k in gone:
            del self.ref[k]

    @rule(i=st.integers(0, len(KEYS) - 1), pages=st.integers(1, 12), fail=st.booleans(),
          csum=st.integers(0, 2**64 - 1))
    def put(self, i, pages, fail, csum):
        k, n = KEYS[i], pages * PAGE
        oldest = self._unpinned()
        res = self.idx.reserve([k], [n])
        self._settle_evictions(oldest)
        if k in self.ref:
            assert res.keys == [] and not res.errors
            return
        if not res.keys:
            assert res.errors
            return
        if fail:
            assert self.idx.commit([], [k]) == []
            return
        oldest = self._unpinned()
        e = DiskEntry(k, res.offsets[0], n, n, (n,), "uint8", "KV_2LTD", csum)
        assert self.idx.commit([e], []) == [k]
        self._settle_evictions(oldest)
        self.ref[k] = (res.offsets[0], n, csum, e.seq)

    @rule(i=st.integers(0, len(KEYS) - 1))
    def read(self, i):
        k = KEYS[i]
        [e] = self.idx.begin_read([k])
        assert (e is None) == (k not in self.ref)
        if e is not None:
            assert (e.offset, e.phys_size, e.checksum) == self.ref[k][:3] and e.key == k
            self.ref.move_to_end(k)
            self.pins[k] = self.pins.get(k, 0) + 1
            self.reads.append((k, e))

    @precondition(lambda self: self.reads)
    @rule(j=st.integers(0, 10**6), bad=st.booleans())
    def end_read(self, j, bad):
        k, e = self.reads.pop(j % len(self.reads))
        self.idx.end_read([e], [e] if bad else [])
        self.pins[k] -= 1
        if bad and k in self.ref and self.ref[k][3] == e.seq:     # still the chunk read: dropped
            del self.ref[k]

    @rule(i=st.integers(0, len(KEYS) - 1))
    def remove(self, i):
        k = KEYS[i]
        was, extent = self.idx.remove(k)
        assert was == (k in self.ref)
        if was:
            assert (extent is None) == bool(self.pins.get(k))
            del self.ref[k]
        if extent is not None:
            self.idx.free(extent[0])

    @rule()
    def evict_one(self):
        want = self._unpinned()
        got = self.idx.evict_one()
        assert (got is None) == (not want)
        if got is not None:
            assert got[0] == want[0] and got[1:] == self.ref[want[0]][:2]
            del self.ref[want[0]]
            self.idx.free(got[1])

    @rule(crash=st.booleans())
    def reopen(self, crash):
        if crash:
            self.pool.release()      # the process is gone: no close, no compaction
        else:
            self.idx.close()
            self.pool.release()
        self._open()
        self.ref = OrderedDict(sorted(self.ref.items(), key=lambda kv: kv[1][3]))   # LRU order = put (seq) order
        self.pins, self.reads = {}, []

    @invariant()
    def same(self):
        if not hasattr(self, "idx"):
            return
        idx = self.idx
        assert idx.memcheck()
        assert len(idx) == len(self.ref) and idx.keys() == list(self.ref)
        for k, (off, n, csum, _) in self.ref.items():
            e = idx.entry(k)
            assert (e.offset, e.phys_size, e.checksum, e.readers) == (off, n, csum, self.pins.get(k, 0))
        assert idx.used == sum(v[1] for v in self.ref.values()) + self._doomed_bytes()

    def _doomed_bytes(self) -> int:
        """Extents of chunks removed while read stay allocated until their last reader ends."""
        return sum({id(e): e.phys_size for _, e in self.reads if e.doomed}.values())


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)


def test_reopen_after_a_crash_is_byte_exact(tmp_path):
    """Random puts and removals, a crash, a reopen: its snapshot is byte for byte the snapshot
    that the objects of the chunks recorded give (the same encoder, fed from objects)."""
    rng = np.random.default_rng(11)
    pool = PoolDirectory(str(tmp_path), 8 * MiB, 1)
    idx = DiskIndex(pool, index_reserve(8 * MiB))
    idx.recover()
    for step in range(300):
        k = make_key(int(rng.integers(0, 200)))
        if rng.random() < 0.7:
            n = int(rng.integers(1, 5)) * PAGE
            res = idx.reserve([k], [n])
            if res.keys:
                idx.commit([DiskEntry(k, res.offsets[0], n, n, (n // 2,), "bfloat16", "KV_2LTD",
                                      int(rng.integers(0, 2**63)))], [])
        else:
            was, extent = idx.remove(k)
            if extent is not None:
                idx.free(extent[0])
    want = [idx.entry(k) for k in idx.keys()]
    pool.release()                                       # crash: no close
    pool = PoolDirectory(str(tmp_path), 8 * MiB, 1)
    idx = DiskIndex(pool, index_reserve(8 * MiB))
    idx.recover()
    got = [idx.entry(k) for k in idx.keys()]
    fields = lambda e: (e.key, e.offset, e.nbytes, e.phys_size, e.shape, e.dtype, e.fmt, e.checksum, e.seq)  # noqa: E731
    assert [fields(e) for e in got] == sorted(map(fields, want), key=lambda f: f[-1])
    from_table, _ = encode_snapshot(idx._live.columns(), {}, {})
    from_objects, _ = encode_snapshot(sorted(want, key=lambda e: e.seq), {}, {})
    assert b"".join(map(bytes, from_table)) == b"".join(map(bytes, from_objects))
    idx.close()
    pool.release()


def _sweep(entries, capacity):
    """What recovery kept before its entries were columns: a sweep by offset, the newer of two
    overlapping extents winning (the reference for ``resolve_extents``)."""
    kept = []
    for e in sorted(entries, key=lambda e: e.offset):
        if e.offset % PAGE or e.offset + e.phys_size > capacity:
            continue
        if kept and kept[-1].offset + kept[-1].phys_size > e.offset:
            loser = kept[-1] if kept[-1].seq < e.seq else e
            if loser is e:
                continue
            kept.pop()
        kept.append(e)
    return kept


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 6)), min_size=1, max_size=60), st.integers(0, 2**32))
def test_recovery_keeps_what_the_sweep_kept(extents, seed):
    """Random extents, overlapping often, some past the pool: ``resolve_extents`` keeps exactly the
    entries the old per-entry sweep kept, and gives their extents sorted."""
    from gds_kvcache.storage.index_encode import columns_of
    from gds_kvcache.storage.recovery import resolve_extents

    rng = np.random.default_rng(seed)
    seqs = rng.permutation(len(extents)) + 1
    entries = [DiskEntry(make_key(i), off * PAGE, n * PAGE, n * PAGE, (n * PAGE,), "uint8", "KV_2LTD", 7, int(seqs[i]))
               for i, (off, n) in enumerate(extents)]
    cols = columns_of(entries, {})

    class Pool:             # the pool's shape as recovery asks it: 1 file, 50 pages in it
        stripe_bytes, unit, stripes = 50 * PAGE, PAGE, 1

        @staticmethod
        def fits(offset, nbytes):
            return offset + nbytes <= 50 * PAGE

    keep, starts, sizes = resolve_extents(cols.ops, cols.tables, np.arange(len(entries)), 56 * PAGE, Pool)
    want = _sweep([e for e in entries if e.offset + e.phys_size <= 50 * PAGE], 56 * PAGE)
    assert sorted(e.seq for e, k in zip(entries, keep) if k) == sorted(e.seq for e in want)
    assert starts.tolist() == [e.offset for e in want] and sizes.tolist() == [e.phys_size for e in want]
