//! The SYSLINUX backend: `extlinux.conf` rendered from `templates/`, written
//! atomically, and SYSLINUX installed into `/extlinux` of the top level.

use crate::store::layout::{self, Layout};
use crate::util::cmd;
use crate::util::fsutil;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// The templates, compiled into the binary so an installed `deploy` needs no
/// data files: the menu, and each version's `default` entry.
const TEMPLATE: &str = include_str!("../../templates/extlinux.conf.tera");
const DEFAULT_ENTRY_TEMPLATE: &str = include_str!("../../templates/extlinux-default.conf.tera");

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

/// Renders the menu for `entries`: one entry per version, and the
/// `default` entry included from `/systems/default/default-entry.conf`.
/// Nothing in it depends on which version is the default.
pub fn render(fs_uuid: &str, entries: &[Entry]) -> Result<String> {
    let mut ctx = tera::Context::new();
    ctx.insert("fs_uuid", fs_uuid);
    ctx.insert("versions", entries);
    ctx.insert("entry_file", layout::DEFAULT_ENTRY);
    ctx.insert("timeout", &PROMPT_TIMEOUT);
    tera::Tera::one_off(TEMPLATE, &ctx, false).context("rendering templates/extlinux.conf.tera")
}

/// Renders version `v`'s `default` entry (kernel, initramfs and dtb through
/// `systems/default`, `v`'s kernel arguments).
pub fn render_default_entry(fs_uuid: &str, v: &Entry) -> Result<String> {
    let mut ctx = tera::Context::new();
    ctx.insert("fs_uuid", fs_uuid);
    ctx.insert("v", v);
    ctx.insert("entry_file", layout::DEFAULT_ENTRY);
    tera::Tera::one_off(DEFAULT_ENTRY_TEMPLATE, &ctx, false)
        .context("rendering templates/extlinux-default.conf.tera")
}

/// Writes version `v`'s `default` entry into `systems/<label>/` durably,
/// unless it is already there with this content.
pub fn write_default_entry(layout: &Layout, fs_uuid: &str, v: &Entry) -> Result<()> {
    let path = layout.version(&v.label).join(layout::DEFAULT_ENTRY);
    let content = render_default_entry(fs_uuid, v)?;
    if std::fs::read_to_string(&path).is_ok_and(|c| c == content) {
        return Ok(());
    }
    fsutil::write_atomic(&path, content.as_bytes(), 0o644)
}

/// `conf` with each `include /PATH` line replaced by the file's content read
/// below `top` (symlinks such as `systems/default` followed, as SYSLINUX
/// does); an unreadable include becomes a `# include ... missing` line.
pub fn expand_includes(conf: &str, top: &Path) -> String {
    let mut out = String::new();
    for line in conf.lines() {
        let t = line.trim();
        let inc = t
            .split_once(char::is_whitespace)
            .filter(|(k, _)| k.eq_ignore_ascii_case("include"))
            .map(|(_, p)| p.trim().trim_start_matches('/'));
        match inc {
            Some(rel) => match std::fs::read_to_string(top.join(rel)) {
                Ok(text) => {
                    out.push_str(&text);
                    if !text.ends_with('\n') {
                        out.push('\n');
                    }
                }
                Err(e) => out.push_str(&format!("# include /{rel} missing ({e})\n")),
            },
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
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
        _default: &str,
    ) -> Result<()> {
        // Nothing here names the default: it is reached through
        // systems/default, and each version has its own default entry.
        for e in entries {
            write_default_entry(top, fs_uuid, e)?;
        }
        write_config(top, &render(fs_uuid, entries)?)
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
    fn renders_one_entry_per_version_and_includes_the_default_entry() {
        let conf = render("1234", &[entry("factory", true), entry("v2", false)]).unwrap();
        assert!(conf.starts_with("# Written by btrfs-deploy"));
        assert!(conf.contains("\nserial 0 115200\n"));
        assert!(conf.contains("\ndefault default\n"));
        assert!(conf.contains("\ninclude /systems/default/default-entry.conf\n"));
        assert!(!conf.contains("label default"), "{conf}");
        assert!(conf.contains("label factory\n  kernel /systems/factory/kernel\n  initrd /systems/factory/initramfs\n"));
        assert!(conf.contains("label v2\n  kernel /systems/v2/kernel\n  append root=UUID=1234"));
        assert!(conf.contains("say   v2\n"));
        assert!(!conf.contains("(default)"));
    }

    #[test]
    fn the_default_entry_follows_its_version() {
        let e = render_default_entry("1234", &entry("v2", false)).unwrap();
        assert!(e.contains("label default\n  kernel /systems/default/kernel\n  append root=UUID=1234 rootfstype=btrfs rootflags=subvol=systems/default/run rw console=tty0 console=ttyS0,115200\n"), "{e}");
        assert!(!e.contains("initrd"), "v2 has no initramfs: {e}");
        let e = render_default_entry("1234", &entry("factory", true)).unwrap();
        assert!(e.contains("  initrd /systems/default/initramfs\n"), "{e}");
    }

    #[test]
    fn includes_are_expanded_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("systems/v2")).unwrap();
        std::os::unix::fs::symlink("v2", d.path().join("systems/default")).unwrap();
        std::fs::write(
            d.path().join("systems/v2/default-entry.conf"),
            "label default\n",
        )
        .unwrap();
        let x = expand_includes(
            "a\ninclude /systems/default/default-entry.conf\nb\n",
            d.path(),
        );
        assert_eq!(x, "a\nlabel default\nb\n");
        let x = expand_includes("INCLUDE /nope.conf\n", d.path());
        assert!(x.starts_with("# include /nope.conf missing"), "{x}");
    }
}
