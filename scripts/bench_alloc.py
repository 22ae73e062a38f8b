"""Same as `gds-kvcache bench-alloc`; see `python scripts/bench_alloc.py --help`."""

import sys

from gds_kvcache.bench.alloc import main

if __name__ == "__main__":
    sys.exit(main())
