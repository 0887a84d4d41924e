//! prg-proxy
pub mod config;
pub mod xmpp;
