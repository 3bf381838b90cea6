//! Integration: a first deploy onto a new image (issue 2). Real loop devices,
//! real Btrfs; the image is mounted read-only afterwards and checked.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn deployed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let rootfs = dir.join("rootfs");
    make_rootfs(&rootfs);
    let img = dir.join("disk.img");
    run_ok(&[
        "--version",
        "factory",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--size",
        "600M",
        img.to_str().unwrap(),
    ]);
    (rootfs, img)
}

#[test]
fn factory_deploy_writes_the_whole_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (rootfs, img) = deployed(tmp.path());
    assert_no_leftovers(&img, false);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 600 << 20);
    // Sparse: far less allocated than its size.
    assert!(std::fs::metadata(&img).unwrap().blocks() * 512 < 300 << 20);
    let uuid = fs_uuid(&img);
    let m = Inspect::open(&img);

    assert_eq!(
        std::fs::read_link(m.path("systems/default")).unwrap(),
        Path::new("factory")
    );
    let list = sh(&format!("btrfs subvolume list {}", m.top().display()));
    for sv in [
        "systems/factory/orig",
        "systems/factory/run",
        "state/home",
        "state/root",
        "state/opt",
        "state/srv",
        "state/var",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(&format!("path {sv}"))),
            "subvolume {sv} missing:\n{list}"
        );
    }
    assert_eq!(
        sh(&format!(
            "btrfs property get -ts {}/systems/factory/orig ro",
            m.top().display()
        ))
        .trim(),
        "ro=true"
    );
    assert_eq!(
        sh(&format!(
            "btrfs property get -ts {}/systems/factory/run ro",
            m.top().display()
        ))
        .trim(),
        "ro=false"
    );

    // Kernel files outside the subvolumes, byte-identical to the rootfs's.
    assert_eq!(
        std::fs::read(m.path("systems/factory/kernel")).unwrap(),
        std::fs::read(rootfs.join(format!("boot/vmlinuz-{FAKE_KVER}"))).unwrap()
    );
    assert_eq!(
        std::fs::read(m.path("systems/factory/initramfs")).unwrap(),
        std::fs::read(rootfs.join(format!("boot/initrd.img-{FAKE_KVER}"))).unwrap()
    );
    assert!(!m.path("systems/factory/dtb").exists());

    // deployment.json
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path("systems/factory/deployment.json")).unwrap())
            .unwrap();
    assert_eq!(rec["label"], "factory");
    assert_eq!(rec["kernel_version"], FAKE_KVER);
    assert_eq!(
        rec["rootfs"],
        rootfs.canonicalize().unwrap().to_str().unwrap()
    );

    // fstab completion, exactly.
    let fstab = std::fs::read_to_string(m.path("systems/factory/run/etc/fstab")).unwrap();
    let mut expected =
        String::from("# /etc/fstab: static file system information.\n# Added by btrfs-deploy\n");
    expected.push_str(&format!("UUID={uuid} / btrfs defaults,rw,noatime 0 1\n"));
    for d in ["home", "root", "opt", "srv", "var"] {
        expected.push_str(&format!(
            "UUID={uuid} /{d} btrfs subvol=/state/{d},defaults,rw,noatime 0 2\n"
        ));
    }
    assert_eq!(fstab, expected);
    assert_eq!(
        std::fs::read_to_string(m.path("systems/factory/orig/etc/fstab")).unwrap(),
        expected
    );

    // State moved: content in /state, the version's dirs are empty mount points with the same metadata.
    assert_eq!(
        std::fs::read(m.path("state/home/user/notes.txt")).unwrap(),
        b"user data\n"
    );
    assert_eq!(owner_mode(&m.path("state/home/user/notes.txt")).0, 1000);
    assert_eq!(
        owner_mode(&m.path("state/home/user")),
        (1000, 1000, owner_mode(&rootfs.join("home/user")).2)
    );
    assert_eq!(
        std::fs::read(m.path("state/var/lib/app/state")).unwrap(),
        b"var state\n"
    );
    assert_eq!(
        std::fs::read(m.path("state/root/.profile")).unwrap(),
        b"# root profile\n"
    );
    assert_eq!(owner_mode(&m.path("state/root")).2 & 0o7777, 0o700);
    assert!(
        m.path("state/srv/www/index.html").exists() && m.path("state/opt/vendor/README").exists()
    );
    // The version keeps its vendor copy of each state directory (hidden
    // under the /state mount at boot): the same tree as /state/<d>.
    for d in ["home", "root", "opt", "srv", "var"] {
        let inside = m.path(&format!("systems/factory/orig/{d}"));
        assert!(
            m.path(&format!("systems/factory/run/{d}")).is_dir(),
            "{d} mount point missing"
        );
        let diff = btrfs_deploy::tree::copy::testing::tree_diff(
            &m.path(&format!("state/{d}")),
            &inside,
            false,
        );
        assert!(diff.is_empty(), "/{d}: {diff:?}");
    }

    // Everything else preserved (modes, owners, xattrs, links, devices, sparse, times).
    let orig = m.path("systems/factory/orig");
    for rel in [
        "usr/bin/suid",
        "usr/bin/sgid",
        "tmp",
        "usr/bin/ping",
        "dev/null",
        "dev/sda",
        "run-fifo",
        "usr/bin/abs-link",
        "usr/bin/dangling",
        "empty/dir",
    ] {
        let (a, b) = (
            std::fs::symlink_metadata(rootfs.join(rel)).unwrap(),
            std::fs::symlink_metadata(orig.join(rel)).unwrap(),
        );
        assert_eq!(
            (a.mode(), a.uid(), a.gid(), a.rdev()),
            (b.mode(), b.uid(), b.gid(), b.rdev()),
            "{rel}"
        );
    }
    assert_eq!(owner_mode(&orig.join("usr/bin/suid")).2 & 0o7777, 0o4755);
    assert_eq!(
        std::fs::read_link(orig.join("usr/bin/abs-link")).unwrap(),
        Path::new("/usr/bin/tool")
    );
    assert_eq!(
        getxattr(&orig.join("usr/bin/ping"), "security.capability"),
        getxattr(&rootfs.join("usr/bin/ping"), "security.capability")
    );
    assert_eq!(
        getxattr(&orig.join("usr/bin/ping"), "user.note").as_deref(),
        Some(&b"hello"[..])
    );
    let (t1, t2) = (
        std::fs::symlink_metadata(orig.join("usr/bin/tool")).unwrap(),
        std::fs::symlink_metadata(orig.join("usr/bin/tool-alias")).unwrap(),
    );
    assert_eq!(t1.ino(), t2.ino(), "hardlink not preserved");
    assert_eq!(t1.mtime_nsec(), 123_456_789);
    assert_eq!(
        std::fs::symlink_metadata(orig.join("usr/bin/abs-link"))
            .unwrap()
            .mtime(),
        std::fs::symlink_metadata(rootfs.join("usr/bin/abs-link"))
            .unwrap()
            .mtime()
    );
    let sparse = std::fs::metadata(orig.join("usr/sparse.img")).unwrap();
    assert_eq!(sparse.len(), 64 << 20);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "sparse file was filled: {} blocks",
        sparse.blocks()
    );

    // Bootloader.
    let conf = std::fs::read_to_string(m.path("extlinux/extlinux.conf")).unwrap();
    assert!(
        conf.contains("\ninclude /systems/default/default-entry.conf\n"),
        "{conf}"
    );
    let entry = std::fs::read_to_string(m.path("systems/factory/default-entry.conf")).unwrap();
    assert!(entry.contains(&format!("label default\n  kernel /systems/default/kernel\n  initrd /systems/default/initramfs\n  append root=UUID={uuid} rootfstype=btrfs rootflags=subvol=systems/default/run rw console=tty0 console=ttyS0,115200")), "{entry}");
    assert!(
        conf.contains(
            "label factory\n  kernel /systems/factory/kernel\n  initrd /systems/factory/initramfs"
        ),
        "{conf}"
    );
    assert!(m.path("extlinux/ldlinux.c32").exists());
    assert_eq!(
        std::fs::read_link(m.path("extlinux.conf")).unwrap(),
        Path::new("extlinux/extlinux.conf")
    );
    drop(m);
    // SYSLINUX's boot sector is in the first sector.
    let head = std::fs::read(&img).map(|b| b[..512].to_vec()).unwrap();
    assert!(
        head.windows(8).any(|w| w == b"SYSLINUX") || head[510..512] == [0x55, 0xaa],
        "no boot sector"
    );
}

