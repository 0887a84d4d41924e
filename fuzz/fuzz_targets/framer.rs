//! Frames arbitrary bytes split at an arbitrary point; every emitted stanza
//! must be well-formed XML to a real parser, and the framer must never panic
//! or grow past its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prg_proxy::xmpp::{FrameKind, Framer};

const HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let mut framer = Framer::new(4096);
    let mut buf = HEADER.to_vec();
    buf.extend_from_slice(&data[..cut]);
    let mut fed = false;
    loop {
        match framer.next(&buf) {
            Ok(Some(f)) => {
                assert!(f.len <= 4096 || f.kind == FrameKind::Header);
                if f.kind == FrameKind::Stanza {
                    let mut r = quick_xml::Reader::from_reader(&buf[..f.len]);
                    loop {
                        match r.read_event() {
                            Ok(quick_xml::events::Event::Eof) => break,
                            Ok(_) => {}
                            Err(e) => panic!("framer emitted bad XML: {e}"),
                        }
                    }
                }
                buf.drain(..f.len);
            }
            Ok(None) if !fed => {
                buf.extend_from_slice(&data[cut..]);
                fed = true;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
