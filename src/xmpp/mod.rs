//! XMPP wire handling: the sans-IO framer, stanza peeks, SASL identification
//! and the stream / stanza error builders.

pub mod framer;
pub mod peek;
pub mod sasl;
pub mod sm;
pub mod stream;

pub use framer::{Frame, FrameError, FrameKind, Framer};
