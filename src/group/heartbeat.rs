//! The probes that feed the driver: one heartbeat task per node and one
//! task per critical service, each probing on the heartbeat interval,
//! bounded by `srm.probe_timeout`, and reporting what it saw.
//!
//! Heartbeats open node streams through the proxy's own [`Nodes`] (the
//! same addresses, TLS and stream opening as a relayed login), so that "the
//! heartbeat works" means "a login can be routed there". The `login` kind
//! also authenticates the monitor account (SASL PLAIN), binds and pings
//! (XEP-0199).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

use super::probe::{self, ProbeError};
use super::NodeId;
use crate::config::{Config, CriticalServiceKind, HeartbeatKind};
use crate::upstream::{read_frame, Nodes};
use crate::xmpp::framer::{FrameKind, Framer};
use crate::xmpp::{peek, stream};

/// What the probes need: the nodes and the settings.
pub(super) struct Probes {
    pub(super) nodes: Arc<Nodes>,
    pub(super) config: Arc<Config>,
}

/// What a probe task saw (and the move completions the driver waits for).
#[derive(Debug)]
pub(super) enum Report {
    /// A heartbeat ended.
    Heartbeat {
        node: NodeId,
        /// `Ok(mechanisms)` (`None`: the probe kind does not read them).
        result: Result<Option<Vec<String>>, String>,
        /// The monitor login: `Some(true)` accepted, `Some(false)` refused.
        auth: Option<bool>,
    },
    /// A critical service (or database) probe ended.
    Service {
        node: NodeId,
        name: String,
        database: bool,
        error: Option<String>,
    },
    /// A node's SASL mechanisms, read outside a heartbeat (at start, for
    /// nodes whose heartbeat does not read them).
    Mechanisms {
        node: NodeId,
        mechanisms: Vec<String>,
    },
    /// The streams of one move order are closed (`ok`: all of them).
    MovesDone { ok: bool },
    /// The confirming connect after strong evidence ended.
    Confirm {
        node: NodeId,
        refused: bool,
        detail: String,
    },
}

/// A ticker on the heartbeat interval that fires at once, then every
/// interval; a slow probe delays the next tick instead of bunching them.
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

