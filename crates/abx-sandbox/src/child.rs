//! The new sandbox's first process: creates its namespaces, runs the setup plan inside
//! them and execs the guest agent. It runs in a child of the single-threaded spawner, so
//! ordinary Rust (allocation included) is safe here.
//!
//! Two phases, separated by the spawner's go message (see docs/sandbox-setup.md):
//!
//! 1. **Shell** (slot-level, can happen ahead of time; born in new user, pid and time
//!    namespaces, the slot's cgroup2 group and the slot's network namespace): keep only
//!    its own descriptors → join the v1 cgroups → wait until the spawner has written the
//!    uid/gid maps → become root of the user namespace → unshare mount, uts, ipc, cgroup
//!    namespaces → make every mount private → report "ready".
//! 2. **Sandbox** (after go, which carries the sandbox's spec, its status pipe, its
//!    listening socket and the mount trees): run the plan (overlay root, /proc, /sys,
//!    /dev, masks, pivot_root, hostname, resolv.conf, volumes) → rlimits → stdio to
//!    /dev/null, listening socket to fd 3, everything else close-on-exec → new session →
//!    default signal dispositions, nothing blocked → drop capabilities → no_new_privs +
//!    seccomp → exec the agent.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use abx_sys::process::ns;
use rustix::mount::{MountFlags, MountPropagationFlags, MoveMountFlags, UnmountFlags};

use crate::plan::{self, Step};
use crate::spawner::{MAX_GO, MAX_GO_FDS};
use crate::spec::{SlotSpec, SpawnSpec};

/// The spawner's first message on the control socket: the id maps are written.
pub const IDS_WRITTEN: &[u8] = b"ids";
/// The shell's answer once its namespaces exist (anything else is an error text).
pub const READY: &[u8] = b"ready";

/// Descriptors the child starts with.
#[derive(Debug)]
pub struct ShellIo {
    /// The child's end of the socketpair to the spawner.
    pub control: OwnedFd,
    /// The sealed memfd holding the agent binary.
    pub agent: RawFd,
    /// The slot directory (`O_PATH`), the working directory of the whole setup.
    pub dir: OwnedFd,
}

/// What the go message brings.
struct Go {
    spec: SpawnSpec,
    /// Write end of the status pipe: closed by a successful exec, an error text otherwise.
    status: OwnedFd,
    /// The agent's listening socket (becomes fd 3).
    listener: OwnedFd,
    /// Mount trees in the order of [`plan::build`]: the layers, the data tree, the sysfs
    /// copy, the volumes.
    trees: Vec<OwnedFd>,
}

/// Runs the child side; never returns.
pub fn run(slot: &SlotSpec, io: ShellIo) -> ! {
    let keep = [io.control.as_raw_fd(), io.agent, io.dir.as_raw_fd()];
    if abx_sys::fd::close_except(&keep).is_err() {
        std::process::exit(1);
    }
    if let Err(message) = shell(slot, &io) {
        let _ = abx_sys::fd::send_with_fds(io.control.as_fd(), message.as_bytes(), &[]);
        std::process::exit(1);
    }
    if abx_sys::fd::send_with_fds(io.control.as_fd(), READY, &[]).is_err() {
        std::process::exit(1);
    }
    let go = match receive_go(&io) {
        Ok(go) => go,
        Err(message) => {
            let _ = abx_sys::fd::send_with_fds(io.control.as_fd(), message.as_bytes(), &[]);
            std::process::exit(1)
        }
    };
    let Err(message) = setup(&go, &io);
    let _ = rustix::io::write(&go.status, message.as_bytes());
    std::process::exit(1)
}

type StepResult = Result<(), String>;

