//! Field upgrades with trials (issue 13), on real images and real boots:
//! `--trial` on an image (the one-shot record in SYSLINUX's ADV, the trial
//! menu entry, the refusals), and one QEMU run in which the tiny system,
//! made with `-e on-device`, upgrades itself again and again: a healthy
//! trial that commits, a kernel panic, a failing health check and a hang the
//! watchdog resets each come back to the old default by themselves, then a
//! power cut during a trial boot.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn menu(img: &Path) -> String {
    let i = Inspect::open(img);
    std::fs::read_to_string(i.path("extlinux/extlinux.conf")).unwrap()
}

/// Boots the default under BIOS with the guest's writes kept (SYSLINUX
/// clears its one-shot record, the tool records trials).
fn boot_kept(img: &Path) -> String {
    let log = PathBuf::from(format!("{}.console.log", img.display()));
    run_ok(&[
        "boot-test",
        img.to_str().unwrap(),
        "--persist",
        "--firmware",
        "bios",
        "--timeout",
        "180",
        "--accel",
        "tcg",
        "--log",
        log.to_str().unwrap(),
    ]);
    std::fs::read_to_string(&log).unwrap()
}

fn image_bytes(img: &Path) -> Vec<u8> {
    std::fs::read(img).unwrap()
}

#[test]
fn a_trial_prepared_on_an_image_arms_one_boot_and_keeps_the_default() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let rootfs = tiny_rootfs();
    let (r, i) = (rootfs.to_str().unwrap(), img.to_str().unwrap());
    // Refusals first: nothing written.
    run_fails(
        &["--trial", "--rootfs", r, i],
        1,
        &["has no version yet", "without --trial"],
    );
    assert!(!img.exists());
    run_ok(&["--boot", "bios", "--rootfs", r, i]);
    run_fails(
        &[
            "--version",
            "v2",
            "--trial",
            "--no-default",
            "--rootfs",
            r,
            i,
        ],
        2,
        &["--trial and --no-default"],
    );
    let before = image_bytes(&img);
    run_fails(
        &[
            "--version",
            "v2",
            "--trial",
            "--no-bootloader",
            "--rootfs",
            r,
            i,
        ],
        1,
        &["--no-bootloader"],
    );
    assert!(
        image_bytes(&img) == before,
        "a refused --trial changed the image"
    );

    run_ok(&["--version", "v2", "--trial", "--rootfs", r, i]);
    let st = status_json(&img);
    assert_eq!(st["default"], "factory", "{st}");
    assert_eq!(st["trial"]["version"], "v2", "{st}");
    assert_eq!(st["trial"]["state"], "armed", "{st}");
    assert_eq!(st["trial"]["fallback"], "factory", "{st}");
    assert_eq!(st["trial_boot_used"], false, "{st}");
    let conf = menu(&img);
    assert!(
        conf.contains("label trial\n  kernel /systems/v2/kernel\n"),
        "{conf}"
    );
    assert!(conf.contains("panic=10 btrfs_deploy.trial=v2\n"), "{conf}");
    let text = String::from_utf8_lossy(&run_ok(&["status", i]).stdout).into_owned();
    assert!(
        text.contains("Trial:    v2: pending since") && text.contains("Default:  factory"),
        "{text}"
    );
    let list = String::from_utf8_lossy(&run_ok(&["list", i]).stdout).into_owned();
    assert!(list.contains("v2 (on trial)"), "{list}");

    // The next boot starts v2 (SYSLINUX takes the one-shot record)...
    let console = boot_kept(&img);
    assert_layout_mounted(&console, "v2");
    assert!(console.contains("btrfs_deploy.trial=v2"), "{console}");
    // ... and only that boot: the record is used, the default is factory.
    let st = status_json(&img);
    assert_eq!(st["default"], "factory", "{st}");
    let console = boot_kept(&img);
    assert_layout_mounted(&console, "factory");

    // set-default of another version withdraws a pending trial.
    run_ok(&["--version", "v3", "--trial", "--rootfs", r, i]);
    run_ok(&["set-default", "factory", i]);
    let st = status_json(&img);
    assert!(st["trial"].is_null(), "{st}");
    assert_eq!(st["last_trial"]["version"], "v3", "{st}");
    assert_eq!(st["last_trial"]["failure"]["kind"], "withdrawn", "{st}");
    assert!(!menu(&img).contains("label trial"));
    let console = boot_kept(&img);
    assert_layout_mounted(&console, "factory");
    // A uefi disk tries a version through systemd-boot's boot counting
    // (booted in a_uefi_trial_that_panics_falls_back_by_itself); the disk
    // stays consistent while it is pending.
    let uefi = d.path().join("uefi.img");
    let u = uefi.to_str().unwrap();
    run_ok(&["--boot", "uefi", "--rootfs", r, u]);
    run_ok(&["--version", "v2", "--trial", "--rootfs", r, u]);
    run_ok(&["check", u]);
    assert_eq!(status_json(&uefi)["trial"]["state"], "armed");
    // --keep never removes the version it adds (on trial or not the
    // default) nor a version whose trial is pending: v2's trial is
    // withdrawn by v3's, so v2 goes.
    run_ok(&[
        "--version",
        "v3",
        "--trial",
        "--keep",
        "1",
        "--rootfs",
        r,
        u,
    ]);
    assert_eq!(
        status_json(&uefi)["versions"],
        serde_json::json!(["factory", "v3"])
    );
    let st = status_json(&uefi);
    assert_eq!(st["trial"]["version"], "v3", "{st}");
    assert_eq!(st["trial"]["state"], "armed", "{st}");
    run_ok(&[
        "--version",
        "v4",
        "--no-default",
        "--keep",
        "1",
        "--rootfs",
        r,
        u,
    ]);
    assert_eq!(
        status_json(&uefi)["versions"],
        serde_json::json!(["factory", "v3", "v4"])
    );
    assert_eq!(status_json(&uefi)["trial"]["version"], "v3");
    run_ok(&["check", u]);
}

