//! Integration tests of the simulated node and the test client.

use std::sync::Arc;
use std::time::Duration;

use prg_proxy::sim::{
    ClientError, ClientTls, LoginCapacity, Roster, SimClient, SimNode, SimNodeConfig, SimPair,
};
use tokio_rustls::rustls;

const D: &str = "example.com";
const T: Duration = Duration::from_secs(5);

fn users() -> Vec<(String, String)> {
    ["alice", "bob", "carol"]
        .iter()
        .map(|u| (u.to_string(), "pw".to_string()))
        .collect()
}

fn cfg(name: &str) -> SimNodeConfig {
    let mut c = SimNodeConfig::new(name, D, users());
    c.scram_iterations = 4096;
    c
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// (server config, client config) for a fresh self-signed `example.com` certificate.
fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec![D.to_string()]).expect("cert");
    let cert_der = ck.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

async fn online(node: &SimNode, user: &str, res: &str) -> SimClient {
    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    c.login(user, "pw", "SCRAM-SHA-1").await.expect("login");
    c.bind(res).await.expect("bind");
    c
}

#[tokio::test]
async fn features_and_login_plain_and_scram() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    assert_eq!(c.mechanisms(), vec!["SCRAM-SHA-1", "PLAIN"]);
    assert!(c
        .features_raw()
        .contains("<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"));
    assert!(!c.features_raw().contains("starttls"));
    c.login("alice", "pw", "PLAIN").await.expect("plain login");
    assert!(c
        .features_raw()
        .contains("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"));
    assert!(c
        .features_raw()
        .contains("<session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>"));

    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    c.login("bob", "pw", "SCRAM-SHA-1")
        .await
        .expect("scram login");
    assert_eq!(node.logins_total(), 2);

    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    match c.login("alice", "wrong", "PLAIN").await {
        Err(ClientError::SaslFailure { condition, .. }) => assert_eq!(condition, "not-authorized"),
        other => panic!("expected failure, got {other:?}"),
    }
    // Retry on the same stream works.
    match c.login("alice", "wrong", "SCRAM-SHA-1").await {
        Err(ClientError::SaslFailure { condition, .. }) => assert_eq!(condition, "not-authorized"),
        other => panic!("expected failure, got {other:?}"),
    }
    match c.login("nobody", "pw", "SCRAM-SHA-1").await {
        Err(ClientError::SaslFailure { condition, .. }) => assert_eq!(condition, "not-authorized"),
        other => panic!("expected failure, got {other:?}"),
    }
    c.login("alice", "pw", "SCRAM-SHA-1")
        .await
        .expect("login after failures");
    assert_eq!(node.logins_total(), 3);
}

