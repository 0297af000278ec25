//! The sandbox manager: creates, tracks, times out, destroys and, after a restart,
//! re-adopts sandboxes. Blocking work (directories, cgroups, the spawner) runs on tokio's
//! blocking pool. Host resources belong to reusable slots (see [`Manager::slot_name`]); a
//! create that fails, like a destroy, leaves its slot empty.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use abx_api::{CreateSandbox, Limits, SandboxState, TimeoutAction};
use abx_cgroup::CgroupDriver;
use abx_sandbox::SpawnerClient;
use abx_sandbox::spec::{SandboxDirs, SlotSpec, SpawnSpec};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Config, UID_RANGE};
use crate::error::{CoreError, CoreResult};
use crate::sandbox::{Record, Sandbox, now, process_start_time};
use crate::store::Store;
use crate::validate;

/// Capabilities a sandbox keeps (Docker's default set), by number.
pub const CAPABILITIES: [u32; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Largest diff archive built in memory.
const DIFF_ARCHIVE_MAX: u64 = 1 << 30;

/// A slot's data subvolume is replaced, not emptied file by file, when its upper
/// directory holds at least this many entries.
const SUBVOLUME_SWAP_ENTRIES: usize = 256;

/// How long a sandbox may take from spawn to exec of its agent.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-slot facts that hold until the slot is released with an error or removed.
#[derive(Debug, Clone, Default)]
struct SlotCache {
    /// Lower-layer mount points the directory has (the directory and cgroups exist).
    lowers: usize,
    /// Limits last written to the slot's cgroups.
    limits: Option<abx_cgroup::Limits>,
    /// Whether the slot's cgroup was last put in the idle CPU class (`Some(true)` while it
    /// boots or holds a pooled sandbox).
    idle: Option<bool>,
    /// The memory cgroup's OOM kill count when the slot was last emptied (statistics
    /// already reset then).
    oom_base: Option<u64>,
}

#[derive(Debug)]
pub struct Manager {
    pub cfg: Config,
    store: Store,
    pub templates: abx_template::Store,
    pub cgroups: Box<dyn CgroupDriver>,
    pub spawner: SpawnerClient,
    pub storage: crate::storage::Storage,
    seccomp: Vec<Vec<u8>>,
    sandboxes: RwLock<HashMap<String, Arc<Sandbox>>>,
    uid_slots: Mutex<Vec<bool>>,
    /// Cleanup of destroyed sandboxes, finished in the background.
    pub cleanups: tokio_util::task::TaskTracker,
    /// Destroyed sandboxes whose slot is not free yet, and the wake-up when one is.
    pending_frees: AtomicUsize,
    /// Copies out of a snapshot (read) against its removal (write): a fork, rollback or
    /// create from a snapshot that is being removed either copies it whole first or finds
    /// it gone ("not found"), never half a directory.
    pub(crate) snapshot_gate: RwLock<()>,
    uid_freed: tokio::sync::Notify,
    /// Counts the times a slot became available (freed, or prepared), so that a create
    /// that found none can tell whether one came up while it looked.
    slot_events: std::sync::atomic::AtomicU64,
    /// Slots whose namespaces the spawner holds ready (see [`Manager::refill`]).
    prepared: Mutex<Vec<u32>>,
    refilling: std::sync::atomic::AtomicBool,
    /// Set while [`Manager::reconcile`] finds the stored sandboxes again: a slot not yet
    /// claimed then may still be a live sandbox's, so nothing takes one meanwhile (a
    /// timeout that expired while no daemon ran destroys its sandbox during it).
    reconciling: std::sync::atomic::AtomicBool,
    /// Slots taken by a refill and not yet prepared (or given back).
    preparing: AtomicUsize,
    /// What is known about each slot's host objects, to skip redundant work on create.
    slot_cache: Mutex<HashMap<u32, SlotCache>>,
    /// Each sandbox directory's resolv.conf as this daemon last wrote it.
    resolv_files: Mutex<HashMap<std::path::PathBuf, abx_template::FileStamp>>,
    /// Set by shutdown: no more refills.
    pub(crate) closing: std::sync::atomic::AtomicBool,
    /// Warm pools (see `pool.rs`).
    pub(crate) pools: crate::pool::Pools,
    /// Layers and volumes that creates in flight are about to use (see `pins.rs`).
    pub(crate) pins: crate::pins::Pins,
    /// Set when layers that no template references may be kept only by sandboxes or
    /// snapshots (after a template removal, and at start): the next destroy or snapshot
    /// removal collects what it freed (see [`Manager::collect_layers_if_due`]).
    pub(crate) layers_held: std::sync::atomic::AtomicBool,
    /// Cancelled when the daemon begins to shut down: builds in progress end with an
    /// error event saying so.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Template builds, imports and pulls in progress (repository mirrors are not
    /// pruned meanwhile: a build may be about to name one).
    pub(crate) builds: AtomicUsize,
    /// API keys and sandbox access tokens.
    pub auth: crate::auth::Auth,
    /// Networking (None with `--subnet none`: loopback only).
    pub net: Option<Arc<crate::net::Network>>,
    /// Names being given by requests in progress (see [`Manager::reserve_name`]).
    reserved: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// A name a request in progress is giving; freed when dropped.
pub(crate) struct Reserved {
    set: Arc<Mutex<std::collections::HashSet<String>>>,
    key: String,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

impl Manager {
    /// Opens the state under `cfg.root` and reconnects to (or starts) the spawner.
    pub fn open(cfg: Config) -> Result<Arc<Manager>, String> {
        let mounted_before = crate::storage::image_mounted(&cfg.root, &cfg.prefix);
        let storage = crate::storage::Storage::open(&cfg.root, &cfg.prefix, cfg.data, cfg.data_size)?;
        match Self::open_on(cfg, storage.clone()) {
            Ok(m) => Ok(m),
            Err(e) => {
                // A start refused (a subnet in use, a bad seccomp policy, ...) leaves no
                // data image mounted that it mounted itself.
                if !mounted_before {
                    storage.close();
                }
                Err(e)
            }
        }
    }

    fn open_on(cfg: Config, storage: crate::storage::Storage) -> Result<Arc<Manager>, String> {
        for d in [storage.slots.clone(), cfg.root.join("tmp")] {
            std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let store = Store::open(&cfg.root.join("state.db")).map_err(|e| format!("{e}"))?;
        let auth = crate::auth::Auth::open(&cfg.root, &store)?;
        let templates =
            abx_template::Store::open(&cfg.root, &cfg.cache_dir).map_err(|e| format!("template store: {e}"))?;
        let cgroups = abx_cgroup::open(&cfg.prefix).map_err(|e| format!("cgroups: {e}"))?;
        let policy = match &cfg.seccomp_policy {
            Some(p) => std::fs::read_to_string(p).map_err(|e| format!("read seccomp policy {}: {e}", p.display()))?,
            None => abx_sandbox::seccomp::DEFAULT_POLICY.to_string(),
        };
        let seccomp = abx_sandbox::seccomp::compile(&policy).map_err(|e| format!("{e}: {}", source_text(&e)))?;
        let net = match &cfg.network {
            Some(n) => {
                Some(Arc::new(crate::net::Network::open(n.clone(), &cfg.prefix, Some(cfg.root.join("net-audit")))?))
            }
            None => None,
        };
        let spawner = SpawnerClient::new(&cfg.root, &cfg.exe, &cfg.agent);
        spawner.connect().map_err(|e| format!("spawner: {e}"))?;
        let slots = cfg.uid_slots as usize;
        Ok(Arc::new(Manager {
            cfg,
            store,
            templates,
            cgroups,
            spawner,
            storage,
            seccomp,
            sandboxes: RwLock::new(HashMap::new()),
            uid_slots: Mutex::new(vec![false; slots]),
            cleanups: tokio_util::task::TaskTracker::new(),
            pending_frees: AtomicUsize::new(0),
            snapshot_gate: RwLock::new(()),
            uid_freed: tokio::sync::Notify::new(),
            slot_events: std::sync::atomic::AtomicU64::new(0),
            prepared: Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            reconciling: std::sync::atomic::AtomicBool::new(false),
            preparing: AtomicUsize::new(0),
            slot_cache: Mutex::new(HashMap::new()),
            resolv_files: Mutex::new(HashMap::new()),
            pins: Default::default(),
            layers_held: std::sync::atomic::AtomicBool::new(true),
            builds: AtomicUsize::new(0),
            stopping: Default::default(),
            closing: std::sync::atomic::AtomicBool::new(false),
            pools: Default::default(),
            auth,
            net,
            reserved: Default::default(),
        }))
    }

    /// Reserves a name while a request gives it: `kind` "name" for sandboxes and
    /// snapshots (one name never means both), "volume" for volumes. Two requests for one
    /// name at once (a check that found it free, then a slow create) would otherwise both
    /// succeed; the second is refused as if the first had finished. The caller checks the
    /// existing objects after reserving, and keeps the reservation until the object is
    /// visible (registered or recorded).
    ///
    /// Sandbox and snapshot names are their tenant's own (`owner`; see [`pick_named`]):
    /// two tenants may both use a name at once. Volumes have one name space.
    pub(crate) fn reserve_name(&self, kind: &str, owner: Option<&str>, name: &str) -> CoreResult<Reserved> {
        let key = format!("{kind}:{}/{name}", owner.unwrap_or(""));
        let mut set = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(key.clone()) {
            let what = if kind == "volume" { "volume" } else { "sandbox or snapshot" };
            return Err(CoreError::Conflict(format!("a {what} named '{name}' is being created")));
        }
        Ok(Reserved { set: self.reserved.clone(), key })
    }

    /// The state store.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// First host uid of a slot's range.
    pub(crate) fn uid_base_of(&self, uid_slot: u32) -> u32 {
        self.cfg.uid_start + uid_slot * UID_RANGE
    }

    /// Starts a recorded sandbox again with its own policy (blocking; see `start_blocking`).
    pub(crate) fn start_existing(&self, rec: Record) -> CoreResult<(Record, OwnedFd)> {
        let policy =
            crate::net::policy::Policy::parse(&rec.network).unwrap_or_else(|_| crate::net::policy::Policy::none());
        self.start_blocking(rec, &policy)
    }

    /// Empties and frees a slot a sandbox left (stopped, or failed to start again).
    pub(crate) async fn release_after_stop(self: &Arc<Self>, slot: u32, id: &str) {
        let this = self.clone();
        let id = id.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = this.release_slot(slot, Some(&id)) {
                warn!(sandbox = %id, error = %e, "emptying the slot of a stopped sandbox");
            }
            this.free_uid_slot(slot);
        })
        .await;
        self.refill();
    }

    /// Destroy on timeout.
    pub(crate) async fn destroy_expired(self: &Arc<Self>, id: &str) -> CoreResult<()> {
        self.destroy_inner(id, true, false).await
    }

    /// The name of a slot's host objects (its cgroup and its directory), `<prefix>-u<slot>`.
    ///
    /// A slot is the unit of reusable host resources: a uid range, cgroups and a directory
    /// with the overlay's `data/upper` and `data/work` and the mount points. Two live
    /// sandboxes never share a slot; each sandbox that gets one reuses them (emptied on
    /// destroy). Creating and deleting them per sandbox instead cost CPU, left thousands of
    /// "dying" memory cgroups behind (pinned by page cache the sandbox touched first), and
    /// churned filesystem inodes, which made ext4's inode allocator slower with every
    /// sandbox on a journal-less filesystem.
    pub fn slot_name(&self, uid_slot: u32) -> String {
        format!("{}-u{uid_slot}", self.cfg.prefix)
    }

    pub(crate) fn slot_dirs(&self, uid_slot: u32) -> SandboxDirs {
        SandboxDirs::new(self.storage.slots.join(self.slot_name(uid_slot)))
    }

    /// Looks a sandbox up by id, or by name as the current caller means it ([`pick_named`]).
    pub fn get(&self, key: &str) -> CoreResult<Arc<Sandbox>> {
        let map = self.sandboxes.read().unwrap_or_else(|e| e.into_inner());
        if let Some(sb) = map.get(key) {
            return Ok(sb.clone());
        }
        let named = map
            .values()
            .filter_map(|sb| {
                sb.read(|r| (r.name.as_deref() == Some(key)).then(|| (r.tenant.clone(), r.id.clone())))
                    .map(|(t, id)| (t, id, sb.clone()))
            })
            .collect();
        pick_named("sandbox", key, named)?.ok_or_else(|| CoreError::not_found("sandbox", key))
    }

    /// Whether `owner` (a tenant, or None for untenanted sandboxes) has a sandbox or a
    /// snapshot named `name` (names are unique within their tenant), or `name` is the id
    /// of one (ids are unique everywhere, and a lookup takes the id first).
    pub(crate) fn name_taken(&self, owner: Option<&str>, name: &str) -> CoreResult<Option<&'static str>> {
        let map = self.sandboxes.read().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(name)
            || map.values().any(|sb| sb.read(|r| r.tenant.as_deref() == owner && r.name.as_deref() == Some(name)))
        {
            return Ok(Some("sandbox"));
        }
        drop(map);
        let snaps: Vec<crate::lifecycle::SnapRecord> = self
            .store()
            .all_in(crate::store::Table::Snapshots)
            .map_err(|e| CoreError::internal("read snapshots", e))?;
        Ok(snaps
            .iter()
            .any(|s| s.id == name || (s.tenant.as_deref() == owner && s.name.as_deref() == Some(name)))
            .then_some("snapshot"))
    }

    /// The sandbox a host-name label names: as [`Manager::get`], else the one sandbox whose
    /// name matches in any case (browsers send host names in lower case; a name may have
    /// capitals). Two names that differ only in case match neither way.
    pub fn get_by_host_label(&self, label: &str) -> Option<Arc<Sandbox>> {
        if let Ok(sb) = self.get(label) {
            return Some(sb);
        }
        let map = self.sandboxes.read().unwrap_or_else(|e| e.into_inner());
        let mut found = map.values().filter(|sb| {
            sb.record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(label))
        });
        let first = found.next()?;
        found.next().is_none().then(|| first.clone())
    }

    /// [`Manager::create_on`] for a request (without a seed): up to twice more after freeing
    /// emptied btrfs chunks if it failed with ENOSPC, and a read-only data filesystem
    /// named as the cause of a failure.
    ///
    /// With an idempotency key (a retried create), the caller's sandbox made with that key
    /// if there is one (and `false`: not made now), after any create with the key still
    /// running has finished.
    pub async fn create_for_request(
        self: &Arc<Self>,
        req: CreateSandbox,
        ephemeral: bool,
    ) -> CoreResult<(Arc<Sandbox>, bool)> {
        let _held = match crate::sandbox::Idempotency::of(&req) {
            None => None,
            Some(asked) => {
                validate::idempotency_key(&asked.key)?;
                if ephemeral {
                    return Err(CoreError::Invalid(
                        "an idempotency key is for creates: a run's sandbox lasts only as long as its request".into(),
                    ));
                }
                let (held, made) = self.hold_idempotency(&asked).await?;
                if let Some(sb) = made.into_iter().next() {
                    return Ok((sb, false));
                }
                Some(held)
            }
        };
        self.create_tries(req, ephemeral).await.map(|sb| (sb, true))
    }

    /// For a create or fork with an idempotency key: waits until no other request with
    /// the key (of this tenant) runs, and holds the key until the returned guard drops, so
    /// that requests sharing a key run one after another. Also returns the sandboxes an
    /// earlier request with the key made that still exist (by id, the order a fork
    /// answers in); 409 if that request was another one.
    pub(crate) async fn hold_idempotency(
        &self,
        asked: &crate::sandbox::Idempotency,
    ) -> CoreResult<(Reserved, Vec<Arc<Sandbox>>)> {
        let tenant = crate::auth::tenant();
        let key = &asked.key;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let held = loop {
            match self.reserve_name("idempotency", tenant.as_deref(), key) {
                Ok(r) => break r,
                Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => {
                    return Err(CoreError::Conflict(format!(
                        "a request with idempotency key '{key}' is still running after 2 minutes; try again later"
                    )));
                }
            }
        };
        let map = self.sandboxes.read().unwrap_or_else(|e| e.into_inner());
        let mut made: Vec<_> = map
            .values()
            .filter(|sb| {
                sb.read(|r| {
                    r.tenant == tenant && r.idempotency.as_ref().is_some_and(|i| &i.key == key) && !r.build_step
                })
            })
            .cloned()
            .collect();
        drop(map);
        made.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(first) = made.first()
            && first.read(|r| r.idempotency.as_ref() != Some(asked))
        {
            return Err(CoreError::Conflict(format!(
                "idempotency key '{key}' was used for another request (sandbox {}); a new request needs a new key",
                first.id
            )));
        }
        Ok((held, made))
    }

    async fn create_tries(self: &Arc<Self>, req: CreateSandbox, ephemeral: bool) -> CoreResult<Arc<Sandbox>> {
        // Up to three tries: the space freed chunks give back can be taken by btrfs's own
        // metadata before the retry gets to it (seen in CI).
        let mut tries = 0;
        loop {
            tries += 1;
            match self.create_on(req.clone(), None, ephemeral).await {
                Err(e) if tries < 3 && self.reclaim_after(&e).await => continue,
                r => break r,
            }
        }
        .map_err(|e| self.explain_create_error(e))
    }

    /// A create's error, or the read-only data filesystem that caused it.
    fn explain_create_error(&self, e: CoreError) -> CoreError {
        let text = e.full_message();
        if (text.contains("os error 30") || text.contains("Read-only file system")) && self.storage.read_only() {
            return CoreError::Exhausted(self.storage.read_only_error());
        }
        e
    }

    /// After a create failed with ENOSPC on btrfs: frees emptied data chunks
    /// ([`crate::storage::Storage::reclaim`]) and says whether to try once more (a failed
    /// create leaves nothing behind).
    async fn reclaim_after(&self, e: &CoreError) -> bool {
        let text = e.full_message();
        if !self.storage.cow || !(text.contains("os error 28") || text.contains("No space left on device")) {
            return false;
        }
        // Space that destroys are about to free counts: their cleanups finish first.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.pending_frees.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.reclaim()).await.unwrap_or(false)
    }

    pub fn list(&self) -> Vec<Record> {
        let map = self.sandboxes.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Record> = map.values().map(|s| s.record()).collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    pub fn count(&self) -> usize {
        self.sandboxes.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn alloc_uid_slot(&self) -> CoreResult<u32> {
        if self.reconciling.load(Ordering::SeqCst) {
            return Err(CoreError::Exhausted(
                "the daemon is still finding its sandboxes again after its start; try again in a moment".into(),
            ));
        }
        let mut slots = self.uid_slots.lock().unwrap_or_else(|e| e.into_inner());
        let free = slots.iter().position(|used| !used).ok_or_else(|| {
            CoreError::Exhausted(format!(
                "all {} sandbox uid ranges are in use; destroy sandboxes or raise --uid-slots",
                slots.len()
            ))
        })?;
        slots[free] = true;
        Ok(free as u32)
    }

    pub(crate) fn free_uid_slot(&self, slot: u32) {
        if let Some(s) = self.uid_slots.lock().unwrap_or_else(|e| e.into_inner()).get_mut(slot as usize) {
            *s = false;
        }
        self.slot_available();
    }

    /// Tells creates waiting for a slot that one came up; called after it did.
    fn slot_available(&self) {
        self.slot_events.fetch_add(1, Ordering::SeqCst);
        self.uid_freed.notify_waiters();
    }

    fn claim_uid_slot(&self, slot: u32) {
        if let Some(s) = self.uid_slots.lock().unwrap_or_else(|e| e.into_inner()).get_mut(slot as usize) {
            *s = true;
        }
    }

    /// A prepared slot, else a free one; when all are taken but destroyed sandboxes are
    /// still releasing theirs (or a slot is being prepared), waits (up to 5 s) for one.
    pub(crate) async fn acquire_slot(&self) -> CoreResult<u32> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let freed = self.uid_freed.notified();
            let events = self.slot_events.load(Ordering::SeqCst);
            if let Some(s) = self.take_prepared() {
                return Ok(s);
            }
            match self.alloc_uid_slot() {
                Ok(s) => return Ok(s),
                Err(e)
                    if self.pending_frees.load(Ordering::SeqCst) == 0 && self.preparing.load(Ordering::SeqCst) == 0 =>
                {
                    // A refill may have taken the last free slot after the look at the
                    // prepared ones and finished preparing it before the counters were
                    // read: look again then.
                    if self.slot_events.load(Ordering::SeqCst) == events || tokio::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                }
                Err(e) => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Keeps up to `--prewarm` slots prepared: directory and cgroups in place, and a
    /// process of the spawner waiting in the slot's new namespaces (see the spawner's
    /// prepared shells), so that a create only does the sandbox-specific part. Runs in the
    /// background; called at start, after each create and after each slot is freed.
    pub fn refill(self: &Arc<Self>) {
        if self.cfg.prewarm == 0
            || self.closing.load(Ordering::SeqCst)
            || self.reconciling.load(Ordering::SeqCst)
            || self.refilling.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            loop {
                while !this.closing.load(Ordering::SeqCst)
                    && this.prepared.lock().unwrap_or_else(|e| e.into_inner()).len() < this.cfg.prewarm
                {
                    // Counted as preparing before the slot is taken and until it is either
                    // prepared or free again, so that a create that finds no free slot
                    // meanwhile waits for it instead of failing.
                    this.preparing.fetch_add(1, Ordering::SeqCst);
                    let Ok(slot) = this.alloc_uid_slot() else {
                        this.preparing.fetch_sub(1, Ordering::SeqCst);
                        break;
                    };
                    let res = this.prepare_slot(slot);
                    if let Err(e) = res {
                        warn!(slot, error = %e, "preparing a slot failed");
                        let _ = this.release_slot(slot, None);
                        this.free_uid_slot(slot);
                        this.preparing.fetch_sub(1, Ordering::SeqCst);
                        this.uid_freed.notify_waiters();
                        this.refilling.store(false, Ordering::SeqCst);
                        return;
                    }
                    this.prepared.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
                    // Counted before `preparing` drops (a create that saw neither looks
                    // again), and waiters woken after it (one that finds the slot taken
                    // by another sees `preparing` as it is).
                    this.slot_events.fetch_add(1, Ordering::SeqCst);
                    this.preparing.fetch_sub(1, Ordering::SeqCst);
                    this.uid_freed.notify_waiters();
                }
                this.refilling.store(false, Ordering::SeqCst);
                // A create may have taken one after the check: go again unless another
                // refill started meanwhile.
                let short = this.prepared.lock().unwrap_or_else(|e| e.into_inner()).len() < this.cfg.prewarm;
                let free = this.uid_slots.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|used| !used);
                if !(short && free) || this.refilling.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }

    fn prepare_slot(&self, uid_slot: u32) -> Result<(), String> {
        self.ensure_slot(uid_slot, 0)?;
        if let Some(net) = &self.net {
            net.prepare(uid_slot)?;
        }
        let cg = self.slot_name(uid_slot);
        let placement = self.cgroups.placement(&cg).map_err(|e| cgroup_text(&e))?;
        let slot = SlotSpec {
            dir: self.slot_dirs(uid_slot).root,
            uid_base: self.cfg.uid_start + uid_slot * UID_RANGE,
            uid_count: UID_RANGE,
            cgroup_dir: placement.clone_into,
            cgroup_tasks: placement.self_join,
            net: self.net.as_ref().map(|n| n.slot_spec(uid_slot)),
        };
        self.spawner.prepare(&slot).map(drop).map_err(|e| e.to_string())
    }

    /// How many slots are prepared.
    pub fn prepared(&self) -> usize {
        self.prepared.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A prepared slot, if one is ready.
    fn take_prepared(&self) -> Option<u32> {
        self.prepared.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Makes the next use of a slot prepare it from scratch (its directories, data tree
    /// and cgroups).
    pub(crate) fn forget_slot_state(&self, uid_slot: u32) {
        self.cache().remove(&uid_slot);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<u32, SlotCache>> {
        self.slot_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes sure a slot's directory and cgroups exist (they do after its first use).
    pub(crate) fn ensure_slot(&self, uid_slot: u32, layers: usize) -> Result<(), String> {
        if self.cache().get(&uid_slot).is_some_and(|c| c.lowers >= layers) {
            return Ok(());
        }
        self.ensure_slot_uncached(uid_slot, layers)?;
        let mut cache = self.cache();
        let c = cache.entry(uid_slot).or_default();
        c.lowers = c.lowers.max(layers);
        Ok(())
    }

    fn ensure_slot_uncached(&self, uid_slot: u32, layers: usize) -> Result<(), String> {
        let dirs = self.slot_dirs(uid_slot);
        let uid_base = self.cfg.uid_start + uid_slot * UID_RANGE;
        dirs.ensure(layers, uid_base).map_err(|e| format!("prepare {}: {e}", dirs.root.display()))?;
        // On btrfs the data tree is a subvolume (snapshots in constant time).
        if self.storage.cow && !abx_sys::btrfs::is_subvolume(&dirs.data()) {
            crate::cow::remove(&dirs.data())?;
            crate::cow::make(&dirs.data(), true)?;
        }
        match self.cgroups.create(&self.slot_name(uid_slot), &abx_cgroup::Limits::default()) {
            Ok(()) | Err(abx_cgroup::Error::Exists { .. }) => Ok(()),
            Err(e) => Err(cgroup_text(&e)),
        }
    }

    /// Empties a slot for its next sandbox: no process left in its cgroups, an empty upper
    /// and work directory, no agent socket. Returns the first failure, after trying all.
    pub(crate) fn release_slot(&self, uid_slot: u32, id: Option<&str>) -> Result<(), String> {
        let mut first: Option<String> = None;
        if let Err(e) = self.cgroups.kill(&self.slot_name(uid_slot))
            && !matches!(e, abx_cgroup::Error::NotFound { .. })
        {
            first.get_or_insert(cgroup_text(&e));
        }
        // After the kill, so no process of this sandbox opens a flow after its flows are
        // flushed (the next sandbox of the slot would inherit it).
        if let Some(net) = &self.net {
            net.detach(uid_slot, id.unwrap_or(""));
        }
        let dirs = self.slot_dirs(uid_slot);
        // Most sandboxes wrote a few files (`/etc/resolv.conf` at least), which `empty`
        // below unlinks. Many files go faster with the whole subvolume: deleting it is one
        // transaction, but a costly one (and work for btrfs' cleaner after it).
        if crate::cow::has_entries(&dirs.upper(), SUBVOLUME_SWAP_ENTRIES)
            && abx_sys::btrfs::is_subvolume(&dirs.data())
            && let Err(e) = crate::cow::remove(&dirs.data()).and_then(|_| crate::cow::make(&dirs.data(), true))
        {
            first.get_or_insert(e);
        }
        // A sandbox that filled the disk leaves btrfs no room to allocate metadata even
        // after its files are gone (their chunks stay allocated until the cleaner runs):
        // free the emptied chunks and finish.
        let emptied = match dirs.empty() {
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull && self.storage.reclaim() => dirs.empty(),
            r => r,
        };
        if let Err(e) = emptied {
            first.get_or_insert(format!("empty slot {}: {e}", self.slot_name(uid_slot)));
        }
        // Statistics start from zero for the next sandbox; done here, off its create.
        let cg = self.slot_name(uid_slot);
        let oom_base = match self.cgroups.reset_stats(&cg) {
            Ok(()) => self.cgroups.oom_kills(&cg).ok(),
            Err(_) => None,
        };
        if first.is_some() {
            self.cache().remove(&uid_slot);
        } else if let Some(c) = self.cache().get_mut(&uid_slot) {
            c.oom_base = oom_base;
        }
        first.map_or(Ok(()), Err)
    }

    /// Creates and starts a sandbox.
    pub async fn create(self: &Arc<Self>, req: CreateSandbox) -> CoreResult<Arc<Sandbox>> {
        self.create_on(req, None, false).await
    }

    /// Creates and starts a sandbox on `given` layers and configuration instead of a
    /// stored template (the steps of a template build). An `ephemeral` one lives for one
    /// request: a restart removes it instead of adopting it.
    pub(crate) async fn create_on(
        self: &Arc<Self>,
        mut req: CreateSandbox,
        given: Option<abx_template::Template>,
        ephemeral: bool,
    ) -> CoreResult<Arc<Sandbox>> {
        // Only a template build gives its own layers: its step sandboxes are its own.
        let build_step = given.is_some();
        // Of the request as the caller sent it, before the snapshot's settings fill it in.
        let idempotency = crate::sandbox::Idempotency::of(&req);
        // What the caller gave (a snapshot's are known to work): checked once booted.
        let (asked_user, asked_workdir) = (req.user.clone(), req.workdir.clone());
        let snap = match &req.snapshot {
            Some(key) => {
                let s = self.find_snapshot(key)?;
                if req.template.as_ref().is_some_and(|t| *t != s.template) {
                    return Err(CoreError::Invalid(format!(
                        "snapshot {} was taken on template '{}', not '{}'",
                        s.id,
                        s.template,
                        req.template.as_deref().unwrap_or_default()
                    )));
                }
                // Unset settings come from the snapshot's sandbox.
                if req.limits == Limits::default() {
                    req.limits = s.limits.clone();
                }
                let mut env = s.env.clone();
                env.extend(std::mem::take(&mut req.env));
                req.env = env;
                req.workdir = req.workdir.or(s.workdir.clone());
                req.user = req.user.or(s.user.clone());
                req.network = req.network.or(Some(s.network.clone()));
                if req.volumes.is_empty() {
                    req.volumes = s.volumes.clone();
                }
                let mut metadata = s.metadata.clone();
                metadata.extend(std::mem::take(&mut req.metadata));
                req.metadata = metadata;
                // The source's timeout, when it had one (a persistent source's forks get
                // the daemon's default: they are not persistent themselves), and a
                // snapshot at expiry (forensics); stopping at expiry is for persistent
                // sandboxes, which forks are not.
                req.timeout_secs = req.timeout_secs.or(s.timeout_secs);
                if s.on_timeout == abx_api::TimeoutAction::Snapshot {
                    req.on_timeout = req.on_timeout.or(Some(s.on_timeout));
                }
                req.ingress = req.ingress.or(Some(s.ingress));
                Some(s)
            }
            None => None,
        };
        // Resolved and pinned under the gate: a removal of the template's layers or of a
        // volume either finished before or sees the pin (see `pins.rs`).
        let gate = self.pins.resolving();
        let template = match &snap {
            // The template may have been rebuilt or removed since: the snapshot's layers
            // (kept by garbage collection while a snapshot uses them) are what counts.
            Some(s) => match self.template(&s.template) {
                Ok(mut t) => {
                    t.layers = s.layers.clone();
                    t
                }
                Err(_) => abx_template::Template {
                    name: s.template.clone(),
                    layers: s.layers.clone(),
                    config: Default::default(),
                    size_bytes: 0,
                    created_at: 0,
                    recipe: String::new(),
                    packages: Vec::new(),
                },
            },
            None => match given {
                Some(t) => t,
                None => self.template(req.template.as_deref().unwrap_or(&self.cfg.default_template))?,
            },
        };
        validate::create(&req)?;
        self.volume_specs(&req.volumes)?;
        let _pinned = self.pins.pin(
            template
                .layers
                .iter()
                .map(|l| crate::pins::Pin::Layer(l.clone()))
                .chain(req.volumes.iter().map(|v| crate::pins::Pin::Volume(v.name.clone()))),
        );
        drop(gate);
        // Held until the sandbox is registered under the name (this function's end).
        let owner = crate::auth::tenant();
        let _name = req.name.as_deref().map(|n| self.reserve_name("name", owner.as_deref(), n)).transpose()?;
        if let Some(name) = &req.name {
            match self.name_taken(owner.as_deref(), name)? {
                Some("sandbox") => return Err(CoreError::Conflict(format!("a sandbox named '{name}' already exists"))),
                Some(_) => {
                    return Err(CoreError::Conflict(format!(
                        "'{name}' already names a snapshot (fork takes either); give the sandbox another name"
                    )));
                }
                None => {}
            }
        }
        let limits = merge_limits(&req.limits, &self.cfg.default_limits);
        validate::limits(&limits)?;
        let policy = self.check_policy(&req.network.clone().unwrap_or_default())?;
        let network = policy.to_api();
        let timeout = match req.timeout_secs {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None if req.persist => None,
            None => self.cfg.default_timeout,
        };
        let t0 = std::time::Instant::now();
        let servable = snap.is_none()
            && req.volumes.is_empty()
            && !req.persist
            && limits.open_files == self.cfg.default_limits.open_files;
        let has_pool = self.pools.has(&template.name);
        if has_pool && !servable {
            self.pools.miss_unservable(&template.name);
        }
        if has_pool && servable {
            let claim = crate::pool::Claim {
                name: req.name.clone(),
                tenant: crate::auth::tenant(),
                limits: limits.clone(),
                env: req.env.clone(),
                workdir: req.workdir.clone(),
                user: req.user.clone(),
                metadata: req.metadata.clone(),
                network: network.clone(),
                policy: policy.clone(),
                timeout,
                on_timeout: req.on_timeout.unwrap_or_default(),
                ingress_token: self.new_ingress_token(req.ingress),
                ephemeral,
                idempotency: idempotency.clone(),
            };
            if let Some(sb) = self.claim(&template, claim).await? {
                return Ok(sb);
            }
        }
        let slot = self.acquire_slot().await?;
        let id = new_id();
        let mut env = template.config.env.clone();
        env.extend(req.env.clone());
        let created_at = now();
        let base = self.new_record(id, &template, slot, created_at);
        let rec = Record {
            name: req.name.clone(),
            tenant: crate::auth::tenant(),
            limits,
            env,
            workdir: req.workdir.clone().or(base.workdir.clone()),
            user: req.user.clone().or(base.user.clone()),
            metadata: req.metadata.clone(),
            expires_at: timeout.map(|t| created_at + t.as_secs().max(1)),
            timeout_secs: timeout.map(|t| t.as_secs().max(1)),
            network,
            persist: req.persist,
            on_timeout: req.on_timeout.unwrap_or(if req.persist {
                TimeoutAction::Stop
            } else {
                TimeoutAction::Destroy
            }),
            volumes: req.volumes.clone(),
            snapshot: snap.as_ref().map(|s| s.id.clone()),
            ephemeral,
            build_step,
            ingress_token: self.new_ingress_token(req.ingress),
            last_pid: 0,
            idempotency,
            ..base
        };
        let this = self.clone();
        let started = tokio::task::spawn_blocking(move || {
            if let Some(s) = &snap {
                this.ensure_slot(slot, rec.layers.len())
                    .map_err(|m| CoreError::Setup { id: rec.id.clone(), message: m })?;
                this.seed_slot(slot, s, &rec.id)?;
            }
            this.start_blocking(rec, &policy)
        })
        .await
        .map_err(|e| CoreError::internal("sandbox setup task", e.to_string()))?;
        self.refill();
        match started {
            Ok((rec, pidfd)) => {
                let sb = self.live(rec, Some(pidfd));
                // Until its readiness check passes it shows `starting`, and requests to it
                // wait (as during a start), holding its operation lock meanwhile.
                let readying = template.config.ready.is_some();
                let ops = if readying {
                    sb.update(|r| r.state = SandboxState::Starting);
                    Some(sb.ops.clone().lock_owned().await)
                } else {
                    None
                };
                self.publish(sb.clone());
                let mut res =
                    self.check_user_workdir(&sb, &template.name, asked_user.as_deref(), asked_workdir.as_deref()).await;
                if res.is_ok() {
                    res = self.run_start(&sb, &template.config).await;
                }
                if readying {
                    sb.update(|r| {
                        if r.state == SandboxState::Starting {
                            r.state = SandboxState::Running;
                        }
                    });
                }
                drop(ops);
                if let Err(e) = res {
                    let _ = self.destroy(&sb.id, true).await;
                    return Err(e);
                }
                self.pools.observe_cold(&template.name, t0.elapsed());
                Ok(sb)
            }
            Err(e) => {
                // Nothing half-made: the slot is emptied before anyone can get it again.
                self.abandon_slot(slot).await;
                Err(e)
            }
        }
    }

    /// Checks, through the agent of a sandbox just booted, that the user and working
    /// directory a create asked for exist there: a sandbox without them would take no exec
    /// at all. The same check serves a claim and a cold create, so both fail alike: 400,
    /// naming the user or directory.
    pub(crate) async fn check_user_workdir(
        &self,
        sb: &Sandbox,
        template: &str,
        user: Option<&str>,
        workdir: Option<&str>,
    ) -> CoreResult<()> {
        use abx_proto::{FileInfo, FileKind, Request};
        let socket = sb.dirs.agent_socket();
        if let Some(u) = user {
            let stat = Request::Stat { path: "/".into(), user: Some(u.into()) };
            crate::agent::call::<FileInfo>(&socket, &stat)
                .await
                .map_err(|e| unusable(&sb.id, template, &format!("user '{u}'"), e))?;
        }
        if let Some(w) = workdir {
            let stat = Request::Stat { path: w.into(), user: Some("0".into()) };
            let info = crate::agent::call::<FileInfo>(&socket, &stat)
                .await
                .map_err(|e| unusable(&sb.id, template, &format!("workdir '{w}'"), e))?;
            if matches!(info.kind, FileKind::File | FileKind::Other) {
                return Err(CoreError::Invalid(format!("workdir '{w}' is not a directory in template '{template}'")));
            }
        }
        Ok(())
    }

    /// The record of a sandbox about to start in `slot` on `template`, with the template's
    /// and the daemon's defaults (no name, no timeout, no egress, nothing mounted).
    pub(crate) fn new_record(
        &self,
        id: String,
        template: &abx_template::Template,
        slot: u32,
        created_at: u64,
    ) -> Record {
        Record {
            hostname: id.clone(),
            id,
            name: None,
            tenant: None,
            template: template.name.clone(),
            layers: template.layers.clone(),
            limits: merge_limits(&Limits::default(), &self.cfg.default_limits),
            env: template.config.env.clone(),
            workdir: template.config.workdir.clone(),
            user: template.config.user.clone(),
            metadata: Default::default(),
            created_at,
            expires_at: None,
            timeout_secs: None,
            pid: 0,
            pid_start: 0,
            uid_slot: slot,
            uid_base: self.uid_base_of(slot),
            state: SandboxState::Creating,
            oom_kills_base: 0,
            network: Default::default(),
            persist: false,
            on_timeout: Default::default(),
            volumes: Vec::new(),
            snapshot: None,
            pooled: false,
            ephemeral: false,
            build_step: false,
            start: template.config.start.clone(),
            ready: template.config.ready.clone(),
            start_as: (!template.config.start.is_empty() || template.config.ready.is_some()).then(|| {
                crate::sandbox::StartAs {
                    env: template.config.env.clone(),
                    user: template.config.user.clone(),
                    workdir: template.config.workdir.clone(),
                }
            }),
            ingress_token: None,
            last_pid: 0,
            idempotency: None,
        }
    }

    /// A sandbox's ingress token for the access it asked for (None: the daemon's default),
    /// or None when its ports are public.
    pub(crate) fn new_ingress_token(&self, access: Option<abx_api::IngressAccess>) -> Option<String> {
        let access = access.unwrap_or_else(|| self.net.as_ref().map(|n| n.cfg.ingress_access).unwrap_or_default());
        (access == abx_api::IngressAccess::Token).then(crate::auth::random_token)
    }

    /// Uid slots neither used nor prepared.
    pub(crate) fn free_slots(&self) -> usize {
        self.uid_slots.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|u| !**u).count()
    }

    /// Writes a slot's cgroup limits unless it already has them.
    pub(crate) fn set_slot_limits(&self, uid_slot: u32, limits: &Limits) -> Result<(), String> {
        let limits = cgroup_limits(limits);
        let cached = self.cache().get(&uid_slot).and_then(|c| c.limits);
        if cached != Some(limits) {
            self.cgroups.update(&self.slot_name(uid_slot), &limits).map_err(|e| cgroup_text(&e))?;
            self.cache().entry(uid_slot).or_default().limits = Some(limits);
        }
        Ok(())
    }

    /// Puts a slot's processes in the idle CPU class or takes them out of it, unless it is
    /// there already. A pooled sandbox boots and waits idle, so that refilling a pool does
    /// not take the CPU from sandboxes in use; a claim makes it a normal one again. Hosts
    /// without `cpu.idle` (before Linux 5.15, or no cpu controller) skip this.
    pub(crate) fn set_slot_idle(&self, uid_slot: u32, idle: bool) -> Result<(), String> {
        if self.cache().get(&uid_slot).and_then(|c| c.idle) == Some(idle) {
            return Ok(());
        }
        self.cgroups.set_idle(&self.slot_name(uid_slot), idle).map_err(|e| cgroup_text(&e))?;
        self.cache().entry(uid_slot).or_default().idle = Some(idle);
        Ok(())
    }

    /// Empties and frees the slot of a create that failed.
    pub(crate) async fn abandon_slot(self: &Arc<Self>, slot: u32) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(msg) = this.release_slot(slot, None) {
                warn!(slot, error = %msg, "cleanup after a failed create");
            }
            this.free_uid_slot(slot);
        })
        .await;
    }

    pub(crate) fn template(&self, name: &str) -> CoreResult<abx_template::Template> {
        self.templates.get(name).map_err(|e| match e {
            abx_template::Error::NotFound { .. } => CoreError::NotFound { kind: "template", id: name.to_string() },
            other => CoreError::internal(format!("read template '{name}'"), other),
        })
    }

    /// Prepares the slot, asks the spawner, waits for the agent's exec. The caller empties
    /// the slot if this fails. A pooled sandbox boots in the idle CPU class.
    pub(crate) fn start_blocking(
        &self,
        rec: Record,
        policy: &crate::net::policy::Policy,
    ) -> CoreResult<(Record, OwnedFd)> {
        let idle = rec.pooled;
        self.start_blocking_as(rec, policy, idle)
    }

    /// [`Manager::start_blocking`], in the idle CPU class or not as `idle` says.
    pub(crate) fn start_blocking_as(
        &self,
        mut rec: Record,
        policy: &crate::net::policy::Policy,
        idle: bool,
    ) -> CoreResult<(Record, OwnedFd)> {
        let t0 = std::time::Instant::now();
        let dirs = self.slot_dirs(rec.uid_slot);
        let cg = self.slot_name(rec.uid_slot);
        let setup_err = |message: String| CoreError::Setup { id: rec.id.clone(), message };
        self.ensure_slot(rec.uid_slot, rec.layers.len()).map_err(setup_err)?;
        self.set_slot_limits(rec.uid_slot, &rec.limits).map_err(setup_err)?;
        match self.set_slot_idle(rec.uid_slot, idle) {
            // A pooled boot at normal priority still works.
            Err(e) if idle => {
                warn!(slot = rec.uid_slot, error = %e, "cannot put a pooled boot in the idle CPU class")
            }
            r => r.map_err(setup_err)?,
        }
        let cached = self.cache().get(&rec.uid_slot).cloned().unwrap_or_default();
        rec.oom_kills_base = match cached.oom_base {
            Some(base) => base,
            None => {
                self.cgroups.reset_stats(&cg).map_err(|e| setup_err(cgroup_text(&e)))?;
                self.cgroups.stats(&cg).map(|s| s.oom_kills).unwrap_or(0)
            }
        };
        if let Some(c) = self.cache().get_mut(&rec.uid_slot) {
            // Used up: the next sandbox of this slot gets a new base when it is emptied.
            c.oom_base = None;
        }
        if let Some(net) = &self.net {
            net.attach(rec.uid_slot, &rec.id, crate::net::AuditOwner::from(&rec), policy)
                .map_err(|e| setup_err(format!("network policy: {e}")))?;
        }
        let t_cg = t0.elapsed();
        // A prepared shell killed just before it took the sandbox looks, on the status
        // pipe, like a successful exec (the pipe closes either way); the program it runs
        // says which (the kernel switches it before closing close-on-exec descriptors).
        // Such a spawn is tried once more, with a fresh shell.
        let mut attempt = 0;
        let (pid, pidfd) = loop {
            attempt += 1;
            let (pid, pidfd) = self.spawn_once(&rec, &dirs, &cg, t0, t_cg)?;
            if runs_agent(pid) && !exited(&pidfd) {
                break (pid, pidfd);
            }
            if attempt == 2 {
                return Err(setup_err("the sandbox's first process died before starting its agent".into()));
            }
            warn!(sandbox = %rec.id, "the sandbox's first process died before starting its agent; trying again");
        };
        rec.pid = pid;
        rec.pid_start = process_start_time(pid).unwrap_or(0);
        rec.state = SandboxState::Running;
        if let Err(e) = self.store.put(&rec) {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            wait_exit_blocking(&pidfd, Duration::from_secs(5));
            return Err(CoreError::internal("record sandbox", e));
        }
        Ok((rec, pidfd))
    }

    /// Keeps `dirs`' resolv.conf (bound over the sandbox's /etc/resolv.conf) at
    /// `contents`, owned by the sandbox's root (`owner` on the host), mode 0644. Made anew
    /// when missing or no longer exactly what this daemon wrote (the previous sandbox of
    /// the directory may have changed its contents, mode, owner or attributes): one
    /// `statx` and one read when it is unchanged.
    fn keep_resolv_conf(&self, dirs: &SandboxDirs, owner: u32, contents: &str) -> std::io::Result<()> {
        use std::io::{Read, Write};
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = dirs.resolv_conf();
        let known = self.resolv_files.lock().unwrap_or_else(|e| e.into_inner()).get(&path).copied();
        if let (Some(known), Ok(f)) =
            (known, std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path))
        {
            let mut now = Vec::with_capacity(contents.len() + 1);
            if f.metadata().is_ok_and(|m| abx_template::FileStamp::from_metadata(&m) == known)
                && (&f).take(contents.len() as u64 + 1).read_to_end(&mut now).is_ok()
                && now == contents.as_bytes()
            {
                return Ok(());
            }
        }
        self.resolv_files.lock().unwrap_or_else(|e| e.into_inner()).remove(&path);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        f.write_all(contents.as_bytes())?;
        std::os::unix::fs::fchown(&f, Some(owner), Some(owner))?;
        // Whatever the daemon's umask.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        let stamp = abx_template::FileStamp::from_metadata(&f.metadata()?);
        self.resolv_files.lock().unwrap_or_else(|e| e.into_inner()).insert(path, stamp);
        Ok(())
    }

    /// One spawn: the agent's listening socket, the status pipe, the spawner's request,
    /// and the wait for the agent's exec.
    fn spawn_once(
        &self,
        rec: &Record,
        dirs: &SandboxDirs,
        cg: &str,
        t0: std::time::Instant,
        t_cg: Duration,
    ) -> CoreResult<(i32, OwnedFd)> {
        let setup_err = |message: String| CoreError::Setup { id: rec.id.clone(), message };
        let _ = std::fs::remove_file(dirs.agent_socket());
        let listener = std::os::unix::net::UnixListener::bind(dirs.agent_socket())
            .map_err(|e| setup_err(format!("bind {}: {e}", dirs.agent_socket().display())))?;
        let (status_r, status_w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| setup_err(format!("pipe: {e}")))?;
        let placement = self.cgroups.placement(cg).map_err(|e| setup_err(cgroup_text(&e)))?;
        let resolv_conf = self.net.as_ref().map(|n| n.resolv_conf());
        if let Some(contents) = &resolv_conf {
            self.keep_resolv_conf(dirs, rec.uid_base, contents)
                .map_err(|e| setup_err(format!("write {}: {e}", dirs.resolv_conf().display())))?;
        }
        let spec = SpawnSpec {
            id: rec.id.clone(),
            dir: dirs.root.clone(),
            layers: rec.layers.iter().map(|d| self.templates.layer_path(d)).collect(),
            uid_base: rec.uid_base,
            uid_count: UID_RANGE,
            hostname: rec.hostname.clone(),
            cgroup_dir: placement.clone_into,
            cgroup_tasks: placement.self_join,
            seccomp: self.seccomp.clone(),
            capabilities: CAPABILITIES.to_vec(),
            nofile: rec.limits.open_files.unwrap_or(4096),
            // A persistent sandbox's files are synced like any filesystem's.
            volatile: !rec.persist,
            volumes: self.volume_specs(&rec.volumes).map_err(|e| setup_err(e.to_string()))?,
            resolv_conf,
            net: self.net.as_ref().map(|n| n.slot_spec(rec.uid_slot)),
            last_pid: rec.last_pid,
        };
        let t_pre = t0.elapsed();
        let spawned = self.spawner.spawn(&spec, listener.as_fd(), status_w.as_fd());
        drop(status_w);
        drop(listener);
        let (pid, pidfd) = match spawned {
            Ok(v) => v,
            // A child that failed early explains itself on the status pipe.
            Err(e) => {
                return Err(setup_err(match wait_exec(&status_r, Duration::from_millis(200)) {
                    Err(msg) if !msg.starts_with("sandbox setup did not finish") => msg,
                    _ => e.to_string(),
                }));
            }
        };
        let t_spawn = t0.elapsed();
        let exec_result = wait_exec(&status_r, SETUP_TIMEOUT);
        tracing::debug!(sandbox = %rec.id, slot_cgroups = ?t_cg, pre = ?t_pre, spawned = ?t_spawn, exec = ?t0.elapsed(), "sandbox started");
        if let Err(message) = exec_result {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            wait_exit_blocking(&pidfd, Duration::from_secs(5));
            return Err(setup_err(message));
        }
        Ok((pid, pidfd))
    }

    /// Makes a started (or re-adopted) sandbox live: watcher and timeout tasks.
    /// Takes sandbox `key`'s operation lock (snapshot, rollback, stop, start, destroy run
    /// one at a time) and returns the sandbox as it is once the lock is held: an operation
    /// that restarts it (rollback, start) registers it anew, with the same lock.
    pub(crate) async fn lock_ops(&self, key: &str) -> CoreResult<(Arc<Sandbox>, tokio::sync::OwnedMutexGuard<()>)> {
        let first = self.get(key)?;
        let guard = first.ops.clone().lock_owned().await;
        let now = self.get(&first.id)?;
        Ok((now, guard))
    }

    /// Sandbox `key` once a rollback, restart, stop or start in progress (which holds its
    /// operation lock while it runs) has finished, waiting up to 60 s for it; as it is
    /// when none runs (or the wait ran out).
    pub(crate) async fn settled(&self, key: &str) -> CoreResult<Arc<Sandbox>> {
        let sb = self.get(key)?;
        if matches!(sb.state(), SandboxState::Creating | SandboxState::Starting | SandboxState::Stopping)
            && let Ok(locked) = tokio::time::timeout(Duration::from_secs(60), self.lock_ops(key)).await
        {
            return Ok(locked?.0);
        }
        Ok(sb)
    }

    pub(crate) fn register(self: &Arc<Self>, rec: Record, pidfd: Option<OwnedFd>) -> Arc<Sandbox> {
        let sb = self.live(rec, pidfd);
        self.publish(sb.clone());
        sb
    }

    /// Makes a live sandbox visible to callers and arms its timeout.
    pub(crate) fn publish(self: &Arc<Self>, sb: Arc<Sandbox>) {
        self.sandboxes.write().unwrap_or_else(|e| e.into_inner()).insert(sb.id.clone(), sb.clone());
        self.arm_timeout(&sb);
    }

    /// Makes the live handle of a started sandbox (with the task that watches PID 1),
    /// without publishing it: pooled sandboxes wait unseen until claimed.
    pub(crate) fn live(self: &Arc<Self>, rec: Record, pidfd: Option<OwnedFd>) -> Arc<Sandbox> {
        let (tx, rx) = watch::channel(pidfd.is_none());
        let pidfd = pidfd.map(Arc::new);
        // A sandbox registered anew (a rollback, a start) keeps its operation lock, which
        // the operation that restarts it holds.
        let ops = self
            .sandboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&rec.id)
            .map(|s| s.ops.clone())
            .unwrap_or_default();
        let sb = Arc::new(Sandbox {
            id: rec.id.clone(),
            dirs: self.slot_dirs(rec.uid_slot),
            cgroup: self.slot_name(rec.uid_slot),
            record: Mutex::new(rec),
            pidfd: pidfd.clone(),
            exited: rx,
            ttl: Mutex::new(None),
            activity: std::sync::atomic::AtomicU64::new(crate::sandbox::now_ms()),
            attached: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            packets: std::sync::atomic::AtomicU64::new(u64::MAX),
            ops,
        });
        if let Some(fd) = pidfd {
            let this = self.clone();
            let weak = Arc::downgrade(&sb);
            tokio::spawn(async move {
                wait_exit(&fd).await;
                let _ = tx.send(true);
                if let Some(sb) = weak.upgrade() {
                    this.on_exit(&sb).await;
                }
            });
        }
        sb
    }

    /// PID 1 ended without a destroy: keep the files for inspection, free the cgroup.
    async fn on_exit(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        let was_running = sb.update(|r| {
            let running = matches!(r.state, SandboxState::Running | SandboxState::Paused);
            if running {
                r.state = SandboxState::Exited;
            }
            running
        });
        if !was_running {
            return;
        }
        warn!(sandbox = %sb.id, "sandbox PID 1 exited on its own");
        let this = self.clone();
        let sb2 = sb.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = this.cgroups.kill(&sb2.cgroup);
            let _ = this.store.put(&sb2.record());
        })
        .await;
    }

    /// (Re)starts the timeout task from the record's `expires_at`.
    pub fn arm_timeout(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        let mut slot = sb.ttl.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = slot.take() {
            h.abort();
        }
        let (at, state, action) = sb.read(|r| (r.expires_at, r.state, r.on_timeout));
        let Some(at) = at else { return };
        if state == SandboxState::Stopped && at <= now() && action != abx_api::TimeoutAction::Destroy {
            // Stopped by its timeout (`stop`, or `snapshot` that failed and stopped it
            // instead): what was due is done. Armed again it fired at once (a second
            // expiry; after a failed snapshot, a second try that could destroy the files
            // kept instead). A start gives it its timeout again.
            return;
        }
        let wait = Duration::from_secs(at.saturating_sub(now()));
        let this = self.clone();
        let id = sb.id.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            // This task's own handle: what follows (a stop) must not abort it.
            if let Ok(sb) = this.get(&id) {
                sb.ttl.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
            this.on_timeout(&id).await;
        });
        *slot = Some(task.abort_handle());
    }

    /// Changes a sandbox's timeout (seconds from now; 0 removes it). Waits for a snapshot,
    /// stop, start or rollback in progress, whose records say where the files are.
    pub async fn set_timeout(self: &Arc<Self>, key: &str, secs: u64) -> CoreResult<Record> {
        validate::timeout(secs)?;
        let (sb, _ops) = self.lock_ops(key).await?;
        sb.update(|r| {
            r.expires_at = if secs == 0 { None } else { Some(now() + secs) };
            r.timeout_secs = (secs != 0).then_some(secs);
        });
        self.store.put(&sb.record()).map_err(|e| CoreError::internal("record sandbox", e))?;
        self.arm_timeout(&sb);
        Ok(sb.record())
    }

    /// The API view of a sandbox record.
    pub fn api(&self, r: &Record) -> abx_api::Sandbox {
        let mut a = r.to_api();
        // A stopped sandbox holds no slot: the address and uid range it had are another
        // sandbox's now (a start gives it a slot again).
        if matches!(r.state, SandboxState::Stopped | SandboxState::Starting) {
            a.uid_base = 0;
        } else {
            a.address = self.net.as_ref().map(|n| n.slot_addr(r.uid_slot).to_string());
        }
        a
    }

    /// With `--idle-pause`: every second, pauses running sandboxes that had no request and
    /// no attached exec session for that long.
    pub fn watch_idle(self: &Arc<Self>) {
        let Some(idle) = self.cfg.idle_pause else { return };
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(m) = this.upgrade() else { return };
                if m.closing.load(Ordering::SeqCst) {
                    return;
                }
                let running: Vec<Arc<Sandbox>> = m
                    .sandboxes
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .filter(|sb| sb.state() == SandboxState::Running)
                    .cloned()
                    .collect();
                // Traffic of the sandbox's own processes (a download, a dev server's
                // connections) is activity: the packets its veth counted.
                if let Some(net) = &m.net {
                    for sb in &running {
                        if let Some(n) = net.packets(sb.read(|r| r.uid_slot)) {
                            sb.note_packets(n);
                        }
                    }
                }
                let idle_ones: Vec<String> =
                    running.iter().filter(|sb| sb.idle_for(idle)).map(|sb| sb.id.clone()).collect();
                drop(running);
                for id in idle_ones {
                    match m.pause(&id).await {
                        Ok(_) => info!(sandbox = %id, idle = ?idle, "paused after being idle"),
                        // Removed, stopped or restarted since it was found idle.
                        Err(CoreError::NotFound { .. } | CoreError::Conflict(_)) => {}
                        Err(e) => warn!(sandbox = %id, error = %e.full_message(), "idle pause failed"),
                    }
                    // A request that arrived while this one froze it saw it still running:
                    // its activity is newer, so thaw again.
                    if let Ok(sb) = m.get(&id)
                        && !sb.idle_for(idle)
                    {
                        let _ = m.resume(&id).await;
                    }
                }
            }
        });
    }

    /// What a sandbox changed since its template (read on the host; a paused sandbox stays
    /// paused). With `archive`, also a tar of the added and changed paths, and with
    /// `archive: Some(true)` of the deletions as OCI whiteouts ([`crate::diff::archive`]).
    pub async fn diff(
        self: &Arc<Self>,
        key: &str,
        archive: Option<bool>,
        since: Option<&str>,
    ) -> CoreResult<(crate::diff::Diff, Option<Vec<u8>>)> {
        // Waits for a start, stop or rollback in progress, as an exec does, rather than
        // answer "try again".
        let sb = self.settled(key).await?;
        let rec = sb.record();
        if matches!(
            rec.state,
            SandboxState::Creating | SandboxState::Destroying | SandboxState::Starting | SandboxState::Stopping
        ) {
            return Err(CoreError::Conflict(format!(
                "sandbox {} is {}; try again when it is not",
                sb.id,
                crate::core::state_name(rec.state)
            )));
        }
        let since = match since {
            Some(k) => {
                let s = self.find_snapshot(k)?;
                if s.layers != rec.layers {
                    return Err(CoreError::Invalid(format!(
                        "snapshot {} was taken on other template layers than sandbox {} has",
                        s.id, rec.id
                    )));
                }
                Some(self.storage.snapshots().join(&s.id).join("upper"))
            }
            None => None,
        };
        let layers: Vec<std::path::PathBuf> = rec.layers.iter().rev().map(|d| self.templates.layer_path(d)).collect();
        let upper = self.data_of(&rec).join("upper");
        let id = sb.id.clone();
        // The sandbox's files read on the host can go under the walk: a removal, a stop or a
        // rollback meanwhile (which this does not wait for). That is said as such, not as
        // an internal error.
        let moved = move |what: &str, e: std::io::Error| {
            if sb.read(|r| (r.state, r.pid)) == (rec.state, rec.pid) {
                return CoreError::internal(format!("{what} the changes of sandbox {}", sb.id), e);
            }
            crate::core::cut_short(&sb).unwrap_or_else(|| {
                CoreError::Conflict(format!(
                    "sandbox {} was restarted (a rollback or start) while the request ran",
                    sb.id
                ))
            })
        };
        tokio::task::spawn_blocking(move || {
            let d = match &since {
                Some(snap) => crate::diff::diff_since(&upper, snap, &layers),
                None => crate::diff::diff(&upper, &layers),
            };
            let mut d = d.map_err(|e| moved("read", e))?;
            // agentbox writes this one itself at setup (the sandbox's resolver).
            for v in [&mut d.added, &mut d.changed] {
                v.retain(|e| e.path != "/etc/resolv.conf");
            }
            let total: u64 = d.added.iter().chain(d.changed.iter()).map(|e| e.size).sum();
            let tar = if let Some(whiteouts) = archive {
                if total > DIFF_ARCHIVE_MAX {
                    return Err(CoreError::Invalid(format!(
                        "the changes of sandbox {id} are {total} bytes, more than the {DIFF_ARCHIVE_MAX} an archive may hold; \
                         copy them with the archive endpoint of the files API instead"
                    )));
                }
                let mut buf = Vec::new();
                crate::diff::archive(&upper, &layers, &d, whiteouts, &mut buf).map_err(|e| moved("archive", e))?;
                Some(buf)
            } else {
                None
            };
            Ok((d, tar))
        })
        .await
        .map_err(|e| CoreError::internal("diff task", e.to_string()))?
    }

    /// For a pause (`from` running, `to` paused) or a resume (the other way): the sandbox
    /// and its operation lock, its state checked again once the lock is held; no lock when
    /// it is in `to` already; a conflict naming its state when it is in neither. The first
    /// check fails at once, without waiting for the lock.
    async fn lock_to_switch(
        &self,
        key: &str,
        from: SandboxState,
        to: SandboxState,
    ) -> CoreResult<(Arc<Sandbox>, Option<tokio::sync::OwnedMutexGuard<()>>)> {
        let check = |sb: &Sandbox| match sb.state() {
            s if s == to => Ok(false),
            s if s == from => Ok(true),
            s => Err(CoreError::Conflict(format!(
                "sandbox {} is {}, not {}",
                sb.id,
                crate::core::state_name(s),
                crate::core::state_name(from)
            ))),
        };
        let sb = self.get(key)?;
        if !check(&sb)? {
            return Ok((sb, None));
        }
        let (sb, ops) = self.lock_ops(key).await?;
        Ok(if check(&sb)? { (sb, Some(ops)) } else { (sb, None) })
    }

    /// Freezes every process of a running sandbox (its memory stays); idempotent.
    ///
    /// Under the sandbox's operation lock, like a snapshot, stop, rollback or destroy: a
    /// freeze that landed in the middle of one of those would be undone by a snapshot's
    /// thaw (a "paused" sandbox that runs), or outlive the processes a stop or destroy
    /// kills.
    pub async fn pause(self: &Arc<Self>, key: &str) -> CoreResult<Record> {
        let (sb, ops) = self.lock_to_switch(key, SandboxState::Running, SandboxState::Paused).await?;
        if ops.is_none() {
            return Ok(sb.record());
        }
        let this = self.clone();
        let sb2 = sb.clone();
        tokio::task::spawn_blocking(move || this.cgroups.freeze(&sb2.cgroup))
            .await
            .map_err(|e| CoreError::internal("pause task", e.to_string()))?
            .map_err(|e| CoreError::internal(format!("freeze sandbox {}", sb.id), cgroup_text(&e)))?;
        sb.update(|r| {
            if r.state == SandboxState::Running {
                r.state = SandboxState::Paused;
            }
        });
        self.store.put(&sb.record()).map_err(|e| CoreError::internal("record sandbox", e))?;
        Ok(sb.record())
    }

    /// Thaws a paused sandbox; idempotent for a running one. Under the operation lock, as
    /// [`Self::pause`].
    pub async fn resume(self: &Arc<Self>, key: &str) -> CoreResult<Record> {
        let (sb, ops) = self.lock_to_switch(key, SandboxState::Paused, SandboxState::Running).await?;
        if ops.is_none() {
            return Ok(sb.record());
        }
        let this = self.clone();
        let sb2 = sb.clone();
        tokio::task::spawn_blocking(move || this.resume_blocking(&sb2))
            .await
            .map_err(|e| CoreError::internal("resume task", e.to_string()))??;
        Ok(sb.record())
    }

    /// Thaws a paused sandbox's cgroup and records it running (blocking).
    fn resume_blocking(&self, sb: &Arc<Sandbox>) -> CoreResult<()> {
        self.cgroups
            .thaw(&sb.cgroup)
            .map_err(|e| CoreError::internal(format!("thaw sandbox {}", sb.id), cgroup_text(&e)))?;
        sb.update(|r| {
            if r.state == SandboxState::Paused {
                r.state = SandboxState::Running;
            }
        });
        self.store.put(&sb.record()).map_err(|e| CoreError::internal("record sandbox", e))?;
        Ok(())
    }

    /// Checks a network policy from the API (an error names the bad rule).
    fn check_policy(&self, p: &abx_api::NetworkPolicy) -> CoreResult<crate::net::policy::Policy> {
        let policy = crate::net::policy::Policy::parse(p).map_err(CoreError::Invalid)?;
        policy.check_reachable(self.net.as_ref().map(|n| &n.cfg.subnet)).map_err(CoreError::Invalid)?;
        if policy.mode != abx_api::NetMode::None && self.net.is_none() {
            return Err(CoreError::Invalid(
                "this daemon runs without networking (--subnet none): only network mode 'none' is available".into(),
            ));
        }
        Ok(policy)
    }

    /// Changes a sandbox's egress policy. A running (or paused) sandbox's applies to new
    /// connections at once; a stopped one's is recorded and applied when it starts again.
    pub async fn set_network(self: &Arc<Self>, key: &str, p: abx_api::NetworkPolicy) -> CoreResult<Record> {
        let policy = self.check_policy(&p)?;
        // Waits for a stop, start or rollback in progress (see set_timeout).
        let (sb, _ops) = self.lock_ops(key).await?;
        let Some(net) = self.net.clone() else {
            return Ok(sb.record());
        };
        let (slot, state) = sb.read(|r| (r.uid_slot, r.state));
        match state {
            SandboxState::Running | SandboxState::Paused => {
                let policy = policy.clone();
                tokio::task::spawn_blocking(move || net.set_policy(slot, &policy))
                    .await
                    .map_err(|e| CoreError::internal("network policy task", e.to_string()))?
                    .map_err(|e| CoreError::internal("apply the network policy", e))?;
            }
            SandboxState::Stopped | SandboxState::Exited => {}
            s => {
                return Err(CoreError::Conflict(format!(
                    "sandbox {} is {}; try again when it is not",
                    sb.id,
                    crate::core::state_name(s)
                )));
            }
        }
        sb.update(|r| r.network = policy.to_api());
        self.store.put(&sb.record()).map_err(|e| CoreError::internal("record sandbox", e))?;
        Ok(sb.record())
    }

    /// Changes who may reach the sandbox's ports through the ingress proxy: `public` drops
    /// its token; `token` makes one unless it has one (or `rotate` asks for a new one).
    /// The proxy checks each request against the record, so it applies to the next
    /// request, on open connections too.
    pub async fn set_ingress(self: &Arc<Self>, key: &str, req: abx_api::SetIngress) -> CoreResult<Record> {
        let (sb, _ops) = self.lock_ops(key).await?;
        if matches!(sb.state(), SandboxState::Creating | SandboxState::Destroying) {
            return Err(CoreError::Conflict(format!(
                "sandbox {} is {}; try again when it is not",
                sb.id,
                crate::core::state_name(sb.state())
            )));
        }
        let token = match req.access {
            abx_api::IngressAccess::Public => None,
            abx_api::IngressAccess::Token => match sb.read(|r| r.ingress_token.clone()) {
                Some(t) if !req.rotate => Some(t),
                _ => self.new_ingress_token(Some(abx_api::IngressAccess::Token)),
            },
        };
        sb.update(|r| r.ingress_token = token);
        self.store.put(&sb.record()).map_err(|e| CoreError::internal("record sandbox", e))?;
        Ok(sb.record())
    }

    /// Destroys a sandbox: kills every process, removes cgroups and files, forgets it.
    /// A running sandbox needs `force`.
    pub async fn destroy(self: &Arc<Self>, key: &str, force: bool) -> CoreResult<()> {
        let id = self.get(key)?.id.clone();
        self.destroy_inner(&id, force, true).await
    }

    async fn destroy_inner(self: &Arc<Self>, id: &str, force: bool, abort_ttl: bool) -> CoreResult<()> {
        // Waits for a snapshot, stop or start in progress.
        let (sb, _ops) = self.lock_ops(id).await?;
        if sb.state() == SandboxState::Stopped {
            // No slot: only its kept files and its record.
            sb.update(|r| r.state = SandboxState::Destroying);
            if let Some(h) = sb.ttl.lock().unwrap_or_else(|e| e.into_inner()).take() {
                h.abort();
            }
            self.note_removal(&sb.record());
            self.sandboxes.write().unwrap_or_else(|e| e.into_inner()).remove(id);
            let this = self.clone();
            let id = id.to_string();
            self.cleanups.spawn_blocking(move || {
                if let Err(e) = crate::cow::remove(&this.storage.kept().join(&id)) {
                    warn!(sandbox = %id, error = %e, "removing the files of a stopped sandbox");
                }
                this.forget_record(&id);
                this.collect_layers_if_due();
            });
            return Ok(());
        }
        let was_paused = sb.state() == SandboxState::Paused;
        let proceed = sb.update(|r| match r.state {
            SandboxState::Running
            | SandboxState::Paused
            | SandboxState::Creating
            | SandboxState::Starting
            | SandboxState::Stopping
                if !force =>
            {
                Err(CoreError::Conflict(format!(
                    "sandbox {} is {}; stop it first or use force (agentbox rm -f) to destroy it",
                    r.id,
                    crate::core::state_name(r.state)
                )))
            }
            SandboxState::Destroying => Ok(false),
            _ => {
                r.state = SandboxState::Destroying;
                Ok(true)
            }
        })?;
        if !proceed {
            return Ok(());
        }
        if abort_ttl && let Some(h) = sb.ttl.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
        // SIGKILL to PID 1 kills every process of the pid namespace: from here on nothing in
        // the sandbox runs user code again, and it no longer exists for callers. Waiting for
        // the exit, freeing the uid range and removing cgroups, files and the record happen
        // in the background (a daemon that dies first finishes the job on its next start:
        // the record is then dead and reconcile cleans it up).
        if let Some(fd) = &sb.pidfd {
            let _ = rustix::process::pidfd_send_signal(fd.as_ref(), rustix::process::Signal::KILL);
            if was_paused {
                // A v1 freezer holds even SIGKILLed processes: thaw so that they die.
                let this = self.clone();
                let cg = sb.cgroup.clone();
                let _ = tokio::task::spawn_blocking(move || this.cgroups.thaw(&cg)).await;
            }
            if std::env::var_os("ABX_WAIT_EXIT").is_some() {
                let mut exited = sb.exited.clone();
                let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
            }
        }
        self.note_removal(&sb.record());
        self.sandboxes.write().unwrap_or_else(|e| e.into_inner()).remove(id);
        self.finish_destroy(sb);
        Ok(())
    }

    /// The background part of a destroy, after PID 1 was sent SIGKILL: waits for its exit,
    /// empties and frees the slot, deletes the record.
    pub(crate) fn finish_destroy(self: &Arc<Self>, sb: Arc<Sandbox>) {
        self.pending_frees.fetch_add(1, Ordering::SeqCst);
        let this = self.clone();
        self.cleanups.spawn(async move {
            let mut exited = sb.exited.clone();
            if tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await.is_err() {
                warn!(sandbox = %sb.id, "PID 1 did not exit within 10 s of SIGKILL; cleaning up anyway");
            }
            // The slot is reused only once it is empty: no process, no files, no record.
            let slot = sb.read(|r| r.uid_slot);
            let this2 = this.clone();
            let id = sb.id.clone();
            let res = tokio::task::spawn_blocking(move || {
                let res = this2.release_slot(slot, Some(&id));
                this2.forget_record(&id);
                res
            })
            .await;
            if let Ok(Err(e)) = res {
                warn!(sandbox = %sb.id, error = %e, "cleanup after destroy failed");
            }
            this.free_uid_slot(slot);
            this.pending_frees.fetch_sub(1, Ordering::SeqCst);
            // Again once no longer pending: a waiter that found the slot taken by another
            // then sees that nothing more is coming.
            this.uid_freed.notify_waiters();
            this.refill();
            this.collect_layers_if_due();
        });
    }

    /// Waits until every background cleanup has finished.
    pub async fn wait_cleanups(&self) {
        self.cleanups.close();
        self.cleanups.wait().await;
        self.cleanups.reopen();
    }

    /// After a start: adopt live sandboxes from the store, clean up everything else that
    /// carries this instance's prefix (dead sandboxes, half-made ones, orphan cgroups).
    pub fn reconcile(self: &Arc<Self>) -> Result<(), String> {
        self.reconciling.store(true, Ordering::SeqCst);
        let res = self.reconcile_records();
        self.reconciling.store(false, Ordering::SeqCst);
        res
    }

    fn reconcile_records(self: &Arc<Self>) -> Result<(), String> {
        let records = self.store.all().map_err(|e| e.to_string())?;
        let mut known = std::collections::HashSet::new();
        for rec in records {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "skipping unreadable sandbox record");
                    continue;
                }
            };
            if rec.state != SandboxState::Stopped && self.storage.kept().join(&rec.id).exists() {
                // A stop that moved the files out, or a start that had not moved them back,
                // when the daemon died: finish as stopped.
                info!(sandbox = %rec.id, "finishing an interrupted stop");
                let _ = self.release_slot(rec.uid_slot, Some(&rec.id));
                self.register_stopped(rec);
            } else if rec.pooled || rec.ephemeral {
                // Never handed out, or its request is gone with the old daemon.
                info!(sandbox = %rec.id, pooled = rec.pooled, "removing a sandbox nobody can use any more");
                self.cleanup_dead(&rec);
            } else if rec.state == SandboxState::Stopped {
                self.register(rec, None);
            } else if self.adopt(rec.clone()) {
                known.insert(self.slot_name(rec.uid_slot));
            } else if rec.persist && matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
                // Its processes ended while no daemon watched (a host reboot): keep the files.
                info!(sandbox = %rec.id, "persistent sandbox found without processes; keeping it stopped");
                let mut rec = rec;
                let kept = self.keep_data(&rec);
                let _ = self.release_slot(rec.uid_slot, Some(&rec.id));
                match kept {
                    Ok(()) => self.register_stopped(rec),
                    Err(e) => {
                        warn!(sandbox = %rec.id, error = %e, "keeping the files of a persistent sandbox failed");
                        rec.state = SandboxState::Exited;
                        let _ = self.store.put(&rec);
                    }
                }
            } else {
                info!(sandbox = %rec.id, "cleaning up dead sandbox");
                self.cleanup_dead(&rec);
            }
        }
        // The snapshot of a fork of a running sandbox that a dead daemon did not finish:
        // its record goes here, its files with the other unrecorded ones just below.
        if let Ok(snaps) = self.store.all_in::<crate::lifecycle::SnapRecord>(crate::store::Table::Snapshots) {
            for s in snaps.into_iter().filter(|s| s.transient) {
                info!(snapshot = %s.id, "removing the snapshot of an unfinished fork");
                let _ = self.store.delete_in(crate::store::Table::Snapshots, &s.id);
            }
        }
        self.cleanup_orphans(&known);
        if let Some(net) = &self.net {
            let ids: std::collections::HashSet<String> =
                self.sandboxes.read().unwrap_or_else(|e| e.into_inner()).values().map(|s| s.id.clone()).collect();
            net.forget_all_but(&ids);
        }
        Ok(())
    }

    /// Records and registers a sandbox whose files are in `kept/` as stopped (no slot).
    fn register_stopped(self: &Arc<Self>, mut rec: Record) {
        rec.state = SandboxState::Stopped;
        rec.pid = 0;
        rec.pid_start = 0;
        let _ = self.store.put(&rec);
        self.register(rec, None);
    }

    /// Re-adopts one stored sandbox if it is still alive (or kept as exited).
    fn adopt(self: &Arc<Self>, rec: Record) -> bool {
        match rec.state {
            SandboxState::Exited => {
                self.claim_uid_slot(rec.uid_slot);
                // Recorded as exited before its processes were ended (a stop, rollback or
                // restart): a daemon that died in between, say during a stop's grace
                // period, left them running. The operation is finished here.
                if rec.pid > 0 && process_start_time(rec.pid) == Some(rec.pid_start) {
                    info!(sandbox = %rec.id, pid = rec.pid, "ending the processes of a sandbox whose stop was cut short");
                    if let Err(e) = self.cgroups.kill(&self.slot_name(rec.uid_slot)) {
                        warn!(sandbox = %rec.id, error = %e, "ending the processes of an exited sandbox");
                    }
                }
                self.register(rec, None);
                true
            }
            SandboxState::Running | SandboxState::Paused if process_start_time(rec.pid) == Some(rec.pid_start) => {
                let Some(pid) = rustix::process::Pid::from_raw(rec.pid) else { return false };
                let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else {
                    return false;
                };
                // The pid could have been reused between the check and the open.
                if process_start_time(rec.pid) != Some(rec.pid_start) {
                    return false;
                }
                info!(sandbox = %rec.id, pid = rec.pid, "re-adopted running sandbox");
                self.claim_uid_slot(rec.uid_slot);
                // A daemon that died between a freeze and its thaw (a snapshot, a resume)
                // left the processes frozen under a record that says running, or running
                // under one that says paused: the freezer follows the record.
                let cg = self.slot_name(rec.uid_slot);
                let set =
                    if rec.state == SandboxState::Paused { self.cgroups.freeze(&cg) } else { self.cgroups.thaw(&cg) };
                if let Err(e) = set {
                    warn!(sandbox = %rec.id, error = %cgroup_text(&e), "setting the freezer to the recorded state");
                }
                if let Some(net) = &self.net {
                    let policy = crate::net::policy::Policy::parse(&rec.network)
                        .unwrap_or_else(|_| crate::net::policy::Policy::none());
                    if let Err(e) = net.attach(rec.uid_slot, &rec.id, crate::net::AuditOwner::from(&rec), &policy) {
                        warn!(sandbox = %rec.id, error = %e, "restoring the network policy");
                    }
                }
                self.register(rec, Some(fd));
                true
            }
            _ => false,
        }
    }

    fn cleanup_dead(&self, rec: &Record) {
        let _ = self.release_slot(rec.uid_slot, Some(&rec.id));
        self.note_removal(rec);
        self.forget_record(&rec.id);
    }

    /// Tells the network that sandbox `rec` is being removed, so that its egress audit is
    /// kept (`--audit-retention`) when [`Manager::forget_record`] ends it.
    fn note_removal(&self, rec: &Record) {
        if let Some(net) = &self.net {
            net.removing(abx_api::KeptAudit {
                id: rec.id.clone(),
                name: rec.name.clone(),
                tenant: rec.tenant.clone(),
                template: rec.template.clone(),
                created_at: rec.created_at,
                removed_at: crate::sandbox::now(),
                events: 0,
            });
        }
    }

    /// Deletes a destroyed sandbox's record and its egress audit.
    pub(crate) fn forget_record(&self, id: &str) {
        let _ = self.store.delete(id);
        if let Some(net) = &self.net {
            net.forget(id);
        }
    }

    /// Removes every slot directory and cgroup that no live sandbox holds (a crash can leave
    /// processes in them), and the sandbox directories of older versions.
    fn cleanup_orphans(&self, known: &std::collections::HashSet<String>) {
        let mut names: std::collections::BTreeSet<String> =
            self.cgroups.list().unwrap_or_default().into_iter().collect();
        if let Ok(rd) = std::fs::read_dir(&self.storage.slots) {
            names.extend(rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
        }
        for name in names {
            if known.contains(&name) || !name.starts_with(&format!("{}-", self.cfg.prefix)) {
                continue;
            }
            info!(object = %name, "removing orphan");
            if let Some(n) = name.strip_prefix(&format!("{}-u", self.cfg.prefix)).and_then(|n| n.parse::<u32>().ok()) {
                self.cache().remove(&n);
            }
            let _ = self.cgroups.kill(&name);
            let _ = self.cgroups.remove(&name);
            let _ = self.spawner.forget(&self.storage.slots.join(&name));
            let _ = remove_tree(&self.storage.slots.join(&name));
        }
        let _ = remove_tree(&self.cfg.root.join("sandboxes"));
        self.cleanup_unrecorded(crate::store::Table::Snapshots);
        self.cleanup_unrecorded(crate::store::Table::Volumes);
    }

    /// Removes what a daemon that died in the middle of an operation leaves in the
    /// snapshots or volumes directory: directories without a record (a snapshot taken but
    /// not yet recorded; a snapshot or volume whose record was deleted but not yet its
    /// files: deleting the record comes first), and the throwaway snapshot that wrote a
    /// sandbox's data out before a snapshot. Names that are not snapshot ids or volume
    /// names are left alone, and so is everything if the records cannot be read.
    fn cleanup_unrecorded(&self, table: crate::store::Table) {
        use crate::store::Table;
        let (dir, kind): (std::path::PathBuf, fn(&str) -> bool) = match table {
            Table::Snapshots => (self.storage.snapshots(), is_id),
            Table::Volumes => (self.storage.volumes(), crate::lifecycle::is_name),
            _ => return,
        };
        let ids = match self.store.ids_in(table) {
            Ok(ids) => ids,
            Err(e) => {
                warn!(error = %e, dir = %dir.display(), "cannot read the records; leaving the directory as it is");
                return;
            }
        };
        let Ok(rd) = std::fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
            let what = if matches!(table, Table::Snapshots) && crate::cow::is_flush_scratch(&name) {
                "a leftover flush snapshot"
            } else if kind(&name) && !ids.contains(&name) {
                "a directory without a record"
            } else {
                continue;
            };
            info!(object = %e.path().display(), "removing {what}");
            if let Err(err) = crate::cow::remove(&e.path()) {
                warn!(object = %e.path().display(), error = %err, "removing {what}");
            }
        }
    }

    /// After a sandbox or snapshot that may have been the last user of layers no template
    /// references went away: removes such layers, in the background (a build in progress
    /// holds the layers it made, `abx_template::Hold`). Costs one atomic read when no
    /// template removal left layers behind.
    pub(crate) fn collect_layers_if_due(self: &Arc<Self>) {
        if !self.layers_held.load(Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        self.cleanups.spawn_blocking(move || {
            let collected = this.collecting(|in_use| this.templates.gc(in_use));
            match collected {
                Ok(removed) if !removed.is_empty() => {
                    info!(layers = removed.len(), "removed layers that only destroyed sandboxes or snapshots used")
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "collecting unused layers"),
            }
        });
    }

    /// Runs `collect`, a store operation that removes unused layers (`template rm`,
    /// `template prune`, [`Manager::collect_layers_if_due`]), with the layers in use and
    /// under the removal gate (see `pins.rs`). Then records whether unreferenced layers
    /// are left for a later destroy to collect (`layers_held`), and deletes the removed
    /// layers' files once the gate is released, so that creates do not wait for that.
    pub(crate) fn collecting<T>(&self, collect: impl FnOnce(&std::collections::HashSet<String>) -> T) -> T {
        let gate = self.pins.removing();
        let done = collect(&self.layers_in_use());
        let held = self.templates.unreferenced().map_or(true, |left| !left.is_empty());
        self.layers_held.store(held, Ordering::SeqCst);
        drop(gate);
        self.templates.finish_removals();
        done
    }

    /// Digests of layers used by live sandboxes (kept by template garbage collection).
    pub fn layers_in_use(&self) -> std::collections::HashSet<String> {
        let mut used: std::collections::HashSet<String> = self.list().into_iter().flat_map(|r| r.layers).collect();
        used.extend(self.pools.layers());
        used.extend(self.pins.layers());
        if let Ok(snaps) = self.store.all_in::<crate::lifecycle::SnapRecord>(crate::store::Table::Snapshots) {
            used.extend(snaps.into_iter().flat_map(|s| s.layers));
        }
        used
    }

    /// Graceful shutdown: sandboxes keep running; with none left, the spawner retires and
    /// every slot (cgroups and directories) is removed.
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.refilling.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.drain_pools_blocking();
        if self.count() != 0 {
            return;
        }
        self.spawner.retire(Duration::from_secs(5));
        for cg in self.cgroups.list().unwrap_or_default() {
            let _ = self.cgroups.kill(&cg);
            let _ = self.cgroups.remove(&cg);
        }
        let _ = self.cgroups.remove_parent();
        let _ = remove_tree(&self.storage.slots);
        self.cache().clear();
        self.storage.close();
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

fn cgroup_text(e: &abx_cgroup::Error) -> String {
    let mut s = e.to_string();
    if let Some(src) = std::error::Error::source(e) {
        s.push_str(&format!(": {src}"));
    }
    s
}

/// What a create asked for (`what`: "user 'x'", "workdir '/x'") that the sandbox's agent
/// could not find or use: the caller's to fix (400), unless the agent did not answer.
fn unusable(id: &str, template: &str, what: &str, e: crate::agent::CallError) -> CoreError {
    use abx_proto::ErrorCode;
    match e {
        crate::agent::CallError::Remote(e) if e.code == ErrorCode::NotFound && what.starts_with("user") => {
            CoreError::Invalid(format!(
                "{what} does not exist in template '{template}' ({e}); give a user its /etc/passwd has, a uid, or none"
            ))
        }
        crate::agent::CallError::Remote(e) if e.code == ErrorCode::NotFound => {
            CoreError::Invalid(format!("{what} does not exist in template '{template}'"))
        }
        crate::agent::CallError::Remote(e) => CoreError::Invalid(format!("{what}: {e}")),
        e => CoreError::Setup { id: id.to_string(), message: format!("checking {what}: {e}") },
    }
}

fn merge_limits(req: &Limits, defaults: &Limits) -> Limits {
    Limits {
        memory_bytes: req.memory_bytes.or(defaults.memory_bytes),
        cpus: req.cpus.or(defaults.cpus),
        pids: req.pids.or(defaults.pids),
        open_files: req.open_files.or(defaults.open_files),
    }
}

fn cgroup_limits(l: &Limits) -> abx_cgroup::Limits {
    abx_cgroup::Limits { memory_bytes: l.memory_bytes, cpus: l.cpus, pids: l.pids }
}

use crate::net::ingress::Refusal;

/// Finds the address of a running sandbox for the ingress proxy.
#[derive(Debug)]
pub struct IngressRouter(pub std::sync::Weak<Manager>);

impl crate::net::ingress::Router for IngressRouter {
    fn lookup<'a>(
        &'a self,
        id: &'a str,
        port: u16,
        peer: std::net::SocketAddr,
        token: Option<&'a [u8]>,
    ) -> crate::net::ingress::Lookup<'a> {
        Box::pin(async move {
            let m = self.0.upgrade().ok_or(Refusal::NotFound)?;
            let net = m.net.clone().ok_or(Refusal::NotFound)?;
            let sb = m.get_by_host_label(id).ok_or(Refusal::NotFound)?;
            let (slot, hidden, want) = sb.read(|r| (r.uid_slot, r.pooled || r.build_step, r.ingress_token.clone()));
            // A sandbox waiting in a warm pool belongs to nobody yet; a build's is the build's.
            if hidden {
                return Err(Refusal::NotFound);
            }
            if let Some(want) = want
                && !token.is_some_and(|t| crate::auth::same_secret(t, want.as_bytes()))
            {
                net.record_ingress(&sb.id, port, peer, false);
                return Err(Refusal::Unauthorized);
            }
            match sb.state() {
                SandboxState::Running => {}
                // A request through the ingress resumes a paused sandbox, as `resume` does:
                // under its operation lock, so that it waits for a snapshot, stop or pause in
                // progress instead of thawing in the middle of one. A sandbox stopped or
                // removed meanwhile is not found.
                SandboxState::Paused => {
                    m.resume(&sb.id).await.map_err(|_| Refusal::NotFound)?;
                }
                _ => return Err(Refusal::NotFound),
            }
            net.record_ingress(&sb.id, port, peer, true);
            sb.touch();
            Ok(net.slot_addr(slot))
        })
    }
}

