//! The Server Recovery Manager state machine of one presence redundancy group.
//!
//! Pure: no I/O, no tasks, no clock reads. Every input carries the time it
//! happened ([`GroupState::handle`], [`GroupState::poll`]); the driver wakes at
//! [`GroupState::next_deadline`]. Every call returns a [`Step`]: the node state
//! changes ([`Transition`]) and the routing changes ([`Move`]) that the
//! controller must log and act on. A state that did not change produces nothing,
//! so "did it flip?" is `!step.transitions.is_empty()`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

pub use crate::node::NodeId;

/// A node's state as the Server Recovery Manager reports it (source, Table 1).
///
/// `Display` gives the source's English name, which the status page shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Transient: the recovery manager has (re)started and waits for heartbeats.
    Initializing,
    /// Failed over by the administrator and stopped: serves nobody; fallback possible.
    Idle,
    /// Stable: serves its own users; manual failover possible.
    Normal,
    /// Stable: serves its peer's users as well as its own.
    RunningInBackupMode,
    /// Transient: taking over its peer's users.
    TakingOver,
    /// Transient: its users are being taken over by the peer.
    FailingOver,
    /// Stable: failed over but critical services are up; fallback possible.
    FailedOver,
    /// Stable: failed over and some critical services are stopped or failed.
    FailedOverCriticalServicesNotRunning,
    /// Transient: giving the peer's users back (Table 2 shows it on the backup node).
    FallingBack,
    /// Transient: taking its own users back from the backup (Table 2 shows it on the
    /// primary node).
    TakingBack,
    /// An error happened during a transition or while running in backup mode.
    RunningInFailedMode,
    /// The state cannot be established; restart the recovery manager on both nodes.
    Unknown,
    /// Auto-recovery: the failed-over node took every user back because the backup
    /// lost its database or a critical service.
    BackupActivated,
    /// Auto-recovery: the backup whose failure triggered `BackupActivated` on its peer.
    FailoverAffectedServices,
    /// Not a recovery-manager state: the proxy cannot reach the node at all. Table 2
    /// writes "node 1 is down ..." in the state column for this (rows 16 and 17).
    Down,
}

impl NodeState {
    /// Failed over: the node's own users are served elsewhere (or nowhere) and a
    /// fallback is what brings it back.
    pub fn is_failed_over(self) -> bool {
        matches!(
            self,
            NodeState::Idle
                | NodeState::FailedOver
                | NodeState::FailedOverCriticalServicesNotRunning
                | NodeState::FailoverAffectedServices
        )
    }

    /// A "failed state" in the sense of the manual recovery precondition.
    pub fn is_failed(self) -> bool {
        self.is_failed_over() || matches!(self, NodeState::RunningInFailedMode | NodeState::Unknown)
    }

    /// A state the machine passes through while users move.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            NodeState::Initializing
                | NodeState::TakingOver
                | NodeState::FailingOver
                | NodeState::FallingBack
                | NodeState::TakingBack
        )
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Initializing => "Initializing",
            NodeState::Idle => "Idle",
            NodeState::Normal => "Normal",
            NodeState::RunningInBackupMode => "Running in Backup Mode",
            NodeState::TakingOver => "Taking Over",
            NodeState::FailingOver => "Failing Over",
            NodeState::FailedOver => "Failed Over",
            NodeState::FailedOverCriticalServicesNotRunning => {
                "Failed Over with Critical Services Not Running"
            }
            NodeState::FallingBack => "Falling Back",
            NodeState::TakingBack => "Taking Back",
            NodeState::RunningInFailedMode => "Running in Failed Mode",
            NodeState::Unknown => "Unknown",
            NodeState::BackupActivated => "Backup Activated",
            NodeState::FailoverAffectedServices => "Failover Affected Services",
            NodeState::Down => "Down",
        })
    }
}

/// Why a node is in its state (source, Table 2 "reason" columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Table 2 row 1: both nodes normal.
    Normal,
    /// Blank in Table 2 (a down node, or Unknown state).
    None,
    /// The administrator asked for a failover or fallback.
    OnAdminRequest,
    /// The recovery manager (re)started.
    Initialization,
    /// A critical service stayed down for the critical service delay.
    CriticalServiceDown,
    /// The database stayed down for the critical service delay.
    DatabaseFailure,
    /// Critical services did not come up while a node took its users back.
    StartCriticalServicesFailed,
    /// The peer's heartbeats stopped for the heartbeat timeout (or the proxy saw
    /// every connection to it fail).
    PeerDown,
    /// The peer announced a shutdown or restart.
    PeerReboot,
    /// The peer was never seen within the initialization heartbeat timeout.
    PeerDownDuringInitialization,
    /// Moving the users to the backup failed.
    TakeoverUsersFailed,
    /// Moving the users back to their node failed.
    TakebackUsersFailed,
    /// Fallback started by the automatic fallback timer.
    AutomaticFallback,
    /// Auto-recovery after a database failure on the backup.
    AutoRecoverDatabaseFailure,
    /// Auto-recovery after a critical service failure on the backup.
    AutoRecoverCriticalServiceDown,
    /// Internal error, or a recovery manager restarted while its peer was failed.
    Unknown,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Normal => "Normal",
            Reason::None => "None",
            Reason::OnAdminRequest => "On Admin Request",
            Reason::Initialization => "Initialization",
            Reason::CriticalServiceDown => "Critical Service Down",
            Reason::DatabaseFailure => "Database Failure",
            Reason::StartCriticalServicesFailed => "Start Critical Services Failed",
            Reason::PeerDown => "Peer Down",
            Reason::PeerReboot => "Peer Reboot",
            Reason::PeerDownDuringInitialization => "Peer Down During Initialization",
            Reason::TakeoverUsersFailed => "Takeover Users Failed",
            Reason::TakebackUsersFailed => "Takeback Users Failed",
            Reason::AutomaticFallback => "Automatic Fallback",
            Reason::AutoRecoverDatabaseFailure => "Auto Recover Database Failure",
            Reason::AutoRecoverCriticalServiceDown => "Auto Recover Critical Service Down",
            Reason::Unknown => "Unknown",
        })
    }
}

