use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use abx_api::{ErrorBody, SystemInfo};

use super::{ApiError, Json};
use crate::core::{Command, Core};

pub fn routes() -> OpenApiRouter<Core> {
    OpenApiRouter::new().routes(routes!(info))
}

/// Facts about the daemon.
#[utoipa::path(get, path = abx_api::paths::SYSTEM, tag = "system",
    responses((status = 200, body = SystemInfo), (status = 500, body = ErrorBody)))]
async fn info(State(core): State<Core>) -> Result<Json<SystemInfo>, ApiError> {
    Ok(Json(core.execute(Command::SystemInfo).await?.system()?))
}
