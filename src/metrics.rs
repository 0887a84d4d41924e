//! Counters, readable at any time: the status page and the admin API show
//! them, the benches read them. Relaxed atomics: each is a monotonic count or
//! a gauge, never used to synchronise anything.

use std::sync::atomic::AtomicU64;

/// Counters, readable at any time (the admin page shows them).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted.
    pub connections_total: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Connections refused with `<resource-constraint/>` because
    /// `limits.max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Logins routed to a node (`<auth>` forwarded).
    pub logins_routed: AtomicU64,
    /// Logins routed again because their node was marked down while the
    /// proxy was connecting to it.
    pub logins_rerouted: AtomicU64,
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
    /// Connections closed because a peer did not take written bytes within
    /// `limits.write_timeout`.
    pub write_timeouts: AtomicU64,
    /// Node failures confirmed by fast detection (relay failures and a
    /// refused connect), ahead of any heartbeat timeout.
    pub fast_detections: AtomicU64,
    /// Streams closed because their user's home moved.
    pub group_evictions: AtomicU64,
    /// Client `<message>` stanzas the node never acknowledged (XEP-0198),
    /// bounced back to their sender as `<recipient-unavailable/>` when the
    /// stream ended.
    pub stanzas_bounced: AtomicU64,
    /// Unacknowledged client messages not retained for a bounce because the
    /// stream was over `limits.sm_max_unacked_stanzas` or
    /// `limits.sm_max_unacked_bytes`.
    pub sm_unretained: AtomicU64,
}
