//! Processes: exec with streamed output (NDJSON), interactive exec and attach over
//! WebSocket, background processes, signals, stdin, terminal size.
//!
//! WebSocket framing (both exec and attach): the client's first text message on
//! `/exec/ws` is an [`ExecRequest`]. Afterwards the client sends binary messages
//! `[0] + bytes` (stdin) and `[1]` (close stdin), and text messages with a JSON
//! `{"op":"signal","signal":N}` or `{"op":"resize","size":{"rows":R,"cols":C}}`. The server
//! sends binary `[1] + bytes` (stdout) and `[2] + bytes` (stderr), and text messages with
//! [`ExecEvent`]s (`started`, `exit`, `error`). Closing the socket of a foreground process
//! kills it.

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use abx_api::{
    ErrorBody, ExecEvent, ExecRequest, ProcessInfo, RunRequest, SignalRequest, Started, StdinRequest, TtySize,
};
use abx_proto::{Control, Frame, Kind};

use super::{ApiError, Json, Path, ndjson};
use crate::core::{Command, Core, ExecSession, parse_signal};
use crate::error::CoreError;

pub fn routes() -> OpenApiRouter<Core> {
    OpenApiRouter::new()
        .routes(routes!(run))
        .routes(routes!(exec))
        .routes(routes!(exec_ws))
        .routes(routes!(list))
        .routes(routes!(signal))
        .routes(routes!(stdin))
        .routes(routes!(resize))
        .routes(routes!(output))
        .routes(routes!(attach_ws))
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Run a process. Foreground: the response streams [`ExecEvent`]s as NDJSON (`started`,
/// `stdout`/`stderr` with base64 data, then `exit`). With `background: true` the response
/// is the new process's pid.
#[utoipa::path(post, path = abx_api::paths::EXEC, tag = "exec", request_body = ExecRequest,
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, description = "NDJSON stream of ExecEvent", body = ExecEvent, content_type = "application/x-ndjson"),
        (status = 201, description = "background process started", body = Started),
        (status = 400, description = "bad request or command not found", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "sandbox not running", body = ErrorBody)))]
async fn exec(
    State(core): State<Core>,
    Path(id): Path<String>,
    Json(req): Json<ExecRequest>,
) -> Result<Response, ApiError> {
    if req.interactive && !req.background {
        return Err(ApiError::bad_request("interactive exec needs the WebSocket endpoint /exec/ws"));
    }
    if req.background {
        let pid = core.execute(Command::Exec { id, req }).await?.started()?;
        return Ok((StatusCode::CREATED, Json(Started { pid })).into_response());
    }
    let session = core.execute(Command::Exec { id, req }).await?.exec()?;
    Ok(ndjson(event_stream(session)))
}

/// Create a sandbox, run one command, destroy the sandbox: one request for the common
/// one-shot case. Streams NDJSON [`ExecEvent`]s: `created`, `started`, output, `exit`; the
/// stream ends once the sandbox is destroyed (also when the client goes away early).
#[utoipa::path(post, path = abx_api::paths::RUN, tag = "exec", request_body = RunRequest,
    responses((status = 200, description = "NDJSON stream of ExecEvent", body = ExecEvent, content_type = "application/x-ndjson"),
        (status = 400, description = "bad request or command not found", body = ErrorBody),
        (status = 404, description = "unknown template", body = ErrorBody)))]
async fn run(State(core): State<Core>, Json(req): Json<RunRequest>) -> Result<Response, ApiError> {
    if req.exec.interactive || req.exec.background {
        return Err(ApiError::bad_request("/v1/run runs one non-interactive foreground command"));
    }
    let run = core.execute(Command::Run(req)).await?.run()?;
    let created = ExecEvent::Created { id: run.sandbox.id.clone() };
    let guard = run.guard;
    let events = event_stream(run.session);
    let tail = futures_util::stream::once(async move {
        let result = guard.destroy().await;
        result.err().map(|e| {
            let (code, _) = e.code();
            ExecEvent::Error { code: code.into(), message: e.full_message() }
        })
    })
    .filter_map(|e| async move { e });
    use futures_util::StreamExt;
    Ok(ndjson(futures_util::stream::once(async move { created }).chain(events).chain(tail)))
}

