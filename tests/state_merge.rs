//! Integration: /state follows the default version (issue 12) on real images:
//! upgrade, rollback, conflicts, an interrupted merge, old-format disks.

mod common;
use common::*;
use std::path::{Path, PathBuf};

struct Case {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    img: PathBuf,
    v1: PathBuf,
}

impl Case {
    fn img(&self) -> &str {
        self.img.to_str().unwrap()
    }
    /// A copy of factory's rootfs to change into a new version.
    fn next(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        sh(&format!("cp -a {} {}", self.v1.display(), p.display()));
        p
    }
}

/// factory ships an app in /opt and data in /var; deployed without a bootloader.
fn factory() -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let v1 = dir.join("v1");
    make_rootfs(&v1);
    write(&v1.join("opt/app/VERSION"), b"1\n");
    write(&v1.join("opt/app/removed-in-2"), b"old\n");
    write(&v1.join("opt/app/conf"), b"vendor 1\n");
    write(&v1.join("opt/app/device-edits"), b"vendor 1\n");
    write(
        &v1.join("var/lib/dpkg/status"),
        b"Package: app\nVersion: 1\n",
    );
    let img = dir.join("disk.img");
    run_ok(&[
        "--rootfs",
        v1.to_str().unwrap(),
        "--no-bootloader",
        "--size",
        "600M",
        img.to_str().unwrap(),
    ]);
    Case {
        _tmp: tmp,
        dir,
        img,
        v1,
    }
}

/// v2: the app updated, a file removed, one added, conf changed.
fn make_v2(c: &Case) -> PathBuf {
    let v2 = c.next("v2");
    write(&v2.join("opt/app/VERSION"), b"2\n");
    std::fs::remove_file(v2.join("opt/app/removed-in-2")).unwrap();
    write(&v2.join("opt/app/added-in-2"), b"new\n");
    write(&v2.join("opt/app/conf"), b"vendor 2\n");
    write(
        &v2.join("var/lib/dpkg/status"),
        b"Package: app\nVersion: 2\n",
    );
    v2
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn record(m: &Inspect, label: &str) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(m.path(&format!("systems/{label}/deployment.json"))).unwrap(),
    )
    .unwrap()
}

/// The device changes: conf and device-edits edited, data added in /srv.
fn device_changes(c: &Case) {
    let e = Edit::open(&c.img);
    write(&e.path("state/opt/app/conf"), b"device\n");
    write(&e.path("state/opt/app/device-edits"), b"device\n");
    write(&e.path("state/srv/data.db"), b"written on the device\n");
}

