//! `agentbox-bench`: measures create → exec `echo` → destroy, one at a time (latency) and
//! with N at once (throughput), through the API, through the CLI, and for peers (bwrap,
//! crun) on the same root filesystem, in the same run. Prints a markdown table and writes
//! JSON. See docs/performance.md for the method. `agentbox-bench net` is the network
//! benchmark (scripts/bench-net), `agentbox-bench dns-server` its DNS server (see net.rs),
//! `agentbox-bench snap` the snapshot, fork and pause/resume benchmark (scripts/bench-snap,
//! snap.rs). The `pool` subject (issue 5) runs the API cycle against a warm pool (pool.rs).
#![forbid(unsafe_code)]

mod net;
mod peers;
mod pool;
mod snap;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abx_client::{Client, CreateSandbox, ExecRequest};
use anyhow::{Context, bail};
use clap::Parser;

use stats::{Report, Summary};

#[derive(Debug, Parser)]
#[command(name = "agentbox-bench", args_conflicts_with_subcommands = true)]
struct Args {
    /// Another benchmark instead of the sandbox cycles (default: the sandbox cycles).
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Daemon address.
    #[arg(long, env = "AGENTBOX_HOST", default_value = "unix:/run/agentbox/agentbox.sock")]
    host: String,
    /// Template for agentbox sandboxes; its root filesystem is also given to the peers.
    #[arg(long, default_value = "mini")]
    template: String,
    /// Sequential iterations per subject.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Concurrent workers for the throughput runs.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Cycles per throughput run.
    #[arg(long, default_value_t = 500)]
    total: usize,
    /// The agentbox CLI binary (for the CLI subject).
    #[arg(long, default_value = "agentbox")]
    cli: PathBuf,
    /// Subjects to run: api (create, exec, destroy: three requests), run (the one-request
    /// `POST /v1/run`), cli (`agentbox run`), pool (the api cycle against a warm pool of the
    /// template: every create is a claim), bwrap, crun. They run in this order whatever the
    /// order given; the pool exists only while `pool` runs.
    #[arg(long, value_delimiter = ',', default_value = "api,run,cli,pool,bwrap,crun")]
    subjects: Vec<String>,
    /// Pool subject: sandboxes the pool keeps ready at least (default: --concurrency, at
    /// most --pool-max).
    #[arg(long)]
    pool_min: Option<u32>,
    /// Pool subject: sandboxes the pool keeps ready at most (at most the daemon's
    /// --uid-slots).
    #[arg(long, default_value_t = 100)]
    pool_max: u32,
    /// Pool subject: the offered rate of the paced phase, claims per second spread over
    /// --concurrency clients on a fixed schedule (each claim is destroyed at once).
    #[arg(long, default_value_t = 500.0)]
    claim_rate: f64,
    /// Pool subject: claims of the paced phase (at --claim-rate; 2500 is five seconds).
    #[arg(long, default_value_t = 2500)]
    claim_total: usize,
    /// Pool subject: the rate of the paced one-client phase, whole cycles (claim, exec,
    /// destroy) per second on a fixed schedule: a claim's latency while the pool keeps up.
    #[arg(long, default_value_t = 100.0)]
    cycle_rate: f64,
    /// Host directory with the template's root filesystem (for peers); default: asked from
    /// the daemon (its state root + the template's single layer).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

// Modes other than the sandbox cycles (a `//` comment, as in net.rs).
#[derive(Debug, clap::Subcommand)]
enum Mode {
    #[command(flatten)]
    Net(net::Mode),
    /// The snapshot, fork and pause/resume benchmark (see scripts/bench-snap).
    Snap(Box<snap::SnapArgs>),
}

/// Creates a sandbox of `template` with the daemon's defaults; its id.
async fn create(client: &Client, template: &str) -> anyhow::Result<String> {
    let sb = client
        .create_sandbox(&CreateSandbox { template: Some(template.into()), ..Default::default() })
        .await
        .context("create")?;
    Ok(sb.id)
}

/// One create → exec echo → destroy cycle through the API.
async fn api_cycle(client: &Client, template: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let id = create(client, template).await?;
    let req = ExecRequest { cmd: vec!["echo".into(), "hi".into()], ..Default::default() };
    let created = t.elapsed();
    let out = client.exec(&id, &req).await.context("exec")?.collect().await?;
    if out.stdout != b"hi\n" || out.status.code != Some(0) {
        bail!("unexpected output {:?} status {:?}", String::from_utf8_lossy(&out.stdout), out.status);
    }
    let executed = t.elapsed();
    client.delete_sandbox(&id, true).await.context("destroy")?;
    if std::env::var_os("ABX_BENCH_PHASES").is_some() {
        eprintln!("phases: create {created:?} exec {:?} destroy {:?}", executed - created, t.elapsed() - executed);
    }
    Ok(t.elapsed())
}

/// One claim: a create (from the template's pool, when it has one ready) and its destroy;
/// the time of the create.
async fn claim_cycle(client: &Client, template: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let id = create(client, template).await?;
    let took = t.elapsed();
    client.delete_sandbox(&id, true).await.context("destroy")?;
    Ok(took)
}

/// One cycle through the one-shot endpoint (`POST /v1/run`: create, exec, destroy).
async fn run_once_cycle(client: &Client, template: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let req = abx_client::RunRequest {
        sandbox: CreateSandbox { template: Some(template.into()), ..Default::default() },
        exec: ExecRequest { cmd: vec!["echo".into(), "hi".into()], ..Default::default() },
    };
    let out = client.run_once(&req).await.context("run")?.collect().await?;
    if out.stdout != b"hi\n" || out.status.code != Some(0) {
        bail!("unexpected output {:?} status {:?}", String::from_utf8_lossy(&out.stdout), out.status);
    }
    Ok(t.elapsed())
}

/// One cycle through the CLI (`agentbox run`).
async fn cli_cycle(cli: &PathBuf, host: &str, template: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = tokio::process::Command::new(cli)
        .args(["--host", host, "run", "-T", template, "--", "echo", "hi"])
        .output()
        .await
        .with_context(|| format!("run {}", cli.display()))?;
    if !out.status.success() || out.stdout != b"hi\n" {
        bail!("agentbox run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed())
}

/// Every subject, in the order they run.
const SUBJECTS: [&str; 6] = ["api", "run", "cli", "pool", "bwrap", "crun"];

type CycleFn = Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, anyhow::Result<Duration>> + Send + Sync>;

/// Time given to the work a run leaves in the background (the cleanup after destroys)
/// before its CPU time is read.
const SETTLE: Duration = Duration::from_millis(300);

async fn warm_up(n: usize, f: &CycleFn) -> anyhow::Result<()> {
    for _ in 0..n.min(10) {
        f().await?;
    }
    Ok(())
}

async fn sequential(name: &str, n: usize, f: &CycleFn) -> anyhow::Result<Summary> {
    let mut lat = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        lat.push(f().await?);
    }
    Ok(Summary::new(name, "sequential", 1, lat, t.elapsed()))
}

async fn concurrent(name: &str, total: usize, workers: usize, f: &CycleFn) -> anyhow::Result<Summary> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let next = next.clone();
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                lat.push(f().await?);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        lat.extend(t.await??);
    }
    Ok(Summary::new(name, "concurrent", workers, lat, t.elapsed()))
}

