//! Drives the built `agentbox-agent` in `--listen` development mode over its unix socket
//! with `abx-proto` frames. Every test starts its own agent; the [`Agent`] guard stops it
//! (SIGTERM makes it SIGKILL the process groups it started) and kills it by pid if needed.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use abx_proto::{
    AgentError, AgentInfo, Control, ErrorCode, Event, ExecSpec, ExitStatus, FileInfo, FileKind, Frame, FrameReader,
    FrameWriter, Kind, ProcessInfo, Reply, Request, TtySize,
};
use rustix::process::{Pid, Signal};
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

const NOBODY: &str = "nobody";
const NOBODY_UID: u32 = 65534;

/// A running agent, stopped on drop.
struct Agent {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_agentbox-agent")).arg("--listen").arg(&sock).spawn().unwrap();
        let agent = Agent { child, sock, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.sock.exists() {
            assert!(Instant::now() < deadline, "agent did not start listening");
            std::thread::sleep(Duration::from_millis(5));
        }
        agent
    }

    fn pid(&self) -> Pid {
        Pid::from_child(&self.child)
    }

    /// A path inside this test's private directory.
    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_str().unwrap().to_owned()
    }

    async fn connect(&self) -> Conn {
        let (r, w) = UnixStream::connect(&self.sock).await.unwrap().into_split();
        Conn { r: FrameReader::new(r), w: FrameWriter::new(w) }
    }

    /// Sends `req` and decodes its single reply.
    async fn call<T: DeserializeOwned>(&self, req: Request) -> Result<T, AgentError> {
        let mut conn = self.connect().await;
        conn.w.json(&req).await.unwrap();
        conn.reply().await
    }

    /// Runs a foreground process to completion.
    async fn run(&self, spec: ExecSpec) -> Output {
        let mut conn = self.connect().await;
        conn.w.json(&Request::Exec(spec)).await.unwrap();
        conn.started().await.expect("exec failed");
        conn.collect().await
    }

    async fn sh(&self, script: &str) -> Output {
        self.run(sh(script)).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.pid(), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }
}

/// What a foreground process produced.
#[derive(Debug, Default)]
struct Output {
    stdout: String,
    stderr: String,
    exit: ExitStatus,
}

struct Conn {
    r: FrameReader<OwnedReadHalf>,
    w: FrameWriter<OwnedWriteHalf>,
}

impl Conn {
    async fn frame(&mut self) -> Frame {
        tokio::time::timeout(Duration::from_secs(20), self.r.expect()).await.expect("agent stalled").unwrap()
    }

    async fn reply<T: DeserializeOwned>(&mut self) -> Result<T, AgentError> {
        match self.frame().await.json::<Reply<T>>().unwrap() {
            Reply::Ok(v) => Ok(v),
            Reply::Err(e) => Err(e),
        }
    }

    /// Reads `Event::Started` or the error reply that replaces it.
    async fn started(&mut self) -> Result<u32, AgentError> {
        let frame = self.frame().await;
        if let Ok(Event::Started { pid }) = frame.json::<Event>() {
            return Ok(pid);
        }
        match frame.json::<Reply<serde_json::Value>>().unwrap() {
            Reply::Err(e) => Err(e),
            Reply::Ok(v) => panic!("unexpected reply {v}"),
        }
    }

    /// Reads output frames until `Event::Exit`.
    async fn collect(&mut self) -> Output {
        let mut out = Output::default();
        loop {
            let frame = self.frame().await;
            match frame.kind {
                Kind::Stdout => out.stdout.push_str(&String::from_utf8_lossy(&frame.payload)),
                Kind::Stderr => out.stderr.push_str(&String::from_utf8_lossy(&frame.payload)),
                Kind::Json => match frame.json::<Event>().unwrap() {
                    Event::Exit(status) => {
                        out.exit = status;
                        return out;
                    }
                    other => panic!("unexpected event {other:?}"),
                },
                other => panic!("unexpected {other:?} frame"),
            }
        }
    }

    /// Reads `Data` frames until `Eof`.
    async fn data(&mut self) -> Vec<u8> {
        let mut bytes = Vec::new();
        loop {
            let frame = self.frame().await;
            match frame.kind {
                Kind::Data => bytes.extend_from_slice(&frame.payload),
                Kind::Eof => return bytes,
                other => panic!("unexpected {other:?} frame: {}", String::from_utf8_lossy(&frame.payload)),
            }
        }
    }

