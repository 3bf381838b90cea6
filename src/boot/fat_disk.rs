//! The bytes of the disk under a FAT partition, as `fatfs` reads and writes
//! them: through a page cache of our own.
//!
//! `fatfs` reads and writes a few bytes at a time (a FAT entry, a directory
//! entry, a cluster), each after a seek: a kernel and an initramfs of 16 MiB
//! cost it some 650,000 system calls on an unbuffered file, more than the
//! whole copy of a Debian tree into the Btrfs beside it. Here reads fill
//! 64 KiB at a time, and writes change pages in memory that reach the disk,
//! sorted and merged into large writes, at [`PageCache::flush`]: before each
//! sync of [`super::fat::FatPartition`], at its close, and whenever more
//! than [`MAX_DIRTY_PAGES`] are waiting. Syncs are the only ordering the
//! FAT writers rely on (the page cache of the kernel reorders writes
//! between them as well), so the power-cut story is unchanged.

use anyhow::{Context, Result};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::rc::Rc;

/// Writes kept in memory instead of reaching the disk: (byte offset on the
/// disk, data), in the order they were made.
pub type Captured = Vec<(u64, Vec<u8>)>;

/// The unit of caching.
const PAGE: u64 = 4096;
/// How much one read from the disk fetches.
const READ_AHEAD: u64 = 64 * 1024;
/// Changed pages held before they are written out (16 MiB).
const MAX_DIRTY_PAGES: usize = 4096;
/// Unchanged pages held before the cache is emptied (64 MiB).
const MAX_CLEAN_PAGES: usize = 16384;

/// The pages of one disk read or changed since it was opened.
pub(super) struct PageCache {
    file: File,
    what: String,
    len: u64,
    pages: BTreeMap<u64, Vec<u8>>,
    dirty: BTreeSet<u64>,
}

impl PageCache {
    pub(super) fn new(mut file: File, what: String) -> Result<Rc<RefCell<PageCache>>> {
        let len = file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("finding the size of {what}"))?;
        Ok(Rc::new(RefCell::new(PageCache {
            file,
            what,
            len,
            pages: BTreeMap::new(),
            dirty: BTreeSet::new(),
        })))
    }

    /// Loads page `p` (and its read-ahead neighbours not cached yet).
    fn load(&mut self, p: u64) -> std::io::Result<()> {
        let start = (p * PAGE) / READ_AHEAD * READ_AHEAD;
        let end = (start + READ_AHEAD).min(self.len);
        let mut buf = vec![0u8; (end - start) as usize];
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], start + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        for (i, chunk) in buf.chunks(PAGE as usize).enumerate() {
            let mut page = chunk.to_vec();
            page.resize(PAGE as usize, 0);
            self.pages.entry(start / PAGE + i as u64).or_insert(page);
        }
        self.pages
            .entry(p)
            .or_insert_with(|| vec![0; PAGE as usize]);
        Ok(())
    }

    fn read_at(&mut self, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(at)) as usize;
        let mut done = 0;
        while done < n {
            let off = at + done as u64;
            let (p, in_page) = (off / PAGE, (off % PAGE) as usize);
            if !self.pages.contains_key(&p) {
                self.load(p)?;
            }
            let page = &self.pages[&p];
            let k = (PAGE as usize - in_page).min(n - done);
            buf[done..done + k].copy_from_slice(&page[in_page..in_page + k]);
            done += k;
        }
        Ok(n)
    }

    fn write_at(&mut self, buf: &[u8], at: u64) -> std::io::Result<usize> {
        if at + buf.len() as u64 > self.len {
            return Err(std::io::Error::other(format!(
                "write past the end of {} (at {at})",
                self.what
            )));
        }
        let mut done = 0;
        while done < buf.len() {
            let off = at + done as u64;
            let (p, in_page) = (off / PAGE, (off % PAGE) as usize);
            let k = (PAGE as usize - in_page).min(buf.len() - done);
            if k == PAGE as usize {
                // Wholly overwritten: no need to read it first.
                self.pages
                    .entry(p)
                    .or_insert_with(|| vec![0; PAGE as usize]);
            } else if !self.pages.contains_key(&p) {
                self.load(p)?;
            }
            let page = self.pages.get_mut(&p).expect("page just loaded");
            page[in_page..in_page + k].copy_from_slice(&buf[done..done + k]);
            self.dirty.insert(p);
            done += k;
        }
        if self.dirty.len() > MAX_DIRTY_PAGES {
            self.write_out()?;
        }
        Ok(buf.len())
    }

    /// Writes every changed page to the disk, runs of neighbouring pages in
    /// one write each (not synced).
    fn write_out(&mut self) -> std::io::Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        let mut next = None;
        for p in dirty {
            if next != Some(p) && !run.is_empty() {
                self.write_run(run_start, &run)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = p;
            }
            run.extend_from_slice(&self.pages[&p]);
            next = Some(p + 1);
        }
        if !run.is_empty() {
            self.write_run(run_start, &run)?;
        }
        if self.pages.len() > MAX_CLEAN_PAGES {
            self.pages.clear();
        }
        Ok(())
    }

    fn write_run(&self, first_page: u64, data: &[u8]) -> std::io::Result<()> {
        let at = first_page * PAGE;
        // The disk may end inside its last page.
        let n = (data.len() as u64).min(self.len - at) as usize;
        self.file.write_all_at(&data[..n], at)
    }

    /// Writes the changed pages out (not synced).
    pub(super) fn flush(&mut self) -> Result<()> {
        let what = self.what.clone();
        self.write_out().with_context(|| format!("writing {what}"))
    }

    /// Writes the changed pages out and makes them durable (`all`: the
    /// metadata of the file too, as `fsync`; else as `fdatasync`).
    pub(super) fn sync(&mut self, all: bool) -> Result<()> {
        self.flush()?;
        if all {
            self.file.sync_all()
        } else {
            self.file.sync_data()
        }
        .with_context(|| format!("syncing {}", self.what))
    }
}

