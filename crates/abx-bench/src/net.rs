//! The network benchmark (`agentbox-bench net`, run by `scripts/bench-net`) and the
//! authoritative DNS server it resolves against (`agentbox-bench dns-server`).
//!
//! `net` talks to two daemons started by the script in the same network namespace: one
//! with `--subnet none` (loopback-only sandboxes) and one with networking, whose uplink
//! leads to a private "internet" namespace holding the DNS server and a TCP sink
//! (`abx-probe tcp-sink`). It measures, in one run:
//!
//! 1. what networking adds to create → exec `true` → destroy (sequential), with the
//!    default policy (none) and with an `allow` policy given at create;
//! 2. the latency of `PUT /v1/sandboxes/{id}/network`, alternating two allow policies
//!    (and, for reference, re-sending the current one, which runs no nft);
//! 3. A queries from inside a sandbox to the DNS proxy (its resolver) against the same
//!    queries sent straight to the upstream server (`abx-probe dns-bench`), cache warm;
//! 4. TCP throughput from inside a sandbox to the sink against the same transfer from a
//!    process in the daemon's namespace (`abx-probe tcp-send`).
//!
//! The configurations of (1) are measured in alternating blocks, so that slow drift of
//! the machine (other work, page cache, the VM's neighbours) hits all of them alike.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abx_client::{Client, CreateSandbox, ExecRequest, NetMode, NetworkPolicy};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::Value;

use crate::stats::verdict;

use crate::stats::Summary;

// Modes of `agentbox-bench` other than the sandbox-cycle benchmark (a `//` comment: clap
// would make a doc comment the program's description).
#[derive(Debug, Subcommand)]
pub enum Mode {
    /// The network benchmark against two daemons (see scripts/bench-net).
    Net(Box<NetArgs>),
    /// An authoritative DNS server for the zone `test.` (allowed.test, other.test), the
    /// upstream of the network benchmark. Serves UDP and TCP until SIGTERM or SIGINT.
    DnsServer(DnsServerArgs),
    /// Runs a command (a daemon) as a child in a process group of its own, adopting as
    /// subreaper whatever it leaves behind (the daemon's spawner, which outlives it).
    /// SIGTERM is passed on to the command; SIGINT is ignored (a Ctrl-C in the terminal
    /// must not stop the daemon before its sandboxes are removed). Exits with the
    /// command's status once the command and every adopted process have been reaped (or
    /// the wait for the latter timed out).
    Reap(ReapArgs),
}

#[derive(Debug, Args)]
pub struct NetArgs {
    /// Daemon started with `--subnet none` (loopback-only sandboxes).
    #[arg(long)]
    plain: String,
    /// Daemon with networking, its uplink leading to the benchmark's internet.
    #[arg(long)]
    net: String,
    /// Template of the sandboxes (busybox `mini` is enough).
    #[arg(long, default_value = "mini")]
    template: String,
    /// Static abx-probe binary, copied into sandboxes and run in the daemons' namespace.
    #[arg(long)]
    probe: PathBuf,
    /// Named network namespace of the daemons (where the host-side transfer runs).
    #[arg(long)]
    netns: String,
    /// The upstream DNS server (the networked daemon's --dns-upstream).
    #[arg(long, default_value = "198.51.100.53:53")]
    dns: SocketAddr,
    /// A name the upstream answers with an A record.
    #[arg(long, default_value = "allowed.test")]
    name: String,
    /// The TCP sink (abx-probe tcp-sink) in the internet.
    #[arg(long, default_value = "198.51.100.80:5001")]
    sink: SocketAddr,
    /// Measured create → exec → destroy cycles per configuration.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Measured policy changes.
    #[arg(long, default_value_t = 200)]
    policy_changes: usize,
    /// DNS queries per run of dns-bench (5 alternating runs per path; single runs are bimodal here).
    #[arg(long, default_value_t = 1000)]
    dns_queries: u32,
    /// MiB per TCP transfer.
    #[arg(long, default_value_t = 1024)]
    tcp_megabytes: u64,
    /// Transfers per path (alternating; this VM's single transfers vary by up to 2x).
    #[arg(long, default_value_t = 7)]
    tcp_runs: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DnsServerArgs {
    /// Address to serve on, UDP and TCP.
    #[arg(long, default_value = "198.51.100.53:53")]
    bind: SocketAddr,
}

#[derive(Debug, Args)]
pub struct ReapArgs {
    /// Longest wait, in seconds, for adopted processes once the command has ended.
    #[arg(long, default_value_t = 30)]
    orphan_timeout: u64,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<std::ffi::OsString>,
}

pub fn main(mode: Mode) -> anyhow::Result<()> {
    match mode {
        Mode::Reap(a) => reap(a),
        Mode::Net(a) => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(net(*a)),
        Mode::DnsServer(a) => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(dns_server(a))
        }
    }
}

