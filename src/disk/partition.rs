//! GPT partition tables of deploy targets: written with `sfdisk` (util-linux)
//! when a new disk is made, read (and a partition's type changed) in-process. Generic over what the partitions are
//! for (an EFI system partition today, a U-Boot boot partition later):
//! callers describe partitions with [`PartSpec`] and get byte ranges back.
//!
//! This tool never needs the kernel to know about the partitions (some
//! kernels cannot parse GPT): a partition is reached through a loop device
//! with an offset and size limit, or as a byte range of the disk.

use crate::util::cmd;
use anyhow::{anyhow, bail, Context, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes per logical sector of the images this tool writes.
pub const SECTOR: u64 = 512;
/// Partitions start on 1 MiB boundaries.
pub const ALIGN: u64 = 1 << 20;
/// Room a GPT disk needs besides its partitions: the 1 MiB before the first
/// partition (protective MBR, primary GPT) and 1 MiB at the end (backup GPT).
pub const GPT_OVERHEAD: u64 = 2 * ALIGN;
/// GPT partition type of an EFI system partition.
pub const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// GPT partition type "Microsoft basic data": a plain FAT partition (U-Boot's boot partition).
pub const TYPE_BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
/// GPT partition type "Linux filesystem data".
pub const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// sfdisk's name of GPT attribute bit 2, which SYSLINUX's `gptmbr.bin` looks for.
pub const ATTR_LEGACY_BOOT: &str = "LegacyBIOSBootable";
/// `sfdisk` and the package that provides it.
pub const SFDISK: cmd::Tool = cmd::Tool {
    program: "sfdisk",
    package: "fdisk",
};

/// One partition to create.
#[derive(Debug, Clone)]
pub struct PartSpec {
    /// Size in bytes (a multiple of [`ALIGN`]); `None` takes the rest of the disk.
    pub size: Option<u64>,
    /// GPT type GUID.
    pub type_guid: &'static str,
    /// Partition name.
    pub name: &'static str,
    /// Whether to set the legacy-BIOS-bootable attribute.
    pub legacy_boot: bool,
}

/// One partition found on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number.
    pub number: usize,
    /// Offset in bytes from the start of the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// GPT type GUID (upper case).
    pub type_guid: String,
    /// Whether the legacy-BIOS-bootable attribute is set.
    pub legacy_boot: bool,
}

/// True when `disk` carries a GPT header (`EFI PART` at LBA 1).
pub fn has_gpt(disk: &Path) -> bool {
    let mut sig = [0u8; 8];
    std::fs::File::open(disk)
        .and_then(|f| f.read_exact_at(&mut sig, SECTOR))
        .map(|()| &sig == b"EFI PART")
        .unwrap_or(false)
}

/// Writes a new GPT with `parts`, in order, the first one starting at 1 MiB.
pub fn write_gpt(disk: &Path, parts: &[PartSpec]) -> Result<()> {
    cmd::require(&[&SFDISK])?;
    let script = script(parts)?;
    let d = disk.to_string_lossy();
    cmd::run_with_input(
        SFDISK.program,
        &[
            "--quiet",
            "--no-reread",
            "--no-tell-kernel",
            "--wipe",
            "always",
            &d,
        ],
        script.as_bytes(),
    )
    .with_context(|| format!("writing a GPT partition table to {}", disk.display()))?;
    Ok(())
}

/// The `sfdisk` script for `parts`.
fn script(parts: &[PartSpec]) -> Result<String> {
    let mut s = String::from("label: gpt\nunit: sectors\n");
    let mut start = ALIGN / SECTOR;
    for (i, p) in parts.iter().enumerate() {
        let mut line = format!("start={start}, type={}, name=\"{}\"", p.type_guid, p.name);
        match p.size {
            Some(size) => {
                if size % ALIGN != 0 {
                    bail!("partition {} size {size} is not a multiple of 1 MiB", i + 1);
                }
                line.push_str(&format!(", size={}", size / SECTOR));
                start += size / SECTOR;
            }
            None if i + 1 != parts.len() => bail!("only the last partition may take the rest"),
            None => {}
        }
        if p.legacy_boot {
            line.push_str(&format!(", attrs=\"{ATTR_LEGACY_BOOT}\""));
        }
        s.push_str(&line);
        s.push('\n');
    }
    Ok(s)
}

