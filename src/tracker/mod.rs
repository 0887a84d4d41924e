//! Who is where: every user's JSM sessions (bound resources), the node each
//! is bound on, the connection that carries it and its last presence.
//!
//! Updates come from the relay's cheap peeks (bind results from the node,
//! presence from the client); the group controller reads `sessions_on(node)`
//! to know whom a failover moves. A per-node index keeps that proportional
//! to the node's own sessions, and per-node counters are O(1).
//!
//! Every stanza of every user passes here, so the layout is chosen for
//! speed and size: sharded `RwLock`s over `hashbrown` tables of small
//! slots (key, routing and what a read needs; sessions out of line), bare
//! JIDs kept inline when short and hashed case-insensitively without
//! allocating (see [`key`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hashbrown::HashTable;
use parking_lot::RwLock;
use tokio::time::Instant;

use crate::node::{NodeId, PAIR};

mod key;
use key::SmallStr;

pub use crate::control::{ConnHandle, ConnId};

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
    /// A hash of the XEP-0115 caps `ver` (0 without caps): which client
    /// features (temporary presence among them) the session announced.
    pub caps_hash: u64,
}

impl Presence {
    /// The broadcast presence a client stanza carries, found by peeks at the
    /// framed bytes (no DOM, no allocation). `None` for other stanzas,
    /// directed presence and subscription management.
    pub fn peek(frame: &[u8], f: &crate::xmpp::Frame) -> Option<Presence> {
        use crate::xmpp::peek;
        if f.name(frame) != b"presence" {
            return None;
        }
        let head = &frame[..f.head_end];
        if peek::attr(head, b"to").is_some() {
            return None; // directed presence
        }
        match peek::attr(head, b"type") {
            None => Some(Presence {
                available: true,
                show: peek::child_text(frame, b"show").map_or(Show::Online, Show::parse),
                priority: peek::child_text(frame, b"priority").map_or(0, parse_priority),
                status_hash: peek::child_text(frame, b"status").map_or(0, status_hash),
                caps_hash: peek::caps_ver(frame).map_or(0, status_hash),
            }),
            Some(b"unavailable") => Some(Presence::default()),
            Some(_) => None,
        }
    }
}

/// One bound resource.
#[derive(Debug, Clone)]
pub struct Session {
    /// The full JID the node bound.
    pub full_jid: Arc<str>,
    /// The node the session is bound on.
    pub node: NodeId,
    /// The connection carrying it.
    pub conn: ConnId,
    /// To evict the connection or inject a stanza into it.
    pub handle: ConnHandle,
    /// When the bind result passed the proxy.
    pub bound_at: Instant,
    /// Last presence.
    pub presence: Presence,
}

/// Everything tracked for one bare JID (a copy, see [`Tracker::lookup`]).
#[derive(Debug, Clone)]
pub struct User {
    /// The user's assigned node.
    pub home: NodeId,
    /// The node that serves the user now (where the latest session bound).
    pub serving: NodeId,
    /// The sessions, one per bound resource.
    pub sessions: Vec<Session>,
    /// Temporary-presence subscriptions this user holds as a watcher (the
    /// targets' bare JIDs); filled by the temp-presence registry.
    pub temp_subscriptions: Vec<Arc<str>>,
}

/// What most readers need about a user, without copying the sessions:
/// routing and the failover planner ask "is this user on, and where".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// The user's assigned node.
    pub home: NodeId,
    /// The node that serves the user now.
    pub serving: NodeId,
    /// Number of bound sessions (at least 1: users without any are gone).
    pub sessions: usize,
    /// Whether any session has sent available presence.
    pub available: bool,
}

/// Shards per map: a power of two well above the core count, so that two
/// writers rarely meet on one lock and a shard's table stays small enough
/// to resize without a visible pause.
const SHARDS: usize = 64;

/// Keeps a lock (and the table header beside it) on its own cache lines so
/// that threads working on neighbouring shards do not invalidate each
/// other's lines (128 bytes: adjacent-line prefetch pairs lines on x86).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// One bound session as stored: the public [`Session`] without the node
/// being a `usize` and with nothing the user slot already holds.
#[derive(Debug)]
struct SessionSlot {
    full_jid: Arc<str>,
    conn: ConnId,
    handle: ConnHandle,
    bound_at: Instant,
    presence: Presence,
    node: u8,
}

