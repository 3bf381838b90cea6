//! Integration: `--rootfs system.tar[.gz|.zst|.xz]` (issue 7). The archive
//! is made with GNU tar from the synthetic rootfs, deployed, and the result
//! compared with a deploy of the directory itself.

mod common;
use btrfs_deploy::tree::copy::testing::tree_diff;
use common::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `tar --xattrs --xattrs-include='*' --numeric-owner -cpf ARCHIVE FLAGS -C DIR .`
fn tar_of(dir: &Path, archive: &Path, flags: &[&str]) {
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-cpf"])
        .arg(archive)
        .args(flags)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .output()
        .expect("running tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn deploy_new(rootfs: &Path, img: &Path) {
    run_ok(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--size",
        "600M",
        img.to_str().unwrap(),
    ]);
}

/// Differences between the same subtree of two mounted images.
fn diff(a: &Inspect, b: &Inspect, rel: &str) -> Vec<String> {
    tree_diff(&a.path(rel), &b.path(rel), false)
}

#[test]
fn tarball_rootfs_deploys_like_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let archive = tmp.path().join("system.tar.zst");
    tar_of(&rootfs, &archive, &["--zstd"]);
    let (from_dir, from_tar) = (tmp.path().join("dir.img"), tmp.path().join("tar.img"));
    deploy_new(&rootfs, &from_dir);
    deploy_new(&archive, &from_tar);
    assert_no_leftovers(&from_tar, false);

    let (a, b) = (Inspect::open(&from_dir), Inspect::open(&from_tar));
    // Everything but etc/fstab (it names the filesystem's UUID) and the state
    // directories (moved to /state) is in orig.
    for rel in [
        "systems/factory/orig/usr",
        "systems/factory/orig/dev",
        "systems/factory/orig/boot",
        "systems/factory/orig/empty",
        "systems/factory/orig/tmp",
        "state/home",
        "state/root",
        "state/var",
        "state/srv",
        "state/opt",
    ] {
        let d = diff(&a, &b, rel);
        assert!(d.is_empty(), "{rel} differs:\n  {}", d.join("\n  "));
    }
    let orig = |rel: &str| b.path(&format!("systems/factory/orig/{rel}"));
    assert_eq!(owner_mode(&orig("usr/bin/suid")).2 & 0o7777, 0o4755);
    assert_eq!(owner_mode(&orig("usr/bin/sgid")), (0, 42, 0o102755));
    assert!(getxattr(&orig("usr/bin/ping"), "security.capability").is_some());
    assert_eq!(
        std::fs::metadata(orig("usr/bin/tool")).unwrap().ino(),
        std::fs::metadata(orig("usr/bin/tool-alias")).unwrap().ino()
    );
    let null = std::fs::symlink_metadata(orig("dev/null")).unwrap();
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert!(std::fs::symlink_metadata(orig("run-fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // The kernel found inside the archive was installed.
    assert_eq!(
        std::fs::read(b.path("systems/factory/kernel")).unwrap(),
        std::fs::read(rootfs.join(format!("boot/vmlinuz-{FAKE_KVER}"))).unwrap()
    );
    let json = std::fs::read_to_string(b.path("systems/factory/deployment.json")).unwrap();
    assert!(json.contains("system.tar.zst"), "{json}");
}

#[test]
fn tarball_upgrade_writes_only_the_delta() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let img = tmp.path().join("disk.img");
    deploy_new(&rootfs, &img);

    write(&rootfs.join("usr/share/new-in-v2"), b"new\n");
    write(&rootfs.join("etc/hostname"), b"v2\n");
    std::fs::remove_file(rootfs.join("usr/bin/dangling")).unwrap();
    let archive = tmp.path().join("v2.tar.gz");
    tar_of(&rootfs, &archive, &["-z"]);
    let before = data_used(&img);
    run_ok(&[
        "--version",
        "v2",
        "--rootfs",
        archive.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_no_leftovers(&img, false);
    let grown = data_used(&img) - before;
    let m = Inspect::open(&img);
    assert_eq!(
        std::fs::read_link(m.path("systems/default")).unwrap(),
        Path::new("v2")
    );
    let v2 = |rel: &str| m.path(&format!("systems/v2/orig/{rel}"));
    assert_eq!(std::fs::read(v2("usr/share/new-in-v2")).unwrap(), b"new\n");
    assert_eq!(std::fs::read(v2("etc/hostname")).unwrap(), b"v2\n");
    assert!(std::fs::symlink_metadata(v2("usr/bin/dangling")).is_err());
    // Unchanged content still shares its extents with factory.
    assert_eq!(
        first_extent(&v2("usr/bin/tool")),
        first_extent(&m.path("systems/factory/orig/usr/bin/tool"))
    );
    // No scratch extraction is left behind, and the disk grew by far less
    // than a second copy of the rootfs (64 MiB sparse file, 100 KB tool).
    let names: Vec<String> = std::fs::read_dir(m.path("systems"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| ["default", "factory", "v2"].contains(&n.as_str())),
        "{names:?}"
    );
    assert!(grown < 1 << 20, "grew by {grown} bytes");
}

#[test]
fn archive_escaping_the_target_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("sub")).unwrap();
    write(&work.join("etc/hostname"), b"evil\n");
    write(&work.join("escape"), b"evil\n");
    let archive: PathBuf = tmp.path().join("evil.tar");
    // -P keeps "../escape", which GNU tar would otherwise strip.
    let out = Command::new("tar")
        .current_dir(work.join("sub"))
        .args(["-P", "-cf"])
        .arg(&archive)
        .args(["../etc/hostname", "../escape"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(work.join("escape")).unwrap();
    let img = tmp.path().join("disk.img");
    run_fails(
        &[
            "--no-bootloader",
            "--rootfs",
            archive.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
        1,
        &["..", "evil.tar"],
    );
    assert_no_leftovers(&img, false);
    assert!(!img.exists());
    assert!(!work.join("escape").exists());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

/// `getfacl -R -n -p` of `rel` inside `dir` (paths relative to `dir/rel`).
fn acls(dir: &Path) -> String {
    let out = Command::new("getfacl")
        .args(["-R", "-n", "-p", "."])
        .current_dir(dir)
        .output()
        .expect("running getfacl");
    assert!(out.status.success(), "getfacl in {}", dir.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 10, defect 5: a rootfs archived by GNU tar with `--acls --xattrs`
/// from a tree where `setfacl` set access and default ACLs and `setfattr`
/// set user xattrs (one value with newlines, one binary with 0x0a bytes)
/// deploys, and `getfacl` on the mounted image shows the source's ACLs, in
/// the version (`usr/`) and in `/state` (`srv/`). Before, the archive was
/// refused with "malformed pax extension".
#[test]
fn tar_with_acls_and_xattrs_deploys_with_its_acls() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    sh(&format!(
        "cd {} && mkdir -p usr/share/acl/dir srv/shared/sub && echo f > usr/share/acl/file \
         && echo g > srv/shared/sub/g \
         && setfacl -m u:1234:r,g:4321:rw,u:1000:rw usr/share/acl/file \
         && setfacl -m u:1234:rwx usr/share/acl/dir && setfacl -d -m u:1234:rx,o::- usr/share/acl/dir \
         && setfacl -m u:1000:rwx srv/shared && setfacl -d -m u:1000:rwx,g:4321:rx srv/shared \
         && setfacl -m u:1000:r srv/shared/sub/g \
         && setfattr -n user.note -v \"$(printf 'two\\nlines')\" usr/share/acl/file \
         && setfattr -n user.bin -v 0x010a0a00 srv/shared",
        rootfs.display()
    ));
    let archive = tmp.path().join("acl.tar.gz");
    let out = Command::new("tar")
        .args([
            "--acls",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-czpf",
        ])
        .arg(&archive)
        .arg("-C")
        .arg(&rootfs)
        .arg(".")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = tmp.path().join("acl.img");
    deploy_new(&archive, &img);
    assert_no_leftovers(&img, false);
    let m = Inspect::open(&img);
    for (src, dst) in [
        ("usr/share/acl", "systems/factory/orig/usr/share/acl"),
        ("srv/shared", "state/srv/shared"),
    ] {
        let want = acls(&rootfs.join(src));
        assert!(want.contains("default:user:"), "{src}: {want}");
        assert_eq!(acls(&m.path(dst)), want, "{src}");
    }
    assert_eq!(
        getxattr(
            &m.path("systems/factory/orig/usr/share/acl/file"),
            "user.note"
        )
        .as_deref(),
        Some(&b"two\nlines"[..])
    );
    assert_eq!(
        getxattr(&m.path("state/srv/shared"), "user.bin").as_deref(),
        Some(&[1u8, 10, 10, 0][..])
    );
}
