//! Configuration: TOML, `deny_unknown_fields`, validated completely before any
//! socket is bound.
//!
//! [`Config::load`] parses and [`Config::validate`] checks every rule (group
//! name and description characters, node count and distinctness, address
//! forms, limits). A [`ConfigError`] always names the offending key, so that
//! `prg-proxy check --config FILE` and startup can say exactly what to fix;
//! the binary exits with code 64 (`EX_USAGE`) on any of them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration problem, naming the key that caused it.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `group.name` or `nodes[1].address`.
    pub key: String,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole proxy configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The presence redundancy group in front of which the proxy sits.
    pub group: GroupConfig,
    /// The group's one or two nodes, in order: the first is node 1 (primary
    /// in active/standby mode).
    pub nodes: Vec<NodeConfig>,
    /// Server Recovery Manager parameters (heartbeats, critical services).
    #[serde(default)]
    pub srm: SrmConfig,
    /// Client-facing listeners.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Client-facing TLS certificate(s).
    pub tls: TlsConfig,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// DNS for SRV node addresses.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Re-login hints and the login pacer.
    #[serde(default)]
    pub failover: FailoverConfig,
    /// The admin HTTP API and status page.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Restoring temporary presence subscriptions (Cisco Jabber) after a
    /// failover, fallback or user move.
    #[serde(default)]
    pub temp_presence: TempPresenceConfig,
}

/// Restoring temporary presence subscriptions (the `presence` module).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TempPresenceConfig {
    /// Keep and replay subscriptions at all.
    pub enabled: bool,
    /// Most (watcher, target) pairs one watcher may hold.
    pub max_pairs_per_watcher: usize,
    /// Most pairs in all.
    pub max_pairs: usize,
    /// Replays per second, over all watchers.
    pub replay_rate: f64,
    /// The 30-second rule: no replay of a pair sooner than this after its
    /// last subscribe or unsubscribe (a watcher must wait that long between
    /// two searches of the same user).
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// A pair is forgotten this long after its last subscribe (IM&P drops
    /// it then too).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a watcher whose streams all ended without a logout (a
    /// failover, a move, a lost connection) keeps its pairs for replay.
    #[serde(with = "humantime_serde")]
    pub watcher_linger: Duration,
    /// After a moved watcher binds again, how long its client has to
    /// resubscribe by itself before the proxy replays for it.
    #[serde(with = "humantime_serde")]
    pub watcher_grace: Duration,
}

impl Default for TempPresenceConfig {
    fn default() -> Self {
        TempPresenceConfig {
            enabled: true,
            max_pairs_per_watcher: 200,
            max_pairs: 1_000_000,
            replay_rate: 200.0,
            min_interval: Duration::from_secs(30),
            ttl: Duration::from_secs(8 * 3600),
            watcher_linger: Duration::from_secs(900),
            watcher_grace: Duration::from_secs(5),
        }
    }
}

impl TempPresenceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_pairs_per_watcher == 0 {
            return Err(ConfigError::new(
                "temp_presence.max_pairs_per_watcher",
                "must be at least 1",
            ));
        }
        if self.max_pairs < self.max_pairs_per_watcher {
            return Err(ConfigError::new(
                "temp_presence.max_pairs",
                "must be at least temp_presence.max_pairs_per_watcher",
            ));
        }
        if !(self.replay_rate.is_finite() && self.replay_rate > 0.0 && self.replay_rate <= 1e6) {
            return Err(ConfigError::new(
                "temp_presence.replay_rate",
                "must be a positive number of replays per second, at most 1000000",
            ));
        }
        if self.ttl.is_zero() {
            return Err(ConfigError::new("temp_presence.ttl", "must be positive"));
        }
        if self.min_interval > self.ttl {
            return Err(ConfigError::new(
                "temp_presence.min_interval",
                "must not exceed temp_presence.ttl",
            ));
        }
        for (k, d) in [
            ("watcher_linger", self.watcher_linger),
            ("watcher_grace", self.watcher_grace),
            ("min_interval", self.min_interval),
        ] {
            if d > Duration::from_secs(86_400) {
                return Err(ConfigError::new(
                    format!("temp_presence.{k}"),
                    "must be at most 24h",
                ));
            }
        }
        Ok(())
    }
}

/// The admin HTTP API and status page (the `admin` module).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the API at all (default true).
    pub enabled: bool,
    /// Where (default `127.0.0.1:20075`). Off loopback a token is required.
    pub listen: SocketAddr,
    /// Bearer token required by mutating calls (optional on loopback).
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 20075)),
            token: None,
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.token {
            if t.trim().is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::new(
                    "admin.token",
                    "a token must be non-empty and contain no whitespace",
                ));
            }
        }
        if self.enabled && self.token.is_none() && !self.listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "admin.token",
                format!(
                    "the admin API listens on {}, which is not a loopback address; \
                     set admin.token (or listen on 127.0.0.1)",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

/// DNS resolution of `srv` node names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers to ask (UDP and TCP, port included); empty = the
    /// system's resolver configuration (`/etc/resolv.conf`).
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
}

