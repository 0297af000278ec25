//! The MCP server (`agentbox mcp` over stdio, and the streamable HTTP router) driven by a
//! real MCP client: the official Python SDK, in a venv made on first use.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{Daemon, agentbox_bin, python_venv};

/// The Python `mcp` package the client session uses.
const MCP_VERSION: &str = "2.3.0";

fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/client.py")
}

/// The venv's python, with the `mcp` package, made on first use.
fn mcp_python() -> PathBuf {
    python_venv(&format!("mcp-venv-{MCP_VERSION}"), &format!("mcp=={MCP_VERSION}"))
}

/// Runs the client script; panics with its output (and the daemon's log) on failure.
async fn client_session(d: &Daemon, args: &[String]) {
    let python = tokio::task::spawn_blocking(mcp_python).await.unwrap();
    let child = tokio::process::Command::new(python)
        .arg(script())
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(Duration::from_secs(400), child).await.expect("the MCP client session timed out").unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "MCP client session failed ({}):\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
        out.status,
        d.log()
    );
    assert_eq!(stdout.trim(), format!("ok {}", args[0]), "{stderr}");
}

#[tokio::test]
async fn mcp_stdio_session_drives_every_tool() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let host = format!("unix:{}", d.socket.display());
    client_session(&d, &["stdio".into(), agentbox_bin().display().to_string(), host]).await;
    assert!(d.client.list_sandboxes().await.unwrap().is_empty(), "the session destroyed what it made");
}

#[tokio::test]
async fn mcp_streamable_http_session() {
    let d = Daemon::start().await;
    d.template("mini").await;
    // As the daemon mounts it: a router whose tools use a client of the daemon's socket.
    let client = d.client.clone();
    let app = abx_mcp::http_router(move || client.clone(), abx_mcp::HttpOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{}", listener.local_addr().unwrap(), abx_mcp::HTTP_PATH);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    client_session(&d, &["http".into(), url]).await;
    server.abort();
    assert!(d.client.list_sandboxes().await.unwrap().is_empty(), "the session destroyed what it made");
}

/// A line that is not JSON gets JSON-RPC's parse error (-32700, id null) and the session
/// goes on; the SDK's transport used to drop it without an answer.
#[tokio::test]
async fn mcp_stdio_answers_a_line_that_is_not_json_with_a_parse_error() {
    use std::io::Write;
    let d = Daemon::start().await;
    let host = format!("unix:{}", d.socket.display());
    let mut child = std::process::Command::new(agentbox_bin())
        .args(["--host", &host, "mcp"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    writeln!(stdin, "{init}").unwrap();
    writeln!(stdin, r#"{{"jsonrpc":"2.0","method":"notifications/initialized"}}"#).unwrap();
    writeln!(stdin, "this is not json").unwrap();
    writeln!(stdin, r#"{{"jsonrpc":"2.0","id":2,"method":"ping"}}"#).unwrap();
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", out.status);
    let answers: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // In any order: the parse error does not wait for the server's answers.
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(answers.iter().any(|a| a["id"] == 0 && a["result"]["serverInfo"]["name"] == "agentbox"), "{answers:?}");
    assert!(answers.iter().any(|a| a["id"].is_null() && a["error"]["code"] == -32700), "{answers:?}");
    assert!(answers.iter().any(|a| a["id"] == 2 && a["result"] == serde_json::json!({})), "{answers:?}");
}
