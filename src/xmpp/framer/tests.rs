use super::*;

const CAPTURES: [&str; 4] = [
    "alice-scram-sha1.c2s.xml",
    "alice-scram-sha1.s2c.xml",
    "bob-scram-sha256.c2s.xml",
    "bob-scram-sha256.s2c.xml",
];

fn capture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/captures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Frames the whole input; whitespace frames are merged so that the result
/// does not depend on where reads split a keep-alive run.
fn frame_all(input: &[u8], max: usize) -> Result<Vec<(FrameKind, Vec<u8>)>, FrameError> {
    let mut f = Framer::new(max);
    let mut buf = input.to_vec();
    let mut out = Vec::new();
    while let Some(fr) = f.next(&buf)? {
        let bytes: Vec<u8> = buf.drain(..fr.len).collect();
        push_merged(&mut out, fr.kind, bytes);
    }
    assert!(
        buf.iter().all(|b| is_space(*b)) || !buf.is_empty(),
        "leftover is incomplete input"
    );
    Ok(out)
}

fn push_merged(out: &mut Vec<(FrameKind, Vec<u8>)>, kind: FrameKind, bytes: Vec<u8>) {
    if kind == FrameKind::Whitespace {
        if let Some((FrameKind::Whitespace, prev)) = out.last_mut() {
            prev.extend_from_slice(&bytes);
            return;
        }
    }
    out.push((kind, bytes));
}

/// Feeds the input split at `cut`: first the prefix (which must give only
/// frames wholly inside it, then Incomplete), then the rest.
fn frame_split(input: &[u8], cut: usize, max: usize) -> Vec<(FrameKind, Vec<u8>)> {
    let mut f = Framer::new(max);
    let mut buf = input[..cut].to_vec();
    let mut out = Vec::new();
    let mut consumed = 0;
    while let Some(fr) = f.next(&buf).expect("prefix frames") {
        consumed += fr.len;
        assert!(consumed <= cut);
        let bytes: Vec<u8> = buf.drain(..fr.len).collect();
        push_merged(&mut out, fr.kind, bytes);
    }
    // Incomplete, and asking again without new bytes changes nothing.
    assert_eq!(f.next(&buf), Ok(None));
    buf.extend_from_slice(&input[cut..]);
    while let Some(fr) = f.next(&buf).expect("rest frames") {
        let bytes: Vec<u8> = buf.drain(..fr.len).collect();
        push_merged(&mut out, fr.kind, bytes);
    }
    out
}

#[test]
fn captures_frame_into_the_same_bytes() {
    for name in CAPTURES {
        let input = capture(name);
        let frames = frame_all(&input, 262_144).expect(name);
        let joined: Vec<u8> = frames.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(joined, input, "{name}: frames are the input, byte for byte");
        // Two stream headers (before and after SASL) and one close each.
        let headers = frames
            .iter()
            .filter(|(k, _)| *k == FrameKind::Header)
            .count();
        assert_eq!(headers, 2, "{name}");
        let closes = frames
            .iter()
            .filter(|(k, _)| *k == FrameKind::Close)
            .count();
        assert_eq!(closes, 1, "{name}");
        let stanzas = frames
            .iter()
            .filter(|(k, _)| *k == FrameKind::Stanza)
            .count();
        assert!(stanzas > 10, "{name}: {stanzas} stanzas");
    }
}

#[test]
fn every_prefix_gives_incomplete_then_the_same_frames() {
    for name in CAPTURES {
        let input = capture(name);
        let whole = frame_all(&input, 262_144).unwrap();
        for cut in 0..=input.len() {
            let split = frame_split(&input, cut, 262_144);
            assert_eq!(split, whole, "{name} split at {cut}");
        }
    }
}

#[test]
fn byte_at_a_time() {
    for name in CAPTURES {
        let input = capture(name);
        let whole = frame_all(&input, 262_144).unwrap();
        let mut f = Framer::new(262_144);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for &b in &input {
            buf.push(b);
            while let Some(fr) = f.next(&buf).unwrap() {
                let bytes: Vec<u8> = buf.drain(..fr.len).collect();
                push_merged(&mut out, fr.kind, bytes);
            }
        }
        assert_eq!(out, whole, "{name}");
    }
}

const HDR: &str = "<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

