//! envd's `process.Process` service.
//!
//! Every process is an agentbox background process (it outlives the request, as envd's
//! processes do: `commands.list()` shows it and `commands.connect(pid)` attaches to it
//! again). `Start` starts it in the foreground, so that its stream is the process's
//! owner and gets every byte of output, in order (a slow client slows the process down,
//! as with envd), and at once makes it a background process (`Control::Background`), so
//! that a client that goes away leaves it running. The stream's deadline
//! (`Connect-Timeout-Ms`, the SDK's `timeout`) becomes the process's timeout, after which
//! it is killed, as envd does.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::BytesMut;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use abx_api::{ExecRequest, TtySize};
use abx_proto::Control;

use super::Envd;
use super::connect::{self, RpcError, RpcResult, b64, bool_field, bytes_field, field, int_field, str_field, unary};
use crate::core::{Command, Core, ExecOutput, ExecSession};

pub async fn rpc(
    State(core): State<Core>,
    env: Envd,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match method.as_str() {
        "Start" | "Connect" => {
            let req = match connect::request_message(&headers, body).await {
                Ok(r) => r,
                Err(e) => return connect::stream_error(e),
            };
            let r = if method == "Start" {
                start(&core, &env, &headers, req).await
            } else {
                attach(&core, &env, &req).await
            };
            match r {
                Ok((session, tty)) => connect::stream(output_stream(session, tty, connect::keepalive_secs(&headers))),
                Err(e) => connect::stream_error(e),
            }
        }
        "StreamInput" => stream_input(&core, &env, &headers, body).await,
        _ => {
            let req = match connect::request_message(&headers, body).await {
                Ok(r) => r,
                Err(e) => return unary(Err(e)),
            };
            unary(match method.as_str() {
                "List" => list(&core, &env).await,
                "SendInput" => send_input(&core, &env, &req).await,
                "CloseStdin" => close_stdin(&core, &env, &req).await,
                "SendSignal" => send_signal(&core, &env, &req).await,
                "Update" => update(&core, &env, &req).await,
                m => Err(RpcError::new("unimplemented", format!("process.Process/{m} is not implemented"))),
            })
        }
    }
}

/// A `ProcessSelector` (`{"pid": N}` or `{"tag": "..."}`) as a pid.
async fn select(core: &Core, env: &Envd, req: &Value) -> RpcResult<u32> {
    let sel = field(req, "process", "process").ok_or_else(|| RpcError::invalid("process (a selector) is required"))?;
    if let Some(pid) = int_field(sel, "pid", "pid") {
        return u32::try_from(pid).map_err(|_| RpcError::invalid(format!("invalid pid {pid}")));
    }
    if let Some(tag) = str_field(sel, "tag", "tag") {
        let procs = core.execute(Command::ListProcesses { id: env.id.clone() }).await?.processes()?;
        return procs
            .iter()
            .find(|p| p.exit.is_none() && p.tag.as_deref() == Some(tag))
            .map(|p| p.pid)
            .ok_or_else(|| RpcError::not_found(format!("process with tag {tag} not found")));
    }
    Err(RpcError::invalid("the process selector names neither a pid nor a tag"))
}

/// A pty size `{"size": {"cols", "rows"}}`.
fn pty_size(pty: &Value) -> RpcResult<TtySize> {
    let size = field(pty, "size", "size").ok_or_else(|| RpcError::invalid("pty.size is required"))?;
    let dim = |n: &str| int_field(size, n, n).unwrap_or(0).clamp(1, u16::MAX as i64) as u16;
    Ok(TtySize { rows: dim("rows"), cols: dim("cols") })
}

/// `Start`: starts the process with this stream as its owner, then makes it a background
/// process (see the module docs).
async fn start(core: &Core, env: &Envd, headers: &HeaderMap, req: Value) -> RpcResult<(ExecSession, bool)> {
    let p = field(&req, "process", "process").ok_or_else(|| RpcError::invalid("process is required"))?;
    let cmd = str_field(p, "cmd", "cmd").unwrap_or("").to_string();
    if cmd.is_empty() {
        return Err(RpcError::invalid("process.cmd is required"));
    }
    let args: Vec<String> = field(p, "args", "args")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let envs: BTreeMap<String, String> = field(p, "envs", "envs")
        .and_then(Value::as_object)
        .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    let tty = match field(&req, "pty", "pty") {
        Some(pty) => Some(pty_size(pty)?),
        None => None,
    };
    let stdin = bool_field(&req, "stdin", "stdin");
    let cwd = match str_field(p, "cwd", "cwd").filter(|c| !c.is_empty()) {
        Some(c) => env.path(c),
        None => env.home(),
    };
    let mut exec = ExecRequest {
        cmd: std::iter::once(cmd.clone()).chain(args).collect(),
        env: envs,
        cwd: Some(cwd),
        user: env.user.clone(),
        tty,
        interactive: stdin || tty.is_some(),
        timeout_secs: connect::timeout_ms(headers).map(|ms| ms as f64 / 1000.0),
        background: false,
        tag: str_field(&req, "tag", "tag").map(str::to_string),
        stdin: None,
    };
    let mut started = core.execute(Command::Exec { id: env.id.clone(), req: exec.clone() }).await;
    // E2B runs commands with /bin/bash; templates without bash (busybox) get /bin/sh.
    if cmd == "/bin/bash" && matches!(&started, Err(e) if e.code().0 == "command_not_found") {
        exec.cmd[0] = "/bin/sh".into();
        started = core.execute(Command::Exec { id: env.id.clone(), req: exec }).await;
    }
    let mut session = started?.exec()?;
    // A write that fails found the conversation over: the process already ended and its
    // output and exit wait in the read half.
    let _ = session.conn.writer.json(&Control::Background).await;
    Ok((session, tty.is_some()))
}

