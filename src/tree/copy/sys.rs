//! Low-level, symlink-safe file system operations used by the copy engine.
//!
//! Everything here works on one entry at a time and never follows a symlink in
//! the last path component: files and directories are opened with
//! `O_NOFOLLOW`, other entries are handled with the `l*` system calls.

use std::cell::RefCell;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};

use super::{NoSpaceError, Progress};

/// The kind of a directory entry, as far as copying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    /// Character or block device, FIFO or socket.
    Special,
}

/// A point in time with nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Time {
    pub sec: i64,
    pub nsec: i64,
}

impl Time {
    fn timespec(self) -> libc::timespec {
        // SAFETY: timespec is plain old data; zeroed is a valid value.
        let mut t: libc::timespec = unsafe { std::mem::zeroed() };
        t.tv_sec = self.sec as libc::time_t;
        t.tv_nsec = self.nsec as _;
        t
    }
}

/// The metadata of one entry that the engine needs (from `lstat`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub rdev: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
}

impl Meta {
    fn from_std(m: &std::fs::Metadata) -> Meta {
        Meta {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            blocks: m.blocks(),
            atime: Time {
                sec: m.atime(),
                nsec: m.atime_nsec(),
            },
            mtime: Time {
                sec: m.mtime(),
                nsec: m.mtime_nsec(),
            },
            rdev: m.rdev(),
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
        }
    }

    /// What kind of entry this is.
    pub fn kind(&self) -> Kind {
        match self.mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }

