//! The simulated IM&P node: a small XMPP c2s server that behaves on the wire
//! like Prosody (stream header, features, SASL PLAIN / SCRAM-SHA-1, resource
//! binding, roster, presence, message and iq routing, stream errors).
//!
//! Behaviour choices (RFC 6121 leaves them open):
//! * a `chat`/`normal`/`headline` message to a bare JID goes to every available
//!   resource that has the highest non-negative priority; a message to a full
//!   JID that is not bound falls back to the bare JID (groupchat: error);
//! * a message to an unknown user, or to a user with no such resource
//!   (`chat`/`normal`), is not stored: the sender gets a
//!   `<service-unavailable/>` stanza error; `headline`, `groupchat` and `error`
//!   messages are dropped silently;
//! * a second bind of the same full JID (on either node of a pair) replaces
//!   the old session, which gets a `<conflict/>` stream error;
//! * [`SimNode::kill`] is a crash: no unavailable presence is broadcast for
//!   the node's sessions, sockets are reset;
//! * the roster is static ([`Roster`]); a roster set gets `<not-allowed/>`;
//!   broadcast presence goes to the contacts' available resources on both
//!   nodes and to all the user's own available resources, the sender included
//!   (as Prosody echoes it); with [`Roster::AllUsers`] that is O(online users)
//!   per presence, so large benches should use [`Roster::Empty`] or
//!   [`Roster::Custom`];
//! * "available" means bound *and* initial presence sent: a message to a bare
//!   JID of a user whose resources sent no presence yet bounces (a full JID
//!   always reaches a bound resource);
//! * stanzas before authentication or before binding get a
//!   `<service-unavailable/>` stanza error, as Prosody answers them;
//! * restricted XML (DTD, comment, processing instruction, unknown entity)
//!   gets `<restricted-xml/>` per RFC 6120 §11 (Prosody 0.12 says
//!   `<not-well-formed/>`);
//! * output to a slow reader is buffered without bound (like Prosody); the
//!   node keeps reading while it writes;
//! * with a [`LoginCapacity`] the node saturates like a real one: every
//!   `<auth>` waits (FIFO) for one of `concurrent` login slots and holds it for
//!   `work_per_login` before the SASL exchange goes on; a login that could not
//!   get a slot within `queue_timeout` is refused with
//!   `<temporary-auth-failure/>` (text `node overloaded`);
//! * temporary presence (Cisco Jabber) as IM&P does it: directed presence
//!   whose XEP-0115 caps `ver` resolves (the node asks the watcher with
//!   disco#info on `node#ver`, cached per node) to a feature list with
//!   [`TEMP_PRESENCE_NOTIFY`] subscribes the watcher's session to the
//!   target; the node pushes the target's presence at once and on every
//!   change as a headline message with a pubsub#event for
//!   [`NS_TEMP_PRESENCE`]. Directed presence without the feature, or directed
//!   unavailable presence, unsubscribes. Subscriptions are bounded
//!   ([`SimNodeConfig::temp_presence_max`]), expire
//!   ([`SimNodeConfig::temp_presence_ttl`]), live in the memory of the node
//!   that serves the target (the watcher's node while the target is offline)
//!   and are lost — without telling the watcher — when that node is killed,
//!   when the target binds on the other node (a move), or when the
//!   watcher's session ends: the defect the proxy repairs;
//! * stream management (XEP-0198), minimally: `<sm/>` is offered after
//!   login; `<enable/>` after bind is answered `<enabled/>` (no resumption)
//!   and from then on the messages, presences and iqs the node handled are
//!   counted; `<r/>` is answered `<a h=…/>`; a `<resume/>` gets `<failed/>`
//!   with `<item-not-found/>`, as Prosody answers an id it does not know.
//!   The node never sends `<r/>` itself.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
use std::task::Poll;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use super::scram::{self, ScramKeys, ServerExchange};
use super::stream::{arm_rst, Dead, Io};
use super::xml::{esc, parse_element, parse_start, tag_end, Element, Frame, Framer};

const NS_STREAM: &str = "http://etherx.jabber.org/streams";
const NS_CLIENT: &str = "jabber:client";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_ROSTER: &str = "jabber:iq:roster";
const NS_PING: &str = "urn:xmpp:ping";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const NS_SM: &str = "urn:xmpp:sm:3";
const NS_CAPS: &str = "http://jabber.org/protocol/caps";
const NS_PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
/// The pubsub node of temporary presence pushes.
pub const NS_TEMP_PRESENCE: &str = "http://webex.com/connect/temp-presence";
/// The caps feature that makes a directed presence a temporary presence subscription.
pub const TEMP_PRESENCE_NOTIFY: &str = "http://webex.com/connect/temp-presence+notify";
/// Session ids are unique across all nodes (sessions of a pair are compared by id).
static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Login latencies kept for [`SimNode::login_latencies`] (the most recent ones).
pub const LOGIN_LATENCY_WINDOW: usize = 4096;

/// How many logins a node can process, like a real IM&P node whose login
/// path (authentication back end, session set-up) is the bottleneck.
///
/// A login, from the receipt of `<auth>` until the bind result is sent,
/// needs one of `concurrent` slots for `work_per_login` (the slot is held
/// while the node "works", modelled as a sleep, not CPU). The node thus
/// sustains `concurrent / work_per_login` logins per second: below that a
/// login costs about `work_per_login` plus the client's round trips; above
/// it logins queue (first come, first served) and latency grows. A login
/// that waited longer than `queue_timeout` for a slot is refused with
/// `<failure><temporary-auth-failure/><text>node overloaded</text></failure>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginCapacity {
    /// Logins processed at the same time (0 is taken as 1).
    pub concurrent: usize,
    /// How long one login holds its slot.
    pub work_per_login: Duration,
    /// Longest wait for a slot before the login is refused.
    pub queue_timeout: Duration,
}

impl LoginCapacity {
    /// Work per login chosen by [`LoginCapacity::per_second`].
    pub const DEFAULT_WORK: Duration = Duration::from_millis(50);
    /// Queue timeout chosen by [`LoginCapacity::per_second`]: below the
    /// [`SimClient`](super::SimClient)'s 10 s set-up timeout, so that a
    /// queued client sees the overload refusal rather than its own timeout.
    pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(8);

    /// A capacity of about `rate` logins per second: 50 ms of work per login,
    /// `ceil(rate * 0.05)` slots (at least 1, so the real capacity is
    /// rounded up to a multiple of 20/s), 8 s queue timeout. A rate that is
    /// not a positive number gives 1 slot (20/s).
    pub fn per_second(rate: f64) -> LoginCapacity {
        let slots = rate * Self::DEFAULT_WORK.as_secs_f64();
        let concurrent = if slots.is_finite() && slots > 0.0 {
            (slots.ceil() as usize).max(1)
        } else {
            1
        };
        LoginCapacity {
            concurrent,
            work_per_login: Self::DEFAULT_WORK,
            queue_timeout: Self::DEFAULT_QUEUE_TIMEOUT,
        }
    }

    /// Sustained logins per second: `concurrent / work_per_login`
    /// (infinite when the work is zero).
    pub fn rate(&self) -> f64 {
        self.concurrent.max(1) as f64 / self.work_per_login.as_secs_f64()
    }
}

/// The login slots of a node with a [`LoginCapacity`].
struct LoginGate {
    cap: LoginCapacity,
    slots: Semaphore,
}

impl LoginGate {
    fn new(cap: LoginCapacity) -> LoginGate {
        let n = cap.concurrent.clamp(1, Semaphore::MAX_PERMITS);
        LoginGate {
            cap,
            slots: Semaphore::new(n),
        }
    }

    /// Wait for a slot (at most `queue_timeout`), then hold it for
    /// `work_per_login`. `false`: no slot in time (overloaded).
    async fn admit(&self) -> bool {
        let permit = match tokio::time::timeout(self.cap.queue_timeout, self.slots.acquire()).await
        {
            Ok(Ok(p)) => p,
            // Timed out (the semaphore is never closed).
            Ok(Err(_)) | Err(_) => return false,
        };
        tokio::time::sleep(self.cap.work_per_login).await;
        drop(permit);
        true
    }
}

/// Login counters of a node.
#[derive(Default)]
struct LoginStats {
    completed: AtomicU64,
    overloaded: AtomicU64,
    in_flight: AtomicUsize,
    latencies: Mutex<VecDeque<Duration>>,
}

impl LoginStats {
    fn record(&self, d: Duration) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        let mut l = lock(&self.latencies);
        if l.len() >= LOGIN_LATENCY_WINDOW {
            l.pop_front();
        }
        l.push_back(d);
    }
}

/// One login in progress on a connection (from `<auth>` to the bind
/// result); counted in flight until it completes, fails or the connection ends.
struct LoginTrack {
    stats: Arc<LoginStats>,
    start: Instant,
}

impl LoginTrack {
    fn start(stats: &Arc<LoginStats>) -> LoginTrack {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        LoginTrack {
            stats: stats.clone(),
            start: Instant::now(),
        }
    }

    fn complete(self) {
        self.stats.record(self.start.elapsed());
    }
}

