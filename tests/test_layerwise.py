"""Layer-wise retrieve and store (``CacheEngine.retrieve_layer``/``store_layer``) on the CPU with a host slab.

Every check is byte-exact against what was stored and against the whole-prompt
``retrieve``, on random bytes; the simulator run of the kernel path is in
``test_layer_moves_under_the_simulator``.
"""

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineMetadata
from gds_kvcache.engine import CacheEngine
from gds_kvcache.errors import ClosedError, IOEngineError, ShapeMismatchError
from gds_kvcache.kernels import describe, layer_half
from gds_kvcache.layer_moves import move_layer, runs
from gds_kvcache.layerwise import layer_key
from gds_kvcache.memory.allocator import SlabMemoryAllocator
from gds_kvcache.memory.format import MemoryFormat
from gds_kvcache.units import GB, MiB

from .helpers import random_tensor, same_bytes
from .kernel_cases import make_cache, ref_rows, zeros_like_cache

L, NB, BS, H, D, CHUNK = 3, 40, 8, 2, 16, 32
LAYOUTS = ["vllm", "flashinfer", "mla", "cross_layer"]


def config(tmp_path, layout, layerwise, local_cpu=True, name="kv"):
    return CacheEngineConfig(chunk_size=CHUNK, local_disk=str(tmp_path / name), max_local_disk_size=32 * MiB / GB,
                             max_local_cpu_size=4 * MiB / GB, slab_size=8 * MiB / GB, memory_device="host",
                             io_threads=4, use_layerwise=layerwise, local_cpu=local_cpu)


def meta(layout, layers=L):
    shape = (layers, 1, CHUNK, 1, D) if layout == "mla" else (layers, 2, CHUNK, H, D)
    return CacheEngineMetadata("org/model", 1, 0, "vllm", torch.bfloat16, shape)


