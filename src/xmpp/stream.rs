//! Stream headers, features and errors: the few pieces of XML that the proxy
//! writes itself, and the parsing of the headers and features it reads.

use quick_xml::escape::escape;
use quick_xml::events::Event;

/// Namespace of stream errors.
pub const NS_STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// Namespace of SASL elements.
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// Namespace of STARTTLS elements.
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
/// XEP-0478 stream limits.
pub const NS_LIMITS: &str = "urn:xmpp:stream-limits:0";

/// The attributes of a stream header that matter to the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamHeader {
    /// `to`: the domain the client wants.
    pub to: Option<String>,
    /// `from`: the client's JID, when it says.
    pub from: Option<String>,
    /// `id` (node streams).
    pub id: Option<String>,
    /// `version`.
    pub version: Option<String>,
    /// `xml:lang`.
    pub lang: Option<String>,
}

/// Why a stream header was not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not a `stream` element in the streams namespace.
    #[error("not a stream header")]
    NotAStream,
    /// `version` missing or below 1.0.
    #[error("unsupported stream version")]
    UnsupportedVersion,
    /// Not well-formed.
    #[error("malformed stream header")]
    Malformed,
}

/// Parses a framed stream header (optionally preceded by the XML declaration).
pub fn parse_header(bytes: &[u8]) -> Result<StreamHeader, HeaderError> {
    let mut reader = quick_xml::Reader::from_reader(bytes);
    loop {
        match reader.read_event() {
            Ok(Event::Decl(_)) | Ok(Event::Text(_)) => continue,
            Ok(Event::Start(e)) => {
                let local = e.local_name();
                if local.as_ref() != b"stream" {
                    return Err(HeaderError::NotAStream);
                }
                let mut h = StreamHeader::default();
                let mut streams_ns = false;
                for a in e.attributes() {
                    let a = a.map_err(|_| HeaderError::Malformed)?;
                    let v = a
                        .unescape_value()
                        .map_err(|_| HeaderError::Malformed)?
                        .into_owned();
                    match a.key.as_ref() {
                        b"to" => h.to = Some(v),
                        b"from" => h.from = Some(v),
                        b"id" => h.id = Some(v),
                        b"version" => h.version = Some(v),
                        b"xml:lang" => h.lang = Some(v),
                        k if k.starts_with(b"xmlns") && v == "http://etherx.jabber.org/streams" => {
                            streams_ns = true;
                        }
                        _ => {}
                    }
                }
                if !streams_ns {
                    return Err(HeaderError::NotAStream);
                }
                return Ok(h);
            }
            _ => return Err(HeaderError::Malformed),
        }
    }
}

impl StreamHeader {
    /// Whether `version` is 1.0 or later (required for SASL and TLS).
    pub fn version_ok(&self) -> bool {
        let Some(v) = &self.version else { return false };
        let major = v.split('.').next().and_then(|m| m.parse::<u32>().ok());
        matches!(major, Some(m) if m >= 1)
    }
}

/// The header the proxy answers a client with.
pub fn server_header(domain: &str, id: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' id='{}' from='{}' \
         version='1.0' xml:lang='en'>",
        escape(id),
        escape(domain)
    )
}

/// The header the proxy opens a node stream with.
pub fn client_header(domain: &str, from: Option<&str>) -> String {
    let from = from
        .map(|f| format!(" from='{}'", escape(f)))
        .unwrap_or_default();
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' to='{}'{from} \
         version='1.0' xml:lang='en'>",
        escape(domain)
    )
}

/// Pre-TLS features: STARTTLS, required.
pub fn features_starttls() -> &'static str {
    "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>"
}

/// Post-TLS features: the node pair's SASL mechanisms without any `-PLUS`
/// (channel binding cannot survive TLS termination), the XEP-0478 size
/// limit, and optionally Cisco Jabber `<hostname>` hints.
pub fn features_sasl(mechanisms: &[String], max_bytes: usize, hostname: Option<&str>) -> String {
    let mut s = String::with_capacity(256);
    s.push_str("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>");
    for m in mechanisms.iter().filter(|m| !m.ends_with("-PLUS")) {
        s.push_str("<mechanism>");
        s.push_str(&escape(m.as_str()));
        s.push_str("</mechanism>");
    }
    if let Some(h) = hostname {
        s.push_str("<hostname xmlns='urn:xmpp:domain-based-name:1'>");
        s.push_str(&escape(h));
        s.push_str("</hostname>");
    }
    s.push_str("</mechanisms><limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>");
    s.push_str(&max_bytes.to_string());
    s.push_str("</max-bytes></limits></stream:features>");
    s
}

