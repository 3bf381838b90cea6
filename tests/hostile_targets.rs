//! Hostile and odd targets and rootfs shapes (issue 10, issue 11): paths the
//! tool creates or takes over are never followed through a symlink, the
//! filesystem's identity comes from its superblock, the rootfs shape is
//! checked at planning, and output errors never panic.

mod common;
use common::*;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Stdio;

fn partial_of(img: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", img.display()))
}

/// A small rootfs without a kernel (deployed with --no-bootloader).
fn small_rootfs(dir: &Path) -> PathBuf {
    let r = dir.join("rootfs");
    make_rootfs(&r);
    r
}

#[test]
fn a_partial_that_is_a_symlink_hardlink_or_foreign_file_is_never_used() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    let img = d.path().join("x.img");
    let victim = d.path().join("victim.txt");
    let victim_img = d.path().join("other.img");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::write(&victim_img, vec![1u8; 1 << 16]).unwrap();
    let before = (fingerprint(&victim), fingerprint(&victim_img));
    let r = rootfs.to_str().unwrap();
    let i = img.to_str().unwrap();

    // A symlink to a file, to another image, and a dangling one.
    for target in [&victim, &victim_img, &d.path().join("nowhere")] {
        symlink(target, partial_of(&img)).unwrap();
        run_fails(
            &["--rootfs", r, "--no-bootloader", i],
            1,
            &["x.img.partial", "is a symlink"],
        );
        assert!(!img.exists(), "the target was created");
        assert!(!d.path().join("nowhere").exists(), "a symlink was followed");
        std::fs::remove_file(partial_of(&img)).unwrap();
    }
    // A hard link to someone's file.
    std::fs::hard_link(&victim, partial_of(&img)).unwrap();
    run_fails(&["--rootfs", r, "--no-bootloader", i], 1, &["hard links"]);
    std::fs::remove_file(partial_of(&img)).unwrap();
    // A regular file this tool did not make; `cleanup` refuses it too.
    std::fs::write(partial_of(&img), "not ours").unwrap();
    run_fails(
        &["--rootfs", r, "--no-bootloader", i],
        1,
        &["not made by deploy"],
    );
    run_fails(&["cleanup", i], 1, &["not made by deploy"]);
    assert_eq!(std::fs::read(partial_of(&img)).unwrap(), b"not ours");
    std::fs::remove_file(partial_of(&img)).unwrap();

    assert_eq!((fingerprint(&victim), fingerprint(&victim_img)), before);
    assert!(!img.exists());
    assert_no_leftovers(&img, false);
    // And with nothing in the way it works, leaving a real file.
    run_ok(&["--rootfs", r, "--no-bootloader", i]);
    assert!(std::fs::symlink_metadata(&img).unwrap().is_file());
    assert_no_leftovers(&img, false);
}

#[test]
fn a_missing_path_under_dev_is_never_made_an_image() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    for target in ["/dev/loop0p9", "/dev/shm/btrfs-deploy-test.img"] {
        run_fails(
            &[
                "--rootfs",
                rootfs.to_str().unwrap(),
                "--no-bootloader",
                "--wipe",
                target,
            ],
            1,
            &[target, "only an existing block device"],
        );
        assert!(!Path::new(target).exists(), "{target} was created");
        assert!(!Path::new(&format!("{target}.partial")).exists());
    }
}

#[test]
fn a_target_inside_the_rootfs_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    std::fs::create_dir_all(rootfs.join("sub")).unwrap();
    symlink(rootfs.join("sub"), d.path().join("into-rootfs")).unwrap();
    let inside = [
        rootfs.join("disk.img"),
        rootfs.join("sub/disk.img"),
        d.path().join("into-rootfs/disk.img"),
    ];
    for img in &inside {
        run_fails(
            &[
                "--rootfs",
                rootfs.to_str().unwrap(),
                "--no-bootloader",
                img.to_str().unwrap(),
            ],
            2,
            &["is inside the rootfs"],
        );
        assert!(!img.exists() && !partial_of(img).exists());
    }
}

