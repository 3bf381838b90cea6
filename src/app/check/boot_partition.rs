//! The FAT boot partition of a partitioned disk against the versions:
//! systemd-boot's entries on the EFI system partition, or U-Boot's menu.

use super::report::Finding;
use super::version::VersionInfo;
use crate::disk::open::Disk;

/// The EFI system partition: systemd-boot present, one complete entry per
/// version with a kernel, `loader.conf` naming the default, nothing else.
/// Also returns each entry's kernel arguments (for the root modes).
pub(super) fn check_esp(
    disk: &Disk,
    esp: (u64, u64),
    versions: &[VersionInfo],
) -> (Finding, Vec<(String, String)>) {
    let st = match crate::boot::uefi::inspect(&disk.target, esp) {
        Ok(st) => st,
        Err(e) => return (Finding::problem("esp", format!("{e:#}")), Vec::new()),
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
    let finding = Finding::from_problems(
        "esp",
        problems,
        format!(
            "EFI system partition: systemd-boot, {} entr{}, default {}",
            st.complete.len(),
            if st.complete.len() == 1 { "y" } else { "ies" },
            st.default.as_deref().unwrap_or("-")
        ),
    );
    (finding, st.args)
}

/// U-Boot's boot partition: `extlinux.conf` naming a menu, one complete
/// entry per version with a kernel, the default the same as `systems/default`.
/// Also returns each entry's kernel arguments (for the root modes).
pub(super) fn check_uboot(
    disk: &Disk,
    part: (u64, u64),
    versions: &[VersionInfo],
) -> (Finding, Vec<(String, String)>) {
    let st = match crate::boot::uboot::inspect(&disk.target, part) {
        Ok(st) => st,
        Err(e) => {
            return (
                Finding::problem("boot partition", format!("{e:#}")),
                Vec::new(),
            )
        }
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
    let pi = match crate::boot::rpi::inspect(&disk.target, part) {
        Ok(Some(p)) => {
            problems.extend(p);
            " (Raspberry Pi firmware, config.txt)"
        }
        Ok(None) => "",
        Err(e) => {
            problems.push(format!("reading the Raspberry Pi boot files: {e:#}"));
            ""
        }
    };
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
    let finding = Finding::from_problems(
        "boot partition",
        problems,
        format!(
            "U-Boot boot partition{pi}: {} entr{}, default {}",
            st.complete.len(),
            if st.complete.len() == 1 { "y" } else { "ies" },
            st.default.as_deref().unwrap_or("-")
        ),
    );
    (finding, st.args)
}