/// `<proceed/>` for STARTTLS.
pub const PROCEED: &str = "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>";

/// An empty SASL challenge, asking for the initial response.
pub const EMPTY_CHALLENGE: &str =
    "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>=</challenge>";

/// A stream error (closing the stream). `app` is an optional
/// application-specific condition element, already serialised.
pub fn stream_error(condition: &str, text: Option<&str>, app: Option<&str>) -> String {
    let mut s = format!("<stream:error><{condition} xmlns='{NS_STREAMS}'/>");
    if let Some(t) = text {
        s.push_str(&format!(
            "<text xmlns='{NS_STREAMS}' xml:lang='en'>{}</text>",
            escape(t)
        ));
    }
    if let Some(a) = app {
        s.push_str(a);
    }
    s.push_str("</stream:error></stream:stream>");
    s
}

/// A SASL failure (the stream stays open).
pub fn sasl_failure(condition: &str, text: Option<&str>) -> String {
    sasl_failure_with(condition, text, None)
}

/// A SASL failure with an extra child element after the text (serialised,
/// in its own namespace).
pub fn sasl_failure_with(condition: &str, text: Option<&str>, extra: Option<&str>) -> String {
    let mut s = format!("<failure xmlns='{NS_SASL}'><{condition}/>");
    if let Some(t) = text {
        s.push_str(&format!("<text xml:lang='en'>{}</text>", escape(t)));
    }
    if let Some(x) = extra {
        s.push_str(x);
    }
    s.push_str("</failure>");
    s
}

/// What the proxy learns from a node's `<stream:features>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFeatures {
    /// SASL mechanisms offered.
    pub mechanisms: Vec<String>,
    /// Whether STARTTLS is offered.
    pub starttls: bool,
    /// Whether STARTTLS is required.
    pub starttls_required: bool,
}

/// Parses a framed `<stream:features>` element.
pub fn parse_features(bytes: &[u8]) -> Result<NodeFeatures, HeaderError> {
    let mut reader = quick_xml::Reader::from_reader(bytes);
    let mut f = NodeFeatures::default();
    let mut in_mech = false;
    let mut in_tls = false;
    let mut depth = 0u32;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                depth += 1;
                match e.local_name().as_ref() {
                    b"features" if depth == 1 => {}
                    _ if depth == 1 => return Err(HeaderError::Malformed),
                    b"mechanism" => in_mech = true,
                    b"starttls" => {
                        f.starttls = true;
                        in_tls = true;
                    }
                    b"required" if in_tls => f.starttls_required = true,
                    _ => {}
                }
            }
            Ok(Event::Empty(e)) => match e.local_name().as_ref() {
                b"starttls" => f.starttls = true,
                b"required" if in_tls => f.starttls_required = true,
                _ => {}
            },
            Ok(Event::Text(t)) if in_mech => {
                let m = t.unescape().map_err(|_| HeaderError::Malformed)?;
                let m = m.trim();
                if !m.is_empty() {
                    f.mechanisms.push(m.to_string());
                }
            }
            Ok(Event::End(e)) => {
                depth = depth.saturating_sub(1);
                match e.local_name().as_ref() {
                    b"mechanism" => in_mech = false,
                    b"starttls" => in_tls = false,
                    _ => {}
                }
                if depth == 0 {
                    return Ok(f);
                }
            }
            Ok(Event::Eof) => return Ok(f),
            Ok(_) => {}
            Err(_) => return Err(HeaderError::Malformed),
        }
    }
}

/// The text content of a framed element (`<auth …>TEXT</auth>`), given the
/// end of its start tag. Empty for a self-closed element.
pub fn element_text(frame: &[u8], head_end: usize) -> &[u8] {
    if head_end >= 2 && frame[head_end - 2] == b'/' {
        return &[];
    }
    let end = memchr::memrchr(b'<', frame).unwrap_or(frame.len());
    if end < head_end {
        return &[];
    }
    &frame[head_end..end]
}

/// `<stream:features>` without its `<starttls>` child, or `None` when it
/// has none (the proxy owns TLS towards the client: a node's STARTTLS
/// offer must not reach it).
pub fn features_without_starttls(features: &[u8]) -> Option<Vec<u8>> {
    let start = memchr::memmem::find(features, b"<starttls")?;
    let rest = &features[start..];
    let head = memchr::memchr(b'>', rest)?;
    let end = if head > 0 && rest[head - 1] == b'/' {
        start + head + 1
    } else {
        let close = memchr::memmem::find(rest, b"</starttls>")?;
        start + close + b"</starttls>".len()
    };
    let mut out = Vec::with_capacity(features.len());
    out.extend_from_slice(&features[..start]);
    out.extend_from_slice(&features[end..]);
    Some(out)
}

