//! The command-line conventions of issue 17: `-V` and `deploy version`,
//! option values that look like options, a target named like a subcommand,
//! and the `--json` shapes (docs/json.md), checked by parsing.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

fn json_of(args: &[&str]) -> Value {
    let out = run_ok(args);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "deploy {args:?}: stdout is not one JSON object ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(v["format"], 1, "deploy {args:?}: {v}");
    v
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn dash_v_and_version_print_the_tool_version() {
    let want = format!("deploy {}\n", env!("CARGO_PKG_VERSION"));
    for args in [&["-V"][..], &["version"]] {
        let out = run_ok(args);
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{args:?}");
    }
    let v = json_of(&["version", "--json"]);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let commit = v["git_commit"].as_str().expect("git commit known");
    assert_eq!(commit.len(), 40, "{v}");
    assert!(v["target"].as_str().unwrap().contains("linux"), "{v}");
    assert!(v["features"].is_array(), "{v}");
}

#[test]
fn an_option_where_a_value_belongs_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("x.img");
    for (args, names) in [
        (
            vec!["--version", "--rootfs", "r", s(&img)],
            "'--version <LABEL>'",
        ),
        (vec!["--size", "--rootfs", "r", s(&img)], "'--size <SIZE>'"),
        (
            vec!["--rootfs", "r", "--kernel-args", "-e", "x", s(&img)],
            "'--kernel-args <ARGS>'",
        ),
    ] {
        run_fails(
            &args,
            2,
            &["a value is required for", names, "none was supplied"],
        );
        assert!(!img.exists(), "{args:?} created the image");
    }
    // With `=`, a value may start with "-": here it reaches the label check.
    run_fails(
        &["--version=-x", "--rootfs", "r", s(&img)],
        2,
        &["invalid --version"],
    );
}

