//! Lifecycle: timeouts, removal of everything a sandbox had, clear errors for bad input,
//! and nothing half-made when setup fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use abx_client::{CreateSandbox, ExecRequest, Limits};

use crate::harness::Daemon;

fn mini() -> CreateSandbox {
    CreateSandbox { template: Some("mini".into()), ..Default::default() }
}

/// Every path below `dir`, relative to it, sorted.
fn walkdir(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn rm_removes_everything_the_sandbox_had() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let sb = d.client.get_sandbox(&id).await.unwrap();
    let slot = d.slot_of(&sb);
    d.sh(&id, "sleep 300 & echo data > /tmp/x").await;
    let held = d.slot_leftovers(slot);
    assert!(held.iter().any(|l| l.starts_with("process")) && held.iter().any(|l| l.ends_with("/tmp")), "{held:?}");
    // The marker of a volatile overlay, which every destroy clears with an unlink and two
    // rmdirs (`SandboxDirs::reset_work`); another layout takes the slower recursive way.
    let incompat = d.slots.join(format!("{}-u{slot}", d.prefix)).join("data/work/work/incompat");
    let marker: Vec<_> = walkdir(&incompat);
    assert_eq!(marker, ["volatile", "volatile/dirty"], "the volatile overlay's marker as overlayfs makes it");
    let e = d.client.delete_sandbox(&id, false).await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "a running sandbox needs force: {e}");
    d.client.delete_sandbox(&id, true).await.unwrap();
    assert_eq!(d.client.get_sandbox(&id).await.unwrap_err().code(), Some("not_found"));
    d.wait_for("the slot to be emptied", Duration::from_secs(10), || async { d.slot_leftovers(slot).is_empty() }).await;
    let gone = || std::fs::read_to_string(format!("/proc/{}/stat", sb.pid)).map(|s| s.contains(") Z")).unwrap_or(true);
    d.wait_for("PID 1 to be gone", Duration::from_secs(10), || async { gone() }).await;

    // Many written files take the other way out (on btrfs the data subvolume is replaced,
    // not emptied file by file): the slot is as empty afterwards.
    let id = d.mini(Limits::default()).await;
    let slot = d.slot_of(&d.client.get_sandbox(&id).await.unwrap());
    let (_, _, code) =
        d.sh(&id, "mkdir -p /tmp/many/d && for i in $(seq 400); do echo $i > /tmp/many/d/f$i; done").await;
    assert_eq!(code, 0);
    d.client.delete_sandbox(&id, true).await.unwrap();
    d.wait_for("the slot to be emptied", Duration::from_secs(10), || async { d.slot_leftovers(slot).is_empty() }).await;
    let id = d.mini(Limits::default()).await;
    let (out, _, _) = d.sh(&id, "ls /tmp").await;
    assert_eq!(out, "", "a new sandbox starts with an empty /tmp");
}

#[tokio::test]
async fn timeout_destroys_the_sandbox_and_can_be_changed() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let a = d.client.create_sandbox(&CreateSandbox { timeout_secs: Some(1), ..mini() }).await.unwrap();
    let b = d.client.create_sandbox(&CreateSandbox { timeout_secs: Some(1), ..mini() }).await.unwrap();
    assert!(a.expires_at.is_some());
    let b = d.client.set_timeout(&b.id, 3600).await.unwrap();
    assert!(b.expires_at.unwrap() > a.expires_at.unwrap() + 3000);
    d.wait_for("the timeout to destroy the sandbox", Duration::from_secs(15), || async {
        d.client.get_sandbox(&a.id).await.is_err()
    })
    .await;
    assert!(d.client.get_sandbox(&b.id).await.is_ok(), "the extended sandbox lives on");
    let none = d.client.set_timeout(&b.id, 0).await.unwrap();
    assert_eq!(none.expires_at, None);
    // A timeout too long to count is refused, not wrapped around into the past.
    let e = d.client.set_timeout(&b.id, u64::MAX).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_argument"), "{e}");
    let e = d.client.create_sandbox(&CreateSandbox { timeout_secs: Some(u64::MAX), ..mini() }).await.unwrap_err();
    assert!(e.to_string().contains("100 years"), "{e}");
    assert!(d.client.get_sandbox(&b.id).await.is_ok());
}

