//! Power-cut safety proven by replay (issue 11).
//!
//! `scripts/powercut-record.sh` runs `deploy` in a QEMU guest whose target
//! disk goes through QEMU's `blklogwrites` driver, one operation per boot:
//! first deploy, upgrade (with a user's /etc edit to merge, a configure
//! extension and other kernel arguments), set-default, remove, another
//! upgrade, an upgrade with --keep, and a killed deploy followed by
//! cleanup, all on a whole-disk (`--boot bios`) disk; then on a second disk
//! with the default hybrid layout (GPT, EFI system partition, Btrfs
//! partition): first deploy, upgrade, set-default and an upgrade on trial
//! (`--trial`: the default stays, one boot of the new version is armed).
//! [`replay`] rebuilds the disk as it stood after every flush and
//! at torn points between flushes (a random subset of the writes since the
//! last flush lost), and every rebuilt disk must pass [`check_state`]:
//!
//! - `btrfs check --readonly` is clean on the disk as the cut left it;
//! - `deploy list` (a read-only command) works on it as it is;
//! - it mounts read-only as the bootloader reads it (committed trees only:
//!   SYSLINUX does not replay the log tree): `systems/default` there names
//!   the same version as after log replay, and every entry of extlinux.conf
//!   names kernel and initramfs files that exist and are complete;
//! - it mounts read-write (replaying the log), and there `systems/default`
//!   names the old or the new version of the operation, complete: `orig`
//!   read-only, `run` present, kernel and initramfs equal to the tiny
//!   system's, `deployment.json` parses and names it; the boot entries again
//!   name complete files, and the `default` entry carries that version's
//!   kernel arguments;
//! - on the hybrid disk (operations `hybrid-*`: GPT, EFI system partition,
//!   Btrfs partition), the ESP as the cut left it: `loader.conf` names the
//!   old or the new version (the UEFI default), whose entry names kernel and
//!   initramfs files on the ESP that are complete, and whose subvolumes are
//!   there; the Btrfs checks above run on the Btrfs partition; during the
//!   trial operation `loader.conf` may also say `default next-*`, and then
//!   the default's copy (`next-2-default.conf`) must be the old default and
//!   the counted entry (`next-1-trial+1-0.conf`) the version on trial, both
//!   complete;
//! - `deploy cleanup`, then `deploy check` pass (and on the hybrid disk
//!   `fsck.fat -n` finds the ESP clean: an interrupted FAT write is
//!   repaired by cleanup);
//! - the first and last checked state of every operation boots in QEMU
//!   (`deploy boot-test`, on a copy of the state as the cut left it) with
//!   `systems/<default>/run` as `/` (or the trial's version, when the
//!   trial was armed before the cut), and during the trial operation also
//!   under BIOS (SYSLINUX's one-shot record): the old default or the trial,
//!   and the trial once the operation completed.
//!
//! States of a first deploy before its first switch have nothing to boot
//! (the disk was blank before): they are counted apart, not checked.
//!
//! Failed checks are named; those in [`KNOWN_GAPS`] (issue 11's gaps the
//! code still has) are reported but tolerated, any other fails the test.
//!
//! `make test` checks a bounded sample (POWERCUT_SAMPLE, default 60 states,
//! spread over each operation); `make stress` all of them
//! (POWERCUT_SAMPLE=all). POWERCUT_SEED picks the torn points (default 11).

mod common;
#[allow(dead_code)]
#[path = "powercut/replay.rs"]
mod replay;

use replay::{Log, Point, Rng};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The recorded operations, and the versions `systems/default` may name
/// during each: the old default or the new one.
const OPS: &[(&str, &[&str])] = &[
    ("deploy", &["factory"]),
    ("upgrade", &["factory", "v2"]),
    ("set-default", &["v2", "factory"]),
    ("remove", &["factory"]),
    ("upgrade-v3", &["factory", "v3"]),
    ("keep", &["v3", "v4"]),
    ("cleanup", &["v4"]),
    ("hybrid-deploy", &["factory"]),
    ("hybrid-upgrade", &["factory", "v2"]),
    ("hybrid-set-default", &["v2", "factory"]),
    ("hybrid-trial", &["factory"]),
];

/// The version an operation adds on trial (its one-shot boot).
fn trial_of(op: &str) -> Option<&'static str> {
    (op == "hybrid-trial").then_some("v3")
}

/// Whether operation `op` runs on the hybrid disk (a second disk, blank
/// before its first operation).
fn is_hybrid(op: &str) -> bool {
    op.starts_with("hybrid-")
}

/// Where the partitions of the hybrid disk are: (offset, size) in bytes.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    esp: (u64, u64),
    btrfs: (u64, u64),
}

impl Geometry {
    /// Reads the GPT of `img` with sfdisk.
    fn read(img: &Path) -> Geometry {
        let json: serde_json::Value =
            serde_json::from_str(&common::sh(&format!("sfdisk --json {}", img.display()))).unwrap();
        let part = |i: usize| {
            let p = &json["partitiontable"]["partitions"][i];
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
            )
        };
        Geometry {
            esp: part(0),
            btrfs: part(1),
        }
    }
}

/// A loop device over `range` of `img` (the whole image when `None`), detached on drop.
struct Loop(String);

