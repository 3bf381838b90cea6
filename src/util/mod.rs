//! Small helpers shared by every part: external commands, file system
//! calls, paths inside a root, signals, output, sizes.

pub(crate) mod cmd;
pub(crate) mod fsutil;
pub(crate) mod json;
pub(crate) mod rootpath;
pub(crate) mod signals;
pub(crate) mod trust;
pub(crate) mod ui;
pub(crate) mod units;
