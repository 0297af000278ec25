//! `agentbox daemon`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use tracing::info;

use abx_daemon::{Config, Core, Listen, Manager};

use super::parse;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// State root (sandboxes, layers, templates, database).
    #[arg(long, default_value = "/var/lib/agentbox")]
    root: PathBuf,
    /// API address, unix:PATH or tcp:ADDR:PORT (repeatable).
    #[arg(long)]
    listen: Vec<Listen>,
    /// Prefix of every host object this daemon creates (must start with "abx").
    #[arg(long, default_value = "abx")]
    prefix: String,
    /// First host uid given to sandboxes.
    #[arg(long, default_value_t = 1 << 27)]
    uid_start: u32,
    /// Number of 65536-uid ranges after --uid-start (the maximum number of sandboxes).
    #[arg(long, default_value_t = 4096)]
    uid_slots: u32,
    /// Guest agent binary (default: agentbox-agent next to this binary, or
    /// /usr/local/lib/agentbox/agentbox-agent).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Machine-wide template build cache.
    #[arg(long, default_value = "/var/cache/agentbox")]
    cache: PathBuf,
    /// Seccomp policy file (default: the embedded policy).
    #[arg(long)]
    seccomp_policy: Option<PathBuf>,
    /// Timeout of sandboxes that do not ask for one (0: none).
    #[arg(long, default_value = "1h", value_parser = parse::duration)]
    default_timeout: u64,
    /// Where sandbox data (each sandbox's writable layer) lives: `dir` (under the state
    /// root), `image` (an ext4 image with a journal, loop-mounted at <root>/<prefix>-data)
    /// or `auto` (image when the state root is on ext4 without a journal, where inode
    /// allocation slows down under sandbox churn; dir otherwise).
    #[arg(long, default_value = "auto")]
    data: abx_daemon::DataMode,
    /// Size of the data image (sparse; default: half the free space, 1G to 1T).
    #[arg(long, value_parser = parse::size)]
    data_size: Option<u64>,
    /// Slots kept ready ahead of demand: their namespaces (user, pid, mount, network, ...)
    /// are created and joined to the slot's cgroups before any create asks, which takes
    /// about 1 ms off each create. 0 disables it.
    #[arg(long, default_value_t = 2)]
    prewarm: usize,
    /// Sandbox address pool (IPv4 CIDR; each sandbox slot gets one address, the first
    /// goes to the gateway), or `none` for loopback-only sandboxes without egress.
    #[arg(long, default_value = "10.213.0.0/16")]
    subnet: String,
    /// Host interface sandbox egress is masqueraded to: a name, `auto` (the interface of
    /// the default route) or `none`. Forwarding is switched on for it when the first
    /// sandbox with egress starts.
    #[arg(long, default_value = "auto")]
    uplink: String,
    /// Where the DNS proxy resolves allowed names (ADDR:PORT), or `auto` (the first
    /// nameserver of /etc/resolv.conf).
    #[arg(long, default_value = "auto")]
    dns_upstream: String,
    /// The ingress proxy for ports inside sandboxes: tcp:ADDR:PORT, or `none`.
    #[arg(long, default_value = "tcp:127.0.0.1:7480")]
    ingress: String,
    /// Domain of ingress host names, `<port>-<id>.<domain>`.
    #[arg(long, default_value = "agentbox.localhost")]
    domain: String,
    /// Who may reach the ports of sandboxes that do not choose at create (`--ingress`):
    /// `public` (anyone who reaches the proxy) or `token` (requests must carry the
    /// sandbox's token in the header E2b-Traffic-Access-Token).
    #[arg(long, default_value = "public")]
    ingress_access: abx_api::IngressAccess,
    /// Pause running sandboxes after this long without a request to them (exec, files,
    /// ingress, ...), an attached exec session or network traffic of their own, e.g. 10m
    /// (0: never). They resume on the next request.
    #[arg(long, default_value = "0", value_parser = parse::duration)]
    idle_pause: u64,
    /// How long the egress audit of a removed sandbox stays readable (`agentbox net log
    /// ID`, `net audits`), e.g. 90d; 0 removes it with the sandbox. Only sandboxes that
    /// recorded network activity leave one.
    #[arg(long, default_value = "7d", value_parser = parse::duration)]
    audit_retention: u64,
    /// The most disk the kept audits of removed sandboxes may take, e.g. 10G; past it the
    /// oldest removals' audits go before their retention ends (checked every minute).
    /// 0: no limit but the retention.
    #[arg(long, default_value = "1G", value_parser = parse::size)]
    audit_max_size: u64,
    /// Also append every sandbox's egress audit events to this file, one JSON object per
    /// line with `sandbox` (id), `sandbox_name` and `tenant`, for a log shipper (reopened
    /// every 200 ms, so rotation by renaming works).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, or tracing directives).
    #[arg(long, default_value = "info,hickory_server=warn,rmcp=warn", env = "AGENTBOX_LOG")]
    log: String,
}

fn find_agent(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    [dir.join("agentbox-agent"), PathBuf::from("/usr/local/lib/agentbox/agentbox-agent")]
        .into_iter()
        .find(|p| p.is_file())
}

