//! Interactive processes over the daemon's WebSocket: stdin, signals, terminal size.

use abx_api::{ExecEvent, ExecRequest, TtySize, paths};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{Client, Error, Host, Result};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// What an interactive process sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InteractiveEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(abx_api::ExitStatus),
}

/// An interactive process. Use [`Interactive::split`] to read and write concurrently.
pub struct Interactive {
    pub pid: u32,
    ws: Ws,
}

impl std::fmt::Debug for Interactive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Interactive({})", self.pid)
    }
}

/// The sending half.
pub struct InteractiveWriter {
    sink: SplitSink<Ws, Message>,
}

/// The receiving half.
pub struct InteractiveReader {
    stream: SplitStream<Ws>,
}

impl Interactive {
    pub fn split(self) -> (InteractiveWriter, InteractiveReader) {
        let (sink, stream) = self.ws.split();
        (InteractiveWriter { sink }, InteractiveReader { stream })
    }
}

impl InteractiveWriter {
    pub async fn stdin(&mut self, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(data.len() + 1);
        b.push(0);
        b.extend_from_slice(data);
        Ok(self.sink.send(Message::Binary(b.into())).await?)
    }

    pub async fn close_stdin(&mut self) -> Result<()> {
        Ok(self.sink.send(Message::Binary(vec![1u8].into())).await?)
    }

    pub async fn signal(&mut self, signal: i32) -> Result<()> {
        let msg = serde_json::json!({"op": "signal", "signal": signal}).to_string();
        Ok(self.sink.send(Message::Text(msg.into())).await?)
    }

    pub async fn resize(&mut self, size: TtySize) -> Result<()> {
        let msg = serde_json::json!({"op": "resize", "size": size}).to_string();
        Ok(self.sink.send(Message::Text(msg.into())).await?)
    }

    pub async fn close(&mut self) -> Result<()> {
        Ok(self.sink.close().await?)
    }
}

impl InteractiveReader {
    /// The next output or the exit; `None` when the connection ended.
    pub async fn next(&mut self) -> Result<Option<InteractiveEvent>> {
        while let Some(msg) = self.stream.next().await {
            match msg? {
                Message::Binary(b) if b.first() == Some(&1) => {
                    return Ok(Some(InteractiveEvent::Stdout(b[1..].to_vec())));
                }
                Message::Binary(b) if b.first() == Some(&2) => {
                    return Ok(Some(InteractiveEvent::Stderr(b[1..].to_vec())));
                }
                Message::Text(t) => match serde_json::from_str::<ExecEvent>(&t) {
                    Ok(ExecEvent::Exit { code, signal, timed_out }) => {
                        return Ok(Some(InteractiveEvent::Exit(abx_api::ExitStatus { code, signal, timed_out })));
                    }
                    Ok(ExecEvent::Error { code, message }) => return Err(Error::Api { status: 0, code, message }),
                    _ => continue,
                },
                Message::Close(_) => return Ok(None),
                _ => continue,
            }
        }
        Ok(None)
    }
}

impl Client {
    async fn websocket(&self, path: &str) -> Result<Ws> {
        let (url, io): (String, Box<dyn Io>) = match self.host() {
            Host::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("connect {}: {e}", p.display()))))?;
                (format!("ws://agentbox{path}"), Box::new(s))
            }
            Host::Http(base) => {
                let hostport = base.trim_start_matches("http://").trim_start_matches("https://");
                let s = tokio::net::TcpStream::connect(hostport).await?;
                (format!("ws://{hostport}{path}"), Box::new(s))
            }
        };
        let mut req = url.into_client_request()?;
        if let Some(k) = self.api_key_header() {
            req.headers_mut().insert("authorization", k.parse().map_err(|_| Error::Protocol("bad api key".into()))?);
        }
        let (ws, _) = tokio_tungstenite::client_async(req, io).await?;
        Ok(ws)
    }

    /// Starts an interactive process (stdin open; a terminal if `req.tty` is set).
    pub async fn exec_interactive(&self, id: &str, req: &ExecRequest) -> Result<Interactive> {
        let mut ws = self.websocket(&Self::path(paths::EXEC_WS, &[("id", id)])).await?;
        let req = ExecRequest { interactive: true, ..req.clone() };
        ws.send(Message::Text(serde_json::to_string(&req).unwrap_or_default().into())).await?;
        let pid = started(&mut ws).await?;
        Ok(Interactive { pid, ws })
    }

    /// Attaches interactively to a running process.
    pub async fn attach_interactive(&self, id: &str, pid: u32) -> Result<Interactive> {
        let p = pid.to_string();
        let mut ws = self.websocket(&Self::path(paths::PROCESS_WS, &[("id", id), ("pid", &p)])).await?;
        let pid = started(&mut ws).await?;
        Ok(Interactive { pid, ws })
    }
}

async fn started(ws: &mut Ws) -> Result<u32> {
    while let Some(msg) = ws.next().await {
        if let Message::Text(t) = msg? {
            match serde_json::from_str::<ExecEvent>(&t) {
                Ok(ExecEvent::Started { pid }) => return Ok(pid),
                Ok(ExecEvent::Error { code, message }) => return Err(Error::Api { status: 0, code, message }),
                _ => continue,
            }
        }
    }
    Err(Error::Protocol("the daemon closed the connection before the process started".into()))
}
