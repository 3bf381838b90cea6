//! The serial console as text: ANSI escapes and carriage returns
//! stripped, lines assembled, the expected and fatal patterns matched.

use super::*;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;

use anyhow::{Context, Result};
use regex::Regex;

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
pub(super) fn matches_text(re: &Regex, hay: &str) -> bool {
    re.find_iter(hay).any(|m| !m.is_empty())
}

/// The expected pattern and the fatal ones.
pub(super) struct Matcher {
    expect: Regex,
    /// (pattern, what a match means)
    fatal: Vec<(Regex, &'static str)>,
}

impl Matcher {
    pub(super) fn new(expect: &Regex, extra_fail: &[Regex]) -> Result<Self> {
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
    pub(super) fn check_line(&self, line: &str, last_boot: bool) -> Decision {
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
    pub(super) fn check_text(&self, text: &str) -> Decision {
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
pub(super) struct AnsiStripper {
    state: EscState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum EscState {
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
    pub(super) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
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
pub(super) struct LineAssembler {
    partial: Vec<u8>,
}

impl LineAssembler {
    /// Adds bytes; returns the lines they complete (without `\n`).
    pub(super) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
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

    pub(super) fn partial(&self) -> String {
        String::from_utf8_lossy(&self.partial).into_owned()
    }
}

/// The serial console seen so far.
#[derive(Debug, Default)]
pub(super) struct Console {
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
    pub(super) fn feed(&mut self, raw: &[u8], log: &mut Option<File>) -> Vec<String> {
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

    pub(super) fn seen_output(&self) -> bool {
        self.raw_bytes > 0
    }

    pub(super) fn partial(&self) -> String {
        self.lines.partial()
    }

    pub(super) fn full_text(&self) -> String {
        let mut text = self.text.clone();
        text.push_str(&self.partial());
        text
    }

    /// The last `n` lines, including an unterminated last line.
    pub(super) fn tail(&self, n: usize) -> Vec<String> {
        let mut lines: Vec<String> = self.recent.iter().cloned().collect();
        let partial = self.partial();
        if !partial.is_empty() {
            lines.push(partial);
        }
        let skip = lines.len().saturating_sub(n);
        lines.split_off(skip)
    }
}
