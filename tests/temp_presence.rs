//! End to end: temporary presence subscriptions survive failover, fallback
//! and user moves through the proxy, with the simulated pair.
//!
//! The 30-second rule is the setting `temp_presence.min_interval`, shortened
//! here to a few seconds (real sockets are involved); the 30 s themselves
//! and the replay rate are tested under paused time in
//! `src/presence/registry.rs`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{config_text, eventually, Certs, TestGroup, DOMAIN, N1, N2, T};
use prg_proxy::group::NodeState;
use prg_proxy::sim::{
    ClientError, Roster, SimClient, SimNodeConfig, SimPair, Stanza, TempPush, TEMP_PRESENCE_NOTIFY,
};
use tokio::time::Instant;

const CAPS: &str = "http://cisco.com/jabber";
const VER: &str = "tp-ver-1";
const BOB: &str = "bob@example.com";

/// Short timers for a quick detection of a crash.
const SRM: &str = "[srm]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"1s\"\n\
                   initial_heartbeat_timeout = \"3s\"\ncritical_service_delay = \"1s\"\n";

/// A balanced pair behind the proxy, users not on each other's rosters
/// (only temporary presence tells a watcher about a target), alice homed
/// on `alice_home`, bob on `bob_home`, short re-login windows and the
/// given `[temp_presence]` body.
async fn group(alice_home: common::NodeId, bob_home: common::NodeId, tp: &str) -> TestGroup {
    let users: Vec<(String, String)> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| (u.to_string(), "pw".to_string()))
        .collect();
    let mut c1 = SimNodeConfig::new("imp1", DOMAIN, users.clone());
    let mut c2 = SimNodeConfig::new("imp2", DOMAIN, users);
    c1.roster = Roster::Empty;
    c2.roster = Roster::Empty;
    let pair = SimPair::start(c1, c2).await.unwrap();
    let certs = Certs::new();
    let extra = format!("{SRM}\n[temp_presence]\n{tp}\n");
    let mut text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "balanced",
        &certs,
        &extra,
    );
    for n in ["imp1", "imp2"] {
        let k = format!("name = \"{n}\"\n");
        text = text.replacen(
            &k,
            &format!("{k}relogin_lower = \"200ms\"\nrelogin_upper = \"600ms\"\n"),
            1,
        );
    }
    let g = TestGroup::launch(pair, certs, &text).await;
    let mut rx = g.view.group_status();
    let normal = rx.wait_for(|s| s.nodes.iter().all(|n| n.state == NodeState::Normal));
    tokio::time::timeout(T, normal).await.unwrap().unwrap();
    g.view.add_user("alice@example.com", alice_home).unwrap();
    g.view.add_user("bob@example.com", bob_home).unwrap();
    g
}

async fn try_login(g: &TestGroup, user: &str) -> Result<SimClient, ClientError> {
    let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls()).await?;
    c.login(user, "pw", "PLAIN").await?;
    c.bind("desk").await?;
    c.send_presence(None, None).await?;
    Ok(c)
}

