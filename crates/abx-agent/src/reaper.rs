//! Reaping: as PID 1 the agent inherits every orphan in the sandbox and must collect them
//! all, while still reporting exit statuses of the processes it started.
//!
//! There is no reaper thread. A task on the agent's (current-thread) runtime waits for
//! `SIGCHLD` and then collects every child that has exited (`waitpid(-1, WNOHANG)` until
//! none is left), handing each status to whoever registered for its pid; statuses of
//! unregistered pids (orphans) are dropped, so nothing accumulates. Signals of one kind
//! coalesce, which is why every wake-up reaps until there is nothing left.
//!
//! Everything here runs on the runtime's one thread: [`Reaper::spawn`] starts the process
//! ([`abx_sys::spawn::Program::spawn`]) and registers its pid without yielding, so the
//! reaping task cannot run in between. That closes both races a reaper thread needed a
//! lock for: the start itself `waitpid`s a child whose setup or exec failed (nobody else
//! can reap it first), and a child that exits at once is reaped only after its waiter is
//! registered. So the agent must never start processes from another thread.
//!
//! Installing the `SIGCHLD` handler means a process inside the sandbox can send the agent
//! `SIGCHLD` (PID 1 of a pid namespace receives from inside only the signals it handles);
//! all that does is a `waitpid` that finds nothing. Every other signal stays ignored.
//! Compared with a thread blocked in `waitid`, the exit of a child wakes one thread (the
//! runtime's, which the child's end of output wakes anyway) instead of two, and starting
//! a process wakes nothing.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use abx_proto::ExitStatus;
use rustix::io::Errno;
use rustix::process::{WaitIdOptions, WaitOptions, WaitStatus};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Receives a process's exit status once it has been reaped.
pub type ExitWatch = watch::Receiver<Option<ExitStatus>>;

/// Handle to the reaping task.
#[derive(Clone, Debug, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, watch::Sender<Option<ExitStatus>>>>>,
}

impl Reaper {
    /// Installs the `SIGCHLD` handler and starts the reaping task on the current runtime,
    /// which must be a current-thread runtime (see the module docs).
    pub fn start() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper::default();
        let task = reaper.clone();
        tokio::spawn(async move {
            loop {
                // Reap first: children that exited before the handler existed, or
                // between two signals, are collected too.
                task.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Starts a process with `start` (which returns its pid, having reaped it itself if
    /// it failed) and registers for its exit status. Call it on the runtime's thread and
    /// never wait for the pid elsewhere: the reaping task collects it.
    pub fn spawn<E>(&self, start: impl FnOnce() -> Result<u32, E>) -> Result<(u32, ExitWatch), E> {
        let pid = start()?;
        let (tx, rx) = watch::channel(None);
        lock(&self.waiters).insert(pid as i32, tx);
        Ok((pid, rx))
    }

    /// Whether the agent has no children left, exited or running.
    pub fn idle(&self) -> bool {
        let any = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        // Running children make waitid answer "none exited yet"; only ECHILD means none.
        matches!(rustix::process::waitid(rustix::process::WaitId::All, any), Err(Errno::CHILD))
    }

    /// Collects every child that has exited and delivers the statuses of registered ones.
    fn reap_all(&self) {
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => self.deliver(pid.as_raw_nonzero().get(), status),
                Err(Errno::INTR) => continue,
                // None exited yet, no children at all, or an error waiting cannot fix.
                Ok(None) | Err(_) => return,
            }
        }
    }

    fn deliver(&self, pid: i32, status: WaitStatus) {
        let waiter = lock(&self.waiters).remove(&pid);
        if let Some(tx) = waiter {
            tx.send_replace(Some(exit_status(status)));
        }
    }
}

/// Converts a raw wait status.
pub fn exit_status(status: WaitStatus) -> ExitStatus {
    ExitStatus { code: status.exit_status(), signal: status.terminating_signal(), timed_out: false }
}

/// Locks a mutex, ignoring poisoning (the data stays consistent: no code panics while
/// holding these locks, and the agent must never die of a poisoned lock).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abx_sys::process::PreExec;
    use abx_sys::spawn::Program;
    use std::os::fd::AsFd;

    /// Starts `argv` (looked up in /usr/bin:/bin) with /dev/null as stdio.
    fn start(reaper: &Reaper, argv: &[&str]) -> io::Result<(u32, ExitWatch)> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let program = Program::new(&argv, [("PATH", "/usr/bin:/bin")], "/")?;
        let null = std::fs::File::open("/dev/null")?;
        Ok(reaper.spawn(|| program.spawn([null.as_fd(), null.as_fd(), null.as_fd()], &PreExec::default()))?)
    }

    /// One test, so one reaper per process even under `cargo test` (two would steal each
    /// other's children).
    #[tokio::test]
    async fn reports_exits_and_failed_starts() {
        let reaper = Reaper::start().unwrap();
        let (_pid, mut exit) = start(&reaper, &["sh", "-c", "exit 7"]).unwrap();
        let status = exit.wait_for(Option::is_some).await.unwrap().unwrap();
        assert_eq!((status.code, status.signal), (Some(7), None));
        let (_pid, mut exit) = start(&reaper, &["sh", "-c", "kill -9 $$"]).unwrap();
        let status = exit.wait_for(Option::is_some).await.unwrap().unwrap();
        assert_eq!((status.code, status.signal), (None, Some(9)));
        // A child that exits before anyone awaits it is still reported.
        let (_pid, mut exit) = start(&reaper, &["true"]).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let status = exit.wait_for(Option::is_some).await.unwrap().unwrap();
        assert_eq!(status.code, Some(0));
        // A failed exec is an error, not a panic, and leaves no child behind.
        for _ in 0..20 {
            let err = start(&reaper, &["/nonexistent/program"]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
        }
        // Many short children at once: every status arrives although signals coalesce.
        let mut exits = Vec::new();
        for i in 0..50 {
            exits.push(start(&reaper, &["sh", "-c", &format!("exit {}", i % 7)]).unwrap());
        }
        for (i, (_pid, mut exit)) in exits.into_iter().enumerate() {
            let status = exit.wait_for(Option::is_some).await.unwrap().unwrap();
            assert_eq!(status.code, Some((i % 7) as i32));
        }
    }
}
