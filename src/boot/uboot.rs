//! The U-Boot backend: a FAT boot partition (partition 1 of a GPT disk,
//! legacy-BIOS-bootable so U-Boot's distro boot scans it first) holding
//! the menu U-Boot reads, `boot/extlinux/extlinux.conf`, and each version's
//! kernel, initramfs and device trees (U-Boot has no Btrfs driver here,
//! and FAT has no symlinks: nothing can be reached through
//! `systems/default`). Written from user space with [`super::fat`].
//!
//! On the boot partition:
//! ```text
//! boot.scr                           the trial script (U-Boot script image of templates/uboot-trial.cmd)
//! boot/extlinux/extlinux.conf        `default <label>` + `include` of the menu: exactly 511 bytes, one sector
//! btrfs-deploy/trial.conf            during a trial: a menu whose default is the version on trial
//! btrfs-deploy/trial-once            during a trial: the one-shot mark (empty)
//! btrfs-deploy/menu-<N>.conf         the entries, one per version (N grows with each change)
//! btrfs-deploy/<hash>.linux          a kernel, named by its content (SHA-256, 16 hex digits)
//! btrfs-deploy/<hash>.initrd         an initramfs, likewise
//! btrfs-deploy/<hash>.dtb            a device tree (--dtb), likewise
//! btrfs-deploy/<label>.dtbs/         the device trees a version's rootfs ships (usr/lib/linux-image-<ver>/), for `fdtdir`
//! ```
//!
//! Kernel files are content-addressed as on the ESP: versions whose kernel
//! did not change share one copy, which stays while a menu entry names it.
//! (Disks written before this named them `<label>.linux` etc.; their menus
//! name those files, which are kept and removed the same way.)
//!
//! Power cuts: a version's files are written under temporary names and
//! renamed; a changed menu is written as a new file `menu-<N+1>.conf`
//! (never over the one in use); then `extlinux.conf`, which always has
//! exactly [`CONF_SIZE`] bytes (one sector in one cluster), is rewritten in
//! place to name the new menu and the default: one sector write, which
//! disks perform atomically, so U-Boot reads either the old menu and
//! default or the new ones, and every file either names is complete.
//! Only then are the old menu and files of removed versions deleted. What
//! an interruption leaves is unreferenced and removed by `cleanup`.
//!
//! Trials (`--trial`): Debian's U-Boot has no boot counting, but its distro
//! boot runs `/boot.scr` when the partition has no `/extlinux/extlinux.conf`
//! (it tries the menu before the script for each prefix, `/` then `/boot/`,
//! which is why the menu lives in `/boot/extlinux/`). The script deletes
//! `btrfs-deploy/trial-once` with `fatrm` and, when that worked, boots the
//! menu of `trial.conf`; otherwise it boots `/boot/extlinux/extlinux.conf`,
//! which distro boot also finds by itself if the script fails. Arming
//! writes `trial.conf` (temp name, renamed), then the empty mark; disarming
//! removes the mark first.

use super::fat::FatPartition;
use super::{Backend, Entry};
use crate::store::deployment::Deployment;
use crate::store::layout::{self, Layout};
use crate::util::units;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The menu U-Boot's distro boot looks for on the boot partition.
pub const CONF: &str = "boot/extlinux/extlinux.conf";
/// The trial script, where distro boot looks for it.
pub const SCRIPT: &str = "boot.scr";
/// The menu of a trial boot.
pub const TRIAL_CONF: &str = "btrfs-deploy/trial.conf";
/// The one-shot mark the script deletes before booting `TRIAL_CONF`.
pub const TRIAL_ONCE: &str = "btrfs-deploy/trial-once";
/// Directory of the versions' files and of the menus.
pub const VERSIONS_DIR: &str = "btrfs-deploy";
/// The directories of the boot partition, parents first.
pub const DIRS: [&str; 3] = ["boot", "boot/extlinux", VERSIONS_DIR];
/// Size of `extlinux.conf`: within one sector, so a switch is one sector
/// write. Not a multiple of 4: U-Boot 2023.01 loads an included file at the
/// end of the including one rounded up to 4 bytes, so a file whose length
/// is a multiple of 4 loses its terminating NUL and its parser runs on into
/// the included text, listing every entry twice.
pub const CONF_SIZE: usize = 511;
/// Suffix of a version's kernel.
pub const KERNEL: &str = ".linux";
/// Suffix of a version's initramfs.
pub const INITRD: &str = ".initrd";
/// Suffix of a version's device tree (`--dtb`).
pub const DTB: &str = ".dtb";
/// Suffix of the directory of a version's device trees (`fdtdir`).
pub const DTBS: &str = ".dtbs";
/// Prefix and suffix of the menu files.
const MENU_PREFIX: &str = "menu-";
const MENU_SUFFIX: &str = ".conf";
/// Suffix of files being written.
const TMP: &str = super::fat::TMP_SUFFIX;
/// Room for directory entries and the menu, on top of a version's files.
const ENTRY_OVERHEAD: u64 = 64 << 10;
/// U-Boot's menu timeout, in tenths of a second.
pub const TIMEOUT: u32 = 20;

/// Where Debian's kernel packages put the device trees of kernel `ver`,
/// relative to the rootfs.
pub fn dtb_dir(ver: &str) -> PathBuf {
    Path::new("usr/lib").join(format!("linux-image-{ver}"))
}

