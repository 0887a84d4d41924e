//! Bad input from either side ends in the RFC 6120 §4.9.3 stream error a
//! user would look for (or a closed connection), within a bounded time,
//! without a panic, and without touching anyone else's session.
//!
//! Cases already covered elsewhere are not repeated: a DOCTYPE on the plain
//! port, a comment and an undeclared entity after login, a 300 KiB stanza and
//! a mismatched end tag after login (`relay.rs`); deep nesting and too many
//! attributes before login, an `<auth>` of 20 000 bytes, text that is not
//! base64 in `<auth>`, a node's over-size roster (`hardening.rs`); a
//! ClientHello that never comes (`tls.rs`).

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use common::*;
use prg_proxy::sim::{ClientError, SimClient};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::rustls;

const HEADER: &str = "<stream:stream to='example.com' xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";

/// A billion laughs: ten levels of ten references each.
fn billion_laughs() -> String {
    let mut dtd = String::from("<!DOCTYPE lolz [<!ENTITY lol0 \"lol\">");
    for i in 1..10 {
        let refs = format!("&lol{};", i - 1).repeat(10);
        dtd.push_str(&format!("<!ENTITY lol{i} \"{refs}\">"));
    }
    dtd.push_str("]><message><body>&lol9;</body></message>");
    dtd
}

fn plain_auth(text: &str) -> String {
    format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{text}</auth>")
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Expects the stream error `want` and then the end of the stream, both
/// within `T`; returns the raw error.
async fn ends_with(c: &mut SimClient, want: &str, case: &str) -> String {
    let start = Instant::now();
    let raw = match c.recv(T).await {
        Err(ClientError::StreamError { condition, raw, .. }) => {
            assert_eq!(condition, want, "{case}: {raw}");
            raw
        }
        other => panic!("{case}: expected <{want}/>, got {other:?}"),
    };
    assert!(
        matches!(c.recv(T).await, Err(ClientError::Closed)),
        "{case}: the stream is closed after the error"
    );
    eprintln!("{case}: <{want}/> in {:?}", start.elapsed());
    raw
}

/// Everything the proxy sends until it closes the connection (at most `T`).
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S, case: &str) -> String {
    let start = Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    let got = String::from_utf8_lossy(&out).into_owned();
    assert!(r.is_ok(), "{case}: not closed within {T:?}: {got}");
    eprintln!("{case}: closed in {:?}", start.elapsed());
    got
}

/// The condition of the stream error in `got`, if any.
fn condition(got: &str) -> Option<&str> {
    let rest = &got[got.find("<stream:error><")? + "<stream:error><".len()..];
    rest.split([' ', '/', '>']).next()
}

/// Reads until `pat` has arrived, dropping what came up to its end;
/// `false` when the peer closed first.
async fn read_until<S: AsyncRead + Unpin>(s: &mut S, seen: &mut Vec<u8>, pat: &str) -> bool {
    loop {
        if let Some(k) = String::from_utf8_lossy(seen).find(pat) {
            seen.drain(..k + pat.len());
            return true;
        }
        let mut b = [0u8; 4096];
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&b[..n]),
        }
    }
}

/// Expects `pat` from the proxy within `T`.
async fn expect<S: AsyncRead + Unpin>(s: &mut S, pat: &str, case: &str) {
    let mut seen = Vec::new();
    let r = tokio::time::timeout(T, read_until(s, &mut seen, pat)).await;
    assert!(r == Ok(true), "{case}: no {pat} within {T:?}");
}

/// A plain connection to the STARTTLS port, past the proxy's features.
async fn plain(g: &TestGroup) -> TcpStream {
    let mut s = TcpStream::connect(g.starttls).await.unwrap();
    s.write_all(HEADER.as_bytes()).await.unwrap();
    expect(&mut s, "</stream:features>", "plain stream").await;
    s
}