#[tokio::test]
async fn advertised_only_mechanism_and_abort() {
    let mut conf = cfg("imp1");
    conf.mechanisms = vec![
        "SCRAM-SHA-1-PLUS".into(),
        "SCRAM-SHA-1".into(),
        "PLAIN".into(),
    ];
    let node = SimNode::start(conf).await.expect("start");
    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    assert!(c.mechanisms().contains(&"SCRAM-SHA-1-PLUS".to_string()));
    c.send_raw("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1-PLUS'>eSwsbj11LHI9YQ==</auth>")
        .await
        .expect("send");
    let f = c.recv(T).await.expect("failure");
    assert_eq!(f.name, "failure");
    assert!(f.has_child("invalid-mechanism"), "{}", f.raw);
    c.send_raw("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>biwsbj1hbGljZSxyPWFiYw==</auth>")
        .await
        .expect("send");
    assert_eq!(c.recv(T).await.expect("challenge").name, "challenge");
    c.send_raw("<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
        .await
        .expect("send");
    let f = c.recv(T).await.expect("failure");
    assert!(f.has_child("aborted"), "{}", f.raw);
    c.login("alice", "pw", "PLAIN")
        .await
        .expect("login after abort");
}

#[tokio::test]
async fn bind_roster_session_count_and_conflict() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let mut a = online(&node, "alice", "desk").await;
    assert_eq!(a.jid(), Some("alice@example.com/desk"));
    assert_eq!(node.session_count(), 1);
    let mut roster = a.roster().await.expect("roster");
    roster.sort();
    assert_eq!(roster, vec!["bob@example.com", "carol@example.com"]);

    let mut gen = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    gen.login("alice", "pw", "PLAIN").await.expect("login");
    let jid = gen.bind("").await.expect("generated resource");
    assert!(
        jid.starts_with("alice@example.com/") && jid.len() > "alice@example.com/".len(),
        "{jid}"
    );
    assert_eq!(node.session_count(), 2);

    // Same full JID again: the old session is replaced with <conflict/>.
    let _a2 = online(&node, "alice", "desk").await;
    match a.recv(T).await {
        Err(ClientError::StreamError { condition, .. }) => assert_eq!(condition, "conflict"),
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(node.session_count(), 2);
    drop(gen);
    for _ in 0..100 {
        if node.session_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.session_count(), 1);

    let empty = {
        let mut c = cfg("imp2");
        c.roster = Roster::Empty;
        SimNode::start(c).await.expect("start")
    };
    let mut b = online(&empty, "bob", "x").await;
    assert!(b.roster().await.expect("roster").is_empty());
}

#[tokio::test]
async fn pair_presence_and_messages_cross_nodes() {
    let pair = SimPair::start(cfg("imp1"), cfg("imp2"))
        .await
        .expect("pair");
    let mut alice = online(&pair.nodes[0], "alice", "desk").await;
    let mut bob = online(&pair.nodes[1], "bob", "phone").await;

    alice.send_presence(None, None).await.expect("presence");
    // Own presence is echoed (as Prosody does).
    let echo = alice
        .wait_for(T, |s| s.name == "presence")
        .await
        .expect("echo");
    assert_eq!(echo.attr("from"), Some("alice@example.com/desk"));

    bob.send_presence(Some("dnd"), Some("In a meeting"))
        .await
        .expect("presence");
    // Alice sees Bob's presence (broadcast across the link).
    let p = alice
        .wait_for(T, |s| {
            s.name == "presence" && s.attr("from") == Some("bob@example.com/phone")
        })
        .await
        .expect("bob's presence");
    assert_eq!(p.child_text("show").as_deref(), Some("dnd"));
    assert_eq!(p.child_text("status").as_deref(), Some("In a meeting"));
    // Bob gets Alice's current presence on his initial presence.
    bob.wait_for(T, |s| {
        s.name == "presence" && s.attr("from") == Some("alice@example.com/desk")
    })
    .await
    .expect("alice's presence");

    // Message to the bare JID and to the full JID, with entities and UTF-8.
    let body = "hello: café 你好 😀 <&> 'q' \"dq\"";
    alice
        .send_message("bob@example.com", body)
        .await
        .expect("send");
    let m = bob
        .wait_for(T, |s| s.name == "message")
        .await
        .expect("message");
    assert_eq!(m.attr("from"), Some("alice@example.com/desk"));
    assert_eq!(m.attr("type"), Some("chat"));
    assert_eq!(m.body().as_deref(), Some(body));
    bob.send_message("alice@example.com/desk", "back")
        .await
        .expect("send");
    let m = alice
        .wait_for(T, |s| s.name == "message")
        .await
        .expect("message");
    assert_eq!(m.attr("from"), Some("bob@example.com/phone"));
    assert_eq!(m.body().as_deref(), Some("back"));

    // Directed presence to a user on the other node.
    alice
        .send_raw("<presence to='carol@example.com'/>")
        .await
        .expect("send");
    let mut carol = online(&pair.nodes[1], "carol", "tab").await;
    carol.send_presence(None, None).await.expect("presence");
    alice
        .send_raw("<presence to='carol@example.com/tab'><status>hi carol</status></presence>")
        .await
        .expect("send");
    let p = carol
        .wait_for(T, |s| {
            s.name == "presence" && s.child_text("status").as_deref() == Some("hi carol")
        })
        .await
        .expect("directed presence");
    assert_eq!(p.attr("from"), Some("alice@example.com/desk"));

    // Logout broadcasts unavailable.
    bob.send_raw("<presence type='unavailable'/>")
        .await
        .expect("send");
    bob.close().await.expect("close");
    let p = alice
        .wait_for(T, |s| {
            s.name == "presence" && s.attr("type") == Some("unavailable")
        })
        .await
        .expect("unavailable");
    assert_eq!(p.attr("from"), Some("bob@example.com/phone"));

    // Bob is offline now: a chat message bounces with <service-unavailable/>.
    alice
        .send_message("bob@example.com", "are you there?")
        .await
        .expect("send");
    let e = alice
        .wait_for(T, |s| {
            s.name == "message" && s.attr("type") == Some("error")
        })
        .await
        .expect("error");
    assert!(e.has_child("service-unavailable"), "{}", e.raw);
    assert_eq!(e.attr("from"), Some("bob@example.com"));
    // Unknown user too.
    alice
        .send_message("nobody@example.com", "x")
        .await
        .expect("send");
    let e = alice
        .wait_for(T, |s| {
            s.name == "message" && s.attr("type") == Some("error")
        })
        .await
        .expect("error");
    assert!(e.has_child("service-unavailable"), "{}", e.raw);
    // Disconnect without unavailable also broadcasts.
    drop(carol);
    let p = alice
        .wait_for(T, |s| {
            s.name == "presence" && s.attr("from") == Some("carol@example.com/tab")
        })
        .await
        .expect("carol unavailable");
    assert_eq!(p.attr("type"), Some("unavailable"));
}

#[tokio::test]
async fn bare_jid_goes_to_highest_priority() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let mut hi = online(&node, "bob", "hi").await;
    let mut lo = online(&node, "bob", "lo").await;
    hi.send_raw("<presence><priority>5</priority></presence>")
        .await
        .expect("p");
    lo.send_raw("<presence><priority>1</priority></presence>")
        .await
        .expect("p");
    let mut alice = online(&node, "alice", "a").await;
    alice
        .send_message("bob@example.com", "to best")
        .await
        .expect("send");
    let m = hi
        .wait_for(T, |s| s.name == "message")
        .await
        .expect("message");
    assert_eq!(m.body().as_deref(), Some("to best"));
    assert!(matches!(
        lo.wait_for(Duration::from_millis(200), |s| s.name == "message")
            .await,
        Err(ClientError::Timeout)
    ));
    // iq routed to a full JID, answered by the target.
    alice
        .send_raw("<iq type='get' id='v1' to='bob@example.com/lo'><query xmlns='jabber:iq:version'/></iq>")
        .await
        .expect("send");
    let q = lo.wait_for(T, |s| s.name == "iq").await.expect("iq");
    assert_eq!(q.attr("from"), Some("alice@example.com/a"));
    lo.send_raw("<iq type='result' id='v1' to='alice@example.com/a'/>")
        .await
        .expect("send");
    let r = alice
        .wait_for(T, |s| s.name == "iq" && s.attr("id") == Some("v1"))
        .await
        .expect("result");
    assert_eq!(r.attr("type"), Some("result"));
    assert_eq!(r.attr("from"), Some("bob@example.com/lo"));
}

