//! Time travel: snapshots, forks, rollback, diff since a snapshot, stop/start, persistent
//! sandboxes, volumes and timeout actions, on a real daemon (btrfs data image).

use std::collections::BTreeMap;
use std::time::Duration;

use abx_client::{CreateSandbox, ExecRequest, ForkRequest, SandboxState, TimeoutAction, VolumeMount};

use crate::harness::Daemon;

fn mini() -> CreateSandbox {
    CreateSandbox { template: Some("mini".into()), ..Default::default() }
}

/// Runs a script as root in the sandbox; panics unless it exits 0.
async fn root(d: &Daemon, id: &str, script: &str) -> String {
    let req = ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: Some("0".into()),
        ..Default::default()
    };
    let (out, err, code) = d.exec(id, req).await;
    assert_eq!(code, 0, "{script}: {err}");
    out
}

/// Like `root`, returning the exit code and output instead of asserting.
async fn try_root(d: &Daemon, id: &str, script: &str) -> (String, i32) {
    let req = ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: Some("0".into()),
        ..Default::default()
    };
    let (out, err, code) = d.exec(id, req).await;
    (out + &err, code)
}

#[tokio::test]
async fn snapshot_has_prior_writes_and_forks_are_independent() {
    let d = Daemon::start().await;
    let id = d.mini(Default::default()).await;
    // Written (and not synced) right before the snapshot, by a process that returned.
    root(&d, &id, "mkdir /work && for i in $(seq 1 500); do echo $i > /work/f$i; done; echo one > /work/a").await;
    let snap = d.client.snapshot(&id, Some("first")).await.unwrap();
    assert_eq!(snap.sandbox, id);
    assert_eq!(snap.name.as_deref(), Some("first"));
    assert!(snap.frozen_ms > 0.0, "a running sandbox is frozen for its snapshot");
    assert_eq!(d.client.get_sandbox(&id).await.unwrap().state, SandboxState::Running, "thawed afterwards");
    root(&d, &id, "echo after > /work/a; echo later > /work/later").await;

    let forks = d.client.fork_snapshot("first", &ForkRequest { count: Some(3), ..Default::default() }).await.unwrap();
    assert_eq!(forks.sandboxes.len(), 3);
    assert_eq!(forks.snapshot.as_deref(), Some(snap.id.as_str()));
    let ids: Vec<String> = forks.sandboxes.iter().map(|s| s.id.clone()).collect();
    for f in &ids {
        assert_eq!(root(&d, f, "cat /work/a; ls /work | wc -l").await, "one\n501\n", "fork {f} has the snapshot");
        assert_eq!(try_root(&d, f, "cat /work/later").await.1, 1, "writes after the snapshot are not in it");
        assert_eq!(d.client.get_sandbox(f).await.unwrap().snapshot.as_deref(), Some(snap.id.as_str()));
    }
    root(&d, &ids[0], "echo mine > /work/a; echo x > /work/only0").await;
    assert_eq!(root(&d, &ids[1], "cat /work/a").await, "one\n", "forks do not see each other's writes");
    assert_eq!(try_root(&d, &ids[1], "cat /work/only0").await.1, 1);
    assert_eq!(root(&d, &id, "cat /work/a").await, "after\n", "nor does the source");

    // A fork of a running sandbox: through a snapshot that is removed afterwards.
    let r = d.client.fork_sandbox(&ids[0], &ForkRequest { count: Some(2), ..Default::default() }).await.unwrap();
    assert_eq!(r.snapshot, None);
    for f in &r.sandboxes {
        assert_eq!(root(&d, &f.id, "cat /work/a /work/only0").await, "mine\nx\n");
        let sb = d.client.get_sandbox(&f.id).await.unwrap();
        assert_eq!(sb.snapshot, None, "a fork does not name the snapshot that is gone");
    }
    let listed: Vec<String> = d.client.snapshots(None).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(listed, std::slice::from_ref(&snap.id), "the fork's own snapshot is not kept");
    // Sizes are measured off the snapshot's path.
    d.wait_for("the snapshot's size", Duration::from_secs(10), || async {
        d.client.get_snapshot(&snap.id).await.unwrap().size_bytes > 1000
    })
    .await;

    for (req, code) in [
        (ForkRequest { count: Some(0), ..Default::default() }, "invalid_argument"),
        (ForkRequest { count: Some(101), ..Default::default() }, "invalid_argument"),
    ] {
        assert_eq!(d.client.fork_snapshot(&snap.id, &req).await.unwrap_err().code(), Some(code));
    }
    assert_eq!(d.client.fork_snapshot("nope", &ForkRequest::default()).await.unwrap_err().code(), Some("not_found"));
    let e = d.client.snapshot(&id, Some("first")).await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");
    let e = d.client.snapshot(&id, Some("Bad Name")).await.unwrap_err();
    assert!(e.to_string().contains("Bad Name"), "{e}");
    // One name never means both a sandbox and a snapshot (`fork` takes either).
    let e = d.client.snapshot(&id, Some(&ids[1])).await.unwrap_err();
    assert!(e.code() == Some("conflict") && e.to_string().contains("names a sandbox"), "{e}");
    let e = d.client.create_sandbox(&CreateSandbox { name: Some("first".into()), ..mini() }).await.unwrap_err();
    assert!(e.code() == Some("conflict") && e.to_string().contains("names a snapshot"), "{e}");
}

