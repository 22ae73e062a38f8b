"""Same as `gds-kvcache info`; see `python scripts/info.py --help`."""

import sys

from gds_kvcache.bench.info import main

if __name__ == "__main__":
    sys.exit(main())
