//! The bad-input table (issue 6): every row is a command that must be
//! refused with the expected exit status (1 failure, 2 usage) and a message
//! naming the problem, leaving an existing target byte-for-byte unchanged, a
//! new target not created, and nothing mounted or attached.
//!
//! Note on "unreadable files": root reads any file whatever its mode bits
//! (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH). The row runs `deploy` as root
//! with those two capabilities removed from its bounding set (setpriv), so a
//! mode-000 file owned by another user is really unreadable to it.

mod common;
use common::*;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

/// Everything the rows refer to, built once.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// Loop devices and mounts this test set up on purpose (torn down on drop).
    teardown: Vec<String>,
}

impl Fixture {
    fn p(&self, rel: &str) -> String {
        self.dir.join(rel).to_str().unwrap().to_string()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for cmd in self.teardown.iter().rev() {
            let _ = std::process::Command::new("sh").arg("-c").arg(cmd).status();
        }
    }
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut f = Fixture {
        _tmp: tmp,
        dir: dir.clone(),
        teardown: Vec::new(),
    };
    let d = |rel: &str| dir.join(rel);
    make_rootfs(&d("rootfs"));
    // A disk holding factory (the default) and v2.
    run_ok(&[
        "--rootfs",
        &f.p("rootfs"),
        "--size",
        "660M",
        &f.p("good.img"),
    ]);
    run_ok(&[
        "--version",
        "v2",
        "--no-default",
        "--rootfs",
        &f.p("rootfs"),
        &f.p("good.img"),
    ]);
    sh(&format!(
        "truncate -s 300M {0} && mkfs.btrfs -q {0}",
        d("plain.img").display()
    ));
    sh(&format!(
        "truncate -s 64M {0} && mkfs.ext4 -q -F {0}",
        d("ext4.img").display()
    ));
    write(&d("zeros.img"), &vec![0u8; 1 << 20]);
    write(&d("empty.img"), b"");
    std::fs::create_dir(d("a-dir")).unwrap();
    symlink(d("nowhere"), d("dangling.img")).unwrap();
    // An image attached to a loop device by someone else.
    sh(&format!(
        "cp --sparse=always {} {}",
        f.p("good.img"),
        f.p("attached.img")
    ));
    let attached = sh(&format!("losetup --find --show {}", f.p("attached.img")))
        .trim()
        .to_string();
    f.teardown.push(format!("losetup -d {attached}"));
    // A mounted block device (a loop device with a mounted filesystem).
    sh(&format!(
        "truncate -s 64M {0} && mkfs.ext4 -q -F {0}",
        d("mounted-backing.img").display()
    ));
    let mounted = sh(&format!(
        "losetup --find --show {}",
        f.p("mounted-backing.img")
    ))
    .trim()
    .to_string();
    f.teardown.push(format!("losetup -d {mounted}"));
    std::fs::create_dir(d("mnt")).unwrap();
    sh(&format!("mount {mounted} {}", f.p("mnt")));
    f.teardown.push(format!("umount {}", f.p("mnt")));
    symlink(&mounted, d("mounted-dev")).unwrap();
    // An immutable image (root ignores mode bits, not the immutable flag).
    sh(&format!(
        "cp --sparse=always {} {}",
        f.p("good.img"),
        f.p("immutable.img")
    ));
    sh(&format!("chattr +i {}", f.p("immutable.img")));
    f.teardown
        .push(format!("chattr -i {}", f.p("immutable.img")));
    // Rootfs variants.
    write(&d("rootfs-file"), b"not a directory");
    std::fs::create_dir(d("rootfs-empty")).unwrap();
    let secret = d("rootfs-unreadable");
    write(&secret.join(format!("boot/vmlinuz-{FAKE_KVER}")), b"kernel");
    write(&secret.join("etc/fstab"), b"");
    write(&secret.join("usr/secret"), b"only for its owner");
    lchown(&secret.join("usr/secret"), 1234, 1234);
    chmod(&secret.join("usr/secret"), 0o000);
    // Config files.
    write(
        &d("unknown-key.toml"),
        b"rootfs = \"rootfs\"\ncolour = \"blue\"\n",
    );
    write(
        &d("wrong-type.toml"),
        b"rootfs = \"rootfs\"\nkeep = \"three\"\n",
    );
    write(&d("bad-syntax.toml"), b"rootfs = \n");
    write(
        &d("bad-setting.toml"),
        b"rootfs = \"rootfs\"\n[settings]\nPATH = \"/x\"\n",
    );
    // Extensions.
    let ext = d("ext");
    write(&ext.join("noexec.configure"), b"#!/bin/sh\nexit 0\n");
    chmod(&ext.join("noexec.configure"), 0o644);
    write(&ext.join("refuses.configure"), b"#!/bin/sh\nexit 0\n");
    write(
        &ext.join("refuses.check"),
        b"#!/bin/sh\necho 'refuses: HOSTNAME is not set' >&2\nexit 1\n",
    );
    write(
        &ext.join("fails.configure"),
        b"#!/bin/sh\necho 'fails: cannot configure' >&2\nexit 3\n",
    );
    chmod(&ext.join("refuses.configure"), 0o755);
    chmod(&ext.join("refuses.check"), 0o755);
    chmod(&ext.join("fails.configure"), 0o755);
    write(
        &ext.join("badkeeps.configure"),
        b"#!/bin/sh\n# summary: keeps a relative path\n# keeps: usr/lib/x\nexit 0\n",
    );
    chmod(&ext.join("badkeeps.configure"), 0o755);
    odd_input_fixture(&dir);
    f
}

