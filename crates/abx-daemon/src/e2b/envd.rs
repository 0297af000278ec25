//! envd's plain HTTP routes: `/health` and `/files` (download; upload as multipart form
//! data or an octet stream).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use serde_json::{Value, json};

use abx_api::SandboxState;

use super::{E2bError, Envd, envd_target, query_param};
use crate::core::{ByteStream, Command, Core};

/// `GET /health` (with the sandbox's access token): 204 while the sandbox runs; 502 (as E2B's proxy answers) when it is
/// gone or paused, which the SDK's `is_running()` reports as not running.
pub async fn health(State(core): State<Core>, headers: HeaderMap) -> Response {
    let Some((id, _)) = envd_target(&headers) else {
        return E2bError::bad_request("no sandbox named (E2b-Sandbox-Id)").into_response();
    };
    // The token is a function of the id: it is checked for sandboxes that are gone too.
    let token = headers.get("x-access-token").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !super::check_sandbox_token(&core, &id, token.trim()) {
        return E2bError::new(StatusCode::UNAUTHORIZED, "a valid access token is required (X-Access-Token)")
            .into_response();
    }
    match core.execute(Command::GetSandbox { id: id.clone() }).await.and_then(|o| o.sandbox()) {
        Ok(sb) if matches!(sb.state, SandboxState::Running | SandboxState::Creating | SandboxState::Starting) => {
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(sb) if matches!(sb.state, SandboxState::Paused | SandboxState::Stopped | SandboxState::Stopping) => {
            E2bError::new(StatusCode::BAD_GATEWAY, format!("The sandbox {id} is paused")).into_response()
        }
        _ => E2bError::sandbox_gone(&id).into_response(),
    }
}

/// envd's file errors: 404 for missing files (the SDK raises `FileNotFoundException`).
fn file_error(e: crate::error::CoreError) -> E2bError {
    E2bError::from(e)
}

/// `GET /files?path=&username=`: the file's content.
pub async fn read(State(core): State<Core>, env: Envd, uri: Uri) -> Result<Response, E2bError> {
    let path = query_param(uri.query(), "path").ok_or_else(|| E2bError::bad_request("path is required"))?;
    let path = env.path(&path);
    let (info, conn) = core
        .execute(Command::ReadFile { id: env.id.clone(), path, user: env.user.clone() })
        .await
        .and_then(|o| o.content())
        .map_err(file_error)?;
    let body = crate::api::first_then_rest(&core, &env.id, conn).await.map_err(file_error)?;
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", info.name.replace('"', ""))) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// `POST /files?path=&username=`: writes files, creating missing parent directories
/// (owned by the user). The body is `multipart/form-data` (parts named `file`, each
/// file's path from `path` or else the part's file name) or `application/octet-stream`
/// (one file at `path`). Answers `[{"name", "type": "file", "path"}]`.
pub async fn write(State(core): State<Core>, env: Envd, req: Request) -> Result<Response, E2bError> {
    let query = req.uri().query().map(str::to_string);
    let path_param = query_param(query.as_deref(), "path").filter(|p| !p.is_empty());
    if req.headers().get(header::CONTENT_ENCODING).is_some_and(|v| v.as_bytes() != b"identity") {
        return Err(E2bError::bad_request(
            "compressed uploads (gzip=True) are not supported by agentbox; upload without gzip",
        ));
    }
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut written: Vec<Value> = vec![];
    if ct.starts_with("multipart/form-data") {
        let boundary =
            multer::parse_boundary(&ct).map_err(|e| E2bError::bad_request(format!("multipart body: {e}")))?;
        let stream = req.into_body().into_data_stream();
        let mut mp = multer::Multipart::new(stream, boundary);
        loop {
            let field = mp.next_field().await.map_err(|e| E2bError::bad_request(format!("multipart body: {e}")))?;
            let Some(field) = field else { break };
            let dest = match (&path_param, field.file_name()) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) if !f.is_empty() => f.to_string(),
                _ => return Err(E2bError::bad_request("a file part has no path: give ?path= or a file name")),
            };
            let body: ByteStream = Box::pin(field.map_err(std::io::Error::other));
            written.push(write_one(&core, &env, &dest, body).await?);
        }
        if written.is_empty() {
            return Err(E2bError::bad_request("the upload holds no file"));
        }
    } else {
        let dest = path_param.ok_or_else(|| E2bError::bad_request("path is required for an octet-stream upload"))?;
        let body: ByteStream = Box::pin(req.into_body().into_data_stream().map_err(std::io::Error::other));
        written.push(write_one(&core, &env, &dest, body).await?);
    }
    Ok(axum::Json(Value::Array(written)).into_response())
}

async fn write_one(core: &Core, env: &Envd, dest: &str, body: ByteStream) -> Result<Value, E2bError> {
    let path = env.path(dest);
    let info = core
        .execute(Command::WriteFile {
            id: env.id.clone(),
            path: path.clone(),
            user: env.user.clone(),
            mode: None,
            parents: true,
            body,
        })
        .await
        .and_then(|o| o.file_info())
        .map_err(file_error)?;
    Ok(json!({ "name": info.name, "type": "file", "path": info.path }))
}
