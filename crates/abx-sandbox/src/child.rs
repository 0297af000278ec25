//! The new sandbox's first process: runs the setup plan inside its namespaces and execs
//! the guest agent. It runs in a child of the single-threaded spawner, so ordinary Rust
//! (allocation included) is safe here.
//!
//! Order (see docs/sandbox-setup.md): join the v1 cgroups (the cgroup2 one was joined at
//! clone) → wait for the spawner's go (uid/gid maps written, idmapped trees received) → become root of the user namespace →
//! unshare mount, network, uts, ipc, cgroup namespaces → make every mount private → run
//! the plan (overlay root, /proc, /sys, /dev, masks, pivot_root, hostname, loopback) →
//! rlimits → stdio to /dev/null, listening socket to fd 3, everything else close-on-exec
//! → new session → drop capabilities → no_new_privs + seccomp → exec the agent.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use abx_sys::process::ns;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use crate::plan::{self, Step};
use crate::spec::SpawnSpec;

/// Descriptors the child starts with.
#[derive(Debug)]
pub struct ChildIo {
    /// The child's end of the socketpair the spawner sends the go message on.
    pub control: OwnedFd,
    /// Write end of the status pipe: closed by a successful exec, an error text otherwise.
    pub status: OwnedFd,
    /// The agent's listening socket (becomes fd 3).
    pub listener: OwnedFd,
    /// The sealed memfd holding the agent binary.
    pub agent: RawFd,
    /// The sandbox directory (`O_PATH`), the working directory of the whole setup.
    pub dir: OwnedFd,
}

/// Runs the child side; never returns.
pub fn run(spec: &SpawnSpec, io: ChildIo) -> ! {
    let io = match lift(io) {
        Ok(io) => io,
        Err(_) => std::process::exit(1),
    };
    let Err(message) = setup(spec, &io);
    let _ = rustix::io::write(&io.status, message.as_bytes());
    std::process::exit(1)
}

/// Moves every descriptor the child needs to numbers of 100 and above, so placing the
/// listening socket at fd 3 later cannot clobber one of them.
fn lift(io: ChildIo) -> std::io::Result<ChildIo> {
    let up = |fd: &OwnedFd| rustix::io::fcntl_dupfd_cloexec(fd, 100);
    let agent = rustix::io::fcntl_dupfd_cloexec(abx_sys::fd::borrow_raw(io.agent), 100)?;
    let lifted = ChildIo {
        control: up(&io.control)?,
        status: up(&io.status)?,
        listener: up(&io.listener)?,
        agent: agent.as_raw_fd(),
        dir: up(&io.dir)?,
    };
    std::mem::forget(agent);
    Ok(lifted)
}

type StepResult = Result<(), String>;

fn ctx<T, E: std::fmt::Display>(what: impl std::fmt::Display, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn setup(spec: &SpawnSpec, io: &ChildIo) -> Result<Infallible, String> {
    ctx(
        "set parent death signal",
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)),
    )?;
    join_cgroups(&spec.cgroup_tasks)?;
    let trees = receive_go(io, spec.layers.len() + 1)?;
    become_root()?;
    // Before unsharing: the new mount namespace then carries the working directory over.
    ctx("enter the sandbox directory", rustix::process::fchdir(&io.dir))?;
    ctx("unshare namespaces", abx_sys::process::unshare(ns::MOUNT | ns::NET | ns::UTS | ns::IPC | ns::CGROUP))?;
    ctx(
        "make mounts private",
        rustix::mount::mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC),
    )?;
    for step in plan::build(spec) {
        run_step(&step, &trees).map_err(|e| format!("{step}: {e}"))?;
    }
    drop(trees);
    set_limits(spec.nofile)?;
    arrange_fds(io)?;
    ctx("setsid", rustix::process::setsid())?;
    ctx("drop capabilities", abx_sys::process::restrict_capabilities(&spec.capabilities))?;
    ctx("clear parent death signal", rustix::process::set_parent_process_death_signal(None))?;
    for (i, prog) in spec.seccomp.iter().enumerate() {
        ctx(format_args!("load seccomp program {i}"), abx_sys::process::load_seccomp(prog))?;
    }
    let argv = [c"agentbox-agent".to_owned()];
    let env = [CString::new(format!("AGENTBOX_SANDBOX_ID={}", spec.id)).map_err(|e| e.to_string())?];
    Err(format!("exec guest agent: {}", abx_sys::process::exec_fd(io.agent, &argv, &env)))
}

/// Joins the v1 cgroups by writing `0` (this thread) to their `tasks` files. Still holding
/// the host's root uid (the maps are not written yet), the child may; moving the caller's
/// own single thread avoids the kernel's global threadgroup lock.
fn join_cgroups(tasks: &[std::path::PathBuf]) -> StepResult {
    for t in tasks {
        ctx(format_args!("join cgroup {}", t.display()), std::fs::write(t, "0"))?;
    }
    Ok(())
}

