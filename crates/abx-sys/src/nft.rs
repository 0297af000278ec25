//! nf_tables set elements over `NETLINK_NETFILTER`: add IPv4 addresses (with an optional
//! per-element timeout) to a set and flush a set, fast, without running `nft`.
//!
//! Tables and sets are created elsewhere (by the `nft` command); this module only changes
//! elements. Each call is one nfnetlink batch (`NFNL_MSG_BATCH_BEGIN`, the requests,
//! `NFNL_MSG_BATCH_END`), i.e. one nf_tables transaction: it applies completely or not at
//! all. Every request carries `NLM_F_ACK` so its error is seen.
//!
//! Re-adding an element that exists (the use: a DNS answer arrived again, keep the
//! address allowed for its TTL). `NFT_MSG_NEWSETELEM` is sent without `NLM_F_EXCL`, so the
//! kernel accepts an existing element. What it does to the element's expiry, measured on
//! Linux 6.18 and read from the kernel change that introduced it ("netfilter: nf_tables:
//! set element timeout update support", 4201f3938914, Linux 6.12):
//!
//! - `NFTA_SET_ELEM_TIMEOUT` alone updates an existing element only when the timeout
//!   *differs* from the element's current one (the expiry then restarts from now). The
//!   same timeout again leaves the old expiry running, so a plain re-add does not extend
//!   the life of an address whose TTL did not change.
//! - `NFTA_SET_ELEM_EXPIRATION` restarts the expiry: it becomes now + that value.
//!
//! So every element with a timeout carries both attributes with the same value: a new
//! element gets that timeout, an existing one gets that timeout and a fresh expiry of that
//! length, also when that is shorter than what was left: the kernel has no "extend only".
//! A caller that must never shorten an element's life (agentbox's DNS answers) sends an
//! existing element again only with a later expiry. No delete-then-add is needed (and a
//! delete of an absent element would fail the batch).
//! Kernels before 6.12 accept the re-add but leave the existing expiry unchanged; an
//! element that exists without a timeout stays permanent on all kernels.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use crate::netlink::{Message, NLM_F_ACK, NLM_F_CREATE, NetlinkSocket, Protocol};

// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16; // NLMSG_MIN_TYPE
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNETLINK_V0: u8 = 0;
const AF_UNSPEC: u8 = 0;

// linux/netfilter/nf_tables.h
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;

/// Elements per `NEWSETELEM` message (at most 40 bytes each: well under the 64 KiB limit
/// of the nested element list).
const ELEMS_PER_MSG: usize = 512;
/// Messages per batch: keeps one datagram (at most about 80 KiB) well under the default
/// socket send buffer (`net.core.wmem_default`, 208 KiB), which bounds a netlink datagram.
const MSGS_PER_BATCH: usize = 4;

/// The nf_tables family of the table holding the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `table ip` (`NFPROTO_IPV4`).
    Ip,
    /// `table inet` (`NFPROTO_INET`).
    Inet,
}

impl Family {
    fn nfproto(self) -> u8 {
        match self {
            Family::Ip => 2,
            Family::Inet => 1,
        }
    }
}

/// An nfnetlink socket for nf_tables in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Nft {
    sock: NetlinkSocket,
}