fn ctx<T, E: std::fmt::Display>(what: impl std::fmt::Display, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Phase 1: the namespaces, everything that does not depend on the sandbox.
fn shell(slot: &SlotSpec, io: &ShellIo) -> StepResult {
    ctx(
        "set parent death signal",
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)),
    )?;
    join_cgroups(&slot.cgroup_tasks)?;
    let mut buf = [0u8; 16];
    let (n, _) = ctx("wait for the id maps", abx_sys::fd::recv_with_fds(io.control.as_fd(), &mut buf, 0))?;
    if &buf[..n] != IDS_WRITTEN {
        return Err("spawner went away before the id maps were written".into());
    }
    become_root()?;
    // Before unsharing: the new mount namespace then carries the working directory over.
    ctx("enter the sandbox directory", rustix::process::fchdir(&io.dir))?;
    // The network namespace is the slot's, entered at clone (see the spawner).
    ctx("unshare namespaces", abx_sys::process::unshare(ns::MOUNT | ns::UTS | ns::IPC | ns::CGROUP))?;
    ctx(
        "make mounts private",
        rustix::mount::mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC),
    )
}

/// Waits for the go message: the sandbox's spec and its descriptors.
fn receive_go(io: &ShellIo) -> Result<Go, String> {
    let mut buf = vec![0u8; MAX_GO];
    let (n, fds) = ctx("receive go message", abx_sys::fd::recv_with_fds(io.control.as_fd(), &mut buf, MAX_GO_FDS))?;
    if n == 0 {
        return Err("spawner went away before setup".into());
    }
    let spec: SpawnSpec = ctx("read the sandbox spec", serde_json::from_slice(&buf[..n]))?;
    let expected = 2 + plan::trees(&spec);
    if fds.len() != expected {
        return Err(format!("expected {expected} descriptors with go, received {}", fds.len()));
    }
    let mut fds = fds.into_iter();
    // Away from the low numbers: fd 3 becomes the listening socket later.
    let lift = |fd: Option<OwnedFd>| -> Result<OwnedFd, String> {
        let fd = fd.ok_or("missing descriptor")?;
        ctx("move descriptor", rustix::io::fcntl_dupfd_cloexec(&fd, 100))
    };
    let status = lift(fds.next())?;
    let listener = lift(fds.next())?;
    Ok(Go { spec, status, listener, trees: fds.collect() })
}

/// Phase 2: the sandbox's root filesystem and confinement, then the agent.
fn setup(go: &Go, io: &ShellIo) -> Result<Infallible, String> {
    let spec = &go.spec;
    let steps = plan::build(spec);
    // The slot's resolv.conf, taken before pivot_root hides the slot directory. Missing
    // (a daemon that does not keep one), the contents are written instead.
    let resolv = steps.iter().find_map(|s| match s {
        Step::ResolvConf { source, .. } => abx_sys::mount::file_tree(source).ok(),
        _ => None,
    });
    for step in &steps {
        run_step(step, &go.trees, resolv.as_ref()).map_err(|e| format!("{step}: {e}"))?;
    }
    set_limits(spec.nofile)?;
    arrange_fds(go)?;
    ctx("setsid", rustix::process::setsid())?;
    // The agent, and through it every command, starts from default signal dispositions,
    // whatever the daemon inherited (a daemon started as a shell's background job
    // ignores SIGINT and SIGQUIT, which every command would otherwise inherit).
    ctx("reset signals", abx_sys::process::reset_signals())?;
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

fn run_step(step: &Step, trees: &[OwnedFd], resolv: Option<&OwnedFd>) -> std::io::Result<()> {
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
        Step::MaskDir { path, empty } => {
            if path.is_dir() {
                rustix::mount::mount_bind(empty, path)?;
            }
            Ok(())
        }
        Step::Chmod { path, mode } => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
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
        // EINVAL: beyond the host's pid_max; the numbering then starts low again.
        Step::LastPid { path, pid } => match std::fs::write(path, pid.to_string()) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => Ok(()),
            r => r,
        },
        Step::ResolvConf { contents, .. } => {
            let target = Path::new("/etc/resolv.conf");
            match resolv {
                // Not followed if it is a symlink: checked, and the template's files do
                // not change while the sandbox is being set up.
                Some(tree) if std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_file()) => {
                    abx_sys::mount::attach(tree, target)
                }
                _ => {
                    // A template without /etc (an image `FROM scratch` with one binary)
                    // still gets its resolver: the directory is made in the upper layer.
                    match std::fs::DirBuilder::new().mode(0o755).create("/etc") {
                        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                        _ => {}
                    }
                    write_file(target, contents)
                }
            }
        }
        Step::AttachVolume { index, target } => {
            crate::spec::validate_volume_target(target).map_err(std::io::Error::other)?;
            let tree = trees.get(*index).ok_or_else(|| std::io::Error::other("missing mount tree"))?;
            let dir = volume_target(target)?;
            // Onto the directory just opened: nothing is resolved again.
            Ok(rustix::mount::move_mount(
                tree,
                "",
                &dir,
                "",
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
            )?)
        }
    }
}

