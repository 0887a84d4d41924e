//! End to end: the group monitor watching the simulated pair, failing over
//! on a crash, a silent hang, a critical service and a refused monitor
//! login, and falling back on the administrator's request.
//!
//! Timers are shortened in the config (heartbeats every 200 ms) because
//! real sockets are involved; the state machine's own timers are tested
//! under tokio's paused clock in `src/group/scenarios.rs`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Certs, TestGroup, DOMAIN, N1, N2};
use prg_proxy::group::{AdminError, GroupStatus};
use prg_proxy::group::{NodeId, NodeState as S, Reason as R, Rejected};
use prg_proxy::proxy::AddUserError;
use prg_proxy::sim::{ClientError, SimClient, SimNodeConfig, SimPair};
use tokio::time::Instant;

const T: Duration = Duration::from_secs(10);
const NORMAL: (S, R) = (S::Normal, R::Normal);

/// Short timers: heartbeat 200 ms, timeout 1 s, critical service delay 1 s.
const FAST: &str = "heartbeat_interval = \"200ms\"\nheartbeat_timeout = \"1s\"\n\
                    initial_heartbeat_timeout = \"3s\"\ncritical_service_delay = \"1s\"\n";

/// The shared test group, with the monitor-specific helpers below.
struct Group(TestGroup);

impl std::ops::Deref for Group {
    type Target = TestGroup;
    fn deref(&self) -> &TestGroup {
        &self.0
    }
}

impl std::ops::DerefMut for Group {
    fn deref_mut(&mut self) -> &mut TestGroup {
        &mut self.0
    }
}

struct Setup<'a> {
    mode: &'a str,
    high_availability: bool,
    /// Extra TOML inside each `[[nodes]]` entry (keys first, then sub-tables).
    node_extra: [&'a str; 2],
    /// The `[srm]` section's body.
    srm: &'a str,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            mode: "active-standby",
            high_availability: true,
            node_extra: ["", ""],
            srm: FAST,
        }
    }
}

fn users() -> Vec<(String, String)> {
    common::users()
}

impl Group {
    async fn start(setup: Setup<'_>) -> Group {
        Self::start_with(setup, |_| {}).await
    }

    async fn start_with(setup: Setup<'_>, tweak: impl Fn(&mut SimNodeConfig)) -> Group {
        // `RUST_LOG=prg_proxy::group=info` shows the monitor's decisions.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut c1 = SimNodeConfig::new("imp1", DOMAIN, users());
        let mut c2 = SimNodeConfig::new("imp2", DOMAIN, users());
        tweak(&mut c1);
        tweak(&mut c2);
        let pair = SimPair::start(c1, c2).await.unwrap();
        let certs = Certs::new();
        let mut text = format!(
            "[group]\nname = \"test-group\"\nhigh_availability = {}\nassignment = \"{}\"\n\
             domains = [\"{DOMAIN}\"]\n\n",
            setup.high_availability, setup.mode
        );
        for (i, extra) in setup.node_extra.iter().enumerate() {
            text.push_str(&format!(
                "[[nodes]]\nname = \"imp{}\"\naddress = \"{}\"\n{extra}\n\n",
                i + 1,
                pair.nodes[i].addr()
            ));
        }
        text.push_str(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n[listen]\nstarttls = \"127.0.0.1:0\"\ndirect_tls = \"127.0.0.1:0\"\n\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[srm]\n{}",
            certs.cert(),
            certs.key(),
            setup.srm
        ));
        Group(TestGroup::launch(pair, certs, &text).await)
    }

    async fn try_login(&self, user: &str) -> Result<SimClient, ClientError> {
        let mut c = SimClient::connect(self.starttls, DOMAIN, self.starttls_tls()).await?;
        c.login(user, "pw", "PLAIN").await?;
        c.bind("desk").await?;
        Ok(c)
    }

    async fn login(&self, user: &str) -> SimClient {
        self.try_login(user)
            .await
            .unwrap_or_else(|e| panic!("{user} cannot log in: {e}"))
    }

    /// The node a user's session is bound on, per the tracker.
    fn node_of(&self, user: &str) -> Option<NodeId> {
        let u = self.view.tracker.lookup(&format!("{user}@{DOMAIN}"))?;
        u.sessions.first().map(|s| s.node)
    }

    /// Waits until the group reaches the two (state, reason) pairs.
    async fn wait_for(&self, n1: (S, R), n2: (S, R), within: Duration) -> GroupStatus {
        let mut rx = self.view.group_status();
        let got = tokio::time::timeout(
            within,
            rx.wait_for(|s| s.state(NodeId::Node1) == n1 && s.state(NodeId::Node2) == n2),
        )
        .await;
        match got {
            Ok(Ok(s)) => s.clone(),
            _ => {
                let s = self.view.group.current();
                panic!(
                    "expected {n1:?} / {n2:?}, have {:?} / {:?}\n{s:#?}",
                    s.state(NodeId::Node1),
                    s.state(NodeId::Node2)
                )
            }
        }
    }

    async fn normal(&self) {
        self.wait_for(NORMAL, NORMAL, T).await;
    }
}

