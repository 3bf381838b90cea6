#!/bin/bash
# build-tiny-system.sh CACHE_DIR [ARCH]
#
# Builds the tiny bootable test system used by btrfs-deploy's boot tests,
# from two Debian packages: the kernel behind linux-image-cloud-ARCH and
# busybox-static. ARCH is amd64 (the default) or arm64; an arm64 system is
# built on an amd64 host from arm64 packages (apt package lists of its own,
# under CACHE_DIR/apt-arm64, so the host's dpkg architectures stay as they
# are; busybox's applet list is read through qemu-user: qemu-user-static).
#
# Outputs (all under CACHE_DIR; SUFFIX is empty for amd64, -arm64 for arm64):
#   debs/                         the downloaded .debs (delete to refresh)
#   tinySUFFIX/rootfs/            the root filesystem tree (Debian kernel layout:
#                                 boot/vmlinuz-<ver>, boot/initrd.img-<ver>,
#                                 /vmlinuz and /initrd.img relative symlinks;
#                                 arm64: vmlinuz is an uncompressed Image, and
#                                 usr/lib/linux-image-<ver>/arm/ holds the device
#                                 trees of Arm's reference boards, as Debian ships them)
#   tinySUFFIX/kernel-version     the kernel version, e.g. 6.1.0-56-cloud-amd64
#   tinySUFFIX/.stamp             what the tree was built from (quick path)
#
# The rootfs's /sbin/init prints lines that tests grep for:
#   TINY: boot start | TINY: hostname=<h> | TINY: cmdline=<...>
#   TINY-MOUNT: <mount point> <root in fs> <mount options> <super options>
#   TINY-HOOK: <output of /etc/tiny-boot.d/* executables, sorted>
#   TINY: boot done        (then sync and power off)
# The initramfs prints `TINY-INITRAMFS: FAILED: <what> (<details>)` and powers
# off on any failure.
#
# Must run as root on Debian 12 (installs what it needs with apt-get).
# Idempotent: returns at once when the tree is already built by this script.
set -euo pipefail

ARCH=${2:-amd64}
case $ARCH in
amd64 | arm64) ;;
*) echo "build-tiny-system: error: unsupported ARCH $ARCH (amd64 or arm64)" >&2 && exit 2 ;;
esac
readonly ARCH
readonly META_PKG=linux-image-cloud-$ARCH
readonly BUSYBOX_PKG=busybox-static
# Modules the initramfs needs to find a virtio disk and mount Btrfs on it
# (and overlay, for the volatile root mode of tests/root_mode.rs).
readonly WANTED_MODULES=(virtio_pci virtio_blk btrfs overlay)
# Optional extras (checksum algorithms Btrfs may use); loaded if they load.
readonly OPTIONAL_MODULES=(xxhash_generic blake2b_generic sha256_generic crc32c_intel crc32c_generic)

log() { echo "build-tiny-system: $*" >&2; }
die() {
    echo "build-tiny-system: error: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 CACHE_DIR [amd64|arm64]" >&2
    exit 2
}

[[ $# -eq 1 || $# -eq 2 ]] || usage
[[ $EUID -eq 0 ]] || die "must run as root (creates files owned by other users and device nodes)"

mkdir -p "$1"
CACHE_DIR=$(cd "$1" && pwd)
DEBS_DIR=$CACHE_DIR/debs
if [[ $ARCH == amd64 ]]; then
    TINY_DIR=$CACHE_DIR/tiny
else
    TINY_DIR=$CACHE_DIR/tiny-$ARCH
fi
HOST_ARCH=$(dpkg --print-architecture)
SCRIPT_SUM=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)

# ---------------------------------------------------------------- quick path
stamp_ok() {
    [[ -f $TINY_DIR/.stamp && -f $TINY_DIR/kernel-version && -d $TINY_DIR/rootfs ]] || return 1
    local ver
    ver=$(cat "$TINY_DIR/kernel-version")
    [[ -f $TINY_DIR/rootfs/boot/vmlinuz-$ver && -f $TINY_DIR/rootfs/boot/initrd.img-$ver ]] || return 1
    grep -qx "script=$SCRIPT_SUM" "$TINY_DIR/.stamp" || return 1
    # The debs it was built from must still be there.
    local deb
    while read -r deb; do
        [[ -f $DEBS_DIR/$deb ]] || return 1
    done < <(sed -n 's/^deb=//p' "$TINY_DIR/.stamp")
}

if stamp_ok; then
    log "up to date: $TINY_DIR/rootfs (kernel $(cat "$TINY_DIR/kernel-version"))"
    exit 0
fi

# ---------------------------------------------------------------- host tools
ensure_tools() {
    local missing=() pair cmd pkg
    local pairs=(cpio:cpio gzip:gzip depmod:kmod modprobe:kmod dpkg-deb:dpkg apt-get:apt)
    [[ $ARCH == "$HOST_ARCH" ]] || pairs+=("qemu-$(qemu_arch)-static:qemu-user-static")
    for pair in "${pairs[@]}"; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "installing: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
            { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; } ||
            die "cannot install ${missing[*]}"
    fi
}
# qemu-user's name of ARCH.
qemu_arch() {
    case $ARCH in amd64) echo x86_64 ;; arm64) echo aarch64 ;; esac
}
ensure_tools
# depmod and modprobe live in /sbin, which a non-login root shell may lack.
export PATH=$PATH:/usr/sbin:/sbin

