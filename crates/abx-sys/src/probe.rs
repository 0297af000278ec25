//! Syscalls an in-sandbox verifier (`abx-probe`) tries, expecting the sandbox to refuse them.
//!
//! Every attempt runs in a forked child, so a seccomp *kill* action, a changed namespace or a
//! leftover descriptor can never affect the caller; the child only makes raw syscalls on
//! memory prepared before the fork (no allocation, no locks), so the caller may have other
//! threads. Each call is chosen so that *success* is harmless:
//!
//! * calls that create something (`io_uring_setup`, `bpf`, `perf_event_open`,
//!   `userfaultfd`, `open_tree`, `fsopen`, `add_key`) create it in the child, which exits and
//!   so releases it; the `add_key` key is also invalidated explicitly;
//! * calls that change the child's own state (`unshare`, `setns` into its own UTS
//!   namespace) die with the child; `PTRACE_SEIZE` (unlike `PTRACE_ATTACH`) does not stop
//!   pid 1 and the kernel detaches when the child exits;
//! * `mount` of a tmpfs onto a directory the caller just made is unmounted in the child;
//! * calls that could do harm if they succeeded (`kexec_load`, `init_module`,
//!   `finit_module`, `pivot_root`, `reboot`, `swapon`) get arguments the kernel rejects only
//!   *after* its permission check, so a permission error means "refused" and the documented
//!   argument error means "permitted". See each function for which errno means what.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Why an attempted call did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The call failed with this errno.
    Errno(i32),
    /// The child that made the call died of this signal (`SIGSYS`: a seccomp kill action).
    Signal(i32),
    /// Preparing the call failed with `errno` at `step`, so the call was not made.
    Setup { step: &'static str, errno: i32 },
    /// The call succeeded but undoing it failed (a mount could not be unmounted).
    Cleanup,
}

/// The outcome of one attempt: `Ok` when the call succeeded.
pub type Attempt = Result<(), Failure>;

/// Exit code of a child whose call succeeded but whose cleanup failed.
const CLEANUP_FAILED: i32 = 255;
/// Exit code standing for an errno that does not fit an exit status (reported as
/// `Failure::Errno(254)`, which names no real errno).
const ERRNO_UNKNOWN: i32 = 254;

/// The calling thread's errno (reads a thread-local; async-signal-safe).
fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Converts a raw `-1`/`errno` return into the errno.
fn sys(ret: libc::c_long) -> Result<libc::c_long, i32> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

/// Closes a descriptor a successful call returned (the child exits right after anyway).
fn close(fd: libc::c_long) {
    // SAFETY: `fd` was just returned to this process by the kernel and is owned by nobody else.
    unsafe { libc::close(fd as libc::c_int) };
}

/// Runs `call` in a forked child and reports what it came to there.
///
/// # Safety
/// The caller may have other threads, so `call` must be async-signal-safe: raw syscalls on
/// memory prepared before the fork, no allocation, no locks, no panics. `Err(errno)` from
/// `call` must be a real errno; `Err(CLEANUP_FAILED)` is reserved for [`Failure::Cleanup`].
unsafe fn in_child(call: impl FnOnce() -> Result<(), i32>) -> Attempt {
    // SAFETY: the child runs only `call` (async-signal-safe per this function's contract)
    // and then `_exit`, so the fork-in-a-threaded-process restrictions are respected.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Failure::Setup { step: "fork", errno: errno() });
    }
    if pid == 0 {
        let code = match call() {
            Ok(()) => 0,
            Err(e) if (1..=CLEANUP_FAILED).contains(&e) => e,
            Err(_) => ERRNO_UNKNOWN,
        };
        // SAFETY: `_exit` is async-signal-safe, skips atexit handlers and never returns.
        unsafe { libc::_exit(code) }
    }
    let status = wait(pid)?;
    if libc::WIFSIGNALED(status) {
        return Err(Failure::Signal(libc::WTERMSIG(status)));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        CLEANUP_FAILED => Err(Failure::Cleanup),
        e => Err(Failure::Errno(e)),
    }
}

