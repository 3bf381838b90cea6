//! Boot tests (issues 3 and 4): real disks produced by `deploy` (the
//! default, hybrid layout), booted in QEMU through their default firmware
//! path (OVMF → systemd-boot → kernel; tests/uefi.rs boots the same disks
//! under SeaBIOS too), asserting on what the tiny test system reports from
//! inside the guest.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A copy of the tiny system with a hook printing /home's marker files and
/// the hostname file, and an `etc/issue` naming the version.
fn tiny_variant(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        root.display()
    ));
    write(&root.join("etc/tiny-boot.d/10-report"), b"#!/bin/sh\necho \"issue=$(cat /etc/issue)\"\nfor f in /home/*.txt; do [ -f \"$f\" ] && echo \"home-file $f: $(cat $f)\"; done\nexit 0\n");
    chmod(&root.join("etc/tiny-boot.d/10-report"), 0o755);
    write(&root.join("etc/issue"), format!("{name}\n").as_bytes());
    root
}

#[test]
fn factory_boots_with_root_on_run_and_state_mounted_from_fstab() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("factory.img");
    run_ok(&[
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let uuid = fs_uuid(&img);
    let console = boot_console(&img, None);
    assert_layout_mounted(&console, "factory");
    // The options in effect are the ones the deploy wrote to fstab.
    let opts: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("TINY-MOUNT: /home "))
        .collect();
    assert!(
        opts[0].contains("noatime") && opts[0].contains("subvol=/state/home"),
        "{opts:?}"
    );
    assert!(console.contains(&format!("root=UUID={uuid} rootfstype=btrfs rootflags=subvol=systems/factory/run rw console=tty0 console=ttyS0,115200")), "{console}");
    assert!(console.contains("TINY: hostname=tiny"));
    assert!(!console.contains("mount -a failed"), "{console}");
    // Nothing of the deploy or the boot test is left attached or mounted.
    assert_no_leftovers(&img, false);
}

#[test]
fn boot_test_fails_clearly_when_root_subvolume_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("broken.img");
    run_ok(&[
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    {
        // The root subvolume every boot entry names goes away.
        let e = Edit::open(&img);
        std::fs::rename(
            e.path("systems/factory/run"),
            e.path("systems/factory/run.gone"),
        )
        .unwrap();
    }
    let started = std::time::Instant::now();
    let stderr = run_fails(
        &[
            "boot-test",
            img.to_str().unwrap(),
            "--timeout",
            "90",
            "--accel",
            "tcg",
        ],
        4, // the guest did not reach the expectation: not an error (1)
        &["boot-test of", "failed after", "last console lines"],
    );
    assert!(
        stderr.contains("TINY-INITRAMFS: FAILED") || stderr.contains("powered off"),
        "{stderr}"
    );
    assert!(
        started.elapsed().as_secs() < 90,
        "failure was only detected by the timeout"
    );
}

#[test]
fn boot_test_errors_before_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.img");
    run_fails(
        &["boot-test", missing.to_str().unwrap()],
        1,
        &["does not exist"],
    );
    let plain = tmp.path().join("plain.img");
    sh(&format!(
        "truncate -s 300M {0} && mkfs.btrfs -q {0}",
        plain.display()
    ));
    run_fails(
        &["boot-test", plain.to_str().unwrap()],
        1,
        &["without the btrfs-deploy layout"],
    );
    let img = tmp.path().join("d.img");
    run_ok(&[
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    run_fails(
        &["boot-test", img.to_str().unwrap(), "--version", "nope"],
        1,
        &["no version nope", "factory"],
    );
    run_fails(
        &["boot-test", img.to_str().unwrap(), "--expect", "("],
        2,
        &["invalid --expect"],
    );
    assert_no_leftovers(&img, false);
}

/// Issue 4's scenario: factory → boot → upgrade → boot → rollback → boot →
/// remove → list → boot; a file put in /state/home survives all of it.
#[test]
fn upgrade_rollback_remove_each_followed_by_a_boot() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("life.img");
    let imgs = img.to_str().unwrap();
    let v1 = tiny_variant(tmp.path(), "factory-rootfs");
    run_ok(&["--rootfs", v1.to_str().unwrap(), imgs]);
    {
        let e = Edit::open(&img);
        write(&e.path("state/home/kept.txt"), b"from the host\n");
    }
    let c = boot_console(&img, None);
    assert_layout_mounted(&c, "factory");
    assert!(c.contains("home-file /home/kept.txt: from the host"), "{c}");
    assert!(c.contains("issue=factory-rootfs"));

    let v2 = tiny_variant(tmp.path(), "v2-rootfs");
    run_ok(&["--version", "v2", "--rootfs", v2.to_str().unwrap(), imgs]);
    let c = boot_console(&img, None);
    assert_layout_mounted(&c, "v2");
    assert!(c.contains("issue=v2-rootfs"), "{c}");
    assert!(c.contains("home-file /home/kept.txt: from the host"), "{c}");
    // --version boots another entry (under UEFI: from an overlay whose
    // loader.conf names it) without changing the default or the image.
    let before = fingerprint(&img);
    let c = boot_console(&img, Some("factory"));
    assert_layout_mounted(&c, "factory");
    assert!(c.contains("issue=factory-rootfs"));
    assert!(
        fingerprint(&img) == before,
        "boot-test --version changed the image"
    );
    assert_no_leftovers(&img, false);

    run_ok(&["set-default", "factory", imgs]);
    let c = boot_console(&img, None);
    assert_layout_mounted(&c, "factory");
    assert!(c.contains("home-file /home/kept.txt: from the host"));

    run_ok(&["remove", "v2", imgs]);
    let rows: serde_json::Value =
        serde_json::from_slice(&run_ok(&["list", imgs, "--json"]).stdout).unwrap();
    assert_eq!(rows["format"], 1);
    let rows = &rows["versions"];
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["label"], "factory");
    let c = boot_console(&img, None);
    assert_layout_mounted(&c, "factory");
}

/// The guest writes a file under /home: it reaches the image only with --persist.
#[test]
fn boot_test_modifies_the_image_only_with_persist() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("writer");
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        root.display()
    ));
    write(
        &root.join("etc/tiny-boot.d/20-write"),
        b"#!/bin/sh\ndate > /home/booted.txt\nsync\necho wrote\n",
    );
    chmod(&root.join("etc/tiny-boot.d/20-write"), 0o755);
    let img = tmp.path().join("persist.img");
    run_ok(&["--rootfs", root.to_str().unwrap(), img.to_str().unwrap()]);
    let before = std::fs::read(&img).unwrap();
    let imgs = img.to_str().unwrap();
    run_ok(&[
        "boot-test",
        imgs,
        "--accel",
        "tcg",
        "--timeout",
        "90",
        "--expect",
        "TINY-HOOK: wrote",
    ]);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "boot-test without --persist changed the image"
    );
    run_ok(&[
        "boot-test",
        imgs,
        "--accel",
        "tcg",
        "--timeout",
        "90",
        "--persist",
    ]);
    let m = Inspect::open(&img);
    assert!(
        m.path("state/home/booted.txt").exists(),
        "the guest's write did not persist"
    );
}
