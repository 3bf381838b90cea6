//! State follows the default version: when the default changes from version
//! A to version B (an upgrade that switches, `set-default`, a rollback), each
//! `/state/<dir>` subvolume gets a file-level three-way merge:
//!
//! - base   = A's vendor copy, `systems/A/orig/<dir>`
//! - theirs = B's vendor copy, `systems/B/orig/<dir>`
//! - ours   = `/state/<dir>`, the device's data
//!
//! Rules, per path (never following a symlink):
//! - B did not change it (theirs = base): the device's state stays;
//! - the device did not change it (ours = base): it takes B's state — updated,
//!   added or deleted;
//! - both made the same change (ours = theirs): nothing to do;
//! - both changed it differently: the device's state stays, B's copy is
//!   written beside it as `<name>.deploy-new` (a directory for a directory),
//!   and the conflict is reported on stderr and in B's `deployment.json`
//!   (`details.state_merge`).
//!
//! Two entries are equal when type, size, mtime (ns), mode, owner, xattrs,
//! symlink target and device number are (the quick check of a sync; copies
//! keep mtimes, so data is not read). Directories are equal when their
//! attributes and all their children are; where B and the device both keep a
//! directory the merge goes inside, and its attributes take B's change when
//! the device left them as they were. Copies go through the copy engine
//! (reflinks, sparse files, xattrs, owners, times); hard links among the
//! files one merge writes are kept.
//!
//! Every state directory takes part, `/home` and `/root` included: the rule
//! never touches what the device changed, so users' data is safe, and
//! vendor skeleton files there (`/root/.profile`) follow the version.
//!
//! Interruption: each entry is built under a temporary name beside its place
//! and swapped in by one rename (RENAME_EXCHANGE when something is there;
//! the old entry is then removed), so every path is either as it was or as
//! the merge wants it. Before the first change, `/state/.deploy-merge`
//! records `from` and `to` (written atomically and committed); it is removed
//! once the merge and the switch are committed. The next command that writes
//! the disk finds it and replays the merge towards the version that is the
//! default then: `to` when the switch happened (finishing it), else back to
//! `from` (undoing it). Both are safe to repeat: a path already as wanted
//! is left alone.
//!
//! Versions deployed before vendor copies were kept (their `orig` state
//! directories are empty; their `deployment.json` lacks
//! `details.state_in_orig`): as `from`, their base is empty — B's new paths
//! are added, paths where the device holds something other than B's are
//! conflicts (`.deploy-new`), nothing is deleted; as `to`, `/state` is left
//! as it is (there is no vendor copy to move to).

use crate::store::deployment::Deployment;
use crate::store::layout::{self, Layout};
use crate::store::versions;
use crate::tree::copy;
use crate::tree::copy::sys::{self, Kind, Meta, Target, Xattrs};
use crate::util::{fsutil, ui};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Journal of a merge in progress, in `/state`.
pub(crate) const JOURNAL: &str = ".deploy-merge";
/// Suffix of the new version's copy of a path both sides changed.
pub(crate) const NEW_COPY_SUFFIX: &str = ".deploy-new";
/// `deployment.json` `details` key marking a version whose `orig` keeps its
/// state directories' vendor content.
pub(crate) const STATE_IN_ORIG: &str = "state_in_orig";
/// Prefix of the temporary entries a merge builds.
const TMP_PREFIX: &str = ".deploy-merge-tmp.";

/// A path both sides changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StateConflict {
    /// Path below `/`, e.g. `/opt/app/config`.
    pub path: String,
    /// What happened.
    pub reason: String,
    /// Where the new version's copy was written, if it was.
    pub new_copy: Option<String>,
}

