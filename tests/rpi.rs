//! Issue 22: Raspberry Pi boot files (`--boot rpi`) on real images: the
//! arm64 tiny system with Debian's raspi-firmware and u-boot-rpi unpacked
//! into it (`make fixture`: scripts/fetch-rpi-firmware.sh), the boot
//! partition read back with mtools and compared with what the Pi firmware
//! reads; default switch and remove on it; refusals.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Offset of the boot partition (partition 1 at 1 MiB).
const PART_OFFSET: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tiny_arm64() -> PathBuf {
    let p = std::env::var_os("DEPLOY_TINY_ARM64_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tiny-arm64/rootfs"));
    assert!(
        p.join("sbin/init").exists(),
        "arm64 tiny system missing at {}: run `make fixture`",
        p.display()
    );
    p
}

/// raspi-firmware and u-boot-rpi, unpacked.
fn pi_packages() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/rpi/root");
    assert!(
        p.join("usr/lib/raspi-firmware/start4.elf").is_file(),
        "Raspberry Pi firmware missing at {}: run `make fixture` (scripts/fetch-rpi-firmware.sh .cache)",
        p.display()
    );
    p
}

/// The kernel version of the arm64 tiny tree.
fn kernel_version(tree: &Path) -> String {
    std::fs::read_dir(tree.join("usr/lib"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .strip_prefix("linux-image-")
                .map(str::to_string)
        })
        .next()
        .expect("a usr/lib/linux-image-<version> in the tiny arm64 tree")
}

/// The Pi device trees of Debian's arm64 kernel.
fn pi_dtbs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/rpi/dtbs")
}

/// The device trees put in the test tree.
const PI_DTBS: [&str; 2] = ["bcm2711-rpi-4-b.dtb", "bcm2837-rpi-3-b.dtb"];

/// The arm64 tiny tree with the Pi packages in it, and the Pi 3 and 4
/// device trees where Debian's arm64 kernel ships them (the tiny tree's
/// cloud kernel has none).
fn pi_tree(dir: &Path) -> PathBuf {
    let tree = dir.join("pi-root");
    std::fs::create_dir(&tree).unwrap();
    copy_tree(&tiny_arm64(), &tree);
    copy_tree(&pi_packages(), &tree);
    let dtbs = tree.join(format!(
        "usr/lib/linux-image-{}/broadcom",
        kernel_version(&tree)
    ));
    std::fs::create_dir_all(&dtbs).unwrap();
    for d in PI_DTBS {
        std::fs::copy(pi_dtbs().join(d), dtbs.join(d)).unwrap();
    }
    tree
}

/// A file of the boot partition (None when missing).
fn fat_file(img: &Path, path: &str) -> Option<Vec<u8>> {
    let out = std::process::Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{PART_OFFSET}", img.display()))
        .arg(format!("::{path}"))
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

/// Every file of the boot partition.
fn fat_listing(img: &Path) -> String {
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mdir -/ -b -i {}@@{PART_OFFSET} ::",
        img.display()
    ))
}

/// What the firmware reads must be there, as in the tree.
fn assert_firmware(img: &Path, tree: &Path) {
    let fw = tree.join("usr/lib/raspi-firmware");
    for f in [
        "bootcode.bin",
        "start4.elf",
        "fixup4.dat",
        "start.elf",
        "fixup.dat",
    ] {
        assert_eq!(
            fat_file(img, f).unwrap_or_else(|| panic!("{f} missing:\n{}", fat_listing(img))),
            std::fs::read(fw.join(f)).unwrap(),
            "{f} differs from the tree's"
        );
    }
    assert_eq!(
        fat_file(img, "u-boot.bin").unwrap(),
        std::fs::read(tree.join("usr/lib/u-boot/rpi_arm64/u-boot.bin")).unwrap()
    );
    for d in PI_DTBS {
        assert_eq!(
            fat_file(img, d).unwrap_or_else(|| panic!("{d} missing")),
            std::fs::read(pi_dtbs().join(d)).unwrap()
        );
    }
    let config = String::from_utf8(fat_file(img, "config.txt").unwrap()).unwrap();
    for line in ["arm_64bit=1", "kernel=u-boot.bin", "enable_uart=1"] {
        assert!(
            config.lines().any(|l| l == line),
            "config.txt lacks {line}:\n{config}"
        );
    }
}

