//! The native isolation backend.
//!
//! A sandbox is a process tree in fresh user, pid, time, mount, network, uts, ipc and
//! cgroup namespaces whose PID 1 is the guest agent. It is created by the **spawner**, a
//! small single-threaded process that outlives the daemon (so sandboxes survive a daemon
//! crash) and is the parent that reaps every sandbox's PID 1.
//!
//! * [`spec`] — what the daemon asks for ([`spec::SpawnSpec`]).
//! * [`plan`] — the ordered list of setup steps a new sandbox runs (see docs/sandbox-setup.md).
//! * [`child`] — executes the plan inside the new namespaces, then execs the agent.
//! * [`spawner`] — the long-lived spawner process.
//! * [`client`] — the daemon's side: starts or finds the spawner and sends requests.
//! * [`seccomp`] — the seccomp policy file compiled to BPF.
#![forbid(unsafe_code)]

pub mod child;
pub mod client;
pub mod netwire;
pub mod plan;
pub mod seccomp;
pub mod spawner;
pub mod spec;

pub use client::SpawnerClient;
pub use spec::{SpawnReply, SpawnSpec};

/// Errors of the sandbox backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp policy is invalid")]
    Seccomp(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot start the spawner at {path}")]
    SpawnerStart {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spawner at {path} did not come up: {reason}")]
    SpawnerUnavailable { path: std::path::PathBuf, reason: String },
    #[error("lost the connection to the spawner")]
    SpawnerIo(#[source] std::io::Error),
    #[error("spawner protocol error: {0}")]
    Protocol(String),
    #[error("cannot create sandbox {id}: {message}")]
    Spawn { id: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;
