//! Resolving paths *inside* an untrusted root tree without ever escaping it.
//!
//! A root filesystem handed to us may be hostile or simply careless: it can
//! contain `vmlinuz -> /etc/shadow`, `vmlinuz -> ../../../..`, `home -> /` or
//! `etc/fstab -> /etc/passwd`. Following such links against the host would
//! read (or worse, write) the host's files. Everything here resolves symlinks
//! the way the tree's own system would see them once booted with the tree as
//! `/`: absolute link targets start again at the tree's root and `..` stops at
//! the tree's root.
//!
//! Two mechanisms are provided:
//! - [`open_in_root`] / [`read_in_root`] use `openat2(2)` with
//!   `RESOLVE_IN_ROOT`, where the kernel enforces the confinement (with a
//!   userspace fallback on kernels older than 5.6);
//! - [`resolve_in_root`] / [`try_resolve_in_root`] walk the components by hand
//!   (`lstat` + `readlink`) and return the host path of the final target,
//!   which callers need to name, compare or dedupe files.

use anyhow::{Context, Result};
use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Maximum number of symlinks followed while resolving one path (as Linux's
/// `MAXSYMLINKS`); more than that is reported as a loop.
pub const MAX_SYMLINKS: usize = 40;

/// How many times `openat2` is retried when the kernel reports a concurrent
/// rename or mount during an in-root resolution (`EAGAIN`).
const OPENAT2_RETRIES: usize = 16;

/// Resolves `rel` inside `root` and returns the host path of the final target.
///
/// Every symlink component is followed against `root` (absolute targets are
/// relative to `root`, `..` clamps at `root`), up to [`MAX_SYMLINKS`] links.
/// The returned path is `root` joined with symlink-free components, so it
/// always lies inside `root`. It is an error if the target (or a directory on
/// the way) does not exist; use [`try_resolve_in_root`] to test existence.
#[cfg(test)]
pub fn resolve_in_root(root: &Path, rel: &Path) -> Result<PathBuf> {
    try_resolve_in_root(root, rel)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} does not exist inside {} (symlinks resolved within that root)",
            rel.display(),
            root.display()
        )
    })
}

/// Like [`resolve_in_root`], but returns `Ok(None)` when the target or a
/// component on the way is missing (including a dangling symlink and a
/// non-directory used as a directory).
pub fn try_resolve_in_root(root: &Path, rel: &Path) -> Result<Option<PathBuf>> {
    resolve_io(root, rel)
        .with_context(|| format!("resolving {} inside {}", rel.display(), root.display()))
}

/// Opens `rel` inside `root` with the `libc::O_*` `flags` given (`O_CLOEXEC`
/// is always added), never leaving `root`.
///
/// Uses `openat2(2)` with `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`; on kernels
/// without `openat2` it falls back to [`resolve_in_root`] and an `O_NOFOLLOW`
/// open. Files created through `O_CREAT` get mode 0644 (minus the umask).
/// `O_NOFOLLOW` in `flags` refuses a symlink as the last component.
#[cfg(test)]
pub fn open_in_root(root: &Path, rel: &Path, flags: libc::c_int) -> Result<File> {
    open_io(root, rel, flags)
        .with_context(|| format!("opening {} inside {}", rel.display(), root.display()))
}

/// Reads the whole file at `rel` inside `root` (symlinks resolved within
/// `root`); `Ok(None)` when it does not exist.
pub fn read_in_root(root: &Path, rel: &Path) -> Result<Option<Vec<u8>>> {
    let ctx = || format!("reading {} inside {}", rel.display(), root.display());
    let mut file = match open_io(root, rel, libc::O_RDONLY) {
        Ok(file) => file,
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(e).with_context(ctx),
    };
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).with_context(ctx)?;
    Ok(Some(buf))
}

/// True for the errors that mean "there is nothing at this path".
fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// One step of a path walk.
enum Step {
    Root,
    Parent,
    Name(OsString),
}

/// Pushes the components of `path` onto `pending` so that they are popped in
/// order (the stack's top is the next component).
fn push_components(pending: &mut Vec<Step>, path: &Path) {
    let steps: Vec<Step> = path
        .components()
        .filter_map(|c| match c {
            Component::RootDir | Component::Prefix(_) => Some(Step::Root),
            Component::CurDir => None,
            Component::ParentDir => Some(Step::Parent),
            Component::Normal(name) => Some(Step::Name(name.to_os_string())),
        })
        .collect();
    pending.extend(steps.into_iter().rev());
}

