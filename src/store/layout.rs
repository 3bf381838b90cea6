//! Well-known names and paths of the on-disk layout (design §1). Everything is
//! relative to the top-level subvolume (id 5) of the deployed filesystem.

use std::path::{Path, PathBuf};

/// Directory holding one directory per deployed version.
pub const SYSTEMS_DIR: &str = "systems";
/// Name of the symlink in [`SYSTEMS_DIR`] that points at the default version.
pub const DEFAULT_LINK: &str = "default";
/// Directory holding the shared state subvolumes.
pub const STATE_DIR: &str = "state";
/// The state directories of a rootfs that are shared between versions.
pub const STATE_DIRS: [&str; 5] = ["home", "root", "opt", "srv", "var"];
/// Bootloader directory (extlinux installs `ldlinux.sys` here).
pub const EXTLINUX_DIR: &str = "extlinux";
/// Bootloader configuration file inside [`EXTLINUX_DIR`].
pub const EXTLINUX_CONF: &str = "extlinux.conf";
/// Top-level compatibility symlink (U-Boot reads `/extlinux.conf` too).
pub const EXTLINUX_CONF_LINK: &str = "extlinux.conf";
/// Per-version read-only subvolume: the system exactly as deployed.
pub const ORIG: &str = "orig";
/// Per-version writable snapshot of [`ORIG`], mounted as `/` at boot.
pub const RUN: &str = "run";
/// Per-version directory holding the read-only subvolume a bundle was
/// received as (kept, sharing its data with `orig`, so that later delta
/// bundles against this version find their base).
pub const RECEIVED: &str = "received";
/// Per-version kernel image (outside the subvolumes: syslinux does not cross them).
pub const KERNEL: &str = "kernel";
/// Per-version initramfs.
pub const INITRAMFS: &str = "initramfs";
/// Per-version device tree blob.
pub const DTB: &str = "dtb";
/// Per-version record of what was deployed.
pub const DEPLOYMENT_JSON: &str = "deployment.json";
/// In `systems/<label>/`: the SYSLINUX `default` entry for when this
/// version is the default; extlinux.conf includes it through `systems/default`.
pub const DEFAULT_ENTRY: &str = "default-entry.conf";
/// Suffix of a version directory that is still being written.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// Suffix of a new image file that is still being written.
pub const IMAGE_PARTIAL_SUFFIX: &str = ".partial";
/// Label of the first version when none is given.
pub const FACTORY_LABEL: &str = "factory";

/// Paths of the layout below a mounted top-level subvolume.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Mount point of the top-level subvolume.
    pub top: PathBuf,
}

impl Layout {
    /// Layout rooted at the mount point `top`.
    pub fn new(top: &Path) -> Self {
        Layout {
            top: top.to_path_buf(),
        }
    }
    /// `<top>/systems`.
    pub fn systems(&self) -> PathBuf {
        self.top.join(SYSTEMS_DIR)
    }
    /// `<top>/systems/<label>`.
    pub fn version(&self, label: &str) -> PathBuf {
        self.systems().join(label)
    }
    /// `<top>/systems/.<label>.partial`: where a version is built.
    pub fn partial_version(&self, label: &str) -> PathBuf {
        self.systems().join(partial_name(label))
    }
    /// `<top>/systems/default`.
    pub fn default_link(&self) -> PathBuf {
        self.systems().join(DEFAULT_LINK)
    }
    /// `<top>/state`.
    pub fn state(&self) -> PathBuf {
        self.top.join(STATE_DIR)
    }
    /// `<top>/extlinux`.
    pub fn extlinux_dir(&self) -> PathBuf {
        self.top.join(EXTLINUX_DIR)
    }
    /// `<top>/extlinux/extlinux.conf`.
    pub fn extlinux_conf(&self) -> PathBuf {
        self.extlinux_dir().join(EXTLINUX_CONF)
    }
    /// True when the mounted filesystem holds this tool's layout.
    pub fn exists(&self) -> bool {
        self.systems().is_dir()
            && std::fs::symlink_metadata(self.default_link())
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
    }
}

/// Directory name of a version still being written.
pub fn partial_name(label: &str) -> String {
    format!(".{label}{PARTIAL_SUFFIX}")
}

/// Path of the image being built for `target`.
pub fn image_partial(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_os_string();
    s.push(IMAGE_PARTIAL_SUFFIX);
    PathBuf::from(s)
}
