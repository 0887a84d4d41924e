//! The proxy as a whole: builds each part's context once at start, binds
//! the listeners, runs the accept loops, the group monitor and the failover
//! module, and shuts down gracefully.
//!
//! Nothing else imports this module but the outermost layers (the binary,
//! the demo, tests): every part gets only the narrow context it needs
//! ([`ConnContext`], [`MonitorContext`], [`FailoverContext`]), and readers
//! from outside get a [`ProxyView`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore, TryAcquireError};
use tracing::{debug, error, info, warn};

use crate::config::{Config, ConfigError};
use crate::connection::{refuse_over_capacity, Accepted, ClientConnection, ConnContext};
use crate::failover::{self, Admission, FailoverContext, Hints, Pacer};
use crate::group::monitor::{self, MonitorContext, MoveOrder};
use crate::group::GroupHandle;
use crate::metrics::Metrics;
use crate::node::PAIR;
use crate::presence::{PresenceHooks, Registry};
use crate::reload::Reloader;
use crate::route::Routing;
use crate::tls::LiveTls;
use crate::tracker::Tracker;
use crate::upstream::Mechanisms;

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

pub use crate::view::{AddUserError, ProxyView};

/// A bound, not yet running proxy.
pub struct Proxy {
    /// Swapped by a reload; each accepted connection takes the current one.
    conn: Arc<ArcSwap<ConnContext>>,
    monitor: MonitorContext,
    failover: FailoverContext,
    orders: mpsc::UnboundedReceiver<MoveOrder>,
    view: ProxyView,
    starttls: Option<TcpListener>,
    direct: Option<TcpListener>,
    admin: Option<TcpListener>,
    next_conn: Arc<AtomicU64>,
    /// Temporary presence: replayed by its own task while running.
    presence: Arc<Registry>,
}