fn stream(body: &str) -> Vec<u8> {
    format!("{HDR}{body}").into_bytes()
}

#[test]
fn multibyte_utf8_split_at_every_position() {
    let input = stream("<message to='b@example.com' type='chat'><body>héllo 世界 🎉 &lt;&amp;&gt; &#x1F600; &#233;</body></message> ");
    let whole = frame_all(&input, 262_144).unwrap();
    assert_eq!(whole[1].0, FrameKind::Stanza);
    for cut in 0..=input.len() {
        assert_eq!(frame_split(&input, cut, 262_144), whole, "cut {cut}");
    }
}

#[test]
fn frame_reports_name_and_head() {
    let input = stream("<presence from='a@b/c'><show>dnd</show></presence>");
    let mut f = Framer::new(1000);
    let h = f.next(&input).unwrap().unwrap();
    assert_eq!(h.kind, FrameKind::Header);
    assert_eq!(h.name(&input), b"stream:stream");
    let rest = &input[h.len..];
    let s = f.next(rest).unwrap().unwrap();
    assert_eq!(s.kind, FrameKind::Stanza);
    assert_eq!(s.name(rest), b"presence");
    assert_eq!(&rest[..s.head_end], b"<presence from='a@b/c'>");
    assert_eq!(s.len, rest.len());
}

fn first_error(input: &[u8], max: usize) -> FrameError {
    frame_all(input, max).expect_err("must fail")
}

#[test]
fn restricted_xml_is_refused() {
    let cases = [
        "<!DOCTYPE foo [<!ENTITY x 'y'>]>",
        "<message><!-- hi --></message>",
        "<!-- top-level comment -->",
        "<message><?php echo 1 ?></message>",
        "<?target data?>",
        "<message><body>&xxe;</body></message>",
        "<message to='&ent;'/>",
    ];
    for c in cases {
        let e = first_error(&stream(c), 262_144);
        assert!(matches!(e, FrameError::Restricted(_)), "{c}: {e:?}");
    }
    // A DOCTYPE before the stream header too.
    let e = first_error(b"<?xml version='1.0'?><!DOCTYPE x><stream:stream>", 1000);
    assert!(matches!(e, FrameError::Restricted(_)), "{e:?}");
}

#[test]
fn predefined_entities_cdata_and_char_refs_are_fine() {
    let input = stream("<message><body>&lt;&gt;&amp;&quot;&apos; &#10; &#x41; <![CDATA[a <b> ]] c]]></body><x a = '&#x10FFFF;' b='&#9;' /></message>");
    let frames = frame_all(&input, 262_144).unwrap();
    assert_eq!(frames.len(), 2);
}

#[test]
fn malformed_xml_is_refused() {
    let cases = [
        "<message></iq>",
        "<message><body></message>",
        "hello",
        "<message to='a<b'/>",
        "<message to=x/ >",
        "</foo>",
        "<message><body>&;</body></message>",
        "<message><body>& amp;</body></message>",
        "<message><body>&#xZZ;</body></message>",
        "<message><body>\u{1}</body></message>",
        "<1abc/>",
        "<message to/>",
        "<message to='a'type='b'/>",
        "<message ='x'/>",
        "<message to=='x'/>",
        "<message \"x\"/>",
        "<presence type='unavailable' type='available'/>",
        "<message><body>&#0;</body></message>",
        "<message><body>&#x1b;</body></message>",
        "<message><body>&#xD800;</body></message>",
        "<message a='&#x110000;'/>",
        "<message><body>&#99999999999;</body></message>",
        "<message><body>\u{FFFE}</body></message>",
    ];
    for c in cases {
        let e = first_error(&stream(c), 262_144);
        assert!(matches!(e, FrameError::NotWellFormed(_)), "{c}: {e:?}");
    }
    let mut bad = stream("<message><body>");
    bad.extend_from_slice(&[0xff, 0xfe]);
    bad.extend_from_slice(b"</body></message>");
    assert!(matches!(
        first_error(&bad, 1000),
        FrameError::NotWellFormed(_)
    ));
    // An XML declaration before an empty stream element: no stream opens.
    assert!(matches!(
        first_error(b"<?xml version='1.0'?><stream:stream/>", 1000),
        FrameError::NotWellFormed(_)
    ));
    // A stanza before any stream header.
    assert!(matches!(
        first_error(b"<message/>", 1000),
        FrameError::NotWellFormed(_)
    ));
}

