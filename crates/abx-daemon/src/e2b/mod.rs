//! The E2B facade: an unmodified `e2b` SDK (Python 2.x, JS) pointed at the daemon's TCP
//! listener (`E2B_API_URL` and `E2B_SANDBOX_URL` both set to `http://HOST:PORT`) works
//! against agentbox. See `docs/e2b.md` for what is covered.
//!
//! Two protocols share one router:
//!
//! - the **control plane** (E2B's REST API: `POST /v2/sandboxes`, `GET /v2/sandboxes`,
//!   `/sandboxes/{id}/…`, `/snapshots`), authenticated by the API key in `X-API-Key`;
//! - **envd**, the daemon E2B runs inside every sandbox (Connect RPC with the JSON codec
//!   under `/process.Process/*` and `/filesystem.Filesystem/*`, plain HTTP `/files` and
//!   `/health`). A request is for a sandbox's envd when it names the sandbox in the
//!   `E2b-Sandbox-Id` header (the SDK sends it, with `E2b-Sandbox-Port: 49983`, whenever
//!   `E2B_SANDBOX_URL` is set) or in a `Host` of the form `49983-<id>.<domain>`; it is
//!   authenticated by the sandbox's access token in `X-Access-Token` (or, for `/files`, a
//!   signed URL made from that token).
//!
//! Every operation is translated into [`Command`]s for [`Core::execute`]; nothing here
//! talks to a sandbox's agent directly.

mod connect;
mod control;
mod envd;
mod fs;
mod process;
mod time;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use base64::Engine;

use crate::core::{Command, Core};

/// The envd version the facade reports. The SDK enables features by it: 0.5.7 gives
/// default users (0.4.0), closing stdin (0.5.2) and octet-stream uploads (0.5.7); file
/// metadata (0.6.2) and entries in watch events (0.6.3) are not offered, so the SDK
/// refuses those options itself with a clear message.
pub const ENVD_VERSION: &str = "0.5.7";
/// The port envd listens on in E2B sandboxes.
pub const ENVD_PORT: u16 = 49983;
/// E2B's default sandbox timeout (seconds) when a create names none.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// `clientID` in answers (E2B names the node there).
const CLIENT_ID: &str = "agentbox";

/// The E2B control plane and envd, for the daemon's TCP listener. The router does its
/// own authentication (API keys on the control plane, sandbox access tokens on envd), so
/// it must be mounted without another key check in front of its envd routes (envd
/// requests carry no API key).
pub fn router() -> Router<Core> {
    Router::new()
        // Control plane.
        .route("/sandboxes", get(control::list_v1).post(control::create))
        .route("/v2/sandboxes", get(control::list_v2).post(control::create))
        .route("/sandboxes/{id}", get(control::get).delete(control::kill))
        .route("/sandboxes/{id}/timeout", post(control::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(control::refresh))
        .route("/sandboxes/{id}/pause", post(control::pause))
        .route("/sandboxes/{id}/resume", post(control::resume))
        .route("/sandboxes/{id}/connect", post(control::connect))
        .route("/v2/sandboxes/{id}/connect", post(control::connect))
        .route("/sandboxes/{id}/metrics", get(control::metrics))
        .route("/sandboxes/{id}/network", put(control::network))
        .route("/sandboxes/{id}/snapshots", post(control::snapshot))
        .route("/sandboxes/{id}/fork", post(control::fork))
        .route("/snapshots", get(control::snapshots))
        .route("/templates/{id}", delete(control::delete_template))
        // envd.
        .route("/health", get(envd::health))
        .route("/files", get(envd::read).post(envd::write))
        .route("/process.Process/{method}", post(process::rpc))
        .route("/filesystem.Filesystem/{method}", post(fs::rpc))
}

/// The sandbox (and port) an envd request is for: the `E2b-Sandbox-Id` and
/// `E2b-Sandbox-Port` headers, else a `Host` of the form `<port>-<id>.<domain>`.
pub fn envd_target(headers: &HeaderMap) -> Option<(String, u16)> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(id) = header("e2b-sandbox-id").filter(|s| !s.is_empty()) {
        let port = match header("e2b-sandbox-port") {
            Some(p) => p.parse().ok()?,
            None => ENVD_PORT,
        };
        return Some((id.to_string(), port));
    }
    let host = header("host")?;
    let first = host.split('.').next()?;
    let (port, id) = first.split_once('-')?;
    if host.split('.').count() < 2 || id.is_empty() {
        return None;
    }
    Some((id.to_string(), port.parse().ok()?))
}

