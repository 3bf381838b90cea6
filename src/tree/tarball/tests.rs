//! Archives are made with GNU tar (as root: owners, devices, trusted xattrs).

use super::*;
use crate::tree::copy::sys::Target;
use crate::tree::copy::testing::{assert_trees_equal, make_test_tree, pseudo_random};
use crate::tree::copy::NoSpaceError;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

/// A source tree like a rootfs, without the socket (tar cannot store one).
fn source(t: &tempfile::TempDir) -> PathBuf {
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_test_tree(&src).unwrap();
    let run = src.join("run");
    let m = std::fs::symlink_metadata(&run).unwrap();
    std::fs::remove_file(run.join("socket")).unwrap();
    crate::tree::copy::testing::set_times(
        &run,
        (m.atime(), m.atime_nsec()),
        (m.mtime(), m.mtime_nsec()),
    )
    .unwrap();
    src
}

/// `tar --xattrs --xattrs-include='*' --numeric-owner -cpf ARCHIVE EXTRA -C SRC .`
fn tar_c(src: &Path, archive: &Path, extra: &[&str]) {
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-cpf"])
        .arg(archive)
        .args(extra)
        .arg("-C")
        .arg(src)
        .arg(".")
        .output()
        .expect("running tar");
    assert!(
        out.status.success(),
        "tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn new_dir(t: &tempfile::TempDir, name: &str) -> PathBuf {
    let d = t.path().join(name);
    std::fs::create_dir(&d).unwrap();
    d
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().ino()
}

fn check_variant(name: &str, flags: &[&str]) {
    let t = tempfile::tempdir().unwrap();
    let src = source(&t);
    let archive = t.path().join(name);
    tar_c(&src, &archive, flags);
    assert!(is_tarball(&archive), "{name} not recognised");
    let dst = new_dir(&t, "dst");
    let progress = Progress::default();
    let stats = extract(&archive, &dst, Some(&progress)).unwrap();
    assert_trees_equal(&src, &dst);
    // 15 regular files, 3 more names of hard-linked ones, 3 devices + a FIFO, 5 symlinks.
    assert_eq!(stats.files, 15, "{name}: {stats:?}");
    assert_eq!(stats.hardlinks, 3, "{name}: {stats:?}");
    assert_eq!(stats.specials, 3, "{name}: {stats:?}");
    assert_eq!(stats.symlinks, 5, "{name}: {stats:?}");
    assert_eq!(stats.dirs, 24, "{name}: {stats:?}");
    assert_eq!(progress.bytes.load(Ordering::Relaxed), stats.bytes);
    assert_eq!(
        progress.entries.load(Ordering::Relaxed),
        15 + 3 + 3 + 5 + 24 + 1
    );
    assert_eq!(
        ino(&dst.join("usr/bin/perl")),
        ino(&dst.join("usr/share/doc/perl-copy"))
    );
    let su = std::fs::metadata(dst.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    // Runs of zeros become holes.
    let sparse = std::fs::metadata(dst.join("var/sparse.img")).unwrap();
    assert_eq!(sparse.len(), 16 << 20);
    assert!(sparse.blocks() * 512 < 1 << 20, "{name}: not sparse");
}

#[test]
fn extracts_plain_tar_with_everything_preserved() {
    check_variant("rootfs.tar", &[]);
}

#[test]
fn extracts_gzip() {
    check_variant("rootfs.tar.gz", &["-z"]);
}

#[test]
fn extracts_zstd() {
    check_variant("rootfs.tar.zst", &["--zstd"]);
}

#[test]
fn extracts_xz() {
    check_variant("rootfs.tar.xz", &["-J"]);
}

#[test]
fn extracts_pax_sparse_files() {
    let t = tempfile::tempdir().unwrap();
    let src = source(&t);
    // Data after a hole, a hole at the start, and a file that ends in data.
    let f = std::fs::File::create(src.join("var/holes")).unwrap();
    f.write_all_at(&pseudo_random(10_000, 3), 5 << 20).unwrap();
    f.write_all_at(b"end", (9 << 20) - 3).unwrap();
    drop(f);
    crate::tree::copy::testing::set_times(&src.join("var/holes"), (1, 0), (2, 3)).unwrap();
    let var = std::fs::symlink_metadata(src.join("var")).unwrap();
    crate::tree::copy::testing::set_times(&src.join("var"), (1, 0), (var.mtime(), 0)).unwrap();
    let archive = t.path().join("sparse.tar");
    tar_c(&src, &archive, &["-S"]);
    let dst = new_dir(&t, "dst");
    extract(&archive, &dst, None).unwrap();
    assert_trees_equal(&src, &dst);
    let holes = std::fs::metadata(dst.join("var/holes")).unwrap();
    assert_eq!(holes.len(), 9 << 20);
    assert!(holes.blocks() * 512 < 1 << 20);
}

#[test]
fn content_size_counts_file_blocks_once() {
    let t = tempfile::tempdir().unwrap();
    let src = source(&t);
    let mut expected = 0u64;
    let mut seen = std::collections::HashSet::new();
    let out = Command::new("find")
        .arg(&src)
        .args(["-type", "f", "-printf", "%i %s\\n"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (inode, size) = line.split_once(' ').unwrap();
        if seen.insert(inode.to_string()) {
            expected += size.parse::<u64>().unwrap().div_ceil(4096) * 4096;
        }
    }
    for (name, flags) in [("a.tar", &[][..]), ("a.tar.zst", &["--zstd"][..])] {
        let archive = t.path().join(name);
        tar_c(&src, &archive, flags);
        assert_eq!(content_size(&archive).unwrap(), expected, "{name}");
    }
    // Escaping paths are refused at planning time already.
    let work = new_dir(&t, "work");
    std::fs::create_dir(work.join("sub")).unwrap();
    std::fs::write(work.join("escape"), b"evil").unwrap();
    let evil = t.path().join("evil.tar.gz");
    tar_in(
        &work.join("sub"),
        &["-P", "-czf", evil.to_str().unwrap(), "../escape"],
    );
    let err = content_size(&evil).unwrap_err();
    assert!(format!("{err:#}").contains("contains `..`"), "{err:#}");
}

#[test]
fn recognises_archives_by_name_and_content() {
    let t = tempfile::tempdir().unwrap();
    let src = source(&t);
    let disguised = t.path().join("rootfs.img");
    tar_c(&src, &disguised, &["--zstd"]);
    assert!(is_tarball(&disguised));
    let plain = t.path().join("rootfs.bin");
    tar_c(&src, &plain, &[]);
    assert!(is_tarball(&plain));
    let other = t.path().join("notes.txt");
    std::fs::write(&other, b"hello").unwrap();
    assert!(!is_tarball(&other));
    let dir = new_dir(&t, "x.tar");
    assert!(!is_tarball(&dir));
    assert!(!is_tarball(&t.path().join("missing.tar")));
    let err = extract(&other, &new_dir(&t, "dst"), None).unwrap_err();
    assert!(
        format!("{err:#}").contains("is not a tar archive"),
        "{err:#}"
    );
}

/// Runs `tar ARGS` in `dir`, asserting success.
fn tar_in(dir: &Path, args: &[&str]) {
    let out = Command::new("tar")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Extracts `archive` into a fresh `dst` beside a sibling `outside` dir;
/// asserts the error mentions `needle` and nothing appeared in `outside`.
fn assert_refused(t: &tempfile::TempDir, archive: &Path, needle: &str) {
    let base = new_dir(t, "target-base");
    let dst = base.join("dst");
    std::fs::create_dir(&dst).unwrap();
    let err = extract(archive, &dst, None).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(needle), "{msg}");
    let outside: Vec<_> = std::fs::read_dir(t.path().join("outside"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(outside.is_empty(), "written outside: {outside:?}");
    assert!(!base.join("escape").exists());
}

#[test]
fn refuses_dotdot_entries() {
    let t = tempfile::tempdir().unwrap();
    new_dir(&t, "outside");
    let work = new_dir(&t, "work");
    std::fs::create_dir(work.join("sub")).unwrap();
    std::fs::write(work.join("escape"), b"evil").unwrap();
    let archive = t.path().join("evil.tar");
    // -P keeps the leading "../" that GNU tar would strip.
    tar_in(
        &work.join("sub"),
        &["-P", "-cf", archive.to_str().unwrap(), "../escape"],
    );
    assert_refused(&t, &archive, "contains `..`");
}

#[test]
fn refuses_absolute_entries() {
    let t = tempfile::tempdir().unwrap();
    let outside = new_dir(&t, "outside");
    std::fs::write(outside.join("abs"), b"evil").unwrap();
    let archive = t.path().join("abs.tar");
    tar_in(
        t.path(),
        &[
            "-P",
            "-cf",
            archive.to_str().unwrap(),
            outside.join("abs").to_str().unwrap(),
        ],
    );
    std::fs::remove_file(outside.join("abs")).unwrap();
    assert_refused(&t, &archive, "is an absolute path");
}

#[test]
fn refuses_to_write_through_a_symlink() {
    let t = tempfile::tempdir().unwrap();
    let outside = new_dir(&t, "outside");
    // First member: link -> the outside directory; then link/file.
    let a = new_dir(&t, "a");
    std::os::unix::fs::symlink(&outside, a.join("link")).unwrap();
    let archive = t.path().join("through.tar");
    tar_in(&a, &["-cf", archive.to_str().unwrap(), "link"]);
    let b = new_dir(&t, "b");
    std::fs::create_dir(b.join("link")).unwrap();
    std::fs::write(b.join("link/file"), b"evil").unwrap();
    tar_in(&b, &["-rf", archive.to_str().unwrap(), "link/file"]);
    assert_refused(&t, &archive, "is a symlink: refusing to write through it");
}

#[test]
fn refuses_hard_link_through_a_symlink() {
    let t = tempfile::tempdir().unwrap();
    let outside = new_dir(&t, "outside");
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    let a = new_dir(&t, "a");
    std::os::unix::fs::symlink(&outside, a.join("link")).unwrap();
    let archive = t.path().join("hl.tar");
    tar_in(&a, &["-cf", archive.to_str().unwrap(), "link"]);
    // A hard link whose target is link/secret.
    let b = new_dir(&t, "b");
    std::fs::create_dir(b.join("link")).unwrap();
    std::fs::write(b.join("link/secret"), b"x").unwrap();
    std::fs::hard_link(b.join("link/secret"), b.join("grab")).unwrap();
    tar_in(
        &b,
        &["-rf", archive.to_str().unwrap(), "link/secret", "grab"],
    );
    // link/secret itself is refused first; the outside file stays untouched.
    let base = new_dir(&t, "target-base");
    let dst = base.join("dst");
    std::fs::create_dir(&dst).unwrap();
    let err = extract(&archive, &dst, None).unwrap_err();
    assert!(format!("{err:#}").contains("symlink"), "{err:#}");
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
    assert_eq!(
        std::fs::metadata(outside.join("secret")).unwrap().nlink(),
        1
    );
}

#[test]
fn later_members_replace_earlier_ones() {
    let t = tempfile::tempdir().unwrap();
    let a = new_dir(&t, "a");
    std::fs::write(a.join("f"), b"old").unwrap();
    let archive = t.path().join("dup.tar");
    tar_in(&a, &["-cf", archive.to_str().unwrap(), "f"]);
    std::fs::remove_file(a.join("f")).unwrap();
    std::os::unix::fs::symlink("target", a.join("f")).unwrap();
    tar_in(&a, &["-rf", archive.to_str().unwrap(), "f"]);
    let dst = new_dir(&t, "dst");
    extract(&archive, &dst, None).unwrap();
    assert_eq!(
        std::fs::read_link(dst.join("f")).unwrap(),
        Path::new("target")
    );
}

#[test]
fn refuses_a_non_empty_target() {
    let t = tempfile::tempdir().unwrap();
    let src = source(&t);
    let archive = t.path().join("a.tar");
    tar_c(&src, &archive, &[]);
    let dst = new_dir(&t, "dst");
    std::fs::write(dst.join("x"), b"x").unwrap();
    let err = extract(&archive, &dst, None).unwrap_err();
    assert!(format!("{err:#}").contains("is not empty"), "{err:#}");
}

#[test]
fn full_target_is_a_no_space_error() {
    let t = tempfile::tempdir().unwrap();
    let a = new_dir(&t, "a");
    std::fs::write(a.join("big"), pseudo_random(4 << 20, 9)).unwrap();
    let archive = t.path().join("big.tar.zst");
    tar_c(&a, &archive, &["--zstd"]);
    let dst = new_dir(&t, "small");
    nix::mount::mount(
        Some("tmpfs"),
        &dst,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1M"),
    )
    .expect("mounting a tmpfs (run the tests as root)");
    let err = extract(&archive, &dst, None).unwrap_err();
    let _ = nix::mount::umount2(&dst, nix::mount::MntFlags::MNT_DETACH);
    let nospace = err.chain().find_map(|e| e.downcast_ref::<NoSpaceError>());
    assert!(nospace.is_some(), "{err:#}");
    assert!(format!("{err:#}").contains("no space left"), "{err:#}");
}

/// An archive (built with the tar crate's writer) of: a directory, then
/// entries whose PAX records are given raw.
fn raw_pax_archive(path: &Path, entries: &[(&str, tar::EntryType, &[u8], &[u8])]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, kind, pax, data) in entries {
        if !pax.is_empty() {
            let mut h = tar::Header::new_ustar();
            h.set_path(format!("PaxHeaders/{name}")).unwrap();
            h.set_size(pax.len() as u64);
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_cksum();
            b.append(&h, *pax).unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(*kind);
        // Group bits of a file with an ACL are its mask (rw- below).
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o664 });
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        if kind.is_symlink() {
            h.set_link_name("harmless").unwrap();
            h.set_size(0);
        } else {
            h.set_size(data.len() as u64);
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
}

/// One PAX record: `<length> <key>=<value>\n`, the length counting itself.
fn record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len += 1;
    }
    let mut v = format!("{len} {key}=").into_bytes();
    v.extend_from_slice(value);
    v.push(b'\n');
    v
}

#[test]
fn pax_records_are_parsed_by_length() {
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("a.tar");
    let acl_text = b"user::rw-\nuser:1234:r--\ngroup::r--\ngroup:4321:rw-\nmask::rw-\nother::r--\n";
    let mut file_pax = record("SCHILY.acl.access", acl_text);
    file_pax.extend(record("SCHILY.xattr.user.multi", b"line 1\nline 2\n"));
    file_pax.extend(record("SCHILY.xattr.user.bin", &[1, 10, 10, 0, 255]));
    file_pax.extend(record("LIBARCHIVE.xattr.user.b%41se", b"YQpi"));
    // A value whose tail looks like a record: it must stay part of the
    // value, never become the entry's link target.
    let mut link_pax = record("SCHILY.xattr.trusted.trap", b"x\n22 linkpath=/etc/evil\n");
    link_pax.extend(record("mtime", b"1600000001.5"));
    let dir_acl = b"user::rwx\ngroup::r-x\nother::r-x\n";
    let mut dir_pax = record("SCHILY.acl.access", dir_acl);
    dir_pax.extend(record(
        "SCHILY.acl.default",
        b"user::rwx,user:1234:r-x,group::r-x,mask::r-x,other::---",
    ));
    raw_pax_archive(
        &archive,
        &[
            ("d", tar::EntryType::Directory, &dir_pax, b""),
            ("d/f", tar::EntryType::Regular, &file_pax, b"data"),
            ("link", tar::EntryType::Symlink, &link_pax, b""),
        ],
    );
    let dst = new_dir(&t, "dst");
    extract(&archive, &dst, None).unwrap();
    let get = |rel: &str, name: &str| {
        sys::read_xattrs(Target::path(&dst.join(rel), Kind::File))
            .unwrap()
            .into_iter()
            .find(|(n, _)| n.as_bytes() == name.as_bytes())
            .map(|(_, v)| v)
    };
    use crate::tree::copy::testing as tt;
    assert_eq!(
        get("d/f", "system.posix_acl_access").unwrap(),
        tt::posix_acl(&[
            (tt::ACL_USER_OBJ, 6, 0),
            (tt::ACL_USER, 4, 1234),
            (tt::ACL_GROUP_OBJ, 4, 0),
            (tt::ACL_GROUP, 6, 4321),
            (tt::ACL_MASK, 6, 0),
            (tt::ACL_OTHER, 4, 0),
        ])
    );
    assert_eq!(get("d/f", "user.multi").unwrap(), b"line 1\nline 2\n");
    assert_eq!(get("d/f", "user.bin").unwrap(), [1, 10, 10, 0, 255]);
    assert_eq!(get("d/f", "user.bAse").unwrap(), b"a\nb");
    assert_eq!(
        get("d", "system.posix_acl_default").unwrap(),
        tt::posix_acl(&[
            (tt::ACL_USER_OBJ, 7, 0),
            (tt::ACL_USER, 5, 1234),
            (tt::ACL_GROUP_OBJ, 5, 0),
            (tt::ACL_MASK, 5, 0),
            (tt::ACL_OTHER, 0, 0),
        ])
    );
    assert_eq!(std::fs::read(dst.join("d/f")).unwrap(), b"data");
    assert_eq!(
        std::fs::read_link(dst.join("link")).unwrap(),
        Path::new("harmless")
    );
    assert_eq!(
        get("link", "trusted.trap").unwrap(),
        b"x\n22 linkpath=/etc/evil\n"
    );
    let m = std::fs::symlink_metadata(dst.join("link")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_001, 500_000_000));
}

#[test]
fn malformed_pax_records_are_refused_naming_the_entry() {
    let t = tempfile::tempdir().unwrap();
    for (what, pax) in [
        ("length beyond the header", b"99 user.x=1\n".to_vec()),
        ("length not a number", b"1x path=a\n".to_vec()),
        ("no newline at the end", b"11 mtime=12x".to_vec()),
        ("no = sign", b"9 mtime1\n".to_vec()),
        (
            "a bad ACL",
            record("SCHILY.acl.access", b"user::rw-\nfriend:x:r--\n"),
        ),
        (
            "an ACL without other::",
            record("SCHILY.acl.access", b"user::rw-\ngroup::r--\n"),
        ),
        (
            "a bad base64 value",
            record("LIBARCHIVE.xattr.user.x", b"!!!"),
        ),
    ] {
        let archive = t.path().join("bad.tar");
        raw_pax_archive(
            &archive,
            &[
                ("etc", tar::EntryType::Directory, b"", b""),
                ("etc/victim.conf", tar::EntryType::Regular, &pax, b"data"),
            ],
        );
        let dst = t.path().join("dst");
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir(&dst).unwrap();
        let err = format!("{:#}", extract(&archive, &dst, None).unwrap_err());
        assert!(err.contains("etc/victim.conf"), "{what}: {err}");
        assert!(!dst.join("etc/victim.conf").exists(), "{what}");
    }
}

#[test]
fn acl_text_forms_and_names() {
    let users = |kind: IdKind, name: &str| match (kind, name) {
        (IdKind::User, "alice") => Ok(1001),
        (IdKind::Group, "staff") => Ok(50),
        _ => Err(anyhow!("unknown {name}")),
    };
    use crate::tree::copy::testing as tt;
    let want = tt::posix_acl(&[
        (tt::ACL_USER_OBJ, 6, 0),
        (tt::ACL_USER, 4, 1001),
        (tt::ACL_GROUP_OBJ, 4, 0),
        (tt::ACL_GROUP, 7, 50),
        (tt::ACL_MASK, 7, 0),
        (tt::ACL_OTHER, 0, 0),
    ]);
    for text in [
        // GNU tar: one a line, names, effective-rights comments.
        "user::rw-\nuser:alice:r--\ngroup::r--\ngroup:staff:rwx\t#effective:rwx\nmask::rwx\nother::---\n",
        // star / bsdtar: comma-separated, the id as a fourth field.
        "user::rw-,user:alice:r--:1001,group::r--,group:staff:rwx:50,mask::rwx,other::---",
        // Abbreviated, numeric, out of order.
        "o::-,m::rwx,g:50:rwx,g::r,u:1001:r,u::rw",
    ] {
        assert_eq!(acl_from_text(text.as_bytes(), users).unwrap(), want, "{text}");
    }
    for (text, needle) in [
        (
            "user::rw-\nuser:bob:r--\ngroup::r--\nmask::r--\nother::r--",
            "unknown bob",
        ),
        ("user::rw-\ngroup::r--\nother::rwz", "permissions"),
        ("user::rw-\nuser:1:r--\ngroup::r--\nother::r--", "no mask"),
        ("user::rw-\nother::r--", "lacks"),
        (
            "user::rw-\nuser::r--\ngroup::r--\nother::r--",
            "given twice",
        ),
        ("mask:x:rw-", "unknown tag"),
    ] {
        let err = format!("{:#}", acl_from_text(text.as_bytes(), users).unwrap_err());
        assert!(err.contains(needle), "{text}: {err}");
    }
}

/// A tree with ACLs (access and default, set by `setfacl`) and user
/// xattrs (set by `setfattr`, one holding newlines), archived by GNU tar
/// with `--acls` (text ACLs only) and `--acls --xattrs` (text and
/// binary): extracted, `getfacl` shows the same ACLs as the source.
#[test]
fn gnu_tar_acls_and_xattrs_are_applied() {
    let t = tempfile::tempdir().unwrap();
    let src = new_dir(&t, "src");
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    sh(
        "mkdir -p etc shared/sub && echo f > file && echo g > shared/sub/g \
        && printf 'root:x:0:0::/root:/bin/sh\\n' > etc/passwd \
        && setfacl -m u:1234:r,g:4321:rw,u:1000:rw file \
        && setfacl -m u:1234:rwx shared && setfacl -d -m u:1234:rx,g:4321:r,o::- shared \
        && setfacl -m u:1234:r shared/sub/g \
        && setfattr -n user.note -v \"$(printf 'two\\nlines')\" file \
        && setfattr -n user.bin -v 0x010a0a00 shared",
    );
    let acls = |dir: &Path| {
        let out = Command::new("getfacl")
            .args(["-R", "-n", "-p", "."])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let want = acls(&src);
    assert!(
        want.contains("user:1234:rwx") && want.contains("default:user:1234:r-x"),
        "{want}"
    );
    for (name, flags) in [
        ("text.tar", &["--acls"][..]),
        (
            "both.tar",
            &["--acls", "--xattrs", "--xattrs-include=*"][..],
        ),
    ] {
        let archive = t.path().join(name);
        let out = Command::new("tar")
            .args(["--numeric-owner", "-cpf"])
            .arg(&archive)
            .args(flags)
            .arg("-C")
            .arg(&src)
            .arg(".")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dst = new_dir(&t, &format!("dst-{name}"));
        extract(&archive, &dst, None).unwrap();
        assert_eq!(acls(&dst), want, "{name}");
        if name == "both.tar" {
            assert_eq!(
                sys::read_xattrs(Target::path(&dst.join("file"), Kind::File))
                    .unwrap()
                    .into_iter()
                    .find(|(n, _)| n.as_bytes() == b"user.note")
                    .map(|(_, v)| v),
                Some(b"two\nlines".to_vec())
            );
        }
    }
}

#[test]
fn parses_pax_times() {
    let t = parse_time(b"1600000000.123456789").unwrap();
    assert_eq!((t.sec, t.nsec), (1_600_000_000, 123_456_789));
    let t = parse_time(b"12.5").unwrap();
    assert_eq!((t.sec, t.nsec), (12, 500_000_000));
    let t = parse_time(b"-1.25").unwrap();
    assert_eq!((t.sec, t.nsec), (-2, 750_000_000));
    assert!(parse_time(b"x").is_err());
}