/// Waits for the child `pid` to terminate, returning its wait status.
fn wait(pid: libc::pid_t) -> Result<libc::c_int, Failure> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer; `pid` is our own child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(status);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(Failure::Setup { step: "waitpid", errno: e });
        }
    }
}

/// `io_uring_setup(1, &params)`; the ring is closed at once.
/// Permitted: ok. Refused: `EPERM` (seccomp, `kernel.io_uring_disabled`), `ENOSYS` (seccomp
/// errno action or a kernel without io_uring).
pub fn try_io_uring_setup() -> Attempt {
    // struct io_uring_params is 120 bytes; all-zero apart from what the kernel fills in.
    let mut params = [0u32; 30];
    let params = params.as_mut_ptr();
    // SAFETY: the closure makes one raw syscall on a buffer of the size the kernel expects
    // and closes the descriptor it returns: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_io_uring_setup, 1u32, params)).map(close)) }
}

/// `bpf(BPF_MAP_CREATE)` of an array map (4-byte keys and values, one entry), closed at once.
/// Permitted: ok. Refused: `EPERM` (no `CAP_BPF` in the initial namespace,
/// `kernel.unprivileged_bpf_disabled`, seccomp), `ENOSYS`.
pub fn try_bpf_map_create() -> Attempt {
    const BPF_MAP_CREATE: libc::c_int = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // union bpf_attr, map-create view: map_type, key_size, value_size, max_entries, rest zero.
    let mut attr = [0u32; 20];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, 4, 1]);
    let (ptr, size) = (attr.as_ptr(), std::mem::size_of_val(&attr) as libc::c_uint);
    // SAFETY: one raw syscall reading `size` bytes from `attr`, then close: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, ptr, size)).map(close)) }
}

/// `perf_event_open` of a software dummy event on the calling process, user space only
/// (`exclude_kernel`, `exclude_hv`), so that even `perf_event_paranoid = 2` would allow it;
/// closed at once. Permitted: ok. Refused: `EPERM` (seccomp), `EACCES`
/// (`kernel.perf_event_paranoid = 3` or an LSM), `ENOSYS`/`ENOENT` (no perf events).
pub fn try_perf_event_open() -> Attempt {
    const PERF_TYPE_SOFTWARE: u64 = 1;
    const PERF_ATTR_SIZE_VER0: u64 = 64;
    const PERF_COUNT_SW_DUMMY: u64 = 9;
    const DISABLED: u64 = 1 << 0;
    const EXCLUDE_KERNEL: u64 = 1 << 5;
    const EXCLUDE_HV: u64 = 1 << 6;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
    // struct perf_event_attr, first 64 bytes (VER0): type|size, config, sample_period,
    // sample_type, read_format, flag bits, wakeup_events|bp_type, bp_addr.
    let mut attr = [0u64; 8];
    attr[0] = PERF_TYPE_SOFTWARE | (PERF_ATTR_SIZE_VER0 << 32);
    attr[1] = PERF_COUNT_SW_DUMMY;
    attr[5] = DISABLED | EXCLUDE_KERNEL | EXCLUDE_HV;
    let ptr = attr.as_ptr();
    // SAFETY: one raw syscall reading the 64-byte attr, then close: async-signal-safe.
    unsafe {
        in_child(|| {
            let (pid, cpu, group): (libc::pid_t, libc::c_int, libc::c_int) = (0, -1, -1);
            sys(libc::syscall(libc::SYS_perf_event_open, ptr, pid, cpu, group, PERF_FLAG_FD_CLOEXEC)).map(close)
        })
    }
}

