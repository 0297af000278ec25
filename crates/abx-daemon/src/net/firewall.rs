//! agentbox's nftables table: enforcement on the host side of each sandbox's veth, where
//! root inside the sandbox cannot reach it.
//!
//! One table, `ip <prefix>`, holds everything:
//!
//! - `forward` (hook forward): established flows pass; a new flow from a sandbox
//!   interface jumps, through the `slots` verdict map keyed by interface name, to that
//!   slot's chain `s<N>`; traffic towards a sandbox interface that is not a reply is
//!   dropped (nothing outside may open connections into a sandbox; the ingress proxy runs
//!   on the host and is not forwarded).
//! - `s<N>` (one per slot, made once): first the flow's conntrack mark is set to the
//!   slot's address ([`slot_mark`]), so that the flows a sandbox opened can be removed
//!   when it leaves the slot (its successor has the same address and interface and would
//!   otherwise continue them past the policy: `ct state established` passes first). Then
//!   what is never allowed (other sandboxes,
//!   loopback, link-local and metadata, multicast, UDP 443), then the policy's address
//!   rules (set `n<N>`: address . protocol . port ranges), then DNS to other resolvers and
//!   private ranges are refused, then the addresses the DNS proxy answered to this sandbox
//!   (set `d<N>`, elements with the answer's TTL), then, if the slot's interface is in the
//!   set `public`, everything else. Anything left is refused.
//! - `input` (hook input): from a sandbox interface only replies and DNS to the proxy
//!   reach the host; the host's other services, the daemon's API included, are refused.
//! - `postrouting` (nat): sandbox addresses are masqueraded towards the uplink.
//! - `allow` and `deny`: log the decision to NFLOG (the audit reads it) and accept, or
//!   refuse at once so clients do not wait for a timeout: TCP with a reset
//!   (ECONNREFUSED), everything else with ICMP "administratively prohibited"
//!   (EHOSTUNREACH). TCP gets resets because the kernel rate-limits ICMP errors per
//!   destination (a burst of 6, then one per second): after a few refusals, ICMP-refused
//!   connections would hang until their timeout.
//!
//! The table and each slot's chain are made with `nft -f` (once per daemon start and per
//! slot, off the create path). A policy is only set contents, so a policy change is one
//! netlink transaction on the daemon's own socket (`abx_sys::nft`): atomic, and about a
//! tenth of a millisecond, where `nft -f` took 4 ms to start and, for a transaction that
//! deletes rules, another ~13 ms waiting for the kernel's RCU grace period when its socket
//! closed. DNS answers are set elements too.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use abx_api::NetMode;

use abx_sys::nft::{RawElem, SetOp};

use super::policy::{Cidr, NEVER, PRIVATE, Policy};

/// What the table is built from.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub table: String,
    pub subnet: Cidr,
    pub gateway: Ipv4Addr,
    pub uplink: Option<String>,
    pub log_group: u16,
    pub dns_port: u16,
}

/// The name of slot `n`'s chain and DNS set.
pub fn slot_chain(n: u32) -> String {
    format!("s{n}")
}

pub fn slot_set(n: u32) -> String {
    format!("d{n}")
}

/// Log prefixes the audit recognises.
pub const LOG_ALLOW: &str = "abx allow ";
pub const LOG_DENY: &str = "abx deny ";

/// The whole table, replacing any previous one atomically.
pub fn table_script(t: &TableSpec) -> String {
    let name = &t.table;
    let mut s = String::new();
    // `add` then `delete` makes the delete valid whether or not the table exists.
    let _ = writeln!(s, "add table ip {name}\ndelete table ip {name}\ntable ip {name} {{");
    let _ = writeln!(s, "  set ifaces {{ type ifname; }}");
    let _ = writeln!(s, "  set {PUBLIC_SET} {{ type ifname; }}");
    let _ = writeln!(s, "  map slots {{ type ifname : verdict; }}");
    let _ = writeln!(s, "  set never {{ type ipv4_addr; flags interval; elements = {{ {} }} }}", NEVER.join(", "));
    let _ = writeln!(s, "  set private {{ type ipv4_addr; flags interval; elements = {{ {} }} }}", PRIVATE.join(", "));
    let g = t.log_group;
    let _ = writeln!(s, "  chain allow {{ log group {g} prefix \"{LOG_ALLOW}\"; accept; }}");
    let _ = writeln!(
        s,
        "  chain deny {{ log group {g} prefix \"{LOG_DENY}\"; meta l4proto tcp reject with tcp reset; reject with icmp type admin-prohibited; }}"
    );
    let _ = writeln!(
        s,
        "  chain forward {{ type filter hook forward priority filter; policy accept;\n    \
         ct state established,related accept\n    \
         iifname vmap @slots\n    \
         iifname @ifaces goto deny\n    \
         oifname @ifaces drop\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain input {{ type filter hook input priority filter; policy accept;\n    \
         iifname != @ifaces accept\n    \
         ct state established,related accept\n    \
         ip daddr {gw} udp dport {p} accept\n    \
         ip daddr {gw} tcp dport {p} accept\n    \
         goto deny\n  }}",
        gw = t.gateway,
        p = t.dns_port,
    );
    if let Some(up) = &t.uplink {
        let _ = writeln!(
            s,
            "  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {sub} oifname \"{up}\" masquerade\n  }}",
            sub = t.subnet
        );
    }
    s.push_str("}\n");
    s
}

