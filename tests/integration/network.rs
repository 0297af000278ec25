//! Egress policies, the DNS proxy, the audit, `net test` and ingress, against a fake
//! internet of the test's own (see `fakenet`): the daemon runs in a network namespace
//! whose only way out is that internet. The tests run on a multi-threaded runtime: the
//! fake DNS server lives on it and must answer while a test blocks on a CLI process.

use std::net::SocketAddr;

use abx_client::{CreateSandbox, IngressAccess, NetMode, NetworkPolicy};
use serde_json::Value;

use crate::fakenet::{self, CDN, CDN_LONG_TTL, DNS, FakeNet, PRIVATE, WEB_A, WEB_B, WEB_C};
use crate::harness::{Daemon, random_hex};

/// A daemon in a fake internet. Fields drop in order: the daemon first (its sandboxes
/// removed, checked for leftovers), then the internet.
struct World {
    d: Daemon,
    net: FakeNet,
}

/// The daemon options of a world whose fake internet resolves at `dns`, then `extra`.
fn daemon_args<'a>(dns: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args =
        vec!["--uplink", "up0", "--dns-upstream", dns, "--ingress", "tcp:127.0.0.1:0", "--domain", "sandbox.test"];
    args.extend_from_slice(extra);
    args
}

impl World {
    async fn new() -> World {
        Self::with(&[]).await
    }

    /// With extra daemon options.
    async fn with(extra: &[&str]) -> World {
        let prefix = format!("abxt{}", random_hex(6));
        let net = FakeNet::new(&prefix).await;
        let dns = net.dns_upstream();
        let d = Daemon::start_in(Some(&net.daemon_ns.clone()), &daemon_args(&dns, extra)).await;
        d.template("mini").await;
        World { d, net }
    }

    /// Starts the daemon again (after `kill9`) with the world's options and `extra`.
    async fn respawn(&mut self, extra: &[&str]) {
        let dns = self.net.dns_upstream();
        self.d.spawn(&daemon_args(&dns, extra)).await;
        self.d.adopt_spawner().await;
    }

    async fn sandbox(&self, mode: NetMode, allow: &[&str]) -> String {
        let req = CreateSandbox {
            template: Some("mini".into()),
            network: Some(NetworkPolicy { mode, allow: allow.iter().map(|s| s.to_string()).collect() }),
            ..Default::default()
        };
        let id = self.d.client.create_sandbox(&req).await.unwrap().id;
        self.d.install_probe(&id).await;
        id
    }

