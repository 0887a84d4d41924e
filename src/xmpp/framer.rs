//! Sans-IO stanza framer.
//!
//! The framer finds the boundaries of top-level XMPP units in a byte buffer —
//! the stream header, each stanza (or other first-level element such as
//! `<auth/>` or `<r/>`), whitespace keep-alives and the stream close — without
//! building a DOM and without allocating in steady state. It never does I/O:
//! the caller owns the buffer (normally a `bytes::BytesMut`), appends what it
//! reads, calls [`Framer::next`], and after `Ok(Some(frame))` removes exactly
//! `frame.len` bytes from the front. `Ok(None)` means *incomplete*: append
//! more bytes and call again; scanning resumes where it stopped, so each byte
//! is looked at once.
//!
//! While scanning it enforces RFC 6120 §11 restricted XML (no DTD, comments,
//! processing instructions other than the XML declaration, or entity
//! references other than the five predefined ones), basic well-formedness
//! (balanced, matching tags; `name='value'` attributes, each name once per
//! element; no `<` in attribute values; character references to XML
//! characters only; valid UTF-8; no control characters), the stanza size cap, and caps on
//! element nesting depth and attributes per element (so that the open-tag
//! stack and the work per byte stay bounded whatever the input).

/// What a complete frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// `<stream:stream ...>` (with any XML declaration before it).
    Header,
    /// A complete first-level element: a stanza, `<auth/>`, `<r/>`, ….
    Stanza,
    /// Whitespace between first-level elements (keep-alives).
    Whitespace,
    /// `</stream:stream>`.
    Close,
}

/// A complete frame at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The frame's kind.
    pub kind: FrameKind,
    /// Bytes from the front of the buffer that make up the frame.
    pub len: usize,
    /// Offset of the element name (after `<`) in the frame, for `Header` and
    /// `Stanza`; 0 otherwise.
    pub name_start: usize,
    /// Length of the element name.
    pub name_len: usize,
    /// Offset just past the end of the first start tag (`>`), so that a peek
    /// at attributes never looks further.
    pub head_end: usize,
}

impl Frame {
    /// The element name (`iq`, `message`, `stream:stream`, …) of this frame
    /// within `buf`, the bytes the frame was found in.
    pub fn name<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.name_start..self.name_start + self.name_len]
    }
}

/// Why the input cannot be framed; each maps to one stream error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Malformed XML → `<not-well-formed/>`.
    #[error("not well-formed XML: {0}")]
    NotWellFormed(&'static str),
    /// Forbidden XML feature → `<restricted-xml/>`.
    #[error("restricted XML: {0}")]
    Restricted(&'static str),
    /// Stanza larger than the limit → `<policy-violation/>`.
    #[error("stanza exceeds {limit} bytes")]
    TooLarge {
        /// The configured maximum.
        limit: usize,
    },
    /// Elements nested deeper than the limit → `<policy-violation/>`.
    #[error("elements nested deeper than {limit}")]
    TooDeep {
        /// The configured maximum.
        limit: u32,
    },
    /// An element with more attributes than the limit → `<policy-violation/>`.
    #[error("an element has more than {limit} attributes")]
    TooManyAttributes {
        /// The configured maximum.
        limit: u32,
    },
}

/// Default cap on element nesting inside one frame.
pub const DEFAULT_MAX_DEPTH: u32 = 64;
/// Default cap on attributes of one element.
pub const DEFAULT_MAX_ATTRIBUTES: u32 = 50;

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
pub struct Framer {
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

/// Byte classes, one table look-up per byte in the name and space loops.
const SPACE: u8 = 1;
const NAME: u8 = 2;
const NAME_START: u8 = 4;

const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let name = c.is_ascii_alphanumeric() || matches!(c, b':' | b'_' | b'-' | b'.') || c >= 0x80;
        let mut k = 0;
        if matches!(c, b' ' | b'\t' | b'\r' | b'\n') {
            k |= SPACE;
        }
        if name {
            k |= NAME;
            if !c.is_ascii_digit() && c != b'-' && c != b'.' {
                k |= NAME_START;
            }
        }
        t[b] = k;
        b += 1;
    }
    t
};

#[inline(always)]
fn is_space(b: u8) -> bool {
    CLASS[b as usize] & SPACE != 0
}

