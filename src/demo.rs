//! The built-in demonstration: a simulated node pair behind the proxy and a
//! few simulated clients logging in (STARTTLS and direct TLS), setting
//! presence and chatting, with what happens printed as it happens.
//!
//! Everything runs in this process on loopback ports chosen by the kernel;
//! certificates are generated on the fly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::Config;
use crate::group::GroupStatus;
use crate::group::{NodeId, NodeState};
use crate::proxy::Proxy;
use crate::sim::{ClientTls, SimClient, SimNodeConfig, SimPair};
use crate::view::ProxyView;

const DOMAIN: &str = "example.com";
const WAIT: Duration = Duration::from_secs(10);

/// Runs the demo to its end, or until `shutdown` completes.
pub async fn run(shutdown: impl Future<Output = ()>) -> Result<(), String> {
    tokio::select! {
        r = script() => r,
        _ = shutdown => {
            println!("interrupted");
            Ok(())
        }
    }
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn say(text: impl AsRef<str>) {
    println!("   {}", text.as_ref());
}

async fn script() -> Result<(), String> {
    let e = |what: &'static str| move |err: String| format!("{what}: {err}");
    step("starting a simulated presence redundancy group (two IM&P nodes)");
    let users: Vec<(String, String)> = ["alice", "bob", "carol", "dave"]
        .iter()
        .map(|u| (u.to_string(), "pw".to_string()))
        .collect();
    let pair = SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, users.clone()),
        SimNodeConfig::new("imp2", DOMAIN, users),
    )
    .await
    .map_err(|x| format!("simulated nodes: {x}"))?;
    say(format!("node imp1 on {}", pair.nodes[0].addr()));
    say(format!("node imp2 on {}", pair.nodes[1].addr()));

    let certs = crate::tls::dev_certs(&[DOMAIN, "localhost"])
        .map_err(|x| e("certificates")(x.to_string()))?;
    let dir = std::env::temp_dir().join(format!("prg-proxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|x| e("temp dir")(x.to_string()))?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &certs.chain_pem).map_err(|x| e("write cert")(x.to_string()))?;
    std::fs::write(&key, &certs.key_pem).map_err(|x| e("write key")(x.to_string()))?;
    let client_tls = crate::tls::client_config_from_der(crate::tls::certs_from_pem(&certs.ca_pem))
        .map_err(e("client TLS"))?;

    let text = format!(
        r#"
[group]
name = "demo"
description = "simulated pair"
high_availability = true
assignment = "balanced"
domains = ["{DOMAIN}"]

[[nodes]]
name = "imp1"
address = "{n1}"

[[nodes]]
name = "imp2"
address = "{n2}"

[listen]
starttls = "127.0.0.1:0"
direct_tls = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"

[admin]
enabled = false

[srm]
heartbeat_interval = "500ms"
heartbeat_timeout = "3s"
initial_heartbeat_timeout = "5s"

[temp_presence]
min_interval = "{tp_min}s"
"#,
        tp_min = TP_MIN_INTERVAL.as_secs(),
        n1 = pair.nodes[0].addr(),
        n2 = pair.nodes[1].addr(),
        cert = cert.display(),
        key = key.display(),
    );
    let config = Config::parse(&text).map_err(|x| e("config")(x.to_string()))?;
    let proxy = Proxy::bind(config)
        .await
        .map_err(|x| e("proxy")(x.to_string()))?;
    let starttls = proxy.starttls_addr().ok_or("no STARTTLS listener")?;
    let direct = proxy.direct_tls_addr().ok_or("no direct-TLS listener")?;
    let shared = proxy.view();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let proxy_task = tokio::spawn(proxy.run(async move {
        let _ = stop_rx.await;
    }));
    step("prg-proxy in front of the pair (balanced assignment)");
    say(format!(
        "STARTTLS on {starttls}, direct TLS (XEP-0368) on {direct}"
    ));
    shared.mechanisms.wait_learned(WAIT).await;
    say(format!(
        "SASL mechanisms learned from the nodes: {}",
        shared.mechanisms.get().join(", ")
    ));

    step("clients log in through the proxy");
    let names = ["imp1", "imp2"];
    let mut clients = Vec::new();
    for (user, mech, direct_tls, resource) in [
        ("alice", "SCRAM-SHA-1", false, "desk"),
        ("dave", "PLAIN", true, "phone"),
        ("bob", "SCRAM-SHA-1", false, "laptop"),
    ] {
        let tls = if direct_tls {
            ClientTls::Direct {
                config: client_tls.clone(),
                server_name: DOMAIN.into(),
            }
        } else {
            ClientTls::StartTls {
                config: client_tls.clone(),
                server_name: DOMAIN.into(),
            }
        };
        let addr = if direct_tls { direct } else { starttls };
        let mut c = SimClient::connect(addr, DOMAIN, tls)
            .await
            .map_err(|x| format!("{user}: {x}"))?;
        c.login(user, "pw", mech)
            .await
            .map_err(|x| format!("{user}: {x}"))?;
        let jid = c.bind(resource).await.map_err(|x| format!("{user}: {x}"))?;
        let bare = format!("{user}@{DOMAIN}");
        let home = shared.assignment.home(&bare).map_err(|x| x.to_string())?;
        let on = shared
            .tracker
            .lookup(&bare)
            .and_then(|u| u.sessions.first().map(|s| s.node))
            .map_or("?", |n| names[n.index()]);
        say(format!(
            "{jid:<28} {mech:<12} over {:<10} home {} → bound on {on}",
            if direct_tls { "direct TLS" } else { "STARTTLS" },
            names[home.index()]
        ));
        clients.push((user, c));
    }
    let [(_, alice), (_, dave), (_, bob)] = &mut clients[..] else {
        return Err("clients".into());
    };

    step("presence");
    alice
        .send_presence(Some("dnd"), Some("In a meeting"))
        .await
        .map_err(|x| x.to_string())?;
    dave.send_presence(None, Some("On the road"))
        .await
        .map_err(|x| x.to_string())?;
    bob.send_presence(Some("away"), None)
        .await
        .map_err(|x| x.to_string())?;
    let p = dave
        .wait_for(WAIT, |s| {
            s.name == "presence" && s.attr("from") == Some("alice@example.com/desk")
        })
        .await
        .map_err(|x| format!("dave waiting for alice's presence: {x}"))?;
    say(format!(
        "dave (on imp2) sees alice (on imp1): show={} status={:?}",
        p.child_text("show").unwrap_or_else(|| "available".into()),
        p.child_text("status").unwrap_or_default()
    ));
    let p = alice
        .wait_for(WAIT, |s| {
            s.name == "presence" && s.attr("from") == Some("dave@example.com/phone")
        })
        .await
        .map_err(|x| format!("alice waiting for dave's presence: {x}"))?;
    say(format!(
        "alice (on imp1) sees dave (on imp2): status={:?}",
        p.child_text("status").unwrap_or_default()
    ));

    step("chat across the two nodes");
    alice
        .send_message("dave@example.com/phone", "Lunch at 12? 🍜")
        .await
        .map_err(|x| x.to_string())?;
    let m = dave
        .wait_for(WAIT, |s| s.name == "message")
        .await
        .map_err(|x| x.to_string())?;
    say(format!(
        "dave got from {}: {:?}",
        m.attr("from").unwrap_or("?"),
        m.body().unwrap_or_default()
    ));
    dave.send_message("alice@example.com/desk", "Sure — à midi!")
        .await
        .map_err(|x| x.to_string())?;
    let m = alice
        .wait_for(WAIT, |s| s.name == "message")
        .await
        .map_err(|x| x.to_string())?;
    say(format!(
        "alice got from {}: {:?}",
        m.attr("from").unwrap_or("?"),
        m.body().unwrap_or_default()
    ));

    step("what the proxy's session tracker knows");
    for (i, n) in NodeId::ALL.into_iter().zip(names) {
        let mut jids: Vec<String> = shared
            .tracker
            .sessions_on(i)
            .into_iter()
            .map(|(_, j)| j.to_string())
            .collect();
        jids.sort();
        say(format!(
            "{n}: {} session(s) {:?}",
            shared.tracker.count_on(i),
            jids
        ));
    }
    if let Some(u) = shared.tracker.lookup("alice@example.com") {
        if let Some(s) = u.sessions.first() {
            say(format!(
                "alice: show={:?} priority={} bound {:?} ago",
                s.presence.show,
                s.presence.priority,
                s.bound_at.elapsed()
            ));
        }
    }
    let m = &shared.metrics;
    use std::sync::atomic::Ordering::Relaxed;
    say(format!(
        "relayed {} stanzas up, {} down; {} logins routed",
        m.stanzas_up.load(Relaxed),
        m.stanzas_down.load(Relaxed),
        m.logins_routed.load(Relaxed)
    ));

    step("failover: node imp1 crashes");
    let mut status = shared.group.subscribe();
    wait_status(&mut status, |s| both(s, NodeState::Normal)).await?;
    show_group(&shared.group.current());
    let t0 = std::time::Instant::now();
    pair.nodes[0].kill();
    let st = wait_status(&mut status, |s| {
        s.state(NodeId::Node2).0 == NodeState::RunningInBackupMode
    })
    .await?;
    say(format!("detected in {:?}", t0.elapsed()));
    show_group(&st);
    for (user, c) in clients.iter_mut().filter(|(u, _)| *u != "dave") {
        match c.wait_for(WAIT, |_| false).await {
            Err(crate::sim::ClientError::StreamError {
                condition, text, ..
            }) => say(format!(
                "{user} was told <{condition}/>: {}",
                text.unwrap_or_default()
            )),
            other => return Err(format!("{user} expected a stream error, got {other:?}")),
        }
    }
    clients.retain(|(u, _)| *u == "dave");
    let relogin = |user: &'static str| {
        let tls = ClientTls::StartTls {
            config: client_tls.clone(),
            server_name: DOMAIN.into(),
        };
        async move {
            let mut c = SimClient::connect(starttls, DOMAIN, tls)
                .await
                .map_err(|x| format!("{user}: {x}"))?;
            c.login(user, "pw", "SCRAM-SHA-1")
                .await
                .map_err(|x| format!("{user}: {x}"))?;
            c.bind("desk").await.map_err(|x| format!("{user}: {x}"))?;
            Ok::<_, String>(c)
        }
    };
    let alice = relogin("alice").await?;
    say(format!(
        "alice logs in again → bound on {}",
        bound_on(&shared, "alice@example.com")
    ));
    clients.push(("alice", alice));
    if let Err(e) = shared.group.can_add_users() {
        say(format!("adding users now is refused: {e}"));
    }

    step("fallback: imp1 is back, the administrator falls back");
    pair.nodes[0]
        .restart()
        .await
        .map_err(|x| format!("restart imp1: {x}"))?;
    let st = wait_status(&mut status, |s| {
        s.state(NodeId::Node1).0 == NodeState::FailedOver
    })
    .await?;
    show_group(&st);
    shared
        .group
        .fallback(NodeId::Node1)
        .await
        .map_err(|x| format!("fallback: {x}"))?;
    let st = wait_status(&mut status, |s| both(s, NodeState::Normal)).await?;
    show_group(&st);
    if let Some((_, c)) = clients.iter_mut().find(|(u, _)| *u == "alice") {
        if let Err(crate::sim::ClientError::StreamError { condition, .. }) =
            c.wait_for(WAIT, |_| false).await
        {
            say(format!(
                "alice (served by imp2 until now) was told <{condition}/>"
            ));
        }
    }
    clients.retain(|(u, _)| *u == "dave");
    let alice = relogin("alice").await?;
    say(format!(
        "alice logs in again → bound on {}",
        bound_on(&shared, "alice@example.com")
    ));
    clients.push(("alice", alice));

    let tls = ClientTls::StartTls {
        config: client_tls.clone(),
        server_name: DOMAIN.into(),
    };
    temp_presence(&shared, starttls, tls, &mut clients).await?;

    storm(&client_tls, &cert, &key).await?;

    step("graceful shutdown");
    let _ = stop_tx.send(());
    for (user, c) in clients.iter_mut() {
        // Skip stanzas still in flight; the stream error comes last.
        match c.wait_for(WAIT, |_| false).await {
            Err(crate::sim::ClientError::StreamError { condition, .. }) => {
                say(format!("{user} was told <{condition}/>"))
            }
            other => return Err(format!("{user} expected a stream error, got {other:?}")),
        }
    }
    let _ = tokio::time::timeout(WAIT, proxy_task).await;
    let _ = std::fs::remove_dir_all(&dir);
    println!("\ndemo complete");
    Ok(())
}

