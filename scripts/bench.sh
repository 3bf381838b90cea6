#!/usr/bin/env bash
# bench.sh CACHE_DIR — the performance benchmark behind `make bench` (issue 7).
#
# Inputs, built once into CACHE_DIR/bench/ and reused:
#   debian/      debootstrap --variant=minbase bookworm (about 6.8k entries, 200 MiB)
#   synth/       deterministic synthetic tree: 100k small files in 1000 directories,
#                symlinks, hard links, 4 large files of 32 MiB (about 500 MiB)
#   <tree>-v2/   the same tree with ~1% of its files changed, 0.1% added, 0.1%
#                deleted, 0.2% with a metadata-only change (outside the state dirs)
#   <tree>-v2.changes  counts and bytes of that change
#
# Measured side by side, median of BENCH_RUNS runs (default 3), page cache
# dropped before every run (BENCH_DROP_CACHES=0 keeps it warm instead), each
# run timed until its data is durable (`sync` at the end of both sides):
#   1. fresh:   deploy TREE new.img, the default disk kind (hybrid: GPT, ESP with
#               systemd-boot and the kernel files, SYSLINUX; bootloader path: kernel and initramfs
#               installed, extlinux written)
#               vs mkfs.btrfs + mount + cp -a into a subvolume + snapshot + umount
#   2. upgrade: deploy --version v2 TREE-v2 (on a copy of the factory image)
#               vs snapshot + rsync -a --checksum --delete, and vs snapshot + rsync -a --delete
#               (same starting image; the whole tree, state directories included:
#               a version keeps its own copy of them)
#   Both trees get the tiny test system's kernel and initramfs in boot/
#   (CACHE_DIR/tiny/rootfs, `make fixture`; BENCH_KERNEL_FROM=ROOTFS to use
#   another), unchanged between TREE and TREE-v2.
#   3. growth:  Btrfs "Data used" after the upgrade minus before, vs the bytes changed
#   4. peak RSS of deploy (/usr/bin/time), fresh and upgrade
#   5. bundles (issue 15): the size of a signed delta bundle of TREE-v2 against
#      factory (made with `deploy bundle create` on a build image holding both)
#      vs the bytes changed (zstd, the default), and vs the same delta with
#      --compress none; the zstd tarball of TREE-v2 beside it; and the time
#      to apply that bundle vs an upgrade from the tarball (copies of factory)
# Prints a table of ratios (ours / baseline) and writes CACHE_DIR/bench/results.txt
# and results.json. Environment: BENCH_RUNS, BENCH_TREES ("debian synth"),
# BENCH_DROP_CACHES, DEPLOY (binary, default target/release/deploy).
set -euo pipefail

log() { echo "bench: $*" >&2; }
die() {
    echo "bench: error: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || {
    echo "usage: $0 CACHE_DIR" >&2
    exit 2
}
[[ $EUID -eq 0 ]] || die "must run as root (mounts, loop devices, debootstrap)"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
CACHE=$(cd "$1" && pwd)
B=$CACHE/bench
W=$B/work
DEPLOY=${DEPLOY:-$ROOT/target/release/deploy}
RUNS=${BENCH_RUNS:-3}
TREES=${BENCH_TREES:-debian synth}
DROP=${BENCH_DROP_CACHES:-1}
STATE_DIRS=(home root opt srv var)
KERNEL_FROM=${BENCH_KERNEL_FROM:-$CACHE/tiny/rootfs}
export PATH=$PATH:/usr/sbin:/sbin
[[ -x $DEPLOY ]] || die "$DEPLOY missing: run cargo build --release (make bench does)"

# ------------------------------------------------------------------ tools
need_pkgs=()
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
[[ -x /usr/bin/time ]] || need_pkgs+=(time)
command -v rsync >/dev/null || need_pkgs+=(rsync)
command -v mkfs.btrfs >/dev/null || need_pkgs+=(btrfs-progs)
command -v perl >/dev/null || need_pkgs+=(perl-base)
command -v zstd >/dev/null || need_pkgs+=(zstd)
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >&2
fi

