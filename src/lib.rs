//! prg-proxy
pub mod sim;
