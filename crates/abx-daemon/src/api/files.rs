//! Files inside a sandbox. Paths are absolute paths inside the sandbox; the agent resolves
//! them within the sandbox's own root, so `..` and symlinks can never leave it.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use abx_api::{ErrorBody, FileInfo, MkdirRequest, RenameRequest};
use abx_proto::{Kind, ProtoError, Reply};

use super::{ApiError, Json, Path, Query};
use crate::agent::{AgentConn, CallError};
use crate::core::{ByteStream, Command, Core};
use crate::error::CoreError;

pub fn routes() -> OpenApiRouter<Core> {
    OpenApiRouter::new()
        .routes(routes!(read, write, remove))
        .routes(routes!(list))
        .routes(routes!(stat))
        .routes(routes!(mkdir))
        .routes(routes!(rename))
        .routes(routes!(archive_read, archive_write))
}

#[derive(Debug, Deserialize, IntoParams)]
struct PathQuery {
    /// Absolute path inside the sandbox.
    path: String,
    /// Act as this user (default: the sandbox's default user).
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
struct WriteQuery {
    /// Absolute path inside the sandbox.
    path: String,
    #[serde(default)]
    user: Option<String>,
    /// Permission bits in octal, e.g. `755` (default 644).
    #[serde(default)]
    mode: Option<String>,
    /// Create missing parent directories (default true).
    #[serde(default)]
    parents: Option<bool>,
}

#[derive(Debug, Deserialize, IntoParams)]
struct ListQuery {
    path: String,
    #[serde(default)]
    user: Option<String>,
    /// How deep to descend (1 = the directory's entries).
    #[serde(default)]
    depth: Option<u32>,
}

#[derive(Debug, Deserialize, IntoParams)]
struct RemoveQuery {
    path: String,
    #[serde(default)]
    user: Option<String>,
    /// Remove directories with their contents.
    #[serde(default)]
    recursive: bool,
}

fn body_stream(req: Request) -> ByteStream {
    Box::pin(req.into_body().into_data_stream().map_err(std::io::Error::other))
}

/// The `Data` frames of an agent connection, up to `Eof`; any other frame or a broken
/// connection ends the stream with an error (the response is cut short).
fn content_stream(conn: AgentConn) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> {
    flush_before_error(futures_util::stream::unfold(Some(conn), |conn| async move {
        let mut conn = conn?;
        match conn.next().await {
            Ok(Some(f)) if f.kind == Kind::Data => Some((Ok(bytes::Bytes::from(f.payload)), Some(conn))),
            Ok(Some(f)) if f.kind == Kind::Eof => None,
            Ok(_) => Some((Err(std::io::Error::other("the sandbox's agent ended the transfer early")), None)),
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    }))
}

/// Passes a response body's stream through, but before its error, lets the server send
/// what it holds. hyper buffers the head and the first chunks while the body has more at
/// once; an error it gets then (the sandbox removed or stopped just after the first frame)
/// closes the connection with nothing sent, and the client saw "connection closed before
/// message completed" (the e2b SDK: "Server disconnected without sending a response"), as
/// if the daemon had failed. Yielding once first makes hyper flush: the client gets the
/// status and the bytes so far, and then a body cut short, which is what happened.
fn flush_before_error<S, T, E>(stream: S) -> impl futures_util::Stream<Item = Result<T, E>>
where
    S: futures_util::Stream<Item = Result<T, E>>,
{
    stream.then(|item| async move {
        if item.is_err() {
            tokio::task::yield_now().await;
        }
        item
    })
}

/// Waits for the first frame of a transfer before answering, so that an error the agent
/// reports before any byte (an unreadable file in a directory, say) gets its own status:
/// once a 200 went out, an error can only cut the response short. So does a sandbox
/// removed, stopped or restarted meanwhile ([`Core::broken`]; before, such a response was
/// cut before its head, and the client saw the connection close).
pub(crate) async fn first_then_rest(core: &Core, id: &str, conn: AgentConn) -> Result<Body, CoreError> {
    first_frame(conn).await.map_err(|e| core.broken(id, e))
}

async fn first_frame(mut conn: AgentConn) -> Result<Body, CoreError> {
    let first = match conn.next().await.map_err(CoreError::from)? {
        Some(f) if f.kind == Kind::Data => bytes::Bytes::from(f.payload),
        Some(f) if f.kind == Kind::Eof => return Ok(Body::empty()),
        Some(f) => {
            let err = match f.json::<Reply<serde_json::Value>>() {
                Ok(Reply::Err(e)) => CallError::Remote(e),
                Ok(Reply::Ok(_)) => CallError::Protocol(ProtoError::Unexpected("a second reply in a transfer".into())),
                Err(e) => CallError::Protocol(e),
            };
            return Err(CoreError::from(err));
        }
        None => return Err(CoreError::from(CallError::Protocol(ProtoError::Closed))),
    };
    let rest = content_stream(conn);
    Ok(Body::from_stream(futures_util::stream::once(async { Ok(first) }).chain(rest)))
}

fn parse_mode(mode: Option<&str>) -> Result<Option<u32>, ApiError> {
    match mode {
        None => Ok(None),
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|v| *v <= 0o7777)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("invalid mode '{m}': use octal permission bits like 644"))),
    }
}

