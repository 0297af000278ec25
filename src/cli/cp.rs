//! `agentbox cp SRC DST` with `ID:/path` on either side. Directories travel as tar
//! archives. Archives from a sandbox are untrusted: they are unpacked with the `tar`
//! crate's `unpack_in`, which refuses entries escaping the destination (`..`, absolute
//! paths, symlinked parents), into a fresh directory that is then renamed into place.
//! What comes from a sandbox keeps only its rwx permission bits on the host (no setuid,
//! setgid or sticky bit, on files or directories), and belongs to the user running the
//! CLI. What goes into a sandbox keeps its mode (as the sandbox's user may set it).
//!
//! Nothing is held whole in memory: files and archives stream both ways, a downloaded file
//! is written to a temporary file beside its destination and renamed into place, and an
//! archive is built or unpacked on a blocking thread fed through a small channel.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use abx_client::{Client, FileInfo, FileKind};
use anyhow::{Context, bail};
use clap::Args;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Size of the chunks read from files and archives.
const CHUNK: usize = 256 << 10;
/// Chunks in flight between the network and an archive thread.
const QUEUE: usize = 8;
/// Symbolic links followed when resolving a source in a sandbox (as Linux's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

#[derive(Debug, Args)]
#[command(after_help = "\
A directory is copied with everything in it. A symlink given as the source is followed: \
what it points to is copied, under the link's name (a link in a sandbox is resolved inside \
the sandbox); symlinks inside a copied directory are copied as links.

Files copied out of a sandbox keep only their rwx permission bits (no setuid, setgid or \
sticky bit) and belong to the user running agentbox; files copied in keep their rwx bits. \
A host destination ending in / must be an existing directory.")]
pub struct CpArgs {
    /// Source: a host path or ID:/path.
    src: String,
    /// Destination: a host path or ID:/path.
    dst: String,
    /// Act as this user inside the sandbox (default: the sandbox's default user).
    #[arg(long, short = 'u')]
    user: Option<String>,
}

enum Loc {
    Host(PathBuf),
    Sandbox { id: String, path: String },
}

fn parse_loc(s: &str) -> Loc {
    if let Some((id, path)) = s.split_once(':')
        && !id.is_empty()
        && !id.contains('/')
        && path.starts_with('/')
    {
        return Loc::Sandbox { id: id.into(), path: path.into() };
    }
    Loc::Host(PathBuf::from(s))
}

/// Why two host paths were given: one of them may be a sandbox path that is not absolute
/// (`ID:relative`).
fn no_sandbox_side(src: &Path, dst: &Path) -> anyhow::Error {
    for p in [src, dst] {
        let s = p.to_string_lossy();
        if let Some((id, _)) = s.split_once(':')
            && !id.is_empty()
            && !id.contains('/')
        {
            return anyhow::anyhow!("'{s}': the path in sandbox {id} must be absolute (ID:/path)");
        }
    }
    anyhow::anyhow!("one side must be in a sandbox (ID:/path)")
}

fn base_name(p: &str) -> anyhow::Result<String> {
    Path::new(p)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("'{p}' has no file name to copy"))
}

fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

pub async fn cp(client: &Client, a: CpArgs) -> anyhow::Result<i32> {
    let scoped;
    let client = match &a.user {
        Some(u) => {
            scoped = client.with_file_user(u.clone());
            &scoped
        }
        None => client,
    };
    match (parse_loc(&a.src), parse_loc(&a.dst)) {
        (Loc::Host(src), Loc::Sandbox { id, path }) => upload(client, &src, &id, &path).await?,
        (Loc::Sandbox { id, path }, Loc::Host(dst)) => download(client, &id, &path, &dst).await?,
        (Loc::Host(src), Loc::Host(dst)) => return Err(no_sandbox_side(&src, &dst)),
        (Loc::Sandbox { .. }, Loc::Sandbox { .. }) => {
            bail!("copying between sandboxes is not supported; copy through the host")
        }
    }
    Ok(0)
}

