//! Replays write logs in dm-log-writes' format — what QEMU's `blklogwrites`
//! block driver records (block/blklogwrites.c; the format of Linux's
//! drivers/md/dm-log-writes.c and xfstests' src/log-writes) — to rebuild a
//! disk as it stood at a moment of a recorded run.
//!
//! The log: sector 0 holds the superblock (`magic`, `version`, `nr_entries`,
//! `sectorsize`, little-endian; QEMU rewrites it at every flush, so entries
//! after the last flush are not counted). Each entry takes one log sector
//! (`sector`, `nr_sectors`, `flags`, `data_len`, then zeros) followed by
//! `nr_sectors` sectors of data, except discards, which carry none. A flush
//! is an entry with the FLUSH flag and no data.
//!
//! What a power cut can leave: everything written before the last completed
//! flush, plus any subset of the writes after it (a drive's volatile cache
//! may lose or keep each of them, in any order). [`Point`] names such a
//! state: the writes of entries `..end` are issued, those of `..durable`
//! are on the disk, and `dropped` lists the entries of `durable..end` that
//! the cut lost. Discards change nothing in a rebuilt disk (QEMU's file
//! driver ignores them without `discard=unmap`, and a drive may keep the old
//! data).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const MAGIC: u64 = 0x6a736677736872;
pub const VERSION: u64 = 1;
pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First sector written (in log sectors).
    pub sector: u64,
    /// Sectors written.
    pub nr_sectors: u64,
    /// FLUSH, FUA, DISCARD, MARK.
    pub flags: u64,
    /// Byte offset of the data in the log file.
    pub data_offset: u64,
}

impl Entry {
    /// True for a write that carries data (not a flush, discard or mark).
    pub fn is_write(&self) -> bool {
        self.flags & (DISCARD | MARK) == 0 && self.nr_sectors > 0
    }
    /// True when the entry makes everything before it durable.
    pub fn is_flush(&self) -> bool {
        self.flags & FLUSH != 0
    }
}

