//! What every new version goes through: its tree written and finished
//! (extensions, fstab, state, kernel files), then published.

use super::state_dirs::setup_state;
use super::Plan;
use crate::disk::open::Disk;
use crate::store::btrfs;
use crate::store::deployment::{self, Deployment};
use crate::store::layout::{self, Layout};
use crate::store::lifecycle;
use crate::tree::arch;
use crate::tree::copy::{self, CopyOptions};
use crate::tree::extensions;
use crate::tree::fstab;
use crate::tree::kernel;
use crate::tree::statemerge;
use crate::tree::tarball;
use crate::util::fsutil;
use crate::util::signals;
use crate::util::ui;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Writes the rootfs (directory or archive) into the empty directory `dst`.
pub(super) fn fill_tree(
    plan: &Plan,
    dst: &Path,
    progress: Arc<copy::Progress>,
) -> Result<copy::CopyStats> {
    if plan.tarball {
        tarball::extract(&plan.rootfs, dst, Some(&progress))
    } else {
        let stats = copy::copy_tree(
            &plan.rootfs,
            dst,
            &CopyOptions {
                threads: 0,
                progress: Some(progress),
            },
        )
        .context("copying the rootfs")?;
        if let Some(img) = &plan.source_image {
            crate::tree::sdimage::finish_tree(img, dst)?;
        }
        Ok(stats)
    }
}

/// fstab, state, read-only orig, run snapshot, kernel files; returns the
/// record (not yet saved).
pub(super) fn finish_version(
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
    for n in &completion.made_ro {
        ui::detail(format!(
            "the rootfs's own / entry (etc/fstab line {n}) made read-only: `ro` added, `rw` removed (root mode ro)"
        ));
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
        rootfs: match &plan.source_image {
            Some(img) => img.image.display().to_string(),
            None => plan.rootfs.display().to_string(),
        },
        kernel_args: plan
            .kernel_args
            .clone()
            .unwrap_or_else(|| super::default_kernel_args(arch)),
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

/// Publishes the finished version and, when asked (or when it is the
/// first), makes it the default: the order is `lifecycle`'s.
pub(super) fn publish_version(
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
pub(super) fn check_boot_space(disk: &Disk, label: &str, dir: &Path) -> Result<()> {
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