/// `userfaultfd(O_CLOEXEC | UFFD_USER_MODE_ONLY)` (plain `O_CLOEXEC` on kernels older than
/// 5.11, which reject the flag with `EINVAL`), closed at once. The user-mode-only flag is what
/// `vm.unprivileged_userfaultfd = 0` still allows. Permitted: ok. Refused: `EPERM` (seccomp,
/// sysctl), `ENOSYS`.
pub fn try_userfaultfd() -> Attempt {
    const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    // SAFETY: at most two raw syscalls taking flags only, then close: async-signal-safe.
    unsafe {
        let call = |flags: libc::c_int| sys(libc::syscall(libc::SYS_userfaultfd, flags));
        in_child(|| match call(libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) {
            Err(libc::EINVAL) => call(libc::O_CLOEXEC).map(close),
            r => r.map(close),
        })
    }
}

/// `keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, create = 0)`: a read-only lookup.
/// Permitted: ok (`ENOKEY` would mean permitted but no keyring). Refused: `EPERM`, `ENOSYS`.
pub fn try_keyctl() -> Attempt {
    const KEYCTL_GET_KEYRING_ID: libc::c_int = 0;
    const KEY_SPEC_SESSION_KEYRING: libc::c_int = -3;
    // SAFETY: one raw syscall taking integers only: async-signal-safe.
    unsafe {
        in_child(|| sys(libc::syscall(libc::SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)).map(drop))
    }
}

/// `add_key("user", "abx-probe", "x")` into the child's thread keyring, then
/// `KEYCTL_INVALIDATE`; the thread keyring dies with the child. Permitted: ok (`EDQUOT`
/// would mean permitted but over the key quota). Refused: `EPERM`, `ENOSYS`.
pub fn try_add_key() -> Attempt {
    const KEY_SPEC_THREAD_KEYRING: libc::c_int = -1;
    const KEYCTL_INVALIDATE: libc::c_int = 21;
    let (kind, desc, payload) = (c"user".as_ptr(), c"abx-probe".as_ptr(), b"x".as_ptr());
    // SAFETY: two raw syscalls on static strings: async-signal-safe.
    unsafe {
        in_child(|| {
            let key = sys(libc::syscall(libc::SYS_add_key, kind, desc, payload, 1usize, KEY_SPEC_THREAD_KEYRING))?;
            libc::syscall(libc::SYS_keyctl, KEYCTL_INVALIDATE, key);
            Ok(())
        })
    }
}

/// `kexec_load(0, 1 << 20 segments, NULL, 0)`: the segment count is over `KEXEC_SEGMENT_MAX`,
/// which the kernel checks after the permission check, and the NULL segment list could never
/// be loaded anyway (a count of 0 would *unload* a loaded image, so it is never used).
/// Permitted: `EINVAL` (or `EFAULT`). Refused: `EPERM` (no `CAP_SYS_BOOT` in the initial
/// namespace, `kernel.kexec_load_disabled`, lockdown, seccomp), `ENOSYS`.
pub fn try_kexec_load() -> Attempt {
    let nr_segments: libc::c_ulong = 1 << 20;
    // SAFETY: one raw syscall that fails before reading the (NULL) segment list: async-signal-safe.
    unsafe {
        in_child(|| {
            let segments: *const libc::c_void = std::ptr::null();
            sys(libc::syscall(libc::SYS_kexec_load, 0 as libc::c_ulong, nr_segments, segments, 0 as libc::c_ulong))
                .map(drop)
        })
    }
}

/// `init_module(NULL, 0, "")`: a zero-length image, which the kernel rejects after the
/// permission check. Permitted: `ENOEXEC`. Refused: `EPERM` (no `CAP_SYS_MODULE`,
/// `kernel.modules_disabled`, seccomp), `ENOSYS`.
pub fn try_init_module() -> Attempt {
    let params = c"".as_ptr();
    // SAFETY: one raw syscall that never reads the (NULL, zero-length) image: async-signal-safe.
    unsafe {
        in_child(|| {
            let image: *const libc::c_void = std::ptr::null();
            sys(libc::syscall(libc::SYS_init_module, image, 0 as libc::c_ulong, params)).map(drop)
        })
    }
}

