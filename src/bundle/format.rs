//! The bundle file (docs/bundles.md):
//!
//! ```text
//! magic      "BTRFS-DEPLOY-BUNDLE\n"   20 bytes
//! u32 LE     manifest length M
//! u32 LE     signature length S
//! M bytes    manifest (JSON, UTF-8)
//! S bytes    minisign signature of the manifest bytes (text)
//! payload    exactly manifest.payload.size bytes: a `btrfs send` stream,
//!            hashed in chunks of manifest.payload.chunk_size (SHA-256 each)
//! ```
//!
//! The signature covers the manifest, the manifest covers every payload
//! chunk: a reader verifies the signature, then each chunk before it passes
//! the chunk on.

use crate::util::units;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

/// First bytes of every bundle.
pub(crate) const MAGIC: &[u8; 20] = b"BTRFS-DEPLOY-BUNDLE\n";
/// The manifest format this tool writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Payload chunk size the tool writes.
pub(crate) const CHUNK_SIZE: u64 = 4 << 20;
/// Largest manifest accepted (a 1 TiB payload needs ~17 MiB of hashes at 4 MiB chunks).
const MAX_MANIFEST: u32 = 32 << 20;
/// Largest signature accepted.
const MAX_SIGNATURE: u32 = 4096;
/// Smallest and largest chunk size accepted.
const CHUNK_RANGE: std::ops::RangeInclusive<u64> = 4096..=(64 << 20);

/// The signed description of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    /// Manifest format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Label of the version the bundle carries.
    pub label: String,
    /// Build number: a device refuses one not newer than the newest it has.
    pub build: u64,
    /// When the bundle was made (RFC 3339, UTC).
    pub created: String,
    /// The version the payload is a delta against; none for a full bundle.
    pub base: Option<Base>,
    /// UUID of the sent subvolume: the received UUID on the device.
    pub subvolume_uuid: String,
    /// Kernel version found in the version's tree, if any.
    pub kernel_version: Option<String>,
    /// Filesystem UUID of the source (its fstab entries name it).
    pub source_fs_uuid: String,
    /// Version of the tool that wrote it.
    pub tool_version: String,
    /// After this time (RFC 3339, UTC) devices refuse the bundle: stale
    /// metadata is not replayed at them (`bundle create --expires-in`).
    /// None: never (bundles made before expiry times existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// The payload.
    pub payload: Payload,
}

/// The base of a delta bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Base {
    /// Its label on the source.
    pub label: String,
    /// UUID of its `orig` subvolume on the source (a device has it as its
    /// own UUID, from a copied image, or as the received UUID of a version
    /// it got from a bundle).
    pub uuid: String,
}

/// Size and chunk hashes of the payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Payload {
    /// What the payload is (`btrfs-send`).
    pub kind: String,
    /// Bytes.
    pub size: u64,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_size: u64,
    /// SHA-256 of each chunk, lowercase hex.
    pub sha256: Vec<String>,
    /// How the send stream is compressed (`zstd`); None: it is not. The
    /// size and hashes are of the bytes as stored (compressed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Bytes of the send stream before compression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_size: Option<u64>,
}

/// The compression [`Payload::compression`] names.
pub(crate) const ZSTD: &str = "zstd";

