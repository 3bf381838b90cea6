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
//! - `extlinux.conf` has one entry per version with a kernel plus `default`,
//!   all with `root=UUID=<this filesystem>`;
//! - leftovers of interrupted deploys are reported as warnings;
//! - after unmounting (never while mounted), `btrfs check --readonly` is clean.
//!
//! The rules are pure functions over text and lists, unit-tested below.

use crate::disk::open::{self, Disk, TargetKind};
use crate::store::btrfs;
use crate::store::deployment::Deployment;
use crate::store::layout::{self, Layout};
use crate::tree::fstab;
use crate::util::cmd;
use crate::util::rootpath;
use crate::util::units;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;

/// How many trailing lines of `btrfs check` output go into a problem.
const BTRFS_CHECK_TAIL: usize = 12;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The invariant holds.
    Ok,
    /// Not broken, but worth acting on (leftovers: run `deploy cleanup`).
    Warning,
    /// An invariant is broken.
    Problem,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked, e.g. `default`, `version v2: orig`, `btrfs check`.
    pub name: String,
    /// Its outcome.
    pub status: Status,
    /// What was found.
    pub message: String,
}

impl Finding {
    fn new(name: impl Into<String>, status: Status, message: impl Into<String>) -> Finding {
        Finding {
            name: name.into(),
            status,
            message: message.into(),
        }
    }
    fn ok(name: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding::new(name, Status::Ok, message)
    }
    fn problem(name: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding::new(name, Status::Problem, message)
    }
    fn warning(name: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding::new(name, Status::Warning, message)
    }
    /// A finding that is a problem when `problems` is non-empty, else ok.
    fn from_problems(name: &str, problems: Vec<String>, ok_message: impl Into<String>) -> Finding {
        if problems.is_empty() {
            Finding::ok(name, ok_message)
        } else {
            Finding::problem(name, problems.join("; "))
        }
    }
}

/// The whole report of `deploy check`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The target as given.
    pub target: String,
    /// True when no finding is a problem (warnings allowed).
    pub ok: bool,
    /// Number of problems.
    pub problems: usize,
    /// Number of warnings.
    pub warnings: usize,
    /// Every check, in order.
    pub findings: Vec<Finding>,
}

impl Report {
    fn new(target: &Path, findings: Vec<Finding>) -> Report {
        let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
        let problems = count(Status::Problem);
        Report {
            target: target.display().to_string(),
            ok: problems == 0,
            problems,
            warnings: count(Status::Warning),
            findings,
        }
    }

    /// The text report: one line per check.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.status {
                Status::Ok => "ok",
                Status::Warning => "warning",
                Status::Problem => "PROBLEM",
            };
            out.push_str(&format!("{tag:<8}{}: {}\n", f.name, f.message));
        }
        out
    }
}

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
    if let Some(esp) = disk.disk_layout.esp {
        if disk.disk_layout.boot.uboot() {
            out.push(check_uboot(disk, esp, &versions));
        } else {
            out.push(check_esp(disk, esp, &versions));
        }
    }
    Ok(out)
}

/// The EFI system partition: systemd-boot present, one complete entry per
/// version with a kernel, `loader.conf` naming the default, nothing else.
fn check_esp(disk: &Disk, esp: (u64, u64), versions: &[VersionInfo]) -> Finding {
    let st = match crate::boot::uefi::inspect(&disk.target, esp) {
        Ok(st) => st,
        Err(e) => return Finding::problem("esp", format!("{e:#}")),
    };
    let with_kernel: Vec<&str> = versions
        .iter()
        .filter(|v| v.record.as_ref().is_some_and(|r| r.has_kernel))
        .map(|v| v.label.as_str())
        .collect();
    let mut problems = st.problems.clone();
    if with_kernel.is_empty() && st.loader_missing {
        // Deployed with --no-bootloader: no loader expected yet.
        let loader = [
            format!("{} is missing", crate::boot::uefi::ESP_LOADER),
            format!("{} is missing", crate::boot::uefi::LOADER_CONF),
        ];
        problems.retain(|p| !loader.contains(p));
    }
    for l in &with_kernel {
        if !st.complete.iter().any(|c| c == l) {
            problems.push(format!(
                "version {l} has no complete boot entry on the EFI system partition (run deploy cleanup)"
            ));
        }
    }
    for c in &st.complete {
        if !with_kernel.contains(&c.as_str()) {
            problems.push(format!(
                "the EFI system partition has an entry for {c}, which is not a version with a kernel (run deploy cleanup)"
            ));
        }
    }
    if let (Some(esp_default), Ok(default)) = (
        &st.default,
        crate::store::versions::default_label(&disk.layout),
    ) {
        if !with_kernel.is_empty() && *esp_default != default {
            problems.push(format!(
                "loader.conf makes {esp_default} the UEFI default, systems/default is {default} (run deploy cleanup)"
            ));
        }
    }
    Finding::from_problems(
        "esp",
        problems,
        format!(
            "EFI system partition: systemd-boot, {} entr{}, default {}",
            st.complete.len(),
            if st.complete.len() == 1 { "y" } else { "ies" },
            st.default.as_deref().unwrap_or("-")
        ),
    )
}