    /// `(st_dev, st_ino)`: identifies the inode.
    pub fn key(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Same file type (including the kind of special file).
    pub fn same_type(&self, other: &Meta) -> bool {
        self.mode & libc::S_IFMT == other.mode & libc::S_IFMT
    }
}

/// `lstat` of `path`.
pub(crate) fn lstat(path: &Path) -> io::Result<Meta> {
    std::fs::symlink_metadata(path).map(|m| Meta::from_std(&m))
}

/// `lstat` of `path`, `None` when it does not exist.
pub(crate) fn lstat_opt(path: &Path) -> io::Result<Option<Meta>> {
    match lstat(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `fstat` of an open file.
pub(crate) fn fstat(file: &File) -> io::Result<Meta> {
    file.metadata().map(|m| Meta::from_std(&m))
}

/// True when `e` means "no space left on device".
pub(crate) fn is_nospace(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// An error on the target side: ENOSPC becomes [`NoSpaceError`] naming `path`,
/// anything else gets the context "`what` `path`".
pub(crate) fn dst_err(e: io::Error, what: &str, path: &Path) -> anyhow::Error {
    if is_nospace(&e) {
        NoSpaceError {
            path: path.to_path_buf(),
        }
        .into()
    } else {
        anyhow::Error::new(e).context(format!("{what} {}", path.display()))
    }
}

/// An error on the source side, with the context "`what` `path`".
pub(crate) fn src_err(e: io::Error, what: &str, path: &Path) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("{what} {}", path.display()))
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Opens a regular file for reading without following a symlink and without
/// updating its access time (when permitted). Fails unless it is a regular file.
pub(crate) fn open_file_read(path: &Path) -> io::Result<File> {
    let open = |extra: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | extra)
            .open(path)
    };
    let file = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
        other => other?,
    };
    if fstat(&file)?.kind() != Kind::File {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// An entry addressed by its directory's descriptor and its name: lookups
/// walk one path component instead of the whole path. `path` is the same
/// entry by full path, for messages and fallbacks.
#[derive(Clone, Copy)]
pub(crate) struct At<'a> {
    pub dir: &'a File,
    pub name: &'a CStr,
    pub path: &'a Path,
}

/// Opens directory `path` as an `O_PATH` descriptor (for `*at` lookups),
/// without following a symlink.
pub(crate) fn open_dir_path(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn meta_of_statx(s: &libc::statx) -> Meta {
    Meta {
        mode: u32::from(s.stx_mode),
        uid: s.stx_uid,
        gid: s.stx_gid,
        size: s.stx_size,
        blocks: s.stx_blocks,
        atime: Time {
            sec: s.stx_atime.tv_sec,
            nsec: i64::from(s.stx_atime.tv_nsec),
        },
        mtime: Time {
            sec: s.stx_mtime.tv_sec,
            nsec: i64::from(s.stx_mtime.tv_nsec),
        },
        rdev: libc::makedev(s.stx_rdev_major, s.stx_rdev_minor),
        dev: libc::makedev(s.stx_dev_major, s.stx_dev_minor),
        ino: s.stx_ino,
        nlink: u64::from(s.stx_nlink),
    }
}

/// `lstat` of the entry `at` (statx relative to its directory).
pub(crate) fn lstat_at(at: At) -> io::Result<Meta> {
    // SAFETY: statx is plain old data; zeroed is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, writable buffer.
    cvt(unsafe {
        libc::statx(
            at.dir.as_raw_fd(),
            at.name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            libc::STATX_BASIC_STATS,
            &mut stx,
        )
    })?;
    Ok(meta_of_statx(&stx))
}

/// [`lstat_at`], `None` when the entry does not exist.
pub(crate) fn lstat_at_opt(at: At) -> io::Result<Option<Meta>> {
    match lstat_at(at) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn openat_file(at: At, flags: libc::c_int, mode: u32) -> io::Result<File> {
    // SAFETY: valid fd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            at.dir.as_raw_fd(),
            at.name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// [`open_file_read`] relative to a directory descriptor.
pub(crate) fn open_file_read_at(at: At) -> io::Result<File> {
    let flags = libc::O_RDONLY | libc::O_NONBLOCK;
    let file = match openat_file(at, flags | libc::O_NOATIME, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => openat_file(at, flags, 0)?,
        other => other?,
    };
    if fstat(&file)?.kind() != Kind::File {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// [`create_file_mode`] relative to a directory descriptor.
pub(crate) fn create_file_at(at: At, mode: u32) -> io::Result<File> {
    openat_file(
        at,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        mode & 0o777,
    )
}

/// Creates a new, empty regular file (mode 0600, fails if anything exists at `path`).
pub(crate) fn create_file(path: &Path) -> io::Result<File> {
    create_file_mode(path, 0o600)
}

/// Creates a new, empty regular file with permission bits `mode & 0o777`
/// (less the umask; fails if anything exists at `path`). Creating a file with
/// its final permissions usually saves a chmod, which is a transaction on Btrfs.
pub(crate) fn create_file_mode(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o777)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens a directory without following a symlink (and without touching its atime).
pub(crate) fn open_dir(path: &Path) -> io::Result<File> {
    let open = |extra: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        other => other,
    }
}

/// The names in directory `path` (without `.` and `..`), sorted.
pub(crate) fn list_dir(path: &Path) -> io::Result<Vec<OsString>> {
    use nix::dir::Dir;
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let base = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = match Dir::open(path, base | OFlag::O_NOATIME, Mode::empty()) {
        Err(nix::errno::Errno::EPERM) => Dir::open(path, base, Mode::empty())?,
        other => other?,
    };
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Creates a directory with the permission bits of `mode` plus owner rwx
/// (less the umask); the exact mode is set when it is finalized.
pub(crate) fn mkdir(path: &Path, mode: u32) -> io::Result<()> {
    let c = cpath(path)?;
    let mode = (mode & 0o777) | 0o700;
    // SAFETY: valid NUL-terminated path.
    cvt(unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) })
}

/// Creates a device node, FIFO or socket of the type in `mode` (permissions 0600).
pub(crate) fn mknod(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cpath(path)?;
    let mode = (mode & libc::S_IFMT) | 0o600;
    // SAFETY: valid NUL-terminated path.
    cvt(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) })
}

/// True when `path` is the root of a mount (so a recursive removal must stop there).
pub(crate) fn is_mount_root(path: &Path) -> io::Result<bool> {
    let c = cpath(path)?;
    // SAFETY: statx is plain old data; zeroed is valid; the path is NUL-terminated.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    cvt(unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            0,
            &mut stx,
        )
    })?;
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    Ok(stx.stx_attributes_mask & bit != 0 && stx.stx_attributes & bit != 0)
}

/// Where metadata is read from or applied to: an open file or directory, or a
/// path that is never followed if it is a symlink.
#[derive(Clone, Copy)]
pub(crate) enum Target<'a> {
    /// An open regular file or directory.
    Fd(RawFd),
    /// A symlink or special file, by path.
    Path { path: &'a Path, symlink: bool },
}

impl<'a> Target<'a> {
    /// The target for `file` (an open file or directory).
    pub fn fd(file: &File) -> Target<'a> {
        Target::Fd(file.as_raw_fd())
    }

    /// The target for a symlink or special file at `path`.
    pub fn path(path: &'a Path, kind: Kind) -> Target<'a> {
        Target::Path {
            path,
            symlink: kind == Kind::Symlink,
        }
    }
}

