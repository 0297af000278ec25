//! The crate's error type. Every variant names the template, path or program involved.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the layer store or a template build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A template name outside `[a-z0-9][a-z0-9._-]{0,62}`.
    #[error("invalid template name '{name}': {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// No template of that name in this store.
    #[error("template '{name}' not found")]
    NotFound { name: String },

    /// A layer digest that is not `sha256-` followed by 64 lowercase hex digits.
    #[error("invalid layer digest '{digest}'")]
    InvalidDigest { digest: String },

    /// A filesystem operation failed; `op` says which, e.g. "create directory".
    #[error("could not {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A template metadata file that does not parse.
    #[error("template metadata {} is invalid", path.display())]
    Metadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A metadata file that names a template other than its file name says, or holds an
    /// invalid name or layer digest.
    #[error("template metadata {} is inconsistent: {reason}", path.display())]
    Inconsistent { path: PathBuf, reason: String },

    /// A `base` recipe value that is not a valid mirror URL, suite or package name.
    #[error("invalid {field} '{value}' in recipe")]
    InvalidRecipe { field: &'static str, value: String },

    /// `Recipe::Dir` source that does not exist.
    #[error("cannot import {}: no such directory", path.display())]
    SourceMissing { path: PathBuf },

    /// `Recipe::Dir` source that exists but is not a directory.
    #[error("cannot import {}: not a directory", path.display())]
    SourceNotDir { path: PathBuf },

    /// `Recipe::Dir` source that holds the daemon's state root or build cache (an import
    /// into the store would copy itself into itself), or lies inside the state root.
    #[error(
        "cannot import {}: it holds {}, the daemon's own data; give a directory that does not contain the \
         daemon's state root or build cache",
        path.display(),
        inner.display()
    )]
    SourceHoldsStore { path: PathBuf, inner: PathBuf },

    /// `Recipe::Dir` source inside the daemon's state root.
    #[error("cannot import {}: it is inside the daemon's state root {}", path.display(), root.display())]
    SourceInStore { path: PathBuf, root: PathBuf },

    /// `/proc`, `/sys`, `/dev` or `/tmp` exists in a layer but is not a directory.
    #[error("{} must be a directory (it is a mount point)", path.display())]
    MountPointNotDir { path: PathBuf },

    /// The `base` recipe needs debootstrap on the host.
    #[error("debootstrap is not installed (apt-get install debootstrap)")]
    DebootstrapMissing,

    /// The `mini` recipe needs Debian's static busybox on the host.
    #[error("{} not found (apt-get install busybox-static)", path.display())]
    BusyboxMissing { path: PathBuf },

    /// `/bin/busybox` is the dynamically linked one, which cannot run inside the mini rootfs.
    #[error("{} is not statically linked (apt-get install busybox-static)", path.display())]
    BusyboxNotStatic { path: PathBuf },

    /// A helper program could not be started.
    #[error("could not run {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },

    /// A helper program exited unsuccessfully; `output` is the end of what it printed.
    #[error("{program} failed ({status}): {output}")]
    Command { program: String, status: ExitStatus, output: String },

    /// An image archive, layout, manifest, index or config that cannot be used; `what` names
    /// the file or blob (e.g. `manifest.json in /srv/img.tar`).
    #[error("invalid image {what}: {reason}")]
    ImageFormat { what: String, reason: String },

    /// The archive or index holds no image matching the one asked for, or several and none
    /// was chosen; `reason` lists what there is.
    #[error("cannot choose an image in {source_name}: {reason}")]
    ImageChoice { source_name: String, reason: String },

    /// A layer tar entry refused during extraction (a path escaping the layer, a path
    /// through a symlink, a hardlink to nothing), or an entry that could not be written.
    #[error("{layer}: entry '{entry}': {reason}")]
    LayerEntry { layer: String, entry: String, reason: String },

    /// A blob (or a layer's uncompressed content) whose SHA-256 is not the digest that
    /// names it, or whose size is not the size its descriptor gives.
    #[error("blob {blob} is corrupt: {reason}")]
    BlobMismatch { blob: String, reason: String },

    /// An image reference that does not parse (`host[:port]/repo/name[:tag|@sha256:...]`).
    #[error("invalid image reference '{reference}': {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The HTTP request to a registry (or its token service) failed before a response.
    #[error("request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    /// A registry answered with an error status; `message` is its error text, if any.
    #[error("registry {url} answered {status}: {message}")]
    RegistryStatus { url: String, status: u16, message: String },

    /// A registry refused access: credentials missing or rejected.
    #[error("registry {registry} refused access to {repository}: {reason}")]
    Unauthorized { registry: String, repository: String, reason: String },

    /// A registry credentials file (docker config.json / containers auth.json) that cannot
    /// be read or parsed.
    #[error("registry credentials file {}: {reason}", path.display())]
    AuthFile { path: PathBuf, reason: String },

    /// A layer an image reuses was removed (by a concurrent garbage collection) before the
    /// template was written; importing again fetches it anew.
    #[error("layer {digest} disappeared while the template was being written; try again")]
    LayerGone { digest: String },

    /// The store was closed ([`crate::Store::close`]: its daemon is shutting down) before
    /// this could be published.
    #[error("the template store is closed (its daemon is shutting down): nothing was published")]
    Closed,

    /// A Dockerfile that cannot be built, with the line to blame (see `dockerfile`).
    #[error(transparent)]
    Dockerfile(#[from] crate::dockerfile::DockerfileError),

    /// A `COPY`/`ADD` that cannot be done: a source missing, excluded by .dockerignore,
    /// outside the build context or matching nothing; a destination below a file; an archive
    /// entry leading outside the destination; an invalid `--chown` or `--chmod` (see `context`).
    #[error("build context: {message}")]
    Context { message: String },
}

/// Attaches the operation and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    /// Maps the error into [`Error::Io`] naming `op` and `path`.
    fn at(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io { op, path: path.to_path_buf(), source })
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::Io { op, path: path.to_path_buf(), source: e.into() })
    }
}

/// An error's message and those of its causes, for tests that look for a cause.
#[cfg(test)]
pub(crate) fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}
