//! Reliability (issue 6): interrupted, concurrent and out-of-space deploys,
//! the durability order of a switch, and `deploy check` on good and broken
//! disks. Real images, loop devices, Btrfs and (for a sample) QEMU boots.
//!
//! The interruption sweep tries `DEPLOY_STRESS_POINTS` (default 8) evenly
//! spaced moments of a run plus every `==> ` step line, per scenario;
//! `scripts/stress.sh` reruns it with 60 points and every signal at every step.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

/// Moments per scenario (`DEPLOY_STRESS_POINTS`, default 8).
fn stress_points() -> usize {
    std::env::var("DEPLOY_STRESS_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(8)
}

/// True in the long sweep of `make stress`.
fn stress_mode() -> bool {
    stress_points() >= 24
}

fn partial_of(img: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", img.display()))
}

/// What a deploy may leave on the host: a loop device on the image or its
/// `.partial`, or a btrfs-deploy mount in the host's or our namespace.
fn host_leftovers(img: &Path) -> Option<String> {
    let partial = partial_of(img);
    // Auto-clear loop devices go when the last mount does: allow a moment.
    for _ in 0..30 {
        if loops_of(img).is_empty() && loops_of(&partial).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let loops: Vec<String> = loops_of(img)
        .into_iter()
        .chain(loops_of(&partial))
        .collect();
    if !loops.is_empty() {
        return Some(format!("loop devices left: {loops:?}"));
    }
    for table in ["/proc/1/mountinfo", "/proc/self/mountinfo"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("btrfs-deploy.")) {
            return Some(format!("a btrfs-deploy mount is left in {table}: {l}"));
        }
    }
    None
}

/// `deploy check --json`: (exit code, parsed report or Null, stderr).
fn check_json(img: &Path) -> (Option<i32>, Value, String) {
    let out = deploy()
        .args(["check", "--json"])
        .arg(img)
        .output()
        .expect("running deploy check");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Findings of a report that are not ok, as "status name: message".
fn not_ok(report: &Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|f| f["status"] != "ok")
                .map(|f| {
                    let field = |k: &str| f[k].as_str().unwrap_or("?").to_string();
                    format!(
                        "{} {}: {}",
                        field("status"),
                        field("name"),
                        field("message")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `deploy check` passes with no problem and no leftover warnings.
fn check_clean(img: &Path) -> Result<(), String> {
    let (code, report, stderr) = check_json(img);
    let bad: Vec<String> = not_ok(&report)
        .into_iter()
        .filter(|f| !f.starts_with("warning bootloader menu:"))
        .collect();
    if code != Some(0) || !bad.is_empty() {
        return Err(format!(
            "deploy check {}: exit {code:?}: {bad:?} {stderr}",
            img.display()
        ));
    }
    Ok(())
}

fn btrfs_check(img: &Path) -> Result<(), String> {
    btrfs_check_image(img)
}

/// The default label and the names in `systems/` of an image.
fn default_and_entries(img: &Path) -> (String, Vec<String>) {
    let m = Inspect::open(img);
    let default = std::fs::read_link(m.path("systems/default"))
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir(m.path("systems"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    (default, names)
}

/// Boots `img` (TCG; under `firmware` when given) and asserts that `/` is
/// `systems/<label>/run`.
fn boots_into(img: &Path, label: &str, firmware: Option<&str>) -> Result<(), String> {
    let expect = format!("TINY-MOUNT: / /systems/{label}/run ");
    let mut c = deploy();
    c.arg("boot-test")
        .arg(img)
        .args(["--accel", "tcg", "--timeout", "90", "--expect", &expect]);
    if let Some(f) = firmware {
        c.args(["--firmware", f]);
    }
    let out = c.output().expect("running deploy boot-test");
    if !out.status.success() {
        return Err(format!(
            "boot-test of {} expecting {label}: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!(
        "boot-test {label}: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

/// Copies a (sparse) image.
fn copy_image(from: &Path, to: &Path) {
    sh(&format!(
        "cp --sparse=always {} {}",
        from.display(),
        to.display()
    ));
}

/// A copy of the tiny bootable system with `etc/issue` naming `name` and
/// `extra` bytes of incompressible data in `extra.bin`.
fn tiny_copy(dir: &Path, name: &str, extra: usize) -> PathBuf {
    let root = dir.join(name);
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        root.display()
    ));
    write(&root.join("etc/issue"), format!("{name}\n").as_bytes());
    if extra > 0 {
        sh(&format!(
            "head -c {extra} /dev/urandom > {}/extra.bin",
            root.display()
        ));
    }
    root
}

/// An extension folder with `hold`: its .configure touches `$HOLD_MARK`
/// and becomes `sleep $HOLD_SECS` (exec: no other process), which keeps a
/// deploy (and its lock) busy; and `stray`, which also leaves a background
/// process running, as a careless extension might.
fn hold_extension(dir: &Path) -> PathBuf {
    let ext = dir.join("ext");
    write(
        &ext.join("hold.configure"),
        b"#!/bin/sh\n# summary: test helper that holds the deploy\ntouch \"$HOLD_MARK\"\nexec sleep \"$HOLD_SECS\"\n",
    );
    write(
        &ext.join("stray.configure"),
        b"#!/bin/sh\n# summary: test helper that leaves a process behind\nsleep \"$HOLD_SECS\" </dev/null >/dev/null 2>&1 &\necho $! > \"$HOLD_MARK.pid\"\ntouch \"$HOLD_MARK\"\nexec sleep \"$HOLD_SECS\"\n",
    );
    chmod(&ext.join("hold.configure"), 0o755);
    chmod(&ext.join("stray.configure"), 0o755);
    ext
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A small deterministic generator for the jitter (seed printed).
struct Rng(u64);
impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("DEPLOY_STRESS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("interruption jitter seed {seed} (DEPLOY_STRESS_SEED)");
        Rng(seed | 1)
    }
    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ------------------------------------------------------ interruption harness

/// How a run is interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    /// `kill -9` of the deploy process.
    Kill,
    /// SIGINT to the whole process group, as Ctrl-C does (children get it too).
    Int,
    /// SIGTERM to the deploy process.
    Term,
}

const SIGS: [Sig; 3] = [Sig::Kill, Sig::Int, Sig::Term];

/// When a run is interrupted.
#[derive(Debug, Clone, Copy)]
enum When {
    /// This long after the start.
    At(Duration),
    /// As soon as the k-th `==> ` line (1-based) appears on stderr.
    Step(usize),
}

/// What an interrupted run did.
struct Outcome {
    status: ExitStatus,
    stderr: String,
    /// A signal was sent before the process exited by itself.
    sent: bool,
}

fn spawn(args: &[String]) -> Child {
    deploy()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("starting deploy")
}

/// Streams the stderr lines of `child` into a channel.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn send(child: &mut Child, sig: Sig) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain syscalls; the child is not reaped yet, so its pid (and
    // process group id) cannot have been reused.
    unsafe {
        match sig {
            Sig::Kill => libc::kill(pid, libc::SIGKILL),
            Sig::Int => libc::killpg(pid, libc::SIGINT),
            Sig::Term => libc::kill(pid, libc::SIGTERM),
        };
    }
}

/// Waits for `child`, at most `limit`; kills it (and fails) past that.
fn wait_limit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("deploy did not exit within {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `deploy args` and interrupts it with `sig` at `when`.
fn run_interrupted(args: &[String], when: When, sig: Sig) -> Outcome {
    let mut child = spawn(args);
    let rx = stderr_lines(&mut child);
    let start = Instant::now();
    let mut lines = Vec::new();
    let mut steps = 0;
    let mut sent = false;
    loop {
        let wait = match when {
            When::At(d) => d.saturating_sub(start.elapsed()),
            When::Step(_) => Duration::from_secs(300),
        };
        match rx.recv_timeout(wait) {
            Ok(line) => {
                let is_step = line.starts_with("==> ");
                lines.push(line);
                if is_step {
                    steps += 1;
                    if matches!(when, When::Step(k) if k == steps) {
                        if child.try_wait().unwrap().is_none() {
                            send(&mut child, sig);
                            sent = true;
                        }
                        break;
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if matches!(when, When::At(_)) && child.try_wait().unwrap().is_none() {
                    send(&mut child, sig);
                    sent = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // SIGINT/SIGTERM clean up first; allow for a slow subvolume cleanup.
    let status = wait_limit(&mut child, Duration::from_secs(120));
    lines.extend(rx.iter());
    Outcome {
        status,
        stderr: lines.join("\n"),
        sent,
    }
}

/// The two kinds of run that are interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// First deploy onto a new image file.
    New,
    /// Adding v2 to an image holding factory.
    Upgrade,
}

struct Sweep {
    kind: Kind,
    dir: PathBuf,
    rootfs: PathBuf,
    template: Option<PathBuf>,
    /// Boots left for cases that need a repair (long sweep only).
    repair_boots_left: usize,
    booted: Vec<String>,
    reruns_left: usize,
    repairs: usize,
}

impl Sweep {
    fn new(kind: Kind, dir: &Path) -> Sweep {
        let (rootfs, template) = match kind {
            Kind::New => (tiny_rootfs(), None),
            Kind::Upgrade => {
                let template = dir.join("factory.img");
                run_ok(&["--rootfs", &s(&tiny_rootfs()), &s(&template)]);
                (tiny_copy(dir, "v2-rootfs", 4 << 20), Some(template))
            }
        };
        Sweep {
            kind,
            dir: dir.to_path_buf(),
            rootfs,
            template,
            repair_boots_left: 3,
            booted: Vec::new(),
            repairs: 0,
            reruns_left: if stress_mode() { usize::MAX } else { 4 },
        }
    }

    /// A fresh target for point `i`.
    fn target(&self, i: usize) -> PathBuf {
        let img = self.dir.join(format!("p{i}.img"));
        if let Some(t) = &self.template {
            copy_image(t, &img);
        }
        img
    }

    fn args(&self, img: &Path) -> Vec<String> {
        let mut a = Vec::new();
        if self.kind == Kind::Upgrade {
            a.extend(["--version".to_string(), "v2".to_string()]);
        }
        a.extend(["--rootfs".to_string(), s(&self.rootfs), s(img)]);
        a
    }

    fn discard(&self, img: &Path) {
        let _ = std::fs::remove_file(img);
        let _ = std::fs::remove_file(partial_of(img));
    }

    /// Checks what an interrupted run left; Err describes what is wrong.
    fn verify(&mut self, img: &Path, out: &Outcome, sig: Sig) -> Result<(), String> {
        if let Some(l) = host_leftovers(img) {
            return Err(l);
        }
        match self.kind {
            Kind::New => self.verify_new(img, out, sig),
            Kind::Upgrade => self.verify_upgrade(img, out, sig),
        }
    }

    fn verify_new(&mut self, img: &Path, out: &Outcome, sig: Sig) -> Result<(), String> {
        let partial = partial_of(img);
        if out.status.success() && !img.exists() {
            return Err("deploy succeeded but there is no image".into());
        }
        if img.exists() {
            // Killed after the rename (or not interrupted): a complete image.
            if partial.exists() {
                return Err(format!("{} next to a complete image", partial.display()));
            }
            return check_clean(img);
        }
        if sig != Sig::Kill && partial.exists() {
            return Err(format!(
                "{sig:?} left {} (it must clean up)",
                partial.display()
            ));
        }
        if self.reruns_left > 0 {
            self.reruns_left -= 1;
            // Every other time the next run itself takes over the stale .partial.
            if self.reruns_left.is_multiple_of(2) && partial.exists() {
                let c = deploy().arg("cleanup").arg(img).output().unwrap();
                if !c.status.success() || partial.exists() {
                    return Err(format!(
                        "deploy cleanup did not remove {}: {}",
                        partial.display(),
                        String::from_utf8_lossy(&c.stderr)
                    ));
                }
            }
            let again = deploy().args(self.args(img)).output().unwrap();
            if !again.status.success() {
                return Err(format!(
                    "a new deploy after the interruption failed: {}",
                    String::from_utf8_lossy(&again.stderr)
                ));
            }
            if partial.exists() {
                return Err(format!("{} left by the rerun", partial.display()));
            }
            check_clean(img)?;
            if let Some(l) = host_leftovers(img) {
                return Err(l);
            }
        } else if partial.exists() {
            let c = deploy().arg("cleanup").arg(img).output().unwrap();
            if !c.status.success() || partial.exists() {
                return Err(format!("deploy cleanup failed: {c:?}"));
            }
        }
        Ok(())
    }

    fn verify_upgrade(&mut self, img: &Path, out: &Outcome, sig: Sig) -> Result<(), String> {
        if !img.exists() {
            return Err("the image is gone".into());
        }
        btrfs_check(img)?;
        let (default, names) = default_and_entries(img);
        if default != "factory" && default != "v2" {
            return Err(format!("systems/default -> {default:?}"));
        }
        if out.status.success() && default != "v2" {
            return Err(format!("deploy succeeded but default is {default}"));
        }
        let leftovers: Vec<&String> = names.iter().filter(|n| n.starts_with('.')).collect();
        if sig != Sig::Kill {
            if !leftovers.is_empty() {
                return Err(format!("{sig:?} left {leftovers:?} (it must clean up)"));
            }
            if !out.status.success() && names.iter().any(|n| n == "v2") {
                return Err(format!(
                    "{sig:?}: failed run left a v2 directory: {names:?}"
                ));
            }
        }
        // Before any repair, the default version must be complete and the
        // filesystem clean: this is what boots after the interruption.
        let (_, report, stderr) = check_json(img);
        if report.is_null() {
            return Err(format!("deploy check gave no report: {stderr}"));
        }
        let must_be_ok = |name: &str| {
            name == "default"
                || name == "state"
                || name == "btrfs check"
                || name.starts_with(&format!("version {default}:"))
        };
        let broken: Vec<String> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["status"] != "ok" && must_be_ok(f["name"].as_str().unwrap_or("")))
            .map(|f| format!("{}: {}", f["name"], f["message"]))
            .collect();
        if !broken.is_empty() {
            return Err(format!("default {default} is not complete: {broken:?}"));
        }
        if sig != Sig::Kill && !not_ok(&report).is_empty() {
            return Err(format!(
                "{sig:?}: deploy check not clean: {:?}",
                not_ok(&report)
            ));
        }
        // Boot it as it is, before any repair: the first case of each
        // outcome; the long sweep also boots the cases that need a repair.
        let needs_repair = check_clean(img).is_err();
        let new_outcome = !self.booted.contains(&default);
        let repair_boot = stress_mode() && needs_repair && self.repair_boots_left > 0;
        if out.sent && !out.status.success() && (new_outcome || repair_boot) {
            if !new_outcome {
                self.repair_boots_left -= 1;
            }
            self.booted.push(default.clone());
            // Before the repair, the BIOS path follows systems/default; a
            // kill between the two switches of a hybrid disk leaves UEFI on
            // the other complete version until cleanup (tests/uefi.rs
            // covers that state), so the unrepaired disk boots under BIOS.
            boots_into(img, &default, needs_repair.then_some("bios"))?;
        }
        if needs_repair {
            // kill -9 may leave leftovers: `deploy cleanup` is the documented
            // repair, and the next upgrade does the same on its way.
            self.repairs += 1;
            let by_upgrade = self.repairs.is_multiple_of(2);
            let c = if by_upgrade {
                deploy()
                    .args(["--version", "v3", "--rootfs"])
                    .arg(&self.rootfs)
                    .arg(img)
                    .output()
                    .unwrap()
            } else {
                deploy().arg("cleanup").arg(img).output().unwrap()
            };
            let how = if by_upgrade {
                "the next upgrade"
            } else {
                "deploy cleanup"
            };
            if !c.status.success() {
                return Err(format!(
                    "{how} failed: {}",
                    String::from_utf8_lossy(&c.stderr)
                ));
            }
            check_clean(img).map_err(|e| format!("after {how}: {e}"))?;
        }
        if let Some(l) = host_leftovers(img) {
            return Err(l);
        }
        Ok(())
    }
}

/// Runs the sweep for `kind`: a reference run, then N moments spread over
/// its duration (with jitter) and every step line, each with a signal.
fn interruption_sweep(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let mut sweep = Sweep::new(kind, tmp.path());
    let mut rng = Rng::new();

    // Reference: an uninterrupted run, its duration and its step lines.
    let img = sweep.target(9999);
    let started = Instant::now();
    let args = sweep.args(&img);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok(&argv);
    let full = started.elapsed();
    let steps = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("==> "))
        .count();
    check_clean(&img).unwrap();
    sweep.discard(&img);
    eprintln!("{kind:?}: a full run takes {full:?} and prints {steps} step lines");

    let n = stress_points();
    let mut points: Vec<(When, Sig)> = Vec::new();
    for i in 0..n {
        let frac = (i as f64 + 0.5 + (rng.next() - 0.5) * 0.8) / n as f64;
        points.push((When::At(full.mul_f64(frac)), SIGS[i % 3]));
    }
    for k in 1..=steps {
        if stress_mode() {
            points.extend(SIGS.iter().map(|s| (When::Step(k), *s)));
        } else {
            points.push((When::Step(k), SIGS[(k + 1) % 3]));
        }
    }

    let mut failures = Vec::new();
    let mut interrupted = 0;
    let sweep_start = Instant::now();
    for (i, (when, sig)) in points.iter().enumerate() {
        let img = sweep.target(i);
        let out = run_interrupted(&sweep.args(&img), *when, *sig);
        if out.sent && !out.status.success() {
            interrupted += 1;
        }
        let how = match (out.status.code(), out.status.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (_, Some(s)) => format!("signal {s}"),
            _ => "?".into(),
        };
        if let Err(e) = sweep.verify(&img, &out, *sig) {
            failures.push(format!(
                "point {i} ({when:?}, {sig:?}, {how}): {e}\n--- stderr:\n{}",
                out.stderr
            ));
        }
        sweep.discard(&img);
    }
    eprintln!(
        "interruption ({kind:?}): {} points tried, {} survived ({} actually interrupted, {} boot-tested: {:?}) in {:?}",
        points.len(),
        points.len() - failures.len(),
        interrupted,
        sweep.booted.len(),
        sweep.booted,
        sweep_start.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} interruption points failed:\n{}",
        failures.len(),
        points.len(),
        failures.join("\n\n")
    );
    assert!(interrupted > 0, "no point actually interrupted a run");
}

#[test]
fn interrupted_new_deploys_leave_no_image_and_nothing_on_the_host() {
    interruption_sweep(Kind::New);
}

#[test]
fn interrupted_upgrades_keep_a_complete_bootable_default() {
    interruption_sweep(Kind::Upgrade);
}

/// A second SIGTERM exits at once (no cleanup): still nothing mounted or
/// attached, the old default intact, and `deploy cleanup` repairs the rest.
#[test]
fn second_signal_exits_at_once_and_leaves_nothing_on_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.img");
    run_ok(&["--rootfs", &s(&tiny_rootfs()), &s(&img)]);
    let ext = hold_extension(tmp.path());
    let mark = tmp.path().join("mark");
    let mut child = spawn(&[
        "--version".into(),
        "v2".into(),
        "--rootfs".into(),
        s(&tiny_rootfs()),
        "-e".into(),
        "hold".into(),
        "--extensions-dir".into(),
        s(&ext),
        "--set".into(),
        format!("HOLD_MARK={}", mark.display()),
        "--set".into(),
        "HOLD_SECS=30".into(),
        s(&img),
    ]);
    let rx = stderr_lines(&mut child);
    let start = Instant::now();
    while !mark.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "hold never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    send(&mut child, Sig::Term);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    send(&mut child, Sig::Term);
    let status = wait_limit(&mut child, Duration::from_secs(10));
    let waited = t.elapsed();
    let stderr: Vec<String> = rx.iter().collect();
    let stderr = stderr.join("\n");
    assert!(
        waited < Duration::from_secs(3),
        "second SIGTERM took {waited:?}"
    );
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("received again"), "{stderr}");
    assert!(host_leftovers(&img).is_none(), "{:?}", host_leftovers(&img));
    btrfs_check(&img).unwrap();
    let (default, names) = default_and_entries(&img);
    assert_eq!(default, "factory");
    assert!(names.contains(&".v2.partial".to_string()), "{names:?}");
    // The leftover is a warning of deploy check; cleanup removes it.
    let (code, report, _) = check_json(&img);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        not_ok(&report)
            .iter()
            .any(|f| f.contains(".v2.partial") && f.contains("deploy cleanup")),
        "{report}"
    );
    run_ok(&["cleanup", &s(&img)]);
    check_clean(&img).unwrap();
    let (_, names) = default_and_entries(&img);
    assert_eq!(names, ["default", "factory"]);
}

/// `kill -9` while a configure extension runs that started a background
/// process: the deploy's namespace (and so its mount and loop device) must
/// not outlive the deploy because of that process.
#[test]
fn kill_during_an_extension_with_a_stray_process_leaves_nothing_attached() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.img");
    run_ok(&["--rootfs", &s(&tiny_rootfs()), &s(&img)]);
    let ext = hold_extension(tmp.path());
    let mark = tmp.path().join("mark");
    let mut child = spawn(&[
        "--version".into(),
        "v2".into(),
        "--rootfs".into(),
        s(&tiny_rootfs()),
        "-e".into(),
        "stray".into(),
        "--extensions-dir".into(),
        s(&ext),
        "--set".into(),
        format!("HOLD_MARK={}", mark.display()),
        "--set".into(),
        "HOLD_SECS=20".into(),
        s(&img),
    ]);
    let _rx = stderr_lines(&mut child);
    wait_file(&mark);
    send(&mut child, Sig::Kill);
    wait_limit(&mut child, Duration::from_secs(10));
    let left = host_leftovers(&img);
    // Leave nothing behind for the next tests whatever the outcome: end the
    // stray process (by the pid the extension recorded).
    let stray: i32 = std::fs::read_to_string(format!("{}.pid", mark.display()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: plain syscall.
    unsafe { libc::kill(stray, libc::SIGKILL) };
    if left.is_some() {
        host_leftovers(&img); // waits until the namespace is gone
    }
    assert!(
        left.is_none(),
        "{left:?}: a process left by an extension keeps the deploy's mount namespace, \
         so its mount and loop device, alive after kill -9"
    );
    btrfs_check(&img).unwrap();
    run_ok(&["cleanup", &s(&img)]);
    check_clean(&img).unwrap();
}

// ------------------------------------------------------------- concurrency

/// Runs a contender while `holder` runs: it must fail at once, naming the holder.
fn contender_fails_at_once(args: &[&str], holder: &mut Child) -> Duration {
    let t = Instant::now();
    let out = run(args);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the first deploy ended before the contender ran: the test proves nothing"
    );
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains(&format!("in use by process {} ", holder.id())),
        "{args:?} does not name the holder {}: {stderr}",
        holder.id()
    );
    assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
    eprintln!("contender {args:?} refused in {took:?}");
    took
}

/// Waits for a stderr line starting with `prefix`.
fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str) {
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l.starts_with(prefix) => return,
            Ok(_) => {}
            Err(e) => panic!("no line {prefix:?}: {e}"),
        }
    }
}

fn wait_file(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn second_deploy_and_set_default_fail_at_once_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.img");
    run_ok(&["--size", "1G", "--rootfs", &s(&tiny_rootfs()), &s(&img)]);
    // A large-ish rootfs (the sync takes a while), then an extension that
    // holds the deploy for a few seconds more.
    let big = tiny_copy(tmp.path(), "big", 300 << 20);
    let ext = hold_extension(tmp.path());
    let mark = tmp.path().join("mark");
    let mut first = spawn(&[
        "--version".into(),
        "v2".into(),
        "--rootfs".into(),
        s(&big),
        "-e".into(),
        "hold".into(),
        "--extensions-dir".into(),
        s(&ext),
        "--set".into(),
        format!("HOLD_MARK={}", mark.display()),
        "--set".into(),
        "HOLD_SECS=4".into(),
        s(&img),
    ]);
    let rx = stderr_lines(&mut first);
    // During the copy.
    wait_line(&rx, "==> Syncing");
    contender_fails_at_once(
        &["--version", "v3", "--rootfs", &s(&tiny_rootfs()), &s(&img)],
        &mut first,
    );
    // During the configure extension.
    wait_file(&mark);
    contender_fails_at_once(&["set-default", "factory", &s(&img)], &mut first);
    contender_fails_at_once(&["remove", "factory", &s(&img)], &mut first);
    contender_fails_at_once(&["list", &s(&img)], &mut first);
    contender_fails_at_once(&["check", &s(&img)], &mut first);
    contender_fails_at_once(&["cleanup", &s(&img)], &mut first);
    contender_fails_at_once(
        &["--version", "v4", "--rootfs", &s(&tiny_rootfs()), &s(&img)],
        &mut first,
    );
    let status = wait_limit(&mut first, Duration::from_secs(120));
    let rest: Vec<String> = rx.iter().collect();
    assert!(status.success(), "the first deploy failed: {rest:?}");
    assert!(host_leftovers(&img).is_none());
    let (default, names) = default_and_entries(&img);
    assert_eq!(default, "v2");
    assert_eq!(names, ["default", "factory", "v2"]);
    check_clean(&img).unwrap();
}

#[test]
fn two_deploys_to_one_new_target_the_second_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("new.img");
    let big = tiny_copy(tmp.path(), "big", 200 << 20);
    let ext = hold_extension(tmp.path());
    let mark = tmp.path().join("mark");
    let args: Vec<String> = vec![
        "--rootfs".into(),
        s(&big),
        "-e".into(),
        "hold".into(),
        "--extensions-dir".into(),
        s(&ext),
        "--set".into(),
        format!("HOLD_MARK={}", mark.display()),
        "--set".into(),
        "HOLD_SECS=3".into(),
        s(&img),
    ];
    let mut first = spawn(&args);
    let rx = stderr_lines(&mut first);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    wait_line(&rx, "==> Copying");
    contender_fails_at_once(&argv, &mut first);
    wait_file(&mark);
    contender_fails_at_once(&argv, &mut first);
    assert!(
        !img.exists(),
        "the image appeared before the deploy finished"
    );
    let status = wait_limit(&mut first, Duration::from_secs(120));
    let rest: Vec<String> = rx.iter().collect();
    assert!(status.success(), "the first deploy failed: {rest:?}");
    assert!(!partial_of(&img).exists());
    assert!(host_leftovers(&img).is_none());
    check_clean(&img).unwrap();
}

// -------------------------------------------------------------- disk full

/// An upgrade that runs out of space: clear error, partial version removed,
/// the old default intact and booting.
#[test]
fn upgrade_out_of_space_keeps_the_old_default_booting() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.img");
    run_ok(&["--rootfs", &s(&tiny_rootfs()), &s(&img)]);
    let size = std::fs::metadata(&img).unwrap().len() as usize;
    let huge = tiny_copy(tmp.path(), "huge", size + (16 << 20));
    let t = Instant::now();
    run_fails(
        &["--version", "v2", "--rootfs", &s(&huge), &s(&img)],
        1,
        &["no space left", "Removing the partial version v2"],
    );
    eprintln!(
        "out-of-space upgrade failed and cleaned up in {:?}",
        t.elapsed()
    );
    assert!(host_leftovers(&img).is_none());
    btrfs_check(&img).unwrap();
    let (default, names) = default_and_entries(&img);
    assert_eq!(default, "factory");
    assert_eq!(names, ["default", "factory"]);
    check_clean(&img).unwrap();
    boots_into(&img, "factory", None).unwrap();
}

// -------------------------------------------------------------- durability

/// One traced syscall: (name, arguments text).
fn traced(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| {
            // "1234  rename("a", "b") = 0" (pid prefix with -f)
            let l = l.trim_start_matches(|c: char| c.is_ascii_digit()).trim();
            let (name, rest) = l.split_once('(')?;
            if !rest.contains(") = 0") {
                return None;
            }
            Some((name.to_string(), rest.to_string()))
        })
        .collect()
}

/// Index of the first call at or after `from` named one of `names` whose
/// arguments satisfy `pred`.
fn find_call(
    calls: &[(String, String)],
    from: usize,
    names: &[&str],
    pred: impl Fn(&str) -> bool,
) -> Option<usize> {
    (from..calls.len()).find(|&i| names.contains(&calls[i].0.as_str()) && pred(&calls[i].1))
}

const RENAMES: &[&str] = &["rename", "renameat", "renameat2"];
const SYMLINKS: &[&str] = &["symlink", "symlinkat"];

/// Asserts the documented order of a switch in a syscall trace, from `from`:
/// extlinux.conf temp fsynced, renamed, its directory fsynced, syncfs; then
/// the default link created beside, renamed, its directory fsynced, syncfs.
fn assert_switch_order(calls: &[(String, String)], from: usize, label: &str) -> usize {
    let ctx = || format!("{calls:#?}");
    // The version's own `default` entry, if (re)written, is committed first.
    let mut start = from;
    if let Some(e) = find_call(calls, from, RENAMES, |a| {
        a.contains(&format!("/systems/{label}/.default-entry.conf.tmp\""))
    }) {
        start = e;
    }
    let s1 = find_call(calls, start, &["syncfs"], |_| true)
        .unwrap_or_else(|| panic!("no syncfs before the switch: {}", ctx()));
    let l2 = find_call(calls, s1, SYMLINKS, |a| {
        a.starts_with(&format!("\"{label}\"")) && a.contains("/systems/.default.tmp\"")
    })
    .unwrap_or_else(|| panic!("no new default link after the syncfs: {}", ctx()));
    let r2 = find_call(calls, l2, RENAMES, |a| {
        a.contains("/systems/.default.tmp\"") && a.contains("/systems/default\"")
    })
    .unwrap_or_else(|| panic!("no rename of the default link: {}", ctx()));
    let s2 = find_call(calls, r2, &["syncfs"], |_| true)
        .unwrap_or_else(|| panic!("no syncfs after the switch: {}", ctx()));
    // No fsync of systems/ between the rename and the commit: on Btrfs it
    // would put the switch in the log tree, which the kernel replays and
    // SYSLINUX does not (they would disagree after a power cut).
    assert!(
        find_call(&calls[..s2], r2, &["fsync"], |a| a.contains("/systems>")).is_none(),
        "the switch was fsynced into the log tree: {}",
        ctx()
    );
    s2
}

fn strace(args: &[&str], log: &Path) -> String {
    assert!(
        std::process::Command::new("strace")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success()),
        "strace is needed by this test: apt-get install strace"
    );
    let out = std::process::Command::new("strace")
        .args(["-f", "-y", "-qq", "-s", "256", "-o"])
        .arg(log)
        .args([
            "-e",
            "trace=rename,renameat,renameat2,fsync,fdatasync,syncfs,symlink,symlinkat",
        ])
        .arg(env!("CARGO_BIN_EXE_deploy"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(log).unwrap()
}

/// The order of writes that keeps a disk bootable through a power cut
/// (docs/guarantees.md): we cannot cut the power in a test, so the syscall
/// order is traced, and the result checked for consistency.
#[test]
fn switches_are_ordered_for_power_cuts_and_leave_config_and_link_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.img");
    let imgs = s(&img);
    run_ok(&["--rootfs", &s(&tiny_rootfs()), &imgs]);
    let v2 = tiny_copy(tmp.path(), "v2", 0);

    // An upgrade: the version is complete and committed before anything
    // refers to it, then the config, then the link.
    let log = strace(
        &["--version", "v2", "--rootfs", &s(&v2), &imgs],
        &tmp.path().join("up.log"),
    );
    let calls = traced(&log);
    let kernel = find_call(&calls, 0, &["fsync"], |a| {
        a.contains("/systems/.v2.partial/kernel>")
    })
    .expect("kernel fsynced");
    let record = find_call(&calls, 0, RENAMES, |a| {
        a.contains("/systems/.v2.partial/deployment.json\"")
    })
    .expect("deployment.json written atomically");
    let publish = find_call(&calls, 0, RENAMES, |a| {
        a.contains("/systems/.v2.partial\"") && a.contains("/systems/v2\"")
    })
    .expect("rename of the version");
    assert!(kernel < publish && record < publish);
    // Committed before it is renamed into place.
    let before = find_call(&calls, kernel.max(record), &["syncfs"], |_| true).unwrap();
    assert!(
        before < publish,
        "no commit between the content and its rename"
    );
    let dir = find_call(&calls, publish, &["fsync"], |a| a.contains("/systems>")).unwrap();
    let committed = find_call(&calls, dir, &["syncfs"], |_| true).unwrap();
    // Then the menu lists it (and its default entry exists), committed.
    let menu = find_call(&calls, committed, RENAMES, |a| {
        a.contains("/.extlinux.conf.tmp\"") && a.contains("/extlinux/extlinux.conf\"")
    })
    .expect("menu rewritten after the publish");
    assert_switch_order(&calls, menu, "v2");

    // set-default (the rollback): config first, then the link.
    let log = strace(
        &["set-default", "factory", &imgs],
        &tmp.path().join("sd.log"),
    );
    let calls = traced(&log);
    assert_switch_order(&calls, 0, "factory");
    // Switching never rewrites the boot menu: the rename is the switch.
    assert!(
        find_call(&calls, 0, RENAMES, |a| a.contains("extlinux.conf")).is_none(),
        "set-default rewrote the boot menu: {calls:#?}"
    );

    // And the result is consistent: the link, the menu's mark and the
    // default entry agree, nothing temporary is left.
    for label in ["factory", "v2", "factory"] {
        run_ok(&["set-default", label, &imgs]);
        let m = Inspect::open(&img);
        assert_eq!(
            std::fs::read_link(m.path("systems/default")).unwrap(),
            Path::new(label)
        );
        let entry = std::fs::read_to_string(m.path("systems/default/default-entry.conf")).unwrap();
        assert!(
            entry.contains(&format!("the default is {label}."))
                && entry.contains("label default\n  kernel /systems/default/kernel"),
            "{entry}"
        );
        assert!(!m.path("systems/.default.tmp").exists());
        assert!(!m.path("extlinux/.extlinux.conf.tmp").exists());
        drop(m);
        let (code, report, _) = check_json(&img);
        assert_eq!(code, Some(0));
        assert!(not_ok(&report).is_empty(), "{report}");
    }
}

// ------------------------------------------------------------ deploy check

#[test]
fn check_passes_on_a_good_disk_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.img");
    run_ok(&["--rootfs", &s(&tiny_rootfs()), &s(&img)]);
    run_ok(&[
        "--version",
        "v2",
        "--rootfs",
        &s(&tiny_copy(tmp.path(), "v2", 0)),
        &s(&img),
    ]);
    let before = fingerprint(&img);
    let out = run_ok(&["check", &s(&img)]);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "ok      default: systems/default -> v2",
        "ok      version factory: orig: read-only subvolume",
        "ok      version v2: run: writable subvolume",
        "ok      bootloader config: entries: default, factory, v2",
        "ok      btrfs check: clean",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    assert!(
        !text.contains("PROBLEM") && !text.contains("warning"),
        "{text}"
    );
    let (code, report, _) = check_json(&img);
    assert_eq!(code, Some(0));
    assert_eq!(report["ok"], true);
    assert_eq!(report["problems"], 0);
    assert_eq!(fingerprint(&img), before, "deploy check changed the image");
    assert!(host_leftovers(&img).is_none());
    // Not a disk of ours: a clear error.
    let plain = tmp.path().join("plain.img");
    write(&plain, &vec![0u8; 1 << 20]);
    run_fails(&["check", &s(&plain)], 1, &["not a btrfs-deploy disk"]);
    run_fails(
        &["check", &s(&tmp.path().join("missing.img"))],
        1,
        &["does not exist"],
    );
}

