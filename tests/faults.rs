//! Faults under traffic: the proxy SIGTERMed while its clients chat, its
//! certificate swapped while they chat, and a node that accepts TCP but
//! never answers. (A node that crashes or hangs mid-relay: `failover.rs`
//! on the simulated pair, the interop suite on real Prosody nodes.)

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use prg_proxy::group::{NodeState, Reason};
use prg_proxy::sim::{ClientError, ClientTls, SimClient, SimNodeConfig, SimPair};
use tokio::time::Instant;
use tokio_rustls::rustls;

/// `n` users `u00`, `u01`, … with password `pw`.
fn many_users(n: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (format!("u{i:02}"), "pw".into())).collect()
}

async fn pair_of(n: usize) -> SimPair {
    SimPair::start(
        SimNodeConfig::new("imp1", DOMAIN, many_users(n)),
        SimNodeConfig::new("imp2", DOMAIN, many_users(n)),
    )
    .await
    .unwrap()
}

fn starttls(client: &Arc<rustls::ClientConfig>) -> ClientTls {
    ClientTls::StartTls {
        config: client.clone(),
        server_name: DOMAIN.into(),
    }
}

async fn logged_in(addr: SocketAddr, tls: ClientTls, user: &str) -> SimClient {
    let mut c = SimClient::connect(addr, DOMAIN, tls)
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"));
    c.login(user, "pw", "PLAIN")
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"));
    c.bind("desk")
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"));
    // Available: messages to the bare JID are delivered.
    c.send_presence(None, None)
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"));
    c
}

/// How one chatting client's stream ended.
#[derive(Debug)]
struct Ending {
    user: String,
    sent: u64,
    /// The stream error that ended it: condition and the element as received.
    error: Option<(String, String)>,
    /// The server closed its stream (`</stream:stream>`) after the error.
    stream_closed: bool,
    /// Bytes received after the last whole element (a stanza cut short).
    unframed: usize,
    /// Anything else that went wrong (bad XML, an i/o error, a close
    /// without a stream error).
    other: Option<String>,
}

/// How a chat goes: a message every `every` with `pad` bytes of padding.
#[derive(Clone, Copy)]
struct Pace {
    every: Duration,
    pad: usize,
}

