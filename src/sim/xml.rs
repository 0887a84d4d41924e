//! Minimal XMPP stream framing and a tiny element tree, shared by the simulated
//! node and the test client.
//!
//! The [`Framer`] splits an incoming byte stream into stream headers, stream
//! closes and complete top-level elements without building any tree; it also
//! enforces RFC 6120 §11 restricted XML (no DTD, comments or processing
//! instructions) and a per-stanza size limit. [`parse_element`] then turns one
//! complete element into an [`Element`] with quick-xml, which checks
//! well-formedness (matching end tags, attribute syntax, entities).

use bytes::{Bytes, BytesMut};
use quick_xml::events::Event;
use quick_xml::Reader;

/// Why a stream had to be ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XmlError {
    /// Not well-formed XML.
    NotWellFormed,
    /// DTD, comment, processing instruction or unknown entity.
    RestrictedXml,
    /// Stanza larger than the limit.
    PolicyViolation,
}

impl XmlError {
    /// The RFC 6120 stream error condition for this error.
    pub(crate) fn condition(self) -> &'static str {
        match self {
            XmlError::NotWellFormed => "not-well-formed",
            XmlError::RestrictedXml => "restricted-xml",
            XmlError::PolicyViolation => "policy-violation",
        }
    }
}

/// One unit of a stream.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A `<stream:stream ...>` open tag (the bytes of the tag).
    StreamOpen(Bytes),
    /// `</stream:stream>`.
    StreamClose,
    /// A complete top-level element.
    Element(Bytes),
}

/// Incremental splitter of an XMPP stream into [`Frame`]s.
#[derive(Debug)]
pub(crate) struct Framer {
    buf: BytesMut,
    /// Scan position inside `buf`.
    pos: usize,
    /// Element depth inside the current top-level element.
    depth: usize,
    /// Start of the current top-level element, if one is open.
    start: Option<usize>,
    max: usize,
    /// An XML declaration is allowed (before a stream header).
    allow_decl: bool,
    /// Name ranges (in `buf`) of the open elements of the current stanza.
    open: Vec<(usize, usize)>,
}

impl Framer {
    /// A framer with the given per-stanza byte limit.
    pub(crate) fn new(max: usize) -> Self {
        Framer {
            buf: BytesMut::with_capacity(8192),
            pos: 0,
            depth: 0,
            start: None,
            max: max.max(1024),
            allow_decl: true,
            open: Vec::new(),
        }
    }

