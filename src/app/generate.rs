//! Man pages and shell completions generated from the clap definitions, so
//! they never drift from `--help` (hidden subcommands `generate-man DIR`
//! and `generate-completions DIR`, run by `make install`).

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// The shells completions are written for, with the file name each one's
/// completion loader expects.
pub const SHELLS: &[(Shell, &str)] = &[
    (Shell::Bash, "deploy.bash"),
    (Shell::Zsh, "_deploy"),
    (Shell::Fish, "deploy.fish"),
];

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Writes `deploy.1` and `deploy-<subcommand>.1` for every visible
/// subcommand into `dir`; returns the files written.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    create_dir(dir)?;
    let cmd = crate::cli::Cli::command();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    written.sort();
    Ok(written)
}

/// Writes bash, zsh and fish completions into `dir`; returns the files.
pub fn completions(dir: &Path) -> Result<Vec<PathBuf>> {
    create_dir(dir)?;
    let mut cmd = crate::cli::Cli::command();
    let mut written = Vec::new();
    for (shell, file) in SHELLS {
        let path = clap_complete::generate_to(*shell, &mut cmd, "deploy", dir)
            .with_context(|| format!("writing {shell} completions into {}", dir.display()))?;
        debug_assert!(path.ends_with(file));
        written.push(path);
    }
    Ok(written)
}

/// Names of the subcommands that get a man page (the visible ones, and
/// theirs: `bundle-create` for `deploy bundle create`).
#[cfg(test)]
fn documented_subcommands() -> Vec<String> {
    let mut out = Vec::new();
    for s in crate::cli::Cli::command().get_subcommands() {
        if s.is_hide_set() {
            continue;
        }
        out.push(s.get_name().to_string());
        for sub in s.get_subcommands().filter(|x| !x.is_hide_set()) {
            out.push(format!("{}-{}", s.get_name(), sub.get_name()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_man_page_per_visible_subcommand() {
        let d = tempfile::tempdir().unwrap();
        let files = man_pages(d.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let subs = documented_subcommands();
        assert!(subs.contains(&"list".to_string()), "{subs:?}");
        assert!(!subs.iter().any(|s| s.starts_with("generate-")), "{subs:?}");
        let mut want: Vec<String> = subs.iter().map(|s| format!("deploy-{s}.1")).collect();
        want.push("deploy.1".into());
        want.sort();
        assert_eq!(names, want);
        let top = std::fs::read_to_string(d.path().join("deploy.1")).unwrap();
        assert!(top.contains(".TH deploy 1"), "{top}");
        assert!(top.contains("\\-\\-rootfs"), "{top}");
        let list = std::fs::read_to_string(d.path().join("deploy-list.1")).unwrap();
        assert!(list.contains("\\-\\-json"), "{list}");
    }

    #[test]
    fn completions_for_three_shells_know_the_subcommands() {
        let d = tempfile::tempdir().unwrap();
        let files = completions(d.path()).unwrap();
        assert_eq!(files.len(), 3);
        for (_, name) in SHELLS {
            let text = std::fs::read_to_string(d.path().join(name)).unwrap();
            assert!(
                text.contains("set-default")
                    && text.contains("rootfs")
                    && text.contains("kernel-args"),
                "{name}: {text}"
            );
        }
    }
}
