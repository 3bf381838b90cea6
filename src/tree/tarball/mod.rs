//! Root filesystems given as tar archives (`--rootfs system.tar.zst`).
//!
//! An archive is streamed once, straight into the target directory: no
//! temporary extraction. Plain tar and gzip, zstd and xz compression are
//! read (found by magic bytes, not by name) through the `flate2`, `zstd` and
//! `liblzma` crates; entries are parsed with the `tar` crate and written here
//! with the same care as the copy engine (design §4): numeric owners, modes
//! including setuid/setgid/sticky, nanosecond times (PAX), symlinks, hard
//! links, device nodes, FIFOs, extended attributes (PAX `SCHILY.xattr.*`,
//! which carries `security.capability` and binary POSIX ACLs, and bsdtar's
//! base64 `LIBARCHIVE.xattr.*`), POSIX ACLs given as text (`SCHILY.acl.access`
//! and `SCHILY.acl.default`, from `tar --acls`: applied as the
//! `system.posix_acl_*` xattrs in the kernel's binary format), sparse files
//! (GNU and PAX sparse formats; runs of zero blocks in other files become
//! holes too), and directory metadata applied after the directory's content.
//! PAX records are parsed by their length, so values may hold newlines (the
//! `tar` crate is patched for that: `vendor/tar/PATCHED.md`). Any error
//! reading the archive names the entry (its path inside the archive).
//!
//! Nothing is ever written outside the target: an entry with an absolute path
//! or a `..` component, or whose path (or hard-link target) goes through a
//! symlink, is refused with an error naming it. Directories are walked one
//! component at a time with `O_NOFOLLOW` and entries are created relative to
//! the parent directory's descriptor.
//!
//! Memory: one read buffer, a small cache of open parent directories, and the
//! metadata of every directory (applied at the end, ~200 bytes each).

mod extractor;
mod paths;
mod pax;
#[cfg(test)]
mod tests;

use extractor::*;
pub use paths::*;
use pax::*;

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail, Context, Result};

use crate::tree::copy::sys::{self, Kind};
use crate::tree::copy::{CopyStats, Progress};

/// File name endings recognised as tar archives.
const SUFFIXES: &[&str] = &[
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.zst",
    ".tzst",
    ".tar.zstd",
    ".tar.xz",
    ".txz",
];

/// Size of the read buffer (and of the largest write).
const BUF_SIZE: usize = 256 * 1024;
/// Blocks of this size that are all zeros are left as holes.
const HOLE_BLOCK: usize = 4096;
/// Parent directories kept open between entries.
const PARENT_CACHE: usize = 32;

/// The compression of an archive, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
}

/// True when `path` is a regular file named `*.tar`, `*.tar.gz`, `*.tgz`,
/// `*.tar.zst`, `*.tar.xz` (and `.tzst`, `.txz`), or whose first bytes are
/// those of a tar archive or of a gzip, zstd or xz stream.
pub fn is_tarball(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        _ => return false,
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if SUFFIXES.iter().any(|s| name.ends_with(s)) {
        return true;
    }
    File::open(path)
        .and_then(|mut f| sniff(&mut f))
        .is_ok_and(|k| k.is_some())
}

/// Reads the first bytes of `f` (then rewinds): the compression, or `None`
/// when it is neither compressed nor a tar archive.
fn sniff(f: &mut File) -> io::Result<Option<Compression>> {
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    f.seek(SeekFrom::Start(0))?;
    let head = &head[..n];
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Compression::Xz)
    } else if n >= 262 && &head[257..262] == b"ustar" {
        Some(Compression::None)
    } else {
        None
    })
}

/// Opens `path` and returns a reader of the decompressed tar stream.
fn open_stream(path: &Path) -> Result<(Box<dyn Read>, Compression)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let kind = sniff(&mut f)
        .with_context(|| format!("reading {}", path.display()))?
        .ok_or_else(|| {
            anyhow!(
                "{} is not a tar archive (plain, gzip, zstd or xz compressed)",
                path.display()
            )
        })?;
    let buffered = BufReader::with_capacity(BUF_SIZE, f);
    let reader: Box<dyn Read> = match kind {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .with_context(|| format!("starting zstd decompression of {}", path.display()))?,
        ),
        Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(buffered)),
    };
    Ok((reader, kind))
}

/// Bytes the archive would occupy once extracted: the sizes of its regular
/// files (real sizes for sparse ones), each rounded up to a 4 KiB block. Reads
/// (and decompresses) the whole archive once; a plain tar's file data is
/// skipped with seeks. Fails, like [`extract`], on entries with absolute
/// paths or `..` components, so a plan can refuse such an archive before
/// writing anything (symlink tricks are only caught while extracting).
pub fn content_size(path: &Path) -> Result<u64> {
    content_size_inner(path).with_context(|| format!("reading archive {}", path.display()))
}

