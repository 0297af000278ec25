//! Processes: clone3 into new namespaces, exec from a descriptor, per-thread fsuid,
//! capability sets, and the setup a spawned command needs between fork and exec.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::cvt;

/// Namespace flags for [`clone3`].
pub mod ns {
    pub const USER: u64 = libc::CLONE_NEWUSER as u64;
    pub const PID: u64 = libc::CLONE_NEWPID as u64;
    pub const NET: u64 = libc::CLONE_NEWNET as u64;
    pub const MOUNT: u64 = libc::CLONE_NEWNS as u64;
    pub const UTS: u64 = libc::CLONE_NEWUTS as u64;
    pub const IPC: u64 = libc::CLONE_NEWIPC as u64;
    pub const CGROUP: u64 = libc::CLONE_NEWCGROUP as u64;
    pub const TIME: u64 = 0x80;
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// The two sides of a [`clone3`].
#[derive(Debug)]
pub enum Forked {
    Child,
    Parent { pid: i32, pidfd: OwnedFd },
}

/// `clone3` without `CLONE_VM` (fork semantics) into the namespaces in `namespaces`
/// (see [`ns`]), returning a pidfd for the child in the parent.
///
/// # Safety
/// Same contract as `fork`: the calling process must be single-threaded, or the child
/// must restrict itself to async-signal-safe operations until it calls exec or `_exit`.
/// With `cgroup`, the child starts in that cgroup2 directory (`CLONE_INTO_CGROUP`), which
/// is much cheaper than migrating it afterwards.
pub unsafe fn clone3(namespaces: u64, cgroup: Option<BorrowedFd<'_>>) -> io::Result<Forked> {
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: namespaces | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // SAFETY: `args` is a valid clone_args of the size we pass, `pidfd` outlives the call;
    // the fork-safety contract is the caller's (see above).
    let ret =
        cvt(unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) })?;
    if ret == 0 {
        return Ok(Forked::Child);
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor that we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Forked::Parent { pid: ret as i32, pidfd })
}

/// Unshares the namespaces in `namespaces` for the calling (single-threaded) process.
pub fn unshare(namespaces: u64) -> io::Result<()> {
    // SAFETY: unshare takes flags only. Unsharing CLONE_FILES/CLONE_FS could break other
    // threads' assumptions; callers pass namespace flags only, in single-threaded code.
    cvt(unsafe { libc::unshare(namespaces as libc::c_int) } as libc::c_long).map(drop)
}

/// Every signal's disposition back to the default (but `SIGKILL`'s and `SIGSTOP`'s,
/// which cannot change) and nothing blocked, as a process starts when nothing before it
/// changed them. For a process about to exec something that must not inherit what its
/// ancestors ignored (a daemon started as a shell's background job ignores `SIGINT` and
/// `SIGQUIT`). Any handler of the caller is gone afterwards.
pub fn reset_signals() -> io::Result<()> {
    // SAFETY: raw rt_sigaction calls on a struct of their own; the caller accepts
    // losing its handlers (documented above).
    unsafe { crate::spawn::default_dispositions() };
    let empty = crate::spawn::unsafe_zeroed_sigset();
    // SAFETY: sets this thread's mask from an empty set that lives for the call.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
    if r == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(r)) }
}

/// Executes the program open at `fd` (`execveat(fd, "", .., AT_EMPTY_PATH)`).
/// Returns only on failure.
pub fn exec_fd(fd: RawFd, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut a: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = envp.iter().map(|s| s.as_ptr()).collect();
    e.push(std::ptr::null());
    // SAFETY: both arrays are NULL-terminated and point into CStrings alive for the call.
    unsafe { libc::syscall(libc::SYS_execveat, fd, c"".as_ptr(), a.as_ptr(), e.as_ptr(), libc::AT_EMPTY_PATH) };
    io::Error::last_os_error()
}

/// Sets the filesystem uid and gid of the calling thread only (the raw syscalls are per
/// thread). Used to perform file operations with a sandbox user's permissions.
pub fn set_thread_fs_ids(uid: u32, gid: u32) {
    // SAFETY: setfsgid/setfsuid take integers and cannot fail in a harmful way; calling
    // the raw syscalls keeps the change to this thread.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
    }
}

/// Sets the supplementary groups of the calling thread only.
pub fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t-sized integers.
    cvt(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }).map(drop)
}

