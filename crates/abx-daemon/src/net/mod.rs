//! Networking: each sandbox's veth (wired by the spawner with the slot's network
//! namespace), its egress policy in agentbox's nftables table, the DNS proxy that enforces
//! domain rules, the egress audit and the ingress proxy for ports inside sandboxes.
//!
//! Addresses: the pool `--subnet` gives its first host address to the gateway (on the
//! host side of every slot's veth, where the DNS proxy listens) and the following ones
//! to slots in order: slot `n` has `subnet + 2 + n`. Sandboxes of the same slot reuse
//! its address and interface one after another.

pub mod dns;
pub mod firewall;
pub mod ingress;
pub mod kept;
pub mod policy;
pub mod probe;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abx_api::{NetEvent, NetMode};
use abx_sandbox::spec::SlotNetSpec;
use tracing::{info, warn};

use firewall::TableSpec;
use policy::{Cidr, Policy};

/// Network settings of the daemon (`--subnet`, `--uplink`, `--dns-upstream`, `--ingress`,
/// `--domain`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// Sandbox address pool.
    pub subnet: Cidr,
    /// Host interface egress is masqueraded to (None: sandboxes reach nothing outside
    /// the host even when their policy allows it).
    pub uplink: Option<String>,
    /// Where allowed names are resolved.
    pub dns_upstream: Option<SocketAddr>,
    /// The ingress proxy's listening address.
    pub ingress: Option<SocketAddr>,
    /// Host-name suffix of ingress URLs: `<port>-<id>.<domain>`.
    pub domain: String,
    /// Who may reach the ports of sandboxes that do not say (`ingress` at create).
    pub ingress_access: abx_api::IngressAccess,
    /// How long the egress audit of a removed sandbox is kept (zero: removed with it).
    pub audit_retention: Duration,
    /// The most disk the kept audits of removed sandboxes may take; the oldest removals go
    /// first (zero: no limit but the retention).
    pub audit_max_size: u64,
    /// A file every sandbox's audit events are also appended to, as JSON lines naming
    /// their sandbox (for log shippers).
    pub audit_log: Option<std::path::PathBuf>,
}

impl NetConfig {
    /// The defaults: 10.213.0.0/16, the interface of the default route, the first
    /// name server of /etc/resolv.conf, ingress on 127.0.0.1:7480, `agentbox.localhost`
    /// (which most clients resolve to loopback by themselves).
    pub fn defaults() -> NetConfig {
        NetConfig {
            subnet: Cidr::new(Ipv4Addr::new(10, 213, 0, 0), 16),
            uplink: default_uplink(),
            dns_upstream: system_resolver(),
            ingress: Some(SocketAddr::from(([127, 0, 0, 1], 7480))),
            domain: "agentbox.localhost".into(),
            ingress_access: abx_api::IngressAccess::Public,
            audit_retention: DEFAULT_AUDIT_RETENTION,
            audit_max_size: DEFAULT_AUDIT_MAX_SIZE,
            audit_log: None,
        }
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1)
    }

    /// How many slots the pool has addresses for.
    pub fn capacity(&self) -> u64 {
        self.subnet.size().saturating_sub(3)
    }

    pub fn validate(&self, prefix: &str, slots: u32) -> Result<(), String> {
        if self.subnet.len > 30 {
            return Err(format!("--subnet {} is too small: use at most a /30", self.subnet));
        }
        if self.capacity() < u64::from(slots) {
            return Err(format!(
                "--subnet {} has addresses for {} sandboxes but --uid-slots is {slots}; use a larger subnet or fewer slots",
                self.subnet,
                self.capacity()
            ));
        }
        let host: Cidr = "192.0.2.0/24".parse().unwrap_or(Cidr::new(Ipv4Addr::new(192, 0, 2, 0), 24));
        for (bad, why) in [
            (host, "the host's own network on this kind of machine"),
            (Cidr::new(Ipv4Addr::new(127, 0, 0, 0), 8), "loopback"),
            (Cidr::new(Ipv4Addr::new(169, 254, 0, 0), 16), "link-local"),
            (Cidr::new(Ipv4Addr::new(224, 0, 0, 0), 3), "multicast and reserved"),
        ] {
            if self.subnet.overlaps(&bad) {
                return Err(format!("--subnet {} overlaps {bad} ({why})", self.subnet));
            }
        }
        let longest = format!("{prefix}{}", slots.saturating_sub(1));
        if longest.len() > 15 {
            return Err(format!(
                "interface names '{prefix}<slot>' would be up to {} characters (at most 15): use a shorter --prefix",
                longest.len()
            ));
        }
        if let Some(log) = &self.audit_log
            && !log.parent().is_some_and(|d| d.is_dir())
        {
            return Err(format!("--audit-log {}: its directory does not exist", log.display()));
        }
        if self.domain.is_empty() || self.domain.starts_with('.') || self.domain.contains(['/', ':', ' ']) {
            return Err(format!("invalid --domain '{}': a DNS name such as agentbox.localhost", self.domain));
        }
        Ok(())
    }
}

/// The interface of the IPv4 default route, from /proc/net/route.
pub fn default_uplink() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// The first IPv4 name server of /etc/resolv.conf, port 53.
pub fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()?.parse::<Ipv4Addr>().ok()).flatten()
        })
        .map(|ip| SocketAddr::from((ip, 53)))
}

/// How long the audit of a removed sandbox is kept unless `--audit-retention` says.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(7 * 86400);

/// How much disk the kept audits may take unless `--audit-max-size` says: 1 GiB.
pub const DEFAULT_AUDIT_MAX_SIZE: u64 = 1 << 30;

/// How often the audit thread removes kept audits past their retention.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Most audit events kept per sandbox (older ones are dropped and counted).
pub const AUDIT_CAPACITY: usize = 4096;

/// Shortest time a DNS answer keeps its addresses allowed, whatever its TTL: a client
/// that got a 0-second answer still connects right after.
pub const MIN_ALLOW_SECS: u32 = 30;

#[derive(Debug, Default)]
struct SlotState {
    /// The sandbox using the slot now.
    sandbox: Option<String>,
    policy: Option<Policy>,
    /// The slot's chain and set exist in the table (since this daemon started).
    in_table: bool,
    /// No conntrack entry of the slot's mark can exist: flushed since the slot last had
    /// a policy with egress. False at first (entries may be left from before this daemon
    /// started).
    no_flows: bool,
}

/// A piece of a port-limited DNS answer in set `p<N>`: ports `lo..=hi` of one address and
/// protocol, allowed until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    lo: u16,
    hi: u16,
    until: Instant,
}

