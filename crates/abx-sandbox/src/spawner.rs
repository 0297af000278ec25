//! The spawner: a small single-threaded process, started by the daemon as
//! `agentbox __spawner --root DIR --agent PATH`, that creates sandboxes and is the parent
//! of every sandbox's PID 1. It does not die with the daemon: a restarted daemon
//! reconnects to it (`<root>/spawner.sock`), and it keeps reaping sandboxes meanwhile.
//! It exits when no daemon is connected and no sandbox is left.
//!
//! Being single-threaded makes `fork` (clone3) safe and cheap here, which a large
//! multi-threaded daemon could not offer.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use abx_sys::process::{Forked, ns};
use rustix::event::{PollFd, PollFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::child::{self, ChildIo};
use crate::spec::{SpawnReply, SpawnSpec, SpawnerRequest};

/// Largest request accepted.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// How long a spawner with no daemon and no sandbox lingers before exiting.
const IDLE_EXIT: Duration = Duration::from_secs(5);

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
    let mut s = Spawner {
        agent,
        listener,
        conn: None,
        children: HashSet::new(),
        retired: false,
        time_ns: true,
        root: opts.root.clone(),
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

struct Spawner {
    agent: OwnedFd,
    listener: OwnedFd,
    conn: Option<OwnedFd>,
    children: HashSet<i32>,
    retired: bool,
    time_ns: bool,
    root: PathBuf,
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
        let (accept_ready, conn_ready) = {
            let mut fds = vec![PollFd::new(&self.listener, PollFlags::IN)];
            if let Some(c) = &self.conn {
                fds.push(PollFd::new(c, PollFlags::IN));
            }
            let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 250_000_000 };
            if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
                return;
            }
            (!fds[0].revents().is_empty(), fds.get(1).is_some_and(|f| !f.revents().is_empty()))
        };
        if accept_ready
            && !self.retired
            && let Ok(c) = rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC)
        {
            // A new daemon replaces the old connection (the old daemon is gone).
            self.conn = Some(c);
            return;
        }
        if conn_ready {
            self.handle_message();
        }
    }

    fn reap(&mut self) {
        while let Ok(Some((pid, _))) = rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
            self.children.remove(&pid.as_raw_nonzero().get());
        }
    }

    fn handle_message(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, fds) = match abx_sys::fd::recv_with_fds(conn.as_fd(), &mut buf, 4) {
            Ok((0, _)) | Err(_) => return,
            Ok(r) => r,
        };
        let (reply, pidfd) = match serde_json::from_slice::<SpawnerRequest>(&buf[..n]) {
            Ok(SpawnerRequest::Hello) => (
                SpawnReply::Hello {
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: std::process::id(),
                    children: self.children.len(),
                },
                None,
            ),
            Ok(SpawnerRequest::Retire) => {
                self.retired = true;
                let _ = std::fs::remove_file(socket_path(&self.root));
                (
                    SpawnReply::Hello {
                        version: env!("CARGO_PKG_VERSION").into(),
                        pid: std::process::id(),
                        children: self.children.len(),
                    },
                    None,
                )
            }
            Ok(SpawnerRequest::Spawn { spec }) => match self.spawn(&spec, fds) {
                Ok((pid, pidfd)) => (SpawnReply::Spawned { pid }, Some(pidfd)),
                Err(message) => (SpawnReply::Failed { message }, None),
            },
            Err(e) => (SpawnReply::Failed { message: format!("malformed request: {e}") }, None),
        };
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        let fds: Vec<_> = pidfd.iter().map(|f| f.as_fd()).collect();
        if abx_sys::fd::send_with_fds(conn.as_fd(), &body, &fds).is_ok() && self.conn.is_none() {
            self.conn = Some(conn);
        }
    }

    fn spawn(&mut self, spec: &SpawnSpec, mut fds: Vec<OwnedFd>) -> Result<(i32, OwnedFd), String> {
        if fds.len() != 2 {
            return Err(format!("spawn request needs 2 descriptors, got {}", fds.len()));
        }
        let status = fds.pop().unwrap_or_else(|| unreachable!());
        let listener = fds.pop().unwrap_or_else(|| unreachable!());
        let (ours, theirs) =
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
                .map_err(|e| format!("socketpair: {e}"))?;
        let cgroup = match &spec.cgroup_dir {
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
            &spec.dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| format!("open sandbox directory {}: {e}", spec.dir.display()))?;
        let (pid, pidfd) = match self.clone_child(cgroup.as_ref().map(|c| c.as_fd()))? {
            Forked::Child => {
                drop(ours);
                let io = ChildIo { control: theirs, status, listener, agent: self.agent.as_raw_fd(), dir };
                child::run(spec, io)
            }
            Forked::Parent { pid, pidfd } => (pid, pidfd),
        };
        drop(theirs);
        self.children.insert(pid);
        if let Err(e) = prepare(pid, spec, &ours) {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            return Err(e);
        }
        Ok((pid, pidfd))
    }

    /// clone3 into new user, pid and (when the kernel has them) time namespaces.
    fn clone_child(&mut self, cgroup: Option<std::os::fd::BorrowedFd<'_>>) -> Result<Forked, String> {
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

/// Parent side of setup: id maps, idmapped trees, then the go message.
fn prepare(pid: i32, spec: &SpawnSpec, control: &OwnedFd) -> Result<(), String> {
    let map = format!("0 {} {}\n", spec.uid_base, spec.uid_count);
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{file}"), &map).map_err(|e| format!("write {file}: {e}"))?;
    }
    let userns =
        std::fs::File::open(format!("/proc/{pid}/ns/user")).map_err(|e| format!("open user namespace: {e}"))?;
    let mut trees = Vec::with_capacity(spec.layers.len() + 1);
    let ro = abx_sys::mount::TreeOptions { read_only: true, recursive: false };
    for layer in &spec.layers {
        trees.push(
            abx_sys::mount::idmapped_tree(layer, userns.as_fd(), ro)
                .map_err(|e| format!("idmapped mount of layer {}: {e}", layer.display()))?,
        );
    }
    let data = crate::spec::SandboxDirs::new(spec.dir.clone()).data();
    let rw = abx_sys::mount::TreeOptions { read_only: false, recursive: false };
    trees.push(
        abx_sys::mount::idmapped_tree(&data, userns.as_fd(), rw)
            .map_err(|e| format!("idmapped mount of {}: {e}", data.display()))?,
    );
    let fds: Vec<_> = trees.iter().map(|t| t.as_fd()).collect();
    abx_sys::fd::send_with_fds(control.as_fd(), b"go", &fds).map_err(|e| format!("send go: {e}"))?;
    Ok(())
}
