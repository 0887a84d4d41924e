//! The per-byte state machine the framer's fast paths must agree with:
//! every input, however it is split into reads, must give the same frames
//! and the same error from both.
#![allow(dead_code)]

use super::{Frame, FrameError, FrameKind, DEFAULT_MAX_ATTRIBUTES, DEFAULT_MAX_DEPTH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between first-level elements.
    Top,
    /// In a run of whitespace between first-level elements.
    TopSpace,
    /// After `<`.
    Lt,
    /// Reading a start-tag name.
    StartName,
    /// Inside a start tag, after its name or after a space: an attribute
    /// name, `>` or `/` may follow.
    InTag,
    /// Reading an attribute name.
    AttrName,
    /// After an attribute name: `=` must follow.
    BeforeEq,
    /// After `=`: the quoted value must follow.
    AfterEq,
    /// After an attribute value: a space, `>` or `/` must follow.
    AfterValue,
    /// After `/` in a start tag: `>` must follow.
    EmptyEnd,
    /// Inside an attribute value delimited by this quote.
    AttrValue(u8),
    /// After `</`, reading the name.
    EndName,
    /// After the end-tag name: only whitespace and `>` may follow.
    EndTail,
    /// Character data inside an element.
    Text,
    /// After `&`, until `;`. `Some(q)` inside an attribute value.
    Entity(Option<u8>),
    /// After `<!`; the number of bytes of `[CDATA[` matched so far.
    Bang(u8),
    /// Inside a CDATA section; the number of `]` seen just before.
    CData(u8),
    /// After `<?`: only the XML declaration is allowed.
    Pi,
    /// Inside the XML declaration; whether the last byte was `?`.
    XmlDecl(bool),
}

/// Resumable framer state. One per direction of a connection.
#[derive(Debug, Clone)]
pub struct Reference {
    max_bytes: usize,
    max_depth: u32,
    max_attributes: u32,
    /// Attributes of the start tag being read.
    attrs: u32,
    state: State,
    /// Bytes of the current frame scanned so far.
    pos: usize,
    /// Element depth inside the current first-level element.
    depth: u32,
    /// Whether a stream header has been seen (first-level elements are only
    /// allowed inside a stream).
    in_stream: bool,
    /// Start of the token being read (name or entity) in the frame.
    mark: usize,
    /// Offset of the current frame's first element name.
    name_start: usize,
    name_len: usize,
    head_end: usize,
    /// Start-tag names of the open elements, as (offset, len) in the frame,
    /// to match end tags. Capacity is kept across frames.
    open: Vec<(u32, u32)>,
    /// Attribute names of the start tag being read, as (offset, len) in the
    /// frame, to refuse duplicates (at most `max_attributes` + 1).
    attr_names: Vec<(u32, u32)>,
    /// Whether the tag being read is an end tag (in `EndName`).
    xml_decl_seen: bool,
}

const PREDEFINED: [&[u8]; 5] = [b"lt", b"gt", b"amp", b"quot", b"apos"];

/// Longest entity or character reference (`&#x10FFFF;` is 10 bytes).
const MAX_ENTITY: usize = 12;

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-' | b'.') || b >= 0x80
}

/// End of a run of name bytes from `i` (before `end`): the whole name in
/// one tight loop, not one state dispatch per byte.
fn name_end(buf: &[u8], mut i: usize, end: usize) -> usize {
    while i < end && is_name_byte(buf[i]) {
        i += 1;
    }
    i
}

/// A byte that may start a name (an element or attribute name).
fn is_name_start(b: u8) -> bool {
    is_name_byte(b) && !b.is_ascii_digit() && b != b'-' && b != b'.'
}

fn is_stream_name(name: &[u8]) -> bool {
    name == b"stream" || name.ends_with(b":stream")
}

