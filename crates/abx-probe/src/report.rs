//! `abx-probe report`: what the process is and sees, and which syscalls it may make.
//!
//! Schema (a field is `null` when its source could not be read):
//!
//! ```text
//! probe_version    string
//! uid gid euid egid         number (from the syscalls)
//! uid_map gid_map setgroups string: /proc/self/{uid_map,gid_map,setgroups}, verbatim
//! cap_inh cap_prm cap_eff cap_bnd cap_amb   string: hex from /proc/self/status
//! no_new_privs     bool (prctl PR_GET_NO_NEW_PRIVS)
//! seccomp_mode     number: /proc/self/status Seccomp (0 off, 1 strict, 2 filter)
//! seccomp_filters  number: /proc/self/status Seccomp_filters
//! hostname         string (uname)
//! pid ppid         number (ppid 0 when the parent is outside the pid namespace)
//! pids_visible     [number]: numeric entries of /proc, sorted
//! interfaces       [string]: the process's network namespace, from /proc/self/net/dev
//!                  (in file order), else /sys/class/net (sorted)
//! interfaces_source "/proc/self/net/dev" | "/sys/class/net" | null
//! sysfs_interfaces [string]: /sys/class/net, sorted; the namespace of whoever mounted /sys,
//!                  so host interfaces here mean the sandbox sees the host's sysfs
//! mounts           [{mount_point, fstype, source, options}]: /proc/self/mountinfo
//! namespaces       {cgroup, ipc, mnt, net, pid, pid_for_children, time, user, uts}:
//!                  link text of /proc/self/ns/* ("net:[4026531840]") or null
//! cgroup           string: /proc/self/cgroup, verbatim
//! syscalls         {name: "ok" | errno name | "signal:SIG…" | "setup:…" | "cleanup-failed"}
//! verdicts         {name: "permitted" | "refused" | "unknown"} (see the syscalls module)
//! ```

use std::fs;

use serde_json::{Map, Value, json};

use crate::{procfs, syscalls};

const NAMESPACES: [&str; 9] = ["cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time", "user", "uts"];

/// Builds the report, running every syscall attempt.
pub fn report() -> Value {
    let status = read("/proc/self/status");
    let field = |key: &str| status.as_deref().and_then(|s| procfs::status_field(s, key)).map(str::to_owned);
    let number = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
    let (interfaces, interfaces_source) = interfaces();
    let (syscalls, verdicts) = syscalls::run_all();
    json!({
        "probe_version": env!("CARGO_PKG_VERSION"),
        "uid": rustix::process::getuid().as_raw(),
        "gid": rustix::process::getgid().as_raw(),
        "euid": rustix::process::geteuid().as_raw(),
        "egid": rustix::process::getegid().as_raw(),
        "uid_map": read("/proc/self/uid_map"),
        "gid_map": read("/proc/self/gid_map"),
        "setgroups": read("/proc/self/setgroups"),
        "cap_inh": field("CapInh"),
        "cap_prm": field("CapPrm"),
        "cap_eff": field("CapEff"),
        "cap_bnd": field("CapBnd"),
        "cap_amb": field("CapAmb"),
        "no_new_privs": rustix::thread::no_new_privs().ok(),
        "seccomp_mode": number("Seccomp"),
        "seccomp_filters": number("Seccomp_filters"),
        "hostname": rustix::system::uname().nodename().to_string_lossy(),
        "pid": std::process::id(),
        "ppid": rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()),
        "pids_visible": dir_names("/proc").map(procfs::pids),
        "interfaces": interfaces,
        "interfaces_source": interfaces_source,
        "sysfs_interfaces": sysfs_interfaces(),
        "mounts": read("/proc/self/mountinfo")
            .map(|t| procfs::parse_mountinfo(&t).iter().map(procfs::Mount::to_json).collect::<Vec<_>>()),
        "namespaces": namespaces(),
        "cgroup": read("/proc/self/cgroup"),
        "syscalls": syscalls,
        "verdicts": verdicts,
    })
}

fn read(path: &str) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// The names in directory `path`, or `None` if it cannot be listed.
fn dir_names(path: &str) -> Option<Vec<String>> {
    let entries = fs::read_dir(path).ok()?;
    Some(entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
}

/// Network interface names and where they came from. `/proc/self/net/dev` comes first: it
/// always shows the reader's network namespace, while `/sys/class/net` shows the namespace of
/// whoever mounted that sysfs (a sandbox with the host's `/sys` would list host interfaces).
fn interfaces() -> (Option<Vec<String>>, Option<&'static str>) {
    if let Some(text) = read("/proc/self/net/dev") {
        return (Some(procfs::parse_net_dev(&text)), Some("/proc/self/net/dev"));
    }
    match sysfs_interfaces() {
        Some(names) => (Some(names), Some("/sys/class/net")),
        None => (None, None),
    }
}

/// The entries of `/sys/class/net`, sorted.
fn sysfs_interfaces() -> Option<Vec<String>> {
    let mut names = dir_names("/sys/class/net")?;
    names.sort();
    Some(names)
}

fn namespaces() -> Map<String, Value> {
    NAMESPACES
        .iter()
        .map(|ns| {
            let link = fs::read_link(format!("/proc/self/ns/{ns}")).ok();
            (ns.to_string(), link.map(|l| l.to_string_lossy().into_owned()).into())
        })
        .collect()
}