/// Waits for the spawner's go message, which carries the idmapped trees.
fn receive_go(io: &ChildIo, expected: usize) -> Result<Vec<OwnedFd>, String> {
    let mut buf = [0u8; 16];
    let (n, fds) = ctx("receive go message", abx_sys::fd::recv_with_fds(io.control.as_fd(), &mut buf, expected))?;
    if n == 0 {
        return Err("spawner went away before setup".into());
    }
    if fds.len() != expected {
        return Err(format!("expected {expected} mount trees, received {}", fds.len()));
    }
    Ok(fds)
}

/// The uid/gid maps are written: switch to root of the new user namespace.
fn become_root() -> StepResult {
    use rustix::thread::{Gid, Uid, set_thread_groups, set_thread_res_gid, set_thread_res_uid};
    ctx("setresgid 0", set_thread_res_gid(Gid::ROOT, Gid::ROOT, Gid::ROOT))?;
    ctx("setresuid 0", set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT))?;
    ctx("setgroups [0]", set_thread_groups(&[Gid::ROOT]))
}

fn mount_flags(bits: u64) -> MountFlags {
    MountFlags::from_bits_retain(bits as u32)
}

fn run_step(step: &Step, trees: &[OwnedFd]) -> std::io::Result<()> {
    match step {
        Step::AttachTree { index, target } => {
            let tree = trees.get(*index).ok_or_else(|| std::io::Error::other("missing mount tree"))?;
            abx_sys::mount::attach(tree, target)
        }
        Step::Overlay { lower, upper, work, target, volatile } => {
            let mut data = format!("lowerdir={},upperdir={upper},workdir={work},userxattr", lower.join(":"));
            if *volatile {
                data.push_str(",volatile");
            }
            mount("overlay", target, "overlay", MountFlags::empty(), &data)
        }
        Step::Mkdir { path } => std::fs::create_dir_all(path),
        Step::Touch { path } => touch(path),
        Step::Mount { fstype, target, flags, data } => mount(fstype, target, fstype, mount_flags(*flags), data),
        Step::Bind { source, target } => Ok(rustix::mount::mount_bind(source, target)?),
        Step::MaskFile { path, null } => {
            if path.exists() {
                rustix::mount::mount_bind(null, path)?;
            }
            Ok(())
        }
        Step::MaskDir { path } => {
            if path.is_dir() {
                let f = plan::flags::RDONLY | plan::flags::NOSUID | plan::flags::NODEV | plan::flags::NOEXEC;
                mount("tmpfs", path, "tmpfs", mount_flags(f), "size=4k,mode=555")?;
            }
            Ok(())
        }
        Step::ReadOnly { path } => {
            if path.exists() {
                rustix::mount::mount_bind(path, path)?;
                remount_ro(path, plan::flags::NOSUID | plan::flags::NODEV | plan::flags::NOEXEC)?;
            }
            Ok(())
        }
        Step::Symlink { target, link } => match std::os::unix::fs::symlink(target, link) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        },
        Step::PivotRoot { root } => pivot(root),
        Step::SetHostname { name } => Ok(rustix::system::sethostname(name.as_bytes())?),
        Step::LoopbackUp => abx_sys::net::set_link_up("lo"),
    }
}

fn mount(source: &str, target: &Path, fstype: &str, flags: MountFlags, data: &str) -> std::io::Result<()> {
    let data = CString::new(data).map_err(std::io::Error::other)?;
    let data = if data.is_empty() { None } else { Some(data.as_c_str()) };
    Ok(rustix::mount::mount(source, target, fstype, flags, data)?)
}

fn touch(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        r => r.map(drop),
    }
}

fn remount_ro(target: &Path, keep: u64) -> std::io::Result<()> {
    let f = MountFlags::BIND | MountFlags::RDONLY | mount_flags(keep);
    Ok(rustix::mount::mount_remount(target, f, "")?)
}

fn pivot(root: &Path) -> std::io::Result<()> {
    rustix::process::chdir(root)?;
    rustix::process::pivot_root(".", ".")?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)?;
    rustix::process::chdir("/")?;
    Ok(())
}

fn set_limits(nofile: u64) -> StepResult {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
    let n = nofile.min(hard);
    ctx(
        format_args!("set RLIMIT_NOFILE to {n}"),
        setrlimit(Resource::Nofile, Rlimit { current: Some(n), maximum: Some(n) }),
    )?;
    ctx("set RLIMIT_CORE to 0", setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) }))
}

/// stdio → /dev/null, the listening socket → fd 3, everything else close-on-exec (the
/// status pipe is closed by the exec itself, which tells the daemon the exec happened).
fn arrange_fds(io: &ChildIo) -> StepResult {
    let null = ctx(
        "open /dev/null",
        rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ),
    )?;
    for target in 0..3 {
        ctx("redirect stdio", abx_sys::fd::dup_to(null.as_raw_fd(), target))?;
    }
    ctx("place listening socket", abx_sys::fd::dup_to(io.listener.as_raw_fd(), 3))?;
    ctx("mark descriptors close-on-exec", abx_sys::fd::cloexec_from(4))
}
