//! NFLOG subscriber: receives the packets that nftables rules `log group N` send to
//! userspace (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_ULOG`), and parses the IPv4 ones
//! into [`LogEntry`] values.
//!
//! Set-up, in order:
//! - `NFULNL_CFG_CMD_BIND` for the group: the kernel sends that group's packets to this
//!   socket. One socket per group and network namespace; a second socket gets `EPERM`
//!   (the group belongs to another port id). Closing the socket releases the group.
//! - copy mode `NFULNL_COPY_PACKET` with a range of [`COPY_RANGE`] bytes (enough for the
//!   IPv4 header, options included, and the ports), and a queue threshold of 1, so each
//!   packet is sent at once instead of being batched for up to a second.
//!
//! `NFULNL_CFG_CMD_PF_UNBIND` / `PF_BIND` are not sent: they only choose the namespace's
//! default logger for a protocol family (what `log` without a group and conntrack's
//! invalid-packet logging use). `log group N` names its logger explicitly, so it does not
//! need them, and changing the default would affect other users of the namespace.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::net::RecvFlags;

use crate::netlink::{Message, NLM_F_ACK, NetlinkSocket, Protocol, attrs, messages, recv_from_kernel};

// linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_log.h
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFNETLINK_V0: u8 = 0;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;

/// Bytes of each packet copied to userspace.
pub const COPY_RANGE: u32 = 128;
/// Requested socket receive buffer (`SO_RCVBUFFORCE`, else `SO_RCVBUF` up to
/// `net.core.rmem_max`): room for thousands of entries while the daemon is busy.
const RCVBUF: usize = 4 << 20;

/// One logged IPv4 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The rule's `prefix` (without the trailing NUL; empty if none).
    pub prefix: String,
    /// Input interface index (none for locally generated packets).
    pub indev: Option<u32>,
    /// Output interface index (none in the input path).
    pub outdev: Option<u32>,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, ...).
    pub protocol: u8,
    /// Source port for TCP, UDP, UDP-Lite, SCTP and DCCP (none for later fragments).
    pub src_port: Option<u16>,
    /// Destination port, as `src_port`.
    pub dst_port: Option<u16>,
}

/// A socket bound to one NFLOG group in the network namespace of the thread that bound it.
/// `Sync`: after binding it only receives, so threads may share it.
#[derive(Debug)]
pub struct Nflog {
    fd: OwnedFd,
}

impl Nflog {
    /// Binds NFLOG group `group` (the `N` of `log group N`) in the calling thread's
    /// network namespace: packet copies of [`COPY_RANGE`] bytes, delivered one by one.
    /// The socket is blocking; see [`Nflog::set_nonblocking`]. `EPERM` if another socket
    /// of this namespace has bound the group.
    pub fn bind(group: u16) -> io::Result<Nflog> {
        let sock = NetlinkSocket::open(Protocol::Netfilter)?;
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&sock, RCVBUF).is_err() {
            rustix::net::sockopt::set_socket_recv_buffer_size(&sock, RCVBUF)?;
        }
        let mut bind = config(group);
        bind.attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        let mut mode = config(group);
        // struct nfulnl_msg_config_mode (packed): copy_range (be32), copy_mode, pad
        let range = COPY_RANGE.to_be_bytes();
        mode.attr(NFULA_CFG_MODE, &[range[0], range[1], range[2], range[3], NFULNL_COPY_PACKET, 0])
            .attr_be32(NFULA_CFG_QTHRESH, 1);
        sock.transact(&mut [bind, mode])?;
        Ok(Nflog { fd: sock.into() })
    }

    /// Sets or clears `O_NONBLOCK` (for use with an event loop such as tokio's `AsyncFd`;
    /// [`Nflog::recv`] then fails with `WouldBlock` when nothing is queued).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        Ok(rustix::io::ioctl_fionbio(&self.fd, nonblocking)?)
    }

    /// Receives one datagram into `buf` and returns the IPv4 packets it reports (other
    /// families and malformed messages are skipped, so the result may be empty). Blocks
    /// unless the socket is nonblocking.
    ///
    /// Lost entries: when the socket's receive queue overflows, the kernel drops entries
    /// and the next receive reports `ENOBUFS` once. That is returned as `Ok` with an empty
    /// `Vec` (the socket stays usable): callers cannot learn which entries were lost.
    /// `buf` should hold a few KiB; messages cut off by a too small buffer are skipped.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Vec<LogEntry>> {
        let n = match recv_from_kernel(self.fd.as_fd(), buf, RecvFlags::empty()) {
            Ok((n, _truncated)) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let packet = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET;
        let entries =
            messages(&buf[..n]).filter(|m| m.msg_type == packet).filter_map(|m| parse_packet(m.payload)).collect();
        Ok(entries)
    }
}

