//! The kernel's own block device of a partition (`/dev/vda2`), found from
//! sysfs: a disk that is a block device is read through it, so a device
//! reads its own disk without the loop module (which may be missing or
//! unusable on the device itself).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The partition block device of `disk` covering exactly the byte range
/// `(offset, size)`, when `disk` is a block device whose partition the
/// kernel knows (`/sys/dev/block/<maj:min>/<part>/{start,size}`, in 512-byte
/// sectors whatever the logical block size). `None` for image files, and
/// for ranges no partition of the kernel's matches exactly (a table the
/// kernel has not re-read yet).
pub(crate) fn partition_device(disk: &Path, (offset, size): (u64, u64)) -> Option<PathBuf> {
    let m = std::fs::metadata(disk).ok()?;
    if !m.file_type().is_block_device() {
        return None;
    }
    let (maj, min) = (libc::major(m.rdev()), libc::minor(m.rdev()));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    let read = |p: PathBuf| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    for entry in std::fs::read_dir(&sys).ok()?.flatten() {
        let part = entry.path();
        if !part.join("partition").exists() {
            continue;
        }
        let (Some(start), Some(sectors)) = (read(part.join("start")), read(part.join("size")))
        else {
            continue;
        };
        if start * 512 != offset || sectors * 512 != size {
            continue;
        }
        let dev = Path::new("/dev").join(entry.file_name());
        // The node must be the partition sysfs names (not a stale name).
        let want = std::fs::read_to_string(part.join("dev")).ok()?;
        let node = std::fs::metadata(&dev).ok()?;
        let have = format!("{}:{}", libc::major(node.rdev()), libc::minor(node.rdev()));
        if node.file_type().is_block_device() && want.trim() == have {
            return Some(dev);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(c: &mut Command) -> String {
        let out = c.output().unwrap_or_else(|e| panic!("starting {c:?}: {e}"));
        assert!(
            out.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A GPT image on a loop device whose partitions the kernel knows
    /// (`partx -a`): a real partitioned block device, as a device's disk is.
    struct PartitionedDevice {
        dev: String,
    }

    impl Drop for PartitionedDevice {
        fn drop(&mut self) {
            let _ = Command::new("partx").args(["-d", &self.dev]).status();
            let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        }
    }

    #[test]
    fn a_partition_of_a_block_device_is_read_through_its_own_device() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        use crate::disk::partition::{read_gpt, write_gpt, PartSpec, TYPE_ESP, TYPE_LINUX};
        let spec = |size, type_guid, name| PartSpec {
            size,
            type_guid,
            name,
            legacy_boot: false,
        };
        write_gpt(
            &img,
            &[
                spec(Some(8 << 20), TYPE_ESP, "esp"),
                spec(None, TYPE_LINUX, "root"),
            ],
        )
        .unwrap();
        let table = read_gpt(&img).unwrap();
        let range = |n: usize| (table[n].start, table[n].size);
        let (esp, root) = (range(0), range(1));
        let disk = PartitionedDevice {
            dev: run(Command::new("losetup").args(["--find", "--show"]).arg(&img)),
        };
        run(Command::new("partx").args(["-a", &disk.dev]));
        let part2 = PathBuf::from(format!("{}p2", disk.dev));
        assert_eq!(
            partition_device(Path::new(&disk.dev), root),
            Some(part2.clone())
        );
        assert_eq!(
            partition_device(Path::new(&disk.dev), esp),
            Some(PathBuf::from(format!("{}p1", disk.dev)))
        );
        // A range no partition covers exactly, and an image file: none.
        assert_eq!(partition_device(Path::new(&disk.dev), (root.0, 4096)), None);
        assert_eq!(partition_device(&img, root), None);

        // What every command opening a disk uses: the partition's device,
        // no loop device attached (so none is needed on the device itself).
        let loops_before = run(Command::new("losetup").args(["-j"]).arg(&img));
        let g =
            crate::disk::loopdev::LoopGuard::attach_range(Path::new(&disk.dev), Some(root), true)
                .unwrap();
        assert_eq!(g.path(), part2);
        assert_eq!(
            run(Command::new("losetup").args(["-j"]).arg(&img)),
            loops_before
        );
        g.close().unwrap();
        // An image file still gets a loop device on the range.
        let g = crate::disk::loopdev::LoopGuard::attach_range(&img, Some(root), true).unwrap();
        assert!(g.path().to_string_lossy().starts_with("/dev/loop"));
        assert_ne!(g.path(), part2);
        g.close().unwrap();
    }
}
