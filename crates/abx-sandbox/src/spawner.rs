//! The spawner: a small single-threaded process, started by the daemon as
//! `agentbox __spawner --root DIR --agent PATH`, that creates sandboxes and is the parent
//! of every sandbox's PID 1. It does not die with the daemon: a restarted daemon
//! reconnects to it (`<root>/spawner.sock`), and it keeps reaping sandboxes meanwhile.
//! It exits when no daemon is connected and no sandbox is left.
//!
//! Being single-threaded makes `fork` (clone3) safe and cheap here, which a large
//! multi-threaded daemon could not offer.
//!
//! **Prepared shells.** Creating the namespaces (user, pid, time, mount, network, uts,
//! ipc, cgroup) and joining a slot's cgroups does not depend on the sandbox, only on its
//! slot. The daemon asks for that ahead of demand (`Prepare`); the next `Spawn` for the
//! slot only sends the sandbox's spec and descriptors to the waiting shell. A `Spawn`
//! without a prepared shell makes one on the spot and uses it at once. Shells belong to
//! the connected daemon: they are killed when it disconnects, when a new daemon connects
//! and on retirement.
//!
//! **Host unmounts.** A prepared shell's new mount namespace holds a copy of every host
//! mount (made private, and locked, so a host unmount does not reach it) until it pivots
//! into the sandbox's root. A filesystem the host unmounts (a USB disk, a loop image, an
//! NFS export) would stay alive in the waiting shells. The spawner watches its mount table
//! (`/proc/self/mountinfo` is pollable) and, when a mount is gone, replaces its prepared
//! shells with fresh ones made after the unmount.
//!
//! **A network namespace per slot.** Creating a network namespace (loopback device,
//! sysctl tables, IPv6 setup) and tearing it down again is the most expensive part of a
//! sandbox's namespaces. Each slot gets one, made once by the spawner and owned by the
//! host's user namespace, so a sandbox's root cannot reconfigure it (no address, route,
//! firewall or sysctl changes, no raw sockets); ports below 1024 and ICMP echo sockets are
//! opened to everyone in it by sysctl. The sandboxes of a slot use it one after another,
//! never two at once, and nothing of a sandbox survives in it but closing TCP connections.
//! The spawner enters it just for the `clone3` of each shell. Its sysfs, which only a
//! process privileged over the namespace may mount, is mounted once by the spawner and
//! handed to each sandbox as a detached read-only copy.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use abx_sys::process::{Forked, ns};
use rustix::event::{PollFd, PollFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::child::{self, ShellIo};
use crate::spec::{SlotSpec, SpawnReply, SpawnSpec, SpawnerRequest};

/// Largest request accepted.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// Largest go message (a sandbox's spec) sent to a shell.
pub const MAX_GO: usize = 64 * 1024;

/// Most descriptors a go message may carry (the kernel's `SCM_MAX_FD`): the status
/// pipe, the listening socket and [`crate::plan::trees`] mount trees.
pub const MAX_GO_FDS: usize = 253;

/// Largest reply of the spawner.
pub const MAX_REPLY: usize = 4 * 1024;

/// How long a spawner with no daemon and no sandbox lingers before exiting.
const IDLE_EXIT: Duration = Duration::from_secs(5);

/// How long a new shell may take to create its namespaces.
const SHELL_TIMEOUT: Duration = Duration::from_secs(10);

/// Spawner options (from its command line).
#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    pub agent: PathBuf,
}

/// Paths of the spawner's files under a state root.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("spawner.sock")
}

fn lock_path(root: &Path) -> PathBuf {
    root.join("spawner.lock")
}

/// Runs the spawner until it has nothing left to do. Returns an error text if it cannot
/// start; returns Ok if another spawner already serves this root.
pub fn run(opts: &Options) -> Result<(), String> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(&opts.root))
        .map_err(|e| format!("open spawner lock: {e}"))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Ok(());
    }
    let memfd = abx_sys::fd::sealed_exec_memfd("agentbox-agent", &opts.agent)
        .map_err(|e| format!("load agent {}: {e}", opts.agent.display()))?;
    let agent = rustix::io::fcntl_dupfd_cloexec(&memfd, 200).map_err(|e| format!("dup agent memfd: {e}"))?;
    drop(memfd);
    let listener = bind(&socket_path(&opts.root))?;
    let host_net = rustix::fs::open(
        "/proc/thread-self/ns/net",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("open the host network namespace: {e}"))?;
    let mut s = Spawner {
        agent,
        listener,
        conn: None,
        children: HashSet::new(),
        shells: HashMap::new(),
        nets: HashMap::new(),
        host_net,
        buf: vec![0u8; MAX_MESSAGE],
        retired: false,
        time_ns: true,
        root: opts.root.clone(),
        mounts: MountWatch::open(),
    };
    s.serve();
    drop(lock);
    Ok(())
}

