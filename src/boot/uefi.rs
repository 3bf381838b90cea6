//! The UEFI backend: systemd-boot on the EFI system partition (FAT32,
//! written with [`super::fat`]), one Boot Loader Specification entry per
//! version, and each version's kernel and initramfs copied onto the ESP
//! (systemd-boot cannot read Btrfs).
//!
//! On the ESP:
//! ```text
//! EFI/BOOT/BOOTX64.EFI               systemd-boot (the removable-media path: no NVRAM entry needed)
//! loader/loader.conf                 `default <label>.conf`: exactly one 512-byte sector
//! loader/entries/<label>.conf        one entry per version (boot counting may add `+N[-M]` later)
//! btrfs-deploy/<hash>.linux          a kernel, named by its content (SHA-256, 16 hex digits)
//! btrfs-deploy/<hash>.initrd         an initramfs, likewise
//! ```
//! The directories are made once (see [`super::fat`]); files stay flat in them.
//!
//! A trial (`deploy --trial`) uses systemd-boot's boot counting: two more
//! entries, `next-1-trial+1-0.conf` (the version on trial, one try left)
//! and `next-2-default.conf` (a copy of the default's entry), with sort keys
//! that put the trial first, and `loader.conf` switched (one sector) to
//! `default next-*`. systemd-boot picks the first entry the pattern matches
//! in its sorted order; before starting a counted entry it renames it to
//! `next-1-trial+0-1.conf`, and an entry with no tries left sorts last, so
//! every later boot picks `next-2-default`: the version boots once. Ending
//! the trial writes `loader.conf` back to the default, then removes both.
//!
//! Kernel files are content-addressed: versions whose kernel or initramfs
//! are identical (an upgrade that changed only userland) name the same file
//! in their entries, so the ESP holds each distinct file once. A file is
//! removed once no entry names it; the space check counts only the files
//! the ESP does not hold yet. (Disks made before kept `<label>.linux`; their
//! entries still name those files, which go with the last entry naming them.)
//!
//! Power cuts: a new version's files are written under temporary names,
//! renamed, and its entry is written last, so an entry only ever names
//! complete files (what an interruption leaves is unreferenced and removed
//! by `cleanup`). The default is switched by rewriting `loader.conf` in
//! place: it always has exactly [`LOADER_CONF_SIZE`] bytes, one sector in
//! one cluster, so the switch is one sector write, which disks perform
//! atomically: systemd-boot reads either the old or the new default, never a
//! mix, and the directory entry and FAT are not touched. Should
//! `loader.conf` ever be unreadable, systemd-boot boots the first entry in
//! its sorted order, which still is a complete version.

use super::fat::FatPartition;
use super::{Backend, Entry};
use crate::store::layout::{self, Layout};
use crate::util::units;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// systemd-boot's EFI binary on the host, and its Debian package.
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// The Debian package that provides [`SYSTEMD_BOOT_EFI`].
pub const SYSTEMD_BOOT_PACKAGE: &str = "systemd-boot-efi";
/// Where the firmware looks for a loader on removable media (and on any
/// disk without a boot entry in NVRAM).
pub const ESP_LOADER: &str = "EFI/BOOT/BOOTX64.EFI";
/// systemd-boot's configuration.
pub const LOADER_CONF: &str = "loader/loader.conf";
/// Directory of the Boot Loader Specification entries.
pub const ENTRIES_DIR: &str = "loader/entries";
/// Directory of the versions' kernel files on the ESP.
pub const VERSIONS_DIR: &str = "btrfs-deploy";
/// Suffix of a version's kernel in `btrfs-deploy/`.
pub const ESP_KERNEL: &str = ".linux";
/// Suffix of a version's initramfs in `btrfs-deploy/`.
pub const ESP_INITRD: &str = ".initrd";
/// The directories of the ESP, parents first.
pub const ESP_DIRS: [&str; 5] = ["EFI", "EFI/BOOT", "loader", ENTRIES_DIR, VERSIONS_DIR];
/// Size of `loader.conf`: one sector, so switching the default is one sector write.
pub const LOADER_CONF_SIZE: usize = 512;
/// Suffix of files being written.
const TMP: &str = super::fat::TMP_SUFFIX;
/// Room for directory entries and the entry file of a version, on top of its files.
const ENTRY_OVERHEAD: u64 = 16 << 10;

/// File name (without `+N-M.conf`) of the trial's entry.
pub const TRIAL_ENTRY: &str = "next-1-trial";
/// File name (without `.conf`) of the default's copy during a trial.
pub const FALLBACK_ENTRY: &str = "next-2-default";
/// `loader.conf`'s default during a trial: the trial while it has a try
/// left, else the default's copy.
pub const TRIAL_PATTERN: &str = "next-*";

