//! A real daemon per test: its own state root, name prefix, uid range and socket, so tests
//! run in parallel. Dropping a [`Daemon`] destroys its sandboxes, stops it, and asserts
//! that nothing with its prefix is left on the host (cgroups, sandbox directories,
//! processes).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use abx_client::{Client, CreateSandbox, ExecRequest, Limits};

/// The agentbox binary under test.
pub fn agentbox_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agentbox"))
}

fn target_dir() -> PathBuf {
    agentbox_bin().parent().and_then(Path::parent).map(Path::to_path_buf).expect("target dir")
}

/// A static binary built for the sandbox (musl), from the environment or target/.
fn static_binary(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    for profile in ["release", "debug"] {
        let p = target_dir().join("x86_64-unknown-linux-musl").join(profile).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} (static) not found: run `cargo build --target x86_64-unknown-linux-musl -p abx-agent -p abx-probe` \
         or set {env} (scripts/test does this)"
    );
}

pub fn agent_bin() -> PathBuf {
    static_binary("ABX_TEST_AGENT", "agentbox-agent")
}

pub fn probe_bin() -> PathBuf {
    static_binary("ABX_TEST_PROBE", "abx-probe")
}

/// A uid range no other running test holds: a lock file per slot, held while the test runs.
struct UidSlot {
    start: u32,
    /// The slot number, also used for the daemon's sandbox address pool.
    index: u32,
    _lock: std::fs::File,
}

fn uid_slot() -> UidSlot {
    let dir = Path::new("/tmp/abxt-uid-slots");
    std::fs::create_dir_all(dir).unwrap();
    let first = std::process::id() as usize;
    for i in 0..200 {
        let slot = (first + i) % 200;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(slot.to_string()))
            .unwrap();
        if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok() {
            // 64 sandboxes of 65536 uids per test daemon, from 2^30 up to below 2^31 (apart
            // from the default daemon range, 2^27 + 4096 x 65536).
            return UidSlot { start: (1 << 30) + slot as u32 * 64 * 65536, index: slot as u32, _lock: f };
        }
    }
    panic!("no free test uid slot");
}

pub struct Daemon {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub prefix: String,
    /// Where the daemon keeps slot directories (from `GET /v1/system`).
    pub slots: PathBuf,
    pub uid_start: u32,
    /// The sandbox address pool: a /25 of 10.240.0.0/16 per test slot.
    pub subnet: String,
    /// Named network namespace the daemon runs in (None: the host's).
    pub netns: Option<String>,
    /// Started as a shell script's background job would be: with SIGINT and SIGQUIT
    /// ignored, which its children inherit.
    background_job: bool,
    child: Option<Child>,
    /// Set by [`Daemon::adopt_spawner`]: reap this pid after the daemon stops.
    spawner: Option<u32>,
    pub client: Client,
    _slot: UidSlot,
    _dir: tempfile::TempDir,
}

pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).unwrap();
    b.iter().map(|x| format!("{:x}", x & 15)).collect()
}

impl Daemon {
    /// Starts a daemon with the default options.
    pub async fn start() -> Daemon {
        Self::start_with(&[]).await
    }

    /// Starts a daemon with extra command-line options (`--flag value` pairs, overriding
    /// the harness's defaults).
    pub async fn start_with(extra: &[&str]) -> Daemon {
        Self::start_in(None, extra).await
    }

    /// Starts a daemon inside the named network namespace `netns` (made by the test).
    pub async fn start_in(netns: Option<&str>, extra: &[&str]) -> Daemon {
        Self::start_opts(netns, extra, false).await
    }

    /// Starts a daemon the way `agentbox daemon &` in a shell script does: SIGINT and
    /// SIGQUIT ignored (a non-interactive shell's background job), inherited by its
    /// children unless something resets them.
    pub async fn start_as_background_job() -> Daemon {
        Self::start_opts(None, &[], true).await
    }

    async fn start_opts(netns: Option<&str>, extra: &[&str], background_job: bool) -> Daemon {
        assert!(rustix::process::geteuid().is_root(), "integration tests need root");
        // 0700, like `mktemp -d` or /root: the directories above a state root need not be
        // searchable by the sandboxes' users.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("abxt-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .unwrap();
        let root = dir.path().join("root");
        let socket = dir.path().join("api.sock");
        let prefix = format!("abxt{}", random_hex(8));
        let slot = uid_slot();
        let subnet = format!("10.240.{}.{}/25", slot.index / 2, (slot.index % 2) * 128);
        let mut d = Daemon {
            subnet,
            netns: netns.map(String::from),
            background_job,
            client: Client::new(&format!("unix:{}", socket.display())).unwrap(),
            root,
            socket,
            slots: PathBuf::new(),
            prefix,
            uid_start: slot.start,
            child: None,
            spawner: None,
            _slot: slot,
            _dir: dir,
        };
        d.spawn(extra).await;
        d.slots = PathBuf::from(d.client.system().await.unwrap().data.slots);
        // Always: a spawner orphaned by a killed daemon (or a failing test) comes to us.
        d.adopt_spawner().await;
        d
    }

