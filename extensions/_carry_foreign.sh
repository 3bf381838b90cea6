# shellcheck shell=sh
# The on-device extension's carry for a tree of another architecture than
# this host's (issue 22: an arm64 tree deployed from an amd64 PC). Sourced
# by on-device.check and on-device.configure after _common.sh (TREE set).
#
# What is carried is of the tree's architecture, never the host's:
#   - `deploy` built for it (make build-arm64, statically linked; found by
#     foreign_deploy_build, or given with ON_DEVICE_DEPLOY);
#   - the programs deploy runs: the tree's own when it has them as real
#     programs (not busybox applets), else those of Debian's packages of that
#     architecture, downloaded (apt-get download PKG:ARCH, which needs
#     `dpkg --add-architecture ARCH` and `apt-get update` on this host:
#     scripts/install-deps.sh cross) into ON_DEVICE_CACHE (default
#     /var/cache/btrfs-deploy/on-device) and unpacked there once;
#   - every library they need (DT_NEEDED, read with patchelf, recursively)
#     and the dynamic loader: from those packages when any program came from
#     them (their glibc runs the tree's older programs too), else from the
#     tree; what one source lacks is taken from the other.

# The architectures a deploy can be built for here (make build-arm64).
FOREIGN_BUILDS="arm64"
# What deploy runs on a device (see TOOLS in on-device.configure; a uboot
# disk needs no extlinux; losetup, partx and umount too, as busybox's lack
# options deploy uses), and the Debian package of each.
FOREIGN_TOOLS="mkfs.btrfs:btrfs-progs btrfs:btrfs-progs blkid:util-linux unshare:util-linux wipefs:util-linux partx:util-linux sfdisk:fdisk mmd:mtools fsck.fat:dosfstools losetup:mount umount:mount"

# elf_arch FILE: the Debian architecture of an ELF file (empty if not ELF).
elf_arch() {
    [ "$(od -An -c -N 4 "$1" 2>/dev/null | tr -d ' ')" = "177ELF" ] || return 0
    _ea_class=$(od -An -t u1 -j 4 -N 1 "$1" | tr -d ' ')
    _ea_machine=$(od -An -t u2 -j 18 -N 2 "$1" | tr -d ' ')
    case $_ea_machine/$_ea_class in
    62/2) echo amd64 ;;
    3/1) echo i386 ;;
    183/2) echo arm64 ;;
    40/1) echo armhf ;;
    243/2) echo riscv64 ;;
    *) echo "unknown-machine-$_ea_machine" ;;
    esac
}

# multiarch ARCH: Debian's multiarch triplet.
multiarch() {
    case $1 in
    arm64) echo aarch64-linux-gnu ;;
    amd64) echo x86_64-linux-gnu ;;
    armhf) echo arm-linux-gnueabihf ;;
    i386) echo i386-linux-gnu ;;
    riscv64) echo riscv64-linux-gnu ;;
    *) echo "$1-linux-gnu" ;;
    esac
}

# foreign_deploy_build SELF ARCH: prints the deploy built for ARCH: the
# ON_DEVICE_DEPLOY setting, else, next to the running deploy SELF,
# ../aarch64-unknown-linux-gnu/release/deploy (a cargo target folder) or
# ../lib/btrfs-deploy/ARCH/deploy (an installation). Fails, saying so, when
# there is none or it is of another architecture.
foreign_deploy_build() {
    case " $FOREIGN_BUILDS " in
    *" $2 "*) ;;
    *) die "on-device carries a deploy built for the tree's architecture, and the rootfs is $2: there is no $2 build of deploy (this host builds one for: $FOREIGN_BUILDS); leave out -e on-device" ;;
    esac
    if [ -n "${ON_DEVICE_DEPLOY:-}" ]; then
        _fd=$ON_DEVICE_DEPLOY
        [ -f "$_fd" ] || die "ON_DEVICE_DEPLOY=$_fd: no such file"
    else
        _fd=
        _fd_bin=$(dirname "$1")
        for _fd_c in "$_fd_bin/../aarch64-unknown-linux-gnu/release/deploy" "$_fd_bin/../lib/btrfs-deploy/$2/deploy"; do
            if [ -f "$_fd_c" ]; then
                _fd=$_fd_c
                break
            fi
        done
        [ -n "$_fd" ] || die "on-device carries a deploy built for $2 onto this $2 tree, and there is none next to $1 (looked for $_fd_bin/../aarch64-unknown-linux-gnu/release/deploy and $_fd_bin/../lib/btrfs-deploy/$2/deploy): run make build-arm64, or set ON_DEVICE_DEPLOY=PATH"
    fi
    _fd_arch=$(elf_arch "$_fd")
    [ "$_fd_arch" = "$2" ] || die "$_fd is not a deploy built for $2 (its ELF header says ${_fd_arch:-not an ELF file})"
    readlink -f "$_fd"
}

