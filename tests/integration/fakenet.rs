//! A small internet of the test's own: two named network namespaces, `<p>d` for the
//! daemon (its only way out is the uplink `up0`, 203.0.113.2/24) and `<p>i` for "the
//! internet" (203.0.113.1 on `wan0`, and on its loopback the servers' addresses from the
//! documentation ranges plus one private address). In the internet: HTTP servers that
//! answer with their own name, a UDP echo, and an authoritative DNS server (hickory) for
//! the zone `test.`. Nothing leaves these namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::rdata::{A, SOA};
use hickory_resolver::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::Server;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

/// allowed.test
pub const WEB_A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// other.test
pub const WEB_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// files.pkg.test
pub const WEB_C: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
/// cdnlong.test (TTL 90 s) and cdnshort.test (TTL 1 s): one address for two names, with
/// HTTP on ports 80, 5432 and 9000.
pub const CDN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 40);
/// The TTL of cdnlong.test.
pub const CDN_LONG_TTL: u32 = 90;
/// The authoritative DNS server.
pub const DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// private.test (a private address served by the fake internet).
pub const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);

pub struct FakeNet {
    pub daemon_ns: String,
    pub inet_ns: String,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _dns: Server<Catalog>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Runs `f` on a thread inside the named network namespace (sockets it makes stay there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&fd),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn zone() -> Catalog {
    let name = |s: &str| Name::from_str(s).unwrap();
    let origin = name("test.");
    let mut zone =
        InMemoryZoneHandler::<TokioRuntimeProvider>::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(name("ns.test."), name("admin.test."), 1, 60, 60, 60, 30);
    let a = |n: &str, ip: Ipv4Addr| Record::from_rdata(name(n), 60, RData::A(A(ip)));
    for r in [
        Record::from_rdata(origin.clone(), 300, RData::SOA(soa)),
        a("allowed.test.", WEB_A),
        a("other.test.", WEB_B),
        a("files.pkg.test.", WEB_C),
        a("private.test.", PRIVATE),
        Record::from_rdata(name("cdnlong.test."), CDN_LONG_TTL, RData::A(A(CDN))),
        Record::from_rdata(name("cdnshort.test."), 1, RData::A(A(CDN))),
        // The cloud metadata address: never reachable, whatever the policy.
        a("meta.test.", Ipv4Addr::new(169, 254, 169, 254)),
    ] {
        assert!(zone.upsert_mut(r, 1));
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin), vec![Arc::new(zone)]);
    catalog
}

impl FakeNet {
    pub async fn new(prefix: &str) -> FakeNet {
        let d = format!("{prefix}d");
        let i = format!("{prefix}i");
        ip(&["netns", "add", &d]);
        ip(&["netns", "add", &i]);
        ip(&["-n", &d, "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", &i]);
        ip(&["-n", &d, "addr", "add", "203.0.113.2/24", "dev", "up0"]);
        ip(&["-n", &d, "link", "set", "up0", "up"]);
        ip(&["-n", &d, "link", "set", "lo", "up"]);
        ip(&["-n", &d, "route", "add", "default", "via", "203.0.113.1"]);
        ip(&["-n", &i, "addr", "add", "203.0.113.1/24", "dev", "wan0"]);
        ip(&["-n", &i, "link", "set", "wan0", "up"]);
        ip(&["-n", &i, "link", "set", "lo", "up"]);
        for a in [WEB_A, WEB_B, WEB_C, DNS, PRIVATE, CDN] {
            ip(&["-n", &i, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        // Sockets are made in the internet's namespace, then served from any thread.
        let (webs, echo, echo2, dns_udp, dns_tcp) = in_netns(&i, || {
            let webs: Vec<(TcpListener, &'static str)> =
                [(WEB_A, 80, "web-a"), (WEB_B, 80, "web-b"), (WEB_C, 80, "web-c"), (PRIVATE, 80, "private")]
                    .into_iter()
                    .chain([80, 5432, 9000].map(|p| (CDN, p, "cdn")))
                    .map(|(a, p, n)| (TcpListener::bind((a, p)).unwrap(), n))
                    .collect();
            let echo = UdpSocket::bind((WEB_A, 443)).unwrap();
            let echo2 = UdpSocket::bind((WEB_A, 4443)).unwrap();
            let dns_udp = UdpSocket::bind((DNS, 53)).unwrap();
            let dns_tcp = TcpListener::bind((DNS, 53)).unwrap();
            (webs, echo, echo2, dns_udp, dns_tcp)
        });
        for (l, name) in webs {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || http_server(l, name, &stop)));
        }
        for sock in [echo, echo2] {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || udp_echo(sock, &stop)));
        }
        dns_udp.set_nonblocking(true).unwrap();
        dns_tcp.set_nonblocking(true).unwrap();
        let mut server = Server::new(zone());
        server.register_socket(tokio::net::UdpSocket::from_std(dns_udp).unwrap());
        server.register_listener(tokio::net::TcpListener::from_std(dns_tcp).unwrap(), Duration::from_secs(2), 4);
        FakeNet { daemon_ns: d, inet_ns: i, stop, threads, _dns: server }
    }

    pub fn dns_upstream(&self) -> String {
        format!("{DNS}:53")
    }
}

impl Drop for FakeNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.daemon_ns]).status();
        let _ = Command::new("ip").args(["netns", "delete", &self.inet_ns]).status();
    }
}

/// Answers every request with `name` (HTTP/1.0, one request per connection).
fn http_server(l: TcpListener, name: &str, stop: &AtomicBool) {
    l.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((mut c, _)) => {
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ =
                    write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}", name.len());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn udp_echo(sock: UdpSocket, stop: &AtomicBool) {
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    }
}

/// An HTTP/1.1 GET with extra headers from inside namespace `ns`; returns the whole answer.
pub fn http_get(ns: &str, addr: SocketAddr, host: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    in_netns(ns, move || {
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    })
}
