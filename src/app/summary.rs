//! `deploy --json`: the summary of a finished deploy (docs/json.md).

use crate::app::deploy::Outcome;
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
    /// The summary of `outcome`, a deploy to `target` that took `elapsed`.
    pub fn new(
        target: &std::path::Path,
        outcome: &Outcome,
        elapsed: std::time::Duration,
    ) -> Summary {
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
            label: rec.label.clone(),
            target: target.display().to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::deployment::Deployment;
    use serde_json::json;

    fn plan_summary(record: Deployment, removed: Vec<String>) -> serde_json::Value {
        let outcome = Outcome {
            record,
            is_default: true,
            removed,
        };
        let s = Summary::new(
            std::path::Path::new("disk.img"),
            &outcome,
            std::time::Duration::from_millis(1500),
        );
        serde_json::from_str(&crate::util::json::to_string(&s).unwrap()).unwrap()
    }

    #[test]
    fn upgrade_summary_shape() {
        let mut rec = Deployment {
            label: "v2".into(),
            upgraded_from: Some("factory".into()),
            kernel_version: Some("6.1".into()),
            extensions: vec!["hostname".into()],
            ..Default::default()
        };
        rec.details.insert(
            "sync".into(),
            json!({"unchanged": 10, "written": 2, "metadata_only": 1, "deleted": 0, "bytes_written": 4096}),
        );
        rec.details.insert(
            "etc_merge".into(),
            json!({"carried": [], "merged": [], "conflicts": [
                {"path": "a.conf", "reason": "r", "local_copy": "a.conf.deploy-local"}]}),
        );
        let v = plan_summary(rec, vec!["old".into()]);
        assert_eq!(
            v,
            json!({
                "format": 1, "label": "v2", "target": "disk.img", "kind": "upgrade",
                "default": true, "upgraded_from": "factory", "kernel_version": "6.1",
                "extensions": ["hostname"], "written": {"bytes": 4096, "files": 2},
                "stats": {"unchanged": 10, "written": 2, "metadata_only": 1, "deleted": 0, "bytes_written": 4096},
                "conflicts": [{"path": "a.conf", "reason": "r", "local_copy": "a.conf.deploy-local"}],
                "removed": ["old"], "duration_secs": 1.5
            })
        );
    }

    #[test]
    fn new_summary_counts_the_copy() {
        let mut rec = Deployment {
            label: "v2".into(),
            ..Default::default()
        };
        rec.details.insert(
            "copy".into(),
            json!({"files": 7, "dirs": 3, "symlinks": 1, "specials": 0, "hardlinks": 0, "bytes": 1234}),
        );
        let v = plan_summary(rec, vec![]);
        assert_eq!(v["kind"], "new");
        assert_eq!(v["written"], json!({"bytes": 1234, "files": 7}));
        assert_eq!(v["upgraded_from"], serde_json::Value::Null);
        assert_eq!(v["conflicts"], json!([]));
    }
}
