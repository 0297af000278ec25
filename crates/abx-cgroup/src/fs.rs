//! File-system access behind a small trait, so the driver logic runs against the real
//! cgroupfs ([`HostFs`]) or against a fake tree in tests.
//!
//! The trait mirrors what cgroupfs offers: directories are made and removed with
//! `mkdir`/`rmdir` (the kernel adds and drops the control files), and control files are read
//! whole and written with one `write` of the complete value, never created or truncated.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The file operations the drivers need on a cgroup tree.
pub trait CgroupFs: Send + Sync + fmt::Debug {
    /// Creates one directory (not its parents).
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    /// Removes one empty cgroup directory.
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    /// Reads a whole control file.
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Writes `value` to an existing control file.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Names of the subdirectories (child cgroups) of `path`.
    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostFs;

impl CgroupFs for HostFs {
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.write_all(value.as_bytes())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }
}

/// [`CgroupFs`] with this crate's errors (each naming its path and value).
#[derive(Debug, Clone)]
pub(crate) struct Files(pub(crate) Arc<dyn CgroupFs>);

impl Files {
    pub(crate) fn read(&self, path: &Path) -> Result<String> {
        self.0.read(path).map_err(|source| Error::Read { path: path.to_owned(), source })
    }

    /// Reads a control file that may legitimately be absent (controller or kernel feature).
    pub(crate) fn read_opt(&self, path: &Path) -> Result<Option<String>> {
        match self.0.read(path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Read { path: path.to_owned(), source }),
        }
    }

    pub(crate) fn write(&self, path: &Path, value: &str) -> Result<()> {
        self.0.write(path, value).map_err(|source| Error::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        })
    }

    pub(crate) fn exists(&self, path: &Path) -> bool {
        self.0.exists(path)
    }

    /// Creates `path`; an existing directory is fine when `may_exist`.
    pub(crate) fn mkdir(&self, path: &Path, may_exist: bool) -> Result<()> {
        match self.0.mkdir(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && may_exist => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::Exists { path: path.to_owned() }),
            Err(source) => Err(Error::Mkdir { path: path.to_owned(), source }),
        }
    }

    /// Child cgroup names of `path`; a missing directory has none.
    pub(crate) fn subdirs(&self, path: &Path) -> Result<Vec<String>> {
        match self.0.subdirs(path) {
            Ok(names) => Ok(names),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(Error::List { path: path.to_owned(), source }),
        }
    }

    /// Removes `path` and the child cgroups below it, deepest first. A missing directory is
    /// fine; `EBUSY` (members still exiting) is retried with a short backoff until
    /// `deadline` (each directory is tried at least once).
    pub(crate) fn remove_tree(&self, path: &Path, deadline: Instant) -> Result<()> {
        for child in self.subdirs(path)? {
            self.remove_tree(&path.join(child), deadline)?;
        }
        self.rmdir_retry(path, deadline)
    }

    fn rmdir_retry(&self, path: &Path, deadline: Instant) -> Result<()> {
        let mut last = None;
        let done = poll(deadline, || match self.0.rmdir(path) {
            Ok(()) => Ok(Some(())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(())),
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                last = Some(e);
                Ok(None)
            }
            Err(source) => Err(Error::Rmdir { path: path.to_owned(), source }),
        })?;
        match (done, last) {
            (Some(()), _) => Ok(()),
            (None, source) => Err(Error::Rmdir {
                path: path.to_owned(),
                source: source.unwrap_or_else(|| io::ErrorKind::ResourceBusy.into()),
            }),
        }
    }
}

/// How long `rmdir` of a busy cgroup is retried (for all directories of one removal).
pub(crate) const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls `step` until it returns `Some` (then returns it), an error, or `deadline` passes
/// (then returns `None`), sleeping with an exponential backoff from 100 µs to 20 ms. `step`
/// runs at least once.
pub(crate) fn poll<T>(deadline: Instant, mut step: impl FnMut() -> Result<Option<T>>) -> Result<Option<T>> {
    let mut pause = Duration::from_micros(100);
    loop {
        if let Some(value) = step()? {
            return Ok(Some(value));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