impl SessionSlot {
    fn to_public(&self) -> Session {
        Session {
            full_jid: self.full_jid.clone(),
            node: node_of(self.node),
            conn: self.conn,
            handle: self.handle.clone(),
            bound_at: self.bound_at,
            presence: self.presence,
        }
    }
}

/// One user as stored in its shard's table: only what a read needs — key,
/// routing, session count, availability — so that a slot is 56 bytes and
/// the table of a million users stays small enough to be mostly cached.
/// With the sessions inline (176-byte slots) every read was a memory miss;
/// the sessions now live in [`Cold`], touched by writes and full lookups.
#[derive(Debug)]
struct UserSlot {
    /// Cached hash of the key: resizing and probing never rehash the text.
    hash: u64,
    /// Lower-cased bare JID.
    bare: SmallStr,
    home: u8,
    serving: u8,
    /// Whether any session's last presence is available (kept in step by
    /// every update, so a read need not visit the sessions).
    available: bool,
    /// Number of sessions, saturating (kept in step like `available`).
    count: u16,
    cold: Box<Cold>,
}

/// The sessions of a user (and what later issues attach to the user).
#[derive(Debug)]
struct Cold {
    /// Never empty while the slot exists.
    first: SessionSlot,
    /// Further sessions (multi-device users); empty costs no allocation.
    more: Vec<SessionSlot>,
    /// Temp-presence placeholder; boxed because almost nobody has any.
    temp: Option<Box<[Arc<str>]>>,
}

impl UserSlot {
    fn new(hash: u64, bare: &str, home: u8, serving: u8, first: SessionSlot) -> UserSlot {
        UserSlot {
            hash,
            bare: SmallStr::lowercase(bare),
            home,
            serving,
            available: false,
            count: 1,
            cold: Box::new(Cold {
                first,
                more: Vec::new(),
                temp: None,
            }),
        }
    }

    fn sessions(&self) -> impl Iterator<Item = &SessionSlot> {
        std::iter::once(&self.cold.first).chain(self.cold.more.iter())
    }

    fn session_mut(&mut self, conn: ConnId) -> Option<&mut SessionSlot> {
        let c = &mut *self.cold;
        if c.first.conn == conn {
            return Some(&mut c.first);
        }
        c.more.iter_mut().find(|s| s.conn == conn)
    }

    fn has(&self, conn: ConnId) -> bool {
        self.sessions().any(|s| s.conn == conn)
    }

    fn push(&mut self, s: SessionSlot) {
        self.cold.more.push(s);
        self.refresh();
    }

    /// Refreshes the cached read fields after the sessions changed.
    fn refresh(&mut self) {
        let available = self.sessions().any(|s| s.presence.available);
        self.available = available;
        self.count = u16::try_from(1 + self.cold.more.len()).unwrap_or(u16::MAX);
    }

    /// Removes the session of `conn`; returns whether the slot is now empty.
    fn remove(&mut self, conn: ConnId) -> bool {
        let c = &mut *self.cold;
        if c.first.conn == conn {
            match c.more.pop() {
                Some(s) => c.first = s,
                None => return true,
            }
        } else {
            c.more.retain(|s| s.conn != conn);
        }
        self.refresh();
        false
    }
}

/// Where a connection's session is: enough to find its user slot again
/// (by hash, then by connection) without storing the key twice.
#[derive(Debug)]
struct ConnSlot {
    conn: ConnId,
    user_hash: u64,
    node: u8,
    full_jid: Arc<str>,
}

/// A shard of the connection index: connection → session, and per node the
/// connections bound there, under one lock so a bind or close takes it once.
#[derive(Default)]
struct ConnShard {
    by_conn: HashTable<ConnSlot>,
    on_node: [HashTable<ConnId>; PAIR],
}

