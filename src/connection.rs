//! One client connection, from accept to close, as a struct with `run()`.
//!
//! Phases:
//! 1. **tls** — direct TLS handshake, or a plain stream served by the proxy
//!    up to `<starttls/>` and then the handshake;
//! 2. **pre-auth** — the proxy answers the TLS stream header with the node
//!    pair's SASL mechanisms (no `-PLUS`) and the XEP-0478 size limit, and
//!    waits for `<auth>`;
//! 3. **identify and route** — bare JID from the stream `from` or the SASL
//!    initial response; home node by assignment; serving node by the group
//!    state;
//! 4. **upstream** — open a stream to that node, forward the `<auth>`;
//! 5. **relay** — both directions through the framer, byte for byte,
//!    observing bind results and presence for the tracker, until either side
//!    closes, the connection is evicted, or the proxy shuts down.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Mutex};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::proxy::Shared;
use crate::route::{AssignError, NodeIndex};
use crate::tracker::{ConnId, Control, Presence};
use crate::upstream::{BoxStream, NodeStream};
use crate::xmpp::framer::{Frame, FrameError, FrameKind, Framer};
use crate::xmpp::{peek, sasl, stream};

/// How long the proxy waits for the node's `</stream:stream>` after the
/// client closed, before it closes the node connection itself.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Most SASL attempts on one stream before the proxy closes it.
const MAX_AUTH_ATTEMPTS: u32 = 5;

/// Capacity of a connection's control channel (evictions, injected stanzas).
const CONTROL_QUEUE: usize = 16;

/// How a connection ended, for the log.
#[derive(Debug)]
enum End {
    /// The client closed its stream (or the TCP connection).
    ClientClosed,
    /// The node closed the stream.
    NodeClosed,
    /// Evicted by the proxy (move, failover).
    Evicted,
    /// The proxy is shutting down.
    Shutdown,
    /// An error that was reported to the client (stream error) or that
    /// made further talk impossible.
    Error(ConnError),
}

/// What went wrong, and on which side.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("client: {0}")]
    Client(String),
    #[error("client sent bad XML: {0}")]
    ClientXml(FrameError),
    #[error("node: {0}")]
    Node(String),
    #[error("timeout: {0}")]
    Timeout(&'static str),
}

/// One accepted client connection.
pub struct ClientConnection {
    /// Proxy-wide unique id, the key of the tracker entry.
    id: ConnId,
    /// The client's address, for the log.
    peer: SocketAddr,
    /// Whether the connection came in on the direct-TLS listener.
    direct_tls: bool,
    /// Everything shared by all connections.
    shared: Arc<Shared>,
    /// Flips to `true` when the proxy shuts down.
    shutdown: watch::Receiver<bool>,
    /// End of the pre-auth allowance (until the `<auth>` is forwarded).
    deadline: Option<tokio::time::Instant>,
}

/// What pre-auth produced: a TLS client stream and the opened node stream
/// with the `<auth>` already forwarded.
struct Authenticating {
    client: BoxStream,
    client_buf: BytesMut,
    client_framer: Framer,
    node: NodeStream,
    node_index: NodeIndex,
    home: NodeIndex,
    bare: String,
}

impl ClientConnection {
    /// A connection ready to run.
    pub fn new(
        id: ConnId,
        peer: SocketAddr,
        direct_tls: bool,
        shared: Arc<Shared>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        ClientConnection {
            id,
            peer,
            direct_tls,
            shared,
            shutdown,
            deadline: None,
        }
    }

    /// Serves the connection to its end. Never panics on peer input; every
    /// problem ends in a stream error to the client or a closed connection.
    pub async fn run(mut self, tcp: TcpStream) {
        let span = tracing::info_span!(
            "conn",
            conn.id = self.id,
            client.addr = %self.peer,
            tls = if self.direct_tls { "direct" } else { "starttls" },
            user = tracing::field::Empty,
        );
        let shared = self.shared.clone();
        shared
            .metrics
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        let end = self.serve(tcp).instrument(span.clone()).await;
        shared.tracker.on_close(self.id);
        shared
            .metrics
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        let _enter = span.enter();
        match end {
            End::Error(ConnError::Node(e)) => warn!(error = %e, "connection closed: node error"),
            End::Error(e) => info!(error = %e, "connection closed"),
            other => debug!(end = ?other, "connection closed"),
        }
    }

