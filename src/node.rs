//! Which node of the pair: the one node identity every module shares.
//!
//! A presence redundancy group has at most [`PAIR`] nodes. The source's
//! Table 2 calls them "node 1" and "node 2"; the config lists them in that
//! order. Per-node arrays are indexed with [`NodeId::index`].

use std::fmt;

use serde::Serialize;

/// How many nodes a presence redundancy group can have.
pub const PAIR: usize = 2;

/// One of the two nodes of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeId {
    /// The first node of the group (in active/standby mode the one holding all users).
    Node1,
    /// The second node of the group (in active/standby mode the backup).
    Node2,
}

impl NodeId {
    /// Both nodes, in order, for iterating.
    pub const ALL: [NodeId; PAIR] = [NodeId::Node1, NodeId::Node2];

    /// 0 for node 1, 1 for node 2: an index into per-node arrays.
    pub fn index(self) -> usize {
        match self {
            NodeId::Node1 => 0,
            NodeId::Node2 => 1,
        }
    }

    /// The node at a config position (0 = node 1), if a pair has one there.
    pub fn from_index(i: usize) -> Option<NodeId> {
        NodeId::ALL.get(i).copied()
    }

    /// The other node of the pair: every failover goes to the peer.
    pub fn peer(self) -> NodeId {
        match self {
            NodeId::Node1 => NodeId::Node2,
            NodeId::Node2 => NodeId::Node1,
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeId::Node1 => "node 1",
            NodeId::Node2 => "node 2",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips() {
        for n in NodeId::ALL {
            assert_eq!(NodeId::from_index(n.index()), Some(n));
            assert_eq!(n.peer().peer(), n);
        }
        assert_eq!(NodeId::from_index(PAIR), None);
    }
}