/// `finit_module(-1, "", 0)`: a bad descriptor, rejected after the permission check.
/// Permitted: `EBADF`. Refused: `EPERM` (as for `init_module`), `ENOSYS`.
pub fn try_finit_module() -> Attempt {
    let params = c"".as_ptr();
    // SAFETY: one raw syscall on a static string: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_finit_module, -1, params, 0)).map(drop)) }
}

/// `mount("tmpfs", dir, "tmpfs", MS_NOSUID|MS_NODEV|MS_NOEXEC, "size=64k")`, unmounted again
/// in the child (lazily if a plain unmount fails; `Failure::Cleanup` if both fail). `dir`
/// should be an empty directory the caller just made. Permitted: ok. Refused: `EPERM` (no
/// `CAP_SYS_ADMIN` over the mount namespace, seccomp), `ENOSYS`.
pub fn try_mount_tmpfs(dir: &Path) -> Attempt {
    let target = cstring(dir, "path")?;
    let target = target.as_ptr();
    let (source, data) = (c"tmpfs".as_ptr(), c"size=64k,mode=0700".as_ptr());
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: raw mount/umount2 syscalls on strings built before the fork: async-signal-safe.
    unsafe {
        in_child(|| {
            sys(libc::mount(source, target, source, flags, data.cast()) as libc::c_long)?;
            if libc::umount2(target, 0) == 0 || libc::umount2(target, libc::MNT_DETACH) == 0 {
                Ok(())
            } else {
                Err(CLEANUP_FAILED)
            }
        })
    }
}

fn cstring(path: &Path, step: &'static str) -> Result<std::ffi::CString, Failure> {
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Failure::Setup { step, errno: libc::EINVAL })
}

/// `unshare(CLONE_NEWUSER)` in the child. Permitted: ok. Refused: `EPERM` (seccomp, a
/// chrooted caller, `kernel.unprivileged_userns_clone = 0`), `ENOSPC` (`user.max_user_namespaces`
/// or the nesting limit reached), `EUSERS` (older kernels' nesting limit), `ENOSYS`.
pub fn try_unshare_user() -> Attempt {
    try_unshare(libc::CLONE_NEWUSER)
}

/// `unshare(CLONE_NEWNS)` in the child. Permitted: ok. Refused: `EPERM` (no `CAP_SYS_ADMIN`
/// in the caller's user namespace, seccomp), `ENOSPC` (`user.max_mnt_namespaces`), `ENOSYS`.
pub fn try_unshare_mount() -> Attempt {
    try_unshare(libc::CLONE_NEWNS)
}

fn try_unshare(flags: libc::c_int) -> Attempt {
    // SAFETY: one raw syscall taking flags only, in a single-threaded child: async-signal-safe.
    unsafe { in_child(|| sys(libc::unshare(flags) as libc::c_long).map(drop)) }
}

/// `setns` into the child's *own* UTS namespace (`/proc/self/ns/uts`, opened before the
/// fork; failing that is `Failure::Setup`), which changes nothing. Permitted: ok. Refused:
/// `EPERM` (seccomp, or no `CAP_SYS_ADMIN` over the user namespace that owns the UTS
/// namespace: also the case when a user namespace was made without a UTS namespace of its
/// own), `ENOSYS`.
pub fn try_setns() -> Attempt {
    let ns = std::fs::File::open("/proc/self/ns/uts")
        .map_err(|e| Failure::Setup { step: "open /proc/self/ns/uts", errno: e.raw_os_error().unwrap_or(0) })?;
    let fd = ns.as_raw_fd();
    // SAFETY: one raw syscall on a descriptor `ns` keeps open across the fork: async-signal-safe.
    unsafe { in_child(|| sys(libc::setns(fd, libc::CLONE_NEWUTS) as libc::c_long).map(drop)) }
}

/// `pivot_root("", "")`: the empty path fails lookup after the permission check.
/// Permitted: `ENOENT`. Refused: `EPERM` (no `CAP_SYS_ADMIN` over the mount namespace,
/// seccomp), `ENOSYS`.
pub fn try_pivot_root() -> Attempt {
    let empty = c"".as_ptr();
    // SAFETY: one raw syscall on a static string: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_pivot_root, empty, empty)).map(drop)) }
}

