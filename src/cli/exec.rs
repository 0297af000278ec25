//! `run`, `create`, `exec`, `shell`.

use std::io::Write;

use abx_client::{Client, CreateSandbox, ExecRequest, InteractiveEvent, Limits, OutputEvent, TtySize};
use anyhow::Context;
use clap::Args;

use super::{CreateArgs, parse, template};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Name the sandbox.
    #[arg(long)]
    name: Option<String>,
    /// Keep stdin open.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Allocate a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep the sandbox after the command ends (prints its id on stderr).
    #[arg(long)]
    keep: bool,
    /// Command and arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CreateOnlyArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Name the sandbox.
    #[arg(long)]
    name: Option<String>,
    /// Make the create safe to repeat: while the sandbox a create with this key made
    /// exists, the same create answers it instead of making another. Without it, a
    /// random key is used, so that a create retried after the daemon went away mid-way
    /// (a restart) never makes two.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox id or name.
    id: String,
    /// Keep stdin open.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Allocate a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Environment variable (repeatable).
    #[arg(long, short = 'e', value_parser = parse::key_value)]
    env: Vec<(String, String)>,
    /// Working directory.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// User (name, uid or uid:gid).
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Kill the command after this long (e.g. 30s, 300ms, 1.5s, 10m).
    #[arg(long, value_parser = parse::exec_timeout)]
    timeout: Option<f64>,
    /// Start in the background and print the pid.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Command and arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox id or name.
    id: String,
    /// User (name, uid or uid:gid).
    #[arg(long, short = 'u')]
    user: Option<String>,
}

fn create_request(a: &CreateArgs, name: Option<String>) -> CreateSandbox {
    CreateSandbox {
        template: if a.snapshot.is_some() { None } else { Some(a.template.clone()) },
        name,
        limits: Limits { memory_bytes: a.memory, cpus: a.cpus, pids: a.pids, open_files: a.nofile },
        timeout_secs: a.timeout,
        env: a.env.iter().cloned().collect(),
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        metadata: a.label.iter().cloned().collect(),
        network: a.net.policy(),
        snapshot: a.snapshot.clone(),
        persist: a.persist,
        on_timeout: a.on_timeout,
        volumes: a.volumes.clone(),
        ingress: a.ingress,
        idempotency_key: None,
    }
}

/// Creates a sandbox; an embedded template that is not built yet is built first, with
/// progress shown.
///
/// Sent again while the daemon restarts ([`Client::create_sandbox_retried`]).
async fn create_sandbox(client: &Client, req: &CreateSandbox) -> anyhow::Result<abx_client::Sandbox> {
    let told = |e: &abx_client::Error| {
        eprintln!("the daemon did not answer the create ({e}); sending it again with the same idempotency key")
    };
    match client.create_sandbox_retried(req, told).await {
        Err(e) if is_missing_template(&e) => {
            build_missing_template(client, req).await?;
            Ok(client.create_sandbox_retried(req, told).await?)
        }
        r => Ok(r?),
    }
}

/// `--net-test` right after a create: whether the policy holds. A sandbox whose policy does
/// not hold, or could not be tested (then the error is returned), is destroyed first unless
/// `keep`.
async fn net_test_or_destroy(client: &Client, id: &str, keep: bool) -> anyhow::Result<bool> {
    let held = super::net::test_after_create(client, id).await;
    if matches!(held, Ok(true)) {
        return Ok(true);
    }
    if !keep {
        client.delete_sandbox(id, true).await.with_context(|| format!("destroy sandbox {id}"))?;
    }
    held
}

pub async fn create(client: &Client, a: CreateOnlyArgs) -> anyhow::Result<i32> {
    let req = CreateSandbox { idempotency_key: a.idempotency_key, ..create_request(&a.create, a.name) };
    let sb = create_sandbox(client, &req).await?;
    if a.create.net_test && !net_test_or_destroy(client, &sb.id, false).await? {
        eprintln!("sandbox {} destroyed", sb.id);
        return Ok(super::EXIT_ERROR);
    }
    println!("{}", sb.id);
    Ok(0)
}

