//! One boot-test session: QEMU attempts (KVM, then TCG), reboots counted
//! and marked in the log, the watchdog, and the decision (pass, fail,
//! timeout) with its reason.

use super::*;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Result;
use regex::Regex;

/// Runs QEMU once with `accel` until a decision.
pub(super) fn attempt(
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
pub(super) fn drain_until_exit(
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
pub(super) enum SessionEnd {
    Passed,
    Failed(String),
    KvmBroken(String),
}

/// The state of one QEMU run: console, decisions, typing.
pub(super) struct Session<'a> {
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
    pub(super) fn new(
        opts: &'a BootTestOptions,
        accel: Accel,
        matcher: &'a Matcher,
        start: Instant,
    ) -> Self {
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
    pub(super) fn in_last_boot(&self) -> bool {
        self.boot > self.opts.reboots
    }

    /// Notes a firmware banner: after the first, a new boot begins.
    pub(super) fn on_boot_start(&mut self, log: &mut Option<File>) -> Option<SessionEnd> {
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
    pub(super) fn watch(
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
    pub(super) fn next_wake(&self, deadline: Instant, now: Instant) -> Instant {
        let mut wake = deadline;
        if self.liveness_applies() {
            wake = wake.min(self.start + KVM_LIVENESS);
        }
        if self.text_dirty {
            wake = wake.min(now + TEXT_CHECK_INTERVAL);
        }
        wake
    }

    pub(super) fn liveness_applies(&self) -> bool {
        self.accel == Accel::Kvm && !self.console.seen_output()
    }

    pub(super) fn on_serial(
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
    pub(super) fn maybe_type(&mut self, qemu: &mut Qemu, new_lines: &[String]) {
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
    pub(super) fn check_text(&mut self, force: bool) -> Option<SessionEnd> {
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

    pub(super) fn on_stderr(&mut self, line: &str, log: &mut Option<File>) -> Option<SessionEnd> {
        self.note_stderr(line, log);
        if self.accel == Accel::Kvm && is_kvm_failure(line) {
            return Some(SessionEnd::KvmBroken(format!("QEMU reported: {line}")));
        }
        None
    }

    pub(super) fn note_stderr(&mut self, line: &str, log: &mut Option<File>) {
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

    pub(super) fn on_tick(&mut self, deadline: Instant) -> Option<SessionEnd> {
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

    pub(super) fn timeout_reason(&self) -> String {
        let mut reason = format!("timeout after {} s", self.opts.timeout.as_secs());
        if self.opts.entry.is_some() && !self.typed {
            reason.push_str(&format!(" (the {SYSLINUX_PROMPT} prompt never appeared)"));
        } else if !self.console.seen_output() {
            reason.push_str(" (no console output at all)");
        }
        reason
    }

    /// QEMU closed the serial line: it is exiting.
    pub(super) fn on_exit(
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

    pub(super) fn final_checks(&mut self) -> Option<SessionEnd> {
        let partial = self.console.partial();
        if !partial.is_empty() {
            if let Some(end) = self.matcher.check_line(&partial, self.in_last_boot()).end() {
                return Some(end);
            }
        }
        self.text_dirty = true;
        self.check_text(true)
    }

    pub(super) fn finish(self, end: SessionEnd) -> Attempt {
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

pub(super) fn is_kvm_failure(stderr_line: &str) -> bool {
    KVM_FAILURE_MARKERS.iter().any(|m| stderr_line.contains(m))
}

pub(super) fn describe_status(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => match s.code() {
            Some(code) => format!("exit status {code}"),
            None => format!("{s}"),
        },
        None => "no exit status (still running)".into(),
    }
}

/// Why a run whose QEMU exited before the expected text failed.
pub(super) fn exit_reason(
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
pub(super) enum Decision {
    Continue,
    Pass,
    Fail(String),
}

impl Decision {
    /// The session end this decision means, if any.
    pub(super) fn end(self) -> Option<SessionEnd> {
        match self {
            Decision::Continue => None,
            Decision::Pass => Some(SessionEnd::Passed),
            Decision::Fail(reason) => Some(SessionEnd::Failed(reason)),
        }
    }
}
