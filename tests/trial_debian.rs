//! Field upgrades on a real distribution (issue 13): a Debian 12 system with
//! systemd as init (scripts/build-debian-system.sh, `DEPLOY_DEBIAN_ROOTFS`),
//! made with `-e on-device`, upgrades itself from a signed delta bundle on
//! trial. The on-device extension's systemd units do the rest: v2's trial
//! boot runs `btrfs-deploy-trial-watch.service` early and
//! `btrfs-deploy-health.service` once `multi-user.target` is up; its health
//! check passes, v2 becomes the default, and the next boot is v2. Then v3,
//! whose health check fails: the health unit reboots it and the device comes
//! back on v2 by itself, which reports the failure.
mod common;

use common::*;
use std::path::Path;

/// The scenario driver: a oneshot unit that runs after the health unit,
/// prints what happened to the serial console, and takes the next step
/// (kept in /srv, which is state: shared by every version).
const SCENARIO: &str = r#"#!/bin/sh
step=$(cat /srv/step 2>/dev/null || echo 0)
root=$(awk '$5 == "/" { print $4 }' /proc/self/mountinfo)
echo "SCENARIO: step=$step root=$root"
# trial-watch notices within a second or so that the health unit ended the
# trial; give it that time before reporting its state.
i=0
while systemctl -q is-active btrfs-deploy-trial-watch && [ $i -lt 60 ]; do
    sleep 0.5; i=$((i + 1))
done
for u in btrfs-deploy-trial-watch btrfs-deploy-health; do
    echo "SCENARIO: unit $u: $(systemctl show -p Type,ActiveState,Result,ExecMainStatus $u.service | sort | tr '\n' ' ')"
