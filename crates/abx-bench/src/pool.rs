//! The `pool` subject (issue 5): the `api` cycle (create → exec `echo hi` → destroy)
//! against a template with a warm pool, so that every create is a claim of a ready sandbox.
//!
//! Before its cycles it sets the pool (`PUT /v1/pools/{template}`) and waits until it holds
//! `min` ready sandboxes; it measures a plain fork+exec of `/bin/echo hi` on the host as the
//! reference of the latency target (back to back, and paced like the one-client phase);
//! each phase (sequential, back to back; one client paced at `--cycle-rate` cycles per
//! second, the latency of a claim while the pool keeps up, which is what the latency target
//! is judged on: back to back, every claim's replacement boots during the next cycles, so
//! that phase runs at the machine's capacity rather than at a claim's latency; a burst of
//! `min` cycles, what claims alone sustain; then `--total` at `--concurrency`, as many as
//! the clients manage; then the paced phase: `--claim-total` claims, each destroyed at
//! once, offered at `--claim-rate` per second by `--concurrency` clients on a fixed
//! schedule, which is what "N claims/s sustained while the pool keeps up" means: a
//! closed loop of clients that claim as fast as they can always outruns a pool, since a
//! boot does more than a claim) starts with the pool holding at least `min` again, and
//! reports the pool's hits and misses across it (`GET /v1/pools/{template}` before and
//! after), the lowest `ready` seen while it ran (sampled every 20 ms) and the daemon's own claim time (the
//! `agentbox_pool_claim_seconds` histogram of `GET /metrics`, before and after).
//! After those phases the same claim, exec and destroy go through the one-request
//! endpoint (`POST /v1/run`, what `agentbox run` uses for a one-shot command), back to
//! back and paced like the one-client phase: one HTTP round trip instead of three.
//! Afterwards it reports the pool's counters and removes the pool, so that no other
//! subject meets it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use abx_client::{Client, Host, Pool};
use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stats::{Report, Summary, cpu_mark, ms, verdict};
use crate::{CycleFn, SETTLE, concurrent, paced, sequential, warm_up};

/// Issue 5's targets: claim + exec echo + destroy under 2 ms median ("about twice a plain
/// fork+exec"; judged on the one-client paced phase, with the pool keeping up), 500
/// claims/s with 50 concurrent clients while the pool keeps up.
pub const CLAIM_TARGET_MS: f64 = 2.0;
pub const FORK_EXEC_RATIO: f64 = 2.0;
pub const RATE_TARGET: f64 = 500.0;
/// The clients the rate target asks for.
pub const CLIENTS_TARGET: usize = 50;
/// What "the pool keeps up" is taken to mean: at least this share of creates were claims.
pub const HIT_RATE_TARGET: f64 = 0.99;
/// How long the pool may take to hold `min` ready sandboxes.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// What the pool subject measured besides its rows in the main table.
#[derive(Debug, Serialize)]
pub struct PoolReport {
    pub template: String,
    pub min: u32,
    pub max: u32,
    /// From `PUT /v1/pools/{template}` to `min` ready sandboxes.
    pub fill_ms: f64,
    /// Plain fork+exec of `/bin/echo hi` on the host (`std::process::Command`, output read).
    pub fork_exec_median_ms: f64,
    pub fork_exec_p95_ms: f64,
    /// The same fork+exec on the one-client phase's schedule (`--cycle-rate`).
    pub fork_exec_paced_median_ms: f64,
    /// Median of the one-client paced cycle / median of the fork+exec on the same schedule.
    pub ratio_to_fork_exec: f64,
    /// Median of the one-client paced cycle / median of the back-to-back fork+exec.
    pub ratio_to_back_to_back_fork_exec: f64,
    /// Median of the back-to-back cycle / median of the back-to-back fork+exec.
    pub ratio_back_to_back: f64,
    pub phases: Vec<Phase>,
    /// The pool's state and counters after the cycles (`GET /v1/pools/{template}`).
    pub end: Pool,
    /// Mean of every cold create of the template in this daemon so far (the subjects
    /// before, and pool misses), from `/metrics` (`agentbox_create_cold_seconds`).
    pub cold_create_ms_mean: Option<f64>,
}

/// How many cycles the phases run, and how the paced phase offers its claims.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub iterations: usize,
    pub total: usize,
    pub workers: usize,
    pub claim_rate: f64,
    pub claim_total: usize,
    /// Whole cycles per second of the one-client paced phase.
    pub cycle_rate: f64,
}

