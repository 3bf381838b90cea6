//! `deploy bundle create`: a version of a source disk as a signed bundle.

use super::format::{self, Base, ChunkHasher, Manifest, Payload};
use super::keys;
use crate::store::btrfs;
use crate::store::deployment::{self, Deployment};
use crate::store::layout::{self, Layout};
use crate::tree::kernel::{self, KernelChoice};
use crate::util::{cmd, ui, units};
use crate::UsageError;
use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// What `deploy bundle create` was asked for.
pub(crate) struct CreateRequest<'a> {
    /// Disk or image holding the versions.
    pub source: &'a Path,
    /// Version to ship.
    pub label: &'a str,
    /// Version the delta is made against (none: a full bundle).
    pub base: Option<&'a str>,
    /// Secret key.
    pub sign_key: &'a Path,
    /// Bundle to write (must not exist).
    pub output: &'a Path,
    /// Build number (default: the creation time in seconds).
    pub build: Option<u64>,
    /// How long devices accept it (None: forever).
    pub expires_in: Option<std::time::Duration>,
    /// Compress the send stream with zstd.
    pub compress: bool,
}

/// What was written.
pub(crate) struct Created {
    /// The manifest.
    pub manifest: Manifest,
    /// Bytes of the bundle file.
    pub file_size: u64,
}

/// Writes the bundle. Everything is checked before the output is created;
/// the output is created exclusively and removed on any failure.
pub(crate) fn create(req: &CreateRequest) -> Result<Created> {
    units::validate_label(req.label)
        .map_err(|e| UsageError(format!("invalid --version: {e:#}")))?;
    if let Some(b) = req.base {
        units::validate_label(b).map_err(|e| UsageError(format!("invalid --base: {e:#}")))?;
        if b == req.label {
            return Err(UsageError(format!(
                "--base {b} is the version itself: name an older version"
            ))
            .into());
        }
    }
    if std::fs::symlink_metadata(req.output).is_ok() {
        bail!(
            "{} already exists: bundles are never overwritten; choose another --output",
            req.output.display()
        );
    }
    let signer = keys::load_secret(req.sign_key)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("deploy bundle create must run as root: it mounts the source disk (try sudo)");
    }
    cmd::require(&[&cmd::BTRFS])?;
    crate::disk::mount::enter_private_namespace()?;
    crate::util::signals::install()?;
    crate::app::target::with_disk(req.source, true, |disk| {
        let top = &disk.layout;
        if !top.exists() {
            bail!(
                "{} does not hold the btrfs-deploy layout",
                req.source.display()
            );
        }
        let (orig, record) = version_orig(top, req.label, req.source)?;
        let base = match req.base {
            Some(b) => {
                let (base_orig, _) =
                    version_orig(top, b, req.source).with_context(|| format!("--base {b}"))?;
                Some((b, base_orig))
            }
            None => None,
        };
        let kernel_version = kernel_in_tree(&orig, &record, req.label)?;
        let info = libbtrfsutil::subvolume_info(&orig)
            .map_err(|e| e.os_error())
            .with_context(|| format!("reading {}", orig.display()))?;
        let base_info = match &base {
            Some((label, path)) => Some(Base {
                label: label.to_string(),
                uuid: libbtrfsutil::subvolume_info(path)
                    .map_err(|e| e.os_error())
                    .with_context(|| format!("reading {}", path.display()))?
                    .uuid()
                    .hyphenated()
                    .to_string(),
            }),
            None => None,
        };
        let (created, created_unix) = deployment::now();
        let mut manifest = Manifest {
            format: format::FORMAT_VERSION,
            label: req.label.to_string(),
            build: req.build.unwrap_or(created_unix),
            created,
            base: base_info,
            subvolume_uuid: info.uuid().hyphenated().to_string(),
            kernel_version,
            source_fs_uuid: disk.fs_uuid()?,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            expires: req
                .expires_in
                .map(|d| deployment::rfc3339(created_unix.saturating_add(d.as_secs()))),
            payload: Payload {
                kind: "btrfs-send".into(),
                size: 0,
                chunk_size: format::CHUNK_SIZE,
                sha256: Vec::new(),
                compression: req.compress.then(|| format::ZSTD.to_string()),
                stream_size: None,
            },
        };
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(req.output)
            .with_context(|| format!("creating {}", req.output.display()))?;
        let result = (|| -> Result<u64> {
            ui::step(format!(
                "Sending {} ({}{})",
                req.label,
                manifest.kind(),
                base.as_ref()
                    .map(|(b, _)| format!(" against {b}"))
                    .unwrap_or_default()
            ));
            let spool = spool_send(
                &orig,
                base.as_ref().map(|(_, p)| p.as_path()),
                req.output,
                req.compress,
            )?;
            let (mut spool, hasher, stream_size) = spool;
            manifest.payload.stream_size = Some(stream_size);
            let (size, hashes) = hasher.finish();
            manifest.payload.size = size;
            manifest.payload.sha256 = hashes;
            let bytes = serde_json::to_vec_pretty(&manifest)?;
            let signature = signer.sign(
                &bytes,
                &format!(
                    "btrfs-deploy bundle {} build {} ({})",
                    manifest.label,
                    manifest.build,
                    manifest.kind()
                ),
            )?;
            let mut w = std::io::BufWriter::new(&mut out);
            format::write_head(&mut w, &bytes, &signature)?;
            spool.rewind()?;
            std::io::copy(&mut spool, &mut w)?;
            w.flush()?;
            drop(w);
            out.sync_all()?;
            Ok(out.metadata()?.len())
        })();
        match result {
            Ok(file_size) => {
                ui::detail(format!("signed with key {}", signer.id()));
                Ok(Created {
                    manifest,
                    file_size,
                })
            }
            Err(e) => {
                drop(out);
                let _ = std::fs::remove_file(req.output);
                Err(e).with_context(|| format!("writing bundle {}", req.output.display()))
            }
        }
    })
}

