//! Registering owned descriptors with tokio's reactor.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers `fd` (a pidfd, a pty master, ...) with tokio for readiness events.
pub fn async_fd(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: tokio's I/O-safety requirement is that the descriptor stays open and is not
    // closed behind the reactor's back while registered; `OwnedFd` owns it exclusively and
    // closes it only when the returned AsyncFd drops it, after deregistration.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}
