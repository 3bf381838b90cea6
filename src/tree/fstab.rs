//! Completing a version's `etc/fstab` (design §1, "fstab completion").
//!
//! Existing lines are kept byte for byte and always win (except that root
//! mode `ro` makes a kept `/` entry read-only, see [`complete_for`]). Missing entries for
//! `/` and for the state directories are appended after one comment line, so
//! completing twice adds nothing the second time.

use crate::store::rootmode::RootMode;
use crate::util::rootpath;
use anyhow::{bail, Context, Result};
use std::fs::{self, OpenOptions, Permissions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directories whose content lives in the shared `/state/<dir>` subvolumes.
pub const STATE_DIRS: [&str; 5] = ["home", "root", "opt", "srv", "var"];

/// The comment line written before the entries this tool adds.
pub const ADDED_COMMENT: &str = "# Added by btrfs-deploy";

/// Mount options of the added `/` entry (also used for state subvolumes).
const MOUNT_OPTIONS: &str = "defaults,rw,noatime";

/// Mount options of the added `/` entry of a `ro` version.
pub const RO_ROOT_OPTIONS: &str = "defaults,ro,noatime";

/// Mode of an `etc/fstab` this tool creates.
const FSTAB_MODE: u32 = 0o644;

/// Result of completing an fstab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The complete fstab: the original lines, verbatim and in their order,
    /// with the added lines placed so that `mount -a` mounts every parent
    /// first (see [`complete`]).
    pub content: String,
    /// Mount points added, in order (`/`, `/home`, ...); empty if none.
    pub added: Vec<String>,
    /// State directories (`"srv"`, without slash) that an existing entry
    /// already mounts: they get no `/state` subvolume and keep their content.
    pub kept_state_dirs: Vec<String>,
    /// Kept entries that are probably wrong on this disk (a `/` entry naming
    /// another device), each naming the line, the risk and the fix.
    pub warnings: Vec<String>,
    /// Line numbers (1-based, in the original content) of kept `/` entries
    /// whose options were made read-only (root mode `ro`): `ro` added,
    /// `rw` removed, each after one [`RO_COMMENT`] line.
    pub made_ro: Vec<usize>,
}

/// The comment line written before a kept `/` entry made read-only.
pub const RO_COMMENT: &str =
    "# btrfs-deploy: `ro` added to the next line for root mode ro (was `{}`)";

/// The mount points of the entries in `content`, decoded (`\040` is a space)
/// and normalised (`/home/` and `//home` are `/home`), in file order without
/// duplicates. Comments, blank lines, swap entries and entries whose mount
/// point is not an absolute path (`none`, `swap`) are skipped.
pub fn mount_points(content: &str) -> Vec<String> {
    let mut points: Vec<String> = Vec::new();
    for line in content.lines() {
        if let Some(point) = entry_mount_point(line) {
            if !points.contains(&point) {
                points.push(point);
            }
        }
    }
    points
}

/// One entry of an fstab, as `deploy check` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number.
    pub number: usize,
    /// First field (`UUID=...`, a device).
    pub spec: String,
    /// Mount point, decoded and normalised.
    pub point: String,
    /// Mount options, split at commas (empty when the field is missing).
    pub options: Vec<String>,
}

