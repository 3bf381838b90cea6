//! Sizes (`512M`, `4GiB`, `1.5G`) and version labels.

use anyhow::{bail, Result};

/// The forms [`parse_size`] accepts, quoted in its error messages.
const SIZE_FORMS: &str = "use a whole number of bytes (1048576) or a number with a \
    binary unit K, M, G or T, optionally followed by iB or B (512M, 4G, 4GiB, 1.5G, 100K)";

/// Longest label accepted by [`validate_label`].
pub const MAX_LABEL_LEN: usize = 64;

/// Label that can never be used: `systems/default` is the default symlink.
pub const RESERVED_LABEL: &str = "default";

/// Parses a size: a number of bytes (`1048576`) or a number, possibly with a
/// fraction, followed by a case-insensitive binary unit `K`, `M`, `G` or `T`
/// and an optional `iB`/`B` (`512M`, `4GiB`, `1.5g`, `100KB`). A plain `B` is
/// bytes. Fractions of a byte are dropped. Zero, negative, malformed, unknown
/// unit and values above `u64::MAX` are errors naming the input.
pub fn parse_size(s: &str) -> Result<u64> {
    let input = s.trim();
    if input.is_empty() {
        bail!("invalid size {s:?}: it is empty; {SIZE_FORMS}");
    }
    if input.starts_with('-') {
        bail!("invalid size {s:?}: a size cannot be negative; {SIZE_FORMS}");
    }
    let split = input
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(input.len());
    let (number, unit) = input.split_at(split);
    let multiplier = match unit_multiplier(unit.trim_start()) {
        Some(m) => m,
        None => bail!(
            "invalid size {s:?}: unknown unit {:?}; {SIZE_FORMS}",
            unit.trim_start()
        ),
    };
    let bytes = scaled_bytes(s, number, multiplier)?;
    if bytes == 0 {
        bail!("invalid size {s:?}: a size must be larger than zero; {SIZE_FORMS}");
    }
    Ok(bytes)
}

/// The multiplier for a unit suffix, `None` when unknown.
fn unit_multiplier(unit: &str) -> Option<u64> {
    let lower = unit.to_ascii_lowercase();
    let (prefix, rest) = match lower.char_indices().nth(1) {
        Some((i, _)) => lower.split_at(i),
        None => (lower.as_str(), ""),
    };
    let exponent = match prefix {
        "" => return Some(1),
        "b" if rest.is_empty() => return Some(1),
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        _ => return None,
    };
    matches!(rest, "" | "b" | "ib").then(|| 1u64 << (10 * exponent))
}

/// `number` (digits with an optional fraction) times `multiplier`, checked.
fn scaled_bytes(s: &str, number: &str, multiplier: u64) -> Result<u64> {
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    if int_part.is_empty() || frac_part.is_some_and(|f| f.is_empty() || f.contains('.')) {
        bail!("invalid size {s:?}: {number:?} is not a number; {SIZE_FORMS}");
    }
    let frac = frac_part.unwrap_or("");
    if !frac.is_empty() && multiplier == 1 {
        bail!("invalid size {s:?}: a number of bytes must be whole; {SIZE_FORMS}");
    }
    if frac.len() > 18 {
        bail!("invalid size {s:?}: too many decimals; {SIZE_FORMS}");
    }
    let too_large = || {
        anyhow::anyhow!(
            "invalid size {s:?}: too large (more than {} bytes)",
            u64::MAX
        )
    };
    let int: u128 = int_part.parse().map_err(|_| too_large())?;
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| too_large())?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let total = int
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_value))
        .and_then(|v| v.checked_mul(u128::from(multiplier)))
        .ok_or_else(too_large)?
        / scale;
    u64::try_from(total).map_err(|_| too_large())
}

/// Formats a size with binary units and at most two decimals: `512 B`,
/// `100 KiB`, `1.5 GiB`, `1.07 MiB`, `2 TiB`.
pub fn format_size(bytes: u64) -> String {
    // indicatif's binary units, two decimals; trailing zeros dropped
    // ("1.50 GiB" -> "1.5 GiB", "4.00 GiB" -> "4 GiB").
    let s = indicatif::HumanBytes(bytes).to_string();
    match s.split_once(' ') {
        Some((num, unit)) if num.contains('.') => {
            format!("{} {unit}", num.trim_end_matches('0').trim_end_matches('.'))
        }
        _ => s,
    }
}

