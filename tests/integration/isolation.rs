//! Isolation, checked from inside the sandbox with the `abx-probe` verifier.

use std::time::Duration;

use abx_client::{ExecRequest, Limits};

use crate::harness::Daemon;

fn verdict(r: &serde_json::Value, call: &str) -> String {
    r["verdicts"][call].as_str().unwrap_or("missing").to_string()
}

#[tokio::test]
async fn root_inside_is_not_root_outside_and_cannot_escalate() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    d.install_probe(&id).await;
    let r = d.probe(&id, Some("root")).await;
    assert_eq!(r["uid"], 0, "root inside the sandbox");
    let map: Vec<u64> = r["uid_map"].as_str().unwrap().split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(map[0], 0);
    assert!(map[1] >= u64::from(d.uid_start), "root maps to an unprivileged host uid: {map:?}");
    assert_eq!(map[2], 65536);
    // Seen from the host, the sandbox's processes run as that uid.
    let sb = d.client.get_sandbox(&id).await.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", sb.pid)).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.contains(&sb.uid_base.to_string()), "host sees uid {uid_line}");
    assert!(!uid_line.split_whitespace().skip(1).any(|u| u == "0"));
    assert_eq!(r["no_new_privs"], true);
    assert_eq!(r["seccomp_mode"], 2);
    // CAP_SYS_ADMIN (bit 21) is gone from every set.
    let cap = u64::from_str_radix(r["cap_bnd"].as_str().unwrap(), 16).unwrap();
    assert_eq!(cap & (1 << 21), 0, "CAP_SYS_ADMIN must not be in the bounding set");
}

#[tokio::test]
async fn dangerous_syscalls_are_refused() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    d.install_probe(&id).await;
    let r = d.probe(&id, Some("root")).await;
    for call in [
        "io_uring_setup",
        "bpf",
        "mount_tmpfs",
        "unshare_user",
        "unshare_mount",
        "setns",
        "open_tree",
        "fsopen",
        "pivot_root",
        "perf_event_open",
        "userfaultfd",
        "keyctl",
        "add_key",
        "kexec_load",
        "init_module",
        "finit_module",
        "reboot",
        "swapon",
        "ptrace_attach_pid1",
    ] {
        assert_eq!(verdict(&r, call), "refused", "{call}: {}", r["syscalls"][call]);
    }
    // And with the tools a user would reach for.
    let (_, err, code) = d.sh(&id, "mount -t tmpfs none /mnt").await;
    assert_ne!(code, 0, "mount must fail: {err}");
}

#[tokio::test]
async fn sees_only_its_own_processes_files_and_network() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    d.install_probe(&id).await;
    let marker = d.root.join("host-only-file");
    std::fs::write(&marker, "secret").unwrap();
    let r = d.probe(&id, Some("root")).await;
    let pids: Vec<u64> = r["pids_visible"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
    assert!(pids.contains(&1) && pids.len() <= 3, "only the agent and the probe: {pids:?}");
    let mut ifs: Vec<String> =
        r["interfaces"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_string()).collect();
    ifs.sort();
    assert_eq!(ifs, ["eth0", "lo"], "loopback and its own veth end only");
    // Host files are not reachable: the root is the template's.
    let (out, _, _) = d.sh(&id, &format!("cat {} 2>&1; ls /; cat /etc/hostname", marker.display())).await;
    assert!(!out.contains("secret"), "{out}");
    assert!(out.contains("linuxrc"), "busybox root expected: {out}");
    // The default policy is no egress: the host's firewall refuses at once.
    let (out, _, _) = d
        .exec(
            &id,
            ExecRequest {
                cmd: vec!["abx-probe".into(), "connect".into(), "203.0.113.1:80".into()],
                ..Default::default()
            },
        )
        .await;
    assert!(out.contains("ECONNREFUSED"), "{out}");
}

