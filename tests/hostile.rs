//! Hostile rootfs trees (issue 6): symlinks that point out of the tree must
//! be resolved inside it (or refused), never followed on the host. Sentinel
//! files on the host, whose content, mtime and atime are recorded before the
//! deploy, prove that nothing was read from or written to them.

mod common;
use common::*;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

/// What is recorded of a host file.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Stamp {
    content: Vec<u8>,
    mtime: (i64, i64),
    atime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

fn stamp(p: &Path) -> Stamp {
    // Read the times before the content (reading may update the atime).
    let m = std::fs::symlink_metadata(p).unwrap();
    let times = (
        (m.mtime(), m.mtime_nsec()),
        (m.atime(), m.atime_nsec()),
        (m.ctime(), m.ctime_nsec()),
        m.ino(),
    );
    // Read the content without touching the atime.
    let content = read_noatime(p);
    Stamp {
        content,
        mtime: times.0,
        atime: times.1,
        ctime: times.2,
        ino: times.3,
    }
}

/// Reads a file with O_NOATIME, so recording a sentinel does not change it.
fn read_noatime(p: &Path) -> Vec<u8> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(p)
        .unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// Host files (and directories' listings) that a deploy must not touch.
struct Sentinels {
    files: Vec<(PathBuf, Stamp)>,
    dirs: Vec<(PathBuf, Vec<String>, Stamp)>,
    /// Whether a read updates the atime on this filesystem (relatime with
    /// atime older than mtime: yes, unless mounted noatime).
    atime_tracks_reads: bool,
}

impl Sentinels {
    /// A host directory `dir` holding sentinel files `names`, with old times
    /// (atime older than mtime, so relatime records any read).
    fn new(dir: &Path, names: &[&str]) -> Sentinels {
        std::fs::create_dir_all(dir).unwrap();
        for n in names {
            let p = dir.join(n);
            write(
                &p,
                format!("HOST SENTINEL {n} - must not be read or written\n").as_bytes(),
            );
            set_old_times(&p);
        }
        let control = dir.join(".control");
        write(&control, b"control");
        set_old_times(&control);
        let before = stamp(&control);
        let _ = std::fs::read(&control).unwrap();
        let atime_tracks_reads = stamp(&control).atime != before.atime;
        std::fs::remove_file(&control).unwrap();
        if !atime_tracks_reads {
            eprintln!(
                "note: {} is on a filesystem that does not record reads (noatime): only content and mtime are checked",
                dir.display()
            );
        }
        let mut s = Sentinels {
            files: Vec::new(),
            dirs: Vec::new(),
            atime_tracks_reads,
        };
        s.add_dir(dir);
        for n in names {
            s.files.push((dir.join(n), stamp(&dir.join(n))));
        }
        s
    }

    fn add_dir(&mut self, dir: &Path) {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let m = std::fs::metadata(dir).unwrap();
        let st = Stamp {
            content: Vec::new(),
            mtime: (m.mtime(), m.mtime_nsec()),
            atime: (0, 0),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
        };
        self.dirs.push((dir.to_path_buf(), names, st));
    }

    /// Asserts every sentinel is as recorded: not written, and (where the
    /// filesystem records reads) not read.
    fn assert_untouched(&self, case: &str) {
        for (p, before) in &self.files {
            let now = stamp(p);
            assert_eq!(
                now.content,
                before.content,
                "{case}: {} was written",
                p.display()
            );
            assert_eq!(
                (now.mtime, now.ctime, now.ino),
                (before.mtime, before.ctime, before.ino),
                "{case}: {} was modified",
                p.display()
            );
            if self.atime_tracks_reads {
                assert_eq!(now.atime, before.atime, "{case}: {} was read", p.display());
            }
        }
        for (d, names, before) in &self.dirs {
            let mut now: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            now.sort();
            assert_eq!(&now, names, "{case}: entries of {} changed", d.display());
            let m = std::fs::metadata(d).unwrap();
            assert_eq!(
                (m.mtime(), m.mtime_nsec()),
                before.mtime,
                "{case}: {} was modified",
                d.display()
            );
        }
    }
}

fn set_old_times(p: &Path) {
    sh(&format!(
        "touch -m -d '2002-02-02 02:02:02' {0} && touch -a -d '2001-01-01 01:01:01' {0}",
        p.display()
    ));
}

/// A test case's directory: the rootfs, the host sentinels, the image.
struct Case {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    rootfs: PathBuf,
    img: PathBuf,
    host: PathBuf,
    sentinels: Sentinels,
}

