//! Stream headers and features on arbitrary input (properties in
//! `prg_proxy::xmpp::props::stream_header`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| prg_proxy::xmpp::props::stream_header(data));
