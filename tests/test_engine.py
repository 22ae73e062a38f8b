import warnings

import numpy as np
import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineMetadata, ShapeMismatchError
from gds_kvcache.engine import CacheEngine
from gds_kvcache.token_hash import geometry_seed, prefix_hashes
from gds_kvcache.units import GB, MiB

from .kernel_cases import make_cache, ref_rows, zeros_like_cache
from .helpers import random_tensor, same_bytes

DIMS = dict(L=3, nb=40, bs=8, h=2, d=16)


def setup(tmp_path, layout, chunk=32, device="cpu", engine="auto", h=None, d=None, dtype=torch.bfloat16):
    L, h, d = DIMS["L"], h or DIMS["h"], d or DIMS["d"]
    kv_shape = (L, 1, chunk, 1, d) if layout == "mla" else (L, 2, chunk, h, d)
    cfg = CacheEngineConfig(chunk_size=chunk, local_disk=str(tmp_path / "kv"), max_local_disk_size=32 * MiB / GB,
                            max_local_cpu_size=4 * MiB / GB, slab_size=8 * MiB / GB, io_engine=engine,
                            memory_device="cuda" if device == "cuda" else "host", io_threads=4)
    md = CacheEngineMetadata("org/model", 1, 0, "vllm", dtype, kv_shape)
    return cfg, md


def run_e2e(tmp_path, layout, device="cpu", engine="auto", n_tokens=150):
    cfg, md = setup(tmp_path, layout, device=device, engine=engine)
    kv = make_cache(layout, DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16, device)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50000, (n_tokens,), generator=gen)
    nslots = DIMS["nb"] * DIMS["bs"]
    slots = torch.randperm(nslots, generator=gen)[:n_tokens].to(device)
    with CacheEngine(cfg, md, layout) as eng:
        r = eng.store(tokens, kv, slots)
        assert int(r) == n_tokens
        for f in r.futures:
            f.result()
        assert int(eng.store(tokens, kv, slots)) == 0  # already stored: skipped
        assert eng.lookup(tokens) == n_tokens
        # A sequence sharing only a prefix: exactly the shared full chunks.
        other = tokens.clone()
        other[70] += 1
        assert eng.lookup(other) == 64
        assert eng.lookup(tokens[:40]) == 32
        kv2 = zeros_like_cache(layout, kv)
        slots2 = torch.randperm(nslots, generator=gen)[:n_tokens].to(device)
        assert eng.retrieve(tokens, kv2, slots2) == n_tokens
        assert same_bytes(ref_rows(layout, kv2, slots2), ref_rows(layout, kv, slots))
        assert eng.retrieve(other, zeros_like_cache(layout, kv), slots2) == 64
        eng.storage.memcheck()
    # A restart: a second engine on the same directory retrieves the same bytes.
    with CacheEngine(cfg, md, layout) as eng:
        assert eng.lookup(tokens) == n_tokens
        kv3 = zeros_like_cache(layout, kv)
        eng.prefetch(tokens)
        assert eng.retrieve(tokens, kv3, slots2) == n_tokens
        assert same_bytes(ref_rows(layout, kv3, slots2), ref_rows(layout, kv, slots))
        eng.storage.memcheck()


@pytest.mark.parametrize("layout", ["vllm", "flashinfer", "mla", "cross_layer"])
def test_store_wipe_retrieve_restart(tmp_path, layout, engine_name):
    run_e2e(tmp_path, layout, engine=engine_name)


def test_retrieve_stops_at_first_missing_chunk(tmp_path):
    cfg, md = setup(tmp_path, "vllm")
    kv = make_cache("vllm", 3, 40, 8, 2, 16, torch.bfloat16)
    tokens = list(range(100))
    slots = torch.arange(100)
    with CacheEngine(cfg, md, "vllm") as eng:
        for f in eng.store(tokens, kv, slots).futures:
            f.result()
        keys = eng._keys(tokens)
        eng.storage.remove(keys[1][0])
        assert eng.lookup(tokens) == 32
        assert eng.retrieve(tokens, zeros_like_cache("vllm", kv), slots) == 32


