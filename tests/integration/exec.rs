//! Running processes: output, exit codes, environment, users, stdin, timeouts, background
//! processes, signals, terminals.

use std::time::Duration;

use abx_client::{CreateSandbox, ExecRequest, InteractiveEvent, Limits, TtySize};

use crate::harness::Daemon;

fn cmd(args: &[&str]) -> ExecRequest {
    ExecRequest { cmd: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

#[tokio::test]
async fn output_exit_codes_env_cwd_and_users() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let (out, err, code) = d.sh(&id, "echo out; echo err >&2; exit 7").await;
    assert_eq!((out.as_str(), err.as_str(), code), ("out\n", "err\n", 7));
    let mut req = cmd(&["sh", "-c", "echo $FOO:$(pwd):$(id -u):$HOME"]);
    req.env.insert("FOO".into(), "bar".into());
    req.cwd = Some("/tmp".into());
    assert_eq!(d.exec(&id, req).await.0, "bar:/tmp:1000:/home/user\n");
    let mut req = cmd(&["id", "-u"]);
    req.user = Some("root".into());
    assert_eq!(d.exec(&id, req).await.0, "0\n");
    // Given up front, stdin reaches the process.
    let mut req = cmd(&["cat"]);
    req.stdin = Some("aGVsbG8=".into());
    assert_eq!(d.exec(&id, req).await.0, "hello");
}

/// Input given up front that the process does not read (it exits first) is dropped, as a
/// shell drops what it pipes into `true`; the result is the process's own. Before, the
/// agent's end of the exchange broke the daemon's write of the rest: 502
/// `agent_unavailable`, "broken exchange with the sandbox's agent: ... Broken pipe".
#[tokio::test]
async fn input_a_process_leaves_unread_is_dropped_not_an_error() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    // 1 MiB of "xxx" in base64.
    let stdin = "eHh4".repeat((1 << 20) / 3 + 1);
    for round in 0..5 {
        for (args, want) in
            [(&["true"][..], ("", 0)), (&["sh", "-c", "exit 4"][..], ("", 4)), (&["head", "-c", "3"][..], ("xxx", 0))]
        {
            let mut req = cmd(args);
            req.stdin = Some(stdin.clone());
            let out = d.client.exec(&id, &req).await.unwrap().collect().await;
            let out = out.unwrap_or_else(|e| panic!("round {round}, {args:?}: {e}"));
            let got = (String::from_utf8_lossy(&out.stdout).into_owned(), out.status.shell_code());
            assert_eq!((got.0.as_str(), got.1), want, "round {round}, {args:?}");
        }
    }
}

#[tokio::test]
async fn sandbox_defaults_apply_to_every_process() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let mut req = CreateSandbox {
        template: Some("mini".into()),
        workdir: Some("/tmp".into()),
        user: Some("root".into()),
        ..Default::default()
    };
    req.env.insert("TEAM".into(), "agents".into());
    let id = d.client.create_sandbox(&req).await.unwrap().id;
    assert_eq!(d.sh(&id, "echo $TEAM $(pwd) $(id -u)").await.0, "agents /tmp 0\n");
}

