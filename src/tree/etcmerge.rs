//! Three-way merge of `/etc` for upgrades.
//!
//! When a new version is added, its `run` subvolume starts as a snapshot of
//! its `orig` (the vendor's new files). The changes the user made in the old
//! default's `run/etc` relative to the old default's `orig/etc` are carried
//! into the new `run/etc` by [`merge_etc`]:
//!
//! - base   = old `orig/etc`
//! - local  = old `run/etc`
//! - vendor = new `orig/etc`
//! - target = new `run/etc` (equal to vendor on entry; written in place)
//!
//! Entries are compared by type, content (regular files), symlink target,
//! device number (special files), permission bits, numeric owner and
//! extended attributes; symlinks are never followed. Nothing is dropped
//! silently: every local change is either applied (`carried`), merged with
//! the vendor's change (`merged`) or reported as a [`Conflict`], in which case
//! the vendor's entry stays in place and the user's version of a file or
//! symlink is saved beside it as `<name>.deploy-local`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsString};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::tree::copy;
use crate::tree::nssmerge;

/// Suffix of the copy of the user's version written beside a conflicting entry.
pub const LOCAL_COPY_SUFFIX: &str = ".deploy-local";

/// Largest number of line insertions plus deletions the line diff explores
/// before giving up on finding common lines (bounds time and memory; a file
/// rewritten beyond that on both sides becomes a conflict).
const MAX_EDIT_DISTANCE: usize = 4000;

/// A local change that could not be merged with the new version.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Conflict {
    /// Path relative to `etc`, e.g. `ssh/sshd_config` (`.` for `etc` itself).
    pub path: String,
    /// Why it could not be merged (human readable).
    pub reason: String,
    /// Where the user's version was saved, relative to `etc`
    /// (e.g. `ssh/sshd_config.deploy-local`), if it was saved.
    pub local_copy: Option<String>,
}

/// What [`merge_etc`] did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct MergeReport {
    /// Local changes applied as they were (the new version had not changed
    /// the entry), relative to `etc`.
    pub carried: Vec<String>,
    /// Entries changed on both sides whose changes were merged cleanly.
    pub merged: Vec<String>,
    /// Entries whose local changes could not be merged.
    pub conflicts: Vec<Conflict>,
}

impl MergeReport {
    /// True when the merge produced no conflict.
    #[cfg(test)]
    pub fn is_clean(&self) -> bool {
        self.conflicts.is_empty()
    }
}

/// Carries the user's changes (`local` relative to `base`) into `target`,
/// which on entry holds the same tree as `vendor`.
///
/// Any of `base`, `local` and `vendor` may be missing: it is treated as an
/// empty directory. `target` is created when missing (and removed again if
/// it stays empty). Errors name the path that failed; a failure may leave
/// `target` partly merged, so the caller should discard the new version.
pub fn merge_etc(base: &Path, local: &Path, vendor: &Path, target: &Path) -> Result<MergeReport> {
    let b = root_entry(base)?;
    let l = root_entry(local)?;
    let v = root_entry(vendor)?;
    let created = ensure_target_root(target, l.as_ref())?;
    let mut merger = Merger {
        target: target.to_path_buf(),
        report: MergeReport::default(),
        pending: Vec::new(),
        nss_dropped: Vec::new(),
    };
    match (&l, &v) {
        (Some(_), Some(_)) => merger.dir_node(Path::new(""), b, l.as_ref(), v.as_ref())?,
        _ => merger.walk_children(
            Path::new(""),
            [b.map(|e| e.path), l.map(|e| e.path), v.map(|e| e.path)],
        )?,
    }
    merger.write_local_copies()?;
    if created && is_empty_dir(target)? {
        fs::remove_dir(target).with_context(|| format!("removing {}", target.display()))?;
    }
    Ok(merger.report)
}

// ---------------------------------------------------------------------------
// Entries

/// Type of a directory entry, with what identifies its content besides data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
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
    fn same_type(&self, other: &Kind) -> bool {
        match (self, other) {
            (Kind::File, Kind::File) | (Kind::Symlink(_), Kind::Symlink(_)) => true,
            (Kind::Special { fmt: a, .. }, Kind::Special { fmt: b, .. }) => a == b,
            _ => false,
        }
    }

    fn name(&self) -> &'static str {
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
struct Meta {
    /// Permission bits incl. setuid/setgid/sticky (0 for symlinks).
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// One directory entry as found on disk.
#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    kind: Kind,
    meta: Meta,
    len: u64,
    atime: (i64, i64),
    mtime: (i64, i64),
}

