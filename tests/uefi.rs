//! Issue 14: disks that boot under UEFI and BIOS (`--boot hybrid|uefi`):
//! a GPT with an EFI system partition (FAT32, systemd-boot, one entry and
//! the kernel files per version) and the Btrfs partition with the layout.
//! Real images, loop devices and QEMU boots under SeaBIOS and OVMF; the ESP
//! is read back with mtools and checked with fsck.fat, independently of the
//! FAT code under test.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Offset of the ESP on the disks `deploy` writes (partition 1 at 1 MiB).
const ESP_OFFSET: u64 = 1 << 20;

/// Every path on the ESP of `img` (mtools' recursive listing).
fn esp_files(img: &Path) -> Vec<String> {
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mdir -/ -b -i {}@@{ESP_OFFSET} ::",
        img.display()
    ))
    .lines()
    .map(|l| l.trim().trim_start_matches("::").to_string())
    .collect()
}

/// A file of the ESP of `img`.
fn esp_read(img: &Path, path: &str) -> String {
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mtype -i {}@@{ESP_OFFSET} ::{path}",
        img.display()
    ))
}

/// The ESP files (`/btrfs-deploy/<hash>.linux`, `.initrd`) the entry of
/// `label` names, kernel first; each must be on the ESP.
fn entry_files(img: &Path, label: &str) -> Vec<String> {
    let entry = esp_read(img, &format!("/loader/entries/{label}.conf"));
    let named: Vec<String> = entry
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("linux" | "initrd"), Some(p)) => Some(p.to_string()),
                _ => None,
            }
        })
        .collect();
    let files = esp_files(img);
    for f in &named {
        assert!(
            files.contains(f),
            "{label}'s entry names {f}, not on the ESP: {files:?}"
        );
    }
    named
}

/// The kernel files on the ESP (in `/btrfs-deploy/`), sorted.
fn esp_kernel_files(img: &Path) -> Vec<String> {
    let mut v: Vec<String> = esp_files(img)
        .into_iter()
        .filter(|f| f.starts_with("/btrfs-deploy/") && !f.ends_with('/'))
        .collect();
    v.sort();
    v
}

/// The files the entries of `labels` name, once each, sorted: what the ESP
/// must hold in `/btrfs-deploy/`, no more.
fn named_by(img: &Path, labels: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = labels.iter().flat_map(|l| entry_files(img, l)).collect();
    v.sort();
    v.dedup();
    v
}

/// `fsck.fat -n` on a copy of the ESP finds nothing to repair.
fn assert_esp_clean(img: &Path) {
    let copy = PathBuf::from(format!("{}.esp", img.display()));
    sh(&format!(
        "dd if={} of={} bs=1M skip=1 count=256 conv=sparse status=none && fsck.fat -n {}",
        img.display(),
        copy.display(),
        copy.display()
    ));
    std::fs::remove_file(copy).unwrap();
}

/// The `versions` rows of `deploy list --json`.
fn list_json(img: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_slice(&run_ok(&["list", img, "--json"]).stdout).unwrap();
    v["versions"].clone()
}

/// A copy of the tiny system whose `etc/issue` names it, printed at boot.
fn tiny_variant(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        root.display()
    ));
    write(
        &root.join("etc/tiny-boot.d/10-report"),
        b"#!/bin/sh\necho \"issue=$(cat /etc/issue)\"\nexit 0\n",
    );
    chmod(&root.join("etc/tiny-boot.d/10-report"), 0o755);
    write(&root.join("etc/issue"), format!("{name}\n").as_bytes());
    root
}

