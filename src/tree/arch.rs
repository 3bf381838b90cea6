//! The CPU architecture of a rootfs and of a kernel, read from the files
//! themselves: the ELF header of the tree's init or shell (`e_machine`),
//! and the boot header of a kernel image (x86 `bzImage`, arm64 `Image`,
//! RISC-V `Image`, or an ELF `vmlinux`). Names are Debian's (`amd64`,
//! `arm64`, ...), which is what users and `dpkg --print-architecture` say.

use crate::util::rootpath;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

/// A CPU architecture, named as Debian names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// x86-64.
    Amd64,
    /// AArch64.
    Arm64,
    /// 32-bit ARM (hard-float userland: Debian's armhf).
    Armhf,
    /// 32-bit x86.
    I386,
    /// 64-bit RISC-V.
    Riscv64,
}

/// Every architecture, for messages and `--arch` values.
pub const ALL: [Arch; 5] = [
    Arch::Amd64,
    Arch::Arm64,
    Arch::Armhf,
    Arch::I386,
    Arch::Riscv64,
];

impl Arch {
    /// Debian's name: `amd64`, `arm64`, `armhf`, `i386`, `riscv64`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Armhf => "armhf",
            Arch::I386 => "i386",
            Arch::Riscv64 => "riscv64",
        }
    }
    /// The kernel's (and qemu-user's) name: `x86_64`, `aarch64`, ...
    pub fn uname(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
            Arch::Armhf => "arm",
            Arch::I386 => "i386",
            Arch::Riscv64 => "riscv64",
        }
    }
    /// The GPT type of this architecture's root partition in the
    /// Discoverable Partitions Specification, which `systemd-dissect`,
    /// `systemd-repart` and `systemd-gpt-auto-generator` look for.
    pub fn root_partition_type(self) -> &'static str {
        match self {
            Arch::Amd64 => "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            Arch::Arm64 => "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
            Arch::Armhf => "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3",
            Arch::I386 => "44479540-F297-41B2-9AF7-D131D5F0458A",
            Arch::Riscv64 => "72EC70A6-CF74-40E6-BD49-4BDA08E8F224",
        }
    }
    /// The architecture this `deploy` binary was built for.
    pub fn of_this_tool() -> Option<Arch> {
        Arch::parse(std::env::consts::ARCH)
    }
    /// Parses a Debian or kernel name (`arm64` or `aarch64`).
    pub fn parse(s: &str) -> Option<Arch> {
        let s = s.trim().to_ascii_lowercase();
        ALL.into_iter()
            .find(|a| a.name() == s || a.uname() == s)
            .or(match s.as_str() {
                "x86-64" | "x64" => Some(Arch::Amd64),
                "armv7l" | "armv7" | "arm32" => Some(Arch::Armhf),
                "i686" | "i586" | "x86" => Some(Arch::I386),
                _ => None,
            })
    }
    /// The ELF `e_machine` of this architecture's binaries.
    fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 0x3e,
            Arch::Arm64 => 0xb7,
            Arch::Armhf => 0x28,
            Arch::I386 => 0x03,
            Arch::Riscv64 => 0xf3,
        }
    }
    fn from_elf_machine(m: u16) -> Option<Arch> {
        ALL.into_iter().find(|a| a.elf_machine() == m)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The files whose ELF header says what a rootfs runs, in the order tried
/// (symlinks resolved inside the tree; scripts are skipped).
pub const PROBES: [&str; 6] = [
    "sbin/init",
    "usr/lib/systemd/systemd",
    "bin/sh",
    "usr/bin/sh",
    "bin/busybox",
    "usr/bin/env",
];

/// The architecture an ELF file is built for, from its first bytes;
/// `None` for anything else (a script, a text file).
pub fn elf_arch(header: &[u8]) -> Option<Arch> {
    if header.len() < 20 || &header[..4] != b"\x7fELF" {
        return None;
    }
    let machine = match header[5] {
        1 => u16::from_le_bytes([header[18], header[19]]),
        2 => u16::from_be_bytes([header[18], header[19]]),
        _ => return None,
    };
    Arch::from_elf_machine(machine)
}

/// The architecture of the rootfs directory `rootfs`, from the first of
/// [`PROBES`] that is an ELF binary of a known architecture.
pub fn detect_rootfs(rootfs: &Path) -> Result<Arch> {
    for p in PROBES {
        let Some(host) = rootpath::try_resolve_in_root(rootfs, Path::new(p))? else {
            continue;
        };
        if !host.is_file() {
            continue;
        }
        if let Some(a) = elf_arch(&read_head(&host, 64)?) {
            return Ok(a);
        }
    }
    bail!(
        "cannot tell the architecture of rootfs {}: none of /{} is an ELF binary of a known \
         architecture; give it with --arch ({})",
        rootfs.display(),
        PROBES.join(", /"),
        names()
    )
}

/// `amd64, arm64, ...` for messages.
pub fn names() -> String {
    ALL.map(Arch::name).join(", ")
}

fn read_head(path: &Path, n: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    std::fs::File::open(path)
        .and_then(|f| f.take(n as u64).read_to_end(&mut buf))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

/// The architecture a kernel image boots on, from its header: an x86 boot
/// protocol header (`HdrS` at 0x202; 64-bit when its `xloadflags` say it can
/// be loaded above 4 GiB, else i386), an arm64 `Image` (`ARM\x64` at 0x38),
/// a RISC-V `Image` (`RSC\x05` at 0x34), an ARM `zImage` (magic 0x016f2818 at
/// 0x24) or an ELF `vmlinux`. `None` when the image is compressed as a whole
/// (a gzip'd arm64 `vmlinuz`) or unknown: then nothing can be checked.
pub fn kernel_arch(path: &Path) -> Result<Option<Arch>> {
    let h = read_head(path, 0x240)?;
    if let Some(a) = elf_arch(&h) {
        return Ok(Some(a));
    }
    let at = |off: usize, magic: &[u8]| h.get(off..off + magic.len()) == Some(magic);
    if at(0x202, b"HdrS") {
        // xloadflags (boot protocol 2.12+) bit 0: XLF_KERNEL_64.
        let x64 = h.get(0x236).is_some_and(|f| f & 1 != 0);
        return Ok(Some(if x64 { Arch::Amd64 } else { Arch::I386 }));
    }
    if at(0x38, b"ARM\x64") {
        return Ok(Some(Arch::Arm64));
    }
    if at(0x34, b"RSC\x05") {
        return Ok(Some(Arch::Riscv64));
    }
    if at(0x24, &0x016f_2818u32.to_le_bytes()) {
        return Ok(Some(Arch::Armhf));
    }
    Ok(None)
}

/// Fails when the kernel at `kernel` does not boot on `arch`.
pub fn check_kernel(kernel: &Path, arch: Arch, what: &str) -> Result<()> {
    match kernel_arch(kernel)? {
        Some(k) if k != arch => bail!(
            "the kernel {} is built for {k}, but {what} is {arch}: it could not boot it; give \
             a {arch} kernel (--kernel PATH) or the right rootfs (or --arch if the rootfs was \
             misdetected)",
            kernel.display()
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(machine: u16, class: u8, big_endian: bool) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = if big_endian { 2 } else { 1 };
        let m = if big_endian {
            machine.to_be_bytes()
        } else {
            machine.to_le_bytes()
        };
        h[18..20].copy_from_slice(&m);
        h
    }

    #[test]
    fn reads_elf_machines() {
        assert_eq!(elf_arch(&elf(0x3e, 2, false)), Some(Arch::Amd64));
        assert_eq!(elf_arch(&elf(0xb7, 2, false)), Some(Arch::Arm64));
        assert_eq!(elf_arch(&elf(0x28, 1, false)), Some(Arch::Armhf));
        assert_eq!(elf_arch(&elf(0x03, 1, false)), Some(Arch::I386));
        assert_eq!(elf_arch(&elf(0xf3, 2, false)), Some(Arch::Riscv64));
        assert_eq!(elf_arch(&elf(0xb7, 2, true)), Some(Arch::Arm64));
        assert_eq!(elf_arch(&elf(0x1234, 2, false)), None);
        assert_eq!(elf_arch(b"#!/bin/sh\necho hello world\n"), None);
        assert_eq!(elf_arch(b"\x7fELF"), None);
    }

    #[test]
    fn parses_names() {
        assert_eq!(Arch::parse("arm64"), Some(Arch::Arm64));
        assert_eq!(Arch::parse("AArch64"), Some(Arch::Arm64));
        assert_eq!(Arch::parse("x86_64"), Some(Arch::Amd64));
        assert_eq!(Arch::parse("sparc"), None);
        for a in ALL {
            assert_eq!(Arch::parse(a.name()), Some(a));
            assert_eq!(Arch::parse(a.uname()), Some(a));
        }
    }

    #[test]
    fn detects_a_rootfs_through_symlinks_skipping_scripts() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("sbin")).unwrap();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        // init is a script: skipped; sh -> busybox (absolute, resolved in the tree).
        std::fs::write(r.join("sbin/init"), "#!/bin/sh\nexec /bin/sh\n").unwrap();
        std::fs::write(r.join("bin/busybox"), elf(0xb7, 2, false)).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        assert_eq!(detect_rootfs(r).unwrap(), Arch::Arm64);
        // Nothing usable: a clear error naming --arch.
        std::fs::write(r.join("bin/busybox"), "not a binary").unwrap();
        let msg = format!("{:#}", detect_rootfs(r).unwrap_err());
        assert!(msg.contains("--arch") && msg.contains("arm64"), "{msg}");
    }

    #[test]
    fn reads_kernel_headers() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        let mut x86 = vec![0u8; 0x300];
        x86[0x202..0x206].copy_from_slice(b"HdrS");
        x86[0x236] = 0x7f;
        std::fs::write(&k, &x86).unwrap();
        assert_eq!(kernel_arch(&k).unwrap(), Some(Arch::Amd64));
        x86[0x236] = 0;
        std::fs::write(&k, &x86).unwrap();
        assert_eq!(kernel_arch(&k).unwrap(), Some(Arch::I386));
        let mut a64 = vec![0u8; 0x300];
        a64[0x38..0x3c].copy_from_slice(b"ARM\x64");
        std::fs::write(&k, &a64).unwrap();
        assert_eq!(kernel_arch(&k).unwrap(), Some(Arch::Arm64));
        check_kernel(&k, Arch::Arm64, "the rootfs").unwrap();
        let msg = format!(
            "{:#}",
            check_kernel(&k, Arch::Amd64, "the rootfs").unwrap_err()
        );
        assert!(
            msg.contains("built for arm64") && msg.contains("rootfs is amd64"),
            "{msg}"
        );
        // A gzip'd image: unknown, nothing to check.
        std::fs::write(&k, b"\x1f\x8b\x08\x00rest").unwrap();
        assert_eq!(kernel_arch(&k).unwrap(), None);
        check_kernel(&k, Arch::Amd64, "the rootfs").unwrap();
    }
}
