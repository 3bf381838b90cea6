use super::*;
use crate::tree::copy;
use std::fs;
use std::os::unix::fs::{lchown, symlink};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// base, local, vendor and target trees (target filled by `merge`).
struct Trees {
    _tmp: TempDir,
    base: PathBuf,
    local: PathBuf,
    vendor: PathBuf,
    target: PathBuf,
}

fn trees() -> Trees {
    let tmp = TempDir::new().unwrap();
    let t = Trees {
        base: tmp.path().join("base"),
        local: tmp.path().join("local"),
        vendor: tmp.path().join("vendor"),
        target: tmp.path().join("target"),
        _tmp: tmp,
    };
    for d in [&t.base, &t.local, &t.vendor] {
        fs::create_dir(d).unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    t
}

fn put(root: &Path, rel: &str, content: &[u8], mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn put_all(t: &Trees, rel: &str, content: &[u8]) {
    for r in [&t.base, &t.local, &t.vendor] {
        put(r, rel, content, 0o644);
    }
}

/// Target = copy of vendor (what the snapshot of the new orig gives).
fn merge(t: &Trees) -> MergeReport {
    if let Some(v) = read_entry(&t.vendor).unwrap() {
        copy_node(&v, &t.target).unwrap();
    }
    let r = merge_etc(&t.base, &t.local, &t.vendor, &t.target).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    r
}

fn read(t: &Trees, rel: &str) -> String {
    fs::read_to_string(t.target.join(rel)).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

#[test]
fn nss_files_merge_by_entry_and_keep_mode_and_owner() {
    let t = trees();
    let pw = "root:x:0:0:root:/root:/bin/sh\n";
    let sh = "root:*:19000:0:99999:7:::\n";
    put_all(&t, "passwd", pw.as_bytes());
    for r in [&t.base, &t.local, &t.vendor] {
        put(r, "shadow", sh.as_bytes(), 0o640);
        lchown(r.join("shadow"), Some(0), Some(42)).unwrap();
    }
    let alice_pw = "alice:x:1000:1000::/home/alice:/bin/sh\n";
    let alice_sh = "alice:$y$j9T$salt$hash:19500:0:99999:7:::\n";
    put(
        &t.local,
        "passwd",
        format!("{pw}{alice_pw}").as_bytes(),
        0o644,
    );
    put(
        &t.local,
        "shadow",
        format!("{sh}{alice_sh}").as_bytes(),
        0o640,
    );
    let svc_pw = "svc:x:998:998::/:/usr/sbin/nologin\n";
    let svc_sh = "svc:!:19700::::::\n";
    put(
        &t.vendor,
        "passwd",
        format!("{pw}{svc_pw}").as_bytes(),
        0o644,
    );
    put(
        &t.vendor,
        "shadow",
        format!("{sh}{svc_sh}").as_bytes(),
        0o640,
    );
    let r = merge(&t);
    assert!(r.is_clean(), "{:?}", r.conflicts);
    assert_eq!(read(&t, "passwd"), format!("{pw}{svc_pw}{alice_pw}"));
    assert_eq!(read(&t, "shadow"), format!("{sh}{svc_sh}{alice_sh}"));
    assert_eq!(mode(&t.target.join("shadow")), 0o640);
    assert_eq!(fs::metadata(t.target.join("shadow")).unwrap().gid(), 42);
    assert!(!exists(&t.target.join("shadow.deploy-local")));
    assert_eq!(r.merged, ["passwd", "shadow"]);
}

#[test]
fn nss_uid_collision_is_a_reported_conflict_and_drops_the_shadow_line() {
    let t = trees();
    put_all(&t, "passwd", b"root:x:0:0::/root:/bin/sh\n");
    put_all(&t, "shadow", b"root:*:1::::::\n");
    put(
        &t.local,
        "passwd",
        b"root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/h:/bin/sh\n",
        0o644,
    );
    put(
        &t.local,
        "shadow",
        b"root:*:1::::::\nalice:$6$x:2::::::\n",
        0o644,
    );
    put(
        &t.vendor,
        "passwd",
        b"root:x:0:0::/root:/bin/sh\nsvc:x:1000:1000::/:/bin/false\n",
        0o644,
    );
    put(
        &t.vendor,
        "shadow",
        b"root:*:1::::::\nsvc:!:3::::::\n",
        0o644,
    );
    let r = merge(&t);
    assert_eq!(r.conflicts.len(), 1, "{:?}", r.conflicts);
    assert_eq!(r.conflicts[0].path, "passwd");
    assert!(r.conflicts[0].reason.contains("uid 1000 of svc"));
    assert!(!read(&t, "passwd").contains("svc"));
    assert!(!read(&t, "shadow").contains("svc"));
    assert!(read(&t, "shadow").contains("alice:$6$x"));
}

#[test]
fn user_change_is_kept() {
    let t = trees();
    put_all(&t, "a.conf", b"a=1\n");
    put_all(&t, "same.conf", b"x\n");
    put(&t.local, "a.conf", b"a=2\n", 0o644);
    let r = merge(&t);
    assert_eq!(read(&t, "a.conf"), "a=2\n");
    assert_eq!(read(&t, "same.conf"), "x\n");
    assert_eq!(r.carried, ["a.conf"]);
    assert!(r.merged.is_empty() && r.is_clean());
    let (lm, tm) = (
        fs::metadata(t.local.join("a.conf")).unwrap(),
        fs::metadata(t.target.join("a.conf")).unwrap(),
    );
    assert_eq!((lm.mtime(), lm.mtime_nsec()), (tm.mtime(), tm.mtime_nsec()));
}

#[test]
fn vendor_change_is_taken() {
    let t = trees();
    put_all(&t, "a.conf", b"a=1\n");
    put(&t.vendor, "a.conf", b"a=3\n", 0o600);
    let r = merge(&t);
    assert_eq!(read(&t, "a.conf"), "a=3\n");
    assert_eq!(mode(&t.target.join("a.conf")), 0o600);
    assert!(r.carried.is_empty() && r.merged.is_empty() && r.is_clean());
}

#[test]
fn both_changed_different_lines_are_merged() {
    let t = trees();
    put_all(&t, "ssh/sshd_config", b"1\n2\n3\n4\n5\n");
    put(&t.local, "ssh/sshd_config", b"one\n2\n3\n4\n5\n", 0o644);
    put(&t.vendor, "ssh/sshd_config", b"1\n2\n3\n4\nfive\n", 0o640);
    let r = merge(&t);
    assert_eq!(read(&t, "ssh/sshd_config"), "one\n2\n3\n4\nfive\n");
    assert_eq!(mode(&t.target.join("ssh/sshd_config")), 0o640);
    assert_eq!(r.merged, ["ssh/sshd_config"]);
    assert!(r.carried.is_empty() && r.is_clean());
    let leftovers: Vec<_> = fs::read_dir(t.target.join("ssh"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn both_changed_same_line_conflict_saves_local_copy() {
    let t = trees();
    put_all(&t, "ssh/sshd_config", b"Port 22\nX 1\n");
    put(&t.local, "ssh/sshd_config", b"Port 2222\nX 1\n", 0o600);
    put(&t.vendor, "ssh/sshd_config", b"Port 22022\nX 1\n", 0o644);
    let r = merge(&t);
    assert_eq!(read(&t, "ssh/sshd_config"), "Port 22022\nX 1\n");
    assert_eq!(mode(&t.target.join("ssh/sshd_config")), 0o644);
    assert_eq!(read(&t, "ssh/sshd_config.deploy-local"), "Port 2222\nX 1\n");
    assert_eq!(mode(&t.target.join("ssh/sshd_config.deploy-local")), 0o600);
    assert_eq!(r.conflicts.len(), 1);
    let c = &r.conflicts[0];
    assert_eq!(c.path, "ssh/sshd_config");
    assert_eq!(
        c.local_copy.as_deref(),
        Some("ssh/sshd_config.deploy-local")
    );
    assert!(c.reason.contains("conflicting lines"), "{}", c.reason);
    assert!(r.carried.is_empty() && r.merged.is_empty());
}

#[test]
fn user_deleted_file_stays_deleted() {
    let t = trees();
    put_all(&t, "motd", b"hello\n");
    fs::remove_file(t.local.join("motd")).unwrap();
    let r = merge(&t);
    assert!(!exists(&t.target.join("motd")));
    assert_eq!(r.carried, ["motd"]);
}

#[test]
fn new_vendor_file_appears() {
    let t = trees();
    put(&t.vendor, "new/vendor.conf", b"v\n", 0o644);
    let r = merge(&t);
    assert_eq!(read(&t, "new/vendor.conf"), "v\n");
    assert!(r.carried.is_empty() && r.merged.is_empty() && r.is_clean());
}

#[test]
fn user_added_file_and_directory_are_carried() {
    let t = trees();
    put_all(&t, "a.conf", b"a\n");
    put(&t.local, "new.conf", b"n\n", 0o640);
    lchown(t.local.join("new.conf"), Some(12), Some(34)).unwrap();
    copy::testing::set_xattr(&t.local.join("new.conf"), "user.test", b"val").unwrap();
    put(&t.local, "newdir/sub/x.conf", b"x\n", 0o600);
    fs::set_permissions(t.local.join("newdir"), fs::Permissions::from_mode(0o700)).unwrap();
    symlink("sub/x.conf", t.local.join("newdir/link")).unwrap();
    let r = merge(&t);
    assert_eq!(read(&t, "new.conf"), "n\n");
    let md = fs::metadata(t.target.join("new.conf")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o640, 12, 34));
    assert_eq!(
        read_xattrs(&t.target.join("new.conf"))
            .unwrap()
            .get(b"user.test".as_slice()),
        Some(&b"val".to_vec())
    );
    assert_eq!(read(&t, "newdir/sub/x.conf"), "x\n");
    assert_eq!(mode(&t.target.join("newdir")), 0o700);
    assert_eq!(
        fs::read_link(t.target.join("newdir/link")).unwrap(),
        Path::new("sub/x.conf")
    );
    let lm = fs::metadata(t.local.join("newdir")).unwrap();
    let tm = fs::metadata(t.target.join("newdir")).unwrap();
    assert_eq!(lm.mtime(), tm.mtime());
    assert_eq!(r.carried, ["new.conf", "newdir"]);
}

#[test]
fn symlink_retarget_is_carried() {
    let t = trees();
    for r in [&t.base, &t.local, &t.vendor] {
        symlink("/usr/share/zoneinfo/UTC", r.join("localtime")).unwrap();
        symlink("a", r.join("vlink")).unwrap();
    }
    fs::remove_file(t.local.join("localtime")).unwrap();
    symlink(
        "/usr/share/zoneinfo/Europe/Paris",
        t.local.join("localtime"),
    )
    .unwrap();
    fs::remove_file(t.vendor.join("vlink")).unwrap();
    symlink("b", t.vendor.join("vlink")).unwrap();
    let r = merge(&t);
    assert_eq!(
        fs::read_link(t.target.join("localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/Europe/Paris")
    );
    assert_eq!(
        fs::read_link(t.target.join("vlink")).unwrap(),
        Path::new("b")
    );
    assert_eq!(r.carried, ["localtime"]);
    assert!(r.is_clean());
}

#[test]
fn mode_change_is_carried() {
    let t = trees();
    put_all(&t, "only-mode", b"m\n");
    put_all(&t, "mode-and-vendor-content", b"1\n");
    put_all(&t, "suid", b"s\n");
    fs::set_permissions(t.local.join("only-mode"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(
        t.local.join("mode-and-vendor-content"),
        fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    put(&t.vendor, "mode-and-vendor-content", b"2\n", 0o644);
    fs::set_permissions(t.local.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    lchown(t.local.join("suid"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(t.local.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    let r = merge(&t);
    assert_eq!(mode(&t.target.join("only-mode")), 0o600);
    assert_eq!(mode(&t.target.join("mode-and-vendor-content")), 0o700);
    assert_eq!(read(&t, "mode-and-vendor-content"), "2\n");
    assert_eq!(mode(&t.target.join("suid")), 0o4755);
    assert_eq!(fs::metadata(t.target.join("suid")).unwrap().uid(), 1000);
    assert_eq!(r.carried, ["only-mode", "suid"]);
    assert_eq!(r.merged, ["mode-and-vendor-content"]);
}

#[test]
fn owner_change_is_carried() {
    let t = trees();
    put_all(&t, "a.conf", b"a\n");
    fs::create_dir(t.base.join("d")).unwrap();
    fs::create_dir(t.local.join("d")).unwrap();
    fs::create_dir(t.vendor.join("d")).unwrap();
    lchown(t.local.join("a.conf"), Some(1000), Some(2000)).unwrap();
    lchown(t.local.join("d"), Some(3000), Some(3000)).unwrap();
    let r = merge(&t);
    let md = fs::metadata(t.target.join("a.conf")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 2000));
    assert_eq!(fs::metadata(t.target.join("d")).unwrap().uid(), 3000);
    assert_eq!(r.carried, ["a.conf", "d"]);
}

#[test]
fn xattr_change_is_carried() {
    let t = trees();
    put_all(&t, "a.conf", b"a\n");
    copy::testing::set_xattr(&t.base.join("a.conf"), "user.gone", b"1").unwrap();
    copy::testing::set_xattr(&t.vendor.join("a.conf"), "user.gone", b"1").unwrap();
    copy::testing::set_xattr(&t.local.join("a.conf"), "user.new", b"2").unwrap();
    let r = merge(&t);
    let x = read_xattrs(&t.target.join("a.conf")).unwrap();
    assert_eq!(
        x.keys().cloned().collect::<Vec<_>>(),
        [b"user.new".to_vec()]
    );
    assert_eq!(r.carried, ["a.conf"]);
}

#[test]
fn user_deleted_vendor_changed_is_a_conflict() {
    let t = trees();
    put_all(&t, "a.conf", b"a\n");
    fs::remove_file(t.local.join("a.conf")).unwrap();
    put(&t.vendor, "a.conf", b"b\n", 0o644);
    let r = merge(&t);
    assert_eq!(read(&t, "a.conf"), "b\n");
    assert_eq!(r.conflicts.len(), 1);
    assert_eq!(
        r.conflicts[0].reason,
        "deleted locally, changed by the new version"
    );
    assert_eq!(r.conflicts[0].local_copy, None);
    assert!(!exists(&t.target.join("a.conf.deploy-local")));
}

#[test]
fn vendor_deleted_user_changed_is_a_conflict() {
    let t = trees();
    put_all(&t, "a.conf", b"a\n");
    put(&t.local, "a.conf", b"mine\n", 0o600);
    fs::remove_file(t.vendor.join("a.conf")).unwrap();
    let r = merge(&t);
    assert!(!exists(&t.target.join("a.conf")));
    assert_eq!(read(&t, "a.conf.deploy-local"), "mine\n");
    assert_eq!(mode(&t.target.join("a.conf.deploy-local")), 0o600);
    let c = &r.conflicts[0];
    assert!(
        c.reason.contains("deleted by the new version"),
        "{}",
        c.reason
    );
    assert_eq!(c.local_copy.as_deref(), Some("a.conf.deploy-local"));
}

#[test]
fn binary_changed_on_both_sides_is_a_conflict() {
    let t = trees();
    put_all(&t, "ld.so.cache", b"\0\x01base\n1\n2\n3\n");
    put(&t.local, "ld.so.cache", b"\0\x01local\n1\n2\n3\n", 0o644);
    put(
        &t.vendor,
        "ld.so.cache",
        b"\0\x01base\n1\n2\nvendor\n",
        0o644,
    );
    let r = merge(&t);
    assert_eq!(
        fs::read(t.target.join("ld.so.cache")).unwrap(),
        b"\0\x01base\n1\n2\nvendor\n"
    );
    assert_eq!(
        fs::read(t.target.join("ld.so.cache.deploy-local")).unwrap(),
        b"\0\x01local\n1\n2\n3\n"
    );
    assert!(
        r.conflicts[0].reason.contains("binary"),
        "{}",
        r.conflicts[0].reason
    );
}

#[test]
fn both_made_the_same_change_reports_nothing() {
    let t = trees();
    put_all(&t, "a.conf", b"a\n");
    put(&t.local, "a.conf", b"b\n", 0o644);
    put(&t.vendor, "a.conf", b"b\n", 0o644);
    let r = merge(&t);
    assert_eq!(read(&t, "a.conf"), "b\n");
    assert!(r.carried.is_empty() && r.merged.is_empty() && r.is_clean());
}

#[test]
fn mode_changed_on_both_sides_differently_is_a_conflict() {
    let t = trees();
    put_all(&t, "a.conf", b"a\n");
    fs::set_permissions(t.local.join("a.conf"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(t.vendor.join("a.conf"), fs::Permissions::from_mode(0o640)).unwrap();
    let r = merge(&t);
    assert_eq!(mode(&t.target.join("a.conf")), 0o640);
    assert_eq!(mode(&t.target.join("a.conf.deploy-local")), 0o600);
    assert!(
        r.conflicts[0]
            .reason
            .contains("mode changed locally (0600)"),
        "{}",
        r.conflicts[0].reason
    );
}

#[test]
fn type_changes() {
    let t = trees();
    // user: file -> symlink, vendor unchanged: carried
    put_all(&t, "resolv.conf", b"nameserver 1.1.1.1\n");
    fs::remove_file(t.local.join("resolv.conf")).unwrap();
    symlink("/run/resolv.conf", t.local.join("resolv.conf")).unwrap();
    // user: file -> dir, vendor: file -> symlink: conflict, dir reported only
    put_all(&t, "x", b"x\n");
    fs::remove_file(t.local.join("x")).unwrap();
    put(&t.local, "x/inner", b"i\n", 0o644);
    fs::remove_file(t.vendor.join("x")).unwrap();
    symlink("elsewhere", t.vendor.join("x")).unwrap();
    // user: dir -> file, vendor changed inside the dir: conflict, local file saved
    put_all(&t, "d/f", b"1\n");
    fs::remove_dir_all(t.local.join("d")).unwrap();
    put(&t.local, "d", b"now a file\n", 0o644);
    put(&t.vendor, "d/f", b"2\n", 0o644);
    // user deleted a whole dir the vendor left alone: deleted
    put_all(&t, "gone/f", b"1\n");
    fs::remove_dir_all(t.local.join("gone")).unwrap();
    let r = merge(&t);
    assert_eq!(
        fs::read_link(t.target.join("resolv.conf")).unwrap(),
        Path::new("/run/resolv.conf")
    );
    assert_eq!(
        fs::read_link(t.target.join("x")).unwrap(),
        Path::new("elsewhere")
    );
    assert!(!exists(&t.target.join("x.deploy-local")));
    assert_eq!(read(&t, "d/f"), "2\n");
    assert_eq!(read(&t, "d.deploy-local"), "now a file\n");
    assert!(!exists(&t.target.join("gone")));
    assert_eq!(r.carried, ["gone", "resolv.conf"]);
    let paths: Vec<_> = r
        .conflicts
        .iter()
        .map(|c| (c.path.as_str(), c.local_copy.as_deref()))
        .collect();
    assert_eq!(paths, [("d", Some("d.deploy-local")), ("x", None)]);
    assert!(
        r.conflicts[1].reason.contains("into a directory"),
        "{}",
        r.conflicts[1].reason
    );
}

#[test]
fn changed_inside_a_dir_the_vendor_removed_is_a_conflict() {
    let t = trees();
    put_all(&t, "old.d/a", b"1\n");
    put(&t.local, "old.d/a", b"2\n", 0o644);
    fs::remove_dir_all(t.vendor.join("old.d")).unwrap();
    let r = merge(&t);
    assert!(!exists(&t.target.join("old.d")));
    assert_eq!(r.conflicts.len(), 1);
    assert_eq!(r.conflicts[0].path, "old.d");
    assert!(r.conflicts[0].reason.contains("deleted by the new version"));
}

#[test]
fn existing_local_copy_name_is_not_overwritten() {
    let t = trees();
    put_all(&t, "a.conf", b"base\n");
    put(&t.local, "a.conf", b"local\n", 0o644);
    put(&t.vendor, "a.conf", b"vendor\n", 0o644);
    // left over from an earlier upgrade: a user-added file, carried
    put(&t.local, "a.conf.deploy-local", b"older\n", 0o644);
    let r = merge(&t);
    assert_eq!(read(&t, "a.conf.deploy-local"), "older\n");
    assert_eq!(read(&t, "a.conf.deploy-local.2"), "local\n");
    assert_eq!(
        r.conflicts[0].local_copy.as_deref(),
        Some("a.conf.deploy-local.2")
    );
    assert_eq!(r.carried, ["a.conf.deploy-local"]);
}

#[test]
fn missing_trees_are_empty() {
    // no base: local and vendor both added things
    let t = trees();
    fs::remove_dir(&t.base).unwrap();
    put(&t.local, "mine", b"m\n", 0o644);
    put(&t.local, "both", b"l\n", 0o644);
    put(&t.vendor, "both", b"v\n", 0o644);
    put(&t.vendor, "theirs", b"t\n", 0o644);
    let r = merge(&t);
    assert_eq!(read(&t, "mine"), "m\n");
    assert_eq!(read(&t, "both"), "v\n");
    assert_eq!(read(&t, "both.deploy-local"), "l\n");
    assert_eq!(read(&t, "theirs"), "t\n");
    assert_eq!(r.carried, ["mine"]);
    assert_eq!(r.conflicts.len(), 1);

    // no vendor tree (and no target): user additions are carried, a target is created
    let t = trees();
    fs::remove_dir(&t.vendor).unwrap();
    put(&t.local, "mine", b"m\n", 0o644);
    let r = merge(&t);
    assert_eq!(read(&t, "mine"), "m\n");
    assert_eq!(r.carried, ["mine"]);

    // nothing anywhere: no target is left behind
    let t = trees();
    for d in [&t.base, &t.local, &t.vendor] {
        fs::remove_dir(d).unwrap();
    }
    let r = merge_etc(&t.base, &t.local, &t.vendor, &t.target).unwrap();
    assert!(r.carried.is_empty() && r.is_clean());
    assert!(!exists(&t.target));
}

#[test]
fn root_that_is_not_a_directory_is_an_error() {
    let t = trees();
    fs::remove_dir(&t.local).unwrap();
    fs::write(&t.local, b"").unwrap();
    let err = merge_etc(&t.base, &t.local, &t.vendor, &t.target).unwrap_err();
    assert!(format!("{err:#}").contains("is not a directory"), "{err:#}");
}

// --- line merge ------------------------------------------------------

fn clean(base: &str, local: &str, vendor: &str) -> String {
    match merge_lines(base.as_bytes(), local.as_bytes(), vendor.as_bytes()) {
        LineMerge::Clean(b) => String::from_utf8(b).unwrap(),
        other => panic!("expected a clean merge, got {other:?}"),
    }
}

fn hunks(base: &str, local: &str, vendor: &str) -> usize {
    match merge_lines(base.as_bytes(), local.as_bytes(), vendor.as_bytes()) {
        LineMerge::Conflict { hunks } => hunks,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[test]
fn line_merge_disjoint_changes() {
    assert_eq!(
        clean("a\nb\nc\nd\ne\n", "A\nb\nc\nd\ne\n", "a\nb\nc\nd\nE\n"),
        "A\nb\nc\nd\nE\n"
    );
    // insertion at the start by one side, at the end by the other
    assert_eq!(
        clean("a\nb\n", "top\na\nb\n", "a\nb\nend\n"),
        "top\na\nb\nend\n"
    );
    // deletion on one side, change elsewhere on the other
    assert_eq!(
        clean("a\nb\nc\nd\ne\n", "a\nc\nd\ne\n", "a\nb\nc\nd\nE\n"),
        "a\nc\nd\nE\n"
    );
    // the same change on both sides is taken once
    assert_eq!(clean("a\nb\nc\n", "a\nX\nc\n", "a\nX\nc\n"), "a\nX\nc\n");
    // one side unchanged
    assert_eq!(clean("a\nb\n", "a\nb\n", "z\n"), "z\n");
    assert_eq!(clean("a\nb\n", "z\n", "a\nb\n"), "z\n");
    // both deleted the same line and one changed another
    assert_eq!(clean("a\nb\nc\nd\n", "a\nc\nD\n", "a\nc\nd\n"), "a\nc\nD\n");
}

#[test]
fn line_merge_final_newline() {
    assert_eq!(clean("a\nb\nc", "A\nb\nc", "a\nb\nc\n"), "A\nb\nc\n");
    assert_eq!(clean("", "", ""), "");
    assert_eq!(clean("", "x\n", "x\n"), "x\n");
}

#[test]
fn line_merge_conflicts() {
    assert_eq!(hunks("a\nb\nc\n", "a\nL\nc\n", "a\nV\nc\n"), 1);
    // adjacent changes conflict (as in diff3 and git)
    assert_eq!(hunks("a\nb\nc\nd\n", "a\nB\nc\nd\n", "a\nb\nC\nd\n"), 1);
    // delete vs modify
    assert_eq!(hunks("a\nb\nc\n", "a\nc\n", "a\nB\nc\n"), 1);
    // two separate conflicts
    assert_eq!(
        hunks("1\n2\n3\n4\n5\n", "L\n2\n3\n4\nL\n", "V\n2\n3\n4\nV\n"),
        2
    );
    // different insertions at the same place
    assert_eq!(hunks("a\nb\n", "a\nL\nb\n", "a\nV\nb\n"), 1);
    // both added different files
    assert_eq!(hunks("", "l\n", "v\n"), 1);
}

/// Tiny deterministic generator for property tests.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as u32
    }
    fn seq(&mut self, max_len: u32, alphabet: u32) -> Vec<u32> {
        let len = self.next(max_len + 1);
        (0..len).map(|_| self.next(alphabet)).collect()
    }
}

fn lcs_len(a: &[u32], b: &[u32]) -> usize {
    let mut dp = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            dp[i][j] = if a[i] == b[j] {
                dp[i + 1][j + 1] + 1
            } else {
                dp[i + 1][j].max(dp[i][j + 1])
            };
        }
    }
    dp[0][0]
}

#[test]
fn myers_finds_a_longest_common_subsequence() {
    let (a, b) = ([0, 1, 2, 0, 1, 1, 0], [2, 1, 0, 1, 0, 2]); // ABCABBA / CBABAC
    assert_eq!(myers_pairs(&a, &b).len(), 4);
    let mut rng = Lcg(42);
    for _ in 0..2000 {
        let (a, b) = (rng.seq(12, 4), rng.seq(12, 4));
        let pairs = myers_pairs(&a, &b);
        assert_eq!(pairs.len(), lcs_len(&a, &b), "{a:?} {b:?}");
        for w in pairs.windows(2) {
            assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1);
        }
        assert!(pairs.iter().all(|&(x, y)| a[x] == b[y]));
        let blocks = matching_blocks(&a, &b);
        assert_eq!(blocks.iter().map(|b| b.2).sum::<usize>(), pairs.len());
    }
}

#[test]
fn line_merge_with_one_side_unchanged_gives_the_other() {
    let mut rng = Lcg(7);
    let text = |s: &[u32]| s.iter().map(|x| format!("l{x}\n")).collect::<String>();
    for _ in 0..1000 {
        let (base, other) = (text(&rng.seq(10, 5)), text(&rng.seq(10, 5)));
        assert_eq!(clean(&base, &base, &other), other);
        assert_eq!(clean(&base, &other, &base), other);
        assert_eq!(clean(&base, &other, &other), other);
    }
}

#[test]
fn line_merge_of_edits_in_separate_halves_is_clean() {
    let mut rng = Lcg(99);
    for round in 0..300 {
        let n = 4 + rng.next(30) as usize;
        let base: Vec<String> = (0..n).map(|i| format!("b{i}\n")).collect();
        let half = n / 2;
        // edit lines strictly before half-1 locally, strictly after half by the vendor
        let edit = |rng: &mut Lcg, lines: &[String], range: std::ops::Range<usize>, tag: &str| {
            let mut out = Vec::new();
            for (i, l) in lines.iter().enumerate() {
                if range.contains(&i) {
                    match rng.next(4) {
                        0 => {}
                        1 => out.push(format!("{tag}{round}-{i}\n")),
                        2 => {
                            out.push(l.clone());
                            out.push(format!("{tag}+{round}-{i}\n"));
                        }
                        _ => out.push(l.clone()),
                    }
                } else {
                    out.push(l.clone());
                }
            }
            out
        };
        let local = edit(&mut rng, &base, 0..half - 1, "L");
        let vendor = edit(&mut rng, &base, half + 1..n, "V");
        // expected: local's lines up to the untouched b{half-1}, then vendor's from it on
        let cut = format!("b{}\n", half - 1);
        let lpos = local.iter().position(|l| *l == cut).unwrap();
        let vpos = vendor.iter().position(|l| *l == cut).unwrap();
        let expected = local[..lpos].concat() + &vendor[vpos..].concat();
        let (b, l, v) = (base.concat(), local.concat(), vendor.concat());
        assert_eq!(
            clean(&b, &l, &v),
            expected,
            "base {b:?} local {l:?} vendor {v:?}"
        );
    }
}

#[test]
fn huge_rewrite_gives_up_on_common_lines() {
    let a: Vec<u32> = (0..3000).collect();
    let b: Vec<u32> = (3000..6000).collect();
    assert!(myers_pairs(&a, &b).is_empty());
    let mut c = a.clone();
    c[1500] = 99999;
    assert_eq!(myers_pairs(&a, &c).len(), 2999);
}
