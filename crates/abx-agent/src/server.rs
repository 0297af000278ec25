//! The listening socket, the accept loop, and the dispatch of each connection's one
//! request.
//!
//! Bounds: frames are limited by `abx_proto` ([`abx_proto::MAX_FRAME`]); at most
//! [`MAX_CONNECTIONS`] connections are served at once (further ones wait in the listen
//! backlog); the request frame must arrive within [`REQUEST_TIMEOUT`]; a reply that would
//! exceed the frame limit becomes an error reply.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abx_proto::{AgentInfo, FrameReader, FrameWriter, MAX_FRAME, ProtoError, Reply, Request};
use rustix::io::Errno;
use serde::Serialize;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::creds::Base;
use crate::error::Error;
use crate::files::{self, WriteRequest};
use crate::process::{ProcessTable, check_signal};
use crate::reaper::Reaper;
use crate::{archive, session};

/// Connections served concurrently.
pub const MAX_CONNECTIONS: usize = 512;
/// Time a client has to send its request after connecting.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by every connection.
#[derive(Debug)]
pub struct Agent {
    pub reaper: Reaper,
    pub procs: Arc<ProcessTable>,
    /// The identity to return to after acting as a user.
    pub base: Base,
    started: Instant,
}

impl Agent {
    pub fn new(reaper: Reaper, base: Base) -> Agent {
        Agent { reaper, procs: Arc::default(), base, started: Instant::now() }
    }

    fn info(&self) -> AgentInfo {
        AgentInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: rustix::process::getpid().as_raw_nonzero().get() as u32,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            // Of the reader's pid namespace: the sandbox's, for its PID 1.
            last_pid: std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0),
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: FrameWriter<OwnedWriteHalf>,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        let (r, w) = stream.into_split();
        Conn { reader: FrameReader::new(r), writer: FrameWriter::new(w) }
    }

    /// Sends `Reply::Ok(value)`, or an error reply when it would not fit in a frame.
    pub async fn ok<T: Serialize>(&mut self, value: &T) -> Result<(), ProtoError> {
        let body = serde_json::to_vec(&Reply::Ok(value)).map_err(ProtoError::Json)?;
        if body.len() + 1 > MAX_FRAME {
            return self.err(Error::Invalid(format!("reply of {} bytes exceeds the frame limit", body.len()))).await;
        }
        self.writer.send(abx_proto::Kind::Json, &body).await
    }

    /// Sends `Reply::Err`.
    pub async fn err(&mut self, e: Error) -> Result<(), ProtoError> {
        self.writer.json(&Reply::<()>::Err(e.into())).await
    }

    pub async fn reply<T: Serialize>(&mut self, result: Result<T, Error>) -> Result<(), ProtoError> {
        match result {
            Ok(v) => self.ok(&v).await,
            Err(e) => self.err(e).await,
        }
    }
}

/// Takes the listening socket the sandbox passes as fd 3.
pub fn inherited_listener() -> io::Result<UnixListener> {
    let fd: OwnedFd = abx_sys::fd::inherited(3)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no listening socket at fd 3"))?;
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Binds `path`, replacing a stale socket file left there. The socket is bound and
/// listening under a temporary name first and then renamed into place, so a client that
/// sees `path` can connect.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp)?;
    if let Err(e) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    Ok(listener)
}

/// Serves connections forever.
pub async fn serve(agent: Arc<Agent>, listener: UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    let _ = handle(&agent, Conn::new(stream)).await;
                    drop(permit);
                });
            }
            // Out of descriptors or memory: wait instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn handle(agent: &Agent, mut conn: Conn) -> Result<(), ProtoError> {
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, conn.reader.json::<Request>()).await {
        Ok(Ok(request)) => request,
        Ok(Err(ProtoError::Json(e))) => return conn.err(Error::Invalid(format!("malformed request: {e}"))).await,
        Ok(Err(ProtoError::Unexpected(what))) => return conn.err(Error::Invalid(what)).await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    dispatch(agent, conn, request).await
}

