//! Helpers for tests (unit and integration): compare two trees entry by entry,
//! and build a tree that exercises everything the copy engine must preserve.
//!
//! Meant for tests that run as root; they panic or return errors freely.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::sys;

/// One entry of a tree, as compared by [`tree_diff`].
#[derive(Debug)]
struct Entry {
    meta: std::fs::Metadata,
    target: Option<PathBuf>,
    xattrs: Vec<(CString, Vec<u8>)>,
}

fn collect(root: &Path) -> io::Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    collect_into(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn collect_into(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Entry>) -> io::Result<()> {
    let path = root.join(rel);
    let meta = std::fs::symlink_metadata(&path)?;
    let kind = kind_of(&meta);
    let target = if meta.file_type().is_symlink() {
        Some(std::fs::read_link(&path)?)
    } else {
        None
    };
    let xattrs = if kind == sys::Kind::Dir {
        sys::read_xattrs(sys::Target::fd(&sys::open_dir(&path)?))?
    } else {
        sys::read_xattrs(sys::Target::Path {
            path: &path,
            symlink: true,
        })?
    };
    let is_dir = meta.is_dir();
    out.insert(
        rel.to_path_buf(),
        Entry {
            meta,
            target,
            xattrs,
        },
    );
    if is_dir {
        for name in sys::list_dir(&path)? {
            collect_into(root, &rel.join(name), out)?;
        }
    }
    Ok(())
}

fn kind_of(m: &std::fs::Metadata) -> sys::Kind {
    match m.mode() & libc::S_IFMT {
        libc::S_IFDIR => sys::Kind::Dir,
        libc::S_IFREG => sys::Kind::File,
        libc::S_IFLNK => sys::Kind::Symlink,
        _ => sys::Kind::Special,
    }
}

/// Hard-link groups: for each non-directory, the sorted names sharing its inode.
fn groups(tree: &BTreeMap<PathBuf, Entry>) -> HashMap<PathBuf, Vec<PathBuf>> {
    let mut by_inode: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for (rel, e) in tree {
        if !e.meta.is_dir() {
            by_inode
                .entry((e.meta.dev(), e.meta.ino()))
                .or_default()
                .push(rel.clone());
        }
    }
    let mut out = HashMap::new();
    for names in by_inode.into_values() {
        for n in &names {
            out.insert(n.clone(), names.clone());
        }
    }
    out
}

fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.display().to_string()
    }
}

/// Every difference between trees `a` and `b`, as readable lines (empty when
/// equal). Compares, for every entry including the roots: type, mode, uid,
/// gid, size (non-directories), mtime with ns (and, when `check_atime`, the
/// atime of everything but symlinks),
/// symlink target, device number, xattrs, file content, and hard-link grouping.
pub fn tree_diff(a: &Path, b: &Path, check_atime: bool) -> Vec<String> {
    let (ta, tb) = match (collect(a), collect(b)) {
        (Ok(ta), Ok(tb)) => (ta, tb),
        (Err(e), _) => return vec![format!("reading {}: {e}", a.display())],
        (_, Err(e)) => return vec![format!("reading {}: {e}", b.display())],
    };
    let (ga, gb) = (groups(&ta), groups(&tb));
    let mut diffs = Vec::new();
    for rel in ta.keys().filter(|k| !tb.contains_key(*k)) {
        diffs.push(format!("{}: missing in {}", show(rel), b.display()));
    }
    for rel in tb.keys().filter(|k| !ta.contains_key(*k)) {
        diffs.push(format!("{}: only in {}", show(rel), b.display()));
    }
    for (rel, ea) in &ta {
        let Some(eb) = tb.get(rel) else { continue };
        let mut d = compare_entry(ea, eb, check_atime);
        if !ea.meta.is_dir() && ga.get(rel) != gb.get(rel) {
            d.push(format!(
                "hard links {:?} != {:?}",
                ga.get(rel).map(Vec::as_slice).unwrap_or_default(),
                gb.get(rel).map(Vec::as_slice).unwrap_or_default()
            ));
        }
        if ea.meta.is_file() && eb.meta.is_file() && ea.meta.size() == eb.meta.size() {
            match sys::same_content(&a.join(rel), &b.join(rel)) {
                Ok(true) => {}
                Ok(false) => d.push("content differs".into()),
                Err(e) => d.push(format!("comparing content: {e:#}")),
            }
        }
        diffs.extend(d.into_iter().map(|x| format!("{}: {x}", show(rel))));
    }
    diffs
}

