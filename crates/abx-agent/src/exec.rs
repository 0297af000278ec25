//! Starting a process from an [`ExecSpec`]: user, environment, working directory, stdio,
//! the setup between clone and exec ([`abx_sys::spawn`]: the agent's memory is not
//! copied), and registration with the reaper and process table.
//!
//! * The user comes from the sandbox's passwd/group files ([`crate::users`]).
//! * The environment is `PATH` (a fixed default), `HOME`, `USER`, `LOGNAME`, `SHELL` (when
//!   the passwd entry names one), `HOSTNAME`, and `TERM=xterm-256color` on a terminal,
//!   with the spec's variables on top (so the spec may override any of them, `PATH`
//!   included; a program without a slash is looked up in the final `PATH`).
//! * The working directory defaults to the user's home when that is a directory, else
//!   `/`; a given one must be absolute and exist (checked before the process starts).
//! * Every process leads its own session (and so its process group) and gets
//!   `oom_score_adj` 500 so the OOM killer picks user processes before the agent.
//! * Without `tty`, stdout and stderr are pipes and stdin is a pipe when `spec.stdin`,
//!   else `/dev/null`. With `tty`, all three are the terminal and input is always
//!   accepted.
//! * `timeout_ms` 0 means no timeout.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use abx_proto::{ExecSpec, ProcessInfo};
use abx_sys::process::{Ids, PreExec};
use abx_sys::spawn::{Program, SpawnError, Step};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use tokio::net::unix::pipe;

use crate::error::Error;
use crate::paths;
use crate::process::{InputSink, OutputSource, Outputs, Proc, Subscription, pump};
use crate::pty::{self, Master};
use crate::reaper::{ExitWatch, Reaper};
use crate::server::Agent;
use crate::users::{Db, User};

/// `PATH` of every process unless the spec sets its own.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `oom_score_adj` of user processes.
const OOM_SCORE_ADJ: i32 = 500;

/// Starts the process, registers it and starts its pump. For a foreground process also
/// returns the owner's subscription to its output.
pub fn start(agent: &Agent, spec: &ExecSpec) -> Result<(Arc<Proc>, Option<Subscription>), Error> {
    let launched = launch(&agent.reaper, spec)?;
    let info = ProcessInfo {
        pid: launched.pid,
        argv: spec.argv.clone(),
        tag: spec.tag.clone(),
        cwd: Some(launched.cwd),
        user: Some(launched.user.name),
        tty: spec.tty.is_some(),
        background: spec.background,
        started_at_ms: now_ms(),
        exit: None,
    };
    let (proc, owner) = Proc::new(info, launched.stdin, launched.pty, launched.reaped);
    agent.procs.insert(proc.clone());
    tokio::spawn(pump(agent.procs.clone(), proc.clone(), launched.outputs));
    if let Some(ms) = spec.timeout_ms.filter(|&ms| ms > 0) {
        proc.arm_timeout(Duration::from_millis(ms));
    }
    Ok((proc, owner))
}

/// A running child and the agent's ends of its stdio.
struct Launched {
    pid: u32,
    reaped: ExitWatch,
    stdin: Option<InputSink>,
    outputs: Outputs,
    pty: Option<Arc<Master>>,
    cwd: String,
    user: User,
}

