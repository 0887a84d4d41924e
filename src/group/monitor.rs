//! The group monitor: the driver around the pure [`GroupState`].
//!
//! One task ([`spawn`], started by the proxy) owns the state machine.
//! Around it run the probes of [`heartbeat`](super::heartbeat). The driver
//! feeds their reports, the relay's failure notes
//! ([`GroupHandle::note_failure`], weighed by
//! [`FailureWindow`](super::evidence::FailureWindow)) and the
//! administrator's requests into the machine, wakes at
//! [`GroupState::next_deadline`] for the timers, and applies every [`Step`]:
//!
//! - each [`Transition`] is logged at info with both nodes' states and
//!   reasons, and counted in the metrics;
//! - each [`Move`] re-routes the home's users ([`Routing::set`]) and is
//!   handed to whoever closes the affected streams (a [`MoveOrder`] to the
//!   failover module). Only when every order of the moves in flight is done
//!   does the driver report [`Event::MoveCompleted`]; without a failover
//!   module a move is complete at once.
//!
//! After every input the current view (both states and reasons, Table 2 row,
//! recommended action, who serves whom, last heartbeats) is published on the
//! handle's [`watch`](tokio::sync::watch) channel for the status page.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use super::evidence::FailureWindow;
use super::handle::{lock, AdminRequest, FailureNote, GroupHandle};
use super::heartbeat::{self, Probes, Report};
use super::{
    Assignment, Event, GroupParams, GroupState, Move, NodeId, NodeState, Reason, Rejected, Step,
    Transition,
};
use crate::config::{AssignmentMode, Config};
use crate::metrics::Metrics;
use crate::node::PAIR;
use crate::route::Routing;
use crate::tracker::Tracker;
use crate::upstream::{Mechanisms, Nodes};

/// Pauses before each confirming connect after relay failures: at once,
/// then twice more shortly after (a dying node's kernel may still accept).
const CONFIRM_RETRIES: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(200),
];

/// Reports from the probe tasks waiting for the monitor. Probes are paced by
/// the heartbeat interval, so a few per node is plenty.
const REPORT_QUEUE: usize = 64;
/// Relay failure notes waiting for the monitor. When it is full, further
/// notes are dropped: the ones queued are already evidence enough.
const EVIDENCE_QUEUE: usize = 1024;
/// Administrator requests waiting for the monitor.
const ADMIN_QUEUE: usize = 16;

/// A move for whoever closes the streams it affects. Answer on `done`
/// (`true`: every affected stream is closed) when that is over; dropping
/// it counts as a failed move.
#[derive(Debug)]
pub struct MoveOrder {
    /// The routing change (already applied).
    pub mv: Move,
    /// Where to answer.
    pub done: oneshot::Sender<bool>,
}

/// What the monitor needs from the rest of the proxy, built once at start.
pub struct MonitorContext {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The nodes, as the relay reaches them.
    pub nodes: Arc<Nodes>,
    /// Written on every move.
    pub routing: Arc<Routing>,
    /// Read for the session counts shown in the status.
    pub tracker: Arc<Tracker>,
    /// Refreshed from the heartbeats.
    pub mechanisms: Arc<Mechanisms>,
    /// Transitions, moves.
    pub metrics: Arc<Metrics>,
    /// Where the view is published and requests arrive.
    pub handle: Arc<GroupHandle>,
    /// Where moves go to have their streams closed (the failover module).
    pub moves: Option<mpsc::UnboundedSender<MoveOrder>>,
}

/// Starts the monitor for the proxy's group. Aborting the returned task
/// stops the probes too (they belong to it).
pub fn spawn(ctx: MonitorContext) -> JoinHandle<()> {
    let span = info_span!("group.monitor", group.name = %ctx.config.group.name);
    let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE);
    tokio::spawn(run(ctx, true, report_tx, report_rx).instrument(span))
}

