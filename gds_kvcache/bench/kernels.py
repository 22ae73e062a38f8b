"""``bench-kernels``: paged-KV pack/unpack against a device copy and torch index_select/index_copy_.

On a GPU: a Llama-3-8B shape (32 layers, 8 KV heads, head size 128, bf16,
block 16, 4096 tokens from a shuffled block table) by default. Bandwidth
counts bytes read plus bytes written, the same for every row, so ratios
compare like with like.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..cli import ArgumentParser, creatable_dir, int_range
from ..kernels import LAYOUTS, chunk_shape, describe, pack, unpack
from .common import busy_gpu, header, print_table, time_gpu, time_gpu_batch, time_host, write_json

__all__ = ["run", "main"]


def _cache(layout, L, nb, bs, h, d, dtype, dev):
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randint(-30000, 30000, shape, dtype=torch.int16, device=dev, generator=g).view(dtype)

    if layout == "cross_layer":
        return rnd(nb, L, 2, bs, h, d)
    per = {"vllm": (2, nb, bs, h, d), "flashinfer": (nb, 2, bs, h, d), "mla": (nb, bs, d)}[layout]
    return [rnd(*per) for _ in range(L)]


def run(layers=32, heads=8, head_size=128, block=16, tokens=4096, num_blocks=None, layouts=("vllm",),
        device=None, block_order: str = "shuffled") -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16
    nb = num_blocks or max(tokens // block * 4, 64)
    timer = time_gpu if on_gpu else time_host
    # Device throughput: calls queued back to back behind a GPU sleep, so host
    # overhead does not hide in the figure (it has its own column).
    batch = time_gpu_batch if on_gpu else timer
    rows = []
    gen = torch.Generator().manual_seed(1)
    if block_order == "sequential":
        blocks = torch.arange(tokens // block)
    else:
        blocks = torch.randperm(nb, generator=gen)[: tokens // block]
    slots = (blocks[:, None] * block + torch.arange(block)).reshape(-1)[:tokens].to(dev)
    copy_gbps = None
    for layout in layouts:
        kv = _cache(layout, layers, nb, block, heads, head_size, dtype, dev)
        geom = describe(layout, kv)
        shape = chunk_shape(geom, tokens)
        chunk = torch.empty(shape, dtype=dtype, device=dev)
        nbytes = chunk.numel() * chunk.element_size()
        moved = 2 * nbytes  # read + write
        if copy_gbps is None:
            other = torch.empty_like(chunk)
            t_copy = batch(lambda: other.copy_(chunk))
            copy_gbps = moved / t_copy / 1e9
            rows.append({"op": "device copy (ceiling)", "layout": "-", "ms": t_copy * 1e3, "GB/s": copy_gbps,
                         "vs copy": 1.0, "vs torch": ""})
            del other
        # Device throughput (no per-call slot check), host time per call, and one
        # full call with its slot check, timed alone: what a single pack() costs a user.
        t_pack = batch(lambda: pack(kv, layout, slots, chunk, check=False))
        t_unpack = batch(lambda: unpack(chunk, kv, layout, slots, check=False))
        t_call = timer(lambda: pack(kv, layout, slots, chunk))
        host = {"pack": _host_us(lambda: pack(kv, layout, slots, chunk, check=False), on_gpu),
                "unpack": _host_us(lambda: unpack(chunk, kv, layout, slots, check=False), on_gpu)}
        # The same gather/scatter the way a torch user writes it, per layer.
        if layout == "cross_layer":
            flat = [kv[:, l].transpose(0, 1).reshape(geom.kv, nb * block, geom.row_elems) for l in range(layers)]
            flat_is_view = False
        else:
            if layout == "flashinfer":
                flat = [t.transpose(0, 1).reshape(2, nb * block, geom.row_elems) for t in kv]
                flat_is_view = False
            else:
                flat = [t.view(geom.kv, nb * block, geom.row_elems) for t in kv]
                flat_is_view = True
        tmp = torch.empty((layers,) + (geom.kv, tokens, geom.row_elems), dtype=dtype, device=dev)

        def t_select():
            for l in range(layers):
                torch.index_select(flat[l], 1, slots, out=tmp[l])

        def t_copyback():
            for l in range(layers):
                flat[l].index_copy_(1, slots, tmp[l])

        ts = batch(t_select)
        tc = batch(t_copyback) if flat_is_view else float("nan")
        # Byte check: the kernel's chunk against torch's gather.
        pack(kv, layout, slots, chunk)
        t_select()
        if on_gpu:
            torch.cuda.synchronize()
        exact = torch.equal(chunk.transpose(0, 1).contiguous().view(torch.int16), tmp.view(torch.int16))
        for op, t, base in (("pack", t_pack, ts), ("unpack", t_unpack, tc), ("pack, one checked call", t_call, ts)):
            g = moved / t / 1e9
            tb = moved / base / 1e9 if base == base else float("nan")
            rows.append({"op": op, "layout": layout, "ms": t * 1e3, "GB/s": g, "vs copy": g / copy_gbps,
                         "vs torch": g / tb if tb == tb else "n/a", "host us/call": host.get(op, "")})
            if op != "pack, one checked call":
                rows.append({"op": "torch index_select" if op == "pack" else "torch index_copy_", "layout": layout,
                             "ms": base * 1e3, "GB/s": tb, "vs copy": tb / copy_gbps, "vs torch": 1.0})
        rows[-5]["exact"] = exact
        del kv, chunk, tmp, flat
        if on_gpu:
            torch.cuda.empty_cache()
    shape = {"layers": layers, "kv_heads": heads, "head_size": head_size, "block": block, "tokens": tokens,
             "num_blocks": nb, "dtype": "bfloat16", "block_order": block_order}
    return {**header(), "launch": _launch_info() if on_gpu else "host", "shape": shape, "rows": rows}


def _host_us(fn, on_gpu: bool, n: int = 20) -> float:
    """Host microseconds per call while the GPU is busy (so no call waits for the device)."""
    if not on_gpu:
        return ""
    fn()
    torch.cuda.synchronize()
    busy_gpu()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


def _launch_info() -> dict:
    from ..kernels import paged

    k = paged._cuda_kernel(8)
    info = {"path": k.path}
    try:
        info["regs_per_thread"] = int(k.kernel.regs_per_thread)
    except Exception:  # attribute names differ across numba-cuda releases
        pass
    return info


#: Tokens per paged-KV block in every case of this bench (vLLM's default).
BLOCK = 16


def _tokens_arg(text: str) -> int:
    n = int_range(BLOCK, 1 << 20)(text)
    if n % BLOCK:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of the block size {BLOCK}")
    return n


def _layouts_arg(text: str) -> list:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in LAYOUTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list from {', '.join(LAYOUTS)}")
    return names


def main(argv=None) -> int:
    ap = ArgumentParser(prog="gds-kvcache bench-kernels", description=__doc__)
    ap.add_argument("--layers", type=int_range(1, 1024), default=None,
                    help="model layers (default 32 on a GPU, 8 on CPU, 4 with --smoke)")
    ap.add_argument("--tokens", type=_tokens_arg, default=None,
                    help=f"tokens per chunk, a multiple of the block size {BLOCK} "
                         "(default 4096 on a GPU, 1024 on CPU, 256 with --smoke)")
    ap.add_argument("--layouts", type=_layouts_arg, default=",".join(LAYOUTS),
                    help=f"comma-separated, from {', '.join(LAYOUTS)} (default all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for CI")
    ap.add_argument("--block-order", default="shuffled", choices=["shuffled", "sequential"],
                    help="block table: a random permutation (default) or blocks 0, 1, 2, ...")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=creatable_dir, default="bench-out")
    a = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    layers = a.layers or (4 if a.smoke else 32 if gpu else 8)
    tokens = a.tokens or (256 if a.smoke else 4096 if gpu else 1024)
    r = run(layers=layers, tokens=tokens, block=BLOCK, layouts=tuple(a.layouts), block_order=a.block_order)
    print_table(r["rows"], ["op", "layout", "ms", "GB/s", "vs copy", "vs torch", "host us/call", "exact"],
                f"bench-kernels on {r['device']}: {r['shape']}, launch {r['launch']}")
    write_json(os.path.join(a.out, f"bench_kernels{'_' + a.tag if a.tag else ''}.json"), r)
    bad = [x for x in r["rows"] if x.get("exact") is False]
    return 1 if bad else 0
