//! The HTTP API contract: the committed OpenAPI document matches the routes, and errors
//! have one shape.

use std::collections::BTreeSet;

use crate::harness::Daemon;

async fn raw(d: &Daemon, method: &str, path: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let body = if method == "GET" || method == "DELETE" { "" } else { "{}" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp);
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = text.split("\r\n\r\n").nth(1).and_then(|b| {
        let b = b.trim();
        let start = b.find('{')?;
        serde_json::from_str(&b[start..b.rfind('}')? + 1]).ok()
    });
    (status, json.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn served_openapi_matches_the_committed_document_and_every_route() {
    let d = Daemon::start().await;
    let (status, served) = raw(&d, "GET", abx_api::paths::OPENAPI).await;
    assert_eq!(status, 200);
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/openapi.json")).expect("docs/openapi.json is valid JSON");
    assert_eq!(
        served, committed,
        "docs/openapi.json is stale: regenerate it with `agentbox openapi > docs/openapi.json`"
    );
    let spec_paths: BTreeSet<&str> = served["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    let client_paths: BTreeSet<&str> = abx_api::paths::ALL.iter().copied().collect();
    assert_eq!(spec_paths, client_paths, "every route the clients use is documented, and nothing else");
    // Every documented operation is routed (an unrouted one answers route_not_found or
    // method_not_allowed; anything else, even an error, proves a handler exists).
    for (path, item) in served["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete =
                path.replace("{id}", "nosuchsandbox").replace("{pid}", "1").replace("{name}", "nosuchtemplate");
            let (status, body) = raw(&d, &method.to_uppercase(), &concrete).await;
            let code = body["error"]["code"].as_str().unwrap_or("");
            assert!(
                code != "route_not_found" && code != "method_not_allowed" && status != 405,
                "{method} {path}: {status} {body}"
            );
        }
    }
}

#[tokio::test]
async fn errors_have_one_shape() {
    let d = Daemon::start().await;
    let (status, body) = raw(&d, "GET", "/v1/nothing/here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "route_not_found");
    let (status, body) = raw(&d, "GET", "/v1/sandboxes/missing").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    assert!(body["error"]["message"].as_str().unwrap().contains("missing"));
    let (status, body) = raw(&d, "PATCH", "/v1/sandboxes").await;
    assert_eq!((status, body["error"]["code"].as_str()), (405, Some("method_not_allowed")));
    let (status, body) = raw(&d, "POST", "/v1/sandboxes/missing/exec").await;
    assert_eq!(status, 400, "a body without cmd is rejected first: {body}");
    assert_eq!(body["error"]["code"], "invalid_argument");
}

#[tokio::test]
async fn the_api_socket_is_for_root_only() {
    let d = Daemon::start().await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn tcp_listener_needs_an_api_key_and_keys_are_managed_locally() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let d = crate::harness::Daemon::start_with(&["+--listen", &tcp]).await;
    d.template("mini").await;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();

    // No key, a made-up key: refused, with a message saying what to do.
    let r = http.get(format!("{url}/v1/system")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.unwrap().contains("agentbox key create"));
    // A sandbox header does not open the daemon's own routes.
    let r = http.get(format!("{url}/v1/system")).header("E2b-Sandbox-Id", "0123456789ab").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http.post(format!("{url}/mcp")).header("E2b-Sandbox-Id", "0123456789ab").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let fake = "e2b_0123456789abcdef0123456789abcdef01234567";
    assert_eq!(status(http.get(format!("{url}/v1/system")).bearer_auth(fake).send().await.unwrap()), 401);

    // A key made over the unix socket (the CLI) works in both header forms.
    let o = d.cli(&["key", "create", "--tenant", "team-a"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(key.starts_with("e2b_") && key.len() == 44, "{key}");
    assert_eq!(status(http.get(format!("{url}/v1/system")).bearer_auth(&key).send().await.unwrap()), 200);
    assert_eq!(status(http.get(format!("{url}/v1/system")).header("X-API-Key", &key).send().await.unwrap()), 200);
    // Keys cannot be managed over TCP, even with a key.
    let r = http.post(format!("{url}/v1/keys")).bearer_auth(&key).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // The SDK over TCP.
    let client = abx_client::Client::new(&url).unwrap().with_api_key(key.clone());
    let sb = client
        .create_sandbox(&abx_client::CreateSandbox { template: Some("mini".into()), ..Default::default() })
        .await
        .unwrap();
    let out = client.run(&sb.id, &["echo", "over tcp"]).await.unwrap();
    assert_eq!(out.stdout, b"over tcp\n");
    client.delete_sandbox(&sb.id, true).await.unwrap();
    // Listed without the key; revoked keys stop working at once.
    let keys = d.client.keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].tenant.as_deref(), Some("team-a"));
    assert!(keys[0].key.is_none() && key.starts_with(&keys[0].prefix));
    assert!(d.cli(&["key", "rm", &keys[0].id]).status.success());
    assert_eq!(status(http.get(format!("{url}/v1/system")).bearer_auth(&key).send().await.unwrap()), 401);
}

/// Keys of a tenant reach only that tenant's sandboxes, snapshots and volumes (another
/// tenant's are not found); templates and pools are shared, to use but not to change;
/// untenanted keys and the unix socket reach everything.
#[tokio::test]
async fn tenants_reach_only_their_own_sandboxes_snapshots_and_volumes() {
    use abx_client::{Client, CreateSandbox, ExecRequest, ForkRequest, VolumeMount};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let d = crate::harness::Daemon::start_with(&["+--listen", &tcp]).await;
    d.template("mini").await;
    let url = format!("http://127.0.0.1:{port}");
    let key = |tenant: Option<&str>| {
        let mut args = vec!["key", "create"];
        args.extend(tenant.map(|t| ["--tenant", t]).into_iter().flatten());
        let o = d.cli(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let b_key = key(Some("team-b"));
    let client = |k: String| Client::new(&url).unwrap().with_api_key(k);
    let (a, b, admin) = (client(key(Some("team-a"))), client(b_key.clone()), client(key(None)));
    let mini = || CreateSandbox { template: Some("mini".into()), ..Default::default() };
    let not_found = |e: abx_client::Error| assert_eq!(e.code(), Some("not_found"), "{e}");

    let sa = a.create_sandbox(&CreateSandbox { name: Some("alpha".into()), ..mini() }).await.unwrap();
    assert_eq!(sa.tenant.as_deref(), Some("team-a"));
    let sb = b.create_sandbox(&mini()).await.unwrap();
    let ids = |v: Vec<abx_client::Sandbox>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(a.list_sandboxes().await.unwrap()), [sa.id.as_str()]);
    assert_eq!(ids(b.list_sandboxes().await.unwrap()), [sb.id.as_str()]);
    assert_eq!(admin.list_sandboxes().await.unwrap().len(), 2, "a key without a tenant sees all");
    assert_eq!(d.client.list_sandboxes().await.unwrap().len(), 2, "so does the unix socket");

    // An idempotency key is its caller's own: b's create with a's key makes b's sandbox.
    let keyed = || CreateSandbox { idempotency_key: Some("same-key".into()), ..mini() };
    let ka = a.create_sandbox(&keyed()).await.unwrap();
    let kb = b.create_sandbox(&keyed()).await.unwrap();
    assert_ne!(ka.id, kb.id);
    assert_eq!(kb.tenant.as_deref(), Some("team-b"));
    assert_eq!(a.create_sandbox(&keyed()).await.unwrap().id, ka.id, "a's retry answers a's");
    assert_eq!(b.create_sandbox(&keyed()).await.unwrap().id, kb.id, "b's retry answers b's");
    a.delete_sandbox(&ka.id, true).await.unwrap();
    b.delete_sandbox(&kb.id, true).await.unwrap();

    // Names are a tenant's own: b may use a name a has, and each finds its own by it;
    // the socket, which sees both, is told to give the id, until an untenanted sandbox
    // has the name (the socket's own, found first).
    let named = |n: &str| CreateSandbox { name: Some(n.into()), ..mini() };
    let na = a.create_sandbox(&named("shared")).await.unwrap();
    let nb = b.create_sandbox(&named("shared")).await.unwrap();
    assert_eq!(a.get_sandbox("shared").await.unwrap().id, na.id);
    assert_eq!(b.get_sandbox("shared").await.unwrap().id, nb.id);
    let e = b.create_sandbox(&named("shared")).await.unwrap_err();
    assert_eq!(e.code(), Some("conflict"), "{e}");
    let e = d.client.get_sandbox("shared").await.unwrap_err();
    assert!(e.to_string().contains("give its id") && e.to_string().contains(&na.id), "{e}");
    let own = d.client.create_sandbox(&named("shared")).await.unwrap();
    assert_eq!(own.tenant, None);
    assert_eq!(d.client.get_sandbox("shared").await.unwrap().id, own.id);
    // Snapshot names alike, and across sandbox names: b's snapshot may not take the
    // name of b's sandbox, but may take one of a's.
    let sa_snap = a.snapshot(&na.id, Some("snapname")).await.unwrap();
    let sb_snap = b.snapshot(&nb.id, Some("snapname")).await.unwrap();
    assert_eq!(a.get_snapshot("snapname").await.unwrap().id, sa_snap.id);
    assert_eq!(b.get_snapshot("snapname").await.unwrap().id, sb_snap.id);
    let e = b.snapshot(&nb.id, Some("shared")).await.unwrap_err();
    assert!(e.to_string().contains("already names a sandbox"), "{e}");
    for (c, snap, sbx) in [(&a, &sa_snap, &na), (&b, &sb_snap, &nb)] {
        c.delete_snapshot(&snap.id).await.unwrap();
        c.delete_sandbox(&sbx.id, true).await.unwrap();
    }
    d.client.delete_sandbox(&own.id, true).await.unwrap();

    // Another tenant's sandbox does not exist for b, by id or by name, whatever the request.
    for key in [sa.id.as_str(), "alpha"] {
        not_found(b.get_sandbox(key).await.unwrap_err());
        not_found(b.run(key, &["true"]).await.unwrap_err());
        not_found(b.read_file(key, "/etc/hostname").await.unwrap_err());
        not_found(b.snapshot(key, None).await.unwrap_err());
        not_found(b.fork_sandbox(key, &ForkRequest::default()).await.unwrap_err());
        not_found(b.stop(key).await.unwrap_err());
        not_found(b.delete_sandbox(key, true).await.unwrap_err());
    }
    let req = ExecRequest { cmd: vec!["true".into()], ..Default::default() };
    assert!(b.exec_interactive(&sa.id, &req).await.is_err(), "nor over the WebSocket");
    // The owner's WebSocket exec works (the upgraded connection keeps its caller).
    let (_w, mut r) = a.exec_interactive(&sa.id, &req).await.unwrap().split();
    loop {
        match r.next().await.unwrap() {
            Some(abx_client::InteractiveEvent::Exit(st)) => break assert_eq!(st.code, Some(0)),
            Some(_) => {}
            None => panic!("no exit"),
        }
    }

    // Snapshots belong to their sandbox's tenant.
    let snap = a.snapshot(&sa.id, Some("a-snap")).await.unwrap();
    assert_eq!(snap.tenant.as_deref(), Some("team-a"));
    assert!(b.snapshots(None).await.unwrap().is_empty());
    not_found(b.get_snapshot("a-snap").await.unwrap_err());
    not_found(b.fork_snapshot("a-snap", &ForkRequest::default()).await.unwrap_err());
    not_found(b.rollback(&sb.id, "a-snap").await.unwrap_err());
    not_found(b.delete_snapshot("a-snap").await.unwrap_err());
    let fork = a.fork_snapshot("a-snap", &ForkRequest::default()).await.unwrap().sandboxes.remove(0);
    assert_eq!(fork.tenant.as_deref(), Some("team-a"), "a fork is its maker's");

    // Volumes too: b can neither see nor mount a's.
    a.create_volume("a-vol").await.unwrap();
    assert!(b.volumes().await.unwrap().is_empty());
    not_found(b.volume("a-vol").await.unwrap_err());
    let mount = VolumeMount { name: "a-vol".into(), path: "/data".into(), read_only: false };
    let e = b.create_sandbox(&CreateSandbox { volumes: vec![mount.clone()], ..mini() }).await.unwrap_err();
    not_found(e);
    assert_eq!(b.list_sandboxes().await.unwrap().len(), 1, "nothing half-made");
    a.create_sandbox(&CreateSandbox { volumes: vec![mount], ..mini() }).await.unwrap();
    assert_eq!(admin.volumes().await.unwrap().len(), 1);

    // Templates and pools are shared: listed and used, not changed.
    assert!(b.templates().await.unwrap().iter().any(|t| t.name == "mini"));
    let e = b.set_pool("mini", 1, 2).await.unwrap_err();
    assert_eq!(e.code(), Some("forbidden"), "{e}");
    let e = b.delete_template("mini").await.unwrap_err();
    assert_eq!(e.code(), Some("forbidden"), "{e}");
    assert!(d.client.template("mini").await.is_ok(), "the template is still there");
    // MCP over TCP acts for everyone: not for a tenant's key.
    let r = reqwest::Client::new().post(format!("{url}/mcp")).bearer_auth(&b_key).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // The owner removes what is its own.
    // A connection to the host, refused: an event in its audit.
    d.sh(&sa.id, "nc -w 1 $(awk '/nameserver/ {print $2}' /etc/resolv.conf) 9 </dev/null").await;
    a.delete_sandbox("alpha", true).await.unwrap();
    b.delete_sandbox(&sb.id, true).await.unwrap();
    // The audit a removed sandbox leaves stays its tenant's.
    let mut kept = Vec::new();
    for _ in 0..100 {
        kept = admin.kept_audits().await.unwrap();
        if !kept.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        kept.iter().map(|k| (k.id.as_str(), k.tenant.as_deref())).collect::<Vec<_>>(),
        [(sa.id.as_str(), Some("team-a"))]
    );
    assert_eq!(a.kept_audits().await.unwrap().len(), 1);
    assert!(b.kept_audits().await.unwrap().is_empty());
    assert!(a.network_log("alpha").await.unwrap().removed_at.is_some());
    for key in [sa.id.as_str(), "alpha"] {
        not_found(b.network_log(key).await.unwrap_err());
    }
}
