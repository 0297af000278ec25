//! Netlink against the real kernel (run as root): rtnetlink veth set-up, nf_tables set
//! elements, NFLOG. Every test works in network namespaces it creates (`ip netns add
//! abxtnl<pid>n<k>`) and deletes them when it ends, also on failure; nothing on the host is
//! read or changed. Work inside a namespace happens on a scoped thread that `setns`es into
//! it; the sockets it opens stay in that namespace whichever thread uses them later.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use abx_sys::nflog::Nflog;
use abx_sys::nft::{Family, Nft};
use abx_sys::rtnl::{RouteV4, Rtnl};

/// A named network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("abxtnl{}n{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let status = Command::new("ip").args(["netns", "add", &name]).status().expect("run ip");
        assert!(status.success(), "ip netns add {name}");
        Netns { name }
    }

    fn file(&self) -> File {
        File::open(format!("/run/netns/{}", self.name)).expect("open netns")
    }

    /// Runs `f` on a thread that has entered this namespace (only that thread moves).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = self.file();
        std::thread::scope(|s| {
            s.spawn(move || {
                rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                    .expect("setns into the test namespace");
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// Runs `nft` in this namespace with `script` on stdin (`-f -`) or the given arguments.
    fn nft(&self, args: &[&str], script: Option<&str>) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "/usr/sbin/nft"]).args(args);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run nft");
        if let Some(script) = script {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// The `elem` entries of `nft -j list set`: (address, expires in seconds if it has a timeout).
fn set_elements(json: &str) -> Vec<(String, Option<u64>)> {
    let Some(start) = json.find("\"elem\": [") else { return Vec::new() };
    let list = &json[start + 9..];
    let mut out = Vec::new();
    let mut rest = list;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.starts_with(']') || rest.is_empty() {
            break;
        }
        if let Some(s) = rest.strip_prefix('"') {
            // A plain element: "10.0.0.2"
            let end = s.find('"').unwrap();
            out.push((s[..end].to_string(), None));
            rest = &s[end + 1..];
        } else {
            // {"elem": {"val": "10.0.0.1", "timeout": 100, "expires": 99}}
            let end = rest.find("}}").unwrap();
            let obj = &rest[..end];
            let val = field(obj, "\"val\": \"").map(|v| v.trim_end_matches('"').to_string()).unwrap();
            let expires = field(obj, "\"expires\": ").map(|v| v.parse().unwrap());
            out.push((val, expires));
            rest = &rest[end + 2..];
        }
    }
    out
}

fn field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let at = obj.find(key)? + key.len();
    let end = obj[at..].find([',', '}']).map_or(obj.len(), |e| at + e);
    Some(&obj[at..end])
}

#[test]
fn veth_pair_across_namespaces() {
    let (a, b) = (Netns::new(), Netns::new());
    let addr_a = Ipv4Addr::new(10, 231, 0, 1);
    let addr_b = Ipv4Addr::new(10, 231, 0, 2);
    let b_file = b.file();

    let sock_a = a.run(|| {
        let rtnl = Rtnl::open().unwrap();
        rtnl.create_veth("abxva", "abxvb", b_file.as_fd()).unwrap();
        let err = rtnl.create_veth("abxva", "abxvc", b_file.as_fd()).unwrap_err();
        assert_eq!(errno(&err), Some(libc::EEXIST));
        // The peer went straight to the other namespace.
        assert_eq!(errno(&rtnl.link_index("abxvb").unwrap_err()), Some(libc::ENODEV));
        configure(&rtnl, "abxva", addr_a, addr_b);
        UdpSocket::bind(SocketAddrV4::new(addr_a, 0)).unwrap()
    });
    let sock_b = b.run(|| {
        let rtnl = Rtnl::open().unwrap();
        configure(&rtnl, "abxvb", addr_b, addr_a);
        UdpSocket::bind(SocketAddrV4::new(addr_b, 7777)).unwrap()
    });

    // Both sockets stay in their namespaces: exchange datagrams from this thread.
    for s in [&sock_a, &sock_b] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    sock_a.send_to(b"ping", SocketAddrV4::new(addr_b, 7777)).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = sock_b.recv_from(&mut buf).expect("datagram over the veth");
    assert_eq!(&buf[..n], b"ping");
    sock_b.send_to(b"pong", from).unwrap();
    let (n, _) = sock_a.recv_from(&mut buf).expect("reply over the veth");
    assert_eq!(&buf[..n], b"pong");

    a.run(|| {
        let rtnl = Rtnl::open().unwrap();
        rtnl.delete_link("abxva").unwrap();
        assert_eq!(errno(&rtnl.link_index("abxva").unwrap_err()), Some(libc::ENODEV));
        assert_eq!(errno(&rtnl.delete_link("abxva").unwrap_err()), Some(libc::ENODEV));
    });
    b.run(|| {
        let rtnl = Rtnl::open().unwrap();
        assert_eq!(errno(&rtnl.link_index("abxvb").unwrap_err()), Some(libc::ENODEV));
    });
}

/// Address /32, link up, and a scope-link route to the peer's address.
fn configure(rtnl: &Rtnl, name: &str, local: Ipv4Addr, peer: Ipv4Addr) {
    let index = rtnl.link_index(name).unwrap();
    rtnl.add_address_v4(index, local, 32).unwrap();
    rtnl.add_address_v4(index, local, 32).unwrap(); // again: replaced, not EEXIST
    rtnl.set_up(index).unwrap();
    let route =
        RouteV4 { dst: peer, prefix_len: 32, gateway: None, oif: index, scope_link: true, prefsrc: Some(local) };
    rtnl.add_route_v4(&route).unwrap();
    rtnl.add_route_v4(&route).unwrap();
}

#[test]
fn rtnl_rejects_bad_input() {
    let ns = Netns::new();
    ns.run(|| {
        let rtnl = Rtnl::open().unwrap();
        let err = rtnl.link_index("abx-sixteen-byte").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let netns = File::open("/proc/thread-self/ns/net").unwrap();
        let err = rtnl.create_veth("abxa", "abx-sixteen-byte", netns.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(errno(&rtnl.link_index("abxnothere").unwrap_err()), Some(libc::ENODEV));
        assert_eq!(rtnl.link_index("lo").unwrap(), 1);
        let err = rtnl.add_address_v4(1, Ipv4Addr::LOCALHOST, 33).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // A kernel error: a route through an interface that does not exist.
        let route = RouteV4 {
            dst: Ipv4Addr::new(10, 9, 0, 0),
            prefix_len: 16,
            gateway: None,
            oif: 9999,
            scope_link: true,
            prefsrc: None,
        };
        assert_eq!(errno(&rtnl.add_route_v4(&route).unwrap_err()), Some(libc::ENODEV));
    });
}

const TABLE: &str = "table ip abxtest {
    set s { type ipv4_addr; flags timeout; }
    set d { type ipv4_addr; timeout 1h; }
    set p { type ipv4_addr; }
}
table inet abxtest {
    set s { type ipv4_addr; flags timeout; }
}
";

fn list(ns: &Netns, family: &str, set: &str) -> Vec<(String, Option<u64>)> {
    set_elements(&ns.nft(&["-j", "list", "set", family, "abxtest", set], None))
}

#[test]
fn nft_set_elements() {
    let ns = Netns::new();
    ns.nft(&["-f", "-"], Some(TABLE));
    let a1 = Ipv4Addr::new(10, 0, 0, 1);
    let a2 = Ipv4Addr::new(10, 0, 0, 2);
    let nft = ns.run(|| Nft::open().unwrap());

    nft.add_ipv4_elements(Family::Ip, "abxtest", "s", &[(a1, Some(Duration::from_secs(100))), (a2, None)]).unwrap();
    let elems = list(&ns, "ip", "s");
    assert_eq!(elems.len(), 2, "{elems:?}");
    let e1 = elems.iter().find(|e| e.0 == "10.0.0.1").unwrap();
    assert!(matches!(e1.1, Some(95..=100)), "{e1:?}");
    assert!(elems.contains(&("10.0.0.2".to_string(), None)), "{elems:?}");

    // Re-adding succeeds and restarts the expiry, also with the same timeout.
    std::thread::sleep(Duration::from_millis(2100));
    nft.add_ipv4_elements(Family::Ip, "abxtest", "s", &[(a1, Some(Duration::from_secs(100)))]).unwrap();
    let e1 = list(&ns, "ip", "s").into_iter().find(|e| e.0 == "10.0.0.1").unwrap();
    assert!(matches!(e1.1, Some(99..=100)), "expiry not refreshed: {e1:?}");
    nft.add_ipv4_elements(Family::Ip, "abxtest", "s", &[(a1, Some(Duration::from_secs(1000)))]).unwrap();
    let e1 = list(&ns, "ip", "s").into_iter().find(|e| e.0 == "10.0.0.1").unwrap();
    assert!(matches!(e1.1, Some(995..=1000)), "{e1:?}");
    // Without a timeout a re-add succeeds and leaves the element alone.
    nft.add_ipv4_elements(Family::Ip, "abxtest", "s", &[(a1, None), (a2, None)]).unwrap();
    assert_eq!(list(&ns, "ip", "s").len(), 2);

    // A set with a default timeout; a set without timeouts refuses one.
    nft.add_ipv4_elements(Family::Ip, "abxtest", "d", &[(a1, None), (a2, Some(Duration::from_secs(30)))]).unwrap();
    let elems = list(&ns, "ip", "d");
    assert!(elems.iter().any(|e| e.0 == "10.0.0.1" && matches!(e.1, Some(3500..=3600))), "{elems:?}");
    assert!(elems.iter().any(|e| e.0 == "10.0.0.2" && matches!(e.1, Some(25..=30))), "{elems:?}");
    nft.add_ipv4_elements(Family::Ip, "abxtest", "p", &[(a1, None)]).unwrap();
    let err = nft.add_ipv4_elements(Family::Ip, "abxtest", "p", &[(a2, Some(Duration::from_secs(5)))]).unwrap_err();
    assert_eq!(errno(&err), Some(libc::EINVAL), "{err}");
    assert_eq!(list(&ns, "ip", "p"), vec![("10.0.0.1".to_string(), None)], "failed batch applied nothing");

    // The inet family.
    nft.add_ipv4_elements(Family::Inet, "abxtest", "s", &[(a2, Some(Duration::from_secs(60)))]).unwrap();
    assert_eq!(list(&ns, "inet", "s").len(), 1);

    // Errors carry the kernel's errno; nothing is sent for an empty list.
    let err = nft.add_ipv4_elements(Family::Ip, "abxtest", "nope", &[(a1, None)]).unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENOENT));
    assert_eq!(errno(&nft.flush_set(Family::Inet, "abxnope", "s").unwrap_err()), Some(libc::ENOENT));
    nft.add_ipv4_elements(Family::Ip, "abxtest", "nope", &[]).unwrap();

    nft.flush_set(Family::Ip, "abxtest", "s").unwrap();
    assert_eq!(list(&ns, "ip", "s"), vec![]);
    nft.flush_set(Family::Ip, "abxtest", "s").unwrap(); // flushing an empty set is fine
    nft.flush_set(Family::Inet, "abxtest", "s").unwrap();
    assert_eq!(list(&ns, "inet", "s"), vec![]);
}

