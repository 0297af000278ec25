//! A sandbox as the daemon knows it: the persisted [`Record`] and the live [`Sandbox`].

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use abx_api::{Limits, SandboxState};
use abx_sandbox::spec::SandboxDirs;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// What survives a daemon restart (stored as JSON in the state database).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub name: Option<String>,
    /// The tenant of the API key that made it: only keys of that tenant (and untenanted
    /// ones, and the unix socket) reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub template: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    /// The timeout's length, which a start renews once it has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Host pid of PID 1 and its start time (clock ticks since boot), which together
    /// identify the process even if the pid is reused.
    pub pid: i32,
    pub pid_start: u64,
    pub uid_slot: u32,
    pub uid_base: u32,
    pub hostname: String,
    pub state: SandboxState,
    /// OOM kills counted by the slot's cgroup before this sandbox started.
    #[serde(default)]
    pub oom_kills_base: u64,
    /// Egress policy.
    #[serde(default)]
    pub network: abx_api::NetworkPolicy,
    #[serde(default)]
    pub persist: bool,
    #[serde(default)]
    pub on_timeout: abx_api::TimeoutAction,
    #[serde(default)]
    pub volumes: Vec<abx_api::VolumeMount>,
    /// The snapshot its files started from.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Booted for a warm pool and not claimed yet: cleaned up, not adopted, after a restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
    /// Lives for one request (a `run`, a step of a template build): removed, not adopted,
    /// after a restart, since nobody is left to use or remove it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
    /// Runs a step of a template build: the build alone uses and destroys it, so it is
    /// neither listed nor found through the API or the ingress (see `Core::execute`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub build_step: bool,
    /// The template's start command and readiness check it was created with, which a
    /// start, restart or rollback runs again (as `docker start` runs CMD again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// The user, environment and directory those run with: the template's, whatever the
    /// create asked for (a pooled sandbox runs them before any claim, and a cold create
    /// does the same). None in records from before it was kept: the sandbox's own then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_as: Option<StartAs>,
    /// Set when its ports need a token (`ingress: token`): the token requests through the
    /// ingress proxy must carry. None: its ports are public.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_token: Option<String>,
    /// The highest pid of a process started through the API (`exec`, background
    /// processes), over all runs: a restart continues above it (`SpawnSpec::last_pid`).
    #[serde(default)]
    pub last_pid: u32,
    /// The idempotency key its create carried, and a digest of that request: a create
    /// with the same key answers this sandbox (`Manager::hold_idempotency`); a fork's
    /// sandboxes all carry its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
}

/// See `Record::idempotency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub key: String,
    /// SHA-256 (hex) of the request's JSON without the key.
    pub digest: String,
}

impl Idempotency {
    /// The key and digest of a create request, if it has a key.
    pub fn of(req: &abx_api::CreateSandbox) -> Option<Idempotency> {
        let key = req.idempotency_key.clone()?;
        Some(Self::digest(key, &abx_api::CreateSandbox { idempotency_key: None, ..req.clone() }))
    }

    /// The key and digest of a fork of `source` (as the caller named it), if it has a key.
    pub fn of_fork(source: &str, req: &abx_api::ForkRequest) -> Option<Idempotency> {
        let key = req.idempotency_key.clone()?;
        Some(Self::digest(key, &("fork", source, abx_api::ForkRequest { idempotency_key: None, ..req.clone() })))
    }

    fn digest(key: String, bare: &impl Serialize) -> Idempotency {
        use sha2::Digest;
        let json = serde_json::to_vec(bare).unwrap_or_default();
        let digest = sha2::Sha256::digest(&json).iter().map(|b| format!("{b:02x}")).collect();
        Idempotency { key, digest }
    }
}

/// The context of a template's start command and readiness check (see `Record::start_as`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartAs {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

impl Record {
    pub fn to_api(&self) -> abx_api::Sandbox {
        abx_api::Sandbox {
            id: self.id.clone(),
            name: self.name.clone(),
            tenant: self.tenant.clone(),
            template: self.template.clone(),
            state: self.state,
            created_at: self.created_at,
            expires_at: self.expires_at,
            limits: self.limits.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            metadata: self.metadata.clone(),
            pid: self.pid,
            uid_base: self.uid_base,
            hostname: self.hostname.clone(),
            network: self.network.clone(),
            address: None,
            persist: self.persist,
            on_timeout: self.on_timeout,
            volumes: self.volumes.clone(),
            snapshot: self.snapshot.clone(),
            ingress: self.ingress_access(),
            ingress_token: self.ingress_token.clone(),
        }
    }

    pub fn ingress_access(&self) -> abx_api::IngressAccess {
        match self.ingress_token {
            Some(_) => abx_api::IngressAccess::Token,
            None => abx_api::IngressAccess::Public,
        }
    }

