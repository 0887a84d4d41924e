//! The source's Table 2: node state combinations, their cause and the
//! recommended action, for the status page.
//!
//! The source writes each row with node 1 as the node whose users moved and node 2
//! as the backup; [`row`] is called with the pair in both orders, so the texts
//! speak of "the primary" (node 1 in the table) and "the backup" (node 2).
//! The source numbers nothing; the numbers here count its rows from the top.

use super::state::{NodeState as S, Reason as R};

/// Number of rows in the source's Table 2.
pub const ROWS: u8 = 24;

/// The row of Table 2 for (primary, backup), if there is one.
pub fn row(a: (S, R), b: (S, R)) -> Option<u8> {
    let n = match (a, b) {
        ((S::Normal, R::Normal), (S::Normal, R::Normal)) => 1,
        ((S::FailingOver, R::OnAdminRequest), (S::TakingOver, R::OnAdminRequest)) => 2,
        ((S::Idle, R::OnAdminRequest), (S::RunningInBackupMode, R::OnAdminRequest)) => 3,
        ((S::TakingBack, R::OnAdminRequest), (S::FallingBack, R::OnAdminRequest)) => 4,
        ((S::Idle, R::Initialization), (S::RunningInBackupMode, R::OnAdminRequest)) => 5,
        ((S::Idle, R::Initialization), (S::RunningInBackupMode, R::Initialization)) => 6,
        ((S::Idle, R::OnAdminRequest), (S::RunningInBackupMode, R::Initialization)) => 7,
        ((S::FailingOver, R::OnAdminRequest), (S::TakingOver, R::Initialization)) => 8,
        ((S::TakingBack, R::Initialization), (S::FallingBack, R::OnAdminRequest)) => 9,
        ((S::TakingBack, R::AutomaticFallback), (S::FallingBack, R::AutomaticFallback)) => 10,
        (
            (S::FailedOver, R::Initialization | R::CriticalServiceDown),
            (S::RunningInBackupMode, R::CriticalServiceDown),
        ) => 11,
        (
            (S::FailedOverCriticalServicesNotRunning, R::CriticalServiceDown),
            (S::RunningInBackupMode, R::CriticalServiceDown),
        ) => 12,
        (
            (S::FailedOverCriticalServicesNotRunning, R::DatabaseFailure),
            (S::RunningInBackupMode, R::DatabaseFailure),
        ) => 13,
        (
            (S::RunningInFailedMode, R::StartCriticalServicesFailed),
            (S::RunningInFailedMode, R::StartCriticalServicesFailed),
        ) => 14,
        (
            (S::RunningInFailedMode, R::CriticalServiceDown),
            (S::RunningInFailedMode, R::CriticalServiceDown),
        ) => 15,
        ((S::Down, _), (S::RunningInBackupMode, R::PeerDown)) => 16,
        ((S::Down, _), (S::RunningInBackupMode, R::PeerReboot)) => 17,
        (
            (S::FailedOver | S::FailedOverCriticalServicesNotRunning, R::Initialization)
            | (S::Down, _),
            (S::RunningInBackupMode, R::PeerDownDuringInitialization),
        ) => 18,
        (
            (S::RunningInFailedMode, R::TakeoverUsersFailed),
            (S::RunningInFailedMode, R::TakeoverUsersFailed),
        ) => 19,
        (
            (S::RunningInFailedMode, R::TakebackUsersFailed),
            (S::RunningInFailedMode, R::TakebackUsersFailed),
        ) => 20,
        ((S::RunningInFailedMode, R::Unknown), (S::RunningInFailedMode, R::Unknown)) => 21,
        (
            (S::BackupActivated, R::AutoRecoverDatabaseFailure),
            (S::FailoverAffectedServices, R::AutoRecoverDatabaseFailure),
        ) => 22,
        (
            (S::BackupActivated, R::AutoRecoverDatabaseFailure),
            (S::FailoverAffectedServices, R::AutoRecoverCriticalServiceDown),
        ) => 23,
        ((S::Unknown, _), (S::Unknown, _)) => 24,
        _ => return None,
    };
    Some(n)
}

