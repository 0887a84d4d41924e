//! Who is where: every user's JSM sessions (bound resources), the node each
//! is bound on, the connection that carries it and its last presence.
//!
//! Updates come from the relay's cheap peeks (bind results from the node,
//! presence from the client); the group controller reads `sessions_on(node)`
//! to know whom a failover moves. A per-node index keeps that proportional
//! to the node's own sessions, and per-node counters are O(1).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::route::NodeIndex;

/// Identifies one client connection for the proxy's lifetime.
pub type ConnId = u64;

/// Something the rest of the proxy asks a connection to do.
#[derive(Debug)]
pub enum Control {
    /// Close the client stream with this stream error (already serialised,
    /// including `</stream:stream>`), e.g. a re-login hint.
    Evict(String),
    /// Write these bytes to the client (a stanza on the node's behalf).
    Inject(Bytes),
}

/// The sending side of a connection's control channel.
pub type ConnHandle = mpsc::Sender<Control>;

/// `<show/>` values (RFC 6121 §4.7.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Show {
    /// No `<show/>`: available.
    #[default]
    Online,
    /// `away`.
    Away,
    /// `chat`.
    Chat,
    /// `dnd`.
    Dnd,
    /// `xa`.
    Xa,
}

impl Show {
    /// Parses the raw text of `<show/>`; unknown values count as online.
    pub fn parse(raw: &[u8]) -> Show {
        match raw {
            b"away" => Show::Away,
            b"chat" => Show::Chat,
            b"dnd" => Show::Dnd,
            b"xa" => Show::Xa,
            _ => Show::Online,
        }
    }
}

/// The last broadcast presence of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Presence {
    /// Whether the session has sent available presence (and not unavailable).
    pub available: bool,
    /// `<show/>`.
    pub show: Show,
    /// `<priority/>`, clamped to -128..=127.
    pub priority: i8,
    /// A hash of the `<status/>` text (0 without one): enough to tell a
    /// change without storing the text.
    pub status_hash: u64,
}

/// One bound resource.
#[derive(Debug, Clone)]
pub struct Session {
    /// The full JID the node bound.
    pub full_jid: Arc<str>,
    /// The node the session is bound on.
    pub node: NodeIndex,
    /// The connection carrying it.
    pub conn: ConnId,
    /// To evict the connection or inject a stanza into it.
    pub handle: ConnHandle,
    /// When the bind result passed the proxy.
    pub bound_at: Instant,
    /// Last presence.
    pub presence: Presence,
}

/// Everything tracked for one bare JID.
#[derive(Debug, Clone)]
pub struct User {
    /// The user's assigned node.
    pub home: NodeIndex,
    /// The sessions, one per bound resource.
    pub sessions: Vec<Session>,
}

/// The session tracker.
#[derive(Debug, Default)]
pub struct Tracker {
    users: DashMap<Arc<str>, User>,
    /// Connection → (bare JID, node): to find a session from the relay.
    by_conn: DashMap<ConnId, (Arc<str>, NodeIndex)>,
    /// Per-node index of connections with a bound session.
    per_node: [DashMap<ConnId, Arc<str>>; 2],
    counts: [AtomicUsize; 2],
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A resource was bound: `full_jid` on `node` over connection `conn`.
    pub fn on_bind(
        &self,
        full_jid: &str,
        home: NodeIndex,
        node: NodeIndex,
        conn: ConnId,
        handle: ConnHandle,
    ) {
        let bare: Arc<str> = Arc::from(bare_of(full_jid).to_ascii_lowercase());
        let full: Arc<str> = Arc::from(full_jid);
        // A connection binds one resource; a second bind replaces it.
        self.on_close(conn);
        let session = Session {
            full_jid: full.clone(),
            node,
            conn,
            handle,
            bound_at: Instant::now(),
            presence: Presence::default(),
        };
        self.users
            .entry(bare.clone())
            .and_modify(|u| {
                u.home = home;
                u.sessions.push(session.clone());
            })
            .or_insert_with(|| User {
                home,
                sessions: vec![session],
            });
        self.by_conn.insert(conn, (bare, node));
        if let Some(idx) = self.per_node.get(node) {
            idx.insert(conn, full);
            self.counts[node].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The client on `conn` sent broadcast presence.
    pub fn on_presence(&self, conn: ConnId, presence: Presence) {
        let Some(bare) = self.by_conn.get(&conn).map(|e| e.0.clone()) else {
            return;
        };
        if let Some(mut u) = self.users.get_mut(&bare) {
            if let Some(s) = u.sessions.iter_mut().find(|s| s.conn == conn) {
                s.presence = presence;
            }
        }
    }

    /// The connection ended: its session (if any) is gone.
    pub fn on_close(&self, conn: ConnId) {
        let Some((_, (bare, node))) = self.by_conn.remove(&conn) else {
            return;
        };
        if let Some(idx) = self.per_node.get(node) {
            if idx.remove(&conn).is_some() {
                self.counts[node].fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.users.remove_if_mut(&bare, |_, u| {
            u.sessions.retain(|s| s.conn != conn);
            u.sessions.is_empty()
        });
    }

    /// Every session bound on `node`, as (connection, full JID).
    pub fn sessions_on(&self, node: NodeIndex) -> Vec<(ConnId, Arc<str>)> {
        match self.per_node.get(node) {
            Some(idx) => idx.iter().map(|e| (*e.key(), e.value().clone())).collect(),
            None => Vec::new(),
        }
    }

    /// Number of sessions bound on `node` (O(1)).
    pub fn count_on(&self, node: NodeIndex) -> usize {
        self.counts
            .get(node)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// A copy of what is tracked for a bare (or full) JID.
    pub fn lookup(&self, jid: &str) -> Option<User> {
        let bare = bare_of(jid).to_ascii_lowercase();
        self.users.get(bare.as_str()).map(|u| u.clone())
    }

    /// The control handle of a connection's session, if bound.
    pub fn handle_of(&self, conn: ConnId) -> Option<ConnHandle> {
        let bare = self.by_conn.get(&conn)?.0.clone();
        let u = self.users.get(&bare)?;
        u.sessions
            .iter()
            .find(|s| s.conn == conn)
            .map(|s| s.handle.clone())
    }

    /// Number of users with at least one session.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

/// The bare part of a JID (`local@domain/resource` → `local@domain`).
pub fn bare_of(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

/// Parses a `<priority/>` value (RFC 6121: -128..=127; bad values are 0).
pub fn parse_priority(raw: &[u8]) -> i8 {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .map_or(0, |p| p.clamp(-128, 127) as i8)
}

/// FNV-1a of a status text, never 0 for a present status.
pub fn status_hash(raw: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in raw {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | 1
}

#[cfg(test)]
mod tests;
