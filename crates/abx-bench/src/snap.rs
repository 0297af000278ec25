//! The snapshot, fork and pause/resume benchmark (`agentbox-bench snap`, run by
//! `scripts/bench-snap`): issue 4's speed targets, against peers in the same run.
//!
//! 1. **Snapshot of a sandbox that wrote many files.** A fresh sandbox writes `--files`
//!    small files from a busybox shell loop; then `POST /v1/sandboxes/{id}/snapshots` is
//!    timed as the client sees it, with the `frozen_ms` the daemon reports (how long the
//!    sandbox was frozen), and a second snapshot right after the first (nothing left to
//!    write out). Peers: `podman commit` of a container that wrote the same files, and
//!    `cp -a --reflink=auto` of a directory holding them (a snapshot without
//!    copy-on-write).
//! 2. **Fork.** `POST /v1/snapshots/{id}/fork` with `count` 10 against one plain create,
//!    alternating which goes first, everything destroyed after each round.
//! 3. **Pause and resume** of a sandbox with a process running (`sleep` in the
//!    background).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use abx_client::{Client, CreateSandbox, ExecRequest, ForkRequest, SandboxState};
use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use crate::create;
use crate::stats::{ms, verdict};

#[derive(Debug, Args)]
pub struct SnapArgs {
    /// Daemon address.
    #[arg(long, env = "AGENTBOX_HOST", default_value = "unix:/run/agentbox/agentbox.sock")]
    host: String,
    /// Template of the sandboxes (a busybox shell is enough: `mini`).
    #[arg(long, default_value = "mini")]
    template: String,
    /// Files written before each snapshot.
    #[arg(long, default_value_t = 10_000)]
    files: u32,
    /// Measured snapshot rounds (a fresh sandbox each; one more as warm-up).
    #[arg(long, default_value_t = 20)]
    snapshots: usize,
    /// Wait between the first and the second snapshot of a round, in milliseconds (0:
    /// right after; the daemon then still measures the first one's size in the background).
    #[arg(long, default_value_t = 0)]
    again_after_ms: u64,
    /// Measured fork rounds (one fork of --fork-count and one create each).
    #[arg(long, default_value_t = 20)]
    forks: usize,
    /// Sandboxes per fork.
    #[arg(long, default_value_t = 10)]
    fork_count: u32,
    /// Measured pauses and resumes.
    #[arg(long, default_value_t = 100)]
    pauses: usize,
    /// Peers of the snapshot: podman (`podman commit`), copy (`cp -a --reflink=auto`).
    #[arg(long, value_delimiter = ',', default_value = "podman,copy")]
    peers: Vec<String>,
    /// Measured rounds per peer (one more as warm-up).
    #[arg(long, default_value_t = 20)]
    peer_runs: usize,
    /// Directory for the peers' files (podman's private storage, the copies); made if
    /// missing, emptied afterwards. Required with peers.
    #[arg(long)]
    work: Option<PathBuf>,
    /// The podman binary.
    #[arg(long, default_value = "podman")]
    podman: PathBuf,
    /// Host directory with the template's root filesystem (the podman image); default:
    /// asked from the daemon.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn main(a: SnapArgs) -> anyhow::Result<()> {
    if a.peers.iter().any(|p| p == "podman") {
        // Before any thread exists: podman runs its containers with crun, which refuses
        // hybrid cgroup hosts (see peers.rs); the host's mounts are not touched.
        crate::peers::hide_cgroup2()?;
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(snap(a))
}

// --- statistics ---

/// Milliseconds of a set of runs.
#[derive(Debug, Clone, Serialize)]
struct Stat {
    runs: usize,
    median_ms: f64,
    p90_ms: f64,
    min_ms: f64,
    max_ms: f64,
    samples_ms: Vec<f64>,
}

/// Nearest rank, as in the cycle summaries (stats.rs).
fn rank(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn stat(samples: Vec<f64>) -> Stat {
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    Stat {
        runs: samples.len(),
        median_ms: rank(&sorted, 0.5),
        p90_ms: rank(&sorted, 0.9),
        min_ms: sorted.first().copied().unwrap_or(f64::NAN),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        samples_ms: samples,
    }
}

// --- helpers ---

/// Time for destroyed sandboxes to be cleaned up and the prepared slots to be refilled
/// before the next measurement.
const SETTLE: Duration = Duration::from_millis(100);

/// `sh -c SCRIPT` as root in the sandbox; its stdout. A non-zero exit is an error.
async fn sh(c: &Client, id: &str, script: &str) -> anyhow::Result<String> {
    let req = ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: Some("0".into()),
        ..Default::default()
    };
    let out = c.exec(id, &req).await.context("exec")?.collect().await?;
    if out.status.code != Some(0) {
        bail!("sh -c '{script}' in {id}: {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A busybox shell loop writing `n` small files into `/w` (no process per file).
fn write_files(n: u32) -> String {
    format!("mkdir /w && i=0 && while [ $i -lt {n} ]; do echo $i > /w/f$i || exit 1; i=$((i+1)); done")
}

/// The name of the filesystem holding `path`, for the report.
#[allow(clippy::unnecessary_cast)] // f_type's type differs between architectures
fn fs_name(path: &Path) -> String {
    let Ok(s) = rustix::fs::statfs(path) else { return "?".into() };
    match s.f_type as i64 {
        0xEF53 => "ext4".into(),
        0x9123_683E => "btrfs".into(),
        0x5846_5342 => "xfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        t => format!("0x{t:x}"),
    }
}

// --- 1. snapshots ---

#[derive(Debug, Default)]
struct SnapshotSamples {
    write_ms: Vec<f64>,
    api_ms: Vec<f64>,
    frozen_ms: Vec<f64>,
    again_api_ms: Vec<f64>,
    again_frozen_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Snapshots {
    files: u32,
    /// The filesystem of the daemon's sandbox data.
    data_fs: String,
    /// Writing the files from the shell loop (exec round trip included).
    write: Stat,
    /// The snapshot request right after the writes, as the client sees it.
    api: Stat,
    /// What the daemon reports as frozen time for it.
    frozen: Stat,
    /// A second snapshot `again_after_ms` after the first: nothing dirty left.
    again_after_ms: u64,
    again_api: Stat,
    again_frozen: Stat,
}

/// One round: a fresh sandbox writes the files, is snapshotted twice, and everything is
/// removed. `verify`: also checks that a sandbox made from the snapshot has the files.
async fn snapshot_round(c: &Client, a: &SnapArgs, s: &mut SnapshotSamples, verify: bool) -> anyhow::Result<()> {
    let id = create(c, &a.template).await?;
    let mut snaps = Vec::new();
    let result = async {
        let t = Instant::now();
        sh(c, &id, &write_files(a.files)).await?;
        let write = ms(t.elapsed());
        let t = Instant::now();
        let first = c.snapshot(&id, None).await.context("snapshot")?;
        let api = ms(t.elapsed());
        snaps.push(first.id.clone());
        tokio::time::sleep(Duration::from_millis(a.again_after_ms)).await;
        let t = Instant::now();
        let second = c.snapshot(&id, None).await.context("second snapshot")?;
        let again = ms(t.elapsed());
        snaps.push(second.id.clone());
        if verify {
            let copy = c
                .create_sandbox(&CreateSandbox { snapshot: Some(first.id.clone()), ..Default::default() })
                .await
                .context("create from the snapshot")?;
            let count = sh(c, &copy.id, "ls /w | wc -l").await;
            let _ = c.delete_sandbox(&copy.id, true).await;
            let count = count?;
            if count.trim() != a.files.to_string() {
                bail!("a sandbox from the snapshot has {} files in /w, not {}", count.trim(), a.files);
            }
        }
        s.write_ms.push(write);
        s.api_ms.push(api);
        s.frozen_ms.push(first.frozen_ms);
        s.again_api_ms.push(again);
        s.again_frozen_ms.push(second.frozen_ms);
        anyhow::Ok(())
    }
    .await;
    let _ = c.delete_sandbox(&id, true).await;
    for snap in &snaps {
        let _ = c.delete_snapshot(snap).await;
    }
    result
}

async fn snapshots(c: &Client, a: &SnapArgs) -> anyhow::Result<Snapshots> {
    let data_fs = fs_name(Path::new(&c.system().await?.data.slots));
    let mut warm = SnapshotSamples::default();
    snapshot_round(c, a, &mut warm, true).await.context("snapshot warm-up")?;
    let mut s = SnapshotSamples::default();
    for i in 0..a.snapshots {
        tokio::time::sleep(SETTLE).await;
        snapshot_round(c, a, &mut s, false).await.with_context(|| format!("snapshot round {}", i + 1))?;
    }
    Ok(Snapshots {
        files: a.files,
        data_fs,
        write: stat(s.write_ms),
        api: stat(s.api_ms),
        frozen: stat(s.frozen_ms),
        again_after_ms: a.again_after_ms,
        again_api: stat(s.again_api_ms),
        again_frozen: stat(s.again_frozen_ms),
    })
}

// --- peers of the snapshot ---

#[derive(Debug, Serialize)]
struct Peer {
    name: String,
    detail: String,
    result: Stat,
}

/// podman with storage, configuration and home of its own under `dir` (nothing of it is
/// left on the host but what the script removes: podman keeps a blob-info cache under
/// /var/lib/containers/cache when run as root, whatever its options).
struct Podman {
    bin: PathBuf,
    dir: PathBuf,
}

const PODMAN_IMAGE: &str = "localhost/abxbench-snap-mini";

impl Podman {
    fn cmd(&self) -> tokio::process::Command {
        let d = &self.dir;
        let mut c = tokio::process::Command::new(&self.bin);
        c.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("HOME", d.join("home"))
            .env("XDG_CONFIG_HOME", d.join("home/.config"))
            .env("XDG_DATA_HOME", d.join("home/.local/share"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--network-config-dir")
            .arg(d.join("net"))
            .args(["--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .stdin(std::process::Stdio::null());
        c
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cmd().args(args).output().await.with_context(|| format!("run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!("podman {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn setup(bin: PathBuf, dir: PathBuf, rootfs: &Path) -> anyhow::Result<Podman> {
        for d in ["root", "run", "tmp", "net", "home"] {
            std::fs::create_dir_all(dir.join(d)).with_context(|| format!("create {}", dir.join(d).display()))?;
        }
        // The network configuration directory in containers.conf too: `podman commit`
        // does not take it from the command line and would lock /etc/cni/net.d.
        let conf = format!("[network]\nnetwork_config_dir = \"{}\"\n", dir.join("net").display());
        std::fs::write(dir.join("containers.conf"), conf)?;
        let tar = dir.join("rootfs.tar");
        let st = tokio::process::Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .await
            .context("run tar")?;
        if !st.success() {
            bail!("tar of {} failed", rootfs.display());
        }
        let p = Podman { bin, dir };
        p.run(&["import", "-q", &tar.to_string_lossy(), PODMAN_IMAGE]).await?;
        std::fs::remove_file(&tar)?;
        Ok(p)
    }

    /// A container writes the files (`podman run`, crun, no cgroups: this host's are
    /// hybrid); its `podman commit` is timed.
    async fn round(&self, i: usize, files: u32) -> anyhow::Result<f64> {
        let (ctr, img) = (format!("abxbench-snap-c{i}"), format!("localhost/abxbench-snap-i{i}"));
        let script = write_files(files);
        self.run(&[
            "run",
            "--name",
            &ctr,
            "--network",
            "none",
            "--cgroups",
            "disabled",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            PODMAN_IMAGE,
            "/bin/sh",
            "-c",
            &script,
        ])
        .await?;
        let t = Instant::now();
        let committed = self.run(&["commit", "-q", &ctr, &img]).await;
        let took = ms(t.elapsed());
        let _ = self.run(&["rm", "-f", &ctr]).await;
        if committed.is_ok() {
            let _ = self.run(&["rmi", &img]).await;
        }
        committed?;
        Ok(took)
    }

    async fn teardown(&self) {
        let _ = self.run(&["rm", "-a", "-f"]).await;
        let _ = self.run(&["rmi", "-a", "-f"]).await;
    }
}

async fn podman_peer(a: &SnapArgs, work: &Path, rootfs: &Path) -> anyhow::Result<Peer> {
    let p = Podman::setup(a.podman.clone(), work.join("podman"), rootfs).await?;
    let result = async {
        let version = p.run(&["--version"]).await?.trim().to_string();
        p.round(0, a.files).await.context("podman warm-up")?;
        let mut v = Vec::new();
        for i in 1..=a.peer_runs {
            v.push(p.round(i, a.files).await?);
        }
        anyhow::Ok(Peer {
            name: "podman commit".into(),
            detail: format!(
                "{version}, overlay storage on {}, of an exited container that wrote the files (not paused)",
                fs_name(work)
            ),
            result: stat(v),
        })
    }
    .await;
    p.teardown().await;
    result
}

async fn copy_peer(a: &SnapArgs, work: &Path) -> anyhow::Result<Peer> {
    let dir = work.join("copy");
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    for i in 0..a.files {
        std::fs::write(src.join(format!("f{i}")), format!("{i}\n"))?;
    }
    let result = async {
        let mut v = Vec::new();
        for i in 0..=a.peer_runs {
            let dest = dir.join(format!("copy{i}"));
            let t = Instant::now();
            let st = tokio::process::Command::new("cp")
                .args(["-a", "--reflink=auto", "--no-target-directory"])
                .arg(&src)
                .arg(&dest)
                .status()
                .await
                .context("run cp")?;
            let took = ms(t.elapsed());
            if !st.success() {
                bail!("cp -a of {} failed", src.display());
            }
            std::fs::remove_dir_all(&dest)?;
            if i > 0 {
                v.push(took); // the first is a warm-up
            }
        }
        anyhow::Ok(Peer {
            name: "cp -a --reflink=auto".into(),
            detail: format!("of a directory holding the same files, on {} (not synced)", fs_name(&dir)),
            result: stat(v),
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

// --- 2. forks ---

#[derive(Debug, Serialize)]
struct Forks {
    count: u32,
    /// `POST /v1/snapshots/{id}/fork` with `count`.
    fork: Stat,
    /// One `POST /v1/sandboxes`.
    create: Stat,
    /// Median of the fork / median of the create.
    ratio: f64,
}

async fn destroy_all(c: &Client, ids: &[String]) {
    futures_util::future::join_all(ids.iter().map(|id| c.delete_sandbox(id, true))).await;
}

async fn fork_once(c: &Client, snap: &str, count: u32, verify: bool) -> anyhow::Result<f64> {
    let t = Instant::now();
    let r = c.fork_snapshot(snap, &ForkRequest { count: Some(count), ..Default::default() }).await.context("fork")?;
    let took = ms(t.elapsed());
    let ids: Vec<String> = r.sandboxes.iter().map(|s| s.id.clone()).collect();
    let checked = async {
        if ids.len() != count as usize {
            bail!("fork made {} sandboxes, not {count}", ids.len());
        }
        if verify {
            for id in &ids {
                let got = sh(c, id, "cat /forked").await?;
                if got != "from the snapshot\n" {
                    bail!("fork {id}: /forked holds {got:?}");
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    destroy_all(c, &ids).await;
    checked.map(|()| took)
}

async fn create_once(c: &Client, template: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let id = create(c, template).await?;
    let took = ms(t.elapsed());
    c.delete_sandbox(&id, true).await.context("destroy")?;
    Ok(took)
}

async fn forks(c: &Client, a: &SnapArgs) -> anyhow::Result<Forks> {
    // The source: a sandbox with one file of its own, snapshotted, then destroyed.
    let id = create(c, &a.template).await?;
    let snap = async {
        sh(c, &id, "echo 'from the snapshot' > /forked").await?;
        Ok::<_, anyhow::Error>(c.snapshot(&id, None).await.context("snapshot")?.id)
    }
    .await;
    let _ = c.delete_sandbox(&id, true).await;
    let snap = snap?;
    let result = async {
        fork_once(c, &snap, a.fork_count, true).await.context("fork warm-up")?;
        tokio::time::sleep(SETTLE).await;
        create_once(c, &a.template).await?;
        let (mut fork, mut one) = (Vec::new(), Vec::new());
        for round in 0..a.forks {
            for k in 0..2 {
                tokio::time::sleep(SETTLE).await;
                if (round + k) % 2 == 0 {
                    fork.push(fork_once(c, &snap, a.fork_count, false).await?);
                } else {
                    one.push(create_once(c, &a.template).await?);
                }
            }
        }
        let (fork, create) = (stat(fork), stat(one));
        anyhow::Ok(Forks { count: a.fork_count, ratio: fork.median_ms / create.median_ms, fork, create })
    }
    .await;
    let _ = c.delete_snapshot(&snap).await;
    result
}

// --- 3. pause and resume ---

#[derive(Debug, Serialize)]
struct PauseResume {
    pause: Stat,
    resume: Stat,
}

const PAUSE_WARMUP: usize = 10;

async fn pause_resume(c: &Client, a: &SnapArgs) -> anyhow::Result<PauseResume> {
    let id = create(c, &a.template).await?;
    let result = async {
        let req = ExecRequest { cmd: vec!["sleep".into(), "1000".into()], ..Default::default() };
        let pid = c.exec_background(&id, &req).await.context("start sleep")?;
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for i in 0..PAUSE_WARMUP + a.pauses {
            let t = Instant::now();
            let s = c.pause(&id).await.context("pause")?;
            let p = ms(t.elapsed());
            if s.state != SandboxState::Paused {
                bail!("after pause the sandbox is {:?}", s.state);
            }
            let t = Instant::now();
            let s = c.resume(&id).await.context("resume")?;
            let r = ms(t.elapsed());
            if s.state != SandboxState::Running {
                bail!("after resume the sandbox is {:?}", s.state);
            }
            if i >= PAUSE_WARMUP {
                pause.push(p);
                resume.push(r);
            }
        }
        if !c.processes(&id).await?.iter().any(|p| p.pid == pid) {
            bail!("the background sleep (pid {pid}) did not survive the pauses");
        }
        anyhow::Ok(PauseResume { pause: stat(pause), resume: stat(resume) })
    }
    .await;
    let _ = c.delete_sandbox(&id, true).await;
    result
}

// --- the report ---

#[derive(Debug, Serialize)]
struct SnapReport {
    snapshots: Snapshots,
    peers: Vec<Peer>,
    forks: Forks,
    pause_resume: PauseResume,
}

/// Issue 4's targets: a snapshot under 10 ms, a fork of 10 in under 10 times one create,
/// pause and resume under 5 ms each (medians).
const SNAPSHOT_TARGET_MS: f64 = 10.0;
const FORK_TARGET_RATIO: f64 = 10.0;
const PAUSE_TARGET_MS: f64 = 5.0;

impl SnapReport {
    fn markdown(&self) -> String {
        let mut o = String::new();
        let mut line = |s: String| {
            o.push_str(&s);
            o.push('\n');
        };
        line("| # | measurement | subject | runs | median ms | p90 ms | target (median) |".into());
        line("|---|---|---|---|---|---|---|".into());
        let s = &self.snapshots;
        let row = |what: &str, subject: &str, st: &Stat, target: String| {
            format!("| {what} | {subject} | {} | {:.2} | {:.2} | {target} |", st.runs, st.median_ms, st.p90_ms)
        };
        let snap_target =
            |st: &Stat| format!("< {SNAPSHOT_TARGET_MS} ms: {}", verdict(st.median_ms < SNAPSHOT_TARGET_MS));
        let what = format!("1 | snapshot after writing {} files", s.files);
        line(row(&what, "agentbox: API round trip", &s.api, snap_target(&s.api)));
        line(row(&what, "agentbox: frozen (daemon's `frozen_ms`)", &s.frozen, snap_target(&s.frozen)));
        let again = match s.again_after_ms {
            0 => "again right after".to_string(),
            n => format!("again {n} ms later"),
        };
        line(row(&what, &format!("agentbox, {again}: API round trip"), &s.again_api, String::new()));
        line(row(&what, &format!("agentbox, {again}: frozen"), &s.again_frozen, String::new()));
        for p in &self.peers {
            line(row(&what, &p.name, &p.result, String::new()));
        }
        line(row(&what, "(writing the files: exec of the shell loop)", &s.write, String::new()));
        let f = &self.forks;
        line(row(
            &format!("2 | fork of {} from a snapshot", f.count),
            "agentbox: `POST /v1/snapshots/{id}/fork`",
            &f.fork,
            format!("fork / create {:.2} < {FORK_TARGET_RATIO}: {}", f.ratio, verdict(f.ratio < FORK_TARGET_RATIO)),
        ));
        line(row("2 | one create", "agentbox: `POST /v1/sandboxes`", &f.create, String::new()));
        let pr = &self.pause_resume;
        let pause_target = |st: &Stat| format!("< {PAUSE_TARGET_MS} ms: {}", verdict(st.median_ms < PAUSE_TARGET_MS));
        line(row("3 | pause (a `sleep` running)", "agentbox: `POST …/pause`", &pr.pause, pause_target(&pr.pause)));
        line(row("3 | resume", "agentbox: `POST …/resume`", &pr.resume, pause_target(&pr.resume)));
        o.push('\n');
        o.push_str(&format!("Sandbox data on {}.", s.data_fs));
        for p in &self.peers {
            o.push_str(&format!(" {}: {}.", p.name, p.detail));
        }
        o.push('\n');
        o
    }
}

async fn snap(a: SnapArgs) -> anyhow::Result<()> {
    let c = Client::new(&a.host)?;
    c.system().await.context("the daemon")?;
    let peers_wanted: Vec<&str> = a.peers.iter().map(String::as_str).filter(|p| !p.is_empty()).collect();
    for p in &peers_wanted {
        if !matches!(*p, "podman" | "copy") {
            bail!("unknown peer {p} (podman, copy)");
        }
    }
    let work = match (&a.work, peers_wanted.is_empty()) {
        (Some(w), _) => Some(w.clone()),
        (None, true) => None,
        (None, false) => bail!("peers need --work"),
    };
    eprintln!("1/3 snapshots: {} rounds of {} files", a.snapshots, a.files);
    let snapshots = snapshots(&c, &a).await?;
    let mut peers = Vec::new();
    if let Some(work) = &work {
        std::fs::create_dir_all(work)?;
        for p in &peers_wanted {
            eprintln!("1/3 peer {p}: {} rounds", a.peer_runs);
            peers.push(match *p {
                "podman" => {
                    let rootfs = match &a.rootfs {
                        Some(r) => r.clone(),
                        None => crate::rootfs_of(&c, &a.template).await?,
                    };
                    podman_peer(&a, work, &rootfs).await?
                }
                _ => copy_peer(&a, work).await?,
            });
        }
    }
    eprintln!("2/3 forks: {} rounds of a fork of {} and a create", a.forks, a.fork_count);
    let forks = forks(&c, &a).await?;
    eprintln!("3/3 pause/resume: {}", a.pauses);
    let pause_resume = pause_resume(&c, &a).await?;
    let report = SnapReport { snapshots, peers, forks, pause_resume };
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
    fn stats_by_nearest_rank() {
        let s = stat((1..=20).map(f64::from).rev().collect());
        assert_eq!((s.runs, s.median_ms, s.p90_ms, s.min_ms, s.max_ms), (20, 11.0, 18.0, 1.0, 20.0));
        assert!(stat(Vec::new()).median_ms.is_nan());
    }

    #[test]
    fn the_write_loop_is_one_shell() {
        let s = write_files(3);
        assert!(s.starts_with("mkdir /w && ") && s.contains("-lt 3 ]"), "{s}");
    }
}