/// One hybrid image of the tiny system boots under SeaBIOS (gptmbr.bin →
/// SYSLINUX on the Btrfs partition) and under OVMF (systemd-boot on the
/// ESP), `/` on systems/factory/run and the state mounts in place.
#[test]
fn hybrid_image_boots_under_seabios_and_ovmf() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("hybrid.img");
    let imgs = img.to_str().unwrap();
    run_ok(&[
        "--boot",
        "hybrid",
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        imgs,
    ]);
    assert_no_leftovers(&img, false);
    // GPT: ESP, then the Btrfs partition flagged legacy-BIOS-bootable.
    let table = sh(&format!("sfdisk -d {imgs}"));
    assert!(
        table.contains("type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        "{table}"
    );
    assert!(table.contains("attrs=\"LegacyBIOSBootable\""), "{table}");
    // The root partition has the Discoverable Partitions Specification's
    // x86-64 root type, and systemd's own reader says so.
    assert!(
        table.contains("type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
        "{table}"
    );
    let dissect: serde_json::Value =
        serde_json::from_str(&sh(&format!("systemd-dissect --json=short {imgs}"))).unwrap();
    let mounts = dissect["mounts"].as_array().unwrap();
    assert!(
        mounts.iter().any(|m| m["designator"] == "root"
            && m["architecture"] == "x86-64"
            && m["fstype"] == "btrfs"),
        "{dissect}"
    );
    assert!(mounts.iter().any(|m| m["designator"] == "esp"), "{dissect}");
    let files = esp_files(&img);
    for f in [
        "/EFI/BOOT/BOOTX64.EFI",
        "/loader/loader.conf",
        "/loader/entries/factory.conf",
    ] {
        assert!(
            files.iter().any(|x| x == f),
            "{f} missing on the ESP: {files:?}"
        );
    }
    assert!(esp_read(&img, "/loader/loader.conf").contains("\ndefault factory.conf\n"));
    // The kernel files, named by their content.
    let named = entry_files(&img, "factory");
    assert_eq!(named.len(), 2, "{named:?}");
    assert!(
        named[0].ends_with(".linux") && named[1].ends_with(".initrd"),
        "{named:?}"
    );
    assert_eq!(esp_kernel_files(&img), named_by(&img, &["factory"]));
    // The entry boots this Btrfs (its UUID, read from the partition) and the version's run.
    let uuid = fs_uuid(&img);
    assert_eq!(uuid.len(), 36, "{uuid}");
    assert!(
        esp_read(&img, "/loader/entries/factory.conf").contains(&format!(
            "options root=UUID={uuid} rootfstype=btrfs rootflags=subvol=systems/factory/run rw"
        ))
    );
    {
        // The layout of design §1 on the Btrfs partition.
        let m = Inspect::open(&img);
        assert_eq!(
            std::fs::read_link(m.path("systems/default")).unwrap(),
            Path::new("factory")
        );
        assert!(m.path("extlinux/ldlinux.c32").exists());
        assert!(m.path("state/home").is_dir());
    }
    assert_esp_clean(&img);
    let rows = list_json(imgs);
    assert_eq!(rows[0]["boot"], "hybrid");
    let text = String::from_utf8_lossy(&run_ok(&["check", imgs]).stdout).into_owned();
    assert!(text.contains("ok      disk: hybrid"), "{text}");
    assert!(text.contains("ok      esp: "), "{text}");
    assert!(text.contains("ok      btrfs check: clean"), "{text}");

    let bios = boot_console_with(&img, None, Some("bios"));
    assert!(bios.contains("SYSLINUX"), "{bios}");
    assert_layout_mounted(&bios, "factory");
    // Without --firmware a hybrid disk boots under UEFI.
    let uefi = boot_console_with(&img, None, None);
    let initrd = named[1].replace('/', "\\");
    assert!(
        uefi.contains(&format!("initrd={initrd}")),
        "not booted by systemd-boot from the ESP ({initrd}):\n{uefi}"
    );
    assert_layout_mounted(&uefi, "factory");
    assert_no_leftovers(&img, false);
}

/// Upgrade, rollback (set-default) and remove on a hybrid disk, each
/// followed by a boot under UEFI; the ESP follows every step.
#[test]
fn upgrade_rollback_remove_each_followed_by_a_uefi_boot() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("life.img");
    let imgs = img.to_str().unwrap();
    let v1 = tiny_variant(tmp.path(), "factory-rootfs");
    run_ok(&["--boot", "hybrid", "--rootfs", v1.to_str().unwrap(), imgs]);
    let v2 = tiny_variant(tmp.path(), "v2-rootfs");
    run_ok(&["--version", "v2", "--rootfs", v2.to_str().unwrap(), imgs]);
    assert!(esp_read(&img, "/loader/loader.conf").contains("\ndefault v2.conf\n"));
    // v2 changed userland only: its entry names factory's kernel files,
    // which the ESP holds once.
    assert_eq!(entry_files(&img, "v2"), entry_files(&img, "factory"));
    assert_eq!(esp_kernel_files(&img).len(), 2);
    let c = boot_console_with(&img, None, Some("uefi"));
    assert_layout_mounted(&c, "v2");
    assert!(c.contains("issue=v2-rootfs"), "{c}");

    run_ok(&["set-default", "factory", imgs]);
    assert!(esp_read(&img, "/loader/loader.conf").contains("\ndefault factory.conf\n"));
    let c = boot_console_with(&img, None, Some("uefi"));
    assert_layout_mounted(&c, "factory");
    assert!(c.contains("issue=factory-rootfs"), "{c}");

    run_ok(&["remove", "v2", imgs]);
    let files = esp_files(&img);
    assert!(
        !files.iter().any(|f| f.contains("v2")),
        "v2's entry stays on the ESP: {files:?}"
    );
    // The shared files stay: factory names them.
    assert_eq!(esp_kernel_files(&img), named_by(&img, &["factory"]));
    assert_esp_clean(&img);
    run_ok(&["check", imgs]);
    let c = boot_console_with(&img, None, Some("uefi"));
    assert_layout_mounted(&c, "factory");
    assert_no_leftovers(&img, false);
}

