//! The agentbox Rust SDK: a typed client for the daemon's HTTP API, used by the
//! `agentbox` CLI itself. Every request and answer type is re-exported from `abx-api`
//! (`CreateSandbox`, `ExecRequest`, `Sandbox`, `Snapshot`, ...); errors are [`Error`], whose
//! `Api` variant carries the daemon's stable error code and message.
//!
//! # Connecting
//!
//! [`Client::from_env`] reads `AGENTBOX_HOST` (`unix:/path` or `http://host:port`; default:
//! the local daemon's socket) and `AGENTBOX_API_KEY` (needed over TCP, see `agentbox key
//! create`). [`Client::new`] and [`Client::with_api_key`] do the same explicitly.
//!
//! ```no_run
//! # async fn demo() -> Result<(), abx_client::Error> {
//! use abx_client::{Client, CreateSandbox};
//!
//! let client = Client::from_env()?; // AGENTBOX_HOST, or the local daemon's socket
//! let sb = client.create_sandbox(&CreateSandbox { template: Some("base".into()), ..Default::default() }).await?;
//! let out = client.run(&sb.id, &["echo", "hello"]).await?;
//! assert_eq!(out.stdout, b"hello\n");
//! client.write_file(&sb.id, "/tmp/notes.txt", b"hi".to_vec(), None).await?;
//! client.delete_sandbox(&sb.id, true).await?;
//! # Ok(()) }
//! ```
//!
//! # Streaming a command's output
//!
//! ```no_run
//! # async fn demo(client: abx_client::Client, id: &str) -> Result<(), abx_client::Error> {
//! use abx_client::{ExecRequest, OutputEvent};
//!
//! let req = ExecRequest {
//!     cmd: vec!["sh".into(), "-c".into(), "for i in 1 2 3; do echo $i; sleep 1; done".into()],
//!     cwd: Some("/tmp".into()),
//!     timeout_secs: Some(30.0),
//!     ..Default::default()
//! };
//! let mut stream = client.exec(id, &req).await?;
//! while let Some(ev) = stream.next().await? {
//!     match ev {
//!         OutputEvent::Stdout(b) => print!("{}", String::from_utf8_lossy(&b)),
//!         OutputEvent::Stderr(b) => eprint!("{}", String::from_utf8_lossy(&b)),
//!         OutputEvent::Exit(st) => println!("exit {:?}", st.code),
//!         _ => {}
//!     }
//! }
//! // Or in the background: the pid, then signals, stdin, attach.
//! let pid = client.exec_background(id, &ExecRequest { cmd: vec!["sleep".into(), "60".into()], ..Default::default() }).await?;
//! client.signal(id, pid, "TERM").await?;
//! # Ok(()) }
//! ```
//!
//! # Snapshots, forks, rollback, diff
//!
//! ```no_run
//! # async fn demo(client: abx_client::Client, id: &str) -> Result<(), abx_client::Error> {
//! use abx_client::ForkRequest;
//!
//! let snap = client.snapshot(id, Some("before-refactor")).await?; // frozen for ~3 ms
//! let forks = client.fork_snapshot(&snap.id, &ForkRequest { count: Some(4), ..Default::default() }).await?;
//! for f in &forks.sandboxes {
//!     client.run(&f.id, &["sh", "-c", "echo try > /tmp/attempt"]).await?;
//! }
//! let changed = client.diff(id).await?; // paths added, changed, deleted since the template
//! println!("{} added", changed.added.len());
//! client.rollback(id, "before-refactor").await?; // files back, processes restarted, same id
//! # Ok(()) }
//! ```
//!
//! # Egress policy
//!
//! ```no_run
//! # async fn demo(client: abx_client::Client, id: &str) -> Result<(), abx_client::Error> {
//! use abx_client::{NetMode, NetworkPolicy};
//!
//! let policy = NetworkPolicy { mode: NetMode::Allow, allow: vec!["github.com".into(), "*.pypi.org".into()] };
//! client.set_network(id, &policy).await?; // applies at once; DNS answers outside it are refused
//! # Ok(()) }
//! ```
//!
//! # Templates and warm pools
//!
//! ```no_run
//! # async fn demo(client: abx_client::Client) -> Result<(), abx_client::Error> {
//! use abx_client::{BuildEvent, BuildTemplate};
//!
//! let req = BuildTemplate {
//!     name: "app".into(),
//!     dockerfile: Some("FROM base\nRUN echo built > /tmp/marker\n".into()),
//!     context: Some("/srv/app".into()),
//!     ..Default::default()
//! };
//! let mut build = client.build_template(&req).await?;
//! while let Some(ev) = build.next().await? {
//!     match ev {
//!         BuildEvent::Progress { stage, message, .. } => println!("{stage}: {message}"),
//!         BuildEvent::Done { template } => println!("built {} ({} layers)", template.name, template.layers.len()),
//!         BuildEvent::Error { message, .. } => eprintln!("failed: {message}"),
//!     }
//! }
//! client.set_pool("app", 2, 20).await?; // creates of `app` are now claims
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod exec;
mod files;
mod interactive;

