//! The presence redundancy group: its recovery manager state machine and the
//! probes that feed it.
//!
//! # States and reasons
//!
//! Each node has a [`NodeState`] and a [`Reason`], as the source's Server Recovery
//! Manager reports them. Stable states: `Normal` (serves its own users),
//! `Running in Backup Mode` (also serves its peer's users), `Idle` (failed over by
//! the administrator, serves nobody), `Failed Over` (failed over, critical services
//! up: ready for fallback), `Failed Over with Critical Services Not Running`,
//! `Running in Failed Mode` (an error during a transition or in backup mode),
//! `Unknown`, and the auto-recovery pair `Backup Activated` / `Failover Affected
//! Services`. Transient states: `Initializing`, `Taking Over` / `Failing Over`
//! (users go to the backup), `Taking Back` / `Falling Back` (users go home). The
//! proxy adds `Down` for a node it cannot reach.
//!
//! # How the driver uses the machine
//!
//! [`GroupState`] is pure: it never reads a clock and does no I/O. The controller
//!
//! 1. feeds what its probes see ([`Event::HeartbeatOk`], [`Event::CriticalService`],
//!    [`Event::Database`], ..., [`Event::ConnectionsLost`] when every relayed
//!    connection failed and a probe confirmed it) and what the administrator asks
//!    ([`Event::AdminFailover`], [`Event::AdminFallback`], [`Event::AdminRecovery`])
//!    through [`GroupState::handle`], with the time of the observation;
//! 2. sleeps until [`GroupState::next_deadline`] and then calls [`GroupState::poll`]
//!    (heartbeat timeouts, critical service delay, automatic fallback);
//! 3. logs every [`Transition`] of the returned [`Step`] and acts on every [`Move`]:
//!    the users of `users_of` leave `from` with a re-login hint and are routed to `to`;
//! 4. when a transient move is done, reports [`Event::MoveCompleted`]; the machine
//!    then settles in the stable states (or in failed mode if the move failed);
//! 5. routes each login by [`GroupState::serving`] and shows
//!    [`GroupState::recommended_action`] on the status page.
//!
//! # Rooms
//!
//! - [`monitor`] — that driver: one task per proxy, started by the proxy.
//! - [`handle`] — the group's face: the published view, the administrator's
//!   operations, the relay's failure notes ([`GroupHandle`]).
//! - [`heartbeat`] — the probe tasks: heartbeats (TCP, XMPP stream, monitor
//!   login) and critical services, through the proxy's own node streams.
//! - [`evidence`] — fast crash detection: when relay failures are strong
//!   evidence (pure).
//! - [`probe`] — single probes: TCP connect, HTTP 2xx, each bounded.
//! - [`table`] — the source's Table 2 texts.
//!
//! Closing the streams a move affects is not done here: the monitor hands
//! each move to the failover module ([`monitor::MoveOrder`]) and confirms it
//! when that module answers.

pub mod evidence;
pub mod handle;
mod heartbeat;
pub mod monitor;
pub mod probe;
mod state;
pub mod table;

pub use handle::{AdminError, GroupHandle, GroupStatus, NodeStatus, UsersCannotBeAdded};

pub use state::{
    Assignment, Event, GroupParams, GroupState, Move, NodeId, NodeState, Reason, Rejected, Step,
    Transition,
};

#[cfg(test)]
mod scenarios;
