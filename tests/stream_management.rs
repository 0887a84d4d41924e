//! End to end: stream management (XEP-0198) across a failover. A sender on
//! node 1 chats to a receiver on node 2 through the proxy, with stream
//! management on; node 1 hangs or crashes under the load and its users move
//! to node 2. The sender and the receiver count every message: each one is
//! delivered or comes back to its sender as an error, and every error is
//! for a message the node never acknowledged.

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{eventually, TestGroup, DOMAIN, N1, N2, T};
use prg_proxy::group::{NodeState as S, Reason as R};
use prg_proxy::sim::{ClientError, SimClient, Stanza};
use tokio::task::JoinHandle;

/// Heartbeats every 200 ms, but a silent hang is noticed only after 30 s:
/// the hang scenario fails over on the administrator's request first.
const SRM: &str = "[srm]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"30s\"\n\
                   initial_heartbeat_timeout = \"3s\"\n";

const SM: &str = "urn:xmpp:sm:3";

/// The sender's side: its own XEP-0198 count, what came back as an error.
struct Sender {
    c: SimClient,
    to: String,
    /// Stanzas sent since `<enable/>` on this stream.
    seq: u32,
    /// Messages not acknowledged yet, with their number.
    unacked: VecDeque<(u32, String)>,
    /// Every message id sent, over all streams.
    sent: BTreeSet<String>,
    /// Ids that came back as errors.
    bounced: BTreeSet<String>,
    /// Ids unacknowledged when a stream ended.
    unacked_at_close: BTreeSet<String>,
}

impl Sender {
    fn new(c: SimClient, to: String) -> Sender {
        Sender {
            c,
            to,
            seq: 0,
            unacked: VecDeque::new(),
            sent: BTreeSet::new(),
            bounced: BTreeSet::new(),
            unacked_at_close: BTreeSet::new(),
        }
    }

    async fn enable(&mut self) {
        self.c
            .send_raw(&format!("<enable xmlns='{SM}'/>"))
            .await
            .unwrap();
        let s = self.c.wait_for(T, |s| s.name == "enabled").await.unwrap();
        assert_eq!(s.attr("xmlns"), Some(SM));
        self.seq = 0;
        self.unacked.clear();
    }

