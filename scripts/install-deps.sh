#!/usr/bin/env bash
# install-deps.sh [build|cross|demo|test|deb|all]
#
# Installs, on a Debian 12 host, what one make target needs, without
# recommended packages (--no-install-recommends), and nothing when all is
# there already:
#   build  the crate's build dependencies (and checks for cargo)
#   cross  build + the arm64 cross build (make build-arm64): Debian's
#          gcc-aarch64-linux-gnu, libbtrfsutil-dev:arm64 through multiarch
#          (dpkg --add-architecture arm64, which also lets -e on-device
#          fetch arm64 packages), rustup's aarch64-unknown-linux-gnu target
#   demo   build + what `deploy` runs: btrfs-progs, extlinux, QEMU
#   deb    dpkg-dev (dpkg-shlibdeps), debootstrap, cargo-deb
#   test   demo + deb + cross + the tools the integration tests use
#   all    everything above (the default)
# (`make fixture`: scripts/build-tiny-system.sh installs its own.)
set -euo pipefail
what=${1:-all}
build=(libbtrfsutil-dev libclang-dev pkg-config gcc make)
run=(btrfs-progs mount util-linux extlinux syslinux-common kmod fdisk mtools dosfstools patchelf)
qemu=(qemu-system-x86 qemu-utils ovmf systemd-boot-efi qemu-system-arm u-boot-qemu qemu-user-static binfmt-support)
deb=(dpkg-dev debootstrap)
cross=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross libbtrfsutil-dev:arm64)
# Bundle tests sign and make keys with minisign itself (format compatibility).
# fusefat mounts an ESP the way a device's /boot/efi is (the host kernel may lack vfat).
# The clients whose verdicts make test asks: systemd-dissect (systemd-container),
# bootctl (systemd-boot), lintian, mandoc, shellcheck (systemd-analyze and
# findmnt come with systemd and util-linux). ansible/tests/sanity.sh: ansible-core,
# yamllint, pycodestyle; the SSH fleet fixture: openssh-client, dropbear-bin.
tests=(acl attr rsync strace e2fsprogs cpio zstd xz-utils minisign fusefat systemd-container systemd-boot lintian mandoc shellcheck ansible-core yamllint pycodestyle openssh-client dropbear-bin)
case $what in
  build) pkgs=("${build[@]}") ;;
  cross) pkgs=("${build[@]}" "${cross[@]}") ;;
  demo) pkgs=("${build[@]}" "${run[@]}" "${qemu[@]}") ;;
  deb) pkgs=("${build[@]}" "${deb[@]}") ;;
  test | all) pkgs=("${build[@]}" "${run[@]}" "${qemu[@]}" "${deb[@]}" "${cross[@]}" "${tests[@]}") ;;
  *)
    echo "install-deps: unknown target '$what': use build, cross, demo, deb, test or all" >&2
    exit 2
    ;;
esac
missing_packages() {
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}
# arm64 packages (the cross build's libbtrfsutil-dev:arm64) come through
# multiarch: dpkg must know the architecture before apt-get update.
case $what in
  cross | test | all)
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
      if [ "$(id -u)" != 0 ]; then
        echo "install-deps: dpkg does not know the arm64 architecture: run as root (sudo make ...), or dpkg --add-architecture arm64" >&2
        exit 1
      fi
      echo "install-deps: dpkg --add-architecture arm64"
      dpkg --add-architecture arm64
      apt-get update -q
    fi
    ;;
esac
# Two rounds: installing one package can remove another that conflicts with it
# (a backported qemu-utils goes when Debian 12's qemu-system-x86 comes in), so
# the list is checked again after the first install.
for round in 1 2; do
  missing_packages
  ((${#missing[@]})) || break
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages ${missing[*]}: run as root (sudo make ...)" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  [ "$round" = 2 ] || apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
done
missing_packages
if ((${#missing[@]})); then
  echo "install-deps: ${missing[*]} still not installed after apt-get install (a conflict removes them): see apt's output above" >&2
  exit 1
fi
cargo=cargo
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    cargo=$HOME/.cargo/bin/cargo
  else
    echo "install-deps: cargo not found: install Rust (https://rustup.rs) or apt-get install cargo" >&2
    exit 1
  fi
fi
case $what in
  cross | test | all)
    rustup=rustup
    command -v rustup >/dev/null 2>&1 || rustup=$HOME/.cargo/bin/rustup
    if ! "$rustup" target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
      "$rustup" --version >/dev/null 2>&1 || {
        echo "install-deps: rustup not found: the arm64 build needs the Rust target aarch64-unknown-linux-gnu (install Rust with https://rustup.rs)" >&2
        exit 1
      }
      echo "install-deps: rustup target add aarch64-unknown-linux-gnu"
      "$rustup" target add aarch64-unknown-linux-gnu
    fi
    ;;
esac
case $what in
  deb | test | all)
    if ! "$cargo" deb --version >/dev/null 2>&1; then
      echo "install-deps: installing cargo-deb (cargo install, a few minutes)"
      "$cargo" install --locked cargo-deb --version '^3'
    fi
    ;;
esac
case $what in
  demo | test | all)
    modprobe loop 2>/dev/null || true
    modprobe btrfs 2>/dev/null || true
    ;;
esac