/// Checks a version label: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` and never
/// `default`. The error says what is wrong and what is allowed.
pub fn validate_label(s: &str) -> Result<()> {
    const ALLOWED: &str = "a label is 1 to 64 characters: letters, digits, '.', '_' and '-', \
        starting with a letter or digit";
    let Some(first) = s.chars().next() else {
        bail!("invalid label \"\": it is empty; {ALLOWED}");
    };
    if s == RESERVED_LABEL {
        bail!("invalid label {s:?}: it is reserved (systems/default is the link to the default version)");
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        bail!("invalid label {s:?}: it contains {bad:?}; {ALLOWED}");
    }
    if !first.is_ascii_alphanumeric() {
        bail!("invalid label {s:?}: it starts with {first:?}; {ALLOWED}");
    }
    if s.len() > MAX_LABEL_LEN {
        bail!(
            "invalid label {s:?}: it is {} characters long; {ALLOWED}",
            s.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    const TIB: u64 = 1024 * GIB;

    #[test]
    fn sizes_accepted() {
        let cases = [
            ("1048576", MIB),
            ("1", 1),
            ("512M", 512 * MIB),
            ("4G", 4 * GIB),
            ("4GiB", 4 * GIB),
            ("4gib", 4 * GIB),
            ("4GB", 4 * GIB),
            ("4g", 4 * GIB),
            ("2T", 2 * TIB),
            ("2TiB", 2 * TIB),
            ("100K", 100 * KIB),
            ("100kb", 100 * KIB),
            ("100KiB", 100 * KIB),
            ("1.5G", 3 * GIB / 2),
            ("0.5M", MIB / 2),
            ("512B", 512),
            ("512b", 512),
            (" 4 GiB ", 4 * GIB),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input).unwrap(), want, "{input}");
        }
        assert_eq!(parse_size("0.1K").unwrap(), 102); // fraction of a byte dropped
        assert_eq!(parse_size("16777215T").unwrap(), 16_777_215 * TIB);
    }

    fn size_err(input: &str) -> String {
        format!("{:#}", parse_size(input).unwrap_err())
    }

    #[test]
    fn sizes_rejected_with_reason() {
        for (input, reason) in [
            ("0", "larger than zero"),
            ("0G", "larger than zero"),
            ("0.0000000001K", "larger than zero"),
            ("-1G", "negative"),
            ("-5", "negative"),
            ("1Q", "unknown unit \"Q\""),
            ("4GG", "unknown unit"),
            ("4Gi", "unknown unit"),
            ("4iB", "unknown unit"),
            ("G", "not a number"),
            ("", "empty"),
            ("   ", "empty"),
            ("1.5", "whole"),
            ("1.G", "not a number"),
            (".5G", "not a number"),
            ("1.2.3G", "not a number"),
            ("18446744073709551616", "too large"),
            ("16777216T", "too large"),
            ("99999999999999999999999999999999999999999T", "too large"),
            ("1e9", "unknown unit"),
        ] {
            let msg = size_err(input);
            assert!(msg.contains(reason), "{input:?}: {msg}");
            assert!(msg.contains(&format!("{input:?}")), "{input:?}: {msg}");
        }
        assert!(
            size_err("1Q").contains("512M"),
            "message lists accepted forms"
        );
    }

    #[test]
    fn max_size() {
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
    }

    #[test]
    fn format_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1100 * KIB), "1.07 MiB");
        assert_eq!(format_size(KIB), "1 KiB");
        assert_eq!(format_size(100 * KIB), "100 KiB");
        assert_eq!(format_size(3 * GIB / 2), "1.5 GiB");
        assert_eq!(format_size(4 * GIB), "4 GiB");
        assert_eq!(format_size(2 * TIB), "2 TiB");
        assert_eq!(format_size(MIB - 1), "1024 KiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
        assert_eq!(format_size(parse_size("2.3G").unwrap()), "2.3 GiB");
    }

    fn label_err(label: &str) -> String {
        format!("{:#}", validate_label(label).unwrap_err())
    }

    #[test]
    fn labels_accepted() {
        for label in [
            "factory",
            "v1",
            "2024-05-01",
            "a.b_c-d",
            "A",
            "9",
            &"x".repeat(64),
        ] {
            validate_label(label).unwrap_or_else(|e| panic!("{label}: {e:#}"));
        }
        validate_label("Default").unwrap(); // only the exact name is reserved
        validate_label("default2").unwrap();
    }

    #[test]
    fn labels_rejected_with_reason() {
        for (label, reason) in [
            ("", "empty"),
            ("default", "reserved"),
            ("../x", "contains '/'"),
            ("a/b", "contains '/'"),
            ("..", "starts with '.'"),
            (".hidden", "starts with '.'"),
            ("-x", "starts with '-'"),
            ("_x", "starts with '_'"),
            ("a b", "contains ' '"),
            ("é", "contains 'é'"),
            ("a\nb", "contains '\\n'"),
        ] {
            let msg = label_err(label);
            assert!(msg.contains(reason), "{label:?}: {msg}");
        }
        let long = "x".repeat(65);
        assert!(label_err(&long).contains("65 characters"));
        assert!(label_err("a/b").contains("letters, digits"));
    }
}
