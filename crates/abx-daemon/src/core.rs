//! The one internal command type. Every frontend (HTTP API, CLI through it, later the E2B
//! facade and MCP) turns a request into a [`Command`] and gets an [`Outcome`] back from
//! [`Core::execute`], so rules that apply to every request live in one place.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use abx_api::{
    BuildEvent, BuildTemplate, CreateSandbox, ExecRequest, MkdirRequest, RenameRequest, RunRequest, SandboxStats,
    SystemInfo,
};
use abx_proto::{ExecSpec, FileInfo, Kind, ProcessInfo, Request, TtySize};
use base64::Engine;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::agent::{self, AgentConn, CallError};
use crate::auth::Caller;
use crate::error::{CoreError, CoreResult};
use crate::manager::Manager;
use crate::sandbox::Sandbox;
use crate::validate;

/// A stream of bytes (request or response bodies).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Everything agentbox can be asked to do.
pub enum Command {
    CreateSandbox(CreateSandbox),
    /// Create, run one command, destroy (the destroy is the caller's: see [`RunSession`]).
    Run(RunRequest),
    ListSandboxes,
    GetSandbox {
        id: String,
    },
    DeleteSandbox {
        id: String,
        force: bool,
    },
    SetTimeout {
        id: String,
        timeout_secs: u64,
    },
    SandboxStats {
        id: String,
    },
    Exec {
        id: String,
        req: ExecRequest,
    },
    ListProcesses {
        id: String,
    },
    Signal {
        id: String,
        pid: u32,
        signal: i32,
        group: bool,
    },
    Stdin {
        id: String,
        pid: u32,
        data: Vec<u8>,
        close: bool,
    },
    Resize {
        id: String,
        pid: u32,
        size: TtySize,
    },
    Attach {
        id: String,
        pid: u32,
    },
    ReadFile {
        id: String,
        path: String,
        user: Option<String>,
    },
    WriteFile {
        id: String,
        path: String,
        user: Option<String>,
        mode: Option<u32>,
        parents: bool,
        body: ByteStream,
    },
    ListDir {
        id: String,
        path: String,
        user: Option<String>,
        depth: u32,
    },
    Stat {
        id: String,
        path: String,
        user: Option<String>,
    },
    Mkdir {
        id: String,
        req: MkdirRequest,
    },
    Remove {
        id: String,
        path: String,
        user: Option<String>,
        recursive: bool,
    },
    Rename {
        id: String,
        req: RenameRequest,
    },
    ArchiveRead {
        id: String,
        path: String,
        user: Option<String>,
    },
    ArchiveWrite {
        id: String,
        path: String,
        user: Option<String>,
        body: ByteStream,
    },
    ListTemplates,
    GetTemplate {
        name: String,
    },
    BuildTemplate(BuildTemplate),
    DeleteTemplate {
        name: String,
    },
    SystemInfo,
    Pause {
        id: String,
    },
    Diff {
        id: String,
        archive: bool,
        /// Since this snapshot instead of since the template.
        since: Option<String>,
        /// Deletions in the archive as OCI whiteout files.
        whiteouts: bool,
    },
    Stop {
        id: String,
        /// Between SIGTERM and SIGKILL.
        grace: std::time::Duration,
    },
    Start {
        id: String,
    },
    CreateSnapshot {
        id: String,
        req: abx_api::CreateSnapshot,
    },
    ListSnapshots {
        /// Only those of this sandbox.
        sandbox: Option<String>,
    },
    GetSnapshot {
        id: String,
    },
    DeleteSnapshot {
        id: String,
    },
    /// From a sandbox or a snapshot (id or name).
    Fork {
        source: String,
        req: abx_api::ForkRequest,
    },
    Rollback {
        id: String,
        snapshot: String,
    },
    CreateVolume(abx_api::CreateVolume),
    ListVolumes,
    GetVolume {
        name: String,
    },
    DeleteVolume {
        name: String,
    },
    RefreshTemplate {
        name: String,
    },
    CreateKey(abx_api::CreateKey),
    ListKeys,
    DeleteKey {
        id: String,
    },
    TagTemplate {
        name: String,
        target: String,
    },
    PruneBuildCache {
        /// Only the entries no build made or used for this many seconds.
        unused_for_secs: Option<u64>,
    },
    SetPool {
        template: String,
        req: abx_api::SetPool,
    },
    ListPools,
    GetPool {
        template: String,
    },
    DeletePool {
        template: String,
    },
    Resume {
        id: String,
    },
    SetNetwork {
        id: String,
        policy: abx_api::NetworkPolicy,
    },
    SetIngress {
        id: String,
        req: abx_api::SetIngress,
    },
    NetworkLog {
        id: String,
    },
    NetworkTest {
        id: String,
    },
    /// The kept egress audits of removed sandboxes.
    KeptAudits,
    PortUrl {
        id: String,
        port: u16,
    },
    /// Prometheus text.
    Metrics,
}

