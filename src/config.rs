//! The deployment config file (`deploy.toml`): everything the command line
//! can say, plus the `[settings]` handed to configure extensions.
//!
//! Precedence, lowest first: the config file, then the command line
//! (options and `--set KEY=VALUE`). Relative paths in the file are relative
//! to the file's directory.

use crate::cli::DeployArgs;
use crate::UsageError;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Name of the config file picked up from the current directory.
pub const DEFAULT_FILE: &str = "deploy.toml";

/// Setting the tool adds (not the user) when a config file is used: the
/// directory of that file, so extensions can resolve relative paths found in
/// it. Dropped by [`redact`] like every `DEPLOY_*` name.
pub const CONFIG_DIR_SETTING: &str = "DEPLOY_CONFIG_DIR";

/// Prefix reserved for the variables the tool passes to extensions.
pub const RESERVED_PREFIX: &str = "DEPLOY_";

/// Words that make a setting a secret (see [`is_secret`]).
const SECRET_WORDS: [&str; 6] = ["PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "TOKEN", "KEY"];

/// A deployment config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Rootfs directory (`--rootfs`).
    pub rootfs: Option<PathBuf>,
    /// Size of a new image (`--size`).
    pub size: Option<String>,
    /// Version label (`--version`).
    pub version: Option<String>,
    /// Kernel arguments (`--kernel-args`).
    #[serde(alias = "kernel-args")]
    pub kernel_args: Option<String>,
    /// Root mode (`--root-mode`): "rw", "ro" or "volatile".
    #[serde(default, alias = "root-mode")]
    pub root_mode: Option<crate::store::rootmode::RootMode>,
    /// Kernel image (`--kernel`).
    pub kernel: Option<PathBuf>,
    /// Initramfs (`--initramfs`).
    pub initramfs: Option<PathBuf>,
    /// Device tree blob (`--dtb`).
    pub dtb: Option<PathBuf>,
    /// Deploy without kernel and bootloader (`--no-bootloader`).
    #[serde(alias = "no-bootloader")]
    pub no_bootloader: Option<bool>,
    /// Format a block device that holds a filesystem (`--wipe`).
    pub wipe: Option<bool>,
    /// How a new disk boots (`--boot`): "hybrid" (the default), "uefi" or "bios".
    pub boot: Option<crate::cli::BootArg>,
    /// Architecture of the rootfs (`--arch`), instead of the one read from
    /// its binaries: "amd64", "arm64", "armhf", "i386" or "riscv64".
    pub arch: Option<String>,
    /// Do not make the new version the default (`--no-default`).
    #[serde(alias = "no-default")]
    pub no_default: Option<bool>,
    /// Keep at most this many versions (`--keep`).
    pub keep: Option<usize>,
    /// Compare contents when syncing an upgrade (`--checksum`).
    pub checksum: Option<bool>,
    /// Configure extensions to run, in order (`--extension`).
    pub extensions: Option<Vec<String>>,
    /// Extra extension folders (`--extensions-dir`).
    #[serde(alias = "extensions-dirs", alias = "extensions_dir")]
    pub extensions_dirs: Option<Vec<PathBuf>>,
    /// Extensions every version gets, after those of `extensions` or
    /// `--extension`, whatever the command line says (the device's
    /// /etc/btrfs-deploy/deploy.toml lists `on-device` here, so the tool
    /// stays on the device).
    #[serde(alias = "required-extensions")]
    pub required_extensions: Option<Vec<String>>,
    /// Seconds a trial boot has to pass its health checks (default 300).
    #[serde(alias = "trial-timeout")]
    pub trial_timeout: Option<u64>,
    /// Public keys bundles may be signed with (`--verify-key`): one file,
    /// or a list (during a key rotation).
    #[serde(default, alias = "verify-key", deserialize_with = "one_or_many")]
    pub verify_key: Option<Vec<PathBuf>>,
    /// Where `deploy update` finds the signed index of bundles: a URL (or
    /// file) with `{arch}` and `{version}` placeholders.
    #[serde(alias = "update-url")]
    pub update_url: Option<String>,
    /// Key ids whose bundles are refused (`--revoked-key`).
    #[serde(alias = "revoked-keys")]
    pub revoked_keys: Option<Vec<String>>,
    /// Extension settings: string, integer, float or boolean values.
    pub settings: Option<BTreeMap<String, toml::Value>>,
    /// Directory of the file this was read from (set by [`load`]).
    #[serde(skip)]
    pub dir: Option<PathBuf>,
}

