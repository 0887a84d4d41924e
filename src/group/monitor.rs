//! The group monitor: the driver around the pure [`GroupState`].
//!
//! One task ([`spawn`], started by [`Proxy::run`](crate::Proxy::run)) owns the
//! state machine. Around it run one heartbeat task per node and one task per
//! critical service; each probes on the heartbeat interval, bounded by
//! `srm.probe_timeout`, and reports what it saw. The monitor feeds those
//! reports, the relay's failure notes ([`GroupHandle::note_failure`]) and the
//! administrator's requests into the machine, wakes at
//! [`GroupState::next_deadline`] for the timers, and applies every [`Step`]:
//!
//! - each [`Transition`] is logged at info with both nodes' states and
//!   reasons, and counted in the metrics;
//! - each [`Move`] re-routes the home's users ([`Routing::set`]) and closes
//!   the streams of those users that are still on the node they leave, with
//!   `<system-shutdown/>` naming the node and the reason; then the move is
//!   confirmed ([`Event::MoveCompleted`]).
//!
//! After every input the current view (both states and reasons, Table 2 row,
//! recommended action, who serves whom, last heartbeats) is published on a
//! [`watch`] channel ([`GroupHandle::subscribe`]) for the status page.
//!
//! # Strong evidence
//!
//! Waiting a whole heartbeat timeout for a node that crashed is a minute of
//! failed logins. The relay sees a crash first: every relayed connection of
//! the node fails at once. When failures of one node within
//! `srm.fast_detect_window` reach `srm.fast_detect_failures` (or every
//! session the node had, if fewer, which includes a login that finds a node
//! with no sessions refusing the connect), the monitor makes one immediate
//! TCP connect. Only a *refused* connect (the host answers, nothing listens)
//! confirms: a timeout may be the network and is left to the heartbeats.
//!
//! [`Routing::set`]: crate::route::Routing::set

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, info_span, warn, Instrument};

use super::probe::{self, ProbeError};
use super::{
    Assignment, Event, GroupParams, GroupState, Move, NodeId, NodeState, Reason, Rejected, Step,
    Transition,
};
use crate::config::{
    AssignmentMode, Config, CriticalServiceKind, HeartbeatKind, NodeConfig, UpstreamTls,
};
use crate::proxy::Shared;
use crate::route::NodeIndex;
use crate::sim::{ClientError, ClientTls, SimClient};
use crate::tracker::Control;
use crate::xmpp::stream;

/// Reports from the probe tasks waiting for the monitor. Probes are paced by
/// the heartbeat interval, so a few per node is plenty.
const REPORT_QUEUE: usize = 64;
/// Relay failure notes waiting for the monitor. When it is full, further
/// notes are dropped: the ones queued are already evidence enough.
const EVIDENCE_QUEUE: usize = 1024;
/// Administrator requests waiting for the monitor.
const ADMIN_QUEUE: usize = 16;
/// Moves kept for a slow subscriber before it starts missing some.
const MOVE_QUEUE: usize = 256;
/// Bound on chained move confirmations within one input (each settles one move).
const MAX_CONFIRMATIONS: usize = 8;

/// One node as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Node 1 or node 2 of the group.
    pub id: NodeId,
    /// Its configured name; `None` in a one-node group's empty slot.
    pub name: Option<String>,
    /// The recovery manager's state.
    pub state: NodeState,
    /// And why.
    pub reason: Reason,
    /// The last successful heartbeat (wall clock, for display).
    pub last_heartbeat_ok: Option<SystemTime>,
    /// The same on the monitor's clock, to compute ages.
    #[serde(skip)]
    pub last_heartbeat_ok_at: Option<Instant>,
    /// Why the latest heartbeat failed, if it did.
    pub last_heartbeat_error: Option<String>,
    /// Critical services (and "database", "authentication") seen down now.
    pub services_down: Vec<String>,
    /// Sessions bound on the node through the proxy.
    pub sessions: usize,
}