impl Drop for PageCache {
    fn drop(&mut self) {
        // Left unflushed only on an error path: what was written still goes
        // out (as it would have without the cache), unsynced.
        if !self.dirty.is_empty() {
            if let Err(e) = self.write_out() {
                tracing::warn!("writing {}: {e}", self.what);
            }
        }
    }
}

/// What becomes of the writes `fatfs` makes.
pub(super) enum Writes {
    /// They go to the disk (through the cache).
    Disk,
    /// They are dropped: `fatfs` updates its cached free-cluster count
    /// (FSInfo) even when only reading, and a read-only inspection must
    /// leave the disk byte-identical.
    Dropped,
    /// They are kept in memory (and read back over the disk's data) for the
    /// caller to apply elsewhere.
    Captured(Rc<RefCell<Captured>>),
}

/// The disk as one stream for `fatfs` (which sees a slice of it).
pub(super) struct DiskFile {
    cache: Rc<RefCell<PageCache>>,
    pos: u64,
    writes: Writes,
}

impl DiskFile {
    pub(super) fn new(cache: Rc<RefCell<PageCache>>, writes: Writes) -> DiskFile {
        DiskFile {
            cache,
            pos: 0,
            writes,
        }
    }
}

impl Read for DiskFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let at = self.pos;
        let n = self.cache.borrow_mut().read_at(buf, at)?;
        if let Writes::Captured(cap) = &self.writes {
            for (off, data) in cap.borrow().iter() {
                let (start, end) = ((*off).max(at), (off + data.len() as u64).min(at + n as u64));
                if start < end {
                    buf[(start - at) as usize..(end - at) as usize]
                        .copy_from_slice(&data[(start - off) as usize..(end - off) as usize]);
                }
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for DiskFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.writes {
            Writes::Disk => {
                self.cache.borrow_mut().write_at(buf, self.pos)?;
            }
            Writes::Dropped => {}
            Writes::Captured(cap) => cap.borrow_mut().push((self.pos, buf.to_vec())),
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.writes {
            Writes::Disk => self.cache.borrow_mut().write_out(),
            _ => Ok(()),
        }
    }
}

impl Seek for DiskFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let len = self.cache.borrow().len;
        let new = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => len.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).unwrap();
        (d, p)
    }

    fn open(p: &std::path::Path) -> Rc<RefCell<PageCache>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        PageCache::new(f, "the test disk".into()).unwrap()
    }

    #[test]
    fn reads_and_writes_reach_the_disk_at_flush_across_pages_and_the_odd_end() {
        // 200 KiB + 300 bytes: several read-ahead chunks, a partial last page.
        let len = 200 * 1024 + 300;
        let (_d, p) = disk(len);
        let mut want = std::fs::read(&p).unwrap();
        let cache = open(&p);
        let mut f = DiskFile::new(cache.clone(), Writes::Disk);
        for (at, n) in [
            (10u64, 5000usize),
            (65530, 20),
            (len - 100, 100),
            (4096, 4096),
        ] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 + at as usize) as u8).collect();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&data).unwrap();
            want[at as usize..at as usize + n].copy_from_slice(&data);
        }
        // Not on the disk yet, but read back through the cache.
        assert_ne!(std::fs::read(&p).unwrap(), want);
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back, want);
        cache.borrow_mut().sync(false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), want);
        // A write past the end is refused, nothing is changed.
        f.seek(SeekFrom::End(-2)).unwrap();
        assert!(f.write_all(&[1, 2, 3]).is_err());
        drop(f);
        drop(cache);
        assert_eq!(std::fs::read(&p).unwrap(), want);
    }

    #[test]
    fn dropped_and_captured_writes_leave_the_disk_alone() {
        let (_d, p) = disk(64 * 1024);
        let before = std::fs::read(&p).unwrap();
        let cap = Rc::new(RefCell::new(Captured::new()));
        let cache = open(&p);
        let mut dropped = DiskFile::new(cache.clone(), Writes::Dropped);
        dropped.write_all(b"gone").unwrap();
        let mut captured = DiskFile::new(cache.clone(), Writes::Captured(cap.clone()));
        captured.seek(SeekFrom::Start(100)).unwrap();
        captured.write_all(b"kept").unwrap();
        let mut b = [0u8; 4];
        captured.seek(SeekFrom::Start(100)).unwrap();
        captured.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"kept");
        dropped.seek(SeekFrom::Start(0)).unwrap();
        dropped.read_exact(&mut b).unwrap();
        assert_eq!(b, before[..4]);
        cache.borrow_mut().sync(true).unwrap();
        drop((dropped, captured, cache));
        assert_eq!(std::fs::read(&p).unwrap(), before);
        assert_eq!(cap.borrow().as_slice(), &[(100, b"kept".to_vec())]);
    }

    #[test]
    fn an_error_path_still_writes_what_was_changed() {
        let (_d, p) = disk(8192);
        let cache = open(&p);
        let mut f = DiskFile::new(cache.clone(), Writes::Disk);
        f.seek(SeekFrom::Start(5000)).unwrap();
        f.write_all(b"late").unwrap();
        drop((f, cache));
        assert_eq!(&std::fs::read(&p).unwrap()[5000..5004], b"late");
    }
}