/// What a command produced.
pub enum Outcome {
    Done,
    Sandbox(abx_api::Sandbox),
    /// The sandbox an earlier create with the same idempotency key made.
    Existing(abx_api::Sandbox),
    Sandboxes(Vec<abx_api::Sandbox>),
    Stats(SandboxStats),
    /// A process attached to the caller.
    Exec(ExecSession),
    Run(RunSession),
    /// A background process started.
    Started(u32),
    Processes(Vec<ProcessInfo>),
    /// A file's metadata and the connection its content streams on (`Data`… `Eof`).
    Content(FileInfo, AgentConn),
    FileInfo(FileInfo),
    Files(Vec<FileInfo>),
    Templates(Vec<abx_api::Template>),
    Template(abx_api::Template),
    Build(mpsc::Receiver<BuildEvent>),
    System(SystemInfo),
    NetLog(abx_api::NetLog),
    KeptAudits(Vec<abx_api::KeptAudit>),
    NetTest(abx_api::NetTestReport),
    PortUrl(abx_api::PortUrl),
    Text(String),
    Diff(abx_api::Diff, Option<Vec<u8>>),
    Snapshot(abx_api::Snapshot),
    Snapshots(Vec<abx_api::Snapshot>),
    /// And whether this request made them (not an earlier one with the same key).
    Fork(abx_api::ForkResult, bool),
    Volume(abx_api::Volume),
    Volumes(Vec<abx_api::Volume>),
    Pool(abx_api::Pool),
    Pools(Vec<abx_api::Pool>),
    Strings(Vec<String>),
    Key(abx_api::ApiKey),
    Keys(Vec<abx_api::ApiKey>),
}

macro_rules! accessor {
    ($name:ident, $variant:ident, $t:ty) => {
        pub fn $name(self) -> CoreResult<$t> {
            match self {
                Outcome::$variant(v) => Ok(v),
                _ => Err(CoreError::internal("unexpected outcome", stringify!($variant))),
            }
        }
    };
}

impl Outcome {
    /// A sandbox, made now or (`Existing`) by an earlier create with the same key.
    pub fn sandbox(self) -> CoreResult<abx_api::Sandbox> {
        self.created().map(|(sb, _)| sb)
    }

    /// A created sandbox and whether this request made it (not an earlier one with the
    /// same idempotency key).
    pub fn created(self) -> CoreResult<(abx_api::Sandbox, bool)> {
        match self {
            Outcome::Sandbox(sb) => Ok((sb, true)),
            Outcome::Existing(sb) => Ok((sb, false)),
            _ => Err(CoreError::internal("unexpected outcome", "Sandbox")),
        }
    }
    accessor!(sandboxes, Sandboxes, Vec<abx_api::Sandbox>);
    accessor!(stats, Stats, SandboxStats);
    accessor!(exec, Exec, ExecSession);
    accessor!(run, Run, RunSession);
    accessor!(started, Started, u32);
    accessor!(processes, Processes, Vec<ProcessInfo>);
    accessor!(file_info, FileInfo, FileInfo);
    accessor!(files, Files, Vec<FileInfo>);
    accessor!(templates, Templates, Vec<abx_api::Template>);
    accessor!(template, Template, abx_api::Template);
    accessor!(build, Build, mpsc::Receiver<BuildEvent>);
    accessor!(system, System, SystemInfo);
    accessor!(net_log, NetLog, abx_api::NetLog);
    accessor!(kept_audits, KeptAudits, Vec<abx_api::KeptAudit>);
    accessor!(net_test, NetTest, abx_api::NetTestReport);
    accessor!(port_url, PortUrl, abx_api::PortUrl);
    accessor!(text, Text, String);
    accessor!(snapshot, Snapshot, abx_api::Snapshot);
    accessor!(snapshots, Snapshots, Vec<abx_api::Snapshot>);
    pub fn fork(self) -> CoreResult<abx_api::ForkResult> {
        self.forked().map(|(r, _)| r)
    }

    /// A fork's sandboxes and whether this request made them.
    pub fn forked(self) -> CoreResult<(abx_api::ForkResult, bool)> {
        match self {
            Outcome::Fork(r, made) => Ok((r, made)),
            _ => Err(CoreError::internal("unexpected outcome", "Fork")),
        }
    }
    accessor!(volume, Volume, abx_api::Volume);
    accessor!(volumes, Volumes, Vec<abx_api::Volume>);
    accessor!(pool, Pool, abx_api::Pool);
    accessor!(strings, Strings, Vec<String>);
    accessor!(key, Key, abx_api::ApiKey);
    accessor!(keys, Keys, Vec<abx_api::ApiKey>);
    accessor!(pools, Pools, Vec<abx_api::Pool>);

    pub fn diff(self) -> CoreResult<(abx_api::Diff, Option<Vec<u8>>)> {
        match self {
            Outcome::Diff(d, t) => Ok((d, t)),
            _ => Err(CoreError::internal("unexpected outcome", "Diff")),
        }
    }

    pub fn content(self) -> CoreResult<(FileInfo, AgentConn)> {
        match self {
            Outcome::Content(i, c) => Ok((i, c)),
            _ => Err(CoreError::internal("unexpected outcome", "Content")),
        }
    }
}

/// A process attached over an agent connection.
#[derive(Debug)]
pub struct ExecSession {
    pub pid: u32,
    pub conn: AgentConn,
    /// Keeps the sandbox from being paused for idleness while attached.
    pub attached: crate::sandbox::Attached,
    /// For errors: a stream cut by a stop, rollback or removal says so.
    pub sandbox: Arc<Sandbox>,
}

/// A one-shot run: the new sandbox, its process, and the guard that destroys it.
#[derive(Debug)]
pub struct RunSession {
    pub sandbox: abx_api::Sandbox,
    pub session: ExecSession,
    pub guard: DestroyGuard,
}

/// Destroys a sandbox when told to, or when dropped (a client that went away).
#[derive(Debug)]
pub struct DestroyGuard {
    manager: Arc<Manager>,
    id: Option<String>,
}

impl DestroyGuard {
    pub fn new(manager: Arc<Manager>, id: String) -> Self {
        DestroyGuard { manager, id: Some(id) }
    }

    pub async fn destroy(mut self) -> CoreResult<()> {
        match self.id.take() {
            Some(id) => self.manager.destroy(&id, true).await,
            None => Ok(()),
        }
    }
}

