#!/usr/bin/env bash
# On a GPU machine without apt access: the GPU test suite (shared mode included) and the
# shared-mode benchmarks, with redis-server unpacked from carried Debian packages.
#
#   REDIS_DEB_DIR=.whl/debs bash scripts/device-shared.sh OUTDIR
#
# (the .deb files: `apt-get download redis-server redis-tools libjemalloc2 liblzf1` on a machine
# with apt; the `redis` client wheel goes with the other carried wheels). Logs and JSON land in OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: device-shared.sh OUTDIR}
mkdir -p "$out"
nvidia-smi -L | tee "$out/gpus.txt"
SECONDS=0
bash scripts/ci-redis.sh python -m pytest tests -m gpu -q -p no:cacheprovider -ra --timeout 300 -s \
    >"$out/gpu-tests.log" 2>&1
echo "gpu tests: exit $? in ${SECONDS}s"; grep -E "^(chaos|tp|cross):|passed|failed|^FAILED|^ERROR" "$out/gpu-tests.log" | tail -20
for mib in 1 16; do
    SECONDS=0
    bash scripts/ci-redis.sh python -m gds_kvcache.shared.bench --memory cuda --readers 1,2,4 --chunk-mib "$mib" \
        --read-chunks 256 --chunks $([ "$mib" = 1 ] && echo 100000 || echo 20000) --json "$out/shared-${mib}m.json" \
        >"$out/bench-${mib}m.log" 2>&1
    echo "bench ${mib} MiB: exit $? in ${SECONDS}s"; grep -E "lookup_|rebuild_|^ +[124] |local mode" "$out/bench-${mib}m.log"
done
bash scripts/ci-redis.sh python scripts/profile_shared_read.py --chunks 256 --json "$out/profile.json" \
    >"$out/profile.log" 2>&1
echo "profile: exit $?"; grep -E "batch|transfer only" "$out/profile.log"
