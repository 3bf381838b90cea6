//! `deploy status [TARGET] [--json]`: what a disk boots and what runs.
//! Without TARGET, on a booted system of this layout, the disk the running
//! root filesystem is on (found from the mount of `/`, never guessed).

use crate::app::commands::with_disk;
use crate::disk::mount::{self, MountEntry};
use crate::store::{layout, versions};
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

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

/// The mount of `/`: (source device, root inside the filesystem), when `/`
/// is a Btrfs.
fn root_mount(mounts: &[MountEntry]) -> Option<(PathBuf, String)> {
    mounts
        .iter()
        .find(|m| m.mount_point == Path::new("/") && m.fstype == "btrfs")
        .map(|m| (PathBuf::from(&m.source), m.root.clone()))
}

/// The label of `systems/<label>/run` in a subvolume path.
fn running_label(root: &str) -> Option<String> {
    let rest = root.trim_start_matches('/').strip_prefix("systems/")?;
    let (label, tail) = rest.split_once('/')?;
    (tail == layout::RUN).then(|| label.to_string())
}

/// The running system: its root's device and version, when `/` is a
/// version of this layout.
pub fn running_system() -> Option<(PathBuf, String)> {
    let (dev, root) = root_mount(&mount::own_mounts())?;
    Some((dev, running_label(&root)?))
}

/// The whole disk a partition belongs to (`/dev/vda2` → `/dev/vda`), or
/// `dev` itself: versions are added to the disk, whose boot partition
/// changes with them.
pub fn whole_disk(dev: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(dev) else {
        return dev.to_path_buf();
    };
    let (maj, min) = (libc::major(m.rdev()), libc::minor(m.rdev()));
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    if !sys.join("partition").exists() {
        return dev.to_path_buf();
    }
    match std::fs::canonicalize(sys.join("..")) {
        Ok(parent) => match parent.file_name() {
            Some(name) => {
                let d = Path::new("/dev").join(name);
                if d.exists() {
                    d
                } else {
                    dev.to_path_buf()
                }
            }
            None => dev.to_path_buf(),
        },
        Err(_) => dev.to_path_buf(),
    }
}

/// Whether the running system's `/` is on `disk` (opened from `target`).
pub fn is_running_disk(disk: &crate::disk::open::Disk, target: &Path) -> bool {
    let Some((dev, _)) = running_system() else {
        return false;
    };
    let same = |a: &Path, b: &Path| {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.rdev() != 0 && x.rdev() == y.rdev(),
            _ => false,
        }
    };
    same(&dev, &disk.device) || same(&dev, target) || same(&whole_disk(&dev), target)
}

/// Resolves an omitted TARGET (or `/`) to the running system's disk.
pub fn resolve_target(target: Option<&Path>) -> Result<PathBuf> {
    match target {
        Some(t) if t != Path::new("/") => Ok(t.to_path_buf()),
        _ => match running_system() {
            Some((dev, _)) => Ok(whole_disk(&dev)),
            None => Err(crate::UsageError(
                "no TARGET given, and / is not a version of a btrfs-deploy disk: name a disk \
                 image or block device"
                    .into(),
            )
            .into()),
        },
    }
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
            "Default:  {}{}",
            st.default,
            st.arch
                .as_deref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_running_version_from_the_root_mount() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    25 1 0:33 /systems/v2/run / rw,noatime - btrfs /dev/vda2 rw,subvol=/systems/v2/run\n\
                    26 25 0:33 /state/home /home rw - btrfs /dev/vda2 rw\n";
        let (dev, root) = root_mount(&mount::parse_mountinfo(info)).unwrap();
        assert_eq!(dev, PathBuf::from("/dev/vda2"));
        assert_eq!(running_label(&root).as_deref(), Some("v2"));
        // Not a version: a plain Btrfs root, or another filesystem.
        assert_eq!(running_label("/"), None);
        assert_eq!(running_label("/systems/v2/orig"), None);
        assert!(root_mount(&mount::parse_mountinfo(
            "25 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        ))
        .is_none());
    }
}