/// An error in E2B's shape, `{"code": <http status>, "message"}` (control plane and envd's
/// plain HTTP routes).
#[derive(Debug)]
pub struct E2bError {
    pub status: StatusCode,
    pub message: String,
}

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        E2bError { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// What E2B's edge proxy answers for a sandbox that does not exist (any more); the
    /// SDK recognises "was not found" and reports the sandbox as not running.
    pub fn sandbox_gone(id: &str) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, format!("The sandbox {id} was not found"))
    }
}

impl From<crate::error::CoreError> for E2bError {
    fn from(e: crate::error::CoreError) -> Self {
        let (code, status) = e.code();
        if status >= 500 {
            tracing::warn!(error = %e.full_message(), code, "e2b request failed");
        }
        E2bError::new(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.full_message())
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        // The request's body may be unread (a rejected upload or RPC): hyper then closes
        // the connection after the answer, so the client must not reuse it.
        let close = [(axum::http::header::CONNECTION, "close")];
        (self.status, close, axum::Json(body)).into_response()
    }
}

/// Whether `key` is a valid API key of this daemon.
fn check_key(core: &Core, key: &str) -> bool {
    core.manager.auth.check(key).is_some()
}

/// The access token of a sandbox's envd (E2B's `envdAccessToken`).
fn sandbox_token(core: &Core, sandbox_id: &str) -> String {
    core.manager.auth.sandbox_token(sandbox_id)
}

fn check_sandbox_token(core: &Core, sandbox_id: &str, token: &str) -> bool {
    core.manager.auth.check_sandbox_token(sandbox_id, token)
}

/// A control-plane request with a valid API key (`X-API-Key`, or `Authorization: Bearer`).
pub struct ApiKey;

impl FromRequestParts<Core> for ApiKey {
    type Rejection = E2bError;
    async fn from_request_parts(parts: &mut Parts, core: &Core) -> Result<Self, E2bError> {
        match crate::auth::key_of(&parts.headers) {
            Some(k) if check_key(core, k) => Ok(ApiKey),
            Some(_) => Err(E2bError::new(StatusCode::UNAUTHORIZED, "Invalid API key")),
            None => Err(E2bError::new(StatusCode::UNAUTHORIZED, "An API key is required (X-API-Key header)")),
        }
    }
}

/// An envd request for a live sandbox, authenticated by its access token.
#[derive(Debug, Clone)]
pub struct Envd {
    /// The sandbox's id.
    pub id: String,
    /// The acting user: from `Authorization: Basic base64(user:)`, else the sandbox's
    /// default user.
    pub user: Option<String>,
    /// Whether the user was named by the request (not the sandbox default).
    pub explicit_user: bool,
}

impl Envd {
    /// The acting user's home directory (E2B resolves relative paths against it).
    pub fn home(&self) -> String {
        match self.user.as_deref() {
            None | Some("root") | Some("0") => "/root".to_string(),
            Some(u) if u.starts_with("0:") => "/root".to_string(),
            Some(u) => format!("/home/{u}"),
        }
    }

    /// An absolute path: relative ones are taken from the user's home.
    pub fn path(&self, p: &str) -> String {
        if p.starts_with('/') {
            p.to_string()
        } else if p.is_empty() {
            self.home()
        } else {
            format!("{}/{}", self.home(), p.trim_start_matches("./"))
        }
    }
}

