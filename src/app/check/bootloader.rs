//! The extlinux config (with the entry of an open trial) and the SYSLINUX
//! installation, against the versions.

use super::report::Finding;
use super::version::VersionInfo;
use crate::store::layout::{self, Layout};

/// The bootloader config (and, with `syslinux`, its installation) against
/// the versions. (Disks that do not boot under BIOS have no SYSLINUX:
/// `uefi` disks boot through systemd-boot, `uboot` disks through U-Boot,
/// which reads the boot partition, checked by [`super::boot_partition::check_uboot`].)
pub(super) fn check_bootloader(
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
pub(super) struct BootEntry {
    pub(super) label: String,
    pub(super) kernel: Option<String>,
    pub(super) append: Option<String>,
}

pub(super) fn parse_entries(conf: &str) -> Vec<BootEntry> {
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
