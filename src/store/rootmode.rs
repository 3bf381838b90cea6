//! How a version's root is mounted (`--root-mode`, `root_mode` in
//! `deploy.toml`, recorded in `deployment.json`): read-write, read-only with
//! a writable `/etc`, or read-only under a tmpfs overlay.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Path inside the tree of the early-boot step of `volatile` (it runs as
/// `init=` before the tree's own init).
pub const VOLATILE_INIT: &str = "usr/lib/btrfs-deploy/volatile-root";

/// Kernel argument naming the volatile mode (read by [`VOLATILE_INIT`] and
/// by `deploy check`).
pub const VOLATILE_ARG: &str = "btrfs_deploy.root=volatile";

/// The script installed at [`VOLATILE_INIT`].
const VOLATILE_SCRIPT: &str = include_str!("volatile-root.sh");

/// A version's root mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RootMode {
    /// `/` read-write (as before root modes existed).
    #[default]
    Rw,
    /// `/` read-only; `/etc` is the version's own writable subvolume
    /// (`systems/<label>/run/etc`), so device settings survive reboots.
    Ro,
    /// `/` read-only under a tmpfs overlay: every write outside `/state`
    /// (including `/etc`) is gone at the next boot.
    Volatile,
}

impl RootMode {
    /// `rw`, `ro` or `volatile`.
    pub fn name(self) -> &'static str {
        match self {
            RootMode::Rw => "rw",
            RootMode::Ro => "ro",
            RootMode::Volatile => "volatile",
        }
    }

    /// Whether the kernel mounts the Btrfs root read-only (`ro`, not `rw`).
    pub fn kernel_ro(self) -> bool {
        self != RootMode::Rw
    }

    /// Kernel arguments the mode adds before the version's own.
    pub fn extra_args(self) -> String {
        match self {
            RootMode::Volatile => format!("init=/{VOLATILE_INIT} {VOLATILE_ARG}"),
            _ => String::new(),
        }
    }

    /// The version's kernel arguments with the mode's in front.
    pub fn entry_args(self, args: &str) -> String {
        let extra = self.extra_args();
        match (extra.is_empty(), args.is_empty()) {
            (true, _) => args.to_string(),
            (false, true) => extra,
            (false, false) => format!("{extra} {args}"),
        }
    }

    /// The mode a kernel command line (after `rw`/`ro` is known) describes.
    pub fn from_cmdline(ro: bool, args: &str) -> RootMode {
        if args.split_whitespace().any(|a| a == VOLATILE_ARG) {
            RootMode::Volatile
        } else if ro {
            RootMode::Ro
        } else {
            RootMode::Rw
        }
    }
}

impl std::fmt::Display for RootMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Prepares the version's `run` tree for `mode`: for `ro`, makes `run/etc`
/// a subvolume of its own (same content, reflinked) that fstab mounts
/// read-write on `/etc`; for `volatile`, installs [`VOLATILE_INIT`].
/// `rw` changes nothing.
pub fn prepare_run(run: &Path, mode: RootMode) -> Result<()> {
    match mode {
        RootMode::Rw => Ok(()),
        RootMode::Ro => etc_subvolume(run),
        RootMode::Volatile => {
            let path = run.join(VOLATILE_INIT);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            crate::util::fsutil::write_atomic(&path, VOLATILE_SCRIPT.as_bytes(), 0o755)
        }
    }
}

/// Turns directory `run/etc` into a subvolume with the same content
/// (owner, mode and xattrs kept; file data reflinked).
fn etc_subvolume(run: &Path) -> Result<()> {
    let etc = run.join("etc");
    if crate::store::btrfs::is_subvolume(&etc) {
        return Ok(());
    }
    let tmp = run.join(".etc.btrfs-deploy");
    if tmp.exists() {
        crate::store::btrfs::delete_subvolume(&tmp)?;
    }
    crate::store::btrfs::create_subvolume(&tmp)?;
    // cp -a of the directory's content: reflinks, ownership, modes, xattrs.
    crate::util::cmd::run(
        "cp",
        &[
            "-a",
            "--reflink=auto",
            "--no-target-directory",
            &etc.to_string_lossy(),
            &tmp.to_string_lossy(),
        ],
    )
    .with_context(|| format!("copying {} into a subvolume", etc.display()))?;
    std::fs::remove_dir_all(&etc).with_context(|| format!("removing {}", etc.display()))?;
    std::fs::rename(&tmp, &etc)
        .with_context(|| format!("renaming {} to {}", tmp.display(), etc.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_adds_its_init_and_marker() {
        assert_eq!(RootMode::Rw.entry_args("quiet"), "quiet");
        assert_eq!(RootMode::Ro.entry_args("quiet"), "quiet");
        let v = RootMode::Volatile.entry_args("quiet");
        assert_eq!(
            v,
            "init=/usr/lib/btrfs-deploy/volatile-root btrfs_deploy.root=volatile quiet"
        );
        assert_eq!(RootMode::from_cmdline(true, &v), RootMode::Volatile);
        assert_eq!(RootMode::from_cmdline(true, "quiet"), RootMode::Ro);
        assert_eq!(RootMode::from_cmdline(false, "quiet"), RootMode::Rw);
    }

    #[test]
    fn records_read_back_as_rw_when_the_field_is_missing() {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            m: RootMode,
        }
        let r: R = serde_json::from_str("{}").unwrap();
        assert_eq!(r.m, RootMode::Rw);
        let r: R = serde_json::from_str("{\"m\":\"volatile\"}").unwrap();
        assert_eq!(r.m, RootMode::Volatile);
    }
}
