//! The parallel tree walker shared by copy and sync.
//!
//! Work is a bounded LIFO queue of jobs: "list this directory" and "process
//! these names of this directory". When the queue is full a job runs inline on
//! the thread that made it, so memory stays bounded whatever the tree's size.
//! Each directory node counts its outstanding jobs; when the count drops to
//! zero all its children are done and its own metadata (times last) is set.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use anyhow::{anyhow, Result};

use super::sys::{self, dst_err, src_err, At, DataCopy, DataFlags, Kind, Meta, Target};
use super::Progress;

/// Names handled by one job at most.
const CHUNK: usize = 256;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counters of one worker, merged at the end.
#[derive(Debug, Default, Clone)]
pub(super) struct Counts {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub specials: u64,
    pub hardlinks: u64,
    pub bytes: u64,
    pub reflinked_bytes: u64,
    pub unchanged: u64,
    pub written: u64,
    pub metadata_only: u64,
    pub deleted: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.files += o.files;
        self.dirs += o.dirs;
        self.symlinks += o.symlinks;
        self.specials += o.specials;
        self.hardlinks += o.hardlinks;
        self.bytes += o.bytes;
        self.reflinked_bytes += o.reflinked_bytes;
        self.unchanged += o.unchanged;
        self.written += o.written;
        self.metadata_only += o.metadata_only;
        self.deleted += o.deleted;
    }
}

/// Whether a directory is copied into a fresh directory or synced into an old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Copy,
    Sync,
}

/// A directory being processed.
pub(super) struct DirNode {
    pub src: PathBuf,
    pub dst: PathBuf,
    /// Metadata of the source directory.
    pub meta: Meta,
    pub mode: Mode,
    /// Sync: the target directory's metadata before anything was changed.
    pub orig_dst: Option<Meta>,
    /// Names directly under this directory to ignore on both sides.
    pub exclude: Vec<OsString>,
    pending: AtomicUsize,
    parent: Option<Arc<DirNode>>,
}

impl DirNode {
    /// A node with one pending job (its own listing).
    pub fn new(src: PathBuf, dst: PathBuf, meta: Meta, mode: Mode) -> DirNode {
        DirNode {
            src,
            dst,
            meta,
            mode,
            orig_dst: None,
            exclude: Vec::new(),
            pending: AtomicUsize::new(1),
            parent: None,
        }
    }
}

/// Descriptors of a directory node's source and target, opened once per job
/// so that each entry is looked up by name instead of by full path.
pub(super) struct DirFds {
    pub src: File,
    pub dst: File,
}

impl DirFds {
    fn open(node: &DirNode) -> Result<DirFds> {
        Ok(DirFds {
            src: sys::open_dir_path(&node.src)
                .map_err(|e| src_err(e, "opening directory", &node.src))?,
            dst: sys::open_dir_path(&node.dst)
                .map_err(|e| dst_err(e, "opening directory", &node.dst))?,
        })
    }
}

enum Job {
    List(Arc<DirNode>),
    Names(Arc<DirNode>, Vec<OsString>),
}

/// Hardlink groups: the first name of a source inode seen becomes the leader,
/// the others wait for it and link to it.
#[derive(Default)]
pub(super) struct LinkMap {
    map: Mutex<HashMap<(u64, u64), Arc<LinkSlot>>>,
}

#[derive(Default)]
pub(super) struct LinkSlot {
    state: Mutex<SlotState>,
    cv: Condvar,
    /// Names of the inode not yet seen.
    remaining: AtomicU64,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Pending,
    Done(PathBuf),
    Failed,
}

pub(super) enum Claim {
    Leader(LeaderGuard),
    Follower(Arc<LinkSlot>),
}

/// Held by the leader of a hardlink group; publishes the target path (or the
/// failure, on drop) to the followers.
pub(super) struct LeaderGuard {
    slot: Arc<LinkSlot>,
    published: bool,
}

