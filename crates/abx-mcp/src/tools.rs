//! The tools and their parameters.

use std::collections::BTreeMap;

use abx_client::{
    Client, CreateSandbox, ExecRequest, FileInfo, ForkRequest, Limits, NetMode, NetworkPolicy, OutputEvent, Sandbox,
};
use base64::Engine;
use futures_util::StreamExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::output::{Capture, encode_content};

/// Default and largest output a tool returns, per stream or file.
const MAX_OUTPUT: usize = 1 << 20;
/// Default command timeout: a command that hangs must not hang the agent.
const DEFAULT_TIMEOUT_SECS: f64 = 300.0;
/// Most entries `list_files` returns.
const MAX_ENTRIES: usize = 5000;

const INSTRUCTIONS: &str = "agentbox sandboxes: isolated, disposable Linux environments. \
Create one with create_sandbox (keep its id), run shell commands in it with run_command, \
move files with write_file / read_file / list_files. snapshot saves its files; rollback \
returns to a snapshot; fork makes copies to try alternatives in parallel; diff shows what \
changed. destroy_sandbox when done. Sandboxes have no network unless created with one.";

/// The MCP server: one agentbox client and the tools.
#[derive(Debug, Clone)]
pub struct AgentboxMcp {
    client: Client,
    tool_router: ToolRouter<Self>,
}

impl AgentboxMcp {
    pub fn new(client: Client) -> AgentboxMcp {
        AgentboxMcp { client, tool_router: Self::tool_router() }
    }

    /// The client, acting as `user` for file operations when given.
    fn files_as(&self, user: &Option<String>) -> Client {
        match user {
            Some(u) => self.client.with_file_user(u),
            None => self.client.clone(),
        }
    }
}

