//! cgroup v2 specifics: controller delegation, limit files, statistics, and the freezer that
//! V2 and Hybrid hosts share.
//!
//! | limit   | files                                                      |
//! |---------|------------------------------------------------------------|
//! | memory  | `memory.max`, and `memory.swap.max` = 0 when it exists (`max` without a limit) |
//! | cpus    | `cpu.max` = "quota 100000" (quota ≥ 1000, `max` unlimited) |
//! | pids    | `pids.max`                                                 |
//!
//! Statistics: `memory.current`, `memory.peak` (Linux 5.19+), `memory.max`,
//! `memory.events` (`oom_kill`), `pids.current`, `pids.max`, `cpu.stat` (`usage_usec`).
//! Controllers are enabled with `+memory +cpu +pids` (those the root offers) in the root's and
//! the instance parent's `cgroup.subtree_control`; neither may then hold processes, which
//! holds for the real root and for the instance parent (agentbox never puts one there).

use std::path::Path;

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::limits::{self, Limits};
use crate::stats::{self, Stats};

/// The v2 controllers agentbox enables for its cgroups.
pub(crate) const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

impl Driver {
    /// Enables the controllers in `root`, makes `parent`, and enables them in `parent`.
    pub(crate) fn ensure_v2_parent(&self, root: &Path, parent: &Path) -> Result<()> {
        self.enable_controllers(root)?;
        self.files.mkdir(parent, true)?;
        self.enable_controllers(parent)
    }

    /// Writes `+controller` to `dir/cgroup.subtree_control` for each of [`V2_CONTROLLERS`]
    /// that `dir` offers and has not enabled yet (one write per controller, so an error
    /// names the one refused).
    fn enable_controllers(&self, dir: &Path) -> Result<()> {
        let offered = self.files.read(&dir.join("cgroup.controllers"))?;
        let control = dir.join("cgroup.subtree_control");
        let enabled = self.files.read(&control)?;
        let has = |text: &str, c: &str| text.split_ascii_whitespace().any(|w| w == c);
        for c in V2_CONTROLLERS.iter().filter(|c| has(&offered, c) && !has(&enabled, c)) {
            self.files.write(&control, &format!("+{c}"))?;
        }
        Ok(())
    }

    pub(crate) fn apply_v2(&self, name: &str, limits: &Limits) -> Result<()> {
        let dir = self.v2_dir(name).unwrap_or_default();
        let memory = limits.memory_bytes;
        self.write_v2(name, &dir, "memory.max", "memory_bytes", memory.is_some(), &limits::v2::max(memory))?;
        let swap = dir.join("memory.swap.max");
        if self.files.exists(&swap) {
            self.files.write(&swap, limits::v2::swap_max(memory))?;
        }
        let cpu = limits::v2::cpu_max(limits.cpus);
        self.write_v2(name, &dir, "cpu.max", "cpus", limits.cpus.is_some(), &cpu)?;
        self.write_v2(name, &dir, "pids.max", "pids", limits.pids.is_some(), &limits::v2::max(limits.pids))
    }

    /// Writes `value` to `dir/file`. A missing file means the controller is not enabled:
    /// an error when a limit is asked of it, nothing to do for "unlimited".
    fn write_v2(
        &self,
        name: &str,
        dir: &Path,
        file: &str,
        field: &'static str,
        wanted: bool,
        value: &str,
    ) -> Result<()> {
        let path = dir.join(file);
        match (self.files.exists(&path), wanted) {
            (true, _) => self.files.write(&path, value),
            (false, true) => {
                Err(Error::ControllerUnavailable { field, controller: controller_of(file), name: name.to_owned() })
            }
            (false, false) => Ok(()),
        }
    }

    pub(crate) fn stats_v2(&self, name: &str) -> Result<Stats> {
        let dir = self.v2_dir(name).unwrap_or_default();
        let f = |file: &str| dir.join(file);
        let key = |key: &'static str| move |p: &Path, t: &str| stats::keyed(p, t, key);
        Ok(Stats {
            memory_current: self.parse_opt(&f("memory.current"), stats::number)?.unwrap_or(0),
            memory_peak: self.parse_opt(&f("memory.peak"), stats::number)?,
            memory_limit: self.parse_opt(&f("memory.max"), stats::number_or_max)?.flatten(),
            oom_kills: self.read_oom_kills(name)?,
            pids_current: match self.parse_opt(&f("pids.current"), stats::number)? {
                Some(n) => n,
                None => self.count_members(name)?,
            },
            pids_limit: self.parse_opt(&f("pids.max"), stats::number_or_max)?.flatten(),
            cpu_usage_usec: self.parse_opt(&f("cpu.stat"), key("usage_usec"))?.unwrap_or(0),
        })
    }

    /// Freezes or thaws through `cgroup.freeze`, waiting until `cgroup.events` shows it.
    pub(crate) fn freeze_v2(&self, name: &str, dir: &Path, frozen: bool) -> Result<()> {
        let control = dir.join("cgroup.freeze");
        if !self.files.exists(&control) {
            return Err(Error::Unsupported {
                operation: if frozen { "freeze" } else { "thaw" },
                name: name.to_owned(),
                missing: "cgroup.freeze (Linux 5.2)",
            });
        }
        let events = dir.join("cgroup.events");
        if frozen {
            self.settle(&control, "1", &events, "frozen 1", Some("0"))
        } else {
            self.settle(&control, "0", &events, "frozen 0", None)
        }
    }
}

fn controller_of(file: &str) -> &'static str {
    V2_CONTROLLERS.into_iter().find(|c| file.starts_with(c)).unwrap_or("unknown")
}