    async fn serve(&mut self, tcp: TcpStream) -> End {
        let _ = tcp.set_nodelay(true);
        self.deadline =
            Some(tokio::time::Instant::now() + self.shared.config.limits.pre_auth_timeout);
        match self.pre_auth(tcp).await {
            Ok(a) => {
                self.deadline = None;
                self.relay(a).await
            }
            Err(end) => end,
        }
    }

    /// Phases 1–4. On failure the client has been told (where possible).
    async fn pre_auth(&mut self, mut tcp: TcpStream) -> Result<Authenticating, End> {
        let limits = &self.shared.config.limits;
        let max = limits.max_stanza_bytes;
        let mut framer = Framer::new(max);
        let mut buf = BytesMut::with_capacity(1024);
        let acceptor;
        if self.direct_tls {
            acceptor = TlsAcceptor::from(self.shared.tls.direct.clone());
        } else {
            // Plain stream: header, features with STARTTLS required, <starttls/>.
            let (hdr, _) = self
                .expect_header(&mut tcp, &mut buf, &mut framer, false)
                .await?;
            let domain = self.pick_domain(&mut tcp, &hdr, false).await?;
            let mut out = stream::server_header(&domain, &stream_id());
            out.push_str(stream::features_starttls());
            write(&mut tcp, out.as_bytes()).await?;
            let (kind, frame) = self
                .next_frame(&mut tcp, &mut buf, &mut framer, true)
                .await?;
            if kind == FrameKind::Close {
                let _ = tcp.write_all(b"</stream:stream>").await;
                return Err(End::ClientClosed);
            }
            let f = peek::element_name(&frame);
            if f != b"starttls" || !peek::contains(&frame, stream::NS_TLS.as_bytes()) {
                let e =
                    stream::stream_error("policy-violation", Some("STARTTLS is required"), None);
                let _ = tcp.write_all(e.as_bytes()).await;
                return Err(End::Error(ConnError::Client("no STARTTLS".into())));
            }
            if !buf.is_empty() {
                // Bytes pipelined after <starttls/> would be trusted as if
                // they came over TLS: refuse them (STARTTLS injection).
                let e =
                    stream::stream_error("policy-violation", Some("data after <starttls/>"), None);
                let _ = tcp.write_all(e.as_bytes()).await;
                return Err(End::Error(ConnError::Client("data after starttls".into())));
            }
            write(&mut tcp, stream::PROCEED.as_bytes()).await?;
            acceptor = TlsAcceptor::from(self.shared.tls.starttls.clone());
        }
        let tls = match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp))
            .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(End::Error(ConnError::Client(format!("TLS handshake: {e}")))),
            Err(_) => return Err(End::Error(ConnError::Timeout("TLS handshake"))),
        };
        let mut client: BoxStream = Box::new(tls);
        framer.reset();
        buf.clear();

        // TLS stream: header, SASL features, <auth>.
        let (hdr, _) = self
            .expect_header(&mut client, &mut buf, &mut framer, true)
            .await?;
        let domain = self.pick_domain(&mut client, &hdr, true).await?;
        let mechanisms = self.shared.mechanisms();
        let mut out = stream::server_header(&domain, &stream_id());
        out.push_str(&stream::features_sasl(&mechanisms, max, None));
        write(&mut client, out.as_bytes()).await?;
        let from_jid = hdr
            .from
            .as_deref()
            .filter(|f| f.contains('@'))
            .map(|f| sasl::bare_jid(f, &domain));

        let mut attempts = 0;
        loop {
            attempts += 1;
            if attempts > MAX_AUTH_ATTEMPTS {
                let e = stream::stream_error(
                    "policy-violation",
                    Some("too many authentication attempts"),
                    None,
                );
                let _ = client.write_all(e.as_bytes()).await;
                return Err(End::Error(ConnError::Client(
                    "too many auth attempts".into(),
                )));
            }
            let (kind, frame) = self
                .next_frame(&mut client, &mut buf, &mut framer, true)
                .await?;
            if kind == FrameKind::Close {
                let _ = client.write_all(b"</stream:stream>").await;
                return Err(End::ClientClosed);
            }
            let head_end = peek::head_end(&frame);
            let name = peek::element_name(&frame);
            if name != b"auth" || !peek::contains(&frame[..head_end], stream::NS_SASL.as_bytes()) {
                let (cond, text) = if name == b"starttls" {
                    ("policy-violation", "TLS is already established")
                } else {
                    ("not-authorized", "authenticate first")
                };
                let e = stream::stream_error(cond, Some(text), None);
                let _ = client.write_all(e.as_bytes()).await;
                return Err(End::Error(ConnError::Client(format!(
                    "<{}> before authentication",
                    String::from_utf8_lossy(name)
                ))));
            }
            let mechanism = peek::attr(&frame[..head_end], b"mechanism")
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            if !mechanisms.contains(&mechanism) {
                let f = stream::sasl_failure("invalid-mechanism", Some("mechanism not offered"));
                write(&mut client, f.as_bytes()).await?;
                continue;
            }
            // The initial response; ask for it when the client left it out.
            let mut auth = frame;
            let mut payload = sasl::decode_payload(
                std::str::from_utf8(stream::element_text(&auth, head_end)).unwrap_or("!"),
            );
            if payload == Err(sasl::IdentifyError::NoInitialResponse)
                && sasl::names_user(&mechanism)
            {
                write(&mut client, stream::EMPTY_CHALLENGE.as_bytes()).await?;
                let (_, resp) = self
                    .next_frame(&mut client, &mut buf, &mut framer, true)
                    .await?;
                if peek::element_name(&resp) != b"response" {
                    let f = stream::sasl_failure("malformed-request", Some("expected <response/>"));
                    write(&mut client, f.as_bytes()).await?;
                    continue;
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
            let bare = match (&from_jid, &payload) {
                (Some(j), _) => Ok(j.clone()),
                (None, Ok(p)) => sasl::identify(&mechanism, p, &domain),
                (None, Err(e)) => Err(e.clone()),
            };
            let bare = match bare {
                Ok(b) => b,
                Err(e) => {
                    debug!(error = %e, "cannot identify the user");
                    let cond = match e {
                        sasl::IdentifyError::UnsupportedMechanism(_) => "invalid-mechanism",
                        _ => "malformed-request",
                    };
                    let f = stream::sasl_failure(cond, Some(&e.to_string()));
                    write(&mut client, f.as_bytes()).await?;
                    continue;
                }
            };
            tracing::Span::current().record("user", bare.as_str());
            let home = match self.shared.assignment.home(&bare) {
                Ok(h) => h,
                Err(AssignError::NotAssigned(_)) => {
                    let text = format!("user {bare} is not assigned to a node");
                    info!(user = %bare, "login refused: not assigned");
                    let f = stream::sasl_failure("not-authorized", Some(&text));
                    write(&mut client, f.as_bytes()).await?;
                    continue;
                }
            };
            let Some(node_index) = self.shared.routing.serving(home) else {
                info!(user = %bare, home, "login refused: no node serves this user now");
                let f = stream::sasl_failure(
                    "temporary-auth-failure",
                    Some("no node of the group can serve this user now; try again later"),
                );
                write(&mut client, f.as_bytes()).await?;
                continue;
            };
            let upstream = self.shared.upstreams[node_index].clone();
            let mut node = match upstream
                .open(
                    &self.shared.dns,
                    &domain,
                    max,
                    limits.upstream_connect_timeout,
                )
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    warn!(user = %bare, node = %upstream.name, error = %e, "node unavailable");
                    self.shared.note_node_failure(node_index);
                    let f = stream::sasl_failure(
                        "temporary-auth-failure",
                        Some("the user's node is not reachable; try again later"),
                    );
                    write(&mut client, f.as_bytes()).await?;
                    continue;
                }
            };
            if let Err(e) = node.io.write_all(&auth).await {
                return Err(self
                    .fail_node(&mut client, format!("forwarding <auth>: {e}"))
                    .await);
            }
            debug!(user = %bare, node = %upstream.name, node.addr = %node.addr, "routed");
            self.shared
                .metrics
                .logins_routed
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Authenticating {
                client,
                client_buf: buf,
                client_framer: framer,
                node,
                node_index,
                home,
                bare,
            });
        }
    }

    /// Reads the client's stream header; answers bad ones with a stream error.
    async fn expect_header<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        buf: &mut BytesMut,
        framer: &mut Framer,
        tls: bool,
    ) -> Result<(stream::StreamHeader, ()), End> {
        let (kind, frame) = self.next_frame(io, buf, framer, false).await?;
        let header = match (kind, stream::parse_header(&frame)) {
            (FrameKind::Header, Ok(h)) => h,
            _ => {
                let e = format!(
                    "{}{}",
                    stream::server_header(&self.shared.config.group.domains[0], &stream_id()),
                    stream::stream_error(
                        "invalid-namespace",
                        Some("expected an XMPP stream header"),
                        None
                    )
                );
                let _ = io.write_all(e.as_bytes()).await;
                return Err(End::Error(ConnError::Client("bad stream header".into())));
            }
        };
        if !header.version_ok() {
            let e = format!(
                "{}{}",
                stream::server_header(&self.shared.config.group.domains[0], &stream_id()),
                stream::stream_error("unsupported-version", Some("XMPP 1.0 is required"), None)
            );
            let _ = io.write_all(e.as_bytes()).await;
            return Err(End::Error(ConnError::Client(format!(
                "stream version {:?} (tls: {tls})",
                header.version
            ))));
        }
        Ok((header, ()))
    }

    /// The served domain the client asked for, or a `<host-unknown/>` error.
    async fn pick_domain<S: AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        hdr: &stream::StreamHeader,
        _tls: bool,
    ) -> Result<String, End> {
        let domains = &self.shared.config.group.domains;
        match &hdr.to {
            None => Ok(domains[0].clone()),
            Some(to) => {
                let to = to.to_ascii_lowercase();
                if domains.iter().any(|d| d.eq_ignore_ascii_case(&to)) {
                    Ok(to)
                } else {
                    let e = format!(
                        "{}{}",
                        stream::server_header(&domains[0], &stream_id()),
                        stream::stream_error(
                            "host-unknown",
                            Some("this proxy does not serve that domain"),
                            None
                        )
                    );
                    let _ = io.write_all(e.as_bytes()).await;
                    Err(End::Error(ConnError::Client(format!("host-unknown {to}"))))
                }
            }
        }
    }

    /// The next non-whitespace frame; framing errors become stream errors
    /// (the proxy's header has been sent when `header_sent`).
    async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        buf: &mut BytesMut,
        framer: &mut Framer,
        header_sent: bool,
    ) -> Result<(FrameKind, BytesMut), End> {
        loop {
            match framer.next(buf) {
                Ok(Some(f)) => {
                    let bytes = buf.split_to(f.len);
                    if f.kind != FrameKind::Whitespace {
                        return Ok((f.kind, bytes));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let mut out = String::new();
                    if !header_sent {
                        out.push_str(&stream::server_header(
                            &self.shared.config.group.domains[0],
                            &stream_id(),
                        ));
                    }
                    out.push_str(&frame_error_xml(&e));
                    let _ = io.write_all(out.as_bytes()).await;
                    return Err(End::Error(ConnError::ClientXml(e)));
                }
            }
            buf.reserve(self.shared.config.limits.read_buffer_bytes);
            let deadline = self
                .deadline
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let mut shutdown = self.shutdown.clone();
            let stop = tokio::select! {
                r = tokio::time::timeout_at(deadline, io.read_buf(buf)) => match r {
                    Ok(Ok(0)) => return Err(End::ClientClosed),
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return Err(End::Error(ConnError::Client(format!("read: {e}")))),
                    Err(_) => None,
                },
                _ = wait_shutdown(&mut shutdown) => Some(()),
            };
            let mut out = String::new();
            if !header_sent {
                out.push_str(&stream::server_header(
                    &self.shared.config.group.domains[0],
                    &stream_id(),
                ));
            }
            let end = if stop.is_some() {
                out.push_str(&stream::stream_error(
                    "system-shutdown",
                    Some("the proxy is shutting down; reconnect"),
                    None,
                ));
                End::Shutdown
            } else {
                out.push_str(&stream::stream_error(
                    "connection-timeout",
                    Some("authentication took too long"),
                    None,
                ));
                End::Error(ConnError::Timeout("pre-auth"))
            };
            let _ = io.write_all(out.as_bytes()).await;
            let _ = io.shutdown().await;
            return Err(end);
        }
    }

    async fn fail_node(&self, client: &mut BoxStream, what: String) -> End {
        let e = stream::stream_error(
            "remote-connection-failed",
            Some("the user's node closed the connection"),
            None,
        );
        let _ = client.write_all(e.as_bytes()).await;
        End::Error(ConnError::Node(what))
    }

    /// Phase 5: relay both ways until an end.
    async fn relay(&mut self, a: Authenticating) -> End {
        let Authenticating {
            client,
            client_buf,
            client_framer,
            node,
            node_index,
            home,
            bare,
        } = a;
        let span = tracing::Span::current();
        span.record("user", bare.as_str());
        let node_name = self.shared.upstreams[node_index].name.clone();
        let (ctrl_tx, ctrl_rx) = mpsc::channel(CONTROL_QUEUE);
        let (cr, cw) = tokio::io::split(client);
        let (nr, nw) = tokio::io::split(node.io);
        let cw = Arc::new(Mutex::new(cw));
        let read_size = self.shared.config.limits.read_buffer_bytes;
        let up = ClientToNode {
            conn: self.id,
            shared: self.shared.clone(),
            reader: cr,
            buf: client_buf,
            framer: client_framer,
            node: nw,
            client: cw.clone(),
            read_size,
        };
        let down = NodeToClient {
            shared: self.shared.clone(),
            reader: nr,
            buf: node.buf,
            // The node's pre-auth header was consumed by the proxy: its
            // stanzas (challenge, success) frame inside the open stream.
            framer: Framer::in_open_stream(self.shared.config.limits.max_stanza_bytes),
            client: cw,
            control: ctrl_rx,
            shutdown: self.shutdown.clone(),
            node_index,
            peek: BindWatch {
                conn: self.id,
                shared: self.shared.clone(),
                control_tx: ctrl_tx,
                home,
                node_index,
                bound: false,
            },
            read_size,
        };
        // The node's stream is open already; its next header comes after
        // SASL success and is relayed like everything else.
        let mut down_fut = Box::pin(down.run());
        let mut up_fut = Box::pin(up.run());
        debug!(node = %node_name, "relaying");
        tokio::select! {
            end = &mut up_fut => match end {
                End::ClientClosed => {
                    // Give the node time to answer the close.
                    match tokio::time::timeout(CLOSE_WAIT, &mut down_fut).await {
                        Ok(_) => End::ClientClosed,
                        Err(_) => End::ClientClosed,
                    }
                }
                other => other,
            },
            end = &mut down_fut => end,
        }
    }
}

