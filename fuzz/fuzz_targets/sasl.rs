//! SASL identification on arbitrary input: payload decoding, identities and
//! SCRAM saslnames (properties in `prg_proxy::xmpp::props::sasl`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| prg_proxy::xmpp::props::sasl(data));
