//! The test web server (tests/fixture/http-server.py) on 127.0.0.1, for the
//! HTTP bundle tests and the fleet test.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The test web server, killed on drop.
pub struct Server {
    child: std::process::Child,
    pub port: u16,
    dir: PathBuf,
}

impl Server {
    /// Serves `dir`; `/cut/` and `/slow/` answers stop after `cut` bytes.
    pub fn start(dir: &Path, cut: u64) -> Server {
        use std::io::BufRead;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture/http-server.py");
        let mut child = std::process::Command::new("python3")
            .arg(&script)
            .arg(dir)
            .arg(cut.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting python3 tests/fixture/http-server.py");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the server prints its port");
        Server {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    pub fn url(&self, mode: &str, name: &str) -> String {
        format!("http://127.0.0.1:{}/{mode}/{name}", self.port)
    }

    /// The requests so far, as "PATH RANGE" lines.
    pub fn requests(&self) -> String {
        std::fs::read_to_string(self.dir.join("requests.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
