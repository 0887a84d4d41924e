//! One client connection, from accept to close.
//!
//! [`ClientConnection::run`] reads top to bottom; each phase is a function
//! from one typed value to the next:
//!
//! 1. [`Accepted`] → **secure** → [`Secured`]: direct TLS handshake, or a
//!    plain stream served by the proxy up to `<starttls/>` and then the
//!    handshake;
//! 2. → **open** → [`Opened`]: the proxy answers the TLS stream header with
//!    the node pair's SASL mechanisms (no `-PLUS`) and the XEP-0478 size
//!    limit;
//! 3. → **identify** → [`Identified`]: the bare JID from the stream `from`
//!    or the SASL initial response, PRECIS-normalised;
//! 4. → **route** → [`Routed`]: home node by assignment, serving node by the
//!    group state;
//! 5. → **admit** → [`Admitted`]: the admission step
//!    ([`failover::Admission`]) may hold or refuse the login;
//! 6. → **connect**: open a stream to that node, forward the `<auth>`,
//!    then → **exchange** → [`Relaying`]: the proxy stays in control of
//!    the SASL exchange, passing challenges and responses, until the node
//!    answers `<success/>` (go on) or `<failure/>` (back to step 3 with a
//!    new node connection);
//! 7. → **relay** ([`relay`]): both directions through the framer, byte for
//!    byte, stanzas shown to the [`hooks`], until either side closes, the
//!    connection is evicted, or the proxy shuts down.
//!
//! A refusal in steps 3–6 and a node's `<failure/>` in the exchange are failed
//! authentications: the client may try again on the same stream, and the
//! stream is closed with `<policy-violation/>` after
//! `limits.max_auth_attempts` of them. The pre-auth deadline runs from
//! accept to SASL success, whatever happened in between. Each failure also
//! counts against the client's address ([`bans`]).
//!
//! The user is the SASL authentication identity (PLAIN authcid, SCRAM
//! `n=`), in a served domain. After login the relay checks the JID the
//! node binds against it; a node that logged in someone else (e.g. an
//! authzid honoured differently) ends the stream with `<not-authorized/>`
//! and the session is never tracked.

pub mod bans;
pub mod hooks;
mod relay;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::config::LimitsConfig;
use crate::control::{ConnHandle, ConnId};
use crate::failover::{Admission, Admit, Hints, Login};
use crate::group::GroupHandle;
use crate::metrics::Metrics;
use crate::node::NodeId;
use crate::route::{AssignError, Assignment, Routing};
use crate::tls::LiveTls;
use crate::tracker::Tracker;
use crate::upstream::{BoxStream, Mechanisms, NodeStream, Nodes, UpstreamError};
use crate::xmpp::framer::{FrameError, FrameKind, Framer};
use crate::xmpp::{peek, sasl, stream};

use hooks::{HookFactory, Hooks, SessionInfo};

/// What every connection needs, built once at start and shared.
pub struct ConnContext {
    /// Timeouts, sizes, attempts.
    pub limits: LimitsConfig,
    /// The served domains; the first is the default.
    pub domains: Vec<String>,
    /// Client-facing TLS, read at each handshake (a reload swaps it).
    pub tls: Arc<LiveTls>,
    /// The nodes, to open node streams.
    pub nodes: Arc<Nodes>,
    /// Users' home nodes.
    pub assignment: Arc<Assignment>,
    /// Which node serves each home now.
    pub routing: Arc<Routing>,
    /// JSM sessions.
    pub tracker: Arc<Tracker>,
    /// SASL mechanisms offered to clients.
    pub mechanisms: Arc<Mechanisms>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Where node failures seen by the relay are reported.
    pub group: Arc<GroupHandle>,
    /// The step between routing and the node connect.
    pub admission: Arc<Admission>,
    /// Re-login hints for streams the proxy ends itself.
    pub hints: Arc<Hints>,
    /// Further stanza hooks for each relayed session.
    pub hooks: Vec<Arc<dyn HookFactory>>,
    /// Failed-authentication counts and bans per source address.
    pub auth_bans: Arc<bans::AuthBans>,
}

impl ConnContext {
    fn active_connections(&self) -> usize {
        self.metrics.connections_active.load(Ordering::Relaxed) as usize
    }

    /// The relay saw a connection to `node` fail (evidence for the
    /// monitor's fast detection).
    fn note_node_failure(&self, node: NodeId) {
        self.metrics.node_failures.fetch_add(1, Ordering::Relaxed);
        debug!(node = %self.nodes.name(node), "node connection failure");
        self.group.note_failure(node, self.tracker.count_on(node));
    }
}

/// Which side of the proxy a problem is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client.
    Client,
    /// The node.
    Node,
    /// The proxy itself.
    Proxy,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Node => "node",
            Side::Proxy => "proxy",
        })
    }
}

