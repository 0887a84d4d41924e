//! End to end: the hardening findings of issue 11 — the proxy stays in
//! control until SASL success, counts failures, routes and tracks the user
//! the node logs in, and bounds what it accepts.

mod common;

use std::sync::atomic::Ordering::Relaxed;

use common::*;
use prg_proxy::sim::{ClientError, PlainAuthzid, SimClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn client(g: &TestGroup) -> SimClient {
    SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
        .await
        .unwrap()
}

fn sasl_failure<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (String, String) {
    match r {
        Err(ClientError::SaslFailure {
            condition, text, ..
        }) => (condition, text.unwrap_or_default()),
        other => panic!("expected a SASL failure, got {other:?}"),
    }
}

fn stream_error<T: std::fmt::Debug>(r: Result<T, ClientError>, want: &str) -> String {
    match r {
        Err(ClientError::StreamError { condition, raw, .. }) => {
            assert_eq!(condition, want, "{raw}");
            raw
        }
        other => panic!("expected <{want}/>, got {other:?}"),
    }
}

/// Finding 1: a failed `<auth>` answered by the node does not switch off the
/// pre-auth deadline.
#[tokio::test]
async fn a_failed_auth_keeps_the_pre_auth_deadline_running() {
    let g = TestGroup::start_with(
        "balanced",
        "[limits]\npre_auth_timeout = \"700ms\"\n",
        |_| {},
    )
    .await;
    let mut c = client(&g).await;
    let (cond, _) = sasl_failure(c.login("alice", "wrong", "PLAIN").await);
    assert_eq!(cond, "not-authorized", "the node's answer");
    // Idle after the failure: the deadline closes the stream (T bounds it).
    stream_error(c.recv(T).await, "connection-timeout");
}

/// Finding 2: failures answered by the node count; the stream is closed
/// after `limits.max_auth_attempts` of them.
#[tokio::test]
async fn failures_answered_by_the_node_close_the_stream_at_the_limit() {
    let g = TestGroup::start_with("balanced", "[limits]\nmax_auth_attempts = 3\n", |_| {}).await;
    let mut c = client(&g).await;
    for _ in 0..3 {
        let (cond, _) = sasl_failure(c.login("alice", "guess", "SCRAM-SHA-1").await);
        assert_eq!(cond, "not-authorized");
    }
    let raw = stream_error(c.recv(T).await, "policy-violation");
    assert!(raw.contains("too many failed authentication"), "{raw}");
}

/// Finding 3: a node that ignores the PLAIN authzid (as Prosody) logs in
/// the authcid; the proxy routes and tracks that user, not the authzid.
#[tokio::test]
async fn plain_authzid_ignored_by_the_node_routes_and_tracks_the_authcid() {
    let g = TestGroup::start_with("balanced", "", |c| {
        c.plain_authzid = PlainAuthzid::Ignore;
    })
    .await;
    assert_eq!(g.view.home("alice@example.com"), Ok(N1));
    assert_eq!(g.view.home("dave@example.com"), Ok(N2));
    let mut c = client(&g).await;
    c.login_plain_as("dave@example.com", "alice", "pw")
        .await
        .unwrap();
    let jid = c.bind("desk").await.unwrap();
    assert_eq!(jid, "alice@example.com/desk");
    assert_eq!(g.pair.nodes[0].session_count(), 1, "on alice's home");
    assert!(
        eventually(T, || g.view.tracker.lookup("alice@example.com").is_some()).await,
        "tracked as alice"
    );
    assert!(g.view.tracker.lookup("dave@example.com").is_none());
}

/// Finding 3: a node that honours the authzid logs in someone other than
/// the routed user: the stream ends with `<not-authorized/>` naming both,
/// and nothing is tracked.
#[tokio::test]
async fn a_bound_jid_other_than_the_routed_one_closes_the_stream() {
    let g = TestGroup::start_with("balanced", "", |c| {
        c.plain_authzid = PlainAuthzid::Honour;
    })
    .await;
    let mut c = client(&g).await;
    c.login_plain_as("dave@example.com", "alice", "pw")
        .await
        .unwrap();
    let raw = stream_error(c.bind("desk").await, "not-authorized");
    assert!(
        raw.contains("dave@example.com") && raw.contains("alice@example.com"),
        "{raw}"
    );
    assert_eq!(g.view.tracker.user_count(), 0, "not tracked");
}

/// Finding 3: after a failed login as one user, a login as another on the
/// same stream is routed to that user's home and tracked as that user.
#[tokio::test]
async fn a_second_auth_for_another_user_is_routed_again() {
    let g = TestGroup::start().await;
    let mut c = client(&g).await;
    sasl_failure(c.login("alice", "wrong", "PLAIN").await);
    c.login("dave", "pw", "PLAIN").await.unwrap();
    c.bind("phone").await.unwrap();
    assert_eq!(g.pair.nodes[1].session_count(), 1, "dave's home is imp2");
    assert_eq!(g.pair.nodes[0].session_count(), 0);
    let d = g
        .view
        .tracker
        .lookup("dave@example.com")
        .expect("tracked as dave");
    assert_eq!(d.sessions[0].node, N2);
    assert!(g.view.tracker.lookup("alice@example.com").is_none());
}

/// Finding 3: `assignment = "none"`: a failed login as a listed user does
/// not let an unlisted one in afterwards.
#[tokio::test]
async fn assignment_none_a_failed_listed_login_does_not_admit_an_unlisted_user() {
    let certs = Certs::new();
    let f = certs.dir.path().join("users.toml");
    std::fs::write(&f, "[users]\n\"alice@example.com\" = \"imp1\"\n").unwrap();
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
    let mut c = client(&g).await;
    sasl_failure(c.login("alice", "wrong", "PLAIN").await);
    let (cond, text) = sasl_failure(c.login("bob", "pw", "PLAIN").await);
    assert_eq!(cond, "not-authorized");
    assert!(text.contains("not assigned"), "{text}");
    assert_eq!(g.view.tracker.user_count(), 0);
}

/// Finding 3: a login for a domain the proxy does not serve is refused by
/// the proxy and never reaches a node.
#[tokio::test]
async fn a_login_for_a_domain_not_served_is_refused_by_the_proxy() {
    let g = TestGroup::start().await;
    let mut c = client(&g).await;
    let (cond, text) = sasl_failure(c.login("alice@other.example", "pw", "PLAIN").await);
    assert_eq!(cond, "not-authorized");
    assert!(text.contains("does not serve"), "{text}");
    assert_eq!(
        g.view.metrics.logins_routed.load(Relaxed),
        0,
        "not forwarded"
    );
}

/// Finding 11: a SASL payload that is not base64 gets `<incorrect-encoding/>`.
#[tokio::test]
async fn malformed_base64_gets_incorrect_encoding() {
    let g = TestGroup::start().await;
    let mut c = client(&g).await;
    let (cond, _) = sasl_failure(
        c.sasl_raw(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!not*base64</auth>",
        )
        .await,
    );
    assert_eq!(cond, "incorrect-encoding");
    c.login("alice", "pw", "PLAIN").await.unwrap();
}

/// Cooling-off per source address: after `limits.auth_fail_limit` failures
/// from one address, its next login is refused by the proxy.
#[tokio::test]
async fn an_address_over_the_failure_limit_is_refused_for_a_while() {
    let g = TestGroup::start_with(
        "balanced",
        "[limits]\nauth_fail_limit = 3\nauth_fail_window = \"1m\"\nauth_ban_time = \"10m\"\n",
        |_| {},
    )
    .await;
    let mut c = client(&g).await;
    for _ in 0..2 {
        sasl_failure(c.login("alice", "wrong", "PLAIN").await);
    }
    let mut c2 = client(&g).await;
    sasl_failure(c2.login("bob", "wrong", "SCRAM-SHA-1").await);
    let routed = g.view.metrics.logins_routed.load(Relaxed);
    // The right password does not help now, on any stream from here.
    let mut c3 = client(&g).await;
    let raw = stream_error(c3.login("alice", "pw", "PLAIN").await, "policy-violation");
    assert!(raw.contains("failed authentications"), "{raw}");
    assert_eq!(
        g.view.metrics.logins_routed.load(Relaxed),
        routed,
        "no node bothered"
    );
}

/// Finding 9: deep nesting before login gets a stream error at once, not
/// silence until the pre-auth timeout.
#[tokio::test]
async fn deep_nesting_before_login_gets_policy_violation_at_once() {
    let g = TestGroup::start().await;
    let mut c = client(&g).await;
    let bomb = "<a>".repeat(2000);
    let _ = c.send_raw(&bomb).await;
    let raw = stream_error(c.recv(T).await, "policy-violation");
    assert!(raw.contains("nested deeper"), "{raw}");
}

/// Finding 9: many attributes on one element get a stream error.
#[tokio::test]
async fn too_many_attributes_get_policy_violation() {
    let g = TestGroup::start().await;
    let mut c = client(&g).await;
    let attrs: String = (0..200).map(|i| format!(" a{i}='x'")).collect();
    let _ = c
        .send_raw(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'{attrs}/>"
        ))
        .await;
    let raw = stream_error(c.recv(T).await, "policy-violation");
    assert!(raw.contains("attributes"), "{raw}");
}