/// What [`merge_state`] did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct MergeReport {
    /// Version the state came from.
    pub from: String,
    /// Version the state now follows.
    pub to: String,
    /// Paths that took the new version's changed content or attributes.
    pub updated: u64,
    /// Paths the new version added.
    pub added: u64,
    /// Paths the new version removed (a directory counts once).
    pub deleted: u64,
    /// Paths both changed differently: the device's kept.
    pub conflicts: Vec<StateConflict>,
    /// Why nothing was merged, when nothing was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Journal {
    from: String,
    to: String,
}

/// Whether version `label`'s `orig` keeps its state directories' vendor content.
fn keeps_state(top: &Layout, label: &str) -> Result<bool> {
    let rec = Deployment::load(&top.version(label).join(layout::DEPLOYMENT_JSON))?;
    Ok(rec.details.get(STATE_IN_ORIG) == Some(&serde_json::Value::Bool(true)))
}

/// Merges every `/state` subvolume from version `from`'s vendor copy to
/// version `to`'s (see the module documentation). Prints each conflict on
/// stderr. Does not write the journal nor any record.
pub(crate) fn merge_state(top: &Layout, from: &str, to: &str) -> Result<MergeReport> {
    let mut report = MergeReport {
        from: from.into(),
        to: to.into(),
        ..Default::default()
    };
    if from == to {
        return Ok(report);
    }
    if !keeps_state(top, to)? {
        report.skipped = Some(format!(
            "{to} was deployed before versions kept their /state content: /state left as it is"
        ));
        return Ok(report);
    }
    let from_keeps = keeps_state(top, from)?;
    for d in layout::STATE_DIRS {
        let ours = top.state().join(d);
        if !crate::store::btrfs::is_subvolume(&ours) {
            continue;
        }
        let base = top.version(from).join(layout::ORIG).join(d);
        let theirs = top.version(to).join(layout::ORIG).join(d);
        let mut m = Merger {
            report: &mut report,
            links: HashMap::new(),
            root: PathBuf::from("/").join(d),
        };
        let base = Entry::read(&base)?.filter(|e| from_keeps && e.is_dir());
        let theirs = Entry::read(&theirs)?.filter(Entry::is_dir);
        let ours_e = Entry::read(&ours)?.context("state subvolume vanished")?;
        m.walk(
            Path::new(""),
            base.as_ref(),
            theirs.as_ref().map(|e| e.path.as_path()),
            &ours_e,
        )
        .with_context(|| format!("merging /state/{d} from {from} to {to}"))?;
    }
    crate::store::btrfs::sync_fs(&top.top)?;
    for c in &report.conflicts {
        eprintln!(
            "CONFLICT {}: {}{}",
            c.path,
            c.reason,
            c.new_copy
                .as_ref()
                .map(|n| format!(" ({to}'s version saved as {n})"))
                .unwrap_or_default()
        );
    }
    Ok(report)
}

/// Changes the default from `from` to `to` with `/state` following it:
/// journal, merge, `switch` (the one rename of `systems/default`), record
/// the report in `to`'s `deployment.json`, remove the journal. A failure of
/// the merge or of `switch` merges `/state` back to `from` and fails.
pub(crate) fn switch_with_state(
    top: &Layout,
    from: &str,
    to: &str,
    switch: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if from == to {
        return switch();
    }
    ui::step(format!("Merging /state from {from} to {to}"));
    write_journal(top, from, to)?;
    let merged = merge_state(top, from, to).and_then(|r| switch().map(|()| r));
    let report = match merged {
        Ok(r) => r,
        Err(e) => {
            if let Err(ue) = merge_state(top, to, from).and_then(|_| remove_journal(top)) {
                tracing::warn!("merging /state back to {from}: {ue:#}");
            }
            return Err(e.context(format!(
                "/state could not follow {to}, so {from} stays the default ({to} is on the disk): \
                 fix the cause, then run `deploy set-default {to} TARGET`"
            )));
        }
    };
    ui::detail(match &report.skipped {
        Some(s) => s.clone(),
        None => format!(
            "{} updated, {} added, {} deleted, {} conflict(s)",
            report.updated,
            report.added,
            report.deleted,
            report.conflicts.len()
        ),
    });
    record(top, to, &report)?;
    remove_journal(top)
}