/// Fixture files of the issue 10 rows ([`odd_input_rows`]).
fn odd_input_fixture(dir: &std::path::Path) {
    // A rootfs archive whose second entry has a malformed PAX record (its
    // length runs past the header's end).
    let mut b = tar::Builder::new(std::fs::File::create(dir.join("bad-pax.tar")).unwrap());
    let entry = |b: &mut tar::Builder<std::fs::File>, name: &str, kind, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    entry(&mut b, "etc", tar::EntryType::Directory, b"");
    entry(
        &mut b,
        "PaxHeaders/x",
        tar::EntryType::XHeader,
        b"99 user.x=1\n",
    );
    entry(&mut b, "etc/victim.conf", tar::EntryType::Regular, b"data");
    b.finish().unwrap();
    sh(&format!(
        "tar -C {0}/rootfs -cf {0}/rootfs.tar .",
        dir.display()
    ));
    // Settings that cannot become an extension's environment.
    write(
        &dir.join("nul-setting.toml"),
        b"rootfs = \"rootfs\"\n[settings]\nHOSTNAME = \"a\\u0000b\"\n",
    );
    write(
        &dir.join("huge-setting.toml"),
        format!(
            "rootfs = \"rootfs\"\n[settings]\nMOTD = \"{}\"\n",
            "x".repeat(200_000)
        )
        .as_bytes(),
    );
}

/// One bad input.
struct Row {
    what: &'static str,
    /// Arguments; `@name` is replaced by the fixture path `<dir>/name`.
    args: &'static [&'static str],
    code: i32,
    /// Substrings stderr must contain.
    needles: &'static [&'static str],
    /// Fixture files that exist and must stay byte-for-byte unchanged.
    unchanged: &'static [&'static str],
    /// Fixture paths that do not exist and must not be created (nor `.partial`).
    not_created: &'static [&'static str],
    /// Run as root without the capabilities that bypass file modes.
    no_dac: bool,
}

const R: &str = "@rootfs";
const NEW: &str = "@new.img";
const GOOD: &str = "@good.img";

