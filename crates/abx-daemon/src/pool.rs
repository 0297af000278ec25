//! Warm pools: per template, sandboxes booted ahead of demand (namespaces made, root
//! filesystem mounted, network wired with no egress, agent listening, the template's start
//! command running and its readiness check passed), so that a create is a claim.
//!
//! A pooled sandbox is invisible (not listed, not addressable) until a create claims it.
//! The claim applies the caller's settings: name, limits (written to the slot's cgroups),
//! environment, working directory, user, metadata, egress policy (the slot's nftables
//! sets), timeout. A claimed sandbox leaves the pool for good; it is never handed to a
//! second caller, and the pool boots a new one. Creates a pool cannot serve (from a
//! snapshot, with volumes, `persist`, or another open-files limit than the daemon's
//! default, which is fixed when PID 1 starts) are made cold.
//!
//! One background task keeps every pool at its target: between `min` and `max`, the demand
//! (claims per second over the last [`WINDOW`], or over the last [`BURST`] when that is
//! higher) times the time one refill takes plus [`REACTION`], doubled; never more than host memory allows (half of
//! MemAvailable at [`SANDBOX_BYTES`] each) nor more than the free uid slots less one (so a
//! cold create always finds a slot). A pool above its target for [`SHRINK_AFTER`] gives
//! back one sandbox per [`SHRINK_EVERY`], the longest idle; a claim takes the newest. A
//! pool above its `max` (lowered by `pool set`) gives back the excess at once. Refills stay out of the way of claims: a pool with more than
//! a quarter of its target ready refills only after [`QUIET`] without a claim; one at a
//! quarter or less refills at once, up to the target, one boot at a time while claims
//! keep coming and some are ready (two when quiet or empty). Claims that come faster than
//! one boot at a time replaces them ([`PRESSED`]) make the pool refill at once, however
//! many it holds, with as many boots at a time as the claim rate times the time of one
//! boot asks for (two to four, [`Pool::boots_at_once`]); pooled boots run in the idle
//! CPU class, except those of a pressed pool that has run low. When the template is rebuilt,
//! pooled sandboxes of the old layers are destroyed and replaced.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abx_api::{Limits, SandboxState};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::error::{CoreError, CoreResult};
use crate::manager::{Manager, new_id};
use crate::sandbox::{Record, Sandbox, now};
use crate::store::Table;

/// Window of recent claims the demand is computed from.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Short window of claims, for bursts.
pub const BURST: Duration = Duration::from_secs(1);
/// A healthy pool (more than a quarter of its target ready) refills only after this long
/// without a claim, so that boots do not compete for the CPU with the sandboxes just
/// claimed; a pool at a quarter of its target or less refills at once, all the way up.
pub const QUIET: Duration = Duration::from_millis(50);
/// Time the filler needs to notice a claim and start a refill.
pub const REACTION: Duration = Duration::from_millis(100);
/// How long a pool stays above its target before it gives sandboxes back.
pub const SHRINK_AFTER: Duration = Duration::from_secs(30);
/// How often a pool above its target then gives one sandbox back.
pub const SHRINK_EVERY: Duration = Duration::from_millis(500);
/// Memory assumed per pooled sandbox when bounding pools by host memory.
pub const SANDBOX_BYTES: u64 = 32 << 20;
/// Claims per second times the time one boot takes at which one boot at a time no
/// longer keeps up: the pool then refills at once, with [`Pool::boots_at_once`] boots.
const PRESSED: f64 = 0.8;
/// Boots in flight at once, over all pools, unless a pool is pressed.
const FILL_PARALLEL: usize = 2;
/// Boots in flight at once, over all pools, at most: a pressed pool boots as many as
/// its claim rate times the time of one boot asks for ([`Pool::boots_at_once`]).
const FILL_MOST: usize = 4;
/// The longest wait between boots of a pool whose boots keep failing.
pub const BACKOFF_MOST: Duration = Duration::from_secs(300);
/// How long a readiness check may take to pass.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A pool's settings, as stored (table `pools`, keyed by template).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolConfig {
    pub template: String,
    pub min: u32,
    pub max: u32,
}

/// Latency histogram with fixed buckets (seconds), in Prometheus' cumulative form.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

pub const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    /// Mean in milliseconds (0 when empty).
    pub fn mean_ms(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum * 1000.0 / self.count as f64 }
    }

    /// Prometheus text lines of this histogram.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// A pool's claim rates at one moment (claims per second).
#[derive(Debug, Clone, Copy)]
struct Rates {
    /// [`Pool::rate`]: the last [`WINDOW`], or the last [`BURST`] when higher.
    window: f64,
    /// The higher of `window` and the rate over the last [`REACTION`].
    fast: f64,
}

#[derive(Debug)]
struct Pool {
    cfg: PoolConfig,
    ready: VecDeque<Arc<Sandbox>>,
    /// Boots in flight.
    filling: usize,
    target: usize,
    hits: u64,
    misses: u64,
    boots: u64,
    failures: u64,
    last_error: Option<String>,
    /// Claims (hits and misses) of the last [`WINDOW`].
    recent: VecDeque<Instant>,
    /// Moving average of one boot's duration.
    refill: Option<Duration>,
    claim: Histogram,
    /// No boots before this (after a failure).
    backoff_until: Option<Instant>,
    /// Boots that failed since the last one that worked (the backoff doubles with each).
    failed_in_a_row: u32,
    /// The layers of the template whose boot failed: a rebuilt template is tried at once.
    failed_layers: Vec<String>,
    /// Since when the pool holds more than its target.
    above_since: Option<Instant>,
    /// When it last gave a sandbox back.
    shrunk_at: Option<Instant>,
    /// Refilling up to the target (set when the pool fell to half of it or was quiet).
    refilling: bool,
}

