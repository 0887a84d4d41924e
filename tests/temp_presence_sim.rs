//! Temporary presence (Cisco Jabber) on the simulated pair, without the
//! proxy: subscribe through the disco#info round trip, pushes on every
//! change, unsubscribe, the node's maximum and TTL, and the defect (a
//! failover or a move loses the subscription and the watcher is not told).

use std::time::Duration;

use prg_proxy::sim::{
    ClientTls, Roster, SimClient, SimNode, SimNodeConfig, SimPair, Stanza, TEMP_PRESENCE_NOTIFY,
};

const DOMAIN: &str = "example.com";
const T: Duration = Duration::from_secs(10);
const CAPS: &str = "http://cisco.com/jabber";
const VER: &str = "tp-ver-1";
const VER_PLAIN: &str = "plain-ver-1";

fn users() -> Vec<(String, String)> {
    ["alice", "bob", "carol"]
        .iter()
        .map(|u| (u.to_string(), "pw".to_string()))
        .collect()
}

/// A pair whose users are not on each other's rosters: only temporary
/// presence tells a watcher about a target.
async fn pair(tweak: impl Fn(&mut SimNodeConfig)) -> SimPair {
    let mut c1 = SimNodeConfig::new("imp1", DOMAIN, users());
    let mut c2 = SimNodeConfig::new("imp2", DOMAIN, users());
    c1.roster = Roster::Empty;
    c2.roster = Roster::Empty;
    tweak(&mut c1);
    tweak(&mut c2);
    SimPair::start(c1, c2).await.unwrap()
}

async fn login(node: &SimNode, user: &str) -> SimClient {
    let mut c = SimClient::connect(node.addr(), DOMAIN, ClientTls::None)
        .await
        .unwrap();
    c.login(user, "pw", "PLAIN").await.unwrap();
    c.bind("desk").await.unwrap();
    c.send_presence(None, None).await.unwrap();
    c
}

/// Subscribes `w` to `to` with `ver`, answering the node's disco#info
/// query (features with the notify feature when `tp`), and returns the
/// first push (none when `ver` lacks the feature).
async fn subscribe(w: &mut SimClient, to: &str, ver: &str, tp: bool) -> Option<Stanza> {
    w.send_caps_presence(to, CAPS, ver).await.unwrap();
    let q = w
        .wait_for(T, |s| s.disco_info_node().is_some())
        .await
        .unwrap();
    assert_eq!(q.disco_info_node().unwrap(), format!("{CAPS}#{ver}"));
    let features: &[&str] = if tp {
        &[TEMP_PRESENCE_NOTIFY, "urn:xmpp:ping"]
    } else {
        &["urn:xmpp:ping"]
    };
    w.answer_disco(&q, features).await.unwrap();
    if !tp {
        return None;
    }
    Some(
        w.wait_for(T, |s| s.temp_presence().is_some())
            .await
            .unwrap(),
    )
}

/// Reads until a chat message from `from`; returns the temporary
/// presence pushes seen before it.
async fn pushes_until_chat(c: &mut SimClient, from: &str) -> Vec<Stanza> {
    let mut seen = Vec::new();
    loop {
        let s = c.recv(T).await.unwrap();
        if s.temp_presence().is_some() {
            seen.push(s);
        } else if s.name == "message"
            && s.attr("type") == Some("chat")
            && s.attr("from").is_some_and(|f| f.starts_with(from))
        {
            return seen;
        }
    }
}

#[tokio::test]
async fn subscribe_resolves_caps_pushes_changes_and_unsubscribes() {
    let p = pair(|_| {}).await;
    let mut bob = login(&p.nodes[0], "bob").await;
    let mut alice = login(&p.nodes[1], "alice").await;

    let first = subscribe(&mut alice, "bob@example.com", VER, true)
        .await
        .unwrap();
    let tp = first.temp_presence().unwrap();
    assert_eq!(tp.target, "bob@example.com");
    assert_eq!(tp.item, "bob@example.com/desk");
    assert!(tp.available);
    assert_eq!(p.nodes[0].temp_watchers("bob"), ["alice@example.com/desk"]);

    // Every change is pushed.
    bob.send_presence(Some("dnd"), Some("meeting"))
        .await
        .unwrap();
    let s = alice
        .wait_for(T, |s| s.temp_presence().is_some())
        .await
        .unwrap();
    let tp = s.temp_presence().unwrap();
    assert_eq!(tp.show.as_deref(), Some("dnd"));
    assert_eq!(tp.status.as_deref(), Some("meeting"));

    // A known ver needs no second disco#info round trip.
    let q = p.nodes[1].temp_disco_queries();
    alice
        .send_caps_presence("carol@example.com", CAPS, VER)
        .await
        .unwrap();
    let s = alice
        .wait_for(T, |s| s.temp_presence().is_some())
        .await
        .unwrap();
    assert!(!s.temp_presence().unwrap().available, "carol is offline");
    assert_eq!(p.nodes[1].temp_disco_queries(), q);

    // Caps without the feature unsubscribe.
    let none = subscribe(&mut alice, "bob@example.com", VER_PLAIN, false).await;
    assert!(none.is_none());
    bob.send_message("alice@example.com", "sync").await.unwrap();
    let seen = pushes_until_chat(&mut alice, "bob@").await;
    assert!(seen.is_empty(), "{seen:?}");
    assert!(p.nodes[0].temp_watchers("bob").is_empty());

    // Subscribe again, then directed unavailable unsubscribes.
    alice
        .send_caps_presence("bob@example.com", CAPS, VER)
        .await
        .unwrap();
    alice
        .wait_for(T, |s| s.temp_presence().is_some())
        .await
        .unwrap();
    assert_eq!(p.nodes[0].temp_watchers("bob").len(), 1);
    alice
        .send_directed_unavailable("bob@example.com")
        .await
        .unwrap();
    alice.ping().await.unwrap();
    assert!(p.nodes[0].temp_watchers("bob").is_empty());
}

