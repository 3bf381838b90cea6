//! The one way this tool runs external programs: argv logged at debug level,
//! stdin closed, killed if we die (PR_SET_PDEATHSIG), and the tail of stderr
//! in the error.

use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

/// How many trailing lines of a failed command's stderr go into the error.
const STDERR_TAIL_LINES: usize = 15;

/// Returns the last `n` non-empty lines of `text`, joined with newlines.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Prepares `cmd` the way every child of this tool is run.
pub fn prepare(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            crate::util::signals::unblock_in_child();
            Ok(())
        });
    }
    cmd
}

/// Runs `program args...`, returning its stdout; a non-zero exit is an error
/// that names the command and carries the tail of its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = output(program, args)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`] but returns the whole [`Output`] (status checked).
pub fn output(program: &str, args: &[&str]) -> Result<Output> {
    tracing::debug!(?program, ?args, "running");
    let mut cmd = Command::new(program);
    cmd.args(args);
    prepare(&mut cmd);
    let out = cmd
        .output()
        .with_context(|| format!("starting {program} (is it installed?)"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tail = tail_lines(
            if stderr.trim().is_empty() {
                &stdout
            } else {
                &stderr
            },
            STDERR_TAIL_LINES,
        );
        bail!(
            "`{} {}` failed ({}):\n{}",
            program,
            args.join(" "),
            out.status,
            tail
        );
    }
    Ok(out)
}

/// Like [`run`], with `input` written to the program's stdin.
pub fn run_with_input(program: &str, args: &[&str], input: &[u8]) -> Result<String> {
    use std::io::Write;
    tracing::debug!(?program, ?args, "running with input");
    let mut cmd = Command::new(program);
    cmd.args(args);
    prepare(&mut cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {program} (is it installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .with_context(|| format!("writing to {program}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}):\n{}",
            program,
            args.join(" "),
            out.status,
            tail_lines(&String::from_utf8_lossy(&out.stderr), STDERR_TAIL_LINES)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A program this tool needs on the host, and the Debian package providing it.
pub struct Tool {
    /// Executable name.
    pub program: &'static str,
    /// Debian package to install.
    pub package: &'static str,
}

/// `mkfs.btrfs`.
pub const MKFS_BTRFS: Tool = Tool {
    program: "mkfs.btrfs",
    package: "btrfs-progs",
};
/// `extlinux`.
pub const EXTLINUX: Tool = Tool {
    program: "extlinux",
    package: "extlinux",
};
/// `btrfs` (send and receive).
pub const BTRFS: Tool = Tool {
    program: "btrfs",
    package: "btrfs-progs",
};
/// `blkid`.
pub const BLKID: Tool = Tool {
    program: "blkid",
    package: "util-linux",
};

/// Finds `program` on PATH (also /sbin and /usr/sbin, which a non-login root
/// shell may lack).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(Into::into),
        )
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Fails with an install hint when any of `tools` is missing.
pub fn require(tools: &[&Tool]) -> Result<()> {
    for t in tools {
        if which(t.program).is_none() {
            bail!(
                "required tool `{}` not found: install the Debian package {} (apt-get install {})",
                t.program,
                t.package,
                t.package
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_nonempty_lines() {
        assert_eq!(tail_lines("a\n\nb\nc\n\n", 2), "b\nc");
        assert_eq!(tail_lines("", 3), "");
    }

    #[test]
    fn failing_command_reports_stderr_tail() {
        let err = run("sh", &["-c", "echo first >&2; echo boom >&2; exit 3"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("boom") && msg.contains("exit status: 3"),
            "{msg}"
        );
    }

    #[test]
    fn stdin_is_closed() {
        assert_eq!(run("sh", &["-c", "cat; echo end"]).unwrap(), "end\n");
    }

    #[test]
    fn missing_tool_names_package() {
        let t = Tool {
            program: "no-such-tool-xyz",
            package: "pkg-xyz",
        };
        let msg = require(&[&t]).unwrap_err().to_string();
        assert!(
            msg.contains("pkg-xyz") && msg.contains("no-such-tool-xyz"),
            "{msg}"
        );
    }
}