# ---------------------------------------------------------------- downloads
APT_OPTS=(-o APT::Sandbox::User=root -q)
if [[ $ARCH != "$HOST_ARCH" ]]; then
    # Package lists of ARCH in the cache: the host's configuration is untouched.
    mkdir -p "$CACHE_DIR/apt-$ARCH/lists/partial" "$CACHE_DIR/apt-$ARCH/cache/archives/partial"
    APT_OPTS+=(-o "Dir::State::Lists=$CACHE_DIR/apt-$ARCH/lists" -o "Dir::Cache=$CACHE_DIR/apt-$ARCH/cache"
        -o "APT::Architecture=$ARCH" -o "APT::Architectures::=$ARCH")
fi

# Prints the versioned kernel package behind the metapackage.
resolve_kernel_pkg() {
    apt-cache "${APT_OPTS[@]}" depends "$META_PKG" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

# apt_download PKG: downloads PKG's .deb into $DEBS_DIR, updating the package
# lists once if the first attempt fails.
apt_download() {
    (cd "$DEBS_DIR" && apt-get "${APT_OPTS[@]}" download "$1" >&2) && return 0
    log "apt-get download $1 failed; running apt-get update and retrying"
    apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update failed"
    (cd "$DEBS_DIR" && apt-get "${APT_OPTS[@]}" download "$1" >&2) || die "cannot download $1"
}

# Prints the newest cached .deb whose name starts with PREFIX_ (empty if none).
cached_deb() {
    local f
    f=$(find "$DEBS_DIR" -maxdepth 1 -name "$1_*_$ARCH.deb" -printf '%f\n' | sort -V | tail -n1)
    [[ -n $f ]] && echo "$f"
    return 0
}

mkdir -p "$DEBS_DIR"
KERNEL_DEB=$(find "$DEBS_DIR" -maxdepth 1 -name "linux-image-[0-9]*-cloud-${ARCH}_*_$ARCH.deb" -printf '%f\n' | sort -V | tail -n1)
if [[ -z $KERNEL_DEB ]]; then
    kpkg=$(resolve_kernel_pkg || true)
    if [[ -z $kpkg ]]; then
        log "$META_PKG unknown to apt-cache; running apt-get update"
        apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update failed"
        kpkg=$(resolve_kernel_pkg || true)
    fi
    [[ -n $kpkg ]] || die "cannot resolve the kernel package behind $META_PKG"
    log "downloading $kpkg (from $META_PKG)"
    apt_download "$kpkg"
    KERNEL_DEB=$(cached_deb "$kpkg")
fi
BUSYBOX_DEB=$(cached_deb "$BUSYBOX_PKG")
if [[ -z $BUSYBOX_DEB ]]; then
    log "downloading $BUSYBOX_PKG"
    apt_download "$BUSYBOX_PKG"
    BUSYBOX_DEB=$(cached_deb "$BUSYBOX_PKG")
fi
[[ -n $KERNEL_DEB && -n $BUSYBOX_DEB ]] || die "downloaded .debs not found in $DEBS_DIR"
log "using $KERNEL_DEB and $BUSYBOX_DEB"

# ---------------------------------------------------------------- build area
WORK=$(mktemp -d "$CACHE_DIR/.tiny-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/kernel" "$WORK/busybox"
dpkg-deb -x "$DEBS_DIR/$KERNEL_DEB" "$WORK/kernel"
dpkg-deb -x "$DEBS_DIR/$BUSYBOX_DEB" "$WORK/busybox"

VMLINUZ=$(find "$WORK/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
[[ -n $VMLINUZ ]] || die "no boot/vmlinuz-* in $KERNEL_DEB"
KVER=${VMLINUZ##*/vmlinuz-}
KCONFIG=$WORK/kernel/boot/config-$KVER
BUSYBOX=$WORK/busybox/bin/busybox
[[ -x $BUSYBOX ]] || die "no bin/busybox in $BUSYBOX_DEB"
log "kernel version $KVER"

# The initramfs is gzip-compressed: the kernel must be able to unpack it.
grep -qx 'CONFIG_BLK_DEV_INITRD=y' "$KCONFIG" || die "kernel $KVER has no initramfs support"
grep -qx 'CONFIG_RD_GZIP=y' "$KCONFIG" || die "kernel $KVER cannot unpack a gzip initramfs"
grep -qx 'CONFIG_DEVTMPFS=y' "$KCONFIG" || die "kernel $KVER has no devtmpfs"

# modules.dep is generated by the package's postinst, so make it here.
MODROOT=$WORK/kernel
[[ -d $MODROOT/lib/modules/$KVER ]] || die "no lib/modules/$KVER in $KERNEL_DEB"
depmod -b "$MODROOT" "$KVER"

# run_target PROGRAM ARGS...: runs an ARCH binary (through qemu-user when
# ARCH is not the host's).
run_target() {
    if [[ $ARCH == "$HOST_ARCH" ]]; then
        "$@"
    else
        "qemu-$(qemu_arch)-static" "$@"
    fi
}

# install_busybox ROOT: busybox at ROOT/bin/busybox plus applet symlinks
# (relative), except init/linuxrc which are ours.
install_busybox() {
    local root=$1 applet dir rel
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    install -m 0755 "$BUSYBOX" "$root/bin/busybox"
    while read -r applet; do
        case $applet in sbin/init | linuxrc | bin/busybox) continue ;; esac
        dir=$(dirname "$applet")
        case $dir in
        bin) rel=busybox ;;
        sbin) rel=../bin/busybox ;;
        usr/bin | usr/sbin) rel=../../bin/busybox ;;
        *) die "unexpected busybox applet path $applet" ;;
        esac
        [[ -e $root/$applet || -L $root/$applet ]] || ln -s "$rel" "$root/$applet"
    done < <(run_target "$BUSYBOX" --list-full)
}

