//! Signed update bundles (design §11, docs/bundles.md): a manifest signed
//! with a minisign (Ed25519) key, then a `btrfs send` stream of a version's
//! `orig` (incremental against a base version, or full) whose chunks the
//! manifest hashes.

pub(crate) mod apply;
pub(crate) mod create;
pub(crate) mod format;
pub(crate) mod http;
pub(crate) mod index;
pub(crate) mod keys;