/// Finding 9: before login, an element over `limits.pre_auth_stanza_bytes`
/// is refused (well below the post-login stanza cap).
#[tokio::test]
async fn pre_auth_elements_have_a_smaller_cap() {
    let g = TestGroup::start().await;
    let mut c = client(&g).await;
    let big = format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        "A".repeat(20_000)
    );
    let _ = c.send_raw(&big).await;
    let raw = stream_error(c.recv(T).await, "policy-violation");
    assert!(raw.contains("16384"), "{raw}");
    // After login, stanzas up to the full cap pass.
    let mut alice = g.login("alice", "PLAIN", "a").await;
    let _dave = g.login("dave", "PLAIN", "d").await;
    alice
        .send_message("dave@example.com", &"x".repeat(100_000))
        .await
        .unwrap();
    alice.ping().await.unwrap();
}

/// Finding 9 on the plain STARTTLS port too, by raw bytes.
#[tokio::test]
async fn deep_nesting_on_the_plain_port_is_refused() {
    let g = TestGroup::start().await;
    let mut raw = tokio::net::TcpStream::connect(g.starttls).await.unwrap();
    raw.write_all(b"<stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>").await.unwrap();
    let _ = raw.write_all("<a>".repeat(500).as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, raw.read_to_end(&mut out)).await;
    let got = String::from_utf8_lossy(&out);
    assert!(got.contains("<policy-violation"), "{got}");
}