/// Finishes (or undoes) a merge an interruption left: replays it towards the
/// version that is the default now. No-op without a journal.
pub(crate) fn recover(top: &Layout) -> Result<()> {
    let path = top.state().join(JOURNAL);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let j: Journal = serde_json::from_str(&text).with_context(|| {
        format!(
            "parsing {}: remove it once /state is as you want it",
            path.display()
        )
    })?;
    let default = versions::default_label(top)?;
    let known = |l: &str| top.version(l).join(layout::DEPLOYMENT_JSON).is_file();
    if !known(&j.from) || !known(&j.to) {
        bail!(
            "{} records a /state merge from {} to {}, but one of them is gone: check /state, then remove {}",
            path.display(),
            j.from,
            j.to,
            path.display()
        );
    }
    let (from, to) = if default == j.to {
        ui::step(format!(
            "Finishing the interrupted /state merge from {} to {}",
            j.from, j.to
        ));
        (j.from, j.to)
    } else {
        ui::step(format!(
            "Undoing the interrupted /state merge from {} to {}",
            j.from, j.to
        ));
        (j.to, j.from)
    };
    let report = merge_state(top, &from, &to)?;
    if to == default {
        record(top, &to, &report)?;
    }
    remove_journal(top)
}

fn record(top: &Layout, label: &str, report: &MergeReport) -> Result<()> {
    let path = top.version(label).join(layout::DEPLOYMENT_JSON);
    let mut rec = Deployment::load(&path)?;
    rec.details
        .insert("state_merge".into(), serde_json::to_value(report)?);
    rec.save(&path)
}

fn write_journal(top: &Layout, from: &str, to: &str) -> Result<()> {
    let j = serde_json::to_vec(&Journal {
        from: from.into(),
        to: to.into(),
    })?;
    fsutil::write_atomic(&top.state().join(JOURNAL), &j, 0o600)?;
    crate::store::btrfs::sync_fs(&top.top)
}

fn remove_journal(top: &Layout) -> Result<()> {
    crate::store::btrfs::sync_fs(&top.top)?;
    let path = top.state().join(JOURNAL);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    fsutil::fsync_dir(&top.state())?;
    crate::store::btrfs::sync_fs(&top.top)
}

// ---------------------------------------------------------------------------

/// One entry as found on disk.
struct Entry {
    path: PathBuf,
    meta: Meta,
    xattrs: Xattrs,
    link: Option<PathBuf>,
}

impl Entry {
    fn read(path: &Path) -> Result<Option<Entry>> {
        let Some(meta) = sys::lstat_opt(path)
            .with_context(|| format!("reading metadata of {}", path.display()))?
        else {
            return Ok(None);
        };
        let xattrs = sys::read_xattrs(Target::path(path, Kind::Symlink))
            .with_context(|| format!("reading extended attributes of {}", path.display()))?;
        let link = if meta.kind() == Kind::Symlink {
            Some(sys::read_link(path)?)
        } else {
            None
        };
        Ok(Some(Entry {
            path: path.to_path_buf(),
            meta,
            xattrs,
            link,
        }))
    }

    fn is_dir(&self) -> bool {
        self.meta.kind() == Kind::Dir
    }

    /// Attributes that make two entries different (times of directories
    /// excluded: they change with their children).
    fn same_attrs(&self, o: &Entry) -> bool {
        let (a, b) = (&self.meta, &o.meta);
        a.mode == b.mode
            && a.uid == b.uid
            && a.gid == b.gid
            && self.xattrs == o.xattrs
            && (a.kind() == Kind::Dir
                || (a.size == b.size && a.mtime == b.mtime && a.rdev == b.rdev))
            && self.link == o.link
    }
}

