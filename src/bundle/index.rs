//! The signed index of a directory of bundles (`deploy bundle index DIR`),
//! which `deploy update` reads to find the newest bundle a disk can apply.
//!
//! `index.json` lists each bundle (file name, label, build, base, size and
//! the SHA-256 of its manifest, which binds the entry to that one bundle:
//! a server cannot pass another signed bundle off as it); `index.json.minisig`
//! signs those bytes with a vendor key, like a bundle's manifest. The index
//! has its own expiry time, so a mirror cannot freeze a device on an old
//! index.

use super::format::{self, Base, Manifest};
use super::http::{self, HttpOptions, HttpReader};
use super::keys;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Name of the index file in the directory.
pub(crate) const INDEX: &str = "index.json";
/// Name of its signature.
pub(crate) const SIGNATURE: &str = "index.json.minisig";
/// The index format this tool writes and reads.
const FORMAT_VERSION: u32 = 1;
/// Largest index or signature read.
const MAX_INDEX: u64 = 16 << 20;

/// The signed list of bundles.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Index {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// When it was written (RFC 3339).
    pub created: String,
    /// After this, devices refuse it (RFC 3339); None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// The bundles, newest build first.
    pub bundles: Vec<Entry>,
}

/// One bundle of the index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
    /// File name, relative to the index.
    pub file: String,
    /// Version label.
    pub label: String,
    /// Build number.
    pub build: u64,
    /// Base of a delta; None for a full bundle.
    pub base: Option<Base>,
    /// Bytes of the file.
    pub size: u64,
    /// SHA-256 of the bundle's manifest bytes (lowercase hex).
    pub manifest_sha256: String,
}

/// SHA-256 of manifest bytes, lowercase hex.
pub(crate) fn manifest_digest(manifest: &[u8]) -> String {
    Sha256::digest(manifest)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `DIR/index.json` and its signature for every `*.bundle` in `dir`.
/// Returns the index.
pub(crate) fn write(
    dir: &Path,
    sign_key: &Path,
    expires_in: Option<std::time::Duration>,
) -> Result<Index> {
    let signer = keys::load_secret(sign_key)?;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bundle"))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!(
            "{} has no *.bundle files: write them there with `deploy bundle create --output`",
            dir.display()
        );
    }
    let mut bundles = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let what = format!("bundle {}", path.display());
        let mut f = std::fs::File::open(&path).with_context(|| format!("opening {what}"))?;
        let size = f.metadata()?.len();
        let head = format::read_head(&mut f, &what)?;
        let m = Manifest::parse(&head.manifest).with_context(|| format!("reading {what}"))?;
        if size != head.len() + m.payload.size {
            bail!("{what} is {size} bytes, its manifest says {}: it is incomplete or damaged; make it again", head.len() + m.payload.size);
        }
        bundles.push(Entry {
            file: name,
            label: m.label,
            build: m.build,
            base: m.base,
            size,
            manifest_sha256: manifest_digest(&head.manifest),
        });
    }
    bundles.sort_by(|a, b| b.build.cmp(&a.build).then(a.file.cmp(&b.file)));
    let (created, created_unix) = crate::store::deployment::now();
    let index = Index {
        format: FORMAT_VERSION,
        created,
        expires: expires_in
            .map(|d| crate::store::deployment::rfc3339(created_unix.saturating_add(d.as_secs()))),
        bundles,
    };
    let bytes = serde_json::to_vec_pretty(&index)?;
    let signature = signer.sign(&bytes, &format!("btrfs-deploy index {}", index.created))?;
    // The signature first: a reader that sees the new index finds its
    // signature (each file is replaced by a rename).
    crate::util::fsutil::write_atomic(&dir.join(SIGNATURE), signature.as_bytes(), 0o644)?;
    crate::util::fsutil::write_atomic(&dir.join(INDEX), &bytes, 0o644)?;
    Ok(index)
}

/// Reads a whole small resource: a URL or a local file.
fn fetch(location: &str, opts: HttpOptions) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    if http::is_url(Path::new(location)) {
        HttpReader::open(location, 0, opts)?
            .take(MAX_INDEX + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("reading {location}"))?;
    } else {
        std::fs::File::open(location)
            .with_context(|| format!("opening {location}"))?
            .take(MAX_INDEX + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("reading {location}"))?;
    }
    if data.len() as u64 > MAX_INDEX {
        bail!("{location} is larger than {MAX_INDEX} bytes: not an index");
    }
    Ok(data)
}