/// A synthetic rootfs whose kernel is `mib` MiB of the byte `fill`.
fn rootfs_with_kernel(dir: &Path, name: &str, mib: usize, fill: u8) -> PathBuf {
    let root = dir.join(name);
    make_rootfs(&root);
    write(
        &root.join(format!("boot/vmlinuz-{FAKE_KVER}")),
        &vec![fill; mib << 20],
    );
    root
}

/// The ESP's space is checked before anything is written, counting a
/// kernel the ESP holds already (identical in another version) once;
/// removing a version frees the files no other version names; `cleanup`
/// removes ESP files of no version.
#[test]
fn esp_space_is_checked_at_planning_and_freed_by_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("full.img");
    let imgs = img.to_str().unwrap();
    let big = rootfs_with_kernel(tmp.path(), "big", 140, 0x5a);
    run_ok(&["--rootfs", big.to_str().unwrap(), imgs]);
    // The same 140 MiB kernel again is shared: it fits, and the ESP still
    // holds one copy.
    run_ok(&[
        "--version",
        "same",
        "--no-default",
        "--rootfs",
        big.to_str().unwrap(),
        imgs,
    ]);
    assert_eq!(entry_files(&img, "same"), entry_files(&img, "factory"));
    assert_eq!(esp_kernel_files(&img).len(), 2);
    run_ok(&["remove", "same", imgs]);
    assert_eq!(esp_kernel_files(&img), named_by(&img, &["factory"]));
    // A second, different 140 MiB kernel does not fit on the 256 MiB ESP.
    let big2 = rootfs_with_kernel(tmp.path(), "big2", 140, 0x5b);
    let before = fingerprint(&img);
    run_fails(
        &["--version", "v2", "--rootfs", big2.to_str().unwrap(), imgs],
        1,
        &["EFI system partition", "v2 needs", "deploy remove"],
    );
    assert!(
        fingerprint(&img) == before,
        "a refused upgrade changed the disk"
    );
    assert_no_leftovers(&img, false);
    // A small one fits; then the big one is removed, and its space is free again.
    let small = rootfs_with_kernel(tmp.path(), "small", 1, 0x5a);
    run_ok(&["--version", "v2", "--rootfs", small.to_str().unwrap(), imgs]);
    let factory_kernel = entry_files(&img, "factory")[0].clone();
    run_ok(&["remove", "factory", imgs]);
    let files = esp_files(&img);
    assert!(
        !files
            .iter()
            .any(|f| f.contains("factory") || *f == factory_kernel),
        "{files:?}"
    );
    run_ok(&["--version", "v3", "--rootfs", big2.to_str().unwrap(), imgs]);
    assert_eq!(esp_kernel_files(&img), named_by(&img, &["v2", "v3"]));
    assert_esp_clean(&img);

    // Leftovers of an interrupted write, or of a version that is gone.
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mmd -i {imgs}@@{ESP_OFFSET} ::/btrfs-deploy/gone && \
         echo x | MTOOLS_SKIP_CHECK=1 mcopy -i {imgs}@@{ESP_OFFSET} - ::/btrfs-deploy/gone/linux && \
         echo x | MTOOLS_SKIP_CHECK=1 mcopy -i {imgs}@@{ESP_OFFSET} - ::/loader/entries/gone.conf"
    ));
    let out = run(&["check", imgs]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("entry for gone"));
    let out = run_ok(&["cleanup", imgs]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("btrfs-deploy/gone"));
    let files = esp_files(&img);
    assert!(!files.iter().any(|f| f.contains("gone")), "{files:?}");
    run_ok(&["check", imgs]);

    // A power cut between the two switches of a set-default: systems/default
    // (BIOS) names v3, loader.conf (UEFI) still v2. check reports it,
    // cleanup brings loader.conf back in step, in place.
    run_ok(&["set-default", "v2", imgs]);
    let conf_v2 = esp_read(&img, "/loader/loader.conf");
    run_ok(&["set-default", "v3", imgs]);
    let conf = tmp.path().join("loader.conf");
    std::fs::write(&conf, &conf_v2).unwrap();
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -o -i {imgs}@@{ESP_OFFSET} {} ::/loader/loader.conf",
        conf.display()
    ));
    let out = run(&["check", imgs]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("loader.conf makes v2 the UEFI default, systems/default is v3"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    run_ok(&["cleanup", imgs]);
    let fixed = esp_read(&img, "/loader/loader.conf");
    assert!(
        fixed.contains("\ndefault v3.conf\n") && fixed.len() == 512,
        "{fixed}"
    );
    run_ok(&["check", imgs]);

    // --keep removes old versions' ESP files too.
    run_ok(&[
        "--version",
        "v4",
        "--keep",
        "1",
        "--rootfs",
        small.to_str().unwrap(),
        imgs,
    ]);
    let files = esp_files(&img);
    assert!(!files.iter().any(|f| f.contains("/v2.")), "{files:?}");
    assert!(
        files.contains(&"/loader/entries/v3.conf".to_string()),
        "{files:?}"
    );
    // v4 has v2's small kernel: that file stays, with v4's entry naming it.
    assert_eq!(esp_kernel_files(&img), named_by(&img, &["v3", "v4"]));
    assert_esp_clean(&img);
}

#[test]
fn hybrid_errors_name_the_problem_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let r = rootfs.to_str().unwrap();
    let img = tmp.path().join("h.img");
    let imgs = img.to_str().unwrap();
    run_ok(&["--boot", "hybrid", "--rootfs", r, imgs]);
    let before = fingerprint(&img);
    // FAT ignores case: V2 would share v2's files.
    run_ok(&["--version", "v2", "--rootfs", r, imgs]);
    let before_v2 = fingerprint(&img);
    run_fails(
        &["--version", "V2", "--rootfs", r, imgs],
        1,
        &["V2", "only in case", "choose another label"],
    );
    assert!(fingerprint(&img) == before_v2);
    // An existing disk keeps its layout.
    run_fails(
        &["--boot", "bios", "--version", "v3", "--rootfs", r, imgs],
        1,
        &["--boot bios applies to new disks only", "hybrid disk"],
    );
    assert!(fingerprint(&img) == before_v2);
    assert!(before != before_v2);
    // Boot tests that the disk cannot do are refused before QEMU starts.
    let uefi_img = tmp.path().join("u.img");
    let us = uefi_img.to_str().unwrap();
    run_ok(&["--boot", "uefi", "--rootfs", r, us]);
    assert_eq!(list_json(us)[0]["boot"], "uefi");
    // No BIOS boot code, no legacy-BIOS-bootable flag.
    assert!(!sh(&format!("sfdisk -d {us}")).contains("LegacyBIOSBootable"));
    assert!(std::fs::read(&uefi_img).unwrap()[..440]
        .iter()
        .all(|b| *b == 0));
    run_fails(
        &["boot-test", us, "--firmware", "bios"],
        1,
        &["uefi disk", "does not boot under BIOS"],
    );
    // --version under UEFI boots an overlay: the guest's writes cannot
    // reach the disk, so --persist is refused; a version without an entry
    // on the ESP cannot be booted.
    run_fails(
        &["boot-test", us, "--version", "factory", "--persist"],
        2,
        &["--persist with --version under UEFI", "deploy set-default"],
    );
    run_ok(&[
        "--version",
        "nokernel",
        "--no-bootloader",
        "--no-default",
        "--rootfs",
        r,
        us,
    ]);
    let before_us = fingerprint(&uefi_img);
    run_fails(
        &["boot-test", us, "--version", "nokernel"],
        1,
        &["version nokernel has no complete boot entry on the EFI system partition"],
    );
    assert!(fingerprint(&uefi_img) == before_us);
    let bios_img = tmp.path().join("b.img");
    let bs = bios_img.to_str().unwrap();
    run_ok(&["--boot", "bios", "--rootfs", r, bs]);
    assert_eq!(list_json(bs)[0]["boot"], "bios");
    run_fails(
        &["boot-test", bs, "--firmware", "uefi"],
        1,
        &["bios disk", "does not boot under UEFI"],
    );
    // --size must leave room for the ESP.
    let small = tmp.path().join("small.img");
    run_fails(
        &[
            "--boot",
            "hybrid",
            "--size",
            "300M",
            "--rootfs",
            r,
            small.to_str().unwrap(),
        ],
        1,
        &["--size 300 MiB is too small"],
    );
    assert!(!small.exists());
    // A GPT image that is not ours is never taken for a disk of ours.
    let foreign = tmp.path().join("foreign.img");
    let fs_ = foreign.to_str().unwrap();
    sh(&format!(
        "truncate -s 600M {fs_} && echo 'label: gpt\n,100M,U\n,,L' | sfdisk -q {fs_}"
    ));
    let before = fingerprint(&foreign);
    run_fails(
        &["--version", "v2", "--rootfs", r, fs_],
        1,
        &[
            "GPT partition table with 2 partition(s)",
            "not a btrfs-deploy disk",
        ],
    );
    run_fails(
        &["list", fs_],
        1,
        &["GPT partition table", "not a btrfs-deploy disk"],
    );
    run_fails(
        &["check", fs_],
        1,
        &["GPT partition table", "not a btrfs-deploy disk"],
    );
    assert!(fingerprint(&foreign) == before);
    for i in [&img, &uefi_img, &bios_img, &foreign] {
        assert_no_leftovers(i, false);
    }
}

