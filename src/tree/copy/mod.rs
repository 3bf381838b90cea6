//! Copying root filesystem trees with everything preserved (design §4), and
//! delta-syncing a new tree into a snapshot of an older one (design §3).
//!
//! Preserved: numeric owner, mode (setuid/setgid/sticky), atime and mtime with
//! nanoseconds, symlinks (never followed), hard links, device nodes, FIFOs,
//! sockets, all extended attributes (`security.capability`, POSIX ACLs, …),
//! sparse files (holes stay holes) and empty directories. File data is
//! reflinked (FICLONE) when source and target are on one Btrfs, else copied
//! with `copy_file_range`, else with read/write.
//!
//! Work is spread over threads through a bounded queue of directory jobs, so
//! memory does not grow with the size of the tree.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

mod engine;
mod sync;
pub(crate) mod sys;
pub mod testing;

use engine::{Counts, DirNode, Engine, Mode};
use sys::{dst_err, src_err, Kind, Meta};

/// Live counters the caller polls to draw progress (shared across worker threads).
#[derive(Debug, Default)]
pub struct Progress {
    /// Entries processed so far (any type; for sync: compared or written).
    pub entries: AtomicU64,
    /// File data bytes copied or reflinked so far.
    pub bytes: AtomicU64,
}

/// Options of [`copy_tree`] and [`move_contents`].
#[derive(Debug, Default, Clone)]
pub struct CopyOptions {
    /// Worker threads; 0 means the number of available CPUs.
    pub threads: usize,
    /// Counters to update while copying.
    pub progress: Option<Arc<Progress>>,
}

/// What [`copy_tree`] or [`move_contents`] created.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files created (hard links to them not counted).
    pub files: u64,
    /// Directories created (the target root not counted).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Device nodes, FIFOs and sockets created.
    pub specials: u64,
    /// Extra names created as hard links to an already copied file.
    pub hardlinks: u64,
    /// Bytes of file content (logical size, holes included).
    pub bytes: u64,
    /// Part of `bytes` that was reflinked instead of copied.
    pub reflinked_bytes: u64,
}

impl From<&Counts> for CopyStats {
    fn from(c: &Counts) -> Self {
        CopyStats {
            files: c.files,
            dirs: c.dirs,
            symlinks: c.symlinks,
            specials: c.specials,
            hardlinks: c.hardlinks,
            bytes: c.bytes,
            reflinked_bytes: c.reflinked_bytes,
        }
    }
}

/// Options of [`sync_tree`].
#[derive(Debug, Default, Clone)]
pub struct SyncOptions {
    /// Compare file content instead of mtime to decide whether a file changed
    /// (a file with equal content keeps its data; only its metadata is fixed).
    pub checksum: bool,
    /// Worker threads; 0 means the number of available CPUs.
    pub threads: usize,
    /// Counters to update while syncing.
    pub progress: Option<Arc<Progress>>,
    /// Names directly under the root to leave alone on both sides.
    pub exclude_top: Vec<OsString>,
    /// Paths (relative to the root) left in the target when the source
    /// lacks them: what an extension writes whole and updates in place.
    pub keep_absent: Vec<PathBuf>,
}

/// What [`sync_tree`] did. Every entry of the source (the root included) is
/// counted once in `unchanged`, `written` or `metadata_only`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncStats {
    /// Entries that were already identical.
    pub unchanged: u64,
    /// Entries created or replaced (new, changed content, type change, relinked).
    pub written: u64,
    /// Entries whose content was kept and only metadata fixed.
    pub metadata_only: u64,
    /// Target entries removed because the source lacks them (each entry inside
    /// a removed directory counts too).
    pub deleted: u64,
    /// Bytes of file content written from the source (logical size).
    pub bytes_written: u64,
}

