//! Mounts, always inside this process's private mount namespace: nothing we
//! mount is visible on the host, and all of it disappears when we exit, even
//! on `kill -9`.

use anyhow::{Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

static IN_PRIVATE_NS: AtomicBool = AtomicBool::new(false);

/// Temporary mount points are named `<prefix><pid>.<random>`.
const MOUNT_DIR_PREFIX: &str = "btrfs-deploy.";

/// Where the private tmpfs holding our mount points is mounted (inside our
/// namespace only; on the host this stays an empty directory).
const MOUNT_ROOT: &str = "/run/btrfs-deploy";

/// The folder mount points are made in: the private tmpfs once the private
/// namespace is entered, else the temp directory.
static MOUNT_BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Mounts a tmpfs on [`MOUNT_ROOT`] inside our private namespace: mount
/// points made there are invisible to every other process, so no other
/// process can remove one (which, since Linux 3.18, would detach our mount),
/// and they vanish with the namespace, even after `kill -9`: nothing to sweep.
fn mount_private_base() -> Result<PathBuf> {
    let root = Path::new(MOUNT_ROOT);
    // A deploy started by a deploy (an extension's `run-in-tree`) inherits
    // its parent's private tmpfs, whose mount points it needs: reuse it.
    let inherited = own_mounts()
        .iter()
        .any(|m| m.mount_point == root && m.source == "btrfs-deploy");
    if inherited {
        return Ok(root.to_path_buf());
    }
    if let Err(e) = std::fs::create_dir_all(root) {
        if e.raw_os_error() != Some(libc::EROFS) {
            return Err(e).with_context(|| format!("creating {MOUNT_ROOT}"));
        }
        // A read-only root whose init put no tmpfs on /run (a minimal
        // system with --root-mode ro): this mount namespace is ours, so a
        // tmpfs on /run here hides nothing from the system.
        mount(
            Some("btrfs-deploy-run"),
            "/run",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=1m"),
        )
        .with_context(|| {
            format!(
                "creating {MOUNT_ROOT}: {e}; / is read-only and /run is not a tmpfs, and mounting \
                 a private one failed (mount a tmpfs on /run early at boot, as systemd does)"
            )
        })?;
        std::fs::create_dir_all(root).with_context(|| format!("creating {MOUNT_ROOT}"))?;
    }
    mount(
        Some("btrfs-deploy"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700,size=1m"),
    )
    .with_context(|| format!("mounting a private tmpfs on {MOUNT_ROOT}"))?;
    Ok(root.to_path_buf())
}

/// Moves this process into a new mount namespace whose mounts do not
/// propagate to the host. Must run before any thread is started.
pub fn enter_private_namespace() -> Result<()> {
    if IN_PRIVATE_NS.load(Ordering::SeqCst) {
        return Ok(());
    }
    unshare(CloneFlags::CLONE_NEWNS).context("creating a private mount namespace (unshare)")?;
    make_root_private()?;
    let base = mount_private_base()?;
    let _ = MOUNT_BASE.set(base);
    IN_PRIVATE_NS.store(true, Ordering::SeqCst);
    Ok(())
}

/// Makes every mount of the new namespace private, so nothing mounted from
/// here on propagates to the host.
///
/// `/` is usually a mount point, and one recursive `MS_PRIVATE` on it does
/// it. In a directory chroot (sbuild, pbuilder, schroot, many CI build
/// roots) it is not: the kernel refuses `MS_PRIVATE` on a path that is not
/// the root of a mount (`EINVAL`), and the mount holding the chroot lies
/// outside it, where no path reaches. Then the namespace's own root is
/// reached by walking out of the chroot (this namespace is ours: nothing
/// outside changes), made private there, and the process returns to the
/// chroot it was in, so every path it resolves afterwards is the same.
fn make_root_private() -> Result<()> {
    let private = |path: &str| {
        mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    };
    match private("/") {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e).context("making / a private mount in the new namespace"),
    }
    let chroot_dir = std::fs::File::open("/").context("opening / (the chroot) to return to it")?;
    let res = private_from_namespace_root(&private);
    // Back into the chroot whatever happened: the rest of the run resolves
    // its paths there.
    let back = nix::unistd::fchdir(std::os::fd::AsRawFd::as_raw_fd(&chroot_dir))
        .and_then(|()| nix::unistd::chroot("."))
        .and_then(|()| nix::unistd::chdir("/"));
    res?;
    back.context("returning into the chroot after making its mounts private")
}

/// Leaves the chroot for the namespace's root (a `chroot` to a directory
/// below the current one, then `..` until the top), and makes every mount
/// there private. The caller returns into the chroot.
fn private_from_namespace_root(private: &dyn Fn(&str) -> nix::Result<()>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ctx = "making the mounts of a directory chroot private (/ is not a mount point)";
    nix::unistd::chdir("/").context(ctx)?;
    // Any directory below the current root will do: /dev, /proc and /etc
    // exist in every chroot a deploy can run in.
    let below = ["/proc", "/dev", "/etc", "/usr"]
        .into_iter()
        .find(|d| Path::new(d).is_dir())
        .context("the chroot has none of /proc, /dev, /etc, /usr")?;
    nix::unistd::chroot(below).context(ctx)?;
    // The working directory is now outside the root: `..` walks up freely.
    for _ in 0..4096 {
        let here = std::fs::metadata(".").context(ctx)?;
        let up = std::fs::metadata("..").context(ctx)?;
        if here.dev() == up.dev() && here.ino() == up.ino() {
            break;
        }
        nix::unistd::chdir("..").context(ctx)?;
    }
    nix::unistd::chroot(".").context(ctx)?;
    private("/").context(ctx)
}

/// A mounted filesystem on a temporary directory; unmounted (and the
/// directory removed) by [`MountGuard::close`], or best effort on drop.
pub struct MountGuard {
    target: PathBuf,
    mounted: bool,
    remove_dir: bool,
}

impl MountGuard {
    /// Mounts `device` (type `fstype`, options `data`) on a fresh temporary directory.
    pub fn mount_temp(
        device: &Path,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> Result<MountGuard> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{MOUNT_DIR_PREFIX}{}.", std::process::id()))
            .tempdir_in(MOUNT_BASE.get().cloned().unwrap_or_else(std::env::temp_dir))
            .context("creating a temporary mount point")?
            .keep();
        let mut guard = MountGuard {
            target: dir,
            mounted: false,
            remove_dir: true,
        };
        guard.mount(device, fstype, flags, data)?;
        Ok(guard)
    }

    /// Mounts on an existing directory `target` (which is left in place afterwards).
    pub fn mount_at(
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<MountGuard> {
        mount(source, target, fstype, flags, data).with_context(|| {
            format!(
                "mounting {} on {}",
                source
                    .map(|s| s.display().to_string())
                    .unwrap_or_else(|| fstype.unwrap_or("none").to_string()),
                target.display()
            )
        })?;
        Ok(MountGuard {
            target: target.to_path_buf(),
            mounted: true,
            remove_dir: false,
        })
    }

    fn mount(&mut self, device: &Path, fstype: &str, flags: MsFlags, data: &str) -> Result<()> {
        mount(Some(device), &self.target, Some(fstype), flags, Some(data)).with_context(|| {
            format!(
                "mounting {} ({fstype}, {data}) on {}",
                device.display(),
                self.target.display()
            )
        })?;
        self.mounted = true;
        Ok(())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts and removes the temporary directory.
    pub fn close(mut self) -> Result<()> {
        self.unmount(MntFlags::empty())
    }

    fn unmount(&mut self, flags: MntFlags) -> Result<()> {
        if self.mounted {
            umount2(&self.target, flags)
                .with_context(|| format!("unmounting {}", self.target.display()))?;
            self.mounted = false;
        }
        if self.remove_dir {
            // Only ever an empty directory: never reached while mounted.
            std::fs::remove_dir(&self.target)
                .with_context(|| format!("removing mount point {}", self.target.display()))?;
            self.remove_dir = false;
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = self.unmount(MntFlags::empty()) {
                tracing::debug!("{e:#}; detaching lazily");
                let _ = self.unmount(MntFlags::MNT_DETACH);
            }
        } else if let Err(e) = self.unmount(MntFlags::empty()) {
            tracing::warn!("{e:#}");
        }
    }
}

/// One line of `/proc/<pid>/mountinfo` (proc(5)), octal escapes decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the filesystem (Btrfs shows an anonymous `0:N`).
    pub dev: String,
    /// The directory of the filesystem mounted here (`/systems/v2/run`).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (`/dev/vda2`, `tmpfs`, ...).
    pub source: String,
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                root: unescape_mount(f.get(3)?),
                mount_point: PathBuf::from(unescape_mount(f.get(4)?)),
                fstype: f.get(sep + 1)?.to_string(),
                source: unescape_mount(f.get(sep + 2)?),
            })
        })
        .collect()
}

