//! The small commands: `write`, `read`, `connect`, `udp`, `net-admin`, `hog`, `sleep`, and
//! the network benchmark's load generators `dns-bench`, `tcp-send` and `tcp-sink`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

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

/// How long `dns-bench` waits for each answer, and `tcp-send` for the sink's count.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
const SINK_COUNT_TIMEOUT: Duration = Duration::from_secs(30);

fn first_addr(target: &str) -> io::Result<SocketAddr> {
    target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{target} resolves to no address")))
}

/// A DNS query for the A records of `name` (recursion desired, one question, class IN),
/// built by hand: `dns-bench` is a load generator, not a resolver.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // flags: RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1, AN/NS/AR 0
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]); // QTYPE A, QCLASS IN
    q
}

/// What a datagram says about query `id`: `None` when it is not the answer to it (another
/// id, not a response, too short), `Some(Ok(answers))` for NOERROR with at least one
/// answer record, `Some(Err(rcode))` otherwise (rcode 0 here means an empty answer).
pub fn dns_answer(reply: &[u8], id: u16) -> Option<Result<u16, u8>> {
    if reply.len() < 12 || u16::from_be_bytes([reply[0], reply[1]]) != id || reply[2] & 0x80 == 0 {
        return None;
    }
    let rcode = reply[3] & 0x0f;
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    Some(if rcode == 0 && answers > 0 { Ok(answers) } else { Err(rcode) })
}

/// The value at quantile `p` of sorted latencies, in microseconds (nearest rank, like the
/// benchmark's own summaries).
fn quantile_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    micros(sorted[idx.min(sorted.len() - 1)])
}

fn micros(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000_000.0).round() / 10.0
}

/// Sends `count` A queries for `name` to `server`, each after the answer to the previous
/// one, over one connected UDP socket: `{"ok":true,"count":N,"median_us":…,"p95_us":…,…}`
/// with the latencies of the answered queries. `ok` is false if any query timed out (1 s)
/// or was answered with an error or no address; a socket error (ECONNREFUSED,
/// EHOSTUNREACH) ends the run with its errno.
pub fn dns_bench(server: &str, name: &str, count: u32) -> Outcome {
    let run = || -> io::Result<Value> {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.connect(first_addr(server)?)?;
        sock.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut latencies = Vec::with_capacity(count as usize);
        let (mut timeouts, mut failed, mut last_rcode) = (0u32, 0u32, None);
        let mut buf = [0u8; 4096];
        // Ids differ per run, so a late answer from an earlier run is never taken for ours.
        let base = (std::process::id() as u16).wrapping_mul(7919);
        for i in 0..count {
            let id = base.wrapping_add(i as u16);
            let query = dns_query(id, name);
            let start = Instant::now();
            sock.send(&query)?;
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => match dns_answer(&buf[..n], id) {
                        None => continue,
                        Some(Ok(_)) => latencies.push(start.elapsed()),
                        Some(Err(rcode)) => {
                            failed += 1;
                            last_rcode = Some(rcode);
                        }
                    },
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => timeouts += 1,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                break;
            }
        }
        let total: Duration = latencies.iter().sum();
        latencies.sort();
        let answered = latencies.len();
        Ok(json!({
            "ok": timeouts == 0 && failed == 0 && answered > 0,
            "server": server,
            "name": name,
            "sent": count,
            "count": answered,
            "timeouts": timeouts,
            "failed": failed,
            "last_rcode": last_rcode,
            "median_us": quantile_us(&latencies, 0.5),
            "p95_us": quantile_us(&latencies, 0.95),
            "mean_us": if answered > 0 { micros(total / answered as u32) } else { 0.0 },
            "min_us": quantile_us(&latencies, 0.0),
            "max_us": quantile_us(&latencies, 1.0),
        }))
    };
    match run() {
        Ok(json) => Outcome { ok: json["ok"] == true, json },
        Err(e) => Outcome::failed(&e),
    }
}