/// A synthetic rootfs plus host sentinels in `<tmp>/host/` (outside the tree).
fn case() -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let rootfs = dir.join("rootfs");
    make_rootfs(&rootfs);
    let host = dir.join("host");
    let sentinels = Sentinels::new(&host, &["sentinel", "kernel", "initrd"]);
    Case {
        img: dir.join("disk.img"),
        _tmp: tmp,
        dir,
        rootfs,
        host,
        sentinels,
    }
}

impl Case {
    fn sentinel(&self) -> PathBuf {
        self.host.join("sentinel")
    }
    /// `../` repeated enough to climb out of the tree from `depth` levels down.
    fn escape(&self, depth: usize) -> String {
        let up = "../".repeat(depth + self.dir.components().count() + 2);
        format!(
            "{up}{}",
            self.sentinel()
                .display()
                .to_string()
                .trim_start_matches('/')
        )
    }
    fn deploy(&self) -> std::process::Output {
        run(&[
            "--rootfs",
            self.rootfs.to_str().unwrap(),
            self.img.to_str().unwrap(),
        ])
    }
    fn relink(&self, rel: &str, target: &str) {
        let p = self.rootfs.join(rel);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            let _ = std::fs::remove_file(&p);
        }
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, &p).unwrap();
    }
    /// After a refused deploy: exit 1, every needle in stderr, no image, nothing left.
    fn assert_refused(&self, out: &std::process::Output, needles: &[&str]) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
        }
        assert!(!self.img.exists(), "an image was left after a refusal");
        assert_no_leftovers(&self.img, false);
    }
    /// After a successful deploy: `deploy check` passes, nothing left.
    fn assert_deployed(&self, out: &std::process::Output) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_no_leftovers(&self.img, false);
        run_ok(&["check", self.img.to_str().unwrap()]);
    }
}

#[test]
fn fstab_symlink_to_a_host_path_uses_the_in_tree_file() {
    let c = case();
    // etc/fstab -> /<tmp>/host/sentinel: inside the tree that path holds the
    // rootfs's own fstab, which is what must be read and completed.
    let abs = c.sentinel().display().to_string();
    let in_tree = c.rootfs.join(abs.trim_start_matches('/'));
    write(
        &in_tree,
        b"# the tree's own fstab\nLABEL=data /data ext4 defaults 0 2\n",
    );
    c.relink("etc/fstab", &abs);
    let out = c.deploy();
    c.sentinels.assert_untouched("fstab -> host path");
    c.assert_deployed(&out);
    let m = Inspect::open(&c.img);
    let fstab = m.path("systems/factory/orig/etc/fstab");
    let meta = std::fs::symlink_metadata(&fstab).unwrap();
    assert!(meta.is_file(), "the completed fstab is a regular file");
    let text = std::fs::read_to_string(&fstab).unwrap();
    // The tree's lines, verbatim and in order (the added `/` goes before
    // /data and its comment).
    assert!(
        text.contains("\n# the tree's own fstab\nLABEL=data /data ext4 defaults 0 2\n"),
        "{text}"
    );
    assert!(
        text.contains(" / btrfs ") && text.contains("subvol=/state/home"),
        "{text}"
    );
    assert!(!text.contains("HOST SENTINEL"), "{text}");
    // The file the link pointed to inside the tree is not rewritten.
    let rel = abs.trim_start_matches('/');
    assert_eq!(
        std::fs::read(m.path("systems/factory/orig").join(rel)).unwrap(),
        b"# the tree's own fstab\nLABEL=data /data ext4 defaults 0 2\n"
    );
}

#[test]
fn fstab_symlink_to_a_host_only_path_is_refused_clearly() {
    let c = case();
    // Nothing at that path inside the tree: dangling there, refused.
    c.relink("etc/fstab", &c.sentinel().display().to_string());
    let out = c.deploy();
    c.sentinels.assert_untouched("fstab -> host-only path");
    c.assert_refused(&out, &["etc/fstab", "symlink", "inside"]);
}

#[test]
fn fstab_symlink_climbing_out_with_dotdot_is_refused_clearly() {
    let c = case();
    c.relink("etc/fstab", &c.escape(1));
    let out = c.deploy();
    c.sentinels.assert_untouched("fstab -> ../../..");
    c.assert_refused(&out, &["etc/fstab", "symlink"]);
}

