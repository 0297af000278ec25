//! Types of agentbox's HTTP API (`/v1`), shared by the daemon, the Rust SDK and the CLI.
//! Every type derives `utoipa::ToSchema`; the daemon's OpenAPI document is generated from
//! them and committed as `docs/openapi.json`.
#![forbid(unsafe_code)]

pub mod paths;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use abx_proto::{ExitStatus, FileInfo, FileKind, ProcessInfo, TtySize};

/// The one error shape of the API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable machine-readable code and a message for humans that names
/// the object involved and, where possible, what to do.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `not_found`, `invalid_argument`, `conflict`, `command_not_found`.
    pub code: String,
    pub message: String,
}

/// Resource limits of a sandbox. Absent fields take the daemon's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Memory limit in bytes (at least 8 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit in cores, e.g. 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Maximum open files per process (RLIMIT_NOFILE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Template name (default `base`).
    #[serde(default)]
    pub template: Option<String>,
    /// Unique name (letters, digits, `-`, `_`, `.`; at most 64).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Seconds until the sandbox is destroyed; 0 = never. Default: the daemon's default.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Environment for every process in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default working directory of processes.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Default user of processes and file operations (name, uid or uid:gid).
    #[serde(default)]
    pub user: Option<String>,
    /// Free-form labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Egress policy (default: no egress at all).
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
    /// Start from this snapshot (id or name) instead of a template: its files, on the
    /// template it was taken from (`template` must then be empty or that template).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Keep the environment until it is removed: no timeout unless one is given, the
    /// filesystem synced to disk, and a sandbox whose processes ended while the daemon
    /// was away (a host reboot) comes back stopped instead of being cleaned up.
    #[serde(default)]
    pub persist: bool,
    /// What the timeout does (default `destroy`).
    #[serde(default)]
    pub on_timeout: Option<TimeoutAction>,
    /// Volumes to mount.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Who may reach the sandbox's ports through the ingress proxy (default: the daemon's
    /// `--ingress-access`; a fork or a create from a snapshot: its source's).
    #[serde(default)]
    pub ingress: Option<IngressAccess>,
    /// Makes the create safe to retry (a lost answer, a daemon restart): while a sandbox
    /// made by the same caller with this key exists, a create with the same key and the
    /// same request answers that sandbox (200) instead of making another; with a
    /// different request, 409. A create with the key still running is waited for. Also
    /// taken from the `Idempotency-Key` header. 1–128 printable ASCII characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Who may reach a sandbox's ports through the ingress proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IngressAccess {
    /// Anyone who can reach the proxy.
    #[default]
    Public,
    /// Only requests that carry the sandbox's `ingress_token` in the header
    /// `E2b-Traffic-Access-Token` (the e2b SDK's name for it).
    Token,
}

impl IngressAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            IngressAccess::Public => "public",
            IngressAccess::Token => "token",
        }
    }
}

impl std::str::FromStr for IngressAccess {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "public" => Ok(IngressAccess::Public),
            "token" => Ok(IngressAccess::Token),
            _ => Err(format!("invalid ingress access '{s}': use public or token")),
        }
    }
}

/// `PUT /v1/sandboxes/{id}/ingress`: who may reach the sandbox's ports from now on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SetIngress {
    pub access: IngressAccess,
    /// With `token`: a new token even if the sandbox has one (the old one, and browser
    /// cookies made from it, stop working). Switching from `public` always makes one.
    #[serde(default)]
    pub rotate: bool,
}

/// What happens when a sandbox's timeout expires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutAction {
    /// Destroy it with its files.
    #[default]
    Destroy,
    /// Take a snapshot named `<id>-timeout` (for forensics), then destroy it.
    Snapshot,
    /// Stop it: processes end, files are kept (`start` boots it again).
    Stop,
}

/// A volume mounted into a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// Volume name.
    pub name: String,
    /// Absolute path inside the sandbox (created if missing).
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
}

/// A named directory that outlives sandboxes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub name: String,
    /// The tenant of the key that made it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Bytes its files take on disk (allocated blocks).
    pub size_bytes: u64,
    /// Files and directories in it.
    pub entries: u64,
    /// Live sandboxes that mount it.
    pub used_by: Vec<String>,
}

/// `PUT /v1/pools/{template}`: keep sandboxes of a template ready so creates are claims.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPool {
    /// Sandboxes kept ready even without demand.
    #[serde(default)]
    pub min: u32,
    /// Most sandboxes kept ready, however high the demand.
    pub max: u32,
}

