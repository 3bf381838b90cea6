//! Writing entries into the target tree: remove, copy, replace, metadata,
//! times, extended attributes.

use crate::tree::copy;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

/// Removes a file, symlink or directory tree; absent is fine.
pub(super) fn remove_node(path: &Path) -> Result<()> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading metadata of {}", path.display())),
    };
    if md.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .with_context(|| format!("removing {}", path.display()))
}

/// Copies an entry (recursively) to `dst`, which must not exist, preserving
/// mode, numeric owner, extended attributes and timestamps.
pub(super) fn copy_node(src: &Entry, dst: &Path) -> Result<()> {
    let ctx = || format!("copying {} to {}", src.path.display(), dst.display());
    match &src.kind {
        Kind::File => {
            fs::copy(&src.path, dst).with_context(ctx)?;
        }
        Kind::Dir => {
            fs::create_dir(dst).with_context(ctx)?;
            for name in list_names(&src.path)? {
                if let Some(child) = read_entry(&src.path.join(&name))? {
                    copy_node(&child, &dst.join(&name))?;
                }
            }
        }
        Kind::Symlink(t) => std::os::unix::fs::symlink(t, dst).with_context(ctx)?,
        Kind::Special { fmt, rdev } => {
            let c = cpath(dst)?;
            // SAFETY: c is a valid NUL-terminated path.
            let r = unsafe { libc::mknod(c.as_ptr(), *fmt | src.meta.mode, *rdev as libc::dev_t) };
            if r != 0 {
                return Err(std::io::Error::last_os_error()).with_context(ctx);
            }
        }
    }
    let is_symlink = matches!(src.kind, Kind::Symlink(_));
    apply_meta(dst, &src.meta, is_symlink)?;
    set_times(dst, src.atime, src.mtime)
}

/// Replaces the file at `path` by a new one holding `data` (rename, so that
/// hard links to the old file are not modified). Metadata is set afterwards.
pub(super) fn write_replace(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".deploy-merge.")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(data)
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Gives `path` the owner, mode and extended attributes of `meta`
/// (in that order: chown clears setuid bits and file capabilities).
pub(super) fn apply_meta(path: &Path, meta: &Meta, is_symlink: bool) -> Result<()> {
    let md = fs::symlink_metadata(path)
        .with_context(|| format!("reading metadata of {}", path.display()))?;
    if md.uid() != meta.uid || md.gid() != meta.gid {
        std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))
            .with_context(|| format!("changing owner of {}", path.display()))?;
    }
    if !is_symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
            .with_context(|| format!("changing mode of {}", path.display()))?;
    }
    write_xattrs(path, &meta.xattrs)
}

pub(super) fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

pub(super) fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> Result<()> {
    let c = cpath(path)?;
    let ts = |(s, ns): (i64, i64)| libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: ns as _,
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: c is a valid path, times points to two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setting times of {}", path.display()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Extended attributes: the copy engine's one implementation (l* calls,
// symlinks never followed), keyed by name here for the three-way merge.

pub(super) fn path_target(path: &Path) -> copy::sys::Target<'_> {
    copy::sys::Target::Path {
        path,
        symlink: true,
    }
}

pub(super) fn read_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let list = copy::sys::read_xattrs(path_target(path))
        .with_context(|| format!("listing extended attributes of {}", path.display()))?;
    Ok(list.into_iter().map(|(n, v)| (n.into_bytes(), v)).collect())
}

/// Makes the xattrs of `path` exactly `want`.
pub(super) fn write_xattrs(path: &Path, want: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<()> {
    let want: copy::sys::Xattrs = want
        .iter()
        .map(|(n, v)| {
            CString::new(n.clone())
                .map(|n| (n, v.clone()))
                .context("extended attribute name contains a NUL byte")
        })
        .collect::<Result<_>>()?;
    copy::sys::sync_xattrs(path_target(path), path, &want)?;
    Ok(())
}