def case(layout, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv = make_cache(layout, L, NB, BS, H, D, torch.bfloat16)
    tokens = torch.randint(0, 50000, (n,), generator=gen)
    src = torch.randperm(NB * BS, generator=gen)[:n]
    dst = torch.randperm(NB * BS, generator=gen)[:n]
    return kv, tokens, src, dst


def stored(eng, kv, tokens, slots):
    r = eng.store(tokens, kv, slots)
    for f in r.futures:
        f.result()
    return int(r)


def load_threads():
    return [t for t in threading.enumerate() if t.name.startswith("gds-kvcache-layer-")]


# -- the kernel path: runs of chunk objects, one call per K/V half ----------------------------------------------
def make_objs(alloc, bounds, k, lo_layers, row, gap_every=0):
    """Chunk objects for ``bounds``; with ``gap_every`` a spare object between some of them (runs break there)."""
    objs, spare = [], []
    for j, (s, e) in enumerate(bounds):
        if gap_every and j and j % gap_every == 0:
            spare.append(alloc.allocate((1, 1, 1, row), torch.bfloat16))
        o = alloc.allocate((k, lo_layers, e - s, row), torch.bfloat16, MemoryFormat.KV_2LTD)
        o.tensor.copy_(random_tensor(o.shape, torch.bfloat16))
        objs.append(o)
    return objs, spare


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("gap_every", [0, 2])
def test_move_layer_moves_exactly_one_layer(layout, per_layer, gap_every):
    K, row = (1, D) if layout == "mla" else (2, H * D)
    kv = make_cache(layout, L, NB, BS, H, D, torch.bfloat16)
    n = 150                                           # a partial last chunk: its own run
    slots = torch.randperm(NB * BS, generator=torch.Generator().manual_seed(1))[:n]
    slots[77] = -1                                    # a token without a slot: skipped both ways
    bounds = [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    alloc = SlabMemoryAllocator(8 * MiB, "host")
    try:
        objs, spare = make_objs(alloc, bounds, K, 1 if per_layer else L, row, gap_every)
        assert len(runs(objs, list(range(len(objs))))) == (2 if not gap_every else 3)
        before = [o.tensor.clone() for o in objs]
        for layer in range(L):
            lo = 0 if per_layer else layer
            move_layer(objs, list(range(len(objs))), [s for s, _ in bounds], slots, kv, layout, layer, lo, True)
            want = ref_rows(layout, kv, slots)[:, layer]
            for o, b, (s, e) in zip(objs, before, bounds):
                expect = b.clone()
                keep = (slots[s:e] >= 0).view(1, -1, 1)
                expect[:, lo] = torch.where(keep, want[:, s:e], b[:, lo])
                assert same_bytes(o.tensor, expect), (layout, layer)   # that layer's rows, nothing else
                b.copy_(o.tensor)
            dst = zeros_like_cache(layout, kv)
            move_layer(objs, list(range(len(objs))), [s for s, _ in bounds], slots, dst, layout, layer, lo, False)
            got = ref_rows(layout, dst, slots)
            assert same_bytes(got[:, layer], want)
            assert not any(got[:, x].view(torch.uint8).any() for x in range(L) if x != layer)
        for o in objs + spare:
            o.ref_count_down()
        alloc.memcheck()
    finally:
        alloc.close()


def half_view(kv, layout, layer, k):
    """Layer ``layer``'s K or V as a ``[num_blocks, block_size, row]`` view, by plain torch indexing."""
    if layout == "mla":
        return kv[layer]
    h = kv[:, layer, k] if layout == "cross_layer" else kv[layer][k] if layout == "vllm" else kv[layer][:, k]
    return h.reshape(h.shape[0], h.shape[1], -1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_half_is_the_geometry_of_the_halfs_view(layout):
    kv = make_cache(layout, L, NB, BS, H, D, torch.bfloat16)
    g = describe(layout, kv)
    for layer in range(L):
        for k in range(g.kv):
            assert layer_half(g, layer, k) == describe("mla", [half_view(kv, layout, layer, k)]), (layer, k)
    with pytest.raises(ShapeMismatchError):
        layer_half(g, L, 0)


@pytest.mark.parametrize("layout", ["vllm", "cross_layer"])
def test_warm_layer_operations_describe_nothing_and_build_no_offsets(tmp_path, monkeypatch, layout):
    """40 layers (80 K/V halves) and two caches: once warm, a retrieve_layer or store_layer neither
    describes a cache again nor builds (or drops) an offsets tensor: each would be a blocking device
    copy on a GPU, and a dropped one could still be read by a queued kernel."""
    from gds_kvcache.kernels import paged

    layers = 40
    md = meta(layout, layers)
    gen = torch.Generator().manual_seed(18)
    kv = make_cache(layout, layers, NB, BS, H, D, torch.bfloat16)
    tokens = torch.randint(0, 50000, (100,), generator=gen)
    src, dst = torch.randperm(NB * BS, generator=gen)[:100], torch.randperm(NB * BS, generator=gen)[:100]
    cfg = config(tmp_path, layout, True).replace(slab_size=32 * MiB / GB, max_local_cpu_size=16 * MiB / GB)
    with CacheEngine(cfg, md, layout) as eng:
        outs = [zeros_like_cache(layout, kv), zeros_like_cache(layout, kv)]

        def both():
            assert int(list(eng.store_layer(tokens, kv, src))[-1]) in (0, 100)
            for out in outs:
                assert list(eng.retrieve_layer(tokens, out, dst))[-1] == 100

        both()                                                  # warm
        offsets = dict(paged._OFFSETS)
        described = []
        real = paged.describe
        monkeypatch.setattr(paged, "describe", lambda *a, **k: (described.append(a[0]), real(*a, **k))[1])
        both()
        for k in [layer_key(c, 7) for c, _, _ in eng._keys(tokens.numpy())]:
            eng.storage.remove(k)                               # one layer stored again by the next store
        both()
        assert described == []
        assert paged._OFFSETS.keys() == offsets.keys() and all(paged._OFFSETS[k] is v for k, v in offsets.items())
        for out in outs:
            assert same_bytes(ref_rows(layout, out, dst), ref_rows(layout, kv, src))


def test_layer_moves_under_the_simulator():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-m", "tests.sim_layerwise"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SIMULATOR OK" in r.stdout


# -- retrieve_layer against retrieve and against what was stored ------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("n", [31, 32, 33, 96, 150])
def test_retrieve_layer_equals_retrieve_and_the_stored_kv(tmp_path, layout, layerwise, n):
    kv, tokens, src, dst = case(layout, n, seed=n)
    cfg, md = config(tmp_path, layout, layerwise), meta(layout)
    with CacheEngine(cfg, md, layout) as eng:
        assert stored(eng, kv, tokens, src) == n
    with CacheEngine(cfg, md, layout) as eng:         # a restart: nothing in the hot tier
        out = zeros_like_cache(layout, kv)
        gen = eng.retrieve_layer(tokens, out, dst)
        assert next(gen) == n == eng.lookup(tokens)
        for layer in range(L):
            assert next(gen) == n
            # Host cache: layer ``layer`` is in place when its step returns.
            assert same_bytes(ref_rows(layout, out, dst)[:, layer], ref_rows(layout, kv, src)[:, layer])
        assert next(gen) == n
        with pytest.raises(StopIteration):
            next(gen)
        whole = zeros_like_cache(layout, kv)
        assert eng.retrieve(tokens, whole, dst) == n
        assert same_bytes(ref_rows(layout, whole, dst), ref_rows(layout, out, dst))
        assert same_bytes(ref_rows(layout, out, dst), ref_rows(layout, kv, src))
        eng.storage.memcheck()
    assert not load_threads()


@pytest.mark.parametrize("layerwise", [False, True])
def test_partial_prefix_and_slotless_tokens(tmp_path, layerwise):
    kv, tokens, src, dst = case("vllm", 150, seed=5)
    with CacheEngine(config(tmp_path, "vllm", layerwise), meta("vllm"), "vllm") as eng:
        # 3 chunks of 32 and one of 4 tokens; the 4-token chunk's key is not that of tokens 96-127.
        assert stored(eng, kv, tokens[:100], src[:100]) == 100
        out = zeros_like_cache("vllm", kv)
        steps = list(eng.retrieve_layer(tokens, out, dst))             # asks for 150, finds 96
        assert steps == [96] * (L + 2)
        got, want = ref_rows("vllm", out, dst), ref_rows("vllm", kv, src)
        assert same_bytes(got[:, :, :96], want[:, :, :96]) and not got[:, :, 96:].view(torch.uint8).any()
        # A slot of -1 at token 70: chunk 2 loads its first 6 tokens, nothing at or after 70 is written.
        holes = dst.clone()
        holes[70] = -1
        out = zeros_like_cache("vllm", kv)
        assert list(eng.retrieve_layer(tokens, out, holes)) == [70] * (L + 2)
        got = ref_rows("vllm", out, holes)
        assert same_bytes(got[:, :, :70], want[:, :, :70]) and not ref_rows("vllm", out, dst)[:, :, 70:].view(
            torch.uint8).any()


def test_a_chunk_missing_in_the_middle(tmp_path):
    kv, tokens, src, dst = case("vllm", 150, seed=6)
    with CacheEngine(config(tmp_path, "vllm", False), meta("vllm"), "vllm") as eng:
        stored(eng, kv, tokens, src)
        eng.storage.remove(eng._keys(tokens.numpy())[2][0])
        out = zeros_like_cache("vllm", kv)
        assert list(eng.retrieve_layer(tokens, out, dst)) == [64] * (L + 2)
        got, want = ref_rows("vllm", out, dst), ref_rows("vllm", kv, src)
        assert same_bytes(got[:, :, :64], want[:, :, :64]) and not got[:, :, 64:].view(torch.uint8).any()


@pytest.mark.parametrize("lost", ["middle", "middle, after the plan", "first", "wrong shape"])
def test_a_layer_object_missing_or_unusable(tmp_path, monkeypatch, caplog, lost):
    """A layer lost before the call is seen by the plan (every layer is asked for, ``lookup`` asks for the
    first and last). One lost after the plan, or unusable, is found while loading: that layer on, the count
    drops to the chunks before it. Nothing of a dropped chunk is written from then on."""
    kv, tokens, src, dst = case("vllm", 150, seed=7)
    with CacheEngine(config(tmp_path, "vllm", True), meta("vllm"), "vllm") as eng:
        stored(eng, kv, tokens, src)
        chunk2 = eng._keys(tokens.numpy())[2][0]
        bad_layer = 0 if lost == "first" else 1
        if lost == "middle, after the plan":   # removed just before the loader reads that layer
            real = eng.storage.batched_get_blocking

            def losing(keys):
                if layer_key(chunk2, bad_layer) in keys:
                    eng.storage.remove(layer_key(chunk2, bad_layer))
                return real(keys)
            monkeypatch.setattr(eng.storage, "batched_get_blocking", losing)
        else:
            eng.storage.remove(layer_key(chunk2, bad_layer))
        if lost == "wrong shape":    # a readable object of another token count under the key
            obj = eng.storage.allocate((2, 1, 5, H * D), torch.bfloat16)
            for f in eng.storage.batched_submit_put_task([layer_key(chunk2, bad_layer)], [obj]):
                f.result()
        out = zeros_like_cache("vllm", kv)
        caplog.clear()
        steps = list(eng.retrieve_layer(tokens, out, dst))
        monkeypatch.undo()
        seen_late = lost in ("middle, after the plan", "wrong shape")
        if seen_late:
            assert steps == [150, 150, 64, 64, 64] and eng.lookup(tokens) == 150
            assert "missing or unusable" in caplog.text and "no slab room" not in caplog.text
        else:
            assert steps == [64] * (L + 2) and eng.lookup(tokens) == (64 if lost == "first" else 150)
        got, want = ref_rows("vllm", out, dst), ref_rows("vllm", kv, src)
        assert same_bytes(got[:, :, :64], want[:, :, :64])
        for layer in range(L):
            tail = got[:, layer, 64:]
            if seen_late and layer < bad_layer:    # released before the loss was seen: all there
                assert same_bytes(tail, want[:, layer, 64:])
            else:
                assert not tail.view(torch.uint8).any(), layer
        assert eng.retrieve(tokens, zeros_like_cache("vllm", kv), dst) == 64
        # Stored again, the chunk is complete again (a readable object of the wrong shape is not
        # replaced by a store: it is taken away first).
        if lost == "wrong shape":
            eng.storage.remove(layer_key(chunk2, bad_layer))
        assert stored(eng, kv, tokens, src) == 32
        assert list(eng.retrieve_layer(tokens, zeros_like_cache("vllm", kv), dst))[-1] == 150


def fill_slab(alloc, leave: int):
    """An object taking all of ``alloc``'s free bytes but ``leave``."""
    return alloc.allocate((alloc.free_bytes - leave,), torch.uint8)


@pytest.mark.parametrize("room", ["1.5 layers", "comes back", "never"])
def test_no_slab_room_is_not_a_loss(tmp_path, monkeypatch, caplog, room):
    """Every object is on disk, but the slab has room for few of them. The loader holds one layer at a
    time (released before the next is read), so room for 1.5 layers loads everything; with room for less
    than a layer it makes room and waits (the count holds when room comes back in time) and only then
    drops the chunks that found none, with a warning saying so (not that they are missing)."""
    from gds_kvcache import layer_load

    kv, tokens, src, dst = case("vllm", 150, seed=19)
    cfg = config(tmp_path, "vllm", True, local_cpu=False)
    with CacheEngine(cfg, meta("vllm"), "vllm") as eng:
        stored(eng, kv, tokens, src)
    with CacheEngine(cfg, meta("vllm"), "vllm") as eng:
        alloc = eng.storage.allocator
        per_layer = 5 * 4096                         # 5 chunk objects of one layer, 4 KiB each
        filler = [fill_slab(alloc, int(1.5 * per_layer) if room == "1.5 layers" else per_layer // 2)]
        if room == "comes back":                     # another holder releases its room while we wait
            real = eng.storage.wait_for_read_room

            def released(keys, timeout):
                if filler:
                    filler.pop().ref_count_down()
                return real(keys, timeout)
            monkeypatch.setattr(eng.storage, "wait_for_read_room", released)
        if room == "never":
            monkeypatch.setattr(layer_load, "ROOM_WAIT_S", 0.3)
        out = zeros_like_cache("vllm", kv)
        caplog.clear()
        steps = list(eng.retrieve_layer(tokens, out, dst))
        got, want = ref_rows("vllm", out, dst), ref_rows("vllm", kv, src)
        if room != "never":
            assert steps == [150] * (L + 2) and (room != "comes back" or not filler)
            assert same_bytes(got, want) and "missing" not in caplog.text
        else:
            n = steps[-1]
            assert steps[0] == 150 and n < 150 and n % CHUNK == 0 and set(steps[1:]) == {n}
            assert "no slab room to read layer 0" in caplog.text and "missing" not in caplog.text
            assert same_bytes(got[:, :, :n], want[:, :, :n]) and not got[:, :, n:].view(torch.uint8).any()
        for f in filler:
            f.ref_count_down()
        assert not load_threads() and alloc.free_bytes == alloc.capacity


def test_chunks_stored_whole_load_in_a_layerwise_engine(tmp_path):
    """A directory written without use_layerwise: its chunks load whole, the rest per layer."""
    kv, tokens, src, dst = case("flashinfer", 150, seed=8)
    md = meta("flashinfer")
    with CacheEngine(config(tmp_path, "flashinfer", False), md, "flashinfer") as eng:
        assert stored(eng, kv, tokens[:64], src[:64]) == 64
    with CacheEngine(config(tmp_path, "flashinfer", True), md, "flashinfer") as eng:
        assert eng.lookup(tokens) == 64
        assert stored(eng, kv, tokens, src) == 150 - 64
        eng.prefetch(tokens)
    with CacheEngine(config(tmp_path, "flashinfer", True), md, "flashinfer") as eng:
        keys = [k for k, _, _ in eng._keys(tokens.numpy())]
        assert eng.storage.batched_exists(keys) == [True, True, False, False, False]
        out = zeros_like_cache("flashinfer", kv)
        assert list(eng.retrieve_layer(tokens, out, dst)) == [150] * (L + 2)
        assert same_bytes(ref_rows("flashinfer", out, dst), ref_rows("flashinfer", kv, src))
    # Without use_layerwise an engine sees only the whole chunks (and stores the rest whole).
    with CacheEngine(config(tmp_path, "flashinfer", False), md, "flashinfer") as eng:
        assert eng.lookup(tokens) == 64
        assert stored(eng, kv, tokens, src) == 150 - 64
        keys = [k for k, _, _ in eng._keys(tokens.numpy())]
        for k in keys[2:4]:
            assert eng.storage.remove(k)
    # Whole, whole, per layer, per layer, whole: the forms alternate along the prefix.
    with CacheEngine(config(tmp_path, "flashinfer", True), md, "flashinfer") as eng:
        assert eng.lookup(tokens) == 150
        out = zeros_like_cache("flashinfer", kv)
        assert eng.retrieve(tokens, out, dst) == 150
        assert same_bytes(ref_rows("flashinfer", out, dst), ref_rows("flashinfer", kv, src))


def test_prefetch_then_retrieve_layer_releases_layer_0_before_later_layers_land(tmp_path, monkeypatch):
    """prefetch() reads one batch per layer, in layer order: with the later layers' disk reads held
    back, retrieve_layer still releases layer 0 (its bytes in place), and the rest once they land."""
    kv, tokens, src, dst = case("vllm", 150, seed=20)
    cfg = config(tmp_path, "vllm", True)
    with CacheEngine(cfg, meta("vllm"), "vllm") as eng:
        stored(eng, kv, tokens, src)
    with CacheEngine(cfg, meta("vllm"), "vllm") as eng:
        chunks = [k for k, _, _ in eng._keys(tokens.numpy())]
        later = {layer_key(c, layer) for c in chunks for layer in range(1, L)}
        disk, gate, landed = eng.storage.disk, threading.Event(), []
        real_read = disk._read

        def held_back(keys, want=None):
            if later & set(keys):
                gate.wait(10)
            out = real_read(keys, want)
            landed.extend(k for k in keys if k in later)
            return out

        monkeypatch.setattr(disk, "_read", held_back)
        batches = []
        real_prefetch = eng.storage.batched_submit_prefetch_task
        monkeypatch.setattr(eng.storage, "batched_submit_prefetch_task",
                            lambda keys: (batches.append(list(keys)), real_prefetch(keys))[1])
        try:
            eng.prefetch(tokens)
            assert batches == [[layer_key(c, layer) for c in chunks] for layer in range(L)]
            out = zeros_like_cache("vllm", kv)
            steps = eng.retrieve_layer(tokens, out, dst)
            assert next(steps) == 150 and next(steps) == 150
            assert landed == []                 # layer 0 was released before any later layer landed
            assert same_bytes(ref_rows("vllm", out, dst)[:, 0], ref_rows("vllm", kv, src)[:, 0])
        finally:
            gate.set()
        assert list(steps) == [150] * L
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))


# -- store_layer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layerwise", [False, True])
def test_store_layer_equals_store(tmp_path, layout, layerwise):
    kv, tokens, src, dst = case(layout, 150, seed=9)
    md = meta(layout)
    a = CacheEngine(config(tmp_path, layout, layerwise, name="a"), md, layout)
    b = CacheEngine(config(tmp_path, layout, layerwise, name="b"), md, layout)
    try:
        assert stored(a, kv, tokens[:40], src[:40]) == 40            # a chunk of 32 and one of 8 tokens
        gen = b.store_layer(tokens[:40], kv, src[:40])
        assert [next(gen) for _ in range(L)] == [None] * L
        r = next(gen)
        assert int(r) == 40
        for f in r.futures:
            f.result()
        with pytest.raises(StopIteration):
            next(gen)
        # The rest, layer by layer on b and at once on a: the same counts, the same keys, the same bytes.
        ra, rb = a.store(tokens, kv, src), list(b.store_layer(tokens, kv, src))[-1]
        assert int(ra) == int(rb) == 150 - 32
        for f in list(ra.futures) + list(rb.futures):
            f.result()
        keys = [k for k, _, _ in a._keys(tokens.numpy())]
        every = keys + [layer_key(k, layer) for k in keys for layer in range(L)]
        assert a.storage.batched_exists(every) == b.storage.batched_exists(every)
        assert all(b.storage.batched_exists(keys if not layerwise else every[len(keys):]))
        assert int(a.store(tokens, kv, src)) == int(list(b.store_layer(tokens, kv, src))[-1]) == 0
        for eng in (a, b):
            out = zeros_like_cache(layout, kv)
            assert eng.retrieve(tokens, out, dst) == 150
            assert same_bytes(ref_rows(layout, out, dst), ref_rows(layout, kv, src))
    finally:
        a.close()
        b.close()


def test_store_layer_of_whole_chunks_holds_at_most_a_quarter_slab_and_stores_what_store_does(tmp_path, monkeypatch):
    """Without use_layerwise, a prompt larger than the slab: store() goes in quarter-slab batches, each
    waiting for the room the last frees; store_layer packs the first batch layer by layer and the rest
    whole at the last step in the same batches, so it stores the same (the whole prompt), and never asks
    for more than a quarter of the slab at once."""
    layers, n = 8, NB * BS                      # every slot of the cache: 320 tokens, 320 KiB of KV
    gen = torch.Generator().manual_seed(22)
    kv = make_cache("vllm", layers, NB, BS, H, D, torch.bfloat16)
    tokens = torch.randint(0, 50000, (n,), generator=gen)
    src, dst = torch.randperm(NB * BS, generator=gen)[:n], torch.randperm(NB * BS, generator=gen)[:n]
    got = {}
    for how in ("store", "store_layer"):
        cfg = config(tmp_path, "vllm", False, name=how).replace(slab_size=MiB / 4 / GB, max_local_cpu_size=MiB / 4 / GB)
        with CacheEngine(cfg, meta("vllm", layers), "vllm") as eng:
            quarter, asked = eng.storage.allocator.capacity // 4, []
            real = eng.storage.batched_allocate

            def allocate(shapes, dtype, **kw):
                asked.append(sum(math.prod(s) for s in shapes) * dtype.itemsize)
                return real(shapes, dtype, **kw)

            monkeypatch.setattr(eng.storage, "batched_allocate", allocate)
            r = eng.store(tokens, kv, src) if how == "store" else list(eng.store_layer(tokens, kv, src))[-1]
            for f in r.futures:
                f.result()
            monkeypatch.undo()
            got[how] = int(r)
            assert asked and max(asked) <= quarter, (how, asked, quarter)
            assert eng.lookup(tokens) == n
            out = zeros_like_cache("vllm", kv)
            assert eng.retrieve(tokens, out, dst) == n
            assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))
    assert got == {"store": n, "store_layer": n}


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_slot_mapping_is_copied_at_the_call(tmp_path, layerwise):
    """The caller refills its mapping buffer (a tensor, a NumPy array) right after the call, before the
    first step: the operations still use the mapping they were given."""
    kv, tokens, src, dst = case("vllm", 150, seed=24)
    with CacheEngine(config(tmp_path, "vllm", layerwise), meta("vllm"), "vllm") as eng:
        buf = src.numpy().copy()
        steps = eng.store_layer(tokens, kv, buf)
        buf[:] = np.roll(buf, 1)
        assert int(list(steps)[-1]) == 150
        out = zeros_like_cache("vllm", kv)
        assert eng.retrieve(tokens, out, dst) == 150
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))
        buf = dst.clone()
        out = zeros_like_cache("vllm", kv)
        steps = eng.retrieve_layer(tokens, out, buf)
        buf.copy_(buf.roll(1))
        assert list(steps) == [150] * (L + 2)
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))


