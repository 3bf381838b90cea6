//! Integration: upgrades and version management (issue 4) on real images.

mod common;
use common::*;
use std::path::{Path, PathBuf};

struct Disk {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    img: String,
    v1: PathBuf,
}

/// factory deployed from a synthetic rootfs with an 8 MiB file and a few /etc files.
fn factory() -> Disk {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let v1 = dir.join("v1");
    make_rootfs(&v1);
    write(&v1.join("usr/lib/big.bin"), &pseudo_random(8 << 20, 1));
    write(&v1.join("etc/app.conf"), b"a=1\nb=2\nc=3\nd=4\ne=5\nf=6\n");
    write(&v1.join("etc/user-only.conf"), b"x=1\n");
    write(&v1.join("etc/vendor-only.conf"), b"v=1\n");
    write(&v1.join("etc/both.conf"), b"same=1\n");
    write(&v1.join("etc/deleted-by-user.conf"), b"gone\n");
    let img = dir.join("disk.img").to_str().unwrap().to_string();
    run_ok(&["--rootfs", v1.to_str().unwrap(), "--size", "700M", &img]);
    Disk {
        _tmp: tmp,
        dir,
        img,
        v1,
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// v2 = v1 with a few changes.
fn make_v2(d: &Disk) -> PathBuf {
    let v2 = d.dir.join("v2");
    sh(&format!("cp -a {} {}", d.v1.display(), v2.display()));
    write(&v2.join("usr/lib/new.bin"), &pseudo_random(2 << 20, 2));
    write(&v2.join("usr/bin/tool"), &pseudo_random(1 << 20, 3));
    std::fs::remove_file(v2.join("usr/bin/sgid")).unwrap();
    write(&v2.join("etc/vendor-only.conf"), b"v=2\n");
    write(&v2.join("etc/both.conf"), b"same=vendor\n");
    write(
        &v2.join("etc/app.conf"),
        b"a=1\nb=2\nc=3\nd=4\ne=5\nf=VENDOR\n",
    );
    write(&v2.join("etc/new-vendor.conf"), b"new\n");
    write(&v2.join("home/newuser/welcome"), b"seeded\n");
    write(
        &v2.join("home/user/notes.txt"),
        b"vendor notes must not overwrite state\n",
    );
    v2
}

fn default_of(img: &str) -> String {
    let m = Inspect::open(Path::new(img));
    std::fs::read_link(m.path("systems/default"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn upgrade_syncs_delta_shares_extents_and_merges_etc() {
    let d = factory();
    // The user edits the running factory: /etc and /state.
    {
        let e = Edit::open(Path::new(&d.img));
        write(
            &e.path("systems/factory/run/etc/user-only.conf"),
            b"x=LOCAL\n",
        );
        write(
            &e.path("systems/factory/run/etc/both.conf"),
            b"same=local\n",
        );
        write(
            &e.path("systems/factory/run/etc/app.conf"),
            b"a=LOCAL\nb=2\nc=3\nd=4\ne=5\nf=6\n",
        );
        write(
            &e.path("systems/factory/run/etc/user-added.conf"),
            b"mine\n",
        );
        std::fs::remove_file(e.path("systems/factory/run/etc/deleted-by-user.conf")).unwrap();
        write(
            &e.path("state/home/user/notes.txt"),
            b"edited by the user\n",
        );
    }
    let before = data_used(Path::new(&d.img));
    let v2 = make_v2(&d);
    let out = run_ok(&["--version", "v2", "--rootfs", v2.to_str().unwrap(), &d.img]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CONFLICT /etc/both.conf"), "{stderr}");
    assert_no_leftovers(Path::new(&d.img), false);
    let after = data_used(Path::new(&d.img));
    let changed = (2u64 << 20) + (1 << 20);
    let growth = after.saturating_sub(before);
    assert!(
        growth <= changed + changed / 10 + (256 << 10),
        "disk grew by {growth} for {changed} changed bytes"
    );

    // `list --sizes`: each version references its data once (orig and run share it):
    // factory's 100 kB tool was replaced by a 1 MiB one and a 2 MiB file was added.
    let rows: serde_json::Value =
        serde_json::from_slice(&run_ok(&["list", &d.img, "--json", "--sizes"]).stdout).unwrap();
    let rows = &rows["versions"];
    let (f, v) = (
        rows[0]["size_bytes"].as_u64().unwrap(),
        rows[1]["size_bytes"].as_u64().unwrap(),
    );
    assert!(f > 8 << 20 && f < 9 << 20, "factory size {f}");
    assert!(
        v > f + (2 << 20) + (800 << 10) && v < f + changed + (256 << 10),
        "v2 size {v}, factory {f}"
    );
    let m = Inspect::open(Path::new(&d.img));
    assert_eq!(
        std::fs::read_link(m.path("systems/default")).unwrap(),
        Path::new("v2")
    );
    let orig2 = m.path("systems/v2/orig");
    // Content matches the new rootfs, deletions included.
    for sub in ["usr", "dev", "boot", "empty"] {
        let diff =
            btrfs_deploy::tree::copy::testing::tree_diff(&v2.join(sub), &orig2.join(sub), false);
        assert!(diff.is_empty(), "{sub} differs: {diff:?}");
    }
    assert!(!orig2.join("usr/bin/sgid").exists());
    // Unchanged files share extents with factory.
    assert_eq!(
        first_extent(&m.path("systems/factory/orig/usr/lib/big.bin")),
        first_extent(&orig2.join("usr/lib/big.bin"))
    );
    assert_ne!(
        first_extent(&m.path("systems/factory/orig/usr/bin/tool")),
        first_extent(&orig2.join("usr/bin/tool"))
    );
    // /etc three-way merge.
    let etc = m.path("systems/v2/run/etc");
    let read = |p: &str| std::fs::read_to_string(etc.join(p)).unwrap();
    assert_eq!(read("user-only.conf"), "x=LOCAL\n");
    assert_eq!(read("vendor-only.conf"), "v=2\n");
    assert_eq!(read("app.conf"), "a=LOCAL\nb=2\nc=3\nd=4\ne=5\nf=VENDOR\n");
    assert_eq!(read("both.conf"), "same=vendor\n");
    assert_eq!(read("both.conf.deploy-local"), "same=local\n");
    assert_eq!(read("user-added.conf"), "mine\n");
    assert_eq!(read("new-vendor.conf"), "new\n");
    assert!(!etc.join("deleted-by-user.conf").exists());
    // orig keeps the vendor's /etc.
    assert_eq!(
        std::fs::read_to_string(orig2.join("etc/both.conf")).unwrap(),
        "same=vendor\n"
    );
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path("systems/v2/deployment.json")).unwrap())
            .unwrap();
    assert_eq!(rec["upgraded_from"], "factory");
    let conflicts = rec["details"]["etc_merge"]["conflicts"].as_array().unwrap();
    assert!(
        conflicts.iter().any(|c| c["path"] == "both.conf"),
        "{conflicts:?}"
    );
    assert_eq!(rec["details"]["sync"]["deleted"], 1);
    // fstab completed once, not twice.
    let fstab = std::fs::read_to_string(m.path("systems/v2/run/etc/fstab")).unwrap();
    assert_eq!(
        fstab.matches("# Added by btrfs-deploy").count(),
        1,
        "{fstab}"
    );
    assert_eq!(fstab.matches(" /home btrfs").count(), 1, "{fstab}");
    // /state follows v2: the user's edit stays (v2's copy beside it), new
    // entries arrive; the version keeps its vendor copy of /home.
    assert_eq!(
        std::fs::read(m.path("state/home/user/notes.txt")).unwrap(),
        b"edited by the user\n"
    );
    assert_eq!(
        std::fs::read(m.path("state/home/user/notes.txt.deploy-new")).unwrap(),
        b"vendor notes must not overwrite state\n"
    );
    assert_eq!(
        std::fs::read(m.path("state/home/newuser/welcome")).unwrap(),
        b"seeded\n"
    );
    assert!(orig2.join("home/newuser/welcome").exists());
    // Boot config has both versions; the default entry, reached through
    // systems/default, is v2's.
    let conf = std::fs::read_to_string(m.path("extlinux/extlinux.conf")).unwrap();
    assert!(
        conf.contains("label factory\n")
            && conf.contains("label v2\n")
            && conf.contains("include /systems/default/default-entry.conf\n"),
        "{conf}"
    );
    let entry = std::fs::read_to_string(m.path("systems/default/default-entry.conf")).unwrap();
    assert!(entry.contains("the default is v2."), "{entry}");
}

#[test]
fn list_set_default_remove_keep_and_no_default() {
    let d = factory();
    let v2 = make_v2(&d);
    let v2s = v2.to_str().unwrap();
    run_ok(&["--version", "v2", "--no-default", "--rootfs", v2s, &d.img]);
    assert_eq!(default_of(&d.img), "factory");
    run_ok(&["--version", "v3", "--rootfs", v2s, &d.img]);
    assert_eq!(default_of(&d.img), "v3");

    let out = run_ok(&["list", &d.img, "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows["format"], 1);
    let rows = &rows["versions"];
    let labels: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["factory", "v2", "v3"]);
    assert_eq!(rows[2]["default"], true);
    assert_eq!(rows[0]["default"], false);
    assert_eq!(rows[0]["kernel_version"], FAKE_KVER);
    let text = String::from_utf8_lossy(&run_ok(&["list", &d.img]).stdout).into_owned();
    assert!(
        text.lines().any(|l| l.starts_with("*") && l.contains("v3")),
        "{text}"
    );

    // Rollback.
    run_ok(&["set-default", "factory", &d.img]);
    assert_eq!(default_of(&d.img), "factory");
    {
        let m = Inspect::open(Path::new(&d.img));
        let entry = std::fs::read_to_string(m.path("systems/default/default-entry.conf")).unwrap();
        assert!(entry.contains("the default is factory."), "{entry}");
    }
    run_fails(
        &["set-default", "nope", &d.img],
        1,
        &["no version nope", "factory, v2, v3"],
    );
    // The default cannot be removed.
    run_fails(
        &["remove", "factory", &d.img],
        1,
        &["is the default version"],
    );
    run_ok(&["remove", "v2", &d.img]);
    {
        let m = Inspect::open(Path::new(&d.img));
        assert!(!m.path("systems/v2").exists());
        let conf = std::fs::read_to_string(m.path("extlinux/extlinux.conf")).unwrap();
        assert!(!conf.contains("label v2"), "{conf}");
        let list = sh(&format!("btrfs subvolume list {}", m.top().display()));
        assert!(!list.contains("systems/v2/"), "{list}");
    }
    run_fails(&["remove", "v2", &d.img], 1, &["no version v2"]);
    // An existing label is refused and changes nothing.
    let before = std::fs::read(&d.img).unwrap();
    run_fails(
        &["--version", "v3", "--rootfs", v2s, &d.img],
        1,
        &["already exists"],
    );
    assert!(
        std::fs::read(&d.img).unwrap() == before,
        "refused upgrade changed the image"
    );
    assert_no_leftovers(Path::new(&d.img), false);

    // --keep 2: after switching to v4, only v4 and the previous default (factory) remain... plus nothing else.
    run_ok(&["--version", "v4", "--keep", "2", "--rootfs", v2s, &d.img]);
    let rows: serde_json::Value =
        serde_json::from_slice(&run_ok(&["list", &d.img, "--json"]).stdout).unwrap();
    let rows = &rows["versions"];
    let labels: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        ["factory", "v4"],
        "previous default kept, v3 pruned"
    );
}

#[test]
fn failed_upgrade_leaves_the_old_default_and_no_partial() {
    let d = factory();
    // A v2 whose /home is a symlink to / is refused (at planning).
    let bad = d.dir.join("bad");
    sh(&format!("cp -a {} {}", d.v1.display(), bad.display()));
    sh(&format!(
        "rm -rf {0}/home && ln -s / {0}/home",
        bad.display()
    ));
    run_fails(
        &["--version", "v2", "--rootfs", bad.to_str().unwrap(), &d.img],
        1,
        &["/home", "symlink"],
    );
    assert_no_leftovers(Path::new(&d.img), false);
    // A v2 that does not fit.
    let huge = d.dir.join("huge");
    sh(&format!("cp -a {} {}", d.v1.display(), huge.display()));
    sh(&format!(
        "head -c 750M /dev/urandom > {}/usr/lib/huge.bin",
        huge.display()
    ));
    run_fails(
        &[
            "--version",
            "v3",
            "--rootfs",
            huge.to_str().unwrap(),
            &d.img,
        ],
        1,
        &["no space left"],
    );
    assert_no_leftovers(Path::new(&d.img), false);
    {
        let m = Inspect::open(Path::new(&d.img));
        assert_eq!(
            std::fs::read_link(m.path("systems/default")).unwrap(),
            Path::new("factory")
        );
        let names: Vec<String> = std::fs::read_dir(m.path("systems"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, ["default", "factory"]);
        let conf = std::fs::read_to_string(m.path("extlinux/extlinux.conf")).unwrap();
        assert!(!conf.contains("v2") && !conf.contains("v3"), "{conf}");
    }
    btrfs_check_image(Path::new(&d.img)).unwrap();
    // And a good upgrade still works afterwards.
    let v2 = make_v2(&d);
    run_ok(&["--version", "v2", "--rootfs", v2.to_str().unwrap(), &d.img]);
    assert_eq!(default_of(&d.img), "v2");
}

#[test]
fn leftovers_of_an_interrupted_upgrade_are_cleaned() {
    let d = factory();
    {
        let e = Edit::open(Path::new(&d.img));
        std::fs::create_dir(e.path("systems/.v9.partial")).unwrap();
        sh(&format!(
            "btrfs subvolume create {}",
            e.path("systems/.v9.partial/orig").display()
        ));
    }
    run_ok(&["cleanup", &d.img]);
    let m = Inspect::open(Path::new(&d.img));
    assert!(!m.path("systems/.v9.partial").exists());
    drop(m);
    // A stale image .partial of an interrupted first deploy (deploy marks
    // the files it makes) is removed by cleanup too.
    let partial = format!("{}.partial", d.img);
    write(Path::new(&partial), b"stale");
    chmod(Path::new(&partial), 0o600);
    setxattr(Path::new(&partial), "user.btrfs-deploy.partial", b"1");
    run_ok(&["cleanup", &d.img]);
    assert!(!Path::new(&partial).exists());
}

#[test]
fn kernel_less_version_cannot_become_the_default_of_a_bootable_disk() {
    let d = factory();
    let before = std::fs::read(&d.img).unwrap();
    run_fails(
        &[
            "--version",
            "nk",
            "--no-bootloader",
            "--rootfs",
            d.v1.to_str().unwrap(),
            &d.img,
        ],
        1,
        &["has no kernel", "--no-default"],
    );
    assert!(
        std::fs::read(&d.img).unwrap() == before,
        "refused upgrade changed the image"
    );
    run_ok(&[
        "--version",
        "nk",
        "--no-bootloader",
        "--no-default",
        "--rootfs",
        d.v1.to_str().unwrap(),
        &d.img,
    ]);
    assert_eq!(default_of(&d.img), "factory");
    let m = Inspect::open(Path::new(&d.img));
    let conf = std::fs::read_to_string(m.path("extlinux/extlinux.conf")).unwrap();
    assert!(
        !conf.contains("label nk"),
        "a version without kernel got a boot entry:\n{conf}"
    );
    assert!(m.path("systems/nk/run/etc").is_dir());
}

#[test]
fn users_added_on_the_device_survive_an_upgrade_that_adds_a_system_user() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = tmp.path().join("v1");
    make_rootfs(&v1);
    let shadow = "root:*:19000:0:99999:7:::\nuser:!:19000:0:99999:7:::\n";
    let group = "root:x:0:\nvideo:x:44:user\nuser:x:1000:\n";
    write(&v1.join("etc/shadow"), shadow.as_bytes());
    lchown(&v1.join("etc/shadow"), 0, 42);
    chmod(&v1.join("etc/shadow"), 0o640);
    write(&v1.join("etc/group"), group.as_bytes());
    let img = tmp.path().join("disk.img");
    let img_s = img.to_str().unwrap();
    run_ok(&["--rootfs", v1.to_str().unwrap(), "--size", "600M", img_s]);
    let alice_pw = "alice:x:1001:1001:Alice:/home/alice:/bin/sh\n";
    let alice_sh = "alice:$y$j9T$devicesalt$devicehash:19500:0:99999:7:::\n";
    {
        // What `adduser alice` + `passwd alice` + `adduser alice video` do on the device.
        let e = Edit::open(&img);
        let etc = e.path("systems/factory/run/etc");
        let pw = std::fs::read_to_string(etc.join("passwd")).unwrap();
        write(&etc.join("passwd"), format!("{pw}{alice_pw}").as_bytes());
        write(
            &etc.join("shadow"),
            format!("{shadow}{alice_sh}").as_bytes(),
        );
        lchown(&etc.join("shadow"), 0, 42);
        chmod(&etc.join("shadow"), 0o640);
        write(
            &etc.join("group"),
            b"root:x:0:\nvideo:x:44:user,alice\nuser:x:1000:\nalice:x:1001:\n",
        );
    }
    // The new version adds a system user and group, and puts it in video.
    let v2 = tmp.path().join("v2");
    sh(&format!("cp -a {} {}", v1.display(), v2.display()));
    let pw = std::fs::read_to_string(v2.join("etc/passwd")).unwrap();
    write(
        &v2.join("etc/passwd"),
        format!("{pw}svc:x:998:998::/nonexistent:/usr/sbin/nologin\n").as_bytes(),
    );
    write(
        &v2.join("etc/shadow"),
        format!("{shadow}svc:!:19700::::::\n").as_bytes(),
    );
    write(
        &v2.join("etc/group"),
        b"root:x:0:\nvideo:x:44:user,svc\nuser:x:1000:\nsvc:x:998:\n",
    );
    let out = run_ok(&["--version", "v2", "--rootfs", v2.to_str().unwrap(), img_s]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("CONFLICT"), "{stderr}");
    let m = Inspect::open(&img);
    let etc = m.path("systems/v2/run/etc");
    let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
    assert!(
        passwd.contains(alice_pw) && passwd.contains("svc:x:998:"),
        "{passwd}"
    );
    let sh_text = std::fs::read_to_string(etc.join("shadow")).unwrap();
    assert!(sh_text.contains(alice_sh), "alice's hash lost: {sh_text}");
    assert!(sh_text.contains("svc:!:19700:"), "{sh_text}");
    let (uid, gid, mode) = owner_mode(&etc.join("shadow"));
    assert_eq!((uid, gid, mode & 0o7777), (0, 42, 0o640));
    let group = std::fs::read_to_string(etc.join("group")).unwrap();
    assert!(group.contains("video:x:44:user,svc,alice\n"), "{group}");
    assert!(group.contains("alice:x:1001:\n") && group.contains("svc:x:998:\n"));
    assert!(!etc.join("passwd.deploy-local").exists());
    let record = std::fs::read_to_string(m.path("systems/v2/deployment.json")).unwrap();
    assert!(record.contains("\"passwd\""), "{record}");
}