/// Unset settings of a fork come from its source: its environment, user, policy and also
/// its labels, its timeout's length and a snapshot at expiry. Not `persist` (names are
/// unique), nor `stop` at expiry, which is for persistent sandboxes.
#[tokio::test]
async fn forks_take_their_sources_labels_and_timeout() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let req = CreateSandbox {
        metadata: BTreeMap::from([("team".to_string(), "a".to_string()), ("role".to_string(), "source".to_string())]),
        timeout_secs: Some(3600),
        on_timeout: Some(TimeoutAction::Snapshot),
        ..mini()
    };
    let src = d.client.create_sandbox(&req).await.unwrap();
    let over = ForkRequest {
        count: Some(1),
        metadata: BTreeMap::from([("role".into(), "fork".into())]),
        ..Default::default()
    };
    let fork = d.client.fork_sandbox(&src.id, &over).await.unwrap().sandboxes.remove(0);
    let want = BTreeMap::from([("team".to_string(), "a".to_string()), ("role".to_string(), "fork".to_string())]);
    assert_eq!(fork.metadata, want, "labels merged, the request's win");
    let left = fork.expires_at.unwrap() - fork.created_at;
    assert!((3599..=3601).contains(&left), "the source's timeout: {left} s");
    assert_eq!(fork.on_timeout, TimeoutAction::Snapshot);
    // From a named snapshot too, and a timeout given with the fork wins.
    let snap = d.client.snapshot(&src.id, Some("labelled")).await.unwrap();
    let req = ForkRequest { count: Some(1), timeout_secs: Some(60), ..Default::default() };
    let f2 = d.client.fork_snapshot(&snap.id, &req).await.unwrap().sandboxes.remove(0);
    assert_eq!(f2.metadata.get("role").map(String::as_str), Some("source"));
    assert!(f2.expires_at.unwrap() - f2.created_at <= 61);
    // A persistent source: the forks are not persistent and do not stop at expiry.
    let p =
        d.client.create_sandbox(&CreateSandbox { name: Some("keeper".into()), persist: true, ..mini() }).await.unwrap();
    assert_eq!(p.on_timeout, TimeoutAction::Stop);
    let f3 = d.client.fork_sandbox(&p.id, &ForkRequest::default()).await.unwrap().sandboxes.remove(0);
    assert!(!f3.persist && f3.name.is_none());
    assert_eq!(f3.on_timeout, TimeoutAction::Destroy);
}

#[tokio::test]
async fn rollback_restores_content_deletions_and_permissions_exactly() {
    let d = Daemon::start().await;
    let id = d.mini(Default::default()).await;
    root(&d, &id, "mkdir -p /work/dir && echo keep > /work/dir/f && echo v1 > /work/a && chmod 640 /work/a && chown 1000:1000 /work/a && rm /etc/hostname").await;
    let before = root(&d, &id, "ls -ln /work/a | cut -c1-10,16-25; cat /work/a").await;
    let snap = d.client.snapshot(&id, None).await.unwrap();
    root(&d, &id, "echo v2 > /work/a && chmod 777 /work/a && chown 0:0 /work/a && rm -r /work/dir && echo new > /work/new && echo back > /etc/hostname").await;
    let (pids_before, _) = try_root(&d, &id, "sleep 1000 & echo $!").await;
    let old_pid = d.client.get_sandbox(&id).await.unwrap().pid;

    let sb = d.client.rollback(&id, &snap.id).await.unwrap();
    assert_eq!(sb.id, id, "the id is kept");
    assert_eq!(sb.state, SandboxState::Running);
    assert_ne!(sb.pid, old_pid, "processes were restarted");
    assert_eq!(root(&d, &id, "ls -ln /work/a | cut -c1-10,16-25; cat /work/a").await, before);
    assert_eq!(root(&d, &id, "cat /work/dir/f").await, "keep\n");
    assert_eq!(try_root(&d, &id, "ls /work/new").await.1, 1, "a file made after the snapshot is gone");
    assert_eq!(try_root(&d, &id, "ls /etc/hostname").await.1, 1, "a deletion before the snapshot holds");
    let ps = d.client.processes(&id).await.unwrap();
    assert!(!ps.iter().any(|p| p.pid.to_string() == pids_before.trim()), "old processes are gone: {ps:?}");
    assert!(d.client.diff_since(&id, Some(&snap.id)).await.unwrap().added.is_empty());

    // Any snapshot on the same template layers will do, also another sandbox's.
    d.template("mini").await;
    let other = d.client.create_sandbox(&mini()).await.unwrap();
    let other_snap = d.client.snapshot(&other.id, None).await.unwrap();
    assert!(d.client.rollback(&id, &other_snap.id).await.is_ok(), "same template layers: allowed");
    assert_eq!(d.client.rollback(&id, "nope").await.unwrap_err().code(), Some("not_found"));
}

#[tokio::test]
async fn diff_since_a_snapshot_lists_exactly_the_later_changes() {
    let d = Daemon::start().await;
    let id = d.mini(Default::default()).await;
    root(&d, &id, "mkdir /w && echo 1 > /w/keep && echo 1 > /w/edit && echo 1 > /w/gone && echo x > /etc/motd").await;
    d.client.snapshot(&id, Some("base-line")).await.unwrap();
    root(&d, &id, "echo 2 > /w/edit && rm /w/gone && echo n > /w/new && touch /w/keep && rm /etc/hostname").await;
    let diff = d.client.diff_since(&id, Some("base-line")).await.unwrap();
    let paths = |v: &[abx_client::DiffEntry]| v.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&diff.added), ["/w/new"]);
    assert_eq!(paths(&diff.changed), ["/w/edit"]);
    assert_eq!(paths(&diff.deleted), ["/etc/hostname", "/w/gone"]);
    let all = d.client.diff(&id).await.unwrap();
    assert!(paths(&all.added).contains(&"/w/keep".to_string()), "since the template: everything");
    let tar = d.client.diff_archive_since(&id, Some("base-line")).await.unwrap();
    let mut a = tar::Archive::new(&tar[..]);
    let names: Vec<String> = a.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
    assert_eq!(names, ["w/new", "w/edit"]);
    let out = d.cli(&["diff", &id, "--since", "base-line"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "D /etc/hostname\nC /w/edit\nD /w/gone\nA /w/new\n");
    // As a layer: the deletions as OCI whiteouts too.
    let layer = tempfile::NamedTempFile::new().unwrap();
    let out = d.cli(&["diff", &id, "--since", "base-line", "--tar", layer.path().to_str().unwrap(), "--whiteouts"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tar = std::fs::read(layer.path()).unwrap();
    let names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["w/new", "w/edit", "etc/.wh.hostname", "w/.wh.gone"]);

    // Back to the template's state by a rollback: since the later snapshot, what it had
    // changed or deleted in the template is back, and a FIFO is a change like any file.
    let fresh = d.mini(Default::default()).await;
    let start = d.client.snapshot(&fresh, Some("fresh-start")).await.unwrap();
    root(&d, &fresh, "echo edited >> /etc/hosts && rm /etc/group && mkfifo /tmp/pipe").await;
    d.client.snapshot(&fresh, Some("fresh-later")).await.unwrap();
    let diff = d.client.diff_since(&fresh, Some("fresh-later")).await.unwrap();
    assert!(diff.added.is_empty() && diff.changed.is_empty() && diff.deleted.is_empty(), "{diff:?}");
    d.client.rollback(&fresh, &start.id).await.unwrap();
    let diff = d.client.diff_since(&fresh, Some("fresh-later")).await.unwrap();
    assert_eq!(paths(&diff.added), ["/etc/group"]);
    assert_eq!(paths(&diff.changed), ["/etc/hosts"]);
    assert_eq!(paths(&diff.deleted), ["/tmp/pipe"]);
    let tar = d.client.diff_archive(&fresh).await;
    assert!(tar.is_ok(), "{tar:?}");
    root(&d, &fresh, "mkfifo /tmp/pipe2").await;
    let tar = d.client.diff_archive(&fresh).await.unwrap();
    let mut a = tar::Archive::new(&tar[..]);
    let kinds: Vec<(String, tar::EntryType)> = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.path().unwrap().display().to_string(), e.header().entry_type()))
        .collect();
    assert!(kinds.contains(&("tmp/pipe2".into(), tar::EntryType::Fifo)), "{kinds:?}");
}

