//! Warm pools on a real daemon: claims, isolation between claims, refill, the caller's
//! settings applied at claim, rebuilt templates, metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use abx_client::{CreateSandbox, ExecRequest, Limits, SandboxState};

use crate::harness::Daemon;

fn mini() -> CreateSandbox {
    CreateSandbox { template: Some("mini".into()), ..Default::default() }
}

async fn root(d: &Daemon, id: &str, script: &str) -> (String, i32) {
    let req = ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: Some("0".into()),
        ..Default::default()
    };
    let (out, err, code) = d.exec(id, req).await;
    (out + &err, code)
}

async fn ready(d: &Daemon, n: u32) {
    d.wait_for(&format!("{n} pooled sandboxes ready"), Duration::from_secs(30), || async {
        d.client.pool("mini").await.unwrap().ready >= n
    })
    .await;
}

#[tokio::test]
async fn claims_are_isolated_never_reused_and_refilled() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let before = d.client.list_sandboxes().await.unwrap().len();
    // Sizes that make no pool are refused, and the message says how to remove one.
    let e = d.client.set_pool("mini", 0, 0).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_argument"), "{e}");
    assert!(e.to_string().contains("agentbox pool rm mini"), "{e}");
    let e = d.client.set_pool("mini", 3, 2).await.unwrap_err();
    assert!(e.to_string().contains("min 3, max 2") && !e.to_string().contains("pool rm"), "{e}");
    let p = d.client.set_pool("mini", 2, 4).await.unwrap();
    assert_eq!((p.min, p.max), (2, 4));
    ready(&d, 2).await;
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), before, "pooled sandboxes are not listed");

    let a = d.client.create_sandbox(&mini()).await.unwrap();
    let b = d.client.create_sandbox(&mini()).await.unwrap();
    let p = d.client.pool("mini").await.unwrap();
    assert_eq!((p.hits, p.misses), (2, 0), "both creates were claims: {p:?}");
    // Creates the pool cannot serve are made cold and counted as misses.
    let persistent = d.client.create_sandbox(&CreateSandbox { persist: true, ..mini() }).await.unwrap();
    let mut other = mini();
    other.limits.open_files = Some(100);
    let other = d.client.create_sandbox(&other).await.unwrap();
    let p = d.client.pool("mini").await.unwrap();
    assert_eq!((p.hits, p.misses, p.hit_rate), (2, 2, 0.5), "{p:?}");
    for id in [&persistent.id, &other.id] {
        d.client.delete_sandbox(id, true).await.unwrap();
    }
    assert_ne!(a.id, b.id);
    assert_eq!(a.state, SandboxState::Running);

    // Nothing one claim does is visible to the other: files, processes, hostname.
    let (_, code) = root(&d, &a.id, "echo secret > /tmp/mine; sleep 1000 >/dev/null 2>&1 &").await;
    assert_eq!(code, 0);
    assert_eq!(root(&d, &b.id, "cat /tmp/mine").await.1, 1, "b sees a's file");
    let (ps, _) = root(&d, &b.id, "ps -o comm | grep -c sleep || true").await;
    assert_eq!(ps.trim(), "0", "b sees a's process");
    assert_eq!(root(&d, &a.id, "hostname").await.0.trim(), a.id);
    assert_eq!(root(&d, &b.id, "hostname").await.0.trim(), b.id);

    // The pool boots replacements.
    ready(&d, 2).await;
    assert!(d.client.pool("mini").await.unwrap().boots >= 4);

    // A destroyed claim is never handed out again: later claims are new sandboxes with
    // fresh files.
    d.client.delete_sandbox(&a.id, true).await.unwrap();
    for _ in 0..4 {
        let c = d.client.create_sandbox(&mini()).await.unwrap();
        assert!(c.id != a.id && c.id != b.id);
        assert_eq!(root(&d, &c.id, "cat /tmp/mine").await.1, 1, "a claim starts clean");
        d.client.delete_sandbox(&c.id, true).await.unwrap();
    }
    d.client.delete_sandbox(&b.id, true).await.unwrap();

    d.client.delete_pool("mini").await.unwrap();
    assert!(d.client.pool("mini").await.is_err());
    // The pool's sandboxes are destroyed with it: their slots are emptied.
    d.wait_for("pooled sandboxes gone", Duration::from_secs(10), || async {
        let system = d.client.system().await.unwrap();
        system.sandboxes == 0
            && std::fs::read_dir(&d.slots)
                .map(|rd| {
                    rd.flatten().all(|e| d.slot_leftovers(slot_index(&e.file_name().to_string_lossy())).is_empty())
                })
                .unwrap_or(true)
    })
    .await;
}

