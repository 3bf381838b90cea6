//! qcow2 overlays of a disk: a boot-test writes to one, never to the disk
//! under it (UEFI boots of another version, `--persist` off).

use super::*;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A temporary qcow2 overlay of a disk: the guest (and the writes given to
/// [`Overlay::new`]) change the overlay, never the disk under it. Removed
/// on drop.
pub struct Overlay {
    _dir: tempfile::TempDir,
    /// The qcow2 file to boot.
    pub path: PathBuf,
}

impl Overlay {
    /// An overlay of `disk` (a raw image or block device) holding `writes`
    /// (byte offset on the disk, data).
    pub fn new(disk: &Path, writes: &[(u64, Vec<u8>)]) -> Result<Overlay> {
        use crate::util::cmd;
        cmd::require(&[&QEMU_IMG, &QEMU_IO])?;
        let dir = tempfile::Builder::new()
            .prefix("btrfs-deploy-overlay.")
            .tempdir()
            .context("creating a directory for the boot-test overlay")?;
        let path = dir.path().join("overlay.qcow2");
        let backing = disk
            .canonicalize()
            .with_context(|| format!("resolving {}", disk.display()))?;
        let (b, p) = (backing.to_string_lossy(), path.to_string_lossy());
        cmd::run(
            QEMU_IMG.program,
            &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &b, &p],
        )?;
        let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
        for (i, (off, data)) in writes.iter().enumerate() {
            let chunk = dir.path().join(format!("write-{i}"));
            std::fs::write(&chunk, data).with_context(|| format!("writing {}", chunk.display()))?;
            args.push("-c".into());
            args.push(format!(
                "write -q -s {} {off} {}",
                chunk.display(),
                data.len()
            ));
        }
        args.push(p.into_owned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cmd::run(QEMU_IO.program, &argv)?;
        if out.contains("failed") {
            bail!(
                "writing the boot-test overlay of {}: {}",
                disk.display(),
                out.trim()
            );
        }
        Ok(Overlay { _dir: dir, path })
    }
}