#[tokio::test]
async fn ping_disco_and_unknown_iq() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let mut c = online(&node, "alice", "desk").await;
    c.ping().await.expect("ping");
    c.send_raw("<iq type='get' id='d1' to='example.com'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        .await
        .expect("send");
    let r = c
        .wait_for(T, |s| s.attr("id") == Some("d1"))
        .await
        .expect("disco");
    assert_eq!(r.attr("type"), Some("result"));
    assert!(r.has_child("identity"));
    assert!(r.raw.contains("urn:xmpp:ping"));
    c.send_raw("<iq type='get' id='u1'><query xmlns='urn:example:unknown'/></iq>")
        .await
        .expect("send");
    let r = c
        .wait_for(T, |s| s.attr("id") == Some("u1"))
        .await
        .expect("error");
    assert_eq!(r.attr("type"), Some("error"));
    assert!(r.has_child("service-unavailable"));
    // Whitespace keep-alives are ignored.
    c.send_raw(" \n ").await.expect("ws");
    c.ping().await.expect("ping after keep-alive");
    c.close().await.expect("close");
}

#[tokio::test]
async fn starttls_and_direct_tls() {
    let (server, client) = tls_pair();
    let mut conf = cfg("imp1");
    conf.tls = Some(server.clone());
    let node = SimNode::start(conf).await.expect("start");
    let plain = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    assert!(plain
        .features_raw()
        .contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"));
    let tls = ClientTls::StartTls {
        config: client.clone(),
        server_name: D.into(),
    };
    let mut c = SimClient::connect(node.addr(), D, tls)
        .await
        .expect("starttls");
    assert!(!c.features_raw().contains("starttls"));
    c.login("alice", "pw", "SCRAM-SHA-1").await.expect("login");
    c.bind("tls").await.expect("bind");
    c.ping().await.expect("ping");

    // Required STARTTLS: no mechanisms before TLS.
    let mut conf = cfg("imp2");
    conf.tls = Some(server.clone());
    conf.require_tls = true;
    let node = SimNode::start(conf).await.expect("start");
    let mut plain = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    assert!(plain.features_raw().contains("<required/>"));
    assert!(plain.mechanisms().is_empty());
    match plain.login("alice", "pw", "PLAIN").await {
        Err(ClientError::SaslFailure { condition, .. }) => {
            assert_eq!(condition, "encryption-required")
        }
        other => panic!("expected failure, got {other:?}"),
    }
    let tls = ClientTls::StartTls {
        config: client.clone(),
        server_name: D.into(),
    };
    let mut c = SimClient::connect(node.addr(), D, tls)
        .await
        .expect("starttls");
    assert_eq!(c.mechanisms(), vec!["SCRAM-SHA-1", "PLAIN"]);
    c.login("bob", "pw", "PLAIN").await.expect("login");

    // Direct TLS.
    let mut conf = cfg("imp3");
    conf.tls = Some(server);
    conf.direct_tls = true;
    let node = SimNode::start(conf).await.expect("start");
    let tls = ClientTls::Direct {
        config: client,
        server_name: D.into(),
    };
    let mut c = SimClient::connect_with(node.addr(), D, tls, Some("carol@example.com"))
        .await
        .expect("direct tls");
    assert!(!c.features_raw().contains("starttls"));
    c.login("carol", "pw", "SCRAM-SHA-1").await.expect("login");
    c.bind("d").await.expect("bind");
    c.ping().await.expect("ping");
    c.close().await.expect("close");
}

#[tokio::test]
async fn kill_restart_hang_resume() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let addr = node.addr();
    let mut c = online(&node, "alice", "desk").await;
    assert_eq!(node.session_count(), 1);
    node.kill();
    assert_eq!(node.session_count(), 0);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "connect after kill must be refused"
    );
    match c.recv(T).await {
        Err(ClientError::Closed) | Err(ClientError::Io(_)) => {}
        other => panic!("expected a closed connection, got {other:?}"),
    }
    node.restart().await.expect("restart");
    assert_eq!(node.addr(), addr);
    let mut c = online(&node, "alice", "desk").await;
    c.ping().await.expect("ping");

    node.hang();
    c.send_raw("<iq type='get' id='h1' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .expect("send");
    assert!(matches!(
        c.recv(Duration::from_millis(300)).await,
        Err(ClientError::Timeout)
    ));
    // A new connection is not answered either.
    let mut pending =
        tokio::spawn(async move { SimClient::connect(addr, D, ClientTls::None).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut pending)
            .await
            .is_err(),
        "a hung node does not answer a new connection"
    );
    node.resume();
    let r = c.recv(T).await.expect("answer after resume");
    assert_eq!(r.attr("id"), Some("h1"));
    let mut late = pending.await.expect("join").expect("connect after resume");
    late.login("bob", "pw", "PLAIN").await.expect("login");
}