/// How users are assigned to nodes (source, "configure user assignment mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Assignment {
    /// Users spread evenly over both nodes (the source's default).
    #[default]
    Balanced,
    /// All users on node 1; node 2 is the backup.
    ActiveStandby,
    /// No user is assigned; such users cannot log in.
    None,
}

impl Assignment {
    /// Whether any user has `home` as assigned node: only such homes produce
    /// [`Move`]s and have a [`GroupState::serving`] node.
    pub fn has_users(self, home: NodeId) -> bool {
        match self {
            Assignment::Balanced => true,
            Assignment::ActiveStandby => home == NodeId::Node1,
            Assignment::None => false,
        }
    }
}

/// The recovery manager's parameters. `Default` gives the source's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupParams {
    /// How often the driver sends a heartbeat (15 s). The machine does not use it
    /// itself; it is here so that the driver and the status page read one value.
    pub heartbeat_interval: Duration,
    /// Heartbeats may be missing this long before the peer takes over (60 s).
    pub heartbeat_timeout: Duration,
    /// The same while the recovery manager is initializing (120 s).
    pub initial_heartbeat_timeout: Duration,
    /// A critical service (or the database) may be down this long before
    /// failover (90 s).
    pub critical_service_delay: Duration,
    /// Move failed-over users back automatically (false).
    pub auto_fallback: bool,
    /// ... once the failed-over node has been healthy this long (30 min).
    pub auto_fallback_after: Duration,
    /// Without high availability a dead node is reported but its users are not
    /// moved. The source leaves it an optional checkbox and recommends it; the
    /// proxy exists for failover, so it defaults to true.
    pub high_availability: bool,
    /// Treat the XCP authentication service as a critical service (false).
    pub auth_service_monitoring: bool,
    /// User assignment mode (balanced).
    pub assignment: Assignment,
}

impl Default for GroupParams {
    fn default() -> Self {
        GroupParams {
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_timeout: Duration::from_secs(60),
            initial_heartbeat_timeout: Duration::from_secs(120),
            critical_service_delay: Duration::from_secs(90),
            auto_fallback: false,
            auto_fallback_after: Duration::from_secs(30 * 60),
            high_availability: true,
            auth_service_monitoring: false,
            assignment: Assignment::Balanced,
        }
    }
}

/// What the driver observed, or what the administrator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A heartbeat probe of the node succeeded. Also brings a down node back.
    HeartbeatOk(NodeId),
    /// A heartbeat probe failed. Informational: the timeout counts from the last
    /// `HeartbeatOk`, so a single lost probe changes nothing.
    HeartbeatFailed(NodeId),
    /// A critical service of the node went down or came back.
    CriticalService {
        /// The node whose service changed.
        node: NodeId,
        /// The service's name, as the driver knows it.
        name: String,
        /// Whether it is running now.
        up: bool,
    },
    /// The node's database went down or came back.
    Database {
        /// The node whose database changed.
        node: NodeId,
        /// Whether it works now.
        ok: bool,
    },
    /// The node's authentication service went down or came back (acted on only
    /// with `auth_service_monitoring`).
    AuthService {
        /// The node whose service changed.
        node: NodeId,
        /// Whether it works now.
        ok: bool,
    },
    /// Strong evidence that the node is gone (every relayed connection reset and a
    /// confirming connect refused): act now instead of waiting for the heartbeat
    /// timeout. Reason `PeerDown`.
    ConnectionsLost(NodeId),
    /// The node announced a shutdown or restart (e.g. `<system-shutdown/>` on its
    /// streams). Reason `PeerReboot`.
    NodeShutdown(NodeId),
    /// The node's recovery manager restarted (admin restart, or the controller
    /// itself restarted). The node keeps its state with reason `Initialization`.
    SrmRestarted(NodeId),
    /// The driver cannot establish the node's state.
    StatusUnknown(NodeId),
    /// The driver finished (or failed) moving the users of the transition in
    /// progress towards `node` (the node taking over or taking back).
    MoveCompleted {
        /// The destination of the move in progress.
        node: NodeId,
        /// Whether the users moved.
        ok: bool,
    },
    /// Administrator: fail this node over to its peer.
    AdminFailover(NodeId),
    /// Administrator: fall back to this (failed-over) node.
    AdminFallback(NodeId),
    /// Administrator: recover a group whose two nodes are both in a failed state.
    AdminRecovery,
    /// Administrator: switch high availability on or off.
    SetHighAvailability(bool),
    /// Nothing happened; only timers are evaluated (same as [`GroupState::poll`]).
    Tick,
}

/// One node's state change, for the log and the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The node that changed.
    pub node: NodeId,
    /// Its state and reason before.
    pub from: (NodeState, Reason),
    /// Its state and reason after.
    pub to: (NodeState, Reason),
    /// When.
    pub at: Instant,
}

