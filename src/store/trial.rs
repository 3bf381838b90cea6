//! Trials (`deploy --trial`): a version booted once, on probation, that
//! becomes the default only when it proves healthy (`deploy mark-good`), and
//! that the device leaves by itself when it does not.
//!
//! Each trial is recorded in `systems/<label>/trial.json` (the version's own
//! record: removing the version removes it). Its life:
//!
//! - `arming`: written (and committed) before anything else; the boot menu
//!   then gains the `trial` entry, and the loaders are armed for one boot
//!   (SYSLINUX's `--once`, see `boot::extlinux`). A cut here leaves a record
//!   that no loader will act on: the next `trial-watch` or `deploy` ends it
//!   as `interrupted`.
//! - `armed`: the loaders will start the trial entry at the next boot, and
//!   only then: each clears its one-shot record before loading the kernel.
//! - `booted`: the trial version reached user space (`deploy trial-watch`).
//! - `good`: its health checks passed and it is now the default.
//! - `failed`: it panicked or hung (the boot after it, on the old default,
//!   finds the one-shot used and no outcome), a health check failed, or it
//!   did not get there in time; the device is back on the old default.
//!
//! Which version is on trial at boot is named on the kernel command line
//! (`btrfs_deploy.trial=<label>`), so the running system knows without
//! reading the disk.

use crate::store::btrfs;
use crate::store::deployment;
use crate::store::layout::Layout;
use crate::store::versions;
use crate::util::fsutil;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// File name of a version's trial record.
pub const TRIAL_JSON: &str = "trial.json";
/// Label of the boot menu entry that starts the version on trial.
pub const MENU_LABEL: &str = "trial";
/// Kernel command-line key naming the version on trial.
pub const CMDLINE_KEY: &str = "btrfs_deploy.trial";
/// `panic=` seconds added to the trial entry when its arguments have none,
/// so that a kernel panic reboots (onto the old default).
pub const PANIC_SECONDS: u32 = 10;
/// Seconds a trial boot has to pass its health checks (`trial_timeout`).
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// Where a trial is in its life (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being armed by `deploy --trial`.
    Arming,
    /// The next boot starts it.
    Armed,
    /// The trial boot reached user space and is being checked.
    Booted,
    /// Passed: it is the default.
    Good,
    /// Failed: the device went back to the old default.
    Failed,
}

impl State {
    /// Whether the trial has an outcome.
    pub fn ended(self) -> bool {
        matches!(self, State::Good | State::Failed)
    }
}

/// Why a trial failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Failure {
    /// The trial boot never reported from user space: a kernel panic (the
    /// `panic=` reboot), or a hang the watchdog reset.
    Panic,
    /// A health check in `/etc/btrfs-deploy/health.d/` failed.
    Health {
        /// Its file name.
        check: String,
        /// Its exit status, or the signal that ended it.
        status: String,
    },
    /// The health checks had not passed within the trial timeout.
    Timeout {
        /// The timeout, in seconds.
        seconds: u64,
    },
    /// The trial boot reached user space but ended without an outcome: a
    /// hang the watchdog reset, a crash that rebooted, or a power cut.
    Lost,
    /// `deploy --trial` was interrupted before the loaders were armed.
    Interrupted,
    /// Withdrawn before it was booted: another trial, `set-default` or
    /// `remove` replaced it.
    Withdrawn,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Panic => f.write_str(
                "panic: the trial boot never reached user space (a kernel panic, a hang \
                 the watchdog reset, or a power cut)",
            ),
            Failure::Lost => f.write_str(
                "lost: the trial boot reached user space but ended without an outcome \
                 (a hang the watchdog reset, a crash, or a power cut)",
            ),
            Failure::Withdrawn => f.write_str("withdrawn before it was booted"),
            Failure::Health { check, status } => write!(f, "health check {check} ({status})"),
            Failure::Timeout { seconds } => {
                write!(f, "timeout: not healthy within {seconds} s")
            }
            Failure::Interrupted => {
                f.write_str("interrupted: deploy --trial did not finish arming it")
            }
        }
    }
}

/// One trial, as recorded in `systems/<label>/trial.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The version on trial.
    pub version: String,
    /// The default when it was armed: where a failure returns.
    pub fallback: String,
    /// Where it is in its life.
    pub state: State,
    /// When `deploy --trial` armed it (RFC 3339, UTC).
    pub armed_at: String,
    /// Seconds since the epoch, for ordering.
    pub armed_unix: u64,
    /// When the trial boot reached user space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_at: Option<String>,
    /// When it ended (good or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

impl Trial {
    /// A new record for `version`, falling back to `fallback`.
    pub fn new(version: &str, fallback: &str) -> Trial {
        let (armed_at, armed_unix) = deployment::now();
        Trial {
            version: version.to_string(),
            fallback: fallback.to_string(),
            state: State::Arming,
            armed_at,
            armed_unix,
            booted_at: None,
            ended_at: None,
            failure: None,
        }
    }

