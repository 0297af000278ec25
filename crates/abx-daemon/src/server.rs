//! Listeners and the serve loop.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::net::UnixListener;
use tracing::info;

use crate::config::Listen;
use crate::core::Core;

/// Binds a unix socket readable and writable by root only (its directory is made 0700).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another daemon is listening on {}", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves the API on every listener until `shutdown` resolves.
pub async fn serve(
    core: Core,
    listen: &[Listen],
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The E2B facade (its control plane and the in-sandbox protocol) checks keys and
    // sandbox access tokens itself.
    let mut app = crate::api::router(core.clone()).merge(crate::e2b::router().with_state(core.clone()));
    // MCP over streamable HTTP at /mcp: its tools are clients of this daemon's own socket.
    if let Some(sock) = listen.iter().find_map(|l| match l {
        Listen::Unix(p) => Some(p.clone()),
        Listen::Tcp(_) => None,
    }) && let Ok(client) = abx_client::Client::new(&format!("unix:{}", sock.display()))
    {
        app = app.merge(abx_mcp::http_router(move || client.clone(), abx_mcp::HttpOptions::default()));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for l in listen {
        match l {
            Listen::Unix(path) => {
                let listener = bind_unix(path)?;
                info!(socket = %path.display(), "listening");
                // Root on the host: acts for everyone.
                let app = app
                    .clone()
                    .layer(axum::middleware::from_fn(|req: axum::extract::Request, next: axum::middleware::Next| {
                        crate::auth::serve_as(crate::auth::Caller::Admin, req, next)
                    }))
                    .layer(axum::middleware::from_fn(read_rest_after_error));
                let mut rx = stop_rx.clone();
                tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.wait_for(|s| *s).await;
                        })
                        .await;
                }));
            }
            Listen::Tcp(addr) => {
                use axum::serve::ListenerExt;
                // Small streamed frames (exec output, Connect envelopes) go out at once,
                // not after the peer's delayed ACK.
                let listener = tokio::net::TcpListener::bind(addr).await?.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                info!(address = %addr, "listening (API key required)");
                let app = app
                    .clone()
                    .layer(axum::middleware::from_fn_with_state(core.clone(), require_key))
                    .layer(axum::middleware::from_fn(read_rest_after_error));
                let mut rx = stop_rx.clone();
                tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.wait_for(|s| *s).await;
                        })
                        .await;
                }));
            }
        }
    }
    shutdown.await;
    // Builds streaming to clients end with an error event before the listeners close.
    core.manager.stopping.cancel();
    // Imports, pulls and recipes still running cannot publish any more (`build::spawn`
    // tells their clients they were abandoned).
    core.manager.templates.close();
    let _ = stop_tx.send(true);
    // Requests still being answered get 5 s in all (not 5 s per listener) to finish;
    // longer ones (an exec stream, a WebSocket session) are cut.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), futures_util::future::join_all(tasks)).await;
    Ok(())
}

/// How long an error answer to a request with a body waits for the rest of that body.
const READ_REST_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// A request body the handler and [`read_rest_after_error`] share.
struct SharedBody(std::sync::Arc<std::sync::Mutex<axum::body::Body>>);

impl http_body::Body for SharedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let mut body = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::pin::Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).size_hint()
    }
}

/// An error answered before the request's body was read to its end (an upload to a
/// sandbox that is gone, a path refused, a missing key, a multipart upload failing at its
/// first part) waits until the client has sent the rest, for up to [`READ_REST_FOR`], which
/// it reads and drops. Otherwise the connection closes under a client that is still
/// sending, and it reports "broken pipe" instead of the answer.
async fn read_rest_after_error(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use futures_util::StreamExt;
    if matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let shared = std::sync::Arc::new(std::sync::Mutex::new(body));
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::new(SharedBody(shared.clone())));
    let resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        let rest = std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()));
        let mut rest = rest.into_data_stream();
        let _ = tokio::time::timeout(READ_REST_FOR, async { while let Some(Ok(_)) = rest.next().await {} }).await;
    }
    resp
}

/// TCP requests need an API key (`Authorization: Bearer K` or `X-API-Key: K`); requests
/// for a sandbox's own API in the E2B protocol (`E2b-Sandbox-Id` header or a
/// `<port>-<id>.<domain>` host) carry that sandbox's access token instead, which the
/// facade checks.
async fn require_key(
    axum::extract::State(core): axum::extract::State<Core>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // A request for another port of a sandbox (the e2b SDK's `get_host(port)` form, or its
    // headers) is the ingress proxy's; whatever its path, it gets the envd router's 502
    // that says so, not a demand for a key or token it was never meant to carry.
    if let Some(resp) = crate::e2b::other_port(req.headers()) {
        return resp;
    }
    if crate::e2b::is_envd_request(req.uri(), req.headers()) {
        // The facade checks the sandbox's access token and acts on that sandbox alone.
        return crate::auth::serve_as(crate::auth::Caller::Admin, req, next).await;
    }
    match crate::auth::key_of(req.headers()).and_then(|k| core.manager.auth.check(k)) {
        Some(key) => {
            let caller = crate::auth::Caller::of_key(&key);
            // The MCP tools are clients of the unix socket, which acts for everyone.
            if caller != crate::auth::Caller::Admin && req.uri().path().starts_with(abx_mcp::HTTP_PATH) {
                let message = "MCP over TCP needs a key without a tenant (its tools act for every tenant); \
                               a tenant's agents can use the API or the e2b SDK with their key";
                let body = serde_json::json!({"error": {"code": "forbidden", "message": message}});
                return (axum::http::StatusCode::FORBIDDEN, axum::Json(body)).into_response();
            }
            req.extensions_mut().insert(crate::auth::Remote { key });
            crate::auth::serve_as(caller, req, next).await
        }
        None => {
            // `error` for agentbox's clients; `code` and `message` at the top for the e2b SDKs.
            let message = "this listener needs an API key (Authorization: Bearer KEY or X-API-Key: KEY); make one with `agentbox key create`";
            let body = serde_json::json!({
                "error": {"code": "unauthorized", "message": message},
                "code": 401,
                "message": message,
            });
            (axum::http::StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
        }
    }
}
