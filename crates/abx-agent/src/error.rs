//! The agent's error type and its mapping onto the protocol's [`ErrorCode`]s.
//!
//! Every variant carries what failed (a path, a user, a pid) and its `Display` is the
//! message the client sees: lowercase, no trailing period, naming the subject, e.g.
//! `no such file or directory: /a/b`.

use std::io;

use abx_proto::{AgentError, ErrorCode};

/// Anything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation on `path` failed.
    #[error("{}: {path}", describe(.source))]
    Path { path: String, source: io::Error },
    #[error("path must be absolute: {0}")]
    NotAbsolute(String),
    #[error("not a regular file: {0}")]
    NotRegular(String),
    #[error("refusing to remove /")]
    RemoveRoot,
    #[error("user '{0}' not found")]
    UnknownUser(String),
    #[error("group '{0}' not found")]
    UnknownGroup(String),
    #[error("cannot act as user '{user}': {}", describe(.source))]
    SwitchUser { user: String, source: io::Error },
    #[error("working directory not found: {0}")]
    NoWorkdir(String),
    /// The process could not enter its working directory (as its user).
    #[error("cannot enter working directory {path}: {}", describe(.source))]
    Workdir { path: String, source: io::Error },
    #[error("command not found: {0}")]
    CommandNotFound(String),
    #[error("permission denied: {0}")]
    CommandDenied(String),
    #[error("cannot start process: process limit reached")]
    ProcessLimit,
    #[error("cannot start process: too many open files")]
    FdLimit,
    #[error("cannot start {command}: {}", describe(.source))]
    Spawn { command: String, source: io::Error },
    #[error("cannot allocate a terminal: {}", describe(.source))]
    Pty { source: io::Error },
    #[error("process {0} not found among the processes started through the API")]
    NoProcess(u32),
    #[error("process {0} has no stdin")]
    NoStdin(u32),
    #[error("process {0} has no terminal")]
    NoTty(u32),
    /// A process that had a terminal, or input, and has exited since.
    #[error("process {0} has exited")]
    Exited(u32),
    #[error("cannot signal process {pid}: {}", describe(.source))]
    Signal { pid: i32, source: io::Error },
    #[error("invalid signal number {0}")]
    BadSignal(i32),
    #[error("too many entries under {0}: list with a smaller depth")]
    TooManyEntries(String),
    #[error("archive entry escapes the target directory: {0}")]
    UnsafeEntry(String),
    #[error("cannot read archive: {}", describe(.source))]
    Archive { source: io::Error },
    #[error("cannot start a worker thread: thread limit reached")]
    ThreadLimit,
    /// The client sent something the request does not allow.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an `io::Error` from an operation on `path`.
    pub fn path(path: impl Into<String>, source: io::Error) -> Error {
        Error::Path { path: path.into(), source }
    }

    /// The protocol error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Path { source, .. }
            | Error::SwitchUser { source, .. }
            | Error::Pty { source }
            | Error::Spawn { source, .. }
            | Error::Workdir { source, .. }
            | Error::Signal { source, .. } => code_of(source),
            Error::UnknownUser(_)
            | Error::UnknownGroup(_)
            | Error::NoWorkdir(_)
            | Error::NoProcess(_)
            | Error::Exited(_) => ErrorCode::NotFound,
            Error::CommandNotFound(_) => ErrorCode::CommandNotFound,
            Error::CommandDenied(_) => ErrorCode::PermissionDenied,
            Error::ProcessLimit | Error::FdLimit | Error::TooManyEntries(_) | Error::ThreadLimit => {
                ErrorCode::ResourceExhausted
            }
            Error::Archive { .. } => ErrorCode::Io,
            Error::NotAbsolute(_)
            | Error::NotRegular(_)
            | Error::RemoveRoot
            | Error::NoStdin(_)
            | Error::NoTty(_)
            | Error::BadSignal(_)
            | Error::UnsafeEntry(_)
            | Error::Invalid(_) => ErrorCode::InvalidArgument,
        }
    }
}

impl From<Error> for AgentError {
    fn from(e: Error) -> AgentError {
        AgentError { code: e.code(), message: e.to_string() }
    }
}