/// The group as the monitor sees it, published after every input.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    /// The group's name.
    pub group: String,
    /// Node 1 and node 2.
    pub nodes: [NodeStatus; 2],
    /// The source's Table 2 row of the current combination, if any.
    pub table_row: Option<u8>,
    /// Table 2's cause and recommended action (a general hint outside it).
    pub recommended_action: &'static str,
    /// For each home node (index), the node serving its users now; `None`:
    /// nobody (logins are refused) or no user has that home.
    pub serving: [Option<NodeId>; 2],
    /// The node a move in flight heads to.
    pub move_in_progress: Option<NodeId>,
    /// Whether users may be added to the assignment now.
    pub can_add_users: bool,
    /// High availability (automatic failover) is on.
    pub high_availability: bool,
    /// Whether the monitor runs (false before [`spawn`] and after shutdown).
    pub monitoring: bool,
}

impl GroupStatus {
    fn initial(config: &Config) -> GroupStatus {
        let node = |id: NodeId| NodeStatus {
            id,
            name: config.nodes.get(id.index()).map(|n| n.name.clone()),
            state: NodeState::Initializing,
            reason: Reason::Initialization,
            last_heartbeat_ok: None,
            last_heartbeat_ok_at: None,
            last_heartbeat_error: None,
            services_down: Vec::new(),
            sessions: 0,
        };
        GroupStatus {
            group: config.group.name.clone(),
            nodes: [node(NodeId::Node1), node(NodeId::Node2)],
            table_row: None,
            recommended_action: "",
            serving: [Some(NodeId::Node1), Some(NodeId::Node2)],
            move_in_progress: None,
            can_add_users: false,
            high_availability: config.group.high_availability,
            monitoring: false,
        }
    }

    /// A node's state and reason.
    pub fn state(&self, node: NodeId) -> (NodeState, Reason) {
        let n = &self.nodes[node.index()];
        (n.state, n.reason)
    }
}

/// Users cannot be added to the assignment while a node of the group is
/// failed over (source, "redundancy interactions and restrictions"): the
/// new user's home would be a node that serves nobody.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "users cannot be added to group {group} while a node is failed over or users are moving \
     (node 1 is {node1}, node 2 is {node2}); fall back to Normal first"
)]
pub struct UsersCannotBeAdded {
    /// The group's name.
    pub group: String,
    /// Node 1's state.
    pub node1: NodeState,
    /// Node 2's state.
    pub node2: NodeState,
}

/// Why an administrator request did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The state machine refused it; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// No such node in this group.
    #[error("the group has no node with index {0}")]
    NoSuchNode(NodeIndex),
    /// The monitor is not running (not started yet, or shut down).
    #[error("the group monitor is not running")]
    NotRunning,
}

/// A request for the monitor, with its answer.
struct AdminRequest {
    event: Event,
    reply: oneshot::Sender<Result<(), Rejected>>,
}

/// A relay failure note.
#[derive(Debug, Clone, Copy)]
struct FailureNote {
    node: NodeIndex,
    at: Instant,
    /// Sessions the node had when the failure was seen (the failing one
    /// included, if it was bound).
    sessions: usize,
}

