//! `snapshot`, `fork`, `rollback`, `stop`, `start`, `volume`.

use abx_client::{Client, ForkRequest};
use clap::{Args, Subcommand};

use super::parse;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    cmd: Option<SnapshotCmd>,
    /// Sandbox id or name to snapshot.
    #[arg(required = true)]
    id: Option<String>,
    /// Name the snapshot.
    #[arg(long)]
    name: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// List snapshots.
    Ls {
        /// Only those of this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
        /// Print ids only.
        #[arg(short, long)]
        quiet: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshots (sandboxes made from them keep their files).
    Rm {
        /// Snapshot ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

pub async fn snapshot(client: &Client, a: SnapshotArgs) -> anyhow::Result<i32> {
    match a.cmd {
        Some(SnapshotCmd::Ls { sandbox, quiet, json }) => {
            let v = client.snapshots(sandbox.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if quiet {
                for s in &v {
                    println!("{}", s.id);
                }
            } else {
                println!("{:<12}  {:<20}  {:<12}  {:<10}  {:>9}  CREATED", "ID", "NAME", "SANDBOX", "TEMPLATE", "SIZE");
                for s in &v {
                    println!(
                        "{:<12}  {:<20}  {:<12}  {:<10}  {:>9}  {}",
                        s.id,
                        s.name.as_deref().unwrap_or("-"),
                        s.sandbox,
                        s.template,
                        parse::human_size(s.size_bytes),
                        parse::relative(s.created_at)
                    );
                }
            }
            Ok(0)
        }
        Some(SnapshotCmd::Rm { ids }) => {
            let mut code = 0;
            for id in ids {
                if let Err(e) = client.delete_snapshot(&id).await {
                    eprintln!("agentbox: {e}");
                    code = super::EXIT_ERROR;
                }
            }
            Ok(code)
        }
        None => {
            let id = a.id.unwrap_or_default();
            let s = client.snapshot(&id, a.name.as_deref()).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{}", s.id);
            }
            Ok(0)
        }
    }
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Sandbox or snapshot (id or name) to fork.
    source: String,
    /// How many sandboxes (1-100).
    #[arg(long, short = 'n', default_value_t = 1)]
    count: u32,
    /// Timeout of the new sandboxes, e.g. 30m (0: none; default: the daemon's).
    #[arg(long, value_parser = parse::duration)]
    timeout: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Make the fork safe to repeat: while the sandboxes a fork with this key made exist,
    /// the same fork answers them instead of making more (default: a random key, so that
    /// a fork retried after the daemon went away mid-way never makes two sets).
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

/// `fork`: prints the new ids, one per line.
pub async fn fork(client: &Client, a: ForkArgs) -> anyhow::Result<i32> {
    let req = ForkRequest {
        count: Some(a.count),
        timeout_secs: a.timeout,
        idempotency_key: a.idempotency_key,
        ..Default::default()
    };
    // The daemon looks for a sandbox first, then a snapshot of that name, and names both
    // when neither exists.
    let told = |e: &abx_client::Error| {
        eprintln!("the daemon did not answer the fork ({e}); sending it again with the same idempotency key")
    };
    let r = client.fork_retried(&a.source, &req, told).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for sb in &r.sandboxes {
            println!("{}", sb.id);
        }
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Sandbox id or name.
    id: String,
    /// Snapshot id or name.
    snapshot: String,
}

pub async fn rollback(client: &Client, a: RollbackArgs) -> anyhow::Result<i32> {
    let sb = client.rollback(&a.id, &a.snapshot).await?;
    println!("{} {}", sb.id, sb.state.as_str());
    Ok(0)
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Sandbox ids or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Sandbox ids or names.
    #[arg(required = true)]
    ids: Vec<String>,
    /// Seconds the processes get to exit after SIGTERM before those left are killed
    /// (default 10; 0 kills at once).
    #[arg(short = 't', long = "time", value_name = "SECONDS", value_parser = super::parse::grace_secs)]
    time: Option<f64>,
}

/// `stop`: print each sandbox's new state.
pub async fn stop(client: &Client, a: StopArgs) -> anyhow::Result<i32> {
    each_state(a.ids, async |id| match a.time {
        Some(t) => client.stop_with_grace(id, t).await,
        None => client.stop(id).await,
    })
    .await
}

/// `start`: print each sandbox's new state.
pub async fn start(client: &Client, a: StartArgs) -> anyhow::Result<i32> {
    each_state(a.ids, async |id| client.start(id).await).await
}

/// Runs `op` on each sandbox and prints its new state; carries on past errors (exit 1).
async fn each_state(
    ids: Vec<String>,
    mut op: impl AsyncFnMut(&str) -> abx_client::Result<abx_client::Sandbox>,
) -> anyhow::Result<i32> {
    let mut code = 0;
    for id in ids {
        match op(&id).await {
            Ok(sb) => println!("{} {}", sb.id, sb.state.as_str()),
            Err(e) => {
                eprintln!("agentbox: {e}");
                code = super::EXIT_ERROR;
            }
        }
    }
    Ok(code)
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a named volume.
    Create { name: String },
    /// List volumes with their size.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete volumes and their files.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn volume(client: &Client, c: VolumeCmd) -> anyhow::Result<i32> {
    match c {
        VolumeCmd::Create { name } => {
            let v = client.create_volume(&name).await?;
            println!("{}", v.name);
            Ok(0)
        }
        VolumeCmd::Ls { json } => {
            let v = client.volumes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24}  {:>9}  {:>8}  {:<14}  USED BY", "NAME", "SIZE", "ENTRIES", "CREATED");
                for x in &v {
                    println!(
                        "{:<24}  {:>9}  {:>8}  {:<14}  {}",
                        x.name,
                        parse::human_size(x.size_bytes),
                        x.entries,
                        parse::relative(x.created_at),
                        if x.used_by.is_empty() { "-".to_string() } else { x.used_by.join(",") }
                    );
                }
            }
            Ok(0)
        }
        VolumeCmd::Rm { names } => {
            let mut code = 0;
            for n in names {
                if let Err(e) = client.delete_volume(&n).await {
                    eprintln!("agentbox: {e}");
                    code = super::EXIT_ERROR;
                }
            }
            Ok(code)
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Create or change the pool of a template.
    Set {
        template: String,
        /// Sandboxes kept ready even without demand.
        #[arg(long, default_value_t = 0)]
        min: u32,
        /// Most sandboxes kept ready, whatever the demand.
        #[arg(long)]
        max: u32,
    },
    /// List pools with their counters.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove pools (their ready sandboxes are destroyed).
    Rm {
        #[arg(required = true)]
        templates: Vec<String>,
    },
}

pub async fn pool(client: &Client, c: PoolCmd) -> anyhow::Result<i32> {
    match c {
        PoolCmd::Set { template, min, max } => {
            let p = client.set_pool(&template, min, max).await?;
            println!("pool {}: min {}, max {}, target {}, ready {}", p.template, p.min, p.max, p.target, p.ready);
            Ok(0)
        }
        PoolCmd::Ls { json } => {
            let v = client.pools().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            println!(
                "{:<20}  {:>4}  {:>4}  {:>6}  {:>5}  {:>7}  {:>7}  {:>6}  {:>8}  {:>9}  ERROR",
                "TEMPLATE", "MIN", "MAX", "TARGET", "READY", "HITS", "MISSES", "HIT%", "CLAIMS/S", "REFILL MS"
            );
            for p in &v {
                println!(
                    "{:<20}  {:>4}  {:>4}  {:>6}  {:>5}  {:>7}  {:>7}  {:>6.1}  {:>8.1}  {:>9}  {}",
                    p.template,
                    p.min,
                    p.max,
                    p.target,
                    p.ready,
                    p.hits,
                    p.misses,
                    p.hit_rate * 100.0,
                    p.claims_per_sec,
                    p.refill_ms.map_or("-".to_string(), |r| format!("{r:.1}")),
                    p.last_error.as_deref().unwrap_or("-")
                );
            }
            Ok(0)
        }
        PoolCmd::Rm { templates } => {
            let mut code = 0;
            for t in templates {
                if let Err(e) = client.delete_pool(&t).await {
                    eprintln!("agentbox: {e}");
                    code = super::EXIT_ERROR;
                }
            }
            Ok(code)
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Make an API key and print it (it is not shown again).
    Create {
        /// Who the key is for: it reaches only that tenant's sandboxes, snapshots and
        /// volumes, and may use but not change templates and pools. Without a tenant, a key
        /// reaches everything, as the unix socket does.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List keys (ids, tenants, first characters).
    Ls,
    /// Revoke keys.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

pub async fn key(client: &Client, c: KeyCmd) -> anyhow::Result<i32> {
    match c {
        KeyCmd::Create { tenant } => {
            let k = client.create_key(tenant.as_deref()).await?;
            println!("{}", k.key.unwrap_or_default());
            eprintln!("key {} (tenant {}); it is not shown again", k.id, k.tenant.as_deref().unwrap_or("-"));
            Ok(0)
        }
        KeyCmd::Ls => {
            println!("{:<14}  {:<16}  {:<14}  PREFIX", "ID", "TENANT", "CREATED");
            for k in client.keys().await? {
                println!(
                    "{:<14}  {:<16}  {:<14}  {}…",
                    k.id,
                    k.tenant.as_deref().unwrap_or("-"),
                    parse::relative(k.created_at),
                    k.prefix
                );
            }
            Ok(0)
        }
        KeyCmd::Rm { ids } => {
            let mut code = 0;
            for id in ids {
                if let Err(e) = client.delete_key(&id).await {
                    eprintln!("agentbox: {e}");
                    code = super::EXIT_ERROR;
                }
            }
            Ok(code)
        }
    }
}

/// `--volume NAME:/path[:ro]`.
pub fn volume_mount(s: &str) -> Result<abx_client::VolumeMount, String> {
    let mut parts = s.splitn(3, ':');
    let name = parts.next().unwrap_or_default();
    let path = parts.next().ok_or_else(|| format!("'{s}': use NAME:/path or NAME:/path:ro"))?;
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(o) => return Err(format!("'{s}': unknown mode '{o}' (use ro or rw)")),
    };
    if name.is_empty() || !path.starts_with('/') {
        return Err(format!("'{s}': use NAME:/path or NAME:/path:ro"));
    }
    Ok(abx_client::VolumeMount { name: name.to_string(), path: path.to_string(), read_only })
}