#[tokio::test]
async fn bad_input_is_a_clear_error_and_creates_nothing() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let cases: Vec<(CreateSandbox, &str, &str)> = vec![
        (
            CreateSandbox { template: Some("no-such-template".into()), ..Default::default() },
            "not_found",
            "no-such-template",
        ),
        (
            CreateSandbox { limits: Limits { memory_bytes: Some(1024), ..Default::default() }, ..mini() },
            "invalid_argument",
            "memory",
        ),
        (
            CreateSandbox { limits: Limits { cpus: Some(-1.0), ..Default::default() }, ..mini() },
            "invalid_argument",
            "cpu",
        ),
        (
            CreateSandbox { limits: Limits { pids: Some(1), ..Default::default() }, ..mini() },
            "invalid_argument",
            "pids",
        ),
        (
            // Above what cgroups take: refused up front, not as a setup failure.
            CreateSandbox { limits: Limits { memory_bytes: Some(u64::MAX), ..Default::default() }, ..mini() },
            "invalid_argument",
            "memory",
        ),
        (CreateSandbox { name: Some("bad/name".into()), ..mini() }, "invalid_argument", "bad/name"),
        (CreateSandbox { workdir: Some("relative".into()), ..mini() }, "invalid_argument", "workdir"),
    ];
    for (req, code, needle) in cases {
        let e = d.client.create_sandbox(&req).await.unwrap_err();
        assert_eq!(e.code(), Some(code), "{e}");
        assert!(e.to_string().contains(needle), "'{e}' should mention {needle}");
    }
    let named = CreateSandbox { name: Some("agent-42".into()), ..mini() };
    d.client.create_sandbox(&named).await.unwrap();
    let e = d.client.create_sandbox(&named).await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");
    assert_eq!(d.client.get_sandbox("agent-42").await.unwrap().name.as_deref(), Some("agent-42"), "found by name");
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 1);
    assert_eq!(d.client.get_sandbox("nope").await.unwrap_err().code(), Some("not_found"));
    assert_eq!(d.client.delete_sandbox("nope", true).await.unwrap_err().code(), Some("not_found"));
}

/// How many of the requests succeeded; every other one must be a conflict.
async fn successes<T>(tasks: Vec<tokio::task::JoinHandle<abx_client::Result<T>>>) -> usize {
    let mut made = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => made += 1,
            Err(e) => assert_eq!(e.code(), Some("conflict"), "{e}"),
        }
    }
    made
}

/// Requests that give one name at once: exactly one gets it (before: each create checked
/// the name long before registering the sandbox, so several sandboxes shared a name and
/// `rm NAME` removed any one of them; two volume creates could both succeed, or fail with
/// an internal error).
#[tokio::test]
async fn one_name_is_given_once_however_many_ask_at_once() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let client = d.client.clone();
        let req = CreateSandbox { name: Some("dup".into()), ..mini() };
        tasks.push(tokio::spawn(async move { client.create_sandbox(&req).await }));
    }
    assert_eq!(successes(tasks).await, 1);
    let named = d.client.list_sandboxes().await.unwrap().into_iter().filter(|s| s.name.as_deref() == Some("dup"));
    assert_eq!(named.count(), 1);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let client = d.client.clone();
        tasks.push(tokio::spawn(async move { client.create_volume("vdup").await }));
    }
    assert_eq!(successes(tasks).await, 1);
}

#[tokio::test]
async fn failed_setup_leaves_nothing_behind() {
    // A dynamically linked "agent" cannot start inside a busybox root: the sandbox's setup
    // fails at its last step, after namespaces, cgroups and mounts were all made.
    let d = Daemon::start_with(&["--agent", "/usr/bin/true"]).await;
    d.template("mini").await;
    let e = d.client.create_sandbox(&mini()).await.unwrap_err();
    assert_eq!(e.code(), Some("sandbox_setup_failed"), "{e}");
    assert!(e.to_string().contains("exec guest agent"), "{e}");
    let id = e.to_string().split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(id.len(), 12, "the message names the sandbox: {e}");
    d.assert_slot_empty(0);
    assert!(d.client.list_sandboxes().await.unwrap().is_empty());
}

