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

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail, Context, Result};

use crate::tree::copy::sys::{self, dst_err, Kind, Meta, Target, Time, Xattrs};
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

/// The PAX extended header fields of one entry that matter here.
#[derive(Default)]
struct Pax {
    mtime: Option<Time>,
    atime: Option<Time>,
    xattrs: Xattrs,
    sparse: Option<PaxSparse>,
    /// POSIX ACLs as text (`SCHILY.acl.access`, `SCHILY.acl.default`: GNU
    /// tar's and star's `--acls`), applied as `system.posix_acl_*` xattrs
    /// unless the archive also holds those xattrs (GNU tar `--acls --xattrs`
    /// stores both; the binary xattr is exact, numeric ids).
    acl_access: Option<Vec<u8>>,
    acl_default: Option<Vec<u8>>,
}

/// Xattr names of POSIX ACLs (the kernel's binary format).
const ACL_ACCESS_XATTR: &str = "system.posix_acl_access";
const ACL_DEFAULT_XATTR: &str = "system.posix_acl_default";

/// A file stored in one of the PAX sparse formats (GNU tar `-S --format=posix`).
struct PaxSparse {
    /// The file's real path (the entry's own path is a placeholder).
    name: Option<Vec<u8>>,
    real_size: u64,
    /// Format 1.0 stores the map at the start of the data; 0.x in the header.
    map_in_data: bool,
    /// `(offset, length)` of the data segments (0.x formats).
    map: Vec<(u64, u64)>,
}

impl Pax {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Pax> {
        let mut pax = Pax::default();
        let Some(exts) = entry.pax_extensions()? else {
            return Ok(pax);
        };
        let (mut major, mut name, mut real_size, mut map) = (None, None, None, Vec::new());
        let mut offsets = Vec::new();
        for ext in exts {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(xname) = key.strip_prefix(b"SCHILY.xattr.") {
                let n = CString::new(xname).map_err(|_| anyhow!("xattr name with NUL"))?;
                set_xattr_value(&mut pax.xattrs, n, value.to_vec());
                continue;
            }
            if let Some(encoded) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                // bsdtar: the name URL-encoded, the value base64.
                let (n, v) = libarchive_xattr(encoded, value)?;
                set_xattr_value(&mut pax.xattrs, n, v);
                continue;
            }
            match key {
                b"SCHILY.acl.access" => pax.acl_access = Some(value.to_vec()),
                b"SCHILY.acl.default" => pax.acl_default = Some(value.to_vec()),
                b"SCHILY.acl.ace" => bail!(
                    "the archive holds NFSv4 ACLs (SCHILY.acl.ace), which Linux filesystems \
                     cannot store: make the archive without them (POSIX ACLs are kept)"
                ),
                b"mtime" => pax.mtime = Some(parse_time(value)?),
                b"atime" => pax.atime = Some(parse_time(value)?),
                b"GNU.sparse.major" => major = Some(parse_u64(value)?),
                b"GNU.sparse.name" => name = Some(value.to_vec()),
                b"GNU.sparse.realsize" | b"GNU.sparse.size" => real_size = Some(parse_u64(value)?),
                b"GNU.sparse.map" => {
                    let nums = value
                        .split(|b| *b == b',')
                        .map(parse_u64)
                        .collect::<Result<Vec<_>>>()?;
                    map = nums
                        .chunks(2)
                        .map(|c| (c[0], *c.get(1).unwrap_or(&0)))
                        .collect();
                }
                b"GNU.sparse.offset" => offsets.push(parse_u64(value)?),
                b"GNU.sparse.numbytes" => {
                    let off = offsets
                        .pop()
                        .ok_or_else(|| anyhow!("GNU.sparse.numbytes without offset"))?;
                    map.push((off, parse_u64(value)?));
                }
                _ => {}
            }
        }
        pax.xattrs.sort();
        if let Some(real_size) = real_size {
            pax.sparse = Some(PaxSparse {
                name,
                real_size,
                map_in_data: major == Some(1),
                map,
            });
        }
        Ok(pax)
    }
}

/// Sets xattr `name` to `value` in `xattrs`, replacing an earlier value.
fn set_xattr_value(xattrs: &mut Xattrs, name: CString, value: Vec<u8>) {
    xattrs.retain(|(n, _)| *n != name);
    xattrs.push((name, value));
}

/// A bsdtar `LIBARCHIVE.xattr.<name>` record: the name URL-encoded (`%XX`),
/// the value base64.
fn libarchive_xattr(encoded: &[u8], value: &[u8]) -> Result<(CString, Vec<u8>)> {
    use base64::Engine;
    let mut name = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        if encoded[i] == b'%' {
            let hex = encoded
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    anyhow!(
                        "bad %-escape in the xattr name of LIBARCHIVE.xattr.{}",
                        String::from_utf8_lossy(encoded)
                    )
                })?;
            name.push(hex);
            i += 3;
        } else {
            name.push(encoded[i]);
            i += 1;
        }
    }
    let shown = String::from_utf8_lossy(&name).into_owned();
    let name = CString::new(name).map_err(|_| anyhow!("xattr name {shown:?} with a NUL"))?;
    let trimmed: Vec<u8> = value
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .collect();
    let value = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(&trimmed)
        .map_err(|e| anyhow!("the value of xattr {shown:?} is not base64: {e}"))?;
    Ok((name, value))
}