/// The monitor's face towards the rest of the proxy: kept in
/// [`Shared`](crate::proxy::Shared), usable before the monitor runs.
pub struct GroupHandle {
    /// The published view; receivers come from [`GroupHandle::subscribe`].
    status: watch::Sender<GroupStatus>,
    /// Set while the monitor runs, so that a request never waits for a
    /// monitor that does not exist.
    admin: Mutex<Option<mpsc::Sender<AdminRequest>>>,
    /// Set while the monitor runs and fast detection is on.
    evidence: Mutex<Option<mpsc::Sender<FailureNote>>>,
    /// Every routing change, for whoever plans the users' re-logins and
    /// repairs what a move breaks (the failover module).
    moves: broadcast::Sender<Move>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GroupHandle {
    /// A handle whose view is "both nodes initializing", until [`spawn`].
    pub fn new(config: &Config) -> GroupHandle {
        GroupHandle {
            status: watch::Sender::new(GroupStatus::initial(config)),
            admin: Mutex::new(None),
            evidence: Mutex::new(None),
            moves: broadcast::Sender::new(MOVE_QUEUE),
        }
    }

    /// A receiver of every [`Move`] from now on (after its streams were
    /// asked to close and routing changed).
    pub fn subscribe_moves(&self) -> broadcast::Receiver<Move> {
        self.moves.subscribe()
    }

    /// A receiver of the group view, updated after every input.
    pub fn subscribe(&self) -> watch::Receiver<GroupStatus> {
        self.status.subscribe()
    }

    /// The current group view.
    pub fn current(&self) -> GroupStatus {
        self.status.borrow().clone()
    }

    /// Whether users may be added to the assignment now.
    pub fn can_add_users(&self) -> Result<(), UsersCannotBeAdded> {
        let s = self.status.borrow();
        if s.can_add_users {
            return Ok(());
        }
        Err(UsersCannotBeAdded {
            group: s.group.clone(),
            node1: s.nodes[0].state,
            node2: s.nodes[1].state,
        })
    }

    /// Manual failover of `node` (0 = node 1): its users go to the peer and
    /// it stays failed over until [`GroupHandle::fallback`].
    pub async fn failover(&self, node: NodeIndex) -> Result<(), AdminError> {
        let id = self.node_id(node)?;
        self.request(Event::AdminFailover(id)).await
    }

    /// Manual fallback to `node`: its users come back from the peer.
    pub async fn fallback(&self, node: NodeIndex) -> Result<(), AdminError> {
        let id = self.node_id(node)?;
        self.request(Event::AdminFallback(id)).await
    }

    /// Manual recovery when both nodes are in a failed state.
    pub async fn recovery(&self) -> Result<(), AdminError> {
        self.request(Event::AdminRecovery).await
    }

    /// The relay saw a connection to `node` fail while the node had
    /// `sessions` bound sessions: evidence for fast detection.
    pub fn note_failure(&self, node: NodeIndex, sessions: usize) {
        if let Some(tx) = lock(&self.evidence).as_ref() {
            let _ = tx.try_send(FailureNote {
                node,
                at: Instant::now(),
                sessions,
            });
        }
    }

    fn node_id(&self, node: NodeIndex) -> Result<NodeId, AdminError> {
        let present = self
            .status
            .borrow()
            .nodes
            .get(node)
            .is_some_and(|n| n.name.is_some());
        match node {
            0 if present => Ok(NodeId::Node1),
            1 if present => Ok(NodeId::Node2),
            _ => Err(AdminError::NoSuchNode(node)),
        }
    }

    async fn request(&self, event: Event) -> Result<(), AdminError> {
        let Some(tx) = lock(&self.admin).clone() else {
            return Err(AdminError::NotRunning);
        };
        let (reply, answer) = oneshot::channel();
        tx.send(AdminRequest { event, reply })
            .await
            .map_err(|_| AdminError::NotRunning)?;
        answer
            .await
            .map_err(|_| AdminError::NotRunning)?
            .map_err(AdminError::from)
    }
}

/// What a probe task saw.
#[derive(Debug)]
enum Report {
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
    /// The confirming connect after strong evidence ended.
    Confirm {
        node: NodeId,
        refused: bool,
        detail: String,
    },
}

/// Starts the monitor for the proxy's group. Aborting the returned task
/// stops the probes too (they belong to it).
pub fn spawn(shared: Arc<Shared>) -> JoinHandle<()> {
    let span = info_span!("group.monitor", group.name = %shared.config.group.name);
    tokio::spawn(run(shared).instrument(span))
}

async fn run(shared: Arc<Shared>) {
    let handle = &shared.group;
    let (admin_tx, admin_rx) = mpsc::channel(ADMIN_QUEUE);
    let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE);
    let (evidence_tx, evidence_rx) = mpsc::channel(EVIDENCE_QUEUE);
    *lock(&handle.admin) = Some(admin_tx);
    if shared.config.srm.fast_detect {
        *lock(&handle.evidence) = Some(evidence_tx);
    }
    let mut probes = JoinSet::new();
    for (i, node) in shared.config.nodes.iter().enumerate().take(2) {
        let id = if i == 0 { NodeId::Node1 } else { NodeId::Node2 };
        let span = info_span!("group.heartbeat", node.name = %node.name, node.id = %id);
        probes.spawn(heartbeat_loop(shared.clone(), id, report_tx.clone()).instrument(span));
        for svc in &node.critical_services {
            let span = info_span!(
                "group.critical_service",
                node.name = %node.name,
                service.name = %svc.name,
                service.target = %svc.target,
            );
            probes.spawn(
                service_loop(shared.clone(), id, svc.clone(), report_tx.clone()).instrument(span),
            );
        }
    }
    let mut m = Monitor::new(shared.clone(), report_tx);
    info!(
        high_availability = m.g.params().high_availability,
        heartbeat.interval = ?m.g.params().heartbeat_interval,
        heartbeat.timeout = ?m.g.params().heartbeat_timeout,
        "watching the group"
    );
    m.main_loop(admin_rx, report_rx, evidence_rx).await;
    *lock(&handle.admin) = None;
    *lock(&handle.evidence) = None;
    probes.shutdown().await;
}