fn both(s: &GroupStatus, state: NodeState) -> bool {
    s.state(NodeId::Node1).0 == state && s.state(NodeId::Node2).0 == state
}

/// Waits (bounded) until the group status satisfies `pred`.
async fn wait_status(
    rx: &mut tokio::sync::watch::Receiver<GroupStatus>,
    pred: impl Fn(&GroupStatus) -> bool,
) -> Result<GroupStatus, String> {
    let r = tokio::time::timeout(Duration::from_secs(30), async {
        rx.wait_for(|s| pred(s)).await.map(|s| s.clone())
    })
    .await;
    match r {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(_)) => Err("the group monitor stopped".into()),
        Err(_) => Err(format!(
            "group state not reached; now {:?}",
            rx.borrow().nodes
        )),
    }
}

fn show_group(s: &GroupStatus) {
    for n in &s.nodes {
        say(format!(
            "{} {:<5} {} ({})",
            n.id,
            n.name.as_deref().unwrap_or("-"),
            n.state,
            n.reason
        ));
    }
    if !s.recommended_action.is_empty() {
        say(format!("recommended action: {}", s.recommended_action));
    }
}

fn bound_on(shared: &ProxyView, bare: &str) -> &'static str {
    shared
        .tracker
        .lookup(bare)
        .and_then(|u| u.sessions.first().map(|s| s.node))
        .map_or("?", |n| ["imp1", "imp2"][n.index()])
}

