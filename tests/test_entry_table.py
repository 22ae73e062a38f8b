"""The disk index's arrays (``entry_table``, ``key_codes``, ``lru_clock``) against reference models.

Random operations (hypothesis) on the array structures and on a plain dict or
ordered list that says what they must hold; every step checks the invariants
and that each key is found with exactly its fields. The hash table is also
run with homes that collide on purpose (every key in one slot, keys packed
at the end of the table so probes wrap), so probing, wrapping and
backward-shift deletes are exercised, not hoped for.
"""

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from gds_kvcache.key import CacheEngineKey
from gds_kvcache.storage import key_codes as kcodes
from gds_kvcache.storage.entry_table import EntryTable
from gds_kvcache.storage.index_columns import merge_order
from gds_kvcache.storage.key_codes import KeyCodes, ident_homes, ident_words
from gds_kvcache.storage.lru_clock import FREE, LruClock
from gds_kvcache.units import PAGE

PREFIXES = [("vllm", "m", 1, 0), ("vllm", "org/model@x é", 4, 3), ("sglang", "m", 2, 1)]
LAYOUTS = [((2, 3), "bfloat16", "KV_2LTD"), ((7,), "uint8", "BINARY"), ((1, 2, 3, 4), "float32", "KV_T2D")]


def make_hash(draw_int: int, form: int) -> str:
    """Hashes of every form the index keeps apart: 32 digits, fewer, leading zeros, wide (33-64)."""
    if form == 0:
        return format(draw_int % (1 << 128), "032x")
    if form == 1:
        return format(draw_int % (1 << 40) + 1, "x")                  # an int hash, no leading zeros
    if form == 2:
        return "00" + format(draw_int % (1 << 20), "05x")             # leading zeros kept
    return format(draw_int % (1 << 250), "x").zfill(33 + draw_int % 31)[-64:]   # wide


hash_args = st.tuples(st.integers(0, 2**256), st.integers(0, 3))
keys = st.builds(lambda p, h: CacheEngineKey(*PREFIXES[p], make_hash(*h)), st.integers(0, len(PREFIXES) - 1), hash_args)


@pytest.fixture(params=["real", "one-slot", "wrapping"])
def homes_mode(request, monkeypatch):
    """Force collisions: every key to one home, or to the last slot so that probes wrap around."""
    if request.param == "one-slot":
        monkeypatch.setattr(EntryTable, "mul", (0, 0, 0, 0))
    elif request.param == "wrapping":
        monkeypatch.setattr(EntryTable, "mul", (0, 0, 0, (1 << 64) - 1))
    return request.param


