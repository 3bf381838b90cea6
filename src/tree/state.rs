//! Facts about a rootfs's state directories before they become the shared
//! `/state` subvolumes (the merge of `/state` is `statemerge`'s).

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The first pair of hard links (paths relative to `tree`) between one of
/// the state directories `dirs` of `tree` and another place of the tree
/// (the rest of the tree, or another state directory). State directories
/// become separate subvolumes, and a hard link cannot cross subvolumes: such
/// a pair becomes two independent copies. Walks only the state directories,
/// and the rest of the tree only when a link leads out of them.
pub fn first_cross_link(tree: &Path, dirs: &[&str]) -> Result<Option<(PathBuf, PathBuf)>> {
    // inode -> (links seen, first path, its state directory, link count)
    let mut seen: HashMap<u64, (u64, PathBuf, usize, u64)> = HashMap::new();
    for (i, d) in dirs.iter().enumerate() {
        let mut found = None;
        walk(&tree.join(d), &mut |p, m| {
            if !m.is_file() || m.nlink() < 2 || found.is_some() {
                return;
            }
            let rel = p.strip_prefix(tree).unwrap_or(p).to_path_buf();
            let e = seen
                .entry(m.ino())
                .or_insert_with(|| (0, rel.clone(), i, m.nlink()));
            e.0 += 1;
            if e.2 != i {
                found = Some((e.1.clone(), rel));
            }
        })?;
        if found.is_some() {
            return Ok(found);
        }
    }
    let mut outside: Vec<(&PathBuf, u64)> = seen
        .iter()
        .filter(|(_, (count, _, _, nlink))| count < nlink)
        .map(|(ino, (_, p, _, _))| (p, *ino))
        .collect();
    if outside.is_empty() {
        return Ok(None);
    }
    outside.sort();
    let wanted: HashMap<u64, &PathBuf> = outside.iter().map(|(p, ino)| (*ino, *p)).collect();
    let mut found = None;
    let state: Vec<PathBuf> = dirs.iter().map(|d| tree.join(d)).collect();
    walk_except(tree, &state, &mut |p, m| {
        if found.is_none() && m.is_file() {
            if let Some(first) = wanted.get(&m.ino()) {
                let rel = p.strip_prefix(tree).unwrap_or(p).to_path_buf();
                found = Some(((*first).clone(), rel));
            }
        }
    })?;
    Ok(found)
}

/// Calls `f` on every entry under `dir` (not following symlinks); a missing
/// `dir` has no entries.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) -> Result<()> {
    walk_except(dir, &[], f)
}

fn walk_except(
    dir: &Path,
    skip: &[PathBuf],
    f: &mut dyn FnMut(&Path, &std::fs::Metadata),
) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    names.sort();
    for p in names {
        if skip.contains(&p) {
            continue;
        }
        let m = std::fs::symlink_metadata(&p)
            .with_context(|| format!("reading metadata of {}", p.display()))?;
        f(&p, &m);
        if m.is_dir() {
            walk_except(&p, skip, f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hard_links_between_state_dirs_and_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        let dirs = ["home", "var"];
        for p in ["usr/share", "var/lib", "home/u", "etc"] {
            std::fs::create_dir_all(t.join(p)).unwrap();
        }
        std::fs::write(t.join("var/lib/a"), b"a").unwrap();
        std::fs::hard_link(t.join("var/lib/a"), t.join("var/lib/a2")).unwrap();
        std::fs::write(t.join("usr/share/x"), b"x").unwrap();
        std::fs::hard_link(t.join("usr/share/x"), t.join("etc/x")).unwrap();
        // Links within one state directory, and outside all: fine.
        assert_eq!(first_cross_link(t, &dirs).unwrap(), None);
        // Between a state directory and the rest of the tree.
        std::fs::hard_link(t.join("usr/share/x"), t.join("var/lib/x")).unwrap();
        assert_eq!(
            first_cross_link(t, &dirs).unwrap(),
            Some(("var/lib/x".into(), "etc/x".into()))
        );
        std::fs::remove_file(t.join("var/lib/x")).unwrap();
        // Between two state directories.
        std::fs::hard_link(t.join("var/lib/a"), t.join("home/u/a")).unwrap();
        assert_eq!(
            first_cross_link(t, &dirs).unwrap(),
            Some(("home/u/a".into(), "var/lib/a".into()))
        );
    }
}
