#!/usr/bin/env bash
# powercut-record.sh OUT_DIR [DEPLOY_BINARY]
#
# Records the write logs of the power-cut replay (issue 11): boots the tiny
# test system's kernel in QEMU (TCG) with an initramfs that carries `deploy`
# and its tools (scripts/carry-tool.sh), and runs one operation per boot on a
# second disk, /dev/vda, attached through QEMU's `blklogwrites` driver: every
# write and flush the guest sends reaches the image and is appended to a log
# in dm-log-writes' format (read back by tests/common/replay.rs).
#
# Operations, in order, each starting from the disk the previous one left:
#   1 deploy      first deploy of `factory` (a directory rootfs) to a blank disk
#                 (`--boot bios`: the whole-disk layout)
#   2 upgrade     the user edits /etc in factory's run, then v2 is deployed
#                 from a tarball with the `marker` configure extension (the
#                 /etc three-way merge carries the edit) and its own kernel
#                 arguments (so a default boot entry that does not switch
#                 with systems/default shows)
#   3 set-default set-default factory
#   4 remove      remove v2
#   5 upgrade-v3  deploy v3 (a directory)
#   6 keep        deploy v4 with --keep 1 (removes factory)
#   7 cleanup     a deploy of v5 killed with SIGKILL while it copies, then
#                 `deploy cleanup`
# and on a second blank disk, the default hybrid layout (GPT, EFI system
# partition written from user space, Btrfs partition through a loop device):
#   8 hybrid-deploy       first deploy of `factory`
#   9 hybrid-upgrade      v2 from the tarball (its kernel files are shared
#                         with factory's on the ESP: the entry is new)
#  10 hybrid-set-default  set-default factory (loader.conf rewritten in place)
#  11 hybrid-trial        v3 added on trial: the default stays factory, the
#                         ESP gets systemd-boot's counted entries and
#                         loader.conf `default next-*`, SYSLINUX its one-shot
#                         record (the trial's record is written before each)
#
# Output in OUT_DIR/<checksum of the inputs> (the deploy binary, these
# scripts, the tiny kernel and initramfs), whose path is printed on
# stdout: NN-OP.log (the write log), NN-OP.console (serial console),
# NN-OP.sha256 (checksum of the disk the run left), `ops` (the operation
# names in order), `size` (the size of each disk in bytes), `.stamp`. A recording
# that exists is reused; recordings of other inputs stay side by side (the
# 4 newest are kept), so that runs of different binaries sharing one
# OUT_DIR never clobber each other. Recordings are serialised by a lock on
# OUT_DIR/.lock, and one appears only when complete.
#
# Environment: DEPLOY_TINY_ROOTFS (the tiny system, `make fixture`),
# POWERCUT_TIMEOUT (seconds per boot, default 600).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
here=$(cd "$(dirname "$0")" && pwd)