/// What went wrong, on which side, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Reading or writing a socket failed.
    #[error("{side} {what}: {source}")]
    Io {
        /// Whose socket.
        side: Side,
        /// `read`, `write`, `TLS handshake`.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A peer did not take written bytes within the write deadline.
    #[error("{side} did not read for {after:?}")]
    WriteTimeout {
        /// Who did not read.
        side: Side,
        /// The deadline.
        after: Duration,
    },
    /// The client sent bad XML (it was told with a stream error).
    #[error("client sent bad XML: {0}")]
    ClientXml(#[source] FrameError),
    /// The node sent bad XML (the client was told).
    #[error("node sent bad XML: {0}")]
    NodeXml(#[source] FrameError),
    /// A peer broke the protocol.
    #[error("{0}: {1}")]
    Protocol(Side, String),
    /// A phase took too long.
    #[error("timeout: {0}")]
    Timeout(&'static str),
    /// The node could not be reached.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl ConnError {
    fn io(side: Side, what: &'static str, source: io::Error) -> ConnError {
        ConnError::Io { side, what, source }
    }

    /// The side the problem is on.
    pub fn side(&self) -> Side {
        match self {
            ConnError::Io { side, .. }
            | ConnError::WriteTimeout { side, .. }
            | ConnError::Protocol(side, _) => *side,
            ConnError::ClientXml(_) => Side::Client,
            ConnError::NodeXml(_) | ConnError::Upstream(_) => Side::Node,
            ConnError::Timeout(_) => Side::Client,
        }
    }

    /// Whether the same request might succeed if tried again (a node that
    /// was unreachable, a reset connection), as opposed to bad input.
    pub fn retryable(&self) -> bool {
        match self {
            ConnError::Io { .. } | ConnError::Upstream(_) | ConnError::WriteTimeout { .. } => true,
            ConnError::Timeout(_) => true,
            ConnError::ClientXml(_) | ConnError::NodeXml(_) | ConnError::Protocol(..) => false,
        }
    }
}

/// How a connection ended, for the log.
#[derive(Debug)]
pub enum End {
    /// The client closed its stream (or the TCP connection).
    ClientClosed,
    /// The node closed the stream.
    NodeClosed,
    /// The connection to the node was lost (the client was told).
    NodeLost(ConnError),
    /// Evicted by the proxy (move, failover).
    Evicted,
    /// The proxy is shutting down.
    Shutdown,
    /// An error that was reported to the client (stream error) or that
    /// made further talk impossible.
    Error(ConnError),
}

impl From<ConnError> for End {
    fn from(e: ConnError) -> End {
        End::Error(e)
    }
}

/// Phase 1's input: an accepted TCP connection.
pub struct Accepted {
    /// The socket.
    pub tcp: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether it came in on the direct-TLS listener.
    pub direct_tls: bool,
}

/// A client stream the proxy reads frames from, with what it read ahead.
struct ClientStream<S> {
    io: S,
    buf: BytesMut,
    framer: Framer,
    /// Whether the proxy's stream header was sent on this stream.
    header_sent: bool,
}

/// Resolves when the client closes its side (or its connection fails)
/// while its login waits for the pacer. What the client sends meanwhile
/// stays in its read-ahead for the login to read later; past `limit`
/// bytes of it the client is no longer watched (the login's own limits
/// deal with it once admitted).
async fn client_left<S: AsyncRead + Unpin>(c: &mut ClientStream<S>, limit: usize) {
    while c.buf.len() < limit {
        c.buf.reserve(1024);
        match c.io.read_buf(&mut c.buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending().await
}

/// After TLS.
pub struct Secured {
    client: ClientStream<BoxStream>,
}

/// After the proxy's TLS stream header and SASL features.
pub struct Opened {
    client: ClientStream<BoxStream>,
    domain: String,
    /// The bare JID the stream header's `from` names, if any.
    from_jid: Option<String>,
    mechanisms: Arc<Vec<String>>,
}

/// A login that names its user.
pub struct Identified {
    /// The normalised bare JID.
    bare: String,
    /// The `<auth>` to forward (rebuilt when the proxy asked for the
    /// initial response).
    auth: BytesMut,
}

/// A login with its target node.
pub struct Routed {
    id: Identified,
    home: NodeId,
    target: NodeId,
}

/// A login the admission step let through.
pub struct Admitted {
    routed: Routed,
}

/// A node stream after SASL success: ready to relay.
pub struct Relaying {
    client: ClientStream<BoxStream>,
    node: NodeStream,
    routed: Routed,
    /// When the `<auth>` was forwarded (for the login pacer).
    /// How long the node took over the SASL exchange (its turns only,
    /// not the client's).
    sasl_node_time: Duration,
}

/// What the connect step produced.
enum Connected {
    /// The node stream, the `<auth>` forwarded.
    Node(Box<NodeStream>, Routed),
    /// The target was marked down meanwhile: the login is routed again.
    Moved(Identified),
}

/// Why a login phase did not produce its value.
enum Refused {
    /// The client was sent a SASL failure and may try again; `true` when
    /// it counts against the client's address (not a temporary failure).
    Retry(bool),
    /// The connection ends.
    End(End),
}

impl From<End> for Refused {
    fn from(e: End) -> Refused {
        Refused::End(e)
    }
}

/// One accepted client connection.
pub struct ClientConnection {
    /// Proxy-wide unique id, the key of the tracker entry.
    id: ConnId,
    /// Everything shared by all connections.
    ctx: Arc<ConnContext>,
    /// Flips to `true` when the proxy shuts down.
    shutdown: watch::Receiver<bool>,
    /// End of the pre-auth allowance (until the `<auth>` is forwarded).
    deadline: Instant,
    /// The client's address (sent to nodes that take a PROXY header).
    peer: Option<SocketAddr>,
}

impl ClientConnection {
    /// A connection ready to run.
    pub fn new(id: ConnId, ctx: Arc<ConnContext>, shutdown: watch::Receiver<bool>) -> Self {
        let deadline = Instant::now() + ctx.limits.pre_auth_timeout;
        ClientConnection {
            id,
            ctx,
            shutdown,
            deadline,
            peer: None,
        }
    }

    /// Serves the connection to its end. Never panics on peer input; every
    /// problem ends in a stream error to the client or a closed connection.
    pub async fn run(mut self, accepted: Accepted) {
        let span = tracing::info_span!(
            "conn",
            conn.id = self.id,
            client.addr = %accepted.peer,
            tls = if accepted.direct_tls { "direct" } else { "starttls" },
            user = tracing::field::Empty,
            node = tracing::field::Empty,
        );
        let ctx = self.ctx.clone();
        ctx.metrics
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        self.deadline = Instant::now() + ctx.limits.pre_auth_timeout;
        self.peer = Some(accepted.peer);
        let end = self.serve(accepted).instrument(span.clone()).await;
        ctx.tracker.on_close(self.id);
        ctx.metrics
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        let _enter = span.enter();
        match end {
            End::Error(e) | End::NodeLost(e) if e.side() == Side::Node => {
                warn!(error = %e, retryable = e.retryable(), "connection closed: node error")
            }
            End::Error(e) => info!(error = %e, side = %e.side(), "connection closed"),
            other => debug!(end = ?other, "connection closed"),
        }
    }

    async fn serve(&mut self, accepted: Accepted) -> End {
        // The login phases' state lives on the heap and is freed once the
        // session relays: the task itself holds only what the relay needs
        // for the rest of its (mostly idle) life.
        let result = Box::pin(async {
            let secured = self.secure(accepted).await?;
            let opened = self.open(secured).await?;
            let relaying = self.authenticate(opened).await?;
            Ok::<_, End>(relaying)
        })
        .await;
        match result {
            Ok(r) => self.relay(r).await,
            Err(end) => end,
        }
    }

    /// Phase 1: TLS, directly or after STARTTLS.
    async fn secure(&mut self, a: Accepted) -> Result<Secured, End> {
        let _ = a.tcp.set_nodelay(true);
        let limits = &self.ctx.limits;
        let mut plain = ClientStream {
            io: a.tcp,
            buf: BytesMut::with_capacity(1024),
            // Before SASL success only small elements are valid.
            framer: Framer::new(limits.pre_auth_stanza_bytes)
                .with_structure_limits(limits.max_depth, limits.max_attributes),
            header_sent: false,
        };
        let acceptor = if a.direct_tls {
            TlsAcceptor::from(self.ctx.tls.direct.load_full())
        } else {
            // Plain stream: header, features with STARTTLS required, <starttls/>.
            let hdr = self.expect_header(&mut plain).await?;
            let domain = self.pick_domain(&mut plain, &hdr).await?;
            let mut out = stream::server_header(&domain, &stream_id());
            out.push_str(stream::features_starttls());
            self.send(&mut plain, out.as_bytes()).await?;
            plain.header_sent = true;
            let (kind, frame) = self.next_frame(&mut plain).await?;
            if kind == FrameKind::Close {
                let _ = self.send(&mut plain, b"</stream:stream>").await;
                return Err(End::ClientClosed);
            }
            let f = peek::element_name(&frame);
            if f != b"starttls" || !peek::contains(&frame, stream::NS_TLS.as_bytes()) {
                return Err(self
                    .refuse_stream(&mut plain, "policy-violation", "STARTTLS is required")
                    .await);
            }
            if !plain.buf.iter().all(|b| b" \t\r\n".contains(b)) {
                // Bytes pipelined after <starttls/> would be trusted as if
                // they came over TLS: refuse them (STARTTLS injection).
                // Whitespace after it (a keep-alive, a newline) is no
                // stanza and is dropped with the plain buffer.
                return Err(self
                    .refuse_stream(&mut plain, "policy-violation", "data after <starttls/>")
                    .await);
            }
            self.send(&mut plain, stream::PROCEED.as_bytes()).await?;
            TlsAcceptor::from(self.ctx.tls.starttls.load_full())
        };
        let tls =
            match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(plain.io))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(ConnError::io(Side::Client, "TLS handshake", e).into()),
                Err(_) => return Err(ConnError::Timeout("TLS handshake").into()),
            };
        let mut framer = plain.framer;
        framer.reset();
        let mut buf = plain.buf;
        buf.clear();
        Ok(Secured {
            client: ClientStream {
                io: Box::new(tls),
                buf,
                framer,
                header_sent: false,
            },
        })
    }

    /// Phase 2: the TLS stream's header and the SASL features.
    async fn open(&mut self, s: Secured) -> Result<Opened, End> {
        let mut client = s.client;
        let hdr = self.expect_header(&mut client).await?;
        let domain = self.pick_domain(&mut client, &hdr).await?;
        let mechanisms = self.ctx.mechanisms.get();
        let mut out = stream::server_header(&domain, &stream_id());
        out.push_str(&stream::features_sasl(
            &mechanisms,
            self.ctx.limits.max_stanza_bytes,
            None,
        ));
        self.send(&mut client, out.as_bytes()).await?;
        client.header_sent = true;
        let from_jid = hdr
            .from
            .as_deref()
            .filter(|f| f.contains('@'))
            // An invalid `from` is ignored: the SASL identity decides.
            .and_then(|f| sasl::bare_jid(f, &domain).ok());
        Ok(Opened {
            client,
            domain,
            from_jid,
            mechanisms,
        })
    }

    /// Phases 3–6 and the exchange, retried on the same stream after a SASL failure.
    async fn authenticate(&mut self, mut o: Opened) -> Result<Relaying, End> {
        let mut failures = 0;
        loop {
            let step = async {
                let identified = self.identify(&mut o).await?;
                let mut routed = self.route(&mut o, identified).await?;
                loop {
                    let admitted = self.admit(&mut o, routed).await?;
                    match self.connect(&mut o, admitted).await? {
                        Connected::Node(node, r) => return self.exchange(&mut o, *node, r).await,
                        // The node was marked down meanwhile: route again.
                        Connected::Moved(id) => routed = self.route(&mut o, id).await?,
                    }
                }
            }
            .await;
            let counts = match step {
                Ok((node, routed, sasl_node_time)) => {
                    return Ok(Relaying {
                        client: o.client,
                        node,
                        routed,
                        sasl_node_time,
                    })
                }
                Err(Refused::Retry(counts)) => counts,
                Err(Refused::End(end)) => return Err(end),
            };
            failures += 1;
            if counts {
                self.note_auth_failure();
            }
            if failures >= self.ctx.limits.max_auth_attempts {
                info!(failures, "too many failed authentications");
                return Err(self
                    .refuse_stream(
                        &mut o.client,
                        "policy-violation",
                        "too many failed authentication attempts",
                    )
                    .await);
            }
        }
    }

    /// Counts a failed authentication against the client's address.
    fn note_auth_failure(&self) {
        let Some(peer) = self.peer else { return };
        let l = &self.ctx.limits;
        let policy = bans::BanPolicy {
            limit: l.auth_fail_limit,
            window: l.auth_fail_window,
            ban: l.auth_ban_time,
        };
        if self.ctx.auth_bans.failed(peer.ip(), Instant::now(), policy) {
            warn!(client.ip = %peer.ip(), ban = ?l.auth_ban_time, "too many failed authentications from this address: its logins are refused for a while");
        }
    }

    /// Phase 6, continued: the SASL exchange between the client and the node, up to
    /// the node's `<success/>` (the node stream, ready to relay) or
    /// `<failure/>` (forwarded, the node connection closed, a retry).
    async fn exchange(
        &self,
        o: &mut Opened,
        mut node: NodeStream,
        routed: Routed,
    ) -> Result<(NodeStream, Routed, Duration), Refused> {
        // The node's share of the exchange: from each forward to the
        // node's answer (what the client takes in between is not the
        // node's load).
        let mut node_time = Duration::ZERO;
        let mut asked = Some(Instant::now());
        let limits = &self.ctx.limits;
        let mut node_framer = Framer::in_open_stream(limits.max_stanza_bytes)
            .with_structure_limits(limits.max_depth, limits.max_attributes);
        let node_name = self.ctx.nodes.name(routed.target);
        // Whether the node owes the next word (the `<auth>` or a
        // `<response>` was forwarded): a deadline then is the node's fault.
        let mut node_turn = true;
        loop {
            // What the node said: pass it on; success and failure end the step.
            loop {
                let f = match node_framer.next(&node.buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(node = %node_name, error = %e, "node sent bad XML during SASL");
                        let x = stream::stream_error(
                            "internal-server-error",
                            Some(&node_frame_error_text(&e)),
                            None,
                        );
                        let _ = self.send(&mut o.client, x.as_bytes()).await;
                        return Err(End::Error(ConnError::NodeXml(e)).into());
                    }
                };
                let frame = node.buf.split_to(f.len);
                match f.kind {
                    FrameKind::Whitespace => continue,
                    FrameKind::Stanza => {}
                    FrameKind::Header | FrameKind::Close => {
                        let x = stream::stream_error(
                            "remote-connection-failed",
                            Some("the user's node closed the stream during authentication"),
                            None,
                        );
                        let _ = self.send(&mut o.client, x.as_bytes()).await;
                        return Err(End::NodeClosed.into());
                    }
                }
                if let Some(t) = asked.take() {
                    node_time += t.elapsed();
                }
                self.send(&mut o.client, &frame).await?;
                node_turn = false;
                let sasl = peek::contains(&frame[..f.head_end], stream::NS_SASL.as_bytes());
                match f.name(&frame) {
                    b"success" if sasl => {
                        info!(user = %routed.id.bare, node = %node_name, "logged in");
                        return Ok((node, routed, node_time));
                    }
                    b"failure" if sasl => {
                        let temporary = peek::contains(&frame, b"temporary-auth-failure");
                        if temporary {
                            self.ctx.admission.pacer().overloaded(routed.target);
                        }
                        info!(user = %routed.id.bare, node = %node_name, "authentication failed");
                        // A new login starts over with a new node connection.
                        let _ = tokio::time::timeout(
                            limits.write_timeout,
                            relay::write_within(
                                &mut node.io,
                                b"</stream:stream>",
                                limits.write_timeout,
                                Side::Node,
                            ),
                        )
                        .await;
                        return Err(Refused::Retry(!temporary));
                    }
                    _ => {}
                }
            }
            // What the client said: SASL responses and aborts go to the node.
            loop {
                let f = match o.client.framer.next(&o.client.buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        let xml = stream::frame_error(&e);
                        let _ = self.send_error(&mut o.client, &xml).await;
                        return Err(End::Error(ConnError::ClientXml(e)).into());
                    }
                };
                let frame = o.client.buf.split_to(f.len);
                match f.kind {
                    FrameKind::Whitespace => continue,
                    FrameKind::Close => {
                        let _ = relay::write_within(
                            &mut node.io,
                            b"</stream:stream>",
                            limits.write_timeout,
                            Side::Node,
                        )
                        .await;
                        let _ = self.send(&mut o.client, b"</stream:stream>").await;
                        return Err(End::ClientClosed.into());
                    }
                    FrameKind::Header | FrameKind::Stanza => {}
                }
                let sasl = peek::contains(&frame[..f.head_end], stream::NS_SASL.as_bytes());
                let name = f.name(&frame);
                if f.kind != FrameKind::Stanza
                    || !sasl
                    || !(name == b"response" || name == b"abort")
                {
                    let text = if sasl && name == b"auth" {
                        "an authentication is in progress; send <abort/> before a new <auth/>"
                    } else {
                        "only SASL <response/> and <abort/> are valid during authentication"
                    };
                    return Err(self
                        .refuse_stream(&mut o.client, "not-authorized", text)
                        .await
                        .into());
                }
                if let Err(e) =
                    relay::write_within(&mut node.io, &frame, limits.write_timeout, Side::Node)
                        .await
                {
                    return Err(self.node_gone(o, routed.target, e).await.into());
                }
                node_turn = true;
                asked.get_or_insert_with(Instant::now);
            }
            o.client.buf.reserve(limits.read_buffer_bytes);
            node.buf.reserve(limits.read_buffer_bytes);
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                r = relay::read_some(&mut o.client.io, &mut o.client.buf) => match r {
                    Ok(0) => return Err(End::ClientClosed.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(End::ClientClosed.into()),
                    Err(e) => return Err(End::Error(ConnError::io(Side::Client, "read", e)).into()),
                },
                r = relay::read_some(&mut node.io, &mut node.buf) => match r {
                    Ok(0) => {
                        let e = ConnError::Protocol(Side::Node, "the node closed the connection during authentication".into());
                        return Err(self.node_gone(o, routed.target, e).await.into());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let e = ConnError::io(Side::Node, "read", e);
                        return Err(self.node_gone(o, routed.target, e).await.into());
                    }
                },
                () = tokio::time::sleep_until(self.deadline) => {
                    if node_turn {
                        let x = stream::stream_error(
                            "remote-connection-failed",
                            Some(NODE_SILENT),
                            None,
                        );
                        let _ = self.send(&mut o.client, x.as_bytes()).await;
                        return Err(End::Error(ConnError::Protocol(Side::Node, NODE_SILENT.into())).into());
                    }
                    return Err(self.pre_auth_over(&mut o.client, false).await.into());
                }
                _ = wait_shutdown(&mut shutdown) => {
                    return Err(self.pre_auth_over(&mut o.client, true).await.into());
                }
            }
        }
    }

    /// The node connection failed during authentication: the client is told.
    async fn node_gone(&self, o: &mut Opened, node: NodeId, e: ConnError) -> End {
        self.ctx.note_node_failure(node);
        let x = stream::stream_error(
            "remote-connection-failed",
            Some("the user's node closed the connection"),
            None,
        );
        let _ = self.send(&mut o.client, x.as_bytes()).await;
        End::NodeLost(e)
    }

    /// Phase 3: the `<auth>` and who it names.
    async fn identify(&self, o: &mut Opened) -> Result<Identified, Refused> {
        let (kind, frame) = self.next_frame(&mut o.client).await?;
        if kind == FrameKind::Close {
            let _ = self.send(&mut o.client, b"</stream:stream>").await;
            return Err(End::ClientClosed.into());
        }
        let head_end = peek::head_end(&frame);
        let name = peek::element_name(&frame);
        if name != b"auth" || !peek::contains(&frame[..head_end], stream::NS_SASL.as_bytes()) {
            let (cond, text) = if name == b"starttls" {
                ("policy-violation", "TLS is already established")
            } else {
                ("not-authorized", "authenticate first")
            };
            return Err(self.refuse_stream(&mut o.client, cond, text).await.into());
        }
        if let Some(peer) = self.peer {
            if let Some(left) = self.ctx.auth_bans.banned(peer.ip(), Instant::now()) {
                info!(client.ip = %peer.ip(), "login refused: address cooling off after failed authentications");
                let text = format!(
                    "too many failed authentications from your address; try again in {} s",
                    left.as_secs().max(1)
                );
                return Err(self
                    .refuse_stream(&mut o.client, "policy-violation", &text)
                    .await
                    .into());
            }
        }
        let mechanism = peek::attr(&frame[..head_end], b"mechanism")
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .unwrap_or_default();
        if !o.mechanisms.contains(&mechanism) {
            return Err(self
                .sasl_failure(&mut o.client, "invalid-mechanism", "mechanism not offered")
                .await);
        }
        // The initial response; ask for it when the client left it out.
        let mut auth = frame;
        let mut payload = sasl::decode_payload(
            std::str::from_utf8(stream::element_text(&auth, head_end)).unwrap_or("!"),
        );
        if payload == Err(sasl::IdentifyError::NoInitialResponse) && sasl::names_user(&mechanism) {
            self.send(&mut o.client, stream::EMPTY_CHALLENGE.as_bytes())
                .await?;
            let (_, resp) = self.next_frame(&mut o.client).await?;
            if peek::element_name(&resp) != b"response" {
                return Err(self
                    .sasl_failure(&mut o.client, "malformed-request", "expected <response/>")
                    .await);
            }
            let text = stream::element_text(&resp, peek::head_end(&resp));
            payload = sasl::decode_payload(std::str::from_utf8(text).unwrap_or("!"));
            let rebuilt = format!(
                "<auth xmlns='{}' mechanism='{}'>{}</auth>",
                stream::NS_SASL,
                quick_xml::escape::escape(mechanism.as_str()),
                String::from_utf8_lossy(text).trim()
            );
            auth = BytesMut::from(rebuilt.as_bytes());
        }
        // The SASL authentication identity is the user; the stream's `from`
        // only for a mechanism that names no one.
        let bare = match (&payload, &o.from_jid) {
            (Err(sasl::IdentifyError::Encoding), _) => Err(sasl::IdentifyError::Encoding),
            (Ok(p), None) => sasl::identify(&mechanism, p, &o.domain),
            (Ok(p), Some(_)) if sasl::names_user(&mechanism) => {
                sasl::identify(&mechanism, p, &o.domain)
            }
            (_, Some(j)) => Ok(j.clone()),
            (Err(e), None) => Err(e.clone()),
        };
        match bare {
            Ok(bare) => {
                let domain = bare.rsplit_once('@').map_or(bare.as_str(), |(_, d)| d);
                if !self
                    .ctx
                    .domains
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(domain))
                {
                    info!(user = %bare, "login refused: domain not served");
                    let text = format!("this proxy does not serve the domain of {bare}");
                    return Err(self
                        .sasl_failure(&mut o.client, "not-authorized", &text)
                        .await);
                }
                Ok(Identified { bare, auth })
            }
            Err(e) => {
                debug!(error = %e, "cannot identify the user");
                let cond = match e {
                    sasl::IdentifyError::UnsupportedMechanism(_) => "invalid-mechanism",
                    sasl::IdentifyError::Encoding => "incorrect-encoding",
                    _ => "malformed-request",
                };
                Err(self.sasl_failure(&mut o.client, cond, &e.to_string()).await)
            }
        }
    }

    /// Phase 4: the user's home, and the node serving it now.
    async fn route(&self, o: &mut Opened, id: Identified) -> Result<Routed, Refused> {
        let home = match self.ctx.assignment.home(&id.bare) {
            Ok(h) => h,
            Err(AssignError::NotAssigned(_)) => {
                info!(user = %id.bare, "login refused: not assigned");
                let text = format!("user {} is not assigned to a node", id.bare);
                return Err(self
                    .sasl_failure(&mut o.client, "not-authorized", &text)
                    .await);
            }
        };
        let Some(target) = self.ctx.routing.serving(home) else {
            info!(user = %id.bare, home = %home, "login refused: no node serves this user now");
            return Err(self
                .sasl_failure(
                    &mut o.client,
                    "temporary-auth-failure",
                    "no node of the group can serve this user now; try again later",
                )
                .await);
        };
        Ok(Routed { id, home, target })
    }

    /// Phase 5: the admission step.
    async fn admit(&self, o: &mut Opened, routed: Routed) -> Result<Admitted, Refused> {
        let login = Login {
            user: &routed.id.bare,
            home: routed.home,
            target: routed.target,
            max_wait: self.deadline.saturating_duration_since(Instant::now()),
        };
        let decision = tokio::select! {
            d = self.ctx.admission.admit(&login) => d,
            () = tokio::time::sleep_until(self.deadline) => {
                return Err(self.pre_auth_over(&mut o.client, false).await.into());
            }
            // A client that gives up while held costs nothing at the node:
            // its turn passes to the next login.
            () = client_left(&mut o.client, self.ctx.limits.max_stanza_bytes) => {
                self.ctx.admission.pacer().stats.abandoned.fetch_add(1, Ordering::Relaxed);
                info!(user = %routed.id.bare, "client left while its login was held");
                return Err(End::ClientClosed.into());
            }
        };
        match decision {
            Admit::Go => Ok(Admitted { routed }),
            Admit::Refuse(xml) => {
                info!(user = %routed.id.bare, node = %self.ctx.nodes.name(routed.target), "login refused by the pacer");
                let _ = self.send_error(&mut o.client, &xml).await;
                Err(End::Error(ConnError::Protocol(
                    Side::Proxy,
                    "login refused by the pacer".into(),
                ))
                .into())
            }
        }
    }

    /// Phase 6: the node stream, with the `<auth>` forwarded.
    async fn connect(&self, o: &mut Opened, a: Admitted) -> Result<Connected, Refused> {
        let routed = a.routed;
        let target = routed.target;
        let limits = &self.ctx.limits;
        let opening = self.ctx.nodes.open_from(
            target,
            &o.domain,
            limits.upstream_connect_timeout,
            self.peer,
        );
        let opened = tokio::select! {
            r = opening => r,
            () = self.ctx.routing.moved(routed.home, target) => {
                info!(user = %routed.id.bare, node = %self.ctx.nodes.name(target), "the node was marked down while connecting; routing the login again");
                self.ctx.metrics.logins_rerouted.fetch_add(1, Ordering::Relaxed);
                return Ok(Connected::Moved(routed.id));
            }
            () = tokio::time::sleep_until(self.deadline) => {
                let x = stream::stream_error("remote-connection-failed", Some(NODE_SILENT), None);
                let _ = self.send(&mut o.client, x.as_bytes()).await;
                return Err(End::Error(ConnError::Timeout("connecting to the node")).into());
            }
        };
        let mut node = match opened {
            Ok(n) => n,
            Err(e) => {
                warn!(user = %routed.id.bare, node = %self.ctx.nodes.name(target), error = %e, "node unavailable");
                self.ctx.note_node_failure(target);
                return Err(self
                    .sasl_failure(&mut o.client, "temporary-auth-failure", &e.client_text())
                    .await);
            }
        };
        if let Err(e) = relay::write_within(
            &mut node.io,
            &routed.id.auth,
            limits.write_timeout,
            Side::Node,
        )
        .await
        {
            let x = stream::stream_error(
                "remote-connection-failed",
                Some("the user's node closed the connection"),
                None,
            );
            let _ = self.send(&mut o.client, x.as_bytes()).await;
            return Err(End::NodeLost(e).into());
        }
        debug!(user = %routed.id.bare, node = %self.ctx.nodes.name(target), node.addr = %node.addr, "routed");
        self.ctx
            .metrics
            .logins_routed
            .fetch_add(1, Ordering::Relaxed);
        Ok(Connected::Node(Box::new(node), routed))
    }

    /// Phase 7: relay both ways until an end.
    async fn relay(&mut self, r: Relaying) -> End {
        let Relaying {
            mut client,
            node,
            routed,
            sasl_node_time,
        } = r;
        // The forwarded <auth> was split off the buffer it was read into
        // and would keep that whole buffer alive for the session's life.
        let Routed {
            id: Identified { bare, auth },
            home,
            target,
        } = routed;
        drop(auth);
        // Logged in: the user is known for the rest of the connection.
        let span = tracing::Span::current();
        span.record("user", bare.as_str());
        span.record("node", self.ctx.nodes.name(target));
        client
            .framer
            .set_max_bytes(self.ctx.limits.max_stanza_bytes);
        let ctx = self.ctx.clone();
        let (handle, control) = ConnHandle::new(ctx.limits.inject_queue_bytes);
        let session = SessionInfo {
            conn: self.id,
            user: Arc::from(bare.as_str()),
            home,
            node: target,
            handle,
        };
        let hooks = Hooks::new(
            ctx.tracker.clone(),
            ctx.admission.pacer().clone(),
            &session,
            &ctx.hooks,
            sasl_node_time,
        );
        let user = session.user.clone();
        drop(bare);
        let closing = |why: relay::Closing| -> String {
            let hints = &ctx.hints;
            match why {
                relay::Closing::Shutdown => hints.shutdown(ctx.active_connections()),
                relay::Closing::NodeLost | relay::Closing::NodeStalled => {
                    hints.node_lost(&user, target, ctx.tracker.count_on(target))
                }
            }
        };
        debug!("relaying");
        let limits = &ctx.limits;
        let end = relay::relay(
            client.io,
            client.buf,
            client.framer,
            node.io,
            node.buf,
            // The node's pre-auth header was consumed by the proxy: its
            // stanzas (challenge, success) frame inside the open stream.
            Framer::in_open_stream(limits.max_stanza_bytes)
                .with_structure_limits(limits.max_depth, limits.max_attributes),
            hooks,
            control,
            self.shutdown.clone(),
            relay::RelayParams {
                metrics: &ctx.metrics,
                closing: &closing,
                read_size: limits.read_buffer_bytes,
                write_timeout: limits.write_timeout,
                close_wait: limits.close_wait,
                sm: crate::xmpp::sm::SmLimits {
                    max_unacked_stanzas: limits.sm_max_unacked_stanzas,
                    max_unacked_bytes: limits.sm_max_unacked_bytes,
                },
            },
        )
        .await;
        if matches!(end, End::NodeLost(_)) {
            ctx.note_node_failure(target);
        }
        end
    }

    /// Reads the client's stream header; answers bad ones with a stream error.
    async fn expect_header<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        c: &mut ClientStream<S>,
    ) -> Result<stream::StreamHeader, End> {
        let (kind, frame) = self.next_frame(c).await?;
        let header = match (kind, stream::parse_header(&frame)) {
            (FrameKind::Header, Ok(h)) => h,
            _ => {
                return Err(self
                    .refuse_stream(c, "invalid-namespace", "expected an XMPP stream header")
                    .await)
            }
        };
        if !header.version_ok() {
            let e =
                ConnError::Protocol(Side::Client, format!("stream version {:?}", header.version));
            let _ = self
                .refuse_stream(c, "unsupported-version", "XMPP 1.0 is required")
                .await;
            return Err(e.into());
        }
        Ok(header)
    }

    /// The served domain the client asked for, or a `<host-unknown/>` error.
    async fn pick_domain<S: AsyncWrite + Unpin>(
        &self,
        c: &mut ClientStream<S>,
        hdr: &stream::StreamHeader,
    ) -> Result<String, End> {
        let domains = &self.ctx.domains;
        match &hdr.to {
            None => Ok(domains[0].clone()),
            Some(to) => {
                let to = to.to_ascii_lowercase();
                if domains.iter().any(|d| d.eq_ignore_ascii_case(&to)) {
                    Ok(to)
                } else {
                    let _ = self
                        .refuse_stream(c, "host-unknown", "this proxy does not serve that domain")
                        .await;
                    Err(ConnError::Protocol(Side::Client, format!("host-unknown {to}")).into())
                }
            }
        }
    }

    /// The next non-whitespace frame; framing errors become stream errors.
    /// Bounded by the pre-auth deadline; ends early on shutdown.
    async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        c: &mut ClientStream<S>,
    ) -> Result<(FrameKind, BytesMut), End> {
        loop {
            match c.framer.next(&c.buf) {
                Ok(Some(f)) => {
                    let bytes = c.buf.split_to(f.len);
                    if f.kind != FrameKind::Whitespace {
                        return Ok((f.kind, bytes));
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    let xml = stream::frame_error(&e);
                    let _ = self.send_error(c, &xml).await;
                    return Err(ConnError::ClientXml(e).into());
                }
            }
            c.buf.reserve(self.ctx.limits.read_buffer_bytes);
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                r = tokio::time::timeout_at(self.deadline, relay::read_some(&mut c.io, &mut c.buf)) => match r {
                    Ok(Ok(0)) => return Err(End::ClientClosed),
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(End::ClientClosed),
                    Ok(Err(e)) => return Err(ConnError::io(Side::Client, "read", e).into()),
                    Err(_) => return Err(self.pre_auth_over(c, false).await),
                },
                _ = wait_shutdown(&mut shutdown) => return Err(self.pre_auth_over(c, true).await),
            }
        }
    }

    /// Ends a pre-auth stream on timeout or shutdown.
    async fn pre_auth_over<S: AsyncWrite + Unpin>(
        &self,
        c: &mut ClientStream<S>,
        shutdown: bool,
    ) -> End {
        let (xml, end) = if shutdown {
            (
                self.ctx.hints.shutdown(self.ctx.active_connections()),
                End::Shutdown,
            )
        } else {
            (
                stream::stream_error(
                    "connection-timeout",
                    Some("authentication took too long"),
                    None,
                ),
                End::Error(ConnError::Timeout("pre-auth")),
            )
        };
        let _ = self.send_error(c, &xml).await;
        let _ = tokio::time::timeout(self.ctx.limits.write_timeout, c.io.shutdown()).await;
        end
    }

    /// Sends a stream error (with the proxy's header first if not sent yet).
    async fn send_error<S: AsyncWrite + Unpin>(
        &self,
        c: &mut ClientStream<S>,
        xml: &str,
    ) -> Result<(), End> {
        let mut out = String::new();
        if !c.header_sent {
            out.push_str(&stream::server_header(&self.ctx.domains[0], &stream_id()));
        }
        out.push_str(xml);
        self.send(c, out.as_bytes()).await
    }

    /// Closes the stream with a stream error.
    async fn refuse_stream<S: AsyncWrite + Unpin>(
        &self,
        c: &mut ClientStream<S>,
        condition: &str,
        text: &str,
    ) -> End {
        let xml = stream::stream_error(condition, Some(text), None);
        let _ = self.send_error(c, &xml).await;
        End::Error(ConnError::Protocol(Side::Client, text.to_string()))
    }

    /// Sends a SASL failure; the client may try again.
    async fn sasl_failure<S: AsyncWrite + Unpin>(
        &self,
        c: &mut ClientStream<S>,
        condition: &str,
        text: &str,
    ) -> Refused {
        let f = stream::sasl_failure(condition, Some(text));
        match self.send(c, f.as_bytes()).await {
            Ok(()) => Refused::Retry(condition != "temporary-auth-failure"),
            Err(end) => Refused::End(end),
        }
    }

    /// Writes to the client within the write deadline.
    async fn send<S: AsyncWrite + Unpin>(
        &self,
        c: &mut ClientStream<S>,
        bytes: &[u8],
    ) -> Result<(), End> {
        relay::write_within(
            &mut c.io,
            bytes,
            self.ctx.limits.write_timeout,
            Side::Client,
        )
        .await
        .map_err(End::Error)
    }
}

