//! Processes the agent started: their shared state, the table that finds them by pid, and
//! the pump task that moves their output to clients.
//!
//! Each process has one *pump* task that reads stdout and stderr (or the terminal),
//! publishes each chunk to the foreground *owner* (awaited: a slow client slows the
//! process down instead of growing memory), to attached clients (never awaited: a client
//! more than [`CHANNEL_DEPTH`] chunks behind is disconnected and may re-attach with
//! replay), and, for background processes, to the [`OutputRing`]. After the exit status
//! arrives it drains the pipes for at most [`DRAIN_AFTER_EXIT`] (a background grandchild
//! may keep them open forever), records the status and closes every subscription; a
//! closed subscription tells the client to send `Event::Exit`.
//!
//! Finished foreground processes leave the table at once (their owner saw the exit);
//! finished background ones stay listed until [`FINISHED_KEPT`] newer ones finished. A
//! foreground process whose owner sends `Control::Background` becomes a background one
//! ([`Proc::make_background`]) and keeps its owner: the owner still gets every chunk,
//! awaited, until it leaves, and its leaving no longer kills the process.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use abx_proto::{ExitStatus, OUTPUT_BUFFER, ProcessInfo, TtySize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::Error;
use crate::pty::Master;
use crate::reaper::{ExitWatch, lock};
use crate::ring::{Chunk, OutputRing, Stream};

/// Chunks a subscriber may have in flight.
pub const CHANNEL_DEPTH: usize = 64;
/// How long output is still collected after the process exited.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);
/// Finished background processes kept for listing and attachment.
pub const FINISHED_KEPT: usize = 64;
/// Bytes read from a pipe or terminal at once.
const READ_CHUNK: usize = 32 << 10;

/// Where a process's output comes from.
#[derive(Debug)]
pub enum OutputSource {
    Pipe(pipe::Receiver),
    Pty(Arc<Master>),
}

impl OutputSource {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            OutputSource::Pipe(p) => p.read(buf).await,
            OutputSource::Pty(m) => m.read(buf).await,
        }
    }
}

/// Where a process's input goes.
#[derive(Debug)]
pub enum InputSink {
    Pipe(pipe::Sender),
    Pty(Arc<Master>),
}

/// ASCII EOT: what "end of input" means on a terminal in canonical mode.
const VEOF: u8 = 0x04;

/// What closing a terminal's input writes. In canonical mode an end-of-file character
/// on a non-empty line only hands that line to the reader; only one on an empty line
/// makes its read return 0. So an unfinished line (`line_open`) needs two.
fn end_of_input(line_open: bool) -> &'static [u8] {
    if line_open { &[VEOF, VEOF] } else { &[VEOF] }
}

/// Whether `byte`, written to a terminal, ends the line in canonical mode (newline,
/// return, which `ICRNL` turns into one, or end-of-file).
fn ends_line(byte: u8) -> bool {
    matches!(byte, b'\n' | b'\r' | VEOF)
}

/// A client's view of a process's output. The channel closes when the process finished
/// (then [`Proc::exit`] is set) or when the client fell behind (`lagged`).
#[derive(Debug)]
pub struct Subscription {
    pub rx: mpsc::Receiver<Chunk>,
    lagged: Arc<AtomicBool>,
}

impl Subscription {
    /// Whether the agent dropped this subscriber for falling behind.
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Attached {
    tx: mpsc::Sender<Chunk>,
    lagged: Arc<AtomicBool>,
}

#[derive(Debug)]
struct State {
    ring: OutputRing,
    owner: Option<mpsc::Sender<Chunk>>,
    attached: Vec<Attached>,
    exit: Option<ExitStatus>,
}

/// A process started by the agent.
#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    info: ProcessInfo,
    /// Whether the process outlives its owner (set at start or by [`Proc::make_background`]).
    background: AtomicBool,
    stdin: tokio::sync::Mutex<Option<InputSink>>,
    /// Whether the last byte written to the terminal left a line unfinished.
    line_open: AtomicBool,
    pty: Mutex<Option<Arc<Master>>>,
    reaped: ExitWatch,
    timed_out: AtomicBool,
    state: Mutex<State>,
}