/// Per-node bookkeeping of the driver (the machine keeps the rest).
#[derive(Debug, Default)]
struct NodeWatch {
    last_ok: Option<(Instant, SystemTime)>,
    last_error: Option<String>,
    /// Mechanisms of the latest successful heartbeat that read them.
    mechanisms: Option<Vec<String>>,
    /// Recent relay failures: (when, sessions at the time).
    failures: VecDeque<(Instant, usize)>,
    /// A confirming connect is running.
    confirming: bool,
    /// Database and authentication service seen down (for the status).
    database_down: bool,
    auth_down: bool,
}

struct Monitor {
    shared: Arc<Shared>,
    g: GroupState,
    nodes: [NodeWatch; 2],
    /// For the confirming connects, which report like probes do.
    reports: mpsc::Sender<Report>,
}

impl Monitor {
    fn new(shared: Arc<Shared>, reports: mpsc::Sender<Report>) -> Monitor {
        let params = params_of(&shared.config);
        let g = GroupState::new(Instant::now(), params);
        let mut m = Monitor {
            shared,
            g,
            nodes: Default::default(),
            reports,
        };
        if m.shared.config.nodes.len() < 2 {
            // A one-node group: the empty slot is a node that is not there,
            // so the one node settles in Normal without waiting for the
            // initialization timeout.
            m.observe(Event::ConnectionsLost(NodeId::Node2));
        }
        m.publish();
        m
    }