/// RFC 6120 §11: DTDs (entity bombs, external entities), comments,
/// processing instructions and undeclared entities get `<restricted-xml/>`
/// before login (after TLS) and after login, and the user next door is
/// served throughout.
#[tokio::test]
async fn entity_bombs_external_entities_comments_pis_and_undeclared_entities_get_restricted_xml() {
    let g = TestGroup::start().await;
    let mut bob = g.login("bob", "PLAIN", "b").await;
    let cases: [(&str, String); 7] = [
        ("billion laughs", billion_laughs()),
        (
            "external entity",
            "<!DOCTYPE m [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]><message><body>&xxe;</body></message>".into(),
        ),
        (
            "external parameter entity",
            "<!DOCTYPE m [<!ENTITY % p SYSTEM \"http://127.0.0.1:9/x.dtd\"> %p;]>".into(),
        ),
        ("comment", "<!-- who reads this? -->".into()),
        ("processing instruction", "<?xml-stylesheet href='x.xsl'?>".into()),
        (
            "processing instruction in a stanza",
            "<message><?php system('id'); ?><body>x</body></message>".into(),
        ),
        (
            "undeclared entity",
            "<message><body>&nbsp;</body></message>".into(),
        ),
    ];
    for (case, xml) in &cases {
        let mut c = g.client().await;
        c.send_raw(xml).await.unwrap();
        ends_with(&mut c, "restricted-xml", &format!("{case}, before login")).await;
        let mut alice = g.login("alice", "SCRAM-SHA-1", "a").await;
        alice.send_raw(xml).await.unwrap();
        ends_with(
            &mut alice,
            "restricted-xml",
            &format!("{case}, after login"),
        )
        .await;
    }
    // An undeclared entity inside the <auth> itself.
    let mut c = g.client().await;
    c.send_raw(&plain_auth("&xxe;")).await.unwrap();
    ends_with(&mut c, "restricted-xml", "undeclared entity in <auth>").await;
    bob.ping().await.unwrap();
    assert_eq!(
        g.view
            .metrics
            .logins_routed
            .load(std::sync::atomic::Ordering::Relaxed),
        8,
        "bob and the seven logins after the bad input"
    );
}

/// Bad characters and broken markup get `<not-well-formed/>` before login
/// (in the `<auth>`) and after login (in a message), never reaching the
/// node: invalid, overlong and surrogate UTF-8, NUL and other control
/// characters (raw or as character references), U+FFFE, mismatched end
/// tags, duplicate and value-less attributes.
#[tokio::test]
async fn invalid_utf8_control_characters_and_broken_markup_get_not_well_formed() {
    let g = TestGroup::start().await;
    let mut bob = g.login("bob", "PLAIN", "b").await;
    let cases: [(&str, &[u8]); 13] = [
        ("invalid UTF-8", b"\xff\xfe"),
        ("overlong UTF-8 '/'", b"\xc0\xaf"),
        ("overlong UTF-8 three bytes", b"\xe0\x80\xaf"),
        ("UTF-8 surrogate", b"\xed\xa0\x80"),
        ("truncated UTF-8", b"\xe2\x82"),
        ("NUL", b"a\x00b"),
        ("escape character", b"\x1b[2J"),
        ("NUL character reference", b"&#0;"),
        ("control character reference", b"&#x1B;"),
        ("surrogate character reference", b"&#xD800;"),
        ("character reference beyond Unicode", b"&#1114112;"),
        ("U+FFFE", "\u{FFFE}".as_bytes()),
        ("mismatched end tags", b"<a><b></a></b>"),
    ];
    for (case, bad) in cases {
        let mut auth = format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>").into_bytes();
        auth.extend_from_slice(bad);
        auth.extend_from_slice(b"</auth>");
        let mut c = g.client().await;
        c.send_bytes(&auth).await.unwrap();
        ends_with(&mut c, "not-well-formed", &format!("{case}, before login")).await;

        let mut msg = b"<message to='bob@example.com' type='chat'><body>".to_vec();
        msg.extend_from_slice(bad);
        msg.extend_from_slice(b"</body></message>");
        let mut alice = g.login("alice", "PLAIN", "a").await;
        alice.send_bytes(&msg).await.unwrap();
        ends_with(
            &mut alice,
            "not-well-formed",
            &format!("{case}, after login"),
        )
        .await;
    }
    for (case, xml) in [
        (
            "duplicate attribute",
            "<presence type='unavailable' type='probe'/>",
        ),
        ("attribute without a value", "<presence type/>"),
        (
            "attributes without a space",
            "<message to='bob@example.com'type='chat'/>",
        ),
        ("unquoted attribute", "<message to=bob@example.com/>"),
    ] {
        let mut alice = g.login("alice", "PLAIN", "a").await;
        alice.send_raw(xml).await.unwrap();
        ends_with(&mut alice, "not-well-formed", case).await;
    }
    // Bob received none of it, and is served.
    bob.ping().await.unwrap();
    let mut carol = g.login("carol", "PLAIN", "c").await;
    carol
        .send_message("bob@example.com/b", "fine")
        .await
        .unwrap();
    let m = bob.wait_for(T, |s| s.name == "message").await.unwrap();
    assert_eq!(m.body().as_deref(), Some("fine"), "{}", m.raw);
}

