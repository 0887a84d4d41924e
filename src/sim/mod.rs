//! Built-in simulated IM&P node and a test client.
//!
//! [`SimNode`] is a small XMPP c2s server that behaves on the wire like
//! Prosody (stream features, STARTTLS, SASL PLAIN and SCRAM-SHA-1, resource
//! binding, roster, presence and message routing, stream errors);
//! [`SimPair`] joins two nodes of a presence redundancy group so that users
//! on either node see each other. [`SimClient`] is the client used by the
//! tests, the demo and the benches; it speaks the standard protocol and also
//! works through the proxy and against a real server. [`Relogin`] reads the
//! proxy's re-login hint and [`ReconnectPolicy`] decides when a simulated
//! client comes back.

#![warn(missing_docs)]

pub mod bench;
pub mod client;
pub mod node;
pub mod reconnect;
mod scram;
mod stream;
mod xml;

pub use client::{ClientError, ClientTls, SimClient, Stanza, TempPush};
pub use node::{
    LoginCapacity, PlainAuthzid, Roster, SimNode, SimNodeConfig, SimPair, NS_TEMP_PRESENCE,
    TEMP_PRESENCE_NOTIFY,
};
pub use reconnect::{ReconnectPolicy, Relogin};