impl LeaderGuard {
    pub fn publish(mut self, dst: &Path) {
        *lock(&self.slot.state) = SlotState::Done(dst.to_path_buf());
        self.published = true;
        self.slot.cv.notify_all();
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if !self.published {
            *lock(&self.slot.state) = SlotState::Failed;
            self.slot.cv.notify_all();
        }
    }
}

impl LinkSlot {
    /// Waits until the leader is done; returns the leader's target path.
    pub fn wait(&self, src: &Path) -> Result<PathBuf> {
        let mut st = lock(&self.state);
        loop {
            match &*st {
                SlotState::Pending => st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner),
                SlotState::Done(p) => return Ok(p.clone()),
                SlotState::Failed => {
                    return Err(anyhow!(
                        "not linking {}: copying another name of the same file failed",
                        src.display()
                    ))
                }
            }
        }
    }
}

impl LinkMap {
    /// Claims the group of source inode `m`.
    pub fn claim(&self, m: &Meta) -> Claim {
        let mut map = lock(&self.map);
        if let Some(slot) = map.get(&m.key()).cloned() {
            if slot.remaining.fetch_sub(1, Ordering::Relaxed) <= 1 {
                map.remove(&m.key()); // all names seen: forget the inode
            }
            return Claim::Follower(slot);
        }
        let slot = Arc::new(LinkSlot::default());
        slot.remaining
            .store(m.nlink.saturating_sub(1), Ordering::Relaxed);
        map.insert(m.key(), slot.clone());
        Claim::Leader(LeaderGuard {
            slot,
            published: false,
        })
    }
}

/// State shared by all workers.
pub(super) struct Engine<'a> {
    state: Mutex<QueueState>,
    cv: Condvar,
    cap: usize,
    abort: AtomicBool,
    error: Mutex<Option<anyhow::Error>>,
    pub progress: Option<&'a Progress>,
    pub links: LinkMap,
    /// Sync: target inodes with several names, claimed by the source inode that keeps them.
    pub claims: Mutex<HashMap<(u64, u64), (u64, u64)>>,
    pub flags: DataFlags,
    pub checksum: bool,
    pub tmp_counter: AtomicU64,
    /// Sync: target paths kept when the source lacks them.
    pub keep: Vec<PathBuf>,
}

struct QueueState {
    jobs: Vec<Job>,
    /// Jobs queued or running.
    outstanding: usize,
}

