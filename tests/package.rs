//! The Debian package (`make deb`) in a clean Debian 12 chroot (`make
//! deb-chroot`, cached in .cache/debian12): apt installs it, `deploy --help`,
//! `man -w deploy` and `deploy extensions` work, and a deploy of the tiny
//! system from inside the chroot (with /dev bound) succeeds.
//!
//! The cached chroot is never changed: the test works on a plain copy of it
//! in a directory, whose `/` is not a mount point, as in sbuild, pbuilder,
//! schroot and many CI build roots (an overlay would be a mount point and
//! hide the difference), in a private mount namespace (`unshare -m`) whose
//! mounts are shared among themselves, so a mount `deploy` let escape from
//! its own namespace would show up in `host-mounts`.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The .deb under test: `DEPLOY_DEB`, else the one `make deb` wrote.
fn package() -> PathBuf {
    if let Some(p) = std::env::var_os("DEPLOY_DEB") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let want = format!("btrfs-deploy_{}-1_amd64.deb", env!("CARGO_PKG_VERSION"));
    let p = dir.join(&want);
    assert!(
        p.is_file(),
        "{} missing: run `make deb` (or `make deb-test`)",
        p.display()
    );
    p
}

/// The cached clean chroot.
fn chroot_base() -> PathBuf {
    let p = std::env::var_os("DEPLOY_DEB_CHROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/debian12"));
    assert!(
        p.join(".stamp").is_file(),
        "Debian 12 chroot missing at {}: run `make deb-chroot` (scripts/build-deb-chroot.sh .cache)",
        p.display()
    );
    p
}

/// Runs `steps` (name, shell command run in the chroot) inside a directory
/// copy of the chroot with the package copied to /tmp/pkg.deb, the tiny system at
/// /tiny (read-only) and `out` at /out. Each step's stdout, stderr and exit
/// status land in `out/<name>.{stdout,stderr,rc}`.
fn in_chroot(out: &Path, steps: &[(&str, &str)]) -> PathBuf {
    let work = tempfile::tempdir().unwrap();
    let mut script = format!(
        r#"set -eu
base={base}; w={work}; out={out}
mkdir -p $w/root
cp -a $base/. $w/root/
r=$w/root
# A peer group of this namespace only: what the chroot's deploy mounts
# reaches these mounts (and host-mounts below) only if it escapes its own.
mount --make-rshared /
mount --rbind /dev $r/dev
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mkdir -p $r/tiny $r/out
mount --bind {tiny} $r/tiny
mount -o remount,bind,ro $r/tiny
mount --bind $out $r/out
cp {deb} $r/tmp/pkg.deb
step() {{
  set +e
  chroot $r /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    /bin/sh -c "$2" >$out/$1.stdout 2>$out/$1.stderr
  echo $? >$out/$1.rc
  set -e
}}
"#,
        base = chroot_base().display(),
        work = work.path().display(),
        out = out.display(),
        tiny = tiny_rootfs().display(),
        deb = package().display(),
    );
    for (name, cmd) in steps {
        script.push_str(&format!("step {name} '{}'\n", cmd.replace('\'', r"'\''")));
    }
    script.push_str("cat /proc/self/mountinfo >$out/host-mounts\n");
    let st = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", &script])
        .status()
        .unwrap();
    assert!(st.success(), "setting up the chroot failed");
    work.path().join("root")
}

struct Step {
    rc: i32,
    stdout: String,
    stderr: String,
}

fn step(out: &Path, name: &str) -> Step {
    let read = |ext: &str| std::fs::read_to_string(out.join(format!("{name}.{ext}"))).unwrap();
    Step {
        rc: read("rc").trim().parse().unwrap(),
        stdout: read("stdout"),
        stderr: read("stderr"),
    }
}

fn ok(out: &Path, name: &str) -> Step {
    let s = step(out, name);
    assert_eq!(s.rc, 0, "{name} failed:\n{}{}", s.stdout, s.stderr);
    s
}

