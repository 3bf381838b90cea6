//! `deploy check TARGET`: verifies the layout invariants of a disk.
//! (Being written: see issue 6.)

use anyhow::{bail, Result};
use std::path::Path;

/// Checks `target` and prints a report; an error when anything is wrong.
pub fn run(target: &Path, _json: bool) -> Result<()> {
    bail!("deploy check is not implemented yet ({})", target.display())
}
