"""Same as `gds-kvcache bench-kernels`; see `python scripts/bench_kernels.py --help`."""

import sys

from gds_kvcache.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
