//! Egress policies: parsing and checking the rules of a [`NetworkPolicy`], matching names
//! against domain rules, and the address ranges that are never or only explicitly
//! reachable.

use std::net::Ipv4Addr;

use abx_api::{NetMode, NetworkPolicy};

/// Most rules a policy may have (each becomes a firewall rule or a name pattern).
pub const MAX_RULES: usize = 256;

/// Transport protocol of an address rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn new(addr: Ipv4Addr, len: u8) -> Cidr {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
        Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask), len }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        Cidr::new(ip, self.len).addr == self.addr
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// The `n`th address of the network.
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("'{a}' is not an IPv4 address"))?;
        let len: u8 =
            l.parse().ok().filter(|l| *l <= 32).ok_or_else(|| format!("'{l}' is not a prefix length (0-32)"))?;
        let c = Cidr::new(addr, len);
        if c.addr != addr {
            return Err(format!("{s} has host bits set; did you mean {c}?"));
        }
        Ok(c)
    }
}

/// One parsed `allow` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// The addresses a name resolves to: `github.com`, or with `wildcard` the names under
    /// it: `*.pypi.org` (`files.pypi.org`, `a.b.pypi.org`; not `pypi.org` itself);
    /// optionally only some ports and one protocol (`github.com:443/tcp`).
    Domain { name: String, wildcard: bool, ports: Option<(u16, u16)>, proto: Option<Proto> },
    /// Addresses with optional port range and protocol: `10.1.0.0/16:5432`.
    Net { cidr: Cidr, ports: Option<(u16, u16)>, proto: Option<Proto> },
}

impl Rule {
    /// A domain rule for every port.
    pub fn domain(name: &str) -> Rule {
        Rule::Domain { name: name.into(), wildcard: false, ports: None, proto: None }
    }

    /// A wildcard rule for every port.
    pub fn wildcard(name: &str) -> Rule {
        Rule::Domain { name: name.into(), wildcard: true, ports: None, proto: None }
    }

    /// Parses `HOST[:PORT[-PORT]][/tcp|/udp]` where HOST is a domain, `*.domain`, an IPv4
    /// address or a CIDR. Ports without a protocol mean TCP and UDP.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let t = text.trim();
        let bad = |why: String| format!("invalid allow rule '{text}': {why}");
        if t.is_empty() {
            return Err(bad("empty".into()));
        }
        // CIDR or address first: they contain '/' and ':' of their own.
        let (body, proto) = match t.rsplit_once('/') {
            Some((b, p)) if p.eq_ignore_ascii_case("tcp") => (b, Some(Proto::Tcp)),
            Some((b, p)) if p.eq_ignore_ascii_case("udp") => (b, Some(Proto::Udp)),
            _ => (t, None),
        };
        if is_ipv6(body) {
            return Err(bad("IPv6 is not supported: sandboxes have IPv4 only".into()));
        }
        let (host, ports) = match body.split_once(':') {
            Some((h, p)) => (h, Some(parse_ports(p).map_err(bad)?)),
            None => (body, None),
        };
        if proto == Some(Proto::Udp) && ports == Some((443, 443)) {
            return Err(bad(
                "UDP port 443 (QUIC) is always refused, so that clients fall back to TCP; allow TCP 443 instead".into(),
            ));
        }
        if host.chars().next().is_some_and(|c| c.is_ascii_digit())
            && host.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '/')
        {
            let cidr: Cidr = host.parse().map_err(bad)?;
            return Ok(Rule::Net { cidr, ports, proto });
        }
        let lower = host.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        if let Some(rest) = lower.strip_prefix("*.") {
            check_domain(rest).map_err(bad)?;
            if !rest.contains('.') && !PRIVATE_TLDS.contains(&rest) {
                return Err(bad(format!(
                    "'*.{rest}' would allow every name of the top-level domain '{rest}'; allow the domains \
                     themselves (such as '*.example.{rest}'), or use --net public"
                )));
            }
            return Ok(Rule::Domain { name: rest.to_string(), wildcard: true, ports, proto });
        }
        if lower == "*" {
            return Err(bad("'*' alone would allow every name; use --net public".into()));
        }
        check_domain(lower).map_err(bad)?;
        Ok(Rule::Domain { name: lower.to_string(), wildcard: false, ports, proto })
    }

    /// Whether this domain rule covers `name` (lowercase, no trailing dot).
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Rule::Domain { name: d, wildcard: false, .. } => name == d,
            Rule::Domain { name: d, wildcard: true, .. } => {
                name.len() > d.len() + 1
                    && name.ends_with(d.as_str())
                    && name.as_bytes()[name.len() - d.len() - 1] == b'.'
            }
            Rule::Net { .. } => false,
        }
    }
}