# -- errors: our own, and the engine stays usable -------------------------------------------------------------------
@pytest.mark.parametrize("layerwise", [False, True])
def test_wrong_layer_count_is_refused_at_the_call(tmp_path, layerwise):
    kv, tokens, src, dst = case("vllm", 100, seed=10)
    with CacheEngine(config(tmp_path, "vllm", layerwise), meta("vllm"), "vllm") as eng:
        stored(eng, kv, tokens, src)
        for bad in (kv[:2], kv + [kv[0].clone()]):
            with pytest.raises(ShapeMismatchError, match="layers"):
                eng.retrieve_layer(tokens, bad, dst)
            with pytest.raises(ShapeMismatchError, match="layers"):
                eng.store_layer(tokens, bad, src)
        out = zeros_like_cache("vllm", kv)
        assert list(eng.retrieve_layer(tokens, out, dst))[-1] == 100
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_generators_abandoned_early(tmp_path, layerwise, steps):
    """Closed (or dropped) after ``steps`` steps: the work stops, nothing is leaked, nothing half-stored
    counts, and the engine serves the next call."""
    kv, tokens, src, dst = case("vllm", 150, seed=11)
    with CacheEngine(config(tmp_path, "vllm", layerwise, local_cpu=False), meta("vllm"), "vllm") as eng:
        alloc = eng.storage.allocator
        gen = eng.store_layer(tokens, kv, src)
        for _ in range(steps):
            next(gen)
        gen.close()
        assert not load_threads()
        assert eng.storage.disk.wait_for_puts(60)
        assert eng.lookup(tokens) == 0 and alloc.free_bytes == alloc.capacity
        assert stored(eng, kv, tokens, src) == 150

        gen = eng.retrieve_layer(tokens, zeros_like_cache("vllm", kv), dst)
        for _ in range(steps):
            next(gen)
        del gen                                                    # dropped, not closed
        assert not load_threads() and alloc.free_bytes == alloc.capacity
        out = zeros_like_cache("vllm", kv)
        assert list(eng.retrieve_layer(tokens, out, dst))[-1] == 150
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))
        eng.storage.memcheck()


