//! A FAT boot partition (an EFI system partition, or U-Boot's boot
//! partition), written from user space with the `fatfs` crate: no vfat
//! kernel module and no mount are needed, which also keeps the partition
//! invisible to the host and to anything that mounts it there.
//!
//! Directories are made with mtools' `mmd` ([`make_dirs`]): `fatfs` 0.3.6
//! writes long-name entries before a new directory's `.` and `..`, which
//! `fsck.fat` rejects. Callers create their fixed directories once and
//! keep files flat inside them; [`FatPartition`] never creates directories.
//!
//! The partition is a byte range of the disk image or block device
//! (`fscommon::StreamSlice`) over a page cache of our own (`fat_disk`):
//! writes reach the disk at each [`FatPartition::sync`] and at
//! [`FatPartition::close`], which unmounts (fatfs clears its dirty flag)
//! and fsyncs the disk.

use super::fat_disk::{DiskFile, PageCache, Writes};
use anyhow::{bail, Context, Result};
use fscommon::StreamSlice;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

type Fs = fatfs::FileSystem<StreamSlice<DiskFile>>;

pub use super::fat_disk::Captured;

/// FAT32 cluster size used when formatting (2 KiB: a 256 MiB partition
/// then has enough clusters to be FAT32, as the UEFI specification asks).
const CLUSTER: u32 = 2048;
/// FAT32 needs at least 65525 clusters (with room for the FATs); smaller
/// partitions get the FAT type `fatfs` picks for their size.
const FAT32_MIN_CLUSTERS: u64 = 66_000;

/// Hex digits of a boot file's SHA-256 in its content name.
pub const HASH_DIGITS: usize = 16;

/// The name of a boot file with the content of `src`, for backends that
/// share identical kernel files between versions:
/// `<first 16 hex digits of its SHA-256><suffix>`.
pub fn content_name(src: &Path, suffix: &str) -> Result<String> {
    use sha2::Digest;
    let mut f = File::open(src).with_context(|| format!("reading {}", src.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", src.display()))?;
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{}{suffix}", &hex[..HASH_DIGITS]))
}

/// Whether `name` is a [`content_name`] with one of `suffixes`.
pub fn is_content_name(name: &str, suffixes: &[&str]) -> bool {
    suffixes.iter().any(|sfx| {
        name.strip_suffix(sfx).is_some_and(|stem| {
            stem.len() == HASH_DIGITS && stem.bytes().all(|b| b.is_ascii_hexdigit())
        })
    })
}

/// A sparse `disk.img` in `dir` with a 64 MiB FAT partition named `label`
/// at 1 MiB, for the backends' unit tests. Returns the image and the
/// partition's (offset, size).
#[cfg(test)]
pub fn test_partition(dir: &Path, label: &str) -> (std::path::PathBuf, (u64, u64)) {
    let img = dir.join("disk.img");
    let part = (1u64 << 20, 64u64 << 20);
    File::create(&img)
        .unwrap()
        .set_len(part.0 + part.1)
        .unwrap();
    format(&img, part.0, part.1, label).unwrap();
    (img, part)
}

/// Formats the byte range `start..start+size` of `disk` as FAT32 named `label`.
pub fn format(disk: &Path, start: u64, size: u64, label: &str) -> Result<()> {
    let cache = PageCache::new(open(disk, true)?, disk.display().to_string())?;
    let slice = StreamSlice::new(
        DiskFile::new(cache.clone(), Writes::Disk),
        start,
        start + size,
    )
    .with_context(|| format!("reaching the boot partition of {}", disk.display()))?;
    let mut name = [b' '; 11];
    for (i, b) in label.bytes().take(11).enumerate() {
        name[i] = b.to_ascii_uppercase();
    }
    let mut opts = fatfs::FormatVolumeOptions::new().volume_label(name);
    if size / u64::from(CLUSTER) > FAT32_MIN_CLUSTERS {
        opts = opts
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(CLUSTER);
    }
    fatfs::format_volume(slice, opts)
        .with_context(|| format!("formatting the FAT boot partition of {}", disk.display()))?;
    let mut cache = cache.borrow_mut();
    cache.sync(true)
}

fn open(disk: &Path, write: bool) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))
}

