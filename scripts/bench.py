"""Same as `gds-kvcache bench`; see `python scripts/bench.py --help`."""

import sys

from gds_kvcache.bench.storage import main

if __name__ == "__main__":
    sys.exit(main())