/// A routing change: the users whose home is `users_of` must leave `from` (their
/// streams are closed with a re-login hint) and log in to `to` from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Move {
    /// Whose users: their assigned (home) node.
    pub users_of: NodeId,
    /// Where they were served; `None` if nobody served them.
    pub from: Option<NodeId>,
    /// Where they go; `None` if nobody can serve them now (logins are refused).
    pub to: Option<NodeId>,
    /// Why, for the hint and the log.
    pub why: Reason,
}

/// Everything one input changed. Empty if nothing flipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "transitions must be logged and moves acted on"]
pub struct Step {
    /// Node state changes, in order.
    pub transitions: Vec<Transition>,
    /// Routing changes, in order.
    pub moves: Vec<Move>,
}

impl Step {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.transitions.is_empty() && self.moves.is_empty()
    }
}

/// Why an input was refused. Only administrator requests and stale move
/// confirmations are refused; nothing is changed by a refused input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// Failover needs high availability.
    #[error("high availability is disabled for this group; enable it before a failover")]
    HighAvailabilityDisabled,
    /// One move at a time.
    #[error("users are moving towards {towards}; wait until the move completes")]
    MoveInProgress {
        /// The destination of the move in progress.
        towards: NodeId,
    },
    /// Failover starts from Normal only.
    #[error("{node} is {state}; only a node in Normal state can be failed over")]
    NotNormal {
        /// The node asked for.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// The peer must be Normal and healthy to take over.
    #[error("{peer} is {state} and not healthy enough to take over the users of {node}")]
    PeerCannotTakeOver {
        /// The node asked for.
        node: NodeId,
        /// Its peer.
        peer: NodeId,
        /// The peer's state.
        state: NodeState,
    },
    /// Fallback goes to a failed-over node only.
    #[error("{node} is {state}; fallback is possible only to a node in Idle or Failed Over state")]
    NotFailedOver {
        /// The node asked for.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// Fallback needs the node's critical services running.
    #[error("critical services are not running on {node}; start them (or restart the node) before a fallback")]
    CriticalServicesNotRunning {
        /// The node asked for.
        node: NodeId,
    },
    /// Fallback takes the users from a peer that serves them.
    #[error("{peer} is {state}, not serving the users of {node}")]
    PeerNotServing {
        /// The node asked for.
        node: NodeId,
        /// Its peer.
        peer: NodeId,
        /// The peer's state.
        state: NodeState,
    },
    /// Recovery is for a group whose nodes are both failed.
    #[error("recovery needs both nodes in a failed state; node 1 is {node1}, node 2 is {node2}")]
    NotBothFailed {
        /// Node 1's state.
        node1: NodeState,
        /// Node 2's state.
        node2: NodeState,
    },
    /// The node cannot be reached, so nothing can be done to it.
    #[error("{node} is unreachable")]
    Unreachable {
        /// The node.
        node: NodeId,
    },
    /// A move confirmation that matches no move in progress.
    #[error("no move towards {node} is in progress")]
    NoMoveInProgress {
        /// The node named by the confirmation.
        node: NodeId,
    },
}

/// The kind of move in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoveKind {
    /// Users go to the backup (`TakingOver` / `FailingOver`).
    Takeover,
    /// Users go back home (`TakingBack` / `FallingBack`).
    Takeback,
}

/// The move the machine waits for the driver to confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    /// The node taking over or taking back.
    to: NodeId,
    kind: MoveKind,
}

/// What the machine knows about one node.
#[derive(Debug, Clone)]
struct NodeRecord {
    state: NodeState,
    reason: Reason,
    /// When the node entered `state` (auto fallback counts from here at the earliest).
    since: Instant,
    /// The last successful heartbeat; the heartbeat timeout counts from here.
    last_ok: Instant,
    /// A heartbeat arrived since the node entered `Initializing`.
    seen: bool,
    /// Why the node went down, for the takeover that may follow later.
    down_cause: Reason,
    /// The administrator failed it over: it comes back `Idle` and never falls back
    /// automatically.
    admin_stopped: bool,
    /// Critical services that are down, with the time each went down.
    services_down: BTreeMap<String, Instant>,
    /// The database is down since.
    db_down_since: Option<Instant>,
    /// The authentication service is down since.
    auth_down_since: Option<Instant>,
    /// Healthy (reachable, nothing down) without interruption since.
    healthy_since: Option<Instant>,
}

impl NodeRecord {
    fn new(now: Instant) -> Self {
        NodeRecord {
            state: NodeState::Initializing,
            reason: Reason::Initialization,
            since: now,
            last_ok: now,
            seen: false,
            down_cause: Reason::PeerDown,
            admin_stopped: false,
            services_down: BTreeMap::new(),
            db_down_since: None,
            auth_down_since: None,
            healthy_since: None,
        }
    }
}

/// The recovery manager of one group: both nodes' states, the routing of each
/// home's users, and the move in flight.
#[derive(Debug, Clone)]
pub struct GroupState {
    params: GroupParams,
    nodes: [NodeRecord; 2],
    /// Which node serves the users of each home (index = home).
    routing: [Option<NodeId>; 2],
    pending: Option<Pending>,
    /// The latest time seen; inputs never move the clock backwards.
    now: Instant,
}

/// Bound on rule re-evaluation within one input; each pass either changes state or
/// stops, and a chain longer than this means a bug, not a reason to spin.
const MAX_SETTLE_PASSES: usize = 16;