/// `extlinux.conf` naming `default` and the menu file `menu`, padded to
/// [`CONF_SIZE`]. Fails when the names do not fit (labels are at most 64
/// characters, so they always do).
pub fn render_conf(default: &str, menu: &str) -> Result<Vec<u8>> {
    let mut s = format!(
        "# Written by btrfs-deploy: the default version and the menu. Rewritten\n\
         # in place (one sector) to switch; do not edit.\n\
         timeout {TIMEOUT}\n\
         menu title btrfs-deploy\n\
         default {default}\n\
         include /{VERSIONS_DIR}/{menu}\n"
    );
    if s.len() + 1 > CONF_SIZE {
        bail!("the U-Boot menu header for {default} does not fit in {CONF_SIZE} bytes");
    }
    // Padding in short comment lines.
    while s.len() < CONF_SIZE {
        let n = (CONF_SIZE - s.len()).min(64);
        s.push_str(&"#".repeat(n - 1));
        s.push('\n');
    }
    Ok(s.into_bytes())
}

/// The default and the menu file named by an `extlinux.conf`.
pub fn parse_conf(conf: &str) -> (Option<String>, Option<String>) {
    let word = |key: &str| {
        conf.lines().find_map(|l| {
            let (k, v) = l.trim().split_once(char::is_whitespace)?;
            k.eq_ignore_ascii_case(key).then(|| v.trim().to_string())
        })
    };
    let menu = word("include").map(|p| {
        p.trim_start_matches('/')
            .trim_start_matches(VERSIONS_DIR)
            .trim_start_matches('/')
            .to_string()
    });
    (word("default"), menu)
}

/// How one version boots: its files on the boot partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MenuEntry {
    /// The version's label.
    pub label: String,
    /// Its kernel's name in `btrfs-deploy/`.
    pub kernel: String,
    /// Its initramfs's name, if it has one.
    pub initrd: Option<String>,
    /// `fdt`: the name of a single device tree (`--dtb`).
    pub dtb: Option<String>,
    /// `fdtdir`: the device trees of the rootfs (`<label>.dtbs`).
    pub dtbs: bool,
    /// Kernel arguments after the root= part.
    pub args: String,
    /// `ro` or `rw` (the version's root mode).
    pub rw_flag: &'static str,
}

/// The menu: one entry per version.
pub fn render_menu(fs_uuid: &str, entries: &[MenuEntry]) -> String {
    let mut s = String::from(
        "# Written by btrfs-deploy: one entry per version; extlinux.conf includes\n\
         # this file and names the default.\n",
    );
    for e in entries {
        let l = &e.label;
        s.push_str(&format!(
            "\nlabel {l}\n  menu label {l} (btrfs-deploy)\n  kernel /{VERSIONS_DIR}/{}\n",
            e.kernel
        ));
        if let Some(i) = &e.initrd {
            s.push_str(&format!("  initrd /{VERSIONS_DIR}/{i}\n"));
        }
        if let Some(d) = &e.dtb {
            s.push_str(&format!("  fdt /{VERSIONS_DIR}/{d}\n"));
        } else if e.dtbs {
            s.push_str(&format!("  fdtdir /{VERSIONS_DIR}/{l}{DTBS}\n"));
        }
        s.push_str(&format!(
            "  append root=UUID={fs_uuid} rootfstype=btrfs rootflags=subvol=systems/{l}/run {} {}\n",
            e.rw_flag, e.args
        ));
    }
    s
}

/// The files of `btrfs-deploy/` a menu names (`kernel`, `initrd`, `fdt`,
/// `fdtdir`), by entry label, in the order written.
fn menu_files(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("label"), Some(l)) => out.push((l.to_string(), Vec::new())),
            (Some("kernel" | "initrd" | "fdt" | "fdtdir"), Some(p)) => {
                if let (Some((_, files)), Some(name)) = (
                    out.last_mut(),
                    p.trim_start_matches('/')
                        .strip_prefix(VERSIONS_DIR)
                        .and_then(|r| r.strip_prefix('/')),
                ) {
                    files.push(name.to_string());
                }
            }
            _ => {}
        }
    }
    out
}

fn menu_number(name: &str) -> Option<u64> {
    name.strip_prefix(MENU_PREFIX)?
        .strip_suffix(MENU_SUFFIX)?
        .parse()
        .ok()
}

/// Whether `name` is a content-addressed kernel file (`<16 hex digits>.linux`,
/// `.initrd` or `.dtb`).
fn is_content_name(name: &str) -> bool {
    super::fat::is_content_name(name, &[KERNEL, INITRD, DTB])
}

/// The version label of a file or directory in `btrfs-deploy/`.
pub fn file_label(name: &str) -> Option<&str> {
    [KERNEL, INITRD, DTB, DTBS]
        .iter()
        .find_map(|sfx| name.strip_suffix(sfx))
        .filter(|l| !l.is_empty())
}

/// A file or directory of a version to put on the boot partition: (source
/// on the Btrfs, name in `btrfs-deploy/`, whether it is a directory).
type VersionFile = (PathBuf, String, bool);

/// Regular files (relative path, size) and directories below a directory.
type Tree = (Vec<(String, u64)>, Vec<String>);

