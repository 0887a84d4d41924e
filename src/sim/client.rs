//! A small XMPP client for tests, the demo and benches: plain, STARTTLS or
//! direct TLS, SASL PLAIN / SCRAM-SHA-1, bind, roster, presence, messages,
//! ping. It speaks the standard wire protocol, so it works against the
//! simulated node, through the proxy and against a real server (Prosody).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use super::reconnect::Relogin;
use super::scram::ScramClient;
use super::stream::Io;
use super::xml::{esc, local_name, parse_element, parse_start, Element, Frame, Framer};

/// How the client secures the connection.
#[derive(Clone)]
pub enum ClientTls {
    /// Plain TCP.
    None,
    /// STARTTLS after the first stream features.
    StartTls {
        /// rustls client configuration.
        config: Arc<rustls::ClientConfig>,
        /// Name to verify the certificate against (SNI).
        server_name: String,
    },
    /// Direct TLS (XEP-0368) with ALPN `xmpp-client`.
    Direct {
        /// rustls client configuration (ALPN is set by the client).
        config: Arc<rustls::ClientConfig>,
        /// Name to verify the certificate against (SNI).
        server_name: String,
    },
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientTls::None => f.write_str("None"),
            ClientTls::StartTls { server_name, .. } => write!(f, "StartTls({server_name})"),
            ClientTls::Direct { server_name, .. } => write!(f, "Direct({server_name})"),
        }
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS setup or handshake error.
    #[error("tls error: {0}")]
    Tls(String),
    /// Nothing arrived in time.
    #[error("timeout")]
    Timeout,
    /// The server closed the stream or the connection.
    #[error("stream closed")]
    Closed,
    /// The server sent a stream error.
    #[error("stream error <{condition}/>{}", text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
    StreamError {
        /// Condition element name, e.g. `policy-violation`.
        condition: String,
        /// The `<text/>`, if any.
        text: Option<String>,
        /// The raw `<stream:error>` XML (with any application-specific child).
        raw: String,
    },
    /// SASL `<failure/>`.
    #[error("sasl failure <{condition}/>{}", text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
    SaslFailure {
        /// Condition element name, e.g. `not-authorized`.
        condition: String,
        /// The `<text/>`, if any.
        text: Option<String>,
        /// The raw `<failure>` XML (with any application-specific child).
        raw: String,
    },
    /// Unexpected protocol element or content.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The re-login hint carried by a stream error or a SASL failure, if any
    /// (see [`Relogin::parse`]).
    pub fn relogin(&self) -> Option<Relogin> {
        match self {
            ClientError::StreamError { raw, .. } | ClientError::SaslFailure { raw, .. } => {
                Relogin::parse(raw)
            }
            _ => None,
        }
    }
}

/// One received top-level element.
#[derive(Debug, Clone)]
pub struct Stanza {
    /// Local element name (`message`, `presence`, `iq`, `features`, ...).
    pub name: String,
    /// Attributes (qualified names, unescaped values).
    pub attrs: Vec<(String, String)>,
    /// The element exactly as received.
    pub raw: String,
}

impl Stanza {
    fn from_raw(raw: Bytes) -> Result<Stanza, ClientError> {
        let (name, attrs) = parse_start(&raw)
            .map_err(|e| ClientError::Protocol(format!("bad element: {}", e.condition())))?;
        let raw = String::from_utf8(raw.to_vec())
            .map_err(|_| ClientError::Protocol("invalid UTF-8".into()))?;
        Ok(Stanza {
            name: local_name(&name).to_owned(),
            attrs,
            raw,
        })
    }

    fn tree(&self) -> Option<Element> {
        parse_element(self.raw.as_bytes()).ok()
    }

    /// Attribute value.
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    /// Text of the `<body/>` child.
    pub fn body(&self) -> Option<String> {
        self.tree()?.child("body").map(|b| b.text.clone())
    }

    /// Text of the first descendant element with this local name.
    pub fn child_text(&self, name: &str) -> Option<String> {
        self.tree()?.find(name).map(|b| b.text.clone())
    }

    /// Whether a descendant element with this local name exists.
    pub fn has_child(&self, name: &str) -> bool {
        self.tree().is_some_and(|t| t.find(name).is_some())
    }