/// A path, or a list of paths (`verify_key = "a.pub"` or `["a.pub", "b.pub"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<PathBuf>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    }))
}

/// Loads `explicit` (which must exist) or `./deploy.toml` when present.
/// Relative paths inside are resolved against the config file's directory.
/// Unknown keys and wrong types are errors naming the key and the file.
pub fn load(explicit: Option<&Path>) -> Result<Option<(PathBuf, Config)>> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let p = PathBuf::from(DEFAULT_FILE);
            if std::fs::symlink_metadata(&p).is_err() {
                return Ok(None);
            }
            p
        }
    };
    if std::fs::symlink_metadata(&path).is_ok() {
        crate::util::trust::require_trusted(&path, "config file")?;
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let abs = std::path::absolute(&path)
        .with_context(|| format!("resolving config file {}", path.display()))?;
    let dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
    let cfg = parse(&text, &path, &dir)?;
    Ok(Some((path, cfg)))
}

/// Parses config text read from `path`; relative paths become relative to `dir`.
pub fn parse(text: &str, path: &Path, dir: &Path) -> Result<Config> {
    let mut cfg: Config = toml::from_str(text).map_err(|e| toml_error(&e, text, path))?;
    for p in [
        &mut cfg.rootfs,
        &mut cfg.kernel,
        &mut cfg.initramfs,
        &mut cfg.dtb,
    ]
    .into_iter()
    .flatten()
    .chain(cfg.verify_key.iter_mut().flatten())
    {
        // A bundle URL is not a path.
        if !crate::bundle::http::is_url(p) {
            *p = dir.join(&*p);
        }
    }
    for p in cfg.extensions_dirs.iter_mut().flatten() {
        *p = dir.join(&*p);
    }
    if let Some(settings) = &cfg.settings {
        for (k, v) in settings {
            check_setting_name(k)
                .with_context(|| format!("config file {}: [settings]", path.display()))?;
            setting_value(v)
                .with_context(|| format!("config file {}: [settings] {k}", path.display()))?;
        }
    }
    cfg.dir = Some(dir.to_path_buf());
    Ok(cfg)
}

/// One line naming the file, the line and the key of a TOML error.
fn toml_error(e: &toml::de::Error, text: &str, path: &Path) -> anyhow::Error {
    let msg = e.message().trim_end();
    let Some(span) = e.span() else {
        return anyhow::anyhow!("config file {}: {msg}", path.display());
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !msg.contains(&format!("`{k}`")));
    match key {
        Some(k) => anyhow::anyhow!(
            "config file {}, line {line_no}: key `{k}`: {msg}",
            path.display()
        ),
        None => anyhow::anyhow!("config file {}, line {line_no}: {msg}", path.display()),
    }
}

/// A `[settings]` value as the string an extension sees.
fn setting_value(v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "must be a string, number or boolean, not {}",
            other.type_str()
        ),
    })
}

/// Setting names are environment variable names (`[A-Za-z_][A-Za-z0-9_]*`),
/// not `PATH` and not starting with `DEPLOY_` (reserved for the tool).
pub fn check_setting_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        bail!(
            "invalid setting name {name:?}: use letters, digits and _ (not starting with a digit)"
        );
    }
    if name == "PATH" || name.to_ascii_uppercase().starts_with(RESERVED_PREFIX) {
        bail!("setting name {name} is reserved for the tool");
    }
    Ok(())
}

