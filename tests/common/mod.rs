//! Shared helpers for the integration tests: they run the real `deploy`
//! binary as root on real images, loop devices and Btrfs.
#![allow(dead_code)]

pub mod http;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `deploy` binary under test.
pub fn deploy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deploy"));
    c.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    c
}

/// Runs `deploy` with `args`, returning the output.
pub fn run(args: &[&str]) -> Output {
    let out = deploy().args(args).output().expect("running deploy");
    eprintln!(
        "deploy {}\n--- status {:?}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `deploy` and asserts success.
pub fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "deploy {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `deploy`, asserts exit status `code` and that stderr contains every `needle`.
pub fn run_fails(args: &[&str], code: i32, needles: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "deploy {args:?}: wrong exit status; stderr:\n{stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "deploy {args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
    stderr
}

/// Path of the tiny bootable system built by scripts/build-tiny-system.sh.
pub fn tiny_rootfs() -> PathBuf {
    let p = std::env::var_os("DEPLOY_TINY_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tiny/rootfs"));
    assert!(
        p.join("sbin/init").exists(),
        "tiny test system missing at {}: run `make fixture` (scripts/build-tiny-system.sh .cache)",
        p.display()
    );
    p
}

/// The Debian-with-systemd tree (`make fixture`: scripts/build-debian-system.sh),
/// named by `DEPLOY_DEBIAN_ROOTFS`.
pub fn debian_rootfs() -> PathBuf {
    let p = PathBuf::from(std::env::var("DEPLOY_DEBIAN_ROOTFS").unwrap_or_else(|_| {
        panic!(
            "DEPLOY_DEBIAN_ROOTFS is not set: build the Debian test system with \
             `scripts/build-debian-system.sh .cache` (or `make fixture`) and set \
             DEPLOY_DEBIAN_ROOTFS=.cache/debian12-systemd/rootfs"
        )
    }));
    assert!(
        p.join("lib/systemd/systemd").exists() && p.join("boot").is_dir(),
        "DEPLOY_DEBIAN_ROOTFS={} is not the Debian-with-systemd tree of \
         scripts/build-debian-system.sh",
        p.display()
    );
    p
}

/// Copies the tree `src` into the folder `dst` with `cp -a` (owners, modes,
/// links and xattrs kept).
pub fn copy_tree(src: &Path, dst: &Path) {
    sh(&format!("cp -a {}/. {}", src.display(), dst.display()));
}

/// The console text of boot `n` (1-based) in a `deploy boot-test --reboots`
/// log, whose boots are marked `---- boot-test: boot K ----`.
pub fn boot_of(log: &str, n: usize) -> String {
    let parts: Vec<&str> = log.split("---- boot-test: boot ").collect();
    assert!(
        parts.len() >= n,
        "the log has {} boot(s), not {n}:\n{log}",
        parts.len()
    );
    parts[n - 1].to_string()
}

/// Runs a shell command, asserting success; returns stdout.
pub fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

pub fn mknod(path: &Path, mode: u32, dev: u64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, dev as libc::dev_t) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

pub fn setxattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid pointers and lengths.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

pub fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid pointers and lengths.
    let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return None;
    }
    buf.truncate(rc as usize);
    Some(buf)
}

/// Kernel version used by the synthetic rootfs.
pub const FAKE_KVER: &str = "6.1.0-99-test";

