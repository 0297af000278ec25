//! The `Exec` and `Attach` conversations: stream a process's output to a client and apply
//! what the client sends while attached.
//!
//! While attached a client may send `Stdin` frames, an `Eof` frame (closes stdin; on a
//! terminal it types end-of-file, `^D`) and JSON [`Control`] frames (`signal` goes to the
//! process itself, not its group). Any other frame ends the conversation like a
//! disconnect. The end of the client's stream counts as a disconnect too, so a client must
//! keep its write side open until it has read `Event::Exit`; the disconnect of a
//! foreground process's owner SIGKILLs the process group, other clients merely detach.
//!
//! `Attach` answers `Event::Started { pid }` first (or `Reply::Err` for an unknown pid),
//! then the replayed output, then streams like `Exec`. Attaching to a finished process
//! gives the replay and `Event::Exit` at once. A client that falls too far behind is
//! disconnected without `Event::Exit` (see [`crate::process`]).

use std::sync::Arc;

use abx_proto::{Control, Event, ExecSpec, FrameReader, Kind, ProtoError};
use tokio::net::unix::OwnedReadHalf;
use tokio::task::JoinHandle;

use crate::exec;
use crate::process::{Proc, Subscription};
use crate::ring::{Chunk, Stream};
use crate::server::{Agent, Conn};

/// How a conversation ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The process finished and the client got `Event::Exit`.
    Finished,
    /// The client went away (or broke the protocol).
    ClientGone,
    /// The client fell behind and was dropped.
    Lagged,
}

/// Handles `Request::Exec`.
pub async fn exec(agent: &Agent, mut conn: Conn, spec: ExecSpec) -> Result<(), ProtoError> {
    let (proc, owner) = match exec::start(agent, &spec) {
        Ok(started) => started,
        Err(e) => return conn.err(e).await,
    };
    if let Err(e) = conn.writer.json(&Event::Started { pid: proc.pid }).await {
        if !spec.background {
            proc.kill_group();
        }
        return Err(e);
    }
    if spec.background {
        return Ok(());
    }
    converse(conn, proc, Vec::new(), owner, true).await;
    Ok(())
}

/// Handles `Request::Attach`.
pub async fn attach(agent: &Agent, mut conn: Conn, pid: u32, replay: bool) -> Result<(), ProtoError> {
    let proc = match agent.procs.get(pid) {
        Ok(p) => p,
        Err(e) => return conn.err(e).await,
    };
    conn.writer.json(&Event::Started { pid }).await?;
    let (chunks, sub) = proc.attach(replay);
    converse(conn, proc, chunks, sub, false).await;
    Ok(())
}

/// Streams output until the process finished or the client left; the owner's leaving
/// kills the process group.
async fn converse(conn: Conn, proc: Arc<Proc>, replay: Vec<Chunk>, sub: Option<Subscription>, owner: bool) {
    let Conn { reader, mut writer } = conn;
    let mut input = tokio::spawn(client_input(reader, proc.clone()));
    let outcome = deliver(&mut writer, &proc, replay, sub, &mut input).await;
    input.abort();
    if owner && outcome == Outcome::ClientGone {
        proc.kill_group();
    }
}

type Writer = abx_proto::FrameWriter<tokio::net::unix::OwnedWriteHalf>;

async fn deliver(
    writer: &mut Writer,
    proc: &Proc,
    replay: Vec<Chunk>,
    sub: Option<Subscription>,
    input: &mut JoinHandle<()>,
) -> Outcome {
    for chunk in &replay {
        if send_chunk(writer, chunk).await.is_err() {
            return Outcome::ClientGone;
        }
    }
    let Some(mut sub) = sub else { return send_exit(writer, proc).await };
    loop {
        tokio::select! {
            chunk = sub.rx.recv() => match chunk {
                Some(c) => if send_chunk(writer, &c).await.is_err() {
                    return Outcome::ClientGone;
                },
                None if sub.lagged() => return Outcome::Lagged,
                None => return send_exit(writer, proc).await,
            },
            _ = &mut *input => return Outcome::ClientGone,
        }
    }
}

async fn send_chunk(writer: &mut Writer, chunk: &Chunk) -> Result<(), ProtoError> {
    let kind = match chunk.stream {
        Stream::Stdout => Kind::Stdout,
        Stream::Stderr => Kind::Stderr,
    };
    writer.send(kind, &chunk.data).await
}

async fn send_exit(writer: &mut Writer, proc: &Proc) -> Outcome {
    let Some(status) = proc.exit() else { return Outcome::Lagged };
    match writer.json(&Event::Exit(status)).await {
        Ok(()) => Outcome::Finished,
        Err(_) => Outcome::ClientGone,
    }
}

/// Applies the client's frames to the process until the client's stream ends.
async fn client_input(mut reader: FrameReader<OwnedReadHalf>, proc: Arc<Proc>) {
    while let Ok(Some(frame)) = reader.next().await {
        match frame.kind {
            // Writing to a process without stdin, or one that stopped reading, is ignored:
            // there is no reply channel for these frames.
            Kind::Stdin => drop(proc.write_stdin(&frame.payload, false).await),
            Kind::Eof => drop(proc.write_stdin(&[], true).await),
            Kind::Json => match frame.json::<Control>() {
                Ok(Control::Signal { signal }) => drop(proc.signal(signal, false)),
                Ok(Control::Resize { size }) => drop(proc.resize(size)),
                Err(_) => return,
            },
            Kind::Stdout | Kind::Stderr | Kind::Data => return,
        }
    }
}
