//! `deploy run-in-tree TREE -- CMD...`: run a command chrooted in a root
//! tree the way package scripts expect a running system (design §5):
//!
//! - `/proc`, `/sys` (read-only), `/dev` (the host's, bound), `/dev/pts` (a
//!   new devpts instance) and `/dev/shm` (a tmpfs) are mounted;
//! - the host's resolv.conf is put in place as `/etc/resolv.conf`;
//! - `/usr/sbin/policy-rc.d` exits 101, so `invoke-rc.d` and
//!   `deb-systemd-invoke` start no service;
//! - afterwards every process whose root is inside the tree is killed, every
//!   mount under the tree is undone and both files are restored exactly
//!   (including when the original was a symlink or absent), whatever happens.
//!
//! The caller runs in a private mount namespace
//! ([`crate::disk::mount::enter_private_namespace`]), so even a crash leaves no
//! mount behind on the host. A crash can leave the two replaced files: the
//! originals are kept next to them (`.resolv.conf.btrfs-deploy-saved`, ...)
//! and put back by the next run.

use crate::disk::mount::MountGuard;
use crate::util::rootpath;
use crate::UsageError;
use anyhow::{bail, Context, Result};
use nix::mount::{umount2, MntFlags, MsFlags};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// PATH of the command run inside the tree.
const IN_TREE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The policy-rc.d put in place: 101 = "action forbidden by policy".
pub const POLICY_RC_D: &str =
    "#!/bin/sh\n# Put here by btrfs-deploy run-in-tree: no service starts.\nexit 101\n";
/// Suffix of the saved original of a replaced file.
const SAVED_SUFFIX: &str = ".btrfs-deploy-saved";
/// Suffix of the marker saying a replaced file did not exist.
const ABSENT_SUFFIX: &str = ".btrfs-deploy-absent";
/// How long leftover processes may take to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `cmd` chrooted in `tree` (see the module documentation) and returns
/// its exit code (128 + N when killed by signal N). stdin, stdout and stderr
/// are the caller's.
pub fn run_in_tree(tree: &Path, cmd: &[String]) -> Result<i32> {
    if cmd.is_empty() {
        return Err(UsageError(
            "run-in-tree: no command given (deploy run-in-tree TREE -- CMD [ARGS...])".into(),
        )
        .into());
    }
    let tree = check_tree(tree)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("run-in-tree must run as root (it mounts and chroots)");
    }

    let before = mounts_under(&tree)?;
    let mut session = Session::default();
    let result = session.setup(&tree).and_then(|()| run_command(&tree, cmd));
    let cleanup = session.teardown(&tree, &before);
    match (result, cleanup) {
        (Ok(code), Ok(())) => Ok(code),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(ce)) => {
            tracing::error!("cleaning up {}: {ce:#}", tree.display());
            Err(e)
        }
    }
}

/// Makes sure the programs of `tree` can run here: a tree of another
/// architecture runs through qemu-user (see [`crate::tree::foreign`]; a
/// tree whose architecture cannot be read is run as it is). Called before
/// entering the private mount namespace, so that a registration it makes
/// outlives this process.
pub fn prepare_foreign(tree: &Path) -> Result<()> {
    if let Ok(arch) = crate::tree::arch::detect_rootfs(tree) {
        let what = format!("tree {}", tree.display());
        if let Some(note) = crate::tree::foreign::ensure_runnable(arch, &what)? {
            tracing::info!("{note}");
        }
    }
    Ok(())
}

/// The tree, canonical; must be a directory other than `/`.
fn check_tree(tree: &Path) -> Result<PathBuf> {
    let canon = tree
        .canonicalize()
        .with_context(|| format!("tree {} does not exist", tree.display()))?;
    if !canon.is_dir() {
        bail!("tree {} is not a directory", tree.display());
    }
    if canon == Path::new("/") {
        bail!("run-in-tree needs a root tree other than the host's /");
    }
    Ok(canon)
}