/// The partitions of the GPT on `disk`, read in-process (the `gpt` crate
/// checks both headers' CRCs and falls back to the backup header when the
/// primary one is damaged): upgrades, `check` and `status` need no `fdisk`.
pub fn read_gpt(disk: &Path) -> Result<Vec<Partition>> {
    let gpt = gpt::GptConfig::new()
        .writable(false)
        .open(disk)
        .map_err(|e| {
            anyhow!(
                "reading the partition table of {}: {e} (not a valid GPT)",
                disk.display()
            )
        })?;
    let sector: u64 = (*gpt.logical_block_size()).into();
    Ok(gpt
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(&number, p)| Partition {
            number: number as usize,
            start: p.first_lba * sector,
            size: (p.last_lba + 1 - p.first_lba) * sector,
            type_guid: p.part_type_guid.guid.to_string().to_ascii_uppercase(),
            legacy_boot: p.flags & LEGACY_BOOT_BIT != 0,
        })
        .collect())
}

/// GPT attribute bit 2: legacy BIOS bootable.
const LEGACY_BOOT_BIT: u64 = 1 << 2;

/// Sets the type GUID of partition `number` of the GPT on `disk` (both
/// copies of the table, their CRCs recomputed); the protective MBR and its
/// boot code are left alone.
pub fn set_type(disk: &Path, number: usize, type_guid: &str) -> Result<()> {
    let what = || {
        format!(
            "setting the type of partition {number} of {}",
            disk.display()
        )
    };
    let guid: uuid::Uuid = type_guid
        .parse()
        .with_context(|| format!("{}: invalid GUID {type_guid}", what()))?;
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .open(disk)
        .map_err(|e| anyhow!("{}: {e}", what()))?;
    let mut parts = gpt.take_partitions();
    let Some(p) = parts.get_mut(&(number as u32)).filter(|p| p.is_used()) else {
        bail!("{}: no such partition", what());
    };
    p.part_type_guid = gpt::partition_types::Type {
        guid,
        os: gpt::partition_types::OperatingSystem::Linux,
    };
    gpt.update_partitions(parts)
        .map_err(|e| anyhow!("{}: {e}", what()))?;
    gpt.write().map_err(|e| anyhow!("{}: {e}", what()))?;
    Ok(())
}

