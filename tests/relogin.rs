//! End to end: re-login hints and the login pacer with the simulated pair.
//!
//! Windows are a few seconds long (per-node `relogin_lower` /
//! `relogin_upper`) because real sockets are involved; the 120–537 s
//! defaults, the stratified spread of 10,000 users and the pacer's rate
//! control are tested under a controlled clock in `src/failover/`.

mod common;

use std::time::Duration;

use common::{config_text, Certs, TestGroup, DOMAIN, N1, N2, T};
use prg_proxy::sim::{ClientError, Relogin, SimClient, SimNodeConfig, SimPair};
use tokio::time::Instant;

fn users(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("u{i:02}"), "pw".to_string()))
        .collect()
}

/// A pair of `n` users behind a proxy (active/standby: everyone on node 1),
/// node 2's re-login window `[lower, upper]`, and `failover` settings.
async fn group(n: usize, window: (&str, &str), failover: &str) -> TestGroup {
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, users(n)),
        SimNodeConfig::new("imp2", DOMAIN, users(n)),
    )
    .await
    .unwrap();
    let certs = Certs::new();
    let extra = format!("[failover]\n{failover}\n");
    let text = config_text(
        &[pair.nodes[0].addr(), pair.nodes[1].addr()],
        "active-standby",
        &certs,
        &extra,
    );
    let imp2 = "name = \"imp2\"\n";
    let text = text.replacen(
        imp2,
        &format!(
            "{imp2}relogin_lower = \"{}\"\nrelogin_upper = \"{}\"\n",
            window.0, window.1
        ),
        1,
    );
    let g = TestGroup::launch(pair, certs, &text).await;
    let mut rx = g.view.group_status();
    let normal = rx.wait_for(|s| {
        s.nodes
            .iter()
            .all(|n| n.state == prg_proxy::group::NodeState::Normal)
    });
    tokio::time::timeout(T, normal).await.unwrap().unwrap();
    g
}

async fn try_login(g: &TestGroup, user: &str) -> Result<SimClient, ClientError> {
    let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls()).await?;
    c.login(user, "pw", "PLAIN").await?;
    c.bind("desk").await?;
    Ok(c)
}

/// Reads until the stream ends with an error; returns it and when.
async fn evicted(c: &mut SimClient) -> (ClientError, Instant) {
    loop {
        match c.recv(T).await {
            Ok(_) => continue,
            Err(e) => return (e, Instant::now()),
        }
    }
}

fn hint_of(e: &ClientError) -> Relogin {
    e.relogin()
        .unwrap_or_else(|| panic!("no re-login hint in {e:?}"))
}

fn held(g: &TestGroup) -> u64 {
    g.view
        .hints
        .pacer()
        .stats
        .held
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// A manual failover evicts every user of node 1 with its own slot in
/// node 2's window; clients that honour the hint come back at their
/// slots, all get in on node 2, and none is refused.
#[tokio::test]
async fn a_failover_evicts_with_hints_and_honouring_clients_return_at_their_slots() {
    let n = 24;
    let mut g = group(n, ("1s", "4s"), "window = \"fixed\"").await;
    let mut clients = Vec::new();
    for (u, _) in users(n) {
        clients.push((u.clone(), try_login(&g, &u).await.unwrap()));
    }
    assert_eq!(g.pair.nodes[0].session_count(), n);

    g.view.group.failover(N1).await.unwrap();
    let mut back = Vec::new();
    for (u, mut c) in clients {
        let (e, at) = evicted(&mut c).await;
        let ClientError::StreamError {
            condition, text, ..
        } = &e
        else {
            panic!("{u}: {e:?}");
        };
        assert_eq!(condition, "system-shutdown");
        assert!(
            text.as_deref().unwrap_or("").contains("reconnect in"),
            "{text:?}"
        );
        let h = hint_of(&e);
        assert_eq!(h.reason, "failover");
        assert_eq!(
            (h.min, h.max),
            (Duration::from_secs(1), Duration::from_secs(4))
        );
        assert!((h.min..=h.max).contains(&h.after), "{u}: {h:?}");
        let (addr, tls) = (g.starttls, g.starttls_tls());
        back.push(tokio::spawn(async move {
            // An honouring client: back at its slot.
            tokio::time::sleep_until(at + h.after).await;
            let login = async {
                let mut c = SimClient::connect(addr, DOMAIN, tls).await?;
                c.login(&u, "pw", "PLAIN").await?;
                c.bind("desk").await?;
                Ok::<_, ClientError>(c)
            };
            let c = login.await.unwrap_or_else(|e| panic!("{u}: {e}"));
            (u, at + h.after, Instant::now(), c)
        }));
    }
    let mut slots = Vec::new();
    let mut sessions = Vec::new();
    for b in back {
        let (u, slot, bound, c) = b.await.unwrap();
        sessions.push(c);
        assert!(bound >= slot, "{u} bound before its slot");
        slots.push(slot);
    }
    // Stratified: no two users share a 1/n-th of the window.
    slots.sort();
    let gaps_ok = slots
        .windows(3)
        .all(|w| w[2] - w[0] > Duration::from_millis(1));
    assert!(gaps_ok, "slots bunch: {slots:?}");
    assert_eq!(g.pair.nodes[1].session_count(), n);
    // Coming at their slots, none is told to come back later (a client
    // delayed by a busy machine may wait a moment for a token).
    let refused = g
        .view
        .hints
        .pacer()
        .stats
        .refused
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        refused, 0,
        "clients honouring their slots are never refused"
    );
    g.stop().await;
}