    /// The read buffer, to append incoming bytes to.
    pub(crate) fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Forget all state and buffered bytes (after a TLS upgrade).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.reset();
    }

    /// Buffered bytes that are not whitespace and not yet a complete frame.
    pub(crate) fn unframed(&self) -> usize {
        trim(&self.buf).len()
    }

    /// Expect a new stream header (stream restart); keeps buffered bytes.
    pub(crate) fn reset(&mut self) {
        self.depth = 0;
        self.start = None;
        self.open.clear();
        self.allow_decl = true;
        // Bytes before `pos` that are not part of an element were already
        // consumed; the scan restarts at the next top-level position.
        let _ = self.buf.split_to(self.pos);
        self.pos = 0;
    }

    fn take(&mut self, start: usize, end: usize) -> Result<Option<Frame>, XmlError> {
        if end - start > self.max {
            return Err(XmlError::PolicyViolation);
        }
        Ok(Some(Frame::Element(self.take_bytes(start, end))))
    }

    fn take_bytes(&mut self, start: usize, end: usize) -> Bytes {
        let chunk = self.buf.split_to(end).freeze();
        self.pos = 0;
        self.start = None;
        self.depth = 0;
        self.open.clear();
        chunk.slice(start..)
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, XmlError> {
        loop {
            let len = self.buf.len();
            if self.start.is_none() {
                // Between top-level elements: skip whitespace (keep-alives).
                while self.pos < len && matches!(self.buf[self.pos], b' ' | b'\t' | b'\r' | b'\n') {
                    self.pos += 1;
                }
                if self.pos >= len {
                    self.buf.clear();
                    self.pos = 0;
                    return Ok(None);
                }
                if self.buf[self.pos] != b'<' {
                    return Err(XmlError::NotWellFormed);
                }
            } else {
                // Inside an element: skip character data up to the next tag.
                match self.buf[self.pos..].iter().position(|&b| b == b'<') {
                    Some(off) => self.pos += off,
                    None => {
                        self.pos = len;
                        return self.need_more();
                    }
                }
            }
            // self.buf[self.pos] == b'<'
            let tag = self.pos;
            let rest = &self.buf[tag..];
            if rest.len() < 2 {
                return self.need_more();
            }
            match rest[1] {
                b'/' => {
                    let Some(off) = rest.iter().position(|&b| b == b'>') else {
                        return self.need_more();
                    };
                    let end = tag + off + 1;
                    if self.start.is_none() {
                        let name = trim(&self.buf[tag + 2..end - 1]);
                        if name == b"stream:stream" {
                            let _ = self.buf.split_to(end);
                            self.pos = 0;
                            return Ok(Some(Frame::StreamClose));
                        }
                        return Err(XmlError::NotWellFormed);
                    }
                    let name = trim(&self.buf[tag + 2..end - 1]);
                    match self.open.pop() {
                        Some((s, e)) if self.buf[s..e] == *name => {}
                        _ => return Err(XmlError::NotWellFormed),
                    }
                    self.depth = self.depth.saturating_sub(1);
                    self.pos = end;
                    if self.depth == 0 {
                        let start = self.start.unwrap_or(tag);
                        return self.take(start, end);
                    }
                }
                b'?' => {
                    let Some(off) = find(rest, b"?>") else {
                        return self.need_more();
                    };
                    let end = tag + off + 2;
                    let is_decl = rest.len() > 5
                        && &rest[2..5] == b"xml"
                        && matches!(rest[5], b' ' | b'\t' | b'\r' | b'\n' | b'?');
                    if self.start.is_none() && self.allow_decl && is_decl {
                        self.allow_decl = false;
                        let _ = self.buf.split_to(end);
                        self.pos = 0;
                        continue;
                    }
                    return Err(XmlError::RestrictedXml);
                }
                b'!' => {
                    const CDATA: &[u8] = b"<![CDATA[";
                    if rest.starts_with(b"<!--")
                        || rest.starts_with(b"<!D")
                        || rest.starts_with(b"<!d")
                    {
                        return Err(XmlError::RestrictedXml);
                    }
                    if self.start.is_some() && rest.len() >= CDATA.len() && rest.starts_with(CDATA)
                    {
                        let Some(off) = find(rest, b"]]>") else {
                            return self.need_more();
                        };
                        self.pos = tag + off + 3;
                        continue;
                    }
                    if rest.len() < CDATA.len()
                        && (CDATA.starts_with(rest) || b"<!-".starts_with(rest))
                    {
                        return self.need_more();
                    }
                    // Any other markup declaration (ENTITY, ELEMENT, ...) is a DTD part.
                    return Err(XmlError::RestrictedXml);
                }
                c if !(c.is_ascii_alphabetic() || c == b'_' || c == b':' || c >= 0x80) => {
                    return Err(XmlError::NotWellFormed);
                }
                _ => {
                    let Some(off) = tag_end(rest) else {
                        return self.need_more();
                    };
                    let end = tag + off + 1;
                    let self_closing = off > 0 && rest[off - 1] == b'/';
                    self.allow_decl = false;
                    let name_end = rest[1..]
                        .iter()
                        .position(|&b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'/' | b'>'))
                        .map(|p| p + 1)
                        .unwrap_or(rest.len());
                    if name_end == 1 {
                        return Err(XmlError::NotWellFormed);
                    }
                    if !self_closing {
                        self.open.push((tag + 1, tag + name_end));
                    }
                    if self.start.is_none() {
                        if &rest[1..name_end] == b"stream:stream" && !self_closing {
                            self.open.clear();
                            let header = self.buf.split_to(end).freeze().slice(tag..);
                            self.pos = 0;
                            return Ok(Some(Frame::StreamOpen(header)));
                        }
                        self.start = Some(tag);
                        if self_closing {
                            return self.take(tag, end);
                        }
                        self.depth = 1;
                    } else if !self_closing {
                        self.depth += 1;
                    }
                    self.pos = end;
                }
            }
        }
    }

    /// Called when the buffered bytes end inside an item: checks the size limit.
    fn need_more(&mut self) -> Result<Option<Frame>, XmlError> {
        let from = self.start.unwrap_or(self.pos);
        if self.buf.len().saturating_sub(from) > self.max {
            return Err(XmlError::PolicyViolation);
        }
        // `pos` stays at the '<' of an incomplete tag: it is re-scanned next time.
        Ok(None)
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let s = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let e = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map(|p| p + 1)
        .unwrap_or(s);
    &b[s..e.max(s)]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Index of the `>` closing the start tag at the beginning of `b`, honouring quotes.
pub(crate) fn tag_end(b: &[u8]) -> Option<usize> {
    let mut quote = 0u8;
    for (i, &c) in b.iter().enumerate().skip(1) {
        if quote != 0 {
            if c == quote {
                quote = 0;
            }
        } else if c == b'"' || c == b'\'' {
            quote = c;
        } else if c == b'>' {
            return Some(i);
        }
    }
    None
}

/// A parsed element: qualified name, unescaped attributes, children and text.
#[derive(Debug, Clone, Default)]
pub(crate) struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    /// Attribute value by qualified name.
    pub(crate) fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    /// Local name (without prefix).
    pub(crate) fn local(&self) -> &str {
        local_name(&self.name)
    }

    /// The `xmlns` attribute.
    pub(crate) fn ns(&self) -> Option<&str> {
        self.attr("xmlns")
    }

    /// First direct child with this local name.
    pub(crate) fn child(&self, local: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.local() == local)
    }

    /// First direct child with this local name and namespace.
    pub(crate) fn child_ns(&self, local: &str, ns: &str) -> Option<&Element> {
        self.children
            .iter()
            .find(|c| c.local() == local && c.ns() == Some(ns))
    }

    /// Depth-first search for a descendant with this local name.
    pub(crate) fn find(&self, local: &str) -> Option<&Element> {
        for c in &self.children {
            if c.local() == local {
                return Some(c);
            }
            if let Some(f) = c.find(local) {
                return Some(f);
            }
        }
        None
    }
}

