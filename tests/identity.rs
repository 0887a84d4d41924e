//! End to end: the identity the proxy routes and tracks is the bare JID
//! normalised per RFC 7622 (PRECIS UsernameCaseMapped, IDNA domain).

mod common;

use common::*;
use prg_proxy::sim::{ClientError, SimClient};

/// `Ärger` and `ärger` are one user: one home, one tracker entry with both
/// sessions, on the same node.
#[tokio::test]
async fn aerger_and_aerger_are_one_user_with_one_home_and_one_entry() {
    let mut g = TestGroup::start_with("balanced", "", |c| {
        c.users.push(("ärger".into(), "pw".into()));
    })
    .await;
    let home = g.view.home("Ärger@example.com").unwrap();
    assert_eq!(g.view.home("ärger@example.com"), Ok(home));
    assert_eq!(g.view.home("ÄRGER@EXAMPLE.COM"), Ok(home));

    let _upper = g.login("Ärger", "PLAIN", "desk").await;
    let _lower = g.login("ärger", "SCRAM-SHA-1", "phone").await;

    assert_eq!(g.view.tracker.user_count(), 1, "one tracker entry");
    let u = g.view.tracker.lookup("ärger@example.com").expect("tracked");
    assert_eq!(u.sessions.len(), 2);
    assert!(u.sessions.iter().all(|s| s.node == home), "{u:?}");
    assert_eq!(g.view.tracker.count_on(home), 2);
    g.stop().await;
}

/// A user name that the PRECIS profile refuses gets a clear SASL failure
/// on the same stream, not a second identity or a crash; the client can
/// then log in properly.
#[tokio::test]
async fn a_name_outside_the_profile_is_a_clear_sasl_failure() {
    let mut g = TestGroup::start().await;
    let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
        .await
        .unwrap();
    match c.login("bad user", "pw", "PLAIN").await {
        Err(ClientError::SaslFailure {
            condition, text, ..
        }) => {
            assert_eq!(condition, "malformed-request");
            let text = text.unwrap_or_default();
            assert!(text.contains("RFC 7622"), "{text}");
        }
        other => panic!("expected a SASL failure, got {other:?}"),
    }
    c.login("alice", "pw", "PLAIN").await.unwrap();
    c.bind("desk").await.unwrap();
    assert_eq!(g.view.tracker.user_count(), 1);
    g.stop().await;
}
