//! Scenarios: every row of the source's Table 2 reproduced from events, then the
//! timer boundaries and the administrator's preconditions. Time is tokio's paused
//! clock (`start_paused`, moved on with `tokio::time::advance`); a simulated
//! driver heartbeats the live nodes every 15 s.

// The simulated driver records every move itself; tests look at a step only
// when it matters.
#![allow(unused_must_use)]

use std::time::Duration;

use tokio::time::Instant;

use super::table;
use super::{
    Assignment, Event, GroupParams, GroupState, Move, NodeId, NodeState as S, Reason as R,
    Rejected, Step,
};
use NodeId::{Node1 as N1, Node2 as N2};

/// A simulated driver around the machine.
struct Sim {
    g: GroupState,
    /// Which nodes answer heartbeats.
    alive: [bool; 2],
    /// Every move the machine asked for, in order.
    moves: Vec<Move>,
    /// The virtual clock.
    now: Instant,
}

impl Sim {
    /// A group that has just started: both nodes Initializing.
    fn fresh(params: GroupParams) -> Sim {
        let now = Instant::now();
        Sim {
            g: GroupState::new(now, params),
            alive: [true, true],
            moves: Vec::new(),
            now,
        }
    }

    /// A group in Normal / Normal with the given parameters.
    fn with(params: GroupParams) -> Sim {
        let mut s = Sim::fresh(params);
        s.ev(Event::HeartbeatOk(N1));
        s.ev(Event::HeartbeatOk(N2));
        assert_eq!(s.states(), [(S::Normal, R::Normal), (S::Normal, R::Normal)]);
        s
    }

    /// A group in Normal / Normal with the source's defaults.
    fn normal() -> Sim {
        Sim::with(GroupParams::default())
    }

    fn record(&mut self, step: Step) -> Step {
        self.moves.extend(step.moves.iter().copied());
        step
    }

    /// Feeds an event that must be accepted.
    fn ev(&mut self, e: Event) -> Step {
        let step = self.g.handle(self.now, e.clone());
        match step {
            Ok(step) => self.record(step),
            Err(err) => panic!("{e:?} refused: {err}"),
        }
    }

    /// Feeds an event that may be refused; a refusal must change nothing.
    fn try_ev(&mut self, e: Event) -> Result<Step, Rejected> {
        let before = self.states();
        let out = self.g.handle(self.now, e);
        if out.is_err() {
            assert_eq!(self.states(), before, "a refused request changed the state");
        }
        out.map(|s| self.record(s))
    }

    fn cs(&mut self, node: NodeId, up: bool) -> Step {
        self.ev(Event::CriticalService {
            node,
            name: "Cisco XCP Router".into(),
            up,
        })
    }

    /// Lets `secs` pass, polling and heartbeating the live nodes every 15 s.
    async fn run(&mut self, secs: u64) -> Step {
        let mut all = Step::default();
        let mut left = secs;
        while left > 0 {
            let d = left.min(15);
            tokio::time::advance(Duration::from_secs(d)).await;
            self.now = Instant::now();
            left -= d;
            let step = self.g.poll(self.now);
            let step = self.record(step);
            all.transitions.extend(step.transitions);
            all.moves.extend(step.moves);
            for id in NodeId::ALL {
                if self.alive[id.index()] {
                    let step = self.ev(Event::HeartbeatOk(id));
                    all.transitions.extend(step.transitions);
                    all.moves.extend(step.moves);
                }
            }
        }
        all
    }

    fn states(&self) -> [(S, R); 2] {
        [self.g.state(N1), self.g.state(N2)]
    }

    fn serving(&self) -> [Option<NodeId>; 2] {
        [self.g.serving(N1), self.g.serving(N2)]
    }

    /// The combination is Table 2's `row`, with its advice, and the routing is
    /// `serving`.
    #[track_caller]
    fn expect(&self, row: u8, n1: (S, R), n2: (S, R), serving: [Option<NodeId>; 2]) {
        assert_eq!(self.states(), [n1, n2], "node states");
        assert_eq!(self.g.table_row(), Some(row), "table row");
        let action = self.g.recommended_action();
        assert!(!action.is_empty());
        assert_eq!(action, table::action(row));
        assert_eq!(self.serving(), serving, "serving");
    }

    /// Manual failover of node 1, completed (row 3).
    fn admin_failed_over(&mut self) {
        self.ev(Event::AdminFailover(N1));
        self.ev(Event::MoveCompleted { node: N2, ok: true });
    }

    /// Automatic failover of node 1 for a critical service, completed (row 12).
    async fn critical_failed_over(&mut self) {
        self.cs(N1, false);
        self.run(90).await;
        self.ev(Event::MoveCompleted { node: N2, ok: true });
    }
}

fn mv(users_of: NodeId, from: Option<NodeId>, to: Option<NodeId>, why: R) -> Move {
    Move {
        users_of,
        from,
        to,
        why,
    }
}

// ---------------------------------------------------------------- Table 2 rows

