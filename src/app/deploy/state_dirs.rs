//! The `/state` subvolumes made from a version's state directories.

use crate::store::btrfs;
use crate::store::layout::{self, Layout};
use crate::tree::copy::{self, CopyOptions};
use crate::tree::state;
use crate::util::ui;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Creates the `/state` subvolumes a disk lacks (all of them on a first
/// deploy) as copies of the version's state directories; the version keeps
/// them in its orig as its vendor copy.
pub(super) fn setup_state(top: &Layout, orig: &Path, kept: &[String]) -> Result<()> {
    let moved: Vec<&str> = layout::STATE_DIRS
        .iter()
        .copied()
        .filter(|d| !kept.iter().any(|k| k == d))
        .collect();
    if let Some((a, b)) = state::first_cross_link(orig, &moved)? {
        ui::detail(format!(
            "note: /{} and /{} are hard links to one file; state directories are separate \
             subvolumes, so /state holds a copy (the first such pair; see docs/guarantees.md)",
            a.display(),
            b.display()
        ));
    }
    let mut announced = false;
    for d in layout::STATE_DIRS {
        if kept.iter().any(|k| k == d) {
            continue;
        }
        let in_version = orig.join(d);
        let state = top.state().join(d);
        match std::fs::symlink_metadata(&in_version) {
            Ok(m) if m.file_type().is_symlink() => {
                bail!(
                "the rootfs's /{d} is a symlink ({}): state directories must be real directories",
                std::fs::read_link(&in_version).map(|t| t.display().to_string()).unwrap_or_default()
            )
            }
            Ok(m) if !m.is_dir() => bail!("the rootfs's /{d} is not a directory"),
            Ok(_) => {}
            Err(_) => {
                std::fs::create_dir(&in_version)
                    .with_context(|| format!("creating {}", in_version.display()))?;
                let mode = if d == "root" { 0o700 } else { 0o755 };
                std::fs::set_permissions(&in_version, std::fs::Permissions::from_mode(mode))?;
            }
        }
        if btrfs::is_subvolume(&state) {
            // An upgrade: the version keeps its vendor copy in orig; /state
            // follows it when it becomes the default (tree::statemerge).
            continue;
        }
        if !announced {
            ui::step("Copying the state directories to /state");
            announced = true;
        }
        btrfs::create_subvolume(&state)?;
        copy_dir_metadata(&in_version, &state)?;
        // The vendor copy stays in orig (reflinks: it costs no data).
        copy::copy_tree(
            &in_version,
            &state,
            &CopyOptions {
                threads: 0,
                progress: None,
            },
        )
        .with_context(|| format!("copying /{d} to /state/{d}"))?;
    }
    Ok(())
}

fn copy_dir_metadata(src: &Path, dst: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(src)?;
    std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid()))
        .with_context(|| format!("setting owner of {}", dst.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))
        .with_context(|| format!("setting mode of {}", dst.display()))?;
    Ok(())
}