/// The menu entry of version `e` and its files to put on the boot partition.
/// Kernel, initramfs and `--dtb` are named by their content; the names the
/// menu in use (`current`, from [`UBoot::current_files`]) gives this version
/// are kept when those files are there with the same sizes, since a version's files never change and need
/// not be hashed again.
fn version_files(
    top: &Layout,
    e: &Entry,
    fat: &FatPartition,
    current: &[(String, Vec<String>)],
) -> Result<(MenuEntry, Vec<VersionFile>)> {
    let dir = top.version(&e.label);
    let current: &[String] = current
        .iter()
        .find(|(l, _)| *l == e.label)
        .map(|(_, f)| f.as_slice())
        .unwrap_or_default();
    let name_of = |src: &Path, suffix: &str| -> Result<String> {
        let len = file_len(src)?;
        for n in current.iter().filter(|n| n.ends_with(suffix)) {
            if fat.file_len(&format!("{VERSIONS_DIR}/{n}"))? == Some(len) {
                return Ok(n.clone());
            }
        }
        super::fat::content_name(src, suffix)
    };
    let kernel_src = dir.join(layout::KERNEL);
    let kernel = name_of(&kernel_src, KERNEL)?;
    let mut files = vec![(kernel_src, kernel.clone(), false)];
    let mut initrd = None;
    if e.initramfs {
        let src = dir.join(layout::INITRAMFS);
        let n = name_of(&src, INITRD)?;
        files.push((src, n.clone(), false));
        initrd = Some(n);
    }
    let mut dtbs = false;
    let mut dtb = None;
    if e.dtb {
        let src = dir.join(layout::DTB);
        let n = name_of(&src, DTB)?;
        files.push((src, n.clone(), false));
        dtb = Some(n);
    } else {
        let record = Deployment::load(&dir.join(layout::DEPLOYMENT_JSON))?;
        if let Some(ver) = &record.kernel_version {
            let src = dir.join(layout::ORIG).join(dtb_dir(ver));
            if src.is_dir() && has_dtb(&src) {
                files.push((src, format!("{}{DTBS}", e.label), true));
                dtbs = true;
            }
        }
    }
    Ok((
        MenuEntry {
            label: e.label.clone(),
            kernel,
            initrd,
            dtb,
            dtbs,
            args: e.args.clone(),
            rw_flag: e.rw_flag(),
        },
        files,
    ))
}

/// Whether `dir` holds a `.dtb` file (one level of vendor directories deep).
fn has_dtb(dir: &Path) -> bool {
    walk(dir)
        .map(|(files, _)| files.iter().any(|(rel, _)| rel.ends_with(".dtb")))
        .unwrap_or(false)
}

/// Regular files (relative path, size) and directories (relative, parents
/// first) below `dir`; symlinks are not followed.
fn walk(dir: &Path) -> Result<Tree> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut todo = vec![String::new()];
    while let Some(rel) = todo.pop() {
        let abs = if rel.is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(&rel)
        };
        let mut names: Vec<_> = std::fs::read_dir(&abs)
            .with_context(|| format!("reading {}", abs.display()))?
            .collect::<std::io::Result<_>>()?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type()?;
            if ft.is_dir() {
                dirs.push(r.clone());
                todo.push(r);
            } else if ft.is_file() {
                files.push((r, e.metadata()?.len()));
            }
        }
    }
    dirs.sort();
    Ok((files, dirs))
}

/// U-Boot's boot partition at byte range `part` of `disk`.
pub struct UBoot {
    disk: PathBuf,
    part: (u64, u64),
}

impl UBoot {
    /// The backend for the boot partition at `part` (offset, size) of `disk`.
    pub fn new(disk: &Path, part: (u64, u64)) -> Self {
        UBoot {
            disk: disk.to_path_buf(),
            part,
        }
    }

    fn open(&self, write: bool) -> Result<FatPartition> {
        FatPartition::open(&self.disk, self.part.0, self.part.1, write)
    }

    /// Makes `dirs` where missing (with no partition open), then runs `f`
    /// on the partition opened for writing, closing (and syncing) it after.
    fn with_part<T>(
        &self,
        dirs: &[String],
        f: impl FnOnce(&FatPartition) -> Result<T>,
    ) -> Result<T> {
        let want: Vec<&str> = DIRS
            .iter()
            .copied()
            .chain(dirs.iter().map(String::as_str))
            .collect();
        super::fat::with_dirs(&self.disk, self.part, &want, f)
    }

    fn require_free(&self, fat: &FatPartition, label: &str, need: u64) -> Result<()> {
        let free = fat.free_bytes()?;
        if need > free {
            let hint = if super::fat::is_dirty(&self.disk, self.part.0)? {
                format!(
                    "; an interrupted write left space allocated there: run deploy cleanup {} first",
                    self.disk.display()
                )
            } else {
                String::new()
            };
            bail!(
                "the U-Boot boot partition of {} has {} free, but version {label} needs {} for its \
                 kernel, initramfs and device trees: remove old versions first (deploy remove LABEL {}), \
                 or use --keep N{hint}",
                self.disk.display(),
                units::format_size(free),
                units::format_size(need),
                self.disk.display()
            );
        }
        Ok(())
    }

    /// The menu file `extlinux.conf` names, and the default, if any.
    fn current(fat: &FatPartition) -> Result<(Option<String>, Option<String>)> {
        Ok(match fat.read(CONF)? {
            Some(c) => parse_conf(&String::from_utf8_lossy(&c)),
            None => (None, None),
        })
    }

    /// The files each entry of the menu in use names, by label.
    fn current_files(fat: &FatPartition) -> Result<Vec<(String, Vec<String>)>> {
        let (_, menu) = Self::current(fat)?;
        let Some(menu) = menu else {
            return Ok(Vec::new());
        };
        Ok(match fat.read(&format!("{VERSIONS_DIR}/{menu}"))? {
            Some(t) => menu_files(&String::from_utf8_lossy(&t)),
            None => Vec::new(),
        })
    }