/// Reads until the stream ends; returns the stream error's condition and text.
async fn closed_with(c: &mut SimClient) -> (String, String) {
    loop {
        match c.recv(T).await {
            Ok(_) => continue,
            Err(ClientError::StreamError {
                condition, text, ..
            }) => return (condition, text.unwrap_or_default()),
            Err(e) => return (format!("{e}"), String::new()),
        }
    }
}

/// Kill node 1 (a crash: connects refused, connections reset). The relay's
/// failures plus a refused connect are strong evidence: Table 2 row 16
/// (node 1 down, node 2 Running in Backup Mode, Peer Down) by the fast path,
/// long before the heartbeat timeout (60 s here, six times the wait bound).
/// Then node 1 comes back and the administrator falls back.
#[tokio::test]
async fn crash_of_node_1_is_detected_at_once_and_node_2_takes_over() {
    let mut g = Group::start(Setup {
        srm: SLOW_TIMEOUT,
        ..Setup::default()
    })
    .await;
    g.normal().await;
    assert_eq!(g.view.group.can_add_users(), Ok(()));
    let mut alice = g.login("alice").await;
    let mut bob = g.login("bob").await;
    assert_eq!(g.pair.nodes[0].session_count(), 2);

    let t0 = Instant::now();
    g.pair.nodes[0].kill();
    let s = g
        .wait_for((S::Down, R::None), (S::RunningInBackupMode, R::PeerDown), T)
        .await;
    let detected = t0.elapsed();
    println!("crash detection time: {detected:?}");
    // The path: the relay's failures were confirmed by a refused connect,
    // and no heartbeat deadline (60 s) can have passed within the wait (10 s).
    assert_eq!(fast_detections(&g), 1, "the fast path acted");
    assert_eq!(s.table_row, Some(16));
    assert_eq!(s.serving[0], Some(NodeId::Node2));
    assert!(
        g.view
            .metrics
            .group_transitions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );

    // The node-1 users' streams are gone; a fresh login lands on node 2.
    for c in [&mut alice, &mut bob] {
        let (cond, _) = closed_with(c).await;
        assert_eq!(cond, "remote-connection-failed");
    }
    let mut alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N2));
    assert_eq!(g.pair.nodes[1].session_count(), 1);
    let e = g.view.group.can_add_users().unwrap_err();
    assert!(e.to_string().contains("users cannot be added"), "{e}");

    // Node 1 returns: failed over, waiting for the administrator.
    g.pair.nodes[0].restart().await.unwrap();
    g.wait_for(
        (S::FailedOver, R::Initialization),
        (S::RunningInBackupMode, R::PeerDown),
        T,
    )
    .await;
    g.view.group.fallback(N1).await.unwrap();
    g.normal().await;
    let (cond, text) = closed_with(&mut alice).await;
    assert_eq!(cond, "system-shutdown");
    assert!(
        text.contains("imp1") && text.contains("On Admin Request"),
        "{text}"
    );
    let _alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N1));
    assert_eq!(g.pair.nodes[0].session_count(), 1);
    assert_eq!(g.view.group.can_add_users(), Ok(()));
    g.stop().await;
}

