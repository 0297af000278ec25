//! The syscall attempts of `report`: what each one does, and which outcome means the sandbox
//! refused it.
//!
//! Every attempt runs in a forked child (see `abx_sys::probe`), and is chosen so that success
//! is harmless. Calls that would be harmful if they *succeeded* get arguments the kernel
//! rejects only after its permission check; for those, the "permitted" errno below is the
//! expected result on an unconfined root host, and a permission errno means "refused".
//!
//! | name                 | call                                               | permitted     | refused                  |
//! |----------------------|----------------------------------------------------|---------------|--------------------------|
//! | `io_uring_setup`     | `io_uring_setup(1)`, closed                        | ok            | EPERM, ENOSYS            |
//! | `bpf`                | `BPF_MAP_CREATE` array 4/4/1, closed               | ok            | EPERM, ENOSYS            |
//! | `perf_event_open`    | sw dummy event on self, user only, closed          | ok            | EPERM, EACCES, ENOSYS    |
//! | `userfaultfd`        | `UFFD_USER_MODE_ONLY`, closed                      | ok            | EPERM, ENOSYS            |
//! | `keyctl`             | `KEYCTL_GET_KEYRING_ID` session, no create         | ok, ENOKEY    | EPERM, EACCES, ENOSYS    |
//! | `add_key`            | `user` key in the thread keyring, invalidated      | ok, EDQUOT    | EPERM, EACCES, ENOSYS    |
//! | `kexec_load`         | 2^20 segments, NULL list                           | EINVAL, EFAULT| EPERM, ENOSYS            |
//! | `init_module`        | zero-length image                                  | ENOEXEC       | EPERM, ENOSYS            |
//! | `finit_module`       | fd -1                                              | EBADF         | EPERM, ENOSYS            |
//! | `mount_tmpfs`        | tmpfs on a fresh dir under /tmp, unmounted         | ok            | EPERM, ENOSYS            |
//! | `unshare_user`       | `unshare(CLONE_NEWUSER)` in a child                | ok            | EPERM, ENOSPC, EUSERS, ENOSYS |
//! | `unshare_mount`      | `unshare(CLONE_NEWNS)` in a child                  | ok            | EPERM, ENOSPC, ENOSYS    |
//! | `setns`              | into the child's own UTS namespace                 | ok            | EPERM, ENOSYS            |
//! | `pivot_root`         | `pivot_root("", "")`                               | ENOENT        | EPERM, ENOSYS            |
//! | `open_tree`          | `OPEN_TREE_CLONE\|AT_RECURSIVE` of `/`, closed     | ok            | EPERM, ENOSYS            |
//! | `fsopen`             | `fsopen("tmpfs")`, closed                          | ok            | EPERM, ENOSYS            |
//! | `ptrace_attach_pid1` | `PTRACE_SEIZE` pid 1 (same check as ATTACH, no stop) | ok          | EPERM, ENOSYS            |
//! | `reboot`             | `CAD_OFF` with wrong magic                         | EINVAL        | EPERM, ENOSYS            |
//! | `swapon`             | `swapon("")`                                       | ENOENT        | EPERM, ENOSYS            |
//!
//! `setns` is only "ok" when the UTS namespace belongs to the caller's user namespace, as in an
//! agentbox sandbox (all its namespaces are made with its user namespace). `ptrace_attach_pid1`
//! can be refused even on a root host when pid 1 holds capabilities the caller lacks.
//!
//! ENOSYS counts as refused because seccomp filters commonly deny with it. A child killed by a
//! signal (`"signal:SIGSYS"`: a seccomp kill action) also counts as refused. Anything else
//! (`"setup:fork:EAGAIN"`, `"cleanup-failed"`, an unlisted errno) is "unknown".

use std::path::{Path, PathBuf};

use abx_sys::probe::{self as sys, Attempt, Failure};
use serde_json::{Map, Value};

/// One attempt and how to read its outcome.
#[derive(Debug)]
pub struct Probe {
    pub name: &'static str,
    pub attempt: fn() -> Attempt,
    /// Errnos that mean the call got past the permission check (besides success).
    pub permitted: &'static [&'static str],
    /// Errnos that mean the call was refused.
    pub refused: &'static [&'static str],
}

const fn probe(
    name: &'static str,
    attempt: fn() -> Attempt,
    permitted: &'static [&'static str],
    refused: &'static [&'static str],
) -> Probe {
    Probe { name, attempt, permitted, refused }
}

const PERM: &[&str] = &["EPERM", "ENOSYS"];

/// Every attempt `report` makes, in order.
pub const PROBES: &[Probe] = &[
    probe("io_uring_setup", sys::try_io_uring_setup, &[], PERM),
    probe("bpf", sys::try_bpf_map_create, &[], PERM),
    probe("perf_event_open", sys::try_perf_event_open, &[], &["EPERM", "EACCES", "ENOSYS"]),
    probe("userfaultfd", sys::try_userfaultfd, &[], PERM),
    probe("keyctl", sys::try_keyctl, &["ENOKEY"], &["EPERM", "EACCES", "ENOSYS"]),
    probe("add_key", sys::try_add_key, &["EDQUOT"], &["EPERM", "EACCES", "ENOSYS"]),
    probe("kexec_load", sys::try_kexec_load, &["EINVAL", "EFAULT"], PERM),
    probe("init_module", sys::try_init_module, &["ENOEXEC"], PERM),
    probe("finit_module", sys::try_finit_module, &["EBADF"], PERM),
    probe("mount_tmpfs", mount_tmpfs, &[], PERM),
    probe("unshare_user", sys::try_unshare_user, &[], &["EPERM", "ENOSPC", "EUSERS", "ENOSYS"]),
    probe("unshare_mount", sys::try_unshare_mount, &[], &["EPERM", "ENOSPC", "ENOSYS"]),
    probe("setns", sys::try_setns, &[], PERM),
    probe("pivot_root", sys::try_pivot_root, &["ENOENT"], PERM),
    probe("open_tree", sys::try_open_tree, &[], PERM),
    probe("fsopen", sys::try_fsopen, &[], PERM),
    probe("ptrace_attach_pid1", ptrace_pid1, &[], PERM),
    probe("reboot", sys::try_reboot, &["EINVAL"], PERM),
    probe("swapon", sys::try_swapon, &["ENOENT"], PERM),
];