/// What one slot's DNS sets hold, as the daemon put it there (the sets are changed by
/// nothing else): the expiry of each address of `d<N>`, and the disjoint port pieces of
/// each (address, protocol) of `p<N>`.
#[derive(Debug, Default)]
struct SlotAnswers {
    any_port: HashMap<Ipv4Addr, Instant>,
    ports: HashMap<(Ipv4Addr, u8), Vec<Piece>>,
}

impl SlotAnswers {
    /// Forgets what has expired (the kernel removed it).
    fn prune(&mut self, now: Instant) {
        self.any_port.retain(|_, until| *until > now);
        self.ports.retain(|_, pieces| {
            pieces.retain(|p| p.until > now);
            !pieces.is_empty()
        });
    }
}

/// The port pieces of one (address, protocol) once `ranges` are allowed until `until`,
/// given the pieces `current`: disjoint, every port of either allowed until the latest
/// expiry covering it (expired pieces dropped), neighbours with the same expiry joined. A
/// piece of `current` that keeps its ports and expiry comes back unchanged.
fn merge_pieces(current: &[Piece], ranges: &[(u16, u16)], until: Instant, now: Instant) -> Vec<Piece> {
    let all: Vec<Piece> = current
        .iter()
        .copied()
        .filter(|p| p.until > now)
        .chain(ranges.iter().map(|&(lo, hi)| Piece { lo, hi, until }))
        .collect();
    // Every port where what covers it may change: each piece's start and the port after its end.
    let mut cuts: Vec<u32> = all.iter().flat_map(|p| [u32::from(p.lo), u32::from(p.hi) + 1]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<Piece> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let best = all.iter().filter(|p| u32::from(p.lo) <= lo && hi <= u32::from(p.hi)).map(|p| p.until).max();
        let Some(best) = best else { continue };
        let (lo, hi) = (lo as u16, hi as u16);
        match out.last_mut() {
            Some(last) if last.until == best && u32::from(last.hi) + 1 == u32::from(lo) => last.hi = hi,
            _ => out.push(Piece { lo, hi, until: best }),
        }
    }
    out
}

#[derive(Debug, Default)]
struct Audit {
    /// The newest events (at most [`AUDIT_CAPACITY`]), oldest first.
    events: VecDeque<NetEvent>,
    /// Events older than those, no longer kept.
    dropped: u64,
    /// Lines in the sandbox's audit file (rewritten from `events` when it has twice
    /// the capacity).
    written: usize,
    /// Flows logged lately, so that one connection's retransmitted first packets (a SYN
    /// sent again after a second) count once: (key, time in ms).
    recent: VecDeque<(Flow, u64)>,
    /// Whose sandbox it is, for `--audit-log`.
    owner: AuditOwner,
}

/// The name and tenant of a sandbox, written with its events to `--audit-log`.
#[derive(Debug, Default, Clone)]
pub struct AuditOwner {
    pub name: Option<String>,
    pub tenant: Option<String>,
}

impl From<&crate::sandbox::Record> for AuditOwner {
    fn from(r: &crate::sandbox::Record) -> Self {
        AuditOwner { name: r.name.clone(), tenant: r.tenant.clone() }
    }
}

impl Audit {
    /// Whether `flow` was not seen in the [`FLOW_MEMORY_MS`] before `now` (remembering it).
    fn new_flow(&mut self, flow: Flow, now: u64) -> bool {
        if self.recent.iter().any(|(f, t)| *f == flow && now.saturating_sub(*t) < FLOW_MEMORY_MS) {
            return false;
        }
        if self.recent.len() >= FLOW_MEMORY {
            self.recent.pop_front();
        }
        self.recent.push_back((flow, now));
        true
    }
}

/// What makes packets one flow for the audit: protocol, source port, destination,
/// destination port, and whether it was allowed.
type Flow = (u8, Option<u16>, Ipv4Addr, Option<u16>, bool);

/// How long a flow's packets count as the same decision (TCP gives up on a SYN after
/// about a minute and a half of retransmits).
const FLOW_MEMORY_MS: u64 = 100_000;

/// Flows remembered per sandbox.
const FLOW_MEMORY: usize = 64;

/// What the audit writer does with one sandbox's file.
enum AuditWrite {
    Append(String),
    Rewrite(String),
}

/// Reads a sandbox's audit file: the newest [`AUDIT_CAPACITY`] events and the number of
/// lines (a torn last line, from a daemon killed while writing, is skipped).
fn read_audit_file(path: &std::path::Path) -> Audit {
    let Ok(text) = std::fs::read_to_string(path) else { return Audit::default() };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(AUDIT_CAPACITY);
    let events: VecDeque<NetEvent> = lines[start..].iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    Audit { events, dropped: start as u64, written: lines.len(), ..Default::default() }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub dns_allowed: AtomicU64,
    pub dns_refused: AtomicU64,
    pub connections_allowed: AtomicU64,
    pub connections_denied: AtomicU64,
    pub policy_changes: AtomicU64,
    pub ingress_allowed: AtomicU64,
    pub ingress_denied: AtomicU64,
}

/// The running services (started once the runtime is up).
#[derive(Default)]
struct Services {
    dns: Option<dns::DnsProxy>,
    ingress: Option<ingress::Ingress>,
    audit: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

pub struct Network {
    pub cfg: NetConfig,
    pub prefix: String,
    table: TableSpec,
    slots: Mutex<HashMap<u32, SlotState>>,
    nft: Mutex<Option<abx_sys::nft::Nft>>,
    /// Removes the conntrack entries of a slot's flows (see [`Network::end_flows`]).
    conntrack: Mutex<abx_sys::conntrack::Conntrack>,
    /// Slots whose DNS sets are known to be empty (flushed, and no answer added since), so
    /// that handing a slot over needs no netlink transaction. Taken only while holding
    /// `nft` (or alone), never the other way round.
    dns_clean: Mutex<std::collections::HashSet<u32>>,
    /// What each slot's DNS sets hold. Taken only while holding `nft` (or alone).
    answers: Mutex<HashMap<u32, SlotAnswers>>,
    audit: Mutex<HashMap<String, Audit>>,
    /// Where each sandbox's audit is kept as JSON lines, `<id>.jsonl` (None: in memory
    /// only), and the lines not written yet.
    audit_dir: Option<std::path::PathBuf>,
    audit_pending: Mutex<Vec<(String, String)>>,
    /// Lines for `--audit-log` not written yet.
    wide_pending: Mutex<Vec<String>>,
    /// Held while audit files are written or removed.
    audit_io: Mutex<()>,
    /// Sandboxes being removed (no longer listed, their log not yet moved to the kept
    /// audits): what to record with the log.
    removing: Mutex<HashMap<String, abx_api::KeptAudit>>,
    pub counters: Counters,
    /// Forwarding was switched on on the uplink (done at the first policy with egress).
    uplink_forwarding: AtomicBool,
    nflog: Mutex<Option<abx_sys::nflog::Nflog>>,
    services: Mutex<Services>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("cfg", &self.cfg).field("table", &self.table.table).finish()
    }
}

