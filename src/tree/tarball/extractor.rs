//! The extractor: each entry created relative to its parent directory,
//! with its metadata; hard links, sparse files and holes; directory
//! metadata applied at the end.

#[allow(unused_imports)]
use super::*;
use crate::tree::copy::sys::{self, dst_err, Kind, Meta, Target, Time, Xattrs};
use crate::tree::copy::{CopyStats, Progress};
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// A directory whose metadata is applied once everything is extracted.
pub(super) struct PendingDir {
    pub(super) comps: Vec<Vec<u8>>,
    pub(super) meta: Meta,
    pub(super) xattrs: Xattrs,
}

pub(super) struct Extractor<'a> {
    pub(super) root: File,
    pub(super) dst: &'a Path,
    /// Recently used parent directories: (components joined by '/', O_PATH fd).
    pub(super) parents: Vec<(Vec<u8>, File)>,
    pub(super) dirs: Vec<PendingDir>,
    pub(super) stats: CopyStats,
    pub(super) progress: Option<&'a Progress>,
    pub(super) buf: Vec<u8>,
    /// Users and groups of the tree, by name (for ACLs given as text).
    pub(super) ids: std::collections::HashMap<(IdKind, String), u32>,
}

impl Extractor<'_> {
    pub(super) fn full_path(&self, comps: &[&[u8]]) -> PathBuf {
        let mut p = self.dst.to_path_buf();
        for c in comps {
            p.push(OsStr::from_bytes(c));
        }
        p
    }

    pub(super) fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let t = entry.header().entry_type();
        if t.is_pax_global_extensions() || t == tar::EntryType::new(b'V') {
            return Ok(()); // global PAX header or volume label: nothing to create
        }
        let header_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut pax =
            Pax::read(entry).with_context(|| format!("reading archive entry {header_path:?}"))?;
        let raw_path: Vec<u8> = match pax.sparse.as_ref().and_then(|s| s.name.clone()) {
            Some(name) => name,
            None => entry.path_bytes().into_owned(),
        };
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let comps = components(&raw_path, "entry")?;
        let meta = self
            .entry_meta(entry, &pax)
            .with_context(|| format!("reading archive entry {shown:?}"))?;
        self.acls_to_xattrs(&mut pax, t)
            .with_context(|| format!("reading the ACLs of archive entry {shown:?}"))?;
        self.create(entry, t, &comps, &meta, pax)
            .with_context(|| format!("extracting archive entry {shown:?}"))
    }

    /// Turns the text ACLs of `pax` into `system.posix_acl_*` xattrs, unless
    /// the archive holds those xattrs already. Names of users and groups are
    /// looked up in the tree's own `etc/passwd` and `etc/group` (extracted
    /// earlier from the archive), then in this host's database.
    pub(super) fn acls_to_xattrs(&mut self, pax: &mut Pax, t: tar::EntryType) -> Result<()> {
        for (text, name) in [
            (pax.acl_access.take(), ACL_ACCESS_XATTR),
            (pax.acl_default.take(), ACL_DEFAULT_XATTR),
        ] {
            let Some(text) = text else { continue };
            if pax
                .xattrs
                .iter()
                .any(|(n, _)| n.as_bytes() == name.as_bytes())
            {
                continue;
            }
            if t.is_symlink() {
                continue; // Linux has no ACLs on symlinks
            }
            let value = acl_from_text(&text, |kind, n| self.id_of(kind, n))?;
            set_xattr_value(&mut pax.xattrs, cstring(name.as_bytes())?, value);
        }
        pax.xattrs.sort();
        Ok(())
    }

    /// The id of user or group `name` in the tree's `etc/passwd` or `etc/group`.
    pub(super) fn id_of(&mut self, kind: IdKind, name: &str) -> Result<u32> {
        let file = match kind {
            IdKind::User => "etc/passwd",
            IdKind::Group => "etc/group",
        };
        if let Some(id) = self.ids.get(&(kind, name.to_string())) {
            return Ok(*id);
        }
        // Read again: the file may have been extracted since the last look.
        if let Some(bytes) = crate::util::rootpath::read_in_root(self.dst, Path::new(file))? {
            for line in String::from_utf8_lossy(&bytes).lines() {
                let f: Vec<&str> = line.split(':').collect();
                if let (Some(n), Some(Ok(id))) = (f.first(), f.get(2).map(|i| i.parse::<u32>())) {
                    self.ids.insert((kind, n.to_string()), id);
                }
            }
        }
        if let Some(id) = self.ids.get(&(kind, name.to_string())) {
            return Ok(*id);
        }
        // GNU tar writes the names of the host that made the archive; like
        // GNU tar's own extraction, fall back to this host's database.
        let host = match kind {
            IdKind::User => nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw()),
            IdKind::Group => nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw()),
        };
        host.ok_or_else(|| {
            anyhow!(
                "the ACL names {} {name:?}, which neither the archive's {file} (as extracted \
                 so far) nor this host lists: make the archive with `tar --acls --xattrs` \
                 (which also stores the ACLs with numeric ids)",
                kind.word()
            )
        })
    }

    /// The metadata an entry asks for (owner, mode with its file type, times).
    pub(super) fn entry_meta<R: Read>(&self, entry: &tar::Entry<'_, R>, pax: &Pax) -> Result<Meta> {
        let h = entry.header();
        let t = h.entry_type();
        let fmt = if t.is_dir() {
            libc::S_IFDIR
        } else if t.is_symlink() {
            libc::S_IFLNK
        } else if t.is_character_special() {
            libc::S_IFCHR
        } else if t.is_block_special() {
            libc::S_IFBLK
        } else if t.is_fifo() {
            libc::S_IFIFO
        } else {
            libc::S_IFREG
        };
        let mtime = match pax.mtime {
            Some(t) => t,
            None => Time {
                sec: h.mtime()? as i64,
                nsec: 0,
            },
        };
        let rdev = if t.is_character_special() || t.is_block_special() {
            let major = h.device_major()?.unwrap_or(0);
            let minor = h.device_minor()?.unwrap_or(0);
            libc::makedev(major, minor)
        } else {
            0
        };
        Ok(Meta {
            mode: fmt | (h.mode()? & 0o7777),
            uid: h.uid()? as u32,
            gid: h.gid()? as u32,
            size: 0,
            blocks: 0,
            atime: pax.atime.unwrap_or(mtime),
            mtime,
            rdev,
            dev: 0,
            ino: 0,
            nlink: 1,
        })
    }

    pub(super) fn create<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        t: tar::EntryType,
        comps: &[&[u8]],
        meta: &Meta,
        pax: Pax,
    ) -> Result<()> {
        if t.is_dir() {
            if let Some((last, parents)) = comps.split_last() {
                let parent = self.parent(parents)?;
                let name = cstring(last)?;
                if !self.make_room(parent, &name, comps, true)? {
                    // SAFETY: valid fd and name.
                    check(unsafe { libc::mkdirat(parent, name.as_ptr(), 0o700) })
                        .map_err(|e| dst_err(e, "creating directory", &self.full_path(comps)))?;
                    self.stats.dirs += 1;
                }
            }
            self.dirs.push(PendingDir {
                comps: comps.iter().map(|c| c.to_vec()).collect(),
                meta: *meta,
                xattrs: pax.xattrs,
            });
            return Ok(());
        }
        let Some((last, parents)) = comps.split_last() else {
            bail!("the archive's root entry is not a directory");
        };
        let parent = self.parent(parents)?;
        let name = cstring(last)?;
        let path = self.full_path(comps);
        self.make_room(parent, &name, comps, false)?;
        if t.is_hard_link() {
            return self.hard_link(entry, parent, &name, &path);
        }
        if t.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| anyhow!("symlink without a target"))?;
            let target = cstring(&target)?;
            // SAFETY: valid fd and NUL-terminated strings.
            check(unsafe { libc::symlinkat(target.as_ptr(), parent, name.as_ptr()) })
                .map_err(|e| dst_err(e, "creating symlink", &path))?;
            self.stats.symlinks += 1;
            return self.apply_path_meta(parent, &name, &path, meta, &pax.xattrs);
        }
        if t.is_character_special() || t.is_block_special() || t.is_fifo() {
            let mode = (meta.mode & libc::S_IFMT) | 0o600;
            // SAFETY: valid fd and name.
            check(unsafe { libc::mknodat(parent, name.as_ptr(), mode, meta.rdev) })
                .map_err(|e| dst_err(e, "creating", &path))?;
            self.stats.specials += 1;
            return self.apply_path_meta(parent, &name, &path, meta, &pax.xattrs);
        }
        if t.is_file() || t.is_gnu_sparse() || t == tar::EntryType::Continuous {
            return self.regular(entry, parent, &name, &path, meta, pax);
        }
        bail!(
            "unsupported entry type {:?} (only files, directories, links, devices and FIFOs)",
            t
        )
    }

    /// Gives a symlink or special file its owner, xattrs, mode and times.
    pub(super) fn apply_path_meta(
        &self,
        parent: RawFd,
        name: &CStr,
        path: &Path,
        meta: &Meta,
        xattrs: &Xattrs,
    ) -> Result<()> {
        let cur = stat_at(parent, name)
            .map_err(|e| dst_err(e, "reading metadata of", path))?
            .ok_or_else(|| anyhow!("{} vanished", path.display()))?;
        sys::apply_meta(
            Target::path(path, meta.kind()),
            path,
            meta,
            xattrs,
            Some(&cur),
        )
    }

    /// Makes `name` in `parent` free for a new entry: removes a non-directory,
    /// or an empty directory unless the new entry is one too. Returns true when
    /// a directory is there and the new entry is a directory (kept as is).
    pub(super) fn make_room(
        &mut self,
        parent: RawFd,
        name: &CStr,
        comps: &[&[u8]],
        dir: bool,
    ) -> Result<bool> {
        let path = || self.full_path(comps);
        let Some(m) =
            stat_at(parent, name).map_err(|e| dst_err(e, "reading metadata of", &path()))?
        else {
            return Ok(false);
        };
        match (m.kind() == Kind::Dir, dir) {
            (true, true) => Ok(true),
            (true, false) => {
                // SAFETY: valid fd and name.
                check(unsafe { libc::unlinkat(parent, name.as_ptr(), libc::AT_REMOVEDIR) })
                    .map_err(|e| {
                        anyhow::Error::new(e).context(format!(
                            "replacing directory {} by a non-directory",
                            path().display()
                        ))
                    })?;
                self.forget_parents(comps);
                Ok(false)
            }
            (false, _) => {
                // SAFETY: valid fd and name.
                check(unsafe { libc::unlinkat(parent, name.as_ptr(), 0) })
                    .map_err(|e| dst_err(e, "replacing", &path()))?;
                Ok(false)
            }
        }
    }

    /// Drops cached descriptors of the removed directory `comps` and below.
    pub(super) fn forget_parents(&mut self, comps: &[&[u8]]) {
        let key = comps.join(&b'/');
        self.parents.retain(|(k, _)| {
            !(k.starts_with(&key) && (k.len() == key.len() || k[key.len()] == b'/'))
        });
    }

    /// An O_PATH descriptor of the directory `comps` (relative to the root),
    /// walked without following symlinks; missing directories are created.
    pub(super) fn parent(&mut self, comps: &[&[u8]]) -> Result<RawFd> {
        if comps.is_empty() {
            return Ok(self.root.as_raw_fd());
        }
        let key = comps.join(&b'/');
        if let Some(i) = self.parents.iter().position(|(k, _)| *k == key) {
            return Ok(self.parents[i].1.as_raw_fd());
        }
        let mut cur: Option<File> = None;
        for (i, c) in comps.iter().enumerate() {
            let at = cur
                .as_ref()
                .map_or(self.root.as_raw_fd(), |f| f.as_raw_fd());
            let next = self.walk_one(at, c, &comps[..=i])?;
            cur = Some(next);
        }
        let dir = cur.ok_or_else(|| anyhow!("internal error: empty parent"))?;
        if self.parents.len() >= PARENT_CACHE {
            self.parents.remove(0);
        }
        self.parents.push((key, dir));
        Ok(self.parents.last().map_or(-1, |(_, f)| f.as_raw_fd()))
    }

    /// Opens directory `name` in `at`, refusing symlinks; creates it if missing.
    pub(super) fn walk_one(&self, at: RawFd, name: &[u8], so_far: &[&[u8]]) -> Result<File> {
        let c = cstring(name)?;
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        match openat(at, &c, flags, 0) {
            Ok(f) => return Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // SAFETY: valid fd and name.
                check(unsafe { libc::mkdirat(at, c.as_ptr(), 0o755) })
                    .map_err(|e| dst_err(e, "creating directory", &self.full_path(so_far)))?;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                let shown = String::from_utf8_lossy(&so_far.join(&b'/')).into_owned();
                return match stat_at(at, &c) {
                    Ok(Some(m)) if m.kind() == Kind::Symlink => Err(anyhow!(
                        "{shown} in the target is a symlink: refusing to write through it"
                    )),
                    _ => Err(anyhow!("{shown} in the target is not a directory")),
                };
            }
            Err(e) => return Err(dst_err(e, "opening directory", &self.full_path(so_far))),
        }
        openat(at, &c, flags, 0)
            .map_err(|e| dst_err(e, "opening directory", &self.full_path(so_far)))
    }

    pub(super) fn hard_link<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        parent: RawFd,
        name: &CStr,
        path: &Path,
    ) -> Result<()> {
        let raw = entry
            .link_name_bytes()
            .ok_or_else(|| anyhow!("hard link without a target"))?
            .into_owned();
        let tcomps = components(&raw, "hard link target")?;
        let Some((tlast, tparents)) = tcomps.split_last() else {
            bail!("hard link to the archive's root");
        };
        let tname = cstring(tlast)?;
        // Keep `parent` valid: resolving the target may evict it from the cache.
        let parent = openat(parent, c".", libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| dst_err(e, "opening directory of", path))?;
        let tparent = self.parent(tparents)?;
        // SAFETY: valid fds and names; flags 0 never follows a symlink.
        check(unsafe {
            libc::linkat(
                tparent,
                tname.as_ptr(),
                parent.as_raw_fd(),
                name.as_ptr(),
                0,
            )
        })
        .map_err(|e| {
            dst_err(
                e,
                &format!(
                    "linking to {:?} (earlier in the archive) as",
                    String::from_utf8_lossy(&raw)
                ),
                path,
            )
        })?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    pub(super) fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: RawFd,
        name: &CStr,
        path: &Path,
        meta: &Meta,
        pax: Pax,
    ) -> Result<()> {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        // Created with its final permission bits (umask applied), so the mode
        // usually needs no second change; setuid/setgid come after chown.
        let f = openat(parent, name, flags, meta.mode & 0o777)
            .map_err(|e| dst_err(e, "creating", path))?;
        let size = match &pax.sparse {
            Some(s) if s.map_in_data => {
                let map = read_sparse_map(entry)?;
                self.write_segments(entry, &f, path, &map)?;
                s.real_size
            }
            Some(s) => {
                self.write_segments(entry, &f, path, &s.map)?;
                s.real_size
            }
            None => {
                let end = self.write_dense(entry, &f, path, 0, u64::MAX)?;
                if entry.header().entry_type().is_gnu_sparse() {
                    entry.header().as_gnu().map_or(Ok(end), |g| g.real_size())?
                } else {
                    end
                }
            }
        };
        f.set_len(size)
            .map_err(|e| dst_err(e, "setting the size of", path))?;
        let cur = sys::fstat(&f).map_err(|e| dst_err(e, "reading metadata of", path))?;
        sys::apply_meta(Target::fd(&f), path, meta, &pax.xattrs, Some(&cur))?;
        self.stats.files += 1;
        self.stats.bytes += size;
        Ok(())
    }

    /// Writes the data segments `map` (offset, length), read in order from `entry`.
    pub(super) fn write_segments<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        f: &File,
        path: &Path,
        map: &[(u64, u64)],
    ) -> Result<()> {
        for &(off, len) in map {
            let end = self.write_dense(entry, f, path, off, len)?;
            if end != off + len {
                bail!("sparse data ends early in the archive");
            }
        }
        Ok(())
    }

    /// Copies up to `len` bytes of `entry` into `f` at `off`, leaving blocks of
    /// zeros as holes. Returns the end offset reached.
    pub(super) fn write_dense<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        f: &File,
        path: &Path,
        mut off: u64,
        len: u64,
    ) -> Result<u64> {
        let mut left = len;
        while left > 0 {
            let want = (self.buf.len() as u64).min(left) as usize;
            let n = read_full(entry, &mut self.buf[..want])
                .map_err(|e| anyhow::Error::new(e).context("reading the archive"))?;
            if n == 0 {
                break;
            }
            write_sparse(f, &self.buf[..n], off).map_err(|e| dst_err(e, "writing", path))?;
            if let Some(p) = self.progress {
                p.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            off += n as u64;
            left -= n as u64;
        }
        Ok(off)
    }

    /// Applies the metadata of every directory entry, after all content.
    pub(super) fn finish_dirs(&mut self) -> Result<()> {
        self.parents.clear();
        let dirs = std::mem::take(&mut self.dirs);
        for d in &dirs {
            let comps: Vec<&[u8]> = d.comps.iter().map(Vec::as_slice).collect();
            let path = self.full_path(&comps);
            let file = match comps.split_last() {
                None => sys::open_dir(self.dst).map_err(|e| dst_err(e, "opening", &path))?,
                Some((last, parents)) => {
                    let parent = self.parent(parents)?;
                    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                    openat(parent, &cstring(last)?, flags, 0)
                        .map_err(|e| dst_err(e, "opening directory", &path))?
                }
            };
            let cur = sys::fstat(&file).map_err(|e| dst_err(e, "reading metadata of", &path))?;
            sys::apply_meta(Target::fd(&file), &path, &d.meta, &d.xattrs, Some(&cur))?;
        }
        Ok(())
    }
}

