//! The ingress proxy: HTTP/1.1 from clients on the host to ports inside sandboxes.
//!
//! A request names its sandbox and port in one of two ways, tried in this order:
//! 1. the e2b SDK's headers `E2b-Sandbox-Id` and `E2b-Sandbox-Port` (both needed);
//! 2. a host name `<port>-<id>.<domain>`, e.g. `3000-mybox.agentbox.localhost`
//!    (browsers resolve `*.localhost` to loopback, so no DNS set-up is needed).
//!
//! A sandbox whose ports are not public (`ingress: token`) is reached only by requests
//! that carry its token in the header `E2b-Traffic-Access-Token` (the e2b SDK's name);
//! the header is removed before the request goes on to the sandbox.
//!
//! Each request gets its own connection to the sandbox; bodies stream both ways without
//! being buffered whole. An upgrade (WebSocket) that the sandbox accepts with
//! `101 Switching Protocols` becomes a byte tunnel between the two connections.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::{Extensions, Method, Uri, uri};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a sandbox port has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to send a request head (against idle or trickling clients).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const SANDBOX_ID: HeaderName = HeaderName::from_static("e2b-sandbox-id");
const SANDBOX_PORT: HeaderName = HeaderName::from_static("e2b-sandbox-port");
/// The header that carries a sandbox's ingress token.
pub const ACCESS_TOKEN: HeaderName = HeaderName::from_static("e2b-traffic-access-token");

/// The browser form of the token: a query parameter of that name is turned into a cookie
/// of that name (a browser cannot send a header), which later requests carry.
pub const TOKEN_PARAM: &str = "agentbox_token";
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one connection rather than the message (RFC 9110 section 7.6.1),
/// plus the de-facto `Keep-Alive` and `Proxy-Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Bodies sent to clients: a sandbox's streamed body or a message of the proxy's own.
type Body = Either<Incoming, Full<Bytes>>;

/// Why the proxy does not reach a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No running or paused sandbox has that id or name.
    NotFound,
    /// Its ports need its token, and the request carried none or another.
    Unauthorized,
}

/// Finds sandboxes for the proxy.
pub trait Router: Send + Sync + 'static {
    /// The address of sandbox `id` (a sandbox id or name as given by the client), for a
    /// request from `peer` to its `port` that carried `token` (the value of
    /// `E2b-Traffic-Access-Token`). Nothing about the sandbox changes (a paused one is not
    /// resumed) unless the token fits; a sandbox found is told of the visit (its audit).
    /// A paused one is resumed before the answer, as an API call would (under the
    /// sandbox's operation lock), hence a future.
    fn lookup<'a>(&'a self, id: &'a str, port: u16, peer: SocketAddr, token: Option<&'a [u8]>) -> Lookup<'a>;
}

/// What [`Router::lookup`] answers.
pub type Lookup<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Ipv4Addr, Refusal>> + Send + 'a>>;

/// A running ingress proxy. Dropping it stops it too, without waiting.
pub struct Ingress {
    addr: SocketAddr,
    tasks: Tasks,
}

impl Ingress {
    /// Serves on `listener`; `domain` is the suffix for host-name routing (e.g. "agentbox.localhost").
    /// Must be called within a tokio runtime.
    pub fn start(listener: TcpListener, domain: String, router: Arc<dyn Router>) -> Ingress {
        // getsockname on a bound socket fails only for a bad descriptor, which a TcpListener never holds.
        let addr = listener.local_addr().expect("a bound listener has a local address");
        let tasks = Tasks { tracker: TaskTracker::new(), token: CancellationToken::new() };
        let domain = domain.trim_matches('.').to_ascii_lowercase();
        let shared = Arc::new(Shared { domain, router, tasks: tasks.clone() });
        tasks.spawn(accept_loop(listener, shared));
        Ingress { addr, tasks }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, aborts every connection and tunnel, and waits until they are gone.
    pub async fn shutdown(self) {
        self.tasks.token.cancel();
        self.tasks.tracker.close();
        self.tasks.tracker.wait().await;
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        self.tasks.token.cancel();
    }
}

/// Parses `<port>-<id>.<domain>` (optionally with `:port` after it; the domain matches in
/// any case) into (port, id). The id comes back as sent: a sandbox name may have capitals
/// (browsers send host names in lower case: the proxy tries the id in lower case too).
pub fn parse_host(host: &str, domain: &str) -> Option<(u16, String)> {
    let domain = domain.trim_matches('.').to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((name, port)) => parse_port(port).map(|_| name)?,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let cut = name.len().checked_sub(domain.len())?;
    let (label, suffix) = (name.get(..cut)?, name.get(cut..)?);
    if !suffix.eq_ignore_ascii_case(&domain) {
        return None;
    }
    let (port, id) = label.strip_suffix('.')?.split_once('-')?;
    let port = parse_port(port)?;
    (!id.is_empty()).then(|| (port, id.to_string()))
}

/// A TCP port in decimal: 1-65535, digits only.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&p| p != 0)
}