impl Proc {
    /// Creates the record; for a foreground process also the owner's subscription.
    pub fn new(
        info: ProcessInfo,
        stdin: Option<InputSink>,
        pty: Option<Arc<Master>>,
        reaped: ExitWatch,
    ) -> (Arc<Proc>, Option<Subscription>) {
        let capacity = if info.background { OUTPUT_BUFFER } else { 0 };
        let (owner, sub) = if info.background {
            (None, None)
        } else {
            let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
            (Some(tx), Some(Subscription { rx, lagged: Arc::default() }))
        };
        let state = State { ring: OutputRing::new(capacity), owner, attached: Vec::new(), exit: None };
        let proc = Proc {
            pid: info.pid,
            background: AtomicBool::new(info.background),
            info,
            stdin: tokio::sync::Mutex::new(stdin),
            line_open: AtomicBool::new(false),
            pty: Mutex::new(pty),
            reaped,
            timed_out: AtomicBool::new(false),
            state: Mutex::new(state),
        };
        (Arc::new(proc), sub)
    }

    pub fn background(&self) -> bool {
        self.background.load(Ordering::Relaxed)
    }

    /// Turns a foreground process into a background one: it runs on when its owner
    /// leaves, stays listed once finished, and from now on keeps its output for late
    /// attachment. The owner keeps receiving everything while it stays.
    pub fn make_background(&self) {
        let mut state = lock(&self.state);
        if !self.background.swap(true, Ordering::Relaxed) {
            state.ring = OutputRing::new(OUTPUT_BUFFER);
        }
    }

    /// The listing entry, with the exit status once finished.
    pub fn info(&self) -> ProcessInfo {
        ProcessInfo { exit: self.exit(), background: self.background(), ..self.info.clone() }
    }

    /// The final status, set once output is drained.
    pub fn exit(&self) -> Option<ExitStatus> {
        lock(&self.state).exit
    }

    /// Whether the process has been reaped (its pid may be reused from then on).
    pub fn reaped(&self) -> bool {
        self.reaped.borrow().is_some()
    }

    /// Replays buffered output (when asked) and subscribes to what follows, atomically.
    /// No subscription when the process already finished.
    pub fn attach(&self, replay: bool) -> (Vec<Chunk>, Option<Subscription>) {
        let mut state = lock(&self.state);
        let chunks = if replay { state.ring.snapshot() } else { Vec::new() };
        if state.exit.is_some() {
            return (chunks, None);
        }
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let lagged = Arc::new(AtomicBool::new(false));
        state.attached.push(Attached { tx, lagged: lagged.clone() });
        (chunks, Some(Subscription { rx, lagged }))
    }

    /// Hands a chunk to the ring and attached clients; returns the owner to await.
    fn publish(&self, chunk: &Chunk) -> Option<mpsc::Sender<Chunk>> {
        let mut state = lock(&self.state);
        state.ring.push(chunk.clone());
        state.attached.retain(|a| {
            let kept = a.tx.try_send(chunk.clone()).is_ok();
            if !kept {
                a.lagged.store(true, Ordering::Relaxed);
            }
            kept
        });
        state.owner.clone()
    }

    fn drop_owner(&self) {
        lock(&self.state).owner = None;
    }

    /// Records the final status and closes every subscription.
    fn finish(&self, mut status: ExitStatus) {
        status.timed_out = self.timed_out.load(Ordering::Relaxed);
        let mut state = lock(&self.state);
        state.exit = Some(status);
        state.owner = None;
        state.attached.clear();
        lock(&self.pty).take();
    }