/// How users are spread over the group's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AssignmentMode {
    /// Users spread evenly over both nodes (the source's default).
    #[default]
    Balanced,
    /// Every user on the first node; the second is the backup.
    ActiveStandby,
    /// No user is assigned: nobody can log in.
    None,
}

/// The presence redundancy group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// At most 128 letters, digits, `_` and `-`.
    pub name: String,
    /// At most 128 characters, none of `"` `%` `&` `\` `<` `>`.
    #[serde(default)]
    pub description: String,
    /// Whether the group fails over automatically. Off by default, as in the
    /// source: an operator enables it once both nodes are known good.
    #[serde(default)]
    pub high_availability: bool,
    /// User assignment mode.
    #[serde(default)]
    pub assignment: AssignmentMode,
    /// XMPP domain(s) served; the first is the default.
    pub domains: Vec<String>,
    /// Optional per-user assignments: a TOML file with a `[users]` table
    /// mapping bare JIDs to node names (balanced: overrides of the spread;
    /// none: the only users who may log in).
    #[serde(default)]
    pub assignment_file: Option<PathBuf>,
}

/// How the proxy talks to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Plain TCP (a node on the same host or a trusted segment).
    #[default]
    None,
    /// STARTTLS after the stream opens.
    Starttls,
    /// TLS from the first byte (XEP-0368).
    Direct,
}

/// One node of the group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name, shown in logs, hints and the status page.
    pub name: String,
    /// `host:port` of the node's client port.
    #[serde(default)]
    pub address: Option<String>,
    /// A domain whose `_xmpp-client._tcp` SRV records name the node.
    #[serde(default)]
    pub srv: Option<String>,
    /// TLS towards the node.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// PEM file of the CA certificates trusted for the node (required when
    /// `tls` is not `none`).
    #[serde(default)]
    pub tls_roots: Option<PathBuf>,
    /// Name checked in the node's certificate (default: the host or SRV domain).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Client re-login lower limit for this node (source default 120 s).
    #[serde(default = "default_relogin_lower", with = "humantime_serde")]
    pub relogin_lower: Duration,
    /// Client re-login upper limit for this node (source default 537 s).
    #[serde(default = "default_relogin_upper", with = "humantime_serde")]
    pub relogin_upper: Duration,
    /// How the proxy checks that the node is alive, every
    /// `srm.heartbeat_interval`.
    #[serde(default)]
    pub heartbeat: HeartbeatKind,
    /// Start every connection to the node with a PROXY protocol v2 header:
    /// the client's address for relayed logins, the proxy's own for
    /// heartbeats and probes. Only for nodes (or load balancers) that
    /// expect it.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Services the node cannot serve users without: when one stays down
    /// for `srm.critical_service_delay`, the node's users fail over.
    #[serde(default)]
    pub critical_services: Vec<CriticalServiceConfig>,
}

/// The kind of heartbeat sent to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HeartbeatKind {
    /// A TCP connect to the client port: cheapest, but a node whose XMPP
    /// service is wedged still looks alive.
    Tcp,
    /// Open an XMPP stream and read the features: proves the service
    /// answers, and refreshes the SASL mechanisms offered to clients.
    #[default]
    Xmpp,
    /// Log in with `srm.monitor_user` (SASL PLAIN), bind and send an XEP-0199
    /// ping: proves the authentication service and the session manager
    /// work. A refused login reports the authentication service down.
    Login,
}

/// How a critical service is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CriticalServiceKind {
    /// TCP connect to `host:port`.
    Tcp,
    /// `GET http://host:port/path`, expecting a 2xx status.
    Http,
    /// TCP connect to the database's `host:port`; a failure is reported as
    /// a database failure (reason "Database Failure"), not a service.
    Database,
}

/// One critical service of a node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriticalServiceConfig {
    /// Name shown in logs and on the status page, e.g. "Cisco XCP Router".
    pub name: String,
    /// How to probe it.
    pub kind: CriticalServiceKind,
    /// `host:port` (tcp, database) or `host:port/path` (http).
    pub target: String,
}

fn default_relogin_lower() -> Duration {
    Duration::from_secs(120)
}
fn default_relogin_upper() -> Duration {
    Duration::from_secs(537)
}

