//! The daemon's request to the spawner and its reply.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the spawner needs to create one sandbox. The daemon prepares the sandbox
/// directory `dir` beforehand (see [`SandboxDirs`]) and the cgroups.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnSpec {
    pub id: String,
    /// The sandbox's state directory on the host.
    pub dir: PathBuf,
    /// Template layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// First host uid/gid of the sandbox's range; root inside maps to it.
    pub uid_base: u32,
    /// Size of the range (65536 gives the usual 0..65535 inside).
    pub uid_count: u32,
    pub hostname: String,
    /// cgroup2 directory the child is created in (`CLONE_INTO_CGROUP`).
    pub cgroup_dir: Option<PathBuf>,
    /// cgroup v1 `tasks` files the child joins itself (writes `0`) before anything else.
    pub cgroup_tasks: Vec<PathBuf>,
    /// Compiled seccomp programs in load order (raw `sock_filter` bytes).
    #[serde(with = "b64_vecs")]
    pub seccomp: Vec<Vec<u8>>,
    /// Capabilities kept (numbers), everything else is dropped.
    pub capabilities: Vec<u32>,
    /// RLIMIT_NOFILE for the sandbox (clamped to the host's hard limit).
    pub nofile: u64,
    /// Mount the overlay with `volatile` (no sync to disk; for disposable sandboxes).
    pub volatile: bool,
    /// Contents of the sandbox's /etc/resolv.conf (its DNS proxy); None leaves the
    /// template's file alone. The slot's [`SandboxDirs::resolv_conf`] (the daemon keeps it
    /// with these contents) is bound over a regular file there; where the template has a
    /// symlink or nothing, the contents are written in its place after pivot_root.
    #[serde(default)]
    pub resolv_conf: Option<String>,
    #[serde(default)]
    pub net: Option<SlotNetSpec>,
    /// Host directories mounted into the sandbox, attached in order of target depth
    /// (shallowest first; see [`crate::plan::build`]).
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    /// The highest pid an earlier run of this sandbox handed out to a client (0: none).
    /// The new pid namespace continues above it (`ns_last_pid`), so a client's pid of a
    /// process from before a stop, start or rollback never names a new process.
    #[serde(default)]
    pub last_pid: u32,
}

/// A host directory mounted into a sandbox ("volume"). The spawner clones it as a
/// detached, idmapped, non-recursive mount (nosuid, nodev; read-only if asked) through the
/// sandbox's user namespace: on-disk uid/gid 0 to 65535 appear as the same ids inside, and
/// files the sandbox writes keep their in-sandbox owners on disk (unshifted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// The host directory.
    pub source: PathBuf,
    /// Where it appears inside the sandbox: an absolute, normalized path (see
    /// [`validate_volume_target`]).
    pub target: String,
    pub read_only: bool,
}

/// Longest volume target accepted, in bytes.
pub const MAX_VOLUME_TARGET: usize = 1024;

/// Directories a volume may neither replace nor be mounted under: the sandbox's own
/// proc, sysfs and devices.
const RESERVED_TARGETS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Checks a volume's target path inside the sandbox: absolute, normalized (no empty, `.`
/// or `..` component, no trailing slash), not `/`, not `/proc`, `/sys`, `/dev` nor under
/// them, at most [`MAX_VOLUME_TARGET`] bytes, no NUL byte. The error names the path and
/// the reason.
pub fn validate_volume_target(t: &str) -> Result<(), String> {
    let refuse = |reason: &str| Err(format!("volume target {t:?}: {reason}"));
    if t.len() > MAX_VOLUME_TARGET {
        return Err(format!(
            "volume target {:?}...: longer than {MAX_VOLUME_TARGET} bytes",
            t.chars().take(64).collect::<String>()
        ));
    }
    if t.contains('\0') {
        return refuse("contains a NUL byte");
    }
    let Some(rest) = t.strip_prefix('/') else {
        return refuse("not an absolute path");
    };
    if rest.is_empty() {
        return refuse("the sandbox's root directory cannot be a volume");
    }
    if rest.ends_with('/') {
        return refuse("has a trailing slash");
    }
    for component in rest.split('/') {
        match component {
            "" => return refuse("has an empty component (\"//\")"),
            "." | ".." => return refuse("has a \".\" or \"..\" component (not normalized)"),
            _ => {}
        }
    }
    for reserved in RESERVED_TARGETS {
        if t == reserved || t.strip_prefix(reserved).is_some_and(|r| r.starts_with('/')) {
            return refuse(&format!("{reserved} is the sandbox's own and cannot hold a volume"));
        }
    }
    Ok(())
}

