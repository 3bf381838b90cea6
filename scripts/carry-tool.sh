#!/usr/bin/env bash
# carry-tool.sh TREE [DEPLOY_BINARY]
#
# Copies the `deploy` binary, the programs it runs (mkfs.btrfs, btrfs, wipefs,
# extlinux, blkid, unshare) and every shared library they load (as `ldd`
# lists them, dynamic loader included) into TREE, at the paths they have on
# this host, so that TREE can run `deploy` on a system that lacks them: the
# power-cut replay guest (scripts/powercut-record.sh) and, later, the
# on-device upgrade of issue 13. Programs go to TREE/usr/local/bin (first on
# a usual PATH, so they win over busybox applets of the same name);
# libraries to their own directory (e.g. TREE/lib/x86_64-linux-gnu).
#
# DEPLOY_BINARY defaults to target/release/deploy of this checkout.
# Prints the list of what it copied (one path per line, relative to TREE).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

die() {
    echo "carry-tool: error: $*" >&2
    exit 1
}
[[ $# -ge 1 && $# -le 2 ]] || {
    echo "usage: $0 TREE [DEPLOY_BINARY]" >&2
    exit 2
}
tree=$1
deploy=${2:-$(dirname "$0")/../target/release/deploy}
[[ -x $deploy ]] || die "no deploy binary at $deploy (build it with cargo build --release)"
mkdir -p "$tree/usr/local/bin" || die "cannot create $tree/usr/local/bin"

# The programs deploy starts (strace -f -e execve of a deploy, an upgrade
# with a configure extension, set-default, remove, cleanup and check).
readonly TOOLS=(mkfs.btrfs btrfs extlinux blkid unshare wipefs sfdisk mmd fsck.fat)

# copy_file SRC DEST_IN_TREE: the file's content (links resolved), mode kept.
copy_file() {
    mkdir -p "$tree/$(dirname "$2")"
    cp -L --preserve=mode "$1" "$tree/$2"
    echo "${2#/}"
}

# copy_libs BINARY: every library ldd lists, at the path ldd names.
copy_libs() {
    local lib
    # Lines: "name => /path (addr)", "/lib64/ld-linux-x86-64.so.2 (addr)",
    # "linux-vdso.so.1 (addr)" (in the kernel: nothing to copy).
    ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
        while read -r lib; do
            [[ -e $tree/$lib ]] && continue
            copy_file "$lib" "$lib"
        done
    # A statically linked program is fine; a missing library is not.
    if ldd "$1" 2>/dev/null | grep -q 'not found'; then
        die "$1 needs a library that is not installed: $(ldd "$1" | grep 'not found')"
    fi
}

copy_file "$deploy" /usr/local/bin/deploy
copy_libs "$deploy"
for t in "${TOOLS[@]}"; do
    p=$(command -v "$t") || die "$t not found: install it (scripts/install-deps.sh)"
    copy_file "$p" "/usr/local/bin/$t"
    copy_libs "$p"
done
# mtools converts names through iconv (code page 850 by default): glibc
# loads that converter at run time from its gconv directory.
gconv=$(dirname "$(readlink -f "$(ldconfig -p | awk '$1 == "libc.so.6" && /x86-64/ { print $NF; exit }')")")/gconv
for f in gconv-modules gconv-modules.cache IBM850.so IBM437.so gconv-modules.d/gconv-modules-extra.conf; do
    [[ -e $gconv/$f ]] || die "$gconv/$f not found (glibc's iconv converters, package libc6)"
    copy_file "$gconv/$f" "$gconv/$f"
done