@pytest.mark.parametrize("layerwise", [False, True])
def test_close_during_layerwise_operations(tmp_path, layerwise):
    kv, tokens, src, dst = case("vllm", 150, seed=12)
    cfg, md = config(tmp_path, "vllm", layerwise), meta("vllm")
    with CacheEngine(cfg, md, "vllm") as eng:
        stored(eng, kv, tokens, src)
    eng = CacheEngine(cfg, md, "vllm")
    load = eng.retrieve_layer(tokens, zeros_like_cache("vllm", kv), dst)
    assert next(load) == 150 and next(load) == 150
    store = eng.store_layer(tokens[:40], kv, src[:40])
    next(store)
    eng.close()
    assert not load_threads()
    for gen in (load, store):
        with pytest.raises(ClosedError):
            next(gen)
        with pytest.raises(StopIteration):
            next(gen)
    for call in (eng.retrieve_layer, eng.store_layer):
        with pytest.raises(ClosedError):
            call(tokens, kv, src)
    # The directory was released: a new engine opens it and reads it.
    with CacheEngine(cfg, md, "vllm") as again:
        out = zeros_like_cache("vllm", kv)
        assert list(again.retrieve_layer(tokens, out, dst))[-1] == 150
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("own_storage", [False, True])
def test_generators_made_before_close_and_started_after_it(tmp_path, layerwise, own_storage):
    """Made before close(), first advanced after it: ClosedError, nothing written, then exhausted, with
    the engine's own storage or a caller's (which stays open and usable)."""
    from gds_kvcache.storage.storage_manager import StorageManager

    kv, tokens, src, dst = case("vllm", 150, seed=23)
    cfg, md = config(tmp_path, "vllm", layerwise), meta("vllm")
    with CacheEngine(cfg, md, "vllm") as eng:
        stored(eng, kv, tokens, src)
    other = torch.randint(0, 50000, (64,), generator=torch.Generator().manual_seed(98))
    shared = None if own_storage else StorageManager(cfg, md)
    try:
        eng = CacheEngine(cfg, md, "vllm", storage=shared)
        out = zeros_like_cache("vllm", kv)
        load = eng.retrieve_layer(tokens, out, dst)
        store = eng.store_layer(other, kv, src[:64])
        eng.close()
        for gen in (load, store):
            with pytest.raises(ClosedError):
                next(gen)
            with pytest.raises(StopIteration):
                next(gen)
        assert not load_threads()
        assert not ref_rows("vllm", out, dst).view(torch.uint8).any()
        if shared is not None:
            with CacheEngine(cfg, md, "vllm", storage=shared) as again:
                assert again.lookup(other) == 0 and again.lookup(tokens) == 150
    finally:
        if shared is not None:
            shared.close()