/// A tiny rootfs variant for the device scenario: the tiny system plus
/// hooks that run the tool the way a non-systemd init would (docs/trials.md),
/// and a scenario driver that keeps its step in /srv (state, shared by
/// every version).
fn scenario_tree(dir: &Path) {
    copy_tree(&tiny_rootfs(), dir);
    write_trial_hooks(dir, "10-trial-watch", 120);
    let hooks = dir.join("etc/tiny-boot.d");
    write(
        &hooks.join("50-scenario"),
        br#"#!/bin/sh
step=$(cat /srv/step 2>/dev/null || echo 0)
root=$(awk '$5 == "/" { print $4 }' /proc/self/mountinfo)
echo "SCENARIO: step=$step root=$root"
deploy status
next() { echo "$1" >/srv/step; sync; }
trial() {
    v=$1
    shift
    deploy --version "$v" --trial --rootfs "/srv/$v.tar" "$@" || echo "SCENARIO: deploy $v failed"
}
case $step in
0) trial v2; next 1; reboot -f ;;
1) trial v3 "--kernel-args=console=ttyS0,115200 panic=1"; next 2; reboot -f ;;
2) trial v4; next 3; reboot -f ;;
3) trial v5 "--kernel-args=console=ttyS0,115200 panic=1"; next 4; reboot -f ;;
4) trial v6; next 5; echo "SCENARIO: armed v6" ;;
5) trial v7; next 6; reboot -f ;;
*) echo "SCENARIO: done" ;;
esac
"#,
    );
    chmod(&hooks.join("50-scenario"), 0o755);
}

/// The softdog watchdog modules of the tiny system's kernel (its cloud
/// kernel has no driver for QEMU's i6300esb), from the cached kernel .deb.
fn add_softdog(tree: &Path) {
    add_tiny_kernel_modules(tree, "lib/wd", &["watchdog", "softdog"]);
}

fn tar(tree: &Path, out: &Path) {
    sh(&format!(
        "tar -C {} --numeric-owner -cf {} .",
        tree.display(),
        out.display()
    ));
}

