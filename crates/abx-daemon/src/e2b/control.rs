//! E2B's control plane (the REST API the SDK calls at `E2B_API_URL`).

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use abx_api::{IngressAccess, NetMode, NetworkPolicy, SandboxState, TimeoutAction};

use super::time::{parse_rfc3339, rfc3339};
use super::{
    ApiKey, CLIENT_ID, DEFAULT_TIMEOUT_SECS, E2bError, ENVD_VERSION, form_pairs, percent_decode, sandbox_token,
};
use crate::core::{Command, Core};
use crate::error::CoreError;

type Result<T> = std::result::Result<T, E2bError>;

/// E2B's state of a sandbox; `None` for sandboxes E2B would not show (gone or dying).
pub fn e2b_state(s: SandboxState) -> Option<&'static str> {
    match s {
        SandboxState::Creating | SandboxState::Running | SandboxState::Starting => Some("running"),
        // A stopped sandbox is E2B's filesystem-only pause: resuming boots it again.
        SandboxState::Paused | SandboxState::Stopped | SandboxState::Stopping => Some("paused"),
        SandboxState::Exited | SandboxState::Destroying => None,
    }
}

/// A JSON body, possibly empty (`{}` then), in E2B's error shape when invalid.
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> Result<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| E2bError::bad_request(format!("invalid request body: {e}")))
}

/// The sandbox, as E2B would see it (404 for gone ones).
async fn sandbox(core: &Core, id: &str) -> Result<abx_api::Sandbox> {
    match core.execute(Command::GetSandbox { id: id.to_string() }).await.and_then(|o| o.sandbox()) {
        Ok(sb) if e2b_state(sb.state).is_some() => Ok(sb),
        Ok(_) | Err(CoreError::NotFound { .. }) => Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox \"{id}\" doesn't exist or you don't have access to it"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// `Sandbox` (create, connect, resume, fork answers).
fn created(core: &Core, sb: &abx_api::Sandbox) -> Value {
    json!({
        "templateID": sb.template,
        "sandboxID": sb.id,
        "alias": sb.template,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": sandbox_token(core, &sb.id),
        "trafficAccessToken": sb.ingress_token,
        "domain": null,
    })
}

fn host_cpus() -> u64 {
    std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1)
}

fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn cpu_count(sb: &abx_api::Sandbox) -> u64 {
    sb.limits.cpus.map(|c| c.ceil().max(1.0) as u64).unwrap_or_else(host_cpus)
}

fn memory_bytes(sb: &abx_api::Sandbox) -> u64 {
    sb.limits.memory_bytes.unwrap_or_else(host_memory_bytes)
}

/// `ListedSandbox`.
fn listed(sb: &abx_api::Sandbox) -> Value {
    json!({
        "templateID": sb.template,
        "alias": sb.template,
        "sandboxID": sb.id,
        "clientID": CLIENT_ID,
        "startedAt": rfc3339(sb.created_at),
        "endAt": rfc3339(end_at(sb)),
        "cpuCount": cpu_count(sb),
        "memoryMB": memory_bytes(sb) >> 20,
        "diskSizeMB": 0,
        "metadata": sb.metadata,
        "state": e2b_state(sb.state).unwrap_or("running"),
        "envdVersion": ENVD_VERSION,
        "volumeMounts": sb.volumes.iter().map(|v| json!({"name": v.name, "path": v.path})).collect::<Vec<_>>(),
    })
}

/// When the sandbox ends (far in the future when it has no timeout).
fn end_at(sb: &abx_api::Sandbox) -> u64 {
    sb.expires_at.unwrap_or(sb.created_at + 100 * 365 * 86_400)
}

/// `SandboxDetail`.
fn detail(core: &Core, sb: &abx_api::Sandbox) -> Value {
    let mut v = listed(sb);
    v["envdAccessToken"] = json!(sandbox_token(core, &sb.id));
    v["trafficAccessToken"] = json!(sb.ingress_token);
    v["domain"] = Value::Null;
    v["allowInternetAccess"] = json!(sb.network.mode != NetMode::None);
    v["network"] = network_info(&sb.network);
    v["network"]["allowPublicTraffic"] = json!(sb.ingress == IngressAccess::Public);
    v
}

/// The egress policy as E2B's `network` (allowOut / denyOut).
fn network_info(p: &NetworkPolicy) -> Value {
    match p.mode {
        NetMode::Public => json!({ "allowOut": p.allow }),
        NetMode::None | NetMode::Allow => json!({ "allowOut": p.allow, "denyOut": ["0.0.0.0/0"] }),
    }
}

/// E2B's `network` option of a create (and `PUT /sandboxes/{id}/network`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    #[serde(default)]
    allow_out: Option<Vec<String>>,
    #[serde(default)]
    deny_out: Option<Vec<String>>,
    #[serde(default)]
    allow_public_traffic: Option<bool>,
    #[serde(default)]
    rules: Option<Value>,
    #[serde(default)]
    egress_proxy: Option<Value>,
    #[serde(default)]
    dns_servers: Option<Vec<String>>,
}