/// `Connect`: attach to a running process (its buffered output is replayed first).
async fn attach(core: &Core, env: &Envd, req: &Value) -> RpcResult<(ExecSession, bool)> {
    let pid = select(core, env, req).await?;
    let procs = core.execute(Command::ListProcesses { id: env.id.clone() }).await?.processes()?;
    let Some(info) = procs.iter().find(|p| p.pid == pid && p.exit.is_none()) else {
        return Err(RpcError::not_found(format!("process with pid {pid} not found")));
    };
    let tty = info.tty;
    let session = core.execute(Command::Attach { id: env.id.clone(), pid }).await?.exec()?;
    Ok((session, tty))
}

fn event(e: Value) -> Value {
    json!({ "event": e })
}

/// envd's end event: `exitCode` (-1 for a signal, like Go's `ExitCode()`), `exited`,
/// `status` ("exit status N" or "signal: killed").
fn end_event(st: abx_proto::ExitStatus) -> Value {
    let (code, status) = match (st.code, st.signal) {
        (Some(c), _) => (c, format!("exit status {c}")),
        (None, Some(s)) => (-1, format!("signal: {}", signal_name(s))),
        _ => (-1, "unknown".to_string()),
    };
    let mut end = json!({ "exitCode": code, "exited": st.code.is_some(), "status": status });
    if st.timed_out {
        end["error"] = json!("the process was killed because its timeout expired");
    }
    event(json!({ "end": end }))
}

fn signal_name(s: i32) -> String {
    match s {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        3 => "quit".into(),
        6 => "aborted".into(),
        9 => "killed".into(),
        13 => "broken pipe".into(),
        15 => "terminated".into(),
        n => format!("signal {n}"),
    }
}

