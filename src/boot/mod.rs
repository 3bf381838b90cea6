//! Making a disk bootable (design §10): one [`Backend`] per firmware path,
//! behind one trait, so the deploy flow and the version commands call the
//! same few methods whatever the disk is:
//!
//! - `bios`: SYSLINUX on a whole-disk Btrfs ([`extlinux`]).
//! - `hybrid`: GPT with an EFI system partition and the Btrfs partition;
//!   SYSLINUX (GPT boot code + legacy-BIOS-bootable attribute) for BIOS, and
//!   systemd-boot on the ESP for UEFI ([`uefi`]).
//! - `uefi`: the same disk without the BIOS boot code.
//! - `uboot`: GPT with a FAT boot partition that U-Boot reads
//!   (`extlinux/extlinux.conf`, the kernels) and the Btrfs partition
//!   ([`uboot`]).
//!
//! The order of a change is fixed by the callers (see `store::versions`):
//! write the menus (new files first, nothing that boots changes), install
//! missing loaders, switch `systems/default` (the switch of the BIOS path
//! and of `deploy list`), then [`Boot::switch_default`] (the UEFI path).

pub(crate) mod extlinux;
pub(crate) mod fat;
pub(crate) mod fat_disk;
pub(crate) mod rpi;
pub(crate) mod uboot;
pub(crate) mod uefi;

pub(crate) use extlinux::Entry;

use crate::store::layout::Layout;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

/// How a disk boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootKind {
    /// Whole-disk Btrfs, SYSLINUX, legacy BIOS only.
    Bios,
    /// GPT, EFI system partition with systemd-boot, Btrfs partition: UEFI only.
    Uefi,
    /// Like `uefi`, plus SYSLINUX's GPT boot code: boots under BIOS and UEFI.
    Hybrid,
    /// GPT, a FAT boot partition with `extlinux/extlinux.conf` and the
    /// kernels for U-Boot, Btrfs partition: ARM boards ([`uboot`]).
    Uboot,
}

impl BootKind {
    /// `bios`, `uefi` or `hybrid`.
    pub fn name(self) -> &'static str {
        match self {
            BootKind::Bios => "bios",
            BootKind::Uefi => "uefi",
            BootKind::Hybrid => "hybrid",
            BootKind::Uboot => "uboot",
        }
    }
    /// Whether the disk has a partition table with a FAT boot partition
    /// (an EFI system partition, or U-Boot's boot partition).
    pub fn partitioned(self) -> bool {
        self != BootKind::Bios
    }
    /// Whether legacy BIOS can boot it.
    pub fn bios(self) -> bool {
        matches!(self, BootKind::Bios | BootKind::Hybrid)
    }
    /// Whether UEFI can boot it.
    pub fn uefi(self) -> bool {
        matches!(self, BootKind::Uefi | BootKind::Hybrid)
    }
    /// Whether U-Boot boots it (from its FAT boot partition).
    pub fn uboot(self) -> bool {
        self == BootKind::Uboot
    }
    /// A one-line description for `list` and `check`.
    pub fn describe(self) -> &'static str {
        match self {
            BootKind::Bios => "bios (whole-disk Btrfs, SYSLINUX)",
            BootKind::Uefi => "uefi (GPT: EFI system partition with systemd-boot + Btrfs)",
            BootKind::Hybrid => {
                "hybrid (GPT: EFI system partition with systemd-boot + Btrfs with SYSLINUX)"
            }
            BootKind::Uboot => {
                "uboot (GPT: FAT boot partition with extlinux.conf for U-Boot + Btrfs)"
            }
        }
    }
}