pub async fn run(client: &Client, a: RunArgs) -> anyhow::Result<i32> {
    if !(a.interactive || a.tty || a.keep || a.create.net_test) {
        return run_once(client, a).await;
    }
    let sb = create_sandbox(client, &create_request(&a.create, a.name.clone())).await?;
    if a.keep {
        eprintln!("{}", sb.id);
    }
    if a.create.net_test && !net_test_or_destroy(client, &sb.id, a.keep).await? {
        return Ok(super::EXIT_ERROR);
    }
    let req = ExecRequest { cmd: a.cmd.clone(), ..Default::default() };
    let result = tokio::select! {
        r = exec_request(client, &sb.id, req, a.interactive, a.tty) => r,
        _ = tokio::signal::ctrl_c() => Ok(130),
    };
    if !a.keep {
        client.delete_sandbox(&sb.id, true).await.with_context(|| format!("destroy sandbox {}", sb.id))?;
    }
    result
}

/// `run` without a terminal: one request that creates, runs and destroys.
async fn run_once(client: &Client, a: RunArgs) -> anyhow::Result<i32> {
    let req = abx_client::RunRequest {
        sandbox: create_request(&a.create, a.name.clone()),
        exec: ExecRequest { cmd: a.cmd.clone(), ..Default::default() },
    };
    let result = match client.run_once(&req).await {
        Err(e) if is_missing_template(&e) => {
            build_missing_template(client, &req.sandbox).await?;
            client.run_once(&req).await
        }
        r => r,
    };
    let stream = result.map_err(anyhow::Error::from);
    match stream {
        Ok(stream) => tokio::select! {
            r = print_stream(stream) => r,
            _ = tokio::signal::ctrl_c() => Ok(130),
        },
        Err(e) => exit_code_for(e),
    }
}

fn is_missing_template(e: &abx_client::Error) -> bool {
    e.code() == Some("not_found") && e.to_string().starts_with("template")
}

async fn build_missing_template(client: &Client, req: &CreateSandbox) -> anyhow::Result<()> {
    let name = req.template.clone().unwrap_or_else(|| "base".into());
    if !matches!(name.as_str(), "base" | "mini") {
        anyhow::bail!("template '{name}' not found; build it first: agentbox template build {name}");
    }
    eprintln!("template '{name}' is not built yet; building it now (once)");
    template::build(client, &name, None).await?;
    Ok(())
}

pub async fn exec(client: &Client, a: ExecArgs) -> anyhow::Result<i32> {
    let req = ExecRequest {
        cmd: a.cmd,
        env: a.env.into_iter().collect(),
        cwd: a.workdir,
        user: a.user,
        timeout_secs: a.timeout,
        ..Default::default()
    };
    if a.detach {
        let pid = client.exec_background(&a.id, &req).await?;
        println!("{pid}");
        return Ok(0);
    }
    exec_request(client, &a.id, req, a.interactive, a.tty).await
}

pub async fn shell(client: &Client, a: ShellArgs) -> anyhow::Result<i32> {
    let script = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";
    let req =
        ExecRequest { cmd: vec!["/bin/sh".into(), "-c".into(), script.into()], user: a.user, ..Default::default() };
    exec_request(client, &a.id, req, true, true).await
}

/// Runs `req` in sandbox `id`, streaming output; returns the command's exit code
/// (127 when it does not exist, 126 when it cannot be executed).
async fn exec_request(
    client: &Client,
    id: &str,
    mut req: ExecRequest,
    interactive: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    let result = if interactive || tty {
        if tty {
            req.tty = Some(terminal_size());
        }
        interactive_exec(client, id, req, tty).await
    } else {
        streamed_exec(client, id, req).await
    };
    result.or_else(exit_code_for)
}

/// Exit codes a shell would give for a command that could not start (127 not found, 126
/// not executable); other errors stay errors.
fn exit_code_for(e: anyhow::Error) -> anyhow::Result<i32> {
    match e.downcast_ref::<abx_client::Error>().and_then(|c| c.code()) {
        Some("command_not_found") => {
            eprintln!("agentbox: {e}");
            Ok(127)
        }
        Some("permission_denied") => {
            eprintln!("agentbox: {e}");
            Ok(126)
        }
        _ => Err(e),
    }
}

async fn streamed_exec(client: &Client, id: &str, req: ExecRequest) -> anyhow::Result<i32> {
    print_stream(client.exec(id, &req).await?).await
}