impl Drop for DestroyGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let m = self.manager.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = m.destroy(&id, true).await;
                });
            }
        }
    }
}

/// Output and lifecycle of an attached process.
#[derive(Debug)]
pub enum ExecOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(abx_proto::ExitStatus),
}

impl ExecSession {
    /// The next piece of output, or the exit (then `None` forever). `None` before the
    /// exit: the agent went away. A stream cut because the sandbox was stopped, restarted
    /// or removed meanwhile is an error naming that (see [`interrupted`]).
    pub async fn next(&mut self) -> CoreResult<Option<ExecOutput>> {
        match self.read().await {
            Err(e) => Err(interrupted(&self.sandbox, e)),
            Ok(None) => cut_short(&self.sandbox).map_or(Ok(None), Err),
            found => found,
        }
    }

    async fn read(&mut self) -> CoreResult<Option<ExecOutput>> {
        loop {
            let Some(frame) = self.conn.next().await? else { return Ok(None) };
            match frame.kind {
                Kind::Stdout => return Ok(Some(ExecOutput::Stdout(frame.payload))),
                Kind::Stderr => return Ok(Some(ExecOutput::Stderr(frame.payload))),
                Kind::Json => match frame.json::<abx_proto::Event>() {
                    Ok(abx_proto::Event::Exit(st)) => return Ok(Some(ExecOutput::Exit(st))),
                    Ok(abx_proto::Event::Started { .. }) => continue,
                    Err(e) => return Err(CallError::Protocol(e).into()),
                },
                _ => continue,
            }
        }
    }
}

/// The sandbox a command acts on, by id or name (a fork's source may be a snapshot
/// instead).
fn addressed_sandbox(cmd: &Command) -> Option<&str> {
    use Command as C;
    match cmd {
        C::ListSnapshots { sandbox: Some(id) }
        | C::GetSandbox { id }
        | C::DeleteSandbox { id, .. }
        | C::SetTimeout { id, .. }
        | C::SandboxStats { id }
        | C::Exec { id, .. }
        | C::ListProcesses { id }
        | C::Signal { id, .. }
        | C::Stdin { id, .. }
        | C::Resize { id, .. }
        | C::Attach { id, .. }
        | C::ReadFile { id, .. }
        | C::WriteFile { id, .. }
        | C::ListDir { id, .. }
        | C::Stat { id, .. }
        | C::Mkdir { id, .. }
        | C::Remove { id, .. }
        | C::Rename { id, .. }
        | C::ArchiveRead { id, .. }
        | C::ArchiveWrite { id, .. }
        | C::Pause { id }
        | C::Resume { id }
        | C::Stop { id, .. }
        | C::Start { id }
        | C::CreateSnapshot { id, .. }
        | C::SetNetwork { id, .. }
        | C::SetIngress { id, .. }
        | C::NetworkLog { id }
        | C::NetworkTest { id }
        | C::PortUrl { id, .. }
        | C::Diff { id, .. }
        | C::Rollback { id, .. } => Some(id),
        C::Fork { source, .. } => Some(source),
        _ => None,
    }
}

/// The daemon core.
#[derive(Debug, Clone)]
pub struct Core {
    pub manager: Arc<Manager>,
}

impl Core {
    pub fn new(manager: Arc<Manager>) -> Self {
        Core { manager }
    }

    /// Runs one command for the caller of the current request ([`crate::auth::caller`]):
    /// a tenant's key reaches only that tenant's sandboxes, snapshots and volumes.
    pub async fn execute(&self, cmd: Command) -> CoreResult<Outcome> {
        let tenant = match crate::auth::caller() {
            Some(Caller::Admin) => None,
            Some(Caller::Tenant(t)) => Some(t),
            // Every listener says whom a request acts for; a task that lost it acts for
            // nobody rather than for everyone.
            None => return Err(CoreError::Forbidden("a request that acts for nobody (an internal error)".into())),
        };
        // A request being served is activity until it is answered, however long it takes
        // (a slow upload, an agent slow to start a process): idle auto-pause froze the
        // sandbox under it, and the agent then never answered.
        let mut busy = None;
        if let Some(key) = addressed_sandbox(&cmd)
            && let Ok(sb) = self.manager.get(key)
        {
            // A build's step sandboxes are the build's alone: not found by anyone.
            if sb.read(|r| r.build_step) {
                return Err(CoreError::not_found("sandbox", key));
            }
            busy = Some(sb.attach());
        }
        let out = match tenant {
            None => self.dispatch(cmd).await?,
            Some(tenant) => {
                self.authorize(&tenant, &cmd)?;
                let mine = |t: &Option<String>| t.as_deref() == Some(tenant.as_str());
                match self.dispatch(cmd).await? {
                    Outcome::Sandboxes(v) => Outcome::Sandboxes(v.into_iter().filter(|s| mine(&s.tenant)).collect()),
                    Outcome::Snapshots(v) => Outcome::Snapshots(v.into_iter().filter(|s| mine(&s.tenant)).collect()),
                    Outcome::Volumes(v) => Outcome::Volumes(v.into_iter().filter(|s| mine(&s.tenant)).collect()),
                    Outcome::KeptAudits(v) => Outcome::KeptAudits(v.into_iter().filter(|s| mine(&s.tenant)).collect()),
                    o => o,
                }
            }
        };
        // A download goes on after the answer, as fast as the client reads it: the
        // sandbox stays busy until it ends (frozen under it, the transfer hung for good).
        Ok(match out {
            Outcome::Content(info, mut conn) => {
                conn.busy = busy.take();
                Outcome::Content(info, conn)
            }
            o => o,
        })
    }