/// Invalid UTF-8 on the plain port, before TLS, is refused as well.
#[tokio::test]
async fn invalid_utf8_before_tls_gets_not_well_formed() {
    let g = TestGroup::start().await;
    let mut s = plain(&g).await;
    s.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls' a='\xc0\xaf'/>")
        .await
        .unwrap();
    let got = read_to_close(&mut s, "invalid UTF-8 before TLS").await;
    assert_eq!(condition(&got), Some("not-well-formed"), "{got}");
}

/// The size limits are exact: an element of exactly the limit passes, one
/// byte more gets `<policy-violation/>` naming the limit, before login
/// (`pre_auth_stanza_bytes`) and after (`max_stanza_bytes`).
#[tokio::test]
async fn an_element_of_the_limit_passes_and_one_byte_more_gets_policy_violation() {
    let g = TestGroup::start_with(
        "balanced",
        "[limits]\npre_auth_stanza_bytes = 1024\nmax_stanza_bytes = 10000\ninject_queue_bytes = 10000\n",
        |_| {},
    )
    .await;
    // Before login: an <auth> padded with spaces (ignored around base64).
    let auth = |len: usize| {
        let short = plain_auth(&b64(b"\0alice\0pw"));
        plain_auth(&format!(
            "{}{}",
            " ".repeat(len - short.len()),
            b64(b"\0alice\0pw")
        ))
    };
    let mut c = g.client().await;
    assert_eq!(auth(1024).len(), 1024);
    let ok = c.sasl_raw(&auth(1024)).await.unwrap();
    assert_eq!(ok.name, "success", "{}", ok.raw);
    let mut c = g.client().await;
    c.send_raw(&auth(1025)).await.unwrap();
    let raw = ends_with(&mut c, "policy-violation", "<auth> of limit + 1 bytes").await;
    assert!(raw.contains("1024"), "{raw}");

    // After login: a headline to nobody (dropped by the node) of exactly
    // the limit, then one byte more.
    let msg = |len: usize| {
        let short = "<message type='headline' to='nobody@example.com'><body></body></message>";
        format!(
            "<message type='headline' to='nobody@example.com'><body>{}</body></message>",
            "x".repeat(len - short.len())
        )
    };
    let mut alice = g.login("alice", "PLAIN", "a").await;
    assert_eq!(msg(10_000).len(), 10_000);
    alice.send_raw(&msg(10_000)).await.unwrap();
    alice.ping().await.unwrap();
    alice.send_raw(&msg(10_001)).await.unwrap();
    let raw = ends_with(&mut alice, "policy-violation", "stanza of limit + 1 bytes").await;
    assert!(raw.contains("10000"), "{raw}");
}

