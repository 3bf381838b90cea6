//! The shared `/state` subvolumes: seeding entries a new version ships that
//! `/state` lacks, without ever rewriting what is already there.

use crate::copy::{self, CopyOptions};
use anyhow::{Context, Result};
use std::path::Path;

/// Name of the scratch directory used while seeding (inside the subvolume,
/// so entries can be renamed into place).
const SEED_TMP: &str = ".btrfs-deploy-seed";

/// Copies into `state` every entry of `src` whose path does not exist in
/// `state` yet. Existing entries, files or directories, are left exactly as
/// they are. Returns the relative paths seeded.
pub fn seed_missing(src: &Path, state: &Path) -> Result<Vec<String>> {
    let tmp = state.join(SEED_TMP);
    if std::fs::symlink_metadata(&tmp).is_ok() {
        copy::remove_tree(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| {
        copy::copy_tree(
            src,
            &tmp,
            &CopyOptions {
                threads: 0,
                progress: None,
            },
        )?;
        let mut seeded = Vec::new();
        move_missing(&tmp, state, Path::new(""), &mut seeded)?;
        Ok(seeded)
    })();
    copy::remove_tree(&tmp)?;
    result
}

fn move_missing(from: &Path, to: &Path, rel: &Path, seeded: &mut Vec<String>) -> Result<()> {
    let dir = from.join(rel);
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let child_rel = rel.join(&name);
        let target = to.join(&child_rel);
        match std::fs::symlink_metadata(&target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::rename(entry.path(), &target).with_context(|| {
                    format!("moving {} to {}", entry.path().display(), target.display())
                })?;
                seeded.push(child_rel.display().to_string());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
            Ok(m) if m.is_dir() && entry.file_type()?.is_dir() => {
                move_missing(from, to, &child_rel, seeded)?;
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_only_missing_entries() {
        let d = tempfile::tempdir().unwrap();
        let (src, state) = (d.path().join("src"), d.path().join("state"));
        std::fs::create_dir_all(src.join("user/new-dir")).unwrap();
        std::fs::write(src.join("user/existing.txt"), b"vendor").unwrap();
        std::fs::write(src.join("user/new-dir/f"), b"new").unwrap();
        std::fs::write(src.join("top-new"), b"top").unwrap();
        std::fs::create_dir_all(state.join("user")).unwrap();
        std::fs::write(state.join("user/existing.txt"), b"mine").unwrap();
        let mut seeded = seed_missing(&src, &state).unwrap();
        seeded.sort();
        assert_eq!(seeded, vec!["top-new", "user/new-dir"]);
        assert_eq!(
            std::fs::read(state.join("user/existing.txt")).unwrap(),
            b"mine"
        );
        assert_eq!(std::fs::read(state.join("user/new-dir/f")).unwrap(), b"new");
        assert!(!state.join(SEED_TMP).exists());
    }
}