/// Of the objects named `key` (each with its tenant and id), the one the current caller
/// means. Sandbox and snapshot names are unique within a tenant, not across tenants: a
/// tenant's key sees only its own; the unix socket and untenanted keys see every one,
/// take an untenanted one first, and are told to use the id when only other tenants'
/// share the name. `Ok(None)`: no such name for this caller.
pub(crate) fn pick_named<T>(what: &str, key: &str, found: Vec<(Option<String>, String, T)>) -> CoreResult<Option<T>> {
    let mut found: Vec<_> = match crate::auth::caller() {
        Some(crate::auth::Caller::Tenant(t)) => {
            found.into_iter().filter(|(owner, _, _)| owner.as_ref() == Some(&t)).collect()
        }
        _ => {
            if found.iter().any(|(owner, _, _)| owner.is_none()) {
                found.into_iter().filter(|(owner, _, _)| owner.is_none()).collect()
            } else {
                found
            }
        }
    };
    if found.len() > 1 {
        let ids: Vec<String> =
            found.iter().map(|(owner, id, _)| format!("{id} ({})", owner.as_deref().unwrap_or("-"))).collect();
        return Err(CoreError::Conflict(format!(
            "several tenants have a {what} named '{key}': {}; give its id",
            ids.join(", ")
        )));
    }
    Ok(found.pop().map(|(_, _, t)| t))
}

