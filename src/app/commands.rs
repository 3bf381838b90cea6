//! The subcommands that manage versions on an existing disk: list,
//! set-default, remove, cleanup.

use crate::store::btrfs;
use crate::store::layout::{self, Layout};
use crate::store::versions;
use crate::target::disk::{self, Disk, TargetKind};
use crate::util::ui;
use crate::util::units;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// Opens an existing target holding the layout, locked, and runs `f` on it.
pub fn with_disk<T>(
    target: &Path,
    read_only: bool,
    f: impl FnOnce(&Disk) -> Result<T>,
) -> Result<T> {
    let kind = disk::classify(target)?;
    if kind == TargetKind::Missing {
        bail!("{} does not exist", target.display());
    }
    let lock = disk::lock_existing(target)?;
    let result = open_checked(target, kind, read_only, f);
    drop(lock);
    result
}

/// One row of `deploy list`.
#[derive(Debug, Serialize)]
pub struct ListEntry {
    /// Label.
    pub label: String,
    /// Whether it is the default.
    pub default: bool,
    /// When it was deployed.
    pub created: String,
    /// Kernel version, if known.
    pub kernel_version: Option<String>,
    /// The version it was upgraded from.
    pub upgraded_from: Option<String>,
    /// Unresolved /etc conflicts recorded at deploy time.
    pub etc_conflicts: usize,
    /// How the disk boots: bios, uefi or hybrid (the same in every row).
    pub boot: crate::boot::BootKind,
    /// With `--sizes`: bytes of data the version references (orig, run,
    /// kernel files; each extent counted once, also when other versions
    /// share it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// `deploy list`.
pub fn list(target: &Path, json: bool, sizes: bool) -> Result<()> {
    let (kind, rows) = with_disk(target, true, |disk| {
        let default = versions::default_label(&disk.layout)?;
        let kind = disk.disk_layout.boot;
        versions::list(&disk.layout)?
            .into_iter()
            .map(|v| ListEntry {
                default: v.label == default,
                created: v.deployment.created.clone(),
                kernel_version: v.deployment.kernel_version.clone(),
                upgraded_from: v.deployment.upgraded_from.clone(),
                etc_conflicts: v
                    .deployment
                    .details
                    .get("etc_merge")
                    .and_then(|m| m.get("conflicts"))
                    .and_then(|c| c.as_array())
                    .map(|a| a.len())
                    .unwrap_or(0),
                size_bytes: None,
                boot: kind,
                label: v.label,
            })
            .map(|mut row| {
                if sizes {
                    row.size_bytes =
                        Some(btrfs::referenced_bytes(&disk.layout.version(&row.label))?);
                }
                Ok(row)
            })
            .collect::<Result<Vec<_>>>()
            .map(|rows| (kind, rows))
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let size_head = if sizes {
            format!("{:<12}", "SIZE")
        } else {
            String::new()
        };
        println!("Disk: {}", kind.describe());
        println!(
            "{:<3}{:<24}{:<22}{:<28}{size_head}FROM",
            "", "VERSION", "CREATED", "KERNEL"
        );
        for r in rows {
            let size_cols = r
                .size_bytes
                .map(|b| format!("{:<12}", units::format_size(b)))
                .unwrap_or_default();
            println!(
                "{:<3}{:<24}{:<22}{:<28}{size_cols}{}",
                if r.default { "*" } else { "" },
                r.label,
                r.created,
                r.kernel_version.as_deref().unwrap_or("-"),
                r.upgraded_from.as_deref().unwrap_or("-")
            );
        }
        if sizes {
            println!("(SIZE: data the version references; versions share unchanged files, so sizes do not add up)");
        }
    }
    Ok(())
}

fn require_version(top: &Layout, label: &str, target: &Path) -> Result<()> {
    units::validate_label(label)?;
    if !top.version(label).join(layout::DEPLOYMENT_JSON).is_file() {
        let known: Vec<String> = versions::list(top)?.into_iter().map(|v| v.label).collect();
        bail!(
            "no version {label} on {}: it has {}",
            target.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    Ok(())
}

/// `deploy set-default`: the rollback. Writes the boot config (so the menu
/// marks the new default), then one atomic rename of `systems/default`.
pub fn set_default(label: &str, target: &Path) -> Result<()> {
    with_disk(target, false, |disk| {
        let top = &disk.layout;
        require_version(top, label, target)?;
        let fs_uuid = disk.fs_uuid()?;
        let boot = disk.boot();
        let has_menu = versions::write_boot_config(&boot, top, &fs_uuid, label)?;
        if has_menu {
            btrfs::sync_fs(&top.top)?;
        }
        versions::switch_default(top, Path::new(label).to_str().unwrap_or(label))?;
        btrfs::sync_fs(&top.top)?;
        if has_menu {
            boot.switch_default(label)?;
        }
        ui::step(format!(
            "{label} is now the default on {}",
            target.display()
        ));
        Ok(())
    })
}

/// `deploy remove`.
pub fn remove(label: &str, target: &Path) -> Result<()> {
    with_disk(target, false, |disk| {
        let top = &disk.layout;
        require_version(top, label, target)?;
        remove_version(disk, label)?;
        ui::step(format!("Removed {label} from {}", target.display()));
        Ok(())
    })
}

/// Removes version `label` (never the default): first from the boot menus,
/// then its files on the boot partition, then its subvolumes and files.
pub fn remove_version(disk: &Disk, label: &str) -> Result<()> {
    let top = &disk.layout;
    let fs_uuid = &disk.fs_uuid()?;
    let boot = disk.boot();
    let default = versions::default_label(top)?;
    if label == default {
        bail!("{label} is the default version: make another one the default first (deploy set-default LABEL TARGET)");
    }
    // Hide it from the boot config before deleting anything it refers to.
    let dir = top.version(label);
    let hidden = top.systems().join(format!(".{label}.removing"));
    std::fs::rename(&dir, &hidden).with_context(|| format!("renaming {}", dir.display()))?;
    if top.extlinux_conf().exists() {
        versions::write_boot_config(&boot, top, fs_uuid, &default)?;
    }
    btrfs::sync_fs(&top.top)?;
    boot.remove_version(label)?;
    btrfs::remove_version_dir(&hidden)?;
    Ok(())
}

/// `deploy cleanup`: removes `TARGET.partial` and half-written versions.
pub fn cleanup(target: &Path) -> Result<()> {
    let partial = layout::image_partial(target);
    if partial.exists() {
        let f = std::fs::File::open(&partial)?;
        let lock = crate::target::lock::TargetLock::acquire(f, &partial)?;
        std::fs::remove_file(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
        drop(lock);
        ui::step(format!("Removed {}", partial.display()));
    }
    if target.exists() {
        with_disk(target, false, |disk| {
            let removed = crate::app::deploy::cleanup_partial_versions(&disk.layout)?;
            for name in std::fs::read_dir(disk.layout.systems())? {
                let name = name?;
                let n = name.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') && n.ends_with(".removing") {
                    btrfs::remove_version_dir(&name.path())?;
                }
            }
            // Temp files of an interrupted atomic replace.
            let top = &disk.layout;
            for tmp in [
                top.systems().join(".default.tmp"),
                top.extlinux_dir().join(".extlinux.conf.tmp"),
            ] {
                if std::fs::symlink_metadata(&tmp).is_ok() {
                    std::fs::remove_file(&tmp)
                        .with_context(|| format!("removing {}", tmp.display()))?;
                }
            }
            // A kill between publishing a version and rewriting the menu
            // leaves the menu without it: rewrite it from the disk.
            // The boot partition: files of versions that are gone or were
            // being written, then the menus and the default from the disk.
            let boot = disk.boot();
            let labels: Vec<String> = versions::list(top)?.into_iter().map(|v| v.label).collect();
            for p in boot.cleanup(&labels)? {
                ui::step(format!("EFI system partition: {p}"));
            }
            if top.extlinux_conf().exists() {
                let default = versions::default_label(top)?;
                versions::write_boot_config(&boot, top, &disk.fs_uuid()?, &default)?;
                btrfs::sync_fs(&top.top)?;
                boot.switch_default(&default)?;
            }
            if removed.is_empty() {
                ui::step(format!("{} has no leftovers", target.display()));
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Kernel messages that mean the root filesystem could not be mounted.
const ROOT_MOUNT_FAILURES: &[&str] = &[r"VFS: Unable to mount root fs", r"Cannot open root device"];

/// `deploy boot-test`: checks the disk (exists, holds the layout, has the
/// version), then boots it in QEMU through its own bootloader.
pub fn boot_test(args: &crate::cli::BootTestArgs) -> Result<()> {
    use crate::boottest::{self, Accel, BootTestOptions, Firmware};
    use crate::cli::{AccelArg, FirmwareArg};
    let parse = |what: &str, re: &str| {
        regex::Regex::new(re).map_err(|e| {
            crate::UsageError(format!("invalid {what} regular expression {re:?}: {e}"))
        })
    };
    let expect = parse("--expect", &args.expect)?;
    let mut extra_fail = Vec::new();
    for re in args
        .fail_on
        .iter()
        .map(String::as_str)
        .chain(ROOT_MOUNT_FAILURES.iter().copied())
    {
        extra_fail.push(parse("--fail-on", re)?);
    }
    if args.timeout == 0 {
        return Err(crate::UsageError("--timeout must be at least 1 second".into()).into());
    }
    if crate::util::cmd::which(boottest::QEMU_BINARY).is_none() {
        bail!(
            "{} not found: install the Debian package {}",
            boottest::QEMU_BINARY,
            boottest::QEMU_PACKAGE
        );
    }
    let kind = disk::classify(&args.target)?;
    if kind == TargetKind::Missing {
        bail!("{} does not exist: nothing to boot", args.target.display());
    }
    // Hold the lock while QEMU runs, so no deploy changes the disk under it.
    let _lock = disk::lock_existing(&args.target)?;
    let boot_kind = open_checked(&args.target, kind, true, |disk| {
        let top = &disk.layout;
        let default = versions::default_label(top)?;
        let label = args.label.as_deref().unwrap_or(&default);
        require_version(top, label, &args.target)?;
        if !top.extlinux_conf().exists() {
            bail!(
                "{} has no bootloader (deployed with --no-bootloader?): nothing to boot",
                args.target.display()
            );
        }
        Ok(disk.disk_layout.boot)
    })?;
    let firmware = match args.firmware {
        Some(FirmwareArg::Bios) if !boot_kind.bios() => bail!(
            "{} is a {boot_kind} disk: it does not boot under BIOS; use --firmware uefi",
            args.target.display()
        ),
        Some(FirmwareArg::Uefi) if !boot_kind.uefi() => bail!(
            "{} is a {boot_kind} disk: it does not boot under UEFI; use --firmware bios \
             (new disks boot under both with --boot hybrid)",
            args.target.display()
        ),
        Some(FirmwareArg::Bios) => Firmware::Bios,
        Some(FirmwareArg::Uefi) => Firmware::Uefi,
        None if boot_kind.uefi() => Firmware::Uefi,
        None => Firmware::Bios,
    };
    if firmware == Firmware::Uefi && args.label.is_some() {
        return Err(crate::UsageError(
            "--version picks a menu entry at the SYSLINUX prompt, which only the BIOS path has: \
             add --firmware bios (on a hybrid disk), or boot the default under UEFI"
                .into(),
        )
        .into());
    }
    let mut opts = BootTestOptions::new(&args.target, expect);
    opts.firmware = firmware;
    opts.entry = args.label.clone();
    opts.timeout = std::time::Duration::from_secs(args.timeout);
    opts.accel = match args.accel {
        AccelArg::Auto => Accel::Auto,
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
    };
    opts.persist = args.persist;
    opts.memory_mib = args.memory;
    opts.log = args.log.clone();
    opts.extra_fail = extra_fail;
    ui::step(format!(
        "Booting {}{} in QEMU ({firmware}, accel {}, timeout {} s), waiting for /{}/",
        args.target.display(),
        args.label
            .as_ref()
            .map(|l| format!(" version {l}"))
            .unwrap_or_default(),
        opts.accel,
        args.timeout,
        args.expect
    ));
    let outcome = boottest::run(&opts)?;
    if outcome.passed {
        println!(
            "boot-test passed: /{}/ appeared after {:.1} s ({firmware}, accel {})",
            args.expect,
            outcome.elapsed.as_secs_f64(),
            outcome.accel_used
        );
        Ok(())
    } else {
        eprintln!("--- last console lines ---");
        for l in &outcome.tail {
            eprintln!("{l}");
        }
        eprintln!("---");
        bail!(
            "boot-test of {} failed after {:.1} s: {}",
            args.target.display(),
            outcome.elapsed.as_secs_f64(),
            outcome.reason
        )
    }
}

/// Opens a target whose lock the caller holds, checks it holds the layout,
/// runs `f`, and closes it (reporting close errors on success).
fn open_checked<T>(
    target: &Path,
    kind: TargetKind,
    read_only: bool,
    f: impl FnOnce(&Disk) -> Result<T>,
) -> Result<T> {
    disk::ensure_not_in_use(target, kind)?;
    disk::require_btrfs(target)?;
    let disk = Disk::open(target, kind, read_only)?;
    if !disk.layout.exists() {
        drop(disk);
        bail!(
            "{} holds a Btrfs without the btrfs-deploy layout (no systems/default)",
            target.display()
        );
    }
    disk.run(f)
}
