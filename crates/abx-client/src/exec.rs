//! Running processes: streamed exec, background processes, attach.

use abx_api::{ExecEvent, ExecRequest, ProcessInfo, SignalRequest, Started, StdinRequest, TtySize, paths};
use base64::Engine;
use bytes::BytesMut;
use futures_util::StreamExt;
use reqwest::Method;
use serde::de::DeserializeOwned;

use crate::{Client, Error, Result};

/// A stream of NDJSON values from a response body.
pub struct NdjsonStream<T> {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: BytesMut,
    _t: std::marker::PhantomData<T>,
}

impl<T: DeserializeOwned> NdjsonStream<T> {
    pub(crate) fn new(resp: reqwest::Response) -> Self {
        NdjsonStream { body: resp.bytes_stream().boxed(), buf: BytesMut::new(), _t: std::marker::PhantomData }
    }

    /// The next value, `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..line.len() - 1];
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map(Some)
                    .map_err(|e| Error::Protocol(format!("bad stream line: {e}")));
            }
            match self.body.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk?),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(Error::Protocol("stream ended inside a line".into())),
            }
        }
    }
}

impl<T> std::fmt::Debug for NdjsonStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NdjsonStream")
    }
}

/// Output of a process, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// A one-shot run created this sandbox.
    Created(String),
    Started(u32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(abx_api::ExitStatus),
}

/// The output stream of an exec or attach.
#[derive(Debug)]
pub struct ExecStream {
    inner: NdjsonStream<ExecEvent>,
}

impl ExecStream {
    /// The next event; `None` after the exit.
    pub async fn next(&mut self) -> Result<Option<OutputEvent>> {
        let Some(ev) = self.inner.next().await? else { return Ok(None) };
        decode(ev).map(Some)
    }

    /// Collects everything until the stream ends (for a one-shot run, that is after the
    /// sandbox is destroyed).
    pub async fn collect(mut self) -> Result<Output> {
        let mut out = Output::default();
        let mut exited = false;
        while let Some(ev) = self.next().await? {
            match ev {
                OutputEvent::Created(_) => {}
                OutputEvent::Started(pid) => out.pid = pid,
                OutputEvent::Stdout(d) => out.stdout.extend(d),
                OutputEvent::Stderr(d) => out.stderr.extend(d),
                OutputEvent::Exit(st) => {
                    out.status = st;
                    exited = true;
                }
            }
        }
        if !exited {
            return Err(Error::Protocol("the output stream ended before the process exited".into()));
        }
        Ok(out)
    }
}

pub(crate) fn decode(ev: ExecEvent) -> Result<OutputEvent> {
    let b64 = |s: &str| {
        base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| Error::Protocol(format!("bad base64: {e}")))
    };
    Ok(match ev {
        ExecEvent::Created { id } => OutputEvent::Created(id),
        ExecEvent::Started { pid } => OutputEvent::Started(pid),
        ExecEvent::Stdout { data } => OutputEvent::Stdout(b64(&data)?),
        ExecEvent::Stderr { data } => OutputEvent::Stderr(b64(&data)?),
        ExecEvent::Exit { code, signal, timed_out } => {
            OutputEvent::Exit(abx_api::ExitStatus { code, signal, timed_out })
        }
        ExecEvent::Error { code, message } => return Err(Error::Api { status: 0, code, message }),
    })
}

/// Everything a finished process printed, and how it ended.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: abx_api::ExitStatus,
}

impl Client {
    /// Starts a process and streams its output.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecStream> {
        let rb = self.request(Method::POST, &Self::path(paths::EXEC, &[("id", id)])).json(req);
        let resp = self.send(rb).await?;
        Ok(ExecStream { inner: NdjsonStream::new(resp) })
    }

    /// Creates a sandbox, runs one command in it and destroys it, in one request. The
    /// stream starts with [`OutputEvent::Created`] and ends after the sandbox is gone.
    pub async fn run_once(&self, req: &abx_api::RunRequest) -> Result<ExecStream> {
        let resp = self.send(self.request(Method::POST, paths::RUN).json(req)).await?;
        Ok(ExecStream { inner: NdjsonStream::new(resp) })
    }

    /// Runs a command to completion and returns its output.
    pub async fn run(&self, id: &str, cmd: &[&str]) -> Result<Output> {
        let req = ExecRequest { cmd: cmd.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        self.exec(id, &req).await?.collect().await
    }

    /// Starts a process in the background; returns its pid.
    pub async fn exec_background(&self, id: &str, req: &ExecRequest) -> Result<u32> {
        let req = ExecRequest { background: true, ..req.clone() };
        let rb = self.request(Method::POST, &Self::path(paths::EXEC, &[("id", id)])).json(&req);
        Ok(self.json::<Started>(rb).await?.pid)
    }

    pub async fn processes(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        self.json(self.request(Method::GET, &Self::path(paths::PROCESSES, &[("id", id)]))).await
    }

    /// Signals a process (and its group): `signal` is a number or a name like "TERM".
    pub async fn signal(&self, id: &str, pid: u32, signal: &str) -> Result<()> {
        let pid = pid.to_string();
        let rb = self
            .request(Method::POST, &Self::path(paths::PROCESS_SIGNAL, &[("id", id), ("pid", &pid)]))
            .json(&SignalRequest { signal: serde_json::Value::String(signal.into()), group: None });
        self.send(rb).await.map(drop)
    }

    pub async fn write_stdin(&self, id: &str, pid: u32, data: &[u8], close: bool) -> Result<()> {
        let pid = pid.to_string();
        let req = StdinRequest { data: base64::engine::general_purpose::STANDARD.encode(data), close };
        let rb = self.request(Method::POST, &Self::path(paths::PROCESS_STDIN, &[("id", id), ("pid", &pid)])).json(&req);
        self.send(rb).await.map(drop)
    }

    pub async fn resize(&self, id: &str, pid: u32, size: TtySize) -> Result<()> {
        let pid = pid.to_string();
        let rb =
            self.request(Method::POST, &Self::path(paths::PROCESS_RESIZE, &[("id", id), ("pid", &pid)])).json(&size);
        self.send(rb).await.map(drop)
    }

    /// Attaches to a process's output (buffered output first).
    pub async fn attach(&self, id: &str, pid: u32) -> Result<ExecStream> {
        let pid = pid.to_string();
        let resp = self
            .send(self.request(Method::GET, &Self::path(paths::PROCESS_OUTPUT, &[("id", id), ("pid", &pid)])))
            .await?;
        Ok(ExecStream { inner: NdjsonStream::new(resp) })
    }
}
