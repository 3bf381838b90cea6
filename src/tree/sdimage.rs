//! An SD-card image as the rootfs (`--rootfs raspios.img`): a disk image
//! with a FAT boot (firmware) partition and a Linux root partition, as
//! Raspberry Pi OS ships. Both are opened read-only: the root partition is
//! mounted `ro,noload` (ext4's journal is not replayed, the image is not
//! written) on a private mount, and is the tree to copy; the FAT's files
//! are read from user space and become the version's `/boot/firmware`
//! (where `--boot rpi` finds the firmware). The image's own fstab lines for
//! those two partitions name its PARTUUIDs, which the new disk does not
//! have: they are commented out in the version's tree (the rest of its
//! fstab is kept).

use crate::boot::fat::FatPartition;
use crate::disk::loopdev::LoopGuard;
use crate::disk::mount::MountGuard;
use crate::disk::partition;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where the FAT's files go in the version's tree.
pub const FIRMWARE_DIR: &str = "boot/firmware";

/// A partition of the image: (byte offset, byte size).
type Range = (u64, u64);

/// The two partitions of an SD-card image, and its MBR disk id (the
/// PARTUUID prefix its fstab uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub boot: Option<Range>,
    pub root: Range,
    pub disk_id: Option<String>,
}

/// Reads an MBR partition table: the first FAT (0x0B, 0x0C, 0x0E) and the
/// first Linux (0x83) partition. None when `mbr` is no such table (a
/// protective MBR of a GPT counts as none).
fn mbr_layout(mbr: &[u8; 512]) -> Option<Layout> {
    if mbr[510..] != [0x55, 0xAA] {
        return None;
    }
    let (mut boot, mut root) = (None, None);
    for i in 0..4 {
        let e = &mbr[446 + 16 * i..462 + 16 * i];
        let start = u32::from_le_bytes(e[8..12].try_into().ok()?) as u64 * 512;
        let size = u32::from_le_bytes(e[12..16].try_into().ok()?) as u64 * 512;
        match e[4] {
            0xEE => return None,
            0x0B | 0x0C | 0x0E if boot.is_none() && size > 0 => boot = Some((start, size)),
            0x83 if root.is_none() && size > 0 => root = Some((start, size)),
            _ => {}
        }
    }
    let id = u32::from_le_bytes(mbr[440..444].try_into().ok()?);
    Some(Layout {
        boot,
        root: root?,
        disk_id: (id != 0).then(|| format!("{id:08x}")),
    })
}

/// The layout of `path` when it is a disk image with a Linux root
/// partition (MBR, or GPT with a Linux or DPS root type); None otherwise.
pub fn probe(path: &Path) -> Option<Layout> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() < 1 << 20 {
        return None;
    }
    let f = std::fs::File::open(path).ok()?;
    let mut mbr = [0u8; 512];
    f.read_exact_at(&mut mbr, 0).ok()?;
    if let Some(l) = mbr_layout(&mbr) {
        return Some(l);
    }
    if !partition::has_gpt(path) {
        return None;
    }
    let parts = partition::read_gpt(path).ok()?;
    let fat = [partition::TYPE_BASIC_DATA, partition::TYPE_ESP];
    let boot = parts
        .iter()
        .find(|p| fat.contains(&p.type_guid.as_str()))
        .map(|p| (p.start, p.size));
    let root = parts
        .iter()
        .find(|p| {
            p.type_guid == partition::TYPE_LINUX
                || ["amd64", "arm64", "armhf", "i386", "riscv64"]
                    .iter()
                    .filter_map(|a| crate::tree::arch::Arch::parse(a))
                    .any(|a| a.root_partition_type() == p.type_guid)
        })
        .map(|p| (p.start, p.size))?;
    Some(Layout {
        boot,
        root,
        disk_id: None,
    })
}

/// The image opened: its root mounted read-only, its FAT's files staged.
pub struct Opened {
    /// The image.
    pub image: PathBuf,
    /// The partitions found.
    pub layout: Layout,
    /// The FAT's files (None: the image has no FAT partition).
    pub firmware: Option<tempfile::TempDir>,
    mount: Option<MountGuard>,
    loop_dev: Option<LoopGuard>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sdimage::Opened({}, {:?})",
            self.image.display(),
            self.layout
        )
    }
}

impl Opened {
    /// The mounted root partition: the tree to deploy.
    pub fn root(&self) -> &Path {
        self.mount.as_ref().expect("mounted until dropped").path()
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            if let Err(e) = m.close() {
                crate::util::ui::warn(format!("unmounting {}: {e:#}", self.image.display()));
            }
        }
        if let Some(l) = self.loop_dev.take() {
            let _ = l.close();
        }
    }
}

