//! Boot testing: boot a disk image in QEMU through its own bootloader
//! (SeaBIOS → extlinux → kernel), read the serial console, and pass when the
//! expected text appears within the timeout.
//!
//! QEMU runs with the serial line on its stdio (`-serial stdio`, no display,
//! no monitor, no NIC), `-no-reboot`, and `-snapshot` unless the caller asks
//! to persist the guest's writes. The console is read incrementally: ANSI
//! escapes and carriage returns are stripped, lines are assembled, the text is
//! written to an optional log file as it arrives, and the expected regex is
//! matched against every line and against the whole text.
//!
//! With [`Accel::Auto`], KVM is tried first when `/dev/kvm` can be opened. On
//! some machines `/dev/kvm` exists but guests hang or stop with "emulation
//! failure"; that is detected quickly (QEMU reports a KVM error, exits with an
//! error, or the guest prints nothing on the serial line within
//! [`KVM_LIVENESS`]) and the boot is restarted under TCG with a fresh timeout.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use regex::Regex;

/// The QEMU binary used for boot tests.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The Debian package that provides [`QEMU_BINARY`].
pub const QEMU_PACKAGE: &str = "qemu-system-x86";
/// The KVM device probed by [`Accel::Auto`].
pub const KVM_DEVICE: &str = "/dev/kvm";
/// A KVM guest that prints nothing on the serial line within this time is
/// considered hung (SYSLINUX prints its banner well under a second after
/// power-on, even under TCG).
pub const KVM_LIVENESS: Duration = Duration::from_secs(5);
/// OVMF's firmware code (read-only pflash), from Debian's `ovmf` package.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
/// OVMF's variable store template: each boot test gets a private copy, so
/// neither the image nor the host's file changes.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";
/// The Debian package that provides [`OVMF_CODE`].
pub const OVMF_PACKAGE: &str = "ovmf";
/// The text of the SYSLINUX prompt at which a menu label is typed.
pub const SYSLINUX_PROMPT: &str = "boot:";
/// How many console lines [`BootTestOutcome::tail`] keeps.
pub const TAIL_LINES: usize = 30;
/// Console patterns that always fail a boot test, with what they mean: a
/// kernel panic, and SYSLINUX failing to load a kernel or initramfs (it would
/// otherwise re-prompt and retry until the timeout).
pub const BUILTIN_FAIL_PATTERNS: &[(&str, &str)] = &[
    (r"Kernel panic - not syncing", "kernel panic"),
    (r"^Loading .*\.\.\..*failed: ", "bootloader failed"),
    (r"^failed: ", "bootloader failed"),
    (
        r"btrfs: found compressed data, cannot continue",
        "bootloader failed",
    ),
    (r"Could not find kernel image: ", "bootloader failed"),
];
/// QEMU stderr messages that mean KVM does not work on this machine.
const KVM_FAILURE_MARKERS: &[&str] = &[
    "emulation failure",
    "KVM internal error",
    "failed to initialize kvm",
    "failed to initialize KVM",
    "Could not access KVM kernel module",
];
/// After the expected text with `persist`, how long the guest may take to
/// power off by itself (so its writes reach the image) before it is killed.
const PERSIST_GRACE: Duration = Duration::from_secs(10);
/// The whole console text is matched at most this often (lines are matched
/// as they complete).
const TEXT_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How many lines of QEMU's stderr are kept for reasons.
const STDERR_TAIL_LINES: usize = 10;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and works, TCG otherwise.
    Auto,
    /// KVM only: fails if it is missing or broken.
    Kvm,
    /// Software emulation (slow, works everywhere).
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl FromStr for Accel {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => bail!("unknown accelerator {other:?}: expected auto, kvm or tcg"),
        }
    }
}

/// The firmware QEMU boots the disk with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default): MBR boot code, SYSLINUX.
    Bios,
    /// OVMF: the ESP's `EFI/BOOT/BOOTX64.EFI`.
    Uefi,
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

/// What to boot and what to wait for.
#[derive(Debug, Clone)]
pub struct BootTestOptions {
    /// Firmware.
    pub firmware: Firmware,
    /// The private copy of [`OVMF_VARS`] for a UEFI boot (set by [`run`]).
    pub uefi_vars: Option<PathBuf>,
    /// The raw disk image (or block device) to boot.
    pub image: PathBuf,
    /// Menu label to type at the SYSLINUX `boot:` prompt; `None` boots the
    /// default entry.
    pub entry: Option<String>,
    /// The test passes when this matches a console line or the whole text.
    pub expect: Regex,
    /// How long to wait for `expect` (restarts when falling back to TCG).
    pub timeout: Duration,
    /// Which accelerator to use.
    pub accel: Accel,
    /// Let the guest's writes reach the image (no `-snapshot`).
    pub persist: bool,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Write the console text (and QEMU's stderr) to this file as it arrives.
    pub log: Option<PathBuf>,
    /// More console patterns that fail the test at once, in addition to
    /// [`BUILTIN_FAIL_PATTERNS`].
    pub extra_fail: Vec<Regex>,
    /// How many times the guest may reboot in this run; `expect` must then
    /// appear during the last boot (boot `reboots + 1`). 0: a reboot ends
    /// QEMU (`-no-reboot`), as a failure.
    pub reboots: u32,
    /// Add a watchdog device (i6300esb) that resets the guest when it
    /// stops being fed.
    pub watchdog: bool,
}

/// Console lines that start a boot, seen again after each reboot: SYSLINUX's
/// banner (SeaBIOS prints nothing on the serial line), OVMF starting a boot option,
/// U-Boot's banner.
const BOOT_START: &str = r"^SYSLINUX \d|BdsDxe: starting Boot|^U-Boot 20";

impl BootTestOptions {
    /// Options with defaults: default entry, 60 s timeout, `Accel::Auto`,
    /// `-snapshot`, 512 MiB, no log, no extra fail patterns.
    pub fn new(image: impl Into<PathBuf>, expect: Regex) -> Self {
        BootTestOptions {
            firmware: Firmware::Bios,
            uefi_vars: None,
            image: image.into(),
            entry: None,
            expect,
            timeout: Duration::from_secs(60),
            accel: Accel::Auto,
            persist: false,
            memory_mib: 512,
            log: None,
            extra_fail: Vec::new(),
            reboots: 0,
            watchdog: false,
        }
    }
}

/// The result of one boot test.
#[derive(Debug, Clone)]
pub struct BootTestOutcome {
    /// Whether `expect` matched before any failure.
    pub passed: bool,
    /// Time from QEMU's start (of the last attempt) to the decision.
    pub elapsed: Duration,
    /// The accelerator of the last attempt (`Kvm` or `Tcg`, never `Auto`).
    pub accel_used: Accel,
    /// `"matched"` or why it failed ("timeout after 60 s", "guest powered
    /// off before the expected text appeared", "kernel panic: ...").
    pub reason: String,
    /// The last [`TAIL_LINES`] console lines.
    pub tail: Vec<String>,
    /// The whole console text (ANSI escapes and `\r` stripped); the
    /// command itself streams the console instead, tests read this.
    #[cfg_attr(not(test), allow(dead_code))]
    pub console: String,
}

/// Boots `opts.image` in QEMU and waits for `opts.expect` on the serial
/// console. Setup problems (QEMU missing, image missing, log not writable,
/// KVM requested but unavailable) are errors; everything that happens once
/// the guest runs is reported in the outcome.
pub fn run(opts: &BootTestOptions) -> Result<BootTestOutcome> {
    let qemu = find_qemu()?;
    let kvm = match opts.accel {
        Accel::Tcg => Err(anyhow::anyhow!("TCG was requested")),
        Accel::Kvm | Accel::Auto => kvm_usable(),
    };
    if opts.accel == Accel::Kvm {
        if let Err(e) = &kvm {
            bail!("KVM was requested but {KVM_DEVICE} is unusable: {e:#}");
        }
    }
    if let (Accel::Auto, Err(e)) = (opts.accel, &kvm) {
        tracing::info!("not using KVM ({e:#}); booting with TCG");
    }
    if opts.firmware == Firmware::Uefi {
        let vars_dir = tempfile::Builder::new()
            .prefix("btrfs-deploy-ovmf.")
            .tempdir()
            .context("creating a directory for the UEFI variable store")?;
        let vars = vars_dir.path().join("OVMF_VARS.fd");
        for f in [OVMF_CODE, OVMF_VARS] {
            if !Path::new(f).is_file() {
                bail!("{f} not found: UEFI boot tests need OVMF; install the Debian package {OVMF_PACKAGE}");
            }
        }
        std::fs::copy(OVMF_VARS, &vars)
            .with_context(|| format!("copying {OVMF_VARS} to {}", vars.display()))?;
        let mut opts = opts.clone();
        opts.uefi_vars = Some(vars);
        return run_with(&qemu, &opts, kvm.is_ok());
    }
    run_with(&qemu, opts, kvm.is_ok())
}

/// [`run`] with a given QEMU binary and whether KVM may be tried.
fn run_with(qemu: &Path, opts: &BootTestOptions, kvm_available: bool) -> Result<BootTestOutcome> {
    if !opts.image.exists() {
        bail!("boot test image {} does not exist", opts.image.display());
    }
    if let Some(entry) = &opts.entry {
        if entry.is_empty() || entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("boot entry {entry:?} is not a menu label");
        }
    }
    let matcher = Matcher::new(&opts.expect, &opts.extra_fail)?;
    let mut log = open_log(opts.log.as_deref())?;
    let first = match opts.accel {
        Accel::Kvm => Accel::Kvm,
        Accel::Auto if kvm_available => Accel::Kvm,
        Accel::Auto | Accel::Tcg => Accel::Tcg,
    };
    match attempt(qemu, opts, first, &matcher, &mut log)? {
        Attempt::Done(outcome) => Ok(outcome),
        Attempt::KvmBroken(why, outcome) if opts.accel == Accel::Auto => {
            tracing::warn!("KVM does not work here ({why}); restarting the boot test with TCG");
            log_note(
                &mut log,
                &format!("KVM does not work ({why}); restarting with TCG"),
            );
            match attempt(qemu, opts, Accel::Tcg, &matcher, &mut log)? {
                Attempt::Done(outcome) => Ok(outcome),
                // TCG is never judged broken; keep the KVM attempt's outcome.
                Attempt::KvmBroken(..) => Ok(outcome),
            }
        }
        // Explicit KVM: no fallback; the reason says "KVM failed: ...".
        Attempt::KvmBroken(_, outcome) => Ok(outcome),
    }
}