/// Server Recovery Manager parameters, with the source's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SrmConfig {
    /// Port the SRM peers talk on (informational for the proxy; 22001).
    pub service_port: u16,
    /// Admin RPC / HTTP port (20075).
    pub admin_rpc_port: u16,
    /// How long a critical service may be down before failover (90 s).
    #[serde(with = "humantime_serde")]
    pub critical_service_delay: Duration,
    /// Move users back to the primary after it has been healthy for
    /// `auto_fallback_after` (off by default).
    pub auto_fallback: bool,
    /// Healthy time before an automatic fallback (30 min).
    #[serde(with = "humantime_serde")]
    pub auto_fallback_after: Duration,
    /// Heartbeat timeout while initializing (120 s).
    #[serde(with = "humantime_serde")]
    pub initial_heartbeat_timeout: Duration,
    /// Heartbeat timeout (60 s).
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Heartbeat interval (15 s).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Fail over when the node's authentication service fails (a login
    /// with `monitor_user` is then part of every heartbeat).
    pub auth_service_monitoring: bool,
    /// Account used by "login" heartbeats and authentication service
    /// monitoring: the SASL authentication identity (usually the
    /// localpart). It needs no roster and should have no other use.
    pub monitor_user: Option<String>,
    /// Password of `monitor_user`.
    pub monitor_password: Option<String>,
    /// Bound on one probe, connect included (5 s; never more than
    /// `heartbeat_interval`): a probe that hangs must not delay the next
    /// heartbeat.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Act on strong evidence before the heartbeat timeout: when the relayed
    /// connections to a node fail together and an immediate connect is
    /// refused, the node is down now (a crash is seen in well under a
    /// second instead of a minute).
    pub fast_detect: bool,
    /// How close together relay failures must be to count as one event (2 s).
    #[serde(with = "humantime_serde")]
    pub fast_detect_window: Duration,
    /// Relay failures within the window that are strong evidence even when
    /// the node still has other sessions (3). Fewer suffice when every
    /// session the node had failed.
    pub fast_detect_failures: usize,
}

impl Default for SrmConfig {
    fn default() -> Self {
        SrmConfig {
            service_port: 22001,
            admin_rpc_port: 20075,
            critical_service_delay: Duration::from_secs(90),
            auto_fallback: false,
            auto_fallback_after: Duration::from_secs(30 * 60),
            initial_heartbeat_timeout: Duration::from_secs(120),
            heartbeat_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(15),
            auth_service_monitoring: false,
            monitor_user: None,
            monitor_password: None,
            probe_timeout: Duration::from_secs(5),
            fast_detect: true,
            fast_detect_window: Duration::from_secs(2),
            fast_detect_failures: 3,
        }
    }
}

/// Client-facing listeners. Without a `[listen]` table both listen on their
/// standard ports; with one, exactly the listeners it names are opened (at
/// least one).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// STARTTLS listener (XMPP default 5222).
    #[serde(default)]
    pub starttls: Option<SocketAddr>,
    /// Direct TLS listener (XEP-0368, default 5223, ALPN `xmpp-client`).
    #[serde(default)]
    pub direct_tls: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            starttls: Some(SocketAddr::from(([0, 0, 0, 0], 5222))),
            direct_tls: Some(SocketAddr::from(([0, 0, 0, 0], 5223))),
        }
    }
}

/// Client-facing TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain for the default domain.
    pub cert: PathBuf,
    /// PEM private key for `cert`.
    pub key: PathBuf,
    /// Extra certificates chosen by SNI, one per served domain.
    #[serde(default)]
    pub sni: Vec<SniCert>,
}

/// A certificate served for one SNI name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    /// The server name clients ask for.
    pub domain: String,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Limits and timeouts. Every one is a knob with a default that suits a