    /// A temporary presence push (a headline message with a pubsub#event
    /// for `http://webex.com/connect/temp-presence`): its item and the
    /// presence it carries.
    pub fn temp_presence(&self) -> Option<TempPush> {
        if self.name != "message" || self.attr("type") != Some("headline") {
            return None;
        }
        let t = self.tree()?;
        let items = t.find("event")?.child("items")?;
        if items.attr("node") != Some(super::node::NS_TEMP_PRESENCE) {
            return None;
        }
        let item = items.child("item")?;
        let p = item.child("presence")?;
        Some(TempPush {
            target: self.attr("from").unwrap_or("").to_owned(),
            item: item.attr("id").unwrap_or("").to_owned(),
            available: p.attr("type").is_none(),
            show: p.child("show").map(|s| s.text.clone()),
            status: p.child("status").map(|s| s.text.clone()),
        })
    }

    /// The caps `node#ver` of a disco#info query (an iq get), if it is one.
    pub fn disco_info_node(&self) -> Option<String> {
        if self.name != "iq" || self.attr("type") != Some("get") {
            return None;
        }
        let t = self.tree()?;
        let q = t.child("query")?;
        if q.ns() != Some("http://jabber.org/protocol/disco#info") {
            return None;
        }
        q.attr("node").map(str::to_owned)
    }
}

/// What a temporary presence push says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TempPush {
    /// The target's bare JID (the message's `from`).
    pub target: String,
    /// The item id: the target's full JID (bare when it is offline).
    pub item: String,
    /// Whether the presence is available.
    pub available: bool,
    /// Its `<show/>`.
    pub show: Option<String>,
    /// Its `<status/>`.
    pub status: Option<String>,
}

/// A test/demo XMPP client connection.
pub struct SimClient {
    io: Box<dyn Io>,
    framer: Framer,
    domain: String,
    from: Option<String>,
    features: String,
    mechanisms: Vec<String>,
    pending: VecDeque<Stanza>,
    jid: Option<String>,
    next_id: u64,
    closed: bool,
    /// The server sent `</stream:stream>`.
    stream_closed: bool,
    local: Option<SocketAddr>,
}

impl std::fmt::Debug for SimClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimClient")
            .field("domain", &self.domain)
            .field("jid", &self.jid)
            .finish()
    }
}

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const MAX_STANZA: usize = 4 << 20;

impl SimClient {
    /// Connect, open the stream (doing STARTTLS or direct TLS if asked) and read the features.
    pub async fn connect(
        addr: SocketAddr,
        domain: &str,
        tls: ClientTls,
    ) -> Result<SimClient, ClientError> {
        Self::connect_with(addr, domain, tls, None).await
    }

    /// Like [`SimClient::connect`], with a `from` on the stream headers: on
    /// every header except the pre-TLS one of a STARTTLS connection (RFC 6120
    /// §4.7.1), i.e. also on the restart after SASL.
    pub async fn connect_with(
        addr: SocketAddr,
        domain: &str,
        tls: ClientTls,
        from: Option<&str>,
    ) -> Result<SimClient, ClientError> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let mut c = SimClient {
            local,
            io: Box::new(tcp),
            framer: Framer::new(MAX_STANZA),
            domain: domain.to_owned(),
            from: from.map(str::to_owned),
            features: String::new(),
            mechanisms: Vec::new(),
            pending: VecDeque::new(),
            jid: None,
            next_id: 1,
            closed: false,
            stream_closed: false,
        };
        match tls {
            ClientTls::None => c.open_stream(true).await?,
            ClientTls::Direct {
                config,
                server_name,
            } => {
                let mut cfg = (*config).clone();
                cfg.alpn_protocols = vec![b"xmpp-client".to_vec()];
                c.upgrade(Arc::new(cfg), &server_name).await?;
                c.open_stream(true).await?;
            }
            ClientTls::StartTls {
                config,
                server_name,
            } => {
                c.open_stream(false).await?;
                if !c.features.contains("urn:ietf:params:xml:ns:xmpp-tls") {
                    return Err(ClientError::Tls("server does not offer STARTTLS".into()));
                }
                c.send_raw("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                    .await?;
                let s = c.next_element(SETUP_TIMEOUT).await?;
                if s.name != "proceed" {
                    return Err(ClientError::Tls(format!("STARTTLS refused: {}", s.raw)));
                }
                c.upgrade(config, &server_name).await?;
                c.open_stream(true).await?;
            }
        }
        Ok(c)
    }

