#!/usr/bin/env bash
# On the GPU machine: the "no speed lost" figures of one code state, repeated REPS times
# (medians are taken by scripts/bench_summary.py): storage bench on /dev/shm at 16 MiB and
# 1 MiB (mapped, kvikio, posix against raw O_DIRECT and pinned H2D of the same run),
# bench-ttft, the shared-mode read bench, and the CPU op rate of 64 KiB chunks (host slab).
#
#   REDIS_DEB_DIR=.whl/debs bash scripts/device-bench.sh OUTDIR [REPS]
#   REDIS_DEB_DIR=$PWD/.whl/debs bash scripts/device-bench.sh --ab TREE_A OUT_A TREE_B OUT_B FIRST LAST
#   REDIS_DEB_DIR=$PWD/.whl/debs bash scripts/device-bench.sh --ttft TREE OUT REPS
#
# --ab measures two source trees (e.g. a `git archive` of the "before" commit and this one)
# in alternating runs FIRST..LAST on the same machine (A r1, B r1, A r2, ...), so a drift of
# the machine during the session falls on both alike; --ttft adds a tree's bench-ttft (split
# so that each device call stays under its time limit). Each tree runs from its own root (with
# $SITE, the carried wheels, ahead on PYTHONPATH). $PATHS_B: the storage bench's paths for tree B
# (a newer tree may know paths the older one does not).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

PATHS=library-mapped,library-kvikio,library-posix,raw,bounce

one_rep() {   # TREE OUT R [PATHS]: one run of every figure but bench-ttft
    local tree=$1 out=$2 r=$3 paths=${4:-$PATHS}
    mkdir -p "$out"
    (
        cd "$tree" || exit 1
        export PYTHONPATH="${SITE:+$SITE:}$tree"
        SECONDS=0
        python -m gds_kvcache bench --dir /dev/shm --sizes 16M,1M --total 1G \
            --paths "$paths" --out "$out" --tag "shm-r$r" \
            >"$out/bench-r$r.log" 2>&1
        echo "$(basename "$out") bench run $r: exit $? in ${SECONDS}s"
        SECONDS=0
        python -m gds_kvcache bench --dir /dev/shm --sizes 64K --total 128M --memory host --no-hot \
            --paths library-mapped,library-posix,raw --threads 4 --out "$out" --tag "ops64k-r$r" \
            >"$out/ops64k-r$r.log" 2>&1
        echo "$(basename "$out") 64K op rate run $r: exit $? in ${SECONDS}s"
        SECONDS=0
        bash "$tree/scripts/ci-redis.sh" python -m gds_kvcache.shared.bench --memory cuda --readers 1,2 \
            --chunk-mib 1 --read-chunks 256 --chunks 20000 --json "$out/shared-r$r.json" >"$out/shared-r$r.log" 2>&1
        echo "$(basename "$out") shared bench run $r: exit $? in ${SECONDS}s"
    )
}

ttft() {      # TREE OUT REPS
    local tree=$1 out=$2 reps=$3
    (
        cd "$tree" || exit 1
        export PYTHONPATH="${SITE:+$SITE:}$tree"
        SECONDS=0
        python -m gds_kvcache bench-ttft --tokens 8192,32768 --reps "$reps" --out "$out" --tag ttft >"$out/ttft.log" 2>&1
        echo "$(basename "$out") bench-ttft: exit $? in ${SECONDS}s"; tail -4 "$out/ttft.log"
    )
}

if [ "${1:-}" = "--ab" ]; then
    a=$(cd "$2" && pwd); oa=$3; b=$(cd "$4" && pwd); ob=$5
    mkdir -p "$oa" "$ob"; oa=$(cd "$oa" && pwd); ob=$(cd "$ob" && pwd)
    for r in $(seq "${6:-1}" "${7:-3}"); do
        one_rep "$a" "$oa" "$r"
        one_rep "$b" "$ob" "$r" "${PATHS_B:-$PATHS}"
    done
    exit 0
fi
if [ "${1:-}" = "--ttft" ]; then
    mkdir -p "$3"
    ttft "$(cd "$2" && pwd)" "$(cd "$3" && pwd)" "${4:-3}"
    exit 0
fi
out=${1:?usage: device-bench.sh OUTDIR [REPS] | --ab TREE_A OUT_A TREE_B OUT_B FIRST LAST | --ttft TREE OUT REPS}
reps=${2:-3}
mkdir -p "$out"; out=$(cd "$out" && pwd)
for r in $(seq 1 "$reps"); do one_rep "$here" "$out" "$r"; done
ttft "$here" "$out" "$reps"