#[inline(always)]
fn is_name_byte(b: u8) -> bool {
    CLASS[b as usize] & NAME != 0
}

/// End of the run of bytes `keep` accepts from `i` (before `end`), in one
/// tight loop, not one state dispatch per byte.
#[inline(always)]
fn run_end(buf: &[u8], i: usize, end: usize, keep: impl Fn(u8) -> bool) -> usize {
    match buf.get(i..end) {
        Some(run) => run.iter().position(|&b| !keep(b)).map_or(end, |k| i + k),
        None => i.max(end),
    }
}

/// End of a run of name bytes from `i` (before `end`): the whole name at once.
#[inline]
fn name_end(buf: &[u8], i: usize, end: usize) -> usize {
    run_end(buf, i, end, is_name_byte)
}

/// End of a run of spaces from `i` (before `end`).
#[inline]
fn space_end(buf: &[u8], i: usize, end: usize) -> usize {
    run_end(buf, i, end, is_space)
}

/// Whether `a` starts with `name` (names are short: a byte loop, not a
/// call to `memcmp`).
#[inline(always)]
fn same(a: &[u8], name: &[u8]) -> bool {
    a.len() >= name.len() && a.iter().zip(name).all(|(x, y)| x == y)
}

/// A byte that may start a name (an element or attribute name).
#[inline(always)]
fn is_name_start(b: u8) -> bool {
    CLASS[b as usize] & NAME_START != 0
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// High bit set in each byte of `w` equal to the byte repeated in `splat`
/// (plus, possibly, in bytes above the lowest match: only the lowest flag
/// is exact, which is the one read).
#[inline(always)]
fn match_bits(w: u64, splat: u64) -> u64 {
    let x = w ^ splat;
    x.wrapping_sub(LO) & !x & HI
}

/// The 8 bytes of `s` from `i` as a little-endian word (the caller checked
/// that they are there).
#[inline(always)]
fn word(s: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&s[i..i + 8]);
    u64::from_le_bytes(w)
}

/// Bytes searched a word at a time before handing a long run to memchr's
/// vector search: most runs of text between markup or entity references,
/// and most attribute values, are shorter, and for them a call into memchr
/// costs more than the search.
const SHORT_RUN: usize = 32;

