//! The subcommands that manage versions on an existing disk: list,
//! set-default, remove, cleanup.

use crate::app::target::{open_checked, with_disk};
use crate::disk::open::{self, TargetKind};
use crate::store::btrfs;
use crate::store::layout::{self, Layout};
use crate::store::lifecycle;
use crate::store::versions;
use crate::util::ui;
use crate::util::units;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;

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
    /// CPU architecture of its rootfs (`amd64`, `arm64`, ...); absent for
    /// versions deployed before it was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// How its root is mounted: `rw`, `ro` or `volatile`.
    pub root_mode: crate::store::rootmode::RootMode,
    /// The version it was upgraded from.
    pub upgraded_from: Option<String>,
    /// Unresolved /etc conflicts recorded at deploy time.
    pub etc_conflicts: usize,
    /// Whether the running system is this version (`deploy list` on the device).
    pub running: bool,
    /// The state of its last trial (`armed`, `booted`, `good`, `failed`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trial: Option<crate::store::trial::State>,
    /// How the disk boots: bios, uefi or hybrid (the same in every row).
    pub boot: crate::boot::BootKind,
    /// With `--sizes`: bytes of data the version references (orig, run,
    /// kernel files; each extent counted once, also when other versions
    /// share it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// What `deploy list --json` prints (with `"format"`).
#[derive(Debug, Serialize)]
pub struct ListReport {
    /// The target as given.
    pub target: String,
    /// The versions, oldest first.
    pub versions: Vec<ListEntry>,
}