impl Proxy {
    /// Loads everything the config names (certificates, assignment file),
    /// then binds the listeners. Nothing is bound if anything is wrong.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        Proxy::bind_with_path(config, None).await
    }

    /// [`Proxy::bind`] for a configuration read from `path`: a reload
    /// (SIGHUP, [`ProxyView::reload`]) reads that file again.
    pub async fn bind_with_path(
        config: Config,
        path: Option<PathBuf>,
    ) -> Result<Proxy, StartError> {
        let loaded = crate::preflight::load(&config)?;
        let tls = Arc::new(LiveTls::new(loaded.tls));
        let assignment = Arc::new(loaded.assignment);
        let nodes = Arc::new(loaded.nodes);
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
        let admin = bind(config.admin.enabled.then_some(config.admin.listen)).await?;

        let config = Arc::new(config);
        let routing = Arc::new(Routing::new());
        let tracker = Arc::new(Tracker::new());
        let mechanisms = Arc::new(Mechanisms::default());
        let metrics = Arc::new(Metrics::default());
        let group = Arc::new(GroupHandle::new(&config));
        let (orders_tx, orders) = mpsc::unbounded_channel();
        let pacer = Arc::new(Pacer::new(&config.failover, PAIR));
        let hints = Arc::new(Hints::new(&config, pacer));
        let presence = Arc::new(Registry::new(config.temp_presence.clone()));
        let mut hooks: Vec<Arc<dyn crate::connection::hooks::HookFactory>> = Vec::new();
        if config.temp_presence.enabled {
            hooks.push(Arc::new(PresenceHooks(presence.clone())));
        }
        let conn = Arc::new(ConnContext {
            limits: config.limits.clone(),
            domains: config.group.domains.clone(),
            tls: tls.clone(),
            nodes: nodes.clone(),
            assignment: assignment.clone(),
            routing: routing.clone(),
            tracker: tracker.clone(),
            mechanisms: mechanisms.clone(),
            metrics: metrics.clone(),
            group: group.clone(),
            admission: Arc::new(Admission::new(hints.clone(), config.failover.max_hold)),
            hints: hints.clone(),
            hooks,
            auth_bans: Arc::new(crate::connection::bans::AuthBans::new()),
        });
        let monitor = MonitorContext {
            config: config.clone(),
            nodes: nodes.clone(),
            routing,
            tracker: tracker.clone(),
            mechanisms: mechanisms.clone(),
            metrics: metrics.clone(),
            handle: group.clone(),
            moves: Some(orders_tx),
        };
        let failover = FailoverContext {
            tracker: tracker.clone(),
            nodes,
            metrics: metrics.clone(),
            hints: hints.clone(),
            // Each connection closes within its write deadline; twice that
            // covers a batch already pending when the eviction came.
            eviction_timeout: config.limits.write_timeout * 2 + Duration::from_secs(1),
        };
        let conn = Arc::new(ArcSwap::new(conn));
        let reloader = Arc::new(Reloader::new(
            path,
            conn.clone(),
            config.clone(),
            tls,
            hints.clone(),
        ));
        let view = ProxyView {
            reloader,
            config,
            group,
            tracker,
            assignment,
            metrics,
            mechanisms,
            hints,
            presence: presence.clone(),
        };
        Ok(Proxy {
            conn,
            monitor,
            failover,
            orders,
            view,
            starttls,
            direct,
            admin,
            next_conn: Arc::new(AtomicU64::new(1)),
            presence,
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

    /// The admin API's address (`None` with `admin.enabled = false`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// What the outside may see and ask (the admin surface, the demo, tests).
    pub fn view(&self) -> ProxyView {
        self.view.clone()
    }

    /// Runs until `shutdown` completes, then stops accepting, sends
    /// `<system-shutdown/>` to every client and waits up to the grace
    /// period for connections to end.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Proxy {
            conn,
            monitor,
            failover,
            orders,
            view,
            starttls,
            direct,
            admin,
            next_conn,
            presence,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let max = conn.load().limits.max_connections;
        let slots = Arc::new(Semaphore::new(max));

        let evictor = failover::spawn(failover, orders);
        let replayer = view
            .config
            .temp_presence
            .enabled
            .then(|| tokio::spawn(presence.run()));
        let monitor = monitor::spawn(monitor);
        let admin =
            admin.map(|l| tokio::spawn(crate::admin::serve(l, view.clone(), stop_rx.clone())));
        // Offer the nodes' own mechanisms from the first client on: wait
        // (bounded) for each node's first heartbeat, which reads them.
        let first_round = async {
            let mut rx = view.group.subscribe();
            let _ = rx
                .wait_for(|s| {
                    s.nodes.iter().all(|n| {
                        n.name.is_none()
                            || n.last_heartbeat_ok.is_some()
                            || n.last_heartbeat_error.is_some()
                    })
                })
                .await;
        };
        let _ =
            tokio::time::timeout(conn.load().limits.upstream_connect_timeout, first_round).await;

        let mut accepts = Vec::new();
        for (listener, direct) in [(starttls, false), (direct, true)] {
            if let Some(l) = listener {
                info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                      tls = if direct { "direct" } else { "starttls" }, "listening");
                accepts.push(tokio::spawn(accept_loop(
                    l,
                    direct,
                    conn.clone(),
                    slots.clone(),
                    stop_rx.clone(),
                    next_conn.clone(),
                )));
            }
        }
        shutdown.await;
        info!("shutting down: no new connections, closing streams");
        for a in &accepts {
            a.abort();
        }
        monitor.abort();
        evictor.abort();
        if let Some(r) = &replayer {
            r.abort();
        }
        if let Some(a) = &admin {
            a.abort();
        }
        let _ = stop_tx.send(true);
        let grace = conn.load().limits.shutdown_grace;
        let drained = tokio::time::timeout(grace, slots.acquire_many(max as u32)).await;
        match drained {
            Ok(_) => info!("all connections closed"),
            Err(_) => warn!(
                open = view.metrics.connections_active.load(Ordering::Relaxed),
                ?grace,
                "grace period over; dropping the remaining connections"
            ),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    direct: bool,
    ctx: Arc<ArcSwap<ConnContext>>,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    next_conn: Arc<AtomicU64>,
) {
    let mut backoff = Duration::from_millis(5);
    // Over-capacity clients being told so (each needs a moment, a TLS
    // handshake on the direct-TLS port); beyond this many they are closed.
    let refusing = Arc::new(Semaphore::new(
        ctx.load().limits.over_capacity_refusals.max(1),
    ));
    let mut sized = false;
    loop {
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
        // The settings in force now, kept to the connection's end.
        let ctx = ctx.load_full();
        // A slot is taken only for an accepted client, so exactly
        // `max_connections` are served; one more is told at once.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                ctx.metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                warn!(client.addr = %peer, "connection refused: max_connections reached");
                let accepted = Accepted {
                    tcp,
                    peer,
                    direct_tls: direct,
                };
                if let Ok(r) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse_over_capacity(accepted, ctx).await;
                        drop(r);
                    });
                }
                continue;
            }
        };
        ctx.metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let id = next_conn.fetch_add(1, Ordering::Relaxed);
        let conn = ClientConnection::new(id, ctx, stop.clone());
        let accepted = Accepted {
            tcp,
            peer,
            direct_tls: direct,
        };
        let task = async move {
            conn.run(accepted).await;
            drop(permit);
        };
        if !sized {
            // What every connection's task holds for its whole life.
            debug!(bytes = std::mem::size_of_val(&task), "connection task size");
            sized = true;
        }
        tokio::spawn(task);
    }
}
