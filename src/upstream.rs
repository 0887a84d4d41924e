//! The nodes as the proxy sees them: addresses (`host:port` or DNS SRV),
//! connecting (plain TCP, STARTTLS or direct TLS) and opening a stream up to
//! the node's pre-auth features.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use crate::config::{split_host_port, Config, ConfigError, DnsConfig, NodeConfig, UpstreamTls};
use crate::node::NodeId;
use crate::xmpp::framer::{FrameKind, Framer};
use crate::xmpp::stream::{self, NodeFeatures, StreamHeader};

/// A byte stream to a node or a client, TLS or not.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A boxed stream, so that plain and TLS connections share one code path.
pub type BoxStream = Box<dyn AsyncStream>;

/// What went wrong on the node side.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The SRV or host name did not resolve.
    #[error("node {node}: cannot resolve {name}: {reason}")]
    Resolve {
        /// Node name.
        node: String,
        /// What was looked up.
        name: String,
        /// Resolver message.
        reason: String,
    },
    /// TCP connect failed on every address.
    #[error("node {node}: connect failed: {source}")]
    Connect {
        /// Node name.
        node: String,
        /// The last error.
        source: io::Error,
    },
    /// The TLS handshake with the node failed.
    #[error("node {node}: TLS: {source}")]
    Tls {
        /// Node name.
        node: String,
        /// The handshake error.
        source: io::Error,
    },
    /// The node took too long.
    #[error("node {node}: no answer within {after:?}")]
    Timeout {
        /// Node name.
        node: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The node said something that is not an XMPP stream opening.
    #[error("node {node}: {what}")]
    Protocol {
        /// Node name.
        node: String,
        /// What was wrong.
        what: String,
    },
}

impl UpstreamError {
    /// What a client whose login this failure stopped is told (the
    /// `<text/>` of its SASL failure): what happened, without the node's
    /// name or address.
    pub fn client_text(&self) -> String {
        match self {
            UpstreamError::Timeout { after, .. } => format!(
                "the user's node did not answer within {}; try again later",
                humantime::format_duration(*after)
            ),
            UpstreamError::Protocol { .. } => {
                "the user's node did not open an XMPP stream; try again later".into()
            }
            UpstreamError::Resolve { .. }
            | UpstreamError::Connect { .. }
            | UpstreamError::Tls { .. } => {
                "the user's node is not reachable; try again later".into()
            }
        }
    }
}

/// How to find a node.
#[derive(Debug, Clone)]
enum Target {
    HostPort(String, u16),
    Srv(String),
}

/// One node of the group.
pub struct Upstream {
    /// Node 1 or node 2 of the group.
    pub id: NodeId,
    /// Node name.
    pub name: String,
    target: Target,
    tls: UpstreamTls,
    connector: Option<TlsConnector>,
    server_name: String,
    /// Send a PROXY protocol v2 header first.
    proxy_protocol: bool,
}

/// An open stream to a node, after its first `<stream:features>`.
pub struct NodeStream {
    /// The connection.
    pub io: BoxStream,
    /// Bytes read past the features (normally empty).
    pub buf: BytesMut,
    /// The node's stream header.
    pub header: StreamHeader,
    /// The node's features.
    pub features: NodeFeatures,
    /// The address connected to.
    pub addr: SocketAddr,
}

/// The group's nodes as the proxy reaches them: addresses, TLS towards
/// each, the resolver, and the stanza limit of every node stream. Built
/// once at start; the relay and the monitor open streams through it alike,
/// so that "the heartbeat works" means "a login can be routed there".
pub struct Nodes {
    nodes: Vec<Upstream>,
    dns: Dns,
    /// The default served domain (heartbeats and the monitor login use it).
    domain: String,
    max_stanza_bytes: usize,
}

impl Nodes {
    /// The node table of a validated config.
    pub fn from_config(config: &Config) -> Result<Nodes, ConfigError> {
        let domain = config.group.domains[0].clone();
        let nodes = NodeId::ALL
            .into_iter()
            .zip(&config.nodes)
            .map(|(id, n)| Upstream::new(id, n, &domain))
            .collect::<Result<_, _>>()?;
        Ok(Nodes {
            nodes,
            dns: Dns::new(&config.dns)?,
            domain,
            max_stanza_bytes: config.limits.max_stanza_bytes,
        })
    }

    /// A configured node.
    pub fn get(&self, id: NodeId) -> Option<&Upstream> {
        self.nodes.get(id.index())
    }

