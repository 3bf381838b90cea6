//! Integration: kernel files belong to the version's tree (issue 12): they
//! are found in the written tree after extensions ran and placed next to the
//! version as reflinks of the tree's files.

mod common;
use common::*;
use std::path::Path;

/// `btrfs filesystem du` of one file: (total, exclusive) bytes.
fn du(path: &Path) -> (u64, u64) {
    let out = sh(&format!("btrfs filesystem du --raw {}", path.display()));
    let line = out.lines().last().unwrap();
    let f: Vec<u64> = line
        .split_whitespace()
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    (f[0], f[1])
}

#[test]
fn an_unchanged_kernel_costs_nothing_in_an_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = tmp.path().join("v1");
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        v1.display()
    ));
    let img = tmp.path().join("disk.img");
    let i = img.to_str().unwrap();
    run_ok(&["--rootfs", v1.to_str().unwrap(), i]);
    let v2 = tmp.path().join("v2");
    sh(&format!("cp -a {} {}", v1.display(), v2.display()));
    write(&v2.join("etc/motd"), b"v2\n");
    let before = data_used(&img);
    run_ok(&["--version", "v2", "--rootfs", v2.to_str().unwrap(), i]);
    let growth = data_used(&img).saturating_sub(before);
    let m = Inspect::open(&img);
    let kernel = m.path("systems/v2/kernel");
    let (total, exclusive) = du(&kernel);
    assert!(total > 1 << 20, "kernel of {total} bytes");
    assert_eq!(exclusive, 0, "systems/v2/kernel holds its own data");
    let (total_i, exclusive_i) = du(&m.path("systems/v2/initramfs"));
    assert!(total_i > 0);
    assert_eq!(exclusive_i, 0, "systems/v2/initramfs holds its own data");
    // The very extents of the tree's kernel, which factory's shares too.
    let tree_kernel = std::fs::canonicalize(m.path("systems/v2/orig/vmlinuz"))
        .ok()
        .filter(|p| p.starts_with(m.top()))
        .unwrap_or_else(|| {
            let link = std::fs::read_link(m.path("systems/v2/orig/vmlinuz")).unwrap();
            m.path("systems/v2/orig").join(link)
        });
    assert_eq!(first_extent(&kernel), first_extent(&tree_kernel));
    assert_eq!(
        first_extent(&kernel),
        first_extent(&m.path("systems/factory/kernel"))
    );
    // The whole upgrade: a few metadata blocks, not the 16 MiB of kernel files.
    assert!(
        growth < total + total_i,
        "disk grew by {growth}, kernel files are {}",
        total + total_i
    );
    drop(m);
    run_ok(&["check", i]);
}

#[test]
fn a_kernel_installed_by_an_extension_is_the_one_placed() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = tmp.path().join("v1");
    make_rootfs(&v1);
    let exts = tmp.path().join("exts");
    // Replaces the rootfs's kernel by another version, as a package install would.
    let p = exts.join("kernel.configure");
    write(
        &p,
        format!(
            "#!/bin/sh\n# summary: installs a kernel\nset -e\n\
             rm \"$DEPLOY_TREE/boot/vmlinuz-{FAKE_KVER}\" \"$DEPLOY_TREE/boot/initrd.img-{FAKE_KVER}\" \
             \"$DEPLOY_TREE/vmlinuz\" \"$DEPLOY_TREE/initrd.img\"\n\
             echo 'kernel from the extension' > \"$DEPLOY_TREE/boot/vmlinuz-7.0.0-ext\"\n\
             echo 'initramfs from the extension' > \"$DEPLOY_TREE/boot/initrd.img-7.0.0-ext\"\n"
        )
        .as_bytes(),
    );
    chmod(&p, 0o755);
    let img = tmp.path().join("disk.img");
    run_ok(&[
        "--rootfs",
        v1.to_str().unwrap(),
        "--extensions-dir",
        exts.to_str().unwrap(),
        "-e",
        "kernel",
        img.to_str().unwrap(),
    ]);
    let m = Inspect::open(&img);
    assert_eq!(
        std::fs::read_to_string(m.path("systems/factory/kernel")).unwrap(),
        "kernel from the extension\n"
    );
    assert_eq!(
        std::fs::read_to_string(m.path("systems/factory/initramfs")).unwrap(),
        "initramfs from the extension\n"
    );
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path("systems/factory/deployment.json")).unwrap())
            .unwrap();
    assert_eq!(rec["kernel_version"], "7.0.0-ext");
}

#[test]
fn an_extension_that_removes_the_kernel_fails_the_deploy_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = tmp.path().join("v1");
    make_rootfs(&v1);
    let exts = tmp.path().join("exts");
    let p = exts.join("nokernel.configure");
    write(
        &p,
        b"#!/bin/sh\n# summary: removes the kernel\nrm -f \"$DEPLOY_TREE\"/boot/vmlinuz-* \"$DEPLOY_TREE/vmlinuz\"\n",
    );
    chmod(&p, 0o755);
    let img = tmp.path().join("disk.img");
    run_fails(
        &[
            "--rootfs",
            v1.to_str().unwrap(),
            "--extensions-dir",
            exts.to_str().unwrap(),
            "-e",
            "nokernel",
            img.to_str().unwrap(),
        ],
        1,
        &["finding the kernel of version factory"],
    );
    assert!(!img.exists());
    assert_no_leftovers(&img, false);
}
