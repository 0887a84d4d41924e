//! prg-proxy
pub mod config;
pub mod route;
pub mod tls;
pub mod xmpp;