impl Drop for LoginTrack {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who is on a user's roster (all entries with subscription `both`).
#[derive(Debug, Clone, Default)]
pub enum Roster {
    /// Nobody.
    Empty,
    /// Every other configured user.
    #[default]
    AllUsers,
    /// Explicit contact lists by localpart (an addition to the original API:
    /// large benches use it to avoid O(n²) presence fan-out). Presence from
    /// `a` goes to the contacts listed for `a`.
    Custom(HashMap<String, Vec<String>>),
}

/// Configuration of one simulated node.
#[derive(Debug, Clone)]
pub struct SimNodeConfig {
    /// Node name, e.g. `imp1`.
    pub name: String,
    /// Served XMPP domain, e.g. `example.com`.
    pub domain: String,
    /// Accounts: (localpart, password).
    pub users: Vec<(String, String)>,
    /// Advertised SASL mechanisms; only `PLAIN` and `SCRAM-SHA-1` are implemented,
    /// other names are only advertised (an `<auth>` for them gets `<invalid-mechanism/>`).
    pub mechanisms: Vec<String>,
    /// TLS server configuration: STARTTLS is offered when set.
    pub tls: Option<Arc<ServerConfig>>,
    /// STARTTLS is `<required/>` (no mechanisms are offered before TLS).
    pub require_tls: bool,
    /// Direct TLS (XEP-0368) instead of STARTTLS on the listener (needs `tls`).
    pub direct_tls: bool,
    /// Roster of every user.
    pub roster: Roster,
    /// Largest accepted stanza; a larger one gets `<policy-violation/>`.
    pub max_stanza_bytes: usize,
    /// SCRAM iteration count (keys are derived once per distinct password).
    pub scram_iterations: u32,
    /// Login capacity; `None` (the default): logins are limited only by the CPU.
    pub login_capacity: Option<LoginCapacity>,
    /// Expect a PROXY protocol v2 header on every connection (a connection
    /// without one is dropped) and record the client addresses it names.
    pub proxy_protocol: bool,
    /// Most temporary presence subscriptions the node holds (IM&P's
    /// per-node maximum); a subscription beyond it is ignored.
    pub temp_presence_max: usize,
    /// How long a temporary presence subscription lives before the node
    /// drops it (IM&P's time-to-live).
    pub temp_presence_ttl: Duration,
    /// What a PLAIN authorization identity (authzid) does.
    pub plain_authzid: PlainAuthzid,
}

/// How a node treats a SASL PLAIN authzid that differs from the authcid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlainAuthzid {
    /// Refused with `<not-authorized/>` (the default).
    #[default]
    Refuse,
    /// Ignored: the authcid is logged in (as Prosody does).
    Ignore,
    /// Honoured: the authzid is logged in once the authcid's password is
    /// right (as a server with administrators acting for users may).
    Honour,
}

impl SimNodeConfig {
    /// A configuration with defaults: SCRAM-SHA-1 and PLAIN, no TLS,
    /// [`Roster::AllUsers`], 262 144-byte stanzas, 4096 SCRAM iterations,
    /// no login capacity limit.
    pub fn new(
        name: impl Into<String>,
        domain: impl Into<String>,
        users: Vec<(String, String)>,
    ) -> Self {
        SimNodeConfig {
            name: name.into(),
            domain: domain.into(),
            users,
            mechanisms: vec!["SCRAM-SHA-1".to_owned(), "PLAIN".to_owned()],
            tls: None,
            require_tls: false,
            direct_tls: false,
            roster: Roster::AllUsers,
            max_stanza_bytes: 262_144,
            scram_iterations: 4096,
            login_capacity: None,
            proxy_protocol: false,
            temp_presence_max: 100_000,
            temp_presence_ttl: Duration::from_secs(3600),
            plain_authzid: PlainAuthzid::Refuse,
        }
    }
}

/// What a session task receives from other sessions.
enum Out {
    Data(Bytes),
    Conflict,
}

#[derive(Default)]
struct Pres {
    available: bool,
    priority: i32,
    last: Option<Bytes>,
    directed: Vec<String>,
}

/// One bound resource.
struct Sess {
    id: u64,
    user: String,
    resource: String,
    full: String,
    tx: mpsc::UnboundedSender<Out>,
    pres: Mutex<Pres>,
}

