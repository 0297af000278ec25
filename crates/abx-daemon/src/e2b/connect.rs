//! The Connect protocol (connectrpc.com) with the JSON codec, as envd speaks it.
//!
//! - Unary: `POST /pkg.Service/Method`, `Content-Type: application/json`, the request
//!   message as the body; the answer is the response message (200) or an error
//!   `{"code": "not_found", "message"}` with the matching HTTP status.
//! - Streams: `Content-Type: application/connect+json`; every message is an envelope, one
//!   flags byte (2 = end of stream) and a big-endian u32 length, then the JSON. A server
//!   stream always answers 200 and ends with an end-of-stream envelope, `{}` or
//!   `{"error": {"code", "message"}}`.
//!
//! Messages are protobuf's JSON mapping: lowerCamelCase names (the original names are
//! accepted too), default values left out, 64-bit integers as strings, bytes as base64,
//! enums by name, `Timestamp`s as RFC 3339.

use std::pin::Pin;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::error::CoreError;

/// Envelope flag: the last message of a stream (the end-of-stream message).
pub const END_STREAM: u8 = 2;
/// Largest request message accepted (file data goes over `/files`, not RPC).
pub const MAX_MESSAGE: usize = 16 << 20;

/// A Connect error.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: &'static str,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("invalid_argument", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new("not_found", message)
    }

    /// The HTTP status of a unary error (the Connect specification's table).
    pub fn status(&self) -> StatusCode {
        let s = match self.code {
            "canceled" => 499,
            "invalid_argument" | "failed_precondition" | "out_of_range" => 400,
            "deadline_exceeded" => 504,
            "not_found" => 404,
            "already_exists" | "aborted" => 409,
            "permission_denied" => 403,
            "resource_exhausted" => 429,
            "unimplemented" => 501,
            "unavailable" => 503,
            "unauthenticated" => 401,
            _ => 500,
        };
        StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

impl From<CoreError> for RpcError {
    fn from(e: CoreError) -> Self {
        let (code, status) = e.code();
        if status >= 500 {
            tracing::warn!(error = %e.full_message(), code, "e2b envd request failed");
        }
        let c = match code {
            "not_found" => "not_found",
            "invalid_argument" | "command_not_found" | "not_a_directory" | "is_a_directory" => "invalid_argument",
            "already_exists" => "already_exists",
            "directory_not_empty" | "conflict" => "failed_precondition",
            "permission_denied" => "permission_denied",
            "resource_exhausted" => "resource_exhausted",
            "agent_timeout" => "deadline_exceeded",
            "agent_unavailable" => "unavailable",
            _ => "internal",
        };
        RpcError::new(c, e.full_message())
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.json())).into_response()
    }
}

pub type RpcResult<T> = Result<T, RpcError>;

/// Whether the request uses the streaming content type.
pub fn is_streaming(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/connect+json"))
}

/// Refuses codecs other than JSON.
pub fn check_codec(headers: &HeaderMap) -> RpcResult<()> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let ct = ct.split(';').next().unwrap_or("").trim();
    if matches!(ct, "application/json" | "application/connect+json") {
        Ok(())
    } else {
        Err(RpcError::new("internal", format!("unsupported content type {ct}: agentbox's envd speaks the JSON codec")))
    }
}

/// One envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[flags]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// Takes one complete envelope off the front of `buf`, if there is one.
pub fn take_envelope(buf: &mut BytesMut) -> RpcResult<Option<(u8, Bytes)>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(RpcError::new("resource_exhausted", format!("message of {len} bytes is too large")));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let flags = buf[0];
    if flags & 1 != 0 {
        return Err(RpcError::new("internal", "compressed messages are not supported"));
    }
    let _ = buf.split_to(5);
    Ok(Some((flags, buf.split_to(len).freeze())))
}

/// The request message of a unary call, or of a server-streaming call (one envelope).
pub async fn request_message(headers: &HeaderMap, body: Body) -> RpcResult<Value> {
    check_codec(headers)?;
    let bytes = axum::body::to_bytes(body, MAX_MESSAGE + 5)
        .await
        .map_err(|e| RpcError::invalid(format!("reading the request: {e}")))?;
    let payload = if is_streaming(headers) {
        let mut buf = BytesMut::from(&bytes[..]);
        match take_envelope(&mut buf)? {
            Some((_, p)) => p,
            None => return Err(RpcError::invalid("the request holds no complete message")),
        }
    } else {
        bytes
    };
    if payload.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&payload).map_err(|e| RpcError::invalid(format!("invalid request message: {e}")))
}

