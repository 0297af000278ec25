//! Synchronous netlink: a message builder, a socket that sends requests (or nfnetlink
//! batches) and collects their acknowledgements, and a parser for replies.
//!
//! Wire format (`linux/netlink.h`): every message is a 16-byte `nlmsghdr` (length, type,
//! flags, sequence number, port id, all in host byte order), a family header
//! (`ifinfomsg`, `nfgenmsg`, ...) and then attributes: a 4-byte `nlattr` (length, type)
//! followed by the payload, each padded to a multiple of 4 bytes. A nested attribute's
//! payload is itself a list of attributes.
//!
//! The kernel handles a request inside `sendmsg` (rtnetlink and nfnetlink both process
//! non-dump requests synchronously), so when `send` returns every reply and
//! acknowledgement is already queued on the socket. [`NetlinkSocket::transact`] therefore
//! reads them without blocking and reports a missing acknowledgement as an error instead
//! of waiting forever for a reply that cannot come.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Size of `struct nlattr`.
pub const NLA_HDRLEN: usize = 4;

/// `NLMSG_NOOP`: nothing, skip.
pub const NLMSG_NOOP: u16 = 1;
/// `NLMSG_ERROR`: an error or (error 0) an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a multipart message.
pub const NLMSG_DONE: u16 = 3;

/// `NLM_F_REQUEST`: the message is a request (set on every message sent).
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`: reply with an acknowledgement (set on every request that is waited for).
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_REPLACE`: replace an existing object (for NEW requests).
pub const NLM_F_REPLACE: u16 = 0x100;
/// `NLM_F_EXCL`: fail if the object exists (for NEW requests).
pub const NLM_F_EXCL: u16 = 0x200;
/// `NLM_F_CREATE`: create the object if it does not exist (for NEW requests).
pub const NLM_F_CREATE: u16 = 0x400;

/// `NLA_F_NESTED`: the attribute's payload is a list of attributes.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// `NLA_F_NET_BYTEORDER`: the payload is in network byte order.
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// Mask of the attribute type bits (without the two flags above).
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// `SOL_NETLINK` and `NETLINK_CAP_ACK` (`linux/netlink.h`): error replies carry only the
/// header of the failed request instead of a copy of all of it.
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;

/// Receive buffer for replies: an `RTM_NEWLINK` reply for one interface is a few KiB.
const REPLY_BUF: usize = 32 * 1024;

/// Rounds `len` up to the netlink alignment (4 bytes).
pub const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Which netlink family a socket talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `NETLINK_ROUTE`: links, addresses, routes.
    Route,
    /// `NETLINK_NETFILTER`: nf_tables, NFLOG, conntrack.
    Netfilter,
}

/// One netlink message under construction: header, family header, attributes.
///
/// The builder never fails while appending; a length that does not fit the wire format
/// (an attribute over 64 KiB) is remembered and reported by [`Message::bytes`].
#[derive(Debug, Clone)]
pub struct Message {
    buf: Vec<u8>,
    too_long: bool,
}

/// A nested attribute opened by [`Message::begin_nested`]; close it with
/// [`Message::end_nested`].
#[derive(Debug)]
#[must_use = "a nested attribute must be closed with end_nested"]
pub struct Nest(usize);

impl Message {
    /// Starts a message of type `msg_type`; `NLM_F_REQUEST` is always added to `flags`.
    pub fn new(msg_type: u16, flags: u16) -> Message {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by bytes()
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq, set by the socket
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0, the kernel fills it in
        Message { buf, too_long: false }
    }

    /// The message type.
    pub fn msg_type(&self) -> u16 {
        u16::from_ne_bytes([self.buf[4], self.buf[5]])
    }