/// After login too (the relay's framer, not the pre-auth one), nesting
/// deeper than `limits.max_depth` and more attributes than
/// `limits.max_attributes` get `<policy-violation/>` at once; the user
/// next door is served.
#[tokio::test]
async fn deep_nesting_and_many_attributes_after_login_get_policy_violation() {
    let g = TestGroup::start().await;
    let mut bob = g.login("bob", "PLAIN", "b").await;
    let attrs: String = (0..51).map(|i| format!(" a{i}='x'")).collect();
    for (case, xml, says) in [
        (
            "deep nesting after login",
            "<a>".repeat(2000),
            "nested deeper",
        ),
        (
            "51 attributes after login",
            format!("<message to='bob@example.com'><x{attrs}/></message>"),
            "attributes",
        ),
    ] {
        let mut alice = g.login("alice", "PLAIN", "a").await;
        let _ = alice.send_raw(&xml).await;
        let raw = ends_with(&mut alice, "policy-violation", case).await;
        assert!(raw.contains(says), "{case}: {raw}");
    }
    bob.ping().await.unwrap();
}

/// A slow drip of one `<auth>` (a byte every 50 ms, never finished) is cut
/// by the pre-auth deadline with `<connection-timeout/>`; the user next
/// door is served meanwhile.
#[tokio::test]
async fn a_slow_drip_of_one_stanza_is_cut_by_the_pre_auth_deadline() {
    let g = TestGroup::start_with(
        "balanced",
        "[limits]\npre_auth_timeout = \"800ms\"\n",
        |_| {},
    )
    .await;
    let mut bob = g.login("bob", "PLAIN", "b").await;
    let mut c = g.client().await;
    let start = Instant::now();
    let drip = plain_auth(&"A".repeat(400));
    // A byte, then 50 ms of listening for the proxy's answer.
    let mut answer = None;
    for b in drip.as_bytes() {
        if c.send_bytes(std::slice::from_ref(b)).await.is_err() {
            break; // closed by the proxy: its error is read below
        }
        match c.recv(Duration::from_millis(50)).await {
            Err(ClientError::Timeout) => continue,
            other => {
                answer = Some(other);
                break;
            }
        }
    }
    let took = start.elapsed();
    let answer = match answer {
        Some(a) => a,
        None => c.recv(T).await,
    };
    match answer {
        Err(ClientError::StreamError { condition, .. }) => {
            assert_eq!(condition, "connection-timeout")
        }
        other => panic!("expected <connection-timeout/>, got {other:?}"),
    }
    eprintln!("slow drip of one <auth>: <connection-timeout/> after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "cut by the deadline, not by the end of the drip: {took:?}"
    );
    assert!(matches!(c.recv(T).await, Err(ClientError::Closed)));
    bob.ping().await.unwrap();
}

/// A second stream header where a stanza belongs: before login it is no
/// `<auth>` (`<not-authorized/>`), on the plain port no `<starttls/>`
/// (`<policy-violation/>`). After login the proxy relays the client's
/// headers to the node (the restart after SASL success is one), and the
/// node refuses a header on its open stream with `<not-well-formed/>`,
/// which reaches the client; the user next door is served.
#[tokio::test]
async fn a_second_stream_header_is_refused_before_and_after_login() {
    let g = TestGroup::start().await;
    let mut bob = g.login("bob", "PLAIN", "b").await;
    let mut c = g.client().await;
    c.send_raw(HEADER).await.unwrap();
    ends_with(&mut c, "not-authorized", "second stream header after TLS").await;
    let mut s = plain(&g).await;
    s.write_all(HEADER.as_bytes()).await.unwrap();
    let got = read_to_close(&mut s, "second stream header before TLS").await;
    assert_eq!(condition(&got), Some("policy-violation"), "{got}");
    let mut alice = g.login("alice", "PLAIN", "a").await;
    alice.send_raw(HEADER).await.unwrap();
    ends_with(
        &mut alice,
        "not-well-formed",
        "second stream header after login",
    )
    .await;
    bob.ping().await.unwrap();
}

