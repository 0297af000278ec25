//! The small commands: `write`, `read`, `connect`, `udp`, `net-admin`, `hog`, `sleep`.

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

/// Sends `payload` over UDP to `target` and waits 1 s for an answer:
/// `{"ok":true,"reply":"…"}`, or the error (ECONNREFUSED for a port unreachable,
/// EHOSTUNREACH for a firewall's refusal, ETIMEDOUT for silence).
pub fn udp(target: &str, payload: &[u8]) -> Outcome {
    let run = || -> io::Result<String> {
        let addr = target
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{target} resolves to no address")))?;
        let sock = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        sock.connect(addr)?;
        sock.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        sock.send(payload)?;
        let mut buf = [0u8; 1500];
        let n = sock.recv(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock { io::Error::from(io::ErrorKind::TimedOut) } else { e }
        })?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    match run() {
        Ok(reply) => Outcome::ok(json!({"ok": true, "reply": reply})),
        Err(e) => Outcome::failed(&e),
    }
}

/// What root in a sandbox would do to lift its network restrictions: add an address to
/// eth0, replace the default route, flush an nftables set. Each result is "ok" or the
/// errno; `ok` is true if any of them worked.
pub fn net_admin() -> Outcome {
    let errno = |r: io::Result<()>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.raw_os_error().map_or_else(|| e.to_string(), syscalls::errno),
    };
    let (address, route) = match abx_sys::rtnl::Rtnl::open().and_then(|r| Ok((r.link_index("eth0")?, r))) {
        Ok((index, r)) => (
            errno(r.add_address_v4(index, std::net::Ipv4Addr::new(10, 99, 0, 1), 32)),
            errno(r.add_route_v4(&abx_sys::rtnl::RouteV4 {
                dst: std::net::Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                gateway: None,
                oif: index,
                scope_link: true,
                prefsrc: None,
            })),
        ),
        Err(e) => (errno(Err(e)), String::new()),
    };
    let nft = errno(abx_sys::nft::Nft::open().and_then(|n| n.flush_set(abx_sys::nft::Family::Ip, "abx", "d0")));
    let any = [&address, &route, &nft].iter().any(|r| *r == "ok");
    Outcome { json: json!({"ok": any, "address": address, "route": route, "nft": nft}), ok: any }
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
