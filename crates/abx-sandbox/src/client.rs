//! The daemon's side of the spawner: find or start it, send spawn requests.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::spawner::{MAX_REPLY, socket_path};
use crate::spec::{SlotSpec, SpawnReply, SpawnSpec, SpawnerRequest};
use crate::{Error, Result};

/// A connection to the spawner of one state root. Requests are serialized (the spawner
/// is single-threaded anyway).
#[derive(Debug)]
pub struct SpawnerClient {
    root: PathBuf,
    exe: PathBuf,
    agent: PathBuf,
    conn: Mutex<Option<OwnedFd>>,
    /// The spawner process when this daemon started it (to reap it).
    child: Mutex<Option<Child>>,
    /// The spawner's pid, from its last hello.
    pid: Mutex<Option<u32>>,
}

/// What the spawner says about itself.
#[derive(Debug, Clone)]
pub struct SpawnerInfo {
    pub version: String,
    pub pid: u32,
    pub children: usize,
}

impl SpawnerClient {
    /// `exe` is the agentbox binary (run as `exe __spawner`), `agent` the guest agent.
    pub fn new(root: &Path, exe: &Path, agent: &Path) -> Self {
        SpawnerClient {
            root: root.to_owned(),
            exe: exe.to_owned(),
            agent: agent.to_owned(),
            conn: Mutex::new(None),
            child: Mutex::new(None),
            pid: Mutex::new(None),
        }
    }

    /// The spawner's pid as of the last hello.
    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects to the running spawner or starts one, and says hello.
    pub fn connect(&self) -> Result<SpawnerInfo> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        *conn = Some(self.open()?);
        match request(conn.as_ref().map(|c| c.as_fd()), &SpawnerRequest::Hello, &[])? {
            (SpawnReply::Hello { version, pid, children }, _) => {
                *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
                Ok(SpawnerInfo { version, pid, children })
            }
            (other, _) => Err(Error::Protocol(format!("unexpected hello reply {other:?}"))),
        }
    }

    /// Connects again (to the running spawner, or a new one) and learns its pid.
    fn reopen(&self, conn: &mut Option<OwnedFd>) -> Result<()> {
        *conn = Some(self.open()?);
        let hello = request(conn.as_ref().map(|c| c.as_fd()), &SpawnerRequest::Hello, &[]);
        *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = match hello {
            Ok((SpawnReply::Hello { pid, .. }, _)) => Some(pid),
            _ => None,
        };
        Ok(())
    }

    fn open(&self) -> Result<OwnedFd> {
        let path = socket_path(&self.root);
        if let Ok(c) = dial(&path) {
            return Ok(c);
        }
        self.start()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match dial(&path) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::SpawnerUnavailable { path, reason: e.to_string() });
                }
                Err(_) => {
                    // A retiring spawner still holds the root's lock, so the one just
                    // started gave way and exited: start another.
                    let exited = self
                        .child
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                        .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
                    if exited {
                        self.start()?;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn start(&self) -> Result<()> {
        let log_path = self.root.join("spawner.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| Error::SpawnerStart { path: log_path.clone(), source })?;
        let log2 = log.try_clone().map_err(|source| Error::SpawnerStart { path: log_path, source })?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("__spawner")
            .arg("--root")
            .arg(&self.root)
            .arg("--agent")
            .arg(&self.agent)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        abx_sys::process::set_pre_exec(&mut cmd, abx_sys::process::PreExec { setsid: true, ..Default::default() });
        let child = cmd.spawn().map_err(|source| Error::SpawnerStart { path: self.exe.clone(), source })?;
        let mut slot = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut old) = slot.replace(child) {
            let _ = old.try_wait();
        }
        Ok(())
    }

    /// Asks the spawner to create a sandbox. `listener` becomes the agent's fd 3; `status`
    /// is the write end of the pipe that reports the exec. Returns the PID 1's host pid and
    /// a pidfd for it.
    pub fn spawn(&self, spec: &SpawnSpec, listener: BorrowedFd<'_>, status: BorrowedFd<'_>) -> Result<(i32, OwnedFd)> {
        let req = SpawnerRequest::Spawn { spec: Box::new(spec.clone()) };
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let reply = match request(conn.as_ref().map(|c| c.as_fd()), &req, &[listener, status]) {
            Err(Error::SpawnerIo(_)) | Err(Error::SpawnerUnavailable { .. }) => {
                // The spawner went away (or was never reached): start over once.
                self.reopen(&mut conn)?;
                request(conn.as_ref().map(|c| c.as_fd()), &req, &[listener, status])?
            }
            r => r?,
        };
        match reply {
            (SpawnReply::Spawned { pid }, Some(pidfd)) => Ok((pid, pidfd)),
            (SpawnReply::Failed { message }, _) => Err(Error::Spawn { id: spec.id.clone(), message }),
            (other, _) => Err(Error::Protocol(format!("unexpected spawn reply {other:?}"))),
        }
    }

    /// Asks the spawner to create a slot's namespaces ahead of the next spawn for it.
    /// Returns the waiting process's pid.
    pub fn prepare(&self, slot: &SlotSpec) -> Result<i32> {
        let req = SpawnerRequest::Prepare { slot: slot.clone() };
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match request(conn.as_ref().map(|c| c.as_fd()), &req, &[])? {
            (SpawnReply::Prepared { pid }, _) => Ok(pid),
            (SpawnReply::Failed { message }, _) => Err(Error::Spawn { id: slot.dir.display().to_string(), message }),
            (other, _) => Err(Error::Protocol(format!("unexpected prepare reply {other:?}"))),
        }
    }

    /// Tells the spawner a slot is gone (its network namespace can go).
    pub fn forget(&self, dir: &Path) -> Result<()> {
        let req = SpawnerRequest::Forget { dir: dir.to_owned() };
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match request(conn.as_ref().map(|c| c.as_fd()), &req, &[])? {
            (SpawnReply::Forgotten, _) => Ok(()),
            (other, _) => Err(Error::Protocol(format!("unexpected forget reply {other:?}"))),
        }
    }

    /// Tells the spawner to exit once it holds no sandbox, and reaps it if this daemon
    /// started it (waiting up to `wait`).
    pub fn retire(&self, wait: Duration) {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let _ = request(conn.as_ref().map(|c| c.as_fd()), &SpawnerRequest::Retire, &[]);
        *conn = None;
        let mut slot = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = slot.as_mut() {
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    *slot = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn dial(path: &Path) -> std::io::Result<OwnedFd> {
    let sock = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    let addr = SocketAddrUnix::new(path)?;
    rustix::net::connect(&sock, &addr)?;
    Ok(sock)
}

fn request(
    conn: Option<BorrowedFd<'_>>,
    req: &SpawnerRequest,
    fds: &[BorrowedFd<'_>],
) -> Result<(SpawnReply, Option<OwnedFd>)> {
    let conn =
        conn.ok_or_else(|| Error::SpawnerUnavailable { path: PathBuf::new(), reason: "not connected".into() })?;
    let body = serde_json::to_vec(req).map_err(|e| Error::Protocol(e.to_string()))?;
    abx_sys::fd::send_with_fds(conn, &body, fds).map_err(Error::SpawnerIo)?;
    let mut buf = [0u8; MAX_REPLY];
    let (n, mut got) = abx_sys::fd::recv_with_fds(conn, &mut buf, 2).map_err(Error::SpawnerIo)?;
    if n == 0 {
        return Err(Error::SpawnerIo(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)));
    }
    let reply = serde_json::from_slice(&buf[..n]).map_err(|e| Error::Protocol(e.to_string()))?;
    Ok((reply, got.pop()))
}
