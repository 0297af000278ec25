use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted in either direction (kind byte + payload).
pub const MAX_FRAME: usize = 4 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A JSON control message ([`crate::Request`], [`crate::Reply`], [`crate::Event`],
    /// [`crate::Control`]).
    Json = 0,
    /// Process standard output (agent to client).
    Stdout = 1,
    /// Process standard error (agent to client).
    Stderr = 2,
    /// Process standard input (client to agent).
    Stdin = 3,
    /// A chunk of file or archive content (either direction).
    Data = 4,
    /// End of a data or stdin stream.
    Eof = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0 => Kind::Json,
            1 => Kind::Stdout,
            2 => Kind::Stderr,
            3 => Kind::Stdin,
            4 => Kind::Data,
            5 => Kind::Eof,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Decodes the payload of a JSON frame.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ProtoError> {
        if self.kind != Kind::Json {
            return Err(ProtoError::Unexpected(format!("{:?} frame where JSON was expected", self.kind)));
        }
        serde_json::from_slice(&self.payload).map_err(ProtoError::Json)
    }
}

/// Protocol failures.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error")]
    Io(#[source] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("malformed JSON message")]
    Json(#[source] serde_json::Error),
    #[error("unexpected message: {0}")]
    Unexpected(String),
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// Reads the next frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ProtoError> {
        let mut len = [0u8; 4];
        match self.inner.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(ProtoError::Io(e)),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 {
            return Err(ProtoError::Unexpected("empty frame".into()));
        }
        if len > MAX_FRAME {
            return Err(ProtoError::TooLarge(len));
        }
        let mut buf = vec![0u8; len];
        self.inner.read_exact(&mut buf).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProtoError::Closed,
            _ => ProtoError::Io(e),
        })?;
        let kind = Kind::from_u8(buf[0]).ok_or(ProtoError::BadKind(buf[0]))?;
        buf.remove(0);
        Ok(Some(Frame { kind, payload: buf }))
    }

    /// Reads the next frame, treating end of stream as an error.
    pub async fn expect(&mut self) -> Result<Frame, ProtoError> {
        self.next().await?.ok_or(ProtoError::Closed)
    }

    /// Reads a JSON frame and decodes it.
    pub async fn json<T: DeserializeOwned>(&mut self) -> Result<T, ProtoError> {
        self.expect().await?.json()
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// A frame's header: its length (kind byte + payload) and kind.
fn header(kind: Kind, payload: &[u8]) -> Result<[u8; 5], ProtoError> {
    if payload.len() + 1 > MAX_FRAME {
        return Err(ProtoError::TooLarge(payload.len() + 1));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    head[4] = kind as u8;
    Ok(head)
}

/// Appends one frame to `buf`, for [`FrameWriter::send_encoded`].
pub fn encode(buf: &mut Vec<u8>, kind: Kind, payload: &[u8]) -> Result<(), ProtoError> {
    buf.extend_from_slice(&header(kind, payload)?);
    buf.extend_from_slice(payload);
    Ok(())
}

/// Appends one JSON frame to `buf`.
pub fn encode_json<T: Serialize>(buf: &mut Vec<u8>, msg: &T) -> Result<(), ProtoError> {
    let body = serde_json::to_vec(msg).map_err(ProtoError::Json)?;
    encode(buf, Kind::Json, &body)
}

/// Payloads up to this size are copied behind their header and written in one go.
const COALESCE: usize = 64 << 10;

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner }
    }

    /// Writes one frame (splitting nothing: payloads above the limit are an error).
    pub async fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), ProtoError> {
        if payload.len() <= COALESCE {
            // One write for the whole frame: written in two, the peer would often be
            // woken for the header alone and then again for the payload.
            let mut frame = Vec::with_capacity(5 + payload.len());
            encode(&mut frame, kind, payload)?;
            return self.send_encoded(&frame).await;
        }
        let head = header(kind, payload)?;
        self.inner.write_all(&head).await.map_err(ProtoError::Io)?;
        self.inner.write_all(payload).await.map_err(ProtoError::Io)?;
        self.inner.flush().await.map_err(ProtoError::Io)
    }

    /// Writes frames encoded with [`encode`] (several at once: one write, one wake-up of
    /// the peer).
    pub async fn send_encoded(&mut self, frames: &[u8]) -> Result<(), ProtoError> {
        self.inner.write_all(frames).await.map_err(ProtoError::Io)?;
        self.inner.flush().await.map_err(ProtoError::Io)
    }

    /// Writes `data` as one or more frames of `kind`, each within the frame limit.
    pub async fn send_chunked(&mut self, kind: Kind, data: &[u8]) -> Result<(), ProtoError> {
        for chunk in data.chunks(MAX_FRAME / 2) {
            self.send(kind, chunk).await?;
        }
        Ok(())
    }

    /// Serializes `msg` as a JSON frame.
    pub async fn json<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtoError> {
        let body = serde_json::to_vec(msg).map_err(ProtoError::Json)?;
        self.send(Kind::Json, &body).await
    }

    pub async fn shutdown(&mut self) -> Result<(), ProtoError> {
        self.inner.shutdown().await.map_err(ProtoError::Io)
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_frames() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        w.json(&crate::Request::Ping).await.unwrap();
        w.send(Kind::Stdout, b"hello").await.unwrap();
        w.send(Kind::Eof, b"").await.unwrap();
        drop(w);
        let req: crate::Request = r.json().await.unwrap();
        assert!(matches!(req, crate::Request::Ping));
        assert_eq!(r.expect().await.unwrap(), Frame { kind: Kind::Stdout, payload: b"hello".to_vec() });
        assert_eq!(r.expect().await.unwrap().kind, Kind::Eof);
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn encoded_frames_read_back_one_by_one() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let mut buf = Vec::new();
        encode_json(&mut buf, &crate::Request::Ping).unwrap();
        encode(&mut buf, Kind::Stdout, b"hi\n").unwrap();
        encode(&mut buf, Kind::Eof, b"").unwrap();
        assert!(matches!(encode(&mut Vec::new(), Kind::Data, &vec![0; MAX_FRAME]), Err(ProtoError::TooLarge(_))));
        w.send_encoded(&buf).await.unwrap();
        drop(w);
        assert!(matches!(r.json().await.unwrap(), crate::Request::Ping));
        assert_eq!(r.expect().await.unwrap(), Frame { kind: Kind::Stdout, payload: b"hi\n".to_vec() });
        assert_eq!(r.expect().await.unwrap().kind, Kind::Eof);
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_oversized_and_unknown_frames() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &(MAX_FRAME as u32 + 1).to_le_bytes()).await.unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(r.next().await, Err(ProtoError::TooLarge(_))));
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[1, 0, 0, 0, 99]).await.unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(r.next().await, Err(ProtoError::BadKind(99))));
    }
}