async fn run(
    ctx: MonitorContext,
    with_probes: bool,
    report_tx: mpsc::Sender<Report>,
    report_rx: mpsc::Receiver<Report>,
) {
    let (admin_tx, admin_rx) = mpsc::channel(ADMIN_QUEUE);
    let (evidence_tx, evidence_rx) = mpsc::channel(EVIDENCE_QUEUE);
    let handle = ctx.handle.clone();
    *lock(&handle.admin) = Some(admin_tx);
    if ctx.config.srm.fast_detect {
        *lock(&handle.evidence) = Some(evidence_tx);
    }
    let probes_ctx = Arc::new(Probes {
        nodes: ctx.nodes.clone(),
        config: ctx.config.clone(),
    });
    let mut probes = JoinSet::new();
    for (id, node) in NodeId::ALL.into_iter().zip(&ctx.config.nodes) {
        if !with_probes {
            break;
        }
        let span = info_span!("group.heartbeat", node.name = %node.name, node.id = %id);
        probes.spawn(
            heartbeat::heartbeat_loop(probes_ctx.clone(), id, report_tx.clone()).instrument(span),
        );
        for svc in &node.critical_services {
            let span = info_span!(
                "group.critical_service",
                node.name = %node.name,
                service.name = %svc.name,
                service.target = %svc.target,
            );
            probes.spawn(
                heartbeat::service_loop(probes_ctx.clone(), id, svc.clone(), report_tx.clone())
                    .instrument(span),
            );
        }
    }
    let mut m = Monitor::new(ctx, probes_ctx, report_tx);
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

/// A driver without probe tasks whose report channel the caller feeds
/// (tests inject heartbeat results under paused time).
#[cfg(test)]
async fn spawn_without_probes(ctx: MonitorContext) -> (JoinHandle<()>, mpsc::Sender<Report>) {
    let handle = ctx.handle.clone();
    let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE);
    let task = tokio::spawn(run(ctx, false, report_tx.clone(), report_rx));
    // Wait until the driver accepts requests.
    while lock(&handle.admin).is_none() {
        tokio::task::yield_now().await;
    }
    (task, report_tx)
}

/// Per-node bookkeeping of the driver (the machine keeps the rest).
#[derive(Debug, Default)]
struct NodeWatch {
    last_ok: Option<(Instant, SystemTime)>,
    last_error: Option<String>,
    /// Mechanisms of the latest successful heartbeat that read them.
    mechanisms: Option<Vec<String>>,
    /// Recent relay failures.
    failures: Option<FailureWindow>,
    /// A confirming connect is running.
    confirming: bool,
    /// Database and authentication service seen down (for the status).
    database_down: bool,
    auth_down: bool,
}

struct Monitor {
    ctx: MonitorContext,
    probes: Arc<Probes>,
    g: GroupState,
    nodes: [NodeWatch; PAIR],
    /// For the confirming connects and move completions, which report like
    /// probes do.
    reports: mpsc::Sender<Report>,
    /// Move orders handed out and not answered yet.
    orders_in_flight: usize,
    /// Whether every answered order of the moves in flight succeeded.
    orders_ok: bool,
}

impl Monitor {
    fn new(ctx: MonitorContext, probes: Arc<Probes>, reports: mpsc::Sender<Report>) -> Monitor {
        let params = params_of(&ctx.config);
        let g = GroupState::new(Instant::now(), params);
        let srm = &ctx.config.srm;
        let mut nodes: [NodeWatch; PAIR] = Default::default();
        for w in &mut nodes {
            w.failures = Some(FailureWindow::new(
                srm.fast_detect_window,
                srm.fast_detect_failures,
            ));
        }
        let mut m = Monitor {
            ctx,
            probes,
            g,
            nodes,
            reports,
            orders_in_flight: 0,
            orders_ok: true,
        };
        if m.ctx.config.nodes.len() < PAIR {
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
        self.ctx.nodes.name(id)
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
            Report::Mechanisms { node, mechanisms } => {
                self.nodes[node.index()].mechanisms = Some(mechanisms);
                self.refresh_mechanisms();
            }
            Report::MovesDone { ok } => {
                self.orders_in_flight = self.orders_in_flight.saturating_sub(1);
                self.orders_ok &= ok;
                self.confirm_moves();
            }
            Report::Confirm {
                node,
                refused,
                detail,
            } => {
                let w = &mut self.nodes[node.index()];
                w.confirming = false;
                if refused && self.g.state(node).0 != NodeState::Down {
                    if let Some(f) = w.failures.as_mut() {
                        f.clear();
                    }
                    warn!(
                        node.name = %self.name(node),
                        detail = %detail,
                        "relayed connections failed and a fresh connect is refused: node down"
                    );
                    self.ctx
                        .metrics
                        .fast_detections
                        .fetch_add(1, Ordering::Relaxed);
                    self.observe(Event::ConnectionsLost(node));
                } else {
                    debug!(node.name = %self.name(node), refused, detail = %detail,
                           "relay failures not confirmed");
                }
            }
        }
    }