/// Everything put in place for one run, undone by [`Session::teardown`].
#[derive(Default)]
struct Session {
    mounts: Vec<MountGuard>,
    mount_points: Vec<PathBuf>,
    files: Vec<Replaced>,
    created_dirs: Vec<PathBuf>,
}

impl Session {
    fn setup(&mut self, tree: &Path) -> Result<()> {
        let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        self.mount(tree, "proc", Some("proc"), "proc", nosuid, None)?;
        self.mount(
            tree,
            "sys",
            Some("sysfs"),
            "sysfs",
            nosuid | MsFlags::MS_RDONLY,
            None,
        )?;
        self.mount(tree, "dev", Some("/dev"), "", MsFlags::MS_BIND, None)?;
        self.mount(
            tree,
            "dev/pts",
            Some("devpts"),
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        )?;
        self.mount(
            tree,
            "dev/shm",
            Some("tmpfs"),
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        )?;
        match std::fs::read("/etc/resolv.conf") {
            Ok(content) => {
                let etc = ensure_dir(tree, "etc", &mut self.created_dirs)?;
                self.files
                    .push(Replaced::install(&etc, "resolv.conf", &content, 0o644)?);
            }
            Err(e) => tracing::debug!("host /etc/resolv.conf unreadable ({e}): not copied in"),
        }
        let sbin = ensure_dir(tree, "usr/sbin", &mut self.created_dirs)?;
        self.files.push(Replaced::install(
            &sbin,
            "policy-rc.d",
            POLICY_RC_D.as_bytes(),
            0o755,
        )?);
        Ok(())
    }

    /// Mounts `source` on `tree/rel`, which must be a real directory
    /// (created when missing, removed afterwards).
    fn mount(
        &mut self,
        tree: &Path,
        rel: &str,
        source: Option<&str>,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()> {
        let target = tree.join(rel);
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "{} is not a directory: cannot mount {fstype} there",
                target.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&target)
                    .with_context(|| format!("creating {}", target.display()))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
                self.created_dirs.push(target.clone());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
        }
        let fstype = (!fstype.is_empty()).then_some(fstype);
        let guard = MountGuard::mount_at(source.map(Path::new), &target, fstype, flags, data)?;
        self.mounts.push(guard);
        self.mount_points.push(target);
        Ok(())
    }

    /// Kills leftovers, unmounts everything mounted under the tree since
    /// `before`, restores the files, removes the directories created.
    fn teardown(&mut self, tree: &Path, before: &[PathBuf]) -> Result<()> {
        let mut errors: Vec<anyhow::Error> = Vec::new();
        if let Err(e) = kill_leftovers(tree) {
            errors.push(e);
        }
        if let Err(e) = self.unmount_all(tree, before) {
            errors.push(e);
        }
        while let Some(mut f) = self.files.pop() {
            if let Err(e) = f.restore() {
                errors.push(e);
            }
        }
        while let Some(d) = self.created_dirs.pop() {
            if let Err(e) = std::fs::remove_dir(&d) {
                tracing::warn!("removing {}: {e}", d.display());
            }
        }
        match errors.len() {
            0 => Ok(()),
            _ => {
                let first = errors.remove(0);
                for e in errors {
                    tracing::error!("{e:#}");
                }
                Err(first.context(format!("cleaning up after running in {}", tree.display())))
            }
        }
    }

    fn unmount_all(&mut self, tree: &Path, before: &[PathBuf]) -> Result<()> {
        // Mounts the command made (possibly on top of ours) go first, deepest first.
        let mut foreign = new_mounts(&mounts_under(tree)?, before);
        for ours in &self.mount_points {
            if let Some(i) = foreign.iter().position(|p| p == ours) {
                foreign.remove(i);
            }
        }
        foreign.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in &foreign {
            detach(p);
        }
        let mut result = Ok(());
        while let Some(g) = self.mounts.pop() {
            self.mount_points.pop();
            if let Err(e) = g.close() {
                tracing::debug!("{e:#}; detaching lazily");
                result = Err(e);
            }
        }
        let left = new_mounts(&mounts_under(tree)?, before);
        if !left.is_empty() {
            for p in left.iter().rev() {
                detach(p);
            }
            let left = new_mounts(&mounts_under(tree)?, before);
            if !left.is_empty() {
                bail!("still mounted under {}: {left:?}", tree.display());
            }
        }
        if let Err(e) = &result {
            tracing::warn!("{e:#} (the mount was detached lazily)");
        }
        Ok(())
    }
}

