import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gds_kvcache.memory import ExtentAllocator, MemoryFormat, SlabMemoryAllocator
from gds_kvcache.units import PAGE


class ExtentMachine(RuleBasedStateMachine):
    """Random allocate/free/reserve sequences; every step keeps all invariants."""

    @initialize(pages=st.integers(1, 512))
    def setup(self, pages):
        self.a = ExtentAllocator(pages * PAGE + 123)
        self.live = {}

    @rule(n=st.integers(1, 80 * PAGE))
    def allocate(self, n):
        off = self.a.allocate(n)
        if off is None:
            # "No room" only when no free extent is large enough.
            assert self.a.largest_free() < -(-n // PAGE) * PAGE
            return
        assert off % PAGE == 0
        size = self.a.allocated_size(off)
        assert size >= n and size % PAGE == 0
        for o, s in self.live.items():
            assert off + size <= o or o + s <= off, "overlap"
        self.live[off] = size

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 10**6))
    def free(self, i):
        off = sorted(self.live)[i % len(self.live)]
        assert self.a.free_extent(off) == self.live.pop(off)

    @invariant()
    def consistent(self):
        if hasattr(self, "a"):
            self.a.memcheck()
            assert self.a.used == sum(self.live.values())


TestExtentMachine = ExtentMachine.TestCase
TestExtentMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_full_returns_none_and_coalesces():
    a = ExtentAllocator(16 * PAGE)
    offs = [a.allocate(PAGE) for _ in range(16)]
    assert a.allocate(1) is None
    for o in offs[::2]:
        a.free_extent(o)
    assert a.allocate(2 * PAGE) is None  # fragmented: no two adjacent pages
    for o in offs[1::2]:
        a.free_extent(o)
    assert a.free_extents() == {0: 16 * PAGE}
    assert a.allocate(16 * PAGE) == 0
    a.memcheck()


def test_reserve_rebuilds_state():
    a = ExtentAllocator(64 * PAGE)
    a.reserve(8 * PAGE, 3 * PAGE)
    a.reserve(0, 100)
    with pytest.raises(ValueError):
        a.reserve(9 * PAGE, PAGE)
    with pytest.raises(ValueError):
        a.reserve(63 * PAGE, 2 * PAGE)
    a.memcheck()
    with pytest.raises(KeyError):
        a.free_extent(PAGE)


@pytest.mark.parametrize("kind", ["host", pytest.param("pinned", marks=pytest.mark.gpu),
                                  pytest.param("cuda", marks=pytest.mark.gpu)])
def test_slab_objects(kind):
    a = SlabMemoryAllocator(64 * PAGE, kind)
    assert a.buffer.tensor.data_ptr() % PAGE == 0
    o = a.allocate((3, 5, 7), torch.bfloat16, MemoryFormat.KV_2LTD)
    assert o.nbytes == 3 * 5 * 7 * 2 and o.phys_size == PAGE and o.offset % PAGE == 0
    assert o.tensor.shape == (3, 5, 7) and o.tensor.dtype == torch.bfloat16
    assert o.tensor.data_ptr() % PAGE == 0
    o.tensor.fill_(1.5)
    assert a.allocate((64 * PAGE,), torch.uint8) is None
    o.ref_count_up()
    o.ref_count_down()
    assert o.get_ref_count() == 1 and a.live_objects() == 1
    o.ref_count_down()
    assert not o.valid and a.live_objects() == 0
    with pytest.raises(ValueError):
        o.ref_count_down()
    a.memcheck()
    big = a.allocate((64 * PAGE,), torch.uint8)
    assert big is not None and big.offset == 0
    a.free(big)
    a.memcheck()
    a.close()


def test_slab_random_churn_ends_clean():
    import random

    a = SlabMemoryAllocator(256 * PAGE, "host")
    live = []
    r = random.Random(7)
    for _ in range(3000):
        if live and r.random() < 0.5:
            live.pop(r.randrange(len(live))).ref_count_down()
        else:
            o = a.allocate((r.randint(1, 20000),), torch.uint8)
            if o is not None:
                live.append(o)
    a.memcheck()
    for o in live:
        o.ref_count_down()
    a.memcheck()
    assert a.used == 0


def test_rebuild_matches_reserve_and_is_fast():
    import random
    import time

    n = 20_000
    offs = [i * 8 * PAGE for i in range(n)]
    random.Random(3).shuffle(offs)
    a = ExtentAllocator(n * 8 * PAGE)
    t = time.perf_counter()
    a.rebuild({o: 3 * PAGE + 5 for o in offs})
    elapsed = time.perf_counter() - t
    a.memcheck()
    b = ExtentAllocator(n * 8 * PAGE)
    for o in offs[:500]:
        b.reserve(o, 3 * PAGE + 5)
    c = ExtentAllocator(n * 8 * PAGE)
    c.rebuild({o: 3 * PAGE + 5 for o in offs[:500]})
    assert b.extents() == c.extents() and b.free_extents() == c.free_extents()
    assert a.used == n * 4 * PAGE and elapsed < 5  # O(n log n): 20k extents well under a second
    with pytest.raises(ValueError):
        a.rebuild({0: 2 * PAGE, PAGE: PAGE})
    with pytest.raises(ValueError):
        a.rebuild({3: PAGE})
