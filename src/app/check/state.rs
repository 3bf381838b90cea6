//! The `/state` subvolumes the versions rely on.

use super::report::Finding;
use super::version::VersionInfo;
use crate::store::layout;

/// `/state` subvolumes that the versions' fstab additions rely on.
pub(super) fn check_state(versions: &[VersionInfo], state_subvols: &[String]) -> Finding {
    let mut needed: Vec<String> = Vec::new();
    for v in versions {
        for p in v.record.iter().flat_map(|r| r.fstab_added.iter()) {
            let d = p.trim_start_matches('/');
            if layout::STATE_DIRS.contains(&d) && !needed.iter().any(|n| n == d) {
                needed.push(d.to_string());
            }
        }
    }
    let missing: Vec<String> = needed
        .iter()
        .filter(|d| !state_subvols.contains(d))
        .map(|d| format!("/state/{d} is not a subvolume (the fstab of a version mounts it)"))
        .collect();
    let present = state_subvols
        .iter()
        .map(|d| format!("/state/{d}"))
        .collect::<Vec<_>>()
        .join(" ");
    Finding::from_problems(
        "state",
        missing,
        if present.is_empty() {
            "no /state subvolumes".to_string()
        } else {
            present
        },
    )
}