/// A node that hangs (SIGSTOP-like) keeps its sockets open: nothing fails
/// on the relay, so only the heartbeat timeout (1 s) can tell.
#[tokio::test]
async fn silent_hang_is_detected_within_the_heartbeat_timeout() {
    let mut g = Group::start(Setup::default()).await;
    g.normal().await;
    let mut alice = g.login("alice").await;

    let t0 = Instant::now();
    g.pair.nodes[0].hang();
    let s = g
        .wait_for((S::Down, R::None), (S::RunningInBackupMode, R::PeerDown), T)
        .await;
    let detected = t0.elapsed();
    println!("hang detection time: {detected:?} (heartbeat 200ms, timeout 1s)");
    // Only the heartbeat timeout can tell: never before the timeout minus
    // one interval. (The upper bound is loose: it only guards against a
    // detection that never comes; the time itself is printed above.)
    assert!(detected >= Duration::from_millis(700), "took {detected:?}");
    assert!(detected < Duration::from_secs(8), "took {detected:?}");
    assert_eq!(s.table_row, Some(16));
    assert!(s.nodes[0].last_heartbeat_error.is_some());

    // The hung node's user is told to go, with the node and the reason.
    let (cond, text) = closed_with(&mut alice).await;
    assert_eq!(cond, "system-shutdown");
    assert!(
        text.contains("imp1") && text.contains("Peer Down"),
        "{text}"
    );
    let _alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N2));

    g.pair.nodes[0].resume();
    g.wait_for(
        (S::FailedOver, R::Initialization),
        (S::RunningInBackupMode, R::PeerDown),
        T,
    )
    .await;
    g.stop().await;
}

/// Assignment mode `none`, users assigned one by one: when node 1 hangs,
/// its user is told and moved to node 2 (a fresh login is served there);
/// node 2's user stays. (Once, nobody assigned this way was ever moved.)
#[tokio::test]
async fn users_assigned_one_by_one_move_when_their_node_hangs() {
    let mut g = Group::start(Setup {
        mode: "none",
        ..Setup::default()
    })
    .await;
    g.normal().await;
    g.view.add_user(&format!("alice@{DOMAIN}"), N1).unwrap();
    g.view.add_user(&format!("dave@{DOMAIN}"), N2).unwrap();
    let mut alice = g.login("alice").await;
    let mut dave = g.login("dave").await;
    assert_eq!(g.node_of("alice"), Some(N1));

    g.pair.nodes[0].hang();
    g.wait_for((S::Down, R::None), (S::RunningInBackupMode, R::PeerDown), T)
        .await;
    let (cond, text) = closed_with(&mut alice).await;
    assert_eq!(cond, "system-shutdown", "{text}");
    let _alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N2));
    dave.ping().await.expect("node 2's user stays");
    g.pair.nodes[0].resume();
    g.stop().await;
}

fn listen_on(addr: SocketAddr) -> tokio::net::TcpListener {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind(addr).unwrap();
    s.listen(16).unwrap()
}

/// A critical service of node 1 (a TCP port) stops: after the critical
/// service delay, node 1's users fail over (Table 2 row 12); node 2's users
/// are untouched. When the service is back (row 11), fallback brings both
/// nodes back to Normal.
#[tokio::test]
async fn critical_service_down_past_its_delay_fails_over_and_back() {
    let service = listen_on("127.0.0.1:0".parse().unwrap());
    let service_addr = service.local_addr().unwrap();
    let node1 = format!(
        "[[nodes.critical_services]]\nname = \"xcp-router\"\nkind = \"tcp\"\ntarget = \"{service_addr}\"\n"
    );
    let mut g = Group::start(Setup {
        mode: "balanced",
        node_extra: [&node1, ""],
        ..Setup::default()
    })
    .await;
    g.normal().await;
    // Balanced: alice's home is node 1, dave's node 2.
    let mut alice = g.login("alice").await;
    let mut dave = g.login("dave").await;
    assert_eq!(
        (g.node_of("alice"), g.node_of("dave")),
        (Some(N1), Some(N2))
    );

    let t0 = Instant::now();
    drop(service);
    let s = g
        .wait_for(
            (
                S::FailedOverCriticalServicesNotRunning,
                R::CriticalServiceDown,
            ),
            (S::RunningInBackupMode, R::CriticalServiceDown),
            T,
        )
        .await;
    let took = t0.elapsed();
    println!("critical service failover after: {took:?} (delay 1s)");
    assert!(took >= Duration::from_secs(1), "before the delay: {took:?}");
    assert_eq!(s.table_row, Some(12));
    assert_eq!(s.nodes[0].services_down, ["xcp-router"]);

    let (cond, text) = closed_with(&mut alice).await;
    assert_eq!(cond, "system-shutdown");
    assert!(text.contains("Critical Service Down"), "{text}");
    dave.ping().await.expect("node 2's users stay");
    let mut alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N2));

    assert_eq!(
        g.view.group.fallback(N1).await,
        Err(AdminError::Rejected(Rejected::CriticalServicesNotRunning {
            node: NodeId::Node1
        }))
    );
    let _service = listen_on(service_addr);
    let s = g
        .wait_for(
            (S::FailedOver, R::CriticalServiceDown),
            (S::RunningInBackupMode, R::CriticalServiceDown),
            T,
        )
        .await;
    assert_eq!(s.table_row, Some(11));
    g.view.group.fallback(N1).await.unwrap();
    g.normal().await;
    let (cond, _) = closed_with(&mut alice).await;
    assert_eq!(cond, "system-shutdown");
    let _alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N1));
    dave.ping().await.expect("node 2's users never moved");
    g.stop().await;
}

