//! One deploy, from plan to switch (design §2):
//!
//! plan (validate everything, touch nothing) → open target (lock) → attach →
//! mount top level in a private namespace → write systems/.<L>.partial/orig →
//! configure extensions → fstab → state → orig read-only → run snapshot →
//! kernel files → rename .partial to <L> → sync → bootloader config → switch
//! systems/default → sync → unmount, detach (→ rename image.partial to image).

use crate::boot::{extlinux, uefi, BootKind};
use crate::cli::BootArg;
use crate::cli::DeployArgs;
use crate::disk::open::{self, Contents, Disk, TargetKind};
use crate::disk::partial;
use crate::disk::partition::{self, PartSpec};
use crate::store::btrfs;
use crate::store::deployment::{self, Deployment};
use crate::store::layout::{self, Layout};
use crate::store::lifecycle;
use crate::store::versions;
use crate::tree::arch::{self, Arch};
use crate::tree::copy::{self, CopyOptions, SyncOptions};
use crate::tree::extensions::{self, Extension};
use crate::tree::fstab;
use crate::tree::kernel::{self, KernelChoice};
use crate::tree::state;
use crate::tree::statemerge;
use crate::tree::tarball;
use crate::util::cmd;
use crate::util::fsutil;
use crate::util::signals;
use crate::util::ui;
use crate::util::units;
use crate::UsageError;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
fn default_kernel_args(arch: Option<Arch>) -> String {
    if arch == Some(Arch::Arm64) {
        ARM64_KERNEL_ARGS.into()
    } else {
        extlinux::DEFAULT_KERNEL_ARGS.into()
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

/// Validates the request into a plan. Nothing is written.
/// `size_from_cli`: whether `--size` was given on the command line (a size
/// from the config file only matters for new images and is ignored otherwise).
pub fn plan(
    args: &DeployArgs,
    settings: BTreeMap<String, String>,
    size_from_cli: bool,
) -> Result<Plan> {
    let target = args.target.clone().ok_or_else(|| {
        UsageError(
            "no TARGET given: name a disk image file or block device (see deploy --help)".into(),
        )
    })?;
    let rootfs_arg = args.rootfs.clone().ok_or_else(|| {
        UsageError("no rootfs given: use --rootfs DIR (or `rootfs` in the config file)".into())
    })?;
    if let Some(label) = &args.label {
        units::validate_label(label)
            .map_err(|e| UsageError(format!("invalid --version: {e:#}")))?;
    }
    // A bundle is verified before anything else; its manifest names the label.
    let bundle = if crate::bundle::apply::is_bundle(&rootfs_arg) {
        let b = crate::bundle::apply::open(
            &rootfs_arg,
            args.verify_key.as_deref(),
            args.insecure_no_verify,
            args.allow_downgrade,
        )?;
        if let Some(l) = args.label.as_ref().filter(|l| **l != b.manifest.label) {
            bail!(
                "--version {l} does not match the bundle's version {}: drop --version or give {}",
                b.manifest.label,
                b.manifest.label
            );
        }
        Some(b)
    } else {
        None
    };
    let args = &DeployArgs {
        label: bundle
            .as_ref()
            .map(|b| b.manifest.label.clone())
            .or_else(|| args.label.clone()),
        ..args.clone()
    };
    if args.trial && args.no_default {
        return Err(UsageError(
            "--trial and --no-default contradict each other: --trial already leaves the default \
             as it is and boots the new version once; drop --no-default"
                .into(),
        )
        .into());
    }
    if let Some(keep) = args.keep {
        if keep == 0 {
            return Err(UsageError(
                "--keep must be at least 1 (the default version is always kept)".into(),
            )
            .into());
        }
    }
    let rootfs = match &bundle {
        Some(_) => rootfs_arg.clone(),
        None => check_rootfs(&rootfs_arg)?,
    };
    check_target_outside(&target, &rootfs)?;
    require_root()?;
    cmd::require(&[&cmd::MKFS_BTRFS, &cmd::BLKID])?;
    let boot_arg = args.boot.map(|b| match b {
        BootArg::Bios => BootKind::Bios,
        BootArg::Uefi => BootKind::Uefi,
        BootArg::Hybrid => BootKind::Hybrid,
        BootArg::Uboot => BootKind::Uboot,
    });
    let tarball = bundle.is_none() && rootfs.is_file();
    let arch = match &args.arch {
        Some(a) => Some(Arch::parse(a).ok_or_else(|| {
            UsageError(format!("invalid --arch {a}: use one of {}", arch::names()))
        })?),
        // A tree whose architecture cannot be read (no ELF init or shell)
        // is deployed as before: nothing checked, nothing recorded.
        None if !tarball && bundle.is_none() => arch::detect_rootfs(&rootfs).ok(),
        None => None,
    };
    let kernel_choice = KernelChoice {
        kernel: args.kernel.clone(),
        initramfs: args.initramfs.clone(),
        dtb: args.dtb.clone(),
    };
    if !args.no_bootloader {
        kernel::check_explicit(&kernel_choice)?;
    }
    // Checked now so that a rootfs without a kernel is refused before
    // anything is written; the files installed are looked up again in the
    // written tree, after extensions ran.
    if !args.no_bootloader && !tarball && bundle.is_none() {
        let files = kernel::find_boot_files(&rootfs, &kernel_choice)?;
        if let Some(a) = arch {
            arch::check_kernel(
                &files.kernel,
                a,
                &format!("the rootfs {}", rootfs.display()),
            )?;
        }
    } else if let (Some(k), Some(a)) = (&kernel_choice.kernel, arch) {
        arch::check_kernel(k, a, "the rootfs (--arch)")?;
    }

    let kind = open::classify(&target)?;
    if kind == TargetKind::File || kind == TargetKind::BlockDevice {
        // A running deploy holds the lock and has the image attached: name
        // it, rather than suggest detaching its loop device.
        drop(open::lock_existing(&target)?);
        open::ensure_not_in_use(&target, kind)?;
    }
    let is_new = match kind {
        TargetKind::Missing => true,
        TargetKind::File => {
            if std::fs::metadata(&target)?.len() == 0 {
                bail!(
                    "target {} is an empty file: remove it, or give a new path",
                    target.display()
                );
            }
            match open::probe(&target)? {
                Contents::Btrfs(_) => false,
                Contents::Other(what) => bail!(
                    "target {} exists and holds {what}, not a btrfs-deploy disk: choose a new path",
                    target.display()
                ),
                Contents::Blank => bail!(
                    "target {} exists and is not a btrfs-deploy disk: choose a new path or remove it",
                    target.display()
                ),
            }
        }
        TargetKind::BlockDevice if open::is_mounted(&target)? => {
            if args.wipe || !matches!(open::probe(&target)?, Contents::Btrfs(_)) {
                bail!(
                    "{} is mounted (or one of its partitions is): unmount it first; a mounted \
                     disk is never formatted, --wipe or not",
                    target.display()
                );
            }
            // On a device: a new version next to the running one.
            false
        }
        TargetKind::BlockDevice => match open::probe(&target)? {
            Contents::Blank => true,
            _ if args.wipe => true,
            Contents::Btrfs(_) => false,
            Contents::Other(what) => bail!(
                "{} holds {what}: pass --wipe to erase it and deploy",
                target.display()
            ),
        },
    };
    if args.trial && is_new {
        bail!(
            "--trial boots a new version once and falls back to the default, and {} has no \
             version yet: deploy the first one without --trial",
            target.display()
        );
    }
    let boot_kind = if is_new {
        boot_arg.unwrap_or(if arch == Some(Arch::Arm64) {
            BootKind::Uboot
        } else {
            DEFAULT_BOOT
        })
    } else {
        let existing = open::require_btrfs(&target)?.boot;
        if let Some(b) = boot_arg.filter(|b| *b != existing) {
            bail!(
                "--boot {b} applies to new disks only; {} is a {existing} disk and keeps its layout \
                 (deploy to a new image, or to a device with --wipe, to change it)",
                target.display()
            );
        }
        existing
    };
    // SYSLINUX runs only for disks that boot under BIOS (its boot code, its
    // one-shot record); uefi and uboot disks need no extlinux on the host.
    if !args.no_bootloader && boot_kind.bios() {
        cmd::require(&[&cmd::EXTLINUX])?;
    }
    if is_new && boot_kind.partitioned() {
        cmd::require(&[&partition::SFDISK, &crate::boot::fat::MTOOLS])?;
        if !args.no_bootloader && boot_kind.uefi() {
            uefi::require_systemd_boot()?;
        }
    }
    if is_new && boot_kind == BootKind::Hybrid && !Path::new(GPTMBR).is_file() {
        bail!(
            "{GPTMBR} not found: hybrid disks boot under BIOS through SYSLINUX's GPT boot code; \
             install the Debian package syslinux-common"
        );
    }

    // What the rootfs occupies: sizes a new image and drives progress. An
    // archive is always read (that also rejects unsafe entries up front); a
    // directory is walked only for a new image, an upgrade does not need it.
    if let (Some(b), true) = (&bundle, is_new) {
        bail!(
            "a bundle adds a version to a disk that holds versions already; {} does not: \
             deploy the base system first (bundle {} is {})",
            target.display(),
            b.manifest.label,
            match &b.manifest.base {
                Some(base) => format!("a delta against {}", base.label),
                None => "a full bundle".into(),
            }
        );
    }
    let rootfs_bytes = if let Some(b) = &bundle {
        b.manifest.payload.size
    } else if tarball {
        ui::step(format!("Reading {}", rootfs.display()));
        tarball::content_size(&rootfs)?
    } else if is_new {
        fsutil::tree_usage(&rootfs)?.0
    } else {
        0
    };
    let new_disk = if is_new {
        // What a partitioned disk needs besides its Btrfs.
        let extra = if boot_kind.partitioned() {
            ESP_SIZE + partition::GPT_OVERHEAD
        } else {
            0
        };
        let needed = rootfs_bytes + rootfs_bytes / 10 + FS_OVERHEAD + extra;
        let size = match &args.size {
            Some(s) => {
                let size = units::parse_size(s)
                    .map_err(|e| UsageError(format!("invalid --size: {e:#}")))?;
                if kind == TargetKind::BlockDevice {
                    bail!(
                        "--size applies to new image files only; {} is a block device",
                        target.display()
                    );
                }
                if size < needed.max(MIN_IMAGE + extra) {
                    let part = if boot_kind.partitioned() {
                        format!(
                            " and the {} boot partition of a {boot_kind} disk",
                            units::format_size(ESP_SIZE)
                        )
                    } else {
                        String::new()
                    };
                    bail!(
                        "--size {} is too small for the rootfs {} ({} used){part}: give at least {}",
                        units::format_size(size),
                        rootfs.display(),
                        units::format_size(rootfs_bytes),
                        units::format_size(needed.max(MIN_IMAGE + extra))
                    );
                }
                size
            }
            None => default_size(rootfs_bytes) + extra,
        };
        if kind == TargetKind::BlockDevice && boot_kind.partitioned() {
            let dev_size = device_size(&target)?;
            if dev_size < (MIN_IMAGE + extra).max(needed) {
                bail!(
                    "{} ({}) is too small for a {boot_kind} disk with this rootfs: it needs at least {} \
                     (the {} takes {})",
                    target.display(),
                    units::format_size(dev_size),
                    units::format_size((MIN_IMAGE + extra).max(needed)),
                    if boot_kind.uboot() {
                        "U-Boot boot partition"
                    } else {
                        "EFI system partition"
                    },
                    units::format_size(ESP_SIZE)
                );
            }
        }
        if kind == TargetKind::Missing {
            check_free_space(&target, size)?;
        }
        Some(NewDisk {
            size,
            fs_uuid: uuid::Uuid::new_v4().to_string(),
            boot: boot_kind,
        })
    } else {
        if args.size.is_some() && size_from_cli {
            bail!(
                "--size applies to a new image only; {} already holds versions",
                target.display()
            );
        }
        if args.label.is_none() {
            return Err(UsageError(format!(
                "{} already holds versions: give the new one a label with --version LABEL",
                target.display()
            ))
            .into());
        }
        None
    };
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| layout::FACTORY_LABEL.to_string());
    let exts = extensions::find(&args.extensions, &args.extensions_dir)?;
    let ext_context = extensions::Context {
        version: label.clone(),
        upgrade: new_disk.is_none(),
        target: target.clone(),
        settings,
        arch,
    };
    if !exts.is_empty() {
        let names: Vec<&str> = exts.iter().map(|e| e.name.as_str()).collect();
        ui::step(format!("Checking extensions: {}", names.join(", ")));
        extensions::run_checks(&exts, &ext_context)?;
        // Extensions run the tree's programs: a foreign tree needs qemu-user.
        if let Some(a) = arch {
            if let Some(note) = crate::tree::foreign::ensure_runnable(a, "the rootfs")? {
                ui::detail(note);
            }
        }
    }
    Ok(Plan {
        label,
        rootfs,
        target,
        kind,
        new_disk,
        tarball,
        no_bootloader: args.no_bootloader,
        kernel_choice,
        kernel_args: args.kernel_args.clone(),
        root_mode: args.root_mode.unwrap_or_default(),
        no_default: args.no_default || args.trial,
        trial: args.trial,
        keep: args.keep,
        checksum: args.checksum,
        rootfs_bytes,
        extensions: exts,
        ext_context,
        bundle,
        arch,
    })
}

/// Size of a new image when none is given: the rootfs, room for one full
/// upgrade, and metadata, rounded up to 64 MiB.
pub fn default_size(rootfs_bytes: u64) -> u64 {
    let raw = rootfs_bytes * 2 + rootfs_bytes / 5 + FS_OVERHEAD + (128 << 20);
    let step = 64u64 << 20;
    raw.div_ceil(step) * step
}

/// Size in bytes of a block device.
fn device_size(dev: &Path) -> Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    f.seek(std::io::SeekFrom::End(0))
        .with_context(|| format!("reading the size of {}", dev.display()))
}