/// The session tracker.
///
/// Two sharded maps: users by bare JID (holding the sessions) and
/// connections by id (pointing back at the user, plus the per-node index).
/// Shards are `parking_lot::RwLock`s over `hashbrown` tables; see
/// `benches/README.md` for the numbers that chose this over `DashMap`.
pub struct Tracker {
    /// Keys the hashes (random per tracker).
    seed: u64,
    users: Box<[Padded<RwLock<HashTable<UserSlot>>>]>,
    conns: Box<[Padded<RwLock<ConnShard>>]>,
    /// Sessions per node, O(1) to read.
    counts: [Padded<AtomicUsize>; PAIR],
    /// Users with at least one session.
    user_total: Padded<AtomicUsize>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("users", &self.user_count())
            .field(
                "on_node",
                &[self.count_on(NodeId::Node1), self.count_on(NodeId::Node2)],
            )
            .finish()
    }
}

/// Picks a shard from hash bits that hashbrown does not use inside the
/// shard (it takes the low bits for the bucket and the top seven as tag).
#[inline]
fn shard_of(hash: u64) -> usize {
    (hash >> 40) as usize & (SHARDS - 1)
}

fn node_u8(node: NodeId) -> u8 {
    // At most `PAIR` nodes: the index always fits.
    node.index() as u8
}