impl Reference {
    /// A framer that refuses first-level elements larger than `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Reference {
            max_bytes,
            max_depth: DEFAULT_MAX_DEPTH,
            max_attributes: DEFAULT_MAX_ATTRIBUTES,
            attrs: 0,
            state: State::Top,
            pos: 0,
            depth: 0,
            in_stream: false,
            mark: 0,
            name_start: 0,
            name_len: 0,
            head_end: 0,
            open: Vec::with_capacity(8),
            attr_names: Vec::with_capacity(8),
            xml_decl_seen: false,
        }
    }

    /// A framer for a stream whose header was already read elsewhere.
    pub fn in_open_stream(max_bytes: usize) -> Self {
        let mut f = Reference::new(max_bytes);
        f.in_stream = true;
        f
    }

    /// The same framer with caps on nesting depth and attributes per element.
    pub fn with_structure_limits(mut self, max_depth: u32, max_attributes: u32) -> Self {
        self.max_depth = max_depth.max(1);
        self.max_attributes = max_attributes;
        self
    }

    /// Changes the size cap (from the next byte scanned; the stream's
    /// pre-authentication cap is raised once SASL succeeded).
    pub fn set_max_bytes(&mut self, max_bytes: usize) {
        self.max_bytes = max_bytes;
    }

    /// Forgets the stream: the next frame must be a stream header again.
    pub fn reset(&mut self) {
        self.restart_frame();
        self.in_stream = false;
    }

    /// Whether a stream header has been framed (and not reset since).
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// The configured size cap.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn restart_frame(&mut self) {
        self.state = State::Top;
        self.pos = 0;
        self.depth = 0;
        self.mark = 0;
        self.name_start = 0;
        self.name_len = 0;
        self.head_end = 0;
        self.open.clear();
        self.attr_names.clear();
        self.xml_decl_seen = false;
    }

    fn done(&mut self, kind: FrameKind, len: usize) -> Frame {
        let f = Frame {
            kind,
            len,
            name_start: self.name_start,
            name_len: self.name_len,
            head_end: self.head_end,
        };
        self.restart_frame();
        f
    }

    /// Scans `buf` (the unconsumed input, starting at the current frame) and
    /// returns the next complete frame, `Ok(None)` if more input is needed,
    /// or the reason the input is unacceptable. After an error the framer
    /// must not be used again (the stream is closed).
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Frame>, FrameError> {
        let mut i = self.pos;
        // The state lives in a register while scanning; it is stored back
        // when the scan stops without a frame.
        let mut state = self.state;
        let n = buf.len();
        while i < n {
            if i >= self.max_bytes {
                return Err(FrameError::TooLarge {
                    limit: self.max_bytes,
                });
            }
            let b = buf[i];
            match state {
                State::Top => {
                    if is_space(b) {
                        // A run at the start of a frame is a keep-alive; after
                        // an XML declaration it belongs to the header.
                        if i == 0 {
                            state = State::TopSpace;
                        }
                    } else if b == b'<' {
                        state = State::Lt;
                    } else {
                        return Err(FrameError::NotWellFormed("text outside of a stanza"));
                    }
                    i += 1;
                }
                State::TopSpace => {
                    if is_space(b) {
                        i += 1;
                    } else {
                        return Ok(Some(self.done(FrameKind::Whitespace, i)));
                    }
                }
                State::Lt => {
                    i += 1;
                    match b {
                        b'/' => {
                            state = State::EndName;
                            self.mark = i;
                        }
                        b'!' => state = State::Bang(0),
                        b'?' => {
                            if self.depth != 0 {
                                return Err(FrameError::Restricted("processing instruction"));
                            }
                            state = State::Pi;
                            self.mark = i;
                        }
                        _ if is_name_start(b) => {
                            state = State::StartName;
                            self.mark = i - 1;
                        }
                        _ => return Err(FrameError::NotWellFormed("bad character after '<'")),
                    }
                }
                State::StartName => {
                    if is_name_byte(b) {
                        i = name_end(buf, i + 1, n.min(self.max_bytes));
                        continue;
                    }
                    let (s, e) = (self.mark, i);
                    if self.depth == 0 {
                        let name = &buf[s..e];
                        if !self.in_stream && !is_stream_name(name) {
                            return Err(FrameError::NotWellFormed("expected a stream header"));
                        }
                        if self.xml_decl_seen && !is_stream_name(name) {
                            return Err(FrameError::NotWellFormed(
                                "XML declaration not followed by a stream header",
                            ));
                        }
                        self.name_start = s;
                        self.name_len = e - s;
                    }
                    if self.depth >= self.max_depth {
                        return Err(FrameError::TooDeep {
                            limit: self.max_depth,
                        });
                    }
                    self.open.push((s as u32, (e - s) as u32));
                    self.depth += 1;
                    self.attrs = 0;
                    self.attr_names.clear();
                    state = State::InTag;
                }
                State::InTag => {
                    if is_space(b) {
                        i += 1;
                        continue;
                    }
                    if is_name_start(b) {
                        self.mark = i;
                        state = State::AttrName;
                        i = name_end(buf, i + 1, n.min(self.max_bytes));
                        continue;
                    }
                    i += 1;
                    match b {
                        b'>' => {
                            if self.depth == 1 {
                                self.head_end = i;
                                let (s, l) = self.open[0];
                                let name = &buf[s as usize..(s + l) as usize];
                                if is_stream_name(name) {
                                    self.in_stream = true;
                                    check_chars(&buf[..i])?;
                                    return Ok(Some(self.done(FrameKind::Header, i)));
                                }
                            }
                            state = State::Text;
                        }
                        b'/' => state = State::EmptyEnd,
                        b'<' => return Err(FrameError::NotWellFormed("'<' inside a tag")),
                        _ => return Err(FrameError::NotWellFormed("bad character in a tag")),
                    }
                }
                State::AttrName => {
                    if is_name_byte(b) {
                        i = name_end(buf, i + 1, n.min(self.max_bytes));
                        continue;
                    }
                    let name = &buf[self.mark..i];
                    let duplicate = self
                        .attr_names
                        .iter()
                        .any(|&(s, l)| &buf[s as usize..(s + l) as usize] == name);
                    if duplicate {
                        return Err(FrameError::NotWellFormed("duplicate attribute"));
                    }
                    self.attr_names
                        .push((self.mark as u32, (i - self.mark) as u32));
                    state = State::BeforeEq;
                }
                State::BeforeEq => {
                    i += 1;
                    if b == b'=' {
                        state = State::AfterEq;
                    } else if !is_space(b) {
                        return Err(FrameError::NotWellFormed("attribute without a value"));
                    }
                }
                State::AfterEq => {
                    i += 1;
                    if b == b'"' || b == b'\'' {
                        self.attrs += 1;
                        if self.attrs > self.max_attributes {
                            return Err(FrameError::TooManyAttributes {
                                limit: self.max_attributes,
                            });
                        }
                        state = State::AttrValue(b);
                    } else if !is_space(b) {
                        return Err(FrameError::NotWellFormed("unquoted attribute value"));
                    }
                }
                State::AfterValue => {
                    // A space, or the end of the tag (handled as in InTag).
                    if is_space(b) {
                        i += 1;
                        state = State::InTag;
                    } else if b == b'>' || b == b'/' {
                        state = State::InTag;
                    } else {
                        return Err(FrameError::NotWellFormed("no space between attributes"));
                    }
                }
                State::EmptyEnd => {
                    i += 1;
                    if b != b'>' {
                        return Err(FrameError::NotWellFormed("'/' not followed by '>'"));
                    }
                    self.open.pop();
                    self.depth -= 1;
                    if self.depth == 0 {
                        if self.xml_decl_seen {
                            // `<?xml …?><stream:stream …/>`: no stream opens.
                            return Err(FrameError::NotWellFormed(
                                "XML declaration not followed by a stream header",
                            ));
                        }
                        self.head_end = i;
                        check_chars(&buf[..i])?;
                        return Ok(Some(self.done(FrameKind::Stanza, i)));
                    }
                    state = State::Text;
                }
                State::AttrValue(q) => {
                    // Jump to the next quote, '<' or '&' (memchr is SIMD);
                    // control characters are checked once per frame.
                    let rest = &buf[i..n.min(self.max_bytes)];
                    let k = memchr::memchr3(q, b'<', b'&', rest);
                    let Some(k) = k else {
                        i += rest.len();
                        continue;
                    };
                    i += k + 1;
                    let b = rest[k];
                    if b == q {
                        state = State::AfterValue;
                    } else if b == b'<' {
                        return Err(FrameError::NotWellFormed("'<' in an attribute value"));
                    } else {
                        self.mark = i;
                        state = State::Entity(Some(q));
                    }
                }
                State::EndName => {
                    if is_name_byte(b) {
                        i = name_end(buf, i + 1, n.min(self.max_bytes));
                        continue;
                    }
                    let (s, e) = (self.mark, i);
                    let name = &buf[s..e];
                    if self.depth == 0 {
                        if self.in_stream && is_stream_name(name) {
                            state = State::EndTail;
                            continue;
                        }
                        return Err(FrameError::NotWellFormed("unexpected end tag"));
                    }
                    let Some((os, ol)) = self.open.pop() else {
                        return Err(FrameError::NotWellFormed("unexpected end tag"));
                    };
                    if &buf[os as usize..(os + ol) as usize] != name {
                        return Err(FrameError::NotWellFormed("mismatched end tag"));
                    }
                    self.depth -= 1;
                    state = State::EndTail;
                }
                State::EndTail => {
                    i += 1;
                    if is_space(b) {
                        continue;
                    }
                    if b != b'>' {
                        return Err(FrameError::NotWellFormed("bad end tag"));
                    }
                    if self.depth == 0 {
                        check_chars(&buf[..i])?;
                        // The framer stays in the stream after a close: what
                        // the peer sends afterwards is the caller's to judge.
                        let kind = if self.name_len == 0 {
                            FrameKind::Close
                        } else {
                            FrameKind::Stanza
                        };
                        return Ok(Some(self.done(kind, i)));
                    }
                    state = State::Text;
                }
                State::Text => {
                    // Hot loop: skip ordinary character data with memchr
                    // (SIMD); control characters are checked once per frame.
                    let rest = &buf[i..n.min(self.max_bytes)];
                    let k = memchr::memchr2(b'<', b'&', rest);
                    match k {
                        None => i += rest.len(),
                        Some(k) => {
                            i += k + 1;
                            if rest[k] == b'<' {
                                state = State::Lt;
                            } else {
                                self.mark = i;
                                state = State::Entity(None);
                            }
                        }
                    }
                }
                State::Entity(q) => {
                    if b == b';' {
                        check_entity(&buf[self.mark..i])?;
                        i += 1;
                        state = match q {
                            Some(q) => State::AttrValue(q),
                            None => State::Text,
                        };
                    } else if i - self.mark >= MAX_ENTITY
                        || !(b.is_ascii_alphanumeric() || b == b'#' || b == b'_' || b == b'-')
                    {
                        return Err(FrameError::NotWellFormed("bad entity reference"));
                    } else {
                        i += 1;
                    }
                }
                State::Bang(k) => {
                    const CDATA: &[u8] = b"[CDATA[";
                    if k == 0 && (b == b'-' || b == b'D') {
                        return Err(FrameError::Restricted(if b == b'-' {
                            "comment"
                        } else {
                            "document type declaration"
                        }));
                    }
                    if self.depth == 0 || b != CDATA[k as usize] {
                        return Err(FrameError::Restricted("markup declaration"));
                    }
                    i += 1;
                    state = if k as usize + 1 == CDATA.len() {
                        State::CData(0)
                    } else {
                        State::Bang(k + 1)
                    };
                }
                State::CData(k) => {
                    i += 1;
                    state = match (b, k) {
                        (b']', 0) => State::CData(1),
                        (b']', _) => State::CData(2),
                        (b'>', 2) => State::Text,
                        _ => State::CData(0),
                    };
                }
                State::Pi => {
                    // Only `<?xml` followed by space is the XML declaration.
                    let got = i + 1 - self.mark;
                    let want = b"xml ";
                    let ok = if got < want.len() {
                        b == want[got - 1]
                    } else {
                        is_space(b)
                    };
                    if !ok {
                        return Err(FrameError::Restricted("processing instruction"));
                    }
                    i += 1;
                    if got == want.len() {
                        state = State::XmlDecl(false);
                    }
                }
                State::XmlDecl(q) => {
                    i += 1;
                    if q && b == b'>' {
                        self.xml_decl_seen = true;
                        state = State::Top;
                    } else {
                        state = State::XmlDecl(b == b'?');
                    }
                }
            }
        }
        self.pos = i;
        self.state = state;
        if state == State::TopSpace && i > 0 {
            // Deliver a keep-alive as soon as it arrives.
            return Ok(Some(self.done(FrameKind::Whitespace, i)));
        }
        if i >= self.max_bytes {
            return Err(FrameError::TooLarge {
                limit: self.max_bytes,
            });
        }
        Ok(None)
    }
}

