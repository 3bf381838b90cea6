//! Writing a version's tree: copying or extracting the rootfs, configure
//! extensions, fstab completion, state directories, the /etc merge and the
//! kernel files.

pub(crate) mod arch;
pub mod copy;
pub(crate) mod etcmerge;
pub(crate) mod extensions;
pub(crate) mod foreign;
pub(crate) mod fstab;
pub(crate) mod intree;
pub(crate) mod kernel;
pub(crate) mod nssmerge;
pub(crate) mod sdimage;
pub(crate) mod state;
pub(crate) mod statemerge;
pub(crate) mod tarball;
