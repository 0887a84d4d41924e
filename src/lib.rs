//! prg-proxy

pub mod group;