fn check_rootfs(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("rootfs {} does not exist or cannot be read", path.display()))?;
    if meta.is_file() && tarball::is_tarball(path) {
        return path
            .canonicalize()
            .with_context(|| format!("resolving {}", path.display()));
    }
    if !meta.is_dir() {
        bail!(
            "rootfs {} is not a directory nor a tar archive (.tar, .tar.gz, .tar.zst, .tar.xz)",
            path.display()
        );
    }
    let canon = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?;
    if canon == Path::new("/") {
        bail!("rootfs is the host's / : give the directory of the system to deploy");
    }
    for name in std::iter::once("etc").chain(layout::STATE_DIRS) {
        match std::fs::symlink_metadata(canon.join(name)) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                tarball::check_top_entry(name, tarball::TopKind::Symlink)?
            }
            Ok(_) => tarball::check_top_entry(name, tarball::TopKind::Other)?,
            Err(_) => {}
        }
    }
    let mut entries =
        std::fs::read_dir(&canon).with_context(|| format!("reading rootfs {}", canon.display()))?;
    if entries.next().is_none() {
        bail!("rootfs {} is empty", canon.display());
    }
    Ok(canon)
}

/// Refuses a target (or its `.partial`) inside the rootfs directory: the
/// image would be copied into itself.
fn check_target_outside(target: &Path, rootfs: &Path) -> Result<()> {
    if !rootfs.is_dir() {
        return Ok(());
    }
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(dir) = parent.canonicalize() else {
        return Ok(()); // classify() names a missing directory
    };
    if dir.starts_with(rootfs) {
        return Err(UsageError(format!(
            "target {} is inside the rootfs {}: the image would be copied into itself; \
             put the image outside the rootfs",
            target.display(),
            rootfs.display()
        ))
        .into());
    }
    Ok(())
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("deploy must run as root: it attaches loop devices, mounts and formats filesystems (try sudo)");
    }
    Ok(())
}