/// The demo's 30-second rule, shortened so that the demo does not wait.
const TP_MIN_INTERVAL: Duration = Duration::from_secs(3);

/// Temporary presence through a failover: carol (on imp2) searches for
/// alice (on imp1); imp1 is failed over, alice moves to imp2, imp1's
/// subscription is gone, and the proxy restores carol's view of alice
/// without carol doing anything.
async fn temp_presence(
    shared: &ProxyView,
    starttls: std::net::SocketAddr,
    tls: ClientTls,
    clients: &mut Vec<(&'static str, SimClient)>,
) -> Result<(), String> {
    use std::sync::atomic::Ordering::Relaxed;
    const CAPS: &str = "http://cisco.com/jabber";
    const VER: &str = "demo-ver-1";
    step("temporary presence survives a failover (Cisco Jabber's search)");
    shared
        .add_user("carol@example.com", NodeId::Node2)
        .map_err(|x| x.to_string())?;
    let login = |user: &'static str| {
        let tls = tls.clone();
        async move {
            let mut c = SimClient::connect(starttls, DOMAIN, tls)
                .await
                .map_err(|x| format!("{user}: {x}"))?;
            c.login(user, "pw", "SCRAM-SHA-1")
                .await
                .map_err(|x| format!("{user}: {x}"))?;
            c.bind("desk").await.map_err(|x| format!("{user}: {x}"))?;
            c.send_presence(None, None)
                .await
                .map_err(|x| format!("{user}: {x}"))?;
            Ok::<_, String>(c)
        }
    };
    let mut carol = login("carol").await?;
    if let Some((_, a)) = clients.iter_mut().find(|(u, _)| *u == "alice") {
        a.send_presence(Some("dnd"), Some("In a meeting"))
            .await
            .map_err(|x| x.to_string())?;
        a.ping().await.map_err(|x| x.to_string())?;
    }
    let show = |p: &crate::sim::TempPush| {
        if p.available {
            p.show.clone().unwrap_or_else(|| "available".into())
        } else {
            "offline".into()
        }
    };
    // Carol's client searches for alice: directed presence with its caps,
    // then the node's disco#info round trip.
    carol
        .send_caps_presence("alice@example.com", CAPS, VER)
        .await
        .map_err(|x| x.to_string())?;
    let mut waits = 0;
    let first = loop {
        let s = carol.recv(WAIT).await.map_err(|x| format!("carol: {x}"))?;
        if s.disco_info_node().is_some() {
            carol
                .answer_disco(&s, &[crate::sim::TEMP_PRESENCE_NOTIFY])
                .await
                .map_err(|x| x.to_string())?;
        } else if let Some(p) = s.temp_presence() {
            break p;
        }
        waits += 1;
        if waits > 100 {
            return Err("carol: no temporary presence push".into());
        }
    };
    let searched = std::time::Instant::now();
    say(format!(
        "carol (on {}) searched alice (on {}): carol sees alice {}",
        bound_on(shared, "carol@example.com"),
        bound_on(shared, "alice@example.com"),
        show(&first)
    ));
    shared
        .group
        .failover(NodeId::Node1)
        .await
        .map_err(|x| format!("failover: {x}"))?;
    if let Some((_, c)) = clients.iter_mut().find(|(u, _)| *u == "alice") {
        if let Err(crate::sim::ClientError::StreamError { condition, .. }) =
            c.wait_for(WAIT, |_| false).await
        {
            say(format!(
                "administrator fails imp1 over: alice was told <{condition}/>"
            ));
        }
    }
    clients.retain(|(u, _)| *u != "alice");
    let p = carol
        .wait_for(WAIT, |s| s.temp_presence().is_some_and(|p| !p.available))
        .await
        .map_err(|x| format!("carol: {x}"))?;
    say(format!(
        "carol sees alice {}; imp1 held carol's subscription and forgets it",
        p.temp_presence().map(|p| show(&p)).unwrap_or_default()
    ));
    let mut alice = login("alice").await?;
    let back = std::time::Instant::now();
    alice
        .send_presence(Some("dnd"), Some("Back in the meeting"))
        .await
        .map_err(|x| x.to_string())?;
    say(format!(
        "alice logs in again → bound on {} and sets dnd; imp2 has no subscription for carol",
        bound_on(shared, "alice@example.com")
    ));
    // Carol does nothing but answer pings, as every client does.
    let restored = loop {
        let s = carol.recv(WAIT).await.map_err(|x| format!("carol: {x}"))?;
        if carol.answer_iq(&s).await.map_err(|x| x.to_string())? {
            continue;
        }
        if let Some(p) = s.temp_presence().filter(|p| p.available) {
            break p;
        }
    };
    let tp = &shared.presence.stats;
    say(format!(
        "carol sees alice {} again, {:.1} s after alice's re-login ({:.1} s after carol's search; 30-second rule set to {} s), carol did nothing",
        show(&restored),
        back.elapsed().as_secs_f64(),
        searched.elapsed().as_secs_f64(),
        TP_MIN_INTERVAL.as_secs()
    ));
    say(format!(
        "temporary presence: {} pair(s) held, {} replayed, {} deferred by the 30-second rule, {} disco#info answered from the cache",
        tp.pairs.load(Relaxed),
        tp.replays_sent.load(Relaxed),
        tp.replays_deferred.load(Relaxed),
        tp.disco_from_cache.load(Relaxed)
    ));
    clients.push(("alice", alice));
    clients.push(("carol", carol));
    Ok(())
}

