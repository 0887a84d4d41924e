use super::*;
use crate::xmpp::framer::{FrameKind, Framer};

/// Frames `xml` (first-level elements of an open stream) into whole elements.
fn frames(xml: &str) -> Vec<(Vec<u8>, Frame)> {
    let mut f = Framer::in_open_stream(1 << 20);
    let buf = xml.as_bytes();
    let mut at = 0;
    let mut out = Vec::new();
    while let Some(fr) = f.next(&buf[at..]).expect("test input frames") {
        if fr.kind == FrameKind::Stanza {
            out.push((buf[at..at + fr.len].to_vec(), fr));
        }
        at += fr.len;
    }
    assert_eq!(at, buf.len(), "test input ends with a whole element");
    out
}

/// One step of a captured session: `true` from the client.
type Step = (bool, &'static str);

/// A session as Prosody's smacks and a client run it: enable, stanzas of
/// every kind, acks that cover part of them, an ack request from the node.
const SESSION: &[Step] = &[
    (true, "<presence/>"),
    (
        true,
        "<message to='b@x' id='pre'><body>before enable</body></message>",
    ),
    (true, "<enable xmlns='urn:xmpp:sm:3' resume='true'/>"),
    (
        true,
        "<message to='b@x' id='m1' type='chat'><body>one</body></message>",
    ),
    (
        false,
        "<enabled xmlns='urn:xmpp:sm:3' id='sm-1' resume='true' max='600'/>",
    ),
    (
        true,
        "<iq type='get' id='q1'><ping xmlns='urn:xmpp:ping'/></iq>",
    ),
    (
        true,
        "<message to='b@x' id='m2' type='chat'><body>two</body></message>",
    ),
    (true, "<r xmlns='urn:xmpp:sm:3'/>"),
    (false, "<a xmlns='urn:xmpp:sm:3' h='2'/>"),
    (
        true,
        "<message to='b@x' id='e1' type='error'><error type='cancel'/></message>",
    ),
    (true, "<presence><show>away</show></presence>"),
    (false, "<r xmlns='urn:xmpp:sm:3'/>"),
    (true, "<a xmlns='urn:xmpp:sm:3' h='1'/>"),
    (
        true,
        "<message to='c@x' id='m3'><body>three</body></message>",
    ),
    (false, "<a xmlns='urn:xmpp:sm:3' h='5'/>"),
    (
        true,
        "<message to='c@x' id='m4'><body>four</body></message>",
    ),
    (true, "<message to='c@x' id='m5'/>"),
];

/// The ids a reference model expects unacknowledged after `steps`: stanzas
/// numbered from the `<enable/>`, messages (not errors) after the last `h`.
fn model(steps: &[Step]) -> Vec<String> {
    let mut on = false;
    let mut msgs: Vec<(u32, String)> = Vec::new();
    let mut n = 0u32;
    let mut h = 0u32;
    for (client, xml) in steps {
        let name = xml[1..].split([' ', '/', '>']).next().unwrap_or("");
        if *client {
            if name == "enable" {
                on = true;
                continue;
            }
            if on && matches!(name, "message" | "presence" | "iq") {
                n += 1;
                if name == "message" && !xml.contains("type='error'") {
                    let id = xml
                        .split("id='")
                        .nth(1)
                        .unwrap()
                        .split('\'')
                        .next()
                        .unwrap();
                    msgs.push((n, id.to_string()));
                }
            }
        } else if name == "a" {
            h = xml
                .split("h='")
                .nth(1)
                .unwrap()
                .split('\'')
                .next()
                .unwrap()
                .parse()
                .unwrap();
        }
    }
    msgs.into_iter()
        .filter(|(k, _)| *k > h)
        .map(|(_, id)| id)
        .collect()
}

fn run(acc: &mut StreamAccount, steps: &[Step]) {
    for (client, xml) in steps {
        for (b, f) in frames(xml) {
            if *client {
                acc.client_frame(&b, &f);
            } else if acc.watching() {
                acc.node_frame(&b, &f);
            }
        }
    }
}

fn bounced_ids(acc: &mut StreamAccount) -> Vec<String> {
    let (b, n) = acc.bounces(Some("a@x/r"));
    let s = String::from_utf8(b).unwrap();
    let ids: Vec<String> = s
        .split("<message ")
        .skip(1)
        .map(|m| {
            m.split("id='")
                .nth(1)
                .unwrap()
                .split('\'')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len() as u64, n);
    ids
}

#[test]
fn every_prefix_of_a_session_bounces_exactly_the_unacknowledged_messages() {
    for k in 0..=SESSION.len() {
        let mut acc = StreamAccount::new(SmLimits::default());
        run(&mut acc, &SESSION[..k]);
        assert_eq!(
            bounced_ids(&mut acc),
            model(&SESSION[..k]),
            "after {k} steps"
        );
        // Taken once: a second close bounces nothing.
        assert!(bounced_ids(&mut acc).is_empty());
        assert_eq!(acc.retained_bytes(), 0);
    }
}

#[test]
fn without_enable_nothing_is_counted_or_retained() {
    let mut acc = StreamAccount::new(SmLimits::default());
    let steps: Vec<Step> = SESSION
        .iter()
        .copied()
        .filter(|(_, x)| !x.starts_with("<enable"))
        .collect();
    run(&mut acc, &steps);
    assert_eq!(acc.state(), SmState::Off);
    assert!(!acc.watching());
    assert_eq!(acc.unacked_count(), 0);
    assert!(bounced_ids(&mut acc).is_empty());
}

#[test]
fn an_enable_in_another_namespace_is_not_stream_management() {
    let mut acc = StreamAccount::new(SmLimits::default());
    run(
        &mut acc,
        &[
            (true, "<enable xmlns='urn:xmpp:carbons:2'/>"),
            (true, "<message id='x'/>"),
        ],
    );
    assert_eq!(acc.state(), SmState::Off);
    assert!(bounced_ids(&mut acc).is_empty());
}

#[test]
fn a_failed_enable_switches_the_accounting_off() {
    let mut acc = StreamAccount::new(SmLimits::default());
    run(
        &mut acc,
        &[
            (true, "<enable xmlns='urn:xmpp:sm:3'/>"),
            (true, "<message to='b@x' id='m1'/>"),
            (false, "<failed xmlns='urn:xmpp:sm:3'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"),
            (true, "<message to='b@x' id='m2'/>"),
        ],
    );
    assert_eq!(acc.state(), SmState::Off);
    assert!(bounced_ids(&mut acc).is_empty());
}

#[test]
fn a_failed_resume_leaves_room_for_a_fresh_enable() {
    let mut acc = StreamAccount::new(SmLimits::default());
    run(
        &mut acc,
        &[
            (true, "<resume xmlns='urn:xmpp:sm:3' h='4' previd='old'/>"),
            (false, "<failed xmlns='urn:xmpp:sm:3'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"),
            (true, "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"),
            (true, "<enable xmlns='urn:xmpp:sm:3' resume='true'/>"),
            (false, "<enabled xmlns='urn:xmpp:sm:3'/>"),
            (true, "<message to='b@x' id='m1'/>"),
        ],
    );
    assert_eq!(acc.state(), SmState::On);
    assert_eq!(bounced_ids(&mut acc), ["m1"]);
}

#[test]
fn after_resumed_the_nodes_h_is_the_base() {
    let mut acc = StreamAccount::new(SmLimits::default());
    run(
        &mut acc,
        &[
            (true, "<resume xmlns='urn:xmpp:sm:3' h='4' previd='old'/>"),
            (true, "<message to='b@x' id='early'/>"),
            (
                false,
                "<resumed xmlns='urn:xmpp:sm:3' h='10' previd='old'/>",
            ),
            (true, "<message to='b@x' id='m11'/>"),
            (true, "<message to='b@x' id='m12'/>"),
            (false, "<a xmlns='urn:xmpp:sm:3' h='11'/>"),
        ],
    );
    assert_eq!(bounced_ids(&mut acc), ["m12"]);
}

#[test]
fn counting_wraps_at_two_to_the_32() {
    let mut acc = StreamAccount::new(SmLimits::default());
    run(
        &mut acc,
        &[
            (true, "<resume xmlns='urn:xmpp:sm:3' h='0' previd='old'/>"),
            (
                false,
                "<resumed xmlns='urn:xmpp:sm:3' h='4294967294' previd='old'/>",
            ),
            (true, "<message id='a'/>"),
            (true, "<message id='b'/>"),
            (true, "<message id='c'/>"),
            (false, "<a xmlns='urn:xmpp:sm:3' h='0'/>"),
        ],
    );
    assert_eq!(acc.unacked_count(), 1);
    assert_eq!(bounced_ids(&mut acc), ["c"]);
}

#[test]
fn an_h_beyond_what_was_sent_or_behind_the_last_is_ignored() {
    let mut acc = StreamAccount::new(SmLimits::default());
    run(
        &mut acc,
        &[
            (true, "<enable xmlns='urn:xmpp:sm:3'/>"),
            (false, "<enabled xmlns='urn:xmpp:sm:3'/>"),
            (true, "<message id='a'/>"),
            (true, "<message id='b'/>"),
            (false, "<a xmlns='urn:xmpp:sm:3' h='1'/>"),
            (false, "<a xmlns='urn:xmpp:sm:3' h='9'/>"),
            (false, "<a xmlns='urn:xmpp:sm:3' h='0'/>"),
            (false, "<a xmlns='urn:xmpp:sm:3' h='x'/>"),
            (false, "<a xmlns='urn:xmpp:sm:3'/>"),
        ],
    );
    assert_eq!(bounced_ids(&mut acc), ["b"]);
}

#[test]
fn beyond_the_limits_messages_are_not_retained_until_acks_make_room() {
    let limits = SmLimits {
        max_unacked_stanzas: 2,
        max_unacked_bytes: 1 << 20,
    };
    let mut acc = StreamAccount::new(limits);
    run(
        &mut acc,
        &[
            (true, "<enable xmlns='urn:xmpp:sm:3'/>"),
            (false, "<enabled xmlns='urn:xmpp:sm:3'/>"),
        ],
    );
    let mut kept = Vec::new();
    for xml in [
        "<message id='a'/>",
        "<message id='b'/>",
        "<message id='c'/>",
    ] {
        let (b, f) = frames(xml).remove(0);
        kept.push(acc.client_frame(&b, &f));
    }
    assert_eq!(kept, [Retained::Yes, Retained::Yes, Retained::OverLimit]);
    run(
        &mut acc,
        &[
            (false, "<a xmlns='urn:xmpp:sm:3' h='1'/>"),
            (true, "<message id='d'/>"),
        ],
    );
    assert_eq!(bounced_ids(&mut acc), ["b", "d"]);

    let small = SmLimits {
        max_unacked_stanzas: 100,
        max_unacked_bytes: 40,
    };
    let mut acc = StreamAccount::new(small);
    run(&mut acc, &[(true, "<enable xmlns='urn:xmpp:sm:3'/>")]);
    let (b, f) = frames("<message id='big'><body>0123456789012345678901234567890</body></message>")
        .remove(0);
    assert_eq!(acc.client_frame(&b, &f), Retained::OverLimit);
    let (b, f) = frames("<message id='s'/>").remove(0);
    assert_eq!(acc.client_frame(&b, &f), Retained::Yes);
    assert_eq!(acc.retained(), 1);
    assert_eq!(acc.retained_bytes(), b.len());
}

#[test]
fn a_bounce_is_a_well_formed_recipient_unavailable_error_from_the_original_recipient() {
    let mut out = Vec::new();
    bounce_into(
        &mut out,
        b"<message to=\"b&amp;'q@x/r\" id='i&lt;1' type='chat' xml:lang='en'><body>hi &amp; bye</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
        Some("a'b@x/res"),
    );
    let s = String::from_utf8(out).unwrap();
    assert_eq!(
        s,
        "<message type='error' from='b&amp;&apos;q@x/r' id='i&lt;1' to='a&apos;b@x/res'><body>hi &amp; bye</body><active xmlns='http://jabber.org/protocol/chatstates'/><error type='wait'><recipient-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    );
    let mut out = Vec::new();
    bounce_into(&mut out, b"<message id='z'/>", None);
    assert_eq!(
        out,
        b"<message type='error' id='z'><error type='wait'><recipient-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    );
    // Children that may use a prefix declared on the message are left out.
    let mut out = Vec::new();
    bounce_into(
        &mut out,
        b"<message xmlns:p='u' to='b@x'><p:x/></message>",
        None,
    );
    assert_eq!(
        out,
        b"<message type='error' from='b@x'><error type='wait'><recipient-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
    );
    // Every bounce of the session parses as XML.
    let mut acc = StreamAccount::new(SmLimits::default());
    run(&mut acc, SESSION);
    let (b, n) = acc.bounces(Some("a@x/r"));
    assert_eq!(n, 3);
    let mut r = quick_xml::Reader::from_reader(&b[..]);
    loop {
        match r.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("bounce is not well-formed: {e}"),
        }
    }
}