    /// Every file of `btrfs-deploy/` that the menu in use or a trial's menu
    /// names (lowercase: FAT names are case-insensitive).
    fn referenced(fat: &FatPartition) -> Result<std::collections::BTreeSet<String>> {
        let mut out = std::collections::BTreeSet::new();
        let mut menus = Self::current_files(fat)?;
        if let Some(t) = fat.read(TRIAL_CONF)? {
            menus.extend(menu_files(&String::from_utf8_lossy(&t)));
        }
        for (_, files) in menus {
            out.extend(files.into_iter().map(|f| f.to_ascii_lowercase()));
        }
        Ok(out)
    }

    /// Points `extlinux.conf` at `menu` with `default`: in place when it has
    /// its fixed size, else (first time) a new file renamed into place.
    fn write_conf(fat: &FatPartition, default: &str, menu: &str) -> Result<()> {
        let conf = render_conf(default, menu)?;
        if fat.file_len(CONF)? == Some(CONF_SIZE as u64) {
            fat.overwrite_in_place(CONF, &conf)?;
            fat.sync()
        } else {
            fat.replace(CONF, &conf)
        }
    }

    /// Copies the version file or directory `src` to `btrfs-deploy/<name>`
    /// under a temporary name, then renames it.
    fn copy_in(fat: &FatPartition, src: &Path, name: &str, is_dir: bool) -> Result<()> {
        let dst = format!("{VERSIONS_DIR}/{name}");
        let tmp = format!("{dst}{TMP}");
        if is_dir {
            let (files, _) = walk(src)?;
            for (rel, _) in files {
                fat.copy_from(&format!("{tmp}/{rel}"), &src.join(&rel))?;
            }
        } else {
            fat.remove_all(&tmp)?;
            fat.copy_from(&tmp, src)?;
        }
        fat.sync()?;
        fat.remove_all(&dst)?;
        fat.rename(&tmp, &dst)?;
        fat.sync()
    }