#[test]
fn package_installs_and_deploys_in_a_clean_debian_12() {
    let deb = package();
    // Control fields: what the binary needs, and what a boot needs.
    let field = |f: &str| sh(&format!("dpkg-deb -f {} {f}", deb.display()));
    let depends = field("Depends");
    for d in ["btrfs-progs", "libbtrfsutil1", "libc6", "mount"] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    let recommends = field("Recommends");
    for r in [
        "extlinux",
        "syslinux-common",
        "fdisk",
        "mtools",
        "dosfstools",
        "patchelf",
        "systemd-boot-efi",
    ] {
        assert!(recommends.contains(r), "Recommends lacks {r}: {recommends}");
    }
    // boot-test's QEMU is suggested: a device that only adds versions does
    // not get an emulator with its recommended packages.
    let suggests = field("Suggests");
    for q in ["qemu-system-x86", "qemu-utils", "ovmf"] {
        assert!(suggests.contains(q), "Suggests lacks {q}: {suggests}");
        assert!(!recommends.contains(q), "Recommends has {q}: {recommends}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let root = in_chroot(
        &out,
        &[
            ("before", "command -v deploy || echo absent"),
            (
                "install",
                // What the default (hybrid) disks need beyond the chroot's
                // extlinux: the recommended partitioning and FAT tools.
                "apt-get install -y -q --no-install-recommends /tmp/pkg.deb \
                 fdisk mtools dosfstools systemd-boot-efi",
            ),
            ("help", "deploy --help"),
            ("man", "man -w deploy && man -w deploy-list"),
            ("version", "deploy version --json"),
            ("extensions", "deploy extensions"),
            (
                "deploy",
                "cd /tmp && deploy --json --rootfs /tiny /out/disk.img",
            ),
            // A device adds versions to its (hybrid) disk without fdisk:
            // the partition table is read, never rewritten.
            ("nofdisk", "dpkg --purge fdisk && ! command -v sfdisk"),
            (
                "upgrade",
                "deploy --json --version v2 --rootfs /tiny /out/disk.img",
            ),
            ("check", "deploy check /out/disk.img"),
            ("list", "deploy list --json /out/disk.img"),
            (
                "completion",
                "ls /usr/share/bash-completion/completions/deploy",
            ),
        ],
    );
    assert_eq!(ok(&out, "before").stdout.trim(), "absent");
    ok(&out, "install");
    assert!(ok(&out, "help").stdout.contains("Usage: deploy"));
    let man = ok(&out, "man").stdout;
    assert!(
        man.contains("/usr/share/man/man1/deploy.1.gz")
            && man.contains("/usr/share/man/man1/deploy-list.1.gz"),
        "{man}"
    );
    // The package holds the binary under test (same commit): not a stale one.
    let v: serde_json::Value = serde_json::from_str(&ok(&out, "version").stdout).unwrap();
    let host = Command::new(env!("CARGO_BIN_EXE_deploy"))
        .args(["version", "--json"])
        .output()
        .unwrap();
    let host: serde_json::Value = serde_json::from_slice(&host.stdout).unwrap();
    assert_eq!(
        v["git_commit"], host["git_commit"],
        "the package is from another commit: run `make deb`"
    );
    let ext = ok(&out, "extensions").stdout;
    for name in ["hostname", "users", "ssh-keys", "network", "fstab"] {
        assert!(ext.contains(name), "{name} missing:\n{ext}");
    }
    assert!(ext.contains("/usr/share/btrfs-deploy/extensions"), "{ext}");
    let d = ok(&out, "deploy");
    let summary: serde_json::Value =
        serde_json::from_str(&d.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", d.stdout, d.stderr));
    assert_eq!(summary["kind"], "new");
    assert_eq!(summary["label"], "factory");
    ok(&out, "nofdisk");
    let up: serde_json::Value = serde_json::from_str(&ok(&out, "upgrade").stdout).unwrap();
    ok(&out, "check");
    assert_eq!(up["label"], "v2");
    let list: serde_json::Value = serde_json::from_str(&ok(&out, "list").stdout).unwrap();
    assert_eq!(list["versions"][0]["label"], "factory");
    assert_eq!(list["versions"][1]["label"], "v2");
    // Nothing the deploys mounted inside the chroot escaped their namespace.
    let seen = std::fs::read_to_string(out.join("host-mounts")).unwrap();
    let ours = ["dev", "proc", "sys", "tiny", "out"].map(|d| root.join(d));
    for l in seen.lines() {
        let point = Path::new(l.split(' ').nth(4).unwrap_or_default());
        assert!(
            !point.starts_with(&root) || point == root || ours.iter().any(|d| point.starts_with(d)),
            "a mount of the chroot's deploy escaped its namespace: {l}\n{seen}"
        );
    }
    ok(&out, "completion");

    // The image made inside the chroot is a good disk for the host's deploy.
    let img = out.join("disk.img");
    run_ok(&["check", img.to_str().unwrap()]);
    assert_no_leftovers(&img, false);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(tmp.path().to_str().unwrap()),
        "a mount of the test is left:\n{mounts}"
    );
}
