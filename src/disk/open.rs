//! Opening a deploy target: classify it, lock it, attach a loop device for an
//! image file, and mount the top-level subvolume in our private namespace.

use crate::boot::{Boot, BootKind};
use crate::disk::lock::TargetLock;
use crate::disk::loopdev::LoopGuard;
use crate::disk::mount::MountGuard;
use crate::disk::partition;
use crate::store::btrfs;
use crate::store::layout::Layout;
use anyhow::{bail, Context, Result};
use nix::mount::MsFlags;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What a TARGET path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Nothing there yet: a new image file will be created.
    Missing,
    /// An existing regular file (a disk image).
    File,
    /// A block device.
    BlockDevice,
}

/// Classifies `target`, rejecting directories and other kinds of file.
pub fn classify(target: &Path) -> Result<TargetKind> {
    match std::fs::metadata(target) {
        Ok(m) if m.is_file() => Ok(TargetKind::File),
        Ok(m) if m.file_type().is_block_device() => Ok(TargetKind::BlockDevice),
        Ok(m) if m.is_dir() => bail!(
            "target {} is a directory: give a disk image file (created if missing) or a block device",
            target.display()
        ),
        Ok(_) => bail!("target {} is neither a regular file nor a block device", target.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(target).is_ok() {
                bail!("target {} is a dangling symlink", target.display());
            }
            let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if is_device_dir(parent) {
                bail!(
                    "target {} does not exist, and under {} only an existing block device can be \
                     a target (an image file is never created there): check the device name \
                     (lsblk), or create its partition nodes (partx -a DISK)",
                    target.display(),
                    parent.display()
                );
            }
            if !parent.is_dir() {
                bail!(
                    "cannot create {}: directory {} does not exist",
                    target.display(),
                    parent.display()
                );
            }
            Ok(TargetKind::Missing)
        }
        Err(e) => Err(e).with_context(|| format!("reading target {}", target.display())),
    }
}

/// True when `dir` is `/dev` or below, or on a device filesystem.
fn is_device_dir(dir: &Path) -> bool {
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    if canon.starts_with("/dev") {
        return true;
    }
    // The mount holding `canon`: the longest mount point that prefixes it.
    crate::disk::mount::own_mounts()
        .into_iter()
        .filter(|m| canon.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .is_some_and(|m| m.fstype == "devtmpfs")
}

/// Where the Btrfs of a deploy disk is, and how the disk boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLayout {
    /// bios (whole disk), uefi, hybrid or uboot (GPT).
    pub boot: BootKind,
    /// Byte range (offset, size) of the Btrfs partition; `None`: the whole disk.
    pub btrfs: Option<(u64, u64)>,
    /// Byte range of the FAT boot partition on GPT disks: the EFI system
    /// partition, or U-Boot's boot partition on `uboot` disks.
    pub esp: Option<(u64, u64)>,
}

/// What a target holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// Nothing this tool or blkid recognises.
    Blank,
    /// A Btrfs (whole disk), or the GPT layout this tool writes.
    Btrfs(DiskLayout),
    /// Something else, described ("a ext4 filesystem", "a GPT partition table ...").
    Other(String),
}