/// The `loader.conf` that makes `label` the default, padded to [`LOADER_CONF_SIZE`].
pub fn loader_conf(label: &str) -> Vec<u8> {
    loader_conf_for(&format!("{label}.conf"))
}

/// The `loader.conf` whose `default` is `pattern`, padded to [`LOADER_CONF_SIZE`].
fn loader_conf_for(pattern: &str) -> Vec<u8> {
    let mut s = format!(
        "# Written by btrfs-deploy: the default version. Rewritten in place (one\n\
         # sector) when the default changes. Hold a key at power-on for the menu.\n\
         timeout 0\n\
         default {pattern}\n"
    );
    let pad = LOADER_CONF_SIZE.saturating_sub(s.len() + 1);
    s.push_str(&"#".repeat(pad));
    s.push('\n');
    let mut v = s.into_bytes();
    v.truncate(LOADER_CONF_SIZE);
    v
}

/// The label a `loader.conf` names as default.
pub fn loader_conf_default(conf: &str) -> Option<String> {
    conf.lines()
        .find_map(|l| l.trim().strip_prefix("default"))
        .map(|rest| rest.trim().trim_end_matches(".conf").to_string())
}

/// The Boot Loader Specification entry of one version, whose kernel and
/// initramfs are the ESP files `files` (paths on the ESP, kernel first).
pub fn render_entry(fs_uuid: &str, e: &Entry, files: &[String]) -> String {
    let l = &e.label;
    let mut s =
        format!("# Written by btrfs-deploy.\ntitle {l} (btrfs-deploy)\nversion {l}\nsort-key btrfs-deploy\n");
    for (kw, f) in ["linux", "initrd"].iter().zip(files) {
        s.push_str(&format!("{kw} /{f}\n"));
    }
    s.push_str(&format!(
        "options root=UUID={fs_uuid} rootfstype=btrfs rootflags=subvol=systems/{l}/run {} {}\n",
        e.rw_flag(),
        e.args
    ));
    s
}

/// The version label of an entry file name: `<label>.conf`, also with
/// systemd-boot's boot counting suffix (`<label>+3.conf`, `<label>+2-1.conf`).
pub fn entry_label(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(".conf")?;
    let label = match stem.rsplit_once('+') {
        Some((l, count))
            if !count.is_empty()
                && count
                    .split('-')
                    .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            l
        }
        _ => stem,
    };
    (!label.is_empty()).then_some(label)
}

