//! Validation of instance prefixes and sandbox cgroup names, which become path components.

use crate::error::{Error, Result};

/// Longest accepted sandbox cgroup name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest accepted instance prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 32;
/// Every instance prefix starts with this, so leftovers are easy to find (`leakcheck`).
pub const PREFIX_START: &str = "abx";

/// Checks a sandbox cgroup name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9_.-]`, not `.`
/// or `..` (so it is a single, harmless path component).
pub fn validate_name(name: &str) -> Result<()> {
    problem(name, MAX_NAME_LEN).map_or(Ok(()), |reason| Err(Error::InvalidName { name: name.to_owned(), reason }))
}

/// Checks an instance prefix: like a name, at most [`MAX_PREFIX_LEN`] bytes, starting with
/// [`PREFIX_START`].
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let reason = problem(prefix, MAX_PREFIX_LEN)
        .or_else(|| (!prefix.starts_with(PREFIX_START)).then_some("must start with \"abx\""));
    reason.map_or(Ok(()), |reason| Err(Error::InvalidPrefix { prefix: prefix.to_owned(), reason }))
}

fn problem(s: &str, max: usize) -> Option<&'static str> {
    if s.is_empty() {
        Some("must not be empty")
    } else if s.len() > max {
        Some("is too long")
    } else if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        Some("may only contain A-Z a-z 0-9 _ . -")
    } else if s == "." || s == ".." {
        Some("must not be . or ..")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["abx-1a2b3c4d5e6f", "a", "A_b.c-9", &"x".repeat(MAX_NAME_LEN)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "ä", "a\0", &"x".repeat(MAX_NAME_LEN + 1)] {
            let err = validate_name(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidName { ref name, .. } if name == bad), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(validate_prefix("abx").is_ok());
        assert!(validate_prefix("abxt3f9a").is_ok());
        for bad in ["", "ab", "xabx", "abx/x", &format!("abx{}", "y".repeat(30))] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn message_names_the_value() {
        let err = validate_name("a/b").unwrap_err().to_string();
        assert_eq!(err, "invalid cgroup name \"a/b\": may only contain A-Z a-z 0-9 _ . -");
    }
}