/// Tells a client accepted over `limits.max_connections` that the proxy is
/// full, at once: its stream header and `<resource-constraint/>` (after the
/// TLS handshake on the direct-TLS port), then the connection is closed.
/// Bounded by the TLS handshake and write deadlines.
pub async fn refuse_over_capacity(a: Accepted, ctx: Arc<ConnContext>) {
    let limits = &ctx.limits;
    let mut out = stream::server_header(&ctx.domains[0], &stream_id());
    out.push_str(&stream::stream_error(
        "resource-constraint",
        Some("the proxy serves as many connections as it may; try again later"),
        None,
    ));
    out.push_str("</stream:stream>");
    let _ = a.tcp.set_nodelay(true);
    let mut io: BoxStream = if a.direct_tls {
        let acceptor = TlsAcceptor::from(ctx.tls.direct.load_full());
        match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(a.tcp)).await {
            Ok(Ok(t)) => Box::new(t),
            _ => return,
        }
    } else {
        Box::new(a.tcp)
    };
    let _ = relay::write_within(&mut io, out.as_bytes(), limits.write_timeout, Side::Client).await;
    let _ = tokio::time::timeout(limits.write_timeout, io.shutdown()).await;
}

/// Resolves when the proxy starts shutting down.
pub(crate) async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    if *rx.borrow() {
        return;
    }
    while rx.changed().await.is_ok() {
        if *rx.borrow() {
            return;
        }
    }
    // Sender gone: never signal.
    std::future::pending::<()>().await
}

/// The text of the stream error a client gets for a node's framing error.
pub(crate) fn node_frame_error_text(e: &FrameError) -> String {
    match e {
        FrameError::TooLarge { limit } => {
            format!("the node sent a stanza larger than the limit of {limit} bytes")
        }
        FrameError::TooDeep { .. } | FrameError::TooManyAttributes { .. } => {
            format!("the node sent a stanza over the proxy's limits: {e}")
        }
        FrameError::NotWellFormed(_) | FrameError::Restricted(_) => {
            "the node sent invalid XML".to_string()
        }
    }
}

/// The text of the stream error when the user's node did not answer in time.
const NODE_SILENT: &str = "the user's node did not answer before the login deadline";

fn stream_id() -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    format!("{n:032x}")
}