/// Every task of one proxy: cancelled together, and waited for on shutdown.
#[derive(Clone)]
struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Tasks {
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            token.run_until_cancelled(fut).await;
        });
    }
}

struct Shared {
    domain: String,
    router: Arc<dyn Router>,
    tasks: Tasks,
}

/// A port in a sandbox; displays as "port P in sandbox ID" for messages.
#[derive(Debug, Clone)]
struct Target {
    id: String,
    port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "port {} in sandbox {}", self.port, self.id)
    }
}

#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no sandbox '{0}'; `agentbox ls` lists sandboxes")]
    NotFound(String),
    #[error(
        "the ports of sandbox '{0}' need its token: send it in the header E2b-Traffic-Access-Token, \
         or open the URL once with ?agentbox_token=TOKEN in a browser (`agentbox port` prints it; it \
         is the sandbox's `ingress_token`)"
    )]
    Unauthorized(String),
    #[error("nothing listens on {0}")]
    Refused(Target),
    #[error("cannot connect to {target}")]
    Connect {
        target: Target,
        #[source]
        source: io::Error,
    },
    #[error("{0} did not accept a connection within {secs}s", secs = CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout(Target),
    #[error("{target} did not answer the request")]
    Backend {
        target: Target,
        #[source]
        source: hyper::Error,
    },
    #[error("{0} switched protocols although the request asked for no upgrade")]
    UnaskedUpgrade(Target),
}

impl ProxyError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ProxyError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            _ => (StatusCode::BAD_GATEWAY, "bad_gateway"),
        }
    }

    /// The message with its chain of causes.
    fn message(&self) -> String {
        crate::error::chain_text(self)
    }

    fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({ "error": { "code": code, "message": self.message() } });
        let mut resp = Response::new(Either::Right(Full::from(body.to_string())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => shared.tasks.spawn(serve_client(stream, peer, shared.clone())),
            Err(e) => {
                tracing::warn!(error = %e, "ingress: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn serve_client(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(shared.proxy(req, peer).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).with_upgrades().await {
        tracing::debug!(%peer, error = %e, "ingress: client connection ended");
    }
}

impl Shared {
    async fn proxy(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = self.forward(req, peer).await.unwrap_or_else(|e| {
            tracing::debug!(%peer, %method, path, error = %e.message(), "ingress: request refused");
            e.into_response()
        });
        tracing::debug!(%peer, %method, path, status = resp.status().as_u16(), "ingress");
        resp
    }

    async fn forward(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported: this is a reverse proxy to ports in sandboxes".to_string(),
            ));
        }
        let (port, id) = route(req.uri(), req.headers(), &self.domain)?;
        let refused = |r| match r {
            Refusal::NotFound => ProxyError::NotFound(id.clone()),
            Refusal::Unauthorized => ProxyError::Unauthorized(id.clone()),
        };
        // A token in the query (a link opened in a browser) becomes a cookie of the host
        // (`<port>-<id>.<domain>`): checked, then the same URL without it, once.
        if !req.headers().contains_key(ACCESS_TOKEN)
            && let Some((token, rest)) = query_token(req.uri())
        {
            lookup(self.router.as_ref(), &id, (port, peer), Some(token.as_bytes())).await.map_err(refused)?;
            return Ok(token_redirect(&token, &rest));
        }
        let cookie = if req.headers().contains_key(ACCESS_TOKEN) { None } else { cookie_token(req.headers()) };
        let token = req.headers().get(ACCESS_TOKEN).map(|v| v.as_bytes()).or(cookie.as_deref().map(str::as_bytes));
        let ip = lookup(self.router.as_ref(), &id, (port, peer), token).await.map_err(refused)?;
        let target = Target { id, port };
        let client_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let req = backend_request(req, peer, client_upgrade.is_some());
        let mut sender = self.connect(SocketAddrV4::new(ip, port), &target).await?;
        let mut resp =
            sender.send_request(req).await.map_err(|source| ProxyError::Backend { target: target.clone(), source })?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(client_response(resp));
        }
        let client = client_upgrade.ok_or_else(|| ProxyError::UnaskedUpgrade(target.clone()))?;
        let backend = hyper::upgrade::on(&mut resp);
        self.tasks.spawn(splice(client, backend, target));
        Ok(switching_response(resp))
    }

    /// Opens the connection for one request; its driver runs as a task of the proxy.
    async fn connect(&self, addr: SocketAddrV4, target: &Target) -> Result<SendRequest<Incoming>, ProxyError> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(ProxyError::Refused(target.clone()));
            }
            Ok(Err(source)) => return Err(ProxyError::Connect { target: target.clone(), source }),
            Err(_) => return Err(ProxyError::ConnectTimeout(target.clone())),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ProxyError::Backend { target: target.clone(), source })?;
        self.tasks.spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "ingress: sandbox connection ended");
            }
        });
        Ok(sender)
    }
}