#[test]
fn oversize_stanza_is_refused_without_waiting_for_its_end() {
    let big = format!("<message><body>{}", "x".repeat(20_000));
    let input = stream(&big);
    let mut f = Framer::new(10_000);
    let h = f.next(&input).unwrap().unwrap();
    let rest = &input[h.len..];
    assert_eq!(f.next(rest), Err(FrameError::TooLarge { limit: 10_000 }));
    // Exactly at the limit is fine.
    let body = "<message/>";
    let exact = format!(
        "<message><body>{}</body></message>",
        "y".repeat(10_000 - 32)
    );
    assert_eq!(exact.len(), 10_000);
    let mut f = Framer::new(10_000);
    assert_eq!(
        f.next(exact.as_bytes()),
        Err(FrameError::NotWellFormed("expected a stream header"))
    );
    let input = stream(&format!("{exact}{body}"));
    let frames = frame_all(&input, 10_000).unwrap();
    assert_eq!(frames[1].1.len(), 10_000);
}

#[test]
fn whitespace_keepalives_and_stream_close() {
    let input = stream(" \n<r xmlns='urn:xmpp:sm:3'/>\t</stream:stream>");
    let frames = frame_all(&input, 1000).unwrap();
    let kinds: Vec<_> = frames.iter().map(|f| f.0).collect();
    assert_eq!(
        kinds,
        [
            FrameKind::Header,
            FrameKind::Whitespace,
            FrameKind::Stanza,
            FrameKind::Whitespace,
            FrameKind::Close
        ]
    );
    // A keep-alive is delivered at once, not held until the next stanza.
    let mut f = Framer::new(1000);
    let hdr = HDR.as_bytes();
    f.next(hdr).unwrap().unwrap();
    let ka = f.next(b" ").unwrap().unwrap();
    assert_eq!((ka.kind, ka.len), (FrameKind::Whitespace, 1));
}

#[test]
fn stream_restart_is_a_new_header() {
    let input = stream(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>{HDR}<iq type='set' id='1'/>"));
    let kinds: Vec<_> = frame_all(&input, 1000)
        .unwrap()
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(
        kinds,
        [
            FrameKind::Header,
            FrameKind::Stanza,
            FrameKind::Header,
            FrameKind::Stanza
        ]
    );
}

#[test]
fn attribute_values_may_hold_gt_and_slash() {
    let input = stream("<message to='a>b/c' id=\"x'y\"><body a='1'>t</body></message>");
    let frames = frame_all(&input, 1000).unwrap();
    assert_eq!(frames[1].0, FrameKind::Stanza);
    assert_eq!(frames[1].1.len(), input.len() - HDR.len());
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz: mutate the captures and frame the result.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for name in CAPTURES {
        let base = capture(name);
        for _ in 0..300 {
            let mut input = base.clone();
            for _ in 0..(rnd() % 8 + 1) {
                let at = (rnd() as usize) % input.len();
                input[at] = (rnd() & 0xff) as u8;
            }
            if let Ok(frames) = frame_all(&input, 4096) {
                for (kind, bytes) in frames {
                    if kind == FrameKind::Stanza {
                        assert_well_formed(&bytes);
                    }
                }
            }
        }
    }
}

/// What the framer calls a stanza, a real XML parser must accept.
fn assert_well_formed(bytes: &[u8]) {
    let mut r = quick_xml::Reader::from_reader(bytes);
    loop {
        match r.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("{e}: {}", String::from_utf8_lossy(bytes)),
        }
    }
}

#[test]
fn every_capture_stanza_is_well_formed_xml() {
    for name in CAPTURES {
        for (kind, bytes) in frame_all(&capture(name), 262_144).unwrap() {
            if kind == FrameKind::Stanza {
                assert_well_formed(&bytes);
            }
        }
    }
}

