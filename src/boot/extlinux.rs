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
    /// Whether the root is mounted `ro` (root modes `ro` and `volatile`)
    /// rather than `rw`.
    pub ro: bool,
}

impl Entry {
    /// `ro` or `rw`, for the kernel command line.
    pub fn rw_flag(&self) -> &'static str {
        if self.ro {
            "ro"
        } else {
            "rw"
        }
    }
}

/// Renders the menu for `entries`: one entry per version, and the
/// `default` entry included from `/systems/default/default-entry.conf`.
/// Nothing in it depends on which version is the default.
pub fn render(fs_uuid: &str, entries: &[Entry], trial: Option<&Entry>) -> Result<String> {
    let mut ctx = tera::Context::new();
    ctx.insert("fs_uuid", fs_uuid);
    ctx.insert("versions", entries);
    ctx.insert("trial", &trial);
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
    /// Where SYSLINUX's ADV is read: the disk and the byte offset of the
    /// Btrfs on it (when SYSLINUX is installed).
    pub adv: Option<(std::path::PathBuf, u64)>,
}

/// Byte offsets, from the start of the Btrfs, of the two copies of the ADV
/// (SYSLINUX's auxiliary data vector) that `extlinux --install` reserves in
/// the Btrfs boot area (its first 64 KiB, which Btrfs leaves unused).
const ADV_OFFSETS: [u64; 2] = [0xfc00, 0xfe00];
const ADV_MAGIC1: u32 = 0x5a2d_2fa5;
const ADV_MAGIC2: u32 = 0xa304_1767;
const ADV_MAGIC3: u32 = 0xdd28_bf64;
/// The ADV record holding the one-shot label (`extlinux --once`).
const ADV_BOOTONCE: u8 = 1;

/// The one-shot label in an ADV sector, if the sector is valid: magic, a
/// checksum that makes the 32-bit words after the first sum to MAGIC2,
/// then tag/length/value records up to a zero tag.
pub fn adv_bootonce(sector: &[u8]) -> Option<Option<String>> {
    let word = |i: usize| u32::from_le_bytes(sector[i..i + 4].try_into().unwrap());
    if sector.len() != 512 || word(0) != ADV_MAGIC1 || word(508) != ADV_MAGIC3 {
        return None;
    }
    let sum = (1..127).fold(0u32, |acc, i| acc.wrapping_add(word(i * 4)));
    if sum != ADV_MAGIC2 {
        return None;
    }
    let data = &sector[8..508];
    let mut i = 0;
    while i + 2 <= data.len() && data[i] != 0 {
        let (tag, len) = (data[i], data[i + 1] as usize);
        let value = data.get(i + 2..i + 2 + len)?;
        if tag == ADV_BOOTONCE {
            return Some(Some(String::from_utf8_lossy(value).into_owned()));
        }
        i += 2 + len;
    }
    Some(None)
}

impl Extlinux {
    /// The one-shot label SYSLINUX will boot next, read from the first
    /// valid ADV copy (as SYSLINUX does); `None` when none is set.
    fn read_bootonce(&self) -> Result<Option<String>> {
        use std::os::unix::fs::FileExt;
        let Some((disk, start)) = &self.adv else {
            return Ok(None);
        };
        let f = std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
        for off in ADV_OFFSETS {
            let mut sector = [0u8; 512];
            f.read_exact_at(&mut sector, start + off)
                .with_context(|| format!("reading SYSLINUX's ADV on {}", disk.display()))?;
            if let Some(once) = adv_bootonce(&sector) {
                return Ok(once);
            }
        }
        Ok(None)
    }

    /// Runs `extlinux ARG DIR` on the mounted Btrfs and flushes the disk.
    fn extlinux_adv(&self, top: &Layout, arg: &str) -> Result<()> {
        let dir = top.extlinux_dir();
        cmd::run("extlinux", &[arg, &dir.to_string_lossy()])
            .with_context(|| format!("writing SYSLINUX's ADV ({arg})"))?;
        if let Some((disk, _)) = &self.adv {
            std::fs::File::open(disk)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("flushing {}", disk.display()))?;
        }
        Ok(())
    }
}

