#!/usr/bin/env bash
# Install gds_kvcache with its test extra and run the test suite.
# On a machine without a CUDA driver library, fetch one (scripts/fetch-libcuda.sh)
# so the KvikIO engine is tested in compat mode too. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import torch' 2>/dev/null; then
  python -m pip install -q torch==2.13.0   # the CPU build this environment provides
fi
python -m pip install -q -e '.[test]'
if ! python -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null; then
  bash scripts/fetch-libcuda.sh >/dev/null
  export LD_LIBRARY_PATH="$PWD/.cache/libcuda${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# CI has no nvidia-fs: resolve KvikIO to compat mode up front (AUTO elsewhere).
if [ "${CI:-}" = "true" ]; then export KVIKIO_COMPAT_MODE=ON; fi
exec python -m pytest "$@"