#[test]
fn nesting_deeper_than_the_limit_is_refused_and_the_limit_itself_passes() {
    let ok = format!("{}{}", "<a>".repeat(8), "</a>".repeat(8));
    let mut f = Framer::in_open_stream(1 << 20).with_structure_limits(8, 50);
    let fr = f.next(ok.as_bytes()).unwrap().unwrap();
    assert_eq!((fr.kind, fr.len), (FrameKind::Stanza, ok.len()));
    let deep = "<a>".repeat(9);
    let mut f = Framer::in_open_stream(1 << 20).with_structure_limits(8, 50);
    assert_eq!(
        f.next(deep.as_bytes()),
        Err(FrameError::TooDeep { limit: 8 })
    );
    // The default holds for unbounded input long before the size cap.
    let bomb = "<a>".repeat(10_000);
    let mut f = Framer::in_open_stream(1 << 20);
    assert_eq!(
        f.next(bomb.as_bytes()),
        Err(FrameError::TooDeep {
            limit: DEFAULT_MAX_DEPTH
        })
    );
}

#[test]
fn attributes_over_the_limit_are_refused() {
    let attrs = |n: usize| -> String { (0..n).map(|i| format!(" a{i}=\"v\"")).collect() };
    let ok = format!("<x{}/>", attrs(5));
    let mut f = Framer::in_open_stream(1 << 20).with_structure_limits(64, 5);
    assert_eq!(f.next(ok.as_bytes()).unwrap().unwrap().len, ok.len());
    let over = format!("<x><y{}/></x>", attrs(6));
    let mut f = Framer::in_open_stream(1 << 20).with_structure_limits(64, 5);
    assert_eq!(
        f.next(over.as_bytes()),
        Err(FrameError::TooManyAttributes { limit: 5 })
    );
    // The count is per element.
    let spread = format!("<x{a}><y{a}/></x>", a = attrs(5));
    let mut f = Framer::in_open_stream(1 << 20).with_structure_limits(64, 5);
    assert!(f.next(spread.as_bytes()).unwrap().is_some());
}

/// Every result `next` gives when `input` arrives in reads ending at
/// `cuts` (then the rest), asking again after each frame until it needs
/// more input or fails.
macro_rules! drive {
    ($framer:expr, $input:expr, $cuts:expr) => {{
        let mut f = $framer;
        let input: &[u8] = $input;
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        let mut from = 0;
        'reads: for &to in $cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[from..to]);
            from = to;
            loop {
                let r = f.next(&buf);
                out.push(r.clone());
                match r {
                    Ok(Some(fr)) => drop(buf.drain(..fr.len)),
                    Ok(None) => break,
                    Err(_) => break 'reads,
                }
            }
        }
        out
    }};
}

#[derive(Clone, Copy)]
struct Limits {
    bytes: usize,
    depth: u32,
    attrs: u32,
}

fn results(input: &[u8], cuts: &[usize], l: Limits) -> Vec<Result<Option<Frame>, FrameError>> {
    drive!(
        Framer::new(l.bytes).with_structure_limits(l.depth, l.attrs),
        input,
        cuts
    )
}

fn reference_results(
    input: &[u8],
    cuts: &[usize],
    l: Limits,
) -> Vec<Result<Option<Frame>, FrameError>> {
    drive!(
        super::reference::Reference::new(l.bytes).with_structure_limits(l.depth, l.attrs),
        input,
        cuts
    )
}

const DEFAULT_LIMITS: Limits = Limits {
    bytes: 262_144,
    depth: DEFAULT_MAX_DEPTH,
    attrs: DEFAULT_MAX_ATTRIBUTES,
};

/// The same results as the byte-at-a-time reference, read whole, split in
/// two at every offset, and a byte at a time.
fn assert_as_reference(input: &[u8], l: Limits) {
    let whole = reference_results(input, &[], l);
    assert_eq!(
        results(input, &[], l),
        whole,
        "whole: {:?}",
        String::from_utf8_lossy(input)
    );
    for cut in 0..=input.len() {
        assert_eq!(
            results(input, &[cut], l),
            reference_results(input, &[cut], l),
            "split at {cut}: {:?}",
            String::from_utf8_lossy(input)
        );
    }
    let bytes: Vec<usize> = (1..input.len()).collect();
    assert_eq!(
        results(input, &bytes, l),
        reference_results(input, &bytes, l),
        "byte at a time: {:?}",
        String::from_utf8_lossy(input)
    );
}