@pytest.mark.parametrize("layerwise", [False, True])
def test_a_read_error_reaches_the_caller_and_the_engine_goes_on(tmp_path, layerwise, monkeypatch):
    kv, tokens, src, dst = case("vllm", 150, seed=13)
    with CacheEngine(config(tmp_path, "vllm", layerwise), meta("vllm"), "vllm") as eng:
        stored(eng, kv, tokens, src)
        real = eng.storage.batched_get_blocking

        def failing(keys):
            raise IOEngineError("injected read failure")

        monkeypatch.setattr(eng.storage, "batched_get_blocking", failing)
        gen = eng.retrieve_layer(tokens, zeros_like_cache("vllm", kv), dst)
        assert next(gen) == 150
        with pytest.raises(IOEngineError, match="injected"):
            next(gen)
        with pytest.raises(StopIteration):
            next(gen)
        monkeypatch.setattr(eng.storage, "batched_get_blocking", real)
        out = zeros_like_cache("vllm", kv)
        assert list(eng.retrieve_layer(tokens, out, dst))[-1] == 150
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))


def test_two_operations_interleaved_on_one_engine(tmp_path):
    kv, tokens, src, dst = case("cross_layer", 150, seed=14)
    other = torch.randint(0, 50000, (64,), generator=torch.Generator().manual_seed(99))
    with CacheEngine(config(tmp_path, "cross_layer", True), meta("cross_layer"), "cross_layer") as eng:
        stored(eng, kv, tokens, src)
        out = zeros_like_cache("cross_layer", kv)
        load = eng.retrieve_layer(tokens, out, dst)
        store = eng.store_layer(other, kv, src[:64])
        got = []
        for _ in range(L):
            got.append(next(load))
            next(store)
        got.append(next(load))
        assert int(next(store)) == 64 and got == [150] * (L + 1) and next(load) == 150
        assert same_bytes(ref_rows("cross_layer", out, dst), ref_rows("cross_layer", kv, src))
        assert eng.lookup(other) == 64


