//! Properties of the wire parsers, checked on arbitrary input by the
//! `cargo fuzz` targets (`fuzz/fuzz_targets/*.rs`, one line each) and by
//! `tests/fuzz_corpus.rs`, which replays every committed corpus file
//! (`fuzz/corpus/<target>/`) through the same functions on every
//! `cargo test`. Each function panics on a violation (the fuzzer's and the
//! test's signal), never on input the property allows.
//!
//! - [`framer`]: frames input split at an input-chosen point and whole;
//!   both give the same frames and the same end; no frame beyond the limit;
//!   every stanza is one well-formed element to a real XML parser
//!   (quick-xml: end names, attribute syntax and duplicates, entities and
//!   character references that name XML characters) with no comment,
//!   processing instruction or DTD.
//! - [`sasl`]: [`super::sasl::decode_payload`] accepts exactly canonical
//!   base64; [`super::sasl::identify`] and [`super::sasl::bare_jid`] give
//!   normalised bare JIDs (normalising again changes nothing);
//!   [`super::sasl::unescape_saslname`] is undone by RFC 5802 escaping.
//! - [`stream_header`]: [`super::stream::parse_header`] and
//!   [`super::stream::parse_features`] never panic; what they read survives
//!   the proxy's own builders (escaping) unchanged.

use base64::Engine;
use quick_xml::events::{BytesStart, Event};

use super::framer::{FrameError, FrameKind, Framer};
use super::{sasl as s, stream};

/// The stanza size limit of the framer property.
pub const FRAMER_LIMIT: usize = 4096;

const HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

/// Frames and how the input ended (`None`: incomplete, waiting for more).
type Framed = (Vec<(FrameKind, Vec<u8>)>, Option<FrameError>);

/// The framer property. The first byte chooses where the input is split
/// between two reads; the input follows a client stream header.
pub fn framer(data: &[u8]) {
    let cut = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let mut input = HEADER.to_vec();
    input.extend_from_slice(data);
    let cut = HEADER.len() + cut;
    let whole = frame(&input, input.len());
    let split = frame(&input, cut);
    assert_eq!(
        whole, split,
        "framing depends on where reads split the input"
    );
    let (frames, _) = whole;
    let mut consumed = 0;
    for (kind, bytes) in &frames {
        consumed += bytes.len();
        assert!(!bytes.is_empty(), "empty frame");
        match kind {
            FrameKind::Header => {}
            FrameKind::Stanza => {
                assert!(bytes.len() <= FRAMER_LIMIT, "frame over the limit");
                if let Err(why) = well_formed(bytes) {
                    panic!(
                        "the framer passed XML a parser refuses ({why}): {:?}",
                        String::from_utf8_lossy(bytes)
                    );
                }
            }
            FrameKind::Whitespace => assert!(bytes.iter().all(|b| b" \t\r\n".contains(b))),
            FrameKind::Close => assert!(bytes.starts_with(b"</")),
        }
    }
    let joined: Vec<u8> = frames.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    assert_eq!(input[..consumed], joined[..], "frames are the input");
}

