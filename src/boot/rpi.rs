//! Raspberry Pi boot files (`--boot rpi`): a `uboot` disk whose FAT boot
//! partition also carries what the Pi's own firmware reads before anything
//! else, so that the firmware starts U-Boot and U-Boot boots the default
//! version exactly as on any `uboot` disk (docs/arm.md says why U-Boot and
//! not the firmware's `cmdline.txt`/`tryboot`).
//!
//! Added to the boot partition, once, when the disk is made:
//! ```text
//! bootcode.bin, start*.elf, fixup*.dat   the firmware, from the tree (Debian's raspi-firmware in
//!                                        /usr/lib/raspi-firmware, or Raspberry Pi OS's /boot/firmware)
//! bcm27*.dtb, bcm283*.dtb                the boards' device trees (the firmware loads the one of the board)
//! overlays/*.dtbo                        device tree overlays, when the tree has them
//! u-boot.bin                             U-Boot for 64-bit Pis (u-boot-rpi's rpi_arm64: Pi 3 and 4)
//! config.txt                             arm_64bit=1, kernel=u-boot.bin, enable_uart=1, upstream_kernel=1
//! ```
//! Upgrades leave them as they are (a firmware update is not a version).
//! The disk also gets a hybrid MBR (see `disk::partition::write_hybrid_mbr`):
//! the Pi 3's boot ROM reads only MBR partition tables.

use super::fat;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where the firmware lives in a tree, in the order looked at.
pub const FIRMWARE_DIRS: [&str; 2] = ["usr/lib/raspi-firmware", "boot/firmware"];
/// U-Boot for the 64-bit Pis, in a tree with Debian's `u-boot-rpi`.
pub const UBOOT_BIN: &str = "usr/lib/u-boot/rpi_arm64/u-boot.bin";
/// The firmware's config file.
pub const CONFIG_TXT: &str = "config.txt";
/// Name of U-Boot on the boot partition (`kernel=` in config.txt).
pub const UBOOT_NAME: &str = "u-boot.bin";

/// The config.txt written on a new disk.
pub fn config_txt() -> String {
    "# Written by btrfs-deploy (--boot rpi). The firmware starts U-Boot, which\n\
     # boots the default version from boot/extlinux/extlinux.conf.\n\
     arm_64bit=1\n\
     kernel=u-boot.bin\n\
     enable_uart=1\n\
     upstream_kernel=1\n"
        .to_string()
}

/// The files to put on the boot partition: (source, name on the partition).
#[derive(Debug)]
pub struct Firmware {
    /// Every file, config.txt excluded.
    pub files: Vec<(PathBuf, String)>,
}

impl Firmware {
    /// Bytes of all files.
    pub fn size(&self) -> Result<u64> {
        let mut n = 0;
        for (src, _) in &self.files {
            n += std::fs::metadata(src)
                .with_context(|| format!("reading {}", src.display()))?
                .len();
        }
        Ok(n)
    }
}

fn is_firmware(name: &str) -> bool {
    name == "bootcode.bin"
        || (name.starts_with("start") && name.ends_with(".elf"))
        || (name.starts_with("fixup") && name.ends_with(".dat"))
}

fn is_pi_dtb(name: &str) -> bool {
    // bcm2708..bcm2712 (Raspberry Pi's names), bcm2835..bcm2837 (upstream's).
    (name.starts_with("bcm27") || name.starts_with("bcm283")) && name.ends_with(".dtb")
}

