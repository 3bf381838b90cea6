//! Boot testing: boot a disk image in QEMU through its own bootloader
//! (SeaBIOS → extlinux → kernel, or OVMF → systemd-boot → kernel), read the
//! serial console, and pass when the expected text appears within the
//! timeout. Another version than the default is booted by typing its label
//! at the SYSLINUX prompt, or under UEFI from an [`Overlay`] of the disk
//! whose `loader.conf` names it.
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
//!
//! Here: the options, the outcome and the entry point; `qemu` (the command
//! line per firmware, the process and its readers), `session` (attempts,
//! reboots, watchdog, the decision), `console` (text and pattern matching),
//! `overlay` (qcow2 overlays).

mod console;
mod overlay;
mod qemu;
mod session;
#[cfg(test)]
mod tests;

pub(crate) use console::console_pattern;
use console::*;
pub use overlay::Overlay;
pub use qemu::qemu_args;
use qemu::*;
use session::*;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

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
/// `qemu-img` and `qemu-io`, which make and write the overlay of a UEFI
/// `--version` boot.
pub const QEMU_IMG: crate::util::cmd::Tool = crate::util::cmd::Tool {
    program: "qemu-img",
    package: "qemu-utils",
};
/// See [`QEMU_IMG`].
pub const QEMU_IO: crate::util::cmd::Tool = crate::util::cmd::Tool {
    program: "qemu-io",
    package: "qemu-utils",
};
/// QEMU for arm64 guests (`-M virt`), and its Debian package.
pub const QEMU_ARM64_BINARY: &str = "qemu-system-aarch64";
/// The Debian package that provides [`QEMU_ARM64_BINARY`].
pub const QEMU_ARM64_PACKAGE: &str = "qemu-system-arm";
/// Debian's U-Boot for QEMU's arm64 `virt` board (given as `-bios`).
pub const UBOOT_ARM64: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
/// The Debian package that provides [`UBOOT_ARM64`].
pub const UBOOT_PACKAGE: &str = "u-boot-qemu";
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
    // U-Boot's distro boot: the extlinux.conf it found did not boot.
    (r"^EXTLINUX FAILED: continuing", "bootloader failed"),
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
    /// U-Boot on `qemu-system-aarch64 -M virt -cpu cortex-a57` (TCG):
    /// `extlinux/extlinux.conf` on the boot partition.
    UbootArm64,
}

impl Firmware {
    /// The QEMU binary that runs this firmware, and its Debian package.
    pub fn qemu(self) -> (&'static str, &'static str) {
        match self {
            Firmware::UbootArm64 => (QEMU_ARM64_BINARY, QEMU_ARM64_PACKAGE),
            _ => (QEMU_BINARY, QEMU_PACKAGE),
        }
    }
    /// The U-Boot image given as `-bios`, if this firmware is U-Boot.
    pub fn uboot_image(self) -> Option<&'static str> {
        match self {
            Firmware::UbootArm64 => Some(UBOOT_ARM64),
            _ => None,
        }
    }
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::UbootArm64 => "uboot",
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
    /// The disk image (or block device) to boot.
    pub image: PathBuf,
    /// Its format for QEMU: `raw`, or `qcow2` for an [`Overlay`].
    pub image_format: &'static str,
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
    /// Host ports forwarded to the guest; non-empty gives the guest a
    /// network card on QEMU's user-mode NAT (otherwise it has none).
    pub forward: Vec<Forward>,
}

/// `--forward [ADDR:]HOSTPORT:GUESTPORT`: a host TCP port forwarded to the
/// guest through QEMU's user-mode network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The host address to listen on (127.0.0.1 unless given).
    pub addr: std::net::IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The guest port it reaches.
    pub guest_port: u16,
}

impl Forward {
    /// Parses `[ADDR:]HOSTPORT:GUESTPORT` (ADDR an IPv4 address).
    pub fn parse(s: &str) -> Result<Forward, String> {
        let usage = "give [ADDR:]HOSTPORT:GUESTPORT, e.g. 2222:22 or 127.0.0.1:2222:22";
        let parts: Vec<&str> = s.split(':').collect();
        let (addr, host, guest) = match parts.as_slice() {
            [h, g] => ("127.0.0.1", *h, *g),
            [a, h, g] => (*a, *h, *g),
            _ => return Err(format!("{s:?} is not a port forward: {usage}")),
        };
        let addr: std::net::Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address: {usage}"))?;
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{p:?} is not a port (1-65535): {usage}")),
        };
        Ok(Forward {
            addr: addr.into(),
            host_port: port(host)?,
            guest_port: port(guest)?,
        })
    }
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
            image_format: "raw",
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
            forward: Vec::new(),
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
    let qemu = find_qemu(opts.firmware)?;
    if let Some(img) = opts.firmware.uboot_image() {
        if !Path::new(img).is_file() {
            bail!("{img} not found: U-Boot boot tests need Debian's U-Boot for QEMU; install the Debian package {UBOOT_PACKAGE}");
        }
    }
    let kvm = match opts.accel {
        Accel::Tcg => Err(anyhow::anyhow!("TCG was requested")),
        // An arm64 guest on this (amd64) host: emulated.
        _ if opts.firmware == Firmware::UbootArm64 && std::env::consts::ARCH != "aarch64" => Err(
            anyhow::anyhow!("an arm64 guest on a {} host", std::env::consts::ARCH),
        ),
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

/// Finds the QEMU binary of `firmware` ([`QEMU_BINARY`] or
/// [`QEMU_ARM64_BINARY`]) on `PATH`.
fn find_qemu(firmware: Firmware) -> Result<PathBuf> {
    let (binary, package) = firmware.qemu();
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| is_executable(p))
        .with_context(|| format!("{binary} not found: install the Debian package {package}"))
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