/// The table. Keep every row fast: all fail before or right after planning.
fn rows() -> Vec<Row> {
    let row = |what, args, code, needles, unchanged, not_created| Row {
        what,
        args,
        code,
        needles,
        unchanged,
        not_created,
        no_dac: false,
    };
    let long_label: &'static str = Box::leak("x".repeat(65).into_boxed_str());
    let long_args: &'static [&'static str] =
        Box::leak(vec!["--version", long_label, "--rootfs", R, NEW].into_boxed_slice());
    let none: &[&str] = &[];
    let new: &[&str] = &["new.img"];
    let good: &[&str] = &["good.img"];
    vec![
        // ---- labels
        row(
            "label with ..",
            &["--version", "../x", "--rootfs", R, NEW],
            2,
            &["invalid --version", "contains"],
            none,
            new,
        ),
        row(
            "label with /",
            &["--version", "a/b", "--rootfs", R, NEW],
            2,
            &["invalid --version", "contains '/'"],
            none,
            new,
        ),
        row(
            "label default",
            &["--version", "default", "--rootfs", R, NEW],
            2,
            &["invalid --version", "reserved"],
            none,
            new,
        ),
        row(
            "empty label",
            &["--version", "", "--rootfs", R, NEW],
            2,
            &["invalid --version", "empty"],
            none,
            new,
        ),
        row(
            "label starting with .",
            &["--version", ".hidden", "--rootfs", R, NEW],
            2,
            &["invalid --version", "starts with"],
            none,
            new,
        ),
        row(
            "label with a space",
            &["--version", "a b", "--rootfs", R, NEW],
            2,
            &["invalid --version"],
            none,
            new,
        ),
        row(
            "label of 65 characters",
            long_args,
            2,
            &["invalid --version"],
            none,
            new,
        ),
        row(
            "non-ASCII label",
            &["--version", "café", "--rootfs", R, NEW],
            2,
            &["invalid --version"],
            none,
            new,
        ),
        row(
            "upgrade label with ..",
            &["--version", "../x", "--rootfs", R, GOOD],
            2,
            &["invalid --version"],
            good,
            none,
        ),
        row(
            "existing label",
            &["--version", "v2", "--rootfs", R, GOOD],
            1,
            &["version v2 already exists"],
            good,
            none,
        ),
        // ---- sizes
        row(
            "size 0",
            &["--size", "0", "--rootfs", R, NEW],
            2,
            &["invalid --size", "larger than zero"],
            none,
            new,
        ),
        row(
            "size -1G",
            &["--size=-1G", "--rootfs", R, NEW],
            2,
            &["invalid --size", "negative"],
            none,
            new,
        ),
        row(
            "size without = takes no value that starts with -",
            &["--size", "-1G", "--rootfs", R, NEW],
            2,
            &["unexpected argument '-1'"],
            none,
            new,
        ),
        // ---- an option where a value belongs
        row(
            "option as the label",
            &["--version", "--rootfs", R, NEW],
            2,
            &["a value is required for '--version <LABEL>'"],
            none,
            new,
        ),
        row(
            "option as kernel args",
            &["--kernel-args", "--rootfs", R, NEW],
            2,
            &["a value is required for '--kernel-args <ARGS>'"],
            none,
            new,
        ),
        row(
            "size 1Q",
            &["--size", "1Q", "--rootfs", R, NEW],
            2,
            &["invalid --size", "1Q"],
            none,
            new,
        ),
        row(
            "size abc",
            &["--size", "abc", "--rootfs", R, NEW],
            2,
            &["invalid --size"],
            none,
            new,
        ),
        row(
            "size too small",
            &["--size", "10M", "--rootfs", R, NEW],
            1,
            &["too small", "give at least"],
            none,
            new,
        ),
        row(
            "size beyond the host filesystem",
            &["--size", "900T", "--rootfs", R, NEW],
            1,
            &["larger than the filesystem"],
            none,
            new,
        ),
        row(
            "size on an existing disk",
            &["--version", "v3", "--size", "1G", "--rootfs", R, GOOD],
            1,
            &["--size applies to a new image only"],
            good,
            none,
        ),
        row(
            "keep 0",
            &["--keep", "0", "--rootfs", R, NEW],
            2,
            &["--keep must be at least 1"],
            none,
            new,
        ),
        // ---- targets
        row(
            "target is a directory",
            &["--rootfs", R, "@a-dir"],
            1,
            &["is a directory"],
            none,
            none,
        ),
        row(
            "target is a mounted device",
            &["--rootfs", R, "@mounted-dev"],
            1,
            &["is mounted"],
            &["mounted-backing.img"],
            none,
        ),
        row(
            "target is a non-Btrfs file (zeros)",
            &["--rootfs", R, "@zeros.img"],
            1,
            &["not a btrfs-deploy disk"],
            &["zeros.img"],
            none,
        ),
        row(
            "target holds ext4",
            &["--rootfs", R, "@ext4.img"],
            1,
            &["holds a ext4 filesystem"],
            &["ext4.img"],
            none,
        ),
        row(
            "target is a Btrfs without the layout",
            &["--version", "v2", "--rootfs", R, "@plain.img"],
            1,
            &["without the btrfs-deploy layout"],
            &["plain.img"],
            none,
        ),
        row(
            "target is immutable (read-only)",
            &["--version", "v3", "--rootfs", R, "@immutable.img"],
            1,
            &["immutable.img"],
            &["immutable.img"],
            none,
        ),
        row(
            "target attached to a loop device",
            &["--version", "v3", "--rootfs", R, "@attached.img"],
            1,
            &["in use", "attached to /dev/loop"],
            &["attached.img"],
            none,
        ),
        row(
            "target is an empty file",
            &["--rootfs", R, "@empty.img"],
            1,
            &["is an empty file"],
            &["empty.img"],
            none,
        ),
        row(
            "target is a dangling symlink",
            &["--rootfs", R, "@dangling.img"],
            1,
            &["dangling symlink"],
            none,
            &["nowhere"],
        ),
        row(
            "target in a missing directory",
            &["--rootfs", R, "@no/such/dir/disk.img"],
            1,
            &["does not exist"],
            none,
            &["no"],
        ),
        row(
            "existing disk without --version",
            &["--rootfs", R, GOOD],
            2,
            &["give the new one a label with --version"],
            good,
            none,
        ),
        row(
            "no target",
            &["--rootfs", R],
            2,
            &["no TARGET given"],
            none,
            none,
        ),
        // ---- rootfs
        row(
            "rootfs missing",
            &["--rootfs", "@nope", NEW],
            1,
            &["rootfs", "nope", "does not exist"],
            none,
            new,
        ),
        row(
            "rootfs is a file",
            &["--rootfs", "@rootfs-file", NEW],
            1,
            &["not a directory"],
            &["rootfs-file"],
            new,
        ),
        row(
            "rootfs is empty",
            &["--rootfs", "@rootfs-empty", NEW],
            1,
            &["is empty"],
            none,
            new,
        ),
        row(
            "rootfs is the host's /",
            &["--rootfs", "/", NEW],
            1,
            &["host's /"],
            none,
            new,
        ),
        row("no rootfs", &[NEW], 2, &["no rootfs given"], none, new),
        Row {
            no_dac: true,
            ..row(
                "rootfs with an unreadable file",
                &["--rootfs", "@rootfs-unreadable", "--no-bootloader", NEW],
                1,
                &["usr/secret", "ermission denied"],
                none,
                new,
            )
        },
        row(
            "missing --kernel",
            &["--kernel", "@no-kernel", "--rootfs", R, NEW],
            1,
            &["--kernel", "no-kernel"],
            none,
            new,
        ),
        // ---- config
        row(
            "config: unknown key",
            &["--config", "@unknown-key.toml", NEW],
            1,
            &["unknown-key.toml", "colour"],
            none,
            new,
        ),
        row(
            "config: wrong type",
            &["--config", "@wrong-type.toml", NEW],
            1,
            &["wrong-type.toml", "keep"],
            none,
            new,
        ),
        row(
            "config: bad syntax",
            &["--config", "@bad-syntax.toml", NEW],
            1,
            &["bad-syntax.toml", "line 1"],
            none,
            new,
        ),
        row(
            "config: reserved setting",
            &["--config", "@bad-setting.toml", NEW],
            1,
            &["bad-setting.toml", "PATH", "reserved"],
            none,
            new,
        ),
        row(
            "config: missing file",
            &["--config", "@missing.toml", NEW],
            1,
            &["reading config file", "missing.toml"],
            none,
            new,
        ),
        row(
            "--set without =",
            &["--set", "NOEQUALS", "--rootfs", R, NEW],
            2,
            &["--set", "KEY=VALUE"],
            none,
            new,
        ),
        // ---- extensions
        row(
            "extension missing",
            &["-e", "nope", "--extensions-dir", "@ext", "--rootfs", R, NEW],
            1,
            &["extension nope not found"],
            none,
            new,
        ),
        row(
            "extension with a relative `# keeps:` path",
            &[
                "-e",
                "badkeeps",
                "--extensions-dir",
                "@ext",
                "--rootfs",
                R,
                NEW,
            ],
            1,
            &[
                "badkeeps.configure line 3",
                "# keeps: usr/lib/x",
                "absolute path",
            ],
            none,
            new,
        ),
        row(
            "extension not executable",
            &[
                "-e",
                "noexec",
                "--extensions-dir",
                "@ext",
                "--rootfs",
                R,
                NEW,
            ],
            1,
            &["noexec.configure is not an executable file"],
            none,
            new,
        ),
        row(
            "extension .check fails",
            &[
                "-e",
                "refuses",
                "--extensions-dir",
                "@ext",
                "--rootfs",
                R,
                NEW,
            ],
            1,
            &["refuses", "HOSTNAME is not set"],
            none,
            new,
        ),
        row(
            "extension .check fails on an upgrade",
            &[
                "--version",
                "v3",
                "-e",
                "refuses",
                "--extensions-dir",
                "@ext",
                "--rootfs",
                R,
                GOOD,
            ],
            1,
            &["refuses", "HOSTNAME is not set"],
            good,
            none,
        ),
        row(
            "extension .configure fails",
            &[
                "-e",
                "fails",
                "--extensions-dir",
                "@ext",
                "--rootfs",
                R,
                NEW,
            ],
            1,
            &["fails", "exit 3", "cannot configure"],
            none,
            new,
        ),
        row(
            "extensions folder missing",
            &["-e", "x", "--extensions-dir", "@no-ext", "--rootfs", R, NEW],
            1,
            &["no-ext", "does not exist"],
            none,
            new,
        ),
        // ---- versions
        row(
            "set-default of a missing version",
            &["set-default", "nope", GOOD],
            1,
            &["no version nope", "factory, v2"],
            good,
            none,
        ),
        row(
            "set-default with an invalid label",
            &["set-default", "../x", GOOD],
            1,
            &["invalid label"],
            good,
            none,
        ),
        row(
            "remove a missing version",
            &["remove", "nope", GOOD],
            1,
            &["no version nope"],
            good,
            none,
        ),
        row(
            "remove the default",
            &["remove", "factory", GOOD],
            1,
            &["factory is the default version"],
            good,
            none,
        ),
        row(
            "set-default on a missing disk",
            &["set-default", "factory", "@missing.img"],
            1,
            &["does not exist"],
            none,
            &["missing.img"],
        ),
        row(
            "list of a Btrfs without the layout",
            &["list", "@plain.img"],
            1,
            &["without the btrfs-deploy layout"],
            &["plain.img"],
            none,
        ),
        row(
            "check of a non-Btrfs file",
            &["check", "@zeros.img"],
            1,
            &["not a btrfs-deploy disk"],
            &["zeros.img"],
            none,
        ),
    ]
}

