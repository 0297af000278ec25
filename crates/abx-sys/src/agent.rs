//! System calls the guest agent (`agentbox-agent`, PID 1 of a sandbox) needs that `rustix`
//! does not offer safely: waiting for any child without reaping it, signals to arbitrary
//! pids (negative ones and `-1` included) with arbitrary signal numbers, and reading the
//! calling thread's filesystem ids.

use std::io;

use crate::cvt;

/// Blocks until some child has exited and returns its pid *without reaping it*
/// (`waitid(P_ALL, 0, WEXITED | WNOWAIT)`). Fails with `ECHILD` when there are no
/// children and `EINTR` when a signal interrupted the wait.
///
/// The caller reaps the child afterwards with `waitpid(pid, WNOHANG)`, which lets it take
/// a lock first (see the agent's reaper: `std::process::Command::spawn` itself waits for a
/// child whose exec failed, and must win that race).
pub fn wait_exited() -> io::Result<i32> {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into `info`, which lives for the call; the other arguments
    // are integers.
    cvt(unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) } as libc::c_long)?;
    // SAFETY: after a successful waitid with WEXITED the kernel filled in si_pid.
    Ok(unsafe { info.si_pid() })
}

/// `kill(pid, signal)` with the kernel's meaning of `pid`: a process when positive, the
/// process group `-pid` when negative, every process the caller may signal when `-1`.
/// `signal` 0 only checks that the target exists.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill takes two integers and touches no memory of ours.
    cvt(unsafe { libc::kill(pid, signal) } as libc::c_long).map(drop)
}

/// The filesystem uid and gid of the calling thread.
///
/// `setfsuid`/`setfsgid` always return the previous value and change nothing when given
/// an id the caller may not switch to; `-1` is never valid, so this only queries. Used to
/// check that a switch made with `process::set_thread_fs_ids` took effect (it is silently
/// ignored without `CAP_SETUID`).
pub fn thread_fs_ids() -> (u32, u32) {
    // SAFETY: setfsuid/setfsgid with the invalid id -1 change nothing and only return the
    // current id; the raw syscalls keep this per thread.
    unsafe {
        let uid = libc::syscall(libc::SYS_setfsuid, -1i32 as libc::c_long);
        let gid = libc::syscall(libc::SYS_setfsgid, -1i32 as libc::c_long);
        (uid as u32, gid as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_zero_probes_existence() {
        assert!(kill(std::process::id() as i32, 0).is_ok());
    }

    #[test]
    fn fs_ids_follow_effective_ids() {
        let (uid, gid) = thread_fs_ids();
        assert_eq!(uid, rustix::process::geteuid().as_raw());
        assert_eq!(gid, rustix::process::getegid().as_raw());
    }
}
