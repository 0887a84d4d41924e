//! # prg-proxy
//!
//! An XMPP-aware, TLS-terminating failover proxy in front of one presence
//! redundancy group (a pair of IM&P / XMPP nodes).
//!
//! ## Layout
//!
//! - [`config`] — TOML configuration, validated before anything is bound.
//! - [`proxy`] — shared state, listeners, accept loops, graceful shutdown.
//! - [`connection`] — one client connection, phase by phase, with `run()`.
//! - [`tls`] — client-facing TLS (SNI, ALPN) and development certificates.
//! - [`upstream`] — node addresses (host:port, DNS SRV) and node streams.
//! - [`group`] — the redundancy group: recovery-manager state machine, probes,
//!   and the monitor that drives both and re-routes users.
//! - [`route`] — user assignment (home node) and who serves each home now.
//! - [`tracker`] — every user's JSM sessions, per node: the hot path.
//! - [`jid`] — bare JIDs normalised per RFC 7622 (PRECIS), the key of routing,
//!   tracking and assignment.
//! - [`xmpp`] — the sans-IO framer, stanza peeks, SASL identification,
//!   stream and error builders.
//! - [`sim`] — a simulated IM&P node pair and client, for the demo, the tests
//!   and the benchmarks.
//! - [`demo`] — the built-in demonstration.

pub mod config;
pub mod connection;
pub mod demo;
pub mod group;
pub mod jid;
pub mod logging;
pub mod proxy;
pub mod route;
pub mod signals;
pub mod sim;
pub mod tls;
pub mod tracker;
pub mod upstream;
pub mod xmpp;

pub use config::Config;
pub use proxy::Proxy;