/// The manual in-root walk behind [`try_resolve_in_root`].
fn resolve_io(root: &Path, rel: &Path) -> io::Result<Option<PathBuf>> {
    if !fs::metadata(root)?.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    let mut pending = Vec::new();
    push_components(&mut pending, rel);
    let mut current = root.to_path_buf();
    let mut depth = 0usize; // components of `current` below `root`
    let mut links = 0usize;
    while let Some(step) = pending.pop() {
        match step {
            Step::Root => {
                current = root.to_path_buf();
                depth = 0;
            }
            Step::Parent => {
                if depth > 0 {
                    current.pop();
                    depth -= 1;
                }
            }
            Step::Name(name) => {
                let candidate = current.join(&name);
                let meta = match fs::symlink_metadata(&candidate) {
                    Ok(meta) => meta,
                    Err(e) if is_missing(&e) => return Ok(None),
                    Err(e) => return Err(e),
                };
                if meta.file_type().is_symlink() {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(io::Error::from_raw_os_error(libc::ELOOP));
                    }
                    let target = fs::read_link(&candidate)?;
                    push_components(&mut pending, &target);
                } else {
                    if !meta.is_dir() && !pending.is_empty() {
                        return Ok(None); // ENOTDIR: a file used as a directory
                    }
                    current = candidate;
                    depth += 1;
                }
            }
        }
    }
    Ok(Some(current))
}

/// Opens `root` as an `O_PATH` directory handle for `openat2`.
fn open_root_dir(root: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)
}

/// `open_in_root` without context: `openat2` first, fallback on `ENOSYS`.
fn open_io(root: &Path, rel: &Path, flags: libc::c_int) -> io::Result<File> {
    let dir = open_root_dir(root)?;
    match openat2_in_root(dir.as_raw_fd(), rel, flags) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => open_fallback(root, rel, flags),
        other => other,
    }
}