#[test]
fn etc_or_a_state_dir_that_is_not_a_real_directory_is_refused_at_planning() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    let img = d.path().join("x.img");
    let (r, i) = (rootfs.to_str().unwrap(), img.to_str().unwrap());
    run_ok(&["--rootfs", r, "--no-bootloader", i]);
    let fp = fingerprint(&img);

    // (shape, message) for an upgrade and for a first deploy alike.
    type Case = (&'static str, fn(&Path), &'static str);
    let cases: [Case; 4] = [
        (
            "etc -> usr/etc",
            |r| {
                std::fs::rename(r.join("etc"), r.join("usr/etc")).unwrap();
                symlink("usr/etc", r.join("etc")).unwrap();
            },
            "the rootfs's /etc is a symlink",
        ),
        (
            "var is a file",
            |r| {
                std::fs::remove_dir_all(r.join("var")).unwrap();
                std::fs::write(r.join("var"), "oops").unwrap();
            },
            "the rootfs's /var is not a directory",
        ),
        (
            "opt -> srv (in-tree symlink)",
            |r| {
                std::fs::remove_dir_all(r.join("opt")).unwrap();
                symlink("srv", r.join("opt")).unwrap();
            },
            "the rootfs's /opt is a symlink",
        ),
        (
            "home -> /home (absolute)",
            |r| {
                std::fs::remove_dir_all(r.join("home")).unwrap();
                symlink("/home", r.join("home")).unwrap();
            },
            "the rootfs's /home is a symlink",
        ),
    ];
    for (n, (what, shape, msg)) in cases.into_iter().enumerate() {
        let bad = d.path().join(format!("bad-{n}"));
        sh(&format!("cp -a {r} {}", bad.display()));
        shape(&bad);
        let b = bad.to_str().unwrap();
        eprintln!("case: {what}");
        run_fails(
            &["--version", "v2", "--rootfs", b, "--no-bootloader", i],
            1,
            &[msg],
        );
        assert_eq!(fingerprint(&img), fp, "{what}: the image changed");
        let fresh = d.path().join("fresh.img");
        run_fails(
            &["--rootfs", b, "--no-bootloader", fresh.to_str().unwrap()],
            1,
            &[msg],
        );
        assert!(!fresh.exists() && !partial_of(&fresh).exists());
        // The same tree as an archive is refused the same way, at planning.
        let tar = d.path().join("bad.tar");
        sh(&format!("tar -C {b} -cf {} .", tar.display()));
        run_fails(
            &[
                "--version",
                "v2",
                "--rootfs",
                tar.to_str().unwrap(),
                "--no-bootloader",
                i,
            ],
            1,
            &[msg],
        );
        assert_eq!(fingerprint(&img), fp, "{what} (tar): the image changed");
        std::fs::remove_file(&tar).unwrap();
    }
    assert_no_leftovers(&img, false);
}

/// Runs a deploy whose stderr (and stdout) is a pipe closed at once.
fn run_with_closed_output(args: &[&str]) -> std::process::ExitStatus {
    let mut child = deploy()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read ends: every write the tool makes gets EPIPE.
    drop(child.stdout.take());
    drop(child.stderr.take());
    child.wait().unwrap()
}

#[test]
fn closed_output_never_panics_and_cleans_up_like_any_failure() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    let img = d.path().join("x.img");
    let (r, i) = (rootfs.to_str().unwrap(), img.to_str().unwrap());
    let st = run_with_closed_output(&["--rootfs", r, "--no-bootloader", i]);
    assert_eq!(st.code(), Some(0), "first deploy with a closed stderr");
    assert!(img.is_file());
    assert_no_leftovers(&img, false);
    let st = run_with_closed_output(&["--version", "v2", "--rootfs", r, "--no-bootloader", i]);
    assert_eq!(st.code(), Some(0), "upgrade with a closed stderr");
    let st = run_with_closed_output(&["list", i]);
    assert_eq!(st.code(), Some(0), "list with a closed stdout");
    // A failure with closed output: exit 1, not a panic (101).
    let st = run_with_closed_output(&["--version", "v2", "--rootfs", r, "--no-bootloader", i]);
    assert_eq!(st.code(), Some(1), "a failing deploy with a closed stderr");
    let st = run_with_closed_output(&["--rootfs", "/nonexistent", "--no-bootloader", i]);
    assert_eq!(st.code(), Some(1));
    let mut out = String::new();
    deploy()
        .args(["list", i])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("v2"), "{out}");
    assert_no_leftovers(&img, false);
}

