//! Sandboxes outlive their daemon: a SIGKILLed daemon's sandboxes keep running, and the next
//! daemon finds them again and cleans up every orphan.

use std::time::Duration;

use abx_client::{CreateSandbox, ExecRequest, Limits};

use crate::harness::Daemon;

#[tokio::test]
async fn sandboxes_survive_a_daemon_sigkill_and_orphans_are_cleaned() {
    let mut d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let spawner = d.client.system().await.unwrap().spawner_pid;
    let counter = ExecRequest {
        cmd: vec![
            "sh".into(),
            "-c".into(),
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done".into(),
        ],
        ..Default::default()
    };
    d.client.exec_background(&id, &counter).await.unwrap();
    // An orphan: a slot directory and cgroup no recorded sandbox holds.
    let orphan = format!("{}-u63", d.prefix);
    std::fs::create_dir_all(d.slots.join(&orphan).join("data/upper/junk")).unwrap();
    std::fs::create_dir_all(format!("/sys/fs/cgroup/pids/{}/{orphan}", d.prefix)).unwrap();
    let slot = d.slot_of(&d.client.get_sandbox(&id).await.unwrap());
    // What a daemon killed while taking a snapshot leaves: the throwaway read-only
    // snapshot that wrote the sandbox's data out first.
    let scratch = d.slots.parent().unwrap().join("snapshots/0123456789ab.flush");
    let data = d.slots.join(format!("{}-u{slot}", d.prefix)).join("data");
    let made = std::process::Command::new("btrfs")
        .args(["-q", "subvolume", "snapshot", "-r"])
        .args([&data, &scratch])
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        std::fs::create_dir_all(&scratch).unwrap();
    }
    // A snapshot taken but not recorded (or unrecorded but not removed) when the daemon
    // died, next to one that is recorded; and something that is not a snapshot.
    let kept = d.client.snapshot(&id, Some("kept")).await.unwrap();
    let snapshots = d.slots.parent().unwrap().join("snapshots");
    let unrecorded = snapshots.join("fedcba987654");
    std::fs::create_dir_all(unrecorded.join("upper/junk")).unwrap();
    let stranger = snapshots.join("not-a-snapshot");
    std::fs::create_dir_all(&stranger).unwrap();
    // A volume whose record was deleted but not yet its files, next to a live one.
    d.client.create_volume("cache").await.unwrap();
    let volumes = d.slots.parent().unwrap().join("volumes");
    std::fs::write(volumes.join("cache/file"), "kept").unwrap();
    let deleted = volumes.join("gone");
    std::fs::create_dir_all(deleted.join("junk")).unwrap();

    d.kill9();
    let read = |d: &Daemon| {
        std::fs::read_to_string(d.slots.join(format!("{}-u{slot}", d.prefix)).join("data/upper/tmp/count"))
    };
    let before: u64 = read(&d).unwrap().trim().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: u64 = read(&d).unwrap().trim().parse().unwrap();
    assert!(after > before, "the sandbox keeps running without its daemon ({before} -> {after})");

    d.spawn(&[]).await;
    let list = d.client.list_sandboxes().await.unwrap();
    assert_eq!(list.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [id.as_str()], "found again");
    assert_eq!(d.sh(&id, "echo back").await.0, "back\n");
    assert_eq!(d.client.system().await.unwrap().spawner_pid, spawner, "same spawner, reconnected");
    assert!(!d.slots.join(&orphan).exists(), "orphan directory removed");
    assert!(!scratch.exists(), "leftover flush snapshot removed (btrfs subvolume: {made})");
    assert!(!unrecorded.exists(), "snapshot without a record removed");
    assert!(stranger.exists(), "a directory that is not a snapshot is left alone");
    std::fs::remove_dir(&stranger).unwrap();
    assert_eq!(d.client.get_snapshot("kept").await.unwrap().id, kept.id);
    assert!(snapshots.join(&kept.id).join("upper").is_dir(), "a recorded snapshot is kept");
    assert!(!deleted.exists(), "a volume directory without a record is removed");
    assert_eq!(std::fs::read_to_string(volumes.join("cache/file")).unwrap(), "kept", "a recorded volume is kept");
    assert_eq!(d.client.volumes().await.unwrap().len(), 1);
    assert!(
        !std::path::Path::new(&format!("/sys/fs/cgroup/pids/{}/{orphan}", d.prefix)).exists(),
        "orphan cgroup removed"
    );
}