fn compare_entry(ea: &Entry, eb: &Entry, check_atime: bool) -> Vec<String> {
    let (a, b) = (&ea.meta, &eb.meta);
    let mut d = Vec::new();
    let mut cmp = |what: &str, x: String, y: String| {
        if x != y {
            d.push(format!("{what} {x} != {y}"));
        }
    };
    cmp("type", kind_str(a), kind_str(b));
    cmp("mode", format!("{:o}", a.mode()), format!("{:o}", b.mode()));
    cmp("uid", a.uid().to_string(), b.uid().to_string());
    cmp("gid", a.gid().to_string(), b.gid().to_string());
    if !a.is_dir() {
        cmp("size", a.size().to_string(), b.size().to_string());
    }
    cmp(
        "mtime",
        format!("{}.{:09}", a.mtime(), a.mtime_nsec()),
        format!("{}.{:09}", b.mtime(), b.mtime_nsec()),
    );
    // Reading a symlink updates its atime, so a copy's source symlinks do not
    // keep theirs (the copy gets the atime from before the read).
    if check_atime && !a.file_type().is_symlink() {
        cmp(
            "atime",
            format!("{}.{:09}", a.atime(), a.atime_nsec()),
            format!("{}.{:09}", b.atime(), b.atime_nsec()),
        );
    }
    cmp(
        "symlink target",
        format!("{:?}", ea.target),
        format!("{:?}", eb.target),
    );
    if kind_of(a) == sys::Kind::Special {
        cmp("rdev", a.rdev().to_string(), b.rdev().to_string());
    }
    cmp(
        "xattrs",
        format!("{:?}", ea.xattrs),
        format!("{:?}", eb.xattrs),
    );
    d
}

fn kind_str(m: &std::fs::Metadata) -> String {
    let t = match m.mode() & libc::S_IFMT {
        libc::S_IFDIR => "directory",
        libc::S_IFREG => "file",
        libc::S_IFLNK => "symlink",
        libc::S_IFCHR => "char device",
        libc::S_IFBLK => "block device",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        _ => "unknown",
    };
    t.to_string()
}

/// Panics, listing every difference, unless trees `a` and `b` are equal as
/// [`tree_diff`] defines it (atime not compared).
#[track_caller]
pub fn assert_trees_equal(a: &Path, b: &Path) {
    let d = tree_diff(a, b, false);
    assert!(
        d.is_empty(),
        "trees {} and {} differ:\n  {}",
        a.display(),
        b.display(),
        d.join("\n  ")
    );
}

/// Like [`assert_trees_equal`], comparing atimes too.
#[track_caller]
pub fn assert_trees_equal_with_atime(a: &Path, b: &Path) {
    let d = tree_diff(a, b, true);
    assert!(
        d.is_empty(),
        "trees {} and {} differ:\n  {}",
        a.display(),
        b.display(),
        d.join("\n  ")
    );
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets extended attribute `name` of `path` (not following a symlink).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = cstr(path.as_os_str().as_bytes())?;
    let n = cstr(name.as_bytes())?;
    // SAFETY: valid NUL-terminated strings and buffer.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    })
}

/// Changes the owner of `path` (not following a symlink).
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Sets atime and mtime `(seconds, nanoseconds)` of `path` (not following a symlink).
pub fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let p = cstr(path.as_os_str().as_bytes())?;
    let ts = |(s, ns): (i64, i64)| {
        // SAFETY: timespec is plain old data.
        let mut t: libc::timespec = unsafe { std::mem::zeroed() };
        t.tv_sec = s as libc::time_t;
        t.tv_nsec = ns as _;
        t
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: valid path and two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Creates a device node, FIFO or socket; `mode` includes the type bits.
pub fn mknod(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let p = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::mknod(p.as_ptr(), mode, libc::makedev(major, minor)) })
}