impl SpawnSpec {
    /// The slot-level part: what a prepared sandbox shell was made for.
    pub fn slot(&self) -> SlotSpec {
        SlotSpec {
            dir: self.dir.clone(),
            uid_base: self.uid_base,
            uid_count: self.uid_count,
            cgroup_dir: self.cgroup_dir.clone(),
            cgroup_tasks: self.cgroup_tasks.clone(),
            net: self.net.clone(),
        }
    }
}

/// What a slot gives every sandbox that uses it: directory, uid range, cgroups. Enough
/// to create the namespaces ahead of time (see the spawner's prepared shells).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSpec {
    pub dir: PathBuf,
    pub uid_base: u32,
    pub uid_count: u32,
    pub cgroup_dir: Option<PathBuf>,
    pub cgroup_tasks: Vec<PathBuf>,
    /// The slot's network wiring, made with its network namespace (None: loopback only).
    #[serde(default)]
    pub net: Option<SlotNetSpec>,
}

/// A slot's veth pair: `host_if` on the host side with the shared gateway address,
/// `eth0` inside with `addr`, routed (no bridge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotNetSpec {
    pub host_if: String,
    pub addr: std::net::Ipv4Addr,
    pub gateway: std::net::Ipv4Addr,
}

/// The layout of a sandbox directory, shared by the daemon (which creates it) and the
/// setup plan (which mounts inside it).
#[derive(Debug, Clone)]
pub struct SandboxDirs {
    pub root: PathBuf,
}

impl SandboxDirs {
    pub fn new(root: PathBuf) -> Self {
        SandboxDirs { root }
    }
    /// Persistent sandbox data: `upper/` and `work/` of the overlay, on-disk uids unshifted.
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn upper(&self) -> PathBuf {
        self.data().join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.data().join("work")
    }
    /// Where the idmapped data tree is attached inside the sandbox's mount namespace.
    pub fn data_mount(&self) -> PathBuf {
        self.root.join("dm")
    }
    /// Where idmapped layer `i` is attached inside the sandbox's mount namespace.
    pub fn lower_mount(&self, i: usize) -> PathBuf {
        self.root.join("lower").join(i.to_string())
    }
    /// Where the setup mounts the empty read-only tmpfs that masks directories.
    pub fn mask(&self) -> PathBuf {
        self.root.join("mask")
    }
    /// The overlay mount point (the sandbox's future `/`).
    pub fn rootfs(&self) -> PathBuf {
        self.root.join("rootfs")
    }
    /// The agent's listening socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.root.join("agent.sock")
    }
    /// The file bound over the sandbox's /etc/resolv.conf (owned by the sandbox's root):
    /// what the sandbox writes there stays out of its upper layer, snapshots and diffs.
    pub fn resolv_conf(&self) -> PathBuf {
        self.root.join("resolv.conf")
    }
    /// Makes sure the directory exists with everything for `layers` lower layers, owned as
    /// [`SandboxDirs::create`] does. Cheap when it already does (a reused slot).
    pub fn ensure(&self, layers: usize, owner: u32) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.root) {
            Ok(m) if m.uid() == owner && self.upper().is_dir() && self.work().is_dir() && self.mask().is_dir() => {
                self.add_lower_mounts(layers)
            }
            _ => self.create(layers, owner),
        }
    }

    /// Empties the directory for its next sandbox: removes the agent socket, makes
    /// `data/upper` empty and clears what overlayfs leaves in `data/work` that would stop
    /// the next mount (the `volatile` marker; overlayfs recreates `work/work` itself). A
    /// missing directory is already empty.
    pub fn empty(&self) -> std::io::Result<()> {
        if !self.root.exists() {
            return Ok(());
        }
        let ok_missing = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        // Most sandboxes that only ran commands wrote nothing: keep the empty directory.
        let upper_empty = std::fs::read_dir(self.upper()).map(|mut rd| rd.next().is_none()).unwrap_or(false);
        if !upper_empty {
            ok_missing(std::fs::remove_dir_all(self.upper()))?;
            std::fs::create_dir(self.upper())?;
        }
        self.reset_work()
    }

    /// Readies the directory for another boot on the data it has (a restart, or data
    /// moved in): no agent socket, nothing in `data/work` that would stop the next overlay
    /// mount (the `volatile` marker; overlayfs recreates `work/work` itself).
    pub fn reset_work(&self) -> std::io::Result<()> {
        let ok_missing = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        ok_missing(std::fs::remove_file(self.agent_socket()))?;
        let incompat = self.work().join("work/incompat");
        // What a `volatile` mount leaves is exactly `incompat/volatile/dirty`, an empty
        // file in two directories (overlayfs' `ovl_create_volatile_dirty`): an unlink and
        // two rmdirs, instead of a recursive walk, on every destroy.
        let volatile = incompat.join("volatile");
        if std::fs::remove_file(volatile.join("dirty"))
            .and_then(|()| std::fs::remove_dir(&volatile))
            .and_then(|()| std::fs::remove_dir(&incompat))
            .is_ok()
        {
            return Ok(());
        }
        if self.work().is_dir() {
            ok_missing(std::fs::remove_dir_all(&incompat))
        } else {
            std::fs::create_dir(self.work())
        }
    }

    /// Adds mount points for up to `layers` lower layers to an existing directory.
    pub fn add_lower_mounts(&self, layers: usize) -> std::io::Result<()> {
        for i in 0..layers {
            match std::fs::create_dir(self.lower_mount(i)) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Creates every directory the setup needs for `layers` lower layers. The sandbox
    /// directory belongs to the sandbox's root (`owner`, mode 0700) so that its setup,
    /// which runs as that user, can reach the mount points and no other host user can;
    /// `data/` stays root's (mode 0700) and is reached only through its idmapped mount.
    pub fn create(&self, layers: usize, owner: u32) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b.create(&self.root)?;
        std::os::unix::fs::chown(&self.root, Some(owner), Some(owner))?;
        b.create(self.data())?;
        b.mode(0o755);
        for p in [self.upper(), self.work(), self.data_mount(), self.rootfs(), self.root.join("lower"), self.mask()] {
            b.create(p)?;
        }
        for i in 0..layers {
            b.create(self.lower_mount(i))?;
        }
        Ok(())
    }
}

