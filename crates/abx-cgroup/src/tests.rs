//! Driver logic against the fake tree ([`crate::fake`]) for each layout.

use std::sync::Arc;

use crate::fake::FakeFs;
use crate::{CgroupDriver, Error, Kind, Layout, Limits, MIB, Stats, open_with};

const HYBRID: &[&str] = &["cpu", "cpuacct", "cpuset", "memory", "freezer", "pids", "systemd", "unified"];
const V1: &[&str] = &["cpu,cpuacct", "memory", "pids", "freezer", "systemd"];
const V2: &[&str] = &["cg2"];
const P: &str = "abxt";
const N: &str = "abx-1a2b3c4d5e6f";

fn limits() -> Limits {
    Limits { memory_bytes: Some(64 * MIB), cpus: Some(1.5), pids: Some(100) }
}

fn setup(hierarchies: &[&str], memsw: bool) -> (Arc<FakeFs>, Box<dyn CgroupDriver>) {
    let fs = FakeFs::new(hierarchies, memsw);
    let mut layout = fs.layout(hierarchies);
    for m in &mut layout.v1 {
        m.controllers.iter_mut().filter(|c| *c == "systemd").for_each(|c| *c = "name=systemd".into());
    }
    let driver = open_with(&layout, P, fs.clone()).unwrap();
    (fs, driver)
}

fn path(h: &str, file: &str) -> String {
    if file.is_empty() { format!("{h}/{P}/{N}") } else { format!("{h}/{P}/{N}/{file}") }
}

fn value(fs: &FakeFs, h: &str, file: &str) -> String {
    fs.get(&path(h, file)).trim().to_owned()
}

#[test]
fn kinds() {
    assert_eq!(setup(HYBRID, true).1.kind(), Kind::Hybrid);
    assert_eq!(setup(V1, true).1.kind(), Kind::V1);
    assert_eq!(setup(V2, true).1.kind(), Kind::V2);
}

#[test]
fn open_rejects_bad_prefix_and_empty_layout() {
    let fs = FakeFs::new(V2, true);
    let err = open_with(&fs.layout(V2), "agent", fs.clone()).unwrap_err();
    assert!(matches!(err, Error::InvalidPrefix { ref prefix, .. } if prefix == "agent"));
    let err = open_with(&Layout::default(), P, fs).unwrap_err();
    assert!(matches!(err, Error::NoHierarchy { .. }));
}