/// Boots `img` until SYSLINUX has loaded the trial's kernel and `until`
/// appeared on the console, then kills QEMU: a power cut during the trial
/// boot.
fn cut_power_during_the_trial_boot(img: &Path, label: &str, until: &str) -> String {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-vga", "none", "-nic", "none", "-monitor", "none", "-serial", "stdio",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", img.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out)
            .split(b'\n')
            .map_while(Result::ok)
        {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let mut seen = String::new();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut loaded = false;
    while std::time::Instant::now() < end {
        if let Ok(l) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            seen.push_str(&l);
            seen.push('\n');
            loaded |= l.contains(&format!("/systems/{label}/kernel"));
            if loaded && l.contains(until) {
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        loaded && seen.contains(until),
        "the trial boot of {label} did not start:\n{seen}"
    );
    seen
}

#[test]
fn a_device_upgrades_itself_on_trial_and_falls_back_by_itself() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    std::fs::create_dir(&base).unwrap();
    scenario_tree(&base);
    // The vendor's versions, as tarballs the device finds on /srv.
    let srv = d.path().join("srv");
    std::fs::create_dir(&srv).unwrap();
    for v in ["v2", "v3", "v4", "v5", "v6", "v7"] {
        let t = d.path().join(v);
        std::fs::create_dir(&t).unwrap();
        copy_tree(&base, &t);
        match v {
            // The kernel panics: its init exits.
            "v3" => write(
                &t.join("sbin/init"),
                b"#!/bin/sh\necho 'V3: init exits'\nexit 1\n",
            ),
            // A health check fails.
            "v4" => {
                let h = t.join("etc/btrfs-deploy/health.d/10-app-answers");
                std::fs::create_dir_all(h.parent().unwrap()).unwrap();
                write(
                    &h,
                    b"#!/bin/sh\necho 'V4: the app does not answer'\nexit 1\n",
                );
                chmod(&h, 0o755);
            }
            // The boot hangs before the tool runs, with a watchdog open
            // that nobody feeds (what systemd's RuntimeWatchdogSec does).
            "v5" => {
                add_softdog(&t);
                write(
                    &t.join("sbin/init"),
                    b"#!/bin/sh\nmount -t proc proc /proc\nmount -t devtmpfs devtmpfs /dev\n\
                      insmod /lib/wd/watchdog.ko; insmod /lib/wd/softdog.ko soft_margin=5\n\
                      exec 3>/dev/watchdog\necho 'V5: hangs'\nwhile :; do sleep 1000; done\n",
                );
            }
            // The system never gets healthy: its health step never runs,
            // and the trial times out (60 s after boot).
            "v7" => {
                let hooks = t.join("etc/tiny-boot.d");
                let watch = std::fs::read_to_string(hooks.join("10-trial-watch")).unwrap();
                write(
                    &hooks.join("10-trial-watch"),
                    watch.replace("--timeout 120", "--timeout 60").as_bytes(),
                );
                write(
                    &hooks.join("20-health"),
                    b"#!/bin/sh\necho 'V7: stuck' >/dev/console\nsleep 1000\n",
                );
            }
            _ => {}
        }
        chmod(&t.join("sbin/init"), 0o755);
        tar(&t, &srv.join(format!("{v}.tar")));
    }
    // The factory image: the tool put on it with -e on-device.
    let factory = d.path().join("factory");
    std::fs::create_dir(&factory).unwrap();
    copy_tree(&base, &factory);
    let img = d.path().join("device.img");
    let i = img.to_str().unwrap();
    run_ok(&[
        "--boot",
        "bios",
        "--size",
        "1500M",
        "-e",
        "on-device",
        "--rootfs",
        factory.to_str().unwrap(),
        i,
    ]);
    // The updates, downloaded onto the device's /srv (its data, in /state:
    // not shipped by a version, so no upgrade's state merge removes them).
    {
        let e = Edit::open(&img);
        copy_tree(&srv, &e.path("state/srv"));
    }
    let log = d.path().join("scenario.log");
    // boots: factory, v2 (trial, good), v3 (panic), v2, v4 (health), v2,
    // v5 (hang, watchdog), v2: 7 reboots, "armed v6" in the 8th boot.
    let out = run(&[
        "boot-test",
        i,
        "--persist",
        "--accel",
        "tcg",
        "--firmware",
        "bios",
        "--reboots",
        "7",
        "--watchdog",
        "--timeout",
        "900",
        "--expect",
        "SCENARIO: armed v6",
        "--fail-on",
        "SCENARIO: deploy .* failed",
        "--log",
        log.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.status.success(), "scenario failed; console:\n{text}");
    let b = |n| boot_of(&text, n);
    assert!(
        b(1).contains("SCENARIO: step=0 root=/systems/factory/run"),
        "{}",
        b(1)
    );
    // 2: v2 on trial passes (no health checks = healthy) and is committed.
    assert!(b(2).contains("this boot is the trial of v2"), "{}", b(2));
    assert!(b(2).contains("v2 is now the default"), "{}", b(2));
    assert!(
        b(2).contains("SCENARIO: step=1 root=/systems/v2/run"),
        "{}",
        b(2)
    );
    // 3: v3 panics; 4: back on v2, which records it.
    assert!(b(3).contains("V3: init exits"), "{}", b(3));
    assert!(
        b(4).contains("SCENARIO: step=2 root=/systems/v2/run"),
        "{}",
        b(4)
    );
    assert!(b(4).contains("Last trial: v3: failed at"), "{}", b(4));
    assert!(b(4).contains(": panic: "), "{}", b(4));
    // 5: v4's health check fails: recorded, rebooted; 6: on v2.
    assert!(b(5).contains("V4: the app does not answer"), "{}", b(5));
    assert!(
        b(6).contains("SCENARIO: step=3 root=/systems/v2/run"),
        "{}",
        b(6)
    );
    assert!(
        b(6).contains("Last trial: v4: failed at")
            && b(6).contains("health check 10-app-answers (exit status: 1)"),
        "{}",
        b(6)
    );
    // 7: v5 hangs; the watchdog resets it; 8: on v2.
    assert!(b(7).contains("V5: hangs"), "{}", b(7));
    assert!(
        b(8).contains("SCENARIO: step=4 root=/systems/v2/run"),
        "{}",
        b(8)
    );
    assert!(b(8).contains("Last trial: v5: failed at"), "{}", b(8));
    assert!(b(8).contains("Failed:   v3, v4, v5"), "{}", b(8));

    // A power cut during the trial boot of v6: the next boot is v2's,
    // which records it; then v7 never gets healthy and times out.
    // The cut comes once the trial boot reached user space (trial-watch
    // recorded it): the old default records the trial as lost.
    cut_power_during_the_trial_boot(&img, "v6", "this boot is the trial of v6");
    let log = d.path().join("scenario2.log");
    run_ok(&[
        "boot-test",
        i,
        "--persist",
        "--accel",
        "tcg",
        "--firmware",
        "bios",
        "--reboots",
        "2",
        "--timeout",
        "600",
        "--expect",
        "SCENARIO: done",
        "--fail-on",
        "SCENARIO: deploy .* failed",
        "--log",
        log.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&log).unwrap();
    let b = |n| boot_of(&text, n);
    assert!(
        b(1).contains("SCENARIO: step=5 root=/systems/v2/run"),
        "{}",
        b(1)
    );
    assert!(
        b(1).contains("Last trial: v6: failed at") && b(1).contains(": lost: "),
        "{}",
        b(1)
    );
    assert!(b(2).contains("V7: stuck"), "{}", b(2));
    assert!(
        b(2).contains("did not pass its health checks within 60 s"),
        "{}",
        b(2)
    );
    assert!(
        b(3).contains("SCENARIO: step=6 root=/systems/v2/run"),
        "{}",
        b(3)
    );
    assert!(
        b(3).contains("Last trial: v7: failed at")
            && b(3).contains("timeout: not healthy within 60 s"),
        "{}",
        b(3)
    );
    let st = status_json(&img);
    assert_eq!(st["default"], "v2", "{st}");
    assert_eq!(
        st["failed_versions"],
        serde_json::json!(["v3", "v4", "v5", "v6", "v7"]),
        "{st}"
    );
    // Every version added on the device carries the tool again.
    let ins = Inspect::open(&img);
    for v in ["v2", "v3", "v4", "v5", "v6", "v7"] {
        let p: PathBuf = ins.path(&format!("systems/{v}/run/usr/lib/btrfs-deploy/bin/deploy"));
        assert!(p.is_file(), "{v} lacks the tool");
    }
}

#[test]
fn a_uefi_trial_that_panics_falls_back_by_itself() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("hybrid.img");
    let i = img.to_str().unwrap();
    run_ok(&[
        "--boot",
        "hybrid",
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        i,
    ]);
    let v2 = d.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    copy_tree(&tiny_rootfs(), &v2);
    write(
        &v2.join("sbin/init"),
        b"#!/bin/sh\necho 'V2: init exits'\nexit 1\n",
    );
    chmod(&v2.join("sbin/init"), 0o755);
    run_ok(&[
        "--version",
        "v2",
        "--trial",
        "--kernel-args=console=ttyS0,115200 panic=1",
        "--rootfs",
        v2.to_str().unwrap(),
        i,
    ]);
    // The disk is consistent while the trial is pending.
    run_ok(&["check", i]);
    // systemd-boot starts v2 once (renaming its counted entry first); the
    // kernel panics and reboots; the next boot is the default's.
    let log = d.path().join("uefi.log");
    run_ok(&[
        "boot-test",
        i,
        "--persist",
        "--firmware",
        "uefi",
        "--accel",
        "tcg",
        "--reboots",
        "1",
        "--timeout",
        "300",
        "--log",
        log.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(boot_of(&text, 1).contains("V2: init exits"), "{text}");
    assert!(
        boot_of(&text, 1).contains("btrfs_deploy.trial=v2"),
        "{text}"
    );
    assert_layout_mounted(&boot_of(&text, 2), "factory");
    // And it stays there.
    let console = boot_console_with(&img, None, Some("uefi"));
    assert_layout_mounted(&console, "factory");
    run_ok(&["check", i]);
    let st = status_json(&img);
    assert_eq!(st["default"], "factory", "{st}");
    // Nothing ran trial-watch in this system: the trial waits to be
    // settled, and status says its one-shot boot was used.
    assert_eq!(st["trial"]["state"], "armed", "{st}");
    assert_eq!(st["trial_boot_used"], true, "{st}");
}

#[test]
fn a_signed_bundle_is_tried_once_like_any_rootfs() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let r = tiny_rootfs();
    let r = r.to_str().unwrap();
    run_ok(&["keygen", "--output", &p("vendor")]);
    // The vendor's build image, and the device it ships to.
    run_ok(&["--boot", "bios", "--rootfs", r, &p("build.img")]);
    // The device was flashed with the factory image.
    sh(&format!(
        "cp --sparse=always {} {}",
        p("build.img"),
        p("device.img")
    ));
    let v2 = d.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    copy_tree(&tiny_rootfs(), &v2);
    write(&v2.join("etc/v2-marker"), b"v2\n");
    run_ok(&[
        "--version",
        "v2",
        "--rootfs",
        v2.to_str().unwrap(),
        &p("build.img"),
    ]);
    run_ok(&[
        "bundle",
        "create",
        &p("build.img"),
        "--version",
        "v2",
        "--base",
        "factory",
        "--sign-key",
        &p("vendor.key"),
        "--output",
        &p("v2.bundle"),
    ]);
    run_ok(&[
        "--rootfs",
        &p("v2.bundle"),
        "--verify-key",
        &p("vendor.pub"),
        "--trial",
        &p("device.img"),
    ]);
    let img = d.path().join("device.img");
    let st = status_json(&img);
    assert_eq!(st["default"], "factory", "{st}");
    assert_eq!(st["trial"]["version"], "v2", "{st}");
    assert_eq!(st["trial"]["state"], "armed", "{st}");
    assert_layout_mounted(&boot_kept(&img), "v2");
    assert_layout_mounted(&boot_kept(&img), "factory");
}

#[test]
fn the_device_commands_refuse_clearly_off_a_device() {
    // This host does not run from a btrfs-deploy disk.
    for cmd in [&["mark-good"][..], &["trial-watch"], &["health"]] {
        run_fails(
            cmd,
            1,
            &[
                "runs on a device booted from a btrfs-deploy disk",
                "is not a version of one",
            ],
        );
    }
    let r = tiny_rootfs();
    run_fails(
        &[
            "--version",
            "v2",
            "--trial",
            "--rootfs",
            r.to_str().unwrap(),
            "/",
        ],
        2,
        &["TARGET / means the disk the running system booted from"],
    );
    run_fails(
        &["--version", "v2", "--rootfs", r.to_str().unwrap()],
        2,
        &["no TARGET given"],
    );
}

#[test]
fn cleanup_ends_a_trial_whose_arming_was_interrupted() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let i = img.to_str().unwrap();
    let r = tiny_rootfs();
    run_ok(&["--boot", "bios", "--rootfs", r.to_str().unwrap(), i]);
    run_ok(&[
        "--version",
        "v2",
        "--no-default",
        "--rootfs",
        r.to_str().unwrap(),
        i,
    ]);
    // What a power cut right after `deploy --trial` wrote its first record
    // leaves: `arming`, no one-shot boot armed.
    {
        let e = Edit::open(&img);
        write(
            &e.path("systems/v2/trial.json"),
            br#"{"version":"v2","fallback":"factory","state":"arming","armed_at":"2026-11-29T10:00:00Z","armed_unix":1795946400}"#,
        );
    }
    assert_eq!(status_json(&img)["trial"]["state"], "arming");
    let out = run_ok(&["cleanup", i]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Ending the trial of v2: its arming was interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = status_json(&img);
    assert!(st["trial"].is_null(), "{st}");
    assert_eq!(st["last_trial"]["failure"]["kind"], "interrupted", "{st}");
    assert_eq!(st["default"], "factory", "{st}");
    run_ok(&["check", i]);
}