#[tokio::test(start_paused = true)]
async fn row_01_normal() {
    let s = Sim::normal();
    s.expect(
        1,
        (S::Normal, R::Normal),
        (S::Normal, R::Normal),
        [Some(N1), Some(N2)],
    );
    assert!(s.moves.is_empty());
}

#[tokio::test(start_paused = true)]
async fn row_02_manual_failover_in_progress() {
    let mut s = Sim::normal();
    let step = s.ev(Event::AdminFailover(N1));
    s.expect(
        2,
        (S::FailingOver, R::OnAdminRequest),
        (S::TakingOver, R::OnAdminRequest),
        [Some(N2), Some(N2)],
    );
    assert_eq!(step.moves, [mv(N1, Some(N1), Some(N2), R::OnAdminRequest)]);
    assert_eq!(s.g.move_in_progress(), Some(N2));
}

#[tokio::test(start_paused = true)]
async fn row_03_manual_failover_complete_idle_backup() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    s.expect(
        3,
        (S::Idle, R::OnAdminRequest),
        (S::RunningInBackupMode, R::OnAdminRequest),
        [Some(N2), Some(N2)],
    );
    assert_eq!(s.g.move_in_progress(), None);
}

#[tokio::test(start_paused = true)]
async fn row_04_manual_fallback_in_progress() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    let step = s.ev(Event::AdminFallback(N1));
    s.expect(
        4,
        (S::TakingBack, R::OnAdminRequest),
        (S::FallingBack, R::OnAdminRequest),
        [Some(N1), Some(N2)],
    );
    assert_eq!(step.moves, [mv(N1, Some(N2), Some(N1), R::OnAdminRequest)]);
    s.ev(Event::MoveCompleted { node: N1, ok: true });
    s.expect(
        1,
        (S::Normal, R::Normal),
        (S::Normal, R::Normal),
        [Some(N1), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_05_srm_restarted_on_idle_node() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    s.ev(Event::SrmRestarted(N1));
    s.expect(
        5,
        (S::Idle, R::Initialization),
        (S::RunningInBackupMode, R::OnAdminRequest),
        [Some(N2), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_06_both_restarted_in_manual_failover() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    s.ev(Event::SrmRestarted(N1));
    s.ev(Event::SrmRestarted(N2));
    s.expect(
        6,
        (S::Idle, R::Initialization),
        (S::RunningInBackupMode, R::Initialization),
        [Some(N2), Some(N2)],
    );
    // Still a manual failover: nothing falls back by itself.
    s.run(3600).await;
    assert_eq!(s.g.state(N1).0, S::Idle);
}

#[tokio::test(start_paused = true)]
async fn row_07_srm_restarted_on_backup() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    s.run(30).await;
    s.ev(Event::SrmRestarted(N2));
    s.expect(
        7,
        (S::Idle, R::OnAdminRequest),
        (S::RunningInBackupMode, R::Initialization),
        [Some(N2), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_08_srm_restarted_on_node_taking_over() {
    let mut s = Sim::normal();
    s.ev(Event::AdminFailover(N1));
    s.ev(Event::SrmRestarted(N2));
    s.expect(
        8,
        (S::FailingOver, R::OnAdminRequest),
        (S::TakingOver, R::Initialization),
        [Some(N2), Some(N2)],
    );
    // The takeover still completes (into row 7).
    s.ev(Event::MoveCompleted { node: N2, ok: true });
    s.expect(
        7,
        (S::Idle, R::OnAdminRequest),
        (S::RunningInBackupMode, R::Initialization),
        [Some(N2), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_09_srm_restarted_on_node_taking_back() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    s.ev(Event::AdminFallback(N1));
    s.ev(Event::SrmRestarted(N1));
    s.expect(
        9,
        (S::TakingBack, R::Initialization),
        (S::FallingBack, R::OnAdminRequest),
        [Some(N1), Some(N2)],
    );
    // "After the takeback completes, both nodes are Normal."
    s.ev(Event::MoveCompleted { node: N1, ok: true });
    assert_eq!(s.states(), [(S::Normal, R::Normal), (S::Normal, R::Normal)]);
}

#[tokio::test(start_paused = true)]
async fn row_10_automatic_fallback_in_progress() {
    let mut s = Sim::with(GroupParams {
        auto_fallback: true,
        ..GroupParams::default()
    });
    s.critical_failed_over().await;
    s.cs(N1, true);
    assert_eq!(s.g.state(N1), (S::FailedOver, R::CriticalServiceDown));
    let step = s.run(30 * 60).await;
    s.expect(
        10,
        (S::TakingBack, R::AutomaticFallback),
        (S::FallingBack, R::AutomaticFallback),
        [Some(N1), Some(N2)],
    );
    assert_eq!(
        step.moves,
        [mv(N1, Some(N2), Some(N1), R::AutomaticFallback)]
    );
    s.ev(Event::MoveCompleted { node: N1, ok: true });
    assert_eq!(s.states(), [(S::Normal, R::Normal), (S::Normal, R::Normal)]);
}

#[tokio::test(start_paused = true)]
async fn row_11_failed_over_services_running_again() {
    // (a) Node 1 is restarted and comes back with its critical services running.
    let mut s = Sim::normal();
    s.critical_failed_over().await;
    s.ev(Event::NodeShutdown(N1));
    s.alive[0] = false;
    assert_eq!(s.g.state(N1), (S::Down, R::None));
    assert_eq!(
        s.g.state(N2),
        (S::RunningInBackupMode, R::CriticalServiceDown)
    );
    s.run(300).await;
    s.cs(N1, true);
    s.alive[0] = true;
    s.ev(Event::HeartbeatOk(N1));
    s.expect(
        11,
        (S::FailedOver, R::Initialization),
        (S::RunningInBackupMode, R::CriticalServiceDown),
        [Some(N2), Some(N2)],
    );

    // (b) The administrator starts the critical services on node 1.
    let mut s = Sim::normal();
    s.critical_failed_over().await;
    s.run(120).await;
    s.cs(N1, true);
    s.expect(
        11,
        (S::FailedOver, R::CriticalServiceDown),
        (S::RunningInBackupMode, R::CriticalServiceDown),
        [Some(N2), Some(N2)],
    );
    // Ready: a manual fallback returns the group to Normal.
    s.ev(Event::AdminFallback(N1));
    s.ev(Event::MoveCompleted { node: N1, ok: true });
    assert_eq!(s.states(), [(S::Normal, R::Normal), (S::Normal, R::Normal)]);
}

#[tokio::test(start_paused = true)]
async fn row_12_critical_service_down_automatic_failover() {
    let mut s = Sim::normal();
    s.cs(N1, false);
    let step = s.run(90).await;
    assert_eq!(
        s.states(),
        [
            (S::FailingOver, R::CriticalServiceDown),
            (S::TakingOver, R::CriticalServiceDown)
        ]
    );
    assert_eq!(
        step.moves,
        [mv(N1, Some(N1), Some(N2), R::CriticalServiceDown)]
    );
    s.ev(Event::MoveCompleted { node: N2, ok: true });
    s.expect(
        12,
        (
            S::FailedOverCriticalServicesNotRunning,
            R::CriticalServiceDown,
        ),
        (S::RunningInBackupMode, R::CriticalServiceDown),
        [Some(N2), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_13_database_failure_automatic_failover() {
    let mut s = Sim::normal();
    s.ev(Event::Database {
        node: N1,
        ok: false,
    });
    s.run(90).await;
    s.ev(Event::MoveCompleted { node: N2, ok: true });
    s.expect(
        13,
        (S::FailedOverCriticalServicesNotRunning, R::DatabaseFailure),
        (S::RunningInBackupMode, R::DatabaseFailure),
        [Some(N2), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_14_start_critical_services_failed_during_takeback() {
    let mut s = Sim::normal();
    s.critical_failed_over().await;
    s.cs(N1, true);
    s.ev(Event::AdminFallback(N1));
    // Restarting, a critical service does not come up within the delay.
    s.cs(N1, false);
    s.run(89).await;
    assert_eq!(s.g.state(N1).0, S::TakingBack);
    s.run(1).await;
    s.expect(
        14,
        (S::RunningInFailedMode, R::StartCriticalServicesFailed),
        (S::RunningInFailedMode, R::StartCriticalServicesFailed),
        [Some(N1), Some(N2)],
    );
    // Recovery restarts the services; once they run the group is Normal.
    s.cs(N1, true);
    s.ev(Event::AdminRecovery);
    s.expect(
        1,
        (S::Normal, R::Normal),
        (S::Normal, R::Normal),
        [Some(N1), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_15_critical_service_down_on_backup() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    s.cs(N2, false);
    s.run(90).await;
    s.expect(
        15,
        (S::RunningInFailedMode, R::CriticalServiceDown),
        (S::RunningInFailedMode, R::CriticalServiceDown),
        [Some(N2), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_16_peer_down_running_in_backup_mode() {
    let mut s = Sim::normal();
    s.alive[0] = false;
    let step = s.run(60).await;
    assert_eq!(s.g.state(N1), (S::Down, R::None));
    assert_eq!(s.g.state(N2), (S::TakingOver, R::PeerDown));
    assert_eq!(step.moves, [mv(N1, Some(N1), Some(N2), R::PeerDown)]);
    s.ev(Event::MoveCompleted { node: N2, ok: true });
    s.expect(
        16,
        (S::Down, R::None),
        (S::RunningInBackupMode, R::PeerDown),
        [Some(N2), Some(N2)],
    );
    // Node 1 comes back: failed over, ready for a manual fallback.
    s.alive[0] = true;
    s.ev(Event::HeartbeatOk(N1));
    assert_eq!(s.g.state(N1), (S::FailedOver, R::Initialization));
    assert_eq!(s.serving(), [Some(N2), Some(N2)]);
}

#[tokio::test(start_paused = true)]
async fn row_17_peer_reboot_running_in_backup_mode() {
    let mut s = Sim::normal();
    s.alive[0] = false;
    let step = s.ev(Event::NodeShutdown(N1));
    assert_eq!(step.moves, [mv(N1, Some(N1), Some(N2), R::PeerReboot)]);
    s.ev(Event::MoveCompleted { node: N2, ok: true });
    s.expect(
        17,
        (S::Down, R::None),
        (S::RunningInBackupMode, R::PeerReboot),
        [Some(N2), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_18_peer_down_during_initialization() {
    for services_up in [true, false] {
        let mut s = Sim::fresh(GroupParams::default());
        s.alive[0] = false;
        s.ev(Event::HeartbeatOk(N2));
        s.run(120).await;
        assert_eq!(
            s.g.state(N2),
            (S::TakingOver, R::PeerDownDuringInitialization)
        );
        s.ev(Event::MoveCompleted { node: N2, ok: true });
        s.expect(
            18,
            (S::Down, R::None),
            (S::RunningInBackupMode, R::PeerDownDuringInitialization),
            [Some(N2), Some(N2)],
        );
        // Node 1 starts later.
        if !services_up {
            s.cs(N1, false);
        }
        s.alive[0] = true;
        s.ev(Event::HeartbeatOk(N1));
        let n1 = if services_up {
            S::FailedOver
        } else {
            S::FailedOverCriticalServicesNotRunning
        };
        s.expect(
            18,
            (n1, R::Initialization),
            (S::RunningInBackupMode, R::PeerDownDuringInitialization),
            [Some(N2), Some(N2)],
        );
    }
}

#[tokio::test(start_paused = true)]
async fn row_19_takeover_users_failed() {
    let mut s = Sim::normal();
    s.ev(Event::AdminFailover(N1));
    s.ev(Event::MoveCompleted {
        node: N2,
        ok: false,
    });
    s.expect(
        19,
        (S::RunningInFailedMode, R::TakeoverUsersFailed),
        (S::RunningInFailedMode, R::TakeoverUsersFailed),
        [Some(N2), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_20_takeback_users_failed() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    s.ev(Event::AdminFallback(N1));
    s.ev(Event::MoveCompleted {
        node: N1,
        ok: false,
    });
    s.expect(
        20,
        (S::RunningInFailedMode, R::TakebackUsersFailed),
        (S::RunningInFailedMode, R::TakebackUsersFailed),
        [Some(N1), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_21_srm_restarted_while_peer_failed() {
    let mut s = Sim::normal();
    s.ev(Event::AdminFailover(N1));
    s.ev(Event::MoveCompleted {
        node: N2,
        ok: false,
    });
    s.ev(Event::SrmRestarted(N1));
    s.expect(
        21,
        (S::RunningInFailedMode, R::Unknown),
        (S::RunningInFailedMode, R::Unknown),
        [Some(N2), Some(N2)],
    );
    let step = s.ev(Event::AdminRecovery);
    assert_eq!(step.moves, [mv(N1, Some(N2), Some(N1), R::OnAdminRequest)]);
    s.expect(
        1,
        (S::Normal, R::Normal),
        (S::Normal, R::Normal),
        [Some(N1), Some(N2)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_22_auto_recover_database_failure_on_backup() {
    let mut s = Sim::normal();
    s.critical_failed_over().await;
    s.cs(N1, true);
    s.ev(Event::Database {
        node: N2,
        ok: false,
    });
    let step = s.run(90).await;
    s.expect(
        22,
        (S::BackupActivated, R::AutoRecoverDatabaseFailure),
        (S::FailoverAffectedServices, R::AutoRecoverDatabaseFailure),
        [Some(N1), Some(N1)],
    );
    assert_eq!(
        step.moves,
        [
            mv(N1, Some(N2), Some(N1), R::AutoRecoverDatabaseFailure),
            mv(N2, Some(N2), Some(N1), R::AutoRecoverDatabaseFailure)
        ]
    );
    // Node 2 repaired: fall back to it.
    assert_eq!(
        s.try_ev(Event::AdminFallback(N2)),
        Err(Rejected::CriticalServicesNotRunning { node: N2 })
    );
    s.ev(Event::Database { node: N2, ok: true });
    s.ev(Event::AdminFallback(N2));
    assert_eq!(s.serving(), [Some(N1), Some(N2)]);
    s.ev(Event::MoveCompleted { node: N2, ok: true });
    assert_eq!(s.states(), [(S::Normal, R::Normal), (S::Normal, R::Normal)]);
}

#[tokio::test(start_paused = true)]
async fn row_23_auto_recover_critical_service_down_on_backup() {
    let mut s = Sim::normal();
    s.critical_failed_over().await;
    s.cs(N1, true);
    s.cs(N2, false);
    s.run(90).await;
    s.expect(
        23,
        (S::BackupActivated, R::AutoRecoverDatabaseFailure),
        (
            S::FailoverAffectedServices,
            R::AutoRecoverCriticalServiceDown,
        ),
        [Some(N1), Some(N1)],
    );
}

#[tokio::test(start_paused = true)]
async fn row_24_unknown() {
    let mut s = Sim::normal();
    s.ev(Event::StatusUnknown(N1));
    s.ev(Event::StatusUnknown(N2));
    s.expect(
        24,
        (S::Unknown, R::None),
        (S::Unknown, R::None),
        [Some(N1), Some(N2)],
    );
    // Restarting the recovery manager on both nodes.
    s.ev(Event::SrmRestarted(N1));
    s.ev(Event::SrmRestarted(N2));
    assert_eq!(s.states(), [(S::Normal, R::Normal), (S::Normal, R::Normal)]);
}

#[test]
fn every_row_has_advice() {
    for row in 1..=table::ROWS {
        assert!(!table::action(row).is_empty());
        assert_ne!(table::action(row), table::action(0));
    }
}

// ------------------------------------------------------------------ timers

#[tokio::test(start_paused = true)]
async fn heartbeat_timeout_boundary() {
    let mut s = Sim::normal();
    s.alive[0] = false;
    s.run(59).await;
    assert_eq!(s.g.state(N1), (S::Normal, R::Normal));
    assert_eq!(s.g.next_deadline(), Some(s.now + Duration::from_secs(1)));
    s.run(1).await;
    assert_eq!(s.g.state(N1), (S::Down, R::None));
    assert_eq!(s.g.state(N2), (S::TakingOver, R::PeerDown));
}

#[tokio::test(start_paused = true)]
async fn heartbeat_timeout_while_initializing_is_120_s() {
    let mut s = Sim::fresh(GroupParams::default());
    s.alive[0] = false;
    s.ev(Event::HeartbeatOk(N2));
    s.run(119).await;
    assert_eq!(s.g.state(N1), (S::Initializing, R::Initialization));
    assert_eq!(s.g.state(N2), (S::Initializing, R::Initialization));
    s.run(1).await;
    assert_eq!(s.g.state(N1), (S::Down, R::None));
}

#[tokio::test(start_paused = true)]
async fn single_missed_heartbeat_changes_nothing() {
    let mut s = Sim::normal();
    let step = s.ev(Event::HeartbeatFailed(N1));
    assert!(step.is_empty());
    s.run(300).await;
    assert_eq!(s.g.table_row(), Some(1));
}

#[tokio::test(start_paused = true)]
async fn critical_service_delay_boundary() {
    let mut s = Sim::normal();
    s.cs(N1, false);
    s.run(89).await;
    assert_eq!(s.g.state(N1), (S::Normal, R::Normal));
    s.run(1).await;
    assert_eq!(s.g.state(N1), (S::FailingOver, R::CriticalServiceDown));
}

#[tokio::test(start_paused = true)]
async fn critical_service_flap_restarts_the_delay() {
    let mut s = Sim::normal();
    s.cs(N1, false);
    s.run(60).await;
    s.cs(N1, true);
    s.run(10).await;
    s.cs(N1, false);
    s.run(89).await;
    assert_eq!(s.g.state(N1).0, S::Normal);
    s.run(1).await;
    assert_eq!(s.g.state(N1).0, S::FailingOver);
}

#[tokio::test(start_paused = true)]
async fn auth_service_counts_only_when_monitored() {
    let mut s = Sim::normal();
    s.ev(Event::AuthService {
        node: N1,
        ok: false,
    });
    s.run(600).await;
    assert_eq!(s.g.state(N1).0, S::Normal);

    let mut s = Sim::with(GroupParams {
        auth_service_monitoring: true,
        ..GroupParams::default()
    });
    s.ev(Event::AuthService {
        node: N1,
        ok: false,
    });
    s.run(90).await;
    assert_eq!(s.g.state(N1), (S::FailingOver, R::CriticalServiceDown));
}

#[tokio::test(start_paused = true)]
async fn connections_lost_fails_over_at_once() {
    let mut s = Sim::normal();
    s.alive[0] = false;
    let step = s.ev(Event::ConnectionsLost(N1));
    assert_eq!(step.moves, [mv(N1, Some(N1), Some(N2), R::PeerDown)]);
    assert_eq!(s.g.state(N2), (S::TakingOver, R::PeerDown));
}

#[tokio::test(start_paused = true)]
async fn next_deadline_tracks_the_earliest_timer() {
    let mut s = Sim::normal();
    let t0 = s.now;
    assert_eq!(s.g.next_deadline(), Some(t0 + Duration::from_secs(60)));
    s.run(15).await;
    s.cs(N1, false);
    assert_eq!(s.g.next_deadline(), Some(t0 + Duration::from_secs(75)));
}

// ------------------------------------------------------- automatic fallback

#[tokio::test(start_paused = true)]
async fn auto_fallback_after_30_minutes_only_when_enabled() {
    let mut s = Sim::normal();
    s.critical_failed_over().await;
    s.cs(N1, true);
    s.run(3 * 3600).await;
    assert_eq!(s.g.state(N1), (S::FailedOver, R::CriticalServiceDown));

    let mut s = Sim::with(GroupParams {
        auto_fallback: true,
        ..GroupParams::default()
    });
    s.critical_failed_over().await;
    s.cs(N1, true);
    s.run(30 * 60 - 1).await;
    assert_eq!(s.g.state(N1).0, S::FailedOver);
    s.run(1).await;
    assert_eq!(s.g.state(N1), (S::TakingBack, R::AutomaticFallback));
}

#[tokio::test(start_paused = true)]
async fn auto_fallback_waits_for_uninterrupted_health() {
    let mut s = Sim::with(GroupParams {
        auto_fallback: true,
        ..GroupParams::default()
    });
    s.critical_failed_over().await;
    s.cs(N1, true);
    s.run(20 * 60).await;
    s.cs(N1, false);
    s.run(30).await;
    s.cs(N1, true);
    s.run(30 * 60 - 1).await;
    assert_eq!(s.g.state(N1).0, S::FailedOver);
    s.run(1).await;
    assert_eq!(s.g.state(N1).0, S::TakingBack);
}

#[tokio::test(start_paused = true)]
async fn no_auto_fallback_from_idle() {
    let mut s = Sim::with(GroupParams {
        auto_fallback: true,
        ..GroupParams::default()
    });
    s.admin_failed_over();
    s.run(2 * 3600).await;
    assert_eq!(s.g.state(N1), (S::Idle, R::OnAdminRequest));
}

// ---------------------------------------------------- administrator requests

#[tokio::test(start_paused = true)]
async fn manual_failover_then_fallback_both_normal() {
    let mut s = Sim::normal();
    assert!(s.g.can_add_users());
    s.admin_failed_over();
    assert!(!s.g.can_add_users());
    s.run(600).await;
    s.ev(Event::AdminFallback(N1));
    assert!(!s.g.can_add_users());
    s.ev(Event::MoveCompleted { node: N1, ok: true });
    assert!(s.g.can_add_users());
    assert_eq!(s.states(), [(S::Normal, R::Normal), (S::Normal, R::Normal)]);
    assert_eq!(
        s.moves,
        [
            mv(N1, Some(N1), Some(N2), R::OnAdminRequest),
            mv(N1, Some(N2), Some(N1), R::OnAdminRequest)
        ]
    );
    // Node 2 can be failed over too: the machine is symmetric.
    s.ev(Event::AdminFailover(N2));
    s.ev(Event::MoveCompleted { node: N1, ok: true });
    s.expect(
        3,
        (S::RunningInBackupMode, R::OnAdminRequest),
        (S::Idle, R::OnAdminRequest),
        [Some(N1), Some(N1)],
    );
}

#[tokio::test(start_paused = true)]
async fn fallback_refused_when_not_failed_over() {
    let mut s = Sim::normal();
    let err = s.try_ev(Event::AdminFallback(N1)).unwrap_err();
    assert_eq!(
        err,
        Rejected::NotFailedOver {
            node: N1,
            state: S::Normal
        }
    );
    assert!(err.to_string().contains("Idle or Failed Over"));

    // The backup itself is not failed over either.
    s.admin_failed_over();
    assert!(matches!(
        s.try_ev(Event::AdminFallback(N2)),
        Err(Rejected::NotFailedOver { node: N2, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn fallback_refused_while_critical_services_down() {
    let mut s = Sim::normal();
    s.critical_failed_over().await;
    assert_eq!(
        s.try_ev(Event::AdminFallback(N1)),
        Err(Rejected::CriticalServicesNotRunning { node: N1 })
    );
}

#[tokio::test(start_paused = true)]
async fn fallback_refused_to_a_down_node() {
    let mut s = Sim::normal();
    s.alive[0] = false;
    s.run(60).await;
    s.ev(Event::MoveCompleted { node: N2, ok: true });
    assert_eq!(
        s.try_ev(Event::AdminFallback(N1)),
        Err(Rejected::Unreachable { node: N1 })
    );
}

#[tokio::test(start_paused = true)]
async fn recovery_refused_unless_both_failed() {
    let mut s = Sim::normal();
    assert_eq!(
        s.try_ev(Event::AdminRecovery),
        Err(Rejected::NotBothFailed {
            node1: S::Normal,
            node2: S::Normal
        })
    );
    s.admin_failed_over();
    assert!(matches!(
        s.try_ev(Event::AdminRecovery),
        Err(Rejected::NotBothFailed { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn failover_refused_without_high_availability() {
    let mut s = Sim::with(GroupParams {
        high_availability: false,
        ..GroupParams::default()
    });
    assert_eq!(
        s.try_ev(Event::AdminFailover(N1)),
        Err(Rejected::HighAvailabilityDisabled)
    );
}

#[tokio::test(start_paused = true)]
async fn failover_refused_when_peer_unhealthy_or_busy() {
    let mut s = Sim::normal();
    s.cs(N2, false);
    assert_eq!(
        s.try_ev(Event::AdminFailover(N1)),
        Err(Rejected::PeerCannotTakeOver {
            node: N1,
            peer: N2,
            state: S::Normal
        })
    );
    s.cs(N2, true);
    s.ev(Event::AdminFailover(N1));
    assert_eq!(
        s.try_ev(Event::AdminFailover(N2)),
        Err(Rejected::MoveInProgress { towards: N2 })
    );
    assert_eq!(
        s.try_ev(Event::AdminFallback(N1)),
        Err(Rejected::MoveInProgress { towards: N2 })
    );
}

#[tokio::test(start_paused = true)]
async fn stale_move_confirmation_refused() {
    let mut s = Sim::normal();
    assert_eq!(
        s.try_ev(Event::MoveCompleted { node: N2, ok: true }),
        Err(Rejected::NoMoveInProgress { node: N2 })
    );
    s.ev(Event::AdminFailover(N1));
    assert_eq!(
        s.try_ev(Event::MoveCompleted { node: N1, ok: true }),
        Err(Rejected::NoMoveInProgress { node: N1 })
    );
}

// ----------------------------------------------------- high availability off

#[tokio::test(start_paused = true)]
async fn high_availability_off_reports_but_moves_nobody() {
    let mut s = Sim::with(GroupParams {
        high_availability: false,
        ..GroupParams::default()
    });
    s.cs(N2, false);
    s.alive[0] = false;
    s.run(600).await;
    assert_eq!(s.g.state(N1), (S::Down, R::None));
    assert_eq!(s.g.state(N2), (S::Normal, R::Normal));
    assert_eq!(s.serving(), [None, Some(N2)]);
    assert_eq!(s.moves, [mv(N1, Some(N1), None, R::PeerDown)]);
    assert!(s.g.can_add_users());

    // Node 1 returns: it simply serves its users again.
    s.alive[0] = true;
    s.ev(Event::HeartbeatOk(N1));
    assert_eq!(s.states(), [(S::Normal, R::Normal), (S::Normal, R::Normal)]);
    assert_eq!(s.serving(), [Some(N1), Some(N2)]);
}

#[tokio::test(start_paused = true)]
async fn enabling_high_availability_fails_over_a_dead_node() {
    let mut s = Sim::with(GroupParams {
        high_availability: false,
        ..GroupParams::default()
    });
    s.alive[0] = false;
    s.run(120).await;
    let step = s.ev(Event::SetHighAvailability(true));
    assert_eq!(step.moves, [mv(N1, None, Some(N2), R::PeerDown)]);
    assert_eq!(s.g.state(N2), (S::TakingOver, R::PeerDown));
}

#[tokio::test(start_paused = true)]
async fn both_nodes_failing_enter_failed_state() {
    let mut s = Sim::normal();
    s.cs(N1, false);
    s.cs(N2, false);
    s.run(90).await;
    assert_eq!(
        s.states(),
        [
            (S::RunningInFailedMode, R::CriticalServiceDown),
            (S::RunningInFailedMode, R::CriticalServiceDown)
        ]
    );
    assert_eq!(s.serving(), [Some(N1), Some(N2)]);
}

// ------------------------------------------------------ backup loss, modes

#[tokio::test(start_paused = true)]
async fn backup_down_failed_over_node_takes_everyone() {
    let mut s = Sim::normal();
    s.critical_failed_over().await;
    s.cs(N1, true);
    s.alive[1] = false;
    s.run(60).await;
    assert_eq!(s.g.state(N2), (S::Down, R::None));
    assert_eq!(s.g.state(N1), (S::TakingOver, R::PeerDown));
    assert_eq!(s.serving(), [Some(N1), Some(N1)]);
    s.ev(Event::MoveCompleted { node: N1, ok: true });
    s.expect(
        16,
        (S::RunningInBackupMode, R::PeerDown),
        (S::Down, R::None),
        [Some(N1), Some(N1)],
    );
}

#[tokio::test(start_paused = true)]
async fn backup_down_nobody_left() {
    let mut s = Sim::normal();
    s.admin_failed_over();
    s.alive[1] = false;
    s.run(60).await;
    assert_eq!(s.g.state(N2), (S::Down, R::None));
    assert_eq!(s.g.state(N1), (S::Idle, R::OnAdminRequest));
    assert_eq!(s.serving(), [None, None]);
    // The backup returns and carries on as backup.
    s.alive[1] = true;
    s.ev(Event::HeartbeatOk(N2));
    assert_eq!(s.g.state(N2), (S::RunningInBackupMode, R::Initialization));
    assert_eq!(s.serving(), [Some(N2), Some(N2)]);
}

#[tokio::test(start_paused = true)]
async fn active_standby_standby_failure_moves_nobody() {
    let mut s = Sim::with(GroupParams {
        assignment: Assignment::ActiveStandby,
        ..GroupParams::default()
    });
    assert_eq!(s.serving(), [Some(N1), None]);
    s.cs(N2, false);
    s.run(90).await;
    assert!(s.moves.is_empty());
    assert_eq!(s.g.move_in_progress(), None);
    assert_eq!(
        s.states(),
        [
            (S::RunningInBackupMode, R::CriticalServiceDown),
            (
                S::FailedOverCriticalServicesNotRunning,
                R::CriticalServiceDown
            )
        ]
    );
    assert_eq!(s.serving(), [Some(N1), None]);

    // The active node failing moves all users to the standby.
    let mut s = Sim::with(GroupParams {
        assignment: Assignment::ActiveStandby,
        ..GroupParams::default()
    });
    s.ev(Event::AdminFailover(N1));
    assert_eq!(s.moves, [mv(N1, Some(N1), Some(N2), R::OnAdminRequest)]);
    assert_eq!(s.serving(), [Some(N2), None]);
}

#[tokio::test(start_paused = true)]
async fn assignment_none_serves_nobody() {
    let mut s = Sim::with(GroupParams {
        assignment: Assignment::None,
        ..GroupParams::default()
    });
    assert_eq!(s.serving(), [None, None]);
    // Nobody to move: the failover completes at once.
    s.ev(Event::AdminFailover(N1));
    assert!(s.moves.is_empty());
    assert_eq!(s.g.move_in_progress(), None);
    s.expect(
        3,
        (S::Idle, R::OnAdminRequest),
        (S::RunningInBackupMode, R::OnAdminRequest),
        [None, None],
    );
}

#[tokio::test(start_paused = true)]
async fn srm_restart_reported_for_a_down_node_brings_it_back() {
    let mut s = Sim::normal();
    s.alive[0] = false;
    s.run(60).await;
    s.ev(Event::MoveCompleted { node: N2, ok: true });
    s.alive[0] = true;
    s.ev(Event::SrmRestarted(N1));
    assert_eq!(s.g.state(N1), (S::FailedOver, R::Initialization));
    s.ev(Event::AdminFallback(N1));
    s.ev(Event::MoveCompleted { node: N1, ok: true });
    assert_eq!(s.g.table_row(), Some(1));
    assert_eq!(s.serving(), [Some(N1), Some(N2)]);
}

#[tokio::test(start_paused = true)]
async fn backup_failing_during_takeover_fails_the_group() {
    let mut s = Sim::normal();
    s.ev(Event::AdminFailover(N1));
    s.ev(Event::Database {
        node: N2,
        ok: false,
    });
    s.run(90).await;
    assert_eq!(
        s.states(),
        [
            (S::RunningInFailedMode, R::DatabaseFailure),
            (S::RunningInFailedMode, R::DatabaseFailure)
        ]
    );
    assert_eq!(s.g.move_in_progress(), None);
    s.ev(Event::Database { node: N2, ok: true });
    s.ev(Event::AdminRecovery);
    assert_eq!(s.g.table_row(), Some(1));
}

#[tokio::test(start_paused = true)]
async fn advice_outside_the_table_is_never_empty() {
    let mut s = Sim::fresh(GroupParams::default());
    assert_eq!(s.g.table_row(), None);
    assert!(s.g.recommended_action().contains("initializing"));
    s.ev(Event::HeartbeatOk(N1));
    s.ev(Event::HeartbeatOk(N2));
    s.alive[1] = false;
    s.run(60).await;
    assert_eq!(s.g.state(N1), (S::TakingOver, R::PeerDown));
    assert!(!s.g.recommended_action().is_empty());
}

#[test]
fn display_names_follow_the_source() {
    assert_eq!(S::RunningInBackupMode.to_string(), "Running in Backup Mode");
    assert_eq!(
        S::FailedOverCriticalServicesNotRunning.to_string(),
        "Failed Over with Critical Services Not Running"
    );
    assert_eq!(
        S::FailoverAffectedServices.to_string(),
        "Failover Affected Services"
    );
    assert_eq!(
        R::PeerDownDuringInitialization.to_string(),
        "Peer Down During Initialization"
    );
    assert_eq!(
        R::AutoRecoverCriticalServiceDown.to_string(),
        "Auto Recover Critical Service Down"
    );
    assert_eq!(N1.to_string(), "node 1");
    assert_eq!(N1.peer(), N2);
    assert_eq!(N2.index(), 1);
}

#[test]
fn defaults_are_the_sources() {
    let p = GroupParams::default();
    assert_eq!(p.heartbeat_interval, Duration::from_secs(15));
    assert_eq!(p.heartbeat_timeout, Duration::from_secs(60));
    assert_eq!(p.initial_heartbeat_timeout, Duration::from_secs(120));
    assert_eq!(p.critical_service_delay, Duration::from_secs(90));
    assert!(!p.auto_fallback);
    assert_eq!(p.auto_fallback_after, Duration::from_secs(1800));
    assert!(!p.auth_service_monitoring);
    assert_eq!(p.assignment, Assignment::Balanced);
}