/// Strip a namespace prefix.
pub(crate) fn local_name(q: &str) -> &str {
    q.rsplit(':').next().unwrap_or(q)
}

fn map_err(e: quick_xml::Error) -> XmlError {
    match e {
        quick_xml::Error::Escape(quick_xml::escape::EscapeError::UnrecognizedEntity(..)) => {
            XmlError::RestrictedXml
        }
        _ => XmlError::NotWellFormed,
    }
}

fn utf8(b: &[u8]) -> Result<&str, XmlError> {
    std::str::from_utf8(b).map_err(|_| XmlError::NotWellFormed)
}

fn read_attrs(e: &quick_xml::events::BytesStart<'_>) -> Result<Vec<(String, String)>, XmlError> {
    let mut out = Vec::new();
    for a in e.attributes().with_checks(true) {
        let a = a.map_err(|_| XmlError::NotWellFormed)?;
        let k = utf8(a.key.as_ref())?.to_owned();
        let v = a.unescape_value().map_err(map_err)?.into_owned();
        out.push((k, v));
    }
    Ok(out)
}

/// Parse just the start tag of `bytes` (e.g. a stream header).
pub(crate) fn parse_start(bytes: &[u8]) -> Result<(String, Vec<(String, String)>), XmlError> {
    let mut r = Reader::from_reader(bytes);
    loop {
        match r.read_event().map_err(map_err)? {
            Event::Start(e) | Event::Empty(e) => {
                let name = utf8(e.name().as_ref())?.to_owned();
                return Ok((name, read_attrs(&e)?));
            }
            Event::Decl(_) | Event::Text(_) => continue,
            _ => return Err(XmlError::NotWellFormed),
        }
    }
}

/// Parse one complete element.
pub(crate) fn parse_element(bytes: &[u8]) -> Result<Element, XmlError> {
    let mut r = Reader::from_reader(bytes);
    let mut stack: Vec<Element> = Vec::new();
    loop {
        let ev = r.read_event().map_err(map_err)?;
        match ev {
            Event::Start(e) => {
                let name = utf8(e.name().as_ref())?.to_owned();
                stack.push(Element {
                    name,
                    attrs: read_attrs(&e)?,
                    ..Element::default()
                });
            }
            Event::Empty(e) => {
                let name = utf8(e.name().as_ref())?.to_owned();
                let el = Element {
                    name,
                    attrs: read_attrs(&e)?,
                    ..Element::default()
                };
                match stack.last_mut() {
                    Some(p) => p.children.push(el),
                    None => return Ok(el),
                }
            }
            Event::End(_) => {
                let Some(el) = stack.pop() else {
                    return Err(XmlError::NotWellFormed);
                };
                match stack.last_mut() {
                    Some(p) => p.children.push(el),
                    None => return Ok(el),
                }
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(map_err)?;
                match stack.last_mut() {
                    Some(p) => p.text.push_str(&s),
                    None if s.trim().is_empty() => {}
                    None => return Err(XmlError::NotWellFormed),
                }
            }
            Event::CData(t) => {
                let s = utf8(&t)?;
                match stack.last_mut() {
                    Some(p) => p.text.push_str(s),
                    None => return Err(XmlError::NotWellFormed),
                }
            }
            Event::Comment(_) | Event::PI(_) | Event::DocType(_) | Event::Decl(_) => {
                return Err(XmlError::RestrictedXml)
            }
            Event::Eof => return Err(XmlError::NotWellFormed),
        }
    }
}