impl Manifest {
    /// Parses and checks manifest bytes (after the signature verified).
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).context("the bundle's manifest is not valid JSON")?;
        let format = value
            .get("format")
            .and_then(|f| f.as_u64())
            .context("the bundle's manifest has no format version")?;
        if format > FORMAT_VERSION as u64 {
            bail!(
                "the bundle's manifest has format {format}, newer than this deploy reads ({FORMAT_VERSION}): \
                 upgrade deploy on this machine first"
            );
        }
        let m: Manifest = serde_json::from_value(value)
            .context("the bundle's manifest has unknown or missing fields")?;
        if m.format != FORMAT_VERSION {
            bail!(
                "the bundle's manifest has format {}, this deploy reads {FORMAT_VERSION}",
                m.format
            );
        }
        units::validate_label(&m.label).context("the bundle's label")?;
        if m.payload.kind != "btrfs-send" {
            bail!(
                "the bundle's payload is {:?}, not a btrfs-send stream",
                m.payload.kind
            );
        }
        if let Some(c) = m.payload.compression.as_deref().filter(|c| *c != ZSTD) {
            bail!(
                "the bundle's payload is compressed with {c:?}, which this deploy cannot read \
                 (it reads zstd): upgrade deploy on this machine first"
            );
        }
        if !CHUNK_RANGE.contains(&m.payload.chunk_size) {
            bail!(
                "the bundle's chunk size {} is out of range",
                m.payload.chunk_size
            );
        }
        if let Some(e) = &m.expires {
            humantime::parse_rfc3339(e)
                .with_context(|| format!("the bundle's expiry time {e:?} is not RFC 3339"))?;
        }
        if m.payload.sha256.len() as u64 != m.payload.size.div_ceil(m.payload.chunk_size) {
            bail!(
                "the bundle's manifest lists {} chunk hashes for {} bytes",
                m.payload.sha256.len(),
                m.payload.size
            );
        }
        Ok(m)
    }

    /// Refuses the bundle when its expiry time has passed at `now`.
    pub fn check_expiry(&self, now: std::time::SystemTime, what: &str) -> Result<()> {
        let Some(e) = &self.expires else {
            return Ok(());
        };
        let at = humantime::parse_rfc3339(e)?;
        if now > at {
            bail!(
                "{what} expired at {e} (made {}; this machine's clock says {}): refusing stale \
                 metadata. The vendor publishes a fresh bundle with `deploy bundle create` \
                 (--expires-in sets how long it stays valid); if this clock is wrong, set it first",
                self.created,
                humantime::format_rfc3339_seconds(now)
            );
        }
        Ok(())
    }

    /// Whether this is a delta.
    pub fn kind(&self) -> &'static str {
        if self.base.is_some() {
            "delta"
        } else {
            "full"
        }
    }
}

/// Writes the header, manifest and signature.
pub(crate) fn write_head(out: &mut impl Write, manifest: &[u8], signature: &str) -> Result<()> {
    out.write_all(MAGIC)?;
    out.write_all(&(manifest.len() as u32).to_le_bytes())?;
    out.write_all(&(signature.len() as u32).to_le_bytes())?;
    out.write_all(manifest)?;
    out.write_all(signature.as_bytes())?;
    Ok(())
}

/// What precedes the payload, as read (nothing verified yet).
pub(crate) struct Head {
    /// Manifest bytes (the signed data).
    pub manifest: Vec<u8>,
    /// Signature text.
    pub signature: String,
}

impl Head {
    /// Bytes before the payload.
    pub fn len(&self) -> u64 {
        (MAGIC.len() + 8 + self.manifest.len() + self.signature.len()) as u64
    }
}

/// Reads the header, manifest and signature from `r` (`what` names the
/// bundle in errors).
pub(crate) fn read_head(r: &mut impl Read, what: &str) -> Result<Head> {
    let mut magic = [0u8; 20];
    read_full(r, &mut magic).with_context(|| format!("reading {what}"))?;
    if &magic != MAGIC {
        bail!("{what} is not a btrfs-deploy bundle (no bundle header)");
    }
    let mut n = [0u8; 4];
    read_full(r, &mut n).with_context(|| format!("{what} is truncated"))?;
    let m = u32::from_le_bytes(n);
    read_full(r, &mut n).with_context(|| format!("{what} is truncated"))?;
    let s = u32::from_le_bytes(n);
    if m > MAX_MANIFEST || s > MAX_SIGNATURE {
        bail!("{what} has a damaged header (manifest {m} bytes, signature {s} bytes)");
    }
    let mut manifest = vec![0u8; m as usize];
    read_full(r, &mut manifest)
        .with_context(|| format!("{what} is truncated (in its manifest)"))?;
    let mut sig = vec![0u8; s as usize];
    read_full(r, &mut sig).with_context(|| format!("{what} is truncated (in its signature)"))?;
    let signature =
        String::from_utf8(sig).with_context(|| format!("{what}: the signature is not text"))?;
    Ok(Head {
        manifest,
        signature,
    })
}