/// A broken invariant: how to break it, and what `deploy check` must say.
struct Broken {
    what: &'static str,
    edit: fn(&Edit),
    /// Exit code of `deploy check` (3: problems found).
    code: i32,
    /// The output line: status, then the check's name and the needle.
    line: (&'static str, &'static str, &'static str),
}

fn sh_in(e: &Edit, script: &str) {
    let top = e.path("");
    sh(&format!("cd {} && {script}", top.display()));
}

#[test]
fn check_reports_each_broken_invariant_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.img");
    run_ok(&["--rootfs", &s(&tiny_rootfs()), &s(&good)]);
    run_ok(&[
        "--version",
        "v2",
        "--no-default",
        "--rootfs",
        &s(&tiny_copy(tmp.path(), "v2", 0)),
        &s(&good),
    ]);
    let table = [
        Broken {
            what: "dangling default",
            edit: |e| sh_in(e, "ln -sfn nope systems/default"),
            code: 3,
            line: ("PROBLEM", "default", "systems/default -> nope is dangling"),
        },
        Broken {
            what: "absolute default",
            edit: |e| sh_in(e, "ln -sfn /systems/factory systems/default"),
            code: 3,
            line: ("PROBLEM", "default", "must be a relative link"),
        },
        Broken {
            what: "missing kernel",
            edit: |e| sh_in(e, "rm systems/factory/kernel"),
            code: 3,
            line: (
                "PROBLEM",
                "version factory: boot files",
                "kernel is missing",
            ),
        },
        Broken {
            what: "missing initramfs",
            edit: |e| sh_in(e, "rm systems/v2/initramfs"),
            code: 3,
            line: ("PROBLEM", "version v2: boot files", "initramfs is missing"),
        },
        Broken {
            what: "extra partial dir",
            edit: |e| sh_in(e, "mkdir systems/.v9.partial"),
            code: 0,
            line: ("warning", "leftovers", "systems/.v9.partial"),
        },
        Broken {
            what: "removing dir",
            edit: |e| sh_in(e, "mkdir systems/.v8.removing"),
            code: 0,
            line: ("warning", "leftovers", "run deploy cleanup"),
        },
        Broken {
            what: "fstab missing /home",
            edit: |e| {
                sh_in(
                    e,
                    "sed -i '\\| /home btrfs|d' systems/factory/run/etc/fstab",
                )
            },
            code: 3,
            line: ("PROBLEM", "version factory: fstab", "no entry mounts /home"),
        },
        Broken {
            what: "fstab missing /",
            edit: |e| sh_in(e, "sed -i '\\| / btrfs|d' systems/v2/run/etc/fstab"),
            code: 3,
            line: ("PROBLEM", "version v2: fstab", "no entry mounts /"),
        },
        Broken {
            what: "conf missing an entry",
            edit: |e| sh_in(e, "sed -i '/^label v2$/,/append/d' extlinux/extlinux.conf"),
            code: 3,
            line: ("PROBLEM", "bootloader config", "no `label v2` entry"),
        },
        Broken {
            what: "conf with another uuid",
            edit: |e| {
                sh_in(
                    e,
                    "sed -i 's/root=UUID=[0-9a-f-]*/root=UUID=0000/' extlinux/extlinux.conf",
                )
            },
            code: 3,
            line: ("PROBLEM", "bootloader config", "lacks root=UUID="),
        },
        Broken {
            what: "orig made writable",
            edit: |e| sh_in(e, "btrfs property set -ts systems/factory/orig ro false"),
            code: 3,
            line: (
                "PROBLEM",
                "version factory: orig",
                "is writable (must be a read-only subvolume)",
            ),
        },
        Broken {
            what: "run made read-only",
            edit: |e| sh_in(e, "btrfs property set -ts systems/v2/run ro true"),
            code: 3,
            line: ("PROBLEM", "version v2: run", "is read-only"),
        },
        Broken {
            what: "deployment.json of another label",
            edit: |e| {
                sh_in(
                    e,
                    "sed -i 's/\"label\": \"v2\"/\"label\": \"v3\"/' systems/v2/deployment.json",
                )
            },
            code: 3,
            line: (
                "PROBLEM",
                "version v2: deployment.json",
                "records label \"v3\"",
            ),
        },
        Broken {
            what: "state subvolume missing",
            edit: |e| sh_in(e, "btrfs subvolume delete -c state/srv >/dev/null"),
            code: 3,
            line: ("PROBLEM", "state", "/state/srv is not a subvolume"),
        },
        Broken {
            what: "default entry of the default version missing",
            edit: |e| sh_in(e, "rm systems/factory/default-entry.conf"),
            code: 3,
            line: (
                "PROBLEM",
                "bootloader config",
                "included file /systems/default/default-entry.conf missing",
            ),
        },
    ];
    let good_print = fingerprint(&good);
    let mut failures = Vec::new();
    for (i, b) in table.iter().enumerate() {
        let img = tmp.path().join(format!("b{i}.img"));
        copy_image(&good, &img);
        {
            let e = Edit::open(&img);
            (b.edit)(&e);
        }
        let before = fingerprint(&img);
        // The fingerprint sees the edit (so it would see a change by check).
        assert_ne!(before, good_print, "{}: the edit changed nothing", b.what);
        let out = deploy().arg("check").arg(&img).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (status, name, needle) = b.line;
        let found = stdout.lines().any(|l| {
            l.starts_with(status) && l.contains(&format!(" {name}: ")) && l.contains(needle)
        });
        if out.status.code() != Some(b.code) || !found {
            failures.push(format!(
                "{}: exit {:?} (want {}), want a line {status} {name}: ..{needle}..\n{stdout}{stderr}",
                b.what,
                out.status.code(),
                b.code
            ));
        }
        if b.code == 3 && !stderr.contains("problem") {
            failures.push(format!("{}: no summary error: {stderr}", b.what));
        }
        if fingerprint(&img) != before {
            failures.push(format!("{}: deploy check changed the image", b.what));
        }
        if let Some(l) = host_leftovers(&img) {
            failures.push(format!("{}: {l}", b.what));
        }
        let _ = std::fs::remove_file(&img);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Physical offsets of the copies of the metadata block at `logical`
/// (from the chunk tree; a single device, so stripes are plain offsets).
fn physical_copies(dev: &str, logical: u64) -> Vec<u64> {
    let dump = sh(&format!("btrfs inspect-internal dump-tree -t chunk {dev}"));
    let mut out = Vec::new();
    let (mut start, mut len) = (0u64, 0u64);
    for l in dump.lines().map(str::trim) {
        if let Some(rest) = l.split("CHUNK_ITEM ").nth(1) {
            start = rest.split(')').next().unwrap().trim().parse().unwrap();
        } else if let Some(rest) = l.strip_prefix("length ") {
            len = rest.split_whitespace().next().unwrap().parse().unwrap();
        } else if l.starts_with("stripe ") && (start..start + len).contains(&logical) {
            let off: u64 = l.split("offset ").nth(1).unwrap().trim().parse().unwrap();
            out.push(off + (logical - start));
        }
    }
    out
}

/// A filesystem that no longer mounts: both findings are reported, and the
/// `btrfs check` of the unmounted image names the damage.
#[test]
fn check_reports_a_damaged_filesystem() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.img");
    run_ok(&["--rootfs", &s(&tiny_rootfs()), &s(&img)]);
    // The Btrfs is the second partition of the (default, hybrid) disk.
    let part = btrfs_partition(&img).map_or(0, |(offset, _)| offset);
    let dev = BtrfsDev::attach(&img, true);
    let roots = sh(&format!(
        "btrfs inspect-internal dump-tree -t root {}",
        dev.dev
    ));
    let bytenr: u64 = roots
        .split("(FREE_SPACE_TREE ROOT_ITEM 0)")
        .nth(1)
        .and_then(|r| r.split("bytenr ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no free space tree root:\n{roots}"));
    let copies = physical_copies(&dev.dev, bytenr);
    drop(dev);
    assert!(!copies.is_empty(), "no mapping for {bytenr}");
    for p in copies {
        sh(&format!(
            "dd if=/dev/urandom of={} bs=1 seek={} count=64 conv=notrunc 2>/dev/null",
            img.display(),
            part + p + 100
        ));
    }
    let out = deploy().arg("check").arg(&img).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("PROBLEM mount: "), "{stdout}");
    assert!(
        stdout.contains("PROBLEM btrfs check: `btrfs check --readonly")
            && stdout.contains(&format!("checksum verify failed on {bytenr}")),
        "{stdout}"
    );
    assert!(
        stderr.contains("2 problems (mount, btrfs check)"),
        "{stderr}"
    );
    assert!(host_leftovers(&img).is_none());
}
