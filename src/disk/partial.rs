//! `TARGET.partial`: the file a new image is built in before it is renamed
//! onto the target.
//!
//! The path is in the user's directory, which others may be able to write,
//! so it is never trusted: it is created with `O_EXCL|O_NOFOLLOW`, marked
//! with an extended attribute, and a leftover is taken over (or removed by
//! `cleanup`) only when it is a regular file with one link, owned by us and
//! carrying that mark. After locking, the path must still name the locked
//! file (a process that unlinked or replaced it meanwhile is detected).

use crate::disk::lock::TargetLock;
use crate::tree::copy::sys;
use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Extended attribute that marks a `.partial` image made by this tool.
const MARK: &str = "user.btrfs-deploy.partial";

/// Creates `partial`, or takes over a leftover this tool made, locked,
/// truncated and sized `size` (sparse).
pub fn create(partial: &Path, size: u64) -> Result<(TargetLock, File)> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
    {
        Ok(f) => {
            set_mark(&f).with_context(|| {
                format!(
                    "marking {} as made by deploy (the filesystem must support user extended attributes)",
                    partial.display()
                )
            })?;
            f
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open_ours(partial)?,
        Err(e) => return Err(e).with_context(|| format!("creating {}", partial.display())),
    };
    let lock = lock_same(&file, partial)?;
    file.set_len(0)
        .with_context(|| format!("truncating {}", partial.display()))?;
    file.set_len(size)
        .with_context(|| format!("sizing {}", partial.display()))?;
    Ok((lock, file))
}

/// Removes a leftover `partial` of an interrupted first deploy, if there is
/// one. Returns whether one was removed. Anything at that path that this
/// tool did not make is refused, never removed.
pub fn remove_leftover(partial: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(partial) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", partial.display())),
        Ok(_) => {}
    }
    let file = open_ours(partial)?;
    let lock = lock_same(&file, partial)?;
    std::fs::remove_file(partial).with_context(|| format!("removing {}", partial.display()))?;
    drop(lock);
    Ok(true)
}

/// Removes `partial` after a failed deploy, only while it is still the file
/// we made (`file`).
pub fn remove_if_same(partial: &Path, file: &File) {
    if same_file(partial, file).unwrap_or(false) {
        let _ = std::fs::remove_file(partial);
    }
}

/// Opens an existing `partial` without following a symlink, and checks that
/// this tool made it.
fn open_ours(partial: &Path) -> Result<File> {
    let not_ours = |why: &str| {
        anyhow::anyhow!(
            "{} exists and {why}, so deploy will not touch it: remove it yourself if it is \
             a leftover, or choose another target",
            partial.display()
        )
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(partial)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(not_ours(
                "is a symlink (deploy never follows one it did not make)",
            ))
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", partial.display())),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_ours("is not a regular file"));
    }
    if meta.nlink() != 1 {
        return Err(not_ours("has other hard links"));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(not_ours("belongs to another user"));
    }
    if !has_mark(&file) {
        return Err(not_ours("was not made by deploy"));
    }
    Ok(file)
}

/// Locks `file`, then checks that `path` still names it.
fn lock_same(file: &File, path: &Path) -> Result<TargetLock> {
    let lock = TargetLock::acquire(file.try_clone()?, path)?;
    if !same_file(path, file)? {
        bail!(
            "{} was replaced or removed while deploy was locking it: another process is \
             working in that directory; try again",
            path.display()
        );
    }
    Ok(lock)
}

fn same_file(path: &Path, file: &File) -> Result<bool> {
    let a = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let b = file.metadata()?;
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

fn mark_name() -> CString {
    CString::new(MARK).expect("no NUL")
}

fn set_mark(f: &File) -> std::io::Result<()> {
    sys::set_xattr(sys::Target::fd(f), &mark_name(), b"1")
}

fn has_mark(f: &File) -> bool {
    matches!(sys::get_xattr(sys::Target::fd(f), &mark_name()), Ok(Some(v)) if v == b"1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_marks_and_takes_over_only_its_own_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.img.partial");
        let (lock, f) = create(&p, 1 << 20).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        drop((lock, f));
        // A leftover of ours is taken over.
        let (lock, f) = create(&p, 2 << 20).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 2 << 20);
        drop((lock, f));
        assert!(remove_leftover(&p).unwrap());
        assert!(!p.exists());
        assert!(!remove_leftover(&p).unwrap());
    }

    #[test]
    fn refuses_symlinks_hardlinks_and_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim.txt");
        std::fs::write(&victim, "precious").unwrap();
        let p = d.path().join("x.img.partial");

        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = create(&p, 1 << 20).unwrap_err();
        assert!(format!("{e:#}").contains("is a symlink"), "{e:#}");
        let e = remove_leftover(&p).unwrap_err();
        assert!(format!("{e:#}").contains("is a symlink"), "{e:#}");
        std::fs::remove_file(&p).unwrap();

        std::fs::hard_link(&victim, &p).unwrap();
        let e = create(&p, 1 << 20).unwrap_err();
        assert!(format!("{e:#}").contains("hard links"), "{e:#}");
        std::fs::remove_file(&p).unwrap();

        std::fs::write(&p, "someone's file").unwrap();
        let e = create(&p, 1 << 20).unwrap_err();
        assert!(format!("{e:#}").contains("not made by deploy"), "{e:#}");
        let e = remove_leftover(&p).unwrap_err();
        assert!(format!("{e:#}").contains("not made by deploy"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "someone's file");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
