//! The life of a version on a disk — publish, switch, remove, clean up — and
//! the one durable order every command follows (deploy, `set-default`,
//! `remove`, `--keep`, `cleanup`). "Commit" is a Btrfs transaction commit
//! (`BTRFS_IOC_SYNC`): everything before it is on disk before anything after.
//!
//! - **publish** L: the content of `systems/.L.partial` is complete (tree,
//!   orig read-only, run, kernel files, `deployment.json`) → commit → rename
//!   `.L.partial` to `L` → commit → the boot menu lists L and L's
//!   `default-entry.conf` exists → commit. A power cut before the first
//!   rename leaves a `.partial` that nothing boots; after it, a complete L.
//! - **switch** to L: L's `default-entry.conf` present → commit → the
//!   /state merge from the old default to L (journaled in
//!   `/state/.deploy-merge`, see `tree::statemerge`) → replace the
//!   `systems/default` symlink by one rename → commit. The boot menu
//!   reaches the default entry, its kernel, initramfs, dtb and arguments all
//!   through `systems/default`, so that rename is the whole switch.
//! - **remove** L (never the default): the menu without L → commit → rename
//!   L to `.L.removing` → commit → delete its subvolumes and files → commit.
//! - **trial** of L (`--trial`, see `store::trial`): L published, not the
//!   default → its `trial.json` says `arming` → commit → the menu gains the
//!   `trial` entry → commit → the loaders are armed for one boot → the
//!   record says `armed` → commit. Ending a trial (good, failed, withdrawn)
//!   disarms the loaders first, records the outcome, then drops the entry.
//! - **cleanup**: delete `.L.partial` and `.L.removing` leftovers and temp
//!   files of interrupted atomic replaces, then rewrite the menu from what is
//!   on disk → commit.

use crate::boot::{extlinux, Boot};
use crate::store::btrfs;
use crate::store::layout::{self, Layout};
use crate::store::trial::{self, Failure, State, Trial};
use crate::store::versions::{self, Version};
use crate::util::{fsutil, ui};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Publishes the finished `partial` directory as version `label`.
pub fn publish(
    top: &Layout,
    boot: &Boot,
    partial: &Path,
    label: &str,
    fs_uuid: &str,
) -> Result<()> {
    btrfs::sync_fs(&top.top)?;
    let final_dir = top.version(label);
    std::fs::rename(partial, &final_dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), final_dir.display()))?;
    fsutil::fsync_dir(&top.systems())?;
    btrfs::sync_fs(&top.top)?;
    ui::step("Writing the bootloader configuration");
    if write_boot_menu(top, boot, fs_uuid, None)? {
        boot.install(top)?;
        btrfs::sync_fs(&top.top)?;
    } else {
        ui::detail("no version has a kernel: no bootloader installed");
    }
    Ok(())
}

/// Makes `label` the default: one rename of `systems/default`.
pub fn switch(top: &Layout, boot: &Boot, label: &str, fs_uuid: &str) -> Result<()> {
    let all = versions::list(top)?;
    let Some(v) = all.iter().find(|v| v.label == label) else {
        bail!("no complete version {label} on this disk");
    };
    let any_kernel = all.iter().any(|v| v.deployment.has_kernel);
    if any_kernel && !v.deployment.has_kernel {
        bail!(
            "version {label} has no kernel (deployed with --no-bootloader) but the disk boots \
             through its menu: making it the default would leave nothing to boot"
        );
    }
    if v.deployment.has_kernel {
        extlinux::write_default_entry(top, fs_uuid, &entry_of(v))?;
        btrfs::sync_fs(&top.top)?;
    }
    // A trial of this version succeeds by becoming the default; a trial of
    // another one no longer makes sense against a new default.
    let open_trial = trial::open(top)?;
    if let Some(t) = &open_trial {
        if t.version != label {
            end_trial(top, boot, fs_uuid, t.clone(), Some(Failure::Withdrawn))?;
        }
    }
    // /state follows the default: merged from the old default's vendor
    // copy to the new one's, journaled, around the rename.
    let switch = || fsutil::replace_symlink(&top.default_link(), Path::new(label));
    match versions::default_label(top).ok() {
        Some(from) if from != label => {
            crate::tree::statemerge::switch_with_state(top, &from, label, switch)?
        }
        _ => switch()?,
    }
    btrfs::sync_fs(&top.top)?;
    // Loaders that cannot read Btrfs (systemd-boot on the ESP) learn the
    // new default last (see boot::uefi for the power-cut story there).
    if v.deployment.has_kernel {
        boot.switch_default(label)?;
    }
    if let Some(t) = open_trial.filter(|t| t.version == label) {
        end_trial(top, boot, fs_uuid, t, None)?;
    }
    Ok(())
}