/// The name of slot `n`'s set of address rules.
pub fn slot_rules(n: u32) -> String {
    format!("n{n}")
}

/// The name of slot `n`'s set of DNS answers limited to ports (`github.com:443`).
pub fn slot_port_set(n: u32) -> String {
    format!("p{n}")
}

/// The set of interfaces whose sandboxes have `public` egress.
pub const PUBLIC_SET: &str = "public";

/// Adds slot `n` (its interface `iface`) to the table: its chain, its sets (address rules
/// `n<N>` and DNS answers `d<N>`, both empty: no egress), and its entries in `ifaces` and
/// `slots`. Idempotent. The chain never changes afterwards: a policy is the content of the
/// sets (see [`policy_ops`]), changed over netlink in one transaction.
pub fn slot_script(t: &TableSpec, n: u32, iface: &str) -> String {
    let name = &t.table;
    let (c, d, r, pp) = (slot_chain(n), slot_set(n), slot_rules(n), slot_port_set(n));
    let mut s = String::new();
    let _ = writeln!(s, "add chain ip {name} {c}");
    let _ = writeln!(s, "flush chain ip {name} {c}");
    let _ = writeln!(s, "add set ip {name} {d} {{ type ipv4_addr; flags timeout; }}");
    let _ = writeln!(s, "add set ip {name} {r} {{ type ipv4_addr . inet_proto . inet_service; flags interval; }}");
    let _ = writeln!(
        s,
        "add set ip {name} {pp} {{ type ipv4_addr . inet_proto . inet_service; flags interval, timeout; }}"
    );
    let _ = writeln!(s, "add element ip {name} ifaces {{ \"{iface}\" }}");
    let _ = writeln!(s, "add element ip {name} slots {{ \"{iface}\" : jump {c} }}");
    let rule = |s: &mut String, body: &str| {
        let _ = writeln!(s, "add rule ip {name} {c} {body}");
    };
    rule(&mut s, &format!("ct mark set {:#010x}", slot_mark(&t.subnet, n)));
    rule(&mut s, &format!("ip daddr {} goto deny", t.subnet));
    rule(&mut s, "ip daddr @never goto deny");
    rule(&mut s, "udp dport 443 goto deny");
    rule(&mut s, &format!("ip daddr . meta l4proto . th dport @{r} goto allow"));
    // The sandbox's resolver is the DNS proxy; other resolvers only by an address rule.
    rule(&mut s, "meta l4proto { tcp, udp } th dport 53 goto deny");
    rule(&mut s, "ip daddr @private goto deny");
    rule(&mut s, &format!("ip daddr @{d} goto allow"));
    rule(&mut s, &format!("ip daddr . meta l4proto . th dport @{pp} goto allow"));
    rule(&mut s, &format!("iifname @{PUBLIC_SET} goto allow"));
    rule(&mut s, "goto deny");
    s
}

/// The conntrack mark of slot `n`'s flows: its address as a number. Unique among the
/// daemons of one network namespace (their subnets do not overlap) and the same across
/// daemon restarts.
pub fn slot_mark(subnet: &Cidr, n: u32) -> u32 {
    u32::from(subnet.nth(2 + n))
}

/// A key of the `public` set: the interface name, NUL-padded to IFNAMSIZ.
fn ifname_key(iface: &str) -> Vec<u8> {
    let mut k = iface.as_bytes().to_vec();
    k.resize(16, 0);
    k
}

