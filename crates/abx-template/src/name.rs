//! Validation of template names and layer digests (both end up as file names).

use crate::error::{Error, Result};

/// Longest template name.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a template name against `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_name(name: &str) -> Result<()> {
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
        for name in ["base", "mini", "0", "a.b_c-d", "python3.12", &"a".repeat(63)] {
            validate_name(name).unwrap();
        }
    }

    #[test]
    fn rejects_invalid_names() {
        let long = "a".repeat(64);
        for name in ["", "Base", "-x", ".x", "_x", "a/b", "..", "a b", "é", "a\0", long.as_str()] {
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