/// Regular files of `dir` whose names pass `keep`, sorted.
fn files_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if keep(&name) && e.file_type()?.is_file() {
            out.push((e.path(), name));
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// Finds the firmware, device trees, overlays and U-Boot in `tree` (the
/// kernel's device trees of `kernel_version` when given). Errors name
/// what is missing and the package that brings it.
pub fn find(tree: &Path, kernel_version: Option<&str>) -> Result<Firmware> {
    let Some(fw_dir) = FIRMWARE_DIRS
        .iter()
        .map(|d| tree.join(d))
        .find(|d| d.join("start4.elf").is_file() || d.join("start.elf").is_file())
    else {
        bail!(
            "--boot rpi needs the Raspberry Pi firmware in the tree ({}): install Debian's \
             raspi-firmware (section non-free-firmware) into it, or deploy Raspberry Pi OS, whose \
             /boot/firmware has it",
            FIRMWARE_DIRS
                .iter()
                .map(|d| format!("/{d}/start*.elf"))
                .collect::<Vec<_>>()
                .join(" or ")
        );
    };
    let mut files = files_in(&fw_dir, is_firmware)?;
    // Device trees: beside the firmware (Raspberry Pi OS), else the
    // kernel's (Debian: usr/lib/linux-image-<version>/broadcom/).
    let mut dtbs = files_in(&fw_dir, is_pi_dtb)?;
    let mut overlays = files_in(&fw_dir.join("overlays"), |n| n.ends_with(".dtbo"))?;
    if dtbs.is_empty() {
        let mut kernels: Vec<PathBuf> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(tree.join("usr/lib")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(v) = n.strip_prefix("linux-image-") {
                    if kernel_version.is_none_or(|k| k == v) {
                        kernels.push(e.path());
                    }
                }
            }
        }
        kernels.sort();
        if let Some(k) = kernels.last() {
            dtbs = files_in(&k.join("broadcom"), is_pi_dtb)?;
            if overlays.is_empty() {
                overlays = files_in(&k.join("overlays"), |n| n.ends_with(".dtbo"))?;
            }
        }
    }
    if dtbs.is_empty() {
        bail!(
            "--boot rpi found no Raspberry Pi device trees (bcm27*.dtb, bcm283*.dtb) in the tree, neither in {} \
             nor in /usr/lib/linux-image-*/broadcom/: install a kernel that has them (Debian's \
             linux-image-arm64; linux-image-cloud-arm64 has none)",
            fw_dir.display()
        );
    }
    let uboot = tree.join(UBOOT_BIN);
    if !uboot.is_file() {
        bail!(
            "--boot rpi needs U-Boot for the Pi in the tree (/{UBOOT_BIN}): install Debian's \
             u-boot-rpi into it"
        );
    }
    files.extend(dtbs);
    files.extend(
        overlays
            .into_iter()
            .map(|(p, n)| (p, format!("overlays/{n}"))),
    );
    files.push((uboot, UBOOT_NAME.to_string()));
    Ok(Firmware { files })
}

/// Writes the firmware and config.txt onto the boot partition at `part`
/// of `disk` (a new disk: nothing boots from it yet). Refuses, before
/// writing, when they do not fit with `reserve` bytes left for the
/// version's kernel files.
pub fn install(disk: &Path, part: (u64, u64), fw: &Firmware, reserve: u64) -> Result<()> {
    let dirs: Vec<&str> = if fw.files.iter().any(|(_, n)| n.starts_with("overlays/")) {
        vec!["overlays"]
    } else {
        Vec::new()
    };
    fat::with_dirs(disk, part, &dirs, |p| {
        let need: u64 = fw
            .files
            .iter()
            .map(|(src, _)| std::fs::metadata(src).map(|m| p.allocated(m.len())))
            .sum::<std::io::Result<u64>>()?
            + reserve;
        let free = p.free_bytes()?;
        if need > free {
            bail!(
                "the Raspberry Pi firmware, device trees and U-Boot ({}) and the version's kernel \
                 files do not fit on the {} boot partition ({} free): remove unneeded files from \
                 the tree's firmware folder",
                crate::util::units::format_size(need - reserve),
                crate::util::units::format_size(part.1),
                crate::util::units::format_size(free)
            );
        }
        for (src, name) in &fw.files {
            p.copy_from(name, src)?;
        }
        p.write(CONFIG_TXT, config_txt().as_bytes())?;
        p.sync()
    })
}

/// What `deploy check` finds wrong with the Pi boot files on the boot
/// partition at `part` of `disk`: None when it has no `config.txt` (not a
/// `--boot rpi` disk).
pub fn inspect(disk: &Path, part: (u64, u64)) -> Result<Option<Vec<String>>> {
    let p = fat::FatPartition::open(disk, part.0, part.1, false)?;
    let Some(config) = p.read(CONFIG_TXT)? else {
        return Ok(None);
    };
    Ok(Some(config_problems(
        &String::from_utf8_lossy(&config),
        &p.list("")?
            .into_iter()
            .filter(|e| !e.is_dir)
            .map(|e| (e.name, e.len))
            .collect::<Vec<_>>(),
    )))
}

