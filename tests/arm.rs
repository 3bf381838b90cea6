//! Issue 16: arm64 systems deployed from this amd64 host, booted by U-Boot
//! (`--boot uboot`, the default for an arm64 rootfs), customised in the tree
//! through qemu-user. Real images, loop devices, QEMU (`qemu-system-aarch64
//! -M virt` with Debian's U-Boot, TCG) and qemu-user; the FAT boot partition
//! is read back with mtools and checked with fsck.fat, independently of the
//! code under test.
//!
//! The arm64 tiny system is `scripts/build-tiny-system.sh .cache arm64`
//! (`make fixture`), found through `DEPLOY_TINY_ARM64_ROOTFS`.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Offset of the boot partition on the disks `deploy` writes (partition 1 at 1 MiB).
const PART_OFFSET: u64 = 1 << 20;

/// The arm64 tiny system.
fn tiny_arm64() -> PathBuf {
    let p = std::env::var_os("DEPLOY_TINY_ARM64_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tiny-arm64/rootfs"));
    assert!(
        p.join("sbin/init").exists(),
        "arm64 tiny system missing at {}: run `make fixture` (scripts/build-tiny-system.sh .cache arm64)",
        p.display()
    );
    p
}

/// The arm64 build of this checkout (`make build-arm64`, issue 22).
fn deploy_arm64() -> PathBuf {
    let p = std::env::var_os("DEPLOY_ARM64_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/aarch64-unknown-linux-gnu/release/deploy")
        });
    assert!(
        p.is_file(),
        "arm64 build missing at {}: run `make build-arm64`",
        p.display()
    );
    p
}

/// A copy of the arm64 tiny system whose boot reports its name.
fn arm64_variant(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    sh(&format!(
        "cp -a {} {}",
        tiny_arm64().display(),
        root.display()
    ));
    write(
        &root.join("etc/tiny-boot.d/10-report"),
        b"#!/bin/sh\necho \"issue=$(cat /etc/issue)\"\n[ -f /etc/arch-probe ] && echo \"probe=$(cat /etc/arch-probe)\"\nexit 0\n",
    );
    chmod(&root.join("etc/tiny-boot.d/10-report"), 0o755);
    write(&root.join("etc/issue"), format!("{name}\n").as_bytes());
    root
}

/// A configure extension that records `uname -m` as seen inside the tree.
fn probe_extension(dir: &Path) -> PathBuf {
    let ext = dir.join("ext");
    std::fs::create_dir_all(&ext).unwrap();
    write(
        &ext.join("arch-probe.configure"),
        b"#!/bin/sh\n# summary: records uname -m as seen inside the tree\nset -e\n\
          m=$(\"$DEPLOY_RUN_IN_TREE\" run-in-tree \"$1\" -- uname -m)\n\
          echo \"arch-probe: uname -m in the tree: $m, DEPLOY_ARCH=$DEPLOY_ARCH\" >&2\n\
          [ \"$DEPLOY_ARCH\" = arm64 ] || { echo \"DEPLOY_ARCH is '$DEPLOY_ARCH'\" >&2; exit 1; }\n\
          echo \"$m\" > \"$1/etc/arch-probe\"\n",
    );
    chmod(&ext.join("arch-probe.configure"), 0o755);
    ext
}

/// A file of the boot partition of `img`.
fn part_read(img: &Path, path: &str) -> String {
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mtype -i {}@@{PART_OFFSET} ::{path}",
        img.display()
    ))
}

/// Every path on the boot partition of `img`.
fn part_files(img: &Path) -> Vec<String> {
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mdir -/ -b -i {}@@{PART_OFFSET} ::",
        img.display()
    ))
    .lines()
    .map(|l| l.trim().trim_start_matches("::").to_string())
    .collect()
}

/// `fsck.fat -n` on a copy of the boot partition finds nothing to repair.
fn assert_part_clean(img: &Path) {
    let copy = PathBuf::from(format!("{}.boot", img.display()));
    sh(&format!(
        "dd if={} of={} bs=1M skip=1 count=256 conv=sparse status=none && fsck.fat -n {}",
        img.display(),
        copy.display(),
        copy.display()
    ));
    std::fs::remove_file(copy).unwrap();
}

/// Boots `img` under U-Boot and returns the console.
fn boot(img: &Path) -> String {
    let console = boot_console(img, None);
    assert!(console.contains("U-Boot 20"), "not U-Boot:\n{console}");
    // The menu is at /boot/extlinux/extlinux.conf, booted through /boot.scr
    // (the trial script), which finds no trial mark.
    assert!(
        console.contains("Found U-Boot script /boot.scr"),
        "{console}"
    );
    assert!(!console.contains("trial boot"), "{console}");
    console
}

/// The `TINY-HOOK: <key>=<value>` value of `key`.
fn hook(console: &str, key: &str) -> Option<String> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TINY-HOOK: "))
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
}