done
deploy status
next() { echo "$1" >/srv/step; sync; }
trial() {
    deploy --rootfs "/srv/$1.bundle" --verify-key /srv/vendor.pub --trial ||
        echo "SCENARIO: deploy $1 failed"
}
case $step in
0) trial v2; next 1; systemctl reboot ;;
1) next 2; systemctl reboot ;;
2) trial v3; next 3; systemctl reboot ;;
3) case $root in
   */v3/*) echo "SCENARIO: on v3's trial" ;;
   *) next 4; echo "SCENARIO: done"; systemctl poweroff ;;
   esac ;;
*) echo "SCENARIO: done"; systemctl poweroff ;;
esac
"#;

const SCENARIO_UNIT: &str = "[Unit]
Description=trial scenario driver (tests/trial_debian.rs)
After=multi-user.target btrfs-deploy-health.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/scenario
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
";

/// The Debian tree plus the scenario unit (enabled) and `release` as
/// /etc/scenario-release.
fn scenario_tree(dir: &Path, release: &str) {
    copy_tree(&debian_rootfs(), dir);
    let s = dir.join("usr/local/sbin/scenario");
    std::fs::create_dir_all(s.parent().unwrap()).unwrap();
    write(&s, SCENARIO.as_bytes());
    chmod(&s, 0o755);
    write(
        &dir.join("etc/systemd/system/scenario.service"),
        SCENARIO_UNIT.as_bytes(),
    );
    let wants = dir.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/scenario.service",
        wants.join("scenario.service"),
    )
    .unwrap();
    write(&dir.join("etc/scenario-release"), release.as_bytes());
}

fn health_check(tree: &Path, name: &str, script: &str) {
    let h = tree.join("etc/btrfs-deploy/health.d").join(name);
    std::fs::create_dir_all(h.parent().unwrap()).unwrap();
    write(&h, script.as_bytes());
    chmod(&h, 0o755);
}

#[test]
fn a_debian_device_with_systemd_upgrades_itself_on_trial() {
    let t0 = std::time::Instant::now();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    for v in ["factory", "v2", "v3"] {
        std::fs::create_dir(p(v)).unwrap();
        scenario_tree(&p(v), v);
    }
    // v2's health check passes once the system is up; v3's fails.
    health_check(
        &p("v2"),
        "10-system-up",
        "#!/bin/sh\nsystemctl is-active --quiet multi-user.target && \
         grep -qx v2 /etc/scenario-release && echo 'V2: healthy'\n",
    );
    health_check(
        &p("v3"),
        "10-app-answers",
        "#!/bin/sh\necho 'V3: the app does not answer'\nexit 1\n",
    );

    // The factory image, with the tool and its units (-e on-device).
    let img = p("device.img");
    let i = img.to_str().unwrap();
    run_ok(&[
        "--boot",
        "bios",
        "--size",
        "3G",
        "-e",
        "on-device",
        "--rootfs",
        p("factory").to_str().unwrap(),
        i,
    ]);
    {
        let ins = Inspect::open(&img);
        let run = ins.path("systems/factory/run");
        for (unit, target) in [
            ("btrfs-deploy-trial-watch.service", "sysinit.target"),
            ("btrfs-deploy-health.service", "multi-user.target"),
        ] {
            let link = run.join(format!("etc/systemd/system/{target}.wants/{unit}"));
            let to = std::fs::read_link(&link)
                .unwrap_or_else(|e| panic!("{unit} is not enabled in the factory tree: {e}"));
            let file = run.join(to.strip_prefix("/").unwrap());
            assert!(file.is_file(), "{} is missing", file.display());
        }
    }

    // The build host: a copy of the factory image (the devices were flashed
    // with it), v2 and v3 added, delta bundles against factory.
    let host = p("build.img");
    sh(&format!("cp --sparse=always {i} {}", host.display()));
    let h = host.to_str().unwrap();
    let key = p("vendor");
    run_ok(&["keygen", "--output", key.to_str().unwrap()]);
    // Build numbers in order (the default, the time in seconds, may be
    // the same for both).
    for (v, build) in [("v2", "2"), ("v3", "3")] {
        run_ok(&["--version", v, "--rootfs", p(v).to_str().unwrap(), h]);
        let bundle = p(&format!("{v}.bundle"));
        run_ok(&[
            "bundle",
            "create",
            h,
            "--version",
            v,
            "--base",
            "factory",
            "--sign-key",
            p("vendor.key").to_str().unwrap(),
            "--output",
            bundle.to_str().unwrap(),
            "--build",
            build,
        ]);
    }
    // The updates, downloaded onto the device's /srv (its data, in /state).
    {
        let e = Edit::open(&img);
        for f in ["v2.bundle", "v3.bundle", "vendor.pub"] {
            std::fs::copy(p(f), e.path(&format!("state/srv/{f}"))).unwrap();
        }
    }
    let prepared = t0.elapsed();

    // boots: factory (arms v2), v2 on trial (healthy: good), v2 (arms v3),
    // v3 on trial (health check fails), v2 again.
    let log = p("scenario.log");
    let out = run(&[
        "boot-test",
        i,
        "--persist",
        "--accel",
        "tcg",
        "--firmware",
        "bios",
        "--reboots",
        "4",
        "--timeout",
        "900",
        "--expect",
        "SCENARIO: done",
        "--fail-on",
        "SCENARIO: deploy .* failed",
        "--log",
        log.to_str().unwrap(),
    ]);
    // The console carries bytes that are not UTF-8 (terminal control).
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    assert!(out.status.success(), "scenario failed; console:\n{text}");
    let b = |n| boot_of(&text, n);
    assert!(
        b(1).contains("SCENARIO: step=0 root=/systems/factory/run"),
        "{}",
        b(1)
    );
    // 2: v2's trial: trial-watch runs early, the health unit after
    // multi-user.target; its check passes and v2 becomes the default.
    let b2 = b(2);
    assert!(b2.contains("SCENARIO: step=1 root=/systems/v2/run"), "{b2}");
    assert!(b2.contains("this boot is the trial of v2"), "{b2}");
    assert!(b2.contains("V2: healthy"), "{b2}");
    assert!(b2.contains("v2 is now the default"), "{b2}");
    // Both units ran under systemd, and the health unit succeeded.
    assert!(
        b2.contains(
            "unit btrfs-deploy-health: ActiveState=inactive ExecMainStatus=0 Result=success Type=oneshot"
        ),
        "{b2}"
    );
    assert!(
        b2.contains("unit btrfs-deploy-trial-watch: ActiveState=inactive ExecMainStatus=0 Result=success Type=notify"),
        "{b2}"
    );
    // 3: v2 is the default; status says its trial was good.
    let b3 = b(3);
    assert!(b3.contains("SCENARIO: step=2 root=/systems/v2/run"), "{b3}");
    assert!(b3.contains("Default:  v2"), "{b3}");
    assert!(b3.contains("Last trial: v2: good at"), "{b3}");
    // 4: v3's health check fails; the unit records it and reboots.
    let b4 = b(4);
    assert!(b4.contains("this boot is the trial of v3"), "{b4}");
    assert!(b4.contains("V3: the app does not answer"), "{b4}");
    // 5: back on v2 by itself, which reports v3's failure.
    let b5 = b(5);
    assert!(b5.contains("SCENARIO: step=3 root=/systems/v2/run"), "{b5}");
    assert!(
        b5.contains("Last trial: v3: failed at")
            && b5.contains("health check 10-app-answers (exit status: 1)"),
        "{b5}"
    );
    let st: serde_json::Value =
        serde_json::from_slice(&run_ok(&["status", i, "--json"]).stdout).unwrap();
    assert_eq!(st["default"], "v2", "{st}");
    assert_eq!(st["failed_versions"], serde_json::json!(["v3"]), "{st}");
    eprintln!(
        "trial_debian: prepared in {:.0} s, booted in {:.0} s",
        prepared.as_secs_f64(),
        (t0.elapsed() - prepared).as_secs_f64()
    );
}