fn content_size_inner(path: &Path) -> Result<u64> {
    let (reader, kind) = open_stream(path)?;
    if kind == Compression::None {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut ar = tar::Archive::new(BufReader::with_capacity(BUF_SIZE, f));
        return sum_sizes(ar.entries_with_seek()?);
    }
    let mut ar = tar::Archive::new(reader);
    sum_sizes(ar.entries()?)
}

fn sum_sizes<R: Read>(entries: tar::Entries<'_, R>) -> Result<u64> {
    let mut total = 0u64;
    let mut last: Option<String> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| entry_error(e, last.as_deref()))?;
        let t = entry.header().entry_type();
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let pax =
            Pax::read(&mut entry).with_context(|| format!("reading archive entry {shown:?}"))?;
        last = Some(shown);
        // Refuse escaping paths now, before anything is written.
        let raw = match pax.sparse.as_ref().and_then(|s| s.name.clone()) {
            Some(name) => name,
            None => entry.path_bytes().into_owned(),
        };
        let comps = components(&raw, "entry")?;
        if let [top] = comps.as_slice() {
            let kind = if t.is_dir() {
                TopKind::Dir
            } else if t.is_symlink() {
                TopKind::Symlink
            } else {
                TopKind::Other
            };
            check_top_entry(&String::from_utf8_lossy(top), kind)?;
        }
        if t.is_hard_link() {
            if let Some(target) = entry.link_name_bytes() {
                components(&target, "hard link target")?;
            }
        }
        if !(t.is_file() || t.is_gnu_sparse() || t == tar::EntryType::Continuous) {
            continue;
        }
        let size = match (&pax.sparse, t.is_gnu_sparse()) {
            (Some(s), _) => s.real_size,
            (None, true) => entry
                .header()
                .as_gnu()
                .map_or(Ok(entry.size()), |g| g.real_size())?,
            (None, false) => entry.size(),
        };
        total = total.saturating_add(size.div_ceil(4096) * 4096);
    }
    Ok(total)
}

/// Streams the archive at `path` into the existing, empty directory `dst`,
/// preserving everything listed in the module documentation, and gives `dst`
/// the metadata of the archive's root entry (`./`) when it has one.
///
/// Refuses (with an error naming the entry, before writing it) entries with
/// absolute paths or `..` components, and entries whose path or hard-link
/// target goes through a symlink. The target full fails with
/// [`crate::tree::copy::NoSpaceError`] in the error chain.
pub fn extract(path: &Path, dst: &Path, progress: Option<&Progress>) -> Result<CopyStats> {
    extract_inner(path, dst, progress)
        .with_context(|| format!("extracting {} into {}", path.display(), dst.display()))
}

fn extract_inner(path: &Path, dst: &Path, progress: Option<&Progress>) -> Result<CopyStats> {
    let root = open_root(dst)?;
    let (reader, _) = open_stream(path)?;
    let mut ar = tar::Archive::new(reader);
    let mut x = Extractor {
        root,
        dst,
        parents: Vec::new(),
        dirs: Vec::new(),
        stats: CopyStats::default(),
        progress,
        buf: vec![0u8; BUF_SIZE],
        ids: std::collections::HashMap::new(),
    };
    let mut last: Option<String> = None;
    for entry in ar
        .entries()
        .with_context(|| format!("reading {}", path.display()))?
    {
        crate::util::signals::check()?;
        let mut entry = entry.map_err(|e| entry_error(e, last.as_deref()))?;
        last = Some(String::from_utf8_lossy(&entry.path_bytes()).into_owned());
        x.entry(&mut entry)?;
        if let Some(p) = progress {
            p.entries.fetch_add(1, Ordering::Relaxed);
        }
    }
    x.finish_dirs()?;
    Ok(x.stats)
}

/// An error reading the archive's next header, naming the entry before it
/// (the header itself could not be read, so its name is unknown).
fn entry_error(e: io::Error, last: Option<&str>) -> anyhow::Error {
    let e = anyhow::Error::new(e);
    match last {
        Some(name) => e.context(format!("reading the archive entry after {name:?}")),
        None => e.context("reading the archive's first entry"),
    }
}

/// Opens the target root, which must be an empty real directory.
fn open_root(dst: &Path) -> Result<File> {
    let m = sys::lstat(dst).with_context(|| format!("reading metadata of {}", dst.display()))?;
    if m.kind() != Kind::Dir {
        bail!("target {} is not a directory", dst.display());
    }
    let mut names = std::fs::read_dir(dst).with_context(|| format!("listing {}", dst.display()))?;
    if names.next().is_some() {
        bail!("target directory {} is not empty", dst.display());
    }
    sys::open_dir(dst).with_context(|| format!("opening {}", dst.display()))
}