/// A warm pool and its counters.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Pool {
    pub template: String,
    pub min: u32,
    pub max: u32,
    /// Size kept now: recent demand (claims per second times refill time), within min
    /// and max and what host memory and free slots allow.
    pub target: u32,
    /// Sandboxes ready to be claimed.
    pub ready: u32,
    /// Sandboxes booting for the pool.
    pub filling: u32,
    /// Creates served from the pool.
    pub hits: u64,
    /// Creates of this template made cold because the pool was empty.
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// Creates of this template per second over the last 10 s.
    pub claims_per_sec: f64,
    /// Moving average of one pool boot, in milliseconds.
    pub refill_ms: Option<f64>,
    /// Mean claim time inside the daemon, in milliseconds.
    pub claim_ms_mean: f64,
    /// Sandboxes booted into the pool.
    pub boots: u64,
    /// Boots that failed.
    pub boot_failures: u64,
    /// The last boot failure.
    pub last_error: Option<String>,
}

/// `POST /v1/sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Unique name (like sandbox names); default none (use the id).
    #[serde(default)]
    pub name: Option<String>,
}

/// A read-only copy of a sandbox's files at one moment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// The tenant of the key that made it (none when made on the unix socket or with a
    /// key without a tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The sandbox it was taken from (which may be gone).
    pub sandbox: String,
    pub template: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Milliseconds the sandbox was frozen for it (0 when it was not running).
    pub frozen_ms: f64,
    /// Bytes the files changed since the template take on disk (allocated blocks, as for
    /// volumes: a sparse file counts what it holds).
    pub size_bytes: u64,
}