    /// Sends `bytes` and `Eof`. The agent may have answered with an error and closed the
    /// connection already, so failures to send are left for the reply to explain.
    async fn send_data(&mut self, bytes: &[u8]) {
        if self.w.send_chunked(Kind::Data, bytes).await.is_ok() {
            let _ = self.w.send(Kind::Eof, b"").await;
        }
    }
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn process_exists(pid: u32) -> bool {
    rustix::process::test_kill_process(Pid::from_raw(pid as i32).unwrap()).is_ok()
}

// ---------------------------------------------------------------------------------------
// Processes

#[tokio::test]
async fn ping_reports_the_agent() {
    let agent = Agent::start();
    let info: AgentInfo = agent.call(Request::Ping).await.unwrap();
    assert_eq!(info.pid, agent.pid().as_raw_nonzero().get() as u32);
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn exec_streams_stdout_and_exit_code() {
    let agent = Agent::start();
    let out = agent.sh("echo hello; exit 3").await;
    assert_eq!(out.stdout, "hello\n");
    assert_eq!((out.exit.code, out.exit.signal, out.exit.timed_out), (Some(3), None, false));
}

#[tokio::test]
async fn exec_streams_stderr_separately() {
    let agent = Agent::start();
    let out = agent.sh("echo out; echo oops >&2").await;
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("out\n", "oops\n"));
    assert_eq!(out.exit.code, Some(0));
}

#[tokio::test]
async fn exec_sets_environment_and_working_directory() {
    let agent = Agent::start();
    let mut spec = sh("echo $HOME $USER $FOO; pwd");
    spec.env = BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]);
    spec.cwd = Some(agent.path(""));
    let out = agent.run(spec).await;
    assert_eq!(out.stdout, format!("/root root bar\n{}\n", agent.path("").trim_end_matches('/')));
}

#[tokio::test]
async fn stdin_round_trip() {
    let agent = Agent::start();
    let mut conn = agent.connect().await;
    let spec = ExecSpec { argv: vec!["cat".into()], stdin: true, ..Default::default() };
    conn.w.json(&Request::Exec(spec)).await.unwrap();
    conn.started().await.unwrap();
    conn.w.send(Kind::Stdin, b"abc").await.unwrap();
    conn.w.send(Kind::Stdin, b"def").await.unwrap();
    conn.w.send(Kind::Eof, b"").await.unwrap();
    let out = conn.collect().await;
    assert_eq!((out.stdout.as_str(), out.exit.code), ("abcdef", Some(0)));
}

#[tokio::test]
async fn stdin_is_dev_null_by_default() {
    let agent = Agent::start();
    let out = agent.run(ExecSpec { argv: vec!["cat".into()], ..Default::default() }).await;
    assert_eq!((out.stdout.as_str(), out.exit.code), ("", Some(0)));
}

#[tokio::test]
async fn unknown_command_user_and_cwd_are_errors() {
    let agent = Agent::start();
    let err =
        agent.call::<()>(Request::Exec(ExecSpec { argv: vec!["no-such-cmd-xyz".into()], ..Default::default() })).await;
    let err = err.unwrap_err();
    assert_eq!((err.code, err.message.as_str()), (ErrorCode::CommandNotFound, "command not found: no-such-cmd-xyz"));

    let spec = ExecSpec { user: Some("no-such-user".into()), ..sh("true") };
    let err = agent.call::<()>(Request::Exec(spec)).await.unwrap_err();
    assert_eq!((err.code, err.message.as_str()), (ErrorCode::NotFound, "user 'no-such-user' not found"));

    let spec = ExecSpec { cwd: Some("/no/such/dir".into()), ..sh("true") };
    let err = agent.call::<()>(Request::Exec(spec)).await.unwrap_err();
    assert_eq!((err.code, err.message.as_str()), (ErrorCode::NotFound, "working directory not found: /no/such/dir"));

    let err = agent.call::<()>(Request::Exec(ExecSpec::default())).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let agent = Agent::start();
    let started = Instant::now();
    let out = agent.run(ExecSpec { timeout_ms: Some(300), ..sh("sleep 30 & sleep 30") }).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!((out.exit.signal, out.exit.timed_out), (Some(9), true));
}

#[tokio::test]
async fn exit_is_reported_while_a_grandchild_holds_the_pipe() {
    let agent = Agent::start();
    let started = Instant::now();
    let out = agent.sh("sleep 5 & echo $!").await;
    assert!(started.elapsed() < Duration::from_secs(3), "waited for the grandchild");
    assert_eq!(out.exit.code, Some(0));
    let grandchild: i32 = out.stdout.trim().parse().unwrap();
    let _ = rustix::process::kill_process(Pid::from_raw(grandchild).unwrap(), Signal::KILL);
}

