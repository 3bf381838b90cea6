//! Making a disk bootable: the SYSLINUX/extlinux backend.

pub(crate) mod extlinux;
