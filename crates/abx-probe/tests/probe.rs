//! Runs the real `abx-probe` binary on the host. As root outside any sandbox, the calls a
//! sandbox must refuse succeed here, so a refusal seen inside a sandbox is the sandbox's doing.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_abx-probe");

fn run(args: &[&str]) -> (Value, Output) {
    let out = Command::new(BIN).args(args).output().expect("run abx-probe");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout of {args:?} is not JSON ({e}): {:?}", String::from_utf8_lossy(&out.stdout)));
    (json, out)
}

/// A fresh directory for one test, removed by the caller.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("abx-probe-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_unconfined_root(report: &Value) -> bool {
    report["euid"] == 0
        && report["seccomp_mode"] == 0
        && report["uid_map"].as_str().is_some_and(|m| m.contains("4294967295"))
}

#[test]
fn report_has_every_key_with_its_type() {
    let (r, out) = run(&["report"]);
    assert!(out.status.success());
    assert_eq!(out.stdout.iter().filter(|b| **b == b'\n').count(), 1, "one JSON line");
    for key in ["uid", "gid", "euid", "egid", "pid", "ppid", "seccomp_mode", "seccomp_filters"] {
        assert!(r[key].is_u64(), "{key}: {}", r[key]);
    }
    for key in ["uid_map", "gid_map", "setgroups", "hostname", "cgroup", "interfaces_source"] {
        assert!(r[key].is_string(), "{key}: {}", r[key]);
    }
    for key in ["cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb"] {
        let hex = r[key].as_str().unwrap_or_else(|| panic!("{key}: {}", r[key]));
        assert!(u64::from_str_radix(hex, 16).is_ok(), "{key}: {hex}");
    }
    assert!(r["no_new_privs"].is_boolean());
    assert!(r["pids_visible"].as_array().unwrap().iter().all(Value::is_u64));
    assert!(r["pids_visible"].as_array().unwrap().contains(&r["pid"]), "own pid visible");
    assert!(r["interfaces"].as_array().unwrap().contains(&"lo".into()));
    assert_eq!(r["interfaces_source"], "/proc/self/net/dev");
    assert!(r["sysfs_interfaces"].as_array().unwrap().contains(&"lo".into()));
    let mounts = r["mounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["mount_point"] == "/"));
    assert!(mounts.iter().all(|m| m["fstype"].is_string() && m["options"].is_string()));
    assert!(r["namespaces"]["user"].as_str().unwrap().starts_with("user:["));
    let syscalls = r["syscalls"].as_object().unwrap();
    let verdicts = r["verdicts"].as_object().unwrap();
    for name in [
        "io_uring_setup",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "keyctl",
        "add_key",
        "kexec_load",
        "init_module",
        "finit_module",
        "mount_tmpfs",
        "unshare_user",
        "unshare_mount",
        "setns",
        "pivot_root",
        "open_tree",
        "fsopen",
        "ptrace_attach_pid1",
        "reboot",
        "swapon",
    ] {
        let outcome = syscalls[name].as_str().unwrap_or_else(|| panic!("syscalls.{name} missing"));
        assert!(outcome == "ok" || outcome.starts_with('E'), "{name}: {outcome}");
        assert!(["permitted", "refused", "unknown"].contains(&verdicts[name].as_str().unwrap()), "{name}");
    }
    assert_eq!(syscalls.len(), verdicts.len());
}

#[test]
fn unconfined_root_host_is_permitted_what_a_sandbox_must_refuse() {
    let (r, _) = run(&["report"]);
    if !is_unconfined_root(&r) {
        eprintln!("skipped: not unconfined root (euid {}, seccomp {})", r["euid"], r["seccomp_mode"]);
        return;
    }
    let s = &r["syscalls"];
    let uring_enabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map_or(true, |v| v.trim() == "0");
    if uring_enabled {
        assert_eq!(s["io_uring_setup"], "ok");
    }
    for name in [
        "mount_tmpfs",
        "unshare_user",
        "unshare_mount",
        "setns",
        "open_tree",
        "fsopen",
        "bpf",
        "userfaultfd",
        "keyctl",
        "add_key",
    ] {
        assert_eq!(s[name], "ok", "{name}");
    }
    // Harmful if they succeeded: the errno shows they got past the permission check.
    assert_eq!(s["pivot_root"], "ENOENT");
    assert_eq!(s["reboot"], "EINVAL");
    assert_eq!(s["swapon"], "ENOENT", "a kernel without swap would say ENOSYS");
    // Kernel-dependent (built without modules/kexec/perf, or pid 1 specially protected).
    for (name, permitted) in
        [("kexec_load", "EINVAL"), ("init_module", "ENOEXEC"), ("finit_module", "EBADF"), ("perf_event_open", "ok")]
    {
        assert!([permitted, "ENOSYS", "ENOENT"].contains(&s[name].as_str().unwrap()), "{name}: {}", s[name]);
    }
}

#[test]
fn report_leaves_no_mounts_directories_or_processes_behind() {
    let cad_before = std::fs::read_to_string("/proc/sys/kernel/ctrl-alt-del").ok();
    let child = Command::new(BIN).arg("report").process_group(0).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["pid"], pid);
    let marker = format!("abx-probe-{pid}-");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&marker), "a tmpfs was left mounted");
    let leftovers: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&marker))
        .collect();
    assert!(leftovers.is_empty(), "left in /tmp: {leftovers:?}");
    assert!(processes_in_group(pid).is_empty(), "processes left in group {pid}");
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/ctrl-alt-del").ok(), cad_before);
}