// --- the reaper ---

fn reap(a: ReapArgs) -> anyhow::Result<()> {
    use rustix::io::Errno;
    use rustix::process::{Pid, Signal, WaitOptions};
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::signal::unix::{SignalKind, signal};

    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).context("become a subreaper")?;
    // Signal handlers before the child exists, so no SIGTERM can kill us and orphan it.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut term, mut int) = {
        let _guard = rt.enter();
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
    };
    let child = std::process::Command::new(&a.cmd[0])
        .args(&a.cmd[1..])
        .process_group(0)
        .spawn()
        .with_context(|| format!("run {}", a.cmd[0].to_string_lossy()))?;
    let pid = Pid::from_child(&child);
    drop(child); // reaped below, with the orphans
    let ended = Arc::new(AtomicBool::new(false));
    let flag = ended.clone();
    std::thread::spawn(move || {
        rt.block_on(async {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => continue,
                }
                if !flag.load(Ordering::SeqCst) {
                    let _ = rustix::process::kill_process(pid, Signal::TERM);
                }
            }
        })
    });
    let mut code = None;
    let mut deadline = None;
    loop {
        // Blocking until the command ends (no polling while the benchmark runs), then
        // polling for the adopted processes until the deadline.
        let opts = if code.is_none() { WaitOptions::empty() } else { WaitOptions::NOHANG };
        match rustix::process::wait(opts) {
            Ok(Some((p, status))) => {
                if p == pid {
                    ended.store(true, Ordering::SeqCst);
                    code = Some(status.exit_status().unwrap_or_else(|| 128 + status.terminating_signal().unwrap_or(0)));
                    deadline = Some(Instant::now() + Duration::from_secs(a.orphan_timeout));
                }
                continue;
            }
            Ok(None) => {}
            Err(Errno::CHILD) => break,
            Err(Errno::INTR) => continue,
            Err(e) => bail!("wait: {e}"),
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            eprintln!("agentbox-bench reap: processes left by the command still run after {}s", a.orphan_timeout);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::process::exit(code.unwrap_or(1))
}

// --- the DNS server ---

/// allowed.test.
pub const ALLOWED_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// other.test.
pub const OTHER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// TTL of the records: long enough that the proxy's cache never expires during a run.
const RECORD_TTL: u32 = 3600;

fn test_zone() -> anyhow::Result<hickory_server::zone_handler::Catalog> {
    use hickory_server::proto::rr::rdata::{A, SOA};
    use hickory_server::proto::rr::{LowerName, Name, RData, Record};
    use hickory_server::store::in_memory::InMemoryZoneHandler;
    use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

    let origin = Name::from_str("test.")?;
    let mut zone: InMemoryZoneHandler = InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(Name::from_str("ns.test.")?, Name::from_str("hostmaster.test.")?, 1, 3600, 600, 86400, 60);
    let mut records = vec![Record::from_rdata(origin.clone(), RECORD_TTL, RData::SOA(soa))];
    for (name, addr) in [("allowed.test.", ALLOWED_ADDR), ("other.test.", OTHER_ADDR)] {
        records.push(Record::from_rdata(Name::from_str(name)?, RECORD_TTL, RData::A(A(addr))));
    }
    for r in records {
        if !zone.upsert_mut(r, 1) {
            bail!("the zone refused a record");
        }
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin), vec![Arc::new(zone)]);
    Ok(catalog)
}

