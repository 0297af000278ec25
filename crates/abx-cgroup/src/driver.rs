//! The one driver behind [`CgroupDriver`], for all three layouts. What differs per layout
//! (limit files, statistics, freezing) lives in [`crate::v1`] and [`crate::v2`]; this module
//! holds the directory bookkeeping and the operations that work alike everywhere.
//!
//! Directories: every hierarchy in use gets `<mount>/<prefix>/<name>`. On V1 those are the
//! hierarchies carrying memory, cpu, cpuacct, pids and freezer; on Hybrid memory, cpu and pids plus
//! the cgroup2 (unified) hierarchy; on V2 the cgroup2 hierarchy alone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fs::{CgroupFs, Files, RMDIR_TIMEOUT, poll};
use crate::layout::{Kind, Layout, MOUNTINFO, V1_LIMIT_CONTROLLERS, V1Mount};
use crate::limits::Limits;
use crate::name::{validate_name, validate_prefix};
use crate::stats::{self, Stats};
use crate::{CgroupDriver, signal};

/// How long a freeze or thaw may take to settle.
pub(crate) const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long killed members may take to leave the cgroup.
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver; see the module docs.
#[derive(Debug)]
pub(crate) struct Driver {
    pub(crate) kind: Kind,
    pub(crate) files: Files,
    prefix: String,
    /// v1 hierarchies in use, in mountinfo order.
    pub(crate) v1: Vec<V1Mount>,
    /// The cgroup2 mount: the unified hierarchy on Hybrid, the only one on V2.
    v2: Option<PathBuf>,
}

impl Driver {
    pub(crate) fn new(layout: &Layout, prefix: &str, fs: Arc<dyn CgroupFs>) -> Result<Self> {
        validate_prefix(prefix)?;
        let kind = layout.kind().ok_or_else(|| Error::NoHierarchy { path: MOUNTINFO.into() })?;
        let v1 = layout.v1.iter().filter(|m| in_use(kind, m)).cloned().collect();
        let v2 = if kind == Kind::V1 { None } else { layout.v2.clone() };
        Ok(Self { kind, files: Files(fs), prefix: prefix.to_owned(), v1, v2 })
    }

    /// The instance parent directories, cgroup2 first.
    fn parents(&self) -> Vec<PathBuf> {
        let v1 = self.v1.iter().map(|m| &m.path);
        self.v2.iter().chain(v1).map(|mount| mount.join(&self.prefix)).collect()
    }