# ---------------------------------------------------------------- initramfs
# Prints "required|optional <path relative to lib/modules/KVER>" lines in load
# order. Built-in modules need no loading and are left out.
module_load_list() {
    local m line path seen=" "
    emit() { # $1 kind, $2 path
        case $seen in *" $2 "*) return ;; esac
        seen+="$2 "
        echo "$1 $2"
    }
    # Hard dependencies from modules.dep: depmod lists every (indirect)
    # dependency, deepest last, so loading right-to-left is dependency order.
    for m in "${WANTED_MODULES[@]}"; do
        if grep -qE "/${m}\.ko(\.[a-z]+)?$" "$MODROOT/lib/modules/$KVER/modules.builtin"; then
            log "module $m is built in"
            continue
        fi
        line=$(grep -E "(^|/)${m}\.ko(\.[a-z]+)?:" "$MODROOT/lib/modules/$KVER/modules.dep" | head -n1) ||
            die "module $m not in modules.dep of $KVER"
        local deps i
        read -ra deps <<<"${line#*:}"
        for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
            emit required "${deps[i]}"
        done
        emit required "${line%%:*}"
    done
    # Soft dependencies and checksum helpers: best effort.
    for m in "${WANTED_MODULES[@]}" "${OPTIONAL_MODULES[@]}"; do
        while read -r _ path; do
            [[ -n $path ]] || continue
            emit optional "${path#"$MODROOT/lib/modules/$KVER/"}"
        done < <(modprobe -d "$MODROOT" -S "$KVER" --show-depends "$m" 2>/dev/null | grep '^insmod ' || true)
    done
}

INITRAMFS_TREE=$WORK/initramfs
mkdir -p "$INITRAMFS_TREE"/{dev,proc,sys,run,tmp,newroot,etc}
install_busybox "$INITRAMFS_TREE"
mknod -m 0600 "$INITRAMFS_TREE/dev/console" c 5 1
mknod -m 0666 "$INITRAMFS_TREE/dev/null" c 1 3

module_load_list >"$WORK/modules.list"
[[ -s $WORK/modules.list ]] || die "no modules to load?"
# Required modules first (in dependency order), then the optional ones whose
# dependencies are loaded by then or are themselves in the list before them.
{
    grep '^required ' "$WORK/modules.list"
    grep '^optional ' "$WORK/modules.list"
} | while read -r kind rel; do
    mkdir -p "$INITRAMFS_TREE/lib/modules/$KVER/$(dirname "$rel")"
    cp "$MODROOT/lib/modules/$KVER/$rel" "$INITRAMFS_TREE/lib/modules/$KVER/$rel"
    echo "$kind /lib/modules/$KVER/$rel"
