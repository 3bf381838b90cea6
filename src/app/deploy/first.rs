//! First deploy: a new image or device is partitioned, formatted and
//! given its first version.

use super::version::{check_boot_space, fill_tree, finish_version, publish_version};
use super::{NewDisk, Outcome, Plan, ESP_LABEL, ESP_SIZE, FS_LABEL, GPTMBR};
use crate::boot::BootKind;
use crate::disk::open::{self, Disk, TargetKind};
use crate::disk::partial;
use crate::disk::partition::{self, PartSpec};
use crate::store::btrfs;
use crate::store::deployment::Deployment;
use crate::store::layout;
use crate::tree::arch::Arch;
use crate::tree::copy;
use crate::util::cmd;
use crate::util::fsutil;
use crate::util::signals;
use crate::util::ui;
use crate::util::units;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::Arc;

/// First deploy: everything is built on `<target>.partial` (or on the block
/// device) and the image appears at the target only once complete.
pub(super) fn deploy_new(plan: &Plan, new: &NewDisk) -> Result<Outcome> {
    let (work_path, lock, partial) = match plan.kind {
        TargetKind::BlockDevice => (
            plan.target.clone(),
            open::lock_existing(&plan.target)?,
            None,
        ),
        _ => {
            let path = layout::image_partial(&plan.target);
            let (lock, file) = partial::create(&path, new.size)?;
            (path.clone(), lock, Some((path, file)))
        }
    };
    // On a block device the disk is the device, whatever the default image
    // size would have been: say what is really made.
    let made = match plan.kind {
        TargetKind::BlockDevice => open::block_device_size(&plan.target)?,
        _ => new.size,
    };
    let partitions = if new.boot.partitioned() {
        format!(
            " ({} disk: GPT, {} {}, Btrfs partition)",
            new.boot,
            units::format_size(ESP_SIZE),
            if new.boot.uboot() {
                "FAT boot partition"
            } else {
                "EFI system partition"
            }
        )
    } else {
        String::new()
    };
    ui::step(format!(
        "Creating a {} Btrfs{partitions} for {} (version {})",
        units::format_size(made),
        plan.target.display(),
        plan.label
    ));
    let result = (|| -> Result<Deployment> {
        if plan.kind == TargetKind::BlockDevice {
            // Blank, or --wipe: no old signature (a Btrfs at 64 KiB, a GPT)
            // may be taken for the new disk's layout.
            cmd::run(
                "wipefs",
                &["--all", "--quiet", &work_path.to_string_lossy()],
            )
            .with_context(|| format!("wiping {}", work_path.display()))?;
        }
        if new.boot.partitioned() {
            let range = partition_new_disk(&work_path, new.boot)?;
            if new.rpi {
                // The Pi 3's boot ROM reads MBR tables only.
                let parts = partition::read_gpt(&work_path)?;
                partition::write_hybrid_mbr(&work_path, (parts[0].start, parts[0].size))?;
            }
            let dev =
                crate::disk::loopdev::LoopGuard::attach_range(&work_path, Some(range), false)?;
            // A loop device over a block device's partition: no trim (it
            // would zero the whole partition); over an image file the trim
            // punches holes and keeps it sparse.
            let discard = plan.kind != TargetKind::BlockDevice;
            btrfs::mkfs_with(dev.path(), &new.fs_uuid, FS_LABEL, discard)?;
            dev.close()?;
        } else {
            btrfs::mkfs(&work_path, &new.fs_uuid, FS_LABEL)?;
        }
        let kind = if plan.kind == TargetKind::BlockDevice {
            TargetKind::BlockDevice
        } else {
            TargetKind::File
        };
        let record = Disk::open(&work_path, kind, false)?
            .run(|disk| build_first_version(plan, disk, &new.fs_uuid))?;
        mark_root_partition(&work_path, &record)?;
        // Until the image is renamed into place, an interruption discards it.
        signals::check()?;
        Ok(record)
    })();
    let result = result.and_then(|record| match &partial {
        Some((path, file)) => move_image_into_place(path, file, &plan.target).map(|()| record),
        None => Ok(record),
    });
    if result.is_err() {
        if let Some((path, file)) = &partial {
            partial::remove_if_same(path, file);
        }
    }
    drop(lock);
    let record = result?;
    ui::step(format!(
        "Deployed {} to {}",
        plan.label,
        plan.target.display()
    ));
    Ok(Outcome {
        record,
        is_default: true,
        removed: Vec::new(),
    })
}

/// Gives the Btrfs partition of a new GPT disk the Discoverable Partitions
/// Specification's root type of the tree's architecture, once the tree is
/// written and its architecture known (an archive's is read only after
/// extraction). A tree whose architecture is not known keeps the generic
/// Linux type; so do disks made before, which open the same way.
fn mark_root_partition(disk: &Path, record: &Deployment) -> Result<()> {
    let Some(arch) = record.arch.as_deref().and_then(Arch::parse) else {
        return Ok(());
    };
    if !partition::has_gpt(disk) {
        return Ok(());
    }
    let parts = partition::read_gpt(disk)?;
    let Some(root) = parts.iter().find(|p| p.type_guid == partition::TYPE_LINUX) else {
        return Ok(());
    };
    partition::set_type(disk, root.number, arch.root_partition_type())
}

