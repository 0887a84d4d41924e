//! prg-proxy
pub mod config;
pub mod route;
pub mod tls;
pub mod tracker;
pub mod upstream;
pub mod xmpp;
