//! File descriptors: close_range, SCM_RIGHTS passing, sealed executable memfds.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::cvt;

/// Closes every descriptor numbered `first` and above (`close_range(first, ~0, 0)`).
pub fn close_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range takes plain integers; closing descriptors we do not own is the
    // purpose of this call and happens right before exec in a process that owns them all.
    cvt(unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0) }).map(drop)
}

/// Closes every descriptor from 3 up except those in `keep` (stdio stays).
pub fn close_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd >= 3).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut next: RawFd = 3;
    for fd in keep {
        if fd > next {
            // SAFETY: close_range takes plain integers; the caller owns every descriptor
            // in the range and wants it closed.
            cvt(unsafe { libc::syscall(libc::SYS_close_range, next as libc::c_uint, (fd - 1) as libc::c_uint, 0) })?;
        }
        next = fd + 1;
    }
    close_from(next)
}

/// Marks every descriptor numbered `first` and above close-on-exec.
pub fn cloexec_from(first: RawFd) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on descriptors.
    cvt(unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) })
        .map(drop)
}

/// Duplicates `fd` onto `target` without close-on-exec (`dup2`, or clears the flag when
/// they are already equal).
pub fn dup_to(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // SAFETY: fcntl F_SETFD on a descriptor number only changes its flags.
        return cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } as libc::c_long).map(drop);
    }
    // SAFETY: dup2 takes two integers; the caller owns `fd` and wants `target` replaced.
    cvt(unsafe { libc::dup2(fd, target) } as libc::c_long).map(drop)
}

/// Sends `data` and the descriptors `fds` over a unix socket in one message.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let iov = [io::IoSlice::new(data)];
    Ok(rustix::net::sendmsg(sock, &iov, &mut anc, SendFlags::NOSIGNAL)?)
}

/// Receives one message into `buf` and up to `max_fds` descriptors that came with it.
/// Returns the number of bytes (0 at end of stream) and the descriptors.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(max_fds.max(1)))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(sock, &mut iov, &mut anc, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::other("control data truncated: too many descriptors"));
    }
    Ok((msg.bytes, fds))
}

/// Copies `bytes` into a sealed, executable, close-on-exec memfd. A sandbox executes the
/// guest agent from such a memfd, so nothing inside a sandbox can ever write to the file
/// the host runs (compare runc's CVE-2019-5736 fix).
/// The content is copied in the kernel (`copy_file_range`/`sendfile`), so the caller never
/// holds the image in its own memory (a forking process should stay small).
pub fn sealed_exec_memfd(name: &str, source: &std::path::Path) -> io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    const MFD_EXEC: u32 = 0x10;
    let base = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = rustix::fs::memfd_create(name, base | MemfdFlags::from_bits_retain(MFD_EXEC))
        .or_else(|_| rustix::fs::memfd_create(name, base))?;
    let mut src = std::fs::File::open(source)?;
    let mut dst = std::fs::File::from(fd);
    io::copy(&mut src, &mut dst)?;
    let fd = OwnedFd::from(dst);
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o555))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE)?;
    Ok(fd)
}

/// Takes ownership of a raw descriptor number inherited from a parent process.
///
/// Returns `None` when the number is not an open descriptor.
pub fn inherited(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only queries flags; it tells whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open and, by the calling convention of the process that
    // started us, handed over to us; nothing else in this process owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Borrows a raw descriptor number that the caller knows stays open for the rest of the
/// process's life (e.g. one inherited across fork and kept until exec).
///
/// Panics never; an invalid number makes later calls fail with EBADF.
pub fn borrow_raw(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: `BorrowedFd` only requires the number not to be -1 for its niche and the
    // descriptor to stay open while borrowed; callers pass a descriptor kept open until
    // exec. A stale number yields EBADF from the kernel, not memory unsafety.
    unsafe { BorrowedFd::borrow_raw(fd.max(0)) }
}
