//! File operations, each performed with the requesting user's permissions (see
//! [`crate::creds`]): the thread's identity is switched only around synchronous system
//! calls, never across an `.await`. The files live on the sandbox's local overlay, so
//! the calls run inline on the agent's one runtime thread.
//!
//! Decisions where the protocol leaves room:
//! * `ReadFile` and `WriteFile` refuse anything but regular files (a FIFO or device could
//!   block the agent or never end); both open with `O_NONBLOCK` so opening cannot block.
//! * `WriteFile` gives a new file `mode` (default 0644) exactly, whatever the umask; an
//!   existing file keeps its mode unless `mode` is given.
//! * `Mkdir` gives the directory `mode` (default 0755) exactly; with `parents`, missing
//!   ancestors get 0755.
//! * `ListDir` follows a symlink given as `path` itself but never one inside; entries it
//!   cannot read below the top are skipped; names that are not UTF-8 are shown lossily.
//!   `depth` must be at least 1; at most [`MAX_LIST_ENTRIES`] entries are returned.
//! * Errors after a reply already went out (a read failing midway) are sent as a JSON
//!   `Reply::Err` frame in place of `Eof`, then the connection closes.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

use abx_proto::{FileInfo, FileKind, Kind, ProtoError};
use rustix::fs::OFlags;
use rustix::io::Errno;

use crate::error::Error;
use crate::paths::{self, normalize};
use crate::server::{Agent, Conn};
use crate::users::{Db, User};

/// Size of the `Data` frames the agent sends.
pub const CHUNK: usize = 64 << 10;
/// Most entries one `ListDir` returns.
pub const MAX_LIST_ENTRIES: usize = 16_384;
const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;

/// Resolves the user a request names.
pub fn resolve_user(user: Option<&str>) -> Result<User, Error> {
    Db::load().resolve(user)
}

/// Metadata of `path` as the protocol reports it.
pub fn file_info(path: &str, meta: &Metadata, symlink_target: Option<String>) -> FileInfo {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    FileInfo {
        name: paths::file_name(path).to_owned(),
        path: path.to_owned(),
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        symlink_target,
    }
}

/// `lstat` of a normalized path.
pub fn lstat_info(path: &str) -> Result<FileInfo, Error> {
    let meta = fs::symlink_metadata(path).map_err(|e| Error::path(path, e))?;
    let target = meta.is_symlink().then(|| fs::read_link(path).ok()).flatten();
    Ok(file_info(path, &meta, target.map(|t| t.to_string_lossy().into_owned())))
}

/// Handles `Request::Stat`.
pub fn stat(agent: &Agent, path: &str, user: Option<&str>) -> Result<FileInfo, Error> {
    let path = normalize(path)?;
    let user = resolve_user(user)?;
    let _as = agent.base.enter(&user)?;
    lstat_info(&path)
}

/// Handles `Request::ReadFile`.
pub async fn read_file(agent: &Agent, mut conn: Conn, path: &str, user: Option<&str>) -> Result<(), ProtoError> {
    let (mut file, info) = match open_for_read(agent, path, user) {
        Ok(opened) => opened,
        Err(e) => return conn.err(e).await,
    };
    conn.ok(&info).await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return conn.writer.send(Kind::Eof, &[]).await,
            Ok(n) => conn.writer.send(Kind::Data, &buf[..n]).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return conn.err(Error::path(&info.path, e)).await,
        }
    }
}

fn open_for_read(agent: &Agent, path: &str, user: Option<&str>) -> Result<(File, FileInfo), Error> {
    let path = normalize(path)?;
    let user = resolve_user(user)?;
    let _as = agent.base.enter(&user)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(&path)
        .map_err(|e| Error::path(&path, e))?;
    let meta = file.metadata().map_err(|e| Error::path(&path, e))?;
    check_regular(&path, &meta)?;
    Ok((file, file_info(&path, &meta, None)))
}

fn check_regular(path: &str, meta: &Metadata) -> Result<(), Error> {
    if meta.is_dir() {
        return Err(Error::path(path, Errno::ISDIR.into()));
    }
    if !meta.is_file() {
        return Err(Error::NotRegular(path.to_owned()));
    }
    Ok(())
}

/// What `Request::WriteFile` asks for.
#[derive(Debug)]
pub struct WriteRequest<'a> {
    pub path: &'a str,
    pub user: Option<&'a str>,
    pub mode: Option<u32>,
    pub parents: bool,
    pub append: bool,
}

