//! Entry-by-entry three-way merge of the NSS databases in `/etc`
//! (`passwd`, `group`, `shadow`, `gshadow`, `subuid`, `subgid`), used by the
//! `/etc` merge ([`crate::tree::etcmerge`]) when both the device and the new
//! version changed one of them. A text merge would make a user added on the
//! device and a system user added by the new version a conflict; by entry:
//!
//! - entries are matched by name (`subuid`/`subgid`: by whole line, a user
//!   may own several ranges);
//! - an entry only one side added, changed or deleted takes that side's state;
//! - an entry both sides changed is merged field by field: a field only one
//!   side changed takes that side's value, a field both changed differently
//!   keeps the device's value (a password hash set on the device survives)
//!   and is reported;
//! - group member lists (`group` field 4, `gshadow` fields 3 and 4) are
//!   merged as sets: members either side added are in, members either side
//!   removed are out;
//! - an entry the new version adds whose uid (`passwd`) or gid (`group`) is
//!   already used by an entry the device added or changed is not added (and
//!   neither is its `shadow`/`gshadow` line): it is reported, never
//!   renumbered. Overlapping `subuid`/`subgid` ranges added on both sides
//!   are reported.
//!
//! Entries of the new version keep its order; entries only the device has
//! follow them in the device's order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Which database a file is (its name directly under `/etc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Db {
    Passwd,
    Group,
    Shadow,
    Gshadow,
    /// `subuid` or `subgid`: `name:start:count`, several lines per name.
    Subid,
}

impl Db {
    /// The database at `rel` (relative to `/etc`), if it is one.
    pub(crate) fn of(rel: &Path) -> Option<Db> {
        Some(match rel.to_str()? {
            "passwd" => Db::Passwd,
            "group" => Db::Group,
            "shadow" => Db::Shadow,
            "gshadow" => Db::Gshadow,
            "subuid" | "subgid" => Db::Subid,
            _ => return None,
        })
    }

    /// Index of the numeric id field that must stay unique.
    fn id_field(self) -> Option<usize> {
        match self {
            Db::Passwd | Db::Group => Some(2),
            _ => None,
        }
    }

    /// Fields holding comma-separated member lists.
    fn is_member_list(self, field: usize) -> bool {
        matches!(
            (self, field),
            (Db::Group, 3) | (Db::Gshadow, 2) | (Db::Gshadow, 3)
        )
    }

    fn field_name(self, i: usize) -> String {
        let names: &[&str] = match self {
            Db::Passwd => &["name", "password", "uid", "gid", "comment", "home", "shell"],
            Db::Group => &["name", "password", "gid", "members"],
            Db::Shadow => &[
                "name",
                "password hash",
                "last change",
                "min age",
                "max age",
                "warning",
                "inactivity",
                "expiry",
                "reserved",
            ],
            Db::Gshadow => &["name", "password hash", "administrators", "members"],
            Db::Subid => &["name", "start", "count"],
        };
        names
            .get(i)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("field {}", i + 1))
    }

    /// The database whose dropped names also drop lines here.
    pub(crate) fn follows(self) -> Option<Db> {
        match self {
            Db::Shadow => Some(Db::Passwd),
            Db::Gshadow => Some(Db::Group),
            _ => None,
        }
    }
}

/// What [`merge`] produced.
#[derive(Debug, Default)]
pub(crate) struct NssMerge {
    /// The merged file.
    pub data: Vec<u8>,
    /// Conflicts, resolved as described in the module documentation.
    pub notes: Vec<String>,
    /// Names of entries the new version added that were left out (id collision).
    pub dropped: BTreeSet<String>,
}

/// One parsed file: keys in file order and key → fields.
struct Parsed {
    order: Vec<String>,
    entries: BTreeMap<String, Vec<Vec<u8>>>,
    trailing_newline: bool,
}