/// `POST /v1/sandboxes/{id}/fork` and `POST /v1/snapshots/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many sandboxes (1 to 100, default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Overrides for the new sandboxes; unset fields come from the source sandbox.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Makes the fork safe to retry, as `CreateSandbox::idempotency_key`: while the
    /// sandboxes a fork with this key made exist, the same fork answers them (200)
    /// instead of making more. Also taken from the `Idempotency-Key` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The sandboxes a fork made.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkResult {
    /// The snapshot they started from (none for a fork of a sandbox: the snapshot taken
    /// for it is removed afterwards).
    #[serde(default)]
    pub snapshot: Option<String>,
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes/{id}/stop` (the body may be empty).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the sandbox's processes get to exit after SIGTERM before every one left is
    /// killed (0 to 3600; default 10). 0 kills at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_secs: Option<f64>,
}

/// `POST /v1/sandboxes/{id}/rollback`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Snapshot id or name.
    pub snapshot: String,
}

/// What a sandbox may reach on the network. Whatever the policy, a sandbox never reaches
/// the host, the daemon, other sandboxes or link-local and metadata addresses, and UDP
/// port 443 (QUIC) is refused so that clients fall back to TCP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(from = "NetworkPolicyInput")]
pub struct NetworkPolicy {
    /// `none` when left out, or `allow` when left out and `allow` rules are given.
    #[serde(default)]
    pub mode: NetMode,
    /// Rules that allow more (with `allow`, the only things allowed): a domain
    /// (`github.com`), a wildcard domain (`*.pypi.org`: its subdomains, not itself), an
    /// address or CIDR, each with optional ports and protocol (`github.com:443/tcp`,
    /// `10.1.0.0/16:5432`, `203.0.113.7:8000-8080/udp`). Private ranges are reachable only through a rule
    /// naming them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// [`NetworkPolicy`] as a client may send it: the mode may be left out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkPolicyInput {
    #[serde(default)]
    mode: Option<NetMode>,
    #[serde(default)]
    allow: Vec<String>,
}

impl From<NetworkPolicyInput> for NetworkPolicy {
    fn from(p: NetworkPolicyInput) -> Self {
        let implied = if p.allow.is_empty() { NetMode::None } else { NetMode::Allow };
        NetworkPolicy { mode: p.mode.unwrap_or(implied), allow: p.allow }
    }
}

/// Egress modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetMode {
    /// No egress at all.
    #[default]
    None,
    /// The internet minus private (RFC 1918, 100.64.0.0/10), loopback, link-local and
    /// metadata ranges, plus the `allow` rules.
    Public,
    /// Only what the `allow` rules name.
    Allow,
}

impl NetMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetMode::None => "none",
            NetMode::Public => "public",
            NetMode::Allow => "allow",
        }
    }
}

impl std::str::FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetMode::None),
            "public" => Ok(NetMode::Public),
            "allow" => Ok(NetMode::Allow),
            _ => Err(format!("invalid network mode '{s}': use none, public or allow")),
        }
    }
}

/// One entry of a sandbox's egress audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetEvent {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// `dns` (a query to the sandbox's resolver), `connection` (the first packet of a
    /// connection or flow leaving the sandbox) or `ingress` (a client connection to one
    /// of its ports through the ingress proxy: denied when it lacked the sandbox's token).
    pub kind: String,
    /// `allow` or `deny`.
    pub verdict: String,
    /// DNS: the name asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// DNS: the record type asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    /// DNS: the IPv4 addresses answered (now allowed for their TTL).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Connection: `tcp`, `udp`, `icmp` or the protocol number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Connection: destination address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Connection: destination port (TCP and UDP). Ingress: the sandbox's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Ingress: the client's address and port, as the proxy saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// `GET /v1/sandboxes/{id}/network/log`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NetLog {
    /// Oldest first.
    pub events: Vec<NetEvent>,
    /// Events dropped because the log is bounded (oldest go first).
    pub dropped: u64,
    /// Set when the sandbox no longer exists: when it was removed (Unix seconds). Its
    /// audit is kept for the daemon's `--audit-retention` after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<u64>,
}

/// `GET /v1/network/audits`: a removed sandbox whose egress audit is kept (read it with
/// `GET /v1/sandboxes/{id}/network/log`, by id or by the name it had).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeptAudit {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tenant of the sandbox, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub template: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub removed_at: u64,
    /// Events in the kept log.
    pub events: u64,
}

/// `POST /v1/sandboxes/{id}/network/test`: probes made from inside the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NetTestReport {
    pub policy: NetworkPolicy,
    /// True when every check came out as the policy says.
    pub passed: bool,
    pub checks: Vec<NetCheck>,
}

/// One probe of a network test.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NetCheck {
    /// What was probed, e.g. `tcp github.com:443`, `dns evil.example`, `udp 203.0.113.7:443`.
    pub target: String,
    /// Why it is expected so, e.g. `allowed by rule github.com`, `metadata address`.
    pub reason: String,
    /// `reachable` or `blocked`.
    pub expected: String,
    /// `reachable`, `blocked` (refused by the firewall), `silent` (no answer: passes where
    /// `blocked` is expected) or `unknown` (the probe could not tell).
    pub observed: String,
    pub ok: bool,
    /// What the probe saw (errno, DNS answer, ...).
    pub detail: String,
}

/// `GET /v1/sandboxes/{id}/ports/{port}`: where the ingress proxy serves a port.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortUrl {
    /// `http://<port>-<id>.<domain>:<ingress port>`.
    pub url: String,
    /// The ingress proxy's address, for clients that cannot resolve the host name: send
    /// the request there with the `Host` header of the URL, or the headers
    /// `E2b-Sandbox-Id` and `E2b-Sandbox-Port`.
    pub ingress: String,
    pub host: String,
    /// When the sandbox's ports need its token (`ingress: token`): the value of the header
    /// `E2b-Traffic-Access-Token` to send with every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// One changed path (absolute, inside the sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiffEntry {
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Size in bytes (files).
    #[serde(default)]
    pub size: u64,
}

/// `GET /v1/sandboxes/{id}/diff`: what the sandbox changed in its filesystem since its
/// template, each list sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Diff {
    pub added: Vec<DiffEntry>,
    pub changed: Vec<DiffEntry>,
    pub deleted: Vec<DiffEntry>,
}

/// Lifecycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Creating,
    Running,
    /// Every process is frozen (cgroup freezer), memory kept. Any request to the sandbox
    /// (exec, files, ingress, ...) resumes it.
    Paused,
    /// PID 1 of the sandbox ended on its own; its files are kept until it is removed.
    Exited,
    /// Stopped on request (or by its timeout): no process, files kept; `start` boots it.
    Stopped,
    Destroying,
    /// A stop is ending its processes and moving its files out of the slot.
    Stopping,
    /// A start, restart or rollback is booting it again (same id); exec and file requests
    /// that come meanwhile wait for it.
    Starting,
}

impl SandboxState {
    /// The name in the API (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Exited => "exited",
            SandboxState::Stopped => "stopped",
            SandboxState::Destroying => "destroying",
            SandboxState::Stopping => "stopping",
            SandboxState::Starting => "starting",
        }
    }
}

