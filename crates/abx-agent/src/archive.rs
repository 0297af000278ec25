//! Tar archives of sandbox paths (`ArchiveRead`) and extraction into the sandbox
//! (`ArchiveWrite`), both with the requesting user's permissions.
//!
//! Reading streams without holding a file in memory: the `tar` crate encodes each header
//! (GNU long-name and long-link entries included) with the size taken from `lstat`, and
//! the agent copies the file's bytes itself (exactly that many: a file that shrank
//! meanwhile is padded with zeros, one that grew is cut). Symlinks are archived as links,
//! never followed; entries are visited depth first in name order; sockets, FIFOs and
//! devices are skipped; hard links are stored as separate files. The top entry is named
//! after the last component of the path (`.` for `/`). A failure after the reply went out
//! is reported as a JSON `Reply::Err` frame in place of `Eof`; when no `Data` frame went
//! out yet, what was encoded is dropped and that error is the first frame after the
//! reply, so the daemon can still answer with an error status instead of a cut stream.
//!
//! Extraction runs on a short-lived thread (the `tar` crate reads synchronously while the
//! data arrives asynchronously) that acts as the user for its whole life, so everything
//! it creates belongs to the user. Modes and modification times are preserved, ownership
//! in the archive is ignored. FIFOs are made as FIFOs; a device node stops the extraction
//! with an error (a sandbox cannot create one). The `tar` crate refuses to write through symlinks out of the
//! target; the agent additionally rejects, with an error, any entry whose path is
//! absolute or contains `..` (extraction stops there; earlier entries stay).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path};

use abx_proto::{Kind, ProtoError};
use rustix::fs::OFlags;
use tar::{Builder, EntryType, Header, HeaderMode};
use tokio::sync::{mpsc, oneshot};

use crate::creds::Base;
use crate::error::Error;
use crate::files::{CHUNK, create_dirs, lstat_info, resolve_user};
use crate::paths::{self, normalize};
use crate::server::{Agent, Conn};
use crate::users::User;

const BLOCK: u64 = 512;
/// `Data` frames buffered between the connection and the extraction thread.
const UNPACK_QUEUE: usize = 8;

/// One path still to archive.
#[derive(Debug)]
struct Pending {
    fs_path: String,
    name: String,
}

/// What one archive entry needs written after its header.
#[derive(Debug)]
struct Body {
    file: File,
    size: u64,
}

/// Collects archive bytes and sends them in `Data` frames of about [`CHUNK`] bytes.
struct Out<'a> {
    conn: &'a mut Conn,
    buf: Vec<u8>,
    /// Whether a `Data` frame went out.
    sent: bool,
}

impl Out<'_> {
    async fn push(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK { self.flush().await } else { Ok(()) }
    }

    async fn flush(&mut self) -> Result<(), ProtoError> {
        if !self.buf.is_empty() {
            self.conn.writer.send_chunked(Kind::Data, &self.buf).await?;
            self.buf.clear();
            self.sent = true;
        }
        Ok(())
    }
}

/// Handles `Request::ArchiveRead`.
pub async fn read(agent: &Agent, mut conn: Conn, path: &str, user: Option<&str>) -> Result<(), ProtoError> {
    let started = normalize(path).and_then(|p| Ok((resolve_user(user)?, p))).and_then(|(user, path)| {
        let info = {
            let _as = agent.base.enter(&user)?;
            lstat_info(&path)?
        };
        Ok((user, path, info))
    });
    let (user, path, info) = match started {
        Ok(s) => s,
        Err(e) => return conn.err(e).await,
    };
    conn.ok(&info).await?;
    let top = match paths::file_name(&path) {
        "/" => ".".to_owned(),
        name => name.to_owned(),
    };
    let mut out = Out { conn: &mut conn, buf: Vec::with_capacity(2 * CHUNK), sent: false };
    match stream(&agent.base, &user, Pending { fs_path: path, name: top }, &mut out).await? {
        Ok(()) => {
            out.push(&[0u8; 2 * BLOCK as usize]).await?;
            out.flush().await?;
            conn.writer.send(Kind::Eof, &[]).await
        }
        // Before any data: the error alone (see the module docs).
        Err(e) if !out.sent => conn.err(e).await,
        Err(e) => {
            out.flush().await?;
            conn.err(e).await
        }
    }
}

/// Writes every entry below `top`. The outer error is the connection's, the inner one
/// the file system's.
async fn stream(base: &Base, user: &User, top: Pending, out: &mut Out<'_>) -> Result<Result<(), Error>, ProtoError> {
    let mut builder = Builder::new(Vec::new());
    let mut todo = vec![top];
    while let Some(entry) = todo.pop() {
        let body = match prepare(base, user, &entry, &mut builder, &mut todo) {
            Ok(body) => body,
            Err(e) => return Ok(Err(e)),
        };
        out.push(&std::mem::take(builder.get_mut())).await?;
        if let Some(body) = body
            && let Err(e) = copy_body(body, out).await?
        {
            return Ok(Err(Error::path(&entry.fs_path, e)));
        }
    }
    Ok(Ok(()))
}

