//! Resource limits, their validation, and the values written to v1 and v2 control files.

use crate::error::{Error, Result};

/// One MiB, the smallest accepted memory limit.
pub const MIB: u64 = 1 << 20;
/// The CFS period agentbox uses, in microseconds (v1 `cpu.cfs_period_us`, v2 `cpu.max`).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest CFS quota the kernel accepts, in microseconds.
pub const MIN_CPU_QUOTA_US: u64 = 1_000;
/// Largest accepted `cpus` (far above any machine, far below the kernel's quota bound).
pub const MAX_CPUS: f64 = 65_536.0;
/// Largest accepted `pids` (the kernel's `PID_MAX_LIMIT`).
pub const MAX_PIDS: u64 = 4 * 1024 * 1024;
/// Largest accepted memory limit (`i64::MAX`; larger values overflow the kernel's parsing).
pub const MAX_MEMORY: u64 = i64::MAX as u64;

/// Resource limits of one sandbox cgroup; `None` means unlimited ("max").
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Memory (RAM) in bytes; swap is not allowed on top where the host can forbid it.
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in CPUs (1.5 = one and a half CPUs' worth of time per period).
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
}

impl Limits {
    /// Checks that every set limit is in range: memory ≥ 1 MiB, 0 < cpus ≤ [`MAX_CPUS`]
    /// (finite), 1 ≤ pids ≤ [`MAX_PIDS`].
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = self.memory_bytes {
            check("memory_bytes", m, (MIB..=MAX_MEMORY).contains(&m), "must be between 1 MiB and 2^63-1 bytes")?;
        }
        if let Some(c) = self.cpus {
            check("cpus", c, c.is_finite() && c > 0.0 && c <= MAX_CPUS, "must be a number above 0 and at most 65536")?;
        }
        if let Some(p) = self.pids {
            check("pids", p, (1..=MAX_PIDS).contains(&p), "must be between 1 and 4194304")?;
        }
        Ok(())
    }
}

fn check(field: &'static str, value: impl ToString, ok: bool, reason: &'static str) -> Result<()> {
    if ok { Ok(()) } else { Err(Error::InvalidLimit { field, value: value.to_string(), reason }) }
}

/// The CFS quota for `cpus`, in microseconds per [`CPU_PERIOD_US`], at least
/// [`MIN_CPU_QUOTA_US`].
pub fn cpu_quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(MIN_CPU_QUOTA_US)
}

/// Values for v1 control files, where `-1` means unlimited.
pub(crate) mod v1 {
    use super::cpu_quota_us;

    pub(crate) fn bytes(limit: Option<u64>) -> String {
        limit.map_or_else(|| "-1".to_owned(), |b| b.to_string())
    }

    pub(crate) fn cfs_quota(cpus: Option<f64>) -> String {
        cpus.map_or_else(|| "-1".to_owned(), |c| cpu_quota_us(c).to_string())
    }

    /// `pids.max` speaks "max" on v1 too.
    pub(crate) fn pids(limit: Option<u64>) -> String {
        super::v2::max(limit)
    }
}

/// Values for v2 control files, where `max` means unlimited.
pub(crate) mod v2 {
    use super::{CPU_PERIOD_US, cpu_quota_us};

    pub(crate) fn max(limit: Option<u64>) -> String {
        limit.map_or_else(|| "max".to_owned(), |v| v.to_string())
    }

    /// `cpu.max`: "quota period".
    pub(crate) fn cpu_max(cpus: Option<f64>) -> String {
        let quota = cpus.map_or_else(|| "max".to_owned(), |c| cpu_quota_us(c).to_string());
        format!("{quota} {CPU_PERIOD_US}")
    }

    /// `memory.swap.max`: no swap on top of a memory limit, unlimited without one.
    pub(crate) fn swap_max(memory: Option<u64>) -> &'static str {
        if memory.is_some() { "0" } else { "max" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_field(limits: Limits) -> (&'static str, String) {
        match limits.validate().unwrap_err() {
            Error::InvalidLimit { field, value, .. } => (field, value),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn validation() {
        assert!(Limits::default().validate().is_ok());
        let ok = Limits { memory_bytes: Some(MIB), cpus: Some(0.01), pids: Some(1) };
        assert!(ok.validate().is_ok());
        assert_eq!(err_field(Limits { memory_bytes: Some(MIB - 1), ..ok }), ("memory_bytes", "1048575".into()));
        assert_eq!(err_field(Limits { cpus: Some(0.0), ..ok }), ("cpus", "0".into()));
        assert_eq!(err_field(Limits { cpus: Some(-1.5), ..ok }), ("cpus", "-1.5".into()));
        assert_eq!(err_field(Limits { cpus: Some(f64::NAN), ..ok }).0, "cpus");
        assert_eq!(err_field(Limits { cpus: Some(f64::INFINITY), ..ok }).0, "cpus");
        assert_eq!(err_field(Limits { pids: Some(0), ..ok }), ("pids", "0".into()));
        assert_eq!(err_field(Limits { pids: Some(MAX_PIDS + 1), ..ok }).0, "pids");
    }

    #[test]
    fn message_names_field_and_value() {
        let err = Limits { pids: Some(0), ..Limits::default() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid limit pids = 0: must be between 1 and 4194304");
    }

    #[test]
    fn cpu_quota() {
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(2.25), 225_000);
        assert_eq!(cpu_quota_us(0.001), MIN_CPU_QUOTA_US);
        assert_eq!(v2::cpu_max(Some(1.5)), "150000 100000");
        assert_eq!(v2::cpu_max(None), "max 100000");
        assert_eq!(v1::cfs_quota(None), "-1");
        assert_eq!(v1::cfs_quota(Some(0.25)), "25000");
    }

    #[test]
    fn unlimited_values() {
        assert_eq!(v1::bytes(None), "-1");
        assert_eq!(v1::bytes(Some(MIB)), "1048576");
        assert_eq!(v1::pids(None), "max");
        assert_eq!(v2::max(Some(7)), "7");
        assert_eq!(v2::swap_max(Some(MIB)), "0");
        assert_eq!(v2::swap_max(None), "max");
    }
}
