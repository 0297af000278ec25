use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use abx_api::{BuildEvent, BuildTemplate, ErrorBody, TagTemplate, Template};

use super::{ApiError, Json, Path, Query, ndjson};
use crate::auth::Remote;
use crate::core::{Command, Core};

pub fn routes() -> OpenApiRouter<Core> {
    OpenApiRouter::new()
        .routes(routes!(list, build))
        .routes(routes!(get, remove))
        .routes(routes!(refresh))
        .routes(routes!(tag))
        .routes(routes!(prune))
}

/// List templates.
#[utoipa::path(get, path = abx_api::paths::TEMPLATES, tag = "templates", responses((status = 200, body = Vec<Template>)))]
async fn list(State(core): State<Core>) -> Result<Json<Vec<Template>>, ApiError> {
    Ok(Json(core.execute(Command::ListTemplates).await?.templates()?))
}

/// Build a template; the response streams progress as NDJSON [`BuildEvent`]s and ends with
/// `done` or `error`. Fields naming a host path (`from_dir`, `context`, `import`,
/// `registry_auth.auth_file`, a `repo` that is not an `https://`, `http://`, `ssh://` or
/// `git://` URL) are accepted on the unix socket only. Closing the connection cancels a
/// Dockerfile or repository build: nothing is published.
#[utoipa::path(post, path = abx_api::paths::TEMPLATES, tag = "templates", request_body = BuildTemplate,
    responses((status = 200, description = "NDJSON stream of BuildEvent", body = BuildEvent, content_type = "application/x-ndjson"),
        (status = 400, body = ErrorBody), (status = 403, description = "a host path over TCP", body = ErrorBody),
        (status = 404, description = "no such recipe", body = ErrorBody)))]
async fn build(
    State(core): State<Core>,
    remote: Option<Extension<Remote>>,
    Json(req): Json<BuildTemplate>,
) -> Result<Response, ApiError> {
    if remote.is_some() {
        no_host_paths(&req)?;
    }
    let rx = core.execute(Command::BuildTemplate(req)).await?.build()?;
    Ok(ndjson(tokio_stream(rx)))
}

/// Refuses a request from a TCP listener that names a path on the daemon's host: the
/// daemon reads it as root, and only the unix socket's callers are root.
fn no_host_paths(req: &BuildTemplate) -> Result<(), ApiError> {
    let fields = crate::templates::host_path_fields(req);
    if fields.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "{} {} a path on the daemon's host, which is accepted only on the daemon's unix socket; \
             over TCP build from a Dockerfile without a context, a repository URL (https://, http://, ssh:// \
             or git://), an image to pull (without auth_file) or a snapshot",
            fields.join(", "),
            if fields.len() == 1 { "names" } else { "name" }
        ),
    ))
}

fn tokio_stream<T: Send + 'static>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// Get a template.
#[utoipa::path(get, path = abx_api::paths::TEMPLATE, tag = "templates",
    params(("name" = String, Path, description = "template name")),
    responses((status = 200, body = Template), (status = 404, body = ErrorBody)))]
async fn get(State(core): State<Core>, Path(name): Path<String>) -> Result<Json<Template>, ApiError> {
    Ok(Json(core.execute(Command::GetTemplate { name }).await?.template()?))
}

/// Remove a template; layers no other template or live sandbox uses are deleted.
#[utoipa::path(delete, path = abx_api::paths::TEMPLATE, tag = "templates",
    params(("name" = String, Path, description = "template name")),
    responses((status = 204, description = "removed"), (status = 404, body = ErrorBody)))]
async fn remove(State(core): State<Core>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    core.execute(Command::DeleteTemplate { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Build a template again from what made it (Dockerfile, repository at a ref, image);
/// with the build cache only what changed is redone. Streams like a build.
#[utoipa::path(post, path = abx_api::paths::TEMPLATE_REFRESH, tag = "templates",
    params(("name" = String, Path, description = "template name")),
    responses((status = 200, description = "NDJSON stream of BuildEvent", body = BuildEvent, content_type = "application/x-ndjson"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn refresh(State(core): State<Core>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let rx = core.execute(Command::RefreshTemplate { name }).await?.build()?;
    Ok(ndjson(tokio_stream(rx)))
}

/// Keep a template under another name too, typically `NAME:TAG` (a version that stays
/// while NAME is rebuilt); the layers are shared. The target is a tag: a template it
/// replaces loses its build source, and refresh of the target is refused.
#[utoipa::path(post, path = abx_api::paths::TEMPLATE_TAG, tag = "templates", request_body = TagTemplate,
    params(("name" = String, Path, description = "template name")),
    responses((status = 200, body = Template), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn tag(
    State(core): State<Core>,
    Path(name): Path<String>,
    Json(req): Json<TagTemplate>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(core.execute(Command::TagTemplate { name, target: req.target }).await?.template()?))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct PruneQuery {
    /// Remove only the cache entries no build made or used for this many seconds
    /// (default: all of them).
    #[serde(default)]
    unused_for: Option<u64>,
}

/// Empty the build cache (or the part of it unused for `unused_for` seconds) and delete the
/// layers nothing uses any more; returns their digests.
#[utoipa::path(post, path = abx_api::paths::BUILD_CACHE_PRUNE, tag = "templates", params(PruneQuery),
    responses((status = 200, body = Vec<String>)))]
async fn prune(State(core): State<Core>, Query(q): Query<PruneQuery>) -> Result<Json<Vec<String>>, ApiError> {
    Ok(Json(core.execute(Command::PruneBuildCache { unused_for_secs: q.unused_for }).await?.strings()?))
}