/// The client → node pump.
struct ClientToNode {
    conn: ConnId,
    shared: Arc<Shared>,
    reader: ReadHalf<BoxStream>,
    buf: BytesMut,
    framer: Framer,
    node: WriteHalf<BoxStream>,
    client: Arc<Mutex<WriteHalf<BoxStream>>>,
    read_size: usize,
}

impl ClientToNode {
    async fn run(mut self) -> End {
        loop {
            // Frame everything complete, forward it in one write.
            let Batch {
                ready,
                stanzas,
                closed,
            } = match scan(&mut self.framer, &self.buf, |frame, f| {
                observe_up(&self.shared, self.conn, frame, f)
            }) {
                Ok(b) => b,
                Err((ready, e)) => {
                    // Forward what was complete, then tell the client.
                    let _ = self.node.write_all(&self.buf[..ready]).await;
                    let _ = self.node.write_all(b"</stream:stream>").await;
                    close_client(&self.client, &[frame_error_xml(&e).as_bytes()]).await;
                    return End::Error(ConnError::ClientXml(e));
                }
            };
            if ready > 0 {
                if let Err(e) = self.node.write_all(&self.buf[..ready]).await {
                    return End::Error(ConnError::Node(format!("write: {e}")));
                }
                self.buf.advance(ready);
                let m = &self.shared.metrics;
                m.bytes_up.fetch_add(ready as u64, Ordering::Relaxed);
                m.stanzas_up.fetch_add(stanzas, Ordering::Relaxed);
            }
            if closed {
                let _ = self.node.flush().await;
                return End::ClientClosed;
            }
            self.buf.reserve(self.read_size);
            match self.reader.read_buf(&mut self.buf).await {
                Ok(0) => {
                    let _ = self.node.write_all(b"</stream:stream>").await;
                    return End::ClientClosed;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = self.node.write_all(b"</stream:stream>").await;
                    return End::Error(ConnError::Client(format!("read: {e}")));
                }
            }
        }
    }
}