    /// `abx-probe ARGS` in sandbox `id`: its JSON.
    async fn probe(&self, id: &str, args: &[&str]) -> Value {
        let mut cmd = vec!["abx-probe".to_string()];
        cmd.extend(args.iter().map(|s| s.to_string()));
        let (out, err, _) = self.d.exec(id, abx_client::ExecRequest { cmd, ..Default::default() }).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("abx-probe {args:?}: {e}: {out} {err}"))
    }

    async fn reaches(&self, id: &str, target: &str) -> bool {
        let v = self.probe(id, &["connect", target]).await;
        v["ok"] == true
    }

    /// Asserts a connection is refused by the firewall (EHOSTUNREACH), not by the peer or
    /// DNS.
    /// Asserts the firewall refuses a TCP connection: refused at once (a reset) and a deny
    /// for it in the sandbox's audit.
    async fn refused(&self, id: &str, target: &str) {
        let v = self.probe(id, &["connect", target]).await;
        assert_eq!(v["errno"], "ECONNREFUSED", "{target} from {id}: {v}\n{}", self.ruleset());
        let (host, port) = target.rsplit_once(':').unwrap();
        let port: u16 = port.parse().unwrap();
        for _ in 0..50 {
            let log = self.d.client.network_log(id).await.unwrap();
            let hit = log.events.iter().any(|e| {
                e.kind == "connection"
                    && e.verdict == "deny"
                    && e.port == Some(port)
                    && (e.destination.as_deref() == Some(host) || !host.starts_with(|c: char| c.is_ascii_digit()))
            });
            if hit {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("no deny of {target} in the audit of {id}");
    }

    /// The daemon namespace's nftables ruleset (for failure messages).
    fn ruleset(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.net.daemon_ns, "nft", "list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Asserts a name does not resolve in sandbox `id`.
    async fn unresolved(&self, id: &str, name: &str) {
        let v = self.probe(id, &["connect", &format!("{name}:80")]).await;
        assert_eq!(v["ok"], false, "{name} resolved in {id}: {v}");
        assert!(v.get("errno").is_none_or(|e| e != "EHOSTUNREACH"), "{name}: the name resolved: {v}");
    }
}

/// Starts busybox httpd on port 8000 in sandbox `id`, serving `text`.
async fn serve(w: &World, id: &str, text: &str) {
    let (_, err, code) = w.d.sh(id, &format!("mkdir -p /tmp/www && echo {text} > /tmp/www/index.html")).await;
    assert_eq!(code, 0, "{err}");
    let cmd = ["httpd", "-f", "-p", "8000", "-h", "/tmp/www"].map(String::from).to_vec();
    w.d.client.exec_background(id, &abx_client::ExecRequest { cmd, ..Default::default() }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_none_blocks_everything() {
    let w = World::new().await;
    let id = w.sandbox(NetMode::None, &[]).await;
    w.refused(&id, &format!("{WEB_A}:80")).await;
    w.refused(&id, &format!("{DNS}:53")).await;
    let v = w.probe(&id, &["udp", &format!("{DNS}:53")]).await;
    assert_eq!(v["errno"], "EHOSTUNREACH", "{v}");
    w.unresolved(&id, "allowed.test").await;
    let sb = w.d.client.get_sandbox(&id).await.unwrap();
    assert_eq!(sb.network.mode, NetMode::None);
    assert!(sb.address.unwrap().starts_with("10.240."));
    // The audit saw the refused name and the refused connections.
    let log = w.d.client.network_log(&id).await.unwrap();
    assert!(
        log.events.iter().any(|e| e.kind == "dns" && e.verdict == "deny" && e.name.as_deref() == Some("allowed.test")),
        "{log:?}"
    );
    assert!(
        log.events.iter().any(|e| e.kind == "connection"
            && e.verdict == "deny"
            && e.destination.as_deref() == Some(&WEB_A.to_string())
            && e.port == Some(80)),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_holds_against_literals_other_resolvers_quic_and_root() {
    let w = World::new().await;
    let id = w.sandbox(NetMode::Allow, &["allowed.test", "*.pkg.test", "private.test", "198.51.100.10:4443/udp"]).await;
    // Allowed names work, over DNS through the proxy.
    assert!(w.reaches(&id, "allowed.test:80").await);
    let (out, err, code) = w.d.sh(&id, "wget -q -O- http://allowed.test/").await;
    assert_eq!((out.as_str(), code), ("web-a", 0), "{err}");
    assert!(w.reaches(&id, "files.pkg.test:80").await, "wildcard rule");
    // Other names are refused by the resolver; their addresses are unreachable by literal.
    w.unresolved(&id, "other.test").await;
    w.unresolved(&id, "pkg.test").await;
    w.refused(&id, &format!("{WEB_B}:80")).await;
    // An allowed name with a private address stays blocked.
    w.refused(&id, "private.test:80").await;
    w.refused(&id, &format!("{PRIVATE}:80")).await;
    // A DNS query straight to another resolver is refused.
    let v = w.probe(&id, &["udp", &format!("{DNS}:53")]).await;
    assert_eq!(v["errno"], "EHOSTUNREACH", "raw DNS: {v}");
    // UDP 443 (QUIC) is refused even to an allowed host, while an allowed UDP port works.
    let v = w.probe(&id, &["udp", &format!("{WEB_A}:443"), "quic"]).await;
    assert_eq!(v["errno"], "EHOSTUNREACH", "QUIC: {v}");
    let v = w.probe(&id, &["udp", &format!("{WEB_A}:4443"), "hello"]).await;
    assert_eq!(v["reply"], "hello", "allowed UDP: {v}");
    // Metadata, the host (gateway) and the daemon's ingress are never reachable.
    w.refused(&id, "169.254.169.254:80").await;
    let gw = w.d.client.system().await.unwrap();
    let _ = gw;
    let addr: std::net::Ipv4Addr = w.d.client.get_sandbox(&id).await.unwrap().address.unwrap().parse().unwrap();
    let gateway = std::net::Ipv4Addr::from(u32::from(addr) & !0x7f | 1);
    w.refused(&id, &format!("{gateway}:22")).await;
    w.refused(&id, "203.0.113.2:22").await;
    // Root inside cannot change the namespace: no address, route or nftables change.
    let v = w.probe(&id, &["net-admin"]).await;
    assert_eq!(v["ok"], false, "{v}");
    for k in ["address", "route", "nft"] {
        assert_eq!(v[k], "EPERM", "{k}: {v}");
    }
    w.refused(&id, &format!("{WEB_B}:80")).await;
    // The audit has the allowed answer and both verdicts (the firewall's log messages reach
    // it a moment after the connections).
    w.d.wait_for("the refusal in the audit", std::time::Duration::from_secs(5), || async {
        let events = w.d.client.network_log(&id).await.unwrap().events;
        events.iter().any(|e| e.verdict == "deny" && e.destination == Some(WEB_B.to_string()))
    })
    .await;
    let log = w.d.client.network_log(&id).await.unwrap();
    let has = |f: &dyn Fn(&abx_client::NetEvent) -> bool| log.events.iter().any(f);
    assert!(has(&|e| e.kind == "dns" && e.verdict == "allow" && e.addresses == vec![WEB_A.to_string()]), "{log:?}");
    assert!(has(&|e| e.kind == "dns" && e.verdict == "deny" && e.name.as_deref() == Some("other.test")), "{log:?}");
    assert!(has(&|e| e.kind == "connection" && e.verdict == "allow" && e.destination == Some(WEB_A.to_string())));
    assert!(has(&|e| e.kind == "connection" && e.verdict == "deny" && e.destination == Some(WEB_B.to_string())));
    // And the CLI shows it.
    let out = w.d.cli(&["net", "log", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("allowed.test -> 198.51.100.10") && text.contains(&format!("deny  tcp {WEB_B}:80")),
        "{text}"
    );
    // Metrics count decisions.
    let metrics = std::process::Command::new("curl")
        .args(["-s", "--unix-socket", &w.d.socket.display().to_string(), "http://localhost/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.contains("agentbox_connections_total{verdict=\"deny\"}"), "{metrics}");
    assert!(!metrics.contains("agentbox_connections_total{verdict=\"deny\"} 0\n"), "{metrics}");
    // The policy test agrees.
    let report = w.d.client.network_test(&id).await.unwrap();
    assert!(report.passed, "{:?}", report.checks.iter().filter(|c| !c.ok).collect::<Vec<_>>());
    assert!(report.checks.iter().any(|c| c.target.starts_with("tcp 169.254.169.254") && c.observed == "blocked"));
    assert!(report.checks.iter().any(|c| c.target == "dns allowed.test" && c.observed == "reachable"));
    let _ = WEB_C;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_policy_changes_and_sandboxes_are_apart() {
    let w = World::new().await;
    let a = w.sandbox(NetMode::None, &[]).await;
    let b = w.sandbox(NetMode::Public, &[]).await;
    w.refused(&a, &format!("{WEB_B}:80")).await;
    // Public: the internet, but not private ranges nor the other sandbox.
    assert!(w.reaches(&b, "other.test:80").await);
    assert!(w.reaches(&b, &format!("{WEB_B}:80")).await);
    w.refused(&b, &format!("{PRIVATE}:80")).await;
    // Runtime change through the CLI: none -> public with an explicit private rule.
    let out = w.d.cli(&["net", "set", &a, "--net", "public", "--allow", "10.77.0.0/16:80"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(w.reaches(&a, &format!("{WEB_B}:80")).await);
    assert!(w.reaches(&a, &format!("{PRIVATE}:80")).await, "explicit private rule");
    // `net set` without a policy is refused rather than taken as `none`.
    let out = w.d.cli(&["net", "set", &a]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--net none"));
    assert_eq!(w.d.client.get_sandbox(&a).await.unwrap().network.mode, NetMode::Public);
    // Two sandboxes cannot reach each other, even with public egress.
    serve(&w, &b, "sandbox-b").await;
    let b_addr = w.d.client.get_sandbox(&b).await.unwrap().address.unwrap();
    w.refused(&a, &format!("{b_addr}:8000")).await;
    // Back to none: blocked again at once.
    let sb = w.d.client.set_network(&a, &NetworkPolicy::default()).await.unwrap();
    assert_eq!(sb.network.mode, NetMode::None);
    w.refused(&a, &format!("{WEB_B}:80")).await;
    // Bad rules are refused with the rule named, and change nothing.
    let err =
        w.d.client
            .set_network(&a, &NetworkPolicy { mode: NetMode::Allow, allow: vec!["10.0.0.1/8".into()] })
            .await
            .unwrap_err();
    assert!(err.to_string().contains("10.0.0.1/8"), "{err}");
    assert_eq!(w.d.client.get_sandbox(&a).await.unwrap().network.mode, NetMode::None);
    // Rules are recorded in their canonical text, each once.
    let given = ["Allowed.TEST.", " allowed.test", "198.51.100.10/32:80/tcp", "*.PKG.test"].map(String::from);
    let sb = w.d.client.set_network(&a, &NetworkPolicy { mode: NetMode::Allow, allow: given.to_vec() }).await.unwrap();
    assert_eq!(sb.network.allow, ["allowed.test", "198.51.100.10:80/tcp", "*.pkg.test"]);
    // A stopped sandbox's policy can be changed; it holds when the sandbox starts again.
    // Its audit stays readable while it is stopped, and goes on after the start.
    let before = w.d.client.network_log(&a).await.unwrap().events;
    assert!(before.iter().any(|e| e.verdict == "deny" && e.destination == Some(WEB_B.to_string())), "{before:?}");
    w.d.client.stop(&a).await.unwrap();
    assert_eq!(w.d.client.network_log(&a).await.unwrap().events, before, "the audit of a stopped sandbox");
    let out = w.d.cli(&["net", "set", &a, "--net", "public"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.d.client.start(&a).await.unwrap();
    assert_eq!(w.d.client.get_sandbox(&a).await.unwrap().network.mode, NetMode::Public);
    assert!(w.reaches(&a, &format!("{WEB_B}:80")).await, "the policy set while stopped");
    // The firewall's log message reaches the audit a moment after the connection.
    w.d.wait_for("the allowed connection in the audit", std::time::Duration::from_secs(5), || async {
        w.d.client.network_log(&a).await.unwrap().events.len() > before.len()
    })
    .await;
    let after = w.d.client.network_log(&a).await.unwrap().events;
    assert_eq!(after[..before.len()], before[..], "the audit goes on after the start");
    assert!(after.last().unwrap().verdict == "allow", "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_routes_by_host_name_and_headers() {
    let w = World::new().await;
    let mut ids = Vec::new();
    for name in ["one", "two"] {
        let id = w.sandbox(NetMode::None, &[]).await;
        serve(&w, &id, name).await;
        ids.push(id);
    }
    // Both listen on port 8000; each is reached by its own URL.
    let url = w.d.client.port_url(&ids[0], 8000).await.unwrap();
    assert_eq!(url.host, format!("8000-{}.sandbox.test", ids[0]));
    let ingress: SocketAddr = url.ingress.parse().unwrap();
    let mut got = String::new();
    for _ in 0..50 {
        got = fakenet::http_get(&w.net.daemon_ns, ingress, &url.host, &[]);
        if got.contains("one") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(got.starts_with("HTTP/1.1 200") && got.contains("one\n"), "{got}");
    // The second server may not listen yet either.
    for _ in 0..50 {
        got = fakenet::http_get(
            &w.net.daemon_ns,
            ingress,
            "anything",
            &[("E2b-Sandbox-Id", &ids[1]), ("E2b-Sandbox-Port", "8000")],
        );
        if got.contains("two") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(got.contains("two\n"), "{got}");
    // A request through the ingress resumes a paused sandbox.
    w.d.client.pause(&ids[1]).await.unwrap();
    let got = fakenet::http_get(
        &w.net.daemon_ns,
        ingress,
        "anything",
        &[("E2b-Sandbox-Id", &ids[1]), ("E2b-Sandbox-Port", "8000")],
    );
    assert!(got.contains("two\n"), "{got}");
    assert_eq!(w.d.client.get_sandbox(&ids[1]).await.unwrap().state, abx_client::SandboxState::Running);
    let got = fakenet::http_get(&w.net.daemon_ns, ingress, &format!("8001-{}.sandbox.test", ids[1]), &[]);
    assert!(got.starts_with("HTTP/1.1 502") && got.contains("nothing listens on port 8001"), "{got}");
    let got = fakenet::http_get(&w.net.daemon_ns, ingress, "8000-nosuchsandbox.sandbox.test", &[]);
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    // A name with capitals is reached by the lower-case host name a browser sends.
    let req = CreateSandbox { template: Some("mini".into()), name: Some("TwoBox".into()), ..Default::default() };
    w.d.client.create_sandbox(&req).await.unwrap();
    serve(&w, "TwoBox", "three").await;
    let mut got = String::new();
    for _ in 0..50 {
        got = fakenet::http_get(&w.net.daemon_ns, ingress, "8000-twobox.sandbox.test", &[]);
        if got.contains("three") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(got.starts_with("HTTP/1.1 200") && got.contains("three\n"), "{got}");
    let out = w.d.cli(&["port", &ids[1], "8000"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("http://8000-{}.sandbox.test:{}", ids[1], ingress.port())
    );
}

/// Guards ingress access tokens: before them, anyone who reached the ingress proxy reached
/// every sandbox's ports, whoever owned the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_that_need_a_token_are_reached_only_with_it() {
    let w = World::with(&["--ingress-access", "token"]).await;
    // The daemon's default: a token of its own for each sandbox.
    let a = w.sandbox(NetMode::None, &[]).await;
    serve(&w, &a, "private").await;
    let sb = w.d.client.get_sandbox(&a).await.unwrap();
    assert_eq!(sb.ingress, IngressAccess::Token);
    let token = sb.ingress_token.expect("a token-protected sandbox shows its token");
    assert!(token.len() == 40 && token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    let url = w.d.client.port_url(&a, 8000).await.unwrap();
    assert_eq!(url.token.as_deref(), Some(token.as_str()));
    let ingress: SocketAddr = url.ingress.parse().unwrap();
    let get = |host: &str, headers: &[(&str, &str)]| fakenet::http_get(&w.net.daemon_ns, ingress, host, headers);
    let mut got = String::new();
    for _ in 0..50 {
        got = get(&url.host, &[("E2b-Traffic-Access-Token", &token)]);
        if got.contains("private") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(got.starts_with("HTTP/1.1 200") && got.contains("private\n"), "{got}");
    let wrong = "0".repeat(40);
    for headers in [vec![], vec![("E2b-Traffic-Access-Token", wrong.as_str())]] {
        let got = get(&url.host, &headers);
        assert!(got.starts_with("HTTP/1.1 401") && got.contains("E2b-Traffic-Access-Token"), "{got}");
        let by_headers = [headers.as_slice(), &[("E2b-Sandbox-Id", a.as_str()), ("E2b-Sandbox-Port", "8000")]].concat();
        assert!(get("anything", &by_headers).starts_with("HTTP/1.1 401"));
    }
    // A request without the token does not wake a paused sandbox; one with it does.
    w.d.client.pause(&a).await.unwrap();
    assert!(get(&url.host, &[]).starts_with("HTTP/1.1 401"));
    assert_eq!(w.d.client.get_sandbox(&a).await.unwrap().state, abx_client::SandboxState::Paused);
    let got = get(&url.host, &[("E2b-Traffic-Access-Token", &token)]);
    assert!(got.contains("private\n"), "{got}");
    assert_eq!(w.d.client.get_sandbox(&a).await.unwrap().state, abx_client::SandboxState::Running);
    // A browser's cookie (set by a first URL with ?agentbox_token=) does as the header.
    let got = get(&url.host, &[("Cookie", &format!("agentbox_token={token}"))]);
    assert!(got.starts_with("HTTP/1.1 200") && got.contains("private\n"), "{got}");
    assert!(get(&url.host, &[("Cookie", &format!("agentbox_token={wrong}"))]).starts_with("HTTP/1.1 401"));
    // `agentbox port` prints the URL alone on stdout, and the header and the browser URL
    // on stderr.
    let out = w.d.cli(&["port", &a, "8000"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), url.url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("E2b-Traffic-Access-Token: {token}")), "{stderr}");
    assert!(stderr.contains(&format!("{}?agentbox_token={token}", url.url)), "{stderr}");
    // A sandbox may choose public ports.
    let out = w.d.cli(&["create", "-T", "mini", "--ingress", "public"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let sb = w.d.client.get_sandbox(&b).await.unwrap();
    assert_eq!((sb.ingress, sb.ingress_token), (IngressAccess::Public, None));
    serve(&w, &b, "public").await;
    let host_b = format!("8000-{b}.sandbox.test");
    let mut got = String::new();
    for _ in 0..50 {
        got = get(&host_b, &[]);
        if got.contains("public") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(got.starts_with("HTTP/1.1 200") && got.contains("public\n"), "{got}");
    // Changed at runtime: locked with a token, the token rotated, opened again.
    let out = w.d.cli(&["net", "ingress", &b, "token"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let first = text.strip_prefix("ingress token\ntoken ").map(|t| t.trim().to_string()).expect(&text);
    assert!(get(&host_b, &[]).starts_with("HTTP/1.1 401"), "locked at once");
    assert!(get(&host_b, &[("E2b-Traffic-Access-Token", &first)]).contains("public\n"));
    let again =
        w.d.client.set_ingress(&b, &abx_client::SetIngress { access: IngressAccess::Token, rotate: false }).await;
    assert_eq!(again.unwrap().ingress_token.as_deref(), Some(first.as_str()), "kept unless rotated");
    let rotated =
        w.d.client.set_ingress(&b, &abx_client::SetIngress { access: IngressAccess::Token, rotate: true }).await;
    let second = rotated.unwrap().ingress_token.unwrap();
    assert_ne!(second, first);
    assert!(get(&host_b, &[("E2b-Traffic-Access-Token", &first)]).starts_with("HTTP/1.1 401"), "the old token");
    assert!(get(&host_b, &[("Cookie", &format!("agentbox_token={first}"))]).starts_with("HTTP/1.1 401"));
    assert!(get(&host_b, &[("E2b-Traffic-Access-Token", &second)]).contains("public\n"));
    let out = w.d.cli(&["net", "ingress", &b, "public"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ingress public\n");
    assert!(get(&host_b, &[]).contains("public\n"), "open again");
    let sb = w.d.client.get_sandbox(&b).await.unwrap();
    assert_eq!((sb.ingress, sb.ingress_token), (IngressAccess::Public, None));
    // Each client connection is in the sandbox's audit, allowed or denied.
    let log = w.d.client.network_log(&b).await.unwrap();
    let ingress = |verdict: &str| {
        log.events.iter().filter(|e| e.kind == "ingress" && e.verdict == verdict && e.port == Some(8000)).count()
    };
    assert!(ingress("deny") >= 3 && ingress("allow") >= 3, "{log:?}");
    assert!(log.events.iter().filter(|e| e.kind == "ingress").all(|e| e.source.is_some()), "{log:?}");
    let out = w.d.cli(&["net", "log", &b, "--denied"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("deny  ingress http :8000 from "));
    let out = w.d.cli(&["net", "ingress", &b, "public", "--rotate"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("goes with `token`"));
    let out = w.d.cli(&["create", "-T", "mini", "--ingress", "open"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("use public or token"));
    // Forks keep the source's choice, each with a token of its own.
    let forks = w.d.client.fork_sandbox(&a, &abx_client::ForkRequest::default()).await.unwrap();
    let fork = w.d.client.get_sandbox(&forks.sandboxes[0].id).await.unwrap();
    assert_eq!(fork.ingress, IngressAccess::Token);
    assert!(fork.ingress_token.as_ref().is_some_and(|t| *t != token), "{:?}", fork.ingress_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_hold_while_the_daemon_is_away_and_after_it_returns() {
    let mut w = World::new().await;
    let id = w.sandbox(NetMode::Allow, &["allowed.test"]).await;
    assert!(w.reaches(&id, "allowed.test:80").await);
    // The audit is written out within 200 ms of each event.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let audit = w.d.client.network_log(&id).await.unwrap().events;
    assert!(audit.iter().any(|e| e.kind == "dns" && e.name.as_deref() == Some("allowed.test")), "{audit:?}");
    // A removed sandbox's kept audit outlives the daemon too.
    let gone = w.sandbox(NetMode::None, &[]).await;
    w.d.sh(&gone, "nslookup -type=a other.test").await;
    w.d.client.delete_sandbox(&gone, true).await.unwrap();
    w.d.wait_for("the removed sandbox's audit kept", std::time::Duration::from_secs(10), || async {
        !w.d.client.kept_audits().await.unwrap().is_empty()
    })
    .await;
    let gone_log = w.d.client.network_log(&gone).await.unwrap();
    w.d.kill9();
    // The table stays: the policy holds without the daemon.
    let id2 = id.clone();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &w.net.daemon_ns, "nft", "list", "table", "ip", &w.d.prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "the table must survive the daemon");
    w.respawn(&[]).await;
    assert_eq!(w.d.client.get_sandbox(&id2).await.unwrap().network.allow, vec!["allowed.test".to_string()]);
    assert!(w.reaches(&id, "allowed.test:80").await, "allowed again after the restart");
    let after = w.d.client.network_log(&id).await.unwrap().events;
    assert_eq!(after[..audit.len()], audit[..], "the audit from before the daemon was killed");
    let kept = w.d.client.network_log(&gone).await.unwrap();
    assert!(kept.removed_at.is_some() && !kept.events.is_empty(), "{kept:?}");
    assert_eq!(kept.events, gone_log.events);
    w.refused(&id, &format!("{WEB_B}:80")).await;
    w.unresolved(&id, "other.test").await;

    // Past `--audit-max-size` the kept audits go, oldest first, before their retention
    // ends (at start, then every minute); a live sandbox's audit is not theirs to cap.
    w.d.kill9();
    w.respawn(&["--audit-max-size", "1"]).await;
    w.d.wait_for("the kept audit removed past --audit-max-size", std::time::Duration::from_secs(10), || async {
        w.d.client.kept_audits().await.unwrap().is_empty()
    })
    .await;
    assert_eq!(w.d.client.network_log(&gone).await.unwrap_err().code(), Some("not_found"));
    assert_eq!(w.d.client.network_log(&id).await.unwrap().events[..audit.len()], audit[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_in_use_is_refused() {
    let a = Daemon::start().await;
    let _id = a.mini(abx_client::Limits::default()).await;
    let mut b = Daemon::start().await;
    b.stop();
    let err = b.try_spawn(&["--subnet", &a.subnet]).await.unwrap_err();
    assert!(err.contains("already routed"), "{err}");
    // The refused start leaves no data image mounted (`--data auto` mounts one when the
    // state root is not btrfs).
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounted = |d: &Daemon| {
        let image = d.root.join(format!("{}-data", d.prefix));
        mounts.lines().any(|l| l.split(' ').nth(4) == Some(image.to_str().unwrap()))
    };
    assert!(mounted(&a), "the running daemon's data image is mounted:\n{mounts}");
    assert!(!mounted(&b), "the refused daemon's data image is still mounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_test_from_the_cli_proves_the_policy() {
    let w = World::new().await;
    let out =
        w.d.cli(&["create", "-T", "mini", "--allow", "allowed.test", "--allow", "198.51.100.30:80", "--net-test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = w.d.cli(&["net", "test", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in
        ["dns allowed.test", "tcp 198.51.100.30:80", "tcp 169.254.169.254:80", "udp 198.51.100.53:53", "policy holds"]
    {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    let out = w.d.cli(&["net", "show", &id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("network allow --allow allowed.test"));
    // A bad rule at create is refused with the rule named, and nothing is left.
    let before = w.d.client.list_sandboxes().await.unwrap().len();
    let out = w.d.cli(&["create", "-T", "mini", "--allow", "github.com:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("github.com:0"));
    assert_eq!(w.d.client.list_sandboxes().await.unwrap().len(), before);
    // A policy that does not hold (an allowed address where nothing answers) fails the
    // create, and the sandbox is not left behind, as with `run --net-test`.
    let out = w.d.cli(&["create", "-T", "mini", "--allow", "198.51.100.99:80", "--net-test"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(out.stdout.is_empty(), "no id is printed for a sandbox that is gone");
    assert!(err.contains("198.51.100.99:80") && err.contains("destroyed"), "{err}");
    assert_eq!(w.d.client.list_sandboxes().await.unwrap().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_rules_can_be_limited_to_ports() {
    let w = World::new().await;
    let id = w.sandbox(NetMode::Allow, &["allowed.test:80/tcp"]).await;
    assert!(w.reaches(&id, "allowed.test:80").await);
    // The same address on another port or protocol stays closed.
    w.refused(&id, &format!("{WEB_A}:81")).await;
    let v = w.probe(&id, &["udp", &format!("{WEB_A}:4443"), "x"]).await;
    assert_eq!(v["ok"], false, "UDP is not allowed by a /tcp rule: {v}");
    let report = w.d.client.network_test(&id).await.unwrap();
    assert!(report.passed, "{:?}", report.checks.iter().filter(|c| !c.ok).collect::<Vec<_>>());
    assert!(report.checks.iter().any(|c| c.target.starts_with("tcp allowed.test:80 ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_sandbox_of_a_slot_inherits_no_dns_answers() {
    // One slot: the second sandbox gets the first one's slot, with the same policy.
    let w = World::with(&["--uid-slots", "1"]).await;
    let policy = ["allowed.test:80/tcp", "other.test"];
    let a = w.sandbox(NetMode::Allow, &policy).await;
    assert!(w.reaches(&a, "allowed.test:80").await);
    assert!(w.reaches(&a, "other.test:80").await);
    w.d.client.delete_sandbox(&a, true).await.unwrap();
    w.d.wait_for("the slot to be free", std::time::Duration::from_secs(10), || async {
        w.d.client.system().await.unwrap().sandboxes == 0
    })
    .await;
    let b = w.sandbox(NetMode::Allow, &policy).await;
    // Neither the every-port nor the port-limited answers of the first sandbox remain: by
    // literal address, both hosts are refused until this sandbox looks them up itself.
    w.refused(&b, &format!("{WEB_A}:80")).await;
    w.refused(&b, &format!("{WEB_B}:80")).await;
    assert!(w.reaches(&b, "allowed.test:80").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolv_conf_is_the_proxy_and_writes_to_it_stay_out_of_the_sandbox_layers() {
    // One slot: the second sandbox gets the first one's directory.
    let w = World::with(&["--uid-slots", "1"]).await;
    let mini = CreateSandbox { template: Some("mini".into()), ..Default::default() };
    let root = |script: &str| abx_client::ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: Some("root".into()),
        ..Default::default()
    };
    let a = w.d.client.create_sandbox(&mini).await.unwrap();
    let (original, err, code) = w.d.exec(&a.id, root("cat /etc/resolv.conf")).await;
    assert_eq!(code, 0, "{err}");
    assert!(original.starts_with("nameserver "), "{original}");
    // Root may change it, as on any Linux system ...
    let (_, err, code) = w.d.exec(&a.id, root("echo 'nameserver 203.0.113.99' > /etc/resolv.conf && chmod 600 /etc/resolv.conf && cat /etc/resolv.conf")).await;
    assert_eq!(code, 0, "{err}");
    // ... but it is the slot's own file bound over the template's, not a copy in the
    // sandbox's upper layer (so in no snapshot, fork, diff or template layer).
    let upper = w.d.slots.join(format!("{}-u{}", w.d.prefix, w.d.slot_of(&a))).join("data/upper");
    assert!(!upper.join("etc/resolv.conf").exists(), "written to the upper layer");
    let (mounts, _, _) = w.d.sh(&a.id, "grep -c ' /etc/resolv.conf ' /proc/self/mountinfo").await;
    assert_eq!(mounts.trim(), "1");
    w.d.client.delete_sandbox(&a.id, true).await.unwrap();
    w.d.wait_for("the slot to be free", std::time::Duration::from_secs(10), || async {
        w.d.client.system().await.unwrap().sandboxes == 0
    })
    .await;
    // The next sandbox of the slot gets the proxy again, with the usual mode.
    let b = w.d.client.create_sandbox(&mini).await.unwrap();
    assert_eq!(w.d.slot_of(&b), w.d.slot_of(&a));
    let (now, err, code) = w.d.exec(&b.id, root("cat /etc/resolv.conf; stat -c %a /etc/resolv.conf")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(now, format!("{original}644\n"));
}

/// A process of the sandbox in slot `slot` (host pid), found through the slot's cgroups:
/// one in a network namespace other than the daemon's and the test's.
fn sandbox_pid(w: &World, slot: u32) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let ns_of = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let outside = [ns_of(&format!("/run/netns/{}", w.net.daemon_ns)), ns_of("/proc/self/ns/net")];
    let name = format!("{}-u{slot}", w.d.prefix);
    for h in ["unified", "pids", "memory", ""] {
        let procs = std::path::Path::new("/sys/fs/cgroup").join(h).join(&w.d.prefix).join(&name).join("cgroup.procs");
        let Ok(text) = std::fs::read_to_string(&procs) else { continue };
        for pid in text.lines() {
            let ns = ns_of(&format!("/proc/{pid}/ns/net"));
            if ns.is_some() && !outside.contains(&ns) {
                return pid.parse().unwrap();
            }
        }
    }
    panic!("no process of slot {slot} in a network namespace of its own");
}

/// Makes every socket of the sandbox in `slot` that binds port 0 get `port` (the slot's
/// network namespace has a one-port ephemeral range), so that two sandboxes send from the
/// same source port.
fn pin_source_port(w: &World, slot: u32, port: u16) {
    let pid = sandbox_pid(w, slot);
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["sysctl", "-w"])
        .arg(format!("net.ipv4.ip_local_port_range={port} {port}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "sysctl: {}", String::from_utf8_lossy(&out.stderr));
}

/// Guards against a sandbox inheriting the flows of the previous sandbox of its slot: it
/// has the same address and interface, and the firewall passes established flows before
/// any policy check, so UDP from the same source port to the same destination used to
/// continue the old flow (with nothing in the audit). Also guards that `net set` to `none`
/// ends the sandbox's open flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_does_not_inherit_the_flows_of_its_slot() {
    // One slot: the second sandbox gets the first one's slot, address and interface.
    let w = World::with(&["--uid-slots", "1"]).await;
    let echo = format!("{WEB_A}:4443");
    let rule = [format!("{echo}/udp")];
    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
    let x = w.sandbox(NetMode::Allow, &rule).await;
    let sx = w.d.client.get_sandbox(&x).await.unwrap();
    pin_source_port(&w, w.d.slot_of(&sx), 40001);
    let v = w.probe(&x, &["udp", &echo, "one"]).await;
    assert_eq!(v["reply"], "one", "allowed UDP: {v}");
    w.d.client.delete_sandbox(&x, true).await.unwrap();
    w.d.wait_for("the slot to be free", std::time::Duration::from_secs(10), || async {
        w.d.client.system().await.unwrap().sandboxes == 0
    })
    .await;
    let y = w.sandbox(NetMode::None, &[]).await;
    let sy = w.d.client.get_sandbox(&y).await.unwrap();
    assert_eq!((w.d.slot_of(&sy), &sy.address), (w.d.slot_of(&sx), &sx.address), "the same slot");
    pin_source_port(&w, w.d.slot_of(&sy), 40001);
    let v = w.probe(&y, &["udp", &echo, "two"]).await;
    assert_eq!(v["errno"], "EHOSTUNREACH", "policy none, yet the previous sandbox's flow passed: {v}\n{}", w.ruleset());
    // The audit is written out asynchronously (within ~200 ms of the event).
    let denied = |log: &abx_client::NetLog| {
        log.events.iter().any(|e| e.kind == "connection" && e.verdict == "deny" && e.port == Some(4443))
    };
    let mut log = w.d.client.network_log(&y).await.unwrap();
    for _ in 0..50 {
        if denied(&log) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        log = w.d.client.network_log(&y).await.unwrap();
    }
    assert!(denied(&log), "{log:?}");
    // Cut off at runtime: the open flow ends too, not only new ones.
    let policy = NetworkPolicy { mode: NetMode::Allow, allow: vec![rule[0].to_string()] };
    w.d.client.set_network(&y, &policy).await.unwrap();
    let v = w.probe(&y, &["udp", &echo, "three"]).await;
    assert_eq!(v["reply"], "three", "allowed UDP: {v}");
    w.d.client.set_network(&y, &NetworkPolicy::default()).await.unwrap();
    let v = w.probe(&y, &["udp", &echo, "four"]).await;
    assert_eq!(v["errno"], "EHOSTUNREACH", "the flow survived net set none: {v}\n{}", w.ruleset());
}

/// Seconds left before each element of set `set` in the daemon's table expires
/// (`nft -j list set`).
fn set_expiries(w: &World, set: &str) -> Vec<u64> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &w.net.daemon_ns, "nft", "-j", "list", "set", "ip", &w.d.prefix, set])
        .output()
        .unwrap();
    assert!(out.status.success(), "nft list set {set}: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    fn walk(v: &Value, out: &mut Vec<u64>) {
        match v {
            Value::Object(m) => {
                if let Some(e) = m.get("expires").and_then(Value::as_u64) {
                    out.push(e);
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(&v, &mut found);
    found
}

/// Guards that a DNS answer never shortens how long an address stays allowed: cdnlong.test
/// (TTL 90 s) and cdnshort.test (TTL 1 s, allowed for the minimum of 30 s) share an
/// address; resolving cdnshort after cdnlong used to restart the address's expiry at 30 s,
/// in the every-port set and in the port-limited one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_dns_answer_does_not_shorten_an_address() {
    let w = World::new().await;
    let any = w.sandbox(NetMode::Allow, &["cdnlong.test", "cdnshort.test"]).await;
    let ports = w.sandbox(NetMode::Allow, &["cdnlong.test:80/tcp", "cdnshort.test:80/tcp"]).await;
    for (id, set) in [(&any, "d"), (&ports, "p")] {
        assert!(w.reaches(id, "cdnlong.test:80").await);
        assert!(w.reaches(id, "cdnshort.test:80").await);
        let slot = w.d.slot_of(&w.d.client.get_sandbox(id).await.unwrap());
        let left = set_expiries(&w, &format!("{set}{slot}"));
        assert!(!left.is_empty(), "no element in {set}{slot}:\n{}", w.ruleset());
        assert!(
            left.iter().all(|s| *s > u64::from(CDN_LONG_TTL) - 20),
            "{CDN} expires in {left:?} s in {set}{slot}, not after cdnlong.test's TTL of {CDN_LONG_TTL} s"
        );
    }
}

/// Guards that port-limited domain rules whose names share an address all take effect:
/// the second answer's port range overlapped the first's, the kernel refused it, and the
/// error was ignored (cdnshort.test:5432 refused though `cdnshort.test:22-9000/tcp` allows
/// it; with `80-90` and `85-9000`, port 9000 refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_limited_rules_sharing_an_address_all_hold() {
    let w = World::new().await;
    let a = w.sandbox(NetMode::Allow, &["cdnlong.test:9000/tcp", "cdnshort.test:22-9000/tcp"]).await;
    assert!(w.reaches(&a, "cdnlong.test:9000").await);
    assert!(w.reaches(&a, "cdnshort.test:5432").await, "the second rule's ports\n{}", w.ruleset());
    assert!(w.reaches(&a, "cdnshort.test:9000").await);
    assert!(w.reaches(&a, &format!("{CDN}:80")).await);
    w.refused(&a, &format!("{CDN}:21")).await;
    let b = w.sandbox(NetMode::Allow, &["cdnlong.test:80-90/tcp", "cdnshort.test:85-9000/tcp"]).await;
    assert!(w.reaches(&b, "cdnlong.test:80").await);
    assert!(w.reaches(&b, "cdnshort.test:9000").await, "partly overlapping ranges\n{}", w.ruleset());
    assert!(w.reaches(&b, &format!("{CDN}:5432")).await);
    w.refused(&b, &format!("{CDN}:79")).await;
    // Nor does an answer of the first name take away the second's ports.
    assert!(w.reaches(&b, "cdnlong.test:80").await);
    assert!(w.reaches(&b, &format!("{CDN}:9000")).await);
}

/// Guards that an allowed DNS query that fails upstream (here the upstream refuses a zone
/// it does not serve, and the proxy answers SERVFAIL) is in the audit and the metrics: the
/// query left the host, so its name may have carried data out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dns_queries_are_audited() {
    let w = World::new().await;
    let id = w.sandbox(NetMode::Allow, &["secret-data.nowhere.example"]).await;
    // A queries only (an AAAA is answered by the proxy itself, empty).
    let (_, _, code) = w.d.sh(&id, "nslookup -type=a secret-data.nowhere.example").await;
    assert_ne!(code, 0, "the name does not resolve");
    let log = w.d.client.network_log(&id).await.unwrap();
    assert!(
        log.events.iter().any(|e| e.kind == "dns"
            && e.verdict == "allow"
            && e.qtype.as_deref() == Some("A")
            && e.name.as_deref() == Some("secret-data.nowhere.example")
            && e.addresses.is_empty()),
        "{log:?}"
    );
    let metrics = std::process::Command::new("curl")
        .args(["-s", "--unix-socket", &w.d.socket.display().to_string(), "http://localhost/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(!metrics.contains("agentbox_dns_queries_total{verdict=\"allow\"} 0\n"), "{metrics}");
}

/// Guards that the policy test expects a name answered with an address no rule can open
/// (meta.test is 169.254.169.254, the metadata address) to be blocked: it used to expect it
/// reachable, so `--net-test` failed the create of a policy that holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_test_expects_never_reachable_answers_blocked() {
    let w = World::new().await;
    let out = w.d.cli(&["create", "-T", "mini", "--allow", "meta.test", "--net-test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let report = w.d.client.network_test(&id).await.unwrap();
    assert!(report.passed, "{:?}", report.checks.iter().filter(|c| !c.ok).collect::<Vec<_>>());
    let check = report.checks.iter().find(|c| c.target.starts_with("tcp meta.test:443")).unwrap();
    assert_eq!((check.expected.as_str(), check.observed.as_str()), ("blocked", "blocked"), "{check:?}");
    assert!(check.reason.contains("169.254.169.254"), "{check:?}");
}

/// The egress audit of a removed sandbox stays readable, by id at once and by the name
/// it had, for `--audit-retention` (default 7 days), and is listed by `net audits`; a
/// sandbox that recorded nothing leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_of_a_removed_sandbox_is_kept() {
    let w = World::new().await;
    let req = CreateSandbox {
        template: Some("mini".into()),
        name: Some("auditee".into()),
        network: Some(NetworkPolicy { mode: NetMode::Allow, allow: vec!["allowed.test".into()] }),
        ..Default::default()
    };
    let id = w.d.client.create_sandbox(&req).await.unwrap().id;
    // `net log --follow`, started before anything happened, prints the events as they come
    // and ends when the sandbox is removed.
    let mut follower =
        w.d.cli_command(&["net", "log", "auditee", "--follow"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    w.d.sh(&id, "nslookup -type=a allowed.test; nslookup -type=a other.test").await;
    let mut followed = String::new();
    while !(followed.contains("allow dns A allowed.test -> 198.51.100.10")
        && followed.contains("deny  dns A other.test"))
    {
        let line = lines.recv_timeout(std::time::Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}: {followed}"));
        followed.push_str(&line);
        followed.push('\n');
    }
    let quiet = w.d.mini(Default::default()).await;
    let live = w.d.client.network_log(&id).await.unwrap();
    assert!(live.removed_at.is_none());
    let dns = |log: &abx_client::NetLog, verdict: &str, name: &str| {
        log.events.iter().any(|e| e.kind == "dns" && e.verdict == verdict && e.name.as_deref() == Some(name))
    };
    assert!(dns(&live, "allow", "allowed.test") && dns(&live, "deny", "other.test"), "{live:?}");

    w.d.client.delete_sandbox(&id, true).await.unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = follower.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "net log --follow did not end with the sandbox");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success());
    while let Ok(line) = lines.recv_timeout(std::time::Duration::from_secs(2)) {
        followed.push_str(&line);
        followed.push('\n');
    }
    assert_eq!(followed.lines().count(), 2, "each event once: {followed}");
    // At once, by id (the removal finishes in the background).
    let log = w.d.client.network_log(&id).await.unwrap();
    assert!(log.removed_at.is_some(), "{log:?}");
    assert_eq!(log.events, live.events);
    let mut kept = Vec::new();
    for _ in 0..100 {
        kept = w.d.client.kept_audits().await.unwrap();
        if !kept.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        (kept[0].id.as_str(), kept[0].name.as_deref(), kept[0].template.as_str()),
        (id.as_str(), Some("auditee"), "mini")
    );
    assert_eq!(kept[0].events, live.events.len() as u64);
    // By the name it had, also from the CLI, which can show the denied events alone.
    assert_eq!(w.d.client.network_log("auditee").await.unwrap().events, live.events);
    let out = w.d.cli(&["net", "log", "auditee", "--denied"]);
    let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && err.contains("was removed"), "{err}");
    assert!(text.contains("deny  dns A other.test") && !text.contains("allowed.test"), "{text}");
    let out = w.d.cli(&["net", "audits"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "{}", String::from_utf8_lossy(&out.stdout));
    // The name's new sandbox is the live one.
    let again = w.d.client.create_sandbox(&req).await.unwrap().id;
    let log = w.d.client.network_log("auditee").await.unwrap();
    assert!(log.removed_at.is_none() && log.events.is_empty(), "{log:?}");
    w.d.client.delete_sandbox(&again, true).await.unwrap();

    // A sandbox with no network activity: nothing is kept once its removal is done.
    w.d.client.delete_sandbox(&quiet, true).await.unwrap();
    let mut gone = None;
    for _ in 0..100 {
        match w.d.client.network_log(&quiet).await {
            Err(e) => {
                gone = Some(e);
                break;
            }
            Ok(log) => assert!(log.events.is_empty()),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(gone.expect("the quiet sandbox's audit went").code(), Some("not_found"));
    assert_eq!(w.d.client.kept_audits().await.unwrap().len(), 1);
}

/// With `--audit-retention 0` a sandbox's audit goes with it, and `--audit-log` has every
/// sandbox's events in one file, each naming its sandbox, which outlives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retention_the_audit_goes_with_the_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("egress.jsonl");
    let w = World::with(&["--audit-retention", "0", "--audit-log", &wide.display().to_string()]).await;
    let id = w.sandbox(NetMode::Allow, &["allowed.test"]).await;
    let req = CreateSandbox { template: Some("mini".into()), name: Some("other".into()), ..Default::default() };
    let other = w.d.client.create_sandbox(&req).await.unwrap().id;
    w.d.sh(&id, "nslookup -type=a allowed.test").await;
    w.d.sh(&other, "nslookup -type=a secret.test").await;
    assert!(!w.d.client.network_log(&id).await.unwrap().events.is_empty());
    let mut lines: Vec<Value> = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&wide).unwrap_or_default();
        lines = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let find = |name: &str| lines.iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("{name}: {lines:?}"));
    let a = find("allowed.test");
    assert_eq!(
        (a["sandbox"].as_str(), a["verdict"].as_str(), a["kind"].as_str()),
        (Some(id.as_str()), Some("allow"), Some("dns"))
    );
    assert!(a.get("sandbox_name").is_none(), "{a}");
    let b = find("secret.test");
    assert_eq!(
        (b["sandbox"].as_str(), b["sandbox_name"].as_str(), b["verdict"].as_str()),
        (Some(other.as_str()), Some("other"), Some("deny"))
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&wide).unwrap().permissions().mode() & 0o777, 0o600);
    w.d.client.delete_sandbox(&id, true).await.unwrap();
    let mut gone = None;
    for _ in 0..100 {
        if let Err(e) = w.d.client.network_log(&id).await {
            gone = Some(e);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(gone.expect("the audit went with the sandbox").code(), Some("not_found"));
    assert!(w.d.client.kept_audits().await.unwrap().is_empty());
    assert!(std::fs::read_to_string(&wide).unwrap().contains(&id), "the file keeps what it had");
}