/// U-Boot's boot partition: `extlinux.conf` naming a menu, one complete
/// entry per version with a kernel, the default the same as `systems/default`.
fn check_uboot(disk: &Disk, part: (u64, u64), versions: &[VersionInfo]) -> Finding {
    let st = match crate::boot::uboot::inspect(&disk.target, part) {
        Ok(st) => st,
        Err(e) => return Finding::problem("boot partition", format!("{e:#}")),
    };
    let mut problems = st.problems.clone();
    let with_kernel: Vec<&str> = versions
        .iter()
        .filter(|v| v.record.as_ref().is_some_and(|r| r.has_kernel))
        .map(|v| v.label.as_str())
        .collect();
    for l in &with_kernel {
        if !st.complete.iter().any(|c| c == l) {
            problems.push(format!(
                "version {l} has no complete entry in the U-Boot menu on the boot partition (run deploy cleanup)"
            ));
        }
    }
    for c in &st.complete {
        if !with_kernel.contains(&c.as_str()) {
            problems.push(format!(
                "the U-Boot menu has an entry for {c}, which is not a version with a kernel (run deploy cleanup)"
            ));
        }
    }
    if let (Some(part_default), Ok(default)) = (
        &st.default,
        crate::store::versions::default_label(&disk.layout),
    ) {
        if !with_kernel.is_empty() && *part_default != default {
            problems.push(format!(
                "extlinux.conf on the boot partition makes {part_default} U-Boot's default, systems/default is {default} (run deploy cleanup)"
            ));
        }
    }
    Finding::from_problems(
        "boot partition",
        problems,
        format!(
            "U-Boot boot partition: {} entr{}, default {}",
            st.complete.len(),
            if st.complete.len() == 1 { "y" } else { "ies" },
            st.default.as_deref().unwrap_or("-")
        ),
    )
}

/// What a scan of `systems/` found.
#[derive(Debug, Default)]
struct SystemsScan {
    versions: Vec<String>,
    leftovers: Vec<String>,
    unexpected: Vec<String>,
}

fn scan_systems(dir: &Path) -> Result<SystemsScan> {
    let mut scan = SystemsScan::default();
    let entries =
        std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == layout::DEFAULT_LINK {
            continue;
        }
        let is_dir = entry.file_type()?.is_dir();
        match classify_entry(&name, is_dir) {
            Entry::Version => scan.versions.push(name),
            Entry::Leftover => scan.leftovers.push(name),
            Entry::Unexpected => scan.unexpected.push(name),
        }
    }
    scan.versions.sort();
    scan.leftovers.sort();
    scan.unexpected.sort();
    Ok(scan)
}

/// Kinds of entries in `systems/` (other than `default`).
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Version,
    Leftover,
    Unexpected,
}

/// `.<L>.partial` and `.<L>.removing` directories and the temp files of an
/// atomic replace are leftovers; other directories are versions.
fn classify_entry(name: &str, is_dir: bool) -> Entry {
    if let Some(inner) = name.strip_prefix('.') {
        let leftover = (is_dir
            && (inner.ends_with(layout::PARTIAL_SUFFIX) || inner.ends_with(".removing")))
            || (!is_dir && inner.ends_with(".tmp"));
        return if leftover {
            Entry::Leftover
        } else {
            Entry::Unexpected
        };
    }
    if is_dir {
        Entry::Version
    } else {
        Entry::Unexpected
    }
}

/// A version directory as far as the other checks need it.
struct VersionInfo {
    label: String,
    complete: bool,
    record: Option<Deployment>,
}

