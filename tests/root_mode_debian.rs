//! Issue 23 on a real distribution: the Debian 12 system with systemd as
//! init (`make fixture`, `DEPLOY_DEBIAN_ROOTFS`) deployed with `--root-mode
//! ro` and `volatile`, booted twice each under BIOS (TCG). systemd mounts
//! what fstab says (systemd-remount-fs among them), so this checks that it
//! keeps `/` read-only (or the overlay), `/etc` writable in `ro` only
//! across boots, and `/state` writable.

mod common;
use common::*;
use std::path::Path;

/// A oneshot unit that reports the mounts and writes, then powers off.
const PROBE: &str = r#"#!/bin/sh
echo "PROBE: root=$(findmnt -n -o FSTYPE,OPTIONS /)"
if touch /probe-root 2>/dev/null; then echo "PROBE: root-write=ok"; else echo "PROBE: root-write=refused"; fi
echo "PROBE: old-root=$(cat /probe-old 2>/dev/null || echo none)"
echo boot >/probe-old 2>/dev/null
for f in /etc/probe-count /home/probe-count; do
    n=$(cat "$f" 2>/dev/null || echo 0)
    n=$((n + 1))
    if echo "$n" >"$f"; then echo "PROBE: count $f=$n"; else echo "PROBE: count $f=write-failed"; fi
done
echo "PROBE: failed-units=$(systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
sync
echo "PROBE: done"
systemctl poweroff
"#;

const PROBE_UNIT: &str = "[Unit]
Description=root mode probe (tests/root_mode_debian.rs)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/probe
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
";

fn probe_tree(dir: &Path) {
    copy_tree(&debian_rootfs(), dir);
    let p = dir.join("usr/local/sbin/probe");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    write(&p, PROBE.as_bytes());
    chmod(&p, 0o755);
    write(
        &dir.join("etc/systemd/system/probe.service"),
        PROBE_UNIT.as_bytes(),
    );
    let wants = dir.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/probe.service",
        wants.join("probe.service"),
    )
    .unwrap();
}

fn probe(console: &str, key: &str) -> String {
    let prefix = format!("PROBE: {key}");
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line:\n{console}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn debian_with_systemd_keeps_ro_and_volatile_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    probe_tree(&tree);
    for mode in ["ro", "volatile"] {
        let img = tmp.path().join(format!("{mode}.img"));
        let imgs = img.to_str().unwrap();
        run_ok(&[
            "--boot",
            "bios",
            "--size",
            "3G",
            "--root-mode",
            mode,
            "--rootfs",
            tree.to_str().unwrap(),
            imgs,
        ]);
        run_ok(&["check", imgs]);
        for n in 1..=2 {
            let c = boot_console_args(
                &img,
                &[
                    "--firmware",
                    "bios",
                    "--persist",
                    "--timeout",
                    "300",
                    "--expect",
                    "PROBE: done",
                ],
            );
            let root = probe(&c, "root=");
            let want = n.to_string();
            match mode {
                "ro" => {
                    assert!(
                        root.starts_with("btrfs ro,"),
                        "boot {n}: / is `{root}`\n{c}"
                    );
                    assert_eq!(probe(&c, "root-write="), "refused", "{c}");
                    assert_eq!(probe(&c, "count /etc/probe-count="), want, "{c}");
                }
                _ => {
                    assert!(
                        root.starts_with("overlay rw,"),
                        "boot {n}: / is `{root}`\n{c}"
                    );
                    assert_eq!(probe(&c, "root-write="), "ok", "{c}");
                    assert_eq!(
                        probe(&c, "old-root="),
                        "none",
                        "boot {n}: a write to / survived\n{c}"
                    );
                    assert_eq!(probe(&c, "count /etc/probe-count="), "1", "{c}");
                }
            }
            assert_eq!(probe(&c, "count /home/probe-count="), want, "{c}");
            assert_eq!(probe(&c, "failed-units="), "", "{mode}: failed units\n{c}");
        }
        run_ok(&["check", imgs]);
    }
}
