//! Starting a program without copying the caller's memory: `clone(CLONE_VM | CLONE_VFORK)`
//! runs the child on a stack of its own in the caller's address space until it calls
//! `execve`, the way `posix_spawn` does, so nothing is copied and nothing is faulted in
//! twice. `fork` (what `std::process::Command` does as soon as a `pre_exec` step is
//! needed) copies the page tables and marks every private page copy-on-write in both
//! processes, which the parent then pays for page by page; on a VM whose page-table
//! updates are expensive that is most of the cost of starting a small program (see
//! docs/performance.md).
//!
//! What the child does between clone and exec is fixed ([`PreExec`], [`run_pre_exec`],
//! which `crate::process::set_pre_exec` runs after a fork too) and done with raw system
//! calls on data prepared before the clone: no allocation, no locks, no libc
//! state (the child shares the caller's memory, so touching the allocator or a lock could
//! corrupt the caller). Signals are blocked in the caller around the clone, so no handler
//! of the caller can run on the child's stack; the child sets every signal to its default
//! disposition and unblocks all signals before it execs. That is more than
//! `std::process::Command` does (it resets only `SIGPIPE`): a program started here must
//! not inherit what the caller ignores, nor what the caller's own parent ignored.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use crate::process::PreExec;

/// A program, its arguments, environment and working directory, checked and converted
/// once (no NUL bytes), ready to be started by [`Program::spawn`].
#[derive(Debug)]
pub struct Program {
    /// The paths tried in order: the program itself when it contains a slash, else one
    /// per directory of the environment's `PATH` (an empty entry is the working
    /// directory), as `execvp` does.
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
}

/// The step of [`Program::spawn`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Creating the child (`clone`).
    Clone,
    /// Signals, stdio and the [`PreExec`] steps (session, terminal, ids).
    Setup,
    /// Entering the working directory (as the target user, after the ids changed).
    Workdir,
    /// Executing the program: every candidate path failed.
    Exec,
}

impl Step {
    fn from_u8(v: u8) -> Step {
        match v {
            1 => Step::Setup,
            2 => Step::Workdir,
            3 => Step::Exec,
            _ => Step::Clone,
        }
    }
}

