//! Finding the kernel, initramfs and device tree to boot (design §1,
//! "Kernel and boot").
//!
//! Everything is looked up *inside* the rootfs with symlinks resolved against
//! the rootfs root ([`crate::util::rootpath`]), never against the host. Paths given
//! explicitly by the user (`--kernel`, `--initramfs`, `--dtb`) are host paths.

use crate::util::rootpath;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The places searched for a kernel, in order of preference (for messages).
pub const KERNEL_PLACES: &str = "boot/vmlinuz, boot/vmlinuz-<ver>, vmlinuz, boot/bzImage, \
    boot/zImage, boot/Image, boot/uImage, usr/lib/modules/<ver>/vmlinuz, \
    lib/modules/<ver>/vmlinuz";

/// Fixed-name kernels tried after `boot/vmlinuz-<ver>` and `vmlinuz`.
const IMAGE_NAMES: [&str; 4] = ["boot/bzImage", "boot/zImage", "boot/Image", "boot/uImage"];

/// Directories holding `<ver>/vmlinuz` and `<ver>/initramfs.img`.
const MODULE_DIRS: [&str; 2] = ["usr/lib/modules", "lib/modules"];

/// Unversioned initramfs names, paired with a kernel whose name has no version.
const UNVERSIONED_INITRAMFS: [&str; 3] = ["boot/initrd.img", "initrd.img", "boot/initramfs.img"];

/// Suffixes of `boot/vmlinuz-*` names that are not kernels to boot (backups,
/// package manager leftovers, signatures).
const IGNORED_SUFFIXES: [&str; 9] = [
    ".old",
    ".bak",
    "~",
    ".dpkg-old",
    ".dpkg-new",
    ".dpkg-tmp",
    ".dpkg-dist",
    ".efi.signed",
    ".hmac",
];

/// What the user chose explicitly (host paths); `None` means "find it".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelChoice {
    /// `--kernel PATH`: the kernel image, a host path.
    pub kernel: Option<PathBuf>,
    /// `--initramfs PATH`: the initramfs, a host path.
    pub initramfs: Option<PathBuf>,
    /// `--dtb PATH`: the device tree blob, a host path (never searched
    /// for), or, when relative and not a host file, a path inside the
    /// rootfs's device trees (`usr/lib/linux-image-<ver>/`, as Debian ships
    /// them), e.g. `broadcom/bcm2711-rpi-4-b.dtb`.
    pub dtb: Option<PathBuf>,
}

/// The files to install next to a version, as host paths to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Kernel image (inside the rootfs unless given explicitly).
    pub kernel: PathBuf,
    /// Initramfs matching the kernel, if any.
    pub initramfs: Option<PathBuf>,
    /// Device tree blob, only when given explicitly.
    pub dtb: Option<PathBuf>,
    /// Kernel version (`6.1.0-18-cloud-amd64`) when it could be derived.
    pub version: Option<String>,
}

/// A kernel found inside the rootfs.
#[derive(Debug)]
struct Candidate {
    /// Host path of the resolved file (inside the rootfs).
    host: PathBuf,
    /// Path of the resolved file relative to the rootfs (for messages).
    resolved: PathBuf,
    /// (device, inode) of the file, to dedupe links and hardlinks.
    id: (u64, u64),
    /// Version, from the file's name or its modules directory.
    version: Option<String>,
}

