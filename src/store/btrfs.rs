//! Btrfs operations: formatting, subvolumes, snapshots, read-only flags and
//! committing the filesystem to disk.

use crate::util::cmd;
use anyhow::{bail, Context, Result};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Formats `device` (a file or block device) as Btrfs with the given UUID and
/// filesystem label. btrfs-progs' default features are kept: SYSLINUX 6 boots them.
pub fn mkfs(device: &Path, uuid: &str, fs_label: &str) -> Result<()> {
    mkfs_with(device, uuid, fs_label, true)
}

/// Like [`mkfs`]; without `discard` the device is not trimmed first
/// (`--nodiscard`): a loop device over a partition of a block device turns
/// the trim into writing zeros over the whole partition.
///
/// A filesystem smaller than [`SMALL_FS`] gets 4 KiB nodes (see
/// [`node_size_for`]); a larger one btrfs-progs' default, 16 KiB.
pub fn mkfs_with(device: &Path, uuid: &str, fs_label: &str, discard: bool) -> Result<()> {
    let dev = device.to_string_lossy();
    let mut args = vec!["-q", "-f", "-U", uuid, "-L", fs_label];
    if !discard {
        args.push("--nodiscard");
    }
    let size = match device.metadata() {
        Ok(m) if m.is_file() => m.len(),
        _ => crate::disk::open::block_device_size(device)?,
    };
    let nodes = node_size_for(size, page_size()).map(|n| n.to_string());
    if let Some(n) = &nodes {
        args.extend(["--nodesize", n]);
    }
    args.push(&dev);
    cmd::run("mkfs.btrfs", &args).with_context(|| format!("formatting {dev} as Btrfs"))?;
    Ok(())
}

/// Below this size a new Btrfs gets 4 KiB nodes.
pub const SMALL_FS: u64 = 2 << 30;

/// The node size for a new Btrfs of `bytes` on a system with `page` byte
/// pages, when it is not btrfs-progs' default (16 KiB): 4 KiB below
/// [`SMALL_FS`] on 4 KiB-page systems.
///
/// Before Btrfs creates a file it reserves metadata for the worst case,
/// which grows with the node size (some 3.75 MiB per create with 16 KiB
/// nodes), and a small filesystem has one small metadata chunk (a tenth of
/// the device: 38 MiB on a 768 MiB partition). Copying thousands of small
/// files then waits on the kernel's space flusher at nearly every create:
/// measured on the Debian bench tree (6.8k entries), `cp -a` takes 1.73 s
/// into a 768 MiB Btrfs with 16 KiB nodes, 1.09 s with 4 KiB nodes, and
/// 0.6–0.7 s into 2 GiB or more with either (docs/performance.md). Larger
/// nodes pay off only on filesystems large enough not to stall. Elsewhere
/// the sector size is the page size, which nodes may not be smaller than:
/// those keep the default.
pub fn node_size_for(bytes: u64, page: u64) -> Option<u32> {
    (bytes < SMALL_FS && page == 4096).then_some(4096)
}

#[cfg(test)]
mod node_size_tests {
    use super::*;