/// The remote kind of `path`, or None when it does not exist.
async fn remote_kind(client: &Client, id: &str, path: &str) -> anyhow::Result<Option<FileKind>> {
    match client.stat(id, path).await {
        Ok(info) => Ok(Some(info.kind)),
        Err(e) if e.code() == Some("not_found") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn upload(client: &Client, src: &Path, id: &str, dst: &str) -> anyhow::Result<()> {
    let meta = std::fs::metadata(src).with_context(|| format!("{}", src.display()))?;
    let src_name = base_name(&src.to_string_lossy())?;
    let dst_is_dir = remote_kind(client, id, dst).await? == Some(FileKind::Dir);
    if meta.is_file() {
        use std::os::unix::fs::PermissionsExt;
        let target = if dst_is_dir || dst.ends_with('/') { join(dst, &src_name) } else { dst.to_string() };
        let file = tokio::fs::File::open(src).await.with_context(|| format!("open {}", src.display()))?;
        client.write_file_stream(id, &target, read_chunks(file), Some(meta.permissions().mode() & 0o7777)).await?;
        return Ok(());
    }
    if !meta.is_dir() {
        bail!("{} is neither a file nor a directory", src.display());
    }
    let (into, top) = if dst_is_dir {
        (dst.to_string(), src_name)
    } else {
        let parent = Path::new(dst).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into());
        (if parent.is_empty() { "/".into() } else { parent }, base_name(dst)?)
    };
    // A link given as the source is followed (the walk itself copies links as links).
    let dir = std::fs::canonicalize(src).with_context(|| format!("{}", src.display()))?;
    let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(QUEUE);
    let builder = tokio::task::spawn_blocking(move || {
        let built = build_archive(&dir, &top, ChanWriter(tx.clone()));
        if let Err(e) = &built {
            // Ends the upload with an error instead of a truncated archive.
            let _ = tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
        }
        built
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let sent = client.upload_archive_stream(id, &into, body).await;
    let built = builder.await?;
    match (sent, built) {
        (Ok(()), Ok(())) => Ok(()),
        // The archive could not be built: that is the cause, not the aborted upload.
        (_, Err(e)) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context(format!("archive {}", src.display())))
        }
        (Err(e), _) => Err(e.into()),
        (Ok(()), Err(e)) => Err(anyhow::Error::new(e).context(format!("archive {}", src.display()))),
    }
}

/// Writes a tar of directory `dir`, its top entry named `top`, to `out`.
fn build_archive(dir: &Path, top: &str, out: ChanWriter) -> io::Result<()> {
    let mut b = tar::Builder::new(io::BufWriter::with_capacity(CHUNK, out));
    b.follow_symlinks(false);
    b.append_dir_all(top, dir)?;
    b.into_inner()?.flush()
}

/// The chunks of a file as a stream, ending at the first error.
fn read_chunks(file: tokio::fs::File) -> impl Stream<Item = io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Follows `path` in sandbox `id` through symbolic links (resolved inside the sandbox) to
/// what they point to: its path and metadata.
async fn resolve(client: &Client, id: &str, path: &str) -> anyhow::Result<(String, FileInfo)> {
    let mut path = path.to_string();
    for _ in 0..MAX_LINKS {
        let info = client.stat(id, &path).await?;
        if info.kind != FileKind::Symlink {
            return Ok((path, info));
        }
        let target = info.symlink_target.with_context(|| format!("{path} in sandbox {id}: unreadable link"))?;
        path = if target.starts_with('/') {
            target
        } else {
            let parent = Path::new(&path).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            join(&parent, &target)
        };
    }
    bail!("{path} in sandbox {id}: too many levels of symbolic links")
}

/// Where a copy named `name` goes on the host for destination `dst`: the directory it is
/// created in and its name there.
fn host_target(dst: &Path, name: &str) -> anyhow::Result<(PathBuf, String)> {
    if dst.is_dir() {
        return Ok((dst.to_path_buf(), name.to_string()));
    }
    if dst.as_os_str().as_encoded_bytes().ends_with(b"/") {
        bail!("directory {} does not exist", dst.display());
    }
    let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("directory {} does not exist", parent.display());
    }
    Ok((parent.to_path_buf(), base_name(&dst.to_string_lossy())?))
}

async fn download(client: &Client, id: &str, src: &str, dst: &Path) -> anyhow::Result<()> {
    let (resolved, info) = resolve(client, id, src).await?;
    // The copy is named after the source as given (a link's name, not its target's).
    let (parent, name) = host_target(dst, &base_name(src)?)?;
    match info.kind {
        FileKind::File => download_file(client, id, &resolved, info.mode, &parent, &name).await,
        FileKind::Dir => download_dir(client, id, &resolved, &parent, &name).await,
        _ => bail!("{src} in sandbox {id} is neither a file nor a directory"),
    }
}

