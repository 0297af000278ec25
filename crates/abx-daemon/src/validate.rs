//! Input validation with messages that name the offending field and value.

use abx_api::{CreateSandbox, Limits};

use crate::error::{CoreError, CoreResult};

fn invalid(msg: String) -> CoreError {
    CoreError::Invalid(msg)
}

/// Sandbox names: 1-64 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn name(n: &str) -> CoreResult<()> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid sandbox name '{n}': use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

/// Environment variable names: non-empty, no '=' or NUL; values without NUL.
pub fn env<'a>(vars: impl IntoIterator<Item = (&'a String, &'a String)>) -> CoreResult<()> {
    for (k, v) in vars {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(format!("invalid environment variable name '{k}'")));
        }
        if v.contains('\0') {
            return Err(invalid(format!("environment variable {k} contains a NUL byte")));
        }
    }
    Ok(())
}

/// Absolute paths inside the sandbox.
pub fn abs_path(field: &str, p: &str) -> CoreResult<()> {
    if !p.starts_with('/') || p.contains('\0') {
        return Err(invalid(format!("{field} must be an absolute path, got '{p}'")));
    }
    Ok(())
}

/// Users: a name, a uid, or uid:gid.
pub fn user(u: &str) -> CoreResult<()> {
    let ok = !u.is_empty() && u.len() <= 64 && u.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if ok { Ok(()) } else { Err(invalid(format!("invalid user '{u}': use a name, a uid or uid:gid"))) }
}

pub fn create(req: &CreateSandbox) -> CoreResult<()> {
    if let Some(n) = &req.name {
        name(n)?;
    }
    env(&req.env)?;
    if let Some(w) = &req.workdir {
        abs_path("workdir", w)?;
    }
    if let Some(u) = &req.user {
        user(u)?;
    }
    if let Some(t) = req.timeout_secs {
        timeout(t)?;
    }
    for (k, v) in &req.metadata {
        if k.is_empty() || k.len() > 128 || v.len() > 4096 {
            return Err(invalid(format!("metadata key '{k}' must be 1-128 bytes and its value at most 4096")));
        }
    }
    Ok(())
}

/// The longest timeout: 100 years.
pub const MAX_TIMEOUT_SECS: u64 = 100 * 365 * 86_400;

/// A create's idempotency key: 1–128 printable ASCII characters.
pub fn idempotency_key(key: &str) -> CoreResult<()> {
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "idempotency key '{}' must be 1-128 printable ASCII characters without spaces",
            key.escape_debug()
        )));
    }
    Ok(())
}

/// A timeout in seconds (0: none).
pub fn timeout(secs: u64) -> CoreResult<()> {
    if secs > MAX_TIMEOUT_SECS {
        return Err(invalid(format!(
            "timeout of {secs} s is more than {MAX_TIMEOUT_SECS} s (100 years); 0 means no timeout"
        )));
    }
    Ok(())
}

/// The longest grace period of a stop: an hour.
pub const MAX_STOP_GRACE_SECS: f64 = 3600.0;

/// A stop's `grace_secs` (`None`: [`crate::lifecycle::STOP_GRACE`]).
pub fn stop_grace(secs: Option<f64>) -> CoreResult<std::time::Duration> {
    match secs {
        None => Ok(crate::lifecycle::STOP_GRACE),
        Some(s) if s.is_finite() && (0.0..=MAX_STOP_GRACE_SECS).contains(&s) => {
            Ok(std::time::Duration::from_secs_f64(s))
        }
        Some(s) => Err(invalid(format!("grace_secs {s} is not a number of seconds from 0 to {MAX_STOP_GRACE_SECS}"))),
    }
}

/// Limits after defaults are applied.
pub fn limits(l: &Limits) -> CoreResult<()> {
    if let Some(m) = l.memory_bytes
        && !(8 << 20..=i64::MAX as u64).contains(&m)
    {
        return Err(invalid(format!("memory limit {m} bytes must be between 8 MiB and 2^63-1 bytes")));
    }
    if let Some(c) = l.cpus
        && !(c.is_finite() && (0.01..=1024.0).contains(&c))
    {
        return Err(invalid(format!("cpu limit {c} must be between 0.01 and 1024")));
    }
    if let Some(p) = l.pids
        && !(8..=4_194_304).contains(&p)
    {
        return Err(invalid(format!("pids limit {p} must be between 8 and 4194304")));
    }
    if let Some(n) = l.open_files
        && !(16..=1 << 20).contains(&n)
    {
        return Err(invalid(format!("open files limit {n} must be between 16 and 1048576")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("agent-42").is_ok());
        assert!(name("").is_err());
        assert!(name("-x").is_err());
        assert!(name("a/b").unwrap_err().to_string().contains("a/b"));
        assert!(name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn limits_name_the_bad_value() {
        let l = Limits { memory_bytes: Some(1024), ..Default::default() };
        assert!(limits(&l).unwrap_err().to_string().contains("1024"));
        // Above what cgroups take: refused here (invalid argument), not at setup.
        let l = Limits { memory_bytes: Some(u64::MAX), ..Default::default() };
        assert!(limits(&l).unwrap_err().to_string().contains("2^63-1"));
        let l = Limits { cpus: Some(f64::NAN), ..Default::default() };
        assert!(limits(&l).is_err());
        let l = Limits { pids: Some(2), ..Default::default() };
        assert!(limits(&l).unwrap_err().to_string().contains("pids"));
        assert!(
            limits(&Limits { memory_bytes: Some(256 << 20), cpus: Some(0.5), pids: Some(128), open_files: Some(1024) })
                .is_ok()
        );
    }

    #[test]
    fn env_and_paths() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("A=B".to_string(), "x".to_string());
        assert!(env(&m).is_err());
        assert!(abs_path("workdir", "rel").is_err());
        assert!(user("1000:1000").is_ok());
        assert!(user("a b").is_err());
    }
}
