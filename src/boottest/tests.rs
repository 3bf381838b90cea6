use super::*;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use regex::Regex;

fn strip(chunks: &[&[u8]]) -> String {
    let mut s = AnsiStripper::default();
    let mut out = Vec::new();
    for c in chunks {
        s.feed(c, &mut out);
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn strips_csi_osc_and_carriage_returns() {
    assert_eq!(
        strip(&[b"\x1b[0m\x1b[1;32mOK\x1b[0m done\r\n"]),
        "OK done\n"
    );
    assert_eq!(strip(&[b"\x1b]0;title\x07after"]), "after");
    assert_eq!(strip(&[b"\x1b]0;title\x1b\\after"]), "after");
    assert_eq!(strip(&[b"a\x1b(Bb\x1b=c"]), "abc");
    assert_eq!(strip(&[b"tab\there\x00\x08\x0c!"]), "tab\there!");
    assert_eq!(strip(&[b"\x1b[?25l\x1b[2J\x1b[H", b"boot: "]), "boot: ");
}

#[test]
fn strips_escapes_split_across_chunks() {
    assert_eq!(strip(&[b"ab\x1b", b"[3", b"1m", b"cd\r", b"\n"]), "abcd\n");
    assert_eq!(strip(&[b"\x1b]2;x", b"y\x1b", b"\\z"]), "z");
}

#[test]
fn assembles_lines_across_chunks() {
    let mut a = LineAssembler::default();
    assert!(a.push(b"TINY: bo").is_empty());
    assert_eq!(a.partial(), "TINY: bo");
    assert_eq!(
        a.push(b"ot start\nTINY-MOUNT: / x\nboot:"),
        vec!["TINY: boot start", "TINY-MOUNT: / x"]
    );
    assert_eq!(a.partial(), "boot:");
    assert_eq!(a.push(b" \n"), vec!["boot: "]);
    assert_eq!(a.partial(), "");
}

#[test]
fn assembles_utf8_split_across_chunks() {
    let mut a = LineAssembler::default();
    let bytes = "héllo\n".as_bytes();
    assert!(a.push(&bytes[..2]).is_empty());
    assert_eq!(a.push(&bytes[2..]), vec!["héllo"]);
}

#[test]
fn console_keeps_text_tail_and_partial() {
    let mut c = Console::default();
    let mut log = None;
    for i in 0..40 {
        c.feed(format!("line {i}\r\n").as_bytes(), &mut log);
    }
    c.feed(b"\x1b[1mboot:\x1b[0m ", &mut log);
    assert!(c.seen_output());
    assert_eq!(c.partial(), "boot: ");
    let tail = c.tail(TAIL_LINES);
    assert_eq!(tail.len(), TAIL_LINES);
    assert_eq!(tail.first().map(String::as_str), Some("line 11"));
    assert_eq!(tail.last().map(String::as_str), Some("boot: "));
    let text = c.full_text();
    assert!(text.starts_with("line 0\nline 1\n"));
    assert!(text.ends_with("line 39\nboot: "));
}

#[test]
fn console_writes_clean_text_to_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let mut log = open_log(Some(&path)).unwrap();
    let mut c = Console::default();
    c.feed(b"\x1b[32mhello\r\n", &mut log);
    c.feed(b"wor", &mut log);
    c.feed(b"ld\r\n", &mut log);
    drop(log);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\nworld\n");
}

fn matcher(expect: &str, extra: &[&str]) -> Matcher {
    let extra: Vec<Regex> = extra.iter().map(|p| Regex::new(p).unwrap()).collect();
    Matcher::new(&Regex::new(expect).unwrap(), &extra).unwrap()
}

#[test]
fn patterns_that_match_the_empty_string_are_refused() {
    for p in [
        "",
        "login:|",
        "|login:",
        "x*",
        "^",
        "$",
        "(?:)",
        "(?m)^",
        "a?",
        r"\b",
        "(login:)?",
    ] {
        for option in ["--expect", "--fail-on"] {
            let err = console_pattern(option, p).expect_err(p);
            assert!(
                err.contains(option) && err.contains(&format!("{p:?}")),
                "{err}"
            );
            assert!(err.contains("matches the empty string"), "{err}");
        }
    }
    for p in [
        "login:",
        "login:|TINY: boot done",
        "^TINY: boot done$",
        "a+",
        "x*y",
    ] {
        console_pattern("--expect", p).unwrap();
    }
    let err = console_pattern("--expect", "(").unwrap_err();
    assert!(err.contains("invalid --expect regular expression"), "{err}");
}

#[test]
fn before_the_last_boot_only_fail_on_patterns_count() {
    let m = Matcher::new(
        &Regex::new("TINY: boot done").unwrap(),
        &[Regex::new("EXPLODED").unwrap()],
    )
    .unwrap();
    // A trial that panics is expected to reboot; the expectation waits
    // for the last boot.
    assert_eq!(
        m.check_line("Kernel panic - not syncing: Attempted to kill init!", false),
        Decision::Continue
    );
    assert_eq!(m.check_line("TINY: boot done", false), Decision::Continue);
    assert!(matches!(m.check_line("EXPLODED", false), Decision::Fail(_)));
    assert!(matches!(
        m.check_line("Kernel panic - not syncing: Attempted to kill init!", true),
        Decision::Fail(_)
    ));
    assert_eq!(m.check_line("TINY: boot done", true), Decision::Pass);
    let opts = BootTestOptions {
        reboots: 3,
        watchdog: true,
        ..BootTestOptions::new("/x.img", Regex::new("x").unwrap())
    };
    let args = qemu_args(&opts, Accel::Tcg).join(" ");
    assert!(!args.contains("-no-reboot"), "{args}");
    assert!(
        args.contains("-device i6300esb -action watchdog=reset"),
        "{args}"
    );
    let start = Regex::new(BOOT_START).unwrap();
    assert!(start.is_match("SYSLINUX 6.04 20210613 Copyright (C) 1994-2015 H. Peter Anvin et al"));
    assert!(!start.is_match("TINY-HOOK: SYSLINUX 6"));
}

#[test]
fn an_empty_match_never_decides_a_test() {
    // Built directly (not through console_pattern): still no pass on an
    // empty line or on text the pattern only matches emptily.
    let m = matcher("login:|", &["x*"]);
    assert_eq!(m.check_line("", true), Decision::Continue);
    assert_eq!(m.check_line("booting", true), Decision::Continue);
    assert_eq!(m.check_text(""), Decision::Continue);
    assert_eq!(m.check_line("debian login: ", true), Decision::Pass);
    assert!(matches!(m.check_line("xx", true), Decision::Fail(_)));
}

#[test]
fn decides_pass_on_line_and_on_text() {
    let m = matcher("^TINY: boot done$", &[]);
    assert_eq!(m.check_line("TINY: boot start", true), Decision::Continue);
    assert_eq!(m.check_line("TINY: boot done", true), Decision::Pass);
    // Anchors are per line: the whole text does not match without (?m).
    assert_eq!(m.check_text("a\nTINY: boot done\n"), Decision::Continue);
    let m = matcher(
        r"(?s)TINY-MOUNT: / /systems/x/run.*TINY-MOUNT: /home /state/home",
        &[],
    );
    assert_eq!(
        m.check_line("TINY-MOUNT: / /systems/x/run rw", true),
        Decision::Continue
    );
    assert_eq!(
        m.check_text("TINY-MOUNT: / /systems/x/run rw\nTINY-MOUNT: /home /state/home rw\n"),
        Decision::Pass
    );
}

#[test]
fn decides_fail_on_panic_and_extra_patterns_before_expect() {
    let m = matcher("TINY", &["^TINY-INITRAMFS: FAILED"]);
    match m.check_line(
        "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs",
        true,
    ) {
        Decision::Fail(r) => assert!(r.starts_with("kernel panic: "), "{r}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    // The line matches expect too, but the fatal pattern wins.
    match m.check_line(
        "TINY-INITRAMFS: FAILED: root device UUID=x not found (vda)",
        true,
    ) {
        Decision::Fail(r) => assert_eq!(
            r,
            "fatal console output: TINY-INITRAMFS: FAILED: root device UUID=x not found (vda)"
        ),
        other => panic!("expected a failure, got {other:?}"),
    }
    for line in [
        "Loading /systems/x/kernel... btrfs: found compressed data, cannot continue!",
        "failed: I/O error",
        "Loading /systems/default/initramfs...failed: No such file or directory",
    ] {
        match m.check_line(line, true) {
            Decision::Fail(r) => assert!(r.starts_with("bootloader failed: "), "{r}"),
            other => panic!("expected a failure for {line:?}, got {other:?}"),
        }
    }
    assert_eq!(
        m.check_line("Loading /systems/x/kernel... ok", true),
        Decision::Continue
    );
    assert_eq!(m.check_line("TINY: boot start", true), Decision::Pass);
}

#[test]
fn exit_reasons() {
    use std::os::unix::process::ExitStatusExt;
    let ok = Some(ExitStatus::from_raw(0));
    let err = Some(ExitStatus::from_raw(1 << 8));
    let mut stderr = VecDeque::new();
    assert_eq!(
        exit_reason(ok, true, &stderr),
        "guest powered off before the expected text appeared"
    );
    stderr.push_back("qemu-system-x86_64: -drive file=x: Could not open 'x'".to_string());
    let r = exit_reason(err, false, &stderr);
    assert!(r.starts_with("QEMU exited (exit status 1)"), "{r}");
    assert!(r.ends_with("Could not open 'x'"), "{r}");
}

#[test]
fn kvm_failure_markers() {
    assert!(is_kvm_failure("KVM internal error. Suberror: 1"));
    assert!(is_kvm_failure("emulation failure"));
    assert!(!is_kvm_failure(
        "qemu-system-x86_64: warning: host doesn't support requested feature"
    ));
}

#[test]
fn accel_parses_and_displays() {
    for a in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
        assert_eq!(a.to_string().parse::<Accel>().unwrap(), a);
    }
    assert!("hvf".parse::<Accel>().is_err());
}

#[test]
fn qemu_command_line() {
    let mut opts = BootTestOptions::new("/tmp/a,b.img", Regex::new("x").unwrap());
    let args = qemu_args(&opts, Accel::Tcg).join(" ");
    assert!(args.contains("-accel tcg"), "{args}");
    assert!(
        args.contains("-drive file=/tmp/a,,b.img,format=raw,if=virtio"),
        "{args}"
    );
    assert!(args.contains("-serial stdio"), "{args}");
    assert!(args.contains("-no-reboot"), "{args}");
    assert!(args.contains("-display none"), "{args}");
    assert!(args.ends_with("-snapshot"), "{args}");
    assert!(!args.contains("-kernel"), "{args}");
    opts.persist = true;
    opts.memory_mib = 256;
    let args = qemu_args(&opts, Accel::Kvm).join(" ");
    assert!(args.contains("-accel kvm -cpu host -m 256"), "{args}");
    assert!(!args.contains("-snapshot"), "{args}");
}

#[test]
fn missing_image_is_an_error() {
    if find_qemu(Firmware::Bios).is_err() {
        return; // the message for a missing QEMU is checked in real_boot
    }
    let opts = BootTestOptions::new("/nonexistent/disk.img", Regex::new("x").unwrap());
    let err = run(&opts).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}

/// A stand-in for QEMU: a shell script whose behaviour depends on the
/// accelerator it is given.
fn fake_qemu(dir: &Path, kvm_body: &str, tcg_body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-qemu");
    let script = format!(
        "#!/bin/sh\ncase \"$*\" in\n*'-accel kvm'*)\n{kvm_body}\n;;\n*)\n{tcg_body}\n;;\nesac\n"
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Options for the fake: an existing "image", short timeout.
fn fake_opts(dir: &Path, expect: &str, accel: Accel) -> BootTestOptions {
    let image = dir.join("disk.img");
    std::fs::write(&image, b"").unwrap();
    let mut opts = BootTestOptions::new(image, Regex::new(expect).unwrap());
    opts.accel = accel;
    opts.timeout = Duration::from_secs(20);
    opts
}

const FAKE_BOOT: &str = r#"printf '\033[0mSYSLINUX 6.04\r\nboot: '
label=$(head -c 2)
printf '\r\nchosen=%s\r\n' "$(printf %s "$label" | od -An -c | tr -d ' ')"
echo 'TINY: boot done'"#;

#[test]
fn auto_falls_back_to_tcg_when_kvm_prints_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = fake_qemu(dir.path(), "exec sleep 60", FAKE_BOOT);
    let mut opts = fake_opts(dir.path(), "^TINY: boot done$", Accel::Auto);
    opts.entry = Some("x".into());
    opts.log = Some(dir.path().join("log"));
    let start = Instant::now();
    let o = run_with(&qemu, &opts, true).unwrap();
    assert!(o.passed, "{o:?}");
    assert_eq!(o.accel_used, Accel::Tcg);
    assert!(
        o.console.contains("chosen=x\\r\n"),
        "the label and a carriage return are typed: {o:?}"
    );
    let total = start.elapsed();
    assert!(
        total >= KVM_LIVENESS && total < KVM_LIVENESS + Duration::from_secs(5),
        "{total:?}"
    );
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(
        log.contains("no serial output within 5 s); restarting with TCG"),
        "{log}"
    );
}

#[test]
fn auto_falls_back_to_tcg_on_kvm_errors() {
    let dir = tempfile::tempdir().unwrap();
    for kvm in [
        "echo 'KVM internal error. Suberror: 1' >&2; echo 'emulation failure' >&2; exec sleep 60",
        "echo 'qemu-system-x86_64: failed to initialize kvm: Permission denied' >&2; exit 1",
    ] {
        let qemu = fake_qemu(dir.path(), kvm, FAKE_BOOT);
        let mut opts = fake_opts(dir.path(), "^TINY: boot done$", Accel::Auto);
        opts.entry = Some("y".into());
        let start = Instant::now();
        let o = run_with(&qemu, &opts, true).unwrap();
        assert!(o.passed, "{o:?}");
        assert_eq!(o.accel_used, Accel::Tcg);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "KVM errors are detected at once"
        );

        // Explicit KVM: no fallback.
        let opts = fake_opts(dir.path(), "^TINY: boot done$", Accel::Kvm);
        let o = run_with(&qemu, &opts, true).unwrap();
        assert!(!o.passed);
        assert_eq!(o.accel_used, Accel::Kvm);
        assert!(o.reason.starts_with("KVM failed: "), "{}", o.reason);
    }
}

#[test]
fn outcomes_of_fake_runs() {
    let dir = tempfile::tempdir().unwrap();
    // Powered off before the text.
    let qemu = fake_qemu(dir.path(), "exit 1", "echo 'TINY: boot start'; exit 0");
    let o = run_with(
        &qemu,
        &fake_opts(dir.path(), "boot done", Accel::Tcg),
        false,
    )
    .unwrap();
    assert!(!o.passed);
    assert_eq!(
        o.reason,
        "guest powered off before the expected text appeared"
    );
    assert_eq!(o.tail, vec!["TINY: boot start"]);

    // Matched on an unterminated last line, at exit.
    let qemu = fake_qemu(dir.path(), "exit 1", "printf 'a\\nready> '");
    let o = run_with(
        &qemu,
        &fake_opts(dir.path(), "^ready> $", Accel::Tcg),
        false,
    )
    .unwrap();
    assert!(o.passed, "{o:?}");

    // Timeout while the guest keeps running; QEMU is killed and reaped.
    let pid_file = dir.path().join("pid");
    let qemu = fake_qemu(
        dir.path(),
        "exit 1",
        &format!(
            "echo $$ > {}; echo hello; exec sleep 60",
            pid_file.display()
        ),
    );
    let mut opts = fake_opts(dir.path(), "never", Accel::Tcg);
    opts.timeout = Duration::from_secs(1);
    let start = Instant::now();
    let o = run_with(&qemu, &opts, false).unwrap();
    assert!(!o.passed);
    assert_eq!(o.reason, "timeout after 1 s");
    assert!(start.elapsed() < Duration::from_secs(3));
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "QEMU (pid {pid}) is gone"
    );

    // With persist, the guest may finish after the match.
    let qemu = fake_qemu(
        dir.path(),
        "exit 1",
        "echo 'TINY: boot done'; sleep 1; echo synced; exit 0",
    );
    let mut opts = fake_opts(dir.path(), "boot done", Accel::Tcg);
    opts.persist = true;
    let o = run_with(&qemu, &opts, false).unwrap();
    assert!(o.passed, "{o:?}");
    assert!(o.console.ends_with("synced\n"), "{o:?}");
    assert!(
        o.elapsed < Duration::from_secs(1),
        "elapsed is the time to the match"
    );

    // A kernel panic fails at once.
    let qemu = fake_qemu(
        dir.path(),
        "exit 1",
        "echo '[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs'; exec sleep 60",
    );
    let o = run_with(&qemu, &fake_opts(dir.path(), "never", Accel::Tcg), false).unwrap();
    assert!(!o.passed);
    assert!(o.reason.starts_with("kernel panic: "), "{}", o.reason);
    assert!(o.elapsed < Duration::from_secs(3));

    // QEMU refusing to start.
    let qemu = fake_qemu(
        dir.path(),
        "exit 1",
        "echo 'qemu: Could not open disk.img' >&2; exit 1",
    );
    let o = run_with(&qemu, &fake_opts(dir.path(), "x", Accel::Tcg), false).unwrap();
    assert!(!o.passed);
    assert!(
        o.reason.starts_with("QEMU exited (exit status 1)"),
        "{}",
        o.reason
    );
    assert!(o.reason.contains("Could not open disk.img"), "{}", o.reason);
}

/// Real boots of a whole-disk Btrfs image with extlinux, built here from
/// the tiny system in the cache.
mod real_boot {
    use super::*;
    use std::process::Command;

    /// Where `scripts/build-tiny-system.sh .cache` puts its output.
    fn tiny_cache() -> PathBuf {
        match std::env::var_os("BTRFS_DEPLOY_CACHE") {
            Some(dir) => PathBuf::from(dir).join("tiny"),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tiny"),
        }
    }

    fn sh(cmd: &str) {
        let out = Command::new("sh").arg("-ec").arg(cmd).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Unmounts on drop so a failing test leaves no mount behind.
    struct MountGuard(PathBuf);
    impl Drop for MountGuard {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    /// Builds the Part-B layout: versions x and y (hostname tinyy),
    /// `systems/default -> y`, extlinux with entries default, x, y.
    fn build_image(dir: &Path) -> PathBuf {
        let tiny = tiny_cache();
        let rootfs = tiny.join("rootfs");
        assert!(
            rootfs.join("sbin/init").exists(),
            "the tiny test system is missing at {}: run `scripts/build-tiny-system.sh .cache` in the project root",
            rootfs.display()
        );
        assert!(
            is_root(),
            "boot tests need root (loop mounts, mkfs.btrfs, extlinux)"
        );
        let kver = std::fs::read_to_string(tiny.join("kernel-version")).unwrap();
        let kver = kver.trim();
        let img = dir.join("disk.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let (img_s, mnt_s, root_s) = (img.display(), mnt.display(), rootfs.display());
        sh(&format!(
            "truncate -s 512M {img_s} && mkfs.btrfs -q {img_s}"
        ));
        let uuid = String::from_utf8(
            Command::new("blkid")
                .args(["-s", "UUID", "-o", "value"])
                .arg(&img)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string();
        assert!(!uuid.is_empty());
        sh(&format!("mount -o loop {img_s} {mnt_s}"));
        let _guard = MountGuard(mnt.clone());
        let entry = |label: &str, dir: &str| {
            format!(
                "label {label}\n  kernel /systems/{dir}/kernel\n  initrd /systems/{dir}/initramfs\n  append root=UUID={uuid} rootfstype=btrfs rootflags=subvol=systems/{dir}/run rw console=tty0 console=ttyS0,115200\n\n"
            )
        };
        let conf = format!(
            "serial 0 115200\nprompt 1\ntimeout 10\ndefault default\n\n{}{}{}",
            entry("default", "default"),
            entry("x", "x"),
            entry("y", "y")
        );
        std::fs::write(dir.join("extlinux.conf"), conf).unwrap();
        sh(&format!(
            r#"cd {mnt_s}
            mkdir -p systems/x systems/y state extlinux
            btrfs -q subvolume create systems/x/run
            btrfs -q subvolume create state/home
            cp -a {root_s}/. systems/x/run/
            mv systems/x/run/home/* state/home/
            printf 'UUID={uuid} / btrfs defaults,rw,noatime 0 1\nUUID={uuid} /home btrfs subvol=/state/home,defaults,rw,noatime 0 2\n' >> systems/x/run/etc/fstab
            btrfs -q subvolume snapshot systems/x/run systems/y/run
            echo tinyy > systems/y/run/etc/hostname
            for v in x y; do
                cp {root_s}/boot/vmlinuz-{kver} systems/$v/kernel
                cp {root_s}/boot/initrd.img-{kver} systems/$v/initramfs
            done
            ln -s y systems/default
            cp {conf} extlinux/extlinux.conf
            ln -s extlinux/extlinux.conf extlinux.conf
            extlinux --install {mnt_s}/extlinux 2>/dev/null
            "#,
            conf = dir.join("extlinux.conf").display()
        ));
        drop(_guard);
        img
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn boot(img: &Path, entry: Option<&str>, expect: &str, accel: Accel) -> BootTestOutcome {
        let mut opts = BootTestOptions::new(img, Regex::new(expect).unwrap());
        opts.entry = entry.map(String::from);
        opts.accel = accel;
        opts.timeout = Duration::from_secs(120);
        opts.extra_fail = vec![Regex::new("^TINY-INITRAMFS: FAILED").unwrap()];
        opts.log = Some(img.with_extension("log"));
        run(&opts).unwrap()
    }

    fn show(o: &BootTestOutcome) -> String {
        format!(
            "{} after {:?} ({:?}):\n{}",
            o.reason,
            o.elapsed,
            o.accel_used,
            o.tail.join("\n")
        )
    }

    #[test]
    fn boots_default_and_chosen_entries() {
        let dir = tempfile::tempdir().unwrap();
        let img = build_image(dir.path());

        // Default entry: systems/default -> y, resolved by syslinux and
        // by the kernel's subvol= lookup.
        let o = boot(&img, None, "^TINY: boot done$", Accel::Auto);
        assert!(o.passed, "{}", show(&o));
        assert_eq!(o.reason, "matched");
        assert!(o.console.contains("TINY: hostname=tinyy\n"), "{}", show(&o));
        assert!(
            o.console.contains("TINY-MOUNT: / /systems/y/run "),
            "{}",
            show(&o)
        );
        assert!(
            o.console.contains("TINY-MOUNT: /home /state/home "),
            "{}",
            show(&o)
        );
        assert!(
            o.console.contains("rootflags=subvol=systems/default/run"),
            "{}",
            show(&o)
        );
        let log = std::fs::read_to_string(img.with_extension("log")).unwrap();
        assert!(log.contains("TINY: boot done"), "log: {log}");
        eprintln!(
            "default entry booted in {:?} with {}",
            o.elapsed, o.accel_used
        );

        // Entry x typed at the prompt.
        let o = boot(&img, Some("x"), "^TINY: boot done$", Accel::Tcg);
        assert!(o.passed, "{}", show(&o));
        assert_eq!(o.accel_used, Accel::Tcg);
        assert!(o.console.contains("TINY: hostname=tiny\n"), "{}", show(&o));
        assert!(
            o.console.contains("TINY-MOUNT: / /systems/x/run "),
            "{}",
            show(&o)
        );
    }

    #[test]
    fn fails_when_guest_powers_off_or_a_fatal_line_shows() {
        let dir = tempfile::tempdir().unwrap();
        let img = build_image(dir.path());

        let o = boot(&img, None, "^this never appears$", Accel::Tcg);
        assert!(!o.passed, "{}", show(&o));
        assert_eq!(
            o.reason,
            "guest powered off before the expected text appeared",
            "{}",
            show(&o)
        );
        assert!(
            o.tail.iter().any(|l| l == "TINY: boot done"),
            "{}",
            show(&o)
        );

        // A label that does not exist: syslinux says so and re-prompts.
        let o = boot(&img, Some("nosuch"), "^TINY: boot done$", Accel::Tcg);
        assert!(!o.passed, "{}", show(&o));
        assert_eq!(
            o.reason,
            "bootloader failed: Loading nosuch... failed: No such file or directory",
            "{}",
            show(&o)
        );

        let mut opts = BootTestOptions::new(&img, Regex::new("^TINY: boot done$").unwrap());
        opts.accel = Accel::Tcg;
        opts.timeout = Duration::from_secs(1);
        let o = run(&opts).unwrap();
        assert!(!o.passed);
        assert!(o.reason.starts_with("timeout after 1 s"), "{}", show(&o));
    }
}

#[test]
fn forwards_give_the_guest_a_user_network_and_bad_ones_are_refused() {
    let plain = qemu_args(
        &BootTestOptions::new("/x.img", Regex::new("x").unwrap()),
        Accel::Tcg,
    )
    .join(" ");
    assert!(plain.contains("-nic none"), "{plain}");
    let opts = BootTestOptions {
        forward: vec![
            Forward::parse("2222:22").unwrap(),
            Forward::parse("0.0.0.0:8080:80").unwrap(),
        ],
        ..BootTestOptions::new("/x.img", Regex::new("x").unwrap())
    };
    let args = qemu_args(&opts, Accel::Tcg).join(" ");
    assert!(
        args.contains(
            "-nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:0.0.0.0:8080-:80"
        ),
        "{args}"
    );
    assert!(!args.contains("-nic none"), "{args}");
    for (bad, needle) in [
        ("22", "not a port forward"),
        ("1:2:3:4", "not a port forward"),
        ("x:22", "\"x\" is not a port"),
        ("2222:0", "\"0\" is not a port"),
        ("70000:22", "\"70000\" is not a port"),
        ("host:2222:22", "not an IPv4 address"),
    ] {
        let err = Forward::parse(bad).unwrap_err();
        assert!(err.contains(needle), "{bad}: {err}");
    }
}