/// The read-only `orig` of a complete version, and its record.
fn version_orig(top: &Layout, label: &str, source: &Path) -> Result<(PathBuf, Deployment)> {
    let dir = top.version(label);
    let record = dir.join(layout::DEPLOYMENT_JSON);
    if !record.is_file() {
        let known: Vec<String> = crate::store::versions::list(top)?
            .into_iter()
            .map(|v| v.label)
            .collect();
        bail!(
            "no version {label} on {}: it has {}",
            source.display(),
            known.join(", ")
        );
    }
    let orig = dir.join(layout::ORIG);
    if !btrfs::is_subvolume(&orig) || !btrfs::is_readonly(&orig)? {
        bail!(
            "{} is not a read-only subvolume: run `deploy check {}`",
            orig.display(),
            source.display()
        );
    }
    Ok((orig, Deployment::load(&record)?))
}

/// The kernel version in the version's tree. A bundle carries the tree
/// only: a version whose kernel came from the host (`--kernel`) is refused.
fn kernel_in_tree(orig: &Path, record: &Deployment, label: &str) -> Result<Option<String>> {
    if !record.has_kernel {
        return Ok(None);
    }
    let found = kernel::find_boot_files(orig, &KernelChoice::default()).with_context(|| {
        format!(
            "version {label} has a kernel, but not inside its tree (deployed with --kernel?): \
             a bundle carries the tree only, so a device could not boot it"
        )
    })?;
    Ok(found.version.or_else(|| record.kernel_version.clone()))
}

/// The spool file, hashing what is written to it.
struct Spool {
    file: std::fs::File,
    hasher: ChunkHasher,
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// zstd level of `--compress zstd`: fast, most of the gain.
const ZSTD_LEVEL: i32 = 3;

/// Runs `btrfs send` into an anonymous temp file beside `output`
/// (zstd-compressed when `compress`), hashing what is stored. Returns the
/// file, the hashes and the size of the send stream itself.
fn spool_send(
    orig: &Path,
    parent: Option<&Path>,
    output: &Path,
    compress: bool,
) -> Result<(std::fs::File, ChunkHasher, u64)> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = tempfile::tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    let spool = Spool {
        file,
        hasher: ChunkHasher::default(),
    };
    let mut command = std::process::Command::new("btrfs");
    command.arg("send").arg("-q");
    if let Some(p) = parent {
        command.arg("-p").arg(p);
    }
    command.arg(orig);
    tracing::debug!(?command, "running");
    cmd::prepare(&mut command);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().context("starting btrfs send")?;
    let mut stdout = child.stdout.take().context("btrfs send stdout")?;
    let mut stderr = child.stderr.take().context("btrfs send stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut buf = vec![0u8; 1 << 20];
    let copy = (|| -> Result<(Spool, u64)> {
        let mut sink = if compress {
            Sink::Zstd(zstd::stream::write::Encoder::new(spool, ZSTD_LEVEL)?)
        } else {
            Sink::Plain(spool)
        };
        let mut stream_size = 0u64;
        loop {
            let n = stdout.read(&mut buf)?;
            if n == 0 {
                break;
            }
            stream_size += n as u64;
            match &mut sink {
                Sink::Plain(s) => s.write_all(&buf[..n]),
                Sink::Zstd(e) => e.write_all(&buf[..n]),
            }
            .map_err(crate::util::fsutil::name_enospc)?;
        }
        let spool = match sink {
            Sink::Plain(s) => s,
            Sink::Zstd(e) => e.finish().map_err(crate::util::fsutil::name_enospc)?,
        };
        Ok((spool, stream_size))
    })();
    if copy.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for btrfs send")?;
    let err = err_thread.join().unwrap_or_default();
    let (spool, stream_size) = copy?;
    if !status.success() {
        bail!(
            "`btrfs send {}` failed ({status}):\n{}",
            orig.display(),
            cmd::tail_lines(&err, 15)
        );
    }
    Ok((spool.file, spool.hasher, stream_size))
}

/// Where the send stream goes: straight to the spool, or through zstd.
enum Sink {
    Plain(Spool),
    Zstd(zstd::stream::write::Encoder<'static, Spool>),
}