impl Pool {
    fn new(cfg: PoolConfig) -> Pool {
        Pool {
            target: cfg.min as usize,
            cfg,
            ready: VecDeque::new(),
            filling: 0,
            hits: 0,
            misses: 0,
            boots: 0,
            failures: 0,
            last_error: None,
            recent: VecDeque::new(),
            refill: None,
            claim: Histogram::default(),
            backoff_until: None,
            failed_in_a_row: 0,
            failed_layers: Vec::new(),
            above_since: None,
            shrunk_at: None,
            refilling: false,
        }
    }

    /// New sizes (`pool set`): the target moves within them at once, so the answer shows
    /// the target the filler works towards (the next round also bounds it by host room).
    fn reconfigure(&mut self, cfg: PoolConfig) {
        self.target = self.target.clamp(cfg.min as usize, cfg.max as usize);
        self.cfg = cfg;
        // Setting the pool again is the operator's way to say "try now".
        self.backoff_until = None;
    }

    /// A boot failed: no boot for 2 s, doubling with each failure in a row up to
    /// [`BACKOFF_MOST`], so that a template that cannot boot costs little. Returns whether
    /// this failure is worth a warning (the first of a run, or a new error).
    fn boot_failed(&mut self, layers: Vec<String>, msg: String, now: Instant) -> bool {
        self.failures += 1;
        self.failed_in_a_row = self.failed_in_a_row.saturating_add(1);
        let wait = Duration::from_secs(2).saturating_mul(1 << (self.failed_in_a_row - 1).min(16)).min(BACKOFF_MOST);
        self.backoff_until = Some(now + wait);
        let new = self.failed_in_a_row == 1 || self.last_error.as_deref() != Some(msg.as_str());
        self.failed_layers = layers;
        self.last_error = Some(msg);
        new
    }

    /// A boot worked: the backoff is over.
    fn boot_worked(&mut self) {
        self.boots += 1;
        self.backoff_until = None;
        self.failed_in_a_row = 0;
    }

    /// Claims per second: the higher of the last [`WINDOW`] and the last [`BURST`], so a
    /// burst raises the target at once and a lull lowers it slowly.
    fn rate(&mut self, now: Instant) -> f64 {
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > WINDOW) {
            self.recent.pop_front();
        }
        let burst = self.recent.iter().rev().take_while(|t| now.duration_since(**t) <= BURST).count();
        (self.recent.len() as f64 / WINDOW.as_secs_f64()).max(burst as f64 / BURST.as_secs_f64())
    }

    /// Claims per second over the last `span` alone (call after [`Pool::rate`], which
    /// drops claims older than [`WINDOW`]).
    fn rate_within(&self, now: Instant, span: Duration) -> f64 {
        let n = self.recent.iter().rev().take_while(|t| now.duration_since(**t) <= span).count();
        n as f64 / span.as_secs_f64()
    }

    /// How long one boot takes: the measured refill time, 50 ms until one was measured.
    fn boot_time(&self) -> Duration {
        self.refill.unwrap_or(Duration::from_millis(50))
    }

    /// The claim rates one round of decisions works from (the queue of recent claims is
    /// walked once per pool and round).
    fn rates(&mut self, now: Instant) -> Rates {
        let window = self.rate(now);
        Rates { window, fast: window.max(self.rate_within(now, REACTION)) }
    }

    /// Whether claims come faster than one boot at a time replaces them: the higher of
    /// [`Pool::rate`] and the rate over the last [`REACTION`] (so a sudden stream counts
    /// at once), times the time one boot takes, reaches [`PRESSED`].
    fn pressed(&self, r: &Rates) -> bool {
        r.fast * self.boot_time().as_secs_f64() >= PRESSED
    }

    /// Boots a pressed pool runs at once: enough that they replace claims at the rate they
    /// come with the margin of [`PRESSED`] (claims per second × the time of one boot
    /// / [`PRESSED`]), at least [`FILL_PARALLEL`], at most [`FILL_MOST`]. One boot takes
    /// longer when the host is busy, so a slower host gets more boots at once.
    fn boots_at_once(&self, r: &Rates) -> usize {
        let n = (r.fast * self.boot_time().as_secs_f64() / PRESSED).ceil();
        if n.is_finite() { (n as usize).clamp(FILL_PARALLEL, FILL_MOST) } else { FILL_PARALLEL }
    }

    /// What demand asks for, within min and max (before host bounds).
    fn demand(&self, r: &Rates) -> usize {
        let refill = self.boot_time() + REACTION;
        let want = (r.window * refill.as_secs_f64() * 2.0).ceil() as usize;
        want.clamp(self.cfg.min as usize, self.cfg.max as usize)
    }

    fn snapshot(&mut self, now: Instant) -> abx_api::Pool {
        let claims = self.hits + self.misses;
        abx_api::Pool {
            template: self.cfg.template.clone(),
            min: self.cfg.min,
            max: self.cfg.max,
            target: self.target as u32,
            ready: self.ready.len() as u32,
            filling: self.filling as u32,
            hits: self.hits,
            misses: self.misses,
            hit_rate: if claims == 0 { 0.0 } else { self.hits as f64 / claims as f64 },
            claims_per_sec: self.rate(now),
            refill_ms: self.refill.map(|d| d.as_secs_f64() * 1000.0),
            claim_ms_mean: self.claim.mean_ms(),
            boots: self.boots,
            boot_failures: self.failures,
            last_error: self.last_error.clone(),
        }
    }
}