    /// What a tenant's key may do: anything with its own sandboxes, snapshots and volumes
    /// (another tenant's are "not found", as if they did not exist); templates and warm
    /// pools, which every tenant shares, only to use; keys not at all.
    fn authorize(&self, tenant: &str, cmd: &Command) -> CoreResult<()> {
        use Command as C;
        let m = &self.manager;
        let own = |t: Option<&str>| t == Some(tenant);
        let sandbox = |key: &str| match m.get(key) {
            Ok(sb) if sb.read(|r| own(r.tenant.as_deref())) => Ok(()),
            _ => Err(CoreError::not_found("sandbox", key)),
        };
        let snapshot = |key: &str| match m.find_snapshot(key) {
            Ok(s) if own(s.tenant.as_deref()) => Ok(()),
            _ => Err(CoreError::not_found("snapshot", key)),
        };
        let volume = |name: &str| match m.volume_records()?.into_iter().find(|v| v.name == name) {
            Some(v) if own(v.tenant.as_deref()) => Ok(()),
            _ => Err(CoreError::not_found("volume", name)),
        };
        let volumes = |req: &CreateSandbox| req.volumes.iter().try_for_each(|v| volume(&v.name));
        let shared = |what: &str| {
            Err(CoreError::Forbidden(format!(
                "{what} are shared by every tenant: a tenant's key may use them but not change them \
                 (use a key without a tenant, or the unix socket)"
            )))
        };
        match cmd {
            C::CreateSandbox(req) => volumes(req),
            C::Run(req) => volumes(&req.sandbox),
            C::ListSandboxes
            | C::ListSnapshots { sandbox: None }
            | C::CreateVolume(_)
            | C::ListVolumes
            | C::ListTemplates
            | C::GetTemplate { .. }
            | C::ListPools
            | C::GetPool { .. }
            | C::SystemInfo
            | C::KeptAudits
            | C::Metrics => Ok(()),
            C::GetSnapshot { id } | C::DeleteSnapshot { id } => snapshot(id),
            C::Fork { source, .. } => match m.get(source) {
                Ok(_) => sandbox(source),
                Err(_) => snapshot(source).map_err(|_| CoreError::not_found("sandbox or snapshot", source.as_str())),
            },
            C::GetVolume { name } | C::DeleteVolume { name } => volume(name),
            // The audit of a removed sandbox is its tenant's, as the sandbox was.
            C::NetworkLog { id } if m.get(id).is_err() => match m.net.as_ref().and_then(|n| n.kept_sandbox(id)) {
                Some(kept) if own(kept.tenant.as_deref()) => Ok(()),
                _ => Err(CoreError::not_found("sandbox", id.as_str())),
            },
            C::BuildTemplate(_)
            | C::DeleteTemplate { .. }
            | C::RefreshTemplate { .. }
            | C::TagTemplate { .. }
            | C::PruneBuildCache { .. } => shared("templates"),
            C::SetPool { .. } | C::DeletePool { .. } => shared("warm pools"),
            C::CreateKey(_) | C::ListKeys | C::DeleteKey { .. } => {
                Err(CoreError::Forbidden("API keys are managed on the unix socket only".into()))
            }
            C::Diff { id, since: Some(s), .. } | C::Rollback { id, snapshot: s } => {
                sandbox(id).and_then(|()| snapshot(s))
            }
            // The rest act on one sandbox; a command that named none would be refused.
            _ => match addressed_sandbox(cmd) {
                Some(key) => sandbox(key),
                None => Err(CoreError::Forbidden("this request is not open to a tenant's key".into())),
            },
        }
    }

