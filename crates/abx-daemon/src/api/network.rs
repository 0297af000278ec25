//! A sandbox's network: its egress policy, audit log, policy test and ingress URLs.

use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use abx_api::{ErrorBody, KeptAudit, NetLog, NetTestReport, NetworkPolicy, PortUrl, Sandbox};

use super::{ApiError, Json, Path};
use crate::core::{Command, Core};

pub fn routes() -> OpenApiRouter<Core> {
    OpenApiRouter::new()
        .routes(routes!(get_network, set_network))
        .routes(routes!(log))
        .routes(routes!(kept_audits))
        .routes(routes!(test))
        .routes(routes!(port))
        .routes(routes!(set_ingress))
}

/// Change who may reach the sandbox's ports through the ingress proxy (`public`, or
/// `token`: requests need its `ingress_token`); applies to the next request.
#[utoipa::path(put, path = abx_api::paths::INGRESS, tag = "network", request_body = abx_api::SetIngress,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn set_ingress(
    State(core): State<Core>,
    Path(id): Path<String>,
    Json(req): Json<abx_api::SetIngress>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(core.execute(Command::SetIngress { id, req }).await?.sandbox()?))
}

/// The sandbox's egress policy.
#[utoipa::path(get, path = abx_api::paths::NETWORK, tag = "network",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = NetworkPolicy), (status = 404, body = ErrorBody)))]
async fn get_network(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<NetworkPolicy>, ApiError> {
    Ok(Json(core.execute(Command::GetSandbox { id }).await?.sandbox()?.network))
}

/// Replace the sandbox's egress policy; new connections follow it at once, and addresses
/// allowed by earlier DNS answers are forgotten.
#[utoipa::path(put, path = abx_api::paths::NETWORK, tag = "network", request_body = NetworkPolicy,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn set_network(
    State(core): State<Core>,
    Path(id): Path<String>,
    Json(policy): Json<NetworkPolicy>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(core.execute(Command::SetNetwork { id, policy }).await?.sandbox()?))
}

/// The sandbox's egress audit: every DNS query and every allowed or denied connection.
/// Also answers for a removed sandbox whose audit is kept (`removed_at` set), by id or by
/// the name it had.
#[utoipa::path(get, path = abx_api::paths::NETWORK_LOG, tag = "network",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = NetLog), (status = 404, body = ErrorBody)))]
async fn log(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<NetLog>, ApiError> {
    Ok(Json(core.execute(Command::NetworkLog { id }).await?.net_log()?))
}

/// Probe from inside the sandbox that what its policy allows is reachable and what it
/// does not is not.
#[utoipa::path(post, path = abx_api::paths::NETWORK_TEST, tag = "network",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = NetTestReport), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn test(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<NetTestReport>, ApiError> {
    Ok(Json(core.execute(Command::NetworkTest { id }).await?.net_test()?))
}

/// Where the ingress proxy serves a port of the sandbox.
#[utoipa::path(get, path = abx_api::paths::PORT, tag = "network",
    params(("id" = String, Path, description = "sandbox id or name"), ("port" = u16, Path, description = "port inside the sandbox")),
    responses((status = 200, body = PortUrl), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn port(State(core): State<Core>, Path((id, port)): Path<(String, u16)>) -> Result<Json<PortUrl>, ApiError> {
    Ok(Json(core.execute(Command::PortUrl { id, port }).await?.port_url()?))
}

/// Removed sandboxes whose egress audit is kept (for the daemon's `--audit-retention`,
/// if they recorded anything), oldest removal first; read one with
/// `GET /v1/sandboxes/{id}/network/log`.
#[utoipa::path(get, path = abx_api::paths::NETWORK_AUDITS, tag = "network",
    responses((status = 200, body = Vec<KeptAudit>)))]
async fn kept_audits(State(core): State<Core>) -> Result<Json<Vec<KeptAudit>>, ApiError> {
    Ok(Json(core.execute(Command::KeptAudits).await?.kept_audits()?))
}
