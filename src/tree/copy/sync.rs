//! Delta sync: make an old tree (a snapshot) identical to a new one, touching
//! only what differs so that unchanged files keep sharing extents.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;

use super::engine::{dir_xattrs, lock, Claim, Counts, DirNode, Engine, Mode};
use super::sys::{self, dst_err, src_err, At, Kind, Meta, Target, Xattrs};
use super::NoSpaceError;

impl Engine<'_> {
    /// Sync one name of `node`: `src` exists, `dst` may or may not.
    /// `s` and `d` address the two entries by directory descriptor.
    pub(super) fn sync_entry(
        &self,
        node: &Arc<DirNode>,
        s: At,
        d: At,
        c: &mut Counts,
    ) -> Result<()> {
        let (src, dst) = (s.path, d.path);
        let sm = sys::lstat_at(s).map_err(|e| src_err(e, "reading metadata of", src))?;
        let dm = sys::lstat_at_opt(d).map_err(|e| src_err(e, "reading metadata of", dst))?;
        if sm.kind() == Kind::Dir {
            return self.sync_dir_entry(node, src, dst, &sm, dm, c);
        }
        if sm.nlink <= 1 {
            return self.sync_nondir(s, d, &sm, dm, c);
        }
        match self.links.claim(&sm) {
            Claim::Leader(guard) => self.lead(guard, dst, || self.sync_nondir(s, d, &sm, dm, c)),
            Claim::Follower(slot) => {
                let leader = slot.wait(src)?;
                self.sync_follower(&leader, dst, c)
            }
        }
    }

    fn sync_dir_entry(
        &self,
        node: &Arc<DirNode>,
        src: &Path,
        dst: &Path,
        sm: &Meta,
        dm: Option<Meta>,
        c: &mut Counts,
    ) -> Result<()> {
        match dm {
            Some(d) if d.kind() == Kind::Dir => {
                let mut child = DirNode::new(src.to_path_buf(), dst.to_path_buf(), *sm, Mode::Sync);
                child.orig_dst = Some(d);
                self.add_child(node, child, c);
                Ok(())
            }
            Some(_) => {
                std::fs::remove_file(dst).map_err(|e| dst_err(e, "removing", dst))?;
                self.create_dir(node, src, dst, sm, c)
            }
            None => self.create_dir(node, src, dst, sm, c),
        }
    }

    /// Another name of an already synced source inode: make `dst` a hard link to `leader`.
    fn sync_follower(&self, leader: &Path, dst: &Path, c: &mut Counts) -> Result<()> {
        let lm = sys::lstat(leader).map_err(|e| src_err(e, "reading metadata of", leader))?;
        let dm = sys::lstat_opt(dst).map_err(|e| src_err(e, "reading metadata of", dst))?;
        if dm.is_some_and(|d| d.key() == lm.key()) {
            c.unchanged += 1;
            return Ok(());
        }
        c.deleted += self.replace(dst, dm, |p| {
            std::fs::hard_link(leader, p).map_err(|e| dst_err(e, "creating hard link", p))
        })?;
        c.written += 1;
        Ok(())
    }

    /// Sync a non-directory whose source inode has not been handled yet.
    fn sync_nondir(&self, s: At, t: At, sm: &Meta, dm: Option<Meta>, c: &mut Counts) -> Result<()> {
        let (src, dst) = (s.path, t.path);
        let d = match dm {
            Some(d) if d.same_type(sm) => d,
            other => return self.replace_with_copy(src, dst, sm, other, c),
        };
        if !self.same_content(src, dst, sm, &d)? {
            return self.replace_with_copy(src, dst, sm, Some(d), c);
        }
        if d.nlink > 1 && !self.claim_target(&d, sm) {
            // The target inode also has names that belong to other source files:
            // give this name an inode of its own.
            return self.break_link(src, dst, sm, &d, c);
        }
        let sx = sys::read_xattrs_at(s)
            .map_err(|e| src_err(e, "reading extended attributes of", src))?;
        let dx = sys::read_xattrs_at(t)
            .map_err(|e| src_err(e, "reading extended attributes of", dst))?;
        if same_meta(sm, &d, &sx, &dx) {
            c.unchanged += 1;
            return Ok(());
        }
        fix_in_place(dst, sm, &sx, &d)?;
        c.metadata_only += 1;
        Ok(())
    }

    /// Same content: size and mtime (or the bytes with `checksum`), symlink
    /// target, device number.
    fn same_content(&self, src: &Path, dst: &Path, sm: &Meta, d: &Meta) -> Result<bool> {
        Ok(match sm.kind() {
            Kind::File => {
                sm.size == d.size
                    && if self.checksum {
                        sys::same_content(src, dst)?
                    } else {
                        sm.mtime == d.mtime
                    }
            }
            Kind::Symlink => sys::read_link(src)? == sys::read_link(dst)?,
            Kind::Special => sm.rdev == d.rdev,
            Kind::Dir => true,
        })
    }

    /// Claims target inode `d` (which has several names) for source inode `sm`;
    /// false when another source inode keeps it.
    fn claim_target(&self, d: &Meta, sm: &Meta) -> bool {
        let mut claims = lock(&self.claims);
        *claims.entry(d.key()).or_insert(sm.key()) == sm.key()
    }

    /// Gives `dst` (same content as `src`) an inode of its own: a reflink of
    /// the old target file when possible, else a copy of the source.
    fn break_link(
        &self,
        src: &Path,
        dst: &Path,
        sm: &Meta,
        d: &Meta,
        c: &mut Counts,
    ) -> Result<()> {
        if sm.kind() == Kind::File && self.clone_into(src, dst, sm).is_ok() {
            c.written += 1;
            return Ok(());
        }
        self.replace_with_copy(src, dst, sm, Some(*d), c)
    }

    /// Replaces `dst` with a copy of the non-directory `src`.
    fn replace_with_copy(
        &self,
        src: &Path,
        dst: &Path,
        sm: &Meta,
        dm: Option<Meta>,
        c: &mut Counts,
    ) -> Result<()> {
        let deleted = self.replace(dst, dm, |p| self.make_nondir(src, p, sm, c, None))?;
        c.deleted += deleted;
        Ok(())
    }

    /// Replaces `dst` by a reflink of itself carrying `src`'s metadata.
    fn clone_into(&self, src: &Path, dst: &Path, sm: &Meta) -> Result<()> {
        let old = sys::open_file_read(dst).map_err(|e| src_err(e, "opening", dst))?;
        let x = sys::read_xattrs(Target::path(src, Kind::File))
            .map_err(|e| src_err(e, "reading extended attributes of", src))?;
        let tmp = self.temp_path(dst);
        let result = (|| {
            let new = sys::create_file(&tmp).map_err(|e| dst_err(e, "creating", &tmp))?;
            sys::ficlone(&old, &new).map_err(|e| dst_err(e, "reflinking into", &tmp))?;
            sys::apply_meta(Target::fd(&new), &tmp, sm, &x, None)?;
            std::fs::rename(&tmp, dst).map_err(|e| dst_err(e, "renaming onto", dst))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// A fresh name beside `dst` for writing its replacement.
    fn temp_path(&self, dst: &Path) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let name = format!(".deploy-sync.{}.{n}", std::process::id());
        dst.parent().unwrap_or(Path::new("/")).join(name)
    }

    /// Replaces whatever is at `dst` (described by `dm`) with what `create`
    /// makes; returns how many entries inside a replaced directory were deleted.
    /// Non-directories are replaced atomically: created beside and renamed over.
    fn replace(
        &self,
        dst: &Path,
        dm: Option<Meta>,
        create: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<u64> {
        match dm {
            None => create(dst).map(|()| 0),
            Some(d) if d.kind() == Kind::Dir => {
                let mut removed = 0;
                sys::remove_tree_counted(dst, &mut removed)?;
                create(dst)?;
                Ok(removed.saturating_sub(1))
            }
            Some(_) => {
                let tmp = self.temp_path(dst);
                let result = create(&tmp).and_then(|()| {
                    std::fs::rename(&tmp, dst).map_err(|e| dst_err(e, "renaming onto", dst))
                });
                match result {
                    Ok(()) => Ok(0),
                    Err(e) => {
                        let _ = sys::remove_tree_counted(&tmp, &mut 0);
                        if e.downcast_ref::<NoSpaceError>().is_some() {
                            Err(NoSpaceError {
                                path: dst.to_path_buf(),
                            }
                            .into())
                        } else {
                            Err(e.context(format!("replacing {}", dst.display())))
                        }
                    }
                }
            }
        }
    }

    /// Sync: the directory's children are done; fix its metadata if it differs.
    pub(super) fn finalize_synced_dir(&self, node: &DirNode, c: &mut Counts) -> Result<()> {
        let sx = dir_xattrs(&node.src)?;
        let d = sys::open_dir(&node.dst).map_err(|e| dst_err(e, "opening directory", &node.dst))?;
        let cur = sys::fstat(&d).map_err(|e| src_err(e, "reading metadata of", &node.dst))?;
        let dx = sys::read_xattrs(Target::fd(&d))
            .map_err(|e| src_err(e, "reading extended attributes of", &node.dst))?;
        let orig = node.orig_dst.unwrap_or(cur);
        let differed = !same_meta(&node.meta, &orig, &sx, &dx);
        if differed || !same_meta(&node.meta, &cur, &sx, &dx) {
            sys::apply_meta(Target::fd(&d), &node.dst, &node.meta, &sx, Some(&cur))?;
        }
        if differed {
            c.metadata_only += 1;
        } else {
            c.unchanged += 1;
        }
        Ok(())
    }
}

/// Same mode, owner, mtime and xattrs.
fn same_meta(s: &Meta, d: &Meta, sx: &Xattrs, dx: &Xattrs) -> bool {
    s.mode == d.mode && s.uid == d.uid && s.gid == d.gid && s.mtime == d.mtime && sx == dx
}

/// Fixes the metadata of `dst` (content already equal to the source) in place.
fn fix_in_place(dst: &Path, sm: &Meta, sx: &Xattrs, d: &Meta) -> Result<()> {
    if d.kind() == Kind::File {
        let f = sys::open_file_read(dst).map_err(|e| src_err(e, "opening", dst))?;
        sys::apply_meta(Target::fd(&f), dst, sm, sx, Some(d))
    } else {
        sys::apply_meta(Target::path(dst, d.kind()), dst, sm, sx, Some(d))
    }
}
