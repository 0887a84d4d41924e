//! Who is where: every user's JSM sessions (bound resources), the node each
//! is bound on, the connection that carries it and its last presence.
//!
//! Updates come from the relay's cheap peeks (bind results from the node,
//! presence from the client); the group controller reads `sessions_on(node)`
//! to know whom a failover moves. A per-node index keeps that proportional
//! to the node's own sessions, and per-node counters are O(1).
//!
//! Every stanza of every user passes here, so the layout is chosen for
//! speed and size: one 64-byte slot per user with what a read needs (key
//! hash and first 32 key bytes, home, serving node, session count,
//! availability) and its version counter, read without locks ([`slots`]);
//! sessions out of line, per connection shard and per node
//! ([`sessions`]); keys hashed case-insensitively without allocating
//! ([`key`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::time::Instant;

use crate::node::{NodeId, PAIR};

mod key;
mod sessions;
mod slots;
use sessions::{ConnShard, SessionSlot};
use slots::{Meta, Probe};

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
/// to rebuild without a visible pause.
const SHARDS: usize = 64;

/// Reads of a batch started together (their cache misses overlap).
const BATCH: usize = 16;

/// Keeps a lock (and the table header beside it) on its own cache lines so
/// that threads working on neighbouring shards do not invalidate each
/// other's lines (128 bytes: adjacent-line prefetch pairs lines on x86).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// How the tracker's memory is split (see [`Tracker::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemorySplit {
    /// User slots (64 bytes each, including free ones).
    pub user_slots: usize,
    /// Session vectors and their connection indexes (capacity included).
    pub sessions: usize,
    /// Connection lists of users with more than one session.
    pub extra: usize,
    /// Full JID strings (`Arc<str>`: 16 bytes of counts plus the text).
    pub jids: usize,
}

/// The session tracker.
///
/// Users live in [`slots`]: one 64-byte slot per user with what a read
/// needs, read without locks under a per-slot version counter, written
/// under a per-shard mutex. Sessions live in [`sessions`], sharded by
/// connection and split per node. Lock order: a user shard's mutex, then
/// a connection shard's lock, never the other way.
pub struct Tracker {
    /// Keys the hashes (random per tracker).
    seed: u64,
    /// Bind times are kept as nanoseconds from here.
    epoch: Instant,
    users: Box<[Padded<slots::Shard>]>,
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

/// Picks a shard from hash bits that neither table uses inside the shard
/// (user slots take the high bits, hashbrown the low bits and the top
/// seven).
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

fn summary_of(m: Meta) -> Summary {
    Summary {
        home: node_of(m.home),
        serving: node_of(m.serving),
        sessions: m.count as usize,
        available: m.available,
    }
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Tracker {
            seed: rand::random(),
            epoch: Instant::now(),
            users: (0..SHARDS).map(|_| Padded::default()).collect(),
            conns: (0..SHARDS).map(|_| Padded::default()).collect(),
            counts: Default::default(),
            user_total: Padded::default(),
        }
    }

    fn probe(&self, jid: &str) -> Probe {
        Probe::new(self.seed, bare_of(jid).as_bytes())
    }

    fn user_shard(&self, hash: u64) -> &slots::Shard {
        &self.users[shard_of(hash)].0
    }

    fn conn_hash(&self, conn: ConnId) -> u64 {
        key::hash_conn(self.seed, conn)
    }

    fn conn_shard(&self, conn: ConnId) -> (u64, &RwLock<ConnShard>) {
        let h = self.conn_hash(conn);
        (h, &self.conns[shard_of(h)].0)
    }

    /// Whether the session on `conn` belongs to the bare JID `bare`: how a
    /// long key (only its first 32 bytes are in the slot) is confirmed.
    fn session_is_of(&self, conn: ConnId, bare: &str) -> bool {
        let (ch, shard) = self.conn_shard(conn);
        let cs = shard.read();
        cs.get(ch, conn)
            .is_some_and(|(_, s)| bare_of(&s.full_jid).eq_ignore_ascii_case(bare))
    }

    /// The user hash of the session on `conn`, if bound.
    fn user_hash_of(&self, conn: ConnId) -> Option<u64> {
        let (ch, shard) = self.conn_shard(conn);
        let cs = shard.read();
        let (_, s) = cs.get(ch, conn)?;
        Some(self.probe(&s.full_jid).hash)
    }