/// The protocol code for an OS error.
pub fn code_of(e: &io::Error) -> ErrorCode {
    use rustix::io::Errno;
    let Some(raw) = e.raw_os_error() else {
        return match e.kind() {
            io::ErrorKind::NotFound => ErrorCode::NotFound,
            io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            io::ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorCode::InvalidArgument,
            _ => ErrorCode::Io,
        };
    };
    match Errno::from_raw_os_error(raw) {
        Errno::NOENT | Errno::SRCH => ErrorCode::NotFound,
        Errno::ACCESS | Errno::PERM | Errno::ROFS => ErrorCode::PermissionDenied,
        Errno::EXIST => ErrorCode::AlreadyExists,
        Errno::NOTDIR => ErrorCode::NotADirectory,
        Errno::ISDIR => ErrorCode::IsADirectory,
        Errno::NOTEMPTY => ErrorCode::DirectoryNotEmpty,
        Errno::NOSPC | Errno::DQUOT | Errno::MFILE | Errno::NFILE | Errno::NOMEM | Errno::AGAIN | Errno::FBIG => {
            ErrorCode::ResourceExhausted
        }
        Errno::INVAL | Errno::LOOP | Errno::NAMETOOLONG | Errno::XDEV | Errno::BUSY | Errno::NXIO => {
            ErrorCode::InvalidArgument
        }
        _ => ErrorCode::Io,
    }
}

/// A short lowercase description of an OS error, without the `(os error N)` suffix.
pub fn describe(e: &io::Error) -> String {
    use rustix::io::Errno;
    let fixed = e.raw_os_error().map(Errno::from_raw_os_error).and_then(|errno| {
        Some(match errno {
            Errno::NOENT => "no such file or directory",
            Errno::ACCESS | Errno::PERM => "permission denied",
            Errno::EXIST => "already exists",
            Errno::NOTDIR => "not a directory",
            Errno::ISDIR => "is a directory",
            Errno::NOTEMPTY => "directory not empty",
            Errno::NOSPC => "no space left on device",
            Errno::DQUOT => "disk quota exceeded",
            Errno::MFILE | Errno::NFILE => "too many open files",
            Errno::NOMEM => "out of memory",
            Errno::ROFS => "read-only file system",
            Errno::LOOP => "too many levels of symbolic links",
            Errno::NAMETOOLONG => "file name too long",
            Errno::XDEV => "cannot move across file systems",
            Errno::BUSY => "resource busy",
            Errno::SRCH => "no such process",
            Errno::FBIG => "file too large",
            _ => return None,
        })
    });
    match fixed {
        Some(text) => text.to_owned(),
        None => lowercase_first(&strip_os_suffix(&e.to_string())),
    }
}

fn strip_os_suffix(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_owned(),
        _ => s.to_owned(),
    }
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: rustix::io::Errno) -> io::Error {
        io::Error::from_raw_os_error(errno.raw_os_error())
    }

    #[test]
    fn path_errors_name_the_path() {
        let e = Error::path("/a/b", os(rustix::io::Errno::NOENT));
        assert_eq!(e.code(), ErrorCode::NotFound);
        assert_eq!(e.to_string(), "no such file or directory: /a/b");
    }

    #[test]
    fn maps_errnos_to_codes() {
        use rustix::io::Errno;
        let cases = [
            (Errno::ACCESS, ErrorCode::PermissionDenied),
            (Errno::EXIST, ErrorCode::AlreadyExists),
            (Errno::NOTDIR, ErrorCode::NotADirectory),
            (Errno::ISDIR, ErrorCode::IsADirectory),
            (Errno::NOTEMPTY, ErrorCode::DirectoryNotEmpty),
            (Errno::NOSPC, ErrorCode::ResourceExhausted),
            (Errno::IO, ErrorCode::Io),
        ];
        for (errno, code) in cases {
            assert_eq!(code_of(&os(errno)), code, "{errno:?}");
        }
    }

    #[test]
    fn unknown_errnos_are_described_in_lowercase() {
        let text = describe(&os(rustix::io::Errno::IO));
        assert_eq!(text, "input/output error");
    }

    #[test]
    fn converts_to_wire_errors() {
        let wire = AgentError::from(Error::UnknownUser("x".into()));
        assert_eq!(wire.code, ErrorCode::NotFound);
        assert_eq!(wire.message, "user 'x' not found");
        let wire = AgentError::from(Error::CommandNotFound("nope".into()));
        assert_eq!((wire.code, wire.message.as_str()), (ErrorCode::CommandNotFound, "command not found: nope"));
    }
}
