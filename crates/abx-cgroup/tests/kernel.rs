//! Real-kernel tests: they create cgroups under a unique `abxtcg…` prefix, so they need root;
//! without it (or without cgroups) each test prints a note and passes.
//!
//! Everything made is undone by guards, also when an assertion fails: [`Cgroups`] kills the
//! members, removes the cgroups and the instance parent; [`Children`] (declared first, so
//! dropped last) SIGKILLs and reaps the test's own child processes by pid.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use abx_cgroup::{CgroupDriver, Error, HostFs, Kind, Layout, Limits, MIB, open, open_with};

/// A fresh instance prefix per test.
fn prefix(test: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    let tag: String = test.chars().filter(char::is_ascii_alphanumeric).take(6).collect();
    format!("abxtcg{tag}{:x}{nanos:x}", std::process::id())
}

/// `None` (with a printed note) when these tests cannot run here.
fn host_layout(test: &str) -> Option<Layout> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("note: skipping {test}: needs root to create cgroups");
        return None;
    }
    let layout = Layout::detect().unwrap();
    if layout.kind().is_none() {
        eprintln!("note: skipping {test}: no cgroup hierarchy mounted");
        return None;
    }
    Some(layout)
}

/// Removes every cgroup it was told about, then the instance parent, on drop.
struct Cgroups {
    driver: Box<dyn CgroupDriver>,
    names: Vec<String>,
}

impl Cgroups {
    fn new(driver: Box<dyn CgroupDriver>) -> Self {
        Self { driver, names: Vec::new() }
    }

    fn create(&mut self, name: &str, limits: &Limits) -> abx_cgroup::Result<()> {
        self.names.push(name.to_owned());
        self.driver.create(name, limits)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for name in &self.names {
            let kill = self.driver.kill(name);
            let remove = self.driver.remove(name);
            if let Err(e) = kill.and(remove) {
                eprintln!("cleanup of cgroup {name}: {e}");
            }
        }
        if let Err(e) = self.driver.remove_parent() {
            eprintln!("cleanup of instance parent: {e}");
        }
    }
}

/// The test's own child processes, killed by pid and reaped on drop.
#[derive(Default)]
struct Children(Vec<Child>);