/// An entry for the trial pair: `e`'s (naming the ESP files `files`),
/// with its own title and sort key.
fn render_special(
    fs_uuid: &str,
    e: &Entry,
    files: &[String],
    title: &str,
    sort_key: &str,
) -> String {
    render_entry(fs_uuid, e, files)
        .lines()
        .map(|l| {
            if l.starts_with("title ") {
                format!("title {title}")
            } else if l.starts_with("sort-key ") {
                format!("sort-key {sort_key}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Whether an entry file belongs to the trial pair.
fn is_trial_pair(file_name: &str) -> bool {
    file_name.starts_with("next-")
}

fn entry_path(label: &str) -> String {
    format!("{ENTRIES_DIR}/{label}.conf")
}

/// The ESP files an entry names (its `linux` and `initrd` lines), as paths
/// on the ESP (no leading `/`).
pub fn entry_files(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let mut w = line.split_whitespace();
            match (w.next(), w.next()) {
                (Some("linux" | "initrd"), Some(path)) => {
                    Some(path.trim_start_matches('/').to_string())
                }
                _ => None,
            }
        })
        .collect()
}

/// The name on the ESP of a boot file with the content of `src`:
/// `btrfs-deploy/<first 16 hex digits of its SHA-256><suffix>`.
pub fn content_name(src: &Path, suffix: &str) -> Result<String> {
    Ok(format!(
        "{VERSIONS_DIR}/{}",
        super::fat::content_name(src, suffix)?
    ))
}

/// What [`SystemdBoot::plan_files`] found: the ESP names of a version's
/// boot files, the (source, name) pairs still to copy, and the bytes those take.
type PlannedFiles = (Vec<String>, Vec<(PathBuf, String)>, u64);

/// systemd-boot on the EFI system partition at byte range `esp` of `disk`.
pub struct SystemdBoot {
    disk: PathBuf,
    esp: (u64, u64),
}

impl SystemdBoot {
    /// The backend for the ESP at `esp` (offset, size) of `disk`.
    pub fn new(disk: &Path, esp: (u64, u64)) -> Self {
        SystemdBoot {
            disk: disk.to_path_buf(),
            esp,
        }
    }

    fn open(&self, write: bool) -> Result<FatPartition> {
        FatPartition::open(&self.disk, self.esp.0, self.esp.1, write)
    }

    /// Runs `f` on the ESP opened for writing, closing (and syncing) it
    /// after. Its directories are made first where missing.
    fn with_esp<T>(&self, f: impl FnOnce(&FatPartition) -> Result<T>) -> Result<T> {
        super::fat::with_dirs(&self.disk, self.esp, &ESP_DIRS, f)
    }

    /// Fails with a clear message when `need` bytes do not fit.
    fn require_free(&self, fat: &FatPartition, label: &str, need: u64) -> Result<()> {
        let free = fat.free_bytes()?;
        if need > free {
            let hint = if super::fat::is_dirty(&self.disk, self.esp.0)? {
                format!(
                    "; an interrupted write left space allocated there: run deploy cleanup {} first",
                    self.disk.display()
                )
            } else {
                String::new()
            };
            bail!(
                "the EFI system partition of {} has {} free, but version {label} needs {} for its \
                 kernel and initramfs: remove old versions first (deploy remove LABEL {}), or use --keep N{hint}",
                self.disk.display(),
                units::format_size(free),
                units::format_size(need),
                self.disk.display()
            );
        }
        Ok(())
    }

    /// Every ESP file named by an entry (finished entries only).
    fn referenced(fat: &FatPartition) -> Result<std::collections::BTreeSet<String>> {
        let mut out = std::collections::BTreeSet::new();
        for e in fat.list(ENTRIES_DIR)? {
            if e.is_dir || e.name.ends_with(TMP) {
                continue;
            }
            if let Some(text) = fat.read(&format!("{ENTRIES_DIR}/{}", e.name))? {
                for f in entry_files(&String::from_utf8_lossy(&text)) {
                    out.insert(f.to_ascii_lowercase());
                }
            }
        }
        Ok(out)
    }

    /// Removes the files of `btrfs-deploy/` that no entry names (shared
    /// files stay while one entry names them); returns their paths.
    fn remove_unreferenced(fat: &FatPartition) -> Result<Vec<String>> {
        let used = Self::referenced(fat)?;
        let mut removed = Vec::new();
        for e in fat.list(VERSIONS_DIR)? {
            let p = format!("{VERSIONS_DIR}/{}", e.name);
            if e.is_dir || !used.contains(&p.to_ascii_lowercase()) {
                fat.remove_all(&p)?;
                removed.push(p);
            }
        }
        Ok(removed)
    }

    /// The ESP files of one version's boot files `files` (kernel first):
    /// the names its entry has now when those files are there with the
    /// same sizes (a version's boot files never change, so they need not
    /// be hashed again), else their content names. Also returns which of
    /// them are missing (source, name) and the bytes those take.
    fn plan_files(
        fat: &FatPartition,
        current: Option<&str>,
        files: &[PathBuf],
    ) -> Result<PlannedFiles> {
        let old = current.map(entry_files).unwrap_or_default();
        let (mut names, mut todo, mut need) = (Vec::new(), Vec::new(), 0);
        for (i, src) in files.iter().enumerate() {
            let suffix = if i == 0 { ESP_KERNEL } else { ESP_INITRD };
            let len = std::fs::metadata(src)
                .with_context(|| format!("reading {}", src.display()))?
                .len();
            let reuse = match old.get(i) {
                Some(n) if fat.file_len(n)? == Some(len) => Some(n.clone()),
                _ => None,
            };
            let name = match reuse {
                Some(n) => n,
                None => {
                    let n = content_name(src, suffix)?;
                    let planned = todo.iter().any(|(_, t): &(PathBuf, String)| *t == n);
                    if fat.file_len(&n)? != Some(len) && !planned {
                        need += fat.allocated(len);
                        todo.push((src.clone(), n.clone()));
                    }
                    n
                }
            };
            names.push(name);
        }
        Ok((names, todo, need))
    }

    /// Copies `src` to `dst` on the ESP under a temporary name, then renames it.
    fn copy_file(fat: &FatPartition, src: &Path, dst: &str) -> Result<()> {
        let tmp = format!("{dst}{TMP}");
        fat.remove_all(&tmp)?;
        fat.copy_from(&tmp, src)?;
        // The data is on the disk before any name refers to it.
        fat.sync()?;
        fat.remove_all(dst)?;
        fat.rename(&tmp, dst)?;
        fat.sync()
    }
}

impl SystemdBoot {
    /// Rewrites `loader.conf` (one sector, in place when it has its size).
    fn write_loader_conf(fat: &FatPartition, conf: &[u8]) -> Result<()> {
        if fat.file_len(LOADER_CONF)? == Some(LOADER_CONF_SIZE as u64) {
            fat.overwrite_in_place(LOADER_CONF, conf)
        } else {
            fat.replace(LOADER_CONF, conf)
        }
    }
}

impl Backend for SystemdBoot {
    fn can_trial(&self) -> bool {
        true
    }

    fn arm_trial(
        &self,
        _top: &Layout,
        fs_uuid: &str,
        trial: &Entry,
        fallback: &Entry,
    ) -> Result<()> {
        self.with_esp(|fat| {
            // The pair names the files the versions' own entries name.
            let files_of = |label: &str| -> Result<Vec<String>> {
                for e in fat.list(ENTRIES_DIR)? {
                    if !is_trial_pair(&e.name) && entry_label(&e.name) == Some(label) {
                        if let Some(text) = fat.read(&format!("{ENTRIES_DIR}/{}", e.name))? {
                            return Ok(entry_files(&String::from_utf8_lossy(&text)));
                        }
                    }
                }
                bail!(
                    "version {label} has no entry on the EFI system partition: run deploy cleanup"
                )
            };
            let trial_files = files_of(&trial.label)?;
            let fallback_files = files_of(&fallback.label)?;
            for e in fat.list(ENTRIES_DIR)? {
                if is_trial_pair(&e.name) {
                    fat.remove_all(&format!("{ENTRIES_DIR}/{}", e.name))?;
                }
            }
            let title = format!("{} (btrfs-deploy: default)", fallback.label);
            let conf = render_special(
                fs_uuid,
                fallback,
                &fallback_files,
                &title,
                "btrfs-deploy-next-2",
            );
            fat.replace(
                &format!("{ENTRIES_DIR}/{FALLBACK_ENTRY}.conf"),
                conf.as_bytes(),
            )?;
            let title = format!("{} (btrfs-deploy: trial)", trial.label);
            let conf = render_special(fs_uuid, trial, &trial_files, &title, "btrfs-deploy-next-1");
            fat.replace(
                &format!("{ENTRIES_DIR}/{TRIAL_ENTRY}+1-0.conf"),
                conf.as_bytes(),
            )?;
            // Both entries are complete before anything selects them.
            Self::write_loader_conf(fat, &loader_conf_for(TRIAL_PATTERN))
        })
    }

    fn trial_armed(&self, _top: &Layout) -> Result<bool> {
        let fat = self.open(false)?;
        let armed = fat.list(ENTRIES_DIR)?.iter().any(|e| {
            e.name
                .eq_ignore_ascii_case(&format!("{TRIAL_ENTRY}+1-0.conf"))
        });
        fat.close()?;
        Ok(armed)
    }

    fn disarm_trial(&self, top: &Layout) -> Result<()> {
        let fat = self.open(false)?;
        let pair = fat
            .list(ENTRIES_DIR)?
            .iter()
            .any(|e| is_trial_pair(&e.name));
        let conf = fat.read(LOADER_CONF)?;
        fat.close()?;
        let pattern = conf
            .as_deref()
            .and_then(|c| loader_conf_default(&String::from_utf8_lossy(c)));
        if !pair && pattern.as_deref() != Some(TRIAL_PATTERN.trim_end_matches(".conf")) {
            return Ok(());
        }
        let default = crate::store::versions::default_label(top)?;
        self.with_esp(|fat| {
            // Nothing selects the pair before it goes.
            Self::write_loader_conf(fat, &loader_conf(&default))?;
            for e in fat.list(ENTRIES_DIR)? {
                if is_trial_pair(&e.name) {
                    fat.remove_all(&format!("{ENTRIES_DIR}/{}", e.name))?;
                }
            }
            Ok(())
        })
    }

    fn check_space(&self, label: &str, file_sizes: &[u64]) -> Result<()> {
        let fat = self.open(false)?;
        let need = file_sizes.iter().map(|s| fat.allocated(*s)).sum::<u64>() + ENTRY_OVERHEAD;
        self.require_free(&fat, label, need)?;
        fat.close()
    }

    fn check_space_for(&self, label: &str, files: &[PathBuf]) -> Result<()> {
        let fat = self.open(false)?;
        // Files the ESP holds already (another version's identical kernel)
        // take no more room.
        let (_, _, need) = Self::plan_files(&fat, None, files)?;
        self.require_free(&fat, label, need + ENTRY_OVERHEAD)?;
        fat.close()
    }

    fn write_menu(
        &self,
        top: &Layout,
        fs_uuid: &str,
        entries: &[Entry],
        _default: &str,
        _trial: Option<&Entry>,
    ) -> Result<()> {
        self.with_esp(|fat| {
            for e in entries {
                let dir = top.version(&e.label);
                let mut files = vec![dir.join(layout::KERNEL)];
                if e.initramfs {
                    files.push(dir.join(layout::INITRAMFS));
                }
                let path = entry_path(&e.label);
                let current = fat
                    .read(&path)?
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
                // What is missing on the ESP, checked before writing.
                let (names, todo, need) = Self::plan_files(fat, current.as_deref(), &files)?;
                if !todo.is_empty() {
                    self.require_free(fat, &e.label, need + ENTRY_OVERHEAD)?;
                }
                for (src, dst) in &todo {
                    Self::copy_file(fat, src, dst)?;
                }
                let conf = render_entry(fs_uuid, e, &names);
                if current.as_deref() != Some(conf.as_str()) {
                    fat.replace(&path, conf.as_bytes())?;
                }
            }
            Ok(())
        })
    }

    fn install(&self, _top: &Layout) -> Result<()> {
        self.with_esp(|fat| {
            if fat.file_len(ESP_LOADER)?.is_none() {
                let src = Path::new(SYSTEMD_BOOT_EFI);
                require_systemd_boot()?;
                Self::copy_file(fat, src, ESP_LOADER)?;
            }
            Ok(())
        })
    }

    fn switch_default(&self, label: &str) -> Result<()> {
        let conf = loader_conf(label);
        // First time (or a file someone else wrote): a new one, renamed into place.
        self.with_esp(|fat| Self::write_loader_conf(fat, &conf))
    }

    fn remove_version(&self, label: &str) -> Result<()> {
        self.with_esp(|fat| {
            // The entry first: the menu never names files that are going.
            for e in fat.list(ENTRIES_DIR)? {
                if entry_label(&e.name).is_some_and(|l| l.eq_ignore_ascii_case(label)) {
                    fat.remove_all(&format!("{ENTRIES_DIR}/{}", e.name))?;
                }
            }
            fat.sync()?;
            // Then the files no remaining entry names: another version's
            // identical kernel stays.
            Self::remove_unreferenced(fat)?;
            Ok(())
        })
    }

    fn cleanup(&self, labels: &[String]) -> Result<Vec<String>> {
        let known = |l: &str| labels.iter().any(|k| k.eq_ignore_ascii_case(l));
        // An interrupted write may have left allocated clusters no file owns.
        let repaired = super::fat::repair(&self.disk, self.esp.0, self.esp.1)?;
        self.with_esp(|fat| {
            let mut removed = Vec::new();
            if repaired {
                removed.push("repaired an interrupted write with fsck.fat".to_string());
            }
            for e in fat.list(ENTRIES_DIR)? {
                // The trial pair is the trial's (ended by lifecycle, not here).
                let keep = !e.name.ends_with(TMP)
                    && (is_trial_pair(&e.name) || entry_label(&e.name).is_some_and(known));
                if !keep {
                    let p = format!("{ENTRIES_DIR}/{}", e.name);
                    fat.remove_all(&p)?;
                    removed.push(format!("removed {p}"));
                }
            }
            removed.extend(
                Self::remove_unreferenced(fat)?
                    .into_iter()
                    .map(|p| format!("removed {p}")),
            );
            for tmp in [format!("{LOADER_CONF}{TMP}"), format!("{ESP_LOADER}{TMP}")] {
                if fat.file_len(&tmp)?.is_some() {
                    fat.remove_all(&tmp)?;
                    removed.push(format!("removed {tmp}"));
                }
            }
            Ok(removed)
        })
    }
}

/// The writes that would make `label` the UEFI default on the ESP at `esp`
/// of `disk` (its `loader.conf` rewritten), computed without changing the
/// disk: `boot-test --version` applies them to a temporary overlay. Fails
/// when `label` has no complete entry on the ESP.
pub fn default_switch_writes(
    disk: &Path,
    esp: (u64, u64),
    label: &str,
) -> Result<super::fat::Captured> {
    let st = inspect(disk, esp)?;
    if !st.complete.iter().any(|c| c == label) {
        bail!(
            "version {label} has no complete boot entry on the EFI system partition of {} \
             (run deploy cleanup {}, which rewrites missing entries)",
            disk.display(),
            disk.display()
        );
    }
    let fat = FatPartition::open_capturing(disk, esp.0, esp.1)?;
    let conf = loader_conf(label);
    if fat.file_len(LOADER_CONF)? == Some(LOADER_CONF_SIZE as u64) {
        fat.overwrite_in_place(LOADER_CONF, &conf)?;
    } else {
        fat.remove_all(LOADER_CONF)?;
        fat.write(LOADER_CONF, &conf)?;
    }
    fat.close_captured()
}

/// Fails, naming the package, when systemd-boot is not installed on the host.
pub fn require_systemd_boot() -> Result<()> {
    if !Path::new(SYSTEMD_BOOT_EFI).is_file() {
        bail!(
            "{SYSTEMD_BOOT_EFI} not found: UEFI disks boot through systemd-boot; install the \
             Debian package {SYSTEMD_BOOT_PACKAGE} (apt-get install {SYSTEMD_BOOT_PACKAGE})"
        );
    }
    Ok(())
}

/// What `check` reads from an ESP: the default `loader.conf` names and the
/// versions that have an entry, and any problem with each.
#[derive(Debug, Default)]
pub struct EspState {
    /// Default named by `loader.conf`.
    pub default: Option<String>,
    /// Labels with an entry whose files are all present.
    pub complete: Vec<String>,
    /// Problems found.
    pub problems: Vec<String>,
    /// Whether systemd-boot or `loader.conf` is missing (a problem only
    /// once a version has a kernel: `--no-bootloader` disks have neither).
    pub loader_missing: bool,
    /// Kernel arguments (`options`) of each version's entry: (label, arguments).
    pub args: Vec<(String, String)>,
}

/// Reads the ESP of `disk` at `esp` for `check`.
pub fn inspect(disk: &Path, esp: (u64, u64)) -> Result<EspState> {
    let fat = FatPartition::open(disk, esp.0, esp.1, false)?;
    let mut st = EspState::default();
    if super::fat::is_dirty(disk, esp.0)? {
        st.problems.push(
            "a write to it was interrupted (its dirty flag is set): run deploy cleanup".into(),
        );
    }
    if fat.file_len(ESP_LOADER)?.is_none() {
        st.problems.push(format!("{ESP_LOADER} is missing"));
        st.loader_missing = true;
    }
    match fat.read(LOADER_CONF)? {
        Some(c) => st.default = loader_conf_default(&String::from_utf8_lossy(&c)),
        None => {
            st.problems.push(format!("{LOADER_CONF} is missing"));
            st.loader_missing = true;
        }
    }
    if st.default.as_deref() == Some(TRIAL_PATTERN) {
        // During a trial the default is the fallback entry's version.
        st.default = fat
            .read(&format!("{ENTRIES_DIR}/{FALLBACK_ENTRY}.conf"))?
            .and_then(|c| {
                String::from_utf8_lossy(&c)
                    .lines()
                    .find_map(|l| l.strip_prefix("version ").map(|v| v.trim().to_string()))
            });
    }
    for e in fat.list(ENTRIES_DIR)? {
        if is_trial_pair(&e.name) {
            continue;
        }
        let Some(label) = entry_label(&e.name) else {
            continue;
        };
        let text = fat
            .read(&format!("{ENTRIES_DIR}/{}", e.name))?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let mut ok = true;
        for line in text.lines() {
            if let Some(rest) = line.trim_start().strip_prefix("options ") {
                st.args.push((label.to_string(), rest.trim().to_string()));
            }
            let mut w = line.split_whitespace();
            if let (Some("linux" | "initrd"), Some(path)) = (w.next(), w.next()) {
                if fat.file_len(path.trim_start_matches('/'))?.is_none() {
                    st.problems
                        .push(format!("entry {} names {path}, which is missing", e.name));
                    ok = false;
                }
            }
        }
        if ok {
            st.complete.push(label.to_string());
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_conf_is_one_sector_and_names_the_default() {
        let c = loader_conf("v2");
        assert_eq!(c.len(), LOADER_CONF_SIZE);
        let text = String::from_utf8(c).unwrap();
        assert!(text.contains("\ndefault v2.conf\n"), "{text}");
        assert_eq!(loader_conf_default(&text).as_deref(), Some("v2"));
        let long = "a".repeat(64);
        assert_eq!(loader_conf(&long).len(), LOADER_CONF_SIZE);
        assert_eq!(
            loader_conf_default(&String::from_utf8(loader_conf(&long)).unwrap()).unwrap(),
            long
        );
    }

    #[test]
    fn entry_names_with_and_without_boot_counting() {
        assert_eq!(entry_label("v2.conf"), Some("v2"));
        assert_eq!(entry_label("v2+3.conf"), Some("v2"));
        assert_eq!(entry_label("v2+0-1.conf"), Some("v2"));
        assert_eq!(entry_label("a+b.conf"), Some("a+b"));
        assert_eq!(entry_label("v2.conf.tmp"), None);
        assert_eq!(entry_label(".conf"), None);
    }

    #[test]
    fn entry_boots_the_version_subvolume() {
        let e = Entry {
            label: "v2".into(),
            initramfs: true,
            dtb: false,
            args: "console=ttyS0".into(),
            ro: false,
        };
        let files = [
            "btrfs-deploy/k.linux".to_string(),
            "btrfs-deploy/i.initrd".to_string(),
        ];
        let s = render_entry("1234", &e, &files);
        assert!(s.contains("\nlinux /btrfs-deploy/k.linux\ninitrd /btrfs-deploy/i.initrd\n"));
        assert_eq!(entry_files(&s), files);
        assert!(s.contains(
            "options root=UUID=1234 rootfstype=btrfs rootflags=subvol=systems/v2/run rw console=ttyS0\n"
        ));
        let s = render_entry(
            "1234",
            &Entry {
                initramfs: false,
                ..e
            },
            &files[..1],
        );
        assert!(!s.contains("initrd"));
    }

    #[test]
    fn versions_on_an_esp_added_switched_removed_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let (img, esp) = super::super::fat::test_partition(d.path(), "ESP");
        let top = Layout::new(&d.path().join("top"));
        let entry = |l: &str| Entry {
            label: l.into(),
            initramfs: true,
            dtb: false,
            args: "x".into(),
            ro: false,
        };
        for (l, k) in [("a", 1u8), ("b", 3)] {
            let v = top.version(l);
            std::fs::create_dir_all(&v).unwrap();
            std::fs::write(v.join(layout::KERNEL), vec![k; 40 << 20]).unwrap();
            std::fs::write(v.join(layout::INITRAMFS), vec![2u8; 1000]).unwrap();
        }
        let b = SystemdBoot::new(&img, esp);
        b.write_menu(&top, "U", &[entry("a")], "a", None).unwrap();
        b.switch_default("a").unwrap();
        // A second 40 MiB kernel does not fit: clear error, nothing written.
        let msg = format!("{:#}", b.check_space("b", &[40 << 20, 1000]).unwrap_err());
        assert!(
            msg.contains("EFI system partition") && msg.contains("deploy remove"),
            "{msg}"
        );
        assert!(!msg.contains("deploy cleanup"), "{msg}");
        // An interrupted write (dirty flag, FAT16 here: byte 0x25) adds the repair hint.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.write_all_at(&[1], esp.0 + 0x25).unwrap();
        }
        let msg = format!("{:#}", b.check_space("b", &[40 << 20, 1000]).unwrap_err());
        assert!(msg.contains("run deploy cleanup"), "{msg}");
        assert!(super::super::fat::repair(&img, esp.0, esp.1).unwrap());
        assert!(!super::super::fat::is_dirty(&img, esp.0).unwrap());
        assert!(!super::super::fat::repair(&img, esp.0, esp.1).unwrap());
        let msg = format!(
            "{:#}",
            b.write_menu(&top, "U", &[entry("a"), entry("b")], "a", None)
                .unwrap_err()
        );
        assert!(msg.contains("needs"), "{msg}");
        let st = inspect(&img, esp).unwrap();
        assert_eq!(st.complete, vec!["a"]);
        assert_eq!(st.default.as_deref(), Some("a"));
        // Removing a frees its space; b then fits and becomes the default.
        b.remove_version("a").unwrap();
        b.check_space("b", &[40 << 20, 1000]).unwrap();
        b.write_menu(&top, "U", &[entry("b")], "b", None).unwrap();
        b.switch_default("b").unwrap();
        let st = inspect(&img, esp).unwrap();
        assert_eq!(st.complete, vec!["b"]);
        assert_eq!(st.default.as_deref(), Some("b"));
        // Leftovers of an interrupted write and of unknown versions go.
        let fat = FatPartition::open(&img, esp.0, esp.1, true).unwrap();
        fat.write("btrfs-deploy/b.linux.tmp", b"x").unwrap();
        fat.write("btrfs-deploy/gone.linux", b"x").unwrap();
        fat.write("loader/entries/gone+2.conf", b"x").unwrap();
        fat.close().unwrap();
        let mut removed = b.cleanup(&["b".to_string()]).unwrap();
        removed.sort();
        assert_eq!(
            removed,
            vec![
                "removed btrfs-deploy/b.linux.tmp",
                "removed btrfs-deploy/gone.linux",
                "removed loader/entries/gone+2.conf"
            ]
        );
        assert_eq!(inspect(&img, esp).unwrap().complete, vec!["b"]);
    }

    /// Versions with identical kernel files share one copy: counted once by
    /// the space check, kept while an entry names them, removed with the
    /// last one.
    #[test]
    fn identical_kernels_share_one_copy_on_the_esp() {
        let d = tempfile::tempdir().unwrap();
        let (img, esp) = super::super::fat::test_partition(d.path(), "ESP");
        let top = Layout::new(&d.path().join("top"));
        let entry = |l: &str| Entry {
            label: l.into(),
            initramfs: true,
            dtb: false,
            args: "x".into(),
            ro: false,
        };
        // a and b: the same 40 MiB kernel and initramfs; c: another kernel.
        for (l, k) in [("a", 1u8), ("b", 1), ("c", 3)] {
            let v = top.version(l);
            std::fs::create_dir_all(&v).unwrap();
            std::fs::write(v.join(layout::KERNEL), vec![k; 40 << 20]).unwrap();
            std::fs::write(v.join(layout::INITRAMFS), vec![2u8; 1000]).unwrap();
        }
        let files = |l: &str| {
            vec![
                top.version(l).join(layout::KERNEL),
                top.version(l).join(layout::INITRAMFS),
            ]
        };
        let esp_files = || {
            let fat = FatPartition::open(&img, esp.0, esp.1, false).unwrap();
            let mut v: Vec<String> = fat
                .list(VERSIONS_DIR)
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
            fat.close().unwrap();
            v.sort();
            v
        };
        let b = SystemdBoot::new(&img, esp);
        b.write_menu(&top, "U", &[entry("a")], "a", None).unwrap();
        b.switch_default("a").unwrap();
        let one_copy = esp_files();
        assert_eq!(one_copy.len(), 2, "{one_copy:?}");
        assert!(one_copy
            .iter()
            .all(|n| n.len() == super::super::fat::HASH_DIGITS + 6
                || n.len() == super::super::fat::HASH_DIGITS + 7));
        // b shares a's files: it fits, though a second 40 MiB would not
        // (the sizes alone say so).
        assert!(b.check_space("b", &[40 << 20, 1000]).is_err());
        b.check_space_for("b", &files("b")).unwrap();
        b.write_menu(&top, "U", &[entry("a"), entry("b")], "a", None)
            .unwrap();
        assert_eq!(esp_files(), one_copy);
        let st = inspect(&img, esp).unwrap();
        assert_eq!(st.complete, vec!["a", "b"]);
        // (No systemd-boot installed here: the only problem.)
        assert_eq!(st.problems, vec![format!("{ESP_LOADER} is missing")]);
        // c's kernel differs: refused by the space check.
        let msg = format!("{:#}", b.check_space_for("c", &files("c")).unwrap_err());
        assert!(msg.contains("needs 40"), "{msg}");
        // Removing a keeps the files b names.
        b.remove_version("a").unwrap();
        assert_eq!(esp_files(), one_copy);
        assert_eq!(inspect(&img, esp).unwrap().complete, vec!["b"]);
        // A stray copy nobody names goes with cleanup; b's stay.
        let fat = FatPartition::open(&img, esp.0, esp.1, true).unwrap();
        fat.write("btrfs-deploy/0123456789abcdef.linux", b"x")
            .unwrap();
        fat.close().unwrap();
        assert_eq!(
            b.cleanup(&["b".to_string()]).unwrap(),
            vec!["removed btrfs-deploy/0123456789abcdef.linux"]
        );
        assert_eq!(esp_files(), one_copy);
        // Removing b, the last version naming them, frees them: c fits.
        b.write_menu(&top, "U", &[entry("b")], "b", None).unwrap();
        b.remove_version("b").unwrap();
        assert!(esp_files().is_empty());
        b.check_space_for("c", &files("c")).unwrap();
    }

    /// The writes that make another version the default are computed
    /// without touching the disk; applied to a copy, they switch it.
    #[test]
    fn default_switch_writes_leave_the_disk_and_switch_a_copy() {
        let d = tempfile::tempdir().unwrap();
        let (img, esp) = super::super::fat::test_partition(d.path(), "ESP");
        let top = Layout::new(&d.path().join("top"));
        let entry = |l: &str| Entry {
            label: l.into(),
            initramfs: false,
            dtb: false,
            args: "x".into(),
            ro: false,
        };
        for l in ["a", "b"] {
            let v = top.version(l);
            std::fs::create_dir_all(&v).unwrap();
            std::fs::write(v.join(layout::KERNEL), l.repeat(5000)).unwrap();
        }
        let b = SystemdBoot::new(&img, esp);
        b.write_menu(&top, "U", &[entry("a"), entry("b")], "a", None)
            .unwrap();
        b.switch_default("a").unwrap();
        let before = std::fs::read(&img).unwrap();
        let writes = default_switch_writes(&img, esp, "b").unwrap();
        assert!(!writes.is_empty());
        assert!(std::fs::read(&img).unwrap() == before, "the disk changed");
        let msg = format!("{:#}", default_switch_writes(&img, esp, "c").unwrap_err());
        assert!(
            msg.contains("version c has no complete boot entry"),
            "{msg}"
        );
        let copy = d.path().join("copy.img");
        std::fs::copy(&img, &copy).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
            for (off, data) in &writes {
                f.write_all_at(data, *off).unwrap();
            }
        }
        let st = inspect(&copy, esp).unwrap();
        assert_eq!(st.default.as_deref(), Some("b"));
        assert_eq!(st.complete, vec!["a", "b"]);
        assert!(!super::super::fat::is_dirty(&copy, esp.0).unwrap());
        assert_eq!(inspect(&img, esp).unwrap().default.as_deref(), Some("a"));
    }
}