class TableMachine(RuleBasedStateMachine):
    """EntryTable against a dict: inserts, removes, lookups (hits and misses), bulk reloads."""

    MANY = 150      # keys a bulk insert adds at most (fewer where every key collides: probes are O(n))

    @initialize()
    def setup(self):
        self.codes = KeyCodes()
        self.t = EntryTable(self.codes)
        self.ref: dict[CacheEngineKey, tuple] = {}
        self.seq = 0

    def _insert(self, k, lay, off_pages, phys_pages, csum):
        kind = self.codes.kind_of(k, LAYOUTS[lay])
        self.seq += 1
        row = self.t.insert(self.codes.probe(k), kind, off_pages * PAGE, phys_pages * PAGE, csum, self.seq)
        self.ref[k] = (LAYOUTS[lay], off_pages * PAGE, phys_pages * PAGE, csum, self.seq)
        return row

    @rule(k=keys, lay=st.integers(0, 2), off=st.integers(0, 2**40 - 1), phys=st.integers(1, 2**24 - 1),
          csum=st.integers(0, 2**64 - 1))
    def insert(self, k, lay, off, phys, csum):
        if k in self.ref:
            return
        row = self._insert(k, lay, off, phys, csum)
        assert self.t.find(k) == row

    @rule(n=st.integers(1, 150), seed=st.integers(0, 2**32))
    def insert_many(self, n, seed):
        """Enough keys to grow the columns and the hash table."""
        rng = np.random.default_rng(seed)
        for _ in range(min(n, self.MANY)):
            k = CacheEngineKey(*PREFIXES[int(rng.integers(3))], make_hash(int(rng.integers(0, 2**62)) ** 3,
                                                                          int(rng.integers(4))))
            if k not in self.ref:
                self._insert(k, int(rng.integers(3)), int(rng.integers(0, 2**40)), int(rng.integers(1, 2**24)),
                             int(rng.integers(0, 2**63)))

    @precondition(lambda self: self.ref)
    @rule(i=st.integers(0, 10**6))
    def remove(self, i):
        k = list(self.ref)[i % len(self.ref)]
        row = self.t.find(k)
        assert row >= 0
        self.t.remove(row)
        del self.ref[k]
        assert self.t.find(k) == -1

    @precondition(lambda self: self.ref)
    @rule(frac=st.integers(1, 4), seed=st.integers(0, 2**32))
    def remove_many(self, frac, seed):
        ks = list(self.ref)
        rng = np.random.default_rng(seed)
        for i in rng.permutation(len(ks))[:len(ks) // frac].tolist():
            self.t.remove(self.t.find(ks[i]))
            del self.ref[ks[i]]

    @rule(k=keys)
    def lookup(self, k):
        assert (self.t.find(k) >= 0) == (k in self.ref)

    @rule()
    def reload(self):
        """What a snapshot of the table holds, loaded into a new one (the reopen path)."""
        cols = self.t.columns(self.t.live_rows())
        # Under the table's hash (replaced by the collision fixtures, like ``ident_homes`` otherwise).
        keep, packed = merge_order(cols.ops, lambda ident: kcodes.homes(ident[0], *ident_words(ident), EntryTable.mul))
        assert keep.all()
        fresh = EntryTable(KeyCodes(cols.tables))
        fresh.load(cols.ops, np.flatnonzero(keep), packed)
        self.codes, self.t = fresh.codes, fresh

    @invariant()
    def same(self):
        if not hasattr(self, "t"):
            return
        self.t.check()
        assert len(self.t) == len(self.ref)
        rows = self.t.live_rows()
        assert sorted(self.t.keys(rows), key=lambda k: k.to_string()) == sorted(self.ref, key=lambda k: k.to_string())
        for k, (lay, off, phys, csum, seq) in self.ref.items():
            e = self.t.entry(self.t.find(k))
            assert (e.key, (e.shape, e.dtype, e.fmt), e.offset, e.phys_size, e.checksum, e.seq) == \
                (k, lay, off, phys, csum, seq)
            assert e.key.to_string() == k.to_string() and hash(e.key) == hash(k)


class CollidingTableMachine(TableMachine):
    MANY = 25


def test_entry_table_against_a_dict(homes_mode):
    machine = TableMachine if homes_mode == "real" else CollidingTableMachine
    run_state_machine_as_test(machine, settings=settings(max_examples=40 if homes_mode == "real" else 25,
                                                         stateful_step_count=25, deadline=None))


def test_the_merge_hash_is_the_table_hash():
    """``ident_homes`` over a load's key columns is what the table computes for its rows."""
    codes = KeyCodes()
    t = EntryTable(codes)
    ks = [CacheEngineKey(*PREFIXES[i % 3], make_hash(i * 7919 ** 5, i % 4)) for i in range(200)]
    for k in ks:
        kind = codes.kind_of(k, LAYOUTS[1])      # interns its key class: probe knows it from then on
        t.insert(codes.probe(k), kind, 0, PAGE, 0, 1)
    cols = t.columns(t.live_rows())
    from gds_kvcache.storage.index_columns import key_ident
    rows = t.live_rows()
    assert np.array_equal(ident_homes(key_ident(cols.ops)), t._homes(rows))


def test_scalar_and_bulk_homes_agree():
    """The hash table is filled from homes computed in NumPy and probed with homes computed in Python."""
    rng = np.random.default_rng(5)
    ident, a, b = (rng.integers(0, 2**64, 1000, dtype=np.uint64) for _ in range(3))
    bulk = kcodes.homes(ident, a, b)
    assert [kcodes.home(int(i), int(x), int(y)) for i, x, y in zip(ident, a, b)] == bulk.tolist()


def test_keys_made_from_rows_are_the_keys_given():
    codes = KeyCodes()
    t = EntryTable(codes)
    rng = np.random.default_rng(1)
    given = list(dict.fromkeys(CacheEngineKey(*PREFIXES[i % 3], make_hash(int(rng.integers(0, 2**62)) ** 4, i % 4))
                               for i in range(400)))
    kinds = [codes.kind_of(k, LAYOUTS[0]) for k in given]
    rows = [t.insert(codes.probe(k), kind, 0, PAGE, 0, 1) for k, kind in zip(given, kinds)]
    made = t.keys(np.array(rows))
    assert made == given and [t.key(r) for r in rows] == given
    assert [k.to_string() for k in made] == [k.to_string() for k in given]
    assert [k.__dict__ for k in made] == [CacheEngineKey(k.fmt, k.model_name, k.world_size, k.worker_id,
                                                         k.chunk_hash).__dict__ for k in made]


class LruMachine(RuleBasedStateMachine):
    """LruClock against an ordered list; a low clock limit makes it renumber often."""

    @initialize(limit=st.sampled_from([70, 100, FREE]))
    def setup(self, limit):
        self.lru = LruClock(limit=limit)
        self.ref: OrderedDict[int, None] = OrderedDict()
        self.free: list[int] = []
        self.top = 0

    @rule(reuse=st.booleans())
    def add(self, reuse):
        if reuse and self.free:
            row = self.free.pop()
        else:
            row, self.top = self.top, self.top + 1
        self.lru.touch(row)
        self.ref[row] = None

    @precondition(lambda self: self.ref)
    @rule(i=st.integers(0, 10**6))
    def use(self, i):
        row = list(self.ref)[i % len(self.ref)]
        self.lru.touch(row)
        self.ref.move_to_end(row)

    @precondition(lambda self: self.ref)
    @rule(i=st.integers(0, 10**6))
    def forget(self, i):
        row = list(self.ref)[i % len(self.ref)]
        self.lru.forget(row)
        del self.ref[row]
        self.free.append(row)

    @precondition(lambda self: self.ref)
    @rule(skip=st.sets(st.integers(0, 60), max_size=5), n=st.integers(1, 8))
    def evict_oldest(self, skip, n):
        """What eviction does: walk, pass over rows being read, drop the first ones."""
        walk = self.lru.walk()
        dropped = 0
        for row in walk:
            if row in skip:
                continue
            assert row == next(r for r in self.ref if r not in skip)
            self.lru.forget(row)
            del self.ref[row]
            self.free.append(row)
            dropped += 1
            if dropped == n:
                break

    @rule(stop=st.integers(0, 30))
    def partial_walk(self, stop):
        got = []
        for row in self.lru.walk():
            got.append(row)
            if len(got) > stop:
                break
        assert got == list(self.ref)[:len(got)]

    @invariant()
    def same_order(self):
        if hasattr(self, "lru"):
            assert list(self.lru.walk()) == list(self.ref)
            live = np.flatnonzero(self.lru.stamps != FREE)
            assert sorted(live.tolist()) == sorted(self.ref)
            assert self.lru.order(live).tolist() == list(self.ref)


TestLruMachine = LruMachine.TestCase
TestLruMachine.settings = settings(max_examples=120, stateful_step_count=60, deadline=None)


def test_lru_candidates_are_rebuilt_past_their_end():
    """More rows than one candidate list holds (1/32 of the rows, at least 1024): the order stays exact."""
    lru = LruClock()
    lru.reset(5000)
    rng = np.random.default_rng(2)
    ref = list(range(5000))
    for row in rng.choice(5000, 2000, replace=False).tolist():   # used again: to the end
        lru.touch(row)
        ref.remove(row)
        ref.append(row)
    got = []
    for row in lru.walk():
        got.append(row)
        if len(got) % 700 == 0:
            lru.forget(row)          # dropped while the walk runs: skipped, order kept
    assert got == ref
    left = [r for i, r in enumerate(ref, 1) if i % 700]
    assert list(lru.walk()) == left