# -- shared mode: another writer's per-layer chunks -----------------------------------------------------------------
@pytest.fixture
def redis_url():
    pytest.importorskip("redis", reason="the 'redis' client package is not installed (pip install redis)")
    url = os.environ.get("GDS_KVCACHE_REDIS_URL")
    if url:       # scripts/ci-redis.sh started one; a new directory gets a namespace of its own in it
        yield url
        return
    from gds_kvcache.shared import LocalRedis, find_redis_server

    if find_redis_server() is None:
        pytest.skip("no redis-server binary (scripts/ci-redis.sh installs one)")
    r = LocalRedis()
    yield r.url
    r.stop()


def test_shared_mode_reads_another_writers_layers(tmp_path, redis_url):
    kv, tokens, src, dst = case("vllm", 150, seed=15)
    cfg = config(tmp_path, "vllm", True).replace(lookup_server_url=redis_url, io_engine="posix")
    with CacheEngine(cfg, meta("vllm"), "vllm") as a, CacheEngine(cfg, meta("vllm"), "vllm") as b:
        assert a.storage.disk.writer != b.storage.disk.writer
        assert stored(a, kv, tokens, src) == 150
        assert b.lookup(tokens) == 150 and int(b.store(tokens, kv, src)) == 0
        out = zeros_like_cache("vllm", kv)
        assert list(b.retrieve_layer(tokens, out, dst)) == [150] * (L + 2)
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))
        assert b.storage.disk.stats["remote_hits"] >= 5 * L


