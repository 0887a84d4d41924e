//! Stanza hooks: what looks at the stanzas a connection relays.
//!
//! Each complete stanza is shown, by reference and before it is forwarded,
//! to every hook of the connection, per direction. A hook may ask for bytes
//! to be injected into either stream; they are written after the batch the
//! stanza belongs to, so always between two stanzas, never inside one.
//!
//! The session tracker's hook ([`TrackerHook`]) is built in; further hooks
//! (the temporary-presence registry) come from [`HookFactory`]s in the
//! connection's context.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;

use crate::control::{ConnHandle, ConnId};
use crate::failover::Pacer;
use crate::jid;
use crate::node::NodeId;
use crate::tracker::{Presence, Tracker};
use crate::xmpp::framer::Frame;
use crate::xmpp::peek;

/// Bytes hooks want written, per stream.
#[derive(Debug, Default)]
pub struct Injections {
    /// To the client, after the current batch.
    pub to_client: Vec<Bytes>,
    /// To the node, after the current batch.
    pub to_node: Vec<Bytes>,
    /// End the client stream with this stream error; the stanza being
    /// looked at and everything after it are not forwarded.
    pub close: Option<String>,
}

/// Looks at the stanzas of one connection.
pub trait StanzaHook: Send {
    /// A complete stanza from the client, before it goes to the node.
    fn client_stanza(&mut self, frame: &[u8], f: &Frame, inject: &mut Injections) {
        let _ = (frame, f, inject);
    }

    /// A complete stanza from the node, before it goes to the client.
    fn node_stanza(&mut self, frame: &[u8], f: &Frame, inject: &mut Injections) {
        let _ = (frame, f, inject);
    }
}

/// Who a relayed session is, for the hooks built for it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The connection.
    pub conn: ConnId,
    /// The user's normalised bare JID.
    pub user: Arc<str>,
    /// The user's assigned node.
    pub home: NodeId,
    /// The node the session is relayed to.
    pub node: NodeId,
    /// The connection's control point.
    pub handle: ConnHandle,
}

/// Builds a hook for each relayed session.
pub trait HookFactory: Send + Sync {
    /// The hook for one session.
    fn hook(&self, session: &SessionInfo) -> Box<dyn StanzaHook>;
}

/// A connection's hooks: the tracker's, the login pacer's until the
/// session is bound, then any others.
pub struct Hooks {
    tracker: TrackerHook,
    login: Option<LoginHook>,
    others: Vec<Box<dyn StanzaHook>>,
}

impl Hooks {
    /// The hooks of one session.
    pub fn new(
        tracker: Arc<Tracker>,
        pacer: Arc<Pacer>,
        session: &SessionInfo,
        factories: &[Arc<dyn HookFactory>],
        sasl_node_time: Duration,
    ) -> Hooks {
        Hooks {
            login: Some(LoginHook {
                pacer,
                user: session.user.clone(),
                node: session.node,
                node_time: sasl_node_time,
                asked: None,
            }),
            tracker: TrackerHook {
                tracker,
                session: session.clone(),
                bound: false,
                full_jid: None,
            },
            others: factories.iter().map(|f| f.hook(session)).collect(),
        }
    }

    /// The full JID the node bound for this session, once it has.
    pub fn bound_jid(&self) -> Option<&str> {
        self.tracker.full_jid.as_deref()
    }

    /// Shows a client stanza to every hook.
    #[inline]
    pub fn client_stanza(&mut self, frame: &[u8], f: &Frame, inject: &mut Injections) {
        if let Some(l) = &mut self.login {
            l.asked.get_or_insert_with(Instant::now);
        }
        self.tracker.client_stanza(frame, f, inject);
        for h in &mut self.others {
            h.client_stanza(frame, f, inject);
        }
    }

    /// Shows a node stanza to every hook.
    #[inline]
    pub fn node_stanza(&mut self, frame: &[u8], f: &Frame, inject: &mut Injections) {
        if let Some(l) = &mut self.login {
            if l.done(frame, f) {
                self.login = None;
            }
        }
        self.tracker.node_stanza(frame, f, inject);
        for h in &mut self.others {
            h.node_stanza(frame, f, inject);
        }
    }
}

/// Tells the login pacer how long the node took to log the user in (its
/// share of auth forwarded → bind result: the time from each client
/// request to the node's answer, not the client's own round trips, so a
/// slow client does not read as a loaded node), or that it refused the
/// login as overloaded.
struct LoginHook {
    pacer: Arc<Pacer>,
    user: Arc<str>,
    node: NodeId,
    /// The node's time so far (the SASL exchange, then the bind).
    node_time: Duration,
    /// When the client's request the node has not answered yet was relayed.
    asked: Option<Instant>,
}

impl LoginHook {
    /// Looks at a node stanza before the bind result; `true` once the
    /// login's outcome is known.
    fn done(&mut self, frame: &[u8], f: &Frame) -> bool {
        if let Some(t) = self.asked.take() {
            self.node_time += t.elapsed();
        }
        if peek::bind_result(frame, f).is_some() {
            self.pacer.logged_in(&self.user, self.node, self.node_time);
            return true;
        }
        if peek::element_name(frame) == b"failure" {
            if peek::contains(frame, b"temporary-auth-failure") {
                self.pacer.overloaded(self.node);
            }
            // A failed login: its outcome is known.
            return true;
        }
        false
    }
}

/// Feeds the session tracker: the bind result from the node, broadcast
/// presence from the client.
pub struct TrackerHook {
    tracker: Arc<Tracker>,
    session: SessionInfo,
    bound: bool,
    /// The bound full JID, as the node wrote it (the address of the
    /// client's error bounces).
    full_jid: Option<String>,
}

impl StanzaHook for TrackerHook {
    fn client_stanza(&mut self, frame: &[u8], f: &Frame, _: &mut Injections) {
        if let Some(p) = Presence::peek(frame, f) {
            self.tracker.on_presence(self.session.conn, p);
        }
    }

    fn node_stanza(&mut self, frame: &[u8], f: &Frame, inject: &mut Injections) {
        if self.bound {
            return;
        }
        let Some(full) = peek::bind_result(frame, f) else {
            return;
        };
        self.bound = true;
        self.full_jid = Some(full.clone());
        // Track under the normalised bare JID, whatever case the node
        // echoed, so that one user has one entry.
        let bare = match jid::normalize_full_to_bare(&full) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(jid = %full, error = %e, "node bound a JID that is not valid; session not tracked");
                return;
            }
        };
        // The node must have logged in the user the proxy routed: anyone
        // else would sit on a node of the proxy's choosing, tracked (and
        // evicted) under the wrong name.
        if bare != *self.session.user {
            tracing::warn!(routed = %self.session.user, bound = %bare, "the node logged in another user than the one routed; stream closed");
            inject.close = Some(crate::xmpp::stream::stream_error(
                "not-authorized",
                Some(&format!(
                    "logged in as {bare}, but the login named {}; log in as the user you authenticate as",
                    self.session.user
                )),
                None,
            ));
            return;
        }
        let resource = full.split_once('/').map_or("", |(_, r)| r);
        let tracked = format!("{bare}/{resource}");
        let s = &self.session;
        self.tracker
            .on_bind(&tracked, s.home, s.node, s.conn, s.handle.clone());
        tracing::debug!(jid = %tracked, "bound");
    }
}