/// The node → client pump; also the connection's control point (evictions,
/// injected stanzas, shutdown).
struct NodeToClient {
    shared: Arc<Shared>,
    reader: ReadHalf<BoxStream>,
    buf: BytesMut,
    framer: Framer,
    client: Arc<Mutex<WriteHalf<BoxStream>>>,
    control: mpsc::Receiver<Control>,
    shutdown: watch::Receiver<bool>,
    node_index: NodeIndex,
    peek: BindWatch,
    read_size: usize,
}

/// Watches node stanzas for the bind result.
struct BindWatch {
    conn: ConnId,
    shared: Arc<Shared>,
    control_tx: mpsc::Sender<Control>,
    home: NodeIndex,
    node_index: NodeIndex,
    bound: bool,
}

impl NodeToClient {
    async fn run(mut self) -> End {
        let mut shutdown = self.shutdown.clone();
        loop {
            // Relay whatever is complete.
            let peek = &mut self.peek;
            let Batch {
                ready,
                stanzas,
                closed,
            } = match scan(&mut self.framer, &self.buf, |frame, f| {
                peek.observe(frame, f)
            }) {
                Ok(b) => b,
                Err((ready, e)) => {
                    warn!(error = %e, "node sent bad XML");
                    let x = stream::stream_error(
                        "internal-server-error",
                        Some("the node sent invalid XML"),
                        None,
                    );
                    close_client(&self.client, &[&self.buf[..ready], x.as_bytes()]).await;
                    return End::Error(ConnError::Node(e.to_string()));
                }
            };
            if ready > 0 {
                let mut c = self.client.lock().await;
                if let Err(e) = c.write_all(&self.buf[..ready]).await {
                    return End::Error(ConnError::Client(format!("write: {e}")));
                }
                if closed {
                    let _ = c.flush().await;
                    let _ = c.shutdown().await;
                }
                drop(c);
                self.buf.advance(ready);
                let m = &self.shared.metrics;
                m.bytes_down.fetch_add(ready as u64, Ordering::Relaxed);
                m.stanzas_down.fetch_add(stanzas, Ordering::Relaxed);
            }
            if closed {
                return End::NodeClosed;
            }
            self.buf.reserve(self.read_size);
            tokio::select! {
                r = self.reader.read_buf(&mut self.buf) => match r {
                    Ok(0) => return self.node_gone("the node closed the connection").await,
                    Ok(_) => {}
                    Err(e) => return self.node_gone(&format!("read: {e}")).await,
                },
                Some(ctrl) = self.control.recv() => match ctrl {
                    Control::Evict(xml) => {
                        close_client(&self.client, &[xml.as_bytes()]).await;
                        return End::Evicted;
                    }
                    Control::Inject(bytes) => {
                        let mut c = self.client.lock().await;
                        if let Err(e) = c.write_all(&bytes).await {
                            return End::Error(ConnError::Client(format!("write: {e}")));
                        }
                    }
                },
                _ = wait_shutdown(&mut shutdown) => {
                    let x = stream::stream_error("system-shutdown", Some("the proxy is shutting down; reconnect"), None);
                    close_client(&self.client, &[x.as_bytes()]).await;
                    return End::Shutdown;
                }
            }
        }
    }