/// The mounts this process sees.
pub fn own_mounts() -> Vec<MountEntry> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Devices (`major:minor`) mounted anywhere on the host, from the initial
/// namespace's view (`/proc/1/mountinfo`), falling back to ours.
pub fn mounted_devices() -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string("/proc/1/mountinfo")
        .or_else(|_| std::fs::read_to_string("/proc/self/mountinfo"))
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in parse_mountinfo(&text) {
        // Btrfs shows an anonymous device number (0:N): the mount source
        // names the real block device.
        if m.source.starts_with("/dev/") {
            if let Ok(meta) = std::fs::metadata(&m.source) {
                if meta.file_type().is_block_device() {
                    out.push(format!(
                        "{}:{}",
                        libc::major(meta.rdev()),
                        libc::minor(meta.rdev())
                    ));
                }
            }
        }
        out.push(m.dev);
    }
    out
}

/// `msg` with the paths below our private mount points rewritten as the
/// user knows them: `etc/fstab of version v2` rather than
/// `/run/btrfs-deploy/btrfs-deploy.123.xyz/systems/.v2.partial/orig/etc/fstab`.
pub fn user_paths(msg: &str) -> String {
    static RES: std::sync::OnceLock<[(regex::Regex, &str); 3]> = std::sync::OnceLock::new();
    let res = RES.get_or_init(|| {
        let base = regex::escape(MOUNT_ROOT) + r"/" + &regex::escape(MOUNT_DIR_PREFIX) + r"[0-9]+\.[A-Za-z0-9_]+";
        [
            (
                regex::Regex::new(&format!(
                    r"{base}/systems/\.?([A-Za-z0-9][A-Za-z0-9._-]*?)(?:\.partial)?/(?:orig|run)/([^\s:,;]+)"
                ))
                .expect("valid regex"),
                "$2 of version $1",
            ),
            (
                regex::Regex::new(&format!(
                    r"{base}/systems/\.?([A-Za-z0-9][A-Za-z0-9._-]*?)(?:\.partial)?(?:/(?:orig|run))?/?([\s:,;]|$)"
                ))
                .expect("valid regex"),
                "version $1$2",
            ),
            (
                regex::Regex::new(&format!(r"{base}/?")).expect("valid regex"),
                "(the disk) /",
            ),
        ]
    });
    let mut s = msg.to_string();
    for (re, rep) in res.iter() {
        s = re.replace_all(&s, *rep).into_owned();
    }
    s
}

/// Decodes the octal escapes of /proc mount tables.
pub fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_paths_become_what_the_user_knows() {
        let b = "/run/btrfs-deploy/btrfs-deploy.123.aBc9";
        assert_eq!(
            user_paths(&format!(
                "writing {b}/systems/.v2.partial/orig/etc/fstab: denied"
            )),
            "writing etc/fstab of version v2: denied"
        );
        assert_eq!(
            user_paths(&format!("reading {b}/systems/factory/run/etc/passwd")),
            "reading etc/passwd of version factory"
        );
        assert_eq!(
            user_paths(&format!("removing {b}/systems/.v1.2.partial")),
            "removing version v1.2"
        );
        assert_eq!(
            user_paths(&format!("creating {b}/state/home")),
            "creating (the disk) /state/home"
        );
        assert_eq!(user_paths("plain /tmp/x"), "plain /tmp/x");
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