    /// Marks it ended as `failure` (or good when `None`).
    pub fn end(&mut self, failure: Option<Failure>) {
        self.state = if failure.is_some() {
            State::Failed
        } else {
            State::Good
        };
        self.failure = failure;
        self.ended_at = Some(deployment::now().0);
    }

    /// One line for people: `v2: good`, `v3: failed (health check ...)`.
    pub fn describe(&self) -> String {
        let when = self.ended_at.as_deref().unwrap_or(&self.armed_at);
        match (&self.state, &self.failure) {
            (State::Failed, Some(f)) => format!("{}: failed at {when}: {f}", self.version),
            (State::Good, _) => format!("{}: good at {when}", self.version),
            (State::Booted, _) => format!(
                "{}: booted at {}, health checks running",
                self.version,
                self.booted_at.as_deref().unwrap_or("?")
            ),
            (State::Armed, _) => format!(
                "{}: pending since {}: the next boot tries it",
                self.version, self.armed_at
            ),
            (s, _) => format!("{}: {s:?} since {}", self.version, self.armed_at),
        }
    }
}

/// The trial record of `label`, if it has one.
pub fn load(top: &Layout, label: &str) -> Result<Option<Trial>> {
    let path = top.version(label).join(TRIAL_JSON);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", path.display()))
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `t` into its version's directory and commits it.
pub fn save(top: &Layout, t: &Trial) -> Result<()> {
    let mut text = serde_json::to_string_pretty(t)?;
    text.push('\n');
    fsutil::write_atomic(
        &top.version(&t.version).join(TRIAL_JSON),
        text.as_bytes(),
        0o644,
    )?;
    btrfs::sync_fs(&top.top)
}

/// Every trial record on the disk, oldest first.
pub fn all(top: &Layout) -> Result<Vec<Trial>> {
    let mut out = Vec::new();
    for v in versions::list(top)? {
        if let Some(t) = load(top, &v.label)? {
            out.push(t);
        }
    }
    out.sort_by(|a, b| (a.armed_unix, &a.armed_at).cmp(&(b.armed_unix, &b.armed_at)));
    Ok(out)
}

/// The trial without an outcome, if any (the newest, should a cut have left two).
pub fn open(top: &Layout) -> Result<Option<Trial>> {
    Ok(all(top)?.into_iter().rev().find(|t| !t.state.ended()))
}

/// The version named on a kernel command line by [`CMDLINE_KEY`].
pub fn from_cmdline(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(CMDLINE_KEY)?.strip_prefix('='))
        .filter(|l| !l.is_empty())
        .map(str::to_string)
}

/// The trial entry's kernel arguments: the version's own, `panic=` added
/// unless they set it, and the trial marker.
pub fn entry_args(args: &str, label: &str) -> String {
    let mut out = args.trim().to_string();
    if !args.split_whitespace().any(|w| w.starts_with("panic=")) {
        out.push_str(&format!(" panic={PANIC_SECONDS}"));
    }
    out.push_str(&format!(" {CMDLINE_KEY}={label}"));
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trial_is_named_on_the_command_line() {
        assert_eq!(
            from_cmdline("root=UUID=x rw btrfs_deploy.trial=v2 panic=10").as_deref(),
            Some("v2")
        );
        assert_eq!(from_cmdline("root=UUID=x btrfs_deploy.trial= quiet"), None);
        assert_eq!(from_cmdline("btrfs_deploy.trialx=v2"), None);
        assert_eq!(from_cmdline("root=UUID=x"), None);
    }

    #[test]
    fn the_trial_entry_panics_into_a_reboot_unless_told_otherwise() {
        assert_eq!(
            entry_args("console=ttyS0", "v2"),
            "console=ttyS0 panic=10 btrfs_deploy.trial=v2"
        );
        assert_eq!(
            entry_args("panic=3 quiet", "v2"),
            "panic=3 quiet btrfs_deploy.trial=v2"
        );
    }

    #[test]
    fn records_round_trip_and_describe_their_outcome() {
        let mut t = Trial::new("v3", "v2");
        assert_eq!(t.state, State::Arming);
        t.end(Some(Failure::Health {
            check: "10-net".into(),
            status: "exit status 1".into(),
        }));
        let text = serde_json::to_string(&t).unwrap();
        assert!(
            text.contains(r#""failure":{"kind":"health","check":"10-net""#),
            "{text}"
        );
        let back: Trial = serde_json::from_str(&text).unwrap();
        assert_eq!(back, t);
        assert!(t.describe().contains("v3: failed at"), "{}", t.describe());
        assert!(t.describe().contains("health check 10-net (exit status 1)"));
        let mut g = Trial::new("v2", "factory");
        g.end(None);
        assert!(g.describe().starts_with("v2: good at "));
    }
}
