//! One deploy, from plan to switch (design §2):
//!
//! plan (validate everything, touch nothing) → open target (lock) → attach →
//! mount top level in a private namespace → write systems/.<L>.partial/orig →
//! configure extensions → fstab → state → orig read-only → run snapshot →
//! kernel files → rename .partial to <L> → sync → bootloader config → switch
//! systems/default → sync → unmount, detach (→ rename image.partial to image).

use crate::boot::{extlinux, uefi, BootKind};
use crate::build::copy::{self, CopyOptions, SyncOptions};
use crate::build::extensions::{self, Extension};
use crate::build::fstab;
use crate::build::kernel::{self, BootFiles, KernelChoice};
use crate::build::state;
use crate::build::tarball;
use crate::cli::BootArg;
use crate::cli::DeployArgs;
use crate::store::btrfs;
use crate::store::deployment::{self, Deployment};
use crate::store::layout::{self, Layout};
use crate::store::versions;
use crate::target::disk::{self, Contents, Disk, TargetKind};
use crate::target::lock::TargetLock;
use crate::target::partition::{self, PartSpec};
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
/// How a new disk boots when `--boot` is not given.
pub const DEFAULT_BOOT: BootKind = BootKind::Bios;

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
    /// Kernel files found in a rootfs directory at planning time.
    pub boot: Option<BootFiles>,
    /// Whether the rootfs is an archive (its kernel is found once extracted).
    pub tarball: bool,
    /// Deploy without kernel and bootloader.
    pub no_bootloader: bool,
    /// Explicit kernel files, if any.
    pub kernel_choice: KernelChoice,
    /// Kernel arguments after root=...
    pub kernel_args: String,
    /// Leave the default as it is.
    pub no_default: bool,
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
    if let Some(keep) = args.keep {
        if keep == 0 {
            return Err(UsageError(
                "--keep must be at least 1 (the default version is always kept)".into(),
            )
            .into());
        }
    }
    let rootfs = check_rootfs(&rootfs_arg)?;
    require_root()?;
    cmd::require(&[&cmd::MKFS_BTRFS, &cmd::BLKID])?;
    if !args.no_bootloader {
        cmd::require(&[&cmd::EXTLINUX])?;
    }
    let boot_arg = args.boot.map(|b| match b {
        BootArg::Bios => BootKind::Bios,
        BootArg::Uefi => BootKind::Uefi,
        BootArg::Hybrid => BootKind::Hybrid,
    });
    let tarball = rootfs.is_file();
    let kernel_choice = KernelChoice {
        kernel: args.kernel.clone(),
        initramfs: args.initramfs.clone(),
        dtb: args.dtb.clone(),
    };
    let boot = if args.no_bootloader || tarball {
        None
    } else {
        Some(kernel::find_boot_files(&rootfs, &kernel_choice)?)
    };

    let kind = disk::classify(&target)?;
    if kind == TargetKind::File || kind == TargetKind::BlockDevice {
        // A running deploy holds the lock and has the image attached: name
        // it, rather than suggest detaching its loop device.
        drop(disk::lock_existing(&target)?);
        disk::ensure_not_in_use(&target, kind)?;
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
            match disk::probe(&target)? {
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
        TargetKind::BlockDevice => match disk::probe(&target)? {
            Contents::Blank => true,
            _ if args.wipe => true,
            Contents::Btrfs(_) => false,
            Contents::Other(what) => bail!(
                "{} holds {what}: pass --wipe to erase it and deploy",
                target.display()
            ),
        },
    };
    let boot_kind = if is_new {
        boot_arg.unwrap_or(DEFAULT_BOOT)
    } else {
        let existing = disk::require_btrfs(&target)?.boot;
        if let Some(b) = boot_arg.filter(|b| *b != existing) {
            bail!(
                "--boot {b} applies to new disks only; {} is a {existing} disk and keeps its layout \
                 (deploy to a new image, or to a device with --wipe, to change it)",
                target.display()
            );
        }
        existing
    };
    if is_new && boot_kind.partitioned() {
        cmd::require(&[&partition::SFDISK, &crate::boot::fat::MTOOLS])?;
        if !args.no_bootloader {
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
    let rootfs_bytes = if tarball {
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
                    bail!(
                        "--size {} is too small for the rootfs {} ({} used): give at least {}",
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
                     (the EFI system partition takes {})",
                    target.display(),
                    units::format_size(dev_size),
                    units::format_size((MIN_IMAGE + extra).max(needed)),
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
    };
    if !exts.is_empty() {
        let names: Vec<&str> = exts.iter().map(|e| e.name.as_str()).collect();
        ui::step(format!("Checking extensions: {}", names.join(", ")));
        extensions::run_checks(&exts, &ext_context)?;
    }
    Ok(Plan {
        label,
        rootfs,
        target,
        kind,
        new_disk,
        boot,
        tarball,
        no_bootloader: args.no_bootloader,
        kernel_choice,
        kernel_args: args
            .kernel_args
            .clone()
            .unwrap_or_else(|| extlinux::DEFAULT_KERNEL_ARGS.into()),
        no_default: args.no_default,
        keep: args.keep,
        checksum: args.checksum,
        rootfs_bytes,
        extensions: exts,
        ext_context,
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
    let mut entries =
        std::fs::read_dir(&canon).with_context(|| format!("reading rootfs {}", canon.display()))?;
    if entries.next().is_none() {
        bail!("rootfs {} is empty", canon.display());
    }
    Ok(canon)
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

/// Runs a planned deploy.
pub fn execute(plan: &Plan) -> Result<()> {
    match &plan.new_disk {
        Some(new) => deploy_new(plan, new),
        None => deploy_upgrade(plan),
    }
}

/// First deploy: everything is built on `<target>.partial` (or on the block
/// device) and the image appears at the target only once complete.
fn deploy_new(plan: &Plan, new: &NewDisk) -> Result<()> {
    let (work_path, lock, partial) = match plan.kind {
        TargetKind::BlockDevice => (
            plan.target.clone(),
            disk::lock_existing(&plan.target)?,
            None,
        ),
        _ => {
            let partial = layout::image_partial(&plan.target);
            let (lock, file) = create_partial_image(&partial, new.size)?;
            drop(file);
            (partial.clone(), lock, Some(partial))
        }
    };
    let partitions = if new.boot.partitioned() {
        format!(
            " ({} disk: GPT, {} EFI system partition, Btrfs partition)",
            new.boot,
            units::format_size(ESP_SIZE)
        )
    } else {
        String::new()
    };
    ui::step(format!(
        "Creating a {} Btrfs{partitions} for {} (version {})",
        units::format_size(new.size),
        plan.target.display(),
        plan.label
    ));
    let result = (|| -> Result<()> {
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
                crate::target::loopdev::LoopGuard::attach_range(&work_path, Some(range), false)?;
            btrfs::mkfs(dev.path(), &new.fs_uuid, FS_LABEL)?;
            dev.close()?;
        } else {
            btrfs::mkfs(&work_path, &new.fs_uuid, FS_LABEL)?;
        }
        let kind = if plan.kind == TargetKind::BlockDevice {
            TargetKind::BlockDevice
        } else {
            TargetKind::File
        };
        Disk::open(&work_path, kind, false)?
            .run(|disk| build_first_version(plan, disk, &new.fs_uuid))?;
        // Until the image is renamed into place, an interruption discards it.
        signals::check()
    })();
    let result = result.and_then(|()| match &partial {
        Some(partial) => move_image_into_place(partial, &plan.target),
        None => Ok(()),
    });
    if result.is_err() {
        if let Some(partial) = &partial {
            let _ = std::fs::remove_file(partial);
        }
    }
    drop(lock);
    result?;
    ui::step(format!(
        "Deployed {} to {}",
        plan.label,
        plan.target.display()
    ));
    Ok(())
}

/// Writes the GPT of a new `uefi`/`hybrid` disk (EFI system partition, then
/// the Btrfs partition over the rest), SYSLINUX's GPT boot code for
/// `hybrid`, and formats the ESP. Returns the Btrfs partition's byte range.
fn partition_new_disk(disk: &Path, kind: BootKind) -> Result<(u64, u64)> {
    partition::write_gpt(
        disk,
        &[
            PartSpec {
                size: Some(ESP_SIZE),
                type_guid: partition::TYPE_ESP,
                name: "EFI system partition",
                legacy_boot: false,
            },
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
    crate::boot::fat::format(disk, esp.start, esp.size, ESP_LABEL)?;
    Ok((root.start, root.size))
}

/// Makes the finished image durable, then renames it onto the target —
/// without replacing anything that appeared at the target meanwhile.
fn move_image_into_place(partial: &Path, target: &Path) -> Result<()> {
    std::fs::File::open(partial)?.sync_all()?;
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

/// Creates (or takes over a stale) `<target>.partial`, locked, sized sparse.
fn create_partial_image(partial: &Path, size: u64) -> Result<(TargetLock, std::fs::File)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let lock = TargetLock::acquire(file.try_clone()?, partial)?;
    file.set_len(0)
        .with_context(|| format!("truncating {}", partial.display()))?;
    file.set_len(size)
        .with_context(|| format!("sizing {}", partial.display()))?;
    Ok((lock, file))
}

use std::os::unix::fs::OpenOptionsExt;

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

fn build_first_version(plan: &Plan, disk: &Disk, fs_uuid: &str) -> Result<()> {
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
    publish_version(plan, disk, &dir, fs_uuid, true)
}

/// Adds a version next to the existing ones (design §3). The target is
/// first inspected read-only, so a refused upgrade leaves it byte-identical.
fn deploy_upgrade(plan: &Plan) -> Result<()> {
    let kind = plan.kind;
    let _lock = disk::lock_existing(&plan.target)?;
    Disk::open(&plan.target, kind, true)?.run(|check| check_upgrade_target(plan, check))?;
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
        if let Some(b) = &plan.boot {
            let mut sizes = vec![file_size(&b.kernel)?];
            if let Some(i) = &b.initramfs {
                sizes.push(file_size(i)?);
            }
            disk.boot().check_space(&plan.label, &sizes)?;
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

fn upgrade_on(plan: &Plan, disk: &Disk) -> Result<()> {
    let top = &disk.layout;
    check_upgrade_target(plan, disk)?;
    cleanup_partial_versions(top)?;
    // Space of versions deleted earlier (or just now) must be free before writing.
    btrfs::wait_for_deletions(&top.top)?;
    let fs_uuid = disk.fs_uuid()?;
    let old = versions::default_label(top)?;
    let old_dir = top.version(&old);
    let dir = top.partial_version(&plan.label);
    let result = (|| -> Result<()> {
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let orig = dir.join(layout::ORIG);
        btrfs::snapshot(&old_dir.join(layout::ORIG), &orig, false)?;
        // An archive is first extracted next to it (same filesystem: the
        // sync then reflinks instead of copying), then synced like a directory.
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
        let managed = state_dirs_managed(top);
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
                    exclude_top: managed.iter().map(Into::into).collect(),
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
        let mut record = finish_version(plan, top, &dir, &fs_uuid, Some((&old, &source)))?;
        if plan.tarball {
            btrfs::delete_subvolume(&source)?;
        }
        record.details.insert("sync".into(), serde_json::json!({
            "unchanged": stats.unchanged, "written": stats.written, "metadata_only": stats.metadata_only,
            "deleted": stats.deleted, "bytes_written": stats.bytes_written,
        }));
        ui::step(format!(
            "Carrying local /etc changes of {old} into {}",
            plan.label
        ));
        let report = crate::build::etcmerge::merge_etc(
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
        record.save(&dir.join(layout::DEPLOYMENT_JSON))?;
        check_boot_space(disk, &plan.label, &dir)?;
        // Last point where an interruption still discards the new version.
        signals::check()
    })();
    if let Err(e) = result {
        ui::step(format!("Removing the partial version {}", plan.label));
        if let Err(ce) =
            btrfs::remove_version_dir(&dir).and_then(|()| btrfs::wait_for_deletions(&top.top))
        {
            tracing::warn!("removing partial version {}: {ce:#}", dir.display());
        }
        return Err(e);
    }
    publish_version(plan, disk, &dir, &fs_uuid, !plan.no_default)?;
    if let Some(keep) = plan.keep {
        prune(disk, keep, &old)?;
    }
    Ok(())
}

/// State dirs that have a `/state` subvolume (the others are mounted from
/// elsewhere and stay inside the version).
fn state_dirs_managed(top: &Layout) -> Vec<String> {
    layout::STATE_DIRS
        .iter()
        .filter(|d| btrfs::is_subvolume(&top.state().join(d)))
        .map(|d| d.to_string())
        .collect()
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
    if !plan.extensions.is_empty() {
        for e in &plan.extensions {
            ui::step(format!("Running extension {}", e.name));
        }
        extensions::run_configure(&plan.extensions, &orig, &plan.ext_context)?;
        signals::check()?;
    }
    ui::step("Completing etc/fstab");
    let completion = fstab::complete_file(&orig, fs_uuid)?;
    for mp in &completion.added {
        ui::detail(format!("added {mp}"));
    }
    for d in &completion.kept_state_dirs {
        ui::detail(format!(
            "/{d} is mounted by an existing fstab entry: kept inside the version"
        ));
    }
    let seed_from = upgrade.map(|(_, source)| source);
    setup_state(top, &orig, &completion.kept_state_dirs, seed_from)?;
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
        kernel_args: plan.kernel_args.clone(),
        upgraded_from: upgraded_from.map(str::to_string),
        fstab_added: completion.added.clone(),
        extensions: plan.extensions.iter().map(|e| e.name.clone()).collect(),
        settings: crate::config::redact(&plan.ext_context.settings),
        ..Default::default()
    };
    let found;
    let boot = match &plan.boot {
        Some(b) => Some(b),
        None if plan.tarball && !plan.no_bootloader => {
            found = kernel::find_boot_files(&orig, &plan.kernel_choice)?;
            Some(&found)
        }
        None => None,
    };
    if let Some(boot) = boot {
        ui::step("Installing kernel files");
        fsutil::copy_file_synced(&boot.kernel, &dir.join(layout::KERNEL))?;
        record.has_kernel = true;
        record.kernel_version = boot.version.clone();
        if let Some(i) = &boot.initramfs {
            fsutil::copy_file_synced(i, &dir.join(layout::INITRAMFS))?;
            record.has_initramfs = true;
        }
        if let Some(d) = &boot.dtb {
            fsutil::copy_file_synced(d, &dir.join(layout::DTB))?;
            record.has_dtb = true;
        }
    }
    Ok(record)
}

/// Moves (first deploy) or seeds (upgrade, from `seed_from`, the new rootfs)
/// the state directories.
fn setup_state(top: &Layout, orig: &Path, kept: &[String], seed_from: Option<&Path>) -> Result<()> {
    ui::step(if seed_from.is_some() {
        "Seeding /state with new entries"
    } else {
        "Moving state directories to /state"
    });
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
        if let (Some(rootfs), true) = (seed_from, btrfs::is_subvolume(&state)) {
            // What extensions wrote there first (their copy wins), then the rootfs's.
            for s in state::seed_missing(&in_version, &state)
                .with_context(|| format!("seeding /state/{d}"))?
            {
                ui::detail(format!("seeded /state/{d}/{s} (from an extension)"));
            }
            let src = rootfs.join(d);
            match std::fs::symlink_metadata(&src) {
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "the rootfs's /{d} is a symlink: state directories must be real directories"
                ),
                Ok(m) if m.is_dir() => {
                    let seeded = state::seed_missing(&src, &state)
                        .with_context(|| format!("seeding /state/{d}"))?;
                    for s in seeded {
                        ui::detail(format!("seeded /state/{d}/{s}"));
                    }
                }
                _ => {}
            }
            empty_dir(&in_version)?;
        } else {
            if !btrfs::is_subvolume(&state) {
                btrfs::create_subvolume(&state)?;
            }
            copy_dir_metadata(&in_version, &state)?;
            copy::move_contents(
                &in_version,
                &state,
                &CopyOptions {
                    threads: 0,
                    progress: None,
                },
            )
            .with_context(|| format!("moving /{d} to /state/{d}"))?;
        }
    }
    Ok(())
}

fn empty_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if std::fs::symlink_metadata(&p)?.is_dir() {
            copy::remove_tree(&p)?;
        } else {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
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

/// Renames `.partial` to the label, then writes the boot config and switches
/// the default. The order keeps the disk bootable at every instant:
/// 1. the version directory is complete and committed (syncfs) before
///    anything refers to it;
/// 2. extlinux.conf is replaced atomically (temp + fsync + rename + dir
///    fsync) and committed: old or new config, both boot the current default;
/// 3. the default symlink is replaced by one rename and committed: the last
///    change, and the only one that changes what boots.
fn publish_version(
    plan: &Plan,
    disk: &Disk,
    dir: &Path,
    fs_uuid: &str,
    make_default: bool,
) -> Result<()> {
    let top = &disk.layout;
    let boot = disk.boot();
    let final_dir = top.version(&plan.label);
    std::fs::rename(dir, &final_dir)
        .with_context(|| format!("renaming {} to {}", dir.display(), final_dir.display()))?;
    fsutil::fsync_dir(&top.systems())?;
    btrfs::sync_fs(&top.top)?;
    let first = std::fs::symlink_metadata(top.default_link()).is_err();
    let default_label = if make_default || first {
        plan.label.clone()
    } else {
        versions::default_label(top)?
    };
    ui::step("Writing the bootloader configuration");
    let has_menu = versions::write_boot_config(&boot, top, fs_uuid, &default_label)?;
    if has_menu {
        boot.install(top)?;
        btrfs::sync_fs(&top.top)?;
    } else {
        ui::detail("no version has a kernel: no bootloader installed");
    }
    if make_default || first {
        ui::step(format!("Switching the default to {}", plan.label));
        versions::switch_default(top, &plan.label)?;
        btrfs::sync_fs(&top.top)?;
        if has_menu {
            boot.switch_default(&plan.label)?;
        }
    }
    Ok(())
}

fn file_size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .len())
}

/// Checks that the boot files written to the version directory `dir` fit on
/// the disk's boot partition, before anything is written there.
fn check_boot_space(disk: &Disk, label: &str, dir: &Path) -> Result<()> {
    let mut sizes = Vec::new();
    for f in [layout::KERNEL, layout::INITRAMFS] {
        if let Ok(m) = std::fs::metadata(dir.join(f)) {
            sizes.push(m.len());
        }
    }
    if sizes.is_empty() {
        return Ok(());
    }
    disk.boot().check_space(label, &sizes)
}

/// Removes versions beyond `keep`, oldest first, never the default nor `previous`.
fn prune(disk: &Disk, keep: usize, previous: &str) -> Result<()> {
    let top = &disk.layout;
    let all = versions::list(top)?;
    let default = versions::default_label(top)?;
    let mut excess = all.len().saturating_sub(keep);
    for v in &all {
        if excess == 0 {
            break;
        }
        if v.label == default || v.label == previous {
            continue;
        }
        ui::step(format!("Removing old version {} (--keep {keep})", v.label));
        crate::app::commands::remove_version(disk, &v.label)?;
        excess -= 1;
    }
    Ok(())
}

/// Removes versions left half-written by an interrupted deploy.
pub fn cleanup_partial_versions(top: &Layout) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(top.systems())? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.')
            && name.ends_with(layout::PARTIAL_SUFFIX)
            && e.file_type()?.is_dir()
        {
            ui::step(format!("Removing {name}, left by an interrupted deploy"));
            btrfs::remove_version_dir(&e.path())?;
            removed.push(name);
        }
    }
    Ok(removed)
}