/// Extended attributes of an entry: `(name, value)`, sorted by name.
pub(crate) type Xattrs = Vec<(CString, Vec<u8>)>;

fn not_supported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

fn list_xattr_names(t: Target) -> io::Result<Vec<CString>> {
    let call = |buf: &mut [u8]| -> io::Result<usize> {
        let (ptr, len) = if buf.is_empty() {
            (std::ptr::null_mut(), 0)
        } else {
            (buf.as_mut_ptr() as *mut libc::c_char, buf.len())
        };
        // SAFETY: ptr/len describe a writable buffer (or are null/0 to query the size).
        let r = match t {
            Target::Fd(fd) => unsafe { libc::flistxattr(fd, ptr, len) },
            Target::Path { path, .. } => {
                let c = cpath(path)?;
                unsafe { libc::llistxattr(c.as_ptr(), ptr, len) }
            }
        };
        cvt_size(r)
    };
    loop {
        let size = match call(&mut []) {
            Err(e) if not_supported(&e) => return Ok(Vec::new()),
            other => other?,
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                let names = buf
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .filter_map(|n| CString::new(n).ok())
                    .collect();
                return Ok(names);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn get_xattr(t: Target, name: &CString) -> io::Result<Option<Vec<u8>>> {
    let call = |buf: &mut [u8]| -> io::Result<usize> {
        let (ptr, len) = if buf.is_empty() {
            (std::ptr::null_mut(), 0)
        } else {
            (buf.as_mut_ptr() as *mut libc::c_void, buf.len())
        };
        // SAFETY: ptr/len describe a writable buffer (or are null/0 to query the size).
        let r = match t {
            Target::Fd(fd) => unsafe { libc::fgetxattr(fd, name.as_ptr(), ptr, len) },
            Target::Path { path, .. } => {
                let c = cpath(path)?;
                unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), ptr, len) }
            }
        };
        cvt_size(r)
    };
    loop {
        let size = match call(&mut []) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
            other => other?,
        };
        if size == 0 {
            return Ok(Some(Vec::new()));
        }
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// All extended attributes of `t`, sorted by name.
pub(crate) fn read_xattrs(t: Target) -> io::Result<Xattrs> {
    let mut out = Vec::new();
    for name in list_xattr_names(t)? {
        if let Some(value) = get_xattr(t, &name)? {
            out.push((name, value));
        }
    }
    out.sort();
    Ok(out)
}

/// `listxattrat` and `getxattrat` (Linux 6.13): same number on every
/// architecture with the common system call table.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const SYS_LISTXATTRAT: Option<libc::c_long> = Some(465);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
const SYS_LISTXATTRAT: Option<libc::c_long> = None;

/// False once the kernel said it has no `listxattrat`.
static XATTRAT: AtomicBool = AtomicBool::new(true);

/// Extended attributes of the entry `at` (never followed), sorted by name.
///
/// The common case, an entry without xattrs, costs one `listxattrat` with a
/// one-component lookup; entries with xattrs, and kernels before 6.13, are
/// read by path.
pub(crate) fn read_xattrs_at(at: At) -> io::Result<Xattrs> {
    let by_path = || {
        read_xattrs(Target::Path {
            path: at.path,
            symlink: true,
        })
    };
    let Some(nr) = SYS_LISTXATTRAT.filter(|_| XATTRAT.load(Ordering::Relaxed)) else {
        return by_path();
    };
    // SAFETY: valid fd and NUL-terminated name; a null buffer of size 0 asks for the size.
    let r = unsafe {
        libc::syscall(
            nr,
            at.dir.as_raw_fd(),
            at.name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            std::ptr::null_mut::<libc::c_char>(),
            0usize,
        )
    };
    if r == 0 {
        return Ok(Vec::new());
    }
    if r < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Old kernel, or a seccomp filter (containers) that refuses unknown calls.
            Some(libc::ENOSYS) | Some(libc::EPERM) => XATTRAT.store(false, Ordering::Relaxed),
            Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
    by_path()
}

pub(crate) fn set_xattr(t: Target, name: &CString, value: &[u8]) -> io::Result<()> {
    let ptr = value.as_ptr() as *const libc::c_void;
    // SAFETY: name is NUL-terminated, value is a valid buffer.
    let r = match t {
        Target::Fd(fd) => unsafe { libc::fsetxattr(fd, name.as_ptr(), ptr, value.len(), 0) },
        Target::Path { path, .. } => {
            let c = cpath(path)?;
            unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), ptr, value.len(), 0) }
        }
    };
    cvt(r)
}