#[tokio::test]
async fn client_disconnect_kills_a_foreground_process() {
    let agent = Agent::start();
    let mut conn = agent.connect().await;
    conn.w.json(&Request::Exec(sh("sleep 30"))).await.unwrap();
    let pid = conn.started().await.unwrap();
    assert!(process_exists(pid));
    drop(conn);
    wait_until("the process to die", async || !process_exists(pid)).await;
    let list: Vec<ProcessInfo> = agent.call(Request::ListProcesses).await.unwrap();
    assert!(list.iter().all(|p| p.pid != pid));
}

#[tokio::test]
async fn background_attach_list_and_signal() {
    let agent = Agent::start();
    let spec =
        ExecSpec { background: true, tag: Some("bg".into()), ..sh("echo started; echo warn >&2; exec sleep 30") };
    let mut conn = agent.connect().await;
    conn.w.json(&Request::Exec(spec)).await.unwrap();
    let pid = conn.started().await.unwrap();
    assert!(conn.r.next().await.unwrap().is_none(), "background exec ends after Started");

    wait_until("output to be buffered", async || {
        let mut c = agent.connect().await;
        c.w.json(&Request::Attach { pid, replay: true }).await.unwrap();
        c.started().await.unwrap();
        // The two pipes are read independently: either line may come first.
        let mut seen = Vec::new();
        while let Ok(Ok(Some(frame))) = tokio::time::timeout(Duration::from_millis(100), c.r.next()).await {
            seen.push((frame.kind, frame.payload));
        }
        seen.contains(&(Kind::Stdout, b"started\n".to_vec())) && seen.contains(&(Kind::Stderr, b"warn\n".to_vec()))
    })
    .await;

    let list: Vec<ProcessInfo> = agent.call(Request::ListProcesses).await.unwrap();
    let entry = list.iter().find(|p| p.pid == pid).expect("listed");
    assert!(entry.background && entry.exit.is_none());
    assert_eq!(entry.tag.as_deref(), Some("bg"));

    // Two clients attached at once both see the exit.
    let mut first = agent.connect().await;
    first.w.json(&Request::Attach { pid, replay: true }).await.unwrap();
    assert_eq!(first.started().await.unwrap(), pid);
    let mut second = agent.connect().await;
    second.w.json(&Request::Attach { pid, replay: false }).await.unwrap();
    second.started().await.unwrap();

    agent.call::<()>(Request::Signal { pid, signal: 15, group: true }).await.unwrap();
    let out = first.collect().await;
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("started\n", "warn\n"));
    assert_eq!(out.exit.signal, Some(15));
    assert_eq!(second.collect().await.exit.signal, Some(15));

    let list: Vec<ProcessInfo> = agent.call(Request::ListProcesses).await.unwrap();
    let entry = list.iter().find(|p| p.pid == pid).expect("finished background processes stay listed");
    assert_eq!(entry.exit.unwrap().signal, Some(15));

    // Attaching after the end replays and reports the exit at once.
    let mut late = agent.connect().await;
    late.w.json(&Request::Attach { pid, replay: true }).await.unwrap();
    late.started().await.unwrap();
    assert_eq!(late.collect().await.stdout, "started\n");
}