#[tokio::test]
async fn uid_ranges_run_out_cleanly() {
    let d = Daemon::start_with(&["--uid-slots", "1"]).await;
    d.template("mini").await;
    let first = d.client.create_sandbox(&mini()).await.unwrap();
    let e = d.client.create_sandbox(&mini()).await.unwrap_err();
    assert_eq!(e.code(), Some("resource_exhausted"), "{e}");
    d.client.delete_sandbox(&first.id, true).await.unwrap();
    d.client.create_sandbox(&mini()).await.unwrap();
}

#[tokio::test]
async fn one_uid_slot_serves_many_sandboxes_in_a_row() {
    // Every sandbox of a slot reuses the slot's cgroups; each must start cleanly after the
    // previous one was destroyed (regression: a reused cgroup that had been emptied with
    // cgroup.kill SIGKILLed every later child placed with CLONE_INTO_CGROUP).
    let d = Daemon::start_with(&["--uid-slots", "1"]).await;
    d.template("mini").await;
    for i in 0..15 {
        let sb = d.client.create_sandbox(&mini()).await.unwrap_or_else(|e| panic!("create #{i}: {e}"));
        assert_eq!(d.sh(&sb.id, "echo ok").await.0, "ok\n", "sandbox #{i}");
        d.client.delete_sandbox(&sb.id, true).await.unwrap();
    }
}

/// Whether slot `slot`'s freezer is set (cgroup2 `cgroup.freeze`, else the v1 freezer),
/// and a setter for it, from the host.
fn slot_freezer(d: &Daemon, slot: u32) -> (PathBuf, &'static str, &'static str) {
    let name = format!("{}-u{slot}", d.prefix);
    for base in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let f = Path::new(base).join(&d.prefix).join(&name).join("cgroup.freeze");
        if f.exists() {
            return (f, "1", "0");
        }
    }
    (Path::new("/sys/fs/cgroup/freezer").join(&d.prefix).join(&name).join("freezer.state"), "FROZEN", "THAWED")
}

fn slot_frozen(d: &Daemon, slot: u32) -> bool {
    let (file, frozen, _) = slot_freezer(d, slot);
    std::fs::read_to_string(&file).unwrap().trim() == frozen
}

#[tokio::test]
async fn a_freeze_left_in_a_slot_does_not_catch_its_next_sandbox() {
    // A pause that landed while its sandbox was being removed or stopped left the slot's
    // cgroup frozen after the processes were gone; the slot's next sandbox, born into that
    // cgroup, hung for 10 s and failed ("sandbox namespaces not ready"). Here the freeze is
    // set by hand at the worst moment: on a running sandbox that is then removed or
    // stopped. One slot, so the next sandbox has to use the same cgroup.
    let d = Daemon::start_with(&["--uid-slots", "1"]).await;
    d.template("mini").await;
    let freeze = |slot| {
        let (file, frozen, _) = slot_freezer(&d, slot);
        std::fs::write(file, frozen).unwrap();
    };
    let sb = d.client.create_sandbox(&mini()).await.unwrap();
    let slot = d.slot_of(&sb);
    freeze(slot);
    d.client.delete_sandbox(&sb.id, true).await.unwrap();
    let t = Instant::now();
    let sb = d.client.create_sandbox(&mini()).await.expect("a create in the slot after the removal");
    assert!(t.elapsed() < Duration::from_secs(5), "the create waited {:?}", t.elapsed());
    assert_eq!(d.sh(&sb.id, "echo ok").await.0, "ok\n");
    // A stop, then a start in the same slot.
    freeze(slot);
    d.client.stop_with_grace(&sb.id, 0.0).await.unwrap();
    assert!(!slot_frozen(&d, slot), "the stopped sandbox's slot is thawed");
    d.client.start(&sb.id).await.expect("a start after the stop");
    assert_eq!(d.sh(&sb.id, "echo again").await.0, "again\n");
    d.client.delete_sandbox(&sb.id, true).await.unwrap();
}