/// A failed [`Program::spawn`]: which step failed, with what OS error. Converts into
/// that `io::Error` where the step does not matter.
#[derive(Debug)]
pub struct SpawnError {
    pub step: Step,
    pub source: io::Error,
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.step {
            Step::Clone => "cannot create the process",
            Step::Setup => "cannot set up the process",
            Step::Workdir => "cannot enter the working directory",
            Step::Exec => "cannot execute the program",
        };
        f.write_str(what)
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<SpawnError> for io::Error {
    fn from(e: SpawnError) -> io::Error {
        e.source
    }
}

/// `PATH` when the environment has none (musl's and glibc's `execvp` default).
const FALLBACK_PATH: &str = "/usr/local/bin:/bin:/usr/bin";

fn cstring(what: &str, s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte")))
}

impl Program {
    /// `argv[0]` names the program; `env` is the whole environment (nothing is inherited);
    /// `cwd` is entered before the exec, so a relative program path is relative to it.
    pub fn new<'a>(
        argv: &[String],
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
        cwd: &str,
    ) -> io::Result<Program> {
        let program = argv
            .first()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "argv must name a program"))?;
        let argv = argv.iter().map(|a| cstring("an argument", a)).collect::<io::Result<Vec<_>>>()?;
        let mut path = None;
        let mut envp = Vec::new();
        for (k, v) in env {
            if k.is_empty() || k.contains('=') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid environment variable name {k:?}"),
                ));
            }
            if k == "PATH" {
                path = Some(v);
            }
            envp.push(cstring("the environment", &format!("{k}={v}"))?);
        }
        let candidates = if program.contains('/') {
            vec![cstring("the program", program)?]
        } else {
            path.unwrap_or(FALLBACK_PATH)
                .split(':')
                .map(|dir| {
                    let dir = if dir.is_empty() { "." } else { dir.trim_end_matches('/') };
                    cstring("the program", &format!("{dir}/{program}"))
                })
                .collect::<io::Result<Vec<_>>>()?
        };
        Ok(Program { candidates, argv, envp, cwd: cstring("the working directory", cwd)? })
    }

    /// Starts the program with `stdio` as its descriptors 0, 1 and 2 and `setup` done
    /// first; returns its pid once it has exec'd. When the setup or every exec fails, the
    /// child has exited and been reaped (`waitpid`) before this returns the child's
    /// error: a caller that reaps children on another thread must keep that thread from
    /// reaping between the clone and this return (the agent's reaper gate does).
    pub fn spawn(&self, stdio: [BorrowedFd<'_>; 3], setup: &PreExec) -> Result<u32, SpawnError> {
        let argv = null_terminated(&self.argv);
        let envp = null_terminated(&self.envp);
        let candidates: Vec<*const libc::c_char> = self.candidates.iter().map(|c| c.as_ptr()).collect();
        let adj = format_adj(setup.oom_score_adj);
        let mut ctx = Child {
            candidates: &candidates,
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            cwd: &self.cwd,
            stdio: stdio.map(|fd| fd.as_raw_fd()),
            setup,
            adj,
            error: AtomicI32::new(0),
            step: AtomicU8::new(Step::Clone as u8),
            old_mask: unsafe_zeroed_sigset(),
        };
        // Only the child writes it, through its stack pointer: no need to zero it first.
        let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
        // The stack grows down from its (16-byte aligned) top.
        let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
        // SAFETY: sigfillset/pthread_sigmask fill and read sigset_t values we own.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut ctx.old_mask);
        }
        // SAFETY: `child_main` gets a pointer to `ctx`, which outlives the child's use of
        // it: with CLONE_VFORK this thread is suspended until the child has exec'd or
        // exited. The child runs on `stack` (alive for the same reason) and does only
        // raw system calls on data prepared above (see `child_main`). All signals are
        // blocked, so no handler runs on the child's stack before it resets them.
        let pid = unsafe {
            libc::clone(
                child_main,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &ctx as *const Child as *mut libc::c_void,
            )
        };
        let clone_error = io::Error::last_os_error();
        // SAFETY: restores this thread's own mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &ctx.old_mask, std::ptr::null_mut()) };
        drop(stack);
        if pid < 0 {
            return Err(SpawnError { step: Step::Clone, source: clone_error });
        }
        let error = ctx.error.load(Ordering::Acquire);
        if error != 0 {
            let mut status = 0;
            // SAFETY: reaps our own child, which has exited; `status` lives for the call.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            let step = Step::from_u8(ctx.step.load(Ordering::Acquire));
            return Err(SpawnError { step, source: io::Error::from_raw_os_error(error) });
        }
        Ok(pid as u32)
    }
}

/// The child's stack: what `child_main` and the system calls it makes need, with room.
const CHILD_STACK: usize = 64 << 10;

fn null_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

pub(crate) fn unsafe_zeroed_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain old data; all-zero is the empty set.
    unsafe { std::mem::zeroed() }
}

/// Everything the child reads, prepared by the parent.
struct Child<'a> {
    candidates: &'a [*const libc::c_char],
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: &'a CStr,
    stdio: [RawFd; 3],
    setup: &'a PreExec,
    adj: Adj,
    /// The child's errno when it gives up (0: it exec'd).
    error: AtomicI32,
    /// The [`Step`] the child gave up at.
    step: AtomicU8,
    /// The parent's signal mask before it blocked everything (restored after the clone).
    old_mask: libc::sigset_t,
}

/// A raw system call; returns the result or `-errno`, never touching `errno` (which
/// lives in the parent's thread-local storage, shared with the child).
macro_rules! raw {
    ($nr:expr $(, $arg:expr)*) => {
        raw_syscall($nr, &[$($arg as usize),*])
    };
}

