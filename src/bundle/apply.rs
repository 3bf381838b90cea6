//! Applying a bundle (`deploy --rootfs FILE.bundle|- TARGET`): verify,
//! check the disk, receive into quarantine, hand the received tree to the
//! upgrade flow.
//!
//! Order: the signature and manifest are verified before the target is
//! opened. A bundle file's whole payload is then hashed once before
//! anything is written (so a changed byte leaves the disk untouched); then,
//! on a read-only mount, the label, build number and base are checked; only
//! then is the payload streamed into `btrfs receive`, each chunk verified
//! again before it is passed on. From standard input the payload cannot be
//! read twice: each chunk is verified before `btrfs receive` sees it, and a
//! bad chunk aborts the receive (the partial version is removed).

use super::format::{self, Manifest};
use super::http::{self, HttpOptions, HttpReader};
use super::keys;
use crate::store::btrfs;
use crate::store::deployment::Deployment;
use crate::store::layout::{self, Layout};
use crate::util::{cmd, signals, ui, units};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// `--rootfs -`: the bundle comes from standard input.
pub(crate) const STDIN: &str = "-";
/// Quarantine directory (inside the partial version) the payload is
/// received into; it stays as the version's [`layout::RECEIVED`].
pub(crate) const QUARANTINE: &str = layout::RECEIVED;

/// Where the bundle is read from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// A bundle file; the payload starts at this offset.
    File(PathBuf, u64),
    /// Standard input, positioned at the payload.
    Stdin,
    /// An `http(s)://` URL; the payload starts at this offset.
    Http(String, u64, HttpOptions),
}

/// A bundle whose signature and manifest were verified.
#[derive(Debug, Clone)]
pub(crate) struct Opened {
    /// The manifest.
    pub manifest: Manifest,
    /// Where the payload is.
    pub source: Source,
    /// Key id of the verification key; None with `--insecure-no-verify`.
    pub verified_by: Option<String>,
    /// Apply even when the build number is not newer.
    pub allow_downgrade: bool,
}

impl Opened {
    fn what(&self) -> String {
        match &self.source {
            Source::File(p, _) => format!("bundle {}", p.display()),
            Source::Stdin => "the bundle on standard input".into(),
            Source::Http(url, ..) => format!("bundle {url}"),
        }
    }
}

/// True when `rootfs` names a bundle: `-`, an `http(s)://` URL, or a file
/// starting with the bundle magic.
pub(crate) fn is_bundle(rootfs: &Path) -> bool {
    if rootfs == Path::new(STDIN) || http::is_url(rootfs) {
        return true;
    }
    let mut magic = [0u8; 20];
    std::fs::File::open(rootfs)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|()| &magic == format::MAGIC)
        .unwrap_or(false)
}

/// Which keys a bundle may be signed with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trust<'a> {
    /// Public key files (`--verify-key`, `verify_key`): any of them.
    pub keys: &'a [PathBuf],
    /// Key ids refused even when listed in `keys` (`revoked_keys`).
    pub revoked: &'a [String],
    /// Apply without a key (`--insecure-no-verify`), with a warning.
    pub insecure: bool,
    /// The SHA-256 of the manifest a signed index names (`deploy update`).
    pub manifest_sha256: Option<&'a str>,
}