#[test]
fn default_label_is_factory_and_size_is_chosen_and_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let img = tmp.path().join("auto.img");
    let out = run_ok(&["--rootfs", rootfs.to_str().unwrap(), img.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MiB Btrfs") || stderr.contains("GiB Btrfs"),
        "size not printed: {stderr}"
    );
    let m = Inspect::open(&img);
    assert_eq!(
        std::fs::read_link(m.path("systems/default")).unwrap(),
        Path::new("factory")
    );
}

#[test]
fn no_bootloader_deploys_a_rootfs_without_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    write(&rootfs.join("etc/hostname"), b"nokernel\n");
    let img = tmp.path().join("nk.img");
    run_fails(
        &["--rootfs", rootfs.to_str().unwrap(), img.to_str().unwrap()],
        1,
        &["no kernel found", "--no-bootloader"],
    );
    assert!(!img.exists());
    run_ok(&[
        "--no-bootloader",
        "--rootfs",
        rootfs.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let m = Inspect::open(&img);
    assert!(m.path("systems/factory/run/etc/hostname").exists());
    assert!(!m.path("systems/factory/kernel").exists());
    assert!(!m.path("extlinux/extlinux.conf").exists());
    // fstab is created when the rootfs has none.
    assert!(
        std::fs::read_to_string(m.path("systems/factory/run/etc/fstab"))
            .unwrap()
            .contains(" / btrfs ")
    );
}

#[test]
fn explicit_kernel_overrides_discovery() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    // A second kernel makes discovery ambiguous ...
    write(&rootfs.join("boot/vmlinuz-7.0.0-other"), b"other kernel");
    let img = tmp.path().join("k.img");
    run_fails(
        &["--rootfs", rootfs.to_str().unwrap(), img.to_str().unwrap()],
        1,
        &[FAKE_KVER, "7.0.0-other", "--kernel"],
    );
    assert!(!img.exists());
    // ... which --kernel/--initramfs resolve.
    let k = tmp.path().join("my-kernel");
    write(&k, b"explicit kernel");
    let i = tmp.path().join("my-initrd");
    write(&i, b"explicit initrd");
    run_ok(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initramfs",
        i.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let m = Inspect::open(&img);
    assert_eq!(
        std::fs::read(m.path("systems/factory/kernel")).unwrap(),
        b"explicit kernel"
    );
    assert_eq!(
        std::fs::read(m.path("systems/factory/initramfs")).unwrap(),
        b"explicit initrd"
    );
}

/// The device holds the default (hybrid) layout: a GPT whose second
/// partition is the Btrfs.
fn assert_hybrid_layout(dev: &str) {
    assert_eq!(
        sh(&format!("blkid -p -o value -s PTTYPE {dev}")).trim(),
        "gpt"
    );
    let (offset, _) = btrfs_partition(Path::new(dev)).expect("a GPT with a Btrfs partition");
    assert_eq!(
        sh(&format!(
            "blkid -p --offset {offset} -o value -s TYPE {dev}"
        ))
        .trim(),
        "btrfs"
    );
}

#[test]
fn block_device_target_is_formatted_only_when_empty_or_wiped() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let backing = tmp.path().join("backing.img");
    sh(&format!("truncate -s 600M {}", backing.display()));
    let dev = sh(&format!("losetup --find --show {}", backing.display()))
        .trim()
        .to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _d = Detach(dev.clone());
    run_ok(&["--rootfs", rootfs.to_str().unwrap(), &dev]);
    assert_hybrid_layout(&dev);
    // Now it holds the layout: a second deploy without --version is a usage error.
    run_fails(
        &["--rootfs", rootfs.to_str().unwrap(), &dev],
        2,
        &["already holds versions", "--version"],
    );
    // Another filesystem is refused without --wipe.
    sh(&format!("mkfs.ext4 -q -F {dev}"));
    let before = std::fs::read(&backing).unwrap();
    run_fails(
        &["--rootfs", rootfs.to_str().unwrap(), &dev],
        1,
        &["ext4", "--wipe"],
    );
    assert!(
        std::fs::read(&backing).unwrap() == before,
        "refused deploy changed the device"
    );
    run_ok(&["--wipe", "--rootfs", rootfs.to_str().unwrap(), &dev]);
    assert_hybrid_layout(&dev);
}