/// Arms a trial of `label`: published, with a kernel, not the default. The
/// next boot, and only it, starts `label`; the default does not change.
pub fn arm_trial(top: &Layout, boot: &Boot, label: &str, fs_uuid: &str) -> Result<()> {
    boot.check_trial()?;
    let default = versions::default_label(top)?;
    if label == default {
        bail!("{label} is the default already: there is nothing to try (a trial boots a version that is not the default once)");
    }
    let all = versions::list(top)?;
    let v = match all.iter().find(|v| v.label == label) {
        None => bail!("no complete version {label} on this disk"),
        Some(v) if !v.deployment.has_kernel => {
            bail!("version {label} has no kernel (deployed with --no-bootloader): it cannot be booted on trial")
        }
        Some(v) => v,
    };
    let Some(fallback) = all.iter().find(|v| v.label == default) else {
        bail!("the default version {default} is not complete on this disk");
    };
    let mut trial_entry = entry_of(v);
    trial_entry.args = trial::entry_args(&trial_entry.args, label);
    let fallback_entry = entry_of(fallback);
    if let Some(old) = trial::open(top)? {
        ui::detail(format!("Withdrawing the pending trial of {}", old.version));
        end_trial(top, boot, fs_uuid, old, Some(Failure::Withdrawn))?;
    }
    let mut t = Trial::new(label, &default);
    trial::save(top, &t)?;
    write_boot_menu(top, boot, fs_uuid, None)?;
    btrfs::sync_fs(&top.top)?;
    boot.arm_trial(top, fs_uuid, &trial_entry, &fallback_entry)?;
    t.state = State::Armed;
    trial::save(top, &t)
}

/// Ends trial `t` as good (`failure` None) or failed: loaders disarmed,
/// outcome recorded, the menu without the trial entry, committed.
pub fn end_trial(
    top: &Layout,
    boot: &Boot,
    fs_uuid: &str,
    mut t: Trial,
    failure: Option<Failure>,
) -> Result<()> {
    boot.disarm_trial(top)?;
    t.end(failure);
    trial::save(top, &t)?;
    if top.extlinux_conf().exists() {
        write_boot_menu(top, boot, fs_uuid, None)?;
    }
    btrfs::sync_fs(&top.top)
}

/// What a boot finds about the trial, from the version it runs (`running`)
/// and the trial its kernel command line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootFinding {
    /// No trial is open.
    None,
    /// This boot is the trial of the running version: check its health.
    OnTrial(Trial),
    /// A trial waits for a later boot (armed, not yet used).
    Pending(Trial),
    /// A trial ended now, as failed, because this boot is not it.
    Failed(Trial),
}

