//! Latency summaries and the report table.

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Summary {
    pub subject: String,
    pub mode: String,
    pub concurrency: usize,
    pub cycles: usize,
    pub median_ms: f64,
    pub p95_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    /// Completed cycles per second over the whole run.
    pub per_second: f64,
    /// CPU time of the whole machine (all processes, from /proc/stat, 10 ms ticks) per
    /// cycle, from the run's start until the work it left in the background was done.
    pub cpu_ms_per_cycle: Option<f64>,
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A target's verdict in the reports.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

impl Summary {
    pub fn new(subject: &str, mode: &str, concurrency: usize, mut lat: Vec<Duration>, wall: Duration) -> Summary {
        lat.sort();
        let n = lat.len().max(1);
        let total: Duration = lat.iter().sum();
        Summary {
            subject: subject.into(),
            mode: mode.into(),
            concurrency,
            cycles: lat.len(),
            median_ms: ms(percentile(&lat, 0.5)),
            p95_ms: ms(percentile(&lat, 0.95)),
            mean_ms: ms(total) / n as f64,
            max_ms: ms(lat.last().copied().unwrap_or_default()),
            per_second: lat.len() as f64 / wall.as_secs_f64().max(1e-9),
            cpu_ms_per_cycle: None,
        }
    }

    /// Sets the CPU per cycle from a [`cpu_mark`] taken at the run's start.
    pub fn with_cpu(mut self, since: Option<u64>) -> Summary {
        if let (Some(a), Some(b)) = (since, cpu_mark()) {
            self.cpu_ms_per_cycle = Some(b.saturating_sub(a) as f64 * 1000.0 / USER_HZ / self.cycles.max(1) as f64);
        }
        self
    }
}

/// /proc/stat counts in USER_HZ, which is 100 on Linux/x86.
const USER_HZ: f64 = 100.0;

/// Busy ticks of all CPUs since boot.
pub fn cpu_mark() -> Option<u64> {
    crate::net::cpu_ticks().ok().map(|t| t.0)
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub results: Vec<Summary>,
    /// The pool subject's own figures (issue 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<crate::pool::PoolReport>,
}

impl Report {
    pub fn push(&mut self, s: Summary) {
        self.results.push(s);
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| subject | mode | at once | cycles | median ms | p95 ms | mean ms | max ms | cycles/s | CPU ms/cycle |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for s in &self.results {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} |\n",
                s.subject,
                s.mode,
                s.concurrency,
                s.cycles,
                s.median_ms,
                s.p95_ms,
                s.mean_ms,
                s.max_ms,
                s.per_second,
                s.cpu_ms_per_cycle.map_or("–".into(), |c| format!("{c:.2}"))
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let lat: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::new("x", "sequential", 1, lat, Duration::from_secs(1));
        assert_eq!(s.median_ms.round(), 51.0);
        assert_eq!(s.p95_ms.round(), 95.0);
        assert_eq!(s.per_second.round(), 100.0);
    }
}