impl<'a> Engine<'a> {
    pub fn new(threads: usize, progress: Option<&'a Progress>, checksum: bool) -> Engine<'a> {
        Engine {
            state: Mutex::new(QueueState {
                jobs: Vec::new(),
                outstanding: 0,
            }),
            cv: Condvar::new(),
            cap: 256 + 64 * threads,
            abort: AtomicBool::new(false),
            error: Mutex::new(None),
            progress,
            links: LinkMap::default(),
            claims: Mutex::new(HashMap::new()),
            flags: DataFlags::default(),
            checksum,
            keep: Vec::new(),
            tmp_counter: AtomicU64::new(0),
        }
    }

    /// Processes the tree below `root` with `threads` workers (the calling
    /// thread is the only worker when `threads <= 1`).
    pub fn run(&self, root: DirNode, threads: usize) -> Result<Counts> {
        {
            let mut st = lock(&self.state);
            st.jobs.push(Job::List(Arc::new(root)));
            st.outstanding = 1;
        }
        let mut total = Counts::default();
        if threads <= 1 {
            total = self.worker();
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        std::thread::Builder::new()
                            .name("copy-worker".into())
                            .stack_size(8 << 20)
                            .spawn_scoped(s, || self.worker())
                    })
                    .collect();
                for h in handles {
                    match h {
                        Ok(h) => match h.join() {
                            Ok(c) => total.add(&c),
                            Err(p) => std::panic::resume_unwind(p),
                        },
                        Err(e) => self.fail(anyhow!(e).context("starting a copy thread")),
                    }
                }
            });
        }
        match lock(&self.error).take() {
            Some(e) => Err(e),
            None => {
                crate::util::signals::check()?;
                Ok(total)
            }
        }
    }

    fn worker(&self) -> Counts {
        let mut c = Counts::default();
        while let Some(job) = self.next_job() {
            self.run_job(job, &mut c);
            let mut st = lock(&self.state);
            st.outstanding -= 1;
            if st.outstanding == 0 {
                self.cv.notify_all();
            }
        }
        c
    }

    fn next_job(&self) -> Option<Job> {
        let mut st = lock(&self.state);
        loop {
            if let Some(job) = st.jobs.pop() {
                return Some(job);
            }
            if st.outstanding == 0 {
                return None;
            }
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Queues `job`, or runs it now when the queue is full.
    fn schedule(&self, job: Job, c: &mut Counts) {
        {
            let mut st = lock(&self.state);
            if st.jobs.len() < self.cap {
                st.jobs.push(job);
                st.outstanding += 1;
                self.cv.notify_one();
                return;
            }
        }
        self.run_job(job, c);
    }

    /// Records the first error and stops all work.
    pub fn fail(&self, e: anyhow::Error) {
        let mut err = lock(&self.error);
        if err.is_none() {
            *err = Some(e);
        }
        self.abort.store(true, Ordering::Relaxed);
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || crate::util::signals::interrupted()
    }

    fn run_job(&self, job: Job, c: &mut Counts) {
        let node = match job {
            Job::List(node) => {
                if !self.aborted() {
                    if let Err(e) = self.list(&node, c) {
                        self.fail(e);
                    }
                }
                node
            }
            Job::Names(node, names) => {
                match DirFds::open(&node) {
                    Ok(dirs) => {
                        for name in names {
                            if self.aborted() {
                                break;
                            }
                            if let Err(e) = self.entry(&node, &dirs, &name, c) {
                                self.fail(e);
                            }
                            if let Some(p) = self.progress {
                                p.entries.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(e) => self.fail(e),
                }
                node
            }
        };
        self.release(node, c);
    }

    /// One job of `node` is done; finalizes it (and its parents) when it was the last.
    fn release(&self, node: Arc<DirNode>, c: &mut Counts) {
        let mut node = node;
        loop {
            if node.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
                return;
            }
            if !self.aborted() {
                if let Err(e) = self.finalize(&node, c) {
                    self.fail(e);
                }
            }
            match node.parent.clone() {
                Some(p) => node = p,
                None => return,
            }
        }
    }

    /// Lists `node` and schedules its names in chunks (sync: deletes what the source lacks).
    fn list(&self, node: &Arc<DirNode>, c: &mut Counts) -> Result<()> {
        let mut names =
            sys::list_dir(&node.src).map_err(|e| src_err(e, "listing directory", &node.src))?;
        names.retain(|n| !node.exclude.contains(n));
        if node.mode == Mode::Sync {
            self.delete_extra(node, &names, c)?;
        }
        let mut rest = names.as_slice();
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(CHUNK));
            rest = tail;
            node.pending.fetch_add(1, Ordering::AcqRel);
            self.schedule(Job::Names(node.clone(), chunk.to_vec()), c);
        }
        Ok(())
    }

    /// Sync: removes target entries whose names the source does not have.
    fn delete_extra(&self, node: &DirNode, src_names: &[OsString], c: &mut Counts) -> Result<()> {
        let dst_names =
            sys::list_dir(&node.dst).map_err(|e| src_err(e, "listing directory", &node.dst))?;
        for name in dst_names {
            if node.exclude.contains(&name) || src_names.binary_search(&name).is_ok() {
                continue;
            }
            self.remove_unless_kept(&node.dst.join(&name), c)?;
        }
        Ok(())
    }

    /// Removes `path` (and what is below it), except the kept paths: a
    /// directory on the way to one stays and keeps only what leads there.
    fn remove_unless_kept(&self, path: &Path, c: &mut Counts) -> Result<()> {
        if self.keep.iter().any(|k| k == path) {
            return Ok(());
        }
        let leads_to_kept = self.keep.iter().any(|k| k.starts_with(path));
        let is_dir = sys::lstat(path).is_ok_and(|m| matches!(m.kind(), sys::Kind::Dir));
        if !(leads_to_kept && is_dir) {
            return sys::remove_tree_counted(path, &mut c.deleted);
        }
        let names = sys::list_dir(path).map_err(|e| src_err(e, "listing directory", path))?;
        for name in names {
            self.remove_unless_kept(&path.join(name), c)?;
        }
        Ok(())
    }

    /// Schedules the listing of a subdirectory of `parent`.
    pub fn add_child(&self, parent: &Arc<DirNode>, mut child: DirNode, c: &mut Counts) {
        child.parent = Some(parent.clone());
        parent.pending.fetch_add(1, Ordering::AcqRel);
        self.schedule(Job::List(Arc::new(child)), c);
    }

    fn entry(
        &self,
        node: &Arc<DirNode>,
        dirs: &DirFds,
        name: &OsString,
        c: &mut Counts,
    ) -> Result<()> {
        let src = node.src.join(name);
        let dst = node.dst.join(name);
        let cname = CString::new(name.as_bytes())
            .map_err(|_| anyhow!("{}: name with a NUL byte", src.display()))?;
        let s = At {
            dir: &dirs.src,
            name: &cname,
            path: &src,
        };
        let d = At {
            dir: &dirs.dst,
            name: &cname,
            path: &dst,
        };
        match node.mode {
            Mode::Copy => self.copy_entry(node, s, d, c),
            Mode::Sync => self.sync_entry(node, s, d, c),
        }
    }

    fn finalize(&self, node: &DirNode, c: &mut Counts) -> Result<()> {
        match node.mode {
            Mode::Copy => finalize_copied_dir(node),
            Mode::Sync => self.finalize_synced_dir(node, c),
        }
    }

    /// Copy: creates `dst` from `src` (which does not exist yet in the target).
    fn copy_entry(&self, node: &Arc<DirNode>, s: At, d: At, c: &mut Counts) -> Result<()> {
        let m = sys::lstat_at(s).map_err(|e| src_err(e, "reading metadata of", s.path))?;
        if m.kind() == Kind::Dir {
            self.create_dir(node, s.path, d.path, &m, c)
        } else {
            self.create_nondir(s.path, d.path, &m, c, Some((s, d)))
        }
    }

    /// Creates directory `dst` and schedules copying `src`'s content into it.
    pub fn create_dir(
        &self,
        parent: &Arc<DirNode>,
        src: &Path,
        dst: &Path,
        m: &Meta,
        c: &mut Counts,
    ) -> Result<()> {
        sys::mkdir(dst, m.mode).map_err(|e| dst_err(e, "creating directory", dst))?;
        c.dirs += 1;
        c.written += 1;
        let child = DirNode::new(src.to_path_buf(), dst.to_path_buf(), *m, Mode::Copy);
        self.add_child(parent, child, c);
        Ok(())
    }

    /// Creates the non-directory `dst` from `src`, as a hard link when `src`'s
    /// inode was already copied. `at` addresses both by directory descriptor.
    pub fn create_nondir(
        &self,
        src: &Path,
        dst: &Path,
        m: &Meta,
        c: &mut Counts,
        at: Option<(At, At)>,
    ) -> Result<()> {
        if m.nlink <= 1 {
            return self.make_nondir(src, dst, m, c, at);
        }
        match self.links.claim(m) {
            Claim::Leader(guard) => self.lead(guard, dst, || self.make_nondir(src, dst, m, c, at)),
            Claim::Follower(slot) => {
                let target = slot.wait(src)?;
                std::fs::hard_link(&target, dst)
                    .map_err(|e| dst_err(e, "creating hard link", dst))?;
                c.hardlinks += 1;
                c.written += 1;
                Ok(())
            }
        }
    }

    /// Runs `make` for the leader of a hard-link group and publishes `dst` to
    /// the followers. A failure is recorded before the followers are woken, so
    /// the reported error is the leader's own.
    pub fn lead(
        &self,
        guard: LeaderGuard,
        dst: &Path,
        make: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        match make() {
            Ok(()) => {
                guard.publish(dst);
                Ok(())
            }
            Err(e) => {
                self.fail(e);
                drop(guard);
                Ok(())
            }
        }
    }

    /// Creates `dst` as a copy of `src` (no hardlink handling); `at`, when
    /// given, addresses the same two entries by directory descriptor.
    pub fn make_nondir(
        &self,
        src: &Path,
        dst: &Path,
        m: &Meta,
        c: &mut Counts,
        at: Option<(At, At)>,
    ) -> Result<()> {
        match m.kind() {
            Kind::File => self.copy_file(src, dst, m, c, at)?,
            Kind::Symlink => {
                let target = sys::read_link(src)?;
                std::os::unix::fs::symlink(&target, dst)
                    .map_err(|e| dst_err(e, "creating symlink", dst))?;
                apply_path_meta(src, dst, m)?;
                c.symlinks += 1;
            }
            Kind::Special => {
                sys::mknod(dst, m.mode, m.rdev).map_err(|e| dst_err(e, "creating", dst))?;
                apply_path_meta(src, dst, m)?;
                c.specials += 1;
            }
            Kind::Dir => anyhow::bail!("internal error: {} is a directory", src.display()),
        }
        c.written += 1;
        Ok(())
    }

    fn copy_file(
        &self,
        src: &Path,
        dst: &Path,
        m: &Meta,
        c: &mut Counts,
        at: Option<(At, At)>,
    ) -> Result<()> {
        let (sf, df) = match at {
            Some((s, d)) => (
                sys::open_file_read_at(s).map_err(|e| src_err(e, "opening", src))?,
                sys::create_file_at(d, m.mode).map_err(|e| dst_err(e, "creating", dst))?,
            ),
            None => (
                sys::open_file_read(src).map_err(|e| src_err(e, "opening", src))?,
                sys::create_file_mode(dst, m.mode).map_err(|e| dst_err(e, "creating", dst))?,
            ),
        };
        let data = DataCopy {
            src_path: src,
            dst_path: dst,
            flags: &self.flags,
            progress: self.progress,
        };
        c.reflinked_bytes += data.run(&sf, &df, m)?;
        c.bytes += m.size;
        let x = sys::read_xattrs(Target::fd(&sf))
            .map_err(|e| src_err(e, "reading extended attributes of", src))?;
        let cur = sys::fstat(&df).map_err(|e| dst_err(e, "reading metadata of", dst))?;
        sys::apply_meta(Target::fd(&df), dst, m, &x, Some(&cur))?;
        c.files += 1;
        Ok(())
    }
}

/// Gives the symlink or special file `dst` the metadata of `src`.
pub(super) fn apply_path_meta(src: &Path, dst: &Path, m: &Meta) -> Result<()> {
    let x = sys::read_xattrs(Target::path(src, m.kind()))
        .map_err(|e| src_err(e, "reading extended attributes of", src))?;
    let cur = sys::lstat(dst).map_err(|e| dst_err(e, "reading metadata of", dst))?;
    sys::apply_meta(Target::path(dst, m.kind()), dst, m, &x, Some(&cur))
}

/// Reads the xattrs of source directory `path`.
pub(super) fn dir_xattrs(path: &Path) -> Result<sys::Xattrs> {
    let d = sys::open_dir(path).map_err(|e| src_err(e, "opening directory", path))?;
    sys::read_xattrs(Target::fd(&d)).map_err(|e| src_err(e, "reading extended attributes of", path))
}

/// Copy: the directory's children are done; give it the source's metadata.
fn finalize_copied_dir(node: &DirNode) -> Result<()> {
    let x = dir_xattrs(&node.src)?;
    let d = sys::open_dir(&node.dst).map_err(|e| dst_err(e, "opening directory", &node.dst))?;
    let cur = sys::fstat(&d).map_err(|e| dst_err(e, "reading metadata of", &node.dst))?;
    sys::apply_meta(Target::fd(&d), &node.dst, &node.meta, &x, Some(&cur))
}
