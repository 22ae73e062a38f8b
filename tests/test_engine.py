import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineMetadata, ShapeMismatchError
from gds_kvcache.engine import CacheEngine
from gds_kvcache.token_hash import prefix_hashes
from gds_kvcache.units import GB, MiB

from .kernel_cases import make_cache, ref_rows, zeros_like_cache
from .helpers import same_bytes

DIMS = dict(L=3, nb=40, bs=8, h=2, d=16)


def setup(tmp_path, layout, chunk=32, device="cpu", engine="auto"):
    L, h, d = DIMS["L"], DIMS["h"], DIMS["d"]
    kv_shape = (L, 1, chunk, 1, d) if layout == "mla" else (L, 2, chunk, h, d)
    cfg = CacheEngineConfig(chunk_size=chunk, local_disk=str(tmp_path / "kv"), max_local_disk_size=32 * MiB / GB,
                            max_local_cpu_size=4 * MiB / GB, slab_size=8 * MiB / GB, io_engine=engine,
                            memory_device="cuda" if device == "cuda" else "host", io_threads=4)
    md = CacheEngineMetadata("org/model", 1, 0, "vllm", torch.bfloat16, kv_shape)
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
    # Golden value: a change to the hash scheme breaks every stored cache.
    assert prefix_hashes([1, 2, 3], 2) == ["440a0cd2fdcc60512c67a9fa2d84bae5", "34e1cdf0f60e92b60d6c87b66d859036"]


def test_engine_rejects_mismatched_metadata(tmp_path):
    cfg, md = setup(tmp_path, "vllm")
    with pytest.raises(ShapeMismatchError):
        CacheEngine(cfg, md, "mla")
    with pytest.raises(ShapeMismatchError):
        CacheEngine(cfg.replace(chunk_size=16), md, "vllm")
    with pytest.raises(ShapeMismatchError):
        CacheEngine(cfg, md, "paged")