#[test]
fn etc_symlink_to_a_host_directory_never_writes_there() {
    let c = case();
    // etc -> <host dir with an fstab>: resolved inside the tree it is missing.
    let hostetc = c.dir.join("hostetc");
    let s = Sentinels::new(&hostetc, &["fstab", "passwd"]);
    c.relink("etc", &hostetc.display().to_string());
    let out = c.deploy();
    s.assert_untouched("etc -> host dir");
    c.sentinels.assert_untouched("etc -> host dir");
    c.assert_refused(&out, &["etc", "symlink"]);
}

#[test]
fn home_symlink_to_slash_is_refused_and_nothing_is_written_to_the_host() {
    let c = case();
    // Sentinels in a host directory the link would reach through "/".
    c.relink("home", "/");
    let out = c.deploy();
    c.sentinels.assert_untouched("home -> /");
    c.assert_refused(&out, &["/home", "symlink"]);
}

#[test]
fn state_dir_symlinks_to_host_directories_are_refused() {
    for (dir, target) in [
        ("var", "ABS"),  // var -> /<tmp>/host
        ("srv", "UP"),   // srv -> ../../../<tmp>/host
        ("opt", "/"),    // opt -> /
        ("root", "ABS"), // root -> /<tmp>/host
    ] {
        let c = case();
        let target = match target {
            "ABS" => c.host.display().to_string(),
            "UP" => c.escape(0).trim_end_matches("/sentinel").to_string(),
            t => t.to_string(),
        };
        c.relink(dir, &target);
        let out = c.deploy();
        c.sentinels.assert_untouched(&format!("{dir} -> {target}"));
        c.assert_refused(&out, &[&format!("/{dir}"), "symlink"]);
    }
}

/// The kernel a successful deploy installed must be the tree's, never a host file.
fn assert_kernel_from_tree(c: &Case, allowed: &[&str]) {
    let m = Inspect::open(&c.img);
    let kernel = std::fs::read(m.path("systems/factory/kernel")).unwrap();
    assert!(
        !kernel.windows(13).any(|w| w == b"HOST SENTINEL"),
        "a host sentinel became the kernel"
    );
    let shadow = read_noatime(Path::new("/etc/shadow"));
    assert_ne!(kernel, shadow, "the host's /etc/shadow became the kernel");
    assert!(
        allowed
            .iter()
            .any(|rel| std::fs::read(c.rootfs.join(rel)).ok().as_ref() == Some(&kernel)),
        "the kernel is none of the tree's files {allowed:?}"
    );
}

#[test]
fn vmlinuz_to_etc_shadow_never_installs_the_host_file() {
    // Alone: resolved inside the tree there is no etc/shadow: no kernel.
    let c = case();
    std::fs::remove_file(c.rootfs.join(format!("boot/vmlinuz-{FAKE_KVER}"))).unwrap();
    c.relink("vmlinuz", "/etc/shadow");
    let out = c.deploy();
    c.assert_refused(&out, &["no kernel found"]);
    // With the tree's own etc/shadow: that in-tree file is what it names.
    let c = case();
    std::fs::remove_file(c.rootfs.join(format!("boot/vmlinuz-{FAKE_KVER}"))).unwrap();
    write(
        &c.rootfs.join("etc/shadow"),
        b"the tree's shadow, not a kernel\n",
    );
    c.relink("vmlinuz", "/etc/shadow");
    let out = c.deploy();
    if out.status.success() {
        c.assert_deployed(&out);
        assert_kernel_from_tree(&c, &["etc/shadow"]);
    } else {
        c.assert_refused(&out, &["kernel"]);
    }
}