    /// The message flags.
    pub fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.buf[6], self.buf[7]])
    }

    /// Appends raw bytes (a family header such as `ifinfomsg`), padded to 4 bytes.
    pub fn put(&mut self, bytes: &[u8]) -> &mut Message {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    /// Appends an attribute with payload `data`.
    pub fn attr(&mut self, attr_type: u16, data: &[u8]) -> &mut Message {
        let len = NLA_HDRLEN + data.len();
        let Ok(len16) = u16::try_from(len) else {
            self.too_long = true;
            return self;
        };
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    /// Appends a `u8` attribute.
    pub fn attr_u8(&mut self, attr_type: u16, value: u8) -> &mut Message {
        self.attr(attr_type, &[value])
    }

    /// Appends a `u16` attribute in host byte order.
    pub fn attr_u16(&mut self, attr_type: u16, value: u16) -> &mut Message {
        self.attr(attr_type, &value.to_ne_bytes())
    }

    /// Appends a `u32` attribute in host byte order.
    pub fn attr_u32(&mut self, attr_type: u16, value: u32) -> &mut Message {
        self.attr(attr_type, &value.to_ne_bytes())
    }

    /// Appends a `u16` attribute in network byte order.
    pub fn attr_be16(&mut self, attr_type: u16, value: u16) -> &mut Message {
        self.attr(attr_type, &value.to_be_bytes())
    }

    /// Appends a `u32` attribute in network byte order.
    pub fn attr_be32(&mut self, attr_type: u16, value: u32) -> &mut Message {
        self.attr(attr_type, &value.to_be_bytes())
    }

    /// Appends a `u64` attribute in network byte order.
    pub fn attr_be64(&mut self, attr_type: u16, value: u64) -> &mut Message {
        self.attr(attr_type, &value.to_be_bytes())
    }

    /// Appends a NUL-terminated string attribute.
    pub fn attr_str(&mut self, attr_type: u16, value: &str) -> &mut Message {
        let len = NLA_HDRLEN + value.len() + 1;
        let Ok(len16) = u16::try_from(len) else {
            self.too_long = true;
            return self;
        };
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.pad();
        self
    }

    /// Opens a nested attribute (`NLA_F_NESTED` is set): everything appended until the
    /// matching [`Message::end_nested`] becomes its payload.
    pub fn begin_nested(&mut self, attr_type: u16) -> Nest {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(attr_type | NLA_F_NESTED).to_ne_bytes());
        Nest(start)
    }

    /// Opens an attribute whose payload is built by the following calls but is not a
    /// plain attribute list (so `NLA_F_NESTED` is not set), such as `VETH_INFO_PEER`,
    /// which starts with an `ifinfomsg`. Close it with [`Message::end_nested`].
    pub fn begin_attr(&mut self, attr_type: u16) -> Nest {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        Nest(start)
    }

    /// Closes a nested attribute: writes its final length.
    pub fn end_nested(&mut self, nest: Nest) -> &mut Message {
        let len = self.buf.len().saturating_sub(nest.0);
        match (u16::try_from(len), self.buf.get_mut(nest.0..nest.0 + 2)) {
            (Ok(len), Some(slot)) => slot.copy_from_slice(&len.to_ne_bytes()),
            _ => self.too_long = true,
        }
        self
    }

    /// The finished message (with `nlmsg_len` set), or `InvalidInput` when an attribute
    /// or the message does not fit the netlink length fields.
    pub fn bytes(&mut self) -> io::Result<&[u8]> {
        let len = u32::try_from(self.buf.len()).ok().filter(|_| !self.too_long);
        let Some(len) = len else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "netlink message too long"));
        };
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        Ok(&self.buf)
    }

    fn set_seq(&mut self, seq: u32) {
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    }

    fn pad(&mut self) {
        self.buf.resize(align(self.buf.len()), 0);
    }
}

