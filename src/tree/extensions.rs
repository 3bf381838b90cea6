//! Configure extensions (design §5): executables `<name>.configure` (and an
//! optional `<name>.check`) found in the project's `extensions/` folder and
//! in folders the user adds.
//!
//! Contract (documented for users in docs/extensions.md):
//! - `.check` runs at planning time with no argument, before anything is
//!   written; a non-zero exit rejects the settings.
//! - `.configure TREE` runs on the new version's tree, in the order listed.
//! - Both get an environment made of the settings plus `DEPLOY_VERSION`,
//!   `DEPLOY_UPGRADE` (`yes`/`no`), `DEPLOY_TARGET`, `DEPLOY_RUN_IN_TREE`,
//!   `DEPLOY_EXTENSION`, `DEPLOY_EXTENSION_DIR`, `DEPLOY_ARCH` (the tree's,
//!   empty when unknown), `DEPLOY_TOOL_ARCH` (this binary's), `PATH` (and
//!   `DEPLOY_TREE` for `.configure`); nothing else of the caller's environment. stdin is
//!   empty; a failure carries the tail of stderr.

use crate::config;
use crate::util::cmd;
use crate::util::ui;
use anyhow::{bail, Context as _, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Suffix of the program that applies an extension to a tree.
pub const CONFIGURE_SUFFIX: &str = ".configure";
/// Suffix of the program that validates an extension's settings.
pub const CHECK_SUFFIX: &str = ".check";
/// Where an installed copy of the tool keeps the shipped extensions,
/// relative to the directory of the `deploy` executable.
pub const INSTALLED_DIR: &str = "../share/btrfs-deploy/extensions";
/// Marker of the summary line in a `.configure` file.
const SUMMARY_MARKER: &str = "# summary:";

/// Marker of a path the extension writes whole and updates in place (see
/// [`Extension::keeps`]); one per line, absolute.
const KEEPS_MARKER: &str = "# keeps:";
/// How many trailing lines of a failing extension's stderr are reported.
const TAIL_LINES: usize = 15;
/// PATH given to extensions when the caller has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One extension, resolved to its programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Name (`hostname`).
    pub name: String,
    /// The `<name>.configure` program.
    pub configure: PathBuf,
    /// The `<name>.check` program, when there is one.
    pub check: Option<PathBuf>,
    /// One-line summary (the `# summary:` comment of the `.configure` file).
    pub summary: String,
    /// Paths in the tree (relative to its root) that the extension writes
    /// whole on every deploy and updates in place (`# keeps: /PATH` lines of
    /// the `.configure` file): an upgrade's sync leaves them in the snapshot
    /// when the new rootfs lacks them, so what the extension writes again
    /// unchanged keeps its inode, shared with the old version and absent
    /// from a delta bundle.
    pub keeps: Vec<PathBuf>,
}

/// What the tool tells extensions about the deploy.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Label of the version being written.
    pub version: String,
    /// True when adding a version to an existing disk.
    pub upgrade: bool,
    /// The target disk image or device.
    pub target: PathBuf,
    /// Settings (config `[settings]` and `--set`), secrets included.
    pub settings: BTreeMap<String, String>,
    /// The tree's architecture, when known (an archive's only once it is
    /// written: `.check` programs then see it empty).
    pub arch: Option<crate::tree::arch::Arch>,
}

/// The folder of the shipped extensions. An installed `deploy` (in
/// `<prefix>/bin`) uses `<prefix>/share/btrfs-deploy/extensions`
/// ([`INSTALLED_DIR`] next to the executable, so a `DESTDIR` copy finds its
/// own). Only a binary still inside the cargo build folder it was built in
/// falls back to the source tree's `extensions/`.
pub fn project_dir() -> PathBuf {
    let exe = std::env::current_exe().ok();
    shipped_dir(
        exe.as_deref(),
        Path::new(env!("DEPLOY_BUILD_DIR")),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("extensions"),
    )
}

/// [`project_dir`] for an executable at `exe`, built in `build_dir`, from a
/// source tree whose extensions are in `source`.
fn shipped_dir(exe: Option<&Path>, build_dir: &Path, source: &Path) -> PathBuf {
    let Some(bin) = exe.and_then(Path::parent) else {
        return source.to_path_buf();
    };
    let installed = bin.join(INSTALLED_DIR);
    if installed.is_dir() {
        return installed.canonicalize().unwrap_or(installed);
    }
    let in_build_tree =
        !build_dir.as_os_str().is_empty() && exe.is_some_and(|e| e.starts_with(build_dir));
    if in_build_tree {
        source.to_path_buf()
    } else {
        // Installed without its extensions: say where they belong.
        normalize(&installed)
    }
}