/// A unary answer.
pub fn unary(result: RpcResult<Value>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Items of a server stream: messages, then at most one error that ends it.
pub type MessageStream = Pin<Box<dyn Stream<Item = RpcResult<Value>> + Send>>;

/// A server-streaming answer: the messages as envelopes and the end-of-stream message.
pub fn stream(messages: MessageStream) -> Response {
    let body = futures_util::stream::unfold(Some(messages), |state| async move {
        let mut messages = state?;
        match messages.next().await {
            Some(Ok(v)) => {
                Some((Ok::<_, std::convert::Infallible>(envelope(0, v.to_string().as_bytes())), Some(messages)))
            }
            Some(Err(e)) => Some((Ok(end_stream(Some(&e))), None)),
            None => Some((Ok(end_stream(None)), None)),
        }
    });
    streaming_response(Body::from_stream(body))
}

/// A stream that fails at once (the answer of a server stream that could not start).
pub fn stream_error(e: RpcError) -> Response {
    streaming_response(Body::from(end_stream(Some(&e))))
}

pub fn end_stream(error: Option<&RpcError>) -> Bytes {
    let v = match error {
        Some(e) => json!({ "error": e.json() }),
        None => json!({}),
    };
    envelope(END_STREAM, v.to_string().as_bytes())
}

pub fn streaming_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/connect+json"));
    resp
}

/// Milliseconds from `Connect-Timeout-Ms`.
pub fn timeout_ms(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .filter(|v| *v > 0)
}

/// Seconds between keepalive messages the client asked for (`Keepalive-Ping-Interval`).
pub fn keepalive_secs(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .filter(|v| *v > 0)
}

/// A field by its JSON (lowerCamelCase) or proto (snake_case) name.
pub fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(snake)).filter(|x| !x.is_null())
}

pub fn str_field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a str> {
    field(v, camel, snake).and_then(Value::as_str)
}

pub fn bool_field(v: &Value, camel: &str, snake: &str) -> bool {
    field(v, camel, snake).and_then(Value::as_bool).unwrap_or(false)
}

/// An integer given as a JSON number or string (protobuf's 64-bit form).
pub fn int_field(v: &Value, camel: &str, snake: &str) -> Option<i64> {
    match field(v, camel, snake)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Base64 bytes (standard or URL-safe alphabet, padding optional).
pub fn bytes_field(v: &Value, camel: &str, snake: &str) -> RpcResult<Option<Vec<u8>>> {
    use base64::Engine;
    let Some(s) = str_field(v, camel, snake) else { return Ok(None) };
    let cleaned: String = s
        .chars()
        .filter(|c| *c != '=')
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(cleaned)
        .map(Some)
        .map_err(|e| RpcError::invalid(format!("{camel} is not valid base64: {e}")))
}

pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&envelope(0, b"{\"a\":1}"));
        buf.extend_from_slice(&envelope(END_STREAM, b"{}")[..3]);
        let (flags, msg) = take_envelope(&mut buf).unwrap().unwrap();
        assert_eq!((flags, &msg[..]), (0, &b"{\"a\":1}"[..]));
        assert!(take_envelope(&mut buf).unwrap().is_none(), "incomplete");
        buf.extend_from_slice(&envelope(END_STREAM, b"{}")[3..]);
        assert_eq!(take_envelope(&mut buf).unwrap().unwrap(), (END_STREAM, Bytes::from_static(b"{}")));
    }

    #[test]
    fn json_fields() {
        let v = json!({"exitCode": "-3", "watcher_id": "w", "data": "aGk", "pid": 7});
        assert_eq!(int_field(&v, "exitCode", "exit_code"), Some(-3));
        assert_eq!(str_field(&v, "watcherId", "watcher_id"), Some("w"));
        assert_eq!(bytes_field(&v, "data", "data").unwrap(), Some(b"hi".to_vec()));
        assert_eq!(int_field(&v, "pid", "pid"), Some(7));
    }
}
