//! Command-line types (clap). Parsing only: validation happens when the
//! arguments are resolved into a plan.

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Deploy a Linux root filesystem onto a disk image or block device with a
/// versioned Btrfs layout: systems side by side, shared state, atomic switch
/// and rollback.
#[derive(Debug, Parser)]
#[command(
    name = "deploy",
    version,
    disable_version_flag = true,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
      deploy --rootfs ./rootfs disk.img                 first deploy (version \"factory\")\n  \
      deploy --version v2 --rootfs ./rootfs-v2 disk.img add v2 beside it and make it default\n  \
      deploy list disk.img                              show the versions\n  \
      deploy set-default factory disk.img               roll back\n  \
      deploy --version v3 --trial --rootfs ./v3         on a device: boot v3 once, keep it if healthy\n  \
      deploy boot-test disk.img                         boot it in QEMU and check it comes up\n\n\
      A value that starts with \"-\" is given with \"=\" (--kernel-args=-s). A target named like a\n\
      subcommand follows \"--\": deploy --rootfs ./rootfs -- list\n\n\
      Exit status: 0 success, 1 error, 2 usage error, 3 check found problems, 4 boot-test guest\n\
      did not reach the expected text."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub deploy: DeployArgs,
    /// Print the tool's version (--version is the label of a deploy).
    #[arg(short = 'V', action = ArgAction::Version)]
    pub tool_version: (),
    /// Print debug output (commands run, decisions taken).
    #[arg(long, short = 'v', global = true)]
    pub verbose: bool,
    /// Print only errors and the final result.
    #[arg(long, short = 'q', global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// Options of a deploy (the command without a subcommand).
#[derive(Debug, Args, Default, Clone)]
pub struct DeployArgs {
    /// Label of the version to write: [A-Za-z0-9][A-Za-z0-9._-]{0,63}, not "default".
    /// Defaults to "factory" on a new target; required when adding a version.
    #[arg(long = "version", value_name = "LABEL")]
    pub label: Option<String>,
    /// Root filesystem to deploy: a directory, or a tar archive (.tar, .tar.gz,
    /// .tgz, .tar.zst, .tar.xz) streamed straight onto the disk, or a signed
    /// bundle (`deploy bundle create`; `-` reads one from standard input, an
    /// http:// or https:// URL streams it from a web server), or an SD-card
    /// image (Raspberry Pi OS's .img: its root partition, read-only, and its
    /// FAT boot partition as /boot/firmware).
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub rootfs: Option<PathBuf>,
    /// Size of a new image: bytes or with a suffix (512M, 4G, 4GiB). Default:
    /// room for the rootfs, one upgrade and metadata.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Deployment config file (TOML). Default: ./deploy.toml when present.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Setting for extensions (repeatable); overrides the config file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Kernel arguments after root=..., replacing the default
    /// "console=tty0 console=ttyS0,115200".
    #[arg(long, value_name = "ARGS")]
    pub kernel_args: Option<String>,
    /// How the new version's root is mounted: rw (default), ro (read-only
    /// `/`, writable `/etc` that survives reboots) or volatile (read-only
    /// `/` under a tmpfs overlay: all writes outside /state vanish at the
    /// next boot). Chosen per version; see README "Read-only root".
    #[arg(long, value_name = "MODE")]
    pub root_mode: Option<crate::store::rootmode::RootMode>,
    /// Kernel image to boot (host path), instead of the one found in the rootfs.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (host path), instead of the one found in the rootfs.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Device tree blob: a host path, or a path relative to the rootfs's
    /// usr/lib/linux-image-<ver>/ (broadcom/bcm2711-rpi-4-b.dtb).
    #[arg(long, value_name = "PATH")]
    pub dtb: Option<PathBuf>,
    /// Deploy without kernel and bootloader (e.g. a rootfs without a kernel).
    #[arg(long)]
    pub no_bootloader: bool,
    /// How a new disk boots: hybrid (GPT with an EFI system partition:
    /// UEFI and BIOS), uefi (the same without BIOS boot code), bios
    /// (whole-disk Btrfs, SYSLINUX), uboot (GPT: a FAT boot partition with
    /// extlinux/extlinux.conf for U-Boot, and the Btrfs partition). Default:
    /// uboot for an arm64 rootfs, else hybrid. Existing disks keep theirs.
    #[arg(long, value_enum, value_name = "KIND")]
    pub boot: Option<BootArg>,
    /// Architecture of the rootfs (amd64, arm64, armhf, i386, riscv64),
    /// instead of the one read from its /sbin/init or /bin/sh ELF header.
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// Format a block device even when it already holds a filesystem or a
    /// partition table.
    #[arg(long)]
    pub wipe: bool,
    /// Add the version without making it the default.
    #[arg(long)]
    pub no_default: bool,
    /// Add the version and boot it once, on trial: the default stays, the
    /// next boot (only it) starts the new version, whose kernel arguments get
    /// panic=10 (unless set). On the device, `deploy health` makes it the
    /// default when /etc/btrfs-deploy/health.d passes (`deploy mark-good`);
    /// a panic, a hang, a failed check or a timeout brings back the old
    /// default by itself. See `deploy status`.
    #[arg(long)]
    pub trial: bool,
    /// After switching, remove the oldest versions beyond N (never the default,
    /// the previous default, the version just added nor one on trial).
    #[arg(long, value_name = "N")]
    pub keep: Option<usize>,
    /// Compare file contents instead of size and mtime when syncing an upgrade.
    #[arg(long)]
    pub checksum: bool,
    /// Configure extension to run (repeatable, in order); see `deploy extensions`.
    #[arg(long = "extension", short = 'e', value_name = "NAME")]
    pub extensions: Vec<String>,
    /// Additional folder with extensions (repeatable).
    #[arg(long, value_name = "DIR")]
    pub extensions_dir: Vec<PathBuf>,
    /// Print a JSON summary of the deploy on stdout (docs/json.md).
    #[arg(long)]
    pub json: bool,
    /// Public key (minisign format) a bundle given as --rootfs must be
    /// signed with (or `verify_key` in the config file). Repeat it to trust
    /// several keys, e.g. the old and the new one during a key rotation.
    #[arg(long, value_name = "KEY.pub")]
    pub verify_key: Vec<PathBuf>,
    /// Key id (as `deploy keygen` and `bundle info` print it) whose
    /// signatures are refused even if a --verify-key has it; adds to
    /// `revoked_keys` in the config file. Repeatable.
    #[arg(long, value_name = "KEYID")]
    pub revoked_key: Vec<String>,
    /// Set by `deploy update`: the SHA-256 the signed index names for the
    /// bundle's manifest.
    #[arg(skip)]
    pub expect_manifest_sha256: Option<String>,
    /// Apply a bundle without verifying its signature (prints a warning).
    #[arg(long)]
    pub insecure_no_verify: bool,
    /// Apply a bundle whose build number is not newer than the newest on the disk.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// With an http(s):// --rootfs: longest wait, in seconds, for a
    /// connection or for the next bytes before the request counts as failed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_timeout: u64,
    /// With an http(s):// --rootfs: how many times in a row a failed or
    /// dropped request is retried (resuming with a range request) before
    /// giving up.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub http_retries: u32,
    /// Disk image file or block device to deploy to.
    #[arg(value_name = "TARGET")]
    pub target: Option<PathBuf>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the versions on a disk.
    List {
        /// Disk image or block device.
        target: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also show each version's size and the bytes only it uses (walks
        /// every file: slower on big systems).
        #[arg(long)]
        sizes: bool,
    },
    /// Show what a disk boots and which version is running. Without TARGET
    /// (or with `/`), on a booted system of this layout: the disk it runs from.
    Status {
        /// Disk image or block device (default: the running system's disk).
        target: Option<PathBuf>,
        /// Machine-readable output (docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Make LABEL the default version (this is how you roll back).
    SetDefault {
        /// Version to boot by default.
        label: String,
        /// Disk image or block device.
        target: PathBuf,
    },
    /// Remove a version (never the default).
    Remove {
        /// Version to remove.
        label: String,
        /// Disk image or block device.
        target: PathBuf,
    },
    /// On the device: make the running version the default (ends its
    /// trial as good). `deploy health` runs it when the checks pass.
    MarkGood {
        /// The running system's disk (default: found from `/`).
        target: Option<PathBuf>,
    },
    /// On the device, early at every boot (the on-device extension's
    /// btrfs-deploy-trial-watch.service): records how the last trial ended
    /// when this boot is not it; on a trial boot, records that it came up and
    /// waits: if the trial has not passed its health checks TIMEOUT seconds
    /// after boot, records a timeout and reboots onto the old default.
    TrialWatch {
        /// Seconds after boot (default: `trial_timeout` in
        /// /etc/btrfs-deploy/deploy.toml, else 300).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// On the device, once the system is up (btrfs-deploy-health.service):
    /// on a trial boot, runs the executables in /etc/btrfs-deploy/health.d
    /// in name order; all pass: mark-good; one fails (or the timeout
    /// passes): records it and reboots onto the old default. Does nothing
    /// on other boots.
    Health {
        /// Seconds after boot (default: `trial_timeout` in
        /// /etc/btrfs-deploy/deploy.toml, else 300).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Record the outcome but do not reboot after a failure (for
        /// testing health checks by hand).
        #[arg(long)]
        no_reboot: bool,
    },
    /// Boot a disk in QEMU and check that the expected text appears on its
    /// serial console.
    BootTest(BootTestArgs),
    /// Verify a disk's layout invariants and report every problem (exit 3 on any).
    Check {
        /// Disk image or block device.
        target: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove leftovers of an interrupted deploy (TARGET.partial, partial versions).
    Cleanup {
        /// Disk image or block device.
        target: PathBuf,
    },
    /// Run a command chrooted in a root tree, with /proc, /sys, /dev mounted,
    /// a working resolv.conf and service starts prevented (for extensions).
    RunInTree {
        /// Root of the tree.
        tree: PathBuf,
        /// Command and arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// (Internal, for the shipped extensions' checks.) Validates one IP
    /// address, or address/prefix with --prefix, with a strict parser (no
    /// leading zeros, no malformed `::`); exit 1 saying what is wrong.
    #[command(hide = true)]
    CheckIp {
        /// Require a /prefix length after the address.
        #[arg(long)]
        prefix: bool,
        /// The address.
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// Write a new Ed25519 signing key pair in minisign's format: NAME.key
    /// (secret, mode 0600, unencrypted) and NAME.pub. Never overwrites.
    Keygen {
        /// Path and name of the key files, without extension.
        #[arg(long, value_name = "NAME")]
        output: PathBuf,
    },
    /// Make or inspect signed update bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Fetch the vendor's signed update index (update_url in deploy.toml, or
    /// --index) and apply the newest bundle this disk can: a delta against a
    /// version it has, else a full one. Nothing to do is not an error.
    #[command(after_help = "Examples:\n  \
      deploy update --trial                 on a device: try the newest version once\n  \
      deploy update --index https://updates.example.com/amd64/index.json --verify-key vendor.pub disk.img\n\n\
      In deploy.toml: update_url = \"https://updates.example.com/{arch}/index.json\"\n\
      ({arch}: this machine's architecture, e.g. amd64, arm64; {version}: the disk's default version).")]
    Update(UpdateArgs),
    /// List the available configure extensions.
    Extensions {
        /// Additional folder with extensions (repeatable).
        #[arg(long, value_name = "DIR")]
        extensions_dir: Vec<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the tool's version (--json: with the build details).
    Version {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write the man pages of deploy and every subcommand into DIR (used by
    /// `make install`).
    #[command(hide = true)]
    GenerateMan {
        /// Output folder (created if missing).
        dir: PathBuf,
    },
    /// Write bash, zsh and fish completions into DIR (used by `make install`).
    #[command(hide = true)]
    GenerateCompletions {
        /// Output folder (created if missing).
        dir: PathBuf,
    },
}

/// How a new disk boots (`--boot`, `boot = "..."` in the config file).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootArg {
    /// Whole-disk Btrfs with SYSLINUX: legacy BIOS.
    Bios,
    /// GPT: EFI system partition with systemd-boot, and the Btrfs partition.
    Uefi,
    /// Like uefi, plus SYSLINUX's GPT boot code: boots under UEFI and BIOS.
    Hybrid,
    /// GPT: a FAT boot partition (extlinux/extlinux.conf, kernels) that
    /// U-Boot reads, and the Btrfs partition: ARM boards.
    Uboot,
    /// Raspberry Pi 3/4 (arm64): a uboot disk whose boot partition also
    /// holds the Pi firmware, device trees, U-Boot and config.txt from the
    /// tree (raspi-firmware, u-boot-rpi), with a hybrid MBR for the Pi 3.
    Rpi,
}

/// Firmware of a boot test (`--firmware`).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum FirmwareArg {
    /// SeaBIOS, QEMU's default.
    Bios,
    /// OVMF (Debian package ovmf).
    Uefi,
    /// U-Boot on qemu-system-aarch64 -M virt (Debian packages u-boot-qemu,
    /// qemu-system-arm); the default for uboot disks.
    Uboot,
}

/// QEMU acceleration.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum AccelArg {
    /// KVM when it works, TCG otherwise.
    Auto,
    /// Hardware virtualisation only.
    Kvm,
    /// Software emulation only.
    Tcg,
}

/// Options of `boot-test`.
#[derive(Debug, Args)]
pub struct BootTestArgs {
    /// Disk image to boot.
    pub target: PathBuf,
    /// Boot this version's menu entry instead of the default (the default on
    /// disk is not changed: under UEFI a temporary overlay of the disk makes
    /// it the default, which needs qemu-utils; under BIOS it is typed at the
    /// SYSLINUX prompt).
    #[arg(long = "version", value_name = "LABEL")]
    pub label: Option<String>,
    /// Regular expression that marks a successful boot on the serial console
    /// (one that matches the empty string, such as 'login:|', is refused).
    #[arg(long, value_name = "REGEX", default_value = "login:|TINY: boot done")]
    pub expect: String,
    /// Seconds to wait for the expected text.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// Acceleration.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Let the guest write to the image (by default writes are discarded).
    #[arg(long)]
    pub persist: bool,
    /// Guest memory in MiB (at least 64).
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub memory: u32,
    /// Write the serial console to this file.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Firmware to boot with. Default: uefi for uefi and hybrid disks, bios
    /// for bios disks, uboot for uboot disks (arm64 systems).
    #[arg(long, value_enum)]
    pub firmware: Option<FirmwareArg>,
    /// Regular expression that fails the test as soon as it appears
    /// (repeatable; kernel panics and bootloader errors always fail it).
    #[arg(long, value_name = "REGEX")]
    pub fail_on: Vec<String>,
    /// Let the guest reboot up to N times in this one run (a trial, a
    /// fallback); the expected text must then appear in boot N+1, and only
    /// --fail-on patterns count before it. The log (--log) marks each boot.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub reboots: u32,
    /// Add a watchdog device (QEMU's i6300esb) that resets a guest that
    /// stops feeding it (with --reboots, the reset is one of the reboots).
    #[arg(long)]
    pub watchdog: bool,
    /// Give the guest a network (QEMU's user-mode NAT, a virtio-net card;
    /// the host is 10.0.2.2 from inside) and forward a TCP port of the
    /// host to it: `[ADDR:]HOSTPORT:GUESTPORT`, ADDR 127.0.0.1 unless
    /// given (repeatable). E.g. `--forward 2222:22`, then `ssh -p 2222
    /// root@127.0.0.1` reaches the guest's SSH server.
    #[arg(long, value_name = "[ADDR:]HOST:GUEST", value_parser = parse_forward)]
    pub forward: Vec<crate::boottest::Forward>,
}

fn parse_forward(s: &str) -> Result<crate::boottest::Forward, String> {
    crate::boottest::Forward::parse(s)
}

/// Options of `deploy update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Disk image or block device; default: the disk the running system
    /// booted from.
    pub target: Option<PathBuf>,
    /// The index (URL or file) instead of `update_url` from the config.
    #[arg(long, value_name = "URL")]
    pub index: Option<String>,
    /// Apply it on trial (as `deploy --trial`): boot it once, keep it if
    /// its health checks pass.
    #[arg(long)]
    pub trial: bool,
    /// Deployment config file (default: the device's
    /// /etc/btrfs-deploy/deploy.toml on a device, else ./deploy.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Public key the index and bundles must be signed with (repeatable;
    /// or verify_key in the config).
    #[arg(long, value_name = "KEY.pub")]
    pub verify_key: Vec<PathBuf>,
    /// Key id to refuse (adds to revoked_keys in the config).
    #[arg(long, value_name = "KEYID")]
    pub revoked_key: Vec<String>,
    /// Seconds to wait for a connection or the next bytes.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_timeout: u64,
    /// Failed requests in a row to retry.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub http_retries: u32,
    /// Print a JSON summary of the deploy (when one happens).
    #[arg(long)]
    pub json: bool,
}

/// `bundle create --compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// zstd, level 3.
    Zstd,
    /// The send stream as it is.
    None,
}

/// `--expires-in`: a duration, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry(pub Option<std::time::Duration>);

fn parse_expiry(s: &str) -> Result<Expiry, String> {
    if s == "never" {
        return Ok(Expiry(None));
    }
    match humantime::parse_duration(s) {
        Ok(d) if d.as_secs() > 0 => Ok(Expiry(Some(d))),
        Ok(_) => Err("the duration must be at least one second".into()),
        Err(e) => Err(format!("{e}: give e.g. 90d, 12h, 2w, or never")),
    }
}

/// `deploy bundle ...`.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Write a signed bundle of version LABEL of SOURCE: a delta against
    /// --base, or a full one.
    #[command(after_help = "Example:\n  \
      deploy bundle create build.img --version v2 --base factory --sign-key vendor.key --output v2.bundle\n  \
      deploy --rootfs v2.bundle --verify-key vendor.pub device.img")]
    Create(BundleCreateArgs),
    /// Write DIR/index.json and its signature DIR/index.json.minisig: the
    /// signed list of the bundles in DIR that `deploy update` reads. Run it
    /// after every `bundle create` into DIR, then publish DIR as it is.
    #[command(after_help = "Example:\n  \
      deploy bundle create build.img --version v3 --base v2 --sign-key vendor.key --output site/amd64/v3.bundle\n  \
      deploy bundle index site/amd64 --sign-key vendor.key\n  \
      rsync -a site/ web:/var/www/updates/     # any web server; devices: update_url = \"https://…/{arch}/index.json\"")]
    Index {
        /// Folder of *.bundle files.
        dir: PathBuf,
        /// Secret key to sign the index with.
        #[arg(long, value_name = "NAME.key")]
        sign_key: PathBuf,
        /// How long devices accept the index: a duration (7d, 12h) or
        /// `never`. Renew it (run again) within that time.
        #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_expiry)]
        expires_in: Expiry,
    },
    /// Show a bundle's manifest and whether its signature verifies.
    Info {
        /// Bundle file.
        file: PathBuf,
        /// Public key to verify the signature with.
        #[arg(long, value_name = "KEY.pub")]
        verify_key: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `bundle create`.
#[derive(Debug, Args)]
pub struct BundleCreateArgs {
    /// Disk image or block device holding the version (opened read-only).
    pub source: PathBuf,
    /// Version to put in the bundle.
    #[arg(long = "version", value_name = "LABEL")]
    pub label: String,
    /// Version the devices have: the bundle holds only the difference.
    #[arg(long, value_name = "LABEL")]
    pub base: Option<String>,
    /// Secret key (minisign format, unencrypted) to sign with.
    #[arg(long, value_name = "NAME.key")]
    pub sign_key: PathBuf,
    /// Bundle file to write (must not exist).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Build number; devices refuse a bundle whose build is not newer than
    /// the newest they have. Default: the creation time in seconds since 1970.
    #[arg(long, value_name = "N")]
    pub build: Option<u64>,
    /// How long devices accept the bundle: a duration (90d, 12h, 2w) or
    /// `never`. Past it a device refuses the bundle as stale, so an old
    /// bundle cannot be replayed at it (docs/bundles.md).
    #[arg(long, value_name = "DURATION", default_value = "90d", value_parser = parse_expiry)]
    pub expires_in: Expiry,
    /// Compress the send stream: zstd (smaller payloads; devices need a
    /// deploy that reads it, any since bundles had compression) or none.
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    pub compress: Compression,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("deploy").chain(args.iter().copied()))
    }

    #[test]
    fn an_option_is_never_taken_as_a_value() {
        for (args, name) in [
            (&["--version", "--rootfs", "r", "x.img"][..], "--version"),
            (&["--size", "--rootfs", "r", "x.img"], "--size"),
            (&["--kernel-args", "--wipe", "x.img"], "--kernel-args"),
            (
                &["--rootfs", "r", "--version", "-e", "x", "x.img"],
                "--version",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidValue, "{args:?}: {e}");
            assert_eq!(e.exit_code(), 2);
            let text = e.to_string();
            assert!(
                text.contains("a value is required") && text.contains(name),
                "{args:?}: {text}"
            );
        }
        // A value that starts with "-" is given with "=".
        let cli = parse(&["--kernel-args=-s quiet", "--size=-1G", "x.img"]).unwrap();
        assert_eq!(cli.deploy.kernel_args.as_deref(), Some("-s quiet"));
        assert_eq!(cli.deploy.size.as_deref(), Some("-1G"));
    }

    #[test]
    fn a_target_named_like_a_subcommand_follows_double_dash() {
        let cli = parse(&["--", "list"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.deploy.target, Some(PathBuf::from("list")));
        let cli = parse(&["list", "d.img"]).unwrap();
        assert!(matches!(cli.command, Some(Command::List { .. })));
    }

    #[test]
    fn dash_v_is_the_tool_version_and_long_version_the_label() {
        let e = parse(&["-V"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayVersion);
        assert_eq!(
            e.to_string(),
            format!("deploy {}\n", env!("CARGO_PKG_VERSION"))
        );
        let cli = parse(&["--version", "v2", "d.img"]).unwrap();
        assert_eq!(cli.deploy.label.as_deref(), Some("v2"));
        let cli = parse(&["version", "--json"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Version { json: true })));
    }

    #[test]
    fn json_flags() {
        assert!(
            parse(&["--json", "--rootfs", "r", "d.img"])
                .unwrap()
                .deploy
                .json
        );
        for sub in ["list", "check"] {
            let cli = parse(&[sub, "d.img", "--json"]).unwrap();
            assert!(
                matches!(
                    cli.command,
                    Some(Command::List { json: true, .. } | Command::Check { json: true, .. })
                ),
                "{sub}"
            );
        }
        let cli = parse(&["extensions", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Extensions { json: true, .. })
        ));
    }
}