/// Fills every field of `args` the command line left unset from `cfg` (the
/// command line wins) and returns the final settings: the config's
/// `[settings]` overridden by `--set KEY=VALUE`. A malformed `--set` is a
/// [`UsageError`].
///
/// Flags (`--wipe`, ...) can only be switched on from the command line, so
/// `true` in the file cannot be undone there. A non-empty `--extension` list
/// replaces the file's list; `--extensions-dir` folders come after the
/// file's (so they take precedence, see `extensions::search_path`).
pub fn apply(args: &mut DeployArgs, cfg: Option<&Config>) -> Result<BTreeMap<String, String>> {
    let mut settings = BTreeMap::new();
    if let Some(cfg) = cfg {
        fill(&mut args.label, &cfg.version);
        fill(&mut args.rootfs, &cfg.rootfs);
        fill(&mut args.size, &cfg.size);
        fill(&mut args.kernel_args, &cfg.kernel_args);
        fill(&mut args.root_mode, &cfg.root_mode);
        fill(&mut args.kernel, &cfg.kernel);
        fill(&mut args.initramfs, &cfg.initramfs);
        fill(&mut args.dtb, &cfg.dtb);
        fill(&mut args.keep, &cfg.keep);
        if args.verify_key.is_empty() {
            args.verify_key = cfg.verify_key.clone().unwrap_or_default();
        }
        // Revocations add up: the command line cannot lift the file's.
        for k in cfg.revoked_keys.iter().flatten() {
            if !args.revoked_key.contains(k) {
                args.revoked_key.push(k.clone());
            }
        }
        fill(&mut args.boot, &cfg.boot);
        fill(&mut args.arch, &cfg.arch);
        args.no_bootloader |= cfg.no_bootloader.unwrap_or(false);
        args.wipe |= cfg.wipe.unwrap_or(false);
        args.no_default |= cfg.no_default.unwrap_or(false);
        args.checksum |= cfg.checksum.unwrap_or(false);
        if args.extensions.is_empty() {
            args.extensions = cfg.extensions.clone().unwrap_or_default();
        }
        for e in cfg.required_extensions.iter().flatten() {
            if !args.extensions.contains(e) {
                args.extensions.push(e.clone());
            }
        }
        if let Some(dirs) = &cfg.extensions_dirs {
            let mut all = dirs.clone();
            all.append(&mut args.extensions_dir);
            args.extensions_dir = all;
        }
        for (k, v) in cfg.settings.iter().flatten() {
            settings.insert(k.clone(), setting_value(v).with_context(|| k.clone())?);
        }
        if let Some(dir) = &cfg.dir {
            settings.insert(CONFIG_DIR_SETTING.into(), dir.display().to_string());
        }
    }
    for s in &args.set {
        let (k, v) = parse_set(s)?;
        settings.insert(k, v);
    }
    check_setting_values(&settings)?;
    Ok(settings)
}

/// The kernel's limit on one environment string, `NAME=value` and its NUL
/// (`MAX_ARG_STRLEN`, 32 pages).
pub const MAX_ARG_STRLEN: usize = 131_072;

/// Room kept in `ARG_MAX` for what the tool adds to an extension's
/// environment (`DEPLOY_*`, `PATH`) and its arguments.
const ARG_MAX_RESERVE: usize = 64 * 1024;

/// Settings become environment variables of the extensions: refuses, at
/// planning, a value that cannot be passed (a NUL byte ends an environment
/// string; the kernel refuses a string longer than [`MAX_ARG_STRLEN`] or an
/// environment beyond `ARG_MAX`), naming the setting and the fix.
pub fn check_setting_values(settings: &BTreeMap<String, String>) -> Result<()> {
    let mut total = 0usize;
    for (k, v) in settings {
        if v.contains('\0') {
            bail!(
                "setting {k} contains a NUL byte, which cannot be passed to extensions \
                 (environment variables end at NUL): remove it from the value"
            );
        }
        let len = k.len() + 1 + v.len() + 1;
        if len > MAX_ARG_STRLEN {
            bail!(
                "setting {k} is {} bytes long; the kernel passes at most {} bytes per \
                 environment variable (MAX_ARG_STRLEN): put the content in a file and pass \
                 its path instead",
                v.len(),
                MAX_ARG_STRLEN - k.len() - 2
            );
        }
        total += len + std::mem::size_of::<usize>();
    }
    // SAFETY: sysconf has no preconditions.
    let arg_max = usize::try_from(unsafe { libc::sysconf(libc::_SC_ARG_MAX) }).unwrap_or(0);
    let budget = arg_max.saturating_sub(ARG_MAX_RESERVE);
    if arg_max > 0 && total > budget {
        bail!(
            "the settings take {total} bytes together; extensions can be given at most \
             {budget} (ARG_MAX {arg_max} less room for the tool's variables): put large \
             values in files and pass their paths instead"
        );
    }
    Ok(())
}