fn launch(reaper: &Reaper, spec: &ExecSpec) -> Result<Launched, Error> {
    let program = check_argv(&spec.argv)?;
    let user = Db::load().resolve(spec.user.as_deref())?;
    let cwd = working_dir(spec.cwd.as_deref(), &user)?;
    let env = environment(&user, spec)?;
    let start = Program::new(&spec.argv, env.iter().map(|(k, v)| (k.as_str(), v.as_str())), &cwd)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let setup = pre_exec(&user, spec.tty.is_some());
    let spawn_err = |e| spawn_error(program, e);
    let start_err = {
        let cwd = cwd.clone();
        move |e| start_error(program, &cwd, e)
    };
    let launched = |pid, reaped, stdin, outputs, pty| Launched { pid, reaped, stdin, outputs, pty, cwd, user };
    match spec.tty {
        Some(size) => {
            let pty = pty::open(size).map_err(|source| Error::Pty { source })?;
            let slave = pty.slave.as_fd();
            let (pid, reaped) = reaper.spawn(|| start.spawn([slave, slave, slave], &setup)).map_err(start_err)?;
            // Close the agent's copy of the slave now, or reading the master would never
            // see the end of output.
            drop(pty.slave);
            let m = Arc::new(pty.master);
            let outputs = Outputs { stdout: Some(OutputSource::Pty(m.clone())), stderr: None };
            Ok(launched(pid, reaped, Some(InputSink::Pty(m.clone())), outputs, Some(m)))
        }
        None => {
            let io_err = |source| Error::Spawn { command: program.to_owned(), source };
            let pipe = || rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| spawn_err(e.into()));
            let (stdin_r, stdin_w) = if spec.stdin {
                let (r, w) = pipe()?;
                (r, Some(w))
            } else {
                (OwnedFd::from(std::fs::File::open("/dev/null").map_err(io_err)?), None)
            };
            let (stdout_r, stdout_w) = pipe()?;
            let (stderr_r, stderr_w) = pipe()?;
            let stdio = [stdin_r.as_fd(), stdout_w.as_fd(), stderr_w.as_fd()];
            let (pid, reaped) = reaper.spawn(|| start.spawn(stdio, &setup)).map_err(start_err)?;
            // The child's ends are the child's alone now.
            drop((stdin_r, stdout_w, stderr_w));
            let ends = agent_ends(stdin_w, stdout_r, stderr_r).inspect_err(|_| kill_group(pid))?;
            Ok(launched(pid, reaped, ends.0, ends.1, None))
        }
    }
}

fn check_argv(argv: &[String]) -> Result<&str, Error> {
    let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
        return Err(Error::Invalid("argv must name a program".into()));
    };
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::Invalid("argument contains a NUL byte".into()));
    }
    Ok(program)
}

/// The working directory: the spec's (absolute, must exist) or the user's home or `/`.
pub fn working_dir(cwd: Option<&str>, user: &User) -> Result<String, Error> {
    let Some(cwd) = cwd.filter(|c| !c.is_empty()) else {
        let home_is_dir = std::fs::metadata(&user.home).is_ok_and(|m| m.is_dir());
        return Ok(if home_is_dir { user.home.clone() } else { "/".to_owned() });
    };
    let cwd = paths::normalize(cwd)?;
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => Ok(cwd),
        Ok(_) => Err(Error::path(cwd, Errno::NOTDIR.into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NoWorkdir(cwd)),
        Err(e) => Err(Error::path(cwd, e)),
    }
}

/// The environment of a new process (see the module docs).
pub fn environment(user: &User, spec: &ExecSpec) -> Result<BTreeMap<String, String>, Error> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: &str| env.insert(k.to_owned(), v.to_owned());
    set("PATH", DEFAULT_PATH);
    set("HOME", &user.home);
    set("USER", &user.name);
    set("LOGNAME", &user.name);
    if let Some(shell) = &user.shell {
        set("SHELL", shell);
    }
    set("HOSTNAME", &rustix::system::uname().nodename().to_string_lossy());
    if spec.tty.is_some() {
        set("TERM", "xterm-256color");
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(Error::Invalid(format!("invalid environment variable: {}", k.escape_debug())));
        }
        env.insert(k.clone(), v.clone());
    }
    Ok(env)
}

fn pre_exec(user: &User, tty: bool) -> PreExec {
    let ids = (!user.is_root()).then(|| Ids { uid: user.uid, gid: user.gid, groups: user.groups.clone() });
    PreExec {
        setsid: true,
        controlling_tty: tty,
        setpgid: false,
        oom_score_adj: Some(OOM_SCORE_ADJ),
        ids,
        close_fds: true,
    }
}

/// Turns the agent's ends of the child's pipes into tokio pipes.
fn agent_ends(stdin: Option<OwnedFd>, stdout: OwnedFd, stderr: OwnedFd) -> Result<(Option<InputSink>, Outputs), Error> {
    let io_err = |source| Error::Spawn { command: "process".into(), source };
    let stdin = stdin.map(|fd| pipe::Sender::from_owned_fd(fd).map(InputSink::Pipe).map_err(io_err)).transpose()?;
    let reader = |fd: OwnedFd| pipe::Receiver::from_owned_fd(fd).map(OutputSource::Pipe).map_err(io_err);
    Ok((stdin, Outputs { stdout: Some(reader(stdout)?), stderr: Some(reader(stderr)?) }))
}