fn detach(p: &Path) {
    if umount2(p, MntFlags::empty()).is_err() {
        if let Err(e) = umount2(p, MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", p.display());
        }
    }
}

/// `now` minus one occurrence of each entry of `before`.
fn new_mounts(now: &[PathBuf], before: &[PathBuf]) -> Vec<PathBuf> {
    let mut left = now.to_vec();
    for b in before {
        if let Some(i) = left.iter().position(|p| p == b) {
            left.remove(i);
        }
    }
    left
}

/// Mount points strictly under `tree`, in mount order (a path appears once
/// per mount stacked on it).
pub fn mounts_under(tree: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(crate::disk::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p != tree && p.starts_with(tree))
        .collect())
}

/// The host path of directory `rel` inside `tree` (symlinks resolved within
/// the tree), creating missing components (recorded in `created`).
fn ensure_dir(tree: &Path, rel: &str, created: &mut Vec<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = rootpath::try_resolve_in_root(tree, Path::new(rel))? {
        if !std::fs::symlink_metadata(&p)?.is_dir() {
            bail!("/{rel} in {} is not a directory", tree.display());
        }
        return Ok(p);
    }
    let mut cur = tree.to_path_buf();
    for comp in rel.split('/') {
        let next = cur.join(comp);
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.is_dir() => cur = next,
            Ok(m) if m.file_type().is_symlink() => {
                let inner = next.strip_prefix(tree).unwrap_or(Path::new(comp));
                match rootpath::try_resolve_in_root(tree, inner)? {
                    Some(p) if p.is_dir() => cur = p,
                    _ => bail!(
                        "/{} in {} is a dangling symlink or not a directory",
                        inner.display(),
                        tree.display()
                    ),
                }
            }
            Ok(_) => bail!("{} is not a directory", next.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&next)
                    .with_context(|| format!("creating {}", next.display()))?;
                std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755))?;
                created.push(next.clone());
                cur = next;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", next.display())),
        }
    }
    Ok(cur)
}

/// A file replaced for the duration of a run; the original (or its absence)
/// is restored by [`Replaced::restore`], or on drop.
struct Replaced {
    path: PathBuf,
    saved: PathBuf,
    absent: PathBuf,
    active: bool,
}

impl Replaced {
    fn new(dir: &Path, name: &str) -> Replaced {
        Replaced {
            path: dir.join(name),
            saved: dir.join(format!(".{name}{SAVED_SUFFIX}")),
            absent: dir.join(format!(".{name}{ABSENT_SUFFIX}")),
            active: true,
        }
    }