/// Copies a process's output to ours; returns its exit code once the stream ends.
async fn print_stream(mut stream: abx_client::ExecStream) -> anyhow::Result<i32> {
    let mut code = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(ev) = stream.next().await? {
        match ev {
            OutputEvent::Created(_) | OutputEvent::Started(_) => {}
            OutputEvent::Stdout(d) => copy_out(&mut stdout, &d)?,
            OutputEvent::Stderr(d) => copy_out(&mut stderr, &d)?,
            OutputEvent::Exit(st) => code = Some(exit_code(&st)),
        }
    }
    code.ok_or_else(|| anyhow::anyhow!("the output stream ended before the command exited"))
}

/// Writes a chunk of the command's output to ours. A reader that went away
/// (`agentbox exec ID -- cmd | head -1`) is [`super::ReaderGone`], which ends the CLI
/// quietly with 141 like the other commands, not as an agentbox failure.
fn copy_out(w: &mut impl Write, d: &[u8]) -> anyhow::Result<()> {
    match w.write_all(d).and_then(|()| w.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(super::ReaderGone.into()),
        r => Ok(r?),
    }
}

fn exit_code(st: &abx_client::ExitStatus) -> i32 {
    if st.timed_out {
        eprintln!("agentbox: command killed after its timeout");
    }
    st.shell_code()
}

fn terminal_size() -> TtySize {
    match rustix::termios::tcgetwinsize(std::io::stdout()) {
        Ok(ws) if ws.ws_row > 0 => TtySize { rows: ws.ws_row, cols: ws.ws_col },
        _ => TtySize { rows: 24, cols: 80 },
    }
}

/// Puts the local terminal in raw mode until dropped.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter(enable: bool) -> RawMode {
        if !enable || !rustix::termios::isatty(std::io::stdin()) {
            return RawMode(None);
        }
        let Ok(orig) = rustix::termios::tcgetattr(std::io::stdin()) else { return RawMode(None) };
        let mut raw = orig.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &raw);
        RawMode(Some(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, orig);
        }
    }
}

async fn interactive_exec(client: &Client, id: &str, req: ExecRequest, tty: bool) -> anyhow::Result<i32> {
    use tokio::signal::unix::{SignalKind, signal};
    let session = client.exec_interactive(id, &req).await?;
    let (writer, mut reader) = session.split();
    let _raw = RawMode::enter(tty);
    // Input goes out from a task of its own, so that the output is always read: a loop
    // that waited for a send while the command's output filled every buffer on the way
    // back (which a command that echoes its input does under a pause) never woke again.
    let (resizes, resize_rx) = tokio::sync::mpsc::unbounded_channel();
    let input = tokio::spawn(send_input(writer, resize_rx));
    let _stop_input = AbortOnDrop(input);
    let mut winch = signal(SignalKind::window_change()).ok();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            ev = reader.next() => match ev? {
                Some(InteractiveEvent::Stdout(d)) => copy_out(&mut stdout, &d)?,
                Some(InteractiveEvent::Stderr(d)) => copy_out(&mut stderr, &d)?,
                Some(InteractiveEvent::Exit(st)) => return Ok(exit_code(&st)),
                None => anyhow::bail!("the connection ended before the command exited"),
            },
            _ = async { match winch.as_mut() { Some(w) => { w.recv().await; } None => std::future::pending().await } } => {
                if tty { let _ = resizes.send(terminal_size()); }
            }
        }
    }
}

/// Sends this process's stdin, then its end, and terminal sizes as they come. Like a local
/// pipe: input the command can no longer take (it exited, or the connection is closing
/// after its exit) is dropped, and the exit code still comes from the Exit event; a
/// connection really lost shows up on the reader.
async fn send_input(
    mut writer: abx_client::InteractiveWriter,
    mut resizes: tokio::sync::mpsc::UnboundedReceiver<abx_client::TtySize>,
) {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => {
                let sent = match n {
                    Ok(0) | Err(_) => { stdin_open = false; writer.close_stdin().await }
                    Ok(n) => writer.stdin(&buf[..n]).await,
                };
                if sent.is_err() {
                    stdin_open = false;
                }
            },
            size = resizes.recv() => match size {
                Some(size) => { let _ = writer.resize(size).await; }
                None => return,
            },
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