/// The address of sandbox `id` as the client wrote it, else in lower case (host names are
/// case-insensitive; ids are lower case, names as their owner chose).
async fn lookup(
    router: &dyn Router,
    id: &str,
    to: (u16, SocketAddr),
    token: Option<&[u8]>,
) -> Result<Ipv4Addr, Refusal> {
    match router.lookup(id, to.0, to.1, token).await {
        Err(Refusal::NotFound) if id.bytes().any(|b| b.is_ascii_uppercase()) => {
            router.lookup(&id.to_ascii_lowercase(), to.0, to.1, token).await
        }
        found => found,
    }
}

/// The (port, id) a request is for: by the E2b-Sandbox-* headers, else by host name.
fn route(uri: &Uri, headers: &HeaderMap, domain: &str) -> Result<(u16, String), ProxyError> {
    let by_headers = header_route(headers);
    if let Ok(Some(found)) = by_headers {
        return Ok(found);
    }
    let host = request_host(uri, headers);
    if let Some(found) = host.and_then(|h| parse_host(h, domain)) {
        return Ok(found);
    }
    let mut msg = format!(
        "cannot tell which sandbox port to reach: use a host name <port>-<sandbox id>.{domain} \
         (e.g. 3000-mybox.{domain}) or send the headers E2b-Sandbox-Id and E2b-Sandbox-Port"
    );
    match host {
        Some(h) => msg.push_str(&format!("; the host was '{h}'")),
        None => msg.push_str("; the request has no host"),
    }
    if let Err(problem) = by_headers {
        msg.push_str("; ");
        msg.push_str(&problem);
    }
    Err(ProxyError::BadRequest(msg))
}

/// Routing by headers: None if neither is sent, an explanation if they are incomplete or invalid.
fn header_route(headers: &HeaderMap) -> Result<Option<(u16, String)>, String> {
    let (id, port) = match (headers.get(SANDBOX_ID), headers.get(SANDBOX_PORT)) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err("E2b-Sandbox-Id was sent without E2b-Sandbox-Port".to_string()),
        (None, Some(_)) => return Err("E2b-Sandbox-Port was sent without E2b-Sandbox-Id".to_string()),
        (Some(id), Some(port)) => (id, port),
    };
    let id = id.to_str().map(str::trim).unwrap_or_default();
    if id.is_empty() {
        return Err("E2b-Sandbox-Id is empty or not text".to_string());
    }
    let port_text = String::from_utf8_lossy(port.as_bytes());
    let port = parse_port(port_text.trim())
        .ok_or_else(|| format!("E2b-Sandbox-Port '{port_text}' is not a port number (1-65535)"))?;
    Ok(Some((port, id.to_string())))
}

/// The host a request is for: the authority of an absolute URI, else the Host header.
fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    match uri.authority() {
        Some(authority) => Some(authority.as_str()),
        None => headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    }
}

/// Whether the client asks to switch protocols (`Connection: upgrade` and `Upgrade`).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect();
    for name in named.into_iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Keeps an upgrade across the proxy: `Connection: upgrade` and the original `Upgrade` value.
fn restore_upgrade(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// The request as the sandbox gets it: origin-form URI, end-to-end headers, X-Forwarded-*.
fn backend_request(req: Request<Incoming>, peer: SocketAddr, upgrade: bool) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let host = request_host(&parts.uri, &parts.headers).and_then(|h| HeaderValue::from_str(h).ok());
    let upgrade = if upgrade { parts.headers.get(header::UPGRADE).cloned() } else { None };
    let forwarded_for = forwarded_for(&parts.headers, peer);
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    parts.extensions = Extensions::new();
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    headers.remove(SANDBOX_ID);
    headers.remove(SANDBOX_PORT);
    headers.remove(ACCESS_TOKEN);
    strip_token_cookie(headers);
    // This proxy already answered any `Expect: 100-continue` itself by reading the body.
    headers.remove(header::EXPECT);
    restore_upgrade(headers, upgrade);
    if let Some(host) = host {
        headers.insert(header::HOST, host.clone());
        headers.insert(X_FORWARDED_HOST, host);
    }
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    Request::from_parts(parts, body)
}