async fn dispatch(agent: &Agent, mut conn: Conn, request: Request) -> Result<(), ProtoError> {
    match request {
        Request::Ping => conn.ok(&agent.info()).await,
        Request::Exec(spec) => session::exec(agent, conn, spec).await,
        Request::Attach { pid, replay } => session::attach(agent, conn, pid, replay).await,
        Request::Signal { pid, signal, group } => {
            conn.reply(agent.procs.get(pid).and_then(|p| p.signal(signal, group))).await
        }
        Request::Input { pid, data, close } => {
            let result = match agent.procs.get(pid) {
                Ok(p) => p.write_stdin(&data, close).await,
                Err(e) => Err(e),
            };
            conn.reply(result).await
        }
        Request::Resize { pid, size } => conn.reply(agent.procs.get(pid).and_then(|p| p.resize(size))).await,
        Request::ListProcesses => conn.ok(&agent.procs.list()).await,
        Request::KillAll { signal } => conn.reply(kill_all(agent, signal)).await,
        Request::NetProbe { probes } => {
            let results = tokio::task::spawn_blocking(move || crate::netprobe::run(&probes))
                .await
                .map_err(|e| Error::Invalid(format!("probe task: {e}")));
            conn.reply(results).await
        }
        other => dispatch_files(agent, conn, other).await,
    }
}

async fn dispatch_files(agent: &Agent, mut conn: Conn, request: Request) -> Result<(), ProtoError> {
    match request {
        Request::ReadFile { path, user } => files::read_file(agent, conn, &path, user.as_deref()).await,
        Request::WriteFile { path, user, mode, parents, append } => {
            let req = WriteRequest { path: &path, user: user.as_deref(), mode, parents, append };
            files::write_file(agent, conn, req).await
        }
        Request::ListDir { path, user, depth } => {
            conn.reply(files::list_dir(agent, &path, user.as_deref(), depth)).await
        }
        Request::Stat { path, user } => conn.reply(files::stat(agent, &path, user.as_deref())).await,
        Request::Mkdir { path, user, parents, mode } => {
            conn.reply(files::mkdir(agent, &path, user.as_deref(), parents, mode)).await
        }
        Request::Remove { path, user, recursive } => {
            conn.reply(files::remove(agent, &path, user.as_deref(), recursive)).await
        }
        Request::Rename { from, to, user } => conn.reply(files::rename(agent, &from, &to, user.as_deref())).await,
        Request::ArchiveRead { path, user } => archive::read(agent, conn, &path, user.as_deref()).await,
        Request::ArchiveWrite { path, user } => archive::write(agent, conn, &path, user.as_deref()).await,
        _ => conn.err(Error::Invalid("unsupported request".into())).await,
    }
}

/// Signals every process but the agent. As PID 1 that is `kill(-1, signal)` (counted
/// from `/proc` just before); outside a sandbox (`--listen` development mode), where
/// `kill(-1)` would reach the whole machine, it signals the process groups of the
/// processes the agent started and counts those.
pub fn kill_all(agent: &Agent, signal: i32) -> Result<u32, Error> {
    check_signal(signal)?;
    if rustix::process::getpid().as_raw_nonzero().get() != 1 {
        let signalled = agent.procs.running().iter().filter(|p| p.signal(signal, true).is_ok()).count();
        return Ok(signalled as u32);
    }
    let count = count_processes();
    match abx_sys::agent::kill(-1, signal) {
        Err(e) if e.raw_os_error() != Some(Errno::SRCH.raw_os_error()) => Err(Error::Signal { pid: -1, source: e }),
        _ => Ok(count),
    }
}

/// Processes in this pid namespace other than the agent.
fn count_processes() -> u32 {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) && name != me
        })
        .count() as u32
}

/// Where the agent listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// The socket the sandbox set up at fd 3.
    Inherited,
    /// Development mode: bind this path.
    Path(PathBuf),
}
