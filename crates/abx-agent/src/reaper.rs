//! Reaping: as PID 1 the agent inherits every orphan in the sandbox and must collect them
//! all, while still reporting exit statuses of the processes it started.
//!
//! One dedicated thread waits for *any* child. It first only learns the pid of an exited
//! child (`waitid(P_ALL, WEXITED | WNOWAIT)`), then takes the spawn *gate* and reaps that
//! pid (`waitpid(pid, WNOHANG)`), then hands the status to whoever registered for it.
//! [`Reaper::spawn`] holds the gate around starting the process
//! ([`abx_sys::spawn::Program::spawn`]) and registering the new pid:
//!
//! * the start itself `waitpid`s a child whose setup or exec failed; under the gate the
//!   reaper cannot reap it first (and hand its status to nobody);
//! * a child that exits at once cannot be reaped before its waiter is registered, so no
//!   pending-status map is needed (the gate closes the race that map would cover);
//! * statuses of unregistered pids (orphans) are dropped, so nothing accumulates.
//!
//! When there are no children (`ECHILD`) the thread parks on a condvar until the next
//! spawn (a generation counter closes the check-then-park race), waking once a second in
//! case a process that entered the namespace from outside left orphans behind.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use abx_proto::ExitStatus;
use rustix::io::Errno;
use rustix::process::{Pid, WaitOptions, WaitStatus};
use tokio::sync::watch;

/// Receives a process's exit status once it has been reaped.
pub type ExitWatch = watch::Receiver<Option<ExitStatus>>;

/// Handle to the reaper thread.
#[derive(Clone, Debug)]
pub struct Reaper {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Held while forking and registering, and while reaping.
    gate: Mutex<()>,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    waiters: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
    /// Bumped by every spawn; lets the thread park without missing one.
    generation: u64,
    /// The last wait found no children at all.
    idle: bool,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Reaper> {
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        std::thread::Builder::new().name("reaper".into()).stack_size(128 << 10).spawn(move || thread_shared.run())?;
        Ok(Reaper { shared })
    }

    /// Starts a process with `start` (which returns its pid, having reaped it itself if
    /// it failed) and registers for its exit status. Never wait for the pid elsewhere:
    /// the reaper collects it.
    pub fn spawn(&self, start: impl FnOnce() -> io::Result<u32>) -> io::Result<(u32, ExitWatch)> {
        let _gate = lock(&self.shared.gate);
        let pid = start()?;
        let (tx, rx) = watch::channel(None);
        let mut state = lock(&self.shared.state);
        state.waiters.insert(pid as i32, tx);
        state.generation += 1;
        state.idle = false;
        self.shared.wake.notify_one();
        Ok((pid, rx))
    }

    /// Whether the agent has no children left (as of the reaper's last wait).
    pub fn idle(&self) -> bool {
        lock(&self.shared.state).idle
    }
}

impl Shared {
    fn run(&self) {
        loop {
            let generation = lock(&self.state).generation;
            match abx_sys::agent::wait_exited() {
                Ok(pid) => self.reap(pid),
                Err(e) if e.raw_os_error() == Some(Errno::CHILD.raw_os_error()) => self.park(generation),
                Err(e) if e.raw_os_error() == Some(Errno::INTR.raw_os_error()) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn reap(&self, pid: i32) {
        let Some(target) = Pid::from_raw(pid) else { return };
        let reaped = {
            let _gate = lock(&self.gate);
            rustix::process::waitpid(Some(target), WaitOptions::NOHANG)
        };
        if let Ok(Some((_, status))) = reaped {
            self.deliver(pid, status);
        }
    }

    fn deliver(&self, pid: i32, status: WaitStatus) {
        let waiter = lock(&self.state).waiters.remove(&pid);
        if let Some(tx) = waiter {
            tx.send_replace(Some(exit_status(status)));
        }
    }

    fn park(&self, generation: u64) {
        let mut state = lock(&self.state);
        if state.generation == generation {
            state.idle = true;
            let _ = self.wake.wait_timeout(state, Duration::from_secs(1));
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
        reaper.spawn(|| program.spawn([null.as_fd(), null.as_fd(), null.as_fd()], &PreExec::default()))
    }

    /// One reaper per process: two would steal each other's children.
    fn reaper() -> Reaper {
        static REAPER: std::sync::OnceLock<Reaper> = std::sync::OnceLock::new();
        REAPER.get_or_init(|| Reaper::start().unwrap()).clone()
    }

    #[tokio::test]
    async fn reports_exit_codes_and_signals() {
        let reaper = reaper();
        let (_pid, mut exit) = start(&reaper, &["sh", "-c", "exit 7"]).unwrap();
        let status = exit.wait_for(Option::is_some).await.unwrap().unwrap();
        assert_eq!((status.code, status.signal), (Some(7), None));
        let (_pid, mut exit) = start(&reaper, &["sh", "-c", "kill -9 $$"]).unwrap();
        let status = exit.wait_for(Option::is_some).await.unwrap().unwrap();
        assert_eq!((status.code, status.signal), (None, Some(9)));
    }

    #[tokio::test]
    async fn failed_exec_is_an_error_not_a_panic() {
        let reaper = reaper();
        for _ in 0..20 {
            let err = start(&reaper, &["/nonexistent/program"]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
        }
    }
}
