"""Kernel correctness checks run by the CPU tests, the CUDA-simulator subprocess and the GPU tests."""

import torch

from gds_kvcache.kernels import chunk_shape, describe, pack, unpack

from .helpers import random_tensor, same_bytes
from .kernel_cases import make_cache, ref_rows, zeros_like_cache

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.int16]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


def slots_for(nb, bs, nt, negative, device, gen):
    # A shuffled block table: tokens land in random blocks at random offsets.
    perm = torch.randperm(nb * bs, generator=gen)[:nt]
    if negative:
        perm[torch.randperm(nt, generator=gen)[: max(1, nt // 4)]] = -1
    return perm.to(device)


def check_case(layout, dtype, nt, negative, device="cpu", backend="auto", dims=(3, 9, 4, 2, 8), seed=0,
               one_allocation=False):
    L, nb, bs, h, d = dims
    gen = torch.Generator().manual_seed(seed)
    kv = make_cache(layout, L, nb, bs, h, d, dtype, device, one_allocation)
    slots = slots_for(nb, bs, nt, negative, device, gen)
    geom = describe(layout, kv)
    poison = random_tensor(chunk_shape(geom, nt), dtype, device)
    chunk = poison.clone()
    pack(kv, layout, slots, chunk, backend=backend)
    expect = ref_rows(layout, kv, slots)
    valid = (slots >= 0).view(1, 1, -1, 1)
    cb, eb, pb = (x.contiguous().view(torch.uint8) for x in (chunk, expect, poison))
    assert torch.equal(torch.where(valid, cb, pb), cb), "pack wrote a row of a negative slot"
    assert torch.equal(torch.where(valid, cb, 0), torch.where(valid, eb, 0)), f"pack {layout} {dtype} wrong"

    # Unpack into a fresh cache with another block assignment; untouched slots keep their poison.
    target = make_cache(layout, L, nb, bs, h, d, dtype, device, one_allocation)
    before = [t.clone() for t in (target if isinstance(target, list) else [target])]
    slots2 = slots_for(nb, bs, nt, negative, device, gen)
    src = random_tensor(chunk_shape(geom, nt), dtype, device)
    unpack(src, target, layout, slots2, backend=backend)
    got = ref_rows(layout, target, slots2)
    valid2 = (slots2 >= 0).view(1, 1, -1, 1)
    sb, gb = src.contiguous().view(torch.uint8), got.contiguous().view(torch.uint8)
    assert torch.equal(torch.where(valid2, gb, 0), torch.where(valid2, sb, 0)), f"unpack {layout} {dtype} wrong"
    # Every slot not in slots2 is unchanged.
    untouched = torch.ones(nb * bs, dtype=torch.bool, device=device)
    untouched[slots2[slots2 >= 0]] = False
    keep = untouched.nonzero().flatten()
    after = ref_rows(layout, target, keep)
    orig = ref_rows(layout, before if layout != "cross_layer" else before[0], keep)
    assert same_bytes(after, orig), "unpack touched a slot outside slot_mapping"
    _ = zeros_like_cache