/// Whether `s` holds a control character other than tab, LF and CR (not
/// allowed anywhere in an XML 1.0 document, markup included). One pass over
/// a whole frame, 64 bytes per step: the inner loop has no branch, so the
/// compiler turns it into vector compares.
fn has_control(s: &[u8]) -> bool {
    let bad = |b: u8| (b < 0x20) & (b != b'\t') & (b != b'\n') & (b != b'\r');
    let mut chunks = s.chunks_exact(64);
    for c in &mut chunks {
        let mut any = false;
        for &b in c {
            any |= bad(b);
        }
        if any {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| bad(b))
}

fn check_entity(name: &[u8]) -> Result<(), FrameError> {
    if let Some(num) = name.strip_prefix(b"#") {
        // The digits are at most MAX_ENTITY long: no overflow in a u64.
        let code = match num.strip_prefix(b"x") {
            Some(hex) if !hex.is_empty() && hex.iter().all(u8::is_ascii_hexdigit) => {
                Some(hex.iter().fold(0u64, |n, d| {
                    n * 16 + (*d as char).to_digit(16).unwrap_or(0) as u64
                }))
            }
            None if !num.is_empty() && num.iter().all(u8::is_ascii_digit) => {
                Some(num.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64))
            }
            _ => None,
        };
        // It must name an XML character (not NUL, a control character, a
        // surrogate, U+FFFE/U+FFFF or beyond U+10FFFF).
        return match code {
            Some(c) if is_xml_char(c) => Ok(()),
            _ => Err(FrameError::NotWellFormed("bad character reference")),
        };
    }
    if PREDEFINED.contains(&name) {
        Ok(())
    } else if name.is_empty() {
        Err(FrameError::NotWellFormed("empty entity reference"))
    } else {
        Err(FrameError::Restricted("entity reference"))
    }
}