#[tokio::test]
async fn background_stdin_via_input_requests() {
    let agent = Agent::start();
    let spec = ExecSpec { background: true, stdin: true, argv: vec!["cat".into()], ..Default::default() };
    let mut conn = agent.connect().await;
    conn.w.json(&Request::Exec(spec)).await.unwrap();
    let pid = conn.started().await.unwrap();
    let mut attached = agent.connect().await;
    attached.w.json(&Request::Attach { pid, replay: true }).await.unwrap();
    attached.started().await.unwrap();
    let input = Request::Input { pid, data: b"ping\n".to_vec(), close: true };
    agent.call::<()>(input).await.unwrap();
    let out = attached.collect().await;
    assert_eq!((out.stdout.as_str(), out.exit.code), ("ping\n", Some(0)));
    let err = agent.call::<()>(Request::Input { pid, data: b"x".to_vec(), close: false }).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    let err = agent.call::<()>(Request::Signal { pid: 999_999, signal: 9, group: false }).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[tokio::test]
async fn kill_all_signals_started_processes() {
    let agent = Agent::start();
    let mut conn = agent.connect().await;
    conn.w.json(&Request::Exec(ExecSpec { background: true, ..sh("sleep 30") })).await.unwrap();
    let pid = conn.started().await.unwrap();
    let count: u32 = agent.call(Request::KillAll { signal: 9 }).await.unwrap();
    assert_eq!(count, 1);
    wait_until("the process to die", async || !process_exists(pid)).await;
}

#[tokio::test]
async fn pty_reports_size_and_follows_resize() {
    let agent = Agent::start();
    let spec =
        ExecSpec { tty: Some(TtySize { rows: 33, cols: 77 }), ..sh("stty size; [ -t 0 ] && echo tty; echo $TERM") };
    let out = agent.run(spec).await;
    assert!(out.stdout.contains("33 77"), "{:?}", out.stdout);
    assert!(out.stdout.contains("tty\r\n"), "{:?}", out.stdout);
    assert!(out.stdout.contains("xterm-256color"), "{:?}", out.stdout);
    assert_eq!(out.exit.code, Some(0));

    let mut conn = agent.connect().await;
    let spec = ExecSpec { tty: Some(TtySize { rows: 10, cols: 20 }), ..sh("read line; stty size") };
    conn.w.json(&Request::Exec(spec)).await.unwrap();
    conn.started().await.unwrap();
    let resize = serde_json::to_vec(&Control::Resize { size: TtySize { rows: 40, cols: 100 } }).unwrap();
    conn.w.send(Kind::Json, &resize).await.unwrap();
    conn.w.send(Kind::Stdin, b"go\n").await.unwrap();
    let out = conn.collect().await;
    assert!(out.stdout.contains("40 100"), "{:?}", out.stdout);
}

#[tokio::test]
async fn runs_as_another_user() {
    let agent = Agent::start();
    let out = agent.run(ExecSpec { user: Some(NOBODY.into()), ..sh("id -u; id -g; echo $USER $HOME; pwd") }).await;
    assert_eq!(out.stdout, format!("{NOBODY_UID}\n{NOBODY_UID}\nnobody /nonexistent\n/\n"));
    let out = agent.run(ExecSpec { user: Some("65534:0".into()), ..sh("id -u; id -g") }).await;
    assert_eq!(out.stdout, "65534\n0\n");
}

// ---------------------------------------------------------------------------------------
// Files

async fn write(
    agent: &Agent,
    path: &str,
    bytes: &[u8],
    user: Option<&str>,
    mode: Option<u32>,
) -> Result<FileInfo, AgentError> {
    let mut conn = agent.connect().await;
    let req = Request::WriteFile { path: path.into(), user: user.map(Into::into), mode, parents: true, append: false };
    conn.w.json(&req).await.unwrap();
    conn.send_data(bytes).await;
    conn.reply().await
}

async fn read(agent: &Agent, path: &str, user: Option<&str>) -> Result<(FileInfo, Vec<u8>), AgentError> {
    let mut conn = agent.connect().await;
    conn.w.json(&Request::ReadFile { path: path.into(), user: user.map(Into::into) }).await.unwrap();
    let info: FileInfo = conn.reply().await?;
    Ok((info, conn.data().await))
}

#[tokio::test]
async fn file_round_trip() {
    let agent = Agent::start();
    let file = agent.path("a/b/c.txt");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let info = write(&agent, &file, &big, None, Some(0o600)).await.unwrap();
    assert_eq!((info.size, info.mode, info.kind), (big.len() as u64, 0o600, FileKind::File));
    let (info, bytes) = read(&agent, &file, None).await.unwrap();
    assert_eq!((info.name.as_str(), bytes == big), ("c.txt", true));

    let mut conn = agent.connect().await;
    let req = Request::WriteFile { path: file.clone(), user: None, mode: None, parents: false, append: true };
    conn.w.json(&req).await.unwrap();
    conn.send_data(b"tail").await;
    let info: FileInfo = conn.reply().await.unwrap();
    assert_eq!((info.size, info.mode), (big.len() as u64 + 4, 0o600));

    let stat: FileInfo =
        agent.call(Request::Stat { path: format!("{}/./b/../b/c.txt", agent.path("a")), user: None }).await.unwrap();
    assert_eq!(stat.path, file);

    let made: FileInfo = agent
        .call(Request::Mkdir { path: agent.path("a/d/e"), user: None, parents: true, mode: Some(0o700) })
        .await
        .unwrap();
    assert_eq!((made.kind, made.mode), (FileKind::Dir, 0o700));
    let again = Request::Mkdir { path: agent.path("a/d/e"), user: None, parents: false, mode: None };
    assert_eq!(agent.call::<FileInfo>(again).await.unwrap_err().code, ErrorCode::AlreadyExists);
    let parents_ok = Request::Mkdir { path: agent.path("a/d/e"), user: None, parents: true, mode: None };
    agent.call::<FileInfo>(parents_ok).await.unwrap();

    std::os::unix::fs::symlink("b", agent.path("a/link")).unwrap();
    let list: Vec<FileInfo> =
        agent.call(Request::ListDir { path: agent.path("a"), user: None, depth: 2 }).await.unwrap();
    let names: Vec<&str> = list.iter().map(|f| f.path.strip_prefix(&agent.path("a/")).unwrap()).collect();
    assert_eq!(names, ["b", "b/c.txt", "d", "d/e", "link"]);
    assert_eq!(list[4].symlink_target.as_deref(), Some("b"));
    let shallow: Vec<FileInfo> =
        agent.call(Request::ListDir { path: agent.path("a"), user: None, depth: 1 }).await.unwrap();
    assert_eq!(shallow.len(), 3);

    let renamed: FileInfo =
        agent.call(Request::Rename { from: file.clone(), to: agent.path("a/d/moved.txt"), user: None }).await.unwrap();
    assert_eq!(renamed.name, "moved.txt");
    let err = agent.call::<FileInfo>(Request::Stat { path: file.clone(), user: None }).await.unwrap_err();
    assert_eq!((err.code, err.message), (ErrorCode::NotFound, format!("no such file or directory: {file}")));

    let not_empty = Request::Remove { path: agent.path("a/d"), user: None, recursive: false };
    assert_eq!(agent.call::<()>(not_empty).await.unwrap_err().code, ErrorCode::DirectoryNotEmpty);
    agent.call::<()>(Request::Remove { path: agent.path("a/d"), user: None, recursive: true }).await.unwrap();
    assert!(!Path::new(&agent.path("a/d")).exists());
}

#[tokio::test]
async fn file_errors() {
    let agent = Agent::start();
    let err = agent.call::<FileInfo>(Request::Stat { path: "relative/x".into(), user: None }).await.unwrap_err();
    assert_eq!((err.code, err.message.as_str()), (ErrorCode::InvalidArgument, "path must be absolute: relative/x"));
    let err = read(&agent, &agent.path(""), None).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::IsADirectory);
    let err = read(&agent, "/dev/zero", None).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    let err = read(&agent, &agent.path("missing"), None).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    let list = Request::ListDir { path: agent.path("agent.sock"), user: None, depth: 1 };
    assert_eq!(agent.call::<Vec<FileInfo>>(list).await.unwrap_err().code, ErrorCode::NotADirectory);
    let err = agent.call::<()>(Request::Remove { path: "/".into(), user: None, recursive: true }).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn archive_round_trip() {
    let agent = Agent::start();
    let src = agent.path("src");
    std::fs::create_dir_all(format!("{src}/sub/deeper")).unwrap();
    std::fs::write(format!("{src}/top.txt"), b"top").unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 7) as u8).collect();
    std::fs::write(format!("{src}/sub/big.bin"), &big).unwrap();
    std::fs::set_permissions(format!("{src}/top.txt"), std::fs::Permissions::from_mode(0o751)).unwrap();
    std::os::unix::fs::symlink("../top.txt", format!("{src}/sub/link")).unwrap();
    let long = "n".repeat(150);
    std::fs::write(format!("{src}/sub/deeper/{long}"), b"long name").unwrap();

    let mut conn = agent.connect().await;
    conn.w.json(&Request::ArchiveRead { path: src.clone(), user: None }).await.unwrap();
    let info: FileInfo = conn.reply().await.unwrap();
    assert_eq!(info.kind, FileKind::Dir);
    let tarball = conn.data().await;

    // The host's tar agrees with the archive.
    let listing = agent.path("listing.tar");
    std::fs::write(&listing, &tarball).unwrap();
    let names = Command::new("tar").arg("-tf").arg(&listing).output().unwrap();
    let names = String::from_utf8(names.stdout).unwrap();
    assert!(names.lines().any(|l| l == "src/sub/big.bin"), "{names}");
    assert!(names.lines().any(|l| l.ends_with(&long)), "{names}");

    let dst = agent.path("dst/nested");
    let mut conn = agent.connect().await;
    conn.w.json(&Request::ArchiveWrite { path: dst.clone(), user: None }).await.unwrap();
    conn.send_data(&tarball).await;
    conn.reply::<()>().await.unwrap();
    assert_eq!(std::fs::read(format!("{dst}/src/sub/big.bin")).unwrap(), big);
    assert_eq!(std::fs::read_link(format!("{dst}/src/sub/link")).unwrap(), Path::new("../top.txt"));
    assert_eq!(std::fs::metadata(format!("{dst}/src/top.txt")).unwrap().mode() & 0o7777, 0o751);
    assert_eq!(std::fs::read(format!("{dst}/src/sub/deeper/{long}")).unwrap(), b"long name");

    // A single file archives under its own name.
    let mut conn = agent.connect().await;
    conn.w.json(&Request::ArchiveRead { path: format!("{src}/top.txt"), user: None }).await.unwrap();
    conn.reply::<FileInfo>().await.unwrap();
    let single = conn.data().await;
    let mut archive = tar::Archive::new(single.as_slice());
    let entries: Vec<String> =
        archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(entries, ["top.txt"]);
}