#[tokio::test]
async fn the_node_bounds_and_expires_subscriptions() {
    let p = pair(|c| {
        c.temp_presence_max = 1;
        c.temp_presence_ttl = Duration::from_millis(300);
    })
    .await;
    let mut alice = login(&p.nodes[0], "alice").await;
    subscribe(&mut alice, "bob@example.com", VER, true).await;
    // The second subscription is beyond the maximum: refused, no push.
    alice
        .send_caps_presence("carol@example.com", CAPS, VER)
        .await
        .unwrap();
    alice.ping().await.unwrap();
    assert_eq!(p.nodes[0].temp_refused(), 1);
    assert_eq!(p.nodes[0].temp_subscriptions(), 1);
    // The TTL drops the first.
    let start = tokio::time::Instant::now();
    while p.nodes[0].temp_subscriptions() != 0 {
        assert!(start.elapsed() < T, "the subscription never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(200));
}

/// The defect: A on node 2 watches B on node 1; node 1 crashes, B logs in
/// again on node 2; A is never told and its view of B stays stale.
#[tokio::test]
async fn a_failover_loses_the_subscription_silently() {
    let p = pair(|_| {}).await;
    let bob = login(&p.nodes[0], "bob").await;
    let mut alice = login(&p.nodes[1], "alice").await;
    subscribe(&mut alice, "bob@example.com", VER, true).await;
    assert_eq!(p.nodes[0].temp_subscriptions(), 1);

    p.nodes[0].kill();
    drop(bob);
    let mut bob = login(&p.nodes[1], "bob").await;
    bob.send_presence(Some("away"), None).await.unwrap();
    bob.send_message("alice@example.com", "back").await.unwrap();
    // Nothing reached A before B's message, and no node holds the pair.
    let seen = pushes_until_chat(&mut alice, "bob@").await;
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(p.nodes[0].temp_subscriptions(), 0);
    assert_eq!(p.nodes[1].temp_subscriptions(), 0);

    // Only a new search by A restores it (the node already knows the ver).
    alice
        .send_caps_presence("bob@example.com", CAPS, VER)
        .await
        .unwrap();
    let s = alice
        .wait_for(T, |s| s.temp_presence().is_some())
        .await
        .unwrap();
    assert_eq!(s.temp_presence().unwrap().show.as_deref(), Some("away"));
}

/// A user move (B logs out of node 1 and in on node 2) loses it too.
#[tokio::test]
async fn a_move_loses_the_subscription_silently() {
    let p = pair(|_| {}).await;
    let bob = login(&p.nodes[0], "bob").await;
    let mut alice = login(&p.nodes[1], "alice").await;
    subscribe(&mut alice, "bob@example.com", VER, true).await;
    bob.close().await.unwrap();
    // B's logout is pushed (the pair still exists on node 1).
    let s = alice
        .wait_for(T, |s| s.temp_presence().is_some())
        .await
        .unwrap();
    assert!(!s.temp_presence().unwrap().available);
    let mut bob = login(&p.nodes[1], "bob").await;
    bob.send_message("alice@example.com", "moved")
        .await
        .unwrap();
    let seen = pushes_until_chat(&mut alice, "bob@").await;
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(p.nodes[0].temp_subscriptions(), 0);
}

/// The watcher's session ending (its node crashed) ends its subscriptions:
/// the same watcher logged in again gets no pushes.
#[tokio::test]
async fn the_watchers_failover_loses_its_subscriptions() {
    let p = pair(|_| {}).await;
    let mut bob = login(&p.nodes[1], "bob").await;
    let mut alice = login(&p.nodes[0], "alice").await;
    subscribe(&mut alice, "bob@example.com", VER, true).await;
    p.nodes[0].kill();
    drop(alice);
    let mut alice = login(&p.nodes[1], "alice").await;
    bob.send_presence(Some("xa"), None).await.unwrap();
    bob.send_message("alice@example.com", "x").await.unwrap();
    let seen = pushes_until_chat(&mut alice, "bob@").await;
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(p.nodes[1].temp_subscriptions(), 0);
}
