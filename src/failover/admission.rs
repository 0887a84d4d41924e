//! The admission step between routing and the upstream connect: every
//! login passes here before the proxy opens a node connection for it.
//!
//! It admits everything now. This is where a login pacer holds logins that
//! come back too early or too fast after a move, and refuses those whose
//! turn is far off, so that the node taking over is never stormed.

use crate::node::NodeId;

/// A login about to be routed.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    /// The user's normalised bare JID.
    pub user: &'a str,
    /// The user's assigned node.
    pub home: NodeId,
    /// The node that serves the user now, where the login goes.
    pub target: NodeId,
}

/// What the admission step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Open the node connection now.
    Go,
    /// Refuse the login with this SASL failure condition and text; the
    /// client may try again.
    Refuse {
        /// A SASL failure condition (RFC 6120 §6.5).
        condition: &'static str,
        /// Human-readable text for the client.
        text: String,
    },
}

/// The admission step of the proxy.
#[derive(Debug, Default)]
pub struct Admission {}

impl Admission {
    /// An admission step that admits every login.
    pub fn new() -> Admission {
        Admission {}
    }

    /// Decides on a login. May wait (hold the login) before answering;
    /// the connection's own deadlines bound the wait.
    pub async fn admit(&self, login: &Login<'_>) -> Admit {
        let _ = login;
        Admit::Go
    }
}