/// Finds the kernel, initramfs and device tree for `rootfs`.
///
/// Explicit choices win and must be existing regular files. Otherwise the
/// kernel is searched in [`KERNEL_PLACES`]; candidates resolving to the same
/// file count once; several different versions are an error listing them.
/// A kernel whose name has no version takes the version of the rootfs's only
/// modules directory, if there is exactly one. The initramfs is the one
/// matching the kernel's version (`boot/initrd.img-<ver>`,
/// `boot/initramfs-<ver>.img`, `usr/lib/modules/<ver>/initramfs.img`), or for
/// a kernel whose name has no version `boot/initrd.img`, `initrd.img` or
/// `boot/initramfs.img`; it is optional. An explicit kernel gets an
/// initramfs from the rootfs only if its file name carries a version.
pub fn find_boot_files(rootfs: &Path, choice: &KernelChoice) -> Result<BootFiles> {
    if !rootfs.is_dir() {
        bail!("rootfs {} is not a directory", rootfs.display());
    }
    let host_dtb = choice.dtb.as_deref().filter(|p| !is_tree_dtb(p));
    let dtb = explicit_file(host_dtb, "device tree given with --dtb")?;
    let (kernel, version, named) =
        match explicit_file(choice.kernel.as_deref(), "kernel given with --kernel")? {
            Some(path) => {
                let version = path
                    .file_name()
                    .and_then(|n| version_from_name(n.to_str()?));
                let named = version.is_some();
                (path, version, named)
            }
            None => {
                let (found, guess) = discover_kernel(rootfs)?;
                let named = found.version.is_some();
                (found.host, found.version.or(guess), named)
            }
        };
    let initramfs = match explicit_file(
        choice.initramfs.as_deref(),
        "initramfs given with --initramfs",
    )? {
        Some(path) => Some(path),
        None if choice.kernel.is_some() && !named => None,
        None => find_initramfs(rootfs, version.as_deref(), !named)?,
    };
    let dtb = match (dtb, choice.dtb.as_deref()) {
        (None, Some(rel)) => Some(tree_dtb(rootfs, rel, version.as_deref())?),
        (dtb, _) => dtb,
    };
    Ok(BootFiles {
        kernel,
        initramfs,
        dtb,
        version,
    })
}

/// Whether `--dtb` names a device tree of the rootfs: a relative path that
/// is not a file on the host.
fn is_tree_dtb(p: &Path) -> bool {
    p.is_relative() && !p.exists()
}

/// The device tree `rel` of the rootfs's kernel `version`
/// (`usr/lib/linux-image-<version>/<rel>`, resolved inside the rootfs).
fn tree_dtb(rootfs: &Path, rel: &Path, version: Option<&str>) -> Result<PathBuf> {
    let Some(ver) = version else {
        bail!(
            "--dtb {}: not a file on this host, and the rootfs's kernel version is unknown, so \
             its device trees (usr/lib/linux-image-<version>/) cannot be looked up: give a host path",
            rel.display()
        );
    };
    let in_tree = Path::new("usr/lib")
        .join(format!("linux-image-{ver}"))
        .join(rel);
    match rootpath::try_resolve_in_root(rootfs, &in_tree)? {
        Some(p) if p.is_file() => Ok(p),
        _ => bail!(
            "--dtb {}: not a file on this host, nor a device tree of the rootfs (/{} does not \
             exist): give a host path, or a path relative to /usr/lib/linux-image-{ver}/ of the rootfs",
            rel.display(),
            in_tree.display()
        ),
    }
}

/// Checks the explicit host files of `choice` (`--kernel`, `--initramfs`,
/// `--dtb`): each must be a non-empty regular file. Done at planning for
/// every rootfs, an archive too (whose boot files are otherwise only looked
/// for once it is extracted).
pub fn check_explicit(choice: &KernelChoice) -> Result<()> {
    explicit_file(choice.kernel.as_deref(), "kernel given with --kernel")?;
    explicit_file(
        choice.initramfs.as_deref(),
        "initramfs given with --initramfs",
    )?;
    // A relative --dtb that is no host file names one of the rootfs's.
    explicit_file(
        choice.dtb.as_deref().filter(|p| !is_tree_dtb(p)),
        "device tree given with --dtb",
    )?;
    Ok(())
}

/// Checks that an explicit host path exists and is a non-empty regular file.
fn explicit_file(path: Option<&Path>, what: &str) -> Result<Option<PathBuf>> {
    let Some(path) = path else { return Ok(None) };
    let meta = fs::metadata(path).with_context(|| format!("{what}: {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what}: {} is not a regular file", path.display());
    }
    if meta.len() == 0 {
        bail!(
            "{what}: {} is an empty file: give the real file (a truncated download or build?)",
            path.display()
        );
    }
    Ok(Some(path.to_path_buf()))
}