/// The events of an attached process: `start`, `data` (stdout, stderr or pty), `end`,
/// with `keepalive` messages while nothing else comes. A separate task reads the agent so
/// that no read is cancelled half-way; a client that goes away detaches (the process runs
/// on until it ends or its timeout).
fn output_stream(session: ExecSession, tty: bool, keepalive: Option<u64>) -> connect::MessageStream {
    let pid = session.pid;
    let (tx, rx) = mpsc::channel::<RpcResult<Value>>(32);
    tokio::spawn(async move {
        let mut session = session;
        loop {
            // A client that went away detaches at once (the read is abandoned with the
            // connection, so no half-read frame can matter).
            let next = tokio::select! {
                n = session.next() => n,
                _ = tx.closed() => return,
            };
            let msg = match next {
                Ok(Some(ExecOutput::Stdout(d))) => {
                    let key = if tty { "pty" } else { "stdout" };
                    Ok(event(json!({ "data": { key: b64(&d) } })))
                }
                Ok(Some(ExecOutput::Stderr(d))) => Ok(event(json!({ "data": { "stderr": b64(&d) } }))),
                Ok(Some(ExecOutput::Exit(st))) => {
                    let _ = tx.send(Ok(end_event(st))).await;
                    return;
                }
                Ok(None) => Err(RpcError::new("unavailable", "the sandbox went away before the process exited")),
                Err(e) => Err(RpcError::from(e)),
            };
            let end = msg.is_err();
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    let first = futures_util::stream::once(async move { Ok(event(json!({ "start": { "pid": pid } }))) });
    let period = Duration::from_secs(keepalive.unwrap_or(3600));
    let rest = futures_util::stream::unfold(
        (rx, tokio::time::interval_at(tokio::time::Instant::now() + period, period)),
        move |(mut rx, mut tick)| async move {
            tokio::select! {
                m = rx.recv() => m.map(|m| (m, (rx, tick))),
                _ = tick.tick(), if keepalive.is_some() => Some((Ok(event(json!({ "keepalive": {} }))), (rx, tick))),
            }
        },
    );
    Box::pin(first.chain(rest))
}

/// `List`: running processes started through the API.
async fn list(core: &Core, env: &Envd) -> RpcResult<Value> {
    let procs = core.execute(Command::ListProcesses { id: env.id.clone() }).await?.processes()?;
    let v: Vec<Value> = procs
        .iter()
        .filter(|p| p.exit.is_none())
        .map(|p| {
            let mut config = json!({
                "cmd": p.argv.first().cloned().unwrap_or_default(),
                "args": p.argv.iter().skip(1).collect::<Vec<_>>(),
                "envs": {},
            });
            if let Some(c) = &p.cwd {
                config["cwd"] = json!(c);
            }
            let mut info = json!({ "config": config, "pid": p.pid });
            if let Some(t) = &p.tag {
                info["tag"] = json!(t);
            }
            info
        })
        .collect();
    Ok(json!({ "processes": v }))
}

/// The bytes of a `ProcessInput` (`stdin` or `pty`).
fn input_bytes(input: &Value) -> RpcResult<Vec<u8>> {
    Ok(match bytes_field(input, "stdin", "stdin")? {
        Some(d) => d,
        None => bytes_field(input, "pty", "pty")?.unwrap_or_default(),
    })
}

async fn write_stdin(core: &Core, env: &Envd, pid: u32, data: Vec<u8>, close: bool) -> RpcResult<()> {
    core.execute(Command::Stdin { id: env.id.clone(), pid, data, close }).await?;
    Ok(())
}

/// `SendInput`: bytes to the process's stdin or terminal.
async fn send_input(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let pid = select(core, env, req).await?;
    let data = match field(req, "input", "input") {
        Some(i) => input_bytes(i)?,
        None => vec![],
    };
    write_stdin(core, env, pid, data, false).await?;
    Ok(json!({}))
}

/// `CloseStdin`: end of input for the process.
async fn close_stdin(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let pid = select(core, env, req).await?;
    write_stdin(core, env, pid, vec![], true).await?;
    Ok(json!({}))
}

/// `SendSignal`: SIGTERM or SIGKILL to the process's group.
async fn send_signal(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let pid = select(core, env, req).await?;
    let signal = match field(req, "signal", "signal") {
        Some(Value::String(s)) => match s.as_str() {
            "SIGNAL_SIGKILL" => 9,
            "SIGNAL_SIGTERM" => 15,
            other => crate::core::parse_signal(&json!(other.trim_start_matches("SIGNAL_")))
                .map_err(|e| RpcError::invalid(e.to_string()))?,
        },
        Some(Value::Number(n)) => n.as_i64().filter(|n| (1..=64).contains(n)).map(|n| n as i32).unwrap_or(9),
        _ => return Err(RpcError::invalid("signal is required")),
    };
    core.execute(Command::Signal { id: env.id.clone(), pid, signal, group: true }).await?;
    Ok(json!({}))
}

/// `Update`: the terminal size of a pty process.
async fn update(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let pid = select(core, env, req).await?;
    let pty = field(req, "pty", "pty").ok_or_else(|| RpcError::invalid("pty is required"))?;
    let size = pty_size(pty)?;
    core.execute(Command::Resize { id: env.id.clone(), pid, size }).await?;
    Ok(json!({}))
}

/// `StreamInput` (client stream): a `start` message selecting the process, then `data`
/// messages, each written to its stdin (or terminal) in order as it arrives.
async fn stream_input(core: &Core, env: &Envd, headers: &HeaderMap, body: Body) -> Response {
    let result = async {
        connect::check_codec(headers)?;
        let mut body = body.into_data_stream();
        let mut buf = BytesMut::new();
        let mut pid: Option<u32> = None;
        loop {
            while let Some((flags, msg)) = connect::take_envelope(&mut buf)? {
                if flags & connect::END_STREAM != 0 {
                    continue;
                }
                let m: Value =
                    serde_json::from_slice(&msg).map_err(|e| RpcError::invalid(format!("invalid message: {e}")))?;
                if let Some(s) = field(&m, "start", "start") {
                    pid = Some(select(core, env, s).await?);
                } else if let Some(d) = field(&m, "data", "data") {
                    let pid = pid.ok_or_else(|| RpcError::invalid("data before the start message"))?;
                    let data = match field(d, "input", "input") {
                        Some(i) => input_bytes(i)?,
                        None => vec![],
                    };
                    write_stdin(core, env, pid, data, false).await?;
                }
            }
            match body.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(RpcError::new("canceled", format!("reading the stream: {e}"))),
                None => break,
            }
        }
        Ok::<_, RpcError>(())
    }
    .await;
    match result {
        Ok(()) => {
            let mut body = BytesMut::new();
            body.extend_from_slice(&connect::envelope(0, b"{}"));
            body.extend_from_slice(&connect::end_stream(None));
            connect::streaming_response(Body::from(body.freeze()))
        }
        Err(e) => connect::stream_error(e),
    }
}
