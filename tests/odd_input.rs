//! Odd input that deploys (issue 10): rootfs fstabs the completion must get
//! right, and what `deploy` and `deploy check` say about them.

mod common;
use common::*;

/// Defect 9: `tmpfs /var/log` in the rootfs's fstab. The added `/var` line
/// must come before it, or the tiny system's `mount -a` (file order) mounts
/// /var/log on the empty /var of the version, then hides it under /var.
#[test]
fn added_entries_keep_mount_a_order_and_a_var_log_tmpfs_boots() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        root.display()
    ));
    std::fs::create_dir_all(root.join("var/log")).unwrap();
    let vendor = "# tiny test system with logs in RAM\n\
                  tmpfs\t/var/log\ttmpfs\tdefaults,size=1m\t0 0\n";
    write(&root.join("etc/fstab"), vendor.as_bytes());
    // Reports the filesystem type of /var/log and of the directory above it.
    write(
        &root.join("etc/tiny-boot.d/20-varlog"),
        b"#!/bin/sh\necho \"varlog=$(awk '$2 == \"/var/log\" { t = $3 } END { print t }' /proc/mounts) \
          var=$(awk '$2 == \"/var\" { t = $3 } END { print t }' /proc/mounts) \
          last=$(awk '$2 ~ /^\\/var/ { t = $2 } END { print t }' /proc/mounts)\"\n",
    );
    chmod(&root.join("etc/tiny-boot.d/20-varlog"), 0o755);
    let img = tmp.path().join("disk.img");
    run_ok(&["--rootfs", root.to_str().unwrap(), img.to_str().unwrap()]);
    let fstab = {
        let m = Inspect::open(&img);
        std::fs::read_to_string(m.path("systems/factory/run/etc/fstab")).unwrap()
    };
    let points: Vec<&str> = fstab
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        points,
        ["/", "/var", "/var/log", "/home", "/root", "/opt", "/srv"],
        "{fstab}"
    );
    assert!(fstab.contains("tmpfs\t/var/log\ttmpfs\tdefaults,size=1m\t0 0\n"));
    let console = boot_console(&img, None);
    assert!(!console.contains("mount -a failed"), "{console}");
    // /var/log is the tmpfs, mounted after (on top of) /var from /state/var.
    assert!(
        console.contains("TINY-HOOK: varlog=tmpfs var=btrfs last=/var/log"),
        "{console}"
    );
    assert_no_leftovers(&img, false);
}

/// Defect 8: a `/` entry naming another device (as cloud images ship). The
/// deploy keeps it (existing entries win), warns naming the line, the risk
/// and the fix, records the warning in deployment.json; `deploy check`
/// reports the same as a warning and passes.
#[test]
fn a_root_entry_naming_another_device_warns_and_check_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    make_rootfs(&root);
    let line = "UUID=dead-beef / ext4 errors=remount-ro 0 1";
    write(
        &root.join("etc/fstab"),
        format!("# cloud image\n{line}\n").as_bytes(),
    );
    let img = tmp.path().join("disk.img");
    let r = root.to_str().unwrap();
    let i = img.to_str().unwrap();
    for (args, label) in [
        (vec!["--rootfs", r, i], "factory"),
        (vec!["--version", "v2", "--rootfs", r, i], "v2"),
    ] {
        let out = run_ok(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let warning = stderr
            .lines()
            .find(|l| l.starts_with("warning: "))
            .unwrap_or_else(|| panic!("no warning:\n{stderr}"));
        for needle in [
            "etc/fstab line 2",
            line,
            "will not mount its own root",
            "remove that line",
        ] {
            assert!(warning.contains(needle), "{needle:?} not in {warning}");
        }
        let m = Inspect::open(&img);
        let record: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(m.path(&format!("systems/{label}/deployment.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            record["warnings"][0].as_str(),
            warning.strip_prefix("warning: "),
            "{record}"
        );
        let fstab =
            std::fs::read_to_string(m.path(&format!("systems/{label}/run/etc/fstab"))).unwrap();
        assert!(fstab.contains(&format!("{line}\n")), "kept: {fstab}");
        assert!(!fstab.contains(" / btrfs "), "no second / entry: {fstab}");
    }
    let out = run_ok(&["check", i]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for label in ["factory", "v2"] {
        let finding = stdout
            .lines()
            .find(|l| l.contains(&format!("version {label}: fstab")))
            .unwrap_or_else(|| panic!("no fstab finding for {label}:\n{stdout}"));
        assert!(finding.starts_with("warning "), "{finding}");
        assert!(
            finding.contains("etc/fstab line 2") && finding.contains("will not mount its own root"),
            "{finding}"
        );
    }
    assert!(!stdout.contains("PROBLEM"), "{stdout}");
    assert_no_leftovers(&img, false);
}

/// Defect 12: SIGINT or SIGTERM sent to the deploy process (not to its
/// process group, as `kill` or a service manager does) while a configure
/// extension that ignores them runs: the deploy gives the extension 5 s, then
/// kills it and everything it started, and cleans up: no image, no
/// `.partial`, no loop device, no process of the extension left. Before, the
/// deploy waited for the extension for as long as it ran.
#[test]
fn a_stop_during_an_extension_that_ignores_it_escalates_to_sigkill() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        stop_a_stubborn_extension(sig);
    }
}

fn stop_a_stubborn_extension(sig: libc::c_int) {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    make_rootfs(&root);
    let ext = tmp.path().join("ext");
    let mark = tmp.path().join("started");
    // A unique argument, to find the extension's processes afterwards.
    let tag = format!("deploy-test-stubborn-{}", std::process::id());
    // Ignores the signals, as does the loop it becomes (tagged, to be found).
    write(
        &ext.join("stubborn.configure"),
        format!(
            "#!/bin/sh\ntrap '' INT TERM HUP\n: > \"$MARK\"\nexec sh -c 'trap \"\" INT TERM HUP; while :; do sleep 1; done' {tag}\n"
        )
        .as_bytes(),
    );
    chmod(&ext.join("stubborn.configure"), 0o755);
    let img = tmp.path().join("disk.img");
    let mut child = deploy()
        .args(["-e", "stubborn", "--extensions-dir"])
        .arg(&ext)
        .arg("--set")
        .arg(format!("MARK={}", mark.display()))
        .arg("--rootfs")
        .arg(&root)
        .arg(&img)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !mark.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the extension never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    // SAFETY: plain syscall on our child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(60),
            "deploy still waits for the extension {:?} after signal {sig}",
            sent.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = sent.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    eprintln!("deploy exited {status:?} {took:?} after signal {sig}:\n{stderr}");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(30),
        "took {took:?}"
    );
    assert!(stderr.contains("stubborn"), "{stderr}");
    assert!(
        stderr.contains("still running 5 s after the stop request"),
        "{stderr}"
    );
    assert!(!img.exists(), "an image was left");
    assert!(
        !tmp.path().join("disk.img.partial").exists(),
        "a .partial was left"
    );
    assert_no_leftovers(&img, false);
    // `[d]` keeps the pattern from matching the shell running pgrep.
    let left = sh(&format!("pgrep -f '[{}]{}' || true", &tag[..1], &tag[1..]));
    assert!(left.trim().is_empty(), "extension processes left: {left}");
}

