//! Snapshots, forks, rollback, stop/start and volumes.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use abx_api::{
    CreateSnapshot, CreateVolume, ErrorBody, ForkRequest, ForkResult, Pool, RollbackRequest, Sandbox, SetPool,
    Snapshot, StopRequest, Volume,
};

use super::{ApiError, Json, Path, Query};
use crate::core::{Command, Core};

pub fn routes() -> OpenApiRouter<Core> {
    OpenApiRouter::new()
        .routes(routes!(stop))
        .routes(routes!(start))
        .routes(routes!(create_snapshot, sandbox_snapshots))
        .routes(routes!(fork_sandbox))
        .routes(routes!(rollback))
        .routes(routes!(list_snapshots))
        .routes(routes!(get_snapshot, delete_snapshot))
        .routes(routes!(fork_snapshot))
        .routes(routes!(create_volume, list_volumes))
        .routes(routes!(get_volume, delete_volume))
        .routes(routes!(list_pools))
        .routes(routes!(set_pool, get_pool, delete_pool))
}

/// A fork request's body, with the `Idempotency-Key` header as its key.
fn fork_request(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<ForkRequest, ApiError> {
    let mut req: ForkRequest = optional_json(body)?;
    req.idempotency_key = super::sandboxes::idempotency_key(headers, req.idempotency_key.take())?;
    Ok(req)
}

/// A JSON body that may be empty (then the defaults).
fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// End every process of the sandbox and keep its files (its slot is freed); `start` boots
/// it again with the same id. The processes get SIGTERM first, and `grace_secs` (default
/// 10) to exit before those left are killed.
#[utoipa::path(post, path = abx_api::paths::SANDBOX_STOP, tag = "snapshots", request_body = StopRequest,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn stop(
    State(core): State<Core>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Sandbox>, ApiError> {
    let req: StopRequest = optional_json(&body)?;
    let grace = crate::validate::stop_grace(req.grace_secs)?;
    Ok(Json(core.execute(Command::Stop { id, grace }).await?.sandbox()?))
}

/// Boot a stopped (or exited) sandbox again, with its files as they were.
#[utoipa::path(post, path = abx_api::paths::SANDBOX_START, tag = "snapshots",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn start(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(core.execute(Command::Start { id }).await?.sandbox()?))
}

/// Snapshot the sandbox's files. A running sandbox is frozen for the moment it takes:
/// every write that completed before the request is in the snapshot.
#[utoipa::path(post, path = abx_api::paths::SANDBOX_SNAPSHOTS, tag = "snapshots", request_body = CreateSnapshot,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 201, body = Snapshot), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_snapshot(
    State(core): State<Core>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let req = optional_json(&body)?;
    Ok((StatusCode::CREATED, Json(core.execute(Command::CreateSnapshot { id, req }).await?.snapshot()?)))
}

/// The sandbox's snapshots, oldest first.
#[utoipa::path(get, path = abx_api::paths::SANDBOX_SNAPSHOTS, tag = "snapshots",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Vec<Snapshot>)))]
async fn sandbox_snapshots(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<Vec<Snapshot>>, ApiError> {
    Ok(Json(core.execute(Command::ListSnapshots { sandbox: Some(id) }).await?.snapshots()?))
}

/// New sandboxes from a running sandbox (through a snapshot taken now and removed
/// afterwards), each independent. All or nothing.
#[utoipa::path(post, path = abx_api::paths::SANDBOX_FORK, tag = "snapshots", request_body = ForkRequest,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 201, body = ForkResult), (status = 200, description = "made earlier by a fork with the same idempotency key", body = ForkResult),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn fork_sandbox(
    State(core): State<Core>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ForkResult>), ApiError> {
    let req = fork_request(&headers, &body)?;
    let (r, made) = core.execute(Command::Fork { source: id, req }).await?.forked()?;
    Ok((super::sandboxes::made_status(made), Json(r)))
}

/// Return the sandbox's files to a snapshot; its processes are restarted, its id kept.
#[utoipa::path(post, path = abx_api::paths::SANDBOX_ROLLBACK, tag = "snapshots", request_body = RollbackRequest,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn rollback(
    State(core): State<Core>,
    Path(id): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(core.execute(Command::Rollback { id, snapshot: req.snapshot }).await?.sandbox()?))
}

#[derive(Debug, Deserialize, IntoParams)]
struct SnapshotsQuery {
    /// Only the snapshots of this sandbox (id or name).
    #[serde(default)]
    sandbox: Option<String>,
}

/// Every snapshot, oldest first.
#[utoipa::path(get, path = abx_api::paths::SNAPSHOTS, tag = "snapshots", params(SnapshotsQuery),
    responses((status = 200, body = Vec<Snapshot>)))]