async fn dns_server(a: DnsServerArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let udp = tokio::net::UdpSocket::bind(a.bind).await.with_context(|| format!("bind UDP {}", a.bind))?;
    let tcp = tokio::net::TcpListener::bind(a.bind).await.with_context(|| format!("bind TCP {}", a.bind))?;
    let mut server = hickory_server::Server::new(test_zone()?);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 16);
    println!("dns-server: serving zone test. on {}", a.bind);
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = server.block_until_done() => return r.context("DNS server"),
    }
    server.shutdown_gracefully().await.context("stop the DNS server")
}

// --- the benchmark ---

/// One create → exec `true` → destroy, with the time of each step.
#[derive(Debug, Clone, Copy)]
struct Cycle {
    total: Duration,
    create: Duration,
    exec: Duration,
    destroy: Duration,
}

async fn cycle(c: &Client, template: &str, network: &Option<NetworkPolicy>) -> anyhow::Result<Cycle> {
    let t = Instant::now();
    let req = CreateSandbox { template: Some(template.into()), network: network.clone(), ..Default::default() };
    let sb = c.create_sandbox(&req).await.context("create")?;
    let created = t.elapsed();
    let run = ExecRequest { cmd: vec!["true".into()], ..Default::default() };
    let out = match c.exec(&sb.id, &run).await {
        Ok(s) => s.collect().await,
        Err(e) => Err(e),
    };
    let executed = t.elapsed();
    let destroyed = c.delete_sandbox(&sb.id, true).await;
    let total = t.elapsed();
    let out = out.context("exec true")?;
    destroyed.context("destroy")?;
    if out.status.code != Some(0) {
        bail!("true exited with {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(Cycle { total, create: created, exec: executed - created, destroy: total - executed })
}

/// A create-cost configuration.
struct Config {
    name: &'static str,
    client: Client,
    network: Option<NetworkPolicy>,
}

/// Measured cycles per block, unmeasured ones before each block, and the pause between
/// blocks (for the previous configuration's background cleanup to finish).
const BLOCK: usize = 25;
const BLOCK_WARMUP: usize = 2;
const SETTLE: Duration = Duration::from_millis(50);
const WARMUP: usize = 10;

#[derive(Debug, Serialize)]
struct CreateCost {
    config: String,
    cycle: Summary,
    create_median_ms: f64,
    exec_median_ms: f64,
    destroy_median_ms: f64,
    /// Median and p95 of this configuration minus those of the first (no networking).
    median_delta_ms: f64,
    p95_delta_ms: f64,
}

fn median_ms(mut d: Vec<Duration>) -> f64 {
    d.sort();
    if d.is_empty() {
        return 0.0;
    }
    // Nearest rank, as in the cycle summaries.
    let idx = ((d.len() - 1) as f64 * 0.5).round() as usize;
    d[idx].as_secs_f64() * 1000.0
}

async fn create_cost(a: &NetArgs, configs: &[Config]) -> anyhow::Result<Vec<CreateCost>> {
    let n = a.iterations.max(1);
    for c in configs {
        eprintln!("create cost: warming up {}", c.name);
        for _ in 0..WARMUP {
            cycle(&c.client, &a.template, &c.network).await.with_context(|| c.name)?;
        }
    }
    let mut samples: Vec<Vec<Cycle>> = configs.iter().map(|_| Vec::with_capacity(n)).collect();
    let mut walls = vec![Duration::ZERO; configs.len()];
    let mut round = 0;
    while samples.iter().any(|s| s.len() < n) {
        for k in 0..configs.len() {
            // Rotate the order, so no configuration always follows the same other one.
            let i = (k + round) % configs.len();
            let c = &configs[i];
            let want = BLOCK.min(n - samples[i].len());
            if want == 0 {
                continue;
            }
            tokio::time::sleep(SETTLE).await;
            for _ in 0..BLOCK_WARMUP {
                cycle(&c.client, &a.template, &c.network).await.with_context(|| c.name)?;
            }
            let t = Instant::now();
            for _ in 0..want {
                samples[i].push(cycle(&c.client, &a.template, &c.network).await.with_context(|| c.name)?);
            }
            walls[i] += t.elapsed();
        }
        round += 1;
        eprintln!("create cost: {} of {n} cycles per configuration", samples.iter().map(Vec::len).min().unwrap_or(0));
    }
    let mut out: Vec<CreateCost> = Vec::new();
    for ((c, s), wall) in configs.iter().zip(samples).zip(walls) {
        let summary = Summary::new(c.name, "sequential", 1, s.iter().map(|x| x.total).collect(), wall);
        let (median_delta_ms, p95_delta_ms) = match out.first() {
            Some(base) => (summary.median_ms - base.cycle.median_ms, summary.p95_ms - base.cycle.p95_ms),
            None => (0.0, 0.0),
        };
        out.push(CreateCost {
            config: c.name.into(),
            create_median_ms: median_ms(s.iter().map(|x| x.create).collect()),
            exec_median_ms: median_ms(s.iter().map(|x| x.exec).collect()),
            destroy_median_ms: median_ms(s.iter().map(|x| x.destroy).collect()),
            cycle: summary,
            median_delta_ms,
            p95_delta_ms,
        });
    }
    Ok(out)
}

fn allow(rules: &[&str]) -> NetworkPolicy {
    NetworkPolicy { mode: NetMode::Allow, allow: rules.iter().map(|r| r.to_string()).collect() }
}

/// A running sandbox of the networked daemon with `policy` and abx-probe installed.
async fn probe_sandbox(c: &Client, a: &NetArgs, policy: NetworkPolicy) -> anyhow::Result<String> {
    let req = CreateSandbox { template: Some(a.template.clone()), network: Some(policy), ..Default::default() };
    let id = c.create_sandbox(&req).await.context("create")?.id;
    let bytes = std::fs::read(&a.probe).with_context(|| format!("read {}", a.probe.display()))?;
    c.with_file_user("root")
        .write_file(&id, "/usr/bin/abx-probe", bytes, Some(0o755))
        .await
        .context("copy abx-probe")?;
    Ok(id)
}

/// `abx-probe ARGS` in sandbox `id`: its JSON, which must say `"ok":true`.
async fn probe_in(c: &Client, id: &str, args: &[String]) -> anyhow::Result<Value> {
    let mut cmd = vec!["abx-probe".to_string()];
    cmd.extend(args.iter().cloned());
    let out = c.exec(id, &ExecRequest { cmd, ..Default::default() }).await?.collect().await?;
    probe_json(&out.stdout, &out.stderr, args)
}

/// `abx-probe ARGS` in the daemons' network namespace.
async fn probe_on_host(a: &NetArgs, args: &[String]) -> anyhow::Result<Value> {
    let out = tokio::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", a.netns))
        .arg("--")
        .arg(&a.probe)
        .args(args)
        .output()
        .await
        .context("run nsenter")?;
    probe_json(&out.stdout, &out.stderr, args)
}

fn probe_json(stdout: &[u8], stderr: &[u8], args: &[String]) -> anyhow::Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let v: Value = serde_json::from_str(text.trim()).with_context(|| {
        format!("abx-probe {}: not JSON: {text} {}", args.join(" "), String::from_utf8_lossy(stderr))
    })?;
    if v["ok"] != true {
        bail!("abx-probe {}: {v} {}", args.join(" "), String::from_utf8_lossy(stderr));
    }
    Ok(v)
}

#[derive(Debug, Serialize)]
struct PolicyChange {
    /// Alternating between two different allow policies (each runs nft).
    change: Summary,
    /// Re-sending the policy in force (no nft: only the DNS-answer set is flushed).
    same: Summary,
}

async fn policy_change(c: &Client, a: &NetArgs) -> anyhow::Result<PolicyChange> {
    let policies = [allow(&[&a.name]), allow(&["other.test", "198.51.100.0/24:8000-8080/tcp"])];
    let id = c
        .create_sandbox(&CreateSandbox {
            template: Some(a.template.clone()),
            network: Some(policies[0].clone()),
            ..Default::default()
        })
        .await
        .context("create")?
        .id;
    let result = async {
        for i in 0..WARMUP {
            c.set_network(&id, &policies[(i + 1) % 2]).await?;
        }
        let n = a.policy_changes.max(1);
        let mut lat = Vec::with_capacity(n);
        let t = Instant::now();
        for i in 0..n {
            let s = Instant::now();
            c.set_network(&id, &policies[i % 2]).await.context("set_network")?;
            lat.push(s.elapsed());
        }
        let change = Summary::new("PUT network, the other policy", "sequential", 1, lat, t.elapsed());
        let current = &policies[(n - 1) % 2];
        let mut lat = Vec::with_capacity(n);
        let t = Instant::now();
        for _ in 0..n {
            let s = Instant::now();
            c.set_network(&id, current).await.context("set_network")?;
            lat.push(s.elapsed());
        }
        let same = Summary::new("PUT network, the same policy", "sequential", 1, lat, t.elapsed());
        anyhow::Ok(PolicyChange { change, same })
    }
    .await;
    let _ = c.delete_sandbox(&id, true).await;
    result
}

#[derive(Debug, Serialize)]
struct DnsRun {
    median_us: f64,
    p95_us: f64,
    mean_us: f64,
}

#[derive(Debug, Serialize)]
struct DnsPath {
    server: String,
    /// Median over the runs of each run's median and p95.
    median_us: f64,
    p95_us: f64,
    runs: Vec<DnsRun>,
}

#[derive(Debug, Serialize)]
struct Dns {
    name: String,
    queries_per_run: u32,
    proxy: DnsPath,
    direct: DnsPath,
    /// Proxy median minus direct median.
    median_delta_us: f64,
}

const DNS_RUNS: usize = 5;

fn middle(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The first `nameserver` of a resolv.conf.
fn nameserver(resolv: &str) -> Option<Ipv4Addr> {
    resolv.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver")).then(|| w.next()?.parse().ok()).flatten()
    })
}