    /// Whether any of `conns` has sent available presence.
    fn any_available(&self, conns: &[ConnId]) -> bool {
        conns.iter().any(|&c| {
            let (ch, shard) = self.conn_shard(c);
            let cs = shard.read();
            cs.get(ch, c).is_some_and(|(_, s)| s.presence.available)
        })
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
        let p = self.probe(full_jid);
        let session = SessionSlot {
            full_jid: Arc::from(full_jid),
            conn,
            handle,
            bound_ns: u64::try_from(
                Instant::now()
                    .saturating_duration_since(self.epoch)
                    .as_nanos(),
            )
            .unwrap_or(u64::MAX),
            presence: Presence::default(),
        };
        let mut l = self.user_shard(p.hash).lock();
        match l.find(&p, |first| self.session_is_of(first, bare)) {
            Some(i) => {
                let m = l.meta(i);
                let first = l.first(i);
                l.w.extra.entry(first).or_default().push(conn);
                l.set(
                    i,
                    Meta {
                        home: node_u8(home),
                        serving: node_u8(node),
                        available: m.available,
                        count: m.count.saturating_add(1),
                    },
                    first,
                );
            }
            None => {
                l.insert(
                    &p,
                    Meta {
                        home: node_u8(home),
                        serving: node_u8(node),
                        available: false,
                        count: 1,
                    },
                    conn,
                );
                self.user_total.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (ch, shard) = self.conn_shard(conn);
        shard
            .write()
            .insert(ch, node.index(), session, |c| self.conn_hash(c));
        drop(l);
        self.counts[node.index()].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The client on `conn` sent broadcast presence.
    pub fn on_presence(&self, conn: ConnId, presence: Presence) {
        let Some(uh) = self.user_hash_of(conn) else {
            return;
        };
        let mut l = self.user_shard(uh).lock();
        let (ch, shard) = self.conn_shard(conn);
        match shard.write().get_mut(ch, conn) {
            Some(s) => s.presence = presence,
            None => return,
        }
        let Some(i) = l.find_by_conn(uh, conn) else {
            return;
        };
        let m = l.meta(i);
        let available = if m.count <= 1 {
            presence.available
        } else {
            self.any_available(&l.conns(i))
        };
        if available != m.available {
            let first = l.first(i);
            l.set(i, Meta { available, ..m }, first);
        }
    }

    /// The connection ended: its session (if any) is gone.
    pub fn on_close(&self, conn: ConnId) {
        let Some(uh) = self.user_hash_of(conn) else {
            return;
        };
        let mut l = self.user_shard(uh).lock();
        let (ch, shard) = self.conn_shard(conn);
        let Some((node, _gone)) = shard.write().remove(ch, conn, |c| self.conn_hash(c)) else {
            return;
        };
        self.counts[node].0.fetch_sub(1, Ordering::Relaxed);
        let Some(i) = l.find_by_conn(uh, conn) else {
            return;
        };
        let m = l.meta(i);
        if m.count <= 1 {
            l.remove(i);
            self.user_total.0.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut first = l.first(i);
        if first == conn {
            // Another session becomes the first; its list moves with it.
            let mut more = l.w.extra.remove(&conn).unwrap_or_default();
            first = more.pop().unwrap_or(conn);
            if !more.is_empty() {
                l.w.extra.insert(first, more);
            }
        } else if let Some(more) = l.w.extra.get_mut(&first) {
            more.retain(|&c| c != conn);
            if more.is_empty() {
                l.w.extra.remove(&first);
            }
        }
        let mut conns = vec![first];
        if let Some(more) = l.w.extra.get(&first) {
            conns.extend_from_slice(more);
        }
        let available = self.any_available(&conns);
        l.set(
            i,
            Meta {
                available,
                count: m.count - 1,
                ..m
            },
            first,
        );
    }

    /// Every session bound on `node`, as (connection, full JID). Visits only
    /// that node's sessions: time proportional to the node's own sessions.
    pub fn sessions_on(&self, node: NodeId) -> Vec<(ConnId, Arc<str>)> {
        let mut out = Vec::with_capacity(self.count_on(node));
        for shard in self.conns.iter() {
            let cs = shard.0.read();
            out.extend(
                cs.on(node.index())
                    .iter()
                    .map(|s| (s.conn, s.full_jid.clone())),
            );
        }
        out
    }

    /// Number of sessions bound on `node` (O(1)).
    pub fn count_on(&self, node: NodeId) -> usize {
        self.counts[node.index()].0.load(Ordering::Relaxed)
    }

    /// A copy of what is tracked for a bare (or full) JID, any ASCII case.
    /// Copies the sessions (one `Vec`); readers that need less use
    /// [`Tracker::summary`], which allocates nothing.
    pub fn lookup(&self, jid: &str) -> Option<User> {
        let bare = bare_of(jid);
        let p = self.probe(jid);
        let l = self.user_shard(p.hash).lock();
        let i = l.find(&p, |first| self.session_is_of(first, bare))?;
        let m = l.meta(i);
        let sessions = l
            .conns(i)
            .into_iter()
            .filter_map(|c| {
                let (ch, shard) = self.conn_shard(c);
                let cs = shard.read();
                cs.get(ch, c).map(|(n, s)| Session {
                    full_jid: s.full_jid.clone(),
                    node: NodeId::from_index(n).unwrap_or(NodeId::Node1),
                    conn: s.conn,
                    handle: s.handle.clone(),
                    bound_at: self.epoch + std::time::Duration::from_nanos(s.bound_ns),
                    presence: s.presence,
                })
            })
            .collect();
        Some(User {
            home: node_of(m.home),
            serving: node_of(m.serving),
            sessions,
            temp_subscriptions: Vec::new(),
        })
    }

    /// Home, serving node and presence of a user, without allocating and
    /// without taking a lock: one cache line read in the common case.
    pub fn summary(&self, jid: &str) -> Option<Summary> {
        self.summary_of(&self.probe(jid), bare_of(jid))
    }

    fn summary_of(&self, p: &Probe, bare: &str) -> Option<Summary> {
        let shard = self.user_shard(p.hash);
        match shard.read(p) {
            slots::Read::Miss => None,
            slots::Read::Hit(m) => Some(summary_of(m)),
            // A long key: confirm under the shard's lock.
            slots::Read::Unsure => {
                let l = shard.lock();
                let i = l.find(p, |first| self.session_is_of(first, bare))?;
                Some(summary_of(l.meta(i)))
            }
        }
    }

    /// [`Tracker::summary`] of each of `jids` into `out` (same length):
    /// the reads of a batch start together, so their cache misses overlap
    /// instead of following one another. Allocates nothing.
    pub fn summaries<S: AsRef<str>>(&self, jids: &[S], out: &mut [Option<Summary>]) {
        assert_eq!(jids.len(), out.len(), "one answer per JID");
        for (js, os) in jids.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
            let mut probes = [None; BATCH];
            let mut touched = 0u64;
            for (p, j) in probes.iter_mut().zip(js) {
                let probe = self.probe(j.as_ref());
                touched ^= self.user_shard(probe.hash).touch(&probe);
                *p = Some(probe);
            }
            std::hint::black_box(touched);
            for ((p, j), o) in probes.iter().zip(js).zip(os.iter_mut()) {
                *o = p.and_then(|p| self.summary_of(&p, bare_of(j.as_ref())));
            }
        }
    }

    /// The control handle of a connection's session, if bound.
    pub fn handle_of(&self, conn: ConnId) -> Option<ConnHandle> {
        let (ch, shard) = self.conn_shard(conn);
        let cs = shard.read();
        cs.get(ch, conn).map(|(_, s)| s.handle.clone())
    }

    /// Number of users with at least one session.
    pub fn user_count(&self) -> usize {
        self.user_total.0.load(Ordering::Relaxed)
    }

    /// Bytes the tracker holds, by part (walks every shard under its lock:
    /// for benches and diagnostics, not for a hot path).
    pub fn memory(&self) -> MemorySplit {
        let mut m = MemorySplit::default();
        for u in self.users.iter() {
            let l = u.0.lock();
            m.user_slots += l.table_bytes();
            m.extra += l.w.extra.capacity() * (std::mem::size_of::<(ConnId, Vec<ConnId>)>() + 1)
                + l.w
                    .extra
                    .values()
                    .map(|v| v.capacity() * std::mem::size_of::<ConnId>())
                    .sum::<usize>();
        }
        for c in self.conns.iter() {
            let cs = c.0.read();
            m.sessions += cs.bytes();
            for n in 0..PAIR {
                m.jids += cs
                    .on(n)
                    .iter()
                    .map(|s| 16 + s.full_jid.len())
                    .sum::<usize>();
            }
        }
        m
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
