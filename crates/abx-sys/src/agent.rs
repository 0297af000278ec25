//! System calls the guest agent (`agentbox-agent`, PID 1 of a sandbox) needs that `rustix`
//! does not offer safely: signals to arbitrary pids (negative ones and `-1` included) with
//! arbitrary signal numbers, default actions for the fault signals, and reading the calling
//! thread's filesystem ids.

use std::io;

use crate::cvt;

/// Gives `SIGSEGV` and `SIGBUS` back their default action. Rust's runtime catches both
/// to report stack overflows, on a small alternate signal stack; in PID 1 of a sandbox
/// that made them the only signals, besides those it handles on purpose, that processes
/// inside could send it, and two sent at once overflow that stack and kill it. With the
/// default action PID 1 ignores them from inside its namespace, while a real fault (a
/// signal the kernel forces) still ends it.
pub fn default_fault_signals() -> io::Result<()> {
    for signal in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: sigaction is plain old data; all-zero with SIG_DFL (0) is a valid value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = libc::SIG_DFL;
        // SAFETY: `action` lives for the call; the old action is not asked for.
        cvt(unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } as libc::c_long)?;
    }
    Ok(())
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