/// A sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// The tenant of the key that made it (none when made on the unix socket or with a
    /// key without a tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub template: String,
    pub state: SandboxState,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds when the timeout destroys it, if it has one.
    #[serde(default)]
    pub expires_at: Option<u64>,
    pub limits: Limits,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Host pid of the sandbox's PID 1 (the guest agent).
    pub pid: i32,
    /// First host uid of the sandbox's private uid range (root inside maps to it); 0 while
    /// it is stopped (it has no range then).
    pub uid_base: u32,
    pub hostname: String,
    /// Egress policy.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// The sandbox's IPv4 address (none when the daemon runs without networking, and while
    /// it is stopped: a start may give it another).
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub persist: bool,
    #[serde(default)]
    pub on_timeout: TimeoutAction,
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// The snapshot its files started from (create from a snapshot, fork, rollback).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Who may reach its ports through the ingress proxy.
    #[serde(default)]
    pub ingress: IngressAccess,
    /// With `ingress: token`: the value of the header `E2b-Traffic-Access-Token` that
    /// requests to its ports must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_token: Option<String>,
}

/// `POST /v1/sandboxes/{id}/exec` and the first message of the exec WebSocket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (the program is looked up in PATH).
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Allocate a terminal of this size.
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// Standard input, base64, given up front (non-interactive exec).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Keep stdin open for streaming (WebSocket exec only).
    #[serde(default)]
    pub interactive: bool,
    /// Kill the process after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// Start in the background and return its pid at once.
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub tag: Option<String>,
}

/// One line of an exec output stream (NDJSON), or one text message on the WebSocket.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// `POST /v1/run` only: the sandbox was created.
    Created {
        id: String,
    },
    Started {
        pid: u32,
    },
    /// Base64 data.
    Stdout {
        data: String,
    },
    /// Base64 data.
    Stderr {
        data: String,
    },
    Exit {
        #[serde(default)]
        code: Option<i32>,
        #[serde(default)]
        signal: Option<i32>,
        #[serde(default)]
        timed_out: bool,
    },
    Error {
        code: String,
        message: String,
    },
}

/// `POST /v1/run`: create a sandbox, run one command in it, destroy it. The response
/// streams `created`, then the command's events, and ends after the sandbox is destroyed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    #[serde(default)]
    pub sandbox: CreateSandbox,
    pub exec: ExecRequest,
}

/// `POST /v1/sandboxes/{id}/exec` with `background: true`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Started {
    pub pid: u32,
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SignalRequest {
    /// Signal number or name (`TERM`, `SIGKILL`, `9`).
    pub signal: serde_json::Value,
    /// Signal the whole process group (default true).
    #[serde(default)]
    pub group: Option<bool>,
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/stdin`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StdinRequest {
    /// Base64 data.
    #[serde(default)]
    pub data: String,
    #[serde(default)]
    pub close: bool,
}

/// `POST /v1/sandboxes/{id}/files/mkdir`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MkdirRequest {
    pub path: String,
    #[serde(default)]
    pub parents: bool,
    #[serde(default)]
    pub mode: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
}

/// `POST /v1/sandboxes/{id}/files/rename`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RenameRequest {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub user: Option<String>,
}

/// `POST /v1/sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TimeoutRequest {
    /// Seconds from now; 0 removes the timeout.
    pub timeout_secs: u64,
}

/// Resource usage of a sandbox (from its cgroups).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxStats {
    pub memory_bytes: u64,
    #[serde(default)]
    pub memory_peak_bytes: Option<u64>,
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    pub oom_kills: u64,
    pub pids: u64,
    #[serde(default)]
    pub pids_limit: Option<u64>,
    pub cpu_usage_usec: u64,
}

/// A template.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub name: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    pub size_bytes: u64,
    pub created_at: u64,
    /// How it was made (`base`, `mini`, `dir:/path`).
    pub recipe: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Command started in the background in every new sandbox (argv).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start: Vec<String>,
    /// Shell command a create waits for to exit 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
}