fn bind(path: &Path) -> Result<OwnedFd, String> {
    let _ = std::fs::remove_file(path);
    let sock = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    let addr = SocketAddrUnix::new(path).map_err(|e| format!("socket path {}: {e}", path.display()))?;
    rustix::net::bind(&sock, &addr).map_err(|e| format!("bind {}: {e}", path.display()))?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600)).map_err(|e| format!("chmod socket: {e}"))?;
    rustix::net::listen(&sock, 16).map_err(|e| format!("listen: {e}"))?;
    Ok(sock)
}

/// A slot's network namespace and a read-only sysfs mounted for it (detached).
struct SlotNet {
    netns: OwnedFd,
    sysfs: OwnedFd,
    /// The wiring it was made with.
    wiring: Option<crate::spec::SlotNetSpec>,
}

/// A child that has created its namespaces and waits for a sandbox.
struct Shell {
    pid: i32,
    pidfd: OwnedFd,
    /// The spawner's end of the control socketpair.
    control: OwnedFd,
    /// The shell's user namespace (for the idmapped trees).
    userns: std::fs::File,
    slot: SlotSpec,
}

impl Shell {
    /// Whether the process still runs (its pidfd is not readable yet).
    fn alive(&self) -> bool {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(0))
    }

    fn kill(&self) {
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
    }
}

struct Spawner {
    agent: OwnedFd,
    listener: OwnedFd,
    conn: Option<OwnedFd>,
    children: HashSet<i32>,
    /// Prepared shells by slot directory.
    shells: HashMap<PathBuf, Shell>,
    /// Each slot's network namespace, by slot directory.
    nets: HashMap<PathBuf, SlotNet>,
    /// The spawner's own network namespace, to return to after each shell's clone.
    host_net: OwnedFd,
    /// Receive buffer for requests (allocated once: shells are forked from this process).
    buf: Vec<u8>,
    retired: bool,
    time_ns: bool,
    root: PathBuf,
    /// The host mount table, watched for unmounts (None if it cannot be read).
    mounts: Option<MountWatch>,
}

/// `/proc/self/mountinfo`, open for its change notifications (`POLLPRI`), and the ids of
/// the mounts it listed last.
struct MountWatch {
    file: std::fs::File,
    ids: HashSet<u64>,
}

impl MountWatch {
    fn open() -> Option<MountWatch> {
        let file = std::fs::File::open("/proc/self/mountinfo").ok()?;
        Some(MountWatch { file, ids: mount_ids()? })
    }

    /// After a change of the mount table: whether a mount listed before is gone (a new
    /// one is not in the shells' copies and does not matter).
    fn lost_a_mount(&mut self) -> bool {
        mount_ids().is_some_and(|now| self.update(now))
    }

    fn update(&mut self, now: HashSet<u64>) -> bool {
        let lost = self.ids.iter().any(|id| !now.contains(id));
        self.ids = now;
        lost
    }
}

/// The ids (first field) of the spawner's mounts.
fn mount_ids() -> Option<HashSet<u64>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    Some(text.lines().filter_map(|l| l.split(' ').next()?.parse().ok()).collect())
}

impl Spawner {
    fn serve(&mut self) {
        let mut idle_since = Some(Instant::now());
        loop {
            self.reap();
            if self.conn.is_none() && self.children.is_empty() {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if self.retired || since.elapsed() >= IDLE_EXIT {
                    return;
                }
            } else {
                idle_since = None;
            }
            self.poll_once();
        }
    }