/// An interface other than this daemon's own veths with a route into `subnet`, from
/// /proc/net/route (this network namespace's main table).
fn subnet_user(subnet: &Cidr, prefix: &str) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let ours = f[0].strip_prefix(prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        // The kernel prints the raw network-order words as native integers.
        let dst = u32::from_str_radix(f[1], 16).ok().map(|d| Ipv4Addr::from(d.to_ne_bytes()))?;
        let len = u32::from_str_radix(f[7], 16).ok()?.count_ones() as u8;
        (!ours && len > 0 && Cidr::new(dst, len).overlaps(subnet)).then(|| f[0].to_string())
    })
}

/// NFLOG groups are per network namespace; daemons sharing one (tests) each take a free
/// one, starting from a number derived from the prefix.
fn bind_log_group(prefix: &str) -> Result<(abx_sys::nflog::Nflog, u16), String> {
    let start = prefix.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let mut last = String::new();
    for i in 0..64u32 {
        let group = (1000 + (start.wrapping_add(i) % 60000)) as u16;
        match abx_sys::nflog::Nflog::bind(group) {
            Ok(s) => return Ok((s, group)),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("no free NFLOG group for the egress audit: {last}"))
}

impl Network {
    /// Builds the table (replacing any earlier one of this prefix) and binds the audit's
    /// NFLOG group. Blocking.
    pub fn open(cfg: NetConfig, prefix: &str, audit_dir: Option<std::path::PathBuf>) -> Result<Network, String> {
        if let Some(dir) = &audit_dir {
            std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        if let Some(other) = subnet_user(&cfg.subnet, prefix) {
            return Err(format!(
                "--subnet {} is already routed through interface {other} (another daemon or network of this host); \
                 give this daemon a subnet of its own",
                cfg.subnet
            ));
        }
        let (nflog, log_group) = bind_log_group(prefix)?;
        let table = TableSpec {
            table: prefix.to_string(),
            subnet: cfg.subnet,
            gateway: cfg.gateway(),
            uplink: cfg.uplink.clone(),
            log_group,
            dns_port: 53,
        };
        firewall::apply(&firewall::table_script(&table)).map_err(|e| format!("nftables table {prefix}: {e}"))?;
        let nft = abx_sys::nft::Nft::open().map_err(|e| format!("open nf_tables netlink: {e}"))?;
        let conntrack = abx_sys::conntrack::Conntrack::open().map_err(|e| format!("open conntrack netlink: {e}"))?;
        Ok(Network {
            cfg,
            prefix: prefix.to_string(),
            table,
            slots: Mutex::new(HashMap::new()),
            nft: Mutex::new(Some(nft)),
            conntrack: Mutex::new(conntrack),
            dns_clean: Mutex::new(Default::default()),
            answers: Mutex::new(HashMap::new()),
            audit: Mutex::new(HashMap::new()),
            audit_dir,
            audit_pending: Mutex::new(Vec::new()),
            wide_pending: Mutex::new(Vec::new()),
            audit_io: Mutex::new(()),
            removing: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            uplink_forwarding: AtomicBool::new(false),
            nflog: Mutex::new(Some(nflog)),
            services: Mutex::new(Services::default()),
        })
    }

    /// Starts the DNS proxy, the audit reader and the ingress proxy.
    pub async fn start(self: &Arc<Self>, router: Arc<dyn ingress::Router>) -> Result<(), String> {
        let mut services = Services::default();
        if let Some(upstream) = self.cfg.dns_upstream {
            let bind = SocketAddr::from((self.cfg.gateway(), self.table.dns_port));
            let proxy = dns::DnsProxy::start(bind, upstream, Arc::new(DnsGate(Arc::downgrade(self))))
                .await
                .map_err(|e| format!("DNS proxy on {bind}: {e}"))?;
            services.dns = Some(proxy);
        } else {
            warn!("no DNS upstream (--dns-upstream, or a nameserver in /etc/resolv.conf): sandboxes resolve nothing");
        }
        if let Some(addr) = self.cfg.ingress {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("ingress proxy on {addr}: {e}"))?;
            let ing = ingress::Ingress::start(listener, self.cfg.domain.clone(), router);
            info!(address = %ing.local_addr(), domain = %self.cfg.domain, access = self.cfg.ingress_access.as_str(), "ingress proxy listening");
            if !addr.ip().is_loopback() && self.cfg.ingress_access == abx_api::IngressAccess::Public {
                warn!(
                    address = %addr,
                    "the ingress proxy listens beyond loopback and sandbox ports are public by default: anyone \
                     who reaches it reaches every sandbox that did not ask for a token (--ingress-access token)"
                );
            }
            services.ingress = Some(ing);
        }
        if let Some(sock) = self.nflog.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let this = Arc::downgrade(self);
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::Builder::new()
                .name("abx-audit".into())
                .spawn(move || read_audit(sock, this, flag))
                .map_err(|e| format!("start the egress audit thread: {e}"))?;
            services.audit = Some((stop, thread));
        }
        *self.services.lock().unwrap_or_else(|e| e.into_inner()) = services;
        Ok(())
    }

    /// The ingress proxy's address, if it runs.
    pub fn ingress_addr(&self) -> Option<SocketAddr> {
        self.services.lock().unwrap_or_else(|e| e.into_inner()).ingress.as_ref().map(|i| i.local_addr())
    }

    /// Stops the services; removes the table when no sandbox is left (otherwise it keeps
    /// enforcing their policies while the daemon is away).
    pub async fn stop(&self, sandboxes_left: bool) {
        let services = std::mem::take(&mut *self.services.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(d) = services.dns {
            d.shutdown().await;
        }
        if let Some(i) = services.ingress {
            i.shutdown().await;
        }
        if let Some((stop, thread)) = services.audit {
            stop.store(true, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.flush_audit();
        if !sandboxes_left && let Err(e) = firewall::apply(&firewall::delete_table_script(&self.table.table)) {
            warn!(error = %e, "removing the nftables table");
        }
    }

    pub fn slot_addr(&self, slot: u32) -> Ipv4Addr {
        self.cfg.subnet.nth(2 + slot)
    }

    pub fn slot_iface(&self, slot: u32) -> String {
        format!("{}{slot}", self.prefix)
    }

    /// Packets received and sent by the host end of slot `slot`'s veth (sysfs counters;
    /// None if it has none).
    pub fn packets(&self, slot: u32) -> Option<u64> {
        let dir = format!("/sys/class/net/{}/statistics", self.slot_iface(slot));
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok()?.trim().parse::<u64>().ok();
        Some(read("rx_packets")? + read("tx_packets")?)
    }

    fn slot_of(&self, ip: IpAddr) -> Option<u32> {
        let IpAddr::V4(ip) = ip else { return None };
        if !self.cfg.subnet.contains(ip) {
            return None;
        }
        u32::from(ip).checked_sub(u32::from(self.cfg.subnet.addr) + 2)
    }

    /// What the spawner wires into slot `slot`'s network namespace.
    pub fn slot_spec(&self, slot: u32) -> SlotNetSpec {
        SlotNetSpec { host_if: self.slot_iface(slot), addr: self.slot_addr(slot), gateway: self.cfg.gateway() }
    }

    /// The resolv.conf every sandbox gets.
    pub fn resolv_conf(&self) -> String {
        format!("nameserver {}\noptions timeout:2 attempts:2\n", self.cfg.gateway())
    }

    /// Gives slot `slot` to sandbox `id` with `policy` (blocking: may run nft).
    pub fn attach(&self, slot: u32, id: &str, owner: AuditOwner, policy: &Policy) -> Result<(), String> {
        // A sandbox started again (or adopted after a restart) goes on with its audit.
        let mut earlier = self.audit_file(id).map(|f| read_audit_file(&f)).unwrap_or_default();
        earlier.owner = owner;
        self.audit.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), earlier);
        if let Err(e) = self.apply_policy(slot, policy, true) {
            self.audit.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            return Err(e);
        }
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).entry(slot).or_default().sandbox = Some(id.to_string());
        Ok(())
    }

    /// Makes sure slot `slot` has its chain and DNS set (no egress), ahead of its first
    /// sandbox, so that a create with the default policy runs no `nft` (blocking).
    pub fn prepare(&self, slot: u32) -> Result<(), String> {
        let ready = self.slots.lock().unwrap_or_else(|e| e.into_inner()).get(&slot).is_some_and(|s| s.in_table);
        if ready { Ok(()) } else { self.apply_policy(slot, &Policy::none(), false) }
    }

    /// Changes the policy of the sandbox in `slot` (blocking). Addresses allowed by earlier
    /// DNS answers are forgotten: names still allowed are allowed again at their next lookup.
    /// Established connections and flows continue, except with `none`, which ends them all.
    pub fn set_policy(&self, slot: u32, policy: &Policy) -> Result<(), String> {
        self.counters.policy_changes.fetch_add(1, Ordering::Relaxed);
        self.apply_policy(slot, policy, true)?;
        if policy.mode == NetMode::None {
            self.end_flows(slot)?;
        }
        Ok(())
    }

    /// Removes the conntrack entries of the flows slot `slot` opened (its mark, see
    /// [`firewall::slot_mark`]), unless none can exist. Their next packets are new flows,
    /// checked against the slot's policy as it is now. Called with egress already closed,
    /// so that no flow allowed by the earlier policy starts after the flush.
    fn end_flows(&self, slot: u32) -> Result<(), String> {
        let clean = self.slots.lock().unwrap_or_else(|e| e.into_inner()).get(&slot).is_some_and(|s| s.no_flows);
        if clean {
            return Ok(());
        }
        let mark = firewall::slot_mark(&self.cfg.subnet, slot);
        self.conntrack
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush_mark(mark, u32::MAX)
            .map_err(|e| format!("remove the conntrack entries of slot {slot} (mark {mark:#x}): {e}"))?;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let s = slots.entry(slot).or_default();
        // A policy with egress given meanwhile may have let new flows in.
        if s.policy.as_ref().is_none_or(|p| p.mode == NetMode::None) {
            s.no_flows = true;
        }
        Ok(())
    }

    /// Takes slot `slot` back from its sandbox: no egress, no allowed addresses, and none
    /// of its flows left in conntrack (the slot's next sandbox has the same address and
    /// interface: a packet matching a flow left behind would pass as established,
    /// whatever that sandbox's policy).
    pub fn detach(&self, slot: u32, id: &str) {
        // What it recorded last is written out before it leaves memory.
        self.flush_audit();
        self.audit.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = slots.get_mut(&slot) else { return };
        state.sandbox = None;
        let was_open = state.policy.as_ref().is_some_and(|p| p.mode != NetMode::None);
        drop(slots);
        let res = if was_open { self.apply_policy(slot, &Policy::none(), true) } else { self.flush_dns(slot) };
        let res = res.and_then(|()| self.end_flows(slot));
        if let Err(e) = res {
            warn!(slot, error = %e, "resetting the slot's network policy");
            // Rebuilt from scratch at its next use.
            if let Some(s) = self.slots.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&slot) {
                s.in_table = false;
            }
            self.dns_clean.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
            self.answers.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
        }
    }

    fn flush_dns(&self, slot: u32) -> Result<(), String> {
        let in_table = self.slots.lock().unwrap_or_else(|e| e.into_inner()).get(&slot).is_some_and(|s| s.in_table);
        if !in_table {
            return Ok(());
        }
        let nft = self.nft.lock().unwrap_or_else(|e| e.into_inner());
        let Some(nft) = nft.as_ref() else { return Ok(()) };
        if self.dns_clean.lock().unwrap_or_else(|e| e.into_inner()).contains(&slot) {
            return Ok(());
        }
        // Both DNS sets: every-port answers and port-limited ones.
        let ops = [
            abx_sys::nft::SetOp::Flush { set: firewall::slot_set(slot) },
            abx_sys::nft::SetOp::Flush { set: firewall::slot_port_set(slot) },
        ];
        nft.apply(abx_sys::nft::Family::Ip, &self.table.table, &ops)
            .map_err(|e| format!("flush the DNS sets of slot {slot}: {e}"))?;
        self.answers.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
        self.dns_clean.lock().unwrap_or_else(|e| e.into_inner()).insert(slot);
        Ok(())
    }

    fn apply_policy(&self, slot: u32, policy: &Policy, flush_dns: bool) -> Result<(), String> {
        if policy.mode != NetMode::None {
            self.enable_uplink_forwarding();
            // Before the policy is in place: from then on flows may start.
            self.slots.lock().unwrap_or_else(|e| e.into_inner()).entry(slot).or_default().no_flows = false;
        }
        let (in_table, current) = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let s = slots.get(&slot);
            (s.is_some_and(|s| s.in_table), s.and_then(|s| s.policy.clone()))
        };
        let current = if in_table {
            current
        } else {
            // Once per slot (and daemon start): its chain and empty sets, with `nft`.
            firewall::apply(&firewall::slot_script(&self.table, slot, &self.slot_iface(slot)))?;
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let s = slots.entry(slot).or_default();
            s.in_table = true;
            s.policy = Some(Policy::none());
            s.policy.clone()
        };
        if current.as_ref() == Some(policy) {
            // Same rules: only the DNS answers of the previous sandbox go.
            return if flush_dns { self.flush_dns(slot) } else { Ok(()) };
        }
        let was_public = current.as_ref().is_some_and(|p| p.mode == NetMode::Public);
        let ops = firewall::policy_ops(slot, &self.slot_iface(slot), policy, flush_dns, was_public)?;
        {
            let nft = self.nft.lock().unwrap_or_else(|e| e.into_inner());
            let nft = nft.as_ref().ok_or("the nf_tables socket is closed")?;
            nft.apply(abx_sys::nft::Family::Ip, &self.table.table, &ops)
                .map_err(|e| format!("apply the policy of slot {slot}: {e}"))?;
            if flush_dns {
                self.answers.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
            }
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(slot).or_default().policy = Some(policy.clone());
        Ok(())
    }

    fn enable_uplink_forwarding(&self) {
        let Some(up) = &self.cfg.uplink else { return };
        if self.uplink_forwarding.swap(true, Ordering::SeqCst) {
            return;
        }
        let path = format!("/proc/sys/net/ipv4/conf/{up}/forwarding");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            return;
        }
        match std::fs::write(&path, "1") {
            Ok(()) => info!(uplink = %up, "enabled IPv4 forwarding on the uplink for sandbox egress"),
            Err(e) => {
                warn!(uplink = %up, error = %e, "cannot enable forwarding on the uplink; sandboxes get no egress")
            }
        }
    }

    /// Allows the addresses of a DNS answer for their TTL (at least [`MIN_ALLOW_SECS`]):
    /// every port (`scope` None), or only the rules' protocols and ports. An answer only
    /// ever extends what is allowed: an address (or port) that an earlier answer allowed
    /// for longer keeps its later expiry.
    fn allow_answer(
        &self,
        slot: u32,
        scope: Option<Vec<policy::PortBox>>,
        addrs: &[(Ipv4Addr, u32)],
    ) -> Result<(), String> {
        use abx_sys::nft::{Family, RawElem, SetOp};
        let now = Instant::now();
        let until = |t: u32| now + Duration::from_secs(u64::from(t.max(MIN_ALLOW_SECS)));
        let nft = self.nft.lock().unwrap_or_else(|e| e.into_inner());
        let Some(nft) = nft.as_ref() else { return Ok(()) };
        // Before the elements go in: even a failed transaction may have added some.
        self.dns_clean.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let known = answers.entry(slot).or_default();
        known.prune(now);
        let table = &self.table.table;
        match scope {
            None => {
                // Re-adding an element with a timeout restarts its expiry (see abx_sys::nft):
                // only addresses whose expiry moves later are sent.
                let mut elems: Vec<(Ipv4Addr, Option<Duration>)> = Vec::new();
                for (addr, t) in addrs {
                    let u = until(*t);
                    if known.any_port.get(addr).is_none_or(|old| *old < u) {
                        elems.push((*addr, Some(u - now)));
                    }
                }
                let res = nft.add_ipv4_elements(Family::Ip, table, &firewall::slot_set(slot), &elems);
                for (addr, t) in addrs {
                    let u = until(*t);
                    let e = known.any_port.entry(*addr).or_insert(u);
                    *e = (*e).max(u);
                }
                res.map_err(|e| e.to_string())
            }
            Some(boxes) => {
                // The kernel refuses overlapping intervals in one set: each (address,
                // protocol) holds disjoint port pieces, each with the latest expiry of the
                // answers covering it. The pieces that change are replaced in one
                // transaction.
                let set = firewall::slot_port_set(slot);
                let elem = |addr: Ipv4Addr, proto: u8, p: &Piece| RawElem {
                    key: firewall::rule_key(addr, proto, p.lo),
                    key_end: Some(firewall::rule_key(addr, proto, p.hi)),
                    timeout: Some(p.until.saturating_duration_since(now)),
                };
                let mut ops: Vec<SetOp> = Vec::new();
                for (addr, t) in addrs {
                    let protos: std::collections::BTreeSet<u8> = boxes.iter().flat_map(|b| b.0.0..=b.0.1).collect();
                    for proto in protos {
                        let ranges: Vec<(u16, u16)> =
                            boxes.iter().filter(|b| (b.0.0..=b.0.1).contains(&proto)).map(|b| b.1).collect();
                        let old = known.ports.remove(&(*addr, proto)).unwrap_or_default();
                        let new = merge_pieces(&old, &ranges, until(*t), now);
                        let gone: Vec<RawElem> = old
                            .iter()
                            .filter(|p| p.until > now && !new.contains(p))
                            .map(|p| elem(*addr, proto, p))
                            .collect();
                        let added: Vec<RawElem> =
                            new.iter().filter(|p| !old.contains(p)).map(|p| elem(*addr, proto, p)).collect();
                        if !gone.is_empty() {
                            ops.push(SetOp::Delete { set: set.clone(), elems: gone });
                        }
                        if !added.is_empty() {
                            ops.push(SetOp::Add { set: set.clone(), elems: added });
                        }
                        known.ports.insert((*addr, proto), new);
                    }
                }
                if ops.is_empty() || nft.apply(Family::Ip, table, &ops).is_ok() {
                    return Ok(());
                }
                // A piece the kernel let expire a moment before the daemon thought (gone
                // from the set, so its delete failed), or one it still held: the whole set
                // again, from what the daemon knows.
                let mut all: Vec<RawElem> = Vec::new();
                for ((addr, proto), pieces) in &known.ports {
                    all.extend(pieces.iter().filter(|p| p.until > now).map(|p| elem(*addr, *proto, p)));
                }
                let mut ops = vec![SetOp::Flush { set: set.clone() }];
                ops.extend(all.chunks(256).map(|c| SetOp::Add { set: set.clone(), elems: c.to_vec() }));
                nft.apply(Family::Ip, table, &ops).map_err(|e| {
                    known.ports.clear();
                    format!("rewrite the port-limited DNS answers of slot {slot}: {e}")
                })
            }
        }
    }

    fn sandbox_of(&self, ip: IpAddr) -> Option<(u32, String, Option<Policy>)> {
        let slot = self.slot_of(ip)?;
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let s = slots.get(&slot)?;
        Some((slot, s.sandbox.clone()?, s.policy.clone()))
    }

    fn record(&self, id: &str, event: NetEvent) {
        let mut audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        let Some(a) = audit.get_mut(id) else { return };
        if a.events.len() >= AUDIT_CAPACITY {
            a.events.pop_front();
            a.dropped += 1;
        }
        if self.audit_dir.is_some()
            && let Ok(line) = serde_json::to_string(&event)
        {
            self.audit_pending.lock().unwrap_or_else(|e| e.into_inner()).push((id.to_string(), line));
        }
        if self.cfg.audit_log.is_some()
            && let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&event)
        {
            let mut line = serde_json::Map::new();
            line.insert("sandbox".into(), id.into());
            if let Some(n) = &a.owner.name {
                line.insert("sandbox_name".into(), n.as_str().into());
            }
            if let Some(t) = &a.owner.tenant {
                line.insert("tenant".into(), t.as_str().into());
            }
            line.extend(fields);
            if let Ok(text) = serde_json::to_string(&line) {
                self.wide_pending.lock().unwrap_or_else(|e| e.into_inner()).push(text);
            }
        }
        a.events.push_back(event);
    }

    fn audit_file(&self, id: &str) -> Option<std::path::PathBuf> {
        self.audit_dir.as_ref().map(|d| d.join(format!("{id}.jsonl")))
    }

    /// Writes the audit events recorded since the last call to their sandboxes' files
    /// (the audit thread calls it at least every 200 ms, and `stop` at the end).
    pub fn flush_audit(&self) {
        let _io = self.audit_io.lock().unwrap_or_else(|e| e.into_inner());
        self.flush_audit_log();
        let pending = std::mem::take(&mut *self.audit_pending.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return;
        }
        let mut work: Vec<(String, AuditWrite)> = Vec::new();
        {
            let mut audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
            let mut by_id: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (id, line) in pending {
                by_id.entry(id).or_default().push(line);
            }
            for (id, lines) in by_id {
                // A sandbox destroyed since: its file is gone and stays gone.
                let Some(a) = audit.get_mut(&id) else { continue };
                if a.written + lines.len() > 2 * AUDIT_CAPACITY {
                    let mut all = String::new();
                    for e in &a.events {
                        if let Ok(l) = serde_json::to_string(e) {
                            all.push_str(&l);
                            all.push('\n');
                        }
                    }
                    a.written = a.events.len();
                    work.push((id, AuditWrite::Rewrite(all)));
                } else {
                    a.written += lines.len();
                    work.push((id, AuditWrite::Append(lines.join("\n") + "\n")));
                }
            }
        }
        for (id, w) in work {
            let Some(path) = self.audit_file(&id) else { continue };
            let res = match w {
                AuditWrite::Append(text) => {
                    use std::io::Write;
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .and_then(|mut f| f.write_all(text.as_bytes()))
                }
                AuditWrite::Rewrite(text) => {
                    let tmp = path.with_extension("jsonl.new");
                    std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path))
                }
            };
            if let Err(e) = res {
                warn!(sandbox = %id, error = %e, "writing the egress audit");
            }
        }
    }

    /// Appends the events recorded since the last call to `--audit-log` (opened anew each
    /// time, so that a log rotated by renaming is followed). Called holding `audit_io`.
    fn flush_audit_log(&self) {
        let Some(path) = &self.cfg.audit_log else { return };
        let lines = std::mem::take(&mut *self.wide_pending.lock().unwrap_or_else(|e| e.into_inner()));
        if lines.is_empty() {
            return;
        }
        let mut text = lines.join("\n");
        text.push('\n');
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = res {
            warn!(path = %path.display(), error = %e, events = lines.len(), "writing the egress audit log");
        }
    }

    /// Notes that sandbox `meta.id` is being removed, before it stops being listed: until
    /// [`Network::forget`] its log is read as a removed sandbox's.
    pub fn removing(&self, meta: abx_api::KeptAudit) {
        if self.audit_dir.is_some() {
            self.removing.lock().unwrap_or_else(|e| e.into_inner()).insert(meta.id.clone(), meta);
        }
    }

    /// Ends a destroyed sandbox's audit: its log goes to the kept audits (when it recorded
    /// anything, it was announced with [`Network::removing`] and `--audit-retention` is
    /// not zero) or is removed.
    pub fn forget(&self, id: &str) {
        self.audit.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        self.audit_pending.lock().unwrap_or_else(|e| e.into_inner()).retain(|(i, _)| i != id);
        let _io = self.audit_io.lock().unwrap_or_else(|e| e.into_inner());
        let meta = self.removing.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        let (Some(dir), Some(path)) = (&self.audit_dir, self.audit_file(id)) else { return };
        match meta {
            Some(mut meta) if !self.cfg.audit_retention.is_zero() => {
                meta.removed_at = crate::sandbox::now();
                if let Err(e) = kept::keep(&kept::dir(dir), &path, meta) {
                    warn!(sandbox = %id, error = %e, "keeping the egress audit of a removed sandbox");
                    let _ = std::fs::remove_file(path);
                }
            }
            _ => {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// The kept audit of a removed sandbox, by id or by the name it had (the last one
    /// removed with it), with its events and how many older ones were dropped. A sandbox
    /// in the middle of its removal is found by id.
    pub fn kept_log(&self, key: &str) -> Option<(abx_api::KeptAudit, Vec<NetEvent>, u64)> {
        let dir = kept::dir(self.audit_dir.as_ref()?);
        let going = self.removing.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned();
        if let Some(meta) = &going {
            // In memory until its slot is let go, then in its live file (unless it was
            // moved to the kept audits just now).
            let (events, dropped) = self.log(key);
            if !events.is_empty() {
                let meta = abx_api::KeptAudit { events: events.len() as u64 + dropped, ..meta.clone() };
                return Some((meta, events, dropped));
            }
        }
        let _io = self.audit_io.lock().unwrap_or_else(|e| e.into_inner());
        let Some(meta) = kept::find(&dir, key) else {
            return going.map(|meta| (meta, Vec::new(), 0));
        };
        let (events, dropped) = kept::events(&dir, &meta.id);
        Some((meta, events, dropped))
    }

    /// What a removed sandbox was (by id, or the name it had), without its events: one
    /// being removed now, or one whose audit is kept.
    pub fn kept_sandbox(&self, key: &str) -> Option<abx_api::KeptAudit> {
        let dir = kept::dir(self.audit_dir.as_ref()?);
        if let Some(meta) = self.removing.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            return Some(meta.clone());
        }
        let _io = self.audit_io.lock().unwrap_or_else(|e| e.into_inner());
        kept::find(&dir, key)
    }

    /// Every kept audit of a removed sandbox, oldest removal first.
    pub fn kept_audits(&self) -> Vec<abx_api::KeptAudit> {
        let Some(dir) = &self.audit_dir else { return Vec::new() };
        let _io = self.audit_io.lock().unwrap_or_else(|e| e.into_inner());
        kept::list(&kept::dir(dir))
    }

    /// Removes the kept audits older than `--audit-retention`, then the oldest of the rest
    /// while they take more than `--audit-max-size`.
    pub fn prune_kept_audits(&self) {
        let Some(dir) = &self.audit_dir else { return };
        let _io = self.audit_io.lock().unwrap_or_else(|e| e.into_inner());
        let gone = kept::prune(&kept::dir(dir), crate::sandbox::now(), self.cfg.audit_retention.as_secs());
        if gone > 0 {
            info!(audits = gone, "removed the egress audits of sandboxes removed longer ago than --audit-retention");
        }
        if self.cfg.audit_max_size > 0 {
            let gone = kept::cap(&kept::dir(dir), self.cfg.audit_max_size);
            if gone > 0 {
                warn!(
                    audits = gone,
                    max_size = self.cfg.audit_max_size,
                    "removed the oldest kept egress audits early: together they took more than --audit-max-size"
                );
            }
        }
    }

    /// Removes the audit files of sandboxes that no longer exist.
    pub fn forget_all_but(&self, known: &std::collections::HashSet<String>) {
        let Some(dir) = &self.audit_dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let _io = self.audit_io.lock().unwrap_or_else(|e| e.into_inner());
        for e in entries.flatten() {
            // The kept audits of removed sandboxes have their own retention.
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".jsonl").or_else(|| name.strip_suffix(".jsonl.new")).unwrap_or(&name);
            if !known.contains(id) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// A sandbox's audit log (oldest first) and how many older events were dropped: from
    /// memory while it runs, from its file while it is stopped.
    pub fn log(&self, id: &str) -> (Vec<NetEvent>, u64) {
        let audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = audit.get(id) {
            return (a.events.iter().cloned().collect(), a.dropped);
        }
        drop(audit);
        let _io = self.audit_io.lock().unwrap_or_else(|e| e.into_inner());
        let a = self.audit_file(id).map(|f| read_audit_file(&f)).unwrap_or_default();
        (a.events.into(), a.dropped)
    }

    /// Prometheus text lines for `/metrics`.
    pub fn metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let c = &self.counters;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let by_verdict = |out: &mut String, name: &str, help: &str, allow: u64, deny: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name}{{verdict=\"allow\"}} {allow}");
            let _ = writeln!(out, "{name}{{verdict=\"deny\"}} {deny}");
        };
        by_verdict(
            out,
            "agentbox_dns_queries_total",
            "DNS queries from sandboxes, by verdict.",
            load(&c.dns_allowed),
            load(&c.dns_refused),
        );
        by_verdict(
            out,
            "agentbox_connections_total",
            "New connections and flows from sandboxes, by verdict.",
            load(&c.connections_allowed),
            load(&c.connections_denied),
        );
        let _ = writeln!(out, "# HELP agentbox_network_policy_changes_total Runtime network policy changes.");
        let _ = writeln!(out, "# TYPE agentbox_network_policy_changes_total counter");
        let _ = writeln!(out, "agentbox_network_policy_changes_total {}", load(&c.policy_changes));
        by_verdict(
            out,
            "agentbox_ingress_connections_total",
            "Client connections to sandbox ports through the ingress proxy, by verdict.",
            load(&c.ingress_allowed),
            load(&c.ingress_denied),
        );
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Counts a decision in `allow` or `deny` and names its verdict.
fn counted(allowed: bool, allow: &AtomicU64, deny: &AtomicU64) -> &'static str {
    let (counter, verdict) = if allowed { (allow, "allow") } else { (deny, "deny") };
    counter.fetch_add(1, Ordering::Relaxed);
    verdict
}

fn dns_event(verdict: &str, name: &str, qtype: &str, addrs: &[(Ipv4Addr, u32)]) -> NetEvent {
    NetEvent {
        time_ms: now_ms(),
        kind: "dns".into(),
        verdict: verdict.into(),
        name: Some(name.to_string()),
        qtype: Some(qtype.to_string()),
        addresses: addrs.iter().map(|(a, _)| a.to_string()).collect(),
        protocol: None,
        destination: None,
        port: None,
        source: None,
    }
}

/// The DNS proxy's view of the policies.
struct DnsGate(std::sync::Weak<Network>);

impl dns::DnsPolicy for DnsGate {
    fn decide(&self, client: IpAddr, name: &str) -> dns::Verdict {
        let Some(net) = self.0.upgrade() else { return dns::Verdict::NotASandbox };
        match net.sandbox_of(client) {
            Some((_, _, Some(p))) if p.allows_name(name) => dns::Verdict::Allow,
            Some(_) => dns::Verdict::Deny,
            None => dns::Verdict::NotASandbox,
        }
    }

    fn answered(&self, client: IpAddr, name: &str, qtype: &str, addrs: &[(Ipv4Addr, u32)]) {
        let Some(net) = self.0.upgrade() else { return };
        let Some((slot, id, policy)) = net.sandbox_of(client) else { return };
        net.counters.dns_allowed.fetch_add(1, Ordering::Relaxed);
        if !addrs.is_empty() {
            let scope = policy.as_ref().and_then(|p| p.name_scope(name));
            if let Err(e) = net.allow_answer(slot, scope, addrs) {
                warn!(sandbox = %id, error = %e, "allowing DNS answer addresses");
            }
        }
        net.record(&id, dns_event("allow", name, qtype, addrs));
    }

    fn failed(&self, client: IpAddr, name: &str, qtype: &str, error: &str) {
        let Some(net) = self.0.upgrade() else { return };
        let Some((_, id, _)) = net.sandbox_of(client) else { return };
        net.counters.dns_allowed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(sandbox = %id, name, qtype, error, "allowed DNS query failed upstream");
        // Allowed, and asked upstream: recorded as such, with no addresses.
        net.record(&id, dns_event("allow", name, qtype, &[]));
    }

    fn refused(&self, client: IpAddr, name: &str, qtype: &str) {
        let Some(net) = self.0.upgrade() else { return };
        let Some((_, id, _)) = net.sandbox_of(client) else { return };
        net.counters.dns_refused.fetch_add(1, Ordering::Relaxed);
        net.record(&id, dns_event("deny", name, qtype, &[]));
    }
}

/// Reads the firewall's NFLOG messages into the audit logs and counters, on a thread of
/// its own (the socket is not `Sync`) that looks for `stop` between polls.
fn read_audit(sock: abx_sys::nflog::Nflog, net: std::sync::Weak<Network>, stop: Arc<AtomicBool>) {
    use std::os::fd::AsFd;
    let _ = sock.set_nonblocking(true);
    let mut buf = vec![0u8; 256 * 1024];
    let mut pruned: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        if pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            pruned = Some(Instant::now());
            if let Some(net) = net.upgrade() {
                net.prune_kept_audits();
            }
        }
        let fd = sock.as_fd();
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        let wait = rustix::event::Timespec { tv_sec: 0, tv_nsec: 200_000_000 };
        match rustix::event::poll(&mut fds, Some(&wait)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => {
                // DNS answers are recorded by the proxy; this thread writes them out too.
                if let Some(net) = net.upgrade() {
                    net.flush_audit();
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "egress audit stopped");
                return;
            }
        }
        let entries = match sock.recv(&mut buf) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!(error = %e, "reading the egress audit");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(net) = net.upgrade() else { return };
        for e in entries {
            net.audit_entry(&e);
        }
        net.flush_audit();
    }
}

