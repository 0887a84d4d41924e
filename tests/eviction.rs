//! End to end: an eviction completes even for a client that never reads.
//!
//! alice stops reading while dave floods her with messages, so the proxy's
//! writes to her are stuck behind full socket buffers. A manual failover
//! of her node must still close her stream within the write deadline
//! (2 s here): the move completes, the group settles in the backup state
//! rather than the failed mode a move that timed out ends in (5 s), and the
//! users who read are untouched.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use prg_proxy::group::NodeState;

const LIMITS: &str = "[limits]\nwrite_timeout = \"2s\"\n\n\
                      [srm]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"60s\"\n\
                      initial_heartbeat_timeout = \"120s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_evicted_within_the_write_deadline() {
    let mut g = TestGroup::start_with("balanced", LIMITS, |_| {}).await;
    let mut rx = g.view.group_status();
    tokio::time::timeout(
        T,
        rx.wait_for(|s| {
            NodeId::ALL
                .iter()
                .all(|n| s.state(*n).0 == NodeState::Normal)
        }),
    )
    .await
    .expect("Normal")
    .expect("monitor");
    // alice (home node 1) never reads again; bob (node 1 too) reads.
    let alice = g.login("alice", "PLAIN", "desk").await;
    let mut dave = g.login("dave", "PLAIN", "phone").await;
    assert_eq!(g.view.home("alice@example.com"), Ok(N1));
    assert_eq!(g.view.home("dave@example.com"), Ok(N2));

    // Flood alice with 18 MB, far more than the socket buffers between the
    // proxy and a client that does not read hold (alice's receive buffer
    // does not grow while she reads nothing): the proxy's writes to her
    // are left pending.
    let body = "x".repeat(60_000);
    for _ in 0..300 {
        tokio::time::timeout(T, dave.send_message("alice@example.com/desk", &body))
            .await
            .expect("the node takes dave's messages")
            .expect("sent");
    }
    let before = g.view.metrics.group_evictions.load(Ordering::Relaxed);

    g.view.group.failover(N1).await.expect("failover accepted");
    let s = tokio::time::timeout(
        T,
        rx.wait_for(|s| s.move_in_progress.is_none() && s.state(N1).0 != NodeState::Normal),
    )
    .await
    .expect("the move ends")
    .expect("monitor")
    .clone();
    // A move whose streams did not close within its backstop leaves the
    // group in failed mode; this one completed.
    assert_eq!(s.state(N1).0, NodeState::Idle, "{s:#?}");
    assert_eq!(s.state(N2).0, NodeState::RunningInBackupMode, "{s:#?}");
    assert_eq!(
        g.view.metrics.group_evictions.load(Ordering::Relaxed) - before,
        1,
        "alice was evicted"
    );
    assert!(g.view.tracker.lookup("alice@example.com").is_none());
    // Her stream was closed by the write deadline, not by her reading it.
    assert_eq!(g.view.metrics.write_timeouts.load(Ordering::Relaxed), 1);
    // The other users were not affected.
    dave.ping().await.expect("dave stays");
    drop(alice);
    g.stop().await;
}