/// Writes the GPT of a new `uefi`/`hybrid`/`uboot` disk (the FAT boot
/// partition, then the Btrfs partition over the rest), SYSLINUX's GPT boot
/// code for `hybrid`, and formats the boot partition. Returns the Btrfs
/// partition's byte range. On `uboot` disks the boot partition is a FAT
/// data partition with the legacy-BIOS-bootable attribute: U-Boot's distro
/// boot scans partitions so flagged first.
fn partition_new_disk(disk: &Path, kind: BootKind) -> Result<(u64, u64)> {
    let boot_part = if kind.uboot() {
        PartSpec {
            size: Some(ESP_SIZE),
            type_guid: partition::TYPE_BASIC_DATA,
            name: "boot",
            legacy_boot: true,
        }
    } else {
        PartSpec {
            size: Some(ESP_SIZE),
            type_guid: partition::TYPE_ESP,
            name: "EFI system partition",
            legacy_boot: false,
        }
    };
    partition::write_gpt(
        disk,
        &[
            boot_part,
            PartSpec {
                size: None,
                type_guid: partition::TYPE_LINUX,
                name: "btrfs-deploy",
                legacy_boot: kind.bios(),
            },
        ],
    )?;
    if kind.bios() {
        let code = std::fs::read(GPTMBR).with_context(|| format!("reading {GPTMBR}"))?;
        partition::write_mbr_boot_code(disk, &code[..code.len().min(440)])?;
    }
    let parts = partition::read_gpt(disk)?;
    let [esp, root] = parts.as_slice() else {
        bail!(
            "{} has {} partitions after partitioning, not 2",
            disk.display(),
            parts.len()
        );
    };
    let label = if kind.uboot() { "BOOT" } else { ESP_LABEL };
    crate::boot::fat::format(disk, esp.start, esp.size, label)?;
    Ok((root.start, root.size))
}

/// `--boot rpi`: the Raspberry Pi firmware, device trees, U-Boot and
/// config.txt from the version's tree onto the new disk's boot partition,
/// leaving room for the version's kernel files.
fn install_pi_firmware(disk: &Disk, dir: &Path, record: &Deployment) -> Result<()> {
    let fw = crate::boot::rpi::find(&dir.join(layout::ORIG), record.kernel_version.as_deref())?;
    let mut reserve = 0;
    for f in [layout::KERNEL, layout::INITRAMFS] {
        if let Ok(m) = std::fs::metadata(dir.join(f)) {
            reserve += m.len();
        }
    }
    let part = disk
        .disk_layout
        .esp
        .context("a --boot rpi disk has a boot partition")?;
    ui::step(format!(
        "Writing the Raspberry Pi firmware, device trees and U-Boot ({} files, {})",
        fw.files.len(),
        units::format_size(fw.size()?)
    ));
    crate::boot::rpi::install(&disk.target, part, &fw, reserve)
}

/// Makes the finished image durable, then renames it onto the target —
/// without replacing anything that appeared at the target meanwhile.
fn move_image_into_place(partial: &Path, file: &std::fs::File, target: &Path) -> Result<()> {
    file.sync_all()
        .with_context(|| format!("syncing {}", partial.display()))?;
    nix::fcntl::renameat2(
        None,
        partial,
        None,
        target,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))?;
    fsutil::fsync_dir(parent_dir(target))
}

fn parent_dir(p: &Path) -> &Path {
    p.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn build_first_version(plan: &Plan, disk: &Disk, fs_uuid: &str) -> Result<Deployment> {
    let top = &disk.layout;
    std::fs::create_dir_all(top.systems())?;
    std::fs::create_dir_all(top.state())?;
    let dir = top.partial_version(&plan.label);
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let orig = dir.join(layout::ORIG);
    btrfs::create_subvolume(&orig)?;
    ui::step(format!(
        "Copying {} ({})",
        plan.rootfs.display(),
        units::format_size(plan.rootfs_bytes)
    ));
    let progress = Arc::new(copy::Progress::default());
    let stats = {
        let _bar = ui::Progress::start("copying", progress.clone(), plan.rootfs_bytes);
        fill_tree(plan, &orig, progress)?
    };
    ui::detail(format!(
        "{} files, {} directories, {} symlinks, {} written",
        stats.files,
        stats.dirs,
        stats.symlinks,
        units::format_size(stats.bytes)
    ));
    let mut record = finish_version(plan, top, &dir, fs_uuid, None)?;
    crate::store::rootmode::prepare_run(&dir.join(layout::RUN), plan.root_mode)?;
    record.details.insert(
        "copy".into(),
        serde_json::json!({
            "files": stats.files, "dirs": stats.dirs, "symlinks": stats.symlinks,
            "specials": stats.specials, "hardlinks": stats.hardlinks, "bytes": stats.bytes,
        }),
    );
    record.save(&dir.join(layout::DEPLOYMENT_JSON))?;
    check_boot_space(disk, &plan.label, &dir)?;
    if plan.new_disk.as_ref().is_some_and(|n| n.rpi) {
        install_pi_firmware(disk, &dir, &record)?;
    }
    signals::check()?;
    publish_version(plan, disk, &dir, fs_uuid, true)?;
    Ok(record)
}