async fn dns(c: &Client, a: &NetArgs) -> anyhow::Result<Dns> {
    let policy = allow(&[&a.name, &format!("{}/udp", a.dns)]);
    let id = probe_sandbox(c, a, policy).await?;
    let result = async {
        let resolv = String::from_utf8_lossy(&c.read_file(&id, "/etc/resolv.conf").await?).into_owned();
        let gateway = nameserver(&resolv).with_context(|| format!("no nameserver in resolv.conf: {resolv}"))?;
        let servers = [format!("{gateway}:53"), a.dns.to_string()];
        let bench =
            |server: &str, count: u32| vec!["dns-bench".into(), server.to_string(), a.name.clone(), count.to_string()];
        // The first query through the proxy misses its cache: warm both paths up.
        for s in &servers {
            probe_in(c, &id, &bench(s, 200)).await?;
        }
        let mut runs: [Vec<DnsRun>; 2] = [Vec::new(), Vec::new()];
        for r in 0..DNS_RUNS {
            for k in 0..2 {
                let i = (k + r) % 2;
                let v = probe_in(c, &id, &bench(&servers[i], a.dns_queries)).await?;
                let f = |key: &str| v[key].as_f64().unwrap_or(f64::NAN);
                runs[i].push(DnsRun { median_us: f("median_us"), p95_us: f("p95_us"), mean_us: f("mean_us") });
            }
        }
        let [proxy, direct] = runs.map(|runs| DnsPath {
            server: String::new(),
            median_us: middle(runs.iter().map(|r| r.median_us).collect()),
            p95_us: middle(runs.iter().map(|r| r.p95_us).collect()),
            runs,
        });
        let [ps, ds] = servers;
        let (proxy, direct) = (DnsPath { server: ps, ..proxy }, DnsPath { server: ds, ..direct });
        anyhow::Ok(Dns {
            name: a.name.clone(),
            queries_per_run: a.dns_queries,
            median_delta_us: proxy.median_us - direct.median_us,
            proxy,
            direct,
        })
    }
    .await;
    let _ = c.delete_sandbox(&id, true).await;
    result
}