async fn expect_stream_error(c: &mut SimClient, cond: &str) -> String {
    loop {
        match c.recv(T).await {
            Ok(_) => continue,
            Err(ClientError::StreamError { condition, raw, .. }) => {
                assert_eq!(condition, cond, "{raw}");
                return raw;
            }
            Err(e) => panic!("expected <{cond}/>, got {e:?}"),
        }
    }
}

#[tokio::test]
async fn restricted_xml_and_bad_xml() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let mut c = online(&node, "alice", "desk").await;
    c.send_raw("<!DOCTYPE foo [<!ENTITY x 'y'>]>")
        .await
        .expect("send");
    expect_stream_error(&mut c, "restricted-xml").await;
    assert!(matches!(c.recv(T).await, Err(ClientError::Closed)));

    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    c.send_raw("<!-- a comment -->").await.expect("send");
    expect_stream_error(&mut c, "restricted-xml").await;

    let mut c = online(&node, "alice", "desk").await;
    c.send_raw("<message to='bob@example.com'><body>&foo;</body></message>")
        .await
        .expect("send");
    expect_stream_error(&mut c, "restricted-xml").await;

    let mut c = online(&node, "alice", "desk").await;
    c.send_raw("<message><body></message>").await.expect("send");
    expect_stream_error(&mut c, "not-well-formed").await;

    let mut c = online(&node, "alice", "desk").await;
    c.send_raw("<?foo bar?>").await.expect("send");
    expect_stream_error(&mut c, "restricted-xml").await;

    let mut c = online(&node, "alice", "desk").await;
    c.send_raw("<foo xmlns='urn:x'/>").await.expect("send");
    expect_stream_error(&mut c, "unsupported-stanza-type").await;
}