/// Settles the open trial at boot (`deploy trial-watch`): the trial boot
/// records that it got to user space; any other boot ends an open trial
/// whose one-shot boot was used as failed (it panicked, hung or lost power),
/// and one that was never armed as interrupted.
pub fn settle_trial_at_boot(
    top: &Layout,
    boot: &Boot,
    fs_uuid: &str,
    running: &str,
    cmdline_trial: Option<&str>,
) -> Result<BootFinding> {
    let Some(mut t) = trial::open(top)? else {
        return Ok(BootFinding::None);
    };
    if t.version == running && cmdline_trial == Some(running) {
        if t.state != State::Booted {
            // The other firmware path of a hybrid disk must not try it again.
            boot.disarm_trial(top)?;
            t.state = State::Booted;
            t.booted_at = Some(crate::store::deployment::now().0);
            trial::save(top, &t)?;
        }
        return Ok(BootFinding::OnTrial(t));
    }
    let armed = boot.trial_armed(top)?;
    let failure = match t.state {
        State::Arming if !armed => Failure::Interrupted,
        State::Arming | State::Armed if armed => return Ok(BootFinding::Pending(t)),
        State::Booted => Failure::Lost,
        _ => Failure::Panic,
    };
    end_trial(top, boot, fs_uuid, t.clone(), Some(failure))?;
    Ok(BootFinding::Failed(
        trial::load(top, &t.version)?.unwrap_or(t),
    ))
}

/// Removes version `label`, which must not be the default.
pub fn remove(top: &Layout, boot: &Boot, label: &str, fs_uuid: &str) -> Result<()> {
    let default = versions::default_label(top)?;
    if label == default {
        bail!("{label} is the default version: make another one the default first (deploy set-default LABEL TARGET)");
    }
    if let Some(t) = trial::open(top)?.filter(|t| t.version == label) {
        end_trial(top, boot, fs_uuid, t, Some(Failure::Withdrawn))?;
    }
    // Out of the menu before anything it refers to goes.
    if top.extlinux_conf().exists() {
        write_boot_menu(top, boot, fs_uuid, Some(label))?;
        btrfs::sync_fs(&top.top)?;
    }
    boot.remove_version(label)?;
    let dir = top.version(label);
    let hidden = top.systems().join(format!(".{label}{REMOVING_SUFFIX}"));
    std::fs::rename(&dir, &hidden).with_context(|| format!("renaming {}", dir.display()))?;
    btrfs::sync_fs(&top.top)?;
    btrfs::remove_version_dir(&hidden)?;
    btrfs::sync_fs(&top.top)
}

/// Removes versions beyond `keep`, oldest first, never the default,
/// `previous` (the default before this deploy, the rollback target), `added`
/// (the version this deploy wrote, default or not: `--no-default`,
/// `--trial`) nor a version whose trial is pending. Returns the labels
/// removed.
pub fn prune(
    top: &Layout,
    boot: &Boot,
    keep: usize,
    previous: &str,
    added: &str,
    fs_uuid: &str,
) -> Result<Vec<String>> {
    let all = versions::list(top)?;
    let default = versions::default_label(top)?;
    let on_trial = trial::open(top)?.map(|t| t.version);
    let mut excess = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for v in &all {
        if excess == 0 {
            break;
        }
        if v.label == default
            || v.label == previous
            || v.label == added
            || on_trial.as_deref() == Some(v.label.as_str())
        {
            continue;
        }
        ui::step(format!("Removing old version {} (--keep {keep})", v.label));
        remove(top, boot, &v.label, fs_uuid)?;
        removed.push(v.label.clone());
        excess -= 1;
    }
    Ok(removed)
}

/// Suffix of a version being removed (`systems/.<label>.removing`).
const REMOVING_SUFFIX: &str = ".removing";

