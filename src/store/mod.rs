//! The versioned layout on a disk: its paths, the subvolume operations,
//! the per-version record, and the versions themselves.

pub(crate) mod btrfs;
pub(crate) mod deployment;
pub(crate) mod layout;
pub(crate) mod lifecycle;
pub(crate) mod rootmode;
pub(crate) mod trial;
pub(crate) mod versions;
