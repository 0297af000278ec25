//! Which cgroup hierarchies are mounted where, read from `/proc/self/mountinfo`.
//!
//! A mountinfo line is
//! `id parent major:minor root mount-point mount-options [optional...] - fstype source super-options`;
//! for a v1 hierarchy the super options name its controllers (`rw,cpu,cpuacct`,
//! `rw,name=systemd`), for cgroup2 they hold flags such as `nsdelegate`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the kernel describes this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The v1 controllers agentbox uses for limits and statistics.
pub(crate) const V1_LIMIT_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

/// Super options of a v1 mount that are flags, not controllers.
const V1_FLAGS: [&str; 9] =
    ["rw", "ro", "noprefix", "clone_children", "xattr", "none", "all", "cpuset_v2_mode", "favordynmods"];

/// How a host's cgroups are arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Only v1 hierarchies: limits, freezing and killing all through v1 controllers.
    V1,
    /// v1 controllers plus a cgroup2 hierarchy without those controllers (usually at
    /// `/sys/fs/cgroup/unified`): limits on v1, freeze and kill on v2.
    Hybrid,
    /// One cgroup2 hierarchy with the controllers.
    V2,
}

/// One mounted v1 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Mount {
    /// Mount point, e.g. `/sys/fs/cgroup/memory`.
    pub path: PathBuf,
    /// Controllers bound to it (`cpu`, `cpuacct`, …); a named hierarchy shows as `name=systemd`.
    pub controllers: Vec<String>,
}

impl V1Mount {
    /// Whether `controller` is bound to this hierarchy.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// The cgroup mounts of a host: one entry per v1 hierarchy and at most one cgroup2 mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// v1 hierarchies, first mount of each in mountinfo order.
    pub v1: Vec<V1Mount>,
    /// The cgroup2 mount point, if any (first one in mountinfo order).
    pub v2: Option<PathBuf>,
}

impl Layout {
    /// Reads and parses [`MOUNTINFO`].
    pub fn detect() -> Result<Self> {
        Self::from_file(Path::new(MOUNTINFO))
    }

    /// Reads and parses a mountinfo file.
    pub fn from_file(path: &Path) -> Result<Self> {
        std::fs::read_to_string(path)
            .map(|text| Self::from_mountinfo(&text))
            .map_err(|source| Error::MountTable { path: path.to_owned(), source })
    }

    /// Parses mountinfo text; lines that are not cgroup mounts (or are malformed) are skipped.
    pub fn from_mountinfo(text: &str) -> Self {
        let mut layout = Self::default();
        for mount in text.lines().filter_map(parse_line) {
            layout.add(mount);
        }
        layout
    }

    fn add(&mut self, mount: Mount) {
        match mount {
            Mount::V2(path) => {
                self.v2.get_or_insert(path);
            }
            Mount::V1(m) if !self.v1.iter().any(|v| v.controllers == m.controllers) => self.v1.push(m),
            Mount::V1(_) => {}
        }
    }

    /// The arrangement, or `None` when no usable hierarchy is mounted. Any v1 limit controller
    /// (memory, cpu, cpuacct, pids) makes the host V1 or Hybrid; a v1 `name=systemd` alone
    /// next to cgroup2 is V2.
    pub fn kind(&self) -> Option<Kind> {
        let v1 = self.v1.iter().any(|m| V1_LIMIT_CONTROLLERS.iter().any(|c| m.has(c)));
        match (v1, self.v2.is_some()) {
            (true, true) => Some(Kind::Hybrid),
            (true, false) => Some(Kind::V1),
            (false, true) => Some(Kind::V2),
            (false, false) => None,
        }
    }

    /// The v1 hierarchy that carries `controller`.
    pub fn v1_mount(&self, controller: &str) -> Option<&V1Mount> {
        self.v1.iter().find(|m| m.has(controller))
    }
}

enum Mount {
    V1(V1Mount),
    V2(PathBuf),
}

fn parse_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let sep = fields.iter().position(|f| *f == "-")?;
    let mount_point = PathBuf::from(unescape(fields.get(4)?));
    let (fstype, options) = (*fields.get(sep + 1)?, *fields.get(sep + 3)?);
    match fstype {
        "cgroup2" => Some(Mount::V2(mount_point)),
        "cgroup" => Some(Mount::V1(V1Mount { path: mount_point, controllers: controllers(options) })),
        _ => None,
    }
}

