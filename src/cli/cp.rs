//! `agentbox cp SRC DST` with `ID:/path` on either side. Directories travel as tar
//! archives. Archives from a sandbox are untrusted: they are unpacked with the `tar`
//! crate's `unpack_in`, which refuses entries escaping the destination (`..`, absolute
//! paths, symlinked parents), into a fresh directory that is then renamed into place.
//! What comes from a sandbox keeps only its rwx permission bits on the host (no setuid,
//! setgid or sticky bit, on files or directories), and belongs to the user running the
//! CLI. What goes into a sandbox keeps its mode (as the sandbox's user may set it).

use std::path::{Path, PathBuf};

use abx_client::{Client, FileKind};
use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;

#[derive(Debug, Args)]
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
        (Loc::Host(_), Loc::Host(_)) => bail!("one side must be in a sandbox (ID:/path)"),
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
        let data = tokio::fs::read(src).await.with_context(|| format!("read {}", src.display()))?;
        client.write_file(id, &target, data, Some(meta.permissions().mode() & 0o7777)).await?;
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
    let src = src.to_path_buf();
    let tar = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(&top, &src)?;
        b.into_inner()
    })
    .await??;
    client.upload_archive(id, &into, tar).await?;
    Ok(())
}

async fn download(client: &Client, id: &str, src: &str, dst: &Path) -> anyhow::Result<()> {
    let info = client.stat(id, src).await?;
    let src_name = base_name(src)?;
    match info.kind {
        FileKind::File => {
            let target = if dst.is_dir() { dst.join(&src_name) } else { dst.to_path_buf() };
            let data = client.read_file(id, src).await?;
            tokio::fs::write(&target, data).await.with_context(|| format!("write {}", target.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(info.mode & 0o777))?;
        }
        FileKind::Dir => {
            let (parent, final_name) = if dst.is_dir() {
                (dst.to_path_buf(), src_name.clone())
            } else {
                let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                (parent.to_path_buf(), base_name(&dst.to_string_lossy())?)
            };
            let mut body = client.download_archive(id, src).await?;
            let mut tar = Vec::new();
            while let Some(chunk) = body.next().await {
                tar.extend_from_slice(&chunk?);
            }
            let final_path = parent.join(&final_name);
            if final_path.exists() {
                bail!("{} already exists", final_path.display());
            }
            tokio::task::spawn_blocking(move || unpack_safely(&tar, &parent, &src_name, &final_path)).await??;
        }
        _ => bail!("{src} in sandbox {id} is neither a file nor a directory"),
    }
    Ok(())
}

fn unpack_safely(tar: &[u8], parent: &Path, top: &str, final_path: &Path) -> anyhow::Result<()> {
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