/// The canonical text of a rule: what `Rule::parse` reads back to the same rule
/// (lowercase names without a trailing dot, networks at their first address).
impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ports, proto) = match self {
            Rule::Domain { name, wildcard, ports, proto } => {
                write!(f, "{}{name}", if *wildcard { "*." } else { "" })?;
                (ports, proto)
            }
            Rule::Net { cidr, ports, proto } => {
                if cidr.len == 32 {
                    write!(f, "{}", cidr.addr)?;
                } else {
                    write!(f, "{cidr}")?;
                }
                (ports, proto)
            }
        };
        match ports {
            Some((a, b)) if a == b => write!(f, ":{a}")?,
            Some((a, b)) => write!(f, ":{a}-{b}")?,
            None => {}
        }
        match proto {
            Some(p) => write!(f, "/{}", p.as_str()),
            None => Ok(()),
        }
    }
}

/// Whether `body` (a rule without its protocol) is an IPv6 address or network, plain or
/// in brackets with a port (`[2001:db8::1]:443`).
fn is_ipv6(body: &str) -> bool {
    let addr = body.split('/').next().unwrap_or(body);
    let bracketed = addr.strip_prefix('[').and_then(|a| a.split_once(']')).map(|(a, _)| a);
    bracketed.unwrap_or(addr).parse::<std::net::Ipv6Addr>().is_ok()
}

fn parse_ports(p: &str) -> Result<(u16, u16), String> {
    let port =
        |s: &str| s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("'{s}' is not a port (1-65535)"));
    match p.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b {
                return Err(format!("port range {a}-{b} is backwards"));
            }
            Ok((a, b))
        }
        None => {
            let a = port(p)?;
            Ok((a, a))
        }
    }
}

/// Top-level names for private and special use (RFC 2606, RFC 6761, RFC 6762, ICANN's
/// `internal`, and the common LAN ones), under which a wildcard does not open the internet.
const PRIVATE_TLDS: &[&str] =
    &["test", "example", "invalid", "localhost", "local", "internal", "lan", "home", "corp", "intranet", "private"];

