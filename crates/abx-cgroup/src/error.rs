//! The one error type of this crate; every variant names the path, name or value involved.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, and on what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/proc/self/mountinfo` (or another layout source) could not be read.
    #[error("cannot read mount table {path}")]
    MountTable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Neither a cgroup v1 controller nor a cgroup2 hierarchy is mounted.
    #[error("no usable cgroup hierarchy is mounted (looked in {path}); mount cgroup2 at /sys/fs/cgroup")]
    NoHierarchy { path: PathBuf },
    /// The instance prefix is not acceptable.
    #[error("invalid cgroup instance prefix {prefix:?}: {reason}")]
    InvalidPrefix { prefix: String, reason: &'static str },
    /// The sandbox cgroup name is not acceptable.
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A limit is out of range.
    #[error("invalid limit {field} = {value}: {reason}")]
    InvalidLimit { field: &'static str, value: String, reason: &'static str },
    /// A limit was asked for but the controller that enforces it is not available.
    #[error(
        "cannot apply limit {field} to cgroup {name}: controller {controller} is not mounted (v1) or not enabled (v2)"
    )]
    ControllerUnavailable { field: &'static str, controller: &'static str, name: String },
    /// A process id that cannot be placed (0 would move the caller itself).
    #[error("invalid process id {pid}")]
    InvalidPid { pid: u32 },
    /// An operation needs a feature this host's cgroups lack.
    #[error("cannot {operation} cgroup {name}: {missing} is not available on this host")]
    Unsupported { operation: &'static str, name: String, missing: &'static str },
    /// The cgroup does not exist.
    #[error("cgroup {name} does not exist (no {path})")]
    NotFound { name: String, path: PathBuf },
    /// The cgroup already exists.
    #[error("cgroup directory {path} already exists")]
    Exists { path: PathBuf },
    /// A cgroup directory could not be created.
    #[error("cannot create cgroup directory {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be removed (also after retrying while it was busy).
    #[error("cannot remove cgroup directory {path}")]
    Rmdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be listed.
    #[error("cannot list cgroup directory {path}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A control file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A value could not be written to a control file.
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    /// A control file held something this crate does not understand.
    #[error("unexpected content in {path}: {content:?}")]
    Parse { path: PathBuf, content: String },
    /// A member process could not be signalled.
    #[error("cannot send SIGKILL to process {pid} of cgroup {name}")]
    Signal {
        pid: u32,
        name: String,
        #[source]
        source: io::Error,
    },
    /// The kernel did not reach the expected state in time.
    #[error("timed out after {waited:?} waiting for {path} to show {expected}")]
    Timeout { path: PathBuf, expected: &'static str, waited: Duration },
}
