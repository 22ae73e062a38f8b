#!/usr/bin/env bash
# Install gds_kvcache with its test extra and run the test suite.
# On a machine without a CUDA driver library, fetch one (scripts/fetch-libcuda.sh)
# so the KvikIO engine is tested in compat mode too. A redis-server on a loopback port runs
# for the suite's shared-mode tests (scripts/ci-redis.sh installs it where it can; where it
# cannot, those tests skip, saying why). Extra arguments go to pytest.
# Any CUDA or CPU build of torch will do; where none is installed yet, the CPU one.
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
status=0
bash scripts/ci-redis.sh --optional python -m pytest "$@" || status=$?
# Say loudly why a run that tested nothing failed: its last lines may be far up.
case $status in
  0 | 1) ;;
  5) echo "run-tests: FAILED: pytest ran no test (exit 5: none collected, or on CI none passed)" >&2 ;;
  *) echo "run-tests: FAILED: pytest stopped with exit $status (collection error, bad option" \
          "or interrupt): see its errors above" >&2 ;;
esac
exit "$status"