/// `POST /v1/templates`: build a template.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildTemplate {
    pub name: String,
    /// `base` (Debian 12 via debootstrap), `mini` (busybox), or absent to use the
    /// embedded recipe of the same name.
    #[serde(default)]
    pub recipe: Option<String>,
    /// Import this host directory as the template's only layer.
    #[serde(default)]
    pub from_dir: Option<String>,
    /// Make the template from a snapshot (id or name): the snapshot's template layers plus
    /// one layer with the sandbox's changes; its env, workdir and user become the defaults.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Build from this Dockerfile text (single stage; FROM names a template of this daemon
    /// or `scratch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// Absolute host directory COPY and ADD read from (a `.dockerignore` in it is honoured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// `ARG` values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    /// Egress policy of the build's sandboxes (RUN steps, setup). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// Ignore the build cache (every step runs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_cache: bool,
    /// A git repository (absolute host path or URL) to check out at `git_ref`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Branch, tag or commit of `repo` (default HEAD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Command installing the repository's dependencies (run once, cached by lock files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<String>,
    /// Template a repository goes on (default `base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Where the repository goes in the sandbox (default `/workspace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    /// Files (relative to the repository) whose content decides whether setup runs again;
    /// default: the well-known lock and manifest files at its root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lock_files: Vec<String>,
    /// Import an image: a `docker save` archive, an OCI archive or an OCI layout directory
    /// (absolute host path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<String>,
    /// Which image of a multi-image archive (a tag or reference name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pull an image from an OCI registry: `host[:port]/repo[:tag|@digest]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<String>,
    /// Registry credentials for `pull` (never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// Allow plain HTTP to the registry (always allowed for loopback registries).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// `POST /v1/templates/{name}/tag`: keep the template under another name as well.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagTemplate {
    /// `NAME:TAG` (or another plain name); replaced if it exists.
    pub target: String,
}

/// `POST /v1/keys`: a new API key (for TCP listeners and the e2b SDK).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Who the key is for (letters, digits, `.`, `_`, `-`); recorded on the sandboxes it creates.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// An API key as listed (the key itself is shown once, at creation).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub tenant: Option<String>,
    pub created_at: u64,
    /// The key's first characters.
    pub prefix: String,
    /// The key: only in the answer to its creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Registry credentials.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// A docker `config.json` or containers `auth.json` on the host to read credentials from.
    #[serde(default)]
    pub auth_file: Option<String>,
}

/// One line of a template build stream (NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    Progress {
        stage: String,
        done: u64,
        #[serde(default)]
        total: Option<u64>,
        message: String,
    },
    Done {
        template: Template,
    },
    Error {
        code: String,
        message: String,
    },
}

/// `GET /v1/system`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SystemInfo {
    pub version: String,
    pub root: String,
    pub prefix: String,
    /// `v1`, `hybrid` or `v2`.
    pub cgroup: String,
    /// Sandboxes on this daemon, those running a template build's steps included.
    pub sandboxes: usize,
    /// Of them, those running a step of a template build (not listed, not addressable).
    #[serde(default)]
    pub build_steps: usize,
    pub spawner_pid: u32,
    pub daemon_pid: u32,
    /// Slots with their namespaces made ahead of demand (`--prewarm`).
    pub prepared: usize,
    pub data: DataInfo,
}

/// Where sandbox data (each sandbox's writable layer) is kept.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DataInfo {
    /// `dir` (under the state root) or `image` (a loop-mounted ext4 image).
    pub mode: String,
    /// The directory holding the sandbox slots.
    pub slots: String,
    /// The image file, in `image` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Bytes used and still available on the data filesystem.
    pub used_bytes: u64,
    pub available_bytes: u64,
    /// The data filesystem is read-only: btrfs turns itself read-only after a failed
    /// write (for an image, most often a full host disk). Nothing can be created until
    /// that is fixed and the daemon restarted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `as_str` is the serialized name (the CLI prints it where it printed the JSON).
    #[test]
    fn sandbox_state_names_are_the_serialized_ones() {
        use SandboxState as S;
        for s in [S::Creating, S::Running, S::Paused, S::Exited, S::Stopped, S::Destroying, S::Stopping, S::Starting] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn a_network_policy_without_a_mode_is_none_or_allow_by_its_rules() {
        let p = |s: &str| serde_json::from_str::<NetworkPolicy>(s);
        assert_eq!(p("{}").unwrap(), NetworkPolicy::default());
        assert_eq!(
            p(r#"{"allow":["x.com"]}"#).unwrap(),
            NetworkPolicy { mode: NetMode::Allow, allow: vec!["x.com".into()] }
        );
        let public = p(r#"{"mode":"public","allow":["10.0.0.0/8"]}"#).unwrap();
        assert_eq!(public.mode, NetMode::Public);
        // An explicit `none` with rules stays what was asked for (and is refused later).
        assert_eq!(p(r#"{"mode":"none","allow":["x.com"]}"#).unwrap().mode, NetMode::None);
        assert!(p(r#"{"mode":"none","alow":[]}"#).unwrap_err().to_string().contains("alow"));
        let round = serde_json::to_string(&public).unwrap();
        assert_eq!(p(&round).unwrap(), public);
    }
}
