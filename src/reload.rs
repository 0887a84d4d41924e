//! Live reload of the configuration (SIGHUP, `ProxyView::reload`).
//!
//! A reload re-reads and validates the whole file first; anything wrong —
//! bad TOML, an unknown key, a missing or broken certificate, a key that
//! does not match its certificate — refuses it with a [`ConfigError`] naming
//! the key, and the configuration in use stays as it was.
//!
//! What a reload changes, from the next connection or handshake on:
//!
//! - `[tls]` (and `[[tls.sni]]`): the certificates are read again; each TLS
//!   handshake reads the current ones, handshakes in flight finish on theirs;
//! - `[limits]` (but `max_connections`): each connection takes the limits in
//!   force when it is accepted and keeps them to its end;
//! - `[failover]` (but `slot_grace`): the pacer's rate bounds and tuning,
//!   the longest hold, the hint window, the refuse delay, the redirect;
//! - every node's `relogin_lower` / `relogin_upper`: hints planned from then on.
//!
//! Anything else that differs (`[group]`, `[listen]`, `[srm]`, `[dns]`,
//! `[temp_presence]`, the other node settings) needs a restart; the
//! [`ReloadReport`] lists it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::config::{Config, ConfigError};
use crate::connection::ConnContext;
use crate::failover::{Admission, Hints};
use crate::tls::{server_tls, LiveTls};

/// What a successful reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// What now runs with the new settings.
    pub applied: Vec<String>,
    /// Settings that differ from the running ones but take a restart.
    pub needs_restart: Vec<String>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "applied: {}", self.applied.join(", "))?;
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; changed but in force only after a restart: {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Holds what a reload swaps.
pub(crate) struct Reloader {
    path: Option<PathBuf>,
    conn: Arc<ArcSwap<ConnContext>>,
    config: ArcSwap<Config>,
    tls: Arc<LiveTls>,
    hints: Arc<Hints>,
    /// One reload at a time.
    lock: Mutex<()>,
}

fn differs<T: fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

impl Reloader {
    pub(crate) fn new(
        path: Option<PathBuf>,
        conn: Arc<ArcSwap<ConnContext>>,
        config: Arc<Config>,
        tls: Arc<LiveTls>,
        hints: Arc<Hints>,
    ) -> Reloader {
        Reloader {
            path,
            conn,
            config: ArcSwap::new(config),
            tls,
            hints,
            lock: Mutex::new(()),
        }
    }

    /// The configuration in force now.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The file the proxy was started with, if any.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the file the proxy was started with.
    pub(crate) fn reload(&self) -> Result<ReloadReport, ConfigError> {
        let path = self.path.as_deref().ok_or_else(|| {
            ConfigError::new(
                "<file>",
                "the proxy was started without a configuration file: nothing to re-read",
            )
        })?;
        self.apply(Config::load(path)?)
    }

    /// Validates `new` completely, then puts what can change live in force.
    pub(crate) fn apply(&self, new: Config) -> Result<ReloadReport, ConfigError> {
        new.validate()?;
        let tls = server_tls(&new.tls)?;
        let _one = self.lock.lock();
        let old = self.config.load_full();
        let mut r = ReloadReport::default();
        let mut restart = |k: &str| r.needs_restart.push(k.to_string());
        if differs(&old.group, &new.group) {
            restart("group");
        }
        if differs(&old.listen, &new.listen) {
            restart("listen");
        }
        if differs(&old.srm, &new.srm) {
            restart("srm");
        }
        if differs(&old.dns, &new.dns) {
            restart("dns");
        }
        if differs(&old.temp_presence, &new.temp_presence) {
            restart("temp_presence");
        }
        if old.limits.max_connections != new.limits.max_connections {
            restart("limits.max_connections");
        }
        if old.failover.slot_grace != new.failover.slot_grace {
            restart("failover.slot_grace");
        }
        let mut relogin = Vec::new();
        if old.nodes.len() != new.nodes.len() {
            restart("nodes");
        } else {
            for (i, (o, n)) in old.nodes.iter().zip(&new.nodes).enumerate() {
                let mut rest = n.clone();
                rest.relogin_lower = o.relogin_lower;
                rest.relogin_upper = o.relogin_upper;
                if differs(o, &rest) {
                    restart(&format!("nodes[{i}]"));
                }
                if (o.relogin_lower, o.relogin_upper) != (n.relogin_lower, n.relogin_upper) {
                    relogin.push(format!("nodes[{i}].relogin"));
                }
            }
        }

        self.tls.store(tls);
        r.applied.push("tls (certificates read again)".into());
        if differs(&old.limits, &new.limits) {
            r.applied.push("limits".into());
        }
        if differs(&old.failover, &new.failover) {
            r.applied.push("failover".into());
        }
        r.applied.extend(relogin);

        let cur = self.conn.load_full();
        self.conn.store(Arc::new(ConnContext {
            limits: new.limits.clone(),
            domains: cur.domains.clone(),
            tls: cur.tls.clone(),
            nodes: cur.nodes.clone(),
            assignment: cur.assignment.clone(),
            routing: cur.routing.clone(),
            tracker: cur.tracker.clone(),
            mechanisms: cur.mechanisms.clone(),
            metrics: cur.metrics.clone(),
            group: cur.group.clone(),
            admission: Arc::new(Admission::new(self.hints.clone(), new.failover.max_hold)),
            hints: cur.hints.clone(),
            hooks: cur.hooks.clone(),
            auth_bans: cur.auth_bans.clone(),
        }));
        self.hints.update(&new);
        self.hints.pacer().set_params(&new.failover);
        self.config.store(Arc::new(new));
        Ok(r)
    }
}