/// An open FAT partition.
pub struct FatPartition {
    fs: Option<Fs>,
    cache: std::rc::Rc<std::cell::RefCell<PageCache>>,
    what: String,
    write: bool,
    capture: Option<std::rc::Rc<std::cell::RefCell<Captured>>>,
}

impl FatPartition {
    /// Opens the FAT filesystem in the byte range `start..start+size` of `disk`.
    pub fn open(disk: &Path, start: u64, size: u64, write: bool) -> Result<FatPartition> {
        Self::open_with(disk, start, size, write, None)
    }

    /// Opens the FAT filesystem read-only, keeping what would be written in
    /// memory (later reads see it): [`FatPartition::close_captured`]
    /// returns those writes, to be applied to a copy or overlay of the disk.
    pub fn open_capturing(disk: &Path, start: u64, size: u64) -> Result<FatPartition> {
        let cap = std::rc::Rc::new(std::cell::RefCell::new(Captured::new()));
        Self::open_with(disk, start, size, false, Some(cap))
    }

    fn open_with(
        disk: &Path,
        start: u64,
        size: u64,
        write: bool,
        capture: Option<std::rc::Rc<std::cell::RefCell<Captured>>>,
    ) -> Result<FatPartition> {
        let what = format!("the FAT boot partition of {}", disk.display());
        let cache = PageCache::new(open(disk, write)?, what.clone())?;
        let writes = match (&capture, write) {
            (Some(cap), _) => Writes::Captured(cap.clone()),
            (None, true) => Writes::Disk,
            (None, false) => Writes::Dropped,
        };
        let slice = StreamSlice::new(DiskFile::new(cache.clone(), writes), start, start + size)
            .with_context(|| format!("reaching {what}"))?;
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new())
            .with_context(|| format!("reading {what} (not a FAT filesystem?)"))?;
        Ok(FatPartition {
            fs: Some(fs),
            cache,
            what,
            write,
            capture,
        })
    }

    /// Unmounts a partition opened with [`FatPartition::open_capturing`]
    /// and returns every write made to it, in order (byte offsets on the
    /// disk); the disk itself is unchanged.
    pub fn close_captured(mut self) -> Result<Captured> {
        if let Some(fs) = self.fs.take() {
            fs.unmount()
                .with_context(|| format!("unmounting {}", self.what))?;
        }
        Ok(self
            .capture
            .take()
            .map(|c| c.borrow().clone())
            .unwrap_or_default())
    }

    fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("open FAT partition")
    }

    fn ctx(&self, action: &str, path: &str) -> String {
        format!("{action} {path} on {}", self.what)
    }

    /// Bytes a file of `len` bytes occupies (whole clusters).
    pub fn allocated(&self, len: u64) -> u64 {
        let c = u64::from(self.fs().cluster_size());
        len.div_ceil(c) * c
    }

    /// Free bytes.
    pub fn free_bytes(&self) -> Result<u64> {
        let st = self
            .fs()
            .stats()
            .with_context(|| format!("reading the free space of {}", self.what))?;
        Ok(u64::from(st.free_clusters()) * u64::from(st.cluster_size()))
    }

    /// Which of `dirs` do not exist.
    pub fn missing_dirs(&self, dirs: &[&str]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for d in dirs {
            match self.fs().root_dir().open_dir(d) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.push(d.to_string()),
                Err(e) => return Err(e).with_context(|| self.ctx("opening directory", d)),
            }
        }
        Ok(out)
    }

    /// Writes `data` to `path` (created or truncated); its directory must exist.
    pub fn write(&self, path: &str, data: &[u8]) -> Result<()> {
        self.write_from(path, &mut &data[..]).map(drop)
    }

    /// Replaces `path` with `data` so that a power cut leaves the old or the
    /// new file: written under `<path>.tmp`, synced, renamed over `path`,
    /// synced (`cleanup` removes a `.tmp` an interruption left).
    pub fn replace(&self, path: &str, data: &[u8]) -> Result<()> {
        let tmp = format!("{path}{TMP_SUFFIX}");
        self.write(&tmp, data)?;
        self.sync()?;
        self.remove_all(path)?;
        self.rename(&tmp, path)?;
        self.sync()
    }

    /// Streams `src` (a host file) to `path`.
    pub fn copy_from(&self, path: &str, src: &Path) -> Result<u64> {
        let mut f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
        self.write_from(path, &mut f)
    }

    fn write_from(&self, path: &str, src: &mut dyn Read) -> Result<u64> {
        let mut f = self
            .fs()
            .root_dir()
            .create_file(path)
            .with_context(|| self.ctx("creating", path))?;
        f.truncate().with_context(|| self.ctx("truncating", path))?;
        let n = std::io::copy(src, &mut f).map_err(|e| {
            let msg = self.ctx("writing", path);
            if e.kind() == std::io::ErrorKind::Other && e.to_string().contains("No space") {
                anyhow::anyhow!("{msg}: the partition is full")
            } else {
                anyhow::Error::new(e).context(msg)
            }
        })?;
        f.flush().with_context(|| self.ctx("writing", path))?;
        Ok(n)
    }

    /// Overwrites the content of the existing file `path` with `data` of the
    /// same length, in place: its clusters and directory entry stay, so a
    /// file of one sector changes with one sector write.
    pub fn overwrite_in_place(&self, path: &str, data: &[u8]) -> Result<()> {
        let mut f = self
            .fs()
            .root_dir()
            .open_file(path)
            .with_context(|| self.ctx("opening", path))?;
        let mut old = Vec::new();
        f.read_to_end(&mut old)
            .with_context(|| self.ctx("reading", path))?;
        if old.len() != data.len() {
            bail!(
                "{}: it has {} bytes, not {}",
                self.ctx("overwriting", path),
                old.len(),
                data.len()
            );
        }
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| f.write_all(data))
            .and_then(|()| f.flush())
            .with_context(|| self.ctx("writing", path))
    }

    /// The content of `path`, `None` when it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.fs().root_dir().open_file(path) {
            Ok(mut f) => {
                let mut v = Vec::new();
                f.read_to_end(&mut v)
                    .with_context(|| self.ctx("reading", path))?;
                Ok(Some(v))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| self.ctx("opening", path)),
        }
    }

    /// Size of file `path`, `None` when it does not exist.
    pub fn file_len(&self, path: &str) -> Result<Option<u64>> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        Ok(self
            .list(dir)?
            .into_iter()
            .find(|e| !e.is_dir && e.name == name)
            .map(|e| e.len))
    }

    /// Entries of directory `path` (empty when it does not exist), without `.` and `..`.
    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>> {
        let root = self.fs().root_dir();
        let dir = if path.is_empty() {
            root
        } else {
            match root.open_dir(path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e).with_context(|| self.ctx("opening directory", path)),
            }
        };
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e.with_context(|| self.ctx("reading directory", path))?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            out.push(DirEntry {
                is_dir: e.is_dir(),
                len: e.len(),
                name,
            });
        }
        Ok(out)
    }

    /// Renames `from` to `to` (which must not exist) in the same directory tree.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let root = self.fs().root_dir();
        root.rename(from, &root, to)
            .with_context(|| self.ctx(&format!("renaming {from} to"), to))
    }

    /// Removes file or directory `path` with everything below it; a missing
    /// path is not an error.
    pub fn remove_all(&self, path: &str) -> Result<()> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let Some(entry) = self.list(dir)?.into_iter().find(|e| e.name == name) else {
            return Ok(());
        };
        if entry.is_dir {
            for child in self.list(path)? {
                self.remove_all(&format!("{path}/{}", child.name))?;
            }
        }
        self.fs()
            .root_dir()
            .remove(path)
            .with_context(|| self.ctx("removing", path))
    }

    /// Makes everything written so far durable (the next write is ordered
    /// after it on the disk).
    pub fn sync(&self) -> Result<()> {
        if self.write {
            self.cache.borrow_mut().sync(false)?;
        }
        Ok(())
    }

    /// Unmounts (fatfs writes its FSInfo and clears the dirty flag) and
    /// flushes everything to the disk.
    pub fn close(mut self) -> Result<()> {
        if let Some(fs) = self.fs.take() {
            fs.unmount()
                .with_context(|| format!("unmounting {}", self.what))?;
        }
        if !self.write {
            return Ok(());
        }
        self.cache.borrow_mut().sync(true)
    }
}

