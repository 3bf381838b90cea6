//! Integration: bad input gets one clear error, exit 1 (2 for usage), and
//! leaves nothing behind: no image, no .partial, no mount, no loop device.

mod common;
use common::*;
use std::path::Path;

fn setup() -> (tempfile::TempDir, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let img = tmp.path().join("disk.img");
    let (r, i) = (
        rootfs.to_str().unwrap().to_string(),
        img.to_str().unwrap().to_string(),
    );
    (tmp, r, i)
}

fn assert_untouched(img: &str) {
    assert!(!Path::new(img).exists(), "{img} was created");
    assert_no_leftovers(Path::new(img), false);
}

#[test]
fn missing_rootfs() {
    let (tmp, _, img) = setup();
    let missing = tmp.path().join("nope");
    run_fails(
        &["--rootfs", missing.to_str().unwrap(), &img],
        1,
        &["rootfs", "nope", "does not exist"],
    );
    assert_untouched(&img);
}

#[test]
fn rootfs_is_a_file() {
    let (tmp, _, img) = setup();
    let f = tmp.path().join("file");
    write(&f, b"x");
    run_fails(
        &["--rootfs", f.to_str().unwrap(), &img],
        1,
        &["not a directory"],
    );
    assert_untouched(&img);
}

#[test]
fn empty_rootfs() {
    let (tmp, _, img) = setup();
    let e = tmp.path().join("empty");
    std::fs::create_dir(&e).unwrap();
    run_fails(&["--rootfs", e.to_str().unwrap(), &img], 1, &["is empty"]);
    assert_untouched(&img);
}

#[test]
fn invalid_labels_are_usage_errors() {
    let (_tmp, rootfs, img) = setup();
    for bad in [
        "../x",
        "a/b",
        "default",
        "",
        ".hidden",
        "-x",
        &"x".repeat(65),
    ] {
        // `=`: the value reaches the label check even when it starts with "-".
        run_fails(
            &[&format!("--version={bad}"), "--rootfs", &rootfs, &img],
            2,
            &["invalid --version"],
        );
        assert_untouched(&img);
    }
    // Without `=`, a value that starts with "-" is refused by the parser.
    run_fails(
        &["--version", "-x", "--rootfs", &rootfs, &img],
        2,
        &["unexpected argument '-x'"],
    );
    assert_untouched(&img);
}

#[test]
fn bad_sizes() {
    let (_tmp, rootfs, img) = setup();
    for bad in ["0", "-1G", "1Q", "abc"] {
        // `=` passes a value that starts with "-".
        run_fails(
            &[&format!("--size={bad}"), "--rootfs", &rootfs, &img],
            2,
            &["invalid --size"],
        );
        assert_untouched(&img);
    }
    run_fails(
        &["--size", "10M", "--rootfs", &rootfs, &img],
        1,
        &["too small", "give at least"],
    );
    assert_untouched(&img);
    run_fails(
        &["--size", "900T", "--rootfs", &rootfs, &img],
        1,
        &["larger than the filesystem"],
    );
    assert_untouched(&img);
}

#[test]
fn target_exists_and_is_not_a_layout() {
    let (tmp, rootfs, _) = setup();
    let other = tmp.path().join("other.img");
    write(&other, &vec![0u8; 1 << 20]);
    let before = std::fs::read(&other).unwrap();
    run_fails(
        &["--rootfs", &rootfs, other.to_str().unwrap()],
        1,
        &["not a btrfs-deploy disk"],
    );
    assert_eq!(std::fs::read(&other).unwrap(), before);
    run_fails(
        &["--rootfs", &rootfs, tmp.path().to_str().unwrap()],
        1,
        &["is a directory"],
    );
    // A Btrfs without the layout.
    let plain = tmp.path().join("plain.img");
    sh(&format!(
        "truncate -s 300M {0} && mkfs.btrfs -q {0}",
        plain.display()
    ));
    let before = std::fs::read(&plain).unwrap();
    run_fails(
        &[
            "--version",
            "v2",
            "--rootfs",
            &rootfs,
            plain.to_str().unwrap(),
        ],
        1,
        &["without the btrfs-deploy layout"],
    );
    assert!(
        std::fs::read(&plain).unwrap() == before,
        "plain btrfs changed"
    );
    assert_no_leftovers(&plain, false);
}