/// How a phase's cycles are driven.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// One at a time.
    Sequential,
    /// This many clients, each starting its next cycle as soon as one ends.
    Closed(usize),
    /// This many clients taking cycles from a schedule of this many per second.
    Paced(usize, f64),
}

/// One phase of the pool subject.
#[derive(Debug, Serialize)]
pub struct Phase {
    pub mode: String,
    pub concurrency: usize,
    pub cycles: usize,
    pub median_ms: f64,
    pub p95_ms: f64,
    /// Cycles (claims) per second over the phase.
    pub per_second: f64,
    /// Sandboxes ready when the phase started.
    pub ready_at_start: u32,
    /// Lowest `ready` seen while the phase ran.
    pub lowest_ready: u32,
    /// Highest `target` seen while the phase ran.
    pub highest_target: u32,
    /// Pool hits and misses across the phase.
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    /// The daemon's claim time across the phase: mean, and the upper bound of the
    /// histogram bucket holding the median.
    pub daemon_claim_ms_mean: Option<f64>,
    pub daemon_claim_ms_median_le: Option<f64>,
    /// Paced phase: the offered rate, the cycles that started more than 5 ms behind the
    /// schedule, and the largest delay.
    pub offered_per_second: Option<f64>,
    pub late: Option<usize>,
    pub max_lag_ms: Option<f64>,
}

/// Runs the pool subject; its rows go to `report`. The pool is removed afterwards, also
/// when the subject fails.
pub async fn bench(
    client: &Client,
    template: &str,
    (min, max): (u32, u32),
    sizes: Sizes,
    name: &str,
    fs: (&CycleFn, &CycleFn, &CycleFn),
    report: &mut Report,
) -> anyhow::Result<PoolReport> {
    let res = bench_inner(client, template, (min, max), sizes, name, fs, report).await;
    // Always removed; its failure matters only when nothing failed before.
    let removed = client.delete_pool(template).await;
    if let Err(e) = removed
        && res.is_ok()
    {
        return Err(e).context("removing the pool");
    }
    res
}

