//! agentbox as an MCP server: tools that create sandboxes, run commands in them, read and
//! write their files, snapshot, fork, roll back, diff and destroy them, so that an agent
//! can use sandboxes as a tool. Every tool goes through [`abx_client::Client`], so the
//! server works against any daemon the client can reach.
//!
//! Two transports, both from the official Rust SDK (`rmcp`):
//! - stdio ([`serve_stdio`]), what `agentbox mcp` runs for a client that spawns it;
//! - streamable HTTP ([`http_router`]), an axum router serving [`HTTP_PATH`], which the
//!   daemon mounts beside its REST API.
//!
//! A failure of agentbox (unknown sandbox, bad argument, daemon unreachable) is a tool
//! result with `isError: true` and the message, never a protocol error, so the agent sees
//! what went wrong.
#![forbid(unsafe_code)]

mod output;
mod tools;

use std::sync::Arc;

use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

pub use tools::AgentboxMcp;

/// Where [`http_router`] serves MCP.
pub const HTTP_PATH: &str = "/mcp";

/// Serves MCP on this process's stdin and stdout until the client closes them.
///
/// A line that is not JSON at all is answered with JSON-RPC's parse error (-32700, id
/// null), which the SDK's transport would drop without a word: the server reads the lines
/// that are JSON, and one writer puts its answers and those errors on stdout whole.
pub async fn serve_stdio(client: abx_client::Client) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (stdin, mut stdout) = rmcp::transport::io::stdio_pipes();
    let (server_in, mut feed) = tokio::io::duplex(1 << 16);
    let (server_out, answers) = tokio::io::duplex(1 << 16);
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let errors = lines_tx.clone();
    tokio::spawn(async move {
        let mut input = tokio::io::BufReader::new(stdin).split(b'\n');
        while let Ok(Some(line)) = input.next_segment().await {
            if line.trim_ascii().is_empty() {
                continue;
            }
            if serde_json::from_slice::<serde::de::IgnoredAny>(&line).is_ok() {
                if feed.write_all(&line).await.is_err() || feed.write_all(b"\n").await.is_err() {
                    return;
                }
            } else if errors.send(parse_error(&line)).await.is_err() {
                return;
            }
        }
        // End of input: the server sees it when `feed` is dropped here.
    });
    tokio::spawn(async move {
        let mut out = tokio::io::BufReader::new(answers).split(b'\n');
        while let Ok(Some(mut line)) = out.next_segment().await {
            line.push(b'\n');
            if lines_tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            if stdout.write_all(&line).await.is_err() || stdout.flush().await.is_err() {
                return;
            }
        }
    });
    let running = AgentboxMcp::new(client).serve((server_in, server_out)).await?;
    running.waiting().await?;
    // What is still queued goes out (the channel closes once both feeders are done).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    Ok(())
}

/// JSON-RPC's answer to a message that is not JSON.
fn parse_error(line: &[u8]) -> Vec<u8> {
    let err = serde_json::from_slice::<serde::de::IgnoredAny>(line).err().map(|e| e.to_string()).unwrap_or_default();
    let msg = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": { "code": -32700, "message": format!("Parse error: {err}") },
    });
    let mut v = serde_json::to_vec(&msg).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Options of the streamable HTTP endpoint.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Accepted `Host` header values (`name` or `name:port`), a guard against DNS
    /// rebinding for servers that trust loopback callers. Empty (the default): any host,
    /// right for the daemon, whose TCP listeners require an API key and whose unix
    /// socket is root's.
    pub allowed_hosts: Vec<String>,
}

/// An axum router serving MCP's streamable HTTP transport at [`HTTP_PATH`] (`POST` for
/// messages). `client` is called for each MCP request and gives the client the tools
/// use (the daemon's own socket, for the daemon).
///
/// The endpoint is stateless: no session to keep, each request answered with one JSON
/// body, so nothing stays open between calls (a `GET` for a server-to-client stream is
/// refused with 405, as the protocol allows).
pub fn http_router<F>(client: F, options: HttpOptions) -> axum::Router
where
    F: Fn() -> abx_client::Client + Send + Sync + 'static,
{
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None);
    config = if options.allowed_hosts.is_empty() {
        config.disable_allowed_hosts()
    } else {
        config.with_allowed_hosts(options.allowed_hosts)
    };
    let service = StreamableHttpService::new(
        move || Ok(AgentboxMcp::new(client())),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    axum::Router::new().route_service(HTTP_PATH, service)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// POSTs an `initialize` with this Host header; returns the raw HTTP response.
    async fn initialize(app: axum::Router, host: &str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#;
        let req = format!(
            "POST {HTTP_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut resp = String::new();
        conn.read_to_string(&mut resp).await.unwrap();
        server.abort();
        resp
    }

    fn client() -> abx_client::Client {
        abx_client::Client::new("unix:/nonexistent/agentbox.sock").unwrap()
    }

    /// Mounted the way the daemon does: merged into a router that has its own routes,
    /// fallback and layers.
    #[tokio::test]
    async fn router_merges_into_an_api_router_and_answers_initialize() {
        let api = axum::Router::new()
            .route("/v1/system", axum::routing::get(|| async { "system" }))
            .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "no route") });
        let app = api.merge(http_router(client, HttpOptions::default())).layer(axum::middleware::from_fn(
            |req: axum::extract::Request, next: axum::middleware::Next| async move { next.run(req).await },
        ));
        let resp = initialize(app, "agentbox").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains(r#""serverInfo":{"name":"agentbox""#), "{resp}");
        assert!(resp.contains(r#""tools":{"#), "{resp}");
    }

    #[tokio::test]
    async fn allowed_hosts_refuse_other_hosts() {
        let opts = HttpOptions { allowed_hosts: vec!["localhost".into()] };
        let resp = initialize(http_router(client, opts.clone()), "evil.example").await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
        let resp = initialize(http_router(client, opts), "localhost").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
}