impl Nft {
    /// Opens a `NETLINK_NETFILTER` socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Nft> {
        Ok(Nft { sock: NetlinkSocket::open(Protocol::Netfilter)? })
    }

    /// Adds IPv4 addresses to `set` in `table`, each with an optional timeout (the set
    /// must be declared with `flags timeout` or a default `timeout` to take one, else
    /// `EINVAL`). Adding an existing element succeeds; with `Some(timeout)` it also
    /// restarts the element's expiry at now + `timeout` (Linux 6.12+, see the module
    /// documentation). `None` sends no timeout: a new element gets the set's default
    /// timeout, if any, and an existing element keeps its expiry. A re-add with a shorter
    /// timeout shortens the element's life. A timeout under 1 ms
    /// is sent as 1 ms, since the kernel reads 0 as "never expires". `ENOENT` if the
    /// table or set does not exist.
    ///
    /// Up to 2048 elements are added in one transaction; a longer list is split into
    /// several transactions, and an error leaves the earlier ones applied.
    pub fn add_ipv4_elements(
        &self,
        family: Family,
        table: &str,
        set: &str,
        elems: &[(Ipv4Addr, Option<Duration>)],
    ) -> io::Result<()> {
        check_name(table)?;
        check_name(set)?;
        for batch in elems.chunks(ELEMS_PER_MSG * MSGS_PER_BATCH) {
            let mut msgs = vec![batch_begin()];
            for chunk in batch.chunks(ELEMS_PER_MSG) {
                msgs.push(new_setelem(family, table, set, chunk));
            }
            msgs.push(batch_end());
            self.sock.transact(&mut msgs)?;
        }
        Ok(())
    }

    /// Removes every element of `set` in `table` (a `DELSETELEM` without an element
    /// list). `ENOENT` if the table or set does not exist.
    pub fn flush_set(&self, family: Family, table: &str, set: &str) -> io::Result<()> {
        check_name(table)?;
        check_name(set)?;
        let mut del = Message::new(msg_type(NFT_MSG_DELSETELEM), NLM_F_ACK);
        del.put(&nfgenmsg(family.nfproto(), 0))
            .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
            .attr_str(NFTA_SET_ELEM_LIST_SET, set);
        self.sock.transact(&mut [batch_begin(), del, batch_end()]).map(drop)
    }
}

/// One set element with a raw key: the key's bytes as the kernel stores them (fields of a
/// concatenation each padded to 4 bytes, integers in network order), an optional end of
/// range (`key_end`, for concatenated range sets) and an optional timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawElem {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    pub timeout: Option<Duration>,
}

/// One operation of a [`Nft::apply`] transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOp {
    /// Remove every element of the set.
    Flush { set: String },
    /// Add elements (existing identical ones are kept).
    Add { set: String, elems: Vec<RawElem> },
    /// Remove elements (`ENOENT`, and nothing applied, if one is absent).
    Delete { set: String, elems: Vec<RawElem> },
}

impl Nft {
    /// Applies `ops` to sets of `table` as one transaction: all or nothing. At most 512
    /// elements per operation.
    pub fn apply(&self, family: Family, table: &str, ops: &[SetOp]) -> io::Result<()> {
        check_name(table)?;
        let mut msgs = vec![batch_begin()];
        for op in ops {
            let (kind, set, elems) = match op {
                SetOp::Flush { set } => (NFT_MSG_DELSETELEM, set, None),
                SetOp::Add { set, elems } => (NFT_MSG_NEWSETELEM, set, Some(elems)),
                SetOp::Delete { set, elems } => (NFT_MSG_DELSETELEM, set, Some(elems)),
            };
            check_name(set)?;
            if elems.is_some_and(|e| e.len() > ELEMS_PER_MSG) {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many elements in one operation"));
            }
            if elems.is_some_and(|e| e.is_empty()) {
                continue;
            }
            let flags = if kind == NFT_MSG_NEWSETELEM { NLM_F_CREATE | NLM_F_ACK } else { NLM_F_ACK };
            let mut msg = Message::new(msg_type(kind), flags);
            msg.put(&nfgenmsg(family.nfproto(), 0))
                .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
                .attr_str(NFTA_SET_ELEM_LIST_SET, set);
            if let Some(elems) = elems {
                let list = msg.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
                for e in elems {
                    let elem = msg.begin_nested(NFTA_LIST_ELEM);
                    let key = msg.begin_nested(NFTA_SET_ELEM_KEY);
                    msg.attr(NFTA_DATA_VALUE, &e.key);
                    msg.end_nested(key);
                    if let Some(end) = &e.key_end {
                        let key = msg.begin_nested(NFTA_SET_ELEM_KEY_END);
                        msg.attr(NFTA_DATA_VALUE, end);
                        msg.end_nested(key);
                    }
                    if let Some(timeout) = e.timeout {
                        let ms = timeout_ms(timeout);
                        msg.attr_be64(NFTA_SET_ELEM_TIMEOUT, ms).attr_be64(NFTA_SET_ELEM_EXPIRATION, ms);
                    }
                    msg.end_nested(elem);
                }
                msg.end_nested(list);
            }
            msgs.push(msg);
        }
        msgs.push(batch_end());
        if msgs.len() == 2 {
            return Ok(());
        }
        self.sock.transact(&mut msgs).map(drop)
    }
}