use std::path::PathBuf;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

pub use abx_api::*;
pub use exec::{ExecStream, NdjsonStream, Output, OutputEvent};
pub use interactive::{Interactive, InteractiveEvent, InteractiveReader, InteractiveWriter};

/// The default daemon socket.
pub const DEFAULT_SOCKET: &str = "/run/agentbox/agentbox.sock";

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon answered with an error.
    #[error("{message}")]
    Api { status: u16, code: String, message: String },
    #[error("cannot reach the agentbox daemon at {host}")]
    Connect {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to the agentbox daemon failed")]
    Transport(#[from] reqwest::Error),
    #[error("websocket exchange with the daemon failed")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("i/o error")]
    Io(#[from] std::io::Error),
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    #[error("invalid host '{0}': use unix:/path/to/socket or http://host:port")]
    BadHost(String),
}

impl Error {
    /// The API error code, if the daemon sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs `send` (a request with an idempotency key) again, for up to a minute, while the
/// daemon is away after it was reached once (a broken exchange, then refused connections
/// during its restart) or still finds its sandboxes after its start.
async fn retried<T, F, Fut>(send: F, on_retry: impl FnOnce(&Error)) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut reached = false;
    let mut on_retry = Some(on_retry);
    loop {
        let e = match send().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let again = match &e {
            Error::Transport(_) => {
                reached = true;
                true
            }
            Error::Connect { .. } => reached,
            Error::Api { status: 503, message, .. } => message.contains("after its start"),
            _ => false,
        };
        if !again || std::time::Instant::now() >= deadline {
            return Err(e);
        }
        if let Some(f) = on_retry.take() {
            f(&e);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Gives a request without an idempotency key a random one.
fn with_key(key: &mut Option<String>) -> Result<()> {
    if key.is_none() {
        *key = Some(random_key()?);
    }
    Ok(())
}

/// 128 random bits in hex (an idempotency key).
fn random_key() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Where the daemon is.
#[derive(Debug, Clone)]
pub enum Host {
    Unix(PathBuf),
    Http(String),
}

impl std::str::FromStr for Host {
    type Err = Error;
    fn from_str(s: &str) -> Result<Host> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Host::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Host::Unix(PathBuf::from(s)));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Host::Http(s.trim_end_matches('/').to_string()));
        }
        Err(Error::BadHost(s.to_string()))
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Unix(p) => write!(f, "unix:{}", p.display()),
            Host::Http(u) => f.write_str(u),
        }
    }
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    host: Host,
    base: String,
    api_key: Option<String>,
    /// User for file operations (None: the sandbox's default user).
    file_user: Option<String>,
}

impl Client {
    /// A client for `host` (`unix:/path`, `/path`, or `http://host:port`).
    pub fn new(host: &str) -> Result<Client> {
        let host: Host = host.parse()?;
        let mut builder = reqwest::Client::builder().pool_max_idle_per_host(64);
        let base = match &host {
            Host::Unix(p) => {
                builder = builder.unix_socket(p.clone());
                "http://agentbox".to_string()
            }
            Host::Http(u) => u.clone(),
        };
        if !base.starts_with("https:") {
            // No TLS to verify: skip loading the system's root certificates, which takes
            // a few milliseconds (a CLI command's whole start-up budget).
            builder = builder.tls_certs_only(std::iter::empty());
        }
        Ok(Client { http: builder.build()?, host, base, api_key: None, file_user: None })
    }

    /// `AGENTBOX_HOST` (default: the local socket) and `AGENTBOX_API_KEY`.
    pub fn from_env() -> Result<Client> {
        let host = std::env::var("AGENTBOX_HOST").unwrap_or_else(|_| format!("unix:{DEFAULT_SOCKET}"));
        let mut c = Client::new(&host)?;
        c.api_key = std::env::var("AGENTBOX_API_KEY").ok();
        Ok(c)
    }