fn remove_xattr(t: Target, name: &CString) -> io::Result<()> {
    // SAFETY: name and path are NUL-terminated.
    let r = match t {
        Target::Fd(fd) => unsafe { libc::fremovexattr(fd, name.as_ptr()) },
        Target::Path { path, .. } => {
            let c = cpath(path)?;
            unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) }
        }
    };
    match cvt(r) {
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        other => other,
    }
}

fn chown(t: Target, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain system calls on a valid fd / NUL-terminated path.
    let r = match t {
        Target::Fd(fd) => unsafe { libc::fchown(fd, uid, gid) },
        Target::Path { path, .. } => {
            let c = cpath(path)?;
            unsafe { libc::lchown(c.as_ptr(), uid, gid) }
        }
    };
    cvt(r)
}

fn chmod(t: Target, mode: u32) -> io::Result<()> {
    let mode = (mode & 0o7777) as libc::mode_t;
    // SAFETY: plain system calls on a valid fd / NUL-terminated path.
    let r = match t {
        Target::Fd(fd) => unsafe { libc::fchmod(fd, mode) },
        // A symlink's mode cannot be changed (and chmod would follow it).
        Target::Path { symlink: true, .. } => return Ok(()),
        Target::Path { path, .. } => {
            let c = cpath(path)?;
            unsafe { libc::chmod(c.as_ptr(), mode) }
        }
    };
    cvt(r)
}

fn set_times(t: Target, atime: Time, mtime: Time) -> io::Result<()> {
    let times = [atime.timespec(), mtime.timespec()];
    // SAFETY: times points to two timespecs; path is NUL-terminated.
    let r = match t {
        Target::Fd(fd) => unsafe { libc::futimens(fd, times.as_ptr()) },
        Target::Path { path, .. } => {
            let c = cpath(path)?;
            unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            }
        }
    };
    cvt(r)
}

/// Sets atime and mtime of `path` (never following a symlink).
pub(crate) fn set_path_times(path: &Path, atime: Time, mtime: Time) -> Result<()> {
    let t = Target::Path {
        path,
        symlink: true,
    };
    set_times(t, atime, mtime).map_err(|e| dst_err(e, "setting times of", path))
}

/// Makes the xattrs of `t` exactly `want`: removes extra ones, sets missing or
/// different ones. Returns true when it changed any.
pub(crate) fn sync_xattrs(t: Target, path: &Path, want: &Xattrs) -> Result<bool> {
    let have = read_xattrs(t).map_err(|e| dst_err(e, "listing extended attributes of", path))?;
    let mut changed = false;
    for (name, _) in &have {
        if !want.iter().any(|(n, _)| n == name) {
            changed = true;
            remove_xattr(t, name).map_err(|e| {
                dst_err(
                    e,
                    &format!("removing extended attribute {name:?} from"),
                    path,
                )
            })?;
        }
    }
    for (name, value) in want {
        if have.iter().any(|(n, v)| n == name && v == value) {
            continue;
        }
        changed = true;
        set_xattr(t, name, value).map_err(|e| xattr_err(e, name, value.len(), path))?;
    }
    Ok(changed)
}

/// Btrfs refuses an extended attribute larger than a node holds with
/// ENOSPC: say that, not "no space left", for one too big for a small node.
fn xattr_err(e: io::Error, name: &CString, len: usize, path: &Path) -> anyhow::Error {
    const SMALL_NODE_MAX: usize = 3900;
    if is_nospace(&e) && len > SMALL_NODE_MAX {
        let fix = if len < 16_000 {
            "a new Btrfs under 2 GiB has 4 KiB nodes, which hold attributes up to \
             about 3.9 KiB: deploy onto a disk whose Btrfs is 2 GiB or more (--size 3G)"
        } else {
            "no Btrfs node holds it (16 KiB at most here): drop the attribute from the tree"
        };
        return anyhow::anyhow!(
            "extended attribute {name:?} of {} is {len} bytes, too large for one node of the \
             target Btrfs: {fix}",
            path.display()
        );
    }
    dst_err(e, &format!("setting extended attribute {name:?} on"), path)
}

