//! The disk a command acts on: found from the running system when TARGET
//! is omitted (from the mount of `/`, never guessed), and opened locked,
//! checked to hold the layout, for the commands that manage versions.

use crate::disk::mount::{self, MountEntry};
use crate::disk::open::{self, Disk, TargetKind};
use crate::store::layout;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Opens an existing target holding the layout, locked, and runs `f` on it.
pub fn with_disk<T>(
    target: &Path,
    read_only: bool,
    f: impl FnOnce(&Disk) -> Result<T>,
) -> Result<T> {
    let kind = open::classify(target)?;
    if kind == TargetKind::Missing {
        bail!("{} does not exist", target.display());
    }
    let lock = open::lock_existing(target)?;
    let result = open_checked(target, kind, read_only, |disk| {
        if !read_only {
            // A /state merge an interruption left is finished (or undone) first.
            crate::tree::statemerge::recover(&disk.layout)?;
        }
        f(disk)
    });
    drop(lock);
    result
}

/// Opens a target whose lock the caller holds, checks it holds the layout,
/// runs `f`, and closes it (reporting close errors on success).
pub(crate) fn open_checked<T>(
    target: &Path,
    kind: TargetKind,
    read_only: bool,
    f: impl FnOnce(&Disk) -> Result<T>,
) -> Result<T> {
    open::ensure_not_in_use(target, kind)?;
    open::require_btrfs(target)?;
    let disk = Disk::open(target, kind, read_only)?;
    if !disk.layout.exists() {
        drop(disk);
        bail!(
            "{} holds a Btrfs without the btrfs-deploy layout (no systems/default)",
            target.display()
        );
    }
    disk.run(f)
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
