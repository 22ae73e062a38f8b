#!/usr/bin/env bash
# Put a CUDA driver library (libcuda.so.1) into .cache/libcuda/ on a machine that has none.
#
# KvikIO loads libcuda.so.1 for every read or write, even of host memory in
# compat mode, so a GPU-less CI machine needs the library file (not a GPU) to
# exercise the KvikIO engine. Debian ships it as libcuda1 in non-free; KvikIO
# for CUDA 13 needs driver >= 555 (cuCtxCreate_v4), which Debian has only in
# experimental. The .deb is downloaded and unpacked here; nothing is installed
# system-wide and no apt configuration is changed: the experimental source is a
# temporary file that only this script's apt calls read.
#
# The archive is the Debian mirror this machine's apt already uses (its
# sources.list / sources.list.d entries, read through apt itself), so the
# project names no package host. LIBCUDA_DEB_MIRROR overrides it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cache/libcuda"
version=${LIBCUDA_DEB_VERSION:-555.58.02-4}
if [ -e "$dest/libcuda.so.1" ]; then echo "$dest/libcuda.so.1"; exit 0; fi
command -v apt-get >/dev/null || { echo "fetch-libcuda: needs apt-get (Debian)" >&2; exit 1; }

debian_mirror() {
  # Entries whose downloaded Release file says Origin and Label "Debian": the main archive,
  # not Debian-Security (a different tree, with no experimental suite).
  apt-get indextargets --format '$(TARGET_OF) $(REPO_URI) $(ORIGIN) $(LABEL)' 'Identifier: Packages' \
      2>/dev/null | awk '$1 == "deb" && $3 == "Debian" && $4 == "Debian" { print $2; exit }' || true
}
debian_mirror_before_update() {
  # No Release file yet (apt-get update never ran): on Debian, the entry for a plain
  # release name (bookworm, trixie, sid), which -security/-updates/-backports suites are not.
  # shellcheck disable=SC1091
  (. /etc/os-release 2>/dev/null && [ "${ID:-}" = debian ]) || return 0
  apt-get indextargets --no-release-info --format '$(TARGET_OF) $(REPO_URI) $(RELEASE)' \
      'Identifier: Packages' 2>/dev/null \
    | awk '$1 == "deb" && $3 ~ /^[a-z]+$/ { print $2; exit }' || true
}
mirror=${LIBCUDA_DEB_MIRROR:-$(debian_mirror)}
mirror=${mirror:-$(debian_mirror_before_update)}
if [ -z "$mirror" ]; then
  echo "fetch-libcuda: found no Debian archive in this machine's apt sources" \
       "(/etc/apt/sources.list, /etc/apt/sources.list.d/); set LIBCUDA_DEB_MIRROR to one" >&2
  exit 1
fi

tmp=$(mktemp -d)
# apt-get download drops to the _apt user, which must reach the lists and the download folder.
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -m 755 "$tmp/lists" "$tmp/work"
src="$tmp/libcuda.sources"
{
  echo "Types: deb"
  echo "URIs: ${mirror%/}"
  echo "Suites: experimental"
  echo "Components: non-free"
  # The archive's own keys; where the keyring file is absent apt falls back to trusted.gpg.d.
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  if [ -r "$keyring" ]; then echo "Signed-By: $keyring"; fi
} > "$src"
apt_opts=(-o "Dir::Etc::sourcelist=$src" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$tmp/lists"
          -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1")
apt-get "${apt_opts[@]}" update -qq >/dev/null
(cd "$tmp/work" && apt-get "${apt_opts[@]}" download -qq "libcuda1=$version" 2>/dev/null)
dpkg-deb -x "$tmp"/work/libcuda1_*.deb "$tmp/x"
lib=$(find "$tmp/x" -name 'libcuda.so.*.*' -type f | head -n1)
mkdir -p "$dest"
cp "$lib" "$dest/"
ln -sf "$(basename "$lib")" "$dest/libcuda.so.1"
echo "$dest/libcuda.so.1"