/// The entries of `content` that mount something on an absolute path
/// (as [`mount_points`] counts them), in file order.
pub fn lines(content: &str) -> Vec<Line> {
    content
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let point = entry_mount_point(line)?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some(Line {
                number: i + 1,
                spec: fields[0].to_string(),
                point,
                options: fields
                    .get(3)
                    .map(|o| o.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The normalised mount point of one fstab line, if it is an entry that
/// mounts something on an absolute path.
fn entry_mount_point(line: &str) -> Option<String> {
    let trimmed = line.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return None;
    }
    let mut fields = trimmed.split_whitespace();
    let _spec = fields.next()?;
    let point = decode_octal(fields.next()?);
    if fields.next() == Some("swap") || !point.starts_with('/') {
        return None;
    }
    Some(normalize_mount_point(&point))
}

/// Decodes fstab's octal escapes (`\040` space, `\011` tab, `\012` newline,
/// `\134` backslash): a backslash followed by three octal digits. Anything
/// else is kept as written.
fn decode_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)) && d[0] <= b'3'
        });
        match escape {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/home/`, `//home`, `/./home` → `/home`; `/` and `//` → `/`.
fn normalize_mount_point(point: &str) -> String {
    let parts: Vec<&str> = point
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Completes `content` per design §1: adds `/` when no entry mounts `/`, and
/// `/<dir>` on `subvol=/state/<dir>` for each state directory no entry mounts.
/// Existing lines are kept verbatim and in their order; each added line goes
/// before the first existing entry whose mount point is below it (`/var`
/// before `tmpfs /var/log ...`; `/` before every other entry), so that a
/// `mount -a` in file order mounts every parent first; the others go at the
/// end. Each group of added lines follows one [`ADDED_COMMENT`] line. Nothing
/// is added (and the content is returned unchanged) when everything is
/// already mounted.
///
/// An existing `/` entry that names another device than `UUID=<fs_uuid>` is
/// kept (existing entries win) and reported in [`Completion::warnings`].
#[cfg(test)]
pub fn complete(content: &str, fs_uuid: &str) -> Completion {
    complete_for(content, fs_uuid, "", RootMode::Rw)
}

/// [`complete`] for a version `label` of root mode `mode`: the added `/`
/// entry is `ro` for `ro` (`/` stays read-only; `rw` under `volatile`,
/// whose `/` is the writable overlay), and `ro` adds `/etc` on the
/// version's own subvolume `systems/<label>/run/etc`, read-write.
///
/// Under `ro`, a kept `/` entry (the rootfs's own) gets `ro` in its options
/// and loses `rw` (see [`root_line_ro`]), or the boot (systemd-remount-fs,
/// `mount -o remount /`) would make `/` writable again; the rest of the
/// line is kept. (Under `volatile` the `/` of fstab is the overlay, which is
/// meant to be writable: kept entries stay as they are.) Under `rw` and
/// `volatile`, an entry made read-only so before (a bundle of an `ro`
/// version) gets its old options back.
pub fn complete_for(content: &str, fs_uuid: &str, label: &str, mode: RootMode) -> Completion {
    let mut made_ro = Vec::new();
    let rewritten;
    let content = if mode == RootMode::Ro {
        let mut out = String::with_capacity(content.len() + 100);
        for (i, line) in content.split_inclusive('\n').enumerate() {
            let body = line.trim_end_matches('\n');
            match (entry_mount_point(body).as_deref(), root_line_ro(body)) {
                (Some("/"), Some((new, old_options))) => {
                    made_ro.push(i + 1);
                    out.push_str(&RO_COMMENT.replace("{}", &old_options));
                    out.push('\n');
                    out.push_str(&new);
                    out.push_str(&line[body.len()..]);
                }
                _ => out.push_str(line),
            }
        }
        rewritten = out;
        rewritten.as_str()
    } else {
        rewritten = undo_ro(content);
        rewritten.as_str()
    };
    let existing = mount_points(content);
    let mounted = |point: &str| existing.iter().any(|p| p == point);
    let mut added = Vec::new();
    let mut lines = Vec::new();
    if !mounted("/") {
        added.push("/".to_string());
        let opts = if mode == RootMode::Ro {
            RO_ROOT_OPTIONS
        } else {
            MOUNT_OPTIONS
        };
        lines.push(format!("UUID={fs_uuid} / btrfs {opts} 0 1"));
    }
    if mode == RootMode::Ro && !mounted("/etc") {
        added.push("/etc".to_string());
        lines.push(format!(
            "UUID={fs_uuid} /etc btrfs subvol=/systems/{label}/run/etc,{MOUNT_OPTIONS} 0 0"
        ));
    }
    let mut kept_state_dirs = Vec::new();
    for dir in STATE_DIRS {
        if mounted(&format!("/{dir}")) {
            kept_state_dirs.push(dir.to_string());
        } else {
            added.push(format!("/{dir}"));
            lines.push(format!(
                "UUID={fs_uuid} /{dir} btrfs subvol=/state/{dir},{MOUNT_OPTIONS} 0 2"
            ));
        }
    }
    Completion {
        content: insert_lines(content, &added, &lines),
        added,
        kept_state_dirs,
        warnings: root_entry_warnings(content, fs_uuid),
        made_ro,
    }
}

/// An fstab entry line with `ro` in its options and no `rw` (each `rw`
/// removed, `ro` appended: `defaults,rw,noatime` becomes
/// `defaults,noatime,ro`; a missing options field becomes `defaults,ro`),
/// and its old options; None when it already has `ro` and no `rw`. Every
/// other byte of the line is kept.
pub fn root_line_ro(line: &str) -> Option<(String, String)> {
    let fields = field_spans(line);
    if fields.len() < 3 {
        return None;
    }
    let Some(&(a, b)) = fields.get(3) else {
        return Some((format!("{} defaults,ro", line.trim_end()), String::new()));
    };
    let old = &line[a..b];
    let opts: Vec<&str> = old.split(',').collect();
    if opts.contains(&"ro") && !opts.contains(&"rw") {
        return None;
    }
    let mut new: Vec<&str> = opts
        .into_iter()
        .filter(|o| *o != "rw" && *o != "ro" && !o.is_empty())
        .collect();
    new.push("ro");
    Some((
        format!("{}{}{}", &line[..a], new.join(","), &line[b..]),
        old.to_string(),
    ))
}

/// Byte ranges of the whitespace-separated fields of `line`.
fn field_spans(line: &str) -> Vec<(usize, usize)> {
    let mut fields = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                fields.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        fields.push((s, line.len()));
    }
    fields
}

/// The old options an [`RO_COMMENT`] line names.
fn ro_comment_options(line: &str) -> Option<&str> {
    let (head, tail) = RO_COMMENT.split_once("{}")?;
    line.trim_end().strip_prefix(head)?.strip_suffix(tail)
}

/// `content` with each `/` entry that an earlier `ro` completion made
/// read-only (an [`RO_COMMENT`] line before it, as a bundle of an `ro`
/// version brings) given back its old options, and the comment dropped.
fn undo_ro(content: &str) -> String {
    let mut out = String::with_capacity(content.len());
    let mut lines = content.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        let next = lines.peek().map(|l| l.trim_end_matches('\n'));
        let (Some(old), Some(entry)) = (ro_comment_options(line), next) else {
            out.push_str(line);
            continue;
        };
        let spans = field_spans(entry);
        if entry_mount_point(entry).as_deref() != Some("/") || spans.len() < 4 {
            out.push_str(line);
            continue;
        }
        let (a, b) = spans[3];
        let old = if old.is_empty() { "defaults" } else { old };
        let next = lines.next().unwrap_or_default();
        out.push_str(&format!("{}{old}{}", &entry[..a], &entry[b..]));
        out.push_str(&next[entry.len()..]);
    }
    out
}