    /// Puts `content` (mode `mode`) at `dir/name`, keeping the original aside.
    /// Leftovers of an interrupted run are restored first.
    fn install(dir: &Path, name: &str, content: &[u8], mode: u32) -> Result<Replaced> {
        let mut r = Replaced::new(dir, name);
        r.restore()?;
        r.active = true;
        match std::fs::symlink_metadata(&r.path) {
            Ok(m) if m.is_dir() => {
                r.active = false;
                bail!("{} is a directory", r.path.display())
            }
            Ok(_) => std::fs::rename(&r.path, &r.saved)
                .with_context(|| format!("moving {} to {}", r.path.display(), r.saved.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(&r.absent, b"")
                    .with_context(|| format!("creating {}", r.absent.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", r.path.display())),
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&r.path)
            .with_context(|| format!("creating {}", r.path.display()))?;
        f.write_all(content)
            .with_context(|| format!("writing {}", r.path.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        Ok(r)
    }

    /// Puts the original back (or removes the file when there was none).
    /// Does nothing when no original was set aside.
    fn restore(&mut self) -> Result<()> {
        let has_saved = std::fs::symlink_metadata(&self.saved).is_ok();
        let was_absent = std::fs::symlink_metadata(&self.absent).is_ok();
        if has_saved || was_absent {
            match std::fs::symlink_metadata(&self.path) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&self.path),
                Ok(_) => std::fs::remove_file(&self.path),
                Err(_) => Ok(()),
            }
            .with_context(|| format!("removing {}", self.path.display()))?;
            if has_saved {
                std::fs::rename(&self.saved, &self.path).with_context(|| {
                    format!(
                        "restoring {} from {}",
                        self.path.display(),
                        self.saved.display()
                    )
                })?;
            }
            if was_absent {
                std::fs::remove_file(&self.absent)
                    .with_context(|| format!("removing {}", self.absent.display()))?;
            }
        }
        self.active = false;
        Ok(())
    }
}

impl Drop for Replaced {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = self.restore() {
                tracing::warn!("{e:#}");
            }
        }
    }
}

static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

const FORWARDED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Starts the command chrooted in `tree` and waits for it. While it runs,
/// SIGINT/SIGTERM/SIGHUP/SIGQUIT sent to us are passed on to it, so we live
/// to clean up.
fn run_command(tree: &Path, cmd: &[String]) -> Result<i32> {
    let root = CString::new(tree.as_os_str().as_bytes()).context("tree path contains NUL")?;
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    c.env("PATH", IN_TREE_PATH);
    c.env("HOME", "/root");
    if std::env::var_os("DEBIAN_FRONTEND").is_none() {
        c.env("DEBIAN_FRONTEND", "noninteractive");
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tracing::debug!(tree = %tree.display(), ?cmd, "running in tree");
    PENDING_SIGNAL.store(0, Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::Handler(remember_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    let mut old = Vec::new();
    for s in FORWARDED {
        // SAFETY: the handler only stores to an atomic.
        if let Ok(prev) = unsafe { signal::sigaction(s, &action) } {
            old.push((s, prev));
        }
    }
    let result = spawn_and_wait(&mut c, tree, cmd);
    for (s, prev) in old {
        // SAFETY: restores the previous disposition.
        let _ = unsafe { signal::sigaction(s, &prev) };
    }
    result
}

fn spawn_and_wait(c: &mut Command, tree: &Path, cmd: &[String]) -> Result<i32> {
    let child = c
        .spawn()
        .with_context(|| format!("running {:?} in {}", cmd[0], tree.display()))?;
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => {
                let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
                if let Ok(s) = Signal::try_from(sig) {
                    let _ = signal::kill(pid, s);
                }
            }
            Err(e) => return Err(e).context("waiting for the command"),
        }
    }
}

/// Processes whose root directory is `tree` or inside it.
pub fn processes_in(tree: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/root"))
                .map(|r| r.starts_with(tree))
                .unwrap_or(false)
        })
        .collect()
}

/// SIGKILLs every process rooted in `tree` until none is left.
fn kill_leftovers(tree: &Path) -> Result<()> {
    let start = Instant::now();
    let mut reported = false;
    loop {
        let pids = processes_in(tree);
        if pids.is_empty() {
            return Ok(());
        }
        if !reported {
            tracing::info!(
                "killing processes left running in {}: {pids:?}",
                tree.display()
            );
            reported = true;
        }
        if start.elapsed() > KILL_TIMEOUT {
            bail!(
                "processes {pids:?} still run in {} after SIGKILL",
                tree.display()
            );
        }
        for pid in pids {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Set in the re-executed test process (inside `unshare --mount`).
    const CHILD_ENV: &str = "BTRFS_DEPLOY_INTREE_CHILD";

    fn busybox() -> PathBuf {
        let p = std::env::var_os("DEPLOY_TINY_ROOTFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tiny/rootfs"))
            .join("bin/busybox");
        assert!(
            p.exists(),
            "{} missing: run `make fixture` (the tests need a static busybox)",
            p.display()
        );
        p
    }

    /// A minimal tree: a static busybox, a few applets, and a fake
    /// invoke-rc.d that honours policy-rc.d like Debian's.
    fn make_tree(tree: &Path) {
        for d in ["bin", "usr/sbin", "etc", "proc", "sys", "dev", "out", "tmp"] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::copy(busybox(), tree.join("bin/busybox")).unwrap();
        for applet in ["sh", "cat", "ls", "sleep", "echo", "test"] {
            symlink("busybox", tree.join("bin").join(applet)).unwrap();
        }
        let invoke = tree.join("usr/sbin/invoke-rc.d");
        std::fs::write(
            &invoke,
            "#!/bin/sh\nif [ -x /usr/sbin/policy-rc.d ]; then\n  /usr/sbin/policy-rc.d \"$1\" \"$2\"\n  \
             if [ $? = 101 ]; then echo \"refused $1 $2\"; exit 0; fi\nfi\n\
             echo \"started $1\" > /out/started\n",
        )
        .unwrap();
        std::fs::set_permissions(&invoke, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn sv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Runs this test again in a private mount namespace (mounts made by the
    /// test never touch the host's namespace); the child does the work.
    fn in_private_namespace(test: &str, tree: &Path) {
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, tree)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{text}");
        assert!(out.status.success(), "child test failed");
        assert!(text.contains("1 passed"), "the child did not run the test");
        assert!(
            tree.join("out/child-done").exists(),
            "the child did not finish"
        );
    }

    #[test]
    fn runs_a_command_in_the_tree_and_cleans_up() {
        const NAME: &str = "tree::intree::tests::runs_a_command_in_the_tree_and_cleans_up";
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (mounts in a private namespace): run the suite as root"
        );
        if let Some(tree) = std::env::var_os(CHILD_ENV) {
            return child_runs_a_command(Path::new(&tree));
        }
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        make_tree(&tree);
        symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            tree.join("etc/resolv.conf"),
        )
        .unwrap();
        in_private_namespace(NAME, &tree);
        // The host's namespace never saw a mount under the tree.
        assert!(mounts_under(&tree).unwrap().is_empty());
    }

    fn child_runs_a_command(tree: &Path) {
        let tree = tree.canonicalize().unwrap();
        let script = "ls /proc/1 > /dev/null && cat /proc/self/stat > /out/stat\n\
             ls /sys/kernel > /out/sys\n\
             ls /dev/pts > /out/pts && echo hello > /dev/null\n\
             cat /etc/resolv.conf > /out/resolv\n\
             /usr/sbin/invoke-rc.d ssh start > /out/invoke\n\
             sleep 1000 &\n\
             echo $! > /out/bgpid\n\
             exit 3";
        let code = run_in_tree(&tree, &sv(&["sh", "-c", script])).unwrap();
        assert_eq!(code, 3);
        let read = |f: &str| std::fs::read_to_string(tree.join("out").join(f)).unwrap();
        assert!(!read("stat").is_empty());
        assert!(!read("sys").is_empty());
        assert_eq!(
            read("resolv"),
            std::fs::read_to_string("/etc/resolv.conf").unwrap()
        );
        assert_eq!(read("invoke"), "refused ssh start\n");
        assert!(!tree.join("out/started").exists());
        // The background sleep is gone, nothing runs in the tree.
        let bg: i32 = read("bgpid").trim().parse().unwrap();
        let alive = std::fs::read_link(format!("/proc/{bg}/root"))
            .map(|r| r.starts_with(&tree))
            .unwrap_or(false);
        assert!(!alive, "background process {bg} survived");
        assert!(processes_in(&tree).is_empty());
        // Nothing mounted under the tree, files restored.
        assert!(
            mounts_under(&tree).unwrap().is_empty(),
            "{:?}",
            mounts_under(&tree)
        );
        assert!(!tree.join("usr/sbin/policy-rc.d").exists());
        assert_eq!(
            std::fs::read_link(tree.join("etc/resolv.conf")).unwrap(),
            Path::new("../run/systemd/resolve/stub-resolv.conf")
        );
        assert_eq!(std::fs::read_dir(tree.join("etc")).unwrap().count(), 1);
        assert!(std::fs::read_dir(tree.join("proc"))
            .unwrap()
            .next()
            .is_none());

        // A tree with no resolv.conf, its own policy-rc.d, and no /sys: all
        // restored exactly; the command's own mount is undone too.
        std::fs::remove_file(tree.join("etc/resolv.conf")).unwrap();
        std::fs::write(tree.join("usr/sbin/policy-rc.d"), "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::remove_dir(tree.join("sys")).unwrap();
        let code = run_in_tree(
            &tree,
            &sv(&[
                "sh",
                "-c",
                "cat /usr/sbin/policy-rc.d > /out/policy; mkdir -p /tmp/m && \
                 busybox mount -t tmpfs none /tmp/m && rm /etc/resolv.conf",
            ]),
        )
        .unwrap();
        assert_eq!(code, 0);
        assert_eq!(read("policy"), POLICY_RC_D);
        assert_eq!(
            std::fs::read_to_string(tree.join("usr/sbin/policy-rc.d")).unwrap(),
            "#!/bin/sh\nexit 0\n"
        );
        assert!(std::fs::symlink_metadata(tree.join("etc/resolv.conf")).is_err());
        assert!(!tree.join("sys").exists(), "created /sys not removed");
        assert!(
            mounts_under(&tree).unwrap().is_empty(),
            "{:?}",
            mounts_under(&tree)
        );

        // A command that cannot start: an error, and still everything undone.
        let err = run_in_tree(&tree, &sv(&["/no/such/program"])).unwrap_err();
        assert!(format!("{err:#}").contains("/no/such/program"), "{err:#}");
        assert!(mounts_under(&tree).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(tree.join("etc")).unwrap().count(), 0);

        // Killed by a signal: 128 + N.
        let code = run_in_tree(&tree, &sv(&["sh", "-c", "kill -9 $$"])).unwrap();
        assert_eq!(code, 137);
        std::fs::write(tree.join("out/child-done"), b"").unwrap();
    }

    #[test]
    fn bad_arguments() {
        let e = run_in_tree(Path::new("/"), &sv(&["true"])).unwrap_err();
        assert!(
            format!("{e:#}").contains("other than the host's /"),
            "{e:#}"
        );
        let e = run_in_tree(Path::new("/tmp"), &[]).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        let e = run_in_tree(Path::new("/no/such/tree"), &sv(&["true"])).unwrap_err();
        assert!(format!("{e:#}").contains("/no/such/tree"), "{e:#}");
    }

    #[test]
    fn interrupted_run_is_repaired_by_the_next() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::write(dir.join("resolv.conf"), "mine").unwrap();
        let r = Replaced::install(dir, "resolv.conf", b"host", 0o644).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
            "host"
        );
        std::mem::forget(r); // as if killed
        let mut r = Replaced::install(dir, "resolv.conf", b"host2", 0o644).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
            "host2"
        );
        r.restore().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
            "mine"
        );
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1);

        let r = Replaced::install(dir, "policy-rc.d", b"x", 0o755).unwrap();
        std::mem::forget(r);
        let r = Replaced::install(dir, "policy-rc.d", b"y", 0o755).unwrap();
        drop(r);
        assert!(!dir.join("policy-rc.d").exists());
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1);
    }
}