/// Streams a file into a temporary file in `parent`, renamed to `name` once complete.
async fn download_file(
    client: &Client,
    id: &str,
    src: &str,
    mode: u32,
    parent: &Path,
    name: &str,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let target = parent.join(name);
    let tmp = tempfile::Builder::new()
        .prefix(".agentbox-cp-")
        .tempfile_in(parent)
        .with_context(|| format!("create a file in {}", parent.display()))?;
    let (file, tmp_path) = tmp.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let pid = client.first_pid(id).await;
    let mut body = client.read_file_stream(id, src).await?;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Err(broke_off(client, id, src, pid, e).await),
        };
        file.write_all(&chunk).await.with_context(|| format!("write {}", target.display()))?;
    }
    file.flush().await.with_context(|| format!("write {}", target.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777)).await?;
    drop(file);
    tmp_path.persist(&target).with_context(|| format!("move into place at {}", target.display()))?;
    Ok(())
}

/// Streams the archive of directory `src` into an unpacking thread.
async fn download_dir(client: &Client, id: &str, src: &str, parent: &Path, name: &str) -> anyhow::Result<()> {
    let final_path = parent.join(name);
    if final_path.exists() {
        bail!("{} already exists", final_path.display());
    }
    let top = base_name(src)?;
    let pid = client.first_pid(id).await;
    let mut body = client.download_archive(id, src).await?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let parent = parent.to_path_buf();
    let unpack = tokio::task::spawn_blocking(move || unpack_safely(ChanReader::new(rx), &parent, &top, &final_path));
    let mut failed = None;
    while let Some(chunk) = body.next().await {
        let item = chunk.map_err(|e| {
            let msg = e.to_string();
            failed = Some(e);
            io::Error::other(msg)
        });
        if tx.send(item).await.is_err() || failed.is_some() {
            break;
        }
    }
    drop(tx);
    let unpacked = unpack.await?;
    match failed {
        Some(e) => Err(broke_off(client, id, src, pid, e).await),
        None => unpacked,
    }
}

/// A download cut off half-way names its cause when it is known ([`Client::why_cut`]).
async fn broke_off(client: &Client, id: &str, src: &str, pid: Option<i32>, e: abx_client::Error) -> anyhow::Error {
    match client.why_cut(id, pid).await {
        Some(why) => anyhow::anyhow!("the download of {id}:{src} broke off: {why}"),
        None => anyhow::Error::new(e).context(format!("the download of {id}:{src} broke off")),
    }
}

fn unpack_safely(tar: impl Read, parent: &Path, top: &str, final_path: &Path) -> anyhow::Result<()> {
    let staging = tempfile::Builder::new().prefix(".agentbox-cp-").tempdir_in(parent)?;
    let mut archive = tar::Archive::new(tar);
    // Only the rwx bits: a setuid, setgid or sticky bit from a sandbox never reaches the
    // host (the CLI usually runs as root, so a setuid file would be setuid root).
    archive.set_preserve_permissions(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.unpack_in(staging.path())? {
            bail!("refusing archive entry outside the destination: {}", entry.path()?.display());
        }
    }
    std::fs::rename(staging.path().join(top), final_path)
        .with_context(|| format!("move into place at {}", final_path.display()))?;
    Ok(())
}

/// The blocking end of a channel of chunks, as a reader (for the `tar` crate).
struct ChanReader<B> {
    rx: mpsc::Receiver<io::Result<B>>,
    chunk: Option<B>,
    pos: usize,
}

impl<B> ChanReader<B> {
    fn new(rx: mpsc::Receiver<io::Result<B>>) -> Self {
        ChanReader { rx, chunk: None, pos: 0 }
    }
}

impl<B: AsRef<[u8]>> Read for ChanReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(chunk) = &self.chunk {
                let rest = &chunk.as_ref()[self.pos..];
                if !rest.is_empty() {
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.chunk = Some(chunk);
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
    }
}

/// The blocking start of a channel of chunks, as a writer (for the `tar` crate); a write
/// after the receiver went away (the upload ended) fails with `BrokenPipe`.
struct ChanWriter(mpsc::Sender<io::Result<Vec<u8>>>);

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(buf.to_vec()))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload ended"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_sandbox_path_is_named_as_such() {
        let e = no_sandbox_side(Path::new("f.txt"), Path::new("s1:relative"));
        assert_eq!(e.to_string(), "'s1:relative': the path in sandbox s1 must be absolute (ID:/path)");
        let e = no_sandbox_side(Path::new("./a"), Path::new("./b:c"));
        assert_eq!(e.to_string(), "one side must be in a sandbox (ID:/path)");
    }

    #[test]
    fn a_chan_reader_reads_chunks_in_order_then_the_end() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(b"ab".to_vec())).unwrap();
        tx.try_send(Ok(Vec::new())).unwrap();
        tx.try_send(Ok(b"cde".to_vec())).unwrap();
        drop(tx);
        let mut out = String::new();
        ChanReader::new(rx).read_to_string(&mut out).unwrap();
        assert_eq!(out, "abcde");
    }
}