/// The slot cgroups in the idle CPU class (`cpu.idle` 1), or `None` on a host without
/// `cpu.idle` (before Linux 5.15).
fn idle_slots(d: &Daemon) -> Option<Vec<String>> {
    let parent = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup"]
        .iter()
        .map(|m| std::path::Path::new(m).join(&d.prefix))
        .find(|p| p.is_dir())?;
    let mut idle = Vec::new();
    let mut any = false;
    for e in std::fs::read_dir(parent).ok()?.flatten() {
        if let Ok(v) = std::fs::read_to_string(e.path().join("cpu.idle")) {
            any = true;
            if v.trim() == "1" {
                idle.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    any.then_some(idle)
}

fn slot_index(name: &str) -> u32 {
    name.rsplit_once("-u").and_then(|(_, n)| n.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_claim_applies_the_callers_settings() {
    let d = Daemon::start().await;
    d.template("mini").await;
    d.client.set_pool("mini", 1, 2).await.unwrap();
    ready(&d, 1).await;
    let req = CreateSandbox {
        name: Some("claimed".into()),
        env: BTreeMap::from([("TASK".to_string(), "t-42".to_string())]),
        workdir: Some("/tmp".into()),
        user: Some("0".into()),
        metadata: BTreeMap::from([("team".to_string(), "infra".to_string())]),
        limits: Limits { memory_bytes: Some(200 << 20), pids: Some(77), ..Default::default() },
        timeout_secs: Some(600),
        ingress: Some(abx_client::IngressAccess::Token),
        ..mini()
    };
    let idle_before = idle_slots(&d);
    let sb = d.client.create_sandbox(&req).await.unwrap();
    assert_eq!(d.client.pool("mini").await.unwrap().hits, 1, "it was a claim");
    if let Some(idle) = idle_before {
        // A pooled sandbox boots and waits in the idle CPU class; the claim ends that.
        let slot = format!("{}-u{}", d.prefix, d.slot_of(&sb));
        assert!(idle.contains(&slot), "the pooled sandbox's slot {slot} was not idle: {idle:?}");
        assert!(!idle_slots(&d).unwrap().contains(&slot), "the claimed sandbox is still in the idle class");
    }
    assert_eq!(sb.name.as_deref(), Some("claimed"));
    assert_eq!(sb.metadata.get("team").map(String::as_str), Some("infra"));
    assert!(sb.expires_at.is_some_and(|e| e >= sb.created_at + 599));
    assert_eq!(sb.ingress, abx_client::IngressAccess::Token);
    assert!(sb.ingress_token.as_ref().is_some_and(|t| t.len() == 40), "{:?}", sb.ingress_token);
    let (out, _, code) = d.sh("claimed", "echo $TASK; pwd; id -u").await;
    assert_eq!(code, 0);
    assert_eq!(out, "t-42\n/tmp\n0\n");
    let stats = d.client.stats(&sb.id).await.unwrap();
    assert_eq!(stats.memory_limit_bytes, Some(200 << 20));
    assert_eq!(stats.pids_limit, Some(77));
    // A name is unique across claims too.
    assert!(d.client.create_sandbox(&req).await.is_err());
    d.client.delete_sandbox(&sb.id, true).await.unwrap();
}

#[tokio::test]
async fn lowering_max_gives_the_excess_back_at_once() {
    let d = Daemon::start().await;
    d.template("mini").await;
    d.client.set_pool("mini", 3, 3).await.unwrap();
    ready(&d, 3).await;
    d.client.set_pool("mini", 1, 1).await.unwrap();
    // A pooled template is not removed from under its pool.
    let e = d.client.delete_template("mini").await.unwrap_err();
    assert!(e.to_string().contains("agentbox pool rm mini"), "{e}");
    // Not after the 30 s a pool above a target that fell with demand waits.
    d.wait_for("the pool trimmed to its new max", Duration::from_secs(5), || async {
        let p = d.client.pool("mini").await.unwrap();
        p.ready + p.filling == 1
    })
    .await;
    assert_eq!(d.client.pool("mini").await.unwrap().ready, 1);
}

#[tokio::test]
async fn a_rebuilt_template_replaces_the_pool_and_misses_are_counted() {
    let d = Daemon::start().await;
    d.template("mini").await;
    d.client.set_pool("mini", 1, 1).await.unwrap();
    ready(&d, 1).await;
    let old = d.client.template("mini").await.unwrap().layers;

    // Rebuild `mini` from another tree: the pooled sandbox of the old layers goes.
    let src = tempfile::tempdir().unwrap();
    let rootfs = src.path().join("rootfs");
    copy_layer(&d, &old[0], &rootfs);
    std::fs::write(rootfs.join("etc/marker"), "v2\n").unwrap();
    build_from_dir(&d, "mini", &rootfs).await;
    let new = d.client.template("mini").await.unwrap().layers;
    assert_ne!(old, new);
    d.wait_for("the pool on the new layers", Duration::from_secs(20), || async {
        d.client.pool("mini").await.unwrap().ready == 1 && d.client.pool("mini").await.unwrap().boots >= 2
    })
    .await;
    let sb = d.client.create_sandbox(&mini()).await.unwrap();
    assert_eq!(root(&d, &sb.id, "cat /etc/marker").await.0, "v2\n", "the claim has the new template");

    // Five creates at once against a pool of one: some are cold, all are counted.
    let p0 = d.client.pool("mini").await.unwrap();
    let req = mini();
    let creates = (0..5).map(|_| d.client.create_sandbox(&req));
    let made = futures_util::future::join_all(creates).await;
    for s in &made {
        assert!(s.is_ok(), "{s:?}");
    }
    let p = d.client.pool("mini").await.unwrap();
    assert_eq!(p.hits + p.misses - p0.hits - p0.misses, 5);
    assert!(p.misses > p0.misses, "a pool of one cannot serve five at once: {p:?}");
    let metrics = d.client.metrics().await.unwrap();
    assert!(metrics.contains(&format!("agentbox_pool_hits_total{{template=\"mini\"}} {}", p.hits)), "{metrics}");
    assert!(metrics.contains(&format!("agentbox_pool_misses_total{{template=\"mini\"}} {}", p.misses)));
    assert!(metrics.contains("agentbox_pool_claim_seconds_count{template=\"mini\"}"));
    assert!(metrics.contains("agentbox_create_cold_seconds_count{template=\"mini\"}"));
    for s in made.into_iter().flatten() {
        d.client.delete_sandbox(&s.id, true).await.unwrap();
    }
    d.client.delete_sandbox(&sb.id, true).await.unwrap();
}

/// Copies a layer's tree (the harness's state root is readable by root).
fn copy_layer(d: &Daemon, digest: &str, to: &std::path::Path) {
    let from = d.root.join("layers").join(digest);
    let ok = std::process::Command::new("cp").arg("-a").arg(&from).arg(to).status().unwrap().success();
    assert!(ok);
}

async fn build_from_dir(d: &Daemon, name: &str, dir: &std::path::Path) {
    let req = abx_client::BuildTemplate {
        name: name.into(),
        from_dir: Some(dir.display().to_string()),
        ..Default::default()
    };
    let mut s = d.client.build_template(&req).await.unwrap();
    while let Some(ev) = s.next().await.unwrap() {
        match ev {
            abx_client::BuildEvent::Done { .. } => return,
            abx_client::BuildEvent::Error { message, .. } => panic!("building {name}: {message}"),
            _ => {}
        }
    }
}

/// A template's start command runs as the template's user, with its environment, in its
/// directory, whether the create is cold or a claim (a cold create used to run it with the
/// caller's). A user or directory the sandbox lacks fails both alike, with a 400 naming it
/// and nothing left (a claim used to hand out a sandbox on which every exec failed).
#[tokio::test]
async fn the_start_command_runs_alike_cold_and_claimed() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let df = "FROM mini\nENV FOO=tmpl\n\
              CMD [\"sh\", \"-c\", \"echo $FOO $X > /tmp/startenv; id -u > /tmp/startid; pwd > /tmp/startpwd; \
              exec sleep 100000\"]\nHEALTHCHECK CMD test -f /tmp/startpwd\n";
    let ctx = tempfile::tempdir().unwrap();
    let req = abx_client::BuildTemplate {
        name: "senv".into(),
        dockerfile: Some(df.into()),
        context: Some(ctx.path().display().to_string()),
        ..Default::default()
    };
    crate::builds::build(&d, &req).await.unwrap();
    let t = d.client.template("senv").await.unwrap();
    let expected = format!("tmpl\n1000\n{}\n", t.workdir.as_deref().unwrap_or("/"));
    let asks = CreateSandbox {
        template: Some("senv".into()),
        env: BTreeMap::from([("FOO".to_string(), "caller".to_string()), ("X".to_string(), "1".to_string())]),
        user: Some("root".into()),
        workdir: Some("/tmp".into()),
        ..Default::default()
    };
    let look = "cat /tmp/startenv /tmp/startid /tmp/startpwd; echo $FOO $X; id -u; pwd";
    let caller = "caller 1\n0\n/tmp\n";
    let cold = d.client.create_sandbox(&asks).await.unwrap();
    assert_eq!(d.sh(&cold.id, look).await.0, format!("{expected}{caller}"), "cold");
    d.client.delete_sandbox(&cold.id, true).await.unwrap();

    let bad: [(CreateSandbox, &str); 3] = [
        (CreateSandbox { user: Some("nosuchuser".into()), ..asks.clone() }, "user 'nosuchuser'"),
        (CreateSandbox { workdir: Some("/nonexistent/dir".into()), ..asks.clone() }, "workdir '/nonexistent/dir'"),
        (CreateSandbox { workdir: Some("/etc/passwd".into()), ..asks.clone() }, "workdir '/etc/passwd'"),
    ];
    let before = d.client.list_sandboxes().await.unwrap().len();
    let mut cold_errors = Vec::new();
    for (req, named) in &bad {
        let e = d.client.create_sandbox(req).await.unwrap_err();
        assert_eq!(e.code(), Some("invalid_argument"), "cold, {named}: {e}");
        assert!(e.to_string().contains(named), "cold: {e}");
        cold_errors.push(e.to_string());
    }
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), before, "nothing left");

    d.client.set_pool("senv", 1, 1).await.unwrap();
    let pool_ready = || async { d.client.pool("senv").await.unwrap().ready == 1 };
    d.wait_for("a ready pool", Duration::from_secs(30), pool_ready).await;
    for ((req, named), cold) in bad.iter().zip(&cold_errors) {
        let e = d.client.create_sandbox(req).await.unwrap_err();
        assert_eq!(e.code(), Some("invalid_argument"), "claim, {named}: {e}");
        assert_eq!(&e.to_string(), cold, "a claim fails as a cold create does");
        assert_eq!(d.client.pool("senv").await.unwrap().hits, 0, "no claim was counted");
        // The sandbox goes back to the pool; a refill the claim started may replace it
        // (the pool keeps ready + booting within max): either way one is ready again.
        d.wait_for("a ready pool again", Duration::from_secs(30), pool_ready).await;
    }
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), before, "nothing left");
    // No refill in flight either (one that a refused claim started can end with one more
    // than the pool's max, which the filler then trims).
    let settled = || async {
        let p = d.client.pool("senv").await.unwrap();
        p.ready == 1 && p.filling == 0
    };
    d.wait_for("a ready pool with no refill in flight", Duration::from_secs(30), settled).await;
    let warm = d.client.create_sandbox(&asks).await.unwrap();
    let pool = d.client.pool("senv").await.unwrap();
    assert_eq!(pool.hits, 1, "{pool:?}\n{}", d.log());
    assert_eq!(d.sh(&warm.id, look).await.0, format!("{expected}{caller}"), "claimed");
    d.client.delete_sandbox(&warm.id, true).await.unwrap();
    d.client.delete_pool("senv").await.unwrap();
}