/// E2B's egress options as an agentbox policy: no egress when `allow_internet_access` is
/// false or `denyOut` holds `0.0.0.0/0` (then `allowOut` lists the exceptions); otherwise
/// the internet (E2B's default), plus `allowOut` (which may name private addresses).
/// Other `denyOut` entries, transform rules and egress proxies have no agentbox equivalent.
fn policy(allow_internet: Option<bool>, net: Option<&NetworkConfig>) -> Result<NetworkPolicy> {
    let allow = net.and_then(|n| n.allow_out.clone()).unwrap_or_default();
    let deny = net.and_then(|n| n.deny_out.clone()).unwrap_or_default();
    if let Some(n) = net {
        if n.rules.as_ref().is_some_and(|r| !r.is_null() && r != &json!({})) {
            return Err(E2bError::bad_request("network.rules (request transforms) are not supported by agentbox"));
        }
        if n.egress_proxy.as_ref().is_some_and(|p| !p.is_null()) {
            return Err(E2bError::bad_request("network.egressProxy is not supported by agentbox"));
        }
        if n.dns_servers.as_ref().is_some_and(|d| !d.is_empty()) {
            return Err(E2bError::bad_request(
                "network.dnsServers is not supported: sandboxes use agentbox's DNS proxy",
            ));
        }
    }
    let deny_all = allow_internet == Some(false) || deny.iter().any(|d| d == "0.0.0.0/0");
    if let Some(d) = deny.iter().find(|d| *d != "0.0.0.0/0") {
        return Err(E2bError::bad_request(format!(
            "network.denyOut entry '{d}' is not supported: agentbox policies list what is allowed (deny all with 0.0.0.0/0 and list exceptions in allowOut)"
        )));
    }
    Ok(if deny_all {
        NetworkPolicy { mode: if allow.is_empty() { NetMode::None } else { NetMode::Allow }, allow }
    } else {
        NetworkPolicy { mode: NetMode::Public, allow }
    })
}

/// E2B's `allowPublicTraffic` as who may reach the sandbox's ports (None: the default).
fn ingress_access(net: &NetworkConfig) -> Option<IngressAccess> {
    net.allow_public_traffic.map(|public| if public { IngressAccess::Public } else { IngressAccess::Token })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMountBody {
    name: String,
    path: String,
}

/// `NewSandbox` / `NewSandboxV2`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "allow_internet_access", alias = "allowInternetAccess")]
    allow_internet_access: Option<bool>,
    #[serde(default)]
    network: Option<NetworkConfig>,
    #[serde(default)]
    auto_pause: Option<bool>,
    #[serde(default)]
    volume_mounts: Option<Vec<VolumeMountBody>>,
    #[serde(default)]
    mcp: Option<Value>,
    #[serde(default)]
    iam: Option<Value>,
}