/// Checks one version directory; returns its findings and its record when readable.
fn check_version(
    top: &Layout,
    label: &str,
    fs_uuid: &str,
    state_subvols: &[String],
) -> (Vec<Finding>, Option<Deployment>) {
    let dir = top.version(label);
    let name = |what: &str| format!("version {label}: {what}");
    let mut out = Vec::new();
    if let Err(e) = units::validate_label(label) {
        out.push(Finding::problem(name("label"), format!("{e:#}")));
    }
    out.push(check_subvolume(&dir.join(layout::ORIG), name("orig"), true));
    out.push(check_subvolume(&dir.join(layout::RUN), name("run"), false));
    let record = match Deployment::load(&dir.join(layout::DEPLOYMENT_JSON)) {
        Ok(r) if r.label == label => {
            out.push(Finding::ok(
                name("deployment.json"),
                "readable, label matches",
            ));
            Some(r)
        }
        Ok(r) => {
            out.push(Finding::problem(
                name("deployment.json"),
                format!("records label {:?}, not {label:?}", r.label),
            ));
            Some(r)
        }
        Err(e) => {
            out.push(Finding::problem(name("deployment.json"), format!("{e:#}")));
            None
        }
    };
    if let Some(r) = &record {
        out.push(check_boot_files(&dir, r, &name("boot files")));
    }
    // A `/` entry the deploy kept from the rootfs (not one it added) that
    // names another device is the rootfs's choice: a warning, as at deploy.
    let root_kept = record
        .as_ref()
        .is_some_and(|r| !r.fstab_added.iter().any(|p| p == "/"));
    out.push(check_version_fstab(
        &dir.join(layout::RUN),
        fs_uuid,
        state_subvols,
        root_kept,
        &name("fstab"),
    ));
    (out, record)
}

fn check_subvolume(path: &Path, name: String, want_readonly: bool) -> Finding {
    let what = if want_readonly {
        "read-only"
    } else {
        "writable"
    };
    if !path.is_dir() {
        return Finding::problem(name, format!("{} is missing", path.display()));
    }
    if !btrfs::is_subvolume(path) {
        return Finding::problem(
            name,
            format!(
                "{} is not a subvolume (must be a {what} subvolume)",
                path.display()
            ),
        );
    }
    match btrfs::is_readonly(path) {
        Ok(ro) if ro == want_readonly => Finding::ok(name, format!("{what} subvolume")),
        Ok(ro) => Finding::problem(
            name,
            format!(
                "{} is {} (must be a {what} subvolume)",
                path.display(),
                if ro { "read-only" } else { "writable" }
            ),
        ),
        Err(e) => Finding::problem(name, format!("starting btrfs (install btrfs-progs): {e}")),
    }
}

fn check_boot_files(dir: &Path, r: &Deployment, name: &str) -> Finding {
    let mut wanted = Vec::new();
    if r.has_kernel {
        wanted.push(layout::KERNEL);
        if r.has_initramfs {
            wanted.push(layout::INITRAMFS);
        }
        if r.has_dtb {
            wanted.push(layout::DTB);
        }
    }
    if wanted.is_empty() {
        return Finding::ok(name, "no kernel (deployed without a bootloader)");
    }
    let problems: Vec<String> = wanted
        .iter()
        .filter_map(|f| {
            let p = dir.join(f);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() && m.len() > 0 => None,
                Ok(m) if m.is_file() => Some(format!("{f} is empty")),
                Ok(_) => Some(format!("{f} is not a regular file")),
                Err(_) => Some(format!("{f} is missing (deployment.json records it)")),
            }
        })
        .collect();
    Finding::from_problems(name, problems, wanted.join(", "))
}

fn check_version_fstab(
    run: &Path,
    fs_uuid: &str,
    state_subvols: &[String],
    root_kept: bool,
    name: &str,
) -> Finding {
    match rootpath::read_in_root(run, Path::new("etc/fstab")) {
        Ok(Some(bytes)) => {
            let text = String::from_utf8_lossy(&bytes);
            let (problems, warnings) = fstab_findings(&text, fs_uuid, state_subvols, root_kept);
            if problems.is_empty() && !warnings.is_empty() {
                Finding::warning(name, warnings.join("; "))
            } else {
                Finding::from_problems(
                    name,
                    problems.into_iter().chain(warnings).collect(),
                    "mounts / and every state directory",
                )
            }
        }
        Ok(None) => Finding::problem(name, "run/etc/fstab is missing"),
        Err(e) => Finding::problem(name, format!("starting btrfs (install btrfs-progs): {e}")),
    }
}

