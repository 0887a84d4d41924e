use super::*;

use crate::control::{Control, ControlReceiver, Eviction};

const N1: NodeId = NodeId::Node1;
const N2: NodeId = NodeId::Node2;

fn handle() -> (ConnHandle, ControlReceiver) {
    ConnHandle::new(1024)
}

#[tokio::test]
async fn bind_presence_close() {
    let t = Tracker::new();
    let (h1, _r1) = handle();
    let (h2, _r2) = handle();
    t.on_bind("Alice@example.com/desk", N1, N1, 1, h1);
    t.on_bind("alice@example.com/phone", N1, N2, 2, h2);
    let u = t.lookup("alice@example.com").unwrap();
    assert_eq!(u.sessions.len(), 2);
    assert_eq!(t.count_on(N1), 1);
    assert_eq!(t.count_on(N2), 1);
    assert_eq!(t.sessions_on(N2)[0].1.as_ref(), "alice@example.com/phone");

    let p = Presence {
        available: true,
        show: Show::Dnd,
        priority: 5,
        status_hash: status_hash(b"In a meeting"),
        caps_hash: status_hash(b"7YbyzKz/rFd3XxVPfQZq3s5CHtg="),
    };
    t.on_presence(1, p);
    let u = t.lookup("alice@example.com/whatever").unwrap();
    let desk = u.sessions.iter().find(|s| s.conn == 1).unwrap();
    assert_eq!(desk.presence, p);

    t.on_close(1);
    assert_eq!(t.count_on(N1), 0);
    assert_eq!(t.lookup("alice@example.com").unwrap().sessions.len(), 1);
    t.on_close(2);
    assert!(t.lookup("alice@example.com").is_none());
    assert_eq!(t.user_count(), 0);
    // Closing twice, or an unknown connection, changes nothing.
    t.on_close(2);
    t.on_close(99);
    assert_eq!((t.count_on(N1), t.count_on(N2)), (0, 0));
}

#[tokio::test]
async fn rebind_on_the_same_connection_replaces() {
    let t = Tracker::new();
    let (h, _r) = handle();
    t.on_bind("bob@example.com/a", N2, N2, 7, h.clone());
    t.on_bind("bob@example.com/b", N2, N2, 7, h);
    let u = t.lookup("bob@example.com").unwrap();
    assert_eq!(u.sessions.len(), 1);
    assert_eq!(u.sessions[0].full_jid.as_ref(), "bob@example.com/b");
    assert_eq!(t.count_on(N2), 1);
}

#[tokio::test]
async fn handles_reach_the_connection() {
    let t = Tracker::new();
    let (h, mut r) = handle();
    t.on_bind("carol@example.com/x", N1, N1, 3, h);
    assert!(t.handle_of(3).unwrap().evict(Eviction {
        xml: "bye".into(),
        done: None
    }));
    assert!(matches!(r.recv().await, Control::Evict(e) if e.xml == "bye"));
}

#[test]
fn priorities_and_shows() {
    assert_eq!(parse_priority(b"5"), 5);
    assert_eq!(parse_priority(b"-1"), -1);
    assert_eq!(parse_priority(b"1000"), 127);
    assert_eq!(parse_priority(b"x"), 0);
    assert_eq!(Show::parse(b"xa"), Show::Xa);
    assert_eq!(Show::parse(b"bogus"), Show::Online);
    assert_ne!(status_hash(b""), 0);
}

#[tokio::test]
async fn summary_serving_and_case() {
    let t = Tracker::new();
    let (h, _r) = handle();
    assert_eq!(t.summary("nobody@example.com"), None);
    t.on_bind("Dave@Example.COM/a", N1, N2, 10, h.clone());
    let s = t.summary("dave@example.com/other").unwrap();
    assert_eq!(
        s,
        Summary {
            home: N1,
            serving: N2,
            sessions: 1,
            available: false
        }
    );
    t.on_presence(
        10,
        Presence {
            available: true,
            ..Presence::default()
        },
    );
    assert!(t.summary("DAVE@example.com").unwrap().available);
    let u = t.lookup("dave@EXAMPLE.com").unwrap();
    assert_eq!((u.home, u.serving), (N1, N2));
    // The full JID is kept exactly as the node bound it.
    assert_eq!(u.sessions[0].full_jid.as_ref(), "Dave@Example.COM/a");
    assert!(u.temp_subscriptions.is_empty());
}