/// Users in the storm step.
const STORM_USERS: usize = 300;
/// The backup node's login capacity in the storm step (logins per second;
/// the proxy is not told).
const STORM_CAPACITY: f64 = 100.0;

/// A second pair, whose backup node saturates like a real one: a failover
/// of `STORM_USERS` users with hints in the adaptive window, 70 % of the
/// clients honouring their hint and 30 % coming straight back, and the
/// re-login curve at the backup against the plan.
async fn storm(
    client_tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(), String> {
    use crate::sim::{LoginCapacity, ReconnectPolicy};
    use std::sync::atomic::Ordering::Relaxed;
    step(&format!(
        "a failover storm: {STORM_USERS} users, a backup that takes {STORM_CAPACITY:.0} logins/s"
    ));
    let users: Vec<(String, String)> = (0..STORM_USERS)
        .map(|i| (format!("user{i:03}"), "pw".to_string()))
        .collect();
    let mut c2 = SimNodeConfig::new("imp2", DOMAIN, users.clone());
    c2.login_capacity = Some(LoginCapacity::per_second(STORM_CAPACITY));
    c2.roster = crate::sim::Roster::Empty;
    let mut c1 = SimNodeConfig::new("imp1", DOMAIN, users);
    c1.roster = crate::sim::Roster::Empty;
    let pair = SimPair::start(c1, c2)
        .await
        .map_err(|x| format!("simulated nodes: {x}"))?;
    let text = format!(
        r#"
[group]
name = "storm"
assignment = "active-standby"
high_availability = true
domains = ["{DOMAIN}"]

[[nodes]]
name = "imp1"
address = "{n1}"

[[nodes]]
name = "imp2"
address = "{n2}"

[listen]
starttls = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"

[admin]
enabled = false

[srm]
heartbeat_interval = "500ms"
heartbeat_timeout = "3s"
initial_heartbeat_timeout = "5s"
"#,
        n1 = pair.nodes[0].addr(),
        n2 = pair.nodes[1].addr(),
        cert = cert.display(),
        key = key.display(),
    );
    let config = Config::parse(&text).map_err(|x| format!("config: {x}"))?;
    let proxy = Proxy::bind(config)
        .await
        .map_err(|x| format!("proxy: {x}"))?;
    let addr = proxy.starttls_addr().ok_or("no STARTTLS listener")?;
    let view = proxy.view();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = stop_rx.await;
    }));
    let mut status = view.group.subscribe();
    wait_status(&mut status, |s| both(s, NodeState::Normal)).await?;
    let tls = ClientTls::StartTls {
        config: client_tls.clone(),
        server_name: DOMAIN.into(),
    };
    let login = move |user: String, tls: ClientTls| async move {
        let mut c = SimClient::connect(addr, DOMAIN, tls)
            .await
            .map_err(|x| format!("{user}: {x}"))?;
        c.login(&user, "pw", "PLAIN")
            .await
            .map_err(|x| format!("{user}: {x}"))?;
        c.bind("desk").await.map_err(|x| format!("{user}: {x}"))?;
        Ok::<_, String>(c)
    };
    let mut clients = Vec::new();
    for i in 0..STORM_USERS {
        clients.push(login(format!("user{i:03}"), tls.clone()).await?);
    }
    say(format!(
        "{} users logged in on imp1; the administrator fails imp1 over",
        pair.nodes[0].session_count()
    ));
    view.group
        .failover(NodeId::Node1)
        .await
        .map_err(|x| format!("failover: {x}"))?;
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    let mut window = None;
    for (i, mut c) in clients.into_iter().enumerate() {
        let hint = match c.wait_for(WAIT, |_| false).await {
            Err(err) => err.relogin(),
            Ok(_) => None,
        };
        if window.is_none() {
            window = hint.as_ref().map(|h| (h.min, h.max));
        }
        // 70 % read the hint; the others come straight back.
        let policy = if i % 10 < 7 {
            ReconnectPolicy::Honour
        } else {
            ReconnectPolicy::Immediate
        };
        let delay = policy.delay(hint.as_ref(), &mut rand::thread_rng());
        let (user, tls) = (format!("user{i:03}"), tls.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // A refused login comes back when its fresh hint says.
            for _ in 0..10 {
                match login(user.clone(), tls.clone()).await {
                    Ok(c) => return Some((t0.elapsed(), c)),
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
            None
        }));
    }
    let evicted = t0.elapsed();
    let (lo, hi) = window.unwrap_or_default();
    say(format!(
        "every stream closed in {evicted:.2?}, each with a hint in [{:.1} s, {:.1} s] (adaptive window: N / the pacer's rate)",
        lo.as_secs_f64(),
        hi.as_secs_f64()
    ));
    let mut back = Vec::new();
    let mut sessions = Vec::new();
    for t in tasks {
        if let Ok(Some((at, c))) = t.await {
            back.push(at);
            sessions.push(c);
        }
    }
    let last = back.iter().max().copied().unwrap_or_default();
    let secs = last.as_secs() as usize + 1;
    let mut per_second = vec![0usize; secs];
    for b in &back {
        per_second[b.as_secs() as usize] += 1;
    }
    let planned = STORM_USERS as f64 / hi.as_secs_f64().max(1.0);
    say("re-logins at imp2 per second (# = 5 logins; | = the planned rate)");
    for (s, n) in per_second.iter().enumerate() {
        let bar = "#".repeat(n.div_ceil(5));
        let mark = (planned / 5.0).round() as usize;
        let mut line: Vec<char> = format!("{bar:<width$}", width = mark.max(bar.len()) + 1)
            .chars()
            .collect();
        if mark < line.len() && line[mark] == ' ' {
            line[mark] = '|';
        }
        say(format!(
            "{s:>3} s {:>4}  {}",
            n,
            line.into_iter().collect::<String>()
        ));
    }
    let stats = &view.hints.pacer().stats;
    say(format!(
        "{} of {STORM_USERS} back in {last:.1?}; planned {planned:.0}/s, pacer now at {:.0}/s; held {} (mean {} ms), refused {}; logins the node failed for overload: {}",
        back.len(),
        view.hints.pacer().rate(NodeId::Node2),
        stats.held.load(Relaxed),
        stats.held_ms.load(Relaxed) / stats.held.load(Relaxed).max(1),
        stats.refused.load(Relaxed),
        pair.nodes[1].logins_overloaded()
    ));
    drop(sessions);
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(WAIT, task).await;
    Ok(())
}