/// Users or groups, for ACL entries given by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum IdKind {
    User,
    Group,
}

impl IdKind {
    fn word(self) -> &'static str {
        match self {
            IdKind::User => "user",
            IdKind::Group => "group",
        }
    }
}

/// POSIX ACL tags of the kernel's binary format (`linux/posix_acl_xattr.h`).
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
/// The version of the binary format.
const ACL_XATTR_VERSION: u32 = 2;

/// Converts a text ACL, as GNU tar (`user::rw-\nuser:alice:r--\n...`, one
/// entry a line, `#` comments) or star and bsdtar (`user::rw-,user:alice:r--:1001,...`,
/// comma-separated, the id as a fourth field) store it, into the value of a
/// `system.posix_acl_*` xattr: version 2, then (tag, perm, id) entries
/// sorted as the kernel requires. `id_of` resolves names that are not
/// numbers (and carry no id field).
fn acl_from_text(
    text: &[u8],
    mut id_of: impl FnMut(IdKind, &str) -> Result<u32>,
) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(text).map_err(|_| anyhow!("the ACL text is not UTF-8"))?;
    let mut entries: Vec<(u16, u16, u32)> = Vec::new();
    for raw in text.split(['\n', ',']) {
        let entry = raw.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let bad = |why: &str| anyhow!("bad ACL entry {entry:?}: {why}");
        let f: Vec<&str> = entry.split(':').map(str::trim).collect();
        if f.len() < 3 || f.len() > 4 {
            return Err(bad("want tag:qualifier:permissions"));
        }
        let (tag_word, qualifier, perms) = (f[0], f[1], f[2]);
        let named = !qualifier.is_empty();
        let (tag, kind) = match (tag_word, named) {
            ("user" | "u", false) => (ACL_USER_OBJ, None),
            ("user" | "u", true) => (ACL_USER, Some(IdKind::User)),
            ("group" | "g", false) => (ACL_GROUP_OBJ, None),
            ("group" | "g", true) => (ACL_GROUP, Some(IdKind::Group)),
            ("mask" | "m", false) => (ACL_MASK, None),
            ("other" | "o", false) => (ACL_OTHER, None),
            _ => return Err(bad("unknown tag, or a qualifier where none belongs")),
        };
        let mut perm = 0u16;
        for c in perms.chars() {
            perm |= match c {
                'r' => 4,
                'w' => 2,
                'x' => 1,
                '-' => 0,
                _ => return Err(bad("permissions are r, w, x or -")),
            };
        }
        let id = match kind {
            None => u32::MAX,
            Some(kind) => match (f.get(3), qualifier.parse::<u32>()) {
                (Some(id), _) => id.parse().map_err(|_| bad("the id is not a number"))?,
                (None, Ok(id)) => id,
                (None, Err(_)) => id_of(kind, qualifier)?,
            },
        };
        if entries.iter().any(|(t, _, i)| *t == tag && *i == id) {
            return Err(bad("given twice"));
        }
        entries.push((tag, perm, id));
    }
    for required in [ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER] {
        if !entries.iter().any(|(t, _, _)| *t == required) {
            return Err(anyhow!(
                "the ACL {text:?} lacks its user::, group:: or other:: entry"
            ));
        }
    }
    let named = entries
        .iter()
        .any(|(t, _, _)| matches!(*t, ACL_USER | ACL_GROUP));
    if named && !entries.iter().any(|(t, _, _)| *t == ACL_MASK) {
        return Err(anyhow!(
            "the ACL {text:?} has named entries but no mask:: entry"
        ));
    }
    entries.sort_by_key(|(t, _, id)| (*t, *id));
    let mut v = ACL_XATTR_VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    Ok(v)
}

fn parse_u64(v: &[u8]) -> Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "bad number {:?} in a PAX header",
                String::from_utf8_lossy(v)
            )
        })
}

/// Parses a PAX time: `[-]seconds[.fraction]`.
fn parse_time(v: &[u8]) -> Result<Time> {
    let s = std::str::from_utf8(v)
        .map_err(|_| anyhow!("bad time in a PAX header"))?
        .trim();
    let bad = || anyhow!("bad time {s:?} in a PAX header");
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    let mut nsec: i64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        let d = c.to_digit(10).ok_or_else(bad)? as i64;
        nsec += d * 10i64.pow(8 - i as u32);
    }
    Ok(if neg && nsec > 0 {
        Time {
            sec: -secs - 1,
            nsec: 1_000_000_000 - nsec,
        }
    } else {
        Time {
            sec: if neg { -secs } else { secs },
            nsec,
        }
    })
}

