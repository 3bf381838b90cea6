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

/// `deploy check` exits 3 naming the broken invariant of a version's root
/// mode.
fn assert_check_names(img: &str, needles: &[&str]) {
    let out = run(&["check", img]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(3), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("PROBLEM") && l.contains(": root mode:"))
        .unwrap_or_else(|| panic!("no root mode problem:\n{text}"));
    for n in needles {
        assert!(line.contains(n), "{n:?} not in `{line}`");
    }
}

/// Replaces `from` by `to` in the file `rel` of the image (mounted read-write).
fn edit_file(img: &Path, rel: &str, from: &str, to: &str) {
    let e = Edit::open(img);
    let p = e.path(rel);
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "{rel} lacks {from:?}:\n{text}");
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn check_names_each_broken_root_mode_invariant() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    copy_tree(&tiny_rootfs(), &tree);
    let img = tmp.path().join("ro.img");
    let imgs = img.to_str().unwrap();
    let trees = tree.to_str().unwrap();
    run_ok(&["--rootfs", trees, "--root-mode", "ro", imgs]);
    let out = run_ok(&["check", imgs]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("ok      version factory: root mode: ro: / read-only"),
        "{text}"
    );
    let fstab = "systems/factory/run/etc/fstab";

    // The fstab / line made rw.
    edit_file(
        &img,
        fstab,
        " / btrfs defaults,ro,noatime",
        " / btrfs defaults,rw,noatime",
    );
    assert_check_names(
        imgs,
        &[
            "version factory",
            "the / line",
            "defaults,rw,noatime",
            "`ro`",
        ],
    );
    edit_file(
        &img,
        fstab,
        " / btrfs defaults,rw,noatime",
        " / btrfs defaults,ro,noatime",
    );
    run_ok(&["check", imgs]);

    // The /etc line gone.
    edit_file(&img, fstab, " /etc btrfs", " /etc-gone btrfs");
    assert_check_names(imgs, &["no /etc line", "subvol=/systems/factory/run/etc"]);
    edit_file(&img, fstab, " /etc-gone btrfs", " /etc btrfs");

    // A /state line made ro.
    edit_file(
        &img,
        fstab,
        "subvol=/state/var,defaults,rw",
        "subvol=/state/var,defaults,ro",
    );
    assert_check_names(imgs, &["the /var line", "/state"]);
    edit_file(
        &img,
        fstab,
        "subvol=/state/var,defaults,ro",
        "subvol=/state/var,defaults,rw",
    );
    run_ok(&["check", imgs]);

    // `ro` gone from the version's boot entry, then `deploy cleanup`, which
    // the finding names as the fix, rewrites it.
    edit_file(
        &img,
        "extlinux/extlinux.conf",
        "rootflags=subvol=systems/factory/run ro ",
        "rootflags=subvol=systems/factory/run ",
    );
    assert_check_names(imgs, &["`label factory` lacks `ro`", "deploy cleanup"]);
    run_ok(&["cleanup", imgs]);
    run_ok(&["check", imgs]);
    // Also the default entry (the default version's own file).
    edit_file(
        &img,
        "systems/factory/default-entry.conf",
        "/run ro ",
        "/run rw ",
    );
    assert_check_names(imgs, &["`label default` lacks `ro`", "has `rw`"]);
    run_ok(&["cleanup", imgs]);
    run_ok(&["check", imgs]);

    // The same on the EFI system partition (partition 1 at 1 MiB) of this
    // hybrid disk.
    let esp = format!("{imgs}@@{}", 1 << 20);
    let entry = sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mtype -i {esp} ::/loader/entries/factory.conf"
    ));
    assert!(entry.contains("/run ro "), "{entry}");
    let edited = tmp.path().join("factory.conf");
    write(&edited, entry.replace("/run ro ", "/run rw ").as_bytes());
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -o -i {esp} {} ::/loader/entries/factory.conf",
        edited.display()
    ));
    assert_check_names(
        imgs,
        &[
            "the EFI system partition's entry for factory lacks `ro`",
            "deploy cleanup",
        ],
    );
    run_ok(&["cleanup", imgs]);
    run_ok(&["check", imgs]);

    // A volatile version without its script.
    run_ok(&[
        "--rootfs",
        trees,
        "--version",
        "v2",
        "--root-mode",
        "volatile",
        imgs,
    ]);
    run_ok(&["check", imgs]);
    {
        let e = Edit::open(&img);
        std::fs::remove_file(e.path("systems/v2/run/usr/lib/btrfs-deploy/volatile-root")).unwrap();
    }
    assert_check_names(
        imgs,
        &[
            "version v2",
            "volatile-root is missing",
            "--root-mode volatile",
        ],
    );
}

