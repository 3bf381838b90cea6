//! The verdicts of the tools users trust (issue 25): lintian on the .deb,
//! `mandoc -Tlint` on the man pages, `shellcheck -S warning` on the shipped
//! extensions, and on a device disk with a pending trial (Debian with
//! systemd, `-e on-device`): `systemd-analyze verify` on the units it
//! installs, `bootctl list` on its ESP and `findmnt --verify` on every
//! version's fstab.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Both packages of `make deb`: amd64, and arm64 (the cross build, issue 22).
#[test]
fn lintian_finds_nothing_in_the_package() {
    for arch in ["amd64", "arm64"] {
        let deb = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "target/debian/btrfs-deploy_{}-1_{arch}.deb",
            env!("CARGO_PKG_VERSION")
        ));
        assert!(deb.is_file(), "{} missing: run `make deb`", deb.display());
        let (ok, text) = output(
            Command::new("lintian")
                .args(["--fail-on", "error,warning", "--info"])
                .arg(&deb),
        );
        let tags: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
            .collect();
        assert!(ok && tags.is_empty(), "lintian on {arch}:\n{text}");
    }
    // The arm64 one holds the aarch64 build.
    let x = tempfile::tempdir().unwrap();
    let (ok, text) = output(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb -x {}/target/debian/btrfs-deploy_{}-1_arm64.deb {} && file -b {}/usr/bin/deploy",
        env!("CARGO_MANIFEST_DIR"),
        env!("CARGO_PKG_VERSION"),
        x.path().display(),
        x.path().display()
    )));
    assert!(ok && text.contains("ARM aarch64"), "{text}");
}

#[test]
fn man_pages_pass_mandoc_lint() {
    let d = tempfile::tempdir().unwrap();
    run_ok(&["generate-man", d.path().to_str().unwrap()]);
    let pages: Vec<PathBuf> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(pages.len() >= 15, "{pages:?}");
    for p in &pages {
        let (ok, text) = output(Command::new("mandoc").arg("-Tlint").arg(p));
        assert!(
            ok && text.is_empty(),
            "mandoc -Tlint {}:\n{text}",
            p.display()
        );
    }
    let page = std::fs::read_to_string(d.path().join("deploy-health.1")).unwrap();
    assert!(page.contains(".TH DEPLOY-HEALTH 1 "), "{page}");
}

#[test]
fn shipped_extensions_pass_shellcheck() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("extensions");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() > 10, "{files:?}");
    let (ok, text) = output(
        Command::new("shellcheck")
            .args(["-S", "warning", "-x"])
            .current_dir(&dir)
            .args(files.iter().map(|f| f.file_name().unwrap())),
    );
    assert!(ok, "shellcheck -S warning:\n{text}");
}

/// A read-only mount, unmounted (and its loop device detached) on drop.
struct Mounted {
    dir: tempfile::TempDir,
    dev: String,
    fuse: bool,
}

impl Mounted {
    fn new(image: &Path, range: (u64, u64), fuse: bool) -> Mounted {
        let dev = sh(&format!(
            "losetup --find --show --read-only --offset {} --sizelimit {} {}",
            range.0,
            range.1,
            image.display()
        ))
        .trim()
        .to_string();
        let dir = tempfile::tempdir().unwrap();
        let m = Mounted { dir, dev, fuse };
        if fuse {
            sh(&format!("fusefat -o ro {} {}", m.dev, m.path().display()));
        } else {
            sh(&format!("mount -o ro {} {}", m.dev, m.path().display()));
        }
        m
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let p = self.dir.path().to_owned();
        if self.fuse {
            let _ = Command::new("fusermount").arg("-u").arg(&p).status();
        } else {
            let _ = Command::new("umount").arg(&p).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn a_device_disk_with_a_pending_trial_passes_systemd_bootctl_and_findmnt() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("device.img");
    let imgs = img.to_str().unwrap();
    let rootfs = debian_rootfs();
    let r = rootfs.to_str().unwrap();
    run_ok(&["-e", "on-device", "--rootfs", r, imgs]);
    run_ok(&[
        "-e",
        "on-device",
        "--version",
        "v2",
        "--trial",
        "--rootfs",
        r,
        imgs,
    ]);

    {
        let fs = Mounted::new(&img, btrfs_partition(&img).unwrap(), false);
        for v in ["factory", "v2"] {
            let run = fs.path().join("systems").join(v).join("run");
            // Every line of the fstab: source found, type known, options valid.
            let (ok, text) = output(
                Command::new("findmnt")
                    .args(["--verify", "--tab-file"])
                    .arg(run.join("etc/fstab")),
            );
            assert!(
                ok && text.contains("no errors or warnings"),
                "findmnt --verify of {v}'s fstab:\n{text}"
            );
            // The units on-device installs, checked against the version's
            // own tree (the programs they start, the targets they name).
            let units: Vec<String> = [
                "btrfs-deploy-trial-watch.service",
                "btrfs-deploy-health.service",
            ]
            .iter()
            .map(|u| u.to_string())
            .collect();
            for u in &units {
                assert!(run.join("etc/systemd/system").join(u).is_file(), "{v}: {u}");
            }
            let (ok, text) = output(
                Command::new("systemd-analyze")
                    .arg("verify")
                    .arg(format!("--root={}", run.display()))
                    // The pages are checked below in the tree; `man` here
                    // would look on the host.
                    .arg("--man=no")
                    .args(&units)
                    .env("SYSTEMD_LOG_LEVEL", "notice"),
            );
            assert!(
                ok && text.trim().is_empty(),
                "systemd-analyze verify ({v}):\n{text}"
            );
            for page in ["deploy-health.1", "deploy-trial-watch.1"] {
                assert!(
                    run.join("usr/local/share/man/man1").join(page).is_file(),
                    "{v}: the units' Documentation= page {page} is not in the tree"
                );
            }
        }
    }

    let esp = sh(&format!("sfdisk --json {imgs}"));
    let esp: serde_json::Value = serde_json::from_str(&esp).unwrap();
    let p = &esp["partitiontable"]["partitions"][0];
    let range = (
        p["start"].as_u64().unwrap() * 512,
        p["size"].as_u64().unwrap() * 512,
    );
    let esp = Mounted::new(&img, range, true);
    let (ok, text) = output(
        Command::new("bootctl")
            .arg(format!("--esp-path={}", esp.path().display()))
            .args(["--no-pager", "list"])
            // fusefat is not the kernel's vfat, which bootctl looks for.
            .env("SYSTEMD_RELAX_ESP_CHECKS", "1"),
    );
    assert!(ok, "bootctl list:\n{text}");
    for id in [
        "id: factory.conf",
        "id: v2.conf",
        "id: next-1-trial.conf",
        "id: next-2-default.conf",
    ] {
        assert!(text.contains(id), "bootctl lists no {id}:\n{text}");
    }
    // The counted trial entry: recognised as such, one try left, the default.
    let trial = text
        .split("\n\n")
        .find(|e| e.contains("id: next-1-trial.conf"))
        .unwrap();
    assert!(trial.contains("tries: 1 left; 0 done"), "{trial}");
    assert!(trial.contains("(default)"), "{trial}");
    assert!(trial.contains("btrfs_deploy.trial=v2"), "{trial}");
    drop(esp);
    assert_no_leftovers(&img, false);
}