/// The default of U-Boot's menu, and that every file the menu names for
/// it is on the partition with the tree's bytes.
fn menu_default(img: &Path, tree: &Path) -> String {
    let conf = String::from_utf8(fat_file(img, "boot/extlinux/extlinux.conf").unwrap()).unwrap();
    let default = conf
        .lines()
        .find_map(|l| l.strip_prefix("default "))
        .unwrap_or_else(|| panic!("no default in:\n{conf}"))
        .trim()
        .to_string();
    let menu_name = conf
        .lines()
        .find_map(|l| l.trim_end_matches('\0').strip_prefix("include "))
        .unwrap_or_else(|| panic!("no include in:\n{conf}"))
        .trim()
        .to_string();
    let menu =
        String::from_utf8(fat_file(img, menu_name.trim_start_matches('/')).unwrap()).unwrap();
    let entry: Vec<&str> = menu
        .lines()
        .skip_while(|l| l.trim() != format!("label {default}"))
        .skip(1)
        .take_while(|l| !l.starts_with("label "))
        .collect();
    assert!(!entry.is_empty(), "no entry {default} in:\n{menu}");
    let file = |key: &str| {
        entry
            .iter()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in entry {default}:\n{menu}"))
            .trim()
            .trim_start_matches('/')
            .to_string()
    };
    let ver = kernel_version(tree);
    assert_eq!(
        fat_file(img, &file("kernel ")).unwrap(),
        std::fs::read(tree.join(format!("boot/vmlinuz-{ver}"))).unwrap(),
        "the kernel of {default}"
    );
    assert_eq!(
        fat_file(img, &file("initrd ")).unwrap(),
        std::fs::read(tree.join(format!("boot/initrd.img-{ver}"))).unwrap(),
        "the initramfs of {default}"
    );
    let append = file("append ");
    assert!(
        append.contains(&format!("rootflags=subvol=systems/{default}/run")),
        "{append}"
    );
    default
}

#[test]
fn rpi_disks_carry_the_pi_firmware_and_switch_and_remove_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tree = pi_tree(dir);
    let img = dir.join("pi.img");
    let out = run_ok(&["--boot", "rpi", "--rootfs", s(&tree), s(&img)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Writing the Raspberry Pi firmware"),
        "{stderr}"
    );
    assert_firmware(&img, &tree);
    assert_eq!(menu_default(&img, &tree), "factory");
    // A hybrid MBR: the FAT in entry 1 (type 0x0C, active) for the Pi 3's
    // boot ROM, the GPT's 0xEE entry after it.
    let mbr = std::fs::read(&img).unwrap()[..512].to_vec();
    assert_eq!((mbr[446], mbr[450]), (0x80, 0x0C), "MBR entry 1");
    assert_eq!(
        u32::from_le_bytes(mbr[454..458].try_into().unwrap()) as u64 * 512,
        PART_OFFSET
    );
    assert_eq!(
        (
            mbr[466],
            u32::from_le_bytes(mbr[470..474].try_into().unwrap())
        ),
        (0xEE, 1)
    );
    let dump = sh(&format!("sfdisk --dump {}", img.display()));
    assert!(dump.contains("label: gpt"), "{dump}");
    run_ok(&["check", s(&img)]);

    // Upgrades keep the firmware; the menu switches and removes versions.
    let before = fat_file(&img, "start4.elf").unwrap();
    let r2 = dir.join("r2");
    std::fs::create_dir(&r2).unwrap();
    copy_tree(&tree, &r2);
    write(&r2.join("etc/issue"), b"v2\n");
    run_ok(&["--version", "v2", "--rootfs", s(&r2), s(&img)]);
    assert_eq!(menu_default(&img, &tree), "v2");
    assert_eq!(fat_file(&img, "start4.elf").unwrap(), before);
    assert_firmware(&img, &tree);
    run_ok(&["set-default", "factory", s(&img)]);
    assert_eq!(menu_default(&img, &tree), "factory");
    run_ok(&["remove", "v2", s(&img)]);
    assert_eq!(menu_default(&img, &tree), "factory");
    assert_firmware(&img, &tree);
    run_ok(&["check", s(&img)]);
    let out = run_ok(&["check", s(&img)]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(Raspberry Pi firmware, config.txt)"),
        "{out:?}"
    );
    // check names a boot partition the Pi could not boot from.
    let broken = dir.join("broken.img");
    sh(&format!(
        "cp --sparse=always {} {b} && MTOOLS_SKIP_CHECK=1 mdel -i {b}@@{PART_OFFSET} ::u-boot.bin",
        img.display(),
        b = broken.display()
    ));
    let out = run(&["check", s(&broken)]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "check's status for problems: {out:?}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("config.txt says kernel=u-boot.bin, which is not on the boot partition"),
        "{text}"
    );
    // --boot rpi is for new disks.
    run_fails(
        &[
            "--boot",
            "rpi",
            "--version",
            "v3",
            "--rootfs",
            s(&r2),
            s(&img),
        ],
        1,
        &["--boot rpi applies to new disks only"],
    );
}