/// Plaintext pipelined after `<starttls/>` is refused (it would be read as
/// if it came over TLS), while whitespace after it (a newline, a keep-alive)
/// is no attack: the upgrade goes on and the user logs in.
#[tokio::test]
async fn plaintext_after_starttls_is_refused_but_whitespace_after_it_is_not() {
    let g = TestGroup::start().await;
    let mut s = plain(&g).await;
    s.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHB3</auth>")
        .await
        .unwrap();
    let got = read_to_close(&mut s, "plaintext pipelined after <starttls/>").await;
    assert_eq!(condition(&got), Some("policy-violation"), "{got}");
    assert!(got.contains("data after &lt;starttls/&gt;"), "{got}");
    assert!(!got.contains("<proceed"), "{got}");

    for trailing in [" ", "\n", "\r\n\t "] {
        let mut s = plain(&g).await;
        s.write_all(
            format!("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>{trailing}").as_bytes(),
        )
        .await
        .unwrap();
        let case = format!("{trailing:?} after <starttls/>");
        expect(&mut s, "<proceed", &case).await;
        let name = rustls_pki_types::ServerName::try_from(DOMAIN).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(g.certs.client.clone())
            .connect(name, s)
            .await
            .unwrap_or_else(|e| panic!("{trailing:?}: TLS after <proceed/>: {e}"));
        tls.write_all(HEADER.as_bytes()).await.unwrap();
        tls.write_all(plain_auth(&b64(b"\0alice\0pw")).as_bytes())
            .await
            .unwrap();
        expect(&mut tls, "<success", &case).await;
    }
}

