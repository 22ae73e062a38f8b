"""Launch-shape sweep for the GPU pack kernel (development aid; device only).

Times ``pack`` at the Llama-3-8B shape for several block shapes and grid
sizes (resident grid, fractions of it, and one block per group of rows, which
leaves scheduling to the hardware) and prints a table; JSON under ``--out``.
Device time with a GPU sleep queued first, as in ``bench-kernels``.

    python scripts/kernel_sweep.py --tokens 4096 --out bench-out
"""

from __future__ import annotations

import argparse
import os

import torch

from gds_kvcache.bench.common import header, print_table, time_gpu_batch, write_json
from gds_kvcache.kernels import chunk_shape, describe, paged
from gds_kvcache.kernels.layouts import word_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args()
    dev = torch.device("cuda")
    L, h, d, bs, nt = a.layers, 8, 128, 16, a.tokens
    nb = nt // bs * 4
    g = torch.Generator(device=dev).manual_seed(0)
    kv = [torch.randint(-30000, 30000, (2, nb, bs, h, d), dtype=torch.int16, device=dev, generator=g)
          .view(torch.bfloat16) for _ in range(L)]
    blocks = torch.randperm(nb, generator=torch.Generator().manual_seed(1))[: nt // bs]
    slots = (blocks[:, None] * bs + torch.arange(bs)).reshape(-1).to(dev)
    geom = describe("vllm", kv)
    chunk = torch.empty(chunk_shape(geom, nt), dtype=torch.bfloat16, device=dev)
    other = torch.empty_like(chunk)
    moved = 2 * chunk.numel() * chunk.element_size()
    t_copy = time_gpu_batch(lambda: other.copy_(chunk))
    rows = [{"variant": "device copy", "grid": "-", "block": "-", "GB/s": moved / t_copy / 1e9, "vs copy": 1.0}]
    w = word_bytes(geom, chunk)
    kern = paged._cuda_kernel(w)
    nrows = geom.kv * L * nt
    args = paged._device_args(geom, w, slots, nt, chunk, False)
    ref = torch.empty_like(chunk)
    paged.pack(kv, "vllm", slots, ref)
    for tx, ty in ((32, 8), (32, 4), (32, 16), (32, 32)):
        block = (tx, ty, 1)
        res = int(kern.kernel.max_cooperative_grid_blocks(block))  # blocks resident at once
        for label, gx in (("resident", res), ("resident/2", max(1, res // 2)), ("resident-1", res - 1),
                          ("resident+1", res + 1), ("one block per group", -(-nrows // ty))):
            stream = torch.cuda.current_stream().cuda_stream
            fn = (lambda gx=gx, block=block: kern((gx, 1, 1), block, stream, args))
            chunk.fill_(0)
            fn()
            torch.cuda.synchronize()
            ok = torch.equal(chunk.view(torch.int16), ref.view(torch.int16))
            t = time_gpu_batch(fn)
            gbps = moved / t / 1e9
            rows.append({"variant": label, "grid": gx, "block": f"{tx}x{ty}", "GB/s": gbps,
                         "vs copy": gbps / rows[0]["GB/s"], "exact": ok})
    print_table(rows, ["variant", "grid", "block", "GB/s", "vs copy", "exact"],
                f"pack sweep on {header()['device']}: {L} layers, {nt} tokens, regs "
                f"{getattr(kern.kernel, 'regs_per_thread', '?')}")
    write_json(os.path.join(a.out, f"kernel_sweep_{nt}.json"), {**header(), "rows": rows})
    return 0 if all(r.get("exact", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
