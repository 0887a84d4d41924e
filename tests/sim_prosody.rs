//! Client-visible checks whose expected answers were taken from a real
//! Prosody 0.12.3 (plain c2s, PLAIN allowed, users `alice` and `bob` with
//! password `pw`): they guard that the simulated node answers like Prosody.

use std::net::SocketAddr;
use std::time::Duration;

use prg_proxy::sim::{ClientError, ClientTls, SimClient, SimNode, SimNodeConfig};

const D: &str = "example.com";
const T: Duration = Duration::from_secs(5);

async fn connect(addr: SocketAddr) -> SimClient {
    SimClient::connect(addr, D, ClientTls::None)
        .await
        .expect("connect")
}

async fn stream_error(c: &mut SimClient) -> (String, String) {
    loop {
        match c.recv(T).await {
            Ok(_) => continue,
            Err(ClientError::StreamError { condition, raw, .. }) => return (condition, raw),
            Err(e) => panic!("expected a stream error, got {e:?}"),
        }
    }
}

/// Checks whose outcome is the same on Prosody 0.12 and on the simulated node.
async fn exercise(addr: SocketAddr) {
    let mut bad = connect(addr).await;
    for mech in ["SCRAM-SHA-1", "PLAIN"] {
        match bad.login("alice", "wrong", mech).await {
            Err(ClientError::SaslFailure { condition, .. }) => {
                assert_eq!(condition, "not-authorized")
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    // Stanzas before authentication / before bind: stanza errors, stream stays.
    let mut g = connect(addr).await;
    g.send_raw("<message to='bob@example.com'><body>x</body></message>")
        .await
        .expect("send");
    let e = g.recv(T).await.expect("error");
    assert_eq!(
        (e.name.as_str(), e.attr("type"), e.attr("from")),
        ("message", Some("error"), Some("bob@example.com"))
    );
    assert!(e.has_child("service-unavailable"), "{}", e.raw);
    g.login("alice", "pw", "PLAIN").await.expect("plain");
    g.send_raw("<iq type='get' id='p2' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .expect("send");
    let e = g.recv(T).await.expect("error");
    assert_eq!((e.attr("id"), e.attr("type")), (Some("p2"), Some("error")));
    assert!(e.has_child("service-unavailable"), "{}", e.raw);
    let jg = g.bind("").await.expect("bind generated");
    assert!(
        jg.starts_with("alice@example.com/") && jg.len() > 18,
        "{jg}"
    );

    let mut a = connect(addr).await;
    assert!(a.mechanisms().iter().any(|m| m == "SCRAM-SHA-1"));
    assert!(a.mechanisms().iter().any(|m| m == "PLAIN"));
    a.login("alice", "pw", "SCRAM-SHA-1").await.expect("scram");
    assert!(a
        .features_raw()
        .contains("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><required/></bind>"));
    assert!(a
        .features_raw()
        .contains("<session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>"));
    assert_eq!(
        a.bind("desk").await.expect("bind"),
        "alice@example.com/desk"
    );
    let mut b = connect(addr).await;
    b.login("bob", "pw", "PLAIN").await.expect("plain");
    let jb = b.bind("phone").await.expect("bind");
    a.roster().await.expect("roster");
    a.ping().await.expect("ping");

    a.send_presence(Some("dnd"), Some("busy"))
        .await
        .expect("presence");
    let echo = a.wait_for(T, |s| s.name == "presence").await.expect("echo");
    assert_eq!(echo.attr("from"), Some("alice@example.com/desk"));
    assert_eq!(echo.child_text("show").as_deref(), Some("dnd"));

    a.send_message(&jb, "hi bob 😀 <&>").await.expect("message");
    let m = b
        .wait_for(T, |s| s.name == "message")
        .await
        .expect("message");
    assert_eq!(m.body().as_deref(), Some("hi bob 😀 <&>"));
    assert_eq!(m.attr("from"), Some("alice@example.com/desk"));
    assert_eq!(m.attr("to"), Some(jb.as_str()));

    a.send_raw("<iq type='get' id='u1'><query xmlns='urn:example:unknown'/></iq>")
        .await
        .expect("send");
    let r = a
        .wait_for(T, |s| s.attr("id") == Some("u1"))
        .await
        .expect("error");
    assert_eq!(r.attr("type"), Some("error"));
    assert_eq!(r.attr("from"), None);
    assert!(r.has_child("service-unavailable"));

    a.send_message("nobody@example.com", "x")
        .await
        .expect("send");
    let e = a.wait_for(T, |s| s.name == "message").await.expect("error");
    assert_eq!(
        (e.attr("type"), e.attr("from")),
        (Some("error"), Some("nobody@example.com"))
    );
    assert!(e.has_child("service-unavailable"));
    b.close().await.expect("close");

    // Same full JID twice: the old stream gets <conflict/>.
    let mut d2 = connect(addr).await;
    d2.login("alice", "pw", "PLAIN").await.expect("plain");
    d2.bind("desk").await.expect("bind");
    let (cond, raw) = stream_error(&mut a).await;
    assert_eq!(cond, "conflict", "{raw}");

    // Over-size stanza.
    d2.send_raw(&format!(
        "<message to='bob@example.com'><body>{}</body></message>",
        "x".repeat(300_000)
    ))
    .await
    .ok();
    let (cond, raw) = stream_error(&mut d2).await;
    assert_eq!(cond, "policy-violation", "{raw}");
    assert!(
        raw.contains("<stanza-too-big xmlns='urn:xmpp:errors'/>"),
        "{raw}"
    );

    // Bad XML. Restricted XML: Prosody says not-well-formed, the sim (as RFC
    // 6120 §11 and the proxy) restricted-xml.
    for (bad, want) in [
        ("<!DOCTYPE x>", &["restricted-xml", "not-well-formed"][..]),
        ("<!-- c -->", &["restricted-xml", "not-well-formed"][..]),
        ("<?pi x?>", &["restricted-xml", "not-well-formed"][..]),
        (
            "<message to='bob@example.com'><body>&foo;</body></message>",
            &["restricted-xml", "not-well-formed"][..],
        ),
        ("<message><body></message>", &["not-well-formed"][..]),
        ("<foo xmlns='urn:x'/>", &["unsupported-stanza-type"][..]),
    ] {
        let mut e = connect(addr).await;
        e.login("alice", "pw", "PLAIN").await.expect("plain");
        e.bind("").await.expect("bind");
        e.send_raw(bad).await.expect("send");
        let (cond, raw) = stream_error(&mut e).await;
        assert!(want.contains(&cond.as_str()), "{bad}: {raw}");
        assert!(matches!(e.recv(T).await, Err(ClientError::Closed)));
    }

    match SimClient::connect(addr, "other.org", ClientTls::None).await {
        Err(ClientError::StreamError {
            condition, text, ..
        }) => {
            assert_eq!(condition, "host-unknown");
            assert_eq!(
                text.as_deref(),
                Some("This server does not serve other.org")
            );
        }
        other => panic!("expected host-unknown, got {other:?}"),
    }
}

#[tokio::test]
async fn sim_node_answers_like_prosody() {
    let users = vec![
        ("alice".to_string(), "pw".to_string()),
        ("bob".to_string(), "pw".to_string()),
    ];
    let node = SimNode::start(SimNodeConfig::new("imp1", D, users))
        .await
        .expect("start");
    exercise(node.addr()).await;
}