    /// (Re)starts the daemon process on this state.
    pub async fn spawn(&mut self, extra: &[&str]) {
        if let Err(log) = self.try_spawn(extra).await {
            panic!("daemon did not start:\n{log}");
        }
    }

    /// (Re)starts the daemon; `Err(log)` when it exits instead of serving.
    pub async fn try_spawn(&mut self, extra: &[&str]) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut args: Vec<(String, String)> = vec![
            ("--root".into(), self.root.display().to_string()),
            ("--listen".into(), format!("unix:{}", self.socket.display())),
            ("--prefix".into(), self.prefix.clone()),
            ("--uid-start".into(), self.uid_start.to_string()),
            ("--uid-slots".into(), "64".into()),
            ("--agent".into(), agent_bin().display().to_string()),
            ("--log".into(), "info,hickory_server=warn".into()),
            ("--data-size".into(), "4G".into()),
            ("--subnet".into(), self.subnet.clone()),
            ("--uplink".into(), "none".into()),
            ("--dns-upstream".into(), "none".into()),
            ("--ingress".into(), "none".into()),
        ];
        for pair in extra.chunks(2) {
            // "+--flag": one more of a repeatable flag, not a replacement.
            if let Some(flag) = pair[0].strip_prefix('+') {
                args.push((flag.to_string(), pair[1].to_string()));
                continue;
            }
            match args.iter_mut().find(|(k, _)| k == pair[0]) {
                Some(slot) => slot.1 = pair[1].to_string(),
                None => args.push((pair[0].to_string(), pair[1].to_string())),
            }
        }
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(agentbox_bin());
                c
            }
            None if self.background_job => {
                // `trap '' SIG` ignores SIG, and exec keeps what is ignored.
                let mut c = Command::new("sh");
                c.args(["-c", "trap '' INT QUIT; exec \"$0\" \"$@\""]).arg(agentbox_bin());
                c
            }
            None => Command::new(agentbox_bin()),
        };
        let child = cmd
            .arg("daemon")
            .args(args.iter().flat_map(|(k, v)| [k, v]))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.client.system().await.is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("daemon exited with {st}:\n{}", self.log()));
            }
            assert!(Instant::now() < deadline, "daemon did not come up:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The daemon's pid (None while it is stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> PathBuf {
        self._dir.path().join("daemon.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Makes this test process a subreaper, so that the spawner, which outlives a killed
    /// daemon, is re-parented to it and can be reaped when the test ends (this host's init
    /// does not reap orphans).
    pub async fn adopt_spawner(&mut self) -> u32 {
        let me = rustix::process::Pid::from_raw(std::process::id() as i32);
        rustix::process::set_child_subreaper(me).unwrap();
        let pid = self.client.system().await.unwrap().spawner_pid;
        self.spawner = Some(pid);
        pid
    }

    fn reap_spawner(&mut self) {
        let Some(pid) = self.spawner.take().and_then(|p| rustix::process::Pid::from_raw(p as i32)) else { return };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => panic!("the spawner {pid:?} did not exit after the daemon stopped"),
            }
        }
    }

    /// SIGKILLs the daemon (sandboxes must survive this).
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("daemon running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("daemon did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Builds a template once (mini: busybox, instant; base: Debian, cached machine-wide).
    pub async fn template(&self, name: &str) {
        if self.client.template(name).await.is_ok() {
            return;
        }
        let mut s = self
            .client
            .build_template(&abx_client::BuildTemplate {
                name: name.into(),
                recipe: None,
                from_dir: None,
                from_snapshot: None,
                ..Default::default()
            })
            .await
            .unwrap();
        while let Some(ev) = s.next().await.unwrap() {
            match ev {
                abx_client::BuildEvent::Done { .. } => return,
                abx_client::BuildEvent::Error { message, .. } => panic!("building {name}: {message}"),
                _ => {}
            }
        }
        panic!("build of {name} ended without a result");
    }

    /// A running sandbox from `mini` with the given limits.
    pub async fn mini(&self, limits: Limits) -> String {
        self.template("mini").await;
        let req = CreateSandbox { template: Some("mini".into()), limits, ..Default::default() };
        self.client.create_sandbox(&req).await.unwrap().id
    }

    /// Runs a command and returns (stdout, stderr, exit code).
    pub async fn sh(&self, id: &str, script: &str) -> (String, String, i32) {
        self.exec(id, ExecRequest { cmd: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }).await
    }

    pub async fn exec(&self, id: &str, req: ExecRequest) -> (String, String, i32) {
        let out = self.client.exec(id, &req).await.unwrap().collect().await.unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.shell_code(),
        )
    }

    /// Copies the verifier into a sandbox as /usr/bin/abx-probe.
    pub async fn install_probe(&self, id: &str) {
        let bytes = std::fs::read(probe_bin()).unwrap();
        self.client.with_file_user("root").write_file(id, "/usr/bin/abx-probe", bytes, Some(0o755)).await.unwrap();
    }

    /// `abx-probe report` from inside the sandbox.
    pub async fn probe(&self, id: &str, user: Option<&str>) -> serde_json::Value {
        let req = ExecRequest {
            cmd: vec!["abx-probe".into(), "report".into()],
            user: user.map(String::from),
            ..Default::default()
        };
        let (out, err, code) = self.exec(id, req).await;
        assert_eq!(code, 0, "probe failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("probe output is not JSON ({e}): {out}"))
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command(args).output().unwrap()
    }

    /// The CLI against this daemon, stdin closed, not yet run (for other stdio).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(agentbox_bin());
        c.arg("--host").arg(format!("unix:{}", self.socket.display())).args(args).stdin(Stdio::null());
        c
    }

    /// Host objects carrying this daemon's prefix: cgroup dirs, sandbox dirs.
    pub fn host_objects(&self) -> Vec<String> {
        let mut found = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let p = h.path().join(&self.prefix);
                if let Ok(children) = std::fs::read_dir(&p) {
                    for c in children.flatten().filter(|c| c.path().is_dir()) {
                        found.push(c.path().display().to_string());
                    }
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.slots) {
            found.extend(rd.flatten().map(|e| e.path().display().to_string()));
        }
        found.extend(self.mounts());
        if self.nft(&["list", "table", "ip", &self.prefix]) {
            found.push(format!("nft table ip {}", self.prefix));
        }
        found.extend(self.links().into_iter().map(|l| format!("link {l}")));
        found
    }

    /// Runs `nft ARGS` in the daemon's network namespace; whether it succeeded.
    fn nft(&self, args: &[&str]) -> bool {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => Command::new("nft"),
        };
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    /// This daemon's veth ends in its network namespace (the host's, unless it runs in
    /// one of the test's).
    fn links(&self) -> Vec<String> {
        if self.netns.is_some() {
            return vec![];
        }
        let devs = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
        devs.lines()
            .filter_map(|l| l.split(':').next().map(str::trim))
            .filter(|n| {
                n.strip_prefix(self.prefix.as_str())
                    .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(String::from)
            .collect()
    }

    /// Mounts under this daemon's state root (its data image, when it has one).
    pub fn mounts(&self) -> Vec<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.root.display().to_string();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .map(|m| format!("mount {m}"))
            .collect()
    }

    /// The slot (uid range, cgroups, directory) a sandbox holds.
    pub fn slot_of(&self, sb: &abx_client::Sandbox) -> u32 {
        (sb.uid_base - self.uid_start) / 65536
    }

    /// Panics unless the slot is empty ([`Daemon::slot_leftovers`]) within 2 s: the
    /// spawner replaces its prepared shells whenever a mount goes away on the host (other
    /// tests unmount all the time), and a replaced shell, SIGKILLed and not waited for, is
    /// still in the slot's cgroups for a moment after its memory is gone, when it no longer
    /// looks like a shell. A real leftover stays.
    pub fn assert_slot_empty(&self, slot: u32) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = self.slot_leftovers(slot);
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "slot {slot} still holds {left:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What is left in a slot: processes in its cgroups, files in its upper and work
    /// directories, an agent socket. Empty once a sandbox is gone.
    pub fn slot_leftovers(&self, slot: u32) -> Vec<String> {
        let name = format!("{}-u{slot}", self.prefix);
        let mut left = Vec::new();
        for h in ["pids", "memory", "unified"] {
            let procs = Path::new("/sys/fs/cgroup").join(h).join(&self.prefix).join(&name).join("cgroup.procs");
            if let Ok(p) = std::fs::read_to_string(&procs) {
                // A prepared shell (a fork of the spawner waiting for the next sandbox) is
                // not a leftover.
                left.extend(p.lines().filter(|pid| !is_shell(pid)).map(|pid| {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let brief: Vec<&str> = status
                        .lines()
                        .filter(|l| ["Name:", "State:", "PPid:", "NSpid:"].iter().any(|k| l.starts_with(k)))
                        .collect();
                    format!("process {pid} ({}) in {}", brief.join(", "), procs.display())
                }));
            }
        }
        let dir = self.slots.join(&name);
        // overlayfs keeps its own (empty) data/work/work between mounts.
        for sub in ["data/upper", "data/work", "data/work/work"] {
            if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
                left.extend(
                    rd.flatten()
                        .filter(|e| !(sub == "data/work" && e.file_name() == "work"))
                        .map(|e| e.path().display().to_string()),
                );
            }
        }
        if dir.join("agent.sock").exists() {
            left.push("agent.sock".into());
        }
        left
    }

    /// Waits until `cond` holds (polling), or panics with `what`.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        while !cond().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Whether a process is one of the spawner's prepared shells.