#[test]
fn nft_many_elements_and_speed() {
    let ns = Netns::new();
    ns.nft(&["-f", "-"], Some(TABLE));
    let nft = ns.run(|| Nft::open().unwrap());
    let many: Vec<_> =
        (0..5000u32).map(|i| (Ipv4Addr::from(0x0a01_0000 + i), Some(Duration::from_secs(600)))).collect();
    nft.add_ipv4_elements(Family::Ip, "abxtest", "s", &many).unwrap();
    assert_eq!(list(&ns, "ip", "s").len(), 5000);
    nft.flush_set(Family::Ip, "abxtest", "s").unwrap();

    let rounds = 2000u32;
    let start = Instant::now();
    for i in 0..rounds {
        let addr = Ipv4Addr::from(0x0a02_0000 + (i % 64));
        nft.add_ipv4_elements(Family::Ip, "abxtest", "s", &[(addr, Some(Duration::from_secs(60)))]).unwrap();
    }
    let per_call = start.elapsed() / rounds;
    eprintln!("add_ipv4_elements (1 element): {per_call:?} per call");
    assert!(per_call < Duration::from_millis(2), "{per_call:?} per call");
}

#[test]
fn nflog_receives_logged_packets() {
    let ns = Netns::new();
    ns.nft(
        &["-f", "-"],
        Some(
            "table ip abxtest {
                chain out {
                    type filter hook output priority 0;
                    ip daddr 127.0.0.2 log group 7 prefix \"abxtest \";
                }
            }
            ",
        ),
    );
    ns.run(|| {
        let rtnl = Rtnl::open().unwrap();
        let lo = rtnl.link_index("lo").unwrap();
        rtnl.set_up(lo).unwrap();

        let log = Nflog::bind(7).unwrap();
        // The group belongs to the first socket's port id.
        assert_eq!(errno(&Nflog::bind(7).unwrap_err()), Some(libc::EPERM));
        log.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        assert_eq!(log.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);

        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        sock.send_to(b"hello", "127.0.0.2:9999").unwrap();
        let entry = receive_one(&log, &mut buf);
        assert_eq!(entry.prefix, "abxtest ");
        assert_eq!(entry.src, Ipv4Addr::LOCALHOST);
        assert_eq!(entry.dst, Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(entry.protocol, 17);
        assert_eq!(entry.src_port, Some(port));
        assert_eq!(entry.dst_port, Some(9999));
        assert_eq!(entry.outdev, Some(lo));
        assert_eq!(entry.indev, None);

        // Closing the socket releases the group.
        drop(log);
        let log = Nflog::bind(7).unwrap();
        log.set_nonblocking(true).unwrap();
        sock.send_to(b"again", "127.0.0.2:9999").unwrap();
        assert_eq!(receive_one(&log, &mut buf).dst_port, Some(9999));

        // Overflow a tiny receive buffer: the loss shows up as one empty result, not as
        // an error, and the socket keeps working.
        rustix::net::sockopt::set_socket_recv_buffer_size(&log, 1).unwrap();
        for _ in 0..50 {
            sock.send_to(b"flood", "127.0.0.2:9999").unwrap();
        }
        let (mut empty, mut got) = (0, 0);
        loop {
            match log.recv(&mut buf) {
                Ok(entries) if entries.is_empty() => empty += 1,
                Ok(entries) => got += entries.len(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("nflog recv after overflow: {e}"),
            }
        }
        assert!(empty >= 1 && got < 50, "empty {empty}, entries {got}");
        sock.send_to(b"after", "127.0.0.2:9999").unwrap();
        assert_eq!(receive_one(&log, &mut buf).dst, Ipv4Addr::new(127, 0, 0, 2));
    });
}

fn receive_one(log: &Nflog, buf: &mut [u8]) -> abx_sys::nflog::LogEntry {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match log.recv(buf) {
            Ok(mut entries) if !entries.is_empty() => return entries.remove(0),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no NFLOG entry within 5 s");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("nflog recv: {e}"),
        }
    }
}
