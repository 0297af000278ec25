//! API keys: made, listed and removed over the unix socket only.

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use abx_api::{ApiKey, CreateKey, ErrorBody};

use super::{ApiError, Json, Path};
use crate::auth::Remote;
use crate::core::{Command, Core};

pub fn routes() -> OpenApiRouter<Core> {
    OpenApiRouter::new().routes(routes!(create, list)).routes(routes!(delete))
}

fn local_only(remote: Option<Extension<Remote>>) -> Result<(), ApiError> {
    match remote {
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "API keys are managed over the daemon's unix socket only (agentbox key create)",
        )),
        None => Ok(()),
    }
}

/// Make an API key (shown once). Unix socket only.
#[utoipa::path(post, path = abx_api::paths::KEYS, tag = "keys", request_body = CreateKey,
    responses((status = 201, body = ApiKey), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create(
    State(core): State<Core>,
    remote: Option<Extension<Remote>>,
    Json(req): Json<CreateKey>,
) -> Result<(StatusCode, Json<ApiKey>), ApiError> {
    local_only(remote)?;
    Ok((StatusCode::CREATED, Json(core.execute(Command::CreateKey(req)).await?.key()?)))
}

/// Every API key (without the keys). Unix socket only.
#[utoipa::path(get, path = abx_api::paths::KEYS, tag = "keys",
    responses((status = 200, body = Vec<ApiKey>), (status = 403, body = ErrorBody)))]
async fn list(State(core): State<Core>, remote: Option<Extension<Remote>>) -> Result<Json<Vec<ApiKey>>, ApiError> {
    local_only(remote)?;
    Ok(Json(core.execute(Command::ListKeys).await?.keys()?))
}

/// Revoke an API key. Unix socket only.
#[utoipa::path(delete, path = abx_api::paths::KEY, tag = "keys",
    params(("id" = String, Path, description = "key id")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete(
    State(core): State<Core>,
    remote: Option<Extension<Remote>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    local_only(remote)?;
    core.execute(Command::DeleteKey { id }).await?;
    Ok(StatusCode::NO_CONTENT)
}