/// One client chatting with `peer`: a message per `pace`, reading
/// everything that arrives in between (counted in `received`), so that
/// stanzas are in flight both ways all the time. Ends at a stream error
/// (then reads to the end of the stream) or when `stop` is set.
async fn chat(
    mut c: SimClient,
    user: String,
    peer: String,
    pace: Pace,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Ending {
    let mut end = Ending {
        user,
        sent: 0,
        error: None,
        stream_closed: false,
        unframed: 0,
        other: None,
    };
    // The proxy may close its side while a message is being sent: from
    // then on only reading matters.
    let mut sending = true;
    let pad = "x".repeat(pace.pad);
    loop {
        if stop.load(Ordering::Relaxed) {
            return end;
        }
        if sending {
            let body = format!("{} #{} {pad}", end.user, end.sent);
            match c.send_message(&format!("{peer}@{DOMAIN}"), &body).await {
                Ok(()) => end.sent += 1,
                Err(_) => sending = false,
            }
        }
        let next = Instant::now() + pace.every;
        loop {
            match c.recv(next.saturating_duration_since(Instant::now())).await {
                Ok(s) => {
                    if s.name == "message" && s.body().is_some() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(ClientError::Timeout) => break,
                Err(ClientError::StreamError { condition, raw, .. }) => {
                    end.error = Some((condition, raw));
                    // Only the end of the stream may follow.
                    end.other = match c.recv(T).await {
                        Err(ClientError::Closed) => None,
                        Ok(s) => Some(format!("after the stream error: {}", s.raw)),
                        Err(e) => Some(format!("after the stream error: {e}")),
                    };
                    end.stream_closed = c.stream_closed_by_server();
                    end.unframed = c.unframed_bytes();
                    return end;
                }
                Err(e) => {
                    end.other = Some(e.to_string());
                    end.unframed = c.unframed_bytes();
                    return end;
                }
            }
        }
    }
}

/// Chatting pairs: `u00` with `u01`, `u02` with `u03`, … Returns the
/// tasks and each client's received-message counter.
async fn start_chats(
    addr: SocketAddr,
    tls: &ClientTls,
    n: usize,
    pace: Pace,
    stop: &Arc<AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<Ending>>, Vec<Arc<AtomicU64>>) {
    let mut tasks = Vec::new();
    let mut counters = Vec::new();
    let mut clients = Vec::new();
    for i in 0..n {
        let user = format!("u{i:02}");
        clients.push((user.clone(), logged_in(addr, tls.clone(), &user).await));
    }
    for (i, (user, c)) in clients.into_iter().enumerate() {
        let peer = format!("u{:02}", i ^ 1);
        let received = Arc::new(AtomicU64::new(0));
        counters.push(received.clone());
        tasks.push(tokio::spawn(chat(
            c,
            user,
            peer,
            pace,
            received,
            stop.clone(),
        )));
    }
    (tasks, counters)
}

/// Waits until every counter has grown by `more` over `base`.
async fn every_client_received(counters: &[Arc<AtomicU64>], base: &[u64], more: u64) {
    let ok = eventually(Duration::from_secs(20), || {
        counters
            .iter()
            .zip(base)
            .all(|(c, b)| c.load(Ordering::Relaxed) >= b + more)
    })
    .await;
    let now: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert!(
        ok,
        "not every client received {more} more: {base:?} -> {now:?}"
    );
}

fn counts(counters: &[Arc<AtomicU64>]) -> Vec<u64> {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

/// Checks that `xml` is one complete, well-formed element (every start
/// tag closed, nothing after the root's end).
fn complete_element(xml: &str) -> Result<(), String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let mut depth = 0usize;
    let mut roots = 0usize;
    loop {
        match r.read_event() {
            Ok(Event::Start(_)) => {
                if depth == 0 {
                    roots += 1;
                }
                depth += 1;
            }
            Ok(Event::End(_)) => depth = depth.checked_sub(1).ok_or("unbalanced end tag")?,
            Ok(Event::Empty(_)) if depth == 0 => roots += 1,
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if depth != 0 || roots != 1 {
        return Err(format!("depth {depth} at the end, {roots} root elements"));
    }
    Ok(())
}

/// SIGTERM while 24 clients chat (a 4 KiB message every 5 ms each, across
/// both nodes, 50 received each before the signal): every client gets a whole `<stream:error><system-shutdown/>…
/// </stream:error>` with a `shutdown` re-login hint, then
/// `</stream:stream>`, with no element cut short before or after; the
/// process exits 0 within its grace period, having closed every
/// connection itself.
// Multi-threaded: the test blocks a thread reading the proxy's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_ends_every_stream_with_a_whole_system_shutdown_and_exits_0() {
    const CLIENTS: usize = 24;
    let grace = Duration::from_secs(5);
    let pair = pair_of(CLIENTS).await;
    let certs = Certs::new();
    let (mut proxy, addr, _) =
        ProxyProcess::in_front_of(&pair, &certs, "[limits]\nshutdown_grace = \"5s\"\n");

    let stop = Arc::new(AtomicBool::new(false));
    let tls = starttls(&certs.client);
    let pace = Pace {
        every: Duration::from_millis(5),
        pad: 4096,
    };
    let (tasks, counters) = start_chats(addr, &tls, CLIENTS, pace, &stop).await;
    every_client_received(&counters, &[0; CLIENTS], 50).await;
    assert!(pair.nodes[0].session_count() > 0 && pair.nodes[1].session_count() > 0);

    let t0 = std::time::Instant::now();
    proxy.signal("TERM");
    let mut endings = Vec::new();
    for t in tasks {
        endings.push(
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("every stream ends")
                .unwrap(),
        );
    }
    let told = t0.elapsed();
    let code = proxy.wait_exit(grace + Duration::from_secs(2));
    let exited = t0.elapsed();

    let sent: u64 = endings.iter().map(|e| e.sent).sum();
    let received: u64 = counts(&counters).iter().sum();
    println!(
        "{CLIENTS} clients, {sent} messages sent, {received} received; \
         all told within {told:?}, exit {code:?} after {exited:?}"
    );
    for e in &endings {
        let Some((condition, raw)) = &e.error else {
            panic!("{}: no stream error: {e:?}", e.user);
        };
        assert_eq!(condition, "system-shutdown", "{e:?}");
        complete_element(raw).unwrap_or_else(|x| panic!("{}: {x}: {raw}", e.user));
        assert!(raw.ends_with("</stream:error>"), "{raw}");
        assert!(raw.contains("reason='shutdown'"), "{raw}");
        assert!(e.stream_closed, "{}: no </stream:stream>: {e:?}", e.user);
        assert_eq!(e.unframed, 0, "{}: an element was cut short", e.user);
        assert_eq!(e.other, None, "{}", e.user);
    }
    assert_eq!(code, Some(0));
    assert!(exited < grace, "exited after {exited:?}");
    let log: Vec<String> = proxy.lines.try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("all connections closed")),
        "{log:#?}"
    );
}

/// Trusts only the CA in `ca_pem`.
fn trusting(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    prg_proxy::tls::client_config_from_der(prg_proxy::tls::certs_from_pem(ca_pem)).unwrap()
}

/// Replaces the certificate and key files with a new pair from a new CA;
/// returns a client configuration trusting only that CA.
fn swap_certificate(certs: &Certs) -> Arc<rustls::ClientConfig> {
    let fresh = prg_proxy::tls::dev_certs(&[DOMAIN, "localhost"]).unwrap();
    std::fs::write(certs.cert(), &fresh.chain_pem).unwrap();
    std::fs::write(certs.key(), &fresh.key_pem).unwrap();
    trusting(&fresh.ca_pem)
}

/// After a reload: a new handshake presents the certificate of `new_ca`
/// (a client trusting only it logs in and pings) and no longer the one of
/// `old_ca` (a client trusting only that one fails the handshake).
async fn new_handshakes_present(
    addr: SocketAddr,
    new_ca: &Arc<rustls::ClientConfig>,
    old_ca: &Arc<rustls::ClientConfig>,
    user: &str,
) {
    match SimClient::connect(addr, DOMAIN, starttls(old_ca)).await {
        Err(ClientError::Tls(_)) => {}
        other => panic!("a client trusting only the old CA: {other:?}"),
    }
    let mut c = logged_in(addr, starttls(new_ca), user).await;
    c.ping().await.unwrap();
    c.close().await.unwrap();
}

/// The certificate and key are replaced twice while eight clients chat,
/// reloaded once with SIGHUP and once with the admin API's `POST /reload`:
/// each time new handshakes present the new certificate (and only it), the
/// established sessions keep exchanging messages without an error, and
/// the proxy logs no warning or error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_under_load_serves_new_handshakes_and_keeps_every_session() {
    const CLIENTS: usize = 8;
    let pair = pair_of(CLIENTS + 2).await;
    let certs = Certs::new();
    let (mut proxy, addr, _) = ProxyProcess::in_front_of(&pair, &certs, "");
    let admin = proxy.wait_addr("admin API up");

    let stop = Arc::new(AtomicBool::new(false));
    let first_ca = certs.client.clone();
    let (tasks, counters) = start_chats(
        addr,
        &starttls(&first_ca),
        CLIENTS,
        Pace {
            every: Duration::from_millis(20),
            pad: 0,
        },
        &stop,
    )
    .await;
    every_client_received(&counters, &[0; CLIENTS], 3).await;

    // SIGHUP.
    let second_ca = swap_certificate(&certs);
    let before = counts(&counters);
    proxy.signal("HUP");
    proxy.wait_line("configuration reloaded");
    new_handshakes_present(addr, &second_ca, &first_ca, "u08").await;
    every_client_received(&counters, &before, 3).await;

    // POST /reload.
    let third_ca = swap_certificate(&certs);
    let before = counts(&counters);
    let r = reqwest::Client::new()
        .post(format!("http://{admin}/reload"))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (code, &v["ok"]),
        (200, &serde_json::Value::Bool(true)),
        "{v}"
    );
    new_handshakes_present(addr, &third_ca, &second_ca, "u09").await;
    every_client_received(&counters, &before, 3).await;

    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for t in tasks {
        let e = tokio::time::timeout(T, t)
            .await
            .expect("chat ends")
            .unwrap();
        assert!(e.error.is_none() && e.other.is_none(), "{e:?}");
        sent += e.sent;
    }
    println!(
        "{CLIENTS} clients chatting through two certificate swaps: {sent} sent, {} received",
        counts(&counters).iter().sum::<u64>()
    );
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(15)), Some(0));
    let bad: Vec<String> = proxy
        .lines
        .try_iter()
        .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A "node" that accepts TCP connections and never says a word; counts
