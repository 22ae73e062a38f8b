#!/usr/bin/env bash
# Put a CUDA driver library (libcuda.so.1) into .cache/libcuda/ on a machine that has none.
#
# KvikIO loads libcuda.so.1 for every read or write, even of host memory in
# compat mode, so a GPU-less CI machine needs the library file (not a GPU) to
# exercise the KvikIO engine. Debian ships it as libcuda1 in non-free; KvikIO
# for CUDA 13 needs driver >= 555 (cuCtxCreate_v4), which Debian has only in
# experimental. The .deb is downloaded and unpacked here; nothing is installed
# system-wide, and the extra apt source is removed again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cache/libcuda"
version=${LIBCUDA_DEB_VERSION:-555.58.02-4}
if [ -e "$dest/libcuda.so.1" ]; then echo "$dest/libcuda.so.1"; exit 0; fi
command -v apt-get >/dev/null || { echo "fetch-libcuda: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
src=/etc/apt/sources.list.d/gds-kvcache-libcuda.sources
lists=$(mktemp -d)
work=$(mktemp -d)
chmod 755 "$lists" "$work"
trap 'rm -f "$src"; rm -rf "$work" "$lists"' EXIT
cat > "$src" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: experimental
Components: non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt_opts=(-o "Dir::Etc::sourcelist=$src" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$lists"
          -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1")
apt-get "${apt_opts[@]}" update -qq >/dev/null
(cd "$work" && apt-get "${apt_opts[@]}" download -qq "libcuda1=$version" 2>/dev/null)
dpkg-deb -x "$work"/libcuda1_*.deb "$work/x"
lib=$(find "$work/x" -name 'libcuda.so.*.*' -type f | head -n1)
mkdir -p "$dest"
cp "$lib" "$dest/"
ln -sf "$(basename "$lib")" "$dest/libcuda.so.1"
echo "$dest/libcuda.so.1"