/// Opens `image` (whose layout [`probe`] found) read-only. Call inside the
/// private mount namespace.
pub fn open(image: &Path, layout: Layout) -> Result<Opened> {
    crate::util::cmd::require(&[&crate::util::cmd::BLKID])?;
    let image = image
        .canonicalize()
        .with_context(|| format!("resolving {}", image.display()))?;
    crate::util::ui::step(format!(
        "Opening the disk image {} read-only (root partition at {} MiB{})",
        image.display(),
        layout.root.0 >> 20,
        layout
            .boot
            .map(|b| format!(", boot partition at {} MiB", b.0 >> 20))
            .unwrap_or_default()
    ));
    let firmware = match layout.boot {
        Some((start, size)) => Some(stage_fat(&image, start, size)?),
        None => None,
    };
    let loop_dev = LoopGuard::attach_range(&image, Some(layout.root), true)?;
    let fstype = crate::store::btrfs::probe_fs_type(loop_dev.path())?.ok_or_else(|| {
        anyhow::anyhow!(
            "the root partition of {} holds no filesystem blkid knows",
            image.display()
        )
    })?;
    let data = if fstype.starts_with("ext") {
        "noload"
    } else {
        ""
    };
    let mount = MountGuard::mount_temp(
        loop_dev.path(),
        &fstype,
        nix::mount::MsFlags::MS_RDONLY | nix::mount::MsFlags::MS_NOATIME,
        data,
    )
    .with_context(|| {
        format!(
            "mounting the root partition ({fstype}) of {} read-only",
            image.display()
        )
    })?;
    if !mount.path().join("etc").is_dir() {
        bail!(
            "the root partition of {} has no /etc: it is not a root filesystem",
            image.display()
        );
    }
    Ok(Opened {
        image,
        layout,
        firmware,
        mount: Some(mount),
        loop_dev: Some(loop_dev),
    })
}

/// Copies every file of the FAT at `start` of `image` into a temporary
/// directory.
fn stage_fat(image: &Path, start: u64, size: u64) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let fat = FatPartition::open(image, start, size, false)
        .with_context(|| format!("reading the boot partition of {}", image.display()))?;
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        for e in fat.list(&rel)? {
            let path = if rel.is_empty() {
                e.name.clone()
            } else {
                format!("{rel}/{}", e.name)
            };
            let dst = dir.path().join(&path);
            if e.is_dir {
                std::fs::create_dir_all(&dst)?;
                stack.push(path);
            } else if let Some(data) = fat.read(&path)? {
                std::fs::write(&dst, data).with_context(|| format!("writing {}", dst.display()))?;
            }
        }
    }
    Ok(dir)
}

/// After the tree was copied into `dst`: the FAT's files into
/// `dst/boot/firmware`, and the image's fstab lines for its own two
/// partitions commented out.
pub fn finish_tree(opened: &Opened, dst: &Path) -> Result<()> {
    if let Some(fw) = &opened.firmware {
        let target = dst.join(FIRMWARE_DIR);
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        crate::util::cmd::run(
            "cp",
            &[
                "-r",
                "--no-preserve=ownership",
                &format!("{}/.", fw.path().display()),
                &target.to_string_lossy(),
            ],
        )
        .with_context(|| {
            format!(
                "copying the boot partition's files into {}",
                target.display()
            )
        })?;
    }
    let Some(id) = &opened.layout.disk_id else {
        return Ok(());
    };
    let Some(fstab) = crate::util::rootpath::try_resolve_in_root(dst, Path::new("etc/fstab"))?
    else {
        return Ok(());
    };
    let Ok(text) = std::fs::read_to_string(&fstab) else {
        return Ok(());
    };
    let new = comment_out_own(&text, id, &opened.image);
    if new != text {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&fstab)?.permissions().mode() & 0o7777;
        crate::util::fsutil::write_atomic(&fstab, new.as_bytes(), mode)?;
        crate::util::ui::detail(format!(
            "commented out the fstab lines naming the partitions of {} (PARTUUID={id}-NN)",
            opened.image.display()
        ));
    }
    Ok(())
}

/// `text` with each line whose device is `PARTUUID=<id>-NN` commented out.
fn comment_out_own(text: &str, id: &str, image: &Path) -> String {
    let prefix = format!("PARTUUID={id}-");
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let dev = line.split_whitespace().next().unwrap_or("");
        if dev
            .to_ascii_lowercase()
            .starts_with(&prefix.to_ascii_lowercase())
        {
            out.push_str(&format!(
                "# {} names a partition of {}, not of this disk (btrfs-deploy):\n# ",
                dev,
                image.display()
            ));
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_raspios_mbr_and_comments_out_its_own_fstab_lines() {
        let mut mbr = [0u8; 512];
        mbr[440..444].copy_from_slice(&0x1234abcdu32.to_le_bytes());
        let mut entry = |i: usize, kind: u8, start: u32, size: u32| {
            let e = &mut mbr[446 + 16 * i..462 + 16 * i];
            e[4] = kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&size.to_le_bytes());
        };
        entry(0, 0x0C, 8192, 1024000);
        entry(1, 0x83, 1032192, 4000000);
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        assert_eq!(
            mbr_layout(&mbr),
            Some(Layout {
                boot: Some((8192 * 512, 1024000 * 512)),
                root: (1032192 * 512, 4000000 * 512),
                disk_id: Some("1234abcd".into()),
            })
        );
        // A protective MBR is no SD-card table.
        let mut gpt = mbr;
        gpt[446 + 4] = 0xEE;
        assert_eq!(mbr_layout(&gpt), None);
        let fstab = "proc /proc proc defaults 0 0\nPARTUUID=1234abcd-01 /boot/firmware vfat defaults 0 2\nPARTUUID=1234ABCD-02 / ext4 defaults,noatime 0 1\nPARTUUID=99999999-03 /data ext4 defaults 0 2\n";
        let out = comment_out_own(fstab, "1234abcd", Path::new("r.img"));
        assert!(out.contains("proc /proc proc defaults 0 0\n"));
        assert!(
            out.contains("\n# PARTUUID=1234abcd-01 /boot/firmware"),
            "{out}"
        );
        assert!(out.contains("\n# PARTUUID=1234ABCD-02 / ext4"), "{out}");
        assert!(out.contains("\nPARTUUID=99999999-03 /data"), "{out}");
    }
}