/// Finds out what `target` holds. A Btrfs superblock at 64 KiB of the disk
/// means a whole-disk (`bios`) disk; a GPT whose first partition is an EFI
/// system partition and whose second holds a Btrfs is a `hybrid` disk (or
/// `uefi`, when the Btrfs partition lacks the legacy-BIOS-bootable flag).
pub fn probe(target: &Path) -> Result<Contents> {
    if btrfs::has_btrfs_magic_at(target, 0) {
        return Ok(Contents::Btrfs(DiskLayout {
            boot: BootKind::Bios,
            btrfs: None,
            esp: None,
        }));
    }
    if partition::has_gpt(target) {
        let parts = partition::read_gpt(target)?;
        if let [esp, root] = parts.as_slice() {
            if esp.type_guid == partition::TYPE_ESP && btrfs::has_btrfs_magic_at(target, root.start)
            {
                return Ok(Contents::Btrfs(DiskLayout {
                    boot: if root.legacy_boot {
                        BootKind::Hybrid
                    } else {
                        BootKind::Uefi
                    },
                    btrfs: Some((root.start, root.size)),
                    esp: Some((esp.start, esp.size)),
                }));
            }
            // U-Boot's: a FAT data partition flagged bootable, then the Btrfs.
            if esp.type_guid == partition::TYPE_BASIC_DATA
                && esp.legacy_boot
                && btrfs::has_btrfs_magic_at(target, root.start)
            {
                return Ok(Contents::Btrfs(DiskLayout {
                    boot: BootKind::Uboot,
                    btrfs: Some((root.start, root.size)),
                    esp: Some((esp.start, esp.size)),
                }));
            }
        }
        return Ok(Contents::Other(format!(
            "a GPT partition table with {} partition(s), not the layout of a btrfs-deploy disk",
            parts.len()
        )));
    }
    Ok(match btrfs::probe_fs_type(target)? {
        Some(t) => Contents::Other(format!("a {t} filesystem")),
        None => Contents::Blank,
    })
}

/// The layout of `target`, which must be a btrfs-deploy disk (whole-disk
/// Btrfs or GPT); otherwise an error naming what it holds.
pub fn require_btrfs(target: &Path) -> Result<DiskLayout> {
    match probe(target)? {
        Contents::Btrfs(l) => Ok(l),
        Contents::Other(what) => {
            bail!("{} holds {what}, not a btrfs-deploy disk", target.display())
        }
        Contents::Blank => bail!(
            "{} holds no filesystem: it is not a btrfs-deploy disk",
            target.display()
        ),
    }
}

/// Locks an existing target exclusively (fails at once if another deploy holds it).
pub fn lock_existing(target: &Path) -> Result<TargetLock> {
    let file =
        std::fs::File::open(target).with_context(|| format!("opening {}", target.display()))?;
    TargetLock::acquire(file, target)
}

/// Fails when `target` is an image file already attached to a loop device.
/// A block device may be mounted (on a device, the disk it runs from is):
/// callers that must not work on a mounted disk ask [`is_mounted`].
pub fn ensure_not_in_use(target: &Path, kind: TargetKind) -> Result<()> {
    if kind == TargetKind::File {
        if let Some(loopdev) = attached_loop_settled(target)? {
            bail!(
                "{} is in use: it is attached to {loopdev} (detach it with `losetup -d {loopdev}` if nothing uses it)",
                target.display()
            );
        }
    }
    Ok(())
}

/// Size in bytes of block device `dev` (BLKGETSIZE64).
pub fn block_device_size(dev: &Path) -> Result<u64> {
    use std::os::unix::io::AsRawFd;
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    let f = std::fs::File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let mut size = 0u64;
    // SAFETY: the ioctl writes one u64 into `size`.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut size) }
        .with_context(|| format!("reading the size of {}", dev.display()))?;
    Ok(size)
}

/// True when block device `target`, or one of its partitions, is mounted
/// (seen by the device number or by the mount source, as Btrfs mounts show
/// an anonymous device number).
pub fn is_mounted(target: &Path) -> Result<bool> {
    let meta =
        std::fs::metadata(target).with_context(|| format!("reading {}", target.display()))?;
    if !meta.file_type().is_block_device() {
        return Ok(false);
    }
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let mut devs = vec![format!("{maj}:{min}")];
    if let Some(name) = sys_block_name(maj, min) {
        if let Ok(rd) = std::fs::read_dir(format!("/sys/class/block/{name}")) {
            for e in rd.flatten() {
                if let Ok(dev) = std::fs::read_to_string(e.path().join("dev")) {
                    if e.path().join("partition").exists() {
                        devs.push(dev.trim().to_string());
                    }
                }
            }
        }
    }
    let mounted = crate::disk::mount::mounted_devices();
    Ok(devs.iter().any(|d| mounted.contains(d)))
}