    fn poll_once(&mut self) {
        let (accept_ready, conn_ready, mounts_changed) = {
            let mut fds = vec![PollFd::new(&self.listener, PollFlags::IN)];
            let conn = self.conn.as_ref().map(|c| {
                fds.push(PollFd::new(c, PollFlags::IN));
                fds.len() - 1
            });
            let mounts = self.mounts.as_ref().map(|m| {
                fds.push(PollFd::new(&m.file, PollFlags::PRI));
                fds.len() - 1
            });
            // Retired, it only waits for its children to exit: look often.
            let wait = if self.retired { 10_000_000 } else { 250_000_000 };
            let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: wait };
            if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
                return;
            }
            let ready = |i: Option<usize>| i.is_some_and(|i| !fds[i].revents().is_empty());
            (!fds[0].revents().is_empty(), ready(conn), ready(mounts))
        };
        if mounts_changed {
            self.mounts_changed();
        }
        if accept_ready
            && !self.retired
            && let Ok(c) = rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC)
        {
            // A new daemon replaces the old connection (the old daemon is gone), and the
            // old one's shells with it.
            self.kill_shells();
            self.conn = Some(c);
            return;
        }
        if conn_ready {
            self.handle_message();
        }
    }

    fn reap(&mut self) {
        while let Ok(Some((pid, _))) = rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
            let pid = pid.as_raw_nonzero().get();
            self.children.remove(&pid);
            self.shells.retain(|_, s| s.pid != pid);
        }
    }

    /// The host's mount table changed: if a mount went away, the prepared shells (which
    /// hold copies of it) are replaced by shells made now.
    fn mounts_changed(&mut self) {
        let lost = self.mounts.as_mut().is_some_and(MountWatch::lost_a_mount);
        if !lost || self.shells.is_empty() || self.retired {
            return;
        }
        let slots: Vec<SlotSpec> = self
            .shells
            .drain()
            .map(|(_, shell)| {
                shell.kill();
                shell.slot
            })
            .collect();
        for slot in slots {
            // One that cannot be made now is made by the next spawn in its slot.
            if let Ok(shell) = self.prepare(&slot) {
                self.shells.insert(slot.dir.clone(), shell);
            }
        }
    }

    fn kill_shells(&mut self) {
        for (_, shell) in self.shells.drain() {
            shell.kill();
        }
    }

    fn handle_message(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let buf = &mut self.buf;
        let (n, fds) = match abx_sys::fd::recv_with_fds(conn.as_fd(), buf, 4) {
            Ok((0, _)) | Err(_) => {
                // The daemon is gone; nobody will use its shells.
                self.kill_shells();
                return;
            }
            Ok(r) => r,
        };
        let request = serde_json::from_slice::<SpawnerRequest>(&buf[..n]);
        let (reply, pidfd) = match request {
            Ok(SpawnerRequest::Hello) => (
                SpawnReply::Hello {
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: std::process::id(),
                    children: self.children.len() - self.shells.len(),
                },
                None,
            ),
            Ok(SpawnerRequest::Retire) => {
                self.retired = true;
                self.kill_shells();
                let _ = std::fs::remove_file(socket_path(&self.root));
                (
                    SpawnReply::Hello {
                        version: env!("CARGO_PKG_VERSION").into(),
                        pid: std::process::id(),
                        children: self.children.len() - self.shells.len(),
                    },
                    None,
                )
            }
            Ok(SpawnerRequest::Spawn { spec }) => match self.spawn(&spec, fds) {
                Ok((pid, pidfd)) => (SpawnReply::Spawned { pid }, Some(pidfd)),
                Err(message) => (SpawnReply::Failed { message }, None),
            },
            Ok(SpawnerRequest::Forget { dir }) => {
                if let Some(shell) = self.shells.remove(&dir) {
                    shell.kill();
                }
                self.nets.remove(&dir);
                (SpawnReply::Forgotten, None)
            }
            Ok(SpawnerRequest::Prepare { slot }) => {
                if let Some(old) = self.shells.remove(&slot.dir) {
                    old.kill();
                }
                match self.prepare(&slot) {
                    Ok(shell) => {
                        let pid = shell.pid;
                        self.shells.insert(slot.dir.clone(), shell);
                        (SpawnReply::Prepared { pid }, None)
                    }
                    Err(message) => (SpawnReply::Failed { message }, None),
                }
            }
            Err(e) => (SpawnReply::Failed { message: format!("malformed request: {e}") }, None),
        };
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        let fds: Vec<_> = pidfd.iter().map(|f| f.as_fd()).collect();
        if abx_sys::fd::send_with_fds(conn.as_fd(), &body, &fds).is_ok() && self.conn.is_none() {
            self.conn = Some(conn);
        }
    }

    /// Creates a sandbox: takes the slot's prepared shell (or makes one now) and sends it
    /// the go message.
    fn spawn(&mut self, spec: &SpawnSpec, mut fds: Vec<OwnedFd>) -> Result<(i32, OwnedFd), String> {
        if fds.len() != 2 {
            return Err(format!("spawn request needs 2 descriptors, got {}", fds.len()));
        }
        let status = fds.pop().unwrap_or_else(|| unreachable!());
        let listener = fds.pop().unwrap_or_else(|| unreachable!());
        let slot = spec.slot();
        if let Some(s) = self.shells.remove(&spec.dir) {
            // Made for these slot settings, ready and still alive (its "ready" may have
            // been sent before it was killed): use it. Otherwise, or if it dies before
            // taking the go message, make a fresh one.
            if s.slot == slot && wait_ready(&s, SHELL_TIMEOUT).is_ok() && s.alive() {
                let sent = self
                    .sysfs(&spec.dir)
                    .and_then(|fs| trees(&s, spec, fs))
                    .and_then(|t| go(&s, spec, t, listener.as_fd(), status.as_fd()));
                if sent.is_ok() {
                    return Ok((s.pid, s.pidfd));
                }
            }
            s.kill();
        }
        let s = self.prepare(&slot)?;
        // The idmapped trees while the shell creates its namespaces.
        let trees = self.sysfs(&spec.dir).and_then(|fs| trees(&s, spec, fs));
        match wait_ready(&s, SHELL_TIMEOUT).and(trees).and_then(|t| go(&s, spec, t, listener.as_fd(), status.as_fd())) {
            Ok(()) => Ok((s.pid, s.pidfd)),
            Err(e) => {
                s.kill();
                Err(e)
            }
        }
    }

    fn sysfs(&self, dir: &Path) -> Result<std::os::fd::BorrowedFd<'_>, String> {
        self.nets.get(dir).map(|n| n.sysfs.as_fd()).ok_or_else(|| "the slot has no network namespace".to_string())
    }

    /// Starts a shell for `slot`: clone3 into its cgroup and new namespaces, id maps.
    fn prepare(&mut self, slot: &SlotSpec) -> Result<Shell, String> {
        let (ours, theirs) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
                .map_err(|e| format!("socketpair: {e}"))?;
        let cgroup = match &slot.cgroup_dir {
            Some(dir) => Some(
                rustix::fs::open(
                    dir,
                    rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(|e| format!("open cgroup {}: {e}", dir.display()))?,
            ),
            None => None,
        };
        let dir = rustix::fs::open(
            &slot.dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| format!("open sandbox directory {}: {e}", slot.dir.display()))?;
        if !self.nets.get(&slot.dir).is_some_and(|n| n.wiring == slot.net) {
            let net = self.new_slot_net(slot.net.as_ref())?;
            self.nets.insert(slot.dir.clone(), net);
        }
        let netns = self.nets.get(&slot.dir).map(|n| n.netns.as_raw_fd()).unwrap_or_else(|| unreachable!());
        let (pid, pidfd) = match self.clone_child(cgroup.as_ref().map(|c| c.as_fd()), abx_sys::fd::borrow_raw(netns))? {
            Forked::Child => {
                drop(ours);
                child::run(slot, ShellIo { control: theirs, agent: self.agent.as_raw_fd(), dir })
            }
            Forked::Parent { pid, pidfd } => (pid, pidfd),
        };
        drop(theirs);
        self.children.insert(pid);
        match write_ids(pid, slot, &ours) {
            Ok(userns) => Ok(Shell { pid, pidfd, control: ours, userns, slot: slot.clone() }),
            Err(e) => {
                let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
                Err(e)
            }
        }
    }

    /// Makes a slot's network namespace: loopback up, low ports and ICMP echo sockets open
    /// to every user in it, IPv6 off, its veth pair when the slot has networking, and its
    /// sysfs. The spawner returns to its own namespace after.
    fn new_slot_net(&self, net: Option<&crate::spec::SlotNetSpec>) -> Result<SlotNet, String> {
        abx_sys::process::unshare(ns::NET).map_err(|e| format!("create a network namespace: {e}"))?;
        let made = (|| {
            let netns = rustix::fs::open(
                "/proc/thread-self/ns/net",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| format!("open the new network namespace: {e}"))?;
            abx_sys::net::set_link_up("lo").map_err(|e| format!("bring up loopback: {e}"))?;
            for (key, value) in
                [("net/ipv4/ip_unprivileged_port_start", "0"), ("net/ipv4/ping_group_range", "0 2147483647")]
            {
                std::fs::write(Path::new("/proc/sys").join(key), value).map_err(|e| format!("set {key}: {e}"))?;
            }
            // Sandboxes speak IPv4 only: no IPv6 addresses, router solicitations or DAD.
            for key in ["net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"] {
                let _ = std::fs::write(Path::new("/proc/sys").join(key), "1");
            }
            if let Some(net) = net {
                self.enter_host_net();
                crate::netwire::host_side(net, netns.as_fd())?;
                rustix::thread::move_into_link_name_space(
                    netns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| format!("enter the slot's network namespace: {e}"))?;
                crate::netwire::inside(net)?;
            }
            let sysfs = abx_sys::mount::detached_fs("sysfs", true).map_err(|e| format!("mount sysfs: {e}"))?;
            Ok(SlotNet { netns, sysfs, wiring: net.cloned() })
        })();
        self.enter_host_net();
        made
    }

    /// Back to the spawner's own network namespace, or exit: every later sandbox would
    /// land in the wrong one.
    fn enter_host_net(&self) {
        if let Err(e) = rustix::thread::move_into_link_name_space(
            self.host_net.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        ) {
            eprintln!("agentbox __spawner: cannot return to the host network namespace: {e}");
            std::process::exit(1);
        }
    }

    /// clone3 into new user, pid and (when the kernel has them) time namespaces, inside
    /// the network namespace `netns`.
    fn clone_child(
        &mut self,
        cgroup: Option<std::os::fd::BorrowedFd<'_>>,
        netns: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Forked, String> {
        use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
        move_into_link_name_space(netns, Some(LinkNameSpaceType::Network))
            .map_err(|e| format!("enter the slot's network namespace: {e}"))?;
        let forked = self.clone_child_here(cgroup);
        if let Ok(Forked::Child) = forked {
            return forked;
        }
        self.enter_host_net();
        forked
    }

    fn clone_child_here(&mut self, cgroup: Option<std::os::fd::BorrowedFd<'_>>) -> Result<Forked, String> {
        use abx_sys::process::fork_single_threaded as fork;
        let base = ns::USER | ns::PID;
        if self.time_ns {
            match fork(base | ns::TIME, cgroup) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.time_ns = false,
                r => return r.map_err(|e| format!("clone3: {e}")),
            }
        }
        fork(base, cgroup).map_err(|e| format!("clone3: {e}"))
    }
}