done >"$INITRAMFS_TREE/etc/modules.list"
log "initramfs modules: $(awk '{ n = split($2, a, "/"); printf "%s%s(%s)", sep, a[n], $1; sep = " " }' "$INITRAMFS_TREE/etc/modules.list")"

cat >"$INITRAMFS_TREE/init" <<'EOF'
#!/bin/sh
# Tiny initramfs init: load virtio + btrfs modules, mount root= with
# rootflags=, switch_root to init= (default /sbin/init). Any failure: one FAILED line, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

fail() {
    echo "TINY-INITRAMFS: FAILED: $1 ($2)"
    sync
    poweroff -f
    sleep 5
    exit 1
}

mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc 2>/dev/null || grep -q ' /proc ' /proc/mounts 2>/dev/null || fail "mounting /proc" "mount -t proc failed"
mount -t sysfs sysfs /sys 2>/dev/null || grep -q ' /sys ' /proc/mounts || fail "mounting /sys" "mount -t sysfs failed"
mount -t devtmpfs devtmpfs /dev 2>/dev/null || grep -q ' /dev ' /proc/mounts || fail "mounting /dev" "mount -t devtmpfs failed"
exec </dev/console >/dev/console 2>&1
echo "TINY-INITRAMFS: start"

while read -r kind path; do
    name=${path##*/}
    name=${name%%.ko*}
    name=$(echo "$name" | tr - _)
    [ -d "/sys/module/$name" ] && continue
    if ! out=$(insmod "$path" 2>&1); then
        if [ "$kind" = required ]; then
            fail "loading module $name" "insmod $path: $out"
        fi
        # "No such device": hardware-specific variant (e.g. crc32c_intel
        # without SSE4.2 under TCG); not worth a line.
        case $out in
        *"No such device"*) ;;
        *) echo "TINY-INITRAMFS: note: optional module $name not loaded: $out" ;;
        esac
    fi
done </etc/modules.list

