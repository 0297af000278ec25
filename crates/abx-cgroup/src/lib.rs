//! One cgroup abstraction for agentbox sandboxes, with drivers for cgroup v1, hybrid and
//! v2 hosts.
//!
//! [`open`] reads `/proc/self/mountinfo`, works out the [`Kind`] of host and returns a
//! [`CgroupDriver`]. Every cgroup lives below an *instance parent* named by the instance
//! prefix (always starting with `abx`, so several daemons and test runs coexist and leftovers
//! are easy to find):
//!
//! | kind   | directories of sandbox `name`                                             |
//! |--------|---------------------------------------------------------------------------|
//! | V1     | `<mount>/<prefix>/<name>` for the memory, cpu, cpuacct, pids and freezer hierarchies |
//! | Hybrid | the same without freezer, plus `<unified>/<prefix>/<name>` on cgroup2    |
//! | V2     | `<cgroup2 mount>/<prefix>/<name>`                                         |
//!
//! What each kind uses:
//!
//! - **limits**, on V1 and Hybrid (`-1`/`max` = unlimited):
//!   memory → `memory.limit_in_bytes`, plus `memory.memsw.limit_in_bytes` set equal where swap
//!   accounting exists (no swap on top; written in the order the kernel accepts: raised limits
//!   to memsw first, lowered ones to memory first); cpus → `cpu.cfs_period_us` 100000 and
//!   `cpu.cfs_quota_us` cpus × 100000 (≥ 1000); pids → `pids.max`.
//! - **limits**, on V2 (`max` = unlimited): `memory.max` plus `memory.swap.max` 0 (where it
//!   exists), `cpu.max` "quota 100000", `pids.max`. The controllers (`+memory +cpu +pids`,
//!   those the root offers) are enabled in the root's and the instance parent's
//!   `cgroup.subtree_control`; the instance parent never holds processes.
//! - **statistics**: v1 `memory.usage_in_bytes`, `memory.max_usage_in_bytes`,
//!   `memory.oom_control` (`oom_kill`), `pids.current`, `cpuacct.usage`; v2 `memory.current`,
//!   `memory.peak`, `memory.events` (`oom_kill`), `pids.current`, `cpu.stat` (`usage_usec`).
//! - **freeze/thaw**: `cgroup.freeze` on cgroup2 (V2 and Hybrid), waiting for
//!   `cgroup.events` to show `frozen 1`/`frozen 0`; `freezer.state` on V1.
//! - **kill**: SIGKILL to every member (pinned by pidfd against pid reuse, a v1 freezer
//!   thawed so frozen members can die) until every hierarchy is empty, then the freeze
//!   cleared (slots reuse cgroups; a freeze that landed during the kill must not catch the
//!   next sandbox at birth). `cgroup.kill` is not
//!   used: once written, every later `clone3(CLONE_INTO_CGROUP)` into that cgroup gets its
//!   child SIGKILLed (seen on Linux 6.18), and agentbox reuses cgroups that way.
//!
//! All calls are synchronous file operations; `freeze`, `thaw` and `kill` wait up to 5 s and
//! `remove` up to 2 s for the kernel, so async callers run them on a blocking thread.
//!
//! A process must be placed in every directory ([`CgroupDriver::procs_files`]) before the
//! sandbox unshares its cgroup namespace.
//!
//! # Testing
//!
//! All file access goes through [`CgroupFs`], so the logic is unit-tested against a fake
//! tree in a temporary directory ([`open_with`] with a hand-made [`Layout`]). The
//! integration tests in `tests/kernel.rs` run against the real kernel as root. The
//! development hosts are Hybrid, whose cgroup2 hierarchy has no controllers: there, the V1
//! and Hybrid limit paths and the cgroup2 freeze/kill paths run on the kernel, while the V2
//! *limit and statistics* logic (memory.max, cpu.max, pids.max, subtree_control delegation)
//! is checked only against the fake tree.
#![forbid(unsafe_code)]

mod driver;
mod error;
pub mod fs;
mod layout;
mod limits;
mod name;
mod signal;
mod stats;
mod v1;
mod v2;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

pub use error::{Error, Result};

/// See [`CgroupDriver::placement`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// cgroup2 directory for `CLONE_INTO_CGROUP`, if the host has cgroup2 in use.
    pub clone_into: Option<PathBuf>,
    /// v1 `tasks` files the new process joins by writing `0`.
    pub self_join: Vec<PathBuf>,
}
pub use fs::{CgroupFs, HostFs};
pub use layout::{Kind, Layout, MOUNTINFO, V1Mount};
pub use limits::{CPU_PERIOD_US, Limits, MAX_CPUS, MAX_MEMORY, MAX_PIDS, MIB, MIN_CPU_QUOTA_US, cpu_quota_us};
pub use name::{MAX_NAME_LEN, MAX_PREFIX_LEN, PREFIX_START, validate_name, validate_prefix};
pub use stats::Stats;