    async fn main_loop(
        &mut self,
        mut admin: mpsc::Receiver<AdminRequest>,
        mut reports: mpsc::Receiver<Report>,
        mut evidence: mpsc::Receiver<FailureNote>,
    ) {
        loop {
            let deadline = self.g.next_deadline();
            let timer = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(r) = reports.recv() => self.on_report(r),
                Some(note) = evidence.recv() => self.on_failure_note(note),
                Some(req) = admin.recv() => {
                    info!(request = ?req.event, "administrator request");
                    let event = req.event;
                    let out = self.feed(|g, now| g.handle(now, event));
                    if let Err(e) = &out {
                        info!(error = %e, "administrator request refused");
                    }
                    let _ = req.reply.send(out);
                }
                () = timer => {
                    let _ = self.feed(|g, now| Ok(g.poll(now)));
                }
                else => return,
            }
            self.publish();
        }
    }

    fn name(&self, id: NodeId) -> &str {
        self.shared
            .config
            .nodes
            .get(id.index())
            .map_or("(none)", |n| n.name.as_str())
    }

    fn on_report(&mut self, r: Report) {
        match r {
            Report::Heartbeat { node, result, auth } => {
                let w = &mut self.nodes[node.index()];
                let event = match result {
                    Ok(mechanisms) => {
                        if w.last_error.take().is_some() {
                            info!(node.name = %self.name(node), "heartbeats answered again");
                        }
                        let w = &mut self.nodes[node.index()];
                        w.last_ok = Some((Instant::now(), SystemTime::now()));
                        if let Some(m) = mechanisms {
                            w.mechanisms = Some(m);
                            self.refresh_mechanisms();
                        }
                        Event::HeartbeatOk(node)
                    }
                    Err(e) => {
                        if w.last_error.is_none() {
                            warn!(node.name = %self.name(node), error = %e, "heartbeat failed");
                        } else {
                            debug!(node.name = %self.name(node), error = %e, "heartbeat failed");
                        }
                        let w = &mut self.nodes[node.index()];
                        w.last_error = Some(e);
                        w.mechanisms = None;
                        Event::HeartbeatFailed(node)
                    }
                };
                self.observe(event);
                if let Some(ok) = auth {
                    let w = &mut self.nodes[node.index()];
                    if w.auth_down == ok {
                        w.auth_down = !ok;
                        if ok {
                            info!(node.name = %self.name(node), "authentication service works again");
                        } else {
                            warn!(node.name = %self.name(node), "monitor login refused: authentication service down");
                        }
                    }
                    self.observe(Event::AuthService { node, ok });
                }
            }
            Report::Service {
                node,
                name,
                database,
                error,
            } => {
                let up = error.is_none();
                if database {
                    let w = &mut self.nodes[node.index()];
                    if w.database_down == up {
                        w.database_down = !up;
                        log_service_change(self.name(node), &name, error.as_deref());
                    }
                    self.observe(Event::Database { node, ok: up });
                } else {
                    let was_down = self.g.services_down(node).any(|s| s == name);
                    if was_down == up {
                        log_service_change(self.name(node), &name, error.as_deref());
                    }
                    self.observe(Event::CriticalService { node, name, up });
                }
            }
            Report::Confirm {
                node,
                refused,
                detail,
            } => {
                let w = &mut self.nodes[node.index()];
                w.confirming = false;
                if refused && self.g.state(node).0 != NodeState::Down {
                    w.failures.clear();
                    warn!(
                        node.name = %self.name(node),
                        detail = %detail,
                        "relayed connections failed and a fresh connect is refused: node down"
                    );
                    self.observe(Event::ConnectionsLost(node));
                } else {
                    debug!(node.name = %self.name(node), refused, detail = %detail,
                           "relay failures not confirmed");
                }
            }
        }
    }

    fn on_failure_note(&mut self, note: FailureNote) {
        let Some(node) = node_id(note.node) else {
            return;
        };
        let srm = &self.shared.config.srm;
        let (window, enough) = (srm.fast_detect_window, srm.fast_detect_failures);
        let down = self.g.state(node).0 == NodeState::Down;
        let w = &mut self.nodes[node.index()];
        w.failures.push_back((note.at, note.sessions));
        while w
            .failures
            .front()
            .is_some_and(|(t, _)| note.at.saturating_duration_since(*t) > window)
        {
            w.failures.pop_front();
        }
        let failed = w.failures.len();
        let had = w.failures.iter().map(|(_, s)| *s).max().unwrap_or(0);
        // "Every relayed connection failed" when the node had fewer
        // sessions than the threshold (a login to a node with none counts).
        let strong = failed >= enough.min(had.max(1));
        if !strong || down || w.confirming {
            return;
        }
        w.confirming = true;
        debug!(node.name = %self.name(node), failed, had, "relay failures: confirming");
        let shared = self.shared.clone();
        let tx = self.reports.clone();
        tokio::spawn(
            async move {
                let timeout = shared.config.srm.effective_probe_timeout();
                let (refused, detail) = match confirm_connect(&shared, node, timeout).await {
                    Ok(()) => (false, "connect accepted".to_string()),
                    Err(e) => (e.is_refused(), e.to_string()),
                };
                let _ = tx
                    .send(Report::Confirm {
                        node,
                        refused,
                        detail,
                    })
                    .await;
            }
            .in_current_span(),
        );
    }

    /// Offers clients the mechanisms every answering node supports.
    fn refresh_mechanisms(&self) {
        let mut common: Option<Vec<String>> = None;
        for m in self.nodes.iter().filter_map(|w| w.mechanisms.as_ref()) {
            common = Some(match common {
                None => m.clone(),
                Some(c) => c.into_iter().filter(|x| m.contains(x)).collect(),
            });
        }
        if let Some(m) = common {
            self.shared.set_mechanisms(m);
        }
    }

    /// Feeds an observation. The machine refuses only requests and move
    /// confirmations, so a refusal here is a bug worth a warning, not a panic.
    fn observe(&mut self, event: Event) {
        if let Err(e) = self.feed(|g, now| g.handle(now, event)) {
            warn!(error = %e, "observation refused by the state machine");
        }
    }

    /// Runs one input through the machine and applies what it changed,
    /// confirming each move once its streams are closed.
    fn feed(
        &mut self,
        input: impl FnOnce(&mut GroupState, Instant) -> Result<Step, Rejected>,
    ) -> Result<(), Rejected> {
        let before = [self.g.state(NodeId::Node1), self.g.state(NodeId::Node2)];
        let step = input(&mut self.g, Instant::now())?;
        let mut view = self.apply(before, step);
        for _ in 0..MAX_CONFIRMATIONS {
            let Some(to) = self.g.move_in_progress() else {
                break;
            };
            let event = Event::MoveCompleted { node: to, ok: true };
            match self.g.handle(Instant::now(), event) {
                Ok(step) => view = self.apply(view, step),
                Err(e) => {
                    warn!(error = %e, "move confirmation refused");
                    break;
                }
            }
        }
        Ok(())
    }

    /// Logs and counts transitions, acts on moves; returns the states after.
    fn apply(&self, mut view: [(NodeState, Reason); 2], step: Step) -> [(NodeState, Reason); 2] {
        let metrics = &self.shared.metrics;
        for t in &step.transitions {
            view[t.node.index()] = t.to;
            self.log_transition(t, &view);
            metrics.group_transitions.fetch_add(1, Ordering::Relaxed);
        }
        for m in &step.moves {
            self.shared
                .routing
                .set(m.users_of.index(), m.to.map(NodeId::index));
            let evicted = self.evict(m);
            metrics.group_moves.fetch_add(1, Ordering::Relaxed);
            metrics
                .group_evictions
                .fetch_add(evicted as u64, Ordering::Relaxed);
            // Nobody listening is fine: the eviction above already happened.
            let _ = self.shared.group.moves.send(*m);
            info!(
                users_of = %self.name(m.users_of),
                from = %m.from.map_or("nobody", |n| self.name(n)),
                to = %m.to.map_or("nobody", |n| self.name(n)),
                reason = %m.why,
                evicted,
                "users re-routed"
            );
        }
        view
    }

    fn log_transition(&self, t: &Transition, view: &[(NodeState, Reason); 2]) {
        info!(
            node.name = %self.name(t.node),
            node.id = %t.node,
            from.state = %t.from.0,
            from.reason = %t.from.1,
            to.state = %t.to.0,
            to.reason = %t.to.1,
            node1.state = %view[0].0,
            node1.reason = %view[0].1,
            node2.state = %view[1].0,
            node2.reason = %view[1].1,
            "group state transition"
        );
    }

    /// Closes the streams of `m.users_of`'s users bound on the node they
    /// leave. Returns how many were asked to close.
    fn evict(&self, m: &Move) -> usize {
        let Some(from) = m.from else {
            return 0;
        };
        let tracker = &self.shared.tracker;
        let text = match m.to {
            Some(to) => format!(
                "the users of node {} move from {} to {} ({}); reconnect",
                self.name(m.users_of),
                self.name(from),
                self.name(to),
                m.why
            ),
            None => format!(
                "no node can serve the users of node {} now ({}); reconnect later",
                self.name(m.users_of),
                m.why
            ),
        };
        let xml = stream::stream_error("system-shutdown", Some(&text), None);
        let mut n = 0;
        for (conn, jid) in tracker.sessions_on(from.index()) {
            let Some(user) = tracker.lookup(&jid) else {
                continue;
            };
            if user.home != m.users_of.index() {
                continue;
            }
            let Some(h) = tracker.handle_of(conn) else {
                continue;
            };
            match h.try_send(Control::Evict(xml.clone())) {
                Ok(()) => n += 1,
                Err(mpsc::error::TrySendError::Full(c)) => {
                    // A busy connection: deliver the eviction when it has room.
                    n += 1;
                    tokio::spawn(async move {
                        let _ = h.send(c).await;
                    });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        n
    }

    fn publish(&self) {
        let tracker = &self.shared.tracker;
        let g = &self.g;
        self.shared.group.status.send_modify(|s| {
            for id in NodeId::ALL {
                let w = &self.nodes[id.index()];
                let n = &mut s.nodes[id.index()];
                (n.state, n.reason) = g.state(id);
                n.last_heartbeat_ok = w.last_ok.map(|(_, t)| t);
                n.last_heartbeat_ok_at = w.last_ok.map(|(t, _)| t);
                n.last_heartbeat_error = w.last_error.clone();
                n.services_down = g.services_down(id).map(str::to_owned).collect();
                if w.database_down {
                    n.services_down.push("database".into());
                }
                if w.auth_down {
                    n.services_down.push("authentication".into());
                }
                n.sessions = tracker.count_on(id.index());
            }
            s.table_row = g.table_row();
            s.recommended_action = g.recommended_action();
            s.serving = [g.serving(NodeId::Node1), g.serving(NodeId::Node2)];
            s.move_in_progress = g.move_in_progress();
            s.can_add_users = g.can_add_users();
            s.high_availability = g.params().high_availability;
            s.monitoring = true;
        });
    }
}

fn log_service_change(node: &str, service: &str, error: Option<&str>) {
    match error {
        Some(e) => {
            warn!(node.name = %node, service.name = %service, error = %e, "critical service down")
        }
        None => info!(node.name = %node, service.name = %service, "critical service up again"),
    }
}

fn node_id(i: NodeIndex) -> Option<NodeId> {
    match i {
        0 => Some(NodeId::Node1),
        1 => Some(NodeId::Node2),
        _ => None,
    }
}

/// The machine's parameters from the config.
pub fn params_of(config: &Config) -> GroupParams {
    let srm = &config.srm;
    GroupParams {
        heartbeat_interval: srm.heartbeat_interval,
        heartbeat_timeout: srm.heartbeat_timeout,
        initial_heartbeat_timeout: srm.initial_heartbeat_timeout,
        critical_service_delay: srm.critical_service_delay,
        auto_fallback: srm.auto_fallback,
        auto_fallback_after: srm.auto_fallback_after,
        high_availability: config.group.high_availability,
        auth_service_monitoring: srm.auth_service_monitoring,
        assignment: match config.group.assignment {
            AssignmentMode::Balanced => Assignment::Balanced,
            AssignmentMode::ActiveStandby => Assignment::ActiveStandby,
            AssignmentMode::None => Assignment::None,
        },
    }
}

/// A ticker on the heartbeat interval that fires at once, then every
/// interval; a slow probe delays the next tick instead of bunching them.
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

async fn heartbeat_loop(shared: Arc<Shared>, node: NodeId, tx: mpsc::Sender<Report>) {
    let Some(cfg) = shared.config.nodes.get(node.index()).cloned() else {
        return;
    };
    let srm = &shared.config.srm;
    let timeout = srm.effective_probe_timeout();
    let monitor_login = srm.auth_service_monitoring && cfg.heartbeat != HeartbeatKind::Login;
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
            HeartbeatKind::Login => match login_probe(&shared, &cfg, node, timeout).await {
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
                *auth = match login_probe(&shared, &cfg, node, timeout).await {
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

async fn service_loop(
    shared: Arc<Shared>,
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

/// The node's addresses, resolved within `timeout`.
async fn addresses(
    shared: &Shared,
    node: NodeId,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, String> {
    let Some(u) = shared.upstreams.get(node.index()) else {
        return Err("no such node".into());
    };
    match tokio::time::timeout(timeout, u.resolve(&shared.dns)).await {
        Ok(Ok(a)) if !a.is_empty() => Ok(a),
        Ok(Ok(_)) => Err(format!("node {}: no address", u.name)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "node {}: name resolution took over {timeout:?}",
            u.name
        )),
    }
}

async fn tcp_heartbeat(shared: &Shared, node: NodeId, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    let addrs = addresses(shared, node, timeout).await?;
    let left = timeout.saturating_sub(start.elapsed());
    probe::tcp_connect(&addrs[..], left)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The confirming connect after relay failures: a typed error, so that a
/// refusal can be told from a timeout.
async fn confirm_connect(
    shared: &Shared,
    node: NodeId,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let addrs = addresses(shared, node, timeout)
        .await
        .map_err(ProbeError::Malformed)?;
    probe::tcp_connect(&addrs[..], timeout).await.map(|_| ())
}

/// Opens a stream the way the relay does (address, TLS, features), so that
/// "the heartbeat works" means "a login can be routed there".
async fn xmpp_heartbeat(
    shared: &Shared,
    node: NodeId,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let Some(u) = shared.upstreams.get(node.index()) else {
        return Err("no such node".into());
    };
    let domain = &shared.config.group.domains[0];
    let max = shared.config.limits.max_stanza_bytes;
    let mut s = u
        .open(&shared.dns, domain, max, timeout)
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
/// (XEP-0199), then closes the stream.
async fn login_probe(
    shared: &Shared,
    cfg: &NodeConfig,
    node: NodeId,
    timeout: Duration,
) -> Result<Vec<String>, LoginFailure> {
    let srm = &shared.config.srm;
    let (Some(user), Some(password)) = (&srm.monitor_user, &srm.monitor_password) else {
        return Err(LoginFailure::Unreachable(
            "no monitor account configured".into(),
        ));
    };
    let start = Instant::now();
    let addrs = addresses(shared, node, timeout)
        .await
        .map_err(LoginFailure::Unreachable)?;
    let tls = client_tls(shared, cfg).map_err(LoginFailure::Unreachable)?;
    let domain = &shared.config.group.domains[0];
    let left = timeout.saturating_sub(start.elapsed());
    let unreachable = |e: ClientError| LoginFailure::Unreachable(e.to_string());
    let exchange = async {
        let mut c = SimClient::connect(addrs[0], domain, tls)
            .await
            .map_err(unreachable)?;
        let mechanisms = c.mechanisms();
        match c.login(user, password, "PLAIN").await {
            Ok(()) => {}
            Err(ClientError::SaslFailure { condition, .. }) => {
                debug!(condition = %condition, "monitor login refused");
                return Err(LoginFailure::Refused(mechanisms));
            }
            Err(e) => return Err(unreachable(e)),
        }
        let resource = format!("prg-proxy-monitor-{:08x}", rand::random::<u32>());
        c.bind(&resource).await.map_err(unreachable)?;
        c.ping().await.map_err(unreachable)?;
        let _ = c.send_raw("</stream:stream>").await;
        Ok(mechanisms)
    };
    tokio::time::timeout(left, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(LoginFailure::Unreachable(format!(
                "no answer within {timeout:?}"
            )))
        })
}

fn client_tls(shared: &Shared, cfg: &NodeConfig) -> Result<ClientTls, String> {
    let roots = || match &cfg.tls_roots {
        Some(r) => crate::tls::client_config(r, "tls_roots").map_err(|e| e.to_string()),
        None => Err("TLS towards the node needs tls_roots".into()),
    };
    let server_name = || {
        cfg.tls_server_name.clone().unwrap_or_else(|| {
            cfg.address
                .as_deref()
                .and_then(crate::config::split_host_port)
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| shared.config.group.domains[0].clone())
        })
    };
    Ok(match cfg.tls {
        UpstreamTls::None => ClientTls::None,
        UpstreamTls::Starttls => ClientTls::StartTls {
            config: roots()?,
            server_name: server_name(),
        },
        UpstreamTls::Direct => ClientTls::Direct {
            config: roots()?,
            server_name: server_name(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EXAMPLE;

    fn config() -> Config {
        Config::parse(EXAMPLE).expect("example parses")
    }

    #[tokio::test]
    async fn requests_without_a_monitor_fail_fast() {
        let h = GroupHandle::new(&config());
        assert_eq!(h.failover(0).await, Err(AdminError::NotRunning));
        assert_eq!(h.fallback(1).await, Err(AdminError::NotRunning));
        assert_eq!(h.recovery().await, Err(AdminError::NotRunning));
        assert_eq!(h.failover(2).await, Err(AdminError::NoSuchNode(2)));
        // Nothing is known yet: adding users is not safe.
        let e = h.can_add_users().unwrap_err();
        assert_eq!(e.node1, NodeState::Initializing);
        assert!(e.to_string().contains("prg-1"), "{e}");
        h.note_failure(0, 3); // dropped quietly
        assert!(!h.current().monitoring);
    }

    #[test]
    fn one_node_group_has_no_second_node() {
        let mut c = config();
        c.nodes.pop();
        let h = GroupHandle::new(&c);
        let s = h.current();
        assert_eq!(s.nodes[0].name.as_deref(), Some("imp1"));
        assert_eq!(s.nodes[1].name, None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(rt.block_on(h.fallback(1)), Err(AdminError::NoSuchNode(1)));
    }

    #[test]
    fn params_follow_the_config() {
        let mut c = config();
        c.group.high_availability = false;
        c.group.assignment = AssignmentMode::ActiveStandby;
        c.srm.heartbeat_timeout = Duration::from_secs(30);
        c.srm.auth_service_monitoring = true;
        let p = params_of(&c);
        assert!(!p.high_availability);
        assert!(p.auth_service_monitoring);
        assert_eq!(p.assignment, Assignment::ActiveStandby);
        assert_eq!(p.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(p.critical_service_delay, Duration::from_secs(90));
    }
}