/// Removes versions left half-written by an interrupted deploy
/// (`systems/.<label>.partial`). Returns their names.
pub fn remove_partial_versions(top: &Layout) -> Result<Vec<String>> {
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

/// Everything an interruption can leave: partial versions, versions being
/// removed, temp files of atomic replaces; then the menu is rewritten from
/// what is on disk. Returns what was removed.
pub fn cleanup(top: &Layout, boot: &Boot, fs_uuid: &str) -> Result<Vec<String>> {
    let mut removed = remove_partial_versions(top)?;
    for e in std::fs::read_dir(top.systems())? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') && n.ends_with(REMOVING_SUFFIX) {
            ui::step(format!("Removing {n}, left by an interrupted remove"));
            btrfs::remove_version_dir(&e.path())?;
            removed.push(n);
        }
    }
    let mut temps = vec![
        top.systems().join(".default.tmp"),
        top.extlinux_dir().join(".extlinux.conf.tmp"),
    ];
    for v in versions::list(top)? {
        temps.push(
            top.version(&v.label)
                .join(format!(".{}.tmp", layout::DEFAULT_ENTRY)),
        );
    }
    for tmp in temps {
        if std::fs::symlink_metadata(&tmp).is_ok() {
            std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
            removed.push(tmp.display().to_string());
        }
    }
    // The boot partition (ESP or U-Boot's): files of versions that are gone or were being
    // written, repairs of interrupted writes.
    let labels: Vec<String> = versions::list(top)?.into_iter().map(|v| v.label).collect();
    for p in boot.cleanup(&labels)? {
        ui::step(format!("Boot partition: {p}"));
        removed.push(p);
    }
    // A cut while a trial was being armed: armed or not, finish it one way.
    if let Some(mut t) = trial::open(top)?.filter(|t| t.state == State::Arming) {
        if boot.trial_armed(top)? {
            t.state = State::Armed;
            trial::save(top, &t)?;
        } else {
            ui::step(format!(
                "Ending the trial of {}: its arming was interrupted",
                t.version
            ));
            end_trial(top, boot, fs_uuid, t, Some(Failure::Interrupted))?;
        }
    }
    // A cut between publishing a version and rewriting the menu leaves the
    // menu without it: rewrite it from the disk, and the default of the
    // loaders that keep their own.
    if top.extlinux_conf().exists() {
        write_boot_menu(top, boot, fs_uuid, None)?;
        btrfs::sync_fs(&top.top)?;
        // An armed trial keeps its one-shot boot (its loader.conf).
        let armed = trial::open(top)?.is_some_and(|t| t.state == State::Armed);
        if !armed {
            boot.switch_default(&versions::default_label(top)?)?;
        }
    }
    btrfs::sync_fs(&top.top)?;
    Ok(removed)
}

fn entry_of(v: &Version) -> extlinux::Entry {
    extlinux::Entry {
        label: v.label.clone(),
        initramfs: v.deployment.has_initramfs,
        dtb: v.deployment.has_dtb,
        args: v.deployment.root_mode.entry_args(&v.deployment.kernel_args),
        ro: v.deployment.root_mode.kernel_ro(),
    }
}

/// Rewrites the boot menus of every backend for the versions on disk
/// (except `without`): one entry per version; the extlinux menu reaches
/// the default entry through `systems/default`, and each version gets its
/// `default-entry.conf` (disks made before those files existed get them
/// here). Returns false when no version has a kernel (nothing is written
/// then). Does not commit.
pub fn write_boot_menu(
    top: &Layout,
    boot: &Boot,
    fs_uuid: &str,
    without: Option<&str>,
) -> Result<bool> {
    let all = versions::list(top)?;
    let entries: Vec<extlinux::Entry> = all
        .iter()
        .filter(|v| v.deployment.has_kernel && Some(v.label.as_str()) != without)
        .map(entry_of)
        .collect();
    if entries.is_empty() {
        return Ok(false);
    }
    // The loaders that name a default in their own menu keep the current one.
    let default = versions::default_label(top)
        .ok()
        .filter(|d| entries.iter().any(|e| &e.label == d))
        .unwrap_or_else(|| entries[entries.len() - 1].label.clone());
    let trial_entry = trial::open(top)?
        .and_then(|t| entries.iter().find(|e| e.label == t.version).cloned())
        .map(|mut e| {
            e.args = trial::entry_args(&e.args, &e.label);
            e
        });
    boot.write_menu(top, fs_uuid, &entries, &default, trial_entry.as_ref())?;
    Ok(true)
}