    /// Sends `signal` to the process, or to its process group. A no-op once reaped.
    pub fn signal(&self, signal: i32, group: bool) -> Result<(), Error> {
        check_signal(signal)?;
        if self.reaped() {
            return Ok(());
        }
        let target = if group { -(self.pid as i32) } else { self.pid as i32 };
        match abx_sys::agent::kill(target, signal) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => Ok(()),
            r => r.map_err(|source| Error::Signal { pid: target, source }),
        }
    }

    /// SIGKILLs the process group unless the process is already gone.
    pub fn kill_group(&self) {
        let _ = self.signal(9, true);
    }

    /// Writes to stdin, then closes it when `close` (on a terminal: sends end-of-file).
    pub async fn write_stdin(&self, data: &[u8], close: bool) -> Result<(), Error> {
        let mut stdin = self.stdin.lock().await;
        let sink = stdin.as_mut().ok_or(Error::NoStdin(self.pid))?;
        let written = match sink {
            InputSink::Pipe(p) => p.write_all(data).await,
            InputSink::Pty(m) => write_pty(m, data, close, &self.line_open).await,
        };
        if close || written.is_err() {
            stdin.take();
        }
        // A process that stopped reading (or exited) is not the client's error.
        Ok(())
    }

    /// Changes the terminal size.
    pub fn resize(&self, size: TtySize) -> Result<(), Error> {
        // A terminal's process that exited has no terminal any more: say that it exited
        // (it read "has no terminal", as if it never had one).
        // (Two statements: `finish` takes the state's lock, then the terminal's.)
        let pty = lock(&self.pty).clone();
        let pty = match pty {
            Some(p) => p,
            None if lock(&self.state).exit.is_some() => return Err(Error::Exited(self.pid)),
            None => return Err(Error::NoTty(self.pid)),
        };
        pty.resize(size).map_err(|source| Error::Pty { source })
    }

    /// Kills the process group when `timeout` passes before the process is reaped.
    pub fn arm_timeout(self: &Arc<Self>, timeout: Duration) {
        let proc = self.clone();
        let mut reaped = self.reaped.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    if !proc.reaped() {
                        proc.timed_out.store(true, Ordering::Relaxed);
                        proc.kill_group();
                    }
                }
                _ = reaped.wait_for(Option::is_some) => {}
            }
        });
    }
}

/// Writes `data` to the terminal, then, when `close`, the end of input.
async fn write_pty(master: &Master, data: &[u8], close: bool, line_open: &AtomicBool) -> io::Result<()> {
    master.write_all(data).await?;
    if let Some(&last) = data.last() {
        line_open.store(!ends_line(last), Ordering::Relaxed);
    }
    if !close {
        return Ok(());
    }
    master.write_all(end_of_input(line_open.load(Ordering::Relaxed))).await
}

/// Accepts signal numbers 0 (existence check) to 64 (`SIGRTMAX`).
pub fn check_signal(signal: i32) -> Result<(), Error> {
    if (0..=64).contains(&signal) { Ok(()) } else { Err(Error::BadSignal(signal)) }
}

/// Every process the agent knows, by pid.
#[derive(Debug, Default)]
pub struct ProcessTable {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    procs: HashMap<u32, Arc<Proc>>,
    /// Finished background processes, oldest first.
    finished: VecDeque<u32>,
}

impl ProcessTable {
    pub fn insert(&self, proc: Arc<Proc>) {
        let mut t = lock(&self.inner);
        // A reused pid replaces the finished process that had it.
        t.finished.retain(|&p| p != proc.pid);
        t.procs.insert(proc.pid, proc);
    }

    pub fn get(&self, pid: u32) -> Result<Arc<Proc>, Error> {
        match lock(&self.inner).procs.get(&pid) {
            Some(p) => Ok(p.clone()),
            // The agent itself is PID 1 of the sandbox; it is not one of its processes.
            None if pid == 1 => Err(Error::Invalid(
                "process 1 is the sandbox's agent, not a process started in it; stop or remove the sandbox to end everything in it".into(),
            )),
            None => Err(Error::NoProcess(pid)),
        }
    }

