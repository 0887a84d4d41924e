//! # prg-proxy
//!
//! An XMPP-aware, TLS-terminating failover proxy in front of one presence
//! redundancy group (a pair of IM&P / XMPP nodes).
//!
//! ## Layout
//!
//! Leaves first; no module imports one listed after it, and none imports
//! [`proxy`], which builds every part's narrow context once at start.
//!
//! - [`node`] — which node of the pair: the one node identity.
//! - [`jid`] — bare JIDs normalised per RFC 7622 (PRECIS), the key of
//!   routing, tracking and assignment.
//! - [`config`] — TOML configuration, validated before anything is bound.
//! - [`metrics`] — counters, readable at any time.
//! - [`control`] — how the proxy talks to a live connection (evict,
//!   inject), never blocking.
//! - [`xmpp`] — the sans-IO framer, stanza peeks, SASL identification,
//!   stream and error builders.
//! - [`tls`] — client-facing TLS (SNI, ALPN) and development certificates.
//! - [`proxy_protocol`] — PROXY protocol v2 headers towards nodes that
//!   want the client's address.
//! - [`upstream`] — node addresses (host:port, DNS SRV), node streams, the
//!   mechanisms learned from the nodes.
//! - [`route`] — user assignment (home node) and who serves each home now.
//! - [`preflight`] — everything a configuration must pass before anything
//!   is bound (certificates included), shared by `check` and `run`.
//! - [`tracker`] — every user's JSM sessions, per node: the hot path.
//! - [`group`] — the redundancy group: recovery-manager state machine,
//!   probes, the monitor that drives both, and the group's handle.
//! - [`failover`] — what a move means for users: closing their streams
//!   (and knowing when that is done), admitting their logins again.
//! - [`connection`] — one client connection, phase by phase, its relay and
//!   its stanza hooks.
//! - [`presence`] — temporary presence subscriptions (Cisco Jabber) kept
//!   from the stanza hooks and replayed after a failover, fallback or move.
//! - [`proxy`] — contexts, listeners, accept loops, graceful shutdown; the
//!   read-only [`proxy::ProxyView`] for the outside.
//! - [`view`] — [`view::ProxyView`], what the outside may see and ask of a
//!   running proxy.
//! - [`admin`] — the admin HTTP API, status page and CLI client over a
//!   [`proxy::ProxyView`]; an outer layer that [`proxy`] only starts.
//! - [`reload`] — live reload of the configuration (certificates, limits,
//!   pacer, re-login bounds), validated first.
//! - [`prometheus`] — the counters in the Prometheus text format, read at
//!   scrape time from a [`proxy::ProxyView`].
//! - [`sim`] — (feature `sim`) a simulated IM&P node pair and client, for
//!   the demo, the tests and the benchmarks.
//! - [`demo`] — (feature `sim`) the built-in demonstration.

pub mod admin;
pub mod config;
pub mod connection;
pub mod control;
#[cfg(feature = "sim")]
pub mod demo;
pub mod failover;
pub mod group;
pub mod jid;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod preflight;
pub mod presence;
pub mod prometheus;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod route;
pub mod signals;
#[cfg(feature = "sim")]
pub mod sim;
pub mod tls;
pub mod tracker;
pub mod upstream;
pub mod view;
pub mod xmpp;

pub use config::Config;
pub use proxy::Proxy;
