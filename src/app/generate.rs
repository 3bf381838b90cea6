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
    let mut cmd = crate::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    write_pages(cmd, dir).with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    written.sort();
    Ok(written)
}

/// Writes the page of `cmd` and of each of its visible subcommands, with
/// the date, source and manual fields `man` and `mandoc -Tlint` expect.
fn write_pages(cmd: clap::Command, dir: &Path) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir)?;
    }
    let title = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_uppercase();
    let man = clap_mangen::Man::new(cmd)
        .title(title)
        .date(env!("DEPLOY_GIT_DATE"))
        .source(format!("btrfs-deploy {}", env!("CARGO_PKG_VERSION")))
        .manual("btrfs-deploy manual");
    let path = dir.join(man.get_filename());
    let mut roff = Vec::new();
    man.render(&mut roff)?;
    std::fs::write(&path, tidy_roff(&String::from_utf8_lossy(&roff)))
        .with_context(|| format!("writing {}", path.display()))
}

/// What `mandoc -Tlint` asks of clap_mangen's output: one paragraph space
/// where it puts a break, an empty line and another break before an
/// option's values; text lines of at most 80 bytes (filled text, so a
/// line break between words is a space); no trailing blanks.
fn tidy_roff(roff: &str) -> String {
    let roff = roff.replace("\n.br\n\n.br\n", "\n.sp\n");
    let mut out = String::with_capacity(roff.len() + roff.len() / 40);
    for line in roff.lines() {
        let line = trim_end_unescaped(line);
        if line.starts_with('.') || line.starts_with('\'') || line.len() <= 80 {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut current = String::new();
        for word in line.split(' ') {
            let glue = !current.is_empty() && current.ends_with('\\');
            if !current.is_empty() && !glue && current.len() + 1 + word.len() > 80 {
                out.push_str(&current);
                out.push('\n');
                current.clear();
            }
            if current.is_empty() {
                // A line starting with these would be a request.
                if word.starts_with('.') || word.starts_with('\'') {
                    current.push_str("\\&");
                }
            } else {
                current.push(' ');
            }
            current.push_str(word);
        }
        out.push_str(&current);
        out.push('\n');
    }
    out
}

/// `line` without trailing blanks, except an escaped one (`\ `).
fn trim_end_unescaped(line: &str) -> &str {
    let mut t = line;
    while let Some(rest) = t.strip_suffix(' ') {
        if rest.ends_with('\\') {
            break;
        }
        t = rest;
    }
    t
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
        assert!(top.contains(".TH DEPLOY 1 "), "{top}");
        assert!(top.contains("\"btrfs-deploy manual\""), "{top}");
        // Text lines are short, nothing trails (mandoc -Tlint's style).
        assert!(
            top.lines().all(|l| l.len() <= 80 || l.starts_with('.')),
            "{top}"
        );
        assert!(!top.lines().any(|l| l.ends_with(' ') && !l.ends_with("\\ ")));
        assert!(top.contains("\\-\\-rootfs"), "{top}");
        let list = std::fs::read_to_string(d.path().join("deploy-list.1")).unwrap();
        assert!(list.contains("\\-\\-json"), "{list}");
    }

    #[test]
    fn tidy_roff_wraps_trims_and_guards_requests() {
        let long = format!("{} .dot 'quote {}", "word ".repeat(15), "x".repeat(10));
        let t = tidy_roff(&format!(".TP\n{long}\nend  \nkeep\\ \na\n.br\n\n.br\nb\n"));
        for l in t.lines() {
            assert!(l.len() <= 80, "{t}");
            assert!(!l.starts_with(' '), "{t}");
        }
        // Words wrapped to the start of a line that would be requests are escaped.
        assert!(
            t.lines()
                .all(|l| l == ".TP" || l == ".sp" || !l.starts_with(['.', '\''])),
            "{t}"
        );
        assert!(t.contains("\nend\n") && t.contains("\nkeep\\ \n"), "{t}");
        assert!(t.contains("\na\n.sp\nb\n"), "{t}");
        let words: Vec<&str> = t
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("end"))
            .flat_map(|l| l.split(' '))
            .collect();
        assert_eq!(words.join(" ").replace("\\&", ""), long);
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