#[tokio::test]
async fn stanzas_before_auth_and_bind_get_service_unavailable() {
    // As Prosody does: a stanza error, and the stream stays usable.
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    c.send_raw("<message to='bob@example.com'><body>x</body></message>")
        .await
        .expect("send");
    let e = c.recv(T).await.expect("error");
    assert_eq!(e.attr("type"), Some("error"));
    assert_eq!(e.attr("from"), Some("bob@example.com"));
    assert!(e.has_child("service-unavailable"), "{}", e.raw);
    c.login("alice", "pw", "PLAIN").await.expect("login");
    c.send_raw("<iq type='get' id='p1' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .expect("send");
    let e = c.recv(T).await.expect("error");
    assert_eq!(
        (e.name.as_str(), e.attr("id"), e.attr("type")),
        ("iq", Some("p1"), Some("error"))
    );
    c.bind("x").await.expect("bind");
    c.ping().await.expect("ping");
}

#[tokio::test]
async fn oversize_stanza_policy_violation() {
    let mut conf = cfg("imp1");
    conf.max_stanza_bytes = 10_000;
    let node = SimNode::start(conf).await.expect("start");
    let mut c = online(&node, "alice", "desk").await;
    let big = format!(
        "<message to='bob@example.com'><body>{}</body></message>",
        "x".repeat(20_000)
    );
    c.send_raw(&big).await.expect("send");
    expect_stream_error(&mut c, "policy-violation").await;
    // A stanza just below the limit is fine.
    let mut c = online(&node, "alice", "desk2").await;
    let ok = format!(
        "<message to='bob@example.com'><body>{}</body></message>",
        "x".repeat(9_000)
    );
    c.send_raw(&ok).await.expect("send");
    c.ping().await.expect("still alive");
}

#[tokio::test]
async fn host_unknown_and_close() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    match SimClient::connect(node.addr(), "other.org", ClientTls::None).await {
        Err(ClientError::StreamError { condition, .. }) => assert_eq!(condition, "host-unknown"),
        other => panic!("expected host-unknown, got {other:?}"),
    }
    let c = online(&node, "alice", "desk").await;
    c.close().await.expect("close");
    for _ in 0..100 {
        if node.session_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.session_count(), 0);
}

#[tokio::test]
async fn saslname_escaping_end_to_end() {
    let mut conf = cfg("imp1");
    conf.users.push(("a=b,c".into(), "pw".into()));
    let node = SimNode::start(conf).await.expect("start");
    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    c.login("a=b,c", "pw", "SCRAM-SHA-1")
        .await
        .expect("login with escaped name");
}

#[tokio::test]
async fn garbage_input_ends_connection_but_node_survives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let inputs: [&[u8]; 6] = [
        b"\x00\xff\xfe garbage",
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'><<<<",
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'><auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>!!!</auth><auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AAAA</auth><response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>eA==</response></junk>",
        b"<stream:stream xmlns='wrong' xmlns:stream='http://etherx.jabber.org/streams'>",
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'><a b='1' b='2'/>",
        b"</stream:stream>",
    ];
    for input in inputs {
        let mut s = tokio::net::TcpStream::connect(node.addr())
            .await
            .expect("connect");
        s.write_all(input).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(T, s.read_to_end(&mut out))
            .await
            .expect("server closes");
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("</stream:stream>"), "{out}");
    }
    let mut c = online(&node, "alice", "desk").await;
    c.ping().await.expect("node still serves");
}

#[tokio::test]
async fn message_throughput_smoke() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let mut a = online(&node, "alice", "a").await;
    let mut b = online(&node, "bob", "b").await;
    let n = 2000;
    let start = std::time::Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            a.send_message("bob@example.com/b", &format!("m{i}"))
                .await
                .expect("send");
        }
        a
    });
    for i in 0..n {
        let m = b
            .wait_for(T, |s| s.name == "message")
            .await
            .expect("message");
        assert_eq!(m.body(), Some(format!("m{i}")));
    }
    let _a = sender.await.expect("join");
    let el = start.elapsed();
    eprintln!(
        "{n} messages in {el:?} ({:.0}/s, debug build)",
        n as f64 / el.as_secs_f64()
    );
}