/// SASL payloads that are empty, `=`, not base64 (in a `<response>`) or
/// huge get a SASL failure saying what is wrong; the stream stays usable.
#[tokio::test]
async fn empty_equals_sign_and_huge_sasl_payloads_get_sasl_failures() {
    let g = TestGroup::start().await;
    let mut c = g.client().await;
    // No initial response: the proxy asks for it; an empty answer is no user.
    let ch = c
        .sasl_raw(&format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'/>"))
        .await
        .unwrap();
    assert_eq!(ch.name, "challenge", "{}", ch.raw);
    let r = c.sasl_raw(&format!("<response xmlns='{NS_SASL}'/>")).await;
    sasl_condition(r, "malformed-request", "empty response");
    let r = c.sasl_raw(&plain_auth("=")).await;
    sasl_condition(r, "malformed-request", "'=' (an empty response)");
    let ch = c
        .sasl_raw(&format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'/>"))
        .await
        .unwrap();
    assert_eq!(ch.name, "challenge");
    let r = c
        .sasl_raw(&format!("<response xmlns='{NS_SASL}'>%%%</response>"))
        .await;
    sasl_condition(r, "incorrect-encoding", "<response> not base64");
    // Huge but under the pre-auth cap: 12 000 bytes of base64 naming nobody.
    let huge = b64(&[b'x'; 9000]);
    let r = c.sasl_raw(&plain_auth(&huge)).await;
    sasl_condition(r, "malformed-request", "huge payload");
    // The stream is still good for a real login (max_auth_attempts = 5).
    c.login("alice", "pw", "PLAIN").await.unwrap();
    c.bind("a").await.unwrap();
}

fn sasl_condition(r: Result<prg_proxy::sim::Stanza, ClientError>, want: &str, case: &str) {
    match r {
        Err(ClientError::SaslFailure { condition, raw, .. }) => {
            assert_eq!(condition, want, "{case}: {raw}");
            eprintln!("{case}: SASL <{want}/>");
        }
        other => panic!("{case}: expected SASL <{want}/>, got {other:?}"),
    }
}

/// A ClientHello that offers only TLS 1.0 or 1.1 fails the handshake
/// cleanly: a fatal alert, the connection closed, the listener still
/// serving. Without `signature_algorithms` (which TLS 1.0 and 1.1 clients
/// do not send) rustls finds no certificate to offer first and says
/// `handshake_failure`; with it, `protocol_version`.
#[tokio::test]
async fn tls_1_0_and_1_1_offers_get_a_fatal_alert_and_a_close() {
    let g = TestGroup::start().await;
    for (case, version, sigalgs, alert) in [
        ("TLS 1.0", [3u8, 1], false, 40u8),
        ("TLS 1.1", [3, 2], false, 40),
        ("TLS 1.0 with signature_algorithms", [3, 1], true, 70),
        ("TLS 1.1 with signature_algorithms", [3, 2], true, 70),
    ] {
        let mut s = TcpStream::connect(g.direct).await.unwrap();
        s.write_all(&legacy_client_hello(version, sigalgs))
            .await
            .unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        let r = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "{case}: closed in time");
        eprintln!(
            "{case}: answered {out:02x?}, closed in {:?}",
            start.elapsed()
        );
        assert_eq!(
            out.first(),
            Some(&0x15),
            "{case}: an alert record: {out:02x?}"
        );
        assert_eq!(out.get(5), Some(&2), "{case}: fatal: {out:02x?}");
        assert_eq!(out.get(6), Some(&alert), "{case}: {out:02x?}");
    }
    let mut c = SimClient::connect(g.direct, DOMAIN, g.direct_tls())
        .await
        .unwrap();
    c.login("alice", "pw", "PLAIN").await.unwrap();
}

/// A ClientHello record offering only `version` (no supported_versions
/// extension), with TLS 1.0-era suites, SNI `example.com` and, if asked,
/// `signature_algorithms`.
fn legacy_client_hello(version: [u8; 2], sigalgs: bool) -> Vec<u8> {
    let mut body = version.to_vec();
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    let suites: [u16; 4] = [0xc013, 0xc014, 0x002f, 0x0035];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // null compression
    let name = DOMAIN.as_bytes();
    let mut sni = ((name.len() + 3) as u16).to_be_bytes().to_vec();
    sni.push(0); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut ext = 0u16.to_be_bytes().to_vec(); // server_name
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni);
    if sigalgs {
        // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
        let schemes: [u16; 3] = [0x0403, 0x0804, 0x0401];
        ext.extend_from_slice(&13u16.to_be_bytes());
        ext.extend_from_slice(&((schemes.len() * 2 + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&((schemes.len() * 2) as u16).to_be_bytes());
        for s in schemes {
            ext.extend_from_slice(&s.to_be_bytes());
        }
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1]; // client_hello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// Checks the proxy's certificate against `example.com` whatever name the
/// client sent as SNI.
#[derive(Debug)]
struct VerifyAs(Arc<dyn rustls::client::danger::ServerCertVerifier>);

impl rustls::client::danger::ServerCertVerifier for VerifyAs {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = rustls_pki_types::ServerName::try_from(DOMAIN).unwrap();
        self.0
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// An SNI name the proxy has no certificate for gets the default one (the
/// handshake completes), and a stream to that domain `<host-unknown/>`.
#[tokio::test]
async fn an_unknown_sni_name_gets_the_default_certificate_and_host_unknown() {
    let g = TestGroup::start().await;
    let ca = std::fs::read_to_string(g.certs.dir.path().join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in prg_proxy::tls::certs_from_pem(&ca) {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(VerifyAs(inner)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let tcp = TcpStream::connect(g.direct).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("unknown.example").unwrap();
    let mut tls = tokio::time::timeout(
        T,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .unwrap()
    .expect("the default certificate, valid for example.com");
    tls.write_all(HEADER.replace("example.com", "unknown.example").as_bytes())
        .await
        .unwrap();
    let got = read_to_close(&mut tls, "unknown SNI").await;
    assert_eq!(condition(&got), Some("host-unknown"), "{got}");
}

/// Writes the first TLS record (the ClientHello) one byte per write with a
/// pause after each; everything after it at once.
struct Dribble {
    tcp: TcpStream,
    gap: Duration,
    /// Bytes of the first record still to dribble (`None` before the first write).
    left: Option<usize>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncWrite for Dribble {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = &mut *self;
        if me.left.is_none() && buf.len() >= 5 {
            me.left = Some(5 + u16::from_be_bytes([buf[3], buf[4]]) as usize);
        }
        if me.left.unwrap_or(0) == 0 {
            return Pin::new(&mut me.tcp).poll_write(cx, buf);
        }
        if let Some(p) = me.pause.as_mut() {
            if p.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            me.pause = None;
        }
        match Pin::new(&mut me.tcp).poll_write(cx, &buf[..1]) {
            Poll::Ready(Ok(n)) => {
                me.left = me.left.map(|l| l - n);
                me.pause = Some(Box::pin(tokio::time::sleep(me.gap)));
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl AsyncRead for Dribble {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

async fn dribbled_handshake(
    g: &TestGroup,
    gap: Duration,
) -> Result<tokio_rustls::client::TlsStream<Dribble>, std::io::Error> {
    let tcp = TcpStream::connect(g.direct).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let io = Dribble {
        tcp,
        gap,
        left: None,
        pause: None,
    };
    let mut cfg = (*g.certs.client).clone();
    cfg.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let name = rustls_pki_types::ServerName::try_from(DOMAIN).unwrap();
    tokio::time::timeout(
        T,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, io),
    )
    .await
    .expect("the handshake ends in time")
}

/// A ClientHello dribbled one byte at a time completes when it arrives
/// within `limits.tls_handshake_timeout`, and the stream is served; one
/// slower than that is cut by the timeout.
#[tokio::test]
async fn a_dribbled_client_hello_completes_or_is_cut_by_the_handshake_timeout() {
    let g = TestGroup::start_with(
        "balanced",
        "[limits]\ntls_handshake_timeout = \"3s\"\n",
        |_| {},
    )
    .await;
    let start = Instant::now();
    let mut tls = dribbled_handshake(&g, Duration::from_millis(1))
        .await
        .expect("a dribbled ClientHello within the timeout completes");
    eprintln!("dribbled ClientHello: handshake in {:?}", start.elapsed());
    tls.write_all(HEADER.as_bytes()).await.unwrap();
    expect(&mut tls, "</stream:features>", "dribbled ClientHello").await;

    // 50 ms a byte: a ClientHello of a few hundred bytes takes over 10 s.
    let start = Instant::now();
    let r = dribbled_handshake(&g, Duration::from_millis(50)).await;
    let took = start.elapsed();
    eprintln!(
        "slow dribbled ClientHello: {r:?} after {took:?}",
        r = r.as_ref().map(|_| ())
    );
    assert!(r.is_err(), "cut before the ClientHello was complete");
    assert!(
        took >= Duration::from_secs(3),
        "not before the timeout: {took:?}"
    );
}

/// How the fake node behaves once a client's `<auth>` arrived.
#[derive(Clone, Copy, Debug)]
enum Fake {
    /// Accepts TCP and never says a word.
    Mute,
    /// Answers the `<auth>` with malformed XML.
    BadXmlInSasl,
    /// Answers the `<auth>` with a stanza that never ends.
    EndlessInSasl,
    /// Answers the `<auth>` with elements nested 1000 deep.
    DeepInSasl,
    /// Reads the `<auth>` and never answers it.
    SilentAfterAuth,
    /// Logs the user in, then answers the first stanza with malformed XML.
    BadXmlAfterLogin,
}

/// A fake node on a loopback listener: each connection gets a stream
/// header and PLAIN, then `how`.
async fn fake_node(how: Fake) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(fake_session(s, how));
        }
    });
    addr
}

const NODE_HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' from='example.com' id='fake' version='1.0'>";

async fn fake_session(mut s: TcpStream, how: Fake) {
    let mut seen = Vec::new();
    if !matches!(how, Fake::Mute) && read_until(&mut s, &mut seen, "<stream:stream").await {
        let features = format!("<stream:features><mechanisms xmlns='{NS_SASL}'><mechanism>PLAIN</mechanism></mechanisms></stream:features>");
        let _ = s
            .write_all(format!("{NODE_HEADER}{features}").as_bytes())
            .await;
        if read_until(&mut s, &mut seen, "</auth>").await {
            let _ = match how {
                Fake::BadXmlInSasl => {
                    s.write_all(format!("<success xmlns='{NS_SASL}'><</success>").as_bytes())
                        .await
                }
                Fake::EndlessInSasl => {
                    let _ = s
                        .write_all(format!("<challenge xmlns='{NS_SASL}'>").as_bytes())
                        .await;
                    let chunk = vec![b'A'; 16 * 1024];
                    // Until the proxy gives up and closes.
                    while s.write_all(&chunk).await.is_ok() {}
                    return;
                }
                Fake::DeepInSasl => {
                    let deep = format!("<challenge xmlns='{NS_SASL}'>{}", "<a>".repeat(1000));
                    s.write_all(deep.as_bytes()).await
                }
                Fake::BadXmlAfterLogin => {
                    let _ = s
                        .write_all(format!("<success xmlns='{NS_SASL}'/>").as_bytes())
                        .await;
                    if read_until(&mut s, &mut seen, "<stream:stream").await {
                        let _ = s.write_all(format!("{NODE_HEADER}<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>").as_bytes()).await;
                    }
                    if read_until(&mut s, &mut seen, "<iq").await {
                        let _ = s
                            .write_all(b"<iq type='result' id='x'><bind><jid>a@b</bind></jid></iq>")
                            .await;
                    }
                    Ok(())
                }
                Fake::Mute | Fake::SilentAfterAuth => Ok(()),
            };
        }
    }
    // Hold the connection open until the proxy closes it.
    let mut b = [0u8; 4096];
    while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
}

/// A group whose node 1 (alice's home) is the fake node and node 2 (dave's)
/// a simulated one.
async fn with_fake_node(how: Fake, limits: &str) -> TestGroup {
    let fake = fake_node(how).await;
    let pair = sim_pair().await;
    let certs = Certs::new();
    let text = config_text(&[fake, pair.nodes[1].addr()], "balanced", &certs, limits);
    let g = TestGroup::launch(pair, certs, &text).await;
    assert_eq!(g.view.home("alice@example.com"), Ok(N1));
    assert_eq!(g.view.home("dave@example.com"), Ok(N2));
    g
}

/// From the node side, each ending reaches the client with an accurate
/// error, and dave, on the other node, is served throughout: a node that
/// accepts TCP and never answers (`<temporary-auth-failure/>` after
/// `upstream_connect_timeout`), one that never answers the `<auth>`
/// (`<remote-connection-failed/>` at the login deadline), malformed XML
/// during SASL and after login, a never-ending or too deeply nested stanza
/// during SASL (`<internal-server-error/>`: the node is the service's own,
/// RFC 6120 §4.9.3.17).
#[tokio::test]
async fn a_misbehaving_node_ends_that_stream_with_an_accurate_error() {
    let limits = "[limits]\nupstream_connect_timeout = \"500ms\"\npre_auth_timeout = \"1500ms\"\n\
                  max_stanza_bytes = 20000\ninject_queue_bytes = 20000\n";

    let g = with_fake_node(Fake::Mute, limits).await;
    let mut dave = g.login("dave", "PLAIN", "d").await;
    let mut c = g.client().await;
    let start = Instant::now();
    match c.login("alice", "pw", "PLAIN").await {
        Err(ClientError::SaslFailure {
            condition, text, ..
        }) => {
            assert_eq!(condition, "temporary-auth-failure");
            let text = text.unwrap_or_default();
            assert!(text.contains("did not answer within 500ms"), "{text}");
        }
        other => panic!("mute node: {other:?}"),
    }
    eprintln!(
        "Mute: SASL <temporary-auth-failure/> in {:?}",
        start.elapsed()
    );
    dave.ping().await.unwrap();

    for (how, want, says) in [
        (
            Fake::SilentAfterAuth,
            "remote-connection-failed",
            "did not answer",
        ),
        (Fake::BadXmlInSasl, "internal-server-error", "invalid XML"),
        (
            Fake::EndlessInSasl,
            "internal-server-error",
            "larger than the limit of 20000 bytes",
        ),
        (Fake::DeepInSasl, "internal-server-error", "nested deeper"),
        (
            Fake::BadXmlAfterLogin,
            "internal-server-error",
            "invalid XML",
        ),
    ] {
        let g = with_fake_node(how, limits).await;
        let mut dave = g.login("dave", "PLAIN", "d").await;
        let mut c = g.client().await;
        let start = Instant::now();
        let r = match c.login("alice", "pw", "PLAIN").await {
            Ok(()) => c.bind("a").await.map(|_| ()),
            Err(e) => Err(e),
        };
        let raw = stream_error(r, want);
        assert!(raw.contains(says), "{how:?}: {raw}");
        eprintln!("{how:?}: <{want}/> in {:?}", start.elapsed());
        dave.ping().await.unwrap();
    }
}