/// Opens the directory `target` (absolute, validated) from the current root (the
/// sandbox's own, after pivot_root) one component at a time, never following a symlink
/// (`RESOLVE_NO_SYMLINKS`), creating missing directories (mode 0755, owned by the
/// sandbox's root). An existing component that is a symlink or not a directory is an error.
fn volume_target(target: &str) -> std::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    use rustix::io::Errno;
    let mut dir = rustix::fs::open("/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let mut walked = String::with_capacity(target.len());
    for name in target.split('/').skip(1) {
        walked.push('/');
        walked.push_str(name);
        let (opened, doing) = match open_dir_at(&dir, name, OFlags::PATH) {
            Err(Errno::NOENT) => (create_dir_at(&dir, name), "create"),
            r => (r, "open"),
        };
        dir = opened.map_err(|e| {
            std::io::Error::other(match e {
                Errno::LOOP => format!("{walked} is a symlink (volume targets never follow one)"),
                Errno::NOTDIR => format!("{walked} exists and is not a directory"),
                e => format!("cannot {doing} {walked}: {e}"),
            })
        })?;
    }
    Ok(dir)
}

/// Opens the directory `name` in `dir`, refusing symlinks (and any non-directory).
fn open_dir_at(dir: &OwnedFd, name: &str, flags: rustix::fs::OFlags) -> rustix::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    rustix::fs::openat2(
        dir,
        name,
        flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS,
    )
}

/// Creates the directory `name` in `dir` (0755 whatever the umask, owned by the sandbox's
/// root whatever the parent's set-group-id bit) and opens it.
fn create_dir_at(dir: &OwnedFd, name: &str) -> rustix::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    use rustix::thread::{Gid, Uid};
    let mode = Mode::from_raw_mode(0o755);
    match rustix::fs::mkdirat(dir, name, mode) {
        // Made meanwhile: checked like any existing component.
        Err(rustix::io::Errno::EXIST) => return open_dir_at(dir, name, OFlags::PATH),
        r => r?,
    }
    let new = open_dir_at(dir, name, OFlags::RDONLY)?;
    rustix::fs::fchown(&new, Some(Uid::ROOT), Some(Gid::ROOT))?;
    rustix::fs::fchmod(&new, mode)?;
    Ok(new)
}

fn mount(source: &str, target: &Path, fstype: &str, flags: MountFlags, data: &str) -> std::io::Result<()> {
    let data = CString::new(data).map_err(std::io::Error::other)?;
    let data = if data.is_empty() { None } else { Some(data.as_c_str()) };
    Ok(rustix::mount::mount(source, target, fstype, flags, data)?)
}

fn write_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(contents.as_bytes())
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
fn arrange_fds(io: &Go) -> StepResult {
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
    // It may sit at fd 3 itself.
    drop(null);
    ctx("place listening socket", abx_sys::fd::dup_to(io.listener.as_raw_fd(), 3))?;
    ctx("mark descriptors close-on-exec", abx_sys::fd::cloexec_from(4))
}
