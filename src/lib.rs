//! btrfs-deploy: write a Linux root filesystem onto a disk with a versioned
//! Btrfs layout, add versions, switch and roll back atomically, boot-test.

pub mod bootloader;
pub mod boottest;
pub mod btrfs;
pub mod check;
pub mod cli;
pub mod cmd;
pub mod commands;
pub mod config;
pub mod copy;
pub mod deploy;
pub mod deployment;
pub mod disk;
pub mod etcmerge;
pub mod extensions;
pub mod fstab;
pub mod fsutil;
pub mod intree;
pub mod kernel;
pub mod layout;
pub mod lock;
pub mod loopdev;
pub mod mount;
pub mod rootpath;
pub mod signals;
pub mod state;
pub mod tarball;
pub mod ui;
pub mod units;
pub mod versions;

use anyhow::Result;
use cli::{Cli, Command};

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
    if let Some(Command::CheckIp { prefix, value }) = &cli.command {
        // No side effect of any kind: this runs at planning time.
        return extensions::check_ip(value, *prefix);
    }
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
        // (Returned above, before any side effect.)
        Some(Command::CheckIp { prefix, value }) => extensions::check_ip(&value, prefix),
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