pub fn is_shell(pid: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("__spawner"))
}

/// Processes on the host whose command line mentions `needle`.
pub fn host_processes(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    out
}

impl Daemon {
    /// Without a daemon (a test failed after killing it): SIGKILL every process in this
    /// instance's cgroups (its sandboxes), retire the spawner, remove the cgroups.
    fn emergency_cleanup(&mut self) {
        for _ in 0..50 {
            let mut any = false;
            for h in ["pids", "memory", "unified"] {
                let parent = Path::new("/sys/fs/cgroup").join(h).join(&self.prefix);
                for cg in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                    let procs = std::fs::read_to_string(cg.path().join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                        any = true;
                        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        }
                    }
                }
            }
            if !any {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(pid) = self.spawner.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            self.reap_spawner();
        }
        // The firewall table of a daemon that never stopped gracefully.
        self.nft(&["delete", "table", "ip", &self.prefix.clone()]);
        for h in ["cpu", "memory", "pids", "unified", "cpuacct", "freezer"] {
            let parent = Path::new("/sys/fs/cgroup").join(h).join(&self.prefix);
            for cg in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(cg.path());
            }
            let _ = std::fs::remove_dir(&parent);
        }
        for m in self.mounts() {
            let path = m.trim_start_matches("mount ");
            let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_none() {
            self.emergency_cleanup();
            return;
        }
        let panicking = std::thread::panicking();
        // A fresh client: the test's own pools connections on the test's runtime, which is
        // blocked while this runs.
        let client = Client::new(&format!("unix:{}", self.socket.display())).unwrap();
        // Its own runtime on its own thread: Drop may run inside the test's runtime.
        let leftover = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    if let Ok(list) = client.list_sandboxes().await {
                        for sb in list {
                            let _ = client.delete_sandbox(&sb.id, true).await;
                        }
                    }
                })
            })
            .join()
            .ok()
        });
        let _ = leftover;
        self.stop();
        self.reap_spawner();
        if panicking {
            eprintln!("--- daemon log ---\n{}", self.log());
            return;
        }
        // Network namespaces (and with them the veth ends) go away asynchronously.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut objects = self.host_objects();
        while !objects.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            objects = self.host_objects();
        }
        assert!(objects.is_empty(), "left on the host after the daemon stopped: {objects:#?}\n{}", self.log());
        let procs = host_processes(&self.root.display().to_string());
        assert!(procs.is_empty(), "processes left behind: {procs:#?}");
        for h in ["memory", "cpu", "pids", "unified", "cpuacct", "freezer"] {
            let p = Path::new("/sys/fs/cgroup").join(h).join(&self.prefix);
            assert!(!p.exists(), "cgroup parent {} left behind", p.display());
        }
    }
}