impl Network {
    /// Whether `flow` of sandbox `id` was not logged in the last [`FLOW_MEMORY_MS`] (and
    /// remembers it). Packets without a source port (ICMP) are always new.
    fn new_flow(&self, id: &str, flow: Flow) -> bool {
        if flow.1.is_none() {
            return true;
        }
        let mut audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        audit.get_mut(id).is_none_or(|a| a.new_flow(flow, now_ms()))
    }

    fn audit_entry(&self, e: &abx_sys::nflog::LogEntry) {
        let allowed = if e.prefix.starts_with(firewall::LOG_ALLOW.trim_end()) {
            true
        } else if e.prefix.starts_with(firewall::LOG_DENY.trim_end()) {
            false
        } else {
            return;
        };
        let Some((_, id, _)) = self.sandbox_of(IpAddr::V4(e.src)) else { return };
        if !self.new_flow(&id, (e.protocol, e.src_port, e.dst, e.dst_port, allowed)) {
            return;
        }
        let verdict = counted(allowed, &self.counters.connections_allowed, &self.counters.connections_denied);
        let protocol = match e.protocol {
            1 => "icmp".to_string(),
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            n => n.to_string(),
        };
        self.record(
            &id,
            NetEvent {
                time_ms: now_ms(),
                kind: "connection".into(),
                verdict: verdict.into(),
                name: None,
                qtype: None,
                addresses: vec![],
                protocol: Some(protocol),
                destination: Some(e.dst.to_string()),
                port: e.dst_port,
                source: None,
            },
        );
    }

