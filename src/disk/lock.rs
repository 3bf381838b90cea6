//! An exclusive lock on the deploy target, so two deploys (or a deploy and a
//! `set-default`) never work on one disk at once. The second one fails at once
//! and names the holder.

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A held `flock` on the target file or device; released on drop.
#[derive(Debug)]
pub struct TargetLock {
    _lock: Flock<File>,
}

impl TargetLock {
    /// Locks `file` (opened from `path`) exclusively, without waiting.
    pub fn acquire(file: File, path: &Path) -> Result<TargetLock> {
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(TargetLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = holder_of(&meta).unwrap_or_else(|| "another process".to_string());
                bail!(
                    "{} is in use by {holder}: another deploy or version change is running on it; \
                     wait for it to finish",
                    path.display()
                )
            }
            Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

/// Finds the process holding a lock on the inode of `meta`, from /proc/locks.
fn holder_of(meta: &std::fs::Metadata) -> Option<String> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF" (blocked waiters have "->")
        if fields.len() >= 6 && fields[1] == "FLOCK" && fields[5] == want {
            let pid = fields[4];
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    b.split(|c| *c == 0)
                        .filter(|s| !s.is_empty())
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            return Some(format!("process {pid} ({cmd})"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_and_names_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, b"x").unwrap();
        let first = TargetLock::acquire(File::open(&p).unwrap(), &p).unwrap();
        let err =
            TargetLock::acquire(File::open(&p).unwrap(), &p).expect_err("second lock must fail");
        let msg = err.to_string();
        assert!(msg.contains("in use by process"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        drop(first);
        TargetLock::acquire(File::open(&p).unwrap(), &p).unwrap();
    }
}