#[test]
fn ro_makes_the_rootfs_own_root_entry_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    copy_tree(&tiny_rootfs(), &tree);
    write(
        &tree.join("etc/fstab"),
        b"# vendor\n/dev/root / btrfs defaults,rw,noatime 0 1\n",
    );
    let img = tmp.path().join("ro.img");
    let imgs = img.to_str().unwrap();
    let out = run_ok(&[
        "--rootfs",
        tree.to_str().unwrap(),
        "--root-mode",
        "ro",
        imgs,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("etc/fstab line 2) made read-only"),
        "{stderr}"
    );
    let fstab = "systems/factory/run/etc/fstab";
    {
        let m = Inspect::open(&img);
        let text = std::fs::read_to_string(m.path(fstab)).unwrap();
        assert!(
            text.contains(
                "(was `defaults,rw,noatime`)\n/dev/root / btrfs defaults,noatime,ro 0 1\n"
            ),
            "{text}"
        );
        // The rootfs itself is left as it was.
        let orig = std::fs::read_to_string(tree.join("etc/fstab")).unwrap();
        assert!(orig.contains("defaults,rw,noatime"), "{orig}");
    }
    // (A warning: /dev/root is not this disk's UUID, as at deploy.)
    run_ok(&["check", imgs]);
    edit_file(
        &img,
        fstab,
        "defaults,noatime,ro 0 1",
        "defaults,noatime 0 1",
    );
    assert_check_names(imgs, &["the / line", "line 3, options `defaults,noatime`"]);
    edit_file(
        &img,
        fstab,
        "defaults,noatime 0 1",
        "defaults,noatime,ro 0 1",
    );

    // A bundle of such a version (v2, ro too) applied as rw on another disk
    // gives the line its options back.
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    run_ok(&[
        "--rootfs",
        tree.to_str().unwrap(),
        "--version",
        "v2",
        "--root-mode",
        "ro",
        imgs,
    ]);
    run_ok(&["keygen", "--output", &p("vendor")]);
    run_ok(&[
        "bundle",
        "create",
        imgs,
        "--version",
        "v2",
        "--sign-key",
        &p("vendor.key"),
        "--output",
        &p("v2.bundle"),
    ]);
    let other = p("other.img");
    run_ok(&["--rootfs", &p("tree"), &other]);
    run_ok(&[
        "--rootfs",
        &p("v2.bundle"),
        "--verify-key",
        &p("vendor.pub"),
        &other,
    ]);
    run_ok(&["check", &other]);
    let m = Inspect::open(Path::new(&other));
    let text = std::fs::read_to_string(m.path("systems/v2/run/etc/fstab")).unwrap();
    assert!(
        text.starts_with("# vendor\n/dev/root / btrfs defaults,rw,noatime 0 1\n"),
        "{text}"
    );
    assert!(!text.contains("`ro` added"), "{text}");
}

/// The `label default` entry of an image (the default version's own file).
fn default_entry(img: &Path) -> String {
    let m = Inspect::open(img);
    std::fs::read_to_string(m.path("systems/default/default-entry.conf")).unwrap()
}

