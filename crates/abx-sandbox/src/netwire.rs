//! A slot's veth pair, made by the spawner with the slot's network namespace (so it is
//! made once per slot, ahead of demand, not per sandbox). Routed, not bridged: the host
//! side carries the gateway address (the same on every slot's interface, which is also
//! where the DNS proxy listens) and a /32 route to the sandbox; inside, `eth0` has the
//! sandbox's /32 address and a default route through the gateway. All over rtnetlink.

use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;
use std::path::Path;

use abx_sys::rtnl::{RouteV4, Rtnl};

use crate::spec::SlotNetSpec;

/// The name of the interface inside every sandbox.
pub const INSIDE_IF: &str = "eth0";

/// In the host's namespace: creates the pair with its peer in `netns`, then configures
/// the host side.
pub fn host_side(net: &SlotNetSpec, netns: BorrowedFd<'_>) -> Result<(), String> {
    let rtnl = Rtnl::open().map_err(|e| format!("open rtnetlink: {e}"))?;
    let host_if = net.host_if.as_str();
    match rtnl.create_veth(host_if, INSIDE_IF, netns) {
        // Left over from an earlier spawner of this state root: replace it. (Or going by
        // itself: the namespace of its peer, a killed spawner's prepared shell, is being
        // torn down; then it may be gone before the delete, ENODEV.)
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            match rtnl.delete_link(host_if) {
                Err(e) if e.raw_os_error() != Some(libc::ENODEV) => {
                    return Err(format!("remove stale interface {host_if}: {e}"));
                }
                _ => {}
            }
            rtnl.create_veth(host_if, INSIDE_IF, netns)
        }
        r => r,
    }
    .map_err(|e| format!("create veth {host_if}: {e}"))?;
    let index = rtnl.link_index(host_if).map_err(|e| format!("find {host_if}: {e}"))?;
    let conf = Path::new("/proc/sys/net/ipv4/conf").join(host_if);
    // Forward what the sandbox sends; drop what it could not have sent (strict reverse
    // path); no IPv6 on the host side either.
    for (key, value) in [("forwarding", "1"), ("rp_filter", "1"), ("accept_redirects", "0"), ("send_redirects", "0")] {
        std::fs::write(conf.join(key), value).map_err(|e| format!("set {host_if} {key}: {e}"))?;
    }
    let _ = std::fs::write(Path::new("/proc/sys/net/ipv6/conf").join(host_if).join("disable_ipv6"), "1");
    rtnl.add_address_v4(index, net.gateway, 32).map_err(|e| format!("address {} on {host_if}: {e}", net.gateway))?;
    rtnl.set_up(index).map_err(|e| format!("bring up {host_if}: {e}"))?;
    rtnl.add_route_v4(&RouteV4 {
        dst: net.addr,
        prefix_len: 32,
        gateway: None,
        oif: index,
        scope_link: true,
        prefsrc: Some(net.gateway),
    })
    .map_err(|e| format!("route to {} via {host_if}: {e}", net.addr))
}

/// In the slot's namespace: address, link up, routes.
pub fn inside(net: &SlotNetSpec) -> Result<(), String> {
    let rtnl = Rtnl::open().map_err(|e| format!("open rtnetlink in the sandbox: {e}"))?;
    let index = rtnl.link_index(INSIDE_IF).map_err(|e| format!("find {INSIDE_IF}: {e}"))?;
    rtnl.add_address_v4(index, net.addr, 32).map_err(|e| format!("address {} on {INSIDE_IF}: {e}", net.addr))?;
    rtnl.set_up(index).map_err(|e| format!("bring up {INSIDE_IF}: {e}"))?;
    rtnl.add_route_v4(&RouteV4 {
        dst: net.gateway,
        prefix_len: 32,
        gateway: None,
        oif: index,
        scope_link: true,
        prefsrc: Some(net.addr),
    })
    .map_err(|e| format!("route to the gateway: {e}"))?;
    rtnl.add_route_v4(&RouteV4 {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
        gateway: Some(net.gateway),
        oif: index,
        scope_link: false,
        prefsrc: Some(net.addr),
    })
    .map_err(|e| format!("default route: {e}"))
}
