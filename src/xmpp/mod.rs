//! XMPP wire handling: the sans-IO framer, stanza peeks, SASL identification
//! and the stream / stanza error builders.

pub mod framer;
