//! `agentbox net test`: proves from inside a sandbox that its policy holds. The daemon
//! derives the checks from the policy (what must be reachable, what must not), the guest
//! agent runs them in the sandbox's own network namespace, and the report compares.
//!
//! Reachable means the network let the packets through: a connection, or a refusal by the
//! peer itself (nothing listens on that port). Blocked means the host's firewall refused
//! (a TCP reset with a deny in the sandbox's audit, or EHOSTUNREACH from ICMP
//! "administratively prohibited"). Silent means no answer came: it passes where blocked is
//! expected and fails where reachable is.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use abx_api::{NetCheck, NetMode, NetTestReport};
use abx_proto::{Probe, ProbeResult, Request};

use super::policy::{self, Policy, Rule};
use crate::error::{CoreError, CoreResult};
use crate::manager::Manager;
use crate::sandbox::Sandbox;

const TIMEOUT_MS: u64 = 1500;

/// A check before it runs.
struct Plan {
    target: String,
    reason: String,
    reachable: bool,
    probe: Probe,
}

fn tcp(addr: Ipv4Addr, port: u16) -> Probe {
    Probe::Tcp { addr: SocketAddr::from((addr, port)), timeout_ms: TIMEOUT_MS }
}

/// A minimal DNS query for the root's NS records: what a resolver would answer.
fn dns_query() -> Vec<u8> {
    vec![0xab, 0x78, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1]
}