#[tokio::test]
async fn pauses_racing_snapshots_and_stops_leave_a_true_state() {
    // Pause and resume take the sandbox's operation lock, as snapshots, stops and removals
    // do: a snapshot's thaw once undid a pause that came in during the snapshot (a sandbox
    // shown paused that ran), and a pause during a stop outlived the stop.
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let slot = d.slot_of(&d.client.get_sandbox(&id).await.unwrap());
    for round in 0..12 {
        let (_, snap) = tokio::join!(d.client.pause(&id), d.client.snapshot(&id, None));
        snap.unwrap();
        let state = d.client.get_sandbox(&id).await.unwrap().state;
        assert_eq!(state, abx_client::SandboxState::Paused, "round {round}");
        assert!(slot_frozen(&d, slot), "round {round}: shown paused, and frozen");
        d.client.resume(&id).await.unwrap();
        assert!(!slot_frozen(&d, slot), "round {round}: resumed and thawed");
    }
    for round in 0..6 {
        let slot = d.slot_of(&d.client.get_sandbox(&id).await.unwrap());
        let (_, stop) = tokio::join!(d.client.pause(&id), d.client.stop_with_grace(&id, 0.0));
        stop.unwrap();
        assert!(!slot_frozen(&d, slot), "round {round}: a stopped sandbox's slot is not frozen");
        d.client.start(&id).await.unwrap();
        assert_eq!(d.sh(&id, "echo up").await.0, "up\n", "round {round}");
    }
}

/// The spawner's prepared shells (forks of the spawner waiting in a slot's namespaces).
fn shells(d: &Daemon, spawner: u32) -> Vec<i32> {
    let root = d.root.display().to_string();
    crate::harness::host_processes(&format!("__spawner --root {root}"))
        .iter()
        .filter_map(|p| p.split(':').next()?.parse::<i32>().ok())
        .filter(|&pid| pid != spawner as i32)
        .collect()
}

/// Builds `mini`, waits until the daemon keeps two prepared slots, returns the spawner.
async fn two_prepared(d: &Daemon) -> u32 {
    d.template("mini").await;
    d.wait_for("two prepared slots", Duration::from_secs(10), || async {
        d.client.system().await.unwrap().prepared == 2
    })
    .await;
    d.client.system().await.unwrap().spawner_pid
}

#[tokio::test]
async fn prepared_shells_wait_ahead_of_creates_and_dead_ones_are_replaced() {
    let d = Daemon::start().await;
    let spawner = two_prepared(&d).await;
    // A create takes one (its process becomes the sandbox's PID 1) and another is made.
    // (The spawner also replaces its shells when a host mount goes away, which other
    // tests' daemons do at any time: a few tries.)
    let mut sb = None;
    for _ in 0..5 {
        let waiting = shells(&d, spawner);
        assert_eq!(waiting.len(), 2, "{waiting:?}");
        let made = d.client.create_sandbox(&mini()).await.unwrap();
        if waiting.contains(&made.pid) {
            sb = Some(made);
            break;
        }
        d.client.delete_sandbox(&made.id, true).await.unwrap();
        d.wait_for("two prepared slots", Duration::from_secs(10), || async {
            d.client.system().await.unwrap().prepared == 2 && shells(&d, spawner).len() == 2
        })
        .await;
    }
    let sb = sb.expect("the sandbox's PID 1 is one of the prepared shells");
    d.wait_for("the pool to refill", Duration::from_secs(10), || async {
        d.client.system().await.unwrap().prepared == 2
    })
    .await;
    // Shells that die meanwhile are replaced on the spot.
    for pid in shells(&d, spawner) {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::KILL);
    }
    let other = d.client.create_sandbox(&mini()).await.unwrap();
    assert_eq!(d.sh(&other.id, "echo fine").await.0, "fine\n");
    assert_eq!(d.sh(&sb.id, "echo fine").await.0, "fine\n");
}

