//! Reading a bundle over HTTP(S) (`deploy --rootfs https://host/v2.bundle`).
//!
//! [`HttpReader`] is a `Read` over one URL from a given offset. It never
//! holds more than what the caller asks for: the payload goes through
//! `format::copy_verified` chunk by chunk, as from a pipe. When the
//! connection drops or stalls longer than the timeout, it asks again from
//! the byte it got to with a `Range: bytes=N-` request, at most `retries`
//! times in a row without progress, waiting 1, 2, 4… (at most 10) seconds
//! in between. A server that ignores ranges is read from the start and the
//! bytes already had are skipped. 4xx answers are not retried. Proxies come
//! from `http_proxy`/`https_proxy`/`no_proxy` (ureq); TLS is rustls with
//! the system's CA store.

use crate::util::ui;
use anyhow::{bail, Result};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// Timeouts and retries of HTTP reads (`--http-timeout`, `--http-retries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HttpOptions {
    /// Longest wait for a connection or for the next bytes.
    pub timeout: Duration,
    /// Attempts after a failure, in a row without progress.
    pub retries: u32,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            timeout: Duration::from_secs(30),
            retries: 5,
        }
    }
}

/// True when `rootfs` is an `http://` or `https://` URL.
pub(crate) fn is_url(rootfs: &Path) -> bool {
    rootfs
        .to_str()
        .is_some_and(|s| s.starts_with("http://") || s.starts_with("https://"))
}

/// What went wrong with one request.
enum Failure {
    /// Worth trying again (connection, timeout, 5xx, cut short).
    Retry(String),
    /// Not (4xx, a wrong range).
    Fatal(String),
}

/// A resuming reader of `url` from an offset.
pub(crate) struct HttpReader {
    agent: ureq::Agent,
    url: String,
    opts: HttpOptions,
    /// Offset of the next byte `read` returns.
    pos: u64,
    /// Size of the whole resource, when the server said.
    total: Option<u64>,
    body: Option<Box<dyn Read + Send + Sync>>,
    /// Failures since the last byte received.
    failures: u32,
}

impl HttpReader {
    /// Connects to `url` for the bytes from `offset`; fails now (with the
    /// retries spent) when the server cannot be reached or refuses.
    pub fn open(url: &str, offset: u64, opts: HttpOptions) -> Result<HttpReader> {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(opts.timeout)
            .timeout_read(opts.timeout)
            .timeout_write(opts.timeout)
            .try_proxy_from_env(true)
            .user_agent(concat!("btrfs-deploy/", env!("CARGO_PKG_VERSION")))
            .build();
        let mut r = HttpReader {
            agent,
            url: url.to_string(),
            opts,
            pos: offset,
            total: None,
            body: None,
            failures: 0,
        };
        r.ensure_body().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(r)
    }

    /// Size of the whole resource, if the server told it.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// One request for the bytes from `self.pos`.
    fn request(&mut self) -> std::result::Result<(), Failure> {
        let mut req = self.agent.get(&self.url);
        if self.pos > 0 {
            req = req.set("Range", &format!("bytes={}-", self.pos));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let what = format!("HTTP {code} {} from {}", r.status_text(), self.url);
                return Err(
                    if (500..600).contains(&code) || code == 429 || code == 408 {
                        Failure::Retry(what)
                    } else if code == 416 {
                        Failure::Fatal(format!(
                            "{what}: it has no bytes from offset {} (the file on the server is \
                         shorter than the bundle's manifest says)",
                            self.pos
                        ))
                    } else {
                        Failure::Fatal(format!("{what}: check the URL"))
                    },
                );
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(Failure::Retry(format!("{}: {t}", self.url)));
            }
        };
        let status = resp.status();
        let length = resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        let content_range = resp.header("Content-Range").map(str::to_string);
        let mut body = resp.into_reader();
        let start = if status == 206 {
            let total = check_range(content_range.as_deref(), self.pos, &self.url)
                .map_err(|e| Failure::Fatal(format!("{e:#}")))?;
            self.total = total.or(self.total);
            self.pos
        } else {
            // The whole resource.
            self.total = length.or(self.total);
            0
        };
        if start < self.pos {
            // The server ignores ranges: skip what we already had.
            let skip = self.pos - start;
            let copied = std::io::copy(&mut (&mut body).take(skip), &mut std::io::sink())
                .map_err(|e| Failure::Retry(format!("{}: {e}", self.url)))?;
            if copied < skip {
                return Err(Failure::Retry(format!(
                    "{}: the answer ended before offset {}",
                    self.url, self.pos
                )));
            }
        }
        self.body = Some(body);
        Ok(())
    }

    /// Makes sure a body is open, retrying as allowed.
    fn ensure_body(&mut self) -> std::io::Result<()> {
        while self.body.is_none() {
            match self.request() {
                Ok(()) => {}
                Err(Failure::Fatal(msg)) => return Err(std::io::Error::other(msg)),
                Err(Failure::Retry(msg)) => self.failed(msg)?,
            }
        }
        Ok(())
    }

    /// Counts a failure: an error once the retries are spent, else waits.
    fn failed(&mut self, msg: String) -> std::io::Result<()> {
        self.body = None;
        self.failures += 1;
        if self.failures > self.opts.retries {
            return Err(std::io::Error::other(format!(
                "{msg} (at byte {}; gave up after {} retries: --http-retries and --http-timeout \
                 set how long to keep trying)",
                self.pos, self.opts.retries
            )));
        }
        let wait =
            Duration::from_secs(1 << (self.failures - 1).min(3)).min(Duration::from_secs(10));
        ui::warn(format!(
            "{msg} (at byte {}); retrying in {} s ({} of {})",
            self.pos,
            wait.as_secs(),
            self.failures,
            self.opts.retries
        ));
        std::thread::sleep(wait);
        Ok(())
    }
}

impl Read for HttpReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.ensure_body()?;
            let body = self.body.as_mut().expect("a body after ensure_body");
            match body.read(buf) {
                Ok(0) => {
                    if self.total.is_some_and(|t| self.pos < t) {
                        let msg = format!("{}: the connection closed early", self.url);
                        self.failed(msg)?;
                        continue;
                    }
                    return Ok(0);
                }
                Ok(n) => {
                    self.pos += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    crate::util::signals::check().map_err(std::io::Error::other)?;
                }
                Err(e) => {
                    let msg = format!("{}: {e}", self.url);
                    self.failed(msg)?;
                }
            }
        }
    }
}

/// Parses `Content-Range: bytes A-B/T` into (A, T) (T None when `*`).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, _b) = range.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a, total))
}

/// Checks a 206 answer's range against the offset asked for.
fn check_range(content_range: Option<&str>, pos: u64, url: &str) -> Result<Option<u64>> {
    let Some(v) = content_range else {
        bail!("{url} answered 206 without a Content-Range");
    };
    let Some((start, total)) = parse_content_range(v) else {
        bail!("{url} answered with a Content-Range it did not format right: {v:?}");
    };
    if start != pos {
        bail!("{url} answered bytes from {start}, not from {pos} as asked");
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_urls_and_content_ranges() {
        assert!(is_url(Path::new("https://h/v2.bundle")));
        assert!(is_url(Path::new("http://127.0.0.1:8/x")));
        assert!(!is_url(Path::new("./https:/x")));
        assert!(!is_url(Path::new("-")));
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(check_range(Some("bytes 7-9/10"), 7, "u").unwrap(), Some(10));
        assert!(check_range(Some("bytes 0-9/10"), 7, "u").is_err());
        assert!(check_range(None, 7, "u").is_err());
    }
}