/// `POST /sandboxes`, `POST /v2/sandboxes`: create a sandbox from a template or a snapshot.
pub async fn create(State(core): State<Core>, _k: ApiKey, bytes: Bytes) -> Result<Response> {
    let req: NewSandbox = body(&bytes)?;
    if req.template_id.is_empty() {
        return Err(E2bError::bad_request("templateID is required"));
    }
    if req.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(E2bError::bad_request("MCP servers are not supported by agentbox"));
    }
    if req.iam.as_ref().is_some_and(|i| !i.is_null() && i != &json!({})) {
        return Err(E2bError::bad_request("workload identity (iam) is not supported by agentbox"));
    }
    let network = policy(req.allow_internet_access, req.network.as_ref())?;
    let ingress = req.network.as_ref().and_then(ingress_access);
    let (template, snapshot) = resolve_template(&core, &req.template_id).await?;
    let create = abx_api::CreateSandbox {
        template,
        snapshot,
        timeout_secs: Some(req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1)),
        env: req.env_vars.unwrap_or_default(),
        metadata: req.metadata.unwrap_or_default(),
        network: Some(network),
        on_timeout: req.auto_pause.unwrap_or(false).then_some(TimeoutAction::Stop),
        volumes: req
            .volume_mounts
            .unwrap_or_default()
            .into_iter()
            .map(|v| abx_api::VolumeMount { name: v.name, path: v.path, read_only: false })
            .collect(),
        ingress,
        ..Default::default()
    };
    let sb = core.execute(Command::CreateSandbox(create)).await?.sandbox()?;
    Ok((StatusCode::CREATED, Json(created(&core, &sb))).into_response())
}