#[tokio::test]
async fn archive_write_refuses_escaping_entries() {
    let agent = Agent::start();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    // `set_path` refuses `..`, so write the name into the raw header.
    header.as_old_mut().name[..9].copy_from_slice(b"../escape");
    header.set_cksum();
    builder.append(&header, &b"evil"[..]).unwrap();
    let tarball = builder.into_inner().unwrap();
    let mut conn = agent.connect().await;
    conn.w.json(&Request::ArchiveWrite { path: agent.path("x"), user: None }).await.unwrap();
    conn.send_data(&tarball).await;
    let err = conn.reply::<()>().await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert!(!Path::new(&agent.path("escape")).exists());
}

#[tokio::test]
async fn file_operations_run_with_the_users_permissions() {
    let agent = Agent::start();
    let shared = agent.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();

    let info = write(&agent, &format!("{shared}/mine/note.txt"), b"hi", Some(NOBODY), None).await.unwrap();
    assert_eq!((info.uid, info.gid, info.mode), (NOBODY_UID, NOBODY_UID, 0o644));
    let dir = std::fs::metadata(format!("{shared}/mine")).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o7777), (NOBODY_UID, 0o755));
    let made: FileInfo = agent
        .call(Request::Mkdir { path: format!("{shared}/d"), user: Some(NOBODY.into()), parents: false, mode: None })
        .await
        .unwrap();
    assert_eq!(made.uid, NOBODY_UID);

    let secret = agent.path("secret");
    std::fs::write(&secret, b"root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = read(&agent, &secret, Some(NOBODY)).await.unwrap_err();
    assert_eq!((err.code, err.message), (ErrorCode::PermissionDenied, format!("permission denied: {secret}")));
    assert_eq!(read(&agent, &secret, None).await.unwrap().1, b"root only");
    let err = write(&agent, &agent.path("not-writable"), b"x", Some(NOBODY), None).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    let err =
        agent.call::<()>(Request::Remove { path: secret.clone(), user: Some(NOBODY.into()), recursive: false }).await;
    assert_eq!(err.unwrap_err().code, ErrorCode::PermissionDenied);

    // Extraction as the user: everything belongs to the user.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o640);
    builder.append_data(&mut header, "in/file", &b"abc"[..]).unwrap();
    let tarball = builder.into_inner().unwrap();
    let mut conn = agent.connect().await;
    conn.w
        .json(&Request::ArchiveWrite { path: format!("{shared}/unpacked"), user: Some(NOBODY.into()) })
        .await
        .unwrap();
    conn.send_data(&tarball).await;
    conn.reply::<()>().await.unwrap();
    let meta = std::fs::metadata(format!("{shared}/unpacked/in/file")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (NOBODY_UID, 0o640));
    assert_eq!(std::fs::metadata(format!("{shared}/unpacked/in")).unwrap().uid(), NOBODY_UID);

    // The agent went back to root afterwards.
    let info = write(&agent, &format!("{shared}/root.txt"), b"r", None, None).await.unwrap();
    assert_eq!(info.uid, 0);
}

#[tokio::test]
async fn malformed_requests_get_an_error() {
    let agent = Agent::start();
    let mut conn = agent.connect().await;
    conn.w.send(Kind::Json, br#"{"op":"no_such_op"}"#).await.unwrap();
    let err = conn.reply::<()>().await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    // The agent is still serving.
    agent.call::<AgentInfo>(Request::Ping).await.unwrap();
}