    /// Runs one command, unchecked.
    async fn dispatch(&self, cmd: Command) -> CoreResult<Outcome> {
        let m = &self.manager;
        match cmd {
            Command::CreateSandbox(req) => {
                let (sb, made) = m.create_for_request(req, false).await?;
                let api = m.api(&sb.record());
                Ok(if made { Outcome::Sandbox(api) } else { Outcome::Existing(api) })
            }
            Command::Run(req) => {
                let (sb, _) = m.create_for_request(req.sandbox, true).await?;
                let guard = DestroyGuard::new(m.clone(), sb.id.clone());
                let session = self.exec(&sb.id, req.exec).await?.exec()?;
                Ok(Outcome::Run(RunSession { sandbox: m.api(&sb.record()), session, guard }))
            }
            Command::ListSandboxes => {
                Ok(Outcome::Sandboxes(m.list().iter().filter(|r| !r.build_step).map(|r| m.api(r)).collect()))
            }
            Command::GetSandbox { id } => Ok(Outcome::Sandbox(m.api(&m.get(&id)?.record()))),
            Command::DeleteSandbox { id, force } => m.destroy(&id, force).await.map(|_| Outcome::Done),
            Command::SetTimeout { id, timeout_secs } => {
                Ok(Outcome::Sandbox(m.api(&m.set_timeout(&id, timeout_secs).await?)))
            }
            Command::SandboxStats { id } => self.stats(&id).await.map(Outcome::Stats),
            Command::Exec { id, req } => self.exec(&id, req).await,
            Command::ListProcesses { id } => self.call(&id, &Request::ListProcesses).await.map(Outcome::Processes),
            Command::Signal { id, pid, signal, group } => {
                self.call::<()>(&id, &Request::Signal { pid, signal, group }).await.map(|_| Outcome::Done)
            }
            Command::Stdin { id, pid, data, close } => {
                self.call::<()>(&id, &Request::Input { pid, data, close }).await.map(|_| Outcome::Done)
            }
            Command::Resize { id, pid, size } => {
                self.call::<()>(&id, &Request::Resize { pid, size }).await.map(|_| Outcome::Done)
            }
            Command::Attach { id, pid } => {
                let sb = self.running(&id).await?;
                let (conn, pid) = start_process(&sb, &Request::Attach { pid, replay: true }).await?;
                Ok(Outcome::Exec(ExecSession { pid, conn, attached: sb.attach(), sandbox: sb.clone() }))
            }
            Command::ReadFile { id, path, user } => {
                let user = self.user(&id, user)?;
                let (info, conn) = self.open_read(&id, Request::ReadFile { path, user }).await?;
                Ok(Outcome::Content(info, conn))
            }
            Command::WriteFile { id, path, user, mode, parents, body } => {
                let user = self.user(&id, user)?;
                let req = Request::WriteFile { path, user, mode, parents, append: false };
                self.upload(&id, req, body).await.map(Outcome::FileInfo)
            }
            Command::ListDir { id, path, user, depth } => {
                let user = self.user(&id, user)?;
                self.call(&id, &Request::ListDir { path, user, depth }).await.map(Outcome::Files)
            }
            Command::Stat { id, path, user } => {
                let user = self.user(&id, user)?;
                self.call(&id, &Request::Stat { path, user }).await.map(Outcome::FileInfo)
            }
            Command::Mkdir { id, req } => {
                let user = self.user(&id, req.user)?;
                let r = Request::Mkdir { path: req.path, user, parents: req.parents, mode: req.mode };
                self.call(&id, &r).await.map(Outcome::FileInfo)
            }
            Command::Remove { id, path, user, recursive } => {
                let user = self.user(&id, user)?;
                self.call::<()>(&id, &Request::Remove { path, user, recursive }).await.map(|_| Outcome::Done)
            }
            Command::Rename { id, req } => {
                let user = self.user(&id, req.user)?;
                self.call(&id, &Request::Rename { from: req.from, to: req.to, user }).await.map(Outcome::FileInfo)
            }
            Command::ArchiveRead { id, path, user } => {
                let user = self.user(&id, user)?;
                let (info, conn) = self.open_read(&id, Request::ArchiveRead { path, user }).await?;
                Ok(Outcome::Content(info, conn))
            }
            Command::ArchiveWrite { id, path, user, body } => {
                let user = self.user(&id, user)?;
                let req = Request::ArchiveWrite { path, user };
                self.upload::<()>(&id, req, body).await.map(|_| Outcome::Done)
            }
            Command::ListTemplates => crate::templates::list(m).map(Outcome::Templates),
            Command::GetTemplate { name } => crate::templates::get(m, &name).map(Outcome::Template),
            Command::BuildTemplate(req) => crate::templates::build(m, req).map(Outcome::Build),
            Command::DeleteTemplate { name } => crate::templates::remove(m, &name).await.map(|_| Outcome::Done),
            Command::SystemInfo => Ok(Outcome::System(self.system_info())),
            Command::Diff { id, archive, since, whiteouts } => {
                let (d, tar) = m.diff(&id, archive.then_some(whiteouts), since.as_deref()).await?;
                Ok(Outcome::Diff(d, tar))
            }
            Command::Stop { id, grace } => Ok(Outcome::Sandbox(m.api(&m.stop(&id, grace).await?))),
            Command::Start { id } => Ok(Outcome::Sandbox(m.api(&m.start(&id).await?))),
            Command::CreateSnapshot { id, req } => Ok(Outcome::Snapshot(m.snapshot(&id, req.name).await?.to_api())),
            Command::ListSnapshots { sandbox } => {
                let only = sandbox.as_ref().map(|k| m.get(k).map(|sb| sb.id.clone()).unwrap_or_else(|_| k.clone()));
                let v = m.snapshots()?;
                Ok(Outcome::Snapshots(
                    v.iter().filter(|s| only.as_ref().is_none_or(|o| &s.sandbox == o)).map(|s| s.to_api()).collect(),
                ))
            }
            Command::GetSnapshot { id } => Ok(Outcome::Snapshot(m.find_snapshot(&id)?.to_api())),
            Command::DeleteSnapshot { id } => m.delete_snapshot(&id).await.map(|_| Outcome::Done),
            Command::Fork { source, req } => m.fork(&source, req).await.map(|(r, made)| Outcome::Fork(r, made)),
            Command::Rollback { id, snapshot } => Ok(Outcome::Sandbox(m.api(&m.rollback(&id, &snapshot).await?))),
            Command::CreateVolume(req) => m.create_volume(&req.name).await.map(Outcome::Volume),
            Command::ListVolumes => m.volumes().await.map(Outcome::Volumes),
            Command::GetVolume { name } => m.volume(&name).await.map(Outcome::Volume),
            Command::DeleteVolume { name } => m.delete_volume(&name).await.map(|_| Outcome::Done),
            Command::TagTemplate { name, target } => crate::templates::tag(m, &name, &target).map(Outcome::Template),
            Command::CreateKey(req) => {
                let (rec, key) = m.auth.create(m.store(), req.tenant)?;
                Ok(Outcome::Key(key_api(rec, Some(key))))
            }
            Command::ListKeys => Ok(Outcome::Keys(m.auth.list().into_iter().map(|k| key_api(k, None)).collect())),
            Command::DeleteKey { id } => m.auth.delete(m.store(), &id).map(|_| Outcome::Done),
            Command::RefreshTemplate { name } => crate::build::refresh(m, &name).map(Outcome::Build),
            Command::PruneBuildCache { unused_for_secs } => {
                crate::templates::prune(m, unused_for_secs.map(std::time::Duration::from_secs))
                    .await
                    .map(Outcome::Strings)
            }
            Command::SetPool { template, req } => m.set_pool(&template, req.min, req.max).await.map(Outcome::Pool),
            Command::ListPools => Ok(Outcome::Pools(m.pools.list())),
            Command::GetPool { template } => m.pool(&template).map(Outcome::Pool),
            Command::DeletePool { template } => m.delete_pool(&template).await.map(|_| Outcome::Done),
            Command::Pause { id } => Ok(Outcome::Sandbox(m.api(&m.pause(&id).await?))),
            Command::Resume { id } => Ok(Outcome::Sandbox(m.api(&m.resume(&id).await?))),
            Command::SetNetwork { id, policy } => Ok(Outcome::Sandbox(m.api(&m.set_network(&id, policy).await?))),
            Command::SetIngress { id, req } => Ok(Outcome::Sandbox(m.api(&m.set_ingress(&id, req).await?))),
            Command::NetworkLog { id } => match m.get(&id) {
                Ok(sb) => {
                    let (events, dropped) = m.net.as_ref().map(|n| n.log(&sb.id)).unwrap_or_default();
                    Ok(Outcome::NetLog(abx_api::NetLog { events, dropped, removed_at: None }))
                }
                // A removed sandbox's audit, while it is kept.
                Err(e) => match m.net.as_ref().and_then(|n| n.kept_log(&id)) {
                    Some((kept, events, dropped)) => {
                        Ok(Outcome::NetLog(abx_api::NetLog { events, dropped, removed_at: Some(kept.removed_at) }))
                    }
                    None => Err(e),
                },
            },
            Command::KeptAudits => Ok(Outcome::KeptAudits(m.net.as_ref().map(|n| n.kept_audits()).unwrap_or_default())),
            Command::NetworkTest { id } => {
                let sb = self.running(&id).await?;
                crate::net::probe::run(m, &sb).await.map(Outcome::NetTest)
            }
            Command::PortUrl { id, port } => {
                let sb = m.get(&id)?;
                let net =
                    m.net.as_ref().ok_or_else(|| CoreError::Invalid("this daemon runs without networking".into()))?;
                let ingress = net.ingress_addr().ok_or_else(|| {
                    CoreError::Invalid("the ingress proxy is off (start the daemon with --ingress tcp:ADDR)".into())
                })?;
                if port == 0 {
                    return Err(CoreError::Invalid("port must be 1-65535".into()));
                }
                let host = format!("{port}-{}.{}", sb.id, net.cfg.domain);
                Ok(Outcome::PortUrl(abx_api::PortUrl {
                    url: format!("http://{host}:{}", ingress.port()),
                    ingress: ingress.to_string(),
                    host,
                    token: sb.read(|r| r.ingress_token.clone()),
                }))
            }
            Command::Metrics => Ok(Outcome::Text(self.metrics())),
        }
    }