fn check_free_space(target: &Path, size: u64) -> Result<()> {
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("checking free space in {}", dir.display()))?;
    let max_file = st.blocks() as u64 * st.fragment_size() as u64;
    if size > max_file {
        bail!(
            "--size {} is larger than the filesystem holding {} ({}): choose a smaller size",
            units::format_size(size),
            dir.display(),
            units::format_size(max_file)
        );
    }
    Ok(())
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

/// First deploy: everything is built on `<target>.partial` (or on the block
/// device) and the image appears at the target only once complete.
fn deploy_new(plan: &Plan, new: &NewDisk) -> Result<Outcome> {
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

/// Writes the rootfs (directory or archive) into the empty directory `dst`.
fn fill_tree(plan: &Plan, dst: &Path, progress: Arc<copy::Progress>) -> Result<copy::CopyStats> {
    if plan.tarball {
        tarball::extract(&plan.rootfs, dst, Some(&progress))
    } else {
        copy::copy_tree(
            &plan.rootfs,
            dst,
            &CopyOptions {
                threads: 0,
                progress: Some(progress),
            },
        )
        .context("copying the rootfs")
    }
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
    signals::check()?;
    publish_version(plan, disk, &dir, fs_uuid, true)?;
    Ok(record)
}

/// Adds a version next to the existing ones (design §3). The target is
/// first inspected read-only, so a refused upgrade leaves it byte-identical.
fn deploy_upgrade(plan: &Plan) -> Result<Outcome> {
    let kind = plan.kind;
    let _lock = open::lock_existing(&plan.target)?;
    Disk::open(&plan.target, kind, true)?.run(|check| {
        check_upgrade_target(plan, check)?;
        match &plan.bundle {
            Some(b) => crate::bundle::apply::check_disk(b, &check.layout, &plan.target),
            None => Ok(()),
        }
    })?;
    Disk::open(&plan.target, kind, false)?.run(|disk| upgrade_on(plan, disk))
}

/// What can be checked on the mounted target without writing to it.
fn check_upgrade_target(plan: &Plan, disk: &Disk) -> Result<()> {
    let top = &disk.layout;
    if !top.exists() {
        bail!(
            "{} holds a Btrfs without the btrfs-deploy layout (no systems/default): choose another target",
            plan.target.display()
        );
    }
    if std::fs::symlink_metadata(top.version(&plan.label)).is_ok() {
        bail!(
            "version {} already exists on {}: choose a new label (see `deploy list {}`)",
            plan.label,
            plan.target.display(),
            plan.target.display()
        );
    }
    versions::default_label(top)?;
    if plan.trial {
        if plan.no_bootloader {
            bail!("--trial boots the new version once, and --no-bootloader deploys it without a kernel: drop one of them");
        }
        disk.boot().check_trial()?;
    }
    if disk.disk_layout.boot.partitioned() {
        // FAT names ignore case: `V2` and `v2` would share files on the ESP.
        if let Some(other) = versions::list(top)?
            .into_iter()
            .find(|v| v.label.eq_ignore_ascii_case(&plan.label))
        {
            bail!(
                "version {} differs from the existing {} only in case, and {} keeps kernels on a FAT \
                 partition, which ignores case: choose another label",
                plan.label,
                other.label,
                plan.target.display()
            );
        }
        // The files a directory rootfs ships now (an archive's or a
        // bundle's are checked once written, before the ESP is touched).
        let planned = (!plan.no_bootloader && !plan.tarball && plan.bundle.is_none())
            .then(|| kernel::find_boot_files(&plan.rootfs, &plan.kernel_choice))
            .transpose()?;
        if let Some(b) = &planned {
            let mut files = vec![b.kernel.clone()];
            files.extend(b.initramfs.clone());
            disk.boot().check_space_for(&plan.label, &files)?;
        }
    }
    if plan.no_bootloader && !plan.no_default && top.extlinux_conf().exists() {
        bail!(
            "{} boots through extlinux, but version {} has no kernel (--no-bootloader): making it the \
             default would leave nothing to boot; add it with --no-default, or deploy it with a kernel",
            plan.target.display(),
            plan.label
        );
    }
    Ok(())
}

fn upgrade_on(plan: &Plan, disk: &Disk) -> Result<Outcome> {
    let top = &disk.layout;
    check_upgrade_target(plan, disk)?;
    lifecycle::remove_partial_versions(top)?;
    statemerge::recover(top)?;
    // Space of versions deleted earlier (or just now) must be free before writing.
    btrfs::wait_for_deletions(&top.top)?;
    let fs_uuid = disk.fs_uuid()?;
    let old = versions::default_label(top)?;
    let old_dir = top.version(&old);
    let dir = top.partial_version(&plan.label);
    let result = (|| -> Result<Deployment> {
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let orig = dir.join(layout::ORIG);
        let (source, stats) = match &plan.bundle {
            // The received subvolume (verified chunk by chunk, then checked)
            // is the new version's content: orig is a writable snapshot of
            // it, without a walk of the tree (docs/bundles.md).
            Some(b) => {
                let received = crate::bundle::apply::receive(b, &dir)?;
                btrfs::snapshot(&received, &orig, false)?;
                crate::bundle::apply::strip_source_fstab(&orig, &b.manifest.source_fs_uuid)?;
                (received, None)
            }
            None => {
                let (source, stats) = sync_into_snapshot(plan, top, &old, &dir)?;
                (source, Some(stats))
            }
        };
        let mut record = finish_version(plan, top, &dir, &fs_uuid, Some((&old, &source)))?;
        if plan.tarball {
            btrfs::delete_subvolume(&source)?;
        }
        if let Some(b) = &plan.bundle {
            record.build = Some(b.manifest.build);
            record
                .details
                .insert("bundle".into(), crate::bundle::apply::record(b));
        }
        if let Some(stats) = stats {
            record.details.insert("sync".into(), serde_json::json!({
                "unchanged": stats.unchanged, "written": stats.written, "metadata_only": stats.metadata_only,
                "deleted": stats.deleted, "bytes_written": stats.bytes_written,
            }));
        }
        ui::step(format!(
            "Carrying local /etc changes of {old} into {}",
            plan.label
        ));
        let report = crate::tree::etcmerge::merge_etc(
            &old_dir.join(layout::ORIG).join("etc"),
            &old_dir.join(layout::RUN).join("etc"),
            &dir.join(layout::ORIG).join("etc"),
            &dir.join(layout::RUN).join("etc"),
        )
        .context("merging /etc")?;
        for c in &report.conflicts {
            ui::detail(format!(
                "CONFLICT /etc/{}: {}{}",
                c.path,
                c.reason,
                c.local_copy
                    .as_ref()
                    .map(|l| format!(" (your version saved as /etc/{l})"))
                    .unwrap_or_default()
            ));
        }
        record
            .details
            .insert("etc_merge".into(), serde_json::to_value(&report)?);
        crate::store::rootmode::prepare_run(&dir.join(layout::RUN), plan.root_mode)?;
        record.save(&dir.join(layout::DEPLOYMENT_JSON))?;
        check_boot_space(disk, &plan.label, &dir)?;
        // Last point where an interruption still discards the new version.
        signals::check()?;
        Ok(record)
    })();
    let record = match result {
        Ok(record) => record,
        Err(e) => {
            ui::step(format!("Removing the partial version {}", plan.label));
            if let Err(ce) =
                btrfs::remove_version_dir(&dir).and_then(|()| btrfs::wait_for_deletions(&top.top))
            {
                tracing::warn!("removing partial version {}: {ce:#}", dir.display());
            }
            return Err(e);
        }
    };
    publish_version(plan, disk, &dir, &fs_uuid, !plan.no_default)?;
    if plan.trial {
        ui::step(format!(
            "Arming a trial: the next boot, and only it, starts {}",
            plan.label
        ));
        lifecycle::arm_trial(top, &disk.boot(), &plan.label, &fs_uuid)?;
    }
    let removed = match plan.keep {
        Some(keep) => lifecycle::prune(top, &disk.boot(), keep, &old, &plan.label, &fs_uuid)?,
        None => Vec::new(),
    };
    Ok(Outcome {
        record,
        is_default: !plan.no_default,
        removed,
    })
}

/// Snapshots the old default's `orig` as the new version's and syncs the
/// rootfs into it (an archive is first extracted next to it: same
/// filesystem, so the sync reflinks instead of copying). Returns the tree
/// synced from and the statistics.
fn sync_into_snapshot(
    plan: &Plan,
    top: &Layout,
    old: &str,
    dir: &Path,
) -> Result<(PathBuf, copy::SyncStats)> {
    let orig = dir.join(layout::ORIG);
    btrfs::snapshot(&top.version(old).join(layout::ORIG), &orig, false)?;
    let source = if plan.tarball {
        let scratch = dir.join(SCRATCH_SOURCE);
        btrfs::create_subvolume(&scratch)?;
        ui::step(format!("Extracting {}", plan.rootfs.display()));
        let progress = Arc::new(copy::Progress::default());
        let _bar = ui::Progress::start("extracting", progress.clone(), plan.rootfs_bytes);
        fill_tree(plan, &scratch, progress)?;
        scratch
    } else {
        plan.rootfs.clone()
    };
    ui::step(format!(
        "Syncing {} into a snapshot of {old}",
        plan.rootfs.display()
    ));
    let progress = Arc::new(copy::Progress::default());
    let stats = {
        let _bar = ui::Progress::start("syncing", progress.clone(), plan.rootfs_bytes);
        copy::sync_tree(
            &source,
            &orig,
            &SyncOptions {
                checksum: plan.checksum,
                threads: 0,
                progress: Some(progress),
                // The version keeps its vendor copy of the state
                // directories (the base of the /state merge).
                exclude_top: Vec::new(),
            },
        )
        .context("syncing the rootfs into the new version")?
    };
    ui::detail(format!(
        "{} unchanged, {} written, {} metadata only, {} deleted, {} written",
        stats.unchanged,
        stats.written,
        stats.metadata_only,
        stats.deleted,
        units::format_size(stats.bytes_written)
    ));
    Ok((source, stats))
}

/// fstab, state, read-only orig, run snapshot, kernel files; returns the
/// record (not yet saved).
fn finish_version(
    plan: &Plan,
    top: &Layout,
    dir: &Path,
    fs_uuid: &str,
    upgrade: Option<(&str, &Path)>,
) -> Result<Deployment> {
    let upgraded_from = upgrade.map(|(old, _)| old);
    let orig = dir.join(layout::ORIG);
    signals::check()?;
    // An archive's architecture is known once it is written.
    let arch = match plan.arch {
        Some(a) => Some(a),
        None => {
            let a = arch::detect_rootfs(&orig).ok();
            if let (Some(a), false) = (a, plan.extensions.is_empty()) {
                let what = format!("the rootfs {}", plan.rootfs.display());
                if let Some(note) = crate::tree::foreign::ensure_runnable(a, &what)? {
                    ui::detail(note);
                }
            }
            a
        }
    };
    if !plan.extensions.is_empty() {
        let context = extensions::Context {
            arch,
            ..plan.ext_context.clone()
        };
        // (run_configure announces each extension as it starts it.)
        extensions::run_configure(&plan.extensions, &orig, &context)?;
        signals::check()?;
    }
    ui::step("Completing etc/fstab");
    let completion = fstab::complete_file_for(&orig, fs_uuid, &plan.label, plan.root_mode)?;
    for mp in &completion.added {
        ui::detail(format!("added {mp}"));
    }
    for d in &completion.kept_state_dirs {
        ui::detail(format!(
            "/{d} is mounted by an existing fstab entry: kept inside the version"
        ));
    }
    for w in &completion.warnings {
        ui::warn(w);
    }
    setup_state(top, &orig, &completion.kept_state_dirs)?;
    signals::check()?;
    btrfs::set_readonly(&orig, true)?;
    btrfs::snapshot(&orig, &dir.join(layout::RUN), false)?;
    let (created, created_unix) = deployment::now();
    let mut record = Deployment {
        label: plan.label.clone(),
        created,
        created_unix,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        rootfs: plan.rootfs.display().to_string(),
        kernel_args: plan
            .kernel_args
            .clone()
            .unwrap_or_else(|| default_kernel_args(arch)),
        root_mode: plan.root_mode,
        upgraded_from: upgraded_from.map(str::to_string),
        fstab_added: completion.added.clone(),
        warnings: completion.warnings.clone(),
        extensions: plan.extensions.iter().map(|e| e.name.clone()).collect(),
        settings: crate::config::redact(&plan.ext_context.settings),
        arch: arch.map(|a| a.name().to_string()),
        ..Default::default()
    };
    record.details.insert(
        statemerge::STATE_IN_ORIG.into(),
        serde_json::Value::Bool(true),
    );
    // The kernel files are those of the tree as written, after extensions
    // ran (symlinks resolved inside it, now): reflinks of the tree's files,
    // so an unchanged kernel costs no data. --kernel & co. are host files,
    // copied once.
    if !plan.no_bootloader {
        let boot = kernel::find_boot_files(&orig, &plan.kernel_choice)
            .with_context(|| format!("finding the kernel of version {}", plan.label))?;
        ui::step("Installing kernel files");
        install_boot_file(&boot.kernel, &dir.join(layout::KERNEL), &orig)?;
        if let Some(a) = arch {
            arch::check_kernel(&boot.kernel, a, &format!("version {}", plan.label))?;
        }
        record.has_kernel = true;
        record.kernel_version = boot.version.clone();
        if let Some(i) = &boot.initramfs {
            install_boot_file(i, &dir.join(layout::INITRAMFS), &orig)?;
            record.has_initramfs = true;
        }
        if let Some(d) = &boot.dtb {
            install_boot_file(d, &dir.join(layout::DTB), &orig)?;
            record.has_dtb = true;
        }
    }
    Ok(record)
}

/// Places one kernel file next to the version: a reflink of the tree's file
/// (`src` inside `orig`), or a copy of a host file.
fn install_boot_file(src: &Path, dst: &Path, orig: &Path) -> Result<()> {
    let reflinked = fsutil::reflink_file_synced(src, dst)?;
    if src.starts_with(orig) && !reflinked {
        tracing::warn!("{} could not be reflinked: copied", src.display());
    }
    Ok(())
}

/// Creates the `/state` subvolumes a disk lacks (all of them on a first
/// deploy) as copies of the version's state directories; the version keeps
/// them in its orig as its vendor copy.
fn setup_state(top: &Layout, orig: &Path, kept: &[String]) -> Result<()> {
    let moved: Vec<&str> = layout::STATE_DIRS
        .iter()
        .copied()
        .filter(|d| !kept.iter().any(|k| k == d))
        .collect();
    if let Some((a, b)) = state::first_cross_link(orig, &moved)? {
        ui::detail(format!(
            "note: /{} and /{} are hard links to one file; state directories are separate \
             subvolumes, so /state holds a copy (the first such pair; see docs/guarantees.md)",
            a.display(),
            b.display()
        ));
    }
    let mut announced = false;
    for d in layout::STATE_DIRS {
        if kept.iter().any(|k| k == d) {
            continue;
        }
        let in_version = orig.join(d);
        let state = top.state().join(d);
        match std::fs::symlink_metadata(&in_version) {
            Ok(m) if m.file_type().is_symlink() => {
                bail!(
                "the rootfs's /{d} is a symlink ({}): state directories must be real directories",
                std::fs::read_link(&in_version).map(|t| t.display().to_string()).unwrap_or_default()
            )
            }
            Ok(m) if !m.is_dir() => bail!("the rootfs's /{d} is not a directory"),
            Ok(_) => {}
            Err(_) => {
                std::fs::create_dir(&in_version)
                    .with_context(|| format!("creating {}", in_version.display()))?;
                let mode = if d == "root" { 0o700 } else { 0o755 };
                std::fs::set_permissions(&in_version, std::fs::Permissions::from_mode(mode))?;
            }
        }
        if btrfs::is_subvolume(&state) {
            // An upgrade: the version keeps its vendor copy in orig; /state
            // follows it when it becomes the default (tree::statemerge).
            continue;
        }
        if !announced {
            ui::step("Copying the state directories to /state");
            announced = true;
        }
        btrfs::create_subvolume(&state)?;
        copy_dir_metadata(&in_version, &state)?;
        // The vendor copy stays in orig (reflinks: it costs no data).
        copy::copy_tree(
            &in_version,
            &state,
            &CopyOptions {
                threads: 0,
                progress: None,
            },
        )
        .with_context(|| format!("copying /{d} to /state/{d}"))?;
    }
    Ok(())
}

fn copy_dir_metadata(src: &Path, dst: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(src)?;
    std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid()))
        .with_context(|| format!("setting owner of {}", dst.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))
        .with_context(|| format!("setting mode of {}", dst.display()))?;
    Ok(())
}

/// Publishes the finished version and, when asked (or when it is the
/// first), makes it the default: the order is `lifecycle`'s.
fn publish_version(
    plan: &Plan,
    disk: &Disk,
    dir: &Path,
    fs_uuid: &str,
    make_default: bool,
) -> Result<()> {
    let top = &disk.layout;
    let boot = disk.boot();
    let first = std::fs::symlink_metadata(top.default_link()).is_err();
    lifecycle::publish(top, &boot, dir, &plan.label, fs_uuid)?;
    if make_default || first {
        ui::step(format!("Switching the default to {}", plan.label));
        lifecycle::switch(top, &boot, &plan.label, fs_uuid)?;
    }
    Ok(())
}

/// Checks that the boot files written to the version directory `dir` fit on
/// the disk's boot partition, before anything is written there.
fn check_boot_space(disk: &Disk, label: &str, dir: &Path) -> Result<()> {
    let files: Vec<PathBuf> = [layout::KERNEL, layout::INITRAMFS]
        .iter()
        .map(|f| dir.join(f))
        .take_while(|p| p.exists())
        .collect();
    if files.is_empty() {
        return Ok(());
    }
    disk.boot().check_space_for(label, &files)
}