/// Every pool of a daemon, its counters, and cold-create latencies per template.
#[derive(Debug, Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, Pool>>,
    cold: Mutex<HashMap<String, Histogram>>,
    wake: tokio::sync::Notify,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a cold create (a miss of a pool, or a template without one).
    pub fn observe_cold(&self, template: &str, d: Duration) {
        self.cold.lock().unwrap_or_else(|e| e.into_inner()).entry(template.to_string()).or_default().observe(d);
    }

    /// Whether `template` has a pool.
    pub fn has(&self, template: &str) -> bool {
        self.lock().contains_key(template)
    }

    /// Counts a create of `template` that its pool cannot serve (a snapshot, volumes,
    /// `persist`, another open-files limit) as a miss, if the template has a pool. It is
    /// not demand the pool could meet, so it does not raise the pool's target.
    pub fn miss_unservable(&self, template: &str) {
        if let Some(p) = self.lock().get_mut(template) {
            p.misses += 1;
        }
    }

    /// Takes a ready sandbox of `template` on `layers`, if there is one; counts the
    /// demand. Dead or stale sandboxes met on the way are returned for destruction.
    fn take(&self, template: &str, layers: &[String]) -> (Option<Arc<Sandbox>>, Vec<Arc<Sandbox>>) {
        let mut pools = self.lock();
        let Some(p) = pools.get_mut(template) else { return (None, Vec::new()) };
        p.recent.push_back(Instant::now());
        let mut doomed = Vec::new();
        let mut found = None;
        // Newest first: on this VM a process that has slept a while is slower to run
        // again, and a sandbox whose boot just ran has slept least (docs/design.md).
        while let Some(sb) = p.ready.pop_back() {
            let ok = !*sb.exited.borrow() && sb.read(|r| r.state == SandboxState::Running && r.layers == layers);
            if ok {
                found = Some(sb);
                break;
            }
            doomed.push(sb);
        }
        drop(pools);
        self.wake.notify_one();
        (found, doomed)
    }

    /// Puts a ready sandbox a claim took but did not use back on top of its pool; returns
    /// it when the pool is gone.
    fn give_back(&self, template: &str, sb: Arc<Sandbox>) -> Option<Arc<Sandbox>> {
        match self.lock().get_mut(template) {
            Some(p) => {
                p.ready.push_back(sb);
                None
            }
            None => Some(sb),
        }
    }

    fn count(&self, template: &str, hit: bool, d: Duration) {
        if let Some(p) = self.lock().get_mut(template) {
            if hit {
                p.hits += 1;
                p.claim.observe(d);
            } else {
                p.misses += 1;
            }
        }
    }

    /// Layers under pooled sandboxes (kept by template garbage collection).
    pub fn layers(&self) -> Vec<String> {
        self.lock().values().flat_map(|p| p.ready.iter().flat_map(|s| s.read(|r| r.layers.clone()))).collect()
    }

    /// Every pool's state, sorted by template.
    pub fn list(&self) -> Vec<abx_api::Pool> {
        let now = Instant::now();
        let mut v: Vec<_> = self.lock().values_mut().map(|p| p.snapshot(now)).collect();
        v.sort_by(|a, b| a.template.cmp(&b.template));
        v
    }

    /// Prometheus text for `/metrics`.
    pub fn metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let pools = self.list();
        let gauges: [Series<f64>; 6] = [
            ("agentbox_pool_ready", "Sandboxes ready in the pool.", |p| p.ready as f64),
            ("agentbox_pool_filling", "Pool sandboxes booting.", |p| p.filling as f64),
            ("agentbox_pool_target", "Size the pool is kept at (from demand, within min and max).", |p| {
                p.target as f64
            }),
            ("agentbox_pool_hit_ratio", "Claims served from the pool / all creates of the template.", |p| p.hit_rate),
            ("agentbox_pool_cold_start_ratio", "Creates of a pooled template made cold / all its creates.", |p| {
                if p.hits + p.misses == 0 { 0.0 } else { p.misses as f64 / (p.hits + p.misses) as f64 }
            }),
            ("agentbox_pool_claims_per_second", "Creates of the template per second, last 10 s.", |p| p.claims_per_sec),
        ];
        for (name, help, f) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for p in &pools {
                let _ = writeln!(out, "{name}{{template=\"{}\"}} {}", p.template, f(p));
            }
        }
        let counters: [Series<u64>; 4] = [
            ("agentbox_pool_hits_total", "Creates served from the pool.", |p| p.hits),
            (
                "agentbox_pool_misses_total",
                "Creates of a pooled template made cold (pool empty, or a create it cannot serve).",
                |p| p.misses,
            ),
            ("agentbox_pool_boots_total", "Sandboxes booted into the pool.", |p| p.boots),
            ("agentbox_pool_boot_failures_total", "Pool boots that failed.", |p| p.boot_failures),
        ];
        for (name, help, f) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for p in &pools {
                let _ = writeln!(out, "{name}{{template=\"{}\"}} {}", p.template, f(p));
            }
        }
        let name = "agentbox_pool_claim_seconds";
        let _ =
            writeln!(out, "# HELP {name} Time to claim a pooled sandbox (inside the daemon).\n# TYPE {name} histogram");
        for (t, p) in self.lock().iter() {
            p.claim.write(out, name, &format!("template=\"{t}\""));
        }
        let name = "agentbox_create_cold_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to create a sandbox without a pool (inside the daemon).\n# TYPE {name} histogram"
        );
        for (t, h) in self.cold.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.write(out, name, &format!("template=\"{t}\""));
        }
    }
}