/// The target ran out of space. Its message, "no space left on the target
/// while writing PATH", is meant for users; callers can also find it in an
/// error chain with `err.downcast_ref::<NoSpaceError>()`.
#[derive(Debug, Clone)]
pub struct NoSpaceError {
    /// The target path being written when space ran out.
    pub path: PathBuf,
}

impl fmt::Display for NoSpaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no space left on the target while writing {}",
            self.path.display()
        )
    }
}

impl std::error::Error for NoSpaceError {}

/// Copy the *contents* of directory `src` into existing empty directory `dst`,
/// then give `dst` the metadata of `src`.
///
/// Fails if `src` or `dst` is a symlink or not a directory, if `dst` is not
/// empty, or if one is inside the other.
pub fn copy_tree(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<CopyStats> {
    check_roots(src, dst)
        .and_then(|sm| run_copy(src, dst, &sm, opts, Vec::new()))
        .with_context(|| format!("copying {} into {}", src.display(), dst.display()))
}

/// Copies `src` into `dst` (both checked), skipping the top-level names in `exclude`.
fn run_copy(
    src: &Path,
    dst: &Path,
    sm: &Meta,
    opts: &CopyOptions,
    exclude: Vec<OsString>,
) -> Result<CopyStats> {
    let threads = thread_count(opts.threads);
    let engine = Engine::new(threads, opts.progress.as_deref(), false);
    let mut root = DirNode::new(src.to_path_buf(), dst.to_path_buf(), *sm, Mode::Copy);
    root.exclude = exclude;
    let counts = engine.run(root, threads)?;
    Ok(CopyStats::from(&counts))
}

/// Move the contents of `src` into the empty directory `dst`, preserving
/// everything; `src` stays as an empty directory (with its times restored) and
/// `dst` gets the metadata of `src`.
///
/// Entries are renamed when the kernel allows it (then only those top-level
/// entries are counted in the stats); across Btrfs subvolumes rename fails
/// with EXDEV, so the contents are copied (reflinked where possible) and the
/// originals deleted afterwards.
pub fn move_contents(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<CopyStats> {
    move_contents_inner(src, dst, opts).with_context(|| {
        format!(
            "moving the contents of {} into {}",
            src.display(),
            dst.display()
        )
    })
}

fn move_contents_inner(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<CopyStats> {
    let sm = check_roots(src, dst)?;
    let names = sys::list_dir(src).map_err(|e| src_err(e, "listing directory", src))?;
    let mut renamed = Vec::new();
    let mut counts = Counts::default();
    for name in &names {
        let (from, to) = (src.join(name), dst.join(name));
        let m = sys::lstat(&from).map_err(|e| src_err(e, "reading metadata of", &from))?;
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                count_kind(&mut counts, &m);
                renamed.push(name.clone());
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => break,
            Err(e) => return Err(dst_err(e, &format!("moving {} to", from.display()), &to)),
        }
    }
    let copied = run_copy(src, dst, &sm, opts, renamed.clone())?;
    for name in names.iter().filter(|n| !renamed.contains(n)) {
        sys::remove_tree_counted(&src.join(name), &mut 0)?;
    }
    sys::set_path_times(src, sm.atime, sm.mtime)?;
    let mut stats = copied;
    stats.files += counts.files;
    stats.dirs += counts.dirs;
    stats.symlinks += counts.symlinks;
    stats.specials += counts.specials;
    Ok(stats)
}

fn count_kind(c: &mut Counts, m: &Meta) {
    match m.kind() {
        Kind::Dir => c.dirs += 1,
        Kind::File => c.files += 1,
        Kind::Symlink => c.symlinks += 1,
        Kind::Special => c.specials += 1,
    }
}

/// Copy into `dst` every entry of `src` whose path does not exist in `dst`
/// yet, preserving everything (design §3: seeding `/state` with what a new
/// version ships). Entries already in `dst`, files or directories, are left
/// exactly as they are; directories present on both sides are searched
/// further; a symlink in `dst` is never followed. Each missing entry is built
/// under a temporary name beside its place and renamed into it, so an
/// interruption never leaves a half-copied entry under the real name.
/// Returns the paths seeded, relative to `dst`, in sorted order.
///
/// Only what is missing is read and written (the cost is a walk of `src`
/// plus the missing data). Hard links between two different seeded entries
/// become separate files; within one seeded directory they are kept.
pub fn copy_missing(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<Vec<PathBuf>> {
    let mut seeded = Vec::new();
    check_roots_exist(src, dst)
        .and_then(|_| missing_into(src, dst, Path::new(""), opts, &mut seeded))
        .with_context(|| {
            format!(
                "copying what {} lacks from {}",
                dst.display(),
                src.display()
            )
        })?;
    Ok(seeded)
}

fn missing_into(
    src: &Path,
    dst: &Path,
    rel: &Path,
    opts: &CopyOptions,
    seeded: &mut Vec<PathBuf>,
) -> Result<()> {
    let (sdir, ddir) = (src.join(rel), dst.join(rel));
    let names = sys::list_dir(&sdir).map_err(|e| src_err(e, "listing directory", &sdir))?;
    for name in names {
        crate::util::signals::check()?;
        let (s, d) = (sdir.join(&name), ddir.join(&name));
        let sm = sys::lstat(&s).map_err(|e| src_err(e, "reading metadata of", &s))?;
        match sys::lstat_opt(&d).map_err(|e| src_err(e, "reading metadata of", &d))? {
            None => {
                seed_one(&s, &d, &sm, opts)?;
                seeded.push(rel.join(&name));
            }
            Some(dm) if dm.kind() == Kind::Dir && sm.kind() == Kind::Dir => {
                missing_into(src, dst, &rel.join(&name), opts, seeded)?;
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Copies `s` to a temporary name beside `d`, then renames it to `d`.
fn seed_one(s: &Path, d: &Path, sm: &Meta, opts: &CopyOptions) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let parent = d.parent().unwrap_or(Path::new("/"));
    let tmp = parent.join(format!(".btrfs-deploy-seed.{}.{n}", std::process::id()));
    let made = if sm.kind() == Kind::Dir {
        sys::mkdir(&tmp, 0o700)
            .map_err(|e| dst_err(e, "creating directory", &tmp))
            .and_then(|()| run_copy(s, &tmp, sm, opts, Vec::new()).map(drop))
    } else {
        let engine = Engine::new(1, opts.progress.as_deref(), false);
        engine.make_nondir(s, &tmp, sm, &mut Counts::default(), None)
    };
    let result = made.and_then(|()| {
        std::fs::rename(&tmp, d)
            .map_err(|e| dst_err(e, &format!("renaming {} to", tmp.display()), d))
    });
    if result.is_err() {
        let _ = sys::remove_tree_counted(&tmp, &mut 0);
    }
    result
}

/// Builds a copy of `src` (any type; a directory with everything below it,
/// everything preserved, data reflinked where possible) at `tmp`, which must
/// not exist. On failure whatever was built at `tmp` is removed.
pub(crate) fn copy_entry(src: &Path, tmp: &Path) -> Result<()> {
    let sm = sys::lstat(src).map_err(|e| src_err(e, "reading metadata of", src))?;
    let made = if sm.kind() == Kind::Dir {
        sys::mkdir(tmp, 0o700)
            .map_err(|e| dst_err(e, "creating directory", tmp))
            .and_then(|()| run_copy(src, tmp, &sm, &CopyOptions::default(), Vec::new()).map(drop))
    } else {
        let engine = Engine::new(1, None, false);
        engine.make_nondir(src, tmp, &sm, &mut Counts::default(), None)
    };
    if made.is_err() {
        let _ = sys::remove_tree_counted(tmp, &mut 0);
    }
    made
}

/// Make `dst` (a snapshot of an older tree) identical to `src`, touching only
/// what differs.
///
/// An entry is unchanged when type, size, mtime (ns), mode, owner, symlink
/// target, xattrs and device number are equal (with `checksum`, equal content
/// replaces equal mtime). Changed file content is written to a new file beside
/// the old one and renamed over it, so it no longer shares extents; metadata
/// differences are fixed in place; type changes replace the entry; entries
/// missing from `src` are deleted. Hard-link groups of `src` are reproduced
/// exactly. Directory metadata is fixed after the directory's children.
pub fn sync_tree(src: &Path, dst: &Path, opts: &SyncOptions) -> Result<SyncStats> {
    sync_tree_inner(src, dst, opts)
        .with_context(|| format!("syncing {} into {}", src.display(), dst.display()))
}

fn sync_tree_inner(src: &Path, dst: &Path, opts: &SyncOptions) -> Result<SyncStats> {
    let sm = check_roots_exist(src, dst)?;
    let dm = sys::lstat(dst).map_err(|e| src_err(e, "reading metadata of", dst))?;
    let threads = thread_count(opts.threads);
    let mut engine = Engine::new(threads, opts.progress.as_deref(), opts.checksum);
    engine.keep = opts.keep_absent.iter().map(|p| dst.join(p)).collect();
    let mut root = DirNode::new(src.to_path_buf(), dst.to_path_buf(), sm, Mode::Sync);
    root.orig_dst = Some(dm);
    root.exclude = opts.exclude_top.clone();
    let c = engine.run(root, threads)?;
    Ok(SyncStats {
        unchanged: c.unchanged,
        written: c.written,
        metadata_only: c.metadata_only,
        deleted: c.deleted,
        bytes_written: c.bytes,
    })
}

/// Recursively delete a tree without following symlinks (used for cleanup).
/// A symlink at `path` is removed itself; a missing `path` is not an error.
/// Refuses to descend into anything mounted inside the tree.
pub fn remove_tree(path: &Path) -> Result<()> {
    sys::remove_tree_counted(path, &mut 0)
}

/// Default workers: one per CPU, but at least 4 and at most 16. Copying and
/// syncing a tree wait on I/O (cold metadata and small-file reads) much more
/// than they compute, so a few more workers than CPUs keep the disk busy;
/// beyond 16, Btrfs tree locks make more workers slower.
const MIN_THREADS: usize = 4;
const MAX_THREADS: usize = 16;

fn thread_count(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(MIN_THREADS, MAX_THREADS)
    }
}

/// Checks that `src` and `dst` are real (non-symlink) directories, neither
/// inside the other, and `dst` is empty. Returns `src`'s metadata.
fn check_roots(src: &Path, dst: &Path) -> Result<Meta> {
    let sm = check_roots_exist(src, dst)?;
    let names = sys::list_dir(dst).map_err(|e| src_err(e, "listing directory", dst))?;
    if !names.is_empty() {
        bail!("target directory {} is not empty", dst.display());
    }
    Ok(sm)
}

fn check_roots_exist(src: &Path, dst: &Path) -> Result<Meta> {
    let sm = check_dir(src, "source")?;
    check_dir(dst, "target")?;
    let sc = src
        .canonicalize()
        .with_context(|| format!("resolving {}", src.display()))?;
    let dc = dst
        .canonicalize()
        .with_context(|| format!("resolving {}", dst.display()))?;
    if sc.starts_with(&dc) || dc.starts_with(&sc) {
        bail!(
            "source {} and target {} overlap",
            src.display(),
            dst.display()
        );
    }
    Ok(sm)
}

fn check_dir(path: &Path, what: &str) -> Result<Meta> {
    let m = sys::lstat(path).map_err(|e| src_err(e, "reading metadata of", path))?;
    match m.kind() {
        Kind::Dir => Ok(m),
        Kind::Symlink => bail!(
            "{what} {} is a symlink; refusing to follow it",
            path.display()
        ),
        _ => bail!("{what} {} is not a directory", path.display()),
    }
}

#[cfg(test)]
mod tests;
