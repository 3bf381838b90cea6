//! Running the programs of a tree built for another architecture (an arm64
//! rootfs on an amd64 host): through qemu-user, which the kernel starts for
//! foreign ELF binaries once `binfmt_misc` knows it. With the `F` flag
//! (Debian's `qemu-user-static` sets it) the kernel opens the interpreter
//! when it is registered, so it also works inside a chroot that has no
//! QEMU of its own: what `run-in-tree` and configure extensions need.
//!
//! When the host's kernel has no such entry, the one Debian's
//! `qemu-user-static` ships (`/usr/lib/binfmt.d/qemu-<arch>.conf`) is
//! registered, as `systemd-binfmt` or `binfmt-support` would at boot; when
//! the package is missing the error names it. Where `binfmt_misc` is not
//! mounted it is mounted first, in the host's mount namespace, and left
//! mounted as systemd leaves it at boot: the kernel (6.18 here, measured)
//! forgets every registration when its last mount goes, so the callers
//! register before they enter their private mount namespace. Two environment variables
//! point elsewhere (tests use them to simulate a host without the
//! interpreter): `DEPLOY_BINFMT_MISC` (default `/proc/sys/fs/binfmt_misc`)
//! and `DEPLOY_BINFMT_CONF_DIR` (default `/usr/lib/binfmt.d`).

use crate::tree::arch::Arch;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where the kernel's `binfmt_misc` filesystem is mounted.
pub const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";
/// Where `qemu-user-static` ships its `binfmt_misc` definitions.
pub const BINFMT_CONF_DIR: &str = "/usr/lib/binfmt.d";
/// The Debian packages that provide qemu-user and register it at boot.
pub const PACKAGES: &str = "qemu-user-static binfmt-support";