/// A parsed write log.
pub struct Log {
    file: File,
    /// Bytes per log sector (and unit of `Entry::sector`).
    pub sectorsize: u64,
    pub entries: Vec<Entry>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl Log {
    /// Parses the log at `path`: the superblock, then `nr_entries` entries.
    pub fn open(path: &Path) -> Result<Log, String> {
        let mut file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let len = file
            .metadata()
            .map_err(|e| format!("reading {}: {e}", path.display()))?
            .len();
        let mut sb = [0u8; 28];
        file.read_exact(&mut sb)
            .map_err(|e| format!("{}: no log superblock: {e}", path.display()))?;
        if le64(&sb, 0) != MAGIC {
            return Err(format!("{}: not a write log (bad magic)", path.display()));
        }
        if le64(&sb, 8) != VERSION {
            return Err(format!(
                "{}: unsupported log version {}",
                path.display(),
                le64(&sb, 8)
            ));
        }
        let n = le64(&sb, 16);
        let sectorsize = u32::from_le_bytes(sb[24..28].try_into().unwrap()) as u64;
        if !sectorsize.is_power_of_two() || sectorsize < 32 {
            return Err(format!(
                "{}: bad log sector size {sectorsize}",
                path.display()
            ));
        }
        let mut entries = Vec::with_capacity(n as usize);
        let mut at = sectorsize; // sector 1
        let mut head = [0u8; 32];
        for i in 0..n {
            if at + sectorsize > len {
                return Err(format!(
                    "{}: entry {i} of {n} lies past the end of the log",
                    path.display()
                ));
            }
            file.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
            file.read_exact(&mut head)
                .map_err(|e| format!("reading entry {i}: {e}"))?;
            let e = Entry {
                sector: le64(&head, 0),
                nr_sectors: le64(&head, 8),
                flags: le64(&head, 16),
                data_offset: at + sectorsize,
            };
            if e.flags & !(FLUSH | FUA | DISCARD | MARK) != 0 {
                return Err(format!(
                    "{}: entry {i} has unknown flags {:#x}",
                    path.display(),
                    e.flags
                ));
            }
            at += sectorsize;
            if e.flags & DISCARD == 0 {
                at += e.nr_sectors * sectorsize;
            }
            if at > len {
                return Err(format!(
                    "{}: the data of entry {i} lies past the end of the log",
                    path.display()
                ));
            }
            entries.push(e);
        }
        Ok(Log {
            file,
            sectorsize,
            entries,
        })
    }

    /// Indices of the flush entries.
    pub fn flushes(&self) -> Vec<usize> {
        (0..self.entries.len())
            .filter(|&i| self.entries[i].is_flush())
            .collect()
    }

    /// Applies the writes of entries `range`, except those in `skip`, to `disk`.
    pub fn apply(
        &self,
        disk: &File,
        range: std::ops::Range<usize>,
        skip: &BTreeSet<usize>,
    ) -> Result<(), String> {
        let mut buf = Vec::new();
        for i in range {
            let e = &self.entries[i];
            if !e.is_write() || skip.contains(&i) {
                continue;
            }
            buf.resize((e.nr_sectors * self.sectorsize) as usize, 0);
            self.file
                .read_exact_at(&mut buf, e.data_offset)
                .map_err(|e| format!("reading the data of entry {i}: {e}"))?;
            disk.write_all_at(&buf, e.sector * self.sectorsize)
                .map_err(|e| format!("writing entry {i} to the disk: {e}"))?;
        }
        Ok(())
    }

    /// Rebuilds `point` on `disk`, which must hold the state before the log.
    pub fn rebuild(&self, disk: &File, point: &Point) -> Result<(), String> {
        let dropped: BTreeSet<usize> = point.dropped.iter().copied().collect();
        self.apply(disk, 0..point.end, &dropped)
    }
}

/// A moment of a run a power cut can leave (see the module comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// Entries `..end` were issued.
    pub end: usize,
    /// Entries `..durable` are on the disk (just after the last flush before `end`).
    pub durable: usize,
    /// Writes of `durable..end` the cut lost.
    pub dropped: Vec<usize>,
}

impl Point {
    /// Describes the point for a report: "after flush 12 (entry 340)" or
    /// "entry 351 of 900, 4 of 9 writes since flush 12 lost".
    pub fn describe(&self, log: &Log) -> String {
        let flushes = log.flushes();
        let nflush = flushes.iter().filter(|&&f| f < self.durable).count();
        if self.durable == self.end {
            format!(
                "after flush {nflush} (entry {} of {})",
                self.end,
                log.entries.len()
            )
        } else {
            let pending = (self.durable..self.end)
                .filter(|&i| log.entries[i].is_write())
                .count();
            format!(
                "entry {} of {}, {} of {pending} writes since flush {nflush} lost",
                self.end,
                log.entries.len(),
                self.dropped.len()
            )
        }
    }
}