/// E2B's `templateID`: a template name (`base` is the daemon's default template), or a
/// snapshot (id or name), as `Sandbox.create(snapshot_id)` sends it.
async fn resolve_template(core: &Core, t: &str) -> Result<(Option<String>, Option<String>)> {
    if t == "base" {
        return Ok((None, None));
    }
    match core.execute(Command::GetTemplate { name: t.to_string() }).await {
        Ok(_) => Ok((Some(t.to_string()), None)),
        Err(CoreError::NotFound { .. }) | Err(CoreError::Invalid(_)) => {
            match core.execute(Command::GetSnapshot { id: t.to_string() }).await.and_then(|o| o.snapshot()) {
                Ok(s) => Ok((None, Some(s.id))),
                Err(_) => Err(E2bError::new(StatusCode::NOT_FOUND, format!("template '{t}' not found"))),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Query of the sandbox lists.
struct ListQuery {
    metadata: Vec<(String, String)>,
    states: Option<Vec<String>>,
    template: Option<String>,
    started_after: Option<i64>,
    desc: bool,
    limit: usize,
    next_token: Option<String>,
}

fn list_query(uri: &Uri) -> Result<ListQuery> {
    let mut q = ListQuery {
        metadata: vec![],
        states: None,
        template: None,
        started_after: None,
        desc: false,
        limit: 100,
        next_token: None,
    };
    for (k, v) in form_pairs(uri.query().unwrap_or("")) {
        match k.as_str() {
            // The SDKs (Python and JS alike) percent-encode each key and value, then
            // form-encode the pairs, then the whole as the query parameter: three decodes.
            "metadata" => {
                q.metadata.extend(form_pairs(&v).into_iter().map(|(k, v)| (percent_decode(&k), percent_decode(&v))))
            }
            // `state=a&state=b` (as both SDKs send a list) or `state=a,b`.
            "state" => q
                .states
                .get_or_insert_with(Vec::new)
                .extend(v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty())),
            "template" => q.template = Some(v),
            "startedAfter" => {
                q.started_after = Some(
                    parse_rfc3339(&v).ok_or_else(|| E2bError::bad_request(format!("invalid startedAfter '{v}'")))?,
                )
            }
            "order" => q.desc = v.eq_ignore_ascii_case("desc"),
            "limit" => {
                q.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=1000).contains(l))
                    .ok_or_else(|| E2bError::bad_request(format!("invalid limit '{v}' (1-1000)")))?
            }
            "nextToken" => q.next_token = Some(v).filter(|t| !t.is_empty()),
            _ => {}
        }
    }
    Ok(q)
}

/// Paging key of a sandbox: creation time, then id.
fn page_key(sb: &abx_api::Sandbox) -> String {
    format!("{}.{}", sb.created_at, sb.id)
}

fn parse_page_key(t: &str) -> Result<(u64, String)> {
    t.split_once('.')
        .and_then(|(c, id)| Some((c.parse().ok()?, id.to_string())))
        .ok_or_else(|| E2bError::bad_request(format!("invalid nextToken '{t}'")))
}

/// The filtered, ordered page and the token of the next one.
async fn list_page(
    core: &Core,
    q: &ListQuery,
    default_states: &[&str],
) -> Result<(Vec<abx_api::Sandbox>, Option<String>)> {
    let all = core.execute(Command::ListSandboxes).await?.sandboxes()?;
    let states: Vec<String> =
        q.states.clone().unwrap_or_else(|| default_states.iter().map(|s| s.to_string()).collect());
    let mut v: Vec<abx_api::Sandbox> = all
        .into_iter()
        .filter(|sb| e2b_state(sb.state).is_some_and(|s| states.iter().any(|w| w == s)))
        .filter(|sb| q.metadata.iter().all(|(k, val)| sb.metadata.get(k) == Some(val)))
        .filter(|sb| q.template.as_ref().is_none_or(|t| &sb.template == t || (t == "base" && sb.template == "base")))
        .filter(|sb| q.started_after.is_none_or(|t| sb.created_at as i64 >= t))
        .collect();
    v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    if q.desc {
        v.reverse();
    }
    if let Some(t) = &q.next_token {
        let (c, id) = parse_page_key(t)?;
        let key = (c, id);
        v.retain(|sb| {
            let k = (sb.created_at, sb.id.clone());
            if q.desc { k < key } else { k > key }
        });
    }
    let more = v.len() > q.limit;
    v.truncate(q.limit);
    let next = if more { v.last().map(page_key) } else { None };
    Ok((v, next))
}

/// `GET /v2/sandboxes`: running and paused sandboxes, filtered (metadata, state, template,
/// startedAfter), ordered by start time, paged by `limit` and `nextToken` (the next
/// page's token is the `X-Next-Token` header).
pub async fn list_v2(State(core): State<Core>, _k: ApiKey, uri: Uri) -> Result<Response> {
    let q = list_query(&uri)?;
    let (page, next) = list_page(&core, &q, &["running", "paused"]).await?;
    let mut resp = Json(page.iter().map(listed).collect::<Vec<_>>()).into_response();
    if let Some(n) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("x-next-token", n);
    }
    Ok(resp)
}

/// `GET /sandboxes` (v1): running sandboxes, with the metadata filter.
pub async fn list_v1(State(core): State<Core>, _k: ApiKey, uri: Uri) -> Result<Response> {
    let mut q = list_query(&uri)?;
    q.limit = usize::MAX - 1;
    let (page, _) = list_page(&core, &q, &["running"]).await?;
    Ok(Json(page.iter().map(listed).collect::<Vec<_>>()).into_response())
}

/// `GET /sandboxes/{id}`.
pub async fn get(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>) -> Result<Response> {
    let sb = sandbox(&core, &id).await?;
    Ok(Json(detail(&core, &sb)).into_response())
}