pub async fn run(m: &Arc<Manager>, sb: &Arc<Sandbox>) -> CoreResult<NetTestReport> {
    let net = m.net.as_ref().ok_or_else(|| CoreError::Invalid("this daemon runs without networking".into()))?;
    let rec = sb.record();
    let policy = Policy::parse(&rec.network).map_err(CoreError::Invalid)?;
    let slot = rec.uid_slot;
    // First the names the policy allows, resolved from inside (their answers are the
    // addresses the other checks use).
    // Each name with the TCP port its connection check uses (None: the rule is UDP only).
    let targets: Vec<(String, Option<u16>)> = policy
        .domain_rules()
        .filter_map(|r| match r {
            Rule::Domain { name, wildcard: false, ports, proto } => {
                Some((name.clone(), (*proto != Some(policy::Proto::Udp)).then(|| ports.map_or(443, |p| p.0))))
            }
            _ => None,
        })
        .collect();
    let names: Vec<String> = targets.iter().map(|(n, _)| n.clone()).collect();
    let mut plans: Vec<Plan> = names
        .iter()
        .map(|n| Plan {
            target: format!("dns {n}"),
            reason: format!("allowed by rule {n}"),
            reachable: true,
            probe: Probe::Dns { name: n.clone() },
        })
        .collect();
    if policy.mode != NetMode::Public {
        let name = format!("not-allowed-{}.example.com", rec.id);
        plans.push(Plan {
            target: format!("dns {name}"),
            reason: "no rule allows this name: the resolver must refuse it without asking upstream".into(),
            reachable: false,
            probe: Probe::Dns { name },
        });
    }
    let first = agent_probes(sb, &plans).await?;
    let mut resolved: Vec<(String, Ipv4Addr, Option<u16>)> = Vec::new();
    for ((n, port), r) in targets.iter().zip(&first) {
        if let Some(a) = r.addresses.first() {
            resolved.push((n.clone(), *a, *port));
        }
    }
    // Then connections.
    let mut second: Vec<Plan> = Vec::new();
    for (name, addr, port) in &resolved {
        if let Some(port) = *port {
            let (reason, reachable) = name_expectation(&policy, &net.cfg.subnet, name, *addr, port);
            second.push(Plan {
                target: format!("tcp {name}:{port} ({addr})"),
                reason,
                reachable,
                probe: tcp(*addr, port),
            });
        }
        second.push(Plan {
            target: format!("udp {name}:443 ({addr})"),
            reason: "UDP 443 (QUIC) is always refused so clients fall back to TCP".into(),
            reachable: false,
            probe: Probe::Udp {
                addr: SocketAddr::from((*addr, 443)),
                payload: b"quic?".to_vec(),
                timeout_ms: TIMEOUT_MS,
            },
        });
    }
    for (cidr, ports, proto) in policy.net_rules() {
        if proto == Some(policy::Proto::Udp) {
            continue;
        }
        let addr = if cidr.len >= 31 { cidr.addr } else { cidr.nth(1) };
        let port = ports.map(|p| p.0).unwrap_or(443);
        let forbidden = policy::in_ranges(addr, policy::NEVER) || net.cfg.subnet.contains(addr);
        second.push(Plan {
            target: format!("tcp {addr}:{port}"),
            reason: if forbidden {
                format!("rule {cidr} names an address that is never reachable")
            } else {
                format!("allowed by rule {cidr}")
            },
            reachable: !forbidden,
            probe: tcp(addr, port),
        });
    }
    let gateway = net.cfg.gateway();
    second.push(Plan {
        target: format!("tcp {gateway}:22"),
        reason: "the host itself".into(),
        reachable: false,
        probe: tcp(gateway, 22),
    });
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    second.push(Plan {
        target: format!("tcp {metadata}:80"),
        reason: "cloud metadata".into(),
        reachable: false,
        probe: tcp(metadata, 80),
    });
    let neighbour = net.slot_addr(if slot == 0 { 1 } else { slot - 1 });
    second.push(Plan {
        target: format!("tcp {neighbour}:80"),
        reason: "another sandbox".into(),
        reachable: false,
        probe: tcp(neighbour, 80),
    });
    let private = Ipv4Addr::new(10, 0, 0, 1);
    if !covered(&policy, private, 80) && !net.cfg.subnet.contains(private) {
        second.push(Plan {
            target: format!("tcp {private}:80"),
            reason: "private range, no rule names it".into(),
            reachable: false,
            probe: tcp(private, 80),
        });
    }
    if let Some(up) = net.cfg.dns_upstream
        && let SocketAddr::V4(v4) = up
        && !covered(&policy, *v4.ip(), 53)
    {
        second.push(Plan {
            target: format!("udp {}:53", v4.ip()),
            reason: "a resolver other than the sandbox's own".into(),
            reachable: false,
            probe: Probe::Udp { addr: up, payload: dns_query(), timeout_ms: TIMEOUT_MS },
        });
    }
    if policy.mode == NetMode::None {
        let public = Ipv4Addr::new(203, 0, 113, 1);
        second.push(Plan {
            target: format!("tcp {public}:443"),
            reason: "mode none: no egress at all".into(),
            reachable: false,
            probe: tcp(public, 443),
        });
    }
    let since = super::now_ms();
    let mut results = agent_probes(sb, &second).await?;
    // The firewall refuses TCP with a reset, which looks like a closed port from inside:
    // the audit tells the two apart (the deny is logged before the reset is sent).
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let (events, _) = net.log(&rec.id);
    for (plan, r) in second.iter().zip(results.iter_mut()) {
        if let Probe::Tcp { addr, .. } = &plan.probe
            && r.outcome == "reachable"
            && !r.detail.starts_with("connected")
            && events.iter().any(|e| {
                e.time_ms >= since
                    && e.kind == "connection"
                    && e.protocol.as_deref() == Some("tcp")
                    && e.verdict == "deny"
                    && e.destination.as_deref() == Some(addr.ip().to_string().as_str())
                    && e.port == Some(addr.port())
            })
        {
            r.outcome = "blocked".into();
            r.detail = "refused by the firewall (a deny in the audit)".into();
        }
    }
    let checks: Vec<NetCheck> = plans
        .iter()
        .zip(first.iter())
        .chain(second.iter().zip(results.iter()))
        .map(|(p, r)| {
            let expected = if p.reachable { "reachable" } else { "blocked" };
            // Silence counts as blocked when blocked is expected (an agent of an older
            // version says `unknown` for a silent UDP probe).
            let silent = r.outcome == "silent" || (r.outcome == "unknown" && p.target.starts_with("udp"));
            let ok = r.outcome == expected || (!p.reachable && silent);
            NetCheck {
                target: p.target.clone(),
                reason: p.reason.clone(),
                expected: expected.into(),
                observed: r.outcome.clone(),
                ok,
                detail: r.detail.clone(),
            }
        })
        .collect();
    Ok(NetTestReport { policy: rec.network.clone(), passed: checks.iter().all(|c| c.ok), checks })
}