/// `deploy list`.
pub fn list(target: &Path, json: bool, sizes: bool) -> Result<()> {
    let (kind, rows) = with_disk(target, true, |disk| {
        let default = versions::default_label(&disk.layout)?;
        let kind = disk.disk_layout.boot;
        let running = crate::app::target::running_system()
            .filter(|_| crate::app::target::is_running_disk(disk, target))
            .map(|(_, l)| l);
        versions::list(&disk.layout)?
            .into_iter()
            .map(|v| ListEntry {
                running: running.as_deref() == Some(v.label.as_str()),
                trial: crate::store::trial::load(&disk.layout, &v.label)
                    .ok()
                    .flatten()
                    .map(|t| t.state),
                default: v.label == default,
                created: v.deployment.created.clone(),
                kernel_version: v.deployment.kernel_version.clone(),
                arch: v.deployment.arch.clone(),
                root_mode: v.deployment.root_mode,
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
        crate::util::json::print(&ListReport {
            target: target.display().to_string(),
            versions: rows,
        })?;
    } else {
        let size_head = if sizes {
            format!("{:<12}", "SIZE")
        } else {
            String::new()
        };
        outln!("Disk: {}", kind.describe());
        outln!(
            "{:<3}{:<24}{:<22}{:<28}{:<9}{:<10}{size_head}FROM",
            "",
            "VERSION",
            "CREATED",
            "KERNEL",
            "ARCH",
            "ROOT"
        );
        for r in rows {
            let size_cols = r
                .size_bytes
                .map(|b| format!("{:<12}", units::format_size(b)))
                .unwrap_or_default();
            let mut label = r.label.clone();
            if r.running {
                label.push_str(" (running)");
            }
            match r.trial {
                Some(crate::store::trial::State::Failed) => label.push_str(" (failed trial)"),
                Some(s) if !s.ended() => label.push_str(" (on trial)"),
                _ => {}
            }
            outln!(
                "{:<3}{:<24}{:<22}{:<28}{:<9}{:<10}{size_cols}{}",
                if r.default { "*" } else { "" },
                label,
                r.created,
                r.kernel_version.as_deref().unwrap_or("-"),
                r.arch.as_deref().unwrap_or("-"),
                r.root_mode.name(),
                r.upgraded_from.as_deref().unwrap_or("-")
            );
        }
        if sizes {
            outln!("(SIZE: data the version references; versions share unchanged files, so sizes do not add up)");
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

/// `deploy set-default`: the rollback, one atomic rename of `systems/default`.
pub fn set_default(label: &str, target: &Path) -> Result<()> {
    with_disk(target, false, |disk| {
        let top = &disk.layout;
        require_version(top, label, target)?;
        lifecycle::switch(top, &disk.boot(), label, &disk.fs_uuid()?)?;
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
        lifecycle::remove(top, &disk.boot(), label, &disk.fs_uuid()?)?;
        ui::step(format!("Removed {label} from {}", target.display()));
        Ok(())
    })
}

/// `deploy cleanup`: removes `TARGET.partial` and what interrupted deploys
/// and removes left on the disk.
pub fn cleanup(target: &Path) -> Result<()> {
    let partial = layout::image_partial(target);
    if crate::disk::partial::remove_leftover(&partial)? {
        ui::step(format!("Removed {}", partial.display()));
    }
    if target.exists() {
        with_disk(target, false, |disk| {
            let removed = lifecycle::cleanup(&disk.layout, &disk.boot(), &disk.fs_uuid()?)?;
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

/// The smallest `boot-test --memory` accepted (MiB): below it no kernel and
/// initramfs of a real system boots, and QEMU itself refuses 0.
const MIN_GUEST_MEMORY_MIB: u32 = 64;

/// `deploy boot-test`: checks the disk (exists, holds the layout, has the
/// version), then boots it in QEMU through its own bootloader.
pub fn boot_test(args: &crate::cli::BootTestArgs) -> Result<()> {
    use crate::boottest::{self, Accel, BootTestOptions, Firmware};
    use crate::cli::{AccelArg, FirmwareArg};
    let parse =
        |what: &str, re: &str| boottest::console_pattern(what, re).map_err(crate::UsageError);
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
    if args.memory < MIN_GUEST_MEMORY_MIB {
        return Err(crate::UsageError(format!(
            "--memory {} MiB is too small to boot a Linux guest: give at least {MIN_GUEST_MEMORY_MIB} (default 512)",
            args.memory
        ))
        .into());
    }
    let kind = open::classify(&args.target)?;
    if kind == TargetKind::Missing {
        bail!("{} does not exist: nothing to boot", args.target.display());
    }
    // Hold the lock while QEMU runs, so no deploy changes the disk under it.
    let _lock = open::lock_existing(&args.target)?;
    let (boot_kind, esp, arch) = open_checked(&args.target, kind, true, |disk| {
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
        // The architecture of the version booted picks QEMU's machine.
        let arch = versions::list(top)?
            .into_iter()
            .find(|v| v.label == label)
            .and_then(|v| v.deployment.arch);
        Ok((disk.disk_layout.boot, disk.disk_layout.esp, arch))
    })?;
    let uboot = Firmware::UbootArm64;
    if boot_kind.uboot() && arch.as_deref().is_some_and(|a| a != "arm64") {
        bail!(
            "{} is a uboot disk whose system is {}: boot-test boots uboot disks of arm64 systems \
             only (qemu-system-aarch64 -M virt with Debian's U-Boot; Debian's U-Boot for QEMU's \
             x86 PC resets when it starts Debian's amd64 kernel, see docs/arm.md)",
            args.target.display(),
            arch.as_deref().unwrap_or_default()
        );
    }
    let firmware = match args.firmware {
        Some(FirmwareArg::Uboot) if !boot_kind.uboot() => bail!(
            "{} is a {boot_kind} disk: U-Boot does not boot it (new disks for U-Boot: --boot uboot)",
            args.target.display()
        ),
        Some(FirmwareArg::Bios | FirmwareArg::Uefi) if boot_kind.uboot() => bail!(
            "{} is a uboot disk: it boots through U-Boot only; use --firmware uboot (or no --firmware)",
            args.target.display()
        ),
        Some(FirmwareArg::Uboot) => uboot,
        None if boot_kind.uboot() => uboot,
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
    let (qemu, qemu_package) = firmware.qemu();
    if crate::util::cmd::which(qemu).is_none() {
        bail!("{qemu} not found: install the Debian package {qemu_package}");
    }
    if firmware.uboot_image().is_some() && args.label.is_some() {
        return Err(crate::UsageError(
            "--version picks a menu entry at the SYSLINUX prompt, which U-Boot disks do not have: \
             boot the default (deploy set-default LABEL first to boot another version)"
                .into(),
        )
        .into());
    }
    // Under UEFI, --version boots a temporary overlay of the disk whose
    // loader.conf names that version (the disk is not changed); under
    // BIOS, the label is typed at the SYSLINUX prompt.
    let overlay = match (&args.label, firmware, esp) {
        (Some(_), Firmware::Uefi, _) if args.persist => {
            return Err(crate::UsageError(
                "--persist with --version under UEFI: the version is booted from a temporary \
                 overlay of the disk, so the guest's writes could not reach it; make the version \
                 the default first (deploy set-default), or add --firmware bios (hybrid disks)"
                    .into(),
            )
            .into())
        }
        (Some(label), Firmware::Uefi, Some(esp)) => {
            let writes = crate::boot::uefi::default_switch_writes(&args.target, esp, label)?;
            Some(boottest::Overlay::new(&args.target, &writes)?)
        }
        _ => None,
    };
    let mut opts = BootTestOptions::new(&args.target, expect);
    opts.firmware = firmware;
    if let Some(o) = &overlay {
        opts.image = o.path.clone();
        opts.image_format = "qcow2";
    } else {
        opts.entry = args.label.clone();
    }
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
    opts.reboots = args.reboots;
    opts.watchdog = args.watchdog;
    opts.forward = args.forward.clone();
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
        outln!(
            "boot-test passed: /{}/ appeared after {:.1} s ({firmware}, accel {})",
            args.expect,
            outcome.elapsed.as_secs_f64(),
            outcome.accel_used
        );
        Ok(())
    } else {
        errln!("--- last console lines ---");
        for l in &outcome.tail {
            errln!("{l}");
        }
        errln!("---");
        Err(crate::Verdict {
            code: crate::EXIT_BOOT_TEST_FAILED,
            message: format!(
                "boot-test of {} failed after {:.1} s: {}",
                args.target.display(),
                outcome.elapsed.as_secs_f64(),
                outcome.reason
            ),
        }
        .into())
    }
}
