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

#[tokio::test]
async fn summaries_match_summary_one_by_one() {
    let t = Tracker::new();
    let (h, _r) = handle();
    let long = "a-rather-long-localpart-for-the-slow-path@conference.example.com";
    for i in 0..100u64 {
        let node = if i % 2 == 0 { N1 } else { N2 };
        t.on_bind(&format!("u{i}@example.com/r"), N1, node, i, h.clone());
    }
    t.on_bind(&format!("{long}/x"), N2, N2, 1000, h.clone());
    t.on_presence(
        3,
        Presence {
            available: true,
            ..Presence::default()
        },
    );
    let mut jids: Vec<String> = (0..120u64).map(|i| format!("U{i}@example.com")).collect();
    jids.push(long.to_uppercase());
    jids.push(format!("{long}x"));
    let mut out = vec![None; jids.len()];
    t.summaries(&jids, &mut out);
    for (j, o) in jids.iter().zip(&out) {
        assert_eq!(*o, t.summary(j), "{j}");
    }
    assert_eq!(out.iter().filter(|o| o.is_some()).count(), 101);
    assert!(out[3].unwrap().available);
    assert_eq!(out[1].unwrap().serving, N2);
    assert_eq!(out[120].unwrap().home, N2);
    assert_eq!(out[121], None);
}

#[tokio::test]
async fn long_keys_sharing_their_first_32_bytes_stay_apart() {
    let t = Tracker::new();
    let (h, _r) = handle();
    let a = "the-same-first-thirty-two-bytes-a@example.com";
    let b = "the-same-first-thirty-two-bytes-b@example.com";
    t.on_bind(&format!("{a}/1"), N1, N1, 1, h.clone());
    assert_eq!(t.summary(b), None);
    assert!(t.lookup(b).is_none());
    t.on_bind(&format!("{b}/1"), N2, N2, 2, h.clone());
    t.on_bind(&format!("{b}/2"), N2, N2, 3, h);
    assert_eq!(t.summary(a).unwrap().sessions, 1);
    assert_eq!(t.summary(b).unwrap().sessions, 2);
    assert_eq!(t.user_count(), 2);
    // The first session of b goes: b is still found by its second.
    t.on_close(2);
    assert_eq!(t.summary(b).unwrap().sessions, 1);
    assert_eq!(t.lookup(b).unwrap().sessions[0].conn, 3);
    t.on_close(3);
    assert_eq!(t.summary(b), None);
    assert_eq!(t.summary(a).unwrap().home, N1);
}

#[tokio::test]
async fn availability_follows_every_session() {
    let t = Tracker::new();
    let (h, _r) = handle();
    let on = Presence {
        available: true,
        ..Presence::default()
    };
    for c in 1..=3 {
        t.on_bind(&format!("eve@example.com/r{c}"), N1, N1, c, h.clone());
    }
    assert!(!t.summary("eve@example.com").unwrap().available);
    t.on_presence(2, on);
    assert!(t.summary("eve@example.com").unwrap().available);
    t.on_presence(1, on);
    t.on_presence(2, Presence::default());
    assert!(t.summary("eve@example.com").unwrap().available);
    // The only available session closes: the user is unavailable.
    t.on_close(1);
    let s = t.summary("eve@example.com").unwrap();
    assert_eq!((s.sessions, s.available), (2, false));
    t.on_presence(3, on);
    t.on_close(2);
    assert!(t.summary("eve@example.com").unwrap().available);
    // Bind times survive the compact storage.
    let u = t.lookup("eve@example.com").unwrap();
    assert!(u.sessions[0].bound_at <= Instant::now());
    assert!(t.handle_of(3).is_some());
}

#[tokio::test]
async fn tables_grow_and_purge_tombstones() {
    let t = Tracker::new();
    let (h, _r) = handle();
    for round in 0..5u64 {
        for i in 0..5000u64 {
            let conn = round * 10_000 + i;
            t.on_bind(&format!("g{i}@example.com/r"), N1, N2, conn, h.clone());
        }
        assert_eq!(t.user_count(), 5000);
        for i in 0..5000u64 {
            assert_eq!(t.summary(&format!("g{i}@example.com")).unwrap().sessions, 1);
            t.on_close(round * 10_000 + i);
        }
        assert_eq!(t.user_count(), 0);
        assert_eq!(t.count_on(N2), 0);
    }
    let m = t.memory();
    assert_eq!(m.jids, 0);
    assert!(m.user_slots > 0);
}