    fn metrics(&self) -> String {
        use std::fmt::Write;
        let m = &self.manager;
        let mut out = String::new();
        let _ = writeln!(out, "# HELP agentbox_sandboxes Sandboxes known to the daemon.");
        let _ = writeln!(out, "# TYPE agentbox_sandboxes gauge");
        let _ = writeln!(out, "agentbox_sandboxes {}", m.count());
        let _ = writeln!(out, "# HELP agentbox_prepared_slots Slots with namespaces made ahead of demand.");
        let _ = writeln!(out, "# TYPE agentbox_prepared_slots gauge");
        let _ = writeln!(out, "agentbox_prepared_slots {}", m.prepared());
        if let Some(net) = &m.net {
            net.metrics(&mut out);
        }
        m.pools.metrics(&mut out);
        out
    }

    /// The sandbox, running: a paused one is resumed first (any request to a sandbox
    /// resumes it).
    pub(crate) async fn running(&self, key: &str) -> CoreResult<Arc<Sandbox>> {
        self.manager.get(key)?.touch();
        // Rather than fail a request that came in during a rollback, restart, stop or start.
        let sb = self.manager.settled(key).await?;
        match sb.state() {
            abx_api::SandboxState::Running => Ok(sb),
            abx_api::SandboxState::Paused => {
                self.manager.resume(&sb.id).await?;
                Ok(sb)
            }
            s => Err(CoreError::Conflict(format!("sandbox {} is {}, not running", sb.id, state_name(s)))),
        }
    }

    /// An exchange with sandbox `key`'s agent that broke: if the sandbox was removed,
    /// stopped or restarted meanwhile, a conflict naming that (see [`interrupted`]).
    pub(crate) fn broken(&self, key: &str, e: CoreError) -> CoreError {
        if !matches!(e, CoreError::Agent(CallError::Unreachable(_) | CallError::Protocol(_))) {
            return e;
        }
        match self.manager.get(key) {
            Ok(sb) => interrupted(&sb, e),
            Err(_) => CoreError::Conflict(format!("sandbox {key} was removed while the request ran")),
        }
    }

    /// The effective user of a file operation: the caller's, else the sandbox default.
    fn user(&self, key: &str, user: Option<String>) -> CoreResult<Option<String>> {
        if let Some(u) = &user {
            validate::user(u)?;
        }
        Ok(user.or_else(|| self.manager.get(key).ok().and_then(|sb| sb.read(|r| r.user.clone()))))
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, key: &str, req: &Request) -> CoreResult<T> {
        let sb = self.running(key).await?;
        agent::call(&sb.dirs.agent_socket(), req).await.map_err(|e| interrupted(&sb, e.into()))
    }

    async fn open_read(&self, key: &str, req: Request) -> CoreResult<(FileInfo, AgentConn)> {
        let sb = self.running(key).await?;
        let opened = async {
            let mut conn = AgentConn::open(&sb.dirs.agent_socket(), &req).await?;
            let info = conn.reply().await?;
            Ok((info, conn))
        };
        opened.await.map_err(|e| interrupted(&sb, e))
    }