/// Up to six arguments, `-errno` on failure.
///
/// # Safety
/// As the system call `nr` with these arguments.
unsafe fn raw_syscall(nr: libc::c_long, args: &[usize]) -> isize {
    let a = |i: usize| args.get(i).copied().unwrap_or(0);
    let ret: isize;
    // SAFETY: the x86_64 Linux system call convention; the caller vouches for the call.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a(0), in("rsi") a(1), in("rdx") a(2),
            in("r10") a(3), in("r8") a(4), in("r9") a(5),
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a(0) => ret,
            in("x1") a(1), in("x2") a(2), in("x3") a(3), in("x4") a(4), in("x5") a(5),
            options(nostack),
        );
    }
    ret
}

/// The kernel's `struct sigaction` for `rt_sigaction` (x86_64 and aarch64 layout).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Sets every signal's disposition but `SIGKILL`'s and `SIGSTOP`'s to the default, with
/// raw system calls (so also the real-time signals libc keeps for itself, and nothing
/// else is touched). A program started afterwards gets neither the caller's handlers
/// (which an exec would reset) nor what the caller ignores (which an exec keeps): a
/// command must not inherit, say, an ignored `SIGINT` from whoever started the daemon.
/// The mask is left alone.
///
/// # Safety
/// Async-signal-safe, no allocation: callable in a child between fork (or clone) and
/// exec. A handler the caller relies on is gone afterwards.
pub(crate) unsafe fn default_dispositions() {
    let dfl = KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
    for sig in 1..=64usize {
        if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
            continue;
        }
        // SAFETY: sets a disposition from a struct alive for the call; the kernel
        // refuses nothing but KILL and STOP, which are skipped.
        unsafe { raw!(libc::SYS_rt_sigaction, sig, &dfl as *const KernelSigaction, 0, 8) };
    }
}

/// `oom_score_adj` as the bytes to write, formatted before the fork or clone (nothing is
/// allocated after it).
pub(crate) type Adj = Option<([u8; 16], usize)>;

pub(crate) fn format_adj(value: Option<i32>) -> Adj {
    value.map(|v| {
        let s = v.to_string();
        let mut buf = [0u8; 16];
        buf[..s.len()].copy_from_slice(s.as_bytes());
        (buf, s.len())
    })
}

/// The steps of `setup`, in order: a new session (or process group), the controlling
/// terminal, `oom_score_adj` (a failed write is ignored), groups then gid then uid,
/// close-on-exec above stderr. Raw system calls only; `Err(errno)` of the step that
/// failed. Shared by [`Program::spawn`]'s child and [`crate::process::set_pre_exec`].
///
/// # Safety
/// Only in a child between fork (or clone) and exec; `adj` comes from [`format_adj`].
pub(crate) unsafe fn run_pre_exec(setup: &PreExec, adj: &Adj) -> Result<(), i32> {
    let check = |r: isize| if r < 0 { Err((-r) as i32) } else { Ok(r) };
    // SAFETY: raw system calls on memory prepared before the fork or clone, alive and
    // unchanged until the exec.
    unsafe {
        if setup.setsid {
            check(raw!(libc::SYS_setsid))?;
        } else if setup.setpgid {
            check(raw!(libc::SYS_setpgid, 0, 0))?;
        }
        if setup.controlling_tty {
            check(raw!(libc::SYS_ioctl, 0, libc::TIOCSCTTY, 0))?;
        }
        if let Some((buf, len)) = adj {
            let fd = raw!(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC
            );
            if fd >= 0 {
                raw!(libc::SYS_write, fd, buf.as_ptr(), *len);
                raw!(libc::SYS_close, fd);
            }
        }
        if let Some(ids) = &setup.ids {
            check(raw!(libc::SYS_setgroups, ids.groups.len(), ids.groups.as_ptr()))?;
            check(raw!(libc::SYS_setresgid, ids.gid, ids.gid, ids.gid))?;
            check(raw!(libc::SYS_setresuid, ids.uid, ids.uid, ids.uid))?;
        }
        if setup.close_fds {
            raw!(libc::SYS_close_range, 3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
        }
    }
    Ok(())
}

/// The child: resets signals, sets up stdio and the rest of [`PreExec`], enters the working
/// directory and execs the first candidate that works. On failure it stores the step in
/// `step` and errno in `error` and exits with status 127.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Child`, alive while the parent is suspended.
    let c = unsafe { &*(arg as *const Child) };
    // SAFETY: only raw system calls on memory prepared by the parent (see above).
    let (step, errno) = unsafe { child_steps(c) };
    c.step.store(step as u8, Ordering::Release);
    c.error.store(errno.max(1), Ordering::Release);
    // SAFETY: exit_group ends the child without running anything of the parent's.
    unsafe { raw!(libc::SYS_exit_group, 127) };
    127
}