impl std::fmt::Display for BootKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One way a firmware finds and starts a version's kernel.
pub(crate) trait Backend {
    /// Checks, before anything is written, that a version whose boot files
    /// have these sizes fits where this backend keeps them.
    fn check_space(&self, _label: &str, _file_sizes: &[u64]) -> Result<()> {
        Ok(())
    }
    /// Like [`Backend::check_space`], given the files themselves (kernel
    /// first, then the initramfs): a backend that shares identical files
    /// between versions counts only those it does not hold yet.
    fn check_space_for(&self, label: &str, files: &[std::path::PathBuf]) -> Result<()> {
        let mut sizes = Vec::new();
        for f in files {
            sizes.push(std::fs::metadata(f)?.len());
        }
        self.check_space(label, &sizes)
    }
    /// Writes the menu: one entry per version in `entries`, `default` marked
    /// as the default where the menu itself names it. Adds what new
    /// versions need; never changes what boots by default.
    fn write_menu(
        &self,
        top: &Layout,
        fs_uuid: &str,
        entries: &[Entry],
        default: &str,
        trial: Option<&Entry>,
    ) -> Result<()>;
    /// Installs the boot loader where it is missing.
    fn install(&self, top: &Layout) -> Result<()>;
    /// Makes `label` the default (after `systems/default` was switched).
    fn switch_default(&self, _label: &str) -> Result<()> {
        Ok(())
    }
    /// Removes what this backend keeps for version `label` (already out of the menu).
    fn remove_version(&self, _label: &str) -> Result<()> {
        Ok(())
    }
    /// Whether this firmware path can boot a version once (`--trial`).
    fn can_trial(&self) -> bool {
        false
    }
    /// Arms the one-shot boot of the menu's trial entry (written by
    /// [`Backend::write_menu`] and committed): the next boot, and only the
    /// next, starts it; the loader clears the record before the kernel runs.
    /// `trial` is the trial entry (its arguments already those of a trial),
    /// `fallback` the default's entry.
    fn arm_trial(
        &self,
        _top: &Layout,
        _fs_uuid: &str,
        _trial: &Entry,
        _fallback: &Entry,
    ) -> Result<()> {
        Ok(())
    }
    /// Whether a one-shot boot armed by [`Backend::arm_trial`] is still
    /// waiting for a boot.
    fn trial_armed(&self, _top: &Layout) -> Result<bool> {
        Ok(false)
    }
    /// Withdraws an armed one-shot boot (nothing when none is armed).
    fn disarm_trial(&self, _top: &Layout) -> Result<()> {
        Ok(())
    }
    /// Removes what belongs to no version in `labels` (interrupted writes,
    /// versions removed half-way) and repairs what an interruption left;
    /// returns what it did, one line each.
    fn cleanup(&self, _labels: &[String]) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// The backends of one disk.
pub(crate) struct Boot {
    backends: Vec<Box<dyn Backend>>,
    kind: BootKind,
}

impl Boot {
    /// The backends of a disk of `kind` at `disk`, whose Btrfs is the byte
    /// range `btrfs` (`None`: the whole disk) and whose FAT boot partition
    /// (EFI system partition, or U-Boot's) is the byte range `esp`.
    pub fn new(
        kind: BootKind,
        disk: &Path,
        btrfs: Option<(u64, u64)>,
        esp: Option<(u64, u64)>,
    ) -> Boot {
        let mut backends: Vec<Box<dyn Backend>> = vec![Box::new(extlinux::Extlinux {
            install_boot_code: kind.bios(),
            adv: kind
                .bios()
                .then(|| (disk.to_path_buf(), btrfs.map_or(0, |(start, _)| start))),
        })];
        if let (true, Some(esp)) = (kind.uefi(), esp) {
            backends.push(Box::new(uefi::SystemdBoot::new(disk, esp)));
        }
        if let (true, Some(part)) = (kind.uboot(), esp) {
            backends.push(Box::new(uboot::UBoot::new(disk, part)));
        }
        Boot { backends, kind }
    }

    /// See [`Backend::check_space_for`].
    pub fn check_space_for(&self, label: &str, files: &[std::path::PathBuf]) -> Result<()> {
        self.backends
            .iter()
            .try_for_each(|b| b.check_space_for(label, files))
    }
    /// See [`Backend::write_menu`].
    pub fn write_menu(
        &self,
        top: &Layout,
        fs_uuid: &str,
        entries: &[Entry],
        default: &str,
        trial: Option<&Entry>,
    ) -> Result<()> {
        self.backends
            .iter()
            .try_for_each(|b| b.write_menu(top, fs_uuid, entries, default, trial))
    }
    /// Refuses when no firmware path of this disk can boot a version once.
    pub fn check_trial(&self) -> Result<()> {
        if self.backends.iter().any(|b| b.can_trial()) {
            return Ok(());
        }
        anyhow::bail!(
            "--trial needs a boot loader that can boot a version once, and this {} disk \
             has none: add the version with --no-default and make it the default with \
             set-default",
            self.kind
        )
    }
    /// See [`Backend::arm_trial`] (every backend that can).
    pub fn arm_trial(
        &self,
        top: &Layout,
        fs_uuid: &str,
        trial: &Entry,
        fallback: &Entry,
    ) -> Result<()> {
        self.check_trial()?;
        self.backends
            .iter()
            .filter(|b| b.can_trial())
            .try_for_each(|b| b.arm_trial(top, fs_uuid, trial, fallback))
    }
    /// Whether any backend still waits to boot the trial entry.
    pub fn trial_armed(&self, top: &Layout) -> Result<bool> {
        for b in &self.backends {
            if b.can_trial() && b.trial_armed(top)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
    /// Whether a firmware path already used its one-shot boot of an armed
    /// trial (on a hybrid disk the other path stays armed until the boot
    /// that ran disarms it).
    pub fn trial_used(&self, top: &Layout) -> Result<bool> {
        for b in &self.backends {
            if b.can_trial() && !b.trial_armed(top)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
    /// See [`Backend::disarm_trial`] (every backend).
    pub fn disarm_trial(&self, top: &Layout) -> Result<()> {
        self.backends
            .iter()
            .filter(|b| b.can_trial())
            .try_for_each(|b| b.disarm_trial(top))
    }
    /// See [`Backend::install`].
    pub fn install(&self, top: &Layout) -> Result<()> {
        self.backends.iter().try_for_each(|b| b.install(top))
    }
    /// See [`Backend::switch_default`].
    pub fn switch_default(&self, label: &str) -> Result<()> {
        self.backends
            .iter()
            .try_for_each(|b| b.switch_default(label))
    }
    /// See [`Backend::remove_version`].
    pub fn remove_version(&self, label: &str) -> Result<()> {
        self.backends
            .iter()
            .try_for_each(|b| b.remove_version(label))
    }
    /// See [`Backend::cleanup`].
    pub fn cleanup(&self, labels: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for b in &self.backends {
            out.extend(b.cleanup(labels)?);
        }
        Ok(out)
    }
}
