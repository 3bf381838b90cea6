//! The device's side of a trial (`store::trial`): `deploy trial-watch`
//! early at every boot, `deploy health` once the system is up, and
//! `deploy mark-good`. They act on the disk the running system booted
//! from, found from the mount of `/`.

use crate::app::target::with_disk;
use crate::store::lifecycle::{self, BootFinding};
use crate::store::trial::{self, Failure, State};
use crate::store::versions;
use crate::util::ui;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The device's configuration, written by the `on-device` extension.
pub const DEVICE_CONFIG: &str = "/etc/btrfs-deploy/deploy.toml";
/// The health checks of a trial boot.
pub const HEALTH_DIR: &str = "/etc/btrfs-deploy/health.d";
/// Where `health` tells `trial-watch` that the trial ended (with the boot id,
/// as /run may not be a tmpfs on a minimal system).
const ENDED_MARK: &str = "/run/btrfs-deploy-trial.ended";

/// The running version, its disk, and the trial its command line names.
struct Running {
    label: String,
    disk: PathBuf,
    cmdline_trial: Option<String>,
}

fn running(what: &str) -> Result<Running> {
    let Some((dev, label)) = crate::app::target::running_system() else {
        bail!(
            "{what} runs on a device booted from a btrfs-deploy disk, and / here is not a \
             version of one"
        );
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    Ok(Running {
        label,
        disk: crate::app::target::whole_disk(&dev),
        cmdline_trial: trial::from_cmdline(&cmdline),
    })
}

/// Seconds since boot.
fn uptime() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/uptime").context("reading /proc/uptime")?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .context("parsing /proc/uptime")
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The trial timeout: the option, else the device config's, else the default.
fn timeout(opt: Option<u64>) -> Result<u64> {
    if let Some(t) = opt {
        return Ok(t);
    }
    if Path::new(DEVICE_CONFIG).exists() {
        if let Some((_, cfg)) = crate::config::load(Some(Path::new(DEVICE_CONFIG)))? {
            if let Some(t) = cfg.trial_timeout {
                return Ok(t);
            }
        }
    }
    Ok(trial::DEFAULT_TIMEOUT_SECS)
}

fn mark_ended() {
    if let Err(e) = std::fs::write(ENDED_MARK, boot_id()) {
        tracing::warn!("writing {ENDED_MARK}: {e}");
    }
}

fn ended_this_boot() -> bool {
    std::fs::read_to_string(ENDED_MARK).is_ok_and(|s| s.trim() == boot_id())
}

/// Tells systemd that the last trial is settled (`Type=notify`: units
/// ordered after `btrfs-deploy-trial-watch.service` see the settled record,
/// and a trial boot's record says "booted" before the health checks run).
/// Nothing when not started by systemd (no `NOTIFY_SOCKET`).
fn notify_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_ready(&socket) {
        tracing::warn!("telling systemd that trial-watch is ready ({socket:?}): {e}");
    }
}

/// Sends `READY=1` to a notification socket: a path, or `@name` (abstract).
fn send_ready(socket: &std::ffi::OsStr) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let s = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(b"READY=1", &addr).map(|_| ())
        }
        None => s.send_to(b"READY=1", Path::new(socket)).map(|_| ()),
    }
}

/// Reboots now (onto the default: the one-shot boot is used). The outcome
/// is committed before this is called.
fn reboot() -> Result<()> {
    outln!("Rebooting onto the default version");
    nix::unistd::sync();
    // Under systemd a clean reboot; if that cannot be started, at once.
    if Path::new("/run/systemd/system").is_dir() {
        let ok = std::process::Command::new("systemctl")
            .arg("reboot")
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
    }
    nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
        .context("rebooting")
        .map(|_| ())
}

/// `deploy mark-good [TARGET]`.
pub fn mark_good(target: Option<&Path>) -> Result<()> {
    let r = running("mark-good")?;
    let target = target
        .filter(|t| *t != Path::new("/"))
        .map(Path::to_path_buf)
        .unwrap_or(r.disk.clone());
    with_disk(&target, false, |disk| {
        let top = &disk.layout;
        if !crate::app::target::is_running_disk(disk, &target) {
            bail!(
                "the running system is not on {}: mark-good makes the running version the default \
                 of its own disk; run it without TARGET",
                target.display()
            );
        }
        let default = versions::default_label(top)?;
        let open = trial::open(top)?;
        if default == r.label && open.is_none() {
            outln!("{} is the default already", r.label);
            return Ok(());
        }
        lifecycle::switch(top, &disk.boot(), &r.label, &disk.fs_uuid()?)?;
        ui::step(format!("{} is now the default", r.label));
        Ok(())
    })?;
    mark_ended();
    Ok(())
}