    /// Every listed process, by pid.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut all: Vec<ProcessInfo> = lock(&self.inner).procs.values().map(|p| p.info()).collect();
        all.sort_by_key(|p| p.pid);
        all
    }

    /// Processes that have not finished.
    pub fn running(&self) -> Vec<Arc<Proc>> {
        lock(&self.inner).procs.values().filter(|p| p.exit().is_none()).cloned().collect()
    }

    fn finished(&self, proc: &Arc<Proc>) {
        let mut t = lock(&self.inner);
        if !t.procs.get(&proc.pid).is_some_and(|p| Arc::ptr_eq(p, proc)) {
            return;
        }
        if !proc.background() {
            t.procs.remove(&proc.pid);
            return;
        }
        t.finished.push_back(proc.pid);
        while t.finished.len() > FINISHED_KEPT {
            if let Some(old) = t.finished.pop_front() {
                t.procs.remove(&old);
            }
        }
    }
}

/// The output sources of one process.
#[derive(Debug)]
pub struct Outputs {
    pub stdout: Option<OutputSource>,
    pub stderr: Option<OutputSource>,
}

/// Moves the output of `proc` to its subscribers until it exited and its output is
/// drained, then records the exit status.
pub async fn pump(table: Arc<ProcessTable>, proc: Arc<Proc>, mut outputs: Outputs) {
    let mut reaped = proc.reaped.clone();
    let mut exit: Option<ExitStatus> = None;
    let mut deadline: Option<Instant> = None;
    let (mut out_buf, mut err_buf) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);
    loop {
        let open = outputs.stdout.is_some() || outputs.stderr.is_some();
        if !open && exit.is_some() {
            break;
        }
        tokio::select! {
            n = read_from(&mut outputs.stdout, &mut out_buf) => {
                forward(&proc, &mut outputs.stdout, Stream::Stdout, &out_buf, n).await;
            }
            n = read_from(&mut outputs.stderr, &mut err_buf) => {
                forward(&proc, &mut outputs.stderr, Stream::Stderr, &err_buf, n).await;
            }
            status = wait_reaped(&mut reaped), if exit.is_none() => {
                exit = Some(status);
                deadline = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
            _ = sleep_until(deadline) => break,
        }
    }
    // A writer blocked on a full pipe holds the lock; its sink goes with the process record.
    if let Ok(mut stdin) = proc.stdin.try_lock() {
        stdin.take();
    }
    proc.finish(exit.unwrap_or_default());
    table.finished(&proc);
}

