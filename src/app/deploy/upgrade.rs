//! Adding a version to a disk that holds versions (design §3): synced
//! from a directory or archive, or received from a bundle.

use super::version::{check_boot_space, fill_tree, finish_version, publish_version};
use super::{Outcome, Plan, SCRATCH_SOURCE};
use crate::disk::open::{self, Disk};
use crate::store::btrfs;
use crate::store::deployment::Deployment;
use crate::store::layout::{self, Layout};
use crate::store::lifecycle;
use crate::store::versions;
use crate::tree::copy::{self, SyncOptions};
use crate::tree::kernel;
use crate::tree::statemerge;
use crate::util::signals;
use crate::util::ui;
use crate::util::units;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Adds a version next to the existing ones (design §3). The target is
/// first inspected read-only, so a refused upgrade leaves it byte-identical.
pub(super) fn deploy_upgrade(plan: &Plan) -> Result<Outcome> {
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
                // What this deploy's extensions write again in place.
                keep_absent: plan
                    .extensions
                    .iter()
                    .flat_map(|e| e.keeps.iter().cloned())
                    .collect(),
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