#[test]
fn kernel_and_initramfs_links_out_of_the_tree_never_reach_the_host() {
    // vmlinuz -> a host sentinel (absolute), next to the tree's real kernel.
    let c = case();
    c.relink("vmlinuz", &c.host.join("kernel").display().to_string());
    let out = c.deploy();
    c.sentinels.assert_untouched("vmlinuz -> host file");
    c.assert_deployed(&out);
    assert_kernel_from_tree(&c, &[&format!("boot/vmlinuz-{FAKE_KVER}")]);

    // vmlinuz -> ../../../.. (the tree's root once resolved inside it: a directory).
    let c = case();
    c.relink("vmlinuz", "../../../..");
    let out = c.deploy();
    c.sentinels.assert_untouched("vmlinuz -> ../../../..");
    c.assert_deployed(&out);
    assert_kernel_from_tree(&c, &[&format!("boot/vmlinuz-{FAKE_KVER}")]);

    // The only kernel climbs out with ../: nothing in the tree, refused.
    let c = case();
    std::fs::remove_file(c.rootfs.join(format!("boot/vmlinuz-{FAKE_KVER}"))).unwrap();
    c.relink("vmlinuz", &c.escape(0).replace("sentinel", "kernel"));
    c.relink("boot/vmlinuz", &c.escape(1).replace("sentinel", "kernel"));
    let out = c.deploy();
    c.sentinels.assert_untouched("vmlinuz -> ../../host/kernel");
    c.assert_refused(&out, &["no kernel found"]);

    // The initramfs of the kernel's version links to a host file.
    let c = case();
    c.relink(
        &format!("boot/initrd.img-{FAKE_KVER}"),
        &c.host.join("initrd").display().to_string(),
    );
    c.relink("initrd.img", &c.escape(0).replace("sentinel", "initrd"));
    let out = c.deploy();
    c.sentinels.assert_untouched("initrd -> host file");
    if out.status.success() {
        c.assert_deployed(&out);
        c.assert_no_host_boot_file();
    } else {
        c.assert_refused(&out, &["initr"]);
    }
}

impl Case {
    fn assert_no_host_boot_file(&self) {
        assert_no_leftovers(&self.img, false);
        let m = Inspect::open(&self.img);
        for f in ["kernel", "initramfs"] {
            if let Ok(b) = std::fs::read(m.path(&format!("systems/factory/{f}"))) {
                assert!(
                    !b.windows(13).any(|w| w == b"HOST SENTINEL"),
                    "a host sentinel became the {f}"
                );
            }
        }
    }
}

#[test]
fn symlinks_out_of_the_tree_in_state_dirs_are_copied_as_links() {
    let c = case();
    let abs = c.sentinel().display().to_string();
    let hostdir = c.host.display().to_string();
    let links = [
        ("home/user/abs-link", abs.clone()),
        ("home/user/dir-link", hostdir.clone()),
        ("var/lib/app/up-link", c.escape(3)),
        ("srv/www/root-link", "/".to_string()),
        ("root/.shadow-link", "/etc/shadow".to_string()),
        ("opt/vendor/loop", "loop".to_string()),
    ];
    for (rel, target) in &links {
        symlink(target, c.rootfs.join(rel)).unwrap();
    }
    let out = c.deploy();
    c.sentinels.assert_untouched("state links");
    c.assert_deployed(&out);
    {
        let m = Inspect::open(&c.img);
        for (rel, target) in &links {
            let p = m.path(&format!("state/{rel}"));
            let meta = std::fs::symlink_metadata(&p).unwrap();
            assert!(meta.file_type().is_symlink(), "{rel} is not a symlink");
            assert_eq!(std::fs::read_link(&p).unwrap(), Path::new(target), "{rel}");
        }
        // The version keeps its vendor copy, links as links.
        assert_eq!(
            std::fs::read_link(m.path("systems/factory/orig/home/user/abs-link")).unwrap(),
            Path::new(&abs)
        );
    }

    // An upgrade moves /state to a rootfs whose new entries are links out
    // of the tree, and whose home/user/dir-link is a real directory now: the
    // link in /state (the device never changed it) is replaced by that
    // directory, never written through.
    let v2 = c.dir.join("v2");
    sh(&format!("cp -a {} {}", c.rootfs.display(), v2.display()));
    std::fs::remove_file(v2.join("home/user/dir-link")).unwrap();
    write(
        &v2.join("home/user/dir-link/planted"),
        b"must not reach the host\n",
    );
    symlink(&abs, v2.join("home/new-link")).unwrap();
    write(&v2.join("var/new/file"), b"seeded\n");
    symlink(&hostdir, v2.join("var/new/dir-link")).unwrap();
    run_ok(&[
        "--version",
        "v2",
        "--rootfs",
        v2.to_str().unwrap(),
        c.img.to_str().unwrap(),
    ]);
    c.sentinels.assert_untouched("upgrade seeding links");
    assert!(!c.host.join("planted").exists());
    let m = Inspect::open(&c.img);
    assert_eq!(
        std::fs::read_link(m.path("state/home/new-link")).unwrap(),
        Path::new(&abs)
    );
    let dl = m.path("state/home/user/dir-link");
    assert!(dl.symlink_metadata().unwrap().is_dir(), "not replaced");
    assert_eq!(
        std::fs::read(dl.join("planted")).unwrap(),
        b"must not reach the host\n"
    );
    assert_eq!(
        std::fs::read_link(m.path("state/var/new/dir-link")).unwrap(),
        Path::new(&hostdir)
    );
    assert_eq!(
        std::fs::read(m.path("state/var/new/file")).unwrap(),
        b"seeded\n"
    );
}

