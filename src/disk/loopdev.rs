//! Loop devices attached with auto-clear, so the kernel detaches them as soon
//! as the last user (our file descriptor or a mount) goes away — even when
//! this process is killed.

use anyhow::{Context, Result};
use loopdev::{LoopControl, LoopDevice};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A loop device attached to a backing file; detached on [`LoopGuard::close`]
/// or, best effort, on drop.
pub struct LoopGuard {
    /// `None` for a partition's own device (nothing to detach).
    dev: Option<LoopDevice>,
    path: PathBuf,
}

impl LoopGuard {
    /// Attaches `file` to a free loop device with auto-clear set: the byte
    /// range `(offset, size)` of `file` (a partition of a
    /// disk image or device: this works without the kernel parsing the
    /// partition table), or all of it for `None`.
    ///
    /// A range that is a partition the kernel knows of a block device (a
    /// device's own disk, `/dev/vda2`) is that partition's device instead,
    /// with nothing attached: a device reads its own disk without the loop
    /// module.
    pub fn attach_range(
        file: &Path,
        range: Option<(u64, u64)>,
        read_only: bool,
    ) -> Result<LoopGuard> {
        if let Some(path) = range.and_then(|r| crate::disk::partdev::partition_device(file, r)) {
            tracing::debug!(device = %path.display(), disk = %file.display(), "partition device");
            return Ok(LoopGuard { dev: None, path });
        }
        let control = LoopControl::open()
            .context("opening /dev/loop-control (is the loop module loaded?)")?;
        let mut last_err = None;
        // Another process may grab the device we were offered: retry a few times.
        for _ in 0..10 {
            let dev = control.next_free().context("finding a free loop device")?;
            let attached = match configure(&dev, file, range, read_only) {
                Some(r) => r,
                None => {
                    let mut opts = dev.with().autoclear(true).read_only(read_only);
                    if let Some((offset, size)) = range {
                        opts = opts.offset(offset).size_limit(size);
                    }
                    opts.attach(file)
                }
            };
            match attached {
                Ok(()) => {
                    let path = dev.path().context("loop device without a path")?;
                    tracing::debug!(device = %path.display(), file = %file.display(), "attached");
                    return Ok(LoopGuard {
                        dev: Some(dev),
                        path,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("attaching {} to a loop device", file.display()))
                }
            }
        }
        Err(last_err.expect("loop attach retried"))
            .with_context(|| format!("attaching {} to a loop device", file.display()))
    }

    /// The device node, e.g. `/dev/loop3` (or `/dev/vda2`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detaches the device (call after everything on it is unmounted).
    pub fn close(mut self) -> Result<()> {
        self.detach()
    }

    fn detach(&mut self) -> Result<()> {
        if let Some(dev) = self.dev.take() {
            match dev.detach() {
                Ok(()) => {}
                // Already cleared by auto-clear.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("detaching {}", self.path.display()))
                }
            }
        }
        Ok(())
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!("{e:#}");
        }
    }
}

/// `struct loop_info64` of linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` of linux/loop.h.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Attaches with one LOOP_CONFIGURE (Linux 5.8+): backing file and
/// auto-clear are set atomically, so a `kill -9` at any moment cannot leave
/// a device attached without auto-clear (LOOP_SET_FD then LOOP_SET_STATUS64
/// has that window). `None` when the kernel lacks LOOP_CONFIGURE.
fn configure(
    dev: &LoopDevice,
    file: &Path,
    range: Option<(u64, u64)>,
    read_only: bool,
) -> Option<std::io::Result<()>> {
    let backing = match std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(file)
    {
        Ok(f) => f,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
    cfg.fd = backing.as_raw_fd() as u32;
    if let Some((offset, size)) = range {
        cfg.info.offset = offset;
        cfg.info.sizelimit = size;
    }
    cfg.info.flags = LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
    // SAFETY: the ioctl reads a properly laid out loop_config.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
    if rc == 0 {
        return Some(Ok(()));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::EINVAL) => None,
        _ => Some(Err(e)),
    }
}
