//! `deploy --json`: the summary of a finished deploy (docs/json.md).

use crate::deploy::{Outcome, Plan};
use serde::Serialize;

/// Data and entries written into the new version.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Written {
    /// Bytes of file data written (an upgrade: only changed files).
    pub bytes: u64,
    /// Regular files written (an upgrade: files whose content changed).
    pub files: u64,
}

/// What `deploy --json` prints when the deploy succeeded (with `"format"`).
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Label of the new version.
    pub label: String,
    /// The target as given.
    pub target: String,
    /// `new` (a new image or a formatted device) or `upgrade` (a version
    /// added to a disk that holds the layout).
    pub kind: &'static str,
    /// Whether the new version is now the default.
    pub default: bool,
    /// The default the upgrade started from (null for `new`).
    pub upgraded_from: Option<String>,
    /// Kernel version installed, if known.
    pub kernel_version: Option<String>,
    /// Extensions that ran, in order.
    pub extensions: Vec<String>,
    /// What was written.
    pub written: Written,
    /// Copy (`new`) or sync (`upgrade`) statistics as recorded in
    /// `deployment.json`.
    pub stats: serde_json::Value,
    /// /etc entries whose local changes could not be merged.
    pub conflicts: Vec<serde_json::Value>,
    /// Versions removed by `--keep`.
    pub removed: Vec<String>,
    /// Seconds the whole command took.
    pub duration_secs: f64,
}

impl Summary {
    /// The summary of `outcome`, a run of `plan` that took `elapsed`.
    pub fn new(plan: &Plan, outcome: &Outcome, elapsed: std::time::Duration) -> Summary {
        let rec = &outcome.record;
        let (kind, stats) = match rec.details.get("sync") {
            Some(s) => ("upgrade", s.clone()),
            None => ("new", rec.details.get("copy").cloned().unwrap_or_default()),
        };
        let num = |k: &str| stats.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let written = if kind == "upgrade" {
            Written {
                bytes: num("bytes_written"),
                files: num("written"),
            }
        } else {
            Written {
                bytes: num("bytes"),
                files: num("files"),
            }
        };
        Summary {
            label: plan.label.clone(),
            target: plan.target.display().to_string(),
            kind,
            default: outcome.is_default,
            upgraded_from: rec.upgraded_from.clone(),
            kernel_version: rec.kernel_version.clone(),
            extensions: rec.extensions.clone(),
            written,
            stats,
            conflicts: rec
                .details
                .get("etc_merge")
                .and_then(|m| m.get("conflicts"))
                .and_then(|c| c.as_array())
                .cloned()
                .unwrap_or_default(),
            removed: outcome.removed.clone(),
            duration_secs: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        }
    }
}