/// What a paced run measured: the latencies and how late cycles started.
struct Paced {
    summary: Summary,
    /// Cycles that started more than [`LATE`] after their place in the schedule (every
    /// client was still busy with an earlier one).
    late: usize,
    /// The largest delay of a start behind the schedule.
    max_lag: Duration,
}

/// A start more than this behind the schedule counts as late.
const LATE: Duration = Duration::from_millis(5);

/// `total` cycles offered at `rate` per second: cycle k is due at k / `rate` seconds from
/// the start, and the first of `workers` clients free at that moment runs it (an open
/// loop: a slow cycle does not slow the schedule, it makes the next ones late).
async fn paced(name: &str, total: usize, workers: usize, rate: f64, f: &CycleFn) -> anyhow::Result<Paced> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, f) = (next.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut lags) = (Vec::new(), Vec::new());
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(due).await;
                lags.push(tokio::time::Instant::now().saturating_duration_since(due));
                lat.push(f().await?);
            }
            Ok::<_, anyhow::Error>((lat, lags))
        }));
    }
    let (mut lat, mut lags) = (Vec::with_capacity(total), Vec::with_capacity(total));
    for t in tasks {
        let (l, g) = t.await??;
        lat.extend(l);
        lags.extend(g);
    }
    let summary = Summary::new(name, &format!("paced, {rate:.0}/s offered"), workers, lat, t0.elapsed());
    let late = lags.iter().filter(|d| **d > LATE).count();
    let max_lag = lags.into_iter().max().unwrap_or_default();
    Ok(Paced { summary, late, max_lag })
}

async fn rootfs_of(client: &Client, template: &str) -> anyhow::Result<PathBuf> {
    let sys = client.system().await?;
    let t = client.template(template).await?;
    let [layer] = t.layers.as_slice() else {
        bail!("template {template} has {} layers; pass --rootfs", t.layers.len())
    };
    Ok(PathBuf::from(sys.root).join("layers").join(layer))
}

fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    match a.mode.take() {
        Some(Mode::Net(mode)) => return net::main(mode),
        Some(Mode::Snap(args)) => return snap::main(*args),
        None => {}
    }
    if a.subjects.iter().any(|s| s == "crun") {
        // Before any thread exists: crun refuses hybrid cgroup hosts, so it runs in a private
        // mount namespace of this process where the controller-less cgroup2 mount is gone.
        peers::hide_cgroup2()?;
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(a))
}