#[derive(Debug, Serialize)]
struct Tcp {
    megabytes: u64,
    /// MiB/s of each transfer.
    host_runs: Vec<f64>,
    sandbox_runs: Vec<f64>,
    host_median: f64,
    sandbox_median: f64,
    /// Sandbox median / host median.
    ratio: f64,
    /// CPU time of the whole machine per GiB moved (medians over the runs; the process
    /// start or exec request around each transfer included).
    host_cpu: CpuPerGib,
    sandbox_cpu: CpuPerGib,
}

/// Milliseconds of CPU per GiB: everything but idle, and the part spent in softirqs
/// (where forwarding, netfilter and the veths' receive side run).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct CpuPerGib {
    busy_ms: f64,
    softirq_ms: f64,
}

/// /proc/stat counts in USER_HZ, which is 100 on Linux/x86.
const USER_HZ: f64 = 100.0;

/// (busy, softirq) ticks of all CPUs since boot, from /proc/stat.
pub(crate) fn cpu_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().next().filter(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal ...
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Ok((at(0) + at(1) + at(2) + at(5) + at(6), at(6)))
}

/// Runs one transfer, returning its rate and the machine's CPU per GiB during it.
async fn measured(
    gib: f64,
    transfer: impl std::future::Future<Output = anyhow::Result<Value>>,
) -> anyhow::Result<(f64, CpuPerGib)> {
    let before = cpu_ticks()?;
    let v = transfer.await?;
    let after = cpu_ticks()?;
    let rate = v["mbytes_per_s"].as_f64().context("no mbytes_per_s")?;
    let per_gib = |t: u64| t as f64 * 1000.0 / USER_HZ / gib;
    Ok((rate, CpuPerGib { busy_ms: per_gib(after.0 - before.0), softirq_ms: per_gib(after.1 - before.1) }))
}

