//! Opening a target: the disk or image, its lock, its loop device, mounts.

pub(crate) mod lock;
pub(crate) mod loopdev;
pub(crate) mod mount;
pub(crate) mod open;
pub(crate) mod partdev;
pub(crate) mod partial;
pub(crate) mod partition;