/// Finds [`QEMU_BINARY`] on `PATH`.
fn find_qemu() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|p| is_executable(p))
        .with_context(|| {
            format!("{QEMU_BINARY} not found: install the Debian package {QEMU_PACKAGE}")
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Ok when `/dev/kvm` can be opened read-write.
fn kvm_usable() -> Result<()> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
        .map(drop)
        .with_context(|| format!("opening {KVM_DEVICE}"))
}

fn open_log(path: Option<&Path>) -> Result<Option<File>> {
    path.map(|p| File::create(p).with_context(|| format!("creating boot test log {}", p.display())))
        .transpose()
}

/// Best effort: a failing log write must not fail the boot test.
fn log_note(log: &mut Option<File>, note: &str) {
    if let Some(f) = log {
        let _ = writeln!(f, "\n---- boot-test: {note} ----");
    }
}

/// QEMU's command line for one attempt (without the program name).
pub fn qemu_args(opts: &BootTestOptions, accel: Accel) -> Vec<String> {
    let mut args: Vec<String> = vec!["-name".into(), "btrfs-deploy-boot-test".into()];
    match accel {
        Accel::Kvm => args.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
        Accel::Tcg | Accel::Auto => args.extend(["-accel", "tcg"].map(String::from)),
    }
    args.extend(["-m".into(), opts.memory_mib.to_string()]);
    if opts.reboots == 0 {
        args.push("-no-reboot".into());
    }
    if opts.watchdog {
        args.extend(["-device", "i6300esb", "-action", "watchdog=reset"].map(String::from));
    }
    args.extend(
        [
            "-display", "none", "-vga", "none", "-nic", "none", "-monitor", "none", "-serial",
            "stdio",
        ]
        .map(String::from),
    );
    if opts.firmware == Firmware::Uefi {
        args.extend([
            "-drive".into(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
        ]);
        let vars = opts
            .uefi_vars
            .as_deref()
            .unwrap_or(Path::new(OVMF_VARS))
            .to_string_lossy()
            .replace(',', ",,");
        args.extend([
            "-drive".into(),
            format!("if=pflash,format=raw,unit=1,file={vars}"),
        ]);
    }
    args.push("-drive".into());
    // QEMU option values escape a comma by doubling it.
    let file = opts.image.to_string_lossy().replace(',', ",,");
    args.push(format!("file={file},format=raw,if=virtio"));
    if !opts.persist {
        args.push("-snapshot".into());
    }
    args
}

/// How one QEMU run ended.
enum Attempt {
    /// A decision (pass or fail) that stands.
    Done(BootTestOutcome),
    /// KVM is broken here; the outcome is what was seen so far.
    KvmBroken(String, BootTestOutcome),
}

/// Something read from QEMU by the reader threads.
enum Event {
    Serial(Vec<u8>),
    SerialEof,
    Stderr(String),
}

/// A running QEMU, killed and reaped on drop.
struct Qemu {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Qemu {
    fn spawn(qemu: &Path, args: &[String], tx: Sender<Event>) -> Result<Self> {
        tracing::debug!("running {} {}", qemu.display(), args.join(" "));
        let mut cmd = Command::new(qemu);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill
        // QEMU if this process dies, so no guest outlives a killed test run.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", qemu.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let qemu = Qemu { child, stdin };
        if let Some(out) = stdout {
            let tx = tx.clone();
            thread::spawn(move || read_serial(out, tx));
        }
        if let Some(err) = stderr {
            thread::spawn(move || read_stderr(err, tx));
        }
        Ok(qemu)
    }

    /// Types `text` on the guest's serial line.
    fn type_text(&mut self, text: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("QEMU's stdin is closed")?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .context("typing on the guest's serial console")
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for QEMU to exit by itself.
    fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills QEMU (if still running) and reaps it.
    fn kill(&mut self) {
        self.stdin = None;
        if self.try_wait().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_serial(mut out: impl Read, tx: Sender<Event>) {
    let mut buf = [0u8; 4096];
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(Event::Serial(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Event::SerialEof);
}

fn read_stderr(err: impl Read, tx: Sender<Event>) {
    for line in BufReader::new(err).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if tx.send(Event::Stderr(text)).is_err() {
            return;
        }
    }
}

/// Runs QEMU once with `accel` until a decision.
fn attempt(
    qemu_bin: &Path,
    opts: &BootTestOptions,
    accel: Accel,
    matcher: &Matcher,
    log: &mut Option<File>,
) -> Result<Attempt> {
    let (tx, rx) = mpsc::channel();
    let args = qemu_args(opts, accel);
    let start = Instant::now();
    let mut qemu = Qemu::spawn(qemu_bin, &args, tx)?;
    let mut session = Session::new(opts, accel, matcher, start);
    let end = session.watch(&mut qemu, &rx, log);
    if end == SessionEnd::Passed && opts.persist {
        // Give the guest the chance to sync and power off by itself.
        drain_until_exit(&mut qemu, &rx, &mut session, log);
    }
    qemu.kill();
    Ok(session.finish(end))
}

/// After a pass with `persist`: keeps logging until QEMU exits (bounded).
fn drain_until_exit(
    qemu: &mut Qemu,
    rx: &Receiver<Event>,
    session: &mut Session,
    log: &mut Option<File>,
) {
    let end = Instant::now() + PERSIST_GRACE;
    while Instant::now() < end {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Serial(bytes)) => {
                session.console.feed(&bytes, log);
            }
            Ok(Event::Stderr(line)) => session.note_stderr(&line, log),
            Ok(Event::SerialEof) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if qemu.try_wait().is_some() {
            break;
        }
    }
    let _ = qemu.wait_for_exit(Duration::from_millis(500));
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SessionEnd {
    Passed,
    Failed(String),
    KvmBroken(String),
}

/// The state of one QEMU run: console, decisions, typing.
struct Session<'a> {
    opts: &'a BootTestOptions,
    accel: Accel,
    matcher: &'a Matcher,
    start: Instant,
    console: Console,
    stderr_tail: VecDeque<String>,
    typed: bool,
    last_text_check: Option<Instant>,
    text_dirty: bool,
    decided_at: Option<Instant>,
    /// Which boot of the run the guest is in (1 = the first).
    boot: u32,
    /// Whether a firmware banner was seen (the first one starts boot 1).
    seen_boot_start: bool,
    /// Length of the console text when the current boot started.
    boot_text_start: usize,
    boot_start: Regex,
}

impl<'a> Session<'a> {
    fn new(opts: &'a BootTestOptions, accel: Accel, matcher: &'a Matcher, start: Instant) -> Self {
        Session {
            opts,
            accel,
            matcher,
            start,
            console: Console::default(),
            stderr_tail: VecDeque::new(),
            typed: false,
            last_text_check: None,
            text_dirty: false,
            decided_at: None,
            boot: 1,
            seen_boot_start: false,
            boot_text_start: 0,
            boot_start: Regex::new(BOOT_START).expect("BOOT_START is a valid pattern"),
        }
    }

    /// Whether the guest is in the boot where `expect` counts.
    fn in_last_boot(&self) -> bool {
        self.boot > self.opts.reboots
    }

    /// Notes a firmware banner: after the first, a new boot begins.
    fn on_boot_start(&mut self, log: &mut Option<File>) -> Option<SessionEnd> {
        if !self.seen_boot_start {
            self.seen_boot_start = true;
            return None;
        }
        self.boot += 1;
        self.typed = false;
        self.boot_text_start = self.console.full_text().len();
        log_note(log, &format!("boot {} (the guest rebooted)", self.boot));
        tracing::info!("the guest rebooted: boot {}", self.boot);
        if self.boot > self.opts.reboots + 1 {
            return Some(SessionEnd::Failed(format!(
                "the guest rebooted more than {} time(s) before the expected text appeared",
                self.opts.reboots
            )));
        }
        None
    }

    /// Reads QEMU's output until a decision.
    fn watch(
        &mut self,
        qemu: &mut Qemu,
        rx: &Receiver<Event>,
        log: &mut Option<File>,
    ) -> SessionEnd {
        let deadline = self.start + self.opts.timeout;
        let end = loop {
            let now = Instant::now();
            let wake = self.next_wake(deadline, now);
            let event = rx.recv_timeout(wake.saturating_duration_since(now));
            let step = match event {
                Ok(Event::Serial(bytes)) => self.on_serial(&bytes, qemu, log),
                Ok(Event::Stderr(line)) => self.on_stderr(&line, log),
                Ok(Event::SerialEof) | Err(RecvTimeoutError::Disconnected) => {
                    Some(self.on_exit(qemu, rx, log))
                }
                Err(RecvTimeoutError::Timeout) => self.on_tick(deadline),
            };
            if let Some(end) = step {
                break end;
            }
        };
        self.decided_at = Some(Instant::now());
        end
    }

    /// When the loop must wake up even without output.
    fn next_wake(&self, deadline: Instant, now: Instant) -> Instant {
        let mut wake = deadline;
        if self.liveness_applies() {
            wake = wake.min(self.start + KVM_LIVENESS);
        }
        if self.text_dirty {
            wake = wake.min(now + TEXT_CHECK_INTERVAL);
        }
        wake
    }

    fn liveness_applies(&self) -> bool {
        self.accel == Accel::Kvm && !self.console.seen_output()
    }

    fn on_serial(
        &mut self,
        bytes: &[u8],
        qemu: &mut Qemu,
        log: &mut Option<File>,
    ) -> Option<SessionEnd> {
        let lines = self.console.feed(bytes, log);
        for l in &lines {
            if self.opts.reboots > 0 && self.boot_start.is_match(l) {
                if let Some(end) = self.on_boot_start(log) {
                    return Some(end);
                }
                continue;
            }
            let decision = self.matcher.check_line(l, self.in_last_boot());
            if let Some(end) = decision.end() {
                return Some(end);
            }
        }
        self.maybe_type(qemu, &lines);
        self.text_dirty = true;
        self.check_text(false)
    }

    /// Types the menu label once the SYSLINUX prompt shows.
    fn maybe_type(&mut self, qemu: &mut Qemu, new_lines: &[String]) {
        let Some(entry) = &self.opts.entry else {
            return;
        };
        if self.typed {
            return;
        }
        let prompt = self.console.partial().contains(SYSLINUX_PROMPT)
            || new_lines.iter().any(|l| l.contains(SYSLINUX_PROMPT));
        if prompt {
            self.typed = true;
            tracing::debug!("typing {entry:?} at the boot prompt");
            if let Err(e) = qemu.type_text(&format!("{entry}\r")) {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Matches the whole text, at most every [`TEXT_CHECK_INTERVAL`] unless
    /// `force`.
    fn check_text(&mut self, force: bool) -> Option<SessionEnd> {
        if !self.text_dirty {
            return None;
        }
        let now = Instant::now();
        let due = self
            .last_text_check
            .is_none_or(|t| now.duration_since(t) >= TEXT_CHECK_INTERVAL);
        if !force && !due {
            return None;
        }
        self.last_text_check = Some(now);
        self.text_dirty = false;
        if !self.in_last_boot() {
            return None;
        }
        let text = self.console.full_text();
        self.matcher
            .check_text(text.get(self.boot_text_start..).unwrap_or(&text))
            .end()
    }

    fn on_stderr(&mut self, line: &str, log: &mut Option<File>) -> Option<SessionEnd> {
        self.note_stderr(line, log);
        if self.accel == Accel::Kvm && is_kvm_failure(line) {
            return Some(SessionEnd::KvmBroken(format!("QEMU reported: {line}")));
        }
        None
    }

    fn note_stderr(&mut self, line: &str, log: &mut Option<File>) {
        if line.is_empty() {
            return;
        }
        tracing::debug!("qemu: {line}");
        if let Some(f) = log {
            let _ = writeln!(f, "[qemu] {line}");
        }
        self.stderr_tail.push_back(line.to_string());
        if self.stderr_tail.len() > STDERR_TAIL_LINES {
            self.stderr_tail.pop_front();
        }
    }

    fn on_tick(&mut self, deadline: Instant) -> Option<SessionEnd> {
        if let Some(end) = self.check_text(true) {
            return Some(end);
        }
        let now = Instant::now();
        if self.liveness_applies() && now >= self.start + KVM_LIVENESS {
            return Some(SessionEnd::KvmBroken(format!(
                "no serial output within {} s",
                KVM_LIVENESS.as_secs()
            )));
        }
        if now >= deadline {
            return Some(SessionEnd::Failed(self.timeout_reason()));
        }
        None
    }

    fn timeout_reason(&self) -> String {
        let mut reason = format!("timeout after {} s", self.opts.timeout.as_secs());
        if self.opts.entry.is_some() && !self.typed {
            reason.push_str(&format!(" (the {SYSLINUX_PROMPT} prompt never appeared)"));
        } else if !self.console.seen_output() {
            reason.push_str(" (no console output at all)");
        }
        reason
    }

    /// QEMU closed the serial line: it is exiting.
    fn on_exit(
        &mut self,
        qemu: &mut Qemu,
        rx: &Receiver<Event>,
        log: &mut Option<File>,
    ) -> SessionEnd {
        let status = qemu.wait_for_exit(Duration::from_secs(5));
        // Collect QEMU's last words (the stderr reader may lag behind).
        let end = Instant::now() + Duration::from_secs(1);
        while let Ok(event) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            match event {
                Event::Stderr(line) => self.note_stderr(&line, log),
                Event::Serial(bytes) => {
                    self.console.feed(&bytes, log);
                }
                Event::SerialEof => {}
            }
        }
        // Whatever is left: the unterminated last line and the whole text.
        if let Some(end) = self.final_checks() {
            return end;
        }
        let failed_run = status.is_some_and(|s| !s.success());
        if self.accel == Accel::Kvm && !self.console.seen_output() && failed_run {
            return SessionEnd::KvmBroken(format!("QEMU exited with {}", describe_status(status)));
        }
        SessionEnd::Failed(exit_reason(
            status,
            self.console.seen_output(),
            &self.stderr_tail,
        ))
    }

    fn final_checks(&mut self) -> Option<SessionEnd> {
        let partial = self.console.partial();
        if !partial.is_empty() {
            if let Some(end) = self.matcher.check_line(&partial, self.in_last_boot()).end() {
                return Some(end);
            }
        }
        self.text_dirty = true;
        self.check_text(true)
    }

    fn finish(self, end: SessionEnd) -> Attempt {
        let elapsed = self
            .decided_at
            .unwrap_or_else(Instant::now)
            .duration_since(self.start);
        let mut outcome = BootTestOutcome {
            passed: false,
            elapsed,
            accel_used: self.accel,
            reason: String::new(),
            console: self.console.full_text(),
            tail: self.console.tail(TAIL_LINES),
        };
        match end {
            SessionEnd::Passed => {
                outcome.passed = true;
                outcome.reason = "matched".into();
                Attempt::Done(outcome)
            }
            SessionEnd::Failed(reason) => {
                outcome.reason = reason;
                Attempt::Done(outcome)
            }
            SessionEnd::KvmBroken(why) => {
                outcome.reason = format!("KVM failed: {why}");
                Attempt::KvmBroken(why, outcome)
            }
        }
    }
}

fn is_kvm_failure(stderr_line: &str) -> bool {
    KVM_FAILURE_MARKERS.iter().any(|m| stderr_line.contains(m))
}

fn describe_status(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => match s.code() {
            Some(code) => format!("exit status {code}"),
            None => format!("{s}"),
        },
        None => "no exit status (still running)".into(),
    }
}

/// Why a run whose QEMU exited before the expected text failed.
fn exit_reason(
    status: Option<ExitStatus>,
    seen_output: bool,
    stderr_tail: &VecDeque<String>,
) -> String {
    let clean_exit = status.is_some_and(|s| s.success());
    if clean_exit && seen_output {
        return "guest powered off before the expected text appeared".into();
    }
    let mut reason = format!(
        "QEMU exited ({}) before the expected text appeared",
        describe_status(status)
    );
    if !stderr_tail.is_empty() {
        let joined: Vec<&str> = stderr_tail.iter().map(String::as_str).collect();
        reason.push_str(": ");
        reason.push_str(&joined.join(" | "));
    }
    reason
}

/// What a piece of console text means for the test.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Continue,
    Pass,
    Fail(String),
}

impl Decision {
    /// The session end this decision means, if any.
    fn end(self) -> Option<SessionEnd> {
        match self {
            Decision::Continue => None,
            Decision::Pass => Some(SessionEnd::Passed),
            Decision::Fail(reason) => Some(SessionEnd::Failed(reason)),
        }
    }
}

/// Compiles a console pattern given by the user (`--expect`, `--fail-on`).
/// Refuses one that can match the empty string (`''`, `'login:|'`, `'x*'`,
/// `'^'`, `'(?:)'`, `'\b'`): such a pattern "matches" before the guest
/// printed anything, so `--expect` would pass and `--fail-on` fail at once.
/// The error text names the option, the pattern and why.
pub(crate) fn console_pattern(option: &str, pattern: &str) -> Result<Regex, String> {
    let re = Regex::new(pattern)
        .map_err(|e| format!("invalid {option} regular expression {pattern:?}: {e}"))?;
    let min_len = regex_syntax::parse(pattern)
        .map_err(|e| format!("invalid {option} regular expression {pattern:?}: {e}"))?
        .properties()
        .minimum_len();
    if min_len == Some(0) {
        let effect = if option == "--expect" {
            "the test would pass before the guest printed anything"
        } else {
            "the test would fail before the guest printed anything"
        };
        return Err(format!(
            "{option} regular expression {pattern:?} matches the empty string, so {effect}: \
             give a pattern that needs at least one character of console text (e.g. 'login:'; \
             remove an empty alternative such as a trailing '|')"
        ));
    }
    Ok(re)
}

/// True when `re` matches some text of `hay` (an empty match never counts:
/// only text that appeared on the console can decide a test).
fn matches_text(re: &Regex, hay: &str) -> bool {
    re.find_iter(hay).any(|m| !m.is_empty())
}

/// The expected pattern and the fatal ones.
struct Matcher {
    expect: Regex,
    /// (pattern, what a match means)
    fatal: Vec<(Regex, &'static str)>,
}

impl Matcher {
    fn new(expect: &Regex, extra_fail: &[Regex]) -> Result<Self> {
        let mut fatal = Vec::new();
        for (pattern, meaning) in BUILTIN_FAIL_PATTERNS {
            let re =
                Regex::new(pattern).with_context(|| format!("built-in fail pattern {pattern}"))?;
            fatal.push((re, *meaning));
        }
        fatal.extend(
            extra_fail
                .iter()
                .map(|re| (re.clone(), "fatal console output")),
        );
        Ok(Matcher {
            expect: expect.clone(),
            fatal,
        })
    }

    /// A complete console line: fatal patterns first, then the expectation.
    /// Before the last boot of a run with reboots (`last_boot` false) only
    /// `--fail-on` patterns count: a trial that panics is expected to reboot.
    fn check_line(&self, line: &str, last_boot: bool) -> Decision {
        for (i, (re, meaning)) in self.fatal.iter().enumerate() {
            if !last_boot && i < BUILTIN_FAIL_PATTERNS.len() {
                continue;
            }
            if matches_text(re, line) {
                return Decision::Fail(format!("{meaning}: {}", line.trim()));
            }
        }
        if !last_boot {
            return Decision::Continue;
        }
        if matches_text(&self.expect, line) {
            return Decision::Pass;
        }
        Decision::Continue
    }

    /// The whole console text (for patterns spanning lines or an
    /// unterminated last line): only the expectation.
    fn check_text(&self, text: &str) -> Decision {
        if matches_text(&self.expect, text) {
            Decision::Pass
        } else {
            Decision::Continue
        }
    }
}

/// Removes ANSI escape sequences, carriage returns and other control
/// characters (except `\n` and `\t`) from a byte stream fed in chunks.
#[derive(Debug, Default)]
struct AnsiStripper {
    state: EscState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EscState {
    #[default]
    Text,
    /// After ESC.
    Esc,
    /// Inside `ESC [ ...` until a final byte 0x40..=0x7e.
    Csi,
    /// Inside `ESC ] ...` (or P, X, ^, _) until BEL or `ESC \`.
    Str,
    /// ESC seen inside a string sequence.
    StrEsc,
    /// After `ESC (`-style two-byte prefixes: skip one more byte.
    Skip1,
}

impl AnsiStripper {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.state = match (self.state, b) {
                (EscState::Text, 0x1b) => EscState::Esc,
                (EscState::Text, b'\n' | b'\t') => {
                    out.push(b);
                    EscState::Text
                }
                (EscState::Text, b) if b < 0x20 || b == 0x7f => EscState::Text,
                (EscState::Text, b) => {
                    out.push(b);
                    EscState::Text
                }
                (EscState::Esc, b'[') => EscState::Csi,
                (EscState::Esc, b']' | b'P' | b'X' | b'^' | b'_') => EscState::Str,
                (EscState::Esc, b'(' | b')' | b'*' | b'+' | b'#' | b'%') => EscState::Skip1,
                (EscState::Esc, _) => EscState::Text,
                (EscState::Csi, 0x40..=0x7e) => EscState::Text,
                (EscState::Csi, _) => EscState::Csi,
                (EscState::Str, 0x07) => EscState::Text,
                (EscState::Str, 0x1b) => EscState::StrEsc,
                (EscState::Str, _) => EscState::Str,
                (EscState::StrEsc, b'\\') => EscState::Text,
                (EscState::StrEsc, _) => EscState::Str,
                (EscState::Skip1, _) => EscState::Text,
            };
        }
    }
}

/// Splits cleaned bytes into lines; keeps the unterminated last line.
#[derive(Debug, Default)]
struct LineAssembler {
    partial: Vec<u8>,
}

impl LineAssembler {
    /// Adds bytes; returns the lines they complete (without `\n`).
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
            } else {
                self.partial.push(b);
            }
        }
        lines
    }

    fn partial(&self) -> String {
        String::from_utf8_lossy(&self.partial).into_owned()
    }
}

/// The serial console seen so far.
#[derive(Debug, Default)]
struct Console {
    stripper: AnsiStripper,
    lines: LineAssembler,
    /// Completed lines, each followed by `\n`.
    text: String,
    /// The last completed lines.
    recent: VecDeque<String>,
    raw_bytes: usize,
}

impl Console {
    /// Feeds raw serial bytes; writes the cleaned text to `log`; returns the
    /// lines completed by them.
    fn feed(&mut self, raw: &[u8], log: &mut Option<File>) -> Vec<String> {
        self.raw_bytes += raw.len();
        let mut clean = Vec::with_capacity(raw.len());
        self.stripper.feed(raw, &mut clean);
        if let Some(f) = log {
            let _ = f.write_all(&clean).and_then(|()| f.flush());
        }
        let lines = self.lines.push(&clean);
        for line in &lines {
            self.text.push_str(line);
            self.text.push('\n');
            self.recent.push_back(line.clone());
            if self.recent.len() > TAIL_LINES {
                self.recent.pop_front();
            }
        }
        lines
    }

    fn seen_output(&self) -> bool {
        self.raw_bytes > 0
    }

    fn partial(&self) -> String {
        self.lines.partial()
    }

    fn full_text(&self) -> String {
        let mut text = self.text.clone();
        text.push_str(&self.partial());
        text
    }

    /// The last `n` lines, including an unterminated last line.
    fn tail(&self, n: usize) -> Vec<String> {
        let mut lines: Vec<String> = self.recent.iter().cloned().collect();
        let partial = self.partial();
        if !partial.is_empty() {
            lines.push(partial);
        }
        let skip = lines.len().saturating_sub(n);
        lines.split_off(skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(chunks: &[&[u8]]) -> String {
        let mut s = AnsiStripper::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strips_csi_osc_and_carriage_returns() {
        assert_eq!(
            strip(&[b"\x1b[0m\x1b[1;32mOK\x1b[0m done\r\n"]),
            "OK done\n"
        );
        assert_eq!(strip(&[b"\x1b]0;title\x07after"]), "after");
        assert_eq!(strip(&[b"\x1b]0;title\x1b\\after"]), "after");
        assert_eq!(strip(&[b"a\x1b(Bb\x1b=c"]), "abc");
        assert_eq!(strip(&[b"tab\there\x00\x08\x0c!"]), "tab\there!");
        assert_eq!(strip(&[b"\x1b[?25l\x1b[2J\x1b[H", b"boot: "]), "boot: ");
    }

    #[test]
    fn strips_escapes_split_across_chunks() {
        assert_eq!(strip(&[b"ab\x1b", b"[3", b"1m", b"cd\r", b"\n"]), "abcd\n");
        assert_eq!(strip(&[b"\x1b]2;x", b"y\x1b", b"\\z"]), "z");
    }

    #[test]
    fn assembles_lines_across_chunks() {
        let mut a = LineAssembler::default();
        assert!(a.push(b"TINY: bo").is_empty());
        assert_eq!(a.partial(), "TINY: bo");
        assert_eq!(
            a.push(b"ot start\nTINY-MOUNT: / x\nboot:"),
            vec!["TINY: boot start", "TINY-MOUNT: / x"]
        );
        assert_eq!(a.partial(), "boot:");
        assert_eq!(a.push(b" \n"), vec!["boot: "]);
        assert_eq!(a.partial(), "");
    }

    #[test]
    fn assembles_utf8_split_across_chunks() {
        let mut a = LineAssembler::default();
        let bytes = "héllo\n".as_bytes();
        assert!(a.push(&bytes[..2]).is_empty());
        assert_eq!(a.push(&bytes[2..]), vec!["héllo"]);
    }

    #[test]
    fn console_keeps_text_tail_and_partial() {
        let mut c = Console::default();
        let mut log = None;
        for i in 0..40 {
            c.feed(format!("line {i}\r\n").as_bytes(), &mut log);
        }
        c.feed(b"\x1b[1mboot:\x1b[0m ", &mut log);
        assert!(c.seen_output());
        assert_eq!(c.partial(), "boot: ");
        let tail = c.tail(TAIL_LINES);
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.first().map(String::as_str), Some("line 11"));
        assert_eq!(tail.last().map(String::as_str), Some("boot: "));
        let text = c.full_text();
        assert!(text.starts_with("line 0\nline 1\n"));
        assert!(text.ends_with("line 39\nboot: "));
    }

    #[test]
    fn console_writes_clean_text_to_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = open_log(Some(&path)).unwrap();
        let mut c = Console::default();
        c.feed(b"\x1b[32mhello\r\n", &mut log);
        c.feed(b"wor", &mut log);
        c.feed(b"ld\r\n", &mut log);
        drop(log);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\nworld\n");
    }

    fn matcher(expect: &str, extra: &[&str]) -> Matcher {
        let extra: Vec<Regex> = extra.iter().map(|p| Regex::new(p).unwrap()).collect();
        Matcher::new(&Regex::new(expect).unwrap(), &extra).unwrap()
    }

    #[test]
    fn patterns_that_match_the_empty_string_are_refused() {
        for p in [
            "",
            "login:|",
            "|login:",
            "x*",
            "^",
            "$",
            "(?:)",
            "(?m)^",
            "a?",
            r"\b",
            "(login:)?",
        ] {
            for option in ["--expect", "--fail-on"] {
                let err = console_pattern(option, p).expect_err(p);
                assert!(
                    err.contains(option) && err.contains(&format!("{p:?}")),
                    "{err}"
                );
                assert!(err.contains("matches the empty string"), "{err}");
            }
        }
        for p in [
            "login:",
            "login:|TINY: boot done",
            "^TINY: boot done$",
            "a+",
            "x*y",
        ] {
            console_pattern("--expect", p).unwrap();
        }
        let err = console_pattern("--expect", "(").unwrap_err();
        assert!(err.contains("invalid --expect regular expression"), "{err}");
    }

    #[test]
    fn before_the_last_boot_only_fail_on_patterns_count() {
        let m = Matcher::new(
            &Regex::new("TINY: boot done").unwrap(),
            &[Regex::new("EXPLODED").unwrap()],
        )
        .unwrap();
        // A trial that panics is expected to reboot; the expectation waits
        // for the last boot.
        assert_eq!(
            m.check_line("Kernel panic - not syncing: Attempted to kill init!", false),
            Decision::Continue
        );
        assert_eq!(m.check_line("TINY: boot done", false), Decision::Continue);
        assert!(matches!(m.check_line("EXPLODED", false), Decision::Fail(_)));
        assert!(matches!(
            m.check_line("Kernel panic - not syncing: Attempted to kill init!", true),
            Decision::Fail(_)
        ));
        assert_eq!(m.check_line("TINY: boot done", true), Decision::Pass);
        let opts = BootTestOptions {
            reboots: 3,
            watchdog: true,
            ..BootTestOptions::new("/x.img", Regex::new("x").unwrap())
        };
        let args = qemu_args(&opts, Accel::Tcg).join(" ");
        assert!(!args.contains("-no-reboot"), "{args}");
        assert!(
            args.contains("-device i6300esb -action watchdog=reset"),
            "{args}"
        );
        let start = Regex::new(BOOT_START).unwrap();
        assert!(
            start.is_match("SYSLINUX 6.04 20210613 Copyright (C) 1994-2015 H. Peter Anvin et al")
        );
        assert!(!start.is_match("TINY-HOOK: SYSLINUX 6"));
    }

    #[test]
    fn an_empty_match_never_decides_a_test() {
        // Built directly (not through console_pattern): still no pass on an
        // empty line or on text the pattern only matches emptily.
        let m = matcher("login:|", &["x*"]);
        assert_eq!(m.check_line("", true), Decision::Continue);
        assert_eq!(m.check_line("booting", true), Decision::Continue);
        assert_eq!(m.check_text(""), Decision::Continue);
        assert_eq!(m.check_line("debian login: ", true), Decision::Pass);
        assert!(matches!(m.check_line("xx", true), Decision::Fail(_)));
    }

    #[test]
    fn decides_pass_on_line_and_on_text() {
        let m = matcher("^TINY: boot done$", &[]);
        assert_eq!(m.check_line("TINY: boot start", true), Decision::Continue);
        assert_eq!(m.check_line("TINY: boot done", true), Decision::Pass);
        // Anchors are per line: the whole text does not match without (?m).
        assert_eq!(m.check_text("a\nTINY: boot done\n"), Decision::Continue);
        let m = matcher(
            r"(?s)TINY-MOUNT: / /systems/x/run.*TINY-MOUNT: /home /state/home",
            &[],
        );
        assert_eq!(
            m.check_line("TINY-MOUNT: / /systems/x/run rw", true),
            Decision::Continue
        );
        assert_eq!(
            m.check_text("TINY-MOUNT: / /systems/x/run rw\nTINY-MOUNT: /home /state/home rw\n"),
            Decision::Pass
        );
    }

    #[test]
    fn decides_fail_on_panic_and_extra_patterns_before_expect() {
        let m = matcher("TINY", &["^TINY-INITRAMFS: FAILED"]);
        match m.check_line(
            "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs",
            true,
        ) {
            Decision::Fail(r) => assert!(r.starts_with("kernel panic: "), "{r}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        // The line matches expect too, but the fatal pattern wins.
        match m.check_line(
            "TINY-INITRAMFS: FAILED: root device UUID=x not found (vda)",
            true,
        ) {
            Decision::Fail(r) => assert_eq!(
                r,
                "fatal console output: TINY-INITRAMFS: FAILED: root device UUID=x not found (vda)"
            ),
            other => panic!("expected a failure, got {other:?}"),
        }
        for line in [
            "Loading /systems/x/kernel... btrfs: found compressed data, cannot continue!",
            "failed: I/O error",
            "Loading /systems/default/initramfs...failed: No such file or directory",
        ] {
            match m.check_line(line, true) {
                Decision::Fail(r) => assert!(r.starts_with("bootloader failed: "), "{r}"),
                other => panic!("expected a failure for {line:?}, got {other:?}"),
            }
        }
        assert_eq!(
            m.check_line("Loading /systems/x/kernel... ok", true),
            Decision::Continue
        );
        assert_eq!(m.check_line("TINY: boot start", true), Decision::Pass);
    }

    #[test]
    fn exit_reasons() {
        use std::os::unix::process::ExitStatusExt;
        let ok = Some(ExitStatus::from_raw(0));
        let err = Some(ExitStatus::from_raw(1 << 8));
        let mut stderr = VecDeque::new();
        assert_eq!(
            exit_reason(ok, true, &stderr),
            "guest powered off before the expected text appeared"
        );
        stderr.push_back("qemu-system-x86_64: -drive file=x: Could not open 'x'".to_string());
        let r = exit_reason(err, false, &stderr);
        assert!(r.starts_with("QEMU exited (exit status 1)"), "{r}");
        assert!(r.ends_with("Could not open 'x'"), "{r}");
    }

    #[test]
    fn kvm_failure_markers() {
        assert!(is_kvm_failure("KVM internal error. Suberror: 1"));
        assert!(is_kvm_failure("emulation failure"));
        assert!(!is_kvm_failure(
            "qemu-system-x86_64: warning: host doesn't support requested feature"
        ));
    }

    #[test]
    fn accel_parses_and_displays() {
        for a in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
            assert_eq!(a.to_string().parse::<Accel>().unwrap(), a);
        }
        assert!("hvf".parse::<Accel>().is_err());
    }

    #[test]
    fn qemu_command_line() {
        let mut opts = BootTestOptions::new("/tmp/a,b.img", Regex::new("x").unwrap());
        let args = qemu_args(&opts, Accel::Tcg).join(" ");
        assert!(args.contains("-accel tcg"), "{args}");
        assert!(
            args.contains("-drive file=/tmp/a,,b.img,format=raw,if=virtio"),
            "{args}"
        );
        assert!(args.contains("-serial stdio"), "{args}");
        assert!(args.contains("-no-reboot"), "{args}");
        assert!(args.contains("-display none"), "{args}");
        assert!(args.ends_with("-snapshot"), "{args}");
        assert!(!args.contains("-kernel"), "{args}");
        opts.persist = true;
        opts.memory_mib = 256;
        let args = qemu_args(&opts, Accel::Kvm).join(" ");
        assert!(args.contains("-accel kvm -cpu host -m 256"), "{args}");
        assert!(!args.contains("-snapshot"), "{args}");
    }

    #[test]
    fn missing_image_is_an_error() {
        if find_qemu().is_err() {
            return; // the message for a missing QEMU is checked in real_boot
        }
        let opts = BootTestOptions::new("/nonexistent/disk.img", Regex::new("x").unwrap());
        let err = run(&opts).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/disk.img"), "{err}");
    }

    /// A stand-in for QEMU: a shell script whose behaviour depends on the
    /// accelerator it is given.
    fn fake_qemu(dir: &Path, kvm_body: &str, tcg_body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("fake-qemu");
        let script = format!(
            "#!/bin/sh\ncase \"$*\" in\n*'-accel kvm'*)\n{kvm_body}\n;;\n*)\n{tcg_body}\n;;\nesac\n"
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Options for the fake: an existing "image", short timeout.
    fn fake_opts(dir: &Path, expect: &str, accel: Accel) -> BootTestOptions {
        let image = dir.join("disk.img");
        std::fs::write(&image, b"").unwrap();
        let mut opts = BootTestOptions::new(image, Regex::new(expect).unwrap());
        opts.accel = accel;
        opts.timeout = Duration::from_secs(20);
        opts
    }

    const FAKE_BOOT: &str = r#"printf '\033[0mSYSLINUX 6.04\r\nboot: '
label=$(head -c 2)
printf '\r\nchosen=%s\r\n' "$(printf %s "$label" | od -An -c | tr -d ' ')"
echo 'TINY: boot done'"#;

    #[test]
    fn auto_falls_back_to_tcg_when_kvm_prints_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(dir.path(), "exec sleep 60", FAKE_BOOT);
        let mut opts = fake_opts(dir.path(), "^TINY: boot done$", Accel::Auto);
        opts.entry = Some("x".into());
        opts.log = Some(dir.path().join("log"));
        let start = Instant::now();
        let o = run_with(&qemu, &opts, true).unwrap();
        assert!(o.passed, "{o:?}");
        assert_eq!(o.accel_used, Accel::Tcg);
        assert!(
            o.console.contains("chosen=x\\r\n"),
            "the label and a carriage return are typed: {o:?}"
        );
        let total = start.elapsed();
        assert!(
            total >= KVM_LIVENESS && total < KVM_LIVENESS + Duration::from_secs(5),
            "{total:?}"
        );
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert!(
            log.contains("no serial output within 5 s); restarting with TCG"),
            "{log}"
        );
    }

    #[test]
    fn auto_falls_back_to_tcg_on_kvm_errors() {
        let dir = tempfile::tempdir().unwrap();
        for kvm in [
            "echo 'KVM internal error. Suberror: 1' >&2; echo 'emulation failure' >&2; exec sleep 60",
            "echo 'qemu-system-x86_64: failed to initialize kvm: Permission denied' >&2; exit 1",
        ] {
            let qemu = fake_qemu(dir.path(), kvm, FAKE_BOOT);
            let mut opts = fake_opts(dir.path(), "^TINY: boot done$", Accel::Auto);
            opts.entry = Some("y".into());
            let start = Instant::now();
            let o = run_with(&qemu, &opts, true).unwrap();
            assert!(o.passed, "{o:?}");
            assert_eq!(o.accel_used, Accel::Tcg);
            assert!(start.elapsed() < Duration::from_secs(4), "KVM errors are detected at once");

            // Explicit KVM: no fallback.
            let opts = fake_opts(dir.path(), "^TINY: boot done$", Accel::Kvm);
            let o = run_with(&qemu, &opts, true).unwrap();
            assert!(!o.passed);
            assert_eq!(o.accel_used, Accel::Kvm);
            assert!(o.reason.starts_with("KVM failed: "), "{}", o.reason);
        }
    }

    #[test]
    fn outcomes_of_fake_runs() {
        let dir = tempfile::tempdir().unwrap();
        // Powered off before the text.
        let qemu = fake_qemu(dir.path(), "exit 1", "echo 'TINY: boot start'; exit 0");
        let o = run_with(
            &qemu,
            &fake_opts(dir.path(), "boot done", Accel::Tcg),
            false,
        )
        .unwrap();
        assert!(!o.passed);
        assert_eq!(
            o.reason,
            "guest powered off before the expected text appeared"
        );
        assert_eq!(o.tail, vec!["TINY: boot start"]);

        // Matched on an unterminated last line, at exit.
        let qemu = fake_qemu(dir.path(), "exit 1", "printf 'a\\nready> '");
        let o = run_with(
            &qemu,
            &fake_opts(dir.path(), "^ready> $", Accel::Tcg),
            false,
        )
        .unwrap();
        assert!(o.passed, "{o:?}");

        // Timeout while the guest keeps running; QEMU is killed and reaped.
        let pid_file = dir.path().join("pid");
        let qemu = fake_qemu(
            dir.path(),
            "exit 1",
            &format!(
                "echo $$ > {}; echo hello; exec sleep 60",
                pid_file.display()
            ),
        );
        let mut opts = fake_opts(dir.path(), "never", Accel::Tcg);
        opts.timeout = Duration::from_secs(1);
        let start = Instant::now();
        let o = run_with(&qemu, &opts, false).unwrap();
        assert!(!o.passed);
        assert_eq!(o.reason, "timeout after 1 s");
        assert!(start.elapsed() < Duration::from_secs(3));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "QEMU (pid {pid}) is gone"
        );

        // With persist, the guest may finish after the match.
        let qemu = fake_qemu(
            dir.path(),
            "exit 1",
            "echo 'TINY: boot done'; sleep 1; echo synced; exit 0",
        );
        let mut opts = fake_opts(dir.path(), "boot done", Accel::Tcg);
        opts.persist = true;
        let o = run_with(&qemu, &opts, false).unwrap();
        assert!(o.passed, "{o:?}");
        assert!(o.console.ends_with("synced\n"), "{o:?}");
        assert!(
            o.elapsed < Duration::from_secs(1),
            "elapsed is the time to the match"
        );

        // A kernel panic fails at once.
        let qemu = fake_qemu(
            dir.path(),
            "exit 1",
            "echo '[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs'; exec sleep 60",
        );
        let o = run_with(&qemu, &fake_opts(dir.path(), "never", Accel::Tcg), false).unwrap();
        assert!(!o.passed);
        assert!(o.reason.starts_with("kernel panic: "), "{}", o.reason);
        assert!(o.elapsed < Duration::from_secs(3));

        // QEMU refusing to start.
        let qemu = fake_qemu(
            dir.path(),
            "exit 1",
            "echo 'qemu: Could not open disk.img' >&2; exit 1",
        );
        let o = run_with(&qemu, &fake_opts(dir.path(), "x", Accel::Tcg), false).unwrap();
        assert!(!o.passed);
        assert!(
            o.reason.starts_with("QEMU exited (exit status 1)"),
            "{}",
            o.reason
        );
        assert!(o.reason.contains("Could not open disk.img"), "{}", o.reason);
    }

    /// Real boots of a whole-disk Btrfs image with extlinux, built here from
    /// the tiny system in the cache.
    mod real_boot {
        use super::*;
        use std::process::Command;

        /// Where `scripts/build-tiny-system.sh .cache` puts its output.
        fn tiny_cache() -> PathBuf {
            match std::env::var_os("BTRFS_DEPLOY_CACHE") {
                Some(dir) => PathBuf::from(dir).join("tiny"),
                None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tiny"),
            }
        }

        fn sh(cmd: &str) {
            let out = Command::new("sh").arg("-ec").arg(cmd).output().unwrap();
            assert!(
                out.status.success(),
                "{cmd} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        /// Unmounts on drop so a failing test leaves no mount behind.
        struct MountGuard(PathBuf);
        impl Drop for MountGuard {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }

        /// Builds the Part-B layout: versions x and y (hostname tinyy),
        /// `systems/default -> y`, extlinux with entries default, x, y.
        fn build_image(dir: &Path) -> PathBuf {
            let tiny = tiny_cache();
            let rootfs = tiny.join("rootfs");
            assert!(
                rootfs.join("sbin/init").exists(),
                "the tiny test system is missing at {}: run `scripts/build-tiny-system.sh .cache` in the project root",
                rootfs.display()
            );
            assert!(
                is_root(),
                "boot tests need root (loop mounts, mkfs.btrfs, extlinux)"
            );
            let kver = std::fs::read_to_string(tiny.join("kernel-version")).unwrap();
            let kver = kver.trim();
            let img = dir.join("disk.img");
            let mnt = dir.join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            let (img_s, mnt_s, root_s) = (img.display(), mnt.display(), rootfs.display());
            sh(&format!(
                "truncate -s 512M {img_s} && mkfs.btrfs -q {img_s}"
            ));
            let uuid = String::from_utf8(
                Command::new("blkid")
                    .args(["-s", "UUID", "-o", "value"])
                    .arg(&img)
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap()
            .trim()
            .to_string();
            assert!(!uuid.is_empty());
            sh(&format!("mount -o loop {img_s} {mnt_s}"));
            let _guard = MountGuard(mnt.clone());
            let entry = |label: &str, dir: &str| {
                format!(
                    "label {label}\n  kernel /systems/{dir}/kernel\n  initrd /systems/{dir}/initramfs\n  append root=UUID={uuid} rootfstype=btrfs rootflags=subvol=systems/{dir}/run rw console=tty0 console=ttyS0,115200\n\n"
                )
            };
            let conf = format!(
                "serial 0 115200\nprompt 1\ntimeout 10\ndefault default\n\n{}{}{}",
                entry("default", "default"),
                entry("x", "x"),
                entry("y", "y")
            );
            std::fs::write(dir.join("extlinux.conf"), conf).unwrap();
            sh(&format!(
                r#"cd {mnt_s}
                mkdir -p systems/x systems/y state extlinux
                btrfs -q subvolume create systems/x/run
                btrfs -q subvolume create state/home
                cp -a {root_s}/. systems/x/run/
                mv systems/x/run/home/* state/home/
                printf 'UUID={uuid} / btrfs defaults,rw,noatime 0 1\nUUID={uuid} /home btrfs subvol=/state/home,defaults,rw,noatime 0 2\n' >> systems/x/run/etc/fstab
                btrfs -q subvolume snapshot systems/x/run systems/y/run
                echo tinyy > systems/y/run/etc/hostname
                for v in x y; do
                    cp {root_s}/boot/vmlinuz-{kver} systems/$v/kernel
                    cp {root_s}/boot/initrd.img-{kver} systems/$v/initramfs
                done
                ln -s y systems/default
                cp {conf} extlinux/extlinux.conf
                ln -s extlinux/extlinux.conf extlinux.conf
                extlinux --install {mnt_s}/extlinux 2>/dev/null
                "#,
                conf = dir.join("extlinux.conf").display()
            ));
            drop(_guard);
            img
        }

        fn is_root() -> bool {
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() == 0 }
        }

        fn boot(img: &Path, entry: Option<&str>, expect: &str, accel: Accel) -> BootTestOutcome {
            let mut opts = BootTestOptions::new(img, Regex::new(expect).unwrap());
            opts.entry = entry.map(String::from);
            opts.accel = accel;
            opts.timeout = Duration::from_secs(120);
            opts.extra_fail = vec![Regex::new("^TINY-INITRAMFS: FAILED").unwrap()];
            opts.log = Some(img.with_extension("log"));
            run(&opts).unwrap()
        }

        fn show(o: &BootTestOutcome) -> String {
            format!(
                "{} after {:?} ({:?}):\n{}",
                o.reason,
                o.elapsed,
                o.accel_used,
                o.tail.join("\n")
            )
        }

        #[test]
        fn boots_default_and_chosen_entries() {
            let dir = tempfile::tempdir().unwrap();
            let img = build_image(dir.path());

            // Default entry: systems/default -> y, resolved by syslinux and
            // by the kernel's subvol= lookup.
            let o = boot(&img, None, "^TINY: boot done$", Accel::Auto);
            assert!(o.passed, "{}", show(&o));
            assert_eq!(o.reason, "matched");
            assert!(o.console.contains("TINY: hostname=tinyy\n"), "{}", show(&o));
            assert!(
                o.console.contains("TINY-MOUNT: / /systems/y/run "),
                "{}",
                show(&o)
            );
            assert!(
                o.console.contains("TINY-MOUNT: /home /state/home "),
                "{}",
                show(&o)
            );
            assert!(
                o.console.contains("rootflags=subvol=systems/default/run"),
                "{}",
                show(&o)
            );
            let log = std::fs::read_to_string(img.with_extension("log")).unwrap();
            assert!(log.contains("TINY: boot done"), "log: {log}");
            eprintln!(
                "default entry booted in {:?} with {}",
                o.elapsed, o.accel_used
            );

            // Entry x typed at the prompt.
            let o = boot(&img, Some("x"), "^TINY: boot done$", Accel::Tcg);
            assert!(o.passed, "{}", show(&o));
            assert_eq!(o.accel_used, Accel::Tcg);
            assert!(o.console.contains("TINY: hostname=tiny\n"), "{}", show(&o));
            assert!(
                o.console.contains("TINY-MOUNT: / /systems/x/run "),
                "{}",
                show(&o)
            );
        }

        #[test]
        fn fails_when_guest_powers_off_or_a_fatal_line_shows() {
            let dir = tempfile::tempdir().unwrap();
            let img = build_image(dir.path());

            let o = boot(&img, None, "^this never appears$", Accel::Tcg);
            assert!(!o.passed, "{}", show(&o));
            assert_eq!(
                o.reason,
                "guest powered off before the expected text appeared",
                "{}",
                show(&o)
            );
            assert!(
                o.tail.iter().any(|l| l == "TINY: boot done"),
                "{}",
                show(&o)
            );

            // A label that does not exist: syslinux says so and re-prompts.
            let o = boot(&img, Some("nosuch"), "^TINY: boot done$", Accel::Tcg);
            assert!(!o.passed, "{}", show(&o));
            assert_eq!(
                o.reason,
                "bootloader failed: Loading nosuch... failed: No such file or directory",
                "{}",
                show(&o)
            );

            let mut opts = BootTestOptions::new(&img, Regex::new("^TINY: boot done$").unwrap());
            opts.accel = Accel::Tcg;
            opts.timeout = Duration::from_secs(1);
            let o = run(&opts).unwrap();
            assert!(!o.passed);
            assert!(o.reason.starts_with("timeout after 1 s"), "{}", show(&o));
        }
    }
}
