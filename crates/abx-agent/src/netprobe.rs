//! Network probes run from inside the sandbox for `agentbox net test`: what the sandbox
//! can actually reach, classified from the errors the kernel reports (the host's
//! firewall refuses with ICMP "administratively prohibited", which connect and recv
//! report as EHOSTUNREACH).

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use abx_proto::{Probe, ProbeResult};

/// Runs every probe at once (one thread each) and returns the results in order.
pub fn run(probes: &[Probe]) -> Vec<ProbeResult> {
    std::thread::scope(|s| {
        let handles: Vec<_> = probes.iter().map(|p| s.spawn(move || probe(p))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| result("unknown", "probe failed".into()))).collect()
    })
}

fn result(outcome: &str, detail: String) -> ProbeResult {
    ProbeResult { outcome: outcome.into(), detail, addresses: vec![] }
}

fn probe(p: &Probe) -> ProbeResult {
    match p {
        Probe::Tcp { addr, timeout_ms } => tcp(*addr, Duration::from_millis(*timeout_ms)),
        Probe::Udp { addr, payload, timeout_ms } => udp(*addr, payload, Duration::from_millis(*timeout_ms)),
        Probe::Dns { name } => dns(name),
    }
}

/// Whether an error means the network refused the path (as opposed to the peer).
fn blocked_errno(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EHOSTUNREACH | libc_errno::ENETUNREACH | libc_errno::EACCES | libc_errno::EPERM)
    )
}

mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const EACCES: i32 = 13;
    pub const ENETUNREACH: i32 = 101;
    pub const EHOSTUNREACH: i32 = 113;
}

fn tcp(addr: SocketAddr, timeout: Duration) -> ProbeResult {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => result("reachable", "connected".into()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            result("reachable", "the peer refused the connection (nothing listens there)".into())
        }
        Err(e) if blocked_errno(&e) => result("blocked", e.to_string()),
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            result("silent", format!("no answer within {} ms", timeout.as_millis()))
        }
        Err(e) => result("unknown", e.to_string()),
    }
}

fn udp(addr: SocketAddr, payload: &[u8], timeout: Duration) -> ProbeResult {
    let run = || -> io::Result<usize> {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.connect(addr)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send(payload)?;
        let mut buf = [0u8; 2048];
        sock.recv(&mut buf)
    };
    match run() {
        Ok(n) => result("reachable", format!("answered with {n} bytes")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            result("reachable", "the peer answered port unreachable".into())
        }
        Err(e) if blocked_errno(&e) => result("blocked", e.to_string()),
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            result("silent", format!("no answer within {} ms", timeout.as_millis()))
        }
        Err(e) => result("unknown", e.to_string()),
    }
}

fn dns(name: &str) -> ProbeResult {
    match (name, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let addresses: Vec<_> = addrs
                .filter_map(|a| match a {
                    SocketAddr::V4(v4) => Some(*v4.ip()),
                    SocketAddr::V6(_) => None,
                })
                .collect();
            if addresses.is_empty() {
                result("blocked", "no IPv4 address".into())
            } else {
                let detail = addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
                ProbeResult { outcome: "reachable".into(), detail, addresses }
            }
        }
        Err(e) => result("blocked", format!("not resolved: {e}")),
    }
}
