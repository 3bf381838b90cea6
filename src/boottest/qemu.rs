//! QEMU's command line for each firmware (SeaBIOS, OVMF, U-Boot on
//! `-M virt`), the running QEMU process and the threads that read its
//! serial console and stderr.

use super::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// QEMU's command line for one attempt (without the program name).
pub fn qemu_args(opts: &BootTestOptions, accel: Accel) -> Vec<String> {
    let mut args: Vec<String> = vec!["-name".into(), "btrfs-deploy-boot-test".into()];
    if opts.firmware == Firmware::UbootArm64 {
        args.extend(["-M", "virt", "-cpu", "cortex-a57"].map(String::from));
    }
    if let Some(img) = opts.firmware.uboot_image() {
        args.extend(["-bios".to_string(), img.to_string()]);
    }
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
    args.extend(["-display", "none", "-vga", "none", "-nic"].map(String::from));
    if opts.forward.is_empty() {
        args.push("none".into());
    } else {
        let mut nic = String::from("user,model=virtio-net-pci");
        for f in &opts.forward {
            nic.push_str(&format!(
                ",hostfwd=tcp:{}:{}-:{}",
                f.addr, f.host_port, f.guest_port
            ));
        }
        args.push(nic);
    }
    args.extend(["-monitor", "none", "-serial", "stdio"].map(String::from));
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
    args.push(format!(
        "file={file},format={},if=virtio",
        opts.image_format
    ));
    if !opts.persist {
        args.push("-snapshot".into());
    }
    args
}

/// How one QEMU run ended.
pub(super) enum Attempt {
    /// A decision (pass or fail) that stands.
    Done(BootTestOutcome),
    /// KVM is broken here; the outcome is what was seen so far.
    KvmBroken(String, BootTestOutcome),
}

/// Something read from QEMU by the reader threads.
pub(super) enum Event {
    Serial(Vec<u8>),
    SerialEof,
    Stderr(String),
}

/// A running QEMU, killed and reaped on drop.
pub(super) struct Qemu {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Qemu {
    pub(super) fn spawn(qemu: &Path, args: &[String], tx: Sender<Event>) -> Result<Self> {
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
    pub(super) fn type_text(&mut self, text: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("QEMU's stdin is closed")?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .context("typing on the guest's serial console")
    }

    pub(super) fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for QEMU to exit by itself.
    pub(super) fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
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
    pub(super) fn kill(&mut self) {
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

pub(super) fn read_serial(mut out: impl Read, tx: Sender<Event>) {
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

pub(super) fn read_stderr(err: impl Read, tx: Sender<Event>) {
    for line in BufReader::new(err).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if tx.send(Event::Stderr(text)).is_err() {
            return;
        }
    }
}
