//! One deploy, from plan to switch (design §2):
//!
//! plan (validate everything, touch nothing) → open target (lock) → attach →
//! mount top level in a private namespace → write systems/.<L>.partial/orig →
//! configure extensions → fstab → state → orig read-only → run snapshot →
//! kernel files → rename .partial to <L> → sync → bootloader config → switch
//! systems/default → sync → unmount, detach (→ rename image.partial to image).

use crate::boot::BootKind;
use crate::disk::open::TargetKind;
use crate::store::deployment::Deployment;
use crate::tree::arch::Arch;
use crate::tree::extensions::{self, Extension};
use crate::tree::kernel::KernelChoice;
use anyhow::Result;
use std::path::PathBuf;

mod first;
mod resolve;
mod state_dirs;
mod upgrade;
mod version;
use first::deploy_new;
pub use resolve::plan;
use upgrade::deploy_upgrade;

/// Smallest image this tool creates.
const MIN_IMAGE: u64 = 256 << 20;
/// Scratch subvolume (inside the partial version) an archive is extracted to on upgrades.
const SCRATCH_SOURCE: &str = ".source";
/// Room kept for Btrfs metadata and system chunks on top of the data.
const FS_OVERHEAD: u64 = 160 << 20;
/// Filesystem label written by mkfs.
const FS_LABEL: &str = "btrfs-deploy";
/// Size of the EFI system partition of a new `uefi` or `hybrid` disk: FAT32,
/// room for the kernel and initramfs of several versions.
pub const ESP_SIZE: u64 = 256 << 20;
/// Volume label of the EFI system partition.
const ESP_LABEL: &str = "ESP";
/// SYSLINUX's MBR boot code for GPT disks: boots the partition with the
/// legacy-BIOS-bootable attribute.
pub const GPTMBR: &str = "/usr/lib/syslinux/mbr/gptmbr.bin";
/// How a new disk boots when `--boot` is not given (an arm64 rootfs: `uboot`).
pub const DEFAULT_BOOT: BootKind = BootKind::Hybrid;
/// Default kernel arguments of an arm64 system: the PL011 serial port of
/// QEMU's `virt` board and of most boards' debug header.
pub const ARM64_KERNEL_ARGS: &str = "console=tty0 console=ttyAMA0,115200";

/// The kernel arguments of a tree of `arch` when none are given.
pub(super) fn default_kernel_args(arch: Option<Arch>) -> String {
    if arch == Some(Arch::Arm64) {
        ARM64_KERNEL_ARGS.into()
    } else {
        crate::boot::extlinux::DEFAULT_KERNEL_ARGS.into()
    }
}

/// A new image or device to format.
#[derive(Debug)]
pub struct NewDisk {
    /// Bytes.
    pub size: u64,
    /// Filesystem UUID chosen up front (it goes into fstab and the boot config).
    pub fs_uuid: String,
    /// How it boots.
    pub boot: BootKind,
    /// `--boot rpi`: a `uboot` disk with the Raspberry Pi firmware.
    pub rpi: bool,
}

/// Everything a deploy needs, validated before anything is written.
#[derive(Debug)]
pub struct Plan {
    /// Version label.
    pub label: String,
    /// Rootfs directory (canonical).
    pub rootfs: PathBuf,
    /// Target path as given.
    pub target: PathBuf,
    /// What the target is.
    pub kind: TargetKind,
    /// Set for a first deploy; None when adding a version.
    pub new_disk: Option<NewDisk>,
    /// Whether the rootfs is an archive (its kernel is found once extracted).
    pub tarball: bool,
    /// Deploy without kernel and bootloader.
    pub no_bootloader: bool,
    /// Explicit kernel files, if any.
    pub kernel_choice: KernelChoice,
    /// Kernel arguments after root=..., when given (`--kernel-args`, the
    /// config); else those of the tree's architecture, which an archive's
    /// is known only once it is written (an arm64 tarball: ttyAMA0).
    pub kernel_args: Option<String>,
    /// `--rootfs IMAGE.img`: the SD-card image whose root partition (mounted
    /// read-only at `rootfs`) is the tree; kept open for the deploy.
    pub source_image: Option<std::sync::Arc<crate::tree::sdimage::Opened>>,
    /// How the version's root is mounted (`--root-mode`).
    pub root_mode: crate::store::rootmode::RootMode,
    /// Leave the default as it is.
    pub no_default: bool,
    /// Boot the new version once, on trial (`--trial`); the default stays.
    pub trial: bool,
    /// Keep at most this many versions.
    pub keep: Option<usize>,
    /// Compare contents when syncing an upgrade.
    pub checksum: bool,
    /// Bytes the rootfs occupies.
    pub rootfs_bytes: u64,
    /// Configure extensions to run, in order.
    pub extensions: Vec<Extension>,
    /// What extensions see: settings and context.
    pub ext_context: extensions::Context,
    /// A verified bundle given as `--rootfs` (then `rootfs` is its path or `-`).
    pub bundle: Option<crate::bundle::apply::Opened>,
    /// Architecture of the rootfs (`--arch`, or read from a directory
    /// rootfs; an archive's is read once it is extracted).
    pub arch: Option<Arch>,
}

/// What a finished deploy did.
#[derive(Debug)]
pub struct Outcome {
    /// The new version's record, as saved in its `deployment.json`.
    pub record: Deployment,
    /// Whether the new version is now the default.
    pub is_default: bool,
    /// Versions removed by `--keep`.
    pub removed: Vec<String>,
}

/// Runs a planned deploy.
pub fn execute(plan: &Plan) -> Result<Outcome> {
    match &plan.new_disk {
        Some(new) => deploy_new(plan, new),
        None => deploy_upgrade(plan),
    }
}
