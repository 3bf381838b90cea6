//! Each version's root mode (`root_mode` in its `deployment.json`) against
//! what makes it so: its boot entries (`ro`/`rw`, the volatile `init=` and
//! marker), its fstab (`/` read-only, `/etc` on the version's own
//! subvolume, `/state` writable) and its tree (`run/etc` a subvolume, the
//! volatile script executable).

use super::bootloader::parse_entries;
use super::report::Finding;
use super::version::VersionInfo;
use crate::store::btrfs;
use crate::store::layout::{self, Layout};
use crate::store::rootmode::{RootMode, VOLATILE_ARG, VOLATILE_INIT};
use crate::tree::fstab;
use crate::util::rootpath;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The volatile script in a version's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Script {
    Missing,
    NotExecutable,
    Executable,
}

/// Which menu of the boot partition the entries' arguments come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PartitionMenu {
    /// systemd-boot's entries on the EFI system partition.
    Esp,
    /// U-Boot's menu on the boot partition.
    UBoot,
}

/// What the root mode of one version is checked against.
#[derive(Debug, Clone)]
pub(super) struct Facts<'a> {
    /// The version.
    pub(super) label: &'a str,
    /// Its recorded root mode.
    pub(super) mode: RootMode,
    /// Its boot entries: (what the entry is, for the messages, e.g.
    /// "boot entry `label v1`"; its kernel arguments): its own `label <L>`
    /// and, while it is the default, `label default` of extlinux.conf, and
    /// its entry on the boot partition.
    pub(super) entries: Vec<(String, String)>,
    /// Its `run/etc/fstab` (None: unreadable, reported by the fstab check).
    pub(super) fstab: Option<&'a str>,
    /// Whether `run/etc` is a subvolume.
    pub(super) etc_subvolume: bool,
    /// Its volatile script.
    pub(super) script: Script,
    /// This filesystem.
    pub(super) fs_uuid: &'a str,
}

/// The root-mode finding of every version that has a record.
/// `partition`: the (label, kernel arguments) of the boot partition's
/// entries, when the disk has one.
pub(super) fn check_root_modes(
    top: &Layout,
    versions: &[VersionInfo],
    fs_uuid: &str,
    partition: Option<(PartitionMenu, &[(String, String)])>,
) -> Vec<Finding> {
    // The menu every backend is written from (its absence is the bootloader
    // check's problem).
    let conf = std::fs::read_to_string(top.extlinux_conf())
        .map(|c| crate::boot::extlinux::expand_includes(&c, &top.top))
        .unwrap_or_default();
    let entries = parse_entries(&conf);
    let default = crate::store::versions::default_label(top).ok();
    let mut out = Vec::new();
    for v in versions {
        let Some(record) = &v.record else { continue };
        let run = top.version(&v.label).join(layout::RUN);
        let fstab_bytes = rootpath::read_in_root(&run, Path::new("etc/fstab"))
            .ok()
            .flatten();
        let fstab_text = fstab_bytes.map(|b| String::from_utf8_lossy(&b).into_owned());
        let mut own: Vec<(String, String)> = entries
            .iter()
            .filter(|e| {
                e.label == v.label
                    || (e.label == layout::DEFAULT_LINK && default.as_deref() == Some(&v.label))
            })
            .map(|e| {
                (
                    format!("boot entry `label {}`", e.label),
                    e.append.clone().unwrap_or_default(),
                )
            })
            .collect();
        if let Some((menu, args)) = partition {
            let what = match menu {
                PartitionMenu::Esp => format!("the EFI system partition's entry for {}", v.label),
                PartitionMenu::UBoot => {
                    format!("the U-Boot menu's entry `label {}`", v.label)
                }
            };
            own.extend(
                args.iter()
                    .filter(|(l, _)| *l == v.label)
                    .map(|(_, a)| (what.clone(), a.clone())),
            );
        }
        let etc = run.join("etc");
        let facts = Facts {
            label: &v.label,
            mode: record.root_mode,
            entries: if record.has_kernel { own } else { Vec::new() },
            fstab: fstab_text.as_deref(),
            etc_subvolume: std::fs::symlink_metadata(&etc).is_ok_and(|m| m.is_dir())
                && btrfs::is_subvolume(&etc),
            script: script_state(&run),
            fs_uuid,
        };
        out.push(Finding::from_problems(
            &format!("version {}: root mode", v.label),
            root_mode_problems(&facts),
            describe(record.root_mode),
        ));
    }
    out
}