/// Handles `Request::WriteFile`: consumes `Data` frames until `Eof`.
pub async fn write_file(agent: &Agent, mut conn: Conn, req: WriteRequest<'_>) -> Result<(), ProtoError> {
    let (mut file, path) = match open_for_write(agent, &req) {
        Ok(opened) => opened,
        Err(e) => return conn.err(e).await,
    };
    loop {
        let frame = conn.reader.expect().await?;
        match frame.kind {
            Kind::Data => {
                if let Err(e) = file.write_all(&frame.payload) {
                    return conn.err(Error::path(&path, e)).await;
                }
            }
            Kind::Eof => break,
            other => return conn.err(Error::Invalid(format!("unexpected {other:?} frame in file data"))).await,
        }
    }
    // A write by a user without CAP_FSETID clears the setuid and setgid bits the mode set
    // before it: they are set again once the content is there.
    // Done as the writing user, as the first one was (never with more rights than theirs).
    if let Some(mode) = check_mode(req.mode).ok().flatten().filter(|m| m & 0o6000 != 0) {
        let again = resolve_user(req.user).and_then(|user| {
            let _as = agent.base.enter(&user)?;
            rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(mode)).map_err(|e| Error::path(&path, e.into()))
        });
        if let Err(e) = again {
            return conn.err(e).await;
        }
    }
    match file.metadata() {
        Ok(meta) => conn.ok(&file_info(&path, &meta, None)).await,
        Err(e) => conn.err(Error::path(&path, e)).await,
    }
}

fn open_for_write(agent: &Agent, req: &WriteRequest<'_>) -> Result<(File, String), Error> {
    let path = normalize(req.path)?;
    let mode = check_mode(req.mode)?;
    let user = resolve_user(req.user)?;
    let _as = agent.base.enter(&user)?;
    if req.parents
        && let Some(dir) = paths::parent(&path)
    {
        create_dirs(dir, DEFAULT_DIR_MODE)?;
    }
    let (file, created) = open_writable(&path, req.append).map_err(|e| Error::path(&path, e))?;
    let meta = file.metadata().map_err(|e| Error::path(&path, e))?;
    check_regular(&path, &meta)?;
    if created || mode.is_some() {
        let mode = rustix::fs::Mode::from_raw_mode(mode.unwrap_or(DEFAULT_FILE_MODE));
        rustix::fs::fchmod(&file, mode).map_err(|e| Error::path(&path, e.into()))?;
    }
    Ok((file, path))
}

/// Creates the file (reporting `true`) or opens the existing one (truncating unless
/// appending).
fn open_writable(path: &str, append: bool) -> io::Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    opts.write(true).append(append).custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32);
    match opts.clone().create_new(true).mode(0o600).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((opts.truncate(!append).open(path)?, false)),
        Err(e) => Err(e),
    }
}

fn check_mode(mode: Option<u32>) -> Result<Option<u32>, Error> {
    match mode {
        Some(m) if m & !0o7777 != 0 => Err(Error::Invalid(format!("invalid mode {m:#o}"))),
        m => Ok(m),
    }
}

/// Creates `path` and any missing ancestors (those get 0755); an existing directory is
/// fine, anything else in the way is `AlreadyExists`/`NotADirectory`.
pub fn create_dirs(path: &str, mode: u32) -> Result<(), Error> {
    match fs::create_dir(path) {
        Ok(()) => set_mode(path, mode),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => expect_dir(path, e),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = paths::parent(path).ok_or_else(|| Error::path(path, e))?;
            create_dirs(parent, DEFAULT_DIR_MODE)?;
            match fs::create_dir(path) {
                Ok(()) => set_mode(path, mode),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => expect_dir(path, e),
                Err(e) => Err(Error::path(path, e)),
            }
        }
        Err(e) => Err(Error::path(path, e)),
    }
}

fn expect_dir(path: &str, exists: io::Error) -> Result<(), Error> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(Error::path(path, exists)),
    }
}

fn set_mode(path: &str, mode: u32) -> Result<(), Error> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| Error::path(path, e))
}

/// Handles `Request::Mkdir`.
pub fn mkdir(
    agent: &Agent,
    path: &str,
    user: Option<&str>,
    parents: bool,
    mode: Option<u32>,
) -> Result<FileInfo, Error> {
    let path = normalize(path)?;
    let mode = check_mode(mode)?.unwrap_or(DEFAULT_DIR_MODE);
    let user = resolve_user(user)?;
    let _as = agent.base.enter(&user)?;
    if parents {
        create_dirs(&path, mode)?;
    } else {
        fs::create_dir(&path).map_err(|e| Error::path(&path, e))?;
        set_mode(&path, mode)?;
    }
    lstat_info(&path)
}

