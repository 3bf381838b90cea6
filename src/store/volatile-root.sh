#!/bin/sh
# btrfs-deploy: volatile root (installed by `deploy --root-mode volatile`,
# started as init= by the kernel). The Btrfs root is mounted read-only; this
# puts a tmpfs overlay on top of it (lower: the read-only root, upper and
# work: a tmpfs), moves /dev, /proc and /sys into it, makes it the root and
# starts the tree's own init. Everything written outside /state is gone at
# the next boot. Works without systemd (like systemd.volatile=overlay, which
# needs a systemd initrd).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
init=/sbin/init
[ -e /lib/systemd/systemd ] && [ ! -e /sbin/init ] && init=/lib/systemd/systemd

fallback() {
    echo "btrfs-deploy volatile-root: FAILED: $1; starting $init on the read-only root" >/dev/console 2>&1 ||
        echo "btrfs-deploy volatile-root: FAILED: $1" >&2
    exec "$init" "$@"
}

mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The root must be read-only below the overlay (the kernel's `ro`).
mount -o remount,ro / 2>/dev/null
# /run: a mount of its own when an initramfs moved its /run there.
base=/run
if grep -q ' /run ' /proc/mounts; then
    base=/run/btrfs-deploy-volatile
    mkdir -p "$base" || fallback "creating $base"
fi
mount -t tmpfs -o mode=0755 btrfs-deploy-volatile "$base" || fallback "mounting a tmpfs on $base"
mkdir -p "$base/volatile/upper" "$base/volatile/work" "$base/volatile/root" || fallback "creating the overlay directories"
new=$base/volatile/root
mount -t overlay -o "lowerdir=/,upperdir=$base/volatile/upper,workdir=$base/volatile/work" overlay "$new" ||
    fallback "mounting the overlay (is overlayfs in the kernel?)"
for d in dev proc sys; do
    mount --move "/$d" "$new/$d" 2>/dev/null
done
mkdir -p "$new/run/btrfs-deploy-lower"
cd "$new" || fallback "entering the overlay"
pivot_root . run/btrfs-deploy-lower || fallback "pivot_root into the overlay"
exec chroot . "$init" "$@"