fn check_domain(d: &str) -> Result<(), String> {
    if d.len() > 253 || d.is_empty() {
        return Err("a domain name has 1 to 253 characters".into());
    }
    for label in d.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("'{d}' has an empty or too long label"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("'{d}' is not a domain name (letters, digits, '-', '_' and dots)"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label '{label}' of '{d}' starts or ends with '-'"));
        }
    }
    Ok(())
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: NetMode,
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn none() -> Policy {
        Policy { mode: NetMode::None, rules: vec![] }
    }

    /// Checks a policy from the API; the error names the bad rule.
    pub fn parse(p: &NetworkPolicy) -> Result<Policy, String> {
        if p.allow.len() > MAX_RULES {
            return Err(format!("{} allow rules is too many (at most {MAX_RULES})", p.allow.len()));
        }
        if p.mode == NetMode::None && !p.allow.is_empty() {
            return Err("network mode 'none' takes no allow rules; use mode 'allow' (or leave the mode out)".into());
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(p.allow.len());
        for text in &p.allow {
            let rule = Rule::parse(text)?;
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
        let policy = Policy { mode: p.mode, rules };
        policy.ranges()?;
        Ok(policy)
    }

    /// Refuses address rules that could never take effect: wholly inside a range no
    /// sandbox ever reaches (its own loopback, link-local and metadata, multicast,
    /// reserved) or inside `sandboxes`, the daemon's sandbox pool (the host's side of each
    /// sandbox and the other sandboxes). A broader rule is fine; those parts stay blocked.
    pub fn check_reachable(&self, sandboxes: Option<&Cidr>) -> Result<(), String> {
        for rule in &self.rules {
            let Rule::Net { cidr, .. } = rule else { continue };
            let inside = |range: &Cidr| range.len <= cidr.len && range.contains(cidr.addr);
            if let Some(range) = NEVER.iter().filter_map(|r| r.parse::<Cidr>().ok()).find(inside) {
                let what = match range.addr.octets()[0] {
                    127 => "the sandbox's own loopback",
                    169 => "link-local addresses and cloud metadata",
                    0 => "'this network'",
                    _ => "multicast and reserved addresses",
                };
                return Err(format!(
                    "allow rule '{rule}' can never take effect: {range} ({what}) is never reachable through the network"
                ));
            }
            if let Some(range) = sandboxes.filter(|r| inside(r)) {
                return Err(format!(
                    "allow rule '{rule}' can never take effect: {range} is the sandboxes' own address pool (the host and other sandboxes are never reachable)"
                ));
            }
        }
        Ok(())
    }

    /// The policy as the API shows and records it: every rule in its canonical text
    /// (`GitHub.com.` is `github.com`), each once, in the order first given.
    pub fn to_api(&self) -> NetworkPolicy {
        NetworkPolicy { mode: self.mode, allow: self.rules.iter().map(|r| r.to_string()).collect() }
    }

    /// Whether a sandbox with this policy may resolve `name`.
    pub fn allows_name(&self, name: &str) -> bool {
        match self.mode {
            NetMode::None => false,
            NetMode::Public => true,
            NetMode::Allow => self.rules.iter().any(|r| r.matches_name(name)),
        }
    }

    /// The rule allowing `name`, for reports.
    pub fn name_rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches_name(name))
    }

    pub fn net_rules(&self) -> impl Iterator<Item = (&Cidr, Option<(u16, u16)>, Option<Proto>)> {
        self.rules.iter().filter_map(|r| match r {
            Rule::Net { cidr, ports, proto } => Some((cidr, *ports, *proto)),
            _ => None,
        })
    }

    pub fn domain_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| !matches!(r, Rule::Net { .. }))
    }
}

/// An address rule as a box in (address, protocol, port) space, inclusive bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range3 {
    pub addr: (Ipv4Addr, Ipv4Addr),
    pub proto: (u8, u8),
    pub port: (u16, u16),
    /// The rule it comes from (for messages).
    pub rule: String,
}

impl Range3 {
    fn contains(&self, o: &Range3) -> bool {
        self.addr.0 <= o.addr.0
            && o.addr.1 <= self.addr.1
            && self.proto.0 <= o.proto.0
            && o.proto.1 <= self.proto.1
            && self.port.0 <= o.port.0
            && o.port.1 <= self.port.1
    }

    fn overlaps(&self, o: &Range3) -> bool {
        fn meet<T: Ord>(a: &(T, T), b: &(T, T)) -> bool {
            a.0 <= b.1 && b.0 <= a.1
        }
        meet(&self.addr, &o.addr) && meet(&self.proto, &o.proto) && meet(&self.port, &o.port)
    }
}

/// A (protocol range, port range) a DNS answer may be used for.
pub type PortBox = ((u8, u8), (u16, u16));

/// The protocol ranges a rule covers: ports mean TCP and UDP; no ports and no protocol
/// mean everything.
fn proto_ranges(proto: Option<Proto>, ports: Option<(u16, u16)>) -> Vec<(u8, u8)> {
    match (proto, ports) {
        (Some(Proto::Tcp), _) => vec![(6, 6)],
        (Some(Proto::Udp), _) => vec![(17, 17)],
        (None, Some(_)) => vec![(6, 6), (17, 17)],
        (None, None) => vec![(0, 255)],
    }
}