pub(super) async fn heartbeat_loop(probes: Arc<Probes>, node: NodeId, tx: mpsc::Sender<Report>) {
    let shared = probes;
    let Some(cfg) = shared.config.nodes.get(node.index()).cloned() else {
        return;
    };
    let srm = &shared.config.srm;
    let timeout = srm.effective_probe_timeout();
    let monitor_login = srm.auth_service_monitoring && cfg.heartbeat != HeartbeatKind::Login;
    if cfg.heartbeat == HeartbeatKind::Tcp {
        // Clients are offered what the nodes offer from the first login on.
        if let Ok(mechanisms) = xmpp_heartbeat(&shared, node, timeout).await {
            let _ = tx.send(Report::Mechanisms { node, mechanisms }).await;
        }
    }
    let mut tick = ticker(srm.heartbeat_interval);
    loop {
        tick.tick().await;
        let mut report = match cfg.heartbeat {
            HeartbeatKind::Tcp => {
                let result = tcp_heartbeat(&shared, node, timeout)
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string());
                Report::Heartbeat {
                    node,
                    result,
                    auth: None,
                }
            }
            HeartbeatKind::Xmpp => Report::Heartbeat {
                node,
                result: xmpp_heartbeat(&shared, node, timeout).await.map(Some),
                auth: None,
            },
            HeartbeatKind::Login => match login_probe(&shared, node, timeout).await {
                Ok(m) => Report::Heartbeat {
                    node,
                    result: Ok(Some(m)),
                    auth: Some(true),
                },
                Err(LoginFailure::Refused(mechanisms)) => Report::Heartbeat {
                    node,
                    result: Ok(Some(mechanisms)),
                    auth: Some(false),
                },
                Err(LoginFailure::Unreachable(e)) => Report::Heartbeat {
                    node,
                    result: Err(e),
                    auth: None,
                },
            },
        };
        if monitor_login {
            if let Report::Heartbeat {
                result: Ok(_),
                auth,
                ..
            } = &mut report
            {
                *auth = match login_probe(&shared, node, timeout).await {
                    Ok(_) => Some(true),
                    Err(LoginFailure::Refused(_)) => Some(false),
                    // Unreachable between two probes: the heartbeat decides.
                    Err(LoginFailure::Unreachable(_)) => None,
                };
            }
        }
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

pub(super) async fn service_loop(
    shared: Arc<Probes>,
    node: NodeId,
    svc: crate::config::CriticalServiceConfig,
    tx: mpsc::Sender<Report>,
) {
    let srm = &shared.config.srm;
    let timeout = srm.effective_probe_timeout();
    let mut tick = ticker(srm.heartbeat_interval);
    loop {
        tick.tick().await;
        let result = match svc.kind {
            CriticalServiceKind::Tcp | CriticalServiceKind::Database => {
                probe::tcp_connect(svc.target.as_str(), timeout)
                    .await
                    .map(|_| ())
            }
            CriticalServiceKind::Http => {
                probe::http_get_2xx(&svc.target, timeout).await.map(|_| ())
            }
        };
        let report = Report::Service {
            node,
            name: svc.name.clone(),
            database: svc.kind == CriticalServiceKind::Database,
            error: result.err().map(|e| e.to_string()),
        };
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

async fn tcp_heartbeat(shared: &Probes, node: NodeId, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    let addrs = shared.nodes.addresses(node, timeout).await?;
    let left = timeout.saturating_sub(start.elapsed());
    probe::tcp_connect(&addrs[..], left)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The confirming connect after relay failures: a typed error, so that a
/// refusal can be told from a timeout.
pub(super) async fn confirm_connect(
    shared: &Probes,
    node: NodeId,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let addrs = shared
        .nodes
        .addresses(node, timeout)
        .await
        .map_err(ProbeError::Malformed)?;
    probe::tcp_connect(&addrs[..], timeout).await.map(|_| ())
}

/// Opens a stream the way the relay does (address, TLS, features), so that
/// "the heartbeat works" means "a login can be routed there".
pub(super) async fn xmpp_heartbeat(
    shared: &Probes,
    node: NodeId,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let mut s = shared
        .nodes
        .open(node, shared.nodes.domain(), timeout)
        .await
        .map_err(|e| e.to_string())?;
    // Close politely without waiting for the node's answer.
    let _ = tokio::time::timeout(timeout, s.io.write_all(b"</stream:stream>")).await;
    Ok(s.features.mechanisms)
}

/// Why a monitor login did not complete.
enum LoginFailure {
    /// The node answered but refused the credentials (the authentication
    /// service is down or the account broken); the mechanisms it offered.
    Refused(Vec<String>),
    /// The node did not answer as an XMPP server should.
    Unreachable(String),
}

/// Logs in with the monitor account (SASL PLAIN), binds and pings
/// (XEP-0199), then closes the stream. The stream is opened as the relay
/// opens one, so TLS towards the node applies as configured.
async fn login_probe(
    shared: &Probes,
    node: NodeId,
    timeout: Duration,
) -> Result<Vec<String>, LoginFailure> {
    let srm = &shared.config.srm;
    let (Some(user), Some(password)) = (&srm.monitor_user, &srm.monitor_password) else {
        return Err(LoginFailure::Unreachable(
            "no monitor account configured".into(),
        ));
    };
    let domain = shared.nodes.domain();
    let max = shared.config.limits.max_stanza_bytes;
    let exchange = async {
        let mut s = shared
            .nodes
            .open(node, domain, timeout)
            .await
            .map_err(|e| LoginFailure::Unreachable(e.to_string()))?;
        let mechanisms = s.features.mechanisms.clone();
        let unreachable = LoginFailure::Unreachable;
        let mut framer = Framer::in_open_stream(max);
        let mut buf = std::mem::take(&mut s.buf);
        let io = &mut s.io;
        let payload = format!("\0{user}\0{password}");
        let auth = format!(
            "<auth xmlns='{}' mechanism='PLAIN'>{}</auth>",
            stream::NS_SASL,
            base64::engine::general_purpose::STANDARD.encode(payload)
        );
        io.write_all(auth.as_bytes())
            .await
            .map_err(|e| unreachable(format!("write: {e}")))?;
        let (_, answer) = read_frame(io, &mut buf, &mut framer)
            .await
            .map_err(unreachable)?;
        match peek::element_name(&answer) {
            b"success" => {}
            b"failure" => {
                debug!("monitor login refused");
                return Err(LoginFailure::Refused(mechanisms));
            }
            other => {
                return Err(unreachable(format!(
                    "unexpected <{}> after <auth>",
                    String::from_utf8_lossy(other)
                )))
            }
        }
        // Restart the stream, bind a resource of our own, ping.
        let mut framer = Framer::new(max);
        io.write_all(stream::client_header(domain, None).as_bytes())
            .await
            .map_err(|e| unreachable(format!("write: {e}")))?;
        let (kind, _) = read_frame(io, &mut buf, &mut framer)
            .await
            .map_err(unreachable)?;
        if kind != FrameKind::Header {
            return Err(unreachable("no stream header after SASL success".into()));
        }
        let _features = read_frame(io, &mut buf, &mut framer)
            .await
            .map_err(unreachable)?;
        let resource = format!("prg-proxy-monitor-{:08x}", rand::random::<u32>());
        let bind = format!(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>{resource}</resource></bind></iq>\
             <iq type='get' id='ping1'><ping xmlns='urn:xmpp:ping'/></iq>"
        );
        io.write_all(bind.as_bytes())
            .await
            .map_err(|e| unreachable(format!("write: {e}")))?;
        for id in [&b"bind1"[..], b"ping1"] {
            loop {
                let (kind, frame) = read_frame(io, &mut buf, &mut framer)
                    .await
                    .map_err(unreachable)?;
                if kind == FrameKind::Close {
                    return Err(unreachable("the node closed the stream".into()));
                }
                let head = &frame[..peek::head_end(&frame)];
                if peek::element_name(&frame) != b"iq" || peek::attr(head, b"id") != Some(id) {
                    continue;
                }
                if peek::attr(head, b"type") != Some(b"result") {
                    return Err(unreachable(format!(
                        "{} answered with an error",
                        String::from_utf8_lossy(id)
                    )));
                }
                break;
            }
        }
        let _ = io.write_all(b"</stream:stream>").await;
        Ok(mechanisms)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(LoginFailure::Unreachable(format!(
                "no answer within {timeout:?}"
            )))
        })
}