/// Frames `input` fed in two reads (`..cut`, then the rest); whitespace
/// frames are merged (a keep-alive is delivered as soon as it arrives).
fn frame(input: &[u8], cut: usize) -> Framed {
    let mut f = Framer::new(FRAMER_LIMIT);
    let mut buf = input[..cut].to_vec();
    let mut out: Vec<(FrameKind, Vec<u8>)> = Vec::new();
    let mut fed = cut == input.len();
    loop {
        match f.next(&buf) {
            Ok(Some(fr)) => {
                assert!(fr.len > 0 && fr.len <= buf.len());
                assert!(fr.head_end <= fr.len && fr.name_start + fr.name_len <= fr.len);
                let bytes: Vec<u8> = buf.drain(..fr.len).collect();
                match out.last_mut() {
                    Some((FrameKind::Whitespace, prev)) if fr.kind == FrameKind::Whitespace => {
                        prev.extend_from_slice(&bytes)
                    }
                    _ => out.push((fr.kind, bytes)),
                }
            }
            Ok(None) if !fed => {
                buf.extend_from_slice(&input[cut..]);
                fed = true;
            }
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Whether `xml` is one well-formed element under RFC 6120 §11's
/// restrictions, to quick-xml; the reason if not.
pub fn well_formed(xml: &[u8]) -> Result<(), String> {
    let mut r = quick_xml::Reader::from_reader(xml);
    r.config_mut().check_end_names = true;
    let mut depth = 0u32;
    let mut roots = 0u32;
    loop {
        let ev = r.read_event().map_err(|e| e.to_string())?;
        match ev {
            Event::Start(e) => {
                attributes(&e)?;
                if depth == 0 {
                    roots += 1;
                }
                depth += 1;
            }
            Event::Empty(e) => {
                attributes(&e)?;
                if depth == 0 {
                    roots += 1;
                }
            }
            Event::End(_) => depth = depth.checked_sub(1).ok_or("unbalanced end tag")?,
            Event::Text(t) => {
                if depth == 0 {
                    return Err("text outside the element".into());
                }
                let text = t.unescape().map_err(|e| e.to_string())?;
                xml_chars(&text)?;
            }
            Event::CData(c) => {
                if depth == 0 {
                    return Err("CDATA outside the element".into());
                }
                let text = std::str::from_utf8(&c).map_err(|e| e.to_string())?;
                xml_chars(text)?;
            }
            Event::Comment(_) => return Err("comment".into()),
            Event::PI(_) | Event::Decl(_) => return Err("processing instruction".into()),
            Event::DocType(_) => return Err("document type declaration".into()),
            Event::Eof => break,
        }
    }
    if depth != 0 || roots != 1 {
        return Err(format!("{roots} elements, {depth} left open"));
    }
    Ok(())
}

fn attributes(e: &BytesStart<'_>) -> Result<(), String> {
    std::str::from_utf8(e.name().as_ref()).map_err(|e| e.to_string())?;
    for a in e.attributes().with_checks(true) {
        let a = a.map_err(|e| e.to_string())?;
        let v = a.unescape_value().map_err(|e| e.to_string())?;
        xml_chars(&v)?;
    }
    Ok(())
}

/// XML 1.0 `Char`: no control characters but tab, LF and CR, no U+FFFE /
/// U+FFFF (surrogates cannot be in a `str`).
fn xml_chars(s: &str) -> Result<(), String> {
    match s.chars().find(|c| !is_xml_char(*c as u32)) {
        Some(c) => Err(format!("U+{:04X} is not an XML character", c as u32)),
        None => Ok(()),
    }
}

/// Whether the code point `c` is an XML 1.0 `Char`.
pub fn is_xml_char(c: u32) -> bool {
    matches!(c, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

/// Mechanisms the SASL property tries; the first input byte picks one.
const MECHANISMS: [&str; 6] = [
    "PLAIN",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1-PLUS",
    "EXTERNAL",
    "",
];

/// The SASL identification property. The first byte picks the mechanism;
/// the rest is tried as the base64 text of `<auth>`, as the decoded
/// response, as a SASL identity and as a SCRAM saslname.
pub fn sasl(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let mechanism = MECHANISMS[pick as usize % MECHANISMS.len()];
    let text = String::from_utf8_lossy(rest);
    const DOMAIN: &str = "example.com";

    match s::decode_payload(&text) {
        Ok(bytes) => {
            let t = text.trim();
            if t == "=" {
                assert!(bytes.is_empty());
            } else {
                let again = base64::engine::general_purpose::STANDARD.encode(&bytes);
                assert_eq!(again, t, "decoded base64 that is not canonical");
            }
            identified(mechanism, &bytes);
        }
        Err(s::IdentifyError::NoInitialResponse) => assert!(text.trim().is_empty()),
        Err(s::IdentifyError::Encoding) => {}
        Err(e) => panic!("decode_payload: unexpected {e:?}"),
    }
    identified(mechanism, rest);

    match s::bare_jid(&text, DOMAIN) {
        Ok(jid) => normalised(&jid),
        Err(s::IdentifyError::InvalidJid(_)) => {}
        Err(e) => panic!("bare_jid: unexpected {e:?}"),
    }

    // A saslname never holds a raw `,` (it ends the SCRAM field).
    if !text.contains(',') {
        if let Ok(name) = s::unescape_saslname(&text) {
            let escaped = name.replace('=', "=3D").replace(',', "=2C");
            assert_eq!(
                escaped, text,
                "saslname unescaping is not undone by escaping"
            );
        }
    }
}

fn identified(mechanism: &str, response: &[u8]) {
    match s::identify(mechanism, response, "example.com") {
        Ok(jid) => {
            assert!(s::names_user(mechanism), "{mechanism} named a user");
            normalised(&jid);
        }
        Err(s::IdentifyError::UnsupportedMechanism(_)) => assert!(!s::names_user(mechanism)),
        Err(s::IdentifyError::NoInitialResponse | s::IdentifyError::Encoding) => {
            panic!("identify reports a payload error")
        }
        Err(_) => {}
    }
}

/// A bare JID as the proxy routes it: `local@domain`, normalised.
fn normalised(jid: &str) {
    assert!(!jid.contains('/'), "a resource in {jid:?}");
    assert!(jid.contains('@'), "no localpart in {jid:?}");
    assert_eq!(
        s::bare_jid(jid, "example.com").as_deref(),
        Ok(jid),
        "normalising {jid:?} again changes it"
    );
}

/// The stream header and features property: the input is parsed as a
/// header and as features, and what is read is written with the proxy's
/// builders and read back unchanged.
pub fn stream_header(data: &[u8]) {
    if let Ok(h) = stream::parse_header(data) {
        let _ = h.version_ok();
        let to = h.to.as_deref().unwrap_or("");
        let back = stream::parse_header(stream::client_header(to, h.from.as_deref()).as_bytes())
            .unwrap_or_else(|e| panic!("the proxy's own header does not parse: {e}"));
        assert_eq!(back.to.as_deref(), Some(to));
        assert_eq!(back.from, h.from);
        assert!(back.version_ok());
        let id = h.id.as_deref().unwrap_or("");
        let back = stream::parse_header(stream::server_header(to, id).as_bytes())
            .unwrap_or_else(|e| panic!("the proxy's own header does not parse: {e}"));
        assert_eq!(back.id.as_deref(), Some(id));
    }
    if let Ok(f) = stream::parse_features(data) {
        assert!(
            f.starttls || !f.starttls_required,
            "required without starttls"
        );
        for m in &f.mechanisms {
            assert!(!m.is_empty() && m.trim() == m, "mechanism {m:?}");
        }
        let offered = stream::features_sasl(&f.mechanisms, 1000, Some("host"));
        let back = stream::parse_features(offered.as_bytes())
            .unwrap_or_else(|e| panic!("the proxy's own features do not parse: {e}"));
        let no_plus: Vec<String> = f
            .mechanisms
            .iter()
            .filter(|m| !m.ends_with("-PLUS"))
            .cloned()
            .collect();
        assert_eq!(back.mechanisms, no_plus);
        assert!(!back.starttls);
    }
    if let Some(without) = stream::features_without_starttls(data) {
        assert!(without.len() < data.len());
    }
}