    #[cfg(test)]
    pub fn example(id: &str) -> Record {
        Record {
            id: id.into(),
            name: None,
            tenant: None,
            template: "mini".into(),
            layers: vec![],
            limits: Limits::default(),
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            metadata: BTreeMap::new(),
            created_at: 0,
            expires_at: None,
            timeout_secs: None,
            pid: 1,
            pid_start: 1,
            uid_slot: 0,
            uid_base: 1 << 27,
            hostname: "h".into(),
            state: SandboxState::Running,
            oom_kills_base: 0,
            network: Default::default(),
            persist: false,
            on_timeout: Default::default(),
            volumes: Vec::new(),
            snapshot: None,
            pooled: false,
            ephemeral: false,
            build_step: false,
            start: Vec::new(),
            ready: None,
            start_as: None,
            ingress_token: None,
            last_pid: 0,
            idempotency: None,
        }
    }
}

/// A live sandbox.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub dirs: SandboxDirs,
    /// Name of its (uid slot's) cgroup under the instance parent.
    pub cgroup: String,
    pub record: Mutex<Record>,
    /// pidfd of PID 1 (absent once it has been found gone).
    pub pidfd: Option<Arc<OwnedFd>>,
    /// Becomes true when PID 1 has exited.
    pub exited: watch::Receiver<bool>,
    /// The task that destroys the sandbox when its timeout expires.
    pub ttl: Mutex<Option<tokio::task::AbortHandle>>,
    /// Unix time (ms) of the last request to the sandbox, for idle auto-pause.
    pub activity: std::sync::atomic::AtomicU64,
    /// Exec sessions attached right now (a sandbox streaming to a client is not idle).
    pub attached: Arc<std::sync::atomic::AtomicUsize>,
    /// Packets through its veth when idle auto-pause last looked (`u64::MAX`: not yet):
    /// traffic of its own processes is activity too.
    pub packets: std::sync::atomic::AtomicU64,
    /// Held by operations that change what runs or what is on disk (snapshot, rollback,
    /// stop, start, destroy), so they do not interleave.
    pub ops: Arc<tokio::sync::Mutex<()>>,
}

/// Counts an attached exec session while it lives.
#[derive(Debug)]
pub struct Attached(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Sandbox {
    pub fn record(&self) -> Record {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the record in place (no copy): for a field or two of it.
    pub fn read<R>(&self, f: impl FnOnce(&Record) -> R) -> R {
        f(&self.record.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn update<R>(&self, f: impl FnOnce(&mut Record) -> R) -> R {
        f(&mut self.record.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn state(&self) -> SandboxState {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).state
    }

    /// Records activity now.
    pub fn touch(&self) {
        self.activity.store(now_ms(), std::sync::atomic::Ordering::SeqCst);
    }

    /// Marks an exec session attached until the returned guard drops.
    pub fn attach(&self) -> Attached {
        self.attached.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Attached(self.attached.clone())
    }

    /// Records activity if `packets`, the count of packets through the sandbox's veth,
    /// moved since the last call.
    pub fn note_packets(&self, packets: u64) {
        let before = self.packets.swap(packets, std::sync::atomic::Ordering::SeqCst);
        if before != u64::MAX && before != packets {
            self.touch();
        }
    }

    /// Whether nothing happened for `idle` and no session is attached.
    pub fn idle_for(&self, idle: std::time::Duration) -> bool {
        use std::sync::atomic::Ordering;
        self.attached.load(Ordering::SeqCst) == 0
            && now_ms().saturating_sub(self.activity.load(Ordering::SeqCst)) >= idle.as_millis() as u64
    }
}

/// The start time of a process (field 22 of /proc/PID/stat), if it exists.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Current unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Current unix time in seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_idempotency_digest_ignores_the_key_and_sees_the_rest() {
        use super::Idempotency;
        let req = |key: Option<&str>, name: Option<&str>| abx_api::CreateSandbox {
            template: Some("mini".into()),
            name: name.map(String::from),
            idempotency_key: key.map(String::from),
            ..Default::default()
        };
        assert_eq!(Idempotency::of(&req(None, None)), None);
        let a = Idempotency::of(&req(Some("k1"), None)).unwrap();
        let b = Idempotency::of(&req(Some("k2"), None)).unwrap();
        let c = Idempotency::of(&req(Some("k1"), Some("n"))).unwrap();
        assert_eq!((a.key.as_str(), a.digest.len()), ("k1", 64));
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let me = std::process::id() as i32;
        let a = super::process_start_time(me).unwrap();
        assert_eq!(Some(a), super::process_start_time(me));
        assert!(super::process_start_time(i32::MAX).is_none());
    }
}