/// Encodes the header of `entry` into `builder` and queues a directory's children;
/// returns the file to copy after the header.
fn prepare(
    base: &Base,
    user: &User,
    entry: &Pending,
    builder: &mut Builder<Vec<u8>>,
    todo: &mut Vec<Pending>,
) -> Result<Option<Body>, Error> {
    let _as = base.enter(user)?;
    let at = |e: io::Error| Error::path(&entry.fs_path, e);
    let meta = fs::symlink_metadata(&entry.fs_path).map_err(at)?;
    let mut header = Header::new_gnu();
    header.set_metadata_in_mode(&meta, HeaderMode::Complete);
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(&entry.fs_path).map_err(at)?;
        header.set_size(0);
        builder.append_link(&mut header, &entry.name, target).map_err(at)?;
        Ok(None)
    } else if ft.is_dir() {
        header.set_size(0);
        builder.append_data(&mut header, &entry.name, io::empty()).map_err(at)?;
        queue_children(entry, todo).map_err(at)?;
        Ok(None)
    } else if ft.is_file() {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
            .open(&entry.fs_path)
            .map_err(at)?;
        // The header carries the size; the body follows separately (see `copy_body`).
        header.set_size(meta.len());
        builder.append_data(&mut header, &entry.name, io::empty()).map_err(at)?;
        Ok(Some(Body { file, size: meta.len() }))
    } else {
        Ok(None)
    }
}

fn queue_children(dir: &Pending, todo: &mut Vec<Pending>) -> io::Result<()> {
    let mut names: Vec<String> =
        fs::read_dir(&dir.fs_path)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    todo.extend(
        names
            .into_iter()
            .map(|n| Pending { fs_path: paths::join(&dir.fs_path, &n), name: format!("{}/{n}", dir.name) }),
    );
    Ok(())
}

/// Copies exactly `body.size` bytes of the file, then pads to a block boundary.
async fn copy_body(mut body: Body, out: &mut Out<'_>) -> Result<io::Result<()>, ProtoError> {
    let mut left = body.size;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match body.file.read(&mut buf[..want]) {
            Ok(0) => {
                // The file shrank: keep the archive consistent with its header.
                buf[..want].fill(0);
                want
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(e)),
        };
        out.push(&buf[..n]).await?;
        left -= n as u64;
    }
    let pad = (BLOCK - body.size % BLOCK) % BLOCK;
    out.push(&[0u8; BLOCK as usize][..pad as usize]).await?;
    Ok(Ok(()))
}

/// Handles `Request::ArchiveWrite`.
pub async fn write(agent: &Agent, mut conn: Conn, path: &str, user: Option<&str>) -> Result<(), ProtoError> {
    let (path, user) = match prepare_target(agent, path, user) {
        Ok(t) => t,
        Err(e) => return conn.err(e).await,
    };
    let (data_tx, data_rx) = mpsc::channel(UNPACK_QUEUE);
    let (done_tx, done_rx) = oneshot::channel();
    let base = agent.base.clone();
    let spawned = std::thread::Builder::new().name("untar".into()).spawn(move || {
        let reader = ChannelReader { rx: data_rx, buf: Vec::new(), pos: 0 };
        let _ = done_tx.send(unpack(&base, &user, &path, reader));
    });
    if spawned.is_err() {
        return conn.err(Error::ThreadLimit).await;
    }
    if let Err(e) = feed(&mut conn, data_tx).await? {
        return conn.err(e).await;
    }
    match done_rx.await {
        Ok(Ok(())) => conn.ok(&()).await,
        Ok(Err(e)) => conn.err(e).await,
        Err(_) => conn.err(Error::Archive { source: io::Error::other("extraction stopped unexpectedly") }).await,
    }
}

fn prepare_target(agent: &Agent, path: &str, user: Option<&str>) -> Result<(String, User), Error> {
    let path = normalize(path)?;
    let user = resolve_user(user)?;
    {
        let _as = agent.base.enter(&user)?;
        create_dirs(&path, 0o755)?;
    }
    Ok((path, user))
}

/// Passes `Data` frames to the extraction thread until `Eof` (or until the thread stops
/// taking them because it failed).
async fn feed(conn: &mut Conn, tx: mpsc::Sender<Vec<u8>>) -> Result<Result<(), Error>, ProtoError> {
    loop {
        let frame = conn.reader.expect().await?;
        match frame.kind {
            Kind::Data => {
                if tx.send(frame.payload).await.is_err() {
                    return Ok(Ok(()));
                }
            }
            Kind::Eof => return Ok(Ok(())),
            other => return Ok(Err(Error::Invalid(format!("unexpected {other:?} frame in archive data")))),
        }
    }
}

