//! Resource statistics of a cgroup and the parsers for the control files they come from.

use std::path::Path;

use crate::error::{Error, Result};

/// A snapshot of one sandbox cgroup's usage. Counters a host cannot provide read as 0/`None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Memory in use, bytes (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub memory_current: u64,
    /// Highest memory use seen, bytes (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`
    /// on kernels that have it).
    pub memory_peak: Option<u64>,
    /// Memory limit, bytes; `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// Processes killed by the OOM killer inside this cgroup.
    pub oom_kills: u64,
    /// Processes and threads in the cgroup.
    pub pids_current: u64,
    /// Limit on processes and threads; `None` when unlimited.
    pub pids_limit: Option<u64>,
    /// CPU time used, microseconds (v1 `cpuacct.usage` / 1000, v2 `cpu.stat usage_usec`).
    pub cpu_usage_usec: u64,
}

/// v1 reports "no memory limit" as `PAGE_COUNTER_MAX * PAGE_SIZE` (0x7FFFFFFFFFFFF000 on
/// 4 KiB pages); anything at or above 2^62 is treated as unlimited.
pub(crate) const V1_UNLIMITED: u64 = 1 << 62;

fn bad(path: &Path, content: &str) -> Error {
    Error::Parse { path: path.to_owned(), content: content.to_owned() }
}

/// A file holding one unsigned number.
pub(crate) fn number(path: &Path, content: &str) -> Result<u64> {
    content.trim().parse().map_err(|_| bad(path, content))
}

/// A file holding a number or `max` (unlimited → `None`).
pub(crate) fn number_or_max(path: &Path, content: &str) -> Result<Option<u64>> {
    match content.trim() {
        "max" => Ok(None),
        _ => number(path, content).map(Some),
    }
}

/// A v1 byte limit, where huge values mean unlimited.
pub(crate) fn v1_limit(path: &Path, content: &str) -> Result<Option<u64>> {
    number(path, content).map(|v| (v < V1_UNLIMITED).then_some(v))
}

/// The value of `key` in a flat-keyed file (`key value` per line, as in `memory.events`,
/// `cpu.stat`, v1 `memory.oom_control`); a missing key (older kernel) reads as 0.
pub(crate) fn keyed(path: &Path, content: &str, key: &str) -> Result<u64> {
    let line = content.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' '));
    line.map_or(Ok(0), |v| v.trim().parse().map_err(|_| bad(path, content)))
}

/// The pids listed in a `cgroup.procs` file.
pub(crate) fn pids(path: &Path, content: &str) -> Result<Vec<u32>> {
    content.split_ascii_whitespace().map(|p| p.parse().map_err(|_| bad(path, content))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/x";

    #[test]
    fn numbers() {
        let p = Path::new(P);
        assert_eq!(number(p, "42\n").unwrap(), 42);
        assert!(matches!(number(p, "4 2"), Err(Error::Parse { content, .. }) if content == "4 2"));
        assert_eq!(number_or_max(p, "max\n").unwrap(), None);
        assert_eq!(number_or_max(p, "64\n").unwrap(), Some(64));
        assert!(number_or_max(p, "-1").is_err());
        assert_eq!(v1_limit(p, "9223372036854771712\n").unwrap(), None);
        assert_eq!(v1_limit(p, "33554432\n").unwrap(), Some(32 << 20));
    }

    #[test]
    fn keyed_files() {
        let p = Path::new(P);
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(p, oom_control, "oom_kill").unwrap(), 3);
        assert_eq!(keyed(p, oom_control, "oom_kill_disable").unwrap(), 0);
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(p, events, "oom_kill").unwrap(), 1);
        assert_eq!(keyed(p, events, "oom").unwrap(), 2);
        let cpu_stat = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n";
        assert_eq!(keyed(p, cpu_stat, "usage_usec").unwrap(), 123_456);
        assert_eq!(keyed(p, "oom_kill_disable 0\nunder_oom 0\n", "oom_kill").unwrap(), 0);
        assert!(keyed(p, "oom_kill x\n", "oom_kill").is_err());
    }

    #[test]
    fn procs() {
        let p = Path::new(P);
        assert_eq!(pids(p, "12\n345\n").unwrap(), [12, 345]);
        assert!(pids(p, "").unwrap().is_empty());
        assert!(pids(p, "12\nx\n").is_err());
    }
}