/// Rows of issue 10 ("odd and hostile input", defects 4, 8, 12).
fn odd_input_rows() -> Vec<Row> {
    let row = |what, args, code, needles, unchanged, not_created| Row {
        what,
        args,
        code,
        needles,
        unchanged,
        not_created,
        no_dac: false,
    };
    let none: &[&str] = &[];
    let good: &[&str] = &["good.img"];
    let empty_match: &[&str] = &["matches the empty string", "at least one character"];
    let mut rows = Vec::new();
    // ---- boot-test patterns that match the empty string (defect 4)
    for (what, args) in [
        (
            "boot-test --expect ''",
            &["boot-test", "--expect", "", GOOD] as &'static [&'static str],
        ),
        (
            "boot-test --expect 'login:|'",
            &["boot-test", "--expect", "login:|", GOOD],
        ),
        (
            "boot-test --expect 'x*'",
            &["boot-test", "--expect", "x*", GOOD],
        ),
        (
            "boot-test --expect '^'",
            &["boot-test", "--expect", "^", GOOD],
        ),
        (
            "boot-test --expect '(?:)'",
            &["boot-test", "--expect", "(?:)", GOOD],
        ),
        (
            "boot-test --fail-on ''",
            &["boot-test", "--fail-on", "", GOOD],
        ),
        (
            "boot-test --fail-on 'panic|'",
            &["boot-test", "--fail-on", "panic|", GOOD],
        ),
    ] {
        rows.push(row(what, args, 2, empty_match, good, none));
    }
    // ---- boot-test --forward (issue 24): refused before QEMU starts
    for (what, args, needles) in [
        (
            "boot-test --forward 22",
            &["boot-test", "--forward", "22", GOOD] as &'static [&'static str],
            &["\"22\" is not a port forward", "[ADDR:]HOSTPORT:GUESTPORT"]
                as &'static [&'static str],
        ),
        (
            "boot-test --forward 2222:0",
            &["boot-test", "--forward", "2222:0", GOOD],
            &["\"0\" is not a port (1-65535)", "--forward"],
        ),
        (
            "boot-test --forward host:2222:22",
            &["boot-test", "--forward", "host:2222:22", GOOD],
            &["\"host\" is not an IPv4 address", "--forward"],
        ),
    ] {
        rows.push(row(what, args, 2, needles, good, none));
    }
    // ---- archives (defect 5)
    rows.push(row(
        "rootfs archive with a malformed PAX record",
        &["--rootfs", "@bad-pax.tar", "--no-bootloader", "@new.img"],
        1,
        &["etc/victim.conf", "malformed pax extension"],
        &["bad-pax.tar"],
        &["new.img"],
    ));
    // ---- smaller items (defect 12)
    for (what, args, needle) in [
        (
            "--kernel is an empty file",
            &["--kernel", "@empty.img", "--rootfs", R, NEW] as &'static [&'static str],
            "is an empty file",
        ),
        (
            "--kernel is /dev/null",
            &["--kernel", "/dev/null", "--rootfs", R, NEW],
            "not a regular file",
        ),
        (
            "--kernel is an empty file, tar rootfs",
            &["--kernel", "@empty.img", "--rootfs", "@rootfs.tar", NEW],
            "is an empty file",
        ),
        (
            "--kernel is a directory, tar rootfs",
            &["--kernel", "@a-dir", "--rootfs", "@rootfs.tar", NEW],
            "not a regular file",
        ),
        (
            "--initramfs is an empty file",
            &["--initramfs", "@empty.img", "--rootfs", R, NEW],
            "is an empty file",
        ),
    ] {
        rows.push(row(
            what,
            args,
            1,
            Box::leak(Box::new([needle])),
            none,
            &["new.img"],
        ));
    }
    rows.push(row(
        "setting with a NUL byte",
        &["--config", "@nul-setting.toml", NEW],
        1,
        &["setting HOSTNAME contains a NUL byte"],
        none,
        &["new.img"],
    ));
    rows.push(row(
        "setting beyond MAX_ARG_STRLEN",
        &["--config", "@huge-setting.toml", NEW],
        1,
        &["setting MOTD is 200000 bytes long", "MAX_ARG_STRLEN"],
        none,
        &["new.img"],
    ));
    rows.push(row(
        "boot-test --memory 0",
        &["boot-test", "--memory", "0", GOOD],
        2,
        &["--memory 0 MiB is too small", "at least 64"],
        good,
        none,
    ));
    rows.push(row(
        "boot-test --memory 32",
        &["boot-test", "--memory", "32", GOOD],
        2,
        &["--memory 32 MiB is too small"],
        good,
        none,
    ));
    rows
}