#[test]
fn links_elsewhere_in_the_tree_are_kept_as_links_and_never_followed() {
    let c = case();
    let abs = c.sentinel().display().to_string();
    let links = [
        ("etc/hostname", abs.clone()),
        ("etc/passwd", c.escape(1)),
        ("usr/lib/hostdir", c.host.display().to_string()),
        ("usr/lib/rootdir", "/".to_string()),
    ];
    for (rel, target) in &links {
        c.relink(rel, target);
    }
    let out = c.deploy();
    c.sentinels.assert_untouched("links in the tree");
    c.assert_deployed(&out);
    let m = Inspect::open(&c.img);
    for (rel, target) in &links {
        for sub in ["orig", "run"] {
            let p = m.path(&format!("systems/factory/{sub}/{rel}"));
            assert_eq!(
                std::fs::read_link(&p).unwrap(),
                Path::new(target),
                "{sub}/{rel}"
            );
        }
    }
}

#[test]
fn sentinels_detect_reads_and_writes() {
    // The harness itself: a read (where recorded) and a write are caught.
    let tmp = tempfile::tempdir().unwrap();
    let s = Sentinels::new(tmp.path(), &["a"]);
    let p = tmp.path().join("a");
    if s.atime_tracks_reads {
        let _ = std::fs::read(&p).unwrap();
        let r = std::panic::catch_unwind(|| s.assert_untouched("read"));
        assert!(r.is_err(), "a read was not detected");
    }
    let s = Sentinels::new(&tmp.path().join("b"), &["a"]);
    std::fs::write(tmp.path().join("b/a"), b"changed").unwrap();
    let r = std::panic::catch_unwind(|| s.assert_untouched("write"));
    assert!(r.is_err(), "a write was not detected");
}

/// The on-device extension updates its folder in place, the copy kept from
/// the last version (`# keeps:`) included, and never through a link: a
/// host file identical to one it carries, reached through a link in the
/// kept copy, stays where it is; a symlink in the folder's place (here to
/// the tree's own /etc) is replaced, and /etc is left whole.
#[test]
fn on_device_never_follows_links_in_the_folder_it_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let hostlib = dir.join("hostlib");
    std::fs::create_dir(&hostlib).unwrap();
    let libc = std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    std::fs::copy(&libc, hostlib.join("libc.so.6")).unwrap();
    let before = stamp(&hostlib.join("libc.so.6"));

    let r1 = dir.join("r1");
    copy_tree(&tiny_rootfs(), &r1);
    std::fs::create_dir_all(r1.join("usr/lib/btrfs-deploy")).unwrap();
    symlink(&hostlib, r1.join("usr/lib/btrfs-deploy/lib")).unwrap();
    let img = dir.join("disk.img");
    run_ok(&["--rootfs", r1.to_str().unwrap(), img.to_str().unwrap()]);
    // v2's rootfs lacks the folder: the sync keeps factory's, link included.
    run_ok(&[
        "-e",
        "on-device",
        "--version",
        "v2",
        "--rootfs",
        tiny_rootfs().to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(
        stamp(&hostlib.join("libc.so.6")),
        before,
        "host file moved or changed"
    );
    {
        let m = Inspect::open(&img);
        let lib = m.path("systems/v2/orig/usr/lib/btrfs-deploy/lib");
        assert!(!lib.is_symlink() && lib.join("libc.so.6").is_file());
    }

    let r3 = dir.join("r3");
    copy_tree(&tiny_rootfs(), &r3);
    std::fs::create_dir_all(r3.join("usr/lib")).unwrap();
    symlink("../../etc", r3.join("usr/lib/btrfs-deploy")).unwrap();
    let fresh = dir.join("fresh.img");
    run_ok(&[
        "-e",
        "on-device",
        "--rootfs",
        r3.to_str().unwrap(),
        fresh.to_str().unwrap(),
    ]);
    let m = Inspect::open(&fresh);
    let orig = m.path("systems/factory/orig");
    assert!(
        orig.join("etc/hostname").is_file(),
        "the tree's /etc was replaced"
    );
    let tool = orig.join("usr/lib/btrfs-deploy");
    assert!(!tool.is_symlink() && tool.join("bin/deploy").is_file());
}
