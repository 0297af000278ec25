//! A fake cgroup tree in a temporary directory that behaves enough like cgroupfs for the
//! driver logic: `mkdir` adds the control files of the hierarchy (for cgroup2 those of the
//! controllers the parent enabled), `rmdir` refuses cgroups with children or members, writes
//! go only to existing files and follow a few kernel rules (subtree_control `+x`, freeze →
//! `cgroup.events`, kill empties `cgroup.procs`, v1 memory ≤ memsw).
//!
//! Hierarchies are the top-level directories: `unified` and `cg2` are cgroup2 (only `cg2`
//! offers controllers), anything else is v1 with the comma-separated controllers in its name.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fs::CgroupFs;
use crate::layout::{Layout, V1Mount};

const V1_UNLIMITED: &str = "9223372036854771712";
const EINVAL: i32 = 22;
const EBUSY: i32 = 16;

#[derive(Debug)]
pub(crate) struct FakeFs {
    dir: tempfile::TempDir,
    /// Every successful write, in order.
    pub(crate) log: Mutex<Vec<(PathBuf, String)>>,
    /// Writes to files with these names fail with EINVAL.
    fail_write: Mutex<Vec<String>>,
    /// mkdir of paths ending in these relative paths fails with EINVAL.
    fail_mkdir: Mutex<Vec<PathBuf>>,
    /// rmdir answers EBUSY this many more times.
    busy: Mutex<u32>,
    /// v1 memory hierarchies have memsw files.
    memsw: bool,
}

impl FakeFs {
    pub(crate) fn new(hierarchies: &[&str], memsw: bool) -> Arc<Self> {
        let fs = Arc::new(Self {
            dir: tempfile::tempdir().unwrap(),
            log: Mutex::default(),
            fail_write: Mutex::default(),
            fail_mkdir: Mutex::default(),
            busy: Mutex::new(0),
            memsw,
        });
        for h in hierarchies {
            fs.make_root(h);
        }
        fs
    }

    pub(crate) fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A layout over this tree: the v2 hierarchy (if any) and v1 mounts in the given order.
    pub(crate) fn layout(&self, hierarchies: &[&str]) -> Layout {
        let (v2, v1): (Vec<&str>, Vec<&str>) = hierarchies.iter().partition(|h| is_v2(h));
        Layout { v1: v1.iter().map(|h| self.v1_mount(h)).collect(), v2: v2.first().map(|h| self.root().join(h)) }
    }

    fn v1_mount(&self, h: &str) -> V1Mount {
        V1Mount { path: self.root().join(h), controllers: h.split(',').map(str::to_owned).collect() }
    }

    pub(crate) fn fail_write(&self, file: &str) {
        self.fail_write.lock().unwrap().push(file.to_owned());
    }

    pub(crate) fn fail_mkdir(&self, rel: &str) {
        self.fail_mkdir.lock().unwrap().push(rel.into());
    }

    pub(crate) fn busy(&self, times: u32) {
        *self.busy.lock().unwrap() = times;
    }

    /// Writes a file directly, as the kernel would update it.
    pub(crate) fn set(&self, rel: &str, content: &str) {
        std::fs::write(self.root().join(rel), content).unwrap();
    }

    /// Removes a control file (a kernel without that feature).
    pub(crate) fn remove_file(&self, rel: &str) {
        std::fs::remove_file(self.root().join(rel)).unwrap();
    }

    pub(crate) fn get(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap()
    }

    pub(crate) fn has(&self, rel: &str) -> bool {
        self.root().join(rel).exists()
    }

