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

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

mod entry;
mod lines;
mod merger;
mod write;
use entry::*;
use lines::*;
use merger::*;
use write::*;
#[cfg(test)]
mod tests;

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
