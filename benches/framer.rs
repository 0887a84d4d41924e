//! Framer throughput: the proxy's hand-written framer (alone, and with the
//! tracker's peeks) against a plain quick-xml event loop over the same
//! bytes, plus allocations per stanza. Method: `benches/README.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use prg_proxy::tracker::Presence;
use prg_proxy::xmpp::framer::{Frame, FrameKind, Framer};
use prg_proxy::xmpp::peek;
use quick_xml::events::Event;

mod common;
use common::alloc;
use common::rng::Rng;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// Size of the generated corpus (a few MiB: larger than L2, so the numbers
/// include streaming from memory as a relay does).
const CORPUS_BYTES: usize = 4 << 20;

const WORDS: [&str; 12] = [
    "meeting",
    "café",
    "deploy",
    "你好",
    "tomorrow",
    "&amp;",
    "review",
    "😀",
    "&lt;ok&gt;",
    "the",
    "failover",
    "ticket",
];

fn text(rng: &mut Rng, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        s.push(' ');
    }
    s
}

/// Client traffic as Jabber clients send and receive it: messages of 200 B
/// to 2 KiB, presence with caps, IQs, roster pushes, stream-management acks,
/// after a stream header. Returns (bytes, stanzas).
pub fn corpus(target: usize) -> (Vec<u8>, usize) {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut out = String::with_capacity(target + 4096);
    out.push_str("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0' xml:lang='en'>");
    let mut n = 0usize;
    while out.len() < target {
        n += 1;
        let u = rng.below(5000);
        match rng.below(100) {
            0..=44 => {
                let size = 200 + rng.below(1848) as usize;
                let body = text(&mut rng, size.saturating_sub(190));
                out.push_str(&format!(
                    "<message type='chat' to='user{u}@example.com' id='m{n}' xml:lang='en'><body>{body}</body><active xmlns='http://jabber.org/protocol/chatstates'/><request xmlns='urn:xmpp:receipts'/></message>"
                ));
            }
            45..=69 => {
                let show = ["away", "dnd", "xa", "chat"][rng.below(4) as usize];
                let len = 20 + rng.below(40) as usize;
                let status = text(&mut rng, len);
                let to = if rng.below(4) == 0 {
                    format!(" to='user{u}@example.com'")
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "<presence id='p{n}'{to}><show>{show}</show><status>{status}</status><priority>{}</priority><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='http://cisco.com/jabber' ver='k07nuHawZqmndRtf3ZfBm54FwL0='/></presence>",
                    rng.below(20)
                ));
            }
            70..=84 => match rng.below(3) {
                0 => out.push_str(&format!(
                    "<iq type='get' id='i{n}' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>"
                )),
                1 => out.push_str(&format!(
                    "<iq type='get' id='i{n}' to='user{u}@example.com/jabber_{u}'><query xmlns='http://jabber.org/protocol/disco#info' node='http://cisco.com/jabber#k07nuHawZqmndRtf3ZfBm54FwL0='/></iq>"
                )),
                _ => out.push_str(&format!(
                    "<iq type='result' id='i{n}' to='user{u}@example.com/jabber_{u}'><vCard xmlns='vcard-temp'><FN>User {u}</FN><EMAIL><USERID>user{u}@example.com</USERID></EMAIL><TITLE>Engineer</TITLE></vCard></iq>"
                )),
            },
            85..=94 => out.push_str(&format!(
                "<iq type='set' id='push{n}'><query xmlns='jabber:iq:roster' ver='v{n}'><item jid='user{u}@example.com' name='User {u}' subscription='both'><group>Team &amp; Friends</group></item></query></iq>"
            )),
            _ => out.push_str(&format!("<a xmlns='urn:xmpp:sm:3' h='{n}'/><r xmlns='urn:xmpp:sm:3'/>")),
        }
        if rng.below(50) == 0 {
            out.push(' '); // keep-alive
        }
    }
    // Count top-level elements the way a framer does (sm acks are two).
    let stanzas = count_prg(&mut Framer::new(262_144), out.as_bytes(), false);
    let _ = n;
    (out.into_bytes(), stanzas)
}

/// Frames the whole corpus; with `peek`, also does the relay's tracker
/// peeks (name, `to`, `type`, presence children). Returns the stanza count.
fn count_prg(f: &mut Framer, bytes: &[u8], with_peek: bool) -> usize {
    // One framer per connection direction, reused: its tag stack keeps its
    // capacity, which is what "no allocation in steady state" means.
    f.reset();
    let mut off = 0;
    let mut n = 0;
    let mut acc = 0u64;
    while let Ok(Some(fr)) = f.next(&bytes[off..]) {
        let frame = &bytes[off..off + fr.len];
        if fr.kind == FrameKind::Stanza {
            n += 1;
            if with_peek {
                acc = acc.wrapping_add(peek_like_relay(frame, &fr));
            }
        }
        off += fr.len;
    }
    black_box(acc);
    n
}