/// Whether process `pid` (still there) has a mount at `path`.
fn has_mount(pid: i32, path: &std::path::Path) -> bool {
    let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else { return false };
    let path = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

/// A tmpfs the test mounts on the host; unmounted (if still there) when dropped.
struct HostMount(std::path::PathBuf);

impl HostMount {
    fn new(path: std::path::PathBuf) -> HostMount {
        std::fs::create_dir(&path).unwrap();
        rustix::mount::mount("abxt-disk", &path, "tmpfs", rustix::mount::MountFlags::empty(), Some(c"size=1m"))
            .unwrap();
        HostMount(path)
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

#[tokio::test]
async fn prepared_shells_let_go_of_filesystems_the_host_unmounts() {
    // Mounted before the daemon makes its shells: every prepared shell's namespace has a
    // copy, which a host unmount does not reach (it is private there, and locked).
    let dir = tempfile::Builder::new().prefix("abxt-").tempdir().unwrap();
    let disk = HostMount::new(dir.path().join("abxt-disk"));
    let d = Daemon::start().await;
    let spawner = two_prepared(&d).await;
    let waiting = shells(&d, spawner);
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    for &pid in &waiting {
        assert!(has_mount(pid, &disk.0), "shell {pid} has a copy of the host's mounts");
    }
    // The host unmounts the disk (to eject it, detach an image): the waiting shells are
    // replaced by ones made after the unmount, which never had it.
    rustix::mount::unmount(&disk.0, rustix::mount::UnmountFlags::empty()).unwrap();
    d.wait_for("shells without the unmounted filesystem", Duration::from_secs(10), || async {
        let now = shells(&d, spawner);
        now.len() == 2 && now.iter().all(|p| !waiting.contains(p) && !has_mount(*p, &disk.0))
    })
    .await;
    assert!(waiting.iter().all(|&p| !has_mount(p, &disk.0)), "the old shells are gone");
    // Sandboxes come from the new shells and work.
    let id = d.mini(Limits::default()).await;
    let sb = d.client.get_sandbox(&id).await.unwrap();
    assert!(!waiting.contains(&sb.pid), "not one of the replaced shells");
    assert_eq!(d.sh(&id, "echo ok").await.0, "ok\n");
}

#[tokio::test]
async fn without_prewarm_sandboxes_are_made_from_scratch() {
    let d = Daemon::start_with(&["--prewarm", "0"]).await;
    let id = d.mini(Limits::default()).await;
    assert_eq!(d.sh(&id, "echo cold").await.0, "cold\n");
    let sys = d.client.system().await.unwrap();
    assert_eq!(sys.prepared, 0);
    assert!(shells(&d, sys.spawner_pid).is_empty(), "no process waits in the spawner");
}

#[tokio::test]
async fn paused_sandboxes_make_no_progress_and_resume_with_memory_intact() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    // A counter that lives in a shell variable (memory) and is written out every 20 ms.
    let cmd =
        ["sh", "-c", "n=0; while :; do n=$((n+1)); echo $n > /tmp/count; sleep 0.02; done"].map(String::from).to_vec();
    d.client.exec_background(&id, &abx_client::ExecRequest { cmd, ..Default::default() }).await.unwrap();
    // Read from the host (the sandbox's upper directory): an API read would resume it.
    let slot = d.slot_of(&d.client.get_sandbox(&id).await.unwrap());
    let file = d.slots.join(format!("{}-u{slot}", d.prefix)).join("data/upper/tmp/count");
    let count = || std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    d.wait_for("the counter to start", Duration::from_secs(5), || async { count() > 3 }).await;
    let sb = d.client.pause(&id).await.unwrap();
    assert_eq!(sb.state, abx_client::SandboxState::Paused);
    let frozen_at = count();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(count(), frozen_at, "no progress while paused");
    assert_eq!(
        d.client.get_sandbox(&id).await.unwrap().state,
        abx_client::SandboxState::Paused,
        "a get does not resume"
    );
    let out = d.cli(&["resume", &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{id} running"));
    d.wait_for("the counter to continue", Duration::from_secs(5), || async { count() > frozen_at + 3 }).await;
    // It went on from its own memory, not from 1.
    assert!(count() > frozen_at);
    // Any request resumes a paused sandbox: here an exec.
    let out = d.cli(&["pause", &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{id} paused"));
    let (out, _, code) = d.sh(&id, "echo awake").await;
    assert_eq!((out.as_str(), code), ("awake\n", 0));
    assert_eq!(d.client.get_sandbox(&id).await.unwrap().state, abx_client::SandboxState::Running);
    // A paused sandbox can be destroyed, and a destroyed one cannot be paused.
    d.client.pause(&id).await.unwrap();
    let e = d.client.delete_sandbox(&id, false).await.unwrap_err().to_string();
    assert!(e.contains("is paused"), "a removal without force names the real state: {e}");
    d.client.delete_sandbox(&id, true).await.unwrap();
    assert!(d.client.pause(&id).await.is_err());
}

#[tokio::test]
async fn idle_sandboxes_are_paused_and_wake_on_the_next_request() {
    let d = Daemon::start_with(&["--idle-pause", "1"]).await;
    let id = d.mini(Limits::default()).await;
    // An attached exec longer than the idle time is activity: it finishes undisturbed.
    let (out, _, code) = d.sh(&id, "sleep 2.2; echo done").await;
    assert_eq!((out.as_str(), code), ("done\n", 0));
    d.wait_for("the idle sandbox to be paused", Duration::from_secs(5), || async {
        d.client.get_sandbox(&id).await.unwrap().state == abx_client::SandboxState::Paused
    })
    .await;
    // The next request resumes it.
    let (out, _, code) = d.sh(&id, "echo back").await;
    assert_eq!((out.as_str(), code), ("back\n", 0));
    assert_eq!(d.client.get_sandbox(&id).await.unwrap().state, abx_client::SandboxState::Running);
    // Network traffic of its own processes is activity too: a background loop knocking on
    // the gateway's DNS port over TCP (refused at once: this daemon has no upstream) keeps
    // it running; once it stops, the sandbox is paused again.
    let traffic = ExecRequest {
        cmd: vec![
            "sh".into(),
            "-c".into(),
            "gw=$(ip route | awk '/default/ {print $3}'); \
             while [ ! -e /tmp/stop ]; do nc -w 1 $gw 53 </dev/null 2>/dev/null; sleep 0.05; done"
                .into(),
        ],
        ..Default::default()
    };
    d.client.exec_background(&id, &traffic).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        d.client.get_sandbox(&id).await.unwrap().state,
        abx_client::SandboxState::Running,
        "paused while its processes talked on the network"
    );
    d.sh(&id, "touch /tmp/stop").await;
    d.wait_for("the quiet sandbox to be paused", Duration::from_secs(5), || async {
        d.client.get_sandbox(&id).await.unwrap().state == abx_client::SandboxState::Paused
    })
    .await;
}

#[tokio::test]
async fn diff_lists_exactly_what_changed_since_the_template() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let script = "echo hi > /tmp/new.txt && mkdir -p /work/sub && echo x > /work/sub/f && \
                  echo extra >> /etc/passwd && touch /etc/group && rm /bin/true";
    let req = abx_client::ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: Some("root".into()),
        ..Default::default()
    };
    let (_, err, code) = d.exec(&id, req).await;
    assert_eq!(code, 0, "{err}");
    let diff = d.client.diff(&id).await.unwrap();
    let paths = |v: &[abx_client::DiffEntry]| v.iter().map(|e| e.path.clone()).collect::<Vec<String>>();
    assert_eq!(paths(&diff.added), ["/tmp/new.txt", "/work", "/work/sub", "/work/sub/f"], "{diff:?}");
    assert_eq!(paths(&diff.changed), ["/etc/passwd"], "touch alone is no change: {diff:?}");
    assert_eq!(paths(&diff.deleted), ["/bin/true"], "{diff:?}");
    // The CLI, and the tar of the changes.
    let tar = d.root.parent().unwrap().join("changes.tar");
    let out = d.cli(&["diff", &id, "--tar", &tar.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("A /tmp/new.txt\n") && text.contains("C /etc/passwd\n") && text.contains("D /bin/true\n"),
        "{text}"
    );
    let bytes = std::fs::read(&tar).unwrap();
    let mut a = tar::Archive::new(&bytes[..]);
    let mut names: Vec<String> =
        a.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
    names.sort();
    assert_eq!(names, ["etc/passwd", "tmp/new.txt", "work", "work/sub", "work/sub/f"]);
    // `--tar -`: the archive on standard output, the list on standard error.
    let out = d.cli(&["diff", &id, "--tar", "-"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("A /tmp/new.txt\n"));
    assert_eq!(out.stdout, bytes, "the same archive, on standard output");
    assert!(!std::path::Path::new("-").exists());
}

/// A pid a client holds from before a stop and start, or a rollback, never names a process
/// of the new run: the new pid namespace continues above the highest pid the sandbox
/// handed out. Before, every run numbered from 1 again, so the first background process
/// of each run had the same pid, and a client's old handle signalled (or wrote to, or
/// waited on) an unrelated process.
#[tokio::test]
async fn pids_from_before_a_restart_name_no_new_process() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let sleep = || ExecRequest { cmd: vec!["sleep".into(), "1000".into()], ..Default::default() };
    let mut last = d.client.exec_background(&id, &sleep()).await.unwrap();
    let snap = d.client.snapshot(&id, None).await.unwrap();
    for round in 0..3 {
        if round == 1 {
            d.client.rollback(&id, &snap.id).await.unwrap();
        } else {
            d.client.stop(&id).await.unwrap();
            d.client.start(&id).await.unwrap();
        }
        let pid = d.client.exec_background(&id, &sleep()).await.unwrap();
        assert!(pid > last, "round {round}: pid {pid} after {last}");
        let e = d.client.signal(&id, last, "KILL").await.unwrap_err();
        assert_eq!(e.code(), Some("not_found"), "round {round}: {e}");
        assert!(d.client.processes(&id).await.unwrap().iter().any(|p| p.pid == pid), "round {round}");
        last = pid;
    }
}

/// A request still being served is activity however long it takes: an upload that a slow
/// client sends for longer than the idle time is not frozen half-way (the agent then never
/// answered and the request hung for good).
#[tokio::test]
async fn a_slow_request_is_not_paused_under_it() {
    let d = Daemon::start_with(&["--idle-pause", "1"]).await;
    let id = d.mini(Limits::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow");
    let data: Vec<u8> = (0..240_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    // 80 KB/s: three seconds.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "20", "--limit-rate", "80K", "-T"])
        .arg(&file)
        .arg("--unix-socket")
        .arg(&d.socket)
        .arg(format!("http://agentbox/v1/sandboxes/{id}/files?path=/tmp/slow"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let (sum, _, code) = d.sh(&id, "md5sum < /tmp/slow").await;
    assert_eq!(code, 0);
    let want = String::from_utf8(std::process::Command::new("md5sum").arg(&file).output().unwrap().stdout).unwrap();
    assert_eq!(sum.split_whitespace().next(), want.split_whitespace().next());
}

/// A download the client reads slowly goes on after the request was answered: the
/// sandbox stays busy until it ends. (Before, idle auto-pause froze the agent in the
/// middle of the transfer, and the download hung for good.)
#[tokio::test]
async fn a_slow_download_is_not_paused_under_it() {
    let d = Daemon::start_with(&["--idle-pause", "1"]).await;
    let id = d.mini(Limits::default()).await;
    let (sum, _, code) = d.sh(&id, "head -c 2400000 /dev/urandom > /tmp/big && md5sum < /tmp/big").await;
    assert_eq!(code, 0);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big");
    // 400 KB/s: six seconds, far more than the socket buffers hold.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "25", "--limit-rate", "400K", "-o"])
        .arg(&file)
        .arg("--unix-socket")
        .arg(&d.socket)
        .arg(format!("http://agentbox/v1/sandboxes/{id}/files?path=/tmp/big"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8(std::process::Command::new("md5sum").arg(&file).output().unwrap().stdout).unwrap();
    assert_eq!(sum.split_whitespace().next(), got.split_whitespace().next());
}

/// `POST /v1/sandboxes` through curl: the status and the JSON answer.
async fn post_create(d: &Daemon, body: &str, header: Option<&str>) -> (u16, serde_json::Value) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-w", "\n%{http_code}", "-H", "content-type: application/json", "-d", body]);
    if let Some(h) = header {
        cmd.args(["-H", &format!("Idempotency-Key: {h}")]);
    }
    let out = cmd.arg("--unix-socket").arg(&d.socket).arg("http://agentbox/v1/sandboxes").output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("no status: {text}"));
    (code.parse().unwrap(), serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")))
}

/// A create with an idempotency key is made once: the same create again (a retry after a
/// lost answer) answers the same sandbox with 200, also when sent at once from several
/// clients; another request with the key is refused; the key is free again once its
/// sandbox is removed. Bad keys, and keys on a run, are refused by name.
#[tokio::test]
async fn a_create_with_an_idempotency_key_is_made_once() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let body = r#"{"template":"mini","idempotency_key":"task-7","metadata":{"k":"v"}}"#;
    let (code, first) = post_create(&d, body, None).await;
    assert_eq!(code, 201, "{first}");
    let id = first["id"].as_str().unwrap().to_string();
    let (code, again) = post_create(&d, body, None).await;
    assert_eq!((code, again["id"].as_str()), (200, Some(id.as_str())), "{again}");
    // The header form; the same request (the key not counted in it).
    let (code, again) = post_create(&d, r#"{"template":"mini","metadata":{"k":"v"}}"#, Some("task-7")).await;
    assert_eq!((code, again["id"].as_str()), (200, Some(id.as_str())), "{again}");
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 1);
    // Another request with the key.
    let (code, e) = post_create(&d, r#"{"template":"mini","idempotency_key":"task-7"}"#, None).await;
    assert_eq!(code, 409, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("task-7") && msg.contains(&id), "{msg}");
    // Header and body disagreeing.
    let (code, e) = post_create(&d, body, Some("task-8")).await;
    assert_eq!(code, 400, "{e}");

    // Sent at once by four clients: one sandbox, made by one of them.
    let body = r#"{"template":"mini","idempotency_key":"burst"}"#;
    let answers = futures_util::future::join_all((0..4).map(|_| post_create(&d, body, None))).await;
    let made: Vec<u16> = answers.iter().map(|(c, _)| *c).filter(|c| *c == 201).collect();
    assert_eq!(made, [201], "{answers:?}");
    let burst = answers[0].1["id"].as_str().unwrap();
    assert!(answers.iter().all(|(c, a)| matches!(c, 200 | 201) && a["id"] == burst), "{answers:?}");
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 2);

    // Removed: the key makes a new one.
    d.client.delete_sandbox(&id, true).await.unwrap();
    let (code, next) =
        post_create(&d, r#"{"template":"mini","idempotency_key":"task-7","metadata":{"k":"v"}}"#, None).await;
    assert_eq!(code, 201, "{next}");
    assert_ne!(next["id"].as_str(), Some(id.as_str()));

    for bad in ["", "has space", &"x".repeat(129)] {
        let body = serde_json::json!({"template": "mini", "idempotency_key": bad}).to_string();
        let (code, e) = post_create(&d, &body, None).await;
        assert_eq!(code, 400, "{bad:?}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("idempotency key"), "{e}");
    }
    let run = abx_client::RunRequest {
        sandbox: CreateSandbox {
            template: Some("mini".into()),
            idempotency_key: Some("r".into()),
            ..Default::default()
        },
        exec: ExecRequest { cmd: vec!["true".into()], ..Default::default() },
    };
    let Err(e) = d.client.run_once(&run).await else { panic!("a run with an idempotency key was accepted") };
    assert!(e.to_string().contains("idempotency key"), "{e}");
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 2);
}

/// A daemon killed between a freeze and its thaw (in a snapshot, or a resume) leaves the
/// processes frozen under a record that says running (or running under one that says
/// paused): the next daemon sets the freezer to what the record says when it finds the
/// sandbox again. (Before, every request to the "running" sandbox hung.)
#[tokio::test]
async fn a_freeze_left_by_a_killed_daemon_follows_the_record_after_a_restart() {
    let mut d = Daemon::start().await;
    let running = d.mini(Limits::default()).await;
    let paused = d.mini(Limits::default()).await;
    d.client.pause(&paused).await.unwrap();
    let a = d.slot_of(&d.client.get_sandbox(&running).await.unwrap());
    let b = d.slot_of(&d.client.get_sandbox(&paused).await.unwrap());
    d.kill9();
    let (file, frozen, thawed) = slot_freezer(&d, a);
    std::fs::write(file, frozen).unwrap();
    let (file, _, _) = slot_freezer(&d, b);
    std::fs::write(file, thawed).unwrap();
    d.spawn(&[]).await;
    let (out, _, code) = tokio::time::timeout(Duration::from_secs(10), d.sh(&running, "echo ok"))
        .await
        .expect("an exec in the sandbox recorded as running hung: still frozen");
    assert_eq!((out.as_str(), code), ("ok\n", 0));
    assert_eq!(d.client.get_sandbox(&paused).await.unwrap().state, abx_client::SandboxState::Paused);
    assert!(slot_frozen(&d, b), "the sandbox recorded as paused is frozen again");
    assert_eq!(d.sh(&paused, "echo resumed").await.0, "resumed\n");
}