#[tokio::test]
async fn login_rate_smoke() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let n = 200;
    let start = std::time::Instant::now();
    for i in 0..n {
        let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
            .await
            .expect("connect");
        c.login(
            "alice",
            "pw",
            if i % 2 == 0 { "SCRAM-SHA-1" } else { "PLAIN" },
        )
        .await
        .expect("login");
        c.bind(&format!("r{i}")).await.expect("bind");
    }
    let el = start.elapsed();
    eprintln!(
        "{n} logins in {el:?} ({:.0}/s, debug build, sequential)",
        n as f64 / el.as_secs_f64()
    );
    assert_eq!(node.logins_total(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_concurrent_fanout() {
    let n_users = 12;
    let users: Vec<(String, String)> = (0..n_users)
        .map(|i| (format!("u{i}"), "pw".to_string()))
        .collect();
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", D, users.clone()),
        SimNodeConfig::new("imp2", D, users),
    )
    .await
    .expect("pair");
    let mut clients = Vec::new();
    for i in 0..n_users {
        let node = &pair.nodes[i % 2];
        let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
            .await
            .expect("connect");
        c.login(&format!("u{i}"), "pw", "PLAIN")
            .await
            .expect("login");
        c.bind("r").await.expect("bind");
        clients.push(c);
    }
    assert_eq!(
        pair.nodes[0].session_count() + pair.nodes[1].session_count(),
        n_users
    );
    let per_peer = 20;
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            c.send_presence(None, Some(&format!("u{i} here")))
                .await
                .expect("presence");
            for k in 0..per_peer {
                for j in 0..n_users {
                    if j != i {
                        c.send_message(&format!("u{j}@example.com/r"), &format!("{i}:{k}"))
                            .await
                            .expect("send");
                    }
                }
            }
            let mut got = 0;
            let mut last = vec![-1i64; n_users];
            while got < per_peer * (n_users - 1) {
                let m = c
                    .wait_for(Duration::from_secs(10), |s| s.name == "message")
                    .await
                    .expect("message");
                let body = m.body().expect("body");
                let (from, k) = body.split_once(':').expect("format");
                let (from, k): (usize, i64) = (from.parse().expect("from"), k.parse().expect("k"));
                assert!(k > last[from], "per-sender order");
                last[from] = k;
                got += 1;
            }
            c
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test]
async fn writer_that_does_not_read_is_not_deadlocked() {
    // The node keeps reading while its replies pile up (as Prosody does).
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    let mut c = online(&node, "alice", "desk").await;
    let n = 40_000;
    let batch: String = (0..1000)
        .map(|i| {
            format!("<iq type='get' id='b{i}' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>")
        })
        .collect();
    for _ in 0..n / 1000 {
        tokio::time::timeout(T, c.send_raw(&batch))
            .await
            .expect("send not blocked")
            .expect("send");
    }
    for _ in 0..n {
        let r = c.recv(T).await.expect("reply");
        assert_eq!(r.attr("type"), Some("result"));
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<SimNode>();
    send_sync::<SimPair>();
    send_sync::<SimNodeConfig>();
    send::<SimClient>();
    send_sync::<ClientError>();
    send_sync::<prg_proxy::sim::Stanza>();
}

fn capacity_node_cfg(n_users: usize, cap: LoginCapacity) -> SimNodeConfig {
    let users = (0..n_users)
        .map(|i| (format!("u{i}"), "pw".to_string()))
        .collect();
    let mut c = SimNodeConfig::new("imp1", D, users);
    c.roster = Roster::Empty;
    c.login_capacity = Some(cap);
    c
}

/// Connect `n` clients (stream open, no login yet).
async fn connect_many(node: &SimNode, n: usize) -> Vec<SimClient> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(
            SimClient::connect(node.addr(), D, ClientTls::None)
                .await
                .expect("connect"),
        );
    }
    v
}

