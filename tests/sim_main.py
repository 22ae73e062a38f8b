"""Run the CUDA kernels under Numba's CUDA simulator (own process: the env var must precede numba.cuda)."""

import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
import warnings  # noqa: E402

# The simulator runs the kernels on NumPy scalars, which warn on the uint64
# wrap-around the checksum relies on.
warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gds_kvcache.kernels import LAYOUTS  # noqa: E402
from gds_kvcache.kernels.checksum import checksum_host  # noqa: E402
from gds_kvcache.kernels.checksum_cuda import THREADS, checksum_kernel  # noqa: E402

from tests.check_kernels import check_case  # noqa: E402


def main() -> int:
    n = 0
    for layout in LAYOUTS:
        for dtype in (torch.bfloat16, torch.int8, torch.float32):
            for nt, neg in ((5, False), (6, True)):
                check_case(layout, dtype, nt, neg, backend="cuda", dims=(2, 4, 2, 1, 8), seed=nt,
                           one_allocation=True)
                n += 1
    rng = np.random.default_rng(1)
    for size in (1, 13, 64, 1000):
        b = rng.integers(0, 256, size, dtype=np.uint8)
        full = size // 8 * 8
        words = b[:full].view(np.uint64) if full else np.zeros(1, np.uint64)
        tail = b[full:] if size > full else np.zeros(1, np.uint8)
        out = np.zeros(1, np.uint64)
        checksum_kernel[2, THREADS](words, full // 8, tail, size - full, size, out)
        assert int(out[0]) == checksum_host(b), f"checksum kernel differs at {size} bytes"
        n += 1
    print(f"SIMULATOR OK {n} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
