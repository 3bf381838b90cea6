//! A version's `run/etc/fstab`: `/` and every state directory mounted, from
//! this filesystem.

use super::report::Finding;
use crate::tree::fstab;
use crate::util::rootpath;
use std::path::Path;

pub(super) fn check_version_fstab(
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