fn config(a: DaemonArgs) -> anyhow::Result<Config> {
    let exe = std::env::current_exe().context("find the agentbox binary")?;
    let agent = match a.agent {
        Some(p) => p,
        None => find_agent(&exe).context(
            "guest agent binary not found next to agentbox or in /usr/local/lib/agentbox; build it \
             (cargo build --release --target x86_64-unknown-linux-musl -p abx-agent) or pass --agent",
        )?,
    };
    if !agent.is_file() {
        bail!("guest agent {} does not exist", agent.display());
    }
    let mut cfg = Config::new(a.root, exe, agent);
    if !a.listen.is_empty() {
        cfg.listen = a.listen;
    }
    cfg.prefix = a.prefix;
    cfg.uid_start = a.uid_start;
    cfg.uid_slots = a.uid_slots;
    cfg.cache_dir = a.cache;
    cfg.seccomp_policy = a.seccomp_policy;
    cfg.data = a.data;
    cfg.data_size = a.data_size;
    cfg.prewarm = a.prewarm;
    cfg.idle_pause = (a.idle_pause > 0).then(|| std::time::Duration::from_secs(a.idle_pause));
    cfg.network = network(&a.subnet, &a.uplink, &a.dns_upstream, &a.ingress, &a.domain)?;
    if let Some(n) = cfg.network.as_mut() {
        n.ingress_access = a.ingress_access;
        n.audit_retention = std::time::Duration::from_secs(a.audit_retention);
        n.audit_max_size = a.audit_max_size;
        n.audit_log = match a.audit_log {
            Some(p) => Some(std::path::absolute(&p).with_context(|| format!("--audit-log {}", p.display()))?),
            None => None,
        };
    }
    cfg.default_timeout = (a.default_timeout > 0).then(|| std::time::Duration::from_secs(a.default_timeout));
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

fn network(
    subnet: &str,
    uplink: &str,
    dns: &str,
    ingress: &str,
    domain: &str,
) -> anyhow::Result<Option<abx_daemon::net::NetConfig>> {
    if subnet == "none" {
        return Ok(None);
    }
    let mut n = abx_daemon::net::NetConfig::defaults();
    n.subnet = subnet.parse().map_err(|e| anyhow::anyhow!("invalid --subnet '{subnet}': {e}"))?;
    n.uplink = match uplink {
        "auto" => abx_daemon::net::default_uplink(),
        "none" => None,
        name => {
            // /proc/net is this process's network namespace (/sys/class/net may not be).
            let devs = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
            if !devs.lines().any(|l| l.split(':').next().map(str::trim) == Some(name)) {
                bail!("--uplink {name}: no such network interface");
            }
            Some(name.to_string())
        }
    };
    n.dns_upstream = match dns {
        "auto" => abx_daemon::net::system_resolver(),
        "none" => None,
        a => Some(
            a.parse().with_context(|| format!("invalid --dns-upstream '{a}': use ADDR:PORT, e.g. 192.0.2.53:53"))?,
        ),
    };
    n.ingress = match ingress {
        "none" => None,
        t => Some(
            t.strip_prefix("tcp:")
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("invalid --ingress '{t}': use tcp:ADDR:PORT or none"))?,
        ),
    };
    n.domain = domain.trim_end_matches('.').to_ascii_lowercase();
    Ok(Some(n))
}

pub async fn main(a: DaemonArgs) -> anyhow::Result<i32> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(&a.log).with_context(|| format!("invalid --log '{}'", a.log))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if !rustix::process::geteuid().is_root() {
        bail!("the daemon must run as root (it creates namespaces, cgroups and mounts)");
    }
    let cfg = config(a)?;
    std::fs::create_dir_all(&cfg.root).with_context(|| format!("create state root {}", cfg.root.display()))?;
    let lock = lock_root(&cfg.root)?;
    let listen = cfg.listen.clone();
    let manager = tokio::task::spawn_blocking(move || {
        let m = Manager::open(cfg)?;
        m.reconcile()?;
        Ok::<_, String>(m)
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    // reconcile() re-adopts sandboxes; their watcher tasks need the runtime, which is here.
    info!(sandboxes = manager.count(), "daemon ready");
    if let Some(net) = &manager.net {
        let router = std::sync::Arc::new(abx_daemon::manager::IngressRouter(std::sync::Arc::downgrade(&manager)));
        if let Err(e) = net.start(router).await {
            let left = manager.count() > 0;
            net.stop(left).await;
            bail!(e);
        }
    }
    manager.refill();
    manager.start_pools();
    manager.watch_idle();
    let core = Core::new(manager.clone());
    // The handlers are installed before the sockets exist: a SIGTERM sent as soon as the
    // socket appears must not find the default action (death without cleanup).
    let shutdown = shutdown_signal()?;
    abx_daemon::server::serve(core, &listen, shutdown).await.context("serve the API")?;
    info!("shutting down; sandboxes keep running");
    manager.wait_cleanups().await;
    if let Some(net) = &manager.net {
        net.stop(manager.count() > 0).await;
    }
    tokio::task::spawn_blocking(move || manager.shutdown()).await?;
    drop(lock);
    Ok(0)
}

/// One daemon per state root.
fn lock_root(root: &Path) -> anyhow::Result<std::fs::File> {
    let path = root.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // A daemon that was just killed can leave the lock held for a moment (a child it was
    // forking still shares the descriptor until it execs): wait a little before giving up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while let Err(e) = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if std::time::Instant::now() >= deadline {
            return Err(e).with_context(|| format!("another daemon already uses the state root {}", root.display()));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(f)
}

fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
