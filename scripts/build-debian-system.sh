#!/bin/bash
# build-debian-system.sh CACHE_DIR
#
# Builds a small bootable Debian 12 (bookworm) root filesystem with systemd
# as init, for the Debian-with-systemd trial scenario (tests/trial_debian.rs):
#
#   CACHE_DIR/debian12-systemd/rootfs   the tree: debootstrap --variant=minbase
#                                       plus systemd-sysv, udev, Debian's
#                                       linux-image-cloud-amd64, initramfs-tools
#                                       (an initramfs that mounts a Btrfs root:
#                                       checked) and btrfs-progs
#   CACHE_DIR/debian12-systemd/.stamp   what it was built from (quick path)
#   CACHE_DIR/apt-archives/             the downloaded .debs (kept: a rebuild
#                                       downloads nothing)
#
# The system needs no network at boot, has no getty on the serial console
# (serial-getty@ttyS0 and getty.target are masked: a getty there hangs up
# processes writing to ttyS0, which QEMU tests read), no first-boot prompts (systemd-firstboot
# masked, a machine-id set). systemd's status lines go to the console (the
# kernel's last console= is ttyS0); units that should be seen there use
# StandardOutput=journal+console (as the on-device extension's do) or tty.
# Docs, man pages and locales are left out to keep it small.
#
# Idempotent: returns at once when the stamp matches this script (delete the
# folder to rebuild). Must run as root on Debian 12.
set -euo pipefail
readonly SUITE=bookworm
readonly INCLUDE=systemd,systemd-sysv,udev,kmod,linux-image-cloud-amd64,initramfs-tools,btrfs-progs
log() { echo "build-debian-system: $*" >&2; }
die() {
    echo "build-debian-system: error: $*" >&2
    exit 1
}
[ $# -eq 1 ] || { echo "usage: $0 CACHE_DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root"
mkdir -p "$1"
CACHE=$(cd "$1" && pwd)
dir=$CACHE/debian12-systemd
sum=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
if [ -f "$dir/.stamp" ] && grep -qx "script=$sum" "$dir/.stamp" && [ -d "$dir/rootfs/boot" ]; then
    log "up to date: $dir/rootfs"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2 ||
        die "cannot install debootstrap: apt-get install debootstrap"
fi
# The mirror the host's apt uses (no other network is assumed).
mirror=$(grep -hoE '^URIs: *https?://[^ ]*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    head -n1 | sed 's/^URIs: *//' || true)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

tmp=$dir/rootfs.tmp
# A build that was interrupted may have left /proc or /sys mounted in it.
findmnt -rn -o TARGET | grep "^$tmp/" | sort -r | while read -r m; do umount -l "$m"; done || true
rm -rf --one-file-system "$tmp"
mkdir -p "$dir" "$CACHE/apt-archives"
log "debootstrap $SUITE (minbase + systemd + kernel) from $mirror into $dir (a few minutes, once)"
debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$CACHE/apt-archives" \
    "$SUITE" "$tmp" "$mirror" >&2 || die "debootstrap failed (see above)"

# The initramfs: every kernel gets one (debootstrap's install order may have
# configured the kernel before initramfs-tools), and it must mount Btrfs.
printf '%s\n' btrfs virtio_pci virtio_blk >>"$tmp/etc/initramfs-tools/modules"
kver=$(basename "$(ls -d "$tmp"/lib/modules/*-cloud-amd64 | tail -n1)")
[ -n "$kver" ] || die "no cloud kernel in the tree"
chroot "$tmp" update-initramfs -c -k "$kver" >&2 2>/dev/null ||
    chroot "$tmp" update-initramfs -u -k "$kver" >&2 || die "update-initramfs failed"
chroot "$tmp" lsinitramfs "/boot/initrd.img-$kver" | grep 'btrfs\.ko' >/dev/null ||
    die "the initramfs of $kver has no btrfs module"

# No getty on the serial console (nor on the unused virtual consoles), no
# first-boot prompts, a machine-id.
ln -sf /dev/null "$tmp/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$tmp/etc/systemd/system/getty.target"
ln -sf /dev/null "$tmp/etc/systemd/system/systemd-firstboot.service"
chroot "$tmp" systemd-machine-id-setup >/dev/null 2>&1 || true
[ -s "$tmp/etc/machine-id" ] || tr -d - </proc/sys/kernel/random/uuid >"$tmp/etc/machine-id"
echo debian-systemd >"$tmp/etc/hostname"
# Small: no apt lists, docs, man pages or locales.
chroot "$tmp" apt-get clean
rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/usr/share/doc/* "$tmp"/usr/share/man/* \
    "$tmp"/usr/share/locale/* "$tmp"/usr/share/info/*

{
    echo "script=$sum"
    echo "kernel=$kver"
    echo "built=$(date -u +%FT%TZ)"
} >"$tmp/.stamp-info"
mv "$tmp/.stamp-info" "$dir/.stamp.new"
rm -rf "$dir/rootfs"
mv "$tmp" "$dir/rootfs"
mv "$dir/.stamp.new" "$dir/.stamp"
log "done: $dir/rootfs (kernel $kver, $(du -sh "$dir/rootfs" | cut -f1))"
