"""Layer-wise loading on a GPU: TTFT of a forward pipelined with ``CacheEngine.retrieve_layer`` against load
alone, compute alone and serial load-then-compute (``gds_kvcache.bench.layerwise``; ``--help`` for the flags).

    python scripts/bench_layerwise.py --dir /dev/shm --reps 3 --out bench-out    # Llama-3-8B shape, 32k + 2k
    python scripts/bench_layerwise.py --tiny --cached 512 --new 64 --layers 4      # a CPU test run
"""

import sys

from gds_kvcache.bench.layerwise import main

if __name__ == "__main__":
    sys.exit(main())
