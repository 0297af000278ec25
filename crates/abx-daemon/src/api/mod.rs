//! The HTTP API: REST JSON under `/v1`, described by an OpenAPI document generated from
//! the handlers (committed as docs/openapi.json, served at `/v1/openapi.json`). Handlers
//! only translate HTTP into [`Command`]s for the core.

mod exec;
mod files;
mod keys;

pub(crate) use files::first_then_rest;
mod network;
mod sandboxes;
mod snapshots;
mod system;
mod templates;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use abx_api::{ErrorBody, ErrorDetail};

use crate::core::Core;
use crate::error::CoreError;

#[derive(OpenApi)]
#[openapi(
    info(title = "agentbox", description = "Isolated, disposable, instant Linux sandboxes for AI agents."),
    tags(
        (name = "sandboxes", description = "Create, inspect and destroy sandboxes"),
        (name = "exec", description = "Run processes inside sandboxes"),
        (name = "files", description = "Files inside sandboxes"),
        (name = "network", description = "Egress policy, audit and ingress of sandboxes"),
        (name = "snapshots", description = "Snapshots, forks, rollback, stop and start of sandboxes"),
        (name = "volumes", description = "Named directories that outlive sandboxes"),
        (name = "pools", description = "Warm pools: sandboxes kept ready per template"),
        (name = "keys", description = "API keys for TCP listeners (managed over the unix socket)"),
        (name = "templates", description = "Templates sandboxes are made from"),
        (name = "system", description = "The daemon itself"),
    )
)]
struct ApiDoc;

/// The router and the OpenAPI document it implies.
pub fn router(core: Core) -> axum::Router {
    let (router, _) = api_routes().split_for_parts();
    let spec_json = serde_json::to_string_pretty(&openapi()).unwrap_or_default();
    router
        .route(
            abx_api::paths::OPENAPI,
            axum::routing::get(
                move || async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], spec_json) },
            ),
        )
        .route(
            abx_api::paths::METRICS,
            axum::routing::get(|axum::extract::State(core): axum::extract::State<Core>| async move {
                match core.execute(crate::core::Command::Metrics).await.and_then(|o| o.text()) {
                    Ok(text) => {
                        ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
                    }
                    Err(e) => ApiError::from(e).into_response(),
                }
            }),
        )
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(core)
}

fn api_routes() -> OpenApiRouter<Core> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(sandboxes::routes())
        .merge(snapshots::routes())
        .merge(exec::routes())
        .merge(files::routes())
        .merge(network::routes())
        .merge(templates::routes())
        .merge(system::routes())
        .merge(keys::routes())
}

/// The OpenAPI document (what `docs/openapi.json` must contain).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut spec = api_routes().into_openapi();
    spec.paths.paths.insert(abx_api::paths::OPENAPI.to_string(), openapi_path_item());
    spec
}

fn openapi_path_item() -> utoipa::openapi::PathItem {
    use utoipa::openapi::path::{HttpMethod, OperationBuilder};
    use utoipa::openapi::{ResponseBuilder, ResponsesBuilder};
    let op = OperationBuilder::new()
        .tag("system")
        .summary(Some("This OpenAPI document"))
        .operation_id(Some("openapi"))
        .responses(ResponsesBuilder::new().response("200", ResponseBuilder::new().description("The document")).build())
        .build();
    utoipa::openapi::PathItem::new(HttpMethod::Get, op)
}

async fn route_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!("no API route {}; see /v1/openapi.json", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not supported on {}", uri.path()),
    )
}

/// An error response: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError { status, body: ErrorBody { error: ErrorDetail { code: code.into(), message: message.into() } } }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let (code, status) = e.code();
        if status >= 500 {
            tracing::warn!(error = %e.full_message(), "request failed");
        }
        ApiError::new(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), code, e.full_message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// `axum::Json` whose rejections use the API's error shape.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the request body is larger than the {} MiB a JSON request may be; \
                     give a process large input over the exec WebSocket (/exec/ws) or in a file",
                    JSON_BODY_LIMIT >> 20
                ),
            )),
            Err(rej) => Err(ApiError::bad_request(format!("invalid request body: {}", rej.body_text()))),
        }
    }
}

/// The most a JSON request body may be: axum's default limit, which the routes keep.
const JSON_BODY_LIMIT: usize = 2 << 20;

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` whose rejections use the API's error shape.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(rej) => Err(ApiError::bad_request(format!("invalid query: {}", rej.body_text()))),
        }
    }
}

/// `axum::extract::Path` whose rejections use the API's error shape.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(rej) => Err(ApiError::bad_request(format!("invalid path parameter: {}", rej.body_text()))),
        }
    }
}

/// An NDJSON response from a stream of serializable items.
pub fn ndjson<S, T>(items: S) -> Response
where
    S: futures_util::Stream<Item = T> + Send + 'static,
    T: serde::Serialize,
{
    use futures_util::StreamExt;
    let body = items.map(|item| {
        let mut line = serde_json::to_vec(&item).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line))
    });
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(body)).into_response()
}
