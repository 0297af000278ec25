//! The small commands: `write`, `read`, `connect`, `hog`, `sleep`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::syscalls;

/// What a command prints, and whether it is an `"ok":true`.
#[derive(Debug)]
pub struct Outcome {
    pub json: Value,
    pub ok: bool,
}

impl Outcome {
    fn ok(json: Value) -> Self {
        Outcome { json, ok: true }
    }

    /// `{"ok":false,"errno":"EACCES"}`, or `"error"` with the message for a non-OS error.
    fn failed(err: &io::Error) -> Self {
        let json = match (err.raw_os_error(), err.kind()) {
            (Some(e), _) => json!({"ok": false, "errno": syscalls::errno(e)}),
            (None, io::ErrorKind::TimedOut) => json!({"ok": false, "errno": "ETIMEDOUT"}),
            (None, _) => json!({"ok": false, "error": err.to_string()}),
        };
        Outcome { json, ok: false }
    }
}

/// What `write` writes.
const WRITE_DATA: &[u8] = b"abx-probe\n";
/// `read` stops counting here, so `/dev/zero` cannot make it run forever.
const READ_LIMIT: u64 = 64 << 20;
/// Timeout of `connect`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

/// Creates `path` (mode 0644 before umask) or appends to it, so an existing file is not
/// clobbered: `{"ok":true,"bytes":10}`.
pub fn write(path: &Path) -> Outcome {
    let result = OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| f.write_all(WRITE_DATA));
    match result {
        Ok(()) => Outcome::ok(json!({"ok": true, "bytes": WRITE_DATA.len()})),
        Err(e) => Outcome::failed(&e),
    }
}

/// Reads `path` up to 64 MiB: `{"ok":true,"size":N,"truncated":false}`.
pub fn read(path: &Path) -> Outcome {
    let result = File::open(path).and_then(|f| io::copy(&mut f.take(READ_LIMIT), &mut io::sink()));
    match result {
        Ok(size) => Outcome::ok(json!({"ok": true, "size": size, "truncated": size >= READ_LIMIT})),
        Err(e) => Outcome::failed(&e),
    }
}

/// Opens a TCP connection to each address `target` resolves to until one succeeds (1 s
/// timeout each): `{"ok":true,"addr":"127.0.0.1:80"}`; the last error otherwise.
pub fn connect(target: &str) -> Outcome {
    let addrs = match target.to_socket_addrs() {
        Ok(addrs) => addrs,
        Err(e) => return Outcome::failed(&e),
    };
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, format!("{target} resolves to no address"));
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(_) => return Outcome::ok(json!({"ok": true, "addr": addr.to_string()})),
            Err(e) => last = e,
        }
    }
    Outcome::failed(&last)
}

/// Allocates `megabytes` MiB in 1 MiB blocks, writing to every page so it is really
/// resident, with progress on stderr. Returns the memory for the caller to hold.
pub fn hog(megabytes: u64) -> (Outcome, Vec<Vec<u8>>) {
    let mut blocks = Vec::new();
    for n in 1..=megabytes {
        let mut block = vec![0u8; MIB];
        for page in block.iter_mut().step_by(PAGE) {
            *page = 1;
        }
        blocks.push(std::hint::black_box(block));
        eprintln!("abx-probe hog: {n} MiB");
    }
    (Outcome::ok(json!({"ok": true, "megabytes": megabytes})), blocks)
}

/// Keeps `memory` alive for `hold`, or forever.
pub fn hold(memory: Vec<Vec<u8>>, hold: Option<Duration>) {
    match hold {
        Some(d) => std::thread::sleep(d),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    drop(std::hint::black_box(memory));
}

/// Sleeps for `duration`: `{"ok":true}`.
pub fn sleep(duration: Duration) -> Outcome {
    std::thread::sleep(duration);
    Outcome::ok(json!({"ok": true}))
}