/// (problems, warnings) of a version's fstab. Problems: no entry mounting
/// `/`; a state directory with a `/state` subvolume (`state_subvols`, names
/// without slash) that no entry mounts; an entry mounting a `/state`
/// subvolume that does not exist; a `/state` entry naming another
/// filesystem's `UUID=`, and so a `/` entry unless `root_kept`. With
/// `root_kept` (the deploy kept the rootfs's own `/` entry instead of adding
/// one), a `/` entry naming another device is a warning, the one the deploy
/// printed ([`fstab::root_entry_warnings`]).
pub fn fstab_findings(
    content: &str,
    fs_uuid: &str,
    state_subvols: &[String],
    root_kept: bool,
) -> (Vec<String>, Vec<String>) {
    let warnings = if root_kept {
        fstab::root_entry_warnings(content, fs_uuid)
    } else {
        Vec::new()
    };
    let points = fstab::mount_points(content);
    let mounted = |p: &str| points.iter().any(|m| m == p);
    let mut problems = Vec::new();
    if !mounted("/") {
        problems.push("no entry mounts /".to_string());
    }
    for d in state_subvols {
        if !mounted(&format!("/{d}")) {
            problems.push(format!("no entry mounts /{d} (the /state/{d} subvolume)"));
        }
    }
    for line in content.lines() {
        let Some(point) = fstab::mount_points(line).into_iter().next() else {
            continue;
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (spec, options) = (fields[0], fields.get(3).copied().unwrap_or(""));
        let state_subvol = options.split(',').find_map(|o| {
            o.strip_prefix("subvol=")
                .map(|s| s.trim_start_matches('/'))
                .and_then(|s| s.strip_prefix("state/"))
        });
        if let Some(d) = state_subvol {
            if !state_subvols.iter().any(|s| s == d.trim_end_matches('/')) {
                problems.push(format!(
                    "{point} mounts subvol=/state/{d}, which is not a subvolume on this disk"
                ));
            }
        }
        if (point == "/" && !root_kept) || state_subvol.is_some() {
            if let Some(uuid) = spec.strip_prefix("UUID=") {
                if !uuid.eq_ignore_ascii_case(fs_uuid) {
                    problems.push(format!(
                        "the entry for {point} names UUID={uuid}, not this filesystem ({fs_uuid})"
                    ));
                }
            }
        }
    }
    (problems, warnings)
}

/// The default link: a relative symlink naming a complete version.
fn check_default(top: &Layout, versions: &[VersionInfo]) -> Finding {
    let name = "default";
    let link = top.default_link();
    let target = match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&link) {
            Ok(t) => t,
            Err(e) => return Finding::problem(name, format!("reading systems/default: {e}")),
        },
        Ok(_) => return Finding::problem(name, "systems/default is not a symlink"),
        Err(_) => return Finding::problem(name, "systems/default is missing"),
    };
    let complete: Vec<&str> = versions
        .iter()
        .filter(|v| v.complete)
        .map(|v| v.label.as_str())
        .collect();
    let known: Vec<&str> = versions.iter().map(|v| v.label.as_str()).collect();
    match default_problem(&target, &known, &complete) {
        None => Finding::ok(name, format!("systems/default -> {}", target.display())),
        Some(p) => Finding::problem(name, p),
    }
}

/// Why `systems/default -> target` is wrong, given the version directories
/// (`known`) and those without problems (`complete`); `None` when it is right.
pub fn default_problem(target: &Path, known: &[&str], complete: &[&str]) -> Option<String> {
    let t = target.to_string_lossy();
    if target.is_absolute() || t.contains('/') {
        return Some(format!(
            "systems/default -> {t} must be a relative link to a version directory"
        ));
    }
    if !known.contains(&t.as_ref()) {
        return Some(format!(
            "systems/default -> {t} is dangling: no version {t} on this disk"
        ));
    }
    if !complete.contains(&t.as_ref()) {
        return Some(format!(
            "systems/default -> {t}, which is incomplete (see its problems above)"
        ));
    }
    None
}