/// A metric: name, help text, and its value for a pool.
type Series<T> = (&'static str, &'static str, fn(&abx_api::Pool) -> T);

/// What a claim applies to a pooled sandbox.
pub struct Claim {
    pub name: Option<String>,
    pub tenant: Option<String>,
    pub limits: Limits,
    pub env: std::collections::BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub network: abx_api::NetworkPolicy,
    pub policy: crate::net::policy::Policy,
    pub timeout: Option<Duration>,
    pub on_timeout: abx_api::TimeoutAction,
    /// See `Record::ingress_token`.
    pub ingress_token: Option<String>,
    /// Lives for one request (see `Record::ephemeral`).
    pub ephemeral: bool,
    /// See `Record::idempotency`.
    pub idempotency: Option<crate::sandbox::Idempotency>,
}

/// Work the filler decided on.
enum Action {
    /// Boot one sandbox of the template; in the idle CPU class unless `false`.
    Boot(Box<abx_template::Template>, bool),
    Destroy(Arc<Sandbox>),
}

impl Manager {
    /// Sets (creating) the pool of `template`.
    pub async fn set_pool(self: &Arc<Self>, template: &str, min: u32, max: u32) -> CoreResult<abx_api::Pool> {
        if max == 0 || min > max {
            // A pool of nothing is no pool: say how to remove one.
            let hint = if max == 0 {
                format!(" (to remove the pool: `agentbox pool rm {template}`, DELETE /v1/pools/{template})")
            } else {
                String::new()
            };
            return Err(CoreError::Invalid(format!(
                "pool sizes need 0 <= min <= max and max >= 1; got min {min}, max {max}{hint}"
            )));
        }
        if max > self.cfg.uid_slots {
            return Err(CoreError::Invalid(format!(
                "max {max} is more than the daemon's {} sandbox slots (--uid-slots)",
                self.cfg.uid_slots
            )));
        }
        self.template(template)?;
        let cfg = PoolConfig { template: template.to_string(), min, max };
        self.store().put_in(Table::Pools, template, &cfg).map_err(|e| CoreError::internal("record pool", e))?;
        {
            let mut pools = self.pools.lock();
            match pools.get_mut(template) {
                Some(p) => p.reconfigure(cfg),
                None => {
                    pools.insert(template.to_string(), Pool::new(cfg));
                }
            }
        }
        info!(template, min, max, "pool set");
        self.pools.wake.notify_one();
        self.pool(template)
    }

    pub fn pool(&self, template: &str) -> CoreResult<abx_api::Pool> {
        let now = Instant::now();
        self.pools
            .lock()
            .get_mut(template)
            .map(|p| p.snapshot(now))
            .ok_or_else(|| CoreError::NotFound { kind: "pool", id: template.to_string() })
    }

    /// Removes a pool; its ready sandboxes are destroyed.
    pub async fn delete_pool(self: &Arc<Self>, template: &str) -> CoreResult<()> {
        let p = self
            .pools
            .lock()
            .remove(template)
            .ok_or_else(|| CoreError::NotFound { kind: "pool", id: template.to_string() })?;
        self.store().delete_in(Table::Pools, template).map_err(|e| CoreError::internal("forget pool", e))?;
        for sb in p.ready {
            self.destroy_pooled(sb);
        }
        Ok(())
    }

    /// Loads the stored pools and starts the task that fills them (needs the runtime).
    pub fn start_pools(self: &Arc<Self>) {
        match self.store().all_in::<PoolConfig>(Table::Pools) {
            Ok(cfgs) => {
                let mut pools = self.pools.lock();
                for c in cfgs {
                    pools.insert(c.template.clone(), Pool::new(c));
                }
            }
            Err(e) => warn!(error = %e, "reading the pools"),
        }
        let this = self.clone();
        tokio::spawn(async move { this.fill_loop().await });
    }

