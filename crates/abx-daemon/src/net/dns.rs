//! The sandbox DNS proxy: the only resolver a sandbox can reach.
//!
//! It answers the names the policy allows by asking one upstream server (through a caching
//! hickory resolver), and refuses every other name without asking anyone, so code in a
//! sandbox cannot leak data by encoding it in the names it looks up. Before each answer is
//! sent the policy hears which IPv4 addresses it carries and for how long, so the caller can
//! open the firewall for exactly those addresses in time for the connect that follows.
//!
//! - A: resolved upstream; the reply carries the records (CNAME chain included) with TTLs
//!   that count down while they sit in the cache.
//! - AAAA: an empty NOERROR without asking upstream (sandboxes have IPv4 only).
//! - Other types: resolved upstream and passed on; no addresses are reported.
//! - Upstream NXDOMAIN or NODATA: passed on with the SOA; upstream failure: SERVFAIL (the
//!   policy hears of it too: the query did leave the host).
//! - Denied names, unknown clients, other classes, zone transfers and names with labels
//!   other than letters, digits, `-` and `_`: REFUSED.

use std::future::Future;
use std::io;
use std::iter;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::{Time, TokioRuntimeProvider};
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_resolver::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::debug;

/// How long one upstream query may take before the client gets SERVFAIL (no retries: the
/// client's own resolver retries, and a stalled lookup must not hold it for long).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Responses kept by the resolver's cache (each one query name and type).
const CACHE_SIZE: u64 = 8_192;
/// An idle TCP connection from a sandbox is closed after this long.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses queued per TCP connection.
const TCP_RESPONSE_QUEUE: usize = 16;
const TCP_BACKLOG: i32 = 1024;
/// Tries at finding a port free for both UDP and TCP when the bind port is 0.
const PORT_TRIES: usize = 16;

/// What the policy says about one name asked by one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Resolve it upstream.
    Allow,
    /// Refuse it without asking upstream.
    Deny,
    /// The client is not a known sandbox: refuse.
    NotASandbox,
}

/// The caller's side of the proxy: which names each sandbox may resolve, and what to do with
/// the answers.
pub trait DnsPolicy: Send + Sync + 'static {
    /// Whether `client` (a sandbox's address) may resolve `name` (lowercase, no trailing dot,
    /// labels of letters, digits, `-` and `_` only).
    fn decide(&self, client: IpAddr, name: &str) -> Verdict;
    /// Called with the IPv4 addresses (and TTLs, seconds) of an allowed answer BEFORE the
    /// reply is sent, so firewall elements added synchronously here are in place when the
    /// client connects. Also called, with no addresses, for allowed answers that carry none
    /// (AAAA, other types, NXDOMAIN, NODATA).
    fn answered(&self, client: IpAddr, name: &str, qtype: &str, addrs: &[(Ipv4Addr, u32)]);
    /// Called for queries refused because the policy denied the name.
    fn refused(&self, client: IpAddr, name: &str, qtype: &str);
    /// Called for allowed queries that got no answer from upstream (an error, SERVFAIL,
    /// REFUSED or a timeout; the client gets SERVFAIL): the query left the host all the
    /// same. `error` says what went wrong.
    fn failed(&self, client: IpAddr, name: &str, qtype: &str, error: &str);
}

/// A running proxy, serving UDP and TCP on one address. Dropping it or calling
/// [`DnsProxy::shutdown`] stops it.
pub struct DnsProxy {
    local_addr: SocketAddr,
    server: Server<Handler>,
}

impl std::fmt::Debug for DnsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsProxy").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl DnsProxy {
    /// Serves UDP and TCP on `bind` (bound with `IP_FREEBIND`, so the address need not exist
    /// yet, and `SO_REUSEADDR`), resolving allowed queries through `upstream` (UDP, TCP when
    /// the answer is truncated). With port 0 one free port is picked for both protocols.
    pub async fn start(bind: SocketAddr, upstream: SocketAddr, policy: Arc<dyn DnsPolicy>) -> io::Result<DnsProxy> {
        Self::start_with_timeout(bind, upstream, policy, UPSTREAM_TIMEOUT).await
    }

    async fn start_with_timeout(
        bind: SocketAddr,
        upstream: SocketAddr,
        policy: Arc<dyn DnsPolicy>,
        timeout: Duration,
    ) -> io::Result<DnsProxy> {
        let resolver = upstream_resolver(upstream, timeout)?;
        let (udp, tcp) = bind_pair(bind)?;
        let local_addr = udp.local_addr()?;
        let mut server = Server::new(Handler { policy, resolver });
        server.register_socket(tokio::net::UdpSocket::from_std(udp)?);
        server.register_listener(tokio::net::TcpListener::from_std(tcp)?, TCP_IDLE_TIMEOUT, TCP_RESPONSE_QUEUE);
        debug!(%local_addr, %upstream, "dns proxy started");
        Ok(DnsProxy { local_addr, server })
    }

    /// The address served (UDP and TCP), with the port picked when `bind` had port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops serving and waits for the listeners to close; queries in flight are dropped.
    pub async fn shutdown(mut self) {
        if let Err(error) = self.server.shutdown_gracefully().await {
            debug!(local_addr = %self.local_addr, %error, "dns proxy stopped with an error");
        }
    }
}