    async fn upgrade(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<(), ClientError> {
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let old = std::mem::replace(&mut self.io, Box::new(super::stream::Dead));
        let tcp = old
            .into_tcp()
            .ok_or_else(|| ClientError::Tls("already TLS".into()))?;
        let tls =
            tokio::time::timeout(SETUP_TIMEOUT, TlsConnector::from(config).connect(name, tcp))
                .await
                .map_err(|_| ClientError::Timeout)?
                .map_err(|e| ClientError::Tls(e.to_string()))?;
        self.io = Box::new(tls);
        self.framer.clear();
        Ok(())
    }

    /// Send a stream header and read the answer header and features.
    async fn open_stream(&mut self, with_from: bool) -> Result<(), ClientError> {
        let from = match (&self.from, with_from) {
            (Some(f), true) => format!(" from='{}'", esc(f)),
            _ => String::new(),
        };
        let header = format!(
            "<?xml version='1.0'?><stream:stream to='{}'{from} version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
            esc(&self.domain)
        );
        self.framer.reset();
        self.write(header.as_bytes()).await?;
        let deadline = Instant::now() + SETUP_TIMEOUT;
        match self.next_frame(deadline).await? {
            Frame::StreamOpen(_) => {}
            Frame::StreamClose => return Err(ClientError::Closed),
            Frame::Element(raw) => {
                let s = Stanza::from_raw(raw)?;
                check_stream_error(&s)?;
                return Err(ClientError::Protocol(format!(
                    "expected stream header, got {}",
                    s.raw
                )));
            }
        }
        let f = self
            .next_element(deadline.saturating_duration_since(Instant::now()))
            .await?;
        if f.name != "features" {
            return Err(ClientError::Protocol(format!(
                "expected features, got {}",
                f.raw
            )));
        }
        let tree = f
            .tree()
            .ok_or_else(|| ClientError::Protocol("bad features".into()))?;
        self.mechanisms = tree
            .child("mechanisms")
            .map(|m| {
                m.children
                    .iter()
                    .filter(|c| c.local() == "mechanism")
                    .map(|c| c.text.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        self.features = f.raw;
        Ok(())
    }

    /// Set the `from` of later stream headers.
    pub fn set_stream_from(&mut self, jid: Option<String>) {
        self.from = jid;
    }

    /// SASL mechanisms of the latest features.
    pub fn mechanisms(&self) -> Vec<String> {
        self.mechanisms.clone()
    }

    /// Raw XML of the latest `<stream:features>`.
    pub fn features_raw(&self) -> &str {
        &self.features
    }

    /// The client's own address on its connection to the proxy.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The bound full JID, once bound.
    pub fn jid(&self) -> Option<&str> {
        self.jid.as_deref()
    }

    /// Authenticate (`PLAIN` or `SCRAM-SHA-1`), restart the stream and read the new features.
    pub async fn login(
        &mut self,
        user: &str,
        password: &str,
        mechanism: &str,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        match mechanism {
            "PLAIN" => {
                let ir = B64.encode(format!("\0{user}\0{password}"));
                self.send_raw(&format!(
                    "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{ir}</auth>"
                ))
                .await?;
                let s = self.sasl_step(deadline).await?;
                if s.name != "success" {
                    return Err(ClientError::Protocol(format!(
                        "unexpected SASL answer {}",
                        s.raw
                    )));
                }
            }
            "SCRAM-SHA-1" => {
                let cnonce = B64.encode(rand::random::<[u8; 18]>());
                let mut sc = ScramClient::new(user, password, &cnonce);
                let first = B64.encode(sc.client_first());
                self.send_raw(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{first}</auth>")).await?;
                let s = self.sasl_step(deadline).await?;
                if s.name != "challenge" {
                    return Err(ClientError::Protocol(format!(
                        "expected challenge, got {}",
                        s.raw
                    )));
                }
                let server_first = decode_text(&s)?;
                let fin = sc
                    .client_final(&server_first)
                    .map_err(|e| ClientError::Protocol(format!("bad SCRAM challenge: {e:?}")))?;
                self.send_raw(&format!(
                    "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                    B64.encode(fin)
                ))
                .await?;
                let mut s = self.sasl_step(deadline).await?;
                if s.name == "challenge" {
                    // Some servers send the server-final message as a challenge.
                    let v = decode_text(&s)?;
                    if !sc.verify_server_final(&v) {
                        return Err(ClientError::Protocol("server signature mismatch".into()));
                    }
                    self.send_raw("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
                        .await?;
                    s = self.sasl_step(deadline).await?;
                    if s.name != "success" {
                        return Err(ClientError::Protocol(format!(
                            "unexpected SASL answer {}",
                            s.raw
                        )));
                    }
                } else if s.name == "success" {
                    let v = decode_text(&s)?;
                    if !sc.verify_server_final(&v) {
                        return Err(ClientError::Protocol("server signature mismatch".into()));
                    }
                } else {
                    return Err(ClientError::Protocol(format!(
                        "unexpected SASL answer {}",
                        s.raw
                    )));
                }
            }
            other => {
                self.send_raw(&format!(
                    "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{}'>=</auth>",
                    esc(other)
                ))
                .await?;
                let s = self.sasl_step(deadline).await?;
                return Err(ClientError::Protocol(format!(
                    "mechanism {other} is not implemented by the client; server said {}",
                    s.raw
                )));
            }
        }
        self.open_stream(true).await
    }

    /// Logs in with SASL PLAIN naming an authorization identity (`authzid`)
    /// besides the authentication identity `user`.
    pub async fn login_plain_as(
        &mut self,
        authzid: &str,
        user: &str,
        password: &str,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let ir = B64.encode(format!("{authzid}\0{user}\0{password}"));
        self.send_raw(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{ir}</auth>"
        ))
        .await?;
        let s = self.sasl_step(deadline).await?;
        if s.name != "success" {
            return Err(ClientError::Protocol(format!(
                "unexpected SASL answer {}",
                s.raw
            )));
        }
        self.open_stream(true).await
    }

    /// Sends raw bytes and reads the SASL answer (`<failure>` becomes
    /// [`ClientError::SaslFailure`]).
    pub async fn sasl_raw(&mut self, xml: &str) -> Result<Stanza, ClientError> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        self.send_raw(xml).await?;
        self.sasl_step(deadline).await
    }

    /// Next SASL element; `<failure>` becomes [`ClientError::SaslFailure`].
    async fn sasl_step(&mut self, deadline: Instant) -> Result<Stanza, ClientError> {
        let s = self
            .next_element(deadline.saturating_duration_since(Instant::now()))
            .await?;
        if s.name == "failure" {
            let t = s.tree();
            // The defined condition: not `<text/>`, not an application
            // element in another namespace (e.g. a re-login hint).
            let condition = t
                .as_ref()
                .and_then(|t| {
                    t.children
                        .iter()
                        .find(|c| c.local() != "text" && c.ns().map_or(true, |ns| ns == NS_SASL))
                })
                .map(|c| c.local().to_owned())
                .unwrap_or_default();
            let text = t
                .as_ref()
                .and_then(|t| t.child("text"))
                .map(|c| c.text.clone());
            return Err(ClientError::SaslFailure {
                condition,
                text,
                raw: s.raw,
            });
        }
        Ok(s)
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("sim{}", self.next_id)
    }

    /// Wait for the iq result/error with this id, queueing other stanzas for [`SimClient::recv`].
    async fn iq_response(&mut self, id: &str, timeout: Duration) -> Result<Stanza, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self
                .next_element(deadline.saturating_duration_since(Instant::now()))
                .await?;
            if s.name == "iq"
                && s.attr("id") == Some(id)
                && matches!(s.attr("type"), Some("result" | "error"))
            {
                return Ok(s);
            }
            self.pending.push_back(s);
        }
    }

    async fn iq(&mut self, inner_and_attrs: &str, payload: &str) -> Result<Stanza, ClientError> {
        let id = self.new_id();
        let xml = if payload.is_empty() {
            format!("<iq id='{id}'{inner_and_attrs}/>")
        } else {
            format!("<iq id='{id}'{inner_and_attrs}>{payload}</iq>")
        };
        self.send_raw(&xml).await?;
        let r = self.iq_response(&id, SETUP_TIMEOUT).await?;
        if r.attr("type") == Some("error") {
            return Err(ClientError::Protocol(format!("iq error: {}", r.raw)));
        }
        Ok(r)
    }

    /// Bind a resource (empty: server-generated); then the session iq if offered.
    /// Returns the full JID.
    pub async fn bind(&mut self, resource: &str) -> Result<String, ClientError> {
        let res = if resource.is_empty() {
            String::new()
        } else {
            format!("<resource>{}</resource>", esc(resource))
        };
        let r = self
            .iq(
                " type='set'",
                &format!("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>{res}</bind>"),
            )
            .await?;
        let jid = r
            .child_text("jid")
            .map(|j| j.trim().to_owned())
            .ok_or_else(|| ClientError::Protocol(format!("bind result without jid: {}", r.raw)))?;
        let session = self
            .features
            .contains("urn:ietf:params:xml:ns:xmpp-session");
        let optional = self.features.contains("<optional/>") && session && {
            // The <optional/> inside <session>, not inside another feature.
            self.features
                .split("urn:ietf:params:xml:ns:xmpp-session")
                .nth(1)
                .is_some_and(|t| {
                    t.split("</session>")
                        .next()
                        .is_some_and(|s| s.contains("<optional/>"))
                })
        };
        if session && !optional {
            self.iq(
                " type='set'",
                "<session xmlns='urn:ietf:params:xml:ns:xmpp-session'/>",
            )
            .await?;
        }
        self.jid = Some(jid.clone());
        Ok(jid)
    }

    /// Fetch the roster; returns the item JIDs.
    pub async fn roster(&mut self) -> Result<Vec<String>, ClientError> {
        let r = self
            .iq(" type='get'", "<query xmlns='jabber:iq:roster'/>")
            .await?;
        let t = r
            .tree()
            .ok_or_else(|| ClientError::Protocol("bad roster".into()))?;
        Ok(t.child("query")
            .map(|q| {
                q.children
                    .iter()
                    .filter(|c| c.local() == "item")
                    .filter_map(|c| c.attr("jid").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Send broadcast presence with optional `<show/>` and `<status/>`.
    pub async fn send_presence(
        &mut self,
        show: Option<&str>,
        status: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut p = String::from("<presence>");
        if let Some(s) = show {
            p.push_str(&format!("<show>{}</show>", esc(s)));
        }
        if let Some(s) = status {
            p.push_str(&format!("<status>{}</status>", esc(s)));
        }
        p.push_str("</presence>");
        self.send_raw(&p).await
    }

    /// Temporary presence (Cisco Jabber): directed presence to `to`
    /// carrying XEP-0115 caps `caps_node` / `ver`. It subscribes when `ver`
    /// resolves to features with the temp-presence notify feature (answer
    /// the node's disco#info with [`SimClient::answer_disco`]), and
    /// unsubscribes otherwise.
    pub async fn send_caps_presence(
        &mut self,
        to: &str,
        caps_node: &str,
        ver: &str,
    ) -> Result<(), ClientError> {
        self.send_raw(&format!(
            "<presence to='{}'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='{}' ver='{}'/></presence>",
            esc(to),
            esc(caps_node),
            esc(ver)
        ))
        .await
    }

    /// Directed unavailable presence to `to` (ends a temporary presence
    /// subscription).
    pub async fn send_directed_unavailable(&mut self, to: &str) -> Result<(), ClientError> {
        self.send_raw(&format!("<presence type='unavailable' to='{}'/>", esc(to)))
            .await
    }

    /// Answers a disco#info query (`q`, an iq get) with `features`.
    pub async fn answer_disco(&mut self, q: &Stanza, features: &[&str]) -> Result<(), ClientError> {
        let mut body = String::from("<identity category='client' type='pc' name='sim'/>");
        for f in features {
            body.push_str(&format!("<feature var='{}'/>", esc(f)));
        }
        let node = q
            .disco_info_node()
            .map(|n| format!(" node='{}'", esc(&n)))
            .unwrap_or_default();
        let to = q
            .attr("from")
            .map(|f| format!(" to='{}'", esc(f)))
            .unwrap_or_default();
        self.send_raw(&format!(
            "<iq type='result' id='{}'{to}><query xmlns='http://jabber.org/protocol/disco#info'{node}>{body}</query></iq>",
            esc(q.attr("id").unwrap_or(""))
        ))
        .await
    }

    /// Answers an iq get the way every client must (XEP-0199 ping: a
    /// result; anything else: `<service-unavailable/>`). `false` when `s`
    /// is not an iq get.
    pub async fn answer_iq(&mut self, s: &Stanza) -> Result<bool, ClientError> {
        if s.name != "iq" || s.attr("type") != Some("get") {
            return Ok(false);
        }
        let id = esc(s.attr("id").unwrap_or(""));
        let to = s
            .attr("from")
            .map(|f| format!(" to='{}'", esc(f)))
            .unwrap_or_default();
        if s.has_child("ping") {
            self.send_raw(&format!("<iq type='result' id='{id}'{to}/>"))
                .await?;
        } else {
            self.send_raw(&format!(
                "<iq type='error' id='{id}'{to}><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
            ))
            .await?;
        }
        Ok(true)
    }

    /// Send a `chat` message.
    pub async fn send_message(&mut self, to: &str, body: &str) -> Result<(), ClientError> {
        let id = self.new_id();
        self.send_raw(&format!(
            "<message type='chat' to='{}' id='{id}'><body>{}</body></message>",
            esc(to),
            esc(body)
        ))
        .await
    }

    /// Send raw bytes.
    pub async fn send_raw(&mut self, xml: &str) -> Result<(), ClientError> {
        self.write(xml.as_bytes()).await
    }

    /// Send bytes that need not be UTF-8 (bad input for tests).
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.write(bytes).await
    }

    async fn write(&mut self, b: &[u8]) -> Result<(), ClientError> {
        self.io.write_all(b).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Next top-level element. A `<stream:error>` gives [`ClientError::StreamError`],
    /// the end of the stream [`ClientError::Closed`].
    pub async fn recv(&mut self, timeout: Duration) -> Result<Stanza, ClientError> {
        if let Some(s) = self.pending.pop_front() {
            return Ok(s);
        }
        self.next_element(timeout).await
    }

    /// Receive until `pred` matches, discarding other elements.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Stanza) -> bool,
    ) -> Result<Stanza, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self
                .recv(deadline.saturating_duration_since(Instant::now()))
                .await?;
            if pred(&s) {
                return Ok(s);
            }
        }
    }

    /// XEP-0199 ping to the server.
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        let to = format!(" type='get' to='{}'", esc(&self.domain));
        self.iq(&to, "<ping xmlns='urn:xmpp:ping'/>")
            .await
            .map(|_| ())
    }

    /// Whether the server ended its stream with `</stream:stream>`, not
    /// only the connection.
    pub fn stream_closed_by_server(&self) -> bool {
        self.stream_closed
    }

    /// Bytes received that are not (yet) a whole element: once the
    /// connection is closed, anything here was cut short.
    pub fn unframed_bytes(&self) -> usize {
        self.framer.unframed()
    }

    /// Close the stream and wait (bounded) for the server's close.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.send_raw("</stream:stream>").await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self
                .next_element(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Ok(_) => continue,
                Err(ClientError::Closed) => break,
                Err(e) => return Err(e),
            }
        }
        let _ = self.io.shutdown().await;
        Ok(())
    }

    async fn next_element(&mut self, timeout: Duration) -> Result<Stanza, ClientError> {
        let deadline = Instant::now() + timeout;
        match self.next_frame(deadline).await? {
            Frame::Element(raw) => {
                let s = Stanza::from_raw(raw)?;
                check_stream_error(&s)?;
                Ok(s)
            }
            Frame::StreamClose => {
                self.closed = true;
                self.stream_closed = true;
                Err(ClientError::Closed)
            }
            Frame::StreamOpen(_) => Err(ClientError::Protocol("unexpected stream header".into())),
        }
    }

    async fn next_frame(&mut self, deadline: Instant) -> Result<Frame, ClientError> {
        loop {
            if self.closed {
                return Err(ClientError::Closed);
            }
            match self.framer.next_frame() {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => {
                    return Err(ClientError::Protocol(format!(
                        "server sent bad XML: {}",
                        e.condition()
                    )))
                }
            }
            let n = tokio::time::timeout_at(deadline, self.io.read_buf(self.framer.buf_mut()))
                .await
                .map_err(|_| ClientError::Timeout)?;
            match n {
                Ok(0) => {
                    self.closed = true;
                    return Err(ClientError::Closed);
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    self.closed = true;
                    return Err(ClientError::Closed);
                }
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }
}

fn decode_text(s: &Stanza) -> Result<String, ClientError> {
    let t = s.tree().map(|t| t.text).unwrap_or_default();
    let t = t.trim();
    let b = if t.is_empty() || t == "=" {
        Vec::new()
    } else {
        B64.decode(t)
            .map_err(|_| ClientError::Protocol("bad base64".into()))?
    };
    String::from_utf8(b).map_err(|_| ClientError::Protocol("bad UTF-8 in SASL data".into()))
}

fn check_stream_error(s: &Stanza) -> Result<(), ClientError> {
    if s.name != "error"
        || !s.raw.starts_with("<stream:") && !s.raw.contains("http://etherx.jabber.org/streams")
    {
        return Ok(());
    }
    let t = s.tree();
    let streams_ns = "urn:ietf:params:xml:ns:xmpp-streams";
    let condition = t
        .as_ref()
        .and_then(|t| {
            t.children
                .iter()
                .find(|c| c.local() != "text" && c.ns() == Some(streams_ns))
        })
        .map(|c| c.local().to_owned())
        .unwrap_or_else(|| "undefined-condition".to_owned());
    let text = t
        .as_ref()
        .and_then(|t| t.children.iter().find(|c| c.local() == "text"))
        .map(|c| c.text.clone());
    Err(ClientError::StreamError {
        condition,
        text,
        raw: s.raw.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_error_with_application_condition() {
        let raw = "<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>node imp1 failed over; reconnect in 317 s</text><relogin xmlns='urn:x-prg-proxy:relogin:0' after='317' min='120' max='537' reason='failover'/></stream:error>";
        let s = Stanza::from_raw(Bytes::from(raw)).expect("stanza");
        assert_eq!(s.name, "error");
        match check_stream_error(&s) {
            Err(ClientError::StreamError {
                condition,
                text,
                raw: r,
            }) => {
                assert_eq!(condition, "system-shutdown");
                assert_eq!(
                    text.as_deref(),
                    Some("node imp1 failed over; reconnect in 317 s")
                );
                assert_eq!(r, raw);
            }
            other => panic!("{other:?}"),
        }
        let s = Stanza::from_raw(Bytes::from(
            "<message from='a@b'><body>x</body><error/></message>",
        ))
        .expect("stanza");
        assert!(check_stream_error(&s).is_ok());
        assert_eq!(s.body().as_deref(), Some("x"));
        assert!(s.has_child("error"));
        assert_eq!(s.attr("from"), Some("a@b"));
    }

    #[test]
    fn relogin_hint_from_errors() {
        let raw = "<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><relogin xmlns='urn:x-prg-proxy:relogin:0' after='317' min='120' max='537' reason='failover'/></stream:error>";
        let s = Stanza::from_raw(Bytes::from(raw)).expect("stanza");
        let e = check_stream_error(&s).expect_err("stream error");
        let h = e.relogin().expect("hint");
        assert_eq!(h.after, Duration::from_secs(317));
        assert_eq!(h.reason, "failover");
        let e = ClientError::SaslFailure {
            condition: "temporary-auth-failure".into(),
            text: None,
            raw: "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><temporary-auth-failure/><relogin xmlns='urn:x-prg-proxy:relogin:0' after='1.5' reason='paced'/></failure>".into(),
        };
        assert_eq!(
            e.relogin().map(|h| (h.after, h.reason)),
            Some((Duration::from_millis(1500), "paced".to_owned()))
        );
        assert_eq!(ClientError::Timeout.relogin(), None);
    }
}