fn kill_group(pid: u32) {
    let _ = abx_sys::agent::kill(-(pid as i32), 9);
}

/// Maps a failed start onto what the client should hear: a working directory the user
/// cannot enter is named as such, not taken for a program it cannot run.
fn start_error(program: &str, cwd: &str, e: SpawnError) -> Error {
    match e.step {
        Step::Workdir => Error::Workdir { path: cwd.to_owned(), source: e.source },
        _ => spawn_error(program, e.source),
    }
}

/// Maps a failed spawn onto what the client should hear.
pub fn spawn_error(program: &str, e: std::io::Error) -> Error {
    match e.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::NOENT) => Error::CommandNotFound(program.to_owned()),
        Some(Errno::ACCESS) => Error::CommandDenied(program.to_owned()),
        Some(Errno::AGAIN | Errno::NOMEM) => Error::ProcessLimit,
        Some(Errno::MFILE | Errno::NFILE) => Error::FdLimit,
        _ => Error::Spawn { command: program.to_owned(), source: e },
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abx_proto::ErrorCode;

    fn alice() -> User {
        User {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/nonexistent-home".into(),
            shell: Some("/bin/zsh".into()),
        }
    }

    #[test]
    fn builds_the_environment() {
        let mut spec = ExecSpec { tty: Some(abx_proto::TtySize { rows: 1, cols: 1 }), ..Default::default() };
        spec.env.insert("FOO".into(), "bar".into());
        spec.env.insert("PATH".into(), "/opt/bin".into());
        let env = environment(&alice(), &spec).unwrap();
        assert_eq!(env["PATH"], "/opt/bin");
        assert_eq!(env["HOME"], "/nonexistent-home");
        assert_eq!(env["USER"], "alice");
        assert_eq!(env["LOGNAME"], "alice");
        assert_eq!(env["SHELL"], "/bin/zsh");
        assert_eq!(env["TERM"], "xterm-256color");
        assert_eq!(env["FOO"], "bar");
        assert!(env.contains_key("HOSTNAME"));
    }

    #[test]
    fn rejects_bad_variables_and_argv() {
        let mut spec = ExecSpec::default();
        spec.env.insert("A=B".into(), "x".into());
        assert!(environment(&alice(), &spec).is_err());
        assert!(check_argv(&[]).is_err());
        assert!(check_argv(&["a\0b".into()]).is_err());
        assert_eq!(check_argv(&["ls".into(), "-l".into()]).unwrap(), "ls");
    }

    #[test]
    fn picks_the_working_directory() {
        assert_eq!(working_dir(None, &alice()).unwrap(), "/");
        assert_eq!(working_dir(Some("/tmp/../tmp/"), &alice()).unwrap(), "/tmp");
        let missing = working_dir(Some("/no/such/dir"), &alice()).unwrap_err();
        assert_eq!(
            (missing.code(), missing.to_string()),
            (ErrorCode::NotFound, "working directory not found: /no/such/dir".into())
        );
        assert_eq!(working_dir(Some("rel"), &alice()).unwrap_err().code(), ErrorCode::InvalidArgument);
    }

    #[test]
    fn maps_spawn_errors() {
        let e = |errno: Errno| spawn_error("prog", errno.into());
        assert_eq!(e(Errno::NOENT).to_string(), "command not found: prog");
        assert_eq!(e(Errno::NOENT).code(), ErrorCode::CommandNotFound);
        assert_eq!(e(Errno::ACCESS).code(), ErrorCode::PermissionDenied);
        assert_eq!(e(Errno::AGAIN).to_string(), "cannot start process: process limit reached");
        assert_eq!(e(Errno::AGAIN).code(), ErrorCode::ResourceExhausted);
        let e = |step, errno: Errno| start_error("pwd", "/root", SpawnError { step, source: errno.into() });
        let denied = e(Step::Workdir, Errno::ACCESS);
        assert_eq!(denied.to_string(), "cannot enter working directory /root: permission denied");
        assert_eq!(denied.code(), ErrorCode::PermissionDenied);
        assert_eq!(e(Step::Exec, Errno::ACCESS).to_string(), "permission denied: pwd");
    }
}