    async fn fill_loop(self: Arc<Self>) {
        let inflight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            let woken = self.pools.wake.notified();
            let this = self.clone();
            let booting = inflight.load(Ordering::SeqCst);
            let (actions, short) = tokio::task::spawn_blocking(move || {
                let mut short = false;
                let a = this.plan(booting, &mut short);
                (a, short)
            })
            .await
            .unwrap_or_default();
            for a in actions {
                match a {
                    Action::Destroy(sb) => self.destroy_pooled(sb),
                    Action::Boot(t, idle) => {
                        inflight.fetch_add(1, Ordering::SeqCst);
                        let this = self.clone();
                        let inflight = inflight.clone();
                        tokio::spawn(async move {
                            let t0 = Instant::now();
                            let res = this.boot_pooled(&t, idle).await;
                            inflight.fetch_sub(1, Ordering::SeqCst);
                            this.booted(&t, res, t0.elapsed());
                            this.pools.wake.notify_one();
                        });
                    }
                }
            }
            // A pool waiting for a quiet moment is looked at again soon.
            let wait = if short { QUIET } else { Duration::from_millis(500) };
            let _ = tokio::time::timeout(wait, woken).await;
        }
    }

    /// One round of decisions: stale or dead sandboxes out, boots up to each target.
    /// `booting`: boots in flight over all pools (at most [`FILL_PARALLEL`], or
    /// [`FILL_MOST`] for a pressed pool).
    fn plan(&self, mut booting: usize, short: &mut bool) -> Vec<Action> {
        let now = Instant::now();
        let mut actions = Vec::new();
        let mem_cap = mem_available().map_or(usize::MAX, |m| (m / 2 / SANDBOX_BYTES) as usize);
        let free_slots = self.free_slots();
        let names: Vec<String> = self.pools.lock().keys().cloned().collect();
        let mut pooled_total: usize = self.pools.lock().values().map(|p| p.ready.len() + p.filling).sum();
        for name in names {
            let template = self.templates.get(&name);
            let mut pools = self.pools.lock();
            let Some(p) = pools.get_mut(&name) else { continue };
            let template = match template {
                Ok(t) => t,
                Err(e) => {
                    p.last_error = Some(format!("template '{name}': {e}"));
                    actions.extend(p.ready.drain(..).map(Action::Destroy));
                    continue;
                }
            };
            let (keep, doomed): (VecDeque<_>, VecDeque<_>) = p.ready.drain(..).partition(|sb: &Arc<Sandbox>| {
                !*sb.exited.borrow() && sb.read(|r| r.state == SandboxState::Running && r.layers == template.layers)
            });
            p.ready = keep;
            pooled_total -= doomed.len();
            actions.extend(doomed.into_iter().map(Action::Destroy));
            let rates = p.rates(now);
            let demand = p.demand(&rates);
            // Host bounds: memory, and one uid slot always left for a cold create.
            let room = (pooled_total + free_slots).saturating_sub(1).min(mem_cap);
            let held = p.ready.len() + p.filling;
            let others = pooled_total - held;
            p.target = demand.min(room.saturating_sub(others));
            if held > p.target {
                let since = *p.above_since.get_or_insert(now);
                // Above `max` (lowered by `pool set`): the excess goes at once. Above a
                // target that fell with demand or host room: after SHRINK_AFTER, one
                // sandbox per SHRINK_EVERY, the longest idle first.
                let over_max = held.saturating_sub(p.cfg.max as usize);
                let due = now.duration_since(since) >= SHRINK_AFTER
                    && p.shrunk_at.is_none_or(|t| now.duration_since(t) >= SHRINK_EVERY);
                let give_back = if over_max > 0 { over_max } else { usize::from(due) };
                for _ in 0..give_back {
                    let Some(sb) = p.ready.pop_front() else { break };
                    p.shrunk_at = Some(now);
                    pooled_total -= 1;
                    actions.push(Action::Destroy(sb));
                }
                continue;
            }
            p.above_since = None;
            if held >= p.target {
                p.refilling = false;
                continue;
            }
            if p.backoff_until.is_some_and(|t| now < t) {
                if p.failed_layers == template.layers {
                    continue;
                }
                // The template changed since its boot failed: try the new one at once.
                p.backoff_until = None;
            }
            let quiet = p.recent.back().is_none_or(|t| now.duration_since(*t) >= QUIET);
            // Claims come faster than one boot at a time replaces them: waiting for a pause
            // or booting one at a time would let the pool run dry.
            let pressed = p.pressed(&rates);
            if !p.refilling && !quiet && !pressed && p.ready.len() * 4 > p.target {
                // Healthy and busy: wait for a pause in the claims.
                *short = true;
                continue;
            }
            p.refilling = true;
            // While claims keep coming and some are ready, one boot at a time (the other
            // core stays with the sandboxes being claimed and used), unless that is too few.
            let cap = if pressed {
                p.boots_at_once(&rates)
            } else if !quiet && !p.ready.is_empty() {
                1
            } else {
                FILL_PARALLEL
            };
            if !quiet {
                *short = true;
            }
            // A pressed pool that has run low boots at normal priority: in the idle class
            // its boots would get only the CPU that the creates it cannot serve (cold, at
            // normal priority) leave, and it would not catch up again.
            let idle = !(pressed && p.ready.len() * 4 <= p.target);
            let mut held = held;
            let limit = if pressed { FILL_MOST } else { FILL_PARALLEL };
            while held < p.target && booting < limit && p.filling < cap {
                p.filling += 1;
                held += 1;
                pooled_total += 1;
                booting += 1;
                actions.push(Action::Boot(Box::new(template.clone()), idle));
            }
        }
        actions
    }

    fn booted(self: &Arc<Self>, t: &abx_template::Template, res: CoreResult<Arc<Sandbox>>, took: Duration) {
        let template = t.name.as_str();
        let mut pools = self.pools.lock();
        let Some(p) = pools.get_mut(template) else {
            drop(pools);
            if let Ok(sb) = res {
                self.destroy_pooled(sb);
            }
            return;
        };
        p.filling = p.filling.saturating_sub(1);
        match res {
            Ok(sb) => {
                p.boot_worked();
                p.refill = Some(match p.refill {
                    Some(avg) => avg.mul_f64(0.8) + took.mul_f64(0.2),
                    None => took,
                });
                p.ready.push_back(sb);
            }
            Err(e) => {
                let msg = e.full_message();
                let in_a_row = p.failed_in_a_row + 1;
                if p.boot_failed(t.layers.clone(), msg.clone(), Instant::now()) {
                    warn!(template, error = %msg, "booting a pooled sandbox failed; retrying later, less often while it keeps failing");
                } else {
                    debug!(template, error = %msg, in_a_row, "booting a pooled sandbox failed again");
                }
            }
        }
    }

    /// Boots one sandbox of `template` for its pool.
    async fn boot_pooled(self: &Arc<Self>, template: &abx_template::Template, idle: bool) -> CoreResult<Arc<Sandbox>> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(CoreError::Conflict("the daemon is shutting down".into()));
        }
        let slot = self.acquire_slot().await?;
        // Read again and pinned under the gate, as a create's (see `pins.rs`): the filler
        // read the template earlier, and a rebuild and garbage collection since could
        // delete the layers this boot is about to mount (it then failed, and the pool
        // backed off).
        let gate = self.pins.resolving();
        let current = match self.template(&template.name) {
            Ok(t) => t,
            Err(e) => {
                drop(gate);
                self.abandon_slot(slot).await;
                return Err(e);
            }
        };
        let template = &current;
        let _pinned = self.pins.pin(template.layers.iter().map(|l| crate::pins::Pin::Layer(l.clone())));
        drop(gate);
        let rec = Record { pooled: true, ..self.new_record(new_id(), template, slot, now()) };
        let this = self.clone();
        let started =
            tokio::task::spawn_blocking(move || this.start_blocking_as(rec, &crate::net::policy::Policy::none(), idle))
                .await
                .map_err(|e| CoreError::internal("pool boot task", e.to_string()))?;
        self.refill();
        let (rec, pidfd) = match started {
            Ok(v) => v,
            Err(e) => {
                self.abandon_slot(slot).await;
                return Err(e);
            }
        };
        let sb = self.live(rec, Some(pidfd));
        if let Err(e) = self.run_start(&sb, &template.config).await {
            self.destroy_pooled(sb);
            return Err(e);
        }
        Ok(sb)
    }

    /// Kills a sandbox that was never published (pooled) and cleans up after it.
    pub(crate) fn destroy_pooled(self: &Arc<Self>, sb: Arc<Sandbox>) {
        sb.update(|r| r.state = SandboxState::Destroying);
        if let Some(fd) = &sb.pidfd {
            let _ = rustix::process::pidfd_send_signal(fd.as_ref(), rustix::process::Signal::KILL);
        }
        self.finish_destroy(sb);
    }

    /// A create served from the pool of `template`, if it has a ready sandbox; `None`
    /// means make it cold. Counts the hit or miss.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        template: &abx_template::Template,
        c: Claim,
    ) -> CoreResult<Option<Arc<Sandbox>>> {
        let t0 = Instant::now();
        let (found, doomed) = self.pools.take(&template.name, &template.layers);
        for sb in doomed {
            self.destroy_pooled(sb);
        }
        let Some(sb) = found else {
            self.pools.count(&template.name, false, t0.elapsed());
            return Ok(None);
        };
        // A user or directory the sandbox lacks fails the create as a cold one would; the
        // sandbox, untouched, goes back to the pool.
        match self.check_user_workdir(&sb, &template.name, c.user.as_deref(), c.workdir.as_deref()).await {
            Ok(()) => {}
            Err(e @ CoreError::Invalid(_)) => {
                if let Some(sb) = self.pools.give_back(&template.name, sb) {
                    self.destroy_pooled(sb);
                }
                return Err(e);
            }
            Err(e) => {
                warn!(sandbox = %sb.id, error = %e.full_message(), "claiming a pooled sandbox failed; creating one");
                self.destroy_pooled(sb);
                self.pools.count(&template.name, false, t0.elapsed());
                return Ok(None);
            }
        }
        let this = self.clone();
        let sb2 = sb.clone();
        let res = tokio::task::spawn_blocking(move || this.apply_claim(&sb2, &c))
            .await
            .map_err(|e| CoreError::internal("claim task", e.to_string()))?;
        match res {
            Ok(()) => {
                self.publish(sb.clone());
                self.pools.count(&template.name, true, t0.elapsed());
                Ok(Some(sb))
            }
            Err(e) => {
                warn!(sandbox = %sb.id, error = %e, "claiming a pooled sandbox failed; creating one");
                self.destroy_pooled(sb);
                self.pools.count(&template.name, false, t0.elapsed());
                Ok(None)
            }
        }
    }

    fn apply_claim(&self, sb: &Sandbox, c: &Claim) -> Result<(), String> {
        let slot = sb.read(|r| r.uid_slot);
        self.set_slot_limits(slot, &c.limits)?;
        self.set_slot_idle(slot, false)?;
        if let Some(net) = &self.net {
            net.attach(
                slot,
                &sb.id,
                crate::net::AuditOwner { name: c.name.clone(), tenant: c.tenant.clone() },
                &c.policy,
            )
            .map_err(|e| format!("network policy: {e}"))?;
        }
        let created_at = now();
        let rec = sb.update(|r| {
            r.name = c.name.clone();
            r.tenant = c.tenant.clone();
            r.limits = c.limits.clone();
            r.env.extend(c.env.clone());
            r.workdir = c.workdir.clone().or(r.workdir.take());
            r.user = c.user.clone().or(r.user.take());
            r.metadata = c.metadata.clone();
            r.network = c.network.clone();
            r.created_at = created_at;
            r.expires_at = c.timeout.map(|t| created_at + t.as_secs().max(1));
            r.timeout_secs = c.timeout.map(|t| t.as_secs().max(1));
            r.on_timeout = c.on_timeout;
            r.ingress_token = c.ingress_token.clone();
            r.pooled = false;
            r.ephemeral = c.ephemeral;
            r.idempotency = c.idempotency.clone();
            r.clone()
        });
        self.store().put(&rec).map_err(|e| format!("record sandbox: {e}"))
    }

    /// Runs the template's start command in the background and waits for its readiness
    /// check to pass, both as `cfg`'s user, with its environment, in its directory (the
    /// template's: a pooled sandbox runs them before it is claimed, and a cold create must
    /// not differ).
    pub(crate) async fn run_start(&self, sb: &Sandbox, cfg: &abx_template::TemplateConfig) -> CoreResult<()> {
        let id = sb.id.clone();
        let socket = sb.dirs.agent_socket();
        let spec = |argv: Vec<String>, background: bool| abx_proto::ExecSpec {
            argv,
            env: cfg.env.clone(),
            cwd: cfg.workdir.clone(),
            user: cfg.user.clone(),
            tty: None,
            stdin: false,
            timeout_ms: if background { None } else { Some(10_000) },
            background,
            tag: Some(if background { "start" } else { "ready" }.into()),
        };
        if !cfg.start.is_empty() {
            crate::agent::run(&socket, spec(cfg.start.clone(), true), |_, _| {}).await.map_err(|e| {
                CoreError::Setup { id: id.clone(), message: format!("start command {:?}: {e}", cfg.start) }
            })?;
        }
        let Some(check) = &cfg.ready else { return Ok(()) };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            let argv = vec!["/bin/sh".to_string(), "-c".to_string(), check.clone()];
            let mut out = Vec::new();
            match crate::agent::run(&socket, spec(argv, false), |_, d| {
                if out.len() < 4096 {
                    out.extend_from_slice(d)
                }
            })
            .await
            {
                Ok(st) if st.code == Some(0) => return Ok(()),
                Ok(st) => {
                    let how = match (st.code, st.signal) {
                        (Some(c), _) => format!("exit status {c}"),
                        (None, Some(s)) => format!("killed by signal {s}"),
                        (None, None) => "ended".to_string(),
                    };
                    let said = String::from_utf8_lossy(&out);
                    last = if said.trim().is_empty() { how } else { format!("{how}: {}", said.trim()) };
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(CoreError::Setup {
                    id: id.clone(),
                    message: format!(
                        "readiness check `{check}` did not pass within {}s (last: {last})",
                        READY_TIMEOUT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Destroys every pooled sandbox, synchronously (daemon shutdown, after `closing` is
    /// set): boots in flight are waited for (up to 10 s) so none is left running.
    pub(crate) fn drain_pools_blocking(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pools.lock().values().any(|p| p.filling > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let all: Vec<Arc<Sandbox>> = self.pools.lock().values_mut().flat_map(|p| p.ready.drain(..)).collect();
        for sb in all {
            sb.update(|r| r.state = SandboxState::Destroying);
            if let Some(fd) = &sb.pidfd {
                let _ = rustix::process::pidfd_send_signal(fd.as_ref(), rustix::process::Signal::KILL);
                crate::manager::wait_exit_blocking(fd, Duration::from_secs(5));
            }
            let rec = sb.record();
            let _ = self.release_slot(rec.uid_slot, Some(&rec.id));
            let _ = self.store().delete(&rec.id);
            self.free_uid_slot(rec.uid_slot);
        }
    }
}

/// The host's available memory, read at most every [`MEM_FRESH`]: the filler decides
/// after every claim and every boot, and /proc/meminfo is costly to generate.
fn mem_available() -> Option<u64> {
    static LAST: std::sync::Mutex<Option<(Instant, Option<u64>)>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, v)) = *last
        && at.elapsed() < MEM_FRESH
    {
        return v;
    }
    let v = read_mem_available();
    *last = Some((Instant::now(), v));
    v
}

/// How old a reading of the host's available memory may be.
const MEM_FRESH: Duration = Duration::from_millis(250);

/// MemAvailable of /proc/meminfo, in bytes.
fn read_mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Pool {
        fn pressed_at(&mut self, now: Instant) -> bool {
            let r = self.rates(now);
            self.pressed(&r)
        }
        fn boots_at_once_at(&mut self, now: Instant) -> usize {
            let r = self.rates(now);
            self.boots_at_once(&r)
        }
        fn demand_at(&mut self, now: Instant) -> usize {
            let r = self.rates(now);
            self.demand(&r)
        }
    }

    /// The answer to `pool set` shows the target within the new sizes (it showed the old
    /// one, even above the new max, until the filler's next round).
    #[test]
    fn new_sizes_bound_the_target_at_once() {
        let cfg = |min, max| PoolConfig { template: "t".into(), min, max };
        let mut p = Pool::new(cfg(3, 3));
        assert_eq!(p.target, 3);
        p.reconfigure(cfg(0, 1));
        assert_eq!(p.snapshot(Instant::now()).target, 1);
        p.reconfigure(cfg(2, 4));
        assert_eq!(p.snapshot(Instant::now()).target, 2);
        p.target = 3;
        p.reconfigure(cfg(1, 5));
        assert_eq!((p.target, p.cfg.min, p.cfg.max), (3, 1, 5), "within the sizes: kept");
    }

    /// A template that cannot boot is tried less and less often (it was tried every 2 s
    /// forever), warned about once per run of the same error, and at once again after a
    /// boot worked or the pool was set again.
    #[test]
    fn failing_boots_back_off_and_warn_once() {
        let cfg = PoolConfig { template: "t".into(), min: 1, max: 1 };
        let mut p = Pool::new(cfg.clone());
        let t0 = Instant::now();
        let layers = vec!["l1".to_string()];
        let mut waits = Vec::new();
        let mut warned = Vec::new();
        for _ in 0..10 {
            warned.push(p.boot_failed(layers.clone(), "no /bin/sh".into(), t0));
            waits.push(p.backoff_until.unwrap().duration_since(t0).as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(warned.iter().filter(|w| **w).count(), 1, "{warned:?}");
        assert!(p.boot_failed(layers.clone(), "another error".into(), t0), "a new error is warned about");
        assert_eq!((p.failures, p.failed_layers.clone()), (11, layers.clone()));
        p.boot_worked();
        p.boot_failed(layers.clone(), "another error".into(), t0);
        assert_eq!(p.backoff_until, Some(t0 + Duration::from_secs(2)), "a run of failures starts over");
        p.reconfigure(cfg);
        assert_eq!(p.backoff_until, None, "pool set tries at once");
    }

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_millis(4));
        let mut out = String::new();
        h.write(&mut out, "x", "t=\"a\"");
        assert!(out.contains("x_bucket{t=\"a\",le=\"0.0005\"} 0"));
        assert!(out.contains("x_bucket{t=\"a\",le=\"0.001\"} 1"));
        assert!(out.contains("x_bucket{t=\"a\",le=\"0.005\"} 2"));
        assert!(out.contains("x_bucket{t=\"a\",le=\"+Inf\"} 2"));
        assert!(out.contains("x_count{t=\"a\"} 2"));
        assert!((h.mean_ms() - 2.35).abs() < 1e-9);
    }

    #[test]
    fn pressed_when_one_boot_at_a_time_falls_behind() {
        let mut p = Pool::new(PoolConfig { template: "t".into(), min: 1, max: 20 });
        let now = Instant::now();
        p.refill = Some(Duration::from_millis(4));
        assert!(!p.pressed_at(now), "no claims");
        // 10 claims in the last 100 ms: 100/s * 4 ms = 0.4 of a boot at a time.
        for _ in 0..10 {
            p.recent.push_back(now - Duration::from_millis(50));
        }
        assert!(!p.pressed_at(now));
        // 30 more: 400/s * 4 ms = 1.6, although the last second holds only 40 (40/s).
        for _ in 0..30 {
            p.recent.push_back(now - Duration::from_millis(10));
        }
        assert!(p.pressed_at(now));
        // The stream stopped half a second ago: 40/s over the last second, 0.16.
        assert!(!p.pressed_at(now + Duration::from_millis(500)));
        // Slow boots make a moderate stream too much for one at a time: 40/s * 25 ms = 1.
        p.refill = Some(Duration::from_millis(25));
        assert!(p.pressed_at(now + Duration::from_millis(500)));
    }

    #[test]
    fn a_pressed_pool_boots_more_at_once_when_boots_are_slow() {
        let mut p = Pool::new(PoolConfig { template: "t".into(), min: 1, max: 100 });
        let now = Instant::now();
        for _ in 0..50 {
            p.recent.push_back(now - Duration::from_millis(50));
        }
        // 500/s over the last 100 ms; 2.5 ms per boot: 1.25 / 0.8 -> 2 at once.
        p.refill = Some(Duration::from_micros(2500));
        assert_eq!(p.boots_at_once_at(now), 2);
        // 4 ms per boot: 2 / 0.8 = 2.5 -> 3.
        p.refill = Some(Duration::from_millis(4));
        assert_eq!(p.boots_at_once_at(now), 3);
        // Very slow boots: at most FILL_MOST.
        p.refill = Some(Duration::from_millis(40));
        assert_eq!(p.boots_at_once_at(now), FILL_MOST);
        // No claims: the floor.
        assert_eq!(p.boots_at_once_at(now + WINDOW * 2), FILL_PARALLEL);
    }

    #[test]
    fn demand_follows_claims_within_bounds() {
        let mut p = Pool::new(PoolConfig { template: "t".into(), min: 1, max: 20 });
        let now = Instant::now();
        assert_eq!(p.demand_at(now), 1, "no claims: min");
        p.refill = Some(Duration::from_millis(100));
        // 100 claims in the window (older than a second) = 10/s; 10/s * (0.1 + 0.1) s * 2 = 4.
        let earlier = now - Duration::from_secs(2);
        for _ in 0..100 {
            p.recent.push_back(earlier);
        }
        assert_eq!(p.demand_at(now), 4);
        // A burst: 30 claims in the last second count as 30/s at once.
        for _ in 0..30 {
            p.recent.push_back(now);
        }
        assert_eq!(p.demand_at(now), 12);
        for _ in 0..10_000 {
            p.recent.push_back(now);
        }
        assert_eq!(p.demand_at(now), 20, "bounded by max");
        assert_eq!(p.demand_at(now + WINDOW + Duration::from_secs(1)), 1, "old claims age out");
    }
}
