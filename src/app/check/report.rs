//! The report of `deploy check`: one finding per check, and the counts.

use serde::Serialize;
use std::path::Path;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The invariant holds.
    Ok,
    /// Not broken, but worth acting on (leftovers: run `deploy cleanup`).
    Warning,
    /// An invariant is broken.
    Problem,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked, e.g. `default`, `version v2: orig`, `btrfs check`.
    pub name: String,
    /// Its outcome.
    pub status: Status,
    /// What was found.
    pub message: String,
}

impl Finding {
    fn new(name: impl Into<String>, status: Status, message: impl Into<String>) -> Finding {
        Finding {
            name: name.into(),
            status,
            message: message.into(),
        }
    }
    pub(super) fn ok(name: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding::new(name, Status::Ok, message)
    }
    pub(super) fn problem(name: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding::new(name, Status::Problem, message)
    }
    pub(super) fn warning(name: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding::new(name, Status::Warning, message)
    }
    /// A finding that is a problem when `problems` is non-empty, else ok.
    pub(super) fn from_problems(
        name: &str,
        problems: Vec<String>,
        ok_message: impl Into<String>,
    ) -> Finding {
        if problems.is_empty() {
            Finding::ok(name, ok_message)
        } else {
            Finding::problem(name, problems.join("; "))
        }
    }
}

/// The whole report of `deploy check`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The target as given.
    pub target: String,
    /// True when no finding is a problem (warnings allowed).
    pub ok: bool,
    /// Number of problems.
    pub problems: usize,
    /// Number of warnings.
    pub warnings: usize,
    /// Every check, in order.
    pub findings: Vec<Finding>,
}

impl Report {
    pub(super) fn new(target: &Path, findings: Vec<Finding>) -> Report {
        let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
        let problems = count(Status::Problem);
        Report {
            target: target.display().to_string(),
            ok: problems == 0,
            problems,
            warnings: count(Status::Warning),
            findings,
        }
    }

    /// The text report: one line per check.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.status {
                Status::Ok => "ok",
                Status::Warning => "warning",
                Status::Problem => "PROBLEM",
            };
            out.push_str(&format!("{tag:<8}{}: {}\n", f.name, f.message));
        }
        out
    }
}