/// production pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent client connections; one more is told
    /// `<resource-constraint/>` at once and closed.
    pub max_connections: usize,
    /// Over-capacity clients being told so at one time (per listener);
    /// beyond it they are closed without a word.
    pub over_capacity_refusals: usize,
    /// Time allowed for the client's TLS handshake.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Time from accept until the client's `<auth>` is forwarded to a node.
    #[serde(with = "humantime_serde")]
    pub pre_auth_timeout: Duration,
    /// Largest stanza accepted from either side (advertised with XEP-0478).
    pub max_stanza_bytes: usize,
    /// Time allowed to connect to a node and read its stream features.
    #[serde(with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// Socket read size per direction. A session between stanzas holds no
    /// read buffer (its reads go through the worker thread's scratch
    /// buffer), so this costs memory only during login and while a stanza
    /// is split across reads; 16 KiB takes a TLS record or a node's burst
    /// in one read.
    pub read_buffer_bytes: usize,
    /// Grace period for connections to drain on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Deadline for one write to a client or a node: a peer that does not
    /// take the bytes within it is disconnected (an eviction then still
    /// completes within it).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// After the client closed its stream, how long the proxy waits for the
    /// node's `</stream:stream>` before closing the node connection.
    #[serde(with = "humantime_serde")]
    pub close_wait: Duration,
    /// Failed authentications on one stream (refused by the proxy or by
    /// the node) before the proxy closes it with `<policy-violation/>`.
    pub max_auth_attempts: u32,
    /// Largest element accepted from a client before SASL success (only
    /// `<starttls/>`, `<auth>`, `<response>` and `<abort/>` are valid there).
    pub pre_auth_stanza_bytes: usize,
    /// Deepest element nesting accepted inside one stanza, either side.
    pub max_depth: u32,
    /// Most attributes accepted on one element, either side.
    pub max_attributes: u32,
    /// Failed authentications from one source address within
    /// `auth_fail_window` after which its logins are refused for
    /// `auth_ban_time` (0 switches the cooling-off off).
    pub auth_fail_limit: u32,
    /// The window `auth_fail_limit` counts failures in.
    #[serde(with = "humantime_serde")]
    pub auth_fail_window: Duration,
    /// How long a source address over `auth_fail_limit` is refused.
    #[serde(with = "humantime_serde")]
    pub auth_ban_time: Duration,
    /// Bytes that may wait to be injected into one client stream (replayed
    /// stanzas); further injections are refused.
    pub inject_queue_bytes: usize,
    /// With stream management (XEP-0198) on, the client messages one
    /// stream retains until the node acknowledges them (to bounce them if
    /// the node never does); beyond it they are not retained.
    pub sm_max_unacked_stanzas: usize,
    /// The bytes of those messages one stream retains.
    pub sm_max_unacked_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 50_000,
            over_capacity_refusals: 64,
            tls_handshake_timeout: Duration::from_secs(10),
            pre_auth_timeout: Duration::from_secs(30),
            max_stanza_bytes: 262_144,
            upstream_connect_timeout: Duration::from_secs(10),
            read_buffer_bytes: 16384,
            shutdown_grace: Duration::from_secs(10),
            write_timeout: Duration::from_secs(15),
            close_wait: Duration::from_secs(5),
            max_auth_attempts: 5,
            pre_auth_stanza_bytes: 16_384,
            max_depth: 64,
            max_attributes: 50,
            auth_fail_limit: 20,
            auth_fail_window: Duration::from_secs(60),
            auth_ban_time: Duration::from_secs(600),
            inject_queue_bytes: 524_288,
            sm_max_unacked_stanzas: 500,
            sm_max_unacked_bytes: 1_048_576,
        }
    }
}

/// How the re-login window of a move is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowMode {
    /// Slots spread over the target node's `[relogin_lower, relogin_upper]`.
    Fixed,
    /// The window opens as soon as the move is done and lasts N / (the rate
    /// the pacer admits at the target node now), within the target node's
    /// `relogin_upper`.
    Adaptive,
}

/// Re-login hints and the login pacer (`[failover]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Whether logins are paced at all. Off, every login goes to its node
    /// at once, as through a plain TCP proxy (hints are still given).
    pub pacing: bool,
    /// How a move's re-login window is laid out.
    pub window: WindowMode,
    /// Longest time a login is held inside SASL waiting for its turn;
    /// a login whose turn is further off is refused with a fresh hint.
    /// Keep it below the usual 30 s client timeouts.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
    /// The login rate (per second and node) the pacer starts at.
    pub initial_rate: f64,
    /// The adaptive rate never drops below this (logins per second).
    pub min_rate: f64,
    /// The adaptive rate never exceeds this (logins per second).
    pub max_rate: f64,
    /// The pacer lowers the rate when a node's login latency exceeds this
    /// multiple of its unloaded latency.
    pub latency_tolerance: f64,
    /// How often the pacer revises a node's rate.
    #[serde(with = "humantime_serde")]
    pub adjust_interval: Duration,
    /// How long an evicted user's slot is remembered after its time.
    #[serde(with = "humantime_serde")]
    pub slot_grace: Duration,
    /// Window over which a proxy shutdown spreads its re-login hints.
    #[serde(with = "humantime_serde")]
    pub shutdown_spread: Duration,
    /// A refused login waits this long (at most its remaining pre-auth
    /// time) before its `<resource-constraint/>`, so that clients which
    /// retry at once do not loop.
    #[serde(with = "humantime_serde")]
    pub refuse_delay: Duration,
    /// The furthest turn a refused login is given when its turn is the
    /// pacer's estimate (the queue ahead at today's rate): a rate that grows
    /// meanwhile then brings it in sooner. A planned slot stands.
    #[serde(with = "humantime_serde")]
    pub max_turn: Duration,
    /// The proxy's client-facing `host:port`: when set, evicted streams end
    /// with `<see-other-host>` naming it, which clients that do not reconnect
    /// after other stream errors follow by themselves.
    pub redirect: Option<String>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            pacing: true,
            window: WindowMode::Adaptive,
            max_hold: Duration::from_secs(20),
            initial_rate: 50.0,
            min_rate: 2.0,
            max_rate: 2000.0,
            latency_tolerance: 1.5,
            adjust_interval: Duration::from_millis(500),
            slot_grace: Duration::from_secs(600),
            shutdown_spread: Duration::from_secs(30),
            refuse_delay: Duration::from_secs(5),
            max_turn: Duration::from_secs(300),
            redirect: None,
        }
    }
}

