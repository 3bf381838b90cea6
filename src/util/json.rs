//! Machine-readable output (`--json`, documented in docs/json.md): every
//! object printed carries `"format"`, the version of its shape. A change
//! that removes or renames a field, or changes its meaning, bumps
//! [`FORMAT`]; adding a field does not.

use anyhow::Result;
use serde::Serialize;

/// Version of the JSON shapes printed by `--json`.
pub const FORMAT: u32 = 1;

/// `body`'s fields with `"format"` first.
#[derive(Debug, Serialize)]
pub struct Envelope<'a, T: Serialize> {
    /// Always [`FORMAT`].
    pub format: u32,
    /// The command's own fields.
    #[serde(flatten)]
    pub body: &'a T,
}

/// The JSON text of `body` with the format field.
pub fn to_string<T: Serialize>(body: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(&Envelope {
        format: FORMAT,
        body,
    })?)
}

/// Prints `body` with the format field on stdout. A closed pipe (`| head`)
/// is not an error.
pub fn print<T: Serialize>(body: &T) -> Result<()> {
    use std::io::Write;
    let text = to_string(body)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Body {
        name: &'static str,
        n: u32,
        // Sorts before "format": must still come after it.
        alpha: bool,
    }

    #[test]
    fn format_comes_first_and_fields_follow() {
        let text = to_string(&Body {
            name: "x",
            n: 3,
            alpha: true,
        })
        .unwrap();
        assert!(
            text.trim_start().starts_with("{\n  \"format\": 1,"),
            "{text}"
        );
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split('"').next())
            .collect();
        assert_eq!(keys, ["format", "name", "n", "alpha"], "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"format": 1, "name": "x", "n": 3, "alpha": true})
        );
    }
}