/// The cgroups of one agentbox instance. All methods take the sandbox's cgroup name (see
/// [`validate_name`]) and are safe to call from several threads; the driver keeps no state
/// besides the layout, so it works on cgroups made by an earlier daemon too.
pub trait CgroupDriver: Send + Sync + std::fmt::Debug {
    /// The host layout this driver works with.
    fn kind(&self) -> Kind;

    /// Makes the instance parents if needed, then the sandbox's directory in every hierarchy,
    /// and applies `limits`. On failure every directory made for `name` is removed again
    /// (the instance parents stay). An existing directory is an error ([`Error::Exists`]).
    fn create(&self, name: &str, limits: &Limits) -> Result<()>;

    /// Applies `limits` to an existing cgroup; `None` fields are set to unlimited.
    fn update(&self, name: &str, limits: &Limits) -> Result<()>;

    /// Puts the cgroup's processes in the idle scheduling class towards the other sandboxes
    /// (`cpu.idle`, Linux 5.15+, v1 and v2) or takes them out of it: idle processes run only
    /// when nothing else of the same parent wants the CPU. Returns `Ok(false)` (nothing
    /// written) where the host has no `cpu.idle` or no cpu controller for the cgroup.
    fn set_idle(&self, name: &str, idle: bool) -> Result<bool>;

    /// Resets what can be reset of the statistics for a new occupant: the memory peak on
    /// v1 (`memory.max_usage_in_bytes`). Counters that cannot be reset (OOM kills) are
    /// the caller's to baseline.
    fn reset_stats(&self, name: &str) -> Result<()>;

    /// The `cgroup.procs` files a process must be written to, to be placed in the sandbox's
    /// cgroups: the cgroup2 one first (its directory is the target for `CLONE_INTO_CGROUP`),
    /// then one per v1 hierarchy.
    fn procs_files(&self, name: &str) -> Result<Vec<PathBuf>>;

    /// How a new process is placed without migrating it: the cgroup2 directory to pass to
    /// `clone3(CLONE_INTO_CGROUP)`, and the v1 `tasks` files the new (single-threaded)
    /// process writes `0` to itself, before it leaves the host's credentials. Writing a pid
    /// to `cgroup.procs` instead takes the kernel's global threadgroup lock and waits for an
    /// RCU grace period (several milliseconds per sandbox on this kind of host).
    fn placement(&self, name: &str) -> Result<Placement>;

    /// Moves process `pid` (with its threads) into the sandbox's cgroups.
    fn add_process(&self, name: &str, pid: u32) -> Result<()>;

    /// Freezes every member and waits until the kernel reports the cgroup frozen. On timeout
    /// the cgroup is thawed again and [`Error::Timeout`] returned.
    fn freeze(&self, name: &str) -> Result<()>;

    /// Thaws a frozen cgroup and waits until the kernel reports it thawed.
    fn thaw(&self, name: &str) -> Result<()>;

    /// SIGKILLs every member (also frozen ones) and waits until the cgroups are empty, then
    /// leaves them thawed (a reused cgroup's next member must not be frozen at birth). A
    /// cgroup that does not exist has nothing to kill.
    fn kill(&self, name: &str) -> Result<()>;

    /// Removes the sandbox's directories (and any child cgroups below them) in every
    /// hierarchy; missing ones are fine. `EBUSY` is retried for up to 2 s; call
    /// [`Self::kill`] first.
    fn remove(&self, name: &str) -> Result<()>;

    /// A snapshot of the sandbox's resource use.
    fn stats(&self, name: &str) -> Result<Stats>;

    /// The OOM-kill counter alone ([`Stats::oom_kills`]), one file read: the baseline a
    /// reused cgroup's next occupant is counted from.
    fn oom_kills(&self, name: &str) -> Result<u64> {
        self.stats(name).map(|s| s.oom_kills)
    }

    /// Names of the sandbox cgroups under the instance parent, over all hierarchies, sorted;
    /// after a crash these are the orphans to reconcile.
    fn list(&self) -> Result<Vec<String>>;

    /// Removes the instance parent directories if no sandbox cgroup is left under any of
    /// them: `Ok(true)` when they are gone, `Ok(false)` (nothing removed) while one is.
    /// Must not race with [`Self::create`].
    fn remove_parent(&self) -> Result<bool>;
}

/// Detects the host's layout from [`MOUNTINFO`] and returns its driver for instance `prefix`.
pub fn open(prefix: &str) -> Result<Box<dyn CgroupDriver>> {
    open_with(&Layout::detect()?, prefix, Arc::new(HostFs))
}

/// A driver for an explicit `layout` over the file system `fs` (a fake tree in tests, or a
/// restricted view of the host's layout).
pub fn open_with(layout: &Layout, prefix: &str, fs: Arc<dyn CgroupFs>) -> Result<Box<dyn CgroupDriver>> {
    Ok(Box::new(driver::Driver::new(layout, prefix, fs)?))
}