/// A received netlink message (a view into the receive buffer).
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// `nlmsg_type`.
    pub msg_type: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`.
    pub port: u32,
    /// Everything after the 16-byte header (family header and attributes).
    pub payload: &'a [u8],
    /// The whole message, header included.
    pub raw: &'a [u8],
}

impl Received<'_> {
    /// For an `NLMSG_ERROR` message: `Some(0)` for an acknowledgement, `Some(errno)` for
    /// an error. `None` for other messages or a truncated error message.
    pub fn error_code(&self) -> Option<i32> {
        if self.msg_type != NLMSG_ERROR {
            return None;
        }
        let err = i32::from_ne_bytes(self.payload.get(0..4)?.try_into().ok()?);
        Some(err.saturating_neg())
    }
}

/// Iterates over the messages in one datagram. Stops at the first malformed header.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

/// Iterator returned by [`messages`].
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Received<'a>;

    fn next(&mut self) -> Option<Received<'a>> {
        let rest = self.rest;
        let len = u32::from_ne_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            self.rest = &[];
            return None;
        }
        let msg = Received {
            msg_type: u16::from_ne_bytes(rest[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(rest[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(rest[8..12].try_into().ok()?),
            port: u32::from_ne_bytes(rest[12..16].try_into().ok()?),
            payload: &rest[NLMSG_HDRLEN..len],
            raw: &rest[..len],
        };
        self.rest = rest.get(align(len)..).unwrap_or(&[]);
        Some(msg)
    }
}

/// One attribute: its type (flags masked off), whether it is nested, and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// `nla_type` without `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER`.
    pub attr_type: u16,
    /// Whether `NLA_F_NESTED` was set.
    pub nested: bool,
    /// The payload (without padding).
    pub data: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The payload as a host-order `u32`, if it is exactly 4 bytes.
    pub fn u32(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.data.try_into().ok()?))
    }

    /// The payload as a network-order `u32`, if it is exactly 4 bytes.
    pub fn be32(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.data.try_into().ok()?))
    }

    /// The payload as a string, up to the first NUL (invalid UTF-8 is replaced).
    pub fn string(&self) -> String {
        let end = self.data.iter().position(|&b| b == 0).unwrap_or(self.data.len());
        String::from_utf8_lossy(&self.data[..end]).into_owned()
    }

    /// The attributes nested in this one's payload.
    pub fn nested_attrs(&self) -> Attrs<'a> {
        attrs(self.data)
    }
}

/// Iterates over the attributes in `buf`. Stops at the first malformed attribute.
pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

/// Iterator returned by [`attrs`].
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    /// The first attribute of type `attr_type`.
    pub fn get(mut self, attr_type: u16) -> Option<Attr<'a>> {
        self.find(|a| a.attr_type == attr_type)
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;

    fn next(&mut self) -> Option<Attr<'a>> {
        let rest = self.rest;
        let len = u16::from_ne_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
        let raw_type = u16::from_ne_bytes(rest.get(2..4)?.try_into().ok()?);
        if len < NLA_HDRLEN || len > rest.len() {
            self.rest = &[];
            return None;
        }
        self.rest = rest.get(align(len)..).unwrap_or(&[]);
        Some(Attr {
            attr_type: raw_type & NLA_TYPE_MASK,
            nested: raw_type & NLA_F_NESTED != 0,
            data: &rest[NLA_HDRLEN..len],
        })
    }
}

/// A netlink socket bound to the network namespace of the thread that opened it.
///
/// Not `Sync`: replies are matched to requests by sequence number on one socket, so
/// concurrent requests from several threads would read each other's replies. Wrap it in a
/// `Mutex` to share it.
#[derive(Debug)]
pub struct NetlinkSocket {
    fd: OwnedFd,
    seq: Cell<u32>,
}

impl NetlinkSocket {
    /// Opens a `SOCK_RAW | SOCK_CLOEXEC` netlink socket in the calling thread's network
    /// namespace and binds it to a kernel-chosen port id.
    pub fn open(protocol: Protocol) -> io::Result<NetlinkSocket> {
        let proto = match protocol {
            Protocol::Route => None, // NETLINK_ROUTE is protocol 0
            Protocol::Netfilter => Some(rustix::net::netlink::NETFILTER),
        };
        let fd = rustix::net::socket_with(AddressFamily::NETLINK, SocketType::RAW, SocketFlags::CLOEXEC, proto)?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
        set_cap_ack(fd.as_fd());
        Ok(NetlinkSocket { fd, seq: Cell::new(1) })
    }

    /// Sends one request with `NLM_F_ACK` and waits for its acknowledgement. Returns the
    /// reply messages that came before it (for `GET` requests), each a whole message
    /// (header included).
    pub fn request(&self, mut msg: Message) -> io::Result<Vec<Vec<u8>>> {
        let flags = msg.flags() | NLM_F_ACK;
        msg.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.transact(&mut [msg])
    }

    /// Sends `msgs` in one datagram (an nfnetlink batch is `BATCH_BEGIN`, the requests,
    /// `BATCH_END`). Assigns consecutive sequence numbers, waits for an acknowledgement
    /// of every message that has `NLM_F_ACK`, and returns the other replies carrying one
    /// of those sequence numbers. An `NLMSG_ERROR` with a non-zero code for any of them
    /// (including one addressed to a message without `NLM_F_ACK`, such as the batch
    /// header when a commit fails) makes the call fail with that errno, after all the
    /// acknowledgements have been read.
    ///
    /// Messages without `NLM_F_ACK` are not waited for: with none, the call returns once
    /// the datagram is sent.
    pub fn transact(&self, msgs: &mut [Message]) -> io::Result<Vec<Vec<u8>>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let first = self.seq.get();
        let count = u32::try_from(msgs.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.seq.set(first.wrapping_add(count));
        let mut wire = Vec::new();
        let mut pending = Vec::with_capacity(msgs.len());
        for (i, msg) in (0u32..).zip(msgs.iter_mut()) {
            msg.set_seq(first.wrapping_add(i));
            pending.push(msg.flags() & NLM_F_ACK != 0);
            wire.extend_from_slice(msg.bytes()?);
        }
        self.send(&wire)?;
        self.collect(first, &mut pending)
    }

    fn send(&self, wire: &[u8]) -> io::Result<()> {
        let kernel = SocketAddrNetlink::new(0, 0);
        loop {
            match rustix::net::sendto(&self.fd, wire, SendFlags::empty(), &kernel) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads the replies to the messages numbered `first..first + pending.len()` until
    /// every one marked in `pending` is acknowledged.
    fn collect(&self, first: u32, pending: &mut [bool]) -> io::Result<Vec<Vec<u8>>> {
        let mut buf = vec![0u8; REPLY_BUF];
        let mut replies = Vec::new();
        let mut failure: Option<io::Error> = None;
        let mut waiting = pending.iter().filter(|p| **p).count();
        while waiting > 0 {
            let n = match recv_from_kernel(self.fd.as_fd(), &mut buf, RecvFlags::DONTWAIT) {
                Ok((_, true)) => return Err(io::Error::from_raw_os_error(libc::EMSGSIZE)),
                Ok((n, false)) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Everything the kernel had to say was queued before send returned.
                    return Err(failure.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "netlink request not acknowledged")
                    }));
                }
                Err(e) => return Err(e),
            };
            for msg in messages(&buf[..n]) {
                let idx = msg.seq.wrapping_sub(first) as usize;
                if idx >= pending.len() {
                    continue; // not ours (a stale reply from an earlier, failed call)
                }
                match msg.error_code() {
                    Some(code) => {
                        if code != 0 && failure.is_none() {
                            failure = Some(io::Error::from_raw_os_error(code));
                        }
                        if pending[idx] {
                            pending[idx] = false;
                            waiting -= 1;
                        }
                    }
                    None if msg.msg_type == NLMSG_DONE || msg.msg_type == NLMSG_NOOP => {}
                    None => replies.push(msg.raw.to_vec()),
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(replies),
        }
    }
}

impl From<NetlinkSocket> for OwnedFd {
    fn from(sock: NetlinkSocket) -> OwnedFd {
        sock.fd
    }
}

impl AsFd for NetlinkSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Receives one datagram from the kernel (port id 0) into `buf`, skipping datagrams from
/// other sockets. Returns the number of bytes stored and whether the datagram was longer
/// than `buf` (its tail is then lost).
pub fn recv_from_kernel(fd: BorrowedFd<'_>, buf: &mut [u8], flags: RecvFlags) -> io::Result<(usize, bool)> {
    loop {
        let (n, full, from) = match rustix::net::recvfrom(fd, &mut *buf, flags | RecvFlags::TRUNC) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let from_kernel = from.and_then(|a| SocketAddrNetlink::try_from(a).ok()).is_some_and(|a| a.pid() == 0);
        if !from_kernel {
            continue;
        }
        return Ok((n, full > n));
    }
}

/// Asks for short error replies (`NETLINK_CAP_ACK`, Linux 4.3+). Best effort: without it
/// an error reply also echoes the failed request, which still fits the reply buffer for
/// the requests this crate builds.
fn set_cap_ack(fd: BorrowedFd<'_>) {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is a valid socket for the call; the option value points to a live
    // c_int and the length passed is its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_NETLINK,
            NETLINK_CAP_ACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_padding() {
        let mut msg = Message::new(16, NLM_F_ACK);
        msg.put(&[1, 2, 3]).attr(3, b"ab").attr_u32(4, 7);
        let bytes = msg.bytes().unwrap().to_vec();
        // 16 header + 4 (3 padded) + 8 (4 + 2 padded) + 8 (4 + 4)
        assert_eq!(bytes.len(), 36);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 36);
        assert_eq!(u16::from_ne_bytes(bytes[4..6].try_into().unwrap()), 16);
        assert_eq!(u16::from_ne_bytes(bytes[6..8].try_into().unwrap()), NLM_F_ACK | NLM_F_REQUEST);
        assert_eq!(&bytes[16..20], &[1, 2, 3, 0]);
        // nla_len counts the payload without padding
        assert_eq!(u16::from_ne_bytes(bytes[20..22].try_into().unwrap()), 6);
        assert_eq!(&bytes[24..28], &[b'a', b'b', 0, 0]);
        let parsed: Vec<_> = attrs(&bytes[20..]).collect();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].data, b"ab");
        assert_eq!(parsed[1].u32(), Some(7));
    }

    #[test]
    fn string_attribute_is_nul_terminated() {
        let mut msg = Message::new(1, 0);
        msg.attr_str(3, "veth0");
        let bytes = msg.bytes().unwrap().to_vec();
        let a = attrs(&bytes[NLMSG_HDRLEN..]).next().unwrap();
        assert_eq!(a.data, b"veth0\0");
        assert_eq!(a.string(), "veth0");
        assert_eq!(bytes.len(), NLMSG_HDRLEN + 12);
    }

    #[test]
    fn nested_attributes() {
        let mut msg = Message::new(1, 0);
        let outer = msg.begin_nested(18);
        msg.attr_str(1, "veth");
        let inner = msg.begin_nested(2);
        msg.attr_be32(5, 0x0a00_0001);
        msg.end_nested(inner);
        msg.end_nested(outer);
        msg.attr_u8(9, 1);
        let bytes = msg.bytes().unwrap().to_vec();
        let top: Vec<_> = attrs(&bytes[NLMSG_HDRLEN..]).collect();
        assert_eq!(top.len(), 2);
        assert!(top[0].nested);
        assert_eq!(top[0].attr_type, 18);
        assert_eq!(top[0].data.len(), 12 + 4 + 8);
        assert_eq!(top[1].data, &[1]);
        let kids: Vec<_> = top[0].nested_attrs().collect();
        assert_eq!(kids[0].string(), "veth");
        assert!(kids[1].nested);
        let leaf = kids[1].nested_attrs().get(5).unwrap();
        assert_eq!(leaf.be32(), Some(0x0a00_0001));
        assert_eq!(leaf.data, &[10, 0, 0, 1]);
    }

    #[test]
    fn oversized_attribute_is_an_error_not_a_panic() {
        let mut msg = Message::new(1, 0);
        msg.attr(1, &vec![0u8; 70_000]);
        assert_eq!(msg.bytes().unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let mut msg = Message::new(1, 0);
        let nest = msg.begin_nested(1);
        for _ in 0..20 {
            msg.attr(2, &[0u8; 4000]);
        }
        msg.end_nested(nest);
        assert!(msg.bytes().is_err());
    }

    #[test]
    fn parsers_stop_at_malformed_input() {
        // An attribute claiming more bytes than are there.
        let buf = [200u8, 0, 1, 0, 1, 2, 3, 4];
        assert_eq!(attrs(&buf).count(), 0);
        // An attribute shorter than its header.
        let buf = [2u8, 0, 1, 0];
        assert_eq!(attrs(&buf).count(), 0);
        assert_eq!(attrs(&[1, 2]).count(), 0);
        // A message shorter than its header, and a truncated one.
        assert_eq!(messages(&[8, 0, 0, 0, 0, 0, 0, 0]).count(), 0);
        let mut msg = Message::new(NLMSG_ERROR, 0);
        msg.put(&(-19i32).to_ne_bytes());
        let bytes = msg.bytes().unwrap().to_vec();
        assert_eq!(messages(&bytes[..bytes.len() - 1]).count(), 0);
        let two = [bytes.clone(), bytes].concat();
        let parsed: Vec<_> = messages(&two).collect();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].error_code(), Some(19));
    }
}