/// On a device the running system may have the ESP mounted at /boot/efi.
/// deploy writes the ESP through the disk, so it refuses to write while a
/// partition over the ESP is mounted, naming it and the mount point, and
/// writes nothing; read-only commands still work; once unmounted, the same
/// command succeeds. (This kernel has no vfat: `fusefat` mounts the
/// partition instead, read-only so that any change would be deploy's, its
/// mount source naming the partition node as the kernel's vfat mount does;
/// partition nodes come from `partx -a`.)
#[test]
fn a_mounted_esp_is_never_written_through_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let r = rootfs.to_str().unwrap();
    let backing = tmp.path().join("backing.img");
    sh(&format!("truncate -s 800M {}", backing.display()));
    let dev = sh(&format!("losetup --find --show -P {}", backing.display()))
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
    run_ok(&["--rootfs", r, &dev]);
    run_ok(&["--version", "v2", "--no-default", "--rootfs", r, &dev]);
    sh(&format!("partx -a {dev}"));
    let efi = tmp.path().join("boot-efi");
    std::fs::create_dir(&efi).unwrap();
    sh(&format!(
        "fusefat -o ro,fsname={dev}p1 {dev}p1 {} >/dev/null",
        efi.display()
    ));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let mounted = Unmount(efi.clone());
    let before = fingerprint(&backing);
    let at = efi.display().to_string();
    let needles = [
        "the EFI system partition of",
        "p1) is mounted at",
        "never through a second path",
        "umount",
    ];
    for args in [
        vec!["--version", "v3", "--rootfs", r, &dev],
        vec!["set-default", "v2", &dev],
        vec!["remove", "v2", &dev],
        vec!["cleanup", &dev],
    ] {
        let err = run_fails(&args, 1, &needles);
        assert!(err.contains(&at), "{err}");
        assert!(fingerprint(&backing) == before, "deploy {args:?} wrote");
    }
    // Reading is fine.
    let out = run_ok(&["list", &dev]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("v2"));
    assert!(fingerprint(&backing) == before);
    drop(mounted);
    // Unmounted, the same command works.
    run_ok(&["set-default", "v2", &dev]);
    run_ok(&["check", &dev]);
    sh(&format!("partx -d {dev} || true"));
}

