"""Run the CUDA kernels under Numba's CUDA simulator (own process: the env var must precede numba.cuda)."""

import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
import warnings  # noqa: E402

# The simulator runs kernels on NumPy scalars, which warn on integer wrap-around.
warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)

import torch  # noqa: E402

from gds_kvcache.kernels import LAYOUTS  # noqa: E402

from tests.check_kernels import check_case  # noqa: E402


def check_checksum_kernel() -> int:
    """The GPU checksum kernel's word sum against the host checksum, on random bytes."""
    import numpy as np
    from numba import cuda

    from gds_kvcache.kernels.checksum import _mix_int, checksum_host
    from gds_kvcache.kernels.checksum_cuda import checksum_words_cuda

    rng = np.random.default_rng(3)
    cases = 0
    for nw, grid in ((1, 1), (37, 1), (700, 2)):
        b = rng.integers(0, 256, nw * 8, dtype=np.uint8)
        out = np.zeros(1, dtype=np.uint64)
        checksum_words_cuda[grid, 256](b.view(np.uint64), nw, out)
        total = (int(out[0]) + _mix_int(nw * 8, nw + 0x5157)) & ((1 << 64) - 1)
        assert total == checksum_host(b), f"checksum kernel differs at {nw} words"
        cases += 1
    return cases


def main() -> int:
    n = 0
    for layout in LAYOUTS:
        for dtype in (torch.bfloat16, torch.int8, torch.float32):
            for nt, neg in ((5, False), (6, True)):
                check_case(layout, dtype, nt, neg, backend="cuda", dims=(2, 4, 2, 1, 8), seed=nt,
                           one_allocation=True)
                n += 1
    n += check_checksum_kernel()
    print(f"SIMULATOR OK {n} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