/// Splits an archive path into its components, refusing absolute paths and
/// `..`; `.` and empty components are dropped (so `./` is the root).
/// What a top-level entry of a rootfs is, for [`check_top_entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopKind {
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (regular file, device, ...).
    Other,
}

/// Refuses a rootfs whose `/etc` or a state directory (`/home`, `/var`, ...)
/// is not a real directory, the same way for a first deploy and an upgrade,
/// at planning: the /etc merge of every later upgrade and the `/state`
/// subvolumes need real directories there, and a disk must never be left
/// in a shape it cannot be upgraded from.
pub fn check_top_entry(name: &str, kind: TopKind) -> Result<()> {
    let what = if name == "etc" {
        "/etc must be a real directory (the /etc merge of every later upgrade works on it); \
         make it one, e.g. move usr/etc to etc in the rootfs"
    } else if crate::store::layout::STATE_DIRS.contains(&name) {
        "state directories (/home /root /opt /srv /var) must be real directories: they become \
         the shared /state subvolumes; make it a directory in the rootfs"
    } else {
        return Ok(());
    };
    match kind {
        TopKind::Dir => Ok(()),
        TopKind::Symlink => bail!("the rootfs's /{name} is a symlink: {what}"),
        TopKind::Other => bail!("the rootfs's /{name} is not a directory: {what}"),
    }
}

