//! `deploy status [TARGET] [--json]`: what a disk boots and what runs.
//! Without TARGET, on a booted system of this layout, the disk the running
//! root filesystem is on (found from the mount of `/`, never guessed).

use crate::app::commands::with_disk;
use crate::store::{layout, versions};
use crate::target::mount::{self, MountEntry};
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

/// Resolves an omitted TARGET (or `/`) to the running system's disk.
pub fn resolve_target(target: Option<&Path>) -> Result<PathBuf> {
    match target {
        Some(t) if t != Path::new("/") => Ok(t.to_path_buf()),
        _ => match running_system() {
            Some((dev, _)) => Ok(dev),
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
        let here = running.as_ref().and_then(|(dev, label)| {
            let same = |a: &Path, b: &Path| {
                use std::os::unix::fs::MetadataExt;
                match (std::fs::metadata(a), std::fs::metadata(b)) {
                    (Ok(x), Ok(y)) => x.rdev() != 0 && x.rdev() == y.rdev(),
                    _ => false,
                }
            };
            (same(dev, &disk.device) || same(dev, &target)).then(|| label.clone())
        });
        let default = versions::default_label(top)?;
        let all = versions::list(top)?;
        Ok(Status {
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