impl Entry {
    fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
}

fn is_dir(e: Option<&Entry>) -> bool {
    e.is_some_and(Entry::is_dir)
}

/// Reads the entry at `path` without following symlinks; `None` if absent.
fn read_entry(path: &Path) -> Result<Option<Entry>> {
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
fn root_entry(path: &Path) -> Result<Option<Entry>> {
    match read_entry(path)? {
        Some(e) if !e.is_dir() => bail!("{} is not a directory", path.display()),
        e => Ok(e),
    }
}

/// Creates `target` when missing; returns whether it did.
fn ensure_target_root(target: &Path, local: Option<&Entry>) -> Result<bool> {
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

fn is_empty_dir(path: &Path) -> Result<bool> {
    let mut it = fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?;
    Ok(it.next().is_none())
}

fn list_names(dir: &Path) -> Result<BTreeSet<OsString>> {
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
fn same(a: Option<&Entry>, b: Option<&Entry>) -> Result<bool> {
    match (a, b) {
        (None, None) => Ok(true),
        (Some(a), Some(b)) => same_entry(a, b),
        _ => Ok(false),
    }
}

fn same_entry(a: &Entry, b: &Entry) -> Result<bool> {
    if a.meta != b.meta {
        return Ok(false);
    }
    match (&a.kind, &b.kind) {
        (Kind::File, Kind::File) => files_equal(a, b),
        (Kind::Dir, Kind::Dir) => dirs_equal(&a.path, &b.path),
        (x, y) => Ok(x == y),
    }
}

fn dirs_equal(a: &Path, b: &Path) -> Result<bool> {
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
fn files_equal(a: &Entry, b: &Entry) -> Result<bool> {
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

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
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

/// Outcome of a three-way choice between the local and the vendor's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    Vendor,
    Local,
    Conflict,
}

/// Three-way choice for one comparable value.
fn pick<T: PartialEq>(base: Option<&T>, local: &T, vendor: &T) -> Pick {
    if local == vendor || base == Some(local) {
        Pick::Vendor
    } else if base == Some(vendor) {
        Pick::Local
    } else {
        Pick::Conflict
    }
}

// ---------------------------------------------------------------------------
// The merge walk

/// The merged content of a non-directory entry.
enum Content {
    Vendor,
    Local,
    Merged(Vec<u8>),
}

/// A user's version to save as `<path>.deploy-local` once the walk is done.
struct PendingCopy {
    conflict: usize,
    rel: PathBuf,
    local: Entry,
}

struct Merger {
    target: PathBuf,
    report: MergeReport,
    pending: Vec<PendingCopy>,
    /// Names the NSS merge left out of `passwd`/`group` (their `shadow`/`gshadow` lines go too).
    nss_dropped: Vec<(nssmerge::Db, BTreeSet<String>)>,
}

fn rel_name(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.to_string_lossy().into_owned()
    }
}

fn octal(mode: u32) -> String {
    format!("{mode:04o}")
}

impl Merger {
    /// Walks the union of the children of the three directories (`None`:
    /// that side has no directory here).
    fn walk_children(&mut self, rel: &Path, dirs: [Option<PathBuf>; 3]) -> Result<()> {
        let mut names = BTreeSet::new();
        for d in dirs.iter().flatten() {
            names.extend(list_names(d)?);
        }
        for name in names {
            let mut child = [None, None, None];
            for (slot, d) in child.iter_mut().zip(&dirs) {
                if let Some(d) = d {
                    *slot = read_entry(&d.join(&name))?;
                }
            }
            let [b, l, v] = child;
            self.node(&rel.join(&name), b, l.as_ref(), v.as_ref())?;
        }
        Ok(())
    }

    /// Merges one path, whose target equals `v` on entry.
    fn node(
        &mut self,
        rel: &Path,
        b: Option<Entry>,
        l: Option<&Entry>,
        v: Option<&Entry>,
    ) -> Result<()> {
        if is_dir(l) && is_dir(v) {
            return self.dir_node(rel, b, l, v);
        }
        if same(l, b.as_ref())? || same(l, v)? {
            return Ok(());
        }
        let vendor_unchanged = same(v, b.as_ref())?;
        match (l, v) {
            (Some(le), Some(ve)) if le.kind.same_type(&ve.kind) => {
                self.merge_same_type(rel, b.as_ref(), le, ve, vendor_unchanged)
            }
            _ if vendor_unchanged => self.take_local(rel, l),
            _ => self.shape_conflict(rel, b.as_ref(), l, v),
        }
    }

    /// Local and vendor are both directories: merge their metadata, then
    /// their children.
    fn dir_node(
        &mut self,
        rel: &Path,
        b: Option<Entry>,
        l: Option<&Entry>,
        v: Option<&Entry>,
    ) -> Result<()> {
        let (Some(l), Some(v)) = (l, v) else {
            bail!(
                "internal error: dir_node without two directories at {}",
                rel_name(rel)
            );
        };
        let b = b.filter(Entry::is_dir);
        let mut reasons = Vec::new();
        let chosen = merge_meta(
            b.as_ref().map(|e| &e.meta),
            &l.meta,
            &v.meta,
            false,
            &mut reasons,
        );
        if !reasons.is_empty() {
            self.conflict(
                rel,
                format!("{}; kept the new version's", reasons.join("; ")),
                None,
            );
        } else if chosen != v.meta {
            apply_meta(&self.target.join(rel), &chosen, false)?;
            let vendor_unchanged = b.as_ref().is_some_and(|b| b.meta == v.meta);
            self.record(rel, vendor_unchanged);
        }
        let b = b.map(|e| e.path);
        self.walk_children(rel, [b, Some(l.path.clone()), Some(v.path.clone())])
    }

    /// Local and vendor are non-directories of the same type, changed
    /// differently: merge content and metadata field by field.
    fn merge_same_type(
        &mut self,
        rel: &Path,
        b: Option<&Entry>,
        l: &Entry,
        v: &Entry,
        vendor_unchanged: bool,
    ) -> Result<()> {
        let b = b.filter(|b| b.kind.same_type(&l.kind));
        if let (Some(db), Kind::File, Kind::File, false) =
            (nssmerge::Db::of(rel), &l.kind, &v.kind, vendor_unchanged)
        {
            return self.merge_nss(rel, db, b, l, v);
        }
        let mut reasons = Vec::new();
        let content = merge_content(b, l, v, &mut reasons)?;
        let is_symlink = matches!(l.kind, Kind::Symlink(_));
        let chosen = merge_meta(
            b.map(|e| &e.meta),
            &l.meta,
            &v.meta,
            is_symlink,
            &mut reasons,
        );
        if !reasons.is_empty() {
            let idx = self.conflict(rel, reasons.join("; "), None);
            self.pending.push(PendingCopy {
                conflict: idx,
                rel: rel.to_path_buf(),
                local: l.clone(),
            });
            return Ok(());
        }
        let path = self.target.join(rel);
        match content {
            Content::Vendor if chosen == v.meta => return Ok(()),
            Content::Vendor => {}
            Content::Local => {
                remove_node(&path)?;
                copy_node(l, &path)?;
            }
            Content::Merged(bytes) => write_replace(&path, &bytes)?,
        }
        apply_meta(&path, &chosen, is_symlink)?;
        self.record(rel, vendor_unchanged);
        Ok(())
    }

    /// `passwd`, `group`, `shadow`, ... changed on both sides: merged entry
    /// by entry ([`nssmerge`]); the result is always written (a user added
    /// on the device must keep logging in), every conflict is reported.
    fn merge_nss(
        &mut self,
        rel: &Path,
        db: nssmerge::Db,
        b: Option<&Entry>,
        l: &Entry,
        v: &Entry,
    ) -> Result<()> {
        let read = |p: &Path| fs::read(p).with_context(|| format!("reading {}", p.display()));
        let base = match b {
            Some(b) => Some(read(&b.path)?),
            None => None,
        };
        let (local, vendor) = (read(&l.path)?, read(&v.path)?);
        let drop = db
            .follows()
            .and_then(|f| self.nss_dropped.iter().find(|(d, _)| *d == f))
            .map(|(_, names)| names.clone())
            .unwrap_or_default();
        let merged = nssmerge::merge(db, base.as_deref(), &local, &vendor, &drop);
        self.nss_dropped.push((db, merged.dropped));
        let mut reasons = Vec::new();
        let chosen = merge_meta(b.map(|e| &e.meta), &l.meta, &v.meta, false, &mut reasons);
        for note in merged.notes {
            self.conflict(rel, note, None);
        }
        for r in reasons {
            self.conflict(rel, format!("{r}; kept the new version's"), None);
        }
        let path = self.target.join(rel);
        if merged.data != vendor {
            // The temporary file is created 0600: never more readable than the result.
            write_replace(&path, &merged.data)?;
        }
        apply_meta(&path, &chosen, false)?;
        self.record(rel, false);
        Ok(())
    }

    /// The vendor left the entry as it was: the user's state replaces it.
    fn take_local(&mut self, rel: &Path, l: Option<&Entry>) -> Result<()> {
        let path = self.target.join(rel);
        remove_node(&path)?;
        if let Some(l) = l {
            copy_node(l, &path)?;
        }
        self.record(rel, true);
        Ok(())
    }

    /// Both sides changed the entry into different types (or one deleted it):
    /// keep the vendor's, save the user's file or symlink.
    fn shape_conflict(
        &mut self,
        rel: &Path,
        b: Option<&Entry>,
        l: Option<&Entry>,
        v: Option<&Entry>,
    ) -> Result<()> {
        let mut reason = match (l, v) {
            (None, Some(_)) => "deleted locally, changed by the new version".to_string(),
            (Some(_), None) => "changed locally, deleted by the new version".to_string(),
            (Some(le), Some(ve)) if b.is_none() => format!(
                "added locally as a {} and by the new version as a {}",
                le.kind.name(),
                ve.kind.name()
            ),
            (Some(le), Some(ve)) => format!(
                "changed locally into a {} and by the new version into a {}",
                le.kind.name(),
                ve.kind.name()
            ),
            (None, None) => bail!("internal error: no change at {}", rel_name(rel)),
        };
        match l {
            Some(le) if le.is_dir() => {
                reason.push_str(
                    "; the local directory was not copied (it remains in the previous version)",
                );
                self.conflict(rel, reason, None);
            }
            Some(le) => {
                let idx = self.conflict(rel, reason, None);
                self.pending.push(PendingCopy {
                    conflict: idx,
                    rel: rel.to_path_buf(),
                    local: le.clone(),
                });
            }
            None => {
                self.conflict(rel, reason, None);
            }
        }
        Ok(())
    }

    fn record(&mut self, rel: &Path, vendor_unchanged: bool) {
        let name = rel_name(rel);
        if vendor_unchanged {
            self.report.carried.push(name);
        } else {
            self.report.merged.push(name);
        }
    }

    fn conflict(&mut self, rel: &Path, reason: String, local_copy: Option<String>) -> usize {
        self.report.conflicts.push(Conflict {
            path: rel_name(rel),
            reason,
            local_copy,
        });
        self.report.conflicts.len() - 1
    }

    /// Saves the user's versions of conflicting entries under a free
    /// `<name>.deploy-local[.N]` name (done last, so that no carried entry
    /// of that name overwrites them).
    fn write_local_copies(&mut self) -> Result<()> {
        for p in std::mem::take(&mut self.pending) {
            let rel = free_copy_name(&self.target, &p.rel)?;
            copy_node(&p.local, &self.target.join(&rel))?;
            self.report.conflicts[p.conflict].local_copy = Some(rel_name(&rel));
        }
        Ok(())
    }
}

/// `<rel>.deploy-local`, or `<rel>.deploy-local.N` if that exists in `target`.
fn free_copy_name(target: &Path, rel: &Path) -> Result<PathBuf> {
    for n in 1..1000 {
        let mut name = rel.as_os_str().to_owned();
        name.push(LOCAL_COPY_SUFFIX);
        if n > 1 {
            name.push(format!(".{n}"));
        }
        let cand = PathBuf::from(name);
        if read_entry(&target.join(&cand))?.is_none() {
            return Ok(cand);
        }
    }
    bail!(
        "no free name for a copy of {} in {}",
        rel.display(),
        target.display()
    )
}

/// Three-way merge of the content of two same-typed non-directories.
fn merge_content(
    b: Option<&Entry>,
    l: &Entry,
    v: &Entry,
    reasons: &mut Vec<String>,
) -> Result<Content> {
    match (&l.kind, &v.kind) {
        (Kind::File, Kind::File) => merge_file_data(b, l, v, reasons),
        (Kind::Symlink(lt), Kind::Symlink(vt)) => {
            let bt = b.and_then(|b| match &b.kind {
                Kind::Symlink(t) => Some(t),
                _ => None,
            });
            Ok(match pick(bt, lt, vt) {
                Pick::Vendor => Content::Vendor,
                Pick::Local => Content::Local,
                Pick::Conflict => {
                    reasons.push(format!(
                        "symlink changed locally (-> {}) and by the new version (-> {})",
                        lt.display(),
                        vt.display()
                    ));
                    Content::Vendor
                }
            })
        }
        (lk, vk) => Ok(match pick(b.map(|b| &b.kind), lk, vk) {
            Pick::Vendor => Content::Vendor,
            Pick::Local => Content::Local,
            Pick::Conflict => {
                reasons.push("device changed locally and by the new version".to_string());
                Content::Vendor
            }
        }),
    }
}

fn merge_file_data(
    b: Option<&Entry>,
    l: &Entry,
    v: &Entry,
    reasons: &mut Vec<String>,
) -> Result<Content> {
    if files_equal(l, v)? {
        return Ok(Content::Vendor);
    }
    if let Some(b) = b {
        if files_equal(b, l)? {
            return Ok(Content::Vendor);
        }
        if files_equal(b, v)? {
            return Ok(Content::Local);
        }
    }
    let read = |p: &Path| fs::read(p).with_context(|| format!("reading {}", p.display()));
    let base = match b {
        Some(b) => read(&b.path)?,
        None => Vec::new(),
    };
    let (local, vendor) = (read(&l.path)?, read(&v.path)?);
    if [&base, &local, &vendor].iter().any(|d| d.contains(&0)) {
        reasons.push("binary file changed locally and by the new version".to_string());
        return Ok(Content::Vendor);
    }
    Ok(match merge_lines(&base, &local, &vendor) {
        LineMerge::Clean(bytes) => Content::Merged(bytes),
        LineMerge::Conflict { hunks } => {
            let what = if b.is_some() { "changed" } else { "added" };
            reasons.push(format!(
                "{what} locally and by the new version with conflicting lines ({hunks} conflicting hunk{})",
                if hunks == 1 { "" } else { "s" }
            ));
            Content::Vendor
        }
    })
}

/// Field-by-field three-way merge of metadata; conflicts are described in
/// `reasons` and resolved to the vendor's value.
fn merge_meta(
    b: Option<&Meta>,
    l: &Meta,
    v: &Meta,
    is_symlink: bool,
    reasons: &mut Vec<String>,
) -> Meta {
    let mut out = v.clone();
    if !is_symlink {
        match pick(b.map(|m| &m.mode), &l.mode, &v.mode) {
            Pick::Local => out.mode = l.mode,
            Pick::Conflict => reasons.push(format!(
                "mode changed locally ({}) and by the new version ({})",
                octal(l.mode),
                octal(v.mode)
            )),
            Pick::Vendor => {}
        }
    }
    let owner = |m: &Meta| (m.uid, m.gid);
    match pick(b.map(owner).as_ref(), &owner(l), &owner(v)) {
        Pick::Local => (out.uid, out.gid) = (l.uid, l.gid),
        Pick::Conflict => reasons.push(format!(
            "owner changed locally ({}:{}) and by the new version ({}:{})",
            l.uid, l.gid, v.uid, v.gid
        )),
        Pick::Vendor => {}
    }
    let keys: BTreeSet<&Vec<u8>> = l
        .xattrs
        .keys()
        .chain(v.xattrs.keys())
        .chain(b.iter().flat_map(|m| m.xattrs.keys()))
        .collect();
    for key in keys {
        let bv = b.map(|m| m.xattrs.get(key));
        match pick(bv.as_ref(), &l.xattrs.get(key), &v.xattrs.get(key)) {
            Pick::Local => match l.xattrs.get(key) {
                Some(val) => {
                    out.xattrs.insert(key.clone(), val.clone());
                }
                None => {
                    out.xattrs.remove(key);
                }
            },
            Pick::Conflict => reasons.push(format!(
                "extended attribute {} changed locally and by the new version",
                String::from_utf8_lossy(key)
            )),
            Pick::Vendor => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Writing

/// Removes a file, symlink or directory tree; absent is fine.
fn remove_node(path: &Path) -> Result<()> {
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
fn copy_node(src: &Entry, dst: &Path) -> Result<()> {
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
fn write_replace(path: &Path, data: &[u8]) -> Result<()> {
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
fn apply_meta(path: &Path, meta: &Meta, is_symlink: bool) -> Result<()> {
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

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> Result<()> {
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

fn path_target(path: &Path) -> copy::sys::Target<'_> {
    copy::sys::Target::Path {
        path,
        symlink: true,
    }
}

fn read_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let list = copy::sys::read_xattrs(path_target(path))
        .with_context(|| format!("listing extended attributes of {}", path.display()))?;
    Ok(list.into_iter().map(|(n, v)| (n.into_bytes(), v)).collect())
}

/// Makes the xattrs of `path` exactly `want`.
fn write_xattrs(path: &Path, want: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<()> {
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

// ---------------------------------------------------------------------------
// Line-based three-way merge (diff3)

/// Outcome of [`merge_lines`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineMerge {
    /// Both sides' changes applied; the merged bytes.
    Clean(Vec<u8>),
    /// Some regions were changed differently on both sides.
    Conflict {
        /// Number of conflicting regions.
        hunks: usize,
    },
}

/// Three-way merge of `local` and `vendor`, both derived from `base`, line by
/// line (diff3 semantics: changes to the same or to adjacent lines conflict
/// unless they are identical). Works on bytes; a missing final newline is
/// part of the last line.
pub fn merge_lines(base: &[u8], local: &[u8], vendor: &[u8]) -> LineMerge {
    let (b, l, v) = (split_lines(base), split_lines(local), split_lines(vendor));
    let mut ids = HashMap::new();
    let bi = intern(&mut ids, &b);
    let li = intern(&mut ids, &l);
    let vi = intern(&mut ids, &v);
    let regions = merge_regions(&bi, &li, &vi);
    let mut out = Vec::new();
    let mut hunks = 0;
    for r in regions {
        match r {
            Region::Base(s, e) => b[s..e].iter().for_each(|x| out.extend_from_slice(x)),
            Region::Local(s, e) => l[s..e].iter().for_each(|x| out.extend_from_slice(x)),
            Region::Vendor(s, e) => v[s..e].iter().for_each(|x| out.extend_from_slice(x)),
            Region::Conflict => hunks += 1,
        }
    }
    if hunks == 0 {
        LineMerge::Clean(out)
    } else {
        LineMerge::Conflict { hunks }
    }
}

/// Maps equal lines to equal numbers (shared across the three inputs).
fn intern<'a>(ids: &mut HashMap<&'a [u8], u32>, lines: &[&'a [u8]]) -> Vec<u32> {
    lines
        .iter()
        .map(|line| {
            let next = ids.len() as u32;
            *ids.entry(*line).or_insert(next)
        })
        .collect()
}

/// Splits after each `\n`; the last line may lack it.
fn split_lines(data: &[u8]) -> Vec<&[u8]> {
    data.split_inclusive(|&c| c == b'\n').collect()
}

/// A piece of the merge result: a range of one input's lines, or a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Region {
    Base(usize, usize),
    Local(usize, usize),
    Vendor(usize, usize),
    Conflict,
}

/// Runs of equal lines: (start in a, start in b, length).
type Blocks = Vec<(usize, usize, usize)>;

/// The diff3 merge proper (the sync-region formulation of bzr's merge3):
/// regions where base, local and vendor all agree are kept; between them
/// the side that changed wins, identical changes are taken once, and
/// different changes conflict.
fn merge_regions(base: &[u32], a: &[u32], b: &[u32]) -> Vec<Region> {
    let mut out = Vec::new();
    let (mut iz, mut ia, mut ib) = (0, 0, 0);
    for (zs, ze, as_, ae, bs, be) in sync_regions(base, a, b) {
        if as_ > ia || bs > ib {
            let equal_a = base[iz..zs] == a[ia..as_];
            let equal_b = base[iz..zs] == b[ib..bs];
            if a[ia..as_] == b[ib..bs] {
                out.push(Region::Local(ia, as_));
            } else if equal_a {
                out.push(Region::Vendor(ib, bs));
            } else if equal_b {
                out.push(Region::Local(ia, as_));
            } else {
                out.push(Region::Conflict);
            }
        }
        if ze > zs {
            out.push(Region::Base(zs, ze));
        }
        (iz, ia, ib) = (ze, ae, be);
    }
    out
}

/// Regions where all three agree, as (base start, base end, a start, a end,
/// b start, b end), ending with an empty region at the ends of all three.
fn sync_regions(
    base: &[u32],
    a: &[u32],
    b: &[u32],
) -> Vec<(usize, usize, usize, usize, usize, usize)> {
    let am = matching_blocks(base, a);
    let bm = matching_blocks(base, b);
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < am.len() && j < bm.len() {
        let (abase, amatch, alen) = am[i];
        let (bbase, bmatch, blen) = bm[j];
        let start = abase.max(bbase);
        let end = (abase + alen).min(bbase + blen);
        if start < end {
            let asub = amatch + (start - abase);
            let bsub = bmatch + (start - bbase);
            let len = end - start;
            out.push((start, end, asub, asub + len, bsub, bsub + len));
        }
        if abase + alen < bbase + blen {
            i += 1;
        } else {
            j += 1;
        }
    }
    out.push((base.len(), base.len(), a.len(), a.len(), b.len(), b.len()));
    out
}

/// Matching blocks of a longest common subsequence of `a` and `b`.
fn matching_blocks(a: &[u32], b: &[u32]) -> Blocks {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut pairs: Vec<(usize, usize)> = (0..prefix).map(|i| (i, i)).collect();
    pairs.extend(
        myers_pairs(am, bm)
            .into_iter()
            .map(|(x, y)| (x + prefix, y + prefix)),
    );
    pairs.extend((0..suffix).map(|k| (a.len() - suffix + k, b.len() - suffix + k)));
    let mut blocks: Blocks = Vec::new();
    for (x, y) in pairs {
        match blocks.last_mut() {
            Some((bx, by, len)) if *bx + *len == x && *by + *len == y => *len += 1,
            _ => blocks.push((x, y, 1)),
        }
    }
    blocks
}

/// Index pairs of equal elements along a shortest edit script (Myers 1986).
/// Past [`MAX_EDIT_DISTANCE`] edits, gives up and matches nothing.
fn myers_pairs(a: &[u32], b: &[u32]) -> Vec<(usize, usize)> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max = (n + m) as usize;
    let limit = max.min(MAX_EDIT_DISTANCE) as isize;
    let off = max as isize + 1;
    let mut v = vec![0isize; 2 * max + 3];
    // trace[d][k + d] = furthest x on diagonal k after d edits.
    let mut trace: Vec<Vec<u32>> = Vec::new();
    let mut found = None;
    let at = |k: isize| (k + off) as usize;
    for d in 0..=limit {
        for k in (-d..=d).step_by(2) {
            let mut x = if d == 0 {
                0
            } else if k == -d || (k != d && v[at(k - 1)] < v[at(k + 1)]) {
                v[at(k + 1)]
            } else {
                v[at(k - 1)] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[at(k)] = x;
            if x >= n && y >= m {
                found = Some(d);
                break;
            }
        }
        trace.push(v[at(-d)..=at(d)].iter().map(|&x| x as u32).collect());
        if found.is_some() {
            break;
        }
    }
    let Some(dmax) = found else {
        return Vec::new();
    };
    let (mut x, mut y) = (n, m);
    let mut pairs = Vec::new();
    for d in (1..=dmax).rev() {
        let prev = &trace[(d - 1) as usize];
        let get = |k: isize| prev[(k + d - 1) as usize] as isize;
        let k = x - y;
        let prev_k = if k == -d || (k != d && get(k - 1) < get(k + 1)) {
            k + 1
        } else {
            k - 1
        };
        let prev_x = get(prev_k);
        let prev_y = prev_x - prev_k;
        while x > prev_x && y > prev_y {
            x -= 1;
            y -= 1;
            pairs.push((x as usize, y as usize));
        }
        (x, y) = (prev_x, prev_y);
    }
    while x > 0 && y > 0 {
        x -= 1;
        y -= 1;
        pairs.push((x as usize, y as usize));
    }
    pairs.reverse();
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{lchown, symlink};
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
            let edit =
                |rng: &mut Lcg, lines: &[String], range: std::ops::Range<usize>, tag: &str| {
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
}
