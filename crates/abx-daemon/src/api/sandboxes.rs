use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use abx_api::{CreateSandbox, ErrorBody, Sandbox, SandboxStats, TimeoutRequest};

use super::{ApiError, Json, Path, Query};
use crate::core::{Command, Core};

pub fn routes() -> OpenApiRouter<Core> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get, delete))
        .routes(routes!(set_timeout))
        .routes(routes!(stats))
        .routes(routes!(diff))
        .routes(routes!(diff_archive))
        .routes(routes!(pause))
        .routes(routes!(resume))
}

#[derive(Debug, Deserialize, IntoParams)]
struct DiffQuery {
    /// Since this snapshot (id or name) instead of since the template.
    #[serde(default)]
    since: Option<String>,
    /// Archive only: deletions as OCI whiteout files (an empty `.wh.NAME` beside each
    /// deleted path, for the topmost deleted path of a tree), so that the tar is a layer
    /// that recreates the sandbox's files when applied over its template (or the snapshot).
    #[serde(default)]
    whiteouts: bool,
}

/// What the sandbox added, changed and deleted in its filesystem since its template (or
/// since a snapshot).
#[utoipa::path(get, path = abx_api::paths::DIFF, tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id or name"), DiffQuery),
    responses((status = 200, body = abx_api::Diff), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn diff(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Result<Json<abx_api::Diff>, ApiError> {
    Ok(Json(core.execute(Command::Diff { id, archive: false, since: q.since, whiteouts: false }).await?.diff()?.0))
}

/// A tar of the paths the sandbox added or changed since its template (owners as inside
/// the sandbox). Deletions are listed by the diff; with `whiteouts=true` they are in the
/// tar too, as OCI whiteouts.
#[utoipa::path(get, path = abx_api::paths::DIFF_ARCHIVE, tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id or name"), DiffQuery),
    responses((status = 200, description = "tar archive", content_type = "application/x-tar"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn diff_archive(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Result<([(axum::http::header::HeaderName, &'static str); 1], Vec<u8>), ApiError> {
    let (_, tar) =
        core.execute(Command::Diff { id, archive: true, since: q.since, whiteouts: q.whiteouts }).await?.diff()?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/x-tar")], tar.unwrap_or_default()))
}

/// Freeze every process of the sandbox, keeping its memory. Any later request to the
/// sandbox (exec, files, ingress) resumes it.
#[utoipa::path(post, path = abx_api::paths::SANDBOX_PAUSE, tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn pause(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(core.execute(Command::Pause { id }).await?.sandbox()?))
}

/// Thaw a paused sandbox.
#[utoipa::path(post, path = abx_api::paths::SANDBOX_RESUME, tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn resume(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(core.execute(Command::Resume { id }).await?.sandbox()?))
}

/// Create and start a sandbox.
#[utoipa::path(post, path = abx_api::paths::SANDBOXES, tag = "sandboxes", request_body = CreateSandbox,
    params(("Idempotency-Key" = Option<String>, Header, description = "see `idempotency_key` in the body")),
    responses((status = 201, body = Sandbox), (status = 200, description = "made earlier by a create with the same idempotency key", body = Sandbox),
        (status = 400, body = ErrorBody), (status = 404, description = "unknown template", body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create(
    State(core): State<Core>,
    headers: axum::http::HeaderMap,
    Json(mut req): Json<CreateSandbox>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    req.idempotency_key = idempotency_key(&headers, req.idempotency_key.take())?;
    let (sb, made) = core.execute(Command::CreateSandbox(req)).await?.created()?;
    Ok((made_status(made), Json(sb)))
}

/// List sandboxes, oldest first.
#[utoipa::path(get, path = abx_api::paths::SANDBOXES, tag = "sandboxes", responses((status = 200, body = Vec<Sandbox>)))]
async fn list(State(core): State<Core>) -> Result<Json<Vec<Sandbox>>, ApiError> {
    Ok(Json(core.execute(Command::ListSandboxes).await?.sandboxes()?))
}

/// Get a sandbox by id or name.
#[utoipa::path(get, path = abx_api::paths::SANDBOX, tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
async fn get(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(core.execute(Command::GetSandbox { id }).await?.sandbox()?))
}

#[derive(Debug, Deserialize, IntoParams)]
struct DeleteQuery {
    /// Also destroy a running sandbox.
    #[serde(default)]
    force: bool,
}

/// Destroy a sandbox: every process is killed and everything it had on the host removed.
#[utoipa::path(delete, path = abx_api::paths::SANDBOX, tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id or name"), DeleteQuery),
    responses((status = 204, description = "destroyed"), (status = 404, body = ErrorBody),
        (status = 409, description = "running and force not given", body = ErrorBody)))]
async fn delete(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    core.execute(Command::DeleteSandbox { id, force: q.force }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set the sandbox's timeout (seconds from now; 0 removes it).
#[utoipa::path(post, path = abx_api::paths::SANDBOX_TIMEOUT, tag = "sandboxes", request_body = TimeoutRequest,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
async fn set_timeout(
    State(core): State<Core>,
    Path(id): Path<String>,
    Json(req): Json<TimeoutRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(core.execute(Command::SetTimeout { id, timeout_secs: req.timeout_secs }).await?.sandbox()?))
}

/// Resource usage from the sandbox's cgroups.
#[utoipa::path(get, path = abx_api::paths::SANDBOX_STATS, tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = SandboxStats), (status = 404, body = ErrorBody)))]
async fn stats(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<SandboxStats>, ApiError> {
    Ok(Json(core.execute(Command::SandboxStats { id }).await?.stats()?))
}

/// A request's idempotency key: the body's, or the `Idempotency-Key` header's; both must
/// agree.
pub(crate) fn idempotency_key(
    headers: &axum::http::HeaderMap,
    body: Option<String>,
) -> Result<Option<String>, ApiError> {
    let Some(h) = headers.get("idempotency-key") else { return Ok(body) };
    let key = h
        .to_str()
        .map_err(|_| ApiError::bad_request("the Idempotency-Key header must be printable ASCII".to_string()))?;
    match body {
        Some(k) if k != key => Err(ApiError::bad_request(format!(
            "the Idempotency-Key header '{key}' and the body's idempotency_key '{k}' differ"
        ))),
        _ => Ok(Some(key.to_string())),
    }
}

/// 201 for what a request made now, 200 for what an earlier one with the same idempotency
/// key made.
pub(crate) fn made_status(made: bool) -> StatusCode {
    if made { StatusCode::CREATED } else { StatusCode::OK }
}