/// Handles `Request::Remove`.
pub fn remove(agent: &Agent, path: &str, user: Option<&str>, recursive: bool) -> Result<(), Error> {
    let path = normalize(path)?;
    if path == "/" {
        return Err(Error::RemoveRoot);
    }
    let user = resolve_user(user)?;
    let _as = agent.base.enter(&user)?;
    let meta = fs::symlink_metadata(&path).map_err(|e| Error::path(&path, e))?;
    let removed = match (meta.is_dir(), recursive) {
        (true, true) => fs::remove_dir_all(&path),
        (true, false) => fs::remove_dir(&path),
        (false, _) => fs::remove_file(&path),
    };
    removed.map_err(|e| Error::path(&path, e))
}

/// Handles `Request::Rename`; errors name both paths as `from -> to`.
pub fn rename(agent: &Agent, from: &str, to: &str, user: Option<&str>) -> Result<FileInfo, Error> {
    let (from, to) = (normalize(from)?, normalize(to)?);
    let user = resolve_user(user)?;
    let _as = agent.base.enter(&user)?;
    fs::rename(&from, &to).map_err(|e| Error::path(format!("{from} -> {to}"), e))?;
    lstat_info(&to)
}

/// Handles `Request::ListDir`.
pub fn list_dir(agent: &Agent, path: &str, user: Option<&str>, depth: u32) -> Result<Vec<FileInfo>, Error> {
    let path = normalize(path)?;
    if depth == 0 {
        return Err(Error::Invalid("depth must be at least 1".into()));
    }
    let user = resolve_user(user)?;
    let _as = agent.base.enter(&user)?;
    let entries = fs::read_dir(&path).map_err(|e| Error::path(&path, e))?;
    let mut out = Vec::new();
    collect(&path, entries, depth, &mut out).map_err(|()| Error::TooManyEntries(path.clone()))?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Adds the entries of one directory (and, depth permitting, of its subdirectories);
/// `Err` when the entry limit is exceeded.
fn collect(dir: &str, entries: fs::ReadDir, depth: u32, out: &mut Vec<FileInfo>) -> Result<(), ()> {
    for entry in entries.flatten() {
        let path = paths::join(dir, &entry.file_name().to_string_lossy());
        let Ok(meta) = entry.metadata() else { continue };
        let target = meta.is_symlink().then(|| fs::read_link(&path).ok()).flatten();
        out.push(file_info(&path, &meta, target.map(|t| t.to_string_lossy().into_owned())));
        if out.len() > MAX_LIST_ENTRIES {
            return Err(());
        }
        if meta.is_dir()
            && depth > 1
            && let Ok(sub) = fs::read_dir(&path)
        {
            collect(&path, sub, depth - 1, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_file_info() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.txt");
        fs::write(&file, b"hello").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        let path = file.to_str().unwrap();
        let info = lstat_info(path).unwrap();
        assert_eq!((info.name.as_str(), info.kind, info.size, info.mode), ("f.txt", FileKind::File, 5, 0o640));
        std::os::unix::fs::symlink("f.txt", dir.path().join("l")).unwrap();
        let link = lstat_info(dir.path().join("l").to_str().unwrap()).unwrap();
        assert_eq!((link.kind, link.symlink_target.as_deref()), (FileKind::Symlink, Some("f.txt")));
    }

    #[test]
    fn creates_directories_with_exact_modes() {
        let dir = tempfile::tempdir().unwrap();
        let deep = format!("{}/a/b/c", dir.path().to_str().unwrap());
        create_dirs(&deep, 0o700).unwrap();
        let mode = |p: &str| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&deep), 0o700);
        assert_eq!(mode(paths::parent(&deep).unwrap()), 0o755);
        create_dirs(&deep, 0o700).unwrap();
        let file = format!("{deep}/f");
        fs::write(&file, b"").unwrap();
        assert_eq!(create_dirs(&file, 0o755).unwrap_err().code(), abx_proto::ErrorCode::AlreadyExists);
        let under_file = format!("{file}/x");
        assert_eq!(create_dirs(&under_file, 0o755).unwrap_err().code(), abx_proto::ErrorCode::NotADirectory);
    }

    #[test]
    fn checks_modes() {
        assert_eq!(check_mode(Some(0o4755)).unwrap(), Some(0o4755));
        assert!(check_mode(Some(0o10000)).is_err());
        assert_eq!(check_mode(None).unwrap(), None);
    }
}
