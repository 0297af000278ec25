//! The `Exec` and `Attach` conversations: stream a process's output to a client and apply
//! what the client sends while attached.
//!
//! While attached a client may send `Stdin` frames, an `Eof` frame (closes stdin; on a
//! terminal it types end-of-file, `^D`) and JSON [`Control`] frames (`signal` goes to the
//! process itself, not its group; `background` makes it a background process, see
//! [`Proc::make_background`]). Any other frame ends the conversation like a
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
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant, sleep_until};

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
///
/// A foreground process's `Event::Started` waits up to [`HOLD`] to leave in one write with
/// its first output (and, for a short command, its exit): on this kind of host every
/// write that wakes the client costs far more than the bytes.
pub async fn exec(agent: &Agent, mut conn: Conn, spec: ExecSpec) -> Result<(), ProtoError> {
    let (proc, owner) = match exec::start(agent, &spec) {
        Ok(started) => started,
        Err(e) => return conn.err(e).await,
    };
    let started = Event::Started { pid: proc.pid };
    if spec.background {
        return conn.writer.json(&started).await;
    }
    let mut pending = Vec::new();
    if let Err(e) = abx_proto::encode_json(&mut pending, &started) {
        proc.kill_group();
        return Err(e);
    }
    converse(conn, proc, pending, true, owner, true).await;
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
    let mut pending = Vec::new();
    for chunk in &chunks {
        push_chunk(&mut pending, chunk)?;
    }
    converse(conn, proc, pending, false, sub, false).await;
    Ok(())
}

/// How long a foreground exec's `Started` may be held back for company.
const HOLD: Duration = Duration::from_millis(2);

/// Output queued for the client is written once it reaches this size.
const BATCH: usize = 64 << 10;

/// Streams output until the process finished or the client left; the owner's leaving
/// kills the process group. `pending`: frames to send first; with `hold`, they wait up
/// to [`HOLD`] for the process's first output.
async fn converse(conn: Conn, proc: Arc<Proc>, pending: Vec<u8>, hold: bool, sub: Option<Subscription>, owner: bool) {
    let Conn { reader, mut writer } = conn;
    let mut input = tokio::spawn(client_input(reader, proc.clone()));
    let outcome = deliver(&mut writer, &proc, pending, hold, sub, &mut input).await;
    input.abort();
    if owner && outcome == Outcome::ClientGone && !proc.background() {
        proc.kill_group();
    }
}

type Writer = abx_proto::FrameWriter<tokio::net::unix::OwnedWriteHalf>;

async fn deliver(
    writer: &mut Writer,
    proc: &Proc,
    mut pending: Vec<u8>,
    hold: bool,
    sub: Option<Subscription>,
    input: &mut JoinHandle<()>,
) -> Outcome {
    let Some(mut sub) = sub else { return finish(writer, proc, pending).await };
    let mut hold = hold.then(|| Instant::now() + HOLD);
    if hold.is_none() && !pending.is_empty() {
        if writer.send_encoded(&pending).await.is_err() {
            return Outcome::ClientGone;
        }
        pending.clear();
    }
    loop {
        tokio::select! {
            chunk = sub.rx.recv() => {
                let mut ended = chunk.is_none();
                if let Some(c) = chunk {
                    if push_chunk(&mut pending, &c).is_err() {
                        return Outcome::ClientGone;
                    }
                    // What is queued already goes in the same write.
                    while pending.len() < BATCH {
                        match sub.rx.try_recv() {
                            Ok(c) => {
                                if push_chunk(&mut pending, &c).is_err() {
                                    return Outcome::ClientGone;
                                }
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                ended = true;
                                break;
                            }
                        }
                    }
                }
                if ended {
                    if sub.lagged() {
                        let _ = writer.send_encoded(&pending).await;
                        return Outcome::Lagged;
                    }
                    return finish(writer, proc, pending).await;
                }
            },
            _ = sleep_until(hold.unwrap_or_else(Instant::now)), if hold.is_some() => {},
            _ = &mut *input => return Outcome::ClientGone,
        }
        // Output arrived or the hold ran out: everything pending goes.
        if writer.send_encoded(&pending).await.is_err() {
            return Outcome::ClientGone;
        }
        pending.clear();
        hold = None;
    }
}

fn push_chunk(buf: &mut Vec<u8>, chunk: &Chunk) -> Result<(), ProtoError> {
    let kind = match chunk.stream {
        Stream::Stdout => Kind::Stdout,
        Stream::Stderr => Kind::Stderr,
    };
    abx_proto::encode(buf, kind, &chunk.data)
}

/// Sends what is pending and `Event::Exit`, in one write.
async fn finish(writer: &mut Writer, proc: &Proc, mut pending: Vec<u8>) -> Outcome {
    let Some(status) = proc.exit() else {
        // Dropped for lagging: what was queued still goes out, without an exit.
        let _ = writer.send_encoded(&pending).await;
        return Outcome::Lagged;
    };
    if abx_proto::encode_json(&mut pending, &Event::Exit(status)).is_err() {
        return Outcome::ClientGone;
    }
    match writer.send_encoded(&pending).await {
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
                Ok(Control::Background) => proc.make_background(),
                Err(_) => return,
            },
            Kind::Stdout | Kind::Stderr | Kind::Data => return,
        }
    }
}