/// Runs every probe; returns `(syscalls, verdicts)`: name → outcome (`"ok"`, `"EPERM"`, …)
/// and name → `"permitted"`, `"refused"` or `"unknown"`.
pub fn run_all() -> (Map<String, Value>, Map<String, Value>) {
    let mut outcomes = Map::new();
    let mut verdicts = Map::new();
    for p in PROBES {
        let attempt = (p.attempt)();
        outcomes.insert(p.name.into(), outcome(&attempt).into());
        verdicts.insert(p.name.into(), verdict(p, &attempt).into());
    }
    (outcomes, verdicts)
}

/// The report's text for an outcome: `"ok"`, an errno name, `"signal:SIGSYS"`,
/// `"setup:<step>:<errno>"` or `"cleanup-failed"`.
pub fn outcome(attempt: &Attempt) -> String {
    match attempt {
        Ok(()) => "ok".into(),
        Err(Failure::Errno(e)) => errno(*e),
        Err(Failure::Signal(s)) => match sys::signal_name(*s) {
            Some(name) => format!("signal:{name}"),
            None => format!("signal:{s}"),
        },
        Err(Failure::Setup { step, errno: e }) => format!("setup:{step}:{}", errno(*e)),
        Err(Failure::Cleanup) => "cleanup-failed".into(),
    }
}

/// The name of an errno (`"EPERM"`), or `"errno:<n>"` for one without a known name.
pub fn errno(e: i32) -> String {
    sys::errno_name(e).map_or_else(|| format!("errno:{e}"), str::to_owned)
}

/// Whether `attempt` shows the call permitted, refused, or neither.
pub fn verdict(probe: &Probe, attempt: &Attempt) -> &'static str {
    match attempt {
        Ok(()) => "permitted",
        Err(Failure::Signal(_)) => "refused",
        Err(Failure::Errno(e)) => {
            let name = errno(*e);
            if probe.permitted.contains(&name.as_str()) {
                "permitted"
            } else if probe.refused.contains(&name.as_str()) {
                "refused"
            } else {
                "unknown"
            }
        }
        Err(Failure::Setup { .. } | Failure::Cleanup) => "unknown",
    }
}

fn ptrace_pid1() -> Attempt {
    sys::try_ptrace_seize(1)
}

/// Mounts a tmpfs on a fresh directory under `/tmp` (or `$TMPDIR`) and unmounts it; the
/// directory is removed afterwards.
fn mount_tmpfs() -> Attempt {
    let dir = fresh_dir()?;
    let attempt = sys::try_mount_tmpfs(&dir);
    if let Err(e) = std::fs::remove_dir(&dir) {
        eprintln!("abx-probe: cannot remove {}: {e}", dir.display());
    }
    attempt
}

/// Creates an empty directory `abx-probe-<pid>-<n>` in `/tmp` or, failing that, `$TMPDIR`.
fn fresh_dir() -> Result<PathBuf, Failure> {
    use std::os::unix::fs::DirBuilderExt;
    let mut last = 0;
    for base in [Path::new("/tmp").to_path_buf(), std::env::temp_dir()] {
        for n in 0..100 {
            let dir = base.join(format!("abx-probe-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    last = e.raw_os_error().unwrap_or(0);
                    break;
                }
            }
        }
    }
    Err(Failure::Setup { step: "mkdir", errno: last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(name: &str) -> &'static Probe {
        PROBES.iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn outcomes_read_as_documented() {
        assert_eq!(outcome(&Ok(())), "ok");
        assert_eq!(outcome(&Err(Failure::Errno(1))), "EPERM");
        assert_eq!(outcome(&Err(Failure::Errno(254))), "errno:254");
        assert_eq!(outcome(&Err(Failure::Signal(31))), "signal:SIGSYS");
        assert_eq!(outcome(&Err(Failure::Setup { step: "fork", errno: 11 })), "setup:fork:EAGAIN");
        assert_eq!(outcome(&Err(Failure::Cleanup)), "cleanup-failed");
    }

    #[test]
    fn verdicts_tell_permission_apart_from_arguments() {
        let kexec = find("kexec_load");
        assert_eq!(verdict(kexec, &Err(Failure::Errno(22))), "permitted"); // EINVAL
        assert_eq!(verdict(kexec, &Err(Failure::Errno(1))), "refused"); // EPERM
        assert_eq!(verdict(kexec, &Err(Failure::Signal(31))), "refused");
        assert_eq!(verdict(kexec, &Err(Failure::Errno(5))), "unknown"); // EIO
        assert_eq!(verdict(find("swapon"), &Err(Failure::Errno(2))), "permitted"); // ENOENT
        assert_eq!(verdict(find("bpf"), &Ok(())), "permitted");
    }

    #[test]
    fn probe_names_are_unique() {
        let mut names: Vec<_> = PROBES.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PROBES.len());
    }
}
