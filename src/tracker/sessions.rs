//! The sessions, out of the user slots: per connection-shard and per node a
//! dense vector of sessions (64 bytes each) with a small index from
//! connection id to position (4 bytes a bucket). A node's sessions are its
//! own vectors, so listing them visits nothing else.

use std::sync::Arc;

use hashbrown::HashTable;

use super::{ConnHandle, ConnId, Presence};
use crate::node::PAIR;

/// One bound session as stored.
#[derive(Debug)]
pub(super) struct SessionSlot {
    pub conn: ConnId,
    /// The full JID the node bound (its bare part is the user's key).
    pub full_jid: Arc<str>,
    pub handle: ConnHandle,
    /// Nanoseconds from the tracker's epoch to the bind.
    pub bound_ns: u64,
    pub presence: Presence,
}

/// The sessions bound on one node, in one shard.
#[derive(Default)]
struct NodeSessions {
    slab: Vec<SessionSlot>,
    /// Position in `slab`, by connection hash.
    index: HashTable<u32>,
}

/// One shard: the sessions of its connections, per node.
#[derive(Default)]
pub(super) struct ConnShard {
    on_node: [NodeSessions; PAIR],
}

impl ConnShard {
    /// (node, position) of the session on `conn`.
    pub(super) fn find(&self, ch: u64, conn: ConnId) -> Option<(usize, usize)> {
        self.on_node.iter().enumerate().find_map(|(n, ns)| {
            ns.index
                .find(ch, |&p| ns.slab[p as usize].conn == conn)
                .map(|&p| (n, p as usize))
        })
    }

    pub(super) fn get(&self, ch: u64, conn: ConnId) -> Option<(usize, &SessionSlot)> {
        let (n, p) = self.find(ch, conn)?;
        Some((n, &self.on_node[n].slab[p]))
    }

    pub(super) fn get_mut(&mut self, ch: u64, conn: ConnId) -> Option<&mut SessionSlot> {
        let (n, p) = self.find(ch, conn)?;
        Some(&mut self.on_node[n].slab[p])
    }

    /// Adds a session on `node` (the connection has none).
    pub(super) fn insert(
        &mut self,
        ch: u64,
        node: usize,
        s: SessionSlot,
        hash: impl Fn(ConnId) -> u64,
    ) {
        let ns = &mut self.on_node[node];
        let pos = ns.slab.len() as u32;
        ns.slab.push(s);
        let slab = &ns.slab;
        ns.index
            .insert_unique(ch, pos, |&p| hash(slab[p as usize].conn));
    }

    /// Removes the session on `conn`: (node, session).
    pub(super) fn remove(
        &mut self,
        ch: u64,
        conn: ConnId,
        hash: impl Fn(ConnId) -> u64,
    ) -> Option<(usize, SessionSlot)> {
        let (n, p) = self.find(ch, conn)?;
        let ns = &mut self.on_node[n];
        let slab = &ns.slab;
        if let Ok(e) = ns.index.find_entry(ch, |&q| slab[q as usize].conn == conn) {
            e.remove();
        }
        let s = ns.slab.swap_remove(p);
        // The last session moved into `p`: point its index entry there.
        if let Some(moved) = ns.slab.get(p) {
            let last = ns.slab.len() as u32;
            let mh = hash(moved.conn);
            if let Some(e) = ns.index.find_mut(mh, |&q| q == last) {
                *e = p as u32;
            }
        }
        Some((n, s))
    }

    /// The sessions bound on `node` in this shard.
    pub(super) fn on(&self, node: usize) -> &[SessionSlot] {
        &self.on_node[node].slab
    }

    /// Bytes held by this shard's vectors and indexes (for the memory split).
    pub(super) fn bytes(&self) -> usize {
        self.on_node
            .iter()
            .map(|ns| {
                ns.slab.capacity() * std::mem::size_of::<SessionSlot>() + ns.index.allocation_size()
            })
            .sum()
    }
}
