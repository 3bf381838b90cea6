//! `btrfs check --readonly` on the unmounted target.

use super::report::Finding;
use crate::disk::open;
use crate::util::cmd;
use std::path::Path;

/// How many trailing lines of `btrfs check` output go into a problem.
const BTRFS_CHECK_TAIL: usize = 12;

/// `btrfs check --readonly` on the unmounted target.
pub(super) fn btrfs_check(target: &Path) -> Finding {
    let name = "btrfs check";
    // On a GPT disk, the Btrfs partition through a read-only loop device.
    let part = match open::require_btrfs(target).map(|l| l.btrfs) {
        Ok(Some(range)) => {
            match crate::disk::loopdev::LoopGuard::attach_range(target, Some(range), true) {
                Ok(l) => Some(l),
                Err(e) => return Finding::problem(name, format!("{e:#}")),
            }
        }
        _ => None,
    };
    let target = part.as_ref().map(|l| l.path()).unwrap_or(target);
    let t = target.to_string_lossy();
    let mut c = std::process::Command::new("btrfs");
    c.args(["check", "--readonly"]).arg(target);
    cmd::prepare(&mut c);
    match c.output() {
        Ok(out) if out.status.success() => Finding::ok(name, "clean"),
        Ok(out) => {
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Finding::problem(
                name,
                format!(
                    "`btrfs check --readonly {t}` failed ({}): {}",
                    out.status,
                    cmd::tail_lines(&text, BTRFS_CHECK_TAIL).replace('\n', " | ")
                ),
            )
        }
        Err(e) => Finding::problem(name, format!("starting btrfs (install btrfs-progs): {e}")),
    }
}