    #[test]
    fn small_filesystems_get_4k_nodes_on_4k_pages() {
        assert_eq!(node_size_for(768 << 20, 4096), Some(4096));
        assert_eq!(node_size_for(SMALL_FS - 1, 4096), Some(4096));
        assert_eq!(node_size_for(SMALL_FS, 4096), None);
        assert_eq!(node_size_for(32 << 30, 4096), None);
        assert_eq!(node_size_for(768 << 20, 65536), None);
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

/// Creates an empty subvolume at `path`.
pub fn create_subvolume(path: &Path) -> Result<()> {
    libbtrfsutil::create_subvolume(path)
        .map_err(|e| e.os_error())
        .with_context(|| format!("creating subvolume {}", path.display()))
}

/// Snapshots subvolume `src` to `dst`, read-only when `readonly`.
pub fn snapshot(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    libbtrfsutil::CreateSnapshotOptions::new()
        .readonly(readonly)
        .create(src, dst)
        .map_err(|e| e.os_error())
        .with_context(|| format!("snapshotting {} to {}", src.display(), dst.display()))
}

/// Sets or clears the read-only flag of subvolume `path`.
pub fn set_readonly(path: &Path, readonly: bool) -> Result<()> {
    libbtrfsutil::set_subvolume_read_only(path, readonly)
        .map_err(|e| e.os_error())
        .with_context(|| format!("setting read-only={readonly} on {}", path.display()))
}

/// True when `path` is the root of a subvolume.
pub fn is_subvolume(path: &Path) -> bool {
    libbtrfsutil::is_subvolume(path).unwrap_or(false)
}

/// True when subvolume `path` is read-only.
pub fn is_readonly(path: &Path) -> Result<bool> {
    libbtrfsutil::subvolume_read_only(path)
        .map_err(|e| e.os_error())
        .with_context(|| format!("reading flags of {}", path.display()))
}

/// Deletes subvolume `path` (read-only ones too), with the subvolumes
/// nested in it (a `ro` version's `run/etc`).
pub fn delete_subvolume(path: &Path) -> Result<()> {
    if is_readonly(path).unwrap_or(false) {
        set_readonly(path, false)?;
    }
    libbtrfsutil::DeleteSubvolumeOptions::new()
        .recursive(true)
        .delete(path)
        .map_err(|e| e.os_error())
        .with_context(|| format!("deleting subvolume {}", path.display()))
}

/// Removes a version directory: its subvolumes, then its files.
pub fn remove_version_dir(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() && is_subvolume(&path) {
            delete_subvolume(&path)?;
        } else if meta.is_dir() && has_subvolume_below(&path) {
            // A bundle's quarantine holds the received subvolume.
            remove_version_dir(&path)?;
        } else if meta.is_dir() {
            crate::tree::copy::remove_tree(&path)?;
        } else {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// True when a direct entry of directory `dir` is a subvolume.
fn has_subvolume_below(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().any(|e| is_subvolume(&e.path())))
        .unwrap_or(false)
}

/// Commits everything written to the filesystem containing `path` (syncfs),
/// so that what was renamed before is durable before what comes after.
pub fn sync_fs(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncing the filesystem of {}", path.display()));
    }
    Ok(())
}

/// Offset of the primary Btrfs superblock on its device.
const BTRFS_SUPER_OFFSET: u64 = 0x10000;

/// Filesystem UUID (`fsid`) read from the primary superblock on `device`.
///
/// A filesystem's identity comes from its disk, never from a mount: since
/// Linux 6.7 a second mounted clone of one golden image (same fsid) gets a
/// temporary random UUID in the kernel, which must never reach a boot entry.
pub fn superblock_fs_uuid(device: &Path) -> Result<String> {
    use std::os::unix::fs::FileExt;
    // csum[32], fsid[16] at 32, bytenr[8], flags[8], magic[8] at 64.
    let mut sb = [0u8; 72];
    std::fs::File::open(device)
        .and_then(|f| f.read_exact_at(&mut sb, BTRFS_SUPER_OFFSET))
        .with_context(|| format!("reading the Btrfs superblock of {}", device.display()))?;
    if &sb[64..72] != b"_BHRfS_M" {
        bail!("{} holds no Btrfs superblock", device.display());
    }
    let mut fsid = [0u8; 16];
    fsid.copy_from_slice(&sb[32..48]);
    Ok(uuid::Uuid::from_bytes(fsid).hyphenated().to_string())
}

/// Offset of the Btrfs superblock's magic on its device.
const BTRFS_MAGIC_OFFSET: u64 = 0x10000 + 0x40;

/// True when `device` carries the Btrfs superblock magic.
fn has_btrfs_magic(device: &Path) -> bool {
    has_btrfs_magic_at(device, 0)
}

/// True when a Btrfs starting `start` bytes into `disk` (a partition)
/// carries the superblock magic.
pub fn has_btrfs_magic_at(disk: &Path, start: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 8];
    std::fs::File::open(disk)
        .and_then(|f| f.read_exact_at(&mut magic, start + BTRFS_MAGIC_OFFSET))
        .map(|()| &magic == b"_BHRfS_M")
        .unwrap_or(false)
}

/// Filesystem type found on `device` by probing, if any.
pub fn probe_fs_type(device: &Path) -> Result<Option<String>> {
    // The common case, without starting blkid.
    if has_btrfs_magic(device) {
        return Ok(Some("btrfs".to_string()));
    }
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "probing {} with blkid (install util-linux)",
                device.display()
            )
        })?;
    // blkid exits 2 when nothing is found.
    match out.status.code() {
        Some(0) => Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )),
        Some(2) => Ok(None),
        _ => anyhow::bail!(
            "probing {} failed: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Waits until deleted subvolumes on the filesystem at `top` are cleaned up,
/// so their space is really free (deletion is asynchronous in Btrfs).
pub fn wait_for_deletions(top: &Path) -> Result<()> {
    // BTRFS_IOC_SYNC commits and wakes the cleaner; without it, `subvolume
    // sync` waits for the next periodic commit (30 s by default).
    libbtrfsutil::sync(top)
        .map_err(|e| e.os_error())
        .with_context(|| format!("committing {}", top.display()))?;
    cmd::run("btrfs", &["subvolume", "sync", &top.to_string_lossy()]).with_context(|| {
        format!(
            "waiting for deleted subvolumes on {} to be cleaned",
            top.display()
        )
    })?;
    Ok(())
}

/// Bytes of data referenced by the files under `version_dir`, each extent
/// counted once (`btrfs filesystem du`: exclusive + set shared).
pub fn referenced_bytes(version_dir: &Path) -> Result<u64> {
    let out = cmd::run(
        "btrfs",
        &[
            "filesystem",
            "du",
            "-s",
            "--raw",
            &version_dir.to_string_lossy(),
        ],
    )
    .with_context(|| format!("measuring {}", version_dir.display()))?;
    parse_du(&out).with_context(|| {
        format!(
            "reading `btrfs filesystem du` output for {}",
            version_dir.display()
        )
    })
}

/// Exclusive + set shared from the summary line of `btrfs filesystem du -s --raw`.
fn parse_du(out: &str) -> Result<u64> {
    let line = out.lines().nth(1).context("no summary line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .take(3)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    match fields[..] {
        [_total, exclusive, set_shared] => Ok(exclusive + set_shared),
        _ => anyhow::bail!("unexpected line {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_superblock_magic() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        assert!(!has_btrfs_magic(&p));
        f.write_all_at(b"_BHRfS_M", BTRFS_MAGIC_OFFSET).unwrap();
        assert!(has_btrfs_magic(&p));
        assert!(!has_btrfs_magic(&d.path().join("missing")));
    }

    #[test]
    fn parses_du_summary() {
        let out = "     Total   Exclusive  Set shared  Filename\n  18493440        4096    18489344  /m/systems/v2\n";
        assert_eq!(parse_du(out).unwrap(), 18_493_440);
        assert!(parse_du("Total\n").is_err());
    }
}
