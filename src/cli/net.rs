//! `net set|show|log|test`, `port`, and the `--net`/`--allow` options of `run` and `create`.

use abx_client::{Client, NetMode, NetTestReport, NetworkPolicy};
use clap::{Args, Subcommand};

/// Egress policy options.
#[derive(Debug, Args, Clone, Default)]
pub struct PolicyArgs {
    /// Egress: none (default: nothing), public (the internet minus private, link-local and
    /// metadata ranges) or allow (only what --allow names; implied by --allow).
    #[arg(long)]
    pub net: Option<NetMode>,
    /// Allow a domain (github.com), its subdomains (*.pypi.org), or an address or CIDR,
    /// each with optional ports and protocol (github.com:443/tcp, 10.1.0.0/16:5432,
    /// 203.0.113.7:8000-8080/udp).
    /// Repeatable.
    #[arg(long)]
    pub allow: Vec<String>,
}

impl PolicyArgs {
    /// The policy asked for, or None to take the daemon's default (no egress).
    pub fn policy(&self) -> Option<NetworkPolicy> {
        if self.net.is_none() && self.allow.is_empty() {
            return None;
        }
        let mode = self.net.unwrap_or(if self.allow.is_empty() { NetMode::None } else { NetMode::Allow });
        Some(NetworkPolicy { mode, allow: self.allow.clone() })
    }
}

#[derive(Debug, Subcommand)]
pub enum NetCmd {
    /// Replace a sandbox's egress policy (takes effect at once).
    Set {
        /// Sandbox id or name.
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Show a sandbox's egress policy and address.
    Show {
        /// Sandbox id or name.
        id: String,
    },
    /// Show a sandbox's egress audit: DNS answers and allowed and denied connections (also
    /// of a removed sandbox, for the daemon's --audit-retention).
    Log {
        /// Sandbox id or name (of a removed sandbox: the name it had).
        id: String,
        /// Only the denied queries and connections.
        #[arg(long)]
        denied: bool,
        /// Keep printing new events as they come (every 0.5 s) until the sandbox is
        /// removed; with --json, one event per line.
        #[arg(long, short)]
        follow: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List removed sandboxes whose egress audit is kept (read one with `net log ID`).
    Audits {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Probe from inside a sandbox that its policy holds; exits 1 if it does not.
    Test {
        /// Sandbox id or name.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change who may reach a sandbox's ports through the ingress proxy: public, or token
    /// (requests need the token printed; `agentbox port` shows how to send it).
    Ingress {
        /// Sandbox id or name.
        id: String,
        /// public or token.
        access: abx_client::IngressAccess,
        /// With token: a new token even if the sandbox has one (the old one stops working).
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, Args)]
pub struct PortArgs {
    /// Sandbox id or name.
    id: String,
    /// Port inside the sandbox.
    port: u16,
}

pub async fn main(client: &Client, cmd: NetCmd) -> anyhow::Result<i32> {
    match cmd {
        NetCmd::Set { id, policy } => {
            // No options would cut the sandbox off without saying so: ask for `--net none`.
            let Some(p) = policy.policy() else {
                anyhow::bail!(
                    "give the new policy: --net none|public|allow and/or --allow RULE (see `agentbox net set --help`)"
                );
            };
            let sb = client.set_network(&id, &p).await?;
            println!("{}", describe(&sb.network));
            Ok(0)
        }
        NetCmd::Show { id } => {
            let sb = client.get_sandbox(&id).await?;
            println!("{}", describe(&sb.network));
            if let Some(a) = sb.address {
                println!("address {a}");
            }
            Ok(0)
        }
        NetCmd::Log { id, denied, json, follow } => {
            if follow {
                return follow_log(client, &id, denied, json).await;
            }
            let mut log = client.network_log(&id).await?;
            if denied {
                log.events.retain(|e| e.verdict != "allow");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&log)?);
                return Ok(0);
            }
            if let Some(at) = log.removed_at {
                eprintln!("sandbox {id} was removed {} (its audit is kept)", super::parse::relative(at));
            }
            if log.dropped > 0 {
                println!("({} older events dropped)", log.dropped);
            }
            for e in &log.events {
                println!("{}", event_line(e));
            }
            Ok(0)
        }
        NetCmd::Audits { json } => {
            let kept = client.kept_audits().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&kept)?);
                return Ok(0);
            }
            println!("{:<26} {:<20} {:<16} {:<10} {:>7}", "ID", "NAME", "TEMPLATE", "REMOVED", "EVENTS");
            for k in kept {
                println!(
                    "{:<26} {:<20} {:<16} {:<10} {:>7}",
                    k.id,
                    k.name.unwrap_or_else(|| "-".into()),
                    k.template,
                    super::parse::relative(k.removed_at),
                    k.events
                );
            }
            Ok(0)
        }
        NetCmd::Test { id, json } => {
            let report = client.network_test(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            Ok(if report.passed { 0 } else { 1 })
        }
        NetCmd::Ingress { id, access, rotate } => {
            if rotate && access == abx_client::IngressAccess::Public {
                anyhow::bail!("--rotate makes a new token: it goes with `token`, not `public`");
            }
            let sb = client.set_ingress(&id, &abx_client::SetIngress { access, rotate }).await?;
            println!("ingress {}", sb.ingress.as_str());
            if let Some(t) = sb.ingress_token {
                println!("token {t}");
            }
            Ok(0)
        }
    }
}