/// True when mount point `child` is strictly below `parent` (both normalised).
fn is_below(child: &str, parent: &str) -> bool {
    child != parent
        && (parent == "/"
            || child
                .strip_prefix(parent)
                .is_some_and(|rest| rest.starts_with('/')))
}

/// `content` with the added `lines` (mounting `points`, same order) inserted:
/// each before the first existing entry below its mount point (and the
/// comment lines right above that entry), the rest at the end; each group after one [`ADDED_COMMENT`] line. A missing final
/// newline of `content` is added before lines appended at the end.
fn insert_lines(content: &str, points: &[String], lines: &[String]) -> String {
    let mut out = String::with_capacity(content.len() + 80 * (lines.len() + 1));
    if lines.is_empty() {
        out.push_str(content);
        return out;
    }
    let existing: Vec<&str> = content.split_inclusive('\n').collect();
    // For each added line, the index of the existing line it must precede:
    // the first entry below it, or the comment lines right above that entry
    // (they describe it).
    let before: Vec<Option<usize>> = points
        .iter()
        .map(|p| {
            let mut at = existing.iter().position(|l| {
                entry_mount_point(l.trim_end_matches('\n')).is_some_and(|q| is_below(&q, p))
            })?;
            while at > 0 && existing[at - 1].trim_start().starts_with('#') {
                at -= 1;
            }
            Some(at)
        })
        .collect();
    let push_group = |out: &mut String, at: Option<usize>| {
        let group: Vec<&String> = lines
            .iter()
            .zip(&before)
            .filter(|(_, b)| **b == at)
            .map(|(l, _)| l)
            .collect();
        if group.is_empty() {
            return;
        }
        out.push_str(ADDED_COMMENT);
        out.push('\n');
        for line in group {
            out.push_str(line);
            out.push('\n');
        }
    };
    for (i, line) in existing.iter().enumerate() {
        push_group(&mut out, Some(i));
        out.push_str(line);
    }
    if before.iter().any(Option::is_none) && !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    push_group(&mut out, None);
    out
}

/// Warnings for entries mounting `/` from another device than the filesystem
/// `fs_uuid` (`UUID=dead-beef / ext4 ...`, as cloud-image trees ship): the
/// line is kept, but the system would mount or check another root than the
/// disk it boots from. Names the line (1-based), the risk and the fix.
pub fn root_entry_warnings(content: &str, fs_uuid: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if entry_mount_point(line).as_deref() != Some("/") {
            continue;
        }
        let spec = line.split_whitespace().next().unwrap_or("");
        if names_filesystem(spec, fs_uuid) {
            continue;
        }
        out.push(format!(
            "etc/fstab line {} `{}` mounts / from {spec}, not from this disk's \
             filesystem (UUID={fs_uuid}): it is kept (existing entries win), but the \
             system will not mount its own root through it; to fix it, remove that \
             line from the rootfs's etc/fstab (btrfs-deploy then adds \
             `UUID={fs_uuid} / btrfs ...`) or make it name UUID={fs_uuid}",
            i + 1,
            line.trim()
        ));
    }
    out
}

/// True when an fstab spec names the filesystem `fs_uuid`
/// (`UUID=<uuid>` or `/dev/disk/by-uuid/<uuid>`, case-insensitive).
fn names_filesystem(spec: &str, fs_uuid: &str) -> bool {
    spec.strip_prefix("UUID=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-uuid/"))
        .map(|u| u.trim_matches('"'))
        .is_some_and(|u| u.eq_ignore_ascii_case(fs_uuid))
}