impl FailoverConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let rate_ok = |r: f64| r.is_finite() && r > 0.0;
        for (k, r) in [
            ("initial_rate", self.initial_rate),
            ("min_rate", self.min_rate),
            ("max_rate", self.max_rate),
        ] {
            if !rate_ok(r) {
                return Err(ConfigError::new(
                    format!("failover.{k}"),
                    "must be a positive number of logins per second",
                ));
            }
        }
        if self.min_rate > self.max_rate {
            return Err(ConfigError::new(
                "failover.min_rate",
                "must not exceed failover.max_rate",
            ));
        }
        if !(self.min_rate..=self.max_rate).contains(&self.initial_rate) {
            return Err(ConfigError::new(
                "failover.initial_rate",
                "must lie between failover.min_rate and failover.max_rate",
            ));
        }
        if !(self.latency_tolerance.is_finite() && self.latency_tolerance > 1.0) {
            return Err(ConfigError::new(
                "failover.latency_tolerance",
                "must be a number greater than 1",
            ));
        }
        if let Some(r) = &self.redirect {
            let ok = r.rsplit_once(':').is_some_and(|(h, p)| {
                !h.is_empty()
                    && !h.contains(['<', '>', '&', '\'', '"', ' '])
                    && p.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(ConfigError::new(
                    "failover.redirect",
                    "must be the proxy's client-facing host:port, e.g. \"xmpp.example.com:5222\"",
                ));
            }
        }
        for (k, d) in [
            ("max_hold", self.max_hold),
            ("max_turn", self.max_turn),
            ("adjust_interval", self.adjust_interval),
            ("shutdown_spread", self.shutdown_spread),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(
                    format!("failover.{k}"),
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("<file>", format!("{}: {e}", path.display())))?;
        let mut config = Config::parse(&text)?;
        // Relative paths in the file are relative to the file's folder.
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without touching the file system (validation is
    /// separate so that tests can build a config in memory).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let key = toml_error_key(&e, text);
            ConfigError::new(key, e.to_string().trim_end().to_string())
        })
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        for s in &mut self.tls.sni {
            fix(&mut s.cert);
            fix(&mut s.key);
        }
        for n in &mut self.nodes {
            if let Some(r) = &mut n.tls_roots {
                fix(r);
            }
        }
        if let Some(f) = &mut self.group.assignment_file {
            fix(f);
        }
    }

    /// Checks every rule; the first violation is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_group_name(&self.group.name)?;
        validate_description(&self.group.description)?;
        if self.group.domains.is_empty() {
            return Err(ConfigError::new(
                "group.domains",
                "at least one XMPP domain is required",
            ));
        }
        for (i, d) in self.group.domains.iter().enumerate() {
            if !is_domain(d) {
                return Err(ConfigError::new(
                    format!("group.domains[{i}]"),
                    format!("{d:?} is not a valid domain name"),
                ));
            }
        }
        match self.nodes.len() {
            0 => {
                return Err(ConfigError::new(
                    "nodes",
                    "a group needs one or two nodes, found none",
                ))
            }
            1 | 2 => {}
            n => {
                return Err(ConfigError::new(
                    "nodes",
                    format!("a group has at most two nodes, found {n}"),
                ))
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            n.validate(&format!("nodes[{i}]"))?;
        }
        if self.nodes.len() == 2 {
            let (a, b) = (&self.nodes[0], &self.nodes[1]);
            if a.name == b.name {
                return Err(ConfigError::new(
                    "nodes[1].name",
                    format!(
                        "the two nodes of a group must differ; both are named {:?}",
                        a.name
                    ),
                ));
            }
            if a.address.is_some() && a.address == b.address {
                return Err(ConfigError::new(
                    "nodes[1].address",
                    "the two nodes of a group must differ; both have the same address",
                ));
            }
            if a.srv.is_some() && a.srv == b.srv {
                return Err(ConfigError::new(
                    "nodes[1].srv",
                    "the two nodes of a group must differ; both have the same SRV name",
                ));
            }
        }
        if self.listen.starttls.is_none() && self.listen.direct_tls.is_none() {
            return Err(ConfigError::new(
                "listen",
                "set at least one of listen.starttls and listen.direct_tls",
            ));
        }
        let mut listeners = vec![
            ("listen.starttls", self.listen.starttls),
            ("listen.direct_tls", self.listen.direct_tls),
        ];
        if self.admin.enabled {
            listeners.push(("admin.listen", Some(self.admin.listen)));
        }
        for (i, (ka, a)) in listeners.iter().enumerate() {
            for (kb, b) in &listeners[i + 1..] {
                if let (Some(a), Some(b)) = (a, b) {
                    if listen_overlap(*a, *b) {
                        return Err(ConfigError::new(
                            *kb,
                            format!("{b} is the port of {ka} ({a}); each listener needs its own"),
                        ));
                    }
                }
            }
        }
        for (i, s) in self.tls.sni.iter().enumerate() {
            if !is_domain(&s.domain) {
                return Err(ConfigError::new(
                    format!("tls.sni[{i}].domain"),
                    format!("{:?} is not a valid domain name", s.domain),
                ));
            }
        }
        self.srm.validate()?;
        let login_heartbeat = self
            .nodes
            .iter()
            .position(|n| n.heartbeat == HeartbeatKind::Login);
        if login_heartbeat.is_some() || self.srm.auth_service_monitoring {
            let why = match login_heartbeat {
                Some(i) => format!("nodes[{i}].heartbeat is \"login\""),
                None => "srm.auth_service_monitoring is on".to_string(),
            };
            for (key, v) in [
                ("srm.monitor_user", &self.srm.monitor_user),
                ("srm.monitor_password", &self.srm.monitor_password),
            ] {
                if v.as_deref().map_or(true, str::is_empty) {
                    return Err(ConfigError::new(
                        key,
                        format!("required because {why}: the proxy logs in with this account"),
                    ));
                }
            }
        }
        self.limits.validate()?;
        self.failover.validate()?;
        self.admin.validate()?;
        self.temp_presence.validate()?;
        if self.group.assignment_file.is_some()
            && self.group.assignment == AssignmentMode::ActiveStandby
        {
            return Err(ConfigError::new(
                "group.assignment_file",
                "active-standby puts every user on node 1; per-user assignments apply to balanced and none",
            ));
        }
        Ok(())
    }

    /// Reads the optional per-user assignment file: bare JID → node index.
    pub fn load_assignment_overrides(&self) -> Result<HashMap<String, usize>, ConfigError> {
        let Some(path) = &self.group.assignment_file else {
            return Ok(HashMap::new());
        };
        let key = "group.assignment_file";
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(key, format!("{}: {e}", path.display())))?;
        parse_assignment_overrides(&text, &self.nodes)
            .map_err(|m| ConfigError::new(key, format!("{}: {m}", path.display())))
    }

    /// The node names, in order.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }
}