mkdir -p "$B" "$W"
MNT=$(mktemp -d "$W/mnt.XXXXXX")
cleanup() {
    if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT" || umount -l "$MNT" || true; fi
    rmdir "$MNT" 2>/dev/null || true
    rm -f "$W"/*.img "$W"/*.img.partial
}
trap cleanup EXIT

# ------------------------------------------------------------------ inputs
build_debian() {
    [[ -d $B/debian ]] && return
    log "debootstrap --variant=minbase bookworm (first run only; about a minute)"
    rm -rf "$B/debian.tmp"
    local t0=$SECONDS
    debootstrap --variant=minbase bookworm "$B/debian.tmp" http://deb.debian.org/debian \
        >"$B/debootstrap.log" 2>&1 || die "debootstrap failed: see $B/debootstrap.log"
    # Leftovers that differ between runs and are not part of a system image.
    rm -rf "$B/debian.tmp/var/cache/apt/archives/"*.deb "$B/debian.tmp/var/log/bootstrap.log"
    mv "$B/debian.tmp" "$B/debian"
    log "debootstrap took $((SECONDS - t0)) s"
}

# Deterministic synthetic tree: NFILES small files (60% < 1 KiB, 35% 1-8 KiB,
# 5% 8-64 KiB), in 10 groups x 100 directories, every 10th executable, every
# 7th directory owned by 1000:1000, a symlink per 50 files, a hard link per 500
# files, NBIG large files of BIGMIB MiB; fixed mtimes.
build_synth() {
    [[ -d $B/synth ]] && return
    log "generating the synthetic tree (100k files)"
    rm -rf "$B/synth.tmp"
    mkdir -p "$B/synth.tmp"
    perl - "$B/synth.tmp" 100000 4 32 <<'PERL'
use strict; use warnings;
my ($root, $n, $nbig, $bigmib) = @ARGV;
my $pool = '';
for my $j (0 .. (1 << 18) + 4096) {
    $pool .= pack('N', (($j * 2654435761) ^ ($j * 40503) ^ ($j >> 3)) % 4294967296);
}
my $plen = length($pool) - 65536;
sub mkd { my $d = shift; mkdir $d or die "mkdir $d: $!" unless -d $d; }
sub put {
    my ($path, $len, $seed) = @_;
    open(my $fh, '>', $path) or die "$path: $!";
    my $left = $len; my $off = ($seed * 7919) % $plen;
    while ($left > 0) {
        my $k = $left < 65536 ? $left : 65536;
        print $fh substr($pool, $off, $k);
        $left -= $k; $off = ($off + 4099) % $plen;
    }
    close($fh) or die "$path: $!";
}
mkd("$root/usr"); mkd("$root/usr/share"); mkd("$root/usr/share/synth");
mkd("$root/usr/lib"); mkd("$root/usr/lib/synth-big"); mkd("$root/etc");
my @dirs;
for my $i (0 .. $n - 1) {
    my $g = int($i / 10000); my $d = int($i / 100);
    my $dir = sprintf("%s/usr/share/synth/g%02d/d%04d", $root, $g, $d);
    if ($i % 100 == 0) {
        mkd(sprintf("%s/usr/share/synth/g%02d", $root, $g)); mkd($dir); push @dirs, [$dir, $d];
    }
    my $h = ($i * 2654435761) % 4294967296;
    my $class = $h % 100;
    my $size = $class < 60 ? $h % 1024 : $class < 95 ? 1024 + $h % 7168 : 8192 + $h % 57344;
    my $f = sprintf("%s/f%05d", $dir, $i);
    put($f, $size, $i);
    chmod(($i % 10 == 0) ? 0755 : 0644, $f);
    chown(1000, 1000, $f) if $d % 7 == 0;
    utime(1700000000 + $i, 1700000000 + $i, $f);
    if ($i % 50 == 0) { symlink(sprintf("f%05d", $i), sprintf("%s/l%05d", $dir, $i)) or die $!; }
    if ($i % 500 == 0) { link($f, sprintf("%s/h%05d", $dir, $i)) or die $!; }
}
for my $b (0 .. $nbig - 1) {
    my $f = sprintf("%s/usr/lib/synth-big/big%02d.bin", $root, $b);
    put($f, $bigmib << 20, 1000003 + $b);
    utime(1690000000 + $b, 1690000000 + $b, $f);
}
put("$root/etc/hostname", 6, 1);
for my $e (@dirs) {
    my ($dir, $d) = @$e;
    chown(1000, 1000, $dir) if $d % 7 == 0;
    utime(1700500000 + $d, 1700500000 + $d, $dir);
}
PERL
    mv "$B/synth.tmp" "$B/synth"
}

# TREE-v2: a copy of TREE with, among regular single-link files outside the
# state directories (sorted by path): every 100th rewritten (new content, +64
# bytes, new mtime), every 1000th (offset 500) deleted, every 500th (offset
# 250) chmod'ed (metadata only); plus 0.1% new files. Writes TREE-v2.changes:
# "files_changed files_added files_deleted bytes_changed bytes_changed_blocks"
# where bytes_changed is the logical size of the changed and added files and
# bytes_changed_blocks the same rounded up to 4 KiB blocks per file.
build_v2() {
    local t=$1
    [[ -d $B/$t-v2 && -f $B/$t-v2.changes ]] && return
    log "deriving $t-v2 (~1% of the files changed)"
    rm -rf "$B/$t-v2.tmp"
    cp -a "$B/$t" "$B/$t-v2.tmp"
    local prune=()
    for d in "${STATE_DIRS[@]}"; do prune+=(-path "./$d" -prune -o); done
    (cd "$B/$t-v2.tmp" && find . "${prune[@]}" -type f -links 1 -print0 | LC_ALL=C sort -z) |
        perl -0 -e '
use strict; use warnings;
my $root = shift;
my @files = map { chomp; $_ } <STDIN>;
my ($changed, $added, $deleted, $bytes, $blocks) = (0, 0, 0, 0, 0);
my $round = sub { my $s = shift; int(($s + 4095) / 4096) * 4096 };
for my $i (0 .. $#files) {
    my $p = "$root/$files[$i]";
    if ($i % 100 == 99) {
        open(my $in, "<", $p) or die "$p: $!"; binmode $in;
        local $/; my $data = <$in> // ""; close $in;
        my @st = stat($p);
        $data = pack("N", $i) . substr($data, 4) if length($data) >= 4;
        $data .= sprintf("bench-v2 %063d", $i);
        open(my $out, ">", $p) or die "$p: $!"; binmode $out; print $out $data; close $out or die $!;
        utime(1800000000 + $i, 1800000000 + $i, $p);
        $changed++; $bytes += length($data); $blocks += $round->(length($data));
    } elsif ($i % 1000 == 500) {
        unlink($p) or die "$p: $!"; $deleted++;
    } elsif ($i % 500 == 250) {
        my $mode = (stat($p))[2] & 07777;
        chmod($mode ^ 0020, $p) or die "$p: $!";
    }
}
my $dir = "$root/usr/share/bench-v2";
mkdir $dir or die "$dir: $!";
my $nadd = int(@files / 1000) || 1;
for my $k (0 .. $nadd - 1) {
    my $p = sprintf("%s/new%05d", $dir, $k);
    my $data = sprintf("new file %d\n", $k) x (1 + $k % 300);
    open(my $out, ">", $p) or die "$p: $!"; print $out $data; close $out or die $!;
    utime(1800000000, 1800000000, $p);
    $added++; $bytes += length($data); $blocks += $round->(length($data));
}
print "$changed $added $deleted $bytes $blocks\n";
' "$B/$t-v2.tmp" >"$B/$t-v2.changes.tmp"
    mv "$B/$t-v2.tmp" "$B/$t-v2"
    mv "$B/$t-v2.changes.tmp" "$B/$t-v2.changes"
}

# Puts KERNEL_FROM's boot/vmlinuz-* and boot/initrd.img-* into TREE (and
# TREE-v2) with their times, so both trees boot the same, unchanged kernel.
install_kernel() {
    local t=$1 k d
    k=$(find "$KERNEL_FROM/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | head -1) || true
    [[ -n $k ]] || die "no kernel in $KERNEL_FROM/boot: run make fixture, or set BENCH_KERNEL_FROM"
    for d in "$B/$t" "$B/$t-v2"; do
        [[ -e $d/boot/$(basename "$k") ]] && continue
        log "installing $(basename "$k") into $(basename "$d")"
        mkdir -p "$d/boot"
        cp -a "$k" "$KERNEL_FROM/boot/initrd.img-${k##*/vmlinuz-}" "$d/boot/"
    done
}