die() {
    echo "powercut-record: error: $*" >&2
    exit 1
}
log() { echo "powercut-record: $*" >&2; }
[[ $# -ge 1 && $# -le 2 ]] || {
    echo "usage: $0 OUT_DIR [DEPLOY_BINARY]" >&2
    exit 2
}
[[ $EUID -eq 0 ]] || die "run as root (the payload holds root-owned files)"
out=$1
deploy=${2:-$here/../target/release/deploy}
[[ -x $deploy ]] || die "no deploy binary at $deploy (build it with cargo build --release)"
tiny=${DEPLOY_TINY_ROOTFS:-}
[[ -n $tiny && -d $tiny/boot ]] ||
    die "DEPLOY_TINY_ROOTFS must name the tiny test system (make fixture builds it into .cache/tiny/rootfs)"
kernel=$(find "$tiny/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | head -n1)
initrd=$(find "$tiny/boot" -maxdepth 1 -name 'initrd.img-*' | sort | head -n1)
[[ -n $kernel && -n $initrd ]] || die "no boot/vmlinuz-* and boot/initrd.img-* in $tiny"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
timeout=${POWERCUT_TIMEOUT:-600}
readonly SIZE=$((1024 * 1024 * 1024))
readonly OPS=(deploy upgrade set-default remove upgrade-v3 keep cleanup
    hybrid-deploy hybrid-upgrade hybrid-set-default hybrid-trial)
# What a hybrid deploy needs in the guest beyond the carried tools: the
# loop module (the Btrfs partition is reached through a loop device; the
# tiny initramfs lacks it: taken from the tiny kernel's package, which
# build-tiny-system.sh keeps in CACHE/debs), systemd-boot and SYSLINUX's
# GPT boot code.
kver=$(cat "$tiny/../kernel-version" 2>/dev/null) || die "no kernel-version next to $tiny (make fixture)"
kdeb=$(find "$tiny/../../debs" -maxdepth 1 -name "linux-image-${kver}_*.deb" 2>/dev/null | head -n1)
[[ -n $kdeb ]] || die "the tiny kernel's package linux-image-${kver}_*.deb is not in $tiny/../../debs (make fixture)"
readonly SDBOOT=/usr/lib/systemd/boot/efi/systemd-bootx64.efi GPTMBR=/usr/lib/syslinux/mbr/gptmbr.bin
[[ -f $SDBOOT ]] || die "$SDBOOT not found: apt-get install systemd-boot-efi"
[[ -f $GPTMBR ]] || die "$GPTMBR not found: apt-get install syslinux-common"

mkdir -p "$out"
root=$(cd "$out" && pwd)
stamp=$(cat "$deploy" "$0" "$here/carry-tool.sh" "$kernel" "$initrd" "$kdeb" "$SDBOOT" "$GPTMBR" |
    sha256sum | cut -d' ' -f1)
final=$root/${stamp:0:16}
exec 9>"$root/.lock"
flock 9
if [[ -f $final/.stamp ]] && [[ $(cat "$final/.stamp") == "$stamp" ]]; then
    log "up to date: $final"
    echo "$final"
    exit 0
fi
# Under the lock no other recording runs: what a killed one left can go.
rm -rf "$root"/.rec.* "$final"
work=$(mktemp -d "$root/.rec.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/out
mkdir "$out"

# ------------------------------------------------------------ the payload
p=$work/payload
mkdir -p "$p/powercut/ops" "$p/powercut/ext" "$p/mnt" "$p/tmp"
"$here/carry-tool.sh" "$p" "$deploy" >/dev/null
cp -a "$tiny" "$p/powercut/rootfs"
dpkg-deb --fsys-tarfile "$kdeb" | tar -xO "./lib/modules/$kver/kernel/drivers/block/loop.ko" >"$p/powercut/loop.ko" ||
    die "no loop.ko in $kdeb"
for f in "$SDBOOT" "$GPTMBR"; do
    mkdir -p "$p$(dirname "$f")"
    cp "$f" "$p$f"
done
# v2: the same system with one more vendor file in /etc and in /opt.
v2=$work/v2
cp -a "$tiny" "$v2"
echo "v2" >"$v2/etc/v2-release"
echo "v2 opt file" >"$v2/opt/tiny/v2-file.txt"
tar -C "$v2" -cf "$p/powercut/v2.tar" .
rm -rf "$v2"

cat >"$p/powercut/ext/marker.configure" <<'EXT'
#!/bin/sh
# A configure extension: leaves a marker in the tree it is given.
set -eu
echo "configured by marker for $DEPLOY_VERSION" >"$1/etc/powercut-marker"
EXT
chmod 0755 "$p/powercut/ext/marker.configure"

D="deploy"
cat >"$p/powercut/ops/deploy.sh" <<OP
$D --boot bios --version factory --rootfs /powercut/rootfs /dev/vda
OP
cat >"$p/powercut/ops/upgrade.sh" <<OP
mount -t btrfs -o subvol=systems/factory/run /dev/vda /mnt
echo "a local setting" >/mnt/etc/local.conf
echo "tiny-edited" >/mnt/etc/hostname
umount /mnt
$D --version v2 --rootfs /powercut/v2.tar --extensions-dir /powercut/ext -e marker \\
    --kernel-args "console=tty0 console=ttyS0,115200 powercut=v2" /dev/vda
OP
cat >"$p/powercut/ops/set-default.sh" <<OP
$D set-default factory /dev/vda
OP
cat >"$p/powercut/ops/remove.sh" <<OP
$D remove v2 /dev/vda
OP
cat >"$p/powercut/ops/upgrade-v3.sh" <<OP
$D --version v3 --rootfs /powercut/rootfs /dev/vda
OP
cat >"$p/powercut/ops/keep.sh" <<OP
$D --version v4 --rootfs /powercut/v2.tar --keep 1 /dev/vda
OP
cat >"$p/powercut/ops/hybrid-deploy.sh" <<OP
$D --version factory --rootfs /powercut/rootfs /dev/vda
OP
cat >"$p/powercut/ops/hybrid-upgrade.sh" <<OP
$D --version v2 --rootfs /powercut/v2.tar /dev/vda
OP
cat >"$p/powercut/ops/hybrid-set-default.sh" <<OP
$D set-default factory /dev/vda
OP
cat >"$p/powercut/ops/hybrid-trial.sh" <<OP
$D --version v3 --trial --rootfs /powercut/rootfs /dev/vda
OP
cat >"$p/powercut/ops/cleanup.sh" <<'OP'
# Kill a deploy of v5 while it copies, like a crash of the process.
deploy --version v5 --rootfs /powercut/rootfs /dev/vda 2>/tmp/v5.err &
pid=$!
i=0
while ! grep -q '^==> Syncing' /tmp/v5.err && [ $i -lt 600 ]; do
    usleep 50000
    i=$((i + 1))
done
kill -9 $pid
wait $pid || true
cat /tmp/v5.err
echo "killed the deploy of v5"
deploy cleanup /dev/vda
OP

cat >"$p/init" <<'INIT'
#!/bin/sh
# The power-cut recording guest: load the tiny initramfs's modules, run the
# operation named by powercut.op= on /dev/vda, report, flush, power off.
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
while read -r kind path; do
    name=${path##*/}
    name=${name%%.ko*}
    name=$(echo "$name" | tr - _)
    [ -d "/sys/module/$name" ] && continue
    insmod "$path" 2>/dev/null || [ "$kind" = optional ] || echo "POWERCUT: cannot load $path"
done </etc/modules.list
op=
for arg in $(cat /proc/cmdline); do
    case $arg in powercut.op=*) op=${arg#powercut.op=} ;; esac
done
insmod /powercut/loop.ko 2>/dev/null || [ -d /sys/module/loop ] || echo "POWERCUT: cannot load loop.ko"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
echo "POWERCUT: start $op"
sh -x "/powercut/ops/$op.sh"
rc=$?
sync
echo "POWERCUT: done $op exit $rc"
poweroff -f
sleep 10
INIT
chmod 0755 "$p/init"

(cd "$p" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc) >"$work/payload.cpio"
# The kernel takes an uncompressed cpio after a compressed one only at a
# 4-byte boundary (zero bytes between archives are skipped): pad the tiny
# initramfs, whose gzip length is anything, to one.
cp "$initrd" "$work/initrd.img"
truncate -s %4 "$work/initrd.img"
cat "$work/payload.cpio" >>"$work/initrd.img"

# ------------------------------------------------------------ the runs
# The whole-disk operations share one disk, the hybrid ones another.
truncate -s "$SIZE" "$work/disk.img" "$work/hybrid.img"
n=0
for op in "${OPS[@]}"; do
    case $op in hybrid-*) disk=$work/hybrid.img ;; *) disk=$work/disk.img ;; esac
    n=$((n + 1))
    name=$(printf '%02d-%s' "$n" "$op")
    log "recording $name"
    start=$(date +%s)
    # A guest that fails before it starts the operation (TCG on a loaded
    # host can miss the timer check) changed nothing: boot it again.
    for attempt in 1 2 3; do
        : >"$out/$name.log"
        if ! timeout "$timeout" qemu-system-x86_64 -accel tcg -m 1024 -smp 1 \
            -nographic -no-reboot -monitor none -net none -serial "file:$out/$name.console" \
            -kernel "$kernel" -initrd "$work/initrd.img" \
            -append "console=ttyS0 panic=-1 quiet no_timer_check powercut.op=$op" \
            -blockdev "driver=blklogwrites,node-name=target,log-append=off,file.driver=file,file.filename=$disk,log.driver=file,log.filename=$out/$name.log" \
            -device virtio-blk-pci,drive=target,write-cache=on >"$work/qemu.out" 2>&1; then
            cat "$work/qemu.out" >&2
            tail -n 30 "$out/$name.console" >&2 || true
            cp "$out/$name.console" "$root/last-failure.console" 2>/dev/null || true
            die "QEMU failed or timed out (${timeout}s) recording $name (console: $root/last-failure.console)"
        fi
        grep -q "POWERCUT: start $op" "$out/$name.console" && break
        log "the guest did not start $op (attempt $attempt): $(grep -m1 -i 'panic' "$out/$name.console" || true)"
    done
    if ! grep -q "^POWERCUT: done $op exit 0" "$out/$name.console"; then
        tail -n 40 "$out/$name.console" >&2
        cp "$out/$name.console" "$root/last-failure.console"
        die "operation $op failed in the guest (console: $root/last-failure.console)"
    fi
    sha256sum "$disk" | cut -d' ' -f1 >"$out/$name.sha256"
    echo "$name" >>"$out/ops"
    log "recorded $name in $(($(date +%s) - start)) s ($(du -k "$out/$name.log" | cut -f1) KiB of log)"
done
echo "$SIZE" >"$out/size"
echo "$stamp" >"$out/.stamp"
mv "$out" "$final"
# Keep the 4 newest recordings.
find "$root" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9a-f]\{16\}' -printf '%T@ %p\n' |
    sort -rn | tail -n +5 | cut -d' ' -f2- | xargs -r rm -rf
log "done: $final"
echo "$final"