/// `DELETE /sandboxes/{id}`: kill (destroy) it.
pub async fn kill(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>) -> Result<StatusCode> {
    let sb = sandbox(&core, &id).await?;
    core.execute(Command::DeleteSandbox { id: sb.id, force: true }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    #[serde(default)]
    timeout: Option<u64>,
}

/// `POST /sandboxes/{id}/timeout`: `{"timeout": seconds}` from now.
pub async fn set_timeout(
    State(core): State<Core>,
    _k: ApiKey,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<StatusCode> {
    let b: TimeoutBody = body(&bytes)?;
    let timeout = b.timeout.ok_or_else(|| E2bError::bad_request("timeout is required"))?;
    let sb = sandbox(&core, &id).await?;
    core.execute(Command::SetTimeout { id: sb.id, timeout_secs: timeout.max(1) }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct RefreshBody {
    #[serde(default)]
    duration: Option<u64>,
}

/// `POST /sandboxes/{id}/refreshes`: keep it alive `duration` more seconds (at least the
/// current timeout).
pub async fn refresh(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>, bytes: Bytes) -> Result<StatusCode> {
    let b: RefreshBody = body(&bytes)?;
    let sb = sandbox(&core, &id).await?;
    extend(&core, &sb, b.duration.unwrap_or(DEFAULT_TIMEOUT_SECS)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets the timeout to `secs` from now unless it already ends later.
async fn extend(core: &Core, sb: &abx_api::Sandbox, secs: u64) -> Result<()> {
    let want = crate::sandbox::now().saturating_add(secs);
    if sb.expires_at.is_some_and(|e| e < want) {
        core.execute(Command::SetTimeout { id: sb.id.clone(), timeout_secs: secs.max(1) }).await?;
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PauseBody {
    /// False: filesystem only (agentbox: stop).
    #[serde(default)]
    memory: Option<bool>,
    #[serde(default)]
    require_healthy_guest: Option<bool>,
}

/// `POST /sandboxes/{id}/pause`: freeze it with its memory (agentbox pause), or with
/// `memory: false` keep only its files (agentbox stop). 409 when already paused.
pub async fn pause(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>, bytes: Bytes) -> Result<StatusCode> {
    let b: PauseBody = body(&bytes)?;
    let _ = b.require_healthy_guest;
    let sb = sandbox(&core, &id).await?;
    if e2b_state(sb.state) == Some("paused") {
        return Err(E2bError::new(StatusCode::CONFLICT, format!("sandbox {} is already paused", sb.id)));
    }
    let cmd = if b.memory == Some(false) {
        Command::Stop { id: sb.id, grace: crate::lifecycle::STOP_GRACE }
    } else {
        Command::Pause { id: sb.id }
    };
    core.execute(cmd).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct ConnectBody {
    #[serde(default)]
    timeout: Option<u64>,
}

/// Resumes a paused (thaw) or stopped (boot) sandbox; true if it was not running.
async fn wake(core: &Core, sb: &abx_api::Sandbox) -> Result<bool> {
    match sb.state {
        SandboxState::Paused => core.execute(Command::Resume { id: sb.id.clone() }).await.map(|_| true),
        SandboxState::Stopped => core.execute(Command::Start { id: sb.id.clone() }).await.map(|_| true),
        _ => Ok(false),
    }
    .map_err(E2bError::from)
}

/// `POST /sandboxes/{id}/connect` and `/v2/sandboxes/{id}/connect`: the sandbox running
/// (resumed if paused, 201 then; 200 if it ran), its timeout extended to `timeout`.
pub async fn connect(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>, bytes: Bytes) -> Result<Response> {
    let b: ConnectBody = body(&bytes)?;
    let sb = sandbox(&core, &id).await?;
    let woke = wake(&core, &sb).await?;
    let sb = sandbox(&core, &sb.id).await?;
    if let Some(t) = b.timeout {
        if woke {
            core.execute(Command::SetTimeout { id: sb.id.clone(), timeout_secs: t.max(1) }).await?;
        } else {
            extend(&core, &sb, t).await?;
        }
    }
    let status = if woke { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(created(&core, &sb))).into_response())
}

/// `POST /sandboxes/{id}/resume` (deprecated in E2B): like connect, 409 if it runs.
pub async fn resume(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>, bytes: Bytes) -> Result<Response> {
    let b: ConnectBody = body(&bytes)?;
    let sb = sandbox(&core, &id).await?;
    if !wake(&core, &sb).await? {
        return Err(E2bError::new(StatusCode::CONFLICT, format!("sandbox {} is already running", sb.id)));
    }
    if let Some(t) = b.timeout {
        core.execute(Command::SetTimeout { id: sb.id.clone(), timeout_secs: t.max(1) }).await?;
    }
    let sb = sandbox(&core, &sb.id).await?;
    Ok((StatusCode::CREATED, Json(created(&core, &sb))).into_response())
}

/// `GET /sandboxes/{id}/metrics`: one sample, now (agentbox keeps no history). CPU use is
/// the average since the sandbox started; disk figures are not measured (0).
pub async fn metrics(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>) -> Result<Response> {
    let sb = sandbox(&core, &id).await?;
    let st = core.execute(Command::SandboxStats { id: sb.id.clone() }).await?.stats()?;
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let cpus = cpu_count(&sb);
    let elapsed_us = ((now_ms / 1000).saturating_sub(sb.created_at as i64)).max(1) as f64 * 1e6;
    let pct = (st.cpu_usage_usec as f64 / (elapsed_us * cpus as f64) * 100.0).clamp(0.0, 100.0);
    let sample = json!({
        "timestamp": super::time::rfc3339_ms(now_ms),
        "timestampUnix": now_ms / 1000,
        "cpuCount": cpus,
        "cpuUsedPct": pct,
        "memUsed": st.memory_bytes,
        "memTotal": st.memory_limit_bytes.unwrap_or_else(|| memory_bytes(&sb)),
        "memCache": 0,
        "diskUsed": 0,
        "diskTotal": 0,
    });
    Ok(Json(json!([sample])).into_response())
}

/// `PUT /sandboxes/{id}/network`: replace the egress policy.
pub async fn network(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>, bytes: Bytes) -> Result<StatusCode> {
    let cfg: NetworkConfig = body(&bytes)?;
    let p = policy(None, Some(&cfg))?;
    let sb = sandbox(&core, &id).await?;
    if ingress_access(&cfg).is_some_and(|a| a != sb.ingress) {
        return Err(E2bError::bad_request(
            "network.allowPublicTraffic is set when the sandbox is created and cannot change afterwards",
        ));
    }
    core.execute(Command::SetNetwork { id: sb.id, policy: p }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct SnapshotBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    memory: Option<bool>,
}

fn snapshot_info(s: &abx_api::Snapshot) -> Value {
    json!({ "snapshotID": s.id, "names": s.name.iter().collect::<Vec<_>>() })
}

/// `POST /sandboxes/{id}/snapshots`: a snapshot of its files (agentbox has no memory
/// snapshots: sandboxes made from it boot fresh, like E2B's `mode="filesystem"`).
pub async fn snapshot(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>, bytes: Bytes) -> Result<Response> {
    let b: SnapshotBody = body(&bytes)?;
    let _ = b.memory;
    let sb = sandbox(&core, &id).await?;
    let req = abx_api::CreateSnapshot { name: b.name.filter(|n| !n.is_empty()) };
    let s = core.execute(Command::CreateSnapshot { id: sb.id, req }).await?.snapshot()?;
    Ok((StatusCode::CREATED, Json(snapshot_info(&s))).into_response())
}

/// `GET /snapshots`: snapshots (of one sandbox with `sandboxID`; matching `name`), oldest
/// first, paged.
pub async fn snapshots(State(core): State<Core>, _k: ApiKey, uri: Uri) -> Result<Response> {
    let q = form_pairs(uri.query().unwrap_or(""));
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
    let limit: usize = get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(100);
    let name = get("name");
    let mut v = core.execute(Command::ListSnapshots { sandbox: get("sandboxID") }).await?.snapshots()?;
    v.retain(|s| name.as_ref().is_none_or(|n| &s.id == n || s.name.as_ref() == Some(n)));
    v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    if let Some(t) = get("nextToken") {
        let (c, id) = parse_page_key(&t)?;
        v.retain(|s| (s.created_at, s.id.clone()) > (c, id.clone()));
    }
    let more = v.len() > limit;
    v.truncate(limit);
    let mut resp = Json(v.iter().map(snapshot_info).collect::<Vec<_>>()).into_response();
    if more && let Some(h) = v.last().and_then(|s| HeaderValue::from_str(&format!("{}.{}", s.created_at, s.id)).ok()) {
        resp.headers_mut().insert("x-next-token", h);
    }
    Ok(resp)
}

/// `DELETE /templates/{id}` (the SDK's `delete_snapshot`): deletes a snapshot. Templates
/// are managed with agentbox's own API.
pub async fn delete_template(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>) -> Result<StatusCode> {
    match core.execute(Command::GetSnapshot { id: id.clone() }).await.and_then(|o| o.snapshot()) {
        Ok(s) => {
            core.execute(Command::DeleteSnapshot { id: s.id }).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Err(CoreError::NotFound { .. }) | Err(CoreError::Invalid(_)) => {
            if core.execute(Command::GetTemplate { name: id.clone() }).await.is_ok() {
                Err(E2bError::bad_request(format!(
                    "'{id}' is a template: delete templates with agentbox's API (`agentbox template rm`)"
                )))
            } else {
                Err(E2bError::new(StatusCode::NOT_FOUND, format!("snapshot '{id}' not found")))
            }
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ForkBody {
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    count: Option<u32>,
}

/// `POST /sandboxes/{id}/fork`: `count` new sandboxes with a copy of its files (processes
/// are not copied: agentbox forks files, not memory). All or nothing.
pub async fn fork(State(core): State<Core>, _k: ApiKey, Path(id): Path<String>, bytes: Bytes) -> Result<Response> {
    let b: ForkBody = body(&bytes)?;
    let sb = sandbox(&core, &id).await?;
    let req = abx_api::ForkRequest {
        count: Some(b.count.unwrap_or(1)),
        timeout_secs: Some(b.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1)),
        metadata: BTreeMap::new(),
        idempotency_key: None,
    };
    let r = core.execute(Command::Fork { source: sb.id, req }).await?.fork()?;
    let out: Vec<Value> = r.sandboxes.iter().map(|s| json!({ "sandbox": created(&core, s) })).collect();
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_policies() {
        let p = policy(None, None).unwrap();
        assert_eq!(p.mode, NetMode::Public);
        assert_eq!(policy(Some(false), None).unwrap().mode, NetMode::None);
        let cfg = NetworkConfig {
            allow_out: Some(vec!["github.com".into()]),
            deny_out: Some(vec!["0.0.0.0/0".into()]),
            ..Default::default()
        };
        let p = policy(None, Some(&cfg)).unwrap();
        assert_eq!((p.mode, p.allow), (NetMode::Allow, vec!["github.com".to_string()]));
        let cfg = NetworkConfig { deny_out: Some(vec!["10.0.0.0/8".into()]), ..Default::default() };
        assert!(policy(None, Some(&cfg)).is_err());
    }

    #[test]
    fn list_queries() {
        // What both SDKs send for metadata {"note": "a b&c=d%", "k": "v"} and two states.
        let uri: Uri =
            "/v2/sandboxes?metadata=note%3Da%252520b%252526c%25253Dd%252525%26k%3Dv&state=running&state=paused"
                .parse()
                .unwrap();
        let q = list_query(&uri).unwrap();
        assert_eq!(q.metadata, vec![("note".to_string(), "a b&c=d%".to_string()), ("k".into(), "v".into())]);
        assert_eq!(q.states, Some(vec!["running".to_string(), "paused".to_string()]));
        let q = list_query(&"/v2/sandboxes?state=running,paused".parse::<Uri>().unwrap()).unwrap();
        assert_eq!(q.states, Some(vec!["running".to_string(), "paused".to_string()]));
    }
}
