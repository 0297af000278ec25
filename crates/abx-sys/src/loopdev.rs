//! Loop devices: attach a file as a block device (`LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How to attach a backing file.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopOptions {
    pub read_only: bool,
    /// Bypass the page cache for the backing file (no double caching).
    pub direct_io: bool,
    /// Detach the device when its last user (the mount) goes away.
    pub autoclear: bool,
    /// Logical block size (0: the kernel's default of 512).
    pub block_size: u32,
}

/// An attached loop device: its number and an open descriptor. With
/// [`LoopOptions::autoclear`], closing the descriptor detaches it unless something (a
/// mount) still uses it.
#[derive(Debug)]
pub struct LoopDevice {
    pub number: u32,
    pub fd: OwnedFd,
}

impl LoopDevice {
    /// `/dev/loopN`.
    pub fn path(&self) -> std::path::PathBuf {
        format!("/dev/loop{}", self.number).into()
    }
}

/// Attaches `backing` to a free loop device. `name` is recorded as the device's file
/// name (visible in `losetup -l`; up to 63 bytes are kept).
pub fn attach(backing: BorrowedFd<'_>, name: &str, opts: LoopOptions) -> io::Result<LoopDevice> {
    let control = rustix::fs::open(
        "/dev/loop-control",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut flags = 0;
    if opts.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    if opts.autoclear {
        flags |= LO_FLAGS_AUTOCLEAR;
    }
    if opts.direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    // Another process can take the device between GET_FREE and CONFIGURE: retry.
    let mut last = io::Error::from_raw_os_error(libc::EBUSY);
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = format!("/dev/loop{n}");
        let mode = if opts.read_only { rustix::fs::OFlags::RDONLY } else { rustix::fs::OFlags::RDWR };
        let dev = rustix::fs::open(&path, mode | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())?;
        let mut cfg = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: opts.block_size,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: flags,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        let bytes = name.as_bytes();
        let len = bytes.len().min(63);
        cfg.info.lo_file_name[..len].copy_from_slice(&bytes[..len]);
        // SAFETY: LOOP_CONFIGURE reads a live, correctly laid out `loop_config`.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok(LoopDevice { number: n as u32, fd: dev });
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EBUSY) {
            return Err(last);
        }
    }
    Err(last)
}
