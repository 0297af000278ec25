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
//! - `s<N>` (one per slot, rewritten on each policy change): first what is never allowed
//!   (other sandboxes, loopback, link-local and metadata, multicast, UDP 443), then the
//!   policy's address rules, then private ranges are refused, then the addresses the DNS
//!   proxy answered to this sandbox (set `d<N>`, elements with the answer's TTL), then
//!   for `public` everything else. Anything left is refused.
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
//! Chains and rules change through `nft -f` (a few milliseconds; a policy change is one
//! atomic transaction). The per-answer set elements go over netlink directly
//! (`abx_sys::nft`), in microseconds.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use abx_api::NetMode;

use super::policy::{Cidr, NEVER, PRIVATE, Policy, Proto};

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

/// Adds slot `n` (its interface `iface`) to the table: its chain with the policy, its
/// DNS set, and its entries in `ifaces` and `slots`. Idempotent.
pub fn slot_script(t: &TableSpec, n: u32, iface: &str, policy: &Policy) -> String {
    let name = &t.table;
    let (c, d) = (slot_chain(n), slot_set(n));
    let mut s = String::new();
    let _ = writeln!(s, "add chain ip {name} {c}");
    let _ = writeln!(s, "add set ip {name} {d} {{ type ipv4_addr; flags timeout; }}");
    let _ = writeln!(s, "add element ip {name} ifaces {{ \"{iface}\" }}");
    let _ = writeln!(s, "add element ip {name} slots {{ \"{iface}\" : jump {c} }}");
    s.push_str(&policy_script(t, n, policy, true));
    s
}

/// Rewrites slot `n`'s chain for `policy`; `flush_dns` also forgets the addresses the
/// DNS proxy allowed (on a policy change and when the slot changes hands).
pub fn policy_script(t: &TableSpec, n: u32, policy: &Policy, flush_dns: bool) -> String {
    let name = &t.table;
    let (c, d) = (slot_chain(n), slot_set(n));
    let mut s = String::new();
    let _ = writeln!(s, "flush chain ip {name} {c}");
    if flush_dns {
        let _ = writeln!(s, "flush set ip {name} {d}");
    }
    let rule = |s: &mut String, body: &str| {
        let _ = writeln!(s, "add rule ip {name} {c} {body}");
    };
    rule(&mut s, &format!("ip daddr {} goto deny", t.subnet));
    rule(&mut s, "ip daddr @never goto deny");
    rule(&mut s, "udp dport 443 goto deny");
    if policy.mode != NetMode::None {
        for (cidr, ports, proto) in policy.net_rules() {
            let dst = format!("ip daddr {cidr}");
            let ports = ports.map(|(a, b)| if a == b { format!("{a}") } else { format!("{a}-{b}") });
            match (proto, ports) {
                (None, None) => rule(&mut s, &format!("{dst} goto allow")),
                (Some(p), None) => rule(&mut s, &format!("{dst} meta l4proto {} goto allow", p.as_str())),
                (None, Some(ports)) => {
                    for p in [Proto::Tcp, Proto::Udp] {
                        rule(&mut s, &format!("{dst} {} dport {ports} goto allow", p.as_str()));
                    }
                }
                (Some(p), Some(ports)) => rule(&mut s, &format!("{dst} {} dport {ports} goto allow", p.as_str())),
            }
        }
        // The sandbox's resolver is the DNS proxy; other resolvers only by an address rule.
        rule(&mut s, "meta l4proto { tcp, udp } th dport 53 goto deny");
        rule(&mut s, "ip daddr @private goto deny");
        rule(&mut s, &format!("ip daddr @{d} goto allow"));
        if policy.mode == NetMode::Public {
            rule(&mut s, "goto allow");
        }
    }
    rule(&mut s, "goto deny");
    s
}

/// Removes slot `n` from the table (its sandbox interface is gone).
pub fn remove_slot_script(t: &TableSpec, n: u32, iface: &str) -> String {
    let name = &t.table;
    format!(
        "delete element ip {name} slots {{ \"{iface}\" }}\ndelete element ip {name} ifaces {{ \"{iface}\" }}\n\
         delete chain ip {name} {c}\ndelete set ip {name} {d}\n",
        c = slot_chain(n),
        d = slot_set(n)
    )
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
    fn policy_rules_come_in_order() {
        let p = Policy::parse(&NetworkPolicy {
            mode: NetMode::Allow,
            allow: vec!["10.1.0.0/16:5432".into(), "github.com".into(), "203.0.113.0/24/udp".into()],
        })
        .unwrap();
        let s = policy_script(&spec(), 3, &p, true);
        let lines: Vec<&str> = s.lines().collect();
        let pos =
            |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle} in {s}"));
        assert!(pos("flush set ip abxt d3") < pos("10.250.0.0/24 goto deny"));
        assert!(pos("@never") < pos("10.1.0.0/16 tcp dport 5432"));
        assert!(pos("10.1.0.0/16 udp dport 5432") < pos("@private"));
        assert!(pos("203.0.113.0/24 meta l4proto udp") < pos("@private"));
        assert!(pos("@private") < pos("@d3 goto allow"));
        assert!(!s.contains("s3 goto allow"), "allow mode has no catch-all accept: {s}");
        let public = policy_script(&spec(), 3, &Policy { mode: NetMode::Public, rules: vec![] }, false);
        assert!(public.contains("s3 goto allow") && !public.contains("flush set"));
        let none = policy_script(&spec(), 3, &Policy::none(), true);
        assert!(!none.contains("goto allow"));
    }

    #[test]
    fn table_has_nat_only_with_an_uplink() {
        assert!(table_script(&spec()).contains("oifname \"eth0\" masquerade"));
        let mut t = spec();
        t.uplink = None;
        assert!(!table_script(&t).contains("masquerade"));
    }
}