#[test]
fn a_tag_split_at_every_byte_frames_as_the_reference() {
    let cases = [
        "<message type='chat' to='user1@example.com' id=\"m1\" xml:lang='en'><body>hi</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
        "<presence id='p1'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='http://cisco.com/jabber' ver='k07nuHawZqmndRtf3ZfBm54FwL0='/></presence>",
        "<iq type='set' id='push1'><query xmlns='jabber:iq:roster' ver='v1'><item jid='u@example.com' name='A &amp; B &#x1F600;' subscription='both'><group>Team &amp; Friends</group></item></query></iq>",
        "<a  x = 'v'\t\ny=\"w\" ><b/><c z='1' /></a >",
        "<r xmlns='urn:xmpp:sm:3'/> <a h='1'/>\n</stream:stream>",
    ];
    for c in cases {
        assert_as_reference(&stream(c), DEFAULT_LIMITS);
    }
}

#[test]
fn attribute_values_with_gt_quotes_and_references_frame_as_the_reference() {
    let cases = [
        "<message to='a>b' id=\"x'y\" q='\"' r=\"'>'\"><body a='1>2/>'>t</body></message>",
        "<m a='&gt;&quot;&apos;&#62;' b=\"&lt;&amp;\"/>",
        "<m a='>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>'/>",
        "<m a='a long value that runs past the short-run search before its quote'/>",
        "<m a='&#x10FFFF;' b='&#9;'/>",
        "<m a='x<y'/>",
        "<m a='&bogus;'/>",
        "<m a='&#0;'/>",
        "<m a='&toolongreference;'/>",
        "<m a=\"unterminated/>",
        "<m a='1'b='2'/>",
        "<m a='1' a='2'/>",
        "<m a=x/>",
        "<m a/>",
        "<m a='1'/ >",
    ];
    for c in cases {
        assert_as_reference(&stream(c), DEFAULT_LIMITS);
    }
}

#[test]
fn text_references_and_multibyte_characters_frame_as_the_reference() {
    let long = "x".repeat(100);
    let cases = [
        format!("<message><body>héllo 世界 🎉 &lt;&amp;&gt; &#x1F600; &#233;{long}&amp;{long}é</body></message>"),
        "<message><body>&amp</body></message>".to_string(),
        "<message><body>&#xD800;</body></message>".to_string(),
        "<message><body>a\u{1}b</body></message>".to_string(),
        "<message><body>\u{FFFE}</body></message>".to_string(),
        "<message><body>\u{FFFD}\u{FFFF}</body></message>".to_string(),
        "<message><body><![CDATA[ <a> ]] ]]]></body></message>".to_string(),
        "<message><body><!-- c --></body></message>".to_string(),
        "<message><?pi x?></message>".to_string(),
        "<message><body></message></body>".to_string(),
        "<message><body></body ></message\n>".to_string(),
        "<message><body></body x></message>".to_string(),
        "<message><1/></message>".to_string(),
        "<message></>".to_string(),
        "<message>< a/></message>".to_string(),
    ];
    for c in cases {
        assert_as_reference(&stream(&c), DEFAULT_LIMITS);
    }
    let mut bad = stream("<message><body>é");
    bad.extend_from_slice(&[0xc3, 0x28, 0xe4, 0xbd]);
    bad.extend_from_slice(b"</body></message>");
    assert_as_reference(&bad, DEFAULT_LIMITS);
}

#[test]
fn limits_hit_inside_fast_paths_as_in_the_reference() {
    let input = stream("<message to='user@example.com' type='chat'><body>text &amp; more text that goes on</body><x a='1' b='2' c='3'/><y><z><w/></z></y></message>");
    for bytes in (1..input.len() + 2).step_by(3) {
        for (depth, attrs) in [(64, 50), (2, 50), (3, 2), (1, 0)] {
            let l = Limits {
                bytes,
                depth,
                attrs,
            };
            assert_eq!(
                results(&input, &[], l),
                reference_results(&input, &[], l),
                "{bytes} {depth} {attrs}"
            );
            let cut = HDR.len() + bytes % 40;
            assert_eq!(
                results(&input, &[cut], l),
                reference_results(&input, &[cut], l),
                "{bytes} {depth} {attrs} cut {cut}"
            );
        }
    }
}