/// Gives `t` (at `path`, for messages) the ownership, xattrs, mode and times of
/// `m`/`xattrs`. `current` is the target's present metadata when known (chown
/// and chmod are skipped when owner and mode already match: each of them is a
/// transaction on Btrfs).
///
/// Order matters: chown first (it clears setuid/setgid and
/// `security.capability`), then xattrs (an ACL changes the mode), then chmod,
/// then times.
pub(crate) fn apply_meta(
    t: Target,
    path: &Path,
    m: &Meta,
    xattrs: &Xattrs,
    current: Option<&Meta>,
) -> Result<()> {
    let chowned = current.is_none_or(|c| c.uid != m.uid || c.gid != m.gid);
    if chowned {
        chown(t, m.uid, m.gid).map_err(|e| dst_err(e, "changing owner of", path))?;
    }
    let xattrs_changed = sync_xattrs(t, path, xattrs)?;
    let mode_ok =
        !chowned && !xattrs_changed && current.is_some_and(|c| c.mode & 0o7777 == m.mode & 0o7777);
    if !mode_ok {
        chmod(t, m.mode).map_err(|e| dst_err(e, "changing mode of", path))?;
    }
    set_times(t, m.atime, m.mtime).map_err(|e| dst_err(e, "setting times of", path))
}

/// Flags shared by all workers that remember what the kernel refused.
#[derive(Debug)]
pub(crate) struct DataFlags {
    /// FICLONE may work between source and target.
    pub reflink: AtomicBool,
    /// copy_file_range may work between source and target.
    pub copy_range: AtomicBool,
}

impl Default for DataFlags {
    fn default() -> Self {
        DataFlags {
            reflink: AtomicBool::new(true),
            copy_range: AtomicBool::new(true),
        }
    }
}

/// Reflinks the whole of `src` into `dst` (FICLONE).
pub(crate) fn ficlone(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument.
    cvt(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) })
}

fn errno_in(e: &io::Error, list: &[libc::c_int]) -> bool {
    e.raw_os_error().is_some_and(|n| list.contains(&n))
}

/// Paths and counters of one data copy, for messages and progress.
pub(crate) struct DataCopy<'a> {
    pub src_path: &'a Path,
    pub dst_path: &'a Path,
    pub flags: &'a DataFlags,
    pub progress: Option<&'a Progress>,
}