# foreign_check ARCH: what the carry needs on this host, before anything is written.
foreign_check() {
    for _fc in patchelf:patchelf dpkg-deb:dpkg apt-get:apt apt-cache:apt od:coreutils; do
        command -v "${_fc%%:*}" >/dev/null 2>&1 ||
            die "on-device needs ${_fc%%:*} on this host to carry $1 programs: install the Debian package ${_fc#*:}"
    done
}

# in_root ROOT PATH: like tree_path, in another root.
in_root() {
    _ir_saved=$TREE
    TREE=$1
    _ir=$(tree_path "$2")
    TREE=$_ir_saved
    printf '%s\n' "$_ir"
}

# find_program ROOT ARCH NAME: a real program NAME of ARCH in ROOT's
# /usr/sbin /usr/bin /sbin /bin (a busybox applet does not count).
find_program() {
    for _fp_d in /usr/sbin /usr/bin /sbin /bin; do
        _fp=$(in_root "$1" "$_fp_d/$3")
        if [ -f "$_fp" ] && [ "${_fp##*/}" != busybox ] && [ "$(elf_arch "$_fp")" = "$2" ]; then
            printf '%s\n' "$_fp"
            return 0
        fi
    done
    return 1
}

# find_library ROOT ARCH NAME: the library NAME (a soname or the loader) of
# ARCH in ROOT's library folders.
find_library() {
    _fl_t=$(multiarch "$2")
    for _fl_d in "/lib/$_fl_t" "/usr/lib/$_fl_t" /lib /usr/lib /lib64 /usr/lib64; do
        _fl=$(in_root "$1" "$_fl_d/$3")
        if [ -f "$_fl" ] && [ "$(elf_arch "$_fl")" = "$2" ]; then
            printf '%s\n' "$_fl"
            return 0
        fi
    done
    return 1
}

# lib_closure ARCH PKG...: PKG and the library packages they depend on
# (Depends and Pre-Depends, the first of each set of alternatives), recursively.
lib_closure() {
    _lc_arch=$1
    shift
    _lc_seen=" "
    _lc_todo="$*"
    while [ -n "$_lc_todo" ]; do
        _lc_query=
        for _lc_p in $_lc_todo; do
            case $_lc_seen in *" $_lc_p "*) continue ;; esac
            _lc_seen="$_lc_seen$_lc_p "
            _lc_query="$_lc_query $_lc_p:$_lc_arch"
        done
        [ -n "$_lc_query" ] || break
        # shellcheck disable=SC2086
        _lc_out=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
            --no-replaces --no-enhances $_lc_query 2>&1) ||
            die "apt-cache knows no $_lc_arch packages$_lc_query (${_lc_out##*"$NL"}): run dpkg --add-architecture $_lc_arch && apt-get update (scripts/install-deps.sh cross)"
        _lc_todo=$(printf '%s\n' "$_lc_out" | awk '
            /^[^ ]/ { skip = 0; next }
            $1 ~ /^\|?(Pre)?Depends:$/ {
                alt = ($1 ~ /^\|/)
                if (skip) { if (!alt) skip = 0; next }
                if (alt) skip = 1
                name = $2; sub(/:.*/, "", name)
                if (name ~ /^(lib|zlib)/) print name
            }' | sort -u | tr '\n' ' ')
    done
    printf '%s\n' "$_lc_seen"
}

# fetch_packages ARCH CACHE PKG...: PKG and their libraries, downloaded into
# CACHE/ARCH/debs and unpacked into CACHE/ARCH/root (once: CACHE/ARCH/root/.packages
# lists what it holds). Prints the root.
fetch_packages() {
    _fp_arch=$1
    _fp_cache=$2/$1
    shift 2
    _fp_root=$_fp_cache/root
    _fp_want=$(printf '%s\n' "$@" | sort -u | tr '\n' ' ')
    if [ -f "$_fp_root/.packages" ] && [ "$(cat "$_fp_root/.packages")" = "$_fp_want" ]; then
        printf '%s\n' "$_fp_root"
        return 0
    fi
    _fp_all=$(lib_closure "$_fp_arch" "$@")
    mkdir -p "$_fp_cache/debs" || die "cannot create $_fp_cache/debs (ON_DEVICE_CACHE)"
    _fp_get=
    for _fp_p in $_fp_all; do
        ls "$_fp_cache/debs/${_fp_p}_"*"_$_fp_arch.deb" >/dev/null 2>&1 || _fp_get="$_fp_get $_fp_p:$_fp_arch"
    done
    if [ -n "$_fp_get" ]; then
        echo "on-device: downloading the $_fp_arch packages$_fp_get into $_fp_cache/debs" >&2
        # shellcheck disable=SC2086
        (cd "$_fp_cache/debs" && apt-get -q -o APT::Sandbox::User=root download $_fp_get >&2) ||
            die "apt-get download of the $_fp_arch packages$_fp_get failed: run dpkg --add-architecture $_fp_arch && apt-get update (scripts/install-deps.sh cross), or check the network"
    fi
    rm -rf "$_fp_root.tmp"
    mkdir -p "$_fp_root.tmp"
    for _fp_p in $_fp_all; do
        _fp_deb=$(find "$_fp_cache/debs" -maxdepth 1 -name "${_fp_p}_*_$_fp_arch.deb" | sort -V | tail -n1)
        dpkg-deb -x "$_fp_deb" "$_fp_root.tmp" || die "cannot unpack $_fp_deb"
    done
    printf '%s\n' "$_fp_want" >"$_fp_root.tmp/.packages"
    rm -rf "$_fp_root"
    mv "$_fp_root.tmp" "$_fp_root" || die "cannot put the unpacked packages at $_fp_root"
    printf '%s\n' "$_fp_root"
}