/// `read_exact` whose error says "truncated".
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow::anyhow!("unexpected end of data")
        } else {
            anyhow::Error::new(e)
        }
    })
}

/// Hashes of `CHUNK_SIZE` chunks, computed while a payload is written.
#[derive(Default)]
pub(crate) struct ChunkHasher {
    hasher: Sha256,
    in_chunk: u64,
    /// Total bytes.
    pub size: u64,
    /// Hashes of the finished chunks.
    pub hashes: Vec<String>,
}

impl ChunkHasher {
    /// Adds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = ((CHUNK_SIZE - self.in_chunk) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            self.in_chunk += take as u64;
            self.size += take as u64;
            data = &data[take..];
            if self.in_chunk == CHUNK_SIZE {
                self.finish_chunk();
            }
        }
    }

    fn finish_chunk(&mut self) {
        let h = std::mem::take(&mut self.hasher).finalize();
        self.hashes.push(hex(&h));
        self.in_chunk = 0;
    }

    /// Finishes the last chunk; returns (size, hashes).
    pub fn finish(mut self) -> (u64, Vec<String>) {
        if self.in_chunk > 0 {
            self.finish_chunk();
        }
        (self.size, self.hashes)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies the payload from `r` to `out` one chunk at a time, passing on a
/// chunk only after its hash matched the manifest. Fails on a changed
/// chunk, a short payload, or (when `expect_eof`) bytes after the payload.
/// `what` names the bundle in errors; `tick` runs before each chunk (a
/// signal check).
pub(crate) fn copy_verified(
    payload: &Payload,
    r: &mut impl Read,
    out: &mut impl Write,
    what: &str,
    expect_eof: bool,
    mut tick: impl FnMut(u64) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; payload.chunk_size as usize];
    let mut done = 0u64;
    for (i, want) in payload.sha256.iter().enumerate() {
        tick(done)?;
        let len = (payload.size - done).min(payload.chunk_size) as usize;
        let got = read_up_to(r, &mut buf[..len]).with_context(|| format!("reading {what}"))?;
        if got < len {
            bail!(
                "{what} is truncated: its payload ends after {} of {} bytes; refusing it",
                done + got as u64,
                payload.size
            );
        }
        let h = hex(&Sha256::digest(&buf[..len]));
        if &h != want {
            bail!(
                "{what} was changed or damaged: payload chunk {i} (bytes {done}..{}) does not match \
                 its signed hash; refusing it",
                done + len as u64
            );
        }
        out.write_all(&buf[..len])
            .context("passing the verified payload on")?;
        done += len as u64;
    }
    if expect_eof {
        let mut one = [0u8; 1];
        if read_up_to(r, &mut one).with_context(|| format!("reading {what}"))? != 0 {
            bail!("{what} has data after its payload: it was changed or damaged; refusing it");
        }
    }
    Ok(())
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_for(data: &[u8]) -> Manifest {
        let mut h = ChunkHasher::default();
        h.update(data);
        let (size, sha256) = h.finish();
        Manifest {
            format: FORMAT_VERSION,
            label: "v2".into(),
            build: 7,
            created: "2026-01-01T00:00:00Z".into(),
            base: None,
            subvolume_uuid: "u".into(),
            kernel_version: None,
            source_fs_uuid: "f".into(),
            tool_version: "0".into(),
            expires: None,
            payload: Payload {
                kind: "btrfs-send".into(),
                size,
                chunk_size: CHUNK_SIZE,
                sha256,
                compression: None,
                stream_size: None,
            },
        }
    }

    #[test]
    fn chunks_verify_and_changes_are_caught() {
        let data: Vec<u8> = (0..(CHUNK_SIZE as usize * 2 + 100))
            .map(|i| i as u8)
            .collect();
        let m = manifest_for(&data);
        assert_eq!(m.payload.sha256.len(), 3);
        let mut out = Vec::new();
        copy_verified(&m.payload, &mut &data[..], &mut out, "b", true, |_| Ok(())).unwrap();
        assert_eq!(out, data);
        let mut bad = data.clone();
        bad[CHUNK_SIZE as usize + 5] ^= 1;
        let mut out = Vec::new();
        let e = copy_verified(&m.payload, &mut &bad[..], &mut out, "b", true, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chunk 1"), "{e}");
        assert_eq!(out.len(), CHUNK_SIZE as usize, "only the good chunk passed");
        let e = copy_verified(
            &m.payload,
            &mut &data[..data.len() - 1],
            &mut Vec::new(),
            "b",
            true,
            |_| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut longer = data.clone();
        longer.push(0);
        let e = copy_verified(
            &m.payload,
            &mut &longer[..],
            &mut Vec::new(),
            "b",
            true,
            |_| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("after its payload"), "{e}");
    }

    #[test]
    fn expired_manifests_are_refused_and_old_ones_never_expire() {
        let mut m = manifest_for(b"abc");
        let t = |s: &str| humantime::parse_rfc3339(s).unwrap();
        m.check_expiry(t("2099-01-01T00:00:00Z"), "b").unwrap();
        m.expires = Some("2026-02-01T00:00:00Z".into());
        m.check_expiry(t("2026-01-31T23:59:59Z"), "b").unwrap();
        let e = m
            .check_expiry(t("2026-02-01T00:00:01Z"), "bundle x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bundle x expired at 2026-02-01T00:00:00Z") && e.contains("clock says"),
            "{e}"
        );
        let bytes = serde_json::to_vec(&m).unwrap();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        let mut v = serde_json::to_value(&m).unwrap();
        v["expires"] = "next tuesday".into();
        let e = format!(
            "{:#}",
            Manifest::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err()
        );
        assert!(e.contains("not RFC 3339"), "{e}");
    }

    #[test]
    fn manifest_round_trips_and_rejects_newer_and_unknown() {
        let m = manifest_for(b"abc");
        let bytes = serde_json::to_vec(&m).unwrap();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        let mut v = serde_json::to_value(&m).unwrap();
        v["surprise"] = 1.into();
        let e = format!(
            "{:#}",
            Manifest::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err()
        );
        assert!(e.contains("unknown"), "{e}");
        v["format"] = 2.into();
        let e = format!(
            "{:#}",
            Manifest::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err()
        );
        assert!(e.contains("format 2, newer"), "{e}");
        let mut bad = m.clone();
        bad.label = "../x".into();
        assert!(Manifest::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
    }

    #[test]
    fn head_round_trips_and_rejects_other_files() {
        let mut buf = Vec::new();
        write_head(&mut buf, b"{}", "sig").unwrap();
        let h = read_head(&mut &buf[..], "b").unwrap();
        assert_eq!(
            (h.manifest.as_slice(), h.signature.as_str()),
            (&b"{}"[..], "sig")
        );
        assert_eq!(h.len() as usize, buf.len());
        let e = read_head(&mut &b"hello"[..], "b").err().unwrap();
        assert!(format!("{e:#}").contains("end of data"), "{e:#}");
        let e = read_head(&mut &[0u8; 40][..], "b").err().unwrap();
        assert!(e.to_string().contains("not a btrfs-deploy bundle"), "{e}");
        let e = read_head(&mut &buf[..buf.len() - 1], "b").err().unwrap();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
