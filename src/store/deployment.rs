//! `systems/<label>/deployment.json`: what was deployed, when, from what,
//! with which options.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The record of one deployed version.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Deployment {
    /// Version label.
    pub label: String,
    /// When it was deployed (RFC 3339, UTC).
    pub created: String,
    /// Seconds since the epoch, for sorting.
    pub created_unix: u64,
    /// Tool version that wrote it.
    pub tool_version: String,
    /// Rootfs it was deployed from (host path at the time).
    pub rootfs: String,
    /// Kernel version, when known.
    pub kernel_version: Option<String>,
    /// Whether a kernel was installed for it.
    pub has_kernel: bool,
    /// Whether it has an initramfs.
    pub has_initramfs: bool,
    /// Whether it has a device tree.
    pub has_dtb: bool,
    /// CPU architecture of its rootfs (`amd64`, `arm64`, ...): read from
    /// the ELF header of its init or shell, or given with `--arch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Kernel arguments after root=...
    pub kernel_args: String,
    /// How its root is mounted (`rw`, `ro`, `volatile`); records written
    /// before root modes existed read back as `rw`.
    #[serde(default)]
    pub root_mode: crate::store::rootmode::RootMode,
    /// Label of the version it was upgraded from, if any.
    pub upgraded_from: Option<String>,
    /// Configure extensions that ran, in order.
    pub extensions: Vec<String>,
    /// Extension settings (secrets left out).
    pub settings: BTreeMap<String, String>,
    /// fstab mount points the tool added.
    pub fstab_added: Vec<String>,
    /// Warnings printed by the deploy (e.g. a kept fstab `/` entry naming
    /// another device); `deploy check` reports them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Build number of the bundle it came from (`deploy --rootfs X.bundle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<u64>,
    /// Free-form details (copy statistics, /etc merge report, ...).
    pub details: BTreeMap<String, serde_json::Value>,
}

impl Deployment {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Deployment> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes `path` durably.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        crate::util::fsutil::write_atomic(path, text.as_bytes(), 0o644)
    }
}

/// Current time as (RFC 3339 UTC string, seconds since the epoch).
pub fn now() -> (String, u64) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (rfc3339(secs), secs)
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_300_000), "2026-11-21T22:26:40Z");
    }

    #[test]
    fn round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("deployment.json");
        let dep = Deployment {
            label: "v2".into(),
            has_kernel: true,
            ..Default::default()
        };
        dep.save(&p).unwrap();
        let back = Deployment::load(&p).unwrap();
        assert_eq!(back.label, "v2");
        assert!(back.has_kernel);
    }
}