/// The token in the query (`?agentbox_token=T`), and the path and query without it.
fn query_token(uri: &Uri) -> Option<(String, String)> {
    let query = uri.query()?;
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((TOKEN_PARAM, value)) if token.is_none() => token = Some(value.to_string()),
            _ => rest.push(pair),
        }
    }
    let token = token.filter(|t| !t.is_empty())?;
    let path = if uri.path().is_empty() { "/" } else { uri.path() };
    Some((token, if rest.is_empty() { path.to_string() } else { format!("{path}?{}", rest.join("&")) }))
}

/// 303 to `location` setting the token cookie (HttpOnly; the ingress speaks plain HTTP, so
/// not Secure; SameSite=Lax: sent when a link to the host is followed).
fn token_redirect(token: &str, location: &str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::from(Bytes::new())));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    let cookie = format!("{TOKEN_PARAM}={token}; Path=/; HttpOnly; SameSite=Lax");
    if let (Ok(cookie), Ok(location)) = (HeaderValue::from_str(&cookie), HeaderValue::from_str(location)) {
        resp.headers_mut().insert(header::SET_COOKIE, cookie);
        resp.headers_mut().insert(header::LOCATION, location);
    }
    resp
}

/// The token cookie's value, if the request has one.
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(TOKEN_PARAM)?.strip_prefix('=').map(str::to_string))
}