    fn handle(&mut self, s: &Stanza) {
        if s.name == "a" {
            let h: u32 = s.attr("h").and_then(|h| h.parse().ok()).unwrap();
            while self.unacked.front().is_some_and(|(k, _)| *k <= h) {
                self.unacked.pop_front();
            }
        } else if s.name == "message" && s.attr("type") == Some("error") {
            assert!(
                s.raw.contains(
                    "<recipient-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                ) && s.raw.contains("<error type='wait'>"),
                "{}",
                s.raw
            );
            assert_eq!(s.attr("from"), Some(self.to.as_str()), "{}", s.raw);
            assert_eq!(s.attr("to"), self.c.jid(), "{}", s.raw);
            let id = s.attr("id").unwrap().to_string();
            assert!(
                self.unacked.iter().any(|(_, u)| *u == id),
                "bounce for {id}, which the node acknowledged or was never sent"
            );
            self.bounced.insert(id);
        }
    }

    /// Sends one message; a write error is the stream ending (seen later).
    async fn send(&mut self, id: &str) {
        let xml = format!(
            "<message type='chat' to='{}' id='{id}'><body>{id}</body></message>",
            self.to
        );
        if self.c.send_raw(&xml).await.is_ok() {
            self.seq += 1;
            self.unacked.push_back((self.seq, id.to_string()));
            self.sent.insert(id.to_string());
        }
    }

    /// Requests an ack and reads until everything sent is acknowledged.
    async fn sync(&mut self) {
        self.c
            .send_raw(&format!("<r xmlns='{SM}'/>"))
            .await
            .unwrap();
        while !self.unacked.is_empty() {
            let s = self.c.recv(T).await.unwrap();
            self.handle(&s);
        }
    }

    /// Reads until the stream ends (the failover); what is still
    /// unacknowledged and did not come back was never read by the proxy:
    /// returned, to be sent again on the next stream, as a careful XEP-0198
    /// client does.
    async fn until_closed(&mut self) -> Vec<String> {
        loop {
            match self.c.recv(T).await {
                Ok(s) => self.handle(&s),
                Err(ClientError::StreamError { .. } | ClientError::Closed) => break,
                Err(ClientError::Io(_)) => break,
                Err(e) => panic!("sender: {e}"),
            }
        }
        let mut again = Vec::new();
        for (_, id) in self.unacked.drain(..) {
            self.unacked_at_close.insert(id.clone());
            if !self.bounced.contains(&id) {
                again.push(id);
            }
        }
        again
    }
}

/// The receiver: collects message ids until the `fin` message.
fn receive(mut c: SimClient) -> JoinHandle<BTreeSet<String>> {
    tokio::spawn(async move {
        let mut got = BTreeSet::new();
        loop {
            let s = c.recv(Duration::from_secs(30)).await.unwrap();
            if s.name == "message" && s.attr("type") == Some("chat") {
                let id = s.attr("id").unwrap().to_string();
                if id == "fin" {
                    return got;
                }
                got.insert(id);
            }
        }
    })
}

/// Logs `user` in once the proxy routes it somewhere that takes it.
async fn relogin(g: &TestGroup, user: &str) -> SimClient {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let r = async {
            let mut c = SimClient::connect(g.starttls, DOMAIN, g.starttls_tls()).await?;
            c.login(user, "pw", "PLAIN").await?;
            Ok::<_, ClientError>(c)
        }
        .await;
        match r {
            Ok(c) => return c,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{user} cannot log in again: {e}"),
        }
    }
}

struct Tally {
    sent: usize,
    delivered: usize,
    bounced: usize,
    lost: usize,
    resent: usize,
}

/// A balanced group; a sender homed on node 1 and a receiver on node 2.
async fn setup() -> (TestGroup, Sender, JoinHandle<BTreeSet<String>>) {
    let g = TestGroup::start_with("balanced", SRM, |_| {}).await;
    let mut rx = g.view.group_status();
    tokio::time::timeout(
        T,
        rx.wait_for(|s| {
            s.state(N1) == (S::Normal, R::Normal) && s.state(N2) == (S::Normal, R::Normal)
        }),
    )
    .await
    .expect("the group reaches Normal")
    .unwrap();
    let mut on = [None, None];
    for u in common::USERS {
        let c = g.login(u, "PLAIN", "desk").await;
        let node = g
            .view
            .tracker
            .lookup(&format!("{u}@{DOMAIN}"))
            .and_then(|s| s.sessions.first().map(|s| s.node))
            .unwrap();
        let slot = &mut on[usize::from(node == N2)];
        if slot.is_none() {
            *slot = Some((u, c));
        } else {
            c.close().await.unwrap();
        }
    }
    let (Some((sender, s)), Some((receiver, r))) = (on[0].take(), on[1].take()) else {
        panic!("the test users all hash to one node")
    };
    eprintln!("sender {sender} on imp1, receiver {receiver} on imp2");
    let to = r.jid().unwrap().to_string();
    let mut s = Sender::new(s, to);
    s.enable().await;
    (g, s, receive(r))
}

