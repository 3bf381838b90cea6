//! `deploy status [TARGET] [--json]`: what a disk boots and what runs.
//! Without TARGET, on a booted system of this layout, the disk the running
//! root filesystem is on (found from the mount of `/`, never guessed).

use crate::app::target::{is_running_disk, resolve_target, running_system, with_disk};
use crate::store::versions;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

/// What `deploy status --json` prints (with `"format"`).
#[derive(Debug, Serialize)]
pub struct Status {
    /// The target as given, or the running system's disk.
    pub target: String,
    /// The kind of disk: `bios`, `uefi` or `hybrid`.
    pub boot: crate::boot::BootKind,
    /// The version `systems/default` names.
    pub default: String,
    /// CPU architecture of the default version's rootfs, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Root mode of the default version (`rw`, `ro`, `volatile`).
    pub root_mode: crate::store::rootmode::RootMode,
    /// The version the running system booted, when it runs from this disk.
    pub running: Option<String>,
    /// Every complete version, oldest first.
    pub versions: Vec<String>,
    /// Whether an interrupted /state merge waits to be finished.
    pub state_merge_pending: bool,
    /// A trial without an outcome yet (armed, or booted and being checked).
    pub trial: Option<crate::store::trial::Trial>,
    /// With an armed trial: whether a boot already used its one-shot boot
    /// (the outcome is recorded by the next boot that runs `trial-watch`).
    pub trial_boot_used: bool,
    /// The newest trial that ended (good or failed).
    pub last_trial: Option<crate::store::trial::Trial>,
    /// Versions whose last trial failed (never tried again unless asked).
    pub failed_versions: Vec<String>,
}

/// `deploy status`.
pub fn status(target: Option<&Path>, json: bool) -> Result<()> {
    let target = resolve_target(target)?;
    let running = running_system();
    let st = with_disk(&target, true, |disk| {
        let top = &disk.layout;
        // The running version counts only when `/` is on this disk.
        let here = running
            .as_ref()
            .filter(|_| is_running_disk(disk, &target))
            .map(|(_, label)| label.clone());
        let trials = crate::store::trial::all(top)?;
        let mut failed_versions = Vec::new();
        for v in versions::list(top)? {
            if let Some(t) = crate::store::trial::load(top, &v.label)? {
                if t.state == crate::store::trial::State::Failed {
                    failed_versions.push(v.label);
                }
            }
        }
        let open = trials.iter().rev().find(|t| !t.state.ended()).cloned();
        let trial_boot_used = match &open {
            Some(t) if t.state == crate::store::trial::State::Armed => {
                disk.boot().trial_used(top)?
            }
            Some(t) => t.state == crate::store::trial::State::Booted,
            None => false,
        };
        let default = versions::default_label(top)?;
        let all = versions::list(top)?;
        Ok(Status {
            trial_boot_used,
            trial: open,
            last_trial: trials.iter().rev().find(|t| t.state.ended()).cloned(),
            failed_versions,
            target: target.display().to_string(),
            boot: disk.disk_layout.boot,
            arch: all
                .iter()
                .find(|v| v.label == default)
                .and_then(|v| v.deployment.arch.clone()),
            root_mode: all
                .iter()
                .find(|v| v.label == default)
                .map(|v| v.deployment.root_mode)
                .unwrap_or_default(),
            default,
            running: here,
            versions: all.into_iter().map(|v| v.label).collect(),
            state_merge_pending: top.state().join(".deploy-merge").exists(),
        })
    })?;
    if json {
        crate::util::json::print(&st)?;
    } else {
        outln!("Disk:     {} ({})", st.target, st.boot.describe());
        outln!(
            "Default:  {}{}, root {}",
            st.default,
            st.arch
                .as_deref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default(),
            st.root_mode
        );
        outln!(
            "Running:  {}",
            st.running
                .as_deref()
                .unwrap_or("- (the running system is not on this disk)")
        );
        outln!("Versions: {}", st.versions.join(", "));
        if let Some(t) = &st.trial {
            if st.trial_boot_used && st.running.as_deref() != Some(t.version.as_str()) {
                outln!(
                    "Trial:    {}: armed at {}; a boot used its one-shot boot, and the next boot \
                     that runs `deploy trial-watch` records the outcome",
                    t.version,
                    t.armed_at
                );
            } else {
                outln!("Trial:    {}", t.describe());
            }
        }
        if let Some(t) = &st.last_trial {
            outln!("Last trial: {}", t.describe());
        }
        if !st.failed_versions.is_empty() {
            outln!(
                "Failed:   {} (not tried again unless asked: deploy --trial, or set-default)",
                st.failed_versions.join(", ")
            );
        }
        if st.state_merge_pending {
            outln!("Pending:  an interrupted /state merge: the next deploy, set-default or cleanup finishes it");
        }
    }
    Ok(())
}