impl AsFd for Nft {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn new_setelem(family: Family, table: &str, set: &str, elems: &[(Ipv4Addr, Option<Duration>)]) -> Message {
    let mut msg = Message::new(msg_type(NFT_MSG_NEWSETELEM), NLM_F_CREATE | NLM_F_ACK);
    msg.put(&nfgenmsg(family.nfproto(), 0))
        .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        .attr_str(NFTA_SET_ELEM_LIST_SET, set);
    let list = msg.begin_nested(NFTA_SET_ELEM_LIST_ELEMENTS);
    for (addr, timeout) in elems {
        let elem = msg.begin_nested(NFTA_LIST_ELEM);
        let key = msg.begin_nested(NFTA_SET_ELEM_KEY);
        msg.attr(NFTA_DATA_VALUE, &addr.octets());
        msg.end_nested(key);
        if let Some(timeout) = timeout {
            let ms = timeout_ms(*timeout);
            msg.attr_be64(NFTA_SET_ELEM_TIMEOUT, ms).attr_be64(NFTA_SET_ELEM_EXPIRATION, ms);
        }
        msg.end_nested(elem);
    }
    msg.end_nested(list);
    msg
}

/// The timeout in milliseconds, at least 1 (0 would mean "no timeout").
fn timeout_ms(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn batch_begin() -> Message {
    let mut msg = Message::new(NFNL_MSG_BATCH_BEGIN, 0);
    msg.put(&nfgenmsg(AF_UNSPEC, NFNL_SUBSYS_NFTABLES));
    msg
}

fn batch_end() -> Message {
    let mut msg = Message::new(NFNL_MSG_BATCH_END, 0);
    msg.put(&nfgenmsg(AF_UNSPEC, NFNL_SUBSYS_NFTABLES));
    msg
}

fn msg_type(nft_msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | nft_msg
}

/// `struct nfgenmsg`: family, version, resource id (big endian).
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let id = res_id.to_be_bytes();
    [family, NFNETLINK_V0, id[0], id[1]]
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "nftables name must be non-empty without NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{NLMSG_HDRLEN, attrs};

    #[test]
    fn element_message_layout() {
        let mut msg = new_setelem(
            Family::Inet,
            "t",
            "s",
            &[(Ipv4Addr::new(10, 1, 2, 3), Some(Duration::from_secs(60))), (Ipv4Addr::new(10, 1, 2, 4), None)],
        );
        let bytes = msg.bytes().unwrap().to_vec();
        assert_eq!(u16::from_ne_bytes(bytes[4..6].try_into().unwrap()), 0x0a0c);
        assert_eq!(&bytes[NLMSG_HDRLEN..NLMSG_HDRLEN + 4], &[1, 0, 0, 0]);
        let top = attrs(&bytes[NLMSG_HDRLEN + 4..]);
        let list = top.clone().get(NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
        assert!(list.nested);
        let elems: Vec<_> = list.nested_attrs().collect();
        assert_eq!(elems.len(), 2);
        let first = elems[0].nested_attrs();
        let key = first.clone().get(NFTA_SET_ELEM_KEY).unwrap();
        assert_eq!(key.nested_attrs().get(NFTA_DATA_VALUE).unwrap().data, &[10, 1, 2, 3]);
        let timeout = first.clone().get(NFTA_SET_ELEM_TIMEOUT).unwrap();
        assert_eq!(timeout.data, &60_000u64.to_be_bytes());
        let expiration = first.clone().get(NFTA_SET_ELEM_EXPIRATION).unwrap();
        assert_eq!(expiration.data, &60_000u64.to_be_bytes());
        assert!(elems[1].nested_attrs().get(NFTA_SET_ELEM_TIMEOUT).is_none());
    }

    #[test]
    fn zero_timeout_is_not_permanent() {
        assert_eq!(timeout_ms(Duration::ZERO), 1);
        assert_eq!(timeout_ms(Duration::from_micros(10)), 1);
        assert_eq!(timeout_ms(Duration::from_secs(3)), 3000);
        assert_eq!(timeout_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn batch_header_names_the_subsystem() {
        assert_eq!(nfgenmsg(AF_UNSPEC, NFNL_SUBSYS_NFTABLES), [0, 0, 0, 10]);
    }
}