/// Reads and verifies the bundle's head (and a file's whole payload).
/// Without a key it is refused unless `insecure`, which warns. A URL is
/// read with `http_opts`; its payload, as from a pipe, is verified chunk by
/// chunk while it is received.
pub(crate) fn open(
    rootfs: &Path,
    trust: Trust,
    allow_downgrade: bool,
    http_opts: HttpOptions,
) -> Result<Opened> {
    let key_set = trust
        .keys
        .iter()
        .map(|k| keys::load_public(k))
        .collect::<Result<Vec<_>>>()?;
    let key = match key_set.is_empty() {
        false => Some(key_set),
        true if trust.insecure => None,
        true => bail!(
            "refusing to apply bundle {} without a verification key: give --verify-key KEY.pub \
             (or verify_key in deploy.toml); --insecure-no-verify applies it unverified",
            rootfs.display()
        ),
    };
    let mut http_total = None;
    let (head, source, what) = if rootfs == Path::new(STDIN) {
        let what = "the bundle on standard input".to_string();
        let head = format::read_head(&mut std::io::stdin().lock(), &what)?;
        (head, Source::Stdin, what)
    } else if http::is_url(rootfs) {
        let url = rootfs.to_string_lossy().into_owned();
        let what = format!("bundle {url}");
        ui::step(format!("Fetching the manifest of {what}"));
        let mut r =
            HttpReader::open(&url, 0, http_opts).with_context(|| format!("fetching {what}"))?;
        let head = format::read_head(&mut r, &what)?;
        http_total = r.total();
        let offset = head.len();
        (head, Source::Http(url, offset, http_opts), what)
    } else {
        let what = format!("bundle {}", rootfs.display());
        let mut f = std::fs::File::open(rootfs).with_context(|| format!("opening {what}"))?;
        let head = format::read_head(&mut f, &what)?;
        let offset = head.len();
        (head, Source::File(rootfs.to_path_buf(), offset), what)
    };
    let verified_by = match &key {
        Some(set) => {
            let k = keys::verify_any(set, trust.revoked, &head.manifest, &head.signature)
                .with_context(|| format!("verifying {what}"))?;
            Some(k.id())
        }
        None => {
            eprintln!(
                "warning: applying {what} WITHOUT verifying its signature (--insecure-no-verify): \
                 anyone who can hand this machine a bundle can replace its system"
            );
            None
        }
    };
    if let Some(want) = trust.manifest_sha256 {
        let got = super::index::manifest_digest(&head.manifest);
        if got != want {
            bail!(
                "{what} is not the bundle the signed index names (its manifest's SHA-256 is {got}, \
                 the index says {want}): the server's files changed after `deploy bundle index`; \
                 refusing it"
            );
        }
    }
    let manifest = Manifest::parse(&head.manifest).with_context(|| format!("reading {what}"))?;
    manifest.check_expiry(std::time::SystemTime::now(), &what)?;
    let opened = Opened {
        manifest,
        source,
        verified_by,
        allow_downgrade,
    };
    if let (Source::Http(_, offset, _), Some(len)) = (&opened.source, http_total) {
        let want = offset + opened.manifest.payload.size;
        if len != want {
            bail!(
                "{what} is {len} bytes on the server, its manifest says {want}: it was changed, \
                 damaged or cut short; refusing it"
            );
        }
    }
    if let Source::File(path, offset) = &opened.source {
        let len = std::fs::metadata(path)?.len();
        let want = offset + opened.manifest.payload.size;
        if len < want {
            bail!("{what} is truncated: {len} bytes, its manifest says {want}; refusing it");
        }
        if len > want {
            bail!(
                "{what} has {} bytes after its payload: it was changed or damaged; refusing it",
                len - want
            );
        }
        ui::step(format!(
            "Verifying {what} ({}, {} payload)",
            opened.manifest.kind(),
            units::format_size(opened.manifest.payload.size)
        ));
        let mut f = std::fs::File::open(path)?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(*offset))?;
        format::copy_verified(
            &opened.manifest.payload,
            &mut std::io::BufReader::new(f),
            &mut std::io::sink(),
            &what,
            true,
            |_| signals::check(),
        )?;
    }
    Ok(opened)
}

/// Build number of a version on the disk (None: not from a bundle).
fn build_of(record: &Deployment) -> Option<u64> {
    record.build
}

/// Checks on the (read-only) target: build number newer than every
/// version's, base present. The label is checked by the upgrade itself.
pub(crate) fn check_disk(b: &Opened, top: &Layout, target: &Path) -> Result<()> {
    let m = &b.manifest;
    let newest = crate::store::versions::list(top)?
        .into_iter()
        .filter_map(|v| build_of(&v.deployment).map(|n| (n, v.label)))
        .max();
    if let Some((n, label)) = newest {
        if m.build <= n && !b.allow_downgrade {
            bail!(
                "{} is build {}, not newer than build {n} (version {label}) on {}: refusing a \
                 downgrade (--allow-downgrade applies it anyway)",
                b.what(),
                m.build,
                target.display()
            );
        }
    }
    if let Some(base) = &m.base {
        if find_base(top, &base.uuid)?.is_none() {
            bail!(
                "{} is a delta against version {} (subvolume UUID {}), which {} does not have: \
                 apply a full bundle, or first the bundle that brings {}",
                b.what(),
                base.label,
                base.uuid,
                target.display(),
                base.label
            );
        }
    }
    Ok(())
}