async fn bench_inner(
    client: &Client,
    template: &str,
    (min, max): (u32, u32),
    sizes: Sizes,
    name: &str,
    (f, claim, run): (&CycleFn, &CycleFn, &CycleFn),
    report: &mut Report,
) -> anyhow::Result<PoolReport> {
    let Sizes { iterations, total, workers, claim_rate, claim_total, cycle_rate } = sizes;
    let t = Instant::now();
    client.set_pool(template, min, max).await.context("setting the pool")?;
    wait_ready(client, template, min).await?;
    let fill = t.elapsed();
    eprintln!("{name}: pool of {template} holds {min} ready after {:.0} ms", ms(fill));

    eprintln!("fork+exec /bin/echo hi (host): {iterations} sequential");
    let fe = tokio::task::spawn_blocking(move || {
        fork_exec(iterations, None).map(|(lat, wall, cpu)| {
            Summary::new("fork+exec `/bin/echo hi` (host, reference)", "sequential", 1, lat, wall).with_cpu(cpu)
        })
    })
    .await??;
    let (fe_median, fe_p95) = (fe.median_ms, fe.p95_ms);
    report.push(fe);
    eprintln!("fork+exec /bin/echo hi (host): {iterations} at {cycle_rate}/s");
    let fe_paced = tokio::task::spawn_blocking(move || {
        fork_exec(iterations, Some(cycle_rate)).map(|(lat, wall, cpu)| {
            let mode = format!("paced, {cycle_rate:.0}/s offered");
            Summary::new("fork+exec `/bin/echo hi` (host, reference)", &mode, 1, lat, wall).with_cpu(cpu)
        })
    })
    .await??;
    let fe_paced_median = fe_paced.median_ms;
    report.push(fe_paced);

    warm_up(iterations, f).await?;
    eprintln!("{name}: {iterations} sequential cycles");
    let (seq, seq_phase) = phase(client, template, min, "sequential", name, f, iterations, Load::Sequential).await?;
    eprintln!("{name}: {iterations} cycles, one client paced at {cycle_rate}/s");
    let load = Load::Paced(1, cycle_rate);
    let (one, one_phase) = phase(client, template, min, "one client, paced", name, f, iterations, load).await?;
    // A burst no larger than the stock: what claims alone sustain.
    let stock = min as usize;
    eprintln!("{name}: a burst of {stock} cycles (the pool's min), {workers} at once");
    let (_, burst_phase) = phase(client, template, min, "burst of min", name, f, stock, Load::Closed(workers)).await?;
    eprintln!("{name}: {total} cycles, {workers} at once");
    let (conc, conc_phase) = phase(client, template, min, "concurrent", name, f, total, Load::Closed(workers)).await?;
    eprintln!("{name}: {claim_total} claims (each destroyed at once) offered at {claim_rate}/s by {workers} clients");
    let load = Load::Paced(workers, claim_rate);
    let claims = "agentbox (API, warm pool): claim + destroy".to_string();
    let (paced, paced_phase) = phase(client, template, min, "paced claims", &claims, claim, claim_total, load).await?;
    let run_name = "agentbox (API, one request, warm pool)";
    warm_up(iterations.min(10), run).await?;
    eprintln!("{run_name}: {iterations} sequential cycles");
    let (run_seq, run_seq_phase) =
        phase(client, template, min, "one request, sequential", run_name, run, iterations, Load::Sequential).await?;
    eprintln!("{run_name}: {iterations} cycles, one client paced at {cycle_rate}/s");
    let load = Load::Paced(1, cycle_rate);
    let (run_one, run_one_phase) =
        phase(client, template, min, "one request, one client, paced", run_name, run, iterations, load).await?;
    let ratio = one.median_ms / fe_paced_median.max(1e-9);
    let ratio_to_back_to_back_fork_exec = one.median_ms / fe_median.max(1e-9);
    let ratio_back_to_back = seq.median_ms / fe_median.max(1e-9);
    report.push(seq);
    report.push(one);
    report.push(conc);
    report.push(paced);
    report.push(run_seq);
    report.push(run_one);

    let end = client.pool(template).await.context("the pool's counters")?;
    let cold = match metrics(client).await {
        Some(text) => Hist::parse(&text, "agentbox_create_cold_seconds", template).and_then(|h| h.mean_ms()),
        None => None,
    };
    Ok(PoolReport {
        template: template.into(),
        min,
        max,
        fill_ms: ms(fill),
        fork_exec_median_ms: fe_median,
        fork_exec_p95_ms: fe_p95,
        fork_exec_paced_median_ms: fe_paced_median,
        ratio_to_fork_exec: ratio,
        ratio_to_back_to_back_fork_exec,
        ratio_back_to_back,
        phases: vec![seq_phase, one_phase, burst_phase, conc_phase, paced_phase, run_seq_phase, run_one_phase],
        end,
        cold_create_ms_mean: cold,
    })
}