impl Sess {
    fn send(&self, b: &Bytes) {
        let _ = self.tx.send(Out::Data(b.clone()));
    }
    fn available(&self) -> bool {
        lock(&self.pres).available
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

type SessionMap = HashMap<String, Vec<Arc<Sess>>>;

struct Shared {
    name: String,
    domain: String,
    users: HashMap<String, String>,
    mechanisms: Vec<String>,
    tls: Option<TlsAcceptor>,
    require_tls: bool,
    direct_tls: bool,
    roster: Roster,
    max_stanza: usize,
    iterations: u32,
    salt: [u8; 16],
    scram_cache: Mutex<HashMap<String, Arc<ScramKeys>>>,
    sessions: RwLock<SessionMap>,
    bound: AtomicUsize,
    logins: AtomicU64,
    login_gate: Option<LoginGate>,
    login_stats: Arc<LoginStats>,
    peer: OnceLock<Weak<Shared>>,
    addr: SocketAddr,
    listener: Mutex<Option<TcpListener>>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    kill_tx: watch::Sender<u64>,
    hang_tx: watch::Sender<bool>,
    proxy_protocol: bool,
    plain_authzid: PlainAuthzid,
    /// Client addresses learned from PROXY headers, in arrival order.
    client_addrs: Mutex<Vec<SocketAddr>>,
    /// `LOCAL` PROXY headers received (the proxy's own connections).
    local_headers: AtomicU64,
    /// Temporary presence: subscriptions, caps cache, pending disco#info.
    temp: Mutex<Temp>,
    temp_max: usize,
    temp_ttl: Duration,
}

/// One temporary presence subscription: a watcher's session.
struct TempSub {
    watcher: Weak<Sess>,
    watcher_id: u64,
    since: Instant,
}

impl TempSub {
    fn live(&self, ttl: Duration) -> Option<Arc<Sess>> {
        if self.since.elapsed() >= ttl {
            return None;
        }
        self.watcher.upgrade().filter(|s| !s.tx.is_closed())
    }
}

/// A disco#info query sent to a watcher for an unknown caps `ver`.
struct PendingDisco {
    ver: String,
    watcher_id: u64,
    targets: Vec<String>,
}

/// A node's temporary presence state (in memory only: lost on a crash).
#[derive(Default)]
struct Temp {
    /// Target localpart → its watchers' sessions.
    subs: HashMap<String, Vec<TempSub>>,
    count: usize,
    /// Caps `ver` → whether its features include [`TEMP_PRESENCE_NOTIFY`].
    caps: HashMap<String, bool>,
    /// disco#info iq id → what it resolves.
    pending: HashMap<String, PendingDisco>,
    next_id: u64,
    refused: u64,
    disco_queries: u64,
}

impl Temp {
    /// Drops dead and expired subscriptions of `target`.
    fn purge(&mut self, target: &str, ttl: Duration) {
        if let Some(v) = self.subs.get_mut(target) {
            let before = v.len();
            v.retain(|s| s.live(ttl).is_some());
            self.count -= before - v.len();
            if v.is_empty() {
                self.subs.remove(target);
            }
        }
    }

    fn purge_all(&mut self, ttl: Duration) {
        let targets: Vec<String> = self.subs.keys().cloned().collect();
        for t in targets {
            self.purge(&t, ttl);
        }
    }

    fn remove(&mut self, target: &str, watcher_id: u64) {
        if let Some(v) = self.subs.get_mut(target) {
            let before = v.len();
            v.retain(|s| s.watcher_id != watcher_id);
            self.count -= before - v.len();
            if v.is_empty() {
                self.subs.remove(target);
            }
        }
    }

    fn drop_target(&mut self, target: &str) {
        if let Some(v) = self.subs.remove(target) {
            self.count -= v.len();
        }
    }
}

/// The headline message that pushes `presence` of `item` (the target's
/// full JID, or bare when offline) to a temporary presence watcher.
fn temp_push(target_bare: &str, watcher_full: &str, item: &str, presence: &[u8]) -> Bytes {
    let mut s = Vec::with_capacity(presence.len() + 320);
    s.extend_from_slice(
        format!(
            "<message type='headline' from='{}' to='{}'><event xmlns='{NS_PUBSUB_EVENT}'><items node='{NS_TEMP_PRESENCE}'><item id='{}'>",
            esc(target_bare),
            esc(watcher_full),
            esc(item)
        )
        .as_bytes(),
    );
    s.extend_from_slice(presence);
    s.extend_from_slice(b"</item></items></event></message>");
    Bytes::from(s)
}

/// A running simulated node. Cheap to clone (shared state inside).
#[derive(Clone)]
pub struct SimNode {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNode")
            .field("name", &self.inner.name)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

impl SimNode {
    /// Start a standalone node listening on `127.0.0.1:0`.
    pub async fn start(cfg: SimNodeConfig) -> io::Result<SimNode> {
        let listener = bind_listener(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let users = cfg
            .users
            .into_iter()
            .map(|(u, p)| (u.to_lowercase(), p))
            .collect();
        let roster = match cfg.roster {
            Roster::Custom(m) => Roster::Custom(
                m.into_iter()
                    .map(|(k, v)| {
                        let k = k.to_lowercase();
                        let v = v
                            .into_iter()
                            .map(|c| c.to_lowercase())
                            .filter(|c| *c != k)
                            .collect();
                        (k, v)
                    })
                    .collect(),
            ),
            r => r,
        };
        let inner = Arc::new(Shared {
            name: cfg.name,
            domain: cfg.domain.to_lowercase(),
            users,
            mechanisms: cfg.mechanisms,
            tls: cfg.tls.map(TlsAcceptor::from),
            require_tls: cfg.require_tls,
            direct_tls: cfg.direct_tls,
            roster,
            max_stanza: cfg.max_stanza_bytes,
            iterations: cfg.scram_iterations.max(1),
            salt: rand::random(),
            scram_cache: Mutex::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            bound: AtomicUsize::new(0),
            logins: AtomicU64::new(0),
            login_gate: cfg.login_capacity.map(LoginGate::new),
            login_stats: Arc::default(),
            peer: OnceLock::new(),
            addr,
            listener: Mutex::new(Some(listener)),
            accept_task: Mutex::new(None),
            kill_tx: watch::Sender::new(0),
            hang_tx: watch::Sender::new(false),
            proxy_protocol: cfg.proxy_protocol,
            plain_authzid: cfg.plain_authzid,
            client_addrs: Mutex::new(Vec::new()),
            local_headers: AtomicU64::new(0),
            temp: Mutex::new(Temp::default()),
            temp_max: cfg.temp_presence_max,
            temp_ttl: cfg.temp_presence_ttl,
        });
        let node = SimNode { inner };
        node.spawn_accept();
        Ok(node)
    }

    fn spawn_accept(&self) {
        let h = tokio::spawn(accept_loop(self.inner.clone()));
        if let Some(old) = lock(&self.inner.accept_task).replace(h) {
            old.abort();
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The served domain.
    pub fn domain(&self) -> &str {
        &self.inner.domain
    }

    /// The client addresses the node learned from PROXY protocol headers
    /// (with [`SimNodeConfig::proxy_protocol`]), one per relayed connection.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        lock(&self.inner.client_addrs).clone()
    }

    /// `LOCAL` PROXY headers received (heartbeats and probes).
    pub fn local_headers(&self) -> u64 {
        self.inner.local_headers.load(Ordering::Relaxed)
    }

    /// Number of resources bound on this node now.
    pub fn session_count(&self) -> usize {
        self.inner.bound.load(Ordering::Relaxed)
    }

    /// Successful SASL authentications since start.
    pub fn logins_total(&self) -> u64 {
        self.inner.logins.load(Ordering::Relaxed)
    }

    /// Logins completed (from `<auth>` to the bind result) since start.
    pub fn logins_completed(&self) -> u64 {
        self.inner.login_stats.completed.load(Ordering::Relaxed)
    }

    /// Logins refused with `<temporary-auth-failure/>` because no login slot
    /// became free within the [`LoginCapacity::queue_timeout`].
    pub fn logins_overloaded(&self) -> u64 {
        self.inner.login_stats.overloaded.load(Ordering::Relaxed)
    }

    /// Logins in progress now: `<auth>` received (queued or being
    /// processed), bind result not sent yet, connection still open.
    pub fn logins_in_flight(&self) -> usize {
        self.inner.login_stats.in_flight.load(Ordering::Relaxed)
    }

    /// Durations of the most recent completed logins (at most
    /// [`LOGIN_LATENCY_WINDOW`], oldest first), each from the receipt of
    /// `<auth>` to the sending of the bind result.
    pub fn login_latencies(&self) -> Vec<Duration> {
        lock(&self.inner.login_stats.latencies)
            .iter()
            .copied()
            .collect()
    }

    /// The configured login capacity.
    pub fn login_capacity(&self) -> Option<LoginCapacity> {
        self.inner.login_gate.as_ref().map(|g| g.cap)
    }

    /// Live temporary presence subscriptions held by this node.
    pub fn temp_subscriptions(&self) -> usize {
        let mut t = lock(&self.inner.temp);
        t.purge_all(self.inner.temp_ttl);
        t.count
    }

    /// The full JIDs of the live sessions subscribed (on this node) to the
    /// temporary presence of `target` (a localpart), one per subscription.
    pub fn temp_watchers(&self, target: &str) -> Vec<String> {
        let t = lock(&self.inner.temp);
        t.subs
            .get(&target.to_lowercase())
            .into_iter()
            .flatten()
            .filter_map(|s| s.live(self.inner.temp_ttl).map(|w| w.full.clone()))
            .collect()
    }

    /// Temporary presence subscriptions refused by the node's maximum.
    pub fn temp_refused(&self) -> u64 {
        lock(&self.inner.temp).refused
    }

    /// disco#info queries the node sent to resolve caps `ver`s.
    pub fn temp_disco_queries(&self) -> u64 {
        lock(&self.inner.temp).disco_queries
    }

    /// Crash: stop listening (connects are refused) and reset every connection.
    /// No presence is broadcast for the lost sessions.
    pub fn kill(&self) {
        let s = &self.inner;
        s.kill_tx.send_modify(|g| *g += 1);
        drop(lock(&s.listener).take());
        if let Some(h) = lock(&s.accept_task).take() {
            h.abort();
        }
        let mut map = wlock(&s.sessions);
        map.clear();
        s.bound.store(0, Ordering::Relaxed);
        drop(map);
        // Temporary presence lived in memory only.
        *lock(&s.temp) = Temp::default();
    }

    /// Listen again on the same address after [`SimNode::kill`] (no-op when listening).
    pub async fn restart(&self) -> io::Result<()> {
        if lock(&self.inner.listener).is_some() {
            return Ok(());
        }
        let l = bind_listener(self.inner.addr)?;
        *lock(&self.inner.listener) = Some(l);
        self.spawn_accept();
        Ok(())
    }

    /// Silent hang (like SIGSTOP): sockets stay open, nothing is read, written or accepted.
    pub fn hang(&self) {
        self.inner.hang_tx.send_replace(true);
    }

    /// End a [`SimNode::hang`].
    pub fn resume(&self) {
        self.inner.hang_tx.send_replace(false);
    }
}

/// Two nodes serving the same domain, joined by an in-process link.
#[derive(Debug, Clone)]
pub struct SimPair {
    /// The two nodes.
    pub nodes: [SimNode; 2],
}

impl SimPair {
    /// Two nodes joined by an in-process link: a message or presence to a user
    /// bound on the other node is delivered there.
    pub async fn start(cfg1: SimNodeConfig, cfg2: SimNodeConfig) -> io::Result<SimPair> {
        let a = SimNode::start(cfg1).await?;
        let b = SimNode::start(cfg2).await?;
        let _ = a.inner.peer.set(Arc::downgrade(&b.inner));
        let _ = b.inner.peer.set(Arc::downgrade(&a.inner));
        Ok(SimPair { nodes: [a, b] })
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    let mut hang = shared.hang_tx.subscribe();
    loop {
        if *hang.borrow_and_update() {
            if hang.changed().await.is_err() {
                return;
            }
            continue;
        }
        let accepted = tokio::select! {
            r = std::future::poll_fn(|cx| match lock(&shared.listener).as_ref() {
                Some(l) => l.poll_accept(cx),
                None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            }) => r,
            _ = hang.changed() => continue,
        };
        match accepted {
            Ok((mut tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    if shared.proxy_protocol {
                        use crate::proxy_protocol::{read_header, Received};
                        match read_header(&mut tcp, Duration::from_secs(10)).await {
                            Ok(Received::Proxy(a)) => lock(&shared.client_addrs).push(a),
                            Ok(Received::Local) => {
                                shared.local_headers.fetch_add(1, Ordering::Relaxed);
                            }
                            // No header: not from a PROXY-speaking peer.
                            Err(_) => return,
                        }
                    }
                    Conn::new(shared, tcp).run().await
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// A parsed JID.
struct Jid<'a> {
    local: Option<&'a str>,
    domain: &'a str,
    resource: Option<&'a str>,
}

fn parse_jid(s: &str) -> Option<Jid<'_>> {
    let (bare, resource) = match s.split_once('/') {
        Some((b, r)) => (b, Some(r)),
        None => (s, None),
    };
    let (local, domain) = match bare.split_once('@') {
        Some((l, d)) => (Some(l), d),
        None => (None, bare),
    };
    if domain.is_empty() || local == Some("") || resource == Some("") {
        return None;
    }
    Some(Jid {
        local,
        domain,
        resource,
    })
}

fn lower(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

impl Shared {
    fn peer(&self) -> Option<Arc<Shared>> {
        self.peer.get().and_then(Weak::upgrade)
    }

    /// Run `f` on this node and on its peer.
    fn each_node(&self, mut f: impl FnMut(&Shared)) {
        f(self);
        if let Some(p) = self.peer() {
            f(&p);
        }
    }

    fn is_contact(&self, a: &str, b: &str) -> bool {
        if a == b {
            return false;
        }
        match &self.roster {
            Roster::Empty => false,
            Roster::AllUsers => self.users.contains_key(a) && self.users.contains_key(b),
            Roster::Custom(m) => m.get(a).is_some_and(|v| v.iter().any(|c| c == b)),
        }
    }

    fn roster_items(&self, user: &str) -> Vec<String> {
        let mut v: Vec<String> = match &self.roster {
            Roster::Empty => Vec::new(),
            Roster::AllUsers => self.users.keys().filter(|u| *u != user).cloned().collect(),
            Roster::Custom(m) => m.get(user).cloned().unwrap_or_default(),
        };
        v.sort();
        v
    }

    /// Visit the sessions (both nodes) of `user`'s contacts and, if `own`, of `user`.
    fn each_interested(&self, user: &str, own: bool, mut f: impl FnMut(&Arc<Sess>)) {
        self.each_node(|n| {
            let map = rlock(&n.sessions);
            match &self.roster {
                Roster::Empty => {}
                Roster::AllUsers => {
                    for (u, v) in map.iter() {
                        if u != user && self.users.contains_key(u) {
                            v.iter().for_each(&mut f);
                        }
                    }
                }
                Roster::Custom(m) => {
                    for c in m.get(user).into_iter().flatten() {
                        if let Some(v) = map.get(c) {
                            v.iter().for_each(&mut f);
                        }
                    }
                }
            }
            if own {
                if let Some(v) = map.get(user) {
                    v.iter().for_each(&mut f);
                }
            }
        });
    }

    /// Send `data` to the available sessions of the user's contacts and own resources.
    fn broadcast(&self, user: &str, data: &Bytes, skip: Option<u64>) {
        self.each_interested(user, true, |s| {
            if Some(s.id) != skip && s.available() {
                s.send(data);
            }
        });
    }

    fn find_full(&self, user: &str, resource: &str) -> Option<Arc<Sess>> {
        let mut found = None;
        self.each_node(|n| {
            if found.is_none() {
                found = rlock(&n.sessions)
                    .get(user)
                    .and_then(|v| v.iter().find(|s| s.resource == resource).cloned());
            }
        });
        found
    }

    /// Deliver to the available resources of `user` with the highest non-negative priority.
    fn deliver_best(&self, user: &str, data: &Bytes) -> usize {
        let mut best: Option<i32> = None;
        self.each_node(|n| {
            if let Some(v) = rlock(&n.sessions).get(user) {
                for s in v {
                    let p = lock(&s.pres);
                    if p.available && p.priority >= 0 && best.map_or(true, |b| p.priority > b) {
                        best = Some(p.priority);
                    }
                }
            }
        });
        let Some(best) = best else { return 0 };
        let mut n_sent = 0;
        self.each_node(|n| {
            if let Some(v) = rlock(&n.sessions).get(user) {
                for s in v {
                    let ok = {
                        let p = lock(&s.pres);
                        p.available && p.priority == best
                    };
                    if ok {
                        s.send(data);
                        n_sent += 1;
                    }
                }
            }
        });
        n_sent
    }

    /// Deliver to every available resource of `user`.
    fn deliver_all_available(&self, user: &str, data: &Bytes) -> usize {
        let mut n_sent = 0;
        self.each_node(|n| {
            if let Some(v) = rlock(&n.sessions).get(user) {
                for s in v.iter().filter(|s| s.available()) {
                    s.send(data);
                    n_sent += 1;
                }
            }
        });
        n_sent
    }

    fn take_resource(&self, user: &str, resource: &str) -> Option<Arc<Sess>> {
        let mut map = wlock(&self.sessions);
        let v = map.get_mut(user)?;
        let i = v.iter().position(|s| s.resource == resource)?;
        let s = v.swap_remove(i);
        if v.is_empty() {
            map.remove(user);
        }
        self.bound.fetch_sub(1, Ordering::Relaxed);
        Some(s)
    }

    fn remove_session(&self, sess: &Sess) -> bool {
        let mut map = wlock(&self.sessions);
        let Some(v) = map.get_mut(&sess.user) else {
            return false;
        };
        let Some(i) = v.iter().position(|s| s.id == sess.id) else {
            return false;
        };
        v.swap_remove(i);
        if v.is_empty() {
            map.remove(&sess.user);
        }
        self.bound.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// A session went away (not by a crash): tell contacts and directed-presence targets.
    fn session_gone(&self, sess: &Sess) {
        let (was, directed) = {
            let mut p = lock(&sess.pres);
            let was = p.available;
            p.available = false;
            p.last = None;
            (was, std::mem::take(&mut p.directed))
        };
        if !was && directed.is_empty() {
            return;
        }
        let un = Bytes::from(format!(
            "<presence type='unavailable' from='{}'/>",
            esc(&sess.full)
        ));
        if was {
            self.broadcast(&sess.user, &un, Some(sess.id));
            self.temp_notify(&sess.user, &sess.full, &un);
        }
        for t in directed {
            self.deliver_presence_to(&t, &un);
        }
    }

    /// Directed presence delivery to a full or bare JID of this domain.
    fn deliver_presence_to(&self, to: &str, data: &Bytes) {
        let Some(j) = parse_jid(to) else { return };
        let Some(local) = j.local else { return };
        if !j.domain.eq_ignore_ascii_case(&self.domain) {
            return;
        }
        let local = lower(local);
        match j.resource {
            Some(r) => {
                if let Some(s) = self.find_full(&local, r) {
                    s.send(data);
                }
            }
            None => {
                self.deliver_all_available(&local, data);
            }
        }
    }

    fn has_sessions(&self, user: &str) -> bool {
        rlock(&self.sessions).contains_key(user)
    }

    /// Subscribes `watcher` to `target`'s temporary presence on the node
    /// that serves the target (this one while it is offline) and pushes
    /// its current presence.
    fn temp_subscribe(&self, watcher: &Arc<Sess>, target: &str) {
        let peer = self.peer();
        let host: &Shared = match &peer {
            Some(p) if !self.has_sessions(target) && p.has_sessions(target) => p,
            _ => self,
        };
        if let Some(p) = &peer {
            // One subscription per pair, on one node.
            let other: &Shared = if std::ptr::eq(host, self) { p } else { self };
            lock(&other.temp).remove(target, watcher.id);
        }
        {
            let mut t = lock(&host.temp);
            t.purge(target, host.temp_ttl);
            let exists = t
                .subs
                .get_mut(target)
                .and_then(|v| v.iter_mut().find(|s| s.watcher_id == watcher.id))
                .map(|s| s.since = Instant::now())
                .is_some();
            if !exists {
                if t.count >= host.temp_max {
                    t.refused += 1;
                    return;
                }
                t.subs.entry(target.to_owned()).or_default().push(TempSub {
                    watcher: Arc::downgrade(watcher),
                    watcher_id: watcher.id,
                    since: Instant::now(),
                });
                t.count += 1;
            }
        }
        // The target's presence now.
        let target_bare = format!("{target}@{}", self.domain);
        let mut current = Vec::new();
        self.each_node(|n| {
            if let Some(v) = rlock(&n.sessions).get(target) {
                for s in v {
                    if let Some(b) = &lock(&s.pres).last {
                        current.push((s.full.clone(), b.clone()));
                    }
                }
            }
        });
        if current.is_empty() {
            let un = format!(
                "<presence type='unavailable' from='{}'/>",
                esc(&target_bare)
            );
            watcher.send(&temp_push(
                &target_bare,
                &watcher.full,
                &target_bare,
                un.as_bytes(),
            ));
        }
        for (full, b) in current {
            watcher.send(&temp_push(&target_bare, &watcher.full, &full, &b));
        }
    }

    fn temp_unsubscribe(&self, watcher_id: u64, target: &str) {
        self.each_node(|n| lock(&n.temp).remove(target, watcher_id));
    }

    /// `user`'s session `full` changed its presence to `data`: push it to
    /// the temporary presence watchers (on either node).
    fn temp_notify(&self, user: &str, full: &str, data: &Bytes) {
        let bare = format!("{user}@{}", self.domain);
        self.each_node(|n| {
            let watchers: Vec<Arc<Sess>> = {
                let mut t = lock(&n.temp);
                t.purge(user, n.temp_ttl);
                t.subs
                    .get(user)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.live(n.temp_ttl))
                    .collect()
            };
            for w in watchers {
                w.send(&temp_push(&bare, &w.full, full, data));
            }
        });
    }

    fn scram_keys(&self, password: &str) -> Arc<ScramKeys> {
        if let Some(k) = lock(&self.scram_cache).get(password) {
            return k.clone();
        }
        let k = Arc::new(ScramKeys::derive(password, &self.salt, self.iterations));
        lock(&self.scram_cache).insert(password.to_owned(), k.clone());
        k
    }
}

/// Why a connection ended.
enum Exit {
    /// The node was killed: reset the socket.
    Killed,
    /// The peer closed or the socket failed.
    Gone,
    /// We closed the stream (error or close); linger for the peer's close.
    Closed,
}

enum Sasl {
    None,
    PlainWait,
    ScramWaitFirst,
    ScramWaitFinal(Box<ServerExchange>, Arc<ScramKeys>),
}

struct Conn {
    node: Arc<Shared>,
    io: Box<dyn Io>,
    framer: Framer,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    out_pos: usize,
    /// Written bytes may sit in a TLS buffer: flush before idling.
    need_flush: bool,
    kill: watch::Receiver<u64>,
    gen: u64,
    hang: watch::Receiver<bool>,
    tls: bool,
    header_sent: bool,
    stream_open: bool,
    user: Option<String>,
    sasl: Sasl,
    sess: Option<Arc<Sess>>,
    rx: Option<mpsc::UnboundedReceiver<Out>>,
    /// The login in progress, if any.
    login: Option<LoginTrack>,
    /// Stanzas handled since the client enabled stream management.
    sm_handled: Option<u32>,
}

async fn recv_opt(rx: &mut Option<mpsc::UnboundedReceiver<Out>>) -> Option<Out> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

enum Ev {
    Killed,
    Hang,
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
    Flushed(io::Result<()>),
    Out(Option<Out>),
}

/// Output above this many unwritten bytes stops taking stanzas from other sessions.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Bytes read per call.
const READ_CHUNK: usize = 8192;

/// Poll one stream for writing `pending` (or flushing) and for reading into `buf`.
fn poll_duplex(
    cx: &mut std::task::Context<'_>,
    io: &mut dyn Io,
    pending: &[u8],
    need_flush: bool,
    buf: &mut bytes::BytesMut,
) -> Poll<Ev> {
    use std::pin::Pin;
    use tokio::io::ReadBuf;
    if !pending.is_empty() {
        if let Poll::Ready(r) = Pin::new(&mut *io).poll_write(cx, pending) {
            return Poll::Ready(Ev::Wrote(r));
        }
    } else if need_flush {
        if let Poll::Ready(r) = Pin::new(&mut *io).poll_flush(cx) {
            return Poll::Ready(Ev::Flushed(r));
        }
    }
    let len = buf.len();
    buf.resize(len + READ_CHUNK, 0);
    let mut rb = ReadBuf::new(&mut buf[len..]);
    let r = Pin::new(&mut *io).poll_read(cx, &mut rb);
    let n = rb.filled().len();
    buf.truncate(len + n);
    match r {
        Poll::Ready(Ok(())) => Poll::Ready(Ev::Read(Ok(n))),
        Poll::Ready(Err(e)) => Poll::Ready(Ev::Read(Err(e))),
        Poll::Pending => Poll::Pending,
    }
}

impl Conn {
    fn new(node: Arc<Shared>, tcp: TcpStream) -> Conn {
        let kill = node.kill_tx.subscribe();
        let gen = *kill.borrow();
        let hang = node.hang_tx.subscribe();
        let max = node.max_stanza;
        Conn {
            node,
            io: Box::new(tcp),
            framer: Framer::new(max),
            out: Vec::with_capacity(4096),
            out_pos: 0,
            need_flush: false,
            kill,
            gen,
            hang,
            tls: false,
            header_sent: false,
            stream_open: false,
            user: None,
            sasl: Sasl::None,
            sess: None,
            rx: None,
            login: None,
            sm_handled: None,
        }
    }

    async fn run(mut self) {
        let exit = match self.serve().await {
            Ok(()) => Exit::Closed,
            Err(e) => e,
        };
        let killed = matches!(exit, Exit::Killed) || *self.kill.borrow() != self.gen;
        if let Some(sess) = self.sess.take() {
            if !killed && self.node.remove_session(&sess) {
                self.node.session_gone(&sess);
            }
        }
        match exit {
            Exit::Killed => {
                arm_rst(self.io.as_ref());
            }
            Exit::Gone => {}
            Exit::Closed => {
                // Half-close, then drain until the peer closes so that our
                // last bytes are not lost to a reset.
                let io = &mut self.io;
                let kill = &mut self.kill;
                let _ = tokio::time::timeout(CLOSE_LINGER, async {
                    let _ = io.shutdown().await;
                    let mut sink = [0u8; 4096];
                    loop {
                        tokio::select! {
                            r = io.read(&mut sink) => if !matches!(r, Ok(n) if n > 0) { break },
                            _ = kill.changed() => break,
                        }
                    }
                })
                .await;
            }
        }
    }

    async fn serve(&mut self) -> Result<(), Exit> {
        if self.node.direct_tls {
            self.tls_handshake().await?;
        }
        loop {
            loop {
                let frame = match self.framer.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(self.fail(e.condition()).await),
                };
                self.handle_frame(frame).await?;
            }
            self.wait_input().await?;
        }
    }

    /// Wait for input from the client, writing pending output meanwhile.
    ///
    /// Output (replies and stanzas routed from other sessions) is written
    /// while reading goes on, so a client that sends a lot without reading
    /// never blocks its own input (Prosody buffers the same way); stanzas from
    /// other sessions are taken in only while the output buffer is small.
    async fn wait_input(&mut self) -> Result<(), Exit> {
        loop {
            if *self.hang.borrow_and_update() {
                tokio::select! {
                    _ = self.kill.changed() => return Err(Exit::Killed),
                    r = self.hang.changed() => if r.is_err() { return Err(Exit::Killed) },
                }
                continue;
            }
            let want_rx = self.out.len() - self.out_pos < OUT_HIGH_WATER;
            let ev = {
                let io = &mut self.io;
                let buf = self.framer.buf_mut();
                let pending = &self.out[self.out_pos..];
                let need_flush = self.need_flush;
                let rx = &mut self.rx;
                let kill = &mut self.kill;
                let hang = &mut self.hang;
                tokio::select! {
                    biased;
                    _ = kill.changed() => Ev::Killed,
                    _ = hang.changed() => Ev::Hang,
                    e = std::future::poll_fn(|cx| poll_duplex(cx, io.as_mut(), pending, need_flush, buf)) => e,
                    o = recv_opt(rx), if want_rx => Ev::Out(o),
                }
            };
            match ev {
                Ev::Killed => return Err(Exit::Killed),
                Ev::Hang => continue,
                Ev::Read(Ok(0))
                | Ev::Read(Err(_))
                | Ev::Wrote(Ok(0))
                | Ev::Wrote(Err(_))
                | Ev::Flushed(Err(_)) => return Err(Exit::Gone),
                Ev::Read(Ok(_)) => return Ok(()),
                Ev::Wrote(Ok(n)) => {
                    self.out_pos += n;
                    self.need_flush = true;
                    if self.out_pos >= self.out.len() {
                        self.out.clear();
                        self.out_pos = 0;
                    } else if self.out_pos > 65_536 && self.out_pos * 2 > self.out.len() {
                        self.out.drain(..self.out_pos);
                        self.out_pos = 0;
                    }
                }
                Ev::Flushed(Ok(())) => self.need_flush = false,
                Ev::Out(None) => self.rx = None,
                Ev::Out(Some(o)) => {
                    self.push_out(o).await?;
                    let mut n = 0;
                    while n < 256 && self.out.len() < OUT_HIGH_WATER {
                        let Some(Ok(o)) = self.rx.as_mut().map(|r| r.try_recv()) else {
                            break;
                        };
                        self.push_out(o).await?;
                        n += 1;
                    }
                }
            }
        }
    }

    async fn push_out(&mut self, o: Out) -> Result<(), Exit> {
        match o {
            Out::Data(b) => {
                self.out.extend_from_slice(&b);
                Ok(())
            }
            Out::Conflict => {
                // Replaced by a newer session with the same full JID.
                self.sess = None;
                Err(self.fail("conflict").await)
            }
        }
    }

    async fn flush(&mut self) -> Result<(), Exit> {
        if self.out_pos >= self.out.len() && !self.need_flush {
            return Ok(());
        }
        let io = &mut self.io;
        let out = &self.out[self.out_pos..];
        let kill = &mut self.kill;
        let r = tokio::select! {
            biased;
            _ = kill.changed() => return Err(Exit::Killed),
            r = async { io.write_all(out).await?; io.flush().await } => r,
        };
        self.out.clear();
        self.out_pos = 0;
        self.need_flush = false;
        r.map_err(|_| Exit::Gone)
    }

    fn push_header(&mut self) {
        let id = format!("{:016x}", rand::random::<u64>());
        self.out.extend_from_slice(
            format!(
                "<?xml version='1.0'?><stream:stream xmlns:stream='{NS_STREAM}' xml:lang='en' from='{}' version='1.0' xmlns='{NS_CLIENT}' id='{id}'>",
                esc(&self.node.domain)
            )
            .as_bytes(),
        );
        self.header_sent = true;
    }

    /// Send a stream error and close our stream.
    async fn fail(&mut self, condition: &str) -> Exit {
        // Same texts as Prosody for the conditions it explains.
        let extra = match condition {
            "policy-violation" => "<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>XML stanza is too big</text><stanza-too-big xmlns='urn:xmpp:errors'/>".to_owned(),
            "conflict" => "<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>Replaced by new connection</text>".to_owned(),
            _ => String::new(),
        };
        self.fail_with(condition, &extra).await
    }

    /// Send a stream error with extra children (e.g. `<text/>`) and close our stream.
    async fn fail_with(&mut self, condition: &str, extra: &str) -> Exit {
        if !self.header_sent {
            self.push_header();
        }
        self.out.extend_from_slice(
            format!("<stream:error><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>{extra}</stream:error></stream:stream>").as_bytes(),
        );
        match self.flush().await {
            Err(e) => e,
            Ok(()) => Exit::Closed,
        }
    }

    async fn tls_handshake(&mut self) -> Result<(), Exit> {
        let Some(acceptor) = self.node.tls.clone() else {
            return Err(Exit::Gone);
        };
        let old = std::mem::replace(&mut self.io, Box::new(Dead));
        let tcp = old.into_tcp().ok_or(Exit::Gone)?;
        let kill = &mut self.kill;
        let r = tokio::select! {
            _ = kill.changed() => return Err(Exit::Killed),
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
        };
        match r {
            Ok(Ok(tls)) => {
                self.io = Box::new(tls);
                self.tls = true;
                self.framer.clear();
                self.header_sent = false;
                self.stream_open = false;
                Ok(())
            }
            _ => Err(Exit::Gone),
        }
    }

    async fn handle_frame(&mut self, frame: Frame) -> Result<(), Exit> {
        match frame {
            Frame::StreamOpen(h) => self.on_stream_open(&h).await,
            Frame::StreamClose => {
                if !self.header_sent {
                    self.push_header();
                }
                self.out.extend_from_slice(b"</stream:stream>");
                self.flush().await?;
                Err(Exit::Closed)
            }
            Frame::Element(raw) => {
                if !self.stream_open {
                    return Err(self.fail("not-well-formed").await);
                }
                let el = match parse_element(&raw) {
                    Ok(el) => el,
                    Err(e) => return Err(self.fail(e.condition()).await),
                };
                self.on_element(el, raw).await
            }
        }
    }

    async fn on_stream_open(&mut self, header: &[u8]) -> Result<(), Exit> {
        if self.stream_open {
            return Err(self.fail("not-well-formed").await);
        }
        let attrs = match parse_start(header) {
            Ok((_, a)) => a,
            Err(e) => return Err(self.fail(e.condition()).await),
        };
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if get("xmlns:stream") != Some(NS_STREAM) || get("xmlns").is_some_and(|ns| ns != NS_CLIENT)
        {
            return Err(self.fail("invalid-namespace").await);
        }
        if get("to").is_some_and(|to| !to.eq_ignore_ascii_case(&self.node.domain)) {
            let text = format!(
                "<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>This server does not serve {}</text>",
                esc(get("to").unwrap_or(""))
            );
            return Err(self.fail_with("host-unknown", &text).await);
        }
        self.push_header();
        self.stream_open = true;
        let mut f = String::with_capacity(256);
        f.push_str("<stream:features>");
        if self.user.is_none() {
            let starttls = self.node.tls.is_some() && !self.tls;
            if starttls {
                if self.node.require_tls {
                    f.push_str(
                        "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>",
                    );
                } else {
                    f.push_str("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
                }
            }
            if !(starttls && self.node.require_tls) {
                f.push_str("<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>");
                for m in &self.node.mechanisms {
                    f.push_str("<mechanism>");
                    f.push_str(&esc(m));
                    f.push_str("</mechanism>");
                }
                f.push_str("</mechanisms>");
            }
        } else {
            // As Prosody's mod_tls: STARTTLS is offered on every stream that
            // is not encrypted, the one after SASL too.
            if self.node.tls.is_some() && !self.tls {
                f.push_str("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
            }
            f.push_str(
                "<ver xmlns='urn:xmpp:features:rosterver'/><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><required/></bind><session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session><sm xmlns='urn:xmpp:sm:3'/>",
            );
        }
        f.push_str("</stream:features>");
        self.out.extend_from_slice(f.as_bytes());
        Ok(())
    }

    async fn on_element(&mut self, el: Element, raw: Bytes) -> Result<(), Exit> {
        let name = el.name.as_str();
        if self.user.is_none() {
            return match (name, el.ns()) {
                ("starttls", Some(NS_TLS)) => {
                    if self.node.tls.is_some() && !self.tls {
                        self.out.extend_from_slice(
                            b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
                        );
                        self.flush().await?;
                        self.tls_handshake().await
                    } else {
                        self.out.extend_from_slice(
                            b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>",
                        );
                        self.flush().await?;
                        Err(Exit::Closed)
                    }
                }
                ("auth", Some(NS_SASL)) => {
                    self.login = Some(LoginTrack::start(&self.node.login_stats));
                    if !self.admit_login().await? {
                        self.node
                            .login_stats
                            .overloaded
                            .fetch_add(1, Ordering::Relaxed);
                        self.sasl = Sasl::None;
                        self.sasl_failure_text("temporary-auth-failure", "node overloaded");
                        return Ok(());
                    }
                    self.on_auth(&el);
                    Ok(())
                }
                ("response", Some(NS_SASL)) => {
                    self.on_response(&el);
                    Ok(())
                }
                ("abort", Some(NS_SASL)) => {
                    self.sasl = Sasl::None;
                    self.sasl_failure("aborted");
                    Ok(())
                }
                ("iq" | "message" | "presence", _) => {
                    // Like Prosody: a stanza error, the stream stays open.
                    if el.attr("type") != Some("error") {
                        self.stanza_error(&el, "service-unavailable", "cancel", None);
                    }
                    Ok(())
                }
                _ => Err(self.fail("unsupported-stanza-type").await),
            };
        }
        if el.ns() == Some(NS_SM) {
            return self.on_sm(name).await;
        }
        let Some(sess) = self.sess.clone() else {
            // Authenticated, not bound: only bind and session iqs.
            if name == "iq" && el.attr("type") == Some("set") {
                if let Some(b) = el.child_ns("bind", NS_BIND) {
                    let res = b
                        .child("resource")
                        .map(|r| r.text.trim().to_owned())
                        .unwrap_or_default();
                    return self.bind(&el, &res).await;
                }
                if el.child_ns("session", NS_SESSION).is_some() {
                    self.iq_result(&el, "");
                    return Ok(());
                }
            }
            if !matches!(name, "iq" | "message" | "presence") {
                return Err(self.fail("unsupported-stanza-type").await);
            }
            // Like Prosody: a stanza error, the stream stays open.
            if el.attr("type") != Some("error") {
                self.stanza_error(&el, "service-unavailable", "cancel", None);
            }
            return Ok(());
        };
        if let Some(from) = el.attr("from") {
            let bare = &sess.full[..sess.full.len() - sess.resource.len() - 1];
            if from != sess.full && from != bare {
                return Err(self.fail("invalid-from").await);
            }
        }
        match name {
            "message" => self.on_message(&sess, &el, &raw),
            "presence" => self.on_presence(&sess, &el, &raw),
            "iq" => self.on_iq(&sess, &el, &raw),
            _ => return Err(self.fail("unsupported-stanza-type").await),
        }
        if let Some(h) = &mut self.sm_handled {
            *h = h.wrapping_add(1);
        }
        Ok(())
    }

    /// A stream management element from an authenticated client.
    async fn on_sm(&mut self, name: &str) -> Result<(), Exit> {
        let out: String = match name {
            "enable" if self.sess.is_some() && self.sm_handled.is_none() => {
                self.sm_handled = Some(0);
                format!("<enabled xmlns='{NS_SM}'/>")
            }
            "enable" => format!(
                "<failed xmlns='{NS_SM}'><unexpected-request xmlns='{NS_STANZAS}'/></failed>"
            ),
            "resume" => {
                format!("<failed xmlns='{NS_SM}'><item-not-found xmlns='{NS_STANZAS}'/></failed>")
            }
            "r" => match self.sm_handled {
                Some(h) => format!("<a xmlns='{NS_SM}' h='{h}'/>"),
                None => return Err(self.fail("unsupported-stanza-type").await),
            },
            "a" => return Ok(()),
            _ => return Err(self.fail("unsupported-stanza-type").await),
        };
        self.out.extend_from_slice(out.as_bytes());
        Ok(())
    }

    /// Wait for a login slot and do the login's work (no-op without a
    /// [`LoginCapacity`]). `Ok(false)`: overloaded.
    async fn admit_login(&mut self) -> Result<bool, Exit> {
        let node = self.node.clone();
        let Some(gate) = &node.login_gate else {
            return Ok(true);
        };
        let kill = &mut self.kill;
        tokio::select! {
            biased;
            _ = kill.changed() => Err(Exit::Killed),
            ok = gate.admit() => Ok(ok),
        }
    }

    /// SASL `<failure/>`; ends the login in progress.
    fn sasl_failure(&mut self, cond: &str) {
        self.login = None;
        self.out.extend_from_slice(
            format!("<failure xmlns='{NS_SASL}'><{cond}/></failure>").as_bytes(),
        );
    }

    /// SASL `<failure/>` with a `<text/>`; ends the login in progress.
    fn sasl_failure_text(&mut self, cond: &str, text: &str) {
        self.login = None;
        self.out.extend_from_slice(
            format!(
                "<failure xmlns='{NS_SASL}'><{cond}/><text xml:lang='en'>{}</text></failure>",
                esc(text)
            )
            .as_bytes(),
        );
    }

    fn on_auth(&mut self, el: &Element) {
        self.sasl = Sasl::None;
        if self.node.require_tls && self.node.tls.is_some() && !self.tls {
            return self.sasl_failure("encryption-required");
        }
        let mech = el.attr("mechanism").unwrap_or("");
        if !self.node.mechanisms.iter().any(|m| m == mech) {
            return self.sasl_failure("invalid-mechanism");
        }
        let data = el.text.trim();
        match mech {
            "PLAIN" if data.is_empty() => {
                self.sasl = Sasl::PlainWait;
                self.out
                    .extend_from_slice(format!("<challenge xmlns='{NS_SASL}'/>").as_bytes());
            }
            "PLAIN" => self.plain(data),
            "SCRAM-SHA-1" if data.is_empty() => {
                self.sasl = Sasl::ScramWaitFirst;
                self.out
                    .extend_from_slice(format!("<challenge xmlns='{NS_SASL}'/>").as_bytes());
            }
            "SCRAM-SHA-1" => self.scram_first(data),
            _ => self.sasl_failure("invalid-mechanism"),
        }
    }

    fn on_response(&mut self, el: &Element) {
        let data = el.text.trim().to_owned();
        match std::mem::replace(&mut self.sasl, Sasl::None) {
            Sasl::None => self.sasl_failure("malformed-request"),
            Sasl::PlainWait => self.plain(&data),
            Sasl::ScramWaitFirst => self.scram_first(&data),
            Sasl::ScramWaitFinal(ex, keys) => {
                let Some(msg) = decode_b64(&data).and_then(|b| String::from_utf8(b).ok()) else {
                    return self.sasl_failure("incorrect-encoding");
                };
                match ex.finish(&msg, &keys) {
                    Ok(server_final) => {
                        let user = ex.username().to_lowercase();
                        self.authenticated(user, Some(server_final));
                    }
                    Err(scram::ScramError::Malformed) => self.sasl_failure("malformed-request"),
                    Err(scram::ScramError::NotAuthorized) => self.sasl_failure("not-authorized"),
                }
            }
        }
    }

    fn plain(&mut self, data: &str) {
        let Some(raw) = decode_b64(data) else {
            return self.sasl_failure("incorrect-encoding");
        };
        let mut parts = raw.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.sasl_failure("malformed-request");
        };
        let (Ok(authzid), Ok(authcid), Ok(pass)) = (
            std::str::from_utf8(authzid),
            std::str::from_utf8(authcid),
            std::str::from_utf8(pass),
        ) else {
            return self.sasl_failure("malformed-request");
        };
        let user = authcid.to_lowercase();
        let same = authzid.is_empty()
            || authzid.eq_ignore_ascii_case(&format!("{user}@{}", self.node.domain));
        let (ok_authz, login_as) = match self.node.plain_authzid {
            _ if same => (true, user.clone()),
            PlainAuthzid::Refuse => (false, user.clone()),
            PlainAuthzid::Ignore => (true, user.clone()),
            PlainAuthzid::Honour => {
                let local = authzid.split('@').next().unwrap_or(authzid).to_lowercase();
                (self.node.users.contains_key(&local), local)
            }
        };
        if ok_authz && self.node.users.get(&user).is_some_and(|p| p == pass) {
            self.authenticated(login_as, None);
        } else {
            self.sasl_failure("not-authorized");
        }
    }

    fn scram_first(&mut self, data: &str) {
        let Some(msg) = decode_b64(data).and_then(|b| String::from_utf8(b).ok()) else {
            return self.sasl_failure("incorrect-encoding");
        };
        let first = match scram::parse_client_first(&msg) {
            Ok(f) => f,
            Err(scram::ScramError::Malformed) => return self.sasl_failure("malformed-request"),
            Err(scram::ScramError::NotAuthorized) => return self.sasl_failure("not-authorized"),
        };
        let Some(password) = self.node.users.get(&first.username.to_lowercase()) else {
            return self.sasl_failure("not-authorized");
        };
        let keys = self.node.scram_keys(password);
        let snonce = B64.encode(rand::random::<[u8; 18]>());
        let ex = ServerExchange::new(first, &snonce, &keys);
        self.out.extend_from_slice(
            format!(
                "<challenge xmlns='{NS_SASL}'>{}</challenge>",
                B64.encode(ex.server_first())
            )
            .as_bytes(),
        );
        self.sasl = Sasl::ScramWaitFinal(Box::new(ex), keys);
    }

    fn authenticated(&mut self, user: String, additional: Option<String>) {
        match additional {
            Some(a) => self.out.extend_from_slice(
                format!("<success xmlns='{NS_SASL}'>{}</success>", B64.encode(a)).as_bytes(),
            ),
            None => self
                .out
                .extend_from_slice(format!("<success xmlns='{NS_SASL}'/>").as_bytes()),
        }
        self.node.logins.fetch_add(1, Ordering::Relaxed);
        self.user = Some(user);
        self.sasl = Sasl::None;
        self.stream_open = false;
        self.framer.reset();
    }

    async fn bind(&mut self, el: &Element, requested: &str) -> Result<(), Exit> {
        let Some(user) = self.user.clone() else {
            return Err(self.fail("not-authorized").await);
        };
        if requested.len() > 1023 || requested.chars().any(|c| c.is_control()) {
            self.stanza_error(el, "bad-request", "modify", None);
            return Ok(());
        }
        let resource = if requested.is_empty() {
            format!("sim-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
        } else {
            requested.to_owned()
        };
        let full = format!("{user}@{}/{resource}", self.node.domain);
        let (tx, rx) = mpsc::unbounded_channel();
        let sess = Arc::new(Sess {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            user: user.clone(),
            resource: resource.clone(),
            full: full.clone(),
            tx,
            pres: Mutex::new(Pres::default()),
        });
        let mut replaced = Vec::new();
        if let Some(p) = self.node.peer() {
            replaced.extend(p.take_resource(&user, &resource));
        }
        {
            let mut map = wlock(&self.node.sessions);
            if *self.kill.borrow() != self.gen {
                return Err(Exit::Killed);
            }
            let v = map.entry(user.clone()).or_default();
            if let Some(i) = v.iter().position(|s| s.resource == resource) {
                replaced.push(v.swap_remove(i));
            } else {
                self.node.bound.fetch_add(1, Ordering::Relaxed);
            }
            v.push(sess.clone());
        }
        for old in replaced {
            let _ = old.tx.send(Out::Conflict);
            self.node.session_gone(&old);
        }
        // The user moved off the peer: the peer forgets the temporary
        // presence subscriptions it held for the user, silently.
        if let Some(p) = self.node.peer() {
            if !p.has_sessions(&user) {
                lock(&p.temp).drop_target(&user);
            }
        }
        self.sess = Some(sess);
        self.rx = Some(rx);
        let id = el.attr("id").unwrap_or("");
        self.out.extend_from_slice(
            format!(
                "<iq type='result' id='{}'><bind xmlns='{NS_BIND}'><jid>{}</jid></bind></iq>",
                esc(id),
                esc(&full)
            )
            .as_bytes(),
        );
        if let Some(l) = self.login.take() {
            l.complete();
        }
        Ok(())
    }

    fn iq_result(&mut self, el: &Element, payload: &str) {
        let id = el.attr("id").unwrap_or("");
        let mut s = format!("<iq type='result' id='{}'", esc(id));
        if let Some(sess) = &self.sess {
            s.push_str(&format!(" to='{}'", esc(&sess.full)));
        }
        if let Some(from) = el.attr("to") {
            s.push_str(&format!(" from='{}'", esc(from)));
        }
        if payload.is_empty() {
            s.push_str("/>");
        } else {
            s.push('>');
            s.push_str(payload);
            s.push_str("</iq>");
        }
        self.out.extend_from_slice(s.as_bytes());
    }

    /// Answer a stanza with a stanza error (from its `to`, or the domain).
    fn stanza_error(&mut self, el: &Element, cond: &str, etype: &str, from: Option<&str>) {
        let name = match el.name.as_str() {
            n @ ("message" | "presence" | "iq") => n,
            _ => return,
        };
        let mut s = format!("<{name} type='error'");
        if let Some(id) = el.attr("id") {
            s.push_str(&format!(" id='{}'", esc(id)));
        }
        if let Some(sess) = &self.sess {
            s.push_str(&format!(" to='{}'", esc(&sess.full)));
        }
        // Like Prosody: no `from` when the request had no `to` (the account's server).
        if let Some(from) = from.or(el.attr("to")) {
            s.push_str(&format!(" from='{}'", esc(from)));
        }
        s.push_str(&format!(
            "><error type='{etype}'><{cond} xmlns='{NS_STANZAS}'/></error></{name}>"
        ));
        self.out.extend_from_slice(s.as_bytes());
    }

    fn on_message(&mut self, sess: &Arc<Sess>, el: &Element, raw: &Bytes) {
        let mtype = el.attr("type").unwrap_or("normal");
        let bounce = matches!(mtype, "chat" | "normal");
        let own_bare;
        let to = match el.attr("to") {
            Some(t) => t,
            None => {
                own_bare = format!("{}@{}", sess.user, self.node.domain);
                own_bare.as_str()
            }
        };
        let Some(j) = parse_jid(to) else {
            if mtype != "error" {
                self.stanza_error(el, "jid-malformed", "modify", None);
            }
            return;
        };
        if !j.domain.eq_ignore_ascii_case(&self.node.domain) {
            if mtype != "error" {
                self.stanza_error(el, "remote-server-not-found", "cancel", None);
            }
            return;
        }
        let Some(local) = j.local else {
            if bounce {
                self.stanza_error(el, "service-unavailable", "cancel", None);
            }
            return;
        };
        let local = lower(local);
        if !self.node.users.contains_key(local.as_ref()) {
            if bounce {
                self.stanza_error(el, "service-unavailable", "cancel", None);
            }
            return;
        }
        let data = stamp(el, raw, &sess.full);
        if let Some(r) = j.resource {
            if let Some(s) = self.node.find_full(&local, r) {
                s.send(&data);
                return;
            }
            if matches!(mtype, "groupchat") {
                self.stanza_error(el, "service-unavailable", "cancel", None);
                return;
            }
            if mtype == "error" {
                return;
            }
        }
        if self.node.deliver_best(&local, &data) == 0 && bounce {
            self.stanza_error(el, "service-unavailable", "cancel", None);
        }
    }

    fn on_presence(&mut self, sess: &Arc<Sess>, el: &Element, raw: &Bytes) {
        let ptype = el.attr("type");
        if let Some(to) = el.attr("to") {
            let Some(j) = parse_jid(to) else { return };
            if !j.domain.eq_ignore_ascii_case(&self.node.domain) {
                return;
            }
            let Some(local) = j.local.map(lower) else {
                return;
            };
            match ptype {
                None | Some("unavailable") => {
                    {
                        let mut p = lock(&sess.pres);
                        p.directed.retain(|d| d != to);
                        if ptype.is_none() && p.directed.len() < 1024 {
                            p.directed.push(to.to_owned());
                        }
                    }
                    let data = stamp(el, raw, &sess.full);
                    self.node.deliver_presence_to(to, &data);
                    if self.node.users.contains_key(local.as_ref()) {
                        self.temp_directed(sess, el, &local, ptype.is_none());
                    }
                }
                Some("probe") => {
                    if local == sess.user || self.node.is_contact(&sess.user, &local) {
                        let mut found = Vec::new();
                        self.node.each_node(|n| {
                            if let Some(v) = rlock(&n.sessions).get(local.as_ref()) {
                                found.extend(v.iter().filter_map(|s| lock(&s.pres).last.clone()));
                            }
                        });
                        for b in found {
                            sess.send(&b);
                        }
                    }
                }
                Some("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed") => {
                    let bare = format!("{}@{}", sess.user, self.node.domain);
                    let data = stamp(el, raw, &bare);
                    self.node.deliver_all_available(&local, &data);
                }
                Some("error") => {
                    if let Some(r) = j.resource {
                        if let Some(s) = self.node.find_full(&local, r) {
                            s.send(&stamp(el, raw, &sess.full));
                        }
                    }
                }
                Some(_) => self.stanza_error(el, "bad-request", "modify", None),
            }
            return;
        }
        match ptype {
            None => {
                let priority = el
                    .child("priority")
                    .and_then(|p| p.text.trim().parse::<i32>().ok())
                    .unwrap_or(0)
                    .clamp(-128, 127);
                let data = stamp(el, raw, &sess.full);
                let was = {
                    let mut p = lock(&sess.pres);
                    let was = p.available;
                    p.available = true;
                    p.priority = priority;
                    p.last = Some(data.clone());
                    was
                };
                self.node.broadcast(&sess.user, &data, None);
                self.node.temp_notify(&sess.user, &sess.full, &data);
                if !was {
                    let mut current = Vec::new();
                    self.node.each_interested(&sess.user, true, |s| {
                        if s.id != sess.id {
                            if let Some(b) = &lock(&s.pres).last {
                                current.push(b.clone());
                            }
                        }
                    });
                    for b in current {
                        sess.send(&b);
                    }
                }
            }
            Some("unavailable") => {
                let data = stamp(el, raw, &sess.full);
                let (was, directed) = {
                    let mut p = lock(&sess.pres);
                    let was = p.available;
                    p.available = false;
                    p.last = None;
                    (was, std::mem::take(&mut p.directed))
                };
                if was {
                    self.node.broadcast(&sess.user, &data, None);
                    sess.send(&data);
                    self.node.temp_notify(&sess.user, &sess.full, &data);
                }
                for t in directed {
                    self.node.deliver_presence_to(&t, &data);
                }
            }
            _ => {}
        }
    }

    fn on_iq(&mut self, sess: &Arc<Sess>, el: &Element, raw: &Bytes) {
        let itype = el.attr("type").unwrap_or("");
        let request = matches!(itype, "get" | "set");
        if !request && !matches!(itype, "result" | "error") {
            self.stanza_error(el, "bad-request", "modify", None);
            return;
        }
        let bare = format!("{}@{}", sess.user, self.node.domain);
        let to = el.attr("to");
        let for_server = match to {
            None => true,
            Some(t) => t.eq_ignore_ascii_case(&self.node.domain) || t.eq_ignore_ascii_case(&bare),
        };
        if for_server {
            if request {
                self.server_iq(el, itype, to.is_some_and(|t| t.eq_ignore_ascii_case(&bare)));
            } else {
                self.temp_disco_answer(sess, el);
            }
            return;
        }
        let target = to
            .and_then(parse_jid)
            .filter(|j| j.domain.eq_ignore_ascii_case(&self.node.domain));
        let Some(j) = target else {
            if request {
                self.stanza_error(el, "remote-server-not-found", "cancel", None);
            }
            return;
        };
        if let (Some(local), Some(r)) = (j.local, j.resource) {
            if let Some(s) = self.node.find_full(&lower(local), r) {
                s.send(&stamp(el, raw, &sess.full));
                return;
            }
        }
        if request {
            self.stanza_error(el, "service-unavailable", "cancel", None);
        }
    }

    /// Directed presence from `sess` to `target` (a user of the domain):
    /// subscribes or unsubscribes temporary presence by its caps.
    fn temp_directed(&mut self, sess: &Arc<Sess>, el: &Element, target: &str, available: bool) {
        let caps = el
            .child_ns("c", NS_CAPS)
            .and_then(|c| Some((c.attr("node")?, c.attr("ver")?)));
        let (Some((cnode, ver)), true) = (caps, available) else {
            self.node.temp_unsubscribe(sess.id, target);
            return;
        };
        let known = lock(&self.node.temp).caps.get(ver).copied();
        match known {
            Some(true) => self.node.temp_subscribe(sess, target),
            Some(false) => self.node.temp_unsubscribe(sess.id, target),
            None => {
                let id = {
                    let mut t = lock(&self.node.temp);
                    if let Some(p) = t
                        .pending
                        .values_mut()
                        .find(|p| p.ver == ver && p.watcher_id == sess.id)
                    {
                        if !p.targets.iter().any(|x| x == target) {
                            p.targets.push(target.to_owned());
                        }
                        return;
                    }
                    t.next_id += 1;
                    t.disco_queries += 1;
                    let id = format!("tp-disco-{}", t.next_id);
                    t.pending.insert(
                        id.clone(),
                        PendingDisco {
                            ver: ver.to_owned(),
                            watcher_id: sess.id,
                            targets: vec![target.to_owned()],
                        },
                    );
                    id
                };
                self.out.extend_from_slice(
                    format!(
                        "<iq type='get' id='{id}' from='{}' to='{}'><query xmlns='{NS_DISCO_INFO}' node='{}#{}'/></iq>",
                        esc(&self.node.domain),
                        esc(&sess.full),
                        esc(cnode),
                        esc(ver)
                    )
                    .as_bytes(),
                );
            }
        }
    }

    /// A watcher's answer to the node's disco#info query for a caps `ver`.
    fn temp_disco_answer(&mut self, sess: &Arc<Sess>, el: &Element) {
        let Some(id) = el.attr("id") else { return };
        let pending = {
            let mut t = lock(&self.node.temp);
            match t.pending.get(id) {
                Some(p) if p.watcher_id == sess.id => t.pending.remove(id),
                _ => None,
            }
        };
        let Some(p) = pending else { return };
        if el.attr("type") != Some("result") {
            return;
        }
        let has = el.child_ns("query", NS_DISCO_INFO).is_some_and(|q| {
            q.children
                .iter()
                .any(|f| f.local() == "feature" && f.attr("var") == Some(TEMP_PRESENCE_NOTIFY))
        });
        lock(&self.node.temp).caps.insert(p.ver, has);
        for target in p.targets {
            if has {
                self.node.temp_subscribe(sess, &target);
            } else {
                self.node.temp_unsubscribe(sess.id, &target);
            }
        }
    }

    fn server_iq(&mut self, el: &Element, itype: &str, to_account: bool) {
        let Some(payload) = el.children.first() else {
            self.stanza_error(el, "bad-request", "modify", None);
            return;
        };
        let ns = payload.ns().unwrap_or("");
        match (itype, payload.local(), ns) {
            ("get", "ping", NS_PING) => self.iq_result(el, ""),
            ("get", "query", NS_ROSTER) => {
                let user = self
                    .sess
                    .as_ref()
                    .map(|s| s.user.clone())
                    .unwrap_or_default();
                let mut q = format!("<query xmlns='{NS_ROSTER}' ver='1'>");
                for c in self.node.roster_items(&user) {
                    q.push_str(&format!(
                        "<item jid='{}@{}' subscription='both'/>",
                        esc(&c),
                        esc(&self.node.domain)
                    ));
                }
                q.push_str("</query>");
                self.iq_result(el, &q);
            }
            ("set", "query", NS_ROSTER) => self.stanza_error(el, "not-allowed", "cancel", None),
            ("set", "session", NS_SESSION) => self.iq_result(el, ""),
            ("set", "bind", NS_BIND) => self.stanza_error(el, "not-allowed", "cancel", None),
            ("get", "query", NS_DISCO_INFO) => {
                let node = payload
                    .attr("node")
                    .map(|n| format!(" node='{}'", esc(n)))
                    .unwrap_or_default();
                let body = if to_account {
                    "<identity category='account' type='registered'/>".to_owned()
                } else {
                    format!(
                        "<identity category='server' name='prg-sim' type='im'/><feature var='{NS_DISCO_INFO}'/><feature var='{NS_DISCO_ITEMS}'/><feature var='{NS_ROSTER}'/><feature var='{NS_PING}'/>"
                    )
                };
                self.iq_result(
                    el,
                    &format!("<query xmlns='{NS_DISCO_INFO}'{node}>{body}</query>"),
                );
            }
            ("get", "query", NS_DISCO_ITEMS) => {
                let node = payload
                    .attr("node")
                    .map(|n| format!(" node='{}'", esc(n)))
                    .unwrap_or_default();
                self.iq_result(el, &format!("<query xmlns='{NS_DISCO_ITEMS}'{node}/>"));
            }
            _ => self.stanza_error(el, "service-unavailable", "cancel", None),
        }
    }
}

fn decode_b64(data: &str) -> Option<Vec<u8>> {
    if data == "=" {
        return Some(Vec::new());
    }
    B64.decode(data).ok()
}

/// Re-emit a stanza with `from` set to `from` (any client-given `from` replaced).
fn stamp(el: &Element, raw: &[u8], from: &str) -> Bytes {
    let tail = match tag_end(raw) {
        Some(i) if i > 0 && raw[i - 1] == b'/' => i - 1,
        Some(i) => i,
        None => raw.len(),
    };
    let mut s = Vec::with_capacity(raw.len() + from.len() + 16);
    s.push(b'<');
    s.extend_from_slice(el.name.as_bytes());
    for (k, v) in &el.attrs {
        if k != "from" {
            s.push(b' ');
            s.extend_from_slice(k.as_bytes());
            s.extend_from_slice(b"='");
            s.extend_from_slice(esc(v).as_bytes());
            s.push(b'\'');
        }
    }
    s.extend_from_slice(b" from='");
    s.extend_from_slice(esc(from).as_bytes());
    s.push(b'\'');
    s.extend_from_slice(&raw[tail..]);
    Bytes::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_picks_slots_for_50ms_work() {
        let c = LoginCapacity::per_second(100.0);
        assert_eq!(c.concurrent, 5);
        assert_eq!(c.work_per_login, Duration::from_millis(50));
        assert_eq!(c.queue_timeout, Duration::from_secs(8));
        assert!((c.rate() - 100.0).abs() < 1e-9);
        assert_eq!(LoginCapacity::per_second(30.0).concurrent, 2);
        assert_eq!(LoginCapacity::per_second(1.0).concurrent, 1);
        assert_eq!(LoginCapacity::per_second(0.0).concurrent, 1);
        assert_eq!(LoginCapacity::per_second(-3.0).concurrent, 1);
        assert_eq!(LoginCapacity::per_second(f64::NAN).concurrent, 1);
        assert_eq!(LoginCapacity::per_second(f64::INFINITY).concurrent, 1);
    }

    /// Start `n` admissions at once; (admitted, refused) with each one's
    /// time to decision.
    async fn burst(gate: Arc<LoginGate>, n: usize) -> Vec<(bool, Duration)> {
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let g = gate.clone();
                tokio::spawn(async move { (g.admit().await, t0.elapsed()) })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("admit task"));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn gate_below_capacity_costs_the_work() {
        let gate = Arc::new(LoginGate::new(LoginCapacity {
            concurrent: 4,
            work_per_login: Duration::from_millis(100),
            queue_timeout: Duration::from_secs(1),
        }));
        for r in burst(gate, 4).await {
            assert_eq!(r, (true, Duration::from_millis(100)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gate_queues_then_refuses_above_capacity() {
        // 2 slots × 100 ms = 20 logins/s; a burst of 12 is 3× a 200 ms window.
        let gate = Arc::new(LoginGate::new(LoginCapacity {
            concurrent: 2,
            work_per_login: Duration::from_millis(100),
            queue_timeout: Duration::from_millis(250),
        }));
        let r = burst(gate.clone(), 12).await;
        let ok: Vec<Duration> = r.iter().filter(|x| x.0).map(|x| x.1).collect();
        let refused: Vec<Duration> = r.iter().filter(|x| !x.0).map(|x| x.1).collect();
        // FIFO: slots free at 100 ms and 200 ms; the wait at 300 ms exceeds 250 ms.
        assert_eq!(
            ok,
            [100, 100, 200, 200, 300, 300].map(Duration::from_millis)
        );
        assert_eq!(refused, vec![Duration::from_millis(250); 6]);
        // Once the storm is over the node is fast again.
        assert_eq!(
            burst(gate, 2).await,
            vec![(true, Duration::from_millis(100)); 2]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_slots_is_one() {
        let gate = Arc::new(LoginGate::new(LoginCapacity {
            concurrent: 0,
            work_per_login: Duration::from_millis(10),
            queue_timeout: Duration::from_secs(1),
        }));
        let r = burst(gate, 3).await;
        assert_eq!(
            r.iter().map(|x| x.1).collect::<Vec<_>>(),
            [10, 20, 30].map(Duration::from_millis)
        );
    }
}