impl Children {
    fn spawn(&mut self, command: &mut Command) -> &mut Child {
        self.0.push(command.spawn().expect("spawn test child"));
        self.0.last_mut().unwrap()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process that burns CPU (and so shows whether it is frozen) without forking.
fn spinner() -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", "while :; do :; done"]);
    c
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn dirs(driver: &dyn CgroupDriver, name: &str) -> Vec<PathBuf> {
    let files = driver.procs_files(name).unwrap();
    files.iter().map(|f| f.parent().unwrap().to_owned()).collect()
}

/// The control file `file` among the sandbox's directories.
fn control(driver: &dyn CgroupDriver, name: &str, file: &str) -> Option<PathBuf> {
    dirs(driver, name).into_iter().map(|d| d.join(file)).find(|p| p.exists())
}

fn assert_value(driver: &dyn CgroupDriver, name: &str, file: &str, expected: &str) {
    let path = control(driver, name, file).unwrap_or_else(|| panic!("no {file}"));
    assert_eq!(read(&path).trim(), expected, "{}", path.display());
}

/// Checks the memory, cpu and pids limit files for `memory` bytes, 0.5 CPUs, 16 pids.
fn assert_limits(driver: &dyn CgroupDriver, name: &str, memory: u64) {
    let memory = memory.to_string();
    if driver.kind() == Kind::V2 {
        assert_value(driver, name, "memory.max", &memory);
        assert_value(driver, name, "cpu.max", "50000 100000");
        return assert_value(driver, name, "pids.max", "16");
    }
    assert_value(driver, name, "memory.limit_in_bytes", &memory);
    if control(driver, name, "memory.memsw.limit_in_bytes").is_some() {
        assert_value(driver, name, "memory.memsw.limit_in_bytes", &memory);
    }
    assert_value(driver, name, "cpu.cfs_period_us", "100000");
    assert_value(driver, name, "cpu.cfs_quota_us", "50000");
    assert_value(driver, name, "pids.max", "16");
}

/// Every directory of the sandbox lists `pid`, and `/proc/pid/cgroup` agrees.
fn assert_member(driver: &dyn CgroupDriver, name: &str, pid: u32, prefix: &str) {
    for file in driver.procs_files(name).unwrap() {
        assert_eq!(read(&file).trim(), pid.to_string(), "{}", file.display());
    }
    let own = read(Path::new(&format!("/proc/{pid}/cgroup")));
    let inside = own.lines().filter(|l| l.ends_with(&format!("/{prefix}/{name}"))).count();
    assert_eq!(inside, driver.procs_files(name).unwrap().len(), "{own}");
}

fn frozen_state(driver: &dyn CgroupDriver, name: &str) -> String {
    match control(driver, name, "cgroup.events") {
        Some(events) if driver.kind() != Kind::V1 => {
            read(&events).lines().find(|l| l.starts_with("frozen")).unwrap().to_owned()
        }
        _ => read(&control(driver, name, "freezer.state").unwrap()).trim().to_owned(),
    }
}

/// CPU time used by `name` over `pause`, µs.
fn cpu_used_during(driver: &dyn CgroupDriver, name: &str, pause: Duration) -> u64 {
    let before = driver.stats(name).unwrap().cpu_usage_usec;
    sleep(pause);
    driver.stats(name).unwrap().cpu_usage_usec - before
}

/// Freezes (checking the spinner stops using CPU), thaws (checking it runs again) and, with
/// `kill_frozen`, kills while frozen.
fn freeze_thaw(driver: &dyn CgroupDriver, name: &str, kill_frozen: bool) {
    driver.freeze(name).unwrap();
    let frozen = frozen_state(driver, name);
    assert!(frozen == "frozen 1" || frozen == "FROZEN", "{frozen}");
    let used = cpu_used_during(driver, name, Duration::from_millis(300));
    assert!(used < 5_000, "frozen spinner used {used} µs");
    if kill_frozen {
        return;
    }
    driver.thaw(name).unwrap();
    let thawed = frozen_state(driver, name);
    assert!(thawed == "frozen 0" || thawed == "THAWED", "{thawed}");
    let used = cpu_used_during(driver, name, Duration::from_millis(300));
    assert!(used > 20_000, "thawed spinner used only {used} µs");
}

/// The whole life of one sandbox cgroup on the real kernel.
fn lifecycle(driver: Box<dyn CgroupDriver>, prefix: &str, kill_frozen: bool) {
    let name = "abx-1a2b3c4d5e6f";
    let mut children = Children::default();
    let mut cg = Cgroups::new(driver);
    let limits = Limits { memory_bytes: Some(64 * MIB), cpus: Some(0.5), pids: Some(16) };
    cg.create(name, &limits).unwrap();
    let d = &*cg.driver;
    assert_limits(d, name, 64 * MIB);
    d.update(name, &Limits { memory_bytes: Some(128 * MIB), ..limits }).unwrap();
    assert_limits(d, name, 128 * MIB);
    d.update(name, &Limits { memory_bytes: Some(48 * MIB), ..limits }).unwrap();
    assert_limits(d, name, 48 * MIB);
    assert_eq!(d.list().unwrap(), [name]);

    let child = children.spawn(&mut spinner());
    let pid = child.id();
    d.add_process(name, pid).unwrap();
    assert_member(d, name, pid, prefix);
    let stats = d.stats(name).unwrap();
    assert_eq!((stats.pids_current, stats.pids_limit), (1, Some(16)), "{stats:?}");
    assert_eq!(stats.memory_limit, Some(48 * MIB), "{stats:?}");

    freeze_thaw(d, name, kill_frozen);
    d.kill(name).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert_eq!(d.stats(name).unwrap().pids_current, 0);
    // The cgroup is reused by the next sandbox, which must not be frozen at birth: a kill
    // leaves it thawed, also one frozen with nobody in it (a freeze that landed while its
    // sandbox was being killed).
    let thawed = |what: &str| {
        let state = frozen_state(d, name);
        assert!(state == "frozen 0" || state == "THAWED", "{what}: {state}");
    };
    thawed("after killing its members");
    d.freeze(name).unwrap();
    d.kill(name).unwrap();
    thawed("after a kill of an empty, frozen cgroup");
    let next = children.spawn(&mut spinner());
    d.add_process(name, next.id()).unwrap();
    let used = cpu_used_during(d, name, Duration::from_millis(300));
    assert!(used > 20_000, "the next member used only {used} µs");
    d.kill(name).unwrap();
    assert_eq!(next.wait().unwrap().signal(), Some(9));

    let made = dirs(d, name);
    let parents: Vec<PathBuf> = made.iter().map(|p| p.parent().unwrap().to_owned()).collect();
    d.remove(name).unwrap();
    assert!(made.iter().all(|p| !p.exists()), "{made:?}");
    assert!(d.list().unwrap().is_empty());
    assert!(d.remove_parent().unwrap());
    assert!(parents.iter().all(|p| !p.exists()), "{parents:?}");
}

#[test]
fn lifecycle_on_this_host() {
    let Some(_) = host_layout("lifecycle_on_this_host") else { return };
    let prefix = prefix("life");
    lifecycle(open(&prefix).unwrap(), &prefix, false);
}

#[test]
fn lifecycle_killing_a_frozen_sandbox() {
    let Some(_) = host_layout("lifecycle_killing_a_frozen_sandbox") else { return };
    let prefix = prefix("frozen");
    lifecycle(open(&prefix).unwrap(), &prefix, true);
}

/// The V1 driver on this host's v1 hierarchies alone: v1 freezer and pid-by-pid kill.
#[test]
fn v1_driver_on_this_host() {
    let Some(mut layout) = host_layout("v1_driver_on_this_host") else { return };
    layout.v2 = None;
    if layout.kind() != Some(Kind::V1) || layout.v1_mount("freezer").is_none() {
        return eprintln!("note: skipping v1_driver_on_this_host: no v1 controllers and freezer");
    }
    let prefix = prefix("v1");
    let driver = open_with(&layout, &prefix, Arc::new(HostFs)).unwrap();
    assert_eq!(driver.kind(), Kind::V1);
    lifecycle(driver, &prefix, false);
    let prefix = self::prefix("v1frz");
    lifecycle(open_with(&layout, &prefix, Arc::new(HostFs)).unwrap(), &prefix, true);
}

/// The V2 driver on this host's cgroup2 mount. On a hybrid host that hierarchy has no
/// controllers: limits are refused (and nothing is left behind), freeze and kill work.
#[test]
fn v2_driver_on_this_hosts_cgroup2() {
    let Some(mut layout) = host_layout("v2_driver_on_this_hosts_cgroup2") else { return };
    layout.v1.clear();
    if layout.kind() != Some(Kind::V2) {
        return eprintln!("note: skipping v2_driver_on_this_hosts_cgroup2: no cgroup2 mount");
    }
    let prefix = prefix("v2");
    let driver = open_with(&layout, &prefix, Arc::new(HostFs)).unwrap();
    let offered = read(&layout.v2.clone().unwrap().join("cgroup.controllers"));
    if offered.split_whitespace().any(|c| c == "memory") {
        return lifecycle(driver, &prefix, false);
    }
    let name = "abx-v2nolimits";
    let mut children = Children::default();
    let mut cg = Cgroups::new(driver);
    let err = cg.create(name, &Limits { memory_bytes: Some(64 * MIB), ..Limits::default() }).unwrap_err();
    assert!(matches!(err, Error::ControllerUnavailable { field: "memory_bytes", .. }), "{err}");
    assert!(cg.driver.list().unwrap().is_empty(), "failed create left a directory");
    cg.create(name, &Limits::default()).unwrap();
    let d = &*cg.driver;
    let child = children.spawn(&mut spinner());
    let pid = child.id();
    d.add_process(name, pid).unwrap();
    assert_member(d, name, pid, &prefix);
    assert_eq!(d.stats(name).unwrap().pids_current, 1, "counted from cgroup.procs");
    freeze_thaw(d, name, false);
    d.kill(name).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    d.remove(name).unwrap();
    assert!(d.remove_parent().unwrap());
}

/// A child that allocates far beyond a 32 MiB limit is OOM-killed and counted.
#[test]
fn oom_kill_is_counted() {
    let Some(_) = host_layout("oom_kill_is_counted") else { return };
    let name = "abx-oom";
    let prefix = prefix("oom");
    let mut children = Children::default();
    let mut cg = Cgroups::new(open(&prefix).unwrap());
    let limits = Limits { memory_bytes: Some(32 * MIB), ..Limits::default() };
    if let Err(e) = cg.create(name, &limits) {
        return eprintln!("note: skipping oom_kill_is_counted: {e}");
    }
    let d = &*cg.driver;
    // The child waits for a line on stdin so that it is in the cgroup before it allocates.
    let mut hog = Command::new("sh");
    hog.args(["-c", "read go; x=$(head -c 200M /dev/zero | tr '\\0' a); echo survived"]);
    let child = children.spawn(hog.stdin(Stdio::piped()).stdout(Stdio::piped()));
    d.add_process(name, child.id()).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = child.wait().unwrap();
    let stats = d.stats(name).unwrap();
    assert!(stats.oom_kills >= 1, "{stats:?}, child {status:?}");
    assert!(!status.success(), "{status:?}");
    assert!(stats.memory_peak.is_none_or(|p| p <= 32 * MIB + 4 * MIB), "{stats:?}");
    d.kill(name).unwrap();
    d.remove(name).unwrap();
}