    /// The configured nodes, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.nodes.iter()
    }

    /// A node's name, or `(none)` for the empty slot of a one-node group.
    pub fn name(&self, id: NodeId) -> &str {
        self.get(id).map_or("(none)", |u| u.name.as_str())
    }

    /// The default served domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Opens a stream to `id` for `domain` (see [`Upstream::open`]) for the
    /// proxy itself (heartbeats, probes).
    pub async fn open(
        &self,
        id: NodeId,
        domain: &str,
        timeout: Duration,
    ) -> Result<NodeStream, UpstreamError> {
        self.open_from(id, domain, timeout, None).await
    }

    /// Opens a stream to `id` for `domain` on behalf of the client at
    /// `client` (`None`: the proxy's own), whose address a node with
    /// `proxy_protocol` learns from the PROXY v2 header.
    pub async fn open_from(
        &self,
        id: NodeId,
        domain: &str,
        timeout: Duration,
        client: Option<SocketAddr>,
    ) -> Result<NodeStream, UpstreamError> {
        let u = self.get(id).ok_or_else(|| UpstreamError::Protocol {
            node: id.to_string(),
            what: "not configured".into(),
        })?;
        u.open(&self.dns, domain, self.max_stanza_bytes, timeout, client)
            .await
    }

    /// The node's addresses, resolved within `timeout`; never empty.
    pub async fn addresses(
        &self,
        id: NodeId,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, String> {
        let Some(u) = self.get(id) else {
            return Err(format!("{id} is not configured"));
        };
        match tokio::time::timeout(timeout, u.resolve(&self.dns)).await {
            Ok(Ok(a)) if !a.is_empty() => Ok(a),
            Ok(Ok(_)) => Err(format!("node {}: no address", u.name)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "node {}: name resolution took over {timeout:?}",
                u.name
            )),
        }
    }
}

/// The SASL mechanisms offered to clients: what every answering node
/// offers, never a `-PLUS` one. Written by the monitor's heartbeats, read by
/// every login.
pub struct Mechanisms {
    current: std::sync::RwLock<Arc<Vec<String>>>,
    learned: tokio::sync::watch::Sender<bool>,
}

/// Mechanisms offered before any node has answered.
const FALLBACK_MECHANISMS: [&str; 2] = ["SCRAM-SHA-1", "PLAIN"];

