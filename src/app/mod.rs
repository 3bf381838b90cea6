//! One module per command: the deploy flow, the version commands, `check`,
//! keys and bundles.

pub(crate) mod about;
pub(crate) mod bundle;
pub(crate) mod check;
pub(crate) mod commands;
pub(crate) mod deploy;
pub(crate) mod generate;
pub(crate) mod status;
pub(crate) mod summary;
pub(crate) mod target;
pub(crate) mod trial;
pub(crate) mod update;
