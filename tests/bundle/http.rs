//! Issue 24: bundles pulled over HTTP (`--rootfs http://…`) from a real web
//! server on 127.0.0.1 (tests/fixture/http-server.py) that cuts, stalls,
//! refuses ranges and fails on purpose.

use super::*;

/// A device after a refused pull: still only `factory`, consistent, and
/// nothing left mounted or attached.
fn assert_untouched(img: &Path) {
    assert_no_leftovers(img, false);
    assert_eq!(labels_of(img), ["default", "factory"]);
    assert_eq!(default_of(img), "factory");
    run_ok(&["check", s(img)]);
}

#[test]
fn bundles_pull_over_http_resume_after_a_cut_and_retry_server_errors() {
    let fx = fixture();
    let srv = fx.p("srv");
    std::fs::create_dir(&srv).unwrap();
    let v2 = fx.bundle("v2", Some("factory"), "srv/v2.bundle", &["--build", "100"]);
    let size = std::fs::metadata(&v2).unwrap().len();
    assert!(size > 2 << 20, "the bundle is {size} bytes");
    let server = Server::start(&srv, 1 << 20);
    let key = s(&fx.public);

    // Cut after 1 MiB of the payload's answer: resumed with a range request.
    let dev = fx.device("cut.img");
    let url = server.url("cut", "v2.bundle");
    let out = run_ok(&["--rootfs", &url, "--verify-key", key, s(&dev)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("retrying in 1 s (1 of 5)"),
        "no retry reported:\n{stderr}"
    );
    assert_eq!(default_of(&dev), "v2");
    run_ok(&["check", s(&dev)]);
    let requests = server.requests();
    let resumed: Vec<u64> = requests
        .lines()
        .filter(|l| l.starts_with("/cut/v2.bundle bytes="))
        .map(|l| {
            l.split_once("bytes=")
                .unwrap()
                .1
                .trim_end_matches('-')
                .parse()
                .unwrap()
        })
        .collect();
    // The payload request (from the end of the head), then the resume from
    // where the cut left it (the head plus 1 MiB of payload).
    assert_eq!(resumed.len(), 2, "{requests}");
    assert!(
        resumed[0] > 0 && resumed[1] == 1 << 20 && resumed[1] > resumed[0],
        "{requests}"
    );
    let m = Inspect::open(&dev);
    let record = std::fs::read_to_string(m.path("systems/v2/deployment.json")).unwrap();
    assert!(record.contains("\"kind\": \"delta\""), "{record}");
    drop(m);

    // A server that ignores ranges: the bytes had are skipped.
    let dev = fx.device("noranges.img");
    run_ok(&[
        "--rootfs",
        &server.url("noranges", "v2.bundle"),
        "--verify-key",
        key,
        s(&dev),
    ]);
    assert_eq!(default_of(&dev), "v2");

    // 503 twice, then served: retried, reported.
    let dev = fx.device("503.img");
    let out = run_ok(&[
        "--rootfs",
        &server.url("fail5xx", "v2.bundle"),
        "--verify-key",
        key,
        s(&dev),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 503") && stderr.contains("(2 of 5)"),
        "{stderr}"
    );
    assert_eq!(default_of(&dev), "v2");

    // The URL as `rootfs` in deploy.toml stays a URL.
    let dev = fx.device("config.img");
    let config = fx.p("deploy.toml");
    std::fs::write(
        &config,
        format!(
            "rootfs = \"{}\"\nverify_key = \"vendor.pub\"\n",
            server.url("files", "v2.bundle")
        ),
    )
    .unwrap();
    run_ok(&["--config", s(&config), s(&dev)]);
    assert_eq!(default_of(&dev), "v2");
}

#[test]
fn refused_http_pulls_leave_the_device_as_it_was() {
    let fx = fixture();
    let srv = fx.p("srv");
    std::fs::create_dir(&srv).unwrap();
    let v2 = fx.bundle("v2", Some("factory"), "srv/v2.bundle", &["--build", "100"]);
    let bytes = std::fs::read(&v2).unwrap();
    let (manifest, signature, payload) = split(&bytes);
    let mut changed = payload.clone();
    changed[payload.len() - 10] ^= 1;
    std::fs::write(
        srv.join("tampered.bundle"),
        assemble(&manifest, &signature, &changed),
    )
    .unwrap();
    std::fs::write(srv.join("short.bundle"), &bytes[..bytes.len() - 4096]).unwrap();
    let server = Server::start(&srv, 1 << 20);
    let key = s(&fx.public);
    let dev = fx.device("dev.img");
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    // Refused before the disk is opened: the image is not even written.
    let early: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "missing file",
            vec![server.url("files", "v9.bundle")],
            vec!["HTTP 404", "check the URL"],
        ),
        (
            "shorter on the server",
            vec![server.url("files", "short.bundle")],
            vec!["bytes on the server, its manifest says", "refusing it"],
        ),
        (
            "nobody listening",
            vec![
                format!("http://127.0.0.1:{closed_port}/files/v2.bundle"),
                "--http-retries".into(),
                "1".into(),
            ],
            vec!["Connection refused", "gave up after 1 retries"],
        ),
        (
            "not a bundle",
            vec![server.url("files", "requests.log")],
            vec!["is not a btrfs-deploy bundle"],
        ),
    ];
    for (what, extra, needles) in early {
        eprintln!("--- case: {what}");
        let before = fingerprint(&dev);
        let mut argv: Vec<&str> = vec!["--rootfs"];
        argv.extend(extra.iter().map(String::as_str));
        argv.extend(["--verify-key", key, s(&dev)]);
        run_fails(&argv, 1, &needles);
        assert_eq!(fingerprint(&dev), before, "{what}: image changed");
        assert_no_leftovers(&dev, false);
    }

    // Found while streaming (as from a pipe): the partial version is
    // removed and the device keeps what it had.
    run_fails(
        &[
            "--rootfs",
            &server.url("files", "tampered.bundle"),
            "--verify-key",
            key,
            s(&dev),
        ],
        1,
        &["changed or damaged", "does not match its signed hash"],
    );
    assert_untouched(&dev);
    // A server that stalls after 1 MiB: the timeout, then the retries, end it.
    let err = run_fails(
        &[
            "--rootfs",
            &server.url("slow", "v2.bundle"),
            "--verify-key",
            key,
            "--http-timeout",
            "2",
            "--http-retries",
            "1",
            s(&dev),
        ],
        1,
        &["gave up after 1 retries", "--http-timeout"],
    );
    assert!(err.to_lowercase().contains("timed out"), "{err}");
    assert_untouched(&dev);
    run_fails(
        &[
            "--rootfs",
            &server.url("files", "v2.bundle"),
            "--http-timeout",
            "0",
            s(&dev),
        ],
        2,
        &["--http-timeout"],
    );
    // What was refused came from the server, not the device: it still applies.
    run_ok(&[
        "--rootfs",
        &server.url("files", "v2.bundle"),
        "--verify-key",
        key,
        s(&dev),
    ]);
    assert_eq!(default_of(&dev), "v2");
}