/// The answer to a `<starttls/>` on a stream that is already encrypted
/// (RFC 6120 §5.4.2.2: `<failure/>`, then the stream is closed).
pub const TLS_FAILURE_CLOSE: &str =
    "<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>";

/// The stream error for a framing error: `<not-well-formed/>`,
/// `<restricted-xml/>` or `<policy-violation/>` for an over-size,
/// too deep or too wide stanza.
pub fn frame_error(e: &crate::xmpp::framer::FrameError) -> String {
    use crate::xmpp::framer::FrameError;
    match e {
        FrameError::NotWellFormed(why) => stream_error("not-well-formed", Some(why), None),
        FrameError::Restricted(what) => stream_error(
            "restricted-xml",
            Some(&format!("{what} is not allowed in XMPP")),
            None,
        ),
        FrameError::TooLarge { limit } => stream_error(
            "policy-violation",
            Some(&format!("stanza exceeds the limit of {limit} bytes")),
            None,
        ),
        FrameError::TooDeep { limit } => stream_error(
            "policy-violation",
            Some(&format!("elements nested deeper than the limit of {limit}")),
            None,
        ),
        FrameError::TooManyAttributes { limit } => stream_error(
            "policy-violation",
            Some(&format!(
                "an element has more attributes than the limit of {limit}"
            )),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starttls_is_taken_out_of_features() {
        let f = b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>";
        assert_eq!(
            features_without_starttls(f).unwrap(),
            b"<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>"
        );
        let f = b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls><x/></stream:features>";
        assert_eq!(
            features_without_starttls(f).unwrap(),
            b"<stream:features><x/></stream:features>"
        );
        assert!(features_without_starttls(b"<stream:features><bind/></stream:features>").is_none());
    }

    #[test]
    fn header_from_capture() {
        let h = parse_header(b"<stream:stream to='example.com' xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:client' xml:lang='en' version='1.0'>").unwrap();
        assert_eq!(h.to.as_deref(), Some("example.com"));
        assert_eq!(h.lang.as_deref(), Some("en"));
        assert!(h.version_ok());
        assert_eq!(h.from, None);
        let h = parse_header(b"<?xml version='1.0'?><stream:stream from='a@example.com' to='example.com' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>").unwrap();
        assert_eq!(h.from.as_deref(), Some("a@example.com"));
        assert_eq!(
            parse_header(b"<stream:stream xmlns:stream='wrong' version='1.0'>"),
            Err(HeaderError::NotAStream)
        );
        let old = parse_header(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>")
            .unwrap();
        assert!(!old.version_ok());
    }

    #[test]
    fn features_drop_plus_and_advertise_limits() {
        let mechs = vec![
            "SCRAM-SHA-1-PLUS".to_string(),
            "SCRAM-SHA-1".to_string(),
            "PLAIN".to_string(),
        ];
        let f = features_sasl(&mechs, 262_144, None);
        assert!(!f.contains("PLUS"));
        assert!(f.contains("<mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism>"));
        assert!(f.contains("<max-bytes>262144</max-bytes>"));
        let parsed = parse_features(f.as_bytes()).unwrap();
        assert_eq!(parsed.mechanisms, ["SCRAM-SHA-1", "PLAIN"]);
    }

    #[test]
    fn node_features_from_capture() {
        let f = parse_features(b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism></mechanisms></stream:features>").unwrap();
        assert_eq!(f.mechanisms, ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-1"]);
        assert!(f.starttls && !f.starttls_required);
    }

    #[test]
    fn errors_escape_text() {
        let e = stream_error("policy-violation", Some("a < b & c"), None);
        assert!(e.contains("<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"));
        assert!(e.contains("a &lt; b &amp; c"));
        assert!(e.ends_with("</stream:error></stream:stream>"));
        let f = sasl_failure("not-authorized", Some("user x is not assigned to a node"));
        assert!(
            f.starts_with("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/>")
        );
    }

    #[test]
    fn element_text_of_auth() {
        let a = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>";
        let head = a.iter().position(|b| *b == b'>').unwrap() + 1;
        assert_eq!(element_text(a, head), b"AGEAYg==");
        let e = b"<auth mechanism='X'/>";
        assert_eq!(element_text(e, e.len()), b"");
    }
}