#[tokio::test]
async fn dead_sandboxes_are_cleaned_up_on_restart() {
    let mut d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let sb = d.client.get_sandbox(&id).await.unwrap();
    d.stop();
    // The sandbox dies while no daemon watches it.
    rustix::process::kill_process(rustix::process::Pid::from_raw(sb.pid).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.spawn(&[]).await;
    assert!(d.client.list_sandboxes().await.unwrap().is_empty());
    d.assert_slot_empty(d.slot_of(&sb));
}

/// A sandbox that lives for one request (a `run`, a RUN step of a template build) cannot be
/// used or removed by anyone once its daemon is gone: the next daemon removes it instead of
/// keeping it (a build step's sandbox has no timeout and would stay for good).
#[tokio::test]
async fn sandboxes_of_a_run_or_a_build_step_do_not_outlive_their_daemon() {
    let mut d = Daemon::start().await;
    d.template("mini").await;
    let build = abx_client::BuildTemplate {
        name: "slow".into(),
        dockerfile: Some("FROM mini\nRUN sleep 1001\n".into()),
        ..Default::default()
    };
    let building = d.client.build_template(&build).await.unwrap();
    let run = abx_client::RunRequest {
        sandbox: abx_client::CreateSandbox { template: Some("mini".into()), ..Default::default() },
        exec: ExecRequest { cmd: vec!["sleep".into(), "1000".into()], ..Default::default() },
    };
    let running = d.client.run_once(&run).await.unwrap();
    let kept = d.mini(Limits::default()).await;
    d.wait_for("the build step's and the run's sandboxes", Duration::from_secs(30), || async {
        let sys = d.client.system().await.unwrap();
        sys.sandboxes == 3 && sys.build_steps == 1
    })
    .await;
    let doomed: Vec<_> = d.client.list_sandboxes().await.unwrap().into_iter().filter(|s| s.id != kept).collect();
    assert_eq!(doomed.len(), 1, "the run's (the build step's is not listed): {doomed:?}");
    let mut slots: Vec<u32> = doomed.iter().map(|sb| d.slot_of(sb)).collect();
    // The build step's slot, from the host uid of its command.
    d.wait_for("the build step's command", Duration::from_secs(10), || async {
        !crate::harness::host_processes("sleep 1001").is_empty()
    })
    .await;
    let pid = crate::harness::host_processes("sleep 1001")[0].split(':').next().unwrap().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    slots.push((uid - d.uid_start) / 65536);

    d.kill9();
    drop((building, running));
    d.spawn(&[]).await;
    let left: Vec<String> = d.client.list_sandboxes().await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(left, std::slice::from_ref(&kept), "only the sandbox made by a create is adopted");
    assert_eq!(d.client.system().await.unwrap().sandboxes, 1);
    for slot in slots {
        d.assert_slot_empty(slot);
    }
    assert_eq!(d.sh(&kept, "echo still here").await.0, "still here\n");
}

/// A daemon killed in the middle of a rollback (its PID 1 killed, the new one not started
/// or not recorded yet) leaves a sandbox the next daemon keeps, with its files, instead of
/// a dead one it cleans up. Kills land at several moments of the rollback.
#[tokio::test]
async fn a_daemon_killed_during_a_rollback_loses_no_sandbox() {
    let mut d = Daemon::start().await;
    d.template("mini").await;
    let id = d.mini(Limits::default()).await;
    d.sh(&id, "echo v1 > /tmp/f").await;
    let snap = d.client.snapshot(&id, Some("before")).await.unwrap();
    for delay_us in [0, 500, 1000, 1500, 2000, 3000, 5000, 8000] {
        d.sh(&id, "echo v2 > /tmp/f").await;
        let client = d.client.clone();
        let (sid, snap_id) = (id.clone(), snap.id.clone());
        let rollback = tokio::spawn(async move { client.rollback(&sid, &snap_id).await });
        tokio::time::sleep(Duration::from_micros(delay_us)).await;
        d.kill9();
        let _ = rollback.await;
        d.spawn(&[]).await;
        let sb = d.client.get_sandbox(&id).await.unwrap_or_else(|e| panic!("lost after a kill at {delay_us} µs: {e}"));
        if sb.state != abx_client::SandboxState::Running {
            assert_eq!(sb.state, abx_client::SandboxState::Exited, "{sb:?}");
            let started = d.client.start(&id).await;
            assert!(started.is_ok(), "start after a kill at {delay_us} µs: {started:?}\n{}", d.log());
        }
        let f = d.sh(&id, "cat /tmp/f").await.0;
        assert!(f == "v1\n" || f == "v2\n", "files kept after a kill at {delay_us} µs: {f:?}");
    }
}

/// Guards a stop cut short: the daemon records a sandbox as exited before ending its
/// processes, so one killed during a stop's grace period left them running under a
/// sandbox shown as exited, and nothing ever ended them.
#[tokio::test]
async fn a_daemon_killed_during_a_stop_leaves_no_process_running() {
    let mut d = Daemon::start().await;
    d.template("mini").await;
    let id = d.mini(Limits::default()).await;
    let cmd = ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"].map(String::from).to_vec();
    d.client.exec_background(&id, &abx_client::ExecRequest { cmd, ..Default::default() }).await.unwrap();
    let pid1 = d.client.get_sandbox(&id).await.unwrap().pid;
    let client = d.client.clone();
    let sid = id.clone();
    let stop = tokio::spawn(async move { client.stop_with_grace(&sid, 60.0).await });
    for _ in 0..100 {
        if d.client.get_sandbox(&id).await.unwrap().state == abx_client::SandboxState::Stopping {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d.client.get_sandbox(&id).await.unwrap().state, abx_client::SandboxState::Stopping);
    // `stopping` shows just before the record is stored as exited and SIGTERM goes out;
    // the grace period (60 s) is still running long after this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.kill9();
    let _ = stop.await;
    d.spawn(&[]).await;
    let sb = d.client.get_sandbox(&id).await.unwrap();
    assert_eq!(sb.state, abx_client::SandboxState::Exited, "{sb:?}");
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    for _ in 0..100 {
        if !alive(pid1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(pid1), "the sandbox's PID 1 ({pid1}) outlived its stop\n{}", d.log());
    d.client.start(&id).await.unwrap();
    assert_eq!(d.sh(&id, "echo up").await.0, "up\n");
}

/// A fork is all or nothing even when the daemon dies in the middle: the forks are
/// ephemeral until every one is made and they are recorded together, and the snapshot a
/// fork of a running sandbox takes is removed by the next daemon.
#[tokio::test]
async fn a_daemon_killed_during_a_fork_leaves_all_or_none_of_the_forks() {
    let mut d = Daemon::start().await;
    d.template("mini").await;
    let id = d.mini(Limits::default()).await;
    d.sh(&id, "echo source > /tmp/f").await;
    let snapshots = d.slots.parent().unwrap().join("snapshots");
    let mut outcomes = Vec::new();
    for (round, delay_ms) in [0u64, 2, 5, 10, 20, 40, 80, 400].into_iter().enumerate() {
        let client = d.client.clone();
        let sid = id.clone();
        let tag = round.to_string();
        let req = abx_client::ForkRequest {
            count: Some(4),
            metadata: [("round".to_string(), tag.clone())].into(),
            ..Default::default()
        };
        let fork = tokio::spawn(async move { client.fork_sandbox(&sid, &req).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        d.kill9();
        let answered = fork.await.unwrap().is_ok();
        d.spawn(&[]).await;
        let forks: Vec<String> = d
            .client
            .list_sandboxes()
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.metadata.get("round") == Some(&tag))
            .map(|s| s.id)
            .collect();
        assert!(forks.is_empty() || forks.len() == 4, "round {round}: {} of 4 forks kept\n{}", forks.len(), d.log());
        assert!(!answered || forks.len() == 4, "round {round}: the fork answered but its sandboxes are gone");
        for f in &forks {
            assert_eq!(d.sh(f, "cat /tmp/f").await.0, "source\n");
            d.client.delete_sandbox(f, true).await.unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(&snapshots).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "round {round}: the fork's snapshot is left: {left:?}");
        outcomes.push(forks.len());
    }
    eprintln!("forks kept per round: {outcomes:?}");
    assert!(outcomes.contains(&4), "no round finished its fork: {outcomes:?}");
}

#[tokio::test]
async fn a_killed_spawner_is_replaced_and_the_system_shows_the_new_one() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let old = d.client.system().await.unwrap().spawner_pid;
    assert!(old > 0);
    rustix::process::kill_process(rustix::process::Pid::from_raw(old as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    let gone = std::path::PathBuf::from(format!("/proc/{old}/cmdline"));
    for _ in 0..100 {
        if std::fs::read(&gone).map_or(true, |c| c.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next create starts a new spawner; the old sandbox still answers.
    let new_id = d.mini(Limits::default()).await;
    assert_eq!(d.sh(&new_id, "echo new").await.0, "new\n");
    assert_eq!(d.sh(&id, "echo old").await.0, "old\n");
    let new = d.client.system().await.unwrap().spawner_pid;
    assert_ne!(new, old, "the pid of the replaced spawner is not shown");
    let cmdline = std::fs::read(format!("/proc/{new}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("__spawner"), "{new} is the spawner");
}

/// A daemon stopped (SIGTERM) in the middle of a build tells the build's client why the
/// build ends, instead of the stream just stopping; nothing is published, and the step's
/// sandbox does not outlive the daemon.
#[tokio::test]
async fn a_build_cut_short_by_a_daemon_stop_says_so() {
    let mut d = Daemon::start().await;
    d.template("mini").await;
    let req = abx_client::BuildTemplate {
        name: "slow".into(),
        dockerfile: Some("FROM mini\nRUN sleep 1002\n".into()),
        ..Default::default()
    };
    let mut s = d.client.build_template(&req).await.unwrap();
    d.wait_for("the build step", Duration::from_secs(30), || async {
        d.client.system().await.unwrap().build_steps == 1
    })
    .await;
    d.stop();
    ends_abandoned(&mut s).await;
    d.spawn(&[]).await;
    assert!(d.client.template("slow").await.is_err(), "nothing was published");
    assert_eq!(d.client.system().await.unwrap().sandboxes, 0);
    assert!(crate::harness::host_processes("sleep 1002").is_empty());
}

/// A pull cannot be stopped midway: a daemon shutting down tells its client it was
/// abandoned (not a bare end of stream) and publishes nothing of it afterwards, and the
/// daemon does not wait for it to exit. The "registry" here accepts and never answers.
#[tokio::test]
async fn a_pull_cut_short_by_a_daemon_stop_says_so() {
    let mut d = Daemon::start().await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for c in silent.incoming().flatten() {
            keep.lock().unwrap().push(c);
        }
    });
    let req = abx_client::BuildTemplate {
        name: "stuck".into(),
        pull: Some(format!("127.0.0.1:{port}/library/stuck:1")),
        insecure: true,
        ..Default::default()
    };
    let mut s = d.client.build_template(&req).await.unwrap();
    d.wait_for("the pull to connect", Duration::from_secs(10), || {
        let n = held.lock().unwrap().len();
        async move { n > 0 }
    })
    .await;
    let stopping = std::time::Instant::now();
    d.stop();
    assert!(stopping.elapsed() < Duration::from_secs(10), "the daemon waited {:?} for the pull", stopping.elapsed());
    ends_abandoned(&mut s).await;
    d.spawn(&[]).await;
    assert!(d.client.template("stuck").await.is_err(), "nothing was published");
}

/// Asserts that a build's stream ends with the error a shutting-down daemon sends.
async fn ends_abandoned(s: &mut abx_client::NdjsonStream<abx_client::BuildEvent>) {
    let mut last = None;
    while let Ok(Some(ev)) = s.next().await {
        last = Some(ev);
    }
    match last {
        Some(abx_client::BuildEvent::Error { message, .. }) => {
            assert!(message.contains("shutting down") && message.contains("nothing published"), "{message}")
        }
        other => panic!("the stream ended with {other:?}"),
    }
}

/// Timeouts that expired while no daemon ran fire while the next daemon is still finding
/// its sandboxes again; the slots they free must not be refilled before every live
/// sandbox has claimed its own (a refill then prepared a live sandbox's slot for the next
/// create, whose failed mount and cleanup killed the live sandbox).
#[tokio::test]
async fn timeouts_that_expired_meanwhile_free_no_slot_a_live_sandbox_holds() {
    let mut d = Daemon::start().await;
    d.template("mini").await;
    let (mut live, mut expiring) = (Vec::new(), Vec::new());
    for i in 0..24 {
        let timeout_secs = (i % 2 == 1).then_some(1);
        let req = CreateSandbox { template: Some("mini".into()), timeout_secs, ..Default::default() };
        let id = d.client.create_sandbox(&req).await.unwrap().id;
        if timeout_secs.is_some() {
            expiring.push(id);
        } else {
            assert_eq!(d.sh(&id, &format!("echo {id} > /tmp/own")).await.2, 0);
            live.push(id);
        }
    }
    d.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.spawn(&[]).await;
    // Creates take the prepared slots.
    let mut made = Vec::new();
    for _ in 0..4 {
        made.push(d.mini(Limits::default()).await);
    }
    let mut slots = std::collections::HashMap::new();
    for id in live.iter().chain(&made) {
        let sb = d.client.get_sandbox(id).await.unwrap();
        assert_eq!(sb.state, abx_client::SandboxState::Running, "{id}");
        if let Some(other) = slots.insert(d.slot_of(&sb), id.clone()) {
            panic!("{id} and {other} are on the same slot");
        }
    }
    for id in &live {
        let (out, err, code) = d.sh(id, "cat /tmp/own").await;
        assert_eq!((out.trim(), code), (id.as_str(), 0), "{err}");
    }
    for id in &expiring {
        d.wait_for("the expired sandbox removed", Duration::from_secs(10), || async {
            d.client.get_sandbox(id).await.is_err()
        })
        .await;
    }
}

/// A create whose answer was lost when the daemon died is made once: sent again with the
/// same idempotency key, it answers the sandbox the first try made, after a restart too,
/// and the CLI sends it again by itself while the daemon is away.
#[tokio::test]
async fn a_create_retried_across_a_daemon_restart_makes_one_sandbox() {
    use rustix::process::{Pid, Signal, kill_process};
    let mut d = Daemon::start().await;
    d.template("mini").await;
    let args = ["create", "--template", "mini", "--idempotency-key", "job-1"];
    let o = d.cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    d.kill9();
    d.spawn(&[]).await;
    let o = d.cli(&args);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), id, "{}", String::from_utf8_lossy(&o.stderr));

    // The daemon stopped (SIGSTOP: it takes the connection but never answers), then
    // killed with the create unanswered, and started again: the CLI's own retry gets
    // the sandbox of the first create.
    let pid = Pid::from_raw(d.pid().unwrap() as i32).unwrap();
    kill_process(pid, Signal::STOP).unwrap();
    let cli =
        d.cli_command(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.spawn(&[]).await;
    let o = tokio::task::spawn_blocking(move || cli.wait_with_output()).await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), id, "{err}");
    assert!(err.contains("sending it again with the same idempotency key"), "{err}");
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 1);
    assert_eq!(d.sh(&id, "echo ok").await.0, "ok\n");

    // A fork likewise: its sandboxes carry the key, recorded with them at once.
    let fork = ["fork", id.as_str(), "--count", "2", "--idempotency-key", "job-2"];
    let o = d.cli(&fork);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let forks = String::from_utf8_lossy(&o.stdout).to_string();
    d.kill9();
    d.spawn(&[]).await;
    let o = d.cli(&fork);
    assert_eq!(String::from_utf8_lossy(&o.stdout), forks, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 3);
}

/// Pids handed out before the daemon was killed are not handed out again when the
/// sandbox is stopped and started under the next daemon: a client's pid from before must
/// not name a new process. (They were noted in memory only, and the next run continued
/// above the last recorded one.)
#[tokio::test]
async fn pids_from_before_a_daemon_kill_are_not_reused_by_the_next_run() {
    let mut d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let sleep = ExecRequest { cmd: vec!["sleep".into(), "1000".into()], ..Default::default() };
    let mut before = Vec::new();
    for _ in 0..5 {
        before.push(d.client.exec_background(&id, &sleep).await.unwrap());
    }
    // Processes the API did not start take pids too.
    assert_eq!(d.sh(&id, "for i in 1 2 3 4 5 6 7 8; do true; done; sleep 0 & wait").await.2, 0);
    d.kill9();
    d.spawn(&[]).await;
    d.client.stop(&id).await.unwrap();
    d.client.start(&id).await.unwrap();
    let next = d.client.exec_background(&id, &sleep).await.unwrap();
    let highest = *before.iter().max().unwrap();
    assert!(next > highest, "pid {next} of the new run; {before:?} were handed out before");
}