#[tokio::test]
async fn long_jids_and_first_session_removal() {
    let t = Tracker::new();
    let (h, _r) = handle();
    let bare = "a-rather-long-localpart-for-heap-storage@conference.example.com";
    for conn in 1..=3 {
        t.on_bind(&format!("{bare}/r{conn}"), N2, N2, conn, h.clone());
    }
    assert_eq!(t.lookup(bare).unwrap().sessions.len(), 3);
    // Remove the inline (first) session: another takes its place.
    t.on_close(1);
    let u = t.lookup(&bare.to_uppercase()).unwrap();
    let mut conns: Vec<_> = u.sessions.iter().map(|s| s.conn).collect();
    conns.sort_unstable();
    assert_eq!(conns, [2, 3]);
    t.on_presence(
        3,
        Presence {
            available: true,
            priority: 9,
            ..Presence::default()
        },
    );
    let u = t.lookup(bare).unwrap();
    assert_eq!(
        u.sessions
            .iter()
            .find(|s| s.conn == 3)
            .unwrap()
            .presence
            .priority,
        9
    );
    assert!(t.handle_of(2).is_some());
    assert!(t.handle_of(1).is_none());
    t.on_close(3);
    t.on_close(2);
    assert_eq!((t.user_count(), t.count_on(N2)), (0, 0));
}

#[tokio::test]
async fn per_node_index_follows_binds_and_closes() {
    let t = Tracker::new();
    let (h, _r) = handle();
    for conn in 0..1000u64 {
        let node = if conn % 2 == 0 { N1 } else { N2 };
        t.on_bind(
            &format!("u{conn}@example.com/r"),
            node,
            node,
            conn,
            h.clone(),
        );
    }
    assert_eq!(
        (t.count_on(N1), t.count_on(N2), t.user_count()),
        (500, 500, 1000)
    );
    for conn in (0..1000u64).step_by(4) {
        t.on_close(conn);
    }
    let on0 = t.sessions_on(N1);
    assert_eq!(on0.len(), 250);
    assert_eq!(t.count_on(N1), 250);
    assert!(on0
        .iter()
        .all(|(c, j)| c % 4 == 2 && j.as_ref() == format!("u{c}@example.com/r")));
    assert_eq!(t.sessions_on(N2).len(), 500);
}

#[test]
fn concurrent_updates_keep_counts_consistent() {
    let t = std::sync::Arc::new(Tracker::new());
    let (h, _r) = handle();
    let threads: Vec<_> = (0..4u64)
        .map(|k| {
            let t = t.clone();
            let h = h.clone();
            std::thread::spawn(move || {
                for round in 0..3u64 {
                    for i in 0..500u64 {
                        let conn = k * 10_000 + i;
                        // Users shared between threads: sessions of one user
                        // come from several connections at once.
                        let jid = format!("user{}@example.com/t{k}", i % 50);
                        let node = if (i + round) % 2 == 0 { N1 } else { N2 };
                        t.on_bind(&jid, N1, node, conn, h.clone());
                        t.on_presence(
                            conn,
                            Presence {
                                available: true,
                                ..Presence::default()
                            },
                        );
                        assert!(t.summary(&jid).is_some());
                        if i % 3 == 0 {
                            t.on_close(conn);
                        }
                    }
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let bound = (0..4u64)
        .map(|_| (0..500u64).filter(|i| i % 3 != 0).count())
        .sum::<usize>();
    assert_eq!(t.count_on(N1) + t.count_on(N2), bound);
    assert_eq!(t.sessions_on(N1).len() + t.sessions_on(N2).len(), bound);
    assert_eq!(t.user_count(), 50);
}

/// The broadcast presences in a real client capture, as the relay peeks at
/// them (directed presence is not the session's own).
#[test]
fn presence_peek_on_captured_traffic() {
    use crate::xmpp::{FrameKind, Framer};
    let path = format!(
        "{}/tests/fixtures/captures/alice-scram-sha1.c2s.xml",
        env!("CARGO_MANIFEST_DIR")
    );
    let input = std::fs::read(path).unwrap();
    let mut f = Framer::new(262_144);
    let mut buf = &input[..];
    let mut seen = Vec::new();
    let mut directed = 0;
    while let Some(fr) = f.next(buf).unwrap() {
        let frame = &buf[..fr.len];
        if fr.kind == FrameKind::Stanza && fr.name(frame) == b"presence" {
            match Presence::peek(frame, &fr) {
                Some(p) => seen.push(p),
                None => directed += 1,
            }
        }
        buf = &buf[fr.len..];
    }
    let caps = status_hash(b"7YbyzKz/rFd3XxVPfQZq3s5CHtg=");
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(directed >= 1, "the capture has a directed presence");
    assert_eq!(
        seen[0],
        Presence {
            available: true,
            show: Show::Online,
            priority: 0,
            status_hash: 0,
            caps_hash: caps,
        }
    );
    assert_eq!(
        seen[1],
        Presence {
            available: true,
            show: Show::Dnd,
            priority: 5,
            status_hash: status_hash(b"In a meeting"),
            caps_hash: caps,
        }
    );
    assert!(!seen.last().unwrap().available, "ends with unavailable");
}
