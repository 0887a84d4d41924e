//! The proxy as a whole: shared state, listeners, the accept loops and
//! graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, error, info, warn};

use crate::config::{Config, ConfigError};
use crate::connection::ClientConnection;
use crate::group::monitor::{self, GroupHandle, GroupStatus};
use crate::route::{Assignment, NodeIndex, Routing};
use crate::tls::{server_tls, ServerTls};
use crate::tracker::Tracker;
use crate::upstream::{Dns, Upstream};

/// Mechanisms offered before any node has answered.
const FALLBACK_MECHANISMS: [&str; 2] = ["SCRAM-SHA-1", "PLAIN"];

/// Counters, readable at any time (the admin page shows them).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted.
    pub connections_total: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Logins routed to a node (`<auth>` forwarded).
    pub logins_routed: AtomicU64,
    /// Stanzas client → node.
    pub stanzas_up: AtomicU64,
    /// Stanzas node → client.
    pub stanzas_down: AtomicU64,
    /// Bytes client → node.
    pub bytes_up: AtomicU64,
    /// Bytes node → client.
    pub bytes_down: AtomicU64,
    /// Node connection failures seen by the relay.
    pub node_failures: AtomicU64,
    /// Node state transitions of the redundancy group.
    pub group_transitions: AtomicU64,
    /// Routing changes (a home's users moved to another node or to none).
    pub group_moves: AtomicU64,
    /// Streams closed because their user's home moved.
    pub group_evictions: AtomicU64,
}

/// What every connection shares.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// The group's nodes.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Resolver for SRV node names.
    pub dns: Dns,
    /// Users' home nodes.
    pub assignment: Assignment,
    /// Which node serves each home now.
    pub routing: Routing,
    /// JSM sessions.
    pub tracker: Tracker,
    /// Client-facing TLS.
    pub tls: ServerTls,
    /// SASL mechanisms offered to clients, learned from the nodes.
    mechanisms: RwLock<Arc<Vec<String>>>,
    /// Counters.
    pub metrics: Metrics,
    /// The redundancy group monitor: its published view, the
    /// administrator's operations, and where relay failures are reported.
    pub group: GroupHandle,
    next_conn: AtomicU64,
}

impl Shared {
    /// The SASL mechanisms to offer now.
    pub fn mechanisms(&self) -> Arc<Vec<String>> {
        match self.mechanisms.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the offered mechanisms (never with `-PLUS` ones).
    pub fn set_mechanisms(&self, mut m: Vec<String>) {
        m.retain(|x| !x.ends_with("-PLUS"));
        if m.is_empty() {
            return;
        }
        let mut g = match self.mechanisms.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if **g != m {
            info!(mechanisms = ?m, "SASL mechanisms offered to clients");
            *g = Arc::new(m);
        }
    }

    /// Adds a user to the assignment (balanced: pins the user's home;
    /// `none`: lets the user log in). Refused while a node of the group is
    /// failed over or users are moving, as the source requires.
    pub fn add_user(&self, bare: &str, node: NodeIndex) -> Result<(), crate::route::AddUserError> {
        self.group.can_add_users()?;
        self.assignment.add(bare, node)?;
        info!(user = %bare, node = %self.config.nodes[node].name, "user added to the assignment");
        Ok(())
    }

    /// The relay saw a node connection fail (evidence for the health
    /// monitor).
    pub fn note_node_failure(&self, node: NodeIndex) {
        self.metrics.node_failures.fetch_add(1, Ordering::Relaxed);
        debug!(node, "node connection failure");
        self.group.note_failure(node, self.tracker.count_on(node));
    }

    /// The redundancy group's current view, updated after every change (for
    /// the status page and the admin API).
    pub fn group_status(&self) -> watch::Receiver<GroupStatus> {
        self.group.subscribe()
    }

    /// Opens a stream to each node (concurrently, each bounded by the
    /// upstream connect timeout) and offers the mechanisms that every
    /// answering node supports.
    pub async fn learn_mechanisms(&self) {
        let domain = &self.config.group.domains[0];
        let limits = &self.config.limits;
        let open = |i: usize| async move {
            match self.upstreams.get(i) {
                Some(u) => Some((
                    u,
                    u.open(
                        &self.dns,
                        domain,
                        limits.max_stanza_bytes,
                        limits.upstream_connect_timeout,
                    )
                    .await,
                )),
                None => None,
            }
        };
        // A group has at most two nodes: ask both at once.
        let (first, second) = tokio::join!(open(0), open(1));
        let mut common: Option<Vec<String>> = None;
        for (u, r) in [first, second].into_iter().flatten() {
            match r {
                Ok(mut s) => {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.io.write_all(b"</stream:stream>").await;
                    let m = s.features.mechanisms;
                    common = Some(match common {
                        None => m,
                        Some(c) => c.into_iter().filter(|x| m.contains(x)).collect(),
                    });
                }
                Err(e) => warn!(node = %u.name, error = %e, "cannot learn SASL mechanisms"),
            }
        }
        if let Some(m) = common {
            self.set_mechanisms(m);
        }
    }
}

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration problem (exit code 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound, not yet running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    starttls: Option<TcpListener>,
    direct: Option<TcpListener>,
}

impl Proxy {
    /// Loads everything the config names (certificates, assignment file),
    /// then binds the listeners. Nothing is bound if anything is wrong.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        config.validate()?;
        let tls = server_tls(&config.tls)?;
        let overrides = config.load_assignment_overrides()?;
        let assignment = Assignment::new(config.group.assignment, &config.node_names(), overrides);
        let upstreams = Upstream::from_config(&config)?;
        let dns = Dns::new(&config.dns)?;
        let bind = |a: Option<SocketAddr>| async move {
            match a {
                None => Ok(None),
                Some(addr) => TcpListener::bind(addr)
                    .await
                    .map(Some)
                    .map_err(|source| StartError::Bind { addr, source }),
            }
        };
        let starttls = bind(config.listen.starttls).await?;
        let direct = bind(config.listen.direct_tls).await?;
        let shared = Arc::new(Shared {
            upstreams,
            dns,
            assignment,
            routing: Routing::new(),
            tracker: Tracker::new(),
            tls,
            mechanisms: RwLock::new(Arc::new(
                FALLBACK_MECHANISMS.iter().map(|s| s.to_string()).collect(),
            )),
            metrics: Metrics::default(),
            group: GroupHandle::new(&config),
            next_conn: AtomicU64::new(1),
            config,
        });
        Ok(Proxy {
            shared,
            starttls,
            direct,
        })
    }

