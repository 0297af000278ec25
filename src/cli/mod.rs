//! Command-line definitions and dispatch. Each subcommand lives in its own module and
//! returns the process exit code.

mod cp;
mod daemon;
mod exec;
mod manage;
mod mcp;
mod net;
mod parse;
mod snap;
pub mod spawner;
mod template;

use clap::{Args, Parser, Subcommand};

/// Exit code for failures of agentbox itself (as docker uses).
pub const EXIT_ERROR: i32 = 125;
/// Exit code of a client command whose stdout reader went away: what a shell reports for a
/// command ended by `SIGPIPE` (128 + 13).
pub const EXIT_BROKEN_PIPE: i32 = 141;

/// The reader of a command's streamed output went away (a closed pipe): the CLI ends with
/// [`EXIT_BROKEN_PIPE`] and prints nothing.
#[derive(Debug)]
pub struct ReaderGone;

impl std::fmt::Display for ReaderGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the reader of the output went away")
    }
}

impl std::error::Error for ReaderGone {}

#[derive(Debug, Parser)]
#[command(name = "agentbox", version, about = "Isolated, disposable, instant Linux sandboxes for AI agents")]
pub struct Cli {
    /// Daemon address: unix:/path/to/socket or http://host:port.
    #[arg(long, global = true, env = "AGENTBOX_HOST")]
    pub host: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Daemon(daemon::DaemonArgs),
    /// Create a sandbox, run a command in it, stream its output, destroy it.
    Run(exec::RunArgs),
    /// Create a sandbox and print its id.
    Create(exec::CreateOnlyArgs),
    /// Run a command in a sandbox.
    Exec(exec::ExecArgs),
    /// Open an interactive shell in a sandbox.
    Shell(exec::ShellArgs),
    /// List sandboxes.
    #[command(alias = "ps-sandboxes")]
    Ls(manage::LsArgs),
    /// Show sandboxes as JSON.
    Inspect(manage::InspectArgs),
    /// Destroy sandboxes.
    Rm(manage::RmArgs),
    /// Copy files between the host and sandboxes (ID:/path on either side).
    Cp(cp::CpArgs),
    /// Show resource usage of a sandbox.
    Stats(manage::IdArg),
    /// Show what a sandbox added (A), changed (C) and deleted (D) since its template (or a snapshot).
    Diff(manage::DiffArgs),
    /// Snapshot a sandbox's files (prints the snapshot id); `snapshot ls`, `snapshot rm`.
    Snapshot(snap::SnapshotArgs),
    /// New sandboxes from a sandbox or a snapshot (prints their ids).
    Fork(snap::ForkArgs),
    /// Return a sandbox's files to a snapshot (its processes restart, its id stays).
    Rollback(snap::RollbackArgs),
    /// End a sandbox's processes (SIGTERM, then SIGKILL after --time) and keep its files.
    Stop(snap::StopArgs),
    /// Boot a stopped sandbox again.
    Start(snap::StartArgs),
    /// Named volumes that outlive sandboxes.
    #[command(subcommand)]
    Volume(snap::VolumeCmd),
    /// Warm pools: sandboxes of a template kept ready so that a create is a claim.
    #[command(subcommand)]
    Pool(snap::PoolCmd),
    /// API keys for TCP listeners (`--listen tcp:ADDR`) and the e2b SDK.
    #[command(subcommand)]
    Key(snap::KeyCmd),
    /// Freeze every process of a sandbox, keeping its memory (any request resumes it).
    Pause(manage::IdArg),
    /// Thaw a paused sandbox.
    Resume(manage::IdArg),
    /// Change a sandbox's timeout (e.g. 30m; 0 removes it).
    Timeout(manage::TimeoutArgs),
    /// List processes started in a sandbox.
    Ps(manage::IdArg),
    /// Send a signal to a process in a sandbox.
    Kill(manage::KillArgs),
    /// Manage templates.
    #[command(subcommand)]
    Template(template::TemplateCmd),
    /// A sandbox's network: change its egress policy, read its audit log, test it.
    #[command(subcommand)]
    Net(net::NetCmd),
    /// Print the URL where the ingress proxy serves a port of a sandbox.
    Port(net::PortArgs),
    /// Show facts about the daemon.
    System,
    /// Serve MCP on stdin/stdout: sandbox tools for AI agents (see docs/mcp.md).
    Mcp(mcp::McpArgs),
    /// Print the API's OpenAPI document (what docs/openapi.json holds).
    #[command(hide = true)]
    Openapi,
}