fn fill<T: Clone>(field: &mut Option<T>, from: &Option<T>) {
    if field.is_none() {
        field.clone_from(from);
    }
}

/// Splits one `--set KEY=VALUE` (at the first `=`).
pub fn parse_set(s: &str) -> Result<(String, String)> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(UsageError(format!("--set {s:?}: expected KEY=VALUE")).into());
    };
    check_setting_name(k).map_err(|e| UsageError(format!("--set {s:?}: {e:#}")))?;
    Ok((k.to_string(), v.to_string()))
}

/// True for setting names containing PASSWORD, PASSWD, PASSPHRASE, SECRET,
/// TOKEN or KEY as a word (split on `_`, any case): `SSH_KEY`, `API_TOKEN`,
/// `DB_PASSWORD`, but not `KEYBOARD`, `MONKEY` or `SSH_AUTHORIZED_KEYS`.
pub fn is_secret(name: &str) -> bool {
    name.split('_')
        .any(|w| SECRET_WORDS.iter().any(|s| w.eq_ignore_ascii_case(s)))
}

/// The settings fit for `deployment.json` and logs: secrets and the tool's
/// own `DEPLOY_*` entries are dropped.
pub fn redact(settings: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    settings
        .iter()
        .filter(|(k, _)| !is_secret(k) && !k.starts_with(RESERVED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_at(text: &str) -> Result<Config> {
        parse(text, Path::new("/cfg/deploy.toml"), Path::new("/cfg"))
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let msg = format!(
            "{:#}",
            parse_at("size = \"1G\"\nrotfs = \"x\"\n").unwrap_err()
        );
        assert!(msg.contains("rotfs"), "{msg}");
        assert!(msg.contains("/cfg/deploy.toml"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn wrong_type_names_key_and_file() {
        let msg = format!(
            "{:#}",
            parse_at("size = \"1G\"\nkeep = \"three\"\n").unwrap_err()
        );
        assert!(
            msg.contains("`keep`") && msg.contains("/cfg/deploy.toml"),
            "{msg}"
        );
        assert!(msg.contains("line 2"), "{msg}");
        let msg = format!("{:#}", parse_at("boot = \"efi\"\n").unwrap_err());
        assert!(msg.contains("efi") && msg.contains("hybrid"), "{msg}");
        let msg = format!("{:#}", parse_at("wipe = 1\n").unwrap_err());
        assert!(msg.contains("`wipe`") && msg.contains("bool"), "{msg}");
        let msg = format!("{:#}", parse_at("[settings]\nLIST = [1, 2]\n").unwrap_err());
        assert!(msg.contains("LIST") && msg.contains("array"), "{msg}");
        let msg = format!(
            "{:#}",
            parse_at("[settings]\n\"bad-name\" = 1\n").unwrap_err()
        );
        assert!(
            msg.contains("bad-name") && msg.contains("/cfg/deploy.toml"),
            "{msg}"
        );
        let msg = format!("{:#}", parse_at("[settings]\nDEPLOY_X = 1\n").unwrap_err());
        assert!(msg.contains("reserved"), "{msg}");
    }

    #[test]
    fn relative_paths_are_resolved_against_the_file() {
        let cfg = parse_at(
            "rootfs = \"rootfs\"\nkernel = \"/abs/vmlinuz\"\ninitramfs = \"../i.img\"\n\
             extensions_dirs = [\"ext\", \"/opt/ext\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.rootfs.unwrap(), Path::new("/cfg/rootfs"));
        assert_eq!(cfg.kernel.unwrap(), Path::new("/abs/vmlinuz"));
        assert_eq!(cfg.initramfs.unwrap(), Path::new("/cfg/../i.img"));
        assert_eq!(
            cfg.extensions_dirs.unwrap(),
            vec![PathBuf::from("/cfg/ext"), PathBuf::from("/opt/ext")]
        );
    }

    #[test]
    fn load_reads_explicit_file_and_requires_it() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("my.toml");
        std::fs::write(&f, "version = \"v7\"\nrootfs = \"r\"\n").unwrap();
        let (p, cfg) = load(Some(&f)).unwrap().unwrap();
        assert_eq!(p, f);
        assert_eq!(cfg.version.as_deref(), Some("v7"));
        assert_eq!(cfg.rootfs.unwrap(), d.path().join("r"));
        let missing = d.path().join("missing.toml");
        let msg = format!("{:#}", load(Some(&missing)).unwrap_err());
        assert!(msg.contains("missing.toml"), "{msg}");
    }

    #[test]
    fn required_extensions_come_whatever_the_command_line_says() {
        let cfg = parse_at(
            "extensions = [\"a\"]\nrequired_extensions = [\"on-device\"]\ntrial_timeout = 60\n",
        )
        .unwrap();
        assert_eq!(cfg.trial_timeout, Some(60));
        let mut args = DeployArgs::default();
        apply(&mut args, Some(&cfg)).unwrap();
        assert_eq!(args.extensions, vec!["a", "on-device"]);
        let mut args = DeployArgs {
            extensions: vec!["c".into(), "on-device".into()],
            ..Default::default()
        };
        apply(&mut args, Some(&cfg)).unwrap();
        assert_eq!(args.extensions, vec!["c", "on-device"]);
    }

    #[test]
    fn cli_wins_over_config() {
        let cfg = parse_at(
            "rootfs = \"/r\"\nsize = \"2G\"\nversion = \"cfg\"\nkernel_args = \"quiet\"\n\
             wipe = true\nkeep = 3\nextensions = [\"a\", \"b\"]\nextensions_dirs = [\"/e1\"]\n\
             boot = \"hybrid\"\narch = \"arm64\"\n",
        )
        .unwrap();
        let mut args = DeployArgs {
            label: Some("cli".into()),
            extensions_dir: vec![PathBuf::from("/e2")],
            ..Default::default()
        };
        apply(&mut args, Some(&cfg)).unwrap();
        assert_eq!(args.label.as_deref(), Some("cli"));
        assert_eq!(args.rootfs.as_deref(), Some(Path::new("/r")));
        assert_eq!(args.size.as_deref(), Some("2G"));
        assert_eq!(args.kernel_args.as_deref(), Some("quiet"));
        assert!(args.wipe && !args.no_default && !args.checksum);
        assert_eq!(args.boot, Some(crate::cli::BootArg::Hybrid));
        assert_eq!(args.arch.as_deref(), Some("arm64"));
        assert_eq!(args.keep, Some(3));
        assert_eq!(args.extensions, vec!["a", "b"]);
        assert_eq!(
            args.extensions_dir,
            vec![PathBuf::from("/e1"), PathBuf::from("/e2")]
        );

        let mut args = DeployArgs {
            extensions: vec!["c".into()],
            keep: Some(1),
            arch: Some("amd64".into()),
            ..Default::default()
        };
        apply(&mut args, Some(&cfg)).unwrap();
        assert_eq!(args.extensions, vec!["c"]);
        assert_eq!(args.keep, Some(1));
        assert_eq!(args.arch.as_deref(), Some("amd64"));
    }

    #[test]
    fn set_wins_over_config_settings() {
        let cfg =
            parse_at("[settings]\nHOSTNAME = \"cfg\"\nPORT = 22\nON = true\nX = \"x\"\n").unwrap();
        let mut args = DeployArgs {
            set: vec!["HOSTNAME=cli".into(), "EXTRA=a=b".into(), "EMPTY=".into()],
            ..Default::default()
        };
        let s = apply(&mut args, Some(&cfg)).unwrap();
        assert_eq!(s["HOSTNAME"], "cli");
        assert_eq!(s["PORT"], "22");
        assert_eq!(s["ON"], "true");
        assert_eq!(s["X"], "x");
        assert_eq!(s["EXTRA"], "a=b");
        assert_eq!(s["EMPTY"], "");
        assert_eq!(s[CONFIG_DIR_SETTING], "/cfg");
        // Without a config: only --set.
        let s = apply(&mut args, None).unwrap();
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn malformed_set_is_a_usage_error() {
        for bad in [
            "NOEQUALS",
            "=v",
            "1X=v",
            "A-B=v",
            "PATH=/x",
            "DEPLOY_VERSION=x",
        ] {
            let mut args = DeployArgs {
                set: vec![bad.into()],
                ..Default::default()
            };
            let e = apply(&mut args, None).unwrap_err();
            assert!(e.downcast_ref::<UsageError>().is_some(), "{bad}: {e:#}");
            assert!(format!("{e:#}").contains(bad), "{bad}: {e:#}");
        }
    }

    #[test]
    fn settings_that_cannot_reach_an_extension_are_refused() {
        let one = |k: &str, v: String| BTreeMap::from([(k.to_string(), v)]);
        let err = check_setting_values(&one("MOTD", "a\0b".into())).unwrap_err();
        assert!(
            format!("{err:#}").contains("setting MOTD contains a NUL"),
            "{err:#}"
        );
        // NAME=value plus its NUL: 131072 bytes fit, one more does not.
        let fits = "x".repeat(MAX_ARG_STRLEN - "BIG=".len() - 1);
        check_setting_values(&one("BIG", fits.clone())).unwrap();
        let err = check_setting_values(&one("BIG", fits + "x")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("setting BIG is 131068 bytes long"), "{msg}");
        assert!(msg.contains("MAX_ARG_STRLEN"), "{msg}");
        // Many settings that each fit but not together.
        // SAFETY: sysconf has no preconditions.
        let arg_max = unsafe { libc::sysconf(libc::_SC_ARG_MAX) } as usize;
        let many: BTreeMap<String, String> = (0..arg_max / 100_000 + 2)
            .map(|i| (format!("S{i}"), "y".repeat(100_000)))
            .collect();
        let err = check_setting_values(&many).unwrap_err();
        assert!(format!("{err:#}").contains("ARG_MAX"), "{err:#}");
        // From a config file, through apply: refused with the key named.
        let dir = tempfile::tempdir().unwrap();
        let cfg = parse(
            "[settings]\nHOSTNAME = \"a\\u0000b\"\n",
            &dir.path().join("deploy.toml"),
            dir.path(),
        )
        .unwrap();
        let err = apply(&mut DeployArgs::default(), Some(&cfg)).unwrap_err();
        assert!(
            format!("{err:#}").contains("setting HOSTNAME contains a NUL"),
            "{err:#}"
        );
    }

    #[test]
    fn secrets() {
        for s in [
            "SSH_KEY",
            "API_TOKEN",
            "DB_PASSWORD",
            "USERS_PASSWORD_HASH",
            "SECRET",
            "my_secret_value",
            "KEY",
            "WIFI_PASSPHRASE",
        ] {
            assert!(is_secret(s), "{s}");
        }
        for s in [
            "KEYBOARD",
            "MONKEY",
            "HOSTNAME",
            "SSH_AUTHORIZED_KEYS",
            "TOKENS_URL",
            "PASSWORDLESS",
        ] {
            assert!(!is_secret(s), "{s}");
        }
    }

    #[test]
    fn redact_drops_secrets_and_context() {
        let s: BTreeMap<String, String> = [
            ("HOSTNAME", "h"),
            ("DB_PASSWORD", "p"),
            ("API_TOKEN", "t"),
            (CONFIG_DIR_SETTING, "/cfg"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = redact(&s);
        assert_eq!(r.keys().collect::<Vec<_>>(), vec!["HOSTNAME"]);
    }
}