/// Where a partition of block device `target` that overlaps the byte range
/// `range` (offset, size) is mounted: (partition device, mount point). On a
/// device the running system may have its EFI system partition mounted at
/// `/boot/efi`; this tool then must not write that range through the disk.
pub fn range_mounted(target: &Path, range: (u64, u64)) -> Result<Option<(String, PathBuf)>> {
    let meta =
        std::fs::metadata(target).with_context(|| format!("reading {}", target.display()))?;
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let rdev = meta.rdev();
    let Some(name) = sys_block_name(libc::major(rdev), libc::minor(rdev)) else {
        return Ok(None);
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .map(|v| v.trim().to_string())
    };
    let mut parts = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/sys/class/block/{name}")) {
        for e in rd.flatten() {
            let (Some(start), Some(size), Some(dev)) = (
                read(e.path().join("start")).and_then(|v| v.parse::<u64>().ok()),
                read(e.path().join("size")).and_then(|v| v.parse::<u64>().ok()),
                read(e.path().join("dev")),
            ) else {
                continue;
            };
            let (start, end) = (start * 512, (start + size) * 512);
            if start < range.0 + range.1 && range.0 < end {
                parts.push((format!("/dev/{}", e.file_name().to_string_lossy()), dev));
            }
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string("/proc/1/mountinfo")
        .or_else(|_| std::fs::read_to_string("/proc/self/mountinfo"))
        .unwrap_or_default();
    for m in crate::disk::mount::parse_mountinfo(&text) {
        let source_dev = std::fs::metadata(&m.source)
            .ok()
            .filter(|s| m.source.starts_with("/dev/") && s.file_type().is_block_device())
            .map(|s| format!("{}:{}", libc::major(s.rdev()), libc::minor(s.rdev())));
        if let Some((part, _)) = parts
            .iter()
            .find(|(_, dev)| *dev == m.dev || source_dev.as_deref() == Some(dev))
        {
            return Ok(Some((part.clone(), m.mount_point)));
        }
    }
    Ok(None)
}

/// Fails when the EFI system partition `esp` of block device `target` is
/// mounted: it is written from user space through the disk, and never
/// through a second path while the kernel (or anything else) has it mounted.
pub fn ensure_esp_not_mounted(target: &Path, esp: (u64, u64)) -> Result<()> {
    if let Some((part, at)) = range_mounted(target, esp)? {
        bail!(
            "the EFI system partition of {} ({part}) is mounted at {}: deploy writes it itself \
             and never through a second path while it is mounted (the mounted filesystem's \
             cache would undo or corrupt the change); unmount it (umount {}), run the command \
             again, then mount it back",
            target.display(),
            at.display(),
            at.display()
        );
    }
    Ok(())
}

fn sys_block_name(maj: u32, min: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// How long a loop device with auto-clear may take to go away after its
/// last user died (the kernel tears down a dead process's mounts and the
/// device asynchronously).
const AUTOCLEAR_SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// Like [`attached_loop`], but gives a device that is set to auto-clear
/// (typically left by a deploy killed a moment ago) time to detach.
fn attached_loop_settled(file: &Path) -> Result<Option<String>> {
    let deadline = std::time::Instant::now() + AUTOCLEAR_SETTLE;
    loop {
        let Some(dev) = attached_loop(file)? else {
            return Ok(None);
        };
        let name = dev.trim_start_matches("/dev/");
        let autoclear = std::fs::read_to_string(format!("/sys/block/{name}/loop/autoclear"))
            .map(|v| v.trim() == "1")
            .unwrap_or(false);
        if !autoclear || std::time::Instant::now() >= deadline {
            return Ok(Some(dev));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The loop device a file is attached to, if any.
pub fn attached_loop(file: &Path) -> Result<Option<String>> {
    let canon = file
        .canonicalize()
        .with_context(|| format!("resolving {}", file.display()))?;
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Ok(None);
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim()) == canon {
                return Ok(Some(format!("/dev/{name}")));
            }
        }
    }
    Ok(None)
}

/// A target with its top-level subvolume mounted.
pub struct Disk {
    /// Paths of the layout below the mount.
    pub layout: Layout,
    /// The block device the filesystem is on (loop device for images and
    /// for the Btrfs partition of a GPT disk).
    pub device: PathBuf,
    /// The disk as given (image or block device).
    pub target: PathBuf,
    /// Where its Btrfs and boot partition are.
    pub disk_layout: DiskLayout,
    read_only: bool,
    mount: Option<MountGuard>,
    loopdev: Option<LoopGuard>,
}

impl Disk {
    /// Attaches (for files) and mounts the top-level subvolume of `target`.
    /// The caller holds the target lock and has entered the private namespace.
    pub fn open(target: &Path, kind: TargetKind, read_only: bool) -> Result<Disk> {
        let disk_layout = require_btrfs(target)?;
        if let (false, TargetKind::BlockDevice, Some(esp)) = (read_only, kind, disk_layout.esp) {
            ensure_esp_not_mounted(target, esp)?;
        }
        let (device, loopdev) = match (kind, disk_layout.btrfs) {
            (TargetKind::BlockDevice, None) => (target.to_path_buf(), None),
            (_, range) => {
                let guard = LoopGuard::attach_range(target, range, read_only)?;
                (guard.path().to_path_buf(), Some(guard))
            }
        };
        let mut flags = MsFlags::MS_NOATIME;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let mount = match MountGuard::mount_temp(&device, "btrfs", flags, "subvolid=5") {
            Ok(m) => m,
            // After a power cut the filesystem may hold a log tree, which
            // Btrfs will not replay on read-only media: look at it as of
            // its last commit instead (what our write order keeps
            // consistent), without writing to it.
            Err(first) if read_only => {
                let m = MountGuard::mount_temp(
                    &device,
                    "btrfs",
                    flags,
                    "subvolid=5,rescue=nologreplay",
                )
                .map_err(|_| first)
                .with_context(|| format!("mounting the Btrfs on {}", target.display()))?;
                crate::util::ui::detail(format!(
                    "{} holds an unreplayed log (a power cut?): shown as of its last commit; \
                     the next deploy, set-default or cleanup replays it",
                    target.display()
                ));
                m
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("mounting the Btrfs on {}", target.display()))
            }
        };
        Ok(Disk {
            layout: Layout::new(mount.path()),
            device,
            target: target.to_path_buf(),
            disk_layout,
            read_only,
            mount: Some(mount),
            loopdev,
        })
    }

    /// Runs `f` on the open disk, then closes it (reporting close errors)
    /// when `f` succeeded, or drops it (best-effort teardown) when it failed.
    pub fn run<T>(self, f: impl FnOnce(&Disk) -> Result<T>) -> Result<T> {
        match f(&self) {
            Ok(v) => {
                self.close()?;
                Ok(v)
            }
            Err(e) => {
                drop(self);
                Err(e)
            }
        }
    }

    /// The boot backends of this disk.
    pub fn boot(&self) -> Boot {
        Boot::new(
            self.disk_layout.boot,
            &self.target,
            self.disk_layout.btrfs,
            self.disk_layout.esp,
        )
    }

    /// UUID of the filesystem, from its on-disk superblock (never from the
    /// mount: a mounted clone of the same image gets a temporary one).
    pub fn fs_uuid(&self) -> Result<String> {
        crate::store::btrfs::superblock_fs_uuid(&self.device)
    }

    /// Commits, unmounts and detaches, reporting any failure.
    pub fn close(mut self) -> Result<()> {
        if !self.read_only {
            crate::store::btrfs::sync_fs(&self.layout.top)?;
        }
        if let Some(m) = self.mount.take() {
            m.close()?;
        }
        if let Some(l) = self.loopdev.take() {
            l.close()?;
        }
        Ok(())
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // Order matters: unmount before the loop device goes.
        drop(self.mount.take());
        drop(self.loopdev.take());
    }
}