#[test]
fn no_kernel_and_several_kernels() {
    let (tmp, rootfs, img) = setup();
    std::fs::remove_file(Path::new(&rootfs).join(format!("boot/vmlinuz-{FAKE_KVER}"))).unwrap();
    std::fs::remove_file(Path::new(&rootfs).join("vmlinuz")).unwrap();
    run_fails(&["--rootfs", &rootfs, &img], 1, &["no kernel found"]);
    assert_untouched(&img);
    write(&Path::new(&rootfs).join("boot/vmlinuz-1.0"), b"a");
    write(&Path::new(&rootfs).join("boot/vmlinuz-2.0"), b"b");
    run_fails(&["--rootfs", &rootfs, &img], 1, &["1.0", "2.0"]);
    assert_untouched(&img);
    drop(tmp);
}

#[test]
fn missing_tool_names_its_package() {
    let (_tmp, rootfs, img) = setup();
    // Hide extlinux in a private mount namespace: /dev/null bound over it is
    // not an executable file, so the tool is "not installed" for deploy.
    let extlinux =
        sh("command -v extlinux || ls /usr/bin/extlinux /sbin/extlinux 2>/dev/null | head -1");
    let extlinux = extlinux.trim();
    assert!(
        !extlinux.is_empty(),
        "extlinux not installed on the test host"
    );
    let without_extlinux = |args: &[&str]| {
        std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind /dev/null {extlinux} && exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_deploy"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = without_extlinux(&["--rootfs", &rootfs, &img]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`extlinux` not found")
            && stderr.contains("install the Debian package extlinux"),
        "{stderr}"
    );
    assert_untouched(&img);
    // A disk that never boots through SYSLINUX does not need it: uefi and
    // uboot, first deploy and upgrade.
    for kind in ["uefi", "uboot"] {
        let other = format!("{img}.{kind}");
        let out = without_extlinux(&["--boot", kind, "--rootfs", &rootfs, &other]);
        assert!(
            out.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = without_extlinux(&["--version", "v2", "--rootfs", &rootfs, &other]);
        assert!(
            out.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        run_ok(&["check", &other]);
    }
}

#[test]
fn not_root_is_refused() {
    let (_tmp, rootfs, img) = setup();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_deploy"),
            "--rootfs",
            &rootfs,
            &img,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("must run as root"), "{stderr}");
    assert_untouched(&img);
}

#[test]
fn disk_full_mid_copy_leaves_nothing() {
    let (tmp, _, img) = setup();
    // Empty files with long names cost Btrfs metadata (the name is stored
    // three times, metadata is duplicated) but almost nothing on the source:
    // the size check passes and the filesystem fills during the copy (the
    // default hybrid disk: a 256 MiB ESP and a 262 MiB Btrfs).
    let rootfs = tmp.path().join("manyfiles");
    make_rootfs(&rootfs);
    sh(&format!(
        "cd {} && mkdir -p many && cd many && for d in $(seq 1 50); do mkdir d$d; (cd d$d && seq -f \"%06g-$(printf 'n%.0s' $(seq 1 200))\" 1 2800 | xargs touch); done",
        rootfs.display()
    ));
    let out = run(&["--size", "520M", "--rootfs", rootfs.to_str().unwrap(), &img]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no space left"), "{stderr}");
    assert_untouched(&img);
}

#[test]
fn unknown_option_is_a_usage_error() {
    let out = run(&["--no-such-option", "x.img"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--rootfs", "/tmp"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no TARGET"));
}

/// Mount points live on a tmpfs private to the deploy's mount namespace:
/// no other process sees them (so none can remove one and detach a live
/// mount), and a `kill -9` leaves nothing on the host to sweep.
#[test]
fn mount_points_are_private_and_a_killed_deploy_leaves_none_on_the_host() {
    let (tmp, rootfs, img) = setup();
    sh(&format!("head -c 300M /dev/urandom > {rootfs}/usr/blob"));
    let mut child = deploy()
        .args(["-q", "--rootfs", &rootfs, &img])
        .spawn()
        .unwrap();
    let pid = child.id();
    let prefix = format!("btrfs-deploy.{pid}.");
    let host_view = || -> Vec<String> {
        let mut seen = Vec::new();
        for dir in [
            std::env::temp_dir(),
            Path::new("/run/btrfs-deploy").to_path_buf(),
        ] {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    seen.push(e.path().display().to_string());
                }
            }
        }
        seen.retain(|p| p.contains(&prefix));
        seen
    };
    // Wait until the deploy has its image mounted (seen in its own namespace).
    let started = std::time::Instant::now();
    loop {
        let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        if mi.contains(&format!("/run/btrfs-deploy/{prefix}")) {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 30,
            "the deploy never mounted under its private /run/btrfs-deploy:\n{mi}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(host_view().is_empty(), "the host sees {:?}", host_view());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(host_view().is_empty(), "kill -9 left {:?}", host_view());
    run_ok(&["cleanup", &img]);
    assert_no_leftovers(Path::new(&img), false);
    drop(tmp);
}
