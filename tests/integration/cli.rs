//! The command-line client: docker-like habits, exit codes, copying files.

use crate::harness::Daemon;

fn text(o: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[tokio::test]
async fn run_streams_output_and_returns_the_exit_code() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let o = d.cli(&[
        "run",
        "-T",
        "mini",
        "--memory",
        "128M",
        "--pids",
        "100",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 42",
    ]);
    assert_eq!(o.status.code(), Some(42));
    assert_eq!(text(&o), ("out\n".into(), "err\n".into()));
    let o = d.cli(&["run", "-T", "mini", "--", "no-such-command"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(text(&o).1.contains("command not found: no-such-command"), "{:?}", text(&o));
    let o = d.cli(&["run", "-T", "mini", "--memory", "12X", "--", "true"]);
    assert_eq!(o.status.code(), Some(2), "bad flag values are usage errors");
    assert!(text(&o).1.contains("12X"));
    assert!(d.client.list_sandboxes().await.unwrap().is_empty(), "run destroys its sandbox");
}

#[tokio::test]
async fn create_exec_ls_inspect_rm() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let o = d.cli(&["create", "-T", "mini", "--name", "worker-1", "-e", "A=1", "--timeout", "10m"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let id = text(&o).0.trim().to_string();
    assert_eq!(id.len(), 12);
    let o = d.cli(&["exec", "worker-1", "-u", "root", "--", "sh", "-c", "echo $A $(id -u)"]);
    assert_eq!(text(&o).0, "1 0\n");
    // A command's timeout below a second (whole seconds only, before).
    let o = d.cli(&["exec", "--timeout", "300ms", "worker-1", "--", "sleep", "30"]);
    assert!(text(&o).1.contains("killed after its timeout"), "{:?}", text(&o));
    let o = d.cli(&["exec", "--timeout", "0ms", "worker-1", "--", "true"]);
    assert!(text(&o).1.contains("more than zero"), "{:?}", text(&o));
    assert_eq!(text(&d.cli(&["ls", "-q"])).0.trim(), id);
    assert!(text(&d.cli(&["ls"])).0.contains("worker-1"));
    let inspected: serde_json::Value = serde_json::from_str(&text(&d.cli(&["inspect", &id])).0).unwrap();
    assert_eq!(inspected[0]["name"], "worker-1");
    assert_eq!(inspected[0]["env"]["A"], "1");
    let o = d.cli(&["rm", &id]);
    assert!(!o.status.success(), "rm without -f refuses a running sandbox");
    assert!(text(&o).1.contains("rm -f"), "{:?}", text(&o));
    assert!(d.cli(&["rm", "-f", &id]).status.success());
    assert!(text(&d.cli(&["ls", "-q"])).0.trim().is_empty());
    let o = d.cli(&["exec", &id, "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains("not found"));
}

#[tokio::test]
async fn cp_copies_files_and_directories_both_ways() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let id = text(&d.cli(&["create", "-T", "mini"])).0.trim().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("nested")).unwrap();
    std::fs::write(src.join("nested/file.txt"), "content").unwrap();
    std::fs::write(tmp.path().join("single"), "one file").unwrap();
    let sandbox = |p: &str| format!("{id}:{p}");
    assert!(
        d.cli(&["cp", tmp.path().join("single").to_str().unwrap(), &sandbox("/home/user/single")]).status.success()
    );
    assert!(d.cli(&["cp", src.to_str().unwrap(), &sandbox("/home/user/tree")]).status.success());
    assert_eq!(d.sh(&id, "cat /home/user/single /home/user/tree/nested/file.txt").await.0, "one filecontent");
    let back = tmp.path().join("back");
    let o = d.cli(&["cp", &sandbox("/home/user/tree"), back.to_str().unwrap()]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(std::fs::read_to_string(back.join("nested/file.txt")).unwrap(), "content");
    assert!(
        d.cli(&["cp", &sandbox("/home/user/single"), tmp.path().join("single-back").to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(std::fs::read_to_string(tmp.path().join("single-back")).unwrap(), "one file");
    let o = d.cli(&["cp", "-u", "root", tmp.path().join("single").to_str().unwrap(), &sandbox("/etc/")]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(d.sh(&id, "cat /etc/single").await.0, "one file");
}

#[tokio::test]
async fn templates_and_system_from_the_cli() {
    let d = Daemon::start().await;
    assert!(d.cli(&["template", "build", "mini"]).status.success());
    let ls = text(&d.cli(&["template", "ls"])).0;
    assert!(ls.contains("mini"), "{ls}");
    let sys: serde_json::Value = serde_json::from_str(&text(&d.cli(&["system"])).0).unwrap();
    assert_eq!(sys["prefix"], d.prefix);
    let o = d.cli(&["template", "rm", "nosuch"]);
    // 125 (agentbox's own failure), as `snapshot rm`, `volume rm` and `rm` when a name
    // was not removed.
    assert_eq!(o.status.code(), Some(125));
    for args in [&["snapshot", "rm", "nosuch"][..], &["volume", "rm", "nosuch"], &["stop", "nosuch"], &["rm", "nosuch"]]
    {
        assert_eq!(d.cli(args).status.code(), Some(125), "{args:?}");
    }
    assert!(d.cli(&["template", "rm", "mini"]).status.success());
    assert!(!text(&d.cli(&["template", "ls"])).0.contains("mini"));
}

#[tokio::test]
async fn template_build_from_a_dockerfile_and_pools_from_the_cli() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("hello.txt"), "hello\n").unwrap();
    let df = ctx.path().join("Dockerfile");
    std::fs::write(&df, "FROM mini\nARG WHO=world\nCOPY hello.txt /srv/\nUSER 0\nRUN echo $WHO >> /srv/hello.txt\n")
        .unwrap();
    let ctx_s = ctx.path().display().to_string();
    let df_s = df.display().to_string();
    let o = d.cli(&["template", "build", "-f", &df_s, "--build-arg", "WHO=cli", &ctx_s, "clidf"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.starts_with("clidf ("), "{out}");
    assert!(err.contains("step 4/4: RUN echo $WHO >> /srv/hello.txt"), "steps are shown: {err}");
    let o = d.cli(&["run", "-T", "clidf", "--", "cat", "/srv/hello.txt"]);
    assert_eq!(text(&o).0, "hello\ncli\n");
    // Again: every step cached.
    let o = d.cli(&["template", "build", "-f", &df_s, "--build-arg", "WHO=cli", &ctx_s, "clidf"]);
    assert!(text(&o).1.contains("RUN echo $WHO >> /srv/hello.txt (cached)"), "{:?}", text(&o));
    // A Dockerfile error is reported with its line.
    std::fs::write(&df, "FROM mini\nCOPY --from=x a b\n").unwrap();
    let o = d.cli(&["template", "build", "-f", &df_s, "clidf"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("line 2"), "{:?}", text(&o));

    // Pools.
    let o = d.cli(&["pool", "set", "clidf", "--min", "1", "--max", "3"]);
    assert!(o.status.success(), "{:?}", text(&o));
    d.wait_for("the pool", std::time::Duration::from_secs(20), || async {
        d.client.pool("clidf").await.map(|p| p.ready == 1).unwrap_or(false)
    })
    .await;
    let o = d.cli(&["run", "-T", "clidf", "--", "cat", "/srv/hello.txt"]);
    assert_eq!(text(&o).0, "hello\ncli\n");
    let o = d.cli(&["pool", "ls"]);
    let out = text(&o).0;
    let row = out.lines().find(|l| l.starts_with("clidf")).unwrap_or_default().to_string();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..2], ["clidf", "1"], "{out}");
    assert_eq!(cols[5], "1", "one hit: {out}");
    let o = d.cli(&["pool", "set", "clidf", "--min", "4", "--max", "2"]);
    assert!(!o.status.success() && text(&o).1.contains("min"), "{:?}", text(&o));
    let o = d.cli(&["pool", "rm", "clidf"]);
    assert!(o.status.success());
    assert!(d.client.pools().await.unwrap().is_empty());
}

#[test]
fn a_reader_that_went_away_ends_the_client_quietly() {
    // `agentbox openapi | head -1` with the reader already gone: no panic, the status of a
    // command ended by SIGPIPE.
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    drop(reader);
    let o = std::process::Command::new(crate::harness::agentbox_bin())
        .arg("openapi")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(writer))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(141), "{:?}", text(&o));
    assert_eq!(text(&o).1, "", "nothing on stderr");
}

#[tokio::test]
async fn streamed_output_to_a_reader_that_went_away_ends_quietly() {
    // `agentbox exec ID -- cmd | head -1` and the same with `run`: the reader is gone
    // before the output arrives; the CLI ends with 141 and says nothing, and `run` still
    // leaves no sandbox behind.
    let d = Daemon::start().await;
    let id = d.mini(abx_client::Limits::default()).await;
    let closed_stdout = |args: &[&str]| {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        drop(reader);
        d.cli_command(args).stdout(std::process::Stdio::from(writer)).output().unwrap()
    };
    let o = closed_stdout(&["exec", &id, "--", "echo", "hi"]);
    assert_eq!((o.status.code(), text(&o).1), (Some(141), String::new()));
    let o = closed_stdout(&["run", "-T", "mini", "--", "echo", "hi"]);
    assert_eq!((o.status.code(), text(&o).1), (Some(141), String::new()));
    // The exec's own failures are still reported as such.
    let o = closed_stdout(&["exec", "no-such-sandbox", "--", "echo", "hi"]);
    assert_eq!(o.status.code(), Some(125), "{:?}", text(&o));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left: Vec<String> = d.client.list_sandboxes().await.unwrap().into_iter().map(|s| s.id).collect();
        if left == [id.clone()] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "run left a sandbox: {left:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `agentbox cp ID:/dir ./local` (the CLI runs as root) must not create setuid, setgid or
/// sticky files or directories on the host; the rwx bits stay, single files as
/// directories. Uploads keep their rwx bits in the sandbox.
#[tokio::test]
async fn cp_from_a_sandbox_drops_setuid_setgid_and_sticky_bits() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start().await;
    let id = d.mini(abx_client::Limits::default()).await;
    let (_, err, code) = d
        .sh(
            &id,
            "mkdir -p /home/user/out/sticky /home/user/out/sgid && cp /bin/busybox /home/user/out/tool \
             && chmod 6755 /home/user/out/tool && chmod 1777 /home/user/out/sticky && chmod 2750 /home/user/out/sgid",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let out = tmp.path().join("out");
    let o = d.cli(&["cp", &format!("{id}:/home/user/out"), out.to_str().unwrap()]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(mode(&out.join("tool")), 0o755);
    assert_eq!(mode(&out.join("sticky")), 0o777);
    assert_eq!(mode(&out.join("sgid")), 0o750);
    let single = tmp.path().join("tool");
    let o = d.cli(&["cp", &format!("{id}:/home/user/out/tool"), single.to_str().unwrap()]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(mode(&single), 0o755);
    // Into a sandbox the rwx bits are kept.
    std::fs::set_permissions(&single, std::fs::Permissions::from_mode(0o750)).unwrap();
    let o = d.cli(&["cp", single.to_str().unwrap(), &format!("{id}:/home/user/up")]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(d.sh(&id, "stat -c %a /home/user/up").await.0.trim(), "750");
}

/// `yes | agentbox exec -i ID -- grep -q y` and the like: a command that exits before
/// reading all its stdin gives its own exit code, not 125 for a write to a process that
/// is gone (neither the CLI nor the daemon may give up on the exchange before the exit
/// is forwarded); `exec -t` with stdin already at its end too.
#[tokio::test]
async fn exec_interactive_gives_the_exit_code_of_a_command_that_leaves_stdin_unread() {
    use std::io::Write;
    let d = Daemon::start().await;
    let id = d.mini(abx_client::Limits::default()).await;
    // Endless input, like `yes`: written until the reader goes away.
    let endless = |args: &[&str]| {
        let mut child = d
            .cli_command(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || while stdin.write_all(&[b'y', b'\n'].repeat(4096)).is_ok() {});
        let o = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        o
    };
    for round in 0..5 {
        let o = endless(&["exec", "-i", &id, "--", "grep", "-q", "y"]);
        assert_eq!(o.status.code(), Some(0), "round {round}: {:?}", text(&o));
        let o = endless(&["exec", "-i", &id, "--", "sh", "-c", "head -c 10 >/dev/null; exit 7"]);
        assert_eq!(o.status.code(), Some(7), "round {round}: {:?}", text(&o));
        let o = endless(&["exec", "-i", &id, "--", "head", "-c", "10"]);
        assert_eq!((o.status.code(), o.stdout.len()), (Some(0), 10), "round {round}: {:?}", text(&o));
        let o = d.cli(&["exec", "-t", &id, "--", "sh", "-c", "exit 42"]);
        assert_eq!(o.status.code(), Some(42), "round {round}: {:?}", text(&o));
    }
}

/// `agentbox exec -i ID -- cat < 64 MB`: input and output flow at once. The CLI used to
/// wait for each send of input before reading output again; a command that echoes its
/// input filled every buffer on the way back (agent, daemon, socket), nobody read, and the
/// exchange stood still for good after a few MB (a pause in the middle did the same with
/// less).
#[tokio::test]
async fn exec_interactive_moves_large_input_and_output_at_once() {
    let d = Daemon::start().await;
    let id = d.mini(abx_client::Limits::default()).await;
    let input: Vec<u8> = (0..64_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &input).unwrap();
    let child = d
        .cli_command(&["exec", "-i", &id, "--", "cat"])
        .stdin(std::fs::File::open(file.path()).unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !waiter.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if !waiter.is_finished() {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::KILL,
        );
    }
    let o = waiter.join().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "stuck or failed: {} of {} bytes back; {:?}",
        o.stdout.len(),
        input.len(),
        text(&o).1
    );
    assert!(o.stdout == input, "the output differs from the input ({} of {} bytes)", o.stdout.len(), input.len());
}

/// `agentbox cp` errors name what is wrong: a host destination directory that does not
/// exist (not "Is a directory"), a sandbox path that is not absolute (not "one side must
/// be in a sandbox"). A symlink given as the source in a sandbox is followed and copied
/// under its own name (not "neither a file nor a directory"); links inside a copied
/// directory stay links.
#[tokio::test]
async fn cp_names_bad_paths_and_follows_a_symlink_given_as_the_source() {
    let d = Daemon::start().await;
    let id = d.mini(abx_client::Limits::default()).await;
    let (_, err, code) = d
        .sh(
            &id,
            "mkdir -p /home/user/d/real && echo hi > /home/user/d/real/f && ln -s real /home/user/d/link \
             && echo x > /home/user/d/file && ln -s /home/user/d/file /home/user/d/flink",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let at = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let o = d.cli(&["cp", &format!("{id}:/home/user/d/file"), &format!("{}/", at("nonexistdir"))]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains(&format!("directory {}/ does not exist", at("nonexistdir"))), "{:?}", text(&o));
    let o = d.cli(&["cp", &format!("{id}:/home/user/d/file"), &at("nonexistdir/file")]);
    assert!(text(&o).1.contains(&format!("directory {} does not exist", at("nonexistdir"))), "{:?}", text(&o));
    std::fs::write(at("f.txt"), "up").unwrap();
    let o = d.cli(&["cp", &at("f.txt"), &format!("{id}:relative")]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains(&format!("'{id}:relative': the path in sandbox {id} must be absolute")),
        "{:?}",
        text(&o)
    );
    // Links named as the source: to a directory, to a file into a directory.
    let o = d.cli(&["cp", &format!("{id}:/home/user/d/link"), &at("x")]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(std::fs::read_to_string(at("x/f")).unwrap(), "hi\n");
    let o = d.cli(&["cp", &format!("{id}:/home/user/d/flink"), &format!("{}/", tmp.path().display())]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(std::fs::symlink_metadata(at("flink")).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(at("flink")).unwrap(), "x\n");
    let o = d.cli(&["cp", &format!("{id}:/home/user/d"), &at("whole")]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(std::fs::read_link(at("whole/link")).unwrap(), std::path::Path::new("real"));
    assert!(!tmp.path().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".agentbox")));
}

/// The highest resident set (VmHWM, kB) of a running `agentbox` command, sampled until
/// it exits (the last sample comes close to its peak, which only grows).
fn peak_rss_kb(mut cmd: std::process::Command) -> (std::process::Output, u64) {
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let status = std::fs::read_to_string(&status_path).unwrap_or_default();
                if let Some(kb) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak = peak.max(kb);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, sampler.join().unwrap())
}

/// `agentbox cp` streams: copying a 200 MB file or a directory holding one, either way,
/// keeps the CLI's memory far below the file's size (it used to hold it whole).
#[tokio::test]
async fn cp_streams_large_files_without_holding_them_in_memory() {
    const SIZE: u64 = 200 << 20;
    const LIMIT_KB: u64 = 80 << 10;
    let d = Daemon::start().await;
    let id = d.mini(abx_client::Limits::default()).await;
    let (_, err, code) =
        d.sh(&id, &format!("mkdir /home/user/bigdir && head -c {SIZE} /dev/zero > /home/user/bigdir/big")).await;
    assert_eq!(code, 0, "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let at = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let size = |p: &str| std::fs::metadata(at(p)).unwrap().len();
    let check = |args: &[&str]| {
        let (o, kb) = peak_rss_kb(d.cli_command(args));
        assert!(o.status.success(), "{args:?}: {:?}", text(&o));
        assert!(kb > 0 && kb < LIMIT_KB, "{args:?}: peak RSS {kb} kB");
    };
    check(&["cp", &format!("{id}:/home/user/bigdir/big"), &at("big")]);
    assert_eq!(size("big"), SIZE);
    std::fs::remove_file(at("big")).unwrap();
    check(&["cp", &format!("{id}:/home/user/bigdir"), &at("bigdir")]);
    assert_eq!(size("bigdir/big"), SIZE);
    let (_, err, code) = d.sh(&id, "rm -r /home/user/bigdir").await;
    assert_eq!(code, 0, "{err}");
    check(&["cp", &at("bigdir/big"), &format!("{id}:/home/user/up")]);
    check(&["cp", &at("bigdir"), &format!("{id}:/home/user/updir")]);
    assert_eq!(d.sh(&id, "stat -c %s /home/user/up /home/user/updir/big").await.0, format!("{SIZE}\n{SIZE}\n"));
}