# ------------------------------------------------------------------ helpers
drop_caches() {
    sync
    if [[ $DROP == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "inf"; else printf "%.3f", a / b }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.1f", a / 1048576 }'; }

# The loop options reaching an image's Btrfs: its partition's byte range on
# a GPT image (the default, hybrid, disk kind), nothing for a bare Btrfs.
btrfs_range() {
    local start sectors
    while read -r start sectors; do
        if [[ $(dd if="$1" bs=1 skip=$((start * 512 + 65600)) count=8 status=none | tr -d "\\0") == _BHRfS_M ]]; then
            echo ",offset=$((start * 512)),sizelimit=$((sectors * 512))"
            return
        fi
    done < <(partx -g -o START,SECTORS "$1" 2>/dev/null)
}

# Btrfs "Data used" (bytes) of an image, read on a read-only mount.
data_used() {
    mount -o "ro,loop,subvolid=5$(btrfs_range "$1")" "$1" "$MNT"
    btrfs filesystem usage -b "$MNT" | awk '/^Data,/ { for (i = 1; i <= NF; i++) if ($i ~ /^Used:/) { sub("Used:", "", $i); sub(",", "", $i); print $i } }'
    umount "$MNT"
}

# Runs deploy with ARGS under /usr/bin/time; sets DUR (seconds) and RSS (KiB).
timed_deploy() {
    drop_caches
    local t0 t1
    t0=$(now)
    /usr/bin/time -f %M -o "$W/rss" "$DEPLOY" -q "$@" >"$W/deploy.log" 2>&1 ||
        die "deploy $* failed: $(tail -5 "$W/deploy.log")"
    sync
    t1=$(now)
    DUR=$(elapsed "$t0" "$t1")
    RSS=$(tail -1 "$W/rss")
}

# The floor of a fresh deploy: format, mount, cp -a into a subvolume, snapshot, unmount.
floor_fresh() {
    local tree=$1 img=$2 size=$3 t0 t1
    rm -f "$img"
    truncate -s "$size" "$img"
    drop_caches
    t0=$(now)
    mkfs.btrfs -q -f "$img" >/dev/null
    mount -o loop "$img" "$MNT"
    btrfs -q subvolume create "$MNT/sv" >/dev/null
    cp -a "$tree/." "$MNT/sv/"
    btrfs -q subvolume snapshot -r "$MNT/sv" "$MNT/snap" >/dev/null
    umount "$MNT"
    sync
    t1=$(now)
    DUR=$(elapsed "$t0" "$t1")
}

# The upgrade done with rsync: snapshot the factory orig, rsync into it, unmount.
rsync_upgrade() {
    local tree=$1 img=$2 t0 t1
    shift 2
    drop_caches
    t0=$(now)
    mount -o "loop,subvolid=5$(btrfs_range "$img")" "$img" "$MNT"
    btrfs -q subvolume snapshot "$MNT/systems/factory/orig" "$MNT/systems/rsync" >/dev/null
    rsync "$@" --delete "$tree/" "$MNT/systems/rsync/"
    umount "$MNT"
    sync
    t1=$(now)
    DUR=$(elapsed "$t0" "$t1")
    # The loop device of an offset mount auto-clears asynchronously: the
    # next deploy on the image would find it in use.
    while [[ -n $(losetup -j "$img") ]]; do sleep 0.1; done
}

copy_image() {
    sync
    cp --reflink=auto --sparse=always "$1" "$2"
    sync
}

# ------------------------------------------------------------------ measure
RESULT_LINES=()
JSON_ITEMS=()
ALL_OK=1

# note TREE METRIC VALUE UNIT: a figure shown beside the ratios, without a target.
note() {
    RESULT_LINES+=("$(printf '%-7s %-34s %12s %12s %-4s %7s' "$1" "$2" "$3" - "$4" -)")
    JSON_ITEMS+=("$(printf '{"tree":"%s","metric":"%s","value":%s,"unit":"%s"}' "$1" "$2" "$3" "$4")")
}

# record TREE METRIC OURS BASE UNIT RATIO TARGET_OP TARGET_VALUE NOTE
record() {
    local tree=$1 metric=$2 ours=$3 base=$4 unit=$5 r=$6 op=$7 target=$8
    local ok
    ok=$(awk -v r="$r" -v t="$target" -v op="$op" 'BEGIN { if (r == "inf") print "no"; else if (op == "<=") print (r <= t) ? "yes" : "no"; else print (r < t) ? "yes" : "no" }')
    [[ $ok == yes ]] || ALL_OK=0
    RESULT_LINES+=("$(printf '%-7s %-34s %12s %12s %-4s %7s  %s %-5s %s' "$tree" "$metric" "$ours" "$base" "$unit" "$r" "$op" "$target" "$ok")")
    JSON_ITEMS+=("$(printf '{"tree":"%s","metric":"%s","ours":%s,"baseline":%s,"unit":"%s","ratio":%s,"target":"%s %s","ok":%s}' \
        "$tree" "$metric" "$ours" "$base" "$unit" "$r" "$op" "$target" "$([[ $ok == yes ]] && echo true || echo false)")")
}

bench_tree() {
    local t=$1 src=$B/$1 v2=$B/$1-v2
    local img=$W/$t.img base=$W/$t-factory.img up=$W/$t-up.img floor=$W/$t-floor.img
    local fresh=() floor_t=() ours_up=() rs_c=() rs_p=() rss_max=0 size growth=0
    local i
    log "$t: fresh deploy vs cp -a ($RUNS runs each)"
    for ((i = 1; i <= RUNS; i++)); do
        rm -f "$img"
        timed_deploy --rootfs "$src" "$img"
        fresh+=("$DUR")
        ((RSS > rss_max)) && rss_max=$RSS
        size=$(stat -c %s "$img")
        floor_fresh "$src" "$floor" "$size"
        floor_t+=("$DUR")
        log "  run $i: deploy ${fresh[-1]} s (RSS $RSS KiB), cp -a floor ${floor_t[-1]} s"
    done
    rm -f "$floor"
    mv "$img" "$base"
    local before
    before=$(data_used "$base")
    log "$t: upgrade to $t-v2 vs rsync ($RUNS runs each)"
    for ((i = 1; i <= RUNS; i++)); do
        copy_image "$base" "$up"
        timed_deploy --version v2 --rootfs "$v2" "$up"
        ours_up+=("$DUR")
        ((RSS > rss_max)) && rss_max=$RSS
        local after
        after=$(data_used "$up")
        growth=$((after - before))
        copy_image "$base" "$up"
        rsync_upgrade "$v2" "$up" -a --checksum
        rs_c+=("$DUR")
        copy_image "$base" "$up"
        rsync_upgrade "$v2" "$up" -a
        rs_p+=("$DUR")
        log "  run $i: deploy ${ours_up[-1]} s (RSS $RSS KiB, growth $growth B), rsync -c ${rs_c[-1]} s, rsync ${rs_p[-1]} s"
    done
    local mf mfl mu mrc mrp
    mf=$(median "${fresh[@]}")
    mfl=$(median "${floor_t[@]}")
    mu=$(median "${ours_up[@]}")
    mrc=$(median "${rs_c[@]}")
    mrp=$(median "${rs_p[@]}")
    local nch nadd ndel bytes blocks
    read -r nch nadd ndel bytes blocks <"$B/$t-v2.changes"
    record "$t" "fresh deploy / cp -a floor (s)" "$mf" "$mfl" s "$(ratio "$mf" "$mfl")" "<=" 0.9
    record "$t" "upgrade / rsync --checksum (s)" "$mu" "$mrc" s "$(ratio "$mu" "$mrc")" "<=" 0.2
    record "$t" "upgrade / rsync (s)" "$mu" "$mrp" s "$(ratio "$mu" "$mrp")" "<=" 0.5
    record "$t" "growth / bytes changed, 4K blocks" "$growth" "$blocks" B "$(ratio "$growth" "$blocks")" "<=" 1.1
    record "$t" "growth / bytes changed, logical" "$growth" "$bytes" B "$(ratio "$growth" "$bytes")" "<=" 1.1
    record "$t" "peak RSS / 64 MiB (KiB)" "$rss_max" 65536 KiB "$(ratio "$rss_max" 65536)" "<" 1.0
    log "$t: $nch files changed, $nadd added, $ndel deleted: $(mib "$bytes") MiB ($(mib "$blocks") MiB in 4K blocks)"
    bench_bundle "$t" "$base" "$up"
    rm -f "$up" "$base"
}

# Bundles: a build image (factory + v2), a signed delta bundle of v2, applied
# to copies of factory, vs an upgrade from the zstd tarball of TREE-v2.
bench_bundle() {
    local t=$1 base=$2 up=$3 v2=$B/$1-v2
    local build=$W/$t-build.img bundle=$W/$t-v2.bundle key=$W/bench-key tarball=$B/$t-v2.tar.zst
    local apply_t=() tar_t=() i
    if [[ ! -f $tarball ]]; then
        log "$t: packing $t-v2 as a zstd tarball (first run only)"
        tar --numeric-owner --xattrs --acls -C "$v2" -cf - . | zstd -q -T0 -3 -o "$tarball.tmp"
        mv "$tarball.tmp" "$tarball"
    fi
    log "$t: signed delta bundle vs tarball upgrade ($RUNS runs each)"
    copy_image "$base" "$build"
    "$DEPLOY" -q --version v2 --no-bootloader --no-default --rootfs "$v2" "$build" >"$W/deploy.log" 2>&1 ||
        die "deploy of $t-v2 to the build image failed: $(tail -5 "$W/deploy.log")"
    rm -f "$key.key" "$key.pub" "$bundle"
    "$DEPLOY" keygen --output "$key" >/dev/null
    local t0 t1
    t0=$(now)
    "$DEPLOY" bundle create -q "$build" --version v2 --base factory --sign-key "$key.key" \
        --output "$bundle" >"$W/deploy.log" 2>&1 || die "bundle create failed: $(tail -5 "$W/deploy.log")"
    t1=$(now)
    local create_s bsize tsize psize
    create_s=$(elapsed "$t0" "$t1")
    # The same delta uncompressed, for the gain of zstd (the default).
    "$DEPLOY" bundle create -q "$build" --version v2 --base factory --sign-key "$key.key" \
        --compress none --output "$bundle.plain" >"$W/deploy.log" 2>&1 ||
        die "bundle create --compress none failed: $(tail -5 "$W/deploy.log")"
    psize=$(stat -c %s "$bundle.plain")
    rm -f "$build" "$bundle.plain"
    bsize=$(stat -c %s "$bundle")
    tsize=$(stat -c %s "$tarball")
    for ((i = 1; i <= RUNS; i++)); do
        copy_image "$base" "$up"
        timed_deploy --no-bootloader --no-default --rootfs "$bundle" --verify-key "$key.pub" "$up"
        apply_t+=("$DUR")
        copy_image "$base" "$up"
        timed_deploy --version v2 --no-bootloader --no-default --rootfs "$tarball" "$up"
        tar_t+=("$DUR")
        log "  run $i: apply bundle ${apply_t[-1]} s, upgrade from the tarball ${tar_t[-1]} s"
    done
    rm -f "$bundle" "$key.key" "$key.pub"
    local nch nadd ndel bytes blocks ma mt
    read -r nch nadd ndel bytes blocks <"$B/$t-v2.changes"
    ma=$(median "${apply_t[@]}")
    mt=$(median "${tar_t[@]}")
    record "$t" "delta bundle (zstd) / bytes changed (B)" "$bsize" "$bytes" B "$(ratio "$bsize" "$bytes")" "<=" 1.2
    record "$t" "delta bundle zstd / uncompressed (B)" "$bsize" "$psize" B "$(ratio "$bsize" "$psize")" "<=" 1.0
    note "$t" "full tarball (zstd -3) size" "$tsize" B
    note "$t" "bundle create time" "$create_s" s
    record "$t" "apply bundle / tarball upgrade (s)" "$ma" "$mt" s "$(ratio "$ma" "$mt")" "<=" 0.2
}

START=$SECONDS
for t in $TREES; do
    case $t in
    debian) build_debian ;;
    synth) build_synth ;;
    *) die "unknown tree $t (known: debian synth)" ;;
    esac
    build_v2 "$t"
    install_kernel "$t"