/// The node size in the superblock of an image's Btrfs.
fn node_size(img: &Path) -> u32 {
    use std::os::unix::fs::FileExt;
    let start = btrfs_partition(img).map_or(0, |(offset, _)| offset);
    let mut b = [0u8; 4];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut b, start + 0x10000 + 0x94)
        .unwrap();
    u32::from_le_bytes(b)
}

/// A Btrfs under 2 GiB gets 4 KiB nodes (small filesystems stall on the
/// metadata reservations of 16 KiB nodes: docs/performance.md), a larger
/// one the default 16 KiB; an attribute too large for a 4 KiB node is
/// refused with the way out, nothing left behind, and fits once the disk
/// is larger.
#[test]
fn node_size_follows_the_filesystem_size_and_large_xattrs_say_how_to_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let small = tmp.path().join("small.img");
    run_ok(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        small.to_str().unwrap(),
    ]);
    assert_eq!(node_size(&small), 4096);
    let large = tmp.path().join("large.img");
    let r = rootfs.to_str().unwrap();
    run_ok(&["--rootfs", r, "--size", "3G", large.to_str().unwrap()]);
    assert_eq!(node_size(&large), 16384);
    btrfs_check_image(&small).unwrap();
    btrfs_check_image(&large).unwrap();

    // The host's ext4 holds attributes of one block at most: the tree with
    // a 5000-byte one lives on a tmpfs.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let big = shm.path().join("rootfs");
    copy_tree(&rootfs, &big);
    let value: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    setxattr(&big.join("etc/hostname"), "user.big", &value);
    let refused = tmp.path().join("refused.img");
    let b = big.to_str().unwrap();
    run_fails(
        &["--rootfs", b, refused.to_str().unwrap()],
        1,
        &["\"user.big\"", "etc/hostname", "5000 bytes", "--size 3G"],
    );
    assert!(!refused.exists());
    assert_no_leftovers(&refused, false);
    let fits = tmp.path().join("fits.img");
    run_ok(&["--rootfs", b, "--size", "3G", fits.to_str().unwrap()]);
    let m = Inspect::open(&fits);
    let kept = getxattr(&m.path("systems/factory/orig/etc/hostname"), "user.big");
    assert!(
        kept == Some(value),
        "user.big not kept: {:?} bytes",
        kept.map(|v| v.len())
    );
}