/// `/state` subvolumes that the versions' fstab additions rely on.
fn check_state(versions: &[VersionInfo], state_subvols: &[String]) -> Finding {
    let mut needed: Vec<String> = Vec::new();
    for v in versions {
        for p in v.record.iter().flat_map(|r| r.fstab_added.iter()) {
            let d = p.trim_start_matches('/');
            if layout::STATE_DIRS.contains(&d) && !needed.iter().any(|n| n == d) {
                needed.push(d.to_string());
            }
        }
    }
    let missing: Vec<String> = needed
        .iter()
        .filter(|d| !state_subvols.contains(d))
        .map(|d| format!("/state/{d} is not a subvolume (the fstab of a version mounts it)"))
        .collect();
    let present = state_subvols
        .iter()
        .map(|d| format!("/state/{d}"))
        .collect::<Vec<_>>()
        .join(" ");
    Finding::from_problems(
        "state",
        missing,
        if present.is_empty() {
            "no /state subvolumes".to_string()
        } else {
            present
        },
    )
}

/// The bootloader config (and, with `syslinux`, its installation) against
/// the versions. (Disks that do not boot under BIOS have no SYSLINUX:
/// `uefi` disks boot through systemd-boot, `uboot` disks through U-Boot,
/// which reads the boot partition, checked by [`check_uboot`].)
fn check_bootloader(
    top: &Layout,
    versions: &[VersionInfo],
    fs_uuid: &str,
    syslinux: bool,
) -> Vec<Finding> {
    let with_kernel: Vec<String> = versions
        .iter()
        .filter(|v| v.record.as_ref().is_some_and(|r| r.has_kernel))
        .map(|v| v.label.clone())
        .collect();
    let conf_path = top.extlinux_conf();
    let conf = std::fs::read_to_string(&conf_path);
    if with_kernel.is_empty() {
        return vec![Finding::ok(
            "bootloader",
            "no version has a kernel: no bootloader expected",
        )];
    }
    let conf = match conf {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::problem(
                "bootloader config",
                format!("extlinux/extlinux.conf cannot be read ({e}) but versions have kernels"),
            )]
        }
    };
    // The `default` entry is included through systems/default.
    let conf = crate::boot::extlinux::expand_includes(&conf, &top.top);
    let mut problems: Vec<String> = conf
        .lines()
        .filter_map(|l| l.strip_prefix("# include "))
        .map(|l| format!("included file {l}"))
        .collect();
    let trial = crate::store::trial::open(top)
        .ok()
        .flatten()
        .map(|t| t.version);
    problems.extend(boot_config_problems(
        &conf,
        fs_uuid,
        &with_kernel,
        trial.as_deref(),
    ));
    let mut out = vec![Finding::from_problems(
        "bootloader config",
        problems,
        format!(
            "entries: default, {} (root=UUID={fs_uuid})",
            with_kernel.join(", ")
        ),
    )];
    if !syslinux {
        return out;
    }
    let mut install = Vec::new();
    if !top.extlinux_dir().join("ldlinux.c32").is_file() {
        install.push("extlinux/ldlinux.c32 is missing (SYSLINUX not installed)".to_string());
    }
    let link = top.top.join(layout::EXTLINUX_CONF_LINK);
    if !std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
        install.push("/extlinux.conf symlink is missing".to_string());
    }
    out.push(Finding::from_problems(
        "bootloader install",
        install,
        "SYSLINUX installed",
    ));
    out
}

/// One `label` block of an extlinux.conf.
#[derive(Debug, Default, Clone)]
struct BootEntry {
    label: String,
    kernel: Option<String>,
    append: Option<String>,
}

fn parse_entries(conf: &str) -> Vec<BootEntry> {
    let mut entries: Vec<BootEntry> = Vec::new();
    for line in conf.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim().to_string();
        match key.to_ascii_lowercase().as_str() {
            "label" => entries.push(BootEntry {
                label: rest,
                ..Default::default()
            }),
            "kernel" | "linux" => {
                if let Some(e) = entries.last_mut() {
                    e.kernel = Some(rest);
                }
            }
            "append" => {
                if let Some(e) = entries.last_mut() {
                    e.append = Some(rest);
                }
            }
            _ => {}
        }
    }
    entries
}