fn components<'p>(raw: &'p [u8], what: &str) -> Result<Vec<&'p [u8]>> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.first() == Some(&b'/') {
        bail!(
            "archive {what} {:?} is an absolute path: refusing to write outside the target",
            shown()
        );
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => bail!(
                "archive {what} {:?} contains `..`: refusing to write outside the target",
                shown()
            ),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn cstring(b: &[u8]) -> Result<CString> {
    CString::new(b).map_err(|_| anyhow!("path with a NUL byte in the archive"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `openat` returning an owned file.
fn openat(dir: RawFd, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    // SAFETY: valid fd and NUL-terminated name; the returned fd is owned by the File.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`, `None` when it does not exist.
fn stat_at(dir: RawFd, name: &CStr) -> io::Result<Option<Meta>> {
    // SAFETY: stat is plain old data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, writable stat buffer.
    match check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(meta_of_stat(&st))),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn meta_of_stat(st: &libc::stat) -> Meta {
    Meta {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: Time {
            sec: st.st_atime,
            nsec: st.st_atime_nsec,
        },
        mtime: Time {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec,
        },
        rdev: st.st_rdev,
        dev: st.st_dev,
        ino: st.st_ino,
        nlink: st.st_nlink,
    }
}

/// A directory whose metadata is applied once everything is extracted.
struct PendingDir {
    comps: Vec<Vec<u8>>,
    meta: Meta,
    xattrs: Xattrs,
}

struct Extractor<'a> {
    root: File,
    dst: &'a Path,
    /// Recently used parent directories: (components joined by '/', O_PATH fd).
    parents: Vec<(Vec<u8>, File)>,
    dirs: Vec<PendingDir>,
    stats: CopyStats,
    progress: Option<&'a Progress>,
    buf: Vec<u8>,
    /// Users and groups of the tree, by name (for ACLs given as text).
    ids: std::collections::HashMap<(IdKind, String), u32>,
}

impl Extractor<'_> {
    fn full_path(&self, comps: &[&[u8]]) -> PathBuf {
        let mut p = self.dst.to_path_buf();
        for c in comps {
            p.push(OsStr::from_bytes(c));
        }
        p
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
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
    fn acls_to_xattrs(&mut self, pax: &mut Pax, t: tar::EntryType) -> Result<()> {
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
    fn id_of(&mut self, kind: IdKind, name: &str) -> Result<u32> {
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
    fn entry_meta<R: Read>(&self, entry: &tar::Entry<'_, R>, pax: &Pax) -> Result<Meta> {
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

    fn create<R: Read>(
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
    fn apply_path_meta(
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
    fn make_room(
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
    fn forget_parents(&mut self, comps: &[&[u8]]) {
        let key = comps.join(&b'/');
        self.parents.retain(|(k, _)| {
            !(k.starts_with(&key) && (k.len() == key.len() || k[key.len()] == b'/'))
        });
    }

    /// An O_PATH descriptor of the directory `comps` (relative to the root),
    /// walked without following symlinks; missing directories are created.
    fn parent(&mut self, comps: &[&[u8]]) -> Result<RawFd> {
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
    fn walk_one(&self, at: RawFd, name: &[u8], so_far: &[&[u8]]) -> Result<File> {
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

    fn hard_link<R: Read>(
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

    fn regular<R: Read>(
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
    fn write_segments<R: Read>(
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
    fn write_dense<R: Read>(
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
    fn finish_dirs(&mut self) -> Result<()> {
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
fn read_sparse_map<R: Read>(entry: &mut R) -> Result<Vec<(u64, u64)>> {
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
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
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
fn write_sparse(f: &File, data: &[u8], off: u64) -> io::Result<()> {
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

fn is_zero_block(b: &[u8]) -> bool {
    b.len() == HOLE_BLOCK && b.iter().all(|x| *x == 0)
}

#[cfg(test)]
mod tests {
    //! Archives are made with GNU tar (as root: owners, devices, trusted xattrs).

    use super::*;
    use crate::tree::copy::testing::{assert_trees_equal, make_test_tree, pseudo_random};
    use crate::tree::copy::NoSpaceError;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    /// A source tree like a rootfs, without the socket (tar cannot store one).
    fn source(t: &tempfile::TempDir) -> PathBuf {
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        make_test_tree(&src).unwrap();
        let run = src.join("run");
        let m = std::fs::symlink_metadata(&run).unwrap();
        std::fs::remove_file(run.join("socket")).unwrap();
        crate::tree::copy::testing::set_times(
            &run,
            (m.atime(), m.atime_nsec()),
            (m.mtime(), m.mtime_nsec()),
        )
        .unwrap();
        src
    }

    /// `tar --xattrs --xattrs-include='*' --numeric-owner -cpf ARCHIVE EXTRA -C SRC .`
    fn tar_c(src: &Path, archive: &Path, extra: &[&str]) {
        let out = Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-cpf"])
            .arg(archive)
            .args(extra)
            .arg("-C")
            .arg(src)
            .arg(".")
            .output()
            .expect("running tar");
        assert!(
            out.status.success(),
            "tar failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn new_dir(t: &tempfile::TempDir, name: &str) -> PathBuf {
        let d = t.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    }

    fn ino(p: &Path) -> u64 {
        std::fs::symlink_metadata(p).unwrap().ino()
    }

    fn check_variant(name: &str, flags: &[&str]) {
        let t = tempfile::tempdir().unwrap();
        let src = source(&t);
        let archive = t.path().join(name);
        tar_c(&src, &archive, flags);
        assert!(is_tarball(&archive), "{name} not recognised");
        let dst = new_dir(&t, "dst");
        let progress = Progress::default();
        let stats = extract(&archive, &dst, Some(&progress)).unwrap();
        assert_trees_equal(&src, &dst);
        // 15 regular files, 3 more names of hard-linked ones, 3 devices + a FIFO, 5 symlinks.
        assert_eq!(stats.files, 15, "{name}: {stats:?}");
        assert_eq!(stats.hardlinks, 3, "{name}: {stats:?}");
        assert_eq!(stats.specials, 3, "{name}: {stats:?}");
        assert_eq!(stats.symlinks, 5, "{name}: {stats:?}");
        assert_eq!(stats.dirs, 24, "{name}: {stats:?}");
        assert_eq!(progress.bytes.load(Ordering::Relaxed), stats.bytes);
        assert_eq!(
            progress.entries.load(Ordering::Relaxed),
            15 + 3 + 3 + 5 + 24 + 1
        );
        assert_eq!(
            ino(&dst.join("usr/bin/perl")),
            ino(&dst.join("usr/share/doc/perl-copy"))
        );
        let su = std::fs::metadata(dst.join("usr/bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755);
        // Runs of zeros become holes.
        let sparse = std::fs::metadata(dst.join("var/sparse.img")).unwrap();
        assert_eq!(sparse.len(), 16 << 20);
        assert!(sparse.blocks() * 512 < 1 << 20, "{name}: not sparse");
    }

    #[test]
    fn extracts_plain_tar_with_everything_preserved() {
        check_variant("rootfs.tar", &[]);
    }

    #[test]
    fn extracts_gzip() {
        check_variant("rootfs.tar.gz", &["-z"]);
    }

    #[test]
    fn extracts_zstd() {
        check_variant("rootfs.tar.zst", &["--zstd"]);
    }

    #[test]
    fn extracts_xz() {
        check_variant("rootfs.tar.xz", &["-J"]);
    }

    #[test]
    fn extracts_pax_sparse_files() {
        let t = tempfile::tempdir().unwrap();
        let src = source(&t);
        // Data after a hole, a hole at the start, and a file that ends in data.
        let f = std::fs::File::create(src.join("var/holes")).unwrap();
        f.write_all_at(&pseudo_random(10_000, 3), 5 << 20).unwrap();
        f.write_all_at(b"end", (9 << 20) - 3).unwrap();
        drop(f);
        crate::tree::copy::testing::set_times(&src.join("var/holes"), (1, 0), (2, 3)).unwrap();
        let var = std::fs::symlink_metadata(src.join("var")).unwrap();
        crate::tree::copy::testing::set_times(&src.join("var"), (1, 0), (var.mtime(), 0)).unwrap();
        let archive = t.path().join("sparse.tar");
        tar_c(&src, &archive, &["-S"]);
        let dst = new_dir(&t, "dst");
        extract(&archive, &dst, None).unwrap();
        assert_trees_equal(&src, &dst);
        let holes = std::fs::metadata(dst.join("var/holes")).unwrap();
        assert_eq!(holes.len(), 9 << 20);
        assert!(holes.blocks() * 512 < 1 << 20);
    }

    #[test]
    fn content_size_counts_file_blocks_once() {
        let t = tempfile::tempdir().unwrap();
        let src = source(&t);
        let mut expected = 0u64;
        let mut seen = std::collections::HashSet::new();
        let out = Command::new("find")
            .arg(&src)
            .args(["-type", "f", "-printf", "%i %s\\n"])
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let (inode, size) = line.split_once(' ').unwrap();
            if seen.insert(inode.to_string()) {
                expected += size.parse::<u64>().unwrap().div_ceil(4096) * 4096;
            }
        }
        for (name, flags) in [("a.tar", &[][..]), ("a.tar.zst", &["--zstd"][..])] {
            let archive = t.path().join(name);
            tar_c(&src, &archive, flags);
            assert_eq!(content_size(&archive).unwrap(), expected, "{name}");
        }
        // Escaping paths are refused at planning time already.
        let work = new_dir(&t, "work");
        std::fs::create_dir(work.join("sub")).unwrap();
        std::fs::write(work.join("escape"), b"evil").unwrap();
        let evil = t.path().join("evil.tar.gz");
        tar_in(
            &work.join("sub"),
            &["-P", "-czf", evil.to_str().unwrap(), "../escape"],
        );
        let err = content_size(&evil).unwrap_err();
        assert!(format!("{err:#}").contains("contains `..`"), "{err:#}");
    }

    #[test]
    fn recognises_archives_by_name_and_content() {
        let t = tempfile::tempdir().unwrap();
        let src = source(&t);
        let disguised = t.path().join("rootfs.img");
        tar_c(&src, &disguised, &["--zstd"]);
        assert!(is_tarball(&disguised));
        let plain = t.path().join("rootfs.bin");
        tar_c(&src, &plain, &[]);
        assert!(is_tarball(&plain));
        let other = t.path().join("notes.txt");
        std::fs::write(&other, b"hello").unwrap();
        assert!(!is_tarball(&other));
        let dir = new_dir(&t, "x.tar");
        assert!(!is_tarball(&dir));
        assert!(!is_tarball(&t.path().join("missing.tar")));
        let err = extract(&other, &new_dir(&t, "dst"), None).unwrap_err();
        assert!(
            format!("{err:#}").contains("is not a tar archive"),
            "{err:#}"
        );
    }

    /// Runs `tar ARGS` in `dir`, asserting success.
    fn tar_in(dir: &Path, args: &[&str]) {
        let out = Command::new("tar")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Extracts `archive` into a fresh `dst` beside a sibling `outside` dir;
    /// asserts the error mentions `needle` and nothing appeared in `outside`.
    fn assert_refused(t: &tempfile::TempDir, archive: &Path, needle: &str) {
        let base = new_dir(t, "target-base");
        let dst = base.join("dst");
        std::fs::create_dir(&dst).unwrap();
        let err = extract(archive, &dst, None).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(needle), "{msg}");
        let outside: Vec<_> = std::fs::read_dir(t.path().join("outside"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(outside.is_empty(), "written outside: {outside:?}");
        assert!(!base.join("escape").exists());
    }

    #[test]
    fn refuses_dotdot_entries() {
        let t = tempfile::tempdir().unwrap();
        new_dir(&t, "outside");
        let work = new_dir(&t, "work");
        std::fs::create_dir(work.join("sub")).unwrap();
        std::fs::write(work.join("escape"), b"evil").unwrap();
        let archive = t.path().join("evil.tar");
        // -P keeps the leading "../" that GNU tar would strip.
        tar_in(
            &work.join("sub"),
            &["-P", "-cf", archive.to_str().unwrap(), "../escape"],
        );
        assert_refused(&t, &archive, "contains `..`");
    }

    #[test]
    fn refuses_absolute_entries() {
        let t = tempfile::tempdir().unwrap();
        let outside = new_dir(&t, "outside");
        std::fs::write(outside.join("abs"), b"evil").unwrap();
        let archive = t.path().join("abs.tar");
        tar_in(
            t.path(),
            &[
                "-P",
                "-cf",
                archive.to_str().unwrap(),
                outside.join("abs").to_str().unwrap(),
            ],
        );
        std::fs::remove_file(outside.join("abs")).unwrap();
        assert_refused(&t, &archive, "is an absolute path");
    }

    #[test]
    fn refuses_to_write_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = new_dir(&t, "outside");
        // First member: link -> the outside directory; then link/file.
        let a = new_dir(&t, "a");
        std::os::unix::fs::symlink(&outside, a.join("link")).unwrap();
        let archive = t.path().join("through.tar");
        tar_in(&a, &["-cf", archive.to_str().unwrap(), "link"]);
        let b = new_dir(&t, "b");
        std::fs::create_dir(b.join("link")).unwrap();
        std::fs::write(b.join("link/file"), b"evil").unwrap();
        tar_in(&b, &["-rf", archive.to_str().unwrap(), "link/file"]);
        assert_refused(&t, &archive, "is a symlink: refusing to write through it");
    }

    #[test]
    fn refuses_hard_link_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = new_dir(&t, "outside");
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        let a = new_dir(&t, "a");
        std::os::unix::fs::symlink(&outside, a.join("link")).unwrap();
        let archive = t.path().join("hl.tar");
        tar_in(&a, &["-cf", archive.to_str().unwrap(), "link"]);
        // A hard link whose target is link/secret.
        let b = new_dir(&t, "b");
        std::fs::create_dir(b.join("link")).unwrap();
        std::fs::write(b.join("link/secret"), b"x").unwrap();
        std::fs::hard_link(b.join("link/secret"), b.join("grab")).unwrap();
        tar_in(
            &b,
            &["-rf", archive.to_str().unwrap(), "link/secret", "grab"],
        );
        // link/secret itself is refused first; the outside file stays untouched.
        let base = new_dir(&t, "target-base");
        let dst = base.join("dst");
        std::fs::create_dir(&dst).unwrap();
        let err = extract(&archive, &dst, None).unwrap_err();
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
        assert_eq!(
            std::fs::metadata(outside.join("secret")).unwrap().nlink(),
            1
        );
    }

    #[test]
    fn later_members_replace_earlier_ones() {
        let t = tempfile::tempdir().unwrap();
        let a = new_dir(&t, "a");
        std::fs::write(a.join("f"), b"old").unwrap();
        let archive = t.path().join("dup.tar");
        tar_in(&a, &["-cf", archive.to_str().unwrap(), "f"]);
        std::fs::remove_file(a.join("f")).unwrap();
        std::os::unix::fs::symlink("target", a.join("f")).unwrap();
        tar_in(&a, &["-rf", archive.to_str().unwrap(), "f"]);
        let dst = new_dir(&t, "dst");
        extract(&archive, &dst, None).unwrap();
        assert_eq!(
            std::fs::read_link(dst.join("f")).unwrap(),
            Path::new("target")
        );
    }

    #[test]
    fn refuses_a_non_empty_target() {
        let t = tempfile::tempdir().unwrap();
        let src = source(&t);
        let archive = t.path().join("a.tar");
        tar_c(&src, &archive, &[]);
        let dst = new_dir(&t, "dst");
        std::fs::write(dst.join("x"), b"x").unwrap();
        let err = extract(&archive, &dst, None).unwrap_err();
        assert!(format!("{err:#}").contains("is not empty"), "{err:#}");
    }

    #[test]
    fn full_target_is_a_no_space_error() {
        let t = tempfile::tempdir().unwrap();
        let a = new_dir(&t, "a");
        std::fs::write(a.join("big"), pseudo_random(4 << 20, 9)).unwrap();
        let archive = t.path().join("big.tar.zst");
        tar_c(&a, &archive, &["--zstd"]);
        let dst = new_dir(&t, "small");
        nix::mount::mount(
            Some("tmpfs"),
            &dst,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1M"),
        )
        .expect("mounting a tmpfs (run the tests as root)");
        let err = extract(&archive, &dst, None).unwrap_err();
        let _ = nix::mount::umount2(&dst, nix::mount::MntFlags::MNT_DETACH);
        let nospace = err.chain().find_map(|e| e.downcast_ref::<NoSpaceError>());
        assert!(nospace.is_some(), "{err:#}");
        assert!(format!("{err:#}").contains("no space left"), "{err:#}");
    }

    /// An archive (built with the tar crate's writer) of: a directory, then
    /// entries whose PAX records are given raw.
    fn raw_pax_archive(path: &Path, entries: &[(&str, tar::EntryType, &[u8], &[u8])]) {
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        for (name, kind, pax, data) in entries {
            if !pax.is_empty() {
                let mut h = tar::Header::new_ustar();
                h.set_path(format!("PaxHeaders/{name}")).unwrap();
                h.set_size(pax.len() as u64);
                h.set_entry_type(tar::EntryType::XHeader);
                h.set_cksum();
                b.append(&h, *pax).unwrap();
            }
            let mut h = tar::Header::new_ustar();
            h.set_path(name).unwrap();
            h.set_entry_type(*kind);
            // Group bits of a file with an ACL are its mask (rw- below).
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o664 });
            h.set_mtime(1_600_000_000);
            h.set_uid(0);
            h.set_gid(0);
            if kind.is_symlink() {
                h.set_link_name("harmless").unwrap();
                h.set_size(0);
            } else {
                h.set_size(data.len() as u64);
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.finish().unwrap();
    }

    /// One PAX record: `<length> <key>=<value>\n`, the length counting itself.
    fn record(key: &str, value: &[u8]) -> Vec<u8> {
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len += 1;
        }
        let mut v = format!("{len} {key}=").into_bytes();
        v.extend_from_slice(value);
        v.push(b'\n');
        v
    }

    #[test]
    fn pax_records_are_parsed_by_length() {
        let t = tempfile::tempdir().unwrap();
        let archive = t.path().join("a.tar");
        let acl_text =
            b"user::rw-\nuser:1234:r--\ngroup::r--\ngroup:4321:rw-\nmask::rw-\nother::r--\n";
        let mut file_pax = record("SCHILY.acl.access", acl_text);
        file_pax.extend(record("SCHILY.xattr.user.multi", b"line 1\nline 2\n"));
        file_pax.extend(record("SCHILY.xattr.user.bin", &[1, 10, 10, 0, 255]));
        file_pax.extend(record("LIBARCHIVE.xattr.user.b%41se", b"YQpi"));
        // A value whose tail looks like a record: it must stay part of the
        // value, never become the entry's link target.
        let mut link_pax = record("SCHILY.xattr.trusted.trap", b"x\n22 linkpath=/etc/evil\n");
        link_pax.extend(record("mtime", b"1600000001.5"));
        let dir_acl = b"user::rwx\ngroup::r-x\nother::r-x\n";
        let mut dir_pax = record("SCHILY.acl.access", dir_acl);
        dir_pax.extend(record(
            "SCHILY.acl.default",
            b"user::rwx,user:1234:r-x,group::r-x,mask::r-x,other::---",
        ));
        raw_pax_archive(
            &archive,
            &[
                ("d", tar::EntryType::Directory, &dir_pax, b""),
                ("d/f", tar::EntryType::Regular, &file_pax, b"data"),
                ("link", tar::EntryType::Symlink, &link_pax, b""),
            ],
        );
        let dst = new_dir(&t, "dst");
        extract(&archive, &dst, None).unwrap();
        let get = |rel: &str, name: &str| {
            sys::read_xattrs(Target::path(&dst.join(rel), Kind::File))
                .unwrap()
                .into_iter()
                .find(|(n, _)| n.as_bytes() == name.as_bytes())
                .map(|(_, v)| v)
        };
        use crate::tree::copy::testing as tt;
        assert_eq!(
            get("d/f", "system.posix_acl_access").unwrap(),
            tt::posix_acl(&[
                (tt::ACL_USER_OBJ, 6, 0),
                (tt::ACL_USER, 4, 1234),
                (tt::ACL_GROUP_OBJ, 4, 0),
                (tt::ACL_GROUP, 6, 4321),
                (tt::ACL_MASK, 6, 0),
                (tt::ACL_OTHER, 4, 0),
            ])
        );
        assert_eq!(get("d/f", "user.multi").unwrap(), b"line 1\nline 2\n");
        assert_eq!(get("d/f", "user.bin").unwrap(), [1, 10, 10, 0, 255]);
        assert_eq!(get("d/f", "user.bAse").unwrap(), b"a\nb");
        assert_eq!(
            get("d", "system.posix_acl_default").unwrap(),
            tt::posix_acl(&[
                (tt::ACL_USER_OBJ, 7, 0),
                (tt::ACL_USER, 5, 1234),
                (tt::ACL_GROUP_OBJ, 5, 0),
                (tt::ACL_MASK, 5, 0),
                (tt::ACL_OTHER, 0, 0),
            ])
        );
        assert_eq!(std::fs::read(dst.join("d/f")).unwrap(), b"data");
        assert_eq!(
            std::fs::read_link(dst.join("link")).unwrap(),
            Path::new("harmless")
        );
        assert_eq!(
            get("link", "trusted.trap").unwrap(),
            b"x\n22 linkpath=/etc/evil\n"
        );
        let m = std::fs::symlink_metadata(dst.join("link")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_001, 500_000_000));
    }

    #[test]
    fn malformed_pax_records_are_refused_naming_the_entry() {
        let t = tempfile::tempdir().unwrap();
        for (what, pax) in [
            ("length beyond the header", b"99 user.x=1\n".to_vec()),
            ("length not a number", b"1x path=a\n".to_vec()),
            ("no newline at the end", b"11 mtime=12x".to_vec()),
            ("no = sign", b"9 mtime1\n".to_vec()),
            (
                "a bad ACL",
                record("SCHILY.acl.access", b"user::rw-\nfriend:x:r--\n"),
            ),
            (
                "an ACL without other::",
                record("SCHILY.acl.access", b"user::rw-\ngroup::r--\n"),
            ),
            (
                "a bad base64 value",
                record("LIBARCHIVE.xattr.user.x", b"!!!"),
            ),
        ] {
            let archive = t.path().join("bad.tar");
            raw_pax_archive(
                &archive,
                &[
                    ("etc", tar::EntryType::Directory, b"", b""),
                    ("etc/victim.conf", tar::EntryType::Regular, &pax, b"data"),
                ],
            );
            let dst = t.path().join("dst");
            let _ = std::fs::remove_dir_all(&dst);
            std::fs::create_dir(&dst).unwrap();
            let err = format!("{:#}", extract(&archive, &dst, None).unwrap_err());
            assert!(err.contains("etc/victim.conf"), "{what}: {err}");
            assert!(!dst.join("etc/victim.conf").exists(), "{what}");
        }
    }

    #[test]
    fn acl_text_forms_and_names() {
        let users = |kind: IdKind, name: &str| match (kind, name) {
            (IdKind::User, "alice") => Ok(1001),
            (IdKind::Group, "staff") => Ok(50),
            _ => Err(anyhow!("unknown {name}")),
        };
        use crate::tree::copy::testing as tt;
        let want = tt::posix_acl(&[
            (tt::ACL_USER_OBJ, 6, 0),
            (tt::ACL_USER, 4, 1001),
            (tt::ACL_GROUP_OBJ, 4, 0),
            (tt::ACL_GROUP, 7, 50),
            (tt::ACL_MASK, 7, 0),
            (tt::ACL_OTHER, 0, 0),
        ]);
        for text in [
            // GNU tar: one a line, names, effective-rights comments.
            "user::rw-\nuser:alice:r--\ngroup::r--\ngroup:staff:rwx\t#effective:rwx\nmask::rwx\nother::---\n",
            // star / bsdtar: comma-separated, the id as a fourth field.
            "user::rw-,user:alice:r--:1001,group::r--,group:staff:rwx:50,mask::rwx,other::---",
            // Abbreviated, numeric, out of order.
            "o::-,m::rwx,g:50:rwx,g::r,u:1001:r,u::rw",
        ] {
            assert_eq!(acl_from_text(text.as_bytes(), users).unwrap(), want, "{text}");
        }
        for (text, needle) in [
            (
                "user::rw-\nuser:bob:r--\ngroup::r--\nmask::r--\nother::r--",
                "unknown bob",
            ),
            ("user::rw-\ngroup::r--\nother::rwz", "permissions"),
            ("user::rw-\nuser:1:r--\ngroup::r--\nother::r--", "no mask"),
            ("user::rw-\nother::r--", "lacks"),
            (
                "user::rw-\nuser::r--\ngroup::r--\nother::r--",
                "given twice",
            ),
            ("mask:x:rw-", "unknown tag"),
        ] {
            let err = format!("{:#}", acl_from_text(text.as_bytes(), users).unwrap_err());
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    /// A tree with ACLs (access and default, set by `setfacl`) and user
    /// xattrs (set by `setfattr`, one holding newlines), archived by GNU tar
    /// with `--acls` (text ACLs only) and `--acls --xattrs` (text and
    /// binary): extracted, `getfacl` shows the same ACLs as the source.
    #[test]
    fn gnu_tar_acls_and_xattrs_are_applied() {
        let t = tempfile::tempdir().unwrap();
        let src = new_dir(&t, "src");
        let sh = |script: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(&src)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        sh(
            "mkdir -p etc shared/sub && echo f > file && echo g > shared/sub/g \
            && printf 'root:x:0:0::/root:/bin/sh\\n' > etc/passwd \
            && setfacl -m u:1234:r,g:4321:rw,u:1000:rw file \
            && setfacl -m u:1234:rwx shared && setfacl -d -m u:1234:rx,g:4321:r,o::- shared \
            && setfacl -m u:1234:r shared/sub/g \
            && setfattr -n user.note -v \"$(printf 'two\\nlines')\" file \
            && setfattr -n user.bin -v 0x010a0a00 shared",
        );
        let acls = |dir: &Path| {
            let out = Command::new("getfacl")
                .args(["-R", "-n", "-p", "."])
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(out.status.success());
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let want = acls(&src);
        assert!(
            want.contains("user:1234:rwx") && want.contains("default:user:1234:r-x"),
            "{want}"
        );
        for (name, flags) in [
            ("text.tar", &["--acls"][..]),
            (
                "both.tar",
                &["--acls", "--xattrs", "--xattrs-include=*"][..],
            ),
        ] {
            let archive = t.path().join(name);
            let out = Command::new("tar")
                .args(["--numeric-owner", "-cpf"])
                .arg(&archive)
                .args(flags)
                .arg("-C")
                .arg(&src)
                .arg(".")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dst = new_dir(&t, &format!("dst-{name}"));
            extract(&archive, &dst, None).unwrap();
            assert_eq!(acls(&dst), want, "{name}");
            if name == "both.tar" {
                assert_eq!(
                    sys::read_xattrs(Target::path(&dst.join("file"), Kind::File))
                        .unwrap()
                        .into_iter()
                        .find(|(n, _)| n.as_bytes() == b"user.note")
                        .map(|(_, v)| v),
                    Some(b"two\nlines".to_vec())
                );
            }
        }
    }

    #[test]
    fn parses_pax_times() {
        let t = parse_time(b"1600000000.123456789").unwrap();
        assert_eq!((t.sec, t.nsec), (1_600_000_000, 123_456_789));
        let t = parse_time(b"12.5").unwrap();
        assert_eq!((t.sec, t.nsec), (12, 500_000_000));
        let t = parse_time(b"-1.25").unwrap();
        assert_eq!((t.sec, t.nsec), (-2, 750_000_000));
        assert!(parse_time(b"x").is_err());
    }
}