    /// The sandbox's directories, cgroup2 first.
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(name)).collect()
    }

    /// The sandbox's directory in the v1 hierarchy carrying `controller`.
    pub(crate) fn v1_dir(&self, controller: &str, name: &str) -> Option<PathBuf> {
        let mount = self.v1.iter().find(|m| m.has(controller))?;
        Some(mount.path.join(&self.prefix).join(name))
    }

    /// The sandbox's cgroup2 directory.
    pub(crate) fn v2_dir(&self, name: &str) -> Option<PathBuf> {
        Some(self.v2.as_ref()?.join(&self.prefix).join(name))
    }

    /// Validates `name` and checks that its cgroup exists.
    fn require(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let primary = self.dirs(name).swap_remove(0);
        if self.files.exists(&primary) { Ok(()) } else { Err(Error::NotFound { name: name.to_owned(), path: primary }) }
    }

    /// Makes the instance parents (an existing one is fine) and, on V2, enables the
    /// controllers for their children.
    fn ensure_parents(&self) -> Result<()> {
        for mount in &self.v1 {
            let parent = mount.path.join(&self.prefix);
            self.files.mkdir(&parent, true)?;
            self.init_cpuset(mount, &parent)?;
        }
        match (&self.v2, self.kind) {
            (Some(root), Kind::V2) => self.ensure_v2_parent(root, &root.join(&self.prefix)),
            (Some(root), _) => self.files.mkdir(&root.join(&self.prefix), true),
            (None, _) => Ok(()),
        }
    }

    /// Makes the sandbox's directories, recording each in `made` for [`Self::undo`].
    fn make_dirs(&self, name: &str, made: &mut Vec<PathBuf>) -> Result<()> {
        if let Some(dir) = self.v2_dir(name) {
            self.files.mkdir(&dir, false)?;
            made.push(dir);
        }
        for mount in &self.v1 {
            let dir = mount.path.join(&self.prefix).join(name);
            self.files.mkdir(&dir, false)?;
            made.push(dir.clone());
            self.init_cpuset(mount, &dir)?;
        }
        Ok(())
    }

    /// A new directory in a cpuset hierarchy needs its cpus and mems filled in before it can
    /// take a process (only when cpuset is co-mounted with a controller agentbox uses).
    fn init_cpuset(&self, mount: &V1Mount, dir: &Path) -> Result<()> {
        if !mount.has("cpuset") {
            return Ok(());
        }
        self.inherit(dir, "cpuset.cpus")?;
        self.inherit(dir, "cpuset.mems")
    }

    /// Copies `file` from the parent directory when it is empty in `dir`.
    fn inherit(&self, dir: &Path, file: &str) -> Result<()> {
        let own = dir.join(file);
        if !self.files.read(&own)?.trim().is_empty() {
            return Ok(());
        }
        let parent = dir.parent().unwrap_or(dir).join(file);
        self.files.write(&own, self.files.read(&parent)?.trim())
    }

    /// Best-effort removal of directories made by a failed create, newest first.
    fn undo(&self, made: &[PathBuf]) {
        let deadline = Instant::now() + RMDIR_TIMEOUT;
        for dir in made.iter().rev() {
            if let Err(e) = self.files.remove_tree(dir, deadline) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove half-made cgroup");
            }
        }
    }

    fn apply(&self, name: &str, limits: &Limits) -> Result<()> {
        match self.kind {
            Kind::V2 => self.apply_v2(name, limits),
            Kind::V1 | Kind::Hybrid => self.apply_v1(name, limits),
        }
    }

    /// Pids in the sandbox's cgroups and their descendants, over every hierarchy.
    fn members(&self, name: &str) -> Result<Vec<u32>> {
        let mut all = BTreeSet::new();
        for dir in self.dirs(name) {
            self.collect_pids(&dir, &mut all)?;
        }
        Ok(all.into_iter().collect())
    }

    fn collect_pids(&self, dir: &Path, out: &mut BTreeSet<u32>) -> Result<()> {
        let procs = dir.join("cgroup.procs");
        let Some(text) = self.files.read_opt(&procs)? else { return Ok(()) };
        out.extend(stats::pids(&procs, &text)?);
        for child in self.files.subdirs(dir)? {
            self.collect_pids(&dir.join(child), out)?;
        }
        Ok(())
    }

    /// Number of member processes, for hosts without a pids controller.
    pub(crate) fn count_members(&self, name: &str) -> Result<u64> {
        Ok(self.members(name)?.len() as u64)
    }

    /// SIGKILLs members (pinned by pidfd, see [`signal`]) until none is left, thawing a v1
    /// freezer on the way so that frozen members can die; then leaves the cgroup thawed.
    fn kill_members(&self, name: &str) -> Result<()> {
        if self.v2_unpopulated(name)? {
            return self.unfreeze_empty(name);
        }
        let done = poll(Instant::now() + KILL_TIMEOUT, || {
            let pids = self.members(name)?;
            if pids.is_empty() {
                return Ok(Some(()));
            }
            self.signal_pinned(name, &signal::pin(&pids))?;
            self.thaw_v1_freezer(name)?;
            Ok(None)
        })?;
        let path = self.dirs(name).swap_remove(0).join("cgroup.procs");
        done.ok_or(Error::Timeout { path, expected: "no processes", waited: KILL_TIMEOUT })?;
        self.unfreeze_empty(name)
    }

    /// Clears the freeze of an emptied cgroup. A reused cgroup (agentbox's slots) must not
    /// stay frozen: its next occupant, placed there at birth, would be frozen before it
    /// ran an instruction. A freeze can outlive its sandbox when it lands while the
    /// sandbox is being killed. One read when nothing is frozen; with no member left there
    /// is nothing to wait for.
    fn unfreeze_empty(&self, name: &str) -> Result<()> {
        if let Some(dir) = self.v2_dir(name) {
            let control = dir.join("cgroup.freeze");
            if self.files.read_opt(&control)?.is_some_and(|t| t.trim() == "1") {
                self.files.write(&control, "0")?;
            }
        }
        self.thaw_v1_freezer(name)
    }

    /// The OOM-kill counter: v1 `memory.oom_control` (required where there is a memory
    /// hierarchy), v2 `memory.events` (absent without the memory controller: 0).
    pub(crate) fn read_oom_kills(&self, name: &str) -> Result<u64> {
        let oom = |p: &Path, t: &str| stats::keyed(p, t, "oom_kill");
        match self.kind {
            Kind::V2 => {
                let Some(dir) = self.v2_dir(name) else { return Ok(0) };
                Ok(self.parse_opt(&dir.join("memory.events"), oom)?.unwrap_or(0))
            }
            Kind::V1 | Kind::Hybrid => match self.v1_dir("memory", name) {
                Some(dir) => self.parse(&dir.join("memory.oom_control"), oom),
                None => Ok(0),
            },
        }
    }

    /// Whether the cgroup2 directory reports no live member (`populated 0` in
    /// `cgroup.events`): one read instead of every hierarchy's `cgroup.procs`, for the
    /// common case of a sandbox whose processes are all gone. Every sandbox process is in
    /// the cgroup2 directory (created there by `CLONE_INTO_CGROUP`, or moved there first by
    /// [`CgroupDriver::add_process`]), so nothing is left in the v1 hierarchies either.
    /// `false` where there is no cgroup2 directory or no such file.
    fn v2_unpopulated(&self, name: &str) -> Result<bool> {
        let Some(events) = self.v2_dir(name).map(|d| d.join("cgroup.events")) else { return Ok(false) };
        let populated = |p: &Path, t: &str| stats::keyed(p, t, "populated");
        Ok(self.parse_opt(&events, populated)? == Some(0))
    }

    fn signal_pinned(&self, name: &str, pinned: &[signal::Pinned]) -> Result<()> {
        let still = self.members(name)?;
        for target in pinned.iter().filter(|t| still.contains(&t.pid)) {
            signal::sigkill(target).map_err(|source| Error::Signal {
                pid: target.pid,
                name: name.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    /// Writes `value` to `control` until `status` has a line `expected`, rewriting on every
    /// round (the v1 freezer wants FROZEN written again while it reads FREEZING). On timeout
    /// writes `undo` (best effort) and fails.
    pub(crate) fn settle(
        &self,
        control: &Path,
        value: &str,
        status: &Path,
        expected: &'static str,
        undo: Option<&str>,
    ) -> Result<()> {
        let reached = poll(Instant::now() + FREEZE_TIMEOUT, || {
            self.files.write(control, value)?;
            let text = self.files.read(status)?;
            Ok(text.lines().any(|l| l.trim() == expected).then_some(()))
        })?;
        if reached.is_some() {
            return Ok(());
        }
        if let Some(undo) = undo {
            let _ = self.files.write(control, undo);
        }
        Err(Error::Timeout { path: status.to_owned(), expected, waited: FREEZE_TIMEOUT })
    }

    /// Reads `path` and parses it with `parse`.
    pub(crate) fn parse<T>(&self, path: &Path, parse: impl Fn(&Path, &str) -> Result<T>) -> Result<T> {
        parse(path, &self.files.read(path)?)
    }

    /// Like [`Self::parse`] for a file that may be absent.
    pub(crate) fn parse_opt<T>(&self, path: &Path, parse: impl Fn(&Path, &str) -> Result<T>) -> Result<Option<T>> {
        self.files.read_opt(path)?.map(|text| parse(path, &text)).transpose()
    }

    fn set_frozen(&self, name: &str, frozen: bool) -> Result<()> {
        self.require(name)?;
        match self.v2_dir(name) {
            Some(dir) => self.freeze_v2(name, &dir, frozen),
            None => self.freeze_v1(name, frozen),
        }
    }
}

/// Whether a v1 hierarchy takes part: it carries a limit controller, or it is the freezer
/// on a V1 host (Hybrid freezes through cgroup2).
fn in_use(kind: Kind, mount: &V1Mount) -> bool {
    // On Hybrid, cgroup2's core cpu.stat gives CPU usage, so a hierarchy carrying only
    // cpuacct is not worth a directory per sandbox.
    let limits = |c: &&str| mount.has(c) && !(kind == Kind::Hybrid && *c == "cpuacct");
    V1_LIMIT_CONTROLLERS.iter().any(limits) || (kind == Kind::V1 && mount.has("freezer"))
}

impl CgroupDriver for Driver {
    fn kind(&self) -> Kind {
        self.kind
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<()> {
        validate_name(name)?;
        limits.validate()?;
        self.ensure_parents()?;
        let mut made = Vec::new();
        let result = self.make_dirs(name, &mut made).and_then(|()| self.apply(name, limits));
        if result.is_err() {
            self.undo(&made);
        }
        result
    }

    fn update(&self, name: &str, limits: &Limits) -> Result<()> {
        limits.validate()?;
        self.require(name)?;
        self.apply(name, limits)
    }

    fn set_idle(&self, name: &str, idle: bool) -> Result<bool> {
        validate_name(name)?;
        let dir = match self.kind {
            Kind::V2 => self.v2_dir(name),
            Kind::V1 | Kind::Hybrid => self.v1_dir("cpu", name),
        };
        let Some(file) = dir.map(|d| d.join("cpu.idle")) else { return Ok(false) };
        if !self.files.exists(&file) {
            return Ok(false);
        }
        self.files.write(&file, if idle { "1" } else { "0" })?;
        Ok(true)
    }

    fn procs_files(&self, name: &str) -> Result<Vec<PathBuf>> {
        validate_name(name)?;
        Ok(self.dirs(name).into_iter().map(|d| d.join("cgroup.procs")).collect())
    }

    fn reset_stats(&self, name: &str) -> Result<()> {
        self.require(name)?;
        if let Some(dir) = self.v1_dir("memory", name) {
            let file = dir.join("memory.max_usage_in_bytes");
            if self.files.exists(&file) {
                self.files.write(&file, "0")?;
            }
        }
        Ok(())
    }

    fn placement(&self, name: &str) -> Result<crate::Placement> {
        validate_name(name)?;
        let self_join = self.v1.iter().map(|m| m.path.join(&self.prefix).join(name).join("tasks")).collect();
        Ok(crate::Placement { clone_into: self.v2_dir(name), self_join })
    }

    fn add_process(&self, name: &str, pid: u32) -> Result<()> {
        if pid == 0 {
            return Err(Error::InvalidPid { pid });
        }
        self.require(name)?;
        for file in self.procs_files(name)? {
            self.files.write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    fn freeze(&self, name: &str) -> Result<()> {
        self.set_frozen(name, true)
    }

    fn thaw(&self, name: &str) -> Result<()> {
        self.set_frozen(name, false)
    }

    fn kill(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        // Not `cgroup.kill`: once it has been written, every later
        // `clone3(CLONE_INTO_CGROUP)` into that cgroup gets its child SIGKILLed (seen on
        // Linux 6.18; agentbox reuses cgroups and places processes that way). Members are
        // killed one by one, pinned by pidfd.
        self.kill_members(name)
    }

    fn remove(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let deadline = Instant::now() + RMDIR_TIMEOUT;
        let mut first = None;
        for dir in self.dirs(name) {
            if let Err(e) = self.files.remove_tree(&dir, deadline) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn stats(&self, name: &str) -> Result<Stats> {
        self.require(name)?;
        match self.kind {
            Kind::V2 => self.stats_v2(name),
            Kind::V1 | Kind::Hybrid => self.stats_v1(name),
        }
    }

    fn oom_kills(&self, name: &str) -> Result<u64> {
        self.require(name)?;
        self.read_oom_kills(name)
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut names = BTreeSet::new();
        for parent in self.parents() {
            let children = self.files.subdirs(&parent)?;
            names.extend(children.into_iter().filter(|n| validate_name(n).is_ok()));
        }
        Ok(names.into_iter().collect())
    }

    fn remove_parent(&self) -> Result<bool> {
        for parent in self.parents() {
            if !self.files.subdirs(&parent)?.is_empty() {
                return Ok(false);
            }
        }
        let deadline = Instant::now() + RMDIR_TIMEOUT;
        for parent in self.parents() {
            self.files.remove_tree(&parent, deadline)?;
        }
        Ok(true)
    }
}