fn expand(f: &Fixture, a: &str) -> String {
    match a.strip_prefix('@') {
        Some(rel) => f.p(rel),
        None => a.to_string(),
    }
}

/// Loop devices backed by files of this test, other than `expected`.
fn our_loops(f: &Fixture, expected: &[String]) -> Vec<String> {
    let dir = f.dir.to_str().unwrap();
    sh("losetup -a -O NAME,BACK-FILE --noheadings || true")
        .lines()
        .filter(|l| l.contains(dir))
        .filter(|l| {
            !expected
                .iter()
                .any(|e| l.split_whitespace().next() == Some(e))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn every_bad_input_is_refused_clearly_and_changes_nothing() {
    let f = fixture();
    let expected_loops: Vec<String> = f
        .teardown
        .iter()
        .filter_map(|t| t.strip_prefix("losetup -d ").map(str::to_string))
        .collect();
    let mut rows = rows();
    rows.extend(odd_input_rows());
    assert!(rows.len() >= 30, "the table has {} rows", rows.len());
    let mut failures = Vec::new();
    let started = std::time::Instant::now();
    for row in &rows {
        let args: Vec<String> = row.args.iter().map(|a| expand(&f, a)).collect();
        let before: Vec<(String, (u64, u64))> = row
            .unchanged
            .iter()
            .map(|u| (u.to_string(), fingerprint(&f.dir.join(u))))
            .collect();
        let t = std::time::Instant::now();
        let out = if row.no_dac {
            std::process::Command::new("setpriv")
                .arg("--bounding-set=-dac_override,-dac_read_search")
                .arg(env!("CARGO_BIN_EXE_deploy"))
                .args(&args)
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                )
                .output()
                .unwrap()
        } else {
            deploy().args(&args).output().unwrap()
        };
        let took = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut problems = Vec::new();
        if out.status.code() != Some(row.code) {
            problems.push(format!("exit {:?}, want {}", out.status.code(), row.code));
        }
        for n in row.needles {
            if !stderr.contains(n) {
                problems.push(format!("message lacks {n:?}"));
            }
        }
        let error_lines = stderr.lines().filter(|l| l.starts_with("error: ")).count();
        if error_lines != 1 {
            problems.push(format!("{error_lines} `error:` lines, want one"));
        }
        for (u, print) in &before {
            if fingerprint(&f.dir.join(u)) != *print {
                problems.push(format!("{u} changed"));
            }
        }
        for n in row.not_created {
            for p in [f.dir.join(n), f.dir.join(format!("{n}.partial"))] {
                if std::fs::symlink_metadata(&p).is_ok() {
                    problems.push(format!("{} was created", p.display()));
                }
            }
        }
        let loops = our_loops(&f, &expected_loops);
        if !loops.is_empty() {
            problems.push(format!("loop devices left: {loops:?}"));
        }
        for table in ["/proc/1/mountinfo", "/proc/self/mountinfo"] {
            let text = std::fs::read_to_string(table).unwrap();
            if text.contains("btrfs-deploy.") {
                problems.push(format!("a btrfs-deploy mount is left in {table}"));
            }
        }
        eprintln!(
            "{:<45} exit {:?} in {:>5} ms: {}",
            row.what,
            out.status.code(),
            took.as_millis(),
            stderr
                .lines()
                .find(|l| l.starts_with("error: "))
                .unwrap_or("")
        );
        if !problems.is_empty() {
            failures.push(format!(
                "{} (deploy {}): {}\n--- stderr:\n{stderr}",
                row.what,
                args.join(" "),
                problems.join("; ")
            ));
        }
    }
    eprintln!("{} bad inputs in {:?}", rows.len(), started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n\n")
    );
}