/// A key of an address-rule set: address, protocol and port, each padded to 4 bytes.
pub fn rule_key(addr: Ipv4Addr, proto: u8, port: u16) -> Vec<u8> {
    let mut k = addr.octets().to_vec();
    k.extend_from_slice(&[proto, 0, 0, 0]);
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

/// The set operations that give slot `n` (interface `iface`) `policy`, forgetting
/// addresses learned from DNS when `flush_dns`. `was_public`: the slot's interface is in
/// the `public` set now.
pub fn policy_ops(
    n: u32,
    iface: &str,
    policy: &Policy,
    flush_dns: bool,
    was_public: bool,
) -> Result<Vec<SetOp>, String> {
    let mut ops = vec![SetOp::Flush { set: slot_rules(n) }];
    if flush_dns {
        ops.push(SetOp::Flush { set: slot_set(n) });
        ops.push(SetOp::Flush { set: slot_port_set(n) });
    }
    if policy.mode != NetMode::None {
        let elems = policy
            .ranges()?
            .into_iter()
            .map(|r| RawElem {
                key: rule_key(r.addr.0, r.proto.0, r.port.0),
                key_end: Some(rule_key(r.addr.1, r.proto.1, r.port.1)),
                timeout: None,
            })
            .collect();
        ops.push(SetOp::Add { set: slot_rules(n), elems });
    }
    let public = policy.mode == NetMode::Public;
    let elem = RawElem { key: ifname_key(iface), key_end: None, timeout: None };
    if public && !was_public {
        ops.push(SetOp::Add { set: PUBLIC_SET.into(), elems: vec![elem] });
    } else if !public && was_public {
        ops.push(SetOp::Delete { set: PUBLIC_SET.into(), elems: vec![elem] });
    }
    Ok(ops)
}

pub fn delete_table_script(table: &str) -> String {
    format!("add table ip {table}\ndelete table ip {table}\n")
}

/// Runs `nft -f -` with `script` as one transaction.
pub fn apply(script: &str) -> Result<(), String> {
    let mut child = Command::new(nft_binary())
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run nft (install the nftables package): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| format!("write to nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("wait for nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft failed: {}\nscript:\n{script}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn nft_binary() -> &'static str {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nft")
}

#[cfg(test)]
mod tests {
    use super::*;
    use abx_api::NetworkPolicy;

    fn spec() -> TableSpec {
        TableSpec {
            table: "abxt".into(),
            subnet: "10.250.0.0/24".parse().unwrap(),
            gateway: "10.250.0.1".parse().unwrap(),
            uplink: Some("eth0".into()),
            log_group: 7,
            dns_port: 53,
        }
    }

    #[test]
    fn slot_chain_checks_in_order() {
        let s = slot_script(&spec(), 3, "abxt3");
        let lines: Vec<&str> = s.lines().collect();
        let pos =
            |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle} in {s}"));
        let first = lines.iter().find(|l| l.starts_with("add rule")).unwrap();
        assert_eq!(first.trim_end(), "add rule ip abxt s3 ct mark set 0x0afa0005", "the first rule marks the flow");
        assert!(pos("ct mark set") < pos("10.250.0.0/24 goto deny"));
        assert!(pos("10.250.0.0/24 goto deny") < pos("@never"));
        assert!(pos("udp dport 443") < pos("@n3 goto allow"));
        assert!(pos("@n3 goto allow") < pos("th dport 53 goto deny"));
        assert!(pos("th dport 53 goto deny") < pos("@private goto deny"));
        assert!(pos("@private goto deny") < pos("@d3 goto allow"));
        assert!(pos("@d3 goto allow") < pos("@p3 goto allow"));
        assert!(pos("@p3 goto allow") < pos("iifname @public goto allow"));
        assert_eq!(lines.last().unwrap().trim_end(), "add rule ip abxt s3 goto deny");
    }

    #[test]
    fn policies_are_set_operations() {
        let p = Policy::parse(&NetworkPolicy {
            mode: NetMode::Public,
            allow: vec!["10.1.0.0/16:5432/tcp".into(), "github.com".into()],
        })
        .unwrap();
        let ops = policy_ops(3, "abxt3", &p, true, false).unwrap();
        assert_eq!(ops[0], SetOp::Flush { set: "n3".into() });
        assert_eq!(ops[1], SetOp::Flush { set: "d3".into() });
        assert_eq!(ops[2], SetOp::Flush { set: "p3".into() });
        let SetOp::Add { set, elems } = &ops[3] else { panic!("{ops:?}") };
        assert_eq!(set, "n3");
        assert_eq!(elems[0].key, vec![10, 1, 0, 0, 6, 0, 0, 0, 0x15, 0x38, 0, 0]);
        assert_eq!(elems[0].key_end, Some(vec![10, 1, 255, 255, 6, 0, 0, 0, 0x15, 0x38, 0, 0]));
        let SetOp::Add { set, elems } = &ops[4] else { panic!("{ops:?}") };
        assert_eq!((set.as_str(), elems[0].key.len()), ("public", 16));
        // Back to none: rules flushed, out of the public set, DNS answers kept if asked.
        let ops = policy_ops(3, "abxt3", &Policy::none(), false, true).unwrap();
        assert_eq!(ops.len(), 2);
        assert!(matches!(&ops[1], SetOp::Delete { set, .. } if set == "public"));
    }

    #[test]
    fn table_has_nat_only_with_an_uplink() {
        assert!(table_script(&spec()).contains("oifname \"eth0\" masquerade"));
        let mut t = spec();
        t.uplink = None;
        assert!(!table_script(&t).contains("masquerade"));
    }
}
