//! `ls`, `inspect`, `rm`, `stats`, `timeout`, `ps`, `kill`, `system`.

use abx_client::Client;
use clap::Args;

use super::{EXIT_ERROR, parse};

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print ids only.
    #[arg(short, long)]
    quiet: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Sandbox ids or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Also destroy running sandboxes.
    #[arg(short, long)]
    force: bool,
    /// Sandbox ids or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct IdArg {
    /// Sandbox id or name.
    id: String,
}

#[derive(Debug, Args)]
pub struct TimeoutArgs {
    /// Sandbox id or name.
    id: String,
    /// New timeout from now, e.g. 30m (0 removes it).
    #[arg(value_parser = parse::duration)]
    duration: u64,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Sandbox id or name.
    id: String,
    /// Process id inside the sandbox.
    pid: u32,
    /// Signal name or number.
    #[arg(short, long, default_value = "TERM")]
    signal: String,
}

pub async fn ls(client: &Client, a: LsArgs) -> anyhow::Result<i32> {
    let list = client.list_sandboxes().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if a.quiet {
        for sb in list {
            println!("{}", sb.id);
        }
    } else {
        println!("{:<14} {:<20} {:<12} {:<10} {:<10} EXPIRES", "ID", "NAME", "TEMPLATE", "STATE", "CREATED");
        for sb in list {
            let state = sb.state.as_str();
            println!(
                "{:<14} {:<20} {:<12} {:<10} {:<10} {}",
                sb.id,
                sb.name.as_deref().unwrap_or("-"),
                sb.template,
                state,
                parse::relative(sb.created_at),
                sb.expires_at.map(parse::relative).unwrap_or_else(|| "never".into())
            );
        }
    }
    Ok(0)
}

pub async fn inspect(client: &Client, a: InspectArgs) -> anyhow::Result<i32> {
    let mut out = Vec::new();
    for id in &a.ids {
        out.push(client.get_sandbox(id).await?);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

pub async fn rm(client: &Client, a: RmArgs) -> anyhow::Result<i32> {
    let mut code = 0;
    for id in &a.ids {
        match client.delete_sandbox(id, a.force).await {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("agentbox: {id}: {e}");
                code = EXIT_ERROR;
            }
        }
    }
    Ok(code)
}

pub async fn stats(client: &Client, a: IdArg) -> anyhow::Result<i32> {
    let s = client.stats(&a.id).await?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(0)
}

pub async fn timeout(client: &Client, a: TimeoutArgs) -> anyhow::Result<i32> {
    let sb = client.set_timeout(&a.id, a.duration).await?;
    match sb.expires_at {
        Some(t) => println!("{} expires {}", sb.id, parse::relative(t)),
        None => println!("{} has no timeout", sb.id),
    }
    Ok(0)
}

pub async fn ps(client: &Client, a: IdArg) -> anyhow::Result<i32> {
    let procs = client.processes(&a.id).await?;
    println!("{:<8} {:<10} {:<8} COMMAND", "PID", "STATE", "TTY");
    for p in procs {
        let state = match p.exit {
            None => "running".to_string(),
            Some(st) => format!("exit {}", st.shell_code()),
        };
        println!("{:<8} {:<10} {:<8} {}", p.pid, state, if p.tty { "yes" } else { "no" }, p.argv.join(" "));
    }
    Ok(0)
}

pub async fn kill(client: &Client, a: KillArgs) -> anyhow::Result<i32> {
    client.signal(&a.id, a.pid, &a.signal).await?;
    Ok(0)
}

pub async fn system(client: &Client) -> anyhow::Result<i32> {
    println!("{}", serde_json::to_string_pretty(&client.system().await?)?);
    Ok(0)
}

/// `pause` and `resume`: print the sandbox's new state.
pub async fn pause(client: &Client, a: IdArg, pause: bool) -> anyhow::Result<i32> {
    let sb = if pause { client.pause(&a.id).await? } else { client.resume(&a.id).await? };
    println!("{} {}", sb.id, sb.state.as_str());
    Ok(0)
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// Sandbox id or name.
    id: String,
    /// Also write a tar of the added and changed paths to this file (`-`: to standard
    /// output, the list then goes to standard error).
    #[arg(long)]
    tar: Option<std::path::PathBuf>,
    /// Since this snapshot (id or name) instead of since the template.
    #[arg(long)]
    since: Option<String>,
    /// With --tar: the deletions in the tar too, as OCI whiteouts (`.wh.NAME`), so that
    /// the tar is a layer that recreates the sandbox's files over its template (or the
    /// snapshot).
    #[arg(long, requires = "tar")]
    whiteouts: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `diff`: `A /path`, `C /path`, `D /path` lines, sorted by path.
pub async fn diff(client: &Client, a: DiffArgs) -> anyhow::Result<i32> {
    let d = client.diff_since(&a.id, a.since.as_deref()).await?;
    let to_stdout = a.tar.as_deref() == Some(std::path::Path::new("-"));
    let mut listing = String::new();
    if a.json {
        listing = serde_json::to_string_pretty(&d)? + "\n";
    } else {
        let mut lines: Vec<(String, char)> = Vec::new();
        lines.extend(d.added.iter().map(|e| (e.path.clone(), 'A')));
        lines.extend(d.changed.iter().map(|e| (e.path.clone(), 'C')));
        lines.extend(d.deleted.iter().map(|e| (e.path.clone(), 'D')));
        lines.sort();
        for (p, k) in lines {
            listing.push_str(&format!("{k} {p}\n"));
        }
    }
    if to_stdout {
        eprint!("{listing}");
    } else {
        print!("{listing}");
    }
    if let Some(path) = a.tar {
        let tar = client.diff_layer(&a.id, a.since.as_deref(), a.whiteouts).await?;
        if to_stdout {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&tar).and_then(|_| out.flush()).map_err(|e| anyhow::anyhow!("write the tar: {e}"))?;
        } else {
            std::fs::write(&path, tar).map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
        }
    }
    Ok(0)
}