/// POSIX ACL entry tags (for [`posix_acl`]).
pub const ACL_USER_OBJ: u16 = 0x01;
/// Named user entry.
pub const ACL_USER: u16 = 0x02;
/// Owning group entry.
pub const ACL_GROUP_OBJ: u16 = 0x04;
/// Named group entry.
pub const ACL_GROUP: u16 = 0x08;
/// Mask entry.
pub const ACL_MASK: u16 = 0x10;
/// Others entry.
pub const ACL_OTHER: u16 = 0x20;

/// The value of a `system.posix_acl_access`/`_default` xattr from
/// `(tag, perm bits rwx=4/2/1, id)` entries, given in the kernel's order
/// (by tag, then id).
pub fn posix_acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        let id = if matches!(*tag, ACL_USER | ACL_GROUP) {
            *id
        } else {
            u32::MAX
        };
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The value of a `security.capability` xattr (revision 2) with the
/// capabilities in bit mask `permitted`, effective when `effective`.
pub fn file_caps(permitted: u64, effective: bool) -> Vec<u8> {
    let magic: u32 = 0x0200_0000 | u32::from(effective);
    let mut v = magic.to_le_bytes().to_vec();
    for word in [permitted as u32, (permitted >> 32) as u32] {
        v.extend_from_slice(&word.to_le_bytes()); // permitted
        v.extend_from_slice(&0u32.to_le_bytes()); // inheritable
    }
    v
}