/// The version whose `orig` is the subvolume `uuid`, or whose received
/// subvolume (in [`layout::RECEIVED`]) was received from it.
pub(crate) fn find_base(top: &Layout, uuid: &str) -> Result<Option<String>> {
    for v in crate::store::versions::list(top)? {
        let dir = top.version(&v.label);
        let mut candidates = vec![(dir.join(layout::ORIG), false)];
        if let Ok(rd) = std::fs::read_dir(dir.join(layout::RECEIVED)) {
            candidates.extend(rd.flatten().map(|e| (e.path(), true)));
        }
        for (p, by_received) in candidates {
            if !btrfs::is_subvolume(&p) {
                continue;
            }
            let info = libbtrfsutil::subvolume_info(&p)
                .map_err(|e| e.os_error())
                .with_context(|| format!("reading {}", p.display()))?;
            let id = if by_received {
                info.received_uuid()
            } else {
                Some(info.uuid())
            };
            if id.map(|u| u.hyphenated().to_string()).as_deref() == Some(uuid) {
                return Ok(Some(v.label));
            }
        }
    }
    Ok(None)
}

/// Streams the verified payload into `btrfs receive --chroot` in
/// `<dir>/received`, checks what arrived (exactly one read-only subvolume
/// whose received UUID is the manifest's) and returns its path.
pub(crate) fn receive(b: &Opened, dir: &Path) -> Result<PathBuf> {
    let quarantine = dir.join(QUARANTINE);
    std::fs::create_dir(&quarantine)
        .with_context(|| format!("creating {}", quarantine.display()))?;
    ui::step(format!(
        "Receiving {} ({} bytes, each chunk verified before btrfs receive sees it)",
        b.what(),
        b.manifest.payload.size
    ));
    let mut command = std::process::Command::new("btrfs");
    command.args(["receive", "--chroot"]).arg(&quarantine);
    tracing::debug!(?command, "running");
    cmd::prepare(&mut command);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("starting btrfs receive")?;
    let mut stdin = child.stdin.take().context("btrfs receive stdin")?;
    let mut stdout = child.stdout.take().context("btrfs receive stdout")?;
    let mut stderr = child.stderr.take().context("btrfs receive stderr")?;
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let what = b.what();
    let fed = match &b.source {
        Source::File(path, offset) => (|| -> Result<()> {
            let mut f = std::fs::File::open(path)?;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(*offset))?;
            feed(b, &mut std::io::BufReader::new(f), &mut stdin, &what)
        })(),
        Source::Stdin => feed(b, &mut std::io::stdin().lock(), &mut stdin, &what),
        Source::Http(url, offset, opts) => (|| -> Result<()> {
            let r = HttpReader::open(url, *offset, *opts)
                .with_context(|| format!("fetching the payload of {what}"))?;
            feed(
                b,
                &mut std::io::BufReader::with_capacity(1 << 20, r),
                &mut stdin,
                &what,
            )
        })(),
    };
    // Kill before closing its input: on EOF after a refused first chunk it
    // would exit on its own ("empty stream") and hide why we stopped.
    if fed.is_err() {
        let _ = child.kill();
    }
    drop(stdin);
    let status = child.wait().context("waiting for btrfs receive")?;
    let out = out_thread.join().unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    // Our failure (a refused chunk, a read error) is the cause, except a
    // broken pipe: then btrfs receive failed on its own, and its message
    // below says why.
    if let Err(e) = fed {
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if !broken_pipe {
            return Err(e);
        }
    }
    if !status.success() {
        bail!(
            "`btrfs receive` of {what} failed ({status}):\n{}",
            cmd::tail_lines(&format!("{out}{err}"), 15)
        );
    }
    check_received(&quarantine, &b.manifest.subvolume_uuid, &what)
}