/// Writes the shell's id maps and tells it so; returns its user namespace.
fn write_ids(pid: i32, slot: &SlotSpec, control: &OwnedFd) -> Result<std::fs::File, String> {
    let map = format!("0 {} {}\n", slot.uid_base, slot.uid_count);
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{file}"), &map).map_err(|e| format!("write {file}: {e}"))?;
    }
    let userns =
        std::fs::File::open(format!("/proc/{pid}/ns/user")).map_err(|e| format!("open user namespace: {e}"))?;
    abx_sys::fd::send_with_fds(control.as_fd(), child::IDS_WRITTEN, &[]).map_err(|e| format!("send ids: {e}"))?;
    Ok(userns)
}

/// Waits up to `timeout` for the shell's "ready"; its error text (or its death) otherwise.
fn wait_ready(shell: &Shell, timeout: Duration) -> Result<(), String> {
    let ts = rustix::event::Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: i64::from(timeout.subsec_nanos()) };
    let mut fds = [PollFd::new(&shell.control, PollFlags::IN)];
    loop {
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => return Err(format!("sandbox namespaces not ready within {timeout:?}")),
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("wait for the sandbox namespaces: {e}")),
        }
    }
    let mut buf = [0u8; 4096];
    match rustix::net::recv(&shell.control, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
        Ok((n, _)) if &buf[..n] == child::READY => Ok(()),
        Ok((0, _)) => Err("the sandbox's first process died while creating its namespaces".into()),
        Ok((n, _)) => Err(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) => Err(format!("read from the sandbox's first process: {e}")),
    }
}