fn middle_cpu(v: &[CpuPerGib]) -> CpuPerGib {
    CpuPerGib {
        busy_ms: middle(v.iter().map(|c| c.busy_ms).collect()),
        softirq_ms: middle(v.iter().map(|c| c.softirq_ms).collect()),
    }
}

async fn tcp(c: &Client, a: &NetArgs) -> anyhow::Result<Tcp> {
    let id = probe_sandbox(c, a, allow(&[&format!("{}/tcp", a.sink)])).await?;
    let result = async {
        let send = |mb: u64| vec!["tcp-send".to_string(), a.sink.to_string(), mb.to_string()];
        let gib = a.tcp_megabytes.max(1) as f64 / 1024.0;
        probe_on_host(a, &send(64)).await?;
        probe_in(c, &id, &send(64)).await?;
        let (mut host, mut sandbox) = (Vec::new(), Vec::new());
        let (mut host_cpu, mut sandbox_cpu) = (Vec::new(), Vec::new());
        for r in 0..a.tcp_runs.max(1) {
            for k in 0..2 {
                if (k + r) % 2 == 0 {
                    let (rate, cpu) = measured(gib, probe_on_host(a, &send(a.tcp_megabytes))).await?;
                    host.push(rate);
                    host_cpu.push(cpu);
                } else {
                    let (rate, cpu) = measured(gib, probe_in(c, &id, &send(a.tcp_megabytes))).await?;
                    sandbox.push(rate);
                    sandbox_cpu.push(cpu);
                }
            }
            eprintln!("tcp: run {}: host {:.0} MiB/s, sandbox {:.0} MiB/s", r + 1, host[r], sandbox[r]);
        }
        let (host_median, sandbox_median) = (middle(host.clone()), middle(sandbox.clone()));
        anyhow::Ok(Tcp {
            megabytes: a.tcp_megabytes,
            ratio: sandbox_median / host_median,
            host_runs: host,
            sandbox_runs: sandbox,
            host_median,
            sandbox_median,
            host_cpu: middle_cpu(&host_cpu),
            sandbox_cpu: middle_cpu(&sandbox_cpu),
        })
    }
    .await;
    let _ = c.delete_sandbox(&id, true).await;
    result
}