/// Removes the token cookie from what the sandbox receives (other cookies stay).
fn strip_token_cookie(headers: &mut HeaderMap) {
    if cookie_token(headers).is_none() {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(&format!("{TOKEN_PARAM}=")))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

/// X-Forwarded-For: the client's address appended to what earlier proxies recorded.
fn forwarded_for(headers: &HeaderMap, peer: SocketAddr) -> Option<HeaderValue> {
    let mut chain: Vec<&str> = headers.get_all(X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
    let ip = peer.ip().to_canonical().to_string();
    chain.push(&ip);
    HeaderValue::from_str(&chain.join(", ")).ok()
}

/// The path and query of `uri` alone, as sent to an origin server.
fn origin_form(uri: &Uri) -> Uri {
    let mut parts = uri::Parts::default();
    parts.path_and_query = Some(uri.path_and_query().cloned().unwrap_or_else(|| uri::PathAndQuery::from_static("/")));
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// A sandbox's ordinary answer, streamed on to the client.
fn client_response(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
}

/// A sandbox's `101 Switching Protocols`, passed on with its upgrade headers.
fn switching_response(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, _empty) = resp.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    restore_upgrade(&mut parts.headers, upgrade);
    Response::from_parts(parts, Either::Right(Full::default()))
}

/// Joins the two upgraded connections once both sides have switched protocols.
async fn splice(client: OnUpgrade, backend: OnUpgrade, target: Target) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(%target, error = %e, "ingress: upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        Ok((up, down)) => tracing::debug!(%target, up, down, "ingress: tunnel closed"),
        Err(e) => tracing::debug!(%target, error = %e, "ingress: tunnel failed"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const DOMAIN: &str = "agentbox.localhost";
    const A: &str = "aaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbb";
    const A_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
    const B_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
    /// Sandbox B's ports need this token (A's are public).
    const B_TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";
    const PATIENCE: Duration = Duration::from_secs(10);

    /// Sandboxes by id, and the tokens of those whose ports need one.
    struct MapRouter(HashMap<String, Ipv4Addr>, HashMap<String, &'static str>);

    impl Router for MapRouter {
        fn lookup<'a>(&'a self, id: &'a str, _: u16, _: SocketAddr, token: Option<&'a [u8]>) -> Lookup<'a> {
            let found = self.0.get(id).copied().ok_or(Refusal::NotFound).and_then(|ip| match self.1.get(id) {
                Some(want) if token != Some(want.as_bytes()) => Err(Refusal::Unauthorized),
                _ => Ok(ip),
            });
            Box::pin(std::future::ready(found))
        }
    }

    /// A sandbox's server: `/echo` streams the request body back, a request with `Upgrade`
    /// switches to echoing bytes, anything else answers which backend it is, the path and headers.
    async fn backend(name: &'static str, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        if let Some(protocol) = req.headers().get(header::UPGRADE).cloned() {
            let upgrade = hyper::upgrade::on(req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(upgrade.await.unwrap());
                let (mut read, mut write) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
            let mut resp = Response::new(Either::Right(Full::default()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut().insert(header::UPGRADE, protocol);
            return Ok(resp);
        }
        if req.uri().path() == "/echo" {
            return Ok(Response::new(Either::Left(req.into_body())));
        }
        let headers: serde_json::Map<String, serde_json::Value> =
            req.headers().iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())).collect();
        let path = req.uri().path_and_query().map(|p| p.to_string());
        let body = serde_json::json!({ "backend": name, "path": path, "headers": headers });
        Ok(Response::new(Either::Right(Full::from(body.to_string()))))
    }

    async fn serve_backend(listener: TcpListener, name: &'static str) {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| backend(name, req));
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let _ = conn.with_upgrades().await;
            });
        }
    }

    /// Starts backends "a" on 127.0.0.2 and "b" on 127.0.0.3, both on the returned port.
    async fn start_backends() -> u16 {
        for _ in 0..20 {
            let a = TcpListener::bind((A_IP, 0)).await.unwrap();
            let port = a.local_addr().unwrap().port();
            let Ok(b) = TcpListener::bind((B_IP, port)).await else { continue };
            tokio::spawn(serve_backend(a, "a"));
            tokio::spawn(serve_backend(b, "b"));
            return port;
        }
        panic!("no port free on both 127.0.0.2 and 127.0.0.3");
    }

    /// Backends and a proxy in front of them; returns the proxy and the backends' port.
    async fn setup() -> (Ingress, u16) {
        setup_with_tokens(HashMap::new()).await
    }

    /// The same, with the ports of the sandboxes in `tokens` needing those tokens.
    async fn setup_with_tokens(tokens: HashMap<String, &'static str>) -> (Ingress, u16) {
        let port = start_backends().await;
        let router = MapRouter(HashMap::from([(A.to_string(), A_IP), (B.to_string(), B_IP)]), tokens);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        (Ingress::start(listener, DOMAIN.to_string(), Arc::new(router)), port)
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        /// The `error` object of a JSON error answer, checked to have `code`.
        fn error(&self, code: &str) -> String {
            assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
            let json = self.json();
            assert_eq!(json["error"]["code"], code, "{json}");
            json["error"]["message"].as_str().unwrap().to_string()
        }
    }

    /// Sends one request through the proxy with hyper's client.
    async fn send(proxy: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Answer {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let exchange = async {
            let resp = sender.send_request(req.body(Full::new(body)).unwrap()).await.unwrap();
            let (parts, body) = resp.into_parts();
            Answer { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
        };
        tokio::time::timeout(PATIENCE, exchange).await.expect("the proxy answers in time")
    }

    async fn get(proxy: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
        send(proxy, Method::GET, path, headers, Bytes::new()).await
    }

    /// Reads from `stream` into `buf` until `buf` contains `needle`.
    async fn read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
        let read = async {
            while !buf.windows(needle.len()).any(|w| w == needle) {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed before {:?}; got {:?}", needle, String::from_utf8_lossy(buf));
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(PATIENCE, read).await.expect("the expected bytes arrive in time");
    }

    #[test]
    fn parse_host_accepts_port_id_domain() {
        assert_eq!(parse_host("3000-abc.agentbox.localhost", DOMAIN), Some((3000, "abc".into())));
        assert_eq!(parse_host("3000-abc.agentbox.localhost:8080", DOMAIN), Some((3000, "abc".into())));
        assert_eq!(parse_host("1-a.agentbox.localhost.", DOMAIN), Some((1, "a".into())));
        assert_eq!(parse_host("65535-my-box.agentbox.localhost", DOMAIN), Some((65535, "my-box".into())));
        assert_eq!(parse_host("80-my.box.agentbox.localhost", DOMAIN), Some((80, "my.box".into())));
        assert_eq!(parse_host("80-x.example.com", ".Example.COM."), Some((80, "x".into())));
    }

    #[test]
    fn parse_host_ignores_the_case_of_the_domain_and_keeps_the_ids() {
        assert_eq!(parse_host("3000-ABC.AgentBox.LOCALHOST:80", DOMAIN), Some((3000, "ABC".into())));
        assert_eq!(parse_host("3000-abc.agentbox.localhost", "AGENTBOX.localhost"), Some((3000, "abc".into())));
        assert_eq!(parse_host("3000-abc.agentbox.localhost", "agentbox.localhost"), Some((3000, "abc".into())));
        assert_eq!(parse_host("3000-é.agentbox.localhost", DOMAIN), Some((3000, "é".into())));
        assert_eq!(parse_host("é.localhost", DOMAIN), None);
    }

    /// Guards that a sandbox named with capitals is reachable by host name: the id used
    /// to be lowercased before the (case-sensitive) lookup, so `8000-MyBox.<domain>` got
    /// 404 "no sandbox 'mybox'". Lower-case ids still work from a host name in capitals.
    #[tokio::test]
    async fn names_with_capitals_are_found() {
        let router = MapRouter(HashMap::from([("MyBox".to_string(), A_IP), (A.to_string(), B_IP)]), HashMap::new());
        let to = (8000, SocketAddr::from(([127, 0, 0, 1], 40000)));
        let (_, id) = parse_host("8000-MyBox.agentbox.localhost", DOMAIN).unwrap();
        assert_eq!(lookup(&router, &id, to, None).await, Ok(A_IP));
        let (_, id) = parse_host(&format!("8000-{}.agentbox.localhost", A.to_ascii_uppercase()), DOMAIN).unwrap();
        assert_eq!(lookup(&router, &id, to, None).await, Ok(B_IP));
        assert_eq!(lookup(&router, "mybox", to, None).await, Err(Refusal::NotFound));
    }

    #[test]
    fn parse_host_refuses_missing_parts() {
        for host in [
            "",
            "agentbox.localhost",
            ".agentbox.localhost",
            "3000.agentbox.localhost",
            "3000-.agentbox.localhost",
            "-abc.agentbox.localhost",
            "abc.agentbox.localhost",
            "abc-3000.agentbox.localhost",
            "3000-abc.agentbox.localhost:",
            "3000-abc.agentbox.localhost:http",
        ] {
            assert_eq!(parse_host(host, DOMAIN), None, "{host:?}");
        }
    }

    #[test]
    fn parse_host_refuses_other_domains() {
        for host in [
            "3000-abc.localhost",
            "3000-abc.xagentbox.localhost",
            "3000-abc.agentbox.localhost.evil.com",
            "3000-abc.agentbox.local",
            "localhost:3000",
            "127.0.0.1:3000",
        ] {
            assert_eq!(parse_host(host, DOMAIN), None, "{host:?}");
        }
    }

    #[test]
    fn parse_host_refuses_bad_ports() {
        for host in [
            "0-abc.agentbox.localhost",
            "65536-abc.agentbox.localhost",
            "99999-abc.agentbox.localhost",
            "100000-abc.agentbox.localhost",
            "+80-abc.agentbox.localhost",
            "8o-abc.agentbox.localhost",
            "80-abc.agentbox.localhost:65536",
            "80-abc.agentbox.localhost:0",
        ] {
            assert_eq!(parse_host(host, DOMAIN), None, "{host:?}");
        }
    }

    #[tokio::test]
    async fn host_name_routes_to_the_right_sandbox() {
        let (proxy, port) = setup().await;
        let addr = proxy.local_addr();
        for (id, name) in [(A, "a"), (B, "b")] {
            let host = format!("{port}-{id}.{DOMAIN}");
            let answer = get(addr, "/hello?x=1", &[("host", &host)]).await;
            assert_eq!(answer.status, StatusCode::OK);
            let json = answer.json();
            assert_eq!(json["backend"], name);
            assert_eq!(json["path"], "/hello?x=1");
            assert_eq!(json["headers"]["host"], host.as_str());
        }
        let host = format!("{port}-{}.AgentBox.Localhost:{}", B.to_uppercase(), addr.port());
        assert_eq!(get(addr, "/", &[("host", &host)]).await.json()["backend"], "b");
        proxy.shutdown().await;
    }

    /// Guards the ingress token: without it, anyone who reached the proxy reached every
    /// sandbox's ports, whoever owned the sandbox.
    #[tokio::test]
    async fn a_sandbox_whose_ports_need_a_token_is_reached_only_with_it() {
        let (proxy, port) = setup_with_tokens(HashMap::from([(B.to_string(), B_TOKEN)])).await;
        let addr = proxy.local_addr();
        let host_b = format!("{port}-{B}.{DOMAIN}");
        let port = port.to_string();
        let by_headers = [("E2b-Sandbox-Id", B), ("E2b-Sandbox-Port", port.as_str())];
        let wrong = &B_TOKEN[1..];
        for headers in [
            vec![("host", host_b.as_str())],
            vec![("host", host_b.as_str()), ("E2b-Traffic-Access-Token", "")],
            vec![("host", host_b.as_str()), ("E2b-Traffic-Access-Token", wrong)],
            by_headers.to_vec(),
        ] {
            let answer = get(addr, "/", &headers).await;
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{headers:?}");
            let msg = answer.error("unauthorized");
            assert!(msg.contains("E2b-Traffic-Access-Token") && msg.contains(B), "{msg}");
        }
        for headers in [
            vec![("host", host_b.as_str()), ("E2b-Traffic-Access-Token", B_TOKEN)],
            [by_headers.as_slice(), &[("e2b-traffic-access-token", B_TOKEN)]].concat(),
        ] {
            let answer = get(addr, "/", &headers).await;
            assert_eq!(answer.status, StatusCode::OK, "{headers:?}");
            let json = answer.json();
            assert_eq!(json["backend"], "b");
            assert!(json["headers"].get("e2b-traffic-access-token").is_none(), "the token reached the sandbox: {json}");
        }
        // A browser: the token in the query once (checked, then a cookie of the host and
        // the same URL without it), then the cookie, which the sandbox does not see.
        let answer = get(addr, &format!("/app?x=1&{TOKEN_PARAM}={wrong}"), &[("host", &host_b)]).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "a wrong token in the query");
        let answer = get(addr, &format!("/app?x=1&{TOKEN_PARAM}={B_TOKEN}&y=2"), &[("host", &host_b)]).await;
        assert_eq!(answer.status, StatusCode::SEE_OTHER);
        assert_eq!(answer.headers[header::LOCATION], "/app?x=1&y=2");
        let cookie = answer.headers[header::SET_COOKIE].to_str().unwrap().to_string();
        assert!(cookie.starts_with(&format!("{TOKEN_PARAM}={B_TOKEN};")) && cookie.contains("HttpOnly"), "{cookie}");
        let jar = format!("theme=dark; {TOKEN_PARAM}={B_TOKEN}; lang=en");
        let answer = get(addr, "/app?x=1&y=2", &[("host", &host_b), ("cookie", &jar)]).await;
        assert_eq!(answer.status, StatusCode::OK);
        let json = answer.json();
        assert_eq!((json["backend"].as_str(), json["path"].as_str()), (Some("b"), Some("/app?x=1&y=2")));
        assert_eq!(json["headers"]["cookie"], "theme=dark; lang=en", "the token cookie is not passed on: {json}");
        let stale = format!("{TOKEN_PARAM}={wrong}");
        assert_eq!(get(addr, "/", &[("host", &host_b), ("cookie", &stale)]).await.status, StatusCode::UNAUTHORIZED);
        // Public ports need nothing, and a token sent along is not passed on either.
        let host_a = format!("{port}-{A}.{DOMAIN}");
        let answer = get(addr, "/", &[("host", &host_a), ("E2b-Traffic-Access-Token", B_TOKEN)]).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.json()["headers"].get("e2b-traffic-access-token").is_none());
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn forwarded_headers_are_set_and_hop_by_hop_dropped() {
        let (proxy, port) = setup().await;
        let host = format!("{port}-{A}.{DOMAIN}");
        let headers = [
            ("host", host.as_str()),
            ("x-echo", "kept"),
            ("connection", "x-drop-me"),
            ("x-drop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eDp5"),
            ("x-forwarded-for", "10.0.0.9"),
            ("e2b-sandbox-id", A),
        ];
        let json = get(proxy.local_addr(), "/h", &headers).await.json();
        let seen = json["headers"].as_object().unwrap();
        assert_eq!(seen["x-echo"], "kept");
        assert_eq!(seen["x-forwarded-for"], "10.0.0.9, 127.0.0.1");
        assert_eq!(seen["x-forwarded-host"], host.as_str());
        assert_eq!(seen["x-forwarded-proto"], "http");
        for dropped in ["connection", "x-drop-me", "keep-alive", "proxy-authorization", "e2b-sandbox-id"] {
            assert!(!seen.contains_key(dropped), "{dropped} reached the sandbox: {json}");
        }
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn headers_route_before_the_host_and_are_stripped() {
        let (proxy, port) = setup().await;
        let port = port.to_string();
        let host_a = format!("{port}-{A}.{DOMAIN}");
        for host in ["localhost:49983", host_a.as_str()] {
            let headers = [("host", host), ("E2b-Sandbox-Id", B), ("E2b-Sandbox-Port", port.as_str())];
            let answer = get(proxy.local_addr(), "/by-header", &headers).await;
            assert_eq!(answer.status, StatusCode::OK);
            let json = answer.json();
            assert_eq!(json["backend"], "b");
            assert_eq!(json["path"], "/by-header");
            assert_eq!(json["headers"]["host"], host);
            assert!(json["headers"].get("e2b-sandbox-id").is_none(), "{json}");
            assert!(json["headers"].get("e2b-sandbox-port").is_none(), "{json}");
        }
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn unknown_sandbox_is_404() {
        let (proxy, port) = setup().await;
        let host = format!("{port}-cccccccccccc.{DOMAIN}");
        let answer = get(proxy.local_addr(), "/", &[("host", &host)]).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert!(answer.error("not_found").contains("'cccccccccccc'"));

        let headers = [("host", "localhost"), ("e2b-sandbox-id", "dddddddddddd"), ("e2b-sandbox-port", "80")];
        let answer = get(proxy.local_addr(), "/", &headers).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert!(answer.error("not_found").contains("'dddddddddddd'"));
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn no_route_is_400() {
        let (proxy, _) = setup().await;
        let addr = proxy.local_addr();
        let answer = get(addr, "/", &[("host", &addr.to_string())]).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        let msg = answer.error("bad_request");
        assert!(msg.contains("<port>-<sandbox id>.agentbox.localhost"), "{msg}");
        assert!(msg.contains("E2b-Sandbox-Id and E2b-Sandbox-Port"), "{msg}");
        assert!(msg.contains(&format!("'{addr}'")), "{msg}");

        let answer = get(addr, "/", &[("host", "localhost"), ("e2b-sandbox-id", A)]).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        let msg = answer.error("bad_request");
        assert!(msg.contains("E2b-Sandbox-Id was sent without E2b-Sandbox-Port"), "{msg}");

        let headers = [("host", "localhost"), ("e2b-sandbox-id", A), ("e2b-sandbox-port", "70000")];
        let msg = get(addr, "/", &headers).await.error("bad_request");
        assert!(msg.contains("E2b-Sandbox-Port '70000' is not a port number"), "{msg}");
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn closed_port_is_502() {
        let (proxy, _) = setup().await;
        let closed = TcpListener::bind((A_IP, 0)).await.unwrap().local_addr().unwrap().port();
        let host = format!("{closed}-{A}.{DOMAIN}");
        let answer = get(proxy.local_addr(), "/", &[("host", &host)]).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        assert_eq!(answer.error("bad_gateway"), format!("nothing listens on port {closed} in sandbox {A}"));
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn post_body_passes_through() {
        let (proxy, port) = setup().await;
        let host = format!("{port}-{A}.{DOMAIN}");
        let body: Bytes = (0..1_000_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        let answer = send(proxy.local_addr(), Method::POST, "/echo", &[("host", &host)], body.clone()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.body == body, "the echoed body differs");
        proxy.shutdown().await;
    }

    /// Each chunk comes back before the next is sent: neither direction waits for the whole body.
    #[tokio::test]
    async fn bodies_stream_both_ways() {
        let (proxy, port) = setup().await;
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let head = format!(
            "POST /echo HTTP/1.1\r\nhost: {port}-{A}.{DOMAIN}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        read_until(&mut stream, &mut buf, b"hello").await;
        assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\n"), "{:?}", String::from_utf8_lossy(&buf));
        stream.write_all(b"5\r\nworld\r\n").await.unwrap();
        read_until(&mut stream, &mut buf, b"world").await;
        stream.write_all(b"0\r\n\r\n").await.unwrap();
        read_until(&mut stream, &mut buf, b"world\r\n0\r\n\r\n").await;
        proxy.shutdown().await;
    }

    /// Opens an upgraded tunnel to sandbox A's echo and checks bytes go both ways.
    async fn open_tunnel(proxy: SocketAddr, port: u16) -> TcpStream {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        let head = format!(
            "GET /ws HTTP/1.1\r\nhost: {port}-{A}.{DOMAIN}\r\nconnection: keep-alive, Upgrade\r\nupgrade: echo\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        read_until(&mut stream, &mut buf, b"\r\n\r\n").await;
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 101 switching protocols\r\n"), "{text}");
        assert!(text.contains("\r\nupgrade: echo\r\n") && text.contains("\r\nconnection: upgrade\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "bytes after the 101 head: {text}");
        for message in [&b"ping"[..], b"pong pong"] {
            stream.write_all(message).await.unwrap();
            let mut buf = Vec::new();
            read_until(&mut stream, &mut buf, message).await;
            assert_eq!(buf, message);
        }
        stream
    }

    #[tokio::test]
    async fn upgrade_is_spliced() {
        let (proxy, port) = setup().await;
        let mut stream = open_tunnel(proxy.local_addr(), port).await;
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty());
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn many_concurrent_clients() {
        let (proxy, port) = setup().await;
        let addr = proxy.local_addr();
        let clients: Vec<_> = (0..64)
            .map(|i| {
                tokio::spawn(async move {
                    let (id, name) = if i % 2 == 0 { (A, "a") } else { (B, "b") };
                    let host = format!("{port}-{id}.{DOMAIN}");
                    let json = get(addr, &format!("/{i}"), &[("host", &host)]).await.json();
                    assert_eq!(json["backend"], name);
                    assert_eq!(json["path"], format!("/{i}"));
                })
            })
            .collect();
        for client in clients {
            client.await.unwrap();
        }
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_closes_tunnels() {
        let (proxy, port) = setup().await;
        let addr = proxy.local_addr();
        let mut tunnel = open_tunnel(addr, port).await;
        tokio::time::timeout(PATIENCE, proxy.shutdown()).await.expect("shutdown finishes");
        let err = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(PATIENCE, tunnel.read_to_end(&mut rest)).await.expect("the tunnel closes");
        assert!(closed.is_err() || rest.is_empty());
    }
}