/// After the failover: a resumption of the old stream fails (node 2 never
/// issued it), a fresh session sends the rest, then `fin`.
async fn finish(
    g: &TestGroup,
    s: &mut Sender,
    user: &str,
    again: Vec<String>,
    more: std::ops::Range<u32>,
    receiver: JoinHandle<BTreeSet<String>>,
) -> Tally {
    let mut c = relogin(g, user).await;
    c.send_raw(&format!("<resume xmlns='{SM}' h='0' previd='from-imp1'/>"))
        .await
        .unwrap();
    let f = c.wait_for(T, |s| s.name == "failed").await.unwrap();
    assert!(f.raw.contains("item-not-found"), "{}", f.raw);
    c.bind("desk").await.unwrap();
    s.c = c;
    s.enable().await;
    for i in more {
        s.send(&format!("m{i}")).await;
    }
    for id in &again {
        s.send(id).await;
    }
    s.sync().await;
    s.send("fin").await;
    s.sync().await;
    let delivered = tokio::time::timeout(T, receiver).await.unwrap().unwrap();
    s.sent.remove("fin");
    let lost = s
        .sent
        .iter()
        .filter(|id| !delivered.contains(*id) && !s.bounced.contains(*id))
        .count();
    assert!(delivered.is_subset(&s.sent));
    assert!(s.bounced.is_subset(&s.unacked_at_close));
    Tally {
        sent: s.sent.len(),
        delivered: delivered.len(),
        bounced: s.bounced.len(),
        lost,
        resent: again.len(),
    }
}

fn user_of(s: &Sender) -> String {
    let jid = s.c.jid().unwrap();
    jid[..jid.find('@').unwrap()].to_string()
}

/// Node 1 hangs under the chat: what the sender sends from then on is
/// never acknowledged; the administrator fails node 1 over and the proxy
/// bounces exactly those messages before the closing stream error.
#[tokio::test]
async fn a_hang_then_failover_bounces_exactly_the_unacknowledged_messages_and_loses_none() {
    let (g, mut s, receiver) = setup().await;
    let user = user_of(&s);
    for i in 0..10 {
        s.send(&format!("m{i}")).await;
    }
    s.sync().await;
    g.pair.nodes[0].hang();
    let up = g.view.metrics.stanzas_up.load(Ordering::Relaxed);
    for i in 10..20 {
        s.send(&format!("m{i}")).await;
    }
    assert!(
        eventually(T, || g.view.metrics.stanzas_up.load(Ordering::Relaxed)
            >= up + 10)
        .await,
        "the proxy read the messages"
    );
    g.view.group.failover(N1).await.unwrap();
    let again = s.until_closed().await;
    let expected: BTreeSet<String> = (10..20).map(|i| format!("m{i}")).collect();
    assert_eq!(s.bounced, expected);
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(g.view.metrics.stanzas_bounced.load(Ordering::Relaxed), 10);
    let t = finish(&g, &mut s, &user, again, 20..30, receiver).await;
    g.pair.nodes[0].resume();
    println!(
        "sm-failover scenario=hang-then-admin-failover sent={} delivered={} bounced={} lost={} resent={}",
        t.sent, t.delivered, t.bounced, t.lost, t.resent
    );
    assert_eq!((t.sent, t.delivered, t.bounced, t.lost), (30, 20, 10, 0));
}

/// Node 1 crashes in the middle of the chat (connections reset): the relay
/// or the eviction that follows bounces what node 1 never acknowledged;
/// nothing is lost.
#[tokio::test]
async fn a_crash_under_chat_load_loses_no_message() {
    let (g, mut s, receiver) = setup().await;
    let user = user_of(&s);
    for i in 0..20 {
        s.send(&format!("m{i}")).await;
        if i % 5 == 4 {
            s.sync().await;
        }
    }
    g.pair.nodes[0].kill();
    for i in 20..40 {
        s.send(&format!("m{i}")).await;
    }
    let again = s.until_closed().await;
    let bounced_metric = g.view.metrics.stanzas_bounced.load(Ordering::Relaxed);
    assert_eq!(bounced_metric as usize, s.bounced.len());
    let t = finish(&g, &mut s, &user, again, 40..50, receiver).await;
    println!(
        "sm-failover scenario=crash-under-load sent={} delivered={} bounced={} lost={} resent={}",
        t.sent, t.delivered, t.bounced, t.lost, t.resent
    );
    assert_eq!(t.sent, 50);
    assert_eq!(t.lost, 0);
    assert!(t.delivered + t.bounced >= t.sent);
}
