"""The batched GPU checksum kernel under Numba's CUDA simulator (own process: the env var must precede
numba.cuda). Run by tests/test_checksum_batch.py; prints ``SIMULATOR OK`` on success."""

import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
import warnings  # noqa: E402

# The simulator runs kernels on NumPy scalars, which warn on integer wrap-around.
warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)

import importlib  # noqa: E402

import numpy as np  # noqa: E402

from gds_kvcache.kernels.checksum import checksum_host  # noqa: E402

# The package's `checksum_cuda` is the function; the module is reached by name.
kc = importlib.import_module("gds_kvcache.kernels.checksum_cuda")


def run_batch(b: np.ndarray, spans, grid: int) -> list:
    """What ``batch_sums`` does on a GPU, with host arrays: descriptors, one launch, the result slots."""
    s0 = -b.ctypes.data % 8
    words = b[s0:s0 + (b.shape[0] - s0) // 8 * 8].view(np.uint64)
    offs = np.array([o for o, _ in spans], dtype=np.int64)
    lens = np.array([n for _, n in spans], dtype=np.int64)
    assert ((b.ctypes.data + offs) % 8 == 0).all()
    desc, tile, ntiles = kc.batch_descriptors((offs - s0) // 8, lens)
    nspans = len(spans)
    out = np.zeros(nspans, dtype=np.uint64)
    kc.checksum_batch_cuda[min(grid, ntiles), 256](words, b[s0:], desc[:3 * nspans + 1], nspans, tile, out)
    return out.tolist(), tile, ntiles


def main() -> int:
    rng = np.random.default_rng(11)
    raw = rng.integers(1, 256, 16_000, dtype=np.uint8)
    # Small tiles, so one span covers several tiles, and a grid smaller than the tile count.
    kc._MIN_TILE = 256
    cases = 0
    for shift in (0, 3):  # a buffer that starts 8-byte aligned, and one that does not
        b = raw[shift:]
        s0 = -b.ctypes.data % 8
        lens = [1, 7, 8, 9, 256, 257, 3 * 256 + 5, 5000, 15, 16, 2048, 2055]
        spans, off = [], s0
        for n in lens:
            spans.append((off, n))
            off += -(-n // 8) * 8 + 8 * int(rng.integers(0, 3))
        spans.append((s0 + 8, 6000))  # overlapping spans are allowed
        assert off <= b.shape[0]
        for grid in (2, 64):
            got, tile, ntiles = run_batch(b, spans, grid)
            want = [checksum_host(b[o:o + n]) for o, n in spans]
            assert got == want, f"batch kernel differs (shift {shift}, grid {grid}): {got} != {want}"
            assert tile == 256 and ntiles > len(spans)
            cases += 1
    print(f"SIMULATOR OK {cases} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