/// Problems of an extlinux.conf against the versions that have a kernel:
/// exactly one `label default` and one `label <L>` per version, no entry
/// for anything else, and each entry booting its own kernel and `run`
/// subvolume on `root=UUID=<fs_uuid>`.
/// While a trial of version T is open (`trial`), one `label trial` entry
/// boots T with `btrfs_deploy.trial=T`.
pub fn boot_config_problems(
    conf: &str,
    fs_uuid: &str,
    kernel_labels: &[String],
    trial: Option<&str>,
) -> Vec<String> {
    let mut entries = parse_entries(conf);
    let mut problems = Vec::new();
    let trial_label = crate::store::trial::MENU_LABEL;
    let trial_entries: Vec<_> = entries
        .iter()
        .filter(|e| e.label == trial_label)
        .cloned()
        .collect();
    entries.retain(|e| e.label != trial_label);
    match (trial, trial_entries.as_slice()) {
        (None, []) => {}
        (None, _) => problems.push(format!(
            "a `label {trial_label}` entry, but no trial is open (run deploy cleanup)"
        )),
        (Some(t), []) => problems.push(format!(
            "the trial of {t} has no `label {trial_label}` entry (run deploy cleanup)"
        )),
        (Some(t), [e]) => {
            let kernel = format!("/systems/{t}/kernel");
            let append = e.append.as_deref().unwrap_or("");
            let marker = format!("{}={t}", crate::store::trial::CMDLINE_KEY);
            if e.kernel.as_deref() != Some(kernel.as_str())
                || !append.split_whitespace().any(|a| a == marker)
                || !append.contains(&format!("rootflags=subvol=systems/{t}/run"))
            {
                problems.push(format!(
                    "entry `label {trial_label}` does not boot the version on trial, {t}, with {marker}"
                ));
            }
        }
        (Some(_), many) => problems.push(format!("{} `label {trial_label}` entries", many.len())),
    }
    let count = |l: &str| entries.iter().filter(|e| e.label == l).count();
    let wanted =
        std::iter::once(layout::DEFAULT_LINK).chain(kernel_labels.iter().map(|s| s.as_str()));
    for l in wanted {
        match count(l) {
            1 => {}
            0 => problems.push(format!("no `label {l}` entry")),
            n => problems.push(format!("{n} `label {l}` entries")),
        }
    }
    for e in &entries {
        let l = e.label.as_str();
        if l != layout::DEFAULT_LINK && !kernel_labels.iter().any(|k| k == l) {
            problems.push(format!(
                "entry `label {l}` has no version with a kernel on this disk"
            ));
            continue;
        }
        let kernel = format!("/systems/{l}/kernel");
        if e.kernel.as_deref() != Some(kernel.as_str()) {
            problems.push(format!("entry `label {l}` does not boot {kernel}"));
        }
        let append = e.append.as_deref().unwrap_or("");
        let args: Vec<&str> = append.split_whitespace().collect();
        if !args.contains(&format!("root=UUID={fs_uuid}").as_str()) {
            problems.push(format!("entry `label {l}` lacks root=UUID={fs_uuid}"));
        }
        if !args.contains(&format!("rootflags=subvol=systems/{l}/run").as_str()) {
            problems.push(format!(
                "entry `label {l}` lacks rootflags=subvol=systems/{l}/run"
            ));
        }
    }
    problems
}