fn binfmt_misc() -> PathBuf {
    std::env::var_os("DEPLOY_BINFMT_MISC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BINFMT_MISC))
}

fn conf_dir() -> PathBuf {
    std::env::var_os("DEPLOY_BINFMT_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BINFMT_CONF_DIR))
}

/// Whether this host runs `arch`'s binaries itself.
pub fn host_runs(arch: Arch) -> bool {
    let host = std::env::consts::ARCH;
    arch.uname() == host || (host == "x86_64" && arch == Arch::I386)
}

/// The name of qemu-user's `binfmt_misc` entry for `arch`.
fn entry_name(arch: Arch) -> String {
    format!("qemu-{}", arch.uname())
}

/// Whether `binfmt_misc` (at `dir`) has an enabled entry `name`.
fn registered(dir: &Path, name: &str) -> bool {
    std::fs::read_to_string(dir.join(name))
        .map(|s| s.lines().next() == Some("enabled"))
        .unwrap_or(false)
}

/// The registration line of a `binfmt.d` file: its first line that is
/// neither empty nor a comment.
fn registration_line(conf: &str) -> Option<&str> {
    conf.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
}

/// The interpreter a registration line names (`:name:type:offset:magic:mask:interpreter:flags`).
fn interpreter(line: &str) -> Option<&str> {
    line.strip_prefix(':')?.split(':').nth(5)
}

/// Makes sure the programs of a tree of `arch` can run here, for `what`
/// (a message fragment: "the rootfs", "tree /srv/t"). Returns a note when it
/// registered the interpreter, `None` when nothing was needed.
pub fn ensure_runnable(arch: Arch, what: &str) -> Result<Option<String>> {
    if host_runs(arch) {
        return Ok(None);
    }
    let dir = binfmt_misc();
    let name = entry_name(arch);
    if registered(&dir, &name) {
        return Ok(None);
    }
    let host = std::env::consts::ARCH;
    let conf_path = conf_dir().join(format!("{name}.conf"));
    let missing = || {
        format!(
            "{what} is {arch}: its programs (configure extensions, run-in-tree) run on this {host} \
             host only through qemu-user, and {} has no {name} interpreter and {} does not exist: \
             install the Debian packages {PACKAGES} (apt-get install {PACKAGES})",
            dir.display(),
            conf_path.display()
        )
    };
    let conf = match std::fs::read_to_string(&conf_path) {
        Ok(c) => c,
        Err(_) => bail!(missing()),
    };
    let Some(line) = registration_line(&conf) else {
        bail!(
            "{} has no binfmt_misc registration line",
            conf_path.display()
        );
    };
    match interpreter(line) {
        Some(i) if Path::new(i).exists() => {}
        Some(i) => bail!(
            "{what} is {arch}: {} names the interpreter {i}, which is missing: reinstall the \
             Debian packages {PACKAGES}",
            conf_path.display()
        ),
        None => bail!("{} is not a binfmt_misc registration", conf_path.display()),
    }
    register(&dir, line).with_context(|| {
        format!(
            "registering qemu-user for {arch} ({}) with the kernel's binfmt_misc",
            conf_path.display()
        )
    })?;
    if dir.join("register").exists() && !registered(&dir, &name) {
        bail!(
            "registered {} but {} does not list it as enabled",
            conf_path.display(),
            dir.join(&name).display()
        );
    }
    Ok(Some(format!(
        "registered qemu-user for {arch} with binfmt_misc ({})",
        conf_path.display()
    )))
}

/// Writes `line` to `binfmt_misc`'s `register` file, mounting
/// `binfmt_misc` at `dir` first when it is not (and leaving it mounted).
fn register(dir: &Path, line: &str) -> Result<()> {
    let reg = dir.join("register");
    if !reg.exists() {
        nix::mount::mount(
            Some("binfmt_misc"),
            dir,
            Some("binfmt_misc"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .with_context(|| format!("mounting binfmt_misc on {}", dir.display()))?;
        // Mounted elsewhere already (a /proc of a PID namespace hides the
        // host's mount): the entry may be there.
        if registered(dir, line.split(':').nth(1).unwrap_or_default()) {
            return Ok(());
        }
    }
    std::fs::write(&reg, format!("{line}\n")).with_context(|| format!("writing {}", reg.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_LINE: &str = r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF";

    #[test]
    fn reads_registration_lines() {
        let conf = format!("# comment\n\n{DEBIAN_LINE}\n");
        assert_eq!(registration_line(&conf), Some(DEBIAN_LINE));
        assert_eq!(
            interpreter(DEBIAN_LINE),
            Some("/usr/libexec/qemu-binfmt/aarch64-binfmt-P")
        );
        assert_eq!(registration_line("# only a comment\n"), None);
        assert_eq!(interpreter("not a line"), None);
        assert_eq!(entry_name(Arch::Arm64), "qemu-aarch64");
        #[cfg(target_arch = "x86_64")]
        {
            assert!(host_runs(Arch::Amd64) && host_runs(Arch::I386));
            assert!(!host_runs(Arch::Arm64));
        }
    }

    #[test]
    fn names_the_packages_when_the_interpreter_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let misc = d.path().join("binfmt_misc");
        let confs = d.path().join("binfmt.d");
        std::fs::create_dir_all(&misc).unwrap();
        std::fs::create_dir_all(&confs).unwrap();
        // Process-wide variables: this is the only test that sets them.
        std::env::set_var("DEPLOY_BINFMT_MISC", &misc);
        std::env::set_var("DEPLOY_BINFMT_CONF_DIR", &confs);
        let foreign = if cfg!(target_arch = "aarch64") {
            Arch::Amd64
        } else {
            Arch::Arm64
        };
        let msg = format!("{:#}", ensure_runnable(foreign, "the rootfs").unwrap_err());
        assert!(
            msg.contains("qemu-user-static") && msg.contains("binfmt-support"),
            "{msg}"
        );
        // Registered (as the kernel lists it): nothing to do.
        std::fs::write(misc.join(entry_name(foreign)), "enabled\ninterpreter /x\n").unwrap();
        assert_eq!(ensure_runnable(foreign, "the rootfs").unwrap(), None);
        std::env::remove_var("DEPLOY_BINFMT_MISC");
        std::env::remove_var("DEPLOY_BINFMT_CONF_DIR");
    }
}