#[test]
fn a_mounted_clone_never_lends_its_uuid_to_an_upgrade() {
    let d = tempfile::tempdir().unwrap();
    let golden = d.path().join("golden.img");
    run_ok(&[
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        golden.to_str().unwrap(),
    ]);
    let (c1, c2) = (d.path().join("c1.img"), d.path().join("c2.img"));
    sh(&format!(
        "cp --reflink=auto {0} {1}; cp --reflink=auto {0} {2}",
        golden.display(),
        c1.display(),
        c2.display()
    ));
    let uuid = fs_uuid(&c2);
    assert_eq!(fs_uuid(&c1), uuid);
    // Keep clone c1 mounted by hand while c2 is upgraded: since Linux 6.7
    // the kernel gives the second mount of one fsid a temporary UUID.
    let held = Inspect::open(&c1);
    run_ok(&[
        "--version",
        "v2",
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        c2.to_str().unwrap(),
    ]);
    drop(held);
    let look = Inspect::open(&c2);
    let conf = [
        "extlinux/extlinux.conf",
        "systems/factory/default-entry.conf",
        "systems/v2/default-entry.conf",
    ]
    .map(|p| std::fs::read_to_string(look.path(p)).unwrap())
    .join("\n");
    let fstab = std::fs::read_to_string(look.path("systems/v2/run/etc/fstab")).unwrap();
    for line in conf.lines().filter(|l| l.contains("root=")) {
        assert!(
            line.contains(&format!("root=UUID={uuid} ")),
            "{line}\n{conf}"
        );
    }
    assert_eq!(conf.matches("root=UUID=").count(), 4, "{conf}");
    for line in fstab.lines().filter(|l| l.starts_with("UUID=")) {
        assert!(
            line.starts_with(&format!("UUID={uuid} ")),
            "{line}\n{fstab}"
        );
    }
    drop(look);
    // And the upgraded clone boots its new version.
    let console = boot_console(&c2, None);
    assert!(
        console.contains("TINY-MOUNT: / /systems/v2/run "),
        "{console}"
    );
}

#[test]
fn config_and_extensions_others_can_write_are_never_run_as_root() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let marker = d.path().join("pwned");
    let evil = shared.join("evil.configure");
    write(
        &evil,
        format!("#!/bin/sh\ntouch {}\n", marker.display()).as_bytes(),
    );
    chmod(&evil, 0o755);
    write(
        &shared.join("deploy.toml"),
        format!(
            "rootfs = \"{}\"\nno_bootloader = true\nextensions_dirs = [\".\"]\nextensions = [\"evil\"]\n",
            rootfs.display()
        )
        .as_bytes(),
    );
    let img = d.path().join("x.img");
    let deploy_in = |dir: &Path| {
        let out = deploy()
            .current_dir(dir)
            .arg(img.to_str().unwrap())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A world-writable folder (no sticky bit), a group-writable config,
    // a config owned by another user, a world-writable extension.
    let setups: [(&str, &str); 4] = [
        ("chmod 0777 {s}", "is writable by everyone"),
        (
            "chmod 0755 {s}; chmod 0664 {s}/deploy.toml",
            "writable by its group",
        ),
        (
            "chmod 0644 {s}/deploy.toml; chown 4242 {s}/deploy.toml",
            "belongs to uid 4242",
        ),
        (
            "chown 0 {s}/deploy.toml; chmod 0777 {s}/evil.configure",
            "is writable by everyone",
        ),
    ];
    for (setup, msg) in setups {
        sh(&setup.replace("{s}", shared.to_str().unwrap()));
        let (code, err) = deploy_in(&shared);
        assert_eq!(code, Some(1), "{setup}: {err}");
        assert!(
            err.contains(msg) && err.contains("DEPLOY_ALLOW_UNSAFE_PATHS"),
            "{setup}: {err}"
        );
        assert!(!marker.exists(), "{setup}: the extension ran");
        assert!(!img.exists());
    }
    // Made safe, the same config works and runs the extension.
    sh(&format!(
        "chmod 0755 {0} {0}/evil.configure",
        shared.display()
    ));
    let (code, err) = deploy_in(&shared);
    assert_eq!(code, Some(0), "{err}");
    assert!(marker.exists());
}