/// Parses an assignment file (`[users]` table of bare JID → node name).
/// Keys are normalised by [`crate::jid::normalize_bare`]; an invalid JID,
/// or two spellings of one JID, is an error naming it.
pub fn parse_assignment_overrides(
    text: &str,
    nodes: &[NodeConfig],
) -> Result<HashMap<String, usize>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        users: HashMap<String, String>,
    }
    let f: File = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let mut out = HashMap::with_capacity(f.users.len());
    for (jid, node) in f.users {
        let Some(idx) = nodes.iter().position(|n| n.name == node) else {
            return Err(format!("user {jid:?} is assigned to unknown node {node:?}"));
        };
        let bare = crate::jid::normalize_bare(&jid).map_err(|e| format!("[users]: {e}"))?;
        if let Some(prev) = out.insert(bare.clone(), idx) {
            if prev != idx {
                return Err(format!(
                    "user {bare:?} is assigned to both {:?} and {:?} (two spellings of one JID)",
                    nodes[prev].name, nodes[idx].name
                ));
            }
        }
    }
    Ok(out)
}

impl NodeConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || self.name.len() > 128
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::new(
                format!("{at}.name"),
                "a node name is 1 to 128 letters, digits, `.`, `_` or `-`",
            ));
        }
        match (&self.address, &self.srv) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    format!("{at}.srv"),
                    "give either `address` or `srv`, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    format!("{at}.address"),
                    "a node needs `address = \"host:port\"` or `srv = \"domain\"`",
                ))
            }
            (Some(a), None) => {
                if split_host_port(a).is_none() {
                    return Err(ConfigError::new(
                        format!("{at}.address"),
                        format!("{a:?} is not host:port"),
                    ));
                }
            }
            (None, Some(d)) => {
                if !is_domain(d) {
                    return Err(ConfigError::new(
                        format!("{at}.srv"),
                        format!("{d:?} is not a valid domain name"),
                    ));
                }
            }
        }
        if self.tls != UpstreamTls::None && self.tls_roots.is_none() {
            return Err(ConfigError::new(
                format!("{at}.tls_roots"),
                "TLS towards a node needs a PEM file of trusted CA certificates",
            ));
        }
        for (j, c) in self.critical_services.iter().enumerate() {
            c.validate(&format!("{at}.critical_services[{j}]"))?;
            if self.critical_services[..j].iter().any(|o| o.name == c.name) {
                return Err(ConfigError::new(
                    format!("{at}.critical_services[{j}].name"),
                    format!(
                        "{:?} is used by another critical service of this node",
                        c.name
                    ),
                ));
            }
        }
        if self.relogin_lower > self.relogin_upper {
            return Err(ConfigError::new(
                format!("{at}.relogin_lower"),
                "the re-login lower limit must not exceed the upper limit",
            ));
        }
        Ok(())
    }
}