/// Random concatenations of XMPP fragments, good and bad, against the
/// reference, whole and split into random reads, under random limits.
#[test]
fn random_fragments_frame_as_the_reference() {
    const PIECES: &[&str] = &[
        HDR,
        "<stream:stream>",
        "</stream:stream>",
        "<?xml version='1.0'?>",
        "<message type='chat' to='u@example.com' id='m1'>",
        "</message>",
        "<body>",
        "</body>",
        "<iq type='get' id='1'>",
        "</iq>",
        "<x/>",
        "<a b='1' c=\"2\"/>",
        "<a b='>' c=\"'\"/>",
        "<a b='1' b='2'/>",
        "<a b='1'c='2'/>",
        "<a b=c/>",
        "<a b/>",
        "<a\n\tb = 'x' >",
        "</a>",
        "</a >",
        "héllo 世界 🎉 ",
        "plain words and more plain words, then still more of them ",
        "&amp;",
        "&lt;ok&gt;",
        "&#x41;",
        "&#0;",
        "&bogus;",
        "&",
        ";",
        "<",
        ">",
        "/",
        "=",
        "'",
        "\"",
        " ",
        "\t",
        "\n",
        "a",
        "<![CDATA[ a ]] ]]>",
        "<!-- c -->",
        "<!DOCTYPE x>",
        "<?pi?>",
        "\u{FFFE}",
        "\u{1}",
        "</>",
        "<1/>",
    ];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..4000 {
        let mut input: Vec<u8> = if rnd() % 4 == 0 {
            Vec::new()
        } else {
            HDR.as_bytes().to_vec()
        };
        for _ in 0..(rnd() % 24 + 1) {
            match rnd() % 40 {
                0 => input.push((rnd() & 0xff) as u8),
                1 => input.extend_from_slice(&[0xef, 0xbf, 0xbe][..(rnd() % 3 + 1) as usize]),
                _ => input
                    .extend_from_slice(PIECES[(rnd() % PIECES.len() as u64) as usize].as_bytes()),
            }
        }
        let l = match rnd() % 4 {
            0 => Limits {
                bytes: (rnd() % 300 + 1) as usize,
                ..DEFAULT_LIMITS
            },
            1 => Limits {
                bytes: 262_144,
                depth: (rnd() % 4 + 1) as u32,
                attrs: (rnd() % 3) as u32,
            },
            _ => DEFAULT_LIMITS,
        };
        let mut cuts: Vec<usize> = (0..rnd() % 6)
            .map(|_| (rnd() as usize) % (input.len() + 1))
            .collect();
        cuts.sort_unstable();
        assert_eq!(
            results(&input, &cuts, l),
            reference_results(&input, &cuts, l),
            "round {round}, cuts {cuts:?}: {:?}",
            String::from_utf8_lossy(&input)
        );
        if round % 50 == 0 {
            assert_as_reference(&input, l);
        }
    }
}

#[test]
fn mutated_captures_frame_as_the_reference() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for name in CAPTURES {
        let base = capture(name);
        for _ in 0..200 {
            let mut input = base.clone();
            for _ in 0..(rnd() % 8 + 1) {
                let at = (rnd() as usize) % input.len();
                input[at] = b"<>/='\"&; a\xc3\xef"[(rnd() % 12) as usize];
            }
            let cut = (rnd() as usize) % (input.len() + 1);
            for l in [
                DEFAULT_LIMITS,
                Limits {
                    bytes: 300,
                    ..DEFAULT_LIMITS
                },
            ] {
                assert_eq!(
                    results(&input, &[cut], l),
                    reference_results(&input, &[cut], l),
                    "{name} cut {cut}"
                );
            }
        }
    }
}

#[test]
fn word_searches_find_the_first_match() {
    let mut seed: u64 = 0x1234_5678_9abc_def1;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let len = (rnd() % 80) as usize;
        let s: Vec<u8> = (0..len)
            .map(|_| b"<&'\x00\x01\xff\x80a;"[(rnd() % 9) as usize])
            .collect();
        assert_eq!(
            find2(&s, b'<', b'&'),
            s.iter().position(|&c| c == b'<' || c == b'&'),
            "{s:?}"
        );
        assert_eq!(
            find3(&s, b'\'', b'<', b'&'),
            s.iter().position(|&c| c == b'\'' || c == b'<' || c == b'&'),
            "{s:?}"
        );
    }
}