/// `btrfs check --readonly` on the unmounted target.
fn btrfs_check(target: &Path) -> Finding {
    let name = "btrfs check";
    // On a GPT disk, the Btrfs partition through a read-only loop device.
    let part = match open::require_btrfs(target).map(|l| l.btrfs) {
        Ok(Some(range)) => {
            match crate::disk::loopdev::LoopGuard::attach_range(target, Some(range), true) {
                Ok(l) => Some(l),
                Err(e) => return Finding::problem(name, format!("{e:#}")),
            }
        }
        _ => None,
    };
    let target = part.as_ref().map(|l| l.path()).unwrap_or(target);
    let t = target.to_string_lossy();
    let mut c = std::process::Command::new("btrfs");
    c.args(["check", "--readonly"]).arg(target);
    cmd::prepare(&mut c);
    match c.output() {
        Ok(out) if out.status.success() => Finding::ok(name, "clean"),
        Ok(out) => {
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Finding::problem(
                name,
                format!(
                    "`btrfs check --readonly {t}` failed ({}): {}",
                    out.status,
                    cmd::tail_lines(&text, BTRFS_CHECK_TAIL).replace('\n', " | ")
                ),
            )
        }
        Err(e) => Finding::problem(name, format!("starting btrfs (install btrfs-progs): {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "11111111-2222-3333-4444-555555555555";

    fn fstab_problems(content: &str, fs_uuid: &str, state_subvols: &[String]) -> Vec<String> {
        fstab_findings(content, fs_uuid, state_subvols, false).0
    }

    fn all_state() -> Vec<String> {
        layout::STATE_DIRS.iter().map(|s| s.to_string()).collect()
    }

    fn completed() -> String {
        fstab::complete("# vendor fstab\n", UUID).content
    }

    #[test]
    fn completed_fstab_has_no_problems() {
        assert_eq!(
            fstab_problems(&completed(), UUID, &all_state()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn fstab_missing_root_and_state_entries_are_named() {
        let text = completed()
            .lines()
            .filter(|l| !l.contains(" / ") && !l.contains(" /home "))
            .collect::<Vec<_>>()
            .join("\n");
        let p = fstab_problems(&text, UUID, &all_state());
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("no entry mounts /"), "{p:?}");
        assert!(p[1].contains("/home"), "{p:?}");
    }

    #[test]
    fn fstab_existing_entry_for_a_state_dir_counts() {
        // /srv mounted from another disk: no /state/srv subvolume, no problem.
        let text = fstab::complete("LABEL=data /srv ext4 defaults 0 2\n", UUID).content;
        let state: Vec<String> = ["home", "root", "opt", "var"].map(String::from).to_vec();
        assert!(fstab_problems(&text, UUID, &state).is_empty());
        // An existing entry mounting /home (not from /state) counts too.
        let text = "UUID=x / btrfs defaults 0 1\n/dev/sdb1 /home ext4 defaults 0 2\n";
        let p = fstab_problems(text, "x", &["home".to_string()]);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn fstab_entry_for_a_missing_state_subvolume_or_other_uuid() {
        let p = fstab_problems(&completed(), UUID, &["home".into()]);
        assert!(
            p.iter()
                .any(|s| s.contains("/var mounts subvol=/state/var")),
            "{p:?}"
        );
        let p = fstab_problems(&completed(), "other-uuid", &all_state());
        assert!(
            p.iter().any(|s| s.contains("the entry for / names UUID=")),
            "{p:?}"
        );
        assert!(p.iter().any(|s| s.contains("/home")), "{p:?}");
    }

    #[test]
    fn a_kept_root_entry_naming_another_device_is_a_warning_not_a_problem() {
        let text = fstab::complete("UUID=dead-beef / ext4 defaults 0 1\n", UUID).content;
        let (p, w) = fstab_findings(&text, UUID, &all_state(), true);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(w, fstab::complete(&text, UUID).warnings);
        assert!(w[0].contains("will not mount its own root"), "{w:?}");
        // A `/` line the deploy added itself with another UUID is a problem.
        let (p, w) = fstab_findings(&completed(), "other-uuid", &all_state(), false);
        assert!(
            p.iter().any(|s| s.contains("the entry for / names UUID=")),
            "{p:?}"
        );
        assert!(w.is_empty());
    }

    fn conf(labels: &[&str], default: &str) -> String {
        let entries: Vec<crate::boot::extlinux::Entry> = labels
            .iter()
            .map(|l| crate::boot::extlinux::Entry {
                label: l.to_string(),
                initramfs: true,
                dtb: false,
                args: crate::boot::extlinux::DEFAULT_KERNEL_ARGS.into(),
                ro: false,
            })
            .collect();
        let main = crate::boot::extlinux::render(UUID, &entries, None).unwrap();
        let d = entries.iter().find(|e| e.label == default).unwrap();
        main.replace(
            &format!("include /systems/default/{}\n", layout::DEFAULT_ENTRY),
            &crate::boot::extlinux::render_default_entry(UUID, d).unwrap(),
        )
    }

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rendered_config_matches_its_versions() {
        let c = conf(&["factory", "v2"], "v2");
        assert!(boot_config_problems(&c, UUID, &labels(&["factory", "v2"]), None).is_empty());
    }

    #[test]
    fn the_trial_entry_is_checked_against_the_open_trial() {
        let mut t = crate::boot::extlinux::Entry {
            label: "v2".into(),
            initramfs: true,
            dtb: false,
            args: crate::boot::extlinux::DEFAULT_KERNEL_ARGS.into(),
            ro: false,
        };
        t.args = crate::store::trial::entry_args(&t.args, "v2");
        let entries: Vec<_> = ["factory", "v2"]
            .iter()
            .map(|l| crate::boot::extlinux::Entry {
                label: l.to_string(),
                ..t.clone()
            })
            .collect();
        let conf = crate::boot::extlinux::render(UUID, &entries, Some(&t)).unwrap();
        let conf = format!("{conf}\nlabel default\n  kernel /systems/default/kernel\n  append root=UUID={UUID} rootflags=subvol=systems/default/run\n");
        let l = labels(&["factory", "v2"]);
        assert!(
            boot_config_problems(&conf, UUID, &l, Some("v2")).is_empty(),
            "{:?}",
            boot_config_problems(&conf, UUID, &l, Some("v2"))
        );
        assert_eq!(
            boot_config_problems(&conf, UUID, &l, None),
            ["a `label trial` entry, but no trial is open (run deploy cleanup)"]
        );
        assert_eq!(
            boot_config_problems(&conf, UUID, &l, Some("factory")),
            ["entry `label trial` does not boot the version on trial, factory, with btrfs_deploy.trial=factory"]
        );
    }

    #[test]
    fn config_missing_extra_or_duplicate_entries() {
        let c = conf(&["factory"], "factory");
        let p = boot_config_problems(&c, UUID, &labels(&["factory", "v2"]), None);
        assert_eq!(p, ["no `label v2` entry"]);
        let c = conf(&["factory", "v2"], "factory");
        let p = boot_config_problems(&c, UUID, &labels(&["factory"]), None);
        assert_eq!(
            p,
            ["entry `label v2` has no version with a kernel on this disk"]
        );
        let c = format!(
            "{}\n{}",
            conf(&["factory"], "factory"),
            conf(&["factory"], "factory")
        );
        let p = boot_config_problems(&c, UUID, &labels(&["factory"]), None);
        assert!(
            p.contains(&"2 `label default` entries".to_string()),
            "{p:?}"
        );
        assert!(
            p.contains(&"2 `label factory` entries".to_string()),
            "{p:?}"
        );
    }

    #[test]
    fn config_with_wrong_uuid_or_subvolume() {
        let c = conf(&["factory"], "factory");
        let p = boot_config_problems(&c, "other", &labels(&["factory"]), None);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|s| s.contains("root=UUID=other")), "{p:?}");
        let c = c.replace("subvol=systems/factory/run", "subvol=systems/x/run");
        let p = boot_config_problems(&c, UUID, &labels(&["factory"]), None);
        assert_eq!(
            p,
            ["entry `label factory` lacks rootflags=subvol=systems/factory/run"]
        );
    }

    #[test]
    fn default_link_rules() {
        let known = ["factory", "v2"];
        let complete = ["factory"];
        assert_eq!(
            default_problem(Path::new("factory"), &known, &complete),
            None
        );
        let p = default_problem(Path::new("v3"), &known, &complete).unwrap();
        assert!(p.contains("dangling"), "{p}");
        let p = default_problem(Path::new("v2"), &known, &complete).unwrap();
        assert!(p.contains("incomplete"), "{p}");
        let p = default_problem(Path::new("/systems/factory"), &known, &complete).unwrap();
        assert!(p.contains("relative"), "{p}");
        let p = default_problem(Path::new("../systems/factory"), &known, &complete).unwrap();
        assert!(p.contains("relative"), "{p}");
    }

    #[test]
    fn systems_entries_are_classified() {
        assert_eq!(classify_entry("factory", true), Entry::Version);
        assert_eq!(classify_entry(".v2.partial", true), Entry::Leftover);
        assert_eq!(classify_entry(".v2.removing", true), Entry::Leftover);
        assert_eq!(classify_entry(".default.tmp", false), Entry::Leftover);
        assert_eq!(classify_entry("stray-file", false), Entry::Unexpected);
        assert_eq!(classify_entry(".hidden", true), Entry::Unexpected);
    }

    #[test]
    fn report_counts_and_text() {
        let r = Report::new(
            Path::new("d.img"),
            vec![
                Finding::ok("a", "fine"),
                Finding::warning("leftovers", "x"),
                Finding::problem("default", "dangling"),
            ],
        );
        assert!(!r.ok);
        assert_eq!((r.problems, r.warnings), (1, 1));
        let t = r.to_text();
        assert!(t.contains("ok      a: fine\n"), "{t}");
        assert!(t.contains("warning leftovers: x\n"), "{t}");
        assert!(t.contains("PROBLEM default: dangling\n"), "{t}");
        let j: serde_json::Value =
            serde_json::from_str(&crate::util::json::to_string(&r).unwrap()).unwrap();
        assert_eq!(j["format"], 1);
        assert_eq!(
            (j["ok"].clone(), j["problems"].clone()),
            (false.into(), 1.into())
        );
        assert_eq!(j["target"], "d.img");
        assert_eq!(j["findings"][2]["status"], "problem");
    }
}