/// A loop device standing in for a disk: a hybrid layout is written on it
/// when blank; a partition table that is not ours needs --wipe.
#[test]
fn hybrid_on_a_block_device() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let r = rootfs.to_str().unwrap();
    let backing = tmp.path().join("backing.img");
    sh(&format!("truncate -s 800M {}", backing.display()));
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
    // Too small for a hybrid disk (the ESP takes 256 MiB).
    let small_backing = tmp.path().join("small.img");
    sh(&format!("truncate -s 300M {}", small_backing.display()));
    let small = sh(&format!(
        "losetup --find --show {}",
        small_backing.display()
    ))
    .trim()
    .to_string();
    let _ds = Detach(small.clone());
    run_fails(
        &["--boot", "hybrid", "--rootfs", r, &small],
        1,
        &[
            "too small for a hybrid disk",
            "EFI system partition takes 256 MiB",
        ],
    );
    assert_eq!(sh(&format!("blkid -p {small} || true")).trim(), "");
    // Someone else's partition table: refused without --wipe, untouched.
    sh(&format!("echo 'label: gpt\n,100M,L' | sfdisk -q {dev}"));
    let before = fingerprint(&backing);
    run_fails(
        &["--boot", "hybrid", "--rootfs", r, &dev],
        1,
        &["GPT partition table", "--wipe"],
    );
    assert!(fingerprint(&backing) == before);
    run_ok(&["--boot", "hybrid", "--wipe", "--rootfs", r, &dev]);
    assert_eq!(list_json(&dev)[0]["boot"], "hybrid");
    run_ok(&["--version", "v2", "--rootfs", r, &dev]);
    run_ok(&["check", &dev]);
    assert!(esp_read(&backing, "/loader/loader.conf").contains("\ndefault v2.conf\n"));
    // Back to a whole-disk layout with --wipe: no GPT is left to confuse it.
    run_ok(&["--boot", "bios", "--wipe", "--rootfs", r, &dev]);
    assert_eq!(list_json(&dev)[0]["boot"], "bios");
    assert_eq!(
        sh(&format!("blkid -p -o value -s PTTYPE {dev} || true")).trim(),
        ""
    );
}