/// Logs in, retrying (bounded) while the group is still moving users.
async fn login(g: &TestGroup, user: &str) -> SimClient {
    let start = Instant::now();
    loop {
        match try_login(g, user).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(start.elapsed() < T * 2, "{user} cannot log in: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Logs in again after the stream ended, at the re-login hint's slot.
async fn relogin_after_hint(g: &TestGroup, c: &mut SimClient, user: &str) -> SimClient {
    let (e, at) = loop {
        match c.recv(T).await {
            Ok(_) => continue,
            Err(e) => break (e, Instant::now()),
        }
    };
    if let Some(h) = e.relogin() {
        tokio::time::sleep_until(at + h.after).await;
    }
    login(g, user).await
}

/// A watcher's client subscribes to `to`, answering the node's disco#info.
async fn subscribe(w: &mut SimClient, to: &str) -> TempPush {
    w.send_caps_presence(to, CAPS, VER).await.unwrap();
    loop {
        let s = w.recv(T).await.unwrap();
        if s.disco_info_node().is_some() {
            w.answer_disco(&s, &[TEMP_PRESENCE_NOTIFY, "urn:xmpp:ping"])
                .await
                .unwrap();
        } else if let Some(p) = s.temp_presence() {
            return p;
        }
    }
}

/// What a watcher saw while waiting, sending nothing of its own: it only
/// answers iq gets from its node, as every client must.
struct Watch {
    push: TempPush,
    at: Instant,
    answered_pings: usize,
}

/// Waits (doing nothing but answering iq gets) for a push that `want`s.
async fn watch(
    w: &mut SimClient,
    within: Duration,
    mut want: impl FnMut(&TempPush) -> bool,
) -> Watch {
    let deadline = Instant::now() + within;
    let mut answered_pings = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s: Stanza = w
            .recv(left)
            .await
            .unwrap_or_else(|e| panic!("no push in time: {e}"));
        if s.name == "iq" && s.has_child("ping") {
            answered_pings += 1;
        }
        if w.answer_iq(&s).await.unwrap() {
            continue;
        }
        if let Some(p) = s.temp_presence() {
            if want(&p) {
                return Watch {
                    push: p,
                    at: Instant::now(),
                    answered_pings,
                };
            }
        }
    }
}

fn replays(g: &TestGroup) -> u64 {
    g.view.presence.stats.replays_sent.load(Ordering::Relaxed)
}

/// The main case: A on node 2 watches B on node 1; node 1 is
/// killed; B logs in again on node 2 following its hint; A sees B's real
/// presence again without sending anything, no sooner than the 30-second
/// rule after A's subscribe, and node 2 holds the subscription.
#[tokio::test]
async fn a_crash_of_the_targets_node_is_repaired_without_the_watcher() {
    let min = Duration::from_secs(3);
    let mut g = group(N2, N1, "min_interval = \"3s\"\nreplay_rate = 50.0").await;
    let mut bob = login(&g, "bob").await;
    let mut alice = login(&g, "alice").await;
    let subscribed = Instant::now();
    let first = subscribe(&mut alice, BOB).await;
    assert!(first.available);
    assert_eq!(g.pair.nodes[0].temp_watchers("bob").len(), 1);
    assert!(eventually(T, || g.view.presence.pairs() == 1).await);

    g.pair.nodes[0].kill();
    let mut bob = relogin_after_hint(&g, &mut bob, "bob").await;
    let back = Instant::now();
    bob.send_presence(Some("away"), Some("back")).await.unwrap();
    assert_eq!(g.pair.nodes[1].session_count(), 2);

    let w = watch(&mut alice, T, |p| {
        p.available && p.show.as_deref() == Some("away")
    })
    .await;
    println!(
        "restored {:?} after B's re-login, {:?} after the subscribe",
        w.at - back,
        w.at - subscribed
    );
    assert!(w.at - subscribed >= min, "the 30-second rule");
    assert!(w.at - back <= min + Duration::from_secs(3));
    assert_eq!(w.push.item, "bob@example.com/desk");
    assert_eq!(w.answered_pings, 0, "the watcher's client sent nothing");
    assert_eq!(replays(&g), 1);
    assert_eq!(
        g.pair.nodes[1].temp_watchers("bob"),
        ["alice@example.com/desk"]
    );
    assert!(
        g.view
            .presence
            .stats
            .replays_deferred
            .load(Ordering::Relaxed)
            >= 1
    );
    g.stop().await;
}

/// A's own node fails (A moves, B stays): the proxy replays A's pair
/// through A's new stream, and answers node 2's disco#info for A's caps
/// from its cache (A's new client no longer knows that `ver`).
#[tokio::test]
async fn the_watchers_failover_is_repaired_and_disco_answered_from_the_cache() {
    let mut g = group(N1, N2, "min_interval = \"1s\"\nwatcher_grace = \"0s\"").await;
    let _bob = login(&g, "bob").await;
    let mut alice = login(&g, "alice").await;
    subscribe(&mut alice, BOB).await;
    assert!(eventually(T, || g.view.presence.pairs() == 1).await);
    let asked = g.pair.nodes[1].temp_disco_queries();

    g.pair.nodes[0].kill();
    let mut alice = relogin_after_hint(&g, &mut alice, "alice").await;
    let w = watch(&mut alice, T, |p| p.available).await;
    assert_eq!(w.push.target, BOB);
    assert_eq!(replays(&g), 1);
    assert_eq!(g.pair.nodes[1].temp_disco_queries(), asked + 1);
    assert_eq!(
        g.view
            .presence
            .stats
            .disco_from_cache
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(g.pair.nodes[1].temp_watchers("bob").len(), 1);
    g.stop().await;
}

/// Failover then fallback of B's node: restored after each move, the
/// second no sooner than the 30-second rule after the first replay.
#[tokio::test]
async fn failover_and_fallback_are_both_repaired() {
    let min = Duration::from_secs(2);
    let mut g = group(N2, N1, "min_interval = \"2s\"").await;
    let mut bob = login(&g, "bob").await;
    let mut alice = login(&g, "alice").await;
    subscribe(&mut alice, BOB).await;

    g.view.group.failover(N1).await.unwrap();
    let mut bob2 = relogin_after_hint(&g, &mut bob, "bob").await;
    bob2.send_presence(Some("dnd"), None).await.unwrap();
    let first = watch(&mut alice, T, |p| p.show.as_deref() == Some("dnd")).await;
    assert_eq!(g.pair.nodes[1].temp_watchers("bob").len(), 1);

    let mut rx = g.view.group_status();
    let failed_over = rx.wait_for(|s| s.nodes[0].state == NodeState::Idle);
    tokio::time::timeout(T, failed_over).await.unwrap().unwrap();
    g.view.group.fallback(N1).await.unwrap();
    let mut bob3 = relogin_after_hint(&g, &mut bob2, "bob").await;
    bob3.send_presence(Some("xa"), None).await.unwrap();
    let second = watch(&mut alice, T, |p| p.show.as_deref() == Some("xa")).await;
    assert!(second.at - first.at >= min, "the 30-second rule");
    assert_eq!(g.pair.nodes[0].temp_watchers("bob").len(), 1);
    assert_eq!(replays(&g), 2);
    g.stop().await;
}

/// A single user moved (reassigned, logs in again on the other node).
#[tokio::test]
async fn a_single_user_move_is_repaired() {
    let mut g = group(N2, N1, "min_interval = \"1s\"").await;
    let bob = login(&g, "bob").await;
    let mut alice = login(&g, "alice").await;
    subscribe(&mut alice, BOB).await;
    g.view.add_user(BOB, N2).unwrap();
    bob.close().await.unwrap();
    let mut bob = login(&g, "bob").await;
    assert_eq!(g.pair.nodes[1].session_count(), 2);
    bob.send_presence(Some("chat"), None).await.unwrap();
    let w = watch(&mut alice, T, |p| p.show.as_deref() == Some("chat")).await;
    assert!(w.push.available);
    assert_eq!(g.pair.nodes[1].temp_watchers("bob").len(), 1);
    assert_eq!(g.pair.nodes[0].temp_subscriptions(), 0);
    g.stop().await;
}

/// Unsubscribed before the move: nothing is kept, nothing replayed.
#[tokio::test]
async fn an_unsubscribed_pair_is_not_replayed() {
    let mut g = group(N2, N1, "min_interval = \"0s\"").await;
    let mut bob = login(&g, "bob").await;
    let mut alice = login(&g, "alice").await;
    subscribe(&mut alice, BOB).await;
    assert!(eventually(T, || g.view.presence.pairs() == 1).await);
    alice.send_directed_unavailable(BOB).await.unwrap();
    assert!(eventually(T, || g.view.presence.pairs() == 0).await);

    g.pair.nodes[0].kill();
    let mut bob = relogin_after_hint(&g, &mut bob, "bob").await;
    bob.ping().await.unwrap();
    assert_eq!(g.view.presence.replays_queued(), 0);
    assert_eq!(replays(&g), 0);
    assert_eq!(g.pair.nodes[1].temp_subscriptions(), 0);
    g.stop().await;
}

/// A moved watcher whose client resubscribes by itself within the grace:
/// no replay, exactly one subscription at the node.
#[tokio::test]
async fn a_client_that_resubscribes_itself_gets_no_duplicate() {
    let mut g = group(N1, N2, "min_interval = \"0s\"\nwatcher_grace = \"5s\"").await;
    let _bob = login(&g, "bob").await;
    let mut alice = login(&g, "alice").await;
    subscribe(&mut alice, BOB).await;
    g.pair.nodes[0].kill();
    let mut alice = relogin_after_hint(&g, &mut alice, "alice").await;
    assert_eq!(g.view.presence.replays_queued(), 1);
    let p = subscribe(&mut alice, BOB).await;
    assert!(p.available);
    assert_eq!(g.view.presence.replays_queued(), 0);
    assert_eq!(replays(&g), 0);
    assert_eq!(g.pair.nodes[1].temp_watchers("bob").len(), 1);
    g.stop().await;
}

/// A pair past its TTL is forgotten and not replayed.
#[tokio::test]
async fn an_expired_pair_is_not_replayed() {
    let mut g = group(N2, N1, "min_interval = \"0s\"\nttl = \"500ms\"").await;
    let mut bob = login(&g, "bob").await;
    let mut alice = login(&g, "alice").await;
    subscribe(&mut alice, BOB).await;
    assert!(eventually(T, || g.view.presence.pairs() == 1).await);
    assert!(eventually(T, || g.view.presence.pairs() == 0).await);
    assert_eq!(g.view.presence.stats.expired.load(Ordering::Relaxed), 1);
    g.pair.nodes[0].kill();
    let mut bob = relogin_after_hint(&g, &mut bob, "bob").await;
    bob.ping().await.unwrap();
    assert_eq!(g.view.presence.replays_queued(), 0);
    assert_eq!(replays(&g), 0);
    g.stop().await;
}