/// Runs a command; panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command, what: &str) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `/var/cache/agentbox/<name>`, made once per machine by `install` (given the empty
/// directory's path), under an flock since tests run in parallel; a marker file says it is
/// complete, so an interrupted install is redone.
pub fn cached_install(name: &str, install: impl FnOnce(&Path)) -> PathBuf {
    let cache = Path::new("/var/cache/agentbox");
    std::fs::create_dir_all(cache).unwrap();
    let dir = cache.join(name);
    let done = dir.join(".installed");
    if done.exists() {
        return dir;
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join(format!("{name}.lock")))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        install(&dir);
        std::fs::write(&done, name).unwrap();
    }
    dir
}

/// A Python virtualenv with `package` (a pip requirement) from PyPI, made once per machine.
pub fn python_venv(name: &str, package: &str) -> PathBuf {
    let venv = cached_install(name, |dir| {
        run_ok(
            Command::new("python3").args(["-m", "venv"]).arg(dir),
            "python3 -m venv (Debian: apt-get install python3-venv)",
        );
        run_ok(
            Command::new(dir.join("bin/pip")).args(["install", "-q", "--disable-pip-version-check", package]),
            &format!("pip install {package}"),
        );
    });
    venv.join("bin/python")
}

impl Daemon {
    /// A daemon with a TCP listener on a free loopback port besides its socket, and an API
    /// key: (daemon, `http://127.0.0.1:PORT`, key).
    pub async fn start_tcp() -> (Daemon, String, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = Daemon::start_with(&["+--listen", &format!("tcp:127.0.0.1:{port}")]).await;
        let o = d.cli(&["key", "create"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let key = String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string();
        (d, format!("http://127.0.0.1:{port}"), key)
    }
}
