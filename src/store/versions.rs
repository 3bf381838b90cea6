//! The versions on a disk: which exist, which is the default, their boot
//! entries, and the switch of the default.

use crate::boot::{Boot, Entry};
use crate::store::deployment::Deployment;
use crate::store::layout::{self, Layout};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// One complete version on disk.
#[derive(Debug, Clone)]
pub struct Version {
    /// Its label.
    pub label: String,
    /// Its record.
    pub deployment: Deployment,
}

/// Complete versions (not partial ones), oldest first.
pub fn list(layout: &Layout) -> Result<Vec<Version>> {
    let dir = layout.systems();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == layout::DEFAULT_LINK {
            continue;
        }
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let record = entry.path().join(layout::DEPLOYMENT_JSON);
        if !record.is_file() {
            tracing::warn!(
                "{} has no {}: skipped",
                entry.path().display(),
                layout::DEPLOYMENT_JSON
            );
            continue;
        }
        out.push(Version {
            label: name,
            deployment: Deployment::load(&record)?,
        });
    }
    out.sort_by(|a, b| {
        (a.deployment.created_unix, &a.label).cmp(&(b.deployment.created_unix, &b.label))
    });
    Ok(out)
}

/// Label the `systems/default` symlink points at.
pub fn default_label(layout: &Layout) -> Result<String> {
    let link = layout.default_link();
    let target =
        std::fs::read_link(&link).with_context(|| format!("reading symlink {}", link.display()))?;
    let label = target.to_string_lossy().into_owned();
    if label.contains('/') || label.is_empty() || !layout.version(&label).is_dir() {
        bail!(
            "{} points to {label:?}, which is not a version on this disk",
            link.display()
        );
    }
    Ok(label)
}

/// Boot entries of every version that has a kernel.
pub fn boot_entries(versions: &[Version]) -> Vec<Entry> {
    versions
        .iter()
        .filter(|v| v.deployment.has_kernel)
        .map(|v| Entry {
            label: v.label.clone(),
            initramfs: v.deployment.has_initramfs,
            dtb: v.deployment.has_dtb,
            args: v.deployment.kernel_args.clone(),
        })
        .collect()
}

/// Rewrites the boot menus of every backend of the disk for the versions on
/// it, with `default_label` marked as the default (on the ESP this also adds
/// the kernel files of versions that lack them). No-op when no version has a
/// kernel.
pub fn write_boot_config(
    boot: &Boot,
    layout: &Layout,
    fs_uuid: &str,
    default_label: &str,
) -> Result<bool> {
    let versions = list(layout)?;
    let entries = boot_entries(&versions);
    if entries.is_empty() {
        return Ok(false);
    }
    boot.write_menu(layout, fs_uuid, &entries, default_label)?;
    Ok(true)
}

/// Makes `label` the default with one atomic rename of `systems/default`.
pub fn switch_default(layout: &Layout, label: &str) -> Result<()> {
    crate::util::fsutil::replace_symlink(&layout.default_link(), Path::new(label))
}
