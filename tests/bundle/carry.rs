//! A version made with `-e on-device` from one that was carries the tool
//! again; what is the same as the last version's copy stays shared with it
//! (`keep_unchanged`), so a delta bundle holds the change, not the tool.

use super::*;

fn payload_stream_size(bundle: &Path) -> u64 {
    let out = run_ok(&["bundle", "info", s(bundle), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["manifest"]["payload"]["stream_size"].as_u64().unwrap()
}

#[test]
fn a_delta_between_two_on_device_versions_does_not_carry_the_tool_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let build = dir.join("build.img");
    run_ok(&["-e", "on-device", "--rootfs", s(&tiny_rootfs()), s(&build)]);
    let device = dir.join("device.img");
    sh(&format!(
        "cp --sparse=always {} {}",
        build.display(),
        device.display()
    ));
    let r2 = dir.join("r2");
    copy_tree(&tiny_rootfs(), &r2);
    write(&r2.join("etc/motd"), b"v2 of the signage box\n");
    run_ok(&[
        "-e",
        "on-device",
        "--version",
        "v2",
        "--no-default",
        "--rootfs",
        s(&r2),
        s(&build),
    ]);
    let carried = "usr/lib/btrfs-deploy/bin/deploy";
    {
        let m = Inspect::open(&build);
        let (old, new) = (
            m.path(&format!("systems/factory/orig/{carried}")),
            m.path(&format!("systems/v2/orig/{carried}")),
        );
        assert_eq!(std::fs::read(&old).unwrap(), std::fs::read(&new).unwrap());
        assert_eq!(
            first_extent(&old),
            first_extent(&new),
            "v2's carried deploy is a second copy, not a clone of factory's"
        );
    }
    run_ok(&["keygen", "--output", s(&dir.join("vendor"))]);
    let bundle = dir.join("v2.bundle");
    run_ok(&[
        "bundle",
        "create",
        s(&build),
        "--version",
        "v2",
        "--base",
        "factory",
        "--sign-key",
        s(&dir.join("vendor.key")),
        "--output",
        s(&bundle),
    ]);
    // The carried tree is some 8 MiB (deploy, btrfs-progs, extlinux, their
    // libraries); the change is one line and the regenerated small files.
    let size = payload_stream_size(&bundle);
    assert!(size < 512 << 10, "delta send stream is {size} bytes");
    run_ok(&[
        "--rootfs",
        s(&bundle),
        "--verify-key",
        s(&dir.join("vendor.pub")),
        s(&device),
    ]);
    assert_eq!(default_of(&device), "v2");
    run_ok(&["check", s(&device)]);
    let m = Inspect::open(&device);
    assert_eq!(
        std::fs::read(m.path("systems/v2/orig/etc/motd")).unwrap(),
        b"v2 of the signage box\n"
    );
    assert_eq!(
        std::fs::read(m.path(&format!("systems/v2/orig/{carried}"))).unwrap(),
        std::fs::read(m.path(&format!("systems/factory/orig/{carried}"))).unwrap()
    );
}
