//! PAX extended headers of an entry: times, sizes, owners, xattrs
//! (SCHILY and LIBARCHIVE), POSIX ACLs given as text, sparse maps.

#[allow(unused_imports)]
use super::*;
use crate::tree::copy::sys::{Time, Xattrs};
use anyhow::{anyhow, bail, Result};
use std::ffi::CString;
use std::io::Read;

/// The PAX extended header fields of one entry that matter here.
#[derive(Default)]
pub(super) struct Pax {
    pub(super) mtime: Option<Time>,
    pub(super) atime: Option<Time>,
    pub(super) xattrs: Xattrs,
    pub(super) sparse: Option<PaxSparse>,
    /// POSIX ACLs as text (`SCHILY.acl.access`, `SCHILY.acl.default`: GNU
    /// tar's and star's `--acls`), applied as `system.posix_acl_*` xattrs
    /// unless the archive also holds those xattrs (GNU tar `--acls --xattrs`
    /// stores both; the binary xattr is exact, numeric ids).
    pub(super) acl_access: Option<Vec<u8>>,
    pub(super) acl_default: Option<Vec<u8>>,
}

/// Xattr names of POSIX ACLs (the kernel's binary format).
pub(super) const ACL_ACCESS_XATTR: &str = "system.posix_acl_access";
pub(super) const ACL_DEFAULT_XATTR: &str = "system.posix_acl_default";

/// A file stored in one of the PAX sparse formats (GNU tar `-S --format=posix`).
pub(super) struct PaxSparse {
    /// The file's real path (the entry's own path is a placeholder).
    pub(super) name: Option<Vec<u8>>,
    pub(super) real_size: u64,
    /// Format 1.0 stores the map at the start of the data; 0.x in the header.
    pub(super) map_in_data: bool,
    /// `(offset, length)` of the data segments (0.x formats).
    pub(super) map: Vec<(u64, u64)>,
}

impl Pax {
    pub(super) fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Pax> {
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
pub(super) fn set_xattr_value(xattrs: &mut Xattrs, name: CString, value: Vec<u8>) {
    xattrs.retain(|(n, _)| *n != name);
    xattrs.push((name, value));
}

/// A bsdtar `LIBARCHIVE.xattr.<name>` record: the name URL-encoded (`%XX`),
/// the value base64.
pub(super) fn libarchive_xattr(encoded: &[u8], value: &[u8]) -> Result<(CString, Vec<u8>)> {
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
pub(super) enum IdKind {
    User,
    Group,
}

impl IdKind {
    pub(super) fn word(self) -> &'static str {
        match self {
            IdKind::User => "user",
            IdKind::Group => "group",
        }
    }
}

/// POSIX ACL tags of the kernel's binary format (`linux/posix_acl_xattr.h`).
pub(super) const ACL_USER_OBJ: u16 = 0x01;
pub(super) const ACL_USER: u16 = 0x02;
pub(super) const ACL_GROUP_OBJ: u16 = 0x04;
pub(super) const ACL_GROUP: u16 = 0x08;
pub(super) const ACL_MASK: u16 = 0x10;
pub(super) const ACL_OTHER: u16 = 0x20;
/// The version of the binary format.
pub(super) const ACL_XATTR_VERSION: u32 = 2;

/// Converts a text ACL, as GNU tar (`user::rw-\nuser:alice:r--\n...`, one
/// entry a line, `#` comments) or star and bsdtar (`user::rw-,user:alice:r--:1001,...`,
/// comma-separated, the id as a fourth field) store it, into the value of a
/// `system.posix_acl_*` xattr: version 2, then (tag, perm, id) entries
/// sorted as the kernel requires. `id_of` resolves names that are not
/// numbers (and carry no id field).
pub(super) fn acl_from_text(
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

pub(super) fn parse_u64(v: &[u8]) -> Result<u64> {
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
pub(super) fn parse_time(v: &[u8]) -> Result<Time> {
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