    /// Streams `body` to the agent with `req` and returns its reply. (An error answered
    /// before the body's end waits for the rest of it: `server::read_rest_after_error`.)
    async fn upload<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        req: Request,
        mut body: ByteStream,
    ) -> CoreResult<T> {
        let sb = self.running(key).await?;
        let mut conn = AgentConn::open(&sb.dirs.agent_socket(), &req).await.map_err(|e| interrupted(&sb, e.into()))?;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| CoreError::Invalid(format!("reading request body: {e}")))?;
            if conn.writer.send_chunked(Kind::Data, &chunk).await.is_err() {
                // The agent stopped reading: it has replied with an error.
                break;
            }
        }
        let _ = conn.send(Kind::Eof, b"").await;
        conn.reply().await.map_err(|e| interrupted(&sb, e.into()))
    }

    async fn exec(&self, key: &str, req: ExecRequest) -> CoreResult<Outcome> {
        let sb = self.running(key).await?;
        let spec = self.exec_spec(&sb, &req)?;
        let stdin = match &req.stdin {
            Some(s) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| CoreError::Invalid(format!("stdin is not valid base64: {e}")))?,
            ),
            None => None,
        };
        let background = spec.background;
        let (mut conn, pid) = start_process(&sb, &Request::Exec(spec)).await?;
        if background {
            if let Some(data) = stdin {
                let _ = self.call::<()>(key, &Request::Input { pid, data, close: !req.interactive }).await;
            }
            return Ok(Outcome::Started(pid));
        }
        // A process that exits without reading all of its input (`true`, `head -c 1`) has
        // the agent finish the exchange and close its side: the write fails, and, as with
        // a pipe in a shell, the rest of the input is dropped. The exit is already on its
        // way; a stop or removal that broke the write shows when the stream is read
        // (`ExecSession::next`).
        if let Some(data) = stdin
            && conn.writer.send_chunked(Kind::Stdin, &data).await.is_ok()
            && !req.interactive
        {
            let _ = conn.send(Kind::Eof, b"").await;
        }
        Ok(Outcome::Exec(ExecSession { pid, conn, attached: sb.attach(), sandbox: sb.clone() }))
    }

    fn exec_spec(&self, sb: &Sandbox, req: &ExecRequest) -> CoreResult<ExecSpec> {
        if req.cmd.is_empty() || req.cmd[0].is_empty() {
            return Err(CoreError::Invalid("cmd must name a program to run".into()));
        }
        if req.cmd.iter().any(|a| a.contains('\0')) {
            return Err(CoreError::Invalid("cmd arguments must not contain NUL bytes".into()));
        }
        validate::env(&req.env)?;
        if let Some(c) = &req.cwd {
            validate::abs_path("cwd", c)?;
        }
        if let Some(u) = &req.user {
            validate::user(u)?;
        }
        let timeout_ms = match req.timeout_secs {
            Some(t) if !(t.is_finite() && t > 0.0) => {
                return Err(CoreError::Invalid(format!("timeout_secs must be positive, got {t}")));
            }
            // Rounded up: a timeout under a millisecond is one, not none.
            Some(t) => Some(((t * 1000.0).ceil() as u64).max(1)),
            None => None,
        };
        let rec = sb.record();
        let mut env: BTreeMap<String, String> = rec.env.clone();
        env.extend(req.env.clone());
        Ok(ExecSpec {
            argv: req.cmd.clone(),
            env,
            cwd: req.cwd.clone().or(rec.workdir.clone()),
            user: req.user.clone().or(rec.user.clone()),
            tty: req.tty,
            stdin: req.stdin.is_some() || req.interactive,
            timeout_ms,
            background: req.background,
            tag: req.tag.clone(),
        })
    }

    async fn stats(&self, key: &str) -> CoreResult<SandboxStats> {
        let sb = self.manager.get(key)?;
        // Only a sandbox in its slot has cgroups; a stopped one's slot may be another's.
        let state = sb.state();
        if !matches!(
            state,
            abx_api::SandboxState::Running | abx_api::SandboxState::Paused | abx_api::SandboxState::Exited
        ) {
            return Err(CoreError::Conflict(format!(
                "sandbox {} is {}: it has no processes to measure",
                sb.id,
                state_name(state)
            )));
        }
        let m = self.manager.clone();
        let cg = sb.cgroup.clone();
        let s = tokio::task::spawn_blocking(move || m.cgroups.stats(&cg))
            .await
            .map_err(|e| CoreError::internal("stats task", e.to_string()))?
            .map_err(|e| CoreError::internal(format!("read cgroup stats of {}", sb.id), e))?;
        Ok(SandboxStats {
            memory_bytes: s.memory_current,
            memory_peak_bytes: s.memory_peak,
            memory_limit_bytes: s.memory_limit,
            oom_kills: s.oom_kills.saturating_sub(sb.read(|r| r.oom_kills_base)),
            pids: s.pids_current,
            pids_limit: s.pids_limit,
            cpu_usage_usec: s.cpu_usage_usec,
        })
    }

    fn system_info(&self) -> SystemInfo {
        let m = &self.manager;
        SystemInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            root: m.cfg.root.display().to_string(),
            prefix: m.cfg.prefix.clone(),
            cgroup: format!("{:?}", m.cgroups.kind()).to_lowercase(),
            sandboxes: m.count(),
            build_steps: m.list().iter().filter(|r| r.build_step).count(),
            spawner_pid: m.spawner.pid().unwrap_or(0),
            daemon_pid: std::process::id(),
            prepared: m.prepared(),
            data: {
                let (used, available) = m.storage.usage().unwrap_or((0, 0));
                abx_api::DataInfo {
                    mode: m.storage.mode().into(),
                    slots: m.storage.slots.display().to_string(),
                    image: m.storage.image.as_ref().map(|i| i.file.display().to_string()),
                    used_bytes: used,
                    available_bytes: available,
                    read_only: m.storage.read_only(),
                }
            },
        }
    }
}