/// `a/bin/../share` as `a/share` (the path may not exist, so no canonicalize).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// The folders searched, lowest precedence first: the project's folder,
/// then `extra` in order. An extension in a later folder replaces one of the
/// same name in an earlier folder, so a user's folder overrides what ships.
pub fn search_path(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = vec![project_dir()];
    dirs.extend(extra.iter().cloned());
    dirs
}

fn check_extra_dirs(extra: &[PathBuf]) -> Result<()> {
    for d in extra {
        if !d.is_dir() {
            bail!(
                "extensions folder {} does not exist or is not a directory",
                d.display()
            );
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid {
        bail!("invalid extension name {name:?}: use letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn is_executable_file(p: &Path) -> bool {
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Builds the extension `name` found in `dir`, checking its programs.
fn load(name: &str, dir: &Path) -> Result<Extension> {
    let configure = dir.join(format!("{name}{CONFIGURE_SUFFIX}"));
    if !is_executable_file(&configure) {
        bail!(
            "extension {name}: {} is not an executable file (chmod +x it)",
            configure.display()
        );
    }
    let check_path = dir.join(format!("{name}{CHECK_SUFFIX}"));
    let check = if std::fs::symlink_metadata(&check_path).is_ok() {
        if !is_executable_file(&check_path) {
            bail!(
                "extension {name}: {} is not an executable file (chmod +x it)",
                check_path.display()
            );
        }
        Some(check_path)
    } else {
        None
    };
    let head = head_of(&configure);
    Ok(Extension {
        name: name.to_string(),
        summary: summary_in(&head),
        keeps: keeps_in(&head, &configure)?,
        configure,
        check,
    })
}

/// The first 16 KiB of `path` (empty if it cannot be read), where the
/// comment lines the tool reads are.
fn head_of(path: &Path) -> String {
    let mut head = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(16 * 1024).read_to_end(&mut head);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The paths of the `# keeps: /PATH` lines of `head`, the start of `path`,
/// relative to the tree's root. A path that is not absolute and plain (no
/// `.`, `..` or empty component; not `/` itself) is refused, naming the line.
fn keeps_in(head: &str, path: &Path) -> Result<Vec<PathBuf>> {
    let mut keeps = Vec::new();
    for (n, line) in head.lines().enumerate() {
        let Some(value) = line.trim().strip_prefix(KEEPS_MARKER) else {
            continue;
        };
        let value = value.trim();
        let rel = value.strip_prefix('/').unwrap_or("");
        if rel.is_empty()
            || rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!(
                "{} line {}: `{KEEPS_MARKER} {value}` must name an absolute path inside the tree \
                 (like /usr/lib/NAME), without `.` or `..`",
                path.display(),
                n + 1
            );
        }
        keeps.push(PathBuf::from(rel));
    }
    Ok(keeps)
}

/// The text after `# summary:` on the first such line of `head`, the start
/// of a `.configure` file (empty if none).
fn summary_in(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(SUMMARY_MARKER)
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default()
}

/// The folders as a list for messages; a folder that does not exist (the
/// shipped one of an incomplete install) is marked "(missing)".
fn joined(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| {
            if d.is_dir() {
                d.display().to_string()
            } else {
                format!("{} (missing)", d.display())
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves `names` (in order) to extensions. A missing or non-executable
/// `.configure` (or non-executable `.check`) is an error naming the
/// extension and the folders searched; so is a name listed twice.
pub fn find(names: &[String], extra_dirs: &[PathBuf]) -> Result<Vec<Extension>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    check_extra_dirs(extra_dirs)?;
    let dirs = search_path(extra_dirs);
    let mut found: Vec<Extension> = Vec::new();
    for name in names {
        check_name(name)?;
        if found.iter().any(|e| &e.name == name) {
            bail!("extension {name} is listed twice");
        }
        let file = format!("{name}{CONFIGURE_SUFFIX}");
        let Some(dir) = dirs
            .iter()
            .rev()
            .find(|d| std::fs::symlink_metadata(d.join(&file)).is_ok())
        else {
            bail!(
                "extension {name} not found: no {file} in {} (see `deploy extensions`)",
                joined(&dirs)
            );
        };
        let ext = load(name, dir)?;
        for program in std::iter::once(&ext.configure).chain(ext.check.as_ref()) {
            crate::util::trust::require_trusted(program, "extension")?;
        }
        found.push(ext);
    }
    Ok(found)
}

/// Every available extension (later folders replacing earlier ones of the
/// same name), sorted by name. Non-executable files are skipped with a warning.
pub fn available(extra_dirs: &[PathBuf]) -> Result<Vec<Extension>> {
    check_extra_dirs(extra_dirs)?;
    let mut all: BTreeMap<String, Extension> = BTreeMap::new();
    for dir in search_path(extra_dirs) {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(CONFIGURE_SUFFIX) else {
                continue;
            };
            if check_name(name).is_err() {
                continue;
            }
            match load(name, &dir) {
                Ok(ext) => {
                    all.insert(name.to_string(), ext);
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
    }
    Ok(all.into_values().collect())
}

/// One extension in `deploy extensions --json`.
#[derive(Debug, serde::Serialize)]
pub struct ExtensionInfo {
    /// Name, as given to `-e`.
    pub name: String,
    /// One-line summary.
    pub summary: String,
    /// The `<name>.configure` program.
    pub configure: PathBuf,
    /// The `<name>.check` program, or null.
    pub check: Option<PathBuf>,
}

/// What `deploy extensions --json` prints (with `"format"`).
#[derive(Debug, serde::Serialize)]
pub struct ExtensionsReport {
    /// Folders searched, lowest precedence first.
    pub search_path: Vec<PathBuf>,
    /// Available extensions, by name.
    pub extensions: Vec<ExtensionInfo>,
}

/// `deploy extensions`: prints the available extensions with their summary.
pub fn print_available(extra_dirs: &[PathBuf], json: bool) -> Result<()> {
    let exts = available(extra_dirs)?;
    if json {
        return crate::util::json::print(&ExtensionsReport {
            search_path: search_path(extra_dirs),
            extensions: exts
                .into_iter()
                .map(|e| ExtensionInfo {
                    name: e.name,
                    summary: e.summary,
                    configure: e.configure,
                    check: e.check,
                })
                .collect(),
        });
    }
    let width = exts.iter().map(|e| e.name.len()).max().unwrap_or(0).max(4);
    if exts.is_empty() {
        outln!("No extensions found.");
    } else {
        outln!("{:width$}  SUMMARY", "NAME");
        for e in &exts {
            outln!("{:width$}  {}", e.name, e.summary);
        }
    }
    outln!("");
    outln!(
        "Searched (later folders override earlier ones): {}",
        joined(&search_path(extra_dirs))
    );
    outln!("Use: deploy -e NAME --set KEY=VALUE ...  (settings: docs/extensions.md)");
    Ok(())
}

/// PID 1 of an extension's PID namespace: runs the extension as its child
/// (so the extension can be signalled like any process) and exits with its
/// status (128+N when killed by signal N).
const REAPER_SCRIPT: &str = r#""$@" & wait $!"#;

/// The `PATH` handed to extensions: the caller's, else a standard one.
fn child_path() -> String {
    std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.to_string())
}

/// The command for one of `ext`'s programs with the environment contract
/// applied (the caller's environment is not passed on).
fn command(ext: &Extension, program: &Path, ctx: &Context, tree: Option<&Path>) -> Result<Command> {
    let helper = std::env::current_exe().context("finding the deploy executable")?;
    let mut c = match tree {
        // A `.configure` runs in its own PID namespace (with a /proc of its
        // own), under a shell that is its PID 1 and waits for it. When the
        // extension ends — or deploy is killed, which kills unshare, which
        // kills that PID 1 — the kernel kills whatever it left running, so
        // no stray process keeps the target mounted.
        Some(_) => {
            let unshare =
                cmd::which("unshare").context("`unshare` not found: install util-linux")?;
            let mut c = Command::new(unshare);
            c.args(["--pid", "--fork", "--kill-child", "--mount-proc", "--"])
                .args(["/bin/sh", "-c", REAPER_SCRIPT, "reaper"])
                .arg(program);
            c
        }
        None => Command::new(program),
    };
    c.env_clear();
    c.envs(&ctx.settings);
    c.env("PATH", child_path());
    c.env("DEPLOY_VERSION", &ctx.version);
    c.env("DEPLOY_UPGRADE", if ctx.upgrade { "yes" } else { "no" });
    c.env("DEPLOY_TARGET", &ctx.target);
    c.env("DEPLOY_ARCH", ctx.arch.map_or("", |a| a.name()));
    c.env(
        "DEPLOY_TOOL_ARCH",
        crate::tree::arch::Arch::of_this_tool().map_or(std::env::consts::ARCH, |a| a.name()),
    );
    c.env("DEPLOY_RUN_IN_TREE", helper);
    c.env("DEPLOY_EXTENSION", &ext.name);
    if let Some(dir) = program.parent() {
        c.env("DEPLOY_EXTENSION_DIR", dir);
    }
    if let Some(tree) = tree {
        c.env("DEPLOY_TREE", tree);
        c.arg(tree);
    }
    cmd::prepare(&mut c);
    Ok(c)
}

/// Runs one program; the error (for a non-zero exit) is `what` plus the
/// exit status and the tail of stderr (stdout when stderr is empty).
fn run(ext: &Extension, mut c: Command, what: &str) -> Result<Output> {
    tracing::debug!(
        extension = %ext.name,
        program = ?c.get_program(),
        settings = ?config::redact(&c.get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
            .collect()),
        "running"
    );
    let wrapped = Path::new(c.get_program()).file_name() == Some(std::ffi::OsStr::new("unshare"));
    let (out, killed) = output_or_kill_after_stop(&mut c)
        .with_context(|| format!("starting extension {} ({:?})", ext.name, c.get_program()))?;
    if killed {
        bail!(
            "{what}: still running {} s after the stop request, so it was killed \
             (SIGKILL), with every process it started",
            STOP_GRACE.as_secs()
        );
    }
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tail = cmd::tail_lines(
            if stderr.trim().is_empty() {
                &stdout
            } else {
                &stderr
            },
            TAIL_LINES,
        );
        let how = match (
            out.status.code(),
            std::os::unix::process::ExitStatusExt::signal(&out.status),
        ) {
            // Under the PID-1 reaper shell, a signal death comes back as 128+N.
            (Some(code), _) if wrapped && (129..=192).contains(&code) => {
                format!("killed by signal {}", code - 128)
            }
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => out.status.to_string(),
        };
        let tail = if tail.is_empty() {
            "(no output)".to_string()
        } else {
            tail
        };
        bail!("{what} ({how}): {tail}");
    }
    Ok(out)
}

/// How long an extension may go on after SIGINT, SIGTERM or SIGHUP asked the
/// deploy to stop (Ctrl-C delivers SIGINT to the extension too) before it is
/// killed with SIGKILL: a `.configure` with everything in its PID namespace.
pub(crate) const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Like [`Command::output`], but once a stop is requested
/// ([`crate::util::signals::interrupted`]) the child gets [`STOP_GRACE`] to
/// end, then is killed. Returns the output and whether it was killed so.
fn output_or_kill_after_stop(c: &mut Command) -> std::io::Result<(Output, bool)> {
    use std::process::Stdio;
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let mut stop_seen: Option<std::time::Instant> = None;
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if crate::util::signals::interrupted() {
            let since = *stop_seen.get_or_insert_with(std::time::Instant::now);
            if !killed && since.elapsed() >= STOP_GRACE {
                // unshare --kill-child: its death kills the namespace's PID 1,
                // and with it every process of the namespace.
                let _ = child.kill();
                killed = true;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    Ok((out, killed))
}

fn show_output(ext: &Extension, out: &Output) {
    for stream in [&out.stdout, &out.stderr] {
        for line in String::from_utf8_lossy(stream).lines() {
            if !line.trim().is_empty() {
                ui::detail(format!("{}: {line}", ext.name));
            }
        }
    }
}

/// Runs every `.check` (planning time, nothing written yet), in order.
pub fn run_checks(exts: &[Extension], ctx: &Context) -> Result<()> {
    for ext in exts {
        let Some(check) = &ext.check else { continue };
        let c = command(ext, check, ctx, None)?;
        let out = run(
            ext,
            c,
            &format!("extension {}: settings rejected by its check", ext.name),
        )?;
        show_output(ext, &out);
    }
    Ok(())
}

/// Runs every `.configure TREE` in order. The first failure stops the run
/// with "extension NAME failed (exit N): <stderr tail>".
pub fn run_configure(exts: &[Extension], tree: &Path, ctx: &Context) -> Result<()> {
    for ext in exts {
        ui::step(format!("Running extension {}", ext.name));
        let c = command(ext, &ext.configure, ctx, Some(tree))?;
        let out = run(ext, c, &format!("extension {} failed", ext.name))?;
        show_output(ext, &out);
    }
    Ok(())
}

/// `deploy check-ip [--prefix] VALUE` (hidden; used by the shipped
/// extensions' checks through `DEPLOY_RUN_IN_TREE`): accepts exactly what
/// the kernel and systemd-networkd accept as a unicast address: IPv4 as four
/// decimal numbers 0-255 without leading zeros (`010` would be octal to
/// some tools and is refused by others), IPv6 in RFC 4291 text form (one
/// `::` at most, eight groups of up to four hex digits, an IPv4 tail), no
/// zone (`%eth0`). With `prefix`, a `/N` is required: decimal, no leading
/// zero, at most 32 (IPv4) or 128 (IPv6). The unspecified and multicast
/// addresses are refused (networkd gives `0.0.0.0/N` another meaning).
pub fn check_ip(value: &str, prefix: bool) -> Result<()> {
    use std::net::IpAddr;
    let (addr, len) = match value.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (value, None),
    };
    let ip: IpAddr = match addr.parse() {
        Ok(ip) => ip,
        Err(_) if addr.contains('%') => {
            bail!("'{value}': a zone index (%...) is not supported, give the address only")
        }
        Err(_) if addr.contains(':') => bail!(
            "'{addr}' is not an IPv6 address (up to eight groups of 1-4 hex digits separated by ':', \
             at most one '::' standing for missing groups)"
        ),
        Err(_) => bail!(
            "'{addr}' is not an IPv4 address (four numbers 0-255 separated by '.', without leading zeros)"
        ),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match (prefix, len) {
        (true, None) => {
            bail!("'{value}' has no prefix length (e.g. 192.168.1.10/24 or 2001:db8::10/64)")
        }
        (false, Some(_)) => bail!("'{value}': expected an address without a /prefix length"),
        (true, Some(l)) => {
            let ok = !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_digit())
                && (l == "0" || !l.starts_with('0'))
                && l.parse::<u32>().is_ok_and(|n| n <= max);
            if !ok {
                bail!("'{value}': the prefix length must be a number from 0 to {max}");
            }
        }
        (false, None) => {}
    }
    if ip.is_unspecified() {
        bail!("'{value}' is the unspecified address, not a host's address");
    }
    if ip.is_multicast() || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        bail!("'{value}' is a multicast or broadcast address, not a host's address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, file: &str, body: &str) -> PathBuf {
        let p = dir.join(file);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn ctx(settings: &[(&str, &str)]) -> Context {
        Context {
            version: "v2".into(),
            upgrade: true,
            target: PathBuf::from("/dev/null-target.img"),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            arch: Some(crate::tree::arch::Arch::Arm64),
        }
    }

    #[test]
    fn search_path_starts_with_the_project_folder() {
        let p = search_path(&[PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(p.len(), 3);
        assert!(p[0].ends_with("extensions"), "{p:?}");
        assert!(p[0].join("hostname.configure").exists(), "{p:?}");
        assert_eq!(&p[1..], &[PathBuf::from("/a"), PathBuf::from("/b")]);
    }

    #[test]
    fn installed_binary_uses_its_share_folder_and_never_the_source_tree() {
        let d = tempfile::tempdir().unwrap();
        let source = d.path().join("src-tree/extensions");
        let build = d.path().join("src-tree/target/release");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::create_dir_all(&build).unwrap();
        // In the build folder, nothing installed next to it: the source tree.
        let exe = build.join("deploy");
        assert_eq!(shipped_dir(Some(&exe), &build, &source), source);
        let test_exe = build.join("deps/btrfs_deploy-0123");
        assert_eq!(shipped_dir(Some(&test_exe), &build, &source), source);
        // Installed under a prefix without its extensions: the prefix's
        // folder (missing), never the source tree.
        let prefix = d.path().join("dest/usr/local");
        std::fs::create_dir_all(prefix.join("bin")).unwrap();
        let installed = prefix.join("bin/deploy");
        let want = prefix.join("share/btrfs-deploy/extensions");
        assert_eq!(shipped_dir(Some(&installed), &build, &source), want);
        // With them: that folder.
        std::fs::create_dir_all(&want).unwrap();
        assert_eq!(
            shipped_dir(Some(&installed), &build, &source),
            want.canonicalize().unwrap()
        );
    }

    #[test]
    fn later_folders_override_earlier_ones() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        script(&a, "x.configure", "# summary: from a");
        script(&a, "x.check", "true");
        script(&b, "x.configure", "# summary: from b");
        script(&a, "only-a.configure", "# summary: only a");
        script(&b, "hostname.configure", "# summary: my hostname");
        let found = find(
            &names(&["x", "only-a", "hostname"]),
            &[a.clone(), b.clone()],
        )
        .unwrap();
        assert_eq!(found[0].configure, b.join("x.configure"));
        assert_eq!(found[0].summary, "from b");
        // The .check belongs to the folder the .configure was found in.
        assert_eq!(found[0].check, None);
        assert_eq!(found[1].configure, a.join("only-a.configure"));
        assert_eq!(found[2].summary, "my hostname");
        let all = available(&[a, b.clone()]).unwrap();
        let host = all.iter().find(|e| e.name == "hostname").unwrap();
        assert_eq!(host.configure, b.join("hostname.configure"));
        assert!(all.iter().any(|e| e.name == "users"));
        assert!(all.windows(2).all(|w| w[0].name < w[1].name));
    }

    #[test]
    fn missing_and_non_executable_extensions_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let msg = format!(
            "{:#}",
            find(&names(&["nope"]), &[d.path().into()]).unwrap_err()
        );
        assert!(
            msg.contains("nope") && msg.contains(&d.path().display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("extensions"), "{msg}");

        let p = script(d.path(), "plain.configure", "true");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let msg = format!(
            "{:#}",
            find(&names(&["plain"]), &[d.path().into()]).unwrap_err()
        );
        assert!(
            msg.contains("plain") && msg.contains("not an executable"),
            "{msg}"
        );

        script(d.path(), "ok.configure", "true");
        let c = script(d.path(), "ok.check", "true");
        std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o600)).unwrap();
        let msg = format!(
            "{:#}",
            find(&names(&["ok"]), &[d.path().into()]).unwrap_err()
        );
        assert!(msg.contains("ok.check"), "{msg}");

        let msg = format!("{:#}", find(&names(&["../x"]), &[]).unwrap_err());
        assert!(msg.contains("invalid extension name"), "{msg}");
        let msg = format!(
            "{:#}",
            find(&names(&["hostname", "hostname"]), &[]).unwrap_err()
        );
        assert!(msg.contains("twice"), "{msg}");
        let missing = d.path().join("no-such-dir");
        let msg = format!("{:#}", find(&names(&["hostname"]), &[missing]).unwrap_err());
        assert!(msg.contains("no-such-dir"), "{msg}");
    }

    #[test]
    fn environment_contract() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let tree = d.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        script(
            d.path(),
            "dump.configure",
            &format!(
                "env > {o}/configure.env; echo \"$#:$1\" > {o}/configure.args\n\
                 cat > {o}/configure.stdin; pwd > {o}/configure.pwd",
                o = out.display()
            ),
        );
        script(
            d.path(),
            "dump.check",
            &format!(
                "env > {o}/check.env; echo \"$#\" > {o}/check.args",
                o = out.display()
            ),
        );
        std::fs::create_dir(&out).unwrap();
        let exts = find(&names(&["dump"]), &[d.path().into()]).unwrap();
        let c = ctx(&[
            ("HOSTNAME", "box"),
            ("DB_PASSWORD", "s3cret"),
            ("SPACES", "a b\nc"),
        ]);
        run_checks(&exts, &c).unwrap();
        run_configure(&exts, &tree, &c).unwrap();
        let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
        for f in ["check.env", "configure.env"] {
            let env = read(f);
            for want in [
                "HOSTNAME=box",
                "DB_PASSWORD=s3cret",
                "SPACES=a b\nc",
                "DEPLOY_VERSION=v2",
                "DEPLOY_UPGRADE=yes",
                "DEPLOY_TARGET=/dev/null-target.img",
                "DEPLOY_EXTENSION=dump",
                "DEPLOY_ARCH=arm64\n",
                &format!(
                    "DEPLOY_TOOL_ARCH={}\n",
                    crate::tree::arch::Arch::of_this_tool().unwrap().name()
                ),
                &format!("DEPLOY_EXTENSION_DIR={}", d.path().display()),
                &format!(
                    "DEPLOY_RUN_IN_TREE={}",
                    std::env::current_exe().unwrap().display()
                ),
                "PATH=",
            ] {
                assert!(env.contains(want), "{f} lacks {want}:\n{env}");
            }
            // Nothing of our own environment leaks through (but PATH).
            for (k, _) in std::env::vars() {
                // (PWD is set by the shell itself.)
                if !["PATH", "PWD"].contains(&k.as_str()) && !c.settings.contains_key(&k) {
                    let leaked = env.lines().any(|l| l.starts_with(&format!("{k}=")));
                    assert!(!leaked, "{k} leaked:\n{env}");
                }
            }
        }
        assert!(!read("check.env").contains("DEPLOY_TREE="));
        assert!(read("configure.env").contains(&format!("DEPLOY_TREE={}\n", tree.display())));
        assert_eq!(read("configure.args"), format!("1:{}\n", tree.display()));
        assert_eq!(read("check.args"), "0\n");
        assert_eq!(read("configure.stdin"), "");
        assert_eq!(
            read("configure.pwd").trim(),
            std::env::current_dir().unwrap().display().to_string()
        );
    }

    #[test]
    fn runs_in_order_and_stops_at_the_first_failure() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        for n in ["one", "two", "three"] {
            script(
                d.path(),
                &format!("{n}.configure"),
                &format!("echo {n} >> {}", log.display()),
            );
        }
        script(
            d.path(),
            "bad.configure",
            &format!(
                "echo bad >> {}\nfor i in $(seq 1 40); do echo noise $i >&2; done\n\
                 echo 'the real reason' >&2; exit 7",
                log.display()
            ),
        );
        let tree = d.path();
        let exts = find(&names(&["three", "one", "two"]), &[d.path().into()]).unwrap();
        run_configure(&exts, tree, &ctx(&[])).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "three\none\ntwo\n");

        std::fs::remove_file(&log).unwrap();
        let exts = find(&names(&["two", "bad", "one"]), &[d.path().into()]).unwrap();
        let msg = format!("{:#}", run_configure(&exts, tree, &ctx(&[])).unwrap_err());
        assert!(msg.starts_with("extension bad failed (exit 7): "), "{msg}");
        assert!(msg.ends_with("the real reason"), "{msg}");
        assert!(
            msg.contains("noise 40") && !msg.contains("noise 5\n"),
            "{msg}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "two\nbad\n");
    }

    #[test]
    fn failing_check_names_the_extension() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "picky.configure", "exit 0");
        script(
            d.path(),
            "picky.check",
            "[ \"$COLOR\" = blue ] || { echo \"COLOR must be blue, not '$COLOR'\" >&2; exit 1; }",
        );
        let exts = find(&names(&["picky"]), &[d.path().into()]).unwrap();
        run_checks(&exts, &ctx(&[("COLOR", "blue")])).unwrap();
        let msg = format!(
            "{:#}",
            run_checks(&exts, &ctx(&[("COLOR", "red")])).unwrap_err()
        );
        assert!(
            msg.contains("picky") && msg.contains("COLOR must be blue, not 'red'"),
            "{msg}"
        );
        assert!(msg.contains("exit 1"), "{msg}");
    }

    #[test]
    fn killed_extension_is_reported() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "die.configure", "kill -9 $$");
        let exts = find(&names(&["die"]), &[d.path().into()]).unwrap();
        let msg = format!(
            "{:#}",
            run_configure(&exts, d.path(), &ctx(&[])).unwrap_err()
        );
        assert!(
            msg.contains("extension die failed (killed by signal 9)"),
            "{msg}"
        );
    }

    #[test]
    fn keeps_lines_name_plain_absolute_paths() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.configure");
        std::fs::write(
            &p,
            "#!/bin/sh\n# summary: x\n# keeps: /usr/lib/x\n  # keeps: /opt/y/z \n",
        )
        .unwrap();
        assert_eq!(
            keeps_in(&head_of(&p), &p).unwrap(),
            vec![PathBuf::from("usr/lib/x"), PathBuf::from("opt/y/z")]
        );
        for bad in [
            "usr/lib/x",
            "/",
            "/usr/../etc",
            "/usr//lib",
            "/usr/./lib",
            "",
        ] {
            std::fs::write(&p, format!("#!/bin/sh\n# keeps: {bad}\n")).unwrap();
            let e = keeps_in(&head_of(&p), &p).unwrap_err().to_string();
            assert!(
                e.contains("line 2") && e.contains("absolute path"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn summary_is_the_first_summary_line() {
        let d = tempfile::tempdir().unwrap();
        let p = script(
            d.path(),
            "s.configure",
            "# other\n# summary:  Does things \n# summary: no",
        );
        assert_eq!(summary_in(&head_of(&p)), "Does things");
        let p = script(d.path(), "t.configure", "true");
        assert_eq!(summary_in(&head_of(&p)), "");
    }

    #[test]
    fn every_shipped_extension_has_a_summary() {
        let all = available(&[]).unwrap();
        for want in [
            "hostname",
            "install-files",
            "fstab",
            "ssh-keys",
            "systemd-units",
            "network",
            "users",
        ] {
            let e = all
                .iter()
                .find(|e| e.name == want)
                .unwrap_or_else(|| panic!("{want} not shipped: {all:?}"));
            assert!(!e.summary.is_empty(), "{want} has no summary");
            assert!(e.check.is_some(), "{want} has no .check");
        }
    }

    #[test]
    fn check_ip_accepts_what_networkd_accepts() {
        for ok in [
            "10.0.2.15",
            "192.168.1.1",
            "255.255.255.254",
            "1.2.3.0",
            "2001:db8::10",
            "::1",
            "1::",
            "fe80::1",
            "1:2:3:4:5:6:7:8",
            "1::8",
            "::ffff:10.0.0.1",
            "64:ff9b::192.0.2.33",
            "2606:4700::1111",
            "FD00::A",
        ] {
            check_ip(ok, false).unwrap_or_else(|e| panic!("{ok}: {e:#}"));
        }
        for ok in [
            "10.0.2.15/24",
            "10.0.2.15/0",
            "10.0.2.15/32",
            "fd00::10/64",
            "fd00::10/128",
            "::1/0",
        ] {
            check_ip(ok, true).unwrap_or_else(|e| panic!("{ok}: {e:#}"));
        }
    }

    #[test]
    fn check_ip_refuses_near_misses() {
        let bad = |v: &str, prefix: bool, needle: &str| {
            let msg = format!("{:#}", check_ip(v, prefix).expect_err(v));
            assert!(msg.contains(needle), "{v}: {msg}");
        };
        // IPv4: leading zeros (octal to inet_aton), ranges, shapes.
        for v in [
            "10.0.2.015",
            "010.0.2.15",
            "10.0.2.00",
            "10.0.2.256",
            "10.0.2",
            "10.0.2.1.5",
            "10.0.2.",
            "1.2.3.-4",
            "+1.2.3.4",
            "0x1.2.3.4",
            " 1.2.3.4",
            "1.2.3.4 ",
        ] {
            bad(v, false, "not an IPv4 address");
        }
        // IPv6: compression forms and group shapes.
        for v in [
            "1:::2",
            ":1:2:3:4:5:6:7",
            "1:2:3:4:5:6:7:",
            "1::2::3",
            "1:2:3:4:5:6:7:8:9",
            "1:2:3:4:5:6:7",
            "12345::",
            "g::1",
            "::ffff:10.0.0.015",
            "1:2:3:4:5:6:7:8::",
            ":::",
        ] {
            bad(v, false, "not an IPv6 address");
        }
        bad("fe80::1%eth0", false, "zone index");
        // Prefix lengths.
        for v in [
            "10.0.2.15/33",
            "10.0.2.15/024",
            "10.0.2.15/",
            "10.0.2.15/-1",
            "10.0.2.15/+8",
            "fd00::1/129",
            "fd00::1/6 4",
            "10.0.2.15/24/8",
        ] {
            bad(v, true, "prefix length must be a number");
        }
        bad("10.0.2.15", true, "has no prefix length");
        bad("10.0.2.15/24", false, "without a /prefix");
        for v in ["0.0.0.0", "::"] {
            bad(v, false, "unspecified");
        }
        for v in ["224.0.0.1", "ff02::1", "255.255.255.255"] {
            bad(v, false, "multicast or broadcast");
        }
        bad("0.0.0.0/24", true, "unspecified");
    }
}
