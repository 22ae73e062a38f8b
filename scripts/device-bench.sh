#!/usr/bin/env bash
# On the GPU machine: the "no speed lost" figures of one code state, repeated REPS times
# (medians are taken by scripts/bench_summary.py): storage bench on /dev/shm at 16 MiB and
# 1 MiB (mapped, kvikio, posix against raw O_DIRECT and pinned H2D of the same run),
# bench-ttft, the shared-mode read bench, and the CPU op rate of 64 KiB chunks (host slab).
#
#   REDIS_DEB_DIR=.whl/debs bash scripts/device-bench.sh OUTDIR [REPS]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: device-bench.sh OUTDIR [REPS]}
reps=${2:-3}
mkdir -p "$out"
for r in $(seq 1 "$reps"); do
    SECONDS=0
    python -m gds_kvcache bench --dir /dev/shm --sizes 16M,1M --total 1G \
        --paths library-mapped,library-kvikio,library-posix,raw,bounce --out "$out" --tag "shm-r$r" \
        >"$out/bench-r$r.log" 2>&1
    echo "bench run $r: exit $? in ${SECONDS}s"
    SECONDS=0
    python -m gds_kvcache bench --dir /dev/shm --sizes 64K --total 128M --memory host --no-hot \
        --paths library-mapped,library-posix,raw --threads 4 --out "$out" --tag "ops64k-r$r" \
        >"$out/ops64k-r$r.log" 2>&1
    echo "64K op rate run $r: exit $? in ${SECONDS}s"
done
SECONDS=0
python -m gds_kvcache bench-ttft --tokens 8192,32768 --reps "$reps" --out "$out" --tag ttft >"$out/ttft.log" 2>&1
echo "bench-ttft: exit $? in ${SECONDS}s"; tail -6 "$out/ttft.log"
for r in $(seq 1 "$reps"); do
    SECONDS=0
    bash scripts/ci-redis.sh python -m gds_kvcache.shared.bench --memory cuda --readers 1,2 --chunk-mib 1 \
        --read-chunks 256 --chunks 20000 --json "$out/shared-r$r.json" >"$out/shared-r$r.log" 2>&1
    echo "shared bench run $r: exit $? in ${SECONDS}s"
done
