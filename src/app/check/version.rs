//! One version directory: its label, `orig` and `run` subvolumes,
//! `deployment.json`, the boot files it records and its fstab.

use super::fstab::check_version_fstab;
use super::report::Finding;
use crate::store::btrfs;
use crate::store::deployment::Deployment;
use crate::store::layout::{self, Layout};
use crate::util::units;
use std::path::Path;

/// A version directory as far as the other checks need it.
pub(super) struct VersionInfo {
    pub(super) label: String,
    pub(super) complete: bool,
    pub(super) record: Option<Deployment>,
}

/// Checks one version directory; returns its findings and its record when readable.
pub(super) fn check_version(
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
