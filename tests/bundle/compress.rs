//! Issue 24: zstd-compressed payloads (the default) and uncompressed ones
//! (`--compress none`) carry the same send stream and both apply.

use super::*;

fn payload_of(bundle: &Path) -> serde_json::Value {
    let out = run_ok(&["bundle", "info", s(bundle), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["manifest"]["payload"].clone()
}

#[test]
fn zstd_payloads_are_smaller_and_both_kinds_apply() {
    let fx = fixture();
    let zstd = fx.bundle("v2", None, "zstd.bundle", &[]);
    let plain = fx.bundle("v2", None, "plain.bundle", &["--compress", "none"]);
    let (z, p) = (payload_of(&zstd), payload_of(&plain));
    assert_eq!(z["compression"], "zstd", "{z}");
    assert!(p.get("compression").is_none(), "{p}");
    // The same send stream, stored smaller (the tiny system's busybox and
    // text compress; the v2 file is random and does not).
    assert_eq!(z["stream_size"], p["stream_size"]);
    let (zs, ps) = (z["size"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    assert_eq!(ps, p["stream_size"].as_u64().unwrap());
    assert!(zs < ps, "zstd payload {zs} bytes, plain {ps}");
    let out = run_ok(&["bundle", "info", s(&zstd)]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("zstd of a"),
        "{out:?}"
    );
    for (name, b) in [("z.img", &zstd), ("p.img", &plain)] {
        let dev = fx.device(name);
        run_ok(&["--rootfs", s(b), "--verify-key", s(&fx.public), s(&dev)]);
        assert_eq!(default_of(&dev), "v2");
        let m = Inspect::open(&dev);
        assert_eq!(
            std::fs::read(m.path("systems/v2/orig/usr/lib/v2.bin")).unwrap(),
            std::fs::read(fx.r2.join("usr/lib/v2.bin")).unwrap()
        );
        drop(m);
        run_ok(&["check", s(&dev)]);
    }
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
            "--compress",
            "lz4",
        ],
        2,
        &["--compress"],
    );
}
