//! End to end: clients through the proxy to the simulated node pair.

mod common;

use common::*;
use prg_proxy::sim::{ClientError, SimClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two users homed on different nodes (balanced mode) exchange a message and
/// see each other's presence, over STARTTLS.
#[tokio::test]
async fn starttls_users_on_different_nodes_chat_and_see_presence() {
    let g = TestGroup::start().await;
    // Balanced, rendezvous-hashed: alice is homed on node 1, dave on node 2.
    assert_eq!(g.view.assignment.home("alice@example.com"), Ok(N1));
    assert_eq!(g.view.assignment.home("dave@example.com"), Ok(N2));

    let mut alice = g.login("alice", "SCRAM-SHA-1", "desk").await;
    let mut dave = g.login("dave", "PLAIN", "phone").await;
    assert_eq!(g.pair.nodes[0].session_count(), 1, "alice is on imp1");
    assert_eq!(g.pair.nodes[1].session_count(), 1, "dave is on imp2");

    assert!(alice
        .roster()
        .await
        .unwrap()
        .contains(&"dave@example.com".to_string()));
    alice
        .send_presence(Some("dnd"), Some("In a meeting"))
        .await
        .unwrap();
    dave.send_presence(None, Some("around")).await.unwrap();

    let p = dave
        .wait_for(T, |s| {
            s.name == "presence" && s.attr("from") == Some("alice@example.com/desk")
        })
        .await
        .unwrap();
    assert_eq!(p.child_text("show").as_deref(), Some("dnd"));
    alice
        .wait_for(T, |s| {
            s.name == "presence" && s.attr("from") == Some("dave@example.com/phone")
        })
        .await
        .unwrap();

    let body = "héllo 世界 🎉 <&>";
    alice.send_message("dave@example.com", body).await.unwrap();
    let m = dave.wait_for(T, |s| s.name == "message").await.unwrap();
    assert_eq!(m.body().as_deref(), Some(body));
    assert_eq!(m.attr("from"), Some("alice@example.com/desk"));

    // The tracker saw both binds on the right nodes and alice's presence.
    let a = g.view.tracker.lookup("alice@example.com").unwrap();
    assert_eq!(a.sessions.len(), 1);
    assert_eq!(a.sessions[0].node, N1);
    assert_eq!(a.sessions[0].full_jid.as_ref(), "alice@example.com/desk");
    assert_eq!(a.sessions[0].presence.show, prg_proxy::tracker::Show::Dnd);
    let d = g.view.tracker.lookup("dave@example.com").unwrap();
    assert_eq!(d.sessions[0].node, N2);
    assert_eq!(g.view.tracker.count_on(N1), 1);
    assert_eq!(g.view.tracker.count_on(N2), 1);

    // Every stanza is counted: alice and dave sent at least bind, roster,
    // presence and the message; they received at least as many.
    let m = &g.view.metrics;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(m.stanzas_up.load(Relaxed) >= 6, "{:?}", m.stanzas_up);
    assert!(m.stanzas_down.load(Relaxed) >= 6, "{:?}", m.stanzas_down);
    assert!(m.bytes_up.load(Relaxed) > 0 && m.bytes_down.load(Relaxed) > 0);

    alice.close().await.unwrap();
    assert!(
        eventually(T, || g.view.tracker.lookup("alice@example.com").is_none()).await,
        "alice's session is gone once she closed"
    );
    assert_eq!(g.view.tracker.count_on(N1), 0);
}

#[tokio::test]
async fn direct_tls_login_and_ping() {
    let g = TestGroup::start().await;
    let mut c = SimClient::connect(g.direct, DOMAIN, g.direct_tls())
        .await
        .unwrap();
    c.login("bob", "pw", "SCRAM-SHA-1").await.unwrap();
    let jid = c.bind("laptop").await.unwrap();
    assert_eq!(jid, "bob@example.com/laptop");
    c.ping().await.unwrap();
}

#[tokio::test]
async fn plus_mechanisms_are_never_offered() {
    let g = TestGroup::start_with("balanced", "", |c| {
        c.mechanisms = vec!["SCRAM-SHA-1-PLUS".into(), "SCRAM-SHA-1".into()]
    })
    .await;
    let c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
        .await
        .unwrap();
    let m = c.mechanisms();
    assert_eq!(m, ["SCRAM-SHA-1"], "learned from the nodes, minus -PLUS");
    assert!(c.features_raw().contains("<max-bytes>262144</max-bytes>"));
    assert!(!c.features_raw().contains("PLUS"));
}

#[tokio::test]
async fn wrong_password_is_the_nodes_answer() {
    let g = TestGroup::start().await;
    let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
        .await
        .unwrap();
    match c.login("alice", "wrong", "SCRAM-SHA-1").await {
        Err(ClientError::SaslFailure { condition, .. }) => assert_eq!(condition, "not-authorized"),
        other => panic!("expected a SASL failure, got {other:?}"),
    }
}

fn expect_stream_error(r: Result<impl std::fmt::Debug, ClientError>, want: &str) -> String {
    match r {
        Err(ClientError::StreamError { condition, raw, .. }) => {
            assert_eq!(condition, want, "{raw}");
            raw
        }
        other => panic!("expected <{want}/>, got {other:?}"),
    }
}

/// Reads everything until the proxy closes the connection.
async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn doctype_gets_restricted_xml_and_others_are_still_served() {
    let g = TestGroup::start().await;
    // Before TLS, on the plain STARTTLS port.
    let mut raw = tokio::net::TcpStream::connect(g.starttls).await.unwrap();
    raw.write_all(b"<?xml version='1.0'?><!DOCTYPE stream [<!ENTITY x 'y'>]><stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>").await.unwrap();
    let got = read_to_close(&mut raw).await;
    assert!(
        got.contains("<restricted-xml xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"),
        "{got}"
    );
    assert!(
        got.contains("<stream:stream"),
        "a stream header comes before the error: {got}"
    );

    // After login, a stanza with a comment.
    let mut alice = g.login("alice", "PLAIN", "a").await;
    alice
        .send_raw("<message to='bob@example.com'><!-- x --><body>hi</body></message>")
        .await
        .unwrap();
    expect_stream_error(alice.recv(T).await, "restricted-xml");
    // A non-predefined entity.
    let mut bob = g.login("bob", "PLAIN", "b").await;
    bob.send_raw("<message to='alice@example.com'><body>&xxe;</body></message>")
        .await
        .unwrap();
    expect_stream_error(bob.recv(T).await, "restricted-xml");

    // Others are still served.
    let mut carol = g.login("carol", "SCRAM-SHA-1", "c").await;
    carol.ping().await.unwrap();
}

#[tokio::test]
async fn oversize_stanza_gets_policy_violation_and_others_are_still_served() {
    let g = TestGroup::start().await;
    let mut alice = g.login("alice", "SCRAM-SHA-1", "a").await;
    let mut bob = g.login("bob", "SCRAM-SHA-1", "b").await;
    let big = format!(
        "<message to='bob@example.com'><body>{}</body></message>",
        "x".repeat(300 * 1024)
    );
    alice.send_raw(&big).await.unwrap_or(());
    let raw = expect_stream_error(alice.recv(T).await, "policy-violation");
    assert!(raw.contains("262144"), "{raw}");
    // bob never saw it, and can still talk.
    bob.ping().await.unwrap();
    let mut carol = g.login("carol", "PLAIN", "c").await;
    carol
        .send_message("bob@example.com/b", "still here")
        .await
        .unwrap();
    let m = bob.wait_for(T, |s| s.name == "message").await.unwrap();
    assert_eq!(m.body().as_deref(), Some("still here"));
}

#[tokio::test]
async fn malformed_xml_gets_not_well_formed() {
    let g = TestGroup::start().await;
    let mut alice = g.login("alice", "PLAIN", "a").await;
    alice
        .send_raw("<message><body>oops</message>")
        .await
        .unwrap();
    expect_stream_error(alice.recv(T).await, "not-well-formed");
}

#[tokio::test]
async fn assignment_none_refuses_with_a_clear_text() {
    let g = TestGroup::start_with("none", "", |_| {}).await;
    let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
        .await
        .unwrap();
    match c.login("alice", "pw", "PLAIN").await {
        Err(ClientError::SaslFailure {
            condition, text, ..
        }) => {
            assert_eq!(condition, "not-authorized");
            assert_eq!(
                text.as_deref(),
                Some("user alice@example.com is not assigned to a node")
            );
        }
        other => panic!("expected not-authorized, got {other:?}"),
    }
    assert_eq!(
        g.pair.nodes[0].logins_total() + g.pair.nodes[1].logins_total(),
        0
    );
}

#[tokio::test]
async fn active_standby_puts_everyone_on_node_1() {
    let g = TestGroup::start_with("active-standby", "", |_| {}).await;
    let _a = g.login("alice", "PLAIN", "a").await;
    let _d = g.login("dave", "SCRAM-SHA-1", "d").await;
    assert_eq!(g.pair.nodes[0].session_count(), 2);
    assert_eq!(g.pair.nodes[1].session_count(), 0);
}

#[tokio::test]
async fn assignment_file_overrides_balanced_homes() {
    let certs = Certs::new();
    let f = certs.dir.path().join("users.toml");
    std::fs::write(&f, "[users]\n\"alice@example.com\" = \"imp2\"\n").unwrap();
    let extra = String::new();
    let _ = extra;
    let mut g = TestGroup::start_with("balanced", "", |_| {}).await;
    // Same group, with the override applied through the config file.
    let text = config_text(
        &[g.pair.nodes[0].addr(), g.pair.nodes[1].addr()],
        "balanced",
        &g.certs,
        "",
    )
    .replace(
        "domains = [\"example.com\"]",
        &format!(
            "domains = [\"example.com\"]\nassignment_file = \"{}\"",
            f.display()
        ),
    );
    let cfg = prg_proxy::Config::parse(&text).unwrap();
    let proxy = prg_proxy::Proxy::bind(cfg).await.unwrap();
    assert_eq!(proxy.view().assignment.home("alice@example.com"), Ok(N2));
    assert_eq!(proxy.view().assignment.home("dave@example.com"), Ok(N2));
    assert_eq!(proxy.view().assignment.home("bob@example.com"), Ok(N1));
    g.stop().await;
}

#[tokio::test]
async fn stream_from_identifies_the_user() {
    let g = TestGroup::start().await;
    let mut c = SimClient::connect_with(
        g.starttls,
        DOMAIN,
        g.starttls_tls(),
        Some("dave@example.com"),
    )
    .await
    .unwrap();
    c.login("dave", "pw", "SCRAM-SHA-1").await.unwrap();
    c.bind("x").await.unwrap();
    assert_eq!(g.pair.nodes[1].session_count(), 1, "dave's home is imp2");
}

#[tokio::test]
async fn unknown_domain_gets_host_unknown() {
    let g = TestGroup::start().await;
    let r = SimClient::connect(g.starttls, "other.example", g.starttls_tls()).await;
    expect_stream_error(r.map(|_| ()), "host-unknown");
}

#[tokio::test]
async fn auth_before_starttls_is_refused() {
    let g = TestGroup::start().await;
    let r = SimClient::connect(g.starttls, DOMAIN, prg_proxy::sim::ClientTls::None).await;
    // The features say STARTTLS is required; a client that logs in anyway
    // gets a policy violation.
    let mut c = r.unwrap();
    assert!(c.features_raw().contains("<required/>"));
    let e = c.login("alice", "pw", "PLAIN").await;
    assert!(e.is_err());
}

#[tokio::test]
async fn pre_auth_timeout_closes_idle_connections() {
    let g = TestGroup::start_with(
        "balanced",
        "[limits]\npre_auth_timeout = \"300ms\"\n",
        |_| {},
    )
    .await;
    let mut raw = tokio::net::TcpStream::connect(g.starttls).await.unwrap();
    let got = read_to_close(&mut raw).await;
    assert!(got.contains("<connection-timeout"), "{got}");
}

#[tokio::test]
async fn shutdown_sends_system_shutdown_to_every_client() {
    let mut g = TestGroup::start().await;
    let mut alice = g.login("alice", "PLAIN", "a").await;
    let mut dave = g.login("dave", "PLAIN", "d").await;
    let mut raw = tokio::net::TcpStream::connect(g.starttls).await.unwrap();
    raw.write_all(b"<stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>").await.unwrap();
    // The proxy answered the header: the connection is being served.
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(T, raw.read(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0);
    g.stop().await;
    expect_stream_error(alice.recv(T).await, "system-shutdown");
    expect_stream_error(dave.recv(T).await, "system-shutdown");
    let got = read_to_close(&mut raw).await;
    assert!(
        got.contains("<system-shutdown"),
        "pre-auth clients too: {got}"
    );
    // No new connections.
    assert!(tokio::net::TcpStream::connect(g.starttls).await.is_err());
}

#[tokio::test]
async fn assignment_none_admits_only_explicitly_assigned_users() {
    let certs = Certs::new();
    let f = certs.dir.path().join("users.toml");
    std::fs::write(&f, "[users]\n\"alice@example.com\" = \"imp2\"\n").unwrap();
    let pair = prg_proxy::sim::SimPair::start(
        prg_proxy::sim::SimNodeConfig::new("imp1", DOMAIN, users()),
        prg_proxy::sim::SimNodeConfig::new("imp2", DOMAIN, users()),
    )
    .await
    .unwrap();
    let text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "none",
        &certs,
        "",
    )
    .replace(
        "domains = [\"example.com\"]",
        &format!(
            "domains = [\"example.com\"]\nassignment_file = \"{}\"",
            f.display()
        ),
    );
    let g = TestGroup::launch(pair, certs, &text).await;
    let _alice = g.login("alice", "PLAIN", "a").await;
    assert_eq!(
        g.pair.nodes[1].session_count(),
        1,
        "alice is assigned to imp2"
    );
    let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
        .await
        .unwrap();
    match c.login("bob", "pw", "PLAIN").await {
        Err(ClientError::SaslFailure {
            condition, text, ..
        }) => {
            assert_eq!(condition, "not-authorized");
            assert_eq!(
                text.as_deref(),
                Some("user bob@example.com is not assigned to a node")
            );
        }
        other => panic!("expected not-authorized, got {other:?}"),
    }
}
