//! cgroup v1 specifics (V1 and Hybrid hosts): limit files, statistics and the freezer.
//!
//! | limit   | files                                                                 |
//! |---------|-----------------------------------------------------------------------|
//! | memory  | `memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` set equal when swap accounting exists (no swap on top) |
//! | cpus    | `cpu.cfs_period_us` = 100000, `cpu.cfs_quota_us` = cpus × 100000 (≥ 1000) |
//! | pids    | `pids.max`                                                            |
//!
//! Unlimited is `-1` (`max` for pids). Statistics: `memory.usage_in_bytes`,
//! `memory.max_usage_in_bytes`, `memory.limit_in_bytes`, `memory.oom_control` (`oom_kill`),
//! `pids.current`, `pids.max`, `cpuacct.usage` (ns).

use std::path::{Path, PathBuf};

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::limits::{self, CPU_PERIOD_US, Limits};
use crate::stats::{self, Stats};

impl Driver {
    pub(crate) fn apply_v1(&self, name: &str, l: &Limits) -> Result<()> {
        if let Some(dir) = self.limit_dir(name, "memory", "memory_bytes", l.memory_bytes.is_some())? {
            self.v1_memory(&dir, l.memory_bytes)?;
        }
        if let Some(dir) = self.limit_dir(name, "cpu", "cpus", l.cpus.is_some())? {
            self.files.write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            self.files.write(&dir.join("cpu.cfs_quota_us"), &limits::v1::cfs_quota(l.cpus))?;
        }
        if let Some(dir) = self.limit_dir(name, "pids", "pids", l.pids.is_some())? {
            self.files.write(&dir.join("pids.max"), &limits::v1::pids(l.pids))?;
        }
        Ok(())
    }

    /// The directory of `controller`'s hierarchy; a missing hierarchy is an error only when
    /// a limit is asked of it.
    fn limit_dir(
        &self,
        name: &str,
        controller: &'static str,
        field: &'static str,
        wanted: bool,
    ) -> Result<Option<PathBuf>> {
        match self.v1_dir(controller, name) {
            Some(dir) => Ok(Some(dir)),
            None if wanted => Err(Error::ControllerUnavailable { field, controller, name: name.to_owned() }),
            None => Ok(None),
        }
    }

    /// The kernel keeps memory ≤ memory+swap at every step, so a raised limit goes to
    /// `memsw` first and a lowered one to `memory.limit_in_bytes` first.
    fn v1_memory(&self, dir: &Path, limit: Option<u64>) -> Result<()> {
        let memory = dir.join("memory.limit_in_bytes");
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        let value = limits::v1::bytes(limit);
        if !self.files.exists(&memsw) {
            return self.files.write(&memory, &value);
        }
        let current = stats::v1_limit(&memory, &self.files.read(&memory)?)?;
        let order = if raises(limit, current) { [&memsw, &memory] } else { [&memory, &memsw] };
        order.into_iter().try_for_each(|file| self.files.write(file, &value))
    }

    pub(crate) fn stats_v1(&self, name: &str) -> Result<Stats> {
        let mut s = Stats::default();
        if let Some(dir) = self.v1_dir("memory", name) {
            self.v1_memory_stats(&dir, &mut s)?;
        }
        s.oom_kills = self.read_oom_kills(name)?;
        match self.v1_dir("pids", name) {
            Some(dir) => {
                s.pids_current = self.parse(&dir.join("pids.current"), stats::number)?;
                s.pids_limit = self.parse(&dir.join("pids.max"), stats::number_or_max)?;
            }
            None => s.pids_current = self.count_members(name)?,
        }
        s.cpu_usage_usec = self.v1_cpu_usage(name)?;
        Ok(s)
    }

    fn v1_memory_stats(&self, dir: &Path, s: &mut Stats) -> Result<()> {
        s.memory_current = self.parse(&dir.join("memory.usage_in_bytes"), stats::number)?;
        s.memory_peak = Some(self.parse(&dir.join("memory.max_usage_in_bytes"), stats::number)?);
        s.memory_limit = self.parse(&dir.join("memory.limit_in_bytes"), stats::v1_limit)?;
        Ok(())
    }

    /// `cpuacct.usage` (ns), else the cgroup2 `cpu.stat` a Hybrid host keeps without
    /// controllers, else 0.
    fn v1_cpu_usage(&self, name: &str) -> Result<u64> {
        if let Some(dir) = self.v1_dir("cpuacct", name) {
            return Ok(self.parse(&dir.join("cpuacct.usage"), stats::number)? / 1000);
        }
        let Some(dir) = self.v2_dir(name) else { return Ok(0) };
        let usage = |p: &Path, t: &str| stats::keyed(p, t, "usage_usec");
        Ok(self.parse_opt(&dir.join("cpu.stat"), usage)?.unwrap_or(0))
    }

    /// Freezes or thaws through `freezer.state`, waiting until it reads FROZEN or THAWED.
    pub(crate) fn freeze_v1(&self, name: &str, frozen: bool) -> Result<()> {
        let dir = self.v1_dir("freezer", name).ok_or_else(|| Error::Unsupported {
            operation: if frozen { "freeze" } else { "thaw" },
            name: name.to_owned(),
            missing: "the v1 freezer controller",
        })?;
        let state = dir.join("freezer.state");
        let (value, undo) = if frozen { ("FROZEN", Some("THAWED")) } else { ("THAWED", None) };
        self.settle(&state, value, &state, value, undo)
    }

    /// Thaws a frozen v1 freezer cgroup (so killed members can exit); no-op elsewhere.
    pub(crate) fn thaw_v1_freezer(&self, name: &str) -> Result<()> {
        let Some(dir) = self.v1_dir("freezer", name) else { return Ok(()) };
        let state = dir.join("freezer.state");
        match self.files.read_opt(&state)? {
            Some(text) if text.trim() != "THAWED" => self.files.write(&state, "THAWED"),
            _ => Ok(()),
        }
    }
}

/// Whether `new` is above `current` (`None` = unlimited).
fn raises(new: Option<u64>, current: Option<u64>) -> bool {
    match (new, current) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(new), Some(current)) => new > current,
    }
}

#[cfg(test)]
mod tests {
    use super::raises;

    #[test]
    fn raise_or_lower() {
        assert!(raises(None, None));
        assert!(raises(None, Some(1)));
        assert!(!raises(Some(1), None));
        assert!(raises(Some(2), Some(1)));
        assert!(!raises(Some(1), Some(1)));
        assert!(!raises(Some(1), Some(2)));
    }
}