/// Without high availability a dead node is reported, and its users are
/// refused rather than moved.
#[tokio::test]
async fn without_high_availability_nobody_moves() {
    let mut g = Group::start(Setup {
        mode: "balanced",
        high_availability: false,
        ..Setup::default()
    })
    .await;
    g.normal().await;
    let mut alice = g.login("alice").await;
    g.pair.nodes[0].kill();
    let s = g.wait_for((S::Down, R::None), NORMAL, T).await;
    assert_eq!(s.serving, [None, Some(NodeId::Node2)]);
    closed_with(&mut alice).await;
    match g.try_login("alice").await {
        Err(ClientError::SaslFailure { condition, .. }) => {
            assert_eq!(condition, "temporary-auth-failure")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let _dave = g.login("dave").await;
    assert_eq!(g.node_of("dave"), Some(N2));
    assert_eq!(
        g.view.group.failover(N2).await,
        Err(AdminError::Rejected(Rejected::HighAvailabilityDisabled))
    );
    // The node returns and serves its users again.
    g.pair.nodes[0].restart().await.unwrap();
    g.normal().await;
    let _alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N1));
    g.stop().await;
}

/// Manual failover (Table 2 row 3) and fallback; admin errors are the
/// state machine's.
#[tokio::test]
async fn manual_failover_and_fallback() {
    let mut g = Group::start(Setup {
        mode: "balanced",
        ..Setup::default()
    })
    .await;
    g.normal().await;
    let mut alice = g.login("alice").await;
    let mut dave = g.login("dave").await;
    let mut moves = g.view.group.subscribe_moves();
    g.view.group.failover(N1).await.unwrap();
    let m = tokio::time::timeout(T, moves.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.users_of, m.from, m.to, m.why),
        (
            NodeId::Node1,
            Some(NodeId::Node1),
            Some(NodeId::Node2),
            R::OnAdminRequest
        )
    );
    let s = g
        .wait_for(
            (S::Idle, R::OnAdminRequest),
            (S::RunningInBackupMode, R::OnAdminRequest),
            T,
        )
        .await;
    assert_eq!(s.table_row, Some(3));
    let (cond, text) = closed_with(&mut alice).await;
    assert_eq!(cond, "system-shutdown");
    assert!(text.contains("from imp1 to imp2"), "{text}");
    let _alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N2));
    assert!(g.view.group.can_add_users().is_err());
    // Adding a user to the assignment is refused while failed over...
    let e = g.view.add_user("erin@example.com", N1).unwrap_err();
    assert!(matches!(e, AddUserError::DuringFailover(_)), "{e}");
    assert!(e.to_string().contains("users cannot be added"), "{e}");
    assert!(matches!(
        g.view.group.failover(N2).await,
        Err(AdminError::Rejected(Rejected::NotNormal { .. }))
    ));
    assert!(matches!(
        g.view.group.recovery().await,
        Err(AdminError::Rejected(Rejected::NotBothFailed { .. }))
    ));
    g.view.group.fallback(N1).await.unwrap();
    g.normal().await;
    dave.ping().await.unwrap();
    // ... and accepted in Normal: erin's home moves to node 1.
    let home = |g: &Group| g.view.assignment.home("erin@example.com");
    assert_eq!(home(&g), Ok(N2), "erin's balanced home is node 2");
    g.view.add_user("erin@example.com", N1).unwrap();
    assert_eq!(home(&g), Ok(N1));
    let _erin = g.login("erin").await;
    assert_eq!(g.node_of("erin"), Some(N1));
    g.stop().await;
}

