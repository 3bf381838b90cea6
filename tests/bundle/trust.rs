//! Issue 24: update security beyond a build number: expiry times (a stale
//! bundle is not replayed at a device), several trusted keys (a key
//! rotation) and revoked keys, on real images.

use super::*;

/// `bundle info --json`'s `signed_by_key`.
fn signer_of(bundle: &Path) -> String {
    let out = run_ok(&["bundle", "info", s(bundle), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["signed_by_key"].as_str().unwrap().to_string()
}

#[test]
fn stale_bundles_and_revoked_keys_are_refused_and_rotated_keys_accepted() {
    let fx = fixture();
    let key = s(&fx.public);

    // Expiry: 90 days by default, `never` on request, refused once past.
    let v2 = fx.bundle("v2", Some("factory"), "v2.bundle", &["--build", "100"]);
    let out = run_ok(&["bundle", "info", s(&v2), "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let created = humantime::parse_rfc3339(info["manifest"]["created"].as_str().unwrap()).unwrap();
    let expires = humantime::parse_rfc3339(info["manifest"]["expires"].as_str().unwrap()).unwrap();
    assert_eq!(
        expires.duration_since(created).unwrap().as_secs(),
        90 * 86400
    );
    let forever = fx.bundle(
        "v2",
        Some("factory"),
        "forever.bundle",
        &["--expires-in", "never"],
    );
    let out = run_ok(&["bundle", "info", s(&forever)]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("expires:     never"),
        "{out:?}"
    );
    let short = fx.bundle(
        "v2",
        Some("factory"),
        "short.bundle",
        &["--expires-in", "1s"],
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let dev = fx.device("dev.img");
    let before = fingerprint(&dev);
    run_fails(
        &["--rootfs", s(&short), "--verify-key", key, s(&dev)],
        1,
        &["expired at", "refusing stale metadata", "bundle create"],
    );
    assert_eq!(
        fingerprint(&dev),
        before,
        "an expired bundle changed the image"
    );
    assert_no_leftovers(&dev, false);
    run_fails(
        &[
            "bundle",
            "create",
            s(&fx.build),
            "--version",
            "v2",
            "--sign-key",
            s(&fx.key),
            "--output",
            s(&fx.p("x.bundle")),
            "--expires-in",
            "soon",
        ],
        2,
        &["--expires-in", "never"],
    );
    assert!(!fx.p("x.bundle").exists());

    // Rotation: the vendor makes a new key; devices trust both (their
    // deploy.toml, shipped in a version signed with the old key), then
    // accept bundles signed with the new one.
    run_ok(&["keygen", "--output", s(&fx.p("new"))]);
    let rotated = fx.p("rotated.bundle");
    run_ok(&[
        "bundle",
        "create",
        s(&fx.build),
        "--version",
        "v2",
        "--base",
        "factory",
        "--sign-key",
        s(&fx.p("new.key")),
        "--output",
        s(&rotated),
    ]);
    run_fails(
        &["--rootfs", s(&rotated), "--verify-key", key, s(&dev)],
        1,
        &["not by the verification key"],
    );
    let config = fx.p("deploy.toml");
    std::fs::write(&config, "verify_key = [\"vendor.pub\", \"new.pub\"]\n").unwrap();
    let dev2 = fx.device("dev2.img");
    run_ok(&["--rootfs", s(&rotated), "--config", s(&config), s(&dev2)]);
    assert_eq!(default_of(&dev2), "v2");
    let m = Inspect::open(&dev2);
    let record = std::fs::read_to_string(m.path("systems/v2/deployment.json")).unwrap();
    assert!(record.contains(&signer_of(&rotated)), "{record}");
    drop(m);

    // Revocation: the old key is refused even though it is still listed,
    // from the config file and from the command line.
    let old_id = signer_of(&v2);
    assert_ne!(old_id, signer_of(&rotated));
    std::fs::write(
        &config,
        format!("verify_key = [\"vendor.pub\", \"new.pub\"]\nrevoked_keys = [\"{old_id}\"]\n"),
    )
    .unwrap();
    let before = fingerprint(&dev);
    run_fails(
        &["--rootfs", s(&v2), "--config", s(&config), s(&dev)],
        1,
        &["which is revoked", &old_id],
    );
    run_fails(
        &[
            "--rootfs",
            s(&v2),
            "--verify-key",
            key,
            "--revoked-key",
            &old_id,
            s(&dev),
        ],
        1,
        &["which is revoked"],
    );
    // Neither key of a list: both named.
    std::fs::write(&config, "verify_key = [\"new.pub\", \"vendor.pub\"]\n").unwrap();
    run_ok(&["keygen", "--output", s(&fx.p("third"))]);
    let third = fx.p("third.bundle");
    run_ok(&[
        "bundle",
        "create",
        s(&fx.build),
        "--version",
        "v2",
        "--base",
        "factory",
        "--sign-key",
        s(&fx.p("third.key")),
        "--output",
        s(&third),
    ]);
    run_fails(
        &["--rootfs", s(&third), "--config", s(&config), s(&dev)],
        1,
        &[
            "not by any of the verification keys",
            "new.pub",
            "vendor.pub",
        ],
    );
    assert_eq!(
        fingerprint(&dev),
        before,
        "a refused bundle changed the image"
    );
    assert_no_leftovers(&dev, false);
    // The new key alone still applies there.
    run_ok(&["--rootfs", s(&rotated), "--config", s(&config), s(&dev)]);
    assert_eq!(default_of(&dev), "v2");
}