impl AsFd for Nflog {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// For tokio's `AsyncFd`, which takes `AsRawFd` types.
impl AsRawFd for Nflog {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An acknowledged `NFULNL_MSG_CONFIG` message for `group` (the group is the big-endian
/// resource id).
fn config(group: u16) -> Message {
    let mut msg = Message::new((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, NLM_F_ACK);
    let id = group.to_be_bytes();
    msg.put(&[AF_UNSPEC, NFNETLINK_V0, id[0], id[1]]);
    msg
}

/// Parses the payload of an `NFULNL_MSG_PACKET` message (nfgenmsg, then attributes).
fn parse_packet(payload: &[u8]) -> Option<LogEntry> {
    if *payload.first()? != AF_INET {
        return None;
    }
    let (mut prefix, mut indev, mut outdev, mut packet) = (String::new(), None, None, None);
    for attr in attrs(payload.get(4..)?) {
        match attr.attr_type {
            NFULA_PREFIX => prefix = attr.string(),
            NFULA_IFINDEX_INDEV => indev = attr.be32(),
            NFULA_IFINDEX_OUTDEV => outdev = attr.be32(),
            NFULA_PAYLOAD => packet = Some(attr.data),
            _ => {}
        }
    }
    let ip = packet?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
    let protocol = ip[9];
    let ports = match protocol {
        6 | 17 | 33 | 132 | 136 if header_len >= 20 && first_fragment => ip.get(header_len..header_len + 4),
        _ => None,
    };
    Some(LogEntry {
        prefix,
        indev,
        outdev,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        protocol,
        src_port: ports.map(|p| u16::from_be_bytes([p[0], p[1]])),
        dst_port: ports.map(|p| u16::from_be_bytes([p[2], p[3]])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_message(family: u8, ip: &[u8]) -> Vec<u8> {
        let mut msg = Message::new((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET, 0);
        msg.put(&[family, 0, 0, 7])
            .attr(1, &[8, 0, 3, 0])
            .attr_be32(NFULA_IFINDEX_OUTDEV, 1)
            .attr(NFULA_PAYLOAD, ip)
            .attr(NFULA_PREFIX, b"abx \0");
        msg.bytes().unwrap().to_vec()
    }

    fn udp_packet(frag: u16) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 32, 0, 0, 0, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 2];
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[0x30, 0x39, 0x27, 0x0f, 0, 12, 0, 0]);
        ip
    }

    #[test]
    fn parses_an_ipv4_udp_packet() {
        let msg = packet_message(AF_INET, &udp_packet(0x4000)); // DF, offset 0
        let m = messages(&msg).next().unwrap();
        let entry = parse_packet(m.payload).unwrap();
        assert_eq!(
            entry,
            LogEntry {
                prefix: "abx ".into(),
                indev: None,
                outdev: Some(1),
                src: Ipv4Addr::new(127, 0, 0, 1),
                dst: Ipv4Addr::new(127, 0, 0, 2),
                protocol: 17,
                src_port: Some(12345),
                dst_port: Some(9999),
            }
        );
    }

    #[test]
    fn later_fragments_have_no_ports() {
        let msg = packet_message(AF_INET, &udp_packet(0x0010));
        let entry = parse_packet(messages(&msg).next().unwrap().payload).unwrap();
        assert_eq!((entry.src_port, entry.dst_port), (None, None));
    }

    #[test]
    fn skips_other_families_and_short_packets() {
        let msg = packet_message(10, &udp_packet(0));
        assert!(parse_packet(messages(&msg).next().unwrap().payload).is_none());
        let msg = packet_message(AF_INET, &udp_packet(0)[..19]);
        assert!(parse_packet(messages(&msg).next().unwrap().payload).is_none());
        let mut v6 = udp_packet(0);
        v6[0] = 0x60;
        let msg = packet_message(AF_INET, &v6);
        assert!(parse_packet(messages(&msg).next().unwrap().payload).is_none());
        // IHL pointing past the copied bytes: addresses, but no ports.
        let mut long_ihl = udp_packet(0);
        long_ihl[0] = 0x4f;
        let msg = packet_message(AF_INET, &long_ihl);
        let entry = parse_packet(messages(&msg).next().unwrap().payload).unwrap();
        assert_eq!(entry.dst_port, None);
    }

    #[test]
    fn config_header_carries_the_group_big_endian() {
        let mut msg = config(0x0102);
        let bytes = msg.bytes().unwrap().to_vec();
        assert_eq!(u16::from_ne_bytes(bytes[4..6].try_into().unwrap()), 0x0401);
        assert_eq!(&bytes[16..20], &[0, 0, 1, 2]);
    }
}
