//! Time travel for environments: snapshots, forks, rollback, stop/start (persistent
//! sandboxes) and volumes.
//!
//! A sandbox's files are its slot's data tree (`data/upper` over the template's layers).
//! A **snapshot** is a read-only copy of that tree at one moment (on btrfs a snapshot of
//! the subvolume: constant time, every block shared), taken with the sandbox frozen. A
//! **fork** is a new sandbox whose data tree starts as a writable copy of a snapshot; a
//! **rollback** replaces a sandbox's data tree with one and restarts its processes.
//! **Stop** moves the data tree out of the slot (`<base>/kept/<id>`) and frees the slot;
//! **start** takes a slot and moves it back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abx_api::{CreateSandbox, ForkRequest, ForkResult, Limits, SandboxState, TimeoutAction, VolumeMount};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{CoreError, CoreResult};
use crate::manager::Manager;
use crate::sandbox::{Record, Sandbox, now};
use crate::store::Table;

/// Most sandboxes one fork makes.
pub const MAX_FORK: u32 = 100;

/// How long a stop waits, by default, for the processes to exit after SIGTERM before it
/// kills those left (as `docker stop`).
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Most volumes one sandbox mounts.
pub const MAX_VOLUMES: usize = 16;

/// A snapshot as stored (`snapshots` table); its files are `<base>/snapshots/<id>/upper`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapRecord {
    pub id: String,
    pub name: Option<String>,
    /// The tenant of its sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub sandbox: String,
    pub template: String,
    /// The template layers below it, bottom first.
    pub layers: Vec<String>,
    pub created_at: u64,
    pub frozen_ms: f64,
    #[serde(default)]
    pub size_bytes: u64,
    /// The source sandbox's settings, the defaults of sandboxes made from it.
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub network: abx_api::NetworkPolicy,
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The source sandbox's timeout (its length, not what was left of it) and what it did.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub on_timeout: abx_api::TimeoutAction,
    /// Whether the source sandbox's ports needed a token (forks get tokens of their own).
    #[serde(default)]
    pub ingress: abx_api::IngressAccess,
    /// Taken for a fork of a running sandbox and removed after it.
    #[serde(default)]
    pub transient: bool,
}

impl SnapRecord {
    pub fn to_api(&self) -> abx_api::Snapshot {
        abx_api::Snapshot {
            id: self.id.clone(),
            name: self.name.clone(),
            tenant: self.tenant.clone(),
            sandbox: self.sandbox.clone(),
            template: self.template.clone(),
            created_at: self.created_at,
            frozen_ms: self.frozen_ms,
            size_bytes: self.size_bytes,
        }
    }
}

/// A volume as stored (`volumes` table); its files are `<base>/volumes/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolRecord {
    pub name: String,
    pub created_at: u64,
    /// The tenant of the key that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

fn join_err(what: &str) -> impl FnOnce(tokio::task::JoinError) -> CoreError + '_ {
    move |e| CoreError::internal(format!("{what} task"), e.to_string())
}

/// Whether `n` is a valid snapshot or volume name (like template names).
pub(crate) fn is_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

