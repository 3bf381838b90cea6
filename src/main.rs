//! `deploy`: parse, set up logging, run, print the error chain once, exit.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    btrfs_deploy::use_carried_tools();
    let cli = btrfs_deploy::cli::Cli::parse();
    let filter = if cli.verbose { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEPLOY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match btrfs_deploy::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write as _;
            let msg = btrfs_deploy::user_message(&format!("{e:#}"));
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            if let Some(v) = e.downcast_ref::<btrfs_deploy::Verdict>() {
                ExitCode::from(v.code)
            } else if e.downcast_ref::<btrfs_deploy::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