#[test]
fn hybrid_create_writes_v1_limits() {
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &limits()).unwrap();
    for h in ["cpu", "memory", "pids", "unified"] {
        assert!(fs.has(&path(h, "")), "{h}");
    }
    for h in ["freezer", "cpuset", "systemd", "cpuacct"] {
        assert!(!fs.has(&format!("{h}/{P}")), "{h} is not used on hybrid");
    }
    assert_eq!(value(&fs, "memory", "memory.limit_in_bytes"), "67108864");
    assert_eq!(value(&fs, "memory", "memory.memsw.limit_in_bytes"), "67108864");
    assert_eq!(value(&fs, "cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(value(&fs, "cpu", "cpu.cfs_quota_us"), "150000");
    assert_eq!(value(&fs, "pids", "pids.max"), "100");
    assert_eq!(d.list().unwrap(), [N]);
}

#[test]
fn v1_memory_limit_order_follows_the_kernel_rule() {
    let (fs, d) = setup(HYBRID, true);
    let mem = |m: Option<u64>| Limits { memory_bytes: m, ..Limits::default() };
    d.create(N, &mem(Some(64 * MIB))).unwrap();
    let order = |fs: &FakeFs| -> Vec<String> {
        let writes = fs.writes();
        let memory = writes.iter().filter(|(p, _)| p.contains("memory.") && p.contains("limit_in_bytes"));
        memory.map(|(p, _)| p.rsplit('/').next().unwrap().to_owned()).collect()
    };
    assert_eq!(order(&fs), ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"], "lowering");
    fs.log.lock().unwrap().clear();
    d.update(N, &mem(Some(128 * MIB))).unwrap();
    assert_eq!(order(&fs), ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"], "raising");
    assert_eq!(value(&fs, "memory", "memory.limit_in_bytes"), (128 * MIB).to_string());
    d.update(N, &mem(Some(2 * MIB))).unwrap();
    assert_eq!(value(&fs, "memory", "memory.memsw.limit_in_bytes"), (2 * MIB).to_string());
    d.update(N, &mem(None)).unwrap();
    assert_eq!(value(&fs, "memory", "memory.limit_in_bytes"), "9223372036854771712");
    assert_eq!(value(&fs, "memory", "memory.memsw.limit_in_bytes"), "9223372036854771712");
}

#[test]
fn v1_only_without_swap_accounting() {
    let (fs, d) = setup(V1, false);
    d.create(N, &limits()).unwrap();
    for h in ["cpu,cpuacct", "memory", "pids", "freezer"] {
        assert!(fs.has(&path(h, "")), "{h}");
    }
    assert!(!fs.has(&format!("systemd/{P}")));
    assert_eq!(value(&fs, "memory", "memory.limit_in_bytes"), "67108864");
    assert!(!fs.has(&path("memory", "memory.memsw.limit_in_bytes")));
    assert_eq!(value(&fs, "cpu,cpuacct", "cpu.cfs_quota_us"), "150000");
    d.update(N, &Limits::default()).unwrap();
    assert_eq!(value(&fs, "cpu,cpuacct", "cpu.cfs_quota_us"), "-1");
    assert_eq!(value(&fs, "pids", "pids.max"), "max");
}

#[test]
fn v1_limit_without_controller_is_refused_and_undone() {
    let hierarchies = ["memory", "pids"];
    let (fs, d) = setup(&hierarchies, true);
    let err = d.create(N, &limits()).unwrap_err();
    assert!(matches!(err, Error::ControllerUnavailable { field: "cpus", controller: "cpu", .. }), "{err}");
    assert!(!fs.has(&path("memory", "")) && !fs.has(&path("pids", "")));
    let no_cpu = Limits { cpus: None, ..limits() };
    d.create(N, &no_cpu).unwrap();
}

#[test]
fn cpuset_hierarchy_is_initialised() {
    let (fs, d) = setup(&["cpu,cpuset", "memory"], true);
    d.create(N, &Limits::default()).unwrap();
    assert_eq!(fs.get(&format!("cpu,cpuset/{P}/cpuset.cpus")), "0-1");
    assert_eq!(value(&fs, "cpu,cpuset", "cpuset.cpus"), "0-1");
    assert_eq!(value(&fs, "cpu,cpuset", "cpuset.mems"), "0");
}

#[test]
fn v2_create_delegates_and_writes_v2_limits() {
    let (fs, d) = setup(V2, true);
    d.create(N, &limits()).unwrap();
    assert_eq!(fs.get("cg2/cgroup.subtree_control"), "cpu memory pids");
    assert_eq!(fs.get(&format!("cg2/{P}/cgroup.subtree_control")), "cpu memory pids");
    assert_eq!(value(&fs, "cg2", "memory.max"), "67108864");
    assert_eq!(value(&fs, "cg2", "memory.swap.max"), "0");
    assert_eq!(value(&fs, "cg2", "cpu.max"), "150000 100000");
    assert_eq!(value(&fs, "cg2", "pids.max"), "100");
    d.update(N, &Limits::default()).unwrap();
    assert_eq!(value(&fs, "cg2", "memory.max"), "max");
    assert_eq!(value(&fs, "cg2", "memory.swap.max"), "max");
    assert_eq!(value(&fs, "cg2", "cpu.max"), "max 100000");
    assert_eq!(value(&fs, "cg2", "pids.max"), "max");
    assert_eq!(d.procs_files(N).unwrap(), [fs.root().join(path("cg2", "cgroup.procs"))]);
}

#[test]
fn v2_enables_only_missing_controllers() {
    let (fs, d) = setup(V2, true);
    fs.set("cg2/cgroup.subtree_control", "memory");
    d.create(N, &Limits::default()).unwrap();
    let root_writes: Vec<_> =
        fs.writes().into_iter().filter(|(p, _)| p == "cg2/cgroup.subtree_control").map(|(_, v)| v).collect();
    assert_eq!(root_writes, ["+cpu", "+pids"]);
    fs.log.lock().unwrap().clear();
    d.create("second", &Limits::default()).unwrap();
    assert!(fs.writes().iter().all(|(p, _)| !p.ends_with("subtree_control")), "already enabled");
}

#[test]
fn v2_limit_on_missing_controller_is_refused_and_undone() {
    let (fs, d) = setup(V2, true);
    fs.set("cg2/cgroup.controllers", "cpu memory");
    let err = d.create(N, &limits()).unwrap_err();
    assert!(matches!(err, Error::ControllerUnavailable { field: "pids", controller: "pids", .. }), "{err}");
    assert!(!fs.has(&path("cg2", "")));
    d.create(N, &Limits { pids: None, ..limits() }).unwrap();
}

#[test]
fn create_cleans_up_after_a_failed_write() {
    let (fs, d) = setup(HYBRID, true);
    fs.fail_write("pids.max");
    let err = d.create(N, &limits()).unwrap_err();
    match &err {
        Error::Write { path, value, .. } => {
            assert!(path.ends_with(format!("pids/{P}/{N}/pids.max")));
            assert_eq!(value, "100");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().starts_with("cannot write \"100\" to "), "{err}");
    for h in ["cpu", "cpuacct", "memory", "pids", "unified"] {
        assert!(!fs.has(&path(h, "")), "{h} left behind");
    }
    assert!(d.list().unwrap().is_empty());
}

#[test]
fn create_cleans_up_after_a_failed_mkdir() {
    let (fs, d) = setup(HYBRID, true);
    fs.fail_mkdir(&format!("memory/{P}/{N}"));
    let err = d.create(N, &limits()).unwrap_err();
    assert!(matches!(err, Error::Mkdir { ref path, .. } if path.ends_with(format!("memory/{P}/{N}"))));
    for h in ["cpu", "cpuacct", "unified"] {
        assert!(!fs.has(&path(h, "")), "{h} left behind");
    }
}

#[test]
fn create_existing_fails_and_keeps_the_original() {
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &limits()).unwrap();
    let err = d.create(N, &limits()).unwrap_err();
    assert!(matches!(err, Error::Exists { .. }), "{err}");
    assert!(fs.has(&path("memory", "memory.limit_in_bytes")));
    assert!(fs.has(&path("unified", "cgroup.procs")));
}

#[test]
fn invalid_inputs_are_refused() {
    let (_fs, d) = setup(HYBRID, true);
    let bad = "../etc";
    assert!(matches!(d.create(bad, &limits()), Err(Error::InvalidName { .. })));
    assert!(matches!(d.update(bad, &limits()), Err(Error::InvalidName { .. })));
    assert!(matches!(d.procs_files(bad), Err(Error::InvalidName { .. })));
    assert!(matches!(d.add_process(bad, 1), Err(Error::InvalidName { .. })));
    assert!(matches!(d.freeze(bad), Err(Error::InvalidName { .. })));
    assert!(matches!(d.kill(bad), Err(Error::InvalidName { .. })));
    assert!(matches!(d.remove(bad), Err(Error::InvalidName { .. })));
    assert!(matches!(d.stats(bad), Err(Error::InvalidName { .. })));
    let zero_pids = Limits { pids: Some(0), ..limits() };
    assert!(matches!(d.create(N, &zero_pids), Err(Error::InvalidLimit { field: "pids", .. })));
    assert!(matches!(d.add_process(N, 0), Err(Error::InvalidPid { pid: 0 })));
}

#[test]
fn missing_cgroup_is_not_found() {
    let (_fs, d) = setup(HYBRID, true);
    assert!(matches!(d.update(N, &limits()), Err(Error::NotFound { .. })));
    assert!(matches!(d.stats(N), Err(Error::NotFound { .. })));
    assert!(matches!(d.freeze(N), Err(Error::NotFound { .. })));
    assert!(matches!(d.add_process(N, 1), Err(Error::NotFound { .. })));
    d.kill(N).unwrap();
    d.remove(N).unwrap();
}

#[test]
fn procs_files_and_add_process() {
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &Limits::default()).unwrap();
    let files = d.procs_files(N).unwrap();
    let order: Vec<_> =
        ["unified", "cpu", "memory", "pids"].iter().map(|h| fs.root().join(path(h, "cgroup.procs"))).collect();
    assert_eq!(files, order, "cgroup2 first, then v1 in mountinfo order");
    d.add_process(N, 4_194_400).unwrap();
    for h in ["unified", "cpu", "memory", "pids"] {
        assert_eq!(value(&fs, h, "cgroup.procs"), "4194400");
    }
}

#[test]
fn stats_v1() {
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &limits()).unwrap();
    fs.set(&path("memory", "memory.usage_in_bytes"), "1234\n");
    fs.set(&path("memory", "memory.max_usage_in_bytes"), "5678\n");
    fs.set(&path("memory", "memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n");
    fs.set(&path("pids", "pids.current"), "3\n");
    fs.set(&path("unified", "cpu.stat"), "usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\n");
    let expected = Stats {
        memory_current: 1234,
        memory_peak: Some(5678),
        memory_limit: Some(64 * MIB),
        oom_kills: 2,
        pids_current: 3,
        pids_limit: Some(100),
        cpu_usage_usec: 5000,
    };
    assert_eq!(d.stats(N).unwrap(), expected);
    d.update(N, &Limits::default()).unwrap();
    let s = d.stats(N).unwrap();
    assert_eq!((s.memory_limit, s.pids_limit), (None, None));
    fs.set(&path("pids", "pids.current"), "lots\n");
    assert!(matches!(d.stats(N), Err(Error::Parse { ref content, .. }) if content == "lots\n"));
}

#[test]
fn stats_v1_cpu_from_cgroup2_without_cpuacct() {
    let (fs, d) = setup(&["memory", "unified"], true);
    d.create(N, &Limits::default()).unwrap();
    fs.set(&path("unified", "cpu.stat"), "usage_usec 777\nuser_usec 700\nsystem_usec 77\n");
    fs.set(&path("unified", "cgroup.procs"), "4194400\n4194401\n");
    let s = d.stats(N).unwrap();
    assert_eq!(s.cpu_usage_usec, 777);
    assert_eq!(s.pids_current, 2, "counted from cgroup.procs without a pids controller");
}

#[test]
fn stats_v2() {
    let (fs, d) = setup(V2, true);
    d.create(N, &limits()).unwrap();
    fs.set(&path("cg2", "memory.current"), "4096\n");
    fs.set(&path("cg2", "memory.peak"), "8192\n");
    fs.set(&path("cg2", "memory.events"), "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\n");
    fs.set(&path("cg2", "pids.current"), "2\n");
    fs.set(&path("cg2", "cpu.stat"), "usage_usec 31337\nuser_usec 1\nsystem_usec 2\n");
    let expected = Stats {
        memory_current: 4096,
        memory_peak: Some(8192),
        memory_limit: Some(64 * MIB),
        oom_kills: 1,
        pids_current: 2,
        pids_limit: Some(100),
        cpu_usage_usec: 31337,
    };
    assert_eq!(d.stats(N).unwrap(), expected);
    std::fs::remove_file(fs.root().join(path("cg2", "memory.peak"))).unwrap();
    assert_eq!(d.stats(N).unwrap().memory_peak, None, "kernels before 5.19 have no memory.peak");
}

#[test]
fn freeze_uses_cgroup2_on_hybrid_and_v2() {
    for (layout, h) in [(HYBRID, "unified"), (V2, "cg2")] {
        let (fs, d) = setup(layout, true);
        d.create(N, &Limits::default()).unwrap();
        d.freeze(N).unwrap();
        assert_eq!(value(&fs, h, "cgroup.freeze"), "1");
        assert!(fs.get(&path(h, "cgroup.events")).contains("frozen 1"));
        d.thaw(N).unwrap();
        assert!(fs.get(&path(h, "cgroup.events")).contains("frozen 0"));
    }
}

#[test]
fn freeze_uses_the_freezer_on_v1() {
    let (fs, d) = setup(V1, true);
    d.create(N, &Limits::default()).unwrap();
    d.freeze(N).unwrap();
    assert_eq!(value(&fs, "freezer", "freezer.state"), "FROZEN");
    d.thaw(N).unwrap();
    assert_eq!(value(&fs, "freezer", "freezer.state"), "THAWED");
}

#[test]
fn freeze_without_freezer_is_unsupported() {
    let (_fs, d) = setup(&["memory"], true);
    d.create(N, &Limits::default()).unwrap();
    assert!(matches!(d.freeze(N), Err(Error::Unsupported { operation: "freeze", .. })));
}

#[test]
fn kill_never_writes_cgroup_kill() {
    // After cgroup.kill, clone3(CLONE_INTO_CGROUP) into the cgroup SIGKILLs the child on
    // Linux 6.18, and agentbox reuses cgroups that way.
    let (fs, d) = setup(V2, true);
    d.create(N, &Limits::default()).unwrap();
    d.kill(N).unwrap();
    assert!(!fs.writes().iter().any(|(p, _)| p.ends_with("cgroup.kill")), "{:?}", fs.writes());
}

#[test]
fn remove_is_idempotent_retries_busy_and_takes_children() {
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &Limits::default()).unwrap();
    std::fs::create_dir(fs.root().join(path("memory", "inner"))).unwrap();
    fs.busy(3);
    d.remove(N).unwrap();
    for h in ["cpu", "cpuacct", "memory", "pids", "unified"] {
        assert!(!fs.has(&path(h, "")), "{h}");
    }
    d.remove(N).unwrap();
}

#[test]
fn remove_reports_a_cgroup_that_stays_busy() {
    let (fs, d) = setup(V2, true);
    d.create(N, &Limits::default()).unwrap();
    fs.set(&path("cg2", "cgroup.procs"), "4194400\n");
    let err = d.remove(N).unwrap_err();
    assert!(matches!(err, Error::Rmdir { ref path, .. } if path.ends_with(N)), "{err}");
}

#[test]
fn list_is_the_union_over_hierarchies() {
    let (fs, d) = setup(HYBRID, true);
    d.create("b", &Limits::default()).unwrap();
    d.create("a", &Limits::default()).unwrap();
    std::fs::create_dir(fs.root().join(format!("memory/{P}/orphan"))).unwrap();
    std::fs::create_dir(fs.root().join(format!("memory/{P}/not valid"))).unwrap();
    assert_eq!(d.list().unwrap(), ["a", "b", "orphan"]);
}

#[test]
fn remove_parent_only_when_empty() {
    let (fs, d) = setup(HYBRID, true);
    assert!(d.remove_parent().unwrap(), "nothing there is fine");
    d.create(N, &Limits::default()).unwrap();
    assert!(!d.remove_parent().unwrap());
    assert!(fs.has(&format!("memory/{P}")));
    d.remove(N).unwrap();
    assert!(d.remove_parent().unwrap());
    for h in ["cpu", "cpuacct", "memory", "pids", "unified"] {
        assert!(!fs.has(&format!("{h}/{P}")), "{h}");
    }
}

#[test]
fn placement_uses_clone_into_on_cgroup2_and_self_join_on_v1() {
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &Limits::default()).unwrap();
    let p = d.placement(N).unwrap();
    assert_eq!(p.clone_into, Some(fs.root().join(path("unified", ""))));
    let want: Vec<_> = ["cpu", "memory", "pids"].iter().map(|h| fs.root().join(path(h, "tasks"))).collect();
    assert_eq!(p.self_join, want);
    assert!(matches!(d.placement("../x"), Err(Error::InvalidName { .. })));
}