/// `open_tree(AT_FDCWD, "/", OPEN_TREE_CLONE | AT_RECURSIVE | OPEN_TREE_CLOEXEC)`: a detached
/// copy of the mount tree, dropped when the descriptor closes. Permitted: ok. Refused: `EPERM`
/// (no `CAP_SYS_ADMIN` over the mount namespace, seccomp), `ENOSYS`.
pub fn try_open_tree() -> Attempt {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let flags = OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint;
    let root = c"/".as_ptr();
    // SAFETY: one raw syscall on a static string, then close: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, root, flags)).map(close)) }
}

/// `fsopen("tmpfs", FSOPEN_CLOEXEC)`: a filesystem context, dropped when closed. Permitted:
/// ok. Refused: `EPERM` (no `CAP_SYS_ADMIN` over the mount namespace, seccomp), `ENOSYS`.
pub fn try_fsopen() -> Attempt {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    let fstype = c"tmpfs".as_ptr();
    // SAFETY: one raw syscall on a static string, then close: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_fsopen, fstype, FSOPEN_CLOEXEC)).map(close)) }
}

/// `ptrace(PTRACE_SEIZE, pid)` from the child (the verifier uses pid 1). `PTRACE_SEIZE` runs
/// the same permission check as `PTRACE_ATTACH` but does not stop the tracee, and the kernel
/// detaches when the child exits, so the target never notices. Permitted: ok. Refused: `EPERM`
/// (capabilities, a different user namespace, Yama `ptrace_scope`, seccomp), `ENOSYS`;
/// `ESRCH` means no such process is visible.
pub fn try_ptrace_seize(pid: i32) -> Attempt {
    const PTRACE_SEIZE: libc::c_long = 0x4206;
    // SAFETY: one raw syscall taking integers only: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_ptrace, PTRACE_SEIZE, pid, 0usize, 0usize)).map(drop)) }
}

/// `reboot(0, 0, LINUX_REBOOT_CMD_CAD_OFF, NULL)`: the wrong magic numbers are rejected after
/// the permission check, so nothing happens even when permitted (a correct `CAD_OFF` would
/// change the host's Ctrl-Alt-Del setting). Permitted: `EINVAL`. Refused: `EPERM` (no
/// `CAP_SYS_BOOT` over the pid namespace, seccomp).
pub fn try_reboot() -> Attempt {
    const LINUX_REBOOT_CMD_CAD_OFF: libc::c_uint = 0;
    let arg: *const libc::c_void = std::ptr::null();
    // SAFETY: one raw syscall rejected before `arg` is read: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_reboot, 0, 0, LINUX_REBOOT_CMD_CAD_OFF, arg)).map(drop)) }
}

/// `swapon("", 0)`: the empty path fails lookup after the permission check.
/// Permitted: `ENOENT`. Refused: `EPERM` (no `CAP_SYS_ADMIN` in the initial namespace,
/// seccomp), `ENOSYS` (no swap support).
pub fn try_swapon() -> Attempt {
    let empty = c"".as_ptr();
    // SAFETY: one raw syscall on a static string: async-signal-safe.
    unsafe { in_child(|| sys(libc::syscall(libc::SYS_swapon, empty, 0)).map(drop)) }
}

/// The symbolic name of `errno` (`"EPERM"`), if it is one a probe may meet.
pub fn errno_name(errno: i32) -> Option<&'static str> {
    ERRNO_NAMES.iter().find(|(n, _)| *n == errno).map(|(_, name)| *name)
}

/// The symbolic name of signal `sig` (`"SIGSYS"`), for the common ones.
pub fn signal_name(sig: i32) -> Option<&'static str> {
    SIGNAL_NAMES.iter().find(|(n, _)| *n == sig).map(|(_, name)| *name)
}