/// A blocking reader over the frames the connection forwards.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(buf) => (self.buf, self.pos) = (buf, 0),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Extracts the archive into `dir` as `user` (runs on its own thread).
fn unpack(base: &Base, user: &User, dir: &str, reader: impl Read) -> Result<(), Error> {
    let _as = base.enter(user)?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // Directories last, deepest first, as `Archive::unpack` does: a read-only directory
    // must not stop its own contents from being written.
    let mut dirs = Vec::new();
    for entry in archive.entries().map_err(|source| Error::Archive { source })? {
        let mut entry = entry.map_err(|source| Error::Archive { source })?;
        let name = checked_name(&entry.path().map_err(|source| Error::Archive { source })?)?;
        match entry.header().entry_type() {
            EntryType::Directory => {
                dirs.push(entry);
                continue;
            }
            // The `tar` crate would write these as empty regular files.
            EntryType::Fifo => {
                let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
                make_fifo(dir, &name, mode)?;
                continue;
            }
            EntryType::Char | EntryType::Block => {
                return Err(Error::Invalid(format!(
                    "{name}: a device node cannot be created in a sandbox (the archive stops there)"
                )));
            }
            _ => {}
        }
        entry.unpack_in(dir).map_err(|e| unpack_error(dir, &name, e))?;
    }
    dirs.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut entry in dirs {
        let name = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        entry.unpack_in(dir).map_err(|e| unpack_error(dir, &name, e))?;
    }
    Ok(())
}

/// Makes the FIFO `name` of an archive under `dir` (its parents as needed), replacing
/// what is there unless it is a directory.
fn make_fifo(dir: &str, name: &str, mode: u32) -> Result<(), Error> {
    let target = paths::join(dir, name.trim_end_matches('/'));
    if let Some(parent) = paths::parent(&target) {
        create_dirs(parent, 0o755)?;
    }
    if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(&target).map_err(|e| Error::path(&target, e))?;
    }
    rustix::fs::mknodat(
        rustix::fs::CWD,
        target.as_str(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(mode),
        0,
    )
    .map_err(|e| Error::path(&target, e.into()))?;
    // The umask may have taken bits away.
    rustix::fs::chmod(target.as_str(), rustix::fs::Mode::from_raw_mode(mode))
        .map_err(|e| Error::path(&target, e.into()))
}

/// Rejects absolute entry paths and `..`; returns the path for messages.
fn checked_name(path: &Path) -> Result<String, Error> {
    let name = path.to_string_lossy().into_owned();
    let unsafe_part = |c: Component<'_>| matches!(c, Component::RootDir | Component::ParentDir | Component::Prefix(_));
    if path.components().any(unsafe_part) {
        return Err(Error::UnsafeEntry(name));
    }
    Ok(name)
}

/// The `tar` crate wraps OS errors in its own; dig the OS error out so the client sees
/// e.g. `permission denied: /dst/file`.
fn unpack_error(dir: &str, name: &str, e: io::Error) -> Error {
    let target = paths::join(dir, name.trim_end_matches('/'));
    Error::path(target, os_error(e))
}

fn os_error(e: io::Error) -> io::Error {
    if e.raw_os_error().is_some() {
        return e;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|inner| inner as _);
    while let Some(c) = cause {
        if let Some(code) = c.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) {
            return io::Error::from_raw_os_error(code);
        }
        cause = c.source();
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escaping_entries() {
        assert!(checked_name(Path::new("a/b")).is_ok());
        assert!(checked_name(Path::new("./a")).is_ok());
        assert!(matches!(checked_name(Path::new("/etc/passwd")), Err(Error::UnsafeEntry(_))));
        assert!(matches!(checked_name(Path::new("a/../../b")), Err(Error::UnsafeEntry(_))));
    }

    #[test]
    fn channel_reader_concatenates_frames() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(b"ab".to_vec()).unwrap();
        tx.try_send(b"cde".to_vec()).unwrap();
        drop(tx);
        let mut reader = ChannelReader { rx, buf: Vec::new(), pos: 0 };
        let mut all = String::new();
        reader.read_to_string(&mut all).unwrap();
        assert_eq!(all, "abcde");
    }

    #[test]
    fn finds_os_errors_inside_wrapped_errors() {
        #[derive(Debug)]
        struct Wrapper(io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("failed to unpack")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped = io::Error::new(io::ErrorKind::PermissionDenied, Wrapper(io::Error::from_raw_os_error(13)));
        assert_eq!(os_error(wrapped).raw_os_error(), Some(13));
    }
}