/// SplitMix64: a small seeded generator, so a failing point can be rebuilt.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every point worth checking in `log`: the state after each flush, and for
/// each stretch between two flushes that holds writes, one torn point: a
/// random moment in it with a random (non-empty, when there is a choice)
/// subset of the writes since the flush lost.
pub fn points(log: &Log, rng: &mut Rng) -> Vec<Point> {
    let mut out = Vec::new();
    let mut durable = 0;
    let n = log.entries.len();
    for i in 0..=n {
        let at_flush = i < n && log.entries[i].is_flush();
        if i < n && !at_flush {
            continue;
        }
        // The stretch durable..i holds the writes since the last flush.
        let writes: Vec<usize> = (durable..i)
            .filter(|&j| log.entries[j].is_write())
            .collect();
        if !writes.is_empty() {
            // Issued up to just after a random write of the stretch.
            let last = writes[rng.below(writes.len() as u64) as usize];
            let issued: Vec<usize> = writes.iter().copied().filter(|&j| j <= last).collect();
            let mut dropped: Vec<usize> = issued
                .iter()
                .copied()
                .filter(|_| rng.next() & 1 == 1)
                .collect();
            if dropped.is_empty() && issued.len() > 1 {
                dropped.push(issued[rng.below(issued.len() as u64) as usize]);
            }
            out.push(Point {
                end: last + 1,
                durable,
                dropped,
            });
        }
        if at_flush {
            out.push(Point {
                end: i + 1,
                durable: i + 1,
                dropped: Vec::new(),
            });
            durable = i + 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SS: u64 = 512;

    /// Builds a log the way QEMU writes one.
    struct Builder {
        bytes: Vec<u8>,
        n: u64,
    }
    impl Builder {
        fn new() -> Builder {
            Builder {
                bytes: vec![0; SS as usize],
                n: 0,
            }
        }
        fn entry(&mut self, sector: u64, nr: u64, flags: u64, data: &[u8]) -> &mut Self {
            let mut s = vec![0u8; SS as usize];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..16].copy_from_slice(&nr.to_le_bytes());
            s[16..24].copy_from_slice(&flags.to_le_bytes());
            self.bytes.extend(s);
            self.bytes.extend(data);
            self.n += 1;
            self
        }
        fn write(&mut self, sector: u64, fill: u8, nr: u64) -> &mut Self {
            self.entry(sector, nr, 0, &vec![fill; (nr * SS) as usize])
        }
        fn flush(&mut self) -> &mut Self {
            self.entry(0, 0, FLUSH, &[])
        }
        fn save(&mut self, path: &Path, counted: u64) {
            self.bytes[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            self.bytes[8..16].copy_from_slice(&VERSION.to_le_bytes());
            self.bytes[16..24].copy_from_slice(&counted.to_le_bytes());
            self.bytes[24..28].copy_from_slice(&(SS as u32).to_le_bytes());
            std::fs::File::create(path)
                .unwrap()
                .write_all(&self.bytes)
                .unwrap();
        }
    }

    fn disk(dir: &Path) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("disk"))
            .unwrap();
        f.set_len(8 * SS).unwrap();
        f
    }

    fn sectors(d: &File) -> Vec<u8> {
        let mut b = vec![0u8; (8 * SS) as usize];
        d.read_exact_at(&mut b, 0).unwrap();
        b.chunks(SS as usize)
            .map(|c| {
                assert!(c.iter().all(|&x| x == c[0]), "a sector mixes two writes");
                c[0]
            })
            .collect()
    }

    fn sample(dir: &Path) -> Log {
        let p = dir.join("log");
        Builder::new()
            .write(0, 1, 2) // 0: sectors 0-1
            .entry(4, 2, DISCARD, &[]) // 1: a discard: no data, no effect
            .flush() // 2
            .write(1, 2, 1) // 3
            .write(3, 3, 1) // 4
            .write(5, 4, 3) // 5: sectors 5-7
            .flush() // 6
            .write(0, 5, 1) // 7
            .save(&p, 8);
        Log::open(&p).unwrap()
    }

    #[test]
    fn parses_entries_data_offsets_and_flushes() {
        let t = tempfile::tempdir().unwrap();
        let log = sample(t.path());
        assert_eq!(log.sectorsize, SS);
        assert_eq!(log.entries.len(), 8);
        assert_eq!(log.flushes(), vec![2, 6]);
        assert_eq!(log.entries[0].data_offset, 2 * SS);
        // The discard carries no data: the flush follows its header.
        assert_eq!(log.entries[2].data_offset, 6 * SS);
        assert_eq!(log.entries[3].data_offset, 7 * SS);
        assert!(
            log.entries[0].is_write() && !log.entries[1].is_write() && !log.entries[2].is_write()
        );
    }

    #[test]
    fn rebuilds_flush_points_and_torn_states() {
        let t = tempfile::tempdir().unwrap();
        let log = sample(t.path());
        let d = disk(t.path());
        log.rebuild(
            &d,
            &Point {
                end: 3,
                durable: 3,
                dropped: vec![],
            },
        )
        .unwrap();
        assert_eq!(sectors(&d), vec![1, 1, 0, 0, 0, 0, 0, 0]);
        let d = disk(t.path());
        log.rebuild(
            &d,
            &Point {
                end: 6,
                durable: 3,
                dropped: vec![4],
            },
        )
        .unwrap();
        assert_eq!(sectors(&d), vec![1, 2, 0, 0, 0, 4, 4, 4]);
        let d = disk(t.path());
        log.rebuild(
            &d,
            &Point {
                end: 8,
                durable: 7,
                dropped: vec![],
            },
        )
        .unwrap();
        assert_eq!(sectors(&d), vec![5, 2, 0, 3, 0, 4, 4, 4]);
        // Incremental application gives the same disk.
        let t2 = tempfile::tempdir().unwrap();
        let d2 = disk(t2.path());
        log.apply(&d2, 0..4, &BTreeSet::new()).unwrap();
        log.apply(&d2, 4..8, &BTreeSet::new()).unwrap();
        assert_eq!(sectors(&d2), vec![5, 2, 0, 3, 0, 4, 4, 4]);
    }

    #[test]
    fn points_cover_every_flush_and_one_torn_state_per_stretch() {
        let t = tempfile::tempdir().unwrap();
        let log = sample(t.path());
        let pts = points(&log, &mut Rng::new(7));
        let flush_points: Vec<_> = pts
            .iter()
            .filter(|p| p.durable == p.end)
            .map(|p| p.end)
            .collect();
        assert_eq!(flush_points, vec![3, 7]);
        let torn: Vec<_> = pts.iter().filter(|p| p.durable != p.end).collect();
        // Stretches with writes: 0..2, 3..6 and 7..8 (after the last flush).
        assert_eq!(
            torn.iter().map(|p| p.durable).collect::<Vec<_>>(),
            vec![0, 3, 7]
        );
        for p in &torn {
            assert!(p.end > p.durable);
            for d in &p.dropped {
                assert!(
                    (p.durable..p.end).contains(d) && log.entries[*d].is_write(),
                    "{p:?}"
                );
            }
        }
        // Torn points with a choice lose at least one write.
        let mid = torn.iter().find(|p| p.durable == 3).unwrap();
        if mid.end > 4 {
            assert!(!mid.dropped.is_empty(), "{mid:?}");
        }
        // Same seed, same points; another seed, other points somewhere.
        assert_eq!(pts, points(&log, &mut Rng::new(7)));
        assert!((0..20).any(|s| points(&log, &mut Rng::new(s)) != pts));
        assert!(
            pts[0].describe(&log).contains("lost"),
            "{}",
            pts[0].describe(&log)
        );
        assert_eq!(pts[1].describe(&log), "after flush 1 (entry 3 of 8)");
    }

    #[test]
    fn bad_logs_are_refused_naming_the_problem() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("log");
        std::fs::write(&p, vec![0u8; 512]).unwrap();
        assert!(Log::open(&p).err().unwrap().contains("bad magic"));
        std::fs::write(&p, b"short").unwrap();
        assert!(Log::open(&p).err().unwrap().contains("no log superblock"));
        // Counted entries past the end of the file.
        Builder::new().write(0, 1, 1).save(&p, 3);
        assert!(Log::open(&p)
            .err()
            .unwrap()
            .contains("entry 1 of 3 lies past the end"));
        // Truncated data.
        let mut b = Builder::new();
        b.write(0, 1, 4).save(&p, 1);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 512]).unwrap();
        assert!(Log::open(&p)
            .err()
            .unwrap()
            .contains("data of entry 0 lies past the end"));
        Builder::new().entry(0, 0, 1 << 9, &[]).save(&p, 1);
        assert!(Log::open(&p).err().unwrap().contains("unknown flags"));
        // Entries after the last counted one (not flushed) are not read.
        Builder::new()
            .write(0, 1, 1)
            .flush()
            .write(1, 2, 1)
            .save(&p, 2);
        assert_eq!(Log::open(&p).unwrap().entries.len(), 2);
    }
}
