//! The guest agent, `agentbox-agent`: PID 1 of every sandbox. It serves the protocol of
//! [`abx_proto`] on a unix socket, one operation per connection: running processes
//! (pipes or a terminal, foreground or background, attach and replay), file operations
//! as any sandbox user, tar archives in and out, and signals.
//!
//! # Start
//!
//! In a sandbox it starts with a listening socket at fd 3, stdio on `/dev/null`, already
//! chrooted, in its own pid and user namespaces, with capabilities dropped and seccomp
//! applied. `agentbox-agent --listen PATH` runs it as an ordinary process for development
//! and tests; there it is a child subreaper (orphans of its processes come back to it, as
//! to PID 1), and `SIGTERM`/`SIGINT` SIGKILL the process groups it started, remove the
//! socket file and exit 0. As PID 1 it handles one signal, `SIGCHLD` (to reap,
//! [`reaper`]; Rust's own `SIGSEGV` and `SIGBUS` handlers are removed), so nothing inside
//! the sandbox can signal it but with a `SIGCHLD`, which only makes it look for exited
//! children.
//!
//! Startup does the least possible (it is on the sandbox-creation path): mark the process
//! non-dumpable (sandbox processes cannot ptrace it or read its memory), drop the
//! runtime's fault-signal handlers, set umask 022 (inherited by every process it starts),
//! record its identity, and serve on a current-thread tokio runtime, whose first task
//! reaps children on `SIGCHLD`. `SIGPIPE` is already ignored by the Rust runtime, so a
//! vanished client is an `EPIPE`, and std restores it for children.
//!
//! # Threads
//!
//! The runtime thread does everything, file system calls and reaping ([`reaper`])
//! inline. Besides it there is, per `ArchiveWrite`, a short-lived extraction thread
//! ([`archive`]), and tokio's blocking pool for the network probes ([`netprobe`]). When
//! the sandbox's pid limit is reached, forks and thread creation fail with an error
//! reply; the agent itself keeps running.
//!
//! # Decisions where the protocol leaves room
//!
//! * The end of the client's stream while attached is a disconnect ([`session`]).
//! * `Attach` answers `Event::Started` first ([`session`]); clients may send stdin to
//!   any attached process.
//! * `Signal`, `Input`, `Resize` and `Attach` act on processes the agent started (still
//!   running, or background ones kept after finishing); signalling a process that already
//!   ended is a no-op. Signal numbers must be 0..=64.
//! * `Input` to a process that stopped reading succeeds silently; `Input` to a process
//!   without stdin is `InvalidArgument`. On a terminal, closing stdin types `^D`.
//! * `KillAll` outside a sandbox only reaches the agent's own process groups
//!   ([`server::kill_all`]).
//! * Users, environment and working directory: see [`users`] and [`exec`]; files: see
//!   [`files`] and [`archive`].
#![forbid(unsafe_code)]

pub mod archive;
pub mod creds;
pub mod error;
pub mod exec;
pub mod files;
pub mod netprobe;
pub mod paths;
pub mod process;
pub mod pty;
pub mod reaper;
pub mod ring;
pub mod server;
pub mod session;
pub mod users;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::process::DumpableBehavior;

pub use server::Listen;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot handle SIGCHLD to reap children")]
    Reaper(#[source] io::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] io::Error),
    #[error("no usable listening socket at fd 3 (outside a sandbox, use --listen PATH)")]
    Inherited(#[source] io::Error),
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot handle termination signals")]
    Signals(#[source] io::Error),
}

/// Runs the agent until it is told to stop (development mode) or forever (PID 1).
pub fn run(listen: Listen) -> Result<(), StartError> {
    harden();
    let base = creds::Base::capture();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(StartError::Runtime)?;
    runtime.block_on(async {
        let reaper = reaper::Reaper::start().map_err(StartError::Reaper)?;
        serve(Arc::new(server::Agent::new(reaper, base)), listen).await
    })
}

/// Non-dumpable, umask 022, default actions for `SIGSEGV` and `SIGBUS` (so processes in
/// the sandbox cannot signal PID 1 with them: [`abx_sys::agent::default_fault_signals`]).
/// Failures are ignored: none is worth not starting over.
fn harden() {
    let _ = rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable);
    let _ = abx_sys::agent::default_fault_signals();
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
}

async fn serve(agent: Arc<server::Agent>, listen: Listen) -> Result<(), StartError> {
    match listen {
        Listen::Inherited => {
            let listener = server::inherited_listener().map_err(StartError::Inherited)?;
            server::serve(agent, listener).await;
            Ok(())
        }
        Listen::Path(path) => serve_dev(agent, path).await,
    }
}

/// Development mode: serve until SIGTERM or SIGINT, then clean up. The agent is made a
/// child subreaper, so it also reaps orphans of the processes it started.
async fn serve_dev(agent: Arc<server::Agent>, path: PathBuf) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Orphans of the processes started here come back to the agent, as they would to
    // PID 1, so they are reaped too.
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    let listener = server::bind(&path).map_err(|source| StartError::Bind { path: path.clone(), source })?;
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    tokio::select! {
        _ = server::serve(agent.clone(), listener) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    for proc in agent.procs.running() {
        proc.kill_group();
    }
    let _ = std::fs::remove_file(&path);
    // Give the reaper a moment to collect what was just killed, so nothing is left as a
    // zombie of whatever adopts it next.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while !agent.reaper.idle() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}