fn parse(db: Db, data: &[u8]) -> Parsed {
    let mut p = Parsed {
        order: Vec::new(),
        entries: BTreeMap::new(),
        trailing_newline: data.is_empty() || data.ends_with(b"\n"),
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for line in data.split(|&c| c == b'\n') {
        if line.is_empty() {
            continue;
        }
        let structured = db != Db::Subid && line.contains(&b':') && line[0] != b'#';
        let base_key = if structured {
            let name = line.split(|&c| c == b':').next().unwrap_or_default();
            format!("e:{}", String::from_utf8_lossy(name))
        } else {
            // Comments, odd lines and sub-id ranges: matched as whole lines.
            format!("l:{}", String::from_utf8_lossy(line))
        };
        let n = seen.entry(base_key.clone()).or_insert(0);
        let key = if *n == 0 {
            base_key
        } else {
            format!("{base_key}\u{0}{n}")
        };
        *n += 1;
        let fields = if structured {
            line.split(|&c| c == b':').map(<[u8]>::to_vec).collect()
        } else {
            vec![line.to_vec()]
        };
        p.order.push(key.clone());
        p.entries.insert(key, fields);
    }
    p
}

fn display_key(key: &str) -> String {
    let k = key.split('\u{0}').next().unwrap_or(key);
    k.get(2..).unwrap_or(k).to_string()
}

/// Three-way merge of set-like comma lists.
fn merge_members(b: Option<&[u8]>, l: &[u8], v: &[u8]) -> Vec<u8> {
    let split = |s: &[u8]| -> Vec<Vec<u8>> {
        s.split(|&c| c == b',')
            .filter(|x| !x.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    let bs: BTreeSet<Vec<u8>> = b.map(split).unwrap_or_default().into_iter().collect();
    let (lv, vv) = (split(l), split(v));
    let ls: BTreeSet<&Vec<u8>> = lv.iter().collect();
    let vs: BTreeSet<&Vec<u8>> = vv.iter().collect();
    let mut out: Vec<&Vec<u8>> = Vec::new();
    for m in vv.iter().chain(lv.iter()) {
        let keep = (ls.contains(m) && vs.contains(m))
            || (ls.contains(m) && !bs.contains(m))
            || (vs.contains(m) && !bs.contains(m));
        if keep && !out.contains(&m) {
            out.push(m);
        }
    }
    out.iter()
        .map(|m| m.as_slice())
        .collect::<Vec<_>>()
        .join(&b","[..])
}

/// Field-by-field merge of an entry both sides changed.
fn merge_fields(
    db: Db,
    key: &str,
    b: Option<&Vec<Vec<u8>>>,
    l: &[Vec<u8>],
    v: &[Vec<u8>],
    notes: &mut Vec<String>,
) -> Vec<Vec<u8>> {
    let n = l.len().max(v.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let bf = b.and_then(|b| b.get(i));
        let (lf, vf) = (l.get(i), v.get(i));
        let chosen = if lf == vf || bf == lf {
            vf
        } else if bf == vf {
            lf
        } else if db.is_member_list(i) {
            let empty = Vec::new();
            out.push(merge_members(
                bf.map(Vec::as_slice),
                lf.unwrap_or(&empty),
                vf.unwrap_or(&empty),
            ));
            continue;
        } else {
            notes.push(format!(
                "{} of {} changed on the device and by the new version: kept the device's",
                db.field_name(i),
                display_key(key)
            ));
            lf
        };
        out.push(chosen.cloned().unwrap_or_default());
    }
    out
}

/// Where a merged entry's state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Both sides agree, or only the new version changed it.
    Vendor,
    /// Only the device changed it.
    Device,
    /// Both changed it: merged.
    Both,
}

/// Merges `local` (the device's file) and `vendor` (the new version's),
/// both derived from `base` (absent: empty). `drop_names`: names the merge
/// of the database this one follows left out (see [`Db::follows`]).
pub(crate) fn merge(
    db: Db,
    base: Option<&[u8]>,
    local: &[u8],
    vendor: &[u8],
    drop_names: &BTreeSet<String>,
) -> NssMerge {
    let b = parse(db, base.unwrap_or_default());
    let l = parse(db, local);
    let v = parse(db, vendor);
    let mut notes = Vec::new();
    let mut keys: Vec<&String> = v.order.iter().collect();
    keys.extend(l.order.iter().filter(|k| !v.entries.contains_key(*k)));
    let mut result: Vec<(String, Vec<Vec<u8>>, Source)> = Vec::new();
    for key in keys {
        let (be, le, ve) = (b.entries.get(key), l.entries.get(key), v.entries.get(key));
        let name = display_key(key);
        let (chosen, src) = if le == ve {
            (le.cloned(), Source::Vendor)
        } else if be == le {
            (ve.cloned(), Source::Vendor)
        } else if be == ve {
            (le.cloned(), Source::Device)
        } else {
            match (le, ve) {
                (Some(le), Some(ve)) => (
                    Some(merge_fields(db, key, be, le, ve, &mut notes)),
                    Source::Both,
                ),
                (None, Some(_)) => {
                    notes.push(format!(
                        "{name} was deleted on the device and changed by the new version: kept deleted"
                    ));
                    (None, Source::Device)
                }
                (Some(le), None) => {
                    notes.push(format!(
                        "{name} was changed on the device and deleted by the new version: kept the device's"
                    ));
                    (Some(le.clone()), Source::Device)
                }
                (None, None) => (None, Source::Vendor),
            }
        };
        if let Some(fields) = chosen {
            result.push((key.clone(), fields, src));
        }
    }

    let mut dropped = BTreeSet::new();
    if let Some(idf) = db.id_field() {
        // Ids of entries the device added or changed.
        let device_ids: BTreeMap<Vec<u8>, String> = result
            .iter()
            .filter(|(k, _, s)| *s != Source::Vendor && l.entries.contains_key(k))
            .filter_map(|(k, f, _)| f.get(idf).map(|id| (id.clone(), display_key(k))))
            .collect();
        result.retain(|(k, f, _)| {
            let vendor_changed = v.entries.get(k) != b.entries.get(k) && v.entries.contains_key(k);
            let Some(id) = f.get(idf) else { return true };
            match device_ids.get(id) {
                Some(owner) if vendor_changed && *owner != display_key(k) => {
                    let name = display_key(k);
                    let what = if db == Db::Passwd { "uid" } else { "gid" };
                    let id = String::from_utf8_lossy(id);
                    if l.entries.contains_key(k) {
                        notes.push(format!(
                            "{what} {id} of {name} (changed by the new version) is also {owner}'s on the device: both kept, fix one of them"
                        ));
                        true
                    } else {
                        notes.push(format!(
                            "{what} {id} of {name} (added by the new version) is already {owner}'s on the device: {name} not added; give it another {what} in the new version"
                        ));
                        dropped.insert(name);
                        false
                    }
                }
                _ => true,
            }
        });
    }
    if db.follows().is_some() && !drop_names.is_empty() {
        result.retain(|(k, _, _)| {
            !(k.starts_with("e:") && drop_names.contains(&display_key(k)))
                || l.entries.contains_key(k)
        });
    }
    if db == Db::Subid {
        subid_overlaps(&b, &l, &v, &mut notes);
    }

    let mut data = Vec::new();
    for (_, fields, _) in &result {
        data.extend(fields.join(&b":"[..]));
        data.push(b'\n');
    }
    if !(v.trailing_newline || l.trailing_newline) && data.ends_with(b"\n") {
        data.pop();
    }
    NssMerge {
        data,
        notes,
        dropped,
    }
}

/// Reports ranges added on the device that overlap ranges the new version added.
fn subid_overlaps(b: &Parsed, l: &Parsed, v: &Parsed, notes: &mut Vec<String>) {
    let range = |key: &str| -> Option<(String, u64, u64)> {
        let line = display_key(key);
        let mut it = line.split(':');
        let name = it.next()?.to_string();
        let start: u64 = it.next()?.parse().ok()?;
        let count: u64 = it.next()?.parse().ok()?;
        Some((name, start, start.saturating_add(count)))
    };
    let added = |side: &Parsed| -> Vec<(String, u64, u64)> {
        side.order
            .iter()
            .filter(|k| !b.entries.contains_key(*k))
            .filter_map(|k| range(k))
            .collect()
    };
    for (ln, ls, le) in added(l) {
        for (vn, vs, ve) in added(v) {
            if ls < ve && vs < le && ln != vn {
                notes.push(format!(
                    "range {ls}-{} of {ln} (added on the device) overlaps range {vs}-{} of {vn} (added by the new version): both kept, fix one of them",
                    le - 1,
                    ve - 1
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(db: Db, b: &str, l: &str, v: &str) -> (String, Vec<String>) {
        let r = merge(
            db,
            Some(b.as_bytes()),
            l.as_bytes(),
            v.as_bytes(),
            &BTreeSet::new(),
        );
        (String::from_utf8(r.data).unwrap(), r.notes)
    }

    const BASE_PW: &str = "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1::/:/usr/sbin/nologin\n";

    #[test]
    fn device_user_and_vendor_user_are_both_kept() {
        let local = format!("{BASE_PW}alice:x:1000:1000:Alice:/home/alice:/bin/sh\n");
        let vendor = format!("{BASE_PW}svc:x:998:998::/var/lib/svc:/usr/sbin/nologin\n");
        let (out, notes) = m(Db::Passwd, BASE_PW, &local, &vendor);
        assert_eq!(
            out,
            format!(
                "{BASE_PW}svc:x:998:998::/var/lib/svc:/usr/sbin/nologin\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
            )
        );
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn vendor_change_and_delete_are_taken_device_delete_kept() {
        let base = format!("{BASE_PW}old:x:5:5::/:/bin/false\ngone:x:6:6::/:/bin/false\n");
        // Device deletes "gone" and adds bob; vendor changes daemon's shell, deletes "old".
        let local =
            format!("{BASE_PW}old:x:5:5::/:/bin/false\nbob:x:1001:1001::/home/bob:/bin/sh\n");
        let vendor =
            "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\ngone:x:6:6::/:/bin/false\n";
        let (out, notes) = m(Db::Passwd, &base, &local, vendor);
        assert_eq!(
            out,
            "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\nbob:x:1001:1001::/home/bob:/bin/sh\n"
        );
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn hash_set_on_device_survives_vendor_change_of_the_same_entry() {
        let base = "root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n";
        // Device sets alice's password (hash + last change); vendor changes
        // the max age of alice and writes another day number.
        let local = "root:*:19000:0:99999:7:::\nalice:$y$j9T$abc$def:19500:0:99999:7:::\n";
        let vendor = "root:*:19000:0:99999:7:::\nalice:!:19700:0:60:7:::\n";
        let (out, notes) = m(Db::Shadow, base, local, vendor);
        assert_eq!(
            out,
            "root:*:19000:0:99999:7:::\nalice:$y$j9T$abc$def:19500:0:60:7:::\n"
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("last change of alice"), "{notes:?}");
    }

    #[test]
    fn group_members_merge_as_sets() {
        let base = "video:x:44:carol,dave\naudio:x:29:\n";
        // Device adds alice to video and removes dave; vendor adds svc to video.
        let local = "video:x:44:carol,alice\naudio:x:29:alice\n";
        let vendor = "video:x:44:carol,dave,svc\naudio:x:29:\n";
        let (out, notes) = m(Db::Group, base, local, vendor);
        assert_eq!(out, "video:x:44:carol,svc,alice\naudio:x:29:alice\n");
        assert!(notes.is_empty(), "{notes:?}");
        // gshadow: administrators and members both merge as sets.
        let (out, _) = m(
            Db::Gshadow,
            "video:!:root:carol\n",
            "video:!:root,alice:carol,alice\n",
            "video:!:root:carol,svc\n",
        );
        assert_eq!(out, "video:!:root,alice:carol,svc,alice\n");
    }

    #[test]
    fn uid_collision_is_reported_and_never_renumbered() {
        let local = format!("{BASE_PW}alice:x:1000:1000::/home/alice:/bin/sh\n");
        let vendor = format!("{BASE_PW}svc:x:1000:1000::/:/usr/sbin/nologin\n");
        let r = merge(
            Db::Passwd,
            Some(BASE_PW.as_bytes()),
            local.as_bytes(),
            vendor.as_bytes(),
            &BTreeSet::new(),
        );
        let out = String::from_utf8(r.data).unwrap();
        assert_eq!(out, local, "alice keeps uid 1000, svc is left out");
        assert_eq!(r.dropped, BTreeSet::from(["svc".to_string()]));
        assert_eq!(r.notes.len(), 1);
        assert!(
            r.notes[0].contains("uid 1000 of svc") && r.notes[0].contains("alice"),
            "{:?}",
            r.notes
        );
        // The shadow line of the left-out user goes too; alice's stays.
        let sbase = "root:*:1:0:99999:7:::\n";
        let slocal = format!("{sbase}alice:$6$h:2:0:99999:7:::\n");
        let svendor = format!("{sbase}svc:!:3:0:99999:7:::\n");
        let s = merge(
            Db::Shadow,
            Some(sbase.as_bytes()),
            slocal.as_bytes(),
            svendor.as_bytes(),
            &r.dropped,
        );
        assert_eq!(String::from_utf8(s.data).unwrap(), slocal);
    }

    #[test]
    fn gid_collision_is_reported() {
        let (out, notes) = m(
            Db::Group,
            "root:x:0:\n",
            "root:x:0:\nalice:x:1000:\n",
            "root:x:0:\nsvc:x:1000:\n",
        );
        assert_eq!(out, "root:x:0:\nalice:x:1000:\n");
        assert!(notes[0].contains("gid 1000 of svc"), "{notes:?}");
    }

    #[test]
    fn same_user_added_differently_keeps_the_devices() {
        let (out, notes) = m(
            Db::Passwd,
            "",
            "bob:x:1001:1001::/home/bob:/bin/bash\n",
            "bob:x:1001:1001::/home/bob:/bin/sh\n",
        );
        assert_eq!(out, "bob:x:1001:1001::/home/bob:/bin/bash\n");
        assert!(notes[0].contains("shell of bob"), "{notes:?}");
    }

    #[test]
    fn deletion_against_change_keeps_the_devices_side() {
        let base = "a:x:5:5::/:/bin/sh\nb:x:6:6::/:/bin/sh\n";
        let local = "a:x:5:5::/:/bin/bash\n"; // a changed, b deleted
        let vendor = "b:x:6:6::/:/bin/false\n"; // a deleted, b changed
        let (out, notes) = m(Db::Passwd, base, local, vendor);
        assert_eq!(out, "a:x:5:5::/:/bin/bash\n");
        assert_eq!(notes.len(), 2, "{notes:?}");
    }

    #[test]
    fn subid_ranges_merge_by_line_and_overlaps_are_reported() {
        let base = "root:100000:65536\n";
        let local = "root:100000:65536\nalice:165536:65536\n";
        let vendor = "root:100000:65536\nsvc:165536:65536\n";
        let (out, notes) = m(Db::Subid, base, local, vendor);
        assert_eq!(
            out,
            "root:100000:65536\nsvc:165536:65536\nalice:165536:65536\n"
        );
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("overlaps"), "{notes:?}");
    }

    #[test]
    fn comments_and_missing_final_newline() {
        let (out, _) = m(
            Db::Passwd,
            "# c\nroot:x:0:0::/:/bin/sh",
            "# c\nroot:x:0:0::/:/bin/sh\nalice:x:1000:1000::/h:/bin/sh",
            "# c\nroot:x:0:0::/root:/bin/sh",
        );
        assert_eq!(
            out,
            "# c\nroot:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/h:/bin/sh"
        );
    }

    #[test]
    fn names_of_databases() {
        for (n, db) in [
            ("passwd", Some(Db::Passwd)),
            ("group", Some(Db::Group)),
            ("shadow", Some(Db::Shadow)),
            ("gshadow", Some(Db::Gshadow)),
            ("subuid", Some(Db::Subid)),
            ("subgid", Some(Db::Subid)),
            ("passwd-", None),
            ("x/passwd", None),
        ] {
            assert_eq!(Db::of(Path::new(n)), db, "{n}");
        }
    }
}