async fn read_from(source: &mut Option<OutputSource>, buf: &mut [u8]) -> io::Result<usize> {
    match source {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn wait_reaped(reaped: &mut ExitWatch) -> ExitStatus {
    match reaped.wait_for(Option::is_some).await {
        Ok(status) => status.unwrap_or_default(),
        // The reaper never drops a waiter unanswered; if it did, the status is unknown.
        Err(_) => ExitStatus::default(),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Publishes what a read returned; closes the source at end of stream or on error.
async fn forward(proc: &Proc, source: &mut Option<OutputSource>, stream: Stream, buf: &[u8], n: io::Result<usize>) {
    let n = match n {
        Ok(n) if n > 0 => n,
        _ => {
            source.take();
            return;
        }
    };
    let chunk = Chunk::new(stream, &buf[..n]);
    if let Some(owner) = proc.publish(&chunk)
        && owner.send(chunk).await.is_err()
    {
        proc.drop_owner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, background: bool) -> ProcessInfo {
        ProcessInfo {
            pid,
            argv: vec!["x".into()],
            tag: None,
            cwd: None,
            user: None,
            tty: false,
            background,
            started_at_ms: 0,
            exit: None,
        }
    }

    fn proc(pid: u32, background: bool) -> (Arc<Proc>, Option<Subscription>) {
        let (_tx, rx) = tokio::sync::watch::channel(None);
        Proc::new(info(pid, background), None, None, rx)
    }

    #[test]
    fn attach_replays_then_closes_on_finish() {
        let (p, owner) = proc(10, true);
        assert!(owner.is_none());
        p.publish(&Chunk::new(Stream::Stdout, b"early"));
        let (replay, sub) = p.attach(true);
        assert_eq!(replay, vec![Chunk::new(Stream::Stdout, b"early")]);
        let mut sub = sub.unwrap();
        p.publish(&Chunk::new(Stream::Stderr, b"late"));
        p.finish(ExitStatus { code: Some(0), ..Default::default() });
        assert_eq!(sub.rx.try_recv().unwrap(), Chunk::new(Stream::Stderr, b"late"));
        assert!(sub.rx.try_recv().is_err());
        assert!(!sub.lagged());
        assert_eq!(p.exit().unwrap().code, Some(0));
        let (replay, sub) = p.attach(true);
        assert_eq!(replay.len(), 2);
        assert!(sub.is_none());
    }

    /// Guards the e2b facade's processes: a foreground process made a background one keeps
    /// its owner, starts buffering output for attachment and stays listed once finished.
    #[test]
    fn a_foreground_process_can_become_a_background_one() {
        let table = ProcessTable::default();
        let (p, _owner) = proc(12, false);
        table.insert(p.clone());
        p.publish(&Chunk::new(Stream::Stdout, b"before"));
        p.make_background();
        assert!(p.background() && p.info().background);
        assert!(p.publish(&Chunk::new(Stream::Stdout, b"after")).is_some(), "the owner stays");
        let (replay, _) = p.attach(true);
        assert_eq!(replay, vec![Chunk::new(Stream::Stdout, b"after")]);
        p.finish(ExitStatus::default());
        table.finished(&p);
        assert!(table.get(12).is_ok(), "listed once finished");
    }

    #[test]
    fn slow_attachers_are_dropped() {
        let (p, _owner) = proc(11, false);
        let (_, sub) = p.attach(false);
        let sub = sub.unwrap();
        for _ in 0..=CHANNEL_DEPTH {
            p.publish(&Chunk::new(Stream::Stdout, b"x"));
        }
        assert!(sub.lagged());
    }

    #[test]
    fn table_keeps_recent_finished_background_processes() {
        let table = ProcessTable::default();
        let (fg, _) = proc(1, false);
        table.insert(fg.clone());
        table.finished(&fg);
        assert!(table.get(1).is_err());
        for pid in 100..100 + FINISHED_KEPT as u32 + 2 {
            let (p, _) = proc(pid, true);
            table.insert(p.clone());
            table.finished(&p);
        }
        assert!(table.get(100).is_err());
        assert!(table.get(101).is_err());
        assert!(table.get(102).is_ok());
        assert_eq!(table.list().len(), FINISHED_KEPT);
    }

    #[test]
    fn unknown_pids_are_named_and_pid_1_is_the_agent() {
        let t = ProcessTable::default();
        let e = t.get(1).unwrap_err();
        assert_eq!(e.code(), abx_proto::ErrorCode::InvalidArgument);
        assert!(e.to_string().contains("the sandbox's agent"), "{e}");
        let e = t.get(42).unwrap_err();
        assert_eq!(e.code(), abx_proto::ErrorCode::NotFound);
        assert!(e.to_string().starts_with("process 42 not found"), "{e}");
        t.insert(proc(42, false).0);
        assert_eq!(t.get(42).unwrap().pid, 42);
    }

    /// Guards that closing a terminal's input after a line without a newline ends the
    /// input (one end-of-file would only flush the line).
    #[test]
    fn an_unfinished_line_gets_two_end_of_file_characters() {
        assert_eq!(end_of_input(false), [VEOF]);
        assert_eq!(end_of_input(true), [VEOF, VEOF]);
        assert!(ends_line(b'\n') && ends_line(b'\r') && ends_line(VEOF));
        assert!(!ends_line(b'o'));
    }

    #[test]
    fn rejects_bad_signals() {
        assert!(check_signal(9).is_ok());
        assert!(check_signal(0).is_ok());
        assert!(matches!(check_signal(65), Err(Error::BadSignal(65))));
        assert!(check_signal(-1).is_err());
    }
}