impl DataCopy<'_> {
    fn add_progress(&self, n: u64) {
        if let Some(p) = self.progress {
            p.bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Copies the content of `src` (of metadata `m`) into the new, empty `dst`:
    /// reflink if possible, else copy_file_range, else read/write; holes stay
    /// holes. Returns the number of bytes that were reflinked.
    pub fn run(&self, src: &File, dst: &File, m: &Meta) -> Result<u64> {
        if m.size == 0 {
            return Ok(0);
        }
        if self.flags.reflink.load(Ordering::Relaxed) {
            match ficlone(src, dst) {
                Ok(()) => {
                    self.add_progress(m.size);
                    return Ok(m.size);
                }
                Err(e) if is_nospace(&e) => return Err(dst_err(e, "", self.dst_path)),
                Err(e) => {
                    if errno_in(
                        &e,
                        &[libc::EOPNOTSUPP, libc::ENOTTY, libc::EXDEV, libc::ENOSYS],
                    ) {
                        tracing::debug!("reflink not available ({e}); copying data instead");
                        self.flags.reflink.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        self.copy_sparse(src, dst, m)?;
        Ok(0)
    }

    /// Copies the data segments of `src`, skipping holes, then sets the size.
    fn copy_sparse(&self, src: &File, dst: &File, m: &Meta) -> Result<()> {
        let size = m.size;
        let dense = m.blocks.saturating_mul(512) >= size;
        let mut pos = 0u64;
        let mut copied = 0u64;
        let mut use_cfr = self.flags.copy_range.load(Ordering::Relaxed);
        while pos < size {
            let (start, end) = if dense {
                (pos, size)
            } else {
                match self.next_segment(src, pos, size)? {
                    Some(seg) => seg,
                    None => break,
                }
            };
            if start >= end {
                break;
            }
            let reached = self.copy_range(src, dst, start, end, &mut use_cfr)?;
            copied += reached - start;
            pos = reached;
            if reached < end {
                break; // the source became shorter while we read it
            }
        }
        if pos != size {
            // A trailing hole (or a source that shrank): give the target the full size.
            dst.set_len(size)
                .map_err(|e| dst_err(e, "setting the size of", self.dst_path))?;
        }
        self.add_progress(size.saturating_sub(copied));
        Ok(())
    }

    /// The next data segment `[start, end)` at or after `pos`, `None` if only a hole remains.
    fn next_segment(&self, src: &File, pos: u64, size: u64) -> Result<Option<(u64, u64)>> {
        let fd = src.as_raw_fd();
        // SAFETY: lseek on a valid fd.
        let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((pos, size))),
                _ => Err(src_err(e, "finding data in", self.src_path)),
            };
        }
        // SAFETY: lseek on a valid fd.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        let end = if end < 0 {
            size
        } else {
            (end as u64).min(size)
        };
        Ok(Some((start as u64, end)))
    }

    /// Copies `[start, end)`; returns how far it got (less than `end` only at EOF).
    fn copy_range(
        &self,
        src: &File,
        dst: &File,
        start: u64,
        end: u64,
        use_cfr: &mut bool,
    ) -> Result<u64> {
        let mut off = start;
        while *use_cfr && off < end {
            let mut off_in = off as libc::loff_t;
            let mut off_out = off as libc::loff_t;
            let len = (end - off).min(1 << 30) as usize;
            // SAFETY: valid fds and offsets.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    len,
                    0,
                )
            };
            if n == 0 {
                return Ok(off);
            }
            if n > 0 {
                off += n as u64;
                self.add_progress(n as u64);
                continue;
            }
            let e = io::Error::last_os_error();
            if is_nospace(&e) {
                return Err(dst_err(e, "", self.dst_path));
            }
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if errno_in(&e, &[libc::EXDEV, libc::ENOSYS, libc::EOPNOTSUPP]) {
                self.flags.copy_range.store(false, Ordering::Relaxed);
            } else if !errno_in(&e, &[libc::EINVAL, libc::EBADF, libc::ETXTBSY]) {
                return Err(anyhow::Error::new(e).context(format!(
                    "copying data from {} to {}",
                    self.src_path.display(),
                    self.dst_path.display()
                )));
            }
            tracing::debug!("copy_file_range not usable ({e}); using read/write");
            *use_cfr = false;
        }
        self.read_write(src, dst, off, end)
    }

    fn read_write(&self, src: &File, dst: &File, mut off: u64, end: u64) -> Result<u64> {
        thread_local! {
            static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 256 * 1024]);
        }
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            while off < end {
                let want = ((end - off) as usize).min(buf.len());
                let n = match src.read_at(&mut buf[..want], off) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(src_err(e, "reading", self.src_path)),
                };
                if n == 0 {
                    break;
                }
                dst.write_all_at(&buf[..n], off)
                    .map_err(|e| dst_err(e, "writing", self.dst_path))?;
                off += n as u64;
                self.add_progress(n as u64);
            }
            Ok(off)
        })
    }
}

/// Compares the contents of two regular files byte by byte.
pub(crate) fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let fa = open_file_read(a).map_err(|e| src_err(e, "opening", a))?;
    let fb = open_file_read(b).map_err(|e| src_err(e, "opening", b))?;
    let mut ba = vec![0u8; 128 * 1024];
    let mut bb = vec![0u8; 128 * 1024];
    let mut off = 0u64;
    loop {
        let na = read_full(&fa, &mut ba, off).map_err(|e| src_err(e, "reading", a))?;
        let nb = read_full(&fb, &mut bb, off).map_err(|e| src_err(e, "reading", b))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
        off += na as u64;
    }
}

/// Reads until `buf` is full or EOF.
fn read_full(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Recursively deletes `path` without following symlinks and without crossing
/// into another mount. Adds the number of removed entries to `count`.
pub(crate) fn remove_tree_counted(path: &Path, count: &mut u64) -> Result<()> {
    let Some(m) = lstat_opt(path).map_err(|e| src_err(e, "reading metadata of", path))? else {
        return Ok(());
    };
    if m.kind() != Kind::Dir {
        std::fs::remove_file(path).map_err(|e| src_err(e, "removing", path))?;
        *count += 1;
        return Ok(());
    }
    if is_mount_root(path).map_err(|e| src_err(e, "checking for a mount at", path))? {
        anyhow::bail!(
            "refusing to remove {}: something is mounted there",
            path.display()
        );
    }
    let names = list_dir(path).map_err(|e| src_err(e, "listing", path))?;
    for name in names {
        remove_tree_counted(&path.join(name), count)?;
    }
    std::fs::remove_dir(path).map_err(|e| src_err(e, "removing directory", path))?;
    *count += 1;
    Ok(())
}

/// Reads a symlink's target.
pub(crate) fn read_link(path: &Path) -> Result<std::path::PathBuf> {
    std::fs::read_link(path).with_context(|| format!("reading symlink {}", path.display()))
}
