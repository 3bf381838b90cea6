//! The shared `/state` subvolumes: seeding entries a new version ships that
//! `/state` lacks, without ever rewriting what is already there.

use crate::build::copy::{self, CopyOptions};
use anyhow::{Context, Result};
use std::path::Path;

/// Copies into `state` every entry of `src` whose path does not exist in
/// `state` yet. Existing entries, files or directories, are left exactly as
/// they are; only what is missing is read. Returns the relative paths seeded.
pub fn seed_missing(src: &Path, state: &Path) -> Result<Vec<String>> {
    let seeded = copy::copy_missing(src, state, &CopyOptions::default())
        .with_context(|| format!("seeding {} from {}", state.display(), src.display()))?;
    Ok(seeded.iter().map(|p| p.display().to_string()).collect())
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
        assert_eq!(
            std::fs::read_dir(&state).unwrap().count(),
            2,
            "temporary entries left"
        );
    }
}