#[tokio::test]
async fn bad_commands_are_clear_errors() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let e = d.client.exec(&id, &cmd(&["no-such-program"])).await.unwrap_err();
    assert_eq!(e.code(), Some("command_not_found"), "{e}");
    assert!(e.to_string().contains("no-such-program"), "{e}");
    let e = d.client.exec(&id, &cmd(&[])).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_argument"), "{e}");
    let mut req = cmd(&["true"]);
    req.cwd = Some("/does/not/exist".into());
    let e = d.client.exec(&id, &req).await.unwrap_err();
    assert!(e.to_string().contains("/does/not/exist"), "{e}");
    let mut req = cmd(&["true"]);
    req.user = Some("nobody-here".into());
    let e = d.client.exec(&id, &req).await.unwrap_err();
    assert!(e.to_string().contains("nobody-here"), "{e}");
    // A uid or gid past the sandbox's 65536 is named as such (it was a bare EINVAL).
    for (user, what) in [("70000", "uid 70000"), ("1000:99999", "gid 99999")] {
        req.user = Some(user.into());
        let e = d.client.exec(&id, &req).await.unwrap_err();
        assert_eq!(e.code(), Some("invalid_argument"), "{e}");
        assert!(e.to_string().contains(&format!("{what} does not exist in this sandbox")), "{e}");
    }
    // Input past what a JSON request may carry names the limit and the way around it (it
    // was "invalid request body: Failed to buffer the request body: length limit exceeded").
    let mut req = cmd(&["cat"]);
    req.stdin = Some("eHh4".repeat(600_000));
    let e = d.client.exec(&id, &req).await.unwrap_err();
    assert_eq!(e.code(), Some("payload_too_large"), "{e}");
    assert!(e.to_string().contains("2 MiB") && e.to_string().contains("/exec/ws"), "{e}");
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let mut req = cmd(&["sh", "-c", "sleep 100 & sleep 100"]);
    req.timeout_secs = Some(0.5);
    let t = std::time::Instant::now();
    let out = d.client.exec(&id, &req).await.unwrap().collect().await.unwrap();
    assert!(out.status.timed_out && t.elapsed() < Duration::from_secs(10), "{:?}", out.status);
    let (ps, _, _) = d.sh(&id, "pgrep -x sleep | wc -l").await;
    assert_eq!(ps.trim(), "0", "the background sleep died with its group");
    // A timeout under a millisecond is one, not none (before: rounded down to 0, no timeout).
    req.timeout_secs = Some(1e-9);
    let out = d.client.exec(&id, &req).await.unwrap().collect().await.unwrap();
    assert!(out.status.timed_out, "{:?}", out.status);
}

#[tokio::test]
async fn background_processes_can_be_listed_attached_fed_and_signalled() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let mut req = cmd(&["sh", "-c", "echo started; while read line; do echo got:$line; done"]);
    req.tag = Some("worker".into());
    req.interactive = true;
    let pid = d.client.exec_background(&id, &req).await.unwrap();
    let procs = d.client.processes(&id).await.unwrap();
    let p = procs.iter().find(|p| p.pid == pid).expect("listed");
    assert_eq!(p.tag.as_deref(), Some("worker"));
    d.client.write_stdin(&id, pid, b"one\n", false).await.unwrap();
    let mut s = d.client.attach(&id, pid).await.unwrap();
    let mut seen = String::new();
    while !seen.contains("got:one") {
        match s.next().await.unwrap() {
            Some(abx_client::OutputEvent::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(_) => {}
            None => panic!("stream ended: {seen}"),
        }
    }
    assert!(seen.contains("started"), "buffered output is replayed: {seen}");
    // Pids the API did not start are named as such; PID 1 is the agent itself.
    let e = d.client.signal(&id, 1, "TERM").await.unwrap_err().to_string();
    assert!(e.contains("process 1 is the sandbox's agent"), "{e}");
    let e = d.client.signal(&id, 4_000_000, "TERM").await.unwrap_err().to_string();
    assert!(e.contains("process 4000000 not found among the processes started through the API"), "{e}");
    d.client.signal(&id, pid, "TERM").await.unwrap();
    loop {
        match s.next().await.unwrap() {
            Some(abx_client::OutputEvent::Exit(st)) => {
                assert_eq!(st.signal, Some(15));
                break;
            }
            Some(_) => {}
            None => panic!("no exit event"),
        }
    }
}

#[tokio::test]
async fn commands_start_with_default_signals_whatever_the_daemon_inherited() {
    // A daemon started as a shell script's background job (`agentbox daemon &`) ignores
    // SIGINT and SIGQUIT, and a child inherits what its parent ignores.
    let d = Daemon::start_as_background_job().await;
    // (The daemon catches SIGINT itself, to shut down; SIGQUIT stays ignored.)
    let daemon = std::fs::read_to_string(format!("/proc/{}/status", d.pid().unwrap())).unwrap();
    let ignored = daemon.lines().find_map(|l| l.strip_prefix("SigIgn:\t")).unwrap();
    let quit = 1 << (libc::SIGQUIT - 1);
    assert_eq!(u64::from_str_radix(ignored, 16).unwrap() & quit, quit, "the daemon ignores SIGQUIT: {daemon}");
    let id = d.mini(Limits::default()).await;
    for tty in [None, Some(TtySize { rows: 24, cols: 80 })] {
        let mut req = cmd(&["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]);
        req.tty = tty;
        let (out, _, code) = d.exec(&id, req).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("SigIgn:\t0000000000000000"), "nothing ignored (tty {}): {out}", tty.is_some());
        assert!(out.contains("SigBlk:\t0000000000000000"), "nothing blocked (tty {}): {out}", tty.is_some());
    }
    // So an interrupt stops a command, which it would not with SIGINT ignored.
    let pid = d.client.exec_background(&id, &cmd(&["sleep", "100"])).await.unwrap();
    let mut s = d.client.attach(&id, pid).await.unwrap();
    d.client.signal(&id, pid, "INT").await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.next().await.unwrap() {
                Some(abx_client::OutputEvent::Exit(st)) => return st,
                Some(_) => {}
                None => panic!("no exit event"),
            }
        }
    })
    .await
    .expect("sleep still running 10 s after SIGINT");
    assert_eq!(st.signal, Some(libc::SIGINT));
}

