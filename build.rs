//! Build details for `deploy version --json`: the git commit the binary is
//! built from (when built from a git checkout, or given as
//! `DEPLOY_GIT_COMMIT`), the target triple and the build profile directory
//! (so a binary still in the build tree finds the source tree's extensions,
//! and an installed one never does).

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=DEPLOY_GIT_COMMIT");
    let commit = std::env::var("DEPLOY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // Rebuild when HEAD moves (HEAD itself, the branch it names, packed refs).
            // (A missing file would make cargo rerun this script every build.)
            let branch = git(&["symbolic-ref", "-q", "HEAD"]);
            for p in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
                if let Some(f) = git(&["rev-parse", "--git-path", p]) {
                    if Path::new(&f).exists() {
                        println!("cargo:rerun-if-changed={f}");
                    }
                }
            }
            git(&["rev-parse", "HEAD"])
        })
        .unwrap_or_default();
    println!("cargo:rustc-env=DEPLOY_GIT_COMMIT={commit}");
    // The date of that commit (YYYY-MM-DD): the man pages' date.
    let date = std::env::var("DEPLOY_GIT_DATE")
        .ok()
        .filter(|d| !d.is_empty())
        .or_else(|| git(&["log", "-1", "--format=%cs"]))
        .unwrap_or_default();
    println!("cargo:rerun-if-env-changed=DEPLOY_GIT_DATE");
    println!("cargo:rustc-env=DEPLOY_GIT_DATE={date}");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=DEPLOY_TARGET_TRIPLE={target}");
    let profile = std::env::var("PROFILE").unwrap_or_default();
    println!("cargo:rustc-env=DEPLOY_BUILD_PROFILE={profile}");
    // OUT_DIR is <target dir>/<profile>/build/<pkg>-<hash>/out.
    let out_dir = std::env::var("OUT_DIR").unwrap_or_default();
    let profile_dir = Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=DEPLOY_BUILD_DIR={profile_dir}");
    let features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| {
            k.strip_prefix("CARGO_FEATURE_")
                .map(|f| f.to_lowercase().replace('_', "-"))
        })
        .collect();
    println!("cargo:rustc-env=DEPLOY_FEATURES={}", features.join(","));
}