/// Clears the immutable and append-only flags of `paths` when dropped, so
/// that the temporary directory can be removed even when the test fails.
struct Unflag(Vec<std::path::PathBuf>);

impl Drop for Unflag {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::process::Command::new("chattr")
                .args(["-i", "-a"])
                .arg(p)
                .status();
        }
    }
}

/// `lsattr -d` flags of `p` (the first field).
fn flags(p: &std::path::Path) -> String {
    sh(&format!("lsattr -d {}", p.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Defect 12, last item. `chattr +i`/`+a` flags are not carried into a
/// version (documented: every file of a version must stay replaceable by an
/// upgrade, and `orig` is a read-only subvolume anyway), so a rootfs with
/// them deploys and upgrades. Hard links between a state directory and the
/// rest of the tree become copies (separate subvolumes): the deploy names the
/// first such pair in a note.
#[test]
fn immutable_flags_are_dropped_and_cross_state_hard_links_are_named() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    make_rootfs(&root);
    write(&root.join("usr/bin/sealed"), b"v1\n");
    write(&root.join("var/log/append.log"), b"line 1\n");
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("var/lib/tool-link")).unwrap();
    let _unflag = Unflag(vec![
        root.join("usr/bin/sealed"),
        root.join("var/log/append.log"),
    ]);
    sh(&format!(
        "chattr +i {0}/usr/bin/sealed && chattr +a {0}/var/log/append.log",
        root.display()
    ));
    assert!(flags(&root.join("usr/bin/sealed")).contains('i'));
    let img = tmp.path().join("disk.img");
    let out = run_ok(&["--rootfs", root.to_str().unwrap(), img.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("note: /var/lib/tool-link and /usr/bin/tool are hard links to one file"),
        "{stderr}"
    );
    {
        let m = Inspect::open(&img);
        let sealed = m.path("systems/factory/orig/usr/bin/sealed");
        let log = m.path("state/var/log/append.log");
        assert!(!flags(&sealed).contains('i'), "{}", flags(&sealed));
        assert!(!flags(&log).contains('a'), "{}", flags(&log));
        assert_eq!(std::fs::read(&log).unwrap(), b"line 1\n");
        let (a, b) = (
            m.path("state/var/lib/tool-link"),
            m.path("systems/factory/orig/usr/bin/tool"),
        );
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(std::fs::metadata(&a).unwrap().nlink(), 1, "a copy");
    }
    // An upgrade replaces the file that was immutable in the rootfs.
    sh(&format!(
        "chattr -i {0}/usr/bin/sealed && echo v2 > {0}/usr/bin/sealed && chattr +i {0}/usr/bin/sealed",
        root.display()
    ));
    run_ok(&[
        "--version",
        "v2",
        "--rootfs",
        root.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let m = Inspect::open(&img);
    assert_eq!(
        std::fs::read(m.path("systems/v2/orig/usr/bin/sealed")).unwrap(),
        b"v2\n"
    );
}
