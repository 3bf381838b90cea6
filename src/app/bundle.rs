//! `deploy keygen`, `deploy bundle create`, `deploy bundle info`.

use crate::bundle::create::{self, CreateRequest};
use crate::bundle::format::{self, Manifest};
use crate::bundle::keys;
use crate::cli::BundleCreateArgs;
use crate::util::{ui, units};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// `deploy keygen --output NAME`.
pub fn keygen(name: &Path) -> Result<()> {
    let (sk, pk, id) = keys::keygen(name)?;
    println!("key id {id}");
    println!(
        "secret key: {} (keep it on the build host; mode 0600, not encrypted)",
        sk.display()
    );
    println!(
        "public key: {} (install on devices: --verify-key, or verify_key in deploy.toml)",
        pk.display()
    );
    Ok(())
}

/// `deploy bundle create`.
pub fn create(args: &BundleCreateArgs) -> Result<()> {
    let done = create::create(&CreateRequest {
        source: &args.source,
        label: &args.label,
        base: args.base.as_deref(),
        sign_key: &args.sign_key,
        output: &args.output,
        build: args.build,
        expires_in: args.expires_in.0,
        compress: args.compress == crate::cli::Compression::Zstd,
    })?;
    let m = &done.manifest;
    ui::step(format!(
        "Wrote {} ({} bundle of {}{}, build {}, {} payload, {} file)",
        args.output.display(),
        m.kind(),
        m.label,
        m.base
            .as_ref()
            .map(|b| format!(" against {}", b.label))
            .unwrap_or_default(),
        m.build,
        units::format_size(m.payload.size),
        units::format_size(done.file_size)
    ));
    Ok(())
}

/// `deploy bundle index DIR --sign-key K [--expires-in D]`.
pub fn index(dir: &Path, sign_key: &Path, expires_in: Option<std::time::Duration>) -> Result<()> {
    let idx = crate::bundle::index::write(dir, sign_key, expires_in)?;
    for e in &idx.bundles {
        ui::detail(format!(
            "{} ({} build {}, {}{}, {})",
            e.file,
            e.label,
            e.build,
            if e.base.is_some() {
                "delta against "
            } else {
                "full"
            },
            e.base.as_ref().map(|b| b.label.as_str()).unwrap_or(""),
            units::format_size(e.size)
        ));
    }
    ui::step(format!(
        "Wrote {} and {} ({} bundle{}, expires {}): publish the folder as it is",
        dir.join(crate::bundle::index::INDEX).display(),
        crate::bundle::index::SIGNATURE,
        idx.bundles.len(),
        if idx.bundles.len() == 1 { "" } else { "s" },
        idx.expires.as_deref().unwrap_or("never")
    ));
    Ok(())
}

/// What `bundle info --json` prints.
#[derive(Serialize)]
struct Info {
    file: String,
    file_bytes: u64,
    signed_by_key: Option<String>,
    /// `verified`, `not checked` or `FAILED`.
    signature: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature_error: Option<String>,
    manifest: Option<Manifest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest_error: Option<String>,
    /// Whether the file holds exactly the payload the manifest describes.
    complete: Option<bool>,
}

/// `deploy bundle info FILE [--verify-key KEY] [--json]`. Exit 1 when a
/// given key does not verify the bundle, or the manifest is unreadable.
pub fn info(file: &Path, verify_key: Option<&Path>, json: bool) -> Result<()> {
    let what = format!("bundle {}", file.display());
    let key = verify_key.map(keys::load_public).transpose()?;
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {what}"))?;
    let file_bytes = f.metadata()?.len();
    let head = format::read_head(&mut f, &what)?;
    let signed_by = keys::signature_key_id(&head.signature).ok();
    let (signature, signature_error) = match &key {
        None => ("not checked".to_string(), None),
        Some(k) => match keys::verify(k, &head.manifest, &head.signature) {
            Ok(_) => (
                format!("verified with {} ({})", k.id(), k.path.display()),
                None,
            ),
            Err(e) => ("FAILED".to_string(), Some(format!("{e:#}"))),
        },
    };
    let (manifest, manifest_error) = match Manifest::parse(&head.manifest) {
        Ok(m) => (Some(m), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let complete = manifest
        .as_ref()
        .map(|m| file_bytes == head.len() + m.payload.size);
    let info = Info {
        file: file.display().to_string(),
        file_bytes,
        signed_by_key: signed_by,
        signature,
        signature_error,
        manifest,
        manifest_error,
        complete,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_info(&info);
    }
    if let Some(e) = &info.signature_error {
        bail!("{e}");
    }
    if let Some(e) = &info.manifest_error {
        bail!("{e}");
    }
    Ok(())
}

fn print_info(i: &Info) {
    println!(
        "file:        {} ({})",
        i.file,
        units::format_size(i.file_bytes)
    );
    println!(
        "signed by:   key {}",
        i.signed_by_key
            .as_deref()
            .unwrap_or("(unreadable signature)")
    );
    println!("signature:   {}", i.signature);
    let Some(m) = &i.manifest else { return };
    println!("version:     {}", m.label);
    println!("build:       {}", m.build);
    println!("created:     {}", m.created);
    println!("expires:     {}", m.expires.as_deref().unwrap_or("never"));
    match &m.base {
        Some(b) => println!(
            "kind:        delta against {} (subvolume {})",
            b.label, b.uuid
        ),
        None => println!("kind:        full"),
    }
    println!(
        "kernel:      {}",
        m.kernel_version.as_deref().unwrap_or("-")
    );
    println!("subvolume:   {}", m.subvolume_uuid);
    println!(
        "payload:     {} in {} chunks of {}{}{}",
        units::format_size(m.payload.size),
        m.payload.sha256.len(),
        units::format_size(m.payload.chunk_size),
        match (&m.payload.compression, m.payload.stream_size) {
            (Some(c), Some(n)) => format!(", {c} of a {} send stream", units::format_size(n)),
            (Some(c), None) => format!(", {c}"),
            _ => String::new(),
        },
        match i.complete {
            Some(false) => " (the file's size does not match: truncated or extended)",
            _ => "",
        }
    );
    println!(
        "format:      {} (written by deploy {})",
        m.format, m.tool_version
    );
}
