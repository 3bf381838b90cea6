//! Signed update bundles (issue 15) on real images: keys, `bundle create`,
//! `bundle info`, applying delta and full bundles (from a file and from a
//! pipe), every refusal with the image unchanged, and a boot of a disk
//! upgraded by a bundle.

mod common;
use common::http::Server;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

#[path = "bundle/carry.rs"]
mod carry;
#[path = "bundle/compress.rs"]
mod compress;
#[path = "bundle/http.rs"]
mod http;
#[path = "bundle/trust.rs"]
mod trust;
#[path = "bundle/update.rs"]
mod update;

/// A build host's disk (`factory`, then `v2`), a copy of it taken before
/// v2 (what the devices have), the v2 rootfs and a vendor key.
struct Fx {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    build: PathBuf,
    factory: PathBuf,
    r2: PathBuf,
    key: PathBuf,
    public: PathBuf,
}

impl Fx {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A fresh copy of the device image (factory only).
    fn device(&self, name: &str) -> PathBuf {
        let p = self.p(name);
        sh(&format!(
            "cp --sparse=always {} {}",
            self.factory.display(),
            p.display()
        ));
        p
    }

    /// `deploy bundle create build.img --version L [--base B] ...`.
    fn bundle(&self, label: &str, base: Option<&str>, out: &str, extra: &[&str]) -> PathBuf {
        let out = self.p(out);
        let mut args = vec![
            "bundle",
            "create",
            s(&self.build),
            "--version",
            label,
            "--sign-key",
            s(&self.key),
            "--output",
            s(&out),
        ];
        if let Some(b) = base {
            args.extend(["--base", b]);
        }
        args.extend(extra);
        run_ok(&args);
        out
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Bytes the v2 rootfs adds or changes over the tiny system.
const V2_CHANGED: usize = 3 << 20;

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fixture() -> Fx {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let build = dir.join("build.img");
    run_ok(&["--rootfs", s(&tiny_rootfs()), s(&build)]);
    let factory = dir.join("factory.img");
    sh(&format!(
        "cp --sparse=always {} {}",
        build.display(),
        factory.display()
    ));
    let r2 = dir.join("r2");
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        r2.display()
    ));
    write(&r2.join("etc/issue"), b"v2-rootfs\n");
    write(&r2.join("usr/lib/v2.bin"), &pseudo_random(V2_CHANGED, 2));
    run_ok(&["--version", "v2", "--rootfs", s(&r2), s(&build)]);
    let name = dir.join("vendor");
    run_ok(&["keygen", "--output", s(&name)]);
    Fx {
        _tmp: tmp,
        build,
        factory,
        r2,
        key: dir.join("vendor.key"),
        public: dir.join("vendor.pub"),
        dir,
    }
}