/// Calls `openat2(dirfd, rel, {flags, mode, RESOLVE_IN_ROOT})`, retrying on
/// `EAGAIN` (a concurrent rename/mount the kernel could not rule out).
fn openat2_in_root(dirfd: RawFd, rel: &Path, flags: libc::c_int) -> io::Result<File> {
    let bytes = rel.as_os_str().as_bytes();
    let bytes = if bytes.is_empty() {
        b".".as_slice()
    } else {
        bytes
    };
    let cpath = CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let creates = flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE;
    // SAFETY: open_how is plain integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if creates { 0o644 } else { 0 };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    for _ in 0..OPENAT2_RETRIES {
        // SAFETY: cpath and how outlive the call; the size passed matches how.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                cpath.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret >= 0 {
            // SAFETY: the kernel returned a new file descriptor that we own.
            return Ok(unsafe { File::from_raw_fd(ret as RawFd) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EAGAIN) {
            return Err(err);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// Userspace equivalent of `openat2(RESOLVE_IN_ROOT)` for old kernels: resolve
/// by hand, then open the symlink-free host path with `O_NOFOLLOW`. A missing
/// target is created (with `O_CREAT`) in its resolved parent directory.
fn open_fallback(root: &Path, rel: &Path, flags: libc::c_int) -> io::Result<File> {
    let host = match resolve_io(root, rel)? {
        Some(path) => path,
        None if flags & libc::O_CREAT != 0 => {
            let name = match rel.components().next_back() {
                Some(Component::Normal(name)) => name,
                _ => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
            };
            let parent = rel.parent().unwrap_or_else(|| Path::new(""));
            match resolve_io(root, parent)? {
                Some(dir) => dir.join(name),
                None => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
        }
        None => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
    };
    let cpath = CString::new(host.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: cpath is a valid NUL-terminated string for the call's duration.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new file descriptor that we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    /// A tree with a regular file, a directory and a set of hostile links.
    fn hostile_tree() -> TempDir {
        let t = TempDir::new().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("boot")).unwrap();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("boot/vmlinuz-1.0"), b"kernel").unwrap();
        fs::write(r.join("etc/passwd"), b"tree passwd").unwrap();
        symlink("/etc/shadow", r.join("shadowlink")).unwrap();
        symlink("../../../../../../etc/passwd", r.join("dotdot")).unwrap();
        symlink("/", r.join("home")).unwrap();
        symlink("../..", r.join("up")).unwrap();
        symlink("boot/vmlinuz-1.0", r.join("vmlinuz")).unwrap();
        symlink("/etc/passwd", r.join("etc/fstab")).unwrap();
        symlink("loop1", r.join("loop2")).unwrap();
        symlink("loop2", r.join("loop1")).unwrap();
        symlink("/boot/../boot/./vmlinuz-1.0", r.join("boot/vmlinuz")).unwrap();
        t
    }

    #[test]
    fn relative_link_resolves_inside() {
        let t = hostile_tree();
        let got = resolve_in_root(t.path(), Path::new("vmlinuz")).unwrap();
        assert_eq!(got, t.path().join("boot/vmlinuz-1.0"));
        let got = resolve_in_root(t.path(), Path::new("/boot/vmlinuz")).unwrap();
        assert_eq!(got, t.path().join("boot/vmlinuz-1.0"));
    }

    #[test]
    fn absolute_link_is_relative_to_root() {
        let t = hostile_tree();
        // /etc/shadow does not exist inside the tree: not the host's file.
        assert_eq!(
            try_resolve_in_root(t.path(), Path::new("shadowlink")).unwrap(),
            None
        );
        assert!(resolve_in_root(t.path(), Path::new("shadowlink")).is_err());
        let got = resolve_in_root(t.path(), Path::new("etc/fstab")).unwrap();
        assert_eq!(got, t.path().join("etc/passwd"));
        assert_eq!(fs::read(got).unwrap(), b"tree passwd");
    }

    #[test]
    fn dotdot_clamps_at_root() {
        let t = hostile_tree();
        let got = resolve_in_root(t.path(), Path::new("dotdot")).unwrap();
        assert_eq!(got, t.path().join("etc/passwd"));
        assert_eq!(
            resolve_in_root(t.path(), Path::new("up")).unwrap(),
            t.path()
        );
        let got = resolve_in_root(t.path(), Path::new("../../boot/../vmlinuz")).unwrap();
        assert_eq!(got, t.path().join("boot/vmlinuz-1.0"));
        let got = resolve_in_root(t.path(), Path::new("home/home/up/etc/passwd")).unwrap();
        assert_eq!(got, t.path().join("etc/passwd"));
    }

    #[test]
    fn link_to_slash_stays_in_root() {
        let t = hostile_tree();
        assert_eq!(
            resolve_in_root(t.path(), Path::new("home")).unwrap(),
            t.path()
        );
        let got = resolve_in_root(t.path(), Path::new("home/etc/passwd")).unwrap();
        assert_eq!(got, t.path().join("etc/passwd"));
    }

    #[test]
    fn loops_are_errors() {
        let t = hostile_tree();
        let err = try_resolve_in_root(t.path(), Path::new("loop1")).unwrap_err();
        assert!(format!("{err:#}").contains("symbolic links"), "{err:#}");
        let err = open_in_root(t.path(), Path::new("loop1"), libc::O_RDONLY).unwrap_err();
        assert!(format!("{err:#}").contains("loop1"), "{err:#}");
    }

    #[test]
    fn file_as_directory_is_missing() {
        let t = hostile_tree();
        let rel = Path::new("boot/vmlinuz-1.0/x");
        assert_eq!(try_resolve_in_root(t.path(), rel).unwrap(), None);
        let rel = Path::new("boot/vmlinuz-1.0/..");
        assert_eq!(try_resolve_in_root(t.path(), rel).unwrap(), None);
        assert_eq!(
            read_in_root(t.path(), Path::new("vmlinuz/x")).unwrap(),
            None
        );
    }

    #[test]
    fn read_in_root_confined() {
        let t = hostile_tree();
        let r = t.path();
        assert_eq!(
            read_in_root(r, Path::new("vmlinuz")).unwrap().unwrap(),
            b"kernel"
        );
        assert_eq!(
            read_in_root(r, Path::new("etc/fstab")).unwrap().unwrap(),
            b"tree passwd"
        );
        assert_eq!(
            read_in_root(r, Path::new("dotdot")).unwrap().unwrap(),
            b"tree passwd"
        );
        assert_eq!(read_in_root(r, Path::new("shadowlink")).unwrap(), None);
        assert_eq!(read_in_root(r, Path::new("missing")).unwrap(), None);
        assert_eq!(
            read_in_root(r, Path::new("/home/up/etc/passwd"))
                .unwrap()
                .unwrap(),
            b"tree passwd"
        );
    }

    #[test]
    fn open_in_root_creates_inside() {
        let t = hostile_tree();
        let r = t.path();
        // home -> / : creating home/new must land in the tree's root.
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        open_in_root(r, Path::new("home/new"), flags).unwrap();
        assert!(r.join("new").is_file());
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW;
        assert!(open_in_root(r, Path::new("vmlinuz"), flags).is_err());
    }

    #[test]
    fn openat2_direct_is_confined() {
        let t = hostile_tree();
        let dir = open_root_dir(t.path()).unwrap();
        let open = |rel: &str| openat2_in_root(dir.as_raw_fd(), Path::new(rel), libc::O_RDONLY);
        match open("vmlinuz") {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return, // kernel < 5.6
            Err(e) => panic!("vmlinuz: {e}"),
            Ok(mut f) => {
                let mut buf = Vec::new();
                f.read_to_end(&mut buf).unwrap();
                assert_eq!(buf, b"kernel");
            }
        }
        let e = open("shadowlink").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = open("loop1").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        assert!(open("home/up/etc/passwd").is_ok());
    }

    #[test]
    fn fallback_matches_openat2() {
        let t = hostile_tree();
        let r = t.path();
        let read = |rel: &str| -> Option<Vec<u8>> {
            match open_fallback(r, Path::new(rel), libc::O_RDONLY) {
                Ok(mut f) => {
                    let mut buf = Vec::new();
                    f.read_to_end(&mut buf).unwrap();
                    Some(buf)
                }
                Err(e) if is_missing(&e) => None,
                Err(e) => panic!("{rel}: {e}"),
            }
        };
        for rel in [
            "vmlinuz",
            "etc/fstab",
            "dotdot",
            "shadowlink",
            "missing",
            "home/up/etc/passwd",
        ] {
            assert_eq!(read(rel), read_in_root(r, Path::new(rel)).unwrap(), "{rel}");
        }
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        open_fallback(r, Path::new("home/new2"), flags).unwrap();
        assert!(r.join("new2").is_file());
        assert!(open_fallback(r, Path::new("loop1"), libc::O_RDONLY).is_err());
    }
}