#[derive(Debug, Serialize)]
struct NetReport {
    create: Vec<CreateCost>,
    policy: PolicyChange,
    dns: Dns,
    tcp: Tcp,
}

/// Targets: a policy change in under 10 ms (median), DNS through the proxy less than 1 ms
/// slower than straight to the upstream (medians), sandbox TCP within 10% of the host's.
const POLICY_TARGET_MS: f64 = 10.0;
const DNS_TARGET_US: f64 = 1000.0;
const TCP_TARGET_RATIO: f64 = 0.9;

impl NetReport {
    fn markdown(&self) -> String {
        let mut o = String::new();
        let line = |o: &mut String, s: String| {
            o.push_str(&s);
            o.push('\n');
        };
        line(&mut o, "| # | measurement | subject | samples | median | p95 | difference / ratio | target |".into());
        line(&mut o, "|---|---|---|---|---|---|---|---|".into());
        for (i, c) in self.create.iter().enumerate() {
            let delta = if i == 0 {
                "(baseline)".to_string()
            } else {
                format!("{:+.2} ms median, {:+.2} ms p95", c.median_delta_ms, c.p95_delta_ms)
            };
            line(
                &mut o,
                format!(
                    "| 1 | create → exec `true` → destroy | {} | {} | {:.2} ms | {:.2} ms | {delta} | — |",
                    c.config, c.cycle.cycles, c.cycle.median_ms, c.cycle.p95_ms
                ),
            );
        }
        let p = &self.policy;
        for (s, target) in [
            (&p.change, format!("median < {POLICY_TARGET_MS} ms: {}", verdict(p.change.median_ms < POLICY_TARGET_MS))),
            (&p.same, "(reference: no nft run)".into()),
        ] {
            line(
                &mut o,
                format!(
                    "| 2 | policy change (`PUT …/network`) | {} | {} | {:.2} ms | {:.2} ms | | {target} |",
                    s.subject, s.cycles, s.median_ms, s.p95_ms
                ),
            );
        }
        let d = &self.dns;
        let n = d.queries_per_run as usize * DNS_RUNS;
        line(
            &mut o,
            format!(
                "| 3 | DNS A `{}` from a sandbox | through the proxy ({}) | {n} | {:.0} µs | {:.0} µs | {:+.0} µs median | < {DNS_TARGET_US:.0} µs: {} |",
                d.name,
                d.proxy.server,
                d.proxy.median_us,
                d.proxy.p95_us,
                d.median_delta_us,
                verdict(d.median_delta_us < DNS_TARGET_US)
            ),
        );
        line(
            &mut o,
            format!(
                "| 3 | DNS A `{}` from a sandbox | straight to the upstream ({}) | {n} | {:.0} µs | {:.0} µs | (baseline) | |",
                d.name, d.direct.server, d.direct.median_us, d.direct.p95_us
            ),
        );
        let t = &self.tcp;
        let runs = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        line(
            &mut o,
            format!(
                "| 4 | TCP {} MiB to the sink | from the daemon's namespace | {} | {:.0} MiB/s | | runs: {} | |",
                t.megabytes,
                t.host_runs.len(),
                t.host_median,
                runs(&t.host_runs)
            ),
        );
        line(
            &mut o,
            format!(
                "| 4 | TCP {} MiB to the sink | from a sandbox | {} | {:.0} MiB/s | | ratio {:.3}; runs: {} | ≥ {TCP_TARGET_RATIO}: {} |",
                t.megabytes,
                t.sandbox_runs.len(),
                t.sandbox_median,
                t.ratio,
                runs(&t.sandbox_runs),
                verdict(t.ratio >= TCP_TARGET_RATIO)
            ),
        );
        o.push('\n');
        line(&mut o, "TCP: CPU time of the whole machine per GiB moved (medians over the runs, ms):".into());
        o.push('\n');
        line(&mut o, "| path | busy | of it softirq |".into());
        line(&mut o, "|---|---|---|".into());
        for (path, cpu) in [("from the daemon's namespace", t.host_cpu), ("from a sandbox", t.sandbox_cpu)] {
            line(&mut o, format!("| {path} | {:.0} | {:.0} |", cpu.busy_ms, cpu.softirq_ms));
        }
        o.push('\n');
        line(&mut o, "Create cost by step (medians, ms):".into());
        o.push('\n');
        line(&mut o, "| configuration | create | exec `true` | destroy | cycle | cycle p95 | cycles/s |".into());
        line(&mut o, "|---|---|---|---|---|---|---|".into());
        for c in &self.create {
            line(
                &mut o,
                format!(
                    "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
                    c.config,
                    c.create_median_ms,
                    c.exec_median_ms,
                    c.destroy_median_ms,
                    c.cycle.median_ms,
                    c.cycle.p95_ms,
                    c.cycle.per_second
                ),
            );
        }
        o
    }
}

