#!/bin/bash
# build-deb-chroot.sh CACHE_DIR
#
# Builds a clean Debian 12 (bookworm) chroot for the package test
# (tests/package.rs) in CACHE_DIR/debian12, with debootstrap --variant=minbase
# plus man-db (for `man -w`) and the packages the .deb depends on or needs
# for a deploy (btrfs-progs, libbtrfsutil1, mount, extlinux, syslinux-common),
# so installing the .deb there needs no network. The test never changes this
# tree: it works on an overlay of it.
#
# Idempotent: returns at once when CACHE_DIR/debian12/.stamp exists (delete
# the folder to rebuild). Must run as root.
set -euo pipefail
readonly SUITE=bookworm
readonly INCLUDE=man-db,btrfs-progs,libbtrfsutil1,mount,extlinux,syslinux-common
log() { echo "build-deb-chroot: $*" >&2; }
[ $# -eq 1 ] || { echo "usage: $0 CACHE_DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { log "error: must run as root"; exit 1; }
dir=$1/debian12
[ -e "$dir/.stamp" ] && exit 0
command -v debootstrap >/dev/null || { log "error: debootstrap missing: apt-get install debootstrap"; exit 1; }
# The mirror the host's apt uses (no other network is assumed).
mirror=$(grep -hoE '^URIs: *https?://[^ ]*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    head -n1 | sed 's/^URIs: *//' || true)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
rm -rf "$dir.tmp"
mkdir -p "$1"
log "debootstrap $SUITE from $mirror into $dir (a few minutes, once)"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$dir.tmp" "$mirror" >&2
# Keep the chroot small and its apt quiet.
chroot "$dir.tmp" apt-get clean
date -u +%FT%TZ >"$dir.tmp/.stamp"
mv "$dir.tmp" "$dir"
log "done: $dir"