/// Runs `deploy args` and sends SIGKILL after its `step`-th `==> ` line, or
/// after `delay` when `step` is 0. Returns whether the run finished by itself.
fn run_killed(args: &[&str], step: usize, delay: std::time::Duration) -> bool {
    use std::io::BufRead;
    let mut child = deploy()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    if step == 0 {
        std::thread::sleep(delay);
    } else {
        let mut seen = 0;
        for line in std::io::BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("==> ") {
                seen += 1;
                if seen == step {
                    break;
                }
            }
        }
    }
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = child.wait().unwrap();
    status.success()
}

/// `kill -9` of a hybrid upgrade at every step line and at moments spread
/// over its run: the Btrfs default and the UEFI default (loader.conf) each
/// name a complete version whose entry names files that are all on the
/// ESP; `deploy cleanup` then leaves a disk `deploy check` passes, with
/// loader.conf following systems/default.
#[test]
fn killed_hybrid_upgrades_keep_both_defaults_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("factory.img");
    run_ok(&[
        "--boot",
        "hybrid",
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        template.to_str().unwrap(),
    ]);
    let v2 = tiny_variant(tmp.path(), "v2-rootfs");
    // Reference run: its duration and step lines.
    let img = tmp.path().join("ref.img");
    sh(&format!(
        "cp --sparse=always {} {}",
        template.display(),
        img.display()
    ));
    let started = std::time::Instant::now();
    let out = run_ok(&[
        "--version",
        "v2",
        "--rootfs",
        v2.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let full = started.elapsed();
    let steps = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("==> "))
        .count();
    let mut points: Vec<(usize, std::time::Duration)> = (1..=steps).map(|k| (k, full)).collect();
    points.extend((1..6).map(|i| (0, full.mul_f64(i as f64 / 6.0))));
    let mut killed = 0;
    for (i, (step, delay)) in points.into_iter().enumerate() {
        let img = tmp.path().join(format!("p{i}.img"));
        let imgs = img.to_str().unwrap();
        sh(&format!("cp --sparse=always {} {imgs}", template.display()));
        let finished = run_killed(
            &["--version", "v2", "--rootfs", v2.to_str().unwrap(), imgs],
            step,
            delay,
        );
        if !finished {
            killed += 1;
        }
        let what = format!("point {i} (step {step}, {delay:?})");
        assert_no_leftovers(&img, false);
        // What boots now, before any repair.
        let out = run(&["check", imgs, "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{what}: no check report"));
        let default = {
            let m = Inspect::open(&img);
            std::fs::read_link(m.path("systems/default"))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        assert!(default == "factory" || default == "v2", "{what}: {default}");
        for f in report["findings"].as_array().unwrap() {
            let name = f["name"].as_str().unwrap();
            if name == "default"
                || name == "btrfs check"
                || name.starts_with(&format!("version {default}:"))
            {
                assert_eq!(f["status"], "ok", "{what}: {f}");
            }
        }
        let conf = esp_read(&img, "/loader/loader.conf");
        assert_eq!(conf.len(), 512, "{what}: {conf}");
        let uefi = conf
            .lines()
            .find_map(|l| l.strip_prefix("default "))
            .unwrap()
            .trim_end_matches(".conf")
            .to_string();
        assert!(uefi == "factory" || uefi == "v2", "{what}: {uefi}");
        let entry = esp_read(&img, &format!("/loader/entries/{uefi}.conf"));
        let files = esp_files(&img);
        for line in entry.lines() {
            if let Some(p) = line.strip_prefix("linux ").or(line.strip_prefix("initrd ")) {
                assert!(
                    files.iter().any(|f| f == p),
                    "{what}: {p} missing: {files:?}"
                );
            }
        }
        if finished {
            assert_eq!((default.as_str(), uefi.as_str()), ("v2", "v2"), "{what}");
        }
        // The documented repair.
        run_ok(&["cleanup", imgs]);
        run_ok(&["check", imgs]);
        let conf = esp_read(&img, "/loader/loader.conf");
        assert!(
            conf.contains(&format!("\ndefault {default}.conf\n")),
            "{what}: {conf}"
        );
        assert_esp_clean(&img);
        std::fs::remove_file(&img).unwrap();
    }
    assert!(killed > 0, "no point interrupted a run");
}

/// Disks made before the root partition got the Discoverable Partitions
/// type (the generic Linux filesystem type) open, upgrade and check as
/// before; their type is left as it is.
#[test]
fn disks_with_the_generic_root_partition_type_keep_working() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("old.img");
    let imgs = img.to_str().unwrap();
    let tiny = tiny_rootfs();
    run_ok(&["--rootfs", tiny.to_str().unwrap(), imgs]);
    sh(&format!(
        "sfdisk --quiet --part-type {imgs} 2 0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    ));
    run_ok(&["--version", "v2", "--rootfs", tiny.to_str().unwrap(), imgs]);
    run_ok(&["check", imgs]);
    let list: serde_json::Value =
        serde_json::from_slice(&run_ok(&["list", "--json", imgs]).stdout).unwrap();
    assert_eq!(list["versions"][1]["label"], "v2", "{list}");
    assert_eq!(list["versions"][1]["boot"], "hybrid", "{list}");
    let table = sh(&format!("sfdisk -d {imgs}"));
    assert!(
        table.contains("type=0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        "{table}"
    );
    assert_no_leftovers(&img, false);
}