root=
rootfstype=auto
rootflags=
rwmode=ro
init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case $arg in
    root=*) root=${arg#root=} ;;
    rootfstype=*) rootfstype=${arg#rootfstype=} ;;
    rootflags=*) rootflags=${arg#rootflags=} ;;
    rw) rwmode=rw ;;
    ro) rwmode=ro ;;
    init=*) init=${arg#init=} ;;
    esac
done
[ -n "$root" ] || fail "no root= on the kernel command line" "$(cat /proc/cmdline)"

# Wait up to ~10 s for the root device.
dev=
i=0
while [ $i -lt 100 ]; do
    case $root in
    UUID=* | LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
    /dev/*) [ -b "$root" ] && dev=$root ;;
    *) fail "unsupported root=$root" "use UUID=..., LABEL=... or /dev/..." ;;
    esac
    [ -n "$dev" ] && break
    usleep 100000
    i=$((i + 1))
done
[ -n "$dev" ] || fail "root device $root not found after 10 s" "block devices: $(ls /sys/class/block 2>/dev/null | tr '\n' ' ')"

opts=$rwmode
[ -n "$rootflags" ] && opts="$opts,$rootflags"
echo "TINY-INITRAMFS: mounting $dev ($root) type $rootfstype options $opts"
if ! out=$(mount -t "$rootfstype" -o "$opts" "$dev" /newroot 2>&1); then
    fail "mounting root $dev on /newroot" "type $rootfstype, options $opts: $out; $(dmesg | grep -i btrfs | tail -n 3 | tr '\n' ' ')"
fi
[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || fail "no $init in root" "$dev options $opts"

for d in dev proc sys; do
    mkdir -p "/newroot/$d" 2>/dev/null
    mount --move "/$d" "/newroot/$d" 2>/dev/null || umount -l "/$d" 2>/dev/null
done
exec switch_root /newroot "$init"
fail "switch_root" "exec switch_root /newroot $init returned"
EOF
chmod 0755 "$INITRAMFS_TREE/init"

INITRD=$WORK/initrd.img
# Same inputs, same initramfs: fixed timestamps (the kernel package's date).
find "$INITRAMFS_TREE" -exec touch -h -r "$VMLINUZ" {} +
(cd "$INITRAMFS_TREE" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0 --reproducible) |
    gzip -n -9 >"$INITRD"

# ---------------------------------------------------------------- rootfs
R=$WORK/rootfs
mkdir -p "$R"/{boot,dev,proc,sys,run,mnt,etc/tiny-boot.d,var/lib/tiny,var/tmp,tmp,srv,opt/tiny,root,home/user}
install_busybox "$R"
install -m 0644 "$VMLINUZ" "$R/boot/vmlinuz-$KVER"
install -m 0644 "$INITRD" "$R/boot/initrd.img-$KVER"
ln -s "boot/vmlinuz-$KVER" "$R/vmlinuz"
ln -s "boot/initrd.img-$KVER" "$R/initrd.img"
# Device trees, where Debian's arm64 kernel package ships them (those of
# Arm's reference boards only: enough for `fdtdir` in a boot menu, without
# the 13 MB of all of them).
DTB_DIR=usr/lib/linux-image-$KVER
if [[ -d $WORK/kernel/$DTB_DIR/arm ]]; then
    mkdir -p "$R/$DTB_DIR/arm"
    cp "$WORK/kernel/$DTB_DIR"/arm/*.dtb "$R/$DTB_DIR/arm/"
fi
chmod 1777 "$R/tmp" "$R/var/tmp"
chmod 0700 "$R/root"

echo "# tiny test system: the deployer adds / and the state entries" >"$R/etc/fstab"
echo tiny >"$R/etc/hostname"
cat >"$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:Tiny User:/home/user:/bin/sh
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
shadow:x:42:
user:x:1000:
EOF
cat >"$R/etc/shadow" <<'EOF'
root:*:19000:0:99999:7:::
user:*:19000:0:99999:7:::
EOF
chmod 0644 "$R/etc/passwd" "$R/etc/group"
chown 0:42 "$R/etc/shadow"
chmod 0640 "$R/etc/shadow"

echo "hello from the tiny system" >"$R/home/user/hello.txt"
chown -R 1000:1000 "$R/home/user"
chmod 0750 "$R/home/user"
echo "root's file" >"$R/root/root-file.txt"
echo "tiny marker" >"$R/var/lib/tiny/marker"
echo "srv file" >"$R/srv/srv-file.txt"
echo "opt file" >"$R/opt/tiny/opt-file.txt"

cat >"$R/sbin/init" <<'EOF'
#!/bin/sh
# Tiny system init: report what is mounted where, run test hooks, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "TINY: boot start"

# Apply the fstab options of / (like systemd-remount-fs), then the rest.
rootopts=$(awk '$1 !~ /^#/ && $2 == "/" { print $4; exit }' /etc/fstab 2>/dev/null)
if [ -n "$rootopts" ]; then
    out=$(mount -o "remount,$rootopts" / 2>&1) || echo "TINY: remount / with $rootopts failed: $out"
fi
if ! out=$(mount -a 2>&1); then
    echo "TINY: mount -a failed: $out"
elif [ -n "$out" ]; then
    echo "TINY: mount -a: $out"
fi
[ -r /etc/hostname ] && hostname -F /etc/hostname
echo "TINY: hostname=$(hostname)"
echo "TINY: cmdline=$(cat /proc/cmdline)"

# mountinfo: id parent maj:min root mountpoint mountopts [optional...] - fstype source superopts
# (fields are split on purpose; no globbing)
set -f
while read -r line; do
    set -- $line
    root=$4
    mp=$5
    mopts=$6
    rest=${line#* - }
    set -- $rest
    [ "$1" = btrfs ] || continue
    echo "TINY-MOUNT: $mp $root $mopts $3"
done </proc/self/mountinfo
set +f

# Test hooks, in glob (sorted) order.
for h in /etc/tiny-boot.d/*; do
    if [ -f "$h" ] && [ -x "$h" ]; then
        "$h" 2>&1 | sed 's/^/TINY-HOOK: /'
    fi
done

echo "TINY: boot done"
sync
poweroff -f
sleep 10
EOF
chmod 0755 "$R/sbin/init"

# ---------------------------------------------------------------- publish
echo "$KVER" >"$WORK/kernel-version"
{
    echo "script=$SCRIPT_SUM"
    echo "deb=$KERNEL_DEB"
    echo "deb=$BUSYBOX_DEB"
} >"$WORK/stamp"

mkdir -p "$TINY_DIR"
rm -rf "$TINY_DIR/rootfs" "$TINY_DIR/.stamp"
mv "$R" "$TINY_DIR/rootfs"
mv "$WORK/kernel-version" "$TINY_DIR/kernel-version"
mv "$WORK/stamp" "$TINY_DIR/.stamp"
log "built $TINY_DIR/rootfs (kernel $KVER, initramfs $(du -k "$TINY_DIR/rootfs/boot/initrd.img-$KVER" | cut -f1) KiB, rootfs $(du -sk "$TINY_DIR/rootfs" | cut -f1) KiB)"