/// Reads the map of a PAX 1.0 sparse file from the start of its data: decimal
/// numbers, one per line (count, then offset and length pairs), padded to 512 bytes.
pub(super) fn read_sparse_map<R: Read>(entry: &mut R) -> Result<Vec<(u64, u64)>> {
    let mut consumed = 0usize;
    let mut line = Vec::new();
    let mut next_number = |consumed: &mut usize| -> Result<u64> {
        line.clear();
        let mut b = [0u8; 1];
        loop {
            entry
                .read_exact(&mut b)
                .context("reading the map of a sparse file")?;
            *consumed += 1;
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > 20 {
                bail!("bad sparse file map in the archive");
            }
        }
        parse_u64(&line)
    };
    let count = next_number(&mut consumed)?;
    let mut map = Vec::new();
    for _ in 0..count {
        let off = next_number(&mut consumed)?;
        let len = next_number(&mut consumed)?;
        map.push((off, len));
    }
    let pad = (512 - consumed % 512) % 512;
    io::copy(&mut entry.take(pad as u64), &mut io::sink()).context("reading a sparse file map")?;
    Ok(map)
}

/// Reads until `buf` is full or the end of the entry.
pub(super) fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Writes `data` at `off`, skipping whole blocks of zeros (they stay holes).
pub(super) fn write_sparse(f: &File, data: &[u8], off: u64) -> io::Result<()> {
    let mut start = 0;
    while start < data.len() {
        // Skip zero blocks.
        let mut i = start;
        while i < data.len() && is_zero_block(&data[i..(i + HOLE_BLOCK).min(data.len())]) {
            i = (i + HOLE_BLOCK).min(data.len());
        }
        // Gather non-zero blocks.
        let mut j = i;
        while j < data.len() && !is_zero_block(&data[j..(j + HOLE_BLOCK).min(data.len())]) {
            j = (j + HOLE_BLOCK).min(data.len());
        }
        if j > i {
            f.write_all_at(&data[i..j], off + i as u64)?;
        }
        start = j;
    }
    Ok(())
}

pub(super) fn is_zero_block(b: &[u8]) -> bool {
    b.len() == HOLE_BLOCK && b.iter().all(|x| *x == 0)
}