/// Log every client in at once as `u{i}`; each result with its duration.
async fn login_all(clients: Vec<SimClient>) -> Vec<(Result<SimClient, ClientError>, Duration)> {
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let t0 = std::time::Instant::now();
                let r = async {
                    c.login(&format!("u{i}"), "pw", "PLAIN").await?;
                    c.bind("r").await?;
                    Ok(c)
                }
                .await;
                (r, t0.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("login task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_capacity_below_saturation_is_fast() {
    let work = Duration::from_millis(50);
    let node = SimNode::start(capacity_node_cfg(
        4,
        LoginCapacity {
            concurrent: 4,
            work_per_login: work,
            queue_timeout: Duration::from_secs(5),
        },
    ))
    .await
    .expect("start");
    assert_eq!(node.login_capacity().map(|c| c.rate()), Some(80.0));
    let clients = connect_many(&node, 4).await;
    for (r, took) in login_all(clients).await {
        r.expect("login below capacity");
        assert!(took >= work, "{took:?}");
    }
    let lat = node.login_latencies();
    assert_eq!(lat.len(), 4);
    for l in &lat {
        // The work plus a little: no queueing (generous bound for a busy debug build).
        assert!(*l >= work && *l < work + Duration::from_secs(2), "{l:?}");
    }
    assert_eq!(node.logins_completed(), 4);
    assert_eq!(node.logins_overloaded(), 0);
    assert_eq!(node.logins_in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_storm_queues_then_fails_with_temporary_auth_failure() {
    // 2 slots × 200 ms = 10 logins/s; 12 logins at once is 3× what one
    // 400 ms window can take. Queueing beyond 300 ms is refused, so the
    // logins whose turn would come at 400 ms or later fail.
    let work = Duration::from_millis(200);
    let node = SimNode::start(capacity_node_cfg(
        13,
        LoginCapacity {
            concurrent: 2,
            work_per_login: work,
            queue_timeout: Duration::from_millis(300),
        },
    ))
    .await
    .expect("start");
    let n = 12;
    let clients = connect_many(&node, n).await;
    let results = login_all(clients).await;
    let mut ok = 0;
    let mut refused = 0;
    for (r, _) in results {
        match r {
            Ok(_) => ok += 1,
            Err(ClientError::SaslFailure {
                condition, text, ..
            }) => {
                assert_eq!(condition, "temporary-auth-failure");
                assert_eq!(text.as_deref(), Some("node overloaded"));
                refused += 1;
            }
            Err(e) => panic!("unexpected login error: {e}"),
        }
    }
    assert_eq!(ok + refused, n);
    assert!(ok >= 2, "the first two slots always serve: {ok}");
    assert!(refused >= 1, "nobody was refused");
    assert_eq!(node.logins_completed(), ok as u64);
    assert_eq!(node.logins_overloaded(), refused as u64);
    assert_eq!(node.logins_in_flight(), 0);
    // Latency grew: someone waited for a slot at least one work period.
    let lat = node.login_latencies();
    assert_eq!(lat.len(), ok);
    let max = lat.iter().max().copied().unwrap_or_default();
    assert!(max >= 2 * work, "no queueing seen: {lat:?}");

    // After the storm a login is served at once again.
    let mut c = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    c.login("u12", "pw", "SCRAM-SHA-1").await.expect("login");
    c.bind("r").await.expect("bind");
    assert_eq!(node.logins_completed(), ok as u64 + 1);
    let last = node.login_latencies().last().copied().unwrap_or_default();
    assert!(
        last >= work && last < work + Duration::from_secs(2),
        "{last:?}"
    );
}

#[tokio::test]
async fn node_without_capacity_counts_logins() {
    let node = SimNode::start(cfg("imp1")).await.expect("start");
    assert_eq!(node.login_capacity(), None);
    let c = online(&node, "alice", "r").await;
    assert_eq!(node.logins_completed(), 1);
    assert_eq!(node.login_latencies().len(), 1);
    assert_eq!(node.logins_overloaded(), 0);
    assert_eq!(node.logins_in_flight(), 0);
    // A wrong password ends the login attempt: nothing stays in flight.
    let mut d = SimClient::connect(node.addr(), D, ClientTls::None)
        .await
        .expect("connect");
    match d.login("bob", "wrong", "PLAIN").await {
        Err(e @ ClientError::SaslFailure { .. }) => assert_eq!(e.relogin(), None),
        other => panic!("{other:?}"),
    }
    assert_eq!(node.logins_in_flight(), 0);
    assert_eq!(node.logins_completed(), 1);
    drop(c);
}