async fn net(a: NetArgs) -> anyhow::Result<()> {
    let plain = Client::new(&a.plain)?;
    let netc = Client::new(&a.net)?;
    plain.system().await.context("the --plain daemon")?;
    netc.system().await.context("the --net daemon")?;
    let configs = [
        Config { name: "no networking (--subnet none)", client: plain.clone(), network: None },
        Config { name: "networking, policy none", client: netc.clone(), network: None },
        Config { name: "networking, allow at create", client: netc.clone(), network: Some(allow(&[&a.name])) },
    ];
    eprintln!("1/4 create cost: {} cycles per configuration, in blocks of {BLOCK}", a.iterations);
    let create = create_cost(&a, &configs).await?;
    eprintln!("2/4 policy changes: {}", a.policy_changes);
    let policy = policy_change(&netc, &a).await?;
    eprintln!("3/4 DNS: {DNS_RUNS} runs of {} queries per path", a.dns_queries);
    let dns = dns(&netc, &a).await?;
    eprintln!("4/4 TCP: {} runs of {} MiB per path", a.tcp_runs, a.tcp_megabytes);
    let tcp = tcp(&netc, &a).await?;
    let report = NetReport { create, policy, dns, tcp };
    println!("{}", report.markdown());
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_nameserver() {
        let text = "# generated\nsearch x\nnameserver 10.213.0.1\noptions timeout:2\nnameserver 1.1.1.1\n";
        assert_eq!(nameserver(text), Some(Ipv4Addr::new(10, 213, 0, 1)));
        assert_eq!(nameserver("options x\n"), None);
    }

    #[test]
    fn middles() {
        assert_eq!(middle(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(middle(vec![]), 0.0);
        assert_eq!(median_ms(vec![Duration::from_millis(3), Duration::from_millis(1), Duration::from_millis(2)]), 2.0);
    }

    #[test]
    fn reads_cpu_ticks() {
        let (busy, softirq) = cpu_ticks().unwrap();
        assert!(busy > 0 && softirq <= busy);
    }

    #[test]
    fn zone_builds() {
        test_zone().unwrap();
    }
}