// --- parameters ---

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct CreateParams {
    /// Template to start from (default "base"). Ignored when `snapshot` is given.
    #[serde(default)]
    pub template: Option<String>,
    /// Start from this snapshot's files instead (snapshot id or name).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Unique name, usable instead of the id (letters, digits, '-', '_', '.').
    #[serde(default)]
    pub name: Option<String>,
    /// Destroy the sandbox after this many seconds (0: never). Default: the daemon's.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Environment variables for every process in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default working directory of commands.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Default user of commands and file operations (name, uid or uid:gid).
    #[serde(default)]
    pub user: Option<String>,
    /// Memory limit in MiB.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// CPU limit in cores, e.g. 0.5 or 2.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Egress: "none" (the default: no network), "public" (the internet, not private
    /// ranges) or "allow" (only `network_allow`). Giving `network_allow` alone means "allow".
    #[serde(default)]
    pub network: Option<String>,
    /// Destinations the sandbox may reach: domains ("github.com", "*.pypi.org"),
    /// addresses or CIDRs, each with optional ports ("github.com:443").
    #[serde(default)]
    pub network_allow: Vec<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct RunParams {
    /// Sandbox id or name.
    pub sandbox: String,
    /// A shell command line, run with `sh -c`. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// Program and arguments, run without a shell. Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory (default: the sandbox's).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// User to run as (default: the sandbox's).
    #[serde(default)]
    pub user: Option<String>,
    /// Text given to the command's standard input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill the command after this many seconds (default 300).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// Most bytes of stdout and of stderr returned (default and maximum 1048576); past
    /// it the first and last halves are kept.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct ReadParams {
    /// Sandbox id or name.
    pub sandbox: String,
    /// Absolute path (or relative to the sandbox's working directory).
    pub path: String,
    /// Return the content as base64 even when it is text.
    #[serde(default)]
    pub base64: bool,
    /// Most bytes returned (default and maximum 1048576).
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// Read as this user (default: the sandbox's).
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct WriteParams {
    /// Sandbox id or name.
    pub sandbox: String,
    /// Absolute path; missing parent directories are created.
    pub path: String,
    /// The new content (replaces the file's).
    pub content: String,
    /// "utf-8" (default) or "base64" (for binary content).
    #[serde(default)]
    pub encoding: Option<String>,
    /// Permission bits in octal, e.g. "755".
    #[serde(default)]
    pub mode: Option<String>,
    /// Write as this user, who then owns a new file (default: the sandbox's).
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct ListParams {
    /// Sandbox id or name.
    pub sandbox: String,
    /// Directory to list.
    pub path: String,
    /// How many levels to descend (default 1: the directory's entries).
    #[serde(default)]
    pub depth: Option<u32>,
    /// List as this user (default: the sandbox's).
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct SandboxParam {
    /// Sandbox id or name.
    pub sandbox: String,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct SnapshotParams {
    /// Sandbox id or name.
    pub sandbox: String,
    /// Name for the snapshot (unique), usable instead of its id.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct ListSnapshotsParams {
    /// Only the snapshots of this sandbox (id or name).
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct ForkParams {
    /// Sandbox to copy as it is now (id or name). Give this or `snapshot`.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Snapshot to start the copies from (id or name). Give this or `sandbox`.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// How many sandboxes to make (1 to 100, default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Timeout of the new sandboxes in seconds (default: the source's).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct RollbackParams {
    /// Sandbox id or name.
    pub sandbox: String,
    /// Snapshot id or name to return to.
    pub snapshot: String,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct DiffParams {
    /// Sandbox id or name.
    pub sandbox: String,
    /// Compare with this snapshot (id or name) instead of the sandbox's template.
    #[serde(default)]
    pub since: Option<String>,
}

// --- results ---

/// A successful result: the value as JSON text, and as structured content.
fn ok(value: Value) -> CallToolResult {
    CallToolResult::structured(value)
}

/// A tool error the agent sees: `isError` with the message.
fn fail(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

/// An agentbox error as a tool error: its message and causes, and the API's code.
fn api_fail(e: abx_client::Error) -> CallToolResult {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    if let Some(code) = e.code() {
        msg = format!("{msg} [{code}]");
    }
    fail(msg)
}

/// Unwraps a client result or returns it as a tool error.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return api_fail(e),
        }
    };
}

/// The facts about a sandbox an agent uses (not host details such as uids and pids).
fn summary(sb: &Sandbox) -> Value {
    let mut v = json!({
        "id": sb.id,
        "name": sb.name,
        "template": sb.template,
        "state": sb.state,
        "created_at": sb.created_at,
        "expires_at": sb.expires_at,
        "user": sb.user,
        "workdir": sb.workdir,
        "limits": sb.limits,
        "network": sb.network,
    });
    if let Some(s) = &sb.snapshot {
        v["snapshot"] = json!(s);
    }
    v
}

fn file_entry(f: &FileInfo) -> Value {
    let mut v = json!({
        "path": f.path,
        "kind": f.kind,
        "size": f.size,
        "mode": format!("{:o}", f.mode),
        "mtime_ms": f.mtime_ms,
    });
    if let Some(t) = &f.symlink_target {
        v["symlink_target"] = json!(t);
    }
    v
}

fn limit(asked: Option<usize>) -> usize {
    asked.unwrap_or(MAX_OUTPUT).min(MAX_OUTPUT)
}

// --- tools ---

#[tool_router]
impl AgentboxMcp {
    #[tool(
        description = "Create a sandbox: an isolated Linux environment with its own filesystem, \
processes and (optional) network. Returns its id, used by every other tool. Without network \
options it has no network access.",
        annotations(title = "Create sandbox", destructive_hint = false, open_world_hint = false)
    )]
    async fn create_sandbox(&self, Parameters(p): Parameters<CreateParams>) -> CallToolResult {
        let network = match (p.network.as_deref(), p.network_allow.is_empty()) {
            (None, true) => None,
            (None, false) => Some(NetworkPolicy { mode: NetMode::Allow, allow: p.network_allow }),
            (Some(m), _) => match m.parse::<NetMode>() {
                Ok(mode) => Some(NetworkPolicy { mode, allow: p.network_allow }),
                Err(e) => return fail(e),
            },
        };
        let memory_bytes = match p.memory_mb.map(|m| m.checked_mul(1 << 20)) {
            Some(None) => return fail(format!("memory_mb {} is too large", p.memory_mb.unwrap_or_default())),
            Some(Some(b)) => Some(b),
            None => None,
        };
        let req = CreateSandbox {
            template: if p.snapshot.is_some() { None } else { p.template },
            snapshot: p.snapshot,
            name: p.name,
            timeout_secs: p.timeout_secs,
            env: p.env,
            workdir: p.workdir,
            user: p.user,
            limits: Limits { memory_bytes, cpus: p.cpus, ..Default::default() },
            network,
            ..Default::default()
        };
        let sb = tri!(self.client.create_sandbox_retried(&req, |_| ()).await);
        ok(summary(&sb))
    }

    #[tool(
        description = "Run a command in a sandbox and wait for it to end. Give `command` (a shell \
line, run with sh -c) or `argv`. Returns exit_code, stdout and stderr; output past 1 MiB per \
stream is cut (first and last halves kept) and flagged truncated. A non-zero exit code is a \
normal result, not an error.",
        annotations(title = "Run command", destructive_hint = true, open_world_hint = false)
    )]
    async fn run_command(&self, Parameters(p): Parameters<RunParams>) -> CallToolResult {
        let cmd = match (p.command, p.argv) {
            (Some(c), None) => vec!["sh".to_string(), "-c".to_string(), c],
            (None, Some(argv)) if !argv.is_empty() => argv,
            (None, Some(_)) => return fail("argv is empty"),
            (Some(_), Some(_)) => return fail("give either command or argv, not both"),
            (None, None) => return fail("give command (a shell line) or argv (program and arguments)"),
        };
        let req = ExecRequest {
            cmd,
            env: p.env,
            cwd: p.cwd,
            user: p.user,
            stdin: p.stdin.map(|s| base64::engine::general_purpose::STANDARD.encode(s)),
            timeout_secs: Some(p.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS)),
            ..Default::default()
        };
        let max = limit(p.max_output_bytes);
        let mut stream = tri!(self.client.exec(&p.sandbox, &req).await);
        let (mut out, mut err) = (Capture::new(max), Capture::new(max));
        let status = loop {
            match tri!(stream.next().await) {
                Some(OutputEvent::Stdout(d)) => out.push(&d),
                Some(OutputEvent::Stderr(d)) => err.push(&d),
                Some(OutputEvent::Exit(st)) => break st,
                Some(_) => {}
                None => return fail("the output stream ended before the command exited"),
            }
        };
        let mut v = json!({
            "exit_code": status.shell_code(),
            "stdout": out.text(),
            "stderr": err.text(),
        });
        if let Some(sig) = status.signal {
            v["signal"] = json!(sig);
        }
        if status.timed_out {
            v["timed_out"] = json!(true);
        }
        for (name, c) in [("stdout", &out), ("stderr", &err)] {
            if c.truncated() {
                v[format!("{name}_truncated")] = json!(true);
                v[format!("{name}_bytes")] = json!(c.total());
            }
        }
        ok(v)
    }

    #[tool(
        description = "Read a file from a sandbox. Text comes back as is (encoding \"utf-8\"), \
binary content as base64 (encoding \"base64\"). At most 1 MiB is returned (truncated: true past it).",
        annotations(title = "Read file", read_only_hint = true, open_world_hint = false)
    )]
    async fn read_file(&self, Parameters(p): Parameters<ReadParams>) -> CallToolResult {
        let max = limit(p.max_bytes);
        let client = self.files_as(&p.user);
        let pid = client.first_pid(&p.sandbox).await;
        let mut stream = std::pin::pin!(tri!(client.read_file_stream(&p.sandbox, &p.path).await));
        let mut data = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // Cut off after it began: say why, if the sandbox's state tells.
                Err(e) => match client.why_cut(&p.sandbox, pid).await {
                    Some(why) => return fail(format!("the read of {} broke off: {why}", p.path)),
                    None => return api_fail(e),
                },
            };
            let room = max - data.len();
            if chunk.len() > room {
                data.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            data.extend_from_slice(&chunk);
        }
        let (content, encoding) = encode_content(&data, truncated, p.base64);
        let mut v = json!({ "path": p.path, "encoding": encoding, "content": content, "bytes": data.len() });
        if truncated {
            v["truncated"] = json!(true);
        }
        ok(v)
    }

    #[tool(
        description = "Write a file in a sandbox, replacing its content and creating missing parent \
directories. Binary content: encoding \"base64\".",
        annotations(title = "Write file", destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn write_file(&self, Parameters(p): Parameters<WriteParams>) -> CallToolResult {
        let data = match p.encoding.as_deref().unwrap_or("utf-8") {
            "utf-8" | "utf8" | "text" => p.content.into_bytes(),
            "base64" => match base64::engine::general_purpose::STANDARD.decode(p.content.trim()) {
                Ok(d) => d,
                Err(e) => return fail(format!("content is not valid base64: {e}")),
            },
            other => return fail(format!("unknown encoding '{other}': use utf-8 or base64")),
        };
        let mode = match p.mode.as_deref().map(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8)) {
            None => None,
            Some(Ok(m)) if m <= 0o7777 => Some(m),
            Some(_) => return fail(format!("invalid mode '{}': give octal permission bits like 644", p.mode.unwrap())),
        };
        let info = tri!(self.files_as(&p.user).write_file(&p.sandbox, &p.path, data, mode).await);
        ok(file_entry(&info))
    }

    #[tool(
        description = "List a directory in a sandbox: path, kind (file, dir, symlink, other), size, \
mode of each entry, `depth` levels down (default 1).",
        annotations(title = "List files", read_only_hint = true, open_world_hint = false)
    )]
    async fn list_files(&self, Parameters(p): Parameters<ListParams>) -> CallToolResult {
        let depth = p.depth.unwrap_or(1).max(1);
        let entries = tri!(self.files_as(&p.user).list_dir(&p.sandbox, &p.path, depth).await);
        let total = entries.len();
        let list: Vec<Value> = entries.iter().take(MAX_ENTRIES).map(file_entry).collect();
        let mut v = json!({ "path": p.path, "entries": list });
        if total > MAX_ENTRIES {
            v["truncated"] = json!(true);
            v["total_entries"] = json!(total);
        }
        ok(v)
    }

    #[tool(
        description = "Snapshot a sandbox's files (it keeps running). Returns the snapshot id; use \
it with rollback, fork or diff.",
        annotations(title = "Snapshot", destructive_hint = false, open_world_hint = false)
    )]
    async fn snapshot(&self, Parameters(p): Parameters<SnapshotParams>) -> CallToolResult {
        let snap = tri!(self.client.snapshot(&p.sandbox, p.name.as_deref()).await);
        ok(json!(snap))
    }

    #[tool(
        description = "List snapshots, all or those of one sandbox.",
        annotations(title = "List snapshots", read_only_hint = true, open_world_hint = false)
    )]
    async fn list_snapshots(&self, Parameters(p): Parameters<ListSnapshotsParams>) -> CallToolResult {
        let snaps = tri!(self.client.snapshots(p.sandbox.as_deref()).await);
        ok(json!({ "snapshots": snaps }))
    }

    #[tool(
        description = "Make new sandboxes (count, default 1) that start as copies of a sandbox's \
current files or of a snapshot, e.g. to try several approaches in parallel. Returns their ids.",
        annotations(title = "Fork", destructive_hint = false, open_world_hint = false)
    )]
    async fn fork(&self, Parameters(p): Parameters<ForkParams>) -> CallToolResult {
        let req = ForkRequest { count: p.count, timeout_secs: p.timeout_secs, ..Default::default() };
        let res = match (p.sandbox, p.snapshot) {
            (Some(sb), None) => tri!(self.client.fork_retried(&sb, &req, |_| ()).await),
            (None, Some(snap)) => tri!(self.client.fork_snapshot_retried(&snap, &req, |_| ()).await),
            _ => return fail("give either sandbox or snapshot"),
        };
        let ids: Vec<&str> = res.sandboxes.iter().map(|s| s.id.as_str()).collect();
        let sandboxes: Vec<Value> = res.sandboxes.iter().map(summary).collect();
        ok(json!({ "ids": ids, "snapshot": res.snapshot, "sandboxes": sandboxes }))
    }

    #[tool(
        description = "Return a sandbox's files to a snapshot. Its processes are restarted; its id stays.",
        annotations(title = "Roll back", destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn rollback(&self, Parameters(p): Parameters<RollbackParams>) -> CallToolResult {
        let sb = tri!(self.client.rollback(&p.sandbox, &p.snapshot).await);
        ok(summary(&sb))
    }

    #[tool(
        description = "What a sandbox changed in its filesystem since its template, or since a \
snapshot (`since`): paths added, changed and deleted.",
        annotations(title = "Diff", read_only_hint = true, open_world_hint = false)
    )]
    async fn diff(&self, Parameters(p): Parameters<DiffParams>) -> CallToolResult {
        let d = tri!(self.client.diff_since(&p.sandbox, p.since.as_deref()).await);
        ok(json!(d))
    }

    #[tool(
        description = "Destroy a sandbox with its processes and files (its snapshots are kept).",
        annotations(
            title = "Destroy sandbox",
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn destroy_sandbox(&self, Parameters(p): Parameters<SandboxParam>) -> CallToolResult {
        tri!(self.client.delete_sandbox(&p.sandbox, true).await);
        ok(json!({ "destroyed": p.sandbox }))
    }

    #[tool(
        description = "List the sandboxes: id, name, template, state, expiry.",
        annotations(title = "List sandboxes", read_only_hint = true, open_world_hint = false)
    )]
    async fn list_sandboxes(&self) -> CallToolResult {
        let list = tri!(self.client.list_sandboxes().await);
        ok(json!({ "sandboxes": list.iter().map(summary).collect::<Vec<_>>() }))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for AgentboxMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("agentbox", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}