/// A request to a sandbox's agent that broke because the sandbox was stopped, restarted or
/// removed meanwhile (a concurrent request; its state changes before its processes go):
/// says so, as a conflict, instead of "broken exchange with the sandbox's agent".
pub(crate) fn interrupted(sb: &Sandbox, e: CoreError) -> CoreError {
    if !matches!(e, CoreError::Agent(CallError::Unreachable(_) | CallError::Protocol(_))) {
        return e;
    }
    cut_short(sb).unwrap_or(e)
}

/// The conflict for a request whose exchange with sandbox `sb`'s agent ended early: what
/// happened to the sandbox meanwhile (removed, stopped, restarted, ended); `None` while it
/// runs or is paused (then the agent itself went away).
pub(crate) fn cut_short(sb: &Sandbox) -> Option<CoreError> {
    use abx_api::SandboxState as S;
    let what = match sb.state() {
        S::Running | S::Paused => return None,
        S::Destroying => "removed",
        S::Stopping | S::Stopped => "stopped",
        S::Starting | S::Creating => "restarted (a rollback or start)",
        S::Exited => "ended (its first process exited)",
    };
    Some(CoreError::Conflict(format!("sandbox {} was {what} while the request ran", sb.id)))
}

/// Sends `req` (an exec or an attach) to the sandbox's agent and reads the process's
/// `started` event: the connection that streams it and its pid.
async fn start_process(sb: &Sandbox, req: &Request) -> CoreResult<(AgentConn, u32)> {
    let opened = async {
        let mut conn = AgentConn::open(&sb.dirs.agent_socket(), req).await?;
        let pid = started(&mut conn).await?;
        Ok((conn, pid))
    };
    let (conn, pid) = opened.await.map_err(|e| interrupted(sb, e))?;
    sb.update(|r| r.last_pid = r.last_pid.max(pid));
    Ok((conn, pid))
}

/// Reads the agent's answer to Exec/Attach: the Started event or an error reply.
async fn started(conn: &mut AgentConn) -> CoreResult<u32> {
    let frame = conn.reader.expect().await.map_err(CallError::from)?;
    let value: serde_json::Value = frame.json().map_err(CallError::from)?;
    if let Ok(abx_proto::Event::Started { pid }) = serde_json::from_value(value.clone()) {
        return Ok(pid);
    }
    match serde_json::from_value::<abx_proto::Reply<serde_json::Value>>(value) {
        Ok(abx_proto::Reply::Err(e)) => Err(CallError::Remote(e).into()),
        _ => Err(CallError::Protocol(abx_proto::ProtoError::Unexpected("expected a started event".into())).into()),
    }
}

fn key_api(k: crate::auth::KeyRecord, key: Option<String>) -> abx_api::ApiKey {
    abx_api::ApiKey { id: k.id, tenant: k.tenant, created_at: k.created_at, prefix: k.prefix, key }
}

pub fn state_name(s: abx_api::SandboxState) -> &'static str {
    match s {
        abx_api::SandboxState::Creating => "creating",
        abx_api::SandboxState::Running => "running",
        abx_api::SandboxState::Paused => "paused",
        abx_api::SandboxState::Exited => "exited",
        abx_api::SandboxState::Stopped => "stopped",
        abx_api::SandboxState::Destroying => "being destroyed",
        abx_api::SandboxState::Stopping => "stopping",
        abx_api::SandboxState::Starting => "starting",
    }
}

/// Parses a signal given as a number or a name (`TERM`, `SIGTERM`).
pub fn parse_signal(v: &serde_json::Value) -> CoreResult<i32> {
    const NAMES: [(&str, i32); 15] = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("ILL", 4),
        ("ABRT", 6),
        ("KILL", 9),
        ("USR1", 10),
        ("SEGV", 11),
        ("USR2", 12),
        ("PIPE", 13),
        ("ALRM", 14),
        ("TERM", 15),
        ("CONT", 18),
        ("STOP", 19),
        ("WINCH", 28),
    ];
    let bad = || CoreError::Invalid(format!("invalid signal {v}: use a number 1-64 or a name like TERM"));
    match v {
        serde_json::Value::Number(n) => n.as_i64().filter(|n| (1..=64).contains(n)).map(|n| n as i32).ok_or_else(bad),
        serde_json::Value::String(s) => {
            if let Ok(n) = s.parse::<i32>() {
                return if (1..=64).contains(&n) { Ok(n) } else { Err(bad()) };
            }
            let up = s.to_ascii_uppercase();
            let name = up.strip_prefix("SIG").unwrap_or(&up);
            NAMES.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).ok_or_else(bad)
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_signal;
    use serde_json::json;

    #[test]
    fn signals_by_number_and_name() {
        assert_eq!(parse_signal(&json!(9)).unwrap(), 9);
        assert_eq!(parse_signal(&json!("TERM")).unwrap(), 15);
        assert_eq!(parse_signal(&json!("sigint")).unwrap(), 2);
        assert_eq!(parse_signal(&json!("15")).unwrap(), 15);
        assert!(parse_signal(&json!("NOPE")).is_err());
        assert!(parse_signal(&json!(0)).is_err());
    }
}
