//! Connection tracking over `NETLINK_NETFILTER` (subsystem `NFNL_SUBSYS_CTNETLINK`):
//! removes the conntrack entries that carry one mark, in the network namespace of the
//! thread that opened the socket.
//!
//! The request is `IPCTNL_MSG_CT_DELETE` without a tuple, which the kernel reads as a
//! flush, with `CTA_MARK` and `CTA_MARK_MASK`: only entries whose `mark & mask` equals
//! the mark go (`ctnetlink_flush_conntrack`, Linux 3.11+ with `CONFIG_NF_CONNTRACK_MARK`).
//! The kernel walks its table and removes the entries before it acknowledges, so when
//! [`Conntrack::flush_mark`] returns, a packet of a removed flow is a new flow again (and
//! goes through the firewall's rules for new flows).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::netlink::{Message, NLM_F_ACK, NetlinkSocket, Protocol};

// linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_conntrack.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_MARK_MASK: u16 = 21;
const NFNETLINK_V0: u8 = 0;
const AF_INET: u8 = 2;

/// A ctnetlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Conntrack {
    sock: NetlinkSocket,
}

impl Conntrack {
    /// Opens a `NETLINK_NETFILTER` socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Conntrack> {
        Ok(Conntrack { sock: NetlinkSocket::open(Protocol::Netfilter)? })
    }

    /// Removes every conntrack entry whose mark, masked with `mask`, is `mark`. Entries
    /// of other marks stay. `EOPNOTSUPP` on a kernel without conntrack marks; an error
    /// also when the `nf_conntrack_netlink` module is missing and cannot be loaded.
    pub fn flush_mark(&self, mark: u32, mask: u32) -> io::Result<()> {
        self.sock.transact(&mut [flush_mark_msg(mark, mask)]).map(drop)
    }
}

impl AsFd for Conntrack {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// The filtered flush request: `nfgenmsg` (family AF_INET, version 0: the kernel then
/// matches entries of every family by mark) and the two attributes, big endian.
fn flush_mark_msg(mark: u32, mask: u32) -> Message {
    let mut msg = Message::new((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_ACK);
    msg.put(&[AF_INET, NFNETLINK_V0, 0, 0]).attr_be32(CTA_MARK, mark).attr_be32(CTA_MARK_MASK, mask);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{NLMSG_HDRLEN, attrs};

    #[test]
    fn flush_by_mark_layout() {
        let mut msg = flush_mark_msg(0x0af0_0002, u32::MAX);
        let bytes = msg.bytes().unwrap().to_vec();
        assert_eq!(u16::from_ne_bytes(bytes[4..6].try_into().unwrap()), 0x0102);
        assert_eq!(&bytes[NLMSG_HDRLEN..NLMSG_HDRLEN + 4], &[2, 0, 0, 0]);
        let a: Vec<_> = attrs(&bytes[NLMSG_HDRLEN + 4..]).collect();
        assert_eq!((a[0].attr_type, a[0].be32()), (CTA_MARK, Some(0x0af0_0002)));
        assert_eq!((a[1].attr_type, a[1].be32()), (CTA_MARK_MASK, Some(u32::MAX)));
        assert!(attrs(&bytes[NLMSG_HDRLEN + 4..]).get(1).is_none(), "no tuple: a flush");
    }
}