    /// Whether the version file or directory `src` is on the partition as
    /// `btrfs-deploy/<name>` with the same sizes.
    fn present(fat: &FatPartition, src: &Path, name: &str, is_dir: bool) -> Result<bool> {
        let dst = format!("{VERSIONS_DIR}/{name}");
        if !is_dir {
            return Ok(fat.file_len(&dst)? == Some(file_len(src)?));
        }
        let (files, _) = walk(src)?;
        for (rel, len) in files {
            if fat.file_len(&format!("{dst}/{rel}"))? != Some(len) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn file_len(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .len())
}

impl Backend for UBoot {
    fn check_space(&self, label: &str, file_sizes: &[u64]) -> Result<()> {
        let fat = self.open(false)?;
        let need = file_sizes.iter().map(|s| fat.allocated(*s)).sum::<u64>() + ENTRY_OVERHEAD;
        self.require_free(&fat, label, need)?;
        fat.close()
    }

    fn check_space_for(&self, label: &str, files: &[PathBuf]) -> Result<()> {
        let fat = self.open(false)?;
        // Kernel files the partition holds already (another version's
        // identical kernel or initramfs) take no more room.
        let mut need = ENTRY_OVERHEAD;
        for (i, src) in files.iter().enumerate() {
            let suffix = if i == 0 { KERNEL } else { INITRD };
            let len = file_len(src)?;
            let name = super::fat::content_name(src, suffix)?;
            if fat.file_len(&format!("{VERSIONS_DIR}/{name}"))? != Some(len) {
                need += fat.allocated(len);
            }
        }
        self.require_free(&fat, label, need)?;
        fat.close()
    }

    fn write_menu(
        &self,
        top: &Layout,
        fs_uuid: &str,
        entries: &[Entry],
        default: &str,
        _trial: Option<&Entry>,
    ) -> Result<()> {
        let mut menu = Vec::new();
        let mut plan = Vec::new();
        // Directories of device trees being written: made up front (mtools).
        let mut dirs = Vec::new();
        {
            let fat = self.open(false)?;
            let current = Self::current_files(&fat)?;
            for e in entries {
                let (m, files) = version_files(top, e, &fat, &current)?;
                menu.push(m);
                plan.push((e.label.clone(), files));
            }
            for (_, files) in &plan {
                for (src, name, is_dir) in files {
                    if *is_dir && !Self::present(&fat, src, name, true)? {
                        let tmp = format!("{VERSIONS_DIR}/{name}{TMP}");
                        dirs.push(tmp.clone());
                        for d in walk(src)?.1 {
                            dirs.push(format!("{tmp}/{d}"));
                        }
                    }
                }
            }
            fat.close()?;
        }
        self.with_part(&dirs, |fat| {
            for (label, files) in &plan {
                let mut todo = Vec::new();
                let mut need = 0;
                for (src, name, is_dir) in files {
                    if !Self::present(fat, src, name, *is_dir)? {
                        need += if *is_dir {
                            walk(src)?
                                .0
                                .iter()
                                .map(|(_, l)| fat.allocated(*l))
                                .sum::<u64>()
                        } else {
                            fat.allocated(file_len(src)?)
                        };
                        todo.push((src, name, *is_dir));
                    }
                }
                if !todo.is_empty() {
                    self.require_free(fat, label, need + ENTRY_OVERHEAD)?;
                }
                for (src, name, is_dir) in todo {
                    Self::copy_in(fat, src, name, is_dir)?;
                }
            }
            // The menu: a new file when it changes, then the one-sector switch.
            let text = render_menu(fs_uuid, &menu);
            let (cur_default, cur_menu) = Self::current(fat)?;
            if let Some(m) = &cur_menu {
                if fat.read(&format!("{VERSIONS_DIR}/{m}"))?.as_deref() == Some(text.as_bytes()) {
                    return Ok(());
                }
            }
            let next = fat
                .list(VERSIONS_DIR)?
                .iter()
                .filter_map(|e| menu_number(&e.name))
                .max()
                .map_or(1, |n| n + 1);
            let name = format!("{MENU_PREFIX}{next}{MENU_SUFFIX}");
            fat.write(&format!("{VERSIONS_DIR}/{name}"), text.as_bytes())?;
            fat.sync()?;
            // The default stays what it was, unless it is gone from the menu.
            let keep = cur_default
                .filter(|d| menu.iter().any(|m| &m.label == d))
                .unwrap_or_else(|| default.to_string());
            Self::write_conf(fat, &keep, &name)?;
            if let Some(old) = cur_menu.filter(|m| *m != name) {
                fat.remove_all(&format!("{VERSIONS_DIR}/{old}"))?;
            }
            Ok(())
        })
    }

    fn install(&self, _top: &Layout) -> Result<()> {
        // U-Boot itself is the board's firmware; the trial script is ours.
        let image = script_image(TRIAL_SCRIPT);
        self.with_part(&[], |fat| {
            if fat.read(SCRIPT)?.as_deref() != Some(image.as_slice()) {
                fat.replace(SCRIPT, &image)?;
            }
            Ok(())
        })
    }

    fn can_trial(&self) -> bool {
        true
    }

    fn arm_trial(&self, top: &Layout, fs_uuid: &str, trial: &Entry, _: &Entry) -> Result<()> {
        let (m, _) = {
            let fat = self.open(false)?;
            let planned = version_files(top, trial, &fat, &Self::current_files(&fat)?)?;
            fat.close()?;
            planned
        };
        let mut text = format!(
            "# Written by btrfs-deploy: the menu of a trial boot of {l} (deploy --trial),\n\
             # started once by /boot.scr.\ntimeout 0\ndefault {l}\n",
            l = trial.label
        );
        text.push_str(&render_menu(fs_uuid, &[m]));
        self.with_part(&[], |fat| {
            if fat.read(SCRIPT)?.is_none() {
                bail!(
                    "the boot partition of {} has no /{SCRIPT}: run deploy cleanup first",
                    self.disk.display()
                );
            }
            fat.replace(TRIAL_CONF, text.as_bytes())?;
            // The mark last: only a complete trial menu is ever booted.
            fat.write(TRIAL_ONCE, b"")?;
            fat.sync()
        })
    }

    fn trial_armed(&self, _top: &Layout) -> Result<bool> {
        let fat = self.open(false)?;
        let armed = fat.file_len(TRIAL_ONCE)?.is_some();
        fat.close()?;
        Ok(armed)
    }

    fn disarm_trial(&self, _top: &Layout) -> Result<()> {
        let fat = self.open(false)?;
        let any = fat.file_len(TRIAL_ONCE)?.is_some() || fat.file_len(TRIAL_CONF)?.is_some();
        fat.close()?;
        if !any {
            return Ok(());
        }
        self.with_part(&[], |fat| {
            fat.remove_all(TRIAL_ONCE)?;
            fat.sync()?;
            fat.remove_all(TRIAL_CONF)?;
            fat.sync()
        })
    }

    fn switch_default(&self, label: &str) -> Result<()> {
        self.with_part(&[], |fat| {
            let (_, menu) = Self::current(fat)?;
            let Some(menu) = menu else {
                bail!(
                    "{CONF} on the boot partition of {} names no menu: run deploy cleanup",
                    self.disk.display()
                );
            };
            Self::write_conf(fat, label, &menu)
        })
    }

    fn remove_version(&self, label: &str) -> Result<()> {
        // The menu was rewritten without it (and switched to) before this:
        // its device trees go, and the kernel files no entry names any more
        // (shared ones stay while another version names them).
        self.with_part(&[], |fat| {
            let used = Self::referenced(fat)?;
            for f in fat.list(VERSIONS_DIR)? {
                let mine = file_label(&f.name).is_some_and(|l| l.eq_ignore_ascii_case(label));
                if (mine || is_content_name(&f.name))
                    && !used.contains(&f.name.to_ascii_lowercase())
                {
                    fat.remove_all(&format!("{VERSIONS_DIR}/{}", f.name))?;
                }
            }
            Ok(())
        })
    }

    fn cleanup(&self, labels: &[String]) -> Result<Vec<String>> {
        let known = |l: &str| labels.iter().any(|k| k.eq_ignore_ascii_case(l));
        let repaired = super::fat::repair(&self.disk, self.part.0, self.part.1)?;
        self.with_part(&[], |fat| {
            let mut removed = Vec::new();
            if repaired {
                removed.push("repaired an interrupted write with fsck.fat".to_string());
            }
            let (_, menu) = Self::current(fat)?;
            let used = Self::referenced(fat)?;
            for e in fat.list(VERSIONS_DIR)? {
                // The trial's files are ended by lifecycle, not here.
                let trial_file = [TRIAL_CONF, TRIAL_ONCE]
                    .iter()
                    .any(|t| t.ends_with(&format!("/{}", e.name)));
                let keep = if trial_file {
                    true
                } else if menu_number(&e.name).is_some() {
                    menu.as_deref() == Some(e.name.as_str())
                } else if used.contains(&e.name.to_ascii_lowercase()) {
                    true
                } else {
                    // A known version's device trees (named by label), or
                    // its files on a disk written before content names.
                    !is_content_name(&e.name) && file_label(&e.name).is_some_and(known)
                };
                if !keep {
                    let p = format!("{VERSIONS_DIR}/{}", e.name);
                    fat.remove_all(&p)?;
                    removed.push(format!("removed {p}"));
                }
            }
            let tmp = format!("{CONF}{TMP}");
            if fat.file_len(&tmp)?.is_some() {
                fat.remove_all(&tmp)?;
                removed.push(format!("removed {tmp}"));
            }
            Ok(removed)
        })
    }
}

/// The one-shot trial script of `--trial` (issue 13;
/// tested in QEMU by `tests/arm.rs`, design in docs/arm.md "Trials under
/// U-Boot"): U-Boot's distro boot runs it as `/boot.scr` when the boot
/// partition has no `/extlinux/extlinux.conf` (the menu then lives at
/// `/boot/extlinux/extlinux.conf`, which distro boot also finds by itself
/// should the script fail).
pub const TRIAL_SCRIPT: &str = include_str!("../../templates/uboot-trial.cmd");

/// `text` as a U-Boot script image (`boot.scr`), byte for byte what
/// `mkimage -A arm64 -O linux -T script -C none -n btrfs-deploy` writes with
/// `SOURCE_DATE_EPOCH=0`: a 64-byte legacy image header (big-endian magic,
/// header CRC, time, size, load, entry, data CRC, OS Linux, arch arm64,
/// type script, no compression, name), then the size table of the one
/// script (its length, 0) and the script. `source` refuses a script
/// without this header, and this way no `u-boot-tools` are needed.
pub fn script_image(text: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(text.len() + 8);
    data.extend_from_slice(&(text.len() as u32).to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    let mut h = [0u8; 64];
    h[0..4].copy_from_slice(&0x2705_1956u32.to_be_bytes());
    // 4..8 header CRC (over the header with this field 0), 8..12 time 0.
    h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
    // 16..20 load address, 20..24 entry point: 0.
    h[24..28].copy_from_slice(&crc32fast::hash(&data).to_be_bytes());
    h[28] = 5; // IH_OS_LINUX
    h[29] = 22; // IH_ARCH_ARM64
    h[30] = 6; // IH_TYPE_SCRIPT
    h[31] = 0; // IH_COMP_NONE
    let name = b"btrfs-deploy";
    h[32..32 + name.len()].copy_from_slice(name);
    let hcrc = crc32fast::hash(&h);
    h[4..8].copy_from_slice(&hcrc.to_be_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(&data);
    out
}

/// What `check` reads from a U-Boot boot partition.
#[derive(Debug, Default)]
pub struct PartState {
    /// The default `extlinux.conf` names.
    pub default: Option<String>,
    /// Labels with an entry whose files are all present.
    pub complete: Vec<String>,
    /// Problems found.
    pub problems: Vec<String>,
    /// Kernel arguments (`append`) of each entry of the menu: (label, arguments).
    pub args: Vec<(String, String)>,
}

/// Reads the boot partition of `disk` at `part` for `check`.
pub fn inspect(disk: &Path, part: (u64, u64)) -> Result<PartState> {
    let fat = FatPartition::open(disk, part.0, part.1, false)?;
    let mut st = PartState::default();
    if super::fat::is_dirty(disk, part.0)? {
        st.problems.push(
            "a write to it was interrupted (its dirty flag is set): run deploy cleanup".into(),
        );
    }
    let (default, menu) = UBoot::current(&fat)?;
    st.default = default;
    let Some(menu) = menu else {
        st.problems
            .push(format!("{CONF} is missing or names no menu"));
        return Ok(st);
    };
    let Some(text) = fat.read(&format!("{VERSIONS_DIR}/{menu}"))? else {
        st.problems.push(format!(
            "{CONF} includes {VERSIONS_DIR}/{menu}, which is missing"
        ));
        return Ok(st);
    };
    let text = String::from_utf8_lossy(&text);
    let mut label: Option<(String, bool)> = None;
    fn finish(l: Option<(String, bool)>, st: &mut PartState) {
        if let Some((l, true)) = l {
            st.complete.push(l);
        }
    }
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("label"), Some(l)) => {
                finish(label.take(), &mut st);
                label = Some((l.to_string(), true));
            }
            (Some("append"), Some(_)) => {
                if let Some((l, _)) = &label {
                    let rest = line.trim_start().trim_start_matches("append").trim();
                    st.args.push((l.clone(), rest.to_string()));
                }
            }
            (Some("kernel" | "initrd" | "fdt" | "fdtdir"), Some(path)) => {
                let rel = path.trim_start_matches('/');
                let exists = if line.trim_start().starts_with("fdtdir") {
                    !fat.list(rel)?.is_empty()
                } else {
                    fat.file_len(rel)?.is_some()
                };
                if !exists {
                    st.problems
                        .push(format!("the menu names {path}, which is missing"));
                    if let Some((_, ok)) = label.as_mut() {
                        *ok = false;
                    }
                }
            }
            _ => {}
        }
    }
    finish(label.take(), &mut st);
    if let Some(d) = &st.default {
        if !st.complete.contains(d) {
            st.problems
                .push(format!("the default {d} has no complete entry in the menu"));
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_is_one_sector_and_names_default_and_menu() {
        let c = render_conf("v2", "menu-3.conf").unwrap();
        assert_eq!(c.len(), CONF_SIZE);
        let text = String::from_utf8(c).unwrap();
        assert!(
            text.contains("\ndefault v2\ninclude /btrfs-deploy/menu-3.conf\n"),
            "{text}"
        );
        assert_eq!(
            parse_conf(&text),
            (Some("v2".to_string()), Some("menu-3.conf".to_string()))
        );
        let long = "a".repeat(64);
        assert_eq!(
            render_conf(&long, "menu-99999.conf").unwrap().len(),
            CONF_SIZE
        );
        assert!(text.lines().all(|l| l.len() < 80), "{text}");
        assert_eq!(menu_number("menu-12.conf"), Some(12));
        assert_eq!(menu_number("menu-12.conf.tmp"), None);
        assert_eq!(file_label("v2.dtbs"), Some("v2"));
        assert_eq!(file_label("v2.dtbs.tmp"), None);
    }

    #[test]
    fn script_image_is_what_mkimage_writes() {
        // SOURCE_DATE_EPOCH=0 mkimage -A arm64 -O linux -T script -C none
        //   -n btrfs-deploy -d hi.cmd hi.scr   (hi.cmd: "echo hi\n"; u-boot-tools 2023.01)
        let expected: [u8; 80] = [
            0x27, 0x05, 0x19, 0x56, 0x64, 0x04, 0xf1, 0x44, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xd9, 0x34, 0x01, 0x62,
            0x05, 0x16, 0x06, 0x00, 0x62, 0x74, 0x72, 0x66, 0x73, 0x2d, 0x64, 0x65, 0x70, 0x6c,
            0x6f, 0x79, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00,
            0x00, 0x00, 0x65, 0x63, 0x68, 0x6f, 0x20, 0x68, 0x69, 0x0a,
        ];
        assert_eq!(script_image("echo hi\n"), expected.to_vec());
        let img = script_image(TRIAL_SCRIPT);
        assert_eq!(img.len(), 64 + 8 + TRIAL_SCRIPT.len());
        assert!(TRIAL_SCRIPT
            .contains("fatrm ${devtype} ${devnum}:${distro_bootpart} /btrfs-deploy/trial-once"));
    }

    #[test]
    fn versions_on_the_boot_partition_added_switched_removed_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let (img, part) = super::super::fat::test_partition(d.path(), "BOOT");
        let top = Layout::new(&d.path().join("top"));
        let entry = |l: &str| Entry {
            label: l.into(),
            initramfs: true,
            dtb: false,
            args: "x".into(),
            ro: false,
        };
        for (l, fill) in [("a", 1u8), ("b", 3u8)] {
            let v = top.version(l);
            let dtbs = v.join(layout::ORIG).join(dtb_dir("6.1-arm64")).join("arm");
            std::fs::create_dir_all(&dtbs).unwrap();
            std::fs::write(dtbs.join("board.dtb"), b"dtb").unwrap();
            std::fs::write(v.join(layout::KERNEL), vec![fill; 40 << 20]).unwrap();
            std::fs::write(v.join(layout::INITRAMFS), vec![2u8; 1000]).unwrap();
            let rec = Deployment {
                label: l.into(),
                kernel_version: Some("6.1-arm64".into()),
                ..Default::default()
            };
            rec.save(&v.join(layout::DEPLOYMENT_JSON)).unwrap();
        }
        let b = UBoot::new(&img, part);
        b.write_menu(&top, "U", &[entry("a")], "a", None).unwrap();
        b.switch_default("a").unwrap();
        let st = inspect(&img, part).unwrap();
        assert_eq!(st.complete, vec!["a"]);
        assert_eq!(st.default.as_deref(), Some("a"));
        assert!(st.problems.is_empty(), "{:?}", st.problems);
        // A second 40 MiB kernel does not fit: a clear error, the menu as it was.
        let msg = format!("{:#}", b.check_space("b", &[40 << 20, 1000]).unwrap_err());
        assert!(
            msg.contains("U-Boot boot partition") && msg.contains("deploy remove"),
            "{msg}"
        );
        let msg = format!(
            "{:#}",
            b.write_menu(&top, "U", &[entry("a"), entry("b")], "a", None)
                .unwrap_err()
        );
        assert!(msg.contains("needs"), "{msg}");
        assert_eq!(inspect(&img, part).unwrap().complete, vec!["a"]);
        // Removing a (the menu without it first, as store::lifecycle does)
        // frees the room for b.
        b.write_menu(&top, "U", &[], "b", None).unwrap();
        b.remove_version("a").unwrap();
        b.write_menu(&top, "U", &[entry("b")], "b", None).unwrap();
        b.switch_default("b").unwrap();
        let st = inspect(&img, part).unwrap();
        assert_eq!(st.complete, vec!["b"]);
        assert_eq!(st.default.as_deref(), Some("b"));
        let fat = FatPartition::open(&img, part.0, part.1, false).unwrap();
        let names: Vec<String> = fat
            .list(VERSIONS_DIR)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            fat.read(CONF).unwrap().unwrap().len(),
            CONF_SIZE,
            "{names:?}"
        );
        assert_eq!(
            fat.file_len("btrfs-deploy/b.dtbs/arm/board.dtb").unwrap(),
            Some(3)
        );
        fat.close().unwrap();
        assert_eq!(
            names.iter().filter(|n| menu_number(n).is_some()).count(),
            1,
            "one menu: {names:?}"
        );
        assert!(!names.iter().any(|n| n.starts_with("a.")), "{names:?}");
        // a's kernel (its own content) went with it: b's only is left.
        assert_eq!(
            names.iter().filter(|n| n.ends_with(KERNEL)).count(),
            1,
            "{names:?}"
        );
        assert!(names
            .iter()
            .all(|n| !n.ends_with(KERNEL) || is_content_name(n)));
        // Leftovers of interrupted writes, unknown versions and kernel files
        // no entry names go; b stays.
        let fat = FatPartition::open(&img, part.0, part.1, true).unwrap();
        fat.write("btrfs-deploy/b.linux.tmp", b"x").unwrap();
        fat.write("btrfs-deploy/gone.initrd", b"x").unwrap();
        fat.write("btrfs-deploy/menu-99.conf", b"x").unwrap();
        fat.write("btrfs-deploy/0123456789abcdef.linux", b"x")
            .unwrap();
        fat.close().unwrap();
        let mut removed = b.cleanup(&["b".to_string()]).unwrap();
        removed.sort();
        assert_eq!(
            removed,
            vec![
                "removed btrfs-deploy/0123456789abcdef.linux",
                "removed btrfs-deploy/b.linux.tmp",
                "removed btrfs-deploy/gone.initrd",
                "removed btrfs-deploy/menu-99.conf"
            ]
        );
        let st = inspect(&img, part).unwrap();
        assert_eq!(st.complete, vec!["b"]);
        assert!(st.problems.is_empty(), "{:?}", st.problems);
    }

    #[test]
    fn menu_has_fdt_or_fdtdir() {
        let e = MenuEntry {
            label: "v2".into(),
            kernel: "1111111111111111.linux".into(),
            initrd: Some("2222222222222222.initrd".into()),
            dtb: None,
            dtbs: true,
            args: "console=ttyAMA0".into(),
            rw_flag: "rw",
        };
        let m = render_menu("U", std::slice::from_ref(&e));
        assert!(m.contains("label v2\n"), "{m}");
        assert!(m.contains("  kernel /btrfs-deploy/1111111111111111.linux\n  initrd /btrfs-deploy/2222222222222222.initrd\n  fdtdir /btrfs-deploy/v2.dtbs\n"), "{m}");
        assert!(m.contains("  append root=UUID=U rootfstype=btrfs rootflags=subvol=systems/v2/run rw console=ttyAMA0\n"));
        assert_eq!(
            menu_files(&m),
            vec![(
                "v2".to_string(),
                vec![
                    "1111111111111111.linux".to_string(),
                    "2222222222222222.initrd".to_string(),
                    "v2.dtbs".to_string()
                ]
            )]
        );
        let m = render_menu(
            "U",
            &[MenuEntry {
                dtb: Some("3333333333333333.dtb".into()),
                initrd: None,
                ..e
            }],
        );
        assert!(
            m.contains("  fdt /btrfs-deploy/3333333333333333.dtb\n")
                && !m.contains("fdtdir")
                && !m.contains("initrd"),
            "{m}"
        );
        assert!(is_content_name("3333333333333333.dtb"));
        assert!(!is_content_name("v2.dtb") && !is_content_name("3333333333333333.dtbs"));
    }

    #[test]
    fn identical_kernels_share_one_copy_on_the_boot_partition() {
        let d = tempfile::tempdir().unwrap();
        let (img, part) = super::super::fat::test_partition(d.path(), "BOOT");
        let top = Layout::new(&d.path().join("top"));
        let entry = |l: &str| Entry {
            label: l.into(),
            initramfs: true,
            dtb: false,
            args: "x".into(),
            ro: false,
        };
        // The same 40 MiB kernel, two initramfs files: on 64 MiB, the kernel
        // fits once, not twice.
        for (l, initrd) in [("a", 2u8), ("b", 4u8)] {
            let v = top.version(l);
            std::fs::create_dir_all(&v).unwrap();
            std::fs::write(v.join(layout::KERNEL), vec![1u8; 40 << 20]).unwrap();
            std::fs::write(v.join(layout::INITRAMFS), vec![initrd; 1000]).unwrap();
            Deployment::default()
                .save(&v.join(layout::DEPLOYMENT_JSON))
                .unwrap();
        }
        let b = UBoot::new(&img, part);
        b.write_menu(&top, "U", &[entry("a")], "a", None).unwrap();
        b.switch_default("a").unwrap();
        // Planning counts only what is not there yet.
        assert!(b.check_space("b", &[40 << 20, 1000]).is_err());
        let vb = top.version("b");
        b.check_space_for("b", &[vb.join(layout::KERNEL), vb.join(layout::INITRAMFS)])
            .unwrap();
        b.write_menu(&top, "U", &[entry("a"), entry("b")], "a", None)
            .unwrap();
        b.switch_default("b").unwrap();
        let files = |b: &UBoot| -> Vec<String> {
            let fat = b.open(false).unwrap();
            let names = fat
                .list(VERSIONS_DIR)
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .filter(|n| is_content_name(n))
                .collect();
            fat.close().unwrap();
            names
        };
        let all = files(&b);
        assert_eq!(
            all.iter().filter(|n| n.ends_with(KERNEL)).count(),
            1,
            "{all:?}"
        );
        assert_eq!(
            all.iter().filter(|n| n.ends_with(INITRD)).count(),
            2,
            "{all:?}"
        );
        let st = inspect(&img, part).unwrap();
        assert_eq!(st.complete, vec!["a", "b"]);
        // Removing a keeps the shared kernel (b names it), drops a's initramfs.
        b.write_menu(&top, "U", &[entry("b")], "b", None).unwrap();
        b.remove_version("a").unwrap();
        let left = files(&b);
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().any(|n| n.ends_with(KERNEL)), "{left:?}");
        let st = inspect(&img, part).unwrap();
        assert_eq!(st.complete, vec!["b"]);
        assert!(st.problems.is_empty(), "{:?}", st.problems);
        assert!(b.cleanup(&["b".to_string()]).unwrap().is_empty());
    }
}