/// Keeps only the capabilities whose numbers are in `keep` in the bounding, permitted,
/// effective and inheritable sets, and clears the ambient set.
pub fn restrict_capabilities(keep: &[u32]) -> io::Result<()> {
    let last = last_capability();
    for cap in 0..=last {
        if !keep.contains(&cap) {
            // SAFETY: prctl(PR_CAPBSET_DROP, n) takes integers only.
            cvt(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } as libc::c_long)?;
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integers only.
    cvt(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) }
        as libc::c_long)?;
    let mut mask = [0u32; 2];
    for &cap in keep {
        if cap <= last {
            mask[(cap / 32) as usize] |= 1 << (cap % 32);
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let hdr = Header { version: 0x2008_0522, pid: 0 };
    let data = [
        Data { effective: mask[0], permitted: mask[0], inheritable: 0 },
        Data { effective: mask[1], permitted: mask[1], inheritable: 0 },
    ];
    // SAFETY: capset reads a v3 header and two data structs, all alive for the call.
    cvt(unsafe { libc::syscall(libc::SYS_capset, &hdr as *const Header, data.as_ptr()) }).map(drop)
}

/// The highest capability number the running kernel knows.
pub fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

/// Sets `no_new_privs`, then loads a classic BPF seccomp filter (raw `sock_filter`
/// instructions, 8 bytes each) for the calling thread.
pub fn load_seccomp(bpf: &[u8]) -> io::Result<()> {
    if !bpf.len().is_multiple_of(8) || bpf.is_empty() || bpf.len() / 8 > u16::MAX as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "malformed seccomp program"));
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long)?;
    // Copy into properly aligned sock_filter structs.
    let filters: Vec<libc::sock_filter> = bpf
        .chunks_exact(8)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let prog = libc::sock_fprog { len: filters.len() as u16, filter: filters.as_ptr() as *mut libc::sock_filter };
    // SAFETY: `prog` points at `filters`, both alive for the call; the kernel copies them.
    cvt(unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const _) }).map(drop)
}

/// What a spawned command needs done between fork and exec, performed with raw syscalls
/// only (no allocation), so it is safe in a multi-threaded parent.
#[derive(Debug, Default, Clone)]
pub struct PreExec {
    /// Start a new session (and so a new process group).
    pub setsid: bool,
    /// Make this descriptor (a terminal, already dup'ed to stdin) the controlling terminal.
    pub controlling_tty: bool,
    /// Start a new process group (when not starting a session).
    pub setpgid: bool,
    /// Value for /proc/self/oom_score_adj (only raising is allowed unprivileged).
    pub oom_score_adj: Option<i32>,
    /// Switch to these supplementary groups, then gid, then uid (in that order, after the
    /// oom score, which an unprivileged process could no longer write). Do not also use
    /// `Command::uid`/`gid`: std applies those before `pre_exec` closures run.
    pub ids: Option<Ids>,
    /// Close every inherited descriptor above stderr.
    pub close_fds: bool,
}

/// Credentials to switch to.
#[derive(Debug, Default, Clone)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Registers `setup` to run in the child between fork and exec.
pub fn set_pre_exec(cmd: &mut Command, setup: PreExec) {
    let adj = crate::spawn::format_adj(setup.oom_score_adj);
    // SAFETY: `run_pre_exec` performs only raw system calls on data prepared before the
    // fork (`setup` and `adj`, owned by the closure): no allocation, no locks, as
    // `pre_exec` requires.
    unsafe { cmd.pre_exec(move || crate::spawn::run_pre_exec(&setup, &adj).map_err(io::Error::from_raw_os_error)) };
}

/// [`clone3`] for a process that is single-threaded, checked at run time (the thread
/// count in /proc/self/stat), which makes the call safe: the child gets a consistent copy
/// of the only thread's memory, locks included.
pub fn fork_single_threaded(namespaces: u64, cgroup: Option<BorrowedFd<'_>>) -> io::Result<Forked> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Field 20 (num_threads) counted after the ")" that ends the command name.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let threads: u64 = after.split_whitespace().nth(17).and_then(|s| s.parse().ok()).unwrap_or(0);
    if threads != 1 {
        return Err(io::Error::other(format!("refusing to fork a process with {threads} threads")));
    }
    // SAFETY: the process has exactly one thread (checked above), the contract of clone3.
    unsafe { clone3(namespaces, cgroup) }
}
