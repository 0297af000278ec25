//! The daemon's side of the guest agent protocol (see `abx-proto`). One connection per
//! operation. The agent runs inside the sandbox and is not trusted: frames are bounded by
//! the codec and replies are validated by deserialization.

use std::path::Path;
use std::time::Duration;

use abx_proto::{AgentError, Frame, FrameReader, FrameWriter, Kind, ProtoError, Reply, Request};
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Failures talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the sandbox's agent is not reachable")]
    Unreachable(#[source] std::io::Error),
    #[error("the sandbox's agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("broken exchange with the sandbox's agent")]
    Protocol(#[from] ProtoError),
    /// The agent refused or failed the operation.
    #[error("{0}")]
    Remote(AgentError),
}

/// Timeout of one-shot calls (operations on the sandbox's own files and processes).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// An open connection to an agent.
#[derive(Debug)]
pub struct AgentConn {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: FrameWriter<OwnedWriteHalf>,
    /// Holds the sandbox busy (no idle auto-pause) while a transfer streams on this
    /// connection after the request was answered: a download the client reads slowly.
    pub busy: Option<crate::sandbox::Attached>,
}

impl AgentConn {
    /// Connects and sends the opening request.
    pub async fn open(socket: &Path, req: &Request) -> Result<AgentConn, CallError> {
        let stream = UnixStream::connect(socket).await.map_err(CallError::Unreachable)?;
        let (r, w) = stream.into_split();
        let mut conn = AgentConn { reader: FrameReader::new(r), writer: FrameWriter::new(w), busy: None };
        conn.writer.json(req).await?;
        Ok(conn)
    }

    /// Reads a `Reply<T>`, turning `Err` into [`CallError::Remote`].
    pub async fn reply<T: DeserializeOwned>(&mut self) -> Result<T, CallError> {
        match self.reader.json::<Reply<T>>().await? {
            Reply::Ok(v) => Ok(v),
            Reply::Err(e) => Err(CallError::Remote(e)),
        }
    }

    /// Reads the next frame (None at end of stream).
    pub async fn next(&mut self) -> Result<Option<Frame>, CallError> {
        Ok(self.reader.next().await?)
    }

    pub async fn send(&mut self, kind: Kind, data: &[u8]) -> Result<(), CallError> {
        Ok(self.writer.send(kind, data).await?)
    }
}

/// One request, one reply, within [`CALL_TIMEOUT`].
pub async fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> Result<T, CallError> {
    let fut = async {
        let mut conn = AgentConn::open(socket, req).await?;
        conn.reply().await
    };
    tokio::time::timeout(CALL_TIMEOUT, fut).await.map_err(|_| CallError::Timeout(CALL_TIMEOUT))?
}

/// Runs a process in the sandbox to its end (or, with `spec.background`, until it has
/// started), handing its output to `on_output`; the daemon's own use (start commands,
/// readiness checks, template build steps).
pub async fn run(
    socket: &Path,
    spec: abx_proto::ExecSpec,
    mut on_output: impl FnMut(Kind, &[u8]),
) -> Result<abx_proto::ExitStatus, CallError> {
    let background = spec.background;
    let mut conn = AgentConn::open(socket, &Request::Exec(spec)).await?;
    loop {
        let Some(frame) = conn.next().await? else {
            return Err(CallError::Protocol(ProtoError::Unexpected("the agent closed the exec stream".into())));
        };
        match frame.kind {
            Kind::Stdout | Kind::Stderr => on_output(frame.kind, &frame.payload),
            Kind::Json => {
                let value: serde_json::Value = frame.json()?;
                match serde_json::from_value::<abx_proto::Event>(value.clone()) {
                    Ok(abx_proto::Event::Exit(st)) => return Ok(st),
                    Ok(abx_proto::Event::Started { .. }) if background => return Ok(Default::default()),
                    Ok(abx_proto::Event::Started { .. }) => {}
                    Err(_) => match serde_json::from_value::<Reply<serde_json::Value>>(value) {
                        Ok(Reply::Err(e)) => return Err(CallError::Remote(e)),
                        _ => return Err(CallError::Protocol(ProtoError::Unexpected("unexpected exec event".into()))),
                    },
                }
            }
            _ => {}
        }
    }
}