    /// Records a client connection through the ingress proxy to `port` of sandbox `id`,
    /// once per client connection (its requests after the first are not recorded).
    pub fn record_ingress(&self, id: &str, port: u16, peer: std::net::SocketAddr, allowed: bool) {
        // Protocol 0 (not an IP protocol number a packet in the egress audit carries)
        // keeps these apart from connections in the flow memory.
        let ip = match peer.ip() {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        if !self.new_flow(id, (0, Some(peer.port()), ip, Some(port), allowed)) {
            return;
        }
        let verdict = counted(allowed, &self.counters.ingress_allowed, &self.counters.ingress_denied);
        self.record(
            id,
            NetEvent {
                time_ms: now_ms(),
                kind: "ingress".into(),
                verdict: verdict.into(),
                name: None,
                qtype: None,
                addresses: vec![],
                protocol: Some("http".into()),
                destination: None,
                port: Some(port),
                source: Some(peer.to_string()),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> NetEvent {
        NetEvent {
            time_ms: n,
            kind: "connection".into(),
            verdict: "deny".into(),
            name: None,
            qtype: None,
            addresses: vec![],
            protocol: Some("tcp".into()),
            destination: Some("198.51.100.20".into()),
            port: Some(80),
            source: None,
        }
    }

    /// Guards that port-limited answers sharing an address all take effect (the kernel
    /// refuses overlapping intervals, and overlapping ones used to be dropped) and that an
    /// answer never shortens what an earlier one allowed.
    #[test]
    fn port_pieces_cover_every_allowed_port_until_its_latest_expiry() {
        let now = Instant::now();
        let at = |s: u64| now + Duration::from_secs(s);
        let piece = |lo, hi, s| Piece { lo, hi, until: at(s) };
        // cdnlong.test:9000/tcp for a day, then cdnshort.test:22-9000/tcp for 30 s.
        let long = merge_pieces(&[], &[(9000, 9000)], at(86400), now);
        assert_eq!(long, [piece(9000, 9000, 86400)]);
        let both = merge_pieces(&long, &[(22, 9000)], at(30), now);
        assert_eq!(both, [piece(22, 8999, 30), piece(9000, 9000, 86400)], "9000 keeps its day");
        // Partly overlapping ranges: their union.
        let a = merge_pieces(&[], &[(80, 90)], at(60), now);
        let b = merge_pieces(&a, &[(85, 9000)], at(60), now);
        assert_eq!(b, [piece(80, 9000, 60)]);
        // A later answer for part of a range extends that part only.
        let c = merge_pieces(&b, &[(100, 200)], at(120), now);
        assert_eq!(c, [piece(80, 99, 60), piece(100, 200, 120), piece(201, 9000, 60)]);
        // One answer with two overlapping ranges of its own, and the edges of the port space.
        let d = merge_pieces(&[], &[(1, 10), (5, 65535)], at(30), now);
        assert_eq!(d, [piece(1, 65535, 30)]);
        // Expired pieces are gone; a shorter answer over a longer piece changes nothing.
        let expired = [Piece { lo: 1, hi: 5, until: now }];
        assert_eq!(merge_pieces(&expired, &[(3, 4)], at(30), now), [piece(3, 4, 30)]);
        assert_eq!(merge_pieces(&long, &[(9000, 9000)], at(30), now), long);
    }

    #[test]
    fn a_flow_counts_once_while_it_retransmits() {
        let mut a = Audit::default();
        let syn = (6, Some(40000), Ipv4Addr::new(198, 51, 100, 20), Some(80), true);
        assert!(a.new_flow(syn, 1_000));
        assert!(!a.new_flow(syn, 2_000), "the SYN sent again after a second");
        assert!(!a.new_flow(syn, 64_000));
        assert!(a.new_flow((6, Some(40001), syn.2, syn.3, true), 2_000), "another source port: another connection");
        assert!(a.new_flow((6, Some(40000), syn.2, syn.3, false), 2_000), "another verdict");
        assert!(a.new_flow(syn, 1_000 + FLOW_MEMORY_MS), "the port reused much later");
    }

    #[test]
    fn audit_files_give_back_the_newest_events_and_count_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut text = String::new();
        for n in 0..(AUDIT_CAPACITY as u64 + 10) {
            text.push_str(&serde_json::to_string(&event(n)).unwrap());
            text.push('\n');
        }
        text.push_str("{\"time_ms\": 1, \"ki"); // torn by a daemon killed while writing
        std::fs::write(&path, text).unwrap();
        let a = read_audit_file(&path);
        assert_eq!(a.written, AUDIT_CAPACITY + 11);
        assert_eq!(a.dropped, 11);
        assert_eq!(a.events.len(), AUDIT_CAPACITY - 1);
        assert_eq!(a.events.back().unwrap().time_ms, AUDIT_CAPACITY as u64 + 9);
        assert_eq!(read_audit_file(&dir.path().join("missing.jsonl")).events.len(), 0);
    }
}
