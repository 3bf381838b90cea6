//! btrfs-deploy: write a Linux root filesystem onto a disk with a versioned
//! Btrfs layout, add versions, switch and roll back atomically, boot-test.

//! The folders follow one deploy (design §2): `cli` and `config` parse,
//! `app` runs each command, `disk` opens the target disk, `store` owns the
//! versioned layout on it, `tree` writes a version's tree, `boot` makes it
//! bootable, `boottest` boots it in QEMU; `util` holds small shared helpers.

/// `println!` that never panics: output that cannot be written (a closed
/// pipe: `deploy list | head -1`) is dropped and the work goes on, so a
/// closed stdout or stderr never interrupts a write to a disk.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that never panics (see `outln!`).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub(crate) mod app;
pub(crate) mod boot;
pub(crate) mod boottest;
pub(crate) mod bundle;
pub mod cli;
pub(crate) mod config;
pub(crate) mod disk;
pub(crate) mod store;
pub mod tree;
pub(crate) mod util;

use anyhow::Result;
use app::{about, check, commands, deploy, generate, summary};
use cli::{BundleCommand, Cli, Command};
use disk::mount;
use tree::{extensions, intree};
use util::json;
use util::{signals, ui};

/// An error message as the user should see it: paths below the tool's
/// private mount points named as the user knows them.
pub fn user_message(msg: &str) -> String {
    disk::mount::user_paths(msg)
}

/// A mistake in how the command was called (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit status of `deploy check` when the disk has problems.
pub const EXIT_CHECK_PROBLEMS: u8 = 3;
/// Exit status of `deploy boot-test` when the guest did not reach the
/// expected text (timeout, panic, bootloader error, `--fail-on`, power-off).
pub const EXIT_BOOT_TEST_FAILED: u8 = 4;

/// A command that ran to its end with a negative answer (check found
/// problems, the boot-test guest failed): its own exit status, distinct
/// from errors (1) and usage errors (2).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Verdict {
    /// Exit status: [`EXIT_CHECK_PROBLEMS`] or [`EXIT_BOOT_TEST_FAILED`].
    pub code: u8,
    /// What was found.
    pub message: String,
}

/// A `deploy` carried into a system by the `on-device` extension lives in
/// `/usr/lib/btrfs-deploy/bin` (marked by a `.carried` file) next to the
/// programs it runs, which the system may lack: they come first on `PATH`,
/// and the iconv converters carried with their libc (`../lib/gconv`, which
/// mtools loads) are its `GCONV_PATH`. Called by `main` before any thread
/// starts.
pub fn use_carried_tools() {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(std::path::Path::to_path_buf))
    else {
        return;
    };
    if !dir.join(".carried").is_file() {
        return;
    }
    let gconv = dir.join("../lib/gconv");
    if gconv.is_dir() {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("GCONV_PATH", gconv) };
    }
    let old = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut paths = vec![dir];
    paths.extend(std::env::split_paths(&old));
    if let Ok(p) = std::env::join_paths(paths) {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("PATH", p) };
    }
}