/// Escape text or an attribute value.
pub(crate) fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], chunk: usize) -> Vec<String> {
        let mut f = Framer::new(1 << 20);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            f.buf_mut().extend_from_slice(c);
            while let Some(fr) = f.next_frame().expect("frame") {
                if let Frame::Element(b) = &fr {
                    if b.starts_with(b"<success") {
                        f.reset();
                    }
                }
                out.push(match fr {
                    Frame::StreamOpen(b) => format!("OPEN {}", String::from_utf8_lossy(&b)),
                    Frame::StreamClose => "CLOSE".to_owned(),
                    Frame::Element(b) => String::from_utf8_lossy(&b).into_owned(),
                });
            }
        }
        out
    }

    #[test]
    fn captures_frame_identically_in_any_chunking() {
        for file in [
            "alice-scram-sha1.c2s.xml",
            "alice-scram-sha1.s2c.xml",
            "bob-scram-sha256.s2c.xml",
        ] {
            let path = format!("/work/shared/fixtures/captures/{file}");
            let Ok(data) = std::fs::read(&path) else {
                continue;
            };
            let whole = frames(&data, data.len());
            assert!(whole.len() > 10);
            for chunk in [1, 3, 7, 64] {
                let mut f = Framer::new(1 << 20);
                let mut out = Vec::new();
                for c in data.chunks(chunk) {
                    f.buf_mut().extend_from_slice(c);
                    while let Some(fr) = f.next_frame().expect("frame") {
                        if let Frame::Element(b) = &fr {
                            if b.starts_with(b"<success") {
                                f.reset();
                            }
                        }
                        out.push(fr);
                    }
                }
                assert_eq!(out.len(), whole.len(), "{file} chunk {chunk}");
            }
            for s in &whole {
                if !s.starts_with("OPEN") && s != "CLOSE" {
                    parse_element(s.as_bytes()).expect("parse");
                }
            }
        }
    }

    #[test]
    fn splits_and_restricts() {
        let out = frames(b"<?xml version='1.0'?><stream:stream to='a'> <a x='>'><b/>t&amp;</a>\n<c/></stream:stream>", 2);
        assert_eq!(
            out,
            vec![
                "OPEN <stream:stream to='a'>",
                "<a x='>'><b/>t&amp;</a>",
                "<c/>",
                "CLOSE"
            ]
        );
        let mut f = Framer::new(4096);
        f.buf_mut()
            .extend_from_slice(b"<stream:stream><!DOCTYPE x>");
        assert!(matches!(f.next_frame(), Ok(Some(Frame::StreamOpen(_)))));
        assert_eq!(f.next_frame().unwrap_err(), XmlError::RestrictedXml);
        let mut f = Framer::new(1024);
        f.buf_mut()
            .extend_from_slice(b"<stream:stream><message><body>");
        f.buf_mut().extend_from_slice(&[b'a'; 2000]);
        assert!(matches!(f.next_frame(), Ok(Some(Frame::StreamOpen(_)))));
        assert_eq!(f.next_frame().unwrap_err(), XmlError::PolicyViolation);
        assert_eq!(
            parse_element(b"<a>&foo;</a>").unwrap_err(),
            XmlError::RestrictedXml
        );
        assert_eq!(
            parse_element(b"<a><b></a>").unwrap_err(),
            XmlError::NotWellFormed
        );
        let e = parse_element(b"<a x='&lt;'><b>hi &amp; you</b></a>").expect("ok");
        assert_eq!(e.attr("x"), Some("<"));
        assert_eq!(e.child("b").map(|b| b.text.as_str()), Some("hi & you"));
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let seed = std::fs::read("/work/shared/fixtures/captures/alice-scram-sha1.c2s.xml")
            .unwrap_or_else(|_| {
                b"<stream:stream><message to='a'><body>x &amp; y</body></message>".to_vec()
            });
        let alphabet = b"<>/?!-='\"&;: abcxDOCTYPE[]CDATA\n";
        for round in 0..3000 {
            let mut data = seed.clone();
            for _ in 0..rng.gen_range(1..20) {
                let i = rng.gen_range(0..data.len());
                match rng.gen_range(0..3) {
                    0 => data[i] = alphabet[rng.gen_range(0..alphabet.len())],
                    1 => data.insert(i, rng.gen()),
                    _ => {
                        data.remove(i);
                    }
                }
            }
            if round % 10 == 0 {
                data = (0..rng.gen_range(0..400))
                    .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                    .collect();
            }
            let mut f = Framer::new(4096);
            for c in data.chunks(rng.gen_range(1..64)) {
                f.buf_mut().extend_from_slice(c);
                loop {
                    match f.next_frame() {
                        Ok(Some(Frame::Element(b))) => {
                            let _ = parse_element(&b);
                        }
                        Ok(Some(Frame::StreamOpen(b))) => {
                            let _ = parse_start(&b);
                        }
                        Ok(Some(Frame::StreamClose)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
    }
}
