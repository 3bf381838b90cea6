//! `deploy update [--trial] [TARGET]`: fetch the vendor's signed index
//! (`update_url` in deploy.toml, or `--index`), choose the newest bundle
//! this disk can apply, and apply it like `deploy --rootfs URL`.

use crate::bundle::http::HttpOptions;
use crate::bundle::index::{self, DiskState};
use crate::cli::DeployArgs;
use crate::store::versions;
use crate::tree::arch::Arch;
use crate::util::ui;
use crate::UsageError;
use anyhow::Result;

/// What to apply: the bundle's URL (or path) and its manifest's digest.
pub(crate) struct Chosen {
    pub location: String,
    pub manifest_sha256: String,
}

/// `{arch}` and `{version}` in an `update_url`.
fn expand(url: &str, arch: &str, version: &str) -> String {
    url.replace("{arch}", arch).replace("{version}", version)
}

/// Chooses the bundle for `args.target` from the index at `location`
/// (`update_url` with placeholders). None: the disk is up to date.
pub(crate) fn choose(args: &DeployArgs, location: Option<&str>) -> Result<Option<Chosen>> {
    let location = location.ok_or_else(|| {
        UsageError(
            "no update index: set update_url in the device's deploy.toml \
             (/etc/btrfs-deploy/deploy.toml), or give --index URL"
                .into(),
        )
    })?;
    let target = args
        .target
        .clone()
        .ok_or_else(|| UsageError("no TARGET given: name the disk to update".into()))?;
    let opts = HttpOptions {
        timeout: std::time::Duration::from_secs(args.http_timeout.max(1)),
        retries: args.http_retries,
    };
    crate::disk::mount::enter_private_namespace()?;
    crate::app::target::with_disk(&target, true, |disk| {
        let top = &disk.layout;
        let list = versions::list(top)?;
        let state = DiskState {
            newest_build: list
                .iter()
                .filter_map(|v| v.deployment.build)
                .max()
                .unwrap_or(0),
            labels: list.iter().map(|v| v.label.clone()).collect(),
        };
        let default = versions::default_label(top).unwrap_or_else(|_| "default".into());
        let arch = Arch::of_this_tool().map(|a| a.name()).unwrap_or("unknown");
        let location = expand(location, arch, &default);
        ui::step(format!("Fetching the update index {location}"));
        let (idx, key) =
            index::fetch_verified(&location, &args.verify_key, &args.revoked_key, opts)?;
        ui::detail(format!(
            "{} bundle(s), signed by key {key}, written {}, expires {}",
            idx.bundles.len(),
            idx.created,
            idx.expires.as_deref().unwrap_or("never")
        ));
        let chosen = index::choose(&idx, &state, |uuid| {
            Ok(crate::bundle::apply::find_base(top, uuid)?.is_some())
        })?;
        Ok(match chosen {
            None => {
                ui::step(format!(
                    "{} is up to date: the index has no build newer than {} it can apply",
                    target.display(),
                    state.newest_build
                ));
                None
            }
            Some(e) => {
                ui::step(format!(
                    "Newest for this disk: {} (build {}, {}{})",
                    e.label,
                    e.build,
                    if e.base.is_some() {
                        "delta against "
                    } else {
                        "full"
                    },
                    e.base.as_ref().map(|b| b.label.as_str()).unwrap_or("")
                ));
                Some(Chosen {
                    location: index::beside(&location, &e.file),
                    manifest_sha256: e.manifest_sha256.clone(),
                })
            }
        })
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_expand() {
        assert_eq!(
            super::expand("https://u/{arch}/{version}/index.json", "arm64", "v2"),
            "https://u/arm64/v2/index.json"
        );
    }
}
