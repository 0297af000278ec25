//! Validation of template names and layer digests (both end up as file names).

use crate::error::{Error, Result};

/// Longest template name.
pub const MAX_NAME_LEN: usize = 63;

/// Longest tag (the part after `:`).
pub const MAX_TAG_LEN: usize = 64;

/// Checks a template name: `NAME` or `NAME:TAG`, NAME `[a-z0-9][a-z0-9._-]{0,62}`, TAG
/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,63}` (a version of the template kept under its own name).
pub fn validate_name(name: &str) -> Result<()> {
    let Some((base, tag)) = name.split_once(':') else { return validate_base(name) };
    validate_base(base).map_err(|e| match e {
        Error::InvalidName { reason, .. } => Error::InvalidName { name: name.to_string(), reason },
        e => e,
    })?;
    let invalid = |reason| Err(Error::InvalidName { name: name.to_string(), reason });
    let Some(first) = tag.bytes().next() else {
        return invalid("its tag (after ':') is empty");
    };
    if tag.len() > MAX_TAG_LEN {
        return invalid("its tag is longer than 64 characters");
    }
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return invalid("its tag must start with a letter, a digit or '_'");
    }
    if !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return invalid("its tag may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn validate_base(name: &str) -> Result<()> {
    let invalid = |reason| Err(Error::InvalidName { name: name.to_string(), reason });
    let Some(first) = name.bytes().next() else {
        return invalid("it is empty");
    };
    if name.len() > MAX_NAME_LEN {
        return invalid("it is longer than 63 characters");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return invalid("it must start with a lowercase letter or a digit");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
        return invalid("only lowercase letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Checks that `digest` looks like `sha256-<64 lowercase hex digits>`.
pub fn validate_digest(digest: &str) -> Result<()> {
    let hex = digest.strip_prefix("sha256-").unwrap_or("");
    let ok = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok { Ok(()) } else { Err(Error::InvalidDigest { digest: digest.to_string() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in ["base", "mini", "0", "a.b_c-d", "python3.12", &"a".repeat(63), "app:v1", "app:Release_2.1"] {
            validate_name(name).unwrap();
        }
    }

    #[test]
    fn rejects_invalid_names() {
        let long = "a".repeat(64);
        for name in [
            "",
            "Base",
            "-x",
            ".x",
            "_x",
            "a/b",
            "..",
            "a b",
            "é",
            "a\0",
            long.as_str(),
            "a:",
            "a:b:c",
            "a:.x",
            ":x",
            "a:b/c",
        ] {
            let err = validate_name(name).unwrap_err();
            assert!(err.to_string().contains(&format!("'{name}'")), "{err}");
        }
    }

    #[test]
    fn digests() {
        validate_digest(&format!("sha256-{}", "0a".repeat(32))).unwrap();
        for bad in ["", "sha256-", "sha256-../../etc", &format!("sha256-{}", "0A".repeat(32))] {
            assert!(validate_digest(bad).is_err(), "{bad}");
        }
    }
}
