//! The plan: `DeployArgs` checked and resolved into a [`Plan`] before
//! anything is written.

use super::{NewDisk, Plan, DEFAULT_BOOT, ESP_SIZE, FS_OVERHEAD, GPTMBR, MIN_IMAGE};
use crate::boot::{uefi, BootKind};
use crate::cli::BootArg;
use crate::cli::DeployArgs;
use crate::disk::open::{self, Contents, TargetKind};
use crate::disk::partition;
use crate::store::layout;
use crate::tree::arch::{self, Arch};
use crate::tree::extensions;
use crate::tree::kernel::{self, KernelChoice};
use crate::tree::tarball;
use crate::util::cmd;
use crate::util::fsutil;
use crate::util::ui;
use crate::util::units;
use crate::UsageError;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
            crate::bundle::apply::Trust {
                keys: &args.verify_key,
                revoked: &args.revoked_key,
                insecure: args.insecure_no_verify,
                manifest_sha256: args.expect_manifest_sha256.as_deref(),
            },
            args.allow_downgrade,
            crate::bundle::http::HttpOptions {
                timeout: std::time::Duration::from_secs(args.http_timeout.max(1)),
                retries: args.http_retries,
            },
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
    // An SD-card image (Raspberry Pi OS): its root partition, mounted
    // read-only, is the tree; its FAT's files join it as /boot/firmware.
    let source_image = match bundle {
        Some(_) => None,
        None => match crate::tree::sdimage::probe(&rootfs_arg) {
            Some(layout) => {
                require_root()?;
                crate::disk::mount::enter_private_namespace()?;
                Some(std::sync::Arc::new(crate::tree::sdimage::open(
                    &rootfs_arg,
                    layout,
                )?))
            }
            None => None,
        },
    };
    let rootfs = match (&bundle, &source_image) {
        (Some(_), _) => rootfs_arg.clone(),
        (None, Some(img)) => img.root().to_path_buf(),
        (None, None) => check_rootfs(&rootfs_arg)?,
    };
    check_target_outside(&target, &rootfs)?;
    require_root()?;
    cmd::require(&[&cmd::MKFS_BTRFS, &cmd::BLKID])?;
    let boot_arg = args.boot.map(|b| match b {
        BootArg::Bios => BootKind::Bios,
        BootArg::Uefi => BootKind::Uefi,
        BootArg::Hybrid => BootKind::Hybrid,
        BootArg::Uboot | BootArg::Rpi => BootKind::Uboot,
    });
    let rpi = args.boot == Some(BootArg::Rpi);
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
        if rpi {
            bail!(
                "--boot rpi applies to new disks only: it writes the Raspberry Pi firmware when the \
                 disk is made, and {} exists (upgrades keep the firmware it has; drop --boot)",
                target.display()
            );
        }
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
            let dev_size = crate::disk::open::block_device_size(&target)?;
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
        if rpi {
            if let Some(a) = arch.filter(|a| *a != Arch::Arm64) {
                bail!(
                    "--boot rpi is for arm64 trees (64-bit Raspberry Pi 3 and 4), and {} is {}",
                    rootfs.display(),
                    a.name()
                );
            }
            if args.no_bootloader {
                return Err(UsageError(
                    "--boot rpi writes the boot files a Pi needs; --no-bootloader writes none: \
                     drop one"
                        .into(),
                )
                .into());
            }
            if !tarball && bundle.is_none() && source_image.is_none() {
                // Refused before anything is written; an archive's tree is
                // read once it is written (the partial image is removed).
                crate::boot::rpi::find(&rootfs, None)?;
            }
        }
        Some(NewDisk {
            size,
            fs_uuid: uuid::Uuid::new_v4().to_string(),
            boot: boot_kind,
            rpi,
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
        source_image,
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