    /// The STARTTLS listener's address.
    pub fn starttls_addr(&self) -> Option<SocketAddr> {
        self.starttls.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The direct-TLS listener's address.
    pub fn direct_tls_addr(&self) -> Option<SocketAddr> {
        self.direct.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The shared state (for the admin surface, the demo and tests).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs until `shutdown` completes, then stops accepting, sends
    /// `<system-shutdown/>` to every client and waits up to the grace
    /// period for connections to end.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        let (stop_tx, stop_rx) = watch::channel(false);
        let max = shared.config.limits.max_connections;
        let slots = Arc::new(Semaphore::new(max));

        // Offer the right mechanisms from the first client on; the
        // heartbeats keep them current afterwards.
        shared.learn_mechanisms().await;
        let monitor = monitor::spawn(shared.clone());

        let mut accepts = Vec::new();
        for (listener, direct) in [(self.starttls, false), (self.direct, true)] {
            if let Some(l) = listener {
                info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                      tls = if direct { "direct" } else { "starttls" }, "listening");
                accepts.push(tokio::spawn(accept_loop(
                    l,
                    direct,
                    shared.clone(),
                    slots.clone(),
                    stop_rx.clone(),
                )));
            }
        }
        shutdown.await;
        info!("shutting down: no new connections, closing streams");
        for a in &accepts {
            a.abort();
        }
        monitor.abort();
        let _ = stop_tx.send(true);
        let grace = shared.config.limits.shutdown_grace;
        let drained = tokio::time::timeout(grace, slots.acquire_many(max as u32)).await;
        match drained {
            Ok(_) => info!("all connections closed"),
            Err(_) => warn!(
                open = shared.metrics.connections_active.load(Ordering::Relaxed),
                ?grace,
                "grace period over; dropping the remaining connections"
            ),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    direct: bool,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        // Wait for a free slot before accepting: excess clients wait in the
        // kernel's backlog instead of consuming memory here.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer): (TcpStream, SocketAddr) = match listener.accept().await {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                error!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        shared
            .metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let conn = ClientConnection::new(id, peer, direct, shared.clone(), stop.clone());
        tokio::spawn(async move {
            conn.run(tcp).await;
            drop(permit);
        });
    }
}
