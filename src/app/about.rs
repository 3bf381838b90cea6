//! `deploy -V` and `deploy version [--json]`: the tool's version and how it
//! was built (commit, target triple, profile, features; see build.rs).

use anyhow::Result;
use serde::Serialize;

/// What `deploy version --json` prints (with `"format"`).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BuildInfo {
    /// The tool's version (Cargo.toml).
    pub version: &'static str,
    /// Git commit the binary was built from; null when built outside git.
    pub git_commit: Option<&'static str>,
    /// Target triple, e.g. `x86_64-unknown-linux-gnu`.
    pub target: &'static str,
    /// Cargo profile (`release`, `debug`).
    pub profile: &'static str,
    /// Cargo features enabled at build time.
    pub features: Vec<&'static str>,
}

/// The details of this build.
pub fn build_info() -> BuildInfo {
    let commit = env!("DEPLOY_GIT_COMMIT");
    BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        git_commit: (!commit.is_empty()).then_some(commit),
        target: env!("DEPLOY_TARGET_TRIPLE"),
        profile: env!("DEPLOY_BUILD_PROFILE"),
        features: env!("DEPLOY_FEATURES")
            .split(',')
            .filter(|f| !f.is_empty())
            .collect(),
    }
}

/// `deploy version`.
pub fn print(json: bool) -> Result<()> {
    let info = build_info();
    if json {
        crate::util::json::print(&info)
    } else {
        outln!("deploy {}", info.version);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_this_build() {
        let info = build_info();
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert!(info.target.contains("linux"), "{info:?}");
        // This crate is built from its git checkout in development and CI.
        let commit = info.git_commit.expect("commit known at build time");
        assert!(
            commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{commit}"
        );
        let v = serde_json::to_value(&info).unwrap();
        for k in ["version", "git_commit", "target", "profile", "features"] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
    }
}