/// A client that ignores its hint and comes back at once is held inside
/// SASL until its slot, then let in.
#[tokio::test]
async fn a_client_that_ignores_its_hint_is_held_until_its_slot() {
    let mut g = group(1, ("2s", "3s"), "window = \"fixed\"").await;
    let mut c = try_login(&g, "u00").await.unwrap();
    g.view.group.failover(N1).await.unwrap();
    let (e, at) = evicted(&mut c).await;
    let h = hint_of(&e);
    let _c = try_login(&g, "u00").await.unwrap();
    // `after` is rounded up to the millisecond: the slot is at most 1 ms
    // before it.
    let slot = at + h.after - Duration::from_millis(1);
    assert!(Instant::now() >= slot, "let in before its slot");
    assert_eq!(held(&g), 1);
    assert_eq!(g.pair.nodes[1].session_count(), 1);
    g.stop().await;
}

/// A client that gives up while its login is held leaves at once: the
/// pacer counts it as abandoned and nothing of it reaches the node, so a
/// storm of clients timing out costs the backup nothing.
#[tokio::test]
async fn a_client_that_leaves_while_held_costs_the_node_nothing() {
    let mut g = group(1, ("3s", "4s"), "window = \"fixed\"").await;
    let mut c = try_login(&g, "u00").await.unwrap();
    g.view.group.failover(N1).await.unwrap();
    let (e, at) = evicted(&mut c).await;
    let h = hint_of(&e);
    let tried = g.pair.nodes[1].logins_total();
    // The client gives up half a second into the hold (its slot is 3 s or
    // more away) and closes its connection.
    let gave_up = tokio::time::timeout(Duration::from_millis(500), try_login(&g, "u00")).await;
    assert!(
        gave_up.is_err(),
        "a login seconds before its slot got an answer"
    );
    let stats = &g.view.hints.pacer().stats;
    let abandoned = async {
        while stats.abandoned.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(T, abandoned)
        .await
        .expect("the held login was not given up when its client left");
    assert!(Instant::now() < at + h.after, "seen only at the slot");
    assert_eq!(
        g.pair.nodes[1].logins_total(),
        tried,
        "the node saw the login"
    );
    // At its slot the user gets in as usual.
    tokio::time::sleep_until(at + h.after).await;
    let _c = try_login(&g, "u00").await.unwrap();
    assert_eq!(g.pair.nodes[1].logins_total(), tried + 1);
    g.stop().await;
}

/// A login whose slot is further off than `max_hold` is refused, after
/// `refuse_delay`, with <resource-constraint/> and a fresh hint naming the
/// time left; a user whose node was not hit logs in at once meanwhile.
#[tokio::test]
async fn a_far_off_login_is_refused_with_a_fresh_hint_and_others_are_not_held() {
    let mut g = group(
        2,
        ("30s", "40s"),
        "window = \"fixed\"\nmax_hold = \"1s\"\nrefuse_delay = \"300ms\"",
    )
    .await;
    let mut c = try_login(&g, "u00").await.unwrap();
    g.view.group.failover(N1).await.unwrap();
    let (e, _) = evicted(&mut c).await;
    let first = hint_of(&e);
    let t0 = Instant::now();
    let Err(err) = try_login(&g, "u00").await else {
        panic!("a login 30 s before its slot must be refused");
    };
    let ClientError::StreamError { condition, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(condition, "resource-constraint");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "told before refuse_delay"
    );
    let fresh = hint_of(&err);
    assert_eq!(fresh.reason, "paced");
    assert!(fresh.after <= first.after && fresh.after >= first.after - Duration::from_secs(2));
    // u01 was never moved (it had no session): not held.
    let before = held(&g);
    let _d = try_login(&g, "u01").await.unwrap();
    assert_eq!(held(&g), before);
    g.stop().await;
}

/// The relay noticing its node died ends the stream with
/// <remote-connection-failed/> and a node-lost hint in the peer's window.
#[tokio::test]
async fn a_crash_seen_by_the_relay_ends_streams_with_a_hint() {
    let mut g = group(3, ("1s", "2s"), "window = \"fixed\"").await;
    let mut cs = Vec::new();
    for u in ["u00", "u01", "u02"] {
        cs.push(try_login(&g, u).await.unwrap());
    }
    g.pair.nodes[0].kill();
    for c in &mut cs {
        let (e, _) = evicted(c).await;
        let ClientError::StreamError { condition, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(condition, "remote-connection-failed");
        let h = hint_of(&e);
        assert_eq!(h.reason, "node-lost");
        assert!(h.after <= Duration::from_secs(2), "{h:?}");
    }
    assert!(g.view.hints.pacer().pending_slots() >= 3);
    g.stop().await;
}

/// A proxy shutdown spreads its hints over `shutdown_spread`.
#[tokio::test]
async fn a_proxy_shutdown_spreads_its_hints() {
    let n = 10;
    let mut g = group(n, ("1s", "2s"), "shutdown_spread = \"10s\"").await;
    let mut cs = Vec::new();
    for (u, _) in users(n) {
        cs.push(try_login(&g, &u).await.unwrap());
    }
    let stop = g.stop();
    let read = async {
        let mut afters = Vec::new();
        for c in &mut cs {
            let (e, _) = evicted(c).await;
            let h = hint_of(&e);
            assert_eq!(h.reason, "shutdown");
            afters.push(h.after);
        }
        afters
    };
    let ((), mut afters) = tokio::join!(stop, read);
    afters.sort();
    assert!(
        afters.iter().all(|a| *a <= Duration::from_secs(10)),
        "{afters:?}"
    );
    // One per second-wide stratum: spread, not bunched.
    let distinct: std::collections::BTreeSet<u64> = afters.iter().map(|a| a.as_secs()).collect();
    assert!(distinct.len() >= n / 2, "{afters:?}");
    let _ = N2;
}
