//! The SYSLINUX backend: `extlinux.conf` rendered from `templates/`, written
//! atomically, and SYSLINUX installed into `/extlinux` of the top level.

use crate::store::layout::{self, Layout};
use crate::util::cmd;
use crate::util::fsutil;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// The template, compiled into the binary so an installed `deploy` needs no data files.
const TEMPLATE: &str = include_str!("../../templates/extlinux.conf.tera");

/// Kernel arguments used when none are given: the last `console=` becomes
/// /dev/console, so a headless box or a boot test reads the serial line.
pub const DEFAULT_KERNEL_ARGS: &str = "console=tty0 console=ttyS0,115200";

/// Boot prompt timeout, in tenths of a second.
pub const PROMPT_TIMEOUT: u32 = 30;

/// One boot menu entry.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Version label (also the menu label).
    pub label: String,
    /// Whether the version has an initramfs.
    pub initramfs: bool,
    /// Whether the version has a device tree.
    pub dtb: bool,
    /// Kernel arguments after the root= part.
    pub args: String,
}

/// Renders the configuration for `entries`, whose default is `default_label`.
pub fn render(fs_uuid: &str, entries: &[Entry], default_label: &str) -> Result<String> {
    let default = entries
        .iter()
        .find(|e| e.label == default_label)
        .with_context(|| format!("default version {default_label} has no boot entry"))?;
    let mut ctx = tera::Context::new();
    ctx.insert("fs_uuid", fs_uuid);
    ctx.insert("versions", entries);
    ctx.insert("default_label", default_label);
    ctx.insert("default_initramfs", &default.initramfs);
    ctx.insert("default_dtb", &default.dtb);
    ctx.insert("default_args", &default.args);
    ctx.insert("timeout", &PROMPT_TIMEOUT);
    tera::Tera::one_off(TEMPLATE, &ctx, false).context("rendering templates/extlinux.conf.tera")
}

/// Writes the configuration durably (temp file, fsync, rename, directory
/// fsync) and the top-level `extlinux.conf` compatibility symlink.
pub fn write_config(layout: &Layout, content: &str) -> Result<()> {
    let dir = layout.extlinux_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fsutil::write_atomic(&layout.extlinux_conf(), content.as_bytes(), 0o644)?;
    let link = layout.top.join(layout::EXTLINUX_CONF_LINK);
    if std::fs::symlink_metadata(&link).is_err() {
        let target = Path::new(layout::EXTLINUX_DIR).join(layout::EXTLINUX_CONF);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("creating symlink {}", link.display()))?;
    }
    Ok(())
}

/// Installs SYSLINUX's boot sector and `ldlinux.sys` for the filesystem
/// mounted at `layout.top`.
pub fn install(layout: &Layout) -> Result<()> {
    let dir = layout.extlinux_dir();
    cmd::run("extlinux", &["--install", &dir.to_string_lossy()])
        .with_context(|| format!("installing SYSLINUX into {}", dir.display()))?;
    Ok(())
}

/// The SYSLINUX backend: `extlinux.conf` on the Btrfs (always: U-Boot and
/// `check` read it too) and, for disks that boot under BIOS, SYSLINUX
/// installed into the Btrfs's boot area.
pub struct Extlinux {
    /// Whether to install SYSLINUX (false on `uefi` disks).
    pub install_boot_code: bool,
}

impl super::Backend for Extlinux {
    fn write_menu(
        &self,
        top: &Layout,
        fs_uuid: &str,
        entries: &[Entry],
        default: &str,
    ) -> Result<()> {
        write_config(top, &render(fs_uuid, entries, default)?)
    }

    fn install(&self, top: &Layout) -> Result<()> {
        // On Btrfs ldlinux.sys lives in the boot area; ldlinux.c32 is the file it installs.
        if self.install_boot_code && !top.extlinux_dir().join("ldlinux.c32").exists() {
            install(top)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(label: &str, initramfs: bool) -> Entry {
        Entry {
            label: label.into(),
            initramfs,
            dtb: false,
            args: DEFAULT_KERNEL_ARGS.into(),
        }
    }

    #[test]
    fn renders_default_and_one_entry_per_version() {
        let conf = render("1234", &[entry("factory", true), entry("v2", false)], "v2").unwrap();
        assert!(conf.starts_with("# Written by btrfs-deploy"));
        assert!(conf.contains("\nserial 0 115200\n"));
        assert!(conf.contains("\ndefault default\n"));
        assert!(conf.contains("label default\n  # the default version (v2)"));
        assert!(conf
            .contains("rootflags=subvol=systems/default/run rw console=tty0 console=ttyS0,115200"));
        assert!(conf.contains("label factory\n  kernel /systems/factory/kernel\n  initrd /systems/factory/initramfs\n"));
        assert!(conf.contains("label v2\n  kernel /systems/v2/kernel\n  append root=UUID=1234"));
        assert!(conf.contains("say   v2   (default)"));
        assert!(!conf.contains("say   factory   (default)"));
        // The default entry of v2 has no initramfs either.
        assert!(!conf.contains("initrd /systems/default/initramfs"));
    }

    #[test]
    fn default_must_have_an_entry() {
        assert!(render("u", &[entry("a", true)], "b").is_err());
    }
}