/// Returns the step that failed and its errno (exec returns only on failure).
///
/// # Safety
/// Only in the child of [`Program::spawn`], with the parent suspended.
unsafe fn child_steps(c: &Child) -> (Step, i32) {
    macro_rules! check {
        ($step:expr, $e:expr) => {{
            let r = $e;
            if r < 0 {
                return ($step, (-r) as i32);
            }
            r
        }};
    }
    // SAFETY: raw system calls on buffers prepared by the parent that stay alive and
    // unchanged while it is suspended.
    unsafe {
        // Signals: every one back to its default, then nothing blocked.
        default_dispositions();
        let empty: u64 = 0;
        check!(Step::Setup, raw!(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &empty as *const u64, 0, 8));

        // Stdio: first move any source that sits on 0..2 out of the way, so that placing
        // one cannot clobber another.
        let mut src = c.stdio;
        for fd in src.iter_mut() {
            if *fd < 3 {
                *fd = check!(Step::Setup, raw!(libc::SYS_fcntl, *fd, libc::F_DUPFD_CLOEXEC, 3)) as RawFd;
            }
        }
        for (target, fd) in src.iter().enumerate() {
            check!(Step::Setup, raw!(libc::SYS_dup3, *fd, target, 0));
        }

        if let Err(e) = run_pre_exec(c.setup, &c.adj) {
            return (Step::Setup, e);
        }
        check!(Step::Workdir, raw!(libc::SYS_chdir, c.cwd.as_ptr()));

        // execvp's search: EACCES is remembered and reported if nothing else works; a
        // missing file or directory moves on; any other error stops.
        let mut denied = false;
        let mut last = libc::ENOENT;
        for &path in c.candidates {
            let r = raw!(libc::SYS_execve, path, c.argv, c.envp);
            let e = (-r) as i32;
            match e {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR => {}
                _ => return (Step::Exec, e),
            }
            last = e;
        }
        (Step::Exec, if denied { libc::EACCES } else { last })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsFd, OwnedFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
    }

    /// Runs `argv` with `env` in `cwd`, returns (stdout, exit status).
    fn run(argv: &[&str], env: &[(&str, &str)], cwd: &str, setup: &PreExec) -> io::Result<(String, i32)> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let p = Program::new(&argv, env.iter().copied(), cwd)?;
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let (r, w) = pipe();
        let pid = p.spawn([devnull.as_fd(), w.as_fd(), w.as_fd()], setup)?;
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        Ok((out, status))
    }

    #[test]
    fn runs_a_program_with_its_arguments_environment_and_directory() {
        let (out, status) = run(
            &["sh", "-c", "echo \"$1 $FOO $(pwd)\"", "sh", "arg"],
            &[("FOO", "bar"), ("PATH", "/usr/bin:/bin")],
            "/tmp",
            &PreExec::default(),
        )
        .unwrap();
        assert_eq!(out, "arg bar /tmp\n");
        assert_eq!(status, 0);
    }

    #[test]
    fn searches_path_in_order_and_reports_missing_programs() {
        let (out, _) = run(&["true"], &[("PATH", "/nonexistent:/bin")], "/", &PreExec::default()).unwrap();
        assert_eq!(out, "");
        let err = run(&["no-such-program-abx"], &[("PATH", "/bin:/usr/bin")], "/", &PreExec::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = run(&["/nonexistent/x"], &[], "/", &PreExec::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = run(&["/bin/true"], &[], "/nonexistent-dir", &PreExec::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        // A directory is not executable: EACCES, reported as such.
        let err = run(&["tmp"], &[("PATH", "/")], "/", &PreExec::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }

    /// Guards that a working directory the user cannot enter is told apart from a
    /// program it cannot execute (both are EACCES).
    #[test]
    fn names_the_step_that_failed() {
        let dir = tempfile::tempdir().unwrap(); // owned by the (root) test user
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let cwd = dir.path().to_str().unwrap();
        let nobody =
            PreExec { ids: Some(crate::process::Ids { uid: 65534, gid: 65534, groups: vec![] }), ..Default::default() };
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let spawn = |argv: &[&str], cwd: &str, setup: &PreExec| {
            let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
            let p = Program::new(&argv, [("PATH", "/usr/bin:/bin")], cwd).unwrap();
            p.spawn([devnull.as_fd(), devnull.as_fd(), devnull.as_fd()], setup).unwrap_err()
        };
        let err = spawn(&["true"], cwd, &nobody);
        assert_eq!((err.step, err.source.kind()), (Step::Workdir, io::ErrorKind::PermissionDenied));
        let err = spawn(&["no-such-program-abx"], "/", &nobody);
        assert_eq!((err.step, err.source.kind()), (Step::Exec, io::ErrorKind::NotFound));
    }

    #[test]
    fn bad_input_is_refused_before_anything_runs() {
        let env: [(&str, &str); 0] = [];
        assert!(Program::new(&[], env, "/").is_err());
        assert!(Program::new(&["a\0b".into()], env, "/").is_err());
        assert!(Program::new(&["true".into()], [("A=B", "c")], "/").is_err());
        assert!(Program::new(&["true".into()], [("A", "c\0")], "/").is_err());
        assert!(Program::new(&["true".into()], env, "/\0").is_err());
    }

    #[test]
    fn the_child_starts_with_default_signals_a_new_session_and_its_ids() {
        // The test's process ignores two signals while the child starts, as a shell's
        // background job does.
        // SAFETY: sets two dispositions of this process, restored below; nothing in the
        // test harness handles these signals.
        let saved = unsafe { [libc::signal(libc::SIGINT, libc::SIG_IGN), libc::signal(libc::SIGQUIT, libc::SIG_IGN)] };
        let setup = PreExec {
            setsid: true,
            oom_score_adj: Some(500),
            ids: Some(crate::process::Ids { uid: 65534, gid: 65534, groups: vec![65534, 5] }),
            close_fds: true,
            ..Default::default()
        };
        let script = "grep -E '^(SigBlk|SigIgn|Uid|Gid|Groups)' /proc/self/status; \
                      cat /proc/self/oom_score_adj; ps -o sid= -o pid= -p $$ 2>/dev/null || \
                      awk '{print $6, $1}' /proc/self/stat";
        let res = run(&["sh", "-c", script], &[("PATH", "/usr/bin:/bin")], "/", &setup);
        // SAFETY: puts back the dispositions saved above.
        unsafe {
            libc::signal(libc::SIGINT, saved[0]);
            libc::signal(libc::SIGQUIT, saved[1]);
        }
        let (out, status) = res.unwrap();
        assert_eq!(status, 0, "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        // Nothing ignored: not SIGPIPE, which the Rust runtime ignores, nor SIGINT and
        // SIGQUIT, ignored here on purpose (as a shell does for a background job).
        assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");
        assert!(out.contains("Uid:\t65534\t65534\t65534\t65534"), "{out}");
        assert!(out.contains("Gid:\t65534\t65534\t65534\t65534"), "{out}");
        assert!(out.contains("Groups:\t5 65534"), "{out}");
        assert!(out.lines().any(|l| l == "500"), "{out}");
        // A session leader: its session id is its pid.
        let last = out.lines().last().unwrap();
        let v: Vec<&str> = last.split_whitespace().collect();
        assert_eq!(v[0], v[1], "{out}");
    }
}
