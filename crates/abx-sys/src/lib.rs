//! Thin wrappers over the Linux system calls agentbox needs that `rustix` does not cover
//! (or covers only as `unsafe`). This is the only crate in the workspace allowed to contain
//! `unsafe` code; every block carries a `// SAFETY:` comment.
//!
//! The wrappers return `std::io::Result` and never panic, so they can be used between
//! `fork` and `exec` in a single-threaded parent.
#![allow(unsafe_code)]

pub mod agent;
#[cfg(feature = "tokio")]
pub mod asyncio;
pub mod btrfs;
pub mod conntrack;
pub mod fd;
pub mod loopdev;
pub mod mount;
pub mod net;
pub mod netlink;
pub mod nflog;
pub mod nft;
pub mod probe;
pub mod process;
pub mod rtnl;
pub mod spawn;

use std::io;

/// Converts a raw `-1`/`errno` return into an `io::Result`.
fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}