fn check_name(kind: &str, n: &str) -> CoreResult<()> {
    if is_name(n) {
        Ok(())
    } else {
        Err(CoreError::Invalid(format!(
            "invalid {kind} name '{n}': use 1-63 of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

impl Manager {
    /// Where a sandbox's data tree is now: its slot's, or the kept one of a stopped sandbox.
    pub fn data_of(&self, rec: &Record) -> PathBuf {
        if rec.state == SandboxState::Stopped {
            self.storage.kept().join(&rec.id)
        } else {
            self.slot_dirs(rec.uid_slot).data()
        }
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.storage.snapshots().join(id)
    }

    // ---- snapshots ----

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> CoreResult<Vec<SnapRecord>> {
        let mut v: Vec<SnapRecord> = self
            .store()
            .all_in(Table::Snapshots)
            .map_err(|e| CoreError::internal("read snapshots", e))?
            .into_iter()
            .filter(|s: &SnapRecord| !s.transient)
            .collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(v)
    }

    /// A snapshot by id or name.
    pub fn find_snapshot(&self, key: &str) -> CoreResult<SnapRecord> {
        let all: Vec<SnapRecord> =
            self.store().all_in(Table::Snapshots).map_err(|e| CoreError::internal("read snapshots", e))?;
        if let Some(s) = all.iter().find(|s| s.id == key) {
            return Ok(s.clone());
        }
        let named = all
            .into_iter()
            .filter(|s| s.name.as_deref() == Some(key))
            .map(|s| (s.tenant.clone(), s.id.clone(), s))
            .collect();
        crate::manager::pick_named("snapshot", key, named)?.ok_or_else(|| CoreError::not_found("snapshot", key))
    }

    /// Snapshots a sandbox's files. A running sandbox is frozen while the snapshot is
    /// taken (after its dirty data was written out, so the freeze is short): every write
    /// that completed before the call is in the snapshot, none made after it returned.
    pub async fn snapshot(self: &Arc<Self>, key: &str, name: Option<String>) -> CoreResult<SnapRecord> {
        self.snapshot_inner(key, name, false).await
    }

    async fn snapshot_inner(
        self: &Arc<Self>,
        key: &str,
        name: Option<String>,
        transient: bool,
    ) -> CoreResult<SnapRecord> {
        // The snapshot is its sandbox's tenant's, and so is its name.
        let owner = self.get(key)?.read(|r| r.tenant.clone());
        // Held until the snapshot is recorded (this function's end).
        let _name = name
            .as_deref()
            .map(|n| check_name("snapshot", n).and_then(|_| self.reserve_name("name", owner.as_deref(), n)))
            .transpose()?;
        if let Some(n) = &name {
            match self.name_taken(owner.as_deref(), n)? {
                Some("snapshot") => return Err(CoreError::Conflict(format!("a snapshot named '{n}' already exists"))),
                // `fork` and `rollback` take either: one name must not mean both.
                Some(_) => {
                    return Err(CoreError::Conflict(format!(
                        "'{n}' already names a sandbox; give the snapshot another name"
                    )));
                }
                None => {}
            }
        }
        let (sb, _ops) = self.lock_ops(key).await?;
        let rec = sb.record();
        if !matches!(
            rec.state,
            SandboxState::Running | SandboxState::Paused | SandboxState::Exited | SandboxState::Stopped
        ) {
            return Err(CoreError::Conflict(format!(
                "sandbox {} is {}; only a running, paused, exited or stopped sandbox can be snapshotted",
                sb.id,
                crate::core::state_name(rec.state)
            )));
        }
        let id = crate::manager::new_id();
        let dest = self.snapshot_dir(&id);
        let scratch = self.snapshot_dir(&crate::cow::flush_scratch_name(&id));
        let data = self.data_of(&rec);
        let this = self.clone();
        let sb2 = sb.clone();
        let frozen_ms = tokio::task::spawn_blocking(move || -> CoreResult<f64> {
            let freeze = sb2.state() == SandboxState::Running;
            if freeze {
                crate::cow::flush(&data, &scratch);
            }
            let t = Instant::now();
            if freeze {
                this.cgroups
                    .freeze(&sb2.cgroup)
                    .map_err(|e| CoreError::internal(format!("freeze sandbox {}", sb2.id), e.to_string()))?;
            }
            let taken = crate::cow::snapshot(&data, &dest);
            if freeze && let Err(e) = this.cgroups.thaw(&sb2.cgroup) {
                warn!(sandbox = %sb2.id, error = %e, "thaw after a snapshot failed");
            }
            taken.map_err(|e| CoreError::internal(format!("snapshot sandbox {}", sb2.id), e))?;
            Ok(if freeze { t.elapsed().as_secs_f64() * 1e3 } else { 0.0 })
        })
        .await
        .map_err(join_err("snapshot"))??;
        let snap = SnapRecord {
            id: id.clone(),
            name,
            tenant: rec.tenant.clone(),
            sandbox: rec.id.clone(),
            template: rec.template.clone(),
            layers: rec.layers.clone(),
            created_at: now(),
            frozen_ms,
            size_bytes: 0,
            limits: rec.limits.clone(),
            env: rec.env.clone(),
            workdir: rec.workdir.clone(),
            user: rec.user.clone(),
            network: rec.network.clone(),
            volumes: rec.volumes.clone(),
            metadata: rec.metadata.clone(),
            timeout_secs: rec.timeout_secs,
            on_timeout: rec.on_timeout,
            ingress: rec.ingress_access(),
            transient,
        };
        if let Err(e) = self.store().put_in(Table::Snapshots, &id, &snap) {
            let _ = crate::cow::remove(&self.snapshot_dir(&id));
            return Err(CoreError::internal("record snapshot", e));
        }
        info!(sandbox = %rec.id, snapshot = %id, frozen_ms, "snapshot taken");
        if !transient {
            // The size is for listings; measured off the caller's path.
            let this = self.clone();
            let mut s = snap.clone();
            tokio::task::spawn_blocking(move || {
                s.size_bytes = crate::cow::usage(&this.snapshot_dir(&s.id).join("upper")).0;
                if this.find_snapshot(&s.id).is_ok() {
                    let _ = this.store().put_in(Table::Snapshots, &s.id, &s);
                }
            });
        }
        Ok(snap)
    }

    /// Deletes a snapshot. Sandboxes made from it keep their files (each has its own copy,
    /// sharing blocks on btrfs).
    pub async fn delete_snapshot(self: &Arc<Self>, key: &str) -> CoreResult<()> {
        let snap = self.find_snapshot(key)?;
        let this = self.clone();
        let id = snap.id.clone();
        tokio::task::spawn_blocking(move || {
            // Not while a fork, rollback or create copies it (`seed_slot`).
            let _gate = this.snapshot_gate.write().unwrap_or_else(|e| e.into_inner());
            this.store().delete_in(Table::Snapshots, &id).map_err(|e| CoreError::internal("delete snapshot", e))?;
            crate::cow::remove(&this.snapshot_dir(&id))
                .map_err(|e| CoreError::internal(format!("remove snapshot {id}"), e))
        })
        .await
        .map_err(join_err("snapshot removal"))??;
        self.collect_layers_if_due();
        Ok(())
    }

    /// Gives slot `slot` a writable copy of `snap` as its data tree (before sandbox `id`
    /// starts there). A snapshot removed since the caller found it is "not found".
    pub(crate) fn seed_slot(&self, slot: u32, snap: &SnapRecord, id: &str) -> CoreResult<()> {
        let _gate = self.snapshot_gate.read().unwrap_or_else(|e| e.into_inner());
        let dir = self.snapshot_dir(&snap.id);
        if !dir.exists() {
            return Err(CoreError::not_found("snapshot", &snap.id));
        }
        let data = self.slot_dirs(slot).data();
        crate::cow::clone_into(&dir, &data, self.storage.cow)
            .map_err(|message| CoreError::Setup { id: id.to_string(), message })
    }

    // ---- forks ----

    /// `count` new sandboxes from a snapshot, or from a sandbox (through a snapshot taken
    /// now and removed afterwards). All or nothing: if one cannot be made, the others are
    /// destroyed, and until all are made they are ephemeral (a daemon that dies in the
    /// middle leaves none behind for the next one to adopt).
    ///
    /// With an idempotency key: the sandboxes an earlier fork with the key made, if they
    /// exist (and `false`: not made now), as for a create.
    pub async fn fork(self: &Arc<Self>, source: &str, req: ForkRequest) -> CoreResult<(ForkResult, bool)> {
        let count = req.count.unwrap_or(1);
        if count == 0 || count > MAX_FORK {
            return Err(CoreError::Invalid(format!("fork count must be 1 to {MAX_FORK}, got {count}")));
        }
        let idempotency = crate::sandbox::Idempotency::of_fork(source, &req);
        let _held = match &idempotency {
            None => None,
            Some(i) => {
                crate::validate::idempotency_key(&i.key)?;
                let (held, made) = self.hold_idempotency(i).await?;
                if let Some(first) = made.first() {
                    let snapshot = first.read(|r| r.snapshot.clone());
                    let sandboxes = made.iter().map(|sb| self.api(&sb.record())).collect();
                    return Ok((ForkResult { snapshot, sandboxes }, false));
                }
                Some(held)
            }
        };
        let (snap, transient) = match self.get(source) {
            Ok(sb) => (self.snapshot_inner(&sb.id, None, true).await?, true),
            Err(_) => {
                (self.find_snapshot(source).map_err(|_| CoreError::not_found("sandbox or snapshot", source))?, false)
            }
        };
        let make = |_| {
            let req = CreateSandbox {
                snapshot: Some(snap.id.clone()),
                timeout_secs: req.timeout_secs,
                metadata: req.metadata.clone(),
                ..Default::default()
            };
            let this = self.clone();
            async move { this.create_on(req, None, true).await }
        };
        let results = futures_util::future::join_all((0..count).map(make)).await;
        let mut made = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(sb) => made.push(sb),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if transient {
            let _ = self.delete_snapshot(&snap.id).await;
        }
        if first_err.is_none() {
            let keep = |r: &mut crate::sandbox::Record| {
                r.ephemeral = false;
                // Recorded with the rest in one transaction: a retry finds all or none.
                r.idempotency = idempotency.clone();
                // The forks do not name a snapshot that is gone.
                if transient {
                    r.snapshot = None;
                }
            };
            // Kept for good in one transaction: all of them, or (the daemon dying first)
            // none.
            let recs: Vec<_> = made
                .iter()
                .map(|sb| {
                    let mut r = sb.record();
                    keep(&mut r);
                    r
                })
                .collect();
            match self.store().put_all(&recs) {
                Ok(()) => made.iter().for_each(|sb| sb.update(keep)),
                Err(e) => first_err = Some(CoreError::internal("record the forks", e)),
            }
        }
        if let Some(e) = first_err {
            let got = made.len();
            for sb in &made {
                let _ = self.destroy(&sb.id, true).await;
            }
            return Err(match e {
                CoreError::Exhausted(m) if count > 1 => CoreError::Exhausted(format!(
                    "a fork of {count} needs {count} free sandbox uid ranges and got {got} ({m}); none was kept"
                )),
                e => e,
            });
        }
        // By id, as a retry with the key answers.
        made.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((
            ForkResult {
                snapshot: (!transient).then(|| snap.id.clone()),
                sandboxes: made.iter().map(|sb| self.api(&sb.record())).collect(),
            },
            true,
        ))
    }

    // ---- rollback, stop, start ----

    /// Ends every process of a live sandbox and waits for PID 1 (the sandbox keeps its slot).
    /// `shown` is the state callers see meanwhile: `Stopping` or `Starting`.
    async fn end_processes(self: &Arc<Self>, sb: &Arc<Sandbox>, shown: SandboxState, grace: Duration) {
        let was = sb.state();
        let mut was_paused = was == SandboxState::Paused;
        // on_exit ignores an exit in this state.
        sb.update(|r| r.state = shown);
        // Recorded as exited before its processes go: a daemon that dies before the
        // operation (a stop, a rollback, a restart) is recorded as done leaves a sandbox the
        // next daemon keeps with its files, not a dead one it cleans up.
        let mut gone = sb.record();
        gone.state = SandboxState::Exited;
        if let Err(e) = self.store().put(&gone) {
            warn!(sandbox = %sb.id, error = %e, "recording the sandbox before ending its processes");
        }
        if let Some(h) = sb.ttl.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
        if !grace.is_zero() && matches!(was, SandboxState::Running | SandboxState::Paused) {
            if was_paused {
                let this = self.clone();
                let cg = sb.cgroup.clone();
                let thawed = tokio::task::spawn_blocking(move || this.cgroups.thaw(&cg)).await;
                was_paused = !matches!(thawed, Ok(Ok(())));
            }
            if !was_paused {
                self.note_last_pid(sb).await;
                self.terminate(sb, grace).await;
            }
        }
        if let Some(fd) = &sb.pidfd {
            let _ = rustix::process::pidfd_send_signal(fd.as_ref(), rustix::process::Signal::KILL);
        }
        let this = self.clone();
        let cg = sb.cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if was_paused {
                let _ = this.cgroups.thaw(&cg);
            }
        })
        .await;
        let mut exited = sb.exited.clone();
        if tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await.is_err() {
            warn!(sandbox = %sb.id, "PID 1 did not exit within 10 s of SIGKILL");
        }
        let this = self.clone();
        let cg = sb.cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || this.cgroups.kill(&cg)).await;
    }

    /// Records the last pid handed out in a running sandbox (its agent reads its pid
    /// namespace's `ns_last_pid`) before its processes end: the next run continues above
    /// it. The pids of processes started through the API are noted as they start, but
    /// only in memory until the record is next written, and a daemon killed meanwhile
    /// lost them; pids of processes those started count too.
    async fn note_last_pid(&self, sb: &Sandbox) {
        let socket = sb.dirs.agent_socket();
        let ping = crate::agent::call::<abx_proto::AgentInfo>(&socket, &abx_proto::Request::Ping);
        if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(1), ping).await {
            sb.update(|r| r.last_pid = r.last_pid.max(info.last_pid));
        }
    }

    /// Sends SIGTERM to every process of a running sandbox but its agent and waits until
    /// they are gone or `grace` is over (the caller kills what is left). Asked of the
    /// agent, which is the sandbox's PID 1: `kill(-1, …)` from there reaches exactly the
    /// sandbox's processes, and it counts those left (`/proc` of its pid namespace).
    async fn terminate(&self, sb: &Sandbox, grace: Duration) {
        use abx_proto::Request;
        let socket = sb.dirs.agent_socket();
        let deadline = tokio::time::Instant::now() + grace;
        let ask = |signal| {
            let socket = socket.clone();
            async move {
                let req = Request::KillAll { signal };
                tokio::time::timeout_at(deadline, crate::agent::call::<u32>(&socket, &req)).await.ok()?.ok()
            }
        };
        match ask(libc::SIGTERM).await {
            None => return, // no agent to ask: the kill follows
            Some(0) => return,
            Some(n) => info!(sandbox = %sb.id, processes = n, grace_ms = grace.as_millis() as u64, "SIGTERM sent"),
        }
        let mut pause = Duration::from_millis(2);
        loop {
            tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(deadline)).await;
            match ask(0).await {
                Some(0) => return,
                Some(n) if tokio::time::Instant::now() >= deadline => {
                    info!(sandbox = %sb.id, processes = n, "processes left after the grace period are killed");
                    return;
                }
                Some(_) => pause = (pause * 2).min(Duration::from_millis(50)),
                None => return,
            }
        }
    }

    /// Boots a sandbox again in its slot (same id), optionally on a copy of `seed`.
    async fn restart_in_slot(self: &Arc<Self>, sb: &Arc<Sandbox>, seed: Option<SnapRecord>) -> CoreResult<Record> {
        let mut rec = sb.record();
        rec.state = SandboxState::Creating;
        if let Some(s) = &seed {
            rec.snapshot = Some(s.id.clone());
        }
        let this = self.clone();
        let started = tokio::task::spawn_blocking(move || {
            let dirs = this.slot_dirs(rec.uid_slot);
            let setup_err = |message: String| CoreError::Setup { id: rec.id.clone(), message };
            if let Some(s) = &seed {
                this.seed_slot(rec.uid_slot, s, &rec.id)?;
            }
            dirs.reset_work().map_err(|e| setup_err(format!("reset {}: {e}", dirs.root.display())))?;
            this.start_existing(rec)
        })
        .await
        .map_err(join_err("restart"))
        .and_then(|r| r);
        match started {
            Ok((rec, pidfd)) => {
                let new = self.register(rec, Some(pidfd));
                self.rerun_start(&new).await?;
                Ok(new.record())
            }
            Err(e) => {
                // Its processes are gone; it stays as an exited sandbox with its files.
                sb.update(|r| r.state = SandboxState::Exited);
                let _ = self.store().put(&sb.record());
                Err(e)
            }
        }
    }

    /// Returns a sandbox's files to a snapshot: its processes are restarted, its id,
    /// settings, address and timeout stay. A stopped sandbox stays stopped.
    pub async fn rollback(self: &Arc<Self>, key: &str, snap_key: &str) -> CoreResult<Record> {
        let snap = self.find_snapshot(snap_key)?;
        let (sb, _ops) = self.lock_ops(key).await?;
        let rec = sb.record();
        if snap.layers != rec.layers {
            return Err(CoreError::Invalid(format!(
                "snapshot {} was taken on template '{}' with other layers than sandbox {} has (template '{}'); \
                 make a new sandbox from it instead (agentbox fork {})",
                snap.id, snap.template, rec.id, rec.template, snap.id
            )));
        }
        match sb.state() {
            SandboxState::Stopped => {
                let this = self.clone();
                let kept = self.data_of(&rec);
                let src = self.snapshot_dir(&snap.id);
                tokio::task::spawn_blocking(move || crate::cow::clone_into(&src, &kept, this.storage.cow))
                    .await
                    .map_err(join_err("rollback"))?
                    .map_err(|e| CoreError::internal(format!("roll back sandbox {}", rec.id), e))?;
                sb.update(|r| r.snapshot = Some(snap.id.clone()));
                self.store().put(&sb.record()).map_err(|e| CoreError::internal("record sandbox", e))?;
                Ok(sb.record())
            }
            SandboxState::Running | SandboxState::Paused | SandboxState::Exited => {
                self.end_processes(&sb, SandboxState::Starting, Duration::ZERO).await;
                self.restart_in_slot(&sb, Some(snap)).await
            }
            s => Err(CoreError::Conflict(format!("sandbox {} is {}", sb.id, crate::core::state_name(s)))),
        }
    }

    /// Ends a sandbox's processes and keeps its files (moved out of the slot, which is
    /// freed). Idempotent.
    /// Its processes get SIGTERM and `grace` to exit first.
    pub async fn stop(self: &Arc<Self>, key: &str, grace: Duration) -> CoreResult<Record> {
        let (sb, _ops) = self.lock_ops(key).await?;
        self.stop_locked(&sb, grace).await
    }

    /// Runs the start command and readiness check of a sandbox a start, restart or
    /// rollback just booted (the ones it was created with; a record from before they were
    /// recorded uses its template's, if the template still has the same layers). If they
    /// fail, the sandbox is stopped (its files kept) and the error says so. The caller
    /// holds the sandbox's operation lock.
    async fn rerun_start(self: &Arc<Self>, sb: &Arc<Sandbox>) -> CoreResult<()> {
        let rec = sb.record();
        let cfg = if rec.start.is_empty() && rec.ready.is_none() {
            match self.template(&rec.template) {
                Ok(t) if t.layers == rec.layers => t.config,
                _ => return Ok(()),
            }
        } else {
            // A record from before the context was kept: the sandbox's own, as then.
            let ctx =
                rec.start_as.unwrap_or(crate::sandbox::StartAs { env: rec.env, user: rec.user, workdir: rec.workdir });
            abx_template::TemplateConfig {
                start: rec.start,
                ready: rec.ready,
                env: ctx.env,
                user: ctx.user,
                workdir: ctx.workdir,
                ..Default::default()
            }
        };
        // Until its readiness check passes it shows `starting`, as after a create (the
        // caller holds its operation lock, so requests to it wait meanwhile).
        let readying = cfg.ready.is_some();
        if readying {
            sb.update(|r| r.state = SandboxState::Starting);
        }
        let res = self.run_start(sb, &cfg).await;
        if readying {
            sb.update(|r| {
                if r.state == SandboxState::Starting {
                    r.state = SandboxState::Running;
                }
            });
        }
        let Err(e) = res else { return Ok(()) };
        let stopped = match self.stop_locked(sb, Duration::ZERO).await {
            Ok(_) => "it is stopped, its files kept",
            Err(_) => "its processes were ended, its files kept",
        };
        Err(match e {
            CoreError::Setup { id, message } => CoreError::Setup { id, message: format!("{message}; {stopped}") },
            e => e,
        })
    }

    /// [`Manager::stop`] for a caller that holds the sandbox's operation lock.
    async fn stop_locked(self: &Arc<Self>, sb: &Arc<Sandbox>, grace: Duration) -> CoreResult<Record> {
        let sb = self.get(&sb.id)?;
        match sb.state() {
            SandboxState::Stopped => return Ok(sb.record()),
            SandboxState::Running | SandboxState::Paused | SandboxState::Exited => {}
            s => return Err(CoreError::Conflict(format!("sandbox {} is {}", sb.id, crate::core::state_name(s)))),
        }
        self.end_processes(&sb, SandboxState::Stopping, grace).await;
        let this = self.clone();
        let rec = sb.record();
        let moved = tokio::task::spawn_blocking(move || this.keep_data(&rec)).await.map_err(join_err("stop"))?;
        if let Err(e) = moved {
            sb.update(|r| r.state = SandboxState::Exited);
            let _ = self.store().put(&sb.record());
            return Err(CoreError::internal(format!("keep the files of sandbox {}", sb.id), e));
        }
        sb.update(|r| {
            r.state = SandboxState::Stopped;
            r.pid = 0;
            r.pid_start = 0;
        });
        self.store().put(&sb.record()).map_err(|e| CoreError::internal("record sandbox", e))?;
        // Re-registered without a slot.
        let new = self.register(sb.record(), None);
        self.release_after_stop(sb.read(|r| r.uid_slot), &new.id).await;
        info!(sandbox = %new.id, "stopped");
        Ok(new.record())
    }

    /// Moves a sandbox's data tree out of its slot to `<base>/kept/<id>` and gives the
    /// slot a fresh one (blocking).
    pub(crate) fn keep_data(&self, rec: &Record) -> Result<(), String> {
        let data = self.slot_dirs(rec.uid_slot).data();
        crate::cow::rename(&data, &self.storage.kept().join(&rec.id))?;
        // The files are kept once moved. A fresh tree that cannot be made now (a full
        // disk: the sandbox's own files fill it) is made when the slot is next prepared.
        if let Err(e) = crate::cow::make(&data, self.storage.cow) {
            warn!(sandbox = %rec.id, error = %e, "the slot gets a fresh data tree when it is next used");
            self.forget_slot_state(rec.uid_slot);
        }
        Ok(())
    }

    /// Boots a stopped or exited sandbox again (same id, files as they were).
    pub async fn start(self: &Arc<Self>, key: &str) -> CoreResult<Record> {
        let (sb, _ops) = self.lock_ops(key).await?;
        // A start that fails leaves the sandbox stopped as it was, expiry included.
        let expires_before = sb.read(|r| r.expires_at);
        let stopped_again = |sb: &Sandbox| {
            sb.update(|r| {
                r.state = SandboxState::Stopped;
                r.expires_at = expires_before;
            })
        };
        match sb.state() {
            SandboxState::Running | SandboxState::Paused => return Ok(sb.record()),
            SandboxState::Exited => {
                self.renew_expired_timeout(&sb);
                self.end_processes(&sb, SandboxState::Starting, Duration::ZERO).await;
                return self.restart_in_slot(&sb, None).await;
            }
            SandboxState::Stopped => self.renew_expired_timeout(&sb),
            s => return Err(CoreError::Conflict(format!("sandbox {} is {}", sb.id, crate::core::state_name(s)))),
        }
        // Shown while it boots (it has no slot until it is running); `Stopped` again if the
        // start fails. Only shown: what is stored says where its files are.
        sb.update(|r| r.state = SandboxState::Starting);
        let slot = match self.acquire_slot().await {
            Ok(slot) => slot,
            Err(e) => {
                stopped_again(&sb);
                return Err(e);
            }
        };
        let mut rec = sb.record();
        rec.uid_slot = slot;
        rec.uid_base = self.uid_base_of(slot);
        // Recorded in its new slot before its files move there: a daemon that dies from here
        // on leaves a record the next one can find them by (in `kept/` still, or the slot).
        rec.state = SandboxState::Exited;
        if let Err(e) = self.store().put(&rec) {
            stopped_again(&sb);
            self.release_after_stop(slot, &sb.id).await;
            return Err(CoreError::internal("record sandbox", e));
        }
        rec.state = SandboxState::Creating;
        let this = self.clone();
        let started = tokio::task::spawn_blocking(move || {
            let kept = this.storage.kept().join(&rec.id);
            let dirs = this.slot_dirs(slot);
            let setup_err = |message: String| CoreError::Setup { id: rec.id.clone(), message };
            this.ensure_slot(slot, rec.layers.len()).map_err(setup_err)?;
            crate::cow::rename(&kept, &dirs.data()).map_err(setup_err)?;
            dirs.reset_work().map_err(|e| setup_err(format!("reset {}: {e}", dirs.root.display())))?;
            match this.start_existing(rec.clone()) {
                Ok(v) => Ok(v),
                Err(e) => {
                    // Nothing lost: the files go back where they were.
                    if let Err(m) = crate::cow::rename(&dirs.data(), &kept)
                        .and_then(|_| crate::cow::make(&dirs.data(), this.storage.cow))
                    {
                        warn!(sandbox = %rec.id, error = %m, "moving the files of a sandbox that failed to start back");
                    }
                    Err(e)
                }
            }
        })
        .await
        .map_err(join_err("start"))
        .and_then(|r| r);
        match started {
            Ok((rec, pidfd)) => {
                self.refill();
                let new = self.register(rec, Some(pidfd));
                self.rerun_start(&new).await?;
                info!(sandbox = %new.id, "started");
                Ok(new.record())
            }
            Err(e) => {
                // Its files are back in `kept/`: stopped, as before.
                stopped_again(&sb);
                let _ = self.store().put(&sb.record());
                self.release_after_stop(slot, &sb.id).await;
                Err(e)
            }
        }
    }

    // ---- timeouts ----

    /// The snapshot `--on-timeout snapshot` takes: named `<id>-timeout`, or
    /// `<id>-timeout-<n>` when an earlier expiry (after a `start`) or the user took that name.
    async fn snapshot_on_timeout(self: &Arc<Self>, id: &str) -> CoreResult<()> {
        let mut n = 1;
        loop {
            let name = if n == 1 { format!("{id}-timeout") } else { format!("{id}-timeout-{n}") };
            match self.snapshot(id, Some(name)).await {
                Err(CoreError::Conflict(m)) if m.contains("already exists") && n < 100 => n += 1,
                r => return r.map(drop),
            }
        }
    }

    /// A sandbox started again after its timeout passed (which may be what stopped it) gets
    /// the timeout again, from now: its length as last set, else the daemon's default.
    fn renew_expired_timeout(&self, sb: &Sandbox) {
        let now = crate::sandbox::now();
        let default = self.cfg.default_timeout.map(|t| t.as_secs());
        sb.update(|r| {
            if r.expires_at.is_some_and(|e| e <= now) {
                r.expires_at = r.timeout_secs.or(default).map(|secs| now + secs.max(1));
            }
        });
    }

    /// What an expired timeout does.
    pub(crate) async fn on_timeout(self: &Arc<Self>, id: &str) {
        let Ok(sb) = self.get(id) else { return };
        let action = sb.read(|r| r.on_timeout);
        info!(sandbox = %id, ?action, "timeout expired");
        let res = match action {
            TimeoutAction::Stop => self.stop(id, STOP_GRACE).await.map(drop),
            TimeoutAction::Snapshot => match self.snapshot_on_timeout(id).await {
                Ok(()) => self.destroy_expired(id).await,
                Err(e) => {
                    // Destroying now would lose what the snapshot was for: keep the files.
                    warn!(sandbox = %id, error = %e.full_message(), "snapshot on timeout failed; stopping the sandbox instead of destroying it");
                    self.stop(id, STOP_GRACE).await.map(drop)
                }
            },
            TimeoutAction::Destroy => self.destroy_expired(id).await,
        };
        if let Err(e) = res {
            warn!(sandbox = %id, error = %e.full_message(), "timeout action failed");
        }
    }

    // ---- volumes ----

    fn volume_dir(&self, name: &str) -> PathBuf {
        self.storage.volumes().join(name)
    }

    pub(crate) fn volume_records(&self) -> CoreResult<Vec<VolRecord>> {
        self.store().all_in(Table::Volumes).map_err(|e| CoreError::internal("read volumes", e))
    }

    /// The sandboxes (even stopped ones) that mount volume `name`.
    fn volume_users(&self, name: &str) -> Vec<String> {
        self.list().into_iter().filter(|r| r.volumes.iter().any(|m| m.name == name)).map(|r| r.id).collect()
    }

    fn volume_api(&self, v: &VolRecord) -> abx_api::Volume {
        let (size_bytes, entries) = crate::cow::usage(&self.volume_dir(&v.name));
        let used_by = self.volume_users(&v.name);
        abx_api::Volume {
            name: v.name.clone(),
            tenant: v.tenant.clone(),
            created_at: v.created_at,
            size_bytes,
            entries,
            used_by,
        }
    }

    /// Creates a named volume: an empty directory (mode 0777: every user of every sandbox
    /// may write) that outlives sandboxes.
    pub async fn create_volume(self: &Arc<Self>, name: &str) -> CoreResult<abx_api::Volume> {
        check_name("volume", name)?;
        // Held until the volume is recorded (this function's end).
        let _name = self.reserve_name("volume", None, name)?;
        if self.volume_records()?.iter().any(|v| v.name == name) {
            return Err(CoreError::Conflict(format!("a volume named '{name}' already exists")));
        }
        let dir = self.volume_dir(name);
        let cow = self.storage.cow;
        let d2 = dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            use std::os::unix::fs::PermissionsExt;
            crate::cow::remove(&d2)?;
            if cow {
                abx_sys::btrfs::create_subvolume(&d2).map_err(|e| format!("create subvolume {}: {e}", d2.display()))?;
            } else {
                std::fs::create_dir(&d2).map_err(|e| format!("create {}: {e}", d2.display()))?;
            }
            std::fs::set_permissions(&d2, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| format!("chmod {}: {e}", d2.display()))
        })
        .await
        .map_err(join_err("volume"))?
        .map_err(|e| CoreError::internal(format!("create volume {name}"), e))?;
        let rec = VolRecord { name: name.to_string(), created_at: now(), tenant: crate::auth::tenant() };
        if let Err(e) = self.store().put_in(Table::Volumes, name, &rec) {
            let _ = crate::cow::remove(&dir);
            return Err(CoreError::internal("record volume", e));
        }
        Ok(self.volume_api(&rec))
    }

    pub async fn volumes(self: &Arc<Self>) -> CoreResult<Vec<abx_api::Volume>> {
        let recs = self.volume_records()?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || recs.iter().map(|v| this.volume_api(v)).collect())
            .await
            .map_err(join_err("volume listing"))
    }

    pub async fn volume(self: &Arc<Self>, name: &str) -> CoreResult<abx_api::Volume> {
        let rec = self
            .volume_records()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| CoreError::not_found("volume", name))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.volume_api(&rec)).await.map_err(join_err("volume"))
    }

    /// Removes a volume and its files; refused while a sandbox (even a stopped one) uses it.
    pub async fn delete_volume(self: &Arc<Self>, name: &str) -> CoreResult<()> {
        // Checked and unrecorded with no create resolving volumes (see `pins.rs`).
        let gate = self.pins.removing();
        if !self.volume_records()?.iter().any(|v| v.name == name) {
            return Err(CoreError::not_found("volume", name));
        }
        let used_by = self.volume_users(name);
        if !used_by.is_empty() {
            return Err(CoreError::Conflict(format!(
                "volume '{name}' is used by sandbox(es) {}; remove them first",
                used_by.join(", ")
            )));
        }
        if self.pins.has_volume(name) {
            return Err(CoreError::Conflict(format!(
                "volume '{name}' is being mounted by a sandbox that is being created; remove that sandbox first"
            )));
        }
        // Sandboxes made from a snapshot mount the volumes its sandbox had: a snapshot
        // that names this one would make only failing forks.
        let snaps: Vec<String> = self
            .store()
            .all_in(Table::Snapshots)
            .map_err(|e| CoreError::internal("read snapshots", e))?
            .into_iter()
            .filter(|s: &SnapRecord| s.volumes.iter().any(|m| m.name == name))
            .map(|s| s.name.clone().unwrap_or(s.id))
            .collect();
        if !snaps.is_empty() {
            return Err(CoreError::Conflict(format!(
                "volume '{name}' is mounted by the sandboxes of snapshot(s) {}; remove them first (agentbox snapshot rm)",
                snaps.join(", ")
            )));
        }
        self.store().delete_in(Table::Volumes, name).map_err(|e| CoreError::internal("delete volume", e))?;
        drop(gate);
        let dir = self.volume_dir(name);
        tokio::task::spawn_blocking(move || crate::cow::remove(&dir))
            .await
            .map_err(join_err("volume removal"))?
            .map_err(|e| CoreError::internal(format!("remove volume {name}"), e))
    }

    /// Checks the volumes of a create and returns what the spawner mounts.
    pub(crate) fn volume_specs(&self, mounts: &[VolumeMount]) -> CoreResult<Vec<abx_sandbox::spec::VolumeSpec>> {
        // Every create comes here: without volumes, no read of the volumes table.
        if mounts.is_empty() {
            return Ok(Vec::new());
        }
        if mounts.len() > MAX_VOLUMES {
            return Err(CoreError::Invalid(format!("at most {MAX_VOLUMES} volumes per sandbox, got {}", mounts.len())));
        }
        let known = self.volume_records()?;
        let mut targets = std::collections::HashSet::new();
        let mut out = Vec::new();
        for m in mounts {
            if !known.iter().any(|v| v.name == m.name) {
                return Err(CoreError::not_found("volume", m.name.clone()));
            }
            abx_sandbox::spec::validate_volume_target(&m.path)
                .map_err(|e| CoreError::Invalid(format!("volume '{}': {e}", m.name)))?;
            if !targets.insert(m.path.clone()) {
                return Err(CoreError::Invalid(format!("two volumes are mounted at {}", m.path)));
            }
            out.push(abx_sandbox::spec::VolumeSpec {
                source: self.volume_dir(&m.name),
                target: m.path.clone(),
                read_only: m.read_only,
            });
        }
        Ok(out)
    }
}