# foreign_carry STAGING ARCH DEPLOY: fills STAGING/bin (DEPLOY as deploy,
# the programs) and STAGING/lib (libraries, loader); sets interp to the
# loader's file name and gconv_dir to the iconv converters of the libc
# carried. Says on stderr where each program came from.
foreign_carry() {
    _fc_stage=$1
    _fc_arch=$2
    cp -L "$3" "$_fc_stage/bin/deploy" || die "cannot copy $3"
    _fc_cache=${ON_DEVICE_CACHE:-/var/cache/btrfs-deploy/on-device}
    _fc_pkgs=
    _fc_progs=
    _fc_root=
    # The programs: the tree's, else the packages'.
    for _fc_tp in $FOREIGN_TOOLS; do
        _fc_t=${_fc_tp%%:*}
        if _fc_p=$(find_program "$TREE" "$_fc_arch" "$_fc_t"); then
            _fc_progs="$_fc_progs $_fc_t=$_fc_p"
        else
            _fc_pkgs="$_fc_pkgs ${_fc_tp#*:}"
            _fc_progs="$_fc_progs $_fc_t="
        fi
    done
    if [ -n "$_fc_pkgs" ]; then
        # shellcheck disable=SC2086
        _fc_root=$(fetch_packages "$_fc_arch" "$_fc_cache" $_fc_pkgs) || exit 1
    fi
    for _fc_e in $_fc_progs; do
        _fc_t=${_fc_e%%=*}
        _fc_p=${_fc_e#*=}
        if [ -z "$_fc_p" ]; then
            _fc_p=$(find_program "$_fc_root" "$_fc_arch" "$_fc_t") ||
                die "the $_fc_arch packages in $_fc_root have no program $_fc_t"
            echo "on-device: $_fc_t from Debian's $_fc_arch packages" >&2
        else
            echo "on-device: $_fc_t from the tree" >&2
        fi
        cp -L "$_fc_p" "$_fc_stage/bin/$_fc_t" || die "cannot copy $_fc_p"
    done
    # The libraries: first where the programs came from.
    if [ -n "$_fc_root" ]; then
        _fc_order="$_fc_root $TREE"
    else
        _fc_order=$TREE
    fi
    interp=
    _fc_todo=
    for _fc_b in "$_fc_stage"/bin/*; do
        if _fc_i=$(patchelf --print-interpreter "$_fc_b" 2>/dev/null); then
            interp=${_fc_i##*/}
            _fc_todo="$_fc_todo $interp $(patchelf --print-needed "$_fc_b" | tr '\n' ' ')"
        fi
    done
    while [ -n "${_fc_todo# }" ]; do
        _fc_next=
        for _fc_l in $_fc_todo; do
            [ -e "$_fc_stage/lib/$_fc_l" ] && continue
            _fc_f=
            for _fc_r in $_fc_order; do
                _fc_f=$(find_library "$_fc_r" "$_fc_arch" "$_fc_l") && break
            done
            [ -n "$_fc_f" ] || die "no $_fc_arch library $_fc_l in the tree or in Debian's packages ($_fc_root): the programs carried need it"
            cp -L "$_fc_f" "$_fc_stage/lib/$_fc_l" || die "cannot copy $_fc_f"
            if [ "$_fc_l" = libc.so.6 ]; then
                gconv_dir=$(in_root "$_fc_r" "/usr/lib/$(multiarch "$_fc_arch")/gconv")
            fi
            _fc_next="$_fc_next $(patchelf --print-needed "$_fc_f" 2>/dev/null | tr '\n' ' ')"
        done
        _fc_todo=$_fc_next
    done
    [ -n "${gconv_dir:-}" ] || die "no $_fc_arch libc.so.6 among the libraries carried"
}