impl Drop for FatPartition {
    fn drop(&mut self) {
        // Not closed (an error path): what was written stays as it is; the
        // callers' write order keeps that consistent.
        if let Some(fs) = self.fs.take() {
            if let Err(e) = fs.unmount() {
                tracing::warn!("unmounting {}: {e}", self.what);
            }
        }
    }
}

/// `fsck.fat` and its package, which repairs a FAT partition whose writes
/// were interrupted.
pub const FSCK_FAT: crate::util::cmd::Tool = crate::util::cmd::Tool {
    program: "fsck.fat",
    package: "dosfstools",
};

/// Whether the FAT partition at `start` of `disk` has its "dirty" flag set:
/// a write to it was interrupted (`fatfs` sets the flag before its first
/// write and clears it when unmounted).
pub fn is_dirty(disk: &Path, start: u64) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut boot = [0u8; 512];
    open(disk, false)?
        .read_exact_at(&mut boot, start)
        .with_context(|| format!("reading the FAT boot sector of {}", disk.display()))?;
    // FAT32 keeps the flags at 0x41, FAT12/16 at 0x25 (bit 0: dirty);
    // FAT32 has 0 root directory entries (offset 17).
    let fat32 = u16::from_le_bytes([boot[17], boot[18]]) == 0;
    Ok(boot[if fat32 { 0x41 } else { 0x25 }] & 1 != 0)
}

