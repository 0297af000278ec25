//! The ordered setup a new sandbox performs inside its namespaces, as data.
//!
//! [`build`] turns a [`SpawnSpec`] into a list of [`Step`]s; [`crate::child`] executes
//! them one by one and reports the first failure with the step's description. Until
//! `pivot_root`, every path is relative to the sandbox directory, which is the child's
//! working directory (entered through a descriptor, so the directories above it need not
//! be searchable by the sandbox's user); the steps after it take absolute paths, resolved
//! in the sandbox's own root. Keeping
//! the plan as data makes the order reviewable (docs/sandbox-setup.md) and testable
//! without privileges.

use std::fmt;
use std::path::PathBuf;

use crate::spec::{SandboxDirs, SpawnSpec};

/// Mount flags used by the plan (a subset of MS_*).
pub mod flags {
    pub const RDONLY: u64 = libc::MS_RDONLY;
    pub const NOSUID: u64 = libc::MS_NOSUID;
    pub const NODEV: u64 = libc::MS_NODEV;
    pub const NOEXEC: u64 = libc::MS_NOEXEC;
}

/// One setup operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Give the sandbox (after pivot_root) its /etc/resolv.conf: the file `source` (opened
    /// before pivot_root) bound over it where it is a regular file; else `contents`
    /// written there (a symlink is replaced), mode 0644.
    ResolvConf {
        source: PathBuf,
        contents: String,
    },
    /// Attach the idmapped tree received as descriptor number `index` at `target`.
    AttachTree {
        index: usize,
        target: PathBuf,
    },
    /// Mount the overlay root filesystem (relative paths keep the option string short).
    Overlay {
        lower: Vec<String>,
        upper: String,
        work: String,
        target: PathBuf,
        volatile: bool,
    },
    /// Create a directory (and parents) if missing.
    Mkdir {
        path: PathBuf,
    },
    /// Create an empty file if missing (a bind-mount target).
    Touch {
        path: PathBuf,
    },
    /// Mount a fresh filesystem instance.
    Mount {
        fstype: &'static str,
        target: PathBuf,
        flags: u64,
        data: String,
    },
    /// Bind `source` onto `target`.
    Bind {
        source: PathBuf,
        target: PathBuf,
    },
    /// Hide a file by binding /dev/null over it, when it exists.
    MaskFile {
        path: PathBuf,
        null: PathBuf,
    },
    /// Hide a directory under an empty read-only directory, when it exists.
    MaskDir {
        path: PathBuf,
        /// The empty read-only directory bound over it.
        empty: PathBuf,
    },
    /// Set a path's permission bits (umask-proof).
    Chmod {
        path: PathBuf,
        mode: u32,
    },
    /// Bind a path onto itself read-only, when it exists.
    ReadOnly {
        path: PathBuf,
    },
    Symlink {
        target: &'static str,
        link: PathBuf,
    },
    /// pivot_root into `root` and detach the old root.
    PivotRoot {
        root: PathBuf,
    },
    SetHostname {
        name: String,
    },
    /// Continue the new pid namespace's numbering above `pid` (its `ns_last_pid`, through
    /// the /proc mounted at `path`'s root); a pid beyond the host's `pid_max` is left out.
    LastPid {
        path: PathBuf,
        pid: u32,
    },
    /// Attach volume tree `index` (a received descriptor) at `target`, an absolute path
    /// resolved inside the sandbox's own root (so it runs after [`Step::PivotRoot`]):
    /// missing directories are created (mode 0755, owned by the sandbox's root); an
    /// existing component that is a symlink or not a directory is refused.
    AttachVolume {
        index: usize,
        target: String,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::AttachTree { index, target } => write!(f, "attach idmapped tree {index} at {}", target.display()),
            Step::Overlay { target, .. } => write!(f, "mount overlay root at {}", target.display()),
            Step::Mkdir { path } => write!(f, "create directory {}", path.display()),
            Step::Touch { path } => write!(f, "create file {}", path.display()),
            Step::Mount { fstype, target, .. } => write!(f, "mount {fstype} at {}", target.display()),
            Step::Bind { source, target } => write!(f, "bind {} to {}", source.display(), target.display()),
            Step::MaskFile { path, .. } => write!(f, "mask file {}", path.display()),
            Step::MaskDir { path, .. } => write!(f, "mask directory {}", path.display()),
            Step::Chmod { path, mode } => write!(f, "chmod {mode:o} {}", path.display()),
            Step::ReadOnly { path } => write!(f, "make {} read-only", path.display()),
            Step::Symlink { target, link } => write!(f, "symlink {} -> {target}", link.display()),
            Step::PivotRoot { root } => write!(f, "pivot_root into {}", root.display()),
            Step::SetHostname { name } => write!(f, "set hostname {name}"),
            Step::LastPid { pid, .. } => write!(f, "continue pids above {pid}"),
            Step::ResolvConf { .. } => write!(f, "set /etc/resolv.conf"),
            Step::AttachVolume { index, target } => write!(f, "attach volume tree {index} at {target}"),
        }
    }
}