/// "login" heartbeats with authentication service monitoring: node 1
/// refuses the monitor account, which counts as its authentication service
/// being down; after the critical service delay its users fail over.
#[tokio::test]
async fn refused_monitor_login_is_an_authentication_service_failure() {
    let srm = format!(
        "{FAST}auth_service_monitoring = true\nmonitor_user = \"monitor\"\nmonitor_password = \"mpw\"\n"
    );
    let mut g = Group::start_with(
        Setup {
            node_extra: ["heartbeat = \"login\"", "heartbeat = \"login\""],
            srm: &srm,
            ..Setup::default()
        },
        |c| {
            let pw = if c.name == "imp1" { "changed" } else { "mpw" };
            c.users.push(("monitor".into(), pw.into()));
        },
    )
    .await;
    let s = g
        .wait_for(
            (
                S::FailedOverCriticalServicesNotRunning,
                R::CriticalServiceDown,
            ),
            (S::RunningInBackupMode, R::CriticalServiceDown),
            T,
        )
        .await;
    assert_eq!(s.nodes[0].services_down, ["authentication"]);
    assert!(s.nodes[1].services_down.is_empty());
    assert!(
        s.nodes[0].last_heartbeat_ok.is_some(),
        "the node itself answers"
    );
    let _alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N2));
    g.stop().await;
}

/// Heartbeat timeout 60 s, six times every wait bound here: anything that
/// happens within a wait is not the heartbeat timeout.
const SLOW_TIMEOUT: &str = "heartbeat_interval = \"200ms\"\nheartbeat_timeout = \"60s\"\n\
                            initial_heartbeat_timeout = \"120s\"\n";

/// Node failures confirmed by the fast path so far.
fn fast_detections(g: &Group) -> u64 {
    g.view
        .metrics
        .fast_detections
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// A node with no relayed sessions crashes: the first login that finds its
/// connect refused is the evidence; the user's retry lands on node 2.
#[tokio::test]
async fn refused_login_to_an_idle_node_is_evidence_too() {
    let mut g = Group::start(Setup {
        srm: SLOW_TIMEOUT,
        ..Setup::default()
    })
    .await;
    g.normal().await;
    let t0 = Instant::now();
    g.pair.nodes[0].kill();
    match g.try_login("alice").await {
        Err(ClientError::SaslFailure { condition, .. }) => {
            assert_eq!(condition, "temporary-auth-failure")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    g.wait_for((S::Down, R::None), (S::RunningInBackupMode, R::PeerDown), T)
        .await;
    let detected = t0.elapsed();
    println!("idle-node crash detection time: {detected:?}");
    assert_eq!(fast_detections(&g), 1, "the fast path acted");
    let _alice = g.login("alice").await;
    assert_eq!(g.node_of("alice"), Some(N2));
    g.stop().await;
}

/// With fast detection off, a crash waits for the heartbeat timeout like
/// the recovery manager does.
#[tokio::test]
async fn without_fast_detection_a_crash_waits_for_the_heartbeat_timeout() {
    let srm = format!("{SLOW_TIMEOUT}fast_detect = false\n");
    let mut g = Group::start(Setup {
        srm: &srm,
        ..Setup::default()
    })
    .await;
    g.normal().await;
    let mut alice = g.login("alice").await;
    let mut bob = g.login("bob").await;
    g.pair.nodes[0].kill();
    closed_with(&mut alice).await;
    closed_with(&mut bob).await;
    // Wait for a few failed heartbeats: the node is known unreachable...
    let mut rx = g.view.group_status();
    let s = tokio::time::timeout(
        T,
        rx.wait_for(|s| s.nodes[0].last_heartbeat_error.is_some()),
    )
    .await
    .expect("a heartbeat fails")
    .expect("monitor runs")
    .clone();
    // ... and still Normal: only the heartbeat timeout (60 s) may act.
    assert_eq!(s.state(NodeId::Node1), NORMAL, "{s:#?}");
    assert_eq!(fast_detections(&g), 0);
    g.stop().await;
}