/// Problems of a `config.txt` beside the files `root` (name, size) of the
/// partition's top folder.
fn config_problems(config: &str, root: &[(String, u64)]) -> Vec<String> {
    let mut problems = Vec::new();
    let has = |n: &str| {
        root.iter()
            .any(|(f, len)| f.eq_ignore_ascii_case(n) && *len > 0)
    };
    let value = |key: &str| {
        config
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .next_back()
    };
    if value("arm_64bit").as_deref() != Some("1") {
        problems.push(
            "config.txt lacks arm_64bit=1: the Pi firmware would start U-Boot in 32-bit mode"
                .to_string(),
        );
    }
    match value("kernel") {
        None => problems.push(
            "config.txt names no kernel=: the Pi firmware would not start U-Boot".to_string(),
        ),
        Some(k) if !has(&k) => problems.push(format!(
            "config.txt says kernel={k}, which is not on the boot partition: the Pi would not boot"
        )),
        Some(_) => {}
    }
    let any = |pre: &str, suf: &str| {
        root.iter()
            .any(|(f, len)| f.starts_with(pre) && f.ends_with(suf) && *len > 0)
    };
    if !any("start", ".elf") || !any("fixup", ".dat") {
        problems.push(
            "the boot partition has config.txt but no Pi firmware (start*.elf and fixup*.dat)"
                .to_string(),
        );
    }
    if !root.iter().any(|(f, _)| is_pi_dtb(f)) {
        problems.push(
            "the boot partition has no Raspberry Pi device tree (bcm27*.dtb, bcm283*.dtb)"
                .to_string(),
        );
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_debian_firmware_kernel_device_trees_and_uboot() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        let put = |rel: &str| {
            let p = t.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, rel).unwrap();
        };
        let err = find(t, None).unwrap_err().to_string();
        assert!(err.contains("raspi-firmware"), "{err}");
        for f in [
            "start4.elf",
            "fixup4.dat",
            "bootcode.bin",
            "LICENCE.broadcom",
        ] {
            put(&format!("usr/lib/raspi-firmware/{f}"));
        }
        let err = find(t, None).unwrap_err().to_string();
        assert!(err.contains("device trees"), "{err}");
        put("usr/lib/linux-image-6.1.0-1-arm64/broadcom/bcm2711-rpi-4-b.dtb");
        put("usr/lib/linux-image-6.1.0-1-arm64/broadcom/bcm2837-rpi-3-b.dtb");
        put("usr/lib/linux-image-6.1.0-1-arm64/broadcom/other.dtb");
        put("usr/lib/linux-image-6.1.0-1-arm64/overlays/x.dtbo");
        let err = find(t, None).unwrap_err().to_string();
        assert!(err.contains("u-boot-rpi"), "{err}");
        put(UBOOT_BIN);
        let fw = find(t, Some("6.1.0-1-arm64")).unwrap();
        let names: Vec<&str> = fw.files.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "bootcode.bin",
                "fixup4.dat",
                "start4.elf",
                "bcm2711-rpi-4-b.dtb",
                "bcm2837-rpi-3-b.dtb",
                "overlays/x.dtbo",
                "u-boot.bin"
            ]
        );
        // Another kernel version's device trees are not taken.
        let err = find(t, Some("6.9")).unwrap_err().to_string();
        assert!(err.contains("device trees"), "{err}");
        assert!(config_txt().contains("kernel=u-boot.bin\n"));
        let root = |names: &[&str]| -> Vec<(String, u64)> {
            names.iter().map(|n| (n.to_string(), 1)).collect()
        };
        let full = root(&[
            "start4.elf",
            "fixup4.dat",
            "u-boot.bin",
            "bcm2711-rpi-4-b.dtb",
        ]);
        assert!(config_problems(&config_txt(), &full).is_empty());
        let p = config_problems(&config_txt(), &full[..2]);
        assert!(
            p.iter()
                .any(|m| m.contains("kernel=u-boot.bin, which is not")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("device tree")), "{p:?}");
        let p = config_problems("kernel=u-boot.bin # ours\n", &full);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("arm_64bit=1"));
        let p = config_problems(&config_txt(), &full[2..]);
        assert!(p.iter().any(|m| m.contains("no Pi firmware")), "{p:?}");
        assert!(config_txt().contains("arm_64bit=1\n"));
    }
}
