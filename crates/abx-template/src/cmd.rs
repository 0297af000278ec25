//! Running the host programs the builders need (debootstrap, chroot, busybox).
//!
//! Children run in their own process group with a clean environment. If the caller unwinds
//! while a child runs (a panicking progress callback, say), the whole group is killed and
//! reaped, so no process outlives a build.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};
use crate::recipe::SOURCE_DATE_EPOCH;

/// How many trailing output lines a failure reports.
const TAIL_LINES: usize = 20;

/// `PATH` given to helper programs.
const HELPER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds an executable by name in `PATH` and the sbin directories (a daemon's `PATH` often
/// lacks them).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(HELPER_PATH.split(':'))
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// One run of a helper program, with a clean environment and umask 022 (so what it creates
/// gets the same modes whatever the daemon's umask; `Command` cannot set a umask, so the
/// program is started through `/bin/sh -c 'umask 022 && exec "$0" "$@"'`).
pub struct Helper {
    cmd: Command,
    program: String,
}

impl Helper {
    /// Prepares to run `program`.
    pub fn new(program: &Path) -> Helper {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "umask 022 && exec \"$0\" \"$@\""])
            .arg(program)
            .env_clear()
            .env("PATH", HELPER_PATH)
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string())
            .stdin(Stdio::null())
            .process_group(0);
        Helper { cmd, program: program.display().to_string() }
    }

    /// Appends an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Helper {
        self.cmd.arg(arg);
        self
    }

    /// Appends arguments.
    pub fn args<S: AsRef<OsStr>>(&mut self, args: impl IntoIterator<Item = S>) -> &mut Helper {
        self.cmd.args(args);
        self
    }
}

/// Kills the child's process group and reaps the child unless it was waited for.
struct Reaper(Option<Child>);

impl Reaper {
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.0.as_mut().expect("child present").wait();
        self.0 = None;
        status
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.wait();
        }
    }
}

/// Runs `cmd`, passing each line of its merged stdout and stderr to `on_line`. Fails with
/// the last lines of output if the program exits unsuccessfully.
pub fn run_streaming(helper: Helper, on_line: &mut dyn FnMut(&str)) -> Result<()> {
    let Helper { mut cmd, program } = helper;
    let spawn_err = |source| Error::Spawn { program: program.clone(), source };
    let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
    cmd.stdout(writer.try_clone().map_err(spawn_err)?).stderr(writer);
    let mut child = Reaper(Some(cmd.spawn().map_err(spawn_err)?));
    drop(cmd); // closes our copies of the pipe's write end, so reading ends at the child's exit
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in BufReader::new(reader).lines() {
        let line = line.map_err(spawn_err)?;
        on_line(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child.wait().map_err(spawn_err)?;
    if status.success() {
        return Ok(());
    }
    // Debootstrap marks its errors with "E: "; when there are any, they are the message.
    let errors: Vec<&str> = tail.iter().map(String::as_str).filter(|l| l.starts_with("E: ")).collect();
    let output = if errors.is_empty() { Vec::from(tail).join("\n") } else { errors.join("\n") };
    Err(Error::Command { program, status, output })
}

/// Runs `cmd` to completion and returns its stdout.
pub fn run_output(helper: Helper) -> Result<Vec<u8>> {
    let Helper { mut cmd, program } = helper;
    let out = cmd.output().map_err(|source| Error::Spawn { program: program.clone(), source })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(TAIL_LINES).collect();
    let output = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    Err(Error::Command { program, status: out.status, output })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_lines_and_reports_failure() {
        let sh = find_program("sh").unwrap();
        let mut cmd = Helper::new(&sh);
        cmd.args(["-c", "echo one; echo two >&2; echo \"$SOURCE_DATE_EPOCH\"; umask; exit 3"]);
        let mut lines = Vec::new();
        let err = run_streaming(cmd, &mut |l| lines.push(l.to_string())).unwrap_err();
        assert_eq!(lines, ["one", "two", &SOURCE_DATE_EPOCH.to_string(), "0022"]);
        let Error::Command { status, output, .. } = err else { panic!("{err}") };
        assert_eq!(status.code(), Some(3));
        assert!(output.ends_with("two\n1686355200\n0022"), "{output}");
    }

    #[test]
    fn output_and_missing_program() {
        let sh = find_program("sh").unwrap();
        let mut cmd = Helper::new(&sh);
        cmd.args(["-c", "printf hi"]);
        assert_eq!(run_output(cmd).unwrap(), b"hi");
        assert!(find_program("no-such-program-abx").is_none());
        let err = run_output(Helper::new(Path::new("/nonexistent/prog"))).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/prog failed"), "{err}");
    }
}