#[test]
fn upgrade_and_rollback_move_vendor_state_and_keep_device_changes() {
    let c = factory();
    {
        // The first deploy copies the state directories: factory keeps its vendor copy.
        let m = Inspect::open(&c.img);
        assert_eq!(read(&m.path("systems/factory/orig/opt/app/VERSION")), "1\n");
        assert_eq!(read(&m.path("state/opt/app/VERSION")), "1\n");
        assert_eq!(record(&m, "factory")["details"]["state_in_orig"], true);
    }
    device_changes(&c);
    let v2 = make_v2(&c);
    let out = run_ok(&[
        "--version",
        "v2",
        "--no-bootloader",
        "--rootfs",
        v2.to_str().unwrap(),
        c.img(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CONFLICT /opt/app/conf: changed on the device and by the new version"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("CONFLICT /opt/app/device-edits"),
        "{stderr}"
    );
    {
        let m = Inspect::open(&c.img);
        let s = |p: &str| m.path(&format!("state/{p}"));
        assert_eq!(read(&s("opt/app/VERSION")), "2\n", "updated");
        assert!(!s("opt/app/removed-in-2").exists(), "deleted");
        assert_eq!(read(&s("opt/app/added-in-2")), "new\n", "added");
        assert_eq!(
            read(&s("var/lib/dpkg/status")),
            "Package: app\nVersion: 2\n"
        );
        assert_eq!(
            read(&s("opt/app/device-edits")),
            "device\n",
            "device-only change"
        );
        assert_eq!(
            read(&s("opt/app/conf")),
            "device\n",
            "conflict: device's stays"
        );
        assert_eq!(read(&s("opt/app/conf.deploy-new")), "vendor 2\n");
        assert_eq!(read(&s("srv/data.db")), "written on the device\n");
        assert!(!m.path("state/.deploy-merge").exists(), "journal left");
        let rec = record(&m, "v2");
        let sm = &rec["details"]["state_merge"];
        assert_eq!(sm["from"], "factory");
        assert_eq!(sm["conflicts"][0]["path"], "/opt/app/conf");
        assert_eq!(sm["conflicts"][0]["new_copy"], "/opt/app/conf.deploy-new");
        assert_eq!(sm["conflicts"].as_array().unwrap().len(), 1, "{sm}");
        // Each version keeps its vendor copy.
        assert_eq!(read(&m.path("systems/factory/orig/opt/app/VERSION")), "1\n");
        assert_eq!(read(&m.path("systems/v2/orig/opt/app/VERSION")), "2\n");
    }

    // Rollback: the same rule the other way.
    let out = run_ok(&["set-default", "factory", c.img()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CONFLICT /opt/app/conf"), "{stderr}");
    {
        let m = Inspect::open(&c.img);
        let s = |p: &str| m.path(&format!("state/{p}"));
        assert_eq!(read(&s("opt/app/VERSION")), "1\n");
        assert_eq!(read(&s("opt/app/removed-in-2")), "old\n");
        assert!(!s("opt/app/added-in-2").exists());
        assert_eq!(
            read(&s("var/lib/dpkg/status")),
            "Package: app\nVersion: 1\n"
        );
        assert_eq!(read(&s("opt/app/device-edits")), "device\n");
        assert_eq!(read(&s("opt/app/conf")), "device\n");
        assert_eq!(read(&s("opt/app/conf.deploy-new")), "vendor 1\n");
        assert_eq!(read(&s("srv/data.db")), "written on the device\n");
        assert_eq!(
            record(&m, "factory")["details"]["state_merge"]["to"],
            "factory"
        );
    }

    // A version added without becoming the default leaves /state alone.
    let v3 = c.next("v3");
    write(&v3.join("opt/app/VERSION"), b"3\n");
    run_ok(&[
        "--version",
        "v3",
        "--no-default",
        "--no-bootloader",
        "--rootfs",
        v3.to_str().unwrap(),
        c.img(),
    ]);
    let m = Inspect::open(&c.img);
    assert_eq!(read(&m.path("state/opt/app/VERSION")), "1\n");
    drop(m);
    run_ok(&["check", c.img()]);
}

#[test]
fn an_interrupted_merge_is_finished_or_undone_by_the_next_command() {
    let c = factory();
    let v2 = make_v2(&c);
    run_ok(&[
        "--version",
        "v2",
        "--no-default",
        "--no-bootloader",
        "--rootfs",
        v2.to_str().unwrap(),
        c.img(),
    ]);
    // Interrupted after the switch, with the merge half done: VERSION
    // already v2's, a temporary entry left, the rest still factory's.
    {
        let e = Edit::open(&c.img);
        write(
            &e.path("state/.deploy-merge"),
            br#"{"from":"factory","to":"v2"}"#,
        );
        sh(&format!(
            "cp -a {} {}",
            e.path("systems/v2/orig/opt/app/VERSION").display(),
            e.path("state/opt/app/VERSION").display()
        ));
        write(&e.path("state/opt/app/.deploy-merge-tmp.4242"), b"half\n");
        std::fs::remove_file(e.path("systems/default")).unwrap();
        std::os::unix::fs::symlink("v2", e.path("systems/default")).unwrap();
    }
    let out = run(&["check", c.img()]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("/state/.deploy-merge: a /state merge was interrupted"),
        "{report}"
    );
    let out = run_ok(&["cleanup", c.img()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Finishing the interrupted /state merge from factory to v2"),
        "{stderr}"
    );
    {
        let m = Inspect::open(&c.img);
        assert_eq!(read(&m.path("state/opt/app/VERSION")), "2\n");
        assert_eq!(read(&m.path("state/opt/app/conf")), "vendor 2\n");
        assert!(!m.path("state/opt/app/removed-in-2").exists());
        assert!(!m.path("state/opt/app/.deploy-merge-tmp.4242").exists());
        assert!(!m.path("state/.deploy-merge").exists());
        assert_eq!(record(&m, "v2")["details"]["state_merge"]["to"], "v2");
    }
    // Interrupted before the switch (default still v2, journal v2 → factory
    // with part of factory's content in): undone back to v2 by the next deploy command.
    {
        let e = Edit::open(&c.img);
        write(
            &e.path("state/.deploy-merge"),
            br#"{"from":"v2","to":"factory"}"#,
        );
        sh(&format!(
            "cp -a {} {}",
            e.path("systems/factory/orig/opt/app/removed-in-2")
                .display(),
            e.path("state/opt/app/removed-in-2").display()
        ));
    }
    let out = run_ok(&["set-default", "v2", c.img()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Undoing the interrupted /state merge from v2 to factory"),
        "{stderr}"
    );
    let m = Inspect::open(&c.img);
    assert!(!m.path("state/opt/app/removed-in-2").exists());
    assert_eq!(read(&m.path("state/opt/app/VERSION")), "2\n");
    assert!(!m.path("state/.deploy-merge").exists());
}

#[test]
fn a_merge_that_fails_is_undone_and_the_default_stays() {
    let c = factory();
    // An immutable file the merge must replace: it cannot.
    {
        let e = Edit::open(&c.img);
        sh(&format!(
            "chattr +i {}",
            e.path("state/opt/app/removed-in-2").display()
        ));
    }
    let v2 = make_v2(&c);
    run_fails(
        &[
            "--version",
            "v2",
            "--no-bootloader",
            "--rootfs",
            v2.to_str().unwrap(),
            c.img(),
        ],
        1,
        &[
            "/state could not follow v2, so factory stays the default",
            "deploy set-default v2",
            "merging /state/opt from factory to v2",
            "removed-in-2",
        ],
    );
    {
        let e = Edit::open(&c.img);
        sh(&format!(
            "chattr -i {}",
            e.path("state/opt/app/removed-in-2").display()
        ));
        assert_eq!(
            std::fs::read_link(e.path("systems/default")).unwrap(),
            Path::new("factory")
        );
        assert_eq!(read(&e.path("state/opt/app/VERSION")), "1\n", "not undone");
        assert!(!e.path("state/.deploy-merge").exists());
    }
    assert_no_leftovers(&c.img, false);
    // Once the cause is gone, set-default completes the switch.
    run_ok(&["set-default", "v2", c.img()]);
    let m = Inspect::open(&c.img);
    assert_eq!(read(&m.path("state/opt/app/VERSION")), "2\n");
    assert!(!m.path("state/opt/app/removed-in-2").exists());
}

#[test]
fn old_format_disks_keep_working() {
    let c = factory();
    // What a disk deployed before this change looks like: factory's orig
    // state directories are empty and its record lacks state_in_orig.
    {
        let e = Edit::open(&c.img);
        let orig = e.path("systems/factory/orig");
        sh(&format!(
            "btrfs property set {o} ro false && for d in home root opt srv var; do \
             find {o}/$d -mindepth 1 -delete; done && btrfs property set {o} ro true",
            o = orig.display()
        ));
        let rec = e.path("systems/factory/deployment.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
        v["details"]
            .as_object_mut()
            .unwrap()
            .remove("state_in_orig");
        std::fs::write(&rec, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
    let v2 = make_v2(&c);
    run_ok(&[
        "--version",
        "v2",
        "--no-bootloader",
        "--rootfs",
        v2.to_str().unwrap(),
        c.img(),
    ]);
    {
        // Base empty: new paths added, different ones reported with a
        // .deploy-new copy, nothing deleted; unchanged ones left alone.
        let m = Inspect::open(&c.img);
        let s = |p: &str| m.path(&format!("state/{p}"));
        assert_eq!(read(&s("opt/app/added-in-2")), "new\n");
        assert_eq!(read(&s("opt/app/VERSION")), "1\n");
        assert_eq!(read(&s("opt/app/VERSION.deploy-new")), "2\n");
        assert_eq!(read(&s("opt/app/removed-in-2")), "old\n");
        assert!(!s("opt/app/device-edits.deploy-new").exists());
        let sm = &record(&m, "v2")["details"]["state_merge"];
        assert!(
            sm["conflicts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["path"] == "/opt/app/VERSION"),
            "{sm}"
        );
    }
    // Back to the old-format version: nothing to follow, /state stays.
    let out = run_ok(&["set-default", "factory", c.img()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/state left as it is"), "{stderr}");
    let m = Inspect::open(&c.img);
    assert_eq!(read(&m.path("state/opt/app/added-in-2")), "new\n");
}

/// QEMU: after an upgrade the booted system runs the new /opt content, and
/// a user added on the device still logs in with its password.
#[test]
fn boot_after_an_upgrade_shows_new_opt_and_the_device_user() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = tmp.path().join("v1");
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        v1.display()
    ));
    write(&v1.join("opt/app/VERSION"), b"1\n");
    let hook = v1.join("etc/tiny-boot.d/50-upgrade-report");
    write(
        &hook,
        b"#!/bin/sh\necho \"opt=$(cat /opt/app/VERSION)\"\nsu - alice -c id\n\
          h=$(grep '^alice:' /etc/shadow | cut -d: -f2)\n\
          [ \"$(busybox mkpasswd -m sha512 -S abcdefgh secret)\" = \"$h\" ] && echo password-ok=yes || echo password-ok=no\n",
    );
    chmod(&hook, 0o755);
    let img = tmp.path().join("disk.img");
    let i = img.to_str().unwrap();
    run_ok(&["--rootfs", v1.to_str().unwrap(), i]);
    {
        // `adduser alice` and `passwd alice` (password "secret") on the device.
        let hash = sh("openssl passwd -6 -salt abcdefgh secret");
        let e = Edit::open(&img);
        let etc = e.path("systems/factory/run/etc");
        let add = |f: &str, line: &str| {
            let old = std::fs::read_to_string(etc.join(f)).unwrap();
            std::fs::write(etc.join(f), format!("{old}{line}\n")).unwrap();
        };
        add("passwd", "alice:x:1001:1001::/home/alice:/bin/sh");
        add(
            "shadow",
            &format!("alice:{}:19500:0:99999:7:::", hash.trim()),
        );
        add("group", "alice:x:1001:");
        std::fs::create_dir(e.path("state/home/alice")).unwrap();
        lchown(&e.path("state/home/alice"), 1001, 1001);
    }
    let v2 = tmp.path().join("v2");
    sh(&format!("cp -a {} {}", v1.display(), v2.display()));
    write(&v2.join("opt/app/VERSION"), b"2\n");
    for (f, line) in [
        ("passwd", "svc:x:998:998::/nonexistent:/bin/false"),
        ("shadow", "svc:!:19700::::::"),
        ("group", "svc:x:998:"),
    ] {
        let old = std::fs::read_to_string(v2.join("etc").join(f)).unwrap();
        std::fs::write(v2.join("etc").join(f), format!("{old}{line}\n")).unwrap();
    }
    run_ok(&["--version", "v2", "--rootfs", v2.to_str().unwrap(), i]);
    let console = boot_console(&img, None);
    for want in [
        "TINY-HOOK: opt=2",
        "TINY-HOOK: uid=1001(alice) gid=1001(alice)",
        "TINY-HOOK: password-ok=yes",
    ] {
        assert!(console.contains(want), "{want} missing:\n{console}");
    }
}