#[tokio::test]
async fn terminal_sessions_have_a_size_and_can_be_resized() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let mut req = cmd(&["sh"]);
    req.tty = Some(TtySize { rows: 30, cols: 100 });
    let (mut w, mut r) = d.client.exec_interactive(&id, &req).await.unwrap().split();
    w.stdin(b"stty size\n").await.unwrap();
    let mut seen = String::new();
    while !seen.contains("30 100") {
        match r.next().await.unwrap() {
            Some(InteractiveEvent::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(_) => {}
            None => panic!("ended: {seen}"),
        }
    }
    w.resize(TtySize { rows: 40, cols: 120 }).await.unwrap();
    w.stdin(b"stty size; exit 3\n").await.unwrap();
    loop {
        match r.next().await.unwrap() {
            Some(InteractiveEvent::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(InteractiveEvent::Exit(st)) => {
                assert_eq!(st.code, Some(3));
                break;
            }
            Some(_) => {}
            None => panic!("ended: {seen}"),
        }
    }
    assert!(seen.contains("40 120"), "{seen}");
}

/// A background terminal whose shell exited says so to a resize ("process N has exited",
/// not found), not "has no terminal" as if it never had one (the e2b soak's `pty.resize`
/// after the shell's `exit`).
#[tokio::test]
async fn a_resize_after_the_terminal_exited_says_it_exited() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let mut req = cmd(&["sh"]);
    req.tty = Some(TtySize { rows: 24, cols: 80 });
    let pid = d.client.exec_background(&id, &req).await.unwrap();
    d.client.resize(&id, pid, TtySize { rows: 30, cols: 100 }).await.unwrap();
    d.client.write_stdin(&id, pid, b"exit 0\n", false).await.unwrap();
    d.wait_for("the shell's exit", Duration::from_secs(10), || async {
        d.client.processes(&id).await.unwrap().iter().any(|p| p.pid == pid && p.exit.is_some())
    })
    .await;
    let e = d.client.resize(&id, pid, TtySize { rows: 40, cols: 120 }).await.unwrap_err();
    assert_eq!(e.code(), Some("not_found"), "{e}");
    assert!(e.to_string().contains(&format!("process {pid} has exited")), "{e}");
    // A process that never had a terminal still says that.
    let pid = d.client.exec_background(&id, &cmd(&["sleep", "30"])).await.unwrap();
    let e = d.client.resize(&id, pid, TtySize { rows: 40, cols: 120 }).await.unwrap_err();
    assert!(e.to_string().contains(&format!("process {pid} has no terminal")), "{e}");
}

/// A WebSocket client that stops reading holds its exec session only while the sandbox
/// runs (the process then waits on its output, as on a pipe). After a removal the daemon
/// lets it go within seconds and closes the connection; before, its send waited for good,
/// holding the connection and the session.
#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_let_go_after_a_removal() {
    use futures_util::SinkExt;
    use std::os::fd::AsFd;
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let stream = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let url = format!("ws://localhost/v1/sandboxes/{id}/exec/ws");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let req = serde_json::json!({"cmd": ["sh", "-c", "while :; do echo 0123456789abcdef0123456789abcdef; done"]});
    ws.send(tokio_tungstenite::tungstenite::Message::Text(req.to_string().into())).await.unwrap();
    // Never read: the buffers between the process and this client fill up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.client.delete_sandbox(&id, true).await.unwrap();
    // The daemon's end closes: a hang-up here, whatever is still unread.
    let fd = ws.get_ref().as_fd().try_clone_to_owned().unwrap();
    let revents = tokio::task::spawn_blocking(move || {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&fd, PollFlags::RDHUP)];
        let _ = rustix::event::poll(&mut fds, Some(&Timespec { tv_sec: 30, tv_nsec: 0 }));
        fds[0].revents()
    })
    .await
    .unwrap();
    assert!(
        revents.intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::RDHUP),
        "still connected 30 s after the removal: {revents:?}"
    );
    drop(ws);
}

