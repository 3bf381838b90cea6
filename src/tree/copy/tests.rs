//! Tests of the copy engine (run as root: they chown, mknod, set trusted xattrs and mount).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::testing::{
    assert_trees_equal, assert_trees_equal_with_atime, lchown, make_test_tree, set_times,
    set_xattr, tree_diff,
};
use super::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

fn copy_opts(threads: usize) -> CopyOptions {
    CopyOptions {
        threads,
        progress: None,
    }
}

fn sync_opts(checksum: bool) -> SyncOptions {
    SyncOptions {
        checksum,
        threads: 2,
        ..Default::default()
    }
}

/// A source and an empty target directory in one temp dir.
fn src_dst(t: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    let (s, d) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir(&s).unwrap();
    std::fs::create_dir(&d).unwrap();
    (s, d)
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().ino()
}

fn write(p: &Path, data: &[u8]) {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(p, data).unwrap();
}

/// A tmpfs mounted on a directory of its own; unmounted on drop.
struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    fn new(dir: &Path, size: &str) -> TmpfsMount {
        std::fs::create_dir_all(dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0755").as_str()),
        )
        .expect("mounting a tmpfs (tests must run as root)");
        TmpfsMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn check_copy(threads: usize) {
    let t = tmp();
    let (src, dst) = src_dst(&t);
    make_test_tree(&src).unwrap();
    let progress = Arc::new(Progress::default());
    let opts = CopyOptions {
        threads,
        progress: Some(progress.clone()),
    };
    let stats = copy_tree(&src, &dst, &opts).unwrap();
    assert_trees_equal_with_atime(&src, &dst);
    // Regular files: hostname shadow acl-file inherited su wall ping dash perl
    // libpair big sparse empty-file leaf .profile = 15.
    assert_eq!(stats.files, 15, "{stats:?}");
    assert_eq!(stats.hardlinks, 3, "{stats:?}");
    assert_eq!(stats.specials, 4, "{stats:?}");
    assert_eq!(stats.symlinks, 5, "{stats:?}");
    assert_eq!(stats.dirs, 24, "{stats:?}");
    let entries = stats.files + stats.hardlinks + stats.specials + stats.symlinks + stats.dirs;
    assert_eq!(progress.entries.load(Ordering::Relaxed), entries);
    assert_eq!(progress.bytes.load(Ordering::Relaxed), stats.bytes);
    assert!(stats.bytes > (16 << 20) + (1 << 20), "{stats:?}");

    // Spot checks on top of the generic comparison.
    let su = std::fs::metadata(dst.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    let tmpd = std::fs::metadata(dst.join("tmp")).unwrap();
    assert_eq!(tmpd.mode() & 0o7777, 0o1777);
    assert_eq!(
        ino(&dst.join("usr/bin/perl")),
        ino(&dst.join("usr/share/doc/perl-copy"))
    );
    assert_ne!(
        ino(&dst.join("usr/bin/perl")),
        ino(&src.join("usr/bin/perl"))
    );
    let sparse = std::fs::metadata(dst.join("var/sparse.img")).unwrap();
    assert_eq!(sparse.len(), 16 << 20);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "sparse file filled: {} blocks",
        sparse.blocks()
    );
    let link = std::fs::symlink_metadata(dst.join("home/user/profile-link")).unwrap();
    assert_eq!((link.uid(), link.gid()), (1000, 1000));
    assert_eq!(
        std::fs::read_link(dst.join("etc/abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert!(std::fs::symlink_metadata(dst.join("lib"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn copy_preserves_everything_single_thread() {
    check_copy(1);
}

#[test]
fn copy_preserves_everything_parallel() {
    check_copy(4);
}

#[test]
fn tree_diff_detects_differences() {
    let t = tmp();
    let (a, b) = src_dst(&t);
    make_test_tree(&a).unwrap();
    copy_tree(&a, &b, &copy_opts(2)).unwrap();
    assert!(tree_diff(&a, &b, true).is_empty());
    // One change of each kind the helper must notice.
    std::fs::set_permissions(
        b.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    lchown(&b.join("etc/shadow"), 0, 0).unwrap();
    set_xattr(&b.join("usr/bin/dash"), "user.x", b"1").unwrap();
    std::fs::write(b.join("usr/bin/su"), b"\x7fELF SU").unwrap(); // same size, other bytes
    std::fs::remove_file(b.join("usr/share/doc/perl-copy")).unwrap();
    std::fs::copy(a.join("usr/bin/perl"), b.join("usr/share/doc/perl-copy")).unwrap();
    set_times(&b.join("var/empty-file"), (1, 0), (1, 5)).unwrap();
    std::fs::remove_file(b.join("etc/dangling")).unwrap();
    std::os::unix::fs::symlink("/elsewhere", b.join("etc/dangling")).unwrap();
    let diff = tree_diff(&a, &b, false).join("\n");
    for needle in [
        "etc/hostname: mode",
        "etc/shadow: gid",
        "usr/bin/dash: xattrs",
        "usr/bin/su: content",
        "usr/share/doc/perl-copy: hard links",
        "var/empty-file: mtime",
        "etc/dangling: symlink target",
    ] {
        assert!(diff.contains(needle), "{needle} not in:\n{diff}");
    }
}

#[test]
fn symlink_roots_are_refused() {
    let t = tmp();
    let (src, dst) = src_dst(&t);
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let err = format!("{:#}", copy_tree(&link, &dst, &copy_opts(1)).unwrap_err());
    assert!(err.contains("is a symlink"), "{err}");
    let err = format!("{:#}", copy_tree(&src, &link, &copy_opts(1)).unwrap_err());
    assert!(err.contains("is a symlink"), "{err}");
    let err = format!(
        "{:#}",
        sync_tree(&link, &dst, &sync_opts(false)).unwrap_err()
    );
    assert!(err.contains("is a symlink"), "{err}");
}

#[test]
fn copy_refuses_non_empty_or_overlapping_target() {
    let t = tmp();
    let (src, dst) = src_dst(&t);
    write(&dst.join("x"), b"x");
    let err = format!("{:#}", copy_tree(&src, &dst, &copy_opts(1)).unwrap_err());
    assert!(err.contains("is not empty"), "{err}");
    std::fs::create_dir(src.join("inner")).unwrap();
    let err = format!(
        "{:#}",
        copy_tree(&src, &src.join("inner"), &copy_opts(1)).unwrap_err()
    );
    assert!(err.contains("overlap"), "{err}");
}

#[test]
fn no_space_error_names_the_target_path() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("small"), b"small");
    write(
        &src.join("sub/big.bin"),
        &testing::pseudo_random(2 << 20, 3),
    );
    let mnt = TmpfsMount::new(&t.path().join("mnt"), "512k");
    let err = copy_tree(&src, &mnt.dir, &copy_opts(1)).unwrap_err();
    let msg = format!("{err:#}");
    let expected = format!(
        "no space left on the target while writing {}",
        mnt.dir.join("sub/big.bin").display()
    );
    assert!(msg.contains(&expected), "{msg}");
    let ns = err
        .downcast_ref::<NoSpaceError>()
        .expect("a NoSpaceError in the chain");
    assert_eq!(ns.path, mnt.dir.join("sub/big.bin"));
}

#[test]
fn move_contents_same_fs_and_across_filesystems() {
    let t = tmp();
    let reference = t.path().join("ref");
    std::fs::create_dir(&reference).unwrap();
    make_test_tree(&reference).unwrap();

    // Same file system: entries are renamed.
    let (src, dst) = src_dst(&t);
    copy_tree(&reference, &src, &copy_opts(2)).unwrap();
    let src_meta = std::fs::metadata(&src).unwrap();
    let stats = move_contents(&src, &dst, &copy_opts(2)).unwrap();
    assert_trees_equal(&reference, &dst);
    assert!(
        std::fs::read_dir(&src).unwrap().next().is_none(),
        "source not empty"
    );
    assert_eq!(
        std::fs::metadata(&src).unwrap().mtime_nsec(),
        src_meta.mtime_nsec()
    );
    assert!(
        stats.dirs > 0 && stats.files == 0,
        "renamed top-level entries: {stats:?}"
    );

    // Across file systems (like across Btrfs subvolumes): EXDEV, so copy + delete.
    let mnt = TmpfsMount::new(&t.path().join("mnt"), "64m");
    let src2 = mnt.dir.join("home");
    std::fs::create_dir(&src2).unwrap();
    copy_tree(&reference, &src2, &copy_opts(2)).unwrap();
    let dst2 = t.path().join("dst2");
    std::fs::create_dir(&dst2).unwrap();
    let stats = move_contents(&src2, &dst2, &copy_opts(2)).unwrap();
    assert_trees_equal(&reference, &dst2);
    assert!(
        std::fs::read_dir(&src2).unwrap().next().is_none(),
        "source not empty"
    );
    assert_eq!(stats.files, 15, "{stats:?}");
}

#[test]
fn remove_tree_does_not_follow_symlinks() {
    let t = tmp();
    let outside = t.path().join("outside");
    write(&outside.join("keep"), b"keep");
    let tree = t.path().join("tree");
    write(&tree.join("a/b/file"), b"x");
    std::os::unix::fs::symlink(&outside, tree.join("a/link-dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("keep"), tree.join("link-file")).unwrap();
    std::fs::set_permissions(tree.join("a/b"), std::fs::Permissions::from_mode(0o500)).unwrap();
    remove_tree(&tree).unwrap();
    assert!(!tree.exists());
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    remove_tree(&tree).unwrap(); // missing: fine

    // A mount inside the tree stops the removal.
    let tree = t.path().join("tree2");
    let mnt = TmpfsMount::new(&tree.join("mnt"), "1m");
    write(&mnt.dir.join("precious"), b"p");
    let err = format!("{:#}", remove_tree(&tree).unwrap_err());
    assert!(err.contains("something is mounted there"), "{err}");
    assert!(mnt.dir.join("precious").exists());
}

/// Copies `src` into a new directory `dst` and returns it.
fn snapshot(t: &tempfile::TempDir, src: &Path, name: &str) -> PathBuf {
    let dst = t.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    copy_tree(src, &dst, &copy_opts(2)).unwrap();
    dst
}

fn count_entries(root: &Path) -> u64 {
    // sys::list_dir does not touch atimes (std::fs::read_dir would).
    let mut n = 1;
    for name in sys::list_dir(root).unwrap() {
        let p = root.join(name);
        n += if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            count_entries(&p)
        } else {
            1
        };
    }
    n
}

#[test]
fn sync_of_identical_trees_touches_nothing() {
    let t = tmp();
    let (src, _) = src_dst(&t);
    make_test_tree(&src).unwrap();
    let dst = snapshot(&t, &src, "old");
    let before = ino(&dst.join("usr/lib/big.bin"));
    for checksum in [false, true] {
        let stats = sync_tree(&src, &dst, &sync_opts(checksum)).unwrap();
        assert_eq!(
            stats,
            SyncStats {
                unchanged: count_entries(&src),
                ..Default::default()
            }
        );
    }
    assert_trees_equal_with_atime(&src, &dst);
    assert_eq!(ino(&dst.join("usr/lib/big.bin")), before);
}

#[test]
fn sync_applies_every_kind_of_change() {
    let t = tmp();
    let (src, _) = src_dst(&t);
    make_test_tree(&src).unwrap();
    write(&src.join("etc/gone/deeper/file"), b"to be deleted");
    write(&src.join("etc/type-dir-to-file/x"), b"x");
    let dst = snapshot(&t, &src, "old");
    let kept = ino(&dst.join("usr/lib/big.bin"));
    let fixed = ino(&dst.join("etc/shadow"));
    let changed = ino(&dst.join("etc/hostname"));

    // New version of the tree.
    write(&src.join("etc/new-file"), b"new"); // written
    std::fs::create_dir(src.join("etc/new-dir")).unwrap(); // written
    write(&src.join("etc/new-dir/inner"), b"inner"); // written
    std::fs::write(src.join("etc/hostname"), b"otherhost-longer\n").unwrap(); // written
    remove_tree(&src.join("etc/gone")).unwrap(); // 3 deleted
    std::fs::remove_file(src.join("var/empty-file")).unwrap(); // 1 deleted
    remove_tree(&src.join("etc/type-dir-to-file")).unwrap(); // x deleted
    write(&src.join("etc/type-dir-to-file"), b"now a file"); // written
    std::fs::remove_file(src.join("etc/abs-link")).unwrap();
    std::fs::create_dir(src.join("etc/abs-link")).unwrap(); // symlink -> dir: written
    std::fs::remove_file(src.join("usr/bin/sh")).unwrap();
    std::os::unix::fs::symlink("bash", src.join("usr/bin/sh")).unwrap(); // target: written
    std::fs::set_permissions(
        src.join("etc/shadow"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap(); // metadata only
    lchown(&src.join("home/user/profile-link"), 1001, 1001).unwrap(); // metadata only
    set_xattr(&src.join("usr/bin/dash"), "user.new", b"v").unwrap(); // metadata only
    std::fs::set_permissions(src.join("dev/null"), std::fs::Permissions::from_mode(0o600)).unwrap(); // metadata only

    let before_total = count_entries(&src);
    let stats = sync_tree(&src, &dst, &sync_opts(false)).unwrap();
    assert_trees_equal_with_atime(&src, &dst);
    assert_eq!(stats.deleted, 5, "{stats:?}");
    assert_eq!(stats.written, 7, "{stats:?}");
    // 4 entries + the directories whose content changed (mtime differs):
    // etc, var, usr/bin; the root is unchanged.
    assert_eq!(stats.metadata_only, 4 + 3, "{stats:?}");
    assert_eq!(
        stats.unchanged + stats.written + stats.metadata_only,
        before_total,
        "{stats:?}"
    );
    assert_eq!(
        ino(&dst.join("usr/lib/big.bin")),
        kept,
        "unchanged file rewritten"
    );
    assert_eq!(
        ino(&dst.join("etc/shadow")),
        fixed,
        "metadata fix should be in place"
    );
    assert_ne!(
        ino(&dst.join("etc/hostname")),
        changed,
        "changed file must be a new inode"
    );
    assert_eq!(stats.bytes_written, 3 + 5 + 17 + 10);
}

#[test]
fn sync_reproduces_hardlink_groups() {
    let t = tmp();
    let (src, _) = src_dst(&t);
    // Old tree: a+b linked, c/d separate, e+f linked, g+h linked.
    for (name, data) in [("a", "X"), ("c", "C"), ("d", "C"), ("e", "E"), ("g", "G")] {
        write(&src.join(name), data.as_bytes());
        set_times(&src.join(name), (1, 0), (1000, 1)).unwrap();
    }
    std::fs::hard_link(src.join("a"), src.join("b")).unwrap();
    std::fs::hard_link(src.join("e"), src.join("f")).unwrap();
    std::fs::hard_link(src.join("g"), src.join("sub-h")).unwrap();
    let dst = snapshot(&t, &src, "old");

    // New tree: a changed and split from b; c+d linked; e, f split (same content).
    std::fs::remove_file(src.join("a")).unwrap();
    write(&src.join("a"), b"Y-new");
    std::fs::remove_file(src.join("d")).unwrap();
    std::fs::hard_link(src.join("c"), src.join("d")).unwrap();
    std::fs::remove_file(src.join("f")).unwrap();
    std::fs::copy(src.join("e"), src.join("f")).unwrap();
    set_times(&src.join("f"), (1, 0), (1000, 1)).unwrap();
    set_times(&src, (1, 0), (1000, 1)).unwrap();

    for threads in [1, 3] {
        let d = snapshot(&t, &dst, &format!("run{threads}"));
        let stats = sync_tree(
            &src,
            &d,
            &SyncOptions {
                threads,
                ..Default::default()
            },
        )
        .unwrap();
        assert_trees_equal(&src, &d);
        assert_eq!(
            stats.unchanged + stats.written + stats.metadata_only,
            count_entries(&src)
        );
        assert_eq!(stats.deleted, 0);
        // a rewritten, d relinked, one of e/f given its own inode.
        assert_eq!(stats.written, 3, "{stats:?}");
        assert_eq!(ino(&d.join("g")), ino(&d.join("sub-h")));
    }
}

#[test]
fn sync_with_checksum_compares_content() {
    let t = tmp();
    let (src, _) = src_dst(&t);
    write(&src.join("same-content"), b"same");
    write(&src.join("same-size-same-mtime"), b"1234");
    set_times(&src.join("same-size-same-mtime"), (1, 0), (2000, 2)).unwrap();
    set_times(&src, (1, 0), (1000, 1)).unwrap();
    let old = snapshot(&t, &src, "old");
    // New source: same bytes but a new mtime; and other bytes with size+mtime kept.
    set_times(&src.join("same-content"), (1, 0), (3000, 3)).unwrap();
    std::fs::write(src.join("same-size-same-mtime"), b"5678").unwrap();
    set_times(&src.join("same-size-same-mtime"), (1, 0), (2000, 2)).unwrap();
    set_times(&src, (1, 0), (1000, 1)).unwrap();

    // Without checksum: mtime decides (the same-size-same-mtime change is missed).
    let quick = snapshot(&t, &old, "quick");
    let s = sync_tree(&src, &quick, &sync_opts(false)).unwrap();
    assert_eq!(
        (s.written, s.metadata_only, s.unchanged),
        (1, 0, 2),
        "{s:?}"
    );
    assert_eq!(
        std::fs::read(quick.join("same-size-same-mtime")).unwrap(),
        b"1234"
    );

    // With checksum: content decides.
    let exact = snapshot(&t, &old, "exact");
    let keep = ino(&exact.join("same-content"));
    let s = sync_tree(&src, &exact, &sync_opts(true)).unwrap();
    assert_eq!(
        (s.written, s.metadata_only, s.unchanged),
        (1, 1, 1),
        "{s:?}"
    );
    assert_eq!(
        ino(&exact.join("same-content")),
        keep,
        "equal content must stay in place"
    );
    assert_trees_equal_with_atime(&src, &exact);
}

#[test]
fn sync_leaves_excluded_top_level_names_alone() {
    let t = tmp();
    let (src, dst) = src_dst(&t);
    write(&src.join("home/new-user/file"), b"new");
    write(&src.join("etc/x"), b"x");
    write(&dst.join("home/old-user/file"), b"old");
    write(&dst.join("stale"), b"stale");
    let opts = SyncOptions {
        exclude_top: vec!["home".into()],
        ..Default::default()
    };
    let stats = sync_tree(&src, &dst, &opts).unwrap();
    assert!(dst.join("home/old-user/file").exists());
    assert!(!dst.join("home/new-user").exists());
    assert!(!dst.join("stale").exists());
    assert_eq!(std::fs::read(dst.join("etc/x")).unwrap(), b"x");
    assert_eq!(stats.deleted, 1, "{stats:?}");
}

#[test]
fn sync_keeps_absent_paths_and_the_directories_that_lead_there() {
    use std::os::unix::fs::MetadataExt;
    let t = tmp();
    let (src, dst) = src_dst(&t);
    write(&src.join("etc/x"), b"x");
    // The source has no /usr at all: /usr/lib/tool stays (same inode),
    // everything else below /usr goes, and so does what is not kept.
    write(&dst.join("usr/lib/tool/bin/t"), b"tool");
    write(&dst.join("usr/lib/other/f"), b"other");
    write(&dst.join("usr/share/doc"), b"doc");
    write(&dst.join("opt/kept-file"), b"kept");
    write(&dst.join("stale"), b"stale");
    let ino = std::fs::metadata(dst.join("usr/lib/tool/bin/t"))
        .unwrap()
        .ino();
    let opts = SyncOptions {
        keep_absent: vec!["usr/lib/tool".into(), "opt/kept-file".into()],
        ..Default::default()
    };
    sync_tree(&src, &dst, &opts).unwrap();
    let kept = std::fs::metadata(dst.join("usr/lib/tool/bin/t")).unwrap();
    assert_eq!(kept.ino(), ino);
    assert_eq!(std::fs::read(dst.join("opt/kept-file")).unwrap(), b"kept");
    for gone in ["usr/lib/other", "usr/share", "stale"] {
        assert!(!dst.join(gone).exists(), "{gone} left");
    }
    assert_eq!(std::fs::read(dst.join("etc/x")).unwrap(), b"x");
}

#[test]
fn sync_no_space_error() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a"), b"a");
    let mnt = TmpfsMount::new(&t.path().join("mnt"), "512k");
    write(&mnt.dir.join("a"), b"old a");
    std::fs::write(src.join("a"), testing::pseudo_random(2 << 20, 1)).unwrap();
    let err = sync_tree(&src, &mnt.dir, &sync_opts(false)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!(
            "no space left on the target while writing {}",
            mnt.dir.join("a").display()
        )),
        "{msg}"
    );
    // The half-written replacement was cleaned up and the old file kept.
    assert_eq!(std::fs::read(mnt.dir.join("a")).unwrap(), b"old a");
    assert_eq!(std::fs::read_dir(&mnt.dir).unwrap().count(), 1);
}

/// A Btrfs in a loop image with subvolumes; everything undone on drop.
struct BtrfsImage {
    mnt: PathBuf,
    loopdev: String,
}

impl BtrfsImage {
    /// Panics, naming what failed, when the image cannot be made: the
    /// test needs root, btrfs-progs and loop devices, and must not pass
    /// without them.
    fn new(dir: &Path) -> BtrfsImage {
        let img = dir.join("btrfs.img");
        let mnt = dir.join("btrfs");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(300 << 20)
            .unwrap();
        let run = |c: &mut Command| {
            let o = c.output().unwrap_or_else(|e| panic!("starting {c:?}: {e}"));
            assert!(
                o.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            o
        };
        run(Command::new("mkfs.btrfs").arg("-q").arg(&img));
        let out = run(Command::new("losetup").args(["--find", "--show"]).arg(&img));
        let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let image = BtrfsImage { mnt, loopdev };
        nix::mount::mount(
            Some(image.loopdev.as_str()),
            &image.mnt,
            Some("btrfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mounting {} (run as root): {e}", image.loopdev));
        image
    }

    fn subvolume(&self, name: &str) -> PathBuf {
        let p = self.mnt.join(name);
        let st = Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        p
    }
}

impl Drop for BtrfsImage {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

#[test]
fn btrfs_reflinks_across_subvolumes() {
    let t = tmp();
    let fs = BtrfsImage::new(t.path());
    let a = fs.subvolume("a");
    let b = fs.subvolume("b");
    make_test_tree(&a).unwrap();
    let stats = copy_tree(&a, &b, &copy_opts(2)).unwrap();
    assert_trees_equal_with_atime(&a, &b);
    assert!(stats.reflinked_bytes >= (1 << 20) + (16 << 20), "{stats:?}");
    assert_eq!(stats.reflinked_bytes, stats.bytes);
    let sparse = std::fs::metadata(b.join("var/sparse.img")).unwrap();
    assert!(sparse.blocks() * 512 < 1 << 20);

    // move_contents across subvolumes (rename gives EXDEV): reflink + delete.
    let reference = snapshot(&t, &a.join("home"), "home-ref");
    let state = fs.subvolume("state-home");
    let moved = move_contents(&a.join("home"), &state, &copy_opts(2)).unwrap();
    assert_eq!(moved.files, 1, "{moved:?}");
    assert_trees_equal(&reference, &state);
    assert!(std::fs::read_dir(a.join("home")).unwrap().next().is_none());

    // A split hard link with equal content gets a reflink of the old file.
    let c = fs.subvolume("c");
    let src = t.path().join("split-src");
    write(&src.join("x"), b"shared");
    std::fs::hard_link(src.join("x"), src.join("y")).unwrap();
    copy_tree(&src, &c, &copy_opts(1)).unwrap();
    std::fs::remove_file(src.join("y")).unwrap();
    std::fs::copy(src.join("x"), src.join("y")).unwrap();
    let xm = std::fs::metadata(src.join("x")).unwrap();
    set_times(
        &src.join("y"),
        (xm.atime(), xm.atime_nsec()),
        (xm.mtime(), xm.mtime_nsec()),
    )
    .unwrap();
    let s = sync_tree(&src, &c, &sync_opts(false)).unwrap();
    assert_eq!(s.written, 1, "{s:?}");
    assert_eq!(s.bytes_written, 0, "split should be a reflink: {s:?}");
    assert_trees_equal(&src, &c);
}

/// Builds a tree of 600 names (in two directories, several jobs each) whose
/// hard-link groups and contents are given by `key(i) -> (group, content, mtime)`.
fn grouped_tree(root: &Path, key: impl Fn(usize) -> (String, String, i64)) {
    let mut first: std::collections::HashMap<String, PathBuf> = Default::default();
    for i in 0..600 {
        let dir = root.join(if i < 400 { "d" } else { "e" });
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("n{i}"));
        let (group, content, mtime) = key(i);
        match first.get(&group) {
            Some(leader) => std::fs::hard_link(leader, &p).unwrap(),
            None => {
                std::fs::write(&p, content).unwrap();
                set_times(&p, (1, 0), (mtime, 0)).unwrap();
                first.insert(group, p);
            }
        }
    }
    for d in ["d", "e", ""] {
        set_times(&root.join(d), (1, 0), (1000, 0)).unwrap();
    }
}

#[test]
fn sync_regroups_hardlinks_under_parallel_load() {
    let t = tmp();
    let old_src = t.path().join("old-src");
    let old_key = |i: usize| {
        let g = i % 37;
        (format!("g{g}"), format!("content {g}"), 1000 + g as i64)
    };
    grouped_tree(&old_src, old_key);
    let old = snapshot(&t, &old_src, "old");
    let new_src = t.path().join("new-src");
    grouped_tree(&new_src, |i| {
        if i % 5 == 0 {
            let k = i % 3;
            (format!("chg{k}"), format!("changed {k}"), 2000 + k as i64)
        } else {
            let (g, content, mtime) = old_key(i);
            (format!("{g}-{}", i % 2), content, mtime)
        }
    });
    for threads in [1, 2, 4] {
        let dst = snapshot(&t, &old, &format!("run{threads}"));
        let stats = sync_tree(
            &new_src,
            &dst,
            &SyncOptions {
                threads,
                ..Default::default()
            },
        )
        .unwrap();
        assert_trees_equal(&new_src, &dst);
        assert_eq!(
            stats.unchanged + stats.written + stats.metadata_only,
            count_entries(&new_src),
            "{stats:?}"
        );
        // Syncing again finds nothing to do.
        let again = sync_tree(
            &new_src,
            &dst,
            &SyncOptions {
                threads,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(again.unchanged, count_entries(&new_src), "{again:?}");
    }
}

#[test]
fn inherited_default_acls_do_not_leak_into_the_copy() {
    let t = tmp();
    let (src, dst) = src_dst(&t);
    write(&src.join("sub/file"), b"plain");
    let acl = testing::posix_acl(&[
        (testing::ACL_USER_OBJ, 7, 0),
        (testing::ACL_USER, 7, 1000),
        (testing::ACL_GROUP_OBJ, 5, 0),
        (testing::ACL_MASK, 7, 0),
        (testing::ACL_OTHER, 5, 0),
    ]);
    set_xattr(&dst, "system.posix_acl_default", &acl).unwrap();
    copy_tree(&src, &dst, &copy_opts(1)).unwrap();
    assert_trees_equal(&src, &dst);

    // Sync: a new file in a target directory that has a default ACL the source lacks.
    let old = snapshot(&t, &src, "old");
    set_xattr(&old.join("sub"), "system.posix_acl_default", &acl).unwrap();
    write(&src.join("sub/new"), b"new");
    sync_tree(&src, &old, &sync_opts(false)).unwrap();
    assert_trees_equal(&src, &old);
}

#[test]
fn copy_missing_adds_only_what_is_missing() {
    let t = tmp();
    let (src, dst) = src_dst(&t);
    make_test_tree(&src).unwrap();
    // dst already has some of it, different: kept as is.
    write(&dst.join("etc/hostname"), b"mine\n");
    std::fs::create_dir_all(dst.join("usr/bin")).unwrap();
    std::os::unix::fs::symlink("/nonexistent", dst.join("var")).unwrap();
    let seeded = copy_missing(&src, &dst, &copy_opts(2)).unwrap();
    assert_eq!(std::fs::read(dst.join("etc/hostname")).unwrap(), b"mine\n");
    assert_eq!(
        std::fs::read_link(dst.join("var")).unwrap(),
        Path::new("/nonexistent")
    );
    assert!(seeded.contains(&PathBuf::from("usr/bin/su")), "{seeded:?}");
    assert!(seeded.contains(&PathBuf::from("home")), "{seeded:?}");
    assert!(!seeded.iter().any(|p| p.starts_with("var")), "{seeded:?}");
    assert!(!seeded.contains(&PathBuf::from("etc/hostname")));
    // Seeded entries are exact copies, metadata included.
    for rel in ["home", "dev", "run", "usr/lib", "etc/acl-dir"] {
        let d = tree_diff(&src.join(rel), &dst.join(rel), false);
        assert!(d.is_empty(), "{rel}: {d:?}");
    }
    let su = std::fs::symlink_metadata(dst.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    assert_eq!(
        std::fs::read(dst.join("usr/bin/ping")).unwrap(),
        std::fs::read(src.join("usr/bin/ping")).unwrap()
    );
    // No temporary names are left.
    let out = Command::new("find")
        .arg(&dst)
        .args(["-name", ".btrfs-deploy-seed*"])
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A second run finds nothing missing.
    assert!(copy_missing(&src, &dst, &copy_opts(2)).unwrap().is_empty());
}
