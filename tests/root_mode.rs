//! Issue 23: read-only roots. `--root-mode ro` (read-only `/`, `/etc` the
//! version's own writable subvolume) and `--root-mode volatile` (read-only
//! `/` under a tmpfs overlay), booted in QEMU on the tiny system, with
//! upgrades from `rw` to `ro` and back.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// The tiny system with a hook that reports how `/` is mounted, tries to
/// write to `/`, and counts its boots in `/etc/count` and `/home/count`.
fn counting_tree(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    std::fs::create_dir(&root).unwrap();
    copy_tree(&tiny_rootfs(), &root);
    write(
        &root.join("etc/tiny-boot.d/10-rootmode"),
        br#"#!/bin/sh
echo "root=$(awk '$2 == "/" { t = $3; o = $4 } END { print t, o }' /proc/mounts)"
echo "etcmount=$(awk '$2 == "/etc" { print $3, $4 }' /proc/mounts)"
echo "old-rootfile=$(cat /rootfile 2>/dev/null || echo none)"
if echo here >/rootfile 2>/dev/null; then echo "root-write=ok"; else echo "root-write=refused"; fi
for f in /etc/count /home/count; do
    n=$(cat "$f" 2>/dev/null || echo 0)
    n=$((n + 1))
    if echo "$n" >"$f"; then echo "count $f=$n"; else echo "count $f=write-failed"; fi
done
sync
exit 0
"#,
    );
    chmod(&root.join("etc/tiny-boot.d/10-rootmode"), 0o755);
    root
}

/// Boots `img` once (BIOS path, writes kept) and returns the console.
fn boot_persist(img: &Path) -> String {
    boot_console_args(img, &["--firmware", "bios", "--persist"])
}

fn hook(console: &str, key: &str) -> String {
    let prefix = format!("TINY-HOOK: {key}");
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line:\n{console}"))
        .trim()
        .to_string()
}

fn assert_check_passes(img: &str) {
    let out = run_ok(&["check", img]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn ro_root_keeps_etc_and_state_writes_and_upgrades_to_rw_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = counting_tree(tmp.path(), "tree");
    let img = tmp.path().join("ro.img");
    let imgs = img.to_str().unwrap();
    let trees = tree.to_str().unwrap();
    run_ok(&["--rootfs", trees, "--root-mode", "ro", imgs]);
    assert_check_passes(imgs);
    {
        let m = Inspect::open(&img);
        let fstab = std::fs::read_to_string(m.path("systems/factory/run/etc/fstab")).unwrap();
        assert!(
            fstab.contains(" / btrfs defaults,ro,noatime 0 1"),
            "{fstab}"
        );
        assert!(
            fstab.contains(" /etc btrfs subvol=/systems/factory/run/etc,defaults,rw,noatime 0 0"),
            "{fstab}"
        );
        let rec = std::fs::read_to_string(m.path("systems/factory/deployment.json")).unwrap();
        assert!(rec.contains("\"root_mode\": \"ro\""), "{rec}");
    }
    let list = String::from_utf8_lossy(&run_ok(&["list", imgs]).stdout).into_owned();
    assert!(list.contains("ROOT") && list.contains(" ro "), "{list}");
    let status = String::from_utf8_lossy(&run_ok(&["status", imgs]).stdout).into_owned();
    assert!(status.contains("root ro"), "{status}");

    // Boot 1 and 2: / read-only, /etc and /home writable and kept.
    for n in 1..=2 {
        let c = boot_persist(&img);
        assert!(c.contains("/run ro console=tty0"), "{c}");
        let root = hook(&c, "root=");
        assert!(
            root.starts_with("btrfs ro,"),
            "boot {n}: / is `{root}`\n{c}"
        );
        assert_eq!(hook(&c, "root-write="), "refused", "{c}");
        assert!(hook(&c, "etcmount=").starts_with("btrfs rw,"), "{c}");
        assert!(
            c.contains("TINY-MOUNT: /etc /systems/factory/run/etc rw"),
            "{c}"
        );
        assert_eq!(hook(&c, "count /etc/count="), n.to_string(), "{c}");
        assert_eq!(hook(&c, "count /home/count="), n.to_string(), "{c}");
        assert!(!c.contains("mount -a failed"), "{c}");
    }

    // Upgrade to a rw version: the local /etc file comes along.
    run_ok(&["--rootfs", trees, "--version", "v2", imgs]);
    assert_check_passes(imgs);
    let c = boot_persist(&img);
    assert!(hook(&c, "root=").starts_with("btrfs rw,"), "{c}");
    assert_eq!(hook(&c, "root-write="), "ok", "{c}");
    assert_eq!(hook(&c, "etcmount="), "", "{c}");
    assert_eq!(hook(&c, "count /etc/count="), "3", "{c}");
    assert_eq!(hook(&c, "count /home/count="), "3", "{c}");

    // And back to ro.
    run_ok(&[
        "--rootfs",
        trees,
        "--version",
        "v3",
        "--root-mode",
        "ro",
        imgs,
    ]);
    assert_check_passes(imgs);
    let c = boot_persist(&img);
    assert!(hook(&c, "root=").starts_with("btrfs ro,"), "{c}");
    assert_eq!(hook(&c, "root-write="), "refused", "{c}");
    assert!(c.contains("TINY-MOUNT: /etc /systems/v3/run/etc rw"), "{c}");
    assert_eq!(hook(&c, "count /etc/count="), "4", "{c}");
    assert_eq!(hook(&c, "count /home/count="), "4", "{c}");

    // Removing a ro version deletes its /etc subvolume with it.
    run_ok(&["remove", "factory", imgs]);
    let m = Inspect::open(&img);
    assert!(!m.path("systems/factory").exists());
}

#[test]
fn volatile_root_forgets_writes_outside_state_at_each_boot() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = counting_tree(tmp.path(), "tree");
    let img = tmp.path().join("volatile.img");
    let imgs = img.to_str().unwrap();
    run_ok(&[
        "--rootfs",
        tree.to_str().unwrap(),
        "--root-mode",
        "volatile",
        imgs,
    ]);
    assert_check_passes(imgs);
    for n in 1..=2 {
        let c = boot_persist(&img);
        assert!(
            c.contains("/run ro init=/usr/lib/btrfs-deploy/volatile-root btrfs_deploy.root=volatile console=tty0"),
            "{c}"
        );
        let root = hook(&c, "root=");
        assert!(
            root.starts_with("overlay rw,"),
            "boot {n}: / is `{root}`\n{c}"
        );
        assert!(root.contains("lowerdir=/"), "{root}");
        // The write to / succeeds, but the previous boot's is gone.
        assert_eq!(hook(&c, "root-write="), "ok", "{c}");
        assert_eq!(hook(&c, "old-rootfile="), "none", "boot {n}\n{c}");
        // /etc is part of the overlay: its count starts over; /home's does not.
        assert_eq!(hook(&c, "count /etc/count="), "1", "boot {n}\n{c}");
        assert_eq!(hook(&c, "count /home/count="), n.to_string(), "{c}");
        assert!(!c.contains("volatile-root: FAILED"), "{c}");
    }
    // The Btrfs root itself was never written.
    let m = Inspect::open(&img);
    assert!(!m.path("systems/factory/run/rootfile").exists());
    assert!(!m.path("systems/factory/run/etc/count").exists());
}