const SIGNAL_NAMES: &[(i32, &str)] = &[
    (libc::SIGSYS, "SIGSYS"),
    (libc::SIGKILL, "SIGKILL"),
    (libc::SIGSEGV, "SIGSEGV"),
    (libc::SIGABRT, "SIGABRT"),
    (libc::SIGBUS, "SIGBUS"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGTRAP, "SIGTRAP"),
];

macro_rules! errno_table {
    ($($name:ident),* $(,)?) => { &[$((libc::$name, stringify!($name))),*] };
}

const ERRNO_NAMES: &[(i32, &str)] = errno_table![
    EPERM,
    ENOENT,
    ESRCH,
    EINTR,
    EIO,
    ENXIO,
    E2BIG,
    ENOEXEC,
    EBADF,
    ECHILD,
    EAGAIN,
    ENOMEM,
    EACCES,
    EFAULT,
    ENOTBLK,
    EBUSY,
    EEXIST,
    EXDEV,
    ENODEV,
    ENOTDIR,
    EISDIR,
    EINVAL,
    ENFILE,
    EMFILE,
    ENOTTY,
    ETXTBSY,
    EFBIG,
    ENOSPC,
    ESPIPE,
    EROFS,
    EMLINK,
    EPIPE,
    EDOM,
    ERANGE,
    EDEADLK,
    ENAMETOOLONG,
    ENOLCK,
    ENOSYS,
    ENOTEMPTY,
    ELOOP,
    ENOMSG,
    ENODATA,
    ENOLINK,
    EPROTO,
    EOVERFLOW,
    EBADFD,
    EUSERS,
    ENOTSOCK,
    EDESTADDRREQ,
    EMSGSIZE,
    EPROTOTYPE,
    ENOPROTOOPT,
    EPROTONOSUPPORT,
    EOPNOTSUPP,
    EAFNOSUPPORT,
    EADDRINUSE,
    EADDRNOTAVAIL,
    ENETDOWN,
    ENETUNREACH,
    ENETRESET,
    ECONNABORTED,
    ECONNRESET,
    ENOBUFS,
    EISCONN,
    ENOTCONN,
    ETIMEDOUT,
    ECONNREFUSED,
    EHOSTDOWN,
    EHOSTUNREACH,
    EALREADY,
    EINPROGRESS,
    ESTALE,
    EDQUOT,
    ENOMEDIUM,
    ECANCELED,
    ENOKEY,
    EKEYEXPIRED,
    EKEYREVOKED,
    EKEYREJECTED,
    EOWNERDEAD,
    ERFKILL,
    EHWPOISON,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_cover_the_refusals() {
        assert_eq!(errno_name(libc::EPERM), Some("EPERM"));
        assert_eq!(errno_name(libc::ENOSYS), Some("ENOSYS"));
        assert_eq!(errno_name(libc::EACCES), Some("EACCES"));
        assert_eq!(errno_name(9999), None);
        assert_eq!(signal_name(libc::SIGSYS), Some("SIGSYS"));
    }

    #[test]
    fn child_outcomes_map_to_failures() {
        // SAFETY: the closures make no calls at all.
        unsafe {
            assert_eq!(in_child(|| Ok(())), Ok(()));
            assert_eq!(in_child(|| Err(libc::EPERM)), Err(Failure::Errno(libc::EPERM)));
            assert_eq!(in_child(|| Err(CLEANUP_FAILED)), Err(Failure::Cleanup));
            assert_eq!(in_child(|| Err(-1)), Err(Failure::Errno(ERRNO_UNKNOWN)));
        }
    }

    #[test]
    fn a_killed_child_reports_its_signal() {
        // SAFETY: `raise` is async-signal-safe (SIGTERM: no core dump).
        let got = unsafe {
            in_child(|| {
                libc::raise(libc::SIGTERM);
                Ok(())
            })
        };
        assert_eq!(got, Err(Failure::Signal(libc::SIGTERM)));
    }
}
