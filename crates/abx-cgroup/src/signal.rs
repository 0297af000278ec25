//! SIGKILL for member processes (agentbox does not use `cgroup.kill`, see the crate docs).
//!
//! A pid read from `cgroup.procs` may be reused by an unrelated process before it is
//! signalled. To rule that out each pid is first pinned with a pidfd, `cgroup.procs` is read
//! again, and only pinned processes still listed there are signalled: a pid still in the
//! cgroup after its pidfd was opened names the very process the pidfd refers to. Kernels
//! without `pidfd_open` (before 5.3) fall back to `kill(2)` by pid.

use std::io;
use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal};

/// A process about to be killed, pinned by a pidfd where the kernel supports it.
#[derive(Debug)]
pub(crate) struct Pinned {
    pub(crate) pid: u32,
    fd: Option<OwnedFd>,
}

/// Pins every pid in `pids` that still exists.
pub(crate) fn pin(pids: &[u32]) -> Vec<Pinned> {
    pids.iter().filter_map(|&pid| pin_one(pid)).collect()
}

fn pin_one(pid: u32) -> Option<Pinned> {
    let raw = Pid::from_raw(i32::try_from(pid).ok()?)?;
    match rustix::process::pidfd_open(raw, PidfdFlags::empty()) {
        Ok(fd) => Some(Pinned { pid, fd: Some(fd) }),
        Err(Errno::NOSYS) => Some(Pinned { pid, fd: None }),
        Err(_) => None,
    }
}

/// Sends SIGKILL; a process that is already gone is not an error.
pub(crate) fn sigkill(target: &Pinned) -> io::Result<()> {
    let sent = match &target.fd {
        Some(fd) => rustix::process::pidfd_send_signal(fd, Signal::KILL),
        None => kill_by_pid(target.pid),
    };
    match sent {
        Ok(()) | Err(Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn kill_by_pid(pid: u32) -> rustix::io::Result<()> {
    let raw = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or(Errno::SRCH)?;
    rustix::process::kill_process(raw, Signal::KILL)
}