/// The 502 for a request that names a sandbox port other than envd's (by the
/// `E2b-Sandbox-*` headers or a `<port>-<id>.<domain>` host): such ports are served by the
/// ingress proxy, not this listener.
pub fn other_port(headers: &HeaderMap) -> Option<Response> {
    let (id, port) = envd_target(headers)?;
    (port != ENVD_PORT).then(|| other_port_error(&id, port).into_response())
}

fn other_port_error(id: &str, port: u16) -> E2bError {
    E2bError::new(
        StatusCode::BAD_GATEWAY,
        format!(
            "port {port} of sandbox {id}: ports other than envd's ({ENVD_PORT}) are served by the ingress proxy (`agentbox port`)"
        ),
    )
}

/// The sandbox of an envd request, if it exists and runs (or is paused: any request
/// resumes it). 502 like E2B's proxy otherwise.
async fn live_sandbox(core: &Core, headers: &HeaderMap) -> Result<abx_api::Sandbox, E2bError> {
    let Some((id, port)) = envd_target(headers) else {
        return Err(E2bError::bad_request(
            "no sandbox named: send the E2b-Sandbox-Id header (set E2B_SANDBOX_URL) or use the host 49983-<id>.<domain>",
        ));
    };
    if port != ENVD_PORT {
        return Err(other_port_error(&id, port));
    }
    match core.execute(Command::GetSandbox { id: id.clone() }).await.and_then(|o| o.sandbox()) {
        Ok(sb) if control::e2b_state(sb.state).is_some() => Ok(sb),
        _ => Err(E2bError::sandbox_gone(&id)),
    }
}

impl FromRequestParts<Core> for Envd {
    type Rejection = E2bError;
    async fn from_request_parts(parts: &mut Parts, core: &Core) -> Result<Self, E2bError> {
        let signed = parts.uri.path() == "/files" && query_param(parts.uri.query(), "signature").is_some();
        let sb = if envd_target(&parts.headers).is_none() && signed {
            // A signed URL (`download_url`, `upload_url`) made with E2B_SANDBOX_URL set
            // names no sandbox: the signature tells which one it is for.
            signed_sandbox(core, parts).await?
        } else {
            let sb = live_sandbox(core, &parts.headers).await?;
            let token = parts.headers.get("x-access-token").and_then(|v| v.to_str().ok());
            let authorized = match token {
                Some(t) => check_sandbox_token(core, &sb.id, t.trim()),
                None => signed && signed_url_ok(core, &sb.id, parts),
            };
            if !authorized {
                let msg = if token.is_some() {
                    "invalid access token"
                } else {
                    "an access token is required (X-Access-Token)"
                };
                return Err(E2bError::new(StatusCode::UNAUTHORIZED, msg));
            }
            sb
        };
        let named = basic_user(&parts.headers).or_else(|| query_param(parts.uri.query(), "username"));
        if let Some(u) = &named {
            crate::validate::user(u).map_err(|e| E2bError::bad_request(e.to_string()))?;
        }
        Ok(Envd { id: sb.id, explicit_user: named.is_some(), user: named.or(sb.user) })
    }
}

/// The live sandbox whose access token signed this `/files` URL.
async fn signed_sandbox(core: &Core, parts: &Parts) -> Result<abx_api::Sandbox, E2bError> {
    let all = core.execute(Command::ListSandboxes).await.and_then(|o| o.sandboxes()).map_err(E2bError::from)?;
    all.into_iter()
        .filter(|sb| control::e2b_state(sb.state).is_some())
        .find(|sb| signed_url_ok(core, &sb.id, parts))
        .ok_or_else(|| E2bError::new(StatusCode::UNAUTHORIZED, "invalid or expired file URL signature"))
}

