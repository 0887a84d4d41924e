//! prg-proxy