#[test]
fn rpi_refuses_trees_without_what_a_pi_needs_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tree = pi_tree(dir);
    let img = dir.join("x.img");
    let gone = |img: &Path| {
        assert!(!img.exists(), "{} was left", img.display());
        assert!(!PathBuf::from(format!("{}.partial", img.display())).exists());
    };
    // No firmware.
    let bare = dir.join("bare");
    std::fs::create_dir(&bare).unwrap();
    copy_tree(&tiny_arm64(), &bare);
    run_fails(
        &["--boot", "rpi", "--rootfs", s(&bare), s(&img)],
        1,
        &["raspi-firmware", "/usr/lib/raspi-firmware/start*.elf"],
    );
    gone(&img);
    // Firmware, no U-Boot.
    sh(&format!(
        "cp -a {}/usr/lib/raspi-firmware {}/usr/lib/",
        tree.display(),
        bare.display()
    ));
    let dtbs = bare.join(format!(
        "usr/lib/linux-image-{}/broadcom",
        kernel_version(&bare)
    ));
    std::fs::create_dir_all(&dtbs).unwrap();
    write(&dtbs.join("bcm2711-rpi-4-b.dtb"), b"x");
    run_fails(
        &["--boot", "rpi", "--rootfs", s(&bare), s(&img)],
        1,
        &["u-boot-rpi"],
    );
    gone(&img);
    // Not arm64.
    run_fails(
        &["--boot", "rpi", "--rootfs", s(&tiny_rootfs()), s(&img)],
        1,
        &["--boot rpi is for arm64 trees", "amd64"],
    );
    gone(&img);
    run_fails(
        &[
            "--boot",
            "rpi",
            "--no-bootloader",
            "--rootfs",
            s(&tree),
            s(&img),
        ],
        2,
        &["--no-bootloader"],
    );
    gone(&img);
    // No room on the boot partition: a firmware file larger than it.
    let big = tree.join("usr/lib/raspi-firmware/start4x.elf");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    run_fails(
        &["--boot", "rpi", "--rootfs", s(&tree), s(&img)],
        1,
        &["do not fit on the", "boot partition"],
    );
    gone(&img);
    assert_no_leftovers(&img, false);
}