/// The sandbox's mount trees: its layers and data idmapped through the shell's user
/// namespace, a copy of the slot's sysfs, then its volumes idmapped the same way (the
/// descriptor order of [`crate::plan::build`]).
fn trees(shell: &Shell, spec: &SpawnSpec, sysfs: std::os::fd::BorrowedFd<'_>) -> Result<Vec<OwnedFd>, String> {
    let count = crate::plan::trees(spec);
    if 2 + count > MAX_GO_FDS {
        return Err(format!(
            "too many mount trees ({count}: {} layers, {} volumes); at most {} fit in one message",
            spec.layers.len(),
            spec.volumes.len(),
            MAX_GO_FDS - 2
        ));
    }
    let mut trees = Vec::with_capacity(count);
    let ro = abx_sys::mount::TreeOptions { read_only: true, recursive: false };
    for layer in &spec.layers {
        trees.push(
            abx_sys::mount::idmapped_tree(layer, shell.userns.as_fd(), ro)
                .map_err(|e| format!("idmapped mount of layer {}: {e}", layer.display()))?,
        );
    }
    let data = crate::spec::SandboxDirs::new(spec.dir.clone()).data();
    let rw = abx_sys::mount::TreeOptions { read_only: false, recursive: false };
    trees.push(
        abx_sys::mount::idmapped_tree(&data, shell.userns.as_fd(), rw)
            .map_err(|e| format!("idmapped mount of {}: {e}", data.display()))?,
    );
    trees.push(abx_sys::mount::clone_detached(sysfs).map_err(|e| format!("copy of the slot's sysfs: {e}"))?);
    for v in &spec.volumes {
        let source = v.source.display();
        // Relative to nothing the daemon knows of (the spawner's working directory).
        if !v.source.is_absolute() {
            return Err(format!("volume source {source}: not an absolute path"));
        }
        // Not recursive: mounts below the source on the host stay out of the sandbox.
        let opts = abx_sys::mount::TreeOptions { read_only: v.read_only, recursive: false };
        let tree = abx_sys::mount::idmapped_tree(&v.source, shell.userns.as_fd(), opts)
            .map_err(|e| format!("idmapped mount of volume {source}: {e}"))?;
        // Unlike the layers and the data tree, it stays visible after pivot_root: no
        // mount may propagate between it and the host.
        abx_sys::mount::make_private(tree.as_fd()).map_err(|e| format!("make volume {source} private: {e}"))?;
        let st = rustix::fs::fstat(&tree).map_err(|e| format!("volume {source}: {e}"))?;
        if !rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() {
            return Err(format!("volume {source}: not a directory"));
        }
        trees.push(tree);
    }
    Ok(trees)
}