/// A deploy (the command without a subcommand), or with `update` (the
/// `--index` given, if any) `deploy update`, which first chooses the
/// bundle to apply.
fn run_deploy(mut args: cli::DeployArgs, update: Option<Option<String>>) -> Result<()> {
    let started = std::time::Instant::now();
    let size_from_cli = args.size.is_some();
    // On a device of this layout, TARGET omitted (or `/`) is the disk
    // it runs from, and its configuration is the device's own.
    let on_device = match args.target.as_deref() {
        None => true,
        Some(t) => t == std::path::Path::new("/"),
    };
    let device_config = std::path::Path::new(app::trial::DEVICE_CONFIG);
    let mut config_path = args.config.clone();
    if on_device {
        if let Some((dev, _)) = app::target::running_system() {
            args.target = Some(app::target::whole_disk(&dev));
            if config_path.is_none() && device_config.exists() {
                config_path = Some(device_config.to_path_buf());
            }
        } else if args.target.is_some() {
            return Err(UsageError(
                "TARGET / means the disk the running system booted from, and / here is \
                 not a version of a btrfs-deploy disk: name a disk image or block device"
                    .into(),
            )
            .into());
        }
    }
    let cfg = config::load(config_path.as_deref())?;
    if let Some((path, _)) = &cfg {
        ui::step(format!("Using config {}", path.display()));
    }
    let settings = config::apply(&mut args, cfg.as_ref().map(|(_, c)| c))?;
    if let Some(index) = update {
        let location = index.or_else(|| cfg.as_ref().and_then(|(_, c)| c.update_url.clone()));
        match app::update::choose(&args, location.as_deref())? {
            None => return Ok(()),
            Some(chosen) => {
                args.rootfs = Some(chosen.location.into());
                args.expect_manifest_sha256 = Some(chosen.manifest_sha256);
            }
        }
    }
    let plan = deploy::plan(&args, settings, size_from_cli)?;
    mount::enter_private_namespace()?;
    signals::install()?;
    let outcome = deploy::execute(&plan)?;
    if args.json {
        json::print(&summary::Summary::new(
            &plan.target,
            &outcome,
            started.elapsed(),
        ))?;
    }
    Ok(())
}

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
    match cli.command {
        None => run_deploy(cli.deploy.clone(), None),
        Some(Command::Update(u)) => {
            let args = cli::DeployArgs {
                target: u.target.clone(),
                config: u.config.clone(),
                trial: u.trial,
                verify_key: u.verify_key.clone(),
                revoked_key: u.revoked_key.clone(),
                http_timeout: u.http_timeout,
                http_retries: u.http_retries,
                json: u.json,
                ..Default::default()
            };
            run_deploy(args, Some(u.index.clone()))
        }
        Some(Command::List {
            target,
            json,
            sizes,
        }) => {
            mount::enter_private_namespace()?;
            commands::list(&target, json, sizes)
        }
        Some(Command::Status { target, json }) => {
            mount::enter_private_namespace()?;
            app::status::status(target.as_deref(), json)
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
        Some(Command::MarkGood { target }) => {
            mount::enter_private_namespace()?;
            app::trial::mark_good(target.as_deref())
        }
        Some(Command::TrialWatch { timeout }) => {
            mount::enter_private_namespace()?;
            app::trial::watch(timeout)
        }
        Some(Command::Health { timeout, no_reboot }) => {
            mount::enter_private_namespace()?;
            app::trial::health(timeout, no_reboot)
        }
        Some(Command::BootTest(args)) => {
            mount::enter_private_namespace()?;
            commands::boot_test(&args)
        }
        Some(Command::Check { target, json }) => {
            mount::enter_private_namespace()?;
            check::run(&target, json)
        }
        Some(Command::CheckIp { prefix, value }) => extensions::check_ip(&value, prefix),
        Some(Command::Extensions {
            extensions_dir,
            json,
        }) => extensions::print_available(&extensions_dir, json),
        Some(Command::Version { json }) => about::print(json),
        Some(Command::GenerateMan { dir }) => {
            for f in generate::man_pages(&dir)? {
                ui::detail(f.display().to_string());
            }
            Ok(())
        }
        Some(Command::GenerateCompletions { dir }) => {
            for f in generate::completions(&dir)? {
                ui::detail(f.display().to_string());
            }
            Ok(())
        }
        Some(Command::Keygen { output }) => app::bundle::keygen(&output),
        Some(Command::Bundle(BundleCommand::Create(args))) => app::bundle::create(&args),
        Some(Command::Bundle(BundleCommand::Index {
            dir,
            sign_key,
            expires_in,
        })) => app::bundle::index(&dir, &sign_key, expires_in.0),
        Some(Command::Bundle(BundleCommand::Info {
            file,
            verify_key,
            json,
        })) => app::bundle::info(&file, verify_key.as_deref(), json),
        Some(Command::RunInTree { tree, cmd }) => {
            intree::prepare_foreign(&tree)?;
            mount::enter_private_namespace()?;
            let code = intree::run_in_tree(&tree, &cmd)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
    }
}