fn controllers(super_options: &str) -> Vec<String> {
    super_options
        .split(',')
        .filter(|o| !V1_FLAGS.contains(o) && (!o.contains('=') || o.starts_with("name=")))
        .map(str::to_owned)
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for a backslash, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match octal(&bytes[i..]) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn octal(s: &[u8]) -> Option<u8> {
    match s {
        [b'\\', a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', ..] => {
            Some((a - b'0') * 64 + (b - b'0') * 8 + (c - b'0'))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This development host: v1 controllers each on their own mount plus an empty cgroup2.
    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A systemd v2-only host (Debian 12 / Fedora), cgroup2 with nsdelegate.
    const V2_NSDELEGATE: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
26 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
27 26 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:3 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
28 26 0:24 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:4 - pstore pstore rw
";

    /// A container's view: cgroup2 without nsdelegate, read-only, with optional fields.
    const V2_PLAIN: &str = "\
700 650 0:64 / / rw,relatime master:300 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
705 700 0:68 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
706 705 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime master:9 shared:12 - cgroup2 cgroup rw
";

    /// An old v1-only host with co-mounted cpu,cpuacct and a mount point with a space.
    const V1_ONLY: &str = "\
24 18 0:20 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
25 24 0:21 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:5 - cgroup cgroup rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
28 24 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
29 24 0:25 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,memory
30 24 0:26 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,pids
31 24 0:27 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,freezer
32 24 0:28 / /mnt/odd\\040dir rw,relatime - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn hybrid_host() {
        let layout = Layout::from_mountinfo(HYBRID);
        assert_eq!(layout.kind(), Some(Kind::Hybrid));
        assert_eq!(layout.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(layout.v1.len(), 9);
        let memory = layout.v1_mount("memory").unwrap();
        assert_eq!(memory.path, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(layout.v1_mount("cpuacct").unwrap().controllers, ["cpuacct"]);
        assert_eq!(layout.v1_mount("name=systemd").unwrap().path, Path::new("/sys/fs/cgroup/systemd"));
    }

    #[test]
    fn v2_with_nsdelegate() {
        let layout = Layout::from_mountinfo(V2_NSDELEGATE);
        assert_eq!(layout.kind(), Some(Kind::V2));
        assert_eq!(layout.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(layout.v1.is_empty());
    }

    #[test]
    fn v2_without_nsdelegate() {
        let layout = Layout::from_mountinfo(V2_PLAIN);
        assert_eq!(layout.kind(), Some(Kind::V2));
        assert_eq!(layout.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn v1_only_host() {
        let layout = Layout::from_mountinfo(V1_ONLY);
        assert_eq!(layout.kind(), Some(Kind::V1));
        assert_eq!(layout.v2, None);
        let cpu = layout.v1_mount("cpu").unwrap();
        assert_eq!(cpu.path, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(cpu.controllers, ["cpu", "cpuacct"]);
        assert_eq!(layout.v1_mount("cpuacct"), Some(cpu), "co-mounted hierarchy found by either name");
        assert_eq!(layout.v1_mount("name=systemd").unwrap().controllers, ["name=systemd"]);
        assert_eq!(layout.v1.len(), 5, "the second mount of cpu,cpuacct is the same hierarchy");
    }

    #[test]
    fn systemd_named_hierarchy_alone_is_v2() {
        let text = format!("{V2_NSDELEGATE}40 27 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n");
        assert_eq!(Layout::from_mountinfo(&text).kind(), Some(Kind::V2));
    }

    #[test]
    fn no_cgroups_and_garbage() {
        let layout = Layout::from_mountinfo("garbage\n1 2 3\n22 1 259:2 / / rw - ext4 /dev/x rw\n");
        assert_eq!(layout.kind(), None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape(r"/mnt/odd\040dir\134x"), r"/mnt/odd dir\x");
        assert_eq!(unescape(r"/a\09"), r"/a\09");
    }

    #[test]
    fn reads_this_hosts_mountinfo() {
        Layout::detect().unwrap();
    }
}
