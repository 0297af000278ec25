use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The first frame of every connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check. Reply: `Reply::Ok(AgentInfo)`.
    Ping,
    /// Start a process. The agent answers `Event::Started` (or `Reply::Err`), then, unless
    /// `background` is set, streams `Stdout`/`Stderr` frames and ends with `Event::Exit`.
    /// While attached the client may send `Stdin` frames, an `Eof` frame (close stdin) and
    /// JSON [`Control`] frames. Closing the connection of a foreground process kills its
    /// process group (unless [`Control::Background`] made it a background one first). For a
    /// background process the reply is `Event::Started` only.
    Exec(ExecSpec),
    /// Attach to a running or finished process: replays its buffered output (background
    /// processes keep the last [`OUTPUT_BUFFER`] bytes), then streams like `Exec`.
    /// Detaching does not kill it. With `input` the client may also send stdin.
    Attach {
        pid: u32,
        #[serde(default)]
        replay: bool,
    },
    /// Send a signal to a process (to its process group when `group`). Reply: `Ok(null)`.
    Signal {
        pid: u32,
        signal: i32,
        #[serde(default)]
        group: bool,
    },
    /// Write to a process's stdin (and optionally close it). Reply: `Ok(null)`.
    Input {
        pid: u32,
        #[serde(default, with = "b64")]
        data: Vec<u8>,
        #[serde(default)]
        close: bool,
    },
    /// Change a process's terminal size. Reply: `Ok(null)`.
    Resize { pid: u32, size: TtySize },
    /// Reply: `Ok(Vec<ProcessInfo>)` (running processes and finished ones not yet collected).
    ListProcesses,
    /// Reply: `Ok(FileInfo)`, then `Data` frames and an `Eof` frame.
    ReadFile {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Followed by `Data` frames and an `Eof` frame from the client.
    /// Reply (after the `Eof`, or early on error): `Ok(FileInfo)`.
    WriteFile {
        path: String,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        mode: Option<u32>,
        /// Create missing parent directories (owned by `user`).
        #[serde(default)]
        parents: bool,
        #[serde(default)]
        append: bool,
    },
    /// Reply: `Ok(Vec<FileInfo>)`, entries sorted by path. `depth` 1 lists the directory.
    ListDir {
        path: String,
        #[serde(default)]
        user: Option<String>,
        #[serde(default = "one")]
        depth: u32,
    },
    /// Reply: `Ok(FileInfo)` (does not follow a final symlink).
    Stat {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Reply: `Ok(FileInfo)`. With `parents`, an existing directory is not an error.
    Mkdir {
        path: String,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        parents: bool,
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Reply: `Ok(null)`. A directory needs `recursive` unless empty.
    Remove {
        path: String,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        recursive: bool,
    },
    /// Reply: `Ok(FileInfo)` of the destination.
    Rename {
        from: String,
        to: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Reply: `Ok(FileInfo)` of `path`, then the tar archive of it as `Data` frames and `Eof`.
    /// The archive's top entry is the last component of `path`.
    ArchiveRead {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Followed by a tar archive as `Data` frames and `Eof`; extracted into directory
    /// `path` (created if missing). Reply: `Ok(null)`.
    ArchiveWrite {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Send `signal` to every process in the sandbox except the agent. Reply: `Ok(u32)`
    /// (number of processes signalled).
    KillAll { signal: i32 },
    /// Network probes from inside the sandbox (`agentbox net test`), run concurrently.
    /// Reply: `Ok(Vec<ProbeResult>)`, one per probe, in order.
    NetProbe { probes: Vec<Probe> },
}

/// One network probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Probe {
    /// Connect over TCP. Connected or refused by the peer: reachable; unreachable,
    /// prohibited or timed out: blocked.
    Tcp { addr: std::net::SocketAddr, timeout_ms: u64 },
    /// Send one datagram and wait for anything back. An answer or a port-unreachable
    /// from the peer: reachable; host or network unreachable, prohibited: blocked;
    /// silence: unknown.
    Udp {
        addr: std::net::SocketAddr,
        #[serde(default, with = "b64")]
        payload: Vec<u8>,
        timeout_ms: u64,
    },
    /// Resolve a name with the sandbox's resolver (A records). Resolved: reachable.
    Dns { name: String },
}

/// What a probe saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// `reachable`, `blocked` or `unknown`.
    pub outcome: String,
    pub detail: String,
    /// DNS: the addresses resolved.
    #[serde(default)]
    pub addresses: Vec<std::net::Ipv4Addr>,
}

fn one() -> u32 {
    1
}

/// Bytes of output the agent keeps per process for late attachment.
pub const OUTPUT_BUFFER: usize = 1 << 20;

/// What to run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up in `PATH` when it has no slash.
    pub argv: Vec<String>,
    /// Environment, on top of the agent's defaults (PATH, HOME, USER, LOGNAME, SHELL,
    /// HOSTNAME, TERM for a terminal).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the user's home, or `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name, uid, or `uid:gid` (default root).
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a pseudo-terminal of this size (stdout and stderr are merged into `Stdout`).
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// Keep stdin open for `Stdin` frames; otherwise stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Keep running after the client disconnects.
    #[serde(default)]
    pub background: bool,
    /// A free-form label shown in process lists.
    #[serde(default)]
    pub tag: Option<String>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Control messages a client sends while attached to a process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    Signal {
        signal: i32,
    },
    Resize {
        size: TtySize,
    },
    /// Makes the process a background one from now on: it runs on when its owner (the
    /// client that started it) leaves, stays listed after it ends and buffers its output
    /// for late attachment. The owner still receives all of its output, awaited.
    Background,
}

/// Process lifecycle events (JSON frames from the agent).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Started { pid: u32 },
    Exit(ExitStatus),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout expired.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// The conventional shell exit code: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => 255,
        }
    }
}

/// A reply to a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Err(AgentError),
}

/// An error reported by the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentError {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AgentError {}

/// Stable error codes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The path, user, or process does not exist.
    NotFound,
    /// The program to execute does not exist.
    CommandNotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
    /// A limit stopped the operation (pids, memory, open files).
    ResourceExhausted,
    InvalidArgument,
    Io,
}

/// Facts about the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    /// The last pid the kernel handed out in the sandbox's pid namespace
    /// (`ns_last_pid`; 0: unknown): a restart of the sandbox continues above it.
    #[serde(default)]
    pub last_pid: u32,
}

/// A process known to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct ProcessInfo {
    pub pid: u32,
    pub argv: Vec<String>,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    pub tty: bool,
    pub background: bool,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    /// Set once the process has ended.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
}

/// File types.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Metadata of one file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct FileInfo {
    /// Last path component.
    pub name: String,
    /// Absolute path inside the sandbox.
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, unix milliseconds.
    pub mtime_ms: i64,
    #[serde(default)]
    pub symlink_target: Option<String>,
}

/// Base64 for byte fields inside JSON messages.
pub mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