/// Fetches the index at `location` (URL or file) and its `.minisig`,
/// verifies it with `trust_keys` (minus `revoked`) and its expiry; returns
/// it with the id of the key that signed it.
pub(crate) fn fetch_verified(
    location: &str,
    trust_keys: &[std::path::PathBuf],
    revoked: &[String],
    opts: HttpOptions,
) -> Result<(Index, String)> {
    if trust_keys.is_empty() {
        bail!(
            "refusing an update index without a verification key: give --verify-key KEY.pub \
             (or verify_key in deploy.toml)"
        );
    }
    let set = trust_keys
        .iter()
        .map(|k| keys::load_public(k))
        .collect::<Result<Vec<_>>>()?;
    let bytes = fetch(location, opts).with_context(|| format!("fetching the index {location}"))?;
    let sig_location = format!("{location}.minisig");
    let signature = fetch(&sig_location, opts)
        .with_context(|| format!("fetching the index's signature {sig_location}"))?;
    let signature = String::from_utf8(signature)
        .with_context(|| format!("{sig_location} is not a minisign signature"))?;
    let key = keys::verify_any(&set, revoked, &bytes, &signature)
        .map_err(|e| anyhow::anyhow!("{e:#}").context(format!("verifying the index {location}")))?;
    let index: Index = serde_json::from_slice(&bytes)
        .with_context(|| format!("the index {location} has unknown or missing fields"))?;
    if index.format != FORMAT_VERSION {
        bail!(
            "the index {location} has format {}, this deploy reads {FORMAT_VERSION}: upgrade deploy first",
            index.format
        );
    }
    if let Some(e) = &index.expires {
        let at = humantime::parse_rfc3339(e)
            .with_context(|| format!("the index's expiry time {e:?} is not RFC 3339"))?;
        let now = std::time::SystemTime::now();
        if now > at {
            bail!(
                "the index {location} expired at {e} (written {}; this machine's clock says {}): \
                 refusing stale metadata. The vendor runs `deploy bundle index` again to renew it; \
                 if this clock is wrong, set it first",
                index.created,
                humantime::format_rfc3339_seconds(now)
            );
        }
    }
    for e in &index.bundles {
        if e.file.contains('/') || e.file.starts_with('.') {
            bail!(
                "the index {location} names {:?}, not a file beside it: refusing it",
                e.file
            );
        }
    }
    Ok((index, key.id()))
}

/// The URL (or path) of `file` beside the index at `location`.
pub(crate) fn beside(location: &str, file: &str) -> String {
    match location.rfind('/') {
        Some(i) => format!("{}/{file}", &location[..i]),
        None => file.to_string(),
    }
}

/// What a disk has, for choosing.
pub(crate) struct DiskState {
    /// Newest build number of its versions (0: none from a bundle).
    pub newest_build: u64,
    /// Labels it has.
    pub labels: Vec<String>,
}

/// The newest bundle the disk can apply: builds newer than its newest,
/// highest first; for a build, a delta whose base the disk has (per
/// `has_base`, by subvolume UUID), else a full bundle. None: up to date.
/// An error when newer builds exist but none applies.
pub(crate) fn choose<'i>(
    index: &'i Index,
    disk: &DiskState,
    mut has_base: impl FnMut(&str) -> Result<bool>,
) -> Result<Option<&'i Entry>> {
    let mut newer: Vec<&Entry> = index
        .bundles
        .iter()
        .filter(|e| e.build > disk.newest_build && !disk.labels.contains(&e.label))
        .collect();
    newer.sort_by(|a, b| {
        b.build
            .cmp(&a.build)
            .then(a.base.is_none().cmp(&b.base.is_none()))
    });
    for e in &newer {
        match &e.base {
            Some(b) if has_base(&b.uuid)? => return Ok(Some(e)),
            Some(_) => {}
            None => return Ok(Some(e)),
        }
    }
    if let Some(top) = newer.first() {
        let bases: Vec<String> = newer
            .iter()
            .filter_map(|e| e.base.as_ref().map(|b| b.label.clone()))
            .collect();
        bail!(
            "the index has builds newer than this disk's ({}: {} build {}) but none it can apply: \
             they are deltas against versions it lacks ({}) and there is no full bundle; publish a \
             full one (`bundle create` without --base)",
            disk.newest_build,
            top.label,
            top.build,
            bases.join(", ")
        );
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(label: &str, build: u64, base: Option<&str>) -> Entry {
        Entry {
            file: format!("{label}-{}.bundle", base.unwrap_or("full")),
            label: label.into(),
            build,
            base: base.map(|b| Base {
                label: b.into(),
                uuid: format!("uuid-{b}"),
            }),
            size: 1,
            manifest_sha256: String::new(),
        }
    }

    #[test]
    fn chooses_the_newest_build_the_disk_can_apply() {
        let index = Index {
            format: 1,
            created: "c".into(),
            expires: None,
            bundles: vec![
                entry("v3", 300, Some("v2")),
                entry("v2", 200, Some("factory")),
                entry("v2", 200, None),
            ],
        };
        let disk = |n, labels: &[&str]| DiskState {
            newest_build: n,
            labels: labels.iter().map(|s| s.to_string()).collect(),
        };
        let has = |present: &'static [&'static str]| {
            move |u: &str| Ok(present.iter().any(|p| format!("uuid-{p}") == u))
        };
        // Lacking v2: v3's delta cannot apply; v2's delta (base factory) can.
        let c = choose(&index, &disk(0, &["factory"]), has(&["factory"])).unwrap();
        assert_eq!(c.unwrap().file, "v2-factory.bundle");
        // Neither base: the full v2.
        let c = choose(&index, &disk(0, &["other"]), has(&[])).unwrap();
        assert_eq!(c.unwrap().file, "v2-full.bundle");
        // With v2: v3.
        let c = choose(&index, &disk(200, &["factory", "v2"]), has(&["v2"])).unwrap();
        assert_eq!(c.unwrap().file, "v3-v2.bundle");
        // Up to date.
        assert!(choose(&index, &disk(300, &["v3"]), has(&["v3"]))
            .unwrap()
            .is_none());
        // Newer, but nothing applies.
        let only_delta = Index {
            bundles: vec![entry("v3", 300, Some("v2"))],
            ..index.clone()
        };
        let e = choose(&only_delta, &disk(100, &["factory"]), has(&["factory"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none it can apply") && e.contains("(v2)"), "{e}");
        assert_eq!(
            beside("http://h/a/index.json", "v2.bundle"),
            "http://h/a/v2.bundle"
        );
        assert_eq!(beside("index.json", "v2.bundle"), "v2.bundle");
    }
}