/// Writes `code` (at most 440 bytes: the boot code area of the MBR) to the
/// start of `disk`, leaving the disk signature and partition entries alone.
pub fn write_mbr_boot_code(disk: &Path, code: &[u8]) -> Result<()> {
    if code.len() > 440 {
        bail!("MBR boot code is {} bytes, at most 440 fit", code.len());
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    f.write_all_at(code, 0)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing the MBR boot code of {}", disk.display()))
}

/// Turns the protective MBR of a GPT disk into a hybrid one: entry 1 a
/// FAT32 (LBA, type 0x0C) entry over `fat` (byte offset and size), marked
/// active, for firmware that reads only MBR tables (the Raspberry Pi 3's
/// boot ROM); entry 2 the GPT's own 0xEE entry over the sectors before it,
/// starting at LBA 1, which Linux and U-Boot look for in any entry and
/// then read the GPT. The GPT itself is untouched.
pub fn write_hybrid_mbr(disk: &Path, fat: (u64, u64)) -> Result<()> {
    let (start, size) = (fat.0 / SECTOR, fat.1 / SECTOR);
    if start < 2
        || !fat.0.is_multiple_of(SECTOR)
        || !fat.1.is_multiple_of(SECTOR)
        || start + size > u32::MAX as u64
    {
        bail!(
            "cannot describe the partition at {}+{} bytes in an MBR",
            fat.0,
            fat.1
        );
    }
    let entry = |active: bool, kind: u8, first: u64, count: u64| {
        let mut e = [0u8; 16];
        e[0] = if active { 0x80 } else { 0 };
        // CHS fields: "beyond CHS", as for any disk over 8 GB.
        e[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
        e[4] = kind;
        e[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&(first as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(count as u32).to_le_bytes());
        e
    };
    let mut table = [0u8; 66];
    table[..16].copy_from_slice(&entry(true, 0x0C, start, size));
    table[16..32].copy_from_slice(&entry(false, 0xEE, 1, start - 1));
    table[64] = 0x55;
    table[65] = 0xAA;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    f.write_all_at(&table, 446)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing the hybrid MBR of {}", disk.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_aligns_and_flags() {
        let s = script(&[
            PartSpec {
                size: Some(256 << 20),
                type_guid: TYPE_ESP,
                name: "EFI system",
                legacy_boot: false,
            },
            PartSpec {
                size: None,
                type_guid: TYPE_LINUX,
                name: "btrfs-deploy",
                legacy_boot: true,
            },
        ])
        .unwrap();
        assert!(s.contains(&format!(
            "start=2048, type={TYPE_ESP}, name=\"EFI system\", size=524288\n"
        )));
        assert!(s.contains(&format!(
            "start=526336, type={TYPE_LINUX}, name=\"btrfs-deploy\", attrs=\"LegacyBIOSBootable\"\n"
        )));
        let bad = PartSpec {
            size: Some(1000),
            type_guid: TYPE_ESP,
            name: "x",
            legacy_boot: false,
        };
        assert!(script(&[bad]).is_err());
    }

    #[test]
    fn writes_and_reads_back_a_gpt() {
        if cmd::which(SFDISK.program).is_none() {
            panic!("sfdisk is needed by this test (it writes the table read back): apt-get install fdisk");
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        assert!(!has_gpt(&img));
        write_gpt(
            &img,
            &[
                PartSpec {
                    size: Some(8 << 20),
                    type_guid: TYPE_ESP,
                    name: "EFI system",
                    legacy_boot: false,
                },
                PartSpec {
                    size: None,
                    type_guid: TYPE_LINUX,
                    name: "root",
                    legacy_boot: true,
                },
            ],
        )
        .unwrap();
        assert!(has_gpt(&img));
        write_mbr_boot_code(&img, &[0xEB; 440]).unwrap();
        let parts = read_gpt(&img).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].start, 1 << 20);
        assert_eq!(parts[0].size, 8 << 20);
        assert_eq!(parts[0].type_guid, TYPE_ESP);
        assert!(!parts[0].legacy_boot);
        assert_eq!(parts[1].number, 2);
        assert_eq!(parts[1].start, 9 << 20);
        assert!(parts[1].legacy_boot);
        // The boot code did not break the table.
        assert!(parts[1].start + parts[1].size <= (64 << 20) - (33 * SECTOR));

        // Retyping keeps the other partition, the boot code, and a table
        // sfdisk finds valid.
        let arm64 = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE";
        set_type(&img, 2, arm64).unwrap();
        let after = read_gpt(&img).unwrap();
        assert_eq!(after[1].type_guid, arm64);
        assert_eq!(
            (after[1].start, after[1].size),
            (parts[1].start, parts[1].size)
        );
        assert!(after[1].legacy_boot);
        assert_eq!(after[0], parts[0]);
        let mut code = [0u8; 440];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut code, 0)
            .unwrap();
        assert_eq!(code, [0xEB; 440]);
        let verify = std::process::Command::new(SFDISK.program)
            .args(["--verify", img.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(verify.status.success(), "{verify:?}");
        let dump = cmd::run(SFDISK.program, &["--dump", img.to_str().unwrap()]).unwrap();
        assert!(dump.contains(&format!("type={arm64}")), "{dump}");
        assert!(set_type(&img, 3, arm64).is_err());
        assert!(set_type(&img, 2, "not-a-guid").is_err());

        // A hybrid MBR (--boot rpi): the FAT in entry 1, 0xEE from LBA 1 in
        // entry 2; the GPT reads the same and sfdisk still sees a GPT.
        write_hybrid_mbr(&img, (after[0].start, after[0].size)).unwrap();
        assert_eq!(read_gpt(&img).unwrap(), after);
        let mut mbr = [0u8; 512];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut mbr, 0)
            .unwrap();
        assert_eq!(&mbr[..440], &[0xEB; 440], "boot code kept");
        let lba = |o: usize| u32::from_le_bytes(mbr[o..o + 4].try_into().unwrap()) as u64;
        assert_eq!((mbr[446], mbr[450]), (0x80, 0x0C));
        assert_eq!(lba(454) * SECTOR, after[0].start);
        assert_eq!(lba(458) * SECTOR, after[0].size);
        assert_eq!((mbr[462], mbr[466], lba(470)), (0, 0xEE, 1));
        assert_eq!(lba(474), after[0].start / SECTOR - 1);
        assert_eq!(&mbr[478..510], &[0u8; 32]);
        assert_eq!(&mbr[510..], &[0x55, 0xAA]);
        let dump = cmd::run(SFDISK.program, &["--dump", img.to_str().unwrap()]).unwrap();
        assert!(dump.contains("label: gpt"), "{dump}");
        assert!(write_hybrid_mbr(&img, (0, 1 << 20)).is_err());

        // A damaged primary header: the backup one is read.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0u8; 92], SECTOR).unwrap();
        assert_eq!(read_gpt(&img).unwrap(), after);
        // Both damaged: an error that names the disk.
        f.write_all_at(&[0u8; 92], (64 << 20) - SECTOR).unwrap();
        let e = format!("{:#}", read_gpt(&img).unwrap_err());
        assert!(e.contains(img.to_str().unwrap()), "{e}");
    }
}