fn node_of(v: u8) -> NodeId {
    NodeId::from_index(usize::from(v)).unwrap_or(NodeId::Node1)
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Tracker {
            seed: rand::random(),
            users: (0..SHARDS).map(|_| Padded::default()).collect(),
            conns: (0..SHARDS).map(|_| Padded::default()).collect(),
            counts: Default::default(),
            user_total: Padded::default(),
        }
    }

    fn user_hash(&self, bare: &str) -> u64 {
        key::hash_folded(self.seed, bare.as_bytes())
    }

    fn conn_shard(&self, conn: ConnId) -> (u64, &RwLock<ConnShard>) {
        let h = key::hash_conn(self.seed, conn);
        (h, &self.conns[shard_of(h)].0)
    }

    /// A resource was bound: `full_jid` on `node` over connection `conn`.
    pub fn on_bind(
        &self,
        full_jid: &str,
        home: NodeId,
        node: NodeId,
        conn: ConnId,
        handle: ConnHandle,
    ) {
        // A connection binds one resource; a second bind replaces it.
        self.on_close(conn);
        let bare = bare_of(full_jid);
        let uh = self.user_hash(bare);
        let full: Arc<str> = Arc::from(full_jid);
        let session = SessionSlot {
            full_jid: full.clone(),
            conn,
            handle,
            bound_at: Instant::now(),
            presence: Presence::default(),
            node: node_u8(node),
        };
        {
            let mut users = self.users[shard_of(uh)].0.write();
            match users.find_mut(uh, |u| u.hash == uh && u.bare.matches(bare.as_bytes())) {
                Some(u) => {
                    u.home = node_u8(home);
                    u.serving = node_u8(node);
                    u.push(session);
                }
                None => {
                    users.insert_unique(
                        uh,
                        UserSlot::new(uh, bare, node_u8(home), node_u8(node), session),
                        |u| u.hash,
                    );
                    self.user_total.0.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let (ch, shard) = self.conn_shard(conn);
        let mut cs = shard.write();
        cs.by_conn.insert_unique(
            ch,
            ConnSlot {
                conn,
                user_hash: uh,
                node: node_u8(node),
                full_jid: full,
            },
            |c| key::hash_conn(self.seed, c.conn),
        );
        cs.on_node[node.index()].insert_unique(ch, conn, |c| key::hash_conn(self.seed, *c));
        self.counts[node.index()].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The bare JID's hash of the session on `conn`, if bound.
    fn user_hash_of(&self, conn: ConnId) -> Option<u64> {
        let (ch, shard) = self.conn_shard(conn);
        let cs = shard.read();
        cs.by_conn.find(ch, |c| c.conn == conn).map(|c| c.user_hash)
    }

    /// The client on `conn` sent broadcast presence.
    pub fn on_presence(&self, conn: ConnId, presence: Presence) {
        let Some(uh) = self.user_hash_of(conn) else {
            return;
        };
        let mut users = self.users[shard_of(uh)].0.write();
        if let Some(u) = users.find_mut(uh, |u| u.hash == uh && u.has(conn)) {
            if let Some(s) = u.session_mut(conn) {
                s.presence = presence;
            }
            u.refresh();
        }
    }

    /// The connection ended: its session (if any) is gone.
    pub fn on_close(&self, conn: ConnId) {
        let (ch, shard) = self.conn_shard(conn);
        let slot = {
            let mut cs = shard.write();
            let Ok(e) = cs.by_conn.find_entry(ch, |c| c.conn == conn) else {
                return;
            };
            let (slot, _) = e.remove();
            let node = usize::from(slot.node);
            if let Some(idx) = cs.on_node.get_mut(node) {
                if let Ok(e) = idx.find_entry(ch, |c| *c == conn) {
                    e.remove();
                    self.counts[node].0.fetch_sub(1, Ordering::Relaxed);
                }
            }
            slot
        };
        let uh = slot.user_hash;
        let mut users = self.users[shard_of(uh)].0.write();
        if let Ok(mut e) = users.find_entry(uh, |u| u.hash == uh && u.has(conn)) {
            if e.get_mut().remove(conn) {
                e.remove();
                self.user_total.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Every session bound on `node`, as (connection, full JID). Visits only
    /// that node's index: time proportional to the node's own sessions.
    pub fn sessions_on(&self, node: NodeId) -> Vec<(ConnId, Arc<str>)> {
        let mut out = Vec::with_capacity(self.count_on(node));
        for shard in self.conns.iter() {
            let cs = shard.0.read();
            for &conn in cs.on_node[node.index()].iter() {
                let ch = key::hash_conn(self.seed, conn);
                if let Some(c) = cs.by_conn.find(ch, |c| c.conn == conn) {
                    out.push((conn, c.full_jid.clone()));
                }
            }
        }
        out
    }

    /// Number of sessions bound on `node` (O(1)).
    pub fn count_on(&self, node: NodeId) -> usize {
        self.counts[node.index()].0.load(Ordering::Relaxed)
    }

    /// Runs `f` on the user's slot under its shard's read lock.
    fn with_user<R>(&self, jid: &str, f: impl FnOnce(&UserSlot) -> R) -> Option<R> {
        let bare = bare_of(jid);
        let uh = self.user_hash(bare);
        let users = self.users[shard_of(uh)].0.read();
        users
            .find(uh, |u| u.hash == uh && u.bare.matches(bare.as_bytes()))
            .map(f)
    }

    /// A copy of what is tracked for a bare (or full) JID, any ASCII case.
    /// Copies the sessions (one `Vec`); readers that need less use
    /// [`Tracker::summary`], which allocates nothing.
    pub fn lookup(&self, jid: &str) -> Option<User> {
        self.with_user(jid, |u| User {
            home: node_of(u.home),
            serving: node_of(u.serving),
            sessions: u.sessions().map(SessionSlot::to_public).collect(),
            temp_subscriptions: u
                .cold
                .temp
                .as_deref()
                .map(<[Arc<str>]>::to_vec)
                .unwrap_or_default(),
        })
    }

    /// Home, serving node and presence of a user, without allocating.
    pub fn summary(&self, jid: &str) -> Option<Summary> {
        self.with_user(jid, |u| Summary {
            home: node_of(u.home),
            serving: node_of(u.serving),
            sessions: usize::from(u.count),
            available: u.available,
        })
    }

    /// The control handle of a connection's session, if bound.
    pub fn handle_of(&self, conn: ConnId) -> Option<ConnHandle> {
        let uh = self.user_hash_of(conn)?;
        let users = self.users[shard_of(uh)].0.read();
        let handle = users
            .find(uh, |u| u.hash == uh && u.has(conn))?
            .sessions()
            .find(|s| s.conn == conn)
            .map(|s| s.handle.clone());
        handle
    }

    /// Number of users with at least one session.
    pub fn user_count(&self) -> usize {
        self.user_total.0.load(Ordering::Relaxed)
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