impl GroupState {
    /// A group whose recovery managers just started: both nodes `Initializing`,
    /// users routed to their home nodes, until heartbeats resolve the states.
    pub fn new(now: Instant, params: GroupParams) -> Self {
        GroupState {
            params,
            nodes: [NodeRecord::new(now), NodeRecord::new(now)],
            routing: [Some(NodeId::Node1), Some(NodeId::Node2)],
            pending: None,
            now,
        }
    }

    /// The parameters in force.
    pub fn params(&self) -> &GroupParams {
        &self.params
    }

    /// A node's state and reason.
    pub fn state(&self, node: NodeId) -> (NodeState, Reason) {
        let r = &self.nodes[node.index()];
        (r.state, r.reason)
    }

    /// Which node serves the users whose home is `home`; `None` when nobody can
    /// (the serving node is down, or no user has that home).
    pub fn serving(&self, home: NodeId) -> Option<NodeId> {
        if !self.params.assignment.has_users(home) {
            return None;
        }
        self.routing[home.index()]
    }

    /// The node a move in flight is heading to, if the machine waits for a
    /// [`Event::MoveCompleted`].
    pub fn move_in_progress(&self) -> Option<NodeId> {
        self.pending.map(|p| p.to)
    }

    /// Users cannot be added while a node of the group is failed over (source,
    /// "redundancy interactions and restrictions").
    pub fn can_add_users(&self) -> bool {
        self.pending.is_none()
            && self.nodes.iter().all(|n| {
                !n.state.is_failed_over()
                    && !matches!(
                        n.state,
                        NodeState::RunningInBackupMode
                            | NodeState::BackupActivated
                            | NodeState::TakingOver
                            | NodeState::FailingOver
                            | NodeState::TakingBack
                            | NodeState::FallingBack
                    )
            })
    }

    /// The critical services the driver reported down on `node`.
    pub fn services_down(&self, node: NodeId) -> impl Iterator<Item = &str> {
        self.nodes[node.index()]
            .services_down
            .keys()
            .map(String::as_str)
    }

    /// The row of the source's Table 2 that the current combination is (1-based),
    /// if any. A row written for "node 1 failed, node 2 backup" also matches the
    /// mirrored combination.
    pub fn table_row(&self) -> Option<u8> {
        let a = self.state(NodeId::Node1);
        let b = self.state(NodeId::Node2);
        super::table::row(a, b).or_else(|| super::table::row(b, a))
    }