#[test]
fn reset_stats_clears_the_v1_memory_peak() {
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &Limits::default()).unwrap();
    fs.set(&path("memory", "memory.max_usage_in_bytes"), "5678\n");
    d.reset_stats(N).unwrap();
    assert_eq!(value(&fs, "memory", "memory.max_usage_in_bytes"), "0");
    assert!(matches!(d.reset_stats("missing"), Err(Error::NotFound { .. })));
}

#[test]
fn idle_class_is_the_cpu_controllers_cpu_idle() {
    for (hierarchies, h) in [(HYBRID, "cpu"), (V1, "cpu,cpuacct"), (V2, "cg2")] {
        let (fs, d) = setup(hierarchies, true);
        d.create(N, &Limits::default()).unwrap();
        assert!(d.set_idle(N, true).unwrap(), "{h}");
        assert_eq!(value(&fs, h, "cpu.idle"), "1", "{h}");
        assert!(d.set_idle(N, false).unwrap(), "{h}");
        assert_eq!(value(&fs, h, "cpu.idle"), "0", "{h}");
    }
    // A kernel without cpu.idle (before 5.15): nothing written, no error.
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &Limits::default()).unwrap();
    fs.remove_file(&path("cpu", "cpu.idle"));
    assert!(!d.set_idle(N, true).unwrap());
    assert!(d.set_idle("../x", true).is_err(), "names are validated");
}