/// Passes the verified payload from `r` to `out` (btrfs receive's input),
/// decompressing it first when the manifest says it is compressed: what is
/// decompressed has been verified.
fn feed(b: &Opened, r: &mut impl Read, out: &mut impl Write, what: &str) -> Result<()> {
    let payload = &b.manifest.payload;
    match payload.compression.as_deref() {
        None => format::copy_verified(payload, r, out, what, true, |_| signals::check()),
        Some(_) => {
            let mut d =
                zstd::stream::write::Decoder::new(out).context("starting the zstd decompressor")?;
            format::copy_verified(payload, r, &mut d, what, true, |_| signals::check())?;
            d.flush().context("passing the verified payload on")?;
            Ok(())
        }
    }
}

/// Exactly one entry in the quarantine, a read-only subvolume received from
/// `uuid`.
fn check_received(quarantine: &Path, uuid: &str, what: &str) -> Result<PathBuf> {
    let entries: Vec<PathBuf> = std::fs::read_dir(quarantine)
        .with_context(|| format!("reading {}", quarantine.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    let [one] = entries.as_slice() else {
        bail!(
            "{what} did not hold exactly one subvolume ({} entries received): refusing it",
            entries.len()
        );
    };
    if !btrfs::is_subvolume(one) {
        bail!("{what} did not hold a subvolume: refusing it");
    }
    let info = libbtrfsutil::subvolume_info(one)
        .map_err(|e| e.os_error())
        .with_context(|| format!("reading {}", one.display()))?;
    let received = info.received_uuid().map(|u| u.hyphenated().to_string());
    if received.as_deref() != Some(uuid) {
        bail!(
            "{what}: the received subvolume's received UUID is {}, the manifest says {uuid}: refusing it",
            received.as_deref().unwrap_or("unset")
        );
    }
    if !btrfs::is_readonly(one)? {
        bail!("{what}: the received subvolume is not read-only: refusing it");
    }
    Ok(one.clone())
}

/// What the version's `deployment.json` records about its bundle.
pub(crate) fn record(b: &Opened) -> serde_json::Value {
    let m = &b.manifest;
    serde_json::json!({
        "kind": m.kind(),
        "build": m.build,
        "created": m.created,
        "base": m.base,
        "subvolume_uuid": m.subvolume_uuid,
        "payload_bytes": m.payload.size,
        "verified_by_key": b.verified_by,
    })
}

/// Removes from `etc/fstab` in `orig` (a snapshot of the received tree)
/// what this tool added on the source (its comment line and the entries
/// after it naming the source's filesystem), so the fstab completion that
/// follows works as on any upgrade: the rootfs's own entries, then ours
/// naming this filesystem.
pub(crate) fn strip_source_fstab(orig: &Path, source_uuid: &str) -> Result<()> {
    let Some(path) = crate::util::rootpath::try_resolve_in_root(orig, Path::new("etc/fstab"))?
    else {
        return Ok(());
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => m,
        _ => return Ok(()),
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let new = strip_text(&text, source_uuid);
    if new != text {
        use std::os::unix::fs::PermissionsExt;
        crate::util::fsutil::write_atomic(
            &path,
            new.as_bytes(),
            meta.permissions().mode() & 0o7777,
        )?;
    }
    Ok(())
}

fn strip_text(text: &str, source_uuid: &str) -> String {
    let ours = format!("UUID={source_uuid} ");
    let mut after_marker = false;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if line.trim_end() == crate::tree::fstab::ADDED_COMMENT {
            after_marker = true;
            continue;
        }
        if after_marker && line.starts_with(&ours) {
            continue;
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_what_the_tool_added_on_the_source() {
        let t = "UUID=a /data ext4 defaults 0 2\n# Added by btrfs-deploy\nUUID=a / btrfs x 0 1\nUUID=c /srv btrfs y 0 2\nUUID=a /home btrfs y 0 2\n";
        assert_eq!(
            strip_text(t, "a"),
            "UUID=a /data ext4 defaults 0 2\nUUID=c /srv btrfs y 0 2\n"
        );
        assert_eq!(
            strip_text("UUID=a / btrfs x 0 1", "a"),
            "UUID=a / btrfs x 0 1"
        );
    }

    #[test]
    fn recognises_bundles_by_magic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, b"BTRFS-DEPLOY-BUNDLE\nrest").unwrap();
        assert!(is_bundle(&p));
        std::fs::write(&p, b"not one").unwrap();
        assert!(!is_bundle(&p));
        assert!(is_bundle(Path::new("-")));
    }
}
