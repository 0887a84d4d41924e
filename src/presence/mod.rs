//! Temporary presence (Cisco Jabber) that survives failover, fallback and
//! user moves.
//!
//! A watcher subscribes to a target's temporary presence with directed
//! presence whose caps `ver` has the feature
//! `http://webex.com/connect/temp-presence+notify`; the subscription lives
//! in the memory of the target's node, which forgets it, without telling
//! the watcher, when it fails or the target moves off it. The
//! [`Registry`] remembers every (watcher, target) pair from the stanza
//! hooks and, when the target (or the watcher) is bound again, replays the
//! watcher's directed presence through the watcher's own stream: no sooner
//! than `min_interval` (30 s) after the pair's last subscribe or
//! unsubscribe, at a bounded global rate, and not when the client
//! resubscribed by itself first. It answers the node's disco#info for a
//! cached caps `ver` when the client no longer does.

mod hook;
pub mod registry;

use std::sync::Arc;

pub use hook::PresenceHook;
pub use registry::{Registry, Stats};

use crate::connection::hooks::{HookFactory, SessionInfo, StanzaHook};

/// Builds each session's [`PresenceHook`] over one registry.
pub struct PresenceHooks(pub Arc<Registry>);

impl HookFactory for PresenceHooks {
    fn hook(&self, session: &SessionInfo) -> Box<dyn StanzaHook> {
        Box::new(PresenceHook::new(self.0.clone(), session))
    }
}