/// Table 2's cause and recommended action for `row` (1-based).
pub fn action(row: u8) -> &'static str {
    match row {
        1 => "Normal. Nothing to do.",
        2 => {
            "The administrator started a manual failover from the primary to the backup; \
              it is in progress. Wait until the users have moved."
        }
        3 => {
            "The manual failover from the primary to the backup is complete. Fall back \
              when the primary should serve its users again."
        }
        4 => {
            "The administrator started a manual fallback from the backup to the primary; \
              it is in progress. Wait until the users have moved back."
        }
        5 => {
            "The recovery manager was restarted on the primary while it was Idle. Fall \
              back when the primary should serve its users again."
        }
        6 => {
            "Both nodes (or both recovery managers) were restarted while the group was \
              manually failed over. Fall back when the primary should serve its users again."
        }
        7 => {
            "The recovery manager was restarted on the backup while it ran in backup mode, \
              before the primary's heartbeat timed out. Fall back when ready."
        }
        8 => {
            "The recovery manager was restarted on the backup while it was taking over, \
              before the primary's heartbeat timed out. Wait for the takeover to complete."
        }
        9 => {
            "The recovery manager was restarted on the primary while it was taking back, \
              before the backup's heartbeat timed out. Both nodes become Normal when the \
              takeback completes."
        }
        10 => {
            "An automatic fallback from the backup to the primary is in progress. Wait \
               until the users have moved back."
        }
        11 => {
            "The primary is Failed Over with its critical services running again (it was \
               restarted, or the administrator started the services). It is ready: perform \
               a manual fallback to return the group to Normal."
        }
        12 => {
            "A critical service is down on the primary; the users were failed over to the \
               backup automatically. 1. Check which critical services are down on the primary \
               and start them. 2. If they do not start, restart the primary. 3. When all \
               critical services run, perform a manual fallback."
        }
        13 => {
            "The database is down on the primary; the users were failed over to the backup \
               automatically. 1. Restart the primary. 2. When all critical services run, \
               perform a manual fallback."
        }
        14 => {
            "Critical services did not start on the node taking its users back. On that \
               node: 1. Check which critical services are down; click Recovery to start them. \
               2. If they do not start, restart the node. 3. When all critical services run, \
               perform a manual fallback."
        }
        15 => {
            "A critical service went down on the backup; both nodes are in the failed state. \
               1. Check which critical services are down on the backup; click Recovery to \
               start them. 2. If they do not start, restart the node."
        }
        16 => {
            "The backup lost the primary's heartbeat (network loss, or its recovery manager \
               is not running) and took over its users. 1. Check and repair the network \
               between the nodes; once it is back the nodes may enter the failed state: click \
               Recovery. 2. Start the recovery manager and perform a manual fallback. 3. If the \
               primary is down, repair it and power it on. 4. When it is up with all critical \
               services running, perform a manual fallback."
        }
        17 => {
            "The primary went down (power outage, hardware failure, shutdown or restart) and \
               the backup took over its users. 1. Repair the primary and power it on. 2. When \
               it is up with all critical services running, perform a manual fallback."
        }
        18 => {
            "The backup did not see the primary while starting up. When the primary is up \
               with all critical services running, perform a manual fallback."
        }
        19 => {
            "Moving the users during a takeover failed (possibly a database error). Click \
               Recovery; if the problem persists, restart the nodes."
        }
        20 => {
            "Moving the users back during a fallback failed (possibly a database error). \
               Click Recovery; if the problem persists, restart the nodes."
        }
        21 => {
            "A recovery manager restarted while its peer was in the failed state, or an \
               internal error occurred. Click Recovery; if the problem persists, restart the \
               nodes."
        }
        22 => {
            "The database went down on the backup; the failed-over primary could take every \
               user and auto-recovery moved them all to it. Repair the backup, then fall back \
               to it."
        }
        23 => {
            "A critical service went down on the backup; the failed-over primary could take \
               every user and auto-recovery moved them all to it. Repair the backup, then fall \
               back to it."
        }
        24 => {
            "The node states are unknown; high availability is possibly not enabled \
               correctly. Restart the recovery manager on both nodes."
        }
        _ => "No such row.",
    }
}

/// Advice for a combination that Table 2 does not list.
pub fn general_action(a: S, b: S) -> &'static str {
    let either = |s: S| a == s || b == s;
    if either(S::Initializing) {
        "The recovery manager is initializing; wait for both nodes' heartbeats."
    } else if either(S::Down) {
        "A node is unreachable. Repair it (network, power, recovery manager); when it is \
         back with all critical services running, fall back to it if it is failed over."
    } else if a.is_transient() || b.is_transient() {
        "Users are moving; wait until the move completes."
    } else if a.is_failed() && b.is_failed() {
        "Both nodes are in a failed state: click Recovery; if the problem persists, restart \
         the nodes."
    } else if either(S::FailedOverCriticalServicesNotRunning) {
        "Start the critical services on the failed-over node (restart it if they do not \
         start), then perform a manual fallback."
    } else if either(S::FailedOver) || either(S::Idle) {
        "A node is failed over and ready: perform a manual fallback to return the group to \
         Normal."
    } else {
        "No entry in the source's table for this combination. Check both nodes' critical \
         services; click Recovery if both are in a failed state."
    }
}