    /// Sends this API key with every request.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Client {
        self.api_key = Some(key.into());
        self
    }

    pub(crate) fn api_key_header(&self) -> Option<String> {
        self.api_key.as_ref().map(|k| format!("Bearer {k}"))
    }

    /// A client whose file operations act as `user` inside sandboxes (permission checks
    /// and ownership of created files), instead of the sandbox's default user.
    pub fn with_file_user(&self, user: impl Into<String>) -> Client {
        Client { file_user: Some(user.into()), ..self.clone() }
    }

    pub(crate) fn file_user(&self) -> Option<&str> {
        self.file_user.as_deref()
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.api_key {
            rb = rb.bearer_auth(k);
        }
        rb
    }

    /// Sends a request; non-2xx answers become [`Error::Api`].
    pub(crate) async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() { Error::Connect { host: self.host.to_string(), source: e } } else { Error::Transport(e) }
        })?;
        if resp.status().is_success() || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        Err(api_error(resp).await)
    }

    pub(crate) async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        let bytes = resp.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
    }

    pub(crate) fn path(template: &str, params: &[(&str, &str)]) -> String {
        paths::fill(template, params)
    }

    // --- sandboxes ---

    pub async fn create_sandbox(&self, req: &CreateSandbox) -> Result<Sandbox> {
        self.json(self.request(Method::POST, paths::SANDBOXES).json(req)).await
    }

    /// [`Client::create_sandbox`] that is safe to send again, and is, for up to a minute,
    /// while the daemon is away after it was reached (a broken exchange, then refused
    /// connections during its restart) or is still finding its sandboxes after its start.
    /// The request carries an idempotency key (its own, else a random one), so a retry
    /// answers the sandbox an earlier try made instead of making a second. `on_retry` is
    /// called once, with the error, before the first retry.
    pub async fn create_sandbox_retried(&self, req: &CreateSandbox, on_retry: impl FnOnce(&Error)) -> Result<Sandbox> {
        let mut req = req.clone();
        with_key(&mut req.idempotency_key)?;
        retried(|| self.create_sandbox(&req), on_retry).await
    }

    pub async fn list_sandboxes(&self) -> Result<Vec<Sandbox>> {
        self.json(self.request(Method::GET, paths::SANDBOXES)).await
    }

    /// By id or name.
    pub async fn get_sandbox(&self, id: &str) -> Result<Sandbox> {
        self.json(self.request(Method::GET, &Self::path(paths::SANDBOX, &[("id", id)]))).await
    }

    /// The pid (on the host) of a sandbox's first process, or `None` if it cannot be
    /// asked: taken before a long read, for [`Client::why_cut`].
    pub async fn first_pid(&self, id: &str) -> Option<i32> {
        self.get_sandbox(id).await.ok().map(|sb| sb.pid)
    }

    /// Why a response from sandbox `id` that had begun broke off (a download cut short
    /// says only "end of file before message length reached"): the sandbox was removed,
    /// is no longer running, or was restarted (its first process is not `pid_before`,
    /// from [`Client::first_pid`] before the read). `None` when none of these happened.
    pub async fn why_cut(&self, id: &str, pid_before: Option<i32>) -> Option<String> {
        match self.get_sandbox(id).await {
            Err(e) if e.code() == Some("not_found") => Some(format!("sandbox {id} was removed meanwhile")),
            Ok(sb) if sb.state != SandboxState::Running => Some(format!("sandbox {id} is {} now", sb.state.as_str())),
            Ok(sb) if pid_before.is_some_and(|p| p != sb.pid) => {
                Some(format!("sandbox {id} was restarted meanwhile (a rollback, or a stop and start)"))
            }
            _ => None,
        }
    }

    /// Destroys a sandbox; a running one needs `force`.
    pub async fn delete_sandbox(&self, id: &str, force: bool) -> Result<()> {
        let rb = self.request(Method::DELETE, &Self::path(paths::SANDBOX, &[("id", id)])).query(&[("force", force)]);
        self.send(rb).await.map(drop)
    }

    pub async fn set_timeout(&self, id: &str, timeout_secs: u64) -> Result<Sandbox> {
        let rb = self
            .request(Method::POST, &Self::path(paths::SANDBOX_TIMEOUT, &[("id", id)]))
            .json(&TimeoutRequest { timeout_secs });
        self.json(rb).await
    }

    pub async fn stats(&self, id: &str) -> Result<SandboxStats> {
        self.json(self.request(Method::GET, &Self::path(paths::SANDBOX_STATS, &[("id", id)]))).await
    }

    /// What a sandbox changed since its template.
    pub async fn diff(&self, id: &str) -> Result<Diff> {
        self.diff_since(id, None).await
    }

    /// What a sandbox changed since a snapshot (id or name), or since its template.
    pub async fn diff_since(&self, id: &str, since: Option<&str>) -> Result<Diff> {
        let mut rb = self.request(Method::GET, &Self::path(paths::DIFF, &[("id", id)]));
        if let Some(s) = since {
            rb = rb.query(&[("since", s)]);
        }
        self.json(rb).await
    }

    /// A tar of the paths a sandbox added or changed since its template.
    pub async fn diff_archive(&self, id: &str) -> Result<Vec<u8>> {
        self.diff_archive_since(id, None).await
    }

    /// A tar of the paths a sandbox added or changed since a snapshot (or its template).
    pub async fn diff_archive_since(&self, id: &str, since: Option<&str>) -> Result<Vec<u8>> {
        self.diff_layer(id, since, false).await
    }

    /// [`Client::diff_archive_since`], with the deletions as OCI whiteouts when
    /// `whiteouts` (the tar is then a layer recreating the sandbox's files over the base).
    pub async fn diff_layer(&self, id: &str, since: Option<&str>, whiteouts: bool) -> Result<Vec<u8>> {
        let mut rb = self.request(Method::GET, &Self::path(paths::DIFF_ARCHIVE, &[("id", id)]));
        if let Some(s) = since {
            rb = rb.query(&[("since", s)]);
        }
        if whiteouts {
            rb = rb.query(&[("whiteouts", "true")]);
        }
        let resp = self.send(rb).await?;
        Ok(resp.bytes().await?.to_vec())
    }

    // --- snapshots, forks, rollback, stop/start ---

    /// Ends a sandbox's processes and keeps its files.
    /// Its processes get SIGTERM and the daemon's default grace period (10 s) to exit.
    pub async fn stop(&self, id: &str) -> Result<Sandbox> {
        self.json(self.request(Method::POST, &Self::path(paths::SANDBOX_STOP, &[("id", id)]))).await
    }

    /// [`Client::stop`] with `grace_secs` seconds between SIGTERM and SIGKILL (0: SIGKILL at
    /// once).
    pub async fn stop_with_grace(&self, id: &str, grace_secs: f64) -> Result<Sandbox> {
        let req = abx_api::StopRequest { grace_secs: Some(grace_secs) };
        self.json(self.request(Method::POST, &Self::path(paths::SANDBOX_STOP, &[("id", id)])).json(&req)).await
    }

    /// Boots a stopped sandbox again.
    pub async fn start(&self, id: &str) -> Result<Sandbox> {
        self.json(self.request(Method::POST, &Self::path(paths::SANDBOX_START, &[("id", id)]))).await
    }

    /// Snapshots a sandbox's files.
    pub async fn snapshot(&self, id: &str, name: Option<&str>) -> Result<Snapshot> {
        let req = CreateSnapshot { name: name.map(str::to_string) };
        self.json(self.request(Method::POST, &Self::path(paths::SANDBOX_SNAPSHOTS, &[("id", id)])).json(&req)).await
    }

    /// Every snapshot, or those of one sandbox.
    pub async fn snapshots(&self, sandbox: Option<&str>) -> Result<Vec<Snapshot>> {
        let mut rb = self.request(Method::GET, paths::SNAPSHOTS);
        if let Some(s) = sandbox {
            rb = rb.query(&[("sandbox", s)]);
        }
        self.json(rb).await
    }

    pub async fn get_snapshot(&self, id: &str) -> Result<Snapshot> {
        self.json(self.request(Method::GET, &Self::path(paths::SNAPSHOT, &[("id", id)]))).await
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &Self::path(paths::SNAPSHOT, &[("id", id)]))).await.map(drop)
    }

    /// New sandboxes from a running sandbox.
    pub async fn fork_sandbox(&self, id: &str, req: &ForkRequest) -> Result<ForkResult> {
        self.json(self.request(Method::POST, &Self::path(paths::SANDBOX_FORK, &[("id", id)])).json(req)).await
    }

    /// [`Client::fork_sandbox`] (a sandbox, else a snapshot of that name), safe to send
    /// again and sent again as [`Client::create_sandbox_retried`] is: a retry answers the
    /// sandboxes an earlier try made.
    pub async fn fork_retried(
        &self,
        source: &str,
        req: &ForkRequest,
        on_retry: impl FnOnce(&Error),
    ) -> Result<ForkResult> {
        let mut req = req.clone();
        with_key(&mut req.idempotency_key)?;
        retried(|| self.fork_sandbox(source, &req), on_retry).await
    }

    /// [`Client::fork_snapshot`], safe to send again and sent again as
    /// [`Client::fork_retried`] is.
    pub async fn fork_snapshot_retried(
        &self,
        snapshot: &str,
        req: &ForkRequest,
        on_retry: impl FnOnce(&Error),
    ) -> Result<ForkResult> {
        let mut req = req.clone();
        with_key(&mut req.idempotency_key)?;
        retried(|| self.fork_snapshot(snapshot, &req), on_retry).await
    }

    /// New sandboxes from a snapshot.
    pub async fn fork_snapshot(&self, id: &str, req: &ForkRequest) -> Result<ForkResult> {
        self.json(self.request(Method::POST, &Self::path(paths::SNAPSHOT_FORK, &[("id", id)])).json(req)).await
    }

    /// Returns a sandbox's files to a snapshot (its processes restart).
    pub async fn rollback(&self, id: &str, snapshot: &str) -> Result<Sandbox> {
        let req = RollbackRequest { snapshot: snapshot.to_string() };
        self.json(self.request(Method::POST, &Self::path(paths::SANDBOX_ROLLBACK, &[("id", id)])).json(&req)).await
    }

    /// The daemon's Prometheus metrics (text).
    pub async fn metrics(&self) -> Result<String> {
        Ok(self.send(self.request(Method::GET, paths::METRICS)).await?.text().await?)
    }

    // --- API keys (over the unix socket) ---

    /// Makes an API key; the answer holds the key (shown once).
    pub async fn create_key(&self, tenant: Option<&str>) -> Result<ApiKey> {
        let req = CreateKey { tenant: tenant.map(String::from) };
        self.json(self.request(Method::POST, paths::KEYS).json(&req)).await
    }

    pub async fn keys(&self) -> Result<Vec<ApiKey>> {
        self.json(self.request(Method::GET, paths::KEYS)).await
    }

    pub async fn delete_key(&self, id: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &Self::path(paths::KEY, &[("id", id)]))).await.map(drop)
    }

    // --- warm pools ---

    /// Creates or changes the warm pool of a template.
    pub async fn set_pool(&self, template: &str, min: u32, max: u32) -> Result<Pool> {
        let path = Self::path(paths::POOL, &[("template", template)]);
        self.json(self.request(Method::PUT, &path).json(&SetPool { min, max })).await
    }

    pub async fn pools(&self) -> Result<Vec<Pool>> {
        self.json(self.request(Method::GET, paths::POOLS)).await
    }

    pub async fn pool(&self, template: &str) -> Result<Pool> {
        self.json(self.request(Method::GET, &Self::path(paths::POOL, &[("template", template)]))).await
    }

    /// Removes a pool (its ready sandboxes are destroyed).
    pub async fn delete_pool(&self, template: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &Self::path(paths::POOL, &[("template", template)]))).await.map(drop)
    }

    // --- volumes ---

    pub async fn create_volume(&self, name: &str) -> Result<Volume> {
        self.json(self.request(Method::POST, paths::VOLUMES).json(&CreateVolume { name: name.to_string() })).await
    }

    pub async fn volumes(&self) -> Result<Vec<Volume>> {
        self.json(self.request(Method::GET, paths::VOLUMES)).await
    }

    pub async fn volume(&self, name: &str) -> Result<Volume> {
        self.json(self.request(Method::GET, &Self::path(paths::VOLUME, &[("name", name)]))).await
    }

    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &Self::path(paths::VOLUME, &[("name", name)]))).await.map(drop)
    }

    /// Freezes a sandbox (memory kept); any later request resumes it.
    pub async fn pause(&self, id: &str) -> Result<Sandbox> {
        self.json(self.request(Method::POST, &Self::path(paths::SANDBOX_PAUSE, &[("id", id)]))).await
    }

    /// Thaws a paused sandbox.
    pub async fn resume(&self, id: &str) -> Result<Sandbox> {
        self.json(self.request(Method::POST, &Self::path(paths::SANDBOX_RESUME, &[("id", id)]))).await
    }

    // --- network ---

    /// Replaces a sandbox's egress policy.
    pub async fn set_network(&self, id: &str, policy: &NetworkPolicy) -> Result<Sandbox> {
        self.json(self.request(Method::PUT, &Self::path(paths::NETWORK, &[("id", id)])).json(policy)).await
    }

    /// Changes who may reach a sandbox's ports through the ingress proxy (see
    /// [`SetIngress`]); the answer has the new `ingress_token`.
    pub async fn set_ingress(&self, id: &str, req: &SetIngress) -> Result<Sandbox> {
        self.json(self.request(Method::PUT, &Self::path(paths::INGRESS, &[("id", id)])).json(req)).await
    }

    /// A sandbox's egress audit.
    pub async fn network_log(&self, id: &str) -> Result<NetLog> {
        self.json(self.request(Method::GET, &Self::path(paths::NETWORK_LOG, &[("id", id)]))).await
    }

    /// Removed sandboxes whose egress audit the daemon keeps (`--audit-retention`).
    pub async fn kept_audits(&self) -> Result<Vec<KeptAudit>> {
        self.json(self.request(Method::GET, paths::NETWORK_AUDITS)).await
    }

    /// Probes a sandbox's policy from inside it.
    pub async fn network_test(&self, id: &str) -> Result<NetTestReport> {
        self.json(self.request(Method::POST, &Self::path(paths::NETWORK_TEST, &[("id", id)]))).await
    }

    /// Where the ingress proxy serves `port` of a sandbox.
    pub async fn port_url(&self, id: &str, port: u16) -> Result<PortUrl> {
        let port = port.to_string();
        self.json(self.request(Method::GET, &Self::path(paths::PORT, &[("id", id), ("port", &port)]))).await
    }

    // --- templates and system ---

    pub async fn templates(&self) -> Result<Vec<Template>> {
        self.json(self.request(Method::GET, paths::TEMPLATES)).await
    }

    pub async fn template(&self, name: &str) -> Result<Template> {
        self.json(self.request(Method::GET, &Self::path(paths::TEMPLATE, &[("name", name)]))).await
    }

    /// Starts a build; read progress from the returned stream until `Done` or `Error`.
    pub async fn build_template(&self, req: &BuildTemplate) -> Result<exec::NdjsonStream<BuildEvent>> {
        let resp = self.send(self.request(Method::POST, paths::TEMPLATES).json(req)).await?;
        Ok(exec::NdjsonStream::new(resp))
    }

    /// Builds a template again from what made it; streams like [`Client::build_template`].
    pub async fn refresh_template(&self, name: &str) -> Result<exec::NdjsonStream<BuildEvent>> {
        let resp =
            self.send(self.request(Method::POST, &Self::path(paths::TEMPLATE_REFRESH, &[("name", name)]))).await?;
        Ok(exec::NdjsonStream::new(resp))
    }

    /// Keeps a template under another name too (`NAME:TAG`).
    pub async fn tag_template(&self, name: &str, target: &str) -> Result<Template> {
        let req = TagTemplate { target: target.to_string() };
        self.json(self.request(Method::POST, &Self::path(paths::TEMPLATE_TAG, &[("name", name)])).json(&req)).await
    }

    /// Empties the build cache and removes unused layers; returns their digests.
    pub async fn prune_templates(&self) -> Result<Vec<String>> {
        self.prune_build_cache(None).await
    }

    /// [`Client::prune_templates`], with `unused_for`: only the cache entries no build
    /// made or used for that long.
    pub async fn prune_build_cache(&self, unused_for: Option<std::time::Duration>) -> Result<Vec<String>> {
        let mut rb = self.request(Method::POST, paths::BUILD_CACHE_PRUNE);
        if let Some(d) = unused_for {
            rb = rb.query(&[("unused_for", d.as_secs())]);
        }
        self.json(rb).await
    }

    pub async fn delete_template(&self, name: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &Self::path(paths::TEMPLATE, &[("name", name)]))).await.map(drop)
    }

    pub async fn system(&self) -> Result<SystemInfo> {
        self.json(self.request(Method::GET, paths::SYSTEM)).await
    }
}

async fn api_error(resp: Response) -> Error {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => Error::Api { status, code: b.error.code, message: b.error.message },
        Err(_) => Error::Api { status, code: "http_error".into(), message: format!("HTTP {status}: {text}") },
    }
}