def test_prefix_hash_is_stable_across_processes():
    import subprocess
    import sys

    toks = list(range(1000, 1300))
    here = prefix_hashes(toks, 64)
    code = "from gds_kvcache.token_hash import prefix_hashes; print(prefix_hashes(list(range(1000, 1300)), 64))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "123",
                         "PATH": "/usr/bin:/bin"}, timeout=120).stdout
    assert out.strip() == str(here)
    assert prefix_hashes(torch.tensor(toks, dtype=torch.int32), 64) == here
    assert len(here) == 5 and prefix_hashes(toks[:64], 64)[0] == here[0]
    assert prefix_hashes(toks[:63], 64)[0] != here[0]
    # Golden values: a change to the hash scheme breaks every stored cache.
    assert prefix_hashes([1, 2, 3], 2) == ["440a0cd2fdcc60512c67a9fa2d84bae5", "34e1cdf0f60e92b60d6c87b66d859036"]
    seed = geometry_seed("vllm", torch.bfloat16, (32, 2, 256, 8, 128))
    assert seed == b"layout=vllm;dtype=bfloat16;num_layers=32;kv=2;heads=8;head_size=128;chunk_size=256"
    assert prefix_hashes([1, 2, 3], 2, seed) == ["7c26d173b75657eba3c4644d22f451da",
                                                 "117c85fb2bc2f98432349b5667d47929"]
    code = ("import torch; from gds_kvcache.token_hash import geometry_seed, prefix_hashes; "
            "print(prefix_hashes(list(range(1000, 1300)), 64, geometry_seed('vllm', torch.bfloat16, (32, 2, 64, 8, "
            "128))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "7",
                         "PATH": "/usr/bin:/bin"}, timeout=120).stdout
    assert out.strip() == str(prefix_hashes(toks, 64, geometry_seed("vllm", torch.bfloat16, (32, 2, 64, 8, 128))))


def test_engine_rejects_mismatched_metadata(tmp_path):
    cfg, md = setup(tmp_path, "vllm")
    with pytest.raises(ShapeMismatchError):
        CacheEngine(cfg, md, "mla")
    with pytest.raises(ShapeMismatchError):
        CacheEngine(cfg.replace(chunk_size=16), md, "vllm")
    with pytest.raises(ShapeMismatchError):
        CacheEngine(cfg, md, "paged")


# -- input safety -------------------------------------------------------------------------------------------------


def _stored(eng, tokens, kv, slots):
    r = eng.store(tokens, kv, slots)
    for f in r.futures:
        f.result()
    return int(r)


def _tokens(n=150, seed=5):
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed))


def _slots(n=150, seed=6):
    return torch.randperm(DIMS["nb"] * DIMS["bs"], generator=torch.Generator().manual_seed(seed))[:n]


@pytest.mark.parametrize("bad,expect", [(0, 0), (40, 32), (64, 64), (100, 96), (149, 128)])
def test_store_keeps_only_whole_chunks_before_first_negative_slot(tmp_path, bad, expect):
    # vLLM pads slot_mapping with -1; the row of such a slot is never packed, so a
    # chunk holding one would persist stale slab bytes (another prompt's KV).
    cfg, md = setup(tmp_path, "vllm")
    kv = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
    tokens, slots = _tokens(), _slots()
    slots[bad] = -1
    slots[bad + 1:bad + 3] = -7  # any negative value means "no slot"
    with CacheEngine(cfg, md, "vllm") as eng:
        assert _stored(eng, tokens, kv, slots) == expect
        assert eng.lookup(tokens) == expect
        kv2 = zeros_like_cache("vllm", kv)
        good = _slots(seed=9)
        assert eng.retrieve(tokens, kv2, good) == expect
        assert same_bytes(ref_rows("vllm", kv2, good[:expect]), ref_rows("vllm", kv, slots[:expect]))
        # Once the slots are valid, the rest of the sequence is stored after the kept prefix.
        assert _stored(eng, tokens, kv, _slots()) == 150 - expect
        eng.storage.memcheck()


