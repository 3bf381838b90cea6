//! Directory entries as the merge compares them: type, content, metadata,
//! extended attributes; symlinks are never followed.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;

/// Type of a directory entry, with what identifies its content besides data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    Dir,
    File,
    Symlink(PathBuf),
    /// Device node, FIFO or socket: `fmt` is the `S_IFMT` part of the mode.
    Special {
        fmt: u32,
        rdev: u64,
    },
}

impl Kind {
    /// Same type of entry (content may differ). Directories are excluded:
    /// they are merged child by child.
    pub(super) fn same_type(&self, other: &Kind) -> bool {
        match (self, other) {
            (Kind::File, Kind::File) | (Kind::Symlink(_), Kind::Symlink(_)) => true,
            (Kind::Special { fmt: a, .. }, Kind::Special { fmt: b, .. }) => a == b,
            _ => false,
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Kind::Dir => "directory",
            Kind::File => "file",
            Kind::Symlink(_) => "symlink",
            Kind::Special { .. } => "special file",
        }
    }
}

/// Metadata that counts as part of an entry's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Meta {
    /// Permission bits incl. setuid/setgid/sticky (0 for symlinks).
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// One directory entry as found on disk.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) path: PathBuf,
    pub(super) kind: Kind,
    pub(super) meta: Meta,
    pub(super) len: u64,
    pub(super) atime: (i64, i64),
    pub(super) mtime: (i64, i64),
}

impl Entry {
    pub(super) fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
}

pub(super) fn is_dir(e: Option<&Entry>) -> bool {
    e.is_some_and(Entry::is_dir)
}

/// Reads the entry at `path` without following symlinks; `None` if absent.
pub(super) fn read_entry(path: &Path) -> Result<Option<Entry>> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading metadata of {}", path.display())),
    };
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        let t =
            fs::read_link(path).with_context(|| format!("reading symlink {}", path.display()))?;
        Kind::Symlink(t)
    } else {
        Kind::Special {
            fmt: md.mode() & libc::S_IFMT,
            rdev: md.rdev(),
        }
    };
    let mode = if ft.is_symlink() {
        0
    } else {
        md.mode() & 0o7777
    };
    let meta = Meta {
        mode,
        uid: md.uid(),
        gid: md.gid(),
        xattrs: read_xattrs(path)?,
    };
    Ok(Some(Entry {
        path: path.to_path_buf(),
        kind,
        meta,
        len: md.len(),
        atime: (md.atime(), md.atime_nsec()),
        mtime: (md.mtime(), md.mtime_nsec()),
    }))
}

/// Reads a tree's root: absent is fine, anything but a directory is an error.
pub(super) fn root_entry(path: &Path) -> Result<Option<Entry>> {
    match read_entry(path)? {
        Some(e) if !e.is_dir() => bail!("{} is not a directory", path.display()),
        e => Ok(e),
    }
}

/// Creates `target` when missing; returns whether it did.
pub(super) fn ensure_target_root(target: &Path, local: Option<&Entry>) -> Result<bool> {
    if let Some(t) = read_entry(target)? {
        if !t.is_dir() {
            bail!("{} is not a directory", target.display());
        }
        return Ok(false);
    }
    fs::create_dir(target).with_context(|| format!("creating {}", target.display()))?;
    if let Some(l) = local {
        apply_meta(target, &l.meta, false)?;
    }
    Ok(true)
}

pub(super) fn is_empty_dir(path: &Path) -> Result<bool> {
    let mut it = fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?;
    Ok(it.next().is_none())
}

pub(super) fn list_names(dir: &Path) -> Result<BTreeSet<OsString>> {
    let mut names = BTreeSet::new();
    for ent in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let ent = ent.with_context(|| format!("listing {}", dir.display()))?;
        names.insert(ent.file_name());
    }
    Ok(names)
}

// ---------------------------------------------------------------------------
// Comparison

/// Whether two optional entries are in the same state (directories deeply).
pub(super) fn same(a: Option<&Entry>, b: Option<&Entry>) -> Result<bool> {
    match (a, b) {
        (None, None) => Ok(true),
        (Some(a), Some(b)) => same_entry(a, b),
        _ => Ok(false),
    }
}

pub(super) fn same_entry(a: &Entry, b: &Entry) -> Result<bool> {
    if a.meta != b.meta {
        return Ok(false);
    }
    match (&a.kind, &b.kind) {
        (Kind::File, Kind::File) => files_equal(a, b),
        (Kind::Dir, Kind::Dir) => dirs_equal(&a.path, &b.path),
        (x, y) => Ok(x == y),
    }
}

pub(super) fn dirs_equal(a: &Path, b: &Path) -> Result<bool> {
    let names = list_names(a)?;
    if names != list_names(b)? {
        return Ok(false);
    }
    for name in &names {
        let ea = read_entry(&a.join(name))?;
        let eb = read_entry(&b.join(name))?;
        if !same(ea.as_ref(), eb.as_ref())? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Compares two regular files' data.
pub(super) fn files_equal(a: &Entry, b: &Entry) -> Result<bool> {
    if a.len != b.len {
        return Ok(false);
    }
    let open = |p: &Path| fs::File::open(p).with_context(|| format!("opening {}", p.display()));
    let (mut fa, mut fb) = (open(&a.path)?, open(&b.path)?);
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let na =
            read_full(&mut fa, &mut ba).with_context(|| format!("reading {}", a.path.display()))?;
        let nb =
            read_full(&mut fb, &mut bb).with_context(|| format!("reading {}", b.path.display()))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

pub(super) fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