/// Boots `img` as the SD card of an emulated Raspberry Pi 3
/// (`qemu-system-aarch64 -M raspi3b`, TCG): QEMU loads `u-boot.bin` from
/// the boot partition where the Pi firmware would (no Pi firmware runs in
/// QEMU) with the Pi 3 device tree the firmware would pass. Returns U-Boot's
/// console (the mini UART) up to "Starting kernel", where it stops: the
/// tiny tree's cloud kernel has no Pi drivers.
fn boot_pi3(img: &Path, dir: &Path) -> String {
    use std::io::BufRead;
    let uboot = dir.join("u-boot.bin");
    std::fs::write(&uboot, fat_file(img, "u-boot.bin").unwrap()).unwrap();
    let mut child = std::process::Command::new("qemu-system-aarch64")
        .args([
            "-M", "raspi3b", "-accel", "tcg", "-display", "none", "-monitor", "none",
        ])
        .arg("-kernel")
        .arg(&uboot)
        .arg("-dtb")
        .arg(pi_dtbs().join("bcm2837-rpi-3-b.dtb"))
        .arg("-drive")
        .arg(format!("file={},if=sd,format=raw", img.display()))
        .args(["-serial", "null", "-serial", "stdio"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting qemu-system-aarch64 (qemu-system-arm)");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let done = line.contains("Starting kernel") || line.contains("EXTLINUX FAILED");
            if tx.send(line).is_err() || done {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let mut console = String::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                console.push_str(&line);
                console.push('\n');
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    console
}

#[test]
fn u_boot_on_an_emulated_pi3_boots_the_default_and_a_trial_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tree = pi_tree(dir);
    let img = dir.join("pi.img");
    // QEMU's SD card must be a power of two in size.
    run_ok(&[
        "--boot",
        "rpi",
        "--size",
        "1G",
        "--rootfs",
        s(&tree),
        s(&img),
    ]);
    let console = boot_pi3(&img, dir);
    for want in [
        "Found U-Boot script /boot.scr",
        "Retrieving file: /boot/extlinux/extlinux.conf",
        "factory.dtbs/broadcom/bcm2837-rpi-3-b.dtb",
        "rootflags=subvol=systems/factory/run",
        "Starting kernel",
    ] {
        assert!(
            console.contains(want),
            "no {want:?} on the Pi 3's console:\n{console}"
        );
    }
    // A trial: the next boot is v2's, once; the one after is factory's again.
    let r2 = dir.join("r2");
    std::fs::create_dir(&r2).unwrap();
    copy_tree(&tree, &r2);
    write(&r2.join("etc/issue"), b"v2\n");
    run_ok(&["--version", "v2", "--trial", "--rootfs", s(&r2), s(&img)]);
    let console = boot_pi3(&img, dir);
    assert!(
        console.contains("rootflags=subvol=systems/v2/run") && console.contains("Starting kernel"),
        "the trial boot did not start v2:\n{console}"
    );
    let console = boot_pi3(&img, dir);
    assert!(
        console.contains("rootflags=subvol=systems/factory/run")
            && !console.contains("systems/v2/run")
            && console.contains("Starting kernel"),
        "the boot after the trial did not fall back to factory:\n{console}"
    );
}

/// A Raspberry-Pi-OS-like SD-card image: MBR with disk id 0x1234abcd, a
/// FAT boot partition with the firmware and device trees, an ext4 root
/// (the arm64 tiny tree with U-Boot) whose fstab names both by PARTUUID.
fn raspios_image(dir: &Path) -> PathBuf {
    let root = dir.join("os-root");
    std::fs::create_dir(&root).unwrap();
    copy_tree(&tiny_arm64(), &root);
    let uboot = pi_packages().join("usr/lib/u-boot");
    sh(&format!(
        "mkdir -p {r}/usr/lib && cp -a {} {r}/usr/lib/ && mkdir -p {r}/boot/firmware",
        uboot.display(),
        r = root.display()
    ));
    write(&root.join("etc/raspios-marker"), b"from the sd card\n");
    write(
        &root.join("etc/fstab"),
        b"proc /proc proc defaults 0 0\n\
          PARTUUID=1234abcd-01 /boot/firmware vfat defaults 0 2\n\
          PARTUUID=1234abcd-02 / ext4 defaults,noatime 0 1\n",
    );
    let fw = dir.join("os-fw");
    std::fs::create_dir(&fw).unwrap();
    copy_tree(&pi_packages().join("usr/lib/raspi-firmware"), &fw);
    for d in PI_DTBS {
        std::fs::copy(pi_dtbs().join(d), fw.join(d)).unwrap();
    }
    write(
        &fw.join("cmdline.txt"),
        b"console=serial0,115200 root=PARTUUID=1234abcd-02\n",
    );
    let img = dir.join("raspios.img");
    sh(&format!(
        "set -e; cd {d}
         mkfs.vfat -C fat.img 65536 >/dev/null
         MTOOLS_SKIP_CHECK=1 mcopy -s -i fat.img {fw}/* ::
         mkfs.ext4 -q -F -d {root} -L rootfs root.ext4 200M
         truncate -s 300M {img}
         printf 'label: dos\\nlabel-id: 0x1234abcd\\nstart=8192, size=131072, type=c\\nstart=139264, type=83\\n' | sfdisk -q {img}
         dd if=fat.img of={img} bs=512 seek=8192 conv=notrunc,sparse status=none
         dd if=root.ext4 of={img} bs=512 seek=139264 conv=notrunc,sparse status=none
         rm fat.img root.ext4",
        d = dir.display(),
        fw = fw.display(),
        root = root.display(),
        img = img.display()
    ));
    img
}

#[test]
fn a_raspios_sd_card_image_is_a_rootfs_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sd = raspios_image(dir);
    let before = fingerprint(&sd);
    let img = dir.join("pi.img");
    run_ok(&["--boot", "rpi", "--rootfs", s(&sd), s(&img)]);
    assert_eq!(fingerprint(&sd), before, "the SD-card image was written");
    assert_no_leftovers(&sd, false);
    // The FAT's firmware is on the new boot partition, with our config.txt.
    assert_eq!(
        fat_file(&img, "start4.elf").unwrap(),
        std::fs::read(pi_packages().join("usr/lib/raspi-firmware/start4.elf")).unwrap()
    );
    assert_eq!(
        fat_file(&img, "bcm2711-rpi-4-b.dtb").unwrap(),
        std::fs::read(pi_dtbs().join("bcm2711-rpi-4-b.dtb")).unwrap()
    );
    let config = String::from_utf8(fat_file(&img, "config.txt").unwrap()).unwrap();
    assert!(config.contains("kernel=u-boot.bin"), "{config}");
    let m = Inspect::open(&img);
    let tree = m.path("systems/factory/orig");
    assert_eq!(
        std::fs::read(tree.join("etc/raspios-marker")).unwrap(),
        b"from the sd card\n"
    );
    assert!(tree.join("boot/firmware/cmdline.txt").is_file());
    assert!(tree.join("boot/firmware/start4.elf").is_file());
    let fstab = std::fs::read_to_string(tree.join("etc/fstab")).unwrap();
    assert!(
        fstab.contains("# PARTUUID=1234abcd-02 / ext4")
            && fstab.contains("# PARTUUID=1234abcd-01 /boot/firmware"),
        "{fstab}"
    );
    assert!(fstab.contains("proc /proc proc defaults 0 0"), "{fstab}");
    let record = std::fs::read_to_string(m.path("systems/factory/deployment.json")).unwrap();
    assert!(
        record.contains(&format!("\"rootfs\": \"{}\"", sd.display())),
        "{record}"
    );
    drop(m);
    run_ok(&["check", s(&img)]);

    // A root partition with no filesystem: refused, nothing left.
    let bad = dir.join("bad.img");
    sh(&format!(
        "cp --sparse=always {} {b} && dd if=/dev/zero of={b} bs=512 seek=139264 count=4096 conv=notrunc status=none",
        sd.display(),
        b = bad.display()
    ));
    let out = dir.join("x.img");
    run_fails(
        &["--boot", "rpi", "--rootfs", s(&bad), s(&out)],
        1,
        &["root partition of", "no filesystem"],
    );
    assert!(!out.exists());
    assert_no_leftovers(&bad, false);
}
