//! `make install` into a DESTDIR (the binary under test, no build step):
//! every file is where it belongs, the installed binary runs and finds the
//! installed extensions (never the source tree's), `make uninstall` removes
//! everything again.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const PREFIX: &str = "/usr/local";

fn make(target: &str, destdir: &Path) {
    let out = Command::new("make")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .arg("--no-print-directory")
        .arg(target)
        .arg(format!("DEPLOY={}", env!("CARGO_BIN_EXE_deploy")))
        .arg(format!("DESTDIR={}", destdir.display()))
        .arg(format!("PREFIX={PREFIX}"))
        .output()
        .expect("running make");
    assert!(
        out.status.success(),
        "make {target} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir`, relative to it, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let out = sh(&format!(
        "cd {} && find . -type f -o -type l | sed 's|^\\./||' | sort",
        dir.display()
    ));
    out.lines().map(str::to_string).collect()
}

/// The subcommands `deploy --help` lists (without `help`).
fn subcommands(bin: &Path) -> Vec<String> {
    let out = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let section = help
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands section")
        .split("\n\n")
        .next()
        .unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn make_install_into_destdir_and_uninstall() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    make("install-built", &dest);
    let root = dest.join(PREFIX.trim_start_matches('/'));
    let p = |rel: &str| -> PathBuf { root.join(rel) };

    // The binary runs.
    let bin = p("bin/deploy");
    let out = Command::new(&bin).arg("-V").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("deploy {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(owner_mode(&bin).2 & 0o777, 0o755);

    // Man pages: deploy and every subcommand, all valid roff that man renders.
    let subs = subcommands(&bin);
    assert!(
        subs.len() >= 9 && subs.contains(&"boot-test".to_string()),
        "{subs:?}"
    );
    let mut pages = vec!["deploy".to_string()];
    pages.extend(subs.iter().map(|s| format!("deploy-{s}")));
    for page in &pages {
        let f = p(&format!("share/man/man1/{page}.1"));
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            text.contains(&format!(".TH {} 1 ", page.to_uppercase())),
            "{page}: {text}"
        );
    }
    // Completions, each naming the subcommands.
    for rel in [
        "share/bash-completion/completions/deploy",
        "share/zsh/site-functions/_deploy",
        "share/fish/vendor_completions.d/deploy.fish",
    ] {
        let text = std::fs::read_to_string(p(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        for s in &subs {
            assert!(text.contains(s.as_str()), "{rel} lacks {s}");
        }
    }
    // The bash completion works in bash: it completes a subcommand.
    let completed = sh(&format!(
        "bash -c 'source {}; COMP_WORDS=(deploy set-d); COMP_CWORD=1; COMP_LINE=\"deploy set-d\"; \
         COMP_POINT=${{#COMP_LINE}}; _deploy deploy set-d deploy; echo \"${{COMPREPLY[@]}}\"'",
        p("share/bash-completion/completions/deploy").display()
    ));
    assert_eq!(completed.trim(), "set-default");

    // The arm64 build (make build-arm64), which -e on-device carries onto
    // arm64 trees, next to it.
    let arm64 = p("lib/btrfs-deploy/arm64/deploy");
    let file = sh(&format!("file -b {}", arm64.display()));
    assert!(file.contains("ARM aarch64"), "{}: {file}", arm64.display());

    // Extensions and docs: exactly the files of the source tree.
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ext_dir = p("share/btrfs-deploy/extensions");
    assert_eq!(files_under(&ext_dir), files_under(&src.join("extensions")));
    for f in files_under(&ext_dir) {
        let want = owner_mode(&src.join("extensions").join(&f)).2 & 0o777;
        let have = owner_mode(&ext_dir.join(&f)).2 & 0o777;
        assert_eq!(have, if want & 0o100 != 0 { 0o755 } else { 0o644 }, "{f}");
    }
    let doc = p("share/doc/btrfs-deploy");
    assert!(doc.join("README.md").is_file());
    assert_eq!(
        files_under(&doc.join("docs")),
        files_under(&src.join("docs"))
    );

    // The installed binary finds the installed extensions (inside DESTDIR:
    // they are found relative to the executable, not through PREFIX).
    let out = Command::new(&bin)
        .args(["extensions", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ext_canon = ext_dir.canonicalize().unwrap();
    assert_eq!(v["search_path"], serde_json::json!([ext_canon]), "{v}");
    let names: Vec<&str> = v["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "fstab",
            "hostname",
            "install-files",
            "network",
            "on-device",
            "ssh-keys",
            "systemd-units",
            "users"
        ]
    );
    for e in v["extensions"].as_array().unwrap() {
        assert!(
            e["configure"]
                .as_str()
                .unwrap()
                .starts_with(ext_canon.to_str().unwrap()),
            "{e}"
        );
    }

    // Without its extensions, the installed binary never falls back to the
    // source tree: it names the folder where they belong.
    std::fs::rename(&ext_dir, tmp.path().join("moved")).unwrap();
    let out = Command::new(&bin)
        .args(["extensions", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["search_path"], serde_json::json!([ext_dir]), "{v}");
    assert_eq!(v["extensions"], serde_json::json!([]), "{v}");
    make_rootfs(&tmp.path().join("rootfs"));
    let out = Command::new(&bin)
        .args(["-e", "hostname", "--rootfs", "rootfs", "x.img"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("hostname") && stderr.contains(&format!("{} (missing)", ext_dir.display())),
        "{stderr}"
    );
    assert!(!tmp.path().join("x.img").exists());
    std::fs::rename(tmp.path().join("moved"), &ext_dir).unwrap();

    // make uninstall leaves no file.
    make("uninstall", &dest);
    assert_eq!(files_under(&dest), Vec::<String>::new());
}