#[tokio::test]
async fn deleting_a_snapshot_used_by_a_fork_does_not_break_the_fork() {
    let d = Daemon::start().await;
    let id = d.mini(Default::default()).await;
    root(&d, &id, "echo data > /srv/file 2>/dev/null || (mkdir -p /srv && echo data > /srv/file)").await;
    let snap = d.client.snapshot(&id, None).await.unwrap();
    let fork = d.client.fork_snapshot(&snap.id, &ForkRequest::default()).await.unwrap().sandboxes.remove(0);
    d.client.delete_snapshot(&snap.id).await.unwrap();
    assert_eq!(d.client.get_snapshot(&snap.id).await.unwrap_err().code(), Some("not_found"));
    assert_eq!(d.client.delete_snapshot(&snap.id).await.unwrap_err().code(), Some("not_found"));
    assert_eq!(root(&d, &fork.id, "cat /srv/file; echo more >> /srv/file; cat /srv/file").await, "data\ndata\nmore\n");
    // The fork can be snapshotted and forked in turn.
    let s2 = d.client.snapshot(&fork.id, None).await.unwrap();
    let f2 = d.client.fork_snapshot(&s2.id, &ForkRequest::default()).await.unwrap().sandboxes.remove(0);
    assert_eq!(root(&d, &f2.id, "cat /srv/file").await, "data\nmore\n");
}

/// Dirty page cache charged to the memory cgroup of process `pid` (a sandbox's PID 1), in
/// bytes: `dirty` of a v1 memory controller, `file_dirty` on a cgroup2-only host.
fn dirty_bytes(pid: i32) -> u64 {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = cg.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',').any(|c| c == "memory").then(|| path.to_string())
    });
    let (file, key) = match v1 {
        Some(path) => (format!("/sys/fs/cgroup/memory{path}/memory.stat"), "dirty"),
        None => {
            let path = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap().to_string();
            (format!("/sys/fs/cgroup{path}/memory.stat"), "file_dirty")
        }
    };
    let stat = std::fs::read_to_string(&file).unwrap();
    stat.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {file}"))
}

#[tokio::test]
async fn a_snapshot_writes_out_only_its_own_sandboxs_data() {
    // A snapshot writes the sandbox's dirty data out first (so that the freeze is short);
    // it must not wait for what other sandboxes have written, which on a busy host took
    // a quiet sandbox's snapshot from milliseconds to half a second.
    let d = Daemon::start().await;
    let quiet = d.mini(Default::default()).await;
    let writer = d.mini(Default::default()).await;
    let pid = d.client.get_sandbox(&writer).await.unwrap().pid;
    let mut kept = None;
    // Kernel writeback of the writer's pages at the wrong moment (another process calling
    // sync(2)) would make one round look like a failure; three in a row would not.
    for round in 0..3 {
        root(&d, &writer, &format!("dd if=/dev/zero of=/big{round} bs=1M count=32 2>/dev/null")).await;
        let before = dirty_bytes(pid);
        assert!(before >= 16 << 20, "the writer's 32 MiB are dirty in the page cache: {before} bytes");
        d.client.snapshot(&quiet, None).await.unwrap();
        let after = dirty_bytes(pid);
        if after >= before / 2 {
            kept = Some((before, after));
            break;
        }
        eprintln!("round {round}: the writer's dirty data went from {before} to {after} bytes");
    }
    let (before, after) = kept.expect("another sandbox's snapshot wrote out the writer's data, three times");
    eprintln!("the writer's dirty data: {before} bytes before, {after} after the quiet sandbox's snapshot");
    // Its own snapshot writes its data out, and has it.
    let snap = d.client.snapshot(&writer, None).await.unwrap();
    let left = dirty_bytes(pid);
    assert!(left < before / 4, "the writer's own snapshot writes its data out: {left} of {before} bytes left");
    let fork = d.client.fork_snapshot(&snap.id, &ForkRequest::default()).await.unwrap().sandboxes.remove(0);
    assert_eq!(root(&d, &fork.id, "wc -c < /big0").await.trim(), (32u64 << 20).to_string());
    // The throwaway snapshot that wrote the data out is gone.
    let dir = d.slots.parent().unwrap().join("snapshots");
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 2, "the two snapshots, nothing else: {names:?}");
    assert!(names.iter().all(|n| !n.to_string_lossy().contains('.')), "{names:?}");
}