/// Repairs an interrupted FAT partition with `fsck.fat -a` (clusters an
/// interrupted file write allocated but never linked are freed, the second
/// FAT, the free cluster count and the dirty flag are set right), through a
/// loop device on its byte range. A partition whose dirty flag is clear is
/// first checked read-only (`fsck.fat -n`): a power cut can lose the flag's
/// own write and keep later ones (the power-cut replay showed a wrong free
/// cluster count so). Returns whether anything was repaired.
pub fn repair(disk: &Path, start: u64, size: u64) -> Result<bool> {
    crate::util::cmd::require(&[&FSCK_FAT])?;
    let dirty = is_dirty(disk, start)?;
    let dev = crate::disk::loopdev::LoopGuard::attach_range(disk, Some((start, size)), false)?;
    if !dirty {
        let mut c = std::process::Command::new(FSCK_FAT.program);
        c.arg("-n").arg(dev.path());
        crate::util::cmd::prepare(&mut c);
        let out = c
            .output()
            .with_context(|| format!("starting {} (install dosfstools)", FSCK_FAT.program))?;
        if out.status.success() {
            dev.close()?;
            return Ok(false);
        }
    }
    let mut c = std::process::Command::new(FSCK_FAT.program);
    c.args(["-a", "-w"]).arg(dev.path());
    crate::util::cmd::prepare(&mut c);
    let out = c
        .output()
        .with_context(|| format!("starting {} (install dosfstools)", FSCK_FAT.program))?;
    // 0: nothing to do, 1: errors corrected.
    if !matches!(out.status.code(), Some(0 | 1)) {
        bail!(
            "repairing the FAT boot partition of {} with fsck.fat failed ({}): {}",
            disk.display(),
            out.status,
            crate::util::cmd::tail_lines(&String::from_utf8_lossy(&out.stdout), 10)
        );
    }
    // fsck.fat does not fsync: its writes sit in the loop device's cache,
    // which detaching would drop.
    std::fs::File::open(dev.path())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dev.path().display()))?;
    dev.close()?;
    Ok(true)
}

/// `mtools`, which makes the directories of a FAT partition.
pub const MTOOLS: crate::util::cmd::Tool = crate::util::cmd::Tool {
    program: "mmd",
    package: "mtools",
};

/// Makes the directories `dirs` (parents first) where missing on the FAT
/// partition at byte range `part` of `disk`, then runs `f` on it opened for
/// writing, and closes (and syncs) it after.
pub fn with_dirs<T>(
    disk: &Path,
    part: (u64, u64),
    dirs: &[&str],
    f: impl FnOnce(&FatPartition) -> Result<T>,
) -> Result<T> {
    let fat = FatPartition::open(disk, part.0, part.1, false)?;
    let missing = fat.missing_dirs(dirs)?;
    fat.close()?;
    make_dirs(disk, part.0, &missing)?;
    let fat = FatPartition::open(disk, part.0, part.1, true)?;
    let v = f(&fat)?;
    fat.close()?;
    Ok(v)
}

