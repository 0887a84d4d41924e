//! Everything a configuration must pass before anything is bound: the
//! checks of [`Config::validate`], then what needs the file system — the
//! client-facing certificates and keys (each key must match its
//! certificate), the assignment file, the node definitions. `prg-proxy
//! check` and `prg-proxy run` both call [`load`], so `check` says ok
//! exactly when `run` would start (binding the ports aside).

use std::collections::HashMap;

use crate::config::{Config, ConfigError};
use crate::node::NodeId;
use crate::route::Assignment;
use crate::tls::{server_tls, ServerTls};
use crate::upstream::Nodes;

/// What the configuration names, loaded.
pub struct Loaded {
    /// The client-facing TLS configurations.
    pub tls: ServerTls,
    /// Users' home nodes (with the assignment file's overrides).
    pub assignment: Assignment,
    /// The nodes.
    pub nodes: Nodes,
}

/// Validates `config` and loads everything it names.
pub fn load(config: &Config) -> Result<Loaded, ConfigError> {
    config.validate()?;
    let tls = server_tls(&config.tls)?;
    let overrides: HashMap<String, NodeId> = config
        .load_assignment_overrides()?
        .into_iter()
        .filter_map(|(jid, i)| NodeId::from_index(i).map(|n| (jid, n)))
        .collect();
    let assignment = Assignment::new(config.group.assignment, &config.node_names(), overrides);
    let nodes = Nodes::from_config(config)?;
    Ok(Loaded {
        tls,
        assignment,
        nodes,
    })
}
