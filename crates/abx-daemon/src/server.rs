//! Listeners and the serve loop.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::net::UnixListener;
use tracing::info;

use crate::config::Listen;
use crate::core::Core;

/// Binds a unix socket readable and writable by root only (its directory is made 0700).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another daemon is listening on {}", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves the API on every listener until `shutdown` resolves.
pub async fn serve(
    core: Core,
    listen: &[Listen],
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = crate::api::router(core.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for l in listen {
        match l {
            Listen::Unix(path) => {
                let listener = bind_unix(path)?;
                info!(socket = %path.display(), "listening");
                let app = app.clone();
                let mut rx = stop_rx.clone();
                tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.wait_for(|s| *s).await;
                        })
                        .await;
                }));
            }
            Listen::Tcp(addr) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    format!(
                        "tcp:{addr}: TCP listeners need API keys, which this version does not offer yet; use a unix socket"
                    ),
                ));
            }
        }
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    Ok(())
}