impl CriticalServiceConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(ConfigError::new(
                format!("{at}.name"),
                "a critical service needs a name of 1 to 128 characters",
            ));
        }
        let (authority, path) = match self.target.find('/') {
            Some(i) => (&self.target[..i], Some(&self.target[i..])),
            None => (self.target.as_str(), None),
        };
        let bad = |m: String| Err(ConfigError::new(format!("{at}.target"), m));
        if split_host_port(authority).is_none() {
            return bad(format!("{:?} does not start with host:port", self.target));
        }
        match (self.kind, path) {
            (CriticalServiceKind::Http, Some(p)) if p.contains([' ', '\r', '\n']) => {
                bad(format!("{p:?} is not a valid HTTP path"))
            }
            (CriticalServiceKind::Http, _) => Ok(()),
            (_, Some(_)) => bad(format!(
                "{:?}: a path is only meaningful for kind = \"http\"; give host:port",
                self.target
            )),
            (_, None) => Ok(()),
        }
    }
}

impl SrmConfig {
    /// The bound actually used for a probe: `probe_timeout`, but never more
    /// than the heartbeat interval, so that a hung probe never delays the
    /// next heartbeat (a config with sub-second heartbeats need not also
    /// shorten `probe_timeout`).
    pub fn effective_probe_timeout(&self) -> Duration {
        self.probe_timeout.min(self.heartbeat_interval)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let nz = |key: &str, d: Duration| {
            if d.is_zero() {
                Err(ConfigError::new(
                    format!("srm.{key}"),
                    "must be greater than zero",
                ))
            } else {
                Ok(())
            }
        };
        nz("heartbeat_interval", self.heartbeat_interval)?;
        nz("heartbeat_timeout", self.heartbeat_timeout)?;
        nz("initial_heartbeat_timeout", self.initial_heartbeat_timeout)?;
        nz("probe_timeout", self.probe_timeout)?;
        nz("fast_detect_window", self.fast_detect_window)?;
        if self.fast_detect_failures == 0 {
            return Err(ConfigError::new(
                "srm.fast_detect_failures",
                "must be at least 1",
            ));
        }

        if self.heartbeat_timeout < self.heartbeat_interval {
            return Err(ConfigError::new(
                "srm.heartbeat_timeout",
                "must be at least heartbeat_interval, or every missed beat is a failure",
            ));
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "limits.max_connections",
                "must be at least 1",
            ));
        }
        if self.max_stanza_bytes < 10_000 {
            return Err(ConfigError::new(
                "limits.max_stanza_bytes",
                "RFC 6120 requires accepting stanzas of at least 10000 bytes",
            ));
        }
        if self.max_auth_attempts == 0 {
            return Err(ConfigError::new(
                "limits.max_auth_attempts",
                "must be at least 1",
            ));
        }
        if self.pre_auth_stanza_bytes < 1024 || self.pre_auth_stanza_bytes > self.max_stanza_bytes {
            return Err(ConfigError::new(
                "limits.pre_auth_stanza_bytes",
                "must be between 1024 and limits.max_stanza_bytes",
            ));
        }
        if self.max_depth < 8 {
            return Err(ConfigError::new(
                "limits.max_depth",
                "must be at least 8 (a bind result alone nests 3 deep)",
            ));
        }
        if self.max_attributes < 8 {
            return Err(ConfigError::new(
                "limits.max_attributes",
                "must be at least 8 (stream headers carry 5)",
            ));
        }
        if self.auth_fail_limit > 0
            && (self.auth_fail_window.is_zero() || self.auth_ban_time.is_zero())
        {
            return Err(ConfigError::new(
                "limits.auth_ban_time",
                "auth_fail_window and auth_ban_time must be greater than zero when auth_fail_limit is set",
            ));
        }
        if self.inject_queue_bytes < self.max_stanza_bytes {
            return Err(ConfigError::new(
                "limits.inject_queue_bytes",
                "must be at least limits.max_stanza_bytes, or one stanza may never fit",
            ));
        }
        if self.sm_max_unacked_bytes < self.max_stanza_bytes {
            return Err(ConfigError::new(
                "limits.sm_max_unacked_bytes",
                "must be at least limits.max_stanza_bytes, or one message may never be retained",
            ));
        }
        if self.sm_max_unacked_stanzas == 0 {
            return Err(ConfigError::new(
                "limits.sm_max_unacked_stanzas",
                "must be at least 1",
            ));
        }
        if self.read_buffer_bytes < 512 {
            return Err(ConfigError::new(
                "limits.read_buffer_bytes",
                "must be at least 512",
            ));
        }
        for (k, d) in [
            ("tls_handshake_timeout", self.tls_handshake_timeout),
            ("pre_auth_timeout", self.pre_auth_timeout),
            ("upstream_connect_timeout", self.upstream_connect_timeout),
            ("write_timeout", self.write_timeout),
            ("close_wait", self.close_wait),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(
                    format!("limits.{k}"),
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }
}