/// Ends the open trial of the running version as `failure` (only once it
/// is `booted` when `booted_only`); returns its fallback, or `None` when
/// there was no such trial (it had ended already).
fn fail_running_trial(r: &Running, failure: Failure, booted_only: bool) -> Result<Option<String>> {
    with_disk(&r.disk, false, |disk| {
        let top = &disk.layout;
        let open = trial::open(top)?
            .filter(|t| t.version == r.label && (!booted_only || t.state == State::Booted));
        let Some(t) = open else {
            return Ok(None);
        };
        let fallback = t.fallback.clone();
        lifecycle::end_trial(top, &disk.boot(), &disk.fs_uuid()?, t, Some(failure))?;
        Ok(Some(fallback))
    })
}

/// `deploy trial-watch`.
pub fn watch(timeout_opt: Option<u64>) -> Result<()> {
    let r = running("trial-watch")?;
    let limit = timeout(timeout_opt)?;
    let finding = with_disk(&r.disk, false, |disk| {
        lifecycle::settle_trial_at_boot(
            &disk.layout,
            &disk.boot(),
            &disk.fs_uuid()?,
            &r.label,
            r.cmdline_trial.as_deref(),
        )
    })?;
    notify_ready();
    let t = match finding {
        BootFinding::None => {
            outln!("trial-watch: no trial is open");
            return Ok(());
        }
        BootFinding::Pending(t) => {
            outln!("trial-watch: {}", t.describe());
            return Ok(());
        }
        BootFinding::Failed(t) => {
            outln!("trial-watch: the trial of {}", t.describe());
            return Ok(());
        }
        BootFinding::OnTrial(t) => t,
    };
    outln!(
        "trial-watch: this boot is the trial of {}; it must pass its health checks within {limit} s of boot",
        t.version
    );
    while uptime()? < limit as f64 {
        if ended_this_boot() {
            outln!("trial-watch: the trial of {} has ended", t.version);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let timed_out = fail_running_trial(&r, Failure::Timeout { seconds: limit }, true)?.is_some();
    if timed_out {
        errln!(
            "trial-watch: the trial of {} did not pass its health checks within {limit} s: failed",
            r.label
        );
        mark_ended();
        reboot()?;
    }
    Ok(())
}

/// The health checks: executables in `dir`, in name order (dot files and
/// non-executables skipped, with a note).
fn health_checks(dir: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let m = std::fs::metadata(e.path())?;
        if m.is_file() && m.permissions().mode() & 0o111 != 0 {
            out.push(e.path());
        } else {
            ui::detail(format!(
                "{} is not an executable file: skipped",
                e.path().display()
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// Runs one check with a deadline; `Err(status text)` when it fails.
fn run_check(check: &Path, deadline_secs: f64) -> Result<std::result::Result<(), String>> {
    let mut child = std::process::Command::new(check)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting health check {}", check.display()))?;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(if st.success() {
                Ok(())
            } else {
                Err(st.to_string())
            });
        }
        if uptime()? >= deadline_secs {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Err("killed: the trial timeout passed".into()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `deploy health`.
pub fn health(timeout_opt: Option<u64>, no_reboot: bool) -> Result<()> {
    let r = running("health")?;
    if r.cmdline_trial.as_deref() != Some(r.label.as_str()) {
        outln!("health: not a trial boot: nothing to decide");
        return Ok(());
    }
    let limit = timeout(timeout_opt)?;
    let checks = health_checks(Path::new(HEALTH_DIR))?;
    let mut failure = None;
    for c in &checks {
        let name = c
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        outln!("health: running {name}");
        match run_check(c, limit as f64)? {
            Ok(()) => {}
            Err(status) => {
                failure = Some(if status.starts_with("killed") {
                    Failure::Timeout { seconds: limit }
                } else {
                    Failure::Health {
                        check: name,
                        status,
                    }
                });
                break;
            }
        }
    }
    let Some(failure) = failure else {
        outln!(
            "health: {} passed {} check(s): making it the default",
            r.label,
            checks.len()
        );
        return mark_good(None);
    };
    let ended = fail_running_trial(&r, failure.clone(), false)?;
    mark_ended();
    match ended {
        Some(fallback) => errln!(
            "health: the trial of {} failed: {failure}; the default stays {fallback}",
            r.label
        ),
        None => errln!(
            "health: {} failed ({failure}), and its trial had already ended",
            r.label
        ),
    }
    if !no_reboot {
        reboot()?;
    }
    Err(crate::Verdict {
        code: 1,
        message: format!("the trial of {} failed: {failure}", r.label),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn received(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn tells_systemd_it_is_ready_on_a_path_or_an_abstract_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        send_ready(path.as_os_str()).unwrap();
        assert_eq!(received(&sock), "READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("btrfs-deploy-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        send_ready(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
        assert_eq!(received(&sock), "READY=1");

        // Nobody listening: an error (trial-watch warns and goes on).
        let gone = d.path().join("gone");
        assert!(send_ready(gone.as_os_str()).is_err());
    }
}
