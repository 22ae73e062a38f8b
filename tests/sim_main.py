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


def main() -> int:
    n = 0
    for layout in LAYOUTS:
        for dtype in (torch.bfloat16, torch.int8, torch.float32):
            for nt, neg in ((5, False), (6, True)):
                check_case(layout, dtype, nt, neg, backend="cuda", dims=(2, 4, 2, 1, 8), seed=nt,
                           one_allocation=True)
                n += 1
    print(f"SIMULATOR OK {n} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