/// Whether two listen addresses would take the same port (0 asks the
/// kernel for a free one, so it never clashes).
fn listen_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Group name rule: 1–128 letters, digits, `_` and `-`.
pub fn validate_group_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::new("group.name", "must not be empty"));
    }
    if name.chars().count() > 128 {
        return Err(ConfigError::new(
            "group.name",
            "at most 128 characters are allowed",
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(ConfigError::new(
            "group.name",
            format!("{c:?} is not allowed: use letters, digits, `_` and `-`"),
        ));
    }
    Ok(())
}

/// Group description rule: at most 128 characters, none of `"%&\<>`.
pub fn validate_description(d: &str) -> Result<(), ConfigError> {
    if d.chars().count() > 128 {
        return Err(ConfigError::new(
            "group.description",
            "at most 128 characters are allowed",
        ));
    }
    if let Some(c) = d.chars().find(|c| "\"%&\\<>".contains(*c)) {
        return Err(ConfigError::new(
            "group.description",
            format!("{c:?} is not allowed (none of \" % & \\ < >)"),
        ));
    }
    Ok(())
}

fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Splits `host:port` (IPv6 in brackets) into its parts.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
}

/// Best-effort dotted key path for a TOML error (toml reports a span; the
/// key name is in the message for unknown fields and in the span otherwise).
fn toml_error_key(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            return rest[..end].to_string();
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        if let Some(end) = rest.find('`') {
            return rest[..end].to_string();
        }
    }
    match e.span() {
        Some(span) => key_at(text, span.start),
        None => "<file>".to_string(),
    }
}

/// The dotted key (`limits.max_connections`, `nodes[1].address`) whose
/// line holds byte `offset` of the TOML `text`, or the table, or the line
/// number when the line names no key.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let mut table = String::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    let mut line_start = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let line_end = line_start + line.len();
        let t = line.trim();
        let header = if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let i = arrays
                .entry(name.clone())
                .and_modify(|i| *i += 1)
                .or_insert(0);
            Some(format!("{name}[{i}]"))
        } else {
            t.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .map(|name| name.trim().to_string())
        };
        let at_line = offset < line_end || line_end == text.len();
        if let Some(h) = header {
            if at_line {
                return h;
            }
            table = h;
        } else if at_line {
            let key = t
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_string())
                .filter(|k| !k.is_empty() && !k.starts_with('#'));
            return match (key, table.is_empty()) {
                (Some(k), true) => k,
                (Some(k), false) => format!("{table}.{k}"),
                (None, true) => format!("line {}", n + 1),
                (None, false) => format!("{table} (line {})", n + 1),
            };
        }
        line_start = line_end;
    }
    "<file>".to_string()
}

/// A complete example configuration (also used by the tests and the docs).
pub const EXAMPLE: &str = r#"
[group]
name = "prg-1"
description = "IM and Presence pair, building A"
high_availability = true
assignment = "balanced"
domains = ["example.com"]

[[nodes]]
name = "imp1"
address = "127.0.0.1:15222"

[[nodes]]
name = "imp2"
address = "127.0.0.1:15223"

[listen]
starttls = "127.0.0.1:5222"
direct_tls = "127.0.0.1:5223"

[tls]
cert = "certs/dev-cert.pem"
key = "certs/dev-key.pem"
"#;

#[cfg(test)]
mod tests;