impl Policy {
    /// What the answers for `name` may be used for: None for every port and protocol
    /// (`public`, or a matching rule without ports or protocol), else the (protocol,
    /// port) ranges of the matching rules, without ranges inside others.
    pub fn name_scope(&self, name: &str) -> Option<Vec<PortBox>> {
        if self.mode == NetMode::Public {
            return None;
        }
        let mut boxes: Vec<PortBox> = Vec::new();
        for r in self.rules.iter().filter(|r| r.matches_name(name)) {
            let Rule::Domain { ports, proto, .. } = r else { continue };
            if ports.is_none() && proto.is_none() {
                return None;
            }
            for p in proto_ranges(*proto, *ports) {
                boxes.push((p, ports.unwrap_or((0, 65535))));
            }
        }
        let inside = |a: &PortBox, b: &PortBox| b.0.0 <= a.0.0 && a.0.1 <= b.0.1 && b.1.0 <= a.1.0 && a.1.1 <= b.1.1;
        let mut kept: Vec<PortBox> = Vec::new();
        for (i, a) in boxes.iter().enumerate() {
            if !boxes.iter().enumerate().any(|(j, b)| j != i && inside(a, b) && (!inside(b, a) || j < i)) {
                kept.push(*a);
            }
        }
        Some(kept)
    }

    /// The address rules as non-overlapping boxes (the kernel's range sets refuse
    /// overlaps): a rule inside another is dropped; rules that partly overlap are an error
    /// naming both.
    pub fn ranges(&self) -> Result<Vec<Range3>, String> {
        let mut out: Vec<Range3> = Vec::new();
        for (cidr, ports, proto) in self.net_rules() {
            let first = cidr.addr;
            let last = Ipv4Addr::from(u32::from(first) | (u32::MAX.checked_shr(u32::from(cidr.len)).unwrap_or(0)));
            let port = ports.unwrap_or((0, 65535));
            let protos = proto_ranges(proto, ports);
            let text = format!(
                "{cidr}{}{}",
                ports.map(|(a, b)| if a == b { format!(":{a}") } else { format!(":{a}-{b}") }).unwrap_or_default(),
                proto.map(|p| format!("/{}", p.as_str())).unwrap_or_default()
            );
            for proto in protos {
                out.push(Range3 { addr: (first, last), proto, port, rule: text.clone() });
            }
        }
        // Drop boxes inside others (the first of two equal ones stays).
        let mut kept: Vec<Range3> = Vec::new();
        for (i, r) in out.iter().enumerate() {
            let covered = out.iter().enumerate().any(|(j, o)| j != i && o.contains(r) && (!r.contains(o) || j < i));
            if !covered {
                kept.push(r.clone());
            }
        }
        for (i, a) in kept.iter().enumerate() {
            if let Some(b) = kept[i + 1..].iter().find(|b| a.overlaps(b)) {
                return Err(format!(
                    "allow rules '{}' and '{}' partly overlap; merge them into one rule or split them apart",
                    a.rule, b.rule
                ));
            }
        }
        Ok(kept)
    }
}

/// Never reachable from a sandbox, whatever the policy: "this" network, loopback,
/// link-local (with cloud metadata at 169.254.169.254), multicast, reserved and broadcast.
pub const NEVER: &[&str] = &["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"];

/// Private ranges, reachable only through a rule naming them: RFC 1918, shared address
/// space (carrier-grade NAT), IETF protocol assignments and benchmarking. The
/// documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) count as public.
pub const PRIVATE: &[&str] =
    &["10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15"];

