"""``layer_moves.move_layer`` through the GPU kernel under Numba's CUDA simulator (own process: the env var
must precede numba.cuda). Run by tests/test_layerwise.py; prints ``SIMULATOR OK`` on success."""

import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
import warnings  # noqa: E402

# The simulator runs kernels on NumPy scalars, which warn on integer wrap-around.
warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)

import torch  # noqa: E402

from gds_kvcache.layer_moves import move_layer  # noqa: E402
from gds_kvcache.memory.allocator import SlabMemoryAllocator  # noqa: E402
from gds_kvcache.units import MiB  # noqa: E402

from tests.helpers import same_bytes  # noqa: E402
from tests.kernel_cases import make_cache, ref_rows, zeros_like_cache  # noqa: E402
from tests.test_layerwise import make_objs  # noqa: E402

L, NB, BS, H, D, CHUNK = 2, 6, 4, 1, 8, 4


def check(layout: str, per_layer: bool, gap_every: int) -> None:
    """Pack every layer into chunk objects with the GPU kernel, unpack it into an empty cache, compare with
    torch indexing: the layer's rows exactly, every other layer untouched."""
    K, row = (1, D) if layout == "mla" else (2, H * D)
    kv = make_cache(layout, L, NB, BS, H, D, torch.bfloat16, one_allocation=True)
    n = 10
    slots = torch.randperm(NB * BS, generator=torch.Generator().manual_seed(2))[:n]
    slots[3] = -1
    bounds = [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    alloc = SlabMemoryAllocator(MiB, "host")
    try:
        objs, spare = make_objs(alloc, bounds, K, 1 if per_layer else L, row, gap_every)
        chunks, starts = list(range(len(objs))), [s for s, _ in bounds]
        want = ref_rows(layout, kv, slots)
        for layer in range(L):
            lo = 0 if per_layer else layer
            move_layer(objs, chunks, starts, slots, kv, layout, layer, lo, True, backend="cuda")
            for o, (s, e) in zip(objs, bounds):
                keep = slots[s:e] >= 0
                assert same_bytes(o.tensor[:, lo][:, keep], want[:, layer, s:e][:, keep]), (layout, layer)
            dst = zeros_like_cache(layout, kv)
            move_layer(objs, chunks, starts, slots, dst, layout, layer, lo, False, backend="cuda")
            got = ref_rows(layout, dst, slots)
            assert same_bytes(got[:, layer], want[:, layer]), (layout, layer)
            assert not any(got[:, x].view(torch.uint8).any() for x in range(L) if x != layer)
        for o in objs + spare:
            o.ref_count_down()
    finally:
        alloc.close()


def main() -> int:
    n = 0
    for layout in ("vllm", "flashinfer", "mla", "cross_layer"):
        for per_layer in (False, True):
            for gap_every in (0, 2):
                check(layout, per_layer, gap_every)
                n += 1
    print(f"SIMULATOR OK {n} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
