//! Small filesystem helpers shared by the modules that write the layout.

use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Opens a directory and fsyncs it, making renames inside it durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Writes `data` to `path` atomically and durably: a temp file beside it is
/// written and fsynced, renamed over `path`, then the directory is fsynced.
/// A power cut leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("path without parent")?;
    let name = path
        .file_name()
        .context("path without file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fsync_dir(dir)
}

/// Points symlink `link` at `target` atomically: a new link beside it,
/// renamed over it. Not durable until the caller commits the filesystem,
/// on purpose: a directory fsync on Btrfs would put the rename in the log
/// tree, which the kernel replays at mount but SYSLINUX (reading only
/// committed trees) does not, so after a power cut the two would disagree
/// on which version is the default. The commit makes it visible to both
/// at once.
pub fn replace_symlink(link: &Path, target: &Path) -> Result<()> {
    let dir = link.parent().context("link without parent")?;
    let name = link
        .file_name()
        .context("link without name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("creating symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, link)
        .with_context(|| format!("renaming {} to {}", tmp.display(), link.display()))
}

/// Copies a regular file's bytes to a new file `dst` (mode 0644) and fsyncs it.
pub fn copy_file_synced(src: &Path, dst: &Path) -> Result<u64> {
    let mut input =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut out =
        std::fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let n = std::io::copy(&mut input, &mut out)
        .map_err(crate::util::fsutil::name_enospc)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    out.sync_all()
        .with_context(|| format!("syncing {}", dst.display()))?;
    Ok(n)
}

/// Makes `dst` (mode 0644) a reflink of the regular file `src` (FICLONE: the
/// two share their data, nothing is copied), falling back to a copy when
/// `src` is on another filesystem; fsyncs it. Returns whether it reflinked.
pub fn reflink_file_synced(src: &Path, dst: &Path) -> Result<bool> {
    let input = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let out = std::fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    match crate::tree::copy::sys::ficlone(&input, &out) {
        Ok(()) => {
            out.sync_all()
                .with_context(|| format!("syncing {}", dst.display()))?;
            Ok(true)
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL)
            ) =>
        {
            drop(out);
            copy_file_synced(src, dst)?;
            Ok(false)
        }
        Err(e) => Err(name_enospc(e))
            .with_context(|| format!("reflinking {} to {}", src.display(), dst.display())),
    }
}

/// Turns ENOSPC into an error that says plainly the target is full.
pub fn name_enospc(e: std::io::Error) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        anyhow::anyhow!("no space left on the target")
    } else {
        e.into()
    }
}

/// Total bytes allocated by the tree at `root` (symlinks not followed).
pub fn tree_usage(root: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let meta = entry
                .metadata()
                .with_context(|| format!("reading {}", entry.path().display()))?;
            entries += 1;
            bytes += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.conf");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn symlink_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let l = d.path().join("default");
        replace_symlink(&l, Path::new("a")).unwrap();
        replace_symlink(&l, Path::new("b")).unwrap();
        assert_eq!(std::fs::read_link(&l).unwrap(), Path::new("b"));
    }

    #[test]
    fn usage_counts_entries() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("x")).unwrap();
        std::fs::write(d.path().join("x/f"), vec![1u8; 10000]).unwrap();
        let (bytes, n) = tree_usage(d.path()).unwrap();
        assert_eq!(n, 2);
        assert!(bytes >= 10000, "{bytes}");
    }
}
