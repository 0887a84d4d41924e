//! The group's face towards the rest of the proxy: the published view
//! ([`GroupStatus`]), the administrator's operations and the relay's
//! failure notes, all through one [`GroupHandle`] that works before the
//! monitor runs (requests then fail fast with [`AdminError::NotRunning`]).

use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{Event, Move, NodeId, NodeState, Reason, Rejected};
use crate::config::Config;
use crate::node::PAIR;

/// Moves kept for a slow subscriber before it starts missing some.
const MOVE_QUEUE: usize = 256;

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
    pub nodes: [NodeStatus; PAIR],
    /// The source's Table 2 row of the current combination, if any.
    pub table_row: Option<u8>,
    /// Table 2's cause and recommended action (a general hint outside it).
    pub recommended_action: &'static str,
    /// For each home node (by index), the node serving its users now; `None`:
    /// nobody (logins are refused) or no user has that home.
    pub serving: [Option<NodeId>; PAIR],
    /// The node a move in flight heads to.
    pub move_in_progress: Option<NodeId>,
    /// Whether users may be added to the assignment now.
    pub can_add_users: bool,
    /// High availability (automatic failover) is on.
    pub high_availability: bool,
    /// Whether the monitor runs (false before it starts and after shutdown).
    pub monitoring: bool,
}

impl GroupStatus {
    pub(super) fn initial(config: &Config) -> GroupStatus {
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
    /// No such node in this group (a one-node group has no node 2).
    #[error("the group has no {0}")]
    NoSuchNode(NodeId),
    /// The monitor is not running (not started yet, or shut down).
    #[error("the group monitor is not running")]
    NotRunning,
}

/// A request for the monitor, with its answer.
pub(super) struct AdminRequest {
    pub(super) event: Event,
    pub(super) reply: oneshot::Sender<Result<(), Rejected>>,
}

/// A relay failure note.
#[derive(Debug, Clone, Copy)]
pub(super) struct FailureNote {
    pub(super) node: NodeId,
    pub(super) at: Instant,
    /// Sessions the node had when the failure was seen (the failing one
    /// included, if it was bound).
    pub(super) sessions: usize,
}

/// The monitor's face towards the rest of the proxy, usable before the
/// monitor runs: the published view, the administrator's operations, and
/// where the relay reports node failures.
pub struct GroupHandle {
    /// The published view; receivers come from [`GroupHandle::subscribe`].
    pub(super) status: watch::Sender<GroupStatus>,
    /// Set while the monitor runs, so that a request never waits for a
    /// monitor that does not exist.
    pub(super) admin: Mutex<Option<mpsc::Sender<AdminRequest>>>,
    /// Set while the monitor runs and fast detection is on.
    pub(super) evidence: Mutex<Option<mpsc::Sender<FailureNote>>>,
    /// Every routing change, published once its streams are closed, for
    /// whoever repairs what a move breaks (temporary presence, the demo).
    pub(super) moves: broadcast::Sender<Move>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GroupHandle {
    /// A handle whose view is "both nodes initializing", until the monitor
    /// runs.
    pub fn new(config: &Config) -> GroupHandle {
        GroupHandle {
            status: watch::Sender::new(GroupStatus::initial(config)),
            admin: Mutex::new(None),
            evidence: Mutex::new(None),
            moves: broadcast::Sender::new(MOVE_QUEUE),
        }
    }

    /// A receiver of every [`Move`] from now on (after routing changed
    /// and its streams were closed).
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

    /// Manual failover of `node`: its users go to the peer and it stays
    /// failed over until [`GroupHandle::fallback`].
    pub async fn failover(&self, node: NodeId) -> Result<(), AdminError> {
        self.present(node)?;
        self.request(Event::AdminFailover(node)).await
    }

    /// Manual fallback to `node`: its users come back from the peer.
    pub async fn fallback(&self, node: NodeId) -> Result<(), AdminError> {
        self.present(node)?;
        self.request(Event::AdminFallback(node)).await
    }

    /// Manual recovery when both nodes are in a failed state.
    pub async fn recovery(&self) -> Result<(), AdminError> {
        self.request(Event::AdminRecovery).await
    }

    /// The relay saw a connection to `node` fail while the node had
    /// `sessions` bound sessions: evidence for fast detection.
    pub fn note_failure(&self, node: NodeId, sessions: usize) {
        if let Some(tx) = lock(&self.evidence).as_ref() {
            let _ = tx.try_send(FailureNote {
                node,
                at: Instant::now(),
                sessions,
            });
        }
    }

    fn present(&self, node: NodeId) -> Result<(), AdminError> {
        if self.status.borrow().nodes[node.index()].name.is_some() {
            Ok(())
        } else {
            Err(AdminError::NoSuchNode(node))
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
        assert_eq!(h.failover(NodeId::Node1).await, Err(AdminError::NotRunning));
        assert_eq!(h.fallback(NodeId::Node2).await, Err(AdminError::NotRunning));
        assert_eq!(h.recovery().await, Err(AdminError::NotRunning));
        // Nothing is known yet: adding users is not safe.
        let e = h.can_add_users().unwrap_err();
        assert_eq!(e.node1, NodeState::Initializing);
        assert!(e.to_string().contains("prg-1"), "{e}");
        h.note_failure(NodeId::Node1, 3); // dropped quietly
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
        assert_eq!(
            rt.block_on(h.fallback(NodeId::Node2)),
            Err(AdminError::NoSuchNode(NodeId::Node2))
        );
    }
}