#[tokio::test]
async fn without_networking_a_sandbox_has_loopback_only() {
    let d = Daemon::start_with(&["--subnet", "none"]).await;
    let id = d.mini(Limits::default()).await;
    let (out, _, _) = d.sh(&id, "ls /sys/class/net; cat /etc/resolv.conf 2>&1").await;
    assert!(out.starts_with("lo\n"), "{out}");
    let sb = d.client.get_sandbox(&id).await.unwrap();
    assert!(sb.address.is_none());
    // Policies with egress are refused with the reason.
    let err = d
        .client
        .set_network(&id, &abx_client::NetworkPolicy { mode: abx_client::NetMode::Public, allow: vec![] })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--subnet none"), "{err}");
}

#[tokio::test]
async fn cannot_write_outside_its_root() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    d.install_probe(&id).await;
    for path in ["/proc/sys/kernel/hostname", "/sys/kernel/profiling", "/proc/sysrq-trigger"] {
        let (out, _, _) = d
            .exec(
                &id,
                ExecRequest {
                    cmd: vec!["abx-probe".into(), "write".into(), path.into()],
                    user: Some("root".into()),
                    ..Default::default()
                },
            )
            .await;
        assert!(out.contains("\"ok\":false"), "{path} must not be writable: {out}");
    }
    // Writing everywhere it can still lands in the sandbox's own upper directory.
    let (_, _, code) = d.sh(&id, "echo inside > /etc/agentbox-test").await;
    assert_ne!(code, 0, "the default user is not root: /etc is not writable for it");
    let (_, _, code) = d
        .exec(
            &id,
            ExecRequest {
                cmd: vec!["sh".into(), "-c".into(), "echo inside > /etc/agentbox-test".into()],
                user: Some("root".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(code, 0);
    assert!(!std::path::Path::new("/etc/agentbox-test").exists(), "the host's /etc is untouched");
}

#[tokio::test]
async fn memory_hog_is_oom_killed_and_the_sandbox_survives() {
    let d = Daemon::start().await;
    let id = d.mini(Limits { memory_bytes: Some(64 << 20), ..Default::default() }).await;
    d.install_probe(&id).await;
    let req =
        ExecRequest { cmd: vec!["abx-probe".into(), "hog".into(), "512".into(), "30".into()], ..Default::default() };
    let out = d.client.exec(&id, &req).await.unwrap().collect().await.unwrap();
    assert_eq!(out.status.signal, Some(9), "the hog is killed: {:?}", out.status);
    let stats = d.client.stats(&id).await.unwrap();
    assert!(stats.oom_kills >= 1, "{stats:?}");
    let (out, _, code) = d.sh(&id, "echo alive").await;
    assert_eq!((out.as_str(), code), ("alive\n", 0));
}

#[tokio::test]
async fn fork_bomb_is_stopped_by_the_pids_limit() {
    let d = Daemon::start().await;
    let id = d.mini(Limits { pids: Some(64), ..Default::default() }).await;
    let req = ExecRequest {
        // The top shell forks once, before the bomb exists, then loops without forking (a
        // fork could fail once the limit is hit: busybox sh exits then), so the timeout,
        // not a fork failure, ends it and kills its whole process group.
        cmd: vec!["sh".into(), "-c".into(), "(b(){ b|b& }; b) & while :; do :; done".into()],
        timeout_secs: Some(4.0),
        ..Default::default()
    };
    let (client, id2) = (d.client.clone(), id.clone());
    let bomb = tokio::spawn(async move { client.exec(&id2, &req).await.unwrap().collect().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = d.client.stats(&id).await.unwrap();
    assert!(stats.pids <= 64, "{stats:?}");
    let out = bomb.await.unwrap();
    assert!(out.status.timed_out, "{:?}", out.status);
    d.wait_for("the bomb's processes to go", Duration::from_secs(10), || async {
        d.client.stats(&id).await.unwrap().pids <= 2
    })
    .await;
    let (out, _, code) = d.sh(&id, "echo alive").await;
    assert_eq!((out.as_str(), code), ("alive\n", 0));
}

#[tokio::test]
async fn two_sandboxes_cannot_see_each_other() {
    let d = Daemon::start().await;
    let a = d.mini(Limits::default()).await;
    let b = d.mini(Limits::default()).await;
    let (sa, sb) = (d.client.get_sandbox(&a).await.unwrap(), d.client.get_sandbox(&b).await.unwrap());
    assert_ne!(sa.uid_base, sb.uid_base, "distinct uid ranges");
    let pid = d
        .client
        .exec_background(&a, &ExecRequest { cmd: vec!["sleep".into(), "300".into()], ..Default::default() })
        .await
        .unwrap();
    d.sh(&a, "echo from-a > /tmp/a-file").await;
    let (out, _, _) = d.sh(&b, "ps -o pid,args; ls /tmp; cat /tmp/a-file 2>&1").await;
    assert!(!out.contains("sleep 300"), "{out}");
    assert!(!out.contains("from-a"), "{out}");
    let (_, _, code) = d.sh(&b, &format!("kill -9 {pid}")).await;
    assert_ne!(code, 0, "b cannot signal a's process");
    let procs = d.client.processes(&a).await.unwrap();
    assert!(procs.iter().any(|p| p.pid == pid && p.exit.is_none()), "a's process still runs");
}

#[tokio::test]
async fn inherited_descriptors_do_not_reach_sandboxes() {
    // A descriptor without close-on-exec, as a careless parent might leave to the daemon:
    // the daemon, then the spawner, then each sandbox's first process inherit it.
    let marker = tempfile::Builder::new().prefix("abxt-stray-").tempfile().unwrap();
    let stray = std::fs::File::open(marker.path()).unwrap();
    rustix::io::fcntl_setfd(&stray, rustix::io::FdFlags::empty()).unwrap();
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let sb = d.client.get_sandbox(&id).await.unwrap();
    let fds = std::fs::read_dir(format!("/proc/{}/fd", sb.pid)).unwrap();
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert_ne!(target, marker.path(), "PID 1 of the sandbox holds the stray descriptor {:?}", fd.file_name());
    }
    let (out, _, _) = d.sh(&id, "ls /proc/self/fd | tr '\\n' ' '").await;
    assert_eq!(out.trim(), "0 1 2 3", "a process sees its stdio and its own listing only");
    drop(stray);
}

/// A script for inside a sandbox: listens on `port` with `nc`, sends `word` to it over
/// loopback once the listener answers, and prints what the listener received (waiting for
/// each step up to 5 s, not a fixed time: a loaded host may be slow to start either side).
/// The listener's input stays open: busybox `nc` shuts its sending side down when its
/// input ends, and a client that sees that before it has read its own input exits without
/// sending anything.
fn talk_to_self(port: u16, word: &str) -> String {
    format!(
        "sleep 30 2>/dev/null | nc -l -p {port} > /tmp/got & \
         for i in $(seq 50); do echo {word} | nc 127.0.0.1 {port} 2>/dev/null && break; sleep 0.1; done; \
         for i in $(seq 50); do [ -s /tmp/got ] && break; sleep 0.1; done; cat /tmp/got"
    )
}

/// Runs a shell script as root inside the sandbox.
async fn root_sh(d: &Daemon, id: &str, script: &str) -> (String, String, i32) {
    let req = ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: Some("root".into()),
        ..Default::default()
    };
    d.exec(id, req).await
}

#[tokio::test]
async fn the_network_namespace_cannot_be_reconfigured_but_serves_ordinary_use() {
    // One slot: the second sandbox reuses the first one's network namespace.
    let d = Daemon::start_with(&["--uid-slots", "1"]).await;
    let a = d.mini(Limits::default()).await;
    for cmd in [
        "ip link set lo down",
        "ip addr add 10.9.9.9/32 dev lo",
        "ip route add 10.9.0.0/16 dev lo",
        "ip addr add 10.9.9.9/32 dev eth0",
        "ip route del default",
        "ip link set eth0 down",
    ] {
        let (_, err, code) = root_sh(&d, &a, cmd).await;
        assert_ne!(code, 0, "root inside must not be able to run `{cmd}`: {err}");
    }
    let (out, _, _) = root_sh(&d, &a, "ip -o link show lo").await;
    assert!(out.contains("UP"), "loopback stays up: {out}");
    // Ports below 1024 are open to the unprivileged default user.
    let (out, err, code) = d.sh(&a, &talk_to_self(80, "ping")).await;
    assert_eq!((out.as_str(), code), ("ping\n", 0), "{err}");
    // A listener left behind dies with its sandbox: the next one on this slot finds the
    // port free and nothing answering.
    let (_, _, code) = d.sh(&a, "nc -l -p 8080 >/dev/null 2>&1 &").await;
    assert_eq!(code, 0);
    d.client.delete_sandbox(&a, true).await.unwrap();
    let b = d.mini(Limits::default()).await;
    assert_eq!(d.slot_of(&d.client.get_sandbox(&b).await.unwrap()), 0);
    let (_, _, code) = d.sh(&b, "echo x | nc -w 1 127.0.0.1 8080").await;
    assert_ne!(code, 0, "nothing listens on 8080 any more");
    let (out, err, code) = d.sh(&b, &talk_to_self(8080, "again")).await;
    assert_eq!((out.as_str(), code), ("again\n", 0), "{err}");
}

#[tokio::test]
async fn dev_shm_is_shared_memory_and_host_details_are_masked() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let (out, err, code) = d.sh(&id, "echo data > /dev/shm/seg && cat /dev/shm/seg && stat -c %a /dev/shm").await;
    assert_eq!((out.as_str(), code), ("data\n1777\n", 0), "{err}");
    for dir in ["/proc/acpi", "/sys/firmware"] {
        let (out, _, _) =
            root_sh(&d, &id, &format!("test -d {dir} && ls -A {dir} | wc -l; touch {dir}/x && echo wrote")).await;
        assert!(!out.contains("wrote"), "{dir} must not be writable: {out}");
        assert!(out.trim().is_empty() || out.trim() == "0", "{dir} must look empty: {out}");
    }
    let (_, _, code) = root_sh(&d, &id, "touch /sys/kernel/x").await;
    assert_ne!(code, 0, "/sys is read-only");
    let (out, _, _) = d.sh(&id, "ls /sys/class/net").await;
    assert_eq!(out.trim(), "eth0\nlo", "sysfs shows the sandbox's own network namespace");
}

#[tokio::test]
async fn the_agent_cannot_be_signalled_from_inside_and_reaps_orphans() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    // PID 1 of a pid namespace gets from inside only the signals it handles; the agent
    // handles SIGCHLD alone (to reap), and a forged one only makes it look for children.
    // (Rust's runtime handles SIGSEGV and SIGBUS on a small alternate stack; the agent
    // removes those handlers: SEGV and BUS sent at once overflowed that stack and killed it.)
    let (out, err, code) = root_sh(
        &d,
        &id,
        "for s in TERM INT HUP QUIT USR1 USR2 ALRM PIPE CHLD SEGV BUS SEGV BUS KILL STOP; do kill -$s 1; done; \
         grep -E '^Sig(Cgt|Ign)' /proc/1/status",
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    // SigCgt: caught signals, a hex mask, signal n at bit n - 1: SIGCHLD (17) alone.
    let caught = out.lines().find_map(|l| l.strip_prefix("SigCgt:")).unwrap().trim();
    assert_eq!(u64::from_str_radix(caught, 16).unwrap(), 1 << 16, "{out}");
    // Still serving, and orphans (a background child whose parent exited) are reaped:
    // none is left a zombie.
    let (out, err, code) = root_sh(
        &d,
        &id,
        // Looked at again for up to 5 s (a loaded host may reap late); one never reaped
        // stays a zombie.
        "(sleep 0.2 &) ; sleep 0.5; for i in $(seq 50); do \
               z=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null); [ -z \"$z\" ] && break; sleep 0.1; \
             done; echo $z",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "", "zombies left: {out}");
    let (out, _, code) = d.sh(&id, "echo alive").await;
    assert_eq!((out.trim(), code), ("alive", 0));
}