async fn run(a: Args) -> anyhow::Result<()> {
    let client = Client::new(&a.host)?;
    let mut report = Report::default();
    let has = |s: &str| a.subjects.iter().any(|x| x == s);
    if !(a.claim_rate > 0.0 && a.claim_rate.is_finite()) {
        bail!("--claim-rate must be a positive number of claims per second, got {}", a.claim_rate);
    }
    if !(a.cycle_rate > 0.0 && a.cycle_rate.is_finite()) {
        bail!("--cycle-rate must be a positive number of cycles per second, got {}", a.cycle_rate);
    }
    if let Some(s) = a.subjects.iter().find(|s| !SUBJECTS.contains(&s.as_str())) {
        bail!("unknown subject {s} (known: {})", SUBJECTS.join(", "));
    }
    // Every create of the subjects before `pool` must be cold.
    if client.pool(&a.template).await.is_ok() {
        eprintln!("removing the pool of {} that exists already", a.template);
        client.delete_pool(&a.template).await.context("removing the existing pool")?;
    }
    let mut subjects: Vec<(&str, String, CycleFn)> = Vec::new();
    let api = {
        let (c, t) = (client.clone(), a.template.clone());
        Arc::new(move || {
            let (c, t) = (c.clone(), t.clone());
            Box::pin(async move { api_cycle(&c, &t).await }) as futures_util::future::BoxFuture<'static, _>
        }) as CycleFn
    };
    if has("api") {
        subjects.push(("api", "agentbox (API)".into(), api.clone()));
    }
    // Also the pool subject's one-request phases.
    let run_once: CycleFn = {
        let (c, t) = (client.clone(), a.template.clone());
        Arc::new(move || {
            let (c, t) = (c.clone(), t.clone());
            Box::pin(async move { run_once_cycle(&c, &t).await })
        })
    };
    if has("run") {
        subjects.push(("run", "agentbox (API, one request)".into(), run_once.clone()));
    }
    if has("cli") {
        let (cli, host, t) = (a.cli.clone(), a.host.clone(), a.template.clone());
        subjects.push((
            "cli",
            "agentbox (CLI)".into(),
            Arc::new(move || {
                let (cli, host, t) = (cli.clone(), host.clone(), t.clone());
                Box::pin(async move { cli_cycle(&cli, &host, &t).await })
            }),
        ));
    }
    if has("pool") {
        subjects.push(("pool", "agentbox (API, warm pool)".into(), api));
    }
    let claim: CycleFn = {
        let (c, t) = (client.clone(), a.template.clone());
        Arc::new(move || {
            let (c, t) = (c.clone(), t.clone());
            Box::pin(async move { claim_cycle(&c, &t).await })
        })
    };
    if has("bwrap") || has("crun") {
        let rootfs = match &a.rootfs {
            Some(r) => r.clone(),
            None => rootfs_of(&client, &a.template).await?,
        };
        if has("bwrap") {
            subjects.push(("bwrap", "bwrap --unshare-all".into(), peers::bwrap(rootfs.clone())?));
        }
        if has("crun") {
            subjects.push(("crun", "crun run".into(), peers::crun(rootfs.clone())?));
        }
    }
    for (key, name, f) in &subjects {
        if *key == "pool" {
            let max = a.pool_max;
            let min = a.pool_min.unwrap_or(a.concurrency.try_into().unwrap_or(u32::MAX)).min(max);
            let sizes = pool::Sizes {
                iterations: a.iterations,
                total: a.total,
                workers: a.concurrency,
                claim_rate: a.claim_rate,
                claim_total: a.claim_total,
                cycle_rate: a.cycle_rate,
            };
            let fs = (f, &claim, &run_once);
            report.pool = Some(pool::bench(&client, &a.template, (min, max), sizes, name, fs, &mut report).await?);
            continue;
        }
        eprintln!("{name}: {} sequential cycles", a.iterations);
        warm_up(a.iterations, f).await?;
        let cpu = stats::cpu_mark();
        let s = sequential(name, a.iterations, f).await?;
        tokio::time::sleep(SETTLE).await;
        report.push(s.with_cpu(cpu));
        eprintln!("{name}: {} cycles, {} at once", a.total, a.concurrency);
        let cpu = stats::cpu_mark();
        let s = concurrent(name, a.total, a.concurrency, f).await?;
        tokio::time::sleep(SETTLE).await;
        report.push(s.with_cpu(cpu));
    }
    println!("{}", report.markdown());
    if let Some(p) = &report.pool {
        println!("{}", p.markdown());
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?).with_context(|| format!("write {}", p.display()))?;
    }
    peers::cleanup();
    Ok(())
}
