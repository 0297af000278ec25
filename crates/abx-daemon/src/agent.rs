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
}

impl AgentConn {
    /// Connects and sends the opening request.
    pub async fn open(socket: &Path, req: &Request) -> Result<AgentConn, CallError> {
        let stream = UnixStream::connect(socket).await.map_err(CallError::Unreachable)?;
        let (r, w) = stream.into_split();
        let mut conn = AgentConn { reader: FrameReader::new(r), writer: FrameWriter::new(w) };
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