/// Suffix of the temporary name a file is written under before it is
/// renamed into place ([`FatPartition::replace`]).
pub const TMP_SUFFIX: &str = ".tmp";

/// Makes directories `dirs` (in order: parents first) on the FAT partition
/// starting `start` bytes into `disk`, with mtools' `mmd`. Call with no
/// [`FatPartition`] open on the disk.
pub fn make_dirs(disk: &Path, start: u64, dirs: &[String]) -> Result<()> {
    if dirs.is_empty() {
        return Ok(());
    }
    crate::util::cmd::require(&[&MTOOLS])?;
    let image = format!("{}@@{start}", disk.display());
    let mut args = vec!["-i".to_string(), image];
    args.extend(dirs.iter().map(|d| format!("::/{d}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = std::process::Command::new(MTOOLS.program);
    c.args(&args).env("MTOOLS_SKIP_CHECK", "1");
    crate::util::cmd::prepare(&mut c);
    let out = c
        .output()
        .with_context(|| format!("starting {} (install mtools)", MTOOLS.program))?;
    if !out.status.success() {
        bail!(
            "making directories {} on the FAT partition of {}: {}",
            dirs.join(", "),
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One entry of a directory.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Long name.
    pub name: String,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// Size in bytes (files).
    pub len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_write_rename_overwrite_remove() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let (start, size) = (1u64 << 20, 256u64 << 20);
        std::fs::File::create(&img)
            .unwrap()
            .set_len(start + size + (1 << 20))
            .unwrap();
        format(&img, start, size, "ESP").unwrap();
        let fat = FatPartition::open(&img, start, size, false).unwrap();
        assert_eq!(fat.missing_dirs(&["a", "a/b"]).unwrap(), vec!["a", "a/b"]);
        fat.close().unwrap();
        make_dirs(&img, start, &["a".into(), "a/b".into()]).unwrap();
        let src = d.path().join("kernel");
        std::fs::write(&src, vec![7u8; 100_000]).unwrap();
        let fat = FatPartition::open(&img, start, size, true).unwrap();
        assert!(fat.missing_dirs(&["a", "a/b"]).unwrap().is_empty());
        assert!(fat.write("nodir/x", b"x").is_err());
        let free0 = fat.free_bytes().unwrap();
        assert!(free0 > 200 << 20, "{free0}");
        assert_eq!(fat.copy_from("a/b/kernel", &src).unwrap(), 100_000);
        assert_eq!(fat.allocated(100_000), 100_352);
        assert!(fat.free_bytes().unwrap() <= free0 - 100_352);
        fat.write("a/x.conf.tmp", b"12345").unwrap();
        fat.rename("a/x.conf.tmp", "a/x.conf").unwrap();
        fat.overwrite_in_place("a/x.conf", b"abcde").unwrap();
        assert!(fat.overwrite_in_place("a/x.conf", b"abc").is_err());
        fat.close().unwrap();
        // Reopened: everything is on the disk.
        let fat = FatPartition::open(&img, start, size, true).unwrap();
        assert_eq!(fat.read("a/x.conf").unwrap().unwrap(), b"abcde");
        assert_eq!(fat.file_len("a/b/kernel").unwrap(), Some(100_000));
        assert!(fat.read("a/missing").unwrap().is_none());
        let names: Vec<String> = fat.list("a").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["b", "x.conf"]);
        fat.remove_all("a/b/kernel").unwrap();
        fat.remove_all("a/b/kernel").unwrap();
        assert!(fat.file_len("a/b/kernel").unwrap().is_none());
        assert!(fat.free_bytes().unwrap() >= free0 - 4096);
        fat.close().unwrap();
        // What it wrote is a clean FAT for dosfstools' checker.
        let part = d.path().join("part.img");
        let mut all = std::fs::read(&img).unwrap();
        all.drain(..start as usize);
        all.truncate(size as usize);
        std::fs::write(&part, all).unwrap();
        let out = std::process::Command::new("fsck.fat")
            .arg("-n")
            .arg(&part)
            .output()
            .expect("fsck.fat (apt-get install dosfstools)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn not_fat_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("zero.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let msg = format!(
            "{:#}",
            FatPartition::open(&img, 0, 4 << 20, false).err().unwrap()
        );
        assert!(msg.contains("not a FAT filesystem"), "{msg}");
    }
}