#[tokio::test]
async fn stop_keeps_files_frees_the_slot_and_start_boots_again() {
    let d = Daemon::start().await;
    let id = d.mini(Default::default()).await;
    root(&d, &id, "echo kept > /root/file 2>/dev/null || (mkdir -p /root && echo kept > /root/file)").await;
    let sb = d.client.stop(&id).await.unwrap();
    assert_eq!(sb.state, SandboxState::Stopped);
    let e = d.client.exec(&id, &ExecRequest { cmd: vec!["true".into()], ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");
    assert!(e.to_string().contains("stopped"), "{e}");
    assert_eq!(d.client.stop(&id).await.unwrap().state, SandboxState::Stopped, "idempotent");
    // Its files are there for diffs and snapshots while stopped.
    assert!(d.client.diff(&id).await.unwrap().added.iter().any(|e| e.path == "/root/file"));
    let snap = d.client.snapshot(&id, None).await.unwrap();
    assert_eq!(snap.frozen_ms, 0.0);
    let sb = d.client.start(&id).await.unwrap();
    assert_eq!(sb.state, SandboxState::Running);
    assert_eq!(root(&d, &id, "cat /root/file").await, "kept\n");
    // A stopped sandbox is removed without force, with its files.
    d.client.stop(&id).await.unwrap();
    d.client.delete_sandbox(&id, false).await.unwrap();
    assert_eq!(d.client.get_sandbox(&id).await.unwrap_err().code(), Some("not_found"));
}

/// Starts `script` in the background in sandbox `id` and waits until it has made
/// `/root/ready` (its traps are set by then).
async fn background_ready(d: &Daemon, id: &str, script: &str) {
    let cmd = vec!["sh".into(), "-c".into(), script.to_string()];
    d.client.exec_background(id, &ExecRequest { cmd, user: Some("0".into()), ..Default::default() }).await.unwrap();
    for _ in 0..200 {
        if root(d, id, "test -e /root/ready && echo yes || true").await == "yes\n" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{script} did not start");
}

#[tokio::test]
async fn stop_sends_sigterm_and_waits_the_grace_period_before_killing() {
    let d = Daemon::start().await;
    const CLEAN_EXIT: &str =
        "mkdir -p /root; trap 'echo bye > /root/term; exit 0' TERM; touch /root/ready; while :; do sleep 0.05; done";
    // A process that cleans up on SIGTERM gets to do it.
    let id = d.mini(Default::default()).await;
    background_ready(&d, &id, CLEAN_EXIT).await;
    assert_eq!(d.client.stop(&id).await.unwrap().state, SandboxState::Stopped);
    d.client.start(&id).await.unwrap();
    assert_eq!(root(&d, &id, "cat /root/term").await, "bye\n", "the TERM trap ran before the stop ended it");
    // A grace period of 0 kills at once: the trap never runs.
    root(&d, &id, "rm -f /root/term /root/ready").await;
    background_ready(&d, &id, CLEAN_EXIT).await;
    d.client.stop_with_grace(&id, 0.0).await.unwrap();
    d.client.start(&id).await.unwrap();
    assert_eq!(root(&d, &id, "test -e /root/term && echo ran || echo killed").await, "killed\n");
    // A process that ignores SIGTERM is killed once the grace period is over, not before.
    root(&d, &id, "rm -f /root/ready").await;
    background_ready(&d, &id, "mkdir -p /root; trap '' TERM; touch /root/ready; while :; do sleep 0.05; done").await;
    let t = std::time::Instant::now();
    assert_eq!(d.client.stop_with_grace(&id, 0.6).await.unwrap().state, SandboxState::Stopped);
    assert!(t.elapsed() >= Duration::from_millis(600), "stopped after {:?}", t.elapsed());
    // The CLI passes --time; a grace period out of range is refused, naming it.
    d.client.start(&id).await.unwrap();
    for bad in ["-1", "nan", "inf"] {
        let out = d.cli(&["stop", &format!("--time={bad}"), &id]);
        assert_eq!(out.status.code(), Some(2), "a usage error for --time {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("from 0 to 3600"), "{err}");
    }
    assert_eq!(d.client.get_sandbox(&id).await.unwrap().state, SandboxState::Running);
    let e = d.client.stop_with_grace(&id, -1.0).await.unwrap_err().to_string();
    assert!(e.contains("grace_secs"), "{e}");
    assert_eq!(d.client.get_sandbox(&id).await.unwrap().state, SandboxState::Running, "nothing stopped");
    let out = d.cli(&["stop", "--time", "0", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.client.get_sandbox(&id).await.unwrap().state, SandboxState::Stopped);
}

#[tokio::test]
async fn a_persistent_sandbox_survives_daemon_sigkill_and_a_reboot() {
    let mut d = Daemon::start().await;
    d.template("mini").await;
    let req = CreateSandbox { name: Some("agent-42".into()), persist: true, ..mini() };
    let sb = d.client.create_sandbox(&req).await.unwrap();
    assert!(sb.persist);
    assert_eq!(sb.expires_at, None, "no default timeout");
    assert_eq!(sb.on_timeout, TimeoutAction::Stop);
    root(&d, "agent-42", "echo memory > /home/notes 2>/dev/null || (mkdir -p /home && echo memory > /home/notes)")
        .await;
    // A plain sandbox next to it, for contrast.
    let plain = d.client.create_sandbox(&mini()).await.unwrap();

    // The daemon dies, then the sandboxes' processes (as in a host reboot).
    d.kill9();
    for pid in [sb.pid, plain.pid] {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::KILL);
    }
    let gone =
        |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z")).unwrap_or(true);
    d.wait_for("the sandboxes' processes to end", Duration::from_secs(10), || async {
        gone(sb.pid) && gone(plain.pid)
    })
    .await;
    d.spawn(&[]).await;
    let back = d.client.get_sandbox("agent-42").await.unwrap();
    assert_eq!(back.state, SandboxState::Stopped, "kept, stopped");
    assert_eq!(d.client.get_sandbox(&plain.id).await.unwrap_err().code(), Some("not_found"), "a plain one is cleaned");
    d.client.start("agent-42").await.unwrap();
    assert_eq!(root(&d, "agent-42", "cat /home/notes").await, "memory\n");

    // Stopped, it also survives a SIGKILL and restart of the daemon.
    d.client.stop("agent-42").await.unwrap();
    d.kill9();
    d.spawn(&[]).await;
    assert_eq!(d.client.get_sandbox("agent-42").await.unwrap().state, SandboxState::Stopped);
    d.client.start("agent-42").await.unwrap();
    assert_eq!(root(&d, "agent-42", "cat /home/notes").await, "memory\n");
}

#[tokio::test]
async fn volumes_outlive_sandboxes_and_mount_read_write_or_read_only() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let v = d.client.create_volume("cache").await.unwrap();
    assert_eq!(v.size_bytes, 0);
    assert_eq!(d.client.create_volume("cache").await.unwrap_err().code(), Some("conflict"));
    assert_eq!(d.client.create_volume("Bad/Name").await.unwrap_err().code(), Some("invalid_argument"));
    let rw = VolumeMount { name: "cache".into(), path: "/data".into(), read_only: false };
    let a = d.client.create_sandbox(&CreateSandbox { volumes: vec![rw.clone()], ..mini() }).await.unwrap();
    // Any user of the sandbox may write (the volume's root is 0777).
    let (_, err, code) = d.sh(&a.id, "head -c 100000 /dev/zero > /data/blob && echo hi > /data/hello").await;
    assert_eq!(code, 0, "{err}");
    d.client.delete_sandbox(&a.id, true).await.unwrap();

    let ro = VolumeMount { name: "cache".into(), path: "/mnt/deep/v".into(), read_only: true };
    let b = d.client.create_sandbox(&CreateSandbox { volumes: vec![ro], ..mini() }).await.unwrap();
    assert_eq!(root(&d, &b.id, "cat /mnt/deep/v/hello").await, "hi\n", "the volume outlived its first sandbox");
    let (out, code) = try_root(&d, &b.id, "echo x > /mnt/deep/v/nope").await;
    assert_ne!(code, 0, "read-only: {out}");
    let v = d.client.volume("cache").await.unwrap();
    assert!(v.size_bytes >= 100_000, "{v:?}");
    assert_eq!(v.entries, 2);
    assert_eq!(v.used_by, std::slice::from_ref(&b.id));
    let e = d.client.delete_volume("cache").await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "in use: {e}");

    // Bad mounts are refused and create nothing.
    for (m, needle) in [
        (
            VolumeMount { name: "nope".into(), path: "/x".into(), read_only: false },
            "volume 'nope' not found; create it with `agentbox volume create nope`",
        ),
        (VolumeMount { name: "cache".into(), path: "/proc/x".into(), read_only: false }, "/proc/x"),
        (VolumeMount { name: "cache".into(), path: "relative".into(), read_only: false }, "relative"),
    ] {
        let before = d.client.list_sandboxes().await.unwrap().len();
        let e = d.client.create_sandbox(&CreateSandbox { volumes: vec![m], ..mini() }).await.unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
        assert_eq!(d.client.list_sandboxes().await.unwrap().len(), before);
    }
    // A snapshot of a sandbox with the volume holds it too: its forks mount it.
    let snap = d.client.snapshot(&b.id, Some("with-cache")).await.unwrap();
    d.client.delete_sandbox(&b.id, true).await.unwrap();
    let e = d.client.delete_volume("cache").await.unwrap_err();
    assert!(e.code() == Some("conflict") && e.to_string().contains("with-cache"), "{e}");
    d.client.delete_snapshot(&snap.id).await.unwrap();
    d.client.delete_volume("cache").await.unwrap();
    assert!(d.client.volumes().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_timeout_can_snapshot_before_destroying() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let req = CreateSandbox { timeout_secs: Some(2), on_timeout: Some(TimeoutAction::Snapshot), ..mini() };
    let sb = d.client.create_sandbox(&req).await.unwrap();
    root(&d, &sb.id, "echo evidence > /tmp/log").await;
    d.wait_for("the timeout", Duration::from_secs(15), || async { d.client.get_sandbox(&sb.id).await.is_err() }).await;
    let snap = d.client.get_snapshot(&format!("{}-timeout", sb.id)).await.unwrap();
    assert_eq!(snap.sandbox, sb.id);
    let f = d.client.fork_snapshot(&snap.id, &ForkRequest::default()).await.unwrap().sandboxes.remove(0);
    assert_eq!(root(&d, &f.id, "cat /tmp/log").await, "evidence\n", "the files at expiry, for forensics");

    // The name `<id>-timeout` already taken: the snapshot gets another name; the latest
    // files are not lost.
    let req = CreateSandbox { timeout_secs: Some(3600), on_timeout: Some(TimeoutAction::Snapshot), ..mini() };
    let sb = d.client.create_sandbox(&req).await.unwrap();
    d.client.snapshot(&sb.id, Some(&format!("{}-timeout", sb.id))).await.unwrap();
    root(&d, &sb.id, "echo latest > /tmp/log").await;
    d.client.set_timeout(&sb.id, 1).await.unwrap();
    d.wait_for("the timeout", Duration::from_secs(15), || async { d.client.get_sandbox(&sb.id).await.is_err() }).await;
    let snap = d.client.get_snapshot(&format!("{}-timeout-2", sb.id)).await.unwrap();
    let f = d.client.fork_snapshot(&snap.id, &ForkRequest::default()).await.unwrap().sandboxes.remove(0);
    assert_eq!(root(&d, &f.id, "cat /tmp/log").await, "latest\n");

    // Stop on timeout keeps the sandbox; a start gives it its timeout again, from then.
    // (4 s: expiry times are whole seconds, and the renewed one is set before the start
    // boots, so a shorter one can run out under a second after a slow start answers.)
    let req = CreateSandbox { timeout_secs: Some(4), on_timeout: Some(TimeoutAction::Stop), ..mini() };
    let s = d.client.create_sandbox(&req).await.unwrap();
    let stopped = || async { d.client.get_sandbox(&s.id).await.unwrap().state == SandboxState::Stopped };
    d.wait_for("the timeout to stop it", Duration::from_secs(15), stopped).await;
    // Once: the stop registered the sandbox anew, which armed the passed timeout again
    // (before: a second expiry at once).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expiries = d.log().lines().filter(|l| l.contains("timeout expired") && l.contains(&s.id)).count();
    assert_eq!(expiries, 1, "{}", d.log());
    let started = d.client.start(&s.id).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(started.expires_at.is_some_and(|e| e > now), "{started:?}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(d.client.get_sandbox(&s.id).await.unwrap().state, SandboxState::Running, "not stopped again at once");
    d.wait_for("the renewed timeout to stop it", Duration::from_secs(15), stopped).await;
}

#[tokio::test]
async fn a_template_made_from_a_snapshot_shares_the_layers_and_keeps_deletions() {
    let d = Daemon::start().await;
    let id = d.mini(Default::default()).await;
    root(&d, &id, "echo built > /opt/tool 2>/dev/null || (mkdir -p /opt && echo built > /opt/tool); rm /etc/hostname; rm -rf /usr/sbin && mkdir /usr/sbin && echo x > /usr/sbin/only").await;
    let snap = d.client.snapshot(&id, Some("golden")).await.unwrap();
    let out = d.cli(&["template", "create", "golden-tpl", "--from-snapshot", "golden"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = d.client.template("golden-tpl").await.unwrap();
    let mini = d.client.template("mini").await.unwrap();
    assert_eq!(t.layers.len(), mini.layers.len() + 1);
    assert_eq!(t.layers[..mini.layers.len()], mini.layers[..], "the template's layers are shared");
    let sb = d
        .client
        .create_sandbox(&CreateSandbox { template: Some("golden-tpl".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(root(&d, &sb.id, "cat /opt/tool; ls /usr/sbin").await, "built\nonly\n", "files and an opaque directory");
    assert_eq!(try_root(&d, &sb.id, "ls /etc/hostname").await.1, 1, "a deletion is a whiteout in the layer");
    assert!(d.client.diff(&sb.id).await.unwrap().added.iter().all(|e| e.path == "/etc/resolv.conf"));
    // The same snapshot gives the same layer digest.
    let mut s = d
        .client
        .build_template(&abx_client::BuildTemplate {
            name: "golden-2".into(),
            from_snapshot: Some(snap.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    while let Some(ev) = s.next().await.unwrap() {
        if let abx_client::BuildEvent::Done { template } = ev {
            assert_eq!(template.layers, t.layers);
        }
    }
    let e = d.cli(&["template", "create", "x", "--from-snapshot", "nope"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("nope"), "{}", String::from_utf8_lossy(&e.stderr));
}

#[tokio::test]
async fn without_btrfs_snapshots_forks_and_rollback_work_by_copying() {
    // `--data dir` on this host's ext4: no subvolumes, snapshots are copies.
    let d = Daemon::start_with(&["--data", "dir"]).await;
    let id = d.mini(Default::default()).await;
    root(&d, &id, "echo v1 > /tmp/a && chmod 604 /tmp/a && rm /etc/hostname").await;
    let snap = d.client.snapshot(&id, None).await.unwrap();
    assert!(d.root.join("snapshots").join(&snap.id).join("upper/tmp/a").is_file(), "a copy under the state root");
    root(&d, &id, "echo v2 > /tmp/a && echo back > /etc/hostname").await;
    let f = d.client.fork_snapshot(&snap.id, &ForkRequest::default()).await.unwrap().sandboxes.remove(0);
    assert_eq!(root(&d, &f.id, "cat /tmp/a; ls /etc/hostname 2>&1 || true").await.lines().next(), Some("v1"));
    d.client.rollback(&id, &snap.id).await.unwrap();
    assert_eq!(root(&d, &id, "ls -l /tmp/a | cut -c1-10; cat /tmp/a").await, "-rw----r--\nv1\n");
    assert_eq!(try_root(&d, &id, "ls /etc/hostname").await.1, 1);
    d.client.stop(&id).await.unwrap();
    d.client.start(&id).await.unwrap();
    assert_eq!(root(&d, &id, "cat /tmp/a").await, "v1\n");
}

/// A request that comes in while a rollback restarts the sandbox waits for it instead of
/// failing with "is creating": here an exec, sent once the rollback is seen under way (state
/// `starting`; the template's start command makes the restart take half a second before it
/// is ready). The same for a start of a stopped sandbox.
/// How many processes of the `slow` template's start command run (its shell, or the
/// `sleep 99917` it becomes: the command lines that end with 99917).
const START_COUNT: &str = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done | grep -c '99917 $'";

#[tokio::test]
async fn an_exec_during_a_rollback_waits_for_it() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let ctx = tempfile::tempdir().unwrap();
    let req = abx_client::BuildTemplate {
        name: "slow".into(),
        dockerfile: Some(
            // Ready once this boot's start command wrote the start time of this boot's
            // PID 1 (a rolled back or started sandbox has an older /tmp/ready in its files).
            "FROM mini\nCMD [\"sh\", \"-c\", \"sleep 0.5; cut -d' ' -f22 /proc/1/stat > /tmp/ready; exec sleep 99917\"]\n\
             HEALTHCHECK CMD test \"$(cat /tmp/ready)\" = \"$(cut -d' ' -f22 /proc/1/stat)\"\n"
                .into(),
        ),
        context: Some(ctx.path().display().to_string()),
        ..Default::default()
    };
    crate::builds::build(&d, &req).await.unwrap();
    let sb =
        d.client.create_sandbox(&CreateSandbox { template: Some("slow".into()), ..Default::default() }).await.unwrap();
    root(&d, &sb.id, "echo before > /home/f").await;
    let snap = d.client.snapshot(&sb.id, None).await.unwrap();
    root(&d, &sb.id, "echo after > /home/f").await;
    let client = d.client.clone();
    let (id, snap_id) = (sb.id.clone(), snap.id.clone());
    let rollback = tokio::spawn(async move { client.rollback(&id, &snap_id).await });
    let wait_starting = || async {
        let t0 = std::time::Instant::now();
        while d.client.get_sandbox(&sb.id).await.unwrap().state != SandboxState::Starting {
            assert!(t0.elapsed() < Duration::from_secs(5), "the operation was never seen under way");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    wait_starting().await;
    let (out, code) = try_root(&d, &sb.id, "cat /home/f; test -e /tmp/ready && echo ready").await;
    assert_eq!((out.as_str(), code), ("before\nready\n", 0), "the exec ran after the rollback");
    rollback.await.unwrap().unwrap();
    assert_eq!(root(&d, &sb.id, START_COUNT).await, "1\n", "the start command runs once after a rollback");

    // A start of a stopped sandbox shows `starting`; an exec and a timeout change sent
    // meanwhile wait for it (before: "is stopped, not running", and a timeout recorded on
    // the stopped record while the files moved to the new slot).
    let stopped = d.client.stop(&sb.id).await.unwrap();
    // Stopped, it holds no slot: no address or uid range shown, no cgroup statistics
    // (before: those of whichever sandbox took the slot next).
    assert_eq!((stopped.address, stopped.uid_base), (None, 0));
    assert_eq!(d.client.stats(&sb.id).await.unwrap_err().code(), Some("conflict"));
    let client = d.client.clone();
    let id = sb.id.clone();
    let start = tokio::spawn(async move { client.start(&id).await });
    wait_starting().await;
    // A diff waits too (before: "is starting; try again when it is not").
    let diff = d.client.diff(&sb.id).await.unwrap();
    assert!(diff.added.iter().chain(&diff.changed).any(|e| e.path == "/home/f"), "{diff:?}");
    assert_eq!(d.client.get_sandbox(&sb.id).await.unwrap().state, SandboxState::Running, "the diff waited");
    let changed = d.client.set_timeout(&sb.id, 3600).await.unwrap();
    assert_eq!(changed.state, SandboxState::Running, "the timeout change waited for the start");
    let (out, code) = try_root(&d, &sb.id, "cat /home/f; test -e /tmp/ready && echo ready").await;
    assert_eq!((out.as_str(), code), ("before\nready\n", 0), "the exec ran after the start");
    start.await.unwrap().unwrap();
    // The start ran the template's start command again (before: a started or rolled back
    // sandbox ran none).
    assert_eq!(root(&d, &sb.id, START_COUNT).await, "1\n", "the start command runs once after the start");

    // A stop sent during a rollback runs after it, on the sandbox the rollback restarted.
    let client = d.client.clone();
    let (id, snap_id) = (sb.id.clone(), snap.id.clone());
    let rollback = tokio::spawn(async move { client.rollback(&id, &snap_id).await });
    wait_starting().await;
    let stopped = d.client.stop(&sb.id).await.unwrap();
    assert_eq!(stopped.state, SandboxState::Stopped);
    rollback.await.unwrap().unwrap();
    assert_eq!(d.client.get_sandbox(&sb.id).await.unwrap().state, SandboxState::Stopped);
    // A destroy sent with a start removes the sandbox whichever runs first: before it
    // (the start then finds nothing), or after it, the processes it started too.
    d.client.delete_sandbox(&sb.id, true).await.unwrap();
    for round in 0..6 {
        let req = CreateSandbox { template: Some("slow".into()), ..Default::default() };
        let id = d.client.create_sandbox(&req).await.unwrap().id;
        d.client.stop(&id).await.unwrap();
        let client = d.client.clone();
        let sid = id.clone();
        let start = tokio::spawn(async move { client.start(&sid).await });
        tokio::time::sleep(Duration::from_micros(300 * round)).await;
        d.client.delete_sandbox(&id, true).await.unwrap();
        let _ = start.await.unwrap();
        assert_eq!(d.client.get_sandbox(&id).await.unwrap_err().code(), Some("not_found"), "round {round}");
    }
    d.wait_for("no process of a started and destroyed sandbox left", Duration::from_secs(10), || async {
        crate::harness::host_processes("sleep 99917").is_empty()
    })
    .await;
}

/// Guards the pins of a create in flight (`pins.rs`): a `template rm` racing a create
/// from that template used to delete the layers the new sandbox had just mounted (its
/// files gone, and it could never start again), and a `volume rm` racing a create that
/// mounts the volume let both succeed (a sandbox with a deleted volume).
#[tokio::test]
async fn a_removal_racing_a_create_never_takes_what_the_create_uses() {
    let d = Daemon::start().await;
    let src = d.mini(Default::default()).await;
    for i in 0..8 {
        root(&d, &src, &format!("echo {i} > /etc/marker{i}")).await;
        let snap = d.client.snapshot(&src, None).await.unwrap();
        let name = format!("race{i}");
        let req = abx_client::BuildTemplate {
            name: name.clone(),
            from_snapshot: Some(snap.id.clone()),
            ..Default::default()
        };
        let mut s = d.client.build_template(&req).await.unwrap();
        while s.next().await.unwrap().is_some() {}
        let create = CreateSandbox { template: Some(name.clone()), ..Default::default() };
        let (rm, made) = tokio::join!(d.client.delete_template(&name), d.client.create_sandbox(&create));
        if let Ok(sb) = made {
            assert_eq!(
                try_root(&d, &sb.id, &format!("cat /etc/marker{i}")).await,
                (format!("{i}\n"), 0),
                "round {i}: the template's top layer is gone (rm: {rm:?})"
            );
            d.client.stop(&sb.id).await.unwrap();
            d.client.start(&sb.id).await.unwrap_or_else(|e| panic!("round {i}: start after the race: {e}"));
            d.client.delete_sandbox(&sb.id, true).await.unwrap();
        }
        let _ = d.client.delete_snapshot(&snap.id).await;
        let _ = d.client.delete_template(&name).await;
    }
    for i in 0..12 {
        let name = format!("rv{i}");
        d.client.create_volume(&name).await.unwrap();
        let create = CreateSandbox {
            volumes: vec![VolumeMount { name: name.clone(), path: "/d".into(), read_only: false }],
            ..mini()
        };
        let (rm, made) = tokio::join!(d.client.delete_volume(&name), d.client.create_sandbox(&create));
        match (&rm, &made) {
            (Ok(()), Ok(sb)) => panic!("round {i}: volume {name} removed while {} was made with it", sb.id),
            (Err(_), Ok(sb)) => {
                assert_eq!(try_root(&d, &sb.id, "echo hi > /d/f && cat /d/f").await, ("hi\n".into(), 0));
                d.client.delete_sandbox(&sb.id, true).await.unwrap();
                d.client.delete_volume(&name).await.unwrap();
            }
            (Ok(()), Err(e)) => assert!(e.to_string().contains("not found"), "round {i}: {e}"),
            (Err(a), Err(b)) => panic!("round {i}: both failed: {a} / {b}"),
        }
    }
    // A snapshot removed while a fork copies it: the fork has it whole, or finds it gone
    // (it failed with a copy error of half a directory, as a 500).
    root(&d, &src, "echo forked > /etc/forkmark").await;
    for i in 0..10 {
        let snap = d.client.snapshot(&src, None).await.unwrap();
        let fork = abx_client::ForkRequest { count: Some(2), ..Default::default() };
        let (rm, made) = tokio::join!(d.client.delete_snapshot(&snap.id), d.client.fork_snapshot(&snap.id, &fork));
        rm.unwrap_or_else(|e| panic!("round {i}: the removal failed: {e}"));
        match made {
            Ok(f) => {
                for sb in &f.sandboxes {
                    assert_eq!(try_root(&d, &sb.id, "cat /etc/forkmark").await, ("forked\n".into(), 0), "round {i}");
                    d.client.delete_sandbox(&sb.id, true).await.unwrap();
                }
            }
            Err(e) => assert_eq!(e.code(), Some("not_found"), "round {i}: {e}"),
        }
    }
}

/// Guards a failed start: it renewed the expiry of a sandbox whose timeout had passed
/// although the sandbox stayed stopped.
#[tokio::test]
async fn a_start_that_fails_leaves_the_sandbox_as_it_was() {
    let d = Daemon::start_with(&["--uid-slots", "2", "--prewarm", "0"]).await;
    d.template("mini").await;
    let req = CreateSandbox {
        name: Some("sleeper".into()),
        persist: true,
        timeout_secs: Some(1),
        on_timeout: Some(TimeoutAction::Stop),
        ..mini()
    };
    let id = d.client.create_sandbox(&req).await.unwrap().id;
    d.wait_for("the timeout to stop it", Duration::from_secs(10), || async {
        d.client.get_sandbox(&id).await.unwrap().state == SandboxState::Stopped
    })
    .await;
    let before = d.client.get_sandbox(&id).await.unwrap();
    // Both uid ranges taken: the start cannot get one.
    d.mini(Default::default()).await;
    d.mini(Default::default()).await;
    let e = d.client.start(&id).await.unwrap_err().to_string();
    assert!(e.contains("uid ranges are in use"), "{e}");
    let after = d.client.get_sandbox(&id).await.unwrap();
    assert_eq!((after.state, after.expires_at), (SandboxState::Stopped, before.expires_at));
}

/// A diff reads the sandbox's files on the host without holding it: a removal, stop or
/// rollback meanwhile can take them away under the walk. That is said as such (409 "was
/// removed while the request ran", or not found), never as a 500 `internal` ("read the
/// changes of sandbox ...: No such file or directory"), which the MCP soak found.
#[tokio::test]
async fn a_diff_racing_a_removal_stop_or_rollback_says_what_happened() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let mut outcomes = BTreeMap::<String, u32>::new();
    for round in 0..24u64 {
        let id = d.client.create_sandbox(&mini()).await.unwrap().id;
        root(&d, &id, "for d in $(seq 100); do mkdir -p /w/$d; for f in $(seq 100); do echo $f > /w/$d/$f; done; done")
            .await;
        let snap = d.client.snapshot(&id, None).await.unwrap();
        let diff = {
            let (c, id) = (d.client.clone(), id.clone());
            tokio::spawn(async move { c.diff(&id).await })
        };
        tokio::time::sleep(Duration::from_millis(round % 8 * 3)).await;
        match round % 3 {
            0 => d.client.delete_sandbox(&id, true).await.unwrap(),
            1 => drop(d.client.stop_with_grace(&id, 0.0).await.unwrap()),
            _ => drop(d.client.rollback(&id, &snap.id).await.unwrap()),
        }
        let outcome = match diff.await.unwrap() {
            Ok(_) => "ok".to_string(),
            Err(e) => {
                let code = e.code().unwrap_or("none").to_string();
                assert!(
                    matches!(code.as_str(), "conflict" | "not_found"),
                    "round {round}: a diff cut by a removal, stop or rollback: {e}"
                );
                code
            }
        };
        *outcomes.entry(outcome).or_default() += 1;
        let _ = d.client.delete_sandbox(&id, true).await;
        let _ = d.client.delete_snapshot(&snap.id).await;
    }
    eprintln!("outcomes: {outcomes:?}");
}

/// A fork with an idempotency key is made once: the same fork again answers the same
/// sandboxes, from a snapshot or a sandbox, through the API or the CLI; the key with
/// another request (another fork, a create) is refused.
#[tokio::test]
async fn a_fork_with_an_idempotency_key_is_made_once() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let id = d.client.create_sandbox(&mini()).await.unwrap().id;
    let snap = d.client.snapshot(&id, None).await.unwrap();
    let keyed = |key: &str, count: u32| ForkRequest {
        count: Some(count),
        idempotency_key: Some(key.into()),
        ..Default::default()
    };
    let ids =
        |r: abx_client::ForkResult| r.sandboxes.into_iter().map(|s| s.id).collect::<std::collections::BTreeSet<_>>();
    let first = ids(d.client.fork_snapshot(&snap.id, &keyed("f1", 3)).await.unwrap());
    assert_eq!(first.len(), 3);
    let again = d.client.fork_snapshot(&snap.id, &keyed("f1", 3)).await.unwrap();
    assert_eq!(again.snapshot.as_deref(), Some(snap.id.as_str()));
    assert_eq!(ids(again), first);
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 4);
    let e = d.client.fork_snapshot(&snap.id, &keyed("f1", 2)).await.unwrap_err();
    assert!(e.code() == Some("conflict") && e.to_string().contains("'f1'"), "{e}");
    let e = d.client.create_sandbox(&CreateSandbox { idempotency_key: Some("f1".into()), ..mini() }).await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");

    // The CLI, forking the sandbox itself.
    let args = ["fork", id.as_str(), "--count", "2", "--idempotency-key", "f2"];
    let o = d.cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let made: std::collections::BTreeSet<String> =
        String::from_utf8_lossy(&o.stdout).split_whitespace().map(String::from).collect();
    assert_eq!(made.len(), 2);
    let o = d.cli(&args);
    let again: std::collections::BTreeSet<String> =
        String::from_utf8_lossy(&o.stdout).split_whitespace().map(String::from).collect();
    assert_eq!(again, made, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 6);
}