/// A synthetic rootfs with every kind of entry design §4 lists, a fake
/// Debian-style kernel, and content in every state directory.
pub fn make_rootfs(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    chmod(root, 0o755);
    write(
        &root.join(format!("boot/vmlinuz-{FAKE_KVER}")),
        b"not really a kernel\n",
    );
    write(
        &root.join(format!("boot/initrd.img-{FAKE_KVER}")),
        b"not really an initramfs\n",
    );
    symlink(format!("boot/vmlinuz-{FAKE_KVER}"), root.join("vmlinuz")).unwrap();
    symlink(
        format!("boot/initrd.img-{FAKE_KVER}"),
        root.join("initrd.img"),
    )
    .unwrap();
    write(
        &root.join("etc/fstab"),
        b"# /etc/fstab: static file system information.\n",
    );
    write(&root.join("etc/hostname"), b"synthetic\n");
    write(
        &root.join("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    );
    write(&root.join("usr/bin/tool"), &vec![7u8; 100_000]);
    write(&root.join("usr/bin/suid"), b"#!/bin/sh\n");
    chmod(&root.join("usr/bin/suid"), 0o4755);
    write(&root.join("usr/bin/sgid"), b"#!/bin/sh\n");
    lchown(&root.join("usr/bin/sgid"), 0, 42);
    chmod(&root.join("usr/bin/sgid"), 0o2755);
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    chmod(&root.join("tmp"), 0o1777);
    write(&root.join("usr/bin/ping"), b"ping");
    setxattr(
        &root.join("usr/bin/ping"),
        "security.capability",
        &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    setxattr(&root.join("usr/bin/ping"), "user.note", b"hello");
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-alias")).unwrap();
    symlink("/usr/bin/tool", root.join("usr/bin/abs-link")).unwrap();
    symlink("../../nonexistent", root.join("usr/bin/dangling")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    mknod(
        &root.join("dev/null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    mknod(
        &root.join("dev/sda"),
        libc::S_IFBLK | 0o660,
        libc::makedev(8, 0),
    );
    mknod(&root.join("run-fifo"), libc::S_IFIFO | 0o600, 0);
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    let sparse = std::fs::File::create(root.join("usr/sparse.img")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    let mut s = sparse;
    s.seek(SeekFrom::Start(32 << 20)).unwrap();
    s.write_all(b"middle").unwrap();
    write(&root.join("home/user/notes.txt"), b"user data\n");
    lchown(&root.join("home/user/notes.txt"), 1000, 1000);
    lchown(&root.join("home/user"), 1000, 1000);
    chmod(&root.join("home/user"), 0o750);
    write(&root.join("root/.profile"), b"# root profile\n");
    chmod(&root.join("root"), 0o700);
    write(&root.join("var/lib/app/state"), b"var state\n");
    write(&root.join("srv/www/index.html"), b"<h1>srv</h1>\n");
    write(&root.join("opt/vendor/README"), b"opt\n");
    // Timestamps that a copy must preserve.
    sh(&format!(
        "touch -h -d '2001-02-03 04:05:06.123456789' {}/usr/bin/tool {}/usr/bin/abs-link",
        root.display(),
        root.display()
    ));
}

/// A read-only mount of an image's top-level subvolume, for inspection.
pub struct Inspect {
    pub dir: tempfile::TempDir,
    pub loopdev: String,
}

/// `losetup` options that select the Btrfs of `image`: on a GPT disk
/// (`--boot hybrid|uefi`) its second partition, else the whole image.
pub fn btrfs_losetup_range(image: &Path) -> String {
    match btrfs_partition(image) {
        Some((offset, size)) => format!("--offset {offset} --sizelimit {size}"),
        None => String::new(),
    }
}

/// Byte range (offset, size) of the Btrfs partition of a GPT image, read
/// with sfdisk; `None` for a whole-disk image.
pub fn btrfs_partition(image: &Path) -> Option<(u64, u64)> {
    let mut sig = [0u8; 8];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(image)
        .and_then(|f| f.read_exact_at(&mut sig, 512))
        .ok()?;
    if &sig != b"EFI PART" {
        return None;
    }
    let json: serde_json::Value =
        serde_json::from_str(&sh(&format!("sfdisk --json {}", image.display()))).unwrap();
    let p = &json["partitiontable"]["partitions"][1];
    Some((
        p["start"].as_u64().unwrap() * 512,
        p["size"].as_u64().unwrap() * 512,
    ))
}

impl Inspect {
    pub fn open(image: &Path) -> Inspect {
        let loopdev = sh(&format!(
            "losetup --find --show --read-only {} {}",
            btrfs_losetup_range(image),
            image.display()
        ))
        .trim()
        .to_string();
        let dir = tempfile::tempdir().unwrap();
        sh(&format!(
            "mount -o ro,subvolid=5 {loopdev} {}",
            dir.path().display()
        ));
        Inspect { dir, loopdev }
    }
    pub fn top(&self) -> &Path {
        self.dir.path()
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Inspect {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loopdev)
            .status();
    }
}

/// Loop devices backed by `file`.
pub fn loops_of(file: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .arg("-j")
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Asserts nothing of a deploy is left: no loop device on the image or its
/// .partial, no mount of a btrfs-deploy temp dir, and (unless allowed) no .partial.
pub fn assert_no_leftovers(image: &Path, partial_allowed: bool) {
    let partial = PathBuf::from(format!("{}.partial", image.display()));
    for _ in 0..20 {
        if loops_of(image).is_empty() && loops_of(&partial).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        loops_of(image).is_empty(),
        "loop device left on {}: {:?}",
        image.display(),
        loops_of(image)
    );
    assert!(
        loops_of(&partial).is_empty(),
        "loop device left on {}",
        partial.display()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("btrfs-deploy."),
        "a btrfs-deploy mount is left:\n{mounts}"
    );
    if !partial_allowed {
        assert!(!partial.exists(), "{} left behind", partial.display());
    }
}

/// Filesystem UUID of an image (of its Btrfs partition on a GPT image).
pub fn fs_uuid(image: &Path) -> String {
    let offset = btrfs_partition(image)
        .map(|(o, _)| format!("--offset {o}"))
        .unwrap_or_default();
    sh(&format!(
        "blkid -p {offset} -o value -s UUID {}",
        image.display()
    ))
    .trim()
    .to_string()
}

/// Numeric (uid, gid, mode) of a path, not following symlinks.
pub fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode())
}

/// A read-write mount of an image's top level, to play the user (edit
/// `run/etc`, write to `/state`) between deploys.
pub struct Edit(Inspect);

impl Edit {
    pub fn open(image: &Path) -> Edit {
        let loopdev = sh(&format!(
            "losetup --find --show {} {}",
            btrfs_losetup_range(image),
            image.display()
        ))
        .trim()
        .to_string();
        let dir = tempfile::tempdir().unwrap();
        sh(&format!(
            "mount -o subvolid=5 {loopdev} {}",
            dir.path().display()
        ));
        Edit(Inspect { dir, loopdev })
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.path(rel)
    }
}

/// Bytes of data allocated on the filesystem of an image (`btrfs filesystem usage`).
pub fn data_used(image: &Path) -> u64 {
    let m = Inspect::open(image);
    let out = sh(&format!("btrfs filesystem usage -b {}", m.top().display()));
    let line = out
        .lines()
        .find(|l| l.starts_with("Data,"))
        .expect("Data line");
    // "Data,single: Size:8388608, Used:1234 (x%)"
    let used = line
        .split("Used:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    used.trim_end_matches(',').parse().unwrap()
}

/// Physical offset of the first extent of a file (FIEMAP via filefrag).
pub fn first_extent(path: &Path) -> u64 {
    let out = sh(&format!("filefrag -v -b1 {}", path.display()));
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("0:"))
        .unwrap_or_else(|| panic!("no extent for {}:\n{out}", path.display()));
    // " 0:        0..   65535:   22020096..  22085631:  65536:  last,eof"
    let phys = line
        .split(':')
        .nth(2)
        .unwrap()
        .split("..")
        .next()
        .unwrap()
        .trim();
    phys.parse().unwrap()
}

/// A fingerprint of every byte of a (sparse) file: its length and a hash of
/// its non-zero 4 KiB blocks with their offsets, read from its data segments
/// only (SEEK_DATA/SEEK_HOLE), so a 400 MiB image holding 30 MiB is quick.
pub fn fingerprint(p: &Path) -> (u64, u64) {
    use std::hash::Hasher;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // SAFETY: plain lseek on an open descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        f.seek(SeekFrom::Start(data as u64)).unwrap();
        let mut at = data as u64;
        while at < hole as u64 {
            let n = ((hole as u64 - at) as usize).min(buf.len());
            f.read_exact(&mut buf[..n]).unwrap();
            for (i, block) in buf[..n].chunks(4096).enumerate() {
                if block.iter().any(|b| *b != 0) {
                    h.write_u64(at + i as u64 * 4096);
                    h.write(block);
                }
            }
            at += n as u64;
        }
        pos = hole;
    }
    (len, h.finish())
}

/// Boots `img` (optionally a given version) and returns the console text.
pub fn boot_console(img: &Path, version: Option<&str>) -> String {
    boot_console_with(img, version, None)
}

/// Like [`boot_console`], with `--firmware bios|uefi` when given.
pub fn boot_console_with(img: &Path, version: Option<&str>, firmware: Option<&str>) -> String {
    let mut extra = Vec::new();
    if let Some(v) = version {
        extra.extend(["--version", v]);
    }
    if let Some(f) = firmware {
        extra.extend(["--firmware", f]);
    }
    boot_console_args(img, &extra)
}

/// Boots `img` with `deploy boot-test` (TCG, `--timeout 120` unless
/// `extra` gives one) plus `extra` arguments, asserts it passed, and
/// returns the console log.
pub fn boot_console_args(img: &Path, extra: &[&str]) -> String {
    let log = PathBuf::from(format!("{}.console.log", img.display()));
    let mut args = vec![
        "boot-test",
        img.to_str().unwrap(),
        "--accel",
        "tcg",
        "--log",
        log.to_str().unwrap(),
    ];
    if !extra.contains(&"--timeout") {
        args.extend(["--timeout", "120"]);
    }
    args.extend(extra);
    let out = run_ok(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("boot-test passed") && stdout.contains(" s "),
        "{stdout}"
    );
    String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned()
}

/// The `TINY-MOUNT: <mountpoint> <root in fs> ...` lines, as (mountpoint, root).
pub fn mounts(console: &str) -> Vec<(String, String)> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TINY-MOUNT: "))
        .map(|l| {
            let mut f = l.split_whitespace();
            (f.next().unwrap().to_string(), f.next().unwrap().to_string())
        })
        .collect()
}

/// Asserts the guest mounted `/` from `systems/<label>/run` and every
/// state directory from its `/state` subvolume.
pub fn assert_layout_mounted(console: &str, label: &str) {
    let m = mounts(console);
    assert!(
        m.contains(&("/".into(), format!("/systems/{label}/run"))),
        "/ is not systems/{label}/run: {m:?}\n{console}"
    );
    for d in ["home", "root", "opt", "srv", "var"] {
        assert!(
            m.contains(&(format!("/{d}"), format!("/state/{d}"))),
            "/{d} is not /state/{d}: {m:?}"
        );
    }
}

/// A loop device over the Btrfs of `image` (its partition on a GPT image,
/// else the whole image), detached on drop: for tools that read a Btrfs
/// device (`btrfs check`, `btrfs inspect-internal`).
pub struct BtrfsDev {
    pub dev: String,
}

impl BtrfsDev {
    pub fn attach(image: &Path, read_only: bool) -> BtrfsDev {
        let dev = sh(&format!(
            "losetup --find --show {} {} {}",
            if read_only { "--read-only" } else { "" },
            btrfs_losetup_range(image),
            image.display()
        ))
        .trim()
        .to_string();
        BtrfsDev { dev }
    }
}

impl Drop for BtrfsDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// `btrfs check --readonly` of the Btrfs of `image`; Err with its output.
pub fn btrfs_check_image(image: &Path) -> Result<(), String> {
    let d = BtrfsDev::attach(image, true);
    let out = Command::new("btrfs")
        .args(["check", "--readonly", &d.dev])
        .output()
        .expect("btrfs check");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "btrfs check --readonly {} ({}): {}{}",
            image.display(),
            d.dev,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `deploy status IMG --json`, parsed.
pub fn status_json(img: &Path) -> serde_json::Value {
    let out = run_ok(&["status", img.to_str().unwrap(), "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The trial hooks a non-systemd init runs (docs/trials.md), executable, in
/// `tree/etc/tiny-boot.d`: `watch_hook` (e.g. `10-trial-watch`) settles the
/// last trial early at boot, and on a trial boot watches it for `timeout`
/// seconds in the background; `20-health` runs `deploy health`.
pub fn write_trial_hooks(tree: &Path, watch_hook: &str, timeout: u32) {
    let hooks = tree.join("etc/tiny-boot.d");
    write(
        &hooks.join(watch_hook),
        format!(
            "#!/bin/sh\n\
             # Early at boot: settle the last trial; on a trial boot, watch it.\n\
             if grep -q btrfs_deploy.trial= /proc/cmdline; then\n\
             \x20   deploy trial-watch --timeout {timeout} >/dev/console 2>&1 &\n\
             \x20   sleep 3\n\
             else\n\
             \x20   deploy trial-watch\n\
             fi\n"
        )
        .as_bytes(),
    );
    write(&hooks.join("20-health"), b"#!/bin/sh\ndeploy health\n");
    for h in [watch_hook, "20-health"] {
        chmod(&hooks.join(h), 0o755);
    }
}

/// Copies the modules `names` (without `.ko`) of the amd64 tiny system's kernel,
/// from the cached kernel .deb, into `tree/dir` (its initramfs loads only
/// those the disk needs).
pub fn add_tiny_kernel_modules(tree: &Path, dir: &str, names: &[&str]) {
    let debs = tiny_rootfs().join("../../debs");
    let deb = sh(&format!(
        "ls {}/linux-image-*-cloud-amd64_*.deb | tail -n1",
        debs.display()
    ));
    let x = tempfile::tempdir().unwrap();
    sh(&format!(
        "dpkg-deb -x {} {}",
        deb.trim(),
        x.path().display()
    ));
    let m = tree.join(dir);
    std::fs::create_dir_all(&m).unwrap();
    let find = names
        .iter()
        .map(|n| format!("-name {n}.ko"))
        .collect::<Vec<_>>()
        .join(" -o ");
    sh(&format!(
        "cp $(find {x} {find}) {m}",
        x = x.path().display(),
        m = m.display()
    ));
}