/// What the relay looks at for the tracker: `to` on every stanza, and the
/// broadcast presence peek (`Presence::peek`) on presence.
fn peek_like_relay(frame: &[u8], f: &Frame) -> u64 {
    let to = peek::attr(&frame[..f.head_end], b"to").map_or(0, <[u8]>::len) as u64;
    match Presence::peek(frame, f) {
        Some(p) => to ^ p.status_hash ^ p.caps_hash ^ p.priority as u64,
        None => to,
    }
}

/// A plain quick-xml event loop: every event, depth counted to find the
/// top-level elements (what a quick-xml based framer would have to do).
fn count_quick_xml(bytes: &[u8]) -> usize {
    let mut r = quick_xml::Reader::from_reader(bytes);
    let mut depth = 0u32;
    let mut n = 0;
    loop {
        match r.read_event() {
            Ok(Event::Start(_)) => depth += 1,
            Ok(Event::End(_)) => {
                depth -= 1;
                if depth == 1 {
                    n += 1;
                }
            }
            Ok(Event::Empty(_)) => {
                if depth == 1 {
                    n += 1;
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(e) => {
                black_box(e);
            }
        }
    }
    n
}

/// Why the validating loop stopped.
#[derive(Debug)]
enum Invalid {
    Xml,
    Utf8,
    Control,
    Entity,
    Restricted,
}

/// The character-level checks the framer makes on every frame: valid
/// UTF-8 (SIMD) and no control character other than tab, CR, LF.
fn check_chars(s: &[u8]) -> Result<(), Invalid> {
    if s.iter().fold(false, |a, &b| {
        a | ((b < 0x20) & (b != b'\t') & (b != b'\n') & (b != b'\r'))
    }) {
        return Err(Invalid::Control);
    }
    simdutf8::basic::from_utf8(s).map_err(|_| Invalid::Utf8)?;
    Ok(())
}

/// Every `&…;` is one of the five predefined entities or a character
/// reference (RFC 6120 §11: no other entity), as the framer checks.
fn check_entities(s: &[u8]) -> Result<(), Invalid> {
    let mut rest = s;
    while let Some(k) = memchr::memchr(b'&', rest) {
        rest = &rest[k + 1..];
        let end = memchr::memchr(b';', rest).ok_or(Invalid::Entity)?;
        let name = &rest[..end];
        let ok = match name.strip_prefix(b"#") {
            Some(n) => match n.strip_prefix(b"x") {
                Some(h) => !h.is_empty() && h.iter().all(u8::is_ascii_hexdigit),
                None => !n.is_empty() && n.iter().all(u8::is_ascii_digit),
            },
            None => matches!(name, b"lt" | b"gt" | b"amp" | b"quot" | b"apos"),
        };
        if !ok {
            return Err(Invalid::Entity);
        }
        rest = &rest[end + 1..];
    }
    Ok(())
}

/// A quick-xml loop that checks what the framer checks, the way the framer
/// checks it: end-tag names matched (quick-xml's `check_end_names`),
/// attributes parsed, restricted XML (no DOCTYPE, comment or processing
/// instruction; the XML declaration only before the header), and once per
/// top-level element (one pass each over its bytes, as the framer does):
/// UTF-8, control characters and every entity reference.
fn count_quick_xml_validating(bytes: &[u8]) -> Result<usize, Invalid> {
    let mut r = quick_xml::Reader::from_reader(bytes);
    r.config_mut().check_end_names = true;
    let mut depth = 0u32;
    let mut n = 0;
    let mut started = false;
    // Where the current top-level element (or the header) began.
    let mut start = 0usize;
    loop {
        let before = r.buffer_position() as usize;
        let ev = r.read_event().map_err(|_| Invalid::Xml)?;
        let at = r.buffer_position() as usize;
        match ev {
            Event::Start(e) => {
                for a in e.attributes().with_checks(false) {
                    a.map_err(|_| Invalid::Xml)?;
                }
                if depth <= 1 {
                    start = before;
                }
                depth += 1;
                if depth == 1 {
                    // The stream header is a frame of its own.
                    let head = &bytes[..at];
                    check_chars(head)?;
                    check_entities(head)?;
                }
                started = true;
            }
            Event::Empty(e) => {
                for a in e.attributes().with_checks(false) {
                    a.map_err(|_| Invalid::Xml)?;
                }
                if depth == 1 {
                    let frame = &bytes[before..at];
                    check_chars(frame)?;
                    check_entities(frame)?;
                    n += 1;
                }
            }
            Event::End(_) => {
                depth -= 1;
                if depth == 1 {
                    let frame = &bytes[start..at];
                    check_chars(frame)?;
                    check_entities(frame)?;
                    n += 1;
                }
            }
            Event::Text(_) | Event::CData(_) => {}
            Event::Decl(_) if !started => {}
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_) => {
                return Err(Invalid::Restricted)
            }
            Event::Eof => {
                // What is left unframed (an open element) is checked too.
                check_chars(&bytes[start.min(at)..at])?;
                return Ok(n);
            }
        }
    }
}

/// Best of `runs` passes (least disturbed by other work on the machine).
fn best_secs(runs: usize, mut f: impl FnMut() -> usize) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn allocs_per_pass(mut f: impl FnMut() -> usize) -> u64 {
    f(); // warm: the framer's tag stack reaches its steady capacity
    let a = alloc::allocations();
    black_box(f());
    alloc::allocations() - a
}

fn main() {
    let (bytes, stanzas) = corpus(CORPUS_BYTES);
    let b = &bytes[..];
    let mut fr = Framer::new(262_144);
    assert_eq!(count_quick_xml(b), stanzas, "both count the same stanzas");
    assert_eq!(
        count_quick_xml_validating(b).expect("the corpus is valid"),
        stanzas,
        "the validating loop counts the same stanzas"
    );
    // The validating loop refuses what the framer refuses.
    for bad in [
        &b"<stream:stream><message><!-- c --></message>"[..],
        b"<stream:stream><message>&ent;</message>",
        b"<stream:stream><message>\x01</message>",
        b"<stream:stream><message>\xff</message>",
        b"<stream:stream><message></iq>",
        b"<stream:stream><?pi x?>",
        b"<!DOCTYPE x><stream:stream>",
    ] {
        assert!(count_quick_xml_validating(bad).is_err(), "{bad:?}");
        let mut f = Framer::new(1 << 16);
        let mut rest = bad;
        let mut refused = false;
        loop {
            match f.next(rest) {
                Ok(Some(fr)) => rest = &rest[fr.len..],
                Ok(None) => break,
                Err(_) => {
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "{bad:?}");
    }

    let mut c = Criterion::default()
        .without_plots()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("framer");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function("prg-framer", |bn| bn.iter(|| count_prg(&mut fr, b, false)));
        g.bench_function("prg-framer+peek", |bn| {
            bn.iter(|| count_prg(&mut fr, b, true))
        });
        g.bench_function("quick-xml-loop", |bn| bn.iter(|| count_quick_xml(b)));
        g.bench_function("quick-xml-validating", |bn| {
            bn.iter(|| count_quick_xml_validating(b).unwrap_or(0))
        });
        g.finish();
    }
    c.final_summary();

    // Ratios from this same run.
    let runs = 7;
    let mb = bytes.len() as f64 / 1e6;
    let prg = best_secs(runs, || count_prg(&mut fr, b, false));
    let prg_peek = best_secs(runs, || count_prg(&mut fr, b, true));
    let qx = best_secs(runs, || count_quick_xml(b));
    let qv = best_secs(runs, || count_quick_xml_validating(b).unwrap_or(0));
    let a_prg = allocs_per_pass(|| count_prg(&mut fr, b, true));
    let a_qx = allocs_per_pass(|| count_quick_xml(b));
    let a_qv = allocs_per_pass(|| count_quick_xml_validating(b).unwrap_or(0));
    println!();
    println!(
        "SUMMARY framer: corpus {:.1} MB, {stanzas} stanzas (avg {} B), best of {runs}",
        mb,
        bytes.len() / stanzas
    );
    for (name, s, a) in [
        ("prg-framer", prg, a_prg),
        ("prg-framer+peek", prg_peek, a_prg),
        ("quick-xml-loop", qx, a_qx),
        ("quick-xml-valid", qv, a_qv),
    ] {
        println!(
            "SUMMARY framer: {name:<16} {:>8.1} MB/s {:>7.2} M stanzas/s  allocations/stanza {:.4}",
            mb / s,
            stanzas as f64 / s / 1e6,
            a as f64 / stanzas as f64
        );
    }
    println!(
        "SUMMARY framer: ratio prg/quick-xml {:.2}x (with peeks {:.2}x)  [bare loop, validates nothing; goal >= 0.5x]",
        qx / prg,
        qx / prg_peek
    );
    println!(
        "SUMMARY framer: ratio prg/quick-xml-validating {:.2}x (with peeks {:.2}x)  [same checks; goal >= 1.0x, >= 400 MB/s, 0 allocations/stanza]",
        qv / prg,
        qv / prg_peek
    );
}
