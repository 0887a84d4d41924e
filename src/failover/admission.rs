//! The admission step between routing and the upstream connect: every
//! login passes here before the proxy opens a node connection for it.
//!
//! The login [`Pacer`] decides: a login is admitted at once, **held**
//! (the client waits inside SASL, no node connection is open) until its
//! user's turn or the node's next free admission, or **refused** when that
//! turn is further off than `failover.max_hold`: after
//! `failover.refuse_delay`, the stream ends with `<resource-constraint/>`
//! and a fresh re-login hint.

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::hints::Hints;
use super::pacer::{Pace, Pacer};
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
    /// The longest the client can be held (its remaining pre-auth time).
    pub max_wait: Duration,
}

/// What the admission step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Open the node connection now.
    Go,
    /// Refuse the login: close the stream with this serialised stream
    /// error (`<resource-constraint/>` and a fresh hint). Real clients take
    /// it as "try again later" without asking their user for a password,
    /// which they do after a SASL `<temporary-auth-failure/>`.
    Refuse(String),
}

/// The admission step of the proxy.
#[derive(Debug)]
pub struct Admission {
    hints: Arc<Hints>,
    max_hold: Duration,
}

impl Admission {
    /// An admission step pacing logins with `hints`' pacer, holding a login
    /// at most `max_hold`.
    pub fn new(hints: Arc<Hints>, max_hold: Duration) -> Admission {
        Admission { hints, max_hold }
    }

    /// The pacer behind the step.
    pub fn pacer(&self) -> &Arc<Pacer> {
        self.hints.pacer()
    }

    /// Decides on a login; holds it (waits) when its turn is near.
    pub async fn admit(&self, login: &Login<'_>) -> Admit {
        let max_wait = self.max_hold.min(login.max_wait);
        match self
            .hints
            .pacer()
            .admit(login.user, login.target, max_wait)
            .await
        {
            Pace::Go(waited) => {
                if !waited.is_zero() {
                    debug!(user = login.user, ?waited, "login held for its turn");
                }
                Admit::Go
            }
            Pace::Refuse(after) => {
                // Clients retry a refused login at once: told later, they
                // come back at most once per delay.
                let delay = self.hints.refuse_delay().min(max_wait);
                tokio::time::sleep(delay).await;
                let hint = self.hints.paced(login.target, after.saturating_sub(delay));
                Admit::Refuse(hint.stream_error(
                    "resource-constraint",
                    "the node is taking users back at a paced rate; try again at the time given",
                ))
            }
        }
    }
}
