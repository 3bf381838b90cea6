//! Configure extensions and the deployment config (issue 5).
//!
//! Two layers: the shipped extension scripts run directly on temporary trees
//! (fast, every branch), and the real `deploy` binary on real images (the
//! contract end to end: planning-time checks, ordering, failures, secrets,
//! `deploy.toml`, `run-in-tree`, and one boot).

mod common;
use common::*;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SHIPPED: [&str; 7] = [
    "hostname",
    "install-files",
    "fstab",
    "ssh-keys",
    "systemd-units",
    "network",
    "users",
];
const KEY1: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBtestkeyonlyAAAAAAAAAAAAAAAAAAAAAAAAAAAA one@test";
const KEY2: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCtestkeytwo two@test";
const HASH: &str = "$6$saltsalt$Q2hhbmdlTWVQbGVhc2VJdElzT25seUFUZXN0SGFzaA";

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("extensions")
}

const STD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs a shipped extension program directly with exactly `env` (+ PATH and
/// DEPLOY_RUN_IN_TREE, which deploy always gives; `env` may override them).
fn run_script(program: &str, tree: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(shipped_dir().join(program));
    c.env_clear()
        .env("PATH", STD_PATH)
        .env("DEPLOY_RUN_IN_TREE", env!("CARGO_BIN_EXE_deploy"))
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    if let Some(t) = tree {
        c.arg(t);
    }
    let out = c.output().unwrap();
    eprintln!(
        "{program}: {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn configure_ok(name: &str, tree: &Path, env: &[(&str, &str)]) -> String {
    let out = run_script(&format!("{name}.configure"), Some(tree), env);
    assert!(out.status.success(), "{name}.configure failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn configure_fails(name: &str, tree: &Path, env: &[(&str, &str)], needle: &str) {
    let out = run_script(&format!("{name}.configure"), Some(tree), env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}.configure succeeded");
    assert!(
        err.contains(needle),
        "{name}: stderr lacks {needle:?}: {err}"
    );
}

fn check_fails(name: &str, env: &[(&str, &str)], needle: &str) {
    let out = run_script(&format!("{name}.check"), None, env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}.check {env:?}");
    assert!(err.contains(needle), "{name}.check {env:?}: {err}");
}

fn check_ok(name: &str, env: &[(&str, &str)]) {
    let out = run_script(&format!("{name}.check"), None, env);
    assert!(out.status.success(), "{name}.check {env:?} failed");
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A small tree like the tiny system's /etc (passwd, group, shadow).
fn etc_tree(dir: &Path) -> PathBuf {
    let t = dir.join("tree");
    write(
        &t.join("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    );
    write(
        &t.join("etc/group"),
        b"root:x:0:\nshadow:x:42:\nuser:x:1000:\naudio:x:29:user\nwheel:x:10:\n",
    );
    write(
        &t.join("etc/shadow"),
        b"root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\n",
    );
    lchown(&t.join("etc/shadow"), 0, 42);
    chmod(&t.join("etc/shadow"), 0o640);
    std::fs::create_dir_all(t.join("home")).unwrap();
    t
}

// ---------------------------------------------------------------------------
// The shipped scripts, run directly.
// ---------------------------------------------------------------------------

#[test]
fn every_shipped_extension_is_executable_with_summary_and_check() {
    // on-device is exercised by tests/trial.rs (it carries the tool).
    for name in SHIPPED.into_iter().chain(["on-device"]) {
        for suffix in ["configure", "check"] {
            let p = shipped_dir().join(format!("{name}.{suffix}"));
            let mode = std::fs::metadata(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .permissions()
                .mode();
            assert!(mode & 0o111 != 0, "{} not executable", p.display());
        }
        let text = read(&shipped_dir().join(format!("{name}.configure")));
        assert!(text.starts_with("#!/bin/sh\n"), "{name}");
        assert!(
            text.lines().nth(1).unwrap().starts_with("# summary: "),
            "{name}: no summary line"
        );
        // Documented.
        let docs = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/extensions.md"));
        assert!(
            docs.contains(&format!("### {name}\n")),
            "{name} undocumented"
        );
    }
}

#[test]
fn scripts_never_write_through_symlinks_to_the_host() {
    let d = tempfile::tempdir().unwrap();
    let t = etc_tree(d.path());
    // A hostile tree: its files point at the host's. A marker file stands
    // in for the host file so the test cannot damage the machine.
    let host = d.path().join("host-file");
    write(&host, b"host content\n");
    symlink(&host, t.join("etc/hostname")).unwrap();
    symlink(&host, t.join("etc/fstab")).unwrap();
    std::fs::create_dir_all(t.join("etc/systemd")).unwrap();
    symlink(d.path(), t.join("etc/systemd/network")).unwrap();
    configure_ok("hostname", &t, &[("HOSTNAME", "safe")]);
    configure_ok(
        "fstab",
        &t,
        &[("FSTAB_ENTRIES", "tmpfs /tmp tmpfs defaults 0 0")],
    );
    configure_ok("network", &t, &[("NETWORK_INTERFACES", "eth0")]);
    assert_eq!(read(&host), "host content\n");
    assert!(!d.path().join("10-eth0.network").exists());
    // The link targets are resolved inside the tree instead.
    assert_eq!(read(&t.join("etc/hostname")), "safe\n");
    let net = t
        .join(d.path().strip_prefix("/").unwrap())
        .join("10-eth0.network");
    assert!(net.exists(), "{}", net.display());
}

#[test]
fn hostname_script() {
    let d = tempfile::tempdir().unwrap();
    let t = etc_tree(d.path());
    write(
        &t.join("etc/hosts"),
        b"127.0.0.1\tlocalhost\n127.0.1.1\told-name\n::1\tlocalhost\n",
    );
    configure_ok("hostname", &t, &[("HOSTNAME", "web1.example.org")]);
    assert_eq!(read(&t.join("etc/hostname")), "web1.example.org\n");
    assert_eq!(
        read(&t.join("etc/hosts")),
        "127.0.0.1\tlocalhost\n127.0.1.1\tweb1.example.org web1\n::1\tlocalhost\n"
    );
    std::fs::remove_file(t.join("etc/hosts")).unwrap();
    configure_ok("hostname", &t, &[("HOSTNAME", "box")]);
    assert!(read(&t.join("etc/hosts")).contains("127.0.0.1\tlocalhost\n127.0.1.1\tbox\n"));
    check_ok("hostname", &[("HOSTNAME", "a-1.b")]);
    check_fails("hostname", &[], "HOSTNAME is not set");
    for bad in ["-x", "a_b", "a..b", "x-", "a b", &"a".repeat(64)] {
        check_fails("hostname", &[("HOSTNAME", bad)], "not a valid host name");
    }
}

#[test]
fn fstab_script() {
    let d = tempfile::tempdir().unwrap();
    let t = etc_tree(d.path());
    write(
        &t.join("etc/fstab"),
        b"# rootfs\n/dev/vdb1 /srv/ ext4 defaults 0 2\nproc /proc proc defaults 0 0\n",
    );
    let entries = "UUID=1111-2222 /srv ext4 defaults 0 2\n\n# note\ntmpfs /tmp tmpfs mode=1777 0 0";
    configure_ok("fstab", &t, &[("FSTAB_ENTRIES", entries)]);
    let want = "# rootfs\n# Replaced by the fstab extension: /dev/vdb1 /srv/ ext4 defaults 0 2\n\
                proc /proc proc defaults 0 0\n# Added by the fstab extension\n\
                UUID=1111-2222 /srv ext4 defaults 0 2\ntmpfs /tmp tmpfs mode=1777 0 0\n";
    assert_eq!(read(&t.join("etc/fstab")), want);
    // Idempotent.
    configure_ok("fstab", &t, &[("FSTAB_ENTRIES", entries)]);
    assert_eq!(read(&t.join("etc/fstab")), want);
    // No fstab at all: created.
    std::fs::remove_file(t.join("etc/fstab")).unwrap();
    configure_ok("fstab", &t, &[("FSTAB_ENTRIES", "a /b c d")]);
    assert_eq!(
        read(&t.join("etc/fstab")),
        "# Added by the fstab extension\na /b c d\n"
    );
    check_fails("fstab", &[], "FSTAB_ENTRIES is not set");
    check_fails(
        "fstab",
        &[("FSTAB_ENTRIES", "a /b")],
        "expected SPEC MOUNTPOINT",
    );
    check_fails("fstab", &[("FSTAB_ENTRIES", "a b c d")], "absolute path");
    check_fails("fstab", &[("FSTAB_ENTRIES", "a /b c d x")], "numbers");
    check_fails(
        "fstab",
        &[("FSTAB_ENTRIES", "a /b c d\ne /b/ f g")],
        "/b is mounted twice",
    );
    check_fails("fstab", &[("FSTAB_ENTRIES", "# only\n")], "no entry");
}

#[test]
fn ssh_keys_script() {
    let d = tempfile::tempdir().unwrap();
    let t = etc_tree(d.path());
    let keys = format!("{KEY1}\n# comment\nfrom=\"10.0.0.0/8\" {KEY2}\n");
    configure_ok("ssh-keys", &t, &[("SSH_AUTHORIZED_KEYS", &keys)]);
    let ak = t.join("root/.ssh/authorized_keys");
    assert_eq!(read(&ak), keys);
    assert_eq!(owner_mode(&t.join("root")).2 & 0o7777, 0o700);
    assert_eq!(owner_mode(&t.join("root/.ssh")).2 & 0o7777, 0o700);
    assert_eq!(owner_mode(&ak), (0, 0, 0o100600));
    // Existing keys kept, only new ones appended.
    write(&ak, format!("{KEY2}\n").as_bytes());
    configure_ok("ssh-keys", &t, &[("SSH_AUTHORIZED_KEYS", KEY1)]);
    assert_eq!(read(&ak), format!("{KEY2}\n{KEY1}\n"));
    // Another user: their home and ids from the tree's passwd.
    configure_ok(
        "ssh-keys",
        &t,
        &[("SSH_AUTHORIZED_KEYS", KEY1), ("SSH_KEYS_USER", "user")],
    );
    let uk = t.join("home/user/.ssh/authorized_keys");
    assert_eq!(owner_mode(&uk), (1000, 1000, 0o100600));
    assert_eq!(owner_mode(&t.join("home/user/.ssh")), (1000, 1000, 0o40700));
    configure_fails(
        "ssh-keys",
        &t,
        &[("SSH_AUTHORIZED_KEYS", KEY1), ("SSH_KEYS_USER", "ghost")],
        "user ghost does not exist",
    );
    check_fails("ssh-keys", &[], "SSH_AUTHORIZED_KEYS is not set");
    check_fails(
        "ssh-keys",
        &[("SSH_AUTHORIZED_KEYS", "not a key at all")],
        "line 1 is not a public key",
    );
    let private =
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n";
    let out = run_script("ssh-keys.check", None, &[("SSH_AUTHORIZED_KEYS", private)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PRIVATE key"),
        "{err}"
    );
    assert!(!err.contains("b3BlbnNz"), "key material echoed: {err}");
    check_fails(
        "ssh-keys",
        &[("SSH_AUTHORIZED_KEYS", KEY1), ("SSH_KEYS_USER", "Bad Name")],
        "not a valid user name",
    );
    // 32 characters, as documented (and as useradd allows); 33 are too many.
    let name32 = format!("u{}", "2".repeat(31));
    check_ok(
        "ssh-keys",
        &[("SSH_AUTHORIZED_KEYS", KEY1), ("SSH_KEYS_USER", &name32)],
    );
    check_fails(
        "ssh-keys",
        &[
            ("SSH_AUTHORIZED_KEYS", KEY1),
            ("SSH_KEYS_USER", &format!("{name32}3")),
        ],
        "not a valid user name",
    );
}

#[test]
fn users_script() {
    let d = tempfile::tempdir().unwrap();
    let t = etc_tree(d.path());
    write(&t.join("etc/skel/.profile"), b"# skel\n");
    write(
        &t.join("etc/gshadow"),
        b"root:*::\naudio:*::user\nwheel:*::\n",
    );
    configure_ok(
        "users",
        &t,
        &[
            ("USERS_NAME", "alice"),
            ("USERS_GROUPS", "audio, wheel"),
            ("USERS_PASSWORD_HASH", HASH),
        ],
    );
    let passwd = read(&t.join("etc/passwd"));
    assert!(
        passwd.ends_with("alice:x:1001:1001::/home/alice:/bin/sh\n"),
        "{passwd}"
    );
    let group = read(&t.join("etc/group"));
    assert!(group.contains("audio:x:29:user,alice\n"), "{group}");
    assert!(group.contains("wheel:x:10:alice\n"), "{group}");
    assert!(group.ends_with("alice:x:1001:\n"), "{group}");
    let shadow = read(&t.join("etc/shadow"));
    // No "last changed" day for a new entry: nothing depends on the date
    // (and not 0, which would force a password change at the first login).
    assert!(
        shadow.ends_with(&format!("\nalice:{HASH}::0:99999:7:::\n")),
        "{shadow}"
    );
    assert_eq!(owner_mode(&t.join("etc/shadow")), (0, 42, 0o100640));
    let gshadow = read(&t.join("etc/gshadow"));
    assert!(gshadow.contains("audio:*::user,alice\n") && gshadow.ends_with("alice:!::\n"));
    assert_eq!(owner_mode(&t.join("home/alice")), (1001, 1001, 0o40750));
    assert_eq!(
        owner_mode(&t.join("home/alice/.profile")).0,
        1001,
        "skel not copied with the owner"
    );
    // Fixed uid, no hash: a locked account.
    configure_ok("users", &t, &[("USERS_NAME", "bob"), ("USERS_UID", "2000")]);
    assert!(read(&t.join("etc/passwd")).contains("bob:x:2000:2000::/home/bob:/bin/sh\n"));
    assert!(read(&t.join("etc/shadow")).contains("\nbob:!:"));
    // Existing user: updated, not duplicated.
    configure_ok(
        "users",
        &t,
        &[("USERS_NAME", "bob"), ("USERS_PASSWORD_HASH", HASH)],
    );
    assert_eq!(
        read(&t.join("etc/passwd"))
            .lines()
            .filter(|l| l.starts_with("bob:"))
            .count(),
        1
    );
    assert!(read(&t.join("etc/shadow")).contains(&format!("\nbob:{HASH}::0:99999:7:::\n")));
    // An entry of the rootfs gets the hash and keeps its other fields.
    configure_ok(
        "users",
        &t,
        &[("USERS_NAME", "user"), ("USERS_PASSWORD_HASH", HASH)],
    );
    assert!(read(&t.join("etc/shadow")).contains(&format!("\nuser:{HASH}:19000:0:99999:7:::\n")));
    // User names of 32 characters, as documented.
    let name32 = format!("a{}", "b".repeat(30)) + "c";
    assert_eq!(name32.len(), 32);
    configure_ok("users", &t, &[("USERS_NAME", &name32)]);
    assert!(read(&t.join("etc/passwd")).contains(&format!("\n{name32}:x:")));
    check_ok("users", &[("USERS_NAME", &format!("{}$", &name32[..31]))]);
    check_fails(
        "users",
        &[("USERS_NAME", &format!("{name32}d"))],
        "not a valid user name",
    );
    check_fails(
        "users",
        &[("USERS_NAME", &format!("{name32}$"))],
        "not a valid user name",
    );
    configure_fails(
        "users",
        &t,
        &[("USERS_NAME", "bob"), ("USERS_UID", "2001")],
        "already exists",
    );
    configure_fails(
        "users",
        &t,
        &[("USERS_NAME", "carol"), ("USERS_UID", "1000")],
        "uid 1000 is already used",
    );
    configure_fails(
        "users",
        &t,
        &[("USERS_NAME", "carol"), ("USERS_GROUPS", "nosuch")],
        "group nosuch does not exist",
    );
    check_fails("users", &[], "USERS_NAME is not set");
    check_fails("users", &[("USERS_NAME", "Alice")], "not a valid user name");
    check_fails(
        "users",
        &[("USERS_NAME", "a"), ("USERS_UID", "x1")],
        "not a number",
    );
    check_fails(
        "users",
        &[("USERS_NAME", "a"), ("USERS_PASSWORD_HASH", "hunter2")],
        "not a crypt(3) hash",
    );
    check_fails(
        "users",
        &[("USERS_NAME", "a"), ("USERS_SHELL", "bash")],
        "absolute path",
    );
}

/// A folder with a `date` that answers as if it were 40 days later (to put
/// first in PATH: a deploy "on another day").
fn another_day(dir: &Path) -> String {
    let bin = dir.join("another-day");
    let real = ["/usr/bin/date", "/bin/date"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    write(
        &bin.join("date"),
        format!(
            "#!/bin/sh\ncase \" $* \" in\n\
             *\" -d\"* | *\" --date\"* | *\" -r\"* | *\" --reference\"* | *\" -s\"* | *\" --set\"*) exec {real} \"$@\" ;;\n\
             esac\nexec {real} -d \"@$(( $({real} +%s) + 40 * 86400 ))\" \"$@\"\n"
        )
        .as_bytes(),
    );
    chmod(&bin.join("date"), 0o755);
    let path = format!("{}:{STD_PATH}", bin.display());
    // The fake works.
    let later: u64 = sh(&format!("PATH={path} date +%s")).trim().parse().unwrap();
    let now: u64 = sh("date +%s").trim().parse().unwrap();
    assert!(later >= now + 39 * 86400, "{later} {now}");
    path
}

#[test]
fn users_script_writes_the_same_shadow_on_any_day() {
    let d = tempfile::tempdir().unwrap();
    let later = another_day(d.path());
    let mut shadows = Vec::new();
    for (i, path) in [STD_PATH, &later].into_iter().enumerate() {
        let t = etc_tree(&d.path().join(i.to_string()));
        for env in [
            vec![("USERS_NAME", "alice"), ("USERS_PASSWORD_HASH", HASH)],
            vec![("USERS_NAME", "bob")],
            vec![("USERS_NAME", "user"), ("USERS_PASSWORD_HASH", HASH)],
        ] {
            let mut env = env.clone();
            env.push(("PATH", path));
            configure_ok("users", &t, &env);
        }
        shadows.push(read(&t.join("etc/shadow")));
    }
    assert_eq!(shadows[0], shadows[1]);
}

#[test]
fn network_script() {
    let d = tempfile::tempdir().unwrap();
    let t = etc_tree(d.path());
    configure_ok(
        "network",
        &t,
        &[
            ("NETWORK_INTERFACES", "eth0 en*"),
            ("NETWORK_DNS", "1.1.1.1 2606:4700::1111"),
        ],
    );
    let dir = t.join("etc/systemd/network");
    assert_eq!(
        read(&dir.join("10-eth0.network")),
        "# Written by the btrfs-deploy network extension.\n[Match]\nName=eth0\n\n\
         [Network]\nDHCP=yes\nDNS=1.1.1.1\nDNS=2606:4700::1111\n"
    );
    assert!(read(&dir.join("10-en_.network")).contains("Name=en*\n"));
    configure_ok(
        "network",
        &t,
        &[
            ("NETWORK_INTERFACES", "eth1"),
            ("NETWORK_MODE", "static"),
            ("NETWORK_ADDRESS", "192.168.1.10/24 fd00::10/64"),
            ("NETWORK_GATEWAY", "192.168.1.1"),
        ],
    );
    assert!(read(&dir.join("10-eth1.network")).ends_with(
        "[Network]\nAddress=192.168.1.10/24\nAddress=fd00::10/64\nGateway=192.168.1.1\n"
    ));
    check_fails("network", &[], "NETWORK_INTERFACES is not set");
    let s = |m: &'static str, a: &'static str| {
        [
            ("NETWORK_INTERFACES", "eth0"),
            ("NETWORK_MODE", m),
            ("NETWORK_ADDRESS", a),
        ]
    };
    check_fails("network", &s("dchp", ""), "dhcp or static");
    check_fails("network", &s("static", ""), "needs NETWORK_ADDRESS");
    check_fails("network", &s("static", "10.0.0.300/24"), "NETWORK_ADDRESS");
    check_fails("network", &s("static", "10.0.0.3"), "prefix length");
    // A real parser, not a regex: each valid value next to invalid ones
    // that look like it.
    for ok in [
        "10.0.2.15/24",
        "10.0.2.0/32",
        "10.0.2.15/0",
        "2001:db8::10/64",
        "::ffff:10.0.2.15/128",
        "1::/64",
        "fd00::1:2:3:4:5:6/64",
        "10.0.2.15/24 fd00::10/64",
    ] {
        check_ok("network", &s("static", ok));
    }
    for (bad, needle) in [
        ("10.0.2.015/24", "not an IPv4 address"),
        ("010.0.2.15/24", "not an IPv4 address"),
        (
            "10.0.2.15/33",
            "prefix length must be a number from 0 to 32",
        ),
        ("10.0.2.15/024", "prefix length must be a number"),
        ("10.0.2.15/", "prefix length must be a number"),
        ("1:::2/64", "not an IPv6 address"),
        (":1:2:3:4:5:6:7/64", "not an IPv6 address"),
        ("1:2:3:4:5:6:7:/64", "not an IPv6 address"),
        ("1::2::3/64", "not an IPv6 address"),
        ("1:2:3:4:5:6:7:8:9/64", "not an IPv6 address"),
        (
            "fd00::1/129",
            "prefix length must be a number from 0 to 128",
        ),
        ("fe80::1%eth0/64", "zone index"),
        ("0.0.0.0/8", "unspecified"),
        ("10.0.2.15/24 1:::2/64", "'1:::2'"),
    ] {
        check_fails("network", &s("static", bad), needle);
        check_fails("network", &s("static", bad), "NETWORK_ADDRESS: ");
    }
    let gw = |g: &'static str| {
        [
            ("NETWORK_INTERFACES", "eth0"),
            ("NETWORK_MODE", "static"),
            ("NETWORK_ADDRESS", "10.0.2.15/24"),
            ("NETWORK_GATEWAY", g),
        ]
    };
    check_ok("network", &gw("10.0.2.2"));
    check_ok("network", &gw("fe80::1"));
    for bad in ["10.0.2.02", "10.0.2.2/24", "1:::2", "224.0.0.1"] {
        check_fails("network", &gw(bad), "NETWORK_GATEWAY: ");
    }
    let dns = |v: &'static str| [("NETWORK_INTERFACES", "eth0"), ("NETWORK_DNS", v)];
    check_ok("network", &dns("1.1.1.1 2606:4700::1111 ::ffff:8.8.8.8"));
    for bad in [
        "1.1.1.01",
        "1.1.1.1/32",
        ":1:2:3:4:5:6:7",
        "2606:4700:::1111",
        "ff02::fb",
    ] {
        check_fails("network", &dns(bad), "NETWORK_DNS: ");
    }
    // The check needs the deploy executable that parses addresses: without
    // it, it says so (it never lets a value through unchecked).
    check_fails(
        "network",
        &[
            ("NETWORK_INTERFACES", "eth0"),
            ("NETWORK_DNS", "1.1.1.1"),
            ("DEPLOY_RUN_IN_TREE", ""),
        ],
        "DEPLOY_RUN_IN_TREE",
    );
    // Two interfaces (or patterns) that would share one file are refused.
    check_fails(
        "network",
        &[("NETWORK_INTERFACES", "en* en?")],
        "'en*' and 'en?' would both be written to /etc/systemd/network/10-en_.network",
    );
    check_fails(
        "network",
        &[("NETWORK_INTERFACES", "eth0 eth1 eth0")],
        "'eth0' is listed twice",
    );
    check_ok("network", &[("NETWORK_INTERFACES", "en* eth0 wl?")]);
    check_fails("network", &s("dhcp", "10.0.0.3/8"), "NETWORK_MODE is dhcp");
    check_fails(
        "network",
        &[
            ("NETWORK_INTERFACES", "eth0"),
            ("NETWORK_DNS", "dns.example"),
        ],
        "NETWORK_DNS",
    );
    check_fails(
        "network",
        &[
            ("NETWORK_INTERFACES", "eth0 eth1"),
            ("NETWORK_MODE", "static"),
            ("NETWORK_ADDRESS", "10.0.0.3/8"),
        ],
        "exactly one interface",
    );
}

#[test]
fn network_dns_reaches_the_resolver_the_tree_uses() {
    let d = tempfile::tempdir().unwrap();
    let dns = [
        ("NETWORK_INTERFACES", "eth0"),
        ("NETWORK_DNS", "192.0.2.53 2001:db8::53"),
    ];
    let header = "# Written by the btrfs-deploy network extension (NETWORK_DNS).\n";

    // No systemd-resolved (a stock minimal Debian 12): /etc/resolv.conf,
    // keeping the rootfs's other lines, replacing its nameservers.
    let t = etc_tree(&d.path().join("plain"));
    write(
        &t.join("etc/resolv.conf"),
        b"search example.org\nnameserver 10.9.9.9\noptions edns0\n",
    );
    chmod(&t.join("etc/resolv.conf"), 0o644);
    let out = configure_ok("network", &t, &dns);
    assert!(out.contains("/etc/resolv.conf"), "{out}");
    let want = format!(
        "{header}search example.org\noptions edns0\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"
    );
    assert_eq!(read(&t.join("etc/resolv.conf")), want);
    assert_eq!(owner_mode(&t.join("etc/resolv.conf")), (0, 0, 0o100644));
    // Idempotent.
    configure_ok("network", &t, &dns);
    assert_eq!(read(&t.join("etc/resolv.conf")), want);
    // The .network file has them too (for when resolved is added later).
    assert!(read(&t.join("etc/systemd/network/10-eth0.network"))
        .ends_with("DNS=192.0.2.53\nDNS=2001:db8::53\n"));
    // No resolv.conf at all: created.
    std::fs::remove_file(t.join("etc/resolv.conf")).unwrap();
    configure_ok("network", &t, &dns);
    assert_eq!(
        read(&t.join("etc/resolv.conf")),
        format!("{header}nameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    );
    // More than glibc's 3 servers would be silently cut: refused.
    configure_fails(
        "network",
        &t,
        &[
            ("NETWORK_INTERFACES", "eth0"),
            ("NETWORK_DNS", "192.0.2.1 192.0.2.2 192.0.2.3 192.0.2.4"),
        ],
        "3 at most",
    );
    // Without NETWORK_DNS, resolv.conf is left alone.
    configure_ok("network", &t, &[("NETWORK_INTERFACES", "eth0")]);
    assert!(read(&t.join("etc/resolv.conf")).contains("nameserver 192.0.2.53\n"));

    // A link out of the tree (hostile, or a host path): never followed,
    // replaced by a file in the tree.
    let t = etc_tree(&d.path().join("hostile"));
    let host = d.path().join("host-resolv.conf");
    write(&host, b"nameserver 10.0.0.1\n");
    symlink(&host, t.join("etc/resolv.conf")).unwrap();
    configure_ok("network", &t, &dns);
    assert_eq!(read(&host), "nameserver 10.0.0.1\n");
    assert!(!std::fs::symlink_metadata(t.join("etc/resolv.conf"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(read(&t.join("etc/resolv.conf"))
        .ends_with("nameserver 192.0.2.53\nnameserver 2001:db8::53\n"));
    // A link to itself does not stop it either.
    let t = etc_tree(&d.path().join("loop"));
    symlink("/etc/resolv.conf", t.join("etc/resolv.conf")).unwrap();
    configure_ok("network", &t, &dns);
    assert!(read(&t.join("etc/resolv.conf")).starts_with(header));

    // systemd-resolved in the tree, owning /etc/resolv.conf: DNS= is what
    // it reads; the link stays, and more than 3 servers are fine.
    let t = etc_tree(&d.path().join("resolved"));
    write(&t.join("usr/lib/systemd/systemd-resolved"), b"\x7fELF");
    symlink("usr/lib", t.join("lib")).unwrap();
    symlink(
        "../run/systemd/resolve/stub-resolv.conf",
        t.join("etc/resolv.conf"),
    )
    .unwrap();
    let many = [
        ("NETWORK_INTERFACES", "eth0"),
        ("NETWORK_DNS", "192.0.2.1 192.0.2.2 192.0.2.3 192.0.2.4"),
    ];
    let out = configure_ok("network", &t, &many);
    assert!(out.contains("systemd-resolved"), "{out}");
    assert_eq!(
        std::fs::read_link(t.join("etc/resolv.conf")).unwrap(),
        Path::new("../run/systemd/resolve/stub-resolv.conf")
    );
    assert!(read(&t.join("etc/systemd/network/10-eth0.network")).contains("DNS=192.0.2.4\n"));
    assert!(!t.join("run").exists());
    // The same link without systemd-resolved installed would dangle: replaced.
    let t = etc_tree(&d.path().join("dangling"));
    symlink(
        "../run/systemd/resolve/stub-resolv.conf",
        t.join("etc/resolv.conf"),
    )
    .unwrap();
    let out = run_script("network.configure", Some(&t), &dns);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no systemd-resolved"));
    assert!(read(&t.join("etc/resolv.conf")).ends_with("nameserver 2001:db8::53\n"));
}

/// A tree with unit files like a merged-/usr Debian.
fn units_tree(dir: &Path) -> PathBuf {
    let t = etc_tree(dir);
    let u = t.join("usr/lib/systemd/system");
    write(
        &u.join("foo.service"),
        b"[Unit]\nDescription=foo\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\nAlias=foo-alias.service\nAlso=foo.socket\n",
    );
    write(
        &u.join("foo.socket"),
        b"[Socket]\nListenStream=1234\n[Install]\nWantedBy=sockets.target\n",
    );
    write(
        &u.join("getty@.service"),
        b"[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=getty.target\nDefaultInstance=tty1\n",
    );
    write(
        &u.join("bar.service"),
        b"[Service]\nExecStart=/bin/true\n[Install]\nRequiredBy=graphical.target\n",
    );
    symlink("usr/lib", t.join("lib")).unwrap();
    t
}

fn links_under(t: &Path) -> Vec<String> {
    let base = t.join("etc/systemd/system");
    let mut out = Vec::new();
    for e in walk(&base) {
        if let Ok(target) = std::fs::read_link(&e) {
            // systemctl may pick /lib/systemd/system (lib -> usr/lib): same file.
            let target = target.display().to_string();
            let target = match target.strip_prefix("/lib/") {
                Some(rest) => format!("/usr/lib/{rest}"),
                None => target,
            };
            out.push(format!(
                "{} -> {}",
                e.strip_prefix(&base).unwrap().display(),
                target
            ));
        }
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                v.extend(walk(&p));
            }
            v.push(p);
        }
    }
    v
}

#[test]
fn systemd_units_script_links_and_systemctl_agree() {
    let d = tempfile::tempdir().unwrap();
    let settings = [
        (
            "SYSTEMD_ENABLE",
            "foo getty@.service getty@ttyS0.service bar",
        ),
        ("SYSTEMD_MASK", "apt-daily.timer"),
    ];
    let want = [
        "apt-daily.timer -> /dev/null",
        "foo-alias.service -> /usr/lib/systemd/system/foo.service",
        "getty.target.wants/getty@tty1.service -> /usr/lib/systemd/system/getty@.service",
        "getty.target.wants/getty@ttyS0.service -> /usr/lib/systemd/system/getty@.service",
        "graphical.target.requires/bar.service -> /usr/lib/systemd/system/bar.service",
        "multi-user.target.wants/foo.service -> /usr/lib/systemd/system/foo.service",
        "sockets.target.wants/foo.socket -> /usr/lib/systemd/system/foo.socket",
    ];
    let mut methods = vec!["links"];
    if Command::new("systemctl").arg("--version").output().is_ok() {
        methods.push("systemctl");
    }
    for method in methods {
        let t = units_tree(&d.path().join(method));
        let mut env = settings.to_vec();
        env.push(("SYSTEMD_UNITS_METHOD", method));
        configure_ok("systemd-units", &t, &env);
        assert_eq!(links_under(&t), want, "method {method}");
        configure_ok(
            "systemd-units",
            &t,
            &[
                ("SYSTEMD_DISABLE", "foo getty@.service"),
                ("SYSTEMD_UNITS_METHOD", method),
            ],
        );
        assert_eq!(
            links_under(&t),
            [
                "apt-daily.timer -> /dev/null",
                "graphical.target.requires/bar.service -> /usr/lib/systemd/system/bar.service",
            ],
            "method {method}"
        );
        configure_fails(
            "systemd-units",
            &t,
            &[
                ("SYSTEMD_ENABLE", "missing"),
                ("SYSTEMD_UNITS_METHOD", method),
            ],
            "missing.service",
        );
    }
    check_fails("systemd-units", &[], "none of SYSTEMD_ENABLE");
    check_fails(
        "systemd-units",
        &[("SYSTEMD_ENABLE", "a/b")],
        "is not a unit name",
    );
    check_fails(
        "systemd-units",
        &[("SYSTEMD_ENABLE", "ssh"), ("SYSTEMD_MASK", "ssh.service")],
        "more than once",
    );
    check_fails(
        "systemd-units",
        &[("SYSTEMD_ENABLE", "ssh"), ("SYSTEMD_UNITS_METHOD", "magic")],
        "auto, systemctl or links",
    );
}

/// A manifest folder: a template, a plain file, and the manifest.
fn manifest(dir: &Path) -> PathBuf {
    let m = dir.join("site");
    write(
        &m.join("files/app.conf.in"),
        b"name=${APP_NAME}\nversion=${DEPLOY_VERSION}\nsecret=${DB_PASSWORD}\nkeep=$${NOT_A_VAR} $PLAIN\n",
    );
    write(&m.join("files/blob.bin"), b"\x00\x01binary\xff");
    write(
        &m.join("manifest"),
        b"# SRC DEST MODE OWNER GROUP [template]\n\
          files/app.conf.in  /etc/app/app.conf  0640  root  user  template\n\
          \n\
          files/blob.bin     /opt/app/blob.bin  4755  user  1000\n",
    );
    m
}

#[test]
fn install_files_script() {
    let d = tempfile::tempdir().unwrap();
    let t = etc_tree(d.path());
    let m = manifest(d.path());
    let env = [
        ("INSTALL_FILES_MANIFEST", "manifest"),
        ("DEPLOY_CONFIG_DIR", m.to_str().unwrap()),
        ("APP_NAME", "shop"),
        ("DEPLOY_VERSION", "v9"),
        ("DB_PASSWORD", "p@ss$1\\n"),
    ];
    configure_ok("install-files", &t, &env);
    assert_eq!(
        read(&t.join("etc/app/app.conf")),
        "name=shop\nversion=v9\nsecret=p@ss$1\\n\nkeep=${NOT_A_VAR} $PLAIN\n"
    );
    assert_eq!(owner_mode(&t.join("etc/app/app.conf")), (0, 1000, 0o100640));
    assert_eq!(owner_mode(&t.join("etc/app")), (0, 0, 0o40755));
    assert_eq!(
        std::fs::read(t.join("opt/app/blob.bin")).unwrap(),
        b"\x00\x01binary\xff"
    );
    assert_eq!(
        owner_mode(&t.join("opt/app/blob.bin")),
        (1000, 1000, 0o104755)
    );
    check_ok("install-files", &env);
    // A template variable that is not set is found by the check.
    check_fails("install-files", &env[..4], "${DB_PASSWORD} is not set");
    check_fails("install-files", &[], "INSTALL_FILES_MANIFEST is not set");
    let bad = |line: &str, needle: &str| {
        write(&m.join("bad"), line.as_bytes());
        let p = m.join("bad");
        check_fails(
            "install-files",
            &[("INSTALL_FILES_MANIFEST", p.to_str().unwrap())],
            needle,
        );
    };
    bad("files/none /x 0644 root root\n", "does not exist");
    bad("files/blob.bin x 0644 root root\n", "absolute path");
    bad("files/blob.bin /x/../y 0644 root root\n", ". or ..");
    bad("files/blob.bin /x 0844 root root\n", "octal mode");
    bad(
        "files/blob.bin /x 0644 root\n",
        "expected SRC DEST MODE OWNER GROUP",
    );
    bad(
        "files/blob.bin /x 0644 root root tmpl\n",
        "only be 'template'",
    );
    bad("# nothing\n", "lists no file");
    write(&m.join("bad"), b"files/blob.bin /x 0644 ghost root\n");
    configure_fails(
        "install-files",
        &t,
        &[("INSTALL_FILES_MANIFEST", m.join("bad").to_str().unwrap())],
        "user ghost does not exist",
    );
}

// ---------------------------------------------------------------------------
// The real binary on real images.
// ---------------------------------------------------------------------------

/// A copy of the tiny system (busybox, passwd/group/shadow) plus a unit file.
fn tiny_copy(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    sh(&format!(
        "cp -a {} {}",
        tiny_rootfs().display(),
        root.display()
    ));
    write(
        &root.join("usr/lib/systemd/system/demo.service"),
        b"[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
    );
    root
}

/// Runs `deploy` in `cwd`.
fn run_in(cwd: &Path, args: &[&str]) -> Output {
    let out = deploy().current_dir(cwd).args(args).output().unwrap();
    eprintln!(
        "(in {}) deploy {}\n--- status {:?}\n--- stdout\n{}--- stderr\n{}",
        cwd.display(),
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn deployment_json(m: &Inspect, label: &str) -> serde_json::Value {
    serde_json::from_str(&read(&m.path(&format!("systems/{label}/deployment.json")))).unwrap()
}

fn subvolumes(m: &Inspect) -> String {
    sh(&format!("btrfs subvolume list {}", m.top().display()))
}

fn assert_not_created(img: &Path) {
    assert!(!img.exists(), "{} was created", img.display());
    assert_no_leftovers(img, false);
}

#[test]
fn all_shipped_extensions_customise_a_deployed_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tiny_copy(tmp.path(), "rootfs");
    let m = manifest(tmp.path());
    let img = tmp.path().join("disk.img");
    let manifest_path = m.join("manifest");
    let keys = format!("{KEY1}\n{KEY2}");
    let sets = [
        "HOSTNAME=custom.example.org".to_string(),
        "USERS_NAME=alice".into(),
        "USERS_GROUPS=shadow".into(),
        format!("USERS_PASSWORD_HASH={HASH}"),
        format!("SSH_AUTHORIZED_KEYS={keys}"),
        "NETWORK_INTERFACES=eth0".into(),
        "NETWORK_MODE=static".into(),
        "NETWORK_ADDRESS=10.1.2.3/24".into(),
        "NETWORK_GATEWAY=10.1.2.1".into(),
        "NETWORK_DNS=10.1.2.53".into(),
        "SYSTEMD_ENABLE=demo".into(),
        "SYSTEMD_MASK=getty@tty1.service".into(),
        "SYSTEMD_UNITS_METHOD=links".into(),
        "FSTAB_ENTRIES=tmpfs /tmp tmpfs mode=1777 0 0".into(),
        format!("INSTALL_FILES_MANIFEST={}", manifest_path.display()),
        "APP_NAME=shop".into(),
        "DB_PASSWORD=hunter2-secret".into(),
    ];
    let mut args: Vec<String> = vec![
        "--rootfs".into(),
        rootfs.to_str().unwrap().into(),
        "--size".into(),
        "660M".into(),
    ];
    for e in [
        "users",
        "hostname",
        "ssh-keys",
        "network",
        "systemd-units",
        "fstab",
        "install-files",
    ] {
        args.extend(["-e".into(), e.into()]);
    }
    for s in &sets {
        args.extend(["--set".into(), s.clone()]);
    }
    args.push(img.to_str().unwrap().into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok(&argv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Each extension is announced once, as it runs (its lines under it).
    for e in SHIPPED {
        let step = format!("==> Running extension {e}\n");
        assert_eq!(stderr.matches(&step).count(), 1, "{step}{stderr}");
    }
    assert!(
        stderr.contains("==> Running extension network\n    network: eth0: static"),
        "{stderr}"
    );
    // Secrets never reach the output either.
    assert!(!stderr.contains("hunter2-secret") && !stderr.contains(HASH));
    assert_no_leftovers(&img, false);

    let m = Inspect::open(&img);
    let orig = m.path("systems/factory/orig");
    let run = m.path("systems/factory/run");
    // hostname
    assert_eq!(read(&orig.join("etc/hostname")), "custom.example.org\n");
    assert!(read(&orig.join("etc/hosts")).contains("127.0.1.1\tcustom.example.org custom\n"));
    assert_eq!(read(&run.join("etc/hostname")), "custom.example.org\n");
    // users: passwd in the version, home moved to /state/home.
    assert!(read(&orig.join("etc/passwd")).contains("alice:x:1001:1001::/home/alice:/bin/sh\n"));
    assert!(read(&orig.join("etc/group")).contains("shadow:x:42:alice\n"));
    assert!(read(&orig.join("etc/shadow")).contains(&format!("alice:{HASH}:")));
    assert_eq!(
        owner_mode(&m.path("state/home/alice")),
        (1001, 1001, 0o40750)
    );
    assert!(m.path("state/home/user/hello.txt").exists());
    // ssh-keys: root's keys moved with /root to /state/root.
    let ak = m.path("state/root/.ssh/authorized_keys");
    assert_eq!(read(&ak), format!("{KEY1}\n{KEY2}\n"));
    assert_eq!(owner_mode(&ak), (0, 0, 0o100600));
    assert_eq!(owner_mode(&m.path("state/root/.ssh")).2, 0o40700);
    // The version keeps its vendor copy of /root (the state merge's base).
    assert_eq!(
        read(&orig.join("root/.ssh/authorized_keys")),
        format!("{KEY1}\n{KEY2}\n")
    );
    // network
    assert!(read(&orig.join("etc/systemd/network/10-eth0.network"))
        .contains("Address=10.1.2.3/24\nGateway=10.1.2.1\nDNS=10.1.2.53\n"));
    // The tiny system has no systemd-resolved: its resolver reads resolv.conf.
    assert!(read(&orig.join("etc/resolv.conf")).ends_with("\nnameserver 10.1.2.53\n"));
    // systemd-units
    assert_eq!(
        std::fs::read_link(orig.join("etc/systemd/system/multi-user.target.wants/demo.service"))
            .unwrap(),
        Path::new("/usr/lib/systemd/system/demo.service")
    );
    assert_eq!(
        std::fs::read_link(orig.join("etc/systemd/system/getty@tty1.service")).unwrap(),
        Path::new("/dev/null")
    );
    // fstab: the extension's line under its comment; the tool's `/` before
    // it (mount -a order), the state directories after it.
    let fstab = read(&orig.join("etc/fstab"));
    let ext_at = fstab
        .find("# Added by the fstab extension\ntmpfs /tmp tmpfs mode=1777 0 0\n")
        .unwrap();
    let root_at = fstab.find(" / btrfs ").unwrap();
    let state_at = fstab.find("subvol=/state/").unwrap();
    assert!(root_at < ext_at && ext_at < state_at, "{fstab}");
    // install-files, with the template rendered (secrets included in files).
    let conf = orig.join("etc/app/app.conf");
    assert_eq!(
        read(&conf),
        "name=shop\nversion=factory\nsecret=hunter2-secret\nkeep=${NOT_A_VAR} $PLAIN\n"
    );
    assert_eq!(owner_mode(&conf), (0, 1000, 0o100640));
    // /opt copied to /state/opt with the installed file.
    assert_eq!(
        owner_mode(&m.path("state/opt/app/blob.bin")),
        (1000, 1000, 0o104755)
    );
    // deployment.json: extensions in order, settings without secrets.
    let dep = deployment_json(&m, "factory");
    assert_eq!(
        dep["extensions"],
        serde_json::json!([
            "users",
            "hostname",
            "ssh-keys",
            "network",
            "systemd-units",
            "fstab",
            "install-files"
        ])
    );
    let settings = dep["settings"].as_object().unwrap();
    assert_eq!(settings["HOSTNAME"], "custom.example.org");
    assert_eq!(settings["APP_NAME"], "shop");
    assert!(!settings.contains_key("USERS_PASSWORD_HASH"));
    assert!(!settings.contains_key("DB_PASSWORD"));
    let text = read(&m.path("systems/factory/deployment.json"));
    assert!(
        !text.contains("hunter2-secret") && !text.contains(HASH),
        "{text}"
    );
}

#[test]
fn each_check_rejects_bad_settings_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tiny_copy(tmp.path(), "rootfs");
    let img = tmp.path().join("disk.img");
    let manifest_dir = manifest(tmp.path());
    let bad_manifest = manifest_dir.join("bad-manifest");
    write(&bad_manifest, b"files/missing /etc/x 0644 root root\n");
    let cases: [(&str, &[&str], &str); 7] = [
        ("hostname", &["HOSTNAME=bad_name"], "not a valid host name"),
        (
            "install-files",
            &[&format!(
                "INSTALL_FILES_MANIFEST={}",
                bad_manifest.display()
            )],
            "does not exist",
        ),
        (
            "fstab",
            &["FSTAB_ENTRIES=UUID=1 srv ext4"],
            "FSTAB_ENTRIES line 1",
        ),
        (
            "ssh-keys",
            &["SSH_AUTHORIZED_KEYS=hello"],
            "not a public key",
        ),
        ("systemd-units", &["SYSTEMD_ENABLE=a/b"], "not a unit name"),
        (
            "network",
            &[
                "NETWORK_INTERFACES=eth0",
                "NETWORK_MODE=static",
                "NETWORK_ADDRESS=10.0.0.1",
            ],
            "prefix length",
        ),
        (
            "users",
            &["USERS_NAME=alice", "USERS_PASSWORD_HASH=hunter2"],
            "not a crypt(3) hash",
        ),
    ];
    for (ext, sets, needle) in cases {
        let mut args = vec!["--rootfs", rootfs.to_str().unwrap(), "-e", ext];
        for s in sets {
            args.extend(["--set", s]);
        }
        args.push(img.to_str().unwrap());
        let stderr = run_fails(&args, 1, &[ext, needle]);
        assert!(!stderr.contains("hunter2"), "a secret was echoed: {stderr}");
        assert!(
            !stderr.contains("Copying"),
            "{ext}: the check ran too late:\n{stderr}"
        );
        assert_not_created(&img);
    }
    // An extension that does not exist, or is not executable.
    run_fails(
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "-e",
            "no-such-ext",
            img.to_str().unwrap(),
        ],
        1,
        &["no-such-ext", "not found", shipped_dir().to_str().unwrap()],
    );
    let mine = tmp.path().join("mine");
    write(&mine.join("plain.configure"), b"#!/bin/sh\n");
    run_fails(
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--extensions-dir",
            mine.to_str().unwrap(),
            "-e",
            "plain",
            img.to_str().unwrap(),
        ],
        1,
        &["plain", "not an executable"],
    );
    assert_not_created(&img);
}

/// Writes an executable `NAME.configure` (and optionally `.check`) to `dir`.
fn ext(dir: &Path, name: &str, configure: &str, check: Option<&str>) {
    let p = dir.join(format!("{name}.configure"));
    write(
        &p,
        format!("#!/bin/sh\n# summary: test {name}\n{configure}\n").as_bytes(),
    );
    chmod(&p, 0o755);
    if let Some(c) = check {
        let p = dir.join(format!("{name}.check"));
        write(&p, format!("#!/bin/sh\n{c}\n").as_bytes());
        chmod(&p, 0o755);
    }
}

#[test]
fn order_environment_and_run_in_tree_through_a_real_deploy() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tiny_copy(tmp.path(), "rootfs");
    let img = tmp.path().join("disk.img");
    let exts = tmp.path().join("exts");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Each one logs its name and what it sees; `second` runs a command
    // inside the tree through the helper.
    let log = out.join("log");
    ext(
        &exts,
        "first",
        &format!(
            "echo \"first $#\" >> {log}\n\
             env > {out}/first.env\n\
             grep -q 'Added by btrfs-deploy' \"$1/etc/fstab\" && echo 'fstab already completed' >> {log}\n\
             [ -f \"$1/home/user/hello.txt\" ] && echo 'home still in tree' >> {log}\n\
             cat > {out}/stdin\n\
             echo first-stdout; echo first-stderr >&2",
            log = log.display(),
            out = out.display()
        ),
        Some(&format!("echo \"check-first\" >> {}", log.display())),
    );
    ext(
        &exts,
        "second",
        &format!(
            "echo second >> {log}\n\
             \"$DEPLOY_RUN_IN_TREE\" run-in-tree \"$1\" -- /bin/sh -c \
               'ls /proc/1 > /dev/null && echo in-tree:$(cat /etc/hostname) > /inside; test -x /usr/sbin/policy-rc.d && echo policy >> /inside; sleep 1001 & exit 4'\n\
             echo \"helper exit $?\" >> {log}",
            log = log.display()
        ),
        Some(&format!("echo check-second >> {}", log.display())),
    );
    run_ok(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--no-bootloader",
        "--extensions-dir",
        exts.to_str().unwrap(),
        "-e",
        "second",
        "-e",
        "first",
        "--set",
        "MY_SETTING=a value",
        "--set",
        "API_TOKEN=tok",
        img.to_str().unwrap(),
    ]);
    assert_eq!(
        read(&log),
        "check-second\ncheck-first\nsecond\nhelper exit 4\nfirst 1\nhome still in tree\n"
    );
    assert_eq!(read(&out.join("stdin")), "");
    let env = read(&out.join("first.env"));
    let img_s = img.to_str().unwrap();
    for want in [
        "MY_SETTING=a value\n",
        "API_TOKEN=tok\n",
        "DEPLOY_VERSION=factory\n",
        "DEPLOY_UPGRADE=no\n",
        &format!("DEPLOY_TARGET={img_s}\n"),
        &format!("DEPLOY_RUN_IN_TREE={}\n", env!("CARGO_BIN_EXE_deploy")),
        "DEPLOY_EXTENSION=first\n",
        &format!("DEPLOY_EXTENSION_DIR={}\n", exts.display()),
    ] {
        assert!(env.contains(want), "env lacks {want:?}:\n{env}");
    }
    assert!(env.contains("DEPLOY_TREE=/"), "{env}");
    // The helper ran inside, left nothing running and nothing mounted.
    assert!(sh("ps -eo args").lines().all(|l| l.trim() != "sleep 1001"));
    assert_no_leftovers(&img, false);
    let m = Inspect::open(&img);
    let orig = m.path("systems/factory/orig");
    assert_eq!(read(&orig.join("inside")), "in-tree:tiny\npolicy\n");
    assert!(!orig.join("usr/sbin/policy-rc.d").exists());
    assert!(!orig.join("etc/resolv.conf").exists());
    assert!(std::fs::read_dir(orig.join("proc"))
        .unwrap()
        .next()
        .is_none());
    let dep = deployment_json(&m, "factory");
    assert_eq!(dep["extensions"], serde_json::json!(["second", "first"]));
    assert_eq!(dep["settings"]["MY_SETTING"], "a value");
    assert!(dep["settings"].get("API_TOKEN").is_none(), "{dep}");
}

#[test]
fn failing_extension_leaves_no_image_and_an_upgrade_leaves_the_old_default() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tiny_copy(tmp.path(), "rootfs");
    let img = tmp.path().join("disk.img");
    let exts = tmp.path().join("exts");
    ext(
        &exts,
        "boom",
        "touch \"$1/etc/boom-was-here\"\nfor i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do echo noise $i >&2; done\n\
         echo 'cannot configure: the frobnicator is missing' >&2\nexit 3",
        None,
    );
    let base = [
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--extensions-dir",
        exts.to_str().unwrap(),
    ];
    // New image: nothing left.
    let mut args = base.to_vec();
    args.extend([
        "-e",
        "hostname",
        "--set",
        "HOSTNAME=ok",
        "-e",
        "boom",
        img.to_str().unwrap(),
    ]);
    let stderr = run_fails(
        &args,
        1,
        &[
            "extension boom failed (exit 3)",
            "the frobnicator is missing",
            "noise 20",
        ],
    );
    assert!(
        !stderr.contains("noise 2\n"),
        "more than the tail: {stderr}"
    );
    assert_not_created(&img);

    // Upgrade: factory first, then a failing v2.
    run_ok(&["--rootfs", rootfs.to_str().unwrap(), img.to_str().unwrap()]);
    let mut args = base.to_vec();
    args.extend(["--version", "v2", "-e", "boom", img.to_str().unwrap()]);
    run_fails(&args, 1, &["extension boom failed (exit 3)"]);
    assert_no_leftovers(&img, false);
    let m = Inspect::open(&img);
    assert_eq!(
        std::fs::read_link(m.path("systems/default")).unwrap(),
        Path::new("factory")
    );
    let mut names: Vec<String> = std::fs::read_dir(m.path("systems"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["default", "factory"]);
    assert!(!m.path("systems/factory/orig/etc/boom-was-here").exists());
    let conf = read(&m.path("extlinux/extlinux.conf"));
    assert!(!conf.contains("v2"), "{conf}");
}

#[test]
fn fstab_extension_mounting_srv_elsewhere_keeps_srv_in_the_version() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tiny_copy(tmp.path(), "rootfs");
    let img = tmp.path().join("disk.img");
    let entry = "UUID=1111-2222 /srv ext4 defaults 0 2";
    run_ok(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "-e",
        "fstab",
        "--set",
        &format!("FSTAB_ENTRIES={entry}"),
        img.to_str().unwrap(),
    ]);
    let m = Inspect::open(&img);
    let list = subvolumes(&m);
    assert!(
        !list.contains("path state/srv\n") && !list.ends_with("path state/srv"),
        "{list}"
    );
    for d in ["home", "root", "opt", "var"] {
        assert!(
            list.contains(&format!("path state/{d}")),
            "state/{d} missing:\n{list}"
        );
    }
    let fstab = read(&m.path("systems/factory/orig/etc/fstab"));
    assert!(fstab.lines().any(|l| l == entry), "{fstab}");
    assert_eq!(fstab.matches(" /srv ").count(), 1, "{fstab}");
    for mp in [" / ", " /home ", " /root ", " /opt ", " /var "] {
        assert!(fstab.contains(mp), "{mp} not added:\n{fstab}");
    }
    // /srv's content stays inside the version.
    assert!(m.path("systems/factory/orig/srv/srv-file.txt").exists());
    let dep = deployment_json(&m, "factory");
    assert!(
        !dep["fstab_added"]
            .as_array()
            .unwrap()
            .contains(&"/srv".into()),
        "{dep}"
    );
}

#[test]
fn deploy_toml_in_the_cwd_and_set_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    tiny_copy(&site, "rootfs");
    let m = manifest(&site);
    std::fs::rename(m.join("files"), site.join("files")).unwrap();
    std::fs::rename(m.join("manifest"), site.join("manifest")).unwrap();
    write(
        &site.join("deploy.toml"),
        b"# site config\nrootfs = \"rootfs\"\nversion = \"site1\"\nsize = \"660M\"\n\
          no_bootloader = true\nextensions = [\"hostname\", \"install-files\"]\n\n\
          [settings]\nHOSTNAME = \"from-config\"\nAPP_NAME = \"cfg-app\"\nDB_PASSWORD = \"cfg-secret\"\n\
          INSTALL_FILES_MANIFEST = \"manifest\"\n",
    );
    // `deploy disk.img` in the config's folder needs nothing else.
    let out = run_in(&site, &["disk.img"]);
    assert!(out.status.success());
    let img = site.join("disk.img");
    {
        let m = Inspect::open(&img);
        let orig = m.path("systems/site1/orig");
        assert_eq!(read(&orig.join("etc/hostname")), "from-config\n");
        assert!(read(&orig.join("etc/app/app.conf")).starts_with("name=cfg-app\nversion=site1\n"));
        assert!(
            !m.path("systems/site1/kernel").exists(),
            "no_bootloader ignored"
        );
        let dep = deployment_json(&m, "site1");
        assert_eq!(dep["settings"]["HOSTNAME"], "from-config");
        assert!(dep["settings"].get("DB_PASSWORD").is_none());
        assert!(dep["settings"].get("DEPLOY_CONFIG_DIR").is_none());
    }
    // The command line wins: --version over `version`, --set over [settings].
    let out = run_in(
        &site,
        &["--version", "v2", "--set", "HOSTNAME=from-cli", "disk.img"],
    );
    assert!(out.status.success());
    let m = Inspect::open(&img);
    let orig = m.path("systems/v2/orig");
    assert_eq!(read(&orig.join("etc/hostname")), "from-cli\n");
    assert!(read(&orig.join("etc/app/app.conf")).starts_with("name=cfg-app\nversion=v2\n"));
    let dep = deployment_json(&m, "v2");
    assert_eq!(dep["settings"]["HOSTNAME"], "from-cli");
    assert_eq!(dep["upgraded_from"], "site1");
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    write(&cfg, b"rootfs = \"r\"\nrootfs_typo = 1\n");
    let img = tmp.path().join("disk.img");
    let out = run(&["--config", cfg.to_str().unwrap(), img.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rootfs_typo") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    assert_not_created(&img);
    // --config names a file that must exist.
    let missing = tmp.path().join("missing.toml");
    let out = run(&["--config", missing.to_str().unwrap(), img.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    // A malformed --set is a usage error.
    run_fails(
        &[
            "--rootfs",
            tiny_rootfs().to_str().unwrap(),
            "--set",
            "NOEQUALS",
            img.to_str().unwrap(),
        ],
        2,
        &["NOEQUALS", "KEY=VALUE"],
    );
    assert_not_created(&img);
}

#[test]
fn deploy_extensions_lists_every_shipped_one() {
    let tmp = tempfile::tempdir().unwrap();
    ext(tmp.path(), "zz-mine", "true", None);
    let out = run_ok(&[
        "extensions",
        "--extensions-dir",
        tmp.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in SHIPPED {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{stdout}"));
        assert!(line.split_whitespace().count() > 2, "no summary: {line}");
    }
    assert!(
        stdout.contains("zz-mine") && stdout.contains("test zz-mine"),
        "{stdout}"
    );
    assert!(!stdout.contains("_common"), "{stdout}");
}

#[test]
fn run_in_tree_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tiny_copy(tmp.path(), "tree");
    write(
        &tree.join("usr/sbin/invoke-rc.d"),
        b"#!/bin/sh\n/usr/sbin/policy-rc.d \"$1\" \"$2\"\n[ $? = 101 ] && { echo \"refused $1\"; exit 0; }\necho started > /started\n",
    );
    chmod(&tree.join("usr/sbin/invoke-rc.d"), 0o755);
    symlink("../run/resolv.conf", tree.join("etc/resolv.conf")).unwrap();
    let out = run(&[
        "run-in-tree",
        tree.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "head -1 /proc/self/stat > /dev/null && ls /proc/1 > /dev/null && echo proc-ok; \
         /usr/sbin/invoke-rc.d sshd start; cat /etc/resolv.conf; \
         sleep 1002 & exit 7",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{stdout}");
    assert!(stdout.contains("proc-ok\nrefused sshd\n"), "{stdout}");
    assert!(
        stdout.contains(&read(Path::new("/etc/resolv.conf"))),
        "{stdout}"
    );
    assert!(!tree.join("started").exists());
    assert!(sh("ps -eo args").lines().all(|l| l.trim() != "sleep 1002"));
    assert_eq!(
        std::fs::read_link(tree.join("etc/resolv.conf")).unwrap(),
        Path::new("../run/resolv.conf")
    );
    assert!(!tree.join("usr/sbin/policy-rc.d").exists());
    let mounts = read(Path::new("/proc/self/mountinfo"));
    assert!(!mounts.contains(tree.to_str().unwrap()), "{mounts}");
    assert!(std::fs::read_dir(tree.join("proc"))
        .unwrap()
        .next()
        .is_none());
    // Without a command: a usage error.
    run_fails(&["run-in-tree", tree.to_str().unwrap()], 2, &[]);
}

#[test]
fn upgrade_runs_extensions_with_upgrade_context_and_state_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tiny_copy(tmp.path(), "rootfs");
    let img = tmp.path().join("disk.img");
    let r = rootfs.to_str().unwrap();
    let i = img.to_str().unwrap();
    run_ok(&[
        "--rootfs",
        r,
        "--no-bootloader",
        "-e",
        "users",
        "--set",
        "USERS_NAME=alice",
        "-e",
        "ssh-keys",
        "--set",
        &format!("SSH_AUTHORIZED_KEYS={KEY1}"),
        i,
    ]);
    // v2 adds bob (uid pinned: v2's /etc/passwd comes from the rootfs, where
    // alice's 1001 is free again) and a different key for root.
    let exts = tmp.path().join("exts");
    ext(
        &exts,
        "ctx",
        &format!(
            "echo \"$DEPLOY_VERSION $DEPLOY_UPGRADE\" > {}/ctx",
            tmp.path().display()
        ),
        None,
    );
    run_ok(&[
        "--rootfs",
        r,
        "--no-bootloader",
        "--version",
        "v2",
        "--extensions-dir",
        exts.to_str().unwrap(),
        "-e",
        "ctx",
        "-e",
        "users",
        "--set",
        "USERS_NAME=bob",
        "--set",
        "USERS_UID=1002",
        "-e",
        "ssh-keys",
        "--set",
        &format!("SSH_AUTHORIZED_KEYS={KEY2}"),
        i,
    ]);
    assert_eq!(read(&tmp.path().join("ctx")), "v2 yes\n");
    let m = Inspect::open(&img);
    // The new version has bob (and not alice: its /etc comes from the new
    // rootfs plus this deploy's extensions).
    let passwd = read(&m.path("systems/v2/orig/etc/passwd"));
    assert!(passwd.contains("\nbob:x:1002:1002:"), "{passwd}");
    // /state follows v2 where the device changed nothing: alice's home
    // (which v2 no longer ships) goes, bob's arrives, root's key is v2's.
    assert!(!m.path("state/home/alice").exists());
    assert_eq!(owner_mode(&m.path("state/home/bob")), (1002, 1002, 0o40750));
    assert_eq!(
        read(&m.path("state/root/.ssh/authorized_keys")),
        format!("{KEY2}\n")
    );
    // v2 keeps its vendor copy of /home.
    assert!(m.path("systems/v2/orig/home/bob").is_dir());
}

/// Every file under `root` (relative path, type, mode, owner, content or
/// link target), for comparing two trees.
fn tree_listing(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(root)
        .into_iter()
        .map(|p| {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_file() {
                String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
            } else {
                String::new()
            };
            format!(
                "{} {:o} {}:{} {what}",
                p.strip_prefix(root).unwrap().display(),
                m.mode(),
                m.uid(),
                m.gid()
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn same_settings_on_another_day_give_the_same_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tiny_copy(tmp.path(), "rootfs");
    let img = tmp.path().join("disk.img");
    let later = another_day(tmp.path());
    let argv = |label: &'static str| {
        vec![
            "--rootfs".to_string(),
            rootfs.to_str().unwrap().into(),
            "--no-bootloader".into(),
            "--version".into(),
            label.into(),
            "-e".into(),
            "users".into(),
            "--set".into(),
            "USERS_NAME=alice".into(),
            "--set".into(),
            "USERS_UID=1001".into(),
            "--set".into(),
            format!("USERS_PASSWORD_HASH={HASH}"),
            img.to_str().unwrap().into(),
        ]
    };
    let a = argv("day1");
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let a = argv("day41");
    let out = deploy().env("PATH", &later).args(&a).output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let m = Inspect::open(&img);
    let etc1 = tree_listing(&m.path("systems/day1/orig/etc"));
    let etc2 = tree_listing(&m.path("systems/day41/orig/etc"));
    assert!(etc1.iter().any(|l| l.contains(&format!("alice:{HASH}:"))));
    assert_eq!(etc1, etc2);
}

#[test]
fn boot_reports_hostname_and_the_users_home_on_state() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tiny_copy(tmp.path(), "rootfs");
    let site = tmp.path().join("site");
    write(
        &site.join("report.in"),
        b"#!/bin/sh\necho \"home-of-${USERS_NAME}: $(stat -c '%u:%g %a' /home/${USERS_NAME})\"\n\
          grep '^${USERS_NAME}:' /etc/passwd | sed 's/^/passwd: /'\n",
    );
    write(
        &site.join("manifest"),
        b"report.in /etc/tiny-boot.d/20-user 0755 root root template\n",
    );
    let img = tmp.path().join("disk.img");
    run_ok(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "-e",
        "hostname",
        "-e",
        "users",
        "-e",
        "install-files",
        "--set",
        "HOSTNAME=booted-box",
        "--set",
        "USERS_NAME=alice",
        "--set",
        &format!("INSTALL_FILES_MANIFEST={}", site.join("manifest").display()),
        img.to_str().unwrap(),
    ]);
    let console = boot_console(&img, None);
    assert!(console.contains("TINY: hostname=booted-box"), "{console}");
    assert!(
        console.contains("home-of-alice: 1001:1001 750"),
        "{console}"
    );
    assert!(
        console.contains("passwd: alice:x:1001:1001::/home/alice:/bin/sh"),
        "{console}"
    );
    assert!(
        console
            .lines()
            .any(|l| l.contains("TINY-MOUNT: /home /state/home ")),
        "/home is not the /state/home subvolume:\n{console}"
    );
}

#[test]
fn nothing_of_the_shipped_scripts_needs_a_tree_shell() {
    // The scripts run on the host: a tree without any shell works.
    let d = tempfile::tempdir().unwrap();
    let t = etc_tree(d.path());
    assert!(!t.join("bin/sh").exists());
    configure_ok("users", &t, &[("USERS_NAME", "zed")]);
    configure_ok("hostname", &t, &[("HOSTNAME", "noshell")]);
    let m = std::fs::metadata(t.join("home/zed")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1001, 1001));
}