#[test]
fn a_target_named_like_a_subcommand_follows_double_dash() {
    let tmp = tempfile::tempdir().unwrap();
    make_rootfs(&tmp.path().join("rootfs"));
    // Everything in ./deploy.toml: the target is the only word.
    write(&tmp.path().join("deploy.toml"), b"rootfs = \"./rootfs\"\n");
    let in_tmp = |args: &[&str]| {
        let out = deploy()
            .current_dir(tmp.path())
            .args(args)
            .output()
            .unwrap();
        eprintln!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    // Without "--", `list` is the subcommand (and wants its own TARGET).
    let out = in_tmp(&["list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!tmp.path().join("list").exists());
    let out = in_tmp(&["--", "list"]);
    assert!(out.status.success());
    let img = tmp.path().join("list");
    let v = json_of(&["list", s(&img), "--json"]);
    assert_eq!(v["versions"][0]["label"], "factory");
    assert_no_leftovers(&img, false);
}

#[test]
fn json_of_deploy_list_check_and_extensions() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    write(&rootfs.join("etc/both.conf"), b"v=1\n");
    let img = tmp.path().join("d.img");

    // A new image.
    let v = json_of(&[
        "--json",
        "-e",
        "hostname",
        "--set",
        "HOSTNAME=json-test",
        "--rootfs",
        s(&rootfs),
        s(&img),
    ]);
    assert_eq!(v["label"], "factory");
    assert_eq!(v["target"], s(&img));
    assert_eq!(v["kind"], "new");
    assert_eq!(v["default"], true);
    assert_eq!(v["upgraded_from"], Value::Null);
    assert_eq!(v["kernel_version"], FAKE_KVER);
    assert_eq!(v["extensions"], serde_json::json!(["hostname"]));
    // make_rootfs: tool (100000 bytes, hardlinked), a 64 MiB sparse file, ...
    let bytes = v["written"]["bytes"].as_u64().unwrap();
    assert!(bytes >= 100_000, "{v}");
    assert!(v["written"]["files"].as_u64().unwrap() >= 10, "{v}");
    assert!(v["stats"]["dirs"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["conflicts"], serde_json::json!([]));
    assert_eq!(v["removed"], serde_json::json!([]));
    assert!(v["duration_secs"].as_f64().unwrap() > 0.0, "{v}");

    // An upgrade with a conflict in /etc: the user and v2 change one file.
    {
        let e = Edit::open(&img);
        write(&e.path("systems/factory/run/etc/both.conf"), b"v=LOCAL\n");
    }
    write(&rootfs.join("etc/both.conf"), b"v=2\n");
    write(&rootfs.join("usr/bin/new-tool"), &[1u8; 5000]);
    let v = json_of(&[
        "--json",
        "--version",
        "v2",
        "--keep",
        "1",
        "--rootfs",
        s(&rootfs),
        s(&img),
    ]);
    assert_eq!(v["label"], "v2");
    assert_eq!(v["kind"], "upgrade");
    assert_eq!(v["upgraded_from"], "factory");
    assert_eq!(v["default"], true);
    let (bytes, files) = (
        v["written"]["bytes"].as_u64().unwrap(),
        v["written"]["files"].as_u64().unwrap(),
    );
    // Only the changed files: both.conf and new-tool.
    assert!((5000..100_000).contains(&bytes), "{v}");
    assert!((2..10).contains(&files), "{v}");
    assert!(v["stats"]["unchanged"].as_u64().unwrap() > 10, "{v}");
    let conflicts = v["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{v}");
    assert_eq!(conflicts[0]["path"], "both.conf");
    assert_eq!(conflicts[0]["local_copy"], "both.conf.deploy-local");
    // --keep 1 never removes the previous default: nothing removed.
    assert_eq!(v["removed"], serde_json::json!([]));

    // list
    let v = json_of(&["list", s(&img), "--json"]);
    assert_eq!(v["target"], s(&img));
    let versions = v["versions"].as_array().unwrap();
    let labels: Vec<&str> = versions
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["factory", "v2"]);
    assert_eq!(versions[1]["default"], true);
    assert_eq!(versions[1]["etc_conflicts"], 1);
    assert_eq!(versions[1]["upgraded_from"], "factory");

    // check: a good disk (exit 0), then a broken one (exit 3, not 1).
    let v = json_of(&["check", s(&img), "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["problems"], 0);
    assert!(v["findings"].as_array().unwrap().len() > 5, "{v}");
    {
        let e = Edit::open(&img);
        std::fs::remove_file(e.path("systems/v2/kernel")).unwrap();
    }
    let out = deploy()
        .args(["check", "--json", s(&img)])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["format"].clone(), v["ok"].clone()),
        (1.into(), false.into())
    );
    let findings = v["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["status"] == "problem"
            && f["name"] == "version v2: boot files"
            && f["message"].as_str().unwrap().contains("kernel is missing")),
        "{v}"
    );
    assert!(v["problems"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(" problem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_leftovers(&img, false);

    // extensions: the shipped ones, and a folder of the user's that overrides one.
    let mine = tmp.path().join("mine");
    write(
        &mine.join("hostname.configure"),
        b"#!/bin/sh\n# summary: my own hostname\n",
    );
    chmod(&mine.join("hostname.configure"), 0o755);
    let v = json_of(&["extensions", "--json", "--extensions-dir", s(&mine)]);
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("extensions");
    assert_eq!(
        v["search_path"],
        serde_json::json!([s(&shipped), s(&mine)]),
        "{v}"
    );
    let exts = v["extensions"].as_array().unwrap();
    let names: Vec<&str> = exts.iter().map(|e| e["name"].as_str().unwrap()).collect();
    for n in ["fstab", "hostname", "network", "ssh-keys", "users"] {
        assert!(names.contains(&n), "{n} missing: {v}");
    }
    let host = exts.iter().find(|e| e["name"] == "hostname").unwrap();
    assert_eq!(host["summary"], "my own hostname");
    assert_eq!(host["configure"], s(&mine.join("hostname.configure")));
    assert_eq!(host["check"], Value::Null);
    let users = exts.iter().find(|e| e["name"] == "users").unwrap();
    assert_eq!(users["check"], s(&shipped.join("users.check")));
}

#[test]
fn a_failed_deploy_with_json_prints_no_json() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("d.img");
    let out = deploy()
        .args([
            "--json",
            "--rootfs",
            s(&tmp.path().join("missing")),
            s(&img),
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!img.exists());
}