    async fn node_gone(&mut self, why: &str) -> End {
        self.shared.note_node_failure(self.node_index);
        let x = stream::stream_error(
            "remote-connection-failed",
            Some("the connection to the user's node was lost; reconnect"),
            None,
        );
        close_client(&self.client, &[x.as_bytes()]).await;
        End::Error(ConnError::Node(why.to_string()))
    }
}

impl BindWatch {
    /// Tracker peek at a node stanza: the bind result.
    fn observe(&mut self, frame: &[u8], f: &Frame) {
        if self.bound || f.name(frame) != b"iq" {
            return;
        }
        let head = &frame[..f.head_end];
        if peek::attr(head, b"type") != Some(b"result")
            || !peek::contains(frame, b"urn:ietf:params:xml:ns:xmpp-bind")
        {
            return;
        }
        if let Some(jid) = peek::child_text(frame, b"jid") {
            let full = peek::unescape(jid);
            self.shared.tracker.on_bind(
                &full,
                self.home,
                self.node_index,
                self.conn,
                self.control_tx.clone(),
            );
            self.bound = true;
            debug!(jid = %full, "bound");
        }
    }
}

/// Tracker peek at a client stanza: broadcast presence.
fn observe_up(shared: &Shared, conn: ConnId, frame: &[u8], f: &Frame) {
    if let Some(p) = Presence::peek(frame, f) {
        shared.tracker.on_presence(conn, p);
    }
}

