//! Root runs only what root (or the user who invoked it through sudo)
//! controls: like git's safe-directory rule, a config file, an extension
//! folder or an extension program is used only when it and the folder
//! holding it are owned by root or the invoking user and cannot be changed
//! by anyone else (not group- or world-writable; a folder may be
//! world-writable only with the sticky bit, like /tmp). Setting
//! `DEPLOY_ALLOW_UNSAFE_PATHS=1` allows them anyway.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Environment variable that lifts the rule, for a user who knows.
pub const ALLOW_ENV: &str = "DEPLOY_ALLOW_UNSAFE_PATHS";

/// Fails unless `path` (what: "config file", "extension", ...) and the
/// folder holding it are controlled by root or the invoking user only.
pub fn require_trusted(path: &Path, what: &str) -> Result<()> {
    if std::env::var_os(ALLOW_ENV).is_some_and(|v| v == "1") {
        return Ok(());
    }
    let canon = path
        .canonicalize()
        .with_context(|| format!("resolving {what} {}", path.display()))?;
    check_one(path, &canon, what, false)?;
    if let Some(parent) = canon.parent() {
        check_one(path, parent, what, true)?;
    }
    Ok(())
}

fn trusted_owners() -> Vec<u32> {
    let mut v = vec![0, nix::unistd::geteuid().as_raw()];
    if let Some(uid) = std::env::var("SUDO_UID").ok().and_then(|s| s.parse().ok()) {
        v.push(uid);
    }
    v
}

fn check_one(shown: &Path, p: &Path, what: &str, is_parent: bool) -> Result<()> {
    let m = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
    let subject = if is_parent {
        format!("the folder {} holding it", p.display())
    } else {
        p.display().to_string()
    };
    let fix = format!(
        "make it owned by root and writable only by its owner (chown root: {0}; chmod go-w {0}), \
         or set {ALLOW_ENV}=1 if you trust it",
        p.display()
    );
    if !trusted_owners().contains(&m.uid()) {
        bail!(
            "refusing {what} {}: {subject} belongs to uid {}, and deploy runs as root only what \
             root or you control: {fix}",
            shown.display(),
            m.uid()
        );
    }
    let sticky = m.mode() & 0o1000 != 0;
    if m.mode() & 0o022 != 0 && !(is_parent && sticky) {
        bail!(
            "refusing {what} {}: {subject} is writable by {}, so another user could change what \
             root runs: {fix}",
            shown.display(),
            if m.mode() & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn refuses_writable_files_and_folders_and_foreign_owners() {
        let d = tempfile::tempdir().unwrap();
        chmod(d.path(), 0o755);
        let f = d.path().join("deploy.toml");
        std::fs::write(&f, "").unwrap();
        chmod(&f, 0o644);
        require_trusted(&f, "config file").unwrap();
        chmod(&f, 0o664);
        let e = require_trusted(&f, "config file").unwrap_err().to_string();
        assert!(
            e.contains("writable by its group") && e.contains("chmod go-w"),
            "{e}"
        );
        chmod(&f, 0o646);
        let e = require_trusted(&f, "config file").unwrap_err().to_string();
        assert!(e.contains("writable by everyone"), "{e}");
        chmod(&f, 0o644);
        // A world-writable folder without the sticky bit: the file could be replaced.
        chmod(d.path(), 0o777);
        let e = require_trusted(&f, "config file").unwrap_err().to_string();
        assert!(e.contains("the folder"), "{e}");
        // With the sticky bit (like /tmp) a root-owned file is safe.
        chmod(d.path(), 0o1777);
        require_trusted(&f, "config file").unwrap();
        chmod(d.path(), 0o755);
        // (The tests run as root, as the tool does.)
        std::os::unix::fs::chown(&f, Some(12345), None).unwrap();
        let e = require_trusted(&f, "config file").unwrap_err().to_string();
        assert!(e.contains("belongs to uid 12345"), "{e}");
    }
}