    pub(crate) fn writes(&self) -> Vec<(String, String)> {
        let log = self.log.lock().unwrap();
        log.iter().map(|(p, v)| (self.rel(p), v.clone())).collect()
    }

    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(self.root()).unwrap_or(path).to_string_lossy().into_owned()
    }

    fn make_root(&self, h: &str) {
        let dir = self.root().join(h);
        std::fs::create_dir(&dir).unwrap();
        if is_v2(h) {
            let offered = if h == "cg2" { "cpuset cpu io memory hugetlb pids" } else { "hugetlb" };
            self.files(&dir, &[("cgroup.procs", ""), ("cgroup.controllers", offered)]);
            self.files(&dir, &[("cgroup.subtree_control", "")]);
        } else {
            self.populate(&dir, h, "");
            if h.split(',').any(|c| c == "cpuset") {
                self.files(&dir, &[("cpuset.cpus", "0-1\n"), ("cpuset.mems", "0\n")]);
            }
        }
    }

    fn files(&self, dir: &Path, files: &[(&str, &str)]) {
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
    }

    fn hierarchy(&self, path: &Path) -> String {
        let rel = path.strip_prefix(self.root()).unwrap();
        rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned()
    }

    /// The control files a new cgroup gets.
    fn populate(&self, dir: &Path, h: &str, parent_enabled: &str) {
        if is_v2(h) {
            return self.populate_v2(dir, parent_enabled);
        }
        self.files(dir, &[("cgroup.procs", ""), ("tasks", "")]);
        for c in h.split(',') {
            self.files(dir, v1_files(c));
        }
        if self.memsw && h.split(',').any(|c| c == "memory") {
            self.files(dir, &[("memory.memsw.limit_in_bytes", V1_UNLIMITED)]);
        }
    }

    fn populate_v2(&self, dir: &Path, enabled: &str) {
        self.files(
            dir,
            &[
                ("cgroup.procs", ""),
                ("cgroup.freeze", "0\n"),
                ("cgroup.events", "populated 0\nfrozen 0\n"),
                ("cgroup.kill", ""),
                ("cgroup.controllers", enabled),
                ("cgroup.subtree_control", ""),
                ("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"),
            ],
        );
        for c in enabled.split_ascii_whitespace() {
            self.files(dir, v2_files(c));
        }
    }

    /// `1` if the cgroup2 directory `dir` reports members (`cgroup.events`), else `0`.
    fn populated(dir: &Path) -> u8 {
        let events = std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        u8::from(events.contains("populated 1"))
    }

    fn special_write(&self, path: &Path, value: &str) -> io::Result<bool> {
        let name = path.file_name().unwrap().to_string_lossy();
        let dir = path.parent().unwrap();
        match &*name {
            "cgroup.subtree_control" => self.subtree_control(path, value),
            "cgroup.freeze" => {
                std::fs::write(path, value)?;
                let populated = Self::populated(dir);
                let events = format!("populated {populated}\nfrozen {}\n", value.trim());
                std::fs::write(dir.join("cgroup.events"), events)?;
            }
            "cgroup.kill" => std::fs::write(dir.join("cgroup.procs"), "")?,
            "cgroup.procs" => {
                let old = std::fs::read_to_string(path)?;
                std::fs::write(path, format!("{old}{}\n", value.trim()))?;
                // A cgroup2 directory reports its new member, as the kernel does.
                if let Ok(events) = std::fs::read_to_string(dir.join("cgroup.events")) {
                    std::fs::write(dir.join("cgroup.events"), events.replacen("populated 0", "populated 1", 1))?;
                }
            }
            "memory.limit_in_bytes" | "memory.memsw.limit_in_bytes" => self.v1_memory(path, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn subtree_control(&self, path: &Path, value: &str) {
        let offered = std::fs::read_to_string(path.with_file_name("cgroup.controllers")).unwrap();
        let mut set: BTreeSet<String> =
            std::fs::read_to_string(path).unwrap().split_ascii_whitespace().map(str::to_owned).collect();
        for token in value.split_ascii_whitespace() {
            let (op, c) = token.split_at(1);
            assert!(offered.split_ascii_whitespace().any(|o| o == c), "{c} not offered at {path:?}");
            if op == "+" {
                set.insert(c.to_owned())
            } else {
                set.remove(c)
            };
        }
        std::fs::write(path, set.into_iter().collect::<Vec<_>>().join(" ")).unwrap();
    }

    /// The kernel keeps memory.limit_in_bytes ≤ memory.memsw.limit_in_bytes.
    fn v1_memory(&self, path: &Path, value: &str) -> io::Result<()> {
        let v = match value.trim() {
            "-1" => V1_UNLIMITED.parse::<u64>().unwrap(),
            other => other.parse().map_err(|_| io::Error::from_raw_os_error(EINVAL))?,
        };
        let memsw_file = path.with_file_name("memory.memsw.limit_in_bytes");
        if memsw_file.exists() {
            let is_memsw = path == memsw_file;
            let other_file = if is_memsw { path.with_file_name("memory.limit_in_bytes") } else { memsw_file };
            let other: u64 = std::fs::read_to_string(other_file)?.trim().parse().unwrap();
            if (is_memsw && v < other) || (!is_memsw && v > other) {
                return Err(io::Error::from_raw_os_error(EINVAL));
            }
        }
        std::fs::write(path, v.to_string())
    }
}

fn is_v2(h: &str) -> bool {
    h == "unified" || h == "cg2"
}

fn v1_files(controller: &str) -> &'static [(&'static str, &'static str)] {
    match controller {
        "memory" => &[
            ("memory.limit_in_bytes", V1_UNLIMITED),
            ("memory.usage_in_bytes", "0\n"),
            ("memory.max_usage_in_bytes", "0\n"),
            ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"),
        ],
        "cpu" => &[("cpu.cfs_period_us", "100000\n"), ("cpu.cfs_quota_us", "-1\n"), ("cpu.idle", "0\n")],
        "cpuacct" => &[("cpuacct.usage", "0\n")],
        "pids" => &[("pids.current", "0\n"), ("pids.max", "max\n")],
        "freezer" => &[("freezer.state", "THAWED\n")],
        "cpuset" => &[("cpuset.cpus", "\n"), ("cpuset.mems", "\n")],
        _ => &[],
    }
}

fn v2_files(controller: &str) -> &'static [(&'static str, &'static str)] {
    match controller {
        "memory" => &[
            ("memory.max", "max\n"),
            ("memory.swap.max", "max\n"),
            ("memory.current", "0\n"),
            ("memory.peak", "0\n"),
            ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"),
        ],
        "cpu" => &[("cpu.max", "max 100000\n"), ("cpu.idle", "0\n")],
        "pids" => &[("pids.current", "0\n"), ("pids.max", "max\n")],
        _ => &[],
    }
}

