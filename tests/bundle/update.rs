//! Issue 24: `deploy bundle index` and `deploy update`: a device finds the
//! newest bundle it can apply in the vendor's signed index, served by a
//! real web server on 127.0.0.1.

use super::*;

#[test]
fn update_follows_the_signed_index_and_refuses_stale_or_swapped_files() {
    let fx = fixture();
    let r3 = fx.p("r3");
    sh(&format!("cp -a {} {}", fx.r2.display(), r3.display()));
    write(&r3.join("etc/issue"), b"v3\n");
    run_ok(&["--version", "v3", "--rootfs", s(&r3), s(&fx.build)]);
    let site = fx.p("site");
    let dir = site.join("amd64");
    std::fs::create_dir_all(&dir).unwrap();
    fx.bundle(
        "v2",
        Some("factory"),
        "site/amd64/v2.bundle",
        &["--build", "200"],
    );
    fx.bundle(
        "v3",
        Some("v2"),
        "site/amd64/v3.bundle",
        &["--build", "300"],
    );
    let out = run_ok(&["bundle", "index", s(&dir), "--sign-key", s(&fx.key)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 bundles"), "{stderr}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["bundles"][0]["label"], "v3", "{index}");
    assert_eq!(index["bundles"][0]["base"]["label"], "v2", "{index}");
    assert!(dir.join("index.json.minisig").exists());
    let server = Server::start(&site, 1 << 20);

    // The device's config names the index with the {arch} placeholder.
    let dev = fx.device("dev.img");
    let config = fx.p("deploy.toml");
    std::fs::write(
        &config,
        format!(
            "update_url = \"http://127.0.0.1:{}/files/{{arch}}/index.json\"\nverify_key = \"vendor.pub\"\n",
            server.port
        ),
    )
    .unwrap();
    let update = |extra: &[&str]| {
        let mut argv = vec!["update", "--config", s(&config)];
        argv.extend(extra);
        argv.push(s(&dev));
        run_ok(&argv)
    };
    // Lacking v2, the v3 delta cannot apply: v2 (a delta against factory) first.
    let out = update(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Newest for this disk: v2 (build 200, delta against factory)"),
        "{stderr}"
    );
    assert_eq!(default_of(&dev), "v2");
    // Then v3 onto the received v2, on trial: the default stays v2.
    let out = update(&["--trial"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("v3 (build 300, delta against v2)"),
        "{stderr}"
    );
    assert_eq!(labels_of(&dev), ["default", "factory", "v2", "v3"]);
    assert_eq!(default_of(&dev), "v2", "a trial leaves the default");
    run_ok(&["set-default", "v3", s(&dev)]);
    // Up to date: nothing written.
    let before = fingerprint(&dev);
    let out = update(&[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is up to date"),
        "{out:?}"
    );
    assert_eq!(
        fingerprint(&dev),
        before,
        "an update with nothing to do wrote"
    );
    assert_no_leftovers(&dev, false);

    // Refused, each with a fresh device left as it was.
    let dev2 = fx.device("dev2.img");
    let url = server.url("files", "amd64/index.json");
    let refuse = |what: &str, extra: &[&str], needles: &[&str]| {
        eprintln!("--- case: {what}");
        let before = fingerprint(&dev2);
        let mut argv = vec!["update"];
        argv.extend(extra);
        argv.push(s(&dev2));
        run_fails(&argv, 1, needles);
        assert_eq!(fingerprint(&dev2), before, "{what}: image changed");
        assert_no_leftovers(&dev2, false);
    };
    // The index changed after signing.
    let good = std::fs::read(dir.join("index.json")).unwrap();
    let text =
        String::from_utf8(good.clone())
            .unwrap()
            .replacen("\"build\": 300", "\"build\": 301", 1);
    std::fs::write(dir.join("index.json"), &text).unwrap();
    refuse(
        "changed index",
        &["--index", &url, "--verify-key", s(&fx.public)],
        &["verifying the index", "does not verify"],
    );
    std::fs::write(dir.join("index.json"), &good).unwrap();
    // Signed by another key.
    run_ok(&["keygen", "--output", s(&fx.p("other"))]);
    refuse(
        "other key",
        &["--index", &url, "--verify-key", s(&fx.p("other.pub"))],
        &["not by the verification key"],
    );
    // No index configured.
    run_fails(
        &["update", "--verify-key", s(&fx.public), s(&dev2)],
        2,
        &["update_url"],
    );
    // A bundle file swapped for another signed one after indexing.
    let v2 = dir.join("v2.bundle");
    let saved = std::fs::read(&v2).unwrap();
    std::fs::remove_file(&v2).unwrap();
    fx.bundle("v2", None, "site/amd64/v2.bundle", &["--build", "200"]);
    refuse(
        "swapped bundle",
        &["--index", &url, "--verify-key", s(&fx.public)],
        &["not the bundle the signed index names"],
    );
    std::fs::write(&v2, &saved).unwrap();
    // An expired index.
    run_ok(&[
        "bundle",
        "index",
        s(&dir),
        "--sign-key",
        s(&fx.key),
        "--expires-in",
        "1s",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    refuse(
        "expired index",
        &["--index", &url, "--verify-key", s(&fx.public)],
        &["expired at", "bundle index"],
    );
    // Renewed, it applies.
    run_ok(&["bundle", "index", s(&dir), "--sign-key", s(&fx.key)]);
    run_ok(&[
        "update",
        "--index",
        &url,
        "--verify-key",
        s(&fx.public),
        s(&dev2),
    ]);
    assert_eq!(default_of(&dev2), "v2");
}