fn list(dir: Option<&Path>) -> Result<BTreeSet<OsString>> {
    let Some(dir) = dir else {
        return Ok(BTreeSet::new());
    };
    Ok(sys::list_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .into_iter()
        .collect())
}

/// Whether two optional entries are in the same state (directories deeply).
fn same(a: Option<&Entry>, b: Option<&Entry>) -> Result<bool> {
    match (a, b) {
        (None, None) => Ok(true),
        (Some(a), Some(b)) => {
            if !a.same_attrs(b) {
                return Ok(false);
            }
            if !a.is_dir() {
                return Ok(true);
            }
            let names = list(Some(&a.path))?;
            if names != list(Some(&b.path))? {
                return Ok(false);
            }
            for n in names {
                let (x, y) = (
                    Entry::read(&a.path.join(&n))?,
                    Entry::read(&b.path.join(&n))?,
                );
                if !same(x.as_ref(), y.as_ref())? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Two regular files with equal attributes but mtime and equal data (the
/// device and the new version wrote the same thing).
fn same_file_content(a: Option<&Entry>, b: Option<&Entry>) -> Result<bool> {
    let (Some(a), Some(b)) = (a, b) else {
        return Ok(false);
    };
    if a.meta.kind() != Kind::File || b.meta.kind() != Kind::File {
        return Ok(false);
    }
    let (x, y) = (&a.meta, &b.meta);
    if (x.mode, x.uid, x.gid, x.size) != (y.mode, y.uid, y.gid, y.size) || a.xattrs != b.xattrs {
        return Ok(false);
    }
    sys::same_content(&a.path, &b.path)
}

struct Merger<'a> {
    report: &'a mut MergeReport,
    /// Inode of a new-version file → the path this merge wrote it to.
    links: HashMap<(u64, u64), PathBuf>,
    /// `/<dir>`, for reports.
    root: PathBuf,
}

fn is_tmp(name: &OsString) -> bool {
    name.as_bytes().starts_with(TMP_PREFIX.as_bytes())
}

impl Merger<'_> {
    /// Merges the children of a directory that exists in ours (`o`) and,
    /// when `t` is given, in theirs.
    fn walk(&mut self, rel: &Path, b: Option<&Entry>, t: Option<&Path>, o: &Entry) -> Result<()> {
        let bdir = b.filter(|e| e.is_dir()).map(|e| e.path.as_path());
        let mut names = list(bdir)?;
        names.extend(list(t)?);
        for n in list(Some(&o.path))? {
            if is_tmp(&n) {
                // Left by an interrupted merge: never part of the state.
                copy::remove_tree(&o.path.join(&n))?;
            } else {
                names.insert(n);
            }
        }
        // Not interruptible by SIGINT/SIGTERM: the merge runs while the
        // default switches (like the rest of the switch); kill -9 is what the
        // journal is for.
        for n in names {
            let read = |d: Option<&Path>| -> Result<Option<Entry>> {
                match d {
                    Some(d) => Entry::read(&d.join(&n)),
                    None => Ok(None),
                }
            };
            let (bc, tc, oc) = (read(bdir)?, read(t)?, read(Some(&o.path))?);
            self.node(
                &rel.join(&n),
                &o.path.join(&n),
                bc.as_ref(),
                tc.as_ref(),
                oc.as_ref(),
            )?;
        }
        Ok(())
    }

    fn node(
        &mut self,
        rel: &Path,
        dst: &Path,
        b: Option<&Entry>,
        t: Option<&Entry>,
        o: Option<&Entry>,
    ) -> Result<()> {
        if let (Some(t), Some(o)) = (t, o) {
            if t.is_dir() && o.is_dir() {
                self.walk(rel, b, Some(&t.path), o)?;
                // Attributes: B's change where the device left them as they were.
                let b_attrs = b.filter(|b| b.is_dir());
                if let Some(b) = b_attrs {
                    if !t.same_attrs(b) && o.same_attrs(b) && !o.same_attrs(t) {
                        self.apply_dir_attrs(t, dst)?;
                        self.report.updated += 1;
                    }
                }
                return Ok(());
            }
        }
        if same(t, b)? {
            return Ok(());
        }
        if same(o, b)? {
            match (t, o) {
                (None, _) => {
                    copy::remove_tree(dst)?;
                    self.report.deleted += 1;
                }
                (Some(t), o) => {
                    self.put(t, dst)?;
                    if o.is_some() {
                        self.report.updated += 1;
                    } else {
                        self.report.added += 1;
                    }
                }
            }
            return Ok(());
        }
        if same(o, t)? || same_file_content(o, t)? {
            return Ok(());
        }
        let shown = self.root.join(rel).display().to_string();
        match t {
            Some(t) => {
                let mut name = dst.as_os_str().to_owned();
                name.push(NEW_COPY_SUFFIX);
                let new = PathBuf::from(name);
                self.put(t, &new)?;
                let reason = match (b, o) {
                    (_, None) => "deleted on the device, changed by the new version: kept deleted",
                    (None, _) => "added on the device and by the new version: kept the device's",
                    _ => "changed on the device and by the new version: kept the device's",
                };
                self.report.conflicts.push(StateConflict {
                    path: shown.clone(),
                    reason: reason.into(),
                    new_copy: Some(format!("{shown}{NEW_COPY_SUFFIX}")),
                });
            }
            None => self.report.conflicts.push(StateConflict {
                path: shown,
                reason: "changed on the device, deleted by the new version: kept the device's"
                    .into(),
                new_copy: None,
            }),
        }
        Ok(())
    }

    /// Puts a copy of `t` at `dst` (replacing what is there) by one rename.
    fn put(&mut self, t: &Entry, dst: &Path) -> Result<()> {
        let parent = dst.parent().context("path without parent")?;
        let tmp = parent.join(format!("{TMP_PREFIX}{}", std::process::id()));
        copy::remove_tree(&tmp)?;
        let key = t.meta.key();
        let linked = match self.links.get(&key) {
            Some(first) if t.meta.kind() == Kind::File => std::fs::hard_link(first, &tmp).is_ok(),
            _ => false,
        };
        if !linked {
            copy::copy_entry(&t.path, &tmp)?;
        }
        let exists = sys::lstat_opt(dst)
            .with_context(|| format!("reading metadata of {}", dst.display()))?
            .is_some();
        let renamed = if exists {
            nix::fcntl::renameat2(
                None,
                &tmp,
                None,
                dst,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
        } else {
            nix::fcntl::renameat2(
                None,
                &tmp,
                None,
                dst,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
        };
        if let Err(e) = renamed {
            let _ = copy::remove_tree(&tmp);
            return Err(e).with_context(|| format!("putting {} in place", dst.display()));
        }
        if exists {
            // The old entry now has the temporary name.
            copy::remove_tree(&tmp)?;
        }
        if t.meta.kind() == Kind::File && t.meta.nlink > 1 {
            self.links.entry(key).or_insert_with(|| dst.to_path_buf());
        }
        Ok(())
    }

    fn apply_dir_attrs(&self, t: &Entry, dst: &Path) -> Result<()> {
        let d = sys::open_dir(dst).with_context(|| format!("opening {}", dst.display()))?;
        let cur =
            sys::fstat(&d).with_context(|| format!("reading metadata of {}", dst.display()))?;
        let mut m = t.meta;
        (m.atime, m.mtime) = (cur.atime, cur.mtime);
        sys::apply_meta(Target::fd(&d), dst, &m, &t.xattrs, Some(&cur))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    struct T {
        _d: tempfile::TempDir,
        b: PathBuf,
        t: PathBuf,
        o: PathBuf,
    }

    fn trees() -> T {
        let d = tempfile::tempdir().unwrap();
        let (b, t, o) = (d.path().join("b"), d.path().join("t"), d.path().join("o"));
        for p in [&b, &t, &o] {
            std::fs::create_dir(p).unwrap();
        }
        T { _d: d, b, t, o }
    }

    /// Writes `rel` in each root with the same mtime (as copies have).
    fn put(roots: &[&Path], rel: &str, data: &[u8]) {
        for r in roots {
            let p = r.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
            // Copies keep mtimes: same content, same mtime.
            let secs = 1_000_000 + data.iter().map(|&x| x as u64).sum::<u64>();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_times(std::fs::FileTimes::new().set_modified(t))
                .unwrap();
        }
    }

    fn run(t: &T, with_base: bool) -> MergeReport {
        let mut report = MergeReport::default();
        let mut m = Merger {
            report: &mut report,
            links: HashMap::new(),
            root: PathBuf::from("/opt"),
        };
        let b = Entry::read(&t.b).unwrap().filter(|_| with_base);
        let o = Entry::read(&t.o).unwrap().unwrap();
        m.walk(Path::new(""), b.as_ref(), Some(&t.t), &o).unwrap();
        report
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn every_path_class() {
        let t = trees();
        let all: [&Path; 3] = [&t.b, &t.t, &t.o];
        put(&all, "same", b"1");
        put(&[&t.b, &t.o], "updated", b"1");
        put(&[&t.t], "updated", b"2");
        put(&[&t.b, &t.o], "removed", b"1");
        put(&[&t.t], "added/dir/f", b"new");
        put(&[&t.b, &t.t], "device-changed", b"1");
        put(&[&t.o], "device-changed", b"mine");
        put(&[&t.o], "device-added", b"mine");
        put(&[&t.b, &t.t], "device-deleted", b"1");
        put(&[&t.b], "both", b"1");
        put(&[&t.t], "both", b"vendor");
        put(&[&t.o], "both", b"mine");
        put(&[&t.b], "vendor-deleted-device-changed", b"1");
        put(&[&t.o], "vendor-deleted-device-changed", b"mine");
        let r = run(&t, true);
        assert_eq!(read(&t.o.join("same")), "1");
        assert_eq!(read(&t.o.join("updated")), "2");
        assert!(!t.o.join("removed").exists());
        assert_eq!(read(&t.o.join("added/dir/f")), "new");
        assert_eq!(read(&t.o.join("device-changed")), "mine");
        assert_eq!(read(&t.o.join("device-added")), "mine");
        assert!(!t.o.join("device-deleted").exists());
        assert_eq!(read(&t.o.join("both")), "mine");
        assert_eq!(read(&t.o.join("both.deploy-new")), "vendor");
        assert_eq!(read(&t.o.join("vendor-deleted-device-changed")), "mine");
        assert_eq!((r.updated, r.added, r.deleted), (1, 1, 1), "{r:?}");
        let paths: Vec<&str> = r.conflicts.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/opt/both", "/opt/vendor-deleted-device-changed"]);
        // Repeating the merge changes nothing (what recovery relies on).
        let again = run(&t, true);
        assert_eq!((again.updated, again.added, again.deleted), (0, 0, 0));
        let names: Vec<_> = std::fs::read_dir(&t.o).unwrap().collect();
        assert_eq!(names.len(), 8, "{names:?}");
    }

    #[test]
    fn rollback_is_the_same_rule_the_other_way() {
        let t = trees();
        // Forward A (b) → B (t), then back with the roles swapped.
        put(&[&t.b, &t.o], "app/VERSION", b"1");
        put(&[&t.t], "app/VERSION", b"2");
        put(&[&t.t], "app/only-in-2", b"x");
        put(&[&t.o], "data", b"written on the device");
        run(&t, true);
        assert_eq!(read(&t.o.join("app/VERSION")), "2");
        let mut report = MergeReport::default();
        let mut m = Merger {
            report: &mut report,
            links: HashMap::new(),
            root: PathBuf::from("/opt"),
        };
        let (base, ours) = (
            Entry::read(&t.t).unwrap(),
            Entry::read(&t.o).unwrap().unwrap(),
        );
        m.walk(Path::new(""), base.as_ref(), Some(&t.b), &ours)
            .unwrap();
        assert_eq!(read(&t.o.join("app/VERSION")), "1");
        assert!(!t.o.join("app/only-in-2").exists());
        assert_eq!(read(&t.o.join("data")), "written on the device");
        assert!(report.conflicts.is_empty());
    }

    #[test]
    fn empty_base_of_an_old_disk_adds_and_reports_but_never_deletes() {
        let t = trees();
        put(&[&t.t, &t.o], "unchanged", b"1");
        put(&[&t.o], "factory-only", b"1");
        put(&[&t.o], "changed", b"1");
        put(&[&t.t], "changed", b"2");
        put(&[&t.t], "new", b"n");
        let r = run(&t, false);
        assert_eq!(read(&t.o.join("factory-only")), "1");
        assert_eq!(read(&t.o.join("changed")), "1");
        assert_eq!(read(&t.o.join("changed.deploy-new")), "2");
        assert_eq!(read(&t.o.join("new")), "n");
        assert_eq!((r.added, r.deleted, r.conflicts.len()), (1, 0, 1));
    }

    #[test]
    fn metadata_symlinks_hardlinks_and_dir_attrs_follow_the_copy_rules() {
        let t = trees();
        put(&[&t.b, &t.o], "mode", b"x");
        put(&[&t.t], "mode", b"x");
        std::fs::set_permissions(t.t.join("mode"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        // Copies keep a symlink's times: give both the same.
        let fixed = |p: &Path| {
            let t = sys::Time {
                sec: 1_000_000,
                nsec: 0,
            };
            sys::set_path_times(p, t, t).unwrap();
        };
        for r in [&t.b, &t.o] {
            symlink("old-target", r.join("link")).unwrap();
            fixed(&r.join("link"));
        }
        symlink("new-target", t.t.join("link")).unwrap();
        put(&[&t.t], "h1", b"hard");
        std::fs::hard_link(t.t.join("h1"), t.t.join("h2")).unwrap();
        for r in [&t.b, &t.t, &t.o] {
            std::fs::create_dir(r.join("d")).unwrap();
            // Explicit: other tests of this process may change the umask.
            std::fs::set_permissions(r.join("d"), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(t.t.join("d"), std::fs::Permissions::from_mode(0o700)).unwrap();
        // A symlink in ours that the new version replaces by a directory:
        // replaced, never written through.
        let outside = t._d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        for r in [&t.b, &t.o] {
            symlink(&outside, r.join("was-link")).unwrap();
            fixed(&r.join("was-link"));
        }
        put(&[&t.t], "was-link/planted", b"p");
        run(&t, true);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(t.o.join("mode")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(
            std::fs::read_link(t.o.join("link")).unwrap(),
            Path::new("new-target")
        );
        let (a, b) = (
            std::fs::metadata(t.o.join("h1")).unwrap(),
            std::fs::metadata(t.o.join("h2")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "hard links kept");
        assert_eq!(
            std::fs::metadata(t.o.join("d")).unwrap().mode() & 0o7777,
            0o700
        );
        assert!(t.o.join("was-link").symlink_metadata().unwrap().is_dir());
        assert!(!outside.join("planted").exists());
    }

    #[test]
    fn leftover_temporary_entries_are_removed() {
        let t = trees();
        put(&[&t.o], ".deploy-merge-tmp.123", b"half");
        std::fs::create_dir(t.o.join(".deploy-merge-tmp.9")).unwrap();
        run(&t, true);
        assert_eq!(std::fs::read_dir(&t.o).unwrap().count(), 0);
    }
}