/// Finding 6: `max_connections` is exact (an idle accept loop holds no
/// slot), and a client over the cap gets `<resource-constraint/>` at once,
/// on either port; a freed slot serves the next client.
#[tokio::test]
async fn max_connections_is_exact_and_one_more_gets_resource_constraint() {
    let g = TestGroup::start_with("balanced", "[limits]\nmax_connections = 2\n", |_| {}).await;
    let a = client(&g).await;
    let _b = client(&g).await;
    let r = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls()).await;
    stream_error(r.map(|_| ()), "resource-constraint");
    let r = SimClient::connect(g.direct, DOMAIN, g.direct_tls()).await;
    stream_error(r.map(|_| ()), "resource-constraint");
    assert_eq!(g.view.metrics.connections_refused.load(Relaxed), 2);
    a.close().await.unwrap();
    assert!(
        eventually(T, || g.view.metrics.connections_active.load(Relaxed) == 1).await,
        "the closed connection frees its slot"
    );
    let mut c = client(&g).await;
    c.login("alice", "pw", "PLAIN").await.unwrap();
}

/// Finding 8: a node's stanza over the proxy's cap is reported to the
/// client as such, not as invalid XML.
#[tokio::test]
async fn a_nodes_oversize_stanza_is_reported_as_oversize() {
    let g = TestGroup::start_with("balanced", "[limits]\nmax_stanza_bytes = 10000\ninject_queue_bytes = 10000\npre_auth_stanza_bytes = 4096\n", |c| {
        // A roster of 400 contacts is far over 10 000 bytes.
        c.users
            .extend((0..400).map(|i| (format!("contact-number-{i:04}"), "pw".to_string())));
    })
    .await;
    let mut alice = g.login("alice", "PLAIN", "desk").await;
    let raw = stream_error(alice.roster().await, "internal-server-error");
    assert!(
        raw.contains("larger than the limit of 10000 bytes"),
        "{raw}"
    );
    assert!(!raw.contains("invalid XML"), "{raw}");
}

