#!/bin/bash
# fetch-rpi-firmware.sh CACHE_DIR
#
# Downloads what a Raspberry Pi needs before Linux, as Debian 12 packages it,
# for the `--boot rpi` tests: raspi-firmware (section non-free-firmware: the
# firmware start*.elf, fixup*.dat, bootcode.bin) and u-boot-rpi:arm64 (U-Boot
# for the Pi 3/4 in /usr/lib/u-boot/rpi_arm64/u-boot.bin), and unpacks both
# into CACHE_DIR/rpi/root, the way they land in a tree with them installed;
# and the Raspberry Pi device trees of Debian's arm64 kernel (linux-image-arm64,
# its broadcom/ folder) into CACHE_DIR/rpi/dtbs (the tiny systems use the cloud
# kernel, which ships none; tests/rpi.rs boots U-Boot under qemu -M raspi3b
# with them).
# Package lists of its own (CACHE_DIR/apt-rpi, sources bookworm main and
# non-free-firmware, arm64): the host's apt configuration is untouched.
# Idempotent: returns at once when CACHE_DIR/rpi/.stamp exists.
set -euo pipefail

CACHE_DIR=${1:?usage: fetch-rpi-firmware.sh CACHE_DIR}
mkdir -p "$CACHE_DIR"
CACHE_DIR=$(realpath "$CACHE_DIR")
OUT=$CACHE_DIR/rpi
[[ -f $OUT/.stamp ]] && exit 0
log() { echo "fetch-rpi-firmware: $*" >&2; }
die() { echo "fetch-rpi-firmware: error: $*" >&2 && exit 1; }

APT=$CACHE_DIR/apt-rpi
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc/parts.d" "$OUT/debs"
cat >"$APT/etc/sources.list" <<'SOURCES'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main non-free-firmware
SOURCES
APT_OPTS=(-q -o APT::Sandbox::User=root -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
    -o "Dir::Etc::SourceList=$APT/etc/sources.list" -o "Dir::Etc::SourceParts=$APT/etc/parts.d"
    -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64")
if ! compgen -G "$APT/lists/*_Packages*" >/dev/null; then
    log "apt-get update (package lists in $APT)"
    apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update failed"
fi
rm -f "$OUT"/debs/*.deb
KERNEL_PKG=$(apt-cache "${APT_OPTS[@]}" depends linux-image-arm64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -1)
[[ -n $KERNEL_PKG ]] || die "cannot resolve linux-image-arm64"
(cd "$OUT/debs" && apt-get "${APT_OPTS[@]}" download raspi-firmware u-boot-rpi >&2) ||
    die "cannot download raspi-firmware and u-boot-rpi"
mkdir -p "$OUT/kernel"
rm -f "$OUT"/kernel/*.deb
(cd "$OUT/kernel" && apt-get "${APT_OPTS[@]}" download "$KERNEL_PKG" >&2) ||
    die "cannot download $KERNEL_PKG"
rm -rf "$OUT/root.tmp"
mkdir -p "$OUT/root.tmp"
for d in "$OUT"/debs/*.deb; do
    dpkg-deb -x "$d" "$OUT/root.tmp"
done
[[ -f $OUT/root.tmp/usr/lib/raspi-firmware/start4.elf ]] || die "raspi-firmware has no start4.elf"
[[ -f $OUT/root.tmp/usr/lib/u-boot/rpi_arm64/u-boot.bin ]] || die "u-boot-rpi has no rpi_arm64/u-boot.bin"
rm -rf "$OUT/dtbs.tmp"
mkdir -p "$OUT/dtbs.tmp"
dpkg-deb --fsys-tarfile "$OUT"/kernel/*.deb |
    tar -x -C "$OUT/dtbs.tmp" --wildcards --no-anchored '*/broadcom/*.dtb'
find "$OUT/dtbs.tmp" -name 'bcm2837-rpi-3-b.dtb' | grep -q . || die "$KERNEL_PKG has no bcm2837-rpi-3-b.dtb"
find "$OUT/dtbs.tmp" -name '*.dtb' -exec mv -t "$OUT/dtbs.tmp" {} +
find "$OUT/dtbs.tmp" -mindepth 1 -type d -prune -exec rm -rf {} +
rm -f "$OUT"/kernel/*.deb
rm -rf "$OUT/root" "$OUT/dtbs"
mv "$OUT/root.tmp" "$OUT/root"
mv "$OUT/dtbs.tmp" "$OUT/dtbs"
ls "$OUT/debs" >"$OUT/.stamp"
log "done: $OUT/root"
