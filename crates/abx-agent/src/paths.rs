//! Path handling: every path a client names must be absolute; it is normalized lexically
//! (`.` and empty components dropped, `..` removes the previous component and stops at
//! `/`) before use, so error messages and replies show one canonical spelling.

use crate::error::Error;

/// Normalizes an absolute path, e.g. `//a/./b/../c/` → `/a/c`.
pub fn normalize(path: &str) -> Result<String, Error> {
    if !path.starts_with('/') {
        return Err(Error::NotAbsolute(path.to_owned()));
    }
    if path.contains('\0') {
        return Err(Error::Invalid(format!("path contains a NUL byte: {}", path.escape_debug())));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// The last component of a normalized path (`/` for the root).
pub fn file_name(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some((_, "")) | None => "/",
        Some((_, name)) => name,
    }
}

/// The parent of a normalized path (`None` for the root).
pub fn parent(path: &str) -> Option<&str> {
    match path.rsplit_once('/') {
        Some((_, "")) | None => None,
        Some(("", _)) => Some("/"),
        Some((dir, _)) => Some(dir),
    }
}

/// Appends `name` to a normalized directory path.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        let cases = [
            ("/", "/"),
            ("//", "/"),
            ("/a/b/", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../..", "/"),
            ("/a//b/../../c/.", "/c"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn rejects_relative_and_nul() {
        assert_eq!(normalize("a/b").unwrap_err().to_string(), "path must be absolute: a/b");
        assert!(normalize("").is_err());
        assert!(matches!(normalize("/a\0b"), Err(Error::Invalid(_))));
    }

    #[test]
    fn splits_names_and_parents() {
        assert_eq!(file_name("/"), "/");
        assert_eq!(file_name("/a"), "a");
        assert_eq!(file_name("/a/b"), "b");
        assert_eq!(parent("/"), None);
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x"), "/a/x");
    }
}
