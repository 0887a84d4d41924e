//! Frames arbitrary bytes after a stream header, split at an input-chosen
//! point and whole: the same frames either way, none past the limit, each
//! stanza well-formed restricted XML to a real parser (properties in
//! `prg_proxy::xmpp::props::framer`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| prg_proxy::xmpp::props::framer(data));