#[test]
fn bundles_and_set_default_keep_ro_versions_ro() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let tree = d.join("tree");
    std::fs::create_dir(&tree).unwrap();
    copy_tree(&tiny_rootfs(), &tree);
    // The build machine: factory, then v2, both ro.
    run_ok(&["--rootfs", &p("tree"), "--root-mode", "ro", &p("build.img")]);
    sh(&format!(
        "cp --sparse=always {} {}",
        p("build.img"),
        p("device.img")
    ));
    write(&tree.join("etc/issue"), b"v2\n");
    run_ok(&[
        "--rootfs",
        &p("tree"),
        "--version",
        "v2",
        "--root-mode",
        "ro",
        &p("build.img"),
    ]);
    run_ok(&["keygen", "--output", &p("vendor")]);
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
    // The device: the bundle applied as an ro version.
    let dev = p("device.img");
    let img = Path::new(&dev);
    run_ok(&[
        "--rootfs",
        &p("v2.bundle"),
        "--verify-key",
        &p("vendor.pub"),
        "--root-mode",
        "ro",
        &dev,
    ]);
    let out = run_ok(&["check", &dev]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("ok      version v2: root mode: ro"), "{text}");
    let uuid = fs_uuid(img);
    {
        let m = Inspect::open(img);
        let rec = std::fs::read_to_string(m.path("systems/v2/deployment.json")).unwrap();
        assert!(rec.contains("\"root_mode\": \"ro\""), "{rec}");
        let fstab = std::fs::read_to_string(m.path("systems/v2/run/etc/fstab")).unwrap();
        assert!(
            fstab.contains(&format!("UUID={uuid} / btrfs defaults,ro,noatime 0 1")),
            "{fstab}"
        );
        assert!(
            fstab.contains(&format!(
                "UUID={uuid} /etc btrfs subvol=/systems/v2/run/etc,defaults,rw,noatime 0 0"
            )),
            "{fstab}"
        );
        // The build machine's additions were stripped: added once, here.
        assert_eq!(
            fstab.matches("# Added by btrfs-deploy").count(),
            1,
            "{fstab}"
        );
        assert_eq!(fstab.matches(" / btrfs").count(), 1, "{fstab}");
        assert_eq!(
            std::fs::read_to_string(m.path("systems/v2/run/etc/issue")).unwrap(),
            "v2\n"
        );
    }
    assert!(default_entry(img).contains("systems/default/run ro "));

    // set-default back and forth: still ro, and check passes.
    for label in ["factory", "v2"] {
        run_ok(&["set-default", label, &dev]);
        let e = default_entry(img);
        assert!(e.contains(&format!("the default is {label}.")), "{e}");
        assert!(e.contains("systems/default/run ro "), "{e}");
        let out = run_ok(&["check", &dev]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for l in ["factory", "v2"] {
            assert!(
                text.contains(&format!("ok      version {l}: root mode: ro")),
                "{text}"
            );
        }
    }
    let list = String::from_utf8_lossy(&run_ok(&["list", &dev]).stdout).into_owned();
    assert_eq!(list.matches(" ro ").count(), 2, "{list}");
}

/// Every file of `dir` but those under the `skip` folders, with its size
/// and content hash: what a power cut must not change.
fn tree_digest(dir: &Path, skip: &[&str]) -> String {
    let prune: String = skip
        .iter()
        .map(|s| format!(" -path ./{s} -prune -o"))
        .collect();
    sh(&format!(
        "cd {} && find .{prune} -print | LC_ALL=C sort | while read -r p; do \
         if [ -f \"$p\" ] && [ ! -L \"$p\" ]; then echo \"$p $(sha256sum <\"$p\" | cut -c1-16)\"; \
         else echo \"$p $(stat -c %F \"$p\")\"; fi; done",
        dir.display()
    ))
}

/// A power cut (QEMU killed) while the guest writes to `/`, `/etc` and
/// `/home` as fast as it can, in `ro` and in `volatile`: the next boot is
/// clean, `deploy check` passes, and nothing of the version outside its
/// writable parts changed (in `ro`: all but `/etc`; in `volatile`: all).
#[test]
fn a_power_cut_while_writing_leaves_ro_and_volatile_roots_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    copy_tree(&tiny_rootfs(), &tree);
    let hook_path = tree.join("etc/tiny-boot.d/10-writer");
    write(
        &hook_path,
        br#"#!/bin/sh
if [ -f /home/cut-done ]; then
    echo "after-cut=$(wc -c </home/junk 2>/dev/null || echo 0)"
    exit 0
fi
: >/home/cut-done
sync
echo "writing=yes" >/dev/console
i=0
while :; do
    i=$((i + 1))
    echo "line $i of junk that fills the page cache" >>/etc/junk
    echo "line $i" >>/home/junk
    echo "$i" >/rootjunk 2>/dev/null
    [ $((i % 200)) = 0 ] && sync &
done
"#,
    );
    chmod(&hook_path, 0o755);
    for (mode, skip) in [("ro", vec!["etc"]), ("volatile", vec![])] {
        eprintln!("--- root mode {mode}");
        let img = tmp.path().join(format!("{mode}.img"));
        let imgs = img.to_str().unwrap();
        run_ok(&[
            "--rootfs",
            tree.to_str().unwrap(),
            "--root-mode",
            mode,
            imgs,
        ]);
        let before = {
            let m = Inspect::open(&img);
            tree_digest(&m.path("systems/factory/run"), &skip)
        };
        // The cut: boot-test kills QEMU at its timeout, mid-write.
        let log = tmp.path().join(format!("{mode}-cut.log"));
        let out = run(&[
            "boot-test",
            imgs,
            "--firmware",
            "bios",
            "--persist",
            "--accel",
            "tcg",
            "--timeout",
            "25",
            "--expect",
            "never printed",
            "--log",
            log.to_str().unwrap(),
        ]);
        let cut = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!out.status.success(), "the cut boot was not cut: {out:?}");
        assert!(
            cut.contains("writing=yes"),
            "the guest never started writing:\n{cut}"
        );
        // The next boot is clean, and the writes to /state are there.
        let c = boot_persist(&img);
        let after_cut = hook(&c, "after-cut=");
        assert!(after_cut.parse::<u64>().is_ok(), "{c}");
        assert_check_passes(imgs);
        let m = Inspect::open(&img);
        let after = tree_digest(&m.path("systems/factory/run"), &skip);
        assert_eq!(
            before, after,
            "{mode}: the version changed outside its writable parts"
        );
        assert!(!m.path("systems/factory/run/rootjunk").exists(), "{mode}");
        if mode == "volatile" {
            assert!(!m.path("systems/factory/run/etc/junk").exists());
        }
    }
}