#[test]
fn kill_trusts_an_unpopulated_cgroup2_directory() {
    // A process id still listed in a v1 file (this fake never updates them) would be
    // signalled and waited for until the timeout; `populated 0` in the cgroup2 directory,
    // where every sandbox process lives, answers at once.
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &Limits::default()).unwrap();
    fs.set(&path("memory", "cgroup.procs"), "4194399\n");
    fs.set(&path("unified", "cgroup.events"), "populated 0\nfrozen 0\n");
    let t = std::time::Instant::now();
    d.kill(N).unwrap();
    assert!(t.elapsed() < std::time::Duration::from_millis(500), "{:?}", t.elapsed());
}

#[test]
fn oom_kills_alone() {
    let (fs, d) = setup(HYBRID, true);
    d.create(N, &Limits::default()).unwrap();
    fs.set(&path("memory", "memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n");
    assert_eq!(d.oom_kills(N).unwrap(), 4);
    let (fs, d) = setup(V2, true);
    d.create(N, &Limits::default()).unwrap();
    assert_eq!(d.oom_kills(N).unwrap(), 0, "no memory.events: no memory controller, no kills");
    fs.set(&path("cg2", "memory.events"), "low 0\nhigh 0\nmax 9\noom 1\noom_kill 3\noom_group_kill 0\n");
    assert_eq!(d.oom_kills(N).unwrap(), 3);
    assert!(matches!(d.oom_kills("abx-missing"), Err(Error::NotFound { .. })));
}