/// `n` fork+execs of `/bin/echo hi` (after up to 10 for warm-up), back to back or, with a
/// rate, the k-th due k / rate seconds after the start; the wall time and the [`cpu_mark`]
/// at the start.
fn fork_exec(n: usize, rate: Option<f64>) -> anyhow::Result<(Vec<Duration>, Duration, Option<u64>)> {
    let once = || -> anyhow::Result<Duration> {
        let t = Instant::now();
        let out = std::process::Command::new("/bin/echo").arg("hi").output().context("run /bin/echo")?;
        if out.stdout != b"hi\n" || !out.status.success() {
            bail!("/bin/echo hi: {:?}, {:?}", out.status, String::from_utf8_lossy(&out.stdout));
        }
        Ok(t.elapsed())
    };
    for _ in 0..n.min(10) {
        once()?;
    }
    let cpu = cpu_mark();
    let t = Instant::now();
    let lat = (0..n)
        .map(|k| {
            if let Some(rate) = rate {
                let due = t + Duration::from_secs_f64(k as f64 / rate);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            once()
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((lat, t.elapsed(), cpu))
}

/// Waits until the pool of `template` holds at least `min` ready sandboxes.
async fn wait_ready(client: &Client, template: &str, min: u32) -> anyhow::Result<Pool> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let p = client.pool(template).await.context("the pool's state")?;
        if p.ready >= min {
            return Ok(p);
        }
        if Instant::now() >= deadline {
            bail!(
                "the pool of {template} holds {} ready (target {}, {} booting) after {} s, not {min}; \
                 {} boots failed, last error: {}",
                p.ready,
                p.target,
                p.filling,
                READY_TIMEOUT.as_secs(),
                p.boot_failures,
                p.last_error.as_deref().unwrap_or("none")
            );
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// One phase: `cycles` cycles driven as `load` says (no warm-up), starting
/// with at least `min` ready sandboxes. Its CPU time counts until the pool holds `min` ready
/// sandboxes again (the boots that replaced the claimed ones), and [`SETTLE`] more.
#[allow(clippy::too_many_arguments)]
async fn phase(
    client: &Client,
    template: &str,
    min: u32,
    label: &str,
    name: &str,
    f: &CycleFn,
    cycles: usize,
    load: Load,
) -> anyhow::Result<(Summary, Phase)> {
    let start = wait_ready(client, template, min).await?;
    let h0 = claim_hist(client, template).await;
    let before = client.pool(template).await?;
    let cpu = cpu_mark();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (client, template, stop) = (client.clone(), template.to_string(), stop.clone());
        tokio::spawn(async move {
            let (mut lowest, mut highest) = (u32::MAX, 0);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(p) = client.pool(&template).await {
                    lowest = lowest.min(p.ready);
                    highest = highest.max(p.target);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            (lowest, highest)
        })
    };
    let (res, workers) = match load {
        Load::Sequential => (sequential(name, cycles, f).await.map(|s| (s, None)), 1),
        Load::Closed(w) => (concurrent(name, cycles, w, f).await.map(|s| (s, None)), w),
        Load::Paced(w, rate) => {
            (paced(name, cycles, w, rate, f).await.map(|p| (p.summary, Some((rate, p.late, p.max_lag)))), w)
        }
    };
    stop.store(true, Ordering::Relaxed);
    let (lowest, highest) = sampler.await?;
    let (s, pace) = res?;
    let after = client.pool(template).await?;
    let h1 = claim_hist(client, template).await;
    wait_ready(client, template, min).await?;
    tokio::time::sleep(SETTLE).await;
    let s = s.with_cpu(cpu);
    let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
    let claim = match (h0, h1) {
        (Some(a), Some(b)) => Some(b.since(&a)),
        _ => None,
    };
    let p = Phase {
        mode: label.into(),
        concurrency: workers,
        cycles: s.cycles,
        median_ms: s.median_ms,
        p95_ms: s.p95_ms,
        per_second: s.per_second,
        ready_at_start: start.ready,
        lowest_ready: lowest.min(after.ready),
        highest_target: highest.max(after.target),
        hits,
        misses,
        hit_rate: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
        daemon_claim_ms_mean: claim.as_ref().and_then(Hist::mean_ms),
        daemon_claim_ms_median_le: claim.as_ref().and_then(Hist::median_le_ms),
        offered_per_second: pace.map(|p| p.0),
        late: pace.map(|p| p.1),
        max_lag_ms: pace.map(|p| ms(p.2)),
    };
    Ok((s, p))
}

async fn claim_hist(client: &Client, template: &str) -> Option<Hist> {
    Hist::parse(&metrics(client).await?, "agentbox_pool_claim_seconds", template)
}

/// The daemon's `/metrics` text (unix socket only; the SDK has no call for it).
async fn metrics(client: &Client) -> Option<String> {
    let Host::Unix(path) = client.host() else { return None };
    let mut s = tokio::net::UnixStream::connect(path).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: agentbox\r\n\r\n").await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if head.split(' ').nth(1) != Some("200") {
        return None;
    }
    Some(body.to_string())
}

/// A Prometheus histogram of one template, read from `/metrics` text.
#[derive(Debug, Clone, Default)]
struct Hist {
    /// (upper bound in seconds, cumulative count), without `+Inf`.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Hist {
    fn parse(text: &str, name: &str, template: &str) -> Option<Hist> {
        let label = format!("template=\"{template}\"");
        let mut h = Hist::default();
        let mut seen = false;
        for line in text.lines() {
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            if key == format!("{name}_sum{{{label}}}") {
                h.sum = v;
                seen = true;
            } else if key == format!("{name}_count{{{label}}}") {
                h.count = v;
            } else if let Some(rest) = key.strip_prefix(&format!("{name}_bucket{{{label},le=\""))
                && let Some(Ok(le)) = rest.strip_suffix("\"}").map(str::parse::<f64>)
                && le.is_finite()
            {
                h.buckets.push((le, v));
            }
        }
        seen.then_some(h)
    }

    /// What was observed after `before`.
    fn since(&self, before: &Hist) -> Hist {
        Hist {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| (*le, n - before.buckets.iter().find(|b| b.0 == *le).map_or(0.0, |b| b.1)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum * 1000.0 / self.count)
    }

    /// Upper bound (ms) of the bucket that holds the median.
    fn median_le_ms(&self) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        self.buckets.iter().find(|(_, n)| *n >= self.count / 2.0).map(|(le, _)| le * 1000.0)
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

impl PoolReport {
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let mut line = |s: String| {
            o.push_str(&s);
            o.push('\n');
        };
        line(format!(
            "Warm pool (`pool` subject): template {}, min {}, max {}; {} ready {:.0} ms after `PUT /v1/pools/{}`.",
            self.template, self.min, self.max, self.min, self.fill_ms, self.template
        ));
        line(String::new());
        line("| phase | at once | cycles | ready at start | lowest ready | highest target | hits | misses | hit rate | median ms | p95 ms | claims/s | daemon claim mean ms | daemon claim median ≤ ms |".into());
        line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into());
        for p in &self.phases {
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% | {:.2} | {:.2} | {:.0} | {} | {} |",
                p.mode,
                p.concurrency,
                p.cycles,
                p.ready_at_start,
                p.lowest_ready,
                p.highest_target,
                p.hits,
                p.misses,
                p.hit_rate * 100.0,
                p.median_ms,
                p.p95_ms,
                p.per_second,
                opt_ms(p.daemon_claim_ms_mean),
                opt_ms(p.daemon_claim_ms_median_le),
            ));
        }
        let e = &self.end;
        line(String::new());
        line(format!(
            "Pool after the cycles (`GET /v1/pools/{}`): {} hits, {} misses, hit rate {:.1}%, claim_ms_mean {:.3}, \
             refill_ms {}, {} boots, {} boot failures, ready {}, target {}. Cold creates of {} in this daemon \
             (all subjects so far and pool misses, `agentbox_create_cold_seconds`): mean {} ms.",
            e.template,
            e.hits,
            e.misses,
            e.hit_rate * 100.0,
            e.claim_ms_mean,
            opt_ms(e.refill_ms),
            e.boots,
            e.boot_failures,
            e.ready,
            e.target,
            e.template,
            opt_ms(self.cold_create_ms_mean),
        ));
        if let Some(err) = &e.last_error {
            line(format!("Last boot error: {err}"));
        }
        line(String::new());
        let [seq, one, burst, conc, paced, run_seq, run_one] = &self.phases[..] else { return o };
        let late = paced.late.unwrap_or(0);
        let offered = paced.offered_per_second.unwrap_or(0.0);
        // Sustained: the offered rate and the clients are the target's, and at most 1% of
        // the claims started behind the schedule (a client was free when each was due).
        let sustained = offered >= RATE_TARGET && paced.concurrency >= CLIENTS_TARGET && late * 100 <= paced.cycles;
        line("| issue 5 target | measured | verdict |".into());
        line("|---|---|---|".into());
        let kept_up = one.hit_rate >= HIT_RATE_TARGET;
        line(format!(
            "| claim + exec echo + destroy: median < {CLAIM_TARGET_MS} ms (one client, {:.0} cycles/s offered, the pool keeping up: hit rate ≥ {:.0}%) | {:.2} ms (p95 {:.2}), hit rate {:.1}%, {} started over 5 ms late | {} |",
            one.offered_per_second.unwrap_or(0.0),
            HIT_RATE_TARGET * 100.0,
            one.median_ms,
            one.p95_ms,
            one.hit_rate * 100.0,
            one.late.unwrap_or(0),
            verdict(one.median_ms < CLAIM_TARGET_MS && kept_up)
        ));
        line(format!(
            "| about {FORK_EXEC_RATIO}× a plain fork+exec (ratio ≤ {FORK_EXEC_RATIO}; both one at a time at {:.0}/s) | fork+exec `/bin/echo hi` {:.2} ms at {:.0}/s, ratio {:.2}; back to back {:.2} ms (p95 {:.2}), ratio {:.2} | {} |",
            one.offered_per_second.unwrap_or(0.0),
            self.fork_exec_paced_median_ms,
            one.offered_per_second.unwrap_or(0.0),
            self.ratio_to_fork_exec,
            self.fork_exec_median_ms,
            self.fork_exec_p95_ms,
            self.ratio_to_back_to_back_fork_exec,
            verdict(self.ratio_to_fork_exec <= FORK_EXEC_RATIO && kept_up)
        ));
        line(format!(
            "| (the same in one request, `POST /v1/run` as `agentbox run` sends it: one client, {:.0}/s offered; back to back) | {:.2} ms (p95 {:.2}), hit rate {:.1}%, ratio to fork+exec {:.2}; back to back {:.2} ms (p95 {:.2}), {:.0} cycles/s, hit rate {:.1}% | |",
            run_one.offered_per_second.unwrap_or(0.0),
            run_one.median_ms,
            run_one.p95_ms,
            run_one.hit_rate * 100.0,
            run_one.median_ms / self.fork_exec_paced_median_ms.max(1e-9),
            run_seq.median_ms,
            run_seq.p95_ms,
            run_seq.per_second,
            run_seq.hit_rate * 100.0,
        ));
        line(format!(
            "| (the same cycle back to back, one client: every claim's replacement boots during the next cycles, so this runs at the machine's capacity) | {:.2} ms (p95 {:.2}), {:.0} cycles/s, hit rate {:.1}%; ratio to fork+exec {:.2} | |",
            seq.median_ms,
            seq.p95_ms,
            seq.per_second,
            seq.hit_rate * 100.0,
            self.ratio_back_to_back
        ));
        line(format!(
            "| {RATE_TARGET:.0} claims/s sustained with {} concurrent clients (paced: {} claims offered at {offered:.0}/s, each destroyed at once) | {:.0} claims/s; {late} started over 5 ms behind the schedule (most {:.1} ms); claim median {:.2} ms, p95 {:.2} ms | {} |",
            paced.concurrency,
            paced.cycles,
            paced.per_second,
            paced.max_lag_ms.unwrap_or(0.0),
            paced.median_ms,
            paced.p95_ms,
            verdict(sustained)
        ));
        line(format!(
            "| … while the pool keeps up (hit rate ≥ {:.0}%) | {:.1}% ({} misses of {}; lowest ready {}) | {} |",
            HIT_RATE_TARGET * 100.0,
            paced.hit_rate * 100.0,
            paced.misses,
            paced.hits + paced.misses,
            paced.lowest_ready,
            verdict(paced.hit_rate >= HIT_RATE_TARGET)
        ));
        line(format!(
            "| (claim + exec echo + destroy, {} clients as fast as they can, {} cycles) | {:.0} cycles/s, hit rate {:.1}% | |",
            conc.concurrency,
            conc.cycles,
            conc.per_second,
            conc.hit_rate * 100.0
        ));
        line(format!(
            "| (claims alone: a burst of {} = min, {} at once, from a full pool) | {:.0} claims/s, hit rate {:.1}% | |",
            burst.cycles,
            burst.concurrency,
            burst.per_second,
            burst.hit_rate * 100.0
        ));
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_from_metrics_text() {
        let text = "\
# TYPE agentbox_pool_claim_seconds histogram
agentbox_pool_claim_seconds_bucket{template=\"mini\",le=\"0.0005\"} 1
agentbox_pool_claim_seconds_bucket{template=\"mini\",le=\"0.001\"} 3
agentbox_pool_claim_seconds_bucket{template=\"mini\",le=\"0.002\"} 4
agentbox_pool_claim_seconds_bucket{template=\"mini\",le=\"+Inf\"} 4
agentbox_pool_claim_seconds_sum{template=\"mini\"} 0.004
agentbox_pool_claim_seconds_count{template=\"mini\"} 4
agentbox_pool_claim_seconds_sum{template=\"other\"} 9
";
        let h = Hist::parse(text, "agentbox_pool_claim_seconds", "mini").unwrap();
        assert_eq!(h.buckets, vec![(0.0005, 1.0), (0.001, 3.0), (0.002, 4.0)]);
        assert_eq!(h.mean_ms(), Some(1.0));
        assert_eq!(h.median_le_ms(), Some(1.0));
        let before = Hist { buckets: vec![(0.0005, 1.0), (0.001, 1.0), (0.002, 1.0)], sum: 0.0005, count: 1.0 };
        let d = h.since(&before);
        assert_eq!(d.count, 3.0);
        assert_eq!(d.median_le_ms(), Some(1.0));
        assert!(Hist::parse(text, "agentbox_pool_claim_seconds", "absent").is_none());
    }
}
