//! SIGINT, SIGTERM and SIGHUP during a deploy: the first one asks the work to
//! stop at the next safe point and clean up (remove the partial version or
//! image); a second one exits at once (the private mount namespace and
//! auto-clear loop devices still leave nothing behind on the host).

use anyhow::{bail, Result};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use std::sync::atomic::{AtomicI32, Ordering};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

fn set() -> SigSet {
    let mut s = SigSet::empty();
    s.add(Signal::SIGINT);
    s.add(Signal::SIGTERM);
    s.add(Signal::SIGHUP);
    s
}

/// Blocks the signals in this thread (and every thread started later) and
/// starts the thread that receives them. Call once, after entering the
/// private mount namespace (which needs a single-threaded process).
pub fn install() -> Result<()> {
    let sigs = set();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&sigs), None)?;
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let Ok(sig) = sigs.wait() else { continue };
        if RECEIVED.swap(sig as i32, Ordering::SeqCst) != 0 {
            errln!("error: {sig} received again: exiting without cleaning up (run `deploy cleanup TARGET`)");
            std::process::exit(128 + sig as i32);
        }
        errln!("==> {sig} received: stopping and cleaning up (send it again to exit at once)");
    })?;
    Ok(())
}

/// Unblocks the signals again; used in child processes before exec.
pub fn unblock_in_child() {
    let sigs = set();
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&sigs), None);
}

/// True once a stop was requested.
pub fn interrupted() -> bool {
    RECEIVED.load(Ordering::Relaxed) != 0
}

/// Fails with "interrupted by SIGx" once a stop was requested.
pub fn check() -> Result<()> {
    let sig = RECEIVED.load(Ordering::Relaxed);
    if sig != 0 {
        let name = Signal::try_from(sig)
            .map(|s| s.to_string())
            .unwrap_or_else(|_| sig.to_string());
        bail!("interrupted by {name}");
    }
    Ok(())
}