/// Turns an attached process into a stream of API events, starting with `started`.
fn event_stream(session: ExecSession) -> impl futures_util::Stream<Item = ExecEvent> + Send {
    let first = ExecEvent::Started { pid: session.pid };
    futures_util::stream::unfold((Some(first), Some(session)), |(first, session)| async move {
        if let Some(ev) = first {
            return Some((ev, (None, session)));
        }
        let mut session = session?;
        match session.next().await {
            Ok(Some(out)) => {
                let ev = output_event(out);
                let done = matches!(ev, ExecEvent::Exit { .. });
                Some((ev, (None, if done { None } else { Some(session) })))
            }
            Ok(None) => Some((lost_event(), (None, None))),
            Err(e) => {
                let (code, _) = e.code();
                Some((ExecEvent::Error { code: code.into(), message: e.full_message() }, (None, None)))
            }
        }
    })
}

/// The end of an interactive session whose agent connection broke: a conflict naming a
/// removal, stop or restart of the sandbox meanwhile, else [`lost_event`].
fn cut_event(sb: &crate::sandbox::Sandbox) -> ExecEvent {
    match crate::core::cut_short(sb) {
        Some(e) => ExecEvent::Error { code: e.code().0.into(), message: e.full_message() },
        None => lost_event(),
    }
}

fn lost_event() -> ExecEvent {
    ExecEvent::Error {
        code: "agent_unavailable".into(),
        message: "the sandbox went away before the process exited".into(),
    }
}

fn output_event(out: crate::core::ExecOutput) -> ExecEvent {
    use crate::core::ExecOutput;
    match out {
        ExecOutput::Stdout(d) => ExecEvent::Stdout { data: b64(&d) },
        ExecOutput::Stderr(d) => ExecEvent::Stderr { data: b64(&d) },
        ExecOutput::Exit(st) => ExecEvent::Exit { code: st.code, signal: st.signal, timed_out: st.timed_out },
    }
}

/// Runs `f` as `caller` (none: as nobody, which [`Core::execute`] refuses).
async fn as_caller<F: std::future::Future<Output = ()>>(caller: Option<crate::auth::Caller>, f: F) {
    match caller {
        Some(c) => crate::auth::acting_as(c, f).await,
        None => f.await,
    }
}

/// Interactive exec over a WebSocket (stdin, signals, terminal resize); see the module docs
/// for the message format.
#[utoipa::path(get, path = abx_api::paths::EXEC_WS, tag = "exec",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 101, description = "switching to the WebSocket protocol"), (status = 400, body = ErrorBody)))]
async fn exec_ws(State(core): State<Core>, Path(id): Path<String>, ws: WebSocketUpgrade) -> Response {
    // The upgraded connection is served by a task of its own: it acts for the same caller.
    let caller = crate::auth::caller();
    ws.on_upgrade(move |socket| {
        as_caller(caller, async move {
            let mut socket = socket;
            let req = match first_request(&mut socket).await {
                Ok(r) => r,
                Err(msg) => return send_error(&mut socket, "invalid_argument", &msg).await,
            };
            let req = ExecRequest { interactive: true, background: false, ..req };
            match core.execute(Command::Exec { id, req }).await.and_then(|o| o.exec()) {
                Ok(session) => pump(socket, session).await,
                Err(e) => {
                    let (code, _) = e.code();
                    send_error(&mut socket, code, &e.full_message()).await
                }
            }
        })
    })
}

async fn first_request(socket: &mut WebSocket) -> Result<ExecRequest, String> {
    match socket.recv().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).map_err(|e| format!("invalid exec request: {e}")),
        _ => Err("the first message must be an exec request as JSON text".into()),
    }
}

async fn send_event(socket: &mut WebSocket, ev: &ExecEvent) -> bool {
    let text = serde_json::to_string(ev).unwrap_or_default();
    socket.send(Message::Text(text.into())).await.is_ok()
}

async fn send_error(socket: &mut WebSocket, code: &str, message: &str) {
    let _ = send_event(socket, &ExecEvent::Error { code: code.into(), message: message.into() }).await;
    let _ = socket.send(Message::Close(None)).await;
}