/// The spawner's answer (sent with the child's pidfd on success).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpawnReply {
    Spawned { pid: i32 },
    Prepared { pid: i32 },
    Forgotten,
    Failed { message: String },
    Hello { version: String, pid: u32, children: usize },
}

/// Messages from the daemon to the spawner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum SpawnerRequest {
    /// Sent with two descriptors: the agent's listening socket and the write end of the
    /// status pipe (closed on successful exec, carries an error message otherwise).
    Spawn {
        spec: Box<SpawnSpec>,
    },
    /// Create a slot's namespaces ahead of time (a "prepared shell"); the next `Spawn` for
    /// the same slot directory uses it. No descriptors.
    Prepare {
        slot: SlotSpec,
    },
    /// The slot is gone: drop its shell and its network namespace.
    Forget {
        dir: PathBuf,
    },
    Hello,
    /// Stop accepting work; exit once no sandbox is left.
    Retire,
}

mod b64_vecs {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for p in v {
            seq.serialize_element(&base64::engine::general_purpose::STANDARD.encode(p))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a `volatile` overlay mount leaves in the work directory must be gone, or the
    /// slot's next mount fails; so must an upper layer's files, but not the directories.
    #[test]
    fn empty_clears_the_volatile_marker_and_the_upper_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = SandboxDirs::new(tmp.path().join("slot"));
        dirs.create(1, rustix::process::getuid().as_raw()).unwrap();
        let incompat = dirs.work().join("work/incompat");
        // As overlayfs leaves it, then with something unexpected in it too.
        for extra in [None, Some("stray")] {
            std::fs::create_dir_all(incompat.join("volatile")).unwrap();
            std::fs::write(incompat.join("volatile/dirty"), b"").unwrap();
            if let Some(name) = extra {
                std::fs::write(incompat.join(name), b"x").unwrap();
            }
            std::fs::write(dirs.upper().join("written"), b"x").unwrap();
            std::fs::write(dirs.agent_socket(), b"").unwrap();
            dirs.empty().unwrap();
            assert!(!incompat.exists(), "{extra:?}");
            assert!(dirs.work().join("work").is_dir() && dirs.upper().is_dir());
            assert_eq!(std::fs::read_dir(dirs.upper()).unwrap().count(), 0);
            assert!(!dirs.agent_socket().exists());
        }
        // Nothing to clear is fine too.
        dirs.reset_work().unwrap();
    }
}