/// First `a` or `b` in `s`.
#[inline]
fn find2(s: &[u8], a: u8, b: u8) -> Option<usize> {
    let (sa, sb) = (LO * a as u64, LO * b as u64);
    let mut i = 0;
    while i + 8 <= s.len() {
        if i >= SHORT_RUN {
            return memchr::memchr2(a, b, &s[i..]).map(|k| i + k);
        }
        let w = word(s, i);
        let m = match_bits(w, sa) | match_bits(w, sb);
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    s[i..].iter().position(|&c| c == a || c == b).map(|k| i + k)
}

/// Length (with the `;`) of the predefined entity reference whose name
/// starts at `i`, read as one word without a branch (which of them comes
/// next is as good as random); 0 for anything else or too near the end of
/// `s`, left to the byte loop.
#[inline(always)]
fn predefined_len(s: &[u8], i: usize) -> usize {
    const fn w(s: &[u8]) -> u64 {
        let mut v = 0u64;
        let mut k = s.len();
        while k > 0 {
            k -= 1;
            v = (v << 8) | s[k] as u64;
        }
        v
    }
    const LT: u64 = w(b"lt;");
    const GT: u64 = w(b"gt;");
    const AMP: u64 = w(b"amp;");
    const QUOT: u64 = w(b"quot;");
    const APOS: u64 = w(b"apos;");
    if i + 8 > s.len() {
        return 0;
    }
    let x = word(s, i);
    let (x3, x4, x5) = (x & 0xff_ffff, x & 0xffff_ffff, x & 0xff_ffff_ffff);
    3 * ((x3 == LT) | (x3 == GT)) as usize
        + 4 * (x4 == AMP) as usize
        + 5 * ((x5 == QUOT) | (x5 == APOS)) as usize
}

/// First `a`, `b` or `c` in `s`.
#[inline(always)]
fn find3(s: &[u8], a: u8, b: u8, c: u8) -> Option<usize> {
    let (sa, sb, sc) = (LO * a as u64, LO * b as u64, LO * c as u64);
    let mut i = 0;
    while i + 8 <= s.len() {
        if i >= SHORT_RUN {
            return memchr::memchr3(a, b, c, &s[i..]).map(|k| i + k);
        }
        let w = word(s, i);
        let m = match_bits(w, sa) | match_bits(w, sb) | match_bits(w, sc);
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    s[i..]
        .iter()
        .position(|&x| x == a || x == b || x == c)
        .map(|k| i + k)
}

fn is_stream_name(name: &[u8]) -> bool {
    name == b"stream" || name.ends_with(b":stream")
}

impl Framer {
    /// A framer that refuses first-level elements larger than `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Framer {
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
        let mut f = Framer::new(max_bytes);
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

    /// A start-tag name ends at `e` (it began at `self.mark`): checks it
    /// and opens the element.
    fn open_element(&mut self, buf: &[u8], e: usize) -> Result<(), FrameError> {
        let s = self.mark;
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
        Ok(())
    }

    /// An attribute name ends at `e` (it began at `self.mark`): refuses a
    /// second attribute of that name on the element.
    #[inline]
    fn attr_name(&mut self, buf: &[u8], e: usize) -> Result<(), FrameError> {
        let name = &buf[self.mark..e];
        let duplicate = self
            .attr_names
            .iter()
            .any(|&(s, l)| l as usize == name.len() && same(&buf[s as usize..], name));
        if duplicate {
            return Err(FrameError::NotWellFormed("duplicate attribute"));
        }
        self.attr_names
            .push((self.mark as u32, (e - self.mark) as u32));
        Ok(())
    }

    /// An attribute value opens: one more attribute on the element.
    fn count_attribute(&mut self) -> Result<(), FrameError> {
        self.attrs += 1;
        if self.attrs > self.max_attributes {
            return Err(FrameError::TooManyAttributes {
                limit: self.max_attributes,
            });
        }
        Ok(())
    }

    /// An entity or character reference whose name starts at `self.mark`:
    /// the offset just past its `;`, or `None` if the input (up to `lim`)
    /// ends first, to be resumed in [`State::Entity`] at `lim`.
    #[inline(never)]
    fn entity(&self, buf: &[u8], lim: usize) -> Result<Option<usize>, FrameError> {
        let mark = self.mark;
        let run = buf.get(mark..lim).unwrap_or_default();
        // The predefined entities text is full of, without the byte loop.
        match run {
            [b'l' | b'g', b't', b';', ..] => return Ok(Some(mark + 3)),
            [b'a', b'm', b'p', b';', ..] => return Ok(Some(mark + 4)),
            [b'q', b'u', b'o', b't', b';', ..] | [b'a', b'p', b'o', b's', b';', ..] => {
                return Ok(Some(mark + 5))
            }
            _ => {}
        }
        for (k, &b) in run.iter().enumerate() {
            if b == b';' {
                check_entity(&run[..k])?;
                return Ok(Some(mark + k + 1));
            }
            if k >= MAX_ENTITY
                || !(b.is_ascii_alphanumeric() || b == b'#' || b == b'_' || b == b'-')
            {
                return Err(FrameError::NotWellFormed("bad entity reference"));
            }
        }
        Ok(None)
    }

    /// Fast path for a start tag whose name began at `self.mark` (its first
    /// byte already checked; `i` is just past it): the name, then the rest
    /// of the tag as [`Framer::tag`]. Returns where scanning stopped and the
    /// state to resume in, with exactly the effects and errors the
    /// byte-at-a-time states would have had up to there.
    #[inline(always)]
    fn start_tag(
        &mut self,
        buf: &[u8],
        i: usize,
        lim: usize,
    ) -> Result<(usize, State), FrameError> {
        let e = name_end(buf, i, lim);
        if e >= lim {
            return Ok((e, State::StartName));
        }
        self.open_element(buf, e)?;
        self.tag(buf, e, lim)
    }

    /// Fast path for the inside of a start tag, from `i` in [`State::InTag`]:
    /// attributes in tight loops (names by table, values by word-wide
    /// search for the quote, `<` or `&`) up to the end of the tag. Stops
    /// with the state to resume in at `lim`, and hands a tag that ends a
    /// first-level start tag (which may finish a frame) back to the
    /// byte-at-a-time states.
    #[inline(always)]
    fn tag(&mut self, buf: &[u8], mut i: usize, lim: usize) -> Result<(usize, State), FrameError> {
        loop {
            i = space_end(buf, i, lim);
            let Some(&b) = buf.get(i).filter(|_| i < lim) else {
                return Ok((i, State::InTag));
            };
            if is_name_start(b) {
                self.mark = i;
                let e = name_end(buf, i + 1, lim);
                if e >= lim {
                    return Ok((e, State::AttrName));
                }
                self.attr_name(buf, e)?;
                i = space_end(buf, e, lim);
                match buf.get(i).filter(|_| i < lim) {
                    None => return Ok((i, State::BeforeEq)),
                    Some(b'=') => i += 1,
                    Some(_) => return Err(FrameError::NotWellFormed("attribute without a value")),
                }
                i = space_end(buf, i, lim);
                let q = match buf.get(i).filter(|_| i < lim) {
                    None => return Ok((i, State::AfterEq)),
                    Some(&q) if q == b'"' || q == b'\'' => q,
                    Some(_) => return Err(FrameError::NotWellFormed("unquoted attribute value")),
                };
                i += 1;
                self.count_attribute()?;
                // The value.
                loop {
                    let rest = buf.get(i..lim).unwrap_or_default();
                    let Some(k) = find3(rest, q, b'<', b'&') else {
                        return Ok((lim, State::AttrValue(q)));
                    };
                    i += k + 1;
                    let c = rest[k];
                    if c == q {
                        break;
                    }
                    if c == b'<' {
                        return Err(FrameError::NotWellFormed("'<' in an attribute value"));
                    }
                    let len = predefined_len(&buf[..lim], i);
                    if len != 0 {
                        i += len;
                        continue;
                    }
                    self.mark = i;
                    match self.entity(buf, lim)? {
                        Some(j) => i = j,
                        None => return Ok((lim, State::Entity(Some(q)))),
                    }
                }
                // After the value: a space, or the end of the tag.
                match buf.get(i).filter(|_| i < lim) {
                    None => return Ok((i, State::AfterValue)),
                    Some(&b) if is_space(b) => i += 1,
                    Some(b'>' | b'/') => {}
                    Some(_) => {
                        return Err(FrameError::NotWellFormed("no space between attributes"))
                    }
                }
                continue;
            }
            match b {
                b'>' => {
                    if self.depth == 1 {
                        return Ok((i, State::InTag));
                    }
                    return Ok((i + 1, State::Text));
                }
                b'/' => {
                    let j = i + 1;
                    match buf.get(j).filter(|_| j < lim) {
                        None => return Ok((j, State::EmptyEnd)),
                        Some(b'>') if self.depth > 1 => {
                            self.open.pop();
                            self.depth -= 1;
                            return Ok((j + 1, State::Text));
                        }
                        Some(b'>') => return Ok((j, State::EmptyEnd)),
                        Some(_) => {
                            return Err(FrameError::NotWellFormed("'/' not followed by '>'"))
                        }
                    }
                }
                b'<' => return Err(FrameError::NotWellFormed("'<' inside a tag")),
                _ => return Err(FrameError::NotWellFormed("bad character in a tag")),
            }
        }
    }

    /// Fast path for the content of an element, from `i` in [`State::Text`]:
    /// character data by word-wide search for `<` or `&`, references, end
    /// tags and start tags, all without going back to the state dispatch.
    /// Stops at `lim`, at markup the byte-at-a-time states handle (`<!`,
    /// `<?`, a bad byte after `<`), or at the end tag that closes the
    /// first-level element, with the state to resume in.
    fn content(
        &mut self,
        buf: &[u8],
        mut i: usize,
        lim: usize,
    ) -> Result<(usize, State), FrameError> {
        loop {
            let rest = buf.get(i..lim).unwrap_or_default();
            let Some(k) = find2(rest, b'<', b'&') else {
                return Ok((i.max(lim), State::Text));
            };
            i += k + 1;
            if rest[k] == b'&' {
                let len = predefined_len(&buf[..lim], i);
                if len != 0 {
                    i += len;
                    continue;
                }
                self.mark = i;
                match self.entity(buf, lim)? {
                    Some(j) => i = j,
                    None => return Ok((lim, State::Entity(None))),
                }
                continue;
            }
            // After '<'.
            let Some(&b) = buf.get(i).filter(|_| i < lim) else {
                return Ok((i, State::Lt));
            };
            if b == b'/' {
                i += 1;
                self.mark = i;
                let e = name_end(buf, i, lim);
                if e >= lim {
                    return Ok((e, State::EndName));
                }
                // Inside an element: the depth is at least 1.
                let Some((os, ol)) = self.open.pop() else {
                    return Err(FrameError::NotWellFormed("unexpected end tag"));
                };
                if ol as usize != e - i || !same(&buf[os as usize..], &buf[i..e]) {
                    return Err(FrameError::NotWellFormed("mismatched end tag"));
                }
                self.depth -= 1;
                i = e;
                if self.depth == 0 {
                    return Ok((i, State::EndTail));
                }
                i = space_end(buf, i, lim);
                match buf.get(i).filter(|_| i < lim) {
                    None => return Ok((i, State::EndTail)),
                    Some(b'>') => i += 1,
                    Some(_) => return Err(FrameError::NotWellFormed("bad end tag")),
                }
            } else if is_name_start(b) {
                self.mark = i;
                let (j, state) = self.start_tag(buf, i + 1, lim)?;
                if state != State::Text {
                    return Ok((j, state));
                }
                i = j;
            } else {
                return Ok((i, State::Lt));
            }
        }
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
        // Nothing at or past the size cap is looked at (the fast paths
        // stop there; the loop then reports the frame too large).
        let lim = n.min(self.max_bytes);
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
                            self.mark = i - 1;
                            (i, state) = self.start_tag(buf, i, lim)?;
                        }
                        _ => return Err(FrameError::NotWellFormed("bad character after '<'")),
                    }
                }
                State::StartName => {
                    if is_name_byte(b) {
                        i = name_end(buf, i + 1, lim);
                        continue;
                    }
                    self.open_element(buf, i)?;
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
                        i = name_end(buf, i + 1, lim);
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
                        i = name_end(buf, i + 1, lim);
                        continue;
                    }
                    self.attr_name(buf, i)?;
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
                        self.count_attribute()?;
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
                    let rest = &buf[i..lim];
                    let k = find3(rest, q, b'<', b'&');
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
                        i = name_end(buf, i + 1, lim);
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
                State::Text => (i, state) = self.content(buf, i, lim)?,
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
/// allowed anywhere in an XML 1.0 document, markup included) or U+FFFE /
/// U+FFFF. One pass over a whole frame, 64 bytes per step: the inner loop
/// has no branch, so the compiler turns it into vector compares; it flags
/// control characters and 0xEF (the first byte of both non-characters, and
/// rare in text), and only a flagged step is looked at closely.
fn has_bad_char(s: &[u8]) -> bool {
    let control = |b: u8| (b < 0x20) & (b != b'\t') & (b != b'\n') & (b != b'\r');
    let close_look =
        |at: usize, c: &[u8]| c.iter().any(|&b| control(b)) || has_non_character(s, at, c.len());
    // Tab, LF and CR are flagged too (fewer compares per byte), and let
    // through by the close look.
    let flagged = |c: &[u8]| {
        c.iter()
            .fold(false, |any, &b| any | (b < 0x20) | (b == 0xEF))
    };
    let mut chunks = s.chunks_exact(64);
    let mut at = 0;
    for c in &mut chunks {
        if flagged(c) && close_look(at, c) {
            return true;
        }
        at += 64;
    }
    let c = chunks.remainder();
    flagged(c) && close_look(at, c)
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

/// Whether U+FFFE or U+FFFF (`EF BF BE` / `EF BF BF`), the two
/// non-characters XML 1.0 excludes besides control characters, starts in
/// the `len` bytes of `s` from `at`.
fn has_non_character(s: &[u8], at: usize, len: usize) -> bool {
    let run = s.get(at..at + len).unwrap_or_default();
    memchr::memchr_iter(0xEF, run)
        .any(|k| s.get(at + k + 1) == Some(&0xBF) && matches!(s.get(at + k + 2), Some(0xBE | 0xBF)))
}

/// Character-level checks of a complete frame: valid UTF-8 and no control
/// characters or U+FFFE / U+FFFF. Done once per frame (two vectorised passes) rather than on
/// every run of text between markup.
fn check_chars(bytes: &[u8]) -> Result<(), FrameError> {
    if has_bad_char(bytes) {
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

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