/// Host device nodes bound into the sandbox's /dev.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// /proc files hidden behind /dev/null.
pub const MASKED_FILES: [&str; 5] =
    ["proc/kcore", "proc/keys", "proc/timer_list", "proc/sched_debug", "proc/latency_stats"];
/// Directories hidden under an empty read-only tmpfs.
pub const MASKED_DIRS: [&str; 4] = ["proc/acpi", "proc/scsi", "sys/firmware", "sys/devices/virtual/powercap"];
/// /proc paths made read-only.
pub const READ_ONLY: [&str; 5] = ["proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger"];

/// How many mount trees the plan for `spec` expects.
pub fn trees(spec: &SpawnSpec) -> usize {
    spec.layers.len() + 2 + spec.volumes.len()
}

/// Builds the setup plan for `spec`. Descriptor `i < layers` is layer `i`'s idmapped tree;
/// descriptor `layers` is the data tree, `layers + 1` the slot's sysfs, `layers + 2 + i`
/// volume `i`'s idmapped tree.
///
/// The plan ends inside the sandbox's own root: after `pivot_root`, the hostname and
/// /etc/resolv.conf, the volumes are attached. [`crate::child`] then confines the process
/// (limits, descriptors, session, capabilities, no_new_privs, seccomp) and execs the agent.
pub fn build(spec: &SpawnSpec) -> Vec<Step> {
    use flags::*;
    let dirs = SandboxDirs::new(PathBuf::from("."));
    let root = dirs.rootfs();
    let r = |p: &str| root.join(p);
    let mut steps = Vec::new();
    for i in 0..spec.layers.len() {
        steps.push(Step::AttachTree { index: i, target: dirs.lower_mount(i) });
    }
    steps.push(Step::AttachTree { index: spec.layers.len(), target: dirs.data_mount() });
    steps.push(Step::Overlay {
        lower: (0..spec.layers.len()).rev().map(|i| format!("lower/{i}")).collect(),
        upper: "dm/upper".into(),
        work: "dm/work".into(),
        target: root.clone(),
        volatile: spec.volatile,
    });
    for d in ["proc", "sys", "dev", "tmp"] {
        steps.push(Step::Mkdir { path: r(d) });
    }
    steps.push(Step::Mount { fstype: "proc", target: r("proc"), flags: NOSUID | NODEV | NOEXEC, data: String::new() });
    // Read-only, nosuid, nodev, noexec: set by the spawner, which mounted it.
    steps.push(Step::AttachTree { index: spec.layers.len() + 1, target: r("sys") });
    steps.push(Step::Mount {
        fstype: "tmpfs",
        target: r("dev"),
        flags: NOSUID | NOEXEC,
        data: "mode=755,size=65536k".into(),
    });
    for dev in DEVICES {
        steps.push(Step::Touch { path: r("dev").join(dev) });
        steps.push(Step::Bind { source: PathBuf::from("/dev").join(dev), target: r("dev").join(dev) });
    }
    steps.push(Step::Mkdir { path: r("dev/pts") });
    steps.push(Step::Mount {
        fstype: "devpts",
        target: r("dev/pts"),
        flags: NOSUID | NOEXEC,
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5".into(),
    });
    steps.push(Step::Symlink { target: "pts/ptmx", link: r("dev/ptmx") });
    // POSIX shared memory lives in /dev's tmpfs (one filesystem instance fewer per
    // sandbox); mode 1777 like /tmp.
    steps.push(Step::Mkdir { path: r("dev/shm") });
    steps.push(Step::Chmod { path: r("dev/shm"), mode: 0o1777 });
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        steps.push(Step::Symlink { target, link: r("dev").join(link) });
    }
    for f in MASKED_FILES {
        steps.push(Step::MaskFile { path: r(f), null: r("dev/null") });
    }
    // One empty read-only tmpfs, bound over every masked directory that exists.
    steps.push(Step::Mount {
        fstype: "tmpfs",
        target: dirs.mask(),
        flags: RDONLY | NOSUID | NODEV | NOEXEC,
        data: "size=4k,mode=555".into(),
    });
    for d in MASKED_DIRS {
        steps.push(Step::MaskDir { path: r(d), empty: dirs.mask() });
    }
    // Before /proc/sys turns read-only.
    if spec.last_pid > 0 {
        steps.push(Step::LastPid { path: r("proc/sys/kernel/ns_last_pid"), pid: spec.last_pid });
    }
    for p in READ_ONLY {
        steps.push(Step::ReadOnly { path: r(p) });
    }
    steps.push(Step::PivotRoot { root });
    steps.push(Step::SetHostname { name: spec.hostname.clone() });
    if let Some(contents) = &spec.resolv_conf {
        steps.push(Step::ResolvConf { source: dirs.resolv_conf(), contents: contents.clone() });
    }
    // Volumes last: their targets are resolved inside the sandbox's root (a symlink in
    // the template cannot point them at a host path), and nothing the setup writes
    // (/etc/resolv.conf) can land in a host directory. Shallowest target first (stable),
    // so a volume nested in another is attached on top of it, not hidden under it.
    let first = spec.layers.len() + 2;
    let mut volumes: Vec<(usize, &str)> = spec.volumes.iter().map(|v| v.target.as_str()).enumerate().collect();
    volumes.sort_by_key(|(_, target)| target.matches('/').count());
    for (i, target) in volumes {
        steps.push(Step::AttachVolume { index: first + i, target: target.to_owned() });
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{VolumeSpec, validate_volume_target};

    fn spec() -> SpawnSpec {
        SpawnSpec {
            id: "abx-test".into(),
            dir: "/s/abx-test".into(),
            layers: vec!["/l/a".into(), "/l/b".into()],
            uid_base: 100000,
            uid_count: 65536,
            hostname: "h".into(),
            cgroup_dir: None,
            cgroup_tasks: vec![],
            seccomp: vec![],
            capabilities: vec![],
            nofile: 1024,
            volatile: true,
            resolv_conf: None,
            net: None,
            volumes: vec![],
            last_pid: 0,
        }
    }

    fn volume(source: &str, target: &str, read_only: bool) -> VolumeSpec {
        VolumeSpec { source: source.into(), target: target.into(), read_only }
    }

    #[test]
    fn overlay_lists_top_layer_first_and_data_tree_last() {
        let steps = build(&spec());
        assert_eq!(steps[2], Step::AttachTree { index: 2, target: "./dm".into() });
        let Step::Overlay { lower, .. } = &steps[3] else { panic!("overlay must follow the attachments") };
        assert_eq!(lower, &["lower/1", "lower/0"]);
    }

    #[test]
    fn proc_is_masked_before_pivot_and_pivot_precedes_hostname() {
        let steps = build(&spec());
        let pos = |want: &dyn Fn(&Step) -> bool| steps.iter().position(want).unwrap();
        let pivot = pos(&|s| matches!(s, Step::PivotRoot { .. }));
        let proc = pos(&|s| matches!(s, Step::Mount { fstype: "proc", .. }));
        let kcore = pos(&|s| matches!(s, Step::MaskFile { path, .. } if path.ends_with("proc/kcore")));
        let sys_ro = pos(&|s| matches!(s, Step::ReadOnly { path } if path.ends_with("proc/sys")));
        let host = pos(&|s| matches!(s, Step::SetHostname { .. }));
        assert!(proc < kcore && kcore < pivot && sys_ro < pivot && pivot < host);
        assert!(matches!(steps.last(), Some(Step::SetHostname { .. })));
        let mut with_dns = spec();
        with_dns.resolv_conf = Some("nameserver 10.0.0.1\n".into());
        assert!(
            matches!(build(&with_dns).last(), Some(Step::ResolvConf { source, .. }) if source.ends_with("resolv.conf"))
        );
    }

    #[test]
    fn every_device_is_bound_from_the_host() {
        let steps = build(&spec());
        for dev in DEVICES {
            assert!(steps.contains(&Step::Bind {
                source: PathBuf::from("/dev").join(dev),
                target: PathBuf::from("./rootfs/dev").join(dev)
            }));
        }
    }

    #[test]
    fn volumes_are_attached_inside_the_new_root_and_end_the_plan() {
        let mut spec = spec();
        spec.resolv_conf = Some("nameserver 10.0.0.1\n".into());
        spec.volumes = vec![volume("/srv/data", "/data", false), volume("/home/me/src", "/home/user/work", true)];
        assert_eq!(trees(&spec), 2 + 2 + 2);
        let steps = build(&spec);
        let pos = |want: &dyn Fn(&Step) -> bool| steps.iter().position(want).unwrap();
        let pivot = pos(&|s| matches!(s, Step::PivotRoot { .. }));
        let resolv = pos(&|s| matches!(s, Step::ResolvConf { .. }));
        let data = pos(&|s| matches!(s, Step::AttachVolume { .. }));
        assert!(pivot < resolv && resolv < data, "volumes come after pivot_root and /etc/resolv.conf");
        // The plan ends with them: child::setup confines the process (limits, capabilities,
        // seccomp) only after the last step.
        assert_eq!(
            steps[data..],
            [
                Step::AttachVolume { index: 4, target: "/data".into() },
                Step::AttachVolume { index: 5, target: "/home/user/work".into() },
            ]
        );
        // The descriptors before them keep their meaning.
        assert!(steps.contains(&Step::AttachTree { index: 3, target: "./rootfs/sys".into() }));
        assert_eq!(steps[2], Step::AttachTree { index: 2, target: "./dm".into() });
        assert_eq!(build(&self::spec()).iter().filter(|s| matches!(s, Step::AttachVolume { .. })).count(), 0);
    }

    #[test]
    fn a_nested_volume_is_attached_after_the_one_containing_it() {
        let mut spec = spec();
        spec.layers.truncate(1);
        spec.volumes =
            vec![volume("/h/inner", "/a/b", true), volume("/h/outer", "/a", false), volume("/h/c", "/c", false)];
        let volumes: Vec<_> = build(&spec).into_iter().filter(|s| matches!(s, Step::AttachVolume { .. })).collect();
        assert_eq!(
            volumes,
            [
                Step::AttachVolume { index: 4, target: "/a".into() },
                Step::AttachVolume { index: 5, target: "/c".into() },
                Step::AttachVolume { index: 3, target: "/a/b".into() },
            ]
        );
        assert_eq!(volumes[2].to_string(), "attach volume tree 3 at /a/b");
    }

    #[test]
    fn volume_targets_are_validated() {
        for ok in ["/data", "/home/user/work", "/procfs", "/devel/x", "/.hidden", "/a..b"] {
            assert_eq!(validate_volume_target(ok), Ok(()), "{ok}");
        }
        for (bad, reason) in [
            ("relative", "not an absolute path"),
            ("", "not an absolute path"),
            ("/", "root directory"),
            ("/a/../b", "not normalized"),
            ("/a/./b", "not normalized"),
            ("/proc/x", "/proc"),
            ("/proc", "/proc"),
            ("/sys/fs/cgroup", "/sys"),
            ("/dev", "/dev"),
            ("/a//b", "empty component"),
            ("/a/", "trailing slash"),
            ("/a\0b", "NUL"),
        ] {
            let e = validate_volume_target(bad).expect_err(bad);
            assert!(e.contains(reason) && e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        let long = format!("/{}", "x".repeat(1024));
        assert!(validate_volume_target(&long).unwrap_err().contains("longer than 1024 bytes"));
        assert_eq!(validate_volume_target(&long[..1024]), Ok(()));
    }

    #[test]
    fn a_spec_without_volumes_still_parses() {
        let mut json = serde_json::to_value(spec()).unwrap();
        json.as_object_mut().unwrap().remove("volumes");
        let parsed: SpawnSpec = serde_json::from_value(json).unwrap();
        assert!(parsed.volumes.is_empty());
    }

    /// A restarted sandbox's pid floor is set through its own /proc while /proc/sys is
    /// still writable; a first run sets none.
    #[test]
    fn a_restart_continues_pids_before_proc_sys_is_read_only() {
        assert!(!build(&spec()).iter().any(|s| matches!(s, Step::LastPid { .. })));
        let steps = build(&SpawnSpec { last_pid: 41, ..spec() });
        let at = |f: &dyn Fn(&Step) -> bool| steps.iter().position(f).unwrap();
        let last = at(&|s| matches!(s, Step::LastPid { pid: 41, .. }));
        let Step::LastPid { path, .. } = &steps[last] else { unreachable!() };
        assert_eq!(path, &PathBuf::from("./rootfs/proc/sys/kernel/ns_last_pid"));
        assert!(last > at(&|s| matches!(s, Step::Mount { fstype: "proc", .. })));
        assert!(last < at(&|s| matches!(s, Step::ReadOnly { path } if path.ends_with("proc/sys"))));
    }
}