# -- the benchmark script, tiny on the CPU --------------------------------------------------------------------------
def test_bench_script_tiny_on_the_cpu(tmp_path):
    """Runs end to end, verifies the bytes and the logits, writes its JSON (timings on 2 shared cores mean nothing).
    A subprocess: the script's own ``sys.path`` (transformers may import an unrelated ``kernels`` package, which
    the repository's ``kernels/`` directory would shadow from the repository root)."""
    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench_layerwise.py"), "--tiny", "--cached", "160",
                        "--new", "24", "--layers", "2", "--chunk", "32", "--reps", "1", "--dir", str(tmp_path),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json
    rows = json.loads((tmp_path / "out" / "bench_layerwise.json").read_text())["rows"]
    assert [x["format"] for x in rows] == ["layered", "whole"]
    for x in rows:
        assert x["exact"] and x["logits d == c"] and x["within bf16 tol"] and x["stored tokens"] == 160
        assert set(x["loaded tokens"]) == {160} and len(x["d ms all"]) == 1


# -- GPU: stream order (run on the device machine) ------------------------------------------------------------------
def gpu_config(tmp_path, layerwise, engine):
    where = tmp_path / "kv"
    if engine == "mapped":               # the mapped engine wants a RAM-backed directory
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        import tempfile
        where = Path(tempfile.mkdtemp(prefix="gds_kvcache-test-", dir="/dev/shm")) / "kv"
    return CacheEngineConfig(chunk_size=CHUNK, local_disk=str(where), max_local_disk_size=32 * MiB / GB,
                             max_local_cpu_size=4 * MiB / GB, slab_size=8 * MiB / GB, memory_device="cuda",
                             io_engine=engine, io_threads=4, use_layerwise=layerwise)