/// the connections it holds.
async fn silent_node() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::Relaxed);
            held.push(s);
        }
    });
    (addr, accepted)
}

/// Node 1 accepts TCP but never answers. A login routed there is answered
/// within the upstream timeout (1 s) with a `<temporary-auth-failure/>`
/// saying the node did not answer in that time; the monitor marks node 1
/// down at the initial heartbeat timeout (4 s; Table 2 row 18) and node 2
/// serves its users; a node-2 user's session is untouched throughout.
#[tokio::test]
async fn a_node_that_accepts_but_never_answers_fails_logins_in_time_and_is_marked_down() {
    let (silent, accepted) = silent_node().await;
    let pair = pair_of(10).await;
    let certs = Certs::new();
    let text = config_text(
        &[silent, pair.nodes[1].addr()],
        "balanced",
        &certs,
        "[limits]\nupstream_connect_timeout = \"1s\"\n\n\
         [srm]\nheartbeat_interval = \"200ms\"\nprobe_timeout = \"200ms\"\n\
         heartbeat_timeout = \"1s\"\ninitial_heartbeat_timeout = \"4s\"\n",
    );
    let started = Instant::now();
    let mut g = TestGroup::launch(pair, certs, &text).await;
    let homed = |n: NodeId| {
        many_users(10)
            .into_iter()
            .map(|(u, _)| u)
            .find(|u| g.view.home(&format!("{u}@{DOMAIN}")) == Ok(n))
            .expect("a user of each node")
    };
    let (on1, on2) = (homed(N1), homed(N2));
    let (on1, on2) = (on1.as_str(), on2.as_str());

    // Node 2's user logs in and stays.
    let mut stayer = g.login(on2, "PLAIN", "desk").await;
    stayer.ping().await.unwrap();

    // Node 1's user: told within the upstream timeout, accurately.
    let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls())
        .await
        .unwrap();
    let t = Instant::now();
    let e = c
        .login(on1, "pw", "PLAIN")
        .await
        .expect_err("node 1 is silent");
    let took = t.elapsed();
    println!("login to the silent node answered after {took:?}: {e}");
    match &e {
        ClientError::SaslFailure {
            condition, text, ..
        } => {
            assert_eq!(condition, "temporary-auth-failure");
            assert_eq!(
                text.as_deref(),
                Some("the user's node did not answer within 1s; try again later")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert!(accepted.load(Ordering::Relaxed) >= 1);
    stayer.ping().await.unwrap();

    // The monitor marks node 1 down; node 2 serves its users.
    let mut rx = g.view.group_status();
    let s = tokio::time::timeout(
        T,
        rx.wait_for(|s| s.serving[N1.index()] == Some(N2) && s.move_in_progress.is_none()),
    )
    .await
    .expect("node 1 marked down in time")
    .unwrap()
    .clone();
    let detected = started.elapsed();
    println!(
        "silent node 1 marked down {detected:?} after start: {:?} / {:?}, row {:?}",
        s.state(N1),
        s.state(N2),
        s.table_row
    );
    // Node 1 never answered a heartbeat: Table 2 row 18, the peer down
    // during initialization.
    assert_eq!(s.state(N1).0, NodeState::Down);
    assert_eq!(
        s.state(N2),
        (
            NodeState::RunningInBackupMode,
            Reason::PeerDownDuringInitialization
        )
    );
    assert_eq!(s.table_row, Some(18));
    assert!(s.nodes[0].last_heartbeat_error.is_some());

    // Node 1's user gets in now, on node 2; node 2's user never noticed.
    let mut again = g.login(on1, "PLAIN", "desk").await;
    again.ping().await.unwrap();
    let u = g.view.tracker.lookup(&format!("{on1}@{DOMAIN}")).unwrap();
    assert_eq!(u.sessions.first().map(|s| s.node), Some(N2));
    stayer.ping().await.unwrap();
    match stayer.recv(Duration::from_millis(200)).await {
        Err(ClientError::Timeout) => {}
        other => panic!("node 2's user got {other:?}"),
    }
    g.stop().await;
}