/// Completes `etc/fstab` inside `tree` (a root tree, possibly hostile) and
/// writes it back when something was added.
///
/// - missing: created (with `etc/` if needed), mode 0644;
/// - regular file: rewritten in place (owner, mode and xattrs kept);
/// - symlink: resolved inside `tree` (never on the host); if it leads to a
///   regular file inside the tree, the link is replaced by a regular file
///   (mode 0644) holding that file's content plus the added lines, so that no
///   other file is ever written through the link; a dangling link or one
///   leading to something else than a regular file is an error.
///
/// Nothing is written when nothing needs adding.
#[cfg(test)]
pub fn complete_file(tree: &Path, fs_uuid: &str) -> Result<Completion> {
    complete_file_for(tree, fs_uuid, "", RootMode::Rw)
}

/// [`complete_file`] with the entries of root mode `mode` ([`complete_for`]).
pub fn complete_file_for(
    tree: &Path,
    fs_uuid: &str,
    label: &str,
    mode: RootMode,
) -> Result<Completion> {
    let etc = etc_dir(tree)?;
    let fstab = etc.join("fstab");
    let meta = match fs::symlink_metadata(&fstab) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", fstab.display())),
    };
    match meta {
        None => {
            let completion = complete_for("", fs_uuid, label, mode);
            write_new(&fstab, &completion.content)?;
            Ok(completion)
        }
        Some(m) if m.file_type().is_symlink() => {
            complete_symlink(tree, &fstab, fs_uuid, label, mode)
        }
        Some(m) if m.is_file() => {
            let text = read_text(&fstab)?;
            let completion = complete_for(&text, fs_uuid, label, mode);
            if completion.content != text {
                rewrite(&fstab, &completion.content)?;
            }
            Ok(completion)
        }
        Some(_) => bail!(
            "{} is neither a regular file nor a symlink; cannot complete it",
            fstab.display()
        ),
    }
}

/// The host path of the tree's `etc` directory (symlinks resolved inside the
/// tree), created with mode 0755 when missing.
fn etc_dir(tree: &Path) -> Result<PathBuf> {
    if let Some(etc) = rootpath::try_resolve_in_root(tree, Path::new("etc"))? {
        if !etc.is_dir() {
            bail!("{} is not a directory", etc.display());
        }
        return Ok(etc);
    }
    let etc = tree.join("etc");
    if fs::symlink_metadata(&etc).is_ok() {
        bail!(
            "{} is a symlink that leads nowhere inside {}; cannot write etc/fstab",
            etc.display(),
            tree.display()
        );
    }
    fs::create_dir(&etc).with_context(|| format!("creating {}", etc.display()))?;
    fs::set_permissions(&etc, Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", etc.display()))?;
    Ok(etc)
}

/// Completes an `etc/fstab` that is a symlink (see [`complete_file`]).
fn complete_symlink(
    tree: &Path,
    link: &Path,
    fs_uuid: &str,
    label: &str,
    mode: RootMode,
) -> Result<Completion> {
    let target = fs::read_link(link).with_context(|| format!("reading link {}", link.display()))?;
    let resolved = rootpath::try_resolve_in_root(tree, Path::new("etc/fstab"))?;
    let Some(resolved) = resolved.filter(|p| p.is_file()) else {
        bail!(
            "{} is a symlink to {}, which is not a regular file inside {} \
             (symlinks are resolved inside the tree, never on the host); \
             replace it with a regular file or remove it",
            link.display(),
            target.display(),
            tree.display()
        );
    };
    let text = read_text(&resolved)?;
    let completion = complete_for(&text, fs_uuid, label, mode);
    if completion.content != text {
        fs::remove_file(link).with_context(|| format!("removing link {}", link.display()))?;
        write_new(link, &completion.content)?;
    }
    Ok(completion)
}

/// Reads a text file, refusing content that is not UTF-8.
fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).with_context(|| format!("{} is not valid UTF-8", path.display()))
}

