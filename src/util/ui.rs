//! What the user sees while a command runs: step lines, and progress bars on
//! a terminal (nothing but the steps when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

static LEVEL: AtomicU8 = AtomicU8::new(1);

/// Sets the verbosity: 0 quiet, 1 normal, 2 verbose.
pub fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

/// True unless `--quiet`.
pub fn enabled() -> bool {
    LEVEL.load(Ordering::Relaxed) > 0
}

/// Announces a step of the work.
pub fn step(msg: impl AsRef<str>) {
    if enabled() {
        errln!("==> {}", msg.as_ref());
    }
}

/// A detail under the current step.
pub fn detail(msg: impl AsRef<str>) {
    if enabled() {
        errln!("    {}", msg.as_ref());
    }
}

/// A warning: printed even with `--quiet` (as `warning: ...`); a closed
/// stderr is ignored.
pub fn warn(msg: impl AsRef<str>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "warning: {}", msg.as_ref());
}

/// A progress display fed from copy counters; shown only on a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Shows progress of `counters` against an expected `total_bytes`.
    pub fn start(
        what: &str,
        counters: Arc<crate::tree::copy::Progress>,
        total_bytes: u64,
    ) -> Progress {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if !enabled() || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                stop,
                thread: None,
            };
        }
        // Without a known total (an upgrade does not measure the rootfs
        // first) the bar becomes a counter.
        let (bar, template) = if total_bytes == 0 {
            (
                ProgressBar::new_spinner(),
                "    {spinner} {msg} {bytes} {binary_bytes_per_sec}",
            )
        } else {
            (
                ProgressBar::new(total_bytes),
                "    {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        let (b, s) = (bar.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let bytes = counters.bytes.load(Ordering::Relaxed);
                let entries = counters.entries.load(Ordering::Relaxed);
                b.set_position(b.length().map_or(bytes, |len| bytes.min(len)));
                b.tick();
                b.set_message(format!("{entries} files"));
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        Progress {
            bar: Some(bar),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
