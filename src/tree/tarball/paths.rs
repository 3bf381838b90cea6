//! Archive paths made safe: components without .. or absolute paths, the
//! top-level entries a rootfs may have, and the *at system calls the
//! extractor walks the target with (O_NOFOLLOW, relative to a parent).

#[allow(unused_imports)]
use super::*;
use crate::tree::copy::sys::{Meta, Time};
use anyhow::{anyhow, bail, Result};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self};
use std::os::fd::{FromRawFd, RawFd};

/// Splits an archive path into its components, refusing absolute paths and
/// `..`; `.` and empty components are dropped (so `./` is the root).
/// What a top-level entry of a rootfs is, for [`check_top_entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopKind {
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (regular file, device, ...).
    Other,
}

/// Refuses a rootfs whose `/etc` or a state directory (`/home`, `/var`, ...)
/// is not a real directory, the same way for a first deploy and an upgrade,
/// at planning: the /etc merge of every later upgrade and the `/state`
/// subvolumes need real directories there, and a disk must never be left
/// in a shape it cannot be upgraded from.
pub fn check_top_entry(name: &str, kind: TopKind) -> Result<()> {
    let what = if name == "etc" {
        "/etc must be a real directory (the /etc merge of every later upgrade works on it); \
         make it one, e.g. move usr/etc to etc in the rootfs"
    } else if crate::store::layout::STATE_DIRS.contains(&name) {
        "state directories (/home /root /opt /srv /var) must be real directories: they become \
         the shared /state subvolumes; make it a directory in the rootfs"
    } else {
        return Ok(());
    };
    match kind {
        TopKind::Dir => Ok(()),
        TopKind::Symlink => bail!("the rootfs's /{name} is a symlink: {what}"),
        TopKind::Other => bail!("the rootfs's /{name} is not a directory: {what}"),
    }
}

pub(super) fn components<'p>(raw: &'p [u8], what: &str) -> Result<Vec<&'p [u8]>> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.first() == Some(&b'/') {
        bail!(
            "archive {what} {:?} is an absolute path: refusing to write outside the target",
            shown()
        );
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => bail!(
                "archive {what} {:?} contains `..`: refusing to write outside the target",
                shown()
            ),
            c => out.push(c),
        }
    }
    Ok(out)
}

pub(super) fn cstring(b: &[u8]) -> Result<CString> {
    CString::new(b).map_err(|_| anyhow!("path with a NUL byte in the archive"))
}

pub(super) fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `openat` returning an owned file.
pub(super) fn openat(
    dir: RawFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    // SAFETY: valid fd and NUL-terminated name; the returned fd is owned by the File.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`, `None` when it does not exist.
pub(super) fn stat_at(dir: RawFd, name: &CStr) -> io::Result<Option<Meta>> {
    // SAFETY: stat is plain old data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, writable stat buffer.
    match check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(meta_of_stat(&st))),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) fn meta_of_stat(st: &libc::stat) -> Meta {
    Meta {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: Time {
            sec: st.st_atime,
            nsec: st.st_atime_nsec,
        },
        mtime: Time {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec,
        },
        rdev: st.st_rdev,
        dev: st.st_dev,
        ino: st.st_ino,
        // u64 on x86_64, u32 on aarch64.
        #[allow(clippy::useless_conversion)]
        nlink: u64::from(st.st_nlink),
    }
}
