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
use crate::route::NodeIndex;
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

/// How to find a node.
#[derive(Debug, Clone)]
enum Target {
    HostPort(String, u16),
    Srv(String),
}

/// One node of the group.
pub struct Upstream {
    /// Position in the config (0 = node 1).
    pub index: NodeIndex,
    /// Node name.
    pub name: String,
    target: Target,
    tls: UpstreamTls,
    connector: Option<TlsConnector>,
    server_name: String,
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
            .map(|r| (r.priority(), std::cmp::Reverse(r.weight()), r.port(), r.target().to_ascii()))
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
    pub fn from_config(config: &Config) -> Result<Vec<Arc<Upstream>>, ConfigError> {
        config
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| Upstream::new(i, n, &config.group.domains[0]).map(Arc::new))
            .collect()
    }

    fn new(index: NodeIndex, n: &NodeConfig, domain: &str) -> Result<Upstream, ConfigError> {
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
            index,
            name: n.name.clone(),
            target,
            tls: n.tls,
            connector,
            server_name,
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
    ) -> Result<NodeStream, UpstreamError> {
        tokio::time::timeout(timeout, self.open_inner(dns, domain, max_bytes))
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
        let mut buf = BytesMut::with_capacity(4096);
        let mut framer = Framer::new(max_bytes);
        let (io, header, features): (BoxStream, _, _) = match self.tls {
            UpstreamTls::None => {
                let mut tcp = tcp;
                let (h, f) = self.stream_open(&mut tcp, &mut buf, &mut framer, domain).await?;
                (Box::new(tcp), h, f)
            }
            UpstreamTls::Direct => {
                let mut tls = self.tls_handshake(tcp).await?;
                let (h, f) = self.stream_open(&mut tls, &mut buf, &mut framer, domain).await?;
                (Box::new(tls), h, f)
            }
            UpstreamTls::Starttls => {
                let mut tcp = tcp;
                let (_, f) = self.stream_open(&mut tcp, &mut buf, &mut framer, domain).await?;
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
                let (h, f) = self.stream_open(&mut tls, &mut buf, &mut framer, domain).await?;
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
        connector.connect(name, tcp).await.map_err(|e| UpstreamError::Tls {
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
        let (kind, frame) = read_frame(io, buf, framer).await.map_err(|e| self.protocol(&e))?;
        if kind != FrameKind::Header {
            return Err(self.protocol("expected a stream header"));
        }
        let header = stream::parse_header(&frame).map_err(|e| self.protocol(&e.to_string()))?;
        let (kind, frame) = read_frame(io, buf, framer).await.map_err(|e| self.protocol(&e))?;
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