/// Shuttles between a WebSocket and an attached process until the process exits or the
/// client goes away. Frames from the agent are read by one task and the client's messages
/// written to the agent by another, so no read is ever cancelled half-way and a process
/// that does not read its stdin does not hold up its output. Like a local pipe, input the
/// process can no longer take (it closed stdin or exited) is dropped: the exchange goes on
/// until the exit is forwarded.
async fn pump(mut socket: WebSocket, session: ExecSession) {
    let ExecSession { pid, conn, attached: _attached, sandbox } = session;
    let crate::agent::AgentConn { mut reader, writer, .. } = conn;
    if !send_event(&mut socket, &ExecEvent::Started { pid }).await {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<Result<Option<Frame>, String>>(16);
    let reader_task = tokio::spawn(async move {
        loop {
            let r = reader.next().await.map_err(|e| e.to_string());
            let end = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || end {
                return;
            }
        }
    });
    let (input_tx, input_rx) = mpsc::channel::<Message>(16);
    let writer_task = tokio::spawn(agent_input(writer, input_rx));
    // A client that stops reading holds up a send for as long as it likes while the
    // sandbox runs (its process waits on its output, as on a pipe); once the sandbox's
    // first process has gone (a removal, a stop, its end), it gets GIVE_UP more and then
    // the connection is closed instead of being held for good.
    let gone = sandbox_gone(sandbox.exited.clone());
    tokio::pin!(gone);
    // Room in `input_tx` for the next client message: the socket is read only when there
    // is (backpressure on a client sending faster than the process reads).
    let mut room = None;
    loop {
        tokio::select! {
            frame = rx.recv() => {
                match frame {
                    Some(Ok(Some(f))) => {
                        let sent = tokio::select! {
                            sent = forward_frame(&mut socket, f) => sent,
                            () = &mut gone => false,
                        };
                        if !sent { break; }
                    }
                    _ => {
                        let cut = cut_event(&sandbox);
                        tokio::select! {
                            _ = send_event(&mut socket, &cut) => {}
                            () = &mut gone => {}
                        }
                        break;
                    }
                }
            }
            permit = input_tx.reserve(), if room.is_none() => match permit {
                Ok(p) => room = Some(p),
                Err(_) => break,
            },
            msg = socket.recv(), if room.is_some() => {
                let Some(Ok(msg)) = msg else { break };
                if matches!(msg, Message::Close(_)) { break; }
                if let Some(p) = room.take() { p.send(msg); }
            }
        }
    }
    drop(room);
    // Dropping the agent connection's write half tells the agent the client left (which
    // kills a foreground process that has not exited); a write blocked on a process that
    // does not read is cancelled with it.
    writer_task.abort();
    reader_task.abort();
    let _ = tokio::time::timeout(GIVE_UP, socket.send(Message::Close(None))).await;
}

/// How long a WebSocket client that does not read is waited for once the sandbox's first
/// process has gone, or for the closing message.
const GIVE_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves [`GIVE_UP`] after the sandbox's first process exited (its watch says so, or
/// its sender is gone, which happens only after that).
async fn sandbox_gone(mut exited: tokio::sync::watch::Receiver<bool>) {
    let _ = exited.wait_for(|e| *e).await;
    tokio::time::sleep(GIVE_UP).await;
}

/// Sends one agent frame to the client; false when the exchange is over.
async fn forward_frame(socket: &mut WebSocket, f: Frame) -> bool {
    match f.kind {
        Kind::Stdout | Kind::Stderr => {
            let tag = if f.kind == Kind::Stdout { 1u8 } else { 2u8 };
            let mut buf = Vec::with_capacity(f.payload.len() + 1);
            buf.push(tag);
            buf.extend_from_slice(&f.payload);
            socket.send(Message::Binary(buf.into())).await.is_ok()
        }
        Kind::Json => match f.json::<abx_proto::Event>() {
            Ok(abx_proto::Event::Exit(st)) => {
                let _ =
                    send_event(socket, &ExecEvent::Exit { code: st.code, signal: st.signal, timed_out: st.timed_out })
                        .await;
                false
            }
            _ => true,
        },
        _ => true,
    }
}

/// Passes the client's messages to the agent until the pump drops its sender. After a
/// failed write (the agent finished the process and closed its side) the rest is
/// dropped: the exit is on its way from the agent. The write half stays open meanwhile,
/// since its end would tell the agent that the client left.
async fn agent_input(
    mut writer: abx_proto::FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Message>,
) {
    let mut open = true;
    while let Some(msg) = rx.recv().await {
        if open {
            open = handle_client(&mut writer, msg).await;
        }
    }
}

/// Applies one client message; false when the agent no longer takes input.
async fn handle_client(writer: &mut abx_proto::FrameWriter<tokio::net::unix::OwnedWriteHalf>, msg: Message) -> bool {
    match msg {
        Message::Binary(b) => match b.first() {
            Some(0) => writer.send_chunked(Kind::Stdin, &b[1..]).await.is_ok(),
            Some(1) => writer.send(Kind::Eof, b"").await.is_ok(),
            _ => true,
        },
        Message::Text(t) => match serde_json::from_str::<Control>(&t) {
            Ok(c) => writer.json(&c).await.is_ok(),
            Err(_) => true,
        },
        _ => true,
    }
}

/// Processes started through the API that are running, or finished in the background.
#[utoipa::path(get, path = abx_api::paths::PROCESSES, tag = "exec",
    params(("id" = String, Path, description = "sandbox id or name")),
    responses((status = 200, body = Vec<ProcessInfo>), (status = 404, body = ErrorBody)))]