/// XML 1.0 `Char` (§2.2).
fn is_xml_char(c: u64) -> bool {
    matches!(c, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

/// Whether `s` holds U+FFFE or U+FFFF (`EF BF BE` / `EF BF BF`), the two
/// non-characters XML 1.0 excludes besides control characters.
fn has_non_character(s: &[u8]) -> bool {
    memchr::memchr_iter(0xEF, s)
        .any(|k| s.get(k + 1) == Some(&0xBF) && matches!(s.get(k + 2), Some(0xBE | 0xBF)))
}

/// Character-level checks of a complete frame: valid UTF-8 and no control
/// characters or U+FFFE / U+FFFF. Done once per frame (two vectorised passes) rather than on
/// every run of text between markup.
fn check_chars(bytes: &[u8]) -> Result<(), FrameError> {
    if has_control(bytes) || has_non_character(bytes) {
        return Err(FrameError::NotWellFormed("control character"));
    }
    check_utf8(bytes)
}

fn check_utf8(bytes: &[u8]) -> Result<(), FrameError> {
    // SIMD validation: std's validator was a third of all framing time on
    // text with non-ASCII characters.
    match simdutf8::basic::from_utf8(bytes) {
        Ok(_) => Ok(()),
        Err(_) => Err(FrameError::NotWellFormed("invalid UTF-8")),
    }
}