/// Finding 10: a node offering STARTTLS after login (Prosody with a
/// certificate) does not show it to the client; a client's `<starttls/>`
/// on its encrypted stream is answered by the proxy with `<failure/>` and
/// the stream is closed, never forwarded.
#[tokio::test]
async fn the_nodes_starttls_offer_never_reaches_the_client() {
    let certs = Certs::new();
    let node_tls = prg_proxy::tls::server_tls(&prg_proxy::config::TlsConfig {
        cert: certs.dir.path().join("cert.pem"),
        key: certs.dir.path().join("key.pem"),
        sni: vec![],
    })
    .unwrap();
    let mut c1 = prg_proxy::sim::SimNodeConfig::new("imp1", DOMAIN, users());
    c1.tls = Some(node_tls.starttls.clone());
    let mut c2 = prg_proxy::sim::SimNodeConfig::new("imp2", DOMAIN, users());
    c2.tls = Some(node_tls.starttls.clone());
    let pair = prg_proxy::sim::SimPair::start(c1, c2).await.unwrap();
    let text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "balanced",
        &certs,
        "",
    );
    let g = TestGroup::launch(pair, certs, &text).await;
    for tls in [g.starttls_tls(), g.direct_tls()] {
        let addr = if matches!(tls, prg_proxy::sim::ClientTls::Direct { .. }) {
            g.direct
        } else {
            g.starttls
        };
        let mut c = SimClient::connect(addr, DOMAIN, tls).await.unwrap();
        c.login("alice", "pw", "PLAIN").await.unwrap();
        let features = c.features_raw().to_string();
        assert!(features.contains("xmpp-bind"), "{features}");
        assert!(!features.contains("starttls"), "{features}");
        c.bind("desk").await.unwrap();
        c.send_raw("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await
            .unwrap();
        let s = c.recv(T).await.unwrap();
        assert_eq!(s.name, "failure", "{}", s.raw);
        assert!(s.raw.contains("xmpp-tls"), "{}", s.raw);
        assert!(matches!(c.recv(T).await, Err(ClientError::Closed)));
    }
}

/// Finding 7: a login in flight to a node that is marked down meanwhile is
/// routed again at once (not after the full upstream connect timeout).
#[tokio::test]
async fn a_login_in_flight_to_a_node_marked_down_is_routed_again() {
    let g = TestGroup::start_with(
        "balanced",
        "[limits]\nupstream_connect_timeout = \"60s\"\npre_auth_timeout = \"90s\"\n\n\
         [srm]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"1s\"\n\
         initial_heartbeat_timeout = \"3s\"\ncritical_service_delay = \"1s\"\n",
        |_| {},
    )
    .await;
    use prg_proxy::group::{NodeState, Reason};
    let mut rx = g.view.group_status();
    let normal = (NodeState::Normal, Reason::Normal);
    tokio::time::timeout(
        T,
        rx.wait_for(|s| s.state(N1) == normal && s.state(N2) == normal),
    )
    .await
    .expect("the group reaches Normal")
    .unwrap();
    assert_eq!(g.view.home("alice@example.com"), Ok(N1));
    // Node 1 hangs: TCP connects, nothing answers.
    g.pair.nodes[0].hang();
    let mut c = client(&g).await;
    tokio::time::timeout(T, c.login("alice", "pw", "PLAIN"))
        .await
        .expect("routed again well before the connect timeout")
        .unwrap();
    c.bind("desk").await.unwrap();
    assert_eq!(g.pair.nodes[1].session_count(), 1, "on node 2");
    assert_eq!(g.view.metrics.logins_rerouted.load(Relaxed), 1);
    g.pair.nodes[0].resume();
}