/// Whether a request is for a sandbox's envd (E2B's in-sandbox API) rather than the
/// control plane: an envd path (`/health`, `/files`, `/process.Process/*`,
/// `/filesystem.Filesystem/*`) that names a sandbox (`E2b-Sandbox-Id`, or a
/// `<port>-<id>.<domain>` host), or a signed `/files` URL. Such requests carry no API key;
/// the router authenticates them by the sandbox's access token or the URL's signature.
/// Only these may skip a listener's API-key check: other paths with a sandbox header are
/// control-plane (or agentbox API) requests and need the key.
pub fn is_envd_request(uri: &axum::http::Uri, headers: &HeaderMap) -> bool {
    let p = uri.path();
    let envd_path = matches!(p, "/health" | "/files")
        || p.starts_with("/process.Process/")
        || p.starts_with("/filesystem.Filesystem/");
    envd_path && (envd_target(headers).is_some() || (p == "/files" && query_param(uri.query(), "signature").is_some()))
}

/// The user of `Authorization: Basic base64("user:")` (envd's way of naming the user).
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let user = s.split(':').next().unwrap_or("").to_string();
    (!user.is_empty()).then_some(user)
}

/// One decoded query parameter.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_pairs(query?).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// `application/x-www-form-urlencoded` pairs, decoded.
pub fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit() => {
                out.push(hex_val(b[i + 1]) << 4 | hex_val(b[i + 2]));
                i += 3;
                continue;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// A `/files` URL signed with the sandbox's access token (the SDK's `download_url` and
/// `upload_url`): `v1_` + unpadded base64 of SHA-256("path:operation:user:token[:expiration]").
fn signed_url_ok(core: &Core, id: &str, parts: &Parts) -> bool {
    use sha2::Digest;
    let q = parts.uri.query();
    let (Some(sig), Some(path)) = (query_param(q, "signature"), query_param(q, "path")) else { return false };
    let op = if parts.method == axum::http::Method::GET { "read" } else { "write" };
    let user = query_param(q, "username").unwrap_or_default();
    let token = sandbox_token(core, id);
    let raw = match query_param(q, "signature_expiration") {
        Some(exp) => {
            let Ok(e) = exp.parse::<u64>() else { return false };
            if e < crate::sandbox::now() {
                return false;
            }
            format!("{path}:{op}:{user}:{token}:{exp}")
        }
        None => format!("{path}:{op}:{user}:{token}"),
    };
    let digest = sha2::Sha256::digest(raw.as_bytes());
    let want = format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest));
    want.len() == sig.len() && want.bytes().zip(sig.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_headers_and_host() {
        let mut h = HeaderMap::new();
        h.insert("e2b-sandbox-id", "abc123".parse().unwrap());
        assert_eq!(envd_target(&h), Some(("abc123".into(), ENVD_PORT)));
        h.insert("e2b-sandbox-port", "8080".parse().unwrap());
        assert_eq!(envd_target(&h), Some(("abc123".into(), 8080)));
        let mut h = HeaderMap::new();
        h.insert("host", "49983-abc123.sandbox.local:7480".parse().unwrap());
        assert_eq!(envd_target(&h), Some(("abc123".into(), ENVD_PORT)));
        h.insert("host", "127.0.0.1:7480".parse().unwrap());
        assert_eq!(envd_target(&h), None);
    }

    #[test]
    fn only_envd_paths_skip_the_api_key() {
        let mut h = HeaderMap::new();
        h.insert("e2b-sandbox-id", "abc123".parse().unwrap());
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        assert!(is_envd_request(&uri("/files?path=/a"), &h));
        assert!(is_envd_request(&uri("/process.Process/Start"), &h));
        assert!(!is_envd_request(&uri("/v1/system"), &h), "a sandbox header does not open the daemon's API");
        assert!(!is_envd_request(&uri("/sandboxes"), &h));
        let none = HeaderMap::new();
        assert!(is_envd_request(&uri("/files?path=/a&signature=v1_x"), &none));
        assert!(!is_envd_request(&uri("/files?path=/a"), &none));
    }

    #[test]
    fn form_decoding() {
        assert_eq!(percent_decode("a%3Db%26c+d%"), "a=b&c d%");
        let pairs = form_pairs("metadata=k%3Dv%2520x&limit=2");
        assert_eq!(pairs[0], ("metadata".into(), "k=v%20x".into()));
        assert_eq!(form_pairs(&pairs[0].1), vec![("k".to_string(), "v x".to_string())]);
    }
}
