//! Cheap, allocation-free looks into a framed stanza: attributes of its start
//! tag and the text of a known child. Values come back raw (still escaped),
//! as slices of the frame, which is what routing and tracking need.

use memchr::memmem;

/// Finds attribute `name` in a start tag (`tag` = bytes from `<` to `>`).
/// Returns the raw value between the quotes.
pub fn attr<'a>(tag: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut i = 1;
    let n = tag.len();
    // Skip the element name.
    while i < n && !matches!(tag[i], b' ' | b'\t' | b'\r' | b'\n' | b'/' | b'>') {
        i += 1;
    }
    loop {
        while i < n && matches!(tag[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        if i >= n || tag[i] == b'/' || tag[i] == b'>' {
            return None;
        }
        let ns = i;
        while i < n && !matches!(tag[i], b'=' | b' ' | b'\t' | b'\r' | b'\n' | b'>') {
            i += 1;
        }
        let an = &tag[ns..i];
        while i < n && matches!(tag[i], b' ' | b'\t' | b'\r' | b'\n' | b'=') {
            i += 1;
        }
        if i >= n {
            return None;
        }
        let q = tag[i];
        if q != b'"' && q != b'\'' {
            return None;
        }
        i += 1;
        let vs = i;
        let ve = vs + memchr::memchr(q, &tag[vs..])?;
        if an == name {
            return Some(&tag[vs..ve]);
        }
        i = ve + 1;
    }
}

/// The text content of the first `<child>` or `<child …>` element, raw.
/// Only for small, known children (`<jid>`, `<show>`, `<priority>`).
pub fn child_text<'a>(stanza: &'a [u8], child: &[u8]) -> Option<&'a [u8]> {
    let mut from = 0;
    while let Some(k) = memmem::find(&stanza[from..], child) {
        let at = from + k;
        from = at + child.len();
        if at == 0 || stanza[at - 1] != b'<' {
            continue;
        }
        let after = *stanza.get(from)?;
        let open_end = match after {
            b'>' => from + 1,
            b' ' | b'\t' | b'\r' | b'\n' => from + memchr::memchr(b'>', &stanza[from..])? + 1,
            b'/' => return Some(&[]),
            _ => continue,
        };
        if stanza[open_end - 2] == b'/' {
            return Some(&[]);
        }
        let end = open_end + memchr::memchr(b'<', &stanza[open_end..])?;
        return Some(&stanza[open_end..end]);
    }
    None
}

/// The element name of a framed element (bytes after its `<` up to the
/// first space, `/` or `>`), e.g. `auth`, `stream:features`.
pub fn element_name(frame: &[u8]) -> &[u8] {
    let s = memchr::memchr(b'<', frame).map_or(0, |p| p + 1);
    let rest = &frame[s..];
    let e = rest
        .iter()
        .position(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'/' | b'>'))
        .unwrap_or(rest.len());
    &rest[..e]
}

/// Offset just past the end of a framed element's start tag: the first `>`
/// outside quotes (the whole frame if there is none).
pub fn head_end(frame: &[u8]) -> usize {
    let mut q = 0u8;
    for (i, &b) in frame.iter().enumerate() {
        match (q, b) {
            (0, b'"') | (0, b'\'') => q = b,
            (0, b'>') => return i + 1,
            (x, y) if x == y => q = 0,
            _ => {}
        }
    }
    frame.len()
}

/// The XEP-0115 `ver` of a stanza's entity-capabilities element
/// (`<c xmlns='http://jabber.org/protocol/caps' … ver='…'/>`), raw.
pub fn caps_ver(stanza: &[u8]) -> Option<&[u8]> {
    let mut from = 0;
    while let Some(k) = memmem::find(&stanza[from..], b"<c ") {
        let at = from + k;
        let end = at + memchr::memchr(b'>', &stanza[at..])? + 1;
        let tag = &stanza[at..end];
        if attr(tag, b"xmlns") == Some(&b"http://jabber.org/protocol/caps"[..]) {
            return attr(tag, b"ver");
        }
        from = end;
    }
    None
}

