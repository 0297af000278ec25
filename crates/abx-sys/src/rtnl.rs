//! rtnetlink (`NETLINK_ROUTE`): veth pairs, link state, IPv4 addresses and routes.
//!
//! A netlink socket stays bound to the network namespace it was created in, so an
//! [`Rtnl`] keeps configuring that namespace even if the thread later moves elsewhere.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::netlink::{Message, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NetlinkSocket, Protocol};

// linux/rtnetlink.h
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

// linux/if_link.h, linux/veth.h
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;

// linux/if_addr.h
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 1;
/// `IFNAMSIZ - 1`: the longest interface name.
const IFNAME_MAX: usize = 15;

/// An IPv4 route for [`Rtnl::add_route_v4`] (main table, protocol `static`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteV4 {
    /// Destination network (`0.0.0.0` with `prefix_len` 0 for the default route).
    pub dst: Ipv4Addr,
    /// Destination prefix length, 0..=32.
    pub prefix_len: u8,
    /// Next hop, or `None` for a directly reachable destination.
    pub gateway: Option<Ipv4Addr>,
    /// Output interface index (0: let the kernel choose from the gateway).
    pub oif: u32,
    /// Scope `link` (destination on the link) instead of `universe`.
    pub scope_link: bool,
    /// Preferred source address for locally generated packets.
    pub prefsrc: Option<Ipv4Addr>,
}

/// An rtnetlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Rtnl {
    sock: NetlinkSocket,
}

impl Rtnl {
    /// Opens a `NETLINK_ROUTE` socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Rtnl> {
        Ok(Rtnl { sock: NetlinkSocket::open(Protocol::Route)? })
    }

    /// Creates a veth pair: `name` in this socket's namespace and `peer_name` directly in
    /// the namespace `peer_netns` (an open `/proc/<pid>/ns/net` or `/run/netns/<name>`).
    /// Both ends start down. `EEXIST` if `name` exists here or `peer_name` exists there.
    pub fn create_veth(&self, name: &str, peer_name: &str, peer_netns: BorrowedFd<'_>) -> io::Result<()> {
        check_ifname(name)?;
        check_ifname(peer_name)?;
        let netns_fd = u32::try_from(peer_netns.as_raw_fd()).map_err(|_| invalid("bad namespace fd"))?;
        let mut msg = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        msg.put(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        let linkinfo = msg.begin_nested(IFLA_LINKINFO);
        msg.attr_str(IFLA_INFO_KIND, "veth");
        let data = msg.begin_nested(IFLA_INFO_DATA);
        // The peer's payload is a whole ifinfomsg followed by its attributes.
        let peer = msg.begin_attr(VETH_INFO_PEER);
        msg.put(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, peer_name).attr_u32(IFLA_NET_NS_FD, netns_fd);
        msg.end_nested(peer).end_nested(data).end_nested(linkinfo);
        self.sock.request(msg).map(drop)
    }

    /// The index of interface `name`; `ENODEV` if there is none.
    pub fn link_index(&self, name: &str) -> io::Result<u32> {
        check_ifname(name)?;
        let mut msg = Message::new(RTM_GETLINK, 0);
        msg.put(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name).attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
        let replies = self.sock.request(msg)?;
        replies
            .iter()
            .flat_map(|raw| crate::netlink::messages(raw))
            .filter(|m| m.msg_type == RTM_NEWLINK)
            .find_map(|m| m.payload.get(4..8).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "RTM_GETLINK: no link in the reply"))
    }

    /// Sets the interface up (`IFF_UP`).
    pub fn set_up(&self, index: u32) -> io::Result<()> {
        let mut msg = Message::new(RTM_NEWLINK, 0);
        msg.put(&ifinfomsg(index, IFF_UP, IFF_UP));
        self.sock.request(msg).map(drop)
    }

    /// Adds `addr/prefix_len` to the interface (`IFA_LOCAL` and `IFA_ADDRESS`, scope
    /// universe). Adding an address that is already there succeeds (`NLM_F_REPLACE`).
    pub fn add_address_v4(&self, index: u32, addr: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
        check_prefix(prefix_len)?;
        let mut ifa = [AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE, 0, 0, 0, 0];
        ifa[4..8].copy_from_slice(&index.to_ne_bytes());
        let mut msg = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
        msg.put(&ifa).attr(IFA_LOCAL, &addr.octets()).attr(IFA_ADDRESS, &addr.octets());
        self.sock.request(msg).map(drop)
    }

    /// Adds (or replaces) a unicast route in the main table with protocol `static`.
    pub fn add_route_v4(&self, route: &RouteV4) -> io::Result<()> {
        check_prefix(route.prefix_len)?;
        let scope = if route.scope_link { RT_SCOPE_LINK } else { RT_SCOPE_UNIVERSE };
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
        let rtm = [AF_INET, route.prefix_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope, RTN_UNICAST, 0, 0, 0, 0];
        let mut msg = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE);
        msg.put(&rtm).attr_u32(RTA_TABLE, u32::from(RT_TABLE_MAIN));
        if route.prefix_len > 0 {
            msg.attr(RTA_DST, &route.dst.octets());
        }
        if let Some(gw) = route.gateway {
            msg.attr(RTA_GATEWAY, &gw.octets());
        }
        if route.oif != 0 {
            msg.attr_u32(RTA_OIF, route.oif);
        }
        if let Some(src) = route.prefsrc {
            msg.attr(RTA_PREFSRC, &src.octets());
        }
        self.sock.request(msg).map(drop)
    }

    /// Deletes interface `name` (for a veth, both ends go); `ENODEV` if there is none.
    pub fn delete_link(&self, name: &str) -> io::Result<()> {
        check_ifname(name)?;
        let mut msg = Message::new(RTM_DELLINK, 0);
        msg.put(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        self.sock.request(msg).map(drop)
    }
}

/// `struct ifinfomsg`: family, pad, type, index, flags, change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = AF_UNSPEC;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

fn check_ifname(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > IFNAME_MAX || name.contains('\0') {
        return Err(invalid("interface name must be 1 to 15 bytes without NUL"));
    }
    Ok(())
}

fn check_prefix(prefix_len: u8) -> io::Result<()> {
    if prefix_len > 32 {
        return Err(invalid("IPv4 prefix length over 32"));
    }
    Ok(())
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("abxveth0123456").is_ok());
        assert!(check_ifname("abxveth01234567").is_ok()); // 15 bytes
        assert_eq!(check_ifname("abxveth012345678").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a\0b").is_err());
        assert!(check_prefix(33).is_err());
    }

    #[test]
    fn ifinfomsg_layout() {
        let b = ifinfomsg(7, IFF_UP, IFF_UP);
        assert_eq!(u32::from_ne_bytes(b[4..8].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(b[12..16].try_into().unwrap()), 1);
    }
}