/// Options shared by `run` and `create`.
#[derive(Debug, Args, Clone)]
pub struct CreateArgs {
    /// Template to start from.
    #[arg(long, short = 'T', default_value = "base")]
    pub template: String,
    /// Memory limit, e.g. 256M or 1G.
    #[arg(long, short = 'm', value_parser = parse::size)]
    pub memory: Option<u64>,
    /// CPU limit in cores, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long)]
    pub pids: Option<u64>,
    /// Maximum open files per process.
    #[arg(long)]
    pub nofile: Option<u64>,
    /// Destroy the sandbox after this long, e.g. 10m (0: never).
    #[arg(long, value_parser = parse::duration)]
    pub timeout: Option<u64>,
    /// Environment variable for every process (repeatable).
    #[arg(long, short = 'e', value_parser = parse::key_value)]
    pub env: Vec<(String, String)>,
    /// Default working directory.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Default user (name, uid or uid:gid).
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Metadata label (repeatable).
    #[arg(long, value_parser = parse::key_value)]
    pub label: Vec<(String, String)>,
    #[command(flatten)]
    pub net: net::PolicyArgs,
    /// Start from this snapshot's files instead of the template's (id or name).
    #[arg(long, conflicts_with = "template")]
    pub snapshot: Option<String>,
    /// Keep the environment until removed (no default timeout; synced to disk; survives
    /// a host reboot as a stopped sandbox).
    #[arg(long)]
    pub persist: bool,
    /// What the timeout does: destroy, snapshot (then destroy) or stop.
    #[arg(long, value_parser = parse_timeout_action)]
    pub on_timeout: Option<abx_client::TimeoutAction>,
    /// Mount a volume: NAME:/path or NAME:/path:ro (repeatable).
    #[arg(long = "volume", short = 'v', value_parser = snap::volume_mount)]
    pub volumes: Vec<abx_client::VolumeMount>,
    /// After creating, probe the network policy from inside and fail if it does not hold.
    #[arg(long)]
    pub net_test: bool,
    /// Who may reach the sandbox's ports through the ingress proxy: public, or token
    /// (requests need the sandbox's token; `agentbox port` prints it). Default: the
    /// daemon's --ingress-access.
    #[arg(long)]
    pub ingress: Option<abx_client::IngressAccess>,
}

fn parse_timeout_action(s: &str) -> Result<abx_client::TimeoutAction, String> {
    match s {
        "destroy" => Ok(abx_client::TimeoutAction::Destroy),
        "snapshot" => Ok(abx_client::TimeoutAction::Snapshot),
        "stop" => Ok(abx_client::TimeoutAction::Stop),
        o => Err(format!("'{o}': use destroy, snapshot or stop")),
    }
}

pub fn run(cli: Cli) -> i32 {
    // The daemon gets a multi-threaded runtime; a client command needs one thread.
    let rt = match &cli.command {
        Command::Daemon(_) => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentbox: cannot start the async runtime: {e}");
            return EXIT_ERROR;
        }
    };
    let host = cli.host.clone();
    let result = rt.block_on(async move {
        match cli.command {
            Command::Daemon(a) => daemon::main(a).await,
            Command::Run(a) => exec::run(&client(host)?, a).await,
            Command::Create(a) => exec::create(&client(host)?, a).await,
            Command::Exec(a) => exec::exec(&client(host)?, a).await,
            Command::Shell(a) => exec::shell(&client(host)?, a).await,
            Command::Ls(a) => manage::ls(&client(host)?, a).await,
            Command::Inspect(a) => manage::inspect(&client(host)?, a).await,
            Command::Rm(a) => manage::rm(&client(host)?, a).await,
            Command::Cp(a) => cp::cp(&client(host)?, a).await,
            Command::Stats(a) => manage::stats(&client(host)?, a).await,
            Command::Timeout(a) => manage::timeout(&client(host)?, a).await,
            Command::Diff(a) => manage::diff(&client(host)?, a).await,
            Command::Snapshot(a) => snap::snapshot(&client(host)?, a).await,
            Command::Fork(a) => snap::fork(&client(host)?, a).await,
            Command::Rollback(a) => snap::rollback(&client(host)?, a).await,
            Command::Stop(a) => snap::stop(&client(host)?, a).await,
            Command::Start(a) => snap::start(&client(host)?, a).await,
            Command::Volume(c) => snap::volume(&client(host)?, c).await,
            Command::Pool(c) => snap::pool(&client(host)?, c).await,
            Command::Key(c) => snap::key(&client(host)?, c).await,
            Command::Pause(a) => manage::pause(&client(host)?, a, true).await,
            Command::Resume(a) => manage::pause(&client(host)?, a, false).await,
            Command::Ps(a) => manage::ps(&client(host)?, a).await,
            Command::Kill(a) => manage::kill(&client(host)?, a).await,
            Command::Template(c) => template::main(&client(host)?, c).await,
            Command::Net(c) => net::main(&client(host)?, c).await,
            Command::Port(a) => net::port(&client(host)?, a).await,
            Command::System => manage::system(&client(host)?).await,
            Command::Mcp(a) => mcp::main(client(host)?, a).await,
            Command::Openapi => {
                println!("{}", serde_json::to_string_pretty(&abx_daemon::api::openapi())?);
                Ok(0)
            }
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(e) if e.is::<ReaderGone>() => EXIT_BROKEN_PIPE,
        Err(e) => {
            eprintln!("agentbox: {}", error_chain(&e));
            EXIT_ERROR
        }
    };
    // Nothing is left to wait for: skip tearing the runtime down.
    std::mem::forget(rt);
    code
}

fn client(host: Option<String>) -> anyhow::Result<abx_client::Client> {
    let c = match host {
        Some(h) => abx_client::Client::new(&h)?,
        None => abx_client::Client::from_env()?,
    };
    Ok(match std::env::var("AGENTBOX_API_KEY") {
        Ok(k) => c.with_api_key(k),
        Err(_) => c,
    })
}

/// "what failed: why: root cause", without repeating a cause already in the message.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}
