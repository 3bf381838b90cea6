//! `deploy status [TARGET] [--json]`.

mod common;
use common::*;

#[test]
fn status_names_the_default_the_versions_and_the_disk_kind() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    let i = img.to_str().unwrap();
    let r = tiny_rootfs();
    run_ok(&["--rootfs", r.to_str().unwrap(), i]);
    run_ok(&[
        "--version",
        "v2",
        "--no-default",
        "--rootfs",
        r.to_str().unwrap(),
        i,
    ]);
    let out = run_ok(&["status", i, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], 1);
    assert_eq!(v["default"], "factory");
    assert_eq!(v["versions"], serde_json::json!(["factory", "v2"]));
    assert_eq!(v["boot"], "hybrid");
    // This host's / is not on the image.
    assert!(v["running"].is_null(), "{v}");
    assert_eq!(v["state_merge_pending"], false);
    run_ok(&["set-default", "v2", i]);
    let text = String::from_utf8_lossy(&run_ok(&["status", i]).stdout).into_owned();
    assert!(text.contains("Default:  v2"), "{text}");
    assert!(text.contains("Versions: factory, v2"), "{text}");
    assert!(text.contains("not on this disk"), "{text}");
    assert_no_leftovers(&img, false);
}

#[test]
fn status_without_target_off_a_device_is_a_usage_error() {
    // The test host's / is not a version of a btrfs-deploy disk.
    run_fails(&["status"], 2, &["no TARGET given", "not a version"]);
    run_fails(&["status", "/"], 2, &["no TARGET given"]);
    run_fails(&["status", "/nonexistent.img"], 1, &["/nonexistent.img"]);
}
