//! btrfs-deploy: write a Linux root filesystem onto a disk with a versioned
//! Btrfs layout, add versions, switch and roll back atomically, boot-test.

//! The folders follow one deploy (design §2): `cli` and `config` parse,
//! `app` runs each command, `target` opens the disk, `store` owns the
//! versioned layout on it, `build` writes a version's tree, `boot` makes it
//! bootable, `boottest` boots it in QEMU; `util` holds small shared helpers.

pub(crate) mod app;
pub(crate) mod boot;
pub(crate) mod boottest;
pub mod build;
pub(crate) mod bundle;
pub mod cli;
pub(crate) mod config;
pub(crate) mod store;
pub(crate) mod target;
pub(crate) mod util;

use anyhow::Result;
use app::{check, commands, deploy};
use build::{extensions, intree};
use cli::{BundleCommand, Cli, Command};
use target::mount;
use util::{signals, ui};

/// A mistake in how the command was called (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    ui::set_level(if cli.quiet {
        0
    } else if cli.verbose {
        2
    } else {
        1
    });
    if nix::unistd::geteuid().is_root() {
        // Empty mount points of deploys that were killed; never a mount.
        mount::remove_stale_mount_dirs();
    }
    match cli.command {
        None => {
            let mut args = cli.deploy.clone();
            let size_from_cli = args.size.is_some();
            let cfg = config::load(args.config.as_deref())?;
            if let Some((path, _)) = &cfg {
                ui::step(format!("Using config {}", path.display()));
            }
            let settings = config::apply(&mut args, cfg.as_ref().map(|(_, c)| c))?;
            let plan = deploy::plan(&args, settings, size_from_cli)?;
            mount::enter_private_namespace()?;
            signals::install()?;
            deploy::execute(&plan)
        }
        Some(Command::List {
            target,
            json,
            sizes,
        }) => {
            mount::enter_private_namespace()?;
            commands::list(&target, json, sizes)
        }
        Some(Command::SetDefault { label, target }) => {
            mount::enter_private_namespace()?;
            signals::install()?;
            commands::set_default(&label, &target)
        }
        Some(Command::Remove { label, target }) => {
            mount::enter_private_namespace()?;
            signals::install()?;
            commands::remove(&label, &target)
        }
        Some(Command::Cleanup { target }) => {
            mount::enter_private_namespace()?;
            commands::cleanup(&target)
        }
        Some(Command::BootTest(args)) => {
            mount::enter_private_namespace()?;
            commands::boot_test(&args)
        }
        Some(Command::Check { target, json }) => {
            mount::enter_private_namespace()?;
            check::run(&target, json)
        }
        Some(Command::Keygen { output }) => app::bundle::keygen(&output),
        Some(Command::Bundle(BundleCommand::Create(args))) => app::bundle::create(&args),
        Some(Command::Bundle(BundleCommand::Info {
            file,
            verify_key,
            json,
        })) => app::bundle::info(&file, verify_key.as_deref(), json),
        Some(Command::Extensions { extensions_dir }) => {
            extensions::print_available(&extensions_dir)
        }
        Some(Command::RunInTree { tree, cmd }) => {
            mount::enter_private_namespace()?;
            let code = intree::run_in_tree(&tree, &cmd)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
    }
}