@pytest.mark.gpu
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("engine", ["posix", "mapped"])
def test_gpu_layer_steps_are_stream_ordered(tmp_path, layerwise, engine):
    """On a side stream of the caller's: a store whose layers are written after a GPU sleep stores them, and
    work queued after retrieve step ``l`` (and before the first step) sees exactly layer ``l``'s KV."""
    import shutil

    cfg, md = gpu_config(tmp_path, layerwise, engine), meta("vllm")
    kv, tokens, src, dst = case("vllm", 150, seed=21)
    kv = [x.cuda() for x in kv]
    src, dst = src.cuda(), dst.cuda()
    want = ref_rows("vllm", kv, src)
    torch.cuda.synchronize()                             # the copies above ran on the default stream
    caller = torch.cuda.Stream()
    try:
        with CacheEngine(cfg, md, "vllm") as eng, torch.cuda.stream(caller):
            late = [torch.zeros_like(x) for x in kv]
            steps = eng.store_layer(tokens, late, src)
            for layer in range(L):
                torch.cuda._sleep(20_000_000)            # the layer is produced late on the caller's stream
                late[layer].copy_(kv[layer])
                next(steps)
            r = next(steps)
            for f in r.futures:
                f.result()
            assert int(r) == 150
        with CacheEngine(cfg, md, "vllm") as eng, torch.cuda.stream(caller):
            out = [torch.full_like(x, 7) for x in kv]
            torch.cuda._sleep(20_000_000)
            for x in out:
                x.zero_()                                # queued before the first step: runs before any copy
            steps = eng.retrieve_layer(tokens, out, dst)
            assert next(steps) == 150
            snaps = []
            for layer in range(L):
                assert next(steps) == 150
                snaps.append(ref_rows("vllm", out, dst)[:, layer].clone())   # queued on the caller's stream
            assert next(steps) == 150
            caller.synchronize()
            for layer in range(L):
                assert same_bytes(snaps[layer], want[:, layer]), layer
            assert same_bytes(ref_rows("vllm", out, dst), want)
            eng.storage.memcheck()
    finally:
        if engine == "mapped":
            shutil.rmtree(Path(cfg.local_disk).parent, ignore_errors=True)


# -- slab objects stay alive until their packs ran (a put may drop them at once) ----------------------------------
def spy_puts(monkeypatch, storage, lie: bool):
    """Every object a put dropped before returning (on a GPU its pack may still be queued). With ``lie``
    another writer stores every chunk between the caller's check and its put: ``batched_exists`` says
    False outside puts."""
    real, exists, dropped, in_put = storage.batched_submit_put_task, storage.batched_exists, [], []

    def spy(keys, objs):
        objs = list(objs)
        in_put.append(1)
        try:
            out = real(keys, objs)
        finally:
            in_put.pop()
        dropped.extend(o for o in objs if not o.valid)
        return out

    monkeypatch.setattr(storage, "batched_submit_put_task", spy)
    if lie:
        monkeypatch.setattr(storage, "batched_exists", lambda ks: exists(ks) if in_put else [False] * len(ks))
    return dropped


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("how, layerwise, race", [
    ("store", True, "layer lost"), ("store_layer", True, "layer lost"),
    ("store", False, "racing writer"), ("store", True, "racing writer"),
    ("store_layer", False, "racing writer"), ("store_layer", True, "racing writer")])
def test_no_object_is_freed_before_its_pack_ran(tmp_path, monkeypatch, how, layerwise, race, device):
    """A put skips keys stored already and drops their objects at once. Every object handed to a put is
    still held by the engine when the put returns (released only once the pack that wrote it has run: on
    the host at once after the put, on a GPU when its stream passed the pack), and is released in the end."""
    kv, tokens, src, dst = case("vllm", 150, seed=16)
    cfg = config(tmp_path, "vllm", layerwise, local_cpu=False)
    if device == "cuda":
        cfg = cfg.replace(memory_device="cuda")
        kv, src, dst = [x.cuda() for x in kv], src.cuda(), dst.cuda()
    with CacheEngine(cfg, meta("vllm"), "vllm") as eng:
        alloc = eng.storage.allocator
        assert stored(eng, kv, tokens, src) == 150
        keys = [k for k, _, _ in eng._keys(tokens.numpy())]
        if race == "layer lost":      # chunk 2 keeps layers 0 and 2 (a store rewrites layer 1)
            eng.storage.remove(layer_key(keys[2], 1))
        dropped = spy_puts(monkeypatch, eng.storage, lie=race == "racing writer")
        r = eng.store(tokens, kv, src) if how == "store" else list(eng.store_layer(tokens, kv, src))[-1]
        for f in r.futures:
            f.result()
        assert dropped == []
        assert eng.storage.disk.wait_for_puts(60)
        monkeypatch.undo()
        if device == "cuda":
            torch.cuda.synchronize()  # the packs ran: the next engine call lets their objects go
        out = zeros_like_cache("vllm", kv)
        assert list(eng.retrieve_layer(tokens, out, dst))[-1] == 150
        assert same_bytes(ref_rows("vllm", out, dst), ref_rows("vllm", kv, src))
        eng.storage.memcheck()
        assert alloc.free_bytes == alloc.capacity             # and nothing is kept after that


def test_store_layer_writes_only_the_missing_layer_objects(tmp_path, monkeypatch):
    kv, tokens, src, dst = case("vllm", 150, seed=17)
    with CacheEngine(config(tmp_path, "vllm", True), meta("vllm"), "vllm") as eng:
        stored(eng, kv, tokens, src)
        keys = [k for k, _, _ in eng._keys(tokens.numpy())]
        eng.storage.remove(layer_key(keys[2], 1))
        eng.storage.remove(layer_key(keys[3], 2))
        put = []
        real = eng.storage.batched_submit_put_task
        monkeypatch.setattr(eng.storage, "batched_submit_put_task",
                            lambda ks, objs: (put.extend(ks), real(ks, objs))[1])
        assert int(list(eng.store_layer(tokens, kv, src))[-1]) == 64
        assert sorted(k.chunk_hash for k in put) == sorted([layer_key(keys[2], 1).chunk_hash,
                                                            layer_key(keys[3], 2).chunk_hash])