impl Loop {
    fn new(img: &Path, range: Option<(u64, u64)>, read_only: bool) -> Result<Loop, String> {
        let mut l = Command::new("losetup");
        l.args(["--find", "--show"]);
        if read_only {
            l.arg("--read-only");
        }
        if let Some((off, size)) = range {
            l.args([
                "--offset",
                &off.to_string(),
                "--sizelimit",
                &size.to_string(),
            ]);
        }
        Ok(Loop(run(l.arg(img))?.trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Output of a command; Err with its status and output when it fails.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("starting {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tail: Vec<&str> = text.lines().rev().take(6).collect();
        let prog = Path::new(cmd.get_program())
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }
}

fn deploy(args: &[&str]) -> Result<String, String> {
    run(common::deploy().args(args))
}

/// Records the write logs, or finds them recorded for this `deploy` binary
/// (.cache/powercut/<checksum>/), and returns their directory.
fn record() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/powercut-record.sh"))
        .arg(root.join(".cache/powercut"))
        .arg(env!("CARGO_BIN_EXE_deploy"))
        .env("DEPLOY_TINY_ROOTFS", common::tiny_rootfs())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running scripts/powercut-record.sh");
    assert!(out.status.success(), "recording the write logs failed");
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("ops").is_file(),
        "no recording at {}",
        dir.display()
    );
    dir
}

/// A Btrfs scratch filesystem, so that every rebuilt state is a reflink
/// copy of the disk at its last flush (the host's /work may be ext4).
struct Scratch {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    loopdev: String,
}

impl Scratch {
    fn new(parent: &Path) -> Scratch {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let img = dir.path().join("scratch.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        File::create(&img).unwrap().set_len(8 << 30).unwrap();
        common::sh(&format!("mkfs.btrfs -q {}", img.display()));
        let loopdev = common::sh(&format!("losetup --find --show {}", img.display()))
            .trim()
            .to_string();
        common::sh(&format!("mount {loopdev} {}", mnt.display()));
        Scratch {
            _dir: dir,
            mnt,
            loopdev,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loopdev)
            .status();
    }
}

fn reflink(from: &Path, to: &Path) {
    common::sh(&format!(
        "cp --reflink=always {} {}",
        from.display(),
        to.display()
    ));
}

fn open_rw(p: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
}

/// A loop device and a mount of an image's top-level subvolume.
struct Mounted {
    loopdev: Loop,
    dir: tempfile::TempDir,
}

impl Mounted {
    /// `read_only`: a read-only loop device mounted with
    /// `ro,rescue=nologreplay`: the committed trees, what the bootloader
    /// reads. Otherwise read-write, which replays the log tree. `range`:
    /// the Btrfs partition of a hybrid disk.
    fn new(img: &Path, read_only: bool, range: Option<(u64, u64)>) -> Result<Mounted, String> {
        let loopdev = Loop::new(img, range, read_only)?;
        let dir = tempfile::tempdir().unwrap();
        let opts = if read_only {
            "ro,rescue=nologreplay,subvolid=5"
        } else {
            "subvolid=5"
        };
        let m = Mounted { loopdev, dir };
        run(Command::new("mount")
            .args(["-t", "btrfs", "-o", opts, &m.loopdev.0])
            .arg(m.dir.path()))
        .map_err(|e| {
            let dmesg = run(Command::new("sh").args(["-c", "dmesg | grep -i btrfs | tail -n 3"]))
                .unwrap_or_default();
            format!("{e}; dmesg: {}", dmesg.replace('\n', " | "))
        })?;
        Ok(m)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel.trim_start_matches('/'))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // The loop device goes after (field order).
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The files every version's kernel and initramfs must equal.
struct Expected {
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

impl Expected {
    fn load() -> Expected {
        let boot = common::tiny_rootfs().join("boot");
        let find = |prefix: &str| {
            let mut names: Vec<PathBuf> = std::fs::read_dir(&boot)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
                .collect();
            names.sort();
            std::fs::read(&names[0]).unwrap()
        };
        Expected {
            kernel: find("vmlinuz-"),
            initramfs: find("initrd.img-"),
        }
    }
    /// Which boot file `path` must be, by its name.
    fn of(&self, path: &str) -> Option<&[u8]> {
        if path.ends_with("/kernel") {
            Some(&self.kernel)
        } else if path.ends_with("/initramfs") {
            Some(&self.initramfs)
        } else {
            None
        }
    }
}

/// A `label NAME` block of a boot config: (label, [(keyword, argument)]).
type BootEntry = (String, Vec<(String, String)>);

/// The entries of an extlinux.conf, following INCLUDE.
fn boot_entries(m: &Mounted, conf: &str) -> Result<Vec<BootEntry>, String> {
    let text = std::fs::read_to_string(m.path(conf)).map_err(|e| format!("reading {conf}: {e}"))?;
    let mut entries: Vec<BootEntry> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (kw, arg) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let (kw, arg) = (kw.to_ascii_lowercase(), arg.trim().to_string());
        match kw.as_str() {
            "label" => entries.push((arg, Vec::new())),
            "include" => {
                let inc = if arg.starts_with('/') {
                    arg.clone()
                } else {
                    format!("/extlinux/{arg}")
                };
                let mut sub = boot_entries(m, &inc)?;
                match entries.last_mut() {
                    // An INCLUDE inside a label block adds to that block.
                    Some(last) if sub.first().map(|s| s.0.is_empty()).unwrap_or(false) => {
                        last.1.append(&mut sub.remove(0).1);
                        entries.append(&mut sub);
                    }
                    _ => entries.append(&mut sub),
                }
            }
            _ => match entries.last_mut() {
                Some(last) => last.1.push((kw, arg)),
                None => entries.push((String::new(), vec![(kw, arg)])),
            },
        }
    }
    Ok(entries)
}

/// One failed check of a state: which check (see [`KNOWN_GAPS`]) and what.
#[derive(Debug, Clone)]
struct Problem {
    check: &'static str,
    what: String,
}

fn problem(check: &'static str, what: impl Into<String>) -> Problem {
    Problem {
        check,
        what: what.into(),
    }
}

/// Gaps of issue 11 that the replay shows and the code does not close yet.
/// States failing only these are reported apart and do not fail the test;
/// any other failed check does. Remove a gap from this list with its fix:
/// the replay then proves it gone.
const KNOWN_GAPS: &[(&str, &str)] = &[];

/// Every boot entry's kernel/initrd/fdt names a complete file in `m`.
fn check_boot_entries(m: &Mounted, exp: &Expected, view: &'static str, errs: &mut Vec<Problem>) {
    let entries = match boot_entries(m, "/extlinux/extlinux.conf") {
        Ok(e) => e,
        Err(e) => return errs.push(problem(view, e)),
    };
    if !entries.iter().any(|(l, _)| l == "default") {
        errs.push(problem(view, "extlinux.conf has no `label default` entry"));
    }
    for (label, lines) in &entries {
        for (kw, arg) in lines {
            if !matches!(
                kw.as_str(),
                "kernel" | "linux" | "initrd" | "fdt" | "devicetree"
            ) {
                continue;
            }
            match std::fs::read(m.path(arg)) {
                Err(e) => errs.push(problem(view, format!("entry {label}: {kw} {arg}: {e}"))),
                Ok(data) => {
                    if let Some(want) = exp.of(arg) {
                        if data != want {
                            errs.push(problem(
                                view,
                                format!(
                                    "entry {label}: {kw} {arg} is incomplete or wrong ({} bytes, expected {})",
                                    data.len(),
                                    want.len()
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// The label `systems/default` names, if the link is there.
fn default_label(m: &Mounted) -> Option<String> {
    std::fs::read_link(m.path("systems/default"))
        .ok()
        .map(|l| l.to_string_lossy().into_owned())
}

/// Checks the layout as a boot sees it (after log replay); returns the default label.
fn check_layout(
    m: &Mounted,
    exp: &Expected,
    allowed: &[&str],
    errs: &mut Vec<Problem>,
) -> Option<String> {
    let Some(label) = default_label(m) else {
        errs.push(problem("default-link", "systems/default is missing"));
        return None;
    };
    if !allowed.contains(&label.as_str()) {
        errs.push(problem(
            "default-link",
            format!(
                "systems/default names {label}, neither the old nor the new default ({})",
                allowed.join(" or ")
            ),
        ));
    }
    let dir = format!("systems/{label}");
    match run(Command::new("btrfs")
        .args(["property", "get", "-ts"])
        .arg(m.path(&format!("{dir}/orig")))
        .arg("ro"))
    {
        Ok(out) if out.trim() == "ro=true" => {}
        Ok(out) => errs.push(problem(
            "version-complete",
            format!("{dir}/orig is not read-only ({})", out.trim()),
        )),
        Err(e) => errs.push(problem("version-complete", format!("{dir}/orig: {e}"))),
    }
    if !m.path(&format!("{dir}/run/sbin")).exists() {
        errs.push(problem(
            "version-complete",
            format!("{dir}/run is missing or empty"),
        ));
    }
    for (f, want) in [("kernel", &exp.kernel), ("initramfs", &exp.initramfs)] {
        match std::fs::read(m.path(&format!("{dir}/{f}"))) {
            Ok(d) if &d == want => {}
            Ok(d) => errs.push(problem(
                "version-complete",
                format!(
                    "{dir}/{f} is incomplete or wrong ({} bytes, expected {})",
                    d.len(),
                    want.len()
                ),
            )),
            Err(e) => errs.push(problem("version-complete", format!("{dir}/{f}: {e}"))),
        }
    }
    let record = std::fs::read_to_string(m.path(&format!("{dir}/deployment.json")))
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()));
    match record {
        Ok(r) => {
            if r["label"] != label.as_str() {
                errs.push(problem(
                    "version-complete",
                    format!("{dir}/deployment.json names {}", r["label"]),
                ));
            }
            // The default entry must boot with this version's arguments.
            let args = r["kernel_args"].as_str().unwrap_or_default().to_string();
            if let Ok(entries) = boot_entries(m, "/extlinux/extlinux.conf") {
                if let Some((_, lines)) = entries.iter().find(|(l, _)| l == "default") {
                    let append = lines
                        .iter()
                        .find(|(k, _)| k == "append")
                        .map(|(_, a)| a.clone())
                        .unwrap_or_default();
                    if !append.ends_with(&format!(" {args}")) {
                        errs.push(problem(
                            "default-entry-args",
                            format!(
                                "the default boot entry's arguments `{append}` are not those of {label} (`{args}`)"
                            ),
                        ));
                    }
                }
            }
        }
        Err(e) => errs.push(problem(
            "version-complete",
            format!("{dir}/deployment.json: {e}"),
        )),
    }
    Some(label)
}

/// A file of the ESP at byte `esp` of `img`, read with mtools (not the FAT
/// code under test).
fn esp_file(img: &Path, esp: u64, path: &str) -> Result<Vec<u8>, String> {
    let out = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{esp}", img.display()))
        .arg(format!("::{path}"))
        .arg("-")
        .output()
        .map_err(|e| format!("mcopy: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "reading {path} on the ESP: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The names of the files in `dir` on the ESP.
fn esp_list(img: &Path, esp: u64, dir: &str) -> Vec<String> {
    Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-b", "-i"])
        .arg(format!("{}@@{esp}", img.display()))
        .arg(format!("::{dir}"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next().map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect()
}

/// Checks the boot entry `name` (in `/loader/entries`) on the ESP: it names
/// complete kernel and initramfs files. Returns its `version`.
fn check_esp_entry(
    img: &Path,
    g: &Geometry,
    name: &str,
    exp: &Expected,
    errs: &mut Vec<Problem>,
) -> Option<String> {
    let entry = match esp_file(img, g.esp.0, &format!("/loader/entries/{name}")) {
        Ok(e) => String::from_utf8_lossy(&e).into_owned(),
        Err(e) => {
            errs.push(problem("uefi-default", e));
            return None;
        }
    };
    let mut named = 0;
    let mut version = None;
    for line in entry.lines() {
        let mut w = line.split_whitespace();
        let (Some(kw), Some(value)) = (w.next(), w.next()) else {
            continue;
        };
        let want = match kw {
            "version" => {
                version = Some(value.to_string());
                continue;
            }
            "linux" => &exp.kernel,
            "initrd" => &exp.initramfs,
            _ => continue,
        };
        named += 1;
        match esp_file(img, g.esp.0, value) {
            Ok(d) if &d == want => {}
            Ok(d) => errs.push(problem(
                "uefi-default",
                format!(
                    "entry {name}: {kw} {value} is incomplete or wrong ({} bytes, expected {})",
                    d.len(),
                    want.len()
                ),
            )),
            Err(e) => errs.push(problem("uefi-default", format!("entry {name}: {e}"))),
        }
    }
    if named != 2 {
        errs.push(problem(
            "uefi-default",
            format!("entry {name} names {named} kernel files, not 2:\n{entry}"),
        ));
    }
    if version.is_none() {
        errs.push(problem(
            "uefi-default",
            format!("entry {name} has no version line:\n{entry}"),
        ));
    }
    version
}

/// The UEFI view of a hybrid disk as the cut left it. `loader.conf` names
/// either an allowed version's entry, or (a trial armed, operation
/// `hybrid-trial`) `next-*`: then `next-2-default.conf` is the allowed
/// default's copy and `next-1-trial+N-M.conf`, while it has tries left
/// (N > 0), the version on trial, `trial`. Every entry that can boot names
/// complete kernel files on the ESP and a version whose `run` is on the
/// Btrfs (`m`, after log replay). Returns the version the next UEFI boot
/// starts.
fn check_esp(
    img: &Path,
    g: &Geometry,
    m: Option<&Mounted>,
    allowed: &[&str],
    trial: Option<&str>,
    exp: &Expected,
    errs: &mut Vec<Problem>,
) -> Option<String> {
    let entries = esp_list(img, g.esp.0, "/loader/entries");
    let conf = match esp_file(img, g.esp.0, "/loader/loader.conf") {
        Ok(c) => String::from_utf8_lossy(&c).into_owned(),
        Err(e) => {
            // Before a first deploy's loader.conf exists, systemd-boot
            // boots the first entry in its order: with one entry, that one.
            let confs: Vec<&String> = entries.iter().filter(|n| n.ends_with(".conf")).collect();
            match confs.as_slice() {
                [one] => format!("default {one}\n"),
                _ => {
                    errs.push(problem(
                        "uefi-default",
                        format!("{e}, and the ESP has {} entries", confs.len()),
                    ));
                    return None;
                }
            }
        }
    };
    let Some(default) = conf.lines().find_map(|l| {
        l.trim()
            .strip_prefix("default ")
            .map(|d| d.trim().to_string())
    }) else {
        errs.push(problem("uefi-default", "loader.conf names no default"));
        return None;
    };
    let run_exists = |label: &str, errs: &mut Vec<Problem>| {
        if let Some(m) = m {
            if !m.path(&format!("systems/{label}/run/sbin")).exists() {
                errs.push(problem(
                    "uefi-default",
                    format!("the ESP boots {label}, whose systems/{label}/run is missing"),
                ));
            }
        }
    };
    // The persistent default: the entry loader.conf names, or the
    // default's copy behind a trial.
    let (default_entry, trial_entry) = if default == "next-*" {
        let counted = entries.iter().find(|n| {
            n.strip_prefix("next-1-trial+")
                .and_then(|r| r.split('-').next())
                .is_some_and(|tries| tries != "0")
        });
        ("next-2-default.conf".to_string(), counted.cloned())
    } else {
        (default.clone(), None)
    };
    let label = check_esp_entry(img, g, &default_entry, exp, errs)?;
    if !allowed.contains(&label.as_str()) {
        errs.push(problem(
            "uefi-default",
            format!(
                "loader.conf ({default}) makes {label} the default, neither the old nor the new one ({})",
                allowed.join(" or ")
            ),
        ));
    }
    if default_entry.trim_end_matches(".conf") != label && default != "next-*" {
        errs.push(problem(
            "uefi-default",
            format!("loader.conf names {default}, whose version is {label}"),
        ));
    }
    run_exists(&label, errs);
    let Some(trial_entry) = trial_entry else {
        return Some(label);
    };
    let tried = check_esp_entry(img, g, &trial_entry, exp, errs)?;
    if Some(tried.as_str()) != trial {
        errs.push(problem(
            "uefi-trial",
            format!(
                "{trial_entry} tries {tried}; this operation tries {}",
                trial.unwrap_or("nothing")
            ),
        ));
    }
    run_exists(&tried, errs);
    Some(tried)
}

/// All the checks of one rebuilt state but the boot (see the module
/// comment). Returns the problems found and the label a boot must reach
/// (the UEFI default on the hybrid disk, `systems/default` otherwise).
fn check_state(
    img: &Path,
    allowed: &[&str],
    trial: Option<&str>,
    exp: &Expected,
    geo: Option<&Geometry>,
) -> (Vec<Problem>, Option<String>) {
    let mut errs = Vec::new();
    let range = geo.map(|g| g.btrfs);
    match Loop::new(img, range, true) {
        Ok(l) => {
            if let Err(e) = run(Command::new("btrfs").args(["check", "--readonly", &l.0])) {
                errs.push(problem("btrfs-check", e));
            }
        }
        Err(e) => errs.push(problem("btrfs-check", e)),
    }
    if let Err(e) = deploy(&["list", img.to_str().unwrap()]) {
        errs.push(problem("list-unreplayed-log", e));
    }
    // The bootloader's view: the committed trees (SYSLINUX does not replay
    // the log tree). Its entries are checked once the default is known to
    // be the same in both views.
    let committed = Mounted::new(img, true, range);
    let committed_label = match &committed {
        Ok(m) => default_label(m),
        Err(e) => {
            errs.push(problem("read-only-mount", e.clone()));
            None
        }
    };
    let mut label = None;
    let mut uefi_label = None;
    match Mounted::new(img, false, range) {
        Ok(m) => {
            label = check_layout(&m, exp, allowed, &mut errs);
            check_boot_entries(&m, exp, "boot-entries", &mut errs);
            if let Some(g) = geo {
                uefi_label = check_esp(img, g, Some(&m), allowed, trial, exp, &mut errs);
            }
        }
        Err(e) => errs.push(problem("read-write-mount", e)),
    }
    if let Ok(m) = &committed {
        if committed_label != label {
            errs.push(problem(
                "log-only-switch",
                format!(
                    "systems/default names {} after log replay (what the kernel mounts) but {} in the committed trees (what the bootloader reads)",
                    label.as_deref().unwrap_or("nothing"),
                    committed_label.as_deref().unwrap_or("nothing")
                ),
            ));
        } else {
            check_boot_entries(m, exp, "bootloader-view", &mut errs);
        }
    }
    drop(committed);
    if let Err(e) = deploy(&["cleanup", img.to_str().unwrap()]) {
        errs.push(problem("cleanup", e));
    }
    if let Err(e) = deploy(&["check", img.to_str().unwrap()]) {
        errs.push(problem("check-after-cleanup", e));
    }
    if let Some(g) = geo {
        match Loop::new(img, Some(g.esp), true) {
            Ok(l) => {
                if let Err(e) = run(Command::new("fsck.fat").args(["-n", &l.0])) {
                    errs.push(problem("esp-fsck-after-cleanup", e));
                }
            }
            Err(e) => errs.push(problem("esp-fsck-after-cleanup", e)),
        }
        // Cleanup left a UEFI view as sound (a trial still arming is
        // withdrawn, an armed one kept).
        let mut after = Vec::new();
        check_esp(img, g, None, allowed, trial, exp, &mut after);
        errs.extend(after.into_iter().map(|p| Problem {
            check: "uefi-after-cleanup",
            what: p.what,
        }));
        return (errs, uefi_label);
    }
    (errs, label)
}

/// Boots `img` in QEMU (`firmware`: the disk's default, or `bios`); it
/// must mount `systems/<L>/run` as `/` for one of `labels`.
fn boot(img: &Path, labels: &[String], firmware: Option<&str>) -> Option<Problem> {
    let log = img.with_extension("console");
    let mut args = vec![
        "boot-test",
        img.to_str().unwrap(),
        "--timeout",
        "180",
        "--accel",
        "tcg",
        "--log",
        log.to_str().unwrap(),
    ];
    if let Some(f) = firmware {
        args.extend(["--firmware", f]);
    }
    let res = deploy(&args);
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(img);
    match res {
        Err(e) if e.contains("EIO") => Some(problem("boot-test-unreplayed-log", e)),
        Err(e) => Some(problem("boot", e)),
        Ok(_) => {
            let want: Vec<String> = labels
                .iter()
                .map(|l| format!("TINY-MOUNT: / /systems/{l}/run "))
                .collect();
            (!want.iter().any(|w| console.contains(w.as_str()))).then(|| {
                problem(
                    "boot",
                    format!("none of `{}` on the console", want.join("`, `")),
                )
            })
        }
    }
}

/// Which of `n` points to check: all, or `want` spread evenly, always with
/// the first and the last.
fn pick(n: usize, want: Option<usize>) -> Vec<usize> {
    match want {
        _ if n == 0 => Vec::new(),
        None => (0..n).collect(),
        Some(w) if w >= n => (0..n).collect(),
        Some(w) if w <= 1 => vec![n - 1],
        Some(w) => {
            let mut v: Vec<usize> = (0..w).map(|i| i * (n - 1) / (w - 1)).collect();
            v.dedup();
            v
        }
    }
}

fn sha256(p: &Path) -> String {
    common::sh(&format!("sha256sum {}", p.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Rebuilds `p` of `log` on a fresh blank disk of `size` bytes at `img`.
fn rebuild_from_blank(log: &Log, p: &Point, img: &Path, size: u64) {
    let _ = std::fs::remove_file(img);
    File::create(img).unwrap().set_len(size).unwrap();
    log.rebuild(&open_rw(img), p).unwrap();
}

/// True when the disk at `img` has a `systems/default` (after log replay).
fn has_default(img: &Path, range: Option<(u64, u64)>) -> bool {
    match Mounted::new(img, false, range) {
        Ok(m) => default_label(&m).is_some(),
        Err(_) => false,
    }
}

/// Index of the first point of the first deploy that holds a default: the
/// first flush point with a `systems/default` (found by bisection: the
/// link, once there, stays), or the torn point just before it if the link
/// is there too.
fn first_switch(
    log: &Log,
    points: &[Point],
    img: &Path,
    size: u64,
    range: Option<(u64, u64)>,
) -> usize {
    let flush_points: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].durable == points[i].end)
        .collect();
    let (mut lo, mut hi) = (0, flush_points.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        rebuild_from_blank(log, &points[flush_points[mid]], img, size);
        if has_default(img, range) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    assert!(
        lo < flush_points.len(),
        "the first deploy never switched: no flush point has systems/default"
    );
    let first = flush_points[lo];
    // The torn point of the stretch that holds the switch counts when the
    // link made it.
    let torn_before = first > 0 && points[first - 1].durable != points[first - 1].end && {
        rebuild_from_blank(log, &points[first - 1], img, size);
        has_default(img, range)
    };
    let _ = std::fs::remove_file(img);
    if torn_before {
        first - 1
    } else {
        first
    }
}

/// The checks can fail: the last whole-disk state with a truncated
/// initramfs, and with systems/default naming a version that is neither old
/// nor new.
fn checks_can_fail(cursor_path: &Path, state: &Path, allowed: &[&str], exp: &Expected) {
    for (what, edit, want) in [
        (
            "truncated initramfs",
            "truncate -s 1000 systems/v4/initramfs",
            "version-complete",
        ),
        (
            "foreign default",
            "ln -sfn v3 systems/.d && mv -T systems/.d systems/default",
            "default-link",
        ),
    ] {
        reflink(cursor_path, state);
        {
            let m = Mounted::new(state, false, None).unwrap();
            common::sh(&format!("cd {} && {edit} && sync", m.dir.path().display()));
        }
        let (errs, _) = check_state(state, allowed, None, exp, None);
        assert!(
            errs.iter().any(|p| p.check == want),
            "a disk with a {what} passes the checks: {errs:?}"
        );
        std::fs::remove_file(state).unwrap();
    }
}

#[test]
fn power_cut_at_any_point_leaves_the_old_or_new_default_complete_and_booting() {
    let sample: Option<usize> = match std::env::var("POWERCUT_SAMPLE").ok().as_deref() {
        Some("all") => None,
        Some(n) => Some(n.parse().expect("POWERCUT_SAMPLE: a number or `all`")),
        None => Some(60),
    };
    let seed: u64 = std::env::var("POWERCUT_SEED")
        .ok()
        .map(|s| s.parse().expect("POWERCUT_SEED: a number"))
        .unwrap_or(11);
    let started = std::time::Instant::now();
    let dir = record();
    eprintln!(
        "powercut: logs recorded or up to date in {:.0} s",
        started.elapsed().as_secs_f32()
    );
    let names: Vec<String> = std::fs::read_to_string(dir.join("ops"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(names.len(), OPS.len(), "recorded operations: {names:?}");
    let size: u64 = std::fs::read_to_string(dir.join("size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let exp = Expected::load();
    let scratch = Scratch::new(&dir);
    let cursor_path = scratch.mnt.join("cursor.img");
    File::create(&cursor_path).unwrap().set_len(size).unwrap();
    let state = scratch.mnt.join("state.img");

    let logs: Vec<Log> = names
        .iter()
        .map(|n| Log::open(&dir.join(format!("{n}.log"))).unwrap())
        .collect();
    let all_points: Vec<Vec<Point>> = logs
        .iter()
        .enumerate()
        .map(|(k, l)| replay::points(l, &mut Rng::new(seed ^ ((k as u64) << 32))))
        .collect();
    let total: usize = all_points.iter().map(Vec::len).sum();
    let per_op = sample.map(|s| s.div_ceil(OPS.len()));

    // Boots run in two threads of their own while the next states are checked.
    type BootJob = (String, PathBuf, Vec<String>, Option<&'static str>);
    let (boot_tx, boot_rx) = std::sync::mpsc::channel::<BootJob>();
    let boot_rx = std::sync::Arc::new(std::sync::Mutex::new(boot_rx));
    let booters: Vec<_> = (0..2)
        .map(|_| {
            let rx = boot_rx.clone();
            std::thread::spawn(move || {
                let mut done = Vec::new();
                loop {
                    let job = rx.lock().unwrap().recv();
                    let Ok((what, img, labels, firmware)) = job else {
                        break;
                    };
                    let t = std::time::Instant::now();
                    let r = boot(&img, &labels, firmware);
                    eprintln!(
                        "powercut: {what}: {}boot to {} {} ({:.1} s)",
                        firmware.map(|f| format!("{f} ")).unwrap_or_default(),
                        labels.join(" or "),
                        if r.is_none() { "ok" } else { "FAILED" },
                        t.elapsed().as_secs_f32()
                    );
                    if let Some(r) = &r {
                        eprintln!("    {}: {}", r.check, r.what);
                    }
                    done.push((what, r));
                }
                done
            })
        })
        .collect();

    let mut results: Vec<(String, Vec<Problem>)> = Vec::new();
    let mut unfinished = 0;
    let mut geo: Option<Geometry> = None;
    for (k, (name, log)) in names.iter().zip(&logs).enumerate() {
        let (op, allowed) = OPS[k];
        assert!(name.ends_with(op), "operation {k} is {name}, expected {op}");
        let points = &all_points[k];
        // The first operation on a disk found it blank.
        let first_on_disk = k == 0 || is_hybrid(op) != is_hybrid(OPS[k - 1].0);
        if first_on_disk && k > 0 {
            // The hybrid disk: a blank cursor, and where its partitions
            // are, from the disk its first operation left.
            File::create(&cursor_path).unwrap().set_len(size).unwrap();
            let last = points.last().expect("no points");
            rebuild_from_blank(log, last, &state, size);
            geo = Some(Geometry::read(&state));
            std::fs::remove_file(&state).unwrap();
            eprintln!("powercut: the hybrid disk's partitions: {geo:?}");
        }
        // Before a first deploy's switch the disk has nothing to boot, as
        // it had nothing before: those states are not checked.
        let from = if first_on_disk {
            first_switch(log, points, &state, size, geo.map(|g| g.btrfs))
        } else {
            0
        };
        unfinished += from;
        let chosen: Vec<usize> = pick(points.len() - from, per_op)
            .into_iter()
            .map(|i| i + from)
            .collect();
        eprintln!(
            "powercut: {name}: {} entries, {} flushes, {} points{}, checking {}",
            log.entries.len(),
            log.flushes().len(),
            points.len(),
            if from > 0 {
                format!(" ({from} before the first switch)")
            } else {
                String::new()
            },
            chosen.len()
        );
        let cursor = open_rw(&cursor_path);
        let mut at = 0;
        let mut first_checked = true;
        for (nth, &i) in chosen.iter().enumerate() {
            let p = &points[i];
            log.apply(&cursor, at..p.durable, &Default::default())
                .unwrap();
            at = p.durable;
            reflink(&cursor_path, &state);
            let dropped = p.dropped.iter().copied().collect();
            log.apply(&open_rw(&state), p.durable..p.end, &dropped)
                .unwrap();
            let what = format!("{name} {}", p.describe(log));
            let boot = first_checked || nth == chosen.len() - 1;
            first_checked = false;
            let pristine = scratch.mnt.join(format!("boot-{k}-{i}.img"));
            // During a trial, the BIOS path (SYSLINUX's one-shot record) is
            // booted too: the old default or the trial, and once the
            // operation completed, the trial.
            let bios = scratch.mnt.join(format!("boot-{k}-{i}-bios.img"));
            let bios_labels: Option<Vec<String>> = match (boot, trial_of(op)) {
                (true, Some(t)) if i == points.len() - 1 => Some(vec![t.to_string()]),
                (true, Some(t)) => Some(
                    allowed
                        .iter()
                        .map(|l| l.to_string())
                        .chain([t.to_string()])
                        .collect(),
                ),
                _ => None,
            };
            if boot {
                reflink(&state, &pristine);
            }
            if bios_labels.is_some() {
                reflink(&state, &bios);
            }
            let start = std::time::Instant::now();
            let (errs, label) = check_state(&state, allowed, trial_of(op), &exp, geo.as_ref());
            eprintln!(
                "powercut: {what}: {} ({:.1} s)",
                if errs.is_empty() { "ok" } else { "FAILED" },
                start.elapsed().as_secs_f32()
            );
            for e in &errs {
                eprintln!("    {}: {}", e.check, e.what);
            }
            if let Some(labels) = bios_labels {
                boot_tx
                    .send((what.clone(), bios, labels, Some("bios")))
                    .unwrap();
            }
            match (boot, &label) {
                (true, Some(label)) => boot_tx
                    .send((what.clone(), pristine, vec![label.clone()], None))
                    .unwrap(),
                (true, None) => {
                    let _ = std::fs::remove_file(&pristine);
                }
                _ => {}
            }
            results.push((what, errs));
            std::fs::remove_file(&state).unwrap();
        }
        // The replayed log rebuilds exactly the disk the guest left.
        log.apply(&cursor, at..log.entries.len(), &Default::default())
            .unwrap();
        drop(cursor);
        let want = std::fs::read_to_string(dir.join(format!("{name}.sha256"))).unwrap();
        assert_eq!(
            sha256(&cursor_path),
            want.trim(),
            "replaying {name}.log does not rebuild the disk the guest left"
        );
        if op == "cleanup" {
            checks_can_fail(&cursor_path, &state, allowed, &exp);
        }
    }
    // The ESP checks can fail: the last hybrid disk with the UEFI
    // default's kernel cut short on the ESP.
    let (last_op, allowed) = OPS[OPS.len() - 1];
    let g = geo.expect("no hybrid operation was checked");
    reflink(&cursor_path, &state);
    {
        let entry = esp_file(&state, g.esp.0, "/loader/entries/factory.conf").unwrap();
        let entry = String::from_utf8_lossy(&entry).into_owned();
        let kernel = entry
            .lines()
            .find_map(|l| l.strip_prefix("linux "))
            .expect("no linux line")
            .trim()
            .to_string();
        let short = scratch.mnt.join("short");
        std::fs::write(&short, b"cut short").unwrap();
        common::sh(&format!(
            "MTOOLS_SKIP_CHECK=1 mcopy -o -i {}@@{} {} ::{kernel}",
            state.display(),
            g.esp.0,
            short.display()
        ));
    }
    let (errs, _) = check_state(&state, allowed, trial_of(last_op), &exp, Some(&g));
    assert!(
        errs.iter().any(|p| p.check == "uefi-default"),
        "a hybrid disk whose UEFI default names a cut kernel passes the checks: {errs:?}"
    );
    std::fs::remove_file(&state).unwrap();
    drop(boot_tx);
    let boots: Vec<(String, Option<Problem>)> = booters
        .into_iter()
        .flat_map(|b| b.join().expect("a boot thread panicked"))
        .collect();
    let booted = boots.len();
    for (what, r) in boots {
        if let Some(r) = r {
            results
                .iter_mut()
                .find(|(w, _)| *w == what)
                .unwrap()
                .1
                .push(r);
        }
    }

    let checked = results.len();
    let passed = results.iter().filter(|(_, e)| e.is_empty()).count();
    let known = |p: &Problem| KNOWN_GAPS.iter().any(|(g, _)| *g == p.check);
    let only_known = results
        .iter()
        .filter(|(_, e)| !e.is_empty() && e.iter().all(known))
        .count();
    // Straight to stderr, past the test harness's capture: `make test`
    // shows these lines.
    let mut summary = format!(
        "powercut: {checked} states checked, {passed} passed ({booted} booted; {total} points in {} operations, {unfinished} before the first deploy's switch not checked; seed {seed}; {:.0} s)\n",
        OPS.len(),
        started.elapsed().as_secs_f32()
    );
    for (gap, why) in KNOWN_GAPS {
        let n = results
            .iter()
            .filter(|(_, e)| e.iter().any(|p| p.check == *gap))
            .count();
        summary += &format!("powercut: known gap {gap}: {n} states ({why})\n");
    }
    std::io::Write::write_all(&mut std::io::stderr(), summary.as_bytes()).unwrap();
    let unexpected: Vec<String> = results
        .iter()
        .filter(|(_, e)| !e.iter().all(known))
        .map(|(w, e)| {
            let list: Vec<String> = e
                .iter()
                .map(|p| format!("{}: {}", p.check, p.what))
                .collect();
            format!("{w}: {}", list.join("; "))
        })
        .collect();
    assert!(
        checked >= sample.map_or(1, |s| s.min(total - unfinished).min(50)),
        "too few states checked: {checked}"
    );
    assert!(booted >= 2 * OPS.len(), "too few states booted: {booted}");
    assert!(
        unexpected.is_empty(),
        "{} of {checked} states failed ({only_known} more failed only known gaps):\n{}",
        unexpected.len(),
        unexpected.join("\n")
    );
}

#[test]
fn carry_tool_copies_deploy_and_its_tools_so_they_run_in_a_bare_tree() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/carry-tool.sh");
    let listed = run(Command::new(&script)
        .arg(&tree)
        .arg(env!("CARGO_BIN_EXE_deploy")))
    .unwrap();
    for want in [
        "usr/local/bin/deploy",
        "usr/local/bin/mkfs.btrfs",
        "usr/local/bin/btrfs",
        "usr/local/bin/extlinux",
        "usr/local/bin/unshare",
        "lib/x86_64-linux-gnu/libbtrfsutil.so.1",
        "lib64/ld-linux-x86-64.so.2",
    ] {
        assert!(
            listed.lines().any(|l| l == want),
            "{want} not listed:\n{listed}"
        );
        assert!(tree.join(want).is_file(), "{want} not copied");
    }
    // The tree holds nothing else: the programs run there, chrooted.
    for (prog, arg, needle) in [
        ("deploy", "--help", "Usage"),
        ("btrfs", "--version", "btrfs-progs"),
        ("mkfs.btrfs", "--version", "mkfs.btrfs"),
    ] {
        let out = run(Command::new("chroot")
            .arg(&tree)
            .arg(format!("/usr/local/bin/{prog}"))
            .arg(arg))
        .unwrap_or_else(|e| panic!("{prog} does not run in the carried tree: {e}"));
        assert!(out.contains(needle), "{prog} {arg}: {out}");
    }
}

#[test]
fn the_recording_scripts_refuse_bad_input_clearly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let t = tempfile::tempdir().unwrap();
    let code = |c: &mut Command| {
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (c, e) = code(&mut Command::new(root.join("scripts/carry-tool.sh")));
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("usage:"), "{e}");
    let (c, e) = code(
        Command::new(root.join("scripts/carry-tool.sh"))
            .arg(t.path().join("tree"))
            .arg(t.path().join("no-such-deploy")),
    );
    assert_eq!(c, Some(1), "{e}");
    assert!(e.contains("no deploy binary at"), "{e}");
    let (c, e) = code(&mut Command::new(root.join("scripts/powercut-record.sh")));
    assert_eq!(c, Some(2), "{e}");
    let (c, e) = code(
        Command::new(root.join("scripts/powercut-record.sh"))
            .arg(t.path().join("out"))
            .arg(env!("CARGO_BIN_EXE_deploy"))
            .env("DEPLOY_TINY_ROOTFS", t.path().join("missing")),
    );
    assert_eq!(c, Some(1), "{e}");
    assert!(
        e.contains("DEPLOY_TINY_ROOTFS must name the tiny test system"),
        "{e}"
    );
    // Nothing recorded, not even the output directory.
    assert!(!t.path().join("out").exists());
}