/// What a connection to `addr`, the answer for allowed name `name`, on TCP `port` must
/// meet, and why: blocked where no rule can open it (loopback, link-local and metadata,
/// multicast and reserved, the sandboxes' own pool `sandboxes`) and in private ranges no
/// address rule names; reachable otherwise.
fn name_expectation(
    policy: &Policy,
    sandboxes: &policy::Cidr,
    name: &str,
    addr: Ipv4Addr,
    port: u16,
) -> (String, bool) {
    if policy::in_ranges(addr, policy::NEVER) {
        (
            format!(
                "{name} resolves to {addr}: loopback, link-local, metadata, multicast or reserved, never reachable"
            ),
            false,
        )
    } else if sandboxes.contains(addr) {
        (format!("{name} resolves to {addr}, in the sandboxes' own address pool: never reachable"), false)
    } else if policy::in_ranges(addr, policy::PRIVATE) && !covered(policy, addr, port) {
        (format!("{name} resolves to a private address and no rule names it"), false)
    } else {
        (format!("allowed by rule {name}"), true)
    }
}

/// Whether an address rule of the policy covers `addr` on TCP `port`.
fn covered(policy: &Policy, addr: Ipv4Addr, port: u16) -> bool {
    policy.net_rules().any(|(c, ports, proto)| {
        c.contains(addr) && ports.is_none_or(|(a, b)| (a..=b).contains(&port)) && proto != Some(policy::Proto::Udp)
    })
}

async fn agent_probes(sb: &Arc<Sandbox>, plans: &[Plan]) -> CoreResult<Vec<ProbeResult>> {
    if plans.is_empty() {
        return Ok(vec![]);
    }
    let probes = plans.iter().map(|p| p.probe.clone()).collect();
    let results: Vec<ProbeResult> = crate::agent::call(&sb.dirs.agent_socket(), &Request::NetProbe { probes })
        .await
        .map_err(|e| crate::core::interrupted(sb, e.into()))?;
    if results.len() != plans.len() {
        return Err(CoreError::internal("network probes", "the agent answered a different number of probes"));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abx_api::NetworkPolicy;

    /// Guards that `net test` expects names answered with addresses the firewall never
    /// opens (link-local metadata, loopback) to be blocked, not reachable: such a policy
    /// used to fail its own test, and `--net-test` refused the create.
    #[test]
    fn names_resolving_to_never_reachable_addresses_are_expected_blocked() {
        let policy = Policy::parse(&NetworkPolicy {
            mode: NetMode::Allow,
            allow: vec!["meta.test".into(), "db.test".into(), "10.1.0.0/16:5432".into()],
        })
        .unwrap();
        let pool: policy::Cidr = "10.240.0.0/24".parse().unwrap();
        let expect = |addr: &str, port| name_expectation(&policy, &pool, "meta.test", addr.parse().unwrap(), port);
        let (why, reachable) = expect("169.254.169.254", 443);
        assert!(!reachable && why.contains("never reachable"), "{why}");
        assert!(!expect("127.0.0.1", 443).1);
        assert!(!expect("224.0.0.251", 443).1);
        assert!(!expect("10.240.0.5", 443).1, "another sandbox");
        assert!(!expect("10.2.0.1", 443).1, "private, no rule");
        assert!(expect("10.1.0.1", 5432).1, "private, named by a rule");
        assert!(expect("198.51.100.10", 443).1);
    }
}
