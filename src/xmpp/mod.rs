//! XMPP wire handling: the sans-IO framer, stanza peeks, SASL identification
//! and the stream / stanza error builders; (feature `sim`) the properties
//! the fuzz targets check.

pub mod framer;
pub mod peek;
#[cfg(feature = "sim")]
pub mod props;
pub mod sasl;
pub mod stream;

pub use framer::{Frame, FrameError, FrameKind, Framer};