@pytest.mark.parametrize("layout", ["vllm", "cross_layer"])
@pytest.mark.parametrize("first,last", [(70, 71), (100, 150)])
def test_retrieve_writes_nothing_from_first_negative_slot(tmp_path, layout, first, last):
    cfg, md = setup(tmp_path, layout)
    kv = make_cache(layout, DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
    tokens, slots = _tokens(), _slots()
    with CacheEngine(cfg, md, layout) as eng:
        assert _stored(eng, tokens, kv, slots) == 150
        kv2 = make_cache(layout, DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
        before = [t.clone() for t in kv2] if isinstance(kv2, list) else kv2.clone()
        slots2 = _slots(seed=11)
        slots2[first:last] = -1
        # Loads what it can: the tokens before the first slotless one.
        assert eng.retrieve(tokens, kv2, slots2) == first
        assert same_bytes(ref_rows(layout, kv2, slots2[:first]), ref_rows(layout, kv, slots[:first]))
        # Every other slot, the valid ones after the gap included, is untouched.
        written = set(slots2[:first].tolist())
        others = torch.tensor([x for x in range(DIMS["nb"] * DIMS["bs"]) if x not in written])
        assert same_bytes(ref_rows(layout, kv2, others), ref_rows(layout, before, others))
        eng.storage.memcheck()


@pytest.mark.parametrize("change", ["heads", "dtype"])
def test_other_geometry_misses_and_coexists(tmp_path, change):
    # Same model name and the same stored chunk shape (kv, L, T, H*D): only the
    # geometry tells them apart, and it must.
    cfg, md_a = setup(tmp_path, "vllm")
    layout_b = "flashinfer" if change == "layout" else "vllm"
    h_b, d_b = (1, 2 * DIMS["d"]) if change == "heads" else (DIMS["h"], DIMS["d"])
    dtype_b = torch.float16 if change == "dtype" else torch.bfloat16
    _, md_b = setup(tmp_path, layout_b, h=h_b, d=d_b, dtype=dtype_b)
    kv_a = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
    kv_b = make_cache(layout_b, DIMS["L"], DIMS["nb"], DIMS["bs"], h_b, d_b, dtype_b)
    tokens, slots = _tokens(), _slots()
    with CacheEngine(cfg, md_a, "vllm") as eng:
        assert _stored(eng, tokens, kv_a, slots) == 150
    with CacheEngine(cfg, md_b, layout_b) as eng:
        assert eng.lookup(tokens) == 0
        dst = make_cache(layout_b, DIMS["L"], DIMS["nb"], DIMS["bs"], h_b, d_b, dtype_b)
        before = [t.clone() for t in dst]
        assert eng.retrieve(tokens, dst, slots) == 0
        assert all(same_bytes(x, y) for x, y in zip(dst, before))
        assert _stored(eng, tokens, kv_b, slots) == 150
    for md, layout, src in ((md_a, "vllm", kv_a), (md_b, layout_b, kv_b)):
        with CacheEngine(cfg, md, layout) as eng:
            dst = zeros_like_cache(layout, src)
            assert eng.retrieve(tokens, dst, slots) == 150
            assert same_bytes(ref_rows(layout, dst, slots), ref_rows(layout, src, slots))


def test_layouts_with_the_same_chunk_bytes_share_chunks(tmp_path):
    # vllm and flashinfer caches pack identical chunk bytes: a chunk stored from
    # one is a hit, with the same KV, for the other.
    cfg, md = setup(tmp_path, "vllm")
    src = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
    tokens, slots = _tokens(), _slots()
    with CacheEngine(cfg, md, "vllm") as eng:
        assert _stored(eng, tokens, src, slots) == 150
    with CacheEngine(cfg, md, "flashinfer") as eng:
        assert eng.lookup(tokens) == 150
        dst = zeros_like_cache("flashinfer", make_cache("flashinfer", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"],
                                                        DIMS["d"], torch.bfloat16))
        assert eng.retrieve(tokens, dst, slots) == 150
        assert same_bytes(ref_rows("flashinfer", dst, slots), ref_rows("vllm", src, slots))


def test_retrieve_rechecks_stored_chunk_shape(tmp_path):
    # Second line of defence behind the geometry seed: a chunk of another dtype
    # under this engine's key is not unpacked.
    cfg, md = setup(tmp_path, "vllm")
    tokens, slots = _tokens(64), _slots(64)
    with CacheEngine(cfg, md, "vllm") as eng:
        key = eng._keys(tokens.numpy())[0][0]
        obj = eng.storage.allocate((2, DIMS["L"], 32, DIMS["h"] * DIMS["d"]), torch.float16)
        obj.tensor.copy_(random_tensor(obj.tensor.shape, torch.float16))
        fut = eng.storage.put(key, obj)
        if fut is not None:
            fut.result()
        assert eng.lookup(tokens) == 32
        dst = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
        before = [t.clone() for t in dst]
        assert eng.retrieve(tokens, dst, slots) == 0
        assert all(same_bytes(x, y) for x, y in zip(dst, before))
        eng.storage.memcheck()


@pytest.mark.parametrize("what", ["heads", "layers", "dtype"])
def test_cache_not_matching_metadata_is_rejected(tmp_path, what):
    cfg, md = setup(tmp_path, "vllm")
    L, h, d, dtype = DIMS["L"], DIMS["h"], DIMS["d"], torch.bfloat16
    if what == "heads":
        h, d = 1, 2 * d  # same row size: pack/unpack alone cannot tell
    elif what == "layers":
        L += 1
    else:
        dtype = torch.float16
    kv = make_cache("vllm", L, DIMS["nb"], DIMS["bs"], h, d, dtype)
    tokens, slots = _tokens(), _slots()
    with CacheEngine(cfg, md, "vllm") as eng:
        with pytest.raises(ShapeMismatchError, match="metadata.kv_shape"):
            eng.store(tokens, kv, slots)
        with pytest.raises(ShapeMismatchError, match="metadata.kv_shape"):
            eng.retrieve(tokens, kv, slots)
        assert eng.lookup(tokens) == 0


BAD_TOKENS = {
    "2-D tensor": lambda t: t.reshape(2, -1),
    "0-D tensor": lambda t: t[0],
    "float tensor": lambda t: t.to(torch.float32) + 0.5,
    "bool tensor": lambda t: t % 2 == 0,
    "float list": lambda t: [float(x) + 0.25 for x in t.tolist()],
    "nested list": lambda t: t.reshape(3, -1).tolist(),
    "float numpy": lambda t: t.numpy().astype(np.float64),
    "negative id": lambda t: torch.cat([t[:10], torch.tensor([-1]), t[11:]]),
    "string": lambda t: "hello",
    "meta tensor": lambda t: t.to("meta"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_tokens_are_rejected_up_front(tmp_path, case):
    cfg, md = setup(tmp_path, "vllm")
    kv = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
    tokens, slots = _tokens(), _slots()
    bad = BAD_TOKENS[case](tokens)
    with CacheEngine(cfg, md, "vllm") as eng:
        for call in (lambda: eng.store(bad, kv, slots), lambda: eng.lookup(bad), lambda: eng.prefetch(bad),
                     lambda: eng.retrieve(bad, zeros_like_cache("vllm", kv), slots)):
            with pytest.raises(ShapeMismatchError, match="tokens|token id"):
                call()
        # Nothing half-stored: the real sequence is a clean miss, then stores and loads whole.
        assert eng.lookup(tokens) == 0
        assert _stored(eng, tokens, kv, slots) == 150
        dst = zeros_like_cache("vllm", kv)
        assert eng.retrieve(tokens, dst, slots) == 150
        assert same_bytes(ref_rows("vllm", dst, slots), ref_rows("vllm", kv, slots))
        eng.storage.memcheck()


def test_token_and_slot_containers_agree(tmp_path):
    cfg, md = setup(tmp_path, "vllm")
    kv = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
    tokens, slots = _tokens(), _slots()
    with CacheEngine(cfg, md, "vllm") as eng:
        assert _stored(eng, tokens.tolist(), kv, slots.numpy().astype(np.int32)) == 150
        for toks in (tokens, tuple(tokens.tolist()), tokens.numpy().astype(np.uint32), tokens.to(torch.int32)):
            assert eng.lookup(toks) == 150
        for sl in (slots.tolist(), tuple(slots.tolist()), slots.numpy().astype(np.uint16), slots.to(torch.int32),
                   torch.cat([slots, torch.tensor([-1, 5])])):  # extra slots past the tokens are ignored
            dst = zeros_like_cache("vllm", kv)
            assert eng.retrieve(tokens.numpy(), dst, sl) == 150
            assert same_bytes(ref_rows("vllm", dst, slots), ref_rows("vllm", kv, slots))
        assert eng.lookup([]) == 0 and eng.retrieve([], kv, []) == 0 and int(eng.store([], kv, [])) == 0


BAD_SLOTS = {
    "float tensor": (lambda s: s.to(torch.float32), "float32"),
    "bool tensor": (lambda s: s > 3, "bool"),
    "2-D tensor": (lambda s: s.reshape(2, -1), r"\(2, 75\)"),
    "float list": (lambda s: [x + 0.5 for x in s.tolist()], "float64"),
    "float numpy": (lambda s: s.numpy().astype(np.float32), "float32"),
    "too short": (lambda s: s[:149], "149"),
    "past the cache": (lambda s: torch.cat([s[:-1], torch.tensor([DIMS["nb"] * DIMS["bs"]])]), "320"),
    "a dict": (lambda s: {"slots": s}, "dict"),
    "meta tensor": (lambda s: s.to("meta"), "meta device"),
}


@pytest.mark.parametrize("case", list(BAD_SLOTS))
def test_bad_slot_mapping_is_rejected_naming_what_was_given(tmp_path, case):
    cfg, md = setup(tmp_path, "vllm")
    kv = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
    tokens, slots = _tokens(), _slots()
    make, given = BAD_SLOTS[case]
    bad = make(slots)
    with CacheEngine(cfg, md, "vllm") as eng:
        with pytest.raises(ShapeMismatchError, match=given) as e:
            eng.store(tokens, kv, bad)
        assert "allowed" in str(e.value) or "needs" in str(e.value)
        assert eng.lookup(tokens) == 0
        assert _stored(eng, tokens, kv, slots) == 150
        with pytest.raises(ShapeMismatchError, match=given):
            eng.retrieve(tokens, zeros_like_cache("vllm", kv), bad)


def test_meta_tokens_and_slots_are_the_librarys_error(tmp_path):
    # A meta tensor has a shape but no values: torch's own copy raises NotImplementedError
    # ("Cannot copy out of meta tensor"); every entry point must say so as the library's error.
    cfg, md = setup(tmp_path, "vllm")
    kv = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16)
    tokens, slots = _tokens(), _slots()
    meta_tokens, meta_slots = tokens.to("meta"), slots.to("meta")
    with CacheEngine(cfg, md, "vllm") as eng:
        for call in (lambda: eng.store(meta_tokens, kv, slots), lambda: eng.lookup(meta_tokens),
                     lambda: eng.prefetch(meta_tokens),
                     lambda: eng.retrieve(meta_tokens, zeros_like_cache("vllm", kv), slots)):
            with pytest.raises(ShapeMismatchError, match=r"tokens must hold data.*\(150,\) on the meta device"):
                call()
        for call in (lambda: eng.store(tokens, kv, meta_slots),
                     lambda: eng.retrieve(tokens, zeros_like_cache("vllm", kv), meta_slots)):
            with pytest.raises(ShapeMismatchError, match=r"slot_mapping must hold data.*\(150,\) on the meta device"):
                call()
        # Refused before anything was stored; the same call with real tensors works.
        assert eng.lookup(tokens) == 0
        assert _stored(eng, tokens, kv, slots) == 150
        eng.storage.memcheck()


@pytest.mark.gpu
def test_gpu_slot_check_is_one_transfer_per_call(tmp_path):
    cfg, md = setup(tmp_path, "vllm", device="cuda")
    kv = make_cache("vllm", DIMS["L"], DIMS["nb"], DIMS["bs"], DIMS["h"], DIMS["d"], torch.bfloat16, "cuda")
    slots = _slots().cuda()
    slots[100] = -1
    with CacheEngine(cfg, md, "vllm") as eng:
        eng._check_slots(150, kv, slots)  # warm-up: first-use allocations
        torch.cuda.synchronize()
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")  # itself warns that it is a prototype
                seen.clear()
                out, valid = eng._check_slots(150, kv, slots)
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.cuda.set_sync_debug_mode("default")
        assert valid == 100 and out.device == kv[0].device
        assert len([w for w in seen if "synchroniz" in str(w.message)]) == 1


def test_meta_kv_caches_are_the_librarys_error(tmp_path):
    """A paged cache on the meta device (a shape without values) is refused with the library's
    error by store and retrieve, never torch's NotImplementedError."""
    from gds_kvcache import CacheEngine, CacheEngineConfig, CacheEngineMetadata
    from gds_kvcache.errors import ShapeMismatchError
    L, H, D, block, chunk = 2, 2, 16, 16, 32
    cfg = CacheEngineConfig(chunk_size=chunk, local_disk=str(tmp_path), max_local_disk_size=0.05,
                            max_local_cpu_size=0.01, io_engine="posix", memory_device="host", slab_size=0.01)
    meta = CacheEngineMetadata("m", 1, 0, "vllm", torch.float32, (L, 2, chunk, H, D))
    kv = [torch.empty(2, 8, block, H, D, device="meta") for _ in range(L)]
    tokens = torch.arange(64)
    slots = torch.arange(64)
    with CacheEngine(cfg, meta, layout="vllm") as eng:
        for call in (eng.store, eng.retrieve):
            with pytest.raises(ShapeMismatchError, match="meta"):
                call(tokens, kv, slots)