fn write_file(path: &Path, data: &[u8], mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    std::fs::File::create(path)?.write_all(data)?;
    lchown(path, uid, gid)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn make_dir(path: &Path, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    lchown(path, uid, gid)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn symlink(target: &str, path: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, path)
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Populates the empty directory `root` with a small root-filesystem-like tree
/// that uses everything the copy engine must preserve: owners, setuid/setgid/
/// sticky modes, symlinks (relative, absolute, dangling, to a directory,
/// owned by a user, with an xattr), a hard-link group across directories and a
/// hard-linked pair, character and block devices, a FIFO, a socket, user/
/// trusted xattrs, `security.capability`, access and default POSIX ACLs, a
/// sparse file with a trailing hole, empty files and directories, and
/// nanosecond atimes/mtimes on everything (the root included).
///
/// Needs root and a file system with xattr and ACL support (ext4, tmpfs, Btrfs).
pub fn make_test_tree(root: &Path) -> io::Result<()> {
    let p = |rel: &str| root.join(rel);
    for (dir, mode, uid, gid) in [
        ("etc", 0o755, 0, 0),
        ("usr/bin", 0o755, 0, 0),
        ("usr/lib", 0o755, 0, 0),
        ("usr/share/doc", 0o755, 0, 0),
        ("var/empty-dir", 0o750, 1000, 1000),
        ("var/lib/deep/a/b/c/d", 0o755, 0, 0),
        ("tmp", 0o1777, 0, 0),
        ("home/user", 0o700, 1000, 1000),
        ("srv/shared", 0o2775, 0, 100),
        ("dev", 0o755, 0, 0),
        ("run", 0o755, 0, 0),
        ("opt/overlay", 0o755, 0, 0),
        ("etc/acl-dir", 0o750, 0, 0),
    ] {
        make_dir(&p(dir), mode, uid, gid)?;
    }
    write_file(&p("etc/hostname"), b"testhost\n", 0o644, 0, 0)?;
    write_file(
        &p("etc/shadow"),
        b"root:*:19000:0:99999:7:::\n",
        0o640,
        0,
        42,
    )?;
    symlink("/etc/passwd", &p("etc/abs-link"))?;
    symlink("/nonexistent/target", &p("etc/dangling"))?;
    write_file(&p("etc/acl-file"), b"acl\n", 0o640, 0, 0)?;
    let acl = posix_acl(&[
        (ACL_USER_OBJ, 6, 0),
        (ACL_USER, 6, 1000),
        (ACL_GROUP_OBJ, 4, 0),
        (ACL_GROUP, 4, 100),
        (ACL_MASK, 6, 0),
        (ACL_OTHER, 0, 0),
    ]);
    set_xattr(&p("etc/acl-file"), "system.posix_acl_access", &acl)?;
    let dir_acl = posix_acl(&[
        (ACL_USER_OBJ, 7, 0),
        (ACL_USER, 5, 1000),
        (ACL_GROUP_OBJ, 5, 0),
        (ACL_MASK, 5, 0),
        (ACL_OTHER, 0, 0),
    ]);
    set_xattr(&p("etc/acl-dir"), "system.posix_acl_access", &dir_acl)?;
    set_xattr(&p("etc/acl-dir"), "system.posix_acl_default", &dir_acl)?;
    // Created after the default ACL: inherits an access ACL.
    write_file(&p("etc/acl-dir/inherited"), b"inherited\n", 0o640, 0, 0)?;

    write_file(&p("usr/bin/su"), b"\x7fELF su", 0o4755, 0, 0)?;
    write_file(&p("usr/bin/wall"), b"\x7fELF wall", 0o2755, 0, 5)?;
    write_file(&p("usr/bin/ping"), b"\x7fELF ping", 0o755, 0, 0)?;
    set_xattr(
        &p("usr/bin/ping"),
        "security.capability",
        &file_caps(1 << 13, true),
    )?;
    write_file(&p("usr/bin/dash"), b"\x7fELF dash", 0o755, 0, 0)?;
    symlink("dash", &p("usr/bin/sh"))?;
    write_file(&p("usr/bin/perl"), b"\x7fELF perl", 0o755, 0, 0)?;
    std::fs::hard_link(p("usr/bin/perl"), p("usr/bin/perl5.36"))?;
    std::fs::hard_link(p("usr/bin/perl"), p("usr/share/doc/perl-copy"))?;
    write_file(&p("usr/lib/libpair.so.1"), b"pair", 0o644, 0, 0)?;
    std::fs::hard_link(p("usr/lib/libpair.so.1"), p("usr/lib/libpair-alias.so"))?;
    write_file(
        &p("usr/lib/big.bin"),
        &pseudo_random(1024 * 1024 + 13, 7),
        0o644,
        0,
        0,
    )?;
    symlink("usr/lib", &p("lib"))?;

    let sparse = std::fs::File::create(p("var/sparse.img"))?;
    sparse.set_len(16 << 20)?;
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"head", 0)?;
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 8 << 20)?;
    drop(sparse);
    write_file(&p("var/empty-file"), b"", 0o600, 0, 0)?;
    write_file(&p("var/lib/deep/a/b/c/d/leaf"), b"leaf\n", 0o644, 0, 0)?;

    write_file(&p("home/user/.profile"), b"PATH=/bin\n", 0o644, 1000, 1000)?;
    set_xattr(&p("home/user"), "user.comment", b"home dir")?;
    set_xattr(&p("home/user/.profile"), "user.mime_type", b"text/plain")?;
    symlink(".profile", &p("home/user/profile-link"))?;
    lchown(&p("home/user/profile-link"), 1000, 1000)?;
    set_xattr(
        &p("home/user/profile-link"),
        "trusted.note",
        b"on a symlink",
    )?;
    set_xattr(&p("opt/overlay"), "trusted.overlay.opaque", b"y")?;

    mknod(&p("dev/null"), libc::S_IFCHR | 0o666, 1, 3)?;
    mknod(&p("dev/sda"), libc::S_IFBLK | 0o660, 8, 0)?;
    lchown(&p("dev/sda"), 0, 6)?;
    set_xattr(&p("dev/sda"), "trusted.dev", b"disk")?;
    mknod(&p("run/initctl"), libc::S_IFIFO | 0o600, 0, 0)?;
    mknod(&p("run/socket"), libc::S_IFSOCK | 0o755, 0, 0)?;
    // mknod applies the umask; make the modes exact.
    for (rel, mode) in [
        ("dev/null", 0o666),
        ("dev/sda", 0o660),
        ("run/initctl", 0o600),
        ("run/socket", 0o755),
    ] {
        std::fs::set_permissions(p(rel), std::fs::Permissions::from_mode(mode))?;
    }
    let mut counter = 0;
    set_all_times(root, &mut counter)
}

/// Sets distinct nanosecond times on every entry, children before their directory.
fn set_all_times(path: &Path, counter: &mut i64) -> io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        for name in sys::list_dir(path)? {
            set_all_times(&path.join(name), counter)?;
        }
    }
    *counter += 1;
    let i = *counter;
    set_times(
        path,
        (1_500_000_000 + i, (i * 7_654_321) % 1_000_000_000),
        (1_600_000_000 + i, 123_456_789 + i),
    )
}