impl CgroupFs for FakeFs {
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        if self.fail_mkdir.lock().unwrap().iter().any(|rel| path.ends_with(rel)) {
            return Err(io::Error::from_raw_os_error(EINVAL));
        }
        std::fs::create_dir(path)?;
        let enabled = std::fs::read_to_string(path.with_file_name("cgroup.subtree_control"));
        self.populate(path, &self.hierarchy(path), &enabled.unwrap_or_default());
        Ok(())
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        if !path.is_dir() {
            return Err(io::ErrorKind::NotFound.into());
        }
        let mut busy = self.busy.lock().unwrap();
        let members = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if *busy > 0 || !self.subdirs(path)?.is_empty() || !members.trim().is_empty() {
            *busy = busy.saturating_sub(1);
            return Err(io::Error::from_raw_os_error(EBUSY));
        }
        std::fs::remove_dir_all(path)
    }

    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        if !path.is_file() {
            return Err(io::ErrorKind::NotFound.into());
        }
        let name = path.file_name().unwrap().to_string_lossy();
        if self.fail_write.lock().unwrap().iter().any(|f| *f == name) {
            return Err(io::Error::from_raw_os_error(EINVAL));
        }
        if !self.special_write(path, value)? {
            std::fs::write(path, value)?;
        }
        self.log.lock().unwrap().push((path.to_owned(), value.to_owned()));
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        crate::fs::HostFs.subdirs(path)
    }
}