/// Creates `path` (which must not exist, not even as a link) with mode 0644.
fn write_new(path: &Path, content: &str) -> Result<()> {
    let ctx = || format!("creating {}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FSTAB_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(ctx)?;
    file.set_permissions(Permissions::from_mode(FSTAB_MODE))
        .with_context(ctx)?;
    file.write_all(content.as_bytes()).with_context(ctx)?;
    file.sync_all().with_context(ctx)
}

/// Replaces the content of the existing regular file `path` (not a link).
fn rewrite(path: &Path, content: &str) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(ctx)?;
    file.write_all(content.as_bytes()).with_context(ctx)?;
    file.sync_all().with_context(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    const UUID: &str = "0a1b2c3d-1111-2222-3333-444455556666";

    fn root_line() -> String {
        format!("UUID={UUID} / btrfs defaults,rw,noatime 0 1")
    }

    fn state_line(dir: &str) -> String {
        format!("UUID={UUID} /{dir} btrfs subvol=/state/{dir},defaults,rw,noatime 0 2")
    }

    fn full_addition() -> String {
        let mut s = format!("{ADDED_COMMENT}\n{}\n", root_line());
        for dir in STATE_DIRS {
            s.push_str(&state_line(dir));
            s.push('\n');
        }
        s
    }

    #[test]
    fn empty_gets_everything() {
        let c = complete("", UUID);
        assert_eq!(c.content, full_addition());
        assert_eq!(c.added, ["/", "/home", "/root", "/opt", "/srv", "/var"]);
        assert!(c.kept_state_dirs.is_empty());
    }

    #[test]
    fn existing_lines_kept_verbatim() {
        let head = "# /etc/fstab: static file system information.\n\
                    #\n\
                    \n";
        let tail = "proc\t/proc\tproc\tdefaults\t0\t0\n   \n\t# indented comment /home\n";
        let c = complete(&format!("{head}{tail}"), UUID);
        // `/` goes before /proc (below it); the state directories at the end.
        let mut state = format!("{ADDED_COMMENT}\n");
        for dir in STATE_DIRS {
            state.push_str(&state_line(dir));
            state.push('\n');
        }
        assert_eq!(
            c.content,
            format!("{head}{ADDED_COMMENT}\n{}\n{tail}{state}", root_line())
        );
        assert_eq!(c.added, ["/", "/home", "/root", "/opt", "/srv", "/var"]);
    }

    #[test]
    fn missing_final_newline() {
        let original = "proc /proc proc defaults 0 0";
        let c = complete(original, UUID);
        let state = full_addition().replace(&format!("{}\n", root_line()), "");
        assert_eq!(
            c.content,
            format!("{ADDED_COMMENT}\n{}\n{original}\n{state}", root_line())
        );
        // Only comments and no final newline: appended after a newline.
        let c = complete("# x", UUID);
        assert_eq!(c.content, format!("# x\n{}", full_addition()));
    }

    /// The lines of `content` that are entries, in order, by mount point.
    fn order(content: &str) -> Vec<String> {
        content.lines().filter_map(entry_mount_point).collect()
    }

    /// True when every entry's parent mount points come before it.
    fn parents_first(content: &str) -> bool {
        let points = order(content);
        points
            .iter()
            .enumerate()
            .all(|(i, p)| points[i + 1..].iter().all(|later| !is_below(p, later)))
    }

    #[test]
    fn added_entries_go_before_existing_child_mounts() {
        // The case of the issue: /var/log in RAM, /var added.
        let original = "# logs in RAM\ntmpfs /var/log tmpfs defaults 0 0\n";
        let c = complete(original, UUID);
        // Added before the entry's comment, which stays with its entry.
        assert!(
            c.content
                .contains(&format!("{}\n{original}", state_line("var"))),
            "{}",
            c.content
        );
        assert_eq!(
            order(&c.content),
            ["/", "/var", "/var/log", "/home", "/root", "/opt", "/srv"]
        );
        assert!(parents_first(&c.content), "{}", c.content);
        // Several children, nested, one below a kept state directory, and
        // lines that must stay verbatim and in their order.
        let original = "proc /proc proc defaults 0 0\n\
                        tmpfs\t/home/alice\ttmpfs\tsize=1m 0 0\n\
                        LABEL=data /srv/data ext4 defaults 0 2\n\
                        LABEL=data2 /srv/data/deep ext4 defaults 0 2\n\
                        tmpfs /var/log tmpfs defaults 0 0\n\
                        tmpfs /var/log/journal tmpfs defaults 0 0\n\
                        LABEL=opt /opt ext4 defaults 0 2\n\
                        tmpfs /opt/cache tmpfs defaults 0 0\n\
                        tmpfs /variable tmpfs defaults 0 0\n";
        let c = complete(original, UUID);
        assert!(parents_first(&c.content), "{}", c.content);
        assert_eq!(
            order(&c.content),
            [
                "/",
                "/proc",
                "/home",
                "/home/alice",
                "/srv",
                "/srv/data",
                "/srv/data/deep",
                "/var",
                "/var/log",
                "/var/log/journal",
                "/opt",
                "/opt/cache",
                "/variable",
                "/root"
            ]
        );
        assert_eq!(c.kept_state_dirs, ["opt"]);
        // Removing the added lines gives back the original, byte for byte.
        let kept: String = c
            .content
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("UUID=") && l.trim_end() != ADDED_COMMENT)
            .collect();
        assert_eq!(kept, original);
        // Completing again changes nothing.
        assert_eq!(complete(&c.content, UUID).content, c.content);
    }

    #[test]
    fn a_root_entry_naming_another_device_is_kept_with_a_warning() {
        let original = "# cloud image\nUUID=dead-beef / ext4 defaults 0 1\n";
        let c = complete(original, UUID);
        assert!(!c.added.contains(&"/".to_string()));
        assert!(c.content.starts_with(original), "existing entries win");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        let w = &c.warnings[0];
        for needle in [
            "etc/fstab line 2",
            "UUID=dead-beef / ext4 defaults 0 1",
            "will not mount its own root",
            "remove that line",
            UUID,
        ] {
            assert!(w.contains(needle), "{needle:?} not in {w}");
        }
        // Neighbours: a device path, a label; ours (any case, by-uuid) is fine.
        for spec in ["/dev/sda1", "LABEL=cloudimg-rootfs", "PARTUUID=1234-01"] {
            let c = complete(&format!("{spec} / ext4 defaults 0 1\n"), UUID);
            assert_eq!(c.warnings.len(), 1, "{spec}");
            assert!(c.warnings[0].contains(spec));
        }
        for spec in [
            format!("UUID={UUID}"),
            format!("UUID={}", UUID.to_uppercase()),
            format!("/dev/disk/by-uuid/{UUID}"),
        ] {
            let c = complete(&format!("{spec} / btrfs defaults 0 1\n"), UUID);
            assert!(c.warnings.is_empty(), "{spec}: {:?}", c.warnings);
        }
        assert!(complete("", UUID).warnings.is_empty());
    }

    #[test]
    fn idempotent() {
        let first = complete("proc /proc proc defaults 0 0\n", UUID);
        let second = complete(&first.content, UUID);
        assert_eq!(second.content, first.content);
        assert!(second.added.is_empty());
        assert_eq!(second.kept_state_dirs, STATE_DIRS);
        // `/` before /proc, the state directories at the end.
        assert_eq!(second.content.matches(ADDED_COMMENT).count(), 2);
        // A different UUID does not add anything either: entries win.
        assert_eq!(complete(&first.content, "other").content, first.content);
    }

    #[test]
    fn root_present_not_added() {
        let original = "/dev/sda1 / ext4 errors=remount-ro 0 1\n";
        let c = complete(original, UUID);
        assert_eq!(c.added, ["/home", "/root", "/opt", "/srv", "/var"]);
        assert!(!c.content.contains(&root_line()));
        assert!(c.content.contains(&state_line("home")));
    }

    #[test]
    fn state_dir_mounted_elsewhere_is_kept() {
        let original = "LABEL=data\t/srv\text4\tdefaults\t0\t2\n";
        let c = complete(original, UUID);
        assert_eq!(c.kept_state_dirs, ["srv"]);
        assert!(!c.added.contains(&"/srv".to_string()));
        assert!(!c.content.contains("subvol=/state/srv"));
        assert!(c.content.contains(&state_line("var")));
    }

    #[test]
    fn trailing_slash_and_double_slash() {
        let original = "tmpfs /home/ tmpfs defaults 0 0\ntmpfs //opt tmpfs defaults 0 0\n";
        let c = complete(original, UUID);
        assert_eq!(c.kept_state_dirs, ["home", "opt"]);
        assert_eq!(mount_points(original), ["/home", "/opt"]);
        assert_eq!(mount_points("/dev/x // ext4 defaults 0 1"), ["/"]);
    }

    #[test]
    fn octal_escapes_decoded() {
        let original = "/dev/sdb1 /mnt/my\\040disk ext4 defaults 0 2\n\
                        /dev/sdb2 /a\\011b\\134c ext4 defaults 0 2\n\
                        /dev/sdb3 /v\\141r ext4 defaults 0 2\n\
                        /dev/sdb4 /x\\9 ext4 defaults 0 2\n";
        assert_eq!(
            mount_points(original),
            ["/mnt/my disk", "/a\tb\\c", "/var", "/x\\9"]
        );
        let c = complete(original, UUID);
        assert_eq!(c.kept_state_dirs, ["var"]);
        assert!(c.content.contains(original));
        assert!(parents_first(&c.content));
    }

    #[test]
    fn swap_and_none_ignored_but_kept() {
        let original = "/dev/sda2 none swap sw 0 0\n/swapfile swap swap defaults 0 0\n\
                        /dev/sda3 /var swap sw 0 0\n";
        assert!(mount_points(original).is_empty());
        let c = complete(original, UUID);
        assert!(c.content.starts_with(original));
        assert_eq!(c.added.len(), 6);
    }

    #[test]
    fn comments_do_not_count() {
        let original = "#UUID=x / btrfs defaults 0 1\n  # /home\n#/var x y\n";
        assert!(mount_points(original).is_empty());
        assert_eq!(complete(original, UUID).added.len(), 6);
    }

    #[test]
    fn one_field_line_ignored() {
        assert!(mount_points("garbage\n").is_empty());
    }

    #[test]
    fn everything_mounted_adds_no_comment() {
        let original = "a / ext4 d 0 1\nb /home ext4 d 0 2\nc /root ext4 d 0 2\n\
                        d /opt ext4 d 0 2\ne /srv ext4 d 0 2\nf /var ext4 d 0 2";
        let c = complete(original, UUID);
        assert_eq!(c.content, original); // not even a newline is added
        assert!(c.added.is_empty());
    }

    fn tree() -> TempDir {
        TempDir::new().unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn file_missing_is_created() {
        let t = tree();
        let c = complete_file(t.path(), UUID).unwrap();
        let path = t.path().join("etc/fstab");
        assert_eq!(fs::read_to_string(&path).unwrap(), full_addition());
        assert_eq!(c.content, full_addition());
        assert_eq!(mode(&path), 0o644);
        assert_eq!(mode(&t.path().join("etc")), 0o755);
        // Second run: nothing added, file unchanged.
        let again = complete_file(t.path(), UUID).unwrap();
        assert!(again.added.is_empty());
        assert_eq!(fs::read_to_string(&path).unwrap(), full_addition());
    }

    #[test]
    fn file_regular_rewritten_in_place() {
        let t = tree();
        fs::create_dir(t.path().join("etc")).unwrap();
        let path = t.path().join("etc/fstab");
        fs::write(&path, "proc /proc proc defaults 0 0").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        let c = complete_file(t.path(), UUID).unwrap();
        let want = complete("proc /proc proc defaults 0 0", UUID).content;
        assert!(want.contains("proc /proc proc defaults 0 0\n"));
        assert_eq!(fs::read_to_string(&path).unwrap(), want);
        assert_eq!(c.content, want);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn file_symlink_absolute_resolved_in_tree() {
        let t = tree();
        let r = t.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::create_dir_all(r.join("usr/share")).unwrap();
        fs::write(r.join("usr/share/fstab"), "proc /proc proc defaults 0 0\n").unwrap();
        symlink("/usr/share/fstab", r.join("etc/fstab")).unwrap();
        let c = complete_file(r, UUID).unwrap();
        let link = r.join("etc/fstab");
        assert!(
            fs::symlink_metadata(&link).unwrap().is_file(),
            "link replaced"
        );
        assert_eq!(mode(&link), 0o644);
        let want = complete("proc /proc proc defaults 0 0\n", UUID).content;
        assert_eq!(fs::read_to_string(&link).unwrap(), want);
        assert_eq!(c.content, want);
        // The link's target is left alone.
        assert_eq!(
            fs::read_to_string(r.join("usr/share/fstab")).unwrap(),
            "proc /proc proc defaults 0 0\n"
        );
    }

    #[test]
    fn file_symlink_escaping_clamped_to_tree() {
        let t = tree();
        let r = t.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        symlink("../../../../../../../../etc/passwd", r.join("etc/fstab")).unwrap();
        let c = complete_file(r, UUID).unwrap();
        // The tree's own passwd was the content; the host's never is.
        assert!(c.content.starts_with("root:x:0:0::/root:/bin/sh\n"));
        assert_eq!(
            fs::read_to_string(r.join("etc/passwd")).unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
    }

    #[test]
    fn file_symlink_to_host_file_is_error() {
        let t = tree();
        let r = t.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        // /etc/hostname exists on the host but not in the tree.
        symlink("/etc/hostname", r.join("etc/fstab")).unwrap();
        let err = format!("{:#}", complete_file(r, UUID).unwrap_err());
        assert!(err.contains("/etc/hostname"), "{err}");
        assert!(err.contains("not a regular file inside"), "{err}");
        assert!(fs::symlink_metadata(r.join("etc/fstab"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn file_symlink_dangling_is_error() {
        let t = tree();
        let r = t.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        symlink("nowhere", r.join("etc/fstab")).unwrap();
        assert!(complete_file(r, UUID).is_err());
        symlink("/", r.join("etc/dirlink")).unwrap();
        fs::remove_file(r.join("etc/fstab")).unwrap();
        symlink("dirlink", r.join("etc/fstab")).unwrap();
        assert!(
            complete_file(r, UUID).is_err(),
            "a directory is not an fstab"
        );
    }

    #[test]
    fn file_symlink_complete_not_touched() {
        let t = tree();
        let r = t.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        let full = complete("", UUID).content;
        fs::write(r.join("etc/fstab.real"), &full).unwrap();
        symlink("fstab.real", r.join("etc/fstab")).unwrap();
        let c = complete_file(r, UUID).unwrap();
        assert!(c.added.is_empty());
        assert!(fs::symlink_metadata(r.join("etc/fstab"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn etc_symlink_resolved_in_tree() {
        let t = tree();
        let r = t.path();
        fs::create_dir_all(r.join("usr/etc")).unwrap();
        symlink("/usr/etc", r.join("etc")).unwrap();
        complete_file(r, UUID).unwrap();
        assert_eq!(
            fs::read_to_string(r.join("usr/etc/fstab")).unwrap(),
            full_addition()
        );
        // etc -> / on the host would be the host's /etc/fstab: here it is the tree.
        let t2 = tree();
        symlink("/", t2.path().join("etc")).unwrap();
        complete_file(t2.path(), UUID).unwrap();
        assert_eq!(
            fs::read_to_string(t2.path().join("fstab")).unwrap(),
            full_addition()
        );
    }

    #[test]
    fn etc_dangling_symlink_is_error() {
        let t = tree();
        symlink("/nonexistent-dir", t.path().join("etc")).unwrap();
        let err = format!("{:#}", complete_file(t.path(), UUID).unwrap_err());
        assert!(err.contains("leads nowhere"), "{err}");
    }

    #[test]
    fn ro_makes_a_kept_root_entry_read_only() {
        let vendor = "# vendor\nLABEL=root\t/   ext4  defaults,rw,errors=remount-ro  0 1\n\
                      tmpfs /tmp tmpfs defaults 0 0\n";
        let c = complete_for(vendor, UUID, "v1", RootMode::Ro);
        assert_eq!(c.made_ro, vec![2]);
        assert!(!c.added.contains(&"/".to_string()), "{:?}", c.added);
        assert!(
            c.content.contains(
                "# btrfs-deploy: `ro` added to the next line for root mode ro \
                 (was `defaults,rw,errors=remount-ro`)\n\
                 LABEL=root\t/   ext4  defaults,errors=remount-ro,ro  0 1\n"
            ),
            "{}",
            c.content
        );
        assert!(c.content.contains("tmpfs /tmp tmpfs defaults 0 0\n"));
        // Completing again changes nothing.
        let again = complete_for(&c.content, UUID, "v1", RootMode::Ro);
        assert_eq!(again.content, c.content);
        assert!(again.made_ro.is_empty() && again.added.is_empty());
        // rw and volatile keep the line as it is.
        for mode in [RootMode::Rw, RootMode::Volatile] {
            let c = complete_for(vendor, UUID, "v1", mode);
            assert!(c.made_ro.is_empty());
            assert!(c.content.starts_with(vendor), "{}", c.content);
        }
    }

    #[test]
    fn root_line_ro_edits_only_the_options() {
        assert_eq!(root_line_ro("UUID=x / btrfs defaults,ro,noatime 0 1"), None);
        assert_eq!(
            root_line_ro("UUID=x / btrfs defaults 0 1").unwrap().0,
            "UUID=x / btrfs defaults,ro 0 1"
        );
        assert_eq!(
            root_line_ro("  /dev/sda1  /  btrfs  rw,ro,rw\t0 0").unwrap(),
            (
                "  /dev/sda1  /  btrfs  ro\t0 0".to_string(),
                "rw,ro,rw".to_string()
            )
        );
        assert_eq!(
            root_line_ro("/dev/sda1 / btrfs").unwrap().0,
            "/dev/sda1 / btrfs defaults,ro"
        );
    }

    #[test]
    fn ro_rewrites_a_kept_root_entry_in_the_file() {
        let t = tree();
        fs::create_dir(t.path().join("etc")).unwrap();
        let vendor = format!("UUID={UUID} / btrfs defaults 0 1\n");
        fs::write(t.path().join("etc/fstab"), &vendor).unwrap();
        let c = complete_file_for(t.path(), UUID, "v1", RootMode::Ro).unwrap();
        assert_eq!(c.made_ro, vec![1]);
        let text = fs::read_to_string(t.path().join("etc/fstab")).unwrap();
        assert!(
            text.contains(&format!("\nUUID={UUID} / btrfs defaults,ro 0 1\n")),
            "{text}"
        );
        assert!(
            text.contains(" /etc btrfs subvol=/systems/v1/run/etc,"),
            "{text}"
        );
    }

    #[test]
    fn rw_and_volatile_undo_an_earlier_ro() {
        let vendor = "# vendor\n/dev/root / btrfs defaults,rw 0 1\n";
        let ro = complete_for(vendor, UUID, "v1", RootMode::Ro);
        // What a bundle of that ro version brings: its added lines stripped.
        let stripped: String = ro
            .content
            .split_inclusive('\n')
            .take_while(|l| l.trim_end() != ADDED_COMMENT)
            .collect();
        assert!(stripped.contains("defaults,ro 0 1"), "{stripped}");
        for mode in [RootMode::Rw, RootMode::Volatile] {
            let c = complete_for(&stripped, UUID, "v2", mode);
            assert!(c.content.starts_with(vendor), "{mode}: {}", c.content);
            assert!(!c.content.contains("`ro` added"), "{}", c.content);
        }
        // A missing options field comes back as `defaults`.
        let bare = complete_for("/dev/root / btrfs\n", UUID, "v1", RootMode::Ro).content;
        assert!(bare.starts_with("# btrfs-deploy: `ro` added"), "{bare}");
        let back = complete_for(&bare, UUID, "v1", RootMode::Rw).content;
        assert!(back.starts_with("/dev/root / btrfs defaults\n"), "{back}");
        // A comment not followed by a / entry is kept as it is.
        let lone = "# btrfs-deploy: `ro` added to the next line for root mode ro (was `rw`)\n\
                    tmpfs /tmp tmpfs defaults 0 0\n";
        assert!(complete_for(lone, UUID, "v1", RootMode::Rw)
            .content
            .contains(lone));
    }
}
