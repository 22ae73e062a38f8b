#!/usr/bin/env bash
# On the GPU machine: what must run there on the final code before issues 16, 18 and 19 can close,
# in the two calls a device session allows (each under 10 minutes), logs and JSON under OUT.
#
#   bash scripts/device-verify.sh gpu OUT    # GPU suite (CUDA worker in two processes included),
#                                            # I/O paths vs their ceilings, layer-wise loading
#   bash scripts/device-verify.sh ab OUT     # "no speed lost": .before/ (git archive of c2971af)
#                                            # against this tree, 3 alternating runs, bench-ttft, ext4
#
# Expects the carried wheels in .whl/ (KvikIO, redis-py; Debian redis debs in .whl/debs): see
# scripts/device-bench.sh. KvikIO runs in compat mode (no nvidia-fs on the device machine).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: device-verify.sh gpu|ab OUT}; out=${2:?usage: device-verify.sh gpu|ab OUT}
mkdir -p "$out"; out=$(cd "$out" && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export SITE=/tmp/site REDIS_DEB_DIR=$PWD/.whl/debs KVIKIO_COMPAT_MODE=ON PYTHONUNBUFFERED=1
[ -e gds_kvcache/kernels ] || ln -sfn ../kernels gds_kvcache/kernels
nvidia-smi -L > "$out/gpu.txt"; git log --oneline -1 > "$out/commit.txt" 2>/dev/null || true
if [ "$mode" = gpu ]; then
    export PYTHONPATH=$SITE:$PWD
    SECONDS=0
    timeout 260 bash scripts/ci-redis.sh python -m pytest tests -m gpu -q -p no:cacheprovider -ra --durations=15 \
        > "$out/gpu-suite.log" 2>&1
    echo "gpu suite: exit $? in ${SECONDS}s"; grep -E "passed|failed" "$out/gpu-suite.log" | tail -2
    SECONDS=0
    timeout 100 python -m gds_kvcache bench --dir /dev/shm --sizes 16M,1M --total 1G --out "$out" --tag paths \
        --paths library-mapped,library-kvikio,library-kvikio-device,library-posix,raw,bounce,pinned-pwrite,pinned-pipelined \
        > "$out/bench.log" 2>&1
    echo "bench: exit $? in ${SECONDS}s"
    SECONDS=0
    timeout 130 python scripts/bench_layerwise.py --dir /dev/shm --reps 3 --out "$out" > "$out/layerwise.log" 2>&1
    echo "layerwise: exit $? in ${SECONDS}s"
elif [ "$mode" = ab ]; then
    [ -d .before/gds_kvcache ] || { echo "no .before/: git archive c2971af | tar -x -C .before" >&2; exit 1; }
    [ -e .before/gds_kvcache/kernels ] || ln -sfn ../kernels .before/gds_kvcache/kernels
    timeout 400 bash scripts/device-bench.sh --ab .before "$out/before" . "$out/after" 1 3
    timeout 75 bash scripts/device-bench.sh --ttft . "$out/after" 2
    timeout 75 bash scripts/device-bench.sh --ttft .before "$out/before" 2
    mkdir -p /root/bx
    timeout 70 env PYTHONPATH=$SITE:$PWD python -m gds_kvcache bench --dir /root/bx --sizes 16M,1M --total 1G \
        --paths library-kvikio,library-posix,raw,pinned-pwrite,pinned-pipelined --out "$out" --tag ext4 > "$out/ext4.log" 2>&1
    echo "ext4 bench: exit $?"
else
    echo "usage: device-verify.sh gpu|ab OUT" >&2; exit 2
fi