async fn list(State(core): State<Core>, Path(id): Path<String>) -> Result<Json<Vec<ProcessInfo>>, ApiError> {
    Ok(Json(core.execute(Command::ListProcesses { id }).await?.processes()?))
}

/// Send a signal to a process (by default to its whole process group).
#[utoipa::path(post, path = abx_api::paths::PROCESS_SIGNAL, tag = "exec", request_body = SignalRequest,
    params(("id" = String, Path, description = "sandbox id or name"), ("pid" = u32, Path, description = "process id inside the sandbox")),
    responses((status = 204, description = "sent"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn signal(
    State(core): State<Core>,
    Path((id, pid)): Path<(String, u32)>,
    Json(req): Json<SignalRequest>,
) -> Result<StatusCode, ApiError> {
    let signal = parse_signal(&req.signal)?;
    core.execute(Command::Signal { id, pid, signal, group: req.group.unwrap_or(true) }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Write to (and optionally close) a background process's stdin.
#[utoipa::path(post, path = abx_api::paths::PROCESS_STDIN, tag = "exec", request_body = StdinRequest,
    params(("id" = String, Path, description = "sandbox id or name"), ("pid" = u32, Path, description = "process id inside the sandbox")),
    responses((status = 204, description = "written"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn stdin(
    State(core): State<Core>,
    Path((id, pid)): Path<(String, u32)>,
    Json(req): Json<StdinRequest>,
) -> Result<StatusCode, ApiError> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(&req.data)
        .map_err(|e| CoreError::Invalid(format!("data is not valid base64: {e}")))?;
    core.execute(Command::Stdin { id, pid, data, close: req.close }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Change the terminal size of a process started with a TTY.
#[utoipa::path(post, path = abx_api::paths::PROCESS_RESIZE, tag = "exec", request_body = TtySize,
    params(("id" = String, Path, description = "sandbox id or name"), ("pid" = u32, Path, description = "process id inside the sandbox")),
    responses((status = 204, description = "resized"), (status = 404, body = ErrorBody)))]
async fn resize(
    State(core): State<Core>,
    Path((id, pid)): Path<(String, u32)>,
    Json(size): Json<TtySize>,
) -> Result<StatusCode, ApiError> {
    core.execute(Command::Resize { id, pid, size }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attach to a process's output: buffered output first, then live output until it exits
/// (NDJSON of ExecEvent). Detaching does not stop the process.
#[utoipa::path(get, path = abx_api::paths::PROCESS_OUTPUT, tag = "exec",
    params(("id" = String, Path, description = "sandbox id or name"), ("pid" = u32, Path, description = "process id inside the sandbox")),
    responses((status = 200, description = "NDJSON stream of ExecEvent", body = ExecEvent, content_type = "application/x-ndjson"),
        (status = 404, body = ErrorBody)))]
async fn output(State(core): State<Core>, Path((id, pid)): Path<(String, u32)>) -> Result<Response, ApiError> {
    let session = core.execute(Command::Attach { id, pid }).await?.exec()?;
    Ok(ndjson(event_stream(session)))
}

/// Attach to a process interactively over a WebSocket (same messages as `/exec/ws`, without
/// the initial request). Closing the socket detaches.
#[utoipa::path(get, path = abx_api::paths::PROCESS_WS, tag = "exec",
    params(("id" = String, Path, description = "sandbox id or name"), ("pid" = u32, Path, description = "process id inside the sandbox")),
    responses((status = 101, description = "switching to the WebSocket protocol")))]
async fn attach_ws(State(core): State<Core>, Path((id, pid)): Path<(String, u32)>, ws: WebSocketUpgrade) -> Response {
    let caller = crate::auth::caller();
    ws.on_upgrade(move |mut socket| {
        as_caller(caller, async move {
            match core.execute(Command::Attach { id, pid }).await.and_then(|o| o.exec()) {
                Ok(session) => pump(socket, session).await,
                Err(e) => {
                    let (code, _) = e.code();
                    send_error(&mut socket, code, &e.full_message()).await
                }
            }
        })
    })
}