/// The whole workflow from this amd64 host: an arm64 system deployed
/// (U-Boot by default, an extension running `uname -m` inside the tree
/// through qemu-user), booted; an upgrade booted; a rollback booted.
#[test]
fn arm64_system_deploys_boots_upgrades_and_rolls_back_under_uboot() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("arm.img");
    let imgs = img.to_str().unwrap();
    let factory = arm64_variant(tmp.path(), "factory");
    let ext = probe_extension(tmp.path());
    let out = run_ok(&[
        "--extensions-dir",
        ext.to_str().unwrap(),
        "-e",
        "arch-probe",
        "--rootfs",
        factory.to_str().unwrap(),
        imgs,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("uname -m in the tree: aarch64"), "{stderr}");
    assert!(stderr.contains("uboot disk"), "{stderr}");

    // No --boot: uboot, recorded as arm64.
    let list: serde_json::Value =
        serde_json::from_slice(&run_ok(&["list", imgs, "--json"]).stdout).unwrap();
    let row = &list["versions"][0];
    assert_eq!(row["boot"], "uboot", "{list}");
    assert_eq!(row["arch"], "arm64", "{list}");
    let status = String::from_utf8_lossy(&run_ok(&["status", imgs]).stdout).into_owned();
    assert!(status.contains("factory (arm64)"), "{status}");
    let parts = sh(&format!("sfdisk -d {imgs}"));
    assert!(
        parts.contains("type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")
            && parts.contains("attrs=\"LegacyBIOSBootable\""),
        "{parts}"
    );
    // The Btrfs partition: the Discoverable Partitions arm64 root type.
    assert!(
        parts.contains("type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
        "{parts}"
    );
    // The menu U-Boot reads: one sector naming the default and the menu file.
    let conf = part_read(&img, "/boot/extlinux/extlinux.conf");
    assert_eq!(conf.len(), 511, "{conf}");
    assert!(conf.contains("\ndefault factory\n"), "{conf}");
    let files = part_files(&img);
    assert!(
        files
            .iter()
            .any(|p| p == "/btrfs-deploy/factory.dtbs/arm/fvp-base-revc.dtb"),
        "device trees missing: {files:?}"
    );
    let menu = files
        .iter()
        .find(|f| f.starts_with("/btrfs-deploy/menu-"))
        .expect("a menu file");
    let menu_text = part_read(&img, menu);
    assert!(
        menu_text.contains("  fdtdir /btrfs-deploy/factory.dtbs\n"),
        "{menu_text}"
    );
    // Kernel and initramfs are named by their content (shared by versions
    // whose kernel did not change), and are on the partition.
    let named: Vec<String> = menu_text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("kernel ")
                .or_else(|| l.strip_prefix("initrd "))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(named.len(), 2, "{menu_text}");
    for f in &named {
        let stem = f
            .trim_start_matches("/btrfs-deploy/")
            .split('.')
            .next()
            .unwrap();
        assert!(
            stem.len() == 16 && stem.bytes().all(|b| b.is_ascii_hexdigit()),
            "{f} is not named by its content"
        );
        assert!(files.contains(f), "{f} missing: {files:?}");
    }
    let kernel_files = |files: &[String]| -> usize {
        files
            .iter()
            .filter(|f| f.ends_with(".linux") || f.ends_with(".initrd"))
            .count()
    };
    assert_part_clean(&img);

    let console = boot(&img);
    assert_layout_mounted(&console, "factory");
    assert_eq!(hook(&console, "issue").as_deref(), Some("factory"));
    assert_eq!(hook(&console, "probe").as_deref(), Some("aarch64"));

    // Upgrade: v2 boots; its kernel and initramfs are factory's, not copied again.
    let v2 = arm64_variant(tmp.path(), "v2");
    run_ok(&["--version", "v2", "--rootfs", v2.to_str().unwrap(), imgs]);
    assert_eq!(kernel_files(&part_files(&img)), 2);
    assert!(part_read(&img, "/boot/extlinux/extlinux.conf").contains("\ndefault v2\n"));
    let console = boot(&img);
    assert_layout_mounted(&console, "v2");
    assert_eq!(hook(&console, "issue").as_deref(), Some("v2"));

    // Rollback: factory boots again.
    run_ok(&["set-default", "factory", imgs]);
    assert!(part_read(&img, "/boot/extlinux/extlinux.conf").contains("\ndefault factory\n"));
    let console = boot(&img);
    assert_layout_mounted(&console, "factory");
    assert_eq!(hook(&console, "issue").as_deref(), Some("factory"));

    // Removing v2 frees its files; the disk checks clean.
    run_ok(&["remove", "v2", imgs]);
    let files = part_files(&img);
    assert!(
        !files.iter().any(|f| f.contains("/v2.")),
        "v2's files remain: {files:?}"
    );
    // The shared kernel files stay: factory names them.
    assert_eq!(kernel_files(&files), 2, "{files:?}");
    for f in &named {
        assert!(files.contains(f), "{f} missing: {files:?}");
    }
    assert_eq!(
        files
            .iter()
            .filter(|f| f.starts_with("/btrfs-deploy/menu-"))
            .count(),
        1,
        "{files:?}"
    );
    assert_part_clean(&img);
    let check = String::from_utf8_lossy(&run_ok(&["check", imgs]).stdout).into_owned();
    assert!(
        check.contains("U-Boot boot partition: 1 entry, default factory"),
        "{check}"
    );
    // The BIOS/UEFI firmwares cannot boot it: said before QEMU starts.
    run_fails(
        &["boot-test", imgs, "--firmware", "bios"],
        1,
        &["uboot disk", "--firmware uboot"],
    );
    assert_no_leftovers(&img, false);
}

/// The errors, each before anything is written: a kernel of another
/// architecture, no qemu-user for a foreign tree's extensions, no room for
/// the boot partition (image and block device), a bad --arch.
#[test]
fn arm64_errors_are_caught_at_planning() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("x.img");
    let imgs = img.to_str().unwrap();
    let arm = tiny_arm64();
    let arms = arm.to_str().unwrap();

    // An amd64 kernel for the arm64 rootfs.
    let amd64_kernel = std::fs::read_dir(tiny_rootfs().join("boot"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .unwrap();
    run_fails(
        &[
            "--kernel",
            amd64_kernel.to_str().unwrap(),
            "--rootfs",
            arms,
            imgs,
        ],
        1,
        &["built for amd64", "is arm64", "--kernel"],
    );
    assert!(!img.exists());
    // The amd64 rootfs said to be arm64: its own kernel does not match.
    run_fails(
        &[
            "--arch",
            "arm64",
            "--rootfs",
            tiny_rootfs().to_str().unwrap(),
            imgs,
        ],
        1,
        &["built for amd64", "is arm64"],
    );
    assert!(!img.exists());
    // on-device with no arm64 build to carry (ON_DEVICE_DEPLOY names none).
    run_fails(
        &[
            "-e",
            "on-device",
            "--set",
            "ON_DEVICE_DEPLOY=/nonexistent/deploy",
            "--rootfs",
            arms,
            imgs,
        ],
        1,
        &[
            "on-device",
            "ON_DEVICE_DEPLOY=/nonexistent/deploy: no such file",
        ],
    );
    assert!(!img.exists());
    // ... or one of another architecture (this amd64 deploy).
    run_fails(
        &[
            "-e",
            "on-device",
            "--set",
            &format!("ON_DEVICE_DEPLOY={}", env!("CARGO_BIN_EXE_deploy")),
            "--rootfs",
            arms,
            imgs,
        ],
        1,
        &["is not a deploy built for arm64", "amd64"],
    );
    assert!(!img.exists());
    // The same said in deploy.toml (`arch`).
    let cfg = tmp.path().join("deploy.toml");
    write(&cfg, b"arch = \"arm64\"\n");
    run_fails(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--rootfs",
            tiny_rootfs().to_str().unwrap(),
            imgs,
        ],
        1,
        &["built for amd64", "is arm64"],
    );
    assert!(!img.exists());
    run_fails(
        &["--arch", "sparc", "--rootfs", arms, imgs],
        2,
        &["invalid --arch sparc", "arm64"],
    );
    assert!(!img.exists());
    // --dtb names one of the rootfs's device trees (or a host file).
    run_fails(
        &["--dtb", "arm/nope.dtb", "--rootfs", arms, imgs],
        1,
        &["--dtb arm/nope.dtb", "/usr/lib/linux-image-"],
    );
    assert!(!img.exists());
    run_ok(&["--dtb", "arm/juno.dtb", "--rootfs", arms, imgs]);
    let files = part_files(&img);
    let menu = files
        .iter()
        .find(|f| f.starts_with("/btrfs-deploy/menu-"))
        .expect("a menu file");
    let menu_text = part_read(&img, menu);
    let fdt = menu_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("fdt "))
        .unwrap_or_else(|| panic!("no fdt line: {menu_text}"))
        .to_string();
    assert!(
        fdt.starts_with("/btrfs-deploy/") && fdt.ends_with(".dtb") && !menu_text.contains("fdtdir"),
        "{menu_text}"
    );
    // The file on the boot partition is the rootfs's juno.dtb (cmp fails the shell otherwise).
    let copy = tmp.path().join("factory.dtb");
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -i {imgs}@@{PART_OFFSET} ::{fdt} {} && \
         cmp {} {arms}/usr/lib/linux-image-*/arm/juno.dtb",
        copy.display(),
        copy.display()
    ));
    std::fs::remove_file(&img).unwrap();

    // No qemu-user (simulated: binfmt_misc and the definitions point at
    // empty directories): refused, naming the packages.
    let ext = probe_extension(tmp.path());
    let empty_misc = tmp.path().join("binfmt_misc");
    let empty_confs = tmp.path().join("binfmt.d");
    std::fs::create_dir_all(&empty_misc).unwrap();
    std::fs::create_dir_all(&empty_confs).unwrap();
    let out = deploy()
        .env("DEPLOY_BINFMT_MISC", &empty_misc)
        .env("DEPLOY_BINFMT_CONF_DIR", &empty_confs)
        .args([
            "--extensions-dir",
            ext.to_str().unwrap(),
            "-e",
            "arch-probe",
            "--rootfs",
            arms,
            imgs,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("qemu-user-static") && stderr.contains("binfmt-support"),
        "{stderr}"
    );
    assert!(!img.exists());
    let out = deploy()
        .env("DEPLOY_BINFMT_MISC", &empty_misc)
        .env("DEPLOY_BINFMT_CONF_DIR", &empty_confs)
        .args(["run-in-tree", arms, "--", "uname", "-m"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("qemu-user-static"), "{stderr}");

    // No room for the boot partition: an image too small, a device too small.
    run_fails(
        &["--boot", "uboot", "--size", "400M", "--rootfs", arms, imgs],
        1,
        &[
            "--size 400 MiB is too small",
            "boot partition of a uboot disk",
        ],
    );
    assert!(!img.exists());
    let dev_file = tmp.path().join("dev.img");
    std::fs::File::create(&dev_file)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let dev = sh(&format!("losetup --find --show {}", dev_file.display()))
        .trim()
        .to_string();
    let before = sh(&format!("sha256sum < {dev}"));
    let out = run(&["--rootfs", arms, &dev]);
    let after = sh(&format!("sha256sum < {dev}"));
    sh(&format!("losetup -d {dev}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("too small for a uboot disk")
            && stderr.contains("U-Boot boot partition takes 256 MiB"),
        "{stderr}"
    );
    assert_eq!(before, after, "the device was written to");
}

/// `text` as a U-Boot script image (what `mkimage -T script` writes; the
/// tool's own generator, `boot::uboot::script_image`, is checked byte for
/// byte against mkimage in its unit test).
fn script_image(text: &str) -> Vec<u8> {
    let mut data = (text.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(&[0; 4]);
    data.extend_from_slice(text.as_bytes());
    let mut h = [0u8; 64];
    h[0..4].copy_from_slice(&0x2705_1956u32.to_be_bytes());
    h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(&data).to_be_bytes());
    h[28..32].copy_from_slice(&[5, 22, 6, 0]);
    h[32..44].copy_from_slice(b"btrfs-deploy");
    let hcrc = crc32fast::hash(&h);
    h[4..8].copy_from_slice(&hcrc.to_be_bytes());
    let mut out = h.to_vec();
    out.extend(data);
    out
}

/// Boots `img` under U-Boot, letting the guest's writes (U-Boot's `fatrm`)
/// reach the image, and returns the console.
fn boot_persist(img: &Path) -> String {
    let log = PathBuf::from(format!("{}.console.log", img.display()));
    let args = [
        "boot-test",
        img.to_str().unwrap(),
        "--persist",
        "--timeout",
        "120",
        "--log",
        log.to_str().unwrap(),
    ];
    run_ok(&args);
    std::fs::read_to_string(&log).unwrap()
}

/// `--trial` on a uboot disk (docs/arm.md, "Trials under U-Boot"):
/// Debian's U-Boot runs /boot.scr (templates/uboot-trial.cmd), which
/// deletes /btrfs-deploy/trial-once with `fatrm` and boots the menu of
/// /btrfs-deploy/trial.conf (v2, with the trial's kernel arguments) once;
/// the next boot is the default again. The boot partition stays clean for
/// fsck.fat.
#[test]
fn a_trial_under_uboot_boots_the_version_once() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("trial.img");
    let imgs = img.to_str().unwrap();
    let factory = arm64_variant(tmp.path(), "factory");
    let v2 = arm64_variant(tmp.path(), "v2");
    run_ok(&["--rootfs", factory.to_str().unwrap(), imgs]);
    run_ok(&[
        "--version",
        "v2",
        "--trial",
        "--rootfs",
        v2.to_str().unwrap(),
        imgs,
    ]);
    let files = part_files(&img);
    for f in [
        "/boot.scr",
        "/btrfs-deploy/trial.conf",
        "/btrfs-deploy/trial-once",
    ] {
        assert!(files.iter().any(|p| p == f), "{f} missing: {files:?}");
    }
    let conf = part_read(&img, "/boot/extlinux/extlinux.conf");
    assert!(conf.contains("\ndefault factory\n"), "{conf}");
    // The script, as mkimage would write it.
    assert_eq!(
        part_read(&img, "/boot.scr"),
        String::from_utf8_lossy(&script_image(include_str!("../templates/uboot-trial.cmd")))
    );
    let trial = part_read(&img, "/btrfs-deploy/trial.conf");
    assert!(
        trial.contains("\ndefault v2\n") && trial.contains("panic=10 btrfs_deploy.trial=v2"),
        "{trial}"
    );
    assert_part_clean(&img);
    run_ok(&["check", imgs]);

    let console = boot_persist(&img);
    assert!(
        console.contains("btrfs-deploy: trial boot (one-shot)"),
        "{console}"
    );
    assert!(console.contains("btrfs_deploy.trial=v2"), "{console}");
    assert_layout_mounted(&console, "v2");
    assert_eq!(hook(&console, "issue").as_deref(), Some("v2"));
    // U-Boot deleted the mark before starting the kernel; its FAT write is clean.
    let left = part_files(&img);
    assert!(
        !left.iter().any(|p| p == "/btrfs-deploy/trial-once"),
        "{left:?}"
    );
    assert_part_clean(&img);

    let console = boot_persist(&img);
    assert!(
        !console.contains("trial boot"),
        "a second trial boot:\n{console}"
    );
    assert_layout_mounted(&console, "factory");
    assert_eq!(hook(&console, "issue").as_deref(), Some("factory"));
    let out = run_ok(&["status", imgs, "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["default"], "factory", "{st}");
    assert_eq!(st["trial_boot_used"], true, "{st}");
    // Ending it (here: set-default) removes the trial menu.
    run_ok(&["set-default", "factory", imgs]);
    let files = part_files(&img);
    assert!(
        !files.iter().any(|p| p.starts_with("/btrfs-deploy/trial")),
        "{files:?}"
    );
}

/// Issue 22: the arm64 build of `make build-arm64` is an aarch64 ELF,
/// statically linked (it needs no loader or library on a board), and runs
/// under qemu-user (called directly, not through binfmt_misc).
#[test]
fn the_arm64_build_runs_under_qemu_user() {
    let bin = deploy_arm64();
    let bins = bin.to_str().unwrap();
    let file = sh(&format!("file -b {bins}"));
    assert!(
        file.contains("ELF 64-bit LSB") && file.contains("ARM aarch64"),
        "{file}"
    );
    assert!(file.contains("statically linked"), "{file}");
    let version = sh(&format!("qemu-aarch64-static {bins} -V"));
    assert_eq!(
        version.trim(),
        format!("deploy {}", env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    let help = sh(&format!("qemu-aarch64-static {bins} --help"));
    assert!(
        help.contains("Usage: deploy [OPTIONS] [TARGET]") && help.contains("Exit status"),
        "{help}"
    );
    // It reads the shipped extensions like the host's build does.
    let ext = sh(&format!(
        "qemu-aarch64-static {bins} extensions --extensions-dir {}/extensions",
        env!("CARGO_MANIFEST_DIR")
    ));
    assert!(ext.contains("on-device"), "{ext}");
}

/// Where `-e on-device` keeps the arm64 packages it downloads (once).
fn on_device_cache() -> PathBuf {
    std::env::var_os("DEPLOY_ON_DEVICE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/on-device"))
}

/// Issue 22: `-e on-device` on an arm64 tree carries the arm64 build and
/// arm64 programs, libraries and loader (the tiny tree has only busybox:
/// they come from Debian's arm64 packages, downloaded into the cache),
/// never the host's. Read back from the image, they run under qemu-user
/// with the image's root as their root (`-L`: the loader and libraries
/// are the carried ones). A tree of an architecture without a deploy build
/// is refused at planning, nothing written.
#[test]
fn on_device_carries_arm64_programs_onto_an_arm64_tree() {
    deploy_arm64();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("dev.img");
    let imgs = img.to_str().unwrap();
    let tree = arm64_variant(tmp.path(), "factory");
    let cache = format!("ON_DEVICE_CACHE={}", on_device_cache().display());
    let out = run_ok(&[
        "-e",
        "on-device",
        "--set",
        &cache,
        "--rootfs",
        tree.to_str().unwrap(),
        imgs,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for t in [
        "mkfs.btrfs",
        "btrfs",
        "blkid",
        "sfdisk",
        "mmd",
        "fsck.fat",
        "losetup",
    ] {
        assert!(
            stderr.contains(&format!("on-device: {t} from Debian's arm64 packages")),
            "{t}: {stderr}"
        );
    }

    let top = Inspect::open(&img);
    let root = top.path("systems/factory/run");
    let roots = root.to_str().unwrap();
    let dest = root.join("usr/lib/btrfs-deploy");
    let deploy_file = sh(&format!("file -b {}/bin/deploy", dest.display()));
    assert!(deploy_file.contains("ARM aarch64"), "{deploy_file}");
    // It is the arm64 build itself.
    sh(&format!(
        "cmp {}/bin/deploy {}",
        dest.display(),
        deploy_arm64().display()
    ));
    assert_eq!(
        std::fs::read_link(root.join("usr/sbin/deploy")).unwrap(),
        Path::new("/usr/lib/btrfs-deploy/bin/deploy")
    );
    // Nothing of the host's architecture was carried.
    for dir in ["bin", "lib"] {
        for e in std::fs::read_dir(dest.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() == ".carried" || p.is_dir() {
                continue;
            }
            let f = sh(&format!("file -b {}", p.display()));
            assert!(f.contains("ARM aarch64"), "{}: {f}", p.display());
        }
    }
    assert!(dest.join("lib/ld-linux-aarch64.so.1").is_file());
    assert!(dest.join("lib/libc.so.6").is_file());
    let interp = sh(&format!(
        "patchelf --print-interpreter {}/bin/btrfs",
        dest.display()
    ));
    assert_eq!(
        interp.trim(),
        "/usr/lib/btrfs-deploy/lib/ld-linux-aarch64.so.1"
    );
    // They run, with the image's root as their root (the carried loader
    // and libraries: the tiny tree has no other).
    let v = sh(&format!(
        "qemu-aarch64-static -L {roots} {roots}/usr/lib/btrfs-deploy/bin/deploy -V"
    ));
    assert_eq!(v.trim(), format!("deploy {}", env!("CARGO_PKG_VERSION")));
    let v = sh(&format!(
        "qemu-aarch64-static -L {roots} {roots}/usr/lib/btrfs-deploy/bin/btrfs --version"
    ));
    assert!(v.starts_with("btrfs-progs v"), "{v}");
    let v = sh(&format!(
        "qemu-aarch64-static -L {roots} {roots}/usr/lib/btrfs-deploy/bin/mkfs.btrfs --version"
    ));
    assert!(v.contains("btrfs-progs"), "{v}");
    let v = sh(&format!(
        "qemu-aarch64-static -L {roots} {roots}/usr/lib/btrfs-deploy/bin/sfdisk --version"
    ));
    assert!(v.contains("util-linux"), "{v}");
    let ext = sh(&format!(
        "qemu-aarch64-static -L {roots} {roots}/usr/lib/btrfs-deploy/bin/deploy extensions"
    ));
    assert!(ext.contains("on-device"), "{ext}");
    // mtools with the carried iconv converters (GCONV_PATH, as the carried
    // deploy sets it): a folder made on a FAT image, read back by the host's.
    let f = sh(&format!("file -b {}/lib/gconv/IBM850.so", dest.display()));
    assert!(f.contains("ARM aarch64"), "{f}");
    let fat = tmp.path().join("fat.img");
    sh(&format!(
        "truncate -s 8M {fat} && mkfs.fat {fat} >/dev/null && \
         GCONV_PATH=/usr/lib/btrfs-deploy/lib/gconv MTOOLS_SKIP_CHECK=1 \
         qemu-aarch64-static -L {roots} {roots}/usr/lib/btrfs-deploy/bin/mmd -i {fat} ::/made-on-arm64",
        fat = fat.display()
    ));
    let dir = sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mdir -b -i {} ::",
        fat.display()
    ));
    assert!(dir.contains("made-on-arm64"), "{dir}");
    drop(top);
    assert_no_leftovers(&img, false);
    std::fs::remove_file(&img).unwrap();

    // A tree that has these programs and libraries (here: the packages
    // just unpacked into the cache, copied into it): they are its own that
    // are carried, and nothing is downloaded.
    let full = arm64_variant(tmp.path(), "full");
    let pkgs = on_device_cache().join("arm64/root");
    sh(&format!(
        "set -e; for d in bin sbin usr/bin usr/sbin; do \
           if [ -d {p}/$d ]; then cp -a --remove-destination {p}/$d/. {f}/usr/sbin/; fi; done; \
         mkdir -p {f}/usr/lib/aarch64-linux-gnu; \
         cp -a --remove-destination {p}/lib/aarch64-linux-gnu/. {p}/usr/lib/aarch64-linux-gnu/. \
           {f}/usr/lib/aarch64-linux-gnu/; \
         echo tree >> {f}/usr/lib/aarch64-linux-gnu/gconv/gconv-modules",
        p = pkgs.display(),
        f = full.display()
    ));
    let empty = tmp.path().join("no-cache");
    std::fs::create_dir(&empty).unwrap();
    let out = run_ok(&[
        "-e",
        "on-device",
        "--set",
        &format!("ON_DEVICE_CACHE={}", empty.display()),
        "--rootfs",
        full.to_str().unwrap(),
        imgs,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for t in [
        "mkfs.btrfs",
        "btrfs",
        "blkid",
        "sfdisk",
        "mmd",
        "fsck.fat",
        "losetup",
    ] {
        assert!(
            stderr.contains(&format!("on-device: {t} from the tree")),
            "{t}: {stderr}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "something was downloaded"
    );
    let top = Inspect::open(&img);
    let root = top.path("systems/factory/run");
    let roots = root.to_str().unwrap();
    sh(&format!(
        "cmp {roots}/usr/lib/btrfs-deploy/lib/libc.so.6 {}/usr/lib/aarch64-linux-gnu/libc.so.6 && \
         grep -qx tree {roots}/usr/lib/btrfs-deploy/lib/gconv/gconv-modules",
        full.display()
    ));
    let v = sh(&format!(
        "qemu-aarch64-static -L {roots} {roots}/usr/lib/btrfs-deploy/bin/btrfs --version"
    ));
    assert!(v.starts_with("btrfs-progs v"), "{v}");
    drop(top);
    std::fs::remove_file(&img).unwrap();

    // A tree of an architecture there is no deploy build for: refused
    // before anything is written (said with --arch, and in deploy.toml).
    run_fails(
        &[
            "--no-bootloader",
            "--arch",
            "riscv64",
            "-e",
            "on-device",
            "--rootfs",
            tree.to_str().unwrap(),
            imgs,
        ],
        1,
        &[
            "on-device",
            "the rootfs is riscv64",
            "no riscv64 build of deploy",
            "arm64",
        ],
    );
    assert!(!img.exists());
    let cfg = tmp.path().join("deploy.toml");
    write(&cfg, b"arch = \"riscv64\"\n");
    run_fails(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--no-bootloader",
            "-e",
            "on-device",
            "--rootfs",
            tree.to_str().unwrap(),
            imgs,
        ],
        1,
        &["the rootfs is riscv64", "no riscv64 build of deploy"],
    );
    assert!(!img.exists());
}

/// Issue 22, on the board: the arm64 deploy carried by `-e on-device` runs
/// in the arm64 guest (U-Boot, TCG) from a boot hook, as a non-systemd
/// init would run it: `deploy -V`, `deploy status` of the disk it booted
/// from, an upgrade of that disk to v2 from a tarball in /srv (the device's
/// own required on-device extension carries the tool into v2 again), and
/// `deploy list`. The next boot is v2's.
#[test]
fn the_carried_arm64_deploy_upgrades_the_board_it_runs_on() {
    deploy_arm64();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("board.img");
    let imgs = img.to_str().unwrap();
    let tree = arm64_variant(tmp.path(), "factory");
    let v2 = arm64_variant(tmp.path(), "v2");
    // The same hook in both: factory upgrades itself, v2 only says its deploy runs.
    for t in [&tree, &v2] {
        write(
            &t.join("etc/tiny-boot.d/30-on-device"),
            b"#!/bin/sh\n\
              echo \"device: $(deploy -V)\"\n\
              [ \"$(cat /etc/issue)\" = factory ] || exit 0\n\
              deploy status\n\
              echo \"device: status exit $?\"\n\
              deploy --version v2 --rootfs /srv/v2.tar\n\
              echo \"device: upgrade exit $?\"\n\
              deploy status\n",
        );
        chmod(&t.join("etc/tiny-boot.d/30-on-device"), 0o755);
    }
    sh(&format!(
        "tar --numeric-owner -C {} -cf {}/srv/v2.tar .",
        v2.display(),
        tree.display()
    ));
    let cache = format!("ON_DEVICE_CACHE={}", on_device_cache().display());
    run_ok(&[
        "-e",
        "on-device",
        "--set",
        &cache,
        "--rootfs",
        tree.to_str().unwrap(),
        imgs,
    ]);

    let log = tmp.path().join("console.log");
    run_ok(&[
        "boot-test",
        imgs,
        "--persist",
        "--timeout",
        "600",
        "--log",
        log.to_str().unwrap(),
    ]);
    let console = std::fs::read_to_string(&log).unwrap();
    assert_layout_mounted(&console, "factory");
    let hooks: Vec<&str> = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TINY-HOOK: "))
        .collect();
    let text = hooks.join("\n");
    assert!(
        text.contains(&format!("device: deploy {}", env!("CARGO_PKG_VERSION"))),
        "{console}"
    );
    // `deploy status` before and after the upgrade (the hook's last command).
    let (before, after) = text
        .split_once("device: upgrade exit ")
        .unwrap_or_else(|| panic!("no upgrade:\n{console}"));
    assert!(before.contains("device: status exit 0"), "{console}");
    assert!(before.contains("Disk:     /dev/vda (uboot"), "{console}");
    assert!(before.contains("Default:  factory (arm64)"), "{console}");
    assert!(after.starts_with("0\n"), "{console}");
    assert!(after.contains("Default:  v2 (arm64)"), "{console}");
    assert!(after.contains("Versions: factory, v2"), "{console}");

    // The host reads what the board wrote: v2 is the default, with the tool.
    let st: serde_json::Value =
        serde_json::from_slice(&run_ok(&["status", imgs, "--json"]).stdout).unwrap();
    assert_eq!(st["default"], "v2", "{st}");
    run_ok(&["check", imgs]);
    let console = boot(&img);
    assert_layout_mounted(&console, "v2");
    assert_eq!(hook(&console, "issue").as_deref(), Some("v2"));
    assert!(
        console.contains(&format!("device: deploy {}", env!("CARGO_PKG_VERSION"))),
        "{console}"
    );
}

/// Issue 22: the field flow on the board itself, under U-Boot (TCG): the
/// factory image with `-e on-device`; inside the guest the carried arm64
/// deploy arms a trial of v2 from a tarball on /srv, v2 boots, passes its
/// health step and is committed; a v3 whose init exits (a panic) comes back
/// on v2 by itself, whose `deploy status` names the failure; then a signed
/// delta bundle made on this PC is applied inside the guest on trial, and
/// committed.
#[test]
fn an_arm64_board_tries_versions_falls_back_and_takes_a_signed_bundle() {
    deploy_arm64();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = arm64_variant(d, "factory");
    write_trial_hooks(&base, "15-trial-watch", 300);
    let hooks = base.join("etc/tiny-boot.d");
    write(
        &hooks.join("50-scenario"),
        br#"#!/bin/sh
step=$(cat /srv/step 2>/dev/null || echo 0)
root=$(awk '$5 == "/" { print $4 }' /proc/self/mountinfo)
echo "SCENARIO: step=$step root=$root"
deploy status
next() { echo "$1" >/srv/step; sync; }
case $step in
0) deploy --version v2 --trial --rootfs /srv/v2.tar || echo "SCENARIO: deploy v2 failed"
   next 1; reboot -f ;;
1) deploy --version v3 --trial --rootfs /srv/v3.tar "--kernel-args=console=ttyAMA0,115200 panic=1" ||
       echo "SCENARIO: deploy v3 failed"
   next 2; reboot -f ;;
2) deploy --rootfs /srv/v4.bundle --verify-key /srv/vendor.pub --trial || echo "SCENARIO: deploy v4 failed"
   next 3; reboot -f ;;
*) echo "SCENARIO: done" ;;
esac
"#,
    );
    chmod(&hooks.join("50-scenario"), 0o755);
    let srv = d.join("srv");
    std::fs::create_dir(&srv).unwrap();
    for v in ["v2", "v3", "v4"] {
        let t = d.join(v);
        std::fs::create_dir(&t).unwrap();
        copy_tree(&base, &t);
        write(&t.join("etc/issue"), format!("{v}\n").as_bytes());
        if v == "v3" {
            write(
                &t.join("sbin/init"),
                b"#!/bin/sh\necho 'V3: init exits'\nexit 1\n",
            );
            chmod(&t.join("sbin/init"), 0o755);
        }
        if v != "v4" {
            sh(&format!(
                "tar -C {} --numeric-owner -cf {}/{v}.tar .",
                t.display(),
                srv.display()
            ));
        }
    }
    // The build host's image; the device is flashed with a copy of it.
    let cache = format!("ON_DEVICE_CACHE={}", on_device_cache().display());
    let build = d.join("build.img");
    run_ok(&[
        "--size",
        "1500M",
        "-e",
        "on-device",
        "--set",
        &cache,
        "--rootfs",
        base.to_str().unwrap(),
        build.to_str().unwrap(),
    ]);
    let img = d.join("board.img");
    sh(&format!(
        "cp --sparse=always {} {}",
        build.display(),
        img.display()
    ));
    // v4 on the build host, shipped as a signed delta against factory.
    run_ok(&[
        "--version",
        "v4",
        "--no-default",
        "-e",
        "on-device",
        "--set",
        &cache,
        "--rootfs",
        d.join("v4").to_str().unwrap(),
        build.to_str().unwrap(),
    ]);
    run_ok(&["keygen", "--output", d.join("vendor").to_str().unwrap()]);
    run_ok(&[
        "bundle",
        "create",
        build.to_str().unwrap(),
        "--version",
        "v4",
        "--base",
        "factory",
        "--sign-key",
        d.join("vendor.key").to_str().unwrap(),
        "--output",
        srv.join("v4.bundle").to_str().unwrap(),
    ]);
    std::fs::copy(d.join("vendor.pub"), srv.join("vendor.pub")).unwrap();
    {
        let e = Edit::open(&img);
        copy_tree(&srv, &e.path("state/srv"));
    }
    let log = d.join("scenario.log");
    // Boots: factory, v2 (trial, good), v3 (panic), v2, v4 (trial, good).
    let out = run(&[
        "boot-test",
        img.to_str().unwrap(),
        "--persist",
        "--accel",
        "tcg",
        "--reboots",
        "4",
        "--timeout",
        "1500",
        "--expect",
        "SCENARIO: done",
        "--fail-on",
        "SCENARIO: deploy .* failed",
        "--log",
        log.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "scenario failed: {out:?}\nconsole:\n{text}"
    );
    let b = |n| boot_of(&text, n);
    assert!(
        b(1).contains("SCENARIO: step=0 root=/systems/factory/run"),
        "{}",
        b(1)
    );
    assert!(b(2).contains("this boot is the trial of v2"), "{}", b(2));
    assert!(b(2).contains("v2 is now the default"), "{}", b(2));
    assert!(b(3).contains("V3: init exits"), "{}", b(3));
    assert!(
        b(4).contains("SCENARIO: step=2 root=/systems/v2/run"),
        "{}",
        b(4)
    );
    assert!(b(4).contains("Last trial: v3: failed at"), "{}", b(4));
    assert!(b(5).contains("this boot is the trial of v4"), "{}", b(5));
    assert!(b(5).contains("v4 is now the default"), "{}", b(5));
    assert!(
        b(5).contains("SCENARIO: step=3 root=/systems/v4/run"),
        "{}",
        b(5)
    );
    // The host reads what the board wrote.
    let st: serde_json::Value =
        serde_json::from_slice(&run_ok(&["status", img.to_str().unwrap(), "--json"]).stdout)
            .unwrap();
    assert_eq!(st["default"], "v4", "{st}");
    let m = Inspect::open(&img);
    let record = std::fs::read_to_string(m.path("systems/v4/deployment.json")).unwrap();
    assert!(record.contains("\"kind\": \"delta\""), "{record}");
    drop(m);
    run_ok(&["check", img.to_str().unwrap()]);
}