    fn on_failure_note(&mut self, note: FailureNote) {
        let node = note.node;
        let down = self.g.state(node).0 == NodeState::Down;
        let w = &mut self.nodes[node.index()];
        let Some(window) = w.failures.as_mut() else {
            return;
        };
        let strong = window.observe(note.at, note.sessions);
        if !strong || down || w.confirming {
            return;
        }
        w.confirming = true;
        let failed = window.len();
        debug!(node.name = %self.name(node), failed, "relay failures: confirming");
        let probes = self.probes.clone();
        let tx = self.reports.clone();
        tokio::spawn(
            async move {
                let timeout = probes.config.srm.effective_probe_timeout();
                // A node being killed may still complete a handshake while
                // the kernel tears its sockets down: an accepted connect is
                // tried again a few times, shortly after.
                let mut outcome = (false, String::new());
                for pause in CONFIRM_RETRIES {
                    tokio::time::sleep(pause).await;
                    outcome = match heartbeat::confirm_connect(&probes, node, timeout).await {
                        Ok(()) => (false, "connect accepted".to_string()),
                        Err(e) => (e.is_refused(), e.to_string()),
                    };
                    if outcome.0 {
                        break;
                    }
                }
                let (refused, detail) = outcome;
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
            self.ctx.mechanisms.set(m);
        }
    }

    /// Feeds an observation. The machine refuses only requests and move
    /// confirmations, so a refusal here is a bug worth a warning, not a panic.
    fn observe(&mut self, event: Event) {
        if let Err(e) = self.feed(|g, now| g.handle(now, event)) {
            warn!(error = %e, "observation refused by the state machine");
        }
    }

    /// Runs one input through the machine and applies what it changed.
    /// Moves are confirmed later, when their streams are closed
    /// ([`Monitor::confirm_moves`]).
    fn feed(
        &mut self,
        input: impl FnOnce(&mut GroupState, Instant) -> Result<Step, Rejected>,
    ) -> Result<(), Rejected> {
        let before = [self.g.state(NodeId::Node1), self.g.state(NodeId::Node2)];
        let step = input(&mut self.g, Instant::now())?;
        self.apply(before, step);
        self.confirm_moves();
        Ok(())
    }

    /// Reports the move in flight as completed once no order is pending.
    /// Each confirmation may start a further move (whose orders then go
    /// out); the loop ends when the machine has nothing in flight or waits
    /// for orders.
    fn confirm_moves(&mut self) {
        while self.orders_in_flight == 0 {
            let Some(to) = self.g.move_in_progress() else {
                return;
            };
            let ok = std::mem::replace(&mut self.orders_ok, true);
            let before = [self.g.state(NodeId::Node1), self.g.state(NodeId::Node2)];
            match self
                .g
                .handle(Instant::now(), Event::MoveCompleted { node: to, ok })
            {
                Ok(step) => {
                    let progressed = !step.transitions.is_empty() || !step.moves.is_empty();
                    self.apply(before, step);
                    if !progressed {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "move confirmation refused");
                    return;
                }
            }
        }
    }

    /// Logs and counts transitions, re-routes and hands out moves.
    fn apply(&mut self, mut view: [(NodeState, Reason); PAIR], step: Step) {
        let metrics = self.ctx.metrics.clone();
        for t in &step.transitions {
            view[t.node.index()] = t.to;
            self.log_transition(t, &view);
            metrics.group_transitions.fetch_add(1, Ordering::Relaxed);
        }
        for m in &step.moves {
            self.ctx.routing.set(m.users_of, m.to);
            metrics.group_moves.fetch_add(1, Ordering::Relaxed);
            info!(
                users_of = %self.name(m.users_of),
                from = %m.from.map_or("nobody", |n| self.name(n)),
                to = %m.to.map_or("nobody", |n| self.name(n)),
                reason = %m.why,
                "users re-routed"
            );
            self.hand_out(*m);
        }
    }

    /// Gives a move to the failover module, which answers once the
    /// affected streams are closed; then it is published to subscribers.
    fn hand_out(&mut self, m: Move) {
        let handle = self.ctx.handle.clone();
        let Some(orders) = self.ctx.moves.as_ref() else {
            let _ = handle.moves.send(m);
            return;
        };
        let (done, answer) = oneshot::channel();
        if orders.send(MoveOrder { mv: m, done }).is_err() {
            let _ = handle.moves.send(m);
            return;
        }
        self.orders_in_flight += 1;
        let reports = self.reports.clone();
        tokio::spawn(
            async move {
                let ok = answer.await.unwrap_or(false);
                // Nobody listening is fine.
                let _ = handle.moves.send(m);
                let _ = reports.send(Report::MovesDone { ok }).await;
            }
            .in_current_span(),
        );
    }

    fn log_transition(&self, t: &Transition, view: &[(NodeState, Reason); PAIR]) {
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

    fn publish(&self) {
        let tracker = &self.ctx.tracker;
        let g = &self.g;
        self.ctx.handle.status.send_modify(|s| {
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
                n.sessions = tracker.count_on(id);
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
            // Mode `none` admits the users assigned one by one (the
            // assignment file, users added at run time), to either node:
            // their homes move on failover and fallback as balanced ones
            // do. (The source's "none", nobody assigned, would strand them
            // on a failed node.)
            AssignmentMode::None => Assignment::Balanced,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EXAMPLE;
    use std::time::Duration;

    fn config() -> Config {
        Config::parse(EXAMPLE).expect("example parses")
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

    #[test]
    fn users_assigned_one_by_one_move_with_their_home() {
        let mut c = config();
        c.group.assignment = AssignmentMode::None;
        let p = params_of(&c);
        assert!(NodeId::ALL.iter().all(|&n| p.assignment.has_users(n)));
    }

    struct Driven {
        handle: Arc<GroupHandle>,
        routing: Arc<Routing>,
        reports: mpsc::Sender<Report>,
        orders: mpsc::UnboundedReceiver<MoveOrder>,
        _task: JoinHandle<()>,
    }

    async fn driven(mut c: Config) -> Driven {
        c.group.high_availability = true;
        let config = Arc::new(c);
        let handle = Arc::new(GroupHandle::new(&config));
        let routing = Arc::new(Routing::new());
        let (tx, orders) = mpsc::unbounded_channel();
        let ctx = MonitorContext {
            nodes: Arc::new(Nodes::from_config(&config).expect("nodes")),
            config,
            routing: routing.clone(),
            tracker: Arc::new(Tracker::new()),
            mechanisms: Arc::new(Mechanisms::default()),
            metrics: Arc::new(Metrics::default()),
            handle: handle.clone(),
            moves: Some(tx),
        };
        let (task, reports) = spawn_without_probes(ctx).await;
        Driven {
            handle,
            routing,
            reports,
            orders,
            _task: task,
        }
    }

    impl Driven {
        async fn beat(&self, node: NodeId) {
            let r = Report::Heartbeat {
                node,
                result: Ok(None),
                auth: None,
            };
            self.reports.send(r).await.expect("driver runs");
        }

        /// The published state once the driver has taken every input.
        async fn settled(&self) -> crate::group::GroupStatus {
            // A round trip through the admin queue orders after the reports.
            let _ = self.handle.recovery().await;
            self.handle.current()
        }
    }

    /// Both nodes beat for a while; then node 1 falls silent. The driver
    /// moves node 1's users exactly at the heartbeat timeout, and the move
    /// stays in flight until its order is answered.
    #[tokio::test(start_paused = true)]
    async fn a_silent_node_moves_at_the_heartbeat_timeout_and_waits_for_its_streams() {
        let d = driven(config()).await;
        let interval = Duration::from_secs(15);
        for _ in 0..10 {
            d.beat(NodeId::Node1).await;
            d.beat(NodeId::Node2).await;
            tokio::time::sleep(interval).await;
        }
        let s = d.settled().await;
        assert_eq!(s.state(NodeId::Node1).0, NodeState::Normal);
        // Node 1's last beat was 15 s ago; the timeout is 60 s. Node 2 keeps
        // beating. At 59 s nothing has happened yet.
        let last_n1 = Instant::now() - interval;
        while Instant::now() < last_n1 + Duration::from_secs(59) {
            d.beat(NodeId::Node2).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(d.settled().await.state(NodeId::Node1).0, NodeState::Normal);
        assert_eq!(d.routing.serving(NodeId::Node1), Some(NodeId::Node1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut d = d;
        let order = d.orders.recv().await.expect("a move order");
        assert_eq!(
            (order.mv.users_of, order.mv.from, order.mv.to),
            (NodeId::Node1, Some(NodeId::Node1), Some(NodeId::Node2))
        );
        assert_eq!(d.routing.serving(NodeId::Node1), Some(NodeId::Node2));
        // Not answered: the move is still in flight.
        let s = d.settled().await;
        assert_eq!(s.move_in_progress, Some(NodeId::Node2), "{s:#?}");
        assert_ne!(s.state(NodeId::Node2).0, NodeState::RunningInBackupMode);
        order.done.send(true).expect("driver waits");
        let mut rx = d.handle.subscribe();
        let s = rx
            .wait_for(|s| s.move_in_progress.is_none())
            .await
            .expect("published")
            .clone();
        assert_eq!(
            (s.state(NodeId::Node1).0, s.state(NodeId::Node2)),
            (
                NodeState::Down,
                (NodeState::RunningInBackupMode, Reason::PeerDown)
            )
        );
        assert_eq!(s.table_row, Some(16));
    }

    /// Strong evidence (relay failures) with the confirming connect
    /// refused moves the node at once, ahead of any heartbeat deadline.
    #[tokio::test(start_paused = true)]
    async fn a_confirmed_relay_failure_moves_the_node_before_any_heartbeat_deadline() {
        let mut d = driven(config()).await;
        d.beat(NodeId::Node1).await;
        d.beat(NodeId::Node2).await;
        assert_eq!(d.settled().await.state(NodeId::Node1).0, NodeState::Normal);
        let t0 = Instant::now();
        d.reports
            .send(Report::Confirm {
                node: NodeId::Node1,
                refused: true,
                detail: "connection refused".into(),
            })
            .await
            .expect("driver runs");
        let order = d.orders.recv().await.expect("a move order");
        assert_eq!(order.mv.why, Reason::PeerDown);
        // No clock moved: the heartbeat timeout cannot have acted.
        assert_eq!(Instant::now(), t0);
        order.done.send(true).expect("driver waits");
        let mut rx = d.handle.subscribe();
        let s = rx
            .wait_for(|s| s.move_in_progress.is_none())
            .await
            .expect("published")
            .clone();
        assert_eq!(s.table_row, Some(16));
    }

    /// A failed order (streams not closed in time) is reported to the
    /// machine as a failed move.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_order_counts_as_a_failed_move() {
        let mut d = driven(config()).await;
        d.beat(NodeId::Node1).await;
        d.beat(NodeId::Node2).await;
        d.settled().await;
        d.handle.failover(NodeId::Node1).await.expect("accepted");
        let order = d.orders.recv().await.expect("a move order");
        drop(order);
        let mut rx = d.handle.subscribe();
        let s = rx
            .wait_for(|s| s.move_in_progress.is_none())
            .await
            .expect("published")
            .clone();
        assert!(
            s.nodes
                .iter()
                .any(|n| n.state == NodeState::RunningInFailedMode),
            "{s:#?}"
        );
    }
}