    /// What the administrator should do now (Table 2's cause and recommended
    /// action for the current combination; a general hint outside the table).
    pub fn recommended_action(&self) -> &'static str {
        match self.table_row() {
            Some(row) => super::table::action(row),
            None => super::table::general_action(
                self.state(NodeId::Node1).0,
                self.state(NodeId::Node2).0,
            ),
        }
    }

    /// When the machine next needs [`GroupState::poll`]: the earliest heartbeat
    /// timeout, critical service delay or auto fallback still ahead. `None` if no
    /// timer runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut out: Option<Instant> = None;
        let mut consider = |t: Instant| {
            if t > self.now && out.map_or(true, |o| t < o) {
                out = Some(t);
            }
        };
        for id in NodeId::ALL {
            let r = &self.nodes[id.index()];
            if r.state == NodeState::Down {
                continue;
            }
            consider(r.last_ok + self.heartbeat_timeout(id));
            if let Some((since, _)) = self.outage(id) {
                consider(since + self.params.critical_service_delay);
            }
            if let Some(t) = self.auto_fallback_at(id) {
                consider(t);
            }
        }
        out
    }

    /// Evaluates the timers at `now`.
    pub fn poll(&mut self, now: Instant) -> Step {
        let now = self.advance_clock(now);
        let mut step = Step::default();
        self.settle(now, &mut step);
        step
    }

    /// Feeds one input at `now`, then evaluates the timers. A refused input changes
    /// nothing. Call [`GroupState::poll`] at [`GroupState::next_deadline`] so that
    /// requests are judged against a current state.
    pub fn handle(&mut self, now: Instant, event: Event) -> Result<Step, Rejected> {
        let now = self.advance_clock(now);
        let mut step = Step::default();
        self.apply(now, event, &mut step)?;
        self.settle(now, &mut step);
        Ok(step)
    }

    fn advance_clock(&mut self, now: Instant) -> Instant {
        if now > self.now {
            self.now = now;
        }
        self.now
    }

    fn heartbeat_timeout(&self, id: NodeId) -> Duration {
        if self.nodes[id.index()].state == NodeState::Initializing {
            self.params.initial_heartbeat_timeout
        } else {
            self.params.heartbeat_timeout
        }
    }

    /// The oldest ongoing outage of something critical on `id`, and its reason.
    /// A tie goes to the database.
    fn outage(&self, id: NodeId) -> Option<(Instant, Reason)> {
        let r = &self.nodes[id.index()];
        let auth = if self.params.auth_service_monitoring {
            r.auth_down_since
        } else {
            None
        };
        let db = r.db_down_since.map(|t| (t, Reason::DatabaseFailure));
        let services = r
            .services_down
            .values()
            .copied()
            .chain(auth)
            .map(|t| (t, Reason::CriticalServiceDown));
        db.into_iter().chain(services).min_by_key(|(t, _)| *t)
    }

    fn healthy(&self, id: NodeId) -> bool {
        self.nodes[id.index()].state != NodeState::Down && self.outage(id).is_none()
    }

    /// A failure of `id` that is due at `now`: `(reason, unreachable)`.
    fn failure(&self, id: NodeId, now: Instant) -> Option<(Reason, bool)> {
        let r = &self.nodes[id.index()];
        if r.state == NodeState::Down {
            return None;
        }
        if now >= r.last_ok + self.heartbeat_timeout(id) {
            let why = if r.state == NodeState::Initializing {
                Reason::PeerDownDuringInitialization
            } else {
                Reason::PeerDown
            };
            return Some((why, true));
        }
        match self.outage(id) {
            Some((since, why)) if now >= since + self.params.critical_service_delay => {
                Some((why, false))
            }
            _ => None,
        }
    }

    /// When `id` falls back automatically, if it will.
    fn auto_fallback_at(&self, id: NodeId) -> Option<Instant> {
        if !self.params.auto_fallback || self.pending.is_some() {
            return None;
        }
        let r = &self.nodes[id.index()];
        let peer = self.nodes[id.peer().index()].state;
        let eligible = matches!(
            r.state,
            NodeState::FailedOver | NodeState::FailoverAffectedServices
        ) && matches!(
            peer,
            NodeState::RunningInBackupMode | NodeState::BackupActivated
        ) && self.healthy(id);
        let healthy_since = r.healthy_since?;
        eligible.then(|| healthy_since.max(r.since) + self.params.auto_fallback_after)
    }

    /// Can `id` take over its peer's users right now?
    fn can_take_over(&self, id: NodeId) -> bool {
        self.nodes[id.index()].state == NodeState::Normal && self.healthy(id)
    }

    fn set(&mut self, id: NodeId, state: NodeState, reason: Reason, now: Instant, step: &mut Step) {
        let r = &mut self.nodes[id.index()];
        if (r.state, r.reason) == (state, reason) {
            return;
        }
        step.transitions.push(Transition {
            node: id,
            from: (r.state, r.reason),
            to: (state, reason),
            at: now,
        });
        if r.state != state {
            r.since = now;
        }
        r.state = state;
        r.reason = reason;
        if state == NodeState::Initializing {
            r.seen = false;
        }
    }

    fn route(&mut self, home: NodeId, to: Option<NodeId>, why: Reason, step: &mut Step) {
        let from = self.routing[home.index()];
        if from == to {
            return;
        }
        self.routing[home.index()] = to;
        if self.params.assignment.has_users(home) {
            step.moves.push(Move {
                users_of: home,
                from,
                to,
                why,
            });
        }
    }

    /// Nobody can serve users routed to a down node.
    fn unroute(&mut self, down: NodeId, why: Reason, step: &mut Step) {
        for home in NodeId::ALL {
            if self.routing[home.index()] == Some(down) {
                self.route(home, None, why, step);
            }
        }
    }

    /// Restarting critical services gives them a fresh critical service delay.
    fn restart_services(&mut self, id: NodeId, now: Instant) {
        let r = &mut self.nodes[id.index()];
        for since in r.services_down.values_mut() {
            *since = now;
        }
        if let Some(t) = r.db_down_since.as_mut() {
            *t = now;
        }
        if let Some(t) = r.auth_down_since.as_mut() {
            *t = now;
        }
    }

    /// The failed-over state a node settles in: Idle when the administrator
    /// stopped it, else by whether its critical services run.
    fn failed_over_state(&self, id: NodeId) -> NodeState {
        if self.nodes[id.index()].admin_stopped {
            NodeState::Idle
        } else if self.outage(id).is_none() {
            NodeState::FailedOver
        } else {
            NodeState::FailedOverCriticalServicesNotRunning
        }
    }

    fn apply(&mut self, now: Instant, event: Event, step: &mut Step) -> Result<(), Rejected> {
        match event {
            Event::HeartbeatOk(id) => {
                let r = &mut self.nodes[id.index()];
                r.last_ok = now;
                match r.state {
                    NodeState::Initializing => r.seen = true,
                    NodeState::Down => self.reinitialize(id, now, step),
                    _ => {}
                }
            }
            Event::HeartbeatFailed(_) | Event::Tick => {}
            Event::CriticalService { node, name, up } => {
                let services = &mut self.nodes[node.index()].services_down;
                if up {
                    services.remove(&name);
                } else {
                    services.entry(name).or_insert(now);
                }
            }
            Event::Database { node, ok } => {
                let slot = &mut self.nodes[node.index()].db_down_since;
                *slot = if ok { None } else { Some(slot.unwrap_or(now)) };
            }
            Event::AuthService { node, ok } => {
                let slot = &mut self.nodes[node.index()].auth_down_since;
                *slot = if ok { None } else { Some(slot.unwrap_or(now)) };
            }
            Event::ConnectionsLost(id) => {
                if self.nodes[id.index()].state != NodeState::Down {
                    self.on_failure(id, Reason::PeerDown, true, now, step);
                }
            }
            Event::NodeShutdown(id) => {
                if self.nodes[id.index()].state != NodeState::Down {
                    self.on_failure(id, Reason::PeerReboot, true, now, step);
                }
            }
            Event::SrmRestarted(id) => self.srm_restarted(id, now, step),
            Event::StatusUnknown(id) => {
                // A move in flight always involves both nodes; nobody can finish it now.
                self.pending = None;
                self.set(id, NodeState::Unknown, Reason::None, now, step);
            }
            Event::MoveCompleted { node, ok } => match self.pending {
                Some(p) if p.to == node => self.complete_move(ok, now, step),
                _ => return Err(Rejected::NoMoveInProgress { node }),
            },
            Event::AdminFailover(id) => {
                self.check_failover(id)?;
                self.nodes[id.index()].admin_stopped = true;
                self.start_takeover(id, Reason::OnAdminRequest, now, step);
            }
            Event::AdminFallback(id) => {
                self.check_fallback(id)?;
                self.start_takeback(id, Reason::OnAdminRequest, now, step);
            }
            Event::AdminRecovery => {
                let (a, b) = (self.state(NodeId::Node1).0, self.state(NodeId::Node2).0);
                for id in NodeId::ALL {
                    if self.nodes[id.index()].state == NodeState::Down {
                        return Err(Rejected::Unreachable { node: id });
                    }
                }
                if !(a.is_failed() && b.is_failed()) {
                    return Err(Rejected::NotBothFailed { node1: a, node2: b });
                }
                self.pending = None;
                for id in NodeId::ALL {
                    self.restart_services(id, now);
                    self.nodes[id.index()].admin_stopped = false;
                    self.set(id, NodeState::Normal, Reason::Normal, now, step);
                }
                for home in NodeId::ALL {
                    self.route(home, Some(home), Reason::OnAdminRequest, step);
                }
            }
            Event::SetHighAvailability(on) => self.params.high_availability = on,
        }
        Ok(())
    }

    fn check_failover(&self, id: NodeId) -> Result<(), Rejected> {
        if !self.params.high_availability {
            return Err(Rejected::HighAvailabilityDisabled);
        }
        if let Some(p) = self.pending {
            return Err(Rejected::MoveInProgress { towards: p.to });
        }
        let state = self.nodes[id.index()].state;
        if state != NodeState::Normal {
            return Err(Rejected::NotNormal { node: id, state });
        }
        let peer = id.peer();
        if !self.can_take_over(peer) {
            return Err(Rejected::PeerCannotTakeOver {
                node: id,
                peer,
                state: self.nodes[peer.index()].state,
            });
        }
        Ok(())
    }

    fn check_fallback(&self, id: NodeId) -> Result<(), Rejected> {
        if let Some(p) = self.pending {
            return Err(Rejected::MoveInProgress { towards: p.to });
        }
        let state = self.nodes[id.index()].state;
        match state {
            NodeState::Idle | NodeState::FailedOver => {}
            NodeState::FailoverAffectedServices if self.healthy(id) => {}
            NodeState::FailoverAffectedServices
            | NodeState::FailedOverCriticalServicesNotRunning => {
                return Err(Rejected::CriticalServicesNotRunning { node: id })
            }
            NodeState::Down => return Err(Rejected::Unreachable { node: id }),
            _ => return Err(Rejected::NotFailedOver { node: id, state }),
        }
        let peer = id.peer();
        let pstate = self.nodes[peer.index()].state;
        if !matches!(
            pstate,
            NodeState::RunningInBackupMode | NodeState::BackupActivated
        ) {
            return Err(Rejected::PeerNotServing {
                node: id,
                peer,
                state: pstate,
            });
        }
        Ok(())
    }

    /// Users of `failed` (and of its peer, if they were on `failed`) go to the peer.
    fn start_takeover(&mut self, failed: NodeId, why: Reason, now: Instant, step: &mut Step) {
        let to = failed.peer();
        if self.nodes[failed.index()].state != NodeState::Down {
            self.set(failed, NodeState::FailingOver, why, now, step);
        }
        self.set(to, NodeState::TakingOver, why, now, step);
        let before = step.moves.len();
        self.route(failed, Some(to), why, step);
        self.route(to, Some(to), why, step);
        self.pending = Some(Pending {
            to,
            kind: MoveKind::Takeover,
        });
        if step.moves.len() == before {
            // Nobody to move (e.g. the standby failed in active/standby mode).
            self.complete_move(true, now, step);
        }
    }

    /// The users of `home` come back from its peer.
    fn start_takeback(&mut self, home: NodeId, why: Reason, now: Instant, step: &mut Step) {
        let from = home.peer();
        self.restart_services(home, now);
        self.nodes[home.index()].admin_stopped = false;
        self.set(home, NodeState::TakingBack, why, now, step);
        self.set(from, NodeState::FallingBack, why, now, step);
        let before = step.moves.len();
        self.route(home, Some(home), why, step);
        self.route(from, Some(from), why, step);
        self.pending = Some(Pending {
            to: home,
            kind: MoveKind::Takeback,
        });
        if step.moves.len() == before {
            self.complete_move(true, now, step);
        }
    }

    fn complete_move(&mut self, ok: bool, now: Instant, step: &mut Step) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let (to, other) = (p.to, p.to.peer());
        match (p.kind, ok) {
            (MoveKind::Takeover, true) => {
                let reason = self.nodes[to.index()].reason;
                self.set(to, NodeState::RunningInBackupMode, reason, now, step);
                if self.nodes[other.index()].state != NodeState::Down {
                    let state = self.failed_over_state(other);
                    let reason = self.nodes[other.index()].reason;
                    self.set(other, state, reason, now, step);
                }
            }
            (MoveKind::Takeback, true) => {
                for id in [to, other] {
                    self.nodes[id.index()].admin_stopped = false;
                    self.set(id, NodeState::Normal, Reason::Normal, now, step);
                }
            }
            (kind, false) => {
                let why = match kind {
                    MoveKind::Takeover => Reason::TakeoverUsersFailed,
                    MoveKind::Takeback => Reason::TakebackUsersFailed,
                };
                // The users were already told where to go; routing stays, and
                // recovery brings everyone home.
                for id in [to, other] {
                    if self.nodes[id.index()].state != NodeState::Down {
                        self.set(id, NodeState::RunningInFailedMode, why, now, step);
                    }
                }
            }
        }
    }

    /// A node that was down answers again: it initializes, already seen.
    fn reinitialize(&mut self, id: NodeId, now: Instant, step: &mut Step) {
        self.set(
            id,
            NodeState::Initializing,
            Reason::Initialization,
            now,
            step,
        );
        self.nodes[id.index()].seen = true;
    }

    fn srm_restarted(&mut self, id: NodeId, now: Instant, step: &mut Step) {
        let state = self.nodes[id.index()].state;
        if state == NodeState::Down {
            self.nodes[id.index()].last_ok = now;
            self.reinitialize(id, now, step);
            return;
        }
        self.nodes[id.index()].last_ok = now;
        let peer = id.peer();
        if self.nodes[peer.index()].state == NodeState::RunningInFailedMode {
            // Table 2 row 21: a recovery manager restarting while its peer is failed.
            self.pending = None;
            for n in [id, peer] {
                self.set(
                    n,
                    NodeState::RunningInFailedMode,
                    Reason::Unknown,
                    now,
                    step,
                );
            }
            return;
        }
        match state {
            NodeState::Normal => {}
            NodeState::Initializing => self.nodes[id.index()].seen = true,
            NodeState::Unknown | NodeState::RunningInFailedMode => {
                self.set(
                    id,
                    NodeState::Initializing,
                    Reason::Initialization,
                    now,
                    step,
                );
                self.nodes[id.index()].seen = true;
            }
            NodeState::FailedOver | NodeState::FailedOverCriticalServicesNotRunning => {
                let s = self.failed_over_state(id);
                self.set(id, s, Reason::Initialization, now, step);
            }
            // The recovery manager reloads its persisted state (Table 2 rows 5-9).
            _ => self.set(id, state, Reason::Initialization, now, step),
        }
    }

    /// Acts on a failure of `id` (its peer is the one that reacts).
    fn on_failure(
        &mut self,
        id: NodeId,
        why: Reason,
        unreachable: bool,
        now: Instant,
        step: &mut Step,
    ) {
        let peer = id.peer();
        let state = self.nodes[id.index()].state;
        let pstate = self.nodes[peer.index()].state;
        if unreachable {
            self.nodes[id.index()].down_cause = why;
        }
        let ha = self.params.high_availability;

        if let Some(p) = self.pending {
            if p.kind == MoveKind::Takeover && p.to != id {
                // The node being failed over is expected to be failing; only
                // losing it altogether is news.
                if unreachable {
                    self.set(id, NodeState::Down, Reason::None, now, step);
                }
                return;
            }
            self.pending = None;
            // An error during a transition: both nodes run in failed mode.
            let why = if p.kind == MoveKind::Takeback && p.to == id && !unreachable {
                Reason::StartCriticalServicesFailed
            } else {
                why
            };
            if unreachable {
                self.set(id, NodeState::Down, Reason::None, now, step);
                self.unroute(id, why, step);
            } else {
                self.set(id, NodeState::RunningInFailedMode, why, now, step);
            }
            if pstate != NodeState::Down {
                self.set(peer, NodeState::RunningInFailedMode, why, now, step);
            }
            return;
        }

        match state {
            NodeState::Initializing => {
                if !unreachable {
                    // Services are judged once the node is initialized.
                    return;
                }
                self.set(id, NodeState::Down, Reason::None, now, step);
                let peer_up = pstate == NodeState::Initializing && self.nodes[peer.index()].seen;
                if peer_up && ha {
                    self.start_takeover(id, why, now, step);
                } else {
                    if peer_up {
                        self.set(peer, NodeState::Normal, Reason::Normal, now, step);
                    }
                    self.unroute(id, why, step);
                }
            }
            NodeState::Normal => {
                if unreachable {
                    self.set(id, NodeState::Down, Reason::None, now, step);
                }
                if ha && self.can_take_over(peer) {
                    self.start_takeover(id, why, now, step);
                } else if unreachable {
                    self.unroute(id, why, step);
                } else if ha && pstate == NodeState::Normal && self.failure(peer, now).is_some() {
                    // Both nodes failing: the group enters the failed state.
                    for n in [id, peer] {
                        self.set(n, NodeState::RunningInFailedMode, why, now, step);
                    }
                }
            }
            NodeState::RunningInBackupMode
            | NodeState::BackupActivated
            | NodeState::RunningInFailedMode
            | NodeState::Unknown => {
                let peer_ready = pstate == NodeState::FailedOver && self.healthy(peer);
                if state == NodeState::RunningInBackupMode && ha && peer_ready {
                    if unreachable {
                        // The backup died; the failed-over node takes everyone.
                        self.set(id, NodeState::Down, Reason::None, now, step);
                        self.start_takeover(id, why, now, step);
                    } else {
                        // Table 2 rows 22-23. The source shows the activated node's
                        // reason as "Auto Recover Database Failure" in both rows.
                        let affected = if why == Reason::DatabaseFailure {
                            Reason::AutoRecoverDatabaseFailure
                        } else {
                            Reason::AutoRecoverCriticalServiceDown
                        };
                        self.set(
                            peer,
                            NodeState::BackupActivated,
                            Reason::AutoRecoverDatabaseFailure,
                            now,
                            step,
                        );
                        self.set(id, NodeState::FailoverAffectedServices, affected, now, step);
                        self.route(peer, Some(peer), affected, step);
                        self.route(id, Some(peer), affected, step);
                    }
                } else if unreachable {
                    self.set(id, NodeState::Down, Reason::None, now, step);
                    self.unroute(id, why, step);
                } else if matches!(
                    state,
                    NodeState::RunningInBackupMode | NodeState::BackupActivated
                ) {
                    // Table 2 row 15: the backup fails and nobody can take over.
                    self.set(id, NodeState::RunningInFailedMode, why, now, step);
                    if pstate != NodeState::Down {
                        self.set(peer, NodeState::RunningInFailedMode, why, now, step);
                    }
                }
            }
            NodeState::Idle
            | NodeState::FailedOver
            | NodeState::FailedOverCriticalServicesNotRunning
            | NodeState::FailoverAffectedServices => {
                if unreachable {
                    self.set(id, NodeState::Down, Reason::None, now, step);
                    self.unroute(id, why, step);
                } else if state == NodeState::FailedOver {
                    self.set(
                        id,
                        NodeState::FailedOverCriticalServicesNotRunning,
                        why,
                        now,
                        step,
                    );
                }
            }
            // Transient states always have a move pending (handled above); a down
            // node has nothing left to fail.
            _ => {
                if unreachable && state != NodeState::Down {
                    self.set(id, NodeState::Down, Reason::None, now, step);
                    self.unroute(id, why, step);
                }
            }
        }
    }

    /// A node that was down or restarting is back: where does it fit?
    fn resolve_returning(&mut self, id: NodeId, now: Instant, step: &mut Step) {
        let peer = id.peer();
        let pstate = self.nodes[peer.index()].state;
        let ha = self.params.high_availability;
        match pstate {
            NodeState::Initializing => {
                if self.nodes[peer.index()].seen {
                    for n in [id, peer] {
                        self.set(n, NodeState::Normal, Reason::Normal, now, step);
                        self.route(n, Some(n), Reason::Initialization, step);
                    }
                }
                // else: wait for the peer, or for its initialization timeout.
            }
            NodeState::RunningInBackupMode
            | NodeState::TakingOver
            | NodeState::BackupActivated
            | NodeState::FallingBack => {
                let s = self.failed_over_state(id);
                self.set(id, s, Reason::Initialization, now, step);
            }
            NodeState::RunningInFailedMode => {
                for n in [id, peer] {
                    self.set(
                        n,
                        NodeState::RunningInFailedMode,
                        Reason::Unknown,
                        now,
                        step,
                    );
                }
            }
            s if s.is_failed_over() && ha => {
                // It was the backup; nobody serves anyone until it is back.
                self.set(
                    id,
                    NodeState::RunningInBackupMode,
                    Reason::Initialization,
                    now,
                    step,
                );
                for home in NodeId::ALL {
                    self.route(home, Some(id), Reason::Initialization, step);
                }
            }
            _ => {
                self.set(id, NodeState::Normal, Reason::Normal, now, step);
                self.route(id, Some(id), Reason::Initialization, step);
            }
        }
    }

    /// Re-evaluates every rule at `now` until nothing changes.
    fn settle(&mut self, now: Instant, step: &mut Step) {
        for _ in 0..MAX_SETTLE_PASSES {
            let before = (step.transitions.len(), step.moves.len());
            self.refresh_health(now);
            self.settle_once(now, step);
            if (step.transitions.len(), step.moves.len()) == before {
                return;
            }
        }
        tracing::warn!("group state did not settle; rules keep firing");
    }

    fn refresh_health(&mut self, now: Instant) {
        for id in NodeId::ALL {
            let healthy = self.healthy(id);
            let r = &mut self.nodes[id.index()];
            r.healthy_since = match (healthy, r.healthy_since) {
                (true, None) => Some(now),
                (true, kept) => kept,
                (false, _) => None,
            };
        }
    }

    fn settle_once(&mut self, now: Instant, step: &mut Step) {
        for id in NodeId::ALL {
            if let Some((why, unreachable)) = self.failure(id, now) {
                let before = step.transitions.len();
                self.on_failure(id, why, unreachable, now, step);
                if step.transitions.len() != before {
                    return;
                }
            }
        }
        for id in NodeId::ALL {
            let r = &self.nodes[id.index()];
            match r.state {
                NodeState::Initializing if r.seen => {
                    let before = step.transitions.len();
                    self.resolve_returning(id, now, step);
                    if step.transitions.len() != before {
                        return;
                    }
                }
                NodeState::FailedOverCriticalServicesNotRunning if self.outage(id).is_none() => {
                    // Table 2 row 11: the critical services are back.
                    let reason = r.reason;
                    return self.set(id, NodeState::FailedOver, reason, now, step);
                }
                NodeState::Down
                    if self.params.high_availability
                        && self.pending.is_none()
                        && self.routing[id.index()].is_none()
                        && self.params.assignment.has_users(id)
                        && self.can_take_over(id.peer()) =>
                {
                    let why = r.down_cause;
                    return self.start_takeover(id, why, now, step);
                }
                _ => {}
            }
            if self.auto_fallback_at(id).is_some_and(|t| now >= t) {
                return self.start_takeback(id, Reason::AutomaticFallback, now, step);
            }
        }
    }
}