done
log "inputs ready after $((SECONDS - START)) s"
MEASURE=$SECONDS
for t in $TREES; do bench_tree "$t"; done

{
    echo "btrfs-deploy benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, kernel $(uname -r)"
    echo "median of $RUNS runs; page cache $([[ $DROP == 1 ]] && echo dropped || echo kept warm) before each run; times include sync"
    echo "ratio = ours / baseline (targets: fresh <= 0.9 (the default disk kind, hybrid), upgrade <= 0.2 of rsync -c and <= 0.5 of rsync, growth <= 1.1, RSS < 1.0, bundle size <= 1.2, bundle apply <= 0.2)"
    printf '%-7s %-34s %12s %12s %-4s %7s  %s\n' tree metric ours baseline unit ratio "target ok"
    printf '%s\n' "${RESULT_LINES[@]}"
    echo "all targets met: $([[ $ALL_OK == 1 ]] && echo yes || echo no); measuring took $((SECONDS - MEASURE)) s"
} | tee "$B/results.txt"
{
    echo "{\"runs\":$RUNS,\"drop_caches\":$([[ $DROP == 1 ]] && echo true || echo false),\"cpus\":$(nproc),\"results\":["
    local_sep=""
    for j in "${JSON_ITEMS[@]}"; do
        printf '%s%s\n' "$local_sep" "$j"
        local_sep=","
    done
    echo "],\"all_ok\":$([[ $ALL_OK == 1 ]] && echo true || echo false)}"
} >"$B/results.json"
log "results in $B/results.txt and $B/results.json"
