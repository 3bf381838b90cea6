//! Issue 24: a fleet. Three QEMU devices (the tiny system with `-e on-device`,
//! dropbear for SSH, the port forwarded to 127.0.0.1 by `boot-test
//! --forward`) pull signed bundles from a web server on the host through
//! `deploy update --trial`, driven by `ansible-playbook` with the
//! collection's rollout playbook and `serial: 1`: all three take v2 on trial
//! and commit it; a second run changes nothing; a v3 whose health check
//! fails on the first device stops the rollout before the others are
//! touched, and that device is back on v2 by itself.

mod common;
use common::http::Server;
use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The host's dropbear and the libraries it links, at the same paths.
fn add_dropbear(tree: &Path) {
    sh(&format!(
        "set -e; t={t}; install -D -m 755 /usr/sbin/dropbear $t/usr/sbin/dropbear; \
         for l in $(ldd /usr/sbin/dropbear | grep -o '/[^ ]*'); do \
           mkdir -p $t$(dirname $l); cp -L $l $t$l; done; \
         mkdir -p $t/etc/dropbear; echo /bin/sh >$t/etc/shells",
        t = tree.display()
    ));
}

/// The vendor's device tree: the tiny system, the trial hooks a non-systemd
/// init runs (docs/trials.md), the network and SSH server (until
/// /tmp/fleet-stop appears), root's authorized key, and the device's
/// deploy.toml naming the vendor's index and key.
fn device_tree(dir: &Path, ssh_pub: &Path, vendor_pub: &Path, update_url: &str) {
    copy_tree(&tiny_rootfs(), dir);
    // The virtio-net driver (the initramfs loads only the disk's).
    add_tiny_kernel_modules(
        dir,
        "lib/fleet",
        &["failover", "net_failover", "virtio_net"],
    );
    add_dropbear(dir);
    let ssh = dir.join("root/.ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    chmod(&ssh, 0o700);
    std::fs::copy(ssh_pub, ssh.join("authorized_keys")).unwrap();
    chmod(&ssh.join("authorized_keys"), 0o600);
    let etc = dir.join("etc/btrfs-deploy");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(vendor_pub, etc.join("vendor.pub")).unwrap();
    write(
        &etc.join("deploy.toml"),
        format!(
            "required_extensions = [\"on-device\"]\ntrial_timeout = 120\n\
             update_url = \"{update_url}\"\nverify_key = \"vendor.pub\"\n"
        )
        .as_bytes(),
    );
    write_trial_hooks(dir, "10-trial-watch", 120);
    let hooks = dir.join("etc/tiny-boot.d");
    write(
        &hooks.join("90-fleet"),
        br#"#!/bin/sh
# The device's network (QEMU's user network: the host is 10.0.2.2) and SSH.
rm -f /tmp/fleet-stop
for m in failover net_failover virtio_net; do insmod /lib/fleet/$m.ko; done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
dropbear -R -p 22 -P /tmp/dropbear.pid </dev/null >/dev/null 2>&1
# (To the console itself: the init reads hooks' output through a pipe.)
echo "FLEET: ssh up, running $(awk '$5 == "/" { print $4 }' /proc/self/mountinfo)" >/dev/console
while [ ! -e /tmp/fleet-stop ]; do sleep 1; done
kill "$(cat /tmp/dropbear.pid)"
echo "FLEET: stopping" >/dev/console
"#,
    );
    chmod(&hooks.join("90-fleet"), 0o755);
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One device: its disk, booted by `deploy boot-test --persist` with its
/// SSH port forwarded, allowed `reboots` reboots before the last boot.
struct Device {
    name: String,
    img: PathBuf,
    log: PathBuf,
    port: u16,
    child: Child,
}

impl Device {
    fn boot(name: &str, img: PathBuf, reboots: u32) -> Device {
        let port = free_port();
        let log = img.with_extension("console.log");
        let child = deploy()
            .args([
                "boot-test",
                s(&img),
                "--persist",
                "--accel",
                "tcg",
                "--firmware",
                "bios",
                "--memory",
                "384",
                "--timeout",
                "1500",
                "--reboots",
                &reboots.to_string(),
                "--forward",
                &format!("127.0.0.1:{port}:22"),
                "--log",
                s(&log),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Device {
            name: name.into(),
            img,
            log,
            port,
            child,
        }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits until the console shows `n` "FLEET: ssh up" lines.
    fn wait_ssh_up(&self, n: usize) {
        let end = Instant::now() + Duration::from_secs(300);
        while self.console().matches("FLEET: ssh up").count() < n {
            assert!(
                Instant::now() < end,
                "{}: no SSH server after 300 s:\n{}",
                self.name,
                self.console()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn ssh(&self, key: &Path, cmd: &str) -> std::process::Output {
        Command::new("ssh")
            .args([
                "-i",
                s(key),
                "-p",
                &self.port.to_string(),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "root@127.0.0.1",
                cmd,
            ])
            .output()
            .unwrap()
    }

    /// Tells the guest to power off and waits for `boot-test`'s verdict.
    fn stop(mut self, key: &Path) -> (bool, String) {
        let out = self.ssh(key, "touch /tmp/fleet-stop");
        assert!(out.status.success(), "{}: {out:?}", self.name);
        let status = self.child.wait().unwrap();
        let mut text = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        (status.success(), text)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of every device's console, for failure messages.
fn consoles(fleet: &[Device]) -> String {
    let mut out = String::new();
    for dev in fleet {
        let text = dev.console();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("--- {} console (last 60 lines):\n", dev.name));
        for l in &lines[lines.len().saturating_sub(60)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn ansible_playbook(dir: &Path, inventory: &Path, vars: &[String]) -> (bool, String) {
    let mut cmd = Command::new("ansible-playbook");
    cmd.args(["-i", s(inventory), "btrfs_deploy.device.rollout"])
        .env("ANSIBLE_COLLECTIONS_PATH", dir.join("collections"))
        .env("ANSIBLE_HOME", dir.join("ansible-home"))
        .env("ANSIBLE_HOST_KEY_CHECKING", "False")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", dir.join("cp"));
    for v in vars {
        cmd.args(["-e", v]);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    (out.status.success(), text)
}

/// The PLAY RECAP line of `host`.
fn recap<'a>(text: &'a str, host: &str) -> &'a str {
    text.lines()
        .rev()
        .find(|l| l.starts_with(host) && l.contains("ok="))
        .unwrap_or_else(|| panic!("no recap line for {host}:\n{text}"))
}

#[test]
fn ansible_rolls_a_version_out_in_stages_and_a_failing_one_stops_the_rollout() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let site = dir.join("site");
    std::fs::create_dir(&site).unwrap();
    let server = Server::start(&site, 1 << 20);
    // From inside a QEMU guest the host's 127.0.0.1 is 10.0.2.2.
    let update_url = format!("http://10.0.2.2:{}/files/index.json", server.port);
    run_ok(&["keygen", "--output", s(&dir.join("vendor"))]);
    let key = dir.join("id");
    sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}",
        key.display()
    ));

    // The vendor's build host: factory, then v2 and a v3 whose app check fails.
    let base = dir.join("base");
    device_tree(
        &base,
        &dir.join("id.pub"),
        &dir.join("vendor.pub"),
        &update_url,
    );
    let build = dir.join("build.img");
    run_ok(&[
        "--version",
        "factory",
        "--boot",
        "bios",
        "--size",
        "1200M",
        "-e",
        "on-device",
        "--rootfs",
        s(&base),
        s(&build),
    ]);
    let deploy_tree = |version: &str, tree: &Path| {
        run_ok(&[
            "--version",
            version,
            "-e",
            "on-device",
            "--rootfs",
            s(tree),
            s(&build),
        ]);
    };
    // The factory image every device is written with.
    let devices: Vec<PathBuf> = (1..=3)
        .map(|n| {
            let p = dir.join(format!("dev{n}.img"));
            sh(&format!(
                "cp --sparse=always {} {}",
                build.display(),
                p.display()
            ));
            p
        })
        .collect();
    let v2 = dir.join("v2");
    copy_tree(&base, &v2);
    write(&v2.join("etc/issue"), b"v2\n");
    deploy_tree("v2", &v2);
    let v3 = dir.join("v3");
    copy_tree(&v2, &v3);
    write(&v3.join("etc/issue"), b"v3\n");
    let check = v3.join("etc/btrfs-deploy/health.d/10-app-answers");
    write(
        &check,
        b"#!/bin/sh\necho 'V3: the app does not answer'\nexit 1\n",
    );
    chmod(&check, 0o755);
    deploy_tree("v3", &v3);
    let bundle = |label: &str, base: &str, build_no: &str, out: &Path| {
        run_ok(&[
            "bundle",
            "create",
            s(&build),
            "--version",
            label,
            "--base",
            base,
            "--build",
            build_no,
            "--sign-key",
            s(&dir.join("vendor.key")),
            "--output",
            s(out),
        ]);
    };
    let index = || {
        run_ok(&[
            "bundle",
            "index",
            s(&site),
            "--sign-key",
            s(&dir.join("vendor.key")),
        ]);
    };
    // Published: v2 (a delta against factory).
    bundle("v2", "factory", "200", &site.join("v2.bundle"));
    index();

    // The collection, installed the way the README says.
    let collection = Path::new(env!("CARGO_MANIFEST_DIR")).join("ansible");
    let out = Command::new("ansible-galaxy")
        .args(["collection", "install", s(&collection), "-p"])
        .arg(dir.join("collections"))
        .env("ANSIBLE_HOME", dir.join("ansible-home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // The fleet. dev1 reboots three times (v2 trial; v3 trial, fallback),
    // the others once (v2 trial): any other reboot fails their boot-test.
    let fleet: Vec<Device> = devices
        .iter()
        .enumerate()
        .map(|(i, img)| Device::boot(&format!("dev{}", i + 1), img.clone(), [3, 1, 1][i]))
        .collect();
    for dev in &fleet {
        dev.wait_ssh_up(1);
    }
    let inventory = dir.join("inventory.ini");
    let mut inv = String::from("[devices]\n");
    for dev in &fleet {
        inv.push_str(&format!("{} ansible_port={}\n", dev.name, dev.port));
    }
    inv.push_str(&format!(
        "[devices:vars]\nansible_host=127.0.0.1\nansible_user=root\n\
         ansible_ssh_private_key_file={}\n\
         ansible_ssh_common_args='-o UserKnownHostsFile=/dev/null'\n",
        key.display()
    ));
    std::fs::write(&inventory, inv).unwrap();
    let vars = |version: &str| {
        vec![
            format!("rollout_version={version}"),
            "rollout_update=true".into(),
            "rollout_reboot_command='reboot -f'".into(),
            "rollout_timeout=300".into(),
            format!(
                "rollout_summary_file={}",
                dir.join(format!("summary-{version}.json")).display()
            ),
        ]
    };
    let summary = |version: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join(format!("summary-{version}.json"))).unwrap())
            .unwrap()
    };

    // v2, one device at a time: each tries it, comes back healthy, commits.
    let (ok, text) = ansible_playbook(dir, &inventory, &vars("v2"));
    assert!(ok, "the v2 rollout failed:\n{text}\n{}", consoles(&fleet));
    let sum = summary("v2");
    for dev in &fleet {
        assert!(recap(&text, &dev.name).contains("failed=0"), "{text}");
        assert_eq!(sum[&dev.name]["running"], "v2", "{sum}");
        assert_eq!(sum[&dev.name]["default"], "v2", "{sum}");
        assert_eq!(sum[&dev.name]["last_trial"]["state"], "good", "{sum}");
        assert_eq!(dev.console().matches("FLEET: ssh up").count(), 2);
    }
    // Serial: dev1 was back on v2 before dev2's trial began.
    let batches: Vec<usize> = ["dev1", "dev2", "dev3"]
        .iter()
        .map(|h| text.find(&format!("changed: [{h}]")).expect(&text))
        .collect();
    assert!(batches.windows(2).all(|w| w[0] < w[1]), "{text}");

    // Again: nothing to do, nothing changed, no reboot.
    let (ok, text) = ansible_playbook(dir, &inventory, &vars("v2"));
    assert!(ok, "{text}");
    for dev in &fleet {
        assert!(recap(&text, &dev.name).contains("changed=0"), "{text}");
    }

    // v3 is published (a delta against v2); its trial fails on dev1, which
    // falls back to v2 by itself, and the rollout stops there.
    bundle("v3", "v2", "300", &site.join("v3.bundle"));
    index();
    let (ok, text) = ansible_playbook(dir, &inventory, &vars("v3"));
    assert!(!ok, "a failed trial must fail the rollout:\n{text}");
    assert!(text.contains("the trial of v3 failed"), "{text}");
    assert!(recap(&text, "dev1").contains("failed=1"), "{text}");
    for h in ["dev2", "dev3"] {
        // (Only the summary reads it, as "[dev1 -> dev2]".)
        assert!(
            !text.contains(&format!("[{h}]")),
            "{h} was touched:\n{text}"
        );
    }
    let sum = summary("v3");
    assert_eq!(sum["dev1"]["running"], "v2", "{sum}");
    assert_eq!(sum["dev1"]["last_trial"]["version"], "v3", "{sum}");
    assert_eq!(sum["dev1"]["last_trial"]["state"], "failed", "{sum}");
    for h in ["dev2", "dev3"] {
        assert_eq!(sum[h]["running"], "v2", "{sum}");
    }
    assert!(
        fleet[0].console().contains("V3: the app does not answer"),
        "{}",
        fleet[0].console()
    );

    // Power the fleet off; each boot-test passes only if the device rebooted
    // exactly as many times as its story says.
    let imgs: Vec<PathBuf> = fleet.iter().map(|d| d.img.clone()).collect();
    for dev in fleet {
        let name = dev.name.clone();
        let (ok, text) = dev.stop(&key);
        assert!(ok, "{name}'s boot-test failed:\n{text}");
    }
    let st = status_json(&imgs[0]);
    assert_eq!(st["default"], "v2", "{st}");
    assert_eq!(st["last_trial"]["version"], "v3", "{st}");
    assert_eq!(st["last_trial"]["state"], "failed", "{st}");
    for img in &imgs[1..] {
        let st = status_json(img);
        assert_eq!(st["default"], "v2", "{st}");
        let versions: Vec<&str> = st["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(!versions.contains(&"v3"), "{st}");
        run_ok(&["check", s(img)]);
    }
    run_ok(&["check", s(&imgs[0])]);
}