/// After a power cut a Btrfs may hold a log tree (fsynced writes of the
/// last, uncommitted transaction), which the kernel refuses to replay on
/// read-only media: the read-only commands must still work, and write
/// nothing.
#[test]
fn read_only_commands_work_on_a_disk_with_an_unreplayed_log() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    let img = d.path().join("x.img");
    run_ok(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--no-bootloader",
        img.to_str().unwrap(),
    ]);
    // Mount it, fsync a file (this writes a log tree and points the
    // superblock at it) and copy the image before any commit: the copy is
    // what a power cut at that moment leaves.
    let cut = d.path().join("cut.img");
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!(
        "set -e; l=$(losetup --find --show {range} {img}); mount -o commit=300,subvolid=5 $l {mnt}; \
         dd if=/dev/zero of={mnt}/state/srv/fsynced bs=4k count=4 conv=fsync status=none; \
         cp --sparse=always {img} {cut}; umount {mnt}; losetup -d $l",
        range = btrfs_losetup_range(&img),
        img = img.display(),
        mnt = mnt.display(),
        cut = cut.display()
    ));
    let sb = {
        let dev = BtrfsDev::attach(&cut, true);
        sh(&format!("btrfs inspect-internal dump-super {}", dev.dev))
    };
    let log_root = sb
        .lines()
        .find_map(|l| l.strip_prefix("log_root\t\t"))
        .unwrap_or("0")
        .trim()
        .to_string();
    assert_ne!(log_root, "0", "the copy holds no log tree:\n{sb}");
    let before = fingerprint(&cut);
    let out = run_ok(&["list", cut.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("factory"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreplayed log"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = deploy()
        .args(["check", cut.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("systems/default"), "{text}");
    assert_eq!(
        fingerprint(&cut),
        before,
        "a read-only command wrote to the disk"
    );
    // A read-write command replays the log, and the fsynced file is there.
    run_ok(&["cleanup", cut.to_str().unwrap()]);
    let look = Inspect::open(&cut);
    assert_eq!(
        std::fs::metadata(look.path("state/srv/fsynced"))
            .unwrap()
            .len(),
        16384
    );
    drop(look);
    assert_no_leftovers(&cut, false);
}

/// A mounted Btrfs shows an anonymous device number in mountinfo: it must
/// still be seen as mounted, also when it is a partition of the disk (the
/// default, hybrid layout: partition nodes made with `partx -a`, as this
/// kernel does not parse GPTs). A mounted disk is never formatted (`--wipe`
/// or not), while adding a version to it (a device upgrading the disk it
/// runs from) and reading it keep working. The filesystem made on a device
/// is reported with the device's size.
#[test]
fn a_mounted_btrfs_device_is_never_wiped_but_can_be_upgraded() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    let r = rootfs.to_str().unwrap();
    let backing = d.path().join("disk.raw");
    sh(&format!("truncate -s 1100M {}", backing.display()));
    let dev = sh(&format!("losetup --find --show -P {}", backing.display()))
        .trim()
        .to_string();
    let detach = LoopDetach(dev.clone());
    let out = run_ok(&["--rootfs", r, "--no-bootloader", &dev]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Creating a 1.07 GiB Btrfs"), "{err}");
    sh(&format!("partx -a {dev}"));
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!(
        "mount -o subvol=systems/factory/run {dev}p2 {}",
        mnt.display()
    ));
    let before = fingerprint(&backing);
    run_fails(
        &["--wipe", "--rootfs", r, "--no-bootloader", &dev],
        1,
        &["is mounted", "never formatted"],
    );
    assert_eq!(fingerprint(&backing), before, "a refused --wipe wrote");
    // On the device: list and a new version work while it is mounted.
    let out = run_ok(&["list", &dev]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("factory"));
    run_ok(&["--version", "v2", "--rootfs", r, "--no-bootloader", &dev]);
    let out = deploy().args(["check", &dev]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("skipped") && text.contains("is mounted"),
        "{text}"
    );
    sh(&format!("umount {}", mnt.display()));
    drop(detach);
}

/// Detaches a loop device when dropped.
struct LoopDetach(String);
impl Drop for LoopDetach {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn errors_name_paths_as_the_user_knows_them() {
    let d = tempfile::tempdir().unwrap();
    let rootfs = small_rootfs(d.path());
    let img = d.path().join("x.img");
    run_ok(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--no-bootloader",
        img.to_str().unwrap(),
    ]);
    // An etc/fstab that is a directory cannot be completed.
    let bad = d.path().join("bad");
    sh(&format!("cp -a {} {}", rootfs.display(), bad.display()));
    std::fs::remove_file(bad.join("etc/fstab")).unwrap();
    std::fs::create_dir(bad.join("etc/fstab")).unwrap();
    let err = run_fails(
        &[
            "--version",
            "v2",
            "--rootfs",
            bad.to_str().unwrap(),
            "--no-bootloader",
            img.to_str().unwrap(),
        ],
        1,
        &["etc/fstab of version v2"],
    );
    assert!(
        !err.contains("/run/btrfs-deploy") && !err.contains(".partial"),
        "{err}"
    );
    assert_no_leftovers(&img, false);
}
