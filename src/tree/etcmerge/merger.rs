//! The walk over base, local and vendor that decides, per entry, what the
//! new `/etc` gets (carried, merged, conflict).

use crate::tree::nssmerge;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::*;

/// Outcome of a three-way choice between the local and the vendor's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pick {
    Vendor,
    Local,
    Conflict,
}

/// Three-way choice for one comparable value.
pub(super) fn pick<T: PartialEq>(base: Option<&T>, local: &T, vendor: &T) -> Pick {
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
pub(super) enum Content {
    Vendor,
    Local,
    Merged(Vec<u8>),
}

/// A user's version to save as `<path>.deploy-local` once the walk is done.
pub(super) struct PendingCopy {
    pub(super) conflict: usize,
    pub(super) rel: PathBuf,
    pub(super) local: Entry,
}

pub(super) struct Merger {
    pub(super) target: PathBuf,
    pub(super) report: MergeReport,
    pub(super) pending: Vec<PendingCopy>,
    /// Names the NSS merge left out of `passwd`/`group` (their `shadow`/`gshadow` lines go too).
    pub(super) nss_dropped: Vec<(nssmerge::Db, BTreeSet<String>)>,
}

pub(super) fn rel_name(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.to_string_lossy().into_owned()
    }
}

pub(super) fn octal(mode: u32) -> String {
    format!("{mode:04o}")
}

impl Merger {
    /// Walks the union of the children of the three directories (`None`:
    /// that side has no directory here).
    pub(super) fn walk_children(&mut self, rel: &Path, dirs: [Option<PathBuf>; 3]) -> Result<()> {
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
    pub(super) fn node(
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
    pub(super) fn dir_node(
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
    pub(super) fn merge_same_type(
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
    pub(super) fn merge_nss(
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
    pub(super) fn take_local(&mut self, rel: &Path, l: Option<&Entry>) -> Result<()> {
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
    pub(super) fn shape_conflict(
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

    pub(super) fn record(&mut self, rel: &Path, vendor_unchanged: bool) {
        let name = rel_name(rel);
        if vendor_unchanged {
            self.report.carried.push(name);
        } else {
            self.report.merged.push(name);
        }
    }

    pub(super) fn conflict(
        &mut self,
        rel: &Path,
        reason: String,
        local_copy: Option<String>,
    ) -> usize {
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
    pub(super) fn write_local_copies(&mut self) -> Result<()> {
        for p in std::mem::take(&mut self.pending) {
            let rel = free_copy_name(&self.target, &p.rel)?;
            copy_node(&p.local, &self.target.join(&rel))?;
            self.report.conflicts[p.conflict].local_copy = Some(rel_name(&rel));
        }
        Ok(())
    }
}

/// `<rel>.deploy-local`, or `<rel>.deploy-local.N` if that exists in `target`.
pub(super) fn free_copy_name(target: &Path, rel: &Path) -> Result<PathBuf> {
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
pub(super) fn merge_content(
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

pub(super) fn merge_file_data(
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
pub(super) fn merge_meta(
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