/// Sends `megabytes` MiB over one TCP connection to a `tcp-sink`, half-closes it and waits
/// for the sink's count of what it received (so the time covers delivery, not just
/// buffering): `{"ok":true,"bytes":N,"seconds":S,"mbytes_per_s":R}` (MiB/s, from the
/// connection's start to the count).
pub fn tcp_send(target: &str, megabytes: u64) -> Outcome {
    let run = || -> io::Result<(u64, Duration)> {
        let mut stream = TcpStream::connect_timeout(&first_addr(target)?, CONNECT_TIMEOUT)?;
        let block = vec![0x5a_u8; MIB];
        let total = megabytes * MIB as u64;
        let start = Instant::now();
        for _ in 0..megabytes {
            stream.write_all(&block)?;
        }
        stream.shutdown(Shutdown::Write)?;
        stream.set_read_timeout(Some(SINK_COUNT_TIMEOUT))?;
        let mut count = [0u8; 8];
        stream.read_exact(&mut count)?;
        let elapsed = start.elapsed();
        let received = u64::from_be_bytes(count);
        if received != total {
            return Err(io::Error::other(format!("the sink received {received} of {total} bytes")));
        }
        Ok((total, elapsed))
    };
    match run() {
        Ok((bytes, elapsed)) => {
            let secs = elapsed.as_secs_f64().max(1e-9);
            let rate = bytes as f64 / MIB as f64 / secs;
            Outcome::ok(
                json!({"ok": true, "bytes": bytes, "seconds": secs, "mbytes_per_s": (rate * 10.0).round() / 10.0}),
            )
        }
        Err(e) => Outcome::failed(&e),
    }
}

/// Binds the sink's listener: `{"ok":true,"addr":"…"}` (printed before it serves, so a
/// caller knows when it is ready).
pub fn tcp_listen(addr: &str) -> (Outcome, Option<TcpListener>) {
    match TcpListener::bind(addr) {
        Ok(l) => {
            let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            (Outcome::ok(json!({"ok": true, "addr": local})), Some(l))
        }
        Err(e) => (Outcome::failed(&e), None),
    }
}

/// Serves `listener` forever: each connection (on a thread of its own) is read to its end,
/// discarding the data, and answered with the number of bytes received (8 bytes, big
/// endian) before it is closed.
pub fn serve_sink(listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = sink_one(stream) {
                        eprintln!("abx-probe tcp-sink: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("abx-probe tcp-sink: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn sink_one(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; MIB];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.write_all(&total.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_query_is_well_formed() {
        let q = dns_query(0x1234, "allowed.test.");
        let mut want = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"\x07allowed\x04test\x00");
        want.extend_from_slice(&[0, 1, 0, 1]);
        assert_eq!(q, want);
    }

    #[test]
    fn dns_answers_are_classified() {
        let mut reply = dns_query(7, "a.test");
        reply[2] |= 0x80; // QR
        reply[7] = 1; // ANCOUNT 1
        assert_eq!(dns_answer(&reply, 7), Some(Ok(1)));
        assert_eq!(dns_answer(&reply, 8), None, "another query's answer");
        assert_eq!(dns_answer(&reply[..11], 7), None, "too short");
        let mut refused = reply.clone();
        refused[3] |= 5;
        assert_eq!(dns_answer(&refused, 7), Some(Err(5)));
        let mut empty = reply.clone();
        empty[7] = 0;
        assert_eq!(dns_answer(&empty, 7), Some(Err(0)));
        assert_eq!(dns_answer(&dns_query(7, "a.test"), 7), None, "a query, not a response");
    }

    #[test]
    fn tcp_send_reaches_the_sink() {
        let (outcome, listener) = tcp_listen("127.0.0.1:0");
        assert!(outcome.ok, "{}", outcome.json);
        let addr = outcome.json["addr"].as_str().unwrap().to_string();
        let listener = listener.unwrap();
        std::thread::spawn(move || serve_sink(listener));
        let sent = tcp_send(&addr, 3);
        assert!(sent.ok, "{}", sent.json);
        assert_eq!(sent.json["bytes"], 3 * MIB as u64);
    }

    #[test]
    fn dns_bench_counts_answers() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80;
                reply[7] = 1;
                let _ = server.send_to(&reply, from);
            }
        });
        let out = dns_bench(&addr, "allowed.test", 20);
        assert!(out.ok, "{}", out.json);
        assert_eq!(out.json["count"], 20);
        assert!(out.json["median_us"].as_f64().unwrap() > 0.0);
    }
}