#[tokio::test]
async fn memory_split_counts_the_parts() {
    let t = Tracker::new();
    let (h, _r) = handle();
    for i in 0..1000u64 {
        t.on_bind(&format!("m{i}@example.com/r"), N1, N1, i, h.clone());
    }
    t.on_bind("m1@example.com/second", N1, N1, 5000, h);
    let m = t.memory();
    assert!(m.user_slots >= 1000 * 64);
    assert!(m.sessions >= 1001 * 64);
    assert!(m.extra > 0);
    let want: usize = (0..1000u64)
        .map(|i| 16 + format!("m{i}@example.com/r").len())
        .sum::<usize>()
        + 16
        + "m1@example.com/second".len();
    assert_eq!(m.jids, want);
}

/// Readers never see a torn user: a slot freed by a transient user (home
/// and serving N2) is taken by a lasting one (N1, N1) while readers look
/// the lasting ones up, tables grow and tombstones are purged; a torn read
/// would pair one user's key with the other's fields. Users nobody touches
/// are always found, watched users moved between nodes always read whole.
#[test]
fn lock_free_reads_never_tear_or_miss() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const STABLE: u64 = 2000;
    const ROUNDS: u64 = 1500;
    let t = std::sync::Arc::new(Tracker::new());
    let (h, _r) = handle();
    for i in 0..STABLE {
        t.on_bind(
            &format!("s{i}@example.com/r"),
            N1,
            N2,
            1_000_000 + i,
            h.clone(),
        );
    }
    let on = Presence {
        available: true,
        ..Presence::default()
    };
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let done: std::sync::Arc<[AtomicU64; 2]> = std::sync::Arc::new(Default::default());
    let mut writers = Vec::new();
    for k in 0..2u64 {
        let (t, h, done) = (t.clone(), h.clone(), done.clone());
        writers.push(std::thread::spawn(move || {
            for round in 0..ROUNDS {
                // A watched user moved between nodes, one or two sessions.
                let w = format!("w{k}@example.com");
                let node = if round % 2 == 0 { N1 } else { N2 };
                let base = 10_000 * (k + 1) + 4 * round;
                t.on_bind(&format!("{w}/a"), node, node, base, h.clone());
                t.on_bind(&format!("{w}/b"), node, node, base + 1, h.clone());
                t.on_presence(base, on);
                t.on_close(base + 1);
                t.on_close(base);
                // Transient users (even j) and lasting ones (odd j).
                for j in 0..8u64 {
                    let c = 5_000_000 + k * 1_000_000 + round * 8 + j;
                    let n = if j % 2 == 0 { N2 } else { N1 };
                    t.on_bind(
                        &format!("c{k}x{round}x{j}@example.com/r"),
                        n,
                        n,
                        c,
                        h.clone(),
                    );
                }
                for j in (0..8u64).step_by(2) {
                    t.on_close(5_000_000 + k * 1_000_000 + round * 8 + j);
                }
                done[k as usize].store(round + 1, Ordering::Release);
            }
        }));
    }
    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (t, stop, done) = (t.clone(), stop.clone(), done.clone());
        readers.push(std::thread::spawn(move || {
            let mut rng = Xs(r + 1);
            let mut batch = vec![None; 8];
            let keys: Vec<String> = (0..8).map(|j| format!("S{j}@example.com")).collect();
            let mut checked = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = rng.next() % 2;
                if let Some(s) = t.summary(&format!("w{k}@example.com")) {
                    assert_eq!(s.home, s.serving, "torn read {s:?}");
                    assert!(s.sessions <= 2);
                }
                let d = done[k as usize].load(Ordering::Acquire);
                if d > 0 {
                    let round = rng.next() % d;
                    let j = 1 + 2 * (rng.next() % 4);
                    let s = t
                        .summary(&format!("c{k}x{round}x{j}@example.com"))
                        .expect("a lasting user is found");
                    assert_eq!((s.home, s.serving, s.sessions), (N1, N1, 1), "torn read");
                    checked += 1;
                }
                let s = t
                    .summary(&format!("s{}@example.com", rng.next() % STABLE))
                    .expect("an untouched user is always found");
                assert_eq!((s.home, s.serving, s.sessions), (N1, N2, 1));
                t.summaries(&keys, &mut batch);
                assert!(batch.iter().all(|b| b.is_some_and(|s| s.serving == N2)));
            }
            checked
        }));
    }
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let checked: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(checked > 0);
    assert_eq!(t.user_count() as u64, STABLE + 2 * ROUNDS * 4);
    assert_eq!(t.count_on(N2) as u64, STABLE);
    assert_eq!(t.count_on(N1) as u64, 2 * ROUNDS * 4);
}

/// xorshift64 for the tests' random picks.
pub(super) struct Xs(pub u64);

impl Xs {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