#[tokio::test]
async fn interactive_stdin_streams_and_closes() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let (mut w, mut r) = d.client.exec_interactive(&id, &cmd(&["wc", "-c"])).await.unwrap().split();
    w.stdin(b"12345").await.unwrap();
    w.stdin(b"678").await.unwrap();
    w.close_stdin().await.unwrap();
    let mut seen = String::new();
    loop {
        match r.next().await.unwrap() {
            Some(InteractiveEvent::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(InteractiveEvent::Exit(st)) => {
                assert_eq!(st.code, Some(0));
                break;
            }
            Some(_) => {}
            None => panic!("ended"),
        }
    }
    assert_eq!(seen.trim(), "8");
}

/// Guards that a working directory the user cannot enter is named as such (it used to be
/// reported as "permission denied: pwd", as if the program could not be run).
#[tokio::test]
async fn an_unenterable_working_directory_is_named() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let mut req = cmd(&["sh", "-c", "mkdir -p /tmp/private && chmod 700 /tmp/private"]);
    req.user = Some("root".into());
    assert_eq!(d.exec(&id, req).await.2, 0);
    let mut req = cmd(&["pwd"]);
    req.cwd = Some("/tmp/private".into());
    let e = d.client.exec(&id, &req).await.unwrap_err();
    assert_eq!(e.code(), Some("permission_denied"), "{e}");
    assert!(e.to_string().contains("cannot enter working directory /tmp/private: permission denied"), "{e}");
}

/// Guards that closing a terminal's input after a line without a newline ends the input
/// (`printf hello | agentbox exec -i -t ID -- cat` used to hang: one end-of-file
/// character only hands the unfinished line to the program).
#[tokio::test]
async fn terminal_input_closed_after_an_unfinished_line_ends() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let mut req = cmd(&["cat"]);
    req.tty = Some(TtySize { rows: 24, cols: 80 });
    let (mut w, mut r) = d.client.exec_interactive(&id, &req).await.unwrap().split();
    w.stdin(b"hello").await.unwrap();
    w.close_stdin().await.unwrap();
    let mut seen = String::new();
    let exit = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match r.next().await.unwrap() {
                Some(InteractiveEvent::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
                Some(InteractiveEvent::Exit(st)) => return st,
                Some(_) => {}
                None => panic!("ended: {seen}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("cat did not see the end of its input: {seen:?}"));
    assert_eq!(exit.code, Some(0), "{seen}");
    assert!(seen.contains("hello"), "{seen}");
}

/// An exec whose sandbox is removed while its output streams ends with a conflict that
/// names the removal. Before, it ended with `agent_unavailable` ("the sandbox went away
/// before the process exited", or "broken exchange with the sandbox's agent"), which reads
/// like a fault of the daemon.
#[tokio::test]
async fn an_exec_cut_by_a_removal_says_so() {
    let d = Daemon::start().await;
    for round in 0..3 {
        let id = d.mini(Limits::default()).await;
        let mut s = d.client.exec(&id, &cmd(&["sh", "-c", "echo up; sleep 30"])).await.unwrap();
        loop {
            match s.next().await.unwrap() {
                Some(abx_client::OutputEvent::Stdout(_)) => break,
                Some(_) => continue,
                None => panic!("round {round}: the stream ended before any output"),
            }
        }
        d.client.delete_sandbox(&id, true).await.unwrap();
        let e = loop {
            match s.next().await {
                Ok(Some(abx_client::OutputEvent::Exit(st))) => panic!("round {round}: an exit ({st:?}), not an error"),
                Ok(Some(_)) => continue,
                Ok(None) => panic!("round {round}: the stream ended without an error"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code(), Some("conflict"), "round {round}: {e:?}");
        assert!(e.to_string().contains("was removed while the request ran"), "round {round}: {e}");
    }
}
