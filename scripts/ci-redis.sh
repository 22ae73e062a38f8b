#!/usr/bin/env bash
# Run a command with a real redis-server on a loopback port (shared mode, issue 12).
#
#   bash scripts/ci-redis.sh [--optional] [COMMAND ...]   # default COMMAND: pytest on tests/test_shared_*.py
#
# Finds redis-server ($GDS_KVCACHE_REDIS_SERVER, PATH, /usr/bin); if missing, installs Debian's
# redis-server with apt-get when run as root, else unpacks carried .deb files from $REDIS_DEB_DIR
# (redis-server, redis-tools, libjemalloc2, liblzf1: `apt-get download` them on a machine with
# apt) with `dpkg -x`, as on the GPU machine. Installs the `redis` Python client into the current
# interpreter if it is missing. Starts one server without persistence on a free 127.0.0.1 port,
# exports GDS_KVCACHE_REDIS_URL (tests that restart Redis start their own from
# GDS_KVCACHE_REDIS_SERVER), runs COMMAND, and stops the server on every exit path.
# --optional: where no server can be had, say so and run COMMAND anyway (the shared-mode tests
# then skip, naming the reason); without it that is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
optional=0
if [ "${1:-}" = "--optional" ]; then optional=1; shift; fi
SECONDS=0
PY="${PYTHON:-python}"

find_server() {
    for c in "${GDS_KVCACHE_REDIS_SERVER:-}" "$(command -v redis-server || true)" /usr/bin/redis-server; do
        [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
    done
    return 1
}

if ! server=$(find_server); then
    if [ -n "${REDIS_DEB_DIR:-}" ] && ls "$REDIS_DEB_DIR"/*.deb >/dev/null 2>&1; then
        root=$(mktemp -d "${TMPDIR:-/tmp}/redis-deb.XXXXXX")
        for d in "$REDIS_DEB_DIR"/*.deb; do dpkg -x "$d" "$root"; done
        export GDS_KVCACHE_REDIS_SERVER="$root/usr/bin/redis-server"   # a link: the name picks the mode
        export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "ci-redis: installing Debian's redis-server"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1; } || true
    fi
    if ! server=$(find_server); then
        [ "$optional" = 1 ] || { echo "ci-redis: no redis-server and no way to install it" >&2; exit 1; }
        echo "ci-redis: WARNING: no redis-server (not root with apt, no \$REDIS_DEB_DIR): shared-mode tests skip" >&2
        [ $# -gt 0 ] || exit 1
        exec "$@"
    fi
fi
"$PY" -c "import redis" 2>/dev/null || "$PY" -m pip install -q redis
echo "ci-redis: $("$server" --version | head -1) ($server), ready in ${SECONDS}s"

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rdir=$(mktemp -d "${TMPDIR:-/tmp}/ci-redis.XXXXXX")
"$server" --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$rdir" --daemonize no \
    --loglevel warning >"$rdir/log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$rdir"' EXIT
for _ in $(seq 100); do
    "$PY" -c "import redis,sys; redis.Redis(port=$port).ping()" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$rdir/log" >&2; exit 1; }
    sleep 0.1
done
export GDS_KVCACHE_REDIS_URL="redis://127.0.0.1:$port/0"
export GDS_KVCACHE_REDIS_SERVER="$server"

[ $# -gt 0 ] || set -- "$PY" -m pytest -q -p no:cacheprovider tests/test_shared_backend.py tests/test_shared_tp.py \
    tests/test_shared_chaos.py
status=0
"$@" || status=$?
echo "ci-redis: stopped the server on port $port (command exit $status)"
exit $status
