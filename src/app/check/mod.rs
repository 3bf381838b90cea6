//! `deploy check TARGET`: verifies the layout invariants of a disk (design §1)
//! and reports every problem it finds, one line per check (or JSON).
//!
//! The target is opened read-only (read-only loop device, read-only mount),
//! locked like every other command, and inspected:
//! - `systems/default` is a relative symlink to a complete version;
//! - each version has `orig` (read-only subvolume), `run` (writable
//!   subvolume), a `deployment.json` naming it, and the boot files it records;
//! - each version's `run/etc/fstab` mounts `/` and every state directory;
//! - the `/state` subvolumes the versions use exist;
//! - each version's root mode holds: boot entries, fstab, `run/etc`, the
//!   volatile script;
//! - `extlinux.conf` has one entry per version with a kernel plus `default`,
//!   all with `root=UUID=<this filesystem>`;
//! - leftovers of interrupted deploys are reported as warnings;
//! - after unmounting (never while mounted), `btrfs check --readonly` is clean.
//!
//! The rules are pure functions over text and lists, unit-tested in `tests.rs`.

use crate::disk::open::{self, Disk, TargetKind};
use crate::store::btrfs;
use crate::store::layout;
use anyhow::{bail, Result};
use std::path::Path;

mod boot_partition;
mod bootloader;
mod btrfs_check;
mod fstab;
mod report;
mod root_mode;
mod state;
mod systems;
#[cfg(test)]
mod tests;
mod version;
use boot_partition::{check_esp, check_uboot};
use bootloader::check_bootloader;
use btrfs_check::btrfs_check;
pub use report::{Finding, Report, Status};
use root_mode::{check_root_modes, PartitionMenu};
use state::check_state;
use systems::{check_default, scan_systems};
use version::{check_version, VersionInfo};

/// Checks `target` and prints a report; a [`crate::Verdict`] (exit 3) when
/// anything is wrong, an error (exit 1) when the check could not run.
pub fn run(target: &Path, json: bool) -> Result<()> {
    let report = check(target)?;
    if json {
        crate::util::json::print(&report)?;
    } else {
        {
            use std::io::Write as _;
            let _ = write!(std::io::stdout().lock(), "{}", report.to_text());
        }
    }
    if !report.ok {
        let first: Vec<String> = report
            .findings
            .iter()
            .filter(|f| f.status == Status::Problem)
            .map(|f| f.name.clone())
            .collect();
        return Err(crate::Verdict {
            code: crate::EXIT_CHECK_PROBLEMS,
            message: format!(
                "{} has {} problem{} ({}){}",
                target.display(),
                report.problems,
                if report.problems == 1 { "" } else { "s" },
                first.join(", "),
                if report.warnings > 0 {
                    format!(" and {} warning(s)", report.warnings)
                } else {
                    String::new()
                }
            ),
        }
        .into());
    }
    if report.warnings > 0 {
        errln!(
            "{}: no problems, {} warning(s) (see above)",
            target.display(),
            report.warnings
        );
    }
    Ok(())
}

/// Inspects `target` (locked, mounted read-only, then unmounted for
/// `btrfs check`) and returns every finding. Errors only when the target
/// cannot be opened at all.
pub fn check(target: &Path) -> Result<Report> {
    let kind = open::classify(target)?;
    if kind == TargetKind::Missing {
        bail!("{} does not exist", target.display());
    }
    let _lock = open::lock_existing(target)?;
    open::ensure_not_in_use(target, kind)?;
    open::require_btrfs(target)?;
    let mut findings = Vec::new();
    match Disk::open(target, kind, true) {
        Ok(disk) => {
            let inspected = inspect(&disk);
            // Unmount and detach before `btrfs check`: it must not run while mounted.
            disk.close()?;
            findings.extend(inspected?);
        }
        // A filesystem that does not mount is a finding; `btrfs check` says more.
        Err(e) => findings.push(Finding::problem("mount", format!("{e:#}"))),
    }
    if kind == TargetKind::File {
        let partial = layout::image_partial(target);
        if std::fs::symlink_metadata(&partial).is_ok() {
            findings.push(Finding::warning(
                "leftovers",
                format!(
                    "{} is left by an interrupted deploy: run deploy cleanup",
                    partial.display()
                ),
            ));
        }
    }
    if open::is_mounted(target)? {
        findings.push(Finding::warning(
            "btrfs check",
            format!(
                "skipped: {} is mounted, and `btrfs check` must not run on a mounted filesystem",
                target.display()
            ),
        ));
    } else {
        findings.push(btrfs_check(target));
    }
    Ok(Report::new(target, findings))
}

/// Everything that is checked on the mounted filesystem.
fn inspect(disk: &Disk) -> Result<Vec<Finding>> {
    let top = &disk.layout;
    let mut out = Vec::new();
    if !top.systems().is_dir() {
        out.push(Finding::problem(
            "layout",
            "no systems/ directory: this Btrfs does not hold the btrfs-deploy layout",
        ));
        return Ok(out);
    }
    let fs_uuid = disk.fs_uuid()?;
    let scan = scan_systems(&top.systems())?;
    for name in &scan.leftovers {
        out.push(Finding::warning(
            "leftovers",
            format!("systems/{name} is left by an interrupted deploy: run deploy cleanup"),
        ));
    }
    let conf_tmp = top.extlinux_dir().join(".extlinux.conf.tmp");
    if std::fs::symlink_metadata(&conf_tmp).is_ok() {
        out.push(Finding::warning(
            "leftovers",
            "extlinux/.extlinux.conf.tmp is left by an interrupted deploy: run deploy cleanup",
        ));
    }
    for name in &scan.unexpected {
        out.push(Finding::problem(
            "layout",
            format!("systems/{name} is not a version directory"),
        ));
    }
    let state_subvols: Vec<String> = layout::STATE_DIRS
        .iter()
        .filter(|d| btrfs::is_subvolume(&top.state().join(d)))
        .map(|d| d.to_string())
        .collect();
    let mut versions = Vec::new();
    for label in &scan.versions {
        let (findings, record) = check_version(top, label, &fs_uuid, &state_subvols);
        let complete = findings.iter().all(|f| f.status != Status::Problem);
        out.extend(findings);
        versions.push(VersionInfo {
            label: label.clone(),
            complete,
            record,
        });
    }
    out.insert(0, check_default(top, &versions));
    out.insert(0, Finding::ok("disk", disk.disk_layout.boot.describe()));
    out.push(check_state(&versions, &state_subvols));
    if top.state().join(crate::tree::statemerge::JOURNAL).exists() {
        out.push(Finding::warning(
            "state merge",
            "/state/.deploy-merge: a /state merge was interrupted; deploy cleanup (or the next \
             deploy or set-default) finishes or undoes it",
        ));
    }
    out.extend(check_bootloader(
        top,
        &versions,
        &fs_uuid,
        disk.disk_layout.boot.bios(),
    ));
    // The kernel arguments of the boot partition's entries, for the root modes.
    let mut partition_args = None;
    if let Some(esp) = disk.disk_layout.esp {
        let (finding, args) = if disk.disk_layout.boot.uboot() {
            (check_uboot(disk, esp, &versions), PartitionMenu::UBoot)
        } else {
            (check_esp(disk, esp, &versions), PartitionMenu::Esp)
        };
        out.push(finding.0);
        partition_args = Some((args, finding.1));
    }
    out.extend(check_root_modes(
        top,
        &versions,
        &fs_uuid,
        partition_args.as_ref().map(|(m, a)| (*m, a.as_slice())),
    ));
    Ok(out)
}