/// Sends a ready shell its sandbox: the spec, the status pipe, the listening socket and
/// the idmapped trees.
fn go(
    shell: &Shell,
    spec: &SpawnSpec,
    trees: Vec<OwnedFd>,
    listener: std::os::fd::BorrowedFd<'_>,
    status: std::os::fd::BorrowedFd<'_>,
) -> Result<(), String> {
    let body = serde_json::to_vec(spec).map_err(|e| format!("encode spec: {e}"))?;
    if body.len() > MAX_GO {
        return Err(format!("sandbox spec too large ({} bytes, at most {MAX_GO})", body.len()));
    }
    let mut fds = vec![status, listener];
    fds.extend(trees.iter().map(|t| t.as_fd()));
    abx_sys::fd::send_with_fds(shell.control.as_fd(), &body, &fds).map_err(|e| format!("send go: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lost_mount_counts_as_a_change_for_the_shells() {
        let mut w = MountWatch::open().expect("this process's mount table");
        assert!(!w.ids.is_empty());
        let mut ids = w.ids.clone();
        assert!(!w.update(ids.clone()), "nothing changed");
        ids.insert(u64::MAX);
        assert!(!w.update(ids.clone()), "a new mount");
        ids.remove(&u64::MAX);
        assert!(w.update(ids.clone()), "a mount went away");
        assert!(!w.update(ids), "and only once");
    }
}
