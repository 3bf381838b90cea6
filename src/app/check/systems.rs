//! `systems/`: its entries (versions, leftovers of interrupted deploys,
//! anything else) and the `default` link.

use super::report::Finding;
use super::version::VersionInfo;
use crate::store::layout::{self, Layout};
use anyhow::Result;
use std::path::Path;

/// What a scan of `systems/` found.
#[derive(Debug, Default)]
pub(super) struct SystemsScan {
    pub(super) versions: Vec<String>,
    pub(super) leftovers: Vec<String>,
    pub(super) unexpected: Vec<String>,
}

pub(super) fn scan_systems(dir: &Path) -> Result<SystemsScan> {
    let mut scan = SystemsScan::default();
    let entries =
        std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == layout::DEFAULT_LINK {
            continue;
        }
        let is_dir = entry.file_type()?.is_dir();
        match classify_entry(&name, is_dir) {
            Entry::Version => scan.versions.push(name),
            Entry::Leftover => scan.leftovers.push(name),
            Entry::Unexpected => scan.unexpected.push(name),
        }
    }
    scan.versions.sort();
    scan.leftovers.sort();
    scan.unexpected.sort();
    Ok(scan)
}

/// Kinds of entries in `systems/` (other than `default`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Entry {
    Version,
    Leftover,
    Unexpected,
}

/// `.<L>.partial` and `.<L>.removing` directories and the temp files of an
/// atomic replace are leftovers; other directories are versions.
pub(super) fn classify_entry(name: &str, is_dir: bool) -> Entry {
    if let Some(inner) = name.strip_prefix('.') {
        let leftover = (is_dir
            && (inner.ends_with(layout::PARTIAL_SUFFIX) || inner.ends_with(".removing")))
            || (!is_dir && inner.ends_with(".tmp"));
        return if leftover {
            Entry::Leftover
        } else {
            Entry::Unexpected
        };
    }
    if is_dir {
        Entry::Version
    } else {
        Entry::Unexpected
    }
}

/// The default link: a relative symlink naming a complete version.
pub(super) fn check_default(top: &Layout, versions: &[VersionInfo]) -> Finding {
    let name = "default";
    let link = top.default_link();
    let target = match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&link) {
            Ok(t) => t,
            Err(e) => return Finding::problem(name, format!("reading systems/default: {e}")),
        },
        Ok(_) => return Finding::problem(name, "systems/default is not a symlink"),
        Err(_) => return Finding::problem(name, "systems/default is missing"),
    };
    let complete: Vec<&str> = versions
        .iter()
        .filter(|v| v.complete)
        .map(|v| v.label.as_str())
        .collect();
    let known: Vec<&str> = versions.iter().map(|v| v.label.as_str()).collect();
    match default_problem(&target, &known, &complete) {
        None => Finding::ok(name, format!("systems/default -> {}", target.display())),
        Some(p) => Finding::problem(name, p),
    }
}

/// Why `systems/default -> target` is wrong, given the version directories
/// (`known`) and those without problems (`complete`); `None` when it is right.
pub fn default_problem(target: &Path, known: &[&str], complete: &[&str]) -> Option<String> {
    let t = target.to_string_lossy();
    if target.is_absolute() || t.contains('/') {
        return Some(format!(
            "systems/default -> {t} must be a relative link to a version directory"
        ));
    }
    if !known.contains(&t.as_ref()) {
        return Some(format!(
            "systems/default -> {t} is dangling: no version {t} on this disk"
        ));
    }
    if !complete.contains(&t.as_ref()) {
        return Some(format!(
            "systems/default -> {t}, which is incomplete (see its problems above)"
        ));
    }
    None
}
