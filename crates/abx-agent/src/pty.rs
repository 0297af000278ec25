//! Pseudo-terminals for `tty` processes.
//!
//! The agent opens a master (`/dev/ptmx` of the sandbox's devpts), gives the slave to the
//! child as stdin, stdout and stderr (the child makes it its controlling terminal after
//! `setsid`), and drives the master non-blocking through tokio. Reads after the last slave
//! descriptor closed fail with `EIO`, which means end of output.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;

use abx_proto::TtySize;
use rustix::io::Errno;
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use tokio::net::unix::pipe;

/// A freshly allocated terminal: the master for the agent, the slave for the child.
#[derive(Debug)]
pub struct Pty {
    pub master: Master,
    pub slave: OwnedFd,
}

/// Allocates a terminal of the given size.
pub fn open(size: TtySize) -> io::Result<Pty> {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?;
    set_size(&master, size)?;
    // O_NONBLOCK belongs to the open file description, so it covers the duplicate too.
    rustix::io::ioctl_fionbio(&master, true)?;
    let writer = rustix::io::fcntl_dupfd_cloexec(&master, 0)?;
    let master = Master {
        reader: pipe::Receiver::from_owned_fd_unchecked(master)?,
        writer: pipe::Sender::from_owned_fd_unchecked(writer)?,
    };
    Ok(Pty { master, slave: slave.into() })
}

fn set_size(fd: impl AsFd, size: TtySize) -> io::Result<()> {
    let ws = Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    Ok(rustix::termios::tcsetwinsize(fd, ws)?)
}

/// The agent's side of a terminal, registered with tokio twice (one descriptor per
/// direction, two duplicates of the master), through tokio's pipe types: they take an
/// `OwnedFd` safely and only need a non-blocking descriptor that epoll accepts.
#[derive(Debug)]
pub struct Master {
    reader: pipe::Receiver,
    writer: pipe::Sender,
}

impl Master {
    /// Reads output; `Ok(0)` once every slave descriptor is closed.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.reader.readable().await?;
            match self.reader.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.raw_os_error() == Some(Errno::IO.raw_os_error()) => return Ok(0),
                other => return other,
            }
        }
    }

    /// Writes all of `data` as terminal input.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            self.writer.writable().await?;
            match self.writer.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Changes the terminal size (the foreground process group gets `SIGWINCH`).
    pub fn resize(&self, size: TtySize) -> io::Result<()> {
        set_size(&self.reader, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_input_and_resizes() {
        let Ok(pty) = open(TtySize { rows: 24, cols: 80 }) else {
            return; // no devpts in this environment
        };
        let ws = rustix::termios::tcgetwinsize(&pty.slave).unwrap();
        assert_eq!((ws.ws_row, ws.ws_col), (24, 80));
        pty.master.resize(TtySize { rows: 50, cols: 132 }).unwrap();
        let ws = rustix::termios::tcgetwinsize(&pty.slave).unwrap();
        assert_eq!((ws.ws_row, ws.ws_col), (50, 132));
        pty.master.write_all(b"hi\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = pty.master.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"hi"));
        drop(pty.slave);
    }
}