/// A resolver that asks `upstream` only: no resolv.conf, no search domains, no hosts file.
fn upstream_resolver(upstream: SocketAddr, timeout: Duration) -> io::Result<TokioResolver> {
    let connection = |mut config: ConnectionConfig| {
        config.port = upstream.port();
        config
    };
    let server = NameServerConfig::new(
        upstream.ip(),
        true,
        vec![connection(ConnectionConfig::udp()), connection(ConnectionConfig::tcp())],
    );
    let mut options = ResolverOpts::default();
    options.timeout = timeout;
    options.attempts = 0; // retries after the first failure
    options.ndots = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.preserve_intermediates = true; // keep CNAME chains in answers
    options.num_concurrent_reqs = 1;
    options.cache_size = CACHE_SIZE;
    let config = ResolverConfig::from_parts(None, Vec::new(), vec![server]);
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(options)
        .build()
        .map_err(|e| io::Error::other(format!("building the dns resolver for {upstream}: {e}")))
}

/// Binds UDP and TCP on the same address; with port 0, on the same free port.
fn bind_pair(bind: SocketAddr) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let mut tries = 0;
    loop {
        let udp = bind_socket(bind, Type::DGRAM, Protocol::UDP)?;
        let addr = udp.local_addr()?.as_socket().unwrap_or(bind);
        match bind_socket(addr, Type::STREAM, Protocol::TCP) {
            Ok(tcp) => {
                tcp.listen(TCP_BACKLOG).map_err(|e| bind_error("listen on", "tcp", addr, e))?;
                return Ok((udp.into(), tcp.into()));
            }
            Err(e) if bind.port() == 0 && tries < PORT_TRIES && e.kind() == io::ErrorKind::AddrInUse => {
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn bind_socket(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let what = if ty == Type::DGRAM { "udp" } else { "tcp" };
    let setup = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
        socket.set_reuse_address(true)?;
        match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
            SocketAddr::V6(_) => {
                socket.set_only_v6(true)?;
                socket.set_freebind_v6(true)?;
            }
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        Ok(socket)
    };
    setup().map_err(|e| bind_error("bind", what, addr, e))
}

fn bind_error(action: &str, what: &str, addr: SocketAddr, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("dns proxy: {action} {what} {addr}: {e}"))
}

/// Answers one request at a time for hickory's server.
struct Handler {
    policy: Arc<dyn DnsPolicy>,
    resolver: TokioResolver,
}

/// What a request gets back, before it is encoded.
enum Reply {
    /// A response code and no records.
    Code(ResponseCode),
    /// NOERROR with the records resolved upstream.
    Answer(Lookup),
    /// NXDOMAIN or NODATA from upstream, with its SOA when there was one.
    Negative(ResponseCode, Option<Record>),
}

impl Reply {
    /// The response code, the answer records and the authority records.
    fn parts(&self) -> (ResponseCode, &[Record], &[Record]) {
        match self {
            Reply::Code(code) => (*code, &[], &[]),
            Reply::Answer(lookup) => (ResponseCode::NoError, lookup.answers(), &[]),
            Reply::Negative(code, soa) => (*code, &[], soa.as_slice()),
        }
    }
}

impl Handler {
    async fn handle<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().max(512));
            edns.set_version(0);
            edns
        });
        let reply = match &request.edns {
            Some(asked) if asked.version() > 0 => Reply::Code(ResponseCode::BADVERS),
            _ => self.reply(request).await,
        };
        let (code, answers, authorities) = reply.parts();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = code;
        metadata.recursion_available = true;
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let message = builder.build(metadata, answers, authorities, iter::empty(), iter::empty());
        match response.send_response(message).await {
            Ok(info) => info,
            Err(error) => {
                debug!(client = %request.src(), %error, "dns: sending the reply failed");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
            }
        }
    }

    async fn reply(&self, request: &Request) -> Reply {
        if request.metadata.op_code != OpCode::Query {
            return Reply::Code(ResponseCode::NotImp);
        }
        let [query] = request.queries.queries() else {
            return Reply::Code(ResponseCode::FormErr);
        };
        let client = request.src().ip();
        let qtype = query.query_type();
        let qtype_name: &'static str = qtype.into();
        if query.query_class() != DNSClass::IN || is_meta(qtype) {
            debug!(%client, name = %query.name(), qtype = qtype_name, "dns: refused unsupported query");
            return Reply::Code(ResponseCode::Refused);
        }
        let Some(name) = policy_name(query.name()) else {
            debug!(%client, name = %query.name(), qtype = qtype_name, "dns: refused odd name");
            return Reply::Code(ResponseCode::Refused);
        };
        match self.policy.decide(client, &name) {
            Verdict::Allow => {}
            Verdict::Deny => {
                debug!(%client, name, qtype = qtype_name, "dns: denied");
                self.policy.refused(client, &name, qtype_name);
                return Reply::Code(ResponseCode::Refused);
            }
            Verdict::NotASandbox => {
                debug!(%client, name, qtype = qtype_name, "dns: not a sandbox");
                return Reply::Code(ResponseCode::Refused);
            }
        }
        if qtype == RecordType::AAAA {
            self.policy.answered(client, &name, qtype_name, &[]);
            return Reply::Code(ResponseCode::NoError);
        }
        let mut fqdn = Name::from(query.name());
        fqdn.set_fqdn(true);
        match self.resolver.lookup(fqdn, qtype).await {
            Ok(lookup) => {
                let addrs: Vec<(Ipv4Addr, u32)> = match qtype {
                    RecordType::A => lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::A(a) => Some((a.0, r.ttl)),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                debug!(%client, name, qtype = qtype_name, ?addrs, "dns: answered");
                self.policy.answered(client, &name, qtype_name, &addrs);
                Reply::Answer(lookup)
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords {
                response_code: code @ (ResponseCode::NXDomain | ResponseCode::NoError),
                soa,
                ..
            }))) => {
                debug!(%client, name, qtype = qtype_name, %code, "dns: no records");
                self.policy.answered(client, &name, qtype_name, &[]);
                Reply::Negative(code, soa.map(|soa| soa.into_record_of_rdata()))
            }
            Err(error) => {
                debug!(%client, name, qtype = qtype_name, %error, "dns: upstream failed");
                self.policy.failed(client, &name, qtype_name, &error.to_string());
                Reply::Code(ResponseCode::ServFail)
            }
        }
    }
}