impl Default for Mechanisms {
    fn default() -> Self {
        Mechanisms {
            current: std::sync::RwLock::new(Arc::new(
                FALLBACK_MECHANISMS.iter().map(|s| s.to_string()).collect(),
            )),
            learned: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Mechanisms {
    /// The mechanisms to offer now.
    pub fn get(&self) -> Arc<Vec<String>> {
        match self.current.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the offered mechanisms (never with `-PLUS` ones, never with
    /// none).
    pub fn set(&self, mut m: Vec<String>) {
        m.retain(|x| !x.ends_with("-PLUS"));
        if m.is_empty() {
            return;
        }
        let mut g = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if **g != m {
            tracing::info!(mechanisms = ?m, "SASL mechanisms offered to clients");
            *g = Arc::new(m);
        }
        drop(g);
        self.learned.send_replace(true);
    }

    /// Waits until a node has told its mechanisms, at most `timeout`.
    /// Returns whether it did.
    pub async fn wait_learned(&self, timeout: Duration) -> bool {
        let mut rx = self.learned.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// DNS resolver for SRV node addresses.
#[derive(Clone)]
pub struct Dns {
    resolver: Arc<TokioResolver>,
}

impl Dns {
    /// The system resolver, or the configured name servers.
    pub fn new(cfg: &DnsConfig) -> Result<Dns, ConfigError> {
        let resolver = if cfg.servers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(b) => b.build(),
                // No usable system configuration: SRV names will fail to
                // resolve with a clear error, host:port still works.
                Err(_) => TokioResolver::builder_with_config(
                    ResolverConfig::new(),
                    TokioConnectionProvider::default(),
                )
                .build(),
            }
        } else {
            let mut rc = ResolverConfig::new();
            for s in &cfg.servers {
                rc.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
                rc.add_name_server(NameServerConfig::new(*s, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(rc, TokioConnectionProvider::default()).build()
        };
        Ok(Dns {
            resolver: Arc::new(resolver),
        })
    }

    /// `_xmpp-client._tcp.<domain>` targets in RFC 2782 order (priority,
    /// then higher weight first), each resolved to addresses.
    pub async fn srv(&self, domain: &str) -> Result<Vec<SocketAddr>, String> {
        let name = format!("_xmpp-client._tcp.{domain}.");
        let answer = self
            .resolver
            .srv_lookup(name.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let mut records: Vec<_> = answer
            .iter()
            .map(|r| {
                (
                    r.priority(),
                    std::cmp::Reverse(r.weight()),
                    r.port(),
                    r.target().to_ascii(),
                )
            })
            .collect();
        records.sort();
        let mut out = Vec::new();
        for (_, _, port, target) in records {
            if target == "." {
                continue; // "service not available" (RFC 2782)
            }
            match self.resolver.lookup_ip(target.as_str()).await {
                Ok(ips) => out.extend(ips.iter().map(|ip| SocketAddr::new(ip, port))),
                Err(e) => tracing::debug!(%target, error = %e, "SRV target does not resolve"),
            }
        }
        if out.is_empty() {
            return Err(format!("no usable SRV target for {name}"));
        }
        Ok(out)
    }
}

impl Upstream {
    /// Builds the node table from a validated config.
    fn new(id: NodeId, n: &NodeConfig, domain: &str) -> Result<Upstream, ConfigError> {
        let index = id.index();
        let target = match (&n.address, &n.srv) {
            (Some(a), _) => {
                let (h, p) = split_host_port(a).ok_or_else(|| {
                    ConfigError::new(format!("nodes[{index}].address"), "not host:port")
                })?;
                Target::HostPort(h.to_string(), p)
            }
            (None, Some(d)) => Target::Srv(d.clone()),
            (None, None) => {
                return Err(ConfigError::new(
                    format!("nodes[{index}].address"),
                    "missing",
                ))
            }
        };
        let connector = match (&n.tls, &n.tls_roots) {
            (UpstreamTls::None, _) => None,
            (_, Some(roots)) => {
                let cfg = crate::tls::client_config(roots, &format!("nodes[{index}].tls_roots"))?;
                Some(TlsConnector::from(cfg))
            }
            (_, None) => {
                return Err(ConfigError::new(
                    format!("nodes[{index}].tls_roots"),
                    "required for TLS towards the node",
                ))
            }
        };
        let server_name = n.tls_server_name.clone().unwrap_or_else(|| match &target {
            Target::HostPort(h, _) => h.clone(),
            Target::Srv(_) => domain.to_string(),
        });
        Ok(Upstream {
            id,
            name: n.name.clone(),
            target,
            tls: n.tls,
            connector,
            server_name,
            proxy_protocol: n.proxy_protocol,
        })
    }

    /// The node's addresses, in the order to try them.
    pub async fn resolve(&self, dns: &Dns) -> Result<Vec<SocketAddr>, UpstreamError> {
        match &self.target {
            Target::HostPort(h, p) => tokio::net::lookup_host((h.as_str(), *p))
                .await
                .map(|it| it.collect())
                .map_err(|e| UpstreamError::Resolve {
                    node: self.name.clone(),
                    name: h.clone(),
                    reason: e.to_string(),
                }),
            Target::Srv(d) => dns.srv(d).await.map_err(|reason| UpstreamError::Resolve {
                node: self.name.clone(),
                name: format!("_xmpp-client._tcp.{d}"),
                reason,
            }),
        }
    }

    /// Connects (trying each address), performs TLS as configured, sends the
    /// stream header and reads the node's pre-auth features. Everything is
    /// bounded by `timeout`.
    pub async fn open(
        &self,
        dns: &Dns,
        domain: &str,
        max_bytes: usize,
        timeout: Duration,
        client: Option<SocketAddr>,
    ) -> Result<NodeStream, UpstreamError> {
        tokio::time::timeout(timeout, self.open_inner(dns, domain, max_bytes, client))
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Timeout {
                    node: self.name.clone(),
                    after: timeout,
                })
            })
    }

    async fn open_inner(
        &self,
        dns: &Dns,
        domain: &str,
        max_bytes: usize,
        client: Option<SocketAddr>,
    ) -> Result<NodeStream, UpstreamError> {
        let addrs = self.resolve(dns).await?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut tcp = None;
        for a in &addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    tcp = Some((s, *a));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some((tcp, addr)) = tcp else {
            return Err(UpstreamError::Connect {
                node: self.name.clone(),
                source: last,
            });
        };
        let _ = tcp.set_nodelay(true);
        let mut tcp = tcp;
        if self.proxy_protocol {
            // The proxy's own connections (heartbeats, probes) name the
            // proxy's address: ejabberd 23.01 never answers a stream
            // after a LOCAL command.
            let source = client.or_else(|| tcp.local_addr().ok());
            tcp.write_all(&crate::proxy_protocol::header(source, addr))
                .await
                .map_err(|e| self.protocol(&format!("write PROXY header: {e}")))?;
        }
        let mut buf = BytesMut::with_capacity(4096);
        let mut framer = Framer::new(max_bytes);
        let (io, header, features): (BoxStream, _, _) = match self.tls {
            UpstreamTls::None => {
                let mut tcp = tcp;
                let (h, f) = self
                    .stream_open(&mut tcp, &mut buf, &mut framer, domain)
                    .await?;
                (Box::new(tcp), h, f)
            }
            UpstreamTls::Direct => {
                let mut tls = self.tls_handshake(tcp).await?;
                let (h, f) = self
                    .stream_open(&mut tls, &mut buf, &mut framer, domain)
                    .await?;
                (Box::new(tls), h, f)
            }
            UpstreamTls::Starttls => {
                let mut tcp = tcp;
                let (_, f) = self
                    .stream_open(&mut tcp, &mut buf, &mut framer, domain)
                    .await?;
                if !f.starttls {
                    return Err(self.protocol("STARTTLS configured but not offered"));
                }
                tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                    .await
                    .map_err(|e| self.protocol(&format!("write: {e}")))?;
                let (kind, frame) = read_frame(&mut tcp, &mut buf, &mut framer)
                    .await
                    .map_err(|e| self.protocol(&e))?;
                if kind != FrameKind::Stanza || !frame.starts_with(b"<proceed") {
                    return Err(self.protocol("STARTTLS refused"));
                }
                if !buf.is_empty() {
                    return Err(self.protocol("data after <proceed/>"));
                }
                let mut tls = self.tls_handshake(tcp).await?;
                framer.reset();
                let (h, f) = self
                    .stream_open(&mut tls, &mut buf, &mut framer, domain)
                    .await?;
                (Box::new(tls), h, f)
            }
        };
        Ok(NodeStream {
            io,
            buf,
            header,
            features,
            addr,
        })
    }

    async fn tls_handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
        let connector = self
            .connector
            .as_ref()
            .ok_or_else(|| self.protocol("TLS without roots"))?;
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|e| self.protocol(&format!("bad TLS server name: {e}")))?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| UpstreamError::Tls {
                node: self.name.clone(),
                source: e,
            })
    }

    async fn stream_open<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        buf: &mut BytesMut,
        framer: &mut Framer,
        domain: &str,
    ) -> Result<(StreamHeader, NodeFeatures), UpstreamError> {
        io.write_all(stream::client_header(domain, None).as_bytes())
            .await
            .map_err(|e| self.protocol(&format!("write: {e}")))?;
        let (kind, frame) = read_frame(io, buf, framer)
            .await
            .map_err(|e| self.protocol(&e))?;
        if kind != FrameKind::Header {
            return Err(self.protocol("expected a stream header"));
        }
        let header = stream::parse_header(&frame).map_err(|e| self.protocol(&e.to_string()))?;
        let (kind, frame) = read_frame(io, buf, framer)
            .await
            .map_err(|e| self.protocol(&e))?;
        if kind != FrameKind::Stanza || !frame.starts_with(b"<stream:features") {
            return Err(self.protocol("expected <stream:features>"));
        }
        let features = stream::parse_features(&frame).map_err(|e| self.protocol(&e.to_string()))?;
        Ok((header, features))
    }

    fn protocol(&self, what: &str) -> UpstreamError {
        UpstreamError::Protocol {
            node: self.name.clone(),
            what: what.to_string(),
        }
    }
}

/// Reads until one complete non-whitespace frame is available and returns it
/// (kind and bytes). Errors are described for the log.
pub async fn read_frame<S: AsyncRead + Unpin + ?Sized>(
    io: &mut S,
    buf: &mut BytesMut,
    framer: &mut Framer,
) -> Result<(FrameKind, BytesMut), String> {
    loop {
        match framer.next(buf) {
            Ok(Some(f)) => {
                let bytes = buf.split_to(f.len);
                if f.kind == FrameKind::Whitespace {
                    continue;
                }
                return Ok((f.kind, bytes));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        buf.reserve(4096);
        match io.read_buf(buf).await {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