/// Whether `s` has the form of an id made by [`new_id`].
pub fn is_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A new sandbox id: 12 lowercase hex digits (48 random bits).
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap_or_else(|_| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    });
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether process `pid` runs the guest agent (from its sealed memfd).
fn runs_agent(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.to_string_lossy().contains("agentbox-agent"))
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)];
    let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
}

/// Reads the status pipe until EOF (the exec closed it: success) or an error message.
fn wait_exec(status: &OwnedFd, timeout: Duration) -> Result<(), String> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let deadline = std::time::Instant::now() + timeout;
    let mut msg = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("sandbox setup did not finish within {timeout:?}"));
        }
        let ts = Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) };
        let mut fds = [PollFd::new(status, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("wait for setup: {e}")),
        }
        let mut buf = [0u8; 4096];
        match rustix::io::read(status, &mut buf) {
            Ok(0) if msg.is_empty() => return Ok(()),
            Ok(0) => return Err(String::from_utf8_lossy(&msg).into_owned()),
            Ok(n) => msg.extend_from_slice(&buf[..n]),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("read setup status: {e}")),
        }
    }
}

pub(crate) fn wait_exit_blocking(pidfd: &OwnedFd, timeout: Duration) {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let ts = Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: 0 };
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let _ = rustix::event::poll(&mut fds, Some(&ts));
}

/// Resolves when the process behind `pidfd` has exited.
async fn wait_exit(pidfd: &OwnedFd) {
    let Ok(dup) = rustix::io::fcntl_dupfd_cloexec(pidfd, 0) else { return };
    match abx_sys::asyncio::async_fd(dup, tokio::io::Interest::READABLE) {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => loop {
            // Fall back to polling if the fd cannot be registered.
            if rustix::event::poll(
                &mut [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)],
                Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 }),
            )
            .unwrap_or(0)
                > 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
    }
}

/// Removes a directory tree; a missing tree is not an error.
pub fn remove_tree(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_twelve_hex_digits_and_differ() {
        let a = super::new_id();
        assert_eq!(a.len(), 12);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, super::new_id());
        assert!(super::is_id(&a));
        for s in ["", "0123456789a", "0123456789abc", "0123456789aB", "0123456789ab.flush", "mysnapshot12"] {
            assert!(!super::is_id(s), "{s}");
        }
    }
}