async fn list_snapshots(
    State(core): State<Core>,
    Query(q): Query<SnapshotsQuery>,
) -> Result<Json<Vec<Snapshot>>, ApiError> {
    Ok(Json(core.execute(Command::ListSnapshots { sandbox: q.sandbox }).await?.snapshots()?))
}

/// A snapshot by id or name.
#[utoipa::path(get, path = abx_api::paths::SNAPSHOT, tag = "snapshots",
    params(("id" = String, Path, description = "snapshot id or name")),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
async fn get_snapshot(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(core.execute(Command::GetSnapshot { id }).await?.snapshot()?))
}

/// Delete a snapshot. Sandboxes made from it keep their files.
#[utoipa::path(delete, path = abx_api::paths::SNAPSHOT, tag = "snapshots",
    params(("id" = String, Path, description = "snapshot id or name")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody)))]
async fn delete_snapshot(State(core): State<Core>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    core.execute(Command::DeleteSnapshot { id }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// New sandboxes from a snapshot, each independent. All or nothing.
#[utoipa::path(post, path = abx_api::paths::SNAPSHOT_FORK, tag = "snapshots", request_body = ForkRequest,
    params(("id" = String, Path, description = "snapshot id or name")),
    responses((status = 201, body = ForkResult), (status = 200, description = "made earlier by a fork with the same idempotency key", body = ForkResult),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn fork_snapshot(
    State(core): State<Core>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ForkResult>), ApiError> {
    let req = fork_request(&headers, &body)?;
    // A snapshot, even if a sandbox has the same name.
    let snap = core.execute(Command::GetSnapshot { id }).await?.snapshot()?;
    let (r, made) = core.execute(Command::Fork { source: snap.id, req }).await?.forked()?;
    Ok((super::sandboxes::made_status(made), Json(r)))
}

/// Create a named volume (an empty directory that outlives sandboxes).
#[utoipa::path(post, path = abx_api::paths::VOLUMES, tag = "volumes", request_body = CreateVolume,
    responses((status = 201, body = Volume), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_volume(
    State(core): State<Core>,
    Json(req): Json<CreateVolume>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((StatusCode::CREATED, Json(core.execute(Command::CreateVolume(req)).await?.volume()?)))
}

/// Every volume with its size.
#[utoipa::path(get, path = abx_api::paths::VOLUMES, tag = "volumes", responses((status = 200, body = Vec<Volume>)))]
async fn list_volumes(State(core): State<Core>) -> Result<Json<Vec<Volume>>, ApiError> {
    Ok(Json(core.execute(Command::ListVolumes).await?.volumes()?))
}

/// A volume.
#[utoipa::path(get, path = abx_api::paths::VOLUME, tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)))]
async fn get_volume(State(core): State<Core>, Path(name): Path<String>) -> Result<Json<Volume>, ApiError> {
    Ok(Json(core.execute(Command::GetVolume { name }).await?.volume()?))
}

/// Delete a volume and its files; refused while a sandbox uses it.
#[utoipa::path(delete, path = abx_api::paths::VOLUME, tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_volume(State(core): State<Core>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    core.execute(Command::DeleteVolume { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Keep sandboxes of a template ready (booted, network wired, agent listening) so that a
/// create of that template is a claim. Creates or changes the pool.
#[utoipa::path(put, path = abx_api::paths::POOL, tag = "pools", request_body = SetPool,
    params(("template" = String, Path, description = "template name")),
    responses((status = 200, body = Pool), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_pool(
    State(core): State<Core>,
    Path(template): Path<String>,
    Json(req): Json<SetPool>,
) -> Result<Json<Pool>, ApiError> {
    Ok(Json(core.execute(Command::SetPool { template, req }).await?.pool()?))
}

/// Every pool with its counters.
#[utoipa::path(get, path = abx_api::paths::POOLS, tag = "pools", responses((status = 200, body = Vec<Pool>)))]
async fn list_pools(State(core): State<Core>) -> Result<Json<Vec<Pool>>, ApiError> {
    Ok(Json(core.execute(Command::ListPools).await?.pools()?))
}

/// A pool with its counters.
#[utoipa::path(get, path = abx_api::paths::POOL, tag = "pools",
    params(("template" = String, Path, description = "template name")),
    responses((status = 200, body = Pool), (status = 404, body = ErrorBody)))]
async fn get_pool(State(core): State<Core>, Path(template): Path<String>) -> Result<Json<Pool>, ApiError> {
    Ok(Json(core.execute(Command::GetPool { template }).await?.pool()?))
}

/// Remove a pool; its ready sandboxes are destroyed (claimed ones are not affected).
#[utoipa::path(delete, path = abx_api::paths::POOL, tag = "pools",
    params(("template" = String, Path, description = "template name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_pool(State(core): State<Core>, Path(template): Path<String>) -> Result<StatusCode, ApiError> {
    core.execute(Command::DeletePool { template }).await?;
    Ok(StatusCode::NO_CONTENT)
}