/// `vmlinuz-<ver>` → `<ver>`.
fn version_from_name(name: &str) -> Option<String> {
    name.strip_prefix("vmlinuz-")
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// `[usr/]lib/modules/<ver>/<file>` → `<ver>`.
fn version_from_modules_path(rel: &Path) -> Option<String> {
    let dir = rel.parent()?;
    let module_dir = dir.parent()?;
    if !MODULE_DIRS.iter().any(|m| module_dir == Path::new(m)) {
        return None;
    }
    dir.file_name()?.to_str().map(str::to_string)
}

/// Searches the kernel candidates and picks one (see [`find_boot_files`]);
/// also returns the version of the only modules directory, if any.
fn discover_kernel(rootfs: &Path) -> Result<(Candidate, Option<String>)> {
    let mut candidates: Vec<Candidate> = Vec::new();
    for rel in kernel_paths(rootfs)? {
        if let Some(found) = candidate(rootfs, &rel)? {
            if !candidates.iter().any(|c| c.id == found.id) {
                candidates.push(found);
            }
        }
    }
    if candidates.is_empty() {
        bail!(
            "no kernel found in {}: looked for {KERNEL_PLACES}; give one with --kernel PATH, \
             or deploy without a bootloader with --no-bootloader",
            rootfs.display()
        );
    }
    let guess = single_module_version(rootfs)?;
    let effective = |c: &Candidate| c.version.clone().or_else(|| guess.clone());
    let versions: BTreeSet<Option<String>> = candidates.iter().map(effective).collect();
    if versions.len() > 1 {
        bail!("{}", ambiguity_message(rootfs, &candidates));
    }
    Ok((candidates.swap_remove(0), guess))
}

/// The error for several kernels with different versions.
fn ambiguity_message(rootfs: &Path, candidates: &[Candidate]) -> String {
    let listed: Vec<String> = candidates
        .iter()
        .map(|c| match &c.version {
            Some(v) => format!("{} (version {v})", c.resolved.display()),
            None => format!("{} (unknown version)", c.resolved.display()),
        })
        .collect();
    format!(
        "several kernels found in {}: {}; choose one with --kernel PATH (e.g. --kernel {})",
        rootfs.display(),
        listed.join(", "),
        candidates[candidates.len() - 1].host.display()
    )
}

/// The in-root paths to try for a kernel, in order of preference.
fn kernel_paths(rootfs: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = vec![PathBuf::from("boot/vmlinuz")];
    let mut versioned: Vec<String> = list_dir(rootfs, "boot")?
        .into_iter()
        .filter(|n| is_versioned_kernel_name(n))
        .collect();
    versioned.sort();
    paths.extend(versioned.iter().map(|n| Path::new("boot").join(n)));
    paths.push(PathBuf::from("vmlinuz"));
    paths.extend(IMAGE_NAMES.iter().map(PathBuf::from));
    for modules in MODULE_DIRS {
        let mut versions = list_dir(rootfs, modules)?;
        versions.sort();
        paths.extend(
            versions
                .iter()
                .map(|v| Path::new(modules).join(v).join("vmlinuz")),
        );
    }
    Ok(paths)
}

/// `vmlinuz-<ver>`, excluding rescue kernels and backups.
fn is_versioned_kernel_name(name: &str) -> bool {
    version_from_name(name).is_some()
        && !name.starts_with("vmlinuz-0-rescue-")
        && !IGNORED_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Entry names of the in-root directory `rel` (empty if it does not exist).
fn list_dir(rootfs: &Path, rel: &str) -> Result<Vec<String>> {
    let Some(dir) = rootpath::try_resolve_in_root(rootfs, Path::new(rel))? else {
        return Ok(Vec::new());
    };
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// The regular file at in-root `rel`, resolved, with its version.
fn candidate(rootfs: &Path, rel: &Path) -> Result<Option<Candidate>> {
    let Some(host) = rootpath::try_resolve_in_root(rootfs, rel)? else {
        return Ok(None);
    };
    let meta =
        fs::symlink_metadata(&host).with_context(|| format!("inspecting {}", host.display()))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let resolved = host.strip_prefix(rootfs).unwrap_or(&host).to_path_buf();
    let version = [resolved.as_path(), rel].iter().find_map(|p| {
        let name = p.file_name()?.to_str()?;
        version_from_name(name).or_else(|| version_from_modules_path(p))
    });
    Ok(Some(Candidate {
        host,
        resolved,
        id: (meta.dev(), meta.ino()),
        version,
    }))
}

/// The version of the rootfs's only kernel modules directory, if exactly one.
fn single_module_version(rootfs: &Path) -> Result<Option<String>> {
    let mut versions = BTreeSet::new();
    for modules in MODULE_DIRS {
        for name in list_dir(rootfs, modules)? {
            let rel = Path::new(modules).join(&name);
            if let Some(dir) = rootpath::try_resolve_in_root(rootfs, &rel)? {
                if dir.is_dir() {
                    versions.insert(name);
                }
            }
        }
    }
    Ok(match versions.len() {
        1 => versions.pop_first(),
        _ => None,
    })
}

/// The first existing initramfs among the names for `version`; unversioned
/// names first when `unversioned_kernel`.
fn find_initramfs(
    rootfs: &Path,
    version: Option<&str>,
    unversioned_kernel: bool,
) -> Result<Option<PathBuf>> {
    let mut paths: Vec<PathBuf> = Vec::new();
    if unversioned_kernel {
        paths.extend(UNVERSIONED_INITRAMFS.iter().map(PathBuf::from));
    }
    if let Some(v) = version {
        paths.push(PathBuf::from(format!("boot/initrd.img-{v}")));
        paths.push(PathBuf::from(format!("boot/initramfs-{v}.img")));
        paths.extend(
            MODULE_DIRS
                .iter()
                .map(|m| Path::new(m).join(v).join("initramfs.img")),
        );
    }
    for rel in paths {
        if let Some(found) = candidate(rootfs, &rel)? {
            return Ok(Some(found.host));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    const V: &str = "6.1.0-18-cloud-amd64";
    const V2: &str = "6.1.0-17-cloud-amd64";

    fn write(root: &Path, rel: &str, content: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn link(root: &Path, rel: &str, target: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(target, path).unwrap();
    }

    fn find(root: &Path) -> Result<BootFiles> {
        find_boot_files(root, &KernelChoice::default())
    }

    fn err(root: &Path) -> String {
        format!("{:#}", find(root).unwrap_err())
    }

    /// A debootstrap-style Debian tree with one cloud kernel.
    fn debian(root: &Path) {
        write(root, &format!("boot/vmlinuz-{V}"), "kernel");
        write(root, &format!("boot/initrd.img-{V}"), "initrd");
        write(root, &format!("usr/lib/modules/{V}/modules.dep"), "");
        link(root, "lib", "usr/lib");
        link(root, "vmlinuz", &format!("boot/vmlinuz-{V}"));
        link(root, "initrd.img", &format!("boot/initrd.img-{V}"));
        link(root, "vmlinuz.old", &format!("boot/vmlinuz-{V}"));
    }

    #[test]
    fn debian_layout() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        debian(r);
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join(format!("boot/vmlinuz-{V}")));
        assert_eq!(got.initramfs, Some(r.join(format!("boot/initrd.img-{V}"))));
        assert_eq!(got.version.as_deref(), Some(V));
        assert_eq!(got.dtb, None);
    }

    #[test]
    fn debian_only_root_symlinks() {
        // Kernel reachable only through the top-level symlinks.
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, "kernels/k", "kernel");
        link(r, "vmlinuz", "/kernels/k");
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join("kernels/k"));
        assert_eq!(got.version, None);
    }

    #[test]
    fn plain_boot_vmlinuz() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, "boot/vmlinuz", "kernel");
        write(r, "boot/initrd.img", "initrd");
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join("boot/vmlinuz"));
        assert_eq!(got.initramfs, Some(r.join("boot/initrd.img")));
        assert_eq!(got.version, None);
    }

    #[test]
    fn plain_boot_vmlinuz_takes_single_module_version() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, "boot/vmlinuz", "kernel");
        write(r, &format!("boot/initramfs-{V}.img"), "initrd");
        write(r, &format!("lib/modules/{V}/modules.dep"), "");
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join("boot/vmlinuz"));
        assert_eq!(got.version.as_deref(), Some(V));
        assert_eq!(
            got.initramfs,
            Some(r.join(format!("boot/initramfs-{V}.img")))
        );
    }

    #[test]
    fn usr_lib_modules_layout() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, &format!("usr/lib/modules/{V}/vmlinuz"), "kernel");
        write(r, &format!("usr/lib/modules/{V}/initramfs.img"), "initrd");
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join(format!("usr/lib/modules/{V}/vmlinuz")));
        assert_eq!(
            got.initramfs,
            Some(r.join(format!("usr/lib/modules/{V}/initramfs.img")))
        );
        assert_eq!(got.version.as_deref(), Some(V));
    }

    #[test]
    fn fedora_copies_same_version_prefer_boot() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, &format!("boot/vmlinuz-{V}"), "kernel");
        write(r, &format!("usr/lib/modules/{V}/vmlinuz"), "kernel copy");
        write(r, &format!("boot/initramfs-{V}.img"), "initrd");
        write(r, "boot/vmlinuz-0-rescue-0123456789abcdef", "rescue");
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join(format!("boot/vmlinuz-{V}")));
        assert_eq!(
            got.initramfs,
            Some(r.join(format!("boot/initramfs-{V}.img")))
        );
    }

    #[test]
    fn two_versions_is_error_listing_both() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        debian(r);
        write(r, &format!("boot/vmlinuz-{V2}"), "older kernel");
        let msg = err(r);
        assert!(
            msg.contains(&format!("boot/vmlinuz-{V} (version {V})")),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("boot/vmlinuz-{V2} (version {V2})")),
            "{msg}"
        );
        assert!(msg.contains("--kernel PATH"), "{msg}");
        assert!(msg.contains(&r.display().to_string()), "{msg}");
    }

    #[test]
    fn symlinks_to_same_file_deduped() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, &format!("boot/vmlinuz-{V}"), "kernel");
        link(r, "boot/vmlinuz", &format!("vmlinuz-{V}"));
        link(r, "vmlinuz", &format!("/boot/vmlinuz-{V}"));
        link(
            r,
            &format!("usr/lib/modules/{V}/vmlinuz"),
            &format!("../../../../boot/vmlinuz-{V}"),
        );
        fs::hard_link(r.join(format!("boot/vmlinuz-{V}")), r.join("boot/bzImage")).unwrap();
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join(format!("boot/vmlinuz-{V}")));
        assert_eq!(got.version.as_deref(), Some(V));
    }

    #[test]
    fn boot_symlink_dir_resolved_inside() {
        // boot -> / on the host would scan the host's /boot.
        let t = TempDir::new().unwrap();
        let r = t.path();
        link(r, "boot", "/");
        let msg = err(r);
        assert!(
            msg.starts_with(&format!("no kernel found in {}", r.display())),
            "{msg}"
        );
        write(r, &format!("vmlinuz-{V}"), "kernel");
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join(format!("vmlinuz-{V}")));
    }

    #[test]
    fn hostile_symlinks_never_reach_host() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        link(r, "vmlinuz", "/etc/shadow");
        link(r, "boot/vmlinuz", "../../../../../../etc/passwd");
        link(r, "initrd.img", "/etc/shadow");
        link(r, "boot/bzImage", "/");
        let msg = err(r);
        assert!(msg.contains("no kernel found"), "{msg}");
        // With a file at the tree's own /etc/shadow, that file is used.
        write(r, "etc/shadow", "tree shadow");
        let got = find(r).unwrap();
        assert_eq!(got.kernel, r.join("etc/shadow"));
        // initrd.img -> /etc/shadow: also the tree's file, never the host's.
        assert_eq!(got.initramfs, Some(r.join("etc/shadow")));
    }

    #[test]
    fn hostile_initrd_inside_tree_only() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, "boot/vmlinuz", "kernel");
        link(r, "boot/initrd.img", "/etc/hostname"); // exists on the host, not in the tree
        link(r, "initrd.img", "../../../../etc/hostname");
        assert_eq!(find(r).unwrap().initramfs, None);
    }

    #[test]
    fn none_found_message() {
        let t = TempDir::new().unwrap();
        let msg = err(t.path());
        assert!(
            msg.contains("looked for boot/vmlinuz, boot/vmlinuz-<ver>, vmlinuz"),
            "{msg}"
        );
        assert!(msg.contains("--kernel PATH"), "{msg}");
        assert!(msg.contains("--no-bootloader"), "{msg}");
    }

    #[test]
    fn explicit_override() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        debian(r);
        write(r, &format!("boot/vmlinuz-{V2}"), "older kernel");
        write(r, &format!("boot/initrd.img-{V2}"), "older initrd");
        let host = TempDir::new().unwrap();
        write(host.path(), "my.dtb", "dtb");
        let choice = KernelChoice {
            kernel: Some(r.join(format!("boot/vmlinuz-{V2}"))),
            initramfs: None,
            dtb: Some(host.path().join("my.dtb")),
        };
        let got = find_boot_files(r, &choice).unwrap();
        assert_eq!(got.kernel, r.join(format!("boot/vmlinuz-{V2}")));
        assert_eq!(got.version.as_deref(), Some(V2));
        assert_eq!(got.initramfs, Some(r.join(format!("boot/initrd.img-{V2}"))));
        assert_eq!(got.dtb, Some(host.path().join("my.dtb")));
    }

    #[test]
    fn dtb_of_the_rootfs_by_relative_path() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        debian(r);
        let ver = find_boot_files(r, &KernelChoice::default())
            .unwrap()
            .version
            .unwrap();
        write(
            r,
            &format!("usr/lib/linux-image-{ver}/broadcom/rpi.dtb"),
            "dtb",
        );
        let choice = KernelChoice {
            dtb: Some(PathBuf::from("broadcom/rpi.dtb")),
            ..Default::default()
        };
        check_explicit(&choice).unwrap();
        let got = find_boot_files(r, &choice).unwrap();
        assert_eq!(
            got.dtb,
            Some(r.join(format!("usr/lib/linux-image-{ver}/broadcom/rpi.dtb")))
        );
        let choice = KernelChoice {
            dtb: Some(PathBuf::from("broadcom/nope.dtb")),
            ..Default::default()
        };
        let msg = format!("{:#}", find_boot_files(r, &choice).unwrap_err());
        assert!(
            msg.contains("--dtb broadcom/nope.dtb")
                && msg.contains(&format!("usr/lib/linux-image-{ver}/broadcom/nope.dtb")),
            "{msg}"
        );
    }

    #[test]
    fn explicit_unversioned_kernel_gets_no_guessed_initramfs() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        debian(r);
        let host = TempDir::new().unwrap();
        write(host.path(), "bzImage", "custom");
        write(host.path(), "initrd", "custom initrd");
        let mut choice = KernelChoice {
            kernel: Some(host.path().join("bzImage")),
            ..KernelChoice::default()
        };
        let got = find_boot_files(r, &choice).unwrap();
        assert_eq!(got.kernel, host.path().join("bzImage"));
        assert_eq!(got.initramfs, None);
        assert_eq!(got.version, None);
        choice.initramfs = Some(host.path().join("initrd"));
        let got = find_boot_files(r, &choice).unwrap();
        assert_eq!(got.initramfs, Some(host.path().join("initrd")));
    }

    #[test]
    fn explicit_initramfs_with_discovered_kernel() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        debian(r);
        let host = TempDir::new().unwrap();
        write(host.path(), "initrd", "custom initrd");
        let choice = KernelChoice {
            initramfs: Some(host.path().join("initrd")),
            ..KernelChoice::default()
        };
        let got = find_boot_files(r, &choice).unwrap();
        assert_eq!(got.kernel, r.join(format!("boot/vmlinuz-{V}")));
        assert_eq!(got.initramfs, Some(host.path().join("initrd")));
    }

    #[test]
    fn explicit_paths_validated() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        debian(r);
        let missing = KernelChoice {
            kernel: Some(r.join("nope")),
            ..KernelChoice::default()
        };
        let msg = format!("{:#}", find_boot_files(r, &missing).unwrap_err());
        assert!(msg.contains("--kernel") && msg.contains("nope"), "{msg}");
        let dir = KernelChoice {
            dtb: Some(r.join("boot")),
            ..KernelChoice::default()
        };
        let msg = format!("{:#}", find_boot_files(r, &dir).unwrap_err());
        assert!(
            msg.contains("--dtb") && msg.contains("not a regular file"),
            "{msg}"
        );
        let initrd = KernelChoice {
            initramfs: Some(r.join("missing.img")),
            ..KernelChoice::default()
        };
        assert!(find_boot_files(r, &initrd).is_err());
        std::fs::write(r.join("empty"), b"").unwrap();
        for choice in [
            KernelChoice {
                kernel: Some(r.join("empty")),
                ..KernelChoice::default()
            },
            KernelChoice {
                initramfs: Some(r.join("empty")),
                ..KernelChoice::default()
            },
            KernelChoice {
                dtb: Some(r.join("empty")),
                ..KernelChoice::default()
            },
        ] {
            let msg = format!("{:#}", check_explicit(&choice).unwrap_err());
            assert!(msg.contains("is an empty file"), "{msg}");
        }
        let dev = KernelChoice {
            kernel: Some("/dev/null".into()),
            ..KernelChoice::default()
        };
        let msg = format!("{:#}", check_explicit(&dev).unwrap_err());
        assert!(msg.contains("not a regular file"), "{msg}");
    }

    #[test]
    fn unversioned_and_versioned_different_is_error() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, "boot/bzImage", "custom");
        write(r, &format!("usr/lib/modules/{V}/vmlinuz"), "distro");
        write(r, &format!("usr/lib/modules/{V2}/vmlinuz"), "distro older");
        let msg = err(r);
        assert!(msg.contains("boot/bzImage (unknown version)"), "{msg}");
    }

    #[test]
    fn image_names_in_order() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, "boot/uImage", "u");
        write(r, "boot/Image", "i");
        assert_eq!(find(r).unwrap().kernel, r.join("boot/Image"));
    }

    #[test]
    fn backups_ignored() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, &format!("boot/vmlinuz-{V}"), "kernel");
        write(r, &format!("boot/vmlinuz-{V2}.dpkg-old"), "old");
        write(r, &format!("boot/vmlinuz-{V2}.old"), "old");
        assert_eq!(find(r).unwrap().kernel, r.join(format!("boot/vmlinuz-{V}")));
    }

    #[test]
    fn arch_names() {
        let t = TempDir::new().unwrap();
        let r = t.path();
        write(r, "boot/vmlinuz-linux", "kernel");
        write(r, "boot/initramfs-linux.img", "initrd");
        write(r, "boot/initramfs-linux-fallback.img", "fallback");
        let got = find(r).unwrap();
        assert_eq!(got.version.as_deref(), Some("linux"));
        assert_eq!(got.initramfs, Some(r.join("boot/initramfs-linux.img")));
    }

    #[test]
    fn not_a_rootfs() {
        let t = TempDir::new().unwrap();
        let msg = err(&t.path().join("missing"));
        assert!(msg.contains("is not a directory"), "{msg}");
    }
}
