//! The read-only view of a running proxy for the outside (the admin API,
//! the metrics, the demo, tests): the group's view and operations, the
//! tracker, the assignment, counters, hints and pacer, and live reload.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

use crate::config::{Config, ConfigError};
use crate::failover::Hints;
use crate::group::{GroupHandle, GroupStatus, UsersCannotBeAdded};
use crate::metrics::Metrics;
use crate::node::NodeId;
use crate::presence::Registry;
use crate::reload::{ReloadReport, Reloader};
use crate::route::{AssignError, Assignment};
use crate::tracker::Tracker;
use crate::upstream::Mechanisms;

/// Why a user could not be added to the assignment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddUserError {
    /// The group is failed over (source: users cannot be added then).
    #[error(transparent)]
    DuringFailover(#[from] UsersCannotBeAdded),
    /// The assignment mode or the node does not allow it.
    #[error(transparent)]
    Assignment(#[from] crate::route::AddUserError),
    /// Not a valid bare JID (RFC 7622).
    #[error(transparent)]
    Jid(#[from] crate::jid::JidError),
}

/// What the outside (the admin surface, the demo, tests) may see and ask:
/// the group's view and operations, the tracker, the assignment, counters.
#[derive(Clone)]
pub struct ProxyView {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The group: its view and the administrator's operations.
    pub group: Arc<GroupHandle>,
    /// JSM sessions.
    pub tracker: Arc<Tracker>,
    /// Users' home nodes.
    pub assignment: Arc<Assignment>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The SASL mechanisms offered to clients.
    pub mechanisms: Arc<Mechanisms>,
    /// Re-login hints and the login pacer (rates, slots, counters).
    pub hints: Arc<Hints>,
    /// Temporary presence subscriptions kept for replay, and their counters.
    pub presence: Arc<Registry>,
    pub(crate) reloader: Arc<Reloader>,
}

impl ProxyView {
    /// Re-reads and validates the configuration file the proxy was started
    /// with and puts what can change live in force (see [`crate::reload`]).
    /// A bad file is refused, naming the key, and nothing changes.
    pub fn reload(&self) -> Result<ReloadReport, ConfigError> {
        self.reloader.reload()
    }

    /// The same with a configuration given in memory.
    pub fn reload_from(&self, config: Config) -> Result<ReloadReport, ConfigError> {
        self.reloader.apply(config)
    }

    /// The configuration in force now (`config` is the one at start).
    pub fn current_config(&self) -> Arc<Config> {
        self.reloader.config()
    }

    /// The configuration file the proxy was started with, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.reloader.path()
    }

    /// The redundancy group's current view, updated after every change.
    pub fn group_status(&self) -> watch::Receiver<GroupStatus> {
        self.group.subscribe()
    }

    /// A user's home node (`bare` is normalised first; an invalid JID has
    /// no home).
    pub fn home(&self, bare: &str) -> Result<NodeId, AssignError> {
        let key = crate::jid::normalize_bare(bare)
            .map_err(|_| AssignError::NotAssigned(bare.to_string()))?;
        self.assignment.home(&key)
    }

    /// The node with this configured name.
    pub fn node_named(&self, name: &str) -> Option<NodeId> {
        NodeId::ALL
            .into_iter()
            .zip(&self.config.nodes)
            .find(|(_, n)| n.name == name)
            .map(|(id, _)| id)
    }

    /// Adds a user to the assignment (balanced: pins the user's home;
    /// `none`: lets the user log in). Refused while a node of the group is
    /// failed over or users are moving, as the source requires.
    pub fn add_user(&self, bare: &str, node: NodeId) -> Result<(), AddUserError> {
        let bare = crate::jid::normalize_bare(bare)?;
        self.group.can_add_users()?;
        self.assignment.add(&bare, node)?;
        info!(user = %bare, node = %self.config.nodes.get(node.index()).map_or("", |n| n.name.as_str()), "user added to the assignment");
        Ok(())
    }
}