/// On the device itself, with `/` read-only: the carried deploy adds a
/// version from a tarball on /srv on trial (writing the disk through its
/// own private mounts, never through `/`), the trial boot is healthy and
/// committed, and the new version is `ro` too.
#[test]
fn a_device_with_a_read_only_root_upgrades_itself_on_trial() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = d.join("base");
    std::fs::create_dir(&base).unwrap();
    copy_tree(&tiny_rootfs(), &base);
    write_trial_hooks(&base, "10-trial-watch", 120);
    let hooks = base.join("etc/tiny-boot.d");
    write(
        &hooks.join("50-scenario"),
        br#"#!/bin/sh
step=$(cat /srv/step 2>/dev/null || echo 0)
echo "SCENARIO: step=$step root=$(awk '$2 == "/" { o = $4 } END { print o }' /proc/mounts)"
case $step in
0) deploy --version v2 --trial --root-mode ro --rootfs /srv/v2.tar || echo "SCENARIO: deploy v2 failed"
   echo 1 >/srv/step; sync; reboot -f ;;
*) deploy status; echo "SCENARIO: done" ;;
esac
"#,
    );
    chmod(&hooks.join("50-scenario"), 0o755);
    let v2 = d.join("v2");
    std::fs::create_dir(&v2).unwrap();
    copy_tree(&base, &v2);
    write(&v2.join("etc/issue"), b"v2\n");
    let img = d.join("device.img");
    let i = img.to_str().unwrap();
    run_ok(&[
        "--boot",
        "bios",
        "--size",
        "1500M",
        "--root-mode",
        "ro",
        "-e",
        "on-device",
        "--rootfs",
        base.to_str().unwrap(),
        i,
    ]);
    {
        let e = Edit::open(&img);
        sh(&format!(
            "tar -C {} --numeric-owner -cf {}/v2.tar .",
            v2.display(),
            e.path("state/srv").display()
        ));
    }
    let log = d.join("scenario.log");
    let out = run(&[
        "boot-test",
        i,
        "--persist",
        "--accel",
        "tcg",
        "--firmware",
        "bios",
        "--reboots",
        "1",
        "--timeout",
        "600",
        "--expect",
        "SCENARIO: done",
        "--fail-on",
        "SCENARIO: deploy .* failed",
        "--log",
        log.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    assert!(out.status.success(), "scenario failed: {out:?}\n{text}");
    let b = |n| boot_of(&text, n);
    assert!(b(1).contains("SCENARIO: step=0 root=ro,"), "{}", b(1));
    assert!(b(2).contains("this boot is the trial of v2"), "{}", b(2));
    assert!(b(2).contains("v2 is now the default"), "{}", b(2));
    assert!(b(2).contains("SCENARIO: step=1 root=ro,"), "{}", b(2));
    let st: serde_json::Value =
        serde_json::from_slice(&run_ok(&["status", i, "--json"]).stdout).unwrap();
    assert_eq!(st["default"], "v2", "{st}");
    let m = Inspect::open(&img);
    let record = std::fs::read_to_string(m.path("systems/v2/deployment.json")).unwrap();
    assert!(record.contains("\"root_mode\": \"ro\""), "{record}");
    drop(m);
    assert_check_passes(i);
}