/// Whether the stanza mentions `needle` anywhere (namespace checks).
pub fn contains(stanza: &[u8], needle: &[u8]) -> bool {
    memmem::find(stanza, needle).is_some()
}

/// Resolves the five predefined entities and character references; other
/// input is returned unchanged. Used on the few values that are stored.
pub fn unescape(raw: &[u8]) -> std::borrow::Cow<'_, str> {
    let s = String::from_utf8_lossy(raw);
    if !s.contains('&') {
        return s;
    }
    match quick_xml::escape::unescape(&s) {
        Ok(u) => std::borrow::Cow::Owned(u.into_owned()),
        Err(_) => s,
    }
}

/// The full JID of a successful resource binding (an `<iq type='result'>`
/// with an RFC 6120 `<bind><jid>`), unescaped; `None` for any other stanza.
pub fn bind_result(frame: &[u8], f: &crate::xmpp::framer::Frame) -> Option<String> {
    if f.name(frame) != b"iq" {
        return None;
    }
    let head = &frame[..f.head_end];
    if attr(head, b"type") != Some(b"result")
        || !contains(frame, b"urn:ietf:params:xml:ns:xmpp-bind")
    {
        return None;
    }
    child_text(frame, b"jid").map(|jid| unescape(jid).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes() {
        let tag = b"<iq type='result' id=\"a'b\" to = 'x@y/z' from='q'>";
        assert_eq!(attr(tag, b"type"), Some(&b"result"[..]));
        assert_eq!(attr(tag, b"id"), Some(&b"a'b"[..]));
        assert_eq!(attr(tag, b"to"), Some(&b"x@y/z"[..]));
        assert_eq!(attr(tag, b"from"), Some(&b"q"[..]));
        assert_eq!(attr(tag, b"xml:lang"), None);
        assert_eq!(attr(b"<presence/>", b"to"), None);
        // A name inside another value is not an attribute.
        assert_eq!(attr(b"<m id='to=x'>", b"to"), None);
    }

    #[test]
    fn children() {
        let s = b"<iq type='result'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>a@b/c</jid></bind></iq>";
        assert_eq!(child_text(s, b"jid"), Some(&b"a@b/c"[..]));
        let p = b"<presence><show>dnd</show><priority>5</priority><status/></presence>";
        assert_eq!(child_text(p, b"show"), Some(&b"dnd"[..]));
        assert_eq!(child_text(p, b"priority"), Some(&b"5"[..]));
        assert_eq!(child_text(p, b"status"), Some(&b""[..]));
        assert_eq!(child_text(p, b"body"), None);
        let q = b"<message><showx>1</showx><show xml:lang='en'>away</show></message>";
        assert_eq!(child_text(q, b"show"), Some(&b"away"[..]));
    }

    #[test]
    fn names_and_heads() {
        let a = b"<auth xmlns='x' mechanism='a>b'>AGE=</auth>";
        assert_eq!(element_name(a), b"auth");
        assert_eq!(&a[..head_end(a)], b"<auth xmlns='x' mechanism='a>b'>");
        assert_eq!(element_name(b"<stream:features>"), b"stream:features");
        assert_eq!(element_name(b"<r/>"), b"r");
    }

    #[test]
    fn caps() {
        let p = b"<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='7Yby+='/></presence>";
        assert_eq!(caps_ver(p), Some(&b"7Yby+="[..]));
        let q = b"<presence><c xmlns='other' ver='x'/><c xmlns=\"http://jabber.org/protocol/caps\" ver=\"y\"/></presence>";
        assert_eq!(caps_ver(q), Some(&b"y"[..]));
        assert_eq!(caps_ver(b"<presence><show>away</show></presence>"), None);
    }

    #[test]
    fn unescaping() {
        assert_eq!(unescape(b"a&amp;b&#x41;"), "a&bA");
        assert_eq!(unescape(b"plain"), "plain");
    }
}