fn default_of(img: &Path) -> String {
    let m = Inspect::open(img);
    std::fs::read_link(m.path("systems/default"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn labels_of(img: &Path) -> Vec<String> {
    let m = Inspect::open(img);
    let mut v: Vec<String> = std::fs::read_dir(m.path("systems"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Header, manifest, signature and payload of a bundle file.
fn split(bundle: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    assert_eq!(&bundle[..20], b"BTRFS-DEPLOY-BUNDLE\n");
    let m = u32::from_le_bytes(bundle[20..24].try_into().unwrap()) as usize;
    let sg = u32::from_le_bytes(bundle[24..28].try_into().unwrap()) as usize;
    (
        bundle[28..28 + m].to_vec(),
        bundle[28 + m..28 + m + sg].to_vec(),
        bundle[28 + m + sg..].to_vec(),
    )
}

fn assemble(manifest: &[u8], signature: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = b"BTRFS-DEPLOY-BUNDLE\n".to_vec();
    out.extend((manifest.len() as u32).to_le_bytes());
    out.extend((signature.len() as u32).to_le_bytes());
    out.extend(manifest);
    out.extend(signature);
    out.extend(payload);
    out
}

/// Signs `manifest` with the `minisign` tool itself and returns the signature.
fn minisign_sign(dir: &Path, key: &Path, manifest: &[u8]) -> Vec<u8> {
    let m = dir.join("crafted-manifest.json");
    std::fs::write(&m, manifest).unwrap();
    let sig = dir.join("crafted-manifest.json.minisig");
    let _ = std::fs::remove_file(&sig);
    sh(&format!(
        "minisign -S -s {} -m {} -x {} -t crafted </dev/null",
        key.display(),
        m.display(),
        sig.display()
    ));
    std::fs::read(&sig).unwrap()
}

#[test]
fn keygen_writes_a_minisign_key_pair_and_never_overwrites_it() {
    let tmp = tempfile::tempdir().unwrap();
    let name = tmp.path().join("k");
    let out = run_ok(&["keygen", "--output", s(&name)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (sk, pk) = (tmp.path().join("k.key"), tmp.path().join("k.pub"));
    assert_eq!(owner_mode(&sk).2 & 0o777, 0o600);
    let public = std::fs::read_to_string(&pk).unwrap();
    assert!(
        public.starts_with("untrusted comment: minisign public key: "),
        "{public}"
    );
    let id = public.lines().next().unwrap().rsplit(' ').next().unwrap();
    assert!(stdout.contains(id), "{stdout}");
    let before = std::fs::read(&sk).unwrap();
    run_fails(&["keygen", "--output", s(&name)], 1, &["already exists"]);
    assert_eq!(std::fs::read(&sk).unwrap(), before);
    // minisign itself signs with the secret key and verifies with the public one.
    let f = tmp.path().join("file");
    std::fs::write(&f, b"data").unwrap();
    sh(&format!(
        "minisign -S -s {} -m {} </dev/null && minisign -V -p {} -m {}",
        sk.display(),
        f.display(),
        pk.display(),
        f.display()
    ));
}

#[test]
fn delta_and_full_bundles_match_a_direct_upgrade_and_boot() {
    let fx = fixture();
    let delta = fx.bundle("v2", Some("factory"), "v2.bundle", &[]);
    let full = fx.bundle("v2", None, "v2-full.bundle", &[]);
    let (delta_size, full_size) = (
        std::fs::metadata(&delta).unwrap().len(),
        std::fs::metadata(&full).unwrap().len(),
    );
    eprintln!(
        "delta bundle {delta_size} bytes, full {full_size} bytes, changed {V2_CHANGED} bytes: \
         delta/changed = {:.3}",
        delta_size as f64 / V2_CHANGED as f64
    );
    assert!(
        (delta_size as f64) <= 1.2 * V2_CHANGED as f64,
        "delta {delta_size} bytes for {V2_CHANGED} changed"
    );
    assert!(
        full_size > 4 * delta_size,
        "full {full_size}, delta {delta_size}"
    );

    let direct = fx.device("direct.img");
    run_ok(&["--version", "v2", "--rootfs", s(&fx.r2), s(&direct)]);
    let by_delta = fx.device("delta.img");
    let by_full = fx.device("full.img");
    let verify = ["--verify-key", s(&fx.public)];
    let out = run_ok(&[&["--rootfs", s(&delta)][..], &verify, &[s(&by_delta)]].concat());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Receiving bundle"),
        "the payload went through btrfs receive"
    );
    run_ok(
        &[
            &["--rootfs", s(&full), "--version", "v2"][..],
            &verify,
            &[s(&by_full)],
        ]
        .concat(),
    );

    let d = Inspect::open(&direct);
    for img in [&by_delta, &by_full] {
        assert_eq!(default_of(img), "v2");
        run_ok(&["check", s(img)]);
        let m = Inspect::open(img);
        for sub in ["orig", "run"] {
            // Same names, types, content, owners, modes, file times, xattrs,
            // ACLs, hardlinks. Directory times and etc/fstab's time are left
            // out: fstab completion sets them to the time of each deploy.
            let diff = sh(&format!(
                "rsync -naciHAXO --delete --exclude=/etc/fstab {}/ {}/",
                m.path(&format!("systems/v2/{sub}")).display(),
                d.path(&format!("systems/v2/{sub}")).display()
            ));
            assert_eq!(
                diff,
                "",
                "{} {sub} differs from a direct upgrade",
                img.display()
            );
            let fstab = format!("systems/v2/{sub}/etc/fstab");
            assert_eq!(
                std::fs::read_to_string(m.path(&fstab)).unwrap(),
                std::fs::read_to_string(d.path(&fstab)).unwrap()
            );
        }
        for f in ["kernel", "initramfs"] {
            assert_eq!(
                std::fs::read(m.path(&format!("systems/v2/{f}"))).unwrap(),
                std::fs::read(d.path(&format!("systems/v2/{f}"))).unwrap(),
                "{f}"
            );
        }
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(m.path("systems/v2/deployment.json")).unwrap())
                .unwrap();
        assert!(record["build"].as_u64().unwrap() > 0, "{record}");
        assert_eq!(record["upgraded_from"], "factory");
        assert_eq!(
            record["details"]["bundle"]["kind"],
            if img == &by_delta { "delta" } else { "full" }
        );
        // The received subvolume is kept, read-only, with its received UUID.
        let show = sh(&format!(
            "btrfs subvolume show {}",
            m.path("systems/v2/received/orig").display()
        ));
        let uuid = record["details"]["bundle"]["subvolume_uuid"]
            .as_str()
            .unwrap();
        assert!(
            show.contains(&format!("Received UUID: \t\t{uuid}")),
            "{show}"
        );
        assert!(show.contains("readonly"), "{show}");
    }
    drop(d);
    // Removing a version removes its received subvolume too.
    run_ok(&["set-default", "factory", s(&by_full)]);
    run_ok(&["remove", "v2", s(&by_full)]);
    assert_eq!(labels_of(&by_full), ["default", "factory"]);
    run_ok(&["check", s(&by_full)]);

    let console = boot_console(&by_delta, None);
    assert!(
        console.contains("TINY-MOUNT: / /systems/v2/run"),
        "{console}"
    );
}

#[test]
fn bundles_apply_from_a_pipe_and_chain_onto_received_versions() {
    let fx = fixture();
    let v2 = fx.bundle("v2", Some("factory"), "v2.bundle", &["--build", "100"]);
    let r3 = fx.p("r3");
    sh(&format!("cp -a {} {}", fx.r2.display(), r3.display()));
    write(&r3.join("etc/issue"), b"v3-rootfs\n");
    run_ok(&["--version", "v3", "--rootfs", s(&r3), s(&fx.build)]);
    let v3 = fx.bundle("v3", Some("v2"), "v3.bundle", &["--build", "101"]);
    let dev = fx.device("dev.img");
    let pipe = |bundle: &Path, extra: &str| {
        let out = deploy()
            .args(["--rootfs", "-", "--verify-key", s(&fx.public), s(&dev)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map(|mut c| {
                let data = std::fs::read(bundle).unwrap();
                let mut stdin = c.stdin.take().unwrap();
                // Like curl: the bytes arrive through a pipe, maybe bit by bit.
                for part in data.chunks(64 << 10) {
                    if stdin.write_all(part).is_err() {
                        break;
                    }
                }
                drop(stdin);
                c.wait_with_output().unwrap()
            })
            .unwrap();
        eprintln!("{extra}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    assert!(pipe(&v2, "v2").status.success());
    // v3 is a delta against v2, which this device only has as a received bundle.
    assert!(pipe(&v3, "v3").status.success());
    assert_eq!(default_of(&dev), "v3");
    {
        let m = Inspect::open(&dev);
        assert_eq!(
            std::fs::read(m.path("systems/v3/run/etc/issue")).unwrap(),
            b"v3-rootfs\n"
        );
    }
    run_ok(&["check", s(&dev)]);

    // A full bundle onto a disk deployed on its own (another filesystem
    // UUID): the fstab entries added on the build host are replaced by this
    // disk's.
    let full = fx.bundle("v2", None, "v2-full.bundle", &["--build", "100"]);
    let other = fx.p("other.img");
    run_ok(&["--rootfs", s(&tiny_rootfs()), s(&other)]);
    let (mine, theirs) = (fs_uuid(&other), fs_uuid(&fx.build));
    assert_ne!(mine, theirs);
    run_ok(&[
        "--rootfs",
        s(&full),
        "--verify-key",
        s(&fx.public),
        s(&other),
    ]);
    {
        let m = Inspect::open(&other);
        let fstab = std::fs::read_to_string(m.path("systems/v2/orig/etc/fstab")).unwrap();
        assert!(fstab.contains(&format!("UUID={mine} / btrfs")), "{fstab}");
        assert!(!fstab.contains(&theirs), "{fstab}");
        assert_eq!(
            fstab.matches("# Added by btrfs-deploy").count(),
            1,
            "{fstab}"
        );
    }
    run_ok(&["check", s(&other)]);

    // A payload changed in transit: refused at the bad chunk, before btrfs
    // receive sees it; the partial version is removed and nothing else changed.
    let dev2 = fx.device("dev2.img");
    let mut bytes = std::fs::read(&v2).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x40;
    let bad = fx.p("bad.bundle");
    std::fs::write(&bad, &bytes).unwrap();
    let out = deploy()
        .args(["--rootfs", "-", "--verify-key", s(&fx.public), s(&dev2)])
        .stdin(std::fs::File::open(&bad).unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("changed or damaged"), "{stderr}");
    assert_no_leftovers(&dev2, false);
    assert_eq!(labels_of(&dev2), ["default", "factory"]);
    assert_eq!(default_of(&dev2), "factory");
    run_ok(&["check", s(&dev2)]);
}

#[test]
fn every_refused_bundle_leaves_the_image_unchanged() {
    let fx = fixture();
    let v2 = fx.bundle("v2", Some("factory"), "v2.bundle", &["--build", "100"]);
    let bytes = std::fs::read(&v2).unwrap();
    let (manifest, signature, payload) = split(&bytes);
    let write_variant = |name: &str, data: &[u8]| {
        let p = fx.p(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    // The manifest changed by one character (still valid JSON).
    let text = String::from_utf8(manifest.clone()).unwrap();
    let forged = text.replacen("\"created\": \"2", "\"created\": \"3", 1);
    assert_ne!(forged, text);
    let bad_sig = write_variant(
        "bad-sig.bundle",
        &assemble(forged.as_bytes(), &signature, &payload),
    );
    // One payload byte changed.
    let mut changed = payload.clone();
    changed[payload.len() / 2] ^= 1;
    let bad_payload = write_variant(
        "bad-payload.bundle",
        &assemble(&manifest, &signature, &changed),
    );
    let truncated = write_variant("truncated.bundle", &bytes[..bytes.len() - 1000]);
    let cut_head = write_variant("cut-head.bundle", &bytes[..100]);
    // Signed by a key made with `minisign -G -W`, not the vendor's.
    let other = fx.p("other");
    sh(&format!(
        "minisign -G -W -p {}.pub -s {}.key </dev/null",
        other.display(),
        other.display()
    ));
    let other_key = fx.p("other.key");
    let other_bundle = fx.p("other.bundle");
    run_ok(&[
        "bundle",
        "create",
        s(&fx.build),
        "--version",
        "v2",
        "--base",
        "factory",
        "--sign-key",
        s(&other_key),
        "--output",
        s(&other_bundle),
    ]);
    // Correctly signed manifests of a newer format, and with an unknown field.
    let mut value: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    value["format"] = 2.into();
    value["compression"] = "zstd".into();
    let newer = serde_json::to_vec(&value).unwrap();
    let newer = write_variant(
        "newer.bundle",
        &assemble(&newer, &minisign_sign(&fx.dir, &fx.key, &newer), &payload),
    );
    value["format"] = 1.into();
    let unknown = serde_json::to_vec(&value).unwrap();
    let unknown = write_variant(
        "unknown.bundle",
        &assemble(
            &unknown,
            &minisign_sign(&fx.dir, &fx.key, &unknown),
            &payload,
        ),
    );
    // v3, a delta against v2, which the devices lack.
    let r3 = fx.p("r3");
    sh(&format!("cp -a {} {}", fx.r2.display(), r3.display()));
    write(&r3.join("etc/issue"), b"v3\n");
    run_ok(&["--version", "v3", "--rootfs", s(&r3), s(&fx.build)]);
    let v3_delta = fx.bundle("v3", Some("v2"), "v3.bundle", &["--build", "200"]);
    let v3_old = fx.bundle("v3", None, "v3-old.bundle", &["--build", "100"]);
    let v2_uuid = {
        let m = Inspect::open(&fx.build);
        sh(&format!(
            "btrfs subvolume show {} | awk '/^\\s*UUID:/ {{print $2}}'",
            m.path("systems/v2/orig").display()
        ))
        .trim()
        .to_string()
    };
    // A device that already has v2 (build 100).
    let dev = fx.device("dev.img");
    let with_v2 = fx.device("with-v2.img");
    run_ok(&[
        "--rootfs",
        s(&v2),
        "--verify-key",
        s(&fx.public),
        s(&with_v2),
    ]);
    let config = fx.p("deploy.toml");
    std::fs::write(&config, "verify_key = \"other.pub\"\n").unwrap();
    let missing = fx.p("new.img");

    let key = s(&fx.public);
    let cases: Vec<(&str, Vec<&str>, &Path, Vec<String>)> = vec![
        (
            "signature",
            vec!["--rootfs", s(&bad_sig), "--verify-key", key],
            &dev,
            vec!["does not verify".into()],
        ),
        (
            "payload byte",
            vec!["--rootfs", s(&bad_payload), "--verify-key", key],
            &dev,
            vec!["changed or damaged".into(), "chunk 0".into()],
        ),
        (
            "truncated",
            vec!["--rootfs", s(&truncated), "--verify-key", key],
            &dev,
            vec!["truncated".into()],
        ),
        (
            "truncated head",
            vec!["--rootfs", s(&cut_head), "--verify-key", key],
            &dev,
            vec!["truncated".into()],
        ),
        (
            "other key",
            vec!["--rootfs", s(&other_bundle), "--verify-key", key],
            &dev,
            vec!["signed by key".into(), "not by the verification key".into()],
        ),
        (
            "config key is another one",
            vec!["--rootfs", s(&v2), "--config", s(&config)],
            &dev,
            vec!["signed by key".into(), "other.pub".into()],
        ),
        (
            "no key",
            vec!["--rootfs", s(&v2)],
            &dev,
            vec![
                "without a verification key".into(),
                "--insecure-no-verify".into(),
            ],
        ),
        (
            "newer format",
            vec!["--rootfs", s(&newer), "--verify-key", key],
            &dev,
            vec!["format 2, newer than this deploy reads (1)".into()],
        ),
        (
            "unknown field",
            vec!["--rootfs", s(&unknown), "--verify-key", key],
            &dev,
            vec!["unknown".into(), "compression".into()],
        ),
        (
            "label on the disk",
            vec!["--rootfs", s(&v2), "--verify-key", key],
            &fx.build,
            vec!["version v2 already exists".into()],
        ),
        (
            "base missing",
            vec!["--rootfs", s(&v3_delta), "--verify-key", key],
            &dev,
            vec![
                "delta against version v2".into(),
                format!("subvolume UUID {v2_uuid}"),
            ],
        ),
        (
            "build not newer",
            vec!["--rootfs", s(&v3_old), "--verify-key", key],
            &with_v2,
            vec![
                "build 100, not newer than build 100 (version v2)".into(),
                "--allow-downgrade".into(),
            ],
        ),
        (
            "other --version",
            vec!["--rootfs", s(&v2), "--verify-key", key, "--version", "v9"],
            &dev,
            vec!["does not match the bundle's version v2".into()],
        ),
    ];
    for (what, args, img, needles) in &cases {
        let before = fingerprint(img);
        let mut argv = args.clone();
        argv.push(s(img));
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        eprintln!("--- case: {what}");
        run_fails(&argv, 1, &needles);
        assert_eq!(fingerprint(img), before, "{what}: image changed");
        assert_no_leftovers(img, false);
    }
    // A bundle never creates a disk.
    run_fails(
        &["--rootfs", s(&v2), "--verify-key", key, s(&missing)],
        1,
        &["deploy the base system first"],
    );
    assert!(!missing.exists() && !fx.p("new.img.partial").exists());

    // What was refused applies with the override, and from the config's key.
    run_ok(&[
        "--rootfs",
        s(&v3_old),
        "--verify-key",
        key,
        "--allow-downgrade",
        s(&with_v2),
    ]);
    assert_eq!(default_of(&with_v2), "v3");
    std::fs::write(&config, "verify_key = \"vendor.pub\"\n").unwrap();
    run_ok(&["--rootfs", s(&v2), "--config", s(&config), s(&dev)]);
    assert_eq!(default_of(&dev), "v2");
    // A signed manifest naming another subvolume than the payload holds:
    // received into quarantine, then refused by the check of what arrived.
    let mut value: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    value["subvolume_uuid"] = "00000000-1111-2222-3333-444444444444".into();
    let lying = serde_json::to_vec(&value).unwrap();
    let lying = write_variant(
        "lying.bundle",
        &assemble(&lying, &minisign_sign(&fx.dir, &fx.key, &lying), &payload),
    );
    let dev4 = fx.device("dev4.img");
    run_fails(
        &["--rootfs", s(&lying), "--verify-key", key, s(&dev4)],
        1,
        &[
            "received UUID is",
            "the manifest says 00000000-1111-2222-3333-444444444444",
        ],
    );
    assert_no_leftovers(&dev4, false);
    assert_eq!(labels_of(&dev4), ["default", "factory"]);
    run_ok(&["check", s(&dev4)]);
    // Without verification only when asked, and with a warning.
    let dev3 = fx.device("dev3.img");
    let out = run_ok(&["--rootfs", s(&v2), "--insecure-no-verify", s(&dev3)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: applying bundle") && stderr.contains("WITHOUT verifying"),
        "{stderr}"
    );
    assert_eq!(default_of(&dev3), "v2");
}

#[test]
fn bundle_create_refuses_before_writing_and_info_reports_the_signature() {
    let fx = fixture();
    let out = fx.p("x.bundle");
    let before = fingerprint(&fx.build);
    let base_args = |key: &Path, base: &str| -> Vec<String> {
        [
            "bundle",
            "create",
            s(&fx.build),
            "--version",
            "v2",
            "--base",
            base,
            "--sign-key",
            s(key),
            "--output",
            s(&out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let args = base_args(&fx.key, "nope");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_fails(&argv, 1, &["--base nope", "no version nope", "factory, v2"]);
    assert!(!out.exists());
    // A password-protected key is refused, never prompted for.
    let kp = minisign::KeyPair::generate_encrypted_keypair(Some("pw".into())).unwrap();
    let enc = fx.p("enc.key");
    std::fs::write(&enc, kp.sk.to_box(None).unwrap().into_string()).unwrap();
    let args = base_args(&enc, "factory");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_fails(&argv, 1, &["protected by a password", "minisign -G -W"]);
    assert!(!out.exists());
    // An existing output is never overwritten.
    std::fs::write(&out, b"keep me").unwrap();
    let args = base_args(&fx.key, "factory");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_fails(&argv, 1, &["already exists"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    std::fs::remove_file(&out).unwrap();
    // A failure while writing (here: no space left) removes the output.
    let small = fx.p("small");
    std::fs::create_dir(&small).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=1m tmpfs {}",
        small.display()
    ));
    let full_out = small.join("full.bundle");
    let failed = run(&[
        "bundle",
        "create",
        s(&fx.build),
        "--version",
        "v2",
        "--sign-key",
        s(&fx.key),
        "--output",
        s(&full_out),
    ]);
    let listing = std::fs::read_dir(&small).unwrap().count();
    sh(&format!("umount {}", small.display()));
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("writing bundle") && stderr.contains("space"),
        "{stderr}"
    );
    assert_eq!(listing, 0, "the failed bundle (or its spool) was left");
    assert_eq!(fingerprint(&fx.build), before);
    assert_no_leftovers(&fx.build, false);
    // A version whose kernel came from the host cannot be shipped.
    let nok = fx.p("r-nokernel");
    sh(&format!(
        "cp -a {t} {r} && mv {r}/boot/vmlinuz-* {d}/host-vmlinuz && mv {r}/boot/initrd.img-* {d}/host-initrd \
         && rm {r}/vmlinuz {r}/initrd.img",
        t = tiny_rootfs().display(),
        r = nok.display(),
        d = fx.dir.display()
    ));
    run_ok(&[
        "--version",
        "hostk",
        "--rootfs",
        s(&nok),
        "--kernel",
        s(&fx.p("host-vmlinuz")),
        "--initramfs",
        s(&fx.p("host-initrd")),
        "--no-default",
        s(&fx.build),
    ]);
    let before = fingerprint(&fx.build);
    run_fails(
        &[
            "bundle",
            "create",
            s(&fx.build),
            "--version",
            "hostk",
            "--sign-key",
            s(&fx.key),
            "--output",
            s(&out),
        ],
        1,
        &["not inside its tree", "--kernel"],
    );
    assert!(!out.exists());
    assert_eq!(fingerprint(&fx.build), before);

    run_ok(&argv);
    let info = run_ok(&[
        "bundle",
        "info",
        s(&out),
        "--verify-key",
        s(&fx.public),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        v["signature"].as_str().unwrap().starts_with("verified"),
        "{v}"
    );
    assert_eq!(v["manifest"]["label"], "v2");
    assert_eq!(v["manifest"]["base"]["label"], "factory");
    assert_eq!(v["manifest"]["payload"]["kind"], "btrfs-send");
    assert!(v["manifest"]["kernel_version"]
        .as_str()
        .unwrap()
        .contains('.'));
    assert_eq!(v["complete"], true);
    let text = run_ok(&["bundle", "info", s(&out)]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("delta against factory") && text.contains("not checked"),
        "{text}"
    );
    run_ok(&["keygen", "--output", s(&fx.p("other"))]);
    let failed = run_fails(
        &[
            "bundle",
            "info",
            s(&out),
            "--verify-key",
            s(&fx.p("other.pub")),
        ],
        1,
        &["signed by key"],
    );
    assert!(!failed.is_empty());
}
