//! Loop devices attached with auto-clear, so the kernel detaches them as soon
//! as the last user (our file descriptor or a mount) goes away — even when
//! this process is killed.

use anyhow::{Context, Result};
use loopdev::{LoopControl, LoopDevice};
use std::path::{Path, PathBuf};

/// A loop device attached to a backing file; detached on [`LoopGuard::close`]
/// or, best effort, on drop.
pub struct LoopGuard {
    dev: Option<LoopDevice>,
    path: PathBuf,
}

impl LoopGuard {
    /// Attaches `file` to a free loop device with auto-clear set.
    pub fn attach(file: &Path, read_only: bool) -> Result<LoopGuard> {
        let control = LoopControl::open()
            .context("opening /dev/loop-control (is the loop module loaded?)")?;
        let mut last_err = None;
        // Another process may grab the device we were offered: retry a few times.
        for _ in 0..10 {
            let dev = control.next_free().context("finding a free loop device")?;
            match dev.with().autoclear(true).read_only(read_only).attach(file) {
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

    /// The device node, e.g. `/dev/loop3`.
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