/// What one scan of a read buffer found.
struct Batch {
    /// Bytes of complete frames, ready to forward.
    ready: usize,
    /// Stanzas among them (counted here, added to the shared metrics once
    /// per batch rather than once per stanza).
    stanzas: u64,
    /// Whether the stream close was among them (nothing after it counts).
    closed: bool,
}

/// Frames everything complete in `buf`, calling `observe` for each stanza.
/// On error, returns the bytes ready before it and the error.
fn scan(
    framer: &mut Framer,
    buf: &[u8],
    mut observe: impl FnMut(&[u8], &Frame),
) -> Result<Batch, (usize, FrameError)> {
    let mut b = Batch {
        ready: 0,
        stanzas: 0,
        closed: false,
    };
    loop {
        match framer.next(&buf[b.ready..]) {
            Ok(Some(f)) => {
                if f.kind == FrameKind::Stanza {
                    observe(&buf[b.ready..b.ready + f.len], &f);
                    b.stanzas += 1;
                }
                b.ready += f.len;
                if f.kind == FrameKind::Close {
                    b.closed = true;
                    return Ok(b);
                }
            }
            Ok(None) => return Ok(b),
            Err(e) => return Err((b.ready, e)),
        }
    }
}

/// Writes the parts to the client, then flushes and closes its side.
async fn close_client(client: &Mutex<WriteHalf<BoxStream>>, parts: &[&[u8]]) {
    let mut c = client.lock().await;
    for p in parts {
        let _ = c.write_all(p).await;
    }
    let _ = c.flush().await;
    let _ = c.shutdown().await;
}

/// The stream error for a framing error.
pub fn frame_error_xml(e: &FrameError) -> String {
    match e {
        FrameError::NotWellFormed(why) => stream::stream_error("not-well-formed", Some(why), None),
        FrameError::Restricted(what) => stream::stream_error(
            "restricted-xml",
            Some(&format!("{what} is not allowed in XMPP")),
            None,
        ),
        FrameError::TooLarge { limit } => stream::stream_error(
            "policy-violation",
            Some(&format!("stanza exceeds the limit of {limit} bytes")),
            None,
        ),
    }
}

async fn write<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> Result<(), End> {
    io.write_all(bytes)
        .await
        .map_err(|e| End::Error(ConnError::Client(format!("write: {e}"))))
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
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

fn stream_id() -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    format!("{n:032x}")
}