impl super::Backend for Extlinux {
    fn write_menu(
        &self,
        top: &Layout,
        fs_uuid: &str,
        entries: &[Entry],
        _default: &str,
        trial: Option<&Entry>,
    ) -> Result<()> {
        // Nothing here names the default: it is reached through
        // systems/default, and each version has its own default entry.
        for e in entries {
            write_default_entry(top, fs_uuid, e)?;
        }
        write_config(top, &render(fs_uuid, entries, trial)?)
    }

    fn can_trial(&self) -> bool {
        self.adv.is_some()
    }

    fn arm_trial(&self, top: &Layout, _: &str, _: &Entry, _: &Entry) -> Result<()> {
        self.extlinux_adv(top, &format!("--once={}", crate::store::trial::MENU_LABEL))?;
        // Read back: a SYSLINUX that kept its ADV elsewhere would never
        // start the trial, and the version would look failed.
        if self.read_bootonce()?.as_deref() != Some(crate::store::trial::MENU_LABEL) {
            anyhow::bail!(
                "extlinux --once did not leave the one-shot boot in SYSLINUX's ADV where \
                 this tool reads it (offsets {:#x}/{:#x} of the Btrfs): is this SYSLINUX 6?",
                ADV_OFFSETS[0],
                ADV_OFFSETS[1]
            );
        }
        Ok(())
    }

    fn trial_armed(&self, _top: &Layout) -> Result<bool> {
        Ok(self.read_bootonce()?.as_deref() == Some(crate::store::trial::MENU_LABEL))
    }

    fn disarm_trial(&self, top: &Layout) -> Result<()> {
        if self.read_bootonce()?.is_some() {
            self.extlinux_adv(top, "--clear-once")?;
        }
        Ok(())
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
            ro: false,
        }
    }

    #[test]
    fn renders_one_entry_per_version_and_includes_the_default_entry() {
        let conf = render("1234", &[entry("factory", true), entry("v2", false)], None).unwrap();
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

    /// An ADV sector as `extlinux --once=factory` wrote it on a Btrfs here
    /// (its checksum copied from that disk).
    fn real_adv_sector() -> Vec<u8> {
        let mut s = vec![0u8; 512];
        s[0..4].copy_from_slice(&ADV_MAGIC1.to_le_bytes());
        s[4..8].copy_from_slice(&[0x8a, 0x9b, 0x2e, 0xcf]);
        s[8..10].copy_from_slice(&[ADV_BOOTONCE, 7]);
        s[10..17].copy_from_slice(b"factory");
        s[508..512].copy_from_slice(&ADV_MAGIC3.to_le_bytes());
        s
    }

    #[test]
    fn reads_the_one_shot_label_from_a_valid_adv_only() {
        let s = real_adv_sector();
        assert_eq!(adv_bootonce(&s), Some(Some("factory".to_string())));
        // A torn write (checksum no longer matching) is not trusted.
        let mut torn = s.clone();
        torn[12] ^= 1;
        assert_eq!(adv_bootonce(&torn), None);
        let mut no_magic = s.clone();
        no_magic[0] = 0;
        assert_eq!(adv_bootonce(&no_magic), None);
        // An ADV without the record: valid, nothing armed.
        let mut empty = vec![0u8; 512];
        empty[0..4].copy_from_slice(&ADV_MAGIC1.to_le_bytes());
        empty[4..8].copy_from_slice(&ADV_MAGIC2.to_le_bytes());
        empty[508..512].copy_from_slice(&ADV_MAGIC3.to_le_bytes());
        assert_eq!(adv_bootonce(&empty), Some(None));
    }

    #[test]
    fn the_trial_entry_is_in_the_menu_only_while_a_trial_is_pending() {
        let mut t = entry("v3", true);
        t.args = crate::store::trial::entry_args(&t.args, "v3");
        let conf = render("1234", &[entry("v2", true), entry("v3", true)], Some(&t)).unwrap();
        assert!(
            conf.contains("label trial\n  kernel /systems/v3/kernel\n  initrd /systems/v3/initramfs\n  append root=UUID=1234 rootfstype=btrfs rootflags=subvol=systems/v3/run rw console=tty0 console=ttyS0,115200 panic=10 btrfs_deploy.trial=v3\n"),
            "{conf}"
        );
        let conf = render("1234", &[entry("v2", true)], None).unwrap();
        assert!(!conf.contains("label trial"), "{conf}");
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