/// Read a file's content.
#[utoipa::path(get, path = abx_api::paths::FILES, tag = "files",
    params(("id" = String, Path, description = "sandbox id or name"), PathQuery),
    responses((status = 200, description = "the content", content_type = "application/octet-stream"),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn read(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let (info, conn) =
        core.execute(Command::ReadFile { id: id.clone(), path: q.path, user: q.user }).await?.content()?;
    let mut resp = first_then_rest(&core, &id, conn).await?.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    h.insert(
        "x-file-mode",
        HeaderValue::from_str(&format!("{:o}", info.mode)).unwrap_or(HeaderValue::from_static("0")),
    );
    Ok(resp)
}

/// Write a file (created or truncated) from the request body.
#[utoipa::path(put, path = abx_api::paths::FILES, tag = "files",
    params(("id" = String, Path, description = "sandbox id or name"), WriteQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = FileInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn write(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<WriteQuery>,
    req: Request,
) -> Result<Json<FileInfo>, ApiError> {
    let mode = parse_mode(q.mode.as_deref())?;
    let cmd = Command::WriteFile {
        id,
        path: q.path,
        user: q.user,
        mode,
        parents: q.parents.unwrap_or(true),
        body: body_stream(req),
    };
    Ok(Json(core.execute(cmd).await?.file_info()?))
}

/// Remove a file or directory.
#[utoipa::path(delete, path = abx_api::paths::FILES, tag = "files",
    params(("id" = String, Path, description = "sandbox id or name"), RemoveQuery),
    responses((status = 204, description = "removed"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    core.execute(Command::Remove { id, path: q.path, user: q.user, recursive: q.recursive }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List a directory.
#[utoipa::path(get, path = abx_api::paths::FILES_LIST, tag = "files",
    params(("id" = String, Path, description = "sandbox id or name"), ListQuery),
    responses((status = 200, body = Vec<FileInfo>), (status = 404, body = ErrorBody)))]
async fn list(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<FileInfo>>, ApiError> {
    let cmd = Command::ListDir { id, path: q.path, user: q.user, depth: q.depth.unwrap_or(1) };
    Ok(Json(core.execute(cmd).await?.files()?))
}

/// Metadata of a path (a final symlink is not followed).
#[utoipa::path(get, path = abx_api::paths::FILES_STAT, tag = "files",
    params(("id" = String, Path, description = "sandbox id or name"), PathQuery),
    responses((status = 200, body = FileInfo), (status = 404, body = ErrorBody)))]
async fn stat(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<FileInfo>, ApiError> {
    Ok(Json(core.execute(Command::Stat { id, path: q.path, user: q.user }).await?.file_info()?))
}

/// Create a directory.
#[utoipa::path(post, path = abx_api::paths::FILES_MKDIR, tag = "files", request_body = MkdirRequest,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = FileInfo), (status = 409, body = ErrorBody)))]
async fn mkdir(
    State(core): State<Core>,
    Path(id): Path<String>,
    Json(req): Json<MkdirRequest>,
) -> Result<Json<FileInfo>, ApiError> {
    Ok(Json(core.execute(Command::Mkdir { id, req }).await?.file_info()?))
}

/// Rename or move a path.
#[utoipa::path(post, path = abx_api::paths::FILES_RENAME, tag = "files", request_body = RenameRequest,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = FileInfo), (status = 404, body = ErrorBody)))]
async fn rename(
    State(core): State<Core>,
    Path(id): Path<String>,
    Json(req): Json<RenameRequest>,
) -> Result<Json<FileInfo>, ApiError> {
    Ok(Json(core.execute(Command::Rename { id, req }).await?.file_info()?))
}

/// A tar archive of a file or directory (its top entry is the path's last component).
#[utoipa::path(get, path = abx_api::paths::ARCHIVE, tag = "files",
    params(("id" = String, Path, description = "sandbox id or name"), PathQuery),
    responses((status = 200, description = "tar archive", content_type = "application/x-tar"),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn archive_read(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let (_, conn) =
        core.execute(Command::ArchiveRead { id: id.clone(), path: q.path, user: q.user }).await?.content()?;
    let mut resp = first_then_rest(&core, &id, conn).await?.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
    Ok(resp)
}

/// Extract a tar archive (the request body) into a directory.
#[utoipa::path(put, path = abx_api::paths::ARCHIVE, tag = "files",
    params(("id" = String, Path, description = "sandbox id or name"), PathQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 204, description = "extracted"), (status = 400, body = ErrorBody)))]
async fn archive_write(
    State(core): State<Core>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    req: Request,
) -> Result<StatusCode, ApiError> {
    core.execute(Command::ArchiveWrite { id, path: q.path, user: q.user, body: body_stream(req) }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves one response whose body is `first`, then an error at once, with the
    /// Content-Length of a longer file; returns what a client read.
    async fn served() -> Vec<u8> {
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || async move {
                let items = vec![Ok(bytes::Bytes::from(vec![b'x'; 1000])), Err(std::io::Error::other("cut"))];
                let stream = futures_util::stream::iter(items);
                let mut resp = Body::from_stream(flush_before_error(stream)).into_response();
                resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(5000u64));
                resp
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: agentbox\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read_to_end(&mut got)).await;
        server.abort();
        got
    }

    /// A download cut right after its first frame (the sandbox removed or stopped) gets
    /// its status and first bytes to the client, then ends short; without the yield, hyper
    /// (1.12) closed the connection with nothing sent (the client read "").
    #[tokio::test]
    async fn a_body_cut_after_its_first_chunk_still_sends_the_head_and_the_chunk() {
        let got = served().await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
        assert!(text.contains("content-length: 5000\r\n"), "{text:?}");
        assert!(text.ends_with(&"x".repeat(1000)), "{text:?}");
    }
}
