//! The versions on a disk: which exist and which is the default. Changing
//! them is `lifecycle`'s.

use crate::store::deployment::Deployment;
use crate::store::layout::{self, Layout};
use anyhow::{bail, Context, Result};

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