/// Pids of processes whose process group is `pgid`.
fn processes_in_group(pgid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After "pid (comm) ": state ppid pgrp ...
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn ptrace_seize_leaves_the_target_running_and_untraced() {
    let mut target = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = target.id();
    let status = || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let state = |status: &str| abx_probe::procfs::status_field(status, "State").unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !state(&status()).starts_with('S') && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let got = abx_sys::probe::try_ptrace_seize(pid as i32);
    let after = status();
    target.kill().unwrap();
    target.wait().unwrap();
    assert_eq!(got, Ok(()));
    assert_eq!(abx_probe::procfs::status_field(&after, "TracerPid"), Some("0"), "detached when the tracer exited");
    assert!(state(&after).starts_with('S'), "not stopped: {}", state(&after));
}

#[test]
fn write_and_read_report_ok_or_errno() {
    let dir = scratch("rw");
    let file = dir.join("f");
    let file = file.to_str().unwrap();
    let (w, out) = run(&["write", file]);
    assert_eq!(w, serde_json::json!({"ok": true, "bytes": 10}));
    assert!(out.status.success());
    let (r, _) = run(&["read", file]);
    assert_eq!(r, serde_json::json!({"ok": true, "size": 10, "truncated": false}));

    let missing = dir.join("no/such");
    let (w, out) = run(&["write", missing.to_str().unwrap()]);
    assert_eq!(w, serde_json::json!({"ok": false, "errno": "ENOENT"}));
    assert_eq!(out.status.code(), Some(1));
    let (r, _) = run(&["read", missing.to_str().unwrap()]);
    assert_eq!(r, serde_json::json!({"ok": false, "errno": "ENOENT"}));
    let (r, _) = run(&["read", dir.to_str().unwrap()]);
    assert_eq!(r["errno"], "EISDIR");
    let (w, _) = run(&["write", dir.to_str().unwrap()]);
    assert_eq!(w["errno"], "EISDIR");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn read_of_an_endless_file_stops() {
    let (r, _) = run(&["read", "/dev/zero"]);
    assert_eq!(r, serde_json::json!({"ok": true, "size": 64u64 << 20, "truncated": true}));
}

#[test]
fn connect_reports_ok_or_errno() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (c, out) = run(&["connect", &addr]);
    assert_eq!(c, serde_json::json!({"ok": true, "addr": addr}));
    assert!(out.status.success());
    drop(listener);
    let (c, out) = run(&["connect", &addr]);
    assert_eq!(c, serde_json::json!({"ok": false, "errno": "ECONNREFUSED"}));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn hog_touches_memory_step_by_step() {
    let (h, out) = run(&["hog", "4", "0"]);
    assert_eq!(h, serde_json::json!({"ok": true, "megabytes": 4}));
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("1 MiB") && progress.contains("4 MiB"), "{progress}");
}

#[test]
fn sleep_sleeps() {
    let start = std::time::Instant::now();
    let (s, _) = run(&["sleep", "0.2"]);
    assert_eq!(s, serde_json::json!({"ok": true}));
    assert!(start.elapsed() >= std::time::Duration::from_millis(200));
}

#[test]
fn bad_arguments_exit_2_with_usage() {
    for args in [&[][..], &["frobnicate"], &["hog", "lots"], &["write"]] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage: abx-probe"));
    }
}