fn describe(mode: RootMode) -> String {
    match mode {
        RootMode::Rw => "rw: / read-write".to_string(),
        RootMode::Ro => "ro: / read-only, /etc its own writable subvolume".to_string(),
        RootMode::Volatile => {
            format!("volatile: read-only / under a tmpfs overlay (init=/{VOLATILE_INIT})")
        }
    }
}

/// The volatile script of the tree `run` (symlinks resolved inside it).
fn script_state(run: &Path) -> Script {
    match rootpath::try_resolve_in_root(run, Path::new(VOLATILE_INIT)) {
        Ok(Some(p)) => match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Script::Executable,
            Ok(_) => Script::NotExecutable,
            Err(_) => Script::Missing,
        },
        _ => Script::Missing,
    }
}

/// Problems of one version's root mode, each naming what is wrong and the fix.
pub(super) fn root_mode_problems(f: &Facts) -> Vec<String> {
    let l = f.label;
    let mode = f.mode;
    let mut out = Vec::new();
    let menu_fix = "run deploy cleanup, which rewrites the boot menus from deployment.json";
    let init_arg = format!("init=/{VOLATILE_INIT}");
    for (entry, append) in &f.entries {
        let args: Vec<&str> = append.split_whitespace().collect();
        let has = |a: &str| args.contains(&a);
        if mode.kernel_ro() {
            if !has("ro") {
                out.push(format!(
                    "{entry} lacks `ro`, so the kernel mounts / read-write \
                     (root mode {mode}): {menu_fix}"
                ));
            }
            if has("rw") {
                out.push(format!(
                    "{entry} has `rw`, so / is mounted read-write \
                     (root mode {mode}): {menu_fix}"
                ));
            }
        } else if has("ro") {
            out.push(format!(
                "{entry} has `ro`, but {l} is root mode rw: {menu_fix}"
            ));
        }
        if mode == RootMode::Volatile {
            for a in [init_arg.as_str(), VOLATILE_ARG] {
                if !has(a) {
                    out.push(format!(
                        "{entry} lacks {a} (root mode volatile): {menu_fix}"
                    ));
                }
            }
        } else if has(VOLATILE_ARG) || has(&init_arg) {
            out.push(format!(
                "{entry} starts the volatile overlay, but {l} is root mode \
                 {mode}: {menu_fix}"
            ));
        }
    }
    let fstab_file = format!("systems/{l}/run/etc/fstab");
    if let Some(text) = f.fstab {
        let lines = fstab::lines(text);
        let has_opt = |line: &fstab::Line, o: &str| line.options.iter().any(|x| x == o);
        for line in &lines {
            let n = line.number;
            if line.point == "/"
                && mode == RootMode::Ro
                && (!has_opt(line, "ro") || has_opt(line, "rw"))
            {
                out.push(format!(
                    "the / line of {fstab_file} (line {n}, options `{}`) lacks `ro` or has \
                     `rw`, so the boot remounts / read-write (root mode ro): add `ro` to that \
                     line's options and remove `rw` (as in `{}`)",
                    line.options.join(","),
                    fstab::RO_ROOT_OPTIONS
                ));
            }
            let state = line.options.iter().any(|o| {
                o.strip_prefix("subvol=")
                    .map(|s| s.trim_start_matches('/'))
                    .is_some_and(|s| s.starts_with("state/"))
            });
            if state && has_opt(line, "ro") {
                out.push(format!(
                    "the {} line of {fstab_file} (line {n}) mounts its /state subvolume `ro`: \
                     /state must stay writable in every root mode; remove `ro` from that line",
                    line.point
                ));
            }
        }
        if mode == RootMode::Ro {
            let want = format!("systems/{l}/run/etc");
            let etc: Vec<&fstab::Line> = lines.iter().filter(|x| x.point == "/etc").collect();
            let wanted_line = format!(
                "UUID={} /etc btrfs subvol=/{want},defaults,rw,noatime 0 0",
                f.fs_uuid
            );
            match etc.as_slice() {
                [] => out.push(format!(
                    "{fstab_file} has no /etc line, so /etc stays read-only (root mode ro): \
                     add `{wanted_line}`"
                )),
                [e] => {
                    let subvol = e.options.iter().find_map(|o| o.strip_prefix("subvol="));
                    if subvol.map(|s| s.trim_start_matches('/')) != Some(want.as_str()) {
                        out.push(format!(
                            "the /etc line of {fstab_file} (line {}) does not mount \
                             subvol=/{want}, the version's own /etc (root mode ro): make it \
                             `{wanted_line}`",
                            e.number
                        ));
                    }
                    if has_opt(e, "ro") {
                        out.push(format!(
                            "the /etc line of {fstab_file} (line {}) is `ro`, so settings \
                             cannot be written (root mode ro): make it `{wanted_line}`",
                            e.number
                        ));
                    }
                }
                many => out.push(format!(
                    "{fstab_file} has {} /etc lines: keep only `{wanted_line}`",
                    many.len()
                )),
            }
        }
    }
    let redeploy = format!(
        "deploy the rootfs again as a new version with --root-mode {mode} (deploy --rootfs \
         ROOTFS --version NEW --root-mode {mode} TARGET)"
    );
    if mode == RootMode::Ro && !f.etc_subvolume {
        out.push(format!(
            "systems/{l}/run/etc is not a subvolume, so no fstab line can mount it \
             read-write on the read-only / (root mode ro): {redeploy}"
        ));
    }
    if mode == RootMode::Volatile {
        match f.script {
            Script::Executable => {}
            Script::Missing => out.push(format!(
                "systems/{l}/run/{VOLATILE_INIT} is missing: the kernel's init= cannot \
                 start, the boot panics (root mode volatile): {redeploy}"
            )),
            Script::NotExecutable => out.push(format!(
                "systems/{l}/run/{VOLATILE_INIT} is not an executable file: the kernel's \
                 init= cannot start it (root mode volatile): chmod 0755 it, or {redeploy}"
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "11111111-2222-3333-4444-555555555555";

    fn entry(label: &str, mode: RootMode) -> (String, String) {
        let flag = if mode.kernel_ro() { "ro" } else { "rw" };
        (
            label.to_string(),
            format!(
                "root=UUID={UUID} rootfstype=btrfs rootflags=subvol=systems/v1/run {flag} {}",
                mode.entry_args("console=ttyS0")
            ),
        )
    }

    fn facts(mode: RootMode, fstab_text: &str) -> Facts<'_> {
        Facts {
            label: "v1",
            mode,
            entries: vec![
                entry("boot entry `label v1`", mode),
                entry("boot entry `label default`", mode),
            ],
            fstab: Some(fstab_text),
            etc_subvolume: mode == RootMode::Ro,
            script: if mode == RootMode::Volatile {
                Script::Executable
            } else {
                Script::Missing
            },
            fs_uuid: UUID,
        }
    }

    fn completed(mode: RootMode) -> String {
        fstab::complete_for("# vendor\n", UUID, "v1", mode).content
    }

    #[test]
    fn what_deploy_writes_passes_in_every_mode() {
        for mode in [RootMode::Rw, RootMode::Ro, RootMode::Volatile] {
            let text = completed(mode);
            assert_eq!(
                root_mode_problems(&facts(mode, &text)),
                Vec::<String>::new(),
                "{mode}"
            );
        }
    }

    #[test]
    fn ro_entry_without_ro_or_with_rw_is_named() {
        let text = completed(RootMode::Ro);
        let mut f = facts(RootMode::Ro, &text);
        f.entries[0].1 = f.entries[0].1.replace(" ro ", " rw ");
        let p = root_mode_problems(&f);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("`label v1` lacks `ro`"), "{p:?}");
        assert!(p[1].contains("`label v1` has `rw`"), "{p:?}");
        assert!(p[0].contains("deploy cleanup"), "{p:?}");
    }

    #[test]
    fn rw_entry_with_ro_or_the_volatile_arg_is_named() {
        let text = completed(RootMode::Rw);
        let mut f = facts(RootMode::Rw, &text);
        f.entries[1].1 = entry("default", RootMode::Volatile).1;
        let p = root_mode_problems(&f);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("`label default` has `ro`"), "{p:?}");
        assert!(p[1].contains("starts the volatile overlay"), "{p:?}");
    }

    #[test]
    fn ro_fstab_root_line_must_be_ro() {
        let text =
            completed(RootMode::Ro).replace("defaults,ro,noatime 0 1", "defaults,noatime 0 1");
        let p = root_mode_problems(&facts(RootMode::Ro, &text));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("the / line of systems/v1/run/etc/fstab"),
            "{p:?}"
        );
        let text = completed(RootMode::Ro).replace("defaults,ro,noatime 0 1", "defaults,ro,rw 0 1");
        assert_eq!(root_mode_problems(&facts(RootMode::Ro, &text)).len(), 1);
    }

    #[test]
    fn ro_needs_its_etc_line_and_subvolume() {
        let full = completed(RootMode::Ro);
        let without: String = full
            .lines()
            .filter(|l| !l.contains(" /etc "))
            .map(|l| format!("{l}\n"))
            .collect();
        let p = root_mode_problems(&facts(RootMode::Ro, &without));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("has no /etc line"), "{p:?}");
        assert!(
            p[0].contains("subvol=/systems/v1/run/etc,defaults,rw,noatime"),
            "{p:?}"
        );
        let other = full.replace("subvol=/systems/v1/run/etc,", "subvol=/systems/v0/run/etc,");
        let p = root_mode_problems(&facts(RootMode::Ro, &other));
        assert!(p.len() == 1 && p[0].contains("does not mount"), "{p:?}");
        // Without the leading slash, as the brief form `subvol=systems/...`.
        let bare = full.replace("subvol=/systems/v1/", "subvol=systems/v1/");
        assert_eq!(
            root_mode_problems(&facts(RootMode::Ro, &bare)),
            Vec::<String>::new()
        );
        let ro_etc = full.replace("run/etc,defaults,rw,", "run/etc,defaults,ro,");
        let p = root_mode_problems(&facts(RootMode::Ro, &ro_etc));
        assert!(p.len() == 1 && p[0].contains("is `ro`"), "{p:?}");
        let mut f = facts(RootMode::Ro, &full);
        f.etc_subvolume = false;
        let p = root_mode_problems(&f);
        assert!(
            p.len() == 1 && p[0].contains("run/etc is not a subvolume"),
            "{p:?}"
        );
        assert!(p[0].contains("--root-mode ro"), "{p:?}");
    }

    #[test]
    fn state_lines_stay_writable() {
        let text = completed(RootMode::Ro).replace(
            "subvol=/state/home,defaults,rw,",
            "subvol=/state/home,defaults,ro,",
        );
        let p = root_mode_problems(&facts(RootMode::Ro, &text));
        assert!(p.len() == 1 && p[0].contains("the /home line"), "{p:?}");
    }

    #[test]
    fn volatile_needs_its_args_and_script() {
        let text = completed(RootMode::Volatile);
        let mut f = facts(RootMode::Volatile, &text);
        f.entries[0].1 = f.entries[0].1.replace(VOLATILE_ARG, "");
        f.script = Script::Missing;
        let p = root_mode_problems(&f);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("lacks btrfs_deploy.root=volatile"), "{p:?}");
        assert!(p[1].contains("volatile-root is missing"), "{p:?}");
        f.script = Script::NotExecutable;
        assert!(root_mode_problems(&f)[1].contains("not an executable"));
    }

    #[test]
    fn a_kept_vendor_root_line_must_be_ro_too() {
        let vendor = "/dev/root / btrfs defaults,rw 0 1\n";
        // As the fstab completion before root modes made kept lines ro.
        let mut old = fstab::complete_for(vendor, UUID, "v1", RootMode::Rw).content;
        old.push_str(&format!(
            "UUID={UUID} /etc btrfs subvol=/systems/v1/run/etc,defaults,rw,noatime 0 0\n"
        ));
        let p = root_mode_problems(&facts(RootMode::Ro, &old));
        assert!(
            p.len() == 1 && p[0].contains("(line 1, options `defaults,rw`)"),
            "{p:?}"
        );
        let now = fstab::complete_for(vendor, UUID, "v1", RootMode::Ro).content;
        assert_eq!(
            root_mode_problems(&facts(RootMode::Ro, &now)),
            Vec::<String>::new()
        );
    }
}