impl RequestHandler for Handler {
    // What `#[async_trait]` (which declares the trait) expands to; written out so this crate
    // does not need the macro.
    fn handle_request<'s, 'r, 'f, R, T>(
        &'s self,
        request: &'r Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'f>>
    where
        R: 'f + ResponseHandler,
        T: 'f + Time,
        's: 'f,
        'r: 'f,
        Self: 'f,
    {
        Box::pin(self.handle(request, response_handle))
    }
}

/// Types that are not data: zone transfers and pseudo-records.
fn is_meta(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT | RecordType::TSIG)
}

/// The name as the policy sees it: lowercase labels joined by dots, no trailing dot. `None`
/// for the root and for labels with anything but letters, digits, `-` and `_`: such a label
/// could hold a dot (`x\.allowed.test` is a child of `test`, not of `allowed.test`) and make a
/// name look like one the policy allows.
fn policy_name(name: &Name) -> Option<String> {
    let mut text = String::with_capacity(name.len());
    for label in name.iter() {
        let plain = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
        if label.is_empty() || !label.iter().all(plain) {
            return None;
        }
        if !text.is_empty() {
            text.push('.');
        }
        text.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_resolver::net::client::ClientHandle;
    use hickory_resolver::net::tcp::TcpClientStream;
    use hickory_resolver::net::udp::UdpClientStream;
    use hickory_resolver::net::xfer::DnsExchange;
    use hickory_resolver::proto::op::DnsResponse;
    use hickory_resolver::proto::rr::LowerName;
    use hickory_resolver::proto::rr::rdata::{A, CNAME, SOA, TXT};
    use hickory_server::store::in_memory::InMemoryZoneHandler;
    use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

    use super::*;

    const SANDBOX: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    /// Another loopback address: a client the policy does not know.
    const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    /// What [`DnsPolicy::answered`] was told: name, type, addresses.
    type Answer = (String, String, Vec<(Ipv4Addr, u32)>);

    /// Allows `allowed.test`, `*.allowed.test`, `alias.test` and `allowed.example` (a zone
    /// the upstream does not serve) to [`SANDBOX`]; records what it is told.
    #[derive(Default)]
    struct TestPolicy {
        answered: Mutex<Vec<Answer>>,
        refused: Mutex<Vec<(String, String)>>,
        failed: Mutex<Vec<(String, String)>>,
    }

    impl DnsPolicy for TestPolicy {
        fn decide(&self, client: IpAddr, name: &str) -> Verdict {
            if client != SANDBOX {
                return Verdict::NotASandbox;
            }
            let allowed =
                ["allowed.test", "alias.test", "allowed.example"].contains(&name) || name.ends_with(".allowed.test");
            if allowed { Verdict::Allow } else { Verdict::Deny }
        }

        fn answered(&self, _: IpAddr, name: &str, qtype: &str, addrs: &[(Ipv4Addr, u32)]) {
            let entry = (name.to_owned(), qtype.to_owned(), addrs.to_vec());
            self.answered.lock().unwrap().push(entry);
        }

        fn refused(&self, _: IpAddr, name: &str, qtype: &str) {
            self.refused.lock().unwrap().push((name.to_owned(), qtype.to_owned()));
        }

        fn failed(&self, _: IpAddr, name: &str, qtype: &str, _: &str) {
            self.failed.lock().unwrap().push((name.to_owned(), qtype.to_owned()));
        }
    }

    impl TestPolicy {
        fn last_answer(&self) -> Option<Answer> {
            self.answered.lock().unwrap().last().cloned()
        }
    }

    /// The authoritative upstream's catalog, counting the queries it sees.
    struct Counting {
        catalog: Catalog,
        queries: Arc<AtomicUsize>,
    }

    impl RequestHandler for Counting {
        fn handle_request<'s, 'r, 'f, R, T>(
            &'s self,
            request: &'r Request,
            response_handle: R,
        ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'f>>
        where
            R: 'f + ResponseHandler,
            T: 'f + Time,
            's: 'f,
            'r: 'f,
            Self: 'f,
        {
            self.queries.fetch_add(1, Ordering::SeqCst);
            self.catalog.handle_request::<R, T>(request, response_handle)
        }
    }

    fn name(text: &str) -> Name {
        Name::from_str(text).unwrap()
    }

    fn zone() -> Catalog {
        let origin = name("test.");
        let mut zone =
            InMemoryZoneHandler::<TokioRuntimeProvider>::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(name("ns.test."), name("admin.test."), 1, 60, 60, 60, 30);
        let records = [
            Record::from_rdata(origin.clone(), 300, RData::SOA(soa)),
            Record::from_rdata(name("allowed.test."), 60, RData::A(A::new(198, 51, 100, 10))),
            Record::from_rdata(name("other.test."), 60, RData::A(A::new(198, 51, 100, 20))),
            Record::from_rdata(name("alias.test."), 120, RData::CNAME(CNAME(name("allowed.test.")))),
            Record::from_rdata(name("txt.allowed.test."), 60, RData::TXT(TXT::new(vec!["hello".to_owned()]))),
        ];
        for record in records {
            assert!(zone.upsert_mut(record, 1));
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::from(origin), vec![Arc::new(zone)]);
        catalog
    }

    struct Setup {
        proxy: DnsProxy,
        policy: Arc<TestPolicy>,
        upstream_queries: Arc<AtomicUsize>,
        _upstream: Server<Counting>,
    }

    impl Setup {
        async fn new() -> Setup {
            let upstream_queries = Arc::new(AtomicUsize::new(0));
            let (udp, tcp) = bind_pair("127.0.0.1:0".parse().unwrap()).unwrap();
            let upstream_addr = udp.local_addr().unwrap();
            let mut upstream = Server::new(Counting { catalog: zone(), queries: upstream_queries.clone() });
            upstream.register_socket(tokio::net::UdpSocket::from_std(udp).unwrap());
            let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
            upstream.register_listener(tcp, Duration::from_secs(1), 4);
            let policy = Arc::new(TestPolicy::default());
            let bind = "127.0.0.1:0".parse().unwrap();
            let proxy = DnsProxy::start(bind, upstream_addr, policy.clone()).await.unwrap();
            Setup { proxy, policy, upstream_queries, _upstream: upstream }
        }

        fn upstream_queries(&self) -> usize {
            self.upstream_queries.load(Ordering::SeqCst)
        }
    }

    fn udp_client(server: SocketAddr, from: IpAddr) -> DnsExchange<TokioRuntimeProvider> {
        UdpClientStream::builder(server, TokioRuntimeProvider::default())
            .with_bind_addr(Some(SocketAddr::new(from, 0)))
            .with_timeout(Some(Duration::from_secs(1)))
            .exchange()
    }

    /// A TCP client, and the provider whose task set runs its connection (dropping the last
    /// clone of the provider stops the connection).
    async fn tcp_client(server: SocketAddr) -> (DnsExchange<TokioRuntimeProvider>, TokioRuntimeProvider) {
        let provider = TokioRuntimeProvider::default();
        let timeout = Duration::from_secs(1);
        let exchange = TcpClientStream::exchange(server, None, timeout, None, provider.clone());
        (exchange.await.unwrap(), provider)
    }

    async fn ask(client: &mut DnsExchange<TokioRuntimeProvider>, qname: &str, qtype: RecordType) -> DnsResponse {
        client.query(name(qname), DNSClass::IN, qtype).await.unwrap()
    }

    fn a_records(response: &DnsResponse) -> Vec<(Ipv4Addr, u32)> {
        let a = |r: &Record| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        };
        response.answers.iter().filter_map(a).collect()
    }

    #[tokio::test]
    async fn allowed_a_is_answered_and_reported_first() {
        let setup = Setup::new().await;
        let mut client = udp_client(setup.proxy.local_addr(), SANDBOX);
        let response = ask(&mut client, "Allowed.Test.", RecordType::A).await;
        assert_eq!(response.response_code, ResponseCode::NoError);
        let addrs = a_records(&response);
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].0, Ipv4Addr::new(198, 51, 100, 10));
        assert!(addrs[0].1 <= 60);
        let (name, qtype, reported) = setup.policy.last_answer().unwrap();
        assert_eq!((name.as_str(), qtype.as_str()), ("allowed.test", "A"));
        assert_eq!(reported, addrs);
        assert_eq!(setup.upstream_queries(), 1);
        setup.proxy.shutdown().await;
    }

    #[tokio::test]
    async fn denied_name_is_refused_without_asking_upstream() {
        let setup = Setup::new().await;
        let mut client = udp_client(setup.proxy.local_addr(), SANDBOX);
        for qtype in [RecordType::A, RecordType::TXT, RecordType::AAAA] {
            let response = ask(&mut client, "other.test.", qtype).await;
            assert_eq!(response.response_code, ResponseCode::Refused);
            assert!(response.answers.is_empty());
        }
        // A label hiding a dot must not pass for a subdomain of an allowed name.
        let odd = Name::from_labels(vec![&b"x.allowed"[..], &b"test"[..]]).unwrap();
        let response = client.query(odd, DNSClass::IN, RecordType::A).await.unwrap();
        assert_eq!(response.response_code, ResponseCode::Refused);
        assert_eq!(setup.upstream_queries(), 0);
        assert_eq!(setup.policy.refused.lock().unwrap().len(), 3);
        assert!(setup.policy.answered.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn unknown_client_is_refused() {
        let setup = Setup::new().await;
        let mut client = udp_client(setup.proxy.local_addr(), STRANGER);
        let response = ask(&mut client, "allowed.test.", RecordType::A).await;
        assert_eq!(response.response_code, ResponseCode::Refused);
        assert_eq!(setup.upstream_queries(), 0);
        assert!(setup.policy.refused.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn aaaa_is_empty_without_asking_upstream() {
        let setup = Setup::new().await;
        let mut client = udp_client(setup.proxy.local_addr(), SANDBOX);
        let response = ask(&mut client, "allowed.test.", RecordType::AAAA).await;
        assert_eq!(response.response_code, ResponseCode::NoError);
        assert!(response.answers.is_empty());
        assert_eq!(setup.upstream_queries(), 0);
        let (name, qtype, addrs) = setup.policy.last_answer().unwrap();
        assert_eq!((name.as_str(), qtype.as_str()), ("allowed.test", "AAAA"));
        assert!(addrs.is_empty());
    }

    #[tokio::test]
    async fn nxdomain_and_other_types_pass_through() {
        let setup = Setup::new().await;
        let mut client = udp_client(setup.proxy.local_addr(), SANDBOX);

        let response = ask(&mut client, "missing.allowed.test.", RecordType::A).await;
        assert_eq!(response.response_code, ResponseCode::NXDomain);
        assert!(response.answers.is_empty());
        assert!(matches!(response.authorities.first().map(|r| &r.data), Some(RData::SOA(_))));
        let (name, _, addrs) = setup.policy.last_answer().unwrap();
        assert_eq!(name, "missing.allowed.test");
        assert!(addrs.is_empty());

        let response = ask(&mut client, "txt.allowed.test.", RecordType::TXT).await;
        assert_eq!(response.response_code, ResponseCode::NoError);
        let RData::TXT(txt) = &response.answers[0].data else { panic!("not TXT: {response:?}") };
        assert_eq!(txt.to_string(), "hello");
        assert!(setup.policy.last_answer().unwrap().2.is_empty());

        // An allowed name in a zone the upstream does not serve: it refuses, we fail.
        let response = ask(&mut client, "allowed.example.", RecordType::A).await;
        assert_eq!(response.response_code, ResponseCode::ServFail);
        assert_eq!(*setup.policy.failed.lock().unwrap(), [("allowed.example".to_owned(), "A".to_owned())]);
    }

    #[tokio::test]
    async fn cname_chain_over_tcp() {
        let setup = Setup::new().await;
        let (mut client, _tasks) = tcp_client(setup.proxy.local_addr()).await;
        let response = ask(&mut client, "alias.test.", RecordType::A).await;
        assert_eq!(response.response_code, ResponseCode::NoError);
        let cname = &response.answers[0];
        assert_eq!(cname.data, RData::CNAME(CNAME(name("allowed.test."))));
        let addrs = a_records(&response);
        assert_eq!(addrs.iter().map(|a| a.0).collect::<Vec<_>>(), [Ipv4Addr::new(198, 51, 100, 10)]);
        assert_eq!(setup.policy.last_answer().unwrap().2, addrs);

        let response = ask(&mut client, "other.test.", RecordType::A).await;
        assert_eq!(response.response_code, ResponseCode::Refused);
    }

    #[tokio::test]
    async fn cached_ttls_count_down() {
        let setup = Setup::new().await;
        let mut client = udp_client(setup.proxy.local_addr(), SANDBOX);
        let first = a_records(&ask(&mut client, "allowed.test.", RecordType::A).await);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let second = a_records(&ask(&mut client, "allowed.test.", RecordType::A).await);
        assert_eq!(setup.upstream_queries(), 1, "the second answer comes from the cache");
        assert!(second[0].1 < first[0].1, "ttl {} then {}", first[0].1, second[0].1);
        assert_eq!(setup.policy.last_answer().unwrap().2, second);
    }

    #[tokio::test]
    async fn silent_upstream_is_servfail() {
        // Bound but never read: queries to it time out.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let policy = Arc::new(TestPolicy::default());
        let bind = "127.0.0.1:0".parse().unwrap();
        let upstream = silent.local_addr().unwrap();
        let timeout = Duration::from_millis(300);
        let proxy = DnsProxy::start_with_timeout(bind, upstream, policy.clone(), timeout).await.unwrap();
        let mut client = udp_client(proxy.local_addr(), SANDBOX);
        let response = ask(&mut client, "allowed.test.", RecordType::A).await;
        assert_eq!(response.response_code, ResponseCode::ServFail);
        assert!(policy.answered.lock().unwrap().is_empty());
        // The query left the host: the policy hears of it (for the audit).
        assert_eq!(*policy.failed.lock().unwrap(), [("allowed.test".to_owned(), "A".to_owned())]);
    }

    #[test]
    fn policy_names() {
        assert_eq!(policy_name(&name("WWW.Example.COM.")).as_deref(), Some("www.example.com"));
        assert_eq!(policy_name(&name("_acme-challenge.a.b")).as_deref(), Some("_acme-challenge.a.b"));
        assert_eq!(policy_name(&Name::root()), None);
        assert_eq!(policy_name(&name("*.example.com.")), None);
        let odd = Name::from_labels(vec![&b"a b"[..], &b"com"[..]]).unwrap();
        assert_eq!(policy_name(&odd), None);
    }
}