/// `net log --follow`: prints the events it has not printed yet every 0.5 s, until the
/// sandbox is removed (or its audit is gone).
async fn follow_log(client: &Client, key: &str, denied: bool, json: bool) -> anyhow::Result<i32> {
    // By id from here on: a later sandbox given the same name is another's log.
    let id = client.get_sandbox(key).await.map(|s| s.id).unwrap_or_else(|_| key.to_string());
    let id = id.as_str();
    // Events are numbered from the first one the sandbox recorded: `dropped` counts those
    // before the log's first.
    let mut next: u64 = 0;
    let mut first = true;
    loop {
        let log = match client.network_log(id).await {
            Ok(log) => log,
            // Removed without a kept audit, after it was followed.
            Err(e) if !first && e.code() == Some("not_found") => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        if log.dropped > next && !first {
            eprintln!("({} events dropped before they were shown)", log.dropped - next);
        }
        let skip = next.saturating_sub(log.dropped) as usize;
        for e in log.events.iter().skip(skip).filter(|e| !denied || e.verdict != "allow") {
            if json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                println!("{}", event_line(e));
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        next = log.dropped + log.events.len() as u64;
        first = false;
        if log.removed_at.is_some() {
            return Ok(0);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// One audit event as `net log` prints it.
fn event_line(e: &abx_client::NetEvent) -> String {
    let what = match e.kind.as_str() {
        "dns" => format!(
            "dns {} {}{}",
            e.qtype.as_deref().unwrap_or_default(),
            e.name.as_deref().unwrap_or_default(),
            if e.addresses.is_empty() { String::new() } else { format!(" -> {}", e.addresses.join(", ")) }
        ),
        "ingress" => format!(
            "ingress {} :{} from {}",
            e.protocol.as_deref().unwrap_or_default(),
            e.port.unwrap_or_default(),
            e.source.as_deref().unwrap_or("?")
        ),
        _ => format!(
            "{} {}{}",
            e.protocol.as_deref().unwrap_or_default(),
            e.destination.as_deref().unwrap_or_default(),
            e.port.map(|p| format!(":{p}")).unwrap_or_default()
        ),
    };
    format!("{} {:<5} {what}", time(e.time_ms), e.verdict)
}

/// `--net-test`: runs the test and prints the report on stderr; false if it failed.
pub async fn test_after_create(client: &Client, id: &str) -> anyhow::Result<bool> {
    let report = client.network_test(id).await?;
    if !report.passed {
        eprintln!("network test of sandbox {id} failed:");
        for c in report.checks.iter().filter(|c| !c.ok) {
            eprintln!("  {}: expected {}, got {} ({}; {})", c.target, c.expected, observed(c), c.reason, c.detail);
        }
    }
    Ok(report.passed)
}

pub async fn port(client: &Client, a: PortArgs) -> anyhow::Result<i32> {
    let p = client.port_url(&a.id, a.port).await?;
    println!("{}", p.url);
    // The URL alone stays the only line on stdout (scripts use `$(agentbox port ...)`).
    if let Some(token) = &p.token {
        eprintln!("send the header: E2b-Traffic-Access-Token: {token}");
        // A browser cannot: the proxy turns the token in a first URL into a cookie.
        let sep = if p.url.contains('?') { '&' } else { '?' };
        eprintln!("or open in a browser: {}{sep}agentbox_token={token}", p.url);
    }
    Ok(0)
}

fn describe(p: &NetworkPolicy) -> String {
    let mut s = format!("network {}", p.mode.as_str());
    for r in &p.allow {
        s.push_str(&format!(" --allow {r}"));
    }
    s
}

fn print_report(r: &NetTestReport) {
    println!("policy: {}", describe(&r.policy));
    for c in &r.checks {
        println!(
            "{} {:<40} expected {:<9} got {:<9} {} ({})",
            if c.ok { "ok  " } else { "FAIL" },
            c.target,
            c.expected,
            observed(c),
            c.reason,
            c.detail
        );
    }
    println!("{}", if r.passed { "policy holds" } else { "POLICY DOES NOT HOLD" });
}

/// What a check saw, in words.
fn observed(c: &abx_client::NetCheck) -> &str {
    if c.observed == "silent" { "no answer" } else { &c.observed }
}

fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ms % 1000)
}
