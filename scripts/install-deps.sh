#!/usr/bin/env bash
# Installs what btrfs-deploy needs on a Debian 12 host: build tools for the
# crate, the tools it runs, and QEMU for boot tests. Quick when all is there.
set -euo pipefail
pkgs=(btrfs-progs extlinux syslinux-common qemu-system-x86 ovmf systemd-boot-efi fdisk mtools dosfstools libbtrfsutil-dev libclang-dev
      pkg-config cpio zstd xz-utils kmod acl attr rsync util-linux gcc make strace e2fsprogs)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages ${missing[*]}: run as root (sudo make ...)" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "install-deps: cargo not found: install Rust (https://rustup.rs) or apt-get install cargo" >&2
  exit 1
fi
modprobe loop 2>/dev/null || true
modprobe btrfs 2>/dev/null || true