/// Whether `ip` is in one of `ranges`.
pub fn in_ranges(ip: Ipv4Addr, ranges: &[&str]) -> bool {
    ranges.iter().filter_map(|r| r.parse::<Cidr>().ok()).any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        assert_eq!(Rule::parse("GitHub.com").unwrap(), Rule::domain("github.com"));
        assert_eq!(Rule::parse("*.pypi.org").unwrap(), Rule::wildcard("pypi.org"));
        assert_eq!(
            Rule::parse("github.com:443/tcp").unwrap(),
            Rule::Domain {
                name: "github.com".into(),
                wildcard: false,
                ports: Some((443, 443)),
                proto: Some(Proto::Tcp)
            }
        );
        assert_eq!(
            Rule::parse("10.1.0.0/16:5432").unwrap(),
            Rule::Net { cidr: "10.1.0.0/16".parse().unwrap(), ports: Some((5432, 5432)), proto: None }
        );
        assert_eq!(
            Rule::parse("203.0.113.7:8000-8080/udp").unwrap(),
            Rule::Net { cidr: "203.0.113.7/32".parse().unwrap(), ports: Some((8000, 8080)), proto: Some(Proto::Udp) }
        );
        assert_eq!(
            Rule::parse("198.51.100.0/24/tcp").unwrap(),
            Rule::Net { cidr: "198.51.100.0/24".parse().unwrap(), ports: None, proto: Some(Proto::Tcp) }
        );
        for bad in
            ["", "*", "10.1.0.1/16", "10.0.0.0/33", "1.2.3.4:0", "1.2.3.4:9-3", "github.com:0", "a..b", "-a.com", "a b"]
        {
            assert!(Rule::parse(bad).is_err(), "{bad} should be refused");
        }
        assert!(Rule::parse("10.1.0.1/16").unwrap_err().contains("10.1.0.0/16"));
    }

    /// Guards the messages and spellings QA found wrong: IPv6 was "not a port", a protocol
    /// in capitals was refused, and UDP 443 was accepted though it never works.
    #[test]
    fn rule_spellings_and_rules_that_cannot_work() {
        assert_eq!(Rule::parse("a.test:80/TCP").unwrap(), Rule::parse("a.test:80/tcp").unwrap());
        assert_eq!(Rule::parse("10.0.0.0/8/Udp").unwrap(), Rule::parse("10.0.0.0/8/udp").unwrap());
        for v6 in ["2001:db8::1", "2001:db8::/32", "::1", "[2001:db8::1]:443", "2001:db8::1/tcp", "fe80::1"] {
            let err = Rule::parse(v6).unwrap_err();
            assert!(err.contains("IPv6 is not supported"), "{v6}: {err}");
        }
        for quic in ["198.51.100.10:443/udp", "a.test:443/UDP", "10.0.0.0/8:443/udp"] {
            let err = Rule::parse(quic).unwrap_err();
            assert!(err.contains("UDP port 443") && err.contains(quic), "{quic}: {err}");
        }
        // TCP and UDP on 443 still make sense (TCP works), and so does a range past 443.
        assert!(Rule::parse("198.51.100.10:443").is_ok());
        assert!(Rule::parse("198.51.100.10:400-500/udp").is_ok());
    }

    #[test]
    fn rules_print_as_they_parse_and_policies_keep_each_once() {
        for (given, canonical) in [
            ("GitHub.com.", "github.com"),
            ("*.PyPI.org:443/tcp", "*.pypi.org:443/tcp"),
            ("10.1.0.0/16:5432", "10.1.0.0/16:5432"),
            ("203.0.113.7/32:8000-8080/udp", "203.0.113.7:8000-8080/udp"),
            ("198.51.100.0/24/tcp", "198.51.100.0/24/tcp"),
            (" 1.2.3.4 ", "1.2.3.4"),
        ] {
            let rule = Rule::parse(given).unwrap();
            assert_eq!(rule.to_string(), canonical);
            assert_eq!(Rule::parse(canonical).unwrap(), rule, "{canonical} reads back");
        }
        let p = Policy::parse(&NetworkPolicy {
            mode: NetMode::Allow,
            allow: vec!["a.test".into(), "A.test.".into(), "1.2.3.4/32".into(), "1.2.3.4".into()],
        })
        .unwrap();
        assert_eq!(p.to_api().allow, ["a.test", "1.2.3.4"]);
    }

    #[test]
    fn rules_that_can_never_take_effect_are_refused() {
        let pool: Cidr = "10.240.0.0/24".parse().unwrap();
        let check = |rule: &str| {
            Policy::parse(&NetworkPolicy { mode: NetMode::Allow, allow: vec![rule.into()] })
                .unwrap()
                .check_reachable(Some(&pool))
        };
        assert!(check("127.0.0.1:8080").unwrap_err().contains("loopback"));
        assert!(check("169.254.169.254").unwrap_err().contains("metadata"));
        assert!(check("224.0.0.251:5353/udp").unwrap_err().contains("multicast"));
        assert!(check("10.240.0.7:80").unwrap_err().contains("address pool"));
        for fine in ["0.0.0.0/0", "10.0.0.0/8", "10.241.0.1", "198.51.100.0/24", "github.com"] {
            assert!(check(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn matches_names() {
        let w = Rule::wildcard("pypi.org");
        assert!(w.matches_name("files.pypi.org") && w.matches_name("a.b.pypi.org"));
        assert!(!w.matches_name("pypi.org") && !w.matches_name("evilpypi.org"));
        let d = Rule::domain("github.com");
        assert!(d.matches_name("github.com") && !d.matches_name("api.github.com"));
    }

    #[test]
    fn names_get_the_ports_of_their_rules() {
        let p = Policy::parse(&NetworkPolicy {
            mode: NetMode::Allow,
            allow: vec!["api.test:443/tcp".into(), "*.pkg.test:8000-8100".into(), "any.test".into()],
        })
        .unwrap();
        assert_eq!(p.name_scope("api.test"), Some(vec![((6, 6), (443, 443))]));
        assert_eq!(p.name_scope("x.pkg.test"), Some(vec![((6, 6), (8000, 8100)), ((17, 17), (8000, 8100))]));
        assert_eq!(p.name_scope("any.test"), None, "a rule without ports allows every port");
    }

    #[test]
    fn checks_policies() {
        let p = NetworkPolicy { mode: NetMode::None, allow: vec!["github.com".into()] };
        assert!(Policy::parse(&p).unwrap_err().contains("none"));
        let p = NetworkPolicy { mode: NetMode::Allow, allow: vec!["github.com".into(), "x:0".into()] };
        assert!(Policy::parse(&p).unwrap_err().contains("'x:0'"));
        let p = Policy::parse(&NetworkPolicy { mode: NetMode::Allow, allow: vec!["*.test".into()] }).unwrap();
        assert!(p.allows_name("a.test") && !p.allows_name("test"));
        // A wildcard over a public top-level domain is the internet, refused with a reason.
        for tld in ["*.com", "*.IO", "*.org."] {
            let e = Policy::parse(&NetworkPolicy { mode: NetMode::Allow, allow: vec![tld.into()] }).unwrap_err();
            assert!(e.contains("top-level domain"), "{tld}: {e}");
        }
        assert!(Policy::parse(&NetworkPolicy { mode: NetMode::Allow, allow: vec!["*.co.uk".into()] }).is_ok());
        assert!(Policy::parse(&NetworkPolicy { mode: NetMode::Allow, allow: vec!["*.internal".into()] }).is_ok());
        assert!(Policy::parse(&NetworkPolicy { mode: NetMode::Public, allow: vec![] }).unwrap().allows_name("x"));
    }

    #[test]
    fn address_rules_become_disjoint_boxes() {
        let p = |rules: &[&str]| {
            Policy::parse(&NetworkPolicy { mode: NetMode::Allow, allow: rules.iter().map(|s| s.to_string()).collect() })
        };
        let r = p(&["10.0.0.0/8", "10.1.0.0/16:5432", "203.0.113.7:80/tcp"]).unwrap().ranges().unwrap();
        assert_eq!(r.len(), 2, "the /16 rule is inside the /8 one: {r:?}");
        assert_eq!(r[0].addr, ("10.0.0.0".parse().unwrap(), "10.255.255.255".parse().unwrap()));
        assert_eq!((r[0].proto, r[0].port), ((0, 255), (0, 65535)));
        assert_eq!((r[1].proto, r[1].port), ((6, 6), (80, 80)));
        let r = p(&["10.1.0.0/16:5432"]).unwrap().ranges().unwrap();
        assert_eq!(r.iter().map(|x| x.proto).collect::<Vec<_>>(), vec![(6, 6), (17, 17)]);
        assert_eq!(p(&["1.2.3.4", "1.2.3.4"]).unwrap().ranges().unwrap().len(), 1);
        let err = p(&["10.0.0.0/8:80-90", "10.0.0.0/8:85-95"]).unwrap_err();
        assert!(err.contains("partly overlap") && err.contains("80-90"), "{err}");
    }

    #[test]
    fn ranges() {
        assert!(in_ranges("169.254.169.254".parse().unwrap(), NEVER));
        assert!(in_ranges("172.20.1.1".parse().unwrap(), PRIVATE));
        assert!(!in_ranges("203.0.113.5".parse().unwrap(), PRIVATE));
        let c: Cidr = "10.250.3.0/24".parse().unwrap();
        assert_eq!(c.nth(2), "10.250.3.2".parse::<Ipv4Addr>().unwrap());
        assert!(c.overlaps(&"10.0.0.0/8".parse().unwrap()));
    }
}
